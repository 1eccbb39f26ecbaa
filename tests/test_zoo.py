"""The probes and the doctor on architectures nobody wrote for them (plumb.zoo): a pre-LN
GPT with tied weights, makemore's RNN and GRU, a CNN with BatchNorm2d, a residual MLP.
Each test guards one of the defects real models showed (issue 12)."""

from __future__ import annotations

import ast
import copy
import math
import resource
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import catalogue_outcome
from torch import nn

import plumb
from plumb import Monitor, diagnose, zoo
from plumb.catalogue import cnn_recipe, gpt, resmlp, rnn
from plumb.doctor import rules, softmax_dim
from plumb.kinds import layer_kind
from plumb.probes import Probes
from plumb.report import figures, write_report
from plumb.report.tables import layer_rows

SRC = Path(plumb.__file__).resolve().parent


@pytest.fixture(autouse=True)
def _strict_rules(monkeypatch):
    monkeypatch.setattr(rules, "STRICT", True)


def _train(model, batches, loss_fn, opt, steps, mon=None):
    for _ in range(steps):
        x, y = batches()
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if mon is not None:
            mon.step(loss)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


# --- memory -----------------------------------------------------------------------------
def test_memory_stays_bounded_without_step():
    """5,000 forwards (half of them back-propagated) inside `with Monitor` and no
    mon.step: what the record step holds stays within hold_bytes (RSS growth < 50 MB),
    where keeping every forward would take ~1.2 GB."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )
    x, y = torch.randn(128, 64), torch.randint(0, 10, (128,))
    with Monitor(model, report=False) as mon, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(200):  # warm the allocator
            F.cross_entropy(model(x), y).backward()
        base = _rss_mb()
        for i in range(5000):
            loss = F.cross_entropy(model(x), y)
            if i % 2:
                loss.backward()
        grown = _rss_mb() - base
        held = mon._held_bytes
        mon.step(loss)  # at last: the record step pools everything back-propagated
    assert grown < 50, f"RSS grew {grown:.0f} MB"
    assert held <= mon.hold_bytes + 4 * 128 * 256 * 4 * 4  # the budget plus one pass
    assert any("backward passes since the last Monitor.step" in str(w.message) for w in caught)
    # the pooled record step counts every back-propagated forward
    row = mon.history.rows[0]["layer"]["1"]
    assert row["calls"] == 200 + 2500


def test_nothing_held_after_step_and_after_close():
    model = zoo.ResMLP()
    batches = zoo.blobs()
    opt = torch.optim.AdamW(model.parameters())
    with Monitor(model, every=1, report=False) as mon:
        _train(model, batches, F.cross_entropy, opt, 3, mon)
        assert mon._held == [] and mon._held_bytes == 0
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(not p._backward_hooks for p in model.parameters())


# --- what a record step records ------------------------------------------------------------
def test_validation_forward_is_not_taken_for_the_training_one():
    """A validation pass without no_grad in a record step (the GPT's usual estimate_loss
    forgot it) is not recorded; the training forward keeps the layer names."""
    build = gpt()
    model, batches, loss_fn, opt = build()
    xv, _ = zoo.text_windows(seed=7)()
    with Monitor(model, every=1, report=False) as mon:
        x, y = batches()
        model(xv * 0 + 5)  # "validation" on a constant batch, graph dropped
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mon.step(loss)
    layers = mon.history.rows[0]["layer"]
    assert not any("#" in k for k in layers)
    ref = copy.deepcopy(build()[0])  # the same init: recompute wte's output on x
    emb = ref.transformer.wte(x)
    assert layers["transformer.wte"]["std"] == pytest.approx(emb.std().item(), rel=1e-5)


@pytest.mark.parametrize(
    "build, V",
    [(gpt(), 27), (rnn("gru"), 27)],
    ids=["gpt", "gru"],
)
def test_class_count_of_sequence_models(build, V):
    """(B, T, V) logits: the doctor takes C = V (ln 27), not T (ln 32 or ln 16)."""
    model, batches, loss_fn, opt = build()
    diag = diagnose(model, batches, loss_fn, opt, steps=4, test_lr=False)
    assert diag.expected_initial_loss == pytest.approx(math.log(V))
    assert "overconfident-init" not in diag.codes
    assert abs(diag.initial_loss - math.log(V)) < 0.1
    # the in-loop doctor finds the same from the output's gradient
    model, batches, loss_fn, opt = build()
    with Monitor(model, optimizer=opt, doctor=True, report=False) as mon:
        _train(model, batches, loss_fn, opt, 2, mon)
    assert mon.doctor.classes == V
    assert mon.diagnosis.expected_initial_loss == pytest.approx(math.log(V))


def test_softmax_dim_reads_the_gradient():
    logits = torch.randn(4, 5, 7, requires_grad=True)
    y = torch.randint(0, 7, (4, 5))
    zoo.sequence_loss(logits, y).backward()
    assert softmax_dim(logits.detach(), logits.grad) == 2
    x = torch.randn(8, 3, requires_grad=True)
    F.mse_loss(x, torch.randn(8, 3)).backward()
    assert softmax_dim(x.detach(), x.grad) is None
    x = torch.randn(8, 3, requires_grad=True)
    F.cross_entropy(x, torch.randint(0, 3, (8,))).backward()
    assert softmax_dim(x.detach(), x.grad) == 1


# --- names, order, pooling, functional activations -----------------------------------------
def test_forward_order_pooling_and_functional_activations(tmp_path):
    """The GRU cell runs 16 times a step: one row per layer (calls 16), its torch.sigmoid
    and torch.tanh recorded as cell.sigmoid / cell.tanh with saturation, rows in forward
    order, and a report with no matplotlib warning and a short legend."""
    model, batches, loss_fn, opt = rnn("gru")()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any matplotlib warning fails the test
        with Monitor(
            model, every=5, hist_every=5, out=tmp_path / "gru", optimizer=opt, doctor=True
        ) as mon:
            _train(model, batches, loss_fn, opt, 11, mon)
    rec = plumb.load_run(tmp_path / "gru")
    row = rec.rows[-1]["layer"]
    assert list(row) == [
        "wte",
        "cell.xh_to_r",
        "cell.sigmoid",
        "cell.xh_to_hbar",
        "cell.tanh",
        "cell.xh_to_z",
        "lm_head",
    ]
    assert row["cell.xh_to_r"]["calls"] == 16 and row["cell.sigmoid"]["calls"] == 32
    assert row["cell.tanh"]["calls"] == 16 and 0 <= row["cell.tanh"]["saturated"] <= 1
    assert "saturated" in row["cell.sigmoid"]
    assert rec.kind("cell.tanh") == "tanh" and rec.kind("cell.sigmoid") == "sigmoid"
    assert [r.name for r in layer_rows(rec)] == list(row)
    html = (tmp_path / "gru" / "report.html").read_text()
    assert "cell.tanh" in html
    assert (tmp_path / "gru" / "report.html").stat().st_size < 400_000
    fig = figures.activation_distribution(rec)
    legend = fig.axes[0].get_legend()
    assert len(legend.get_texts()) <= figures.MAX_LEGEND


def _one_record_step(model: nn.Module):
    """One SGD step of ``model`` on (4, 8) noise under ``Probes(every=1)``: the probes and
    the step's layer rows."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Probes(model, every=1) as p:
        loss = model(torch.randn(4, 8)).square().mean()
        loss.backward()
        opt.step()
        p.step(loss)
    return p, p.history.rows[0]["layer"]


