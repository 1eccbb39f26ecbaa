"""The capture half of the probes: the hooks of a record step and what they hold until
``step()``. On a record step every module gets a forward pre-hook and a forward hook
(activation functions called inside modules are seen through a ``TorchFunctionMode``),
every captured output a gradient hook, every parameter a hook that notes what ``p.grad``
held before this backward. A call is held from its backward until ``step()``; past
``hold_bytes`` the held calls of other passes are folded into statistics.

The mode sees every torch call of the forward it covers (~3-5 us each: ~0.6 ms of a GPT
record step, 110 calls). So it covers the whole forward only on discovery steps (the
first record step and every ``REDISCOVER``-th after it); on the others it is active only
while the innermost running module is a host, one whose own forward called an
activation function on a discovery step. A model with no host (the zoo's GPT: its GELU
is a module) then runs its record steps without the mode."""

from __future__ import annotations

import contextlib
import functools
import itertools
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from plumb.dist import is_sharded, local
from plumb.kinds import FUNCTIONAL, WEIGHT_LAYERS
from plumb.probes.graph import first_tensor, logits_of
from plumb.probes.layout import as_rows, dense
from plumb.stats import Plan, Row, RowStats, merge

REDISCOVER = 10  # every 10th record step the functional capture covers whole forwards


@dataclass
class _Pass:
    """One outermost module call: the forward of the model, or of a part of it."""

    forward_only: list[_Call] = field(default_factory=list)  # outputs needing no gradient
    committed: bool = False


@dataclass
class _Call:
    """One captured call, waiting for its backward."""

    seq: int  # capture order within the step (forward order)
    key: str
    kind: str
    out: Tensor  # detached (cloned when in-place modules may change it later)
    inp: Tensor | None  # a weight layer's input (detached)
    pass_: _Pass | None
    preds: frozenset[str] | None = None  # chain discovery: what feeds a weight layer
    done: bool = False

    @property
    def nbytes(self) -> int:
        n = self.out.numel() * self.out.element_size()
        return n + (self.inp.numel() * self.inp.element_size() if self.inp is not None else 0)


class _FunctionalCapture(TorchFunctionMode):
    """Sees activation functions called inside a module's forward (record steps only)."""

    def __init__(self, probes: Capture):
        super().__init__()
        self.probes = probes

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        kind = FUNCTIONAL.get(getattr(func, "__name__", "").rstrip("_"))
        if kind is not None:
            self.probes._functional(kind, out)
        return out


