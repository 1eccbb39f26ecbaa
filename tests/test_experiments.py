"""plumb experiment: every experiment in --quick mode, checked against the lecture's
qualitative result on the numbers it measured; the folder, the pages and the CLI."""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import re

import pytest
import torch
from PIL import Image
from torch import nn

from plumb import nn as pnn
from plumb.cli import main
from plumb.errors import PlumbError
from plumb.experiments import NAMES, Options, run_all, run_experiment
from plumb.fold import fold_batchnorm
from plumb.init import expected_initial_loss
from plumb.models import MLP, preset_config


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """`plumb experiment all --quick`, once for the module (~1 min)."""
    root = tmp_path_factory.mktemp("experiments")
    index = run_all(root, Options(quick=True))
    return root, index


def results(suite, name: str) -> dict:
    return json.loads((suite[0] / name / "results.json").read_text())


def by(rows: list[dict], **match) -> dict:
    (row,) = [r for r in rows if all(r[k] == v for k, v in match.items())]
    return row


# --- the folder, the pages, the index -------------------------------------------------


def test_index_links_every_page(suite):
    root, index = suite
    html = index.read_text()
    for name in NAMES:
        assert f'href="{name}/index.html"' in html
        page = (root / name / "index.html").read_text()
        assert "<script" not in page.lower()
        summary = results(suite, name)
        for key in ("question", "method", "answer", "headline"):
            assert summary[key]
        # question, method and the computed answer are on the page (escaped)
        assert re.sub(r"\s+", " ", summary["question"].replace("'", "&#x27;"))[:60] in re.sub(
            r"\s+", " ", page
        )
        assert "../index.html" in page
    assert len(json.loads((root / "index.json").read_text())) == len(NAMES)


def test_every_experiment_writes_figures_and_tables(suite):
    root, _ = suite
    for name in NAMES:
        folder = root / name
        pngs = sorted(folder.glob("*.png"))
        assert pngs, name
        for p in pngs:
            with Image.open(p) as im:
                assert im.format == "PNG" and im.size[0] > 300
        rows = list(csv.DictReader(io.StringIO((folder / "results.csv").read_text())))
        assert rows == [] or len(rows) == len(results(suite, name)["rows"])
        assert rows, name


def test_pages_answer_first_plain_tables_and_quick_marked(suite):
    """Each page opens with its answer (before the question), marks a quick run, shows
    tables with plain headers and no raw nan, and asks about the sweep that ran."""
    from html import unescape

    root, index = suite
    assert "ran with --quick" in index.read_text() and index.read_text().count("<br>quick") == len(NAMES)  # fmt: skip
    for name in NAMES:
        page = unescape((root / name / "index.html").read_text())
        summary = results(suite, name)
        assert page.index(summary["headline"]) < page.index("<h2>Question</h2>"), name
        assert 'class="quick"' in page and "Quick run (--quick)" in page, name
        heads = re.findall(r"<th[^>]*>(.*?)</th>", page)
        assert heads and not any("_" in h for h in heads), (name, heads)
        cells = re.findall(r"<td[^>]*>(.*?)</td>", page)
        assert not {"nan", "inf", "None", ""} & set(cells), name
        for cell in cells:  # numbers with at most 4 significant figures
            digits = re.sub(r"e[-+]\d+$", "", cell.replace(",", "").rstrip("%").lstrip("-+"))
            if re.fullmatch(r"\d*\.\d+", digits):
                assert len(digits.replace(".", "").lstrip("0")) <= 4, (name, cell)
        sweep = summary["settings"]["sweep"]
        for v in sweep or []:  # the question names every value that ran
            assert f"{v:.4g}" in summary["question"], (name, v, summary["question"])


def test_page_cells_say_diverged_and_na():
    from plumb.experiments.page import page_cell

    assert page_cell(None) == "n/a" and page_cell(math.nan) == "diverged"
    assert page_cell(math.inf) == "diverged" and page_cell(True) == "yes"
    assert page_cell(2.3456789) == "2.346" and page_cell(0.4123, percent=True) == "41.2%"
    assert page_cell(12345) == "12,345" and page_cell(1.2e-7) == "1.200e-07"


