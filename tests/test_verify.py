"""Advice that is measured (issue 20, item 2): each fix is applied to a copy from the same
start, trained on the same batches, and its held-out loss compared with the control's."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import catalogue_outcome
from torch import nn

from plumb.catalogue import SETUPS, confusion_table, llama_std_1, repair_rate
from plumb.cli import main
from plumb.doctor import Finding, rules
from plumb.doctor.verify import FIXES, Twin, _measured, verify_findings


@pytest.fixture(autouse=True)
def _strict_rules(monkeypatch):
    monkeypatch.setattr(rules, "STRICT", True)


@pytest.mark.parametrize(
    "name, fix",
    [
        ("lstm-head-not-in-optimizer", "in the optimizer"),
        ("double-softmax", "(Softmax) removed"),
        ("lecture-unscaled-output", "weights x 0.01"),
        ("adamw-lr-1000x-low", "lr 1e-06 -> "),
        ("lr-10x-high", "lr 0.5 -> 0.0"),
        ("resmlp-summed-loss-sgd", "lr / 64"),
        ("vit-dropout-0.9", "p -> 0.1"),
    ],
)
def test_a_fix_that_helps_is_measured_and_kept(name, fix):
    """The fault's own finding carries the measurement: the fixed copy's held-out loss is
    lower by more than 3 standard errors and 2% (or the control diverged)."""
    o = catalogue_outcome(name)
    v = o.fix
    assert v is not None and fix in v["fix"] and v["helped"]
    assert v["change"] < 0 and v["fixed_loss"] < v["control_loss"]
    assert v["change"] == -np.inf or -v["change"] > 3 * v["standard_error"]
    f = next(f for f in o.findings if f.code in o.setup.expect and "verified" in f.evidence)
    assert f.severity in ("warning", "error") and "[measured: held-out loss" in f.message


def test_a_fix_that_does_not_help_is_demoted_and_says_so():
    """The CNN left in eval mode: its running statistics stay at (0, 1), which on this
    easy task trains as well as batch statistics, so model.train() gains nothing and
    batchnorm-eval-mode-in-training becomes info, saying what was measured."""
    o = catalogue_outcome("cnn-bn-left-in-eval")
    f = next(f for f in o.findings if f.code == "batchnorm-eval-mode-in-training")
    v = f.evidence["verified"]
    assert v["fix"] == "model.train() before training" and not v["helped"]
    assert f.severity == "info" and "did not measurably help" in f.message
    assert not o.problems


def test_measured_needs_significance_and_a_practical_margin():
    f = Finding("lr-too-high", "warning", "model", "m", {})
    control = np.full(16, 1.0) + np.linspace(0, 0.01, 16)
    tiny = _measured(f, "x", control, control - 0.005, 100)  # 0.5%: significant, too small
    big = _measured(f, "x", control, control - 0.05, 100)
    assert tiny.severity == "info" and big.severity == "warning"
    assert big.evidence["verified"]["change"] == pytest.approx(-0.05)
    diverged = _measured(f, "x", np.full(16, np.inf), control, 100)
    assert diverged.evidence["verified"]["helped"] and diverged.severity == "warning"
    # an info whose fix helps becomes a warning: the measurement says it matters
    info = _measured(
        Finding("untrained-parameters", "info", "w", "m", {}), "x", control, control - 0.5, 9
    )
    assert info.severity == "warning"


def test_verify_never_touches_the_users_model_and_shares_one_fix():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    model.eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g))
        for _ in range(12)
    ]
    findings = [
        Finding("batchnorm-eval-mode-in-training", "warning", "1", "m", {}),
        Finding("batchnorm-eval-mode-in-training", "warning", "x", "m", {}),
        Finding("gradients-accumulating", "error", "model", "m", {}),  # no mechanical fix
    ]
    calls = []
    (original,) = FIXES["batchnorm-eval-mode-in-training"]

    def counting(f, t: Twin):
        calls.append(f.where)
        return original(f, t)

    FIXES["batchnorm-eval-mode-in-training"] = (counting,)
    try:
        out = verify_findings(
            findings, (model, opt, None), F.cross_entropy, batches[:8], batches[8:], lr=0.1
        )
    finally:
        FIXES["batchnorm-eval-mode-in-training"] = (original,)
    assert calls == ["1", "x"]
    a, b = (f.evidence["verified"] for f in out[:2])
    assert a == b  # one training of the same fix, not two
    assert "verified" not in out[2].evidence
    assert not model.training and all(
        torch.equal(before[k], v) for k, v in model.state_dict().items()
    )


def test_diagnosis_verify_on_a_loop_diagnosis():
    o = catalogue_outcome("llama-init-std-1-in-loop")
    f = next(f for f in o.findings if f.code == "overconfident-init")
    v = f.evidence["verified"]
    assert v["fix"] == "'lm_head' weights x 0.01" and v["helped"] and v["change"] < -1.0
    m, b, loss, opt = llama_std_1()()
    with pytest.raises(Exception, match="steps must be"):
        o.diagnosis.verify(m, opt, b, loss, steps=-1)


def test_catalogue_table_states_each_fix_and_the_repair_rate():
    outcomes = [
        catalogue_outcome(n) for n in ("double-softmax", "convlm-detach", "gpt-no-zero-grad")
    ]
    table = confusion_table(outcomes)
    assert "no mechanical fix" in table and "(the user's loop: not replayed)" in table
    repaired, measured, total = repair_rate(outcomes)
    assert (repaired, measured, total) == (1, 1, 3)
    assert f"fixes: {repaired}/{measured} measured fixes" in table


def test_cli_doctor_verify_json(capsys):
    assert (
        main(["doctor", "--preset", "lecture-mlp:original", "--steps", "60", "--verify", "--json"])
        == 1
    )
    data = json.loads(capsys.readouterr().out)
    f = next(f for f in data["findings"] if f["code"] == "overconfident-init")
    assert f["evidence"]["verified"]["helped"] and f["evidence"]["verified"]["change"] < -1.0


def test_every_fix_has_a_catalogue_row_it_is_measured_on():
    measured = {
        f.code
        for s in SETUPS
        if s.expect
        for f in catalogue_outcome(s.name).findings
        if "verified" in f.evidence
    }
    assert measured == set(FIXES), set(FIXES) - measured
