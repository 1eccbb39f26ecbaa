"""No normalisation, BatchNorm, LayerNorm and GroupNorm on the deep MLP."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
from torch import nn

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
    norm_label,
    reference_line,
    replace_modules,
)
from plumb.experiments.eval_mode_bug import batched_loss
from plumb.train import split_loss

NAME = "norm-alternatives"
TITLE = "BatchNorm, LayerNorm, GroupNorm or nothing"
QUESTION = (
    "On the deep tanh MLP, how do no normalisation, BatchNorm, LayerNorm and GroupNorm "
    "compare in val loss, in sensitivity to the training batch size ({sweep}), and in "
    "the gap between training-mode and eval-mode outputs?"
)
STEPS = (3000, 80)
SWEEP = Sweep(
    "batch-sizes",
    (2, 8, 32, 128, 256),
    (2, 32),
    lo=1,
    hi=1 << 16,
    integer=True,
    help="batch sizes (integers >= 2)",
)
NORMS = ("none", "batch", "layer", "group")
#: Mean losses summed in a different order differ by float32 round-off, not more.
ROUNDOFF = 1e-5
GROUPS = 10  # GroupNorm(10 groups of 10 features): between LayerNorm (1) and per-unit (100)


def with_groupnorm(model: nn.Module, groups: int = GROUPS) -> nn.Module:
    """Replace each plumb LayerNorm by torch.nn.GroupNorm(groups, dim) (in place)."""
    return replace_modules(
        model, pnn.LayerNorm, lambda ln: nn.GroupNorm(groups, ln.weight.shape[0], eps=ln.eps)
    )


def _one(task: tuple[str, int, str | None, int, int, str, bool]) -> dict:
    norm, b, path, steps, seed, device, quick = task
    data = dataset(path)
    cfg = deep_config(data, norm="layer" if norm == "group" else norm)
    model, g = build(cfg, seed, device)
    if norm == "group":
        with_groupnorm(model)
    losses = fit(model, data, steps, g, batch_size=b, device=device)
    n = 2000 if quick else 10_000
    val = Split(data.val.X[:n].to(device), data.val.Y[:n].to(device), [])
    eval_val = split_loss(model, val, device)
    train_val = batched_loss(model, val, b)
    return {
        "norm": norm,
        "batch_size": b,
        "train_loss_end": losses[-max(steps // 10, 1) :].mean().item(),
        "val": eval_val,
        "val_train_mode": train_val,
        "train_eval_gap": abs(train_val - eval_val),
    }


def run(ctx: Context) -> Result:
    sizes = [int(b) for b in ctx.sweep]
    tasks = [
        (n, b, ctx.options.data, ctx.steps, ctx.seed, ctx.options.device, ctx.quick)
        for n in NORMS
        for b in sizes
    ]
    rows = ctx.map(_one, tasks, "(norm, batch size) runs")
    summary = []
    for norm in NORMS:
        mine = [r for r in rows if r["norm"] == norm]
        vals = [r["val"] for r in mine]
        finite = [v for v in vals if math.isfinite(v)]
        summary.append(
            {
                "norm": norm,
                "best_val": min(finite) if finite else math.nan,
                "best_batch_size": mine[vals.index(min(finite))]["batch_size"] if finite else None,
                "val_range_over_batch_sizes": (max(finite) - min(finite)) if finite else math.nan,
                "max_train_eval_gap": max(
                    (r["train_eval_gap"] for r in mine if math.isfinite(r["train_eval_gap"])),
                    default=math.nan,
                ),
                f"val_at_{sizes[0]}": vals[0],
                "diverged_at": " ".join(
                    str(r["batch_size"]) for r in mine if not math.isfinite(r["val"])
                )
                or "none",
            }
        )
    exact = [s["norm"] for s in summary if s["max_train_eval_gap"] < ROUNDOFF]
    differ = [s for s in summary if s["max_train_eval_gap"] >= ROUNDOFF]
    diverged = [s for s in summary if s["diverged_at"] != "none"]
    trained = [s for s in summary if math.isfinite(s["best_val"])]
    best = min(trained, key=lambda s: s["best_val"]) if trained else {}
    answer = (
        f"Best val loss after {ctx.steps:,} steps: "
        + ", ".join(
            f"{s['norm']} {fmt(s['best_val'], 4)} (batch {s['best_batch_size']})" for s in summary
        )
        + f"; best overall {best.get('norm', 'none (all diverged)')}. Across training batch sizes {sizes[0]}-{sizes[-1]} "
        "the finite val losses vary by "
        + ", ".join(f"{fmt(s['val_range_over_batch_sizes'])} ({s['norm']})" for s in summary)
        + f"; at batch size {sizes[0]} it is "
        + ", ".join(f"{fmt(s[f'val_at_{sizes[0]}'], 4)} ({s['norm']})" for s in summary)
        + (
            ". Diverged (non-finite loss): "
            + ", ".join(f"{s['norm']} at batch size {s['diverged_at']}" for s in diverged)
            if diverged
            else ""
        )
        + f". Training-mode and eval-mode val loss agree to float32 round-off (< {ROUNDOFF:g}) "
        f"for: {', '.join(exact) or 'none'}; they differ for: "
        + (
            ", ".join(f"{s['norm']} (up to {fmt(s['max_train_eval_gap'])} nats)" for s in differ)
            or "none"
        )
        + ". A layer that normalises across the batch computes something else in eval mode; "
        "one that normalises within each example does not."
    )
    floor = 1e-9  # a log axis has no 0: an exact 0 gap is drawn at this floor, labelled
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4))
    for norm in NORMS:
        mine = [r for r in rows if r["norm"] == norm]
        a1.plot(sizes, [r["val"] for r in mine], "o-", label=norm)
        a2.plot(sizes, [max(r["train_eval_gap"], floor) for r in mine], "o-", label=norm)
    for ax in (a1, a2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(b) for b in sizes])
        ax.minorticks_off()
        ax.set_xlabel("training batch size")
    a2.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    a1.set_ylabel("val loss, eval mode (nats)")
    a1.set_title("val loss (diverged runs are missing)")
    a2.set_yscale("log")
    reference_line(a2, floor, "exactly 0 (drawn at 1e-9)", color="gray", dy=4)
    a2.set_ylim(floor / 10, None)
    a2.set_ylabel("|train-mode - eval-mode| val loss (nats)")
    a2.set_title("train/eval-mode gap")
    fig.tight_layout()

    def rest(s: dict) -> str:
        return f"{norm_label(s['norm'])} {fmt(s['best_val'], 4)}"

    return Result(
        answer=answer,
        headline=(
            f"{norm_label(best['norm'], start=True)} wins on val loss ({fmt(best.get('best_val'), 4)} nats at batch "
            f"{best.get('best_batch_size')}; then "
            + ", ".join(rest(s) for s in sorted(trained, key=lambda s: s["best_val"])[1:])
            + "). "
            if trained
            else "Every configuration diverged. "
        )
        + (
            "Mode matters for "
            + ", ".join(
                f"{norm_label(s['norm'])} (train/eval val gap up to {fmt(s['max_train_eval_gap'])} nats)"
                for s in differ
            )
            if differ
            else "No layer's output depends on the mode"
        )
        + (f"; {', '.join(norm_label(n) for n in exact)} agree to round-off." if exact else ".")
        + "".join(
            f" {norm_label(s['norm'], start=True)} diverged at batch {s['diverged_at']}."
            for s in diverged
        ),
        columns={
            "norm": "norm",
            "batch_size": "batch size",
            "val": "val loss, eval mode (nats)",
            "train_eval_gap": "train/eval-mode gap (nats)",
            "val_train_mode": "val loss, train mode (nats)",
            "train_loss_end": "train loss, last 10% (nats)",
        },
        table_columns={
            "summary": {
                "norm": "norm",
                "best_val": "best val loss (nats)",
                "best_batch_size": "at batch size",
                "val_range_over_batch_sizes": "val range over batch sizes (nats)",
                "max_train_eval_gap": "largest train/eval gap (nats)",
                f"val_at_{sizes[0]}": f"val loss at batch {sizes[0]} (nats)",
                "diverged_at": "diverged at batch sizes",
            }
        },
        rows=rows,
        method=(
            "A 5-layer tanh MLP (100 units, Kaiming gain 5/3, output weights x0.1) with no "
            "normalisation, BatchNorm1d, LayerNorm, or torch.nn.GroupNorm (10 groups of 10) "
            f"after each hidden Linear, trained {ctx.steps:,} steps (SGD, lr 0.1) at each "
            f"batch size in {', '.join(map(str, sizes))}, same seed. Val loss on "
            f"{2000 if ctx.quick else 10000:,} val examples in eval mode, and in training mode "
            "in batches of the training batch size."
        ),
        figures={
            "norms": (
                fig,
                "Left: val loss against training batch size. Right: the gap between "
                "training-mode and eval-mode val loss, log scale (an exact 0 is drawn on the "
                "dotted 1e-9 line).",
            )
        },
        tables={"summary": summary},
    )
