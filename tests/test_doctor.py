import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import catalogue_outcome
from torch import nn

import plumb
from plumb.catalogue import SETUPS, blobs, confusion_table, consequences, mlp, plumb_model
from plumb.cli import main
from plumb.doctor import CODES, Finding, diagnose, rules
from plumb.doctor.rules import median_update
from plumb.errors import PlumbError
from plumb.models import preset_config
from plumb.pipeline import train_run
from plumb.train import TrainConfig


@pytest.fixture(autouse=True)
def _strict_rules(monkeypatch):
    monkeypatch.setattr(rules, "STRICT", True)  # a rule that breaks fails the test


@pytest.mark.parametrize("setup", SETUPS, ids=[s.name for s in SETUPS])
def test_catalogue(setup):
    outcome = catalogue_outcome(setup.name)
    if setup.expect:
        # exactly its code plus the fault's known consequences (CONSEQUENCES): no more
        also = consequences(setup.name)
        assert outcome.codes == set(setup.expect) | also, (setup.name, outcome.codes)
    else:
        assert not outcome.problems, f"false alarm on {setup.name}: {outcome.findings}"
    assert outcome.passed and not outcome.extra


def test_catalogue_size_and_families():
    broken = [s for s in SETUPS if s.expect]
    healthy = [s for s in SETUPS if not s.expect]
    assert len(broken) >= 16 and len(healthy) >= 6
    for group in (broken, healthy):
        assert {s.family for s in group} == {"plumb.nn", "torch.nn", "zoo"}
    covered = {c for s in broken for c in s.expect}
    assert covered == set(CODES) - {"step-failed"}, set(CODES) - covered
    # the zoo: >= 6 healthy recipes of different families (plumb's lecture-deep among
    # them) and >= 12 faults injected into them
    zoo_healthy = [s for s in healthy if s.family == "zoo"] + [
        s for s in healthy if s.name == "lecture-deep"
    ]
    assert len(zoo_healthy) >= 6
    assert len({s.name.split("-")[0] for s in zoo_healthy}) >= 6  # gpt, rnn, gru, cnn, ...
    assert len([s for s in broken if s.family == "zoo"]) >= 12


def _relu_setup(lr=0.05):
    torch.manual_seed(0)
    m = mlp([20, 64, 64, 10])
    return m, blobs(), F.cross_entropy, torch.optim.SGD(m.parameters(), lr=lr)


def test_diagnosis_api_json_and_str():
    m, batches, loss_fn, opt = _relu_setup()
    diag = diagnose(m, batches, loss_fn, opt, steps=40)
    assert diag.steps == 40 and diag.ok and diag.codes == set()
    assert diag.expected_initial_loss == pytest.approx(math.log(10))
    assert abs(diag.initial_loss - math.log(10)) < 0.5
    data = json.loads(diag.to_json())
    assert data["ok"] is True and data["findings"] == [] and data["steps"] == 40
    assert diag.to_json() == json.dumps(data, indent=2, sort_keys=True)
    assert str(diag).startswith("plumb doctor: Healthy after 40 steps")


def test_findings_are_json_and_readable():
    m = plumb_model(preset="lecture-mlp:original")
    diag = diagnose(
        m, *_names_draw(), F.cross_entropy, torch.optim.SGD(m.parameters(), 0.1), steps=30
    )
    assert {"overconfident-init", "saturated-activations"} <= diag.codes
    assert not diag.ok
    f = next(f for f in diag.findings if f.code == "overconfident-init")
    assert isinstance(f, Finding) and f.severity == "warning" and f.where == "layers.output"
    ev = f.evidence
    assert ev["initial_loss"] > 20 and ev["expected"] == pytest.approx(math.log(27), abs=1e-3)
    assert ev["excess_nats"] == pytest.approx(ev["initial_loss"] - ev["expected"], abs=0.01)
    assert "0.01" in f.message and "3.3" in f.message
    text = str(diag)
    assert "overconfident-init" in text and "[warning]" in text
    data = json.loads(diag.to_json())
    assert sorted(data["codes"]) == data["codes"] and set(data["codes"]) == diag.codes
    assert [x["severity"] for x in data["findings"]] == sorted(
        (x["severity"] for x in data["findings"]), key=("error", "warning", "info").index
    )


