"""The probes' quantities: sufficient statistics of many tensors at once, on the device,
merged across the calls of a step.

A record step measures dozens of tensors (layer outputs, their gradients, weight-layer
inputs, parameters, their gradients, their updates), and a module may run k times in one
step (an RNN cell per time step, gradient accumulation's micro-batches). Every tensor is
reduced to *sufficient statistics* that merge:

    n, mean, M2 = ||x - mean||^2, min, max, off = #{x in the flat tails / <= 0}
    unit_off[u] = 1 if unit u is off for every example of the tensor, else 0

Tensors with the same number of elements are stacked into rows ``X (k, n)`` and every
statistic is a row reduction (one kernel launch per statistic per group, not per
tensor). Rows of the same key (k calls of one module) are then merged (Chan et al.):

    N = sum n_i,  mean = sum n_i mean_i / N,
    M2 = sum M2_i + sum n_i (mean_i - mean)^2,  std = sqrt(M2 / (N - 1))

(float64 for the merge; the row reductions run in float32, centred first so there is no
cancellation when |mean| >> std). Merging is associative, so the same function pools
the k calls of a step, the partial results of a step that held more than its memory
budget, and (``plumb at scale``) the ranks of a distributed job.

Under ``torch.distributed`` the ranks' statistics of a key are pooled the same way
(``merge_ranks``: one ``all_gather`` of these few numbers per record step; full tensors
are never gathered). Histograms use edges agreed first: the key's merged [min, max] split into ``bins`` equal
bins (``torch.histogram``'s default range), and every call's values are counted on those
edges, all histograms of a step in one ``bincount``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from enum import IntEnum
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from plumb import native
from plumb.dist import all_gather, world
from plumb.kinds import RECTIFYING, SATURATING, SIGMOID_SATURATION, TANH_SATURATION

HISTOGRAMS = ("layer", "layer_grad", "param_grad")  # sections that get histograms
SECTIONS = ("layer", "layer_grad", "layer_in", "param_grad", "param", "param_update")


class Stat(IntEnum):
    """The columns of a statistics row: the sufficient statistics of one tensor (or of
    one key, pooled). Every reader indexes by name (``values[:, Stat.MIN]``)."""

    N = 0  # number of values
    MEAN = 1
    M2 = 2  # sum of squared deviations from the mean
    MIN = 3
    MAX = 4
    OFF = 5  # values in a saturating unit's flat tails / a rectifier's <= 0 side


N_STATS = len(Stat)

#: A record step without histograms reduces a group of rows larger than this a chunk at a
#: time: a whole stacked group (e.g. a GPT's 16 MLP outputs of 131,072 values, 8 MiB) and
#: its centred copy fall out of cache, and on this 2-core VM reducing it took 10.3 ms
#: stacked against 1.2 ms in chunks (rows of 512 KiB each).
CHUNK_BYTES = 1 << 20


def pool(values: Tensor, idx: Tensor, K: int) -> Tensor:
    """Rows ``values (R, N_STATS)`` pooled into ``K`` keys, row r into key ``idx[r]``: the
    one merge plumb has (the calls of a step, the parts of a step over its memory budget,
    the ranks of a distributed job). Chan et al.:

        N = sum n_r,  mean = sum n_r mean_r / N,
        M2 = sum M2_r + sum n_r (mean_r - mean)^2,  min, max, off: min, max, sum

    A row with n = 0 (an empty share) adds nothing; a key with N = 0 has mean 0. NaN in a
    row that holds values propagates (a non-finite activation stays visible)."""
    n, mean, m2, lo, hi, off = values.unbind(1)
    has = n > 0
    mean = torch.where(has, mean, 0.0)
    N = values.new_zeros(K).index_add_(0, idx, n)
    mu = values.new_zeros(K).index_add_(0, idx, n * mean) / N.clamp_min(1)
    dev = mean - mu[idx]
    M2 = values.new_zeros(K).index_add_(0, idx, torch.where(has, m2 + n * dev * dev, 0.0))
    inf = float("inf")
    LO = values.new_full((K,), inf).scatter_reduce_(0, idx, torch.where(has, lo, inf), "amin")
    HI = values.new_full((K,), -inf).scatter_reduce_(0, idx, torch.where(has, hi, -inf), "amax")
    OFF = values.new_zeros(K).index_add_(0, idx, off)
    return torch.stack([N, mu, M2, LO, HI, OFF], 1)


def unit_dim(kind: str, ndim: int) -> int | None:
    """The dimension that indexes units of an output: features of (B, F) and (B, T, F),
    channels of NCHW-like outputs (and of convolutions and BatchNorm on (B, C, L))."""
    if ndim < 2:
        return None
    if ndim == 3 and kind not in ("conv", "batchnorm", "groupnorm"):
        return 2
    return 1


def off_mask(kind: str, X: Tensor) -> Tensor:
    """Where a saturating or rectifying unit passes (almost) no gradient."""
    if kind == "tanh":
        return X.abs() > TANH_SATURATION
    if kind == "sigmoid":
        return (X - 0.5).abs() > 0.5 - SIGMOID_SATURATION
    return X <= 0  # ReLU: exactly zero; LeakyReLU: the leaky side


class Row(NamedTuple):
    """One measured tensor. ``section``: layer (an output) | layer_grad (its gradient) |
    layer_in (a weight layer's input) | param | param_grad; ``name``: the key it merges
    into (a module called k times gives k rows of one name). A tuple: a step's rows are
    the key of its cached ``Plan``, hashed and compared each record step (~200 rows for
    the GPT), which a tuple does in C."""

    section: str
    name: str
    shape: tuple[int, ...]
    kind: str = "other"

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class RowStats:
    """Sufficient statistics of some rows, on the device: ``keys[i] = (section, name)``
    of row i, ``values (rows, N_STATS)`` float64, and per-unit off masks
    ``units[j] = (row, mask (U,) float: 1 = off for every example)``."""

    keys: list[tuple[str, str]]
    values: Tensor
    units: list[tuple[int, Tensor]] = field(default_factory=list)
    calls: list[int] | None = None  # calls each row already pools (None: one each)


@dataclass
class Merged:
    """Statistics per key (``keys`` in first-seen order): ``values (K, N_STATS)`` with
    n, mean, M2, min, max, off; ``calls[k]`` rows merged; ``unit_off[key]`` per-unit
    masks (AND over calls)."""

    keys: list[tuple[str, str]]
    values: Tensor
    calls: list[int]
    unit_off: dict[tuple[str, str], Tensor]

    def index(self) -> dict[tuple[str, str], int]:
        return {k: i for i, k in enumerate(self.keys)}


_LAST = "last"  # merge's cache: (the keys list of the last single part, its entry)


def merge(parts: list[RowStats], cache: dict | None = None) -> Merged:
    """Pool rows with the same key: N, mean, M2 by Chan's formula, min/max, off counts
    summed, unit masks multiplied (off for every example of every call)."""
    parts = [p for p in parts if p.keys]
    if not parts:
        return Merged([], torch.zeros(0, N_STATS, dtype=torch.float64), [], {})
    values = parts[0].values if len(parts) == 1 else torch.cat([p.values for p in parts])
    # one part whose keys are the very list of the last call (a Plan's keys, reused
    # every record step): its entry without hashing ~100 keys again
    same = len(parts) == 1 and parts[0].calls is None
    entry = None
    if cache is not None and same:
        last = cache.get(_LAST)
        if last is not None and last[0] is parts[0].keys:
            entry = last[1]
    if entry is None:
        row_keys = [k for p in parts for k in p.keys]
        row_calls = [c for p in parts for c in (p.calls or [1] * len(p.keys))]
        signature = (tuple(row_keys), tuple(row_calls))
        entry = cache.get(signature) if cache is not None else None
    if entry is None:
        order: dict[tuple[str, str], int] = {}
        for k in row_keys:
            order.setdefault(k, len(order))
        idx_list = [order[k] for k in row_keys]
        calls = [0] * len(order)
        for i, c in zip(idx_list, row_calls, strict=True):
            calls[i] += c
        idx = torch.tensor(idx_list, device=values.device)
        entry = (list(order), idx, calls)
        if cache is not None:
            if len(cache) > 32:  # shapes keep changing: do not grow without bound
                cache.clear()
            cache[signature] = entry
    if cache is not None and same:
        cache[_LAST] = (parts[0].keys, entry)
    keys, idx, calls = entry
    # nothing to pool: keep the rows' own numbers exactly
    out = values if len(keys) == values.shape[0] else pool(values, idx, len(keys))
    unit_off: dict[tuple[str, str], Tensor] = {}
    by_key: dict[tuple[str, str], list[Tensor]] = defaultdict(list)
    for p in parts:
        for row, mask in p.units:
            by_key[p.keys[row]].append(mask)
    for key, masks in by_key.items():
        shapes = {m.shape for m in masks}
        if len(shapes) == 1:
            unit_off[key] = masks[0] if len(masks) == 1 else torch.stack(masks).amin(0)
    return Merged(keys, out, calls, unit_off)


def _f32(t: Tensor) -> Tensor:
    """``t`` itself when the native kernel can read it (float32, contiguous), else a
    contiguous float32 copy of its values."""
    if t.dtype == torch.float32 and t.is_contiguous():
        return t
    return t.detach().reshape(-1).float().contiguous()


def _f32_all(ts: list[Tensor]) -> list[Tensor]:
    """``_f32`` of each tensor; the list itself when the kernels can read them all where
    they lie already (``native.readable``; the usual case: ~0.5 us of Python per tensor
    saved)."""
    if native.readable(ts):
        return list(ts)
    return [_f32(t) for t in ts]


@dataclass
class _KindGroup:
    kind: str
    shape: tuple[int, ...]
    index: Tensor  # rows of the numel group's X
    positions: list[int]  # the same, as ints (rows of the group)
    rows: Tensor  # the same rows of the whole RowStats (the group's first row + index)

    def off(self, X: Tensor) -> tuple[Tensor, Tensor | None]:
        """Of this group's rows ``X (k, numel)``: the values off per row (float64), and
        per row and unit 1.0 where the unit is off for every example (None when the
        output has no unit dimension)."""
        mask = off_mask(self.kind, X)
        counts = mask.sum(1, dtype=torch.float64)
        ud = unit_dim(self.kind, len(self.shape))
        if ud is None:
            return counts, None
        per_unit = mask.view(-1, *self.shape).movedim(ud + 1, -1)
        per_unit = per_unit.reshape(len(self.positions), -1, self.shape[ud])
        return counts, per_unit.all(1).to(torch.float64)


@dataclass
class _Group:
    numel: int
    members: list[int]  # indices into Plan.rows, in stack order
    params: slice | None  # where parameter data sits in the stack (for updates)
    kinds: list[_KindGroup]
    n_hist: int  # the first n_hist rows get histograms (outputs, their grads, param grads)


#: the off thresholds of ``off_mask`` as ``plumb.native.Rows`` takes them (float32 there)
_OFF_THRESHOLD = {"tanh": TANH_SATURATION, "sigmoid": 0.5 - SIGMOID_SATURATION}


def _satmap_host(kind: str, x: np.ndarray, ud: int) -> Tensor:
    """``Plan.satmap`` of a float32 CPU output on its host array (no tensor operation):
    ``off_mask``'s comparisons in float32, the fraction off over each example's
    positions (a float32 mean of 0/1: exact sum, one division), as float16."""
    if kind == "tanh":
        mask = np.abs(x) > np.float32(TANH_SATURATION)
    elif kind == "sigmoid":
        mask = np.abs(x - np.float32(0.5)) > np.float32(0.5 - SIGMOID_SATURATION)
    else:
        mask = x <= 0
    mask = np.moveaxis(mask, ud, -1).reshape(x.shape[0], -1, x.shape[ud])
    frac = mask.sum(1, dtype=np.float32) / np.float32(mask.shape[1])
    return torch.from_numpy(np.ascontiguousarray(frac[:256, :256]).astype(np.float16))


def _bin_scale(lo: np.ndarray, hi: np.ndarray, bins: int) -> np.ndarray:
    """``bin_indices``' scale, bins / max(hi - lo, tiny), in float32 as torch computes
    ``bins / t``: t's reciprocal times bins (two roundings)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        width = np.maximum(hi - lo, np.finfo(np.float32).tiny)  # NaN stays NaN
        return (np.float32(1.0) / width) * np.float32(bins)


class NativeRows:
    """``Plan.row_values`` of fixed tensors on the CPU, its native calls' arguments built
    once (``Plan.native_rows``): every row's mean, M2, min, max by ``plumb.native``'s
    statistics kernel (float32 runs summed in float64, each tensor read where it lies),
    and the saturating and rectifying outputs' off counts and all-off units by its off
    kernel (``off_mask``'s comparisons in float32: the masks ``_KindGroup.off`` gives),
    written by the kernels into one new buffer per ``run``.

    The buffer (``run()``'s result) holds the (rows, N_STATS) values (N from a template),
    then each masked row's fraction of units off, in row order: what ``Probes`` lays out
    as a record step's snapshot when no two rows share a key (nothing to pool), so that
    it can take the buffer as it is (``plumb.probes.Measured.flat``). ``row_values``
    gives ``Plan.row_values``' (values, units, groups) of a run, as views;
    ``dead_stack`` the masks as one (k, U) tensor in row order when they share a
    length, else None."""

    def __init__(
        self,
        rows: native.Rows,
        numels: tuple[float, ...],
        unit_rows: list[int],
        groups: list[list[Tensor]],
    ):
        self.rows, self.groups = rows, groups
        n, k = len(numels), len(unit_rows)
        self.n = n
        self.template = torch.zeros(n * N_STATS + k, dtype=torch.float64)
        self.template[: n * N_STATS].view(n, N_STATS)[:, Stat.N] = torch.tensor(
            numels, dtype=torch.float64
        )
        rows.set_layout(N_STATS, Stat.MEAN, Stat.OFF, n * N_STATS if k else None)
        self.unit_rows = unit_rows
        self.unit_sizes = [u for u in rows.units if u > 0]
        in_order = unit_rows == sorted(unit_rows)
        same = len(set(self.unit_sizes)) == 1
        self.stack_shape = (k, self.unit_sizes[0]) if same and in_order else None

    def run(self) -> tuple[Tensor, np.ndarray]:
        """Measure the tensors now: (the new buffer: values, then dead fractions; the
        units' all-off flags, concatenated)."""
        flat = self.template.clone()
        return flat, self.rows.fill(flat)

    def row_values(
        self, measured: tuple[Tensor, np.ndarray]
    ) -> tuple[Tensor, list[tuple[int, Tensor]], list[list[Tensor]]]:
        """Of a ``run``'s result: (values (rows, N_STATS), [(row, its units' all-off
        flags)], the groups' flat tensors), ``Plan.row_values``' result, as views."""
        flat, all_off = measured
        values = flat[: self.n * N_STATS].view(self.n, N_STATS)
        masks = torch.from_numpy(all_off).split(self.unit_sizes) if self.unit_sizes else ()
        return values, list(zip(self.unit_rows, masks, strict=True)), self.groups

    def dead_stack(self, measured: tuple[Tensor, np.ndarray]) -> Tensor | None:
        """Of a ``run``'s result: the all-off flags as (masked rows, U) in row order, or
        None (lengths differ)."""
        if self.stack_shape is None:
            return None
        return torch.from_numpy(measured[1].reshape(self.stack_shape))


class Plan:
    """Grouping, offsets and keys for one set of row shapes, built once and reused.

    ``row_stats`` gives the rows' sufficient statistics (``RowStats``: the stacked rows in
    group order, then the parameter updates); ``histograms`` counts the rows' values on
    their key's merged [min, max]."""

    def __init__(self, rows: list[Row], bins: int, satmap_layer: str | None, device):
        self.rows, self.bins, self.satmap_layer = rows, bins, satmap_layer
        # histogrammed sections first, so each group's histogram rows are one slice of X
        order = {"layer": 0, "layer_grad": 1, "param_grad": 2, "layer_in": 3, "param": 4}
        by_numel: dict[int, list[int]] = defaultdict(list)
        for i, r in enumerate(rows):
            by_numel[r.numel].append(i)
        self.groups: list[_Group] = []
        self.keys: list[tuple[str, str]] = []  # one per stacked row (+ update rows)
        self.kinds_of: list[str] = []
        numels: list[float] = []  # the N column: each row's element count
        for numel, members in by_numel.items():
            members.sort(key=lambda i: order[rows[i].section])
            secs = [rows[i].section for i in members]
            params = None
            if "param" in secs:
                params = slice(secs.index("param"), len(secs) - secs[::-1].index("param"))
            kinds = self._kind_groups(members, len(self.keys), device)
            n_hist = sum(s in HISTOGRAMS for s in secs)
            self.groups.append(_Group(numel, members, params, kinds, n_hist))
            self.keys += [(rows[i].section, rows[i].name) for i in members]
            if params is not None:
                self.keys += [("param_update", rows[i].name) for i in members[params]]
            numels += [float(numel)] * (len(self.keys) - len(numels))
        self.numels = tuple(numels)
        self.satmap_row: tuple[int, int] | None = None  # (group, kind-group position)
        for gi, g in enumerate(self.groups):
            for kg in g.kinds:
                for pos in kg.positions:
                    if self.satmap_row is None and rows[g.members[pos]].name == satmap_layer:
                        self.satmap_row = (gi, pos)

    def _kind_groups(self, members: list[int], base: int, device) -> list[_KindGroup]:
        by_kind: dict[tuple[str, tuple[int, ...]], list[int]] = defaultdict(list)
        for pos, i in enumerate(members):
            r = self.rows[i]
            if r.section == "layer" and r.kind in SATURATING + RECTIFYING:
                by_kind[(r.kind, r.shape)].append(pos)
        return [
            _KindGroup(
                kind,
                shape,
                torch.tensor(pos, device=device),
                pos,
                torch.tensor([base + p for p in pos], device=device),
            )
            for (kind, shape), pos in by_kind.items()
        ]

    @torch.no_grad()
    def row_stats(
        self,
        tensors: list[Tensor],
        prev: dict[int, Tensor],
        satmap: bool = False,
        stacks: bool = True,
    ) -> tuple[RowStats, list[Tensor | None], Tensor | None]:
        """Statistics of ``tensors`` (one per row, in ``rows`` order). ``prev[numel]`` holds
        the stacked parameter data before the update (rows in the group's param order).

        Returns the RowStats, the stacked groups (for ``histograms``) and the saturation
        map (examples x units, fraction off) of the saturation layer's first call.
        ``stacks=False`` (a record step without histograms): a group larger than
        ``CHUNK_BYTES`` is reduced a chunk of rows at a time and not kept (None)."""
        values, units, kept, smap = self.row_values(tensors, prev, satmap, stacks)
        return RowStats(self.keys, values, units), kept, smap

    @torch.no_grad()
    def row_values(
        self,
        tensors: list[Tensor],
        prev: dict[int, Tensor],
        satmap: bool = False,
        stacks: bool = True,
        native_rows: bool = True,
    ) -> tuple[Tensor, list[tuple[int, Tensor]], list, Tensor | None]:
        """``row_stats`` without the keys: (values, units, stacked groups, saturation
        map). A compiled graph calls this one: reading ``keys`` there would make
        torch.compile guard every key string on every call. On the CPU the groups are
        ``plumb.native``'s (per group, its rows' flat tensors, not one stack) unless
        ``native_rows`` is False (the fused step: its graph wants the stacks)."""
        parts: list[Tensor] = []  # per group (rows, 4) float32: mean, centred norm, min, max
        offs: list[tuple[Tensor, Tensor]] = []  # (rows of the RowStats, their off counts)
        kept: list[Tensor | None] = []
        units: list[tuple[int, Tensor]] = []
        smap = None
        if native_rows and self._native_ok(tensors):
            values, units, flat = self._native(tensors, prev)
            if satmap and self.satmap_row is not None:
                smap = self.satmap(flat)
            return values, units, flat if stacks or satmap else [None] * len(flat), smap
        base = 0
        for gi, g in enumerate(self.groups):
            if (
                not (stacks or satmap)
                and len(g.members) > 1
                and 4 * g.numel * len(g.members) > CHUNK_BYTES
            ):
                part = self._chunked(g, tensors, prev, offs)
                units += [(base + pos, mask) for pos, mask in part[1]]
                parts.append(part[0])
                kept.append(None)
                base += part[0].shape[0]
                continue
            if len(g.members) == 1:  # a view, no copy
                X = tensors[g.members[0]].detach().reshape(1, -1)
            else:
                X = torch.stack([tensors[i].detach().reshape(-1) for i in g.members])
            if X.dtype != torch.float32:
                X = X.float()
            kept.append(X)
            if g.params is not None:
                k = g.params.stop - g.params.start
                if g.numel in prev:
                    upd = X.narrow(0, g.params.start, k) - prev[g.numel]
                else:  # no snapshot of the parameters before the update: NaN rows
                    upd = X.new_full((k, g.numel), float("nan"))
                X = torch.cat([X, upd])
            mean = X.mean(1)
            norm = torch.linalg.vector_norm(X - mean.unsqueeze(1), dim=1)
            parts.append(torch.stack([mean, norm, X.amin(1), X.amax(1)], 1))
            for kg in g.kinds:
                counts, all_off = kg.off(X.index_select(0, kg.index))
                offs.append((kg.rows, counts))
                if all_off is None:
                    continue
                for j, pos in enumerate(kg.positions):
                    units.append((base + pos, all_off[j]))
                if satmap and self.satmap_row is not None and self.satmap_row[0] == gi:
                    smap = self.satmap(kept) if smap is None else smap
            base += X.shape[0]
        if not parts:
            return torch.zeros(0, N_STATS, dtype=torch.float64), units, kept, smap
        return self._assemble(parts, offs), units, kept, smap

    def _assemble(self, parts: list[Tensor], offs: list[tuple[Tensor, Tensor]]) -> Tensor:
        """The (rows, N_STATS) float64 values from the groups' float32 (mean, centred
        norm, min, max) and the off counts: N, mean, M2 = norm^2 (squared in float64),
        min, max, off; one conversion and one assembly for all groups."""
        m = torch.cat(parts).double() if len(parts) > 1 else parts[0].double()
        off = torch.zeros(m.shape[0], dtype=torch.float64, device=m.device)
        for rows, counts in offs:
            off.index_copy_(0, rows, counts)
        n = torch.tensor(self.numels, dtype=torch.float64, device=m.device)
        m2 = m[:, 1:2].square()
        return torch.cat([n.unsqueeze(1), m[:, :1], m2, m[:, 2:], off.unsqueeze(1)], 1)

    def _native_ok(self, tensors: list[Tensor]) -> bool:
        """The native statistics apply: CPU tensors, outside a compiled graph, and the
        library built (``plumb.native``)."""
        if not tensors or torch.compiler.is_compiling():
            return False
        if not all(t.is_cpu for t in tensors):
            return False
        return native.available()

    def _native(
        self, tensors: list[Tensor], prev: dict[int, Tensor]
    ) -> tuple[Tensor, list[tuple[int, Tensor]], list[list[Tensor]]]:
        """``row_values`` on the CPU (``NativeRows``, built for this call)."""
        rows = self.native_rows(tensors, prev)
        return rows.row_values(rows.run())

    def native_rows(
        self,
        tensors: list[Tensor],
        prev: dict[int, list[Tensor]],
        updates: dict[int, list[Tensor]] | None = None,
    ) -> NativeRows:
        """``row_values`` of ``tensors`` (one per row; ``prev[numel]``: the parameters'
        values before the update, in the group's param order; or ``updates[numel]``: the
        updates themselves, value after - value before in float32, as a step that applies
        them can keep them) as a ``NativeRows``, whose ``run()`` reads the tensors' values
        at the call: a caller that measures the same tensors every record step builds it
        once."""
        groups: list[list[Tensor]] = []
        xs: list[Tensor] = []
        # update rows with no snapshot before the update: NaN (native.Rows.MISSING)
        bs: list[Tensor | str | None] = []
        offs: list[tuple[Tensor, str, float, int, int]] = []
        off_rows: list[int] = []
        unit_rows: list[int] = []
        for g in self.groups:
            base = len(xs)
            flat = _f32_all([tensors[i] for i in g.members])  # as they lie, when they can
            groups.append(flat)
            xs += flat
            bs += [None] * len(flat)
            if g.params is not None and updates is not None and g.numel in updates:
                xs += _f32_all(updates[g.numel])
                bs += [None] * (g.params.stop - g.params.start)
            elif g.params is not None:
                before = prev.get(g.numel)
                for j, p in enumerate(flat[g.params]):
                    xs.append(p)
                    bs.append(_f32(before[j]) if before is not None else native.Rows.MISSING)
            for kg in g.kinds:
                ud = unit_dim(kg.kind, len(kg.shape))
                units = 0 if ud is None else kg.shape[ud]
                inner = 1 if ud is None else math.prod(kg.shape[ud + 1 :])
                for pos in kg.positions:
                    offs.append(
                        (flat[pos], kg.kind, _OFF_THRESHOLD.get(kg.kind, 0.0), units, inner)
                    )
                    off_rows.append(base + pos)
                    if units:
                        unit_rows.append(base + pos)
        ranked = {r: i for i, r in enumerate(sorted(unit_rows))}  # a fraction per unit row
        dead = [
            ranked[r] if units else -1
            for r, (_, _, _, units, _) in zip(off_rows, offs, strict=True)
        ]
        rows = native.Rows(xs, bs, offs, off_rows, dead)
        return NativeRows(rows, self.numels, unit_rows, groups)

    def _chunked(
        self,
        g: _Group,
        tensors: list[Tensor],
        prev: dict[int, Tensor],
        offs: list[tuple[Tensor, Tensor]],
    ) -> tuple[Tensor, list[tuple[int, Tensor]]]:
        """``row_values`` of one large group without stacking it whole: the same numbers
        (rows, then the parameter updates: (rows, 4) float32 mean, centred norm, min,
        max; off counts appended to ``offs``), computed ``CHUNK_BYTES`` of rows at a time
        so that the stacked rows and their centred copy stay in cache."""
        flat = [tensors[i].detach().reshape(-1) for i in g.members]
        rows: list[Tensor] = list(flat)
        if g.params is not None:
            before = prev.get(g.numel)
            for j, p in enumerate(flat[g.params]):
                rows.append(
                    p.float() - before[j]
                    if before is not None
                    else p.new_full(p.shape, float("nan"))
                )
        per = max(1, CHUNK_BYTES // (4 * g.numel))
        parts = []
        for start in range(0, len(rows), per):
            X = torch.stack(rows[start : start + per])
            if X.dtype != torch.float32:
                X = X.float()
            mean = X.mean(1)
            norm = torch.linalg.vector_norm(X - mean.unsqueeze(1), dim=1)
            parts.append(torch.stack([mean, norm, X.amin(1), X.amax(1)], 1))
        unit_rows = []
        for kg in g.kinds:
            counts, all_off = kg.off(torch.stack([flat[pos] for pos in kg.positions]).float())
            offs.append((kg.rows, counts))
            if all_off is None:
                continue
            unit_rows += [(pos, all_off[j]) for j, pos in enumerate(kg.positions)]
        return torch.cat(parts), unit_rows

    def satmap(self, stacks: list[Tensor]) -> Tensor | None:
        """(examples, units) fraction of positions off, of the saturation layer's first
        call (at most 256 x 256, float16), from the stacked groups of ``row_stats``."""
        if self.satmap_row is None:
            return None
        gi, pos = self.satmap_row
        row = self.rows[self.groups[gi].members[pos]]
        ud = unit_dim(row.kind, len(row.shape))
        if ud is None:
            return None
        x = stacks[gi][pos]
        if x.is_cpu and x.dtype == torch.float32 and x.is_contiguous():
            return _satmap_host(row.kind, x.numpy().reshape(row.shape), ud)
        mask = off_mask(row.kind, x.view(row.shape)).movedim(ud, -1)
        m = mask.reshape(row.shape[0], -1, row.shape[ud]).float().mean(1)
        return m[:256, :256].to(torch.float16)

    def unit_rows(self) -> list[int]:
        """The RowStats row of each per-unit mask ``row_stats`` returns, in its order."""
        out, base = [], 0
        for g in self.groups:
            for kg in g.kinds:
                if unit_dim(kg.kind, len(kg.shape)) is not None:
                    out += [base + pos for pos in kg.positions]
            base += len(g.members) + (0 if g.params is None else g.params.stop - g.params.start)
        return out

    def param_rows(self) -> dict[int, list[int]]:
        """numel -> the rows (indices into ``rows``) of the parameters whose values before
        the update ``row_stats`` wants stacked in ``prev[numel]``, in that order."""
        out = {}
        for g in self.groups:
            if g.params is not None:
                out[g.numel] = g.members[g.params]
        return out

    @torch.no_grad()
    def histograms(
        self, stacks: list[Tensor], merged: Merged, hist_keys: list[tuple[str, str]]
    ) -> Tensor:
        """(len(hist_keys), bins) counts of every held row's values on its key's merged
        [min, max] (``bins`` equal bins; NaN values count in bin 0)."""
        where = {k: i for i, k in enumerate(hist_keys)}
        at = merged.index()
        rows = self.hist_rows()
        keep = [(r, k) for r, k in rows if k in where]
        kidx = torch.tensor([at[k] for _, k in keep], device=merged.values.device)
        lo = merged.values[kidx, Stat.MIN].float()
        hi = merged.values[kidx, Stat.MAX].float()
        return self.count(
            stacks, [r for r, _ in keep], [where[k] for _, k in keep], lo, hi, len(hist_keys)
        )

    def hist_rows(self) -> list[tuple[tuple[int, int], tuple[str, str]]]:
        """((group, row in the group's stack), key) of every histogrammed row."""
        out, base = [], 0
        for gi, g in enumerate(self.groups):
            out += [((gi, j), self.keys[base + j]) for j in range(g.n_hist)]
            base += len(g.members) + (0 if g.params is None else g.params.stop - g.params.start)
        return out

    def native_histograms(
        self,
        stacks: list[list[Tensor]],
        rows: list[tuple[int, int]],
        slots: list[int],
        n_slots: int,
    ) -> native.Histograms:
        """``count``'s native call on ``row_values``' native rows (lists of flat tensors),
        its arguments built once for ``count_native``."""
        xs = [stacks[gi][j] for gi, j in rows]
        return native.Histograms(xs, slots, n_slots, self.bins)

    def count_native(
        self, hists: native.Histograms, lo: Tensor | np.ndarray, hi: Tensor | np.ndarray
    ) -> Tensor:
        """``count`` by ``hists`` (``native_histograms``): a new (n_slots, bins) table, the
        bins of ``bin_indices`` by the same float32 arithmetic (host arrays: no tensor
        operation, ~10 fewer on a record step)."""
        lo = np.asarray(lo, dtype=np.float32)
        hi = np.asarray(hi, dtype=np.float32)
        return torch.from_numpy(hists.counts(lo, _bin_scale(lo, hi, self.bins)))

    def bin_indices(
        self,
        stacks: list[Tensor],
        rows: list[tuple[int, int]],
        slots: list[int],
        lo: Tensor,
        hi: Tensor,
        dtype: torch.dtype = torch.int64,
    ) -> list[Tensor]:
        """Per group of ``rows`` ((group, row) of ``stacks``), the index slot * bins + bin
        of each value (flat, ``dtype``), on ``bins`` equal bins over [lo, hi] (per row):
        bin of x = floor((x - lo) * bins / (hi - lo)), clamped to [0, bins - 1]; NaN in
        bin 0. Static shapes: it also runs inside a compiled graph."""
        device = lo.device
        by_group: dict[int, list[int]] = defaultdict(list)
        for k, (gi, _) in enumerate(rows):
            by_group[gi].append(k)
        idx = []
        for gi, ks in by_group.items():
            picked = [rows[k][1] for k in ks]
            if picked == list(range(len(picked))):  # the group's first rows: a view
                X = stacks[gi].narrow(0, 0, len(picked))
            else:
                X = stacks[gi][picked]
            sel = torch.tensor(ks, device=device)
            a, b = lo[sel], hi[sel]
            scale = self.bins / (b - a).clamp_min(torch.finfo(torch.float32).tiny)
            Y = X - a.unsqueeze(1)  # a new tensor: the rest in place, one pass each
            Y.mul_(scale.unsqueeze(1))
            Y.nan_to_num_(0.0, posinf=self.bins - 1, neginf=0.0).clamp_(0, self.bins - 1)
            offset = torch.tensor([slots[k] * self.bins for k in ks], device=device)
            bin_of = Y.to(dtype)
            bin_of += offset.unsqueeze(1).to(dtype)
            idx.append(bin_of.reshape(-1))
        return idx

    def count(
        self,
        stacks: list[Tensor],
        rows: list[tuple[int, int]],
        slots: list[int],
        lo: Tensor,
        hi: Tensor,
        n_slots: int,
    ) -> Tensor:
        """Counts of ``rows`` ((group, row) of ``stacks``) on their bins (``bin_indices``),
        added into ``slots`` of an (n_slots, bins) table: with ``row_values``' native rows
        (lists of flat tensors) one ``plumb.native.histograms`` call, the same bins by the
        same float32 arithmetic; eager on the CPU one int32
        ``bincount`` per group (~3x faster than a scatter, same counts); in a graph or on
        a GPU, where bincount would read its output size back to the host, one
        static-shape scatter-add for all."""
        counts = torch.zeros(n_slots * self.bins, dtype=torch.int64, device=lo.device)
        if not rows:
            return counts.view(n_slots, self.bins)
        if isinstance(stacks[rows[0][0]], list):  # plumb.native's rows: each tensor in place
            return self.count_native(self.native_histograms(stacks, rows, slots, n_slots), lo, hi)
        scatter = torch.compiler.is_compiling() or lo.device.type != "cpu"
        idx = self.bin_indices(stacks, rows, slots, lo, hi, torch.int64 if scatter else torch.int32)
        if scatter:
            flat = torch.cat(idx) if len(idx) > 1 else idx[0]
            counts.scatter_add_(0, flat, torch.ones_like(flat))
        else:
            for bin_of in idx:
                counts += torch.bincount(bin_of, minlength=n_slots * self.bins)
        return counts.view(n_slots, self.bins)


def summary(stats: np.ndarray) -> dict[str, np.ndarray]:
    """Host-side statistics of merged keys, one row ``(n, mean, M2, min, max, off)``
    each, computed for all rows at once: per row mean, std = sqrt(M2 / (n - 1)) (0 for
    n = 1), rms = sqrt(M2 / n + mean^2), min, max and off = off / n (the fraction
    saturated or zero; read only for saturating/rectifying layers). NaN where a
    statistic is undefined (n = 0, a NaN M2). Arrays (float64), row order kept; every
    operation is elementwise and correctly rounded, so a row's numbers do not depend on
    the rows decoded with it."""
    n, mean, m2 = stats[:, Stat.N], stats[:, Stat.MEAN], stats[:, Stat.M2]
    with np.errstate(divide="ignore", invalid="ignore"):
        std = np.where(n > 1, np.sqrt(m2 / (n - 1)), np.where(n == 1, 0.0, np.nan))
        rms = np.where(n > 0, np.sqrt(m2 / n + mean * mean), np.nan)
        off = np.where(n != 0, stats[:, Stat.OFF] / n, np.nan)
    return {
        "mean": mean,
        "std": std,
        "rms": rms,
        "min": stats[:, Stat.MIN],
        "max": stats[:, Stat.MAX],
        "off": off,
    }


def merge_ranks(
    merged: Merged,
    replicated: set[tuple[str, str]],
    extra: Tensor | None = None,
    summed: list[bool] | None = None,
) -> tuple[Merged, Tensor | None]:
    """The global statistics of ``merged`` (this rank's, per key) over the ranks of the
    default process group: one ``all_gather`` of the values and unit masks, pooled by
    ``pool`` (the ranks' rows of a key are its calls). Keys in ``replicated`` keep this
    rank's values (a DDP parameter is the same on every rank); unit masks are ANDed.
    ``extra`` (1-D) travels in the same collective: entries where ``summed`` is True come
    back summed over the ranks, the others as this rank's. Every rank must record the
    same keys (the same model and forward)."""
    _, size = world()
    if size == 1:
        return merged, extra
    keys = sorted(merged.keys)  # one order on every rank, whatever order each saw first
    at = merged.index()
    idx = torch.tensor([at[k] for k in keys], device=merged.values.device)
    vals = merged.values.index_select(0, idx)
    mask_keys = [k for k in keys if k in merged.unit_off]
    parts = [vals.reshape(-1)] + [merged.unit_off[k].double().reshape(-1) for k in mask_keys]
    n_extra = 0 if extra is None else extra.numel()
    if extra is not None:
        parts.append(extra.double().to(vals.device).reshape(-1))
    payload = torch.cat(parts)
    per = all_gather(payload).view(size, -1)
    K = len(keys)
    rows = per[:, : K * N_STATS].reshape(size * K, N_STATS)
    out = pool(rows, torch.arange(K, device=rows.device).repeat(size), K)
    keep = [i for i, k in enumerate(keys) if k in replicated]
    if keep:
        ki = torch.tensor(keep, device=out.device)
        out[ki] = vals[ki]
    unit_off = {}
    offset = K * N_STATS
    for k in mask_keys:
        m = merged.unit_off[k]
        unit_off[k] = per[:, offset : offset + m.numel()].prod(0).view_as(m).to(m.dtype)
        offset += m.numel()
    calls = [merged.calls[at[k]] for k in keys]
    if extra is not None:
        ex = per[:, offset : offset + n_extra]
        mask = torch.tensor(summed or [False] * n_extra, device=ex.device)
        extra = torch.where(mask, ex.sum(0), payload[offset : offset + n_extra])
    return Merged(keys, out, calls, unit_off), extra
