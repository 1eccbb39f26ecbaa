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

import contextlib
import copy
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
from plumb.dist import GlobalStep, sync_batchnorm, world
from plumb.errors import PlumbError
from plumb.fused import FusedStep, runs_in_c, supports
from plumb.memory import reuse_freed_memory
from plumb.models import LECTURE_SEED
from plumb.optim import SGD, WeightAverage
from plumb.probes import Probes
from plumb.record import first_nonfinite

OPTIMIZERS = ("sgd", "adamw")
NONFINITE = ("stop", "skip", "continue")  # continue: update anyway, as a plain loop would
ENGINES = ("auto", "eager", "fused")


@dataclass
class TrainConfig:
    """How to train: steps, batch, learning-rate schedule, optimizer, seed, device."""

    steps: int = 200_000
    batch_size: int = 32
    lr: float = 0.1
    lr_decay_step: int | None = 150_000  # lr becomes lr_final from this step; None: never
    lr_final: float = 0.01
    optimizer: str = "sgd"  # sgd (the lecture's) | adamw
    weight_decay: float = 0.0  # sgd: L2 added to the gradient; adamw: decoupled
    seed: int = LECTURE_SEED
    device: str = "cpu"
    threads: int | None = None  # torch.set_num_threads; exact reproduction needs 1
    calibrate_bn: bool = False  # set BatchNorm running stats from the whole training set
    # SWA: from this step on, the mean of the weights every average_every steps; a run
    # that completes ends with that mean and BatchNorm recalibrated (plumb.optim)
    average_from: int | None = None
    average_every: int = 100
    compile: bool = False  # torch.compile the model (fused kernels; not bit-exact with eager)
    engine: str = "auto"  # auto | eager (autograd, bit-exact) | fused (compiled whole step)
    print_every: int = 10_000
    probes: bool = True  # record activation/gradient/update statistics (plumb.Monitor)
    doctor: bool = True  # run the doctor's rules on them during training (needs probes)
    probe_every: int | None = None  # record-step cadence; None: max(50, steps // 500)
    hist_every: int | None = None  # histogram cadence; None: 10 * probe_every
    checkpoint_every: int = 1000  # steps between checkpoints (plumb train; and at the end)
    eval_every: int | None = None  # validation loss (eval mode) cadence; None: ~20 per run
    on_nonfinite: str = "stop"  # stop (keep the last good checkpoint, exit 3) | skip the step

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
        if self.average_from is not None and (
            not isinstance(self.average_from, int) or self.average_from < 0
        ):
            raise PlumbError(f"average_from must be an integer >= 0, got {self.average_from!r}")
        if not isinstance(self.average_every, int) or self.average_every < 1:
            raise PlumbError(f"average_every must be an integer >= 1, got {self.average_every!r}")
        if self.threads is not None and self.threads < 1:
            raise PlumbError(f"threads must be >= 1, got {self.threads!r}")
        if self.print_every < 1:
            raise PlumbError(f"print_every must be >= 1, got {self.print_every!r}")
        for name in ("probe_every", "hist_every"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise PlumbError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 1:
            raise PlumbError(
                f"checkpoint_every must be an integer >= 1, got {self.checkpoint_every!r}"
            )
        if self.eval_every is not None and (
            not isinstance(self.eval_every, int) or self.eval_every < 1
        ):
            raise PlumbError(f"--eval-every must be an integer >= 1, got {self.eval_every!r}")
        if self.engine not in ENGINES:
            raise PlumbError(f"engine must be one of {', '.join(ENGINES)}; got {self.engine!r}")
        if self.on_nonfinite not in NONFINITE:
            raise PlumbError(
                f"on_nonfinite must be one of {', '.join(NONFINITE)}; got {self.on_nonfinite!r}"
            )
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

    def eval_cadence(self) -> int:
        """Steps between validation evaluations: ``eval_every``, else ~20 per run."""
        return self.eval_every or max(1, self.steps // 20)

    def schedule(self) -> Schedule:
        """The loop's view of this config."""
        return Schedule(
            self.steps, self.lr_at, self.print_every, self.checkpoint_every, self.on_nonfinite
        )

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


def use_threads(cfg: TrainConfig) -> None:
    """Set torch's intra-op thread count to ``cfg.threads`` (None: leave it): once per
    run, by ``train`` (and by ``plumb doctor``, which does not call it)."""
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)


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
        return SGD(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
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
    bns = [m for m in model.modules() if isinstance(m, pnn.BATCHNORMS)]
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
    losses: torch.Tensor  # (steps_done,) per-step training loss, on the CPU
    lrs: torch.Tensor  # (steps_done,) learning rate of each step
    seconds: float
    step0_loss: float
    steps_done: int = 0
    stopped: str | None = None  # None: ran to the end; "signal"; "nonfinite"
    nonfinite: NonFinite | None = None  # where the step that stopped the run went bad
    skipped: list[int] = dataclasses.field(default_factory=list)  # steps skipped (non-finite)
    start: int = 0  # steps already done when this call began (a resumed run)
    engine: str = "eager"
    compile_seconds: float = 0.0  # of ``seconds``, spent compiling (the fused engine)
    averaged: int = 0  # iterates in the weight average the model ended with (0: none)

    @property
    def us_per_step(self) -> float:
        """Time per step of this call, compilation left out."""
        steps = max(self.steps_done - self.start, 1)
        return 1e6 * (self.seconds - self.compile_seconds) / steps

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


# --- engines: one training step each -------------------------------------------------------
class EagerEngine:
    """A step by autograd: forward, ``loss_fn``, backward, and (when the loss and every
    gradient are finite) the optimizer's update. ``inspect(i, output, loss)`` sees each
    step's output first (``diagnose`` checks the loss and the class dimension on it)."""

    name = "eager"

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable[[Any, Any], torch.Tensor] = F.cross_entropy,
        *,
        forward: Callable[[Any], Any] | None = None,
        inspect: Callable[[int, Any, torch.Tensor], None] | None = None,
        guard: bool = True,
    ):
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        # not `forward or model`: a compiled module (OptimizedModule) has no len()
        self.forward = model if forward is None else forward
        self.inspect = inspect
        self.guard = guard  # False: update even after a non-finite step
        self.finite = FiniteCheck([p for p in model.parameters() if p.requires_grad])

    def __call__(self, x: Any, y: Any, lr: float | None, i: int, probes: Any = None):
        out = self.forward(x)
        loss = self.loss_fn(out, y)
        if self.inspect is not None:
            self.inspect(i, out, loss)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        ok = self.finite(loss)
        if ok or not self.guard:
            if lr is not None:
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
            self.optimizer.step()
        return loss, ok, None


class FusedEngine:
    """A step of the fused engine (``plumb.fused``): forward, hand-written backward,
    running statistics and update as one compiled graph, or on the CPU one call of the
    same step in C; on a record step it measures the probes' statistics from the tensors
    the step holds."""

    name = "fused"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, compile: bool = True):
        self.step = FusedStep(model, optimizer, compile=compile)

    def __call__(self, x: Any, y: Any, lr: float | None, i: int, probes: Any = None):
        lr = self.step.optimizer.param_groups[0]["lr"] if lr is None else lr
        if probes is not None and probes.wants_record():
            loss, ok, measured = self.step.record(
                x,
                y,
                lr,
                bins=probes.bins,
                saturation_layer=probes.saturation_layer,
                histograms=probes.wants_histograms(),
            )
            return loss, bool(ok), measured
        loss, ok = self.step(x, y, lr)
        return loss, bool(ok), None


