"""Probes: hooks that record activations, gradients and updates of any ``torch.nn.Module``.

    with plumb.Monitor(model, out="runs/mine") as mon:
        for xb, yb in batches:
            loss = loss_fn(model(xb), yb)
            opt.zero_grad(); loss.backward(); opt.step()
            mon.step(loss)

On a *record step* (``step % every == 0``) the Monitor measures, per leaf module (named by
``model.named_modules()``) and per parameter:

    output      mean, std; saturated = P(|t| > 0.97) for tanh (the lecture's threshold),
                P(s < 0.015 or s > 0.985) for sigmoid (the same point, since
                s = (1 + tanh(x/2)) / 2: the local gradient is < 6% of its maximum there);
                zero = P(y <= 0) for the ReLU family (exactly zero for ReLU, the leaky side
                for LeakyReLU); dead = fraction of units saturated (or zero) for *every*
                example of the batch (unit = feature dim; channel dim for NCHW)
    out-grad    mean, std of dL/d(output)
    parameter   std(p), mean and std of p.grad, grad:data = std(grad) / std(p), and
                update:data = log10(std(p_t - p_{t-1}) / std(p_t)), the optimizer's actual
                change (right for SGD, momentum, Adam alike; for SGD it is the lecture's
                log10(std(lr * grad) / std(p)))

and, every ``hist_every`` steps, histograms (``bins`` bins over [min, max], as
``torch.histogram``) of outputs, output gradients and parameter gradients, plus a
saturation map (examples x units) of one layer. The loss is kept every step.

Cost: hooks are attached only for record steps (a step in between runs the bare model);
statistics of tensors with the same number of elements are computed together on stacked
rows, and everything stays on the device until ``flush()`` (every ``flush_every`` steps)
copies it to the host: no per-step host synchronisation.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from plumb import nn as pnn
from plumb.errors import PlumbError
from plumb.stats import (
    RECTIFYING,
    SATURATING,
    SIGMOID_SATURATION,
    TANH_SATURATION,
    Plan,
    Row,
)

_KINDS: list[tuple[tuple[type, ...], str]] = [
    ((nn.Linear, pnn.Linear), "linear"),
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d), "conv"),
    ((nn.Embedding, pnn.Embedding), "embedding"),
    (
        (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, pnn.BatchNorm1d, pnn.LectureBatchNorm1d),
        "batchnorm",
    ),
    ((nn.LayerNorm, pnn.LayerNorm), "layernorm"),
    ((nn.GroupNorm,), "groupnorm"),
    ((nn.Tanh, pnn.Tanh), "tanh"),
    ((nn.Sigmoid, pnn.Sigmoid), "sigmoid"),
    ((nn.ReLU, nn.ReLU6, pnn.ReLU), "relu"),
    ((nn.LeakyReLU, pnn.LeakyReLU), "leaky_relu"),
    ((nn.GELU,), "gelu"),
    ((nn.SiLU,), "silu"),
    ((nn.Flatten, pnn.Flatten), "flatten"),
]

_ACTIVE: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # models with a Monitor attached


def layer_kind(module: nn.Module) -> str:
    """What the probes know a module as (``"other"``: recorded generically)."""
    for types, kind in _KINDS:
        if isinstance(module, types):
            return kind
    return "other"


@dataclass
class LayerInfo:
    name: str
    type: str
    kind: str


@dataclass
class Snapshot:
    """What one record step measured, still on the device (see ``Monitor.flush``)."""

    step: int
    plan: Plan  # keys, scales and hist_keys of the values
    values: Tensor
    hist: Tensor | None = None  # (len(plan.hist_keys), bins) counts
    hist_range: Tensor | None = None  # (len(plan.hist_keys), 2) [min, max]
    satmap: Tensor | None = None  # (examples, units) fraction saturated/zero


class Monitor:
    """Record activation, gradient and update statistics of ``model`` while it trains.

    ``every``: record-step cadence of the scalar statistics (step 0 is always recorded).
    ``hist_every``: cadence of histograms and the saturation map (default ``10 * every``;
    must be a multiple of ``every``). ``layers``: qualified names (or a predicate on the
    name) of the modules to probe (default: every leaf module). ``saturation_layer``: the
    layer for the saturation map (default: the first tanh/sigmoid, else ReLU-family layer).
    ``out``: run directory; the record goes to ``out/probes/`` and, with ``report=True``,
    an HTML report to ``out/report.html`` when the ``with`` block ends.

    Call ``step(loss)`` once per training step, after ``optimizer.step()`` and before the
    next ``zero_grad`` (it reads ``p.grad``).
    """

    def __init__(
        self,
        model: nn.Module,
        every: int = 50,
        *,
        hist_every: int | None = None,
        bins: int = 64,
        layers: Iterable[str] | Callable[[str], bool] | None = None,
        saturation_layer: str | None = None,
        out: str | Path | None = None,
        report: bool = True,
        flush_every: int = 1000,
        sinks: Iterable[Any] = (),
    ):
        if not isinstance(model, nn.Module):
            raise PlumbError(f"Monitor needs a torch.nn.Module, got {type(model).__name__}")
        for label, value in (("every", every), ("bins", bins), ("flush_every", flush_every)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PlumbError(f"{label} must be an integer >= 1, got {value!r}")
        hist_every = 10 * every if hist_every is None else hist_every
        if not isinstance(hist_every, int) or hist_every < 1 or hist_every % every:
            raise PlumbError(
                f"hist_every must be a positive multiple of every={every}, got {hist_every!r}"
            )
        self.model = getattr(model, "_orig_mod", model)  # a torch.compile'd module: its original
        self.every, self.hist_every, self.bins, self.flush_every = (
            every,
            hist_every,
            bins,
            flush_every,
        )
        self.params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if not self.params:
            raise PlumbError(
                f"{type(self.model).__name__} has no trainable parameters: nothing to monitor"
            )
        self.layers = self._select_layers(layers)
        self.saturation_layer = self._pick_saturation_layer(saturation_layer)
        # In-place modules (ReLU(inplace=True)) overwrite the previous layer's output
        # after its hook ran: then outputs are cloned at capture time.
        self._clone = any(getattr(m, "inplace", False) for m in self.model.modules())
        self.out = Path(out) if out is not None else None
        self.report = report
        self.sinks = list(sinks)
        self.step_count = 0
        self.snapshots: list[Snapshot] = []  # on the device, until flush()
        self._losses: list[Tensor] = []  # per step, on the device, until flush()
        self._handles: list[Any] = []
        self._outputs: dict[str, Tensor] = {}  # layer outputs of the record step (grad retained)
        self._copies: dict[str, Tensor] = {}  # their values, when in-place modules may change them
        self._plans: dict[tuple, Plan] = {}
        self._calls: dict[str, int] = {}
        self._prev: dict[int, Tensor] = {}  # numel -> stacked parameters before the update
        self._param_groups: dict[int, list[Tensor]] = defaultdict(list)
        for _, p in self.params:
            self._param_groups[p.numel()].append(p)
        self.order: list[str] = []  # layer keys of the last record step, in call order
        self.shapes: dict[str, tuple[int, ...]] = {}  # their output shapes
        self._attached = False
        self.writer = None
        self.history = None  # host-side record (plumb.record.History), filled by flush()

    # ----- attach / detach ---------------------------------------------------------
    def _select_layers(self, layers) -> list[LayerInfo]:
        named = dict(self.model.named_modules())
        if layers is None or callable(layers):
            keep = layers or (lambda name: True)
            # leaf modules; the model itself only when it has no children
            chosen = [n for n, m in named.items() if not any(m.children()) and keep(n)]
        else:
            chosen = list(layers)
            missing = [n for n in chosen if n not in named]
            if missing:
                raise PlumbError(
                    f"no module named {', '.join(map(repr, missing))} in the model: "
                    "use names from model.named_modules()"
                )
        return [LayerInfo(n, type(named[n]).__name__, layer_kind(named[n])) for n in chosen]

    def _pick_saturation_layer(self, name: str | None) -> str | None:
        if name is not None:
            if name not in {layer.name for layer in self.layers}:
                raise PlumbError(f"saturation_layer {name!r} is not a probed layer")
            return name
        for kinds in (SATURATING, RECTIFYING):
            for layer in self.layers:
                if layer.kind in kinds:
                    return layer.name
        return None

    def __enter__(self) -> Monitor:
        self.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(write_report=exc[0] is None)

    def restore(self, history: Any, step: int) -> None:
        """Continue a record after ``step`` steps (a resumed run): ``history`` is a
        ``plumb.record.History.restore(...)``. Call before attaching."""
        if self._attached:
            raise PlumbError("Monitor.restore() must come before `with Monitor(...)`")
        self.history, self.step_count = history, step

    def attach(self) -> None:
        if self._attached or self.model in _ACTIVE:
            raise PlumbError(
                f"a Monitor is already attached to this {type(self.model).__name__}: "
                "leave the first `with Monitor(...)` block before opening another"
            )
        _ACTIVE.add(self.model)
        self._attached = True
        if self.out is not None:
            from plumb.record import RecordWriter

            self.writer = RecordWriter(self.out, self.meta())
            if self.history is not None:  # resumed: the record so far, then onwards
                self.writer.rewrite(self.history)
        self._arm()

    def close(self, write_report: bool = True) -> None:
        """Remove every hook, flush what is on the device and write the record."""
        if not self._attached:
            return
        self._release()
        self._attached = False
        _ACTIVE.discard(self.model)
        self.flush()
        if self.writer is not None and self.report and write_report:
            from plumb.report import write_report as _write

            _write(self.out)
        for sink in self.sinks:
            sink.close()

    def meta(self) -> dict[str, Any]:
        return {
            "every": self.every,
            "hist_every": self.hist_every,
            "bins": self.bins,
            "saturation_layer": self.saturation_layer,
            "thresholds": {
                "tanh_saturated": f"|t| > {TANH_SATURATION}",
                "sigmoid_saturated": f"s < {SIGMOID_SATURATION} or s > {1 - SIGMOID_SATURATION}",
                "zero": "y <= 0 (ReLU family)",
            },
            "layers": [vars(layer) for layer in self.layers],
            "params": [
                {"name": n, "shape": list(p.shape), "layer": n.rpartition(".")[0]}
                for n, p in self.params
            ],
            "model": type(self.model).__name__,
        }

    def _is_record(self, step: int) -> bool:
        return step % self.every == 0

    def _arm(self) -> None:
        """Attach hooks (if not attached yet) and remember the parameters, for the coming
        record step."""
        if not self._is_record(self.step_count):
            return
        if not self._handles:
            named = dict(self.model.named_modules())
            for layer in self.layers:
                hook = self._hook(layer.name)
                self._handles.append(named[layer.name].register_forward_hook(hook))
        with torch.no_grad():
            for numel, group in self._param_groups.items():
                self._prev[numel] = torch.stack([p.detach().reshape(-1) for p in group]).float()

    def _release(self, keep_hooks: bool = False) -> None:
        """Forget the captured tensors; remove the hooks unless the next step records too."""
        if not keep_hooks:
            for h in self._handles:
                h.remove()
            self._handles.clear()
        self._outputs, self._copies, self._calls = {}, {}, {}
        self._prev = {}

    def _hook(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not torch.is_grad_enabled():
                return  # an evaluation forward, not the training step
            out = output
            if isinstance(out, tuple | list):
                out = next((t for t in out if isinstance(t, Tensor)), None)
            if not isinstance(out, Tensor) or not out.is_floating_point():
                return
            n = self._calls.get(name, 0) + 1
            self._calls[name] = n
            key = name if n == 1 else f"{name}#{n}"  # a module called more than once
            self._outputs[key] = out
            if self._clone:
                self._copies[key] = out.detach().clone()
            if out.requires_grad:
                out.retain_grad()  # a C++ hook: cheaper than a Python register_hook

        return hook

    # ----- per step ----------------------------------------------------------------
    def step(self, loss: Tensor | float) -> None:
        """Call once per training step, after ``optimizer.step()``."""
        if not self._attached:
            raise PlumbError("Monitor.step() called outside `with Monitor(...)`")
        if isinstance(loss, Tensor):
            self._losses.append(loss.detach().reshape(()))
        else:
            self._losses.append(torch.tensor(float(loss)))
        if self._prev:
            self.snapshots.append(self._measure(self.step_count))
            self._release(keep_hooks=self._is_record(self.step_count + 1))
        self.step_count += 1
        if self.step_count % self.flush_every == 0:
            self.flush()
        self._arm()

    def _rows(self) -> tuple[list[Row], list[Tensor]]:
        rows, tensors = [], []
        kinds = {layer.name: layer.kind for layer in self.layers}
        for key, out in self._outputs.items():
            kind = kinds.get(key.partition("#")[0], "other")
            rows.append(Row("layer", key, tuple(out.shape), kind))
            tensors.append(out.detach() if key not in self._copies else self._copies[key])
            if out.grad is not None:
                rows.append(Row("layer_grad", key, tuple(out.shape), kind))
                tensors.append(out.grad)
        for name, p in self.params:
            rows.append(Row("param", name, tuple(p.shape)))
            tensors.append(p.detach())
            if p.grad is not None:
                rows.append(Row("param_grad", name, tuple(p.shape)))
                tensors.append(p.grad)
        return rows, tensors

    def _measure(self, step: int) -> Snapshot:
        rows, tensors = self._rows()
        self.order = list(self._outputs)
        self.shapes = {k: tuple(t.shape) for k, t in self._outputs.items()}
        signature = tuple(rows)
        plan = self._plans.get(signature)
        if plan is None:
            if len(self._plans) > 16:  # shapes keep changing: do not grow without bound
                self._plans.clear()
            device = tensors[0].device if tensors else torch.device("cpu")
            plan = self._plans[signature] = Plan(rows, self.bins, self.saturation_layer, device)
        hist = step % self.hist_every == 0
        values, counts, ranges, satmap = plan.measure(tensors, self._prev, hist)
        return Snapshot(step, plan, values, counts, ranges, satmap)

    # ----- to the host -------------------------------------------------------------
    def flush(self) -> None:
        """Copy losses and snapshots to the host (one synchronisation) and hand them to
        the record writer and sinks."""
        from plumb.record import History

        if self.history is None:
            self.history = History(self.meta())
        start = self.step_count - len(self._losses)
        losses = torch.stack(self._losses).float().cpu() if self._losses else torch.empty(0)
        snaps = self.snapshots
        self._losses, self.snapshots = [], []
        rows, hists = self.history.add(start, losses, snaps)
        if self.writer is not None:
            self.writer.write(self.history, rows, hists)
        for sink in self.sinks:
            sink.write(self.history, rows, hists)
