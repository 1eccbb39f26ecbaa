"""Why 5/3: activation and gradient std across depth for a sweep of Kaiming gains."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
from torch import nn

from plumb import nn as pnn
from plumb.doctor.rules import SATURATED_FRACTION
from plumb.experiments.base import (
    STABLE_FACTOR,
    Context,
    Result,
    build,
    dataset,
    deep_config,
    fit,
    fmt,
    layer_pass,
    positive,
    spread,
    tanh_saturation,
)
from plumb.train import split_loss

NAME = "gain-sweep"
TITLE = "The gain: why 5/3 for tanh"
QUESTION = (
    "In deep nets without normalisation, W ~ N(0, gain^2/fan_in): which gain keeps the "
    "activations and gradients at a steady scale through depth, for a linear-only stack "
    "and for a tanh stack?"
)
STEPS = (1000, 40)
SWEEP = ("gains", [0.5, 1.0, 5 / 3, 3.0], positive("gains", 0.0, 100.0))
DEPTH = 10
ACTIVATIONS = ("linear", "tanh")


def _one(task: tuple[str, float, str | None, int, int, str]) -> dict:
    act, gain, path, steps, seed, device = task
    data = dataset(path)
    model, g = build(deep_config(data, n_layers=DEPTH, activation=act, gain=gain), seed, device)
    Xb, Yb = data.train.X[:1000].to(device), data.train.Y[:1000].to(device)
    kinds = (pnn.Tanh,) if act == "tanh" else (nn.Identity,)
    layers = layer_pass(model, Xb, Yb, kinds)
    stds = [r["out"].std().item() for r in layers]
    gstds = [r["grad"].std().item() for r in layers]
    losses = fit(model, data, steps, g, device=device)
    return {
        "activation": act,
        "gain": gain,
        "act_std": stds,
        "grad_std": gstds,
        "saturation": [tanh_saturation(r["out"]) for r in layers] if act == "tanh" else None,
        "loss_step0": losses[0].item(),
        "val": split_loss(model, data.val, device),
    }


def run(ctx: Context) -> Result:
    tasks = [
        (act, gain, ctx.options.data, ctx.steps, ctx.seed, ctx.options.device)
        for act in ACTIVATIONS
        for gain in ctx.sweep
    ]
    runs = ctx.map(_one, tasks, "(activation, gain) nets")
    rows = []
    for r in runs:
        sat = r["saturation"]
        rows.append(
            {
                "activation": r["activation"],
                "gain": round(r["gain"], 4),
                "act_std_layer1": r["act_std"][0],
                f"act_std_layer{DEPTH}": r["act_std"][-1],
                "act_std_ratio_last_first": r["act_std"][-1] / r["act_std"][0],
                "grad_std_ratio_first_last": r["grad_std"][0] / r["grad_std"][-1],
                "saturation_mean": sum(sat) / len(sat) if sat else math.nan,
                "loss_step0": r["loss_step0"],
                "val": r["val"],
            }
        )
    # The steadiest gain: the smallest total log-spread of activation and gradient std
    # across depth, among gains that keep saturation at most the doctor's threshold.
    steadiest: dict[str, dict] = {}
    for act in ACTIVATIONS:
        scored = [
            (math.log(spread(run_["act_std"])) + math.log(spread(run_["grad_std"])), i)
            for i, (r, run_) in enumerate(zip(rows, runs, strict=True))
            if r["activation"] == act and not r["saturation_mean"] > SATURATED_FRACTION
        ]
        if scored:
            steadiest[act] = rows[min(scored)[1]]
    for r, run_ in zip(rows, runs, strict=True):
        r["act_std_spread"] = spread(run_["act_std"])
        r["grad_std_spread"] = spread(run_["grad_std"])

    def says(act: str) -> str:
        r = steadiest.get(act)
        if r is None:
            return f"{act} none"
        return (
            f"{act} {fmt(r['gain'])} (activation std spread {fmt(r['act_std_spread'])}x, "
            f"gradient {fmt(r['grad_std_spread'])}x)"
        )

    parts = []
    for r in rows:
        ratio = r["act_std_ratio_last_first"]
        trend = (
            "grows"
            if ratio > STABLE_FACTOR
            else "shrinks"
            if ratio < 1 / STABLE_FACTOR
            else "holds"
        )
        sat = "" if math.isnan(r["saturation_mean"]) else f", {r['saturation_mean']:.0%} saturated"
        parts.append(
            f"{r['activation']} gain {fmt(r['gain'])}: activation std {trend} "
            f"(x{fmt(ratio)} over {DEPTH} layers){sat}, val {fmt(r['val'], 4)}"
        )
    answer = (
        f"The steadiest gain (least spread of activation and gradient std across {DEPTH} "
        f"layers, with at most {SATURATED_FRACTION:.0%} of tanh outputs saturated): "
        f"{says('linear')}; {says('tanh')}. "
        + "; ".join(parts)
        + "."
        + (
            " tanh squashes: each layer shrinks the std, so the weights must amplify by more "
            "than 1 to hold it, but not so much that outputs pile up at +-1."
            if steadiest.get("tanh", {}).get("gain", 0)
            > 1
            >= steadiest.get("linear", {}).get("gain", 0)
            else ""
        )
    )
    return Result(
        answer=answer,
        headline="steadiest gain: "
        + ", ".join(f"{a} {fmt(steadiest[a]['gain'])}" for a in ACTIVATIONS if a in steadiest),
        rows=rows,
        method=(
            f"{DEPTH}-layer MLPs (100 units, no normalisation, output weights x0.1) with "
            "W ~ N(0, gain^2/fan_in), for a linear-only stack and a tanh stack, gains "
            f"{', '.join(fmt(g) for g in ctx.sweep)}, all drawn from the same seed. The std of "
            "every activation layer's output and of its gradient dL/d(out) comes from one "
            "forward/backward of 1,000 training examples before any update; then "
            f"{ctx.steps:,} steps of SGD (lr 0.1, batch 32) give a val loss."
        ),
        figures=_figures(runs),
        extra={"steadiest": {a: r["gain"] for a, r in steadiest.items()}},
    )


def _figures(runs: list[dict]) -> dict:
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    for r in runs:
        col = ACTIVATIONS.index(r["activation"])
        x = range(1, len(r["act_std"]) + 1)
        label = f"gain {fmt(r['gain'])}"
        axes[0][col].plot(x, r["act_std"], "o-", label=label)
        axes[1][col].plot(x, r["grad_std"], "o-", label=label)
    for col, act in enumerate(ACTIVATIONS):
        axes[0][col].set_title(f"{act}: activation std by depth")
        axes[1][col].set_title(f"{act}: gradient std by depth")
        for row in (0, 1):
            axes[row][col].set_yscale("log")
            axes[row][col].legend(fontsize=8)
        axes[1][col].set_xlabel("layer")
    fig.tight_layout()
    return {
        "std_by_depth": (
            fig,
            "Std of each layer's output (top) and of its gradient (bottom) before training, "
            "log scale: flat lines are the goal.",
        )
    }
