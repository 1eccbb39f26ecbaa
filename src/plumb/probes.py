"""Probes: hooks that record activations, gradients and updates of any ``torch.nn.Module``.

    with plumb.Monitor(model, out="runs/mine") as mon:
        for xb, yb in batches:
            loss = loss_fn(model(xb), yb)
            opt.zero_grad(); loss.backward(); opt.step()
            mon.step(loss)

``Probes`` is the mechanism (the one place in plumb that attaches hooks); ``plumb.Monitor``
adds the doctor and the report on top of it.

**Which forward a record step records.** On a record step (``step % every == 0``) every
forward that runs with autograd is watched, and a call is *recorded when its backward
reaches it* before ``step()``: its output's statistics and the gradient of the loss with
respect to that output. Forwards under ``no_grad``/``inference_mode``, and forwards whose
graph is never back-propagated (a validation pass that forgot ``no_grad``), are never
recorded. Outputs that need no gradient (a frozen module, an activation of the raw data)
are recorded with the pass they belong to, when a backward reaches that pass. Nothing is
kept past a pass whose graph dies, and what is held waiting for ``step()`` is bounded by
``hold_bytes``: past it, held calls are reduced to their statistics (see ``plumb.stats``).

**What is measured**, per *key* (a leaf module's ``named_modules()`` name, or
``MODULE.tanh`` for an activation function called inside a module's forward), pooled
over the k calls of the step (``calls``; ``per_call=True`` keeps ``NAME``, ``NAME#2``...):

    output      mean, std, min, max; saturated = P(|t| > 0.97) for tanh (the lecture's
                threshold), P(s < 0.015 or s > 0.985) for sigmoid (the same point, since
                s = (1 + tanh(x/2)) / 2: the local gradient is < 6% of its maximum there);
                zero = P(y <= 0) for the ReLU family; dead = fraction of units (feature
                dim; channel dim for NCHW) saturated or zero for *every* example
    out-grad    mean, std of dL/d(output)
    in_rms      sqrt(mean(x^2)) of a weight layer's input (the scale it sees)
    parameter   mean, std, rms; grad mean, std; grad:data = std(grad) / std(p) (the
                lecture's); update:data = log10(rms(p_t - p_{t-1}) / rms(p_t)), the
                optimizer's actual change relative to the parameter's size (defined for a
                gain of all ones, where std(p) = 0; for a zero-mean weight rms = std and
                it is the lecture's log10(std(lr * grad) / std(p)) for SGD); grad_carry =
                |p.grad when this step's backward began| / |p.grad| (0 when gradients are
                cleared every step)

and, every ``hist_every`` steps, histograms of outputs, output gradients and parameter
gradients, plus a saturation map (examples x units) of one layer. The loss is kept every
step. Statistics stay on the device until ``flush()``: no per-step host synchronisation.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import re
import warnings
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from plumb import nn as pnn
from plumb.dist import (
    clean_name,
    is_sharded,
    local,
    mean_over_ranks,
    sum_counts,
    unwrap,
    world,
)
from plumb.errors import PlumbError
from plumb.record import History, RecordWriter
from plumb.stats import (
    HISTOGRAMS,
    NORMS,
    RECTIFYING,
    SATURATING,
    SIGMOID_SATURATION,
    TANH_SATURATION,
    WEIGHT_LAYERS,
    Merged,
    Plan,
    Row,
    RowStats,
    Stat,
    merge,
    merge_ranks,
    unit_dim,
)

_KINDS: list[tuple[tuple[type, ...], str]] = [
    ((nn.Linear, pnn.Linear), "linear"),
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d), "conv"),
    ((nn.Embedding, pnn.Embedding), "embedding"),
    (pnn.BATCHNORMS, "batchnorm"),
    ((nn.LayerNorm, nn.RMSNorm, pnn.LayerNorm), "layernorm"),
    ((nn.GroupNorm,), "groupnorm"),
    ((nn.Tanh, pnn.Tanh), "tanh"),
    ((nn.Sigmoid, pnn.Sigmoid), "sigmoid"),
    ((nn.ReLU, nn.ReLU6, pnn.ReLU), "relu"),
    ((nn.LeakyReLU, pnn.LeakyReLU), "leaky_relu"),
    ((nn.GELU,), "gelu"),
    ((nn.SiLU,), "silu"),
    ((nn.Softmax,), "softmax"),
    ((nn.Flatten, pnn.Flatten), "flatten"),
]

# A class of the user's own (nanoGPT's LayerNorm, makemore's NewGELU) is known by its name
# when it is not a subclass of a known one: the first pattern that matches the class name.
_NAMED_KINDS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"batch_?norm", re.I), "batchnorm"),
    (re.compile(r"(layer|rms)_?norm", re.I), "layernorm"),
    (re.compile(r"group_?norm", re.I), "groupnorm"),
    (re.compile(r"embedding", re.I), "embedding"),
    (re.compile(r"conv\d?d?$", re.I), "conv"),
    (re.compile(r"^linear$|dense$", re.I), "linear"),
    (re.compile(r"gelu", re.I), "gelu"),
    (re.compile(r"silu|swish", re.I), "silu"),
    (re.compile(r"leaky_?relu", re.I), "leaky_relu"),
    (re.compile(r"relu", re.I), "relu"),
    (re.compile(r"tanh", re.I), "tanh"),
    (re.compile(r"sigmoid", re.I), "sigmoid"),
]

# Activation functions seen when called inside a module's forward (torch.tanh, F.tanh,
# x.tanh(), torch.sigmoid, F.relu, F.gelu, F.silu, softmax): function name -> kind.
FUNCTIONAL = {
    "tanh": "tanh",
    "sigmoid": "sigmoid",
    "relu": "relu",
    "leaky_relu": "leaky_relu",
    "gelu": "gelu",
    "silu": "silu",
    "softmax": "softmax",
}

# Autograd nodes a weight layer's input may pass through and still be the output of the
# layer before it, for chain discovery: shape changes, element-wise arithmetic and
# activations, dropout, pooling, casts (matched as name prefixes, version digits dropped).
PASS_THROUGH = (
    "AccumulateGrad",
    "View",
    "UnsafeView",
    "Reshape",
    "Transpose",
    "Permute",
    "T",
    "Expand",
    "Squeeze",
    "Unsqueeze",
    "Slice",
    "Select",
    "Split",
    "Unbind",
    "Clone",
    "AsStrided",
    "Alias",
    "ToCopy",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Neg",
    "Tanh",
    "Sigmoid",
    "Relu",
    "Gelu",
    "Silu",
    "LeakyRelu",
    "Elu",
    "Hardtanh",
    "Threshold",
    "Softplus",
    "Mish",
    "NativeDropout",
    "MaxPool",
    "AvgPool",
    "AdaptiveAvgPool",
    "AdaptiveMaxPool",
)

_ACTIVE: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # models with a Monitor attached


def layer_kind(module: nn.Module) -> str:
    """What the probes know a module as (``"other"``: recorded generically). torch.nn and
    plumb.nn classes by type; a class of the user's own by its name (``LayerNorm``,
    ``NewGELU``, ``RMSNorm``), since a weight layer or a norm written from scratch is
    still one."""
    for types, kind in _KINDS:
        if isinstance(module, types):
            return kind
    name = type(module).__name__
    for pattern, kind in _NAMED_KINDS:
        if pattern.search(name):
            return kind
    return "other"


def logits_of(output: Any) -> Tensor | None:
    """The tensor a model's output carries its predictions in: the output itself, the
    ``logits`` of a dict or of a ``ModelOutput``-like object, else the first floating
    tensor of >= 2 dims in a tuple/list (``(logits, loss)``), else the first tensor."""
    if isinstance(output, Tensor):
        return output
    named = output.get("logits") if isinstance(output, dict) else getattr(output, "logits", None)
    if isinstance(named, Tensor):
        return named
    items = list(output.values()) if isinstance(output, dict) else output
    if isinstance(items, tuple | list):
        tensors = [t for t in items if isinstance(t, Tensor)]
        wide = [t for t in tensors if t.is_floating_point() and t.dim() >= 2]
        return (wide or tensors or [None])[0]
    return None


#: saved scalar attributes of an autograd node kept in the loss path (they outlive backward)
_NODE_ATTRS = {"_saved_reduction": "reduction", "_saved_dim": "dim"}


def loss_path(loss: Tensor, output_node: Any, budget: int = 256) -> list[dict[str, Any]] | None:
    """The autograd nodes from ``loss`` down to the node that made the model's output, as
    ``[{"op": "NllLossBackward0", "reduction": 1}, {"op": "LogSoftmaxBackward0", "dim": 1},
    ...]`` (loss first): what the user's loss expression did to the output. Read after
    backward (the graph's structure and its scalar attributes outlive it; only saved
    tensors are freed). None when the output is not reached within ``budget`` nodes."""
    start = getattr(loss, "grad_fn", None)
    if start is None or output_node is None:
        return None
    parent: dict[int, Any] = {id(start): None}
    nodes = {id(start): start}
    queue = [start]
    while queue and len(nodes) <= budget:
        node = queue.pop(0)
        if node is output_node:
            path = []
            while node is not None:
                step = {"op": type(node).__name__}
                for attr, key in _NODE_ATTRS.items():
                    v = getattr(node, attr, None) if hasattr(node, attr) else None
                    if isinstance(v, int):
                        step[key] = v - (1 << 64) if v >= 1 << 63 else v  # unsigned -> signed
                path.append(step)
                node = parent[id(node)]
            return path[::-1]
        for nxt, _ in node.next_functions:
            if nxt is not None and id(nxt) not in nodes:
                nodes[id(nxt)], parent[id(nxt)] = nxt, node
                queue.append(nxt)
    return None


def _first_tensor(x: Any) -> Tensor | None:
    if isinstance(x, Tensor):
        return x
    if isinstance(x, tuple | list):
        return next((t for t in x if isinstance(t, Tensor)), None)
    if isinstance(x, dict):
        return next((t for t in x.values() if isinstance(t, Tensor)), None)
    return None


@dataclass
class LayerInfo:
    name: str
    type: str
    kind: str


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


@dataclass
class BatchNormEvent:
    name: str
    mode: str  # "train-mode-in-eval" | "eval-mode-in-training"
    count: int = 0
    first_step: int = 0
    frozen: bool = False  # its affine parameters do not require grad


@dataclass
class Layout:
    """How to read one snapshot's values on the host."""

    keys: list[tuple[str, str]]  # merged keys (section, name)
    calls: list[int]
    order: list[str]  # layer keys in forward order
    kinds: dict[str, str]
    shapes: dict[str, tuple[int, ...]]  # first call's output shape per layer key
    dead: list[str]  # layer keys with a per-unit dead fraction, in values order
    carry: list[str]  # parameters with a grad_carry value, in values order
    hist_keys: list[tuple[str, str]]
    params: list[str] = field(default_factory=list)  # parameter names, in model order


