"""The fused engine's step in C on the CPU (``mlpstep.c``, built by ``plumb.native``).

``plumb.fused.FusedStep`` runs its plain steps here when it can (``NativeStep.usable``):
float32 CPU tensors, a C compiler, and the ``sgemm`` of torch's own BLAS. The step is the
one of ``plumb.fused.forward_backward`` and its updates, the same formulas, in one call
with no allocation: on this machine (2-core AMD EPYC, 1 thread) a lecture-deep step at
batch 32 takes ~190 us against ~370 us for the compiled graph, whose matmuls alone take
~180 us as a graph (``bench/bench_step.py``). It needs no compile.

The tensors it writes (each block's pre-activation, normalised values, activation and
their gradients, the parameters' gradients) are torch tensors held here, allocated once
per batch size; parameters, buffers and AdamW's state are the model's and optimizer's
own, updated in place. AdamW's state is looked up again whenever the optimizer's state
tensors are not the ones last seen (``load_state_dict`` replaces them).
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch
from torch import Tensor

from plumb import native

NORMS = {"none": 0, "batch": 1, "lecture-batch": 2, "layer": 3}
ACTIVATIONS = {"linear": 0, "tanh": 1, "sigmoid": 2, "relu": 3, "leaky_relu": 4}

_P = ctypes.c_void_p
MAX_VALUES = 32 * 1024  # a block's B x width that runs here with any number of threads


class _Layer(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int64) for n in ("fi", "fo", "norm", "act", "correction")]
    _fields_ += [(n, ctypes.c_float) for n in ("eps", "momentum", "slope", "pad")]
    _fields_ += [
        (n, _P)
        for n in (
            *("W", "b", "gamma", "beta", "rm", "rv", "dW", "db", "dgamma", "dbeta", "h"),
            *("z", "y", "xhat", "invstd", "a", "da", "dy", "dz", "dh", "scratch"),
        )
    ]


class _Param(ctypes.Structure):
    _fields_ = [(n, _P) for n in ("p", "g", "m", "v", "upd")] + [("n", ctypes.c_int64)]


class _Net(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int64) for n in ("B", "T", "E", "V", "n_layers", "n_params")]
    _fields_ += [("adamw", ctypes.c_int64)]
    _fields_ += [(n, _P) for n in ("C", "dC", "emb", "layers", "params", "steps", "ids", "targets")]
    _fields_ += [(n, ctypes.c_float) for n in ("beta1", "beta2", "adam_eps", "weight_decay")]
    _fields_ += [("sgemm", _P)]


def _ids(t: Tensor) -> Tensor:
    """``t`` as the C step reads ids: uint8 or int64, contiguous (as plumb's datasets keep
    them: no copy), else an int64 copy."""
    if t.dtype in (torch.uint8, torch.int64) and t.is_contiguous():
        return t
    return t.long().contiguous()


_data_ptr = Tensor.data_ptr


def _ok(t: Tensor) -> bool:
    return t.dtype is torch.float32 and t.is_cpu and t.is_contiguous()


class Workspace:
    """The tensors one batch size needs, and the C structures that point at them.

    ``blocks[k]``: per block, ``h`` (its input), ``z``, ``y``, ``xhat``, ``invstd``, ``a``,
    and the gradients ``dz``, ``dy``, ``da``, ``dh`` (y is z without a norm, a is y for a
    linear activation, and the same for their gradients); ``grads``: the parameters'
    gradients in ``params`` order; ``updates``: their updates (value after - value before,
    in float32) of the last measured step."""

    def __init__(self, step: NativeStep, B: int):
        self.B = B
        specs, params, buffers = step.specs, step.params, step.buffers
        E = params[0].shape[1]
        self.emb = torch.zeros(B, step.block_size * E)
        self.grads = [torch.zeros_like(p) for p in params]
        self.updates = [torch.zeros_like(p) for p in params]
        self.blocks: list[dict[str, Tensor]] = []
        self._layers = (_Layer * len(specs))()
        self._params = (_Param * len(params))()
        self._steps = (_P * len(params))()
        h, dh = self.emb, torch.zeros_like(self.emb)
        self.demb = dh
        for s, L in zip(specs, self._layers, strict=True):
            fi, fo = params[s.weight].shape
            z, dz = torch.zeros(B, fo), torch.zeros(B, fo)
            blk = {"h": h, "dh": dh, "z": z, "dz": dz}
            if s.norm == "none":
                blk.update(y=z, dy=dz, xhat=z, invstd=z)
            else:
                width = fo if s.norm != "layer" else B
                blk.update(y=torch.zeros(B, fo), dy=torch.zeros(B, fo))
                blk.update(xhat=torch.zeros(B, fo), invstd=torch.zeros(width))
            if s.activation == "linear":
                blk.update(a=blk["y"], da=blk["dy"])
            else:
                blk.update(a=torch.zeros(B, fo), da=torch.zeros(B, fo))
            blk["scratch"] = torch.zeros(2 * fo)
            self.blocks.append(blk)
            L.fi, L.fo, L.correction = fi, fo, s.correction
            L.norm, L.act = NORMS[s.norm], ACTIVATIONS[s.activation]
            L.eps, L.momentum, L.slope = s.eps, s.momentum, s.slope

            def ptr(i: int | None, ts: list[Tensor]) -> int | None:
                return None if i is None else ts[i].data_ptr()

            L.W, L.dW = ptr(s.weight, params), ptr(s.weight, self.grads)
            L.b, L.db = ptr(s.bias, params), ptr(s.bias, self.grads)
            L.gamma, L.dgamma = ptr(s.gamma, params), ptr(s.gamma, self.grads)
            L.beta, L.dbeta = ptr(s.beta, params), ptr(s.beta, self.grads)
            if s.buffers:
                L.rm, L.rv = ptr(s.buffers[0], buffers), ptr(s.buffers[1], buffers)
            for name in ("h", "z", "y", "xhat", "invstd", "a", "da", "dy", "dz", "dh", "scratch"):
                setattr(L, name, blk[name].data_ptr())
            h, dh = blk["a"], blk["da"]
        for P, p, g, u in zip(self._params, params, self.grads, self.updates, strict=True):
            P.p, P.g, P.upd, P.n = p.data_ptr(), g.data_ptr(), u.data_ptr(), p.numel()
        net = self.net = _Net()
        net.B, net.T, net.E, net.V = B, step.block_size, E, params[0].shape[0]
        net.n_layers, net.n_params, net.adamw = len(specs), len(params), int(step.adamw)
        net.C, net.dC, net.emb = params[0].data_ptr(), self.grads[0].data_ptr(), self.emb.data_ptr()
        net.layers = ctypes.addressof(self._layers)
        net.params = ctypes.addressof(self._params)
        net.steps = ctypes.addressof(self._steps)
        self.ids = torch.zeros(B, step.block_size, dtype=torch.int64)
        self.targets = torch.zeros(B, dtype=torch.int64)
        net.ids, net.targets = self.ids.data_ptr(), self.targets.data_ptr()
        if step.adamw:
            net.beta1, net.beta2, net.adam_eps, net.weight_decay = step.hyper
        else:
            net.weight_decay = step.weight_decay
        net.sgemm = native.sgemm()
        self.ref = ctypes.byref(net)
        self.state: list[Any] = []  # AdamW's tensors the pointers were taken from
        # the parameters' and buffers' storage the pointers were taken from: a tensor
        # whose ``.data`` was replaced since gets a new workspace (NativeStep.__call__)
        self.ptrs = [t.data_ptr() for t in (*params, *buffers)]
        self.runs = True  # batches of this size run here (NativeStep.runs_at)
        self._measured: list[Tensor] | None = None

    def measured(self, specs: list[Any], params: list[Tensor], block_size: int) -> list[Tensor]:
        """The tensors a fused record step measures, in ``plumb.fused.forward_backward``'s
        order and shapes (each layer's output and its gradient, the weight layers' inputs,
        each parameter and its gradient): views of this workspace and the parameters."""
        if self._measured is None:
            B, E = self.B, params[0].shape[1]
            emb, demb = self.emb.view(B, block_size, E), self.demb.view(B, block_size, E)
            ts = [emb, demb, self.emb, self.demb]
            for s, blk in zip(specs, self.blocks, strict=True):
                _, norm, act = s.modules
                ts += [blk["z"], blk["dz"]]
                ts += [blk["y"], blk["dy"]] if norm is not None else []
                ts += [blk["a"], blk["da"]] if act is not None else []
            ts += [blk["h"] for blk in self.blocks]
            ts += [t for p, g in zip(params, self.grads, strict=True) for t in (p, g)]
            self._measured = ts
        return self._measured

    def bind_state(self, state: list[dict[str, Tensor]]) -> bool:
        """Point at AdamW's current state tensors (False: one is not float32 contiguous
        CPU, the step cannot run here)."""
        tensors = [(s["exp_avg"], s["exp_avg_sq"], s["step"]) for s in state]
        if any(not _ok(t) for ts in tensors for t in ts):
            return False
        for P, slot, (m, v, t) in zip(self._params, range(len(state)), tensors, strict=True):
            P.m, P.v = m.data_ptr(), v.data_ptr()
            self._steps[slot] = t.data_ptr()
        self.state = [t for ts in tensors for t in ts]
        return True


def usable(params: list[Tensor], buffers: list[Tensor]) -> bool:
    """The step can run in C: float32 CPU parameters and buffers, plumb.native built,
    torch's sgemm found."""
    if not all(_ok(t) for t in (*params, *buffers)):
        return False
    return native.available() and native.sgemm() is not None


