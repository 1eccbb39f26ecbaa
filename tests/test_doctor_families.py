"""Issue 20's families, one rule each, on evidence whose answer is known: each test fails
when its rule (or the part of it under test) is removed or broken."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import catalogue_outcome
from torch import nn

from plumb.doctor import Diagnosis, LrTest, diagnose, rules
from plumb.doctor.evidence import Evidence, trainability
from plumb.errors import PlumbError
from plumb.monitor import Monitor
from plumb.probes.graph import logits_of, loss_path


@pytest.fixture(autouse=True)
def _strict_rules(monkeypatch):
    monkeypatch.setattr(rules, "STRICT", True)


def evidence(loss, **kw) -> Evidence:
    return Evidence(
        loss=np.asarray(loss, dtype=np.float64),
        rows=[],
        order=[],
        kinds={},
        shapes={},
        params=[],
        **kw,
    )


def noisy(curve, seed=0, sd=0.02):
    return np.asarray(curve) + np.random.default_rng(seed).normal(0, sd, len(curve))


# --- lr-too-high: a sustained climb, never a transient bump ------------------------------------
def test_a_spike_the_run_recovered_from_is_no_error():
    steps = np.arange(400)
    spike = np.where(
        steps < 60, 2.5 + 4 * np.sin(np.pi * steps / 60), 2.5 * np.exp(-(steps - 60) / 60)
    )
    assert rules._measure_loss_rise(evidence(noisy(spike)))[5]  # seen, and recovered
    assert not [f for f in rules.learning_rate(evidence(noisy(spike))) if f.severity == "error"]


def test_a_climb_that_stays_is_an_error():
    steps = np.arange(400)
    climb = np.where(steps < 200, 2.5 - steps / 200, 1.5 + (steps - 200) / 100)
    found = rules.learning_rate(evidence(noisy(climb)))
    assert [f.code for f in found] == ["lr-too-high"] and found[0].severity == "error"


def test_a_loss_at_zero_that_moves_by_rounding_has_not_climbed():
    loss = np.r_[np.linspace(2.0, 0.0, 100), np.zeros(200), np.full(100, 1.5e-4)]
    assert rules._measure_loss_rise(evidence(loss)) is None


# --- the lr test: practical margin, bracketing, "within noise" ----------------------------------
def _test(losses, per_batch):
    return LrTest(0, 30, len(per_batch[0]), 0.1, [0.01, 0.0333, 0.1, 0.3, 1.0], losses, per_batch)


def test_a_win_within_the_practical_margin_keeps_the_lr():
    base = np.linspace(2.80, 2.84, 16)
    # lr 0.01 wins on every batch (many standard errors) by 0.006 nats: 0.2% of the loss
    per = [list(base - 0.006), list(base - 0.003), list(base), list(base + 0.1), list(base + 60)]
    ev = evidence(np.full(100, 2.8), lr=0.1, lr_test=_test([float(np.mean(p)) for p in per], per))
    assert ev.lr_test.significantly_better(0, rules.LR_TEST_Z)
    assert rules._better_lr(ev) is None and rules.suggested_lr(ev) == 0.1
    diag = Diagnosis([], 100, 3.3, 2.8, suggested_lr=0.1, lr_test=ev.lr_test)
    assert "practical margin" in str(diag) and "0.006 nats lower" in str(diag)
    # the same test with a gain of 5% of the loss: lower it
    per[0] = list(base - 0.14)
    ev = evidence(np.full(100, 2.8), lr=0.1, lr_test=_test([float(np.mean(p)) for p in per], per))
    assert rules.suggested_lr(ev) == 0.01


def test_the_lr_test_extends_past_an_edge_that_wins():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    opt = torch.optim.SGD(model.parameters(), lr=30.0)  # far too high: lower lrs win
    from plumb.doctor import lr_test

    test = lr_test(model, opt, F.cross_entropy, [(x, y)] * 5, [(x, y)] * 2, start=0)
    assert test.lrs[0] < 3.0 * 0.999  # went below lr/10
    assert test.lrs == sorted(test.lrs) and 6 <= len(test.lrs) <= 7
    assert 0 < test.best < len(test.lrs) - 1  # bracketed by worse lrs on both sides


# --- parameters that never train ---------------------------------------------------------------
def test_trainability_names_each_reason():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    opt = torch.optim.SGD([model[0].weight, model[1].weight, model[1].bias], lr=0.1)
    t = trainability(model, opt)
    assert t["frozen"] == [["0.weight", 16, True]]
    assert [m for m, _ in t["missing"]] == ["0.bias", "2.weight", "2.bias"]
    assert t["total"] == 16 + 4 + 16 + 4 + 8 + 2
    found = rules.untrained_parameters(evidence([1.0], trainability=t))
    assert {(f.severity, f.where) for f in found} == {("error", "0.bias"), ("info", "0.weight")}


def test_a_detach_in_the_forward_is_named_in_the_loop():
    class Cut(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Linear(8, 16), nn.Linear(16, 4)

        def forward(self, x):
            return self.head(torch.tanh(self.emb(x)).detach())

    torch.manual_seed(0)
    model = Cut()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with Monitor(model, 5, optimizer=opt, doctor=True) as mon:  # record steps 0, 5, 10, 15
        for _ in range(20):
            x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(loss)
    f = next(f for f in mon.diagnosis.findings if f.code == "untrained-parameters")
    assert f.severity == "error" and f.evidence["no_gradient"] == ["emb.weight", "emb.bias"]


# --- the loss expression, read from the graph --------------------------------------------------
def test_loss_path_reads_softmax_and_reduction_after_backward():
    z = torch.randn(8, 5, requires_grad=True)
    out = z * 1.0
    loss = F.cross_entropy(F.softmax(out, -1), torch.randint(0, 5, (8,)), reduction="sum")
    loss.backward()
    path = loss_path(loss, out.grad_fn)
    assert [p["op"] for p in path] == [
        "NllLossBackward0",
        "LogSoftmaxBackward0",
        "SoftmaxBackward0",
        "MulBackward0",
    ]
    assert path[0]["reduction"] == 2 and path[2]["dim"] == -1 and path[1]["dim"] == 1
    ev = evidence([1.0], loss_graph=path, output=out.detach(), classes=5, optimizer_kind="SGD")
    codes = {(f.code, f.severity) for f in rules.loss_expression(ev)}
    assert codes == {("double-softmax", "error"), ("loss-summed", "info")}  # 8 rows < 10
    assert ev.loss_rows() == 8


def test_logits_of_structures():
    t = torch.zeros(2, 3)

    class Out:
        logits = t

    assert logits_of(t) is t and logits_of(Out()) is t
    assert logits_of((t, (torch.zeros(1), torch.zeros(1)))) is t
    assert logits_of({"loss": torch.zeros(()), "logits": t}) is t


@pytest.mark.parametrize("name, V", [("lstm-adamw", 27), ("llama-adamw", 27)])
def test_class_count_of_tuple_and_output_object_models(name, V):
    diag = catalogue_outcome(name).diagnosis
    assert diag.expected_initial_loss == pytest.approx(math.log(V))


# --- a model that learns nothing from its inputs -------------------------------------------------
def test_not_learning_sits_at_the_targets_entropy_and_names_dropout():
    counts = np.array([500, 300, 150, 50])
    h, n = rules.entropy(counts)
    assert n == 1000 and h == pytest.approx(1.1421 + 3 / 2000, abs=1e-3)
    curve = np.r_[np.linspace(math.log(4), h, 50), np.full(250, h)]
    ev = evidence(
        noisy(curve, sd=0.05),
        classes=4,
        softmax_loss=True,
        target_counts=counts,
        dropout={"drop": 0.9},
        input_use=(0.0, 0.001),
    )
    (f,) = rules.not_learning(ev)
    assert f.code == "not-learning" and "p=0.9 in 'drop'" in f.message
    # the same run still falling at the end (a slow start), or well below H: no finding
    for later in (np.linspace(h, h - 0.5, 250), np.full(250, h - 0.3)):
        curve = np.r_[np.linspace(math.log(4), h, 50), later]
        ev = evidence(
            noisy(curve, sd=0.05),
            classes=4,
            softmax_loss=True,
            target_counts=counts,
            input_use=(0.0, 0.001),
        )
        assert rules.not_learning(ev) == []


# --- the lr actually used -------------------------------------------------------------------------
def test_a_schedule_that_collapses_the_lr_is_named():
    lrs = 0.1 * 0.1 ** (np.arange(300) // 30)  # StepLR(30 epochs) stepped per batch
    (f,) = rules.lr_schedule(evidence(np.ones(300), lrs=lrs))
    assert f.code == "lr-too-low" and f.evidence["first_low_step"] == 120
    cosine = 0.1 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * np.arange(300) / 300)))
    assert rules.lr_schedule(evidence(np.ones(300), lrs=cosine)) == []


def test_diagnose_follows_the_users_scheduler():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.1)
    g = torch.Generator().manual_seed(0)
    batches = lambda: (torch.randn(32, 8, generator=g), torch.randint(0, 4, (32,), generator=g))  # noqa: E731
    diag = diagnose(model, batches, F.cross_entropy, opt, steps=60, scheduler=sched)
    assert diag.evidence.lrs[0] == 0.1 and diag.evidence.lrs[5] == pytest.approx(0.01)
    assert "lr-too-low" in diag.codes
    with pytest.raises(PlumbError, match="scheduler must be an lr scheduler"):
        diagnose(model, batches, F.cross_entropy, opt, steps=5, scheduler="cosine")


def _loop_with_schedule(milestone_lrs: list[float]) -> set[tuple[str, str]]:
    """A user's loop: an MLP on a fixed task, plain SGD, the lr set per phase (equal
    phases), the doctor watching; the (code, severity) of its findings."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh())
    model.append(nn.Linear(64, 8))
    opt = torch.optim.SGD(model.parameters(), lr=milestone_lrs[0])
    x = torch.randn(512, 16)
    y = (x[:, :8].argmax(1) + (x[:, 8] > 0)) % 8
    steps = 400
    with Monitor(model, 10, optimizer=opt, doctor=True) as mon:
        for i in range(steps):
            for g in opt.param_groups:
                g["lr"] = milestone_lrs[i * len(milestone_lrs) // steps]
            ix = torch.randint(0, 512, (32,))
            loss = F.cross_entropy(model(x[ix]), y[ix])
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(loss)
    return {(f.code, f.severity) for f in mon.diagnosis.findings}


def test_an_annealed_lr_is_not_called_too_low():
    """Updates are judged at the schedule's peak lr: a run decayed ~300x for its second
    half (its late steps move the weights ~300x less, by design) gets no lr advice, while
    the same net trained at the decayed lr throughout, and so ~300x slower from the start,
    is told its lr is low (median log10 update:data: -2.0 at 0.1, -4.5 after the decay or at 3e-4 throughout)."""
    assert ("lr-too-low", "info") in _loop_with_schedule([3e-4])
    assert not {c for c, _ in _loop_with_schedule([0.1])} & {"lr-too-low", "lr-too-high"}
    assert not {c for c, _ in _loop_with_schedule([0.1, 3e-4])} & {"lr-too-low", "lr-too-high"}


# --- gradients clipped at every step -------------------------------------------------------
def test_clipping_at_every_step_is_read_from_the_gradient_norm():
    from plumb.catalogue import SETUPS, run_setup

    o = run_setup(next(s for s in SETUPS if s.name == "resmlp-sgd-clipped-every-step"))
    (f,) = [f for f in o.findings if f.code == "gradients-clipped"]
    assert f.severity == "warning" and f.evidence["grad_norm"] == pytest.approx(1e-3, rel=1e-4)
    assert f.evidence["spread"] < 1e-4 and "lr-too-low" not in o.codes
    # the same recipe without the clip: norms vary from step to step, no finding
    healthy = catalogue_outcome("resmlp-adamw")
    norms = rules.gradient_norms(healthy.diagnosis.evidence)
    assert (max(norms) - min(norms)) / np.median(norms) > 0.1
    assert "gradients-clipped" not in healthy.codes
