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
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

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
from plumb.kinds import (
    CHILDREN_ONLY,
    RECTIFYING,
    SATURATING,
    SIGMOID_SATURATION,
    TANH_SATURATION,
    layer_kind,
)
from plumb.probes.capture import Capture
from plumb.probes.graph import Chains, logits_of, loss_path
from plumb.probes.layout import (
    PARAM_SECTIONS,
    LayerInfo,
    Layout,
    Measured,
    Snapshot,
    dense,
)
from plumb.probes.watch import BatchNormEvent, BatchNormWatch, DeadWindow
from plumb.record import History, RecordWriter
from plumb.stats import HISTOGRAMS, Plan, Row, Stat, merge, merge_ranks, unit_dim

__all__ = ["BatchNormEvent", "Measured", "Probes", "Snapshot", "layer_kind", "logits_of"]

_ACTIVE: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # models with a Monitor attached


class Probes(Capture):
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
        # An activation function called outside every probed module can only come from a
        # forward that calls more than its children: with none in the model there is
        # nothing for the functional capture to find, and its TorchFunctionMode, which
        # sees every torch call of a record step's forward, is skipped (lecture-deep:
        # ~1.5 ms of a 4 ms record step).
        if self.functional and all(
            n in self._probed or type(m).forward in CHILDREN_ONLY for n, m in self._named.items()
        ):
            self.functional = False
        self.saturation_layer = self._pick_saturation_layer(saturation_layer)
        self.aliases = self._aliases()
        # In-place modules (ReLU(inplace=True)) overwrite the previous layer's output
        # after its hook ran: then outputs are cloned at capture time.
        self._clone = any(getattr(m, "inplace", False) for m in self.model.modules())
        self.out = Path(out) if out is not None else None
        self.sinks = list(sinks)
        self.step_count = 0
        self.snapshots: list[Snapshot] = []  # on the device, until flush()
        self._losses: list[Tensor | float] = []  # per step until flush(): on the device, or a float
        self._device_losses = 0  # how many of them are tensors
        self._plans: dict[tuple, Plan] = {}
        self._merge_cache: dict = {}
        self._fast: dict[bool, tuple | None] = {}  # _snapshot: (source, layout, dead keys)
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
        self._hosts: set[str] = set()  # modules whose own forward called one (capture.py)
        self._armed_records = 0  # record steps armed so far (full functional discovery)
        self._discover = True  # this record step's functional capture covers whole forwards
        self._zeros: dict[torch.device, Tensor] = {}  # |p.grad|^2 of a cleared grad
        self.graph = Chains()  # which weight layers feed each other (chains)
        self.modes = BatchNormWatch(lambda: self.step_count)  # watch_modes=True
        self.window = DeadWindow()  # dead units since the doctor's reset_window()
        self.model_input: Tensor | None = None  # rms, mean, std, max per-feature rms
        self.output: Tensor | None = None  # the first recorded forward's output (CPU)
        self.output_grad: Tensor | None = None  # dL/d(that output)
        self.loss_graph: list[dict[str, Any]] | None = None  # loss_path(), first found
        self._output_node: Any = None
        self.tensors: dict[str, tuple[Tensor, Tensor | None]] = {}  # keep=True
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

    @property
    def attached(self) -> bool:
        """True while the hooks are on the model (between ``attach`` and ``close``)."""
        return self._attached

    @property
    def modules(self) -> dict[str, nn.Module]:
        """The model's modules by the names the probes record them under."""
        return self._named

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
            self.modes.attach(self._named, self._kind_of)
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
        self.modes.detach()
        self._attached = False
        _ACTIVE.discard(self.model)
        self.flush()
        for sink in self.sinks if self.rank == 0 and close_sinks else ():
            sink.close()

    def _is_record(self, step: int) -> bool:
        return step % self.every == 0

    # ----- per step ------------------------------------------------------------------------
    def step(self, loss: Tensor | float, measured: Measured | None = None) -> None:
        """Call once per training step, after ``optimizer.step()``. ``measured``: the
        record step's statistics from an engine that measures for itself (``external``)."""
        if not self._attached:
            raise PlumbError("Monitor.step() called outside `with Monitor(...)`")
        if self._output_node is not None and isinstance(loss, Tensor):
            self.loss_graph = loss_path(loss, self._output_node)
        self._output_node = None
        if isinstance(loss, Tensor) and not loss.is_cpu:  # kept on the device
            loss = loss.detach()  # until flush(): no sync
            if loss.dim() != 0:
                loss = loss.reshape(())
            self._losses.append(loss if loss.dtype == torch.float32 else loss.float())
            self._device_losses += 1
        else:  # a CPU loss is read now (no sync): a 0-d tensor kept per step cost ~3 us
            self._losses.append(loss.item() if isinstance(loss, Tensor) else float(loss))
        if measured is not None and self._is_record(self.step_count):
            if self.output is None and measured.output is not None:  # as _first_output
                self.output = measured.output.detach().float().cpu().clone()
                self.output_grad = measured.output_grad.detach().float().cpu().clone()
            self.snapshots.append(self._snapshot(self.step_count, measured))
        elif self._armed:
            skipped = self._skipped()
            snap = self._measure(self.step_count)
            snap.skipped = skipped
            self.snapshots.append(snap)
            self._disarm(keep=self._is_record(self.step_count + 1))
        self.step_count += 1
        if self.step_count % self.flush_every == 0:
            self.flush()
        if not self._external:  # an engine that measures for itself needs no hooks
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
        stats, stacks, smap = plan.row_stats(tensors, self._prev, satmap=hist, stacks=hist)
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
        """Merge a record step's statistics per key and lay them out for the host.

        An engine that measures the same tensors every record step may hand its values
        already laid out (``Measured.flat``, ``source``): the first record step of each
        kind (with and without histograms) for a source is laid out here, and where the
        engine's values equal it bit for bit, the later ones take the engine's values
        and this layout as they are (the fused engine's step in C: ~14 fewer tensor
        operations a record step)."""
        hist = step % self.hist_every == 0
        fast = self._fast.get(hist) if m.flat is not None else None
        if fast is not None and fast[0] is m.source:
            _, layout, keys = fast
            if m.dead_stack is None or not self.window.and_stacked(keys, m.positions, m.dead_stack):
                units = sorted(m.rows()[0].units, key=lambda u: u[0])
                masks = dict(zip(keys, [mask for _, mask in units], strict=True))
                self.window.update(masks, m.positions, _stacked(list(masks.values())))
            if hist:
                return Snapshot(step, layout, m.flat, m.counts, m.ranges, m.smap)
            return Snapshot(step, layout, m.flat)
        snap = self._laid_out(step, m, hist)
        if m.flat is not None:
            self._fast[hist] = None
            takes = self.world == 1 and not m.carried and (not hist or m.counts is not None)
            if takes and snap.values.shape == m.flat.shape:
                a, b = snap.values, m.flat
                if bool(((a == b) | (a.isnan() & b.isnan())).all()):
                    self._fast[hist] = (m.source, snap.layout, tuple(snap.layout.dead))
        return snap

    def _laid_out(self, step: int, m: Measured, hist: bool) -> Snapshot:
        """``_snapshot`` for any record step: merged per key, laid out."""
        merged = merge(m.rows(), self._merge_cache)
        carried = torch.stack(m.carried).double() if m.carried else None
        if self.world > 1:  # the global step: one all_gather of the statistics
            sharded = [("param", n) not in self._replicated for n in m.carry]
            merged, carried = merge_ranks(merged, self._replicated, carried, sharded)
        dead_keys = [
            k for (s, k) in merged.keys if s == "layer" and ("layer", k) in merged.unit_off
        ]
        masks = {k: merged.unit_off[("layer", k)] for k in dead_keys}
        stacked = _stacked(list(masks.values()))
        if stacked is not None:  # the fraction of units off, per layer
            dead_vals = stacked.double().mean(1)
        else:
            dead_vals = _fractions(list(masks.values()))
        positions = {k: v * self.world for k, v in m.positions.items()}  # equal shares
        self.window.update(masks, positions, stacked)
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
        parts += [dead_vals] if dead_vals is not None else []
        parts += [carried.to(merged.values.device)] if carried is not None else []
        values = torch.cat(parts) if len(parts) > 1 else parts[0]
        self.order, self.shapes = m.order, m.shapes
        if self.graph.chains is None and m.chains is not None:
            self.graph.chains = m.chains
        elif self.graph.chains is None and m.order:
            self.graph.build(m.order, self.kinds)
        return Snapshot(step, layout, values, counts, ranges, smap)

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
        self.window.reset()

    def window_dead(self) -> dict[str, tuple[float, int, int]]:
        """{layer: (fraction of units off at every record step of the window, units,
        examples seen)} (one host read)."""
        return self.window.dead()

    @property
    def chains(self) -> list[list[str]] | None:
        """Weight layers that feed each other directly, in forward order (None until the
        first record step found them)."""
        return self.graph.chains

    @property
    def bn_events(self) -> dict[tuple[str, str], BatchNormEvent]:
        """BatchNorm layers seen in the wrong mode (``watch_modes=True``)."""
        return self.modes.events

    @contextlib.contextmanager
    def unwatched(self) -> Iterator[None]:
        """Forwards plumb runs on purpose between steps in a BatchNorm mode the watch
        would flag (the training-mode, no-grad pass that recalibrates the running
        statistics after weight averaging): not counted as the user's mistake."""
        watching = bool(self.modes.handles)
        self.modes.detach()
        try:
            yield
        finally:
            if watching:
                self.modes.attach(self._named, self._kind_of)

    # ----- to the host ---------------------------------------------------------------------
    def flush(self) -> None:
        """Copy losses and snapshots to the host (one synchronisation) and hand them to
        the record writer and sinks."""
        if self.history is None:
            self.history = History(self.meta())
        start = self.step_count - len(self._losses)
        losses = _loss_tensor(self._losses, self._device_losses > 0)
        if self.world > 1 and self._losses:  # the global loss: the ranks' mean
            losses = mean_over_ranks(losses)
        losses = losses.cpu()
        snaps = self.snapshots
        self._losses, self.snapshots, self._device_losses = [], [], 0
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