class Capture:
    """Hook lifecycle and capture, the base of ``Probes`` (which sets the state these
    methods read: the model's modules and parameters, what is probed, the cadence)."""

    def _reset_step(self) -> None:
        self._held: list[tuple[_Call, Tensor | None]] = []  # (call, dL/d(output)) reached
        self._held_bytes = 0
        self._held_passes: set[int] = set()  # id() of the passes of the held calls
        self._partials: list[RowStats] = []
        self._seq = itertools.count()
        self._calls: dict[str, int] = {}  # per_call numbering
        self._stack: list[str] = []
        self._pass: _Pass | None = None
        self._mode: _FunctionalCapture | None = None
        self._carried: dict[int, Tensor] = {}  # param index -> |p.grad|^2 before backward
        self._factor: Tensor | float | None = None  # activation-gradient factor, this step
        self._began = False  # the step's backward has begun
        self._scale: Tensor | None = None  # the GradScaler's scale during this backward
        self._passes = 0

    def _arm(self) -> None:
        """Attach hooks for the coming record step and remember the parameters."""
        if not self._is_record(self.step_count) or self._armed or self._external:
            return
        self._armed = True
        self._discover = self._armed_records % REDISCOVER == 0
        self._armed_records += 1
        if not self._handles:  # else kept from the record step before (``_disarm(keep=True)``)
            for name, m in self._named.items():
                if self.functional or name in self._probed or m is self.model:
                    self._handles.append(m.register_forward_pre_hook(self._pre_hook(name)))
                    self._handles.append(
                        m.register_forward_hook(self._post_hook(name), always_call=True)
                    )
            for i, (_, p) in enumerate(self.params):
                self._handles.append(p.register_hook(functools.partial(self._param_grad_in, i)))
        with torch.no_grad():
            for numel, group in self._param_groups.items():
                self._prev[numel] = torch.stack(
                    [local(p.detach()).reshape(-1) for p in group]
                ).float()

    def _disarm(self, keep: bool = False) -> None:
        """End a record step: its state cleared, its hooks removed, or ``keep``-t for the
        next step when that is a record step too (every=1: attaching and removing ~2
        hooks per module each step cost ~1 ms of a GPT's record step). Hooks do nothing
        while not armed."""
        if not keep:
            for h in self._handles:
                h.remove()
            self._handles.clear()
        if self._mode is not None:  # a forward that never returned
            self._exit_mode()
        self._armed = False
        self._prev = {}
        self._reset_step()

    # ----- hooks -------------------------------------------------------------------------
    def _pre_hook(self, name: str):
        def hook(module: nn.Module, args: Any) -> None:
            if not self._armed:  # hooks kept between two record steps (``_disarm``)
                return
            scoped = self.functional and not self._discover
            if not self._stack:
                self._pass = _Pass()
                if self.graph.chains is None:
                    self.graph.new_graph()
                if self.functional and not scoped and torch.is_grad_enabled():
                    self._enter_mode()  # discovery: the whole forward
            if scoped:  # the mode only while a host's own code runs (module docstring)
                if self._mode is not None:
                    self._exit_mode()
                if name in self._hosts and torch.is_grad_enabled():
                    self._enter_mode()
            self._stack.append(name)

        return hook

    def _enter_mode(self) -> None:
        self._mode = _FunctionalCapture(self)
        self._mode.__enter__()

    def _exit_mode(self) -> None:
        mode, self._mode = self._mode, None
        with contextlib.suppress(RuntimeError):  # not the innermost mode: its owner's
            mode.__exit__(None, None, None)

    def _post_hook(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not self._armed:
                return
            if self._stack and self._stack[-1] == name:
                self._stack.pop()
            if self.functional and not self._discover:  # back in the caller: its scope
                if self._mode is not None:
                    self._exit_mode()
                if self._stack and self._stack[-1] in self._hosts and torch.is_grad_enabled():
                    self._enter_mode()
            elif not self._stack and self._mode is not None:
                self._exit_mode()
            if output is None or not torch.is_grad_enabled():
                return
            # Inside an outer module's forward the functional capture's mode is active:
            # plumb's own calls (detach, numel, register_hook, ...) would each pass through
            # it (~270 of the 366 calls it saw in a GPT record step). Values are all that
            # is read here, so no __torch_function__ (mode or subclass) is needed.
            with torch._C.DisableTorchFunction():
                if name in self._probed:
                    kind = self._kind_of[name]
                    inp = first_tensor(args) if kind in WEIGHT_LAYERS else None
                    self._capture(name, kind, output, inp)
                if module is self.model:
                    self._model_io(args, output)

        return hook

    def _functional(self, kind: str, out: Any) -> None:
        if not self._stack or not torch.is_grad_enabled():
            return
        inner = self._stack[-1]
        if inner in self._probed:
            return  # inside a probed module (nn.Tanh calls torch.tanh): its output counts
        key = f"{inner}.{kind}" if inner else kind
        if self._filter is not None and not self._filter(key):
            return
        self._hosts.add(inner)
        self.functional_layers.setdefault(key, kind)
        self._capture(key, kind, out, None)

    def _capture(self, name: str, kind: str, output: Any, inp: Tensor | None) -> None:
        t = first_tensor(output)
        if t is None or not t.is_floating_point() or t.numel() == 0:
            return
        key = name
        if inp is not None and (not inp.is_floating_point() or inp.numel() == 0):
            inp = None
        value = t.detach().clone() if self._clone else t.detach()
        call = _Call(
            next(self._seq), key, kind, value, None if inp is None else inp.detach(), self._pass
        )
        self.kinds.setdefault(key, kind)
        if self.graph.chains is None:
            if kind in WEIGHT_LAYERS:
                call.preds = self.graph.feeds(inp)
            self.graph.note(key, kind, t)
        if t.requires_grad:
            t.register_hook(functools.partial(self._on_grad, call))
        elif self._pass is not None:
            self._pass.forward_only.append(call)

    def _on_grad(self, call: _Call, grad: Tensor) -> None:
        if call.done or not self._armed:
            return  # a second backward through the same graph, or after the step
        call.done = True
        if not self._began:  # the step's backward begins: what FSDP's grads hold now
            self._began = True
            for i, (_, p) in enumerate(self.params):
                if i not in self._carried and is_sharded(p):  # no autograd hook fires
                    self._param_grad_in(i, None)
        factor = self._grad_factor()
        grad = grad.detach() if factor is None else grad.detach().float() * factor
        self._hold(call, grad)
        p = call.pass_
        if p is not None and not p.committed:
            p.committed = True
            self._passes += 1
            for c in p.forward_only:
                self._hold(c, None)
            p.forward_only = []
        if self._held_bytes > self.hold_bytes and len(self._held_passes) > 1:
            self._fold(keep=p)

    def _hold(self, call: _Call, grad: Tensor | None) -> None:
        self._held.append((call, grad))
        self._held_passes.add(id(call.pass_))
        self._held_bytes += call.nbytes + (
            grad.numel() * grad.element_size() if grad is not None else 0
        )
        if call.preds is not None:
            self.graph.link(call.key, call.preds)

    def _grad_factor(self) -> Tensor | float | None:
        """What turns the gradient a hook sees into the global step's unscaled one:
        1/scale under a GradScaler (read at the step's first gradient: the scale of
        this backward, no host sync), times 1/world under DDP/FSDP (they average the
        ranks' gradients). None when it is 1."""
        if self._factor is None:
            factor: Tensor | float = 1.0 / self.world
            scaler = self.scaler
            if scaler is not None and scaler.is_enabled() and scaler._scale is not None:
                self._scale = scaler._scale.detach().clone()
                factor = self._scale.double().reciprocal().float() * factor
            self._factor = factor
        factor = self._factor
        return None if isinstance(factor, float) and factor == 1.0 else factor

    def _skipped(self) -> bool:
        """True when the GradScaler skipped this step (it backs its scale off after a
        step with inf/NaN gradients): one host read, on record steps only."""
        if self.scaler is None or self._scale is None or not self.scaler.is_enabled():
            return False
        return bool((self.scaler._scale < self._scale).item())

    def _param_grad_in(self, i: int, grad: Tensor | None) -> None:
        """A parameter's gradient arrives: what ``p.grad`` held before it (first arrival of
        the step) is what was not cleared."""
        if i in self._carried or not self._armed:
            return
        p = self.params[i][1]
        if p.grad is None:  # cleared (set_to_none): one zero per device, shared
            device = local(p).device
            zero = self._zeros.get(device)
            if zero is None:
                zero = self._zeros[device] = torch.zeros((), dtype=torch.float32, device=device)
            self._carried[i] = zero
        else:
            self._carried[i] = dense(local(p.grad)).detach().float().square().sum()

    def _model_io(self, args: Any, output: Any) -> None:
        """The model's input scale (first record step) and its first recorded output."""
        x = first_tensor(args)
        if self.model_input is None and x is not None and x.is_floating_point() and x.numel() > 1:
            x = x.detach().float()
            flat = x.movedim(1, -1).reshape(-1, x.shape[1]) if x.dim() > 1 else x.reshape(-1, 1)
            per_feature = flat.square().mean(0).sqrt()
            self.model_input = torch.stack(
                [x.square().mean().sqrt(), x.mean(), x.std(), per_feature.amax()]
            )
        y = logits_of(output)
        if self.output is None and y is not None and y.is_floating_point() and y.requires_grad:
            y.register_hook(functools.partial(self._first_output, y.detach()))
        if self.loss_graph is None and y is not None and y.grad_fn is not None:
            self._output_node = y.grad_fn  # read by step(loss): what the loss did to it

    def _first_output(self, y: Tensor, grad: Tensor) -> None:
        if self.output is None and self._armed:
            self.output = y.float().cpu()
            self.output_grad = grad.detach().float().cpu()

    # ----- reducing what is held -----------------------------------------------------------
    def _fold(self, keep: _Pass | None) -> None:
        """Reduce held calls (all but those of the pass ``keep``) to statistics: the memory
        bound. Histograms then cover only the calls still held."""
        fold = [(c, g) for c, g in self._held if c.pass_ is not keep]
        if not fold:
            return
        self._held = [(c, g) for c, g in self._held if c.pass_ is keep]
        self._held_passes = {id(keep)} if self._held else set()
        self._held_bytes = sum(
            c.nbytes + (g.numel() * g.element_size() if g is not None else 0) for c, g in self._held
        )
        rows, tensors = self._layer_rows(fold)
        plan = self._plan(rows, tensors)
        stats, _, _ = plan.row_stats(tensors, {}, stacks=False)
        self._partials.append(stats)
        if len(self._partials) > 8:  # keep the list short: partials merge associatively
            merged = merge(self._partials)
            self._partials = [as_rows(merged)]
        if not self._warned_hold and self._passes > 1000:
            self._warned_hold = True
            warnings.warn(
                f"plumb: {self._passes} backward passes since the last Monitor.step(): they "
                "are pooled into one record step; call mon.step(loss) once per optimizer step",
                stacklevel=2,
            )

    def _layer_rows(
        self, held: list[tuple[_Call, Tensor | None]]
    ) -> tuple[list[Row], list[Tensor]]:
        rows, tensors = [], []
        for call, grad in sorted(held, key=lambda cg: cg[0].seq):
            if self.per_call:  # numbered among the recorded calls, in forward order
                n = self._calls.get(call.key, 0) + 1
                self._calls[call.key] = n
                call.key = call.key if n == 1 else f"{call.key}#{n}"
                self.kinds.setdefault(call.key, call.kind)
            shape = tuple(call.out.shape)
            rows.append(Row("layer", call.key, shape, call.kind))
            tensors.append(call.out)
            if grad is not None and grad.shape == call.out.shape:
                rows.append(Row("layer_grad", call.key, shape, call.kind))
                tensors.append(grad)
            if call.inp is not None:
                rows.append(Row("layer_in", call.key, tuple(call.inp.shape)))
                tensors.append(call.inp)
        return rows, tensors

    def _plan(self, rows: list[Row], tensors: list[Tensor]) -> Plan:
        signature = tuple(rows)
        plan = self._plans.get(signature)
        if plan is None:
            if len(self._plans) > 16:  # shapes keep changing: do not grow without bound
                self._plans.clear()
            device = tensors[0].device if tensors else torch.device("cpu")
            plan = self._plans[signature] = Plan(rows, self.bins, self.saturation_layer, device)
        return plan
