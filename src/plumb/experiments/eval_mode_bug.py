"""Validating a BatchNorm net without eval(): batch dependence, and the running statistics."""

from __future__ import annotations

import copy

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from plumb import nn as pnn
from plumb.data import Split
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
from plumb.train import calibrate_batchnorm, split_loss

NAME = "eval-mode-bug"
TITLE = "The eval() bug: BatchNorm in training mode at validation"
QUESTION = (
    "A BatchNorm net validated without model.eval() normalises each example with its "
    "batch's statistics: how much does an example's loss then depend on the batch size "
    "({sweep}) and on which other examples share its batch, and what did the running statistics "
    "that eval() uses absorb?"
)
STEPS = (5000, 100)
SWEEP = Sweep(
    "batch-sizes",
    (2, 4, 8, 32, 128, 512),
    (2, 8, 64),
    lo=1,
    hi=1 << 16,
    integer=True,
    help="batch sizes (integers >= 2)",
)


@torch.no_grad()
def probe_losses(model, X, Y, fillers: Split, b: int, train_mode: bool, g: torch.Generator):
    """Loss of each probe example (X[i], Y[i]) in a batch of ``b``: itself plus b - 1
    random filler examples. Train mode uses the batch statistics (on a copy, so the
    running buffers of ``model`` do not move)."""
    net = copy.deepcopy(model).train(train_mode)
    device = next(net.parameters()).device
    out = torch.empty(len(X))
    for i in range(len(X)):
        ix = torch.randint(0, len(fillers), (b - 1,), generator=g)
        xb = torch.cat([X[i : i + 1].cpu(), fillers.X[ix].cpu()]).to(device)
        out[i] = F.cross_entropy(net(xb)[:1], Y[i : i + 1].to(device).long())
    return out


@torch.no_grad()
def batched_loss(model, split: Split, b: int) -> float:
    """Mean loss over ``split`` in training mode, in consecutive batches of ``b`` (the
    forgotten-eval() validation loop); a last batch of one example is dropped."""
    net = copy.deepcopy(model).train()
    device = next(net.parameters()).device
    total, n = 0.0, 0
    for s in range(0, len(split) - 1, b):
        xb, yb = split.X[s : s + b].to(device), split.Y[s : s + b].to(device)
        if len(xb) < 2:
            break
        total += F.cross_entropy(net(xb), yb.long(), reduction="sum").item()
        n += len(xb)
    return total / n