#: ``auto`` compiles the fused step only when the run is expected to win, compile included.
#: Measured on this machine (2-core AMD EPYC, torch 2.13 CPU, quiet; lecture-deep, batch
#: 32, probes at their default cadence; ``plumb train --steps 20000``): a cold compile
#: took 54 s, a cached one 5 s; a fused step 0.55-0.79 ms against eager's 2.2 ms (1.6 ms
#: saved). Under load both scale together (103 s and 3.7 ms were seen on a busy VM), so
#: the break-even stays near 30,000 steps cold and 3,000 cached.
COLD_COMPILE_S = 55.0
WARM_COMPILE_S = 5.0
SAVED_S_PER_STEP = 1.6e-3


def compile_marker(model: nn.Module, optimizer: Any, cfg: TrainConfig) -> Any:
    """The file that says the fused step of this configuration was compiled before (its
    kernels are in inductor's cache, so the next compile is warm): one per torch
    version, model config, optimizer, batch size and device, in inductor's cache
    directory (cleared with it)."""
    import hashlib
    from pathlib import Path

    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        root = Path(cache_dir())
    except Exception:  # an older torch: no marker, every compile counts as cold
        return None
    key = "|".join(
        str(x)
        for x in (
            torch.__version__,
            getattr(model, "config", type(model).__name__),
            type(optimizer).__name__,
            cfg.batch_size,
            cfg.device,
        )
    )
    return root / "plumb-fused" / (hashlib.sha256(key.encode()).hexdigest()[:20] + ".json")


