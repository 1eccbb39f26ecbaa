"""Fold each BatchNorm into the preceding Linear: same outputs, faster inference."""

from __future__ import annotations

import statistics
import time

import matplotlib.pyplot as plt
import torch

from plumb.experiments.base import Context, Result, build, dataset, deep_config, fit, fmt
from plumb.fold import NORMS, fold_batchnorm
from plumb.train import split_loss

NAME = "bn-folding"
TITLE = "Folding BatchNorm into the Linear before it"
QUESTION = (
    "At inference a BatchNorm is a fixed affine map per unit, so it can be folded into the "
    "Linear before it: are the folded net's outputs the same, and how much faster is it?"
)
STEPS = (5000, 50)
BATCHES = (1, 32, 1024)


@torch.inference_mode()
def latency(model: torch.nn.Module, X: torch.Tensor, repeats: int) -> float:
    """Median seconds of one forward of X, over ``repeats`` timed runs after 3 warm-ups."""
    sync = torch.cuda.synchronize if X.is_cuda else (lambda: None)
    for _ in range(3):
        model(X)
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        model(X)
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(ctx: Context) -> Result:
    data = dataset(ctx.options.data)
    device = ctx.device
    cfg = deep_config(data, norm="batch", out_norm=True, gain=1.0, bn_variance="lecture")
    model, g = build(cfg, ctx.seed, device)
    fit(model, data, ctx.steps, g, device=device)
    model.eval()
    folded = fold_batchnorm(model)
    n_before = sum(isinstance(m, NORMS) for m in model.modules())
    n_after = sum(isinstance(m, NORMS) for m in folded.modules())
    Xv = data.val.X.to(device)
    with torch.inference_mode():
        logits = model(Xv)
        diff = (logits - folded(Xv)).abs().max().item()
        # float32 carries ~7 digits: a refactored sum may differ by a few ulps of the logits
        roundoff = 1e-5 * max(1.0, logits.abs().max().item())
    loss_bn, loss_folded = split_loss(model, data.val, device), split_loss(folded, data.val, device)
    repeats = 20 if ctx.quick else 200
    rows = []
    for b in BATCHES:
        X = Xv[:b]
        t_bn, t_f = latency(model, X, repeats), latency(folded, X, repeats)
        rows.append(
            {
                "batch_size": b,
                "us_with_batchnorm": t_bn * 1e6,
                "us_folded": t_f * 1e6,
                "speedup": t_bn / t_f,
            }
        )
    n_params = (
        sum(p.numel() for p in model.parameters()),
        sum(p.numel() for p in folded.parameters()),
    )
    answer = (
        f"Folding replaced {n_before - n_after} of {n_before} BatchNorm layers. Over the "
        f"{len(Xv):,} val examples the largest absolute logit difference is {fmt(diff)} "
        + (
            "(float32 round-off)"
            if diff <= roundoff
            else "(more than round-off: not the same function)"
        )
        + f" and the val loss is {fmt(loss_bn, 6)} before and "
        f"{fmt(loss_folded, 6)} after. Inference time per forward (median of {repeats}): "
        + ", ".join(
            f"batch {r['batch_size']}: {fmt(r['us_with_batchnorm'])} -> {fmt(r['us_folded'])} us "
            f"({fmt(r['speedup'])}x)"
            for r in rows
        )
        + f". Parameters {n_params[0]:,} -> {n_params[1]:,} (gamma, beta and the running "
        "buffers become the Linear's weight scale and bias)."
    )
    fig, ax = plt.subplots(figsize=(7, 3.6))
    x = range(len(rows))
    ax.bar(
        [i - 0.2 for i in x], [r["us_with_batchnorm"] for r in rows], 0.4, label="with BatchNorm"
    )
    ax.bar([i + 0.2 for i in x], [r["us_folded"] for r in rows], 0.4, label="folded")
    ax.set_xticks(list(x), [f"batch {r['batch_size']}" for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel("us per forward (median, log scale)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return Result(
        answer=answer,
        headline=f"Folding keeps the outputs (max |diff| {fmt(diff)}, float32 round-off); "
        + "; ".join(f"at batch {r['batch_size']} it is {fmt(r['speedup'])}x as fast" for r in rows)
        + ".",
        columns={
            "batch_size": "batch size",
            "speedup": "speed-up (x)",
            "us_with_batchnorm": "with BatchNorm (us per forward)",
            "us_folded": "folded (us per forward)",
        },
        rows=rows,
        method=(
            f"The lecture's deep BatchNorm net is trained {ctx.steps:,} steps (SGD, lr 0.1, "
            "batch 32) and put in eval mode; plumb.fold.fold_batchnorm replaces each Linear -> "
            "BatchNorm pair with one Linear, W' = W * s and b' = s * (b - running_mean) + beta, "
            "s = gamma / sqrt(running_var + eps). Outputs are compared on the whole val split; "
            f"forward time is the median of {repeats} runs per batch size on "
            f"{torch.get_num_threads()} thread(s), device {device}."
        ),
        figures={"latency": (fig, "Forward time per batch size, with BatchNorm and folded.")},
        extra={
            "batchnorms": [n_before, n_after],
            "max_abs_diff": diff,
            "val_loss": [loss_bn, loss_folded],
            "parameters": n_params,
        },
    )
