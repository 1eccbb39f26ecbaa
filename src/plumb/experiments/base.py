"""What every experiment shares: its options, its result, side-by-side runs, a short
training loop, and the per-layer statistics of one forward/backward pass.

An experiment is a module with ``NAME``, ``TITLE``, ``QUESTION``, ``STEPS`` (default,
quick), optionally ``SWEEP`` (the flag it reads, its default values and a validator),
and ``run(ctx) -> Result``. The answer on its page is built from the numbers it measured.
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Any

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor, nn

from plumb.data import Dataset, load_dataset
from plumb.errors import PlumbError
from plumb.kinds import TANH_SATURATION
from plumb.models import LECTURE_SEED, MLP, ModelConfig
from plumb.probes import Probes
from plumb.train import Callbacks, TrainConfig, resolve_device, train


@dataclass
class Options:
    """How to run an experiment (the CLI's flags)."""

    quick: bool = False  # seconds instead of minutes, for tests
    steps: int | None = None  # training steps; None: the experiment's default
    seed: int = LECTURE_SEED
    device: str = "cpu"
    jobs: int | None = None  # configurations trained at once; None: cores (1 with --quick)
    sweep: dict[str, list[float]] = field(default_factory=dict)  # e.g. {"gains": [...]}
    data: str | None = None  # a names-like text file; None: the bundled names

    def validate(self) -> None:
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise PlumbError(f"--steps must be an integer >= 1, got {self.steps!r}")
        if self.jobs is not None and self.jobs < 1:
            raise PlumbError(f"--jobs must be >= 1, got {self.jobs!r}")
        resolve_device(self.device)


@dataclass
class Result:
    """What an experiment measured, and what it says about it."""

    answer: str  # computed from the numbers below
    headline: str  # one line for the index and the closing note
    rows: list[dict[str, Any]]  # the main results table (results.csv)
    method: str
    figures: dict[str, tuple[Figure, str]] = field(default_factory=dict)  # name: (fig, caption)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # further tables
    extra: dict[str, Any] = field(default_factory=dict)  # anything else for results.json
    # The page's view of ``rows``: {row key: header with its unit}, the deciding column
    # first. results.csv keeps every key; None shows every key. A header ending "(%)"
    # shows fractions as percentages. Cells: None is "n/a", NaN or inf is "diverged".
    columns: dict[str, str] | None = None
    table_columns: dict[str, dict[str, str]] = field(default_factory=dict)  # same, per table


@dataclass
class Context:
    """Options resolved for one experiment, plus timing of its side-by-side runs."""

    name: str
    options: Options
    steps: int
    sweep: list[float] | None
    parallel_notes: list[str] = field(default_factory=list)

    @property
    def quick(self) -> bool:
        return self.options.quick

    @property
    def seed(self) -> int:
        return self.options.seed

    @property
    def device(self) -> torch.device:
        return resolve_device(self.options.device)

    def data(self) -> Dataset:
        return dataset(self.options.data)

    def jobs(self, n_tasks: int) -> int:
        wanted = self.options.jobs or (1 if self.quick else os.cpu_count() or 1)
        return max(1, min(wanted, n_tasks))

    def map(self, fn: Callable[[Any], Any], tasks: Sequence[Any], what: str = "runs") -> list:
        """``[fn(t) for t in tasks]``, side by side in processes of one thread each.

        ``fn`` must be a module-level function (it is pickled to spawned workers)."""
        jobs = self.jobs(len(tasks))
        t0 = time.perf_counter()
        if jobs == 1:
            out = [_timed(fn, t) for t in tasks]
        else:
            with ProcessPoolExecutor(
                jobs, mp_context=get_context("spawn"), initializer=_one_thread
            ) as pool:
                out = list(pool.map(_timed, [fn] * len(tasks), tasks))
        wall = time.perf_counter() - t0
        serial = sum(s for _, s in out)
        self.parallel_notes.append(
            f"{len(tasks)} {what} in {jobs} process(es) of one thread: {wall:.1f} s wall, "
            f"{serial:.1f} s of run time ({serial / max(wall, 1e-9):.1f}x)"
        )
        return [r for r, _ in out]


def _timed(fn: Callable[[Any], Any], task: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    return fn(task), time.perf_counter() - t0


def _one_thread() -> None:
    torch.set_num_threads(1)


@functools.lru_cache(maxsize=4)
def dataset(path: str | None) -> Dataset:
    """The dataset a worker trains on (loaded once per process)."""
    return load_dataset(path)


# --- parsing sweep values -----------------------------------------------------------


@dataclass(frozen=True)
class Sweep:
    """What an experiment sweeps: the values it runs by default and with ``--quick``, the
    flag that overrides them (``plumb experiment NAME --FLAG 0.5,1,5/3``, built from this
    by the CLI, with ``help``), and the range each value must lie in: (lo, hi], [lo, hi]
    with ``zero``, integers with ``integer``."""

    flag: str
    values: tuple[float, ...]
    quick: tuple[float, ...] | None = None
    lo: float = 0.0
    hi: float = math.inf
    integer: bool = False
    zero: bool = False
    help: str = ""

    def defaults(self, quick: bool) -> list[float]:
        return list(self.quick if quick and self.quick is not None else self.values)

    def check(self, values: list[float]) -> list[float]:
        """``values`` validated (finite, in range, integers if asked, no repeats), sorted."""
        name, lo, hi = self.flag, self.lo, self.hi
        bracket = "[" if self.zero else "("
        if not values:
            raise PlumbError(f"--{name} needs at least one value")
        for v in values:
            inside = (lo <= v if self.zero else lo < v) and v <= hi
            if not math.isfinite(v) or not inside:
                raise PlumbError(
                    f"--{name}: {v!r} is out of range; each value must be in "
                    f"{bracket}{lo:g}, {hi:g}]"
                )
            if self.integer and v != int(v):
                raise PlumbError(f"--{name}: {v!r} is not an integer")
        if len(set(values)) != len(values):
            raise PlumbError(f"--{name}: values repeat ({', '.join(f'{v:g}' for v in values)})")
        return sorted(int(v) if self.integer else float(v) for v in values)


def parse_values(flag: str, text: str) -> list[float]:
    """``"0.5,1,5/3"`` -> [0.5, 1.0, 1.666...] (fractions and 1e-3 allowed)."""
    values = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "/" in part:
                num, den = part.split("/", 1)
                values.append(float(num) / float(den))
            else:
                values.append(float(part))
        except (ValueError, ZeroDivisionError):
            raise PlumbError(
                f"--{flag}: {part!r} is not a number (use e.g. --{flag} 0.5,1,5/3)"
            ) from None
    if not values:
        raise PlumbError(f"--{flag} needs comma-separated numbers, got {text!r}")
    return values


# --- models and training ------------------------------------------------------------


def deep_config(data: Dataset, **overrides: Any) -> ModelConfig:
    """The lecture's deep MLP shape (10-d embedding, 100 hidden units) on ``data``."""
    base: dict[str, Any] = dict(
        vocab_size=data.vocab.size,
        block_size=data.block_size,
        n_embd=10,
        n_hidden=100,
        n_layers=5,
        norm="none",
        activation="tanh",
        init="kaiming",
        out_scale=0.1,
    )
    return ModelConfig(**{**base, **overrides})


def build(
    cfg: ModelConfig, seed: int, device: torch.device | str = "cpu"
) -> tuple[MLP, torch.Generator]:
    """A model drawn from ``seed``, and the generator that then draws its batches."""
    g = torch.Generator().manual_seed(seed)
    return MLP(cfg, g).to(device), g


def fit(
    model: nn.Module,
    data: Dataset,
    steps: int,
    generator: torch.Generator,
    *,
    lr: float = 0.1,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    optimizer: torch.optim.Optimizer | None = None,
    on_step: Callable[[int, Tensor], None] | None = None,
    engine: str = "auto",
) -> Tensor:
    """Plain minibatch SGD (``p -= lr * grad``, torch's SGD unless ``optimizer``) on the
    training split, through ``plumb.train``'s loop; the per-step losses. A run updates
    through non-finite steps as a plain loop would (an experiment may diverge on
    purpose). ``on_step(i, loss)`` runs after each update (e.g. a Monitor's ``step``)."""
    if optimizer is not None:  # the loop sets each step's lr: the optimizer's own
        lr = optimizer.param_groups[0]["lr"]
    cfg = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        lr_decay_step=None,
        device=str(device),
        print_every=max(steps, 1),
        probes=False,
        on_nonfinite="continue",
        engine=engine,
    )
    opt = optimizer or torch.optim.SGD(model.parameters(), lr=lr)
    calls = Callbacks(on_step=on_step)
    result = train(model, data, cfg, generator, optimizer=opt, calls=calls, progress=False)
    return result.losses


def unigram_loss(data: Dataset) -> float:
    """Cross-entropy of the best context-free model on the training split: the entropy
    of its next-character frequencies, ``-sum_c f_c ln f_c``. A model that ignores its
    input cannot do better on the training set."""
    counts = torch.bincount(data.train.Y.long(), minlength=data.vocab.size).double()
    f = counts / counts.sum()
    f = f[f > 0]
    return float(-(f * f.log()).sum())


def layer_pass(
    model: nn.Module, X: Tensor, Y: Tensor, kinds: tuple[type, ...]
) -> list[dict[str, Any]]:
    """One training-mode forward and backward of the batch (X, Y), without an update:
    for each module of a type in ``kinds`` (forward order), its output ``out`` and the
    gradient ``grad = dL/d(out)`` (the lecture's ``layer.out.retain_grad()``), as float
    CPU tensors, captured by the probes (``keep=True``)."""
    names = [n for n, m in model.named_modules() if isinstance(m, kinds)]
    if not names:
        return []
    model.train()
    model.zero_grad(set_to_none=True)
    with Probes(model, every=1, hist_every=1 << 30, layers=names, keep=True) as probes:
        loss = F.cross_entropy(model(X), Y.long())
        loss.backward()
        probes.step(loss)
    model.zero_grad(set_to_none=True)
    rows = []
    for name in probes.order:
        out, grad = probes.tensors[name]
        rows.append(
            {"layer": name, "out": out, "grad": grad if grad is not None else torch.zeros_like(out)}
        )
    return rows


def tanh_saturation(t: Tensor) -> float:
    """The lecture's saturation: the fraction of tanh outputs with ``|t| > 0.97``."""
    return (t.abs() > TANH_SATURATION).float().mean().item()


def replace_modules(
    model: nn.Module, kind: type | tuple[type, ...], make: Callable[[nn.Module], nn.Module]
) -> nn.Module:
    """Swap every submodule of type ``kind`` for ``make(old)`` on the old one's device,
    keeping its name (in place; returns ``model``)."""
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, kind):
                device = next(child.parameters(), torch.empty(0)).device
                parent._modules[name] = make(child).to(device)
    return model


