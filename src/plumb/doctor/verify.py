"""Advice that is measured: apply a finding's fix to a copy of the model and train it.

For each finding whose fix can be applied mechanically (``FIXES``: the lr, an
output layer's scale, BatchNorm's mode, parameters missing from the optimizer or frozen,
a Softmax module before a softmax loss, input standardisation, heavy dropout, a summed
loss's lr), two copies are trained from the same starting state on the same batches with
the same random stream, one as it is (the control) and one with the fix, then scored on
the same held-out batches. The measured change is the paired difference of held-out loss
per batch, fixed - control, with its standard error. A fix that does not lower the loss by
more than 3 standard errors and 2% did not measurably help: its finding is demoted to info and
says so; an info whose fix measurably helped becomes a warning. Held-out loss is scored
in eval mode, as a validation pass would. The user's model and optimizer are never
touched.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from plumb.doctor.rules import LR_TEST_PRACTICAL, Finding

VERIFY_Z = 3.0  # standard errors a fix must gain by to count as helping
VERIFY_PRACTICAL = LR_TEST_PRACTICAL  # ... and this fraction of the control's loss


@dataclass
class Twin:
    """A copy of the training set-up that a fix may change."""

    model: nn.Module
    optimizer: Any
    scheduler: Any = None
    transform: Callable[[Any], Any] | None = None  # applied to every input batch
    lr: float | None = None  # the current lr (param group 0), for the lr fixes
    suggested_lr: float | None = None
    batches: list[tuple[Any, Any]] = field(default_factory=list)


def scale_lr(optimizer: Any, scheduler: Any, factor: float) -> None:
    """Multiply every lr an optimizer (and its scheduler) holds by ``factor``: the
    schedule keeps its shape."""
    for group in optimizer.param_groups:
        for key in ("lr", "initial_lr", "max_lr", "min_lr"):
            if isinstance(group.get(key), int | float):
                group[key] = group[key] * factor
    if scheduler is not None and hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [b * factor for b in scheduler.base_lrs]


def twin_of(start: tuple[nn.Module, Any, Any], **kw: Any) -> Twin | None:
    """A deep copy of ``start`` = (model, optimizer, scheduler); None when it cannot be
    copied."""
    try:
        model, opt, sched = copy.deepcopy(start)
    except Exception:  # a model or optimizer that cannot be deep-copied
        return None
    return Twin(model, opt, sched, **kw)


def train_twin(
    twin: Twin,
    loss_fn: Callable[[Any, Any], Tensor],
    train: list[tuple[Any, Any]],
    held: list[tuple[Any, Any]],
    *,
    seed: int = 0,
    score_eval: bool = False,
) -> list[float] | None:
    """Train ``twin`` on ``train`` (zero_grad, backward, step, scheduler step) with torch's
    random stream seeded by ``seed`` (dropout alike for every copy), then score it on
    ``held``: loss per batch, no update, inf for a non-finite one; in the model's own
    mode, or in eval mode (``score_eval``: what a validation pass does). None when a
    step fails."""
    device = next(iter(twin.model.parameters()), torch.empty(0)).device
    prep = twin.transform or (lambda x: x)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        try:
            for x, y in train:
                loss = loss_fn(twin.model(prep(x)), y)
                twin.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                twin.optimizer.step()
                if twin.scheduler is not None:
                    with warnings.catch_warnings():  # a copied optimizer loses the
                        warnings.simplefilter("ignore", UserWarning)  # scheduler's step mark
                        twin.scheduler.step()
            if score_eval:
                twin.model.eval()
            with torch.no_grad():
                scores = [float(loss_fn(twin.model(prep(x)), y)) for x, y in held]
        except Exception:
            return None
    return [v if math.isfinite(v) else math.inf for v in scores]


# --- the fixes: each changes a Twin and says what it did, or returns None -------------------
def _fix_lr(f: Finding, t: Twin) -> str | None:
    if f.where == "schedule":  # the lr collapsed under the scheduler: run without it
        if t.scheduler is None:
            return None  # the user's loop steps it: plumb cannot replay that loop
        for group in t.optimizer.param_groups:
            group["lr"] = group.get("initial_lr", group["lr"])
        t.scheduler = None
        return "the scheduler removed (its initial lr, constant)"
    factor = _lr_factor(f, t)
    return _scaled(t, factor) if factor else None


def _lr_factor(f: Finding, t: Twin) -> float | None:
    """The lr change an lr finding advises, as a factor: to the suggested lr, else a
    decade the finding's way."""
    if not t.lr:
        return None
    new = t.suggested_lr
    if new is None or new == t.lr:
        new = t.lr * 10 if f.code == "lr-too-low" else t.lr / 10
    return new / t.lr