def runs_at(specs: list[Any], params: list[Tensor], B: int) -> bool:
    """Whether batches of ``B`` run in C: with at most 2 torch threads (measured on this
    2-core machine, ``bench_step.py --scaling``: the C step at most as slow as the graph
    at every size, 0.58x at lecture-deep's, 0.95-0.99x from 512 x 320 up, at 2 threads),
    else only while every block's values are at most MAX_VALUES: the C step's loops
    outside the matmuls use one thread, and with many threads on large blocks the
    graph's threaded kernels would win."""
    widest = max(params[s.weight].shape[1] for s in specs)
    return torch.get_num_threads() <= 2 or B * widest <= MAX_VALUES


class NativeStep:
    """``step(X, Y, lr, measure=False) -> (loss, ok)``: a ``FusedStep``'s step in C, on
    its specs, flat parameter and buffer lists and optimizer settings. ``ok`` False: a
    non-finite loss or gradient, nothing updated but the running statistics. With
    ``measure``, the workspace keeps each parameter's update (``Workspace.updates``)."""

    def __init__(self, fused: Any):
        self.specs, self.params, self.buffers = fused.specs, fused.params, fused.buffers
        self.block_size = fused.model.config.block_size
        self.adamw, self.hyper, self.weight_decay = fused.adamw, fused.hyper, fused.weight_decay
        self.state: list[dict[str, Tensor]] = fused.state
        self.work: Workspace | None = None
        self._tensors = [*self.params, *self.buffers]
        self._true, self._false = torch.tensor(True), torch.tensor(False)

    @staticmethod
    def usable(fused: Any) -> bool:
        """The step of ``fused`` (a FusedStep) can run in C (``usable``)."""
        return usable(fused.params, fused.buffers)

    def runs_at(self, B: int) -> bool:
        """Whether batches of ``B`` run here (``runs_at``)."""
        return runs_at(self.specs, self.params, B)

    def _state_ok(self, work: Workspace) -> bool:
        if not self.adamw:
            return True
        now = [t for s in self.state for t in (s["exp_avg"], s["exp_avg_sq"], s["step"])]
        if len(now) == len(work.state) and all(
            a is b for a, b in zip(now, work.state, strict=True)
        ):
            return True
        return work.bind_state(self.state)

    def __call__(
        self, X: Tensor, Y: Tensor, lr: float, measure: bool = False
    ) -> tuple[Tensor, Tensor] | None:
        """(loss, ok), or None when this call cannot run here (the caller runs the graph)."""
        B = X.shape[0]
        work = self.work
        # ~2 us a step: the C step writes where the pointers point, so a parameter or
        # buffer whose storage was replaced (``p.data = ...``, ``.half()``) must not be
        # written through the old pointers (freed memory)
        if work is None or work.B != B or list(map(_data_ptr, self._tensors)) != work.ptrs:
            self.work = None
            if not usable(self.params, self.buffers):
                return None
            work = self.work = Workspace(self, B)
            work.runs = self.runs_at(B)
            if self.adamw and not work.bind_state(self.state):
                return None
        elif not self._state_ok(work):
            return None
        if not work.runs:
            return None
        ids, tgt = _ids(X), _ids(Y)
        if not ids.is_cpu or ids.shape != (B, self.block_size) or tgt.shape != (B,):
            return None
        loss = torch.empty(())
        widths = 16 * ids.element_size() + tgt.element_size()
        rc = native._step(
            work.ref, ids.data_ptr(), tgt.data_ptr(), widths, lr, measure, loss.data_ptr()
        )
        if rc < 0:
            what = "an id outside the embedding" if rc == -1 else "a target outside the output"
            raise IndexError(f"the batch holds {what} (index out of range in self)")
        return loss, self._true if rc else self._false
