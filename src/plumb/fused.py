"""The fused engine: plumb's MLP trained by one function that holds the forward pass, a
backward pass written out by hand (the lecture series' next lesson), the BatchNorm
running-statistics update and the optimizer update, compiled as one graph with
``torch.compile``; on the CPU the same step also exists in C (``plumb.cstep``,
``mlpstep.c``), which runs instead of the graph where it can.

The family it covers (``supports``): ``plumb.models.MLP`` with any norm (batch, layer,
the lecture's batch norm, none), any activation (tanh, relu, leaky_relu, sigmoid,
linear), an optional output norm, trained in training mode with cross-entropy by plumb's
``SGD`` or ``torch.optim.AdamW``. Outside it, the eager engine (autograd) runs.

The math, per hidden layer (h: its input, B: batch, W stored (fan_in, fan_out)); each
norm and activation is one entry of the table of operations below (``NORM_OPS``,
``ACTIVATION_OPS``: a new layer kind is one class there):

    z = h W + b                      dW = h^T dz,  db = sum_b dz,  dh = dz W^T
    batch norm (over the batch, c = 1 for the unbiased variance, else 0):
        xhat = (z - mean) / sqrt(var + eps),  var = sum (z - mean)^2 / (B - c)
        y = gamma xhat + beta        dgamma = sum dy xhat,  dbeta = sum dy
        dz = (dxhat - mean(dxhat) - xhat sum(dxhat xhat) / (B - c)) / sqrt(var + eps),
             dxhat = gamma dy
    layer norm: the same along the features of each example (c = 0)
    a = act(y)                       dy = da * act'(y): tanh 1 - a^2, sigmoid a (1 - a),
                                     relu [y >= 0], leaky_relu [y > 0] + slope [y <= 0]
    output: logits = h W + b [-> norm],  loss = mean(logsumexp(logits) - logits[target])
        dlogits = (softmax(logits) - onehot(target)) / B
    embedding: emb = C[ids],  dC = scatter-add of demb over ids

Updates: SGD ``p <- p + (-lr) g``; AdamW as ``torch.optim.AdamW`` (decoupled weight decay,
bias-corrected moments), on the optimizer's own state tensors so that checkpoints and
resume work unchanged.
"""

from __future__ import annotations

import sys
import threading
import time
import types
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from plumb import cstep
from plumb import nn as pnn
from plumb.cstep import NativeStep
from plumb.kinds import layer_kind
from plumb.models import MLP
from plumb.optim import SGD
from plumb.probes.layout import Measured
from plumb.stats import N_STATS, Plan, Row, RowStats, Stat

COMPILE_OPTIONS = {"cpp_wrapper": True}  # the graph's wrapper in C++: less Python per step


@dataclass(frozen=True)
class LayerSpec:
    """One Linear [-> norm] [-> activation] block, as the fused step needs it: indices
    into the step's flat parameter and buffer lists, and the block's operations by name
    (``NORM_OPS``, ``ACTIVATION_OPS``)."""

    weight: int
    bias: int | None
    modules: tuple[str, str | None, str | None]  # linear, norm, activation (module names)
    norm: str = "none"  # a key of NORM_OPS, or none
    gamma: int | None = None
    beta: int | None = None
    buffers: tuple[int | None, ...] = ()  # running_mean, running_var (or running_std)
    eps: float = 0.0
    momentum: float = 0.0
    correction: int = 0  # 1: the variance that normalises is unbiased
    activation: str = "linear"  # a key of ACTIVATION_OPS (the output block: linear)
    slope: float = 0.01


def _ticker(what: str):
    """On a terminal, a live line while ``what`` runs ("plumb: compiling ... 12 s"),
    once a second; returns the function that ends it. Nothing off a terminal."""
    if not sys.stderr.isatty():
        return None
    done = threading.Event()
    t0 = time.perf_counter()

    def tick() -> None:
        while not done.wait(1.0):
            sys.stderr.write(f"\rplumb: {what} ... {time.perf_counter() - t0:.0f} s")
            sys.stderr.flush()

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()

    def stop() -> None:
        done.set()
        thread.join()
        sys.stderr.write(f"\rplumb: {what}: done in {time.perf_counter() - t0:.0f} s\n")
        sys.stderr.flush()

    return stop


def _mark(path: Any, seconds: float) -> None:
    """Say that this configuration's step is now in inductor's cache (best effort)."""
    import json

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"compile_seconds": round(seconds, 1)}))
    except OSError:
        pass


