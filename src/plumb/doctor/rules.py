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
lr-too-high                        the loss rose over the run and stayed up (error); or,
                                   in diagnose's lr test, a lower lr does better by > 3
                                   standard errors and 2% of the loss
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
double-softmax                     a softmax between the output and cross_entropy (the
                                   loss's graph), or outputs on the simplex fed to a
                                   loss that applies softmax
gradients-accumulating             at most record steps, p.grad already held > 50% of its
                                   final size when the step's backward began
untrained-parameters               a trainable parameter no optimizer holds, or whose
                                   gradient is None / exactly 0 at every record step
                                   (invariants); frozen ones (info)
not-learning                       the loss stalled at the targets' own entropy and the
                                   inputs do not move it (diagnose's input test)
double-sigmoid                     a sigmoid fed to BCE-with-logits (the loss's graph)
loss-summed                        the loss op sums over rows (an lr x rows under SGD)
gradients-clipped                  the global gradient norm is the same at every step
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
from plumb.record import first_nonfinite

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
LR_TEST_PRACTICAL = 0.02  # ... and by this fraction of the current lr's held-out loss
CARRY_FRACTION = 0.5
LOSS_SCALE_FLOOR = 1e-3  # a climb under this fraction of the initial loss is no climb
LR_COLLAPSE = 1e-3  # an lr under this fraction of its peak barely moves the weights
INFORMATION_FLOOR = 0.05  # within this fraction of the input-free baseline: inputs unused
SUM_ROWS = 10  # a summed loss over >= this many rows is a different lr regime
CLIP_TOLERANCE = 1e-3  # relative spread of the gradient norm that means "clipped"


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
Rule = Callable[[Evidence], list[Finding]]
RULES: list[Rule] = []  # in registration order: the order the doctor applies them


def rule(*codes: str) -> Callable[[Rule], Rule]:
    """Register a rule with the codes its findings may carry: ``RULES`` and ``CODES`` are
    built from these declarations only (a rule is added in this file, plus its test and its
    line in docs/doctor.md)."""

    def register(fn: Rule) -> Rule:
        fn.codes = codes  # type: ignore[attr-defined]
        RULES.append(fn)
        return fn

    return register


@rule("non-finite")
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


@rule("overconfident-init")
def overconfident_init(ev: Evidence) -> list[Finding]:
    """Initial loss above ln C, uniform guessing. With logits of std s independent of the
    target, E[cross-entropy] ~ ln C + s^2 / 2, and the largest of C such logits leads by
    ~s sqrt(2 ln C), so once the excess passes ln(C) / 4 (s > sqrt(ln(C) / 2)) the net
    puts most of its probability on one class it knows nothing about: confidently wrong
    (info: it costs the first steps, the lecture's hockey stick). An excess above ln C,
    a loss more than twice uniform guessing, is a warning (the lecture's 27.9 vs 3.30)."""
    if not ev.classes or ev.classes < 2 or not len(ev.loss) or not finite(float(ev.loss[0])):
        return []
    loss0 = float(ev.loss[0]) / ev.loss_rows()  # per row, also for a summed loss
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
                "scale": factor,
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


@rule("saturated-activations")
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
            if ev.averaged:
                evidence["averaged_iterates"] = ev.averaged
            # under a weight average the run keeps the mean, which sits lower than these
            # iterates, and decaying the lr under it hurt (best-10min at 400k steps: val
            # 1.9453 -> 1.9536): then only the stopping advice stands
            then = (
                f"and the run keeps the mean of its weights ({ev.averaged} iterates so far), "
                "which these statistics of the iterates do not show: stop where validation "
                "loss stops improving rather than decay the learning rate under the average"
                if ev.averaged
                else "so decay the learning rate earlier, or stop where validation loss stops "
                "improving"
            )
            fix = (
                f"the norm '{before}' before it sets their scale through its gain "
                f"(rms {g0:.2g} at init, {g1:.2g} late): the gain grew in training, {then}"
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


@rule("dead-units")
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


@rule("activations-vanishing", "activations-exploding")
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


@rule("gradients-vanishing", "gradients-exploding")
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


def update_ratios(ev: Evidence, embeddings: bool = True, at_peak: bool = False) -> dict[str, float]:
    """Median log10 update:data of each layer weight (and embedding table) over the last
    half of the steps. Weights that received no gradient at all (behind dead units:
    grad std and mean exactly 0) are left out: how far they move says nothing about the
    learning rate (dead-units says why they do not).

    ``at_peak``: each record step's value plus log10(peak lr / the lr that step used),
    the update:data the step would have had at the schedule's peak lr (an SGD or Adam
    step is proportional to its lr). A schedule that anneals the lr 10-1000x in the last
    half (step decay, cosine to ~0) makes the weights move that much less on purpose;
    judged at the peak, such a run is not mistaken for one whose lr is too low. Steps
    whose lr is unknown (no optimizer, a resumed record) count as taken at the peak."""
    rows = ev.late()
    names = ev.layer_weights() + (ev.embeddings() if embeddings else [])
    shift = np.zeros(len(rows))
    if at_peak:
        lrs = ev.lrs
        known = lrs[np.isfinite(lrs) & (lrs > 0)] if len(lrs) else lrs
        if len(known):
            peak = float(known.max())
            for i, r in enumerate(rows):
                s = r["step"]
                if 0 <= s < len(lrs) and finite(lrs[s]) and lrs[s] > 0:
                    shift[i] = math.log10(peak / float(lrs[s]))
    out = {}
    for name in dict.fromkeys(names):
        g = [
            abs(r["param"].get(name, {}).get("grad_std", math.nan))
            + abs(r["param"].get(name, {}).get("grad_mean", math.nan))
            for r in rows
        ]
        if g and median(g) == 0.0:
            continue
        v = median(list(np.asarray(ev.series(rows, "param", name, "update_data")) + shift))
        if finite(v):
            out[name] = v
    return out


def median_update(ev: Evidence) -> float:
    """The median weight's log10 update:data late in the run, at the schedule's peak lr
    (``update_ratios(at_peak=True)``): what the lr-too-low judgments compare with the
    lecture's guide."""
    return ev.cached(
        "median_update", lambda: median(list(update_ratios(ev, at_peak=True).values()))
    )


def _better_lr(ev: Evidence) -> int | None:
    """The lr test's best lr when it beats the current one by more than noise (LR_TEST_Z
    standard errors of the paired difference on the held-out batches) *and* by a
    practical margin (LR_TEST_PRACTICAL = 2% of the current lr's held-out loss), else
    None. A 30-step test is short: gaps of a few thousandths of a nat between lrs are
    what the next hundred steps routinely reverse (a warm-up, a schedule, the short
    test's bias toward larger steps), and they flip with float rounding between machines.
    Advice must rest on a difference that survives both."""
    test = ev.lr_test
    if test is None:
        return None
    best = test.best
    if best != test.current and test.significantly_better(best, LR_TEST_Z):
        mean, _ = test.gain(best)
        # a higher lr is suggested only with a second, independent condition (weights
        # that barely move, see learning_rate); a lower one needs the practical margin
        if test.lrs[best] > test.lr or -mean >= LR_TEST_PRACTICAL * abs(test.losses[test.current]):
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


@rule("lr-too-high", "lr-too-low")
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
        best, high, a, b, last = rising
        evidence["loss_best_before"], evidence["loss_window_median"] = _r(best), _r(high)
        evidence["window_steps"], evidence["loss_last_window"] = [a, b], _r(last)
        return [
            Finding(
                "lr-too-high",
                "error",
                "model",
                f"the loss climbed from {best:.3g} to {high:.3g} (median of steps {a}-{b}) "
                f"and ends at {last:.3g}, nearer the peak than where it was: steps "
                f"overshoot; lower {lr_txt}{to}",
                evidence,
            )
        ]
    jump, stall = _transient_rise(ev), _stalled_at_baseline(ev)
    if jump is not None and stall is not None:
        best, high, a, b, last = jump
        evidence.update(
            loss_best_before=_r(best),
            loss_window_median=_r(high),
            window_steps=[a, b],
            loss_last_window=_r(last),
            input_free_baseline=_r(stall["base"]),
        )
        return [
            Finding(
                "lr-too-high",
                "warning",
                "model",
                f"the loss jumped from {best:.3g} to {high:.3g} (median of steps {a}-{b}) and, "
                f"though it came back to {last:.3g}, it has stalled at the input-free baseline "
                f"({stall['base']:.3g} nats, see not-learning): the first steps overshot. "
                f"Restart with {lr_txt} lowered ~10x, or warm it up from a small value",
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


def _loss_rose(ev: Evidence) -> tuple[float, float, int, int, float] | None:
    """The sustained climb of ``_measure_loss_rise`` (None when none, or recovered)."""
    rise = ev.cached("loss_rise", lambda: _measure_loss_rise(ev))
    return rise[:5] if rise is not None and not rise[5] else None


def _transient_rise(ev: Evidence) -> tuple[float, float, int, int, float] | None:
    """A climb the run came back from (``_measure_loss_rise``'s recovered case)."""
    rise = ev.cached("loss_rise", lambda: _measure_loss_rise(ev))
    return rise[:5] if rise is not None and rise[5] else None


def loss_noise(loss: np.ndarray, n: int) -> tuple[float, float]:
    """(sigma, standard error of a median of ``n`` steps) of a loss curve: sigma from
    step-to-step differences (a robust MAD, insensitive to the trend; /sqrt 2 since a
    difference holds two draws), and a median of n steps has standard error
    1.2533 sigma / sqrt(n)."""
    d = np.diff(loss)
    sigma = 1.4826 * float(np.median(np.abs(d - np.median(d)))) / math.sqrt(2)
    return sigma, 1.2533 * sigma / math.sqrt(max(n, 1))


def _measure_loss_rise(ev: Evidence) -> tuple[float, float, int, int, float, bool] | None:
    """(best so far, the worst later window's median, that window's first and last step,
    the run's last window median, recovered) when the loss climbed, the sustained climb
    first: the
    median of some tenth of the run lies above the best the run had reached before it
    (the loss before training, or the lowest median of an earlier tenth) by more than 3
    standard errors, *and* the run's last tenth is still nearer that peak than the best
    before it (or the loss overflowed). With a small enough lr every step lowers the
    expected loss (the descent lemma), so a sustained climb means steps overshoot: the
    loss that rises at the start and plateaus (Adam at 100x its lr), the one that falls,
    then climbs (a BatchNorm net whose weights grew under a huge lr), the one that rises
    to an overflow. A transient bump that the run recovered from (it ends below the
    midpoint of its climb: a momentum spike in the first steps, a bad batch) says nothing
    against the lr the run is using now: lowering it would only slow a run that works.

    Noise: ``loss_noise``; the lowest of several earlier medians sits ~1.5 standard
    errors below their mean by chance alone, which is added to the margin. A climb must
    also exceed 1e-3 of the initial loss: a loss that reached exactly 0 and moved to
    1e-4 has not climbed in any sense that matters."""
    stop = ev.first_nonfinite_step()
    loss = ev.loss[: stop if stop is not None else len(ev.loss)]
    n = len(loss) // 10
    if n < (2 if stop is not None else 3):  # a run that overflowed: judge what it had
        return None
    sigma, se = loss_noise(loss, n)
    a0 = float(loss[0])
    if not finite(a0):
        return None
    floor = LOSS_SCALE_FLOOR * abs(a0)
    k_max = len(loss) // n
    windows = [median(loss[k * n : (k + 1) * n].tolist()) for k in range(k_max)]
    worst: tuple[tuple[bool, float], tuple[float, float, int, int, float, bool]] | None = None
    last = windows[-1]
    for k, w in enumerate(windows):
        earlier = [x for x in windows[:k] if finite(x)]
        if not finite(w):
            continue
        if not earlier or a0 <= min(earlier):
            start, margin = a0, 3 * math.hypot(sigma, se)
        else:
            start, margin = min(earlier), 3 * math.hypot(se, se) + 1.5 * se
        excess = w - start - max(margin, 1e-3 * abs(start), floor)
        recovered = stop is None and finite(last) and last < (start + w) / 2
        key = (not recovered, excess)
        if excess > 0 and (worst is None or key > worst[0]):
            worst = (key, (start, w, k * n, (k + 1) * n - 1, last, recovered))
    return worst[1] if worst else None


@rule("uneven-updates")
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


@rule("symmetric-weights")
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


@rule("redundant-bias")
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


@rule("batchnorm-train-mode-in-eval", "batchnorm-eval-mode-in-training")
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


@rule("unnormalized-inputs")
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


@rule("double-softmax")
def double_softmax(ev: Evidence) -> list[Finding]:
    """The model's output is already a softmax (rows >= 0 summing to 1) or a log-softmax
    (logsumexp of each row = 0), exactly, as no raw logits are by chance, and the loss is
    invariant to adding a constant per row, i.e. it applies softmax itself (cross-entropy
    does). Probabilities in [0, 1] then become nearly uniform logits: the loss can barely
    move (error). Log-probabilities are only redundant, log_softmax being idempotent
    (info)."""
    y = ev.logits()
    if not ev.softmax_loss or y is None or ev.loss_graph:
        return []  # with the loss's graph, loss_expression reads the same fault exactly
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


@rule("gradients-accumulating")
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


# --- invariants: facts of every correct run, exact, no threshold ------------------------
def _share(numel: int, total: int) -> str:
    return f"{numel:,} parameters, {numel / total:.1%} of the model" if total else f"{numel:,}"


def _names(items: list[str], most: int = 4) -> str:
    shown = ", ".join(f"'{n}'" for n in items[:most])
    return shown + (f" and {len(items) - most} more" if len(items) > most else "")


@rule("untrained-parameters")
def untrained_parameters(ev: Evidence) -> list[Finding]:
    """Parameters that can never train, each for its exact reason (no threshold: every
    trainable parameter of a correct run is held by an optimizer and receives a gradient
    from the loss):

    * error: ``requires_grad`` and no optimizer holds it (an ``lm_head`` built after the
      optimizer, a module replaced or a tie re-made after it, a param group forgotten);
    * error: held by an optimizer but its gradient is None at every recorded step (the
      loss never reaches it: a ``.detach()`` or ``.data`` in the forward, a branch whose
      output is unused) or exactly 0 at every one (cut off: multiplied by a constant 0,
      every unit behind it dead), over at least 2 record steps (one step may leave a
      part out on purpose: an expert no token was routed to);
    * info: ``requires_grad=False`` yet handed to an optimizer (frozen by mistake, or
      frozen on purpose and not said, as many fine-tuning recipes do: the two cannot be
      told apart, so it is named with its share and never a warning);
    * info: frozen and outside every optimizer (a deliberate freeze: named with its
      share, nothing to fix).
    Where an optimizer's param group has lr 0 its parameters are left out (the user
    said so)."""
    t = ev.trainability
    total = t.get("total", 0)
    out = []
    missing = t.get("missing", [])
    if missing:
        n = sum(k for _, k in missing)
        out.append(
            Finding(
                "untrained-parameters",
                "error",
                missing[0][0],
                f"{_names([m for m, _ in missing])} ({_share(n, total)}) require gradients "
                "but no optimizer holds them, so they never change: build the optimizer "
                "after the model is complete (after replacing heads or tying weights), over "
                "model.parameters()",
                {"not_in_optimizer": [m for m, _ in missing], "numel": n, "total": total},
            )
        )
    zero_lr = set(t.get("zero_lr", []))
    skip = {m for m, _ in missing} | zero_lr
    rows = [r for r in ev.clean if not r.get("skipped")]
    none, zeros = [], []
    for p in ev.params:
        name = p["name"]
        if name in skip or len(rows) < 2:  # one step can skip a part (an unrouted expert)
            continue
        stats = [r["param"].get(name, {}) for r in rows]
        if all("grad_std" not in st for st in stats):
            none.append(name)
        elif all(
            st.get("grad_std", 1.0) == 0.0 and st.get("grad_mean", 1.0) == 0.0 for st in stats
        ):
            zeros.append(name)
    sizes = {p["name"]: math.prod(p["shape"]) for p in ev.params}
    for names, why in (
        (
            none,
            "receive no gradient at all (None): the loss never reaches them, e.g. a "
            ".detach() or .data in the forward, or a module whose output is not used",
        ),
        (
            zeros,
            "receive a gradient of exactly 0 at every step: they are cut off from the "
            "loss (a detach below them, a factor of 0, or every unit behind them dead)",
        ),
    ):
        if not names:
            continue
        n = sum(sizes[m] for m in names)
        out.append(
            Finding(
                "untrained-parameters",
                "error",
                names[0],
                f"{_names(names)} ({_share(n, total)}) {why}, over {len(rows)} record "
                "steps: find where the forward cuts them off",
                {
                    "no_gradient" if names is none else "zero_gradient": names,
                    "numel": n,
                    "total": total,
                    "record_steps": len(rows),
                },
            )
        )
    frozen = t.get("frozen", [])
    for held, severity, text in (
        (
            True,
            "info",
            "are frozen (requires_grad=False) yet handed to the optimizer: "
            "they never train. If that is a mistake, set requires_grad=True; if you froze "
            "them on purpose, leave them out of the optimizer",
        ),
        (
            False,
            "info",
            "are frozen (requires_grad=False) and outside the optimizer: fine "
            "if you meant to freeze them",
        ),
    ):
        names = [m for m, _, h in frozen if h == held]
        if names:
            n = sum(k for m, k, h in frozen if h == held)
            out.append(
                Finding(
                    "untrained-parameters",
                    severity,
                    names[0],
                    f"{_names(names)} ({_share(n, total)}) {text}",
                    {"frozen": names, "numel": n, "total": total, "in_optimizer": held},
                )
            )
    if t.get("orphans"):
        out.append(
            Finding(
                "untrained-parameters",
                "info",
                "optimizer",
                f"the optimizer updates {t['orphans']} tensor(s) that are no longer in the "
                "model (a module replaced or a tie re-made after the optimizer was built): "
                "build the optimizer last",
                {"orphans": t["orphans"]},
            )
        )
    return out


# --- the loss expression, read from the autograd graph -----------------------------------
_PROB_INTO = {  # an op making probabilities, below a loss op that expects logits
    "SoftmaxBackward0": ("LogSoftmaxBackward0", "double-softmax", "softmax", "cross_entropy"),
    "SigmoidBackward0": (
        "BinaryCrossEntropyWithLogitsBackward0",
        "double-sigmoid",
        "sigmoid",
        "binary_cross_entropy_with_logits",
    ),
}
_ADAPTIVE = (
    "Adam",
    "AdamW",
    "Adamax",
    "NAdam",
    "RAdam",
    "RMSprop",
    "Adagrad",
    "Adadelta",
    "SparseAdam",
    "Adafactor",
    "Lion",
)


@rule("double-softmax", "double-sigmoid", "loss-summed")
def loss_expression(ev: Evidence) -> list[Finding]:
    """What the user's loss did to the model's output, read from the loss's autograd graph
    (``Probes.loss_path``: exact, wherever the output went after ``forward``).

    * double-softmax / double-sigmoid, error: a softmax (sigmoid) between the output and
      a loss that applies log-softmax (log-sigmoid) itself, e.g.
      ``F.cross_entropy(F.softmax(logits, -1), y)``. Probabilities in [0, 1] become
      logits that differ by < 1, so every prediction is nearly uniform and the gradient
      is squashed twice: the loss can barely move.
    * double-softmax, info: log_softmax twice (idempotent: only redundant).
    * loss-summed: the loss sums over R rows where the mean is the convention the lr was
      tuned for: its gradient is R times larger, so under SGD (whose step is lr x
      gradient) the lr acts R times larger: a different regime from R >= 10 (an order of
      magnitude), a warning; adaptive optimizers (Adam, RMSprop: the step is invariant
      to the gradient's scale) make it an info."""
    path = ev.loss_graph
    if not path:
        return []
    ops = [p["op"] for p in path]  # loss first, the model's output last
    out: list[Finding] = []
    for i, op in enumerate(ops):
        spec = _PROB_INTO.get(op)
        if spec is None or spec[0] not in ops[:i]:
            continue
        _, code, fn, loss_name = spec
        at_output = i == len(ops) - 1
        where = "output" if at_output else "loss"
        place = "the model's last op" if at_output else "the loss expression, after the model"
        out.append(
            Finding(
                code,
                "error",
                where,
                f"a {fn} ({place}) feeds {loss_name}, which applies {fn} itself: it receives "
                f"probabilities where it expects logits, so its predictions stay nearly "
                f"uniform. Pass the raw logits to the loss (apply {fn} only to read "
                "probabilities, under no_grad)",
                {"loss_ops": ops},
            )
        )
        break
    if ops.count("LogSoftmaxBackward0") > 1 and not out:
        out.append(
            Finding(
                "double-softmax",
                "info",
                "loss",
                "log_softmax is applied twice on the way to the loss: harmless (it is "
                "idempotent) but redundant; give the loss the logits",
                {"loss_ops": ops},
            )
        )
    rows = ev.output_rows()
    if ev.summed_loss() and rows and rows > 1:
        adaptive = (ev.optimizer_kind or "") in _ADAPTIVE
        severe = rows >= SUM_ROWS and not adaptive and ev.optimizer_kind is not None
        out.append(
            Finding(
                "loss-summed",
                "warning" if severe else "info",
                "loss",
                f"the loss sums over {rows:,} rows instead of averaging: its gradient is "
                f"{rows:,}x the mean's, so "
                + (
                    f"under {ev.optimizer_kind} the lr acts {rows:,}x larger: use "
                    "reduction='mean' (or divide the lr by the rows)"
                    if severe
                    else "an lr tuned for the mean does not carry over (an adaptive "
                    "optimizer absorbs the scale; weight decay and clipping do not)"
                ),
                {"rows": rows, "optimizer": ev.optimizer_kind, "loss_ops": ops},
            )
        )
    return out


# --- a model that learns nothing from its inputs ------------------------------------------
def entropy(counts: np.ndarray) -> tuple[float, int]:
    """(Miller-Madow entropy in nats, samples) of class counts: the plug-in entropy
    plus (classes seen - 1) / 2N, its first-order bias."""
    c = np.asarray(counts, dtype=np.float64)
    n = float(c.sum())
    if n <= 0:
        return float("nan"), 0
    p = c[c > 0] / n
    return float(-(p * np.log(p)).sum() + (len(p) - 1) / (2 * n)), int(n)


def _stalled_at_baseline(ev: Evidence) -> dict[str, float] | None:
    """The measurement behind ``not_learning`` (None: the loss is not stuck there, or the
    inputs measurably move it). Only ``diagnose`` can test the inputs (it owns the
    batches): without that test (a user's loop) this is None."""
    st = ev.cached("stall", lambda: _measure_stall(ev))
    use = ev.input_use  # held-out loss with inputs permuted minus with them
    if st is None or use is None:
        return None
    if use[0] > max(3 * use[1], INFORMATION_FLOOR * st["base"]):
        return None  # the inputs move the loss by a practical amount: a slow start
    return st


def needs_input_test(ev: Evidence) -> bool:
    """Whether the loss curve alone sits at the input-free baseline, so that the input
    test (``plumb.doctor.input_use``) must decide; ``diagnose`` runs it only then."""
    return ev.input_use is None and ev.cached("stall", lambda: _measure_stall(ev)) is not None


def _measure_stall(ev: Evidence) -> dict[str, float] | None:
    if not ev.classes or not ev.softmax_loss or ev.classes < 2:
        return None
    if ev.first_nonfinite_step() is not None:
        return None
    loss = ev.loss
    n = len(loss) // 10
    if n < 3:
        return None
    _, se = loss_noise(loss, n)
    lnc = math.log(ev.classes)
    h, samples = entropy(ev.target_counts) if ev.target_counts is not None else (math.nan, 0)
    if samples < ev.classes:  # too few targets to estimate their entropy
        h = math.nan
    base = min(lnc, h) if finite(h) else lnc
    last = median(loss[-n:].tolist())
    at = int(0.6 * len(loss))
    mid = median(loss[max(at - n // 2, 0) : at + n - n // 2].tolist())
    if not (finite(last) and finite(mid)):
        return None
    if mid - last > 3 * math.hypot(se, se):
        return None  # still falling: a slow start, not a stall
    # Equivalence, not a failure to reject: the whole 95% interval of the loss over the
    # flat last 40% of the run (median, standard error as in loss_noise) must lie within
    # the practical margin of the baseline. A short, noisy run cannot show that: silent.
    tail = loss[int(0.6 * len(loss)) :]
    _, se_tail = loss_noise(loss, len(tail))
    level = median(tail.tolist())
    if abs(level - base) + 1.645 * se_tail > INFORMATION_FLOOR * base:
        return None
    return {
        "last": last,
        "mid": mid,
        "h": h,
        "samples": samples,
        "lnc": lnc,
        "se": se,
        "base": base,
    }


@rule("not-learning")
def not_learning(ev: Evidence) -> list[Finding]:
    """The loss sits at what a predictor that ignores the inputs achieves, and stays
    there. Null hypothesis: the model uses nothing of its inputs; then its cross-entropy
    is at least the entropy H of the targets' own frequencies (the best input-free
    prediction; ln C when the classes are balanced), and a model that learned only the
    frequencies sits at H. The rule fires when the loss has stopped falling (the last
    tenth is not 3 standard errors below the tenth at 60% of the run) and the flat last
    40% of the run is shown *equivalent* to min(H, ln C): its median's 95% interval
    (1.645 standard errors either side, a two one-sided test) lies within 5% of the
    baseline (a model that gains less than 5% over the best input-free prediction has
    learned practically nothing from its inputs). A run too short or too noisy to show
    that stays silent. A loss still above the baseline is a model that has not yet learned
    the frequencies (the first steps of many healthy runs): no finding.

    Likely causes, ranked by what was measured: heavy dropout (p >= 0.5), inputs that
    are constant, parameters cut off from the loss, steps so large the loss jumped at the
    start, a depth or symmetry fault the other rules found, and otherwise targets that do not belong to their inputs (shuffled or shifted
    separately)."""
    st = _stalled_at_baseline(ev)
    if st is None:
        return []
    last, mid, h, samples, lnc, se = (st[k] for k in ("last", "mid", "h", "samples", "lnc", "se"))
    gain = st["base"] - last
    causes = [
        f"{f.code} at '{f.where}' (the gradient cannot shape the early layers)"
        for rule in (gradient_depth, activation_depth, symmetric_weights)
        for f in rule(ev)
        if f.severity in ("error", "warning")
    ][:1]
    heavy = {k: p for k, p in ev.dropout.items() if p >= 0.5}
    if heavy:
        causes.append(
            "dropout "
            + ", ".join(f"p={p:g} in '{k}'" for k, p in heavy.items())
            + " zeroes most activations: lower it (0.1-0.2 is usual)"
        )
    x = ev.model_input
    if x and finite(x.get("std", math.nan)) and x["std"] <= 1e-6 * max(abs(x["mean"]), 1.0):
        causes.append(f"the inputs are constant (std {x['std']:.2g}): check the data pipeline")
    if any(f.severity == "error" for f in untrained_parameters(ev)):
        causes.append("parameters are cut off from the loss (see untrained-parameters)")
    m = median_update(ev)
    if finite(m) and m < UPDATE_TARGET - UPDATE_BAND:
        causes.append(
            f"the lr: the weights move only 10^{m:.1f} of their size per step (see lr-too-low)"
        )
    jump = _transient_rise(ev)
    if jump is not None:
        causes.append(
            f"the lr: the loss jumped from {jump[0]:.3g} to {jump[1]:.3g} (steps {jump[2]}-"
            f"{jump[3]}), steps too large to learn more than the frequencies (see lr-too-high)"
        )
    causes.append(
        "the lr, too large to learn more than the frequencies or too small to leave them "
        "(verify tries lr/10, lr/100 and 10x from the start: plumb doctor --verify, "
        "diagnose(verify=True))"
    )
    causes.append(
        "the targets may not belong to their inputs: check that inputs and targets are "
        "shuffled, shifted and batched together (x[i] with y[i])"
    )
    what = (
        f"the targets' own entropy {h:.3g} nats (predicting only how often each class occurs)"
        if finite(h) and h < lnc
        else f"ln {ev.classes} = {lnc:.3g} (uniform guessing)"
    )
    return [
        Finding(
            "not-learning",
            "warning",
            "model",
            f"the loss has stalled at {last:.4g}, no better than {what}: the model is not "
            f"using its inputs. Likely: {causes[0]}"
            + (f"; else {'; '.join(causes[1:])}" if len(causes) > 1 else ""),
            {
                "loss_last_tenth": _r(last),
                "loss_at_60pct": _r(mid),
                "targets_entropy": _r(h),
                "targets_seen": int(samples),
                "ln_classes": _r(lnc),
                "gain_over_baseline": _r(gain),
                "standard_error": _r(se),
                "information_floor": INFORMATION_FLOOR,
                "dropout": ev.dropout,
            },
        )
    ]


# --- the learning rate actually used ------------------------------------------------------
@rule("lr-too-low", "lr-too-high")
def lr_schedule(ev: Evidence) -> list[Finding]:
    """The lr each step used (read from the optimizer, so schedules and warm-ups show)
    spent more than half of the steps below 1e-3 of its own peak: the weights then move
    a thousand times less than the schedule meant for most of the run (a scheduler
    stepped per batch where it was written per epoch, a decay horizon far shorter than
    the run). Schedules end low on purpose (cosine to lr/10, linear to 0 at the very
    end), never for most of the run: lr-too-low, warning."""
    lrs = ev.lrs[np.isfinite(ev.lrs)] if len(ev.lrs) else ev.lrs
    if len(lrs) < 10:
        return []
    peak = float(lrs.max())
    if peak <= 0:
        return []
    low = lrs < LR_COLLAPSE * peak
    if low.mean() <= 0.5:
        return []
    first = int(np.argmax(low))
    return [
        Finding(
            "lr-too-low",
            "warning",
            "schedule",
            f"the lr fell from {peak:.3g} to {float(lrs[-1]):.3g}, below 1/1000 of its peak "
            f"from step {first} on ({low.mean():.0%} of the steps): a scheduler stepped "
            "every batch where it was meant per epoch, or a decay horizon shorter than the "
            "run; step it per epoch or set its length in steps",
            {
                "peak_lr": _r(peak),
                "last_lr": _r(float(lrs[-1])),
                "first_low_step": first,
                "low_fraction": _r(float(low.mean())),
                "threshold": LR_COLLAPSE,
            },
        )
    ]


def gradient_norms(ev: Evidence) -> list[float]:
    """The global gradient norm at each clean record step, from the recorded statistics
    of every parameter's gradient (sum of squares = std^2 (n - 1) + n mean^2, exact for
    the unbiased std the probes keep): what ``clip_grad_norm_`` measures, after any
    clipping the loop did before ``mon.step``. Steps where a parameter had no gradient
    are left out."""
    sizes = {p["name"]: math.prod(p["shape"]) for p in ev.params}
    out = []
    for r in ev.clean:
        total, ok = 0.0, bool(sizes)
        for name, n in sizes.items():
            st = r["param"].get(name, {})
            if "grad_std" not in st:
                ok = False
                break
            total += st["grad_std"] ** 2 * max(n - 1, 0) + n * st.get("grad_mean", 0.0) ** 2
        if ok and finite(total):
            out.append(math.sqrt(total))
    return out


@rule("gradients-clipped")
def gradients_clipped(ev: Evidence) -> list[Finding]:
    """Every step's gradient was clipped: the global gradient norm is the same number at
    every record step (within 1e-3, where unclipped norms vary by tens of percent from
    batch to batch; clip_grad_norm_ rescales to max_norm to float rounding). Then the
    threshold, not the gradient, sets the length of every step: SGD moves lr x max_norm
    per step whatever the loss says (effectively normalised SGD; an adaptive optimizer
    undoes the uniform scale). A warning when the steps are also tiny (median
    update:data < 1e-4, the lr-too-low bound: a clip so small every step is a sliver);
    otherwise info (clipping every step is a recipe too: normalised SGD for RNNs)."""
    norms = gradient_norms(ev)
    norms = norms[1:] if len(norms) > 3 else norms  # step 0 may come before clipping starts
    if len(norms) < 3:
        return []
    c = float(np.median(norms))
    if not c > 0 or (max(norms) - min(norms)) > CLIP_TOLERANCE * c:
        return []
    m = median_update(ev)
    tiny = finite(m) and m < UPDATE_TARGET - UPDATE_BAND
    return [
        Finding(
            "gradients-clipped",
            "warning" if tiny else "info",
            "model",
            f"the gradient norm is {c:.3g} at every one of {len(norms)} record steps: the "
            "loop clips every step, so the clip threshold, not the gradient, sets each step"
            + (
                f", and the weights move only 10^{m:.1f} of their size per step: raise "
                "max_norm above the usual gradient norm (clipping is for rare spikes), or "
                "raise the lr"
                if tiny
                else " (fine if meant: normalised SGD; clipping is usually for rare spikes)"
            ),
            {
                "grad_norm": _r(c),
                "spread": _r((max(norms) - min(norms)) / c),
                "record_steps": len(norms),
                "median_log10_update_data": _r(m),
                "tolerance": CLIP_TOLERANCE,
            },
        )
    ]


#: Every code a finding can carry, derived from the rules (in registration order, which is
#: the order findings of one severity are listed in), plus ``step-failed``: made by
#: ``plumb.diagnose`` itself when the user's step raises after step 0.
CODES: tuple[str, ...] = (*dict.fromkeys(c for r in RULES for c in r.codes), "step-failed")


STRICT = False  # tests set this: a rule that fails raises instead of being skipped


def apply_rules(ev: Evidence) -> list[Finding]:
    """Every rule on ``ev``; a rule that fails on odd evidence is skipped, not raised (the
    doctor reports what it saw, it never crashes a user's run)."""
    findings: list[Finding] = []
    for rule in RULES:
        try:
            found = rule(ev)
        except (ArithmeticError, ValueError, KeyError, IndexError, TypeError, RuntimeError):
            if STRICT:
                raise
            continue
        if STRICT and (odd := {f.code for f in found} - set(rule.codes)):
            raise AssertionError(f"{rule.__name__} made {odd}, not in its @rule codes")
        findings += found
    return sort_findings(one_cause(findings))


def one_cause(findings: list[Finding]) -> list[Finding]:
    """Drop the findings that another one explains, so that the first fix is the cause's:
    uneven updates across depth follow from a depth trend; tiny updates from a clip the
    clip's note already names; and in a loop that never clears its gradients each step
    applies the sum of every earlier gradient, so the loss climbs whatever the lr, and an
    lr measured on that loop says nothing about the corrected one (the zoo's GRU at AdamW
    3e-3 without zero_grad, 600 steps: the lr finding's 10x lower lr ends at loss 2.37,
    zero_grad at the same lr at 2.16 with no finding left)."""
    codes = {f.code for f in findings}
    if codes & CAUSES:
        findings = [f for f in findings if f.code != "uneven-updates"]
    if "gradients-clipped" in codes:
        findings = [f for f in findings if not (f.code == "lr-too-low" and f.severity == "info")]
    if "gradients-accumulating" in codes:
        findings = [f for f in findings if f.code not in ("lr-too-high", "lr-too-low")]
    return findings


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
    # a code no rule declares can only come from a record written by another version
    return sorted(findings, key=lambda f: (order[f.severity], rank.get(f.code, 99), f.where))