def _names_draw(batch=32, seed=0):
    from plumb.catalogue import names_batches

    return (names_batches(batch, seed),)


def test_lr_too_low_rests_on_the_lr_test():
    """lecture-deep at lr 1e-4 (the lecture's 0.1 / 1000): the test's 10x lr wins by far
    more than 3 standard errors and the weights barely move, so lr-too-low, with the
    test's best lr suggested and the measurement in the evidence."""
    m = plumb_model(preset="lecture-deep")
    diag = diagnose(m, *_names_draw(), F.cross_entropy, torch.optim.SGD(m.parameters(), 1e-4))
    f = next(f for f in diag.findings if f.code == "lr-too-low")
    t = diag.lr_test
    assert f.severity == "warning" and t is not None
    # the 10x lr won at the grid's edge, so the test went on upward until bracketed
    assert t.lrs[:5] == [1e-5, 3.33e-5, 1e-4, 3e-4, 1e-3] and len(t.lrs) > 5
    assert diag.suggested_lr == t.lrs[t.best] > 1e-3 and t.losses[t.best] == min(t.losses)
    mean, se = t.gain(t.best)
    assert mean < -3 * se and f.evidence["held_out_gain"] == pytest.approx(mean, rel=1e-3)
    assert median_update(diag.evidence) < -4
    assert f.evidence["lr_test"]["held_out_loss"] == t.losses
    # the same net at the lecture's lr: the test runs, and nothing is said about the lr
    m = plumb_model(preset="lecture-deep")
    again = diagnose(m, *_names_draw(), F.cross_entropy, torch.optim.SGD(m.parameters(), 0.1))
    assert not {"lr-too-low", "lr-too-high"} & again.codes
    assert again.suggested_lr == 0.1


def test_batches_forms_cycle_callable_iterator_and_pair():
    x, y = torch.randn(64, 20), torch.randint(0, 10, (64,))
    calls = []

    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp([20, 32, 10])

        def forward(self, inp):
            calls.append(inp.shape[0])
            return self.net(inp)

    forms = [
        [(x[:16], y[:16]), (x[16:48], y[16:48])],  # list shorter than steps: cycled
        ((x[i : i + 8], y[i : i + 8]) for i in range(0, 24, 8)),  # one-shot iterator
        lambda: (x[:4], y[:4]),  # callable
        (x, y),  # one (inputs, targets) pair
    ]
    for batches in forms:
        calls.clear()
        m = Counting()
        opt = torch.optim.SGD(m.parameters(), 0.05)
        diag = diagnose(m, batches, F.cross_entropy, opt, 7, test_lr=False)
        assert diag.steps == 7 and len(calls) == 7
    assert calls == [64] * 7


def test_bad_arguments_are_one_line_errors():
    m, batches, loss_fn, opt = _relu_setup()
    cases = [
        lambda: diagnose("model", batches, loss_fn, opt),
        lambda: diagnose(m, batches, loss_fn, opt, steps=0),
        lambda: diagnose(m, batches, "ce", opt),
        lambda: diagnose(m, batches, loss_fn, object()),
        lambda: diagnose(m, [], loss_fn, opt, steps=3),
        lambda: diagnose(m, [torch.zeros(3)], loss_fn, opt, steps=3),
        lambda: diagnose(m, 42, loss_fn, opt),
        lambda: diagnose(m, batches, lambda out, t: F.cross_entropy(out, t, reduction="none"), opt),
        lambda: diagnose(m, (torch.randn(4, 7), torch.zeros(4).long()), loss_fn, opt),
    ]
    for case in cases:
        with pytest.raises(PlumbError) as err:
            case()
        assert "\n" not in str(err.value)
    assert all(not mod._forward_hooks for mod in m.modules())  # nothing left attached