@dataclass
class Measured:
    """A record step's statistics before they are merged per key: the ``Plan`` that
    computed them, the rows' sufficient statistics (several parts merge), the stacked
    groups (for histograms), and what the layout needs (forward order, shapes, kinds,
    positions seen per unit; chains when the engine knows them)."""

    plan: Plan
    stats: list[RowStats]
    stacks: list[Tensor]
    smap: Tensor | None = None
    order: list[str] = field(default_factory=list)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)
    positions: dict[str, int] = field(default_factory=dict)
    carry: list[str] = field(default_factory=list)
    carried: list[Tensor] = field(default_factory=list)
    chains: list[list[str]] | None = None
    # histograms the engine already counted (one row per key: on the key's own range)
    counts: Tensor | None = None
    ranges: Tensor | None = None
    hist_keys: list[tuple[str, str]] | None = None


PARAM_SECTIONS = ("param", "param_grad", "param_update")


@dataclass
class Snapshot:
    """What one record step measured, still on the device (see ``Probes.flush``)."""

    step: int
    layout: Layout
    values: Tensor  # float64: merged (K, 6) flattened, then dead fractions, then carries
    hist: Tensor | None = None  # (len(hist_keys), bins) counts
    hist_range: Tensor | None = None  # (len(hist_keys), 2) [min, max]
    satmap: Tensor | None = None  # (examples, units) fraction saturated/zero
    skipped: bool = False  # the GradScaler skipped this step's update (inf/NaN gradients)


