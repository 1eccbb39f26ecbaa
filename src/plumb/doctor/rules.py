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
activations-vanishing/-exploding   weight-layer input RMS changes > 10x along a chain of
                                   weight layers that feed each other (no norm between)
gradients-vanishing/-exploding     per-example norm of dL/d(pre-activation) changes > 10x
                                   along such a chain, last hidden layer back to first
lr-too-high                        the loss rose over the run (error); or, in diagnose's
                                   lr test, a lower lr does better by > 3 standard errors
lr-too-low                         in the lr test a higher lr does better by > 3 standard
                                   errors *and* updates are < 1e-4 of the weights per step
                                   (without a test: info, from the update guide alone)
uneven-updates                     a layer weight's update:data > 10x away from the median
symmetric-weights                  all units of a layer identical at the start and still
                                   at the end (spread < 1e-4)
redundant-bias                     a bias whose output goes straight into a BatchNorm
batchnorm-train-mode-in-eval       a BatchNorm in train() mode under no_grad/inference
batchnorm-eval-mode-in-training    a BatchNorm in eval() mode in a training forward
unnormalized-inputs                input RMS outside [0.1, 10]
double-softmax                     outputs already on the simplex (or log-simplex), fed
                                   to a loss that is shift-invariant (applies softmax)
gradients-accumulating             at most record steps, p.grad already held > 50% of its
                                   final size when the step's backward began
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
from plumb.io import jsonable
from plumb.probes import first_nonfinite

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
LR_TEST_Z = 3.0  # standard errors a test's lr must win by
CARRY_FRACTION = 0.5


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
        found = first_nonfinite(row, ev.order, [p["name"] for p in ev.params])
        if found is not None:
            where, what = found
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
    last = ev.output_layer() or "the output layer"
    tied = ev.tied(last) if ev.output_layer() else None
    if tied:
        fix = (
            f"the output layer '{last}' shares its weight with '{tied}', so scaling that "
            f"weight scales both: scale the logits by ~{factor:g} in forward, or initialise "
            "the shared weight with a smaller std (GPT-2: 0.02)"
        )
    else:
        bias = " and zero its bias" if ev.output_layer() and ev.has_bias(last) else ""
        fix = f"scale the last layer's weights ('{last}') by ~{factor:g}{bias}"
    return [
        Finding(
            "overconfident-init",
            "warning" if excess > expected else "info",
            last,
            f"{fix}: initial loss {loss0:.3g}, expected {expected:.3g} = ln({ev.classes}) "
            f"for {ev.classes} classes (logit std {s:.2g})",
            {
                "initial_loss": _r(loss0),
                "expected": _r(expected),
                "classes": ev.classes,
                "excess_nats": _r(excess),
                "logit_std": _r(s),
                "tied_to": tied,
                "info_above_nats": _r(OVERCONFIDENT_FRACTION * expected),
                "warning_above_nats": _r(expected),
            },
        )
    ]


def _logit_std(ev: Evidence) -> float:
    """The std of the logits across the classes, averaged over the examples (and
    positions) of the first recorded forward."""
    y = ev.logits()
    if y is None or y.shape[-1] < 2:
        return float("nan")
    return y.float().std(dim=-1).mean().item()