# --- the table of operations -------------------------------------------------------------
# One entry per layer kind of the fused family: the plumb.nn classes it stands for, what
# the spec keeps of a module, its forward and its hand-written backward (the math in its
# docstring). ``supports``, ``build_spec`` and the probes' names all read this table; a
# module of a kind not in it sends the model to the eager engine, with the reason.


class Activation:
    """a = act(y), backward dy = da * act'(y)."""

    name = ""
    types: tuple[type, ...] = ()

    @staticmethod
    def forward(y: Tensor, slope: float) -> Tensor:
        raise NotImplementedError

    @staticmethod
    def backward(da: Tensor, y: Tensor, a: Tensor, slope: float) -> Tensor:
        raise NotImplementedError


class Tanh(Activation):
    """a = tanh(y);  dy = da (1 - a^2)."""

    name, types = "tanh", (pnn.Tanh,)

    @staticmethod
    def forward(y, slope):
        return torch.tanh(y)

    @staticmethod
    def backward(da, y, a, slope):
        return da * (1 - a * a)


class Sigmoid(Activation):
    """a = 1 / (1 + e^-y);  dy = da a (1 - a)."""

    name, types = "sigmoid", (pnn.Sigmoid,)

    @staticmethod
    def forward(y, slope):
        return torch.sigmoid(y)

    @staticmethod
    def backward(da, y, a, slope):
        return da * a * (1 - a)


class ReLU(Activation):
    """a = max(y, 0);  dy = da [y >= 0] (clamp_min's subgradient, as autograd's: 1 at 0)."""

    name, types = "relu", (pnn.ReLU,)

    @staticmethod
    def forward(y, slope):
        return y.clamp_min(0)

    @staticmethod
    def backward(da, y, a, slope):
        return da * (y >= 0)


class LeakyReLU(Activation):
    """a = y if y > 0 else slope y;  dy = da if y > 0 else slope da."""

    name, types = "leaky_relu", (pnn.LeakyReLU,)

    @staticmethod
    def forward(y, slope):
        return torch.where(y > 0, y, y * slope)

    @staticmethod
    def backward(da, y, a, slope):
        return torch.where(y > 0, da, da * slope)


class Identity(Activation):
    """a = y;  dy = da (``linear``, and the output layer's ``none``)."""

    name, types = "linear", (nn.Identity,)

    @staticmethod
    def forward(y, slope):
        return y

    @staticmethod
    def backward(da, y, a, slope):
        return da


class Norm:
    """y = gamma xhat + beta over the normalised xhat; ``spec`` says what the step keeps
    of the module (its parameters and buffers are added to the step's flat lists)."""

    name = ""
    types: tuple[type, ...] = ()

    @staticmethod
    def spec(m: nn.Module, param: Any, buffer: Any) -> dict[str, Any]:
        raise NotImplementedError

    @staticmethod
    def forward(s: LayerSpec, z: Tensor, params: list[Tensor], buffers: list[Tensor]):
        """(y, xhat, invstd) in training mode; updates the running buffers."""
        raise NotImplementedError

    @staticmethod
    def backward(s: LayerSpec, dy: Tensor, xhat: Tensor, invstd: Tensor, params: list[Tensor]):
        """(dz, dgamma, dbeta)."""
        raise NotImplementedError


class BatchNorm(Norm):
    """Over the batch (B rows), c = 1 for the unbiased variance (``variance="lecture"``),
    else 0:

        xhat = (z - mean) / sqrt(var + eps),  var = sum (z - mean)^2 / (B - c)
        dgamma = sum dy xhat,  dbeta = sum dy,  dxhat = gamma dy
        dz = (dxhat - mean(dxhat) - xhat sum(dxhat xhat) / (B - c)) / sqrt(var + eps)

    running_mean <- (1 - m) running_mean + m mean; running_var the same with the unbiased
    variance (torch's convention)."""

    name, types = "batch", (pnn.BatchNorm1d,)

    @staticmethod
    def spec(m, param, buffer):
        return {
            "buffers": (buffer(m.running_mean), buffer(m.running_var)),
            "eps": m.eps,
            "momentum": m.momentum,
            "correction": 1 if m.variance == "lecture" else 0,
        }

    @classmethod
    def forward(cls, s, z, params, buffers):
        n = z.shape[0]
        mean = z.mean(0, keepdim=True)
        d = z - mean
        ss = (d * d).sum(0, keepdim=True)
        var = ss / (n - s.correction)
        with torch.no_grad():
            cls.running(s, buffers[s.buffers[0]], buffers[s.buffers[1]], mean, ss, n)
        invstd = torch.rsqrt(var + s.eps) if s.eps else torch.rsqrt(var)
        xhat = d * invstd
        return params[s.gamma] * xhat + params[s.beta], xhat, invstd

    @staticmethod
    def running(s: LayerSpec, rm: Tensor, rv: Tensor, mean: Tensor, ss: Tensor, n: int):
        m = s.momentum
        rm.mul_(1 - m).add_(mean.view(-1) * m)
        rv.mul_(1 - m).add_((ss / (n - 1)).view(-1) * m)

    @staticmethod
    def backward(s, dy, xhat, invstd, params):
        gamma = params[s.gamma]
        dxhat = dy * gamma
        n = dy.shape[0]
        dgamma, dbeta = (dy * xhat).sum(0, keepdim=True), dy.sum(0, keepdim=True)
        dz = invstd * (
            dxhat
            - dxhat.mean(0, keepdim=True)
            - xhat * (dxhat * xhat).sum(0, keepdim=True) / (n - s.correction)
        )
        return dz, dgamma.view(gamma.shape), dbeta.view(params[s.beta].shape)