def auto_choice(steps: int, warm: bool) -> tuple[bool, str]:
    """(fused?, why) for ``auto``: fused when ``steps`` x the time the fused step saves
    exceeds the expected compile (cold, or warm from inductor's cache)."""
    compile_s = WARM_COMPILE_S if warm else COLD_COMPILE_S
    saved = steps * SAVED_S_PER_STEP
    cache = "cached" if warm else "cold"
    if saved > compile_s:
        return True, f"{steps:,} steps save ~{saved:.0f} s, more than a {cache} compile (~{compile_s:.0f} s)"  # fmt: skip
    return False, (
        f"{steps:,} steps would save ~{saved:.0f} s, less than a {cache} compile "
        f"(~{compile_s:.0f} s); --engine fused compiles anyway"
    )


def select_engine(
    name: str, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig
) -> tuple[Any, str]:
    """(engine, why): ``eager`` (autograd; bit-exact with the notebook), ``fused`` (the
    whole step in C on the CPU or compiled, when the configuration is in its family;
    else eager, saying why) or ``auto`` (fused in its family when its step runs in C,
    else when the run is long enough to pay for the compile: ``auto_choice``; not under
    ``--compile``)."""
    if name not in ENGINES:
        raise PlumbError(f"engine must be one of {', '.join(ENGINES)}; got {name!r}")
    _, size = world()
    # DistributedDataParallel (one device per process): gradients averaged in backward
    forward = nn.parallel.DistributedDataParallel(model) if size > 1 else model
    forward = torch.compile(forward) if cfg.compile else forward
    eager = EagerEngine(model, optimizer, forward=forward, guard=cfg.on_nonfinite != "continue")
    if size > 1:
        single = "" if name == "eager" else " (the fused engine is single-process)"
        return eager, f"eager engine (autograd) under DDP, {size} processes{single}"
    if name == "eager":
        return eager, "eager engine (autograd)"
    reason = supports(model, optimizer)
    if reason is None and cfg.on_nonfinite == "continue":
        reason = "the run updates through non-finite steps (on_nonfinite=continue)"
    if reason is None and name == "auto" and cfg.compile:
        reason = "--compile asks for torch.compile of the model (the eager engine's)"
    if reason is not None:
        return eager, f"eager engine (autograd): the fused engine does not apply: {reason}"
    if runs_in_c(model, cfg.batch_size):  # nothing to compile
        why = ", chosen by auto: its step runs in C, nothing to compile" if name == "auto" else ""
        engine = FusedEngine(model, optimizer)
        return engine, "fused engine (forward, hand-written backward and update in C)" + why
    marker = compile_marker(model, optimizer, cfg)
    warm = marker is not None and marker.is_file()
    why = ""
    if name == "auto":
        fused, why = auto_choice(cfg.steps, warm)
        if not fused:
            return eager, f"eager engine (autograd), chosen by auto: {why}"
    engine = FusedEngine(model, optimizer)
    engine.step.marker = marker
    expect = (
        f"~{WARM_COMPILE_S:.0f} s, cached" if warm else f"~{COLD_COMPILE_S:.0f} s the first time"
    )
    return engine, (
        "fused engine (compiled forward, hand-written backward and update)"
        + (f", chosen by auto: {why}" if why else "")
        + f"; compiling it takes {expect}"
    )


