"""The Monitor's default cadence, step by step: a plain model and the same model under
``plumb.Monitor(model)`` (every 50, histograms every 500) take turns one training step at
a time, so that the machine's drift hits both alike within a step pair; the figure is the
ratio of the mean step times over every step (record and histogram steps included).

    python bench/bench_monitor_steps.py [--models gpt,lstm] [--steps 1000]

(``bench_probes.py`` alternates blocks of 50 steps among five configurations; this bench
isolates the one that has a target, 1.05x, with the finest interleaving.)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_probes import MODELS

from plumb import Monitor
from plumb.memory import reuse_freed_memory


def bench(name: str, steps: int) -> dict[str, float]:
    build = MODELS[name]()
    plain, watched = build(), build()
    mon = Monitor(watched[0], report=False)
    mon.attach()
    times: dict[str, list[float]] = {"plain": [], "monitor": []}
    for i in range(steps + 1):
        pairs = (("plain", plain), ("monitor", watched))
        for label, (model, opt, batch, loss_fn) in pairs if i % 2 else pairs[::-1]:
            x, y = batch()
            t0 = time.perf_counter()
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if label == "monitor":
                mon.step(loss)
            if i:  # step 0 (first calls, the first record and histogram step) is set-up
                times[label].append(time.perf_counter() - t0)
    mon.close()
    mean = {k: statistics.fmean(v) * 1e6 for k, v in times.items()}
    record = [t for k, t in enumerate(times["monitor"], 1) if k % 50 == 0]
    return {
        "plain_us": mean["plain"],
        "monitor_us": mean["monitor"],
        "ratio": mean["monitor"] / mean["plain"],
        "record_step_us": statistics.median(record) * 1e6 if record else float("nan"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="gpt,lstm")
    ap.add_argument("--steps", type=int, default=1000)
    args = ap.parse_args()
    reuse_freed_memory()  # as plumb train does, for every configuration alike
    torch.set_num_threads(1)
    for name in args.models.split(","):
        r = bench(name, args.steps)
        print(
            f"{name:<13} plain {r['plain_us']:8.0f} us/step   Monitor {r['monitor_us']:8.0f} "
            f"us/step   {r['ratio']:.3f}x mean (target <= 1.05)   a record step "
            f"{r['record_step_us'] / 1000:.1f} ms"
        )


if __name__ == "__main__":
    main()
