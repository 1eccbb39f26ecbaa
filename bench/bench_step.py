"""Microseconds per training step: plumb's engines against the same model in torch.nn.

Same process, CPU, 1 thread, the full step (forward, cross-entropy, backward, SGD update):

    plumb eager     plumb.nn layers under autograd (the notebook's ops), plumb's SGD
    plumb fused     plumb.fused: forward, hand-written backward and update, on the CPU
                    as one call of its step in C (plumb.cstep: torch's sgemm, loops)
    plumb fused graph  the same step as one torch.compile'd graph (what CUDA runs, and
                    the CPU without a C compiler)
    torch.nn eager  the same architecture from torch.nn (fused BatchNorm kernels),
                    torch.optim.SGD
    torch.nn compiled  that model under torch.compile (the forward; autograd backward)

Part 1, the targets (lecture-deep, batch 32): blocks of 50 steps alternate between the
configurations (short blocks, so this VM's drift hits all alike), ``--rounds`` x
``--steps`` steps each, median over blocks. Targets (issue 13): fused <= 0.5x torch.nn eager and <= 0.7x
torch.nn compiled; (issue 2) plumb eager <= 1.15x torch.nn eager. Compile time is the
first call's time (inductor's on-disk cache makes a second process faster).

Part 1 also prints the FLOP limit of the lecture-deep step (its matmul FLOPs, below, at
this thread's measured float32 matmul peak) and how far the fused step is from it
(issue 24's target: within 2x), and the floor under any step: its 18 matmuls alone,
eagerly into preallocated outputs and as one compiled graph, and an empty compiled
graph's call.

Part 2 (``--scaling``): batch 32 .. 4096 x n_hidden 100 .. 1024, fused vs torch.nn eager
and compiled, with the achieved GFLOP/s (6 x batch x sum of fan_in x fan_out per step:
2 for the forward matmuls, 4 for the backward's) against this machine's measured float32
matmul peak (one 1024^3 matmul, 1 thread), as nanoGPT reports MFU: where dispatch stops
mattering and the step becomes matmul-bound; per row, the fused step against its FLOP
limit and against torch.nn eager (issue 24's target: at most 1.0x at every size).

    python bench/bench_step.py [--rounds 5] [--steps 200] [--scaling] [--json out.json]
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
from plumb.fused import FusedStep
from plumb.memory import reuse_freed_memory
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


def flops_per_step(batch: int, vocab: int, block: int, n_embd: int, n_hidden: int) -> float:
    fans = [(n_embd * block, n_hidden)] + [(n_hidden, n_hidden)] * 4 + [(n_hidden, vocab)]
    return 6.0 * batch * sum(a * b for a, b in fans)


def matmul_peak() -> float:
    """GFLOP/s of a 1024^3 float32 matmul on this thread (median of 5)."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * 1024**3 / statistics.median(times) / 1e9


