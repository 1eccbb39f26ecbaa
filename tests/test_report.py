"""The run record, figures, HTML report (in a real headless browser), TensorBoard export."""

from __future__ import annotations

import io
import itertools
import json
import os
import re

import numpy as np
import pytest
from browser import Browser, chromium

from plumb import TrainConfig, load_run, preset_config, train_run
from plumb.errors import PlumbError
from plumb.report import write_report

XSS = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory, names):
    """A short run whose data holds an HTML/script item, with TensorBoard on."""
    tmp = tmp_path_factory.mktemp("hostile")
    data = tmp / "items.txt"
    words = [XSS, "<b>bold</b>", "o'hara & sons", *names.train.items[:2000]]
    data.write_text("\n".join(words) + "\n", encoding="utf-8")
    out = tmp / "run"
    cfg = TrainConfig(steps=300, lr_decay_step=None, threads=1, probe_every=20, print_every=100)
    run = train_run(
        preset_config("lecture-deep"),
        cfg,
        out,
        data,
        progress=False,
        samples=10,
        tensorboard=out / "tb",
    )
    return run


def test_record_round_trip(hostile_run):
    rec = load_run(hostile_run.out)
    assert [r["step"] for r in rec.rows] == list(range(0, 300, 20))
    assert len(rec.loss) == 300
    np.testing.assert_array_equal(rec.loss, hostile_run.result.losses.numpy())
    # the row's loss is that step's training loss
    assert rec.rows[3]["loss"] == pytest.approx(float(rec.loss[60]))
    steps, counts, ranges = rec.histogram("layer", "layers.tanh1")
    assert steps.tolist() == [0, 200]
    assert counts.shape == (2, rec.meta["bins"]) and counts[0].sum() == 32 * 100
    assert np.all(ranges[:, 0] >= -1) and np.all(ranges[:, 1] <= 1)
    msteps, maps = rec.saturation_maps()
    assert msteps.tolist() == [0, 200] and maps.shape == (2, 32, 100)
    s = rec.rows[10]["layer"]["layers.tanh1"]  # step 200, the last map's step
    assert s["saturated"] == pytest.approx(float(maps[-1].mean()), abs=1e-6)
    us, ud = rec.series("param", "layers.linear2.weight", "update_data")
    assert len(us) == 15 and np.all(np.isfinite(ud)) and np.all(ud < 0)


def test_report_escapes_everything_user_supplied(hostile_run):
    text = (hostile_run.out / "report.html").read_text(encoding="utf-8")
    assert XSS not in text and "<b>bold</b>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "&lt;b&gt;bold&lt;/b&gt;" in text
    assert "<script" not in text.lower()
    assert "http://" not in text and "https://" not in text  # nothing fetched
    assert len(re.findall(r'<img alt="[a-z_]+" src="data:image/png;base64,', text)) == 7