class LectureBatchNorm(BatchNorm):
    """The lecture's first batch norm: BatchNorm's math with c = 1 and no eps, and a
    running *std*: running_std <- (1 - m) running_std + m sqrt(sum (z - mean)^2 / (B - 1))
    (written as the notebook does, so the stage stays bit-exact)."""

    name, types = "lecture-batch", (pnn.LectureBatchNorm1d,)

    @staticmethod
    def spec(m, param, buffer):
        return {
            "buffers": (buffer(m.running_mean), buffer(m.running_std)),
            "eps": 0.0,
            "momentum": m.momentum,
            "correction": 1,
        }

    @staticmethod
    def running(s, rm, rv, mean, ss, n):
        m = s.momentum
        rm.copy_((1 - m) * rm + m * mean.view(rm.shape))
        rv.copy_((1 - m) * rv + m * (ss / (n - 1)).sqrt().view(rv.shape))


class LayerNorm(Norm):
    """Over the F features of each example:

    xhat = (z - mean) / sqrt(var + eps),  var = sum_f (z - mean)^2 / F
    dgamma = sum_b dy xhat,  dbeta = sum_b dy,  dxhat = gamma dy
    dz = (dxhat - mean_f(dxhat) - xhat mean_f(dxhat xhat)) / sqrt(var + eps)"""

    name, types = "layer", (pnn.LayerNorm,)

    @staticmethod
    def spec(m, param, buffer):
        return {"eps": m.eps}

    @staticmethod
    def forward(s, z, params, buffers):
        mean = z.mean(1, keepdim=True)
        d = z - mean
        var = (d * d).mean(1, keepdim=True)
        invstd = torch.rsqrt(var + s.eps)
        xhat = d * invstd
        return params[s.gamma] * xhat + params[s.beta], xhat, invstd

    @staticmethod
    def backward(s, dy, xhat, invstd, params):
        dxhat = dy * params[s.gamma]
        dz = invstd * (
            dxhat - dxhat.mean(1, keepdim=True) - xhat * (dxhat * xhat).mean(1, keepdim=True)
        )
        return dz, (dy * xhat).sum(0), dy.sum(0)


ACTIVATION_OPS: dict[str, type[Activation]] = {
    op.name: op for op in (Tanh, Sigmoid, ReLU, LeakyReLU, Identity)
}
NORM_OPS: dict[str, type[Norm]] = {op.name: op for op in (BatchNorm, LectureBatchNorm, LayerNorm)}
_BY_TYPE: dict[type, type[Activation] | type[Norm]] = {
    t: op for op in (*ACTIVATION_OPS.values(), *NORM_OPS.values()) for t in op.types
}
_FRAME = (pnn.Embedding, pnn.Flatten)  # the fixed front of every MLP


def _op(m: nn.Module) -> type[Activation] | type[Norm] | None:
    return _BY_TYPE.get(type(m))


