"""What the rules read: the Monitor's statistics and the watch's observations, indexed the
way the rules ask for them (call order, weight layers, windows of steps)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from plumb.doctor.watch import Seen


def finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def median(values: list[float]) -> float:
    v = [x for x in values if finite(x)]
    return float(np.median(v)) if v else float("nan")


@dataclass
class Evidence:
    """Everything one diagnosis knows, on the host."""

    loss: np.ndarray  # training loss of every step (step 0: before the first update)
    rows: list[dict[str, Any]]  # Monitor rows, one per record step
    order: list[str]  # probed layer keys in forward-call order
    kinds: dict[str, str]  # module name -> probe kind (linear, tanh, batchnorm, ...)
    shapes: dict[str, tuple[int, ...]]  # layer key -> output shape
    params: list[dict[str, Any]]  # {name, shape, layer} (Monitor meta)
    seen: Seen
    classes: int | None = None  # C when the loss is softmax cross-entropy over C outputs
    softmax_loss: bool | None = None  # loss_fn is invariant to a per-row shift of outputs
    lr: float | None = None
    steps: int = 0
    _memo: dict[str, Any] = field(default_factory=dict, repr=False)

    def cached(self, key: str, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per evidence (several rules ask the same question)."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    # ----- windows -----------------------------------------------------------------
    def first_nonfinite_step(self) -> int | None:
        return self.cached("first_nonfinite", self._find_first_nonfinite)

    def _find_first_nonfinite(self) -> int | None:
        bad = [i for i, v in enumerate(self.loss.tolist()) if not math.isfinite(v)]
        first = bad[0] if bad else None
        for row in self.rows:
            if first is not None and row["step"] >= first:
                break
            if not _row_finite(row):
                first = row["step"]
                break
        return first

    @property
    def clean(self) -> list[dict[str, Any]]:
        """Rows before the first non-finite value (statistics after it are meaningless)."""
        stop = self.first_nonfinite_step()
        return self.cached(
            "clean", lambda: [r for r in self.rows if stop is None or r["step"] < stop]
        )

    def init_row(self) -> dict[str, Any] | None:
        rows = self.clean
        return rows[0] if rows and rows[0]["step"] == 0 else None

    def late(self) -> list[dict[str, Any]]:
        """The second half of the clean record steps after step 0 (empty when there are
        none yet: the first update says nothing about the run's pace)."""
        rows = [r for r in self.clean if r["step"] > 0]
        return rows[len(rows) // 2 :]

    def series(self, rows, section: str, name: str, stat: str) -> list[float]:
        return [r[section].get(name, {}).get(stat, float("nan")) for r in rows]

    def late_median(self, section: str, name: str, stat: str) -> float:
        return median(self.series(self.late(), section, name, stat))

    # ----- structure ---------------------------------------------------------------
    def weight_layers(self) -> list[str]:
        """Linear/conv layers in call order (the watch's order, else the Monitor's)."""
        if self.seen.weight_layers:
            return list(self.seen.weight_layers)
        return [k for k in self.order if self.kinds.get(k) in ("linear", "conv")]

    def weight_param(self, layer: str) -> str | None:
        name = f"{layer}.weight" if layer else "weight"
        return name if any(p["name"] == name for p in self.params) else None

    def matrices(self, embeddings: bool = True) -> list[str]:
        """Weights with >= 2 dims, the lecture's update:data plot's set (a norm layer's
        (1, C)-shaped gamma is not a weight matrix)."""
        out = []
        for p in self.params:
            kind = self.kinds.get(p["layer"], "other")
            if len(p["shape"]) < 2 or kind in ("batchnorm", "layernorm", "groupnorm"):
                continue
            if not embeddings and kind == "embedding":
                continue
            out.append(p["name"])
        return out

    def next_layer(self, layer: str) -> str | None:
        if layer not in self.order:
            return None
        i = self.order.index(layer)
        return self.order[i + 1] if i + 1 < len(self.order) else None

    def prev_weight_layer(self, layer: str) -> str | None:
        if layer not in self.order:
            return None
        before = self.order[: self.order.index(layer)]
        for k in reversed(before):
            if self.kinds.get(k) in ("linear", "conv"):
                return k
        return None

    def grad_norm(self, row: dict[str, Any], layer: str) -> float:
        """Per-example norm of dL/d(output): sqrt(n / B) * rms, from mean and std."""
        st = row["layer"].get(layer, {})
        shape = self.shapes.get(layer)
        if "grad_std" not in st or not shape:
            return float("nan")
        per_example = math.prod(shape[1:]) if len(shape) > 1 else 1
        rms = math.sqrt(st["grad_std"] ** 2 + st.get("grad_mean", 0.0) ** 2)
        return rms * math.sqrt(per_example)


def _row_finite(row: dict[str, Any]) -> bool:
    if "loss" in row and not finite(row["loss"]):
        return False
    for section in ("layer", "param"):
        for stats in row[section].values():
            for stat in ("mean", "std", "grad_mean", "grad_std"):
                if stat in stats and not finite(stats[stat]):
                    return False
    return True