def run(ctx: Context) -> Result:
    data = dataset(ctx.options.data)
    cfg = deep_config(data, norm="batch", out_norm=True, gain=1.0, bn_variance="lecture")
    device = ctx.device
    model, g = build(cfg, ctx.seed, device)
    losses = fit(model, data, ctx.steps, g, device=device)
    model.eval()
    n_probe, n_comp = (40, 3) if ctx.quick else (200, 10)
    X, Y = data.val.X[:n_probe], data.val.Y[:n_probe]
    gen = torch.Generator().manual_seed(ctx.seed + 1)
    # the split scored without eval() (its first 2,000 examples with --quick)
    scored = Split(data.val.X[:2000], data.val.Y[:2000], []) if ctx.quick else data.val
    val_running = split_loss(model, scored, device)
    rows = []
    for b in ctx.sweep:
        b = int(b)
        train = torch.stack(
            [probe_losses(model, X, Y, data.val, b, True, gen) for _ in range(n_comp)]
        )
        evals = torch.stack(
            [probe_losses(model, X, Y, data.val, b, False, gen) for _ in range(n_comp)]
        )
        rows.append(
            {
                "batch_size": b,
                "probe_loss_train_mode": train.mean().item(),
                "probe_spread_train_mode": train.std(0).mean().item(),
                "probe_loss_eval_mode": evals.mean().item(),
                "probe_spread_eval_mode": evals.std(0).max().item(),
                "val_loss_forgot_eval": batched_loss(model, scored, b),
            }
        )
    calibrated = copy.deepcopy(model)
    calibrate_batchnorm(calibrated, data.train, device)
    val_calibrated = split_loss(calibrated, scored, device)
    absorbed = []
    for (name, m), (_, c) in zip(model.named_modules(), calibrated.named_modules(), strict=True):
        if isinstance(m, pnn.BatchNorm1d):
            true_std = c.running_var.sqrt()
            absorbed.append(
                {
                    "layer": name,
                    "mean_error_in_stds": ((m.running_mean - c.running_mean).abs() / true_std)
                    .max()
                    .item(),
                    "var_ratio_min": (m.running_var / c.running_var).min().item(),
                    "var_ratio_max": (m.running_var / c.running_var).max().item(),
                }
            )
    small, big = rows[0], rows[-1]
    worst_mean = max(a["mean_error_in_stds"] for a in absorbed)
    answer = (
        f"After {ctx.steps:,} training steps, the same {n_probe} val examples were scored "
        f"{n_comp} times, each time in a different random batch. In training mode an "
        f"example's loss moves by {fmt(small['probe_spread_train_mode'])} nats (std across "
        f"batches) at batch size {small['batch_size']} and by "
        f"{fmt(big['probe_spread_train_mode'])} at {big['batch_size']}; in eval mode by "
        f"{fmt(max(r['probe_spread_eval_mode'] for r in rows))} (deterministic). Validating "
        f"{len(scored):,} val examples without eval() gives "
        + ", ".join(f"{fmt(r['val_loss_forgot_eval'], 4)} (batch {r['batch_size']})" for r in rows)
        + f", against {fmt(val_running, 4)} with eval(). The running statistics absorbed the "
        f"training set's: each running mean is within {fmt(worst_mean)} standard deviations "
        "of the mean over the whole training set and each running variance within a factor "
        f"{fmt(min(a['var_ratio_min'] for a in absorbed))}-{fmt(max(a['var_ratio_max'] for a in absorbed))} "
        f"of it; val loss {fmt(val_running, 4)} with them vs {fmt(val_calibrated, 4)} with "
        "statistics calibrated on the whole training set."
    )
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 3.8))
    bs = [r["batch_size"] for r in rows]
    a1.plot(bs, [r["val_loss_forgot_eval"] for r in rows], "o-", label="train mode (forgot eval())")
    a1.axhline(val_running, ls="--", c="k", lw=1.5, label="eval mode (any batch size)")
    a1.set_xscale("log", base=2)
    a1.set_xticks(bs, [str(b) for b in bs])
    a1.minorticks_off()
    a1.margins(y=0.15)  # the eval-mode line off the frame
    a1.set_xlabel("validation batch size")
    a1.set_ylabel("val loss (nats)")
    a1.set_title("validation loss with and without eval()")
    a1.legend(fontsize=8, loc="best")
    floor = 1e-12  # a log axis has no 0: an exact 0 is drawn at this floor, labelled
    a2.plot(bs, [r["probe_spread_train_mode"] for r in rows], "o-", label="train mode")
    a2.plot(bs, [max(r["probe_spread_eval_mode"], floor) for r in rows], "s-", label="eval mode")
    reference_line(a2, floor, "exactly 0 (drawn at 1e-12)", color="gray", dy=5)
    a2.set_xscale("log", base=2)
    a2.set_xticks(bs, [str(b) for b in bs])
    a2.minorticks_off()
    a2.set_yscale("log")
    a2.set_ylim(floor / 30, None)
    a2.set_xlabel("batch size")
    a2.set_ylabel("per-example loss std across batches (nats)")
    a2.set_title("how much one example's loss depends on its batch")
    a2.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    return Result(
        answer=answer,
        headline=f"eval() wins: in eval mode an example's loss is the same in any batch "
        f"(spread {fmt(max(r['probe_spread_eval_mode'] for r in rows))} nats); without it the "
        f"loss moves {fmt(small['probe_spread_train_mode'])} nats with its batch at size "
        f"{small['batch_size']} ({fmt(big['probe_spread_train_mode'])} at {big['batch_size']}), "
        f"and val reads {fmt(small['val_loss_forgot_eval'], 4)} at batch {small['batch_size']} "
        f"against {fmt(val_running, 4)}.",
        columns={
            "batch_size": "batch size",
            "probe_spread_train_mode": "loss spread, train mode (nats)",
            "probe_spread_eval_mode": "loss spread, eval mode (nats)",
            "val_loss_forgot_eval": "val loss without eval() (nats)",
            "probe_loss_train_mode": "probe loss, train mode (nats)",
            "probe_loss_eval_mode": "probe loss, eval mode (nats)",
        },
        table_columns={
            "running_stats": {
                "layer": "layer",
                "mean_error_in_stds": "running mean error (stds)",
                "var_ratio_min": "running / true variance, min",
                "var_ratio_max": "running / true variance, max",
            }
        },
        rows=rows,
        method=(
            "The lecture's deep BatchNorm net is trained for "
            f"{ctx.steps:,} steps (SGD, lr 0.1, batch 32). Then {n_probe} val examples are each "
            f"scored in {n_comp} random batches per batch size (the example plus b - 1 random "
            "val examples), in training mode (batch statistics; on a copy, so the running "
            "buffers stay put) and in eval mode (running statistics). The whole val split is "
            "also scored in training mode in consecutive batches of b, the loop that forgot "
            "eval(). Finally each running buffer is compared with the statistics of the whole "
            "training set (plumb.train.calibrate_batchnorm)."
        ),
        figures={
            "eval_mode": (
                fig,
                "Left: val loss with and without eval() by batch size. Right: how much one "
                "example's loss depends on its batch (std across random batches, log scale; "
                "eval mode's exact 0 sits on the dotted line).",
            )
        },
        tables={"running_stats": absorbed},
        extra={
            "val_eval": val_running,
            "val_calibrated": val_calibrated,
            "train_loss_end": losses[-100:].mean().item(),
        },
    )
