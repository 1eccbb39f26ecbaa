"""What a record step hands on: ``Measured`` (an engine's statistics before they are
merged per key), ``Snapshot`` (merged, still on the device) and its ``Layout`` (how the
host reads the values; ``plumb.record.decode``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from plumb.stats import Merged, Plan, RowStats


@dataclass
class LayerInfo:
    name: str
    type: str
    kind: str


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
    # the model's output (logits) and its gradient, from an engine without hooks
    output: Tensor | None = None
    output_grad: Tensor | None = None
    # an engine that measures the same tensors every record step (plumb.fused): its
    # values already laid out as the snapshot's (merged rows, then dead fractions:
    # ``plumb.stats.NativeRows``), the dead-unit masks stacked in that order (or None),
    # and the object that stands for their layout (the same while it is the same)
    flat: Tensor | None = None
    dead_stack: Tensor | None = None
    source: object = None
    # ``stats`` computed when asked (the same engine: its rows are needed only until
    # ``Probes`` has checked its layout once)
    stats_of: Callable[[], list[RowStats]] | None = None

    def rows(self) -> list[RowStats]:
        """``stats``, or ``stats_of()``."""
        return self.stats if self.stats_of is None else self.stats_of()


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


def dense(t: Tensor) -> Tensor:
    """A sparse gradient (``nn.Embedding(sparse=True)``) as the dense tensor it stands
    for (rows no example touched are zeros), so that its statistics are those of the same
    gradient held densely: a copy the size of the parameter, on record steps only."""
    return t.to_dense() if t.layout != torch.strided else t


def as_rows(merged: Merged) -> RowStats:
    """Merged statistics as rows again (to merge further)."""
    units = [(i, merged.unit_off[k]) for i, k in enumerate(merged.keys) if k in merged.unit_off]
    return RowStats(list(merged.keys), merged.values, units, list(merged.calls))