def _fix_lr_further(f: Finding, t: Twin) -> str | None:
    """A decade beyond the advised lr, the same way: an lr 100x off is often still too
    far off after one decade."""
    if f.where == "schedule":
        return None
    factor = _lr_factor(f, t)
    return _scaled(t, factor * (10 if factor > 1 else 0.1)) if factor else None


def _scaled(t: Twin, factor: float) -> str:
    """Scale every lr of the copy (a schedule keeps its shape) and say so in the run's
    own terms: its lr at the start (a scheduler's initial lr)."""
    group = t.optimizer.param_groups[0]
    base = float(group.get("initial_lr", group["lr"]))
    scale_lr(t.optimizer, t.scheduler, factor)
    return f"lr {base:.3g} -> {base * factor:.3g}" + (
        " (the whole schedule)" if t.scheduler else ""
    )


def _fix_untrained(f: Finding, t: Twin) -> str | None:
    ev = f.evidence
    names = set(ev.get("not_in_optimizer", [])) | set(ev.get("frozen", []))
    if not names:
        return None  # a gradient cut off in the forward: no mechanical fix
    params = dict(t.model.named_parameters())
    held = {id(p) for g in t.optimizer.param_groups for p in g["params"]}
    add = []
    for name in sorted(names & params.keys()):
        p = params[name]
        p.requires_grad_(True)
        if id(p) not in held:
            add.append(p)
    if add:
        group = {k: v for k, v in t.optimizer.param_groups[0].items() if k != "params"}
        t.optimizer.add_param_group({**group, "params": add})
    return f"train {len(names)} parameter tensor(s): requires_grad and in the optimizer"


def _fix_overconfident(f: Finding, t: Twin) -> str | None:
    factor, layer = f.evidence.get("scale"), f.where
    if not factor or f.evidence.get("tied_to"):
        return None  # a tied output weight is the embedding too: no mechanical fix
    module = dict(t.model.named_modules()).get(layer)
    w = getattr(module, "weight", None)
    if not isinstance(w, Tensor):
        return None
    with torch.no_grad():
        w.mul_(factor)
        if isinstance(getattr(module, "bias", None), Tensor):
            module.bias.zero_()
    return f"'{layer}' weights x {factor:g}"


def _fix_bn_mode(f: Finding, t: Twin) -> str | None:
    t.model.train()
    return "model.train() before training"


def _fix_softmax(f: Finding, t: Twin) -> str | None:
    if f.where != "output":
        return None  # a softmax in the user's loss expression: plumb cannot rewrite it
    for name, m in reversed(list(t.model.named_modules())):
        if isinstance(m, nn.Softmax | nn.LogSoftmax) and name:
            parent, _, leaf = name.rpartition(".")
            setattr(t.model.get_submodule(parent) if parent else t.model, leaf, nn.Identity())
            return f"'{name}' ({type(m).__name__}) removed"
    return None


def _fix_inputs(f: Finding, t: Twin) -> str | None:
    xs = [x for x, _ in t.batches if isinstance(x, Tensor) and x.is_floating_point()]
    if not xs:
        return None
    x0 = torch.cat([x.reshape(-1) for x in xs[:8]])
    mean, std = float(x0.mean()), float(x0.std())
    if not std > 0:
        return None
    t.transform = lambda x: (x - mean) / std
    return f"inputs standardised: (x - {mean:.3g}) / {std:.3g}"


def _fix_dropout(f: Finding, t: Twin) -> str | None:
    heavy = [m for m in t.model.modules() if "Dropout" in type(m).__name__ and m.p >= 0.5]
    for m in heavy:
        m.p = 0.1
    return f"dropout {len(heavy)} module(s) p -> 0.1" if heavy else None


def _fix_sum(f: Finding, t: Twin) -> str | None:
    rows = f.evidence.get("rows")
    if not rows or f.severity != "warning":
        return None
    scale_lr(t.optimizer, t.scheduler, 1 / rows)
    return f"lr / {rows} (the mean's scale)"


def _lr_times(factor: float) -> Callable[[Finding, Twin], str | None]:
    def fix(f: Finding, t: Twin) -> str | None:
        return _scaled(t, factor) if t.lr else None

    return fix


