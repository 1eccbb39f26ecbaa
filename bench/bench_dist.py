"""What a record step costs under DistributedDataParallel: lecture-deep (BatchNorm synced
over the ranks), batch 32 in all, on 1 process and on 2 gloo processes (16 examples
each), plain steps against steps that record everything (``Monitor(every=1)``), taking
turns in blocks in the same processes. CPU, 1 thread per process.

    python bench/bench_dist.py [--steps 100] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import plumb
from plumb.dist import sync_batchnorm
from plumb.models import MLP, preset_config


def measure(rank: int, world: int, steps: int, rounds: int) -> dict[str, float]:
    torch.set_num_threads(1)
    data = plumb.load_dataset()
    cfg = preset_config("lecture-deep", vocab_size=data.vocab.size)
    model = MLP(cfg, torch.Generator().manual_seed(1))
    fwd = model
    if world > 1:
        sync_batchnorm(model)
        fwd = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(2)
    share = 32 // world

    def step(mon=None):
        ix = torch.randint(0, data.train.X.shape[0], (32,), generator=g)[
            rank * share : (rank + 1) * share
        ]
        loss = F.cross_entropy(fwd(data.train.X[ix]), data.train.Y[ix].long())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if mon is not None:
            mon.step(loss)

    times: dict[str, list[float]] = {"plain": [], "record": []}
    for _ in range(rounds):
        for name in times:
            if world > 1:
                dist.barrier()
            t0 = time.perf_counter()
            if name == "record":
                with plumb.Monitor(model, every=1, hist_every=10 * steps) as mon:
                    for _ in range(steps):
                        step(mon)
            else:
                for _ in range(steps):
                    step()
            times[name].append((time.perf_counter() - t0) / steps * 1e6)
    return {k: statistics.median(v) for k, v in times.items()}


def _worker(rank: int, world: int, init: str, steps: int, rounds: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        res = measure(rank, world, steps, rounds)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(res, f)
    finally:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    one = measure(0, 1, args.steps, args.rounds)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r")
        init = "file://" + os.path.join(tmp, "rdv")
        mp.start_processes(
            _worker, args=(2, init, args.steps, args.rounds, out), nprocs=2, start_method="spawn"
        )
        with open(out) as f:
            two = json.load(f)
    print(f"lecture-deep, batch 32 in all, CPU, 1 thread per process ({os.cpu_count()} cores)")
    print(f"  {'':<12} {'plain us/step':>14} {'record us/step':>15} {'record cost':>12}")
    for name, r in (("1 process", one), ("2 ranks", two)):
        print(
            f"  {name:<12} {r['plain']:14.0f} {r['record']:15.0f} "
            f"{r['record'] - r['plain']:+9.0f} us"
        )


if __name__ == "__main__":
    main()