# --- the one training loop ---------------------------------------------------------------
@dataclass(frozen=True)
class Schedule:
    """What the loop needs of a run: its length, the lr of each step (None: leave the
    optimizer's own, e.g. a user's scheduler), how often to print and checkpoint, and what
    a non-finite step does (``NONFINITE``). ``TrainConfig.schedule()`` gives plumb's."""

    steps: int
    lr_at: Callable[[int], float | None] = lambda i: None
    print_every: int = 10_000
    checkpoint_every: int = 1000
    on_nonfinite: str = "stop"


@dataclass
class Callbacks:
    """What the loop tells its caller, each optional: ``on_step(i, loss)`` after every
    step; ``on_print(i, loss)`` every ``print_every`` steps (rank 0 only, under
    ``train``); ``on_checkpoint(done, losses)`` every ``checkpoint_every`` steps;
    ``should_stop()`` after every step (True: a signal arrived, the loop ends with
    ``stopped="signal"``); ``on_engine(why)`` once, which engine runs and why;
    ``locate(x, y, i)``: where a non-finite value first appeared (``train`` sets it)."""

    on_step: Callable[[int, torch.Tensor], None] | None = None
    on_print: Callable[[int, float], None] | None = None
    on_checkpoint: Callable[[int, torch.Tensor], None] | None = None
    should_stop: Callable[[], bool] | None = None
    on_engine: Callable[[str], None] | None = None
    locate: Callable[[Any, Any, int], Any] | None = None


@dataclass(frozen=True)
class Resume:
    """A run continued: ``step`` steps are done, their losses in ``losses``, and the model,
    optimizer and generator are as they were then (a checkpoint's)."""

    step: int
    losses: torch.Tensor


def loop(
    engine: Any,
    next_batch: Callable[[int], tuple[Any, Any]],
    schedule: Schedule,
    *,
    device: torch.device | str = "cpu",
    monitor: Any = None,
    calls: Callbacks | None = None,
    resume: Resume | None = None,
    progress: Progress | None = None,
) -> TrainResult:
    """Steps ``resume.step .. schedule.steps - 1`` of ``engine`` on ``next_batch(i)``: the
    loop that ``plumb train``, ``diagnose`` and the experiments share.

    After each step: the loss is kept (on the device), ``monitor.step(loss)`` (with the
    engine's own measurements on a record step), then the ``calls``: ``on_step``,
    ``on_print`` every ``print_every`` steps, ``on_checkpoint`` every
    ``checkpoint_every``, ``should_stop``. A non-finite loss or gradient (the engine did
    not update) stops the loop (``on_nonfinite="stop"``: ``calls.locate`` says where it
    appeared), is skipped ("skip"), or is stepped over as a plain loop would
    ("continue")."""
    sch, cb = schedule, calls or Callbacks()
    steps, lr_at = sch.steps, sch.lr_at
    start = resume.step if resume is not None else 0
    losses = torch.empty(steps, device=device)
    if start:
        losses[:start] = resume.losses[:start].to(device)
    t0 = time.perf_counter()
    step0 = resume.losses[0].item() if start else float("nan")
    done, stopped, where, skipped = start, None, None, []
    probes = monitor if monitor is not None and getattr(monitor, "external", False) else None
    for i in range(start, steps):
        x, y = next_batch(i)
        loss, ok, measured = engine(x, y, lr_at(i), i, probes)
        losses[i] = loss.detach()
        if not ok and sch.on_nonfinite != "continue":
            if sch.on_nonfinite == "stop":
                where = cb.locate(x, y, i) if cb.locate is not None else None
                stopped = "nonfinite"
                break
            skipped.append(i)  # no update; the probes still see the bad step
        if monitor is not None:
            monitor.step(loss, measured)
        if cb.on_step is not None:
            cb.on_step(i, loss)
        done = i + 1
        if i % sch.print_every == 0 or i == steps - 1:
            value = loss.item()
            if i == 0:
                step0 = value
            if cb.on_print is not None and i % sch.print_every == 0:
                cb.on_print(i, value)
            if progress is not None:
                progress.update(i + 1, value, lr_at(i) or 0.0)
        if cb.on_checkpoint is not None and done % sch.checkpoint_every == 0 and done < steps:
            cb.on_checkpoint(done, losses[:done])
        if cb.should_stop is not None and cb.should_stop():
            stopped = "signal"
            break
    if progress is not None:
        progress.close()
    fused = getattr(engine, "step", None)
    return TrainResult(
        losses[:done].cpu(),
        torch.tensor([lr_at(k) or 0.0 for k in range(done)]),
        time.perf_counter() - t0,
        step0,
        done,
        stopped,
        where,
        skipped,
        start,
        engine.name,
        getattr(fused, "compile_seconds", 0.0),
    )


