"""How bad can the initial weight scale get before BatchNorm cannot help?"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt

from plumb.experiments.base import (
    Context,
    Result,
    Sweep,
    build,
    dataset,
    deep_config,
    fit,
    fmt,
    norm_label,
    unigram_loss,
)
from plumb.train import split_loss

NAME = "bn-rescue"
TITLE = "BatchNorm's rescue range for bad weight scales"
QUESTION = (
    "Multiply every hidden weight of a deep tanh net by a scale ({sweep}): after a "
    "fixed training budget, which scales still train, with and without BatchNorm, and "
    "where does each break?"
)
STEPS = (2000, 500)
SWEEP = Sweep(
    "scales",
    tuple(10 ** (k / 2) for k in range(-6, 7)),
    (0.01, 1.0, 100.0),
    hi=1e12,
    help="weight scales (1e-3 ... 1e3)",
)
NORMS = ("none", "batch")


def _one(task: tuple[str, float, str | None, int, int, str]) -> dict:
    norm, scale, path, steps, seed, device = task
    data = dataset(path)
    cfg = deep_config(data, norm=norm, weight_scale=scale)
    model, g = build(cfg, seed, device)
    losses = fit(model, data, steps, g, device=device)
    return {
        "norm": norm,
        "scale": scale,
        "train_loss_end": losses[-max(steps // 10, 1) :].mean().item(),
        "val": split_loss(model, data.val, device),
    }


def trains(val: float, best: float, baseline: float) -> bool:
    """A run "trains" when its val loss closes at least half the gap between the best
    context-free model (the unigram entropy: learning nothing from the input) and the
    best run of the sweep: relative to the sweep itself, so it holds at any budget."""
    return math.isfinite(val) and val <= best + (baseline - best) / 2


def run(ctx: Context) -> Result:
    data = dataset(ctx.options.data)
    baseline = unigram_loss(data)
    tasks = [
        (n, s, ctx.options.data, ctx.steps, ctx.seed, ctx.options.device)
        for n in NORMS
        for s in ctx.sweep
    ]
    rows = ctx.map(_one, tasks, "(norm, scale) runs")
    best = min((r["val"] for r in rows if math.isfinite(r["val"])), default=math.nan)
    for r in rows:
        r["trains"] = trains(r["val"], best, baseline)
    ranges = {}
    for norm in NORMS:
        ok = [r["scale"] for r in rows if r["norm"] == norm and r["trains"]]
        ranges[norm] = (min(ok), max(ok)) if ok else None

    def says(norm: str) -> str:
        rng = ranges[norm]
        if rng is None:
            return f"{norm}: no scale trains"
        mine = [r for r in rows if r["norm"] == norm]
        lo_break = [r["scale"] for r in mine if r["scale"] < rng[0]]
        hi_break = [r["scale"] for r in mine if r["scale"] > rng[1]]
        holes = [r["scale"] for r in mine if rng[0] < r["scale"] < rng[1] and not r["trains"]]
        text = (
            f"{norm}: trains only at {fmt(rng[0])}"
            if rng[0] == rng[1]
            else f"{norm}: trains from {fmt(rng[0])} to {fmt(rng[1])}"
        )
        if lo_break or hi_break:
            text += (
                " (breaks at "
                + " and ".join(
                    x
                    for x in (lo_break and fmt(max(lo_break)), hi_break and fmt(min(hi_break)))
                    if x
                )
                + ")"
            )
        if holes:
            text += f", except {', '.join(fmt(h) for h in holes)}"
        return text

    width = {n: math.log10(r[1] / r[0]) if r else 0.0 for n, r in ranges.items()}
    bn = {r["scale"]: r["val"] for r in rows if r["norm"] == "batch"}
    everywhere = ranges["batch"] == (min(ctx.sweep), max(ctx.sweep)) and all(
        r["trains"] for r in rows if r["norm"] == "batch"
    )
    answer = (
        f"Working range after {ctx.steps:,} steps (val loss at most half-way between the best "
        f"run, {fmt(best, 4)}, and the context-free unigram baseline, {fmt(baseline, 4)}): "
        f"{says('none')}; {says('batch')}. BatchNorm widens the working range from "
        f"{fmt(width['none'])} to {fmt(width['batch'])} decades of weight scale"
        + (
            f"; it trains at every scale tried, so its breaking points lie outside "
            f"[{fmt(min(ctx.sweep))}, {fmt(max(ctx.sweep))}]"
            if everywhere
            else ""
        )
        + ". With BatchNorm the forward pass does not depend on the scale, but the hidden "
        "weights' effective learning rate goes as 1/scale^2: val loss with BatchNorm is "
        + ", ".join(f"{fmt(bn[s], 4)} at {fmt(s)}" for s in sorted(bn))
        + "."
    )
    fig, ax = plt.subplots(figsize=(9, 3.8))
    for norm in NORMS:
        mine = [r for r in rows if r["norm"] == norm]
        ax.plot([r["scale"] for r in mine], [r["val"] for r in mine], "o-", label=f"norm {norm}")
    ax.axhline(baseline, ls=":", c="gray", label="unigram baseline (no context)")
    ax.axhline(best + (baseline - best) / 2, ls="--", c="k", lw=0.8, label="trains below this")
    ax.set_xscale("log")
    ax.set_xticks(list(ctx.sweep), [fmt(s) for s in ctx.sweep])
    ax.minorticks_off()
    ax.set_xlabel("hidden weight scale (x Kaiming 5/3)")
    ax.set_ylabel(f"val loss after {ctx.steps:,} steps (nats)")
    ax.set_title("diverged runs are missing")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    winner = max(NORMS, key=lambda n: (width[n], ranges[n] is not None))
    return Result(
        answer=answer,
        headline=(
            f"{norm_label(winner, start=True)} wins: "
            + says(winner).split(": ", 1)[1]
            + f" ({fmt(width[winner])} decades of weight scale); "
            + "; ".join(
                f"{norm_label(n)}: " + says(n).split(": ", 1)[1] for n in NORMS if n != winner
            )
            + "."
            if ranges[winner]
            else "No scale trains, with or without BatchNorm."
        ),
        columns={
            "norm": "norm",
            "scale": "weight scale",
            "trains": "trains",
            "val": "val loss (nats)",
            "train_loss_end": "train loss at the end (nats)",
        },
        rows=rows,
        method=(
            "A 5-layer tanh MLP (100 units, Kaiming gain 5/3, output weights x0.1), with and "
            "without BatchNorm1d after each hidden Linear, built from the same seed with every "
            f"hidden weight multiplied by each scale in {', '.join(fmt(s) for s in ctx.sweep)}; "
            f"trained {ctx.steps:,} steps (SGD, lr 0.1, batch 32), then val loss in eval mode."
        ),
        figures={"rescue": (fig, "Val loss after a fixed budget against the weight scale.")},
        extra={"unigram_baseline": baseline, "best_val": best, "ranges": ranges},
    )