class Blowup(nn.Module):
    """A layer plumb does not know that returns NaN from its 6th call on."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x * float("nan") if self.calls > 5 else x


def test_nan_from_an_unknown_layer_is_reported_not_raised():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), Blowup(), nn.Linear(32, 10))
    diag = diagnose(m, blobs(), F.cross_entropy, torch.optim.SGD(m.parameters(), 0.05), 20)
    f = next(f for f in diag.findings if f.code == "non-finite")
    assert f.severity == "error" and f.where == "2" and f.evidence["step"] == 5
    assert "output of layer '2'" in f.message
    assert not diag.ok and math.isnan(diag.final_loss)
    assert all(not mod._forward_hooks for mod in m.modules())


def test_inf_input_and_crash_after_step_zero():
    torch.manual_seed(0)
    m = mlp([20, 16, 10])
    x = torch.randn(8, 20)
    x[0, 0] = float("inf")
    diag = diagnose(
        m, (x, torch.zeros(8).long()), F.cross_entropy, torch.optim.SGD(m.parameters(), 0.1), 5
    )
    assert "non-finite" in diag.codes

    state = {"n": 0}

    def flaky(out, target):
        state["n"] += 1
        if state["n"] > 3:
            raise RuntimeError("disk on fire")
        return F.cross_entropy(out, target)

    m = mlp([20, 16, 10])
    diag = diagnose(m, blobs(), flaky, torch.optim.SGD(m.parameters(), 0.05), 10)
    f = diag.findings[0]
    assert f.code == "step-failed" and "disk on fire" in f.message and not diag.ok
    with pytest.raises(PlumbError, match="could not run one training step"):
        diagnose(m, blobs(), lambda o, t: 1 / 0, torch.optim.SGD(m.parameters(), 0.05))


def test_log_softmax_with_cross_entropy_is_info_only():
    torch.manual_seed(0)
    m = nn.Sequential(mlp([20, 64, 10]), nn.LogSoftmax(dim=1))
    diag = diagnose(m, blobs(), F.cross_entropy, torch.optim.SGD(m.parameters(), 0.05), 30)
    f = next(f for f in diag.findings if f.code == "double-softmax")
    assert f.severity == "info" and diag.ok


def test_bias_before_eval_mode_batchnorm_is_not_redundant():
    """In eval mode BatchNorm does not subtract the batch mean: the bias matters."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(20, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))
    m.eval()
    diag = diagnose(m, blobs(), F.cross_entropy, torch.optim.SGD(m.parameters(), 0.05), 30)
    assert "batchnorm-eval-mode-in-training" in diag.codes
    assert "redundant-bias" not in diag.codes


def test_frozen_eval_batchnorm_is_info():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(20, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))
    m[1].eval()
    for p in m[1].parameters():
        p.requires_grad_(False)
    diag = diagnose(m, blobs(), F.cross_entropy, torch.optim.SGD(m[0].parameters(), 0.05), 20)
    f = next(f for f in diag.findings if f.code == "batchnorm-eval-mode-in-training")
    assert f.severity == "info"


def test_train_prints_findings_and_writes_them_to_the_report(tmp_path):
    seen = []
    run = train_run(
        preset_config("lecture-mlp:original"),
        TrainConfig(steps=600, lr_decay_step=None, print_every=1000),
        tmp_path / "run",
        progress=False,
        samples=0,
        on_finding=lambda f, step: seen.append((f.code, step)),
    )
    assert ("overconfident-init", 1) in seen and ("saturated-activations", 1) in seen
    data = json.loads((run.out / "findings.json").read_text())
    assert "overconfident-init" in data["codes"] and data["steps"] == 600
    rec = plumb.load_run(run.out)
    assert {f["code"] for f in rec.findings} >= {"overconfident-init", "saturated-activations"}
    html = (run.out / "report.html").read_text()
    assert "overconfident-init" in html and "ln(27)" in html


