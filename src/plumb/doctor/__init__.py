"""plumb doctor: turn the probes' statistics into findings with evidence and a fix.

    diag = plumb.diagnose(model, batches, loss_fn, optimizer, steps=100)
    print(diag)            # readable summary
    diag.findings          # [Finding(code, severity, where, message, evidence)]
    diag.codes, diag.ok, diag.suggested_lr, diag.to_json()

``diagnose`` *trains the model in place* for ``steps`` steps (forward, loss, backward,
``optimizer.step()``) with the probes recording every step, then runs a short lr test
on copies of the model (``LrTest``) and applies the rules (``rules.py``). Step 0's loss
is the loss before the first update. The model is used in the mode it is given
(``diagnose`` does not call ``model.train()``: a BatchNorm left in eval mode is one of
the things it finds). It never raises because the model misbehaves (NaN, Inf, layers it
does not know): it reports what it saw. ``Doctor`` runs the same rules inside a user's
own training loop (``plumb.Monitor(model, optimizer=opt, doctor=True)``), where the bugs
of the loop itself (a missing ``zero_grad``) can be seen.
"""

from __future__ import annotations

import copy
import html
import itertools
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from plumb.dist import from_rank0, is_sharded, unwrap, world
from plumb.doctor.evidence import Evidence, LrTest, gather, weight_symmetry
from plumb.doctor.fixes import exact_fix, finding_lines, headline
from plumb.doctor.rules import (
    CODES,
    LR_TEST_PRACTICAL,
    LR_TEST_Z,
    Finding,
    apply_rules,
    needs_input_test,
    sort_findings,
    suggested_lr,
)
from plumb.doctor.verify import scale_lr, train_twin, twin_of, verify_findings
from plumb.errors import PlumbError
from plumb.init import expected_initial_loss
from plumb.io import jsonable
from plumb.probes import Probes, logits_of
from plumb.style import styled
from plumb.train import EagerEngine, Schedule, loop

__all__ = ["CODES", "Diagnosis", "Doctor", "Finding", "LrTest", "diagnose"]