def floor(vocab: int, block: int, batch: int = 32, n_embd: int = 10, n_hidden: int = 100):
    """What any step of lecture-deep pays before its first elementwise op: its 18 matmuls
    (forward X W, backward dY W^T and X^T dY, for the 6 Linears) run eagerly into
    preallocated outputs, the same 18 as one graph compiled as the fused step is
    (inductor, C++ wrapper: it allocates its outputs), and the call of an empty compiled
    graph given the fused step's number of tensors. Microseconds, median of 7 x 500."""
    from plumb.fused import COMPILE_OPTIONS

    fans = [(n_embd * block, n_hidden)] + [(n_hidden, n_hidden)] * 4 + [(n_hidden, vocab)]
    X = [torch.randn(batch, a) for a, _ in fans]
    W = [torch.randn(a, b) for a, b in fans]
    dY = [torch.randn(batch, b) for _, b in fans]
    outs = [(torch.empty(batch, b), torch.empty(batch, a), torch.empty(a, b)) for a, b in fans]

    def eager() -> None:
        for x, w, dy, (o, dx, dw) in zip(X, W, dY, outs, strict=True):
            torch.mm(x, w, out=o)
            torch.mm(dy, w.t(), out=dx)
            torch.mm(x.t(), dy, out=dw)

    def graph(X, W, dY):
        return [
            m for x, w, dy in zip(X, W, dY, strict=False) for m in (x @ w, dy @ w.t(), x.t() @ dy)
        ]

    def empty(ts, lr):
        return lr * 2

    opts = dict(fullgraph=True, dynamic=False, options=COMPILE_OPTIONS)
    compiled, nothing = torch.compile(graph, **opts), torch.compile(empty, **opts)
    ts, lr = [torch.randn(8) for _ in range(3 * len(fans) + 4)], torch.zeros(())

    def us(f) -> float:
        for _ in range(50):
            f()
        times = []
        for _ in range(7):
            t0 = time.perf_counter()
            for _ in range(500):
                f()
            times.append((time.perf_counter() - t0) / 500 * 1e6)
        return statistics.median(times)

    return {
        "matmuls_eager_us": us(eager),
        "matmuls_compiled_us": us(lambda: compiled(X, W, dY)),
        "empty_graph_call_us": us(lambda: nothing(ts, lr)),
    }


