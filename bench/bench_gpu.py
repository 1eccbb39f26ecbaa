"""The GPU bench: where CUDA is available, lecture-deep's step on one GPU (plumb fused with
CUDA graphs, plumb eager, torch.nn eager and compiled, at batch 32 and 4096), what the
probes cost there, and, with several GPUs, `plumb train` under DDP on all of them.
Prints the tables; without CUDA it says so and measures nothing.

    python bench/bench_gpu.py          (make bench-gpu)
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import plumb
from plumb.fused import FusedStep
from plumb.models import MLP, preset_config
from plumb.optim import SGD


def timed(step, n: int = 200, rounds: int = 5) -> float:
    for _ in range(20):  # compile, CUDA graph capture, warm caches
        step()
    torch.cuda.synchronize()
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(out)


def single_gpu(batch: int) -> dict[str, float]:
    data = plumb.load_dataset()
    X, Y = data.train.X.cuda(), data.train.Y.cuda().long()
    cfg = preset_config("lecture-deep", vocab_size=data.vocab.size)
    g = torch.Generator(device="cuda").manual_seed(2)

    def draw():
        ix = torch.randint(0, X.shape[0], (batch,), device="cuda", generator=g)
        return X[ix], Y[ix]

    res = {}
    model = MLP(cfg, torch.Generator().manual_seed(1)).cuda()
    fused = FusedStep(model, SGD(model.parameters(), lr=0.1))
    res["plumb fused (CUDA graphs)"] = timed(lambda: fused(*draw(), 0.1))
    for name, probed in (("plumb eager", False), ("plumb eager + Monitor()", True)):
        model = MLP(cfg, torch.Generator().manual_seed(1)).cuda()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        mon = plumb.Monitor(model) if probed else None
        if mon is not None:
            mon.attach()

        def step(model=model, opt=opt, mon=mon):
            x, y = draw()
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if mon is not None:
                mon.step(loss)

        res[name] = timed(step)
        if mon is not None:
            mon.close()
    torch_nn = torch.nn.Sequential(
        torch.nn.Embedding(data.vocab.size, 10),
        torch.nn.Flatten(),
        *[
            m
            for i in range(5)
            for m in (
                torch.nn.Linear(30 if i == 0 else 100, 100, bias=False),
                torch.nn.BatchNorm1d(100),
                torch.nn.Tanh(),
            )
        ],
        torch.nn.Linear(100, data.vocab.size, bias=False),
        torch.nn.BatchNorm1d(data.vocab.size),
    ).cuda()
    for name, fwd in (("torch.nn eager", torch_nn), ("torch.nn compiled", torch.compile(torch_nn))):
        opt = torch.optim.SGD(torch_nn.parameters(), lr=0.1)

        def step(fwd=fwd, opt=opt):
            x, y = draw()
            loss = F.cross_entropy(fwd(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        res[name] = timed(step)
    return res


def ddp_all_gpus(n: int) -> float:
    """Wall time of `plumb train --nproc n --device cuda` for 2,000 steps (batch 32 x n)."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        subprocess.run(
            [
                *(sys.executable, "-m", "plumb", "train", "--nproc", str(n), "--device", "cuda"),
                *("--steps", "2000", "--batch-size", str(32 * n), "--samples", "0"),
                *("--no-progress", "--no-report", "--out", os.path.join(tmp, "run")),
            ],
            check=True,
        )
        return time.perf_counter() - t0


def main() -> None:
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here: nothing measured")
        return
    print(f"{torch.cuda.get_device_name()} (torch {torch.__version__})")
    for batch in (32, 4096):
        print(f"lecture-deep training step, batch {batch}:")
        for name, us in single_gpu(batch).items():
            print(f"  {name:<28} {us:9.1f} us/step")
    n = torch.cuda.device_count()
    if n > 1:
        print(f"plumb train --nproc {n} (DDP, nccl), 2,000 steps: {ddp_all_gpus(n):.1f} s")


if __name__ == "__main__":
    main()