def supports(model: nn.Module, optimizer: Any) -> str | None:
    """None when the fused engine covers ``model`` and ``optimizer``, else the reason."""
    if not isinstance(model, MLP):
        return f"the model is a {type(model).__name__}, not plumb's MLP"
    if not isinstance(optimizer, SGD | torch.optim.AdamW):
        return f"the optimizer is {type(optimizer).__name__} (the fused engine has SGD and AdamW)"
    if isinstance(optimizer, torch.optim.AdamW):
        group = optimizer.param_groups[0]
        if group.get("amsgrad") or group.get("maximize"):
            return "AdamW with amsgrad or maximize"
    if len(optimizer.param_groups) > 1:
        return "several param groups"
    for name, m in model.layers.named_children():
        if not isinstance(m, (pnn.Linear, *_FRAME)) and _op(m) is None:
            return f"layers.{name} is a {type(m).__name__}, which has no fused operation"
    for m in model.modules():
        if isinstance(m, pnn.BatchNorm1d) and not (m.affine and m.track_running_stats):
            return "a BatchNorm1d without affine parameters or running statistics"
    if not all(p.requires_grad for p in model.parameters()):
        return "frozen parameters"
    return None


def runs_in_c(model: MLP, batch: int) -> bool:
    """Whether a FusedStep of ``model`` would run batches of ``batch`` as its step in C
    (``plumb.cstep``), nothing compiled: CPU float32, plumb.native built, torch's sgemm
    found, and ``cstep.runs_at``."""
    specs, params, buffers, _ = build_spec(model)
    return cstep.usable(params, buffers) and cstep.runs_at(specs, params, batch)


def build_spec(model: MLP) -> tuple[list[LayerSpec], list[Tensor], list[Tensor], list[str]]:
    """The blocks of ``model`` (Linear [-> norm] [-> activation]) as specs over flat lists
    of its parameters and buffers (the model's own tensors: the step updates them in
    place), and the parameter names."""
    names = {id(p): n for n, p in model.named_parameters()}
    params: list[Tensor] = [model.layers.embedding.weight]
    buffers: list[Tensor] = []

    def add(into: list[Tensor]):
        def put(t: Tensor | None) -> int | None:
            if t is None:
                return None
            into.append(t)
            return len(into) - 1

        return put

    param, buffer = add(params), add(buffers)
    mods = [(f"layers.{n}", m) for n, m in model.layers.named_children()]
    specs: list[LayerSpec] = []
    for k, (lin_name, lin) in enumerate(mods):
        if not isinstance(lin, pnn.Linear):
            continue
        w, b = param(lin.weight), param(lin.bias)
        fields: dict[str, Any] = {}
        norm_name = act_name = None
        for other, m in mods[k + 1 : k + 3]:
            op = _op(m)
            if isinstance(m, pnn.Linear) or op is None:
                break
            if issubclass(op, Norm) and norm_name is None and act_name is None:
                norm_name = other
                fields.update(norm=op.name, gamma=param(m.weight), beta=param(m.bias))
                fields.update(op.spec(m, param, buffer))
            elif issubclass(op, Activation) and act_name is None:
                act_name = other
                fields.update(activation=op.name, slope=getattr(m, "negative_slope", 0.01))
            else:
                break
        specs.append(LayerSpec(w, b, (lin_name, norm_name, act_name), **fields))
    return specs, params, buffers, [names[id(p)] for p in params]


@dataclass
class Pass:
    """The tensors of one fused forward/backward (for the probes): per layer in forward
    order ``(name, output, dL/d(output))``, and each weight layer's input."""

    outputs: list[tuple[str, Tensor, Tensor]]
    inputs: dict[str, Tensor]
    logits: Tensor


