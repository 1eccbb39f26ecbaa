"""The update-to-data ratio over training, for learning rates from 1e-3 to 1."""

from __future__ import annotations

import itertools
import math

import matplotlib.pyplot as plt
import numpy as np

from plumb.doctor.rules import UPDATE_TARGET
from plumb.experiments.base import (
    Context,
    Result,
    Sweep,
    build,
    dataset,
    deep_config,
    fit,
    fmt,
    reference_line,
)
from plumb.probes import Probes
from plumb.record import UPDATE_DATA
from plumb.train import split_loss

NAME = "update-ratio"
TITLE = "The update:data ratio and the learning rate"
QUESTION = (
    "How large is each SGD update relative to the weights it changes, "
    f"update:data = {UPDATE_DATA}, across learning rates {{sweep}}: which lr lands "
    "near the lecture's 1e-3, and is that the lr with the best loss?"
)
STEPS = (3000, 60)
SWEEP = Sweep(
    "lrs",
    (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0),
    (0.01, 0.1, 1.0),
    hi=100.0,
    help="learning rates (1e-3,3e-3,...,1)",
)


def _one(task: tuple[float, str | None, int, int, str]) -> dict:
    lr, path, steps, seed, device = task
    data = dataset(path)
    cfg = deep_config(data, norm="batch", out_norm=True, gain=1.0, bn_variance="lecture")
    model, g = build(cfg, seed, device)
    every = max(steps // 100, 1)
    with Probes(model, every=every, hist_every=every * 10**6) as mon:
        losses = fit(
            model, data, steps, g, lr=lr, device=device, on_step=lambda i, loss: mon.step(loss)
        )
    weights = [n for n, p in model.named_parameters() if p.ndim == 2]
    steps_seen, ratio = [], []
    for row in mon.history.rows:
        vals = [row["param"][w].get("update_data", math.nan) for w in weights]
        if row["step"] > 0 and all(math.isfinite(v) for v in vals):
            steps_seen.append(row["step"])
            ratio.append(vals)
    ratio_arr = np.array(ratio) if ratio else np.full((0, len(weights)), np.nan)
    return {
        "lr": lr,
        "steps": steps_seen,
        "ratio": ratio_arr,
        "weights": weights,
        "loss_end": losses[-max(steps // 10, 1) :].mean().item(),
        "val": split_loss(model, data.val, device),
    }


def run(ctx: Context) -> Result:
    tasks = [(lr, ctx.options.data, ctx.steps, ctx.seed, ctx.options.device) for lr in ctx.sweep]
    runs = ctx.map(_one, tasks, "learning rates")
    rows = []
    for r in runs:
        late = r["ratio"][len(r["ratio"]) // 2 :]
        # no finite ratio: the run diverged (NaN, "diverged"), or it is too short (None)
        none = math.nan if not math.isfinite(r["val"]) else None
        median = float(np.median(late)) if late.size else none
        rows.append(
            {
                "lr": r["lr"],
                "update_data_log10_median": median,
                "update_data_log10_min_weight": float(late.mean(0).min()) if late.size else none,
                "update_data_log10_max_weight": float(late.mean(0).max()) if late.size else none,
                "train_loss_end": r["loss_end"],
                "val": r["val"],
            }
        )
    finite = [
        r
        for r in rows
        if r["update_data_log10_median"] is not None
        and math.isfinite(r["update_data_log10_median"])
    ]
    near = min(finite, key=lambda r: abs(r["update_data_log10_median"] - UPDATE_TARGET))
    trained = [r for r in rows if math.isfinite(r["val"])]
    best = min(trained, key=lambda r: r["val"]) if trained else None
    meds = [r["update_data_log10_median"] for r in rows]
    slope = (
        float(
            np.polyfit(
                np.log10([r["lr"] for r in finite]),
                [r["update_data_log10_median"] for r in finite],
                1,
            )[0]
        )
        if len(finite) > 1
        else None
    )
    monotone = None not in meds and all(b > a for a, b in itertools.pairwise(meds))
    answer = (
        f"Median log10 update:data over the second half of {ctx.steps:,} steps: "
        + ", ".join(f"lr {fmt(r['lr'])} -> {fmt(r['update_data_log10_median'])}" for r in rows)
        + f". It {'rises' if monotone else 'does not rise monotonically'} with the lr, "
        f"{fmt(slope)} decades per decade of lr (1 for plain SGD with gradients that do not "
        f"depend on the lr; BatchNorm and the loss landscape bend it). Nearest to the "
        f"lecture's {UPDATE_TARGET:g} is lr {fmt(near['lr'])} "
        f"({fmt(near['update_data_log10_median'])}), val {fmt(near['val'], 4)}. "
        + (
            f"The best val loss is lr {fmt(best['lr'])}'s ({fmt(best['val'], 4)}, update:data "
            f"{fmt(best['update_data_log10_median'])}); "
            + (
                "the same lr."
                if best is near
                else f"{fmt(abs(math.log10(best['lr'] / near['lr'])))} decades of lr away, "
                f"costing {fmt(near['val'] - best['val'])} nats at this budget."
            )
            if best
            else "No lr kept a finite loss."
        )
    )
    return Result(
        answer=answer,
        headline=(
            f"lr {fmt(best['lr'])} wins on val loss ({fmt(best['val'], 4)} nats) with updates "
            f"at 10^{fmt(best['update_data_log10_median'])} of the weights; "
            if best
            else "Every lr diverged; "
        )
        + f"lr {fmt(near['lr'])} sits nearest the lecture's 10^-3 "
        f"({fmt(near['update_data_log10_median'])})" + (", the same lr." if best is near else "."),
        columns={
            "lr": "lr",
            "val": "val loss (nats)",
            "update_data_log10_median": "log10 update:data (median)",
            "update_data_log10_min_weight": "lowest weight's log10 update:data",
            "update_data_log10_max_weight": "highest weight's log10 update:data",
            "train_loss_end": "train loss, last 10% (nats)",
        },
        rows=rows,
        method=(
            "The lecture's deep net (5 x [Linear, BatchNorm1d, tanh] + Linear + BatchNorm1d, "
            f"W ~ N(0, 1/fan_in)) trained from the same seed with SGD for {ctx.steps:,} steps "
            f"at each lr in {', '.join(fmt(x) for x in ctx.sweep)} (batch 32, no decay). A "
            f"plumb.Monitor records, every {max(ctx.steps // 100, 1)} steps, "
            "log10(std(W_t - W_{t-1}) / std(W_t)) of every 2-D weight (the embedding, the "
            "hidden and the output weights); the table gives the median over weights and over "
            "the second half of training, and val loss in eval mode."
        ),
        figures=_figures(runs, rows, finite),
    )


def _figures(runs: list[dict], rows: list[dict], finite: list[dict]) -> dict:
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4))
    cmap = plt.get_cmap("viridis")
    for k, r in enumerate(runs):
        if len(r["ratio"]):
            a1.plot(
                r["steps"],
                np.median(r["ratio"], 1),
                c=cmap(k / max(len(runs) - 1, 1)),
                label=f"lr {fmt(r['lr'])}",
            )
    reference_line(a1, UPDATE_TARGET, f"lecture's {UPDATE_TARGET:g}", ls="--", lw=0.8)
    a1.set_xlabel("step")
    a1.set_ylabel("log10 update:data (median over weights)")
    a1.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    ok = [r for r in rows if r in finite and math.isfinite(r["val"])]
    a2.plot([r["update_data_log10_median"] for r in ok], [r["val"] for r in ok], "o-")
    for r in ok:
        a2.annotate(f"lr {fmt(r['lr'])}", (r["update_data_log10_median"], r["val"]), xytext=(5, 5), textcoords="offset points", fontsize=8)  # fmt: skip
    a2.margins(x=0.15, y=0.15)  # room for the labels: none clipped at the frame
    a2.axvline(UPDATE_TARGET, ls="--", c="k", lw=0.8)
    a2.set_xlabel("log10 update:data (median, second half)")
    a2.set_ylabel("val loss (nats)")
    fig.tight_layout()
    return {
        "update_ratio": (
            fig,
            "Left: update:data over training per lr (dashed: the lecture's 1e-3). Right: "
            "final val loss against the ratio each lr settled at.",
        )
    }
