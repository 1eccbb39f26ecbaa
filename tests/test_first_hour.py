"""What a newcomer meets first: the verdict with its exact fix (and that the fix works),
the terminal's last lines, a table that fits the terminal, an lr decay that happens, and
an engine choice that says why."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from plumb.cli import main
from plumb.doctor.fixes import attr_path, code_fix, exact_fix, headline
from plumb.record import load_run

QUIET = ["--samples", "0", "--no-progress", "--threads", "1", "--no-report"]


def _findings(run) -> dict[str, dict]:
    return {f["code"]: f for f in load_run(run).findings}


def test_the_flags_the_report_gives_fix_the_run(tmp_path, capsys):
    """lecture-mlp:original (the lecture's first, broken init): the headline names the
    flags that fix it, computed from the run's config and the doctor's measurement; run
    again with exactly those flags, the problems are gone and the loss is lower."""
    base = ["train", "--preset", "lecture-mlp:original", "--steps", "300", *QUIET]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    found = _findings(tmp_path / "a")
    assert {"overconfident-init", "saturated-activations"} <= set(found)
    rec = load_run(tmp_path / "a")
    first = exact_fix(found["overconfident-init"], rec.config)
    assert first == "--out-scale 0.01 --out-bias-scale 0"  # logit std 13 -> ~0.1: x 0.01
    assert exact_fix(found["saturated-activations"], rec.config) == "--init kaiming"
    # the terminal's last lines: the headline with the first fix, then each finding again
    tail = out[out.index("doctor: Needs attention") :]
    assert tail.startswith(f"doctor: Needs attention: 2 problems - fix first: {first}")
    assert "fix: --init kaiming" in tail
    flags = [*first.split(), *exact_fix(found["saturated-activations"], rec.config).split()]
    assert main([*base, *flags, "--out", str(tmp_path / "b")]) == 0
    assert not {"overconfident-init", "saturated-activations"} & set(_findings(tmp_path / "b"))
    # `plumb doctor RUN_DIR`: the saved run's diagnosis and fixes; exit 1 / 0
    capsys.readouterr()
    assert main(["doctor", str(tmp_path / "a")]) == 1
    assert f"fix first: {first}" in capsys.readouterr().out
    assert main(["doctor", str(tmp_path / "b")]) == 0
    # plumb compare without --out: beside the runs, opening with which is better
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    page = tmp_path / "compare-a-vs-b.html"
    assert capsys.readouterr().out.strip() == f"compare: {page}"
    assert "b beats a by " in page.read_text()
    m = [json.loads((tmp_path / r / "metrics.json").read_text()) for r in "ab"]
    assert m[1]["loss"]["val"] < m[0]["loss"]["val"] - 1.0
    assert m[1]["step0_loss"] < 3.5 < m[0]["step0_loss"]  # ln 27 = 3.30


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 32), nn.Tanh())
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        return self.head(self.body(x))


def test_the_code_line_given_for_a_user_loop_runs_and_fixes_it():
    """For a user's own model the fix is a line of PyTorch: executed as printed on the
    model, it brings the initial loss of an overconfident output layer to ~ln C."""
    import plumb

    torch.manual_seed(0)
    model = TwoLayer()
    with torch.no_grad():
        model.head.weight.mul_(40.0)
    x, y = torch.randn(256, 8), torch.randint(0, 5, (256,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    diag = plumb.diagnose(model, (x, y), F.cross_entropy, opt, steps=5)
    f = next(f.to_dict() for f in diag.findings if f.code == "overconfident-init")
    line = code_fix(f)
    assert line is not None and line.startswith("with torch.no_grad(): model.head.weight.mul_(")
    before = F.cross_entropy(model(x), y).item()
    exec(line, {"torch": torch, "model": model})
    after = F.cross_entropy(model(x), y).item()
    assert before > 3 * math.log(5) and abs(after - math.log(5)) < 0.25 * math.log(5)
    assert "fix: <code>with torch.no_grad()" in diag._repr_html_()


def test_attr_path_and_the_lines_of_other_codes():
    assert attr_path("blocks.0.mlp.c_fc") == "model.blocks[0].mlp.c_fc"
    assert attr_path("") == "model"
    assert attr_path("a-b.c") == 'model.get_submodule("a-b.c")'
    f = {"code": "lr-too-high", "where": "model", "evidence": {"lr": 0.5, "suggested_lr": 0.05}}
    assert code_fix(f) == 'for g in optimizer.param_groups: g["lr"] = 0.05'
    plumb_cfg = {"model": {"init": "kaiming"}, "train": {"lr": 0.5, "steps": 100}}
    assert exact_fix(f, plumb_cfg) == "--lr 0.05"
    f = {"code": "lr-too-low", "where": "model", "evidence": {"lr": 0.001}}
    assert exact_fix(f, plumb_cfg) == "--lr 0.01"  # no suggestion: a decade its way
    assert "cross_entropy(logits, y)" in code_fix({"code": "double-softmax", "where": "x"})
    # a norm's gain grew: decay earlier, except under a weight average (it lives on the
    # iterates' spread; decaying under it was measured to hurt: docs/engines.md)
    sat = {"code": "saturated-activations", "where": "tanh2", "evidence": {"norm": "norm2"}}
    cfg = {"model": {"init": "kaiming", "norm": "batch"}, "train": {"steps": 400_000}}
    assert exact_fix(sat, cfg) == "--lr-decay-step 200000"
    cfg["train"]["average_from"] = 100_000
    assert exact_fix(sat, cfg) is None


def test_headline():
    bad = [
        {"code": "not-learning", "severity": "warning", "where": "model"},
        {"code": "lr-too-high", "severity": "warning", "where": "model", "evidence": {"lr": 1.0}},
    ]
    h = headline(bad, 300, "val 2.5")
    assert h.kind == "bad" and h.text == "Needs attention: 2 problems"
    assert h.fix == 'for g in optimizer.param_groups: g["lr"] = 0.1'  # the first with a line
    h = headline([{"code": "redundant-bias", "severity": "info", "where": "l"}], 3000, "val 2.29")
    assert (h.kind, h.plain()) == ("good", "Healthy after 3,000 steps: val 2.29 (1 note below)")
    assert headline(None, 10).kind == "unknown"


def test_terminal_table_fits_100_columns(tmp_path):
    """The per-layer table of a model with long layer names fits a 100-column terminal."""
    import plumb
    from plumb.report.tables import terminal_table
    from plumb.zoo import GPT, GPTConfig, sequence_loss, text_windows

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32))
    draw = text_windows(block=16, batch=8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with plumb.Monitor(model, optimizer=opt, every=1, out=tmp_path / "gpt", report=False) as mon:
        for _ in range(3):
            x, y = draw()
            loss = sequence_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(loss)
    table = terminal_table(load_run(tmp_path / "gpt"))
    widths = [len(line) for line in table.splitlines()]
    assert max(widths) <= 100 and len(widths) > 10, max(widths)


def test_a_shorter_best_10min_still_averages_its_weights(tmp_path, capsys):
    """best-10min with --steps 200 starts its weight average at the preset's quarter of
    the run (75k of 300k -> step 50), says so, and ends with the mean of the 2 iterates
    taken every 100 steps (steps 50 and 150): weights that differ from its last iterate's,
    BatchNorm recalibrated."""
    small = ["--n-hidden", "16", "--no-probes", "--engine", "eager", *QUIET]
    argv = ["train", "--preset", "best-10min", "--steps", "200", *small]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert "weights averaged from step 50" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())["train"]
    assert cfg["average_from"] == 50 and cfg["lr_decay_step"] is None
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["averaged_iterates"] == 2 and metrics["bn_calibrated"]
    # the same run without the average ends elsewhere
    assert main([*argv, "--average-from", "1000", "--out", str(tmp_path / "b")]) == 0
    other = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert other["averaged_iterates"] == 0 and other["loss"]["val"] != metrics["loss"]["val"]


def test_a_shorter_run_keeps_its_presets_decay_in_proportion(tmp_path, capsys):
    """`plumb train --steps N` without --lr-decay-step decays at the preset's fraction of
    N (lecture-deep: 150k of 200k = 3/4), says so, and records it; an explicit
    --lr-decay-step is kept, and one beyond the run is called out."""
    small = ["--n-hidden", "16", "--n-layers", "2", "--no-probes", "--engine", "eager", *QUIET]
    assert main(["train", "--steps", "40", *small, "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "lr 0.1 -> 0.01 at step 30, the preset's 75% of the steps" in out
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())["train"]
    assert cfg["lr_decay_step"] == 30
    from safetensors.torch import load_file

    lrs = load_file(tmp_path / "a" / "losses.safetensors")
    assert lrs["lr"][29].item() == pytest.approx(0.1) and lrs["lr"][30].item() == pytest.approx(0.01)  # fmt: skip
    argv = ["train", "--steps", "40", "--lr-decay-step", "100", *small]
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0
    assert "lr 0.1, no decay" in capsys.readouterr().out


def test_auto_engine_counts_the_compile(tmp_path, monkeypatch):
    """auto compiles when the steps save more than the compile costs: cold ~34k steps,
    ~3k once this configuration's step is in inductor's cache (plumb's marker). (Where
    the fused step runs in C there is no compile and auto takes it for any run:
    test_fused; here the C step is off.)"""
    import plumb.cstep

    monkeypatch.setattr(plumb.cstep, "usable", lambda params, buffers: False)
    from plumb.models import MLP, preset_config
    from plumb.train import (
        COLD_COMPILE_S,
        SAVED_S_PER_STEP,
        WARM_COMPILE_S,
        TrainConfig,
        auto_choice,
        compile_marker,
        make_optimizer,
        select_engine,
    )

    cold = COLD_COMPILE_S / SAVED_S_PER_STEP
    warm = WARM_COMPILE_S / SAVED_S_PER_STEP
    assert 20_000 < cold < 40_000 and warm < 5_000
    assert auto_choice(int(cold) + 1, warm=False)[0] and not auto_choice(int(cold) - 1, False)[0]
    assert auto_choice(int(warm) + 1, warm=True)[0]
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    model = MLP(preset_config("lecture-deep"))
    cfg = TrainConfig(steps=20_000)
    opt = make_optimizer(model, cfg)
    engine, why = select_engine("auto", model, opt, cfg)
    assert engine.name == "eager" and "less than a cold compile" in why
    marker = compile_marker(model, opt, cfg)
    marker.parent.mkdir(parents=True)
    marker.write_text("{}")
    engine, why = select_engine("auto", model, opt, cfg)
    assert engine.name == "fused" and "more than a cached compile" in why


def test_json_plumb_writes_is_strict(tmp_path):
    """No bare NaN/Infinity in any JSON plumb writes: a non-finite float is null, and
    a diverged run's metrics.json parses with a strict reader."""
    from plumb.io import write_json

    def strict(text: str):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))

    write_json(tmp_path / "x.json", {"a": float("nan"), "b": [1.0, float("inf")], "c": 2})
    assert strict((tmp_path / "x.json").read_text()) == {"a": None, "b": [1.0, None], "c": 2}
    argv = ["train", "--n-hidden", "16", "--n-layers", "2", "--steps", "30", "--lr", "1e20"]
    code = main([*argv, "--on-nonfinite", "continue", "--engine", "eager", *QUIET, "--out", str(tmp_path / "r")])  # fmt: skip
    assert code in (0, 3)
    for name in ("metrics.json", "findings.json", "config.json"):
        if (tmp_path / "r" / name).is_file():
            strict((tmp_path / "r" / name).read_text())
    m = strict((tmp_path / "r" / "metrics.json").read_text())
    assert any(v is None for v in m["loss"].values())  # it did diverge: the nulls are real
