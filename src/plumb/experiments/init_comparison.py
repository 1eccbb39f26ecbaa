"""Four initialisations of a 10-layer tanh MLP without normalisation, side by side."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt

from plumb import nn as pnn
from plumb.doctor.rules import SATURATED_FRACTION
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
    smooth,
    spread,
    tanh_saturation,
)
from plumb.train import split_loss

NAME = "init-comparison"
TITLE = "Initialisation schemes for a deep tanh net"
QUESTION = (
    "Without normalisation, how do torch's nn.Linear default, plain N(0,1), Xavier and "
    "Kaiming (gain 5/3) initialisation shape a 10-layer tanh MLP's activations and "
    "gradients, and does that show in the loss?"
)
STEPS = (1000, 60)
DEPTH = 10

#: label: (ModelConfig.init, gain)
SCHEMES = {
    "torch default": ("torch", None),
    "N(0,1)": ("normal", None),
    "Xavier": ("xavier", 1.0),
    "Kaiming 5/3": ("kaiming", 5 / 3),
}


def _one(task: tuple[str, str | None, int, int, str]) -> dict:
    label, path, steps, seed, device = task
    data = dataset(path)
    init, gain = SCHEMES[label]
    cfg = deep_config(data, n_layers=DEPTH, init=init, gain=gain)
    model, g = build(cfg, seed, device)
    Xb, Yb = data.train.X[:256].to(device), data.train.Y[:256].to(device)
    first = layer_pass(model, Xb, Yb, (pnn.Tanh,))
    losses = fit(model, data, steps, g, device=device)
    last = layer_pass(model, Xb, Yb, (pnn.Tanh,))
    return {
        "label": label,
        "first": first,
        "sat_last": [tanh_saturation(r["out"]) for r in last],
        "losses": losses,
        "val": split_loss(model, data.val, device),
    }


def run(ctx: Context) -> Result:
    tasks = [
        (label, ctx.options.data, ctx.steps, ctx.seed, ctx.options.device) for label in SCHEMES
    ]
    runs = ctx.map(_one, tasks, "initialisations")
    rows = []
    for r in runs:
        stds = [x["out"].std().item() for x in r["first"]]
        gstds = [x["grad"].std().item() for x in r["first"]]
        sats = [tanh_saturation(x["out"]) for x in r["first"]]
        tail = r["losses"][-max(len(r["losses"]) // 10, 1) :]
        rows.append(
            {
                "init": r["label"],
                "act_std_layer1": stds[0],
                "act_std_layer10": stds[-1],
                "act_std_spread": spread(stds),
                "saturation_mean": sum(sats) / len(sats),
                "saturation_after": sum(r["sat_last"]) / len(r["sat_last"]),
                "grad_std_layer1": gstds[0],
                "grad_std_layer10": gstds[-1],
                "grad_std_spread": spread(gstds),
                "loss_step0": r["losses"][0].item(),
                "loss_last10pct": tail.mean().item(),
                "val": r["val"],
            }
        )
    figs = _figures(runs, ctx.steps)
    stable = [r["init"] for r in rows if r["act_std_spread"] <= STABLE_FACTOR]
    saturated = [r["init"] for r in rows if r["saturation_mean"] > SATURATED_FRACTION]
    shrinking = [
        r["init"] for r in rows if r["act_std_layer10"] < r["act_std_layer1"] / STABLE_FACTOR
    ]
    best = min(rows, key=lambda r: r["val"])
    answer = (
        f"At the first batch, per-layer activation std stays within a factor {STABLE_FACTOR:g} "
        f"across the 10 layers for: {', '.join(stable) or 'none'}. "
        f"More than {SATURATED_FRACTION:.0%} of tanh outputs are saturated (|t| > 0.97) for: "
        f"{', '.join(saturated) or 'none'}. The std shrinks by more than {STABLE_FACTOR:g}x from "
        f"layer 1 to layer 10 for: {', '.join(shrinking) or 'none'}. "
        + "; ".join(
            f"{r['init']}: act std {fmt(r['act_std_layer1'])} -> {fmt(r['act_std_layer10'])}, "
            f"grad std spread {fmt(r['grad_std_spread'])}x, val {fmt(r['val'], 4)}"
            for r in rows
        )
        + f". After {ctx.steps:,} steps the best val loss is {best['init']}'s ({fmt(best['val'], 4)})."
    )
    return Result(
        answer=answer,
        headline="std spread over depth: "
        + ", ".join(f"{r['init']} {fmt(r['act_std_spread'])}x" for r in rows)
        + f"; best val {best['init']} {fmt(best['val'], 4)}",
        rows=rows,
        method=(
            f"A {DEPTH}-layer MLP (10-d embedding, 100 tanh units per layer, no normalisation, "
            "output weights x0.1) on the names data, initialised four ways from the same seed. "
            "torch default: W, b ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)); N(0,1): W ~ N(0, 1); "
            "Xavier: W ~ N(0, 2/(fan_in + fan_out)); Kaiming: W ~ N(0, (5/3)^2/fan_in). "
            "Statistics of every tanh layer come from one forward/backward of 256 training "
            f"examples before any update; then {ctx.steps:,} steps of SGD (lr 0.1, batch 32), "
            "val loss in eval mode."
        ),
        figures=figs,
    )


def _figures(runs: list[dict], steps: int) -> dict:
    out = {}
    for key, title in (("out", "activations"), ("grad", "gradients")):
        fig, axes = plt.subplots(1, len(runs), figsize=(4 * len(runs), 3.2))
        for ax, r in zip(axes, runs, strict=True):
            density_panel(
                ax, [(f"tanh{i + 1}", x[key]) for i, x in enumerate(r["first"])], r["label"]
            )
        axes[0].legend(fontsize=6)
        fig.suptitle(f"{title} of each tanh layer at the first batch")
        fig.tight_layout()
        out[f"{title}_first_batch"] = (
            fig,
            f"Distribution of each tanh layer's {title} before any update, per scheme.",
        )
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.6))
    for r in runs:
        sats = [tanh_saturation(x["out"]) for x in r["first"]]
        a1.plot(range(1, len(sats) + 1), sats, "o-", label=r["label"])
        x, y = smooth(r["losses"], max(steps // 50, 1))
        a2.plot(x, [math.log10(v) for v in y], label=r["label"])
    a1.set_xlabel("layer")
    a1.set_ylabel("saturated fraction (|t| > 0.97)")
    a1.axhline(SATURATED_FRACTION, ls="--", c="gray", lw=0.8)
    a1.legend(fontsize=8)
    a2.set_xlabel("step")
    a2.set_ylabel("log10 loss (window mean)")
    a2.legend(fontsize=8)
    fig.tight_layout()
    out["saturation_and_loss"] = (
        fig,
        "Left: saturated fraction per layer at the first batch (dashed: the doctor's 30% "
        f"threshold). Right: training loss over the first {steps:,} steps.",
    )
    return out
