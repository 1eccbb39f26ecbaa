"""The lecture's loss-log table, rerun: five stages of the single-layer MLP.

Each stage is a fresh model drawn from ``torch.Generator().manual_seed(2147483647)``,
trained with plain SGD (lr 0.1, then 0.01 from step 100,000) on batches of 32, then
evaluated on the whole train and val splits in eval mode. Exactness needs one thread
(``threads=1``, the default): with more, matrix products may sum in another order.
Stages are independent, so they run in parallel processes (one thread each).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import torch

from plumb import reference
from plumb.data import Dataset, load_dataset
from plumb.models import LECTURE_SEED, LECTURE_STAGES, MLP, PRESET_TRAIN, preset_config
from plumb.train import Callbacks, TrainConfig, calibrate_batchnorm, split_loss, train


@dataclass
class StageResult:
    stage: str
    steps: int
    train: float
    val: float
    published: tuple[float, float]
    step0_loss: float
    printed: list[tuple[int, float]] = field(default_factory=list)
    calibrated: tuple[float, float] | None = None  # batchnorm stage only
    seconds: float = 0.0

    @property
    def compared(self) -> tuple[float, float]:
        """The losses to hold against the published row: the notebook's table reports
        the batchnorm stage with running statistics calibrated on the whole train set."""
        return self.calibrated if self.calibrated is not None else (self.train, self.val)


def run_stage(
    stage: str,
    data: Dataset,
    steps: int | None = None,
    threads: int | None = 1,
    progress: bool = False,
    echo: bool = False,
) -> StageResult:
    """Train one stage of the loss-log table and evaluate it; ``echo``: a line on stderr
    at each of the notebook's printed steps (every 10,000), so a long stage shows progress."""
    if threads is not None:
        torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(LECTURE_SEED)
    cfg = preset_config(
        f"lecture-mlp:{stage}", vocab_size=data.vocab.size, block_size=data.block_size
    )
    model = MLP(cfg, g)
    tdefaults = PRESET_TRAIN[f"lecture-mlp:{stage}"]
    # the eager engine: autograd, the notebook's ops in its order (bit-exact)
    tcfg = TrainConfig(
        **{**tdefaults, "steps": tdefaults["steps"] if steps is None else steps, "engine": "eager"}
    )
    printed: list[tuple[int, float]] = []
    t0 = time.perf_counter()

    def on_print(i: int, v: float) -> None:
        printed.append((i, v))
        if echo:  # one whole line per write: the stages' processes share the terminal
            sys.stderr.write(
                f"  {stage}: step {i:,} of {tcfg.steps:,}, loss {v:.4f} "
                f"({time.perf_counter() - t0:.0f} s)\n"
            )
            sys.stderr.flush()

    result = train(model, data, tcfg, g, progress=progress, calls=Callbacks(on_print=on_print))
    train_loss, val_loss = split_loss(model, data.train), split_loss(model, data.val)
    calibrated = None
    if calibrate_batchnorm(model, data.train):
        calibrated = (split_loss(model, data.train), split_loss(model, data.val))
    return StageResult(
        stage,
        tcfg.steps,
        train_loss,
        val_loss,
        reference.LOSS_LOG[stage],
        result.step0_loss,
        printed,
        calibrated,
        result.seconds,
    )


def _worker(args: tuple[str, str | None, int | None, int | None, bool]) -> StageResult:
    stage, path, steps, threads, echo = args
    return run_stage(stage, load_dataset(path), steps, threads, echo=echo)


def run_lecture(
    stages: list[str] | None = None,
    data_path: str | Path | None = None,
    steps: int | None = None,
    threads: int | None = 1,
    jobs: int | None = None,
    on_result: Callable[[StageResult], None] | None = None,
    echo: bool = False,
) -> list[StageResult]:
    """Run ``stages`` (default: all five) in up to ``jobs`` processes; results in stage
    order. ``echo``: each stage says its progress on stderr (``run_stage``)."""
    stages = list(LECTURE_STAGES) if stages is None else stages
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(stages)))
    args = [
        (s, None if data_path is None else str(data_path), steps, threads, echo) for s in stages
    ]
    if jobs == 1:
        results = []
        for a in args:
            results.append(_worker(a))
            if on_result:
                on_result(results[-1])
        return results
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
        results = []
        for r in pool.map(_worker, args):
            results.append(r)
            if on_result:
                on_result(r)
        return results
