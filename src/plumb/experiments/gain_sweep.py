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
    Sweep,
    build,
    dataset,
    deep_config,
    fit,
    fmt,
    layer_pass,
    reference_line,
    spread,
    tanh_saturation,
)
from plumb.kinds import TANH_SATURATION
from plumb.train import split_loss

NAME = "gain-sweep"
TITLE = "The gain: why 5/3 for tanh"
QUESTION = (
    "In deep nets without normalisation, W ~ N(0, gain^2/fan_in): which gain keeps the "
    "activations and gradients at a steady scale through depth, among gains {sweep}, for a "
    "linear-only stack and for a tanh stack?"
)
STEPS = (1000, 40)
SWEEP = Sweep("gains", (0.5, 1.0, 5 / 3, 3.0), hi=100.0, help="tanh gains (0.5,1,5/3,3)")
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
        "classes": data.vocab.size,
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
                "saturation_mean": sum(sat) / len(sat) if sat else None,
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
            if r["activation"] == act and not (r["saturation_mean"] or 0) > SATURATED_FRACTION
        ]
        if scored:
            steadiest[act] = rows[min(scored)[1]]
    for r, run_ in zip(rows, runs, strict=True):
        r["act_std_spread"] = spread(run_["act_std"])
        r["grad_std_spread"] = spread(run_["grad_std"])

    def says(act: str) -> str:
        """The winner of ``act``, its reason, and any steadier gain saturation rules out."""
        r = steadiest.get(act)
        if r is None:
            return (
                f"{act}: none (every gain saturates over {SATURATED_FRACTION:.0%} of tanh outputs)"
            )
        sat = r["saturation_mean"]
        out = (
            f"{act} gain {fmt(r['gain'])} (std spread over depth {fmt(r['act_std_spread'])}x "
            f"activations, {fmt(r['grad_std_spread'])}x gradients"
            + (f", {sat:.0%} saturated" if sat is not None else "")
            + ")"
        )
        score = math.log(r["act_std_spread"]) + math.log(r["grad_std_spread"])
        ruled = [
            x
            for x in rows
            if x["activation"] == act
            and (x["saturation_mean"] or 0) > SATURATED_FRACTION
            and math.log(x["act_std_spread"]) + math.log(x["grad_std_spread"]) < score
        ]
        for x in ruled:
            out += (
                f"; gain {fmt(x['gain'])} holds the std flatter but saturates "
                f"{x['saturation_mean']:.0%} of tanh outputs (over the doctor's "
                f"{SATURATED_FRACTION:.0%}), which stalls learning"
            )
        return out

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
        sat = "" if r["saturation_mean"] is None else f", {r['saturation_mean']:.0%} saturated"
        parts.append(
            f"{r['activation']} gain {fmt(r['gain'])}: activation std {trend} "
            f"(x{fmt(ratio)} over {DEPTH} layers){sat}, val {fmt(r['val'], 4)}"
        )
    answer = (
        f"The steadiest gain is the one with the least spread of activation and gradient "
        f"std across {DEPTH} layers among those that keep at most {SATURATED_FRACTION:.0%} "
        "of tanh outputs saturated (the doctor's threshold; a saturated unit passes almost "
        "no gradient, so a flat std bought with saturation is no win). "
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
        headline="Steadiest gain: " + "; ".join(says(a) for a in ACTIVATIONS) + ".",
        columns={
            "activation": "stack",
            "gain": "gain",
            "act_std_spread": "activation std spread over depth (x)",
            "grad_std_spread": "gradient std spread over depth (x)",
            "saturation_mean": "tanh outputs saturated (%)",
            "act_std_ratio_last_first": f"activation std, layer {DEPTH} / layer 1",
            "loss_step0": "step-0 loss (nats)",
            "val": "val loss (nats)",
        },
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
    fig, axes = plt.subplots(3, 2, figsize=(11, 10))
    for r in runs:
        col = ACTIVATIONS.index(r["activation"])
        x = range(1, len(r["act_std"]) + 1)
        label = f"gain {fmt(r['gain'])}"
        axes[0][col].plot(x, r["act_std"], "o-", label=label)
        axes[1][col].plot(x, r["grad_std"], "o-", label=label)
        if r["saturation"] is not None:
            axes[2][1].plot(x, [100 * s for s in r["saturation"]], "o-", label=label)
    for col, act in enumerate(ACTIVATIONS):
        axes[0][col].set_title(f"{act}: activation std by depth")
        axes[1][col].set_title(f"{act}: gradient std by depth")
        for row, what in ((0, "std of layer output"), (1, "std of dL/d(output)")):
            axes[row][col].set_yscale("log")
            axes[row][col].set_ylabel(f"{what} (log scale)")
    axes[0][1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    reference_line(axes[2][1], 100 * SATURATED_FRACTION, f"doctor's threshold {SATURATED_FRACTION:.0%}", ls="--", dy=4)  # fmt: skip
    axes[2][1].set_ylim(0, 100)
    axes[2][1].set_title(f"tanh: outputs saturated (|t| > {TANH_SATURATION}) by depth")
    axes[2][1].set_ylabel("saturated (%)")
    for act in ACTIVATIONS:  # the loss after training, diverged runs left out
        pts = [(r["gain"], r["val"]) for r in runs if r["activation"] == act]
        pts = [(g, v) for g, v in pts if math.isfinite(v)]
        axes[2][0].plot(*zip(*pts, strict=True), "o-", label=act) if pts else None
    ln_c = math.log(runs[0]["classes"])
    reference_line(axes[2][0], ln_c, f"ln {runs[0]['classes']} = {ln_c:.3f} (uniform)", dy=-10)
    axes[2][0].set_xscale("log")
    axes[2][0].set_xticks([r["gain"] for r in runs], [fmt(r["gain"]) for r in runs])
    axes[2][0].minorticks_off()
    axes[2][0].set_title("val loss after training (diverged runs left out)")
    axes[2][0].set_xlabel("gain")
    axes[2][0].set_ylabel("val loss (nats)")
    axes[2][0].legend(fontsize=8)
    for row in axes[:2]:
        for ax in row:
            ax.set_xlabel("layer")
    axes[2][1].set_xlabel("layer")
    fig.tight_layout()
    return {
        "std_by_depth": (
            fig,
            "Std of each layer's output (top) and of its gradient (middle) before training, "
            "log scale: flat lines are the goal. Bottom: the share of saturated tanh outputs, "
            "which rules out a gain that flattens the std by pinning units at +-1.",
        )
    }