@dataclass
class Diagnosis:
    """The result of :func:`diagnose` (or of a ``Doctor`` during training)."""

    findings: list[Finding]
    steps: int
    initial_loss: float
    final_loss: float
    expected_initial_loss: float | None = None
    suggested_lr: float | None = None
    seconds: float = 0.0
    lr_test: LrTest | None = None
    evidence: Evidence | None = field(default=None, repr=False)

    @property
    def codes(self) -> set[str]:
        return {f.code for f in self.findings}

    @property
    def ok(self) -> bool:
        """No finding with severity error or warning."""
        return not any(f.severity in ("error", "warning") for f in self.findings)

    def verify(
        self,
        model: nn.Module,
        optimizer: Any,
        batches: Iterable[tuple[Any, Any]] | Callable[[], tuple[Any, Any]],
        loss_fn: Callable[[Any, Any], Tensor],
        steps: int | None = None,
        *,
        scheduler: Any = None,
    ) -> Diagnosis:
        """Measure the fix of every finding that has one (``plumb.doctor.verify.FIXES``):
        ``model`` and ``optimizer`` (and ``scheduler``) at the state to train from, e.g.
        freshly built with the seed of the diagnosed run (copies are made; they are not
        touched); ``steps`` training batches (default: the diagnosis's steps) and 16
        held-out batches are drawn from ``batches``. Returns a new Diagnosis whose
        findings carry ``evidence["verified"]``; a fix that did not help is info."""
        n = steps or self.steps
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise PlumbError(f"steps must be an integer >= 1, got {steps!r}")
        stream = _batch_stream(batches)
        train = [next(stream) for _ in range(n)]
        held = [next(stream) for _ in range(LR_TEST_EVAL)]
        lr = _lr(optimizer)
        findings = verify_findings(
            self.findings,
            (model, optimizer, scheduler),
            loss_fn,
            train,
            held,
            lr=lr,
            suggested_lr=self.suggested_lr,
        )
        return replace(self, findings=sort_findings(findings))

    @property
    def verified(self) -> list[Finding]:
        """The findings whose fix was measured."""
        return [f for f in self.findings if "verified" in f.evidence]

    def keep_reason(self) -> str:
        """Why the current lr is kept: " (keep)", or, when another lr ended lower in the
        test, " (keep: lr X ended Y nats lower, within noise / under the practical
        margin)"; "" when the suggestion is another lr."""
        t = self.lr_test
        if t is None or self.suggested_lr != t.lr:
            return ""
        if t.best == t.current:
            return " (keep: the best in the lr test)"
        mean, se = t.gain(t.best)
        why = (
            f"within noise: 3 standard errors are {3 * se:.2g}"
            if -mean <= LR_TEST_Z * se
            else f"under the practical margin of {LR_TEST_PRACTICAL:.0%} of the loss"
        )
        return f" (keep: lr {t.lrs[t.best]:.3g} ended {-mean:.2g} nats lower, {why})"

    def to_dict(self) -> dict[str, Any]:
        def num(x: float | None) -> float | str | None:
            return x if x is None or math.isfinite(x) else str(x)

        return {
            "ok": self.ok,
            "steps": self.steps,
            "initial_loss": num(self.initial_loss),
            "final_loss": num(self.final_loss),
            "expected_initial_loss": num(self.expected_initial_loss),
            "suggested_lr": self.suggested_lr,
            "lr_test": jsonable(self.lr_test.to_dict()) if self.lr_test else None,
            "codes": sorted(self.codes),
            "findings": [f.to_dict() for f in self.findings],
        }

    def to_json(self) -> str:
        """Stable JSON: sorted keys, findings ordered by severity, code, place."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def __str__(self) -> str:
        return self.describe()

    def describe(self, config: dict[str, Any] | None = None) -> str:
        """The diagnosis for a terminal: the headline with the first fix, the losses,
        the lr test, then each finding with its fix on a line of its own (``plumb
        train`` flags when ``config`` is a plumb run's config, else a line of PyTorch)."""
        findings = [f.to_dict() for f in self.findings]
        head = headline(findings, self.steps, f"loss {self.final_loss:.4g}", config)
        lines = [f"plumb doctor: {head.plain()}"]
        exp = f" (expected {self.expected_initial_loss:.3f})" if self.expected_initial_loss else ""
        lines.append(
            f"  {len(self.findings)} finding(s) in {self.steps} steps; loss "
            f"{self.initial_loss:.4g}{exp} -> {self.final_loss:.4g}"
        )
        if self.lr_test is not None:
            t = self.lr_test
            lines.append(
                f"  lr test ({t.steps} steps from step {t.start}, held-out loss): {t.table()}"
            )
        if self.suggested_lr is not None:
            lines.append(f"  suggested lr: {self.suggested_lr:.3g}{self.keep_reason()}")
        for f in findings:
            lines += finding_lines(f, config)
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        """Jupyter: the headline, the losses, the lr test, each finding with its fix and
        its evidence; the report's stylesheet and renderer."""
        esc = html.escape
        findings = [f.to_dict() for f in self.findings]
        head = headline(findings, self.steps, f"loss {self.final_loss:.4g}").html()
        exp = f" (expected {self.expected_initial_loss:.3f})" if self.expected_initial_loss else ""
        parts = [
            head,
            f'<p class="essentials">plumb doctor · {self.steps} steps · loss '
            f"{self.initial_loss:.4g}{esc(exp)} &rarr; {self.final_loss:.4g}</p>",
        ]
        if self.lr_test is not None:
            parts.append(f"<p>lr test (held-out loss): {esc(self.lr_test.table())}</p>")
        if self.suggested_lr is not None:
            parts.append(f"<p>suggested lr: {self.suggested_lr:.3g}{esc(self.keep_reason())}</p>")
        parts += [finding_html(f) for f in findings]
        return styled("".join(parts))


def finding_html(f: dict[str, Any], config: dict[str, Any] | None = None) -> str:
    """One finding (``Finding.to_dict()``, or a row of findings.json) as HTML: severity,
    code and place, the message (the sentence with its numbers), the exact fix on a line
    of its own (``plumb train`` flags for a plumb run, whose ``config.json`` is
    ``config``; a line of PyTorch for a user's loop: ``fixes.exact_fix``), the evidence's
    JSON folded under <details>. Styled by ``plumb.style``; the one renderer of the
    report, the compare page and the Jupyter views."""
    sev = f.get("severity", "info")
    sev = sev if sev in ("error", "warning", "info") else "info"
    esc = html.escape
    evidence = json.dumps(jsonable(f.get("evidence", {})), ensure_ascii=False, indent=1)
    fix = exact_fix(f, config)
    line = f'<div class="fix">fix: <code>{esc(fix)}</code></div>' if fix else ""
    return (
        f'<div class="finding {sev}"><span class="sev">{esc(sev)}</span> '
        f"<code>{esc(str(f.get('code', '')))}</code> at "
        f"<code>{esc(str(f.get('where', '')))}</code>: "
        f"{esc(str(f.get('message', '')))}{line}"
        f'<details><summary class="muted">evidence</summary><pre class="mono">'
        f"{esc(evidence)}</pre></details></div>"
    )


# --- batches --------------------------------------------------------------------------
def _pair(item: Any, step: int) -> tuple[Any, Any]:
    if isinstance(item, tuple | list) and len(item) == 2:
        return item[0], item[1]
    raise PlumbError(
        f"batches must give (inputs, targets) pairs; item {step} is a {type(item).__name__}"
    )


def _batch_stream(batches: Any) -> Iterator[tuple[Any, Any]]:
    """(inputs, targets) forever: from a zero-argument callable, or cycling an iterable
    (re-iterating it when it can be, else replaying what it gave)."""
    if (
        isinstance(batches, tuple | list)
        and len(batches) == 2
        and all(isinstance(t, Tensor) for t in batches)
    ):
        return itertools.repeat((batches[0], batches[1]))  # one (inputs, targets) batch
    if callable(batches) and not isinstance(batches, Iterable):
        return (_pair(batches(), i) for i in itertools.count())
    if not isinstance(batches, Iterable):
        raise PlumbError(
            "batches must be an iterable of (inputs, targets) or a zero-argument callable, "
            f"got {type(batches).__name__}"
        )

    def gen() -> Iterator[tuple[Any, Any]]:
        reusable = iter(batches) is not batches
        seen: list[tuple[Any, Any]] = []
        i = 0
        source = iter(batches)
        while True:
            got = False
            for item in source:
                got = True
                pair = _pair(item, i)
                i += 1
                if not reusable:
                    seen.append(pair)
                yield pair
            if not got and not seen:
                raise PlumbError("batches is empty: give at least one (inputs, targets) pair")
            source = iter(batches) if reusable else iter(seen)

    return gen()


def _with_logits(out: Any, old: Tensor, new: Tensor) -> Any:
    """``out`` with its logits tensor ``old`` replaced by ``new`` (a tensor, a tuple or
    list, a dict, or an object with a ``logits`` attribute such as a ``ModelOutput``)."""
    if out is old:
        return new
    if isinstance(out, tuple | list):
        items = [new if t is old else t for t in out]
        return type(out)(items) if not hasattr(out, "_fields") else type(out)(*items)
    if isinstance(out, dict) and not hasattr(out, "logits"):
        return {k: new if v is old else v for k, v in out.items()}
    twin = copy.copy(out)
    if isinstance(twin, dict):
        for k, v in out.items():
            if v is old:
                twin[k] = new
    if getattr(out, "logits", None) is old:
        object.__setattr__(twin, "logits", new)
    return twin


def _class_dim(loss_fn: Callable, out: Any, y: Any) -> int | None:
    """The output dimension the loss applies softmax over, found by measurement: adding
    a constant that varies along every other dimension leaves softmax cross-entropy
    unchanged (log-softmax is shift-invariant along its own dimension). Tried for dim 1
    (``cross_entropy``'s (N, C, ...)) and the last dim (a (B, T, V) sequence model whose
    loss reshapes to (B*T, V)). The output may be a structure holding the logits
    (``logits_of``: a tuple, a dict, a ``ModelOutput``). None: the loss does not apply
    softmax (MSE, NLL, BCE)."""
    whole, out = out, logits_of(out)
    if not isinstance(out, Tensor) or not out.is_floating_point() or out.dim() < 2:
        return None
    dims = list(dict.fromkeys([1, out.dim() - 1]))
    try:
        with torch.no_grad():
            base = float(loss_fn(whole, y))
            if not math.isfinite(base):
                return None
            g = torch.Generator(device="cpu").manual_seed(0)
            for d in dims:
                shape = list(out.shape)
                shape[d] = 1
                c = (1 + 3 * torch.rand(shape, generator=g)).to(out.device, out.dtype)
                shifted = _with_logits(whole, out, out + c)
                if abs(float(loss_fn(shifted, y)) - base) <= 1e-4 * (1 + abs(base)):
                    return d
    except Exception:  # a loss that cannot take the shifted output: not a softmax loss
        return None
    return None


def softmax_dim(out: Tensor | None, grad: Tensor | None) -> int | None:
    """The output dimension a loss applies softmax over, read from dL/d(output): a loss
    invariant to adding a constant along dim d (what log-softmax makes cross-entropy)
    has a gradient that sums to zero along d, row by row (the derivative of
    L(out + c 1) in c). Zero to float rounding, pooled over rows (the summed |row sums|
    under 1e-3 of the summed L1 norms: cross-entropy gives ~1e-7, MSE or NLL of
    log-probs give O(1); a single confidently right row of huge logits can reach 3e-3
    alone, which pooling absorbs). Tried for dim 1 and the last dim. None: no such
    dimension."""
    if out is None or grad is None or grad.shape != out.shape or out.dim() < 2:
        return None
    for d in dict.fromkeys([1, out.dim() - 1]):
        if out.shape[d] < 2:
            continue
        g = grad.double()
        l1 = g.abs().sum(d)
        if not bool((l1 > 0).any()):
            return None
        # pooled over rows: a confidently right row (huge logits) has a gradient near
        # float32's rounding of its softmax, so its own sum is noise; the total is not
        if float(g.sum(d).abs().sum()) <= 1e-3 * float(l1.sum()):
            return d
    return None


def targets_from_gradient(
    out: Tensor | None, grad: Tensor | None, dim: int | None, classes: int | None
) -> np.ndarray | None:
    """Target counts read off dL/d(logits) of softmax cross-entropy: each row's gradient
    is w (softmax(z) - onehot(y)) with w > 0, whose one negative entry is the target's.
    Rows without gradient (ignored positions) are left out."""
    if out is None or grad is None or dim is None or not classes or grad.shape != out.shape:
        return None
    g = grad.movedim(dim, -1).reshape(-1, grad.shape[dim])
    rows = g.abs().sum(1) > 0
    if not rows.any():
        return None
    return torch.bincount(g[rows].argmin(1), minlength=classes).numpy()


def _lr(optimizer: Any) -> float | None:
    if isinstance(optimizer, list | tuple):  # several optimizers: the first one's
        optimizer = optimizer[0] if optimizer else None
    try:
        lr = optimizer.param_groups[0]["lr"]
        return float(lr)
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        return None


def _summary(ev: Evidence, findings: list[Finding], seconds: float) -> Diagnosis:
    findings = sort_findings(findings)
    loss = ev.loss
    initial = float(loss[0]) if len(loss) else math.nan
    tail = loss[-max(1, len(loss) // 10) :] if len(loss) else loss
    final = float(np.median(tail)) if len(tail) else math.nan
    return Diagnosis(
        findings=findings,
        steps=ev.steps,
        initial_loss=initial,
        final_loss=final,
        expected_initial_loss=expected_initial_loss(ev.classes) if ev.classes else None,
        suggested_lr=suggested_lr(ev),
        seconds=seconds,
        lr_test=ev.lr_test,
        evidence=ev,
    )


# --- the lr test -----------------------------------------------------------------------
LR_FACTORS = (0.1, 1 / 3, 1.0, 3.0, 10.0)  # a decade either side, half-decade steps
LR_TEST_STEPS = 30
LR_TEST_EVAL = 16
LR_EXTEND = 2  # half-decades added beyond an edge that wins (down to lr/100, up to 100 lr)


def lr_test(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[Any, Any], Tensor],
    train_batches: list[tuple[Any, Any]],
    eval_batches: list[tuple[Any, Any]],
    *,
    start: int,
    factors: tuple[float, ...] = LR_FACTORS,
    seed: int = 0,
    scheduler: Any = None,
    extend: int = LR_EXTEND,
) -> LrTest | None:
    """Train a copy of (model, optimizer state[, scheduler]) on ``train_batches`` at each
    lr x factor (every param group scaled, and the scheduler's base lrs: the schedule
    keeps its shape), then score each copy on ``eval_batches`` (mean loss per batch, no
    update, the model in its mode). The same batches and the same random stream
    (dropout) for every lr; the user's model and optimizer are not touched. When the
    best lr is at an edge of the range and beats the current lr by 3 standard errors, the
    range is extended by half-decades on that side (``extend`` more at most), so that a
    suggestion is bracketed by worse lrs rather than cut off by the grid. None when the model cannot be copied or a step fails."""
    lr = _lr(optimizer)
    if not lr or not train_batches or not eval_batches:
        return None
    runs: dict[float, list[float]] = {}

    def run(f: float) -> list[float] | None:
        twin = twin_of((model, optimizer, scheduler))
        if twin is None:
            return None
        scale_lr(twin.optimizer, twin.scheduler, f)
        return train_twin(twin, loss_fn, train_batches, eval_batches, seed=seed)

    for f in factors:
        got = run(f)
        if got is None:
            return None
        runs[f] = got

    def mean(f: float) -> float:
        return float(np.mean(runs[f])) if all(map(math.isfinite, runs[f])) else math.inf

    def beats_current(f: float) -> bool:  # paired over the held-out batches, 3 SE
        d = np.asarray(runs[f]) - np.asarray(runs[1.0] if 1.0 in runs else runs[f])
        if not np.all(np.isfinite(d)):
            return bool(np.all(np.isfinite(runs[f])))
        return len(d) > 1 and -d.mean() > LR_TEST_Z * d.std(ddof=1) / math.sqrt(len(d))

    step = math.sqrt(10)
    for edge, towards in ((min, 1 / step), (max, step)):
        for _ in range(extend):
            best = min(runs, key=mean)
            if best != edge(runs) or not math.isfinite(mean(best)) or not beats_current(best):
                break
            got = run(best * towards)
            if got is None:
                break
            runs[best * towards] = got
    order = sorted(runs)
    lrs = [float(f"{lr * f:.3g}") for f in order]
    losses = [mean(f) for f in order]
    return LrTest(
        start, len(train_batches), len(eval_batches), lr, lrs, losses, [runs[f] for f in order]
    )


# --- diagnose ---------------------------------------------------------------------------
def diagnose(
    model: nn.Module,
    batches: Iterable[tuple[Any, Any]] | Callable[[], tuple[Any, Any]],
    loss_fn: Callable[[Any, Any], Tensor],
    optimizer: torch.optim.Optimizer,
    steps: int = 100,
    *,
    test_lr: bool = True,
    scheduler: Any = None,
    verify: bool = False,
) -> Diagnosis:
    """Train ``model`` in place for ``steps`` steps with probes attached and diagnose it.

    ``batches``: an iterable of ``(inputs, targets)`` (cycled when shorter than ``steps``),
    a zero-argument callable returning one, or a single ``(inputs, targets)`` pair.
    ``loss_fn(model(inputs), targets)`` must return a scalar tensor; ``optimizer`` is any
    ``torch.optim`` optimizer over the model's parameters. ``test_lr``: afterwards, run
    the lr test (5 copies x 30 steps, scored on 16 further batches) that the learning-rate
    findings and ``suggested_lr`` rest on. ``scheduler``: the lr scheduler of a
    per-step schedule (warm-up, cosine, ...), stepped after every optimizer step here
    and continued in the lr test's copies (its base lrs scaled with the lr). ``verify``:
    measure each finding's fix (``plumb.doctor.verify``): copies from the starting state
    trained on the same batches with and without the fix, scored on held-out batches;
    costs (1 + fixable findings) x ``steps`` training steps. Returns a :class:`Diagnosis`.
    """
    if not isinstance(model, nn.Module):
        raise PlumbError(f"diagnose needs a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise PlumbError(f"steps must be an integer >= 1, got {steps!r}")
    if not callable(loss_fn):
        raise PlumbError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if not (hasattr(optimizer, "step") and hasattr(optimizer, "zero_grad")):
        raise PlumbError(
            f"optimizer must be a torch.optim optimizer, got {type(optimizer).__name__}"
        )
    if scheduler is not None and not callable(getattr(scheduler, "step", None)):
        raise PlumbError(
            f"scheduler must be an lr scheduler (with .step()), got {type(scheduler).__name__}"
        )
    stream = _batch_stream(batches)
    t0 = time.perf_counter()
    rank, size = world()
    verify = verify and size == 1  # copies of one process's model; not under DDP/FSDP
    start = copy.deepcopy((model, optimizer, scheduler)) if verify else None
    seen: list[tuple[Any, Any]] = []
    probes = Probes(model, 1, hist_every=max(steps, 1) * 1000, watch_modes=True)
    symmetry = weight_symmetry(model)
    found: dict[str, int] = {}

    def inspect(i: int, out: Any, loss: Any) -> None:
        if i == 0:  # what only the first step can show: the set-up and the loss's kind
            _check_loss(loss)
            dim = _class_dim(loss_fn, out, y_first[0])
            if dim is not None:
                found.update(classes=logits_of(out).shape[dim], class_dim=dim)

    y_first: list[Any] = []
    lrs: list[float] = []
    targets: list[Tensor] = []

    def next_batch(i: int) -> tuple[Any, Any]:
        if i == steps // 2:
            probes.reset_window()  # dead units: the second half of the steps
        if i > 0 and scheduler is not None:
            scheduler.step()  # after the previous step's optimizer.step()
        lrs.append(_lr(optimizer) or math.nan)
        x, y = next(stream)
        if i == 0:
            y_first.append(y)
        if verify:
            seen.append((x, y))
        if isinstance(y, Tensor) and not y.is_floating_point() and y.numel():
            targets.append(y.detach().reshape(-1))
        return x, y

    engine = EagerEngine(model, optimizer, loss_fn, inspect=inspect, guard=False)
    crash: Finding | None = None
    device = next(iter(model.parameters()), torch.empty(0)).device
    with probes:
        try:
            # the user's optimizer keeps its own lr (and scheduler); a NaN is the
            # user's loop's to meet, as it would without the doctor
            plain = Schedule(steps, print_every=steps + 1, on_nonfinite="continue")
            loop(engine, next_batch, plain, device=device, monitor=probes)
        except PlumbError:
            raise
        except Exception as exc:  # the user's code failed: at step 0 it is the set-up
            if probes.step_count == 0:
                raise PlumbError(
                    f"diagnose could not run one training step: {type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''}"
                ) from None
            crash = _crash(probes.step_count, exc)
    classes, class_dim = found.get("classes"), found.get("class_dim", 1)
    test = None
    healthy = crash is None and len(probes.history.loss) and np.isfinite(probes.history.loss[-1])
    held: list[tuple[Any, Any]] = []
    # Under torch.distributed rank 0 runs the lr test on copies of the unwrapped module
    # with its own batches (no collectives; not for sharded parameters), and every rank
    # ends with rank 0's findings (the statistics they rest on are global already).
    sharded = size > 1 and any(is_sharded(p) for p in model.parameters())
    if test_lr and healthy and rank == 0 and not sharded:
        train = [next(stream) for _ in range(LR_TEST_STEPS)]
        held = [next(stream) for _ in range(LR_TEST_EVAL)]
        test = lr_test(
            unwrap(model),
            optimizer,
            loss_fn,
            train,
            held,
            start=probes.step_count,
            scheduler=scheduler,
        )
    ev = gather(
        probes,
        classes=classes,
        class_dim=class_dim,
        softmax_loss=classes is not None,
        lr=_lr(optimizer),
        symmetry_start=symmetry,
        lr_test=test,
        optimizer=optimizer,
        lrs=lrs,
        target_counts=_counts(targets, classes),
    )
    if healthy and rank == 0 and not sharded and needs_input_test(ev):
        held = [next(stream) for _ in range(LR_TEST_EVAL)]
        ev = replace(ev, input_use=input_use(unwrap(model), loss_fn, held), _memo={})
    findings = apply_rules(ev)
    if start is not None and crash is None:
        held = held or [next(stream) for _ in range(LR_TEST_EVAL)]
        findings = verify_findings(
            findings, start, loss_fn, seen, held, lr=ev.lr, suggested_lr=suggested_lr(ev)
        )
    if crash is not None:
        findings.insert(0, crash)
    return from_rank0(_summary(ev, findings, time.perf_counter() - t0))


def _counts(targets: list[Tensor], classes: int | None) -> np.ndarray | None:
    """How often each class was the target (integer targets in [0, classes); others,
    such as an ignore_index of -100, left out)."""
    if not classes or not targets:
        return None
    y = torch.cat([t.cpu().long() for t in targets])
    y = y[(y >= 0) & (y < classes)]
    return torch.bincount(y, minlength=classes).numpy() if y.numel() else None


def input_use(
    model: nn.Module, loss_fn: Callable, batches: list[tuple[Any, Any]], seed: int = 0
) -> tuple[float, float] | None:
    """How much the model's predictions depend on its inputs: the held-out loss with the
    inputs permuted across the batch (each target meets another example's input) minus
    the loss with its own inputs, (mean, standard error) paired over ``batches``. A model
    that ignores its inputs scores the same both ways; one that uses them scores worse
    on permuted inputs. On a copy (no update, the copy in the model's mode: a BatchNorm's
    running statistics are not touched). None when it cannot be run."""
    g = torch.Generator().manual_seed(seed)
    diffs = []
    try:
        model = copy.deepcopy(model)
        with torch.no_grad():
            for x, y in batches:
                if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[0] < 2:
                    return None
                perm = torch.randperm(x.shape[0], generator=g).to(x.device)
                diffs.append(float(loss_fn(model(x[perm]), y)) - float(loss_fn(model(x), y)))
    except Exception:
        return None
    d = np.asarray(diffs)
    if len(d) < 2 or not np.all(np.isfinite(d)):
        return None
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))


def _check_loss(loss: Any) -> None:
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        what = type(loss).__name__ if not isinstance(loss, Tensor) else f"shape {tuple(loss.shape)}"
        raise PlumbError(f"loss_fn must return a scalar tensor, got {what}")
    if not loss.requires_grad:
        raise PlumbError(
            "the loss does not depend on any trainable parameter: check that loss_fn uses "
            "the model's output and that parameters have requires_grad=True"
        )


def _crash(step: int, exc: Exception) -> Finding:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return Finding(
        "non-finite" if "nan" in text.lower() or "inf" in text.lower() else "step-failed",
        "error",
        "model",
        f"training stopped at step {step}: {type(exc).__name__}: {text}",
        {"step": step, "exception": type(exc).__name__},
    )


# --- during training ---------------------------------------------------------------------
def check_cadence(every: int, steps: int | None = None) -> int:
    """Steps between the doctor's checks in a training loop (the one default, for
    ``plumb train``, ``plumb.Monitor`` and the callbacks): at least 1,000 steps and 20
    record steps, so each check has new rows to judge trends on, and, when the run's
    length is known, at most ~20 checks per run (a check flushes and runs every rule)."""
    return max(1000, 20 * every, (steps or 0) // 20)


class Doctor:
    """The same rules inside a training loop, reading a ``Probes`` (``plumb.Monitor(model,
    optimizer=opt, doctor=True)`` builds one).

    ``observe(loss)`` after each ``probes.step(loss)``: the doctor checks after the first
    step (what init shows), every ``check_every`` steps (default ``check_cadence``) and at
    ``finish()``, and calls
    ``on_finding(finding, step)`` for each finding it has not reported before (same code
    and place). ``classes``: the class count of a softmax cross-entropy loss; None: found
    from the first recorded output and its gradient (``softmax_dim``), else the rules
    that need it (overconfident-init, double-softmax) stay silent. ``diagnosis`` holds the latest
    result; a finding stays in it once seen (with its latest evidence)."""

    def __init__(
        self,
        probes: Probes,
        *,
        optimizer: Any = None,
        classes: int | None = None,
        check_every: int | None = None,
        on_finding: Callable[[Finding, int], None] | None = None,
    ):
        self.probes, self.optimizer = probes, optimizer
        self.classes, self.class_dim = classes, 1
        self.softmax_loss = classes is not None
        self.check_every = max(int(check_every or check_cadence(probes.every)), 1)
        self.on_finding = on_finding
        self.reported: dict[tuple[str, str], Finding] = {}
        self.diagnosis: Diagnosis | None = None
        self.symmetry: dict[str, float] = {}
        self.lrs: list[float] = []  # the lr each step used (param group 0)
        self._t0 = time.perf_counter()

    def start(self) -> None:
        self.symmetry = weight_symmetry(self.probes.model)
        self.lrs = [math.nan] * self.probes.step_count  # a resumed record: lrs unknown

    def observe(self, loss: Any) -> None:
        # the step that just ran used this lr (a scheduler steps after the optimizer)
        lr = _lr(self.optimizer)
        self.lrs.append(lr if lr is not None else math.nan)
        n = self.probes.step_count
        if n == 1 or n % self.check_every == 0:
            self.check()

    def check(self) -> Diagnosis:
        self.probes.flush()
        out = self.probes.output
        dim = softmax_dim(out, self.probes.output_grad)
        if dim is not None and (self.classes is None or out.shape[dim] == self.classes):
            self.classes, self.class_dim, self.softmax_loss = out.shape[dim], dim, True
        ev = gather(
            self.probes,
            classes=self.classes,
            class_dim=self.class_dim,
            softmax_loss=self.softmax_loss,
            lr=_lr(self.optimizer),
            symmetry_start=self.symmetry,
            optimizer=self.optimizer,
            lrs=self.lrs,
            target_counts=targets_from_gradient(
                out,
                self.probes.output_grad,
                self.class_dim if self.softmax_loss else None,
                self.classes,
            ),
        )
        self.probes.reset_window()
        findings = from_rank0(apply_rules(ev))  # the same findings on every rank
        for f in findings:
            key = (f.code, f.where)
            if key not in self.reported and self.on_finding is not None:
                self.on_finding(f, ev.steps)
            self.reported[key] = f
        self.diagnosis = _summary(ev, list(self.reported.values()), time.perf_counter() - self._t0)
        return self.diagnosis