def fmt(x: float, digits: int = 3) -> str:
    """A number for prose: 3 significant digits, scientific when very small or large;
    None is "n/a" and a non-finite number "diverged" (the page's convention, see Result)."""
    if x is None:
        return "n/a"
    if isinstance(x, float) and not math.isfinite(x):
        return "diverged"
    if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
        return f"{x:.{max(digits - 1, 0)}e}"
    return f"{x:.{digits}g}"


# --- judging a depth profile ----------------------------------------------------------

#: "Stable across depth": the largest per-layer std within this factor of the smallest.
#: The issue's (and the lecture's plots') standard for a well-initialised stack.
STABLE_FACTOR = 2.0


def spread(values: Sequence[float]) -> float:
    """max/min of positive per-layer values (inf when one is 0 or not finite)."""
    vals = [float(v) for v in values]
    if not vals or any(not math.isfinite(v) or v <= 0 for v in vals):
        return math.inf
    return max(vals) / min(vals)


def density_panel(
    ax: Any, series: list[tuple[str, Tensor]], title: str, bins: int = 60, xlabel: str = "value"
) -> None:
    """The lecture's plot: one density line per layer (``torch.histogram`` over [min, max]),
    with at most 5 x ticks so that wide ranges stay readable."""
    from matplotlib.ticker import MaxNLocator

    for label, t in series:
        t = t.flatten().double()
        t = t[torch.isfinite(t)]
        if t.numel() == 0 or t.min() == t.max():
            continue
        hist, edges = torch.histogram(t, bins=bins, density=True)
        centers = (edges[:-1] + edges[1:]) / 2
        ax.plot(centers.numpy(), hist.numpy(), label=label, lw=1)
    ax.set_title(title, fontsize=10)
    ax.tick_params(labelsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel("density", fontsize=8)


def reference_line(
    ax: Any,
    y: float,
    text: str,
    *,
    ls: str = ":",
    color: str = "k",
    lw: float = 1.0,
    right: bool = False,
    dy: float = 3,
) -> None:
    """A horizontal line at ``y`` labelled where it is drawn (ln C, a threshold, the floor
    at which a log axis draws an exact 0), at the left edge (or the right)."""
    ax.axhline(y, ls=ls, c=color, lw=lw)
    ax.annotate(
        text,
        (1 if right else 0, y),
        xycoords=("axes fraction", "data"),
        xytext=(-4 if right else 4, dy),
        textcoords="offset points",
        ha="right" if right else "left",
        fontsize=8,
    )


#: How the pages name a norm setting in their sentences.
NORM_LABELS = {
    "none": "no normalisation",
    "batch": "BatchNorm",
    "layer": "LayerNorm",
    "group": "GroupNorm",
}


def norm_label(norm: str, start: bool = False) -> str:
    """``NORM_LABELS[norm]``, its first letter capital when it starts a sentence."""
    label = NORM_LABELS[norm]
    return label[0].upper() + label[1:] if start else label


def smooth(losses: Tensor, window: int) -> tuple[list[int], list[float]]:
    """Mean loss over consecutive windows: (window-centre steps, means)."""
    n = len(losses) // max(window, 1)
    if n == 0:
        return list(range(len(losses))), losses.tolist()
    means = losses[: n * window].view(n, window).mean(1)
    return [i * window + window // 2 for i in range(n)], means.tolist()