def test_report_layer_names_are_escaped(tmp_path):
    import torch
    from torch import nn

    import plumb

    model = nn.Sequential()
    model.add_module("<i>lin</i>", nn.Linear(4, 8))
    model.add_module("act", nn.Tanh())
    model.add_module("head", nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with plumb.Monitor(model, every=1, out=tmp_path / "r") as mon:
        for _ in range(3):
            loss = model(torch.randn(16, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(loss)
    text = (tmp_path / "r" / "report.html").read_text()
    assert "<i>lin</i>" not in text and "&lt;i&gt;lin&lt;/i&gt;" in text


def test_rebuild_report_and_bad_records(hostile_run, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(hostile_run.out, run)
    (run / "report.html").unlink()
    assert write_report(run).is_file()
    lines = (run / "probes" / "scalars.jsonl").read_text().splitlines()
    (run / "probes" / "scalars.jsonl").write_text("\n".join(lines) + "\n" + lines[-1][:40])
    assert len(load_run(run).rows) == len(lines)  # a torn last line (crash) is dropped
    (run / "probes" / "scalars.jsonl").write_text(lines[0] + "\n{not json\n" + lines[1] + "\n")
    with pytest.raises(PlumbError, match="line 2 is not valid JSON"):
        load_run(run)
    (run / "probes" / "meta.json").write_text('{"format": 99}')
    with pytest.raises(PlumbError, match="record format 99"):
        load_run(run)
    (run / "probes" / "meta.json").unlink()
    with pytest.raises(PlumbError, match="no probe record"):
        load_run(run)
    with pytest.raises(PlumbError, match="does not exist"):
        load_run(tmp_path / "nope")


def test_tensorboard_events_read_back(hostile_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(
        str(hostile_run.out / "tb"), size_guidance={"scalars": 0, "histograms": 0}
    )
    acc.Reload()
    tags = acc.Tags()
    loss = acc.Scalars("loss")
    assert len(loss) == 300
    assert loss[0].value == pytest.approx(float(hostile_run.result.losses[0]), rel=1e-6)
    std = acc.Scalars("layer/std/layers.tanh1")
    assert [e.step for e in std] == list(range(0, 300, 20))
    rec = load_run(hostile_run.out)
    assert std[-1].value == pytest.approx(rec.rows[-1]["layer"]["layers.tanh1"]["std"], rel=1e-6)
    assert "hist/layer/layers.tanh1" in tags["histograms"]
    h = acc.Histograms("hist/layer/layers.tanh1")
    assert [e.step for e in h] == [0, 200] and h[0].histogram_value.num == 3200


@pytest.mark.skipif(
    chromium() is None and not os.environ.get("CI"),
    reason="chromium not installed (CI installs it: apt-get install -y chromium)",
)
def test_report_renders_in_headless_chromium(hostile_run, tmp_path):
    from PIL import Image

    browser = Browser()
    try:
        session = browser.open(hostile_run.out / "report.html")
        info = browser.evaluate(
            session,
            """(async () => {
                const imgs = [...document.images];
                await Promise.all(imgs.map(i => i.decode().catch(() => null)));
                const heads = [...document.querySelectorAll('h2')].map(h => h.innerText);
                const h1 = document.querySelector('h1').nextElementSibling;
                const first = h1.classList.contains('headline') ? 'headline' : h1.tagName;
                const headline = h1.innerText;
                const folded = document.querySelector('details') !== null
                  && !document.querySelector('details').open;
                document.querySelectorAll('details').forEach(d => { d.open = true; });
                return {
                  heads: heads,
                  first: first,
                  headline: headline,
                  folded: folded,
                  firstImage: imgs.length ? imgs[0].alt : null,
                  images: imgs.map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight]),
                  scripts: document.scripts.length,
                  xssShownAsText: document.body.innerText.includes('<script>alert(1)</script>'),
                  height: document.body.scrollHeight,
                  title: document.title,
                };
            })()""",
        )
        shot = browser.screenshot(session)
        problems = browser.problems()
    finally:
        browser.close()
    (tmp_path / "report.png").write_bytes(shot)
    assert problems == []  # no console errors, no exceptions, no alert() dialog
    assert info["scripts"] == 0
    assert info["xssShownAsText"] is True
    # the report answers first (the headline, the run's essentials), then the findings,
    # the loss, the lecture's figures, the table; the run's details folded away
    assert info["heads"][:4] == ["Findings", "Loss", "Inside the network", "Layers"]
    assert info["first"] == "headline" and info["headline"].startswith(("Healthy", "Needs"))
    assert info["folded"] is True and info["firstImage"] == "loss"
    assert len(info["images"]) == 7
    assert all(c and w > 100 and h > 100 for _, c, w, h in info["images"]), info["images"]
    assert info["height"] > 2000
    img = np.asarray(Image.open(io.BytesIO(shot)).convert("L"))
    assert img.shape[0] > 300 and img.shape[1] > 300
    dark = (img < 128).mean()  # text and lines on a white page
    assert 0.001 < dark < 0.5, dark
    assert len(np.unique(img)) > 20


@pytest.mark.skipif(
    chromium() is None and not os.environ.get("CI"),
    reason="chromium not installed (CI installs it: apt-get install -y chromium)",
)
def test_report_and_compare_fit_a_phone(hostile_run, tmp_path):
    """At 390 px (a phone) and 1280 px, the report and the compare page never scroll
    sideways (wide tables scroll inside their own box, figures scale), text keeps a
    margin from the screen's edge, and no font is below 10 px."""
    from plumb.report.compare import write_compare

    page = write_compare([hostile_run.out, hostile_run.out], tmp_path / "cmp.html")
    browser = Browser()
    try:
        seen = {}
        for path in (hostile_run.out / "report.html", page):
            for width in (390, 1280):
                session = browser.open(path, width=width)
                browser.images(session)
                seen[path.name, width] = browser.layout(session)
        problems = browser.problems()
    finally:
        browser.close()
    assert problems == []
    for key, got in seen.items():
        assert got["width"] == key[1], (key, got)
        assert got["overflow"] <= 0, (key, got)  # no sideways scroll of the page
        assert got["left"] >= 6, (key, got)  # text off the edge
        assert got["minFont"] >= 10, (key, got)


@pytest.mark.skipif(
    chromium() is None and not os.environ.get("CI"),
    reason="chromium not installed (CI installs it: apt-get install -y chromium)",
)
def test_report_csp_blocks_scripts_and_remote_loads(hostile_run, tmp_path):
    """The report's Content-Security-Policy, enforced by the browser: a script slipped
    into the page does not run, and nothing loads from the network (only data: images)."""
    page = (hostile_run.out / "report.html").read_text()
    assert 'http-equiv="Content-Security-Policy"' in page
    hostile = page.replace(
        "</body>",
        '<script>document.title = "script ran"</script>'
        '<img id="remote" src="http://127.0.0.1:9/x.png">'
        '<img id="inline" src="data:image/gif;base64,R0lGODlhAQABAAAAACw=">'
        "</body>",
    )
    path = tmp_path / "hostile.html"
    path.write_text(hostile)
    browser = Browser()
    try:
        session = browser.open(path)
        info = browser.evaluate(
            session,
            """(async () => {
                await new Promise(r => setTimeout(r, 300));
                return {title: document.title,
                        remote: document.getElementById('remote').naturalWidth,
                        inline: document.getElementById('inline').complete};
            })()""",
        )
        problems = browser.problems()
    finally:
        browser.close()
    assert info["title"] != "script ran" and info["remote"] == 0
    assert any("Content Security Policy" in p for p in problems), problems


def test_samples_json(hostile_run):
    extras = json.loads((hostile_run.out / "samples.json").read_text())
    assert len(extras["samples"]) == 10
    assert extras["data_preview"]["first items of the file"][0] == XSS


def test_notebook_views(hostile_run):
    """What Jupyter shows: a run (verdict, losses, loss figure, layer table with
    sparklines), each figure as one call, a diagnosis, a Monitor with and without out."""
    import matplotlib.pyplot as plt
    import torch
    import torch.nn.functional as F
    from matplotlib.figure import Figure

    import plumb
    from plumb.report.figures import FIGURES

    rec = load_run(hostile_run.out)
    html = rec._repr_html_()
    assert "Findings" in html and 'alt="loss"' in html and html.count("<svg") > 10
    # one look for every view: the report's stylesheet, scoped to plumb's box, and its
    # headline; the same for a diagnosis
    from plumb.style import STYLE

    assert html.startswith('<div class="plumb"><style>') and STYLE in html
    assert 'class="headline' in html
    assert "<script>alert(1)</script>" not in html
    for name in FIGURES:
        fig = rec.plot(name)
        assert isinstance(fig, Figure) and fig.axes and fig.axes[0].has_data(), name
        plt.close(fig)
    with pytest.raises(PlumbError, match="unknown figure 'nope'"):
        rec.plot("nope")
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x, y = torch.randn(64, 4) * 30, torch.randint(0, 3, (64,))  # saturates the tanh
    diag = plumb.diagnose(
        model, (x, y), F.cross_entropy, torch.optim.SGD(model.parameters(), 0.1), steps=10
    )
    d = diag._repr_html_()
    assert all(f"<code>{c}</code>" in d for c in diag.codes) and diag.codes
    assert STYLE in d and '<div class="headline bad">' in d and "Needs attention" in d
    opt = torch.optim.SGD(model.parameters(), 0.1)
    with plumb.Monitor(model, every=1, doctor=True, report=False) as mon:
        for _ in range(3):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(loss)
        live = mon._repr_html_()
    assert "3 steps" in live and f"{float(mon.history.loss[-1]):.4f}" in live


def test_report_of_a_run_in_progress_and_watch(tmp_path):
    """`plumb report RUN` while the run trains reads what was flushed and leaves the run
    alone; `--watch` rebuilds with a meta refresh (no script: the CSP stays) until the
    run ends, then once more without it."""
    import subprocess
    import sys
    import time

    out = tmp_path / "live"
    train = subprocess.Popen(
        [
            *(sys.executable, "-m", "plumb", "train", "--steps", "4000", "--out", str(out)),
            *("--no-progress", "--samples", "0", "--threads", "1", "--engine", "eager"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    t0 = time.monotonic()
    while not (out / "probes" / "scalars.jsonl").is_file():
        assert train.poll() is None and time.monotonic() - t0 < 120
        time.sleep(0.2)
    watch = subprocess.Popen(
        [sys.executable, "-m", "plumb", "report", str(out), "--watch", "0.5"],
        stdout=subprocess.PIPE,
        text=True,
    )
    seen_live = False
    while train.poll() is None:
        page = (out / "report.html").read_text() if (out / "report.html").is_file() else ""
        if 'http-equiv="refresh"' in page and (out / "checkpoint.safetensors").exists():
            seen_live = "in progress" in page and "Content-Security-Policy" in page
        time.sleep(0.2)
    assert train.returncode == 0, train.stderr.read()
    assert watch.wait(timeout=60) == 0 and "rebuilt" in watch.stdout.read()
    assert seen_live
    final = (out / "report.html").read_text()
    assert 'http-equiv="refresh"' not in final and "<script" not in final
    assert (out / "metrics.json").is_file()  # the run finished undisturbed


@pytest.mark.skipif(
    chromium() is None and not os.environ.get("CI"),
    reason="chromium not installed (CI installs it: apt-get install -y chromium)",
)
def test_compare_original_against_kaiming(tmp_path, capsys):
    """`plumb compare`: the lecture's original init against Kaiming's, on one page:
    losses overlaid, the fields that differ, findings and layers side by side; it
    renders in headless Chromium; a directory that is not a run is a one-line error."""
    from PIL import Image

    from plumb.cli import main

    runs = []
    for stage in ("original", "kaiming"):
        out = tmp_path / stage
        cfg = TrainConfig(steps=300, threads=1, engine="eager", eval_every=100)
        train_run(preset_config(f"lecture-mlp:{stage}"), cfg, out, progress=False, samples=0)
        runs.append(str(out))
    page = tmp_path / "cmp.html"
    assert main(["compare", *runs, "--out", str(page)]) == 0
    text = page.read_text()
    diff = text[text.index("What differs") : text.index("Findings")]
    assert "model.init" in diff and ">normal<" in diff and ">kaiming<" in diff
    assert "train.steps" not in diff  # the same in both: not listed
    found = text[text.index("<h2>Findings") : text.index("<h2>Layers")]
    assert found.count("overconfident-init") == 1  # the original's, and only there
    assert found.index("overconfident-init") < found.index("Healthy after")
    # the page opens with which run is better and by how much
    top = text[text.index("<h1>") : text.index("What differs")]
    assert "kaiming beats original by" in top and "nats of val" in top
    browser = Browser()
    try:
        session = browser.open(page)
        info = browser.evaluate(
            session,
            """(async () => {
                const imgs = [...document.images];
                await Promise.all(imgs.map(i => i.decode().catch(() => null)));
                const wide = [...document.querySelectorAll('body *')].filter(
                  el => el.getBoundingClientRect().right > window.innerWidth + 1).length;
                return {images: imgs.map(i => [i.complete, i.naturalWidth]), wide: wide,
                        scripts: document.scripts.length};
            })()""",
        )
        shot = browser.screenshot(session)
        problems = browser.problems()
    finally:
        browser.close()
    assert problems == [] and info["scripts"] == 0 and info["wide"] == 0, info
    assert info["images"] and all(c and w > 100 for c, w in info["images"])
    img = np.asarray(Image.open(io.BytesIO(shot)).convert("L"))
    assert 0.001 < (img < 128).mean() < 0.5 and len(np.unique(img)) > 20
    capsys.readouterr()
    assert main(["compare", runs[0], str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a run directory" in err[0]


def _overlapping_ticks(fig) -> list[str]:
    """Axes whose visible x tick labels run into each other once drawn."""
    fig.canvas.draw()
    bad = []
    for ax in fig.axes:
        boxes = sorted(
            (
                t.get_window_extent()
                for t in ax.get_xticklabels()
                if t.get_visible() and t.get_text()
            ),
            key=lambda b: b.x0,
        )
        if any(a.x1 > b.x0 for a, b in itertools.pairwise(boxes)):
            bad.append(ax.get_title())
    return bad


class _LongRecord:
    """A record of a long run, just what the histograms-over-time figure reads: 6 tanh
    layers with a histogram every ``every`` steps up to ``last``."""

    def __init__(self, last: int, every: int):
        self.steps = np.arange(0, last + 1, every)
        rng = np.random.default_rng(0)
        self.counts = rng.integers(0, 50, (len(self.steps), 64))
        self.ranges = np.tile([-1.0, 1.0], (len(self.steps), 1))

    def layer_names(self):
        return [f"layers.tanh{i}" for i in range(1, 7)]

    def kind(self, name):
        return "tanh"

    def histogram(self, section, name):
        return self.steps, self.counts, self.ranges


def test_histograms_over_time_keep_step_labels_apart_at_any_length():
    """The issue's "5000 1000015000": panels of a long run with many histogram steps."""
    import matplotlib.pyplot as plt

    from plumb.report.figures import histogram_heatmaps

    for last, every in ((300, 20), (15_000, 500), (200_000, 2_000), (3_000_000, 20_000)):
        fig = histogram_heatmaps(_LongRecord(last, every))
        assert _overlapping_ticks(fig) == [], last
        plt.close(fig)


def test_a_50_layer_model_gets_a_readable_report_under_1_mb(tmp_path):
    """Every figure of a 51-layer model's report: drawn without a matplotlib warning
    (an error here), no overlapping tick labels, legends beside the axes (never over the
    data), and the whole report under 1 MB."""
    import warnings

    import matplotlib.pyplot as plt
    import torch
    import torch.nn.functional as F
    from torch import nn

    import plumb
    from plumb.report.figures import FIGURES

    torch.manual_seed(0)
    model = nn.Sequential(
        *[m for _ in range(25) for m in (nn.Linear(16, 16), nn.Tanh())], nn.Linear(16, 5)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(32, 16), torch.randint(0, 5, (32,))
    with plumb.Monitor(model, every=10, hist_every=20, out=tmp_path / "deep", report=False) as mon:
        for _ in range(200):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(loss)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = write_report(tmp_path / "deep")
        rec = load_run(tmp_path / "deep")
        assert len(rec.layer_names()) >= 50
        for name, draw in FIGURES.items():
            fig = draw(rec)
            if fig is None:
                continue
            assert _overlapping_ticks(fig) == [], name
            for ax in fig.axes:
                legend = ax.get_legend()
                if legend is not None:
                    assert len(legend.get_texts()) <= 13, name
                    box, frame = legend.get_window_extent(), ax.get_window_extent()
                    assert box.x0 >= frame.x1 - 1 or box.y1 <= frame.y0 + 1 or name == "loss"
            plt.close(fig)
    assert path.stat().st_size < 1_000_000, path.stat().st_size


def test_activation_caption_names_only_the_models_nonlinearities(tmp_path, hostile_run):
    """A GELU model's report does not talk of saturated tanh units; a tanh model's does."""
    import torch
    from torch import nn

    import plumb

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with plumb.Monitor(model, every=1, hist_every=2, out=tmp_path / "g", report=False) as mon:
        for _ in range(4):
            loss = nn.functional.cross_entropy(model(torch.randn(32, 8)), torch.randint(0, 4, (32,)))  # fmt: skip
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(loss)
    gelu = write_report(tmp_path / "g").read_text()
    assert 'alt="activations"' in gelu and "Saturated tanh" not in gelu
    assert "Saturated tanh units sit at" in (hostile_run.out / "report.html").read_text()
