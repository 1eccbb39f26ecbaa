"""Cost of surviving: a checkpoint write and read, and the per-step finiteness check.

lecture-deep (47,024 parameters, plumb SGD) after 200,000 steps' worth of losses: time to
write ``checkpoint.safetensors`` (atomic: temp file, fsync, rename, directory fsync) and to
read and verify it (digest over every tensor), its size; then the cost per step of the
non-finite check (sum of gradient norms on the device, one bool read) against a bare
training step. Medians of ``--repeats``.

    python bench/bench_checkpoint.py [--repeats 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from plumb.checkpoint import read_checkpoint, save_checkpoint
from plumb.data import load_dataset
from plumb.models import MLP, preset_config
from plumb.optim import SGD
from plumb.train import FiniteCheck


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset()
    g = torch.Generator().manual_seed(0)
    model = MLP(preset_config("lecture-deep"), g)
    opt = SGD(model.parameters(), lr=0.1)
    X, Y = data.train.X, data.train.Y.long()
    finite = FiniteCheck(list(model.parameters()))  # as train() builds it: once

    def step(check: bool) -> None:
        ix = torch.randint(0, X.shape[0], (32,), generator=g)
        loss = F.cross_entropy(model(X[ix]), Y[ix])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if check:
            finite(loss)
        opt.step()

    for _ in range(50):
        step(True)
    blocks = {False: [], True: []}
    for _ in range(args.repeats):  # alternating blocks of 100 steps
        for check in (False, True):
            blocks[check].append(median_time(lambda c=check: step(c), 100))
    bare, checked = statistics.median(blocks[False]), statistics.median(blocks[True])

    losses = torch.rand(200_000)
    with tempfile.TemporaryDirectory() as tmp:
        config = {"model": model.config.to_dict(), "train": {}, "data": {}}

        def write() -> None:
            save_checkpoint(
                tmp, model=model, optimizer=opt, generator=g, step=200_000, losses=losses,
                config=config,
            )  # fmt: skip

        t_write = median_time(write, args.repeats)
        size = (Path(tmp) / "checkpoint.safetensors").stat().st_size
        t_read = median_time(lambda: read_checkpoint(tmp), args.repeats)
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.threads} thread(s)")  # fmt: skip
    print(f"checkpoint (lecture-deep, 200k losses): {size / 1024:.0f} KiB, write {1e3 * t_write:.1f} ms, "
          f"read+verify {1e3 * t_read:.1f} ms")  # fmt: skip
    print(f"training step: {1e6 * bare:.0f} us bare, {1e6 * checked:.0f} us with the "
          f"non-finite check ({100 * (checked / bare - 1):+.1f}%)")  # fmt: skip


if __name__ == "__main__":
    main()