def test_headlines_name_the_winner_from_the_numbers(suite):
    """The headline's winner is the row its numbers make the winner, and its reason
    carries the measured saturation (not a std spread alone)."""
    r = results(suite, "init-comparison")
    best = min(r["rows"], key=lambda x: x["val"])
    assert r["headline"].startswith(f"{best['init']} wins")
    normal = by(r["rows"], init="N(0,1)")
    assert f"saturating {normal['saturation_mean']:.0%} of tanh outputs" in r["headline"]
    g = results(suite, "gain-sweep")
    tanh = by(g["rows"], activation="tanh", gain=round(g["extra"]["steadiest"]["tanh"], 4))
    assert f"tanh gain {tanh['gain']:.3g}" in g["headline"]
    assert f"{tanh['saturation_mean']:.0%} saturated" in g["headline"]
    n = results(suite, "norm-alternatives")
    best = min(n["tables"]["summary"], key=lambda x: x["best_val"])
    label = {"none": "No normalisation", "batch": "BatchNorm", "layer": "LayerNorm", "group": "GroupNorm"}  # fmt: skip
    assert n["headline"].startswith(f"{label[best['norm']]} wins on val loss")


# --- each experiment's lesson, on its own numbers ----------------------------------


def test_loss_log_original_is_confidently_wrong(suite):
    rows = results(suite, "loss-log")["rows"]
    ln27 = expected_initial_loss(27)
    original = by(rows, stage="original")
    assert original["step0_loss"] > 5 * ln27  # the lecture's 27.9 at step 0
    for r in rows[1:]:
        assert abs(r["step0_loss"] - ln27) < 0.1, r["stage"]
        assert r["val"] < original["val"], r["stage"]


def test_init_comparison_kaiming_stable_normal_saturates(suite):
    rows = results(suite, "init-comparison")["rows"]
    kaiming, normal, default = (
        by(rows, init=k) for k in ("Kaiming 5/3", "N(0,1)", "torch default")
    )
    assert kaiming["act_std_spread"] <= 2.0  # per-layer std within a factor 2 over depth
    assert kaiming["saturation_mean"] < 0.3
    assert normal["saturation_mean"] > 0.5  # N(0,1): tanh pinned at +-1
    assert default["act_std_layer10"] < default["act_std_layer1"] / 2  # shrinks with depth
    assert kaiming["val"] < normal["val"]


def test_gain_sweep_picks_one_for_linear_and_five_thirds_for_tanh(suite):
    r = results(suite, "gain-sweep")
    assert r["extra"]["steadiest"]["linear"] == pytest.approx(1.0)
    assert r["extra"]["steadiest"]["tanh"] == pytest.approx(5 / 3, abs=1e-3)
    small = by(r["rows"], activation="tanh", gain=0.5)
    assert small["act_std_ratio_last_first"] < 0.01  # vanishes


def test_batchnorm_parity_torch_convention_matches(suite):
    rows = results(suite, "batchnorm-parity")["rows"]
    same, lecture = by(rows, variance="torch"), by(rows, variance="lecture")
    for key in ("max_logit_diff", "max_grad_diff", "max_running_diff", "max_eval_output_diff"):
        assert same[key] < 1e-4, key
    assert lecture["first_bn_std_ratio"] == pytest.approx(math.sqrt(31 / 32), abs=1e-3)
    assert lecture["max_logit_diff"] > 1e-3


def test_gradient_flow_normalisation_removes_scale_dependence(suite):
    change = results(suite, "gradient-flow")["extra"]["profile_change"]
    assert change["batch"] < 1.01 and change["layer"] < 1.01
    assert change["none"] > 10


def test_update_ratio_rises_with_lr(suite):
    rows = results(suite, "update-ratio")["rows"]
    meds = [r["update_data_log10_median"] for r in rows]
    assert all(b > a for a, b in itertools.pairwise(meds))
    # plain SGD: about one decade of update per decade of lr
    assert 0.5 < (meds[-1] - meds[0]) / math.log10(rows[-1]["lr"] / rows[0]["lr"]) < 1.5


def test_eval_mode_bug_train_mode_depends_on_batch(suite):
    rows = results(suite, "eval-mode-bug")["rows"]
    assert all(r["probe_spread_eval_mode"] == 0 for r in rows)  # eval: deterministic
    assert rows[0]["probe_spread_train_mode"] > rows[-1]["probe_spread_train_mode"] > 0
    assert rows[0]["val_loss_forgot_eval"] > rows[-1]["val_loss_forgot_eval"]


def test_bn_rescue_batchnorm_rescues_100x(suite):
    rows = results(suite, "bn-rescue")["rows"]
    assert by(rows, norm="batch", scale=100.0)["trains"]
    assert not by(rows, norm="none", scale=100.0)["trains"]
    assert by(rows, norm="none", scale=1.0)["trains"]


