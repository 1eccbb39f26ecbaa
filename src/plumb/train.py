"""The training loop: minibatch SGD with the lecture's step schedule, evaluation, BatchNorm
calibration.

One step, as in the notebook:

    ix = randint(0, n_train, (batch_size,), generator)   # same generator as the init
    loss = cross_entropy(model(X[ix]), Y[ix])
    loss.backward();  p <- p - lr(step) * grad

``lr(step) = lr`` for ``step < lr_decay_step``, then ``lr_final`` (0.1 -> 0.01).
The loss of every step stays on the device in a preallocated tensor; the host reads it
only at the print cadence (no per-step synchronisation).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from plumb import nn as pnn
from plumb.data import Dataset, Split
from plumb.errors import PlumbError
from plumb.models import LECTURE_SEED
from plumb.optim import SGD

OPTIMIZERS = ("sgd", "adamw")


@dataclass
class TrainConfig:
    """How to train: steps, batch, learning-rate schedule, optimizer, seed, device."""

    steps: int = 200_000
    batch_size: int = 32
    lr: float = 0.1
    lr_decay_step: int | None = 150_000  # lr becomes lr_final from this step; None: never
    lr_final: float = 0.01
    optimizer: str = "sgd"  # sgd (the lecture's) | adamw
    weight_decay: float = 0.0  # adamw only
    seed: int = LECTURE_SEED
    device: str = "cpu"
    threads: int | None = None  # torch.set_num_threads; exact reproduction needs 1
    calibrate_bn: bool = False  # set BatchNorm running stats from the whole training set
    compile: bool = False  # torch.compile the model (fused kernels; not bit-exact with eager)
    print_every: int = 10_000
    probes: bool = True  # record activation/gradient/update statistics (plumb.Monitor)
    doctor: bool = True  # run the doctor's rules on them during training (needs probes)
    probe_every: int | None = None  # record-step cadence; None: max(50, steps // 500)
    hist_every: int | None = None  # histogram cadence; None: 10 * probe_every

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 0:
            raise PlumbError(f"steps must be an integer >= 0, got {self.steps!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise PlumbError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        for name in ("lr", "lr_final"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise PlumbError(f"{name} must be a finite number > 0, got {value!r}")
        if self.lr_decay_step is not None and self.lr_decay_step < 0:
            raise PlumbError(f"lr_decay_step must be >= 0, got {self.lr_decay_step!r}")
        if self.optimizer not in OPTIMIZERS:
            raise PlumbError(
                f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}"
            )
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise PlumbError(
                f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}"
            )
        if self.threads is not None and self.threads < 1:
            raise PlumbError(f"threads must be >= 1, got {self.threads!r}")
        if self.print_every < 1:
            raise PlumbError(f"print_every must be >= 1, got {self.print_every!r}")
        for name in ("probe_every", "hist_every"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise PlumbError(f"{name} must be an integer >= 1, got {value!r}")
        if self.hist_every is not None and self.hist_every % self.cadence()[0]:
            raise PlumbError(
                f"hist_every ({self.hist_every}) must be a multiple of probe_every "
                f"({self.cadence()[0]})"
            )
        resolve_device(self.device)

    def cadence(self) -> tuple[int, int]:
        """(probe_every, hist_every): ~500 record steps and ~50 histograms per run, at
        most one record every 50 steps (about 2% of the step time, see bench_probes)."""
        every = self.probe_every or max(50, self.steps // 500)
        return every, self.hist_every or 10 * every

    def lr_at(self, step: int) -> float:
        if self.lr_decay_step is not None and step >= self.lr_decay_step:
            return self.lr_final
        return self.lr

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise PlumbError(f"unknown train config field(s): {', '.join(unknown)}")
        return cls(**d)


def resolve_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise PlumbError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PlumbError(f"device {device!r} requested but CUDA is not available: use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise PlumbError(f"device {device!r} is not supported: use cpu, cuda or cuda:N")
    return dev


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return SGD(model.parameters(), lr=cfg.lr)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


@torch.no_grad()
def split_loss(
    model: nn.Module, split: Split, device: torch.device | str = "cpu", chunk: int = 1 << 20
) -> float:
    """Mean cross-entropy over a whole split in eval mode (running BatchNorm statistics).

    Up to ``chunk`` examples go through in one batch, as the lecture does; larger splits
    are averaged chunk by chunk (weighted by chunk size)."""
    if len(split) == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    try:
        total = 0.0
        for start in range(0, len(split), chunk):
            X = split.X[start : start + chunk].to(device)
            Y = split.Y[start : start + chunk].to(device).long()
            total += F.cross_entropy(model(X), Y).item() * X.shape[0]
        return total / len(split)
    finally:
        model.train(was_training)


@contextmanager
def _momentum_one(model: nn.Module):
    bns = [
        m
        for m in model.modules()
        if isinstance(m, pnn.BatchNorm1d | pnn.LectureBatchNorm1d | nn.BatchNorm1d)
    ]
    saved = [m.momentum for m in bns]
    try:
        for m in bns:
            m.momentum = 1.0
        yield bns
    finally:
        for m, mom in zip(bns, saved, strict=True):
            m.momentum = mom


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, split: Split, device: torch.device | str = "cpu") -> int:
    """The lecture's "calibrate the batch norm at the end of training": set every BatchNorm's
    running mean and variance (std) to the statistics of the *whole* training set, by one
    training-mode forward pass with momentum 1. Returns the number of layers calibrated."""
    was_training = model.training
    with _momentum_one(model) as bns:
        if bns:
            model.train()
            model(split.X.to(device))
    model.train(was_training)
    return len(bns)


@dataclass
class TrainResult:
    losses: torch.Tensor  # (steps,) per-step training loss, on the CPU
    lrs: torch.Tensor  # (steps,) learning rate of each step
    seconds: float
    step0_loss: float

    def last_mean(self, window: int = 1000) -> float:
        if len(self.losses) == 0:
            return float("nan")
        return self.losses[-window:].mean().item()


class Progress:
    """One line on stderr, rewritten in place on a terminal; plain lines otherwise."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.enabled = total, enabled
        self.tty = sys.stderr.isatty()
        self.t0 = time.perf_counter()

    def update(self, step: int, loss: float, lr: float) -> None:
        if not self.enabled:
            return
        rate = step / max(time.perf_counter() - self.t0, 1e-9)
        width = 24
        filled = int(width * step / max(self.total, 1))
        bar = "#" * filled + "-" * (width - filled)
        text = f"step {step:>7d}/{self.total} [{bar}] loss {loss:.4f} lr {lr:g} {rate:,.0f} it/s"
        if self.tty:
            sys.stderr.write("\r" + text)
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