def test_functional_capture_only_where_a_forward_calls_more_than_its_children():
    """The functional capture (a TorchFunctionMode over the record step's forward) is
    skipped where no forward can call an activation outside a probed module: containers
    and plumb's MLP. A Sequential subclass whose forward adds torch.tanh keeps it, and
    its tanh is recorded."""
    from plumb.models import MLP, preset_config

    class Squashed(nn.Sequential):
        def forward(self, x):
            return torch.tanh(super().forward(x))

    plain, row = _one_record_step(nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)))
    assert plain.functional is False and list(row) == ["0", "1", "2"]
    squashed, row = _one_record_step(Squashed(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)))
    assert squashed.functional is True and list(row) == ["0", "1", "2", "tanh"]
    assert 0 <= row["tanh"]["saturated"] <= 1
    mlp = MLP(preset_config("lecture-deep", vocab_size=27), torch.Generator().manual_seed(1))
    assert Probes(mlp).functional is False


def test_functional_capture_between_discovery_steps(monkeypatch):
    """The mode covers whole forwards on discovery steps only (the first record step and
    every REDISCOVER-th); in between it is entered only in hosts, modules whose own
    forward called an activation. A host's activation is recorded at every record step;
    one that a forward starts calling later is found at the next discovery step; the
    zoo's GPT (its GELU a module) has no host and runs its other record steps without
    the mode."""
    from plumb.probes import capture

    class Cell(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return torch.tanh(self.fc(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell, self.out = Cell(), nn.Linear(8, 4)
            self.late = False

        def forward(self, x):
            y = self.out(self.cell(self.cell(x)))
            return torch.sigmoid(y) if self.late else y

    entered: list[int] = []
    enter = capture.Capture._enter_mode
    monkeypatch.setattr(capture.Capture, "_enter_mode", lambda p: entered.append(1) or enter(p))
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = capture.REDISCOVER + 2
    with Probes(model, every=1) as p:
        for i in range(steps):
            model.late = i >= 2
            loss = model(torch.randn(4, 8)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            p.step(loss)
    rows = [r["layer"] for r in p.history.rows]
    assert [r["cell.tanh"]["calls"] for r in rows] == [2] * steps
    found = [i for i, r in enumerate(rows) if "sigmoid" in r]  # the root's: not a host yet
    assert found == [capture.REDISCOVER, capture.REDISCOVER + 1]
    assert list(rows[-1]) == ["cell.fc", "cell.tanh", "out", "sigmoid"]
    # the GPT: one entry per forward on the discovery step, none on the 4 after it
    model = zoo.GPT(zoo.GPTConfig(n_layer=2), seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = zoo.text_windows(seed=0)
    entered.clear()
    per_step = []
    with Probes(model, every=1) as p:
        for _ in range(5):
            _train(model, batch, zoo.sequence_loss, opt, 1, p)
            per_step.append(len(entered))
    assert p.functional is True and not p._hosts
    assert per_step == [1, 1, 1, 1, 1]


def test_functional_gelu_inside_a_module_and_named_kinds():
    class NewGELU(nn.Module):  # makemore's, written out with torch.tanh
        def forward(self, x):
            return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.act = NewGELU()
            self.fc2 = nn.Linear(8, 8)
            self.ln = zoo.LayerNorm(8, bias=False)

        def forward(self, x):
            return self.ln(self.fc2(F.gelu(self.fc(x)) + self.act(x)))

    model = Block()
    assert layer_kind(model.act) == "gelu" and layer_kind(model.ln) == "layernorm"
    p, row = _one_record_step(model)
    assert "gelu" in row  # F.gelu in the root module's forward: MODULE.gelu with MODULE ""
    assert "act.tanh" not in row  # inside a probed module: its output counts, not its ops
    assert p.kinds["act"] == "gelu" and p.kinds["ln"] == "layernorm"


def test_figures_name_the_step_they_draw(tmp_path):
    model, batches, loss_fn, opt = resmlp()()
    with Monitor(model, every=10, hist_every=50, out=tmp_path / "r") as mon:
        _train(model, batches, loss_fn, opt, 95, mon)
    rec = plumb.load_run(tmp_path / "r")
    assert rec.rows[-1]["step"] == 90
    for draw in (
        figures.activation_distribution,
        figures.gradient_distribution,
        figures.weight_gradient_distribution,
    ):
        title = draw(rec).axes[0].get_title()
        assert title.endswith("(step 50)"), title
    # the legend's numbers are step 50's, not the last row's
    text = figures.activation_distribution(rec).axes[0].get_legend().get_texts()[0].get_text()
    s = rec.at(50, "layer", figures.nonlinear_layers(rec)[0])
    assert f"std {s['std']:.2f}" in text


# --- weight tying, gains, free parameters, depth -----------------------------------------
def test_tied_weights(tmp_path):
    model, batches, loss_fn, opt = gpt(init_std=1.0)()
    with Monitor(model, every=1, out=tmp_path / "g", report=False) as mon:
        _train(model, batches, loss_fn, opt, 2, mon)
    rec = plumb.load_run(tmp_path / "g")
    wte = next(p for p in rec.params if p["name"] == "transformer.wte.weight")
    assert wte["aliases"] == ["lm_head.weight"]
    head = next(r for r in layer_rows(rec) if r.name == "lm_head")
    assert "grad_data" in head.latest and "update_data" in head.latest
    model, batches, loss_fn, opt = gpt(init_std=1.0)()
    diag = diagnose(model, batches, loss_fn, opt, steps=3, test_lr=False)
    f = next(f for f in diag.findings if f.code == "overconfident-init")
    assert f.where == "lm_head" and f.evidence["tied_to"] == "transformer.wte.weight"
    assert "bias" not in f.message and "scale the logits" in f.message


def test_update_ratio_of_gains_and_zero_initialised_parameters():
    """A LayerNorm gain of ones (std 0) gets update:data relative to its RMS: AdamW's
    first step moves each entry by ~lr, so ~log10(1e-3) = -3; the RNN's zero-initialised
    start state gets no uneven-updates."""
    model, batches, loss_fn, opt = gpt()()
    with Probes(model, every=1) as p:
        _train(model, batches, loss_fn, opt, 1, p)
    s = p.history.rows[0]["param"]["transformer.h.0.ln_1.weight"]
    assert s["std"] == pytest.approx(0.0, abs=1e-3)
    assert -3.3 < s["update_data"] < -2.7
    model, batches, loss_fn, opt = rnn("rnn")()
    diag = diagnose(model, batches, loss_fn, opt, steps=30, test_lr=False)
    assert "uneven-updates" not in diag.codes
    assert math.isfinite(diag.evidence.rows[-1]["param"]["start"]["update_data"])


def test_depth_is_judged_along_chains_of_weight_layers():
    """GRU gates sit side by side (no chain); the GPT's layers are fed through norms and
    attention (no chain of 3); a plain 10-layer MLP is one chain."""
    model, batches, loss_fn, opt = rnn("gru")()
    with Probes(model, every=1) as p:
        _train(model, batches, loss_fn, opt, 1, p)
    assert all(len(c) <= 2 for c in p.chains)
    model, batches, loss_fn, opt = gpt()()
    with Probes(model, every=1) as p:
        _train(model, batches, loss_fn, opt, 1, p)
    assert max(len(c) for c in p.chains) == 2  # c_fc -> mlp.c_proj through GELU
    assert ["transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"] in p.chains
    mlp = nn.Sequential(
        *[m for _ in range(5) for m in (nn.Linear(8, 8), nn.Tanh())], nn.Linear(8, 2)
    )
    with Probes(mlp, every=1) as p:
        loss = mlp(torch.randn(4, 8)).sum()
        loss.backward()
        p.step(loss)
    assert p.chains == [["0", "2", "4", "6", "8", "10"]]


# --- learning-rate findings rest on measurements ----------------------------------------------
@pytest.mark.parametrize("name, lr", [("gpt-adamw", 1e-3), ("cnn-bn-sgd-momentum", 0.05)])
def test_healthy_recipes_get_no_lr_warning(name, lr):
    """The two recipes that drew lr-too-high with advice that made training worse: GPT +
    AdamW 1e-3 and CNN + BatchNorm + SGD momentum 0.05 (the catalogue's rows)."""
    diag = catalogue_outcome(name).diagnosis
    assert diag.ok, str(diag)
    assert not {"lr-too-high", "lr-too-low"} & diag.codes
    assert diag.suggested_lr == lr  # keep
    assert diag.lr_test is not None and len(diag.lr_test.lrs) >= 5
    assert lr in diag.lr_test.lrs


@pytest.mark.slow
@pytest.mark.parametrize(
    "build",
    [gpt(lr=1e-1), cnn_recipe(lr=5.0), rnn("rnn", lr=5e-8)],
    ids=["gpt-lr-x100", "cnn-lr-x100", "rnn-lr-1e-4"],
)
def test_suggested_lr_is_not_worse_than_the_current_one(build):
    """Following the suggestion from the diagnosed state does no worse than keeping the
    lr, over 3x the test's horizon on batches neither saw (paired, 3 standard errors).
    (A healthy recipe's suggestion is its own lr: nothing to follow.)"""
    model, batches, loss_fn, opt = build()
    diag = diagnose(model, batches, loss_fn, opt)
    assert diag.suggested_lr is not None
    lr = opt.param_groups[0]["lr"]
    held = [zoo_batch for zoo_batch in (batches() for _ in range(16))]

    def follow(new_lr: float) -> np.ndarray:
        m, o = copy.deepcopy((model, opt))
        for g in o.param_groups:
            g["lr"] = new_lr
        torch.manual_seed(1)
        draw = copy.deepcopy(batches)
        _train(m, draw, loss_fn, o, 90)
        with torch.no_grad():
            return np.array([float(loss_fn(m(x), y)) for x, y in held])

    keep, new = follow(lr), follow(diag.suggested_lr)
    new = np.where(np.isfinite(new), new, 1e9)
    keep = np.where(np.isfinite(keep), keep, 1e9)
    d = new - keep
    assert d.mean() <= 3 * d.std(ddof=1) / math.sqrt(len(d)) + 1e-9, (
        lr,
        diag.suggested_lr,
        keep.mean(),
        new.mean(),
    )


def test_loss_that_climbs_behind_batchnorm_is_lr_too_high():
    model, batches, loss_fn, opt = cnn_recipe(lr=5.0)()
    diag = diagnose(model, batches, loss_fn, opt)
    assert "lr-too-high" in diag.codes
    assert diag.suggested_lr < 5.0


# --- the doctor in the user's own loop -------------------------------------------------------
def test_in_loop_doctor_and_its_report(tmp_path):
    model, batches, loss_fn, opt = gpt()()
    seen = []
    with Monitor(
        model,
        optimizer=opt,
        doctor=True,
        out=tmp_path / "loop",
        on_finding=lambda f, s: seen.append(f),
    ) as mon:
        for _ in range(51):  # record steps (default every=50): 0 and 50
            x, y = batches()
            loss = loss_fn(model(x), y)
            loss.backward()  # no zero_grad: gradients accumulate
            opt.step()
            mon.step(loss)
            if mon.step_count == 1:
                assert mon.diagnosis is not None  # checked after the first step
    assert "gradients-accumulating" in mon.diagnosis.codes
    f = next(f for f in mon.diagnosis.findings if f.code == "gradients-accumulating")
    assert f.evidence["median_grad_carry"] > 0.5
    html = (tmp_path / "loop" / "report.html").read_text()
    assert "gradients-accumulating" in html
    assert (tmp_path / "loop" / "findings.json").is_file()


def test_micro_batch_accumulation_is_not_a_fault():
    """k = 4 micro-batches per optimizer step, zeroed after the step: no finding, and the
    record holds the activations of all 4 micro-batches and the accumulated gradient."""
    model, batches, loss_fn, opt = resmlp()()
    with Monitor(model, every=1, optimizer=opt, doctor=True, report=False) as mon:
        for _ in range(6):
            total = 0.0
            for _ in range(4):
                x, y = batches()
                loss = loss_fn(model(x), y) / 4
                loss.backward()
                total += loss.detach()
            grad = model.head.weight.grad.clone()
            opt.step()
            mon.step(total)  # after the optimizer step, before zeroing
            opt.zero_grad()
    assert "gradients-accumulating" not in mon.diagnosis.codes
    row = mon.history.rows[-1]
    assert row["layer"]["inp"]["calls"] == 4
    assert row["param"]["head.weight"]["grad_std"] == pytest.approx(grad.std().item(), rel=1e-5)
    assert row["param"]["head.weight"]["grad_carry"] == 0.0


# --- one hook mechanism ------------------------------------------------------------------
def test_only_the_probes_attach_hooks():
    """Every hook plumb attaches goes through plumb.probes (the doctor, the non-finite
    locator and the experiments use it)."""
    hooks = {
        "register_forward_hook",
        "register_forward_pre_hook",
        "register_hook",
        "register_full_backward_hook",
    }
    offenders = []
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in hooks:
                offenders.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert offenders and all(o.startswith("probes/") for o in offenders), offenders


def test_report_of_a_monitor_shows_the_doctors_findings(tmp_path):
    model, batches, loss_fn, opt = resmlp(branch_bias=-3.0)()
    with Monitor(model, every=2, optimizer=opt, doctor=True, out=tmp_path / "m") as mon:
        _train(model, batches, loss_fn, opt, 60, mon)
    assert "dead-units" in mon.diagnosis.codes
    write_report(tmp_path / "m")
    html = (tmp_path / "m" / "report.html").read_text()
    assert "dead-units" in html and "No findings" not in html
