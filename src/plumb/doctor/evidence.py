"""What the rules read: the probes' statistics and observations, indexed the way the
rules ask for them (forward order, weight-layer chains, windows of steps), plus what the
doctor measured itself (weight symmetry, the lr test). Nothing here attaches a hook: the
probes (``plumb.probes.Probes``) are the only mechanism that does."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from plumb import nn as pnn
from plumb.kinds import NORMS, WEIGHT_LAYERS, layer_kind
from plumb.probes import Probes
from plumb.probes.watch import BatchNormEvent


def finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def median(values: list[float]) -> float:
    v = [x for x in values if finite(x)]
    return float(np.median(v)) if v else float("nan")


def weight_unit_dim(module: nn.Module) -> int:
    """The dimension of ``module.weight`` that indexes output units: 1 for plumb's
    ``Linear`` (stored (fan_in, fan_out), as the lecture), 0 for torch.nn layers."""
    return 1 if isinstance(module, pnn.Linear) else 0


def symmetry_spread(w: Tensor, dim: int) -> float:
    """||W - mean over units of W|| / ||W||: 0 when every unit (slice along ``dim``) is the
    same vector, ~1 for a random init. An all-zero W counts as symmetric (0)."""
    w = w.detach().double()
    norm = w.norm().item()
    if not math.isfinite(norm):
        return float("nan")
    if norm == 0.0:
        return 0.0
    return (w - w.mean(dim, keepdim=True)).norm().item() / norm


def weight_symmetry(model: nn.Module) -> dict[str, float]:
    """The unit spread of every weight layer with more than one unit."""
    model = getattr(model, "_orig_mod", model)
    out = {}
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if layer_kind(m) not in WEIGHT_LAYERS or not isinstance(w, Tensor) or w.dim() < 2:
            continue
        dim = weight_unit_dim(m)
        if w.shape[dim] > 1:
            out[name] = symmetry_spread(w, dim)
    return out


@dataclass
class LrTest:
    """A short learning-rate test: copies of the model (and optimizer state) from step
    ``start``, trained ``steps`` steps on the same batches at each ``lrs[i]``, then
    evaluated on the same ``eval_batches`` held-out batches (``losses[i]``: their mean;
    inf for a copy that diverged)."""

    start: int
    steps: int
    eval_batches: int
    lr: float
    lrs: list[float]
    losses: list[float]
    per_batch: list[list[float]] = field(repr=False, default_factory=list)

    @property
    def current(self) -> int:
        return min(range(len(self.lrs)), key=lambda i: abs(math.log(self.lrs[i] / self.lr)))

    @property
    def best(self) -> int:
        return min(range(len(self.lrs)), key=lambda i: (self.losses[i], abs(i - self.current)))

    def gain(self, i: int) -> tuple[float, float]:
        """(mean, standard error) of loss(lr_i) - loss(current lr) over the held-out
        batches, paired (the same batches for both)."""
        a, b = np.asarray(self.per_batch[i]), np.asarray(self.per_batch[self.current])
        if not np.all(np.isfinite(a)):
            return math.inf, 0.0
        if not np.all(np.isfinite(b)):
            return -math.inf, 0.0
        d = a - b
        se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.inf
        return float(d.mean()), se

    def significantly_better(self, i: int, z: float) -> bool:
        """lr_i's held-out loss is below the current lr's by more than ``z`` standard
        errors of the paired difference."""
        mean, se = self.gain(i)
        return mean < 0 and (mean == -math.inf or -mean > z * se)

    def table(self) -> str:
        return ", ".join(
            f"{lr:.3g} -> {loss:.4g}" for lr, loss in zip(self.lrs, self.losses, strict=True)
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "start_step": self.start,
            "steps": self.steps,
            "eval_batches": self.eval_batches,
            "lr": self.lr,
            "lrs": self.lrs,
            "held_out_loss": self.losses,
        }


@dataclass
class Evidence:
    """Everything one diagnosis knows, on the host."""

    loss: np.ndarray  # training loss of every step (step 0: before the first update)
    rows: list[dict[str, Any]]  # probe rows, one per record step
    order: list[str]  # probed layer keys in forward order
    kinds: dict[str, str]  # layer key -> probe kind (linear, tanh, batchnorm, ...)
    shapes: dict[str, tuple[int, ...]]  # layer key -> output shape (first call)
    params: list[dict[str, Any]]  # {name, shape, layer, aliases?} (probe meta)
    chains: list[list[str]] = field(default_factory=list)  # weight layers feeding each other
    dead: dict[str, tuple[float, int, int]] = field(default_factory=dict)
    bn_events: dict[tuple[str, str], BatchNormEvent] = field(default_factory=dict)
    model_input: dict[str, float] | None = None
    output: Tensor | None = None  # the first recorded forward's output (CPU)
    symmetry_start: dict[str, float] = field(default_factory=dict)
    symmetry_end: dict[str, float] = field(default_factory=dict)
    classes: int | None = None  # C when the loss is softmax cross-entropy over C outputs
    class_dim: int = 1  # the output dimension that indexes the C classes
    softmax_loss: bool | None = None  # loss_fn is invariant to a per-row shift of outputs
    lr: float | None = None
    steps: int = 0
    lr_test: LrTest | None = None
    lrs: np.ndarray = field(default_factory=lambda: np.empty(0))  # lr used at each step
    loss_graph: list[dict[str, Any]] | None = None  # the loss's ops on the output (loss first)
    target_counts: np.ndarray | None = None  # how often each class was the target
    trainability: dict[str, Any] = field(default_factory=dict)  # see trainability()
    dropout: dict[str, float] = field(default_factory=dict)  # module -> drop probability
    optimizer_kind: str | None = None  # the optimizer's class name
    averaged: int = 0  # iterates in a weight average (plumb.optim.WeightAverage) so far
    input_use: tuple[float, float] | None = None  # (mean, se): loss(x permuted) - loss(x)
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
            if row.get("skipped"):  # a GradScaler step skipped for inf/NaN: not a fault
                continue
            if not _row_finite(row):
                first = row["step"]
                break
        return first

    @property
    def clean(self) -> list[dict[str, Any]]:
        """Rows before the first non-finite value (statistics after it are meaningless)."""
        stop = self.first_nonfinite_step()
        return self.cached(
            "clean",
            lambda: [
                r for r in self.rows if (stop is None or r["step"] < stop) and not r.get("skipped")
            ],
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
        """Linear/conv layers in forward order."""
        return [k for k in self.order if self.kinds.get(k) in WEIGHT_LAYERS]

    def output_layer(self) -> str | None:
        layers = self.weight_layers()
        return layers[-1] if layers else None

    def param(self, name: str) -> dict[str, Any] | None:
        return next((p for p in self.params if p["name"] == name), None)

    def weight_param(self, layer: str) -> str | None:
        """The parameter that is ``layer``'s weight, under the name the record keeps it
        (a tied weight is recorded once, under its first name)."""
        name = f"{layer}.weight" if layer else "weight"
        for p in self.params:
            if p["name"] == name or name in p.get("aliases", ()):
                return p["name"]
        return None

    def tied(self, layer: str) -> str | None:
        """The other name of ``layer``'s weight when it is tied to another module's."""
        name = f"{layer}.weight" if layer else "weight"
        for p in self.params:
            if name in p.get("aliases", ()):
                return p["name"]
            if p["name"] == name and p.get("aliases"):
                return p["aliases"][0]
        return None

    def has_bias(self, layer: str) -> bool:
        name = f"{layer}.bias" if layer else "bias"
        return any(p["name"] == name or name in p.get("aliases", ()) for p in self.params)

    def layer_weights(self) -> list[str]:
        """Weight matrices of the linear/conv layers (each once), output layer included."""
        out: list[str] = []
        for layer in self.weight_layers():
            name = self.weight_param(layer)
            p = self.param(name) if name else None
            if p is not None and len(p["shape"]) >= 2 and name not in out:
                out.append(name)
        return out

    def embeddings(self) -> list[str]:
        return [
            p["name"]
            for p in self.params
            if self.kinds.get(p["layer"]) == "embedding" and len(p["shape"]) >= 2
        ]

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
            if self.kinds.get(k) in WEIGHT_LAYERS:
                return k
        return None

    def is_norm(self, layer: str) -> bool:
        return self.kinds.get(layer) in NORMS

    def grad_norm(self, row: dict[str, Any], layer: str) -> float:
        """Per-example norm of dL/d(output): sqrt(n / B) * rms, from mean and std."""
        st = row["layer"].get(layer, {})
        shape = self.shapes.get(layer)
        if "grad_std" not in st or not shape:
            return float("nan")
        per_example = math.prod(shape[1:]) if len(shape) > 1 else 1
        rms = math.sqrt(st["grad_std"] ** 2 + st.get("grad_mean", 0.0) ** 2)
        return rms * math.sqrt(per_example)

    def summed_loss(self) -> bool:
        """The loss op (the first node of the loss's graph with a reduction) sums rather
        than averages: reduction='sum', or reduction='none' followed by a sum, and the
        sum is not divided afterwards. A division (or a multiplication) between the sum
        and the loss is the user's own normalisation: the Hugging Face Trainer sums the
        tokens' losses and divides by the tokens of the whole accumulation window. Its
        divisor is freed with the graph after backward, so plumb cannot check it and
        takes the division as a mean."""
        path = self.loss_graph or []
        ops = [p["op"] for p in path]
        for i, p in enumerate(path):
            if "reduction" in p:
                scaled = any(op.startswith(("DivBackward", "MulBackward")) for op in ops[:i])
                summed = p["reduction"] == 2 or (p["reduction"] == 0 and "SumBackward0" in ops[:i])
                return summed and not scaled
        return False

    def output_rows(self) -> int | None:
        """Rows of the output a loss adds up: its elements over the class count."""
        y = self.output
        if y is None:
            return None
        return y.numel() // y.shape[self.class_dim] if self.classes and y.dim() > 1 else y.numel()

    def loss_rows(self) -> int:
        """How many rows the loss adds up: 1 when it averages."""
        return max(self.output_rows() or 1, 1) if self.summed_loss() else 1

    def logits(self) -> Tensor | None:
        """The first output with the class dimension last, flattened to (rows, C)."""
        y = self.output
        if y is None or y.dim() < 2 or not torch.isfinite(y).all():
            return None
        return y.movedim(self.class_dim, -1).reshape(-1, y.shape[self.class_dim])


def optimizers_of(optimizer: Any) -> list[Any]:
    """``optimizer`` as a list: one optimizer, several (a list or tuple), or none; a
    framework's wrapper (Accelerate's ``AcceleratedOptimizer``, Lightning's
    ``LightningOptimizer``) is seen through to the torch optimizer inside it."""
    if optimizer is None:
        return []
    opts = list(optimizer) if isinstance(optimizer, list | tuple) else [optimizer]
    return [_unwrap_optimizer(o) for o in opts]


def _unwrap_optimizer(opt: Any) -> Any:
    for _ in range(4):
        if isinstance(opt, torch.optim.Optimizer):
            return opt
        inner = getattr(opt, "optimizer", None) or getattr(opt, "_optimizer", None)
        if inner is None:
            return opt
        opt = inner
    return opt


def trainability(model: nn.Module, optimizer: Any) -> dict[str, Any]:
    """Which parameters can train at all, from the model and its optimizer(s): ``frozen``
    ([name, numel, held by an optimizer]) for requires_grad=False, ``missing`` ([name,
    numel]) for trainable parameters no optimizer holds (only with an optimizer),
    ``orphans`` (tensors an optimizer updates that are not in the model: a module
    replaced, or a tie re-made, after the optimizer was built), ``zero_lr`` (names whose
    param group has lr 0), ``total`` (numel of the model), ``has_optimizer``."""
    model = getattr(model, "_orig_mod", model)
    opts = optimizers_of(optimizer)
    held: dict[int, float] = {}
    for opt in opts:
        for group in getattr(opt, "param_groups", []):
            lr = group.get("lr", None)
            lr = float(lr) if isinstance(lr, int | float | Tensor) else None
            for p in group.get("params", []):
                held[id(p)] = lr if lr is not None else float("nan")
    named = list(model.named_parameters())
    ids = {id(p) for _, p in named}
    return {
        "total": sum(p.numel() for _, p in named),
        "has_optimizer": bool(opts),
        "frozen": [[n, p.numel(), id(p) in held] for n, p in named if not p.requires_grad],
        "missing": [
            [n, p.numel()] for n, p in named if opts and p.requires_grad and id(p) not in held
        ],
        "orphans": sum(1 for i in held if i not in ids),
        "zero_lr": [n for n, p in named if held.get(id(p)) == 0.0],
    }


def dropout_rates(model: nn.Module) -> dict[str, float]:
    """Every dropout module's drop probability (``nn.Dropout*`` and look-alikes with a
    float ``p``), in training mode or not."""
    out = {}
    for name, m in model.named_modules():
        p = getattr(m, "p", None)
        if "Dropout" in type(m).__name__ and isinstance(p, float):
            out[name] = p
    return out


def gather(
    probes: Probes,
    *,
    classes: int | None,
    class_dim: int = 1,
    softmax_loss: bool | None,
    lr: float | None,
    symmetry_start: dict[str, float],
    lr_test: LrTest | None = None,
    input_use: tuple[float, float] | None = None,
    optimizer: Any = None,
    lrs: list[float] | None = None,
    target_counts: np.ndarray | None = None,
) -> Evidence:
    """The host-side evidence so far: the probes' history and observations, and what the
    model and its optimizer(s) say about which parameters can train."""
    history = probes.history
    rows = history.rows if history is not None else []
    loss = history.loss.astype(np.float64) if history is not None else np.empty(0)
    kinds = {n: layer_kind(m) for n, m in probes.modules.items()}
    kinds.update(probes.kinds)
    x = probes.model_input
    model_input = None
    if x is not None:
        rms, mean, std, peak = x.cpu().tolist()
        model_input = {"rms": rms, "mean": mean, "std": std, "max_feature_rms": peak}
    return Evidence(
        loss=loss,
        rows=rows,
        order=list(probes.order),
        kinds=kinds,
        shapes=dict(probes.shapes),
        params=probes.meta()["params"],
        chains=[list(c) for c in probes.chains or []],
        dead=probes.window_dead(),
        bn_events=dict(probes.bn_events),
        model_input=model_input,
        output=probes.output,
        symmetry_start=symmetry_start,
        symmetry_end=weight_symmetry(probes.model),
        classes=classes,
        class_dim=class_dim,
        softmax_loss=softmax_loss,
        lr=lr,
        steps=probes.step_count,
        lr_test=lr_test,
        lrs=np.asarray(lrs if lrs is not None else [], dtype=np.float64),
        input_use=input_use,
        loss_graph=probes.loss_graph,
        target_counts=target_counts,
        trainability=trainability(probes.model, optimizer),
        dropout=dropout_rates(probes.model),
        optimizer_kind=type(optimizers_of(optimizer)[0]).__name__ if optimizer else None,
        averaged=max(
            (
                int(st.get("averaged", 0))
                for o in optimizers_of(optimizer)
                for st in o.state.values()
            ),
            default=0,
        ),
    )


def _row_finite(row: dict[str, Any]) -> bool:
    if "loss" in row and not finite(row["loss"]):
        return False
    for section in ("layer", "param"):
        for stats in row[section].values():
            for stat in ("mean", "std", "grad_mean", "grad_std"):
                if stat in stats and not finite(stats[stat]):
                    return False
    return True