def train(
    model: nn.Module,
    data: Dataset,
    cfg: TrainConfig,
    generator: torch.Generator,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    on_print: Callable[[int, float], None] | None = None,
    progress: bool = True,
    monitor: Any = None,
    doctor: Any = None,
) -> TrainResult:
    """Train ``model`` in place for ``cfg.steps`` minibatch steps.

    ``generator`` must be the one the model was initialised from, for the lecture's
    order of random draws; ``on_print(step, loss)`` is called every ``cfg.print_every``
    steps (the notebook prints at steps 0, 10000, ...). ``monitor`` (a ``plumb.Monitor``
    already attached to ``model``) is stepped after every update, then ``doctor`` (a
    ``plumb.doctor.Doctor`` beside it)."""
    device = resolve_device(cfg.device)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    opt = optimizer or make_optimizer(model, cfg)
    forward = torch.compile(model) if cfg.compile else model
    X, Y = data.train.X.to(device), data.train.Y.to(device)
    n = X.shape[0]
    losses = torch.empty(cfg.steps, device=device)
    lrs = torch.tensor([cfg.lr_at(i) for i in range(cfg.steps)])
    bar = Progress(cfg.steps, enabled=progress)
    model.train()
    t0 = time.perf_counter()
    step0 = float("nan")
    for i in range(cfg.steps):
        ix = torch.randint(0, n, (cfg.batch_size,), generator=generator).to(device)
        loss = F.cross_entropy(forward(X[ix]), Y[ix].long())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        lr = cfg.lr_at(i)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        losses[i] = loss.detach()
        if monitor is not None:
            monitor.step(loss)
        if doctor is not None:
            doctor.step()
        if i % cfg.print_every == 0 or i == cfg.steps - 1:
            value = loss.item()
            if i == 0:
                step0 = value
            if on_print is not None and i % cfg.print_every == 0:
                on_print(i, value)
            bar.update(i + 1, value, lr)
    bar.close()
    return TrainResult(losses.cpu(), lrs, time.perf_counter() - t0, step0)