def train(
    model: nn.Module,
    data: Dataset,
    cfg: TrainConfig,
    generator: torch.Generator,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    monitor: Any = None,
    calls: Callbacks | None = None,
    resume: Resume | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``model`` in place for steps ``resume.step .. cfg.steps - 1`` on ``data``'s
    training split, with the engine ``cfg.engine`` selects (``select_engine``;
    ``calls.on_engine(why)`` hears which), on the device the model is on (the batches
    follow it), with ``cfg.threads`` threads: the one place plumb sets them.

    ``generator`` must be the one the model was initialised from, for the lecture's
    order of random draws; ``calls.on_print(step, loss)`` is called every
    ``cfg.print_every`` steps (the notebook prints at steps 0, 10000, ...). ``monitor``
    (a ``plumb.Monitor`` already attached to ``model``, with or without its doctor) is
    stepped after every update; under the fused engine the step measures for it. The
    other ``calls`` and ``resume``: see ``loop``.

    A non-finite loss or gradient either stops the loop before the update
    (``cfg.on_nonfinite="stop"``: ``stopped="nonfinite"`` and ``nonfinite`` the first
    place it appeared), skips that step's update ("skip") or updates anyway
    ("continue", eager engine only).

    With ``cfg.average_from``, the mean of the weights from that step on
    (``plumb.optim.WeightAverage``, in the optimizer's state) replaces the weights when
    the run completes, and the BatchNorm running statistics are recomputed on the
    training set (``result.averaged``: how many iterates; an interrupted or diverged
    run keeps its last weights). Large freed blocks are kept for reuse
    (``plumb.memory.reuse_freed_memory``: no page faults a step, same numbers)."""
    use_threads(cfg)
    reuse_freed_memory()
    device = next(iter(model.parameters()), torch.empty(0)).device
    cb = dataclasses.replace(calls) if calls is not None else Callbacks()
    opt = optimizer or make_optimizer(model, cfg)
    rank, size = world()
    if size > 1:  # N ranks x batch B/N train as one process with batch B
        if cfg.batch_size % size:
            raise PlumbError(
                f"--batch-size {cfg.batch_size} must be a multiple of the {size} processes"
            )
        sync_batchnorm(model)
    engine, why = select_engine(cfg.engine, model, opt, cfg)
    if cb.on_engine is not None:
        cb.on_engine(why)
    if size > 1:
        engine = GlobalStep(engine, cb.should_stop)
        cb.should_stop = engine.stopped  # every rank stops after the same step
        share = cfg.batch_size // size
    if monitor is not None:
        monitor.external = engine.name == "fused"
    X, Y = data.train.X.to(device), data.train.Y.to(device)
    n = X.shape[0]

    def next_batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.randint(0, n, (cfg.batch_size,), generator=generator)
        if size > 1:  # every rank draws the global batch; this rank takes its share
            ix = ix[rank * share : (rank + 1) * share]
        ix = ix.to(device)
        return X[ix], Y[ix].long()

    if rank != 0:
        cb.on_print = None
    cb.locate = lambda x, y, i: locate_nonfinite(model, x, y, i, cfg.lr_at(i))
    average = None
    if cfg.average_from is not None:
        average = WeightAverage(opt, cfg.average_from, cfg.average_every)
        user_step = cb.on_step

        def on_step(i: int, loss: torch.Tensor) -> None:
            average(i)
            if user_step is not None:
                user_step(i, loss)

        cb.on_step = on_step
    model.train()
    result = loop(
        engine,
        next_batch,
        cfg.schedule(),
        device=device,
        monitor=monitor,
        calls=cb,
        resume=resume,
        progress=Progress(cfg.steps, enabled=progress and rank == 0),
    )
    if average is not None and result.stopped is None and result.steps_done == cfg.steps:
        result.averaged = average.apply()
        if result.averaged:  # the running statistics were the iterates', not the mean's
            quiet = monitor.unwatched() if monitor is not None else contextlib.nullcontext()
            with quiet:
                calibrate_batchnorm(model, data.train, device)
    return result


class FiniteCheck:
    """Is a step's loss and every gradient finite? One host read per step (a bool).

    The gradients go through the fused kernel AMP's GradScaler uses to find Inf/NaN
    (it also multiplies them by 1.0, which leaves every value bit for bit as it was);
    where that kernel does not apply (mixed dtypes or devices), the sum of the
    gradients' norms, which any NaN or Inf makes non-finite. The flag tensors are
    allocated once, not per step."""

    def __init__(self, params: list[torch.Tensor]):
        self.params = params
        device = params[0].device if params else torch.device("cpu")
        self.found = torch.zeros(1, device=device)
        self.one = torch.ones(1, device=device)

    def __call__(self, loss: torch.Tensor) -> bool:
        grads = [p.grad for p in self.params if p.grad is not None]
        self.found.copy_(~torch.isfinite(loss.detach()).reshape(1))
        if grads:
            try:
                torch._amp_foreach_non_finite_check_and_unscale_(grads, self.found, self.one)
            except (RuntimeError, NotImplementedError, AttributeError, TypeError):
                norms = torch.stack(torch._foreach_norm(grads)).float().sum()
                self.found.add_(~torch.isfinite(norms))
        return not bool(self.found)


def _finite(loss: torch.Tensor, params: list[torch.Tensor]) -> bool:
    """One-off form of :class:`FiniteCheck` (tests, benchmarks)."""
    return FiniteCheck(params)(loss)


@dataclass
class NonFinite:
    """Where a step's first NaN/Inf appeared (see :func:`locate_nonfinite`)."""

    step: int
    where: str  # a layer or parameter name, or "loss"
    what: str  # the same, said as a phrase ("the output of layer 'fc'")
    loss: float
    lr: float


def locate_nonfinite(
    model: nn.Module, X: torch.Tensor, Y: torch.Tensor, step: int, lr: float
) -> NonFinite:
    """The first place a step's loss or gradient went NaN/Inf, in the order the step
    computes things (outputs in forward order, the loss, then gradients in backward
    order): the step's batch replayed on a copy of the model (its BatchNorm buffers and
    gradients stay as they were) under the probes, every statistic of that one step."""
    twin = copy.deepcopy(model)
    twin.train()
    twin.zero_grad(set_to_none=True)
    with Probes(twin, every=1, hist_every=1 << 30) as probes:
        loss = F.cross_entropy(twin(X), Y)
        loss.backward()
        probes.step(loss)
    row = probes.history.rows[-1] if probes.history.rows else {"loss": float(loss)}
    names = [n for n, _ in reversed(list(twin.named_parameters()))]
    where, what = first_nonfinite(row, probes.order, names) or ("loss", "the loss")
    return NonFinite(step, where, what, float(loss.detach()), lr)