def _param_rms(ev: Evidence, row: dict[str, Any] | None, name: str) -> float:
    return row["param"].get(name, {}).get("rms", math.nan) if row else math.nan


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
        i = ev.order.index(k)
        before = ev.order[i - 1] if i > 0 else None
        evidence = {
            "saturated_at_init": _r(at0),
            "saturated_late_median": _r(later),
            "threshold": SATURATED_FRACTION,
        }
        if before is not None and ev.is_norm(before):
            # A norm layer sets the pre-activation scale: its gain, not the weights before
            # it, has grown (a norm there already, so "add a BatchNorm" would be no advice).
            gain = ev.param(f"{before}.weight")
            g0 = _param_rms(ev, init, f"{before}.weight") if gain else math.nan
            g1 = ev.late_median("param", f"{before}.weight", "rms") if gain else math.nan
            evidence.update(norm=before, norm_gain_rms_init=_r(g0), norm_gain_rms_late=_r(g1))
            fix = (
                f"the norm '{before}' before it sets their scale through its gain "
                f"(rms {g0:.2g} at init, {g1:.2g} late): the gain grew in training, so decay "
                "the learning rate earlier, or stop where validation loss stops improving"
                if finite(g1)
                else f"the norm '{before}' before it sets their scale: lower its gain"
            )
        else:
            feed = ev.prev_weight_layer(k) or "the layer before it"
            fix = (
                f"scale down the weights of '{feed}' (Kaiming: std gain/sqrt(fan_in), tanh "
                "gain 5/3) or put a BatchNorm before the nonlinearity"
            )
        out.append(
            Finding(
                "saturated-activations",
                "warning",
                k,
                f"{worst:.0%} of '{k}' outputs sit in the flat tails: {fix}",
                evidence,
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
    for k, (frac, units, examples) in ev.dead.items():
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
    """The RMS of what each weight layer receives, along a chain of weight layers that
    feed each other (through activations, no normalisation or residual sum between:
    ``Probes.chains``, read from the autograd graph). Kaiming init (std gain/sqrt(fan_in))
    keeps it constant along the chain; a wrong gain g' multiplies it by ~g'/g per layer,
    which compounds. More than 10x (an order of magnitude) between the second and the last
    layer's input of a chain of >= 3 layers, at init or over the last half of the steps,
    is a gain too small (vanishing) or too large (exploding). The first layer's input is
    the data, a norm's output or a sum (not the chain's doing) and is left out. Layers
    that are not fed by one another (a residual branch and the output head, a GRU's gates)
    are never compared: their scales differ by design."""
    init, late = ev.init_row(), ev.late()
    worst: tuple[float, Finding] | None = None
    for chain in ev.chains:
        layers = chain[1:]
        if len(layers) < 2:
            continue
        first, last = layers[0], layers[-1]
        for label, rows in (("at init", [init] if init else []), ("late", late)):
            a = median(ev.series(rows, "layer", first, "in_rms"))
            b = median(ev.series(rows, "layer", last, "in_rms"))
            if not (finite(a) and finite(b)) or a <= 0 or b <= 0:
                continue
            ratio = b / a
            if 1 / DEPTH_FACTOR <= ratio <= DEPTH_FACTOR:
                continue
            vanishing = ratio < 1
            per_layer = ratio ** (1 / (len(layers) - 1))
            f = Finding(
                "activations-vanishing" if vanishing else "activations-exploding",
                "warning",
                last,
                f"activations {'shrink' if vanishing else 'grow'} {max(ratio, 1 / ratio):.3g}x "
                f"from '{first}' to '{last}' ({per_layer:.2g}x per layer, {label}): "
                f"{'raise' if vanishing else 'lower'} the init gain (Kaiming std "
                "gain/sqrt(fan_in): tanh 5/3, ReLU sqrt(2), linear 1) or add normalisation",
                {
                    "input_rms": {
                        k: _r(median(ev.series(rows, "layer", k, "in_rms"))) for k in layers
                    },
                    "ratio": _r(ratio),
                    "per_layer": _r(per_layer),
                    "when": label,
                    "chain": chain,
                    "threshold_factor": DEPTH_FACTOR,
                },
            )
            score = abs(math.log(ratio))
            if worst is None or score > worst[0]:
                worst = (score, f)
            break
    return [worst[1]] if worst else []


def gradient_depth(ev: Evidence) -> list[Finding]:
    """The per-example norm of dL/d(pre-activation) of each hidden weight layer along a
    chain of >= 3 hidden layers (as in activation_depth). Kaiming init (fan_in) preserves it layer to layer:
    ||d_in||^2 ~ fan_in Var(W) gain'^2 ||d_out||^2 = ||d_out||^2 for the right gain.
    More than 10x between the chain's last hidden layer and its first (at init or late)
    means the backward signal shrinks or blows up with depth. The output layer is left
    out: its calibration (weights x0.1) scales the gradient into the net on purpose.
    Vanishing is info when the first layer's update:data is nevertheless in line with the
    others (an adaptive optimizer, or activations that grow as the gradient shrinks,
    compensate: the early layers still learn). Exploding stays a warning: the gradient
    values themselves grow geometrically with depth (overflow in half precision,
    clipping thresholds hit first)."""
    out_layer = ev.output_layer()
    init, late = ev.init_row(), ev.late()
    worst: tuple[float, Finding] | None = None
    for chain in ev.chains:
        hidden = [k for k in chain if k != out_layer]
        if len(hidden) < 3:  # depth: at least two links to compound over
            continue
        first, last = hidden[0], hidden[-1]
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
            f = Finding(
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
                    "chain": chain,
                    "threshold_factor": DEPTH_FACTOR,
                    "updates_even": compensated,
                },
            )
            score = abs(math.log(ratio)) - (100 if compensated else 0)
            if worst is None or score > worst[0]:
                worst = (score, f)
            break
    return [worst[1]] if worst else []


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
    """Median log10 update:data of each layer weight (and embedding table) over the last
    half of the steps. Weights that received no gradient at all (behind dead units:
    grad std and mean exactly 0) are left out: how far they move says nothing about the
    learning rate (dead-units says why they do not)."""
    rows = ev.late()
    names = ev.layer_weights() + (ev.embeddings() if embeddings else [])
    out = {}
    for name in dict.fromkeys(names):
        g = [
            abs(r["param"].get(name, {}).get("grad_std", math.nan))
            + abs(r["param"].get(name, {}).get("grad_mean", math.nan))
            for r in rows
        ]
        if g and median(g) == 0.0:
            continue
        v = median(ev.series(rows, "param", name, "update_data"))
        if finite(v):
            out[name] = v
    return out


def median_update(ev: Evidence) -> float:
    return ev.cached("median_update", lambda: median(list(update_ratios(ev).values())))


def _better_lr(ev: Evidence) -> int | None:
    """The lr test's best lr when it beats the current one by more than LR_TEST_Z
    standard errors of the paired difference on the held-out batches, else None."""
    test = ev.lr_test
    if test is None:
        return None
    best = test.best
    if best != test.current and test.significantly_better(best, LR_TEST_Z):
        return best
    return None


def suggested_lr(ev: Evidence) -> float | None:
    """The lr the doctor recommends. With an lr test: the current lr unless an lr finding
    says otherwise, then the lr that did best in the test (never one that did worse
    than the current lr there). Without a test: lr / 10 when the loss rose, else None."""
    test, lr = ev.lr_test, ev.lr
    if not lr:
        return None
    rising = _loss_rose(ev) is not None
    if test is None:
        return float(f"{lr / 10:.2g}") if rising else None
    if rising:
        lower = [i for i, x in enumerate(test.lrs) if x < lr and finite(test.losses[i])]
        if not lower:
            return float(f"{lr / 10:.2g}")
        return test.lrs[min(lower, key=lambda i: test.losses[i])]
    b = _better_lr(ev)
    if b is not None and (test.lrs[b] < lr or median_update(ev) < UPDATE_TARGET - UPDATE_BAND):
        return test.lrs[b]
    return lr


def learning_rate(ev: Evidence) -> list[Finding]:
    """Learning-rate findings rest on measurements of the loss, never on update:data
    alone. update:data ~ 1e-3 is the lecture's guide for plain SGD; with momentum, Adam
    or normalised layers healthy runs sit decades away from it (Adam's step is ~lr
    whatever the weight's size; a BatchNorm'd weight's scale does not matter), so it is
    not a health criterion on its own.

    * lr-too-high, error: the loss climbed during the run (see ``_measure_loss_rise``).
    * lr-too-high, warning: in the lr test (``diagnose``: copies of the model and its
      optimizer state trained a few dozen steps on the same batches at lr/10 ... 10 lr,
      then scored on the same held-out batches) a *lower* lr ends lower by more than 3
      standard errors of the paired difference. A short test favours larger lrs (they
      move faster), so a lower one winning is strong evidence.
    * lr-too-low, warning: in the test a higher lr wins by 3 standard errors *and* the
      weights move less than 1e-4 of their size per step (a decade under the guide): the
      short-test bias toward larger lrs alone is not a fault, a net that barely moves is.
    * lr-too-low, info: no test (a training loop's own doctor) and updates < 1e-4.
    """
    m = median_update(ev)
    test = ev.lr_test
    lr_txt = f"lr {ev.lr:g}" if ev.lr else "the learning rate"
    suggest = suggested_lr(ev)
    to = f" (suggested: {suggest:g})" if suggest and suggest != ev.lr else ""
    evidence: dict[str, Any] = {
        "median_log10_update_data": _r(m),
        "lr": ev.lr,
        "suggested_lr": suggest,
    }
    if test is not None:
        evidence["lr_test"] = test.to_dict()
    rising = _loss_rose(ev)
    if rising is not None:
        best, high, a, b = rising
        evidence["loss_best_before"], evidence["loss_window_median"] = _r(best), _r(high)
        evidence["window_steps"] = [a, b]
        return [
            Finding(
                "lr-too-high",
                "error",
                "model",
                f"the loss climbed from {best:.3g} to {high:.3g} (median of steps {a}-{b}): "
                f"steps overshoot; lower {lr_txt}{to}",
                evidence,
            )
        ]
    b = _better_lr(ev)
    if test is not None and b is not None:
        mean, se = test.gain(b)
        evidence["held_out_gain"], evidence["standard_error"] = _r(mean), _r(se)
        what = (
            f"in an lr test ({len(test.lrs)} copies from step {test.start}, {test.steps} "
            f"steps on the same batches, loss on {test.eval_batches} held-out batches: "
            f"{test.table()}) lr {test.lrs[b]:.3g} ends {-mean:.3g} nats below {lr_txt}"
        )
        if test.lrs[b] < (ev.lr or 0):
            return [Finding("lr-too-high", "warning", "model", f"{what}: lower it{to}", evidence)]
        if finite(m) and m < UPDATE_TARGET - UPDATE_BAND:
            return [
                Finding(
                    "lr-too-low",
                    "warning",
                    "model",
                    f"{what}, and updates change only 10^{m:.1f} of the weights per step: "
                    f"raise it{to}",
                    evidence,
                )
            ]
    if test is None and finite(m) and m < UPDATE_TARGET - UPDATE_BAND:
        return [
            Finding(
                "lr-too-low",
                "info",
                "model",
                f"updates change only 10^{m:.1f} of the weights per step (the lecture's "
                f"guide for plain SGD is ~10^-3): if the loss is slow to fall, raise "
                f"{lr_txt}; plumb.diagnose measures it with an lr test",
                evidence,
            )
        ]
    return []


def _loss_rose(ev: Evidence) -> tuple[float, float, int, int] | None:
    return ev.cached("loss_rose", lambda: _measure_loss_rise(ev))


def _measure_loss_rise(ev: Evidence) -> tuple[float, float, int, int] | None:
    """(best so far, a later window's median, that window's first and last step) when
    the loss climbed: the median of some tenth of the run lies above the best the run
    had reached before it (the loss before training, or the lowest median of an earlier
    tenth) by more than 3 standard errors. With a small enough lr every step lowers the
    expected loss (the descent lemma), so a climb means steps overshoot: the loss that
    rises at the start and then falls (Adam at 100x its lr), the one that falls, then
    climbs (a BatchNorm net whose weights grew under a huge lr), the one that rises to
    an overflow.

    The noise sigma comes from step-to-step differences (a robust MAD, insensitive to
    the trend); a median of n steps has a standard error of 1.2533 sigma / sqrt(n); the
    lowest of several earlier medians sits ~1.5 standard errors below their mean by
    chance alone, which is added to the margin."""
    stop = ev.first_nonfinite_step()
    loss = ev.loss[: stop if stop is not None else len(ev.loss)]
    n = len(loss) // 10
    if n < (2 if stop is not None else 3):  # a run that overflowed: judge what it had
        return None
    d = np.diff(loss)
    sigma = 1.4826 * float(np.median(np.abs(d - np.median(d)))) / math.sqrt(2)
    se = 1.2533 * sigma / math.sqrt(n)  # standard error of a median of n
    a0 = float(loss[0])
    if not finite(a0):
        return None
    k_max = len(loss) // n
    windows = [median(loss[k * n : (k + 1) * n].tolist()) for k in range(k_max)]
    worst: tuple[float, tuple[float, float, int, int]] | None = None
    for k, w in enumerate(windows):
        earlier = [x for x in windows[:k] if finite(x)]
        if not finite(w):
            continue
        if not earlier or a0 <= min(earlier):
            start, margin = a0, 3 * math.hypot(sigma, se)
        else:
            start, margin = min(earlier), 3 * math.hypot(se, se) + 1.5 * se
        excess = w - start - max(margin, 1e-3 * abs(start))
        if excess > 0 and (worst is None or excess > worst[0]):
            worst = (excess, (start, w, k * n, (k + 1) * n - 1))
    return worst[1] if worst else None


def uneven_updates(ev: Evidence) -> list[Finding]:
    """One layer weight's update:data more than a decade from the median of all layer
    weights: with one lr, that layer learns 10x faster or slower than the rest (a layer
    with its own tiny/huge init scale, or a BatchNorm net where update:data scales as
    1/|W|^2). Judged on the weights of linear/conv layers only: embedding tables (only
    the rows a batch uses are updated), gains, biases and free parameters (an RNN's
    learned start state, often initialised to zero) have no common scale with them.
    The output layer is left out too: the calibration shrinks its weights on purpose
    (x0.1, x0.01), so its relative steps are large until it has grown (the lecture's
    outlier "that settles")."""
    ratios = update_ratios(ev, embeddings=False)
    output = ev.weight_param(ev.output_layer()) if ev.output_layer() else None
    ratios.pop(output, None)
    for name in ev.embeddings():
        ratios.pop(name, None)
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
    start, end = ev.symmetry_start, ev.symmetry_end
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
        if any(e.mode == "eval-mode-in-training" and e.name == nxt for e in ev.bn_events.values()):
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
    for e in ev.bn_events.values():
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
    x = ev.model_input
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
    y = ev.logits()
    if not ev.softmax_loss or y is None:
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


def gradients_accumulating(ev: Evidence) -> list[Finding]:
    """Gradients not cleared between steps (a loop without ``zero_grad``): backward adds
    into ``p.grad``, so each step's update carries every earlier gradient and steps grow
    until training diverges. The probes measure it directly: when a record step's
    backward begins, ``p.grad`` of a cleared parameter is None or exactly zero
    (grad_carry 0), while an uncleared one still holds the earlier sum, >= ~70% of its
    final size from the second step on (sqrt((t-1)/t) for uncorrelated gradients, more
    for correlated ones). More than half, in the median over layer weights and record
    steps after the first, is that; 50% is far from both sides. Micro-batch
    accumulation within a step does not count (only the first gradient of the step is
    compared), as long as ``mon.step`` comes once per optimizer step."""
    weights = ev.layer_weights() + ev.embeddings() or [p["name"] for p in ev.params]
    rows = [r for r in ev.clean if r["step"] > 0]
    carry = [v for name in weights for v in ev.series(rows, "param", name, "grad_carry")]
    c = median(carry)
    if not finite(c) or c <= CARRY_FRACTION:
        return []

    def grad_rms(row: dict[str, Any]) -> float:
        return median(
            [
                math.hypot(st["grad_std"], st["grad_mean"])
                for name in weights
                if "grad_std" in (st := row["param"].get(name, {}))
            ]
        )

    growth = grad_rms(rows[-1]) / grad_rms(rows[0]) if len(rows) > 1 else math.nan
    return [
        Finding(
            "gradients-accumulating",
            "error",
            "model",
            f"gradients are not cleared between steps: when a step's backward began, the "
            f"weights' .grad already held {c:.0%} of their final size (median over "
            f"{len(rows)} record steps): call optimizer.zero_grad() once per step before "
            "backward (to accumulate micro-batches on purpose, zero after the optimizer "
            "step and call mon.step once per optimizer step)",
            {
                "median_grad_carry": _r(c),
                "record_steps": len(rows),
                "grad_rms_growth": _r(growth),
                "threshold": CARRY_FRACTION,
            },
        )
    ]


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
    gradients_accumulating,
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
    "gradients-accumulating",
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
