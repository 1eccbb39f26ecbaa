"""Cost of a diagnosis: wall time of ``plumb.diagnose(..., steps=100)`` on lecture-deep.

Same work as ``plumb doctor``: lecture-deep (5 x [Linear, BatchNorm, Tanh]), batch 32 from
the bundled names, plumb's SGD at lr 0.1, every step recorded by the probes, the lr test
(5 copies x 30 steps, scored on 16 batches), then the rules; also without the lr test, and
the bare 100 training steps, for the ratio.
Median of ``--repeats`` runs (a fresh model each). Target (issue 4): under 3 s.

    python bench/bench_doctor.py [--repeats 5] [--steps 100] [--threads N] [--json out.json]
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

from plumb import diagnose
from plumb.data import load_dataset
from plumb.models import MLP, preset_config
from plumb.optim import SGD


def setup(data, seed: int):
    g = torch.Generator().manual_seed(seed)
    model = MLP(preset_config("lecture-deep", vocab_size=data.vocab.size), g)
    X, Y = data.train.X, data.train.Y.long()

    def batch():
        ix = torch.randint(0, X.shape[0], (32,), generator=g)
        return X[ix], Y[ix]

    return model, batch, SGD(model.parameters(), lr=0.1)


def bare(data, steps: int, seed: int) -> float:
    model, batch, opt = setup(data, seed)
    t0 = time.perf_counter()
    for _ in range(steps):
        x, y = batch()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def doctor(data, steps: int, seed: int, test_lr: bool = True) -> tuple[float, bool]:
    model, batch, opt = setup(data, seed)
    t0 = time.perf_counter()
    diag = diagnose(model, batch, F.cross_entropy, opt, steps=steps, test_lr=test_lr)
    return time.perf_counter() - t0, diag.ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_dataset()
    doctor(data, 5, 0)  # warm-up: first-call costs (allocator, lazy imports)
    runs, plain, oks, no_test = [], [], [], []
    for r in range(args.repeats):
        plain.append(bare(data, args.steps, r))
        seconds, ok = doctor(data, args.steps, r)
        runs.append(seconds)
        oks.append(ok)
        no_test.append(doctor(data, args.steps, r, test_lr=False)[0])
    med, base = statistics.median(runs), statistics.median(plain)
    probes_only = statistics.median(no_test)
    result = {
        "diagnose_seconds": round(med, 3),
        "without_lr_test_seconds": round(probes_only, 3),
        "bare_steps_seconds": round(base, 3),
        "ratio": round(med / base, 2),
        "target_seconds": 3.0,
        "healthy_every_time": all(oks),
        "steps": args.steps,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus".strip(),
    }
    print(
        f"diagnose(lecture-deep, steps={args.steps}): {med:.2f} s (median of {args.repeats}); "
        f"{probes_only:.2f} s of it the probed steps and the rules, {med - probes_only:.2f} s "
        f"the lr test; bare steps {base:.2f} s ({med / base:.1f}x); target < 3 s: "
        f"{'met' if med < 3 else 'MISSED'}; healthy every time: {all(oks)}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