def forward_backward(
    specs: list[LayerSpec],
    params: list[Tensor],
    buffers: list[Tensor],
    X: Tensor,
    Y: Tensor,
    measure: bool = False,
) -> tuple[Tensor, list[Tensor], Pass | None]:
    """One training-mode forward and the hand-written backward: (loss, gradients in
    ``params`` order, and with ``measure`` the tensors the probes measure, named by the
    specs' modules). Running buffers are updated as the modules' forward would."""
    C = params[0]
    B = X.shape[0]
    ids = X.long()
    emb = C[ids]  # (B, T, E)
    h = emb.reshape(B, -1)
    saved = []
    for s in specs:
        z = h @ params[s.weight]
        if s.bias is not None:
            z = z + params[s.bias]
        if s.norm != "none":
            y, xhat, invstd = NORM_OPS[s.norm].forward(s, z, params, buffers)
        else:
            y, xhat, invstd = z, None, None
        a = ACTIVATION_OPS[s.activation].forward(y, s.slope)
        saved.append((h, z, y, xhat, invstd, a))
        h = a
    logits = h
    lse = torch.logsumexp(logits, 1, keepdim=True)
    target = Y.long()
    loss = (lse.squeeze(1) - logits.gather(1, target.view(-1, 1)).squeeze(1)).mean()
    probs = torch.exp(logits - lse)
    grads: list[Tensor | None] = [None] * len(params)
    dh = (probs - torch.nn.functional.one_hot(target, logits.shape[1]).to(probs.dtype)) / B
    back = []
    for s, (hin, _z, y, xhat, invstd, a) in zip(reversed(specs), reversed(saved), strict=True):
        da = dh
        dy = ACTIVATION_OPS[s.activation].backward(da, y, a, s.slope)
        if s.norm != "none":
            norm = NORM_OPS[s.norm]
            dz, grads[s.gamma], grads[s.beta] = norm.backward(s, dy, xhat, invstd, params)
        else:
            dz = dy
        grads[s.weight] = hin.t() @ dz
        if s.bias is not None:
            grads[s.bias] = dz.sum(0)
        dh = dz @ params[s.weight].t()
        back.append((dz, dy, da))
    demb = dh.view(emb.shape)
    grads[0] = torch.zeros_like(C).index_add_(0, ids.reshape(-1), demb.reshape(-1, C.shape[1]))
    if not measure:
        return loss, grads, None
    outputs = [("layers.embedding", emb, demb), ("layers.flatten", saved[0][0], dh)]
    inputs = {}
    for s, (hin, z, y, _, _, a), (dz, dy, da) in zip(specs, saved, reversed(back), strict=True):
        lin, norm, act = s.modules
        outputs.append((lin, z, dz))
        inputs[lin] = hin
        if norm is not None:
            outputs.append((norm, y, dy))
        if act is not None:
            outputs.append((act, a, da))
    return loss, grads, Pass(outputs, inputs, logits)


def _all_finite(loss: Tensor, grads: list[Tensor]) -> Tensor:
    """One bool tensor: the loss and every gradient finite (a NaN/Inf in a gradient makes
    its sum non-finite)."""
    total = loss.reshape(1)
    sums = torch.stack([g.sum() for g in grads])
    return torch.isfinite(torch.cat([total, sums])).all()


def sgd_update(
    params: list[Tensor], grads: list[Tensor], lr: Tensor, ok: Tensor, weight_decay: float = 0.0
) -> None:
    """plumb's SGD, p <- p + (-lr * g), with g <- g + weight_decay * p when weight decay
    is on, applied only where ``ok`` (a finite step)."""
    for p, g in zip(params, grads, strict=True):
        if weight_decay:
            g = g + p * weight_decay
        p.copy_(torch.where(ok, p + g * -lr, p))


def adamw_update(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avg: list[Tensor],
    exp_avg_sq: list[Tensor],
    step: Tensor,
    lr: Tensor,
    ok: Tensor,
    hyper: tuple[float, float, float, float],
) -> None:
    """torch.optim.AdamW's update (decoupled weight decay, bias-corrected moments),
    applied only where ``ok``."""
    beta1, beta2, eps, weight_decay = hyper
    t = step + ok.to(step.dtype)
    step.copy_(t)
    bc1 = 1 - beta1**t
    bc2 = 1 - beta2**t
    for p, g, m, v in zip(params, grads, exp_avg, exp_avg_sq, strict=True):
        m_new = m + (g - m) * (1 - beta1)
        v_new = v * beta2 + g * g * (1 - beta2)
        denom = v_new.sqrt() / bc2.sqrt() + eps
        p_new = p * (1 - lr * weight_decay) - lr / bc1 * m_new / denom
        m.copy_(torch.where(ok, m_new, m))
        v.copy_(torch.where(ok, v_new, v))
        p.copy_(torch.where(ok, p_new, p))


def _own_code(method: Any) -> Any:
    """``method`` bound to a copy of its function with a code object of its own. Dynamo
    counts recompilations per code object (at most ``recompile_limit``, 8, and a hard
    error under ``fullgraph``): every FusedStep of another shape would recompile the
    one ``_run`` until a process that builds a ninth model fails; with its own code
    object each FusedStep compiles once."""
    fn = method.__func__
    twin = types.FunctionType(
        fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
    )
    twin.__qualname__, twin.__doc__ = fn.__qualname__, fn.__doc__
    return types.MethodType(twin, method.__self__)