def test_norm_alternatives_only_batchnorm_has_a_mode_gap(suite):
    rows = results(suite, "norm-alternatives")["rows"]
    for norm in ("none", "layer", "group"):
        assert all(r["train_eval_gap"] < 1e-5 for r in rows if r["norm"] == norm), norm
    assert by(rows, norm="batch", batch_size=2)["train_eval_gap"] > 1e-2


def test_zero_init_only_output_bias_learns(suite):
    r = results(suite, "zero-init")
    zero = by(r["rows"], init="zero")
    assert zero["params_with_gradient"] == 1
    moved = [
        g["parameter"]
        for g in r["tables"]["gradients"]
        if g["init"] == "zero" and g["max_abs_grad"] > 0
    ]
    assert moved == ["layers.output.bias"]
    # context-free: cannot beat the unigram entropy on the training set
    assert zero["train_loss_full"] >= zero["unigram_entropy"] - 1e-4
    assert by(r["rows"], init="constant")["max_hidden_unit_spread"] < 1e-4
    assert by(r["rows"], init="kaiming")["max_hidden_unit_spread"] > 0.1


def test_bn_folding_same_outputs(suite):
    extra = results(suite, "bn-folding")["extra"]
    assert extra["batchnorms"] == [6, 0]
    assert extra["max_abs_diff"] < 1e-4
    assert extra["val_loss"][0] == pytest.approx(extra["val_loss"][1], abs=1e-5)


def test_calibration_ln_c(suite):
    rows = results(suite, "calibration")["rows"]
    for c in (27, 1000):
        assert by(rows, classes=c, out_scale=0.0)["initial_loss"] == pytest.approx(
            math.log(c), abs=1e-4
        )
        assert by(rows, classes=c, out_scale=0.01)["excess"] < 0.01 * math.log(c)
        assert by(rows, classes=c, out_scale=1.0)["excess"] > 1.0


# --- side by side, options, errors ---------------------------------------------------


def test_parallel_runs_match_serial(tmp_path):
    a = run_experiment("batchnorm-parity", tmp_path / "a", Options(quick=True, jobs=1, steps=5))
    b = run_experiment("batchnorm-parity", tmp_path / "b", Options(quick=True, jobs=2, steps=5))
    ra, rb = (json.loads((p.parent / "results.json").read_text()) for p in (a, b))
    assert ra["rows"] == rb["rows"]
    assert "2 process(es)" in rb["settings"]["parallel"][0]


