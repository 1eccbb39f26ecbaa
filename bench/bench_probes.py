"""Cost of the probes: microseconds per lecture-deep training step, with and without a Monitor.

Same process, batch 32, CPU, 1 thread, plumb's layers and SGD. Configurations:

    plain       the bare training step
    default     plumb.Monitor(model) at its default cadence (every=50, histograms every 500)
    every-step  plumb.Monitor(model, every=1, hist_every=1): every statistic, every step
    notebook    the lecture's loop: update ratios read with .item() for every parameter, every step

Blocks of steps alternate between configurations so that drift in machine speed hits all;
the figure is the median over blocks. Targets (issue 3): default <= 1.05x, every-step <= 1.3x.

    python bench/bench_probes.py [--blocks 9] [--steps 300] [--json out.json]
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

from plumb import Monitor
from plumb.data import load_dataset
from plumb.models import MLP, preset_config
from plumb.optim import SGD

CONFIGS = {
    "plain": None,
    "default": {},
    "every-step": {"every": 1, "hist_every": 1},
    "notebook": "notebook",
}


def make(vocab: int, X, Y, mode):
    g = torch.Generator().manual_seed(1)
    model = MLP(preset_config("lecture-deep", vocab_size=vocab), g)
    opt = SGD(model.parameters(), lr=0.1)
    params = list(model.parameters())
    mon = Monitor(model, **mode) if isinstance(mode, dict) else None
    if mon is not None:
        mon.attach()
    ud: list[list[float]] = []

    def step() -> None:
        ix = torch.randint(0, X.shape[0], (32,), generator=g)
        loss = F.cross_entropy(model(X[ix]), Y[ix].long())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if mon is not None:
            mon.step(loss)
        elif mode == "notebook":
            with torch.no_grad():
                ud.append([((0.1 * p.grad).std() / p.data.std()).log10().item() for p in params])

    return step, mon


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=9)
    ap.add_argument("--steps", type=int, default=300, help="steps per block")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = load_dataset()
    X, Y = data.train.X, data.train.Y
    steps = {name: make(data.vocab.size, X, Y, mode) for name, mode in CONFIGS.items()}
    times: dict[str, list[float]] = {k: [] for k in steps}
    for step, _ in steps.values():  # warm up
        for _ in range(100):
            step()
    for _ in range(args.blocks):
        for name, (step, _) in steps.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[name].append((time.perf_counter() - t0) / args.steps * 1e6)
    for _, mon in steps.values():
        if mon is not None:
            mon.close(write_report=False)
    med = {k: statistics.median(v) for k, v in times.items()}
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, 1 thread, torch {torch.__version__}"
    print(f"lecture-deep training step with probes, batch 32, CPU ({machine})")
    targets = {"default": 1.05, "every-step": 1.3}
    results = {}
    for name, us in med.items():
        ratio = us / med["plain"]
        results[name] = {"us_per_step": us, "ratio": ratio}
        target = f"   (target <= {targets[name]})" if name in targets else ""
        print(f"  {name:<11} {us:8.1f} us/step   {ratio:5.2f}x{target}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, **results}, f, indent=2)


if __name__ == "__main__":
    main()
