"""plumb doctor: turn the probes' statistics into findings with evidence and a fix.

    diag = plumb.diagnose(model, batches, loss_fn, optimizer, steps=100)
    print(diag)            # readable summary
    diag.findings          # [Finding(code, severity, where, message, evidence)]
    diag.codes, diag.ok, diag.suggested_lr, diag.to_json()

``diagnose`` *trains the model in place* for ``steps`` steps (forward, loss, backward,
``optimizer.step()``) with a ``Monitor`` recording every step and the doctor's own hooks
(``watch.py``) attached, then applies the rules (``rules.py``). Step 0's loss is the loss
before the first update. The model is used in the mode it is given (``diagnose`` does not
call ``model.train()``: a BatchNorm left in eval mode is one of the things it finds).
It never raises because the model misbehaves (NaN, Inf, layers it does not know): it
reports what it saw. The rules and the principle behind each threshold are in
``rules.py``; ``Doctor`` runs the same rules during ``plumb train``.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from plumb.doctor.evidence import Evidence
from plumb.doctor.rules import CODES, Finding, apply_rules, sort_findings, suggested_lr
from plumb.doctor.watch import Watch
from plumb.errors import PlumbError
from plumb.init import expected_initial_loss
from plumb.probes import Monitor

__all__ = ["CODES", "Diagnosis", "Doctor", "Finding", "diagnose"]


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
    evidence: Evidence | None = field(default=None, repr=False)

    @property
    def codes(self) -> set[str]:
        return {f.code for f in self.findings}

    @property
    def ok(self) -> bool:
        """No finding with severity error or warning."""
        return not any(f.severity in ("error", "warning") for f in self.findings)

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
            "codes": sorted(self.codes),
            "findings": [f.to_dict() for f in self.findings],
        }

    def to_json(self) -> str:
        """Stable JSON: sorted keys, findings ordered by severity, code, place."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def __str__(self) -> str:
        head = f"plumb doctor: {len(self.findings)} finding(s) in {self.steps} steps"
        lines = [head + (" - healthy" if self.ok else "")]
        exp = f" (expected {self.expected_initial_loss:.3f})" if self.expected_initial_loss else ""
        lines.append(f"  loss {self.initial_loss:.4g}{exp} -> {self.final_loss:.4g}")
        if self.suggested_lr is not None:
            lines.append(f"  suggested lr (median update:data -> 1e-3): {self.suggested_lr:g}")
        for f in self.findings:
            lines.append(f"  [{f.severity}] {f.code} @ {f.where}: {f.message}")
        return "\n".join(lines)


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


def _loss_is_softmax(loss_fn: Callable, out: Any, y: Any) -> bool:
    """Is the loss invariant to adding a constant to each row of the output (along the
    class dim 1)? Softmax cross-entropy is; MSE, NLL, BCE are not."""
    if not isinstance(out, Tensor) or not out.is_floating_point() or out.dim() < 2:
        return False
    try:
        with torch.no_grad():
            base = float(loss_fn(out, y))
            g = torch.Generator(device="cpu").manual_seed(0)
            shape = (out.shape[0],) + (1,) * (out.dim() - 1)
            c = (1 + 3 * torch.rand(shape, generator=g)).to(out.device, out.dtype)
            shifted = float(loss_fn(out + c, y))
    except Exception:  # a loss that cannot take the shifted output: not a softmax loss
        return False
    return math.isfinite(base) and abs(shifted - base) <= 1e-4 * (1 + abs(base))


def _lr(optimizer: Any) -> float | None:
    try:
        lr = optimizer.param_groups[0]["lr"]
        return float(lr)
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        return None


# --- the evidence from a Monitor and a Watch --------------------------------------------
def gather(
    monitor: Monitor,
    watch: Watch,
    *,
    classes: int | None,
    softmax_loss: bool | None,
    lr: float | None,
) -> Evidence:
    """The host-side evidence so far: the Monitor's history and what the watch saw."""
    seen = watch.collect()
    history = monitor.history
    rows = history.rows if history is not None else []
    loss = history.loss.astype(np.float64) if history is not None else np.empty(0)
    kinds = dict(watch.kinds)  # every named module; NAME#k (a later call) is NAME's kind
    for key in monitor.order:
        kinds.setdefault(key, kinds.get(key.partition("#")[0], "other"))
    return Evidence(
        loss=loss,
        rows=rows,
        order=list(monitor.order),
        kinds=kinds,
        shapes=dict(monitor.shapes),
        params=monitor.meta()["params"],
        seen=seen,
        classes=classes,
        softmax_loss=softmax_loss,
        lr=lr,
        steps=monitor.step_count,
    )


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
        evidence=ev,
    )


