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
    reference_line,
    smooth,
    spread,
    tanh_saturation,
)
from plumb.kinds import TANH_SATURATION
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
        "classes": data.vocab.size,
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
    finite = [r for r in rows if math.isfinite(r["val"])]
    best = min(finite, key=lambda r: r["val"]) if finite else None

    def why(r: dict) -> str:
        """A scheme's state at the first batch: saturation first (it rules out a flat
        std), then the std's trend through depth."""
        if r["saturation_mean"] > SATURATED_FRACTION:
            return (
                f"holds the std ({fmt(r['act_std_spread'])}x spread) only by saturating "
                f"{r['saturation_mean']:.0%} of tanh outputs"
            )
        ratio = r["act_std_layer10"] / r["act_std_layer1"]
        if ratio < 1 / STABLE_FACTOR:
            return f"lets the std shrink {fmt(1 / ratio)}x from layer 1 to {DEPTH}"
        if ratio > STABLE_FACTOR:
            return f"lets the std grow {fmt(ratio)}x from layer 1 to {DEPTH}"
        return (
            f"keeps the std within {fmt(r['act_std_spread'])}x over depth with "
            f"{r['saturation_mean']:.0%} saturated"
        )

    answer = (
        f"At the first batch, per-layer activation std stays within a factor {STABLE_FACTOR:g} "
        f"across the 10 layers for: {', '.join(stable) or 'none'}. "
        f"More than {SATURATED_FRACTION:.0%} of tanh outputs are saturated (|t| > 0.97) for: "
        f"{', '.join(saturated) or 'none'}; a saturated unit passes almost no gradient, so a "
        "flat std there is no health. "
        f"The std shrinks by more than {STABLE_FACTOR:g}x from "
        f"layer 1 to layer 10 for: {', '.join(shrinking) or 'none'}. "
        + "; ".join(
            f"{r['init']}: act std {fmt(r['act_std_layer1'])} -> {fmt(r['act_std_layer10'])}, "
            f"grad std spread {fmt(r['grad_std_spread'])}x, val {fmt(r['val'], 4)}"
            for r in rows
        )
        + "."
    )
    headline = (
        "Every scheme diverged."
        if best is None
        else f"{best['init']} wins: the best val loss after {ctx.steps:,} steps "
        f"({fmt(best['val'], 4)} nats), and it {why(best)}. "
        + "; ".join(f"{r['init']} {why(r)} (val {fmt(r['val'], 4)})" for r in rows if r is not best)
        + "."
    )
    return Result(
        answer=answer,
        headline=headline,
        columns={
            "init": "init",
            "val": "val loss (nats)",
            "saturation_mean": "tanh outputs saturated at start (%)",
            "act_std_spread": "activation std spread over depth (x)",
            "grad_std_spread": "gradient std spread over depth (x)",
            "saturation_after": "saturated after training (%)",
            "loss_step0": "step-0 loss (nats)",
        },
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
                ax,
                [(f"tanh{i + 1}", x[key]) for i, x in enumerate(r["first"])],
                r["label"],
                xlabel="tanh output" if key == "out" else "dL/d(tanh output)",
            )
        axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
        fig.suptitle(f"{title} of each tanh layer at the first batch")
        fig.tight_layout()
        out[f"{title}_first_batch"] = (
            fig,
            f"Distribution of each tanh layer's {title} before any update, per scheme.",
        )
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
    for r in runs:
        sats = [100 * tanh_saturation(x["out"]) for x in r["first"]]
        a1.plot(range(1, len(sats) + 1), sats, "o-", label=r["label"])
        x, y = smooth(r["losses"], max(steps // 50, 1))
        a2.plot(x, y, label=r["label"])
    a1.set_xlabel("layer")
    a1.set_ylabel(f"saturated tanh outputs (%, |t| > {TANH_SATURATION})")
    a1.set_ylim(0, 100)
    reference_line(a1, 100 * SATURATED_FRACTION, f"doctor's threshold {SATURATED_FRACTION:.0%}", ls="--", color="gray", lw=0.8)  # fmt: skip
    ln_c = math.log(runs[0]["classes"])
    reference_line(a2, ln_c, f"ln {runs[0]['classes']} = {ln_c:.3f} (uniform guess)")
    a2.set_xlabel("step")
    a2.set_ylabel("training loss (nats, window mean)")
    a2.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    out["saturation_and_loss"] = (
        fig,
        "Left: saturated share of each tanh layer's outputs at the first batch (dashed: the "
        f"doctor's {SATURATED_FRACTION:.0%} threshold). Right (legend for both): training loss over the first "
        f"{steps:,} steps, in nats; the dotted line is ln(C), the loss of a uniform guess.",
    )
    return out