class _FunctionalCapture(TorchFunctionMode):
    """Sees activation functions called inside a module's forward (record steps only)."""

    def __init__(self, probes: Probes):
        super().__init__()
        self.probes = probes

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        kind = FUNCTIONAL.get(getattr(func, "__name__", "").rstrip("_"))
        if kind is not None:
            self.probes._functional(kind, out)
        return out


class Probes:
    """Record activation, gradient and update statistics of ``model`` while it trains.

    ``every``: record-step cadence (step 0 is always recorded). ``hist_every``: cadence of
    histograms and the saturation map (default ``10 * every``; a multiple of ``every``).
    ``layers``: qualified names (or a predicate on the key) of the modules to probe
    (default: every leaf module, and activation functions called inside modules).
    ``saturation_layer``: the layer of the saturation map (default: the first tanh/sigmoid,
    else ReLU-family layer). ``out``: run directory for the record (``out/probes/``).
    ``per_call``: keep a module's k calls in a step apart (``NAME``, ``NAME#2``, ...)
    instead of pooling them. ``functional``: also record activation functions called
    inside modules (off for a ``torch.compile``'d model). ``hold_bytes``: what the record
    step may hold for ``step()`` beyond one pass (past it, held calls are reduced to
    statistics; histograms then cover the calls still held). ``keep``: keep the last
    record step's tensors (``tensors[key] = (output, gradient)``, the first call, on the
    CPU) for code that plots them. ``watch_modes``: check every forward for a BatchNorm in
    the wrong mode (``bn_events``). ``scaler``: the ``torch.amp.GradScaler`` of a
    mixed-precision loop (gradients are recorded unscaled; a step the scaler skips is
    recorded as ``skipped``).

    Under ``torch.distributed`` (a DDP-wrapped model, or one sharded with FSDP2's
    ``fully_shard``) every rank must run the probes; record steps hold the statistics of
    the global step (``plumb.dist``) and only rank 0 writes.

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
        flush_every: int = 1000,
        sinks: Iterable[Any] = (),
        per_call: bool = False,
        functional: bool = True,
        hold_bytes: int = 8 << 20,
        keep: bool = False,
        watch_modes: bool = False,
        scaler: Any = None,
    ):
        if not isinstance(model, nn.Module):
            raise PlumbError(f"Monitor needs a torch.nn.Module, got {type(model).__name__}")
        for label, value in (
            ("every", every),
            ("bins", bins),
            ("flush_every", flush_every),
            ("hold_bytes", hold_bytes),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PlumbError(f"{label} must be an integer >= 1, got {value!r}")
        hist_every = 10 * every if hist_every is None else hist_every
        if not isinstance(hist_every, int) or hist_every < 1 or hist_every % every:
            raise PlumbError(
                f"hist_every must be a positive multiple of every={every}, got {hist_every!r}"
            )
        compiled = hasattr(model, "_orig_mod") or hasattr(
            getattr(model, "module", None), "_orig_mod"
        )
        # the user's module inside DDP / torch.compile: names without their prefixes
        self.model = unwrap(model)
        self.rank, self.world = world()
        self.scaler = scaler
        self.every, self.hist_every, self.bins = every, hist_every, bins
        self.flush_every, self.hold_bytes = flush_every, hold_bytes
        self.per_call, self.keep, self.watch_modes = per_call, keep, watch_modes
        self.functional = functional and not compiled
        self.params = [
            (clean_name(n), p) for n, p in self.model.named_parameters() if p.requires_grad
        ]
        # statistics of these are this rank's alone (the same on every rank: DDP's
        # replicas); the others (a sharded parameter's pieces, activations) are merged
        self._replicated = {
            (sec, n) for n, p in self.params if not is_sharded(p) for sec in PARAM_SECTIONS
        }
        if not self.params:
            raise PlumbError(
                f"{type(self.model).__name__} has no trainable parameters: nothing to monitor"
            )
        self._named = {clean_name(n): m for n, m in self.model.named_modules()}
        self._kind_of = {n: layer_kind(m) for n, m in self._named.items()}
        self._filter = layers if callable(layers) else None
        self.layers = self._select_layers(layers)
        self._probed = {layer.name for layer in self.layers}
        self.saturation_layer = self._pick_saturation_layer(saturation_layer)
        self.aliases = self._aliases()
        # In-place modules (ReLU(inplace=True)) overwrite the previous layer's output
        # after its hook ran: then outputs are cloned at capture time.
        self._clone = any(getattr(m, "inplace", False) for m in self.model.modules())
        self.out = Path(out) if out is not None else None
        self.sinks = list(sinks)
        self.step_count = 0
        self.snapshots: list[Snapshot] = []  # on the device, until flush()
        self._losses: list[Tensor] = []  # per step, on the device, until flush()
        self._plans: dict[tuple, Plan] = {}
        self._merge_cache: dict = {}
        self._prev: dict[int, Tensor] = {}  # numel -> stacked parameters before the update
        self._param_groups: dict[int, list[Tensor]] = defaultdict(list)
        for _, p in self.params:
            self._param_groups[local(p).numel()].append(p)
        # hooks: (handles on record steps, handles always on)
        self._handles: list[Any] = []
        self._mode_handles: list[Any] = []
        self._armed = False
        self._attached = False
        self._external = False
        self._reset_step()
        # what the record steps learned, for the doctor and the views
        self.order: list[str] = []  # layer keys of the last record step, in forward order
        self.shapes: dict[str, tuple[int, ...]] = {}  # their (first call's) output shapes
        self.kinds: dict[str, str] = {}  # every recorded key's kind
        self.functional_layers: dict[str, str] = {}  # functional key -> kind
        self.links: dict[str, set[frozenset[str]]] = defaultdict(set)  # chain discovery
        self.chains: list[list[str]] | None = None  # weight layers that feed each other
        self.bn_events: dict[tuple[str, str], BatchNormEvent] = {}
        self.model_input: Tensor | None = None  # rms, mean, std, max per-feature rms
        self.output: Tensor | None = None  # the first recorded forward's output (CPU)
        self.output_grad: Tensor | None = None  # dL/d(that output)
        self.loss_graph: list[dict[str, Any]] | None = None  # loss_path(), first found
        self._output_node: Any = None
        self.tensors: dict[str, tuple[Tensor, Tensor | None]] = {}  # keep=True
        self._window_off: dict[str, Tensor] = {}  # per-unit: off at every record step
        self._window_examples: dict[str, int] = {}
        self._warned_hold = False
        self._meta_written: tuple | None = None
        self.writer = None
        self.history = None  # host-side record (plumb.record.History), filled by flush()

    # ----- what to probe ---------------------------------------------------------------
    def _select_layers(self, layers) -> list[LayerInfo]:
        named = self._named
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
            self.functional = False  # an explicit list: exactly those modules
        return [LayerInfo(n, type(named[n]).__name__, self._kind_of[n]) for n in chosen]

    def _pick_saturation_layer(self, name: str | None) -> str | None:
        if name is not None:
            if name not in self._probed:
                raise PlumbError(f"saturation_layer {name!r} is not a probed layer")
            return name
        for kinds in (SATURATING, RECTIFYING):
            for layer in self.layers:
                if layer.kind in kinds:
                    return layer.name
        return None

    def _aliases(self) -> dict[str, list[str]]:
        """Parameters shared under several names (tied weights): the name
        ``named_parameters()`` keeps -> the other names (e.g. ``lm_head.weight``)."""
        first: dict[int, str] = {}
        out: dict[str, list[str]] = {}
        for n, p in self.model.named_parameters(remove_duplicate=False):
            if id(p) in first:
                out.setdefault(first[id(p)], []).append(n)
            else:
                first[id(p)] = n
        return out

    def meta(self) -> dict[str, Any]:
        layers = [vars(layer) for layer in self.layers]
        layers += [
            {"name": k, "type": "function", "kind": kind}
            for k, kind in self.functional_layers.items()
        ]
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
            "layers": layers,
            "params": [
                {
                    "name": n,
                    "shape": list(p.shape),
                    "layer": n.rpartition(".")[0],
                    **({"aliases": self.aliases[n]} if n in self.aliases else {}),
                }
                for n, p in self.params
            ],
            "chains": self.chains or [],
            "model": type(self.model).__name__,
        }

    # ----- attach / detach -------------------------------------------------------------
    def __enter__(self) -> Probes:
        self.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
        if self.out is not None and self.rank == 0:  # one writer: rank 0
            self.writer = RecordWriter(self.out, self.meta())
            if self.history is not None:  # resumed: the record so far, then onwards
                self.writer.rewrite(self.history)
        if self.watch_modes:
            for name, m in self._named.items():
                if self._kind_of[name] == "batchnorm":  # every forward, no tensor work
                    self._mode_handles.append(m.register_forward_pre_hook(self._bn_hook(name)))
        self._arm()

    def on_output(self, fn: Callable[[Any], None]) -> None:
        """Call ``fn(output)`` after every forward of the model while attached: a
        framework callback reads what the model returns there (a Hugging Face
        ``ModelOutput.loss``). Removed with the other hooks by ``close``."""
        if not self._attached:
            raise PlumbError("on_output() needs an attached Monitor: call it inside the block")
        hook = self.model.register_forward_hook(lambda module, args, output: fn(output))
        self._mode_handles.append(hook)

    def close(self, close_sinks: bool = True) -> None:
        """Remove every hook, flush what is on the device and write the record (and close
        the sinks, unless ``close_sinks`` is False: the Monitor hands them its findings
        first)."""
        if not self._attached:
            return
        self._disarm()
        for h in self._mode_handles:
            h.remove()
        self._mode_handles.clear()
        self._attached = False
        _ACTIVE.discard(self.model)
        self.flush()
        for sink in self.sinks if self.rank == 0 and close_sinks else ():
            sink.close()

    def _is_record(self, step: int) -> bool:
        return step % self.every == 0

    def _reset_step(self) -> None:
        self._held: list[tuple[_Call, Tensor | None]] = []  # (call, dL/d(output)) reached
        self._held_bytes = 0
        self._partials: list[RowStats] = []
        self._seq = itertools.count()
        self._calls: dict[str, int] = {}  # per_call numbering
        self._stack: list[str] = []
        self._pass: _Pass | None = None
        self._mode: _FunctionalCapture | None = None
        self._nodes: dict[int, tuple[str, str, Any]] = {}  # id(grad_fn) -> (key, kind, node)
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

    def _disarm(self) -> None:
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
            if not self._stack:
                self._pass = _Pass()
                if self.chains is None:
                    self._nodes = {}  # a new graph: the last pass's nodes are not its
                if self.functional and torch.is_grad_enabled():
                    self._mode = _FunctionalCapture(self)
                    self._mode.__enter__()
            self._stack.append(name)

        return hook

    def _exit_mode(self) -> None:
        mode, self._mode = self._mode, None
        with contextlib.suppress(RuntimeError):  # not the innermost mode: its owner's
            mode.__exit__(None, None, None)

    def _post_hook(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._stack and self._stack[-1] == name:
                self._stack.pop()
            if not self._stack and self._mode is not None:
                self._exit_mode()
            if output is None or not torch.is_grad_enabled():
                return
            if name in self._probed:
                kind = self._kind_of[name]
                inp = _first_tensor(args) if kind in WEIGHT_LAYERS else None
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
        self.functional_layers.setdefault(key, kind)
        self._capture(key, kind, out, None)

    def _capture(self, name: str, kind: str, output: Any, inp: Tensor | None) -> None:
        t = _first_tensor(output)
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
        if self.chains is None:
            if kind in WEIGHT_LAYERS:
                call.preds = self._feeds(inp)
            if t.grad_fn is not None and id(t.grad_fn) not in self._nodes:
                self._nodes[id(t.grad_fn)] = (key, kind, t.grad_fn)
        if t.requires_grad:
            t.register_hook(functools.partial(self._on_grad, call))
        elif self._pass is not None:
            self._pass.forward_only.append(call)

    def _feeds(self, inp: Tensor | None, budget: int = 4096) -> frozenset[str]:
        """What a weight layer's input comes from, walking the autograd graph back from
        it to the nearest recorded outputs: weight layers (their keys), through
        element-wise ops, activations, pooling and shape changes (``PASS_THROUGH``:
        where Kaiming's propagation argument holds); a normalisation or an embedding
        output is a start ("<norm>"), any other op (attention, a matrix product of two
        activations) a mix ("<mix>"). Empty: the input is data."""
        found: set[str] = set()
        stack = [inp.grad_fn] if inp is not None and inp.grad_fn is not None else []
        seen: set[int] = set()
        while stack:
            node = stack.pop()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            hit = self._nodes.get(id(node))
            if hit is not None and hit[1] in WEIGHT_LAYERS:
                found.add(hit[0])
                continue
            if hit is not None and hit[1] in (*NORMS, "embedding"):
                found.add("<norm>")
                continue
            if hit is None and not node.name().rstrip("0123456789").startswith(PASS_THROUGH):
                found.add("<mix>")
                continue
            if len(seen) > budget:
                found.add("<unknown>")
                break
            stack.extend(n for n, _ in node.next_functions)
        return frozenset(found)

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
        if self._held_bytes > self.hold_bytes and len({id(c.pass_) for c, _ in self._held}) > 1:
            self._fold(keep=p)

    def _hold(self, call: _Call, grad: Tensor | None) -> None:
        self._held.append((call, grad))
        self._held_bytes += call.nbytes + (
            grad.numel() * grad.element_size() if grad is not None else 0
        )
        if call.preds is not None:
            self.links[call.key].add(call.preds)

    def _grad_factor(self) -> Tensor | float | None:
        """What turns the gradient a hook sees into the global step's unscaled one:
        1/scale under a GradScaler (read at the step's first gradient: the scale of
        this backward, no host sync), times 1/world under DDP/FSDP (they average the
        ranks' gradients). None when it is 1."""
        if self._factor is not None:
            return self._factor
        factor: Tensor | float = 1.0 / self.world
        scaler = self.scaler
        if scaler is not None and scaler.is_enabled() and scaler._scale is not None:
            self._scale = scaler._scale.detach().clone()
            factor = self._scale.double().reciprocal().float() * factor
        self._factor = factor
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
        g = dense(local(p.grad)) if p.grad is not None else None
        self._carried[i] = (
            g.detach().float().square().sum()
            if g is not None
            else torch.zeros((), dtype=torch.float32, device=local(p).device)
        )

    def _bn_hook(self, name: str):
        def hook(module: nn.Module, args: Any) -> None:
            grad = torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
            if not grad and module.training:
                mode = "train-mode-in-eval"
            elif grad and not module.training and _uses_running_stats(module):
                mode = "eval-mode-in-training"
            else:
                return
            event = self.bn_events.get((name, mode))
            if event is None:
                frozen = not any(p.requires_grad for p in module.parameters(recurse=False))
                event = BatchNormEvent(name, mode, 0, self.step_count, frozen)
                self.bn_events[(name, mode)] = event
            event.count += 1

        return hook

    def _model_io(self, args: Any, output: Any) -> None:
        """The model's input scale (first record step) and its first recorded output."""
        x = _first_tensor(args)
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
        self._held_bytes = sum(
            c.nbytes + (g.numel() * g.element_size() if g is not None else 0) for c, g in self._held
        )
        rows, tensors = self._layer_rows(fold)
        plan = self._plan(rows, tensors)
        stats, _, _ = plan.row_stats(tensors, {})
        self._partials.append(stats)
        if len(self._partials) > 8:  # keep the list short: partials merge associatively
            merged = merge(self._partials)
            self._partials = [_as_rows(merged)]
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

    # ----- per step ------------------------------------------------------------------------
    def step(self, loss: Tensor | float, measured: Measured | None = None) -> None:
        """Call once per training step, after ``optimizer.step()``. ``measured``: the
        record step's statistics from an engine that measures for itself (``external``)."""
        if not self._attached:
            raise PlumbError("Monitor.step() called outside `with Monitor(...)`")
        if self._output_node is not None and isinstance(loss, Tensor):
            self.loss_graph = loss_path(loss, self._output_node)
        self._output_node = None
        if isinstance(loss, Tensor):
            self._losses.append(loss.detach().reshape(()).float())
        else:
            self._losses.append(torch.tensor(float(loss)))
        if measured is not None and self._is_record(self.step_count):
            self.snapshots.append(self._snapshot(self.step_count, measured))
        elif self._armed:
            skipped = self._skipped()
            snap = self._measure(self.step_count)
            snap.skipped = skipped
            self.snapshots.append(snap)
            self._disarm()
        self.step_count += 1
        if self.step_count % self.flush_every == 0:
            self.flush()
        self._arm()

    def _measure(self, step: int) -> Snapshot:
        """A record step of the hooks: the held calls' and the parameters' statistics."""
        held = self._held
        rows, tensors = self._layer_rows(held)
        carry: list[str] = []
        carried: list[Tensor] = []
        for i, (name, p) in enumerate(self.params):
            data = local(p.detach())
            rows.append(Row("param", name, tuple(data.shape)))
            tensors.append(data)
            if p.grad is not None:
                rows.append(Row("param_grad", name, tuple(data.shape)))
                tensors.append(dense(local(p.grad)))
                if i in self._carried:
                    carry.append(name)
                    carried.append(self._carried[i])
        hist = step % self.hist_every == 0
        plan = self._plan(rows, tensors)
        stats, stacks, smap = plan.row_stats(tensors, self._prev, satmap=hist)
        ordered = sorted(held, key=lambda cg: cg[0].seq)
        if self.keep:
            self.tensors = {}
            for c, g in ordered:
                if c.key not in self.tensors:
                    self.tensors[c.key] = (
                        c.out.float().cpu(),
                        g.float().cpu() if g is not None else None,
                    )
        measured = Measured(plan, [*self._partials, stats], stacks, smap)
        measured.order = list(dict.fromkeys(c.key for c, _ in ordered))
        for c, _ in ordered:
            measured.shapes.setdefault(c.key, tuple(c.out.shape))
            measured.kinds.setdefault(c.key, c.kind)
            ud = unit_dim(c.kind, c.out.dim())
            if ud is not None:
                measured.positions[c.key] = measured.positions.get(c.key, 0) + (
                    c.out.numel() // c.out.shape[ud]
                )
        measured.carry, measured.carried = carry, carried
        return self._snapshot(step, measured)

    def _snapshot(self, step: int, m: Measured) -> Snapshot:
        """Merge a record step's statistics per key and lay them out for the host."""
        hist = step % self.hist_every == 0
        merged = merge(m.stats, self._merge_cache)
        carried = torch.stack(m.carried).double() if m.carried else None
        if self.world > 1:  # the global step: one all_gather of the statistics
            sharded = [("param", n) not in self._replicated for n in m.carry]
            merged, carried = merge_ranks(merged, self._replicated, carried, sharded)
        dead_keys = [
            k for (s, k) in merged.keys if s == "layer" and ("layer", k) in merged.unit_off
        ]
        dead_vals = [merged.unit_off[("layer", k)].mean() for k in dead_keys]
        positions = {k: v * self.world for k, v in m.positions.items()}  # equal shares
        self._update_window(merged, dead_keys, positions)
        hist_keys = [k for k in merged.keys if k[0] in HISTOGRAMS] if hist else []
        counts = ranges = None
        if hist and m.counts is not None:
            hist_keys, counts, ranges = list(m.hist_keys), m.counts, m.ranges
        elif hist and hist_keys:
            counts = m.plan.histograms(m.stacks, merged, hist_keys)
            if self.world > 1:  # counted on the global edges, summed over ranks
                once = [i for i, k in enumerate(hist_keys) if k in self._replicated]
                counts = sum_counts(counts, once)
            at = merged.index()
            idx = torch.tensor([at[k] for k in hist_keys], device=merged.values.device)
            ranges = merged.values[idx][:, [Stat.MIN, Stat.MAX]].float()
        smap = None
        if hist:
            smap = m.smap if m.smap is not None or not m.stacks else m.plan.satmap(m.stacks)
        self.kinds.update(m.kinds)
        layout = Layout(
            keys=list(merged.keys),
            calls=list(merged.calls),
            order=m.order,
            kinds={k: self.kinds.get(k, "other") for k in m.order},
            shapes=m.shapes,
            dead=dead_keys,
            carry=m.carry,
            hist_keys=hist_keys,
            params=[n for n, _ in self.params],
        )
        parts = [merged.values.reshape(-1)]
        parts += [torch.stack(dead_vals).reshape(-1).double()] if dead_vals else []
        parts += [carried.to(merged.values.device)] if carried is not None else []
        values = torch.cat(parts) if len(parts) > 1 else parts[0]
        self.order, self.shapes = m.order, m.shapes
        if self.chains is None and m.chains is not None:
            self.chains = m.chains
        elif self.chains is None and m.order:
            self.chains = self._build_chains(m.order)
        return Snapshot(step, layout, values, counts, ranges, smap)

    def _update_window(
        self, merged: Merged, dead_keys: list[str], positions: dict[str, int]
    ) -> None:
        """Per-unit 'off at every record step' since ``reset_window`` (the doctor's dead
        units), and how many examples (positions) each unit has seen."""
        for k in dead_keys:
            mask = merged.unit_off[("layer", k)]
            prev = self._window_off.get(k)
            self._window_off[k] = mask if prev is None or prev.shape != mask.shape else prev * mask
            self._window_examples[k] = self._window_examples.get(k, 0) + positions.get(k, 0)

    # ----- an engine that measures for itself ------------------------------------------------
    @property
    def external(self) -> bool:
        """True when the training step measures itself and hands the result to ``step``
        (``plumb.fused``): no hooks are attached then."""
        return self._external

    @external.setter
    def external(self, on: bool) -> None:
        self._external = bool(on)
        if on and self._armed:
            self._disarm()
        elif not on and self._attached:
            self._arm()

    def wants_record(self) -> bool:
        """Whether the coming step is a record step."""
        return self._is_record(self.step_count)

    def wants_histograms(self) -> bool:
        """Whether the coming step is a histogram step."""
        return self.step_count % self.hist_every == 0

    def reset_window(self) -> None:
        """Start a new window for dead units (units must be active somewhere in it)."""
        self._window_off, self._window_examples = {}, {}

    def window_dead(self) -> dict[str, tuple[float, int, int]]:
        """{layer: (fraction of units off at every record step of the window, units,
        examples seen)} (one host read)."""
        keys = list(self._window_off)
        if not keys:
            return {}
        fractions = torch.stack([self._window_off[k].mean() for k in keys]).cpu().tolist()
        return {
            k: (f, self._window_off[k].numel(), self._window_examples.get(k, 0))
            for k, f in zip(keys, fractions, strict=True)
        }

    def _build_chains(self, order: list[str]) -> list[list[str]]:
        """Weight layers that feed each other directly (through activations, with no
        normalisation, merge or embedding between): the maximal paths, in forward order.
        A layer whose every call has exactly one weight layer A as its source extends A's
        chain; a layer fed by a norm, by several layers (a residual sum, an RNN's state)
        or by the data starts one."""
        weights = [k for k in order if self.kinds.get(k) in WEIGHT_LAYERS]
        link: dict[str, str] = {}
        for k in weights:
            preds = self.links.get(k, set())
            sources = {next(iter(p)) for p in preds if len(p) == 1}
            if preds and len(preds) == 1 and len(sources) == 1:
                src = next(iter(sources))
                if src in weights and not src.startswith("<") and src != k:
                    link[k] = src
        nxt: dict[str, list[str]] = defaultdict(list)
        for b, a in link.items():
            nxt[a].append(b)
        chains: list[list[str]] = []

        def walk(path: list[str]) -> None:
            if len(chains) > 256:
                return
            succ = nxt.get(path[-1], [])
            if not succ:
                chains.append(path)
            for s in succ:
                if s not in path:
                    walk([*path, s])

        for k in weights:
            if k not in link:
                walk([k])
        self.links.clear()
        self._nodes = {}
        return chains

    # ----- to the host ---------------------------------------------------------------------
    def flush(self) -> None:
        """Copy losses and snapshots to the host (one synchronisation) and hand them to
        the record writer and sinks."""
        if self.history is None:
            self.history = History(self.meta())
        start = self.step_count - len(self._losses)
        losses = torch.stack(self._losses).float() if self._losses else torch.empty(0)
        if self.world > 1 and self._losses:  # the global loss: the ranks' mean
            losses = mean_over_ranks(losses)
        losses = losses.cpu()
        snaps = self.snapshots
        self._losses, self.snapshots = [], []
        rows, hists = self.history.add(start, losses, snaps)
        meta = self.meta()
        self.history.meta = meta
        signature = (len(meta["layers"]), len(meta["chains"]))
        if self.writer is not None:
            if signature != self._meta_written:
                self.writer.write_meta(meta)
                self._meta_written = signature
            self.writer.write(self.history, rows, hists)
        for sink in self.sinks if self.rank == 0 else ():  # one writer: rank 0
            sink.write(self.history, rows, hists)


def dense(t: Tensor) -> Tensor:
    """A sparse gradient (``nn.Embedding(sparse=True)``) as the dense tensor it stands
    for (rows no example touched are zeros), so that its statistics are those of the same
    gradient held densely: a copy the size of the parameter, on record steps only."""
    return t.to_dense() if t.layout != torch.strided else t


def _as_rows(merged: Merged) -> RowStats:
    """Merged statistics as rows again (to merge further)."""
    units = [(i, merged.unit_off[k]) for i, k in enumerate(merged.keys) if k in merged.unit_off]
    return RowStats(list(merged.keys), merged.values, units, list(merged.calls))


def _uses_running_stats(m: nn.Module) -> bool:
    return getattr(m, "track_running_stats", True) and getattr(m, "running_mean", None) is not None


def first_nonfinite(
    row: dict[str, Any], order: list[str], params: list[str]
) -> tuple[str, str] | None:
    """Where a record step's first NaN/Inf is, in the order the step computes things:
    outputs in forward order, the loss, output gradients in backward order, parameter
    gradients, then parameters after the update. ``(where, what)`` or None."""

    def bad(section: str, name: str, *stats: str) -> bool:
        st = row.get(section, {}).get(name, {})
        return any(s in st and not np.isfinite(st[s]) for s in stats)

    for k in order:
        if bad("layer", k, "mean", "std"):
            return k, f"the output of layer '{k}' (first in forward order)"
    if "loss" in row and not np.isfinite(row["loss"]):
        return "loss", "the loss (every layer output was finite)"
    for k in reversed(order):
        if bad("layer", k, "grad_mean", "grad_std"):
            return k, f"the gradient at the output of layer '{k}' (first in backward order)"
    for p in params:
        if bad("param", p, "grad_mean", "grad_std"):
            return p, f"the gradient of parameter '{p}'"
    for p in params:
        if bad("param", p, "mean", "std"):
            return p, f"parameter '{p}' after the update"
    return None
