"""Gradient flow through a deep tanh net with no normalisation, BatchNorm and LayerNorm."""

from __future__ import annotations

import matplotlib.pyplot as plt

from plumb import nn as pnn
from plumb.experiments.base import (
    STABLE_FACTOR,
    Context,
    Result,
    build,
    dataset,
    deep_config,
    density_panel,
    fit,
    fmt,
    layer_pass,
    norm_label,
    spread,
)
from plumb.train import split_loss

NAME = "gradient-flow"
TITLE = "Gradient flow with and without normalisation"
QUESTION = (
    "In a deep tanh net, how evenly do gradients reach each layer with no normalisation, "
    "with BatchNorm and with LayerNorm, and how much does that depend on the scale of the "
    "initial weights?"
)
STEPS = (2000, 40)
DEPTH = 10
NORMS = ("none", "batch", "layer")
GAINS = (0.5, 5 / 3)  # too small for tanh; Kaiming's


def _one(task: tuple[str, float, str | None, int, int, str]) -> dict:
    norm, gain, path, steps, seed, device = task
    data = dataset(path)
    model, g = build(deep_config(data, n_layers=DEPTH, norm=norm, gain=gain), seed, device)
    Xb, Yb = data.train.X[:256].to(device), data.train.Y[:256].to(device)
    start = layer_pass(model, Xb, Yb, (pnn.Tanh,))
    losses = fit(model, data, steps, g, device=device)
    end = layer_pass(model, Xb, Yb, (pnn.Tanh,))
    return {
        "norm": norm,
        "gain": gain,
        "grads_start": [r["grad"] for r in start],
        "grads_end": [r["grad"] for r in end],
        "act_start": [r["out"].std().item() for r in start],
        "loss_end": losses[-max(steps // 10, 1) :].mean().item(),
        "val": split_loss(model, data.val, device),
    }


def run(ctx: Context) -> Result:
    tasks = [
        (n, gain, ctx.options.data, ctx.steps, ctx.seed, ctx.options.device)
        for n in NORMS
        for gain in GAINS
    ]
    runs = ctx.map(_one, tasks, "nets")
    rows = []
    for r in runs:
        r["gs"] = [t.std().item() for t in r["grads_start"]]
        r["ge"] = [t.std().item() for t in r["grads_end"]]
        rows.append(
            {
                "norm": r["norm"],
                "gain": round(r["gain"], 4),
                "grad_std_layer1_start": r["gs"][0],
                f"grad_std_layer{DEPTH}_start": r["gs"][-1],
                "grad_std_spread_start": spread(r["gs"]),
                "grad_std_spread_end": spread(r["ge"]),
                "act_std_spread_start": spread(r["act_start"]),
                "train_loss_end": r["loss_end"],
                "val": r["val"],
            }
        )
    # How much the depth profile of the gradient changes with the weight scale: the spread
    # across layers of grad_std(gain a) / grad_std(gain b); 1 = the same shape.
    change = {}
    for norm in NORMS:
        a, b = (r for r in runs if r["norm"] == norm)
        change[norm] = spread([x / y for x, y in zip(a["gs"], b["gs"], strict=True)])
    even = [
        f"{r['norm']} (gain {fmt(r['gain'])})"
        for r in rows
        if r["grad_std_spread_start"] <= STABLE_FACTOR
    ]
    same = [n for n in NORMS if change[n] <= 1.01]
    best = min(rows, key=lambda r: r["val"])
    g0, g1 = (fmt(g) for g in GAINS)
    answer = (
        f"At the start, the gradient std differs across the {DEPTH} tanh layers by "
        + ", ".join(
            f"{fmt(r['grad_std_spread_start'])}x ({r['norm']}, gain {fmt(r['gain'])})" for r in rows
        )
        + f"; within a factor {STABLE_FACTOR:g}: {', '.join(even) or 'none'}. "
        f"Changing the initial weight scale from gain {g0} to {g1} changes the shape of that "
        "depth profile by "
        + ", ".join(f"{fmt(change[n])}x ({n})" for n in NORMS)
        + f" (1x: the same shape); unchanged within 1% for: {', '.join(same) or 'none'}. "
        "(A normalised layer's output does not depend on the scale of the weights before "
        "it, and so neither does the gradient it passes back, up to eps.) Forward, "
        "the activation std across depth spreads by "
        + ", ".join(
            f"{fmt(r['act_std_spread_start'])}x ({r['norm']}, {fmt(r['gain'])})" for r in rows
        )
        + f". After {ctx.steps:,} steps the best val loss is {fmt(best['val'], 4)} "
        f"({best['norm']}, gain {fmt(best['gain'])})."
    )
    return Result(
        answer=answer,
        headline=(
            f"Normalisation wins: with {' and '.join(norm_label(n) for n in same)} the gradient's depth profile keeps "
            f"its shape when the init gain goes {g0} -> {g1} (change "
            + ", ".join(f"{fmt(change[n])}x" for n in same)
            + "); "
            if same
            else "No layer type keeps the gradient profile's shape when the init gain goes "
            f"{g0} -> {g1}; "
        )
        + "; ".join(
            f"with {norm_label(n)} it changes {fmt(change[n])}x" for n in NORMS if n not in same
        )
        + f". Best val: {norm_label(best['norm'])}, gain {fmt(best['gain'])} ({fmt(best['val'], 4)} nats).",
        columns={
            "norm": "norm",
            "gain": "gain",
            "grad_std_spread_start": "gradient std spread over depth, start (x)",
            "grad_std_spread_end": "same, after training (x)",
            "act_std_spread_start": "activation std spread, start (x)",
            "val": "val loss (nats)",
            "train_loss_end": "train loss at the end (nats)",
        },
        rows=rows,
        method=(
            f"A {DEPTH}-layer tanh MLP (100 units, W ~ N(0, gain^2/fan_in), output weights "
            "x0.1), built from the same seed as [Linear, tanh], [Linear, BatchNorm1d, tanh] and "
            f"[Linear, LayerNorm, tanh], each at gain {g0} and {g1}. The gradient dL/d(out) of "
            "every tanh layer comes from one forward/backward of 256 training examples before "
            f"training and again after {ctx.steps:,} steps of SGD (lr 0.1, batch 32)."
        ),
        figures=_figures(runs, ctx.steps),
        extra={"profile_change": change},
    )


def _figures(runs: list[dict], steps: int) -> dict:
    fig, axes = plt.subplots(len(GAINS), len(NORMS), figsize=(4.2 * len(NORMS), 3 * len(GAINS)))
    for r in runs:
        ax = axes[GAINS.index(r["gain"])][NORMS.index(r["norm"])]
        density_panel(
            ax,
            [(f"tanh{i + 1}", t) for i, t in enumerate(r["grads_start"])],
            f"norm={r['norm']}, gain {fmt(r['gain'])}",
            xlabel="dL/d(tanh output)",
        )
    axes[0][-1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.suptitle("gradient dL/d(out) of each tanh layer, before training")
    fig.tight_layout()
    fig2, axes2 = plt.subplots(1, len(GAINS), figsize=(12, 3.8), sharey=True)
    for r in runs:
        ax = axes2[GAINS.index(r["gain"])]
        x = range(1, len(r["gs"]) + 1)
        (line,) = ax.plot(x, r["gs"], "o-", label=f"{r['norm']}, start")
        ax.plot(x, r["ge"], "x--", c=line.get_color(), label=f"{r['norm']}, after {steps:,} steps")
        ax.set_title(f"gain {fmt(r['gain'])}", fontsize=10)
        ax.set_yscale("log")
        ax.set_xlabel("tanh layer")
    axes2[0].set_ylabel("std of dL/d(out) (log scale)")
    axes2[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig2.tight_layout()
    return {
        "gradient_histograms": (fig, "Per-layer gradient distributions side by side."),
        "grad_std_by_depth": (fig2, "Gradient std by depth, at the start and after training."),
    }
