"""The probes' quantities: statistics of many tensors at once, on the device.

A record step measures dozens of tensors (layer outputs, their gradients, parameters,
their gradients, their updates). One kernel launch per tensor per statistic would cost
more than the training step itself, so tensors with the same number of elements are
stacked into rows ``X (k, n)`` and every statistic is a row reduction:

    mean = sum(x) / n
    std  = ||x - mean||_2 / sqrt(n - 1)          (unbiased, as torch.std; centred first,
                                                   so no cancellation when |mean| >> std)
    hist = counts of floor((x - min) / (max - min) * bins), clipped to [0, bins - 1]
           (bins equal bins over [min, max], torch.histogram's default range)

All histograms of a step share one ``bincount`` (rows offset by ``bins``). A ``Plan``
holds what depends only on the set of shapes (grouping, offsets, output keys), built
once and reused every record step.

Derived quantities are computed on the host from these (see ``record.History``):
grad:data = std(grad) / std(p), update:data = log10(std(p_t - p_{t-1}) / std(p_t)).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor

TANH_SATURATION = 0.97  # |t| > 0.97, the lecture's threshold: tanh'(x) = 1 - t^2 < 0.06
# s < 0.015 or s > 0.985: the same x as tanh's 0.97, since s(x) = (1 + tanh(x / 2)) / 2
SIGMOID_SATURATION = 0.015
SATURATING = ("tanh", "sigmoid")
RECTIFYING = ("relu", "leaky_relu")
HISTOGRAMS = ("layer", "layer_grad", "param_grad")  # sections that get histograms


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


@dataclass(frozen=True)
class Row:
    """One measured tensor: ``section`` is layer | layer_grad | param | param_grad."""

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
class _KindGroup:
    kind: str
    shape: tuple[int, ...]
    index: Tensor  # rows of the numel group's X
    names: list[str]


@dataclass
class _Group:
    numel: int
    members: list[int]  # indices into Plan.rows, in stack order
    params: slice | None  # where parameter data sits in the stack (for updates)
    kinds: list[_KindGroup]
    n_hist: int  # the first n_hist rows get histograms (outputs, their grads, param grads)


class Plan:
    """Grouping, offsets and output keys for one set of row shapes.

    Output of ``measure``: ``values`` with ``keys[i] = (section, name, stat)`` and
    ``scales[i]`` (divide on the host: counts become fractions); histograms for
    ``hist_keys[j] = (section, name)``.
    """

    def __init__(self, rows: list[Row], bins: int, satmap_layer: str | None, device):
        self.rows, self.bins, self.satmap_layer = rows, bins, satmap_layer
        # histogrammed sections first, so each group's histogram rows are one slice of X
        order = {"layer": 0, "layer_grad": 1, "param_grad": 2, "param": 3}
        by_numel: dict[int, list[int]] = defaultdict(list)
        for i, r in enumerate(rows):
            by_numel[r.numel].append(i)
        self.groups: list[_Group] = []
        stat_rows: list[tuple[str, str]] = []  # (section, name) per stacked row, in output order
        hist_rows: list[tuple[str, str]] = []
        for numel, members in by_numel.items():
            members.sort(key=lambda i: order[rows[i].section])
            secs = [rows[i].section for i in members]
            params = None
            if "param" in secs:
                params = slice(secs.index("param"), len(secs) - secs[::-1].index("param"))
            kinds = self._kind_groups(members, device)
            n_hist = sum(s in HISTOGRAMS for s in secs)
            self.groups.append(_Group(numel, members, params, kinds, n_hist))
            hist_rows += [(rows[i].section, rows[i].name) for i in members[:n_hist]]
            stat_rows += [(rows[i].section, rows[i].name) for i in members]
            if params is not None:
                stat_rows += [("param_update", rows[i].name) for i in members[params]]
        names = {
            "layer": ("layer", "mean", "std"),
            "layer_grad": ("layer", "grad_mean", "grad_std"),
            "param": ("param", "mean", "std"),
            "param_grad": ("param", "grad_mean", "grad_std"),
            "param_update": ("param", "update_mean", "update_std"),
        }
        self.keys = [(names[s][0], n, names[s][1]) for s, n in stat_rows]
        self.keys += [(names[s][0], n, names[s][2]) for s, n in stat_rows]
        self.scales = [1.0] * len(self.keys)
        for g in self.groups:
            for kg in g.kinds:
                stat = "saturated" if kg.kind in SATURATING else "zero"
                self.keys += [("layer", n, stat) for n in kg.names]
                self.scales += [float(g.numel)] * len(kg.names)
                ud = unit_dim(kg.kind, len(kg.shape))
                if ud is not None:
                    self.keys += [("layer", n, "dead") for n in kg.names]
                    self.scales += [float(kg.shape[ud])] * len(kg.names)
        self.hist_keys = hist_rows
        n_rows = len(hist_rows)
        # bin offsets of each row in the shared bincount, per group
        self._offsets: list[Tensor] = []
        start = 0
        for g in self.groups:
            k = g.n_hist
            self._offsets.append(
                torch.arange(start, start + k, device=device, dtype=torch.float32)[:, None] * bins
            )
            start += k
        assert start == n_rows

    def _kind_groups(self, members: list[int], device) -> list[_KindGroup]:
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
                [self.rows[members[p]].name for p in pos],
            )
            for (kind, shape), pos in by_kind.items()
        ]

    @torch.no_grad()
    def measure(
        self, tensors: list[Tensor], prev: dict[int, Tensor], hist: bool
    ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
        """Statistics of ``tensors`` (one per row, in ``rows`` order). ``prev[numel]`` holds
        the stacked parameter data before the update (rows in the group's param order).

        Returns (values, hist counts (rows, bins) or None, hist ranges (rows, 2) or None,
        saturation map or None)."""
        means, stds, extra, lows, highs, binned = [], [], [], [], [], []
        satmap = None
        for g, offset in zip(self.groups, self._offsets, strict=True):
            X = torch.stack([tensors[i].reshape(-1) for i in g.members])
            if X.dtype != torch.float32:
                X = X.float()
            if g.params is not None and g.numel in prev:
                X = torch.cat([X, X.narrow(0, g.params.start, len(prev[g.numel])) - prev[g.numel]])
            elif g.params is not None:  # no snapshot (cannot happen in Monitor): NaN rows
                k = g.params.stop - g.params.start
                X = torch.cat([X, X.new_full((k, g.numel), float("nan"))])
            mean = X.mean(1)
            means.append(mean)
            stds.append(
                torch.linalg.vector_norm(X - mean.unsqueeze(1), dim=1) / max(g.numel - 1, 1) ** 0.5
            )
            for kg in g.kinds:
                off = off_mask(kg.kind, X.index_select(0, kg.index))
                extra.append(off.sum(1, dtype=torch.float32))
                ud = unit_dim(kg.kind, len(kg.shape))
                if ud is not None:
                    per_unit = off.view(-1, *kg.shape).movedim(ud + 1, -1)
                    per_unit = per_unit.reshape(len(kg.names), -1, kg.shape[ud])
                    extra.append(per_unit.all(1).sum(1, dtype=torch.float32))
                    if hist and self.satmap_layer in kg.names:
                        m = per_unit[kg.names.index(self.satmap_layer)]  # (B*rest, U)
                        m = m.view(kg.shape[0], -1, kg.shape[ud]).float().mean(1)
                        satmap = m[:256, :256].to(torch.float16)
            if hist and g.n_hist:
                X = X.narrow(0, 0, g.n_hist)
                lo, hi = X.amin(1), X.amax(1)
                lows.append(lo)
                highs.append(hi)
                scale = self.bins / (hi - lo).clamp_min(torch.finfo(torch.float32).tiny)
                Y = (X - lo.unsqueeze(1)) * scale.unsqueeze(1)
                Y.nan_to_num_(0.0).clamp_(0, self.bins - 1).add_(offset)  # NaN rows: bin 0
                binned.append(Y.view(-1))
        values = torch.cat(means + stds + extra)
        if not hist:
            return values, None, None, None
        n_rows = len(self.hist_keys)
        idx = torch.cat(binned).int()
        counts = torch.bincount(idx, minlength=n_rows * self.bins).view(n_rows, self.bins)
        ranges = torch.stack([torch.cat(lows), torch.cat(highs)], dim=1)
        return values, counts, ranges, satmap