# --- diagnose ---------------------------------------------------------------------------
def diagnose(
    model: nn.Module,
    batches: Iterable[tuple[Any, Any]] | Callable[[], tuple[Any, Any]],
    loss_fn: Callable[[Any, Any], Tensor],
    optimizer: torch.optim.Optimizer,
    steps: int = 100,
) -> Diagnosis:
    """Train ``model`` in place for ``steps`` steps with probes attached and diagnose it.

    ``batches``: an iterable of ``(inputs, targets)`` (cycled when shorter than ``steps``),
    a zero-argument callable returning one, or a single ``(inputs, targets)`` pair.
    ``loss_fn(model(inputs), targets)`` must return a scalar tensor; ``optimizer`` is any
    ``torch.optim`` optimizer over the model's parameters. Returns a :class:`Diagnosis`.
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
    stream = _batch_stream(batches)
    t0 = time.perf_counter()
    monitor = Monitor(model, 1, hist_every=max(steps, 1) * 1000, report=False)
    classes, softmax_loss = None, None
    crash: Finding | None = None
    with monitor, Watch(model) as watch:
        for step in range(steps):
            x, y = next(stream)
            if step == steps // 2:
                watch.reset_window()  # dead units: the second half of the steps
            try:
                out = model(x)
                loss = loss_fn(out, y)
                if step == 0:
                    _check_loss(loss)
                    softmax_loss = _loss_is_softmax(loss_fn, out, y)
                    classes = out.shape[1] if softmax_loss else None
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            except PlumbError:
                raise
            except Exception as exc:  # the user's code failed: at step 0 it is the set-up
                if step == 0:
                    raise PlumbError(
                        f"diagnose could not run one training step: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}"
                    ) from None
                crash = _crash(step, exc)
                break
            monitor.step(loss)
            watch.step()
    ev = gather(monitor, watch, classes=classes, softmax_loss=softmax_loss, lr=_lr(optimizer))
    findings = apply_rules(ev)
    if crash is not None:
        findings.insert(0, crash)
    return _summary(ev, findings, time.perf_counter() - t0)


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
class Doctor:
    """The same rules during a training loop, beside a ``Monitor``.

    Call ``step()`` after ``monitor.step(loss)``; the doctor checks after the first step
    (what init shows) and every ``check_every`` steps, and calls ``on_finding(finding,
    step)`` for each finding it has not reported before (same code and place)."""

    def __init__(
        self,
        monitor: Monitor,
        *,
        optimizer: Any = None,
        classes: int | None = None,
        softmax_loss: bool = True,
        check_every: int = 1000,
        on_finding: Callable[[Finding, int], None] | None = None,
    ):
        self.monitor, self.optimizer = monitor, optimizer
        self.classes, self.softmax_loss = classes, softmax_loss
        self.check_every = max(int(check_every), 1)
        self.on_finding = on_finding
        self.watch = Watch(monitor.model)
        self.reported: dict[tuple[str, str], Finding] = {}
        self.diagnosis: Diagnosis | None = None
        self._t0 = time.perf_counter()

    def __enter__(self) -> Doctor:
        self.watch.__enter__()
        self.watch.record = self.monitor._is_record(self.monitor.step_count)
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None or exc[0] is KeyboardInterrupt:
            self.check()
        self.watch.__exit__(*exc)

    def step(self) -> None:
        self.watch.step()
        n = self.monitor.step_count
        if n == 1 or n % self.check_every == 0:
            self.check()
        self.watch.record = self.monitor._is_record(n)

    def check(self) -> Diagnosis:
        self.monitor.flush()
        ev = gather(
            self.monitor,
            self.watch,
            classes=self.classes,
            softmax_loss=self.softmax_loss,
            lr=_lr(self.optimizer),
        )
        self.watch.reset_window()
        findings = apply_rules(ev)
        for f in findings:
            key = (f.code, f.where)
            if key not in self.reported and self.on_finding is not None:
                self.on_finding(f, ev.steps)
            self.reported[key] = f
        # A finding stays in the report once seen (with its latest evidence).
        all_findings = list(self.reported.values())
        self.diagnosis = _summary(ev, all_findings, time.perf_counter() - self._t0)
        return self.diagnosis