class FusedStep:
    """``step(X, Y, lr) -> (loss, ok)`` for ``model`` and ``optimizer``: the forward, the
    hand-written backward, the running statistics and the update, compiled as one graph
    (``compile=False``: the same function run eagerly, for tests); on the CPU, where it
    can, the same step written out in C instead (``plumb.cstep``; ``native=True`` forces
    it on, ``False`` off, None: with ``compile``). ``ok`` is False when
    the loss or a gradient was not finite: then nothing was updated (the running
    statistics excepted, as in eager mode). Parameters, buffers and the optimizer's
    state are the model's and optimizer's own tensors, updated in place, so evaluation,
    checkpoints and resume see them as usual.

    ``record(X, Y, lr)`` is the same step that also measures, in the graph, what the
    probes measure (``plumb.probes``: outputs, their gradients, weight-layer inputs,
    parameters, gradients and updates); ``layout`` says how to read it."""

    def __init__(
        self, model: MLP, optimizer: Any, *, compile: bool = True, native: bool | None = None
    ):
        reason = supports(model, optimizer)
        if reason is not None:
            raise ValueError(f"the fused engine does not apply: {reason}")
        self.model, self.optimizer = model, optimizer
        self.specs, self.params, self.buffers, self.names = build_spec(model)
        device = self.params[0].device
        self.lr = torch.zeros((), device=device)
        self.adamw = isinstance(optimizer, torch.optim.AdamW)
        self.hyper: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
        self.state: list[dict[str, Tensor]] = []
        self.weight_decay = float(optimizer.param_groups[0].get("weight_decay", 0.0))
        if self.adamw:
            group = optimizer.param_groups[0]
            self.hyper = (*group["betas"], group["eps"], group["weight_decay"])
            for p in self.params:
                st = optimizer.state[p]
                if not st:  # as torch initialises it on the first step
                    st["step"] = torch.tensor(0.0)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            self.state = [optimizer.state[p] for p in self.params]
        self.kinds = {n: layer_kind(m) for n, m in model.named_modules()}
        # CPU: histogram counts by one bincount after the graph (inside it a scatter-add of
        # every value's bin ran as ATen's scatter: ~0.4 ms of a 1 ms lecture-deep
        # histogram step); CUDA: in the graph, where bincount would sync on its size
        self._count_outside = device.type == "cpu"
        self._prepared: tuple | None = None  # (batch, bins, saturation layer) of self.plan
        self._rows: tuple | None = None  # (workspace, plan, their NativeRows)
        self._hists: Any = None  # their native.Histograms, built on the first histogram step
        # CPU: the graph's wrapper in C++; CUDA: CUDA graphs (one launch per step), as
        # torch.compile's mode "reduce-overhead" does (mode and options are exclusive).
        how = {"mode": "reduce-overhead"} if device.type == "cuda" else {"options": COMPILE_OPTIONS}
        wrap = (
            (lambda f: torch.compile(_own_code(f), fullgraph=True, dynamic=False, **how))
            if compile
            else (lambda f: f)
        )
        self._step = wrap(self._run)
        self._record = wrap(self._run_record)
        self._record_hist = wrap(self._run_record_hist)
        self.compiled = compile
        self.compile_seconds = 0.0  # first calls of the compiled variants (compile time)
        self.marker: Any = None  # a file to write once compiled (``train.compile_marker``)
        self._first = {"step", "record", "hist"}
        # the plain step in C where it can run (plumb.cstep): by default with ``compile``
        # (``compile=False`` runs the Python function, for tests); ``native=False``: never
        use = compile if native is None else native
        self.native = NativeStep(self) if use and NativeStep.usable(self) else None

    # ----- the step, with and without measurements ---------------------------------------
    def _update(self, params, grads, opt, lr, ok) -> None:
        if self.adamw:
            m, v, step = opt
            adamw_update(params, grads, m, v, step, lr, ok, self.hyper)
        else:
            sgd_update(params, grads, lr, ok, self.weight_decay)

    def _run(self, params, buffers, opt, X, Y, lr):
        with torch.no_grad():
            loss, grads, _ = forward_backward(self.specs, params, buffers, X, Y)
            ok = _all_finite(loss, grads)
            self._update(params, grads, opt, lr, ok)
        return loss, ok

    def _run_record_hist(self, params, buffers, opt, X, Y, lr):
        return self._run_record(params, buffers, opt, X, Y, lr, stacks=True)

    def _run_record(self, params, buffers, opt, X, Y, lr, stacks: bool = False):
        with torch.no_grad():
            loss, grads, ps = forward_backward(self.specs, params, buffers, X, Y, measure=True)
            ok = _all_finite(loss, grads)
            prev = {
                numel: torch.stack([params[k].reshape(-1) for k in ks]).float()
                for numel, ks in self._prev_params.items()
            }
            self._update(params, grads, opt, lr, ok)
            tensors = [t for _, out, grad in ps.outputs for t in (out, grad)]
            tensors += list(ps.inputs.values())
            tensors += [t for p, g in zip(params, grads, strict=True) for t in (p, g)]
            values, units, groups, _ = self.plan.row_values(tensors, prev, native_rows=False)
            masks = [m for _, m in units]
            hist = ()
            if stacks:  # histograms on each row's own [min, max], and the saturation map
                rows = self._hist_rows
                at = torch.tensor(self._hist_at, device=values.device)
                lo, hi = values[at, Stat.MIN].float(), values[at, Stat.MAX].float()
                slots = list(range(len(rows)))
                if self._count_outside:  # the bins here, the counts by bincount after
                    idx = self.plan.bin_indices(groups, rows, slots, lo, hi, torch.int32)
                    counts = torch.cat(idx) if len(idx) > 1 else idx[0]
                else:
                    counts = self.plan.count(groups, rows, slots, lo, hi, len(rows))
                smap = self.plan.satmap(groups)
                hist = (counts, torch.stack([lo, hi], 1), smap)
        _, logits, dlogits = ps.outputs[-1]
        return loss, ok, values, masks, hist, (logits, dlogits)

    def _native_record(
        self, X: Tensor, Y: Tensor, lr: float, histograms: bool
    ) -> tuple[Tensor, Tensor, Measured] | None:
        """``record`` with the step in C (``plumb.cstep``): the step keeps every tensor
        the probes measure in its workspace, and each parameter's update as it applies
        it; their statistics and histogram counts are plumb.native's (the kernel the
        Monitor uses on any model), read where the tensors lie. None: the graph runs."""
        done = self.native(X, Y, lr, measure=True)
        if done is None:
            return None
        loss, ok = done
        work = self.native.work
        # the same tensors every record step: the native calls' arguments are built once
        # per workspace (a new one whenever a batch size or a storage changes) and plan
        # (~130 us of Python a step otherwise)
        if self._rows is None or self._rows[0] is not work or self._rows[1] is not self.plan:
            tensors = work.measured(self.specs, self.params, self.model.config.block_size)
            upd = {n: [work.updates[k] for k in ks] for n, ks in self._prev_params.items()}
            self._rows = (work, self.plan, self.plan.native_rows(tensors, {}, upd))
            self._hists = None
        rows, plan, unit_rows = self._rows[2], self.plan, self._unit_rows
        run = rows.run()

        def stats_of() -> list[RowStats]:  # the rows, when the probes lay them out
            values, units, _ = rows.row_values(run)
            units = [(r, m) for r, (_, m) in zip(unit_rows, units, strict=True)]
            return [RowStats(plan.keys, values, units)]  # the plan's own keys list

        measured = Measured(self.plan, [], [], **self._static)
        measured.stats_of, measured.source = stats_of, rows
        measured.flat, measured.dead_stack = run[0], rows.dead_stack(run)
        last = work.blocks[-1]  # the logits and their gradient (kept until the next step)
        measured.output, measured.output_grad = last["a"], last["da"]
        if histograms:  # on the host arrays: lo, hi per histogram row, their counts
            values = run[0].numpy()[: len(plan.keys) * N_STATS].reshape(-1, N_STATS)
            lo = values[self._hist_at, Stat.MIN].astype(np.float32)
            hi = values[self._hist_at, Stat.MAX].astype(np.float32)
            if self._hists is None:  # the histograms' native call, built once as well
                hist_rows = self._hist_rows
                slots = list(range(len(hist_rows)))
                self._hists = plan.native_histograms(rows.groups, hist_rows, slots, len(hist_rows))
            measured.counts = plan.count_native(self._hists, lo, hi)
            measured.ranges = torch.from_numpy(np.stack([lo, hi], 1))
            measured.smap = plan.satmap(rows.groups)
            measured.hist_keys = list(self._hist_keys)
        return loss, ok, measured

    def _prepare(self, batch: int, bins: int, saturation_layer: str | None) -> None:
        """The rows a record step measures (forward order: each layer's output and its
        gradient, weight-layer inputs, then each parameter and its gradient) and their
        ``Plan``, from one pass on a batch of this size."""
        device = self.params[0].device
        X = torch.zeros(batch, self.model.config.block_size, dtype=torch.long, device=device)
        with torch.no_grad():
            _, _, ps = forward_backward(
                self.specs,
                [p.clone() for p in self.params],
                [b.clone() for b in self.buffers],
                X,
                torch.zeros(batch, dtype=torch.long, device=device),
                measure=True,
            )
        rows = []
        for name, out, _ in ps.outputs:
            kind = self.kinds.get(name, "other")
            rows += [
                Row("layer", name, tuple(out.shape), kind),
                Row("layer_grad", name, tuple(out.shape), kind),
            ]
        rows += [Row("layer_in", name, tuple(h.shape)) for name, h in ps.inputs.items()]
        first_param = len(rows)
        for n, p in zip(self.names, self.params, strict=True):
            rows += [Row("param", n, tuple(p.shape)), Row("param_grad", n, tuple(p.shape))]
        self.plan = Plan(rows, bins, saturation_layer, device)
        self._prev_params = {
            numel: [(r - first_param) // 2 for r in rs]
            for numel, rs in self.plan.param_rows().items()
        }
        self._unit_rows = self.plan.unit_rows()
        hist = self.plan.hist_rows()
        index = {k: i for i, k in enumerate(self.plan.keys)}
        self._hist_rows = [r for r, _ in hist]
        self._hist_keys = [k for _, k in hist]
        self._hist_at = [index[k] for k in self._hist_keys]
        order = [name for name, _, _ in ps.outputs]
        self._static = dict(
            order=order,
            shapes={name: tuple(out.shape) for name, out, _ in ps.outputs},
            kinds={name: self.kinds.get(name, "other") for name in order},
            positions={name: batch for name in order},
            chains=self.chains(),
        )
        self._prepared = (batch, bins, saturation_layer)

    def chains(self) -> list[list[str]]:
        """Weight layers that feed each other (``plumb.probes``'s chains): all the Linears
        when there is no norm between them, else each on its own."""
        linears = [s.modules[0] for s in self.specs]
        if all(s.norm == "none" for s in self.specs[:-1]):
            return [linears]
        return [[lin] for lin in linears]

    def _args(self, X: Tensor, Y: Tensor, lr: float):
        self.lr.fill_(lr)
        opt = ()
        if self.adamw:
            opt = (
                [s["exp_avg"] for s in self.state],
                [s["exp_avg_sq"] for s in self.state],
                self.state[0]["step"],
            )
        return self.params, self.buffers, opt, X, Y, self.lr

    def _sync_steps(self) -> None:
        for s in self.state[1:]:  # AdamW keeps a step count per parameter: all equal
            s["step"].copy_(self.state[0]["step"])

    def _timed(self, variant: str, fn, *args):
        if variant not in self._first:
            return fn(*args)
        self._first.discard(variant)
        t0 = time.perf_counter()
        stop = _ticker(f"compiling the fused {variant} step") if self.compiled else None
        try:
            out = fn(*args)
        finally:
            if stop is not None:
                stop()
        if self.compiled:
            self.compile_seconds += time.perf_counter() - t0
            if self.marker is not None and variant == "step":
                _mark(self.marker, time.perf_counter() - t0)
        return out

    def __call__(self, X: Tensor, Y: Tensor, lr: float) -> tuple[Tensor, Tensor]:
        if self.native is not None:
            done = self.native(X, Y, lr)
            if done is not None:
                return done
        loss, ok = self._timed("step", self._step, *self._args(X, Y, lr))
        self._sync_steps()
        return loss, ok

    def record(
        self,
        X: Tensor,
        Y: Tensor,
        lr: float,
        *,
        bins: int = 64,
        saturation_layer: str | None = None,
        histograms: bool = False,
    ) -> tuple[Tensor, Tensor, Measured]:
        """The step, measured: (loss, ok, the probes' ``Measured`` for ``Probes.step``;
        with ``histograms``, the stacked values that histograms are counted from)."""
        if self._prepared != (X.shape[0], bins, saturation_layer):
            self._prepare(X.shape[0], bins, saturation_layer)
        if self.native is not None:
            done = self._native_record(X, Y, lr, histograms)
            if done is not None:
                return done
        variant = ("hist", self._record_hist) if histograms else ("record", self._record)
        loss, ok, values, masks, hist, out = self._timed(*variant, *self._args(X, Y, lr))
        self._sync_steps()
        stats = RowStats(self.plan.keys, values, list(zip(self._unit_rows, masks, strict=True)))
        measured = Measured(self.plan, [stats], [], **self._static)
        measured.output, measured.output_grad = out
        if hist:
            counts, measured.ranges, measured.smap = hist
            if self._count_outside:  # the graph returned each value's bin
                n = len(self._hist_rows)
                counts = torch.bincount(counts, minlength=n * bins).view(n, bins)
            measured.counts = counts
            measured.hist_keys = list(self._hist_keys)
        return loss, ok, measured