#: code -> the fixes to try, in order; the one that lowers held-out loss most is reported
FIXES: dict[str, tuple[Callable[[Finding, Twin], str | None], ...]] = {
    # the suggested lr (else a decade the finding's way), and a decade beyond it
    "non-finite": (_fix_lr, _fix_lr_further),
    "lr-too-high": (_fix_lr, _fix_lr_further),
    "lr-too-low": (_fix_lr, _fix_lr_further),
    "untrained-parameters": (_fix_untrained,),
    "overconfident-init": (_fix_overconfident,),
    "batchnorm-eval-mode-in-training": (_fix_bn_mode,),
    "double-softmax": (_fix_softmax,),
    "unnormalized-inputs": (_fix_inputs,),
    # a model stuck at the input-free baseline: its named cause when it has one (heavy
    # dropout), and the lr one or two decades down or one up (the run's own steps may have
    # been too large to learn more than the frequencies, or too small to leave them)
    "not-learning": (_fix_dropout, _lr_times(0.1), _lr_times(0.01), _lr_times(10.0)),
    "loss-summed": (_fix_sum,),
}


def verify_findings(
    findings: list[Finding],
    start: tuple[nn.Module, Any, Any],
    loss_fn: Callable[[Any, Any], Tensor],
    train: list[tuple[Any, Any]],
    held: list[tuple[Any, Any]],
    *,
    lr: float | None = None,
    suggested_lr: float | None = None,
    seed: int = 0,
) -> list[Finding]:
    """Each finding with fixes in ``FIXES``, measured: ``evidence["verified"]`` holds the
    best of them (the lowest held-out loss), the control's and the fixed copy's held-out
    loss (eval mode), their paired difference and its standard error (and ``tried``, every
    candidate's change, when there were several), and the message says what was
    measured. A fix that did not help by ``VERIFY_Z`` standard errors turns its finding
    into info; an info whose fix measurably helped becomes a warning. The same fix
    (several BatchNorms in eval mode, non-finite and lr-too-high both lowering the lr) is
    trained once. Returns new findings."""
    kw = {"lr": lr, "suggested_lr": suggested_lr, "batches": train}
    fixed: dict[str, list[float] | None] = {}
    control: list[float] | None = None
    out = []
    for f in findings:
        measured: list[tuple[float, str]] = []
        for fix in FIXES.get(f.code, ()):
            twin = twin_of(start, **kw)
            what = fix(f, twin) if twin is not None else None
            if what is None:
                continue
            if control is None:
                base = twin_of(start, **kw)
                control = (
                    train_twin(base, loss_fn, train, held, seed=seed, score_eval=True)
                    if base
                    else None
                )
            if what not in fixed:
                fixed[what] = train_twin(twin, loss_fn, train, held, seed=seed, score_eval=True)
            scores = fixed[what]
            if scores is not None:
                measured.append((float(np.mean(scores)), what))
        if control is None or not measured:
            out.append(f)
            continue
        best = min(measured)[1]
        g = _measured(f, best, np.asarray(control), np.asarray(fixed[best]), len(train))
        if len(measured) > 1:
            c = float(np.mean(control))
            g.evidence["verified"]["tried"] = {w: m - c for m, w in measured}
        out.append(g)
    return out


def _measured(f: Finding, what: str, control: np.ndarray, fixed: np.ndarray, steps: int) -> Finding:
    both = np.isfinite(control) & np.isfinite(fixed)
    if both.all():
        d = fixed - control
        mean = float(d.mean())
        se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.inf
    elif np.isfinite(fixed).all() or np.isfinite(control).all():  # one side diverged
        mean = -math.inf if np.isfinite(fixed).all() else math.inf
        se = 0.0
    else:  # both diverged: the fix did not help, and there is no difference to state
        mean, se = math.nan, math.nan
    c, x = float(np.mean(control)), float(np.mean(fixed))
    # significant (VERIFY_Z standard errors, paired) and practically large (2% of the
    # control's loss): the same two bars an lr suggestion must clear
    helped = mean < 0 and (
        mean == -math.inf or (-mean > VERIFY_Z * se and -mean > VERIFY_PRACTICAL * abs(c))
    )
    text = (
        f"held-out loss {c:.4g} -> {x:.4g} ({mean:+.3g} nats, standard error {se:.2g}) "
        f"after {steps} steps from the same start with the fix ({what})"
        if math.isfinite(c) or math.isfinite(x)
        else f"both copies diverged over {steps} steps, with the fix ({what}) too"
    )
    evidence = dict(f.evidence)
    evidence["verified"] = {
        "fix": what,
        "steps": steps,
        "control_loss": c,
        "fixed_loss": x,
        "change": mean,
        "standard_error": se,
        "helped": helped,
    }
    if helped and f.severity == "info":  # the measurement shows it matters
        return Finding(
            f.code, "warning", f.where, f"{f.message} [measured: {text}; a warning now]", evidence
        )
    if helped:
        return Finding(f.code, f.severity, f.where, f"{f.message} [measured: {text}]", evidence)
    return Finding(
        f.code,
        "info",
        f.where,
        f"{f.message} [measured: the fix did not measurably help: {text}; demoted to info]",
        evidence,
    )