def steps_for(X, Y, vocab: int, block: int, batch: int, n_hidden: int, which: list[str]):
    """{name: (step function, first-call seconds)} for the configurations in ``which``."""
    out = {}
    cfg = preset_config("lecture-deep", vocab_size=vocab, n_hidden=n_hidden)

    def batches(seed: int):
        g = torch.Generator().manual_seed(seed)

        def draw():
            ix = torch.randint(0, X.shape[0], (batch,), generator=g)
            return X[ix], Y[ix].long()

        return draw

    for name in which:
        draw = batches(2)
        if name.startswith("plumb"):
            model = MLP(cfg, torch.Generator().manual_seed(1))
            opt = SGD(model.parameters(), lr=0.1)
            if name.startswith("plumb fused"):  # on this CPU the step in C; or the graph
                fused = FusedStep(model, opt, native=None if name == "plumb fused" else False)

                def step(fused=fused, draw=draw):
                    x, y = draw()
                    fused(x, y, 0.1)

            else:

                def step(model=model, opt=opt, draw=draw):
                    x, y = draw()
                    loss = F.cross_entropy(model(x), y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()

        else:
            model = torch_nn_deep(vocab, block, n_hidden=n_hidden)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            fwd = torch.compile(model) if name == "torch.nn compiled" else model

            def step(fwd=fwd, opt=opt, draw=draw):
                x, y = draw()
                loss = F.cross_entropy(fwd(x.long()), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

        t0 = time.perf_counter()
        step()
        out[name] = (step, time.perf_counter() - t0)
    return out


def interleaved(steps: dict, rounds: int, n: int, block: int = 50) -> dict[str, float]:
    """Median over blocks of each configuration's time per step: blocks of ``block``
    steps alternate between the configurations (short blocks: the machine's drift hits
    all alike), ``rounds`` x ``n`` steps each."""
    names = list(steps)
    for step, _ in steps.values():
        for _ in range(20):
            step()
    per: dict[str, list[float]] = {k: [] for k in names}
    block = max(1, min(block, n))
    for r in range(rounds * max(1, n // block)):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            step = steps[k][0]
            t0 = time.perf_counter()
            for _ in range(block):
                step()
            per[k].append((time.perf_counter() - t0) / block * 1e6)
    return {k: statistics.median(v) for k, v in per.items()}


ALL = ["plumb eager", "plumb fused", "plumb fused graph", "torch.nn eager", "torch.nn compiled"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=200, help="steps per round")
    ap.add_argument("--scaling", action="store_true", help="also the batch x width table")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    reuse_freed_memory()  # as plumb train does, for every configuration alike
    torch.set_num_threads(1)
    data = load_dataset()
    X, Y, V, T = data.train.X, data.train.Y, data.vocab.size, data.block_size
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, 1 thread, torch {torch.__version__}"
    print(f"lecture-deep training step, batch 32, CPU ({machine})")
    steps = steps_for(X, Y, V, T, 32, 100, ALL)
    med = interleaved(steps, args.rounds, args.steps)
    results: dict = {"machine": machine, "lecture_deep": {}}
    for k, us in med.items():
        results["lecture_deep"][k] = {"us_per_step": us, "first_call_s": steps[k][1]}
        print(f"  {k:<18} {us:8.1f} us/step   (first call {steps[k][1]:5.1f} s)")
    ratios = {
        "fused / torch.nn eager": (med["plumb fused"] / med["torch.nn eager"], 0.5),
        "fused graph / torch.nn eager": (med["plumb fused graph"] / med["torch.nn eager"], 0.5),
        "fused / torch.nn compiled": (med["plumb fused"] / med["torch.nn compiled"], 0.7),
        "plumb eager / torch.nn eager": (med["plumb eager"] / med["torch.nn eager"], 1.15),
    }
    for k, (r, target) in ratios.items():
        print(f"  {k:<30} {r:5.2f}   (target <= {target})")
    results["ratios"] = {k: r for k, (r, _) in ratios.items()}
    # The FLOP limit: the step's matmul FLOPs at this thread's measured matmul peak.
    peak = matmul_peak()
    limit_us = flops_per_step(32, V, T, 10, 100) / peak / 1e3
    over = med["plumb fused"] / limit_us
    print(
        f"  FLOP limit {limit_us:.0f} us/step ({flops_per_step(32, V, T, 10, 100) / 1e6:.1f} MFLOP "
        f"at the measured {peak:.1f} GFLOP/s): plumb fused at {over:.2f}x the limit "
        "(target <= 2)"
    )
    results["limit"] = {"matmul_peak_gflops": peak, "limit_us": limit_us, "fused_x_limit": over}
    fl = floor(V, T)
    print(
        f"  the floor: its 18 matmuls alone {fl['matmuls_eager_us']:.0f} us eager "
        f"({fl['matmuls_eager_us'] / limit_us:.2f}x the limit), "
        f"{fl['matmuls_compiled_us']:.0f} us as one compiled graph "
        f"({fl['matmuls_compiled_us'] / limit_us:.2f}x); "
        f"an empty compiled graph's call {fl['empty_graph_call_us']:.0f} us"
    )
    results["limit"].update(fl)
    if args.scaling:
        print(f"\nscaling (float32 matmul peak on 1 thread: {peak:.1f} GFLOP/s)")
        print(f"  {'batch':>6} {'hidden':>6}  " + "  ".join(f"{k:>24}" for k in ALL[1:]))
        rows = []
        for batch in (32, 512, 4096):
            for hidden in (100, 320, 1024):
                st = steps_for(X, Y, V, T, batch, hidden, ALL[1:])
                n = max(5, min(args.steps, int(2e6 / (batch * hidden))))
                m = interleaved(st, 3, n)
                fl = flops_per_step(batch, V, T, 10, hidden)
                cells = [
                    f"{m[k]:9.0f} us {fl / m[k] / 1e3:6.1f} GF/s {100 * fl / m[k] / 1e3 / peak:3.0f}%"
                    for k in ALL[1:]
                ]
                limit = fl / peak / 1e3
                print(
                    f"  {batch:>6} {hidden:>6}  " + "  ".join(cells),
                    f"  fused {m['plumb fused'] / limit:4.2f}x the limit, "
                    f"{m['plumb fused'] / m['torch.nn eager']:4.2f}x torch.nn eager",
                    flush=True,
                )
                rows.append(
                    {"batch": batch, "n_hidden": hidden, "flops": fl, **{k: m[k] for k in ALL[1:]}}
                )
        results["scaling"] = {"matmul_peak_gflops": peak, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