def _loss_tensor(losses: list[Tensor | float], tensors: bool = True) -> Tensor:
    """The steps' losses as one float32 tensor (on the device of the first one kept as a
    tensor; a float kept for a CPU loss is the float32 value itself, exact).
    ``tensors`` False: they are all floats."""
    if not losses:
        return torch.empty(0)
    if not tensors:
        return torch.tensor(losses, dtype=torch.float32)
    device = next((t.device for t in losses if isinstance(t, Tensor)), None)
    if device is None:
        return torch.tensor(losses, dtype=torch.float32)
    return torch.stack(
        [t if isinstance(t, Tensor) else torch.tensor(t, device=device) for t in losses]
    ).float()


def _stacked(masks: list[Tensor]) -> Tensor | None:
    """The masks as one (k, U) tensor when they are 1-D of one length (a model's usual
    case), else None."""
    if not masks or any(m.dim() != 1 for m in masks):
        return None
    n = masks[0].shape[0]
    if any(m.shape[0] != n for m in masks):
        return None
    return torch.stack(masks)


def _fractions(masks: list[Tensor]) -> Tensor | None:
    """The mean of each 0/1 mask (the fraction of units off), float64: one reduction per
    distinct mask size instead of one per mask (the sums are exact integers, so the
    numbers are the per-mask means')."""
    if not masks:
        return None
    by_size: dict[int, list[int]] = {}
    for i, m in enumerate(masks):
        by_size.setdefault(m.numel(), []).append(i)
    if len(by_size) == 1:
        return torch.stack([m.reshape(-1) for m in masks]).double().mean(1)
    out = torch.empty(len(masks), dtype=torch.float64, device=masks[0].device)
    for idx in by_size.values():
        rows = torch.stack([masks[i].reshape(-1) for i in idx]).double()
        out[torch.tensor(idx, device=out.device)] = rows.mean(1)
    return out
