"""Microseconds per training step of lecture-deep: plumb.nn vs the same model from torch.nn.

Same process, batch 32, CPU, 1 thread. Both models take the full step (forward,
cross-entropy, zero_grad, backward, SGD update): plumb with its own lecture SGD, torch.nn
with torch.optim.SGD. Blocks of steps alternate between the two so that drift in machine
speed hits both; the figure is the median over blocks.

Two modes: eager (plumb's layers are written-out tensor math, so a step dispatches about
twice as many aten ops as torch.nn's fused BatchNorm; on 32x100 tensors dispatch is the
cost), and ``torch.compile`` applied to both models (the written-out math and torch.nn
become the same kind of fused kernels).

    python bench/bench_step.py [--blocks 15] [--steps 200] [--no-compile] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from plumb.data import load_dataset
from plumb.models import MLP, preset_config
from plumb.optim import SGD


def torch_nn_deep(vocab: int, block: int, n_embd: int = 10, n_hidden: int = 100) -> nn.Module:
    layers: list[nn.Module] = [nn.Embedding(vocab, n_embd), nn.Flatten()]
    fan_in = n_embd * block
    for _ in range(5):
        layers += [nn.Linear(fan_in, n_hidden, bias=False), nn.BatchNorm1d(n_hidden), nn.Tanh()]
        fan_in = n_hidden
    layers += [nn.Linear(fan_in, vocab, bias=False), nn.BatchNorm1d(vocab)]
    return nn.Sequential(*layers)


def make_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    X,
    Y,
    g: torch.Generator,
    long_ids: bool,
    compiled: bool = False,
):
    forward = torch.compile(model) if compiled else model

    def step() -> None:
        ix = torch.randint(0, X.shape[0], (32,), generator=g)
        xb = X[ix].long() if long_ids else X[ix]
        loss = F.cross_entropy(forward(xb), Y[ix].long())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def time_block(step, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t0) / n * 1e6


def measure(
    X, Y, vocab: int, block: int, blocks: int, n: int, compiled: bool
) -> dict[str, list[float]]:
    cfg = preset_config("lecture-deep", vocab_size=vocab)
    plumb_model = MLP(cfg, torch.Generator().manual_seed(1))
    torch_model = torch_nn_deep(vocab, block)
    steps = {
        "plumb": make_step(
            plumb_model,
            SGD(plumb_model.parameters(), lr=0.1),
            X,
            Y,
            torch.Generator().manual_seed(2),
            long_ids=False,
            compiled=compiled,
        ),
        "torch.nn": make_step(
            torch_model,
            torch.optim.SGD(torch_model.parameters(), lr=0.1),
            X,
            Y,
            torch.Generator().manual_seed(2),
            long_ids=True,
            compiled=compiled,
        ),
    }
    for step in steps.values():  # warm up (and compile)
        time_block(step, 50)
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(blocks):
        for name, step in steps.items():
            times[name].append(time_block(step, n))
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=15)
    ap.add_argument("--steps", type=int, default=200, help="steps per block")
    ap.add_argument("--no-compile", action="store_true", help="eager mode only")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = load_dataset()
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, 1 thread, torch {torch.__version__}"
    print(f"lecture-deep training step, batch 32, CPU ({machine})")
    results = {}
    for mode in ("eager",) if args.no_compile else ("eager", "compiled"):
        times = measure(
            data.train.X,
            data.train.Y,
            data.vocab.size,
            data.block_size,
            args.blocks,
            args.steps,
            compiled=mode == "compiled",
        )
        med = {k: statistics.median(v) for k, v in times.items()}
        ratio = med["plumb"] / med["torch.nn"]
        results[mode] = {"us_per_step": med, "ratio": ratio}
        print(f"{mode}:")
        for k, v in med.items():
            print(
                f"  {k:<9} {v:8.1f} us/step   (blocks: {min(times[k]):.1f} .. {max(times[k]):.1f})"
            )
        print(f"  ratio plumb / torch.nn = {ratio:.3f}   (target <= 1.15)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, **results}, f, indent=2)


if __name__ == "__main__":
    main()