def test_doctor_does_not_change_training(tmp_path):
    cfg = TrainConfig(steps=120, lr_decay_step=None, print_every=1000, probe_every=10)
    a = train_run(preset_config("lecture-deep"), cfg, tmp_path / "a", progress=False, samples=0)
    cfg.doctor = False
    b = train_run(preset_config("lecture-deep"), cfg, tmp_path / "b", progress=False, samples=0)
    assert torch.equal(a.result.losses, b.result.losses)
    assert (tmp_path / "a" / "findings.json").is_file()
    assert not (tmp_path / "b" / "findings.json").exists()
    html = (tmp_path / "a" / "report.html").read_text()
    assert "found nothing to flag" in html


def test_cli_doctor_exit_codes_and_json(capsys):
    assert main(["doctor", "--steps", "40"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("plumb doctor: Healthy after 40 steps")
    assert main(["doctor", "--preset", "lecture-mlp:original", "--steps", "30", "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert "overconfident-init" in data["codes"] and data["ok"] is False
    for argv in (
        ["doctor", "--steps", "0"],
        ["doctor", "--catalogue", "no-such-setup"],
        ["doctor", "--lr", "-1"],
        ["doctor", "--preset", "nope"],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("plumb: error:") and err.count("\n") == 1


def test_cli_catalogue_prints_the_confusion_table(capsys):
    assert main(["doctor", "--catalogue", "zero-init,lecture-deep"]) == 0
    out = capsys.readouterr().out
    assert "zero-init" in out and "symmetric-weights" in out
    assert "broken: 1/1 found their code; healthy: 1/1" in out


def test_confusion_table_marks_misses_and_false_alarms():
    from plumb.catalogue import Outcome

    broken = next(s for s in SETUPS if s.expect)
    healthy = next(s for s in SETUPS if not s.expect)
    table = confusion_table(
        [
            Outcome(broken, set(), set(), 0.0),
            Outcome(healthy, {"lr-too-high"}, {"lr-too-high"}, 0.0),
        ]
    )
    assert "[MISS]" in table and "[FALSE ALARM]" in table
    assert "broken: 0/1" in table and "healthy: 0/1" in table


def test_diverging_run_suggests_a_lower_lr():
    """A BatchNorm net at lr 100: its weights grow until the steps look small, but the
    loss climbed, so the doctor calls the lr too high and suggests a lower one, from the
    lr test (a lower lr that did best there)."""
    m = plumb_model(preset="lecture-deep")
    diag = diagnose(m, *_names_draw(), F.cross_entropy, torch.optim.SGD(m.parameters(), 100.0))
    f = next(f for f in diag.findings if f.code == "lr-too-high")
    assert f.severity == "error"
    assert f.evidence["loss_window_median"] > f.evidence["loss_best_before"]
    t = diag.lr_test
    lower = [i for i, lr in enumerate(t.lrs) if lr < 100.0]
    assert diag.suggested_lr == t.lrs[min(lower, key=lambda i: t.losses[i])] < 100.0


def test_saturation_behind_a_norm_points_at_the_norm_gain():
    """tanh behind a BatchNorm saturates when the norm's gain is large: the advice names
    the norm and its gain (measured), not "add a BatchNorm", which is already there."""
    m = plumb_model(preset="lecture-deep")
    with torch.no_grad():
        m.layers.norm2.weight.fill_(3.0)  # pre-activations ~N(0, 9): P(|z| > atanh(.97)/3) = 49%
    diag = diagnose(
        m, *_names_draw(), F.cross_entropy, torch.optim.SGD(m.parameters(), 0.1), steps=20
    )
    sat = {f.where: f for f in diag.findings if f.code == "saturated-activations"}
    assert set(sat) == {"layers.tanh2"}
    f = sat["layers.tanh2"]
    assert f.evidence["norm"] == "layers.norm2"
    assert f.evidence["norm_gain_rms_init"] == pytest.approx(3.0, rel=1e-3)
    assert f.evidence["saturated_at_init"] > 0.4
    assert "layers.norm2" in f.message and "put a BatchNorm" not in f.message
    assert "decay the learning rate earlier" in f.message and "averaged_iterates" not in f.evidence
    # the same run averaging its weights (plumb.optim.WeightAverage's state in the
    # optimizer): no lr decay advised under the average, only stopping
    from plumb.optim import WeightAverage

    m = plumb_model(preset="lecture-deep")
    with torch.no_grad():
        m.layers.norm2.weight.fill_(3.0)
    opt = torch.optim.SGD(m.parameters(), 0.1)
    WeightAverage(opt, start=0, every=1)(0)
    diag = diagnose(m, *_names_draw(), F.cross_entropy, opt, steps=20)
    f = next(f for f in diag.findings if f.code == "saturated-activations")
    assert f.evidence["averaged_iterates"] == 1
    assert "decay the learning rate earlier" not in f.message and "stop where" in f.message
    # a tanh fed by a Linear directly keeps the weight advice
    m = plumb_model(preset="lecture-mlp:original")
    diag = diagnose(
        m, *_names_draw(), F.cross_entropy, torch.optim.SGD(m.parameters(), 0.1), steps=20
    )
    f = next(f for f in diag.findings if f.code == "saturated-activations")
    assert "norm" not in f.evidence and "scale down the weights of 'layers.linear1'" in f.message


# --- each threshold's boundary, on both sides ----------------------------------------
# Synthetic evidence holds exactly what one rule reads, at absolute values just inside
# and just outside the threshold's principle (half and twice it, or 0.2 and 0.3 of ln C
# around ln(C)/4): moving a threshold 10x either way flips one side. The principle
# behind each value is in its rule's docstring.


def _evidence(**kw):
    from plumb.doctor.evidence import Evidence

    base = dict(loss=np.zeros(1), rows=[], order=[], kinds={}, shapes={}, params=[])
    return Evidence(**{**base, **kw})


@pytest.mark.parametrize("excess, fires", [(0.2, False), (0.3, True)])
def test_overconfident_fraction_boundary(excess, fires):
    """Excess ln(C)/4 is a logit std of sqrt(ln(C)/2): info above, warning above ln C."""
    from plumb.doctor.rules import overconfident_init

    ln_c = math.log(27)
    found = overconfident_init(_evidence(loss=np.array([ln_c * (1 + excess)]), classes=27))
    assert [f.severity for f in found] == (["info"] if fires else [])
    warn = overconfident_init(_evidence(loss=np.array([ln_c * 2.05]), classes=27))
    assert [f.severity for f in warn] == ["warning"]
    assert overconfident_init(_evidence(loss=np.array([ln_c * 1.95]), classes=27))[0].severity == "info"  # fmt: skip


@pytest.mark.parametrize("spread, fires", [(5e-5, True), (2e-4, False)])
def test_symmetry_spread_boundary(spread, fires):
    """Copies sit at rounding (< 1e-6), random units at ~1; 1e-4 is the line."""
    from plumb.doctor.rules import symmetric_weights

    ev = _evidence(symmetry_start={"fc": spread}, symmetry_end={"fc": spread})
    assert [f.code for f in symmetric_weights(ev)] == (["symmetric-weights"] if fires else [])
    # broken by the end (a zero-initialised output layer): never a finding
    ev = _evidence(symmetry_start={"fc": spread}, symmetry_end={"fc": 0.5})
    assert symmetric_weights(ev) == []


@pytest.mark.parametrize("ratio, fires", [(5e-4, True), (2e-3, False)])
def test_bias_grad_ratio_boundary(ratio, fires):
    """A bias into BatchNorm gets rounding-level gradient (~1e-7 of the weight's);
    1e-3 is the line."""
    from plumb.doctor.rules import redundant_bias

    rows = [
        {
            "step": s,
            "layer": {},
            "param": {
                "fc.weight": {"grad_std": 1.0, "std": 0.1},
                "fc.bias": {"grad_std": ratio, "std": 0.1},
            },
        }
        for s in range(5)
    ]
    ev = _evidence(
        rows=rows,
        order=["fc", "bn"],
        kinds={"fc": "linear", "bn": "batchnorm"},
        params=[{"name": "fc.weight", "layer": "fc"}, {"name": "fc.bias", "layer": "fc"}],
    )
    assert [f.code for f in redundant_bias(ev)] == (["redundant-bias"] if fires else [])


@pytest.mark.parametrize("off, fires", [(5e-4, True), (2e-3, False)])
def test_simplex_tol_boundary(off, fires):
    """Rows off the simplex by 5e-4 are a softmax output (error), by 2e-3 not; the same
    for log-probabilities (info). float32 softmax rows sum to 1 within ~1e-6."""
    from plumb.doctor.rules import double_softmax

    g = torch.Generator().manual_seed(0)
    y = torch.softmax(torch.randn(64, 10, generator=g), 1).double()
    y[:, 0] += off  # every row sums to 1 + off
    found = double_softmax(_evidence(output=y, classes=10, softmax_loss=True))
    assert [(f.code, f.severity) for f in found] == ([("double-softmax", "error")] if fires else [])  # fmt: skip
    logp = torch.log_softmax(torch.randn(64, 10, generator=g), 1).double() + off
    found = double_softmax(_evidence(output=logp, classes=10, softmax_loss=True))
    assert [(f.code, f.severity) for f in found] == ([("double-softmax", "info")] if fires else [])  # fmt: skip


def test_codes_are_derived_from_the_rules_declarations(monkeypatch):
    """One registry: CODES is what the @rule declarations say (step-failed aside), in
    declaration order, and a rule whose finding carries a code it did not declare fails
    under STRICT (tests) instead of sorting last unnoticed."""
    declared = [c for r in rules.RULES for c in r.codes]
    assert (*dict.fromkeys(declared), "step-failed") == CODES

    def odd(ev):
        return [Finding("not-declared", "warning", "model", "m")]

    odd.codes = ("something-else",)
    monkeypatch.setattr(rules, "RULES", [odd])
    with pytest.raises(AssertionError, match="not-declared"):
        rules.apply_rules(_evidence())


def test_a_loop_that_never_clears_its_gradients_gets_no_lr_advice(monkeypatch):
    """Without zero_grad each step applies the sum of every earlier gradient and the loss
    climbs whatever the lr: the lr findings are dropped and the first fix is zero_grad
    (the zoo's GRU at AdamW 3e-3, 600 steps, had "lower lr" as its first fix). Other
    findings stay, and an lr finding without the accumulation stays too."""

    def lr(ev):
        return [Finding("lr-too-high", "error", "model", "the loss climbed")]

    def carry(ev):
        return [Finding("gradients-accumulating", "error", "model", "not cleared")]

    def tails(ev):
        return [Finding("saturated-activations", "warning", "cell.tanh", "tails")]

    lr.codes, carry.codes, tails.codes = (
        ("lr-too-high",),
        ("gradients-accumulating",),
        ("saturated-activations",),
    )
    monkeypatch.setattr(rules, "RULES", [lr, carry, tails])
    found = rules.apply_rules(_evidence())
    assert [f.code for f in found] == ["gradients-accumulating", "saturated-activations"]
    monkeypatch.setattr(rules, "RULES", [lr, tails])
    assert [f.code for f in rules.apply_rules(_evidence())] == [
        "lr-too-high",
        "saturated-activations",
    ]