def test_steps_seed_and_sweep_flags(tmp_path, capsys):
    assert main(["experiment", "gain-sweep", "--quick", "--steps", "3", "--seed", "7",
                 "--gains", "1,5/3", "--out", str(tmp_path)]) == 0  # fmt: skip
    r = results((tmp_path,), "gain-sweep")
    assert r["settings"]["steps"] == 3 and r["settings"]["seed"] == 7
    assert [row["gain"] for row in r["rows"]] == [1.0, 1.6667, 1.0, 1.6667]
    assert "among gains 1 and 1.667," in r["question"]  # the sweep that ran
    assert "page:" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["experiment", "nope"], "choose one of loss-log"),
        (["experiment", "gain-sweep", "--gains", "1,x"], "not a number"),
        (["experiment", "gain-sweep", "--gains", "-1"], "out of range"),
        (["experiment", "gain-sweep", "--gains", "1,1"], "repeat"),
        (["experiment", "update-ratio", "--lrs", "nan"], "out of range"),
        (["experiment", "eval-mode-bug", "--batch-sizes", "1"], "out of range"),
        (["experiment", "norm-alternatives", "--batch-sizes", "2.5"], "not an integer"),
        (["experiment", "calibration", "--out-scales", ""], "needs comma-separated"),
        (["experiment", "zero-init", "--lrs", "0.1"], "not read by zero-init"),
        (["experiment", "calibration", "--steps", "0"], "--steps"),
        (["experiment", "calibration", "--device", "tpu"], "device"),
    ],
)
def test_bad_input_one_line_error(argv, message, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not any(tmp_path.iterdir())  # nothing written


def test_unknown_name_in_python():
    with pytest.raises(PlumbError, match="bn-folding"):
        run_experiment("bn-fold")


# --- plumb.fold ----------------------------------------------------------------------


def _trained_bn(model: nn.Module, d_in: int) -> None:
    g = torch.Generator().manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(5):
            model(torch.randn(16, d_in, generator=g) * 3 + 1)
        for m in model.modules():
            if getattr(m, "weight", None) is not None and m.weight.ndim == 1:
                m.weight.uniform_(0.5, 2, generator=g)
                m.bias.normal_(generator=g)


@pytest.mark.parametrize("kind", ["plumb", "torch", "lecture", "no-affine"])
def test_fold_batchnorm_same_function(kind):
    if kind == "torch":
        model = nn.Sequential(nn.Linear(7, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))
    else:
        bn = {
            "plumb": pnn.BatchNorm1d(5),
            "lecture": pnn.LectureBatchNorm1d(5, momentum=0.5),
            "no-affine": pnn.BatchNorm1d(5, affine=False),
        }[kind]
        model = pnn.Sequential(pnn.Linear(7, 5, bias=kind == "plumb"), bn, pnn.Tanh())
    _trained_bn(model, 7)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batchnorm(model)
    x = torch.randn(64, 7)
    model.eval()
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    assert not any(
        isinstance(m, nn.BatchNorm1d | pnn.BatchNorm1d | pnn.LectureBatchNorm1d)
        for m in folded.modules()
    )
    for k, v in model.state_dict().items():  # the original is untouched
        assert torch.equal(v, before[k])


def test_fold_lecture_deep_and_refuse_batch_only_norm():
    model = MLP(preset_config("lecture-deep"))
    folded = fold_batchnorm(model.eval())
    ids = torch.randint(0, 27, (32, 3))
    torch.testing.assert_close(folded(ids), model(ids), rtol=1e-5, atol=1e-5)
    seq = pnn.Sequential(pnn.Linear(4, 4), pnn.BatchNorm1d(4, track_running_stats=False))
    with pytest.raises(PlumbError, match="running statistics"):
        fold_batchnorm(seq)


def test_every_page_renders_in_headless_chromium(suite):
    """The index and each experiment's page: no console error, every image decoded, no
    script, no element wider than the 1280-px viewport, a screenshot that is not blank."""
    import numpy as np
    from browser import Browser

    root, _ = suite
    pages = [root / "index.html"] + [root / name / "index.html" for name in NAMES]
    browser = Browser()
    try:
        for path in pages:
            session = browser.open(path)
            info = browser.evaluate(
                session,
                """(async () => {
                    // this page, loaded (a late load event of the previous page is no proof)
                    for (let i = 0; i < 200; i++) {
                      if (location.href === 'HREF' && document.readyState === 'complete') break;
                      await new Promise(r => setTimeout(r, 25));
                    }
                    const imgs = [...document.images];
                    await Promise.all(imgs.map(i => i.decode().catch(() => null)));
                    // no element wider than the viewport, or reaching past its right edge
                    const vw = document.documentElement.clientWidth;
                    const wide = [...document.querySelectorAll('body *')]
                      .map(el => [el.tagName, el.getBoundingClientRect()])
                      .filter(([, r]) => r.width > vw || r.right > vw + 1)
                      .map(([t, r]) => t + ' ' + Math.round(r.width));
                    return {images: imgs.map(i => [i.complete, i.naturalWidth]),
                            scripts: document.scripts.length, wide: wide,
                            scroll: document.documentElement.scrollWidth - vw};
                })()""".replace("HREF", path.resolve().as_uri()),
            )
            shot = np.asarray(Image.open(io.BytesIO(browser.screenshot(session))).convert("L"))
            assert info["scripts"] == 0, path
            assert info["wide"] == [] and info["scroll"] <= 0, (path, info["wide"])
            assert all(c and w > 50 for c, w in info["images"]), (path, info["images"])
            assert path.name != "index.html" or path.parent == root or info["images"], path
            assert 0.001 < (shot < 128).mean() < 0.5 and len(np.unique(shot)) > 10, path
            # a phone (390 px): no sideways scroll of the page, text off the edge
            phone = browser.layout(browser.open(path, width=390))
            assert phone["overflow"] <= 0 and phone["left"] >= 6, (path, phone)
            assert phone["minFont"] >= 10, (path, phone)
        problems = browser.problems()
    finally:
        browser.close()
    assert problems == []


def test_one_experiment_alone_has_an_index_to_link_to(tmp_path):
    """`plumb experiment NAME` alone writes ROOT/index.html (its page links there); a
    second one run later joins the first in it."""
    from plumb.experiments import run_experiment

    run_experiment("calibration", tmp_path, Options(quick=True))
    assert (tmp_path / "index.html").is_file()
    run_experiment("zero-init", tmp_path, Options(quick=True))
    listed = [x["name"] for x in json.loads((tmp_path / "index.json").read_text())]
    assert listed == [n for n in NAMES if n in ("calibration", "zero-init")]
    assert '<a href="../index.html">' in (tmp_path / "zero-init" / "index.html").read_text()
