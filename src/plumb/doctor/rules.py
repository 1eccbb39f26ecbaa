"""The doctor's rules: statistics in, findings out. Every threshold is relative to the
model's own scale (ln C, the layer's own weights, the other layers, the same net's first
layers) and sits next to the principle it follows from; none was fitted to test cases.

=================================  =====================================================
code                               fires when (principle in the rule's docstring)
=================================  =====================================================
non-finite                         NaN/Inf in the loss, an output, a gradient or a weight
overconfident-init                 initial loss - ln C > ln(C) / 4 (info), > ln C
                                   (warning)
saturated-activations              > 30% of a tanh/sigmoid layer's outputs in the flat
                                   tails (pre-activation std > 2x unit scale)
dead-units                         >= 25% of a layer's units never active over >= 300
                                   examples
activations-vanishing/-exploding   weight-layer input RMS changes > 10x across the hidden
                                   stack
gradients-vanishing/-exploding     per-example norm of dL/d(pre-activation) changes > 10x
                                   from the last hidden layer back to the first
lr-too-high / lr-too-low           median log10 update:data > -2 / < -4 (a decade off the
                                   lecture's -3); or the loss rose over the run
uneven-updates                     a weight's update:data > 10x away from the median
symmetric-weights                  all units of a layer identical at the start and still
                                   at the end (spread < 1e-4)
redundant-bias                     a bias whose output goes straight into a BatchNorm
batchnorm-train-mode-in-eval       a BatchNorm in train() mode under no_grad/inference
batchnorm-eval-mode-in-training    a BatchNorm in eval() mode in a training forward
unnormalized-inputs                input RMS outside [0.1, 10]
double-softmax                     outputs already on the simplex (or log-simplex), fed
                                   to a loss that is shift-invariant (applies softmax)
=================================  =====================================================
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from plumb.doctor.evidence import Evidence, finite, median
from plumb.init import expected_initial_loss
from plumb.runs import jsonable

SEVERITIES = ("error", "warning", "info")

# --- thresholds (each one's principle is in its rule's docstring) ----------------------
OVERCONFIDENT_FRACTION = 0.25  # of ln C (info); above ln C: warning
SATURATED_FRACTION = 0.30
DEAD_FRACTION = 0.25
DEAD_MIN_EXAMPLES = 300
DEPTH_FACTOR = 10.0
UPDATE_TARGET = -3.0  # log10 update:data, the lecture's rule of thumb
UPDATE_BAND = 1.0  # decades either side
UNEVEN_DECADES = 1.0
SYMMETRY_SPREAD = 1e-4
BIAS_GRAD_RATIO = 1e-3
INPUT_SCALE = 10.0
SIMPLEX_TOL = 1e-3


@dataclass
class Finding:
    """One diagnosis: ``code`` (stable), ``severity`` (error | warning | info), ``where``
    (a layer or parameter name, or "model"), a ``message`` that says what to change, and
    the ``evidence`` (the measured numbers it rests on)."""

    code: str
    severity: str
    where: str
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "severity": self.severity,
            "where": self.where,
            "message": self.message,
            "evidence": jsonable(self.evidence),
        }


def _r(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}") if finite(x) else x


# --- rules -----------------------------------------------------------------------------
def non_finite(ev: Evidence) -> list[Finding]:
    """NaN or Inf anywhere. Once one value is non-finite everything downstream is, so the
    useful fact is the *first* place: at the first bad step, in the order the step computes
    things (outputs in forward order, the loss, gradients in backward order, then the
    weights the update wrote)."""
    step = ev.first_nonfinite_step()
    if step is None:
        return []
    row = next((r for r in ev.rows if r["step"] >= step), None)
    where, what = "loss", "the loss"
    if row is not None:
        where, what = _first_bad(ev, row)
        step = row["step"] if where != "loss" else step
    loss = ev.loss[step] if step < len(ev.loss) else float("nan")
    return [nonfinite_finding(step, what, where, float(loss), ev.lr)]


def nonfinite_finding(step: int, what: str, where: str, loss: float, lr: float | None) -> Finding:
    """The ``non-finite`` finding: NaN/Inf first seen at ``step`` in ``what`` (a place
    named ``where``); also used by the training loop when it stops on a bad step."""
    lr_hint = f" (lr {lr:g} -> try {lr / 10:g})" if lr else ""
    return Finding(
        "non-finite",
        "error",
        where,
        f"NaN/Inf first appears at step {step} in {what}: lower the learning rate"
        f"{lr_hint}, clip gradients, or guard the op that overflows there (log of 0, "
        "division by ~0, exp of a large number)",
        {"step": step, "in": what, "loss": loss},
    )


def _first_bad(ev: Evidence, row: dict[str, Any]) -> tuple[str, str]:
    def bad(section: str, name: str, *stats: str) -> bool:
        st = row[section].get(name, {})
        return any(s in st and not finite(st[s]) for s in stats)

    for k in ev.order:
        if bad("layer", k, "mean", "std"):
            return k, f"the output of layer '{k}' (first in forward order)"
    if "loss" in row and not finite(row["loss"]):
        return "loss", "the loss (every layer output was finite)"
    for k in reversed(ev.order):
        if bad("layer", k, "grad_mean", "grad_std"):
            return k, f"the gradient at the output of layer '{k}' (first in backward order)"
    for p in ev.params:
        if bad("param", p["name"], "grad_mean", "grad_std"):
            return p["name"], f"the gradient of parameter '{p['name']}'"
    for p in ev.params:
        if bad("param", p["name"], "mean", "std"):
            return p["name"], f"parameter '{p['name']}' after the update"
    return "loss", "the loss"


def overconfident_init(ev: Evidence) -> list[Finding]:
    """Initial loss above ln C, uniform guessing. With logits of std s independent of the
    target, E[cross-entropy] ~ ln C + s^2 / 2, and the largest of C such logits leads by
    ~s sqrt(2 ln C), so once the excess passes ln(C) / 4 (s > sqrt(ln(C) / 2)) the net
    puts most of its probability on one class it knows nothing about: confidently wrong
    (info: it costs the first steps, the lecture's hockey stick). An excess above ln C,
    a loss more than twice uniform guessing, is a warning (the lecture's 27.9 vs 3.30)."""
    if not ev.classes or ev.classes < 2 or not len(ev.loss) or not finite(float(ev.loss[0])):
        return []
    loss0 = float(ev.loss[0])
    expected = expected_initial_loss(ev.classes)
    excess = loss0 - expected
    if excess <= OVERCONFIDENT_FRACTION * expected:
        return []
    s = _logit_std(ev)
    factor = 10.0 ** -math.ceil(math.log10(s / 0.3)) if finite(s) and s > 0.3 else 0.1
    last = ev.weight_layers()[-1] if ev.weight_layers() else "the output layer"
    return [
        Finding(
            "overconfident-init",
            "warning" if excess > expected else "info",
            last,
            f"scale the last layer's weights ('{last}') by ~{factor:g} and zero its bias: "
            f"initial loss {loss0:.3g}, expected {expected:.3g} = ln({ev.classes}) for "
            f"{ev.classes} classes (logit std {s:.2g})",
            {
                "initial_loss": _r(loss0),
                "expected": _r(expected),
                "classes": ev.classes,
                "excess_nats": _r(excess),
                "logit_std": _r(s),
                "info_above_nats": _r(OVERCONFIDENT_FRACTION * expected),
                "warning_above_nats": _r(expected),
            },
        )
    ]


def _logit_std(ev: Evidence) -> float:
    y = ev.seen.output
    if y is None or y.dim() < 2 or not torch.isfinite(y).all():
        return float("nan")
    return y.float().std(dim=1).mean().item()


def saturated_activations(ev: Evidence) -> list[Finding]:
    """tanh/sigmoid outputs in the flat tails (|t| > 0.97: local gradient < 6% of its
    maximum). A unit-variance Gaussian pre-activation, what Kaiming's gain aims at, puts
    3.7% there; twice that scale puts 30%. More than 30% (at init or over the last half
    of the steps) means the pre-activations are at least twice too large and a third of
    the backward signal is blocked at this layer."""
    out = []
    init, late = ev.init_row(), ev.late()
    for k in ev.order:
        if ev.kinds.get(k) not in ("tanh", "sigmoid"):
            continue
        at0 = init["layer"].get(k, {}).get("saturated", math.nan) if init else math.nan
        later = median(ev.series(late, "layer", k, "saturated"))
        worst = max((v for v in (at0, later) if finite(v)), default=math.nan)
        if not (finite(worst) and worst > SATURATED_FRACTION):
            continue
        feed = ev.prev_weight_layer(k) or "the layer before it"
        out.append(
            Finding(
                "saturated-activations",
                "warning",
                k,
                f"{worst:.0%} of '{k}' outputs sit in the flat tails: scale down the weights "
                f"of '{feed}' (Kaiming: std gain/sqrt(fan_in), tanh gain 5/3) or put a "
                "BatchNorm before the nonlinearity",
                {
                    "saturated_at_init": _r(at0),
                    "saturated_late_median": _r(later),
                    "threshold": SATURATED_FRACTION,
                },
            )
        )
    return out


def dead_units(ev: Evidence) -> list[Finding]:
    """Units that never pass gradient (ReLU output <= 0, tanh/sigmoid saturated) for any
    example of the window. Over >= 300 examples a unit active for >= 1% of inputs shows
    up at least once with 95% probability (rule of three), so "never" means dead. A
    quarter of a layer dead is width paid for and not used, the mark of a bad init, a
    negative bias or an lr that knocked units out."""
    out = []
    for k, (frac, units, examples) in ev.seen.dead.items():
        if examples < DEAD_MIN_EXAMPLES or not finite(frac) or frac < DEAD_FRACTION:
            continue
        kind = ev.kinds.get(k, "other")
        fix = (
            "lower the learning rate, remove the negative bias / use Kaiming init, or use LeakyReLU"
            if kind in ("relu", "leaky_relu")
            else "shrink the weights feeding it or add a BatchNorm before it"
        )
        out.append(
            Finding(
                "dead-units",
                "warning",
                k,
                f"{frac:.0%} of the {units} units of '{k}' never activated over {examples} "
                f"examples: {fix}",
                {
                    "dead_fraction": _r(frac),
                    "units": units,
                    "examples": examples,
                    "threshold": DEAD_FRACTION,
                },
            )
        )
    return out


def activation_depth(ev: Evidence) -> list[Finding]:
    """The RMS of what each weight layer receives, across depth. Kaiming init (std
    gain/sqrt(fan_in)) makes it constant; a wrong gain g' multiplies it by ~g'/g per
    layer, which compounds. More than 10x (an order of magnitude) between the first and
    the last hidden layer's input, at init or over the last half of the steps, is a
    wrong gain (vanishing) or too large one (exploding). The first layer's input is the
    data (see unnormalized-inputs) and is left out."""
    layers = [k for k in ev.weight_layers() if k in ev.seen.input_rms][1:]
    if len(layers) < 2:
        return []
    first, last = layers[0], layers[-1]

    def at(name: str, lo: int, hi: float) -> float:
        return median([v for s, v in ev.seen.input_rms[name] if lo <= s < hi])

    stop = ev.first_nonfinite_step()
    stop = stop if stop is not None else math.inf
    mid = ev.steps // 2
    for label, lo, hi in (("at init", 0, 1), ("late", mid, stop)):
        a, b = at(first, lo, hi), at(last, lo, hi)
        if not (finite(a) and finite(b)) or a <= 0 or b <= 0:
            continue
        ratio = b / a
        if 1 / DEPTH_FACTOR <= ratio <= DEPTH_FACTOR:
            continue
        vanishing = ratio < 1
        per_layer = ratio ** (1 / (len(layers) - 1))
        return [
            Finding(
                "activations-vanishing" if vanishing else "activations-exploding",
                "warning",
                last,
                f"activations {'shrink' if vanishing else 'grow'} {max(ratio, 1 / ratio):.3g}x "
                f"from '{first}' to '{last}' ({per_layer:.2g}x per layer, {label}): "
                f"{'raise' if vanishing else 'lower'} the init gain (Kaiming std "
                "gain/sqrt(fan_in): tanh 5/3, ReLU sqrt(2), linear 1) or add normalisation",
                {
                    "input_rms": {k: _r(at(k, lo, hi)) for k in layers},
                    "ratio": _r(ratio),
                    "per_layer": _r(per_layer),
                    "when": label,
                    "threshold_factor": DEPTH_FACTOR,
                },
            )
        ]
    return []


def gradient_depth(ev: Evidence) -> list[Finding]:
    """The per-example norm of dL/d(pre-activation) of each hidden weight layer. Kaiming
    init (fan_in) preserves it layer to layer: ||d_in||^2 ~ fan_in Var(W) gain'^2
    ||d_out||^2 = ||d_out||^2 for the right gain. More than 10x between the last hidden
    layer and the first (at init or late) means the backward signal shrinks or blows up
    with depth. The output layer is left out: its calibration (weights x0.1) scales the
    gradient into the net on purpose. Vanishing is info when the first layer's
    update:data is nevertheless in line with the others (an adaptive optimizer, or
    activations that grow as the gradient shrinks, compensate: the early layers still
    learn). Exploding stays a warning: the gradient values themselves grow geometrically
    with depth (overflow in half precision, clipping thresholds hit first)."""
    hidden = ev.weight_layers()[:-1]
    hidden = [k for k in hidden if k in ev.order]
    if len(hidden) < 2:
        return []
    first, last = hidden[0], hidden[-1]
    init, late = ev.init_row(), ev.late()
    for label, rows in (("at init", [init] if init else []), ("late", late)):
        a = median([ev.grad_norm(r, first) for r in rows])
        b = median([ev.grad_norm(r, last) for r in rows])
        if not (finite(a) and finite(b)) or a <= 0 or b <= 0:
            continue
        ratio = a / b  # first / last: < 1 shrinks on the way back
        if 1 / DEPTH_FACTOR <= ratio <= DEPTH_FACTOR:
            continue
        vanishing = ratio < 1
        compensated = vanishing and _updates_even(ev, first)
        return [
            Finding(
                "gradients-vanishing" if vanishing else "gradients-exploding",
                "info" if compensated else "warning",
                first,
                f"gradients {'shrink' if vanishing else 'grow'} {max(ratio, 1 / ratio):.3g}x "
                f"from '{last}' back to '{first}' ({label}): "
                + (
                    "use a gain that matches the nonlinearity (Kaiming), avoid stacking "
                    "sigmoids, or add normalisation / residual connections"
                    if vanishing
                    else "lower the init gain, add normalisation, or clip gradients"
                )
                + (
                    " (the optimizer compensates: this layer's update:data is within a "
                    "decade of the others')"
                    if compensated
                    else ""
                ),
                {
                    "grad_norm_first": _r(a),
                    "grad_norm_last": _r(b),
                    "ratio": _r(ratio),
                    "when": label,
                    "threshold_factor": DEPTH_FACTOR,
                    "updates_even": compensated,
                },
            )
        ]
    return []


def _updates_even(ev: Evidence, layer: str) -> bool:
    """Is ``layer``'s weight update:data within UNEVEN_DECADES of the median weight's?
    Then the optimizer (Adam's per-parameter scaling) undoes the depth trend of the
    gradient, and what vanishing gradients cost, early layers that do not learn, is not
    happening."""
    ratios = update_ratios(ev, embeddings=False)
    name = ev.weight_param(layer)
    if name not in ratios or len(ratios) < 2:
        return False
    return abs(ratios[name] - median(list(ratios.values()))) <= UNEVEN_DECADES


def update_ratios(ev: Evidence, embeddings: bool = True) -> dict[str, float]:
    """Median log10 update:data of each weight over the last half of the steps."""
    rows = ev.late()
    out = {}
    for name in ev.matrices(embeddings):
        v = median(ev.series(rows, "param", name, "update_data"))
        if finite(v):
            out[name] = v
    return out


def median_update(ev: Evidence) -> float:
    return ev.cached("median_update", lambda: median(list(update_ratios(ev).values())))


def suggested_lr(ev: Evidence) -> float | None:
    """The lr that brings the median update:data to 1e-3: updates scale ~linearly with
    the lr (exactly for SGD, nearly for Adam), so lr * 10^(-3 - median). When the loss
    rose over the run the ratio is no guide (saturated or exploded weights move little):
    then at most lr / 10."""
    m = median_update(ev)
    if not ev.lr or not finite(m):
        return None
    lr = ev.lr * 10 ** (UPDATE_TARGET - m)
    if _loss_rose(ev) is not None:
        lr = min(lr, ev.lr / 10)
    return float(f"{lr:.2g}")


def learning_rate(ev: Evidence) -> list[Finding]:
    """update:data = |lr * step| / |W|: how much of a weight one step rewrites. The
    lecture's healthy value is ~1e-3; a decade above (1e-2) rewrites 1% of every weight
    per step, noise-dominated; a decade below (1e-4) needs 10x the steps. Judged on the
    last half of the run: the first steps are large for healthy runs too (momentum
    building up, Adam's first steps are +-lr whatever the gradient). The loss ending
    above where it started (3 standard errors, noise from step-to-step differences) is
    too high an lr as well, an error: it also catches a BatchNorm net whose weights
    grew under a huge lr until its steps look small again."""
    m = median_update(ev)
    lr_txt = f"lr {ev.lr:g}" if ev.lr else "the learning rate"
    suggest = suggested_lr(ev)
    to = f" (suggested: {suggest:g})" if suggest else ""
    evidence = {
        "median_log10_update_data": _r(m),
        "target": UPDATE_TARGET,
        "band_decades": UPDATE_BAND,
        "lr": ev.lr,
        "suggested_lr": suggest,
    }
    rising = _loss_rose(ev)
    if rising is not None:
        evidence["loss_start"], evidence["loss_last_tenth"] = rising
        return [
            Finding(
                "lr-too-high",
                "error",
                "model",
                f"the loss rose from {rising[0]:.3g} to {rising[1]:.3g} over the run: "
                f"lower {lr_txt}{to}",
                evidence,
            )
        ]
    if finite(m) and m > UPDATE_TARGET + UPDATE_BAND:
        return [
            Finding(
                "lr-too-high",
                "warning",
                "model",
                f"updates rewrite 10^{m:.1f} of the weights per step (healthy ~10^-3): "
                f"lower {lr_txt}{to}",
                evidence,
            )
        ]
    if finite(m) and m < UPDATE_TARGET - UPDATE_BAND:
        return [
            Finding(
                "lr-too-low",
                "warning",
                "model",
                f"updates change only 10^{m:.1f} of the weights per step (healthy ~10^-3): "
                f"raise {lr_txt}{to}",
                evidence,
            )
        ]
    return []


def _loss_rose(ev: Evidence) -> tuple[float, float] | None:
    return ev.cached("loss_rose", lambda: _measure_loss_rise(ev))


def _measure_loss_rise(ev: Evidence) -> tuple[float, float] | None:
    """(start, end) when the median loss of the last tenth of the steps is above the
    loss before training (step 0, or the first tenth's median, the lower) by more than
    3 standard errors; the noise sigma comes from step-to-step differences (a robust
    MAD, insensitive to the trend)."""
    stop = ev.first_nonfinite_step()
    loss = ev.loss[: stop if stop is not None else len(ev.loss)]
    n = len(loss) // 10
    if n < 3:
        return None
    d = np.diff(loss)
    sigma = 1.4826 * float(np.median(np.abs(d - np.median(d)))) / math.sqrt(2)
    se_median = 1.2533 * sigma / math.sqrt(n)  # standard error of a median of n
    a0, a = float(loss[0]), median(loss[:n].tolist())
    b = median(loss[-n:].tolist())
    if not (finite(a) and finite(b) and finite(a0)):
        return None
    start, se_start = (a0, sigma) if a0 < a else (a, se_median)
    if b > start + max(3 * math.hypot(se_start, se_median), 1e-3 * abs(start)):
        return start, b
    return None


def uneven_updates(ev: Evidence) -> list[Finding]:
    """One weight's update:data more than a decade from the median of all weights: with
    one lr, that layer learns 10x faster or slower than the rest (a layer with its own
    tiny/huge init scale, or a BatchNorm net where update:data scales as 1/|W|^2).
    Left out: embedding tables (only the rows a batch uses are updated) and the output
    layer, whose weights the calibration shrinks on purpose (x0.1, x0.01), so that its
    relative steps are large until it has grown (the lecture's outlier "that settles")."""
    ratios = update_ratios(ev, embeddings=False)
    output = ev.weight_param(ev.weight_layers()[-1]) if ev.weight_layers() else None
    ratios.pop(output, None)
    if len(ratios) < 2:
        return []
    m = median(list(ratios.values()))
    out = []
    for name, v in ratios.items():
        if abs(v - m) > UNEVEN_DECADES:
            faster = v > m
            out.append(
                Finding(
                    "uneven-updates",
                    "warning",
                    name,
                    f"'{name}' moves 10^{v:.1f} per step against a median of 10^{m:.1f}: "
                    f"its init scale is {'too small' if faster else 'too large'} relative to "
                    "the others (re-init it with the same scheme) or give it its own lr",
                    {
                        "log10_update_data": _r(v),
                        "median": _r(m),
                        "threshold_decades": UNEVEN_DECADES,
                    },
                )
            )
    return out


def symmetric_weights(ev: Evidence) -> list[Finding]:
    """Units of a layer that are identical vectors get identical gradients and identical
    updates under any optimizer, so they stay identical: the layer has one unit's worth of
    capacity. Spread = ||W - mean unit|| / ||W|| is ~1 for random init and at rounding
    level (< 1e-6) for copies; < 1e-4 at the start *and* at the end means symmetry never
    broke (a zero-initialised output layer breaks it on the first step and is fine)."""
    out = []
    start, end = ev.seen.symmetry_start, ev.seen.symmetry_end
    for name, s0 in start.items():
        s1 = end.get(name, math.nan)
        if finite(s0) and finite(s1) and s0 < SYMMETRY_SPREAD and s1 < SYMMETRY_SPREAD:
            out.append(
                Finding(
                    "symmetric-weights",
                    "error",
                    name,
                    f"every unit of '{name}' has the same weights and they stayed equal: "
                    "initialise randomly (Kaiming: randn * gain / sqrt(fan_in)), not with "
                    "zeros or a constant",
                    {"spread_start": _r(s0), "spread_end": _r(s1), "threshold": SYMMETRY_SPREAD},
                )
            )
    return out


def redundant_bias(ev: Evidence) -> list[Finding]:
    """A bias straight into a BatchNorm (in training mode) is subtracted again with the
    batch mean: its gradient is the batch sum of BatchNorm's input gradient, which is 0
    (rounding only). Harmless but wasted (the lecture drops it): severity info, with the
    gradient ratio as evidence."""
    out = []
    for layer in ev.weight_layers():
        nxt = ev.next_layer(layer)
        bias = f"{layer}.bias" if layer else "bias"
        weight = ev.weight_param(layer)
        if nxt is None or ev.kinds.get(nxt) != "batchnorm" or weight is None:
            continue
        if not any(p["name"] == bias for p in ev.params):
            continue
        if any(
            e.mode == "eval-mode-in-training" and e.name == nxt for e in ev.seen.bn_events.values()
        ):
            continue  # an eval-mode BatchNorm does not subtract the batch mean
        gb = ev.late_median("param", bias, "grad_std")
        gw = ev.late_median("param", weight, "grad_std")
        b_std = ev.late_median("param", bias, "std")
        w_std = ev.late_median("param", weight, "std")
        ratio = gb / gw if finite(gb) and finite(gw) and gw > 0 else math.nan
        if finite(ratio) and ratio > BIAS_GRAD_RATIO:
            continue
        out.append(
            Finding(
                "redundant-bias",
                "info",
                bias,
                f"'{bias}' feeds straight into BatchNorm '{nxt}', which subtracts the batch "
                f"mean again: drop it (bias=False); BatchNorm's beta is the bias",
                {
                    "bias_grad_std": _r(gb),
                    "weight_grad_std": _r(gw),
                    "ratio": _r(ratio),
                    "bias_std": _r(b_std),
                    "weight_std": _r(w_std),
                },
            )
        )
    return out


def batchnorm_modes(ev: Evidence) -> list[Finding]:
    """BatchNorm's two modes used in the wrong place. train() under no_grad (an
    evaluation): outputs depend on the rest of the batch and the running statistics
    drift toward evaluation data. eval() in a training forward: the layer normalises with
    running statistics that do not follow the weights, so it does not keep the batch at
    unit scale. A frozen BatchNorm (no trainable affine parameters) in eval mode is a
    common deliberate choice when fine-tuning: info."""
    out = []
    for e in ev.seen.bn_events.values():
        if e.mode == "train-mode-in-eval":
            out.append(
                Finding(
                    "batchnorm-train-mode-in-eval",
                    "error",
                    e.name,
                    f"BatchNorm '{e.name}' ran in training mode under no_grad "
                    f"({e.count} forward(s), first at step {e.first_step}): call model.eval() "
                    "before evaluating (and model.train() after)",
                    {"forwards": e.count, "first_step": e.first_step},
                )
            )
        else:
            out.append(
                Finding(
                    "batchnorm-eval-mode-in-training",
                    "info" if e.frozen else "warning",
                    e.name,
                    f"BatchNorm '{e.name}' is in eval mode in {e.count} training forward(s): "
                    "call model.train() before training"
                    + (
                        " (its parameters are frozen: fine if you meant to freeze it)"
                        if e.frozen
                        else ""
                    ),
                    {"forwards": e.count, "first_step": e.first_step, "frozen": e.frozen},
                )
            )
    return out


def unnormalized_inputs(ev: Evidence) -> list[Finding]:
    """Inputs far from unit scale. Kaiming/Xavier assume unit-scale inputs: the first
    layer's pre-activation std is gain * RMS(x), so an RMS off by 10x (e.g. raw 0-255
    pixels: RMS ~ 100) puts the first layer an order of magnitude off its calibrated
    scale (saturating tanh/sigmoid, or making its gradients and updates 10x off)."""
    x = ev.seen.model_input
    if not x or not finite(x["rms"]):
        return []
    if 1 / INPUT_SCALE <= x["rms"] <= INPUT_SCALE:
        return []
    return [
        Finding(
            "unnormalized-inputs",
            "warning",
            "input",
            f"input features have RMS {x['rms']:.3g} (mean {x['mean']:.3g}, std "
            f"{x['std']:.3g}), far from 1: standardise them, x = (x - mean) / std per "
            "feature (e.g. pixels / 255, then normalise)",
            {k: _r(v) for k, v in x.items()} | {"threshold_factor": INPUT_SCALE},
        )
    ]


def double_softmax(ev: Evidence) -> list[Finding]:
    """The model's output is already a softmax (rows >= 0 summing to 1) or a log-softmax
    (logsumexp of each row = 0), exactly, as no raw logits are by chance, and the loss is
    invariant to adding a constant per row, i.e. it applies softmax itself (cross-entropy
    does). Probabilities in [0, 1] then become nearly uniform logits: the loss can barely
    move (error). Log-probabilities are only redundant, log_softmax being idempotent
    (info)."""
    y = ev.seen.output
    if not ev.softmax_loss or y is None or y.dim() < 2 or not torch.isfinite(y).all():
        return []
    y = y.double()
    sums = y.sum(1)
    if (
        y.min() >= -SIMPLEX_TOL
        and y.max() <= 1 + SIMPLEX_TOL
        and ((sums - 1).abs().max() <= SIMPLEX_TOL)
    ):
        return [
            Finding(
                "double-softmax",
                "error",
                "output",
                "the model outputs probabilities (a softmax) and the loss applies softmax "
                "again: return raw logits from the model (drop the final softmax) and let "
                "cross_entropy normalise",
                {
                    "min": _r(y.min().item()),
                    "max": _r(y.max().item()),
                    "max_row_sum_error": _r((sums - 1).abs().max().item()),
                },
            )
        ]
    lse = torch.logsumexp(y, 1)
    if y.max() <= SIMPLEX_TOL and lse.abs().max() <= SIMPLEX_TOL:
        return [
            Finding(
                "double-softmax",
                "info",
                "output",
                "the model outputs log-probabilities (log_softmax) and the loss applies "
                "log_softmax again: harmless (it is idempotent) but redundant; return "
                "logits, or use nll_loss",
                {"max": _r(y.max().item()), "max_abs_logsumexp": _r(lse.abs().max().item())},
            )
        ]
    return []


RULES: list[Callable[[Evidence], list[Finding]]] = [
    non_finite,
    overconfident_init,
    saturated_activations,
    dead_units,
    activation_depth,
    gradient_depth,
    learning_rate,
    uneven_updates,
    symmetric_weights,
    redundant_bias,
    batchnorm_modes,
    unnormalized_inputs,
    double_softmax,
]

CODES = (
    "overconfident-init",
    "saturated-activations",
    "dead-units",
    "activations-vanishing",
    "activations-exploding",
    "gradients-vanishing",
    "gradients-exploding",
    "lr-too-high",
    "lr-too-low",
    "uneven-updates",
    "symmetric-weights",
    "redundant-bias",
    "batchnorm-train-mode-in-eval",
    "non-finite",
    "unnormalized-inputs",
    "double-softmax",
    "batchnorm-eval-mode-in-training",
    "step-failed",  # diagnose only: the user's step raised after step 0 (exception text)
)


STRICT = False  # tests set this: a rule that fails raises instead of being skipped


def apply_rules(ev: Evidence) -> list[Finding]:
    """Every rule on ``ev``; a rule that fails on odd evidence is skipped, not raised (the
    doctor reports what it saw, it never crashes a user's run)."""
    findings: list[Finding] = []
    for rule in RULES:
        try:
            findings += rule(ev)
        except (ArithmeticError, ValueError, KeyError, IndexError, TypeError, RuntimeError):
            if STRICT:
                raise
            continue
    codes = {f.code for f in findings}
    if codes & CAUSES:  # uneven updates across depth follow from a depth trend: one cause
        findings = [f for f in findings if f.code != "uneven-updates"]
    return sort_findings(findings)


CAUSES = {
    "activations-vanishing",
    "activations-exploding",
    "gradients-vanishing",
    "gradients-exploding",
}


def sort_findings(findings: list[Finding]) -> list[Finding]:
    """Errors first, then warnings, then info; within a severity, in CODES order."""
    order = {s: i for i, s in enumerate(SEVERITIES)}
    rank = {c: i for i, c in enumerate(CODES)}
    return sorted(findings, key=lambda f: (order[f.severity], rank.get(f.code, 99), f.where))
