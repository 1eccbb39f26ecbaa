"""The expected initial loss ln(C), and what an uncalibrated output layer costs."""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from plumb.experiments.base import (
    Context,
    Result,
    Sweep,
    build,
    dataset,
    fit,
    fmt,
    reference_line,
    smooth,
)
from plumb.init import expected_initial_loss
from plumb.models import ModelConfig, preset_config

NAME = "calibration"
TITLE = "Calibrating the output layer: loss at initialisation"
QUESTION = (
    "A net that knows nothing should predict uniformly and score ln(C). For 27 and 1,000 "
    "classes, how far above ln(C) does the initial loss sit for output-layer scales "
    "{sweep}, and what does an uncalibrated start cost in training?"
)
STEPS = (2000, 60)
SWEEP = Sweep(
    "out-scales",
    (0.0, 0.001, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0),
    (0.0, 0.01, 1.0),
    hi=1e6,
    zero=True,
    help="output-layer scales (>= 0)",
)
CLASSES = (27, 1000)
N_EXAMPLES = 10_000


def _model(classes: int, scale: float, vocab: int, block: int) -> ModelConfig:
    # The lecture's single-layer MLP (Kaiming tanh layer); the output weights are
    # N(0, 1) * scale, the output bias 0: scale is the only difference.
    return preset_config(
        "lecture-mlp", vocab_size=max(vocab, classes), block_size=block, out_scale=scale
    )


def _one(task: tuple[int, float, str | None, int, int, str]) -> dict:
    classes, scale, path, steps, seed, device = task
    data = dataset(path)
    model, g = build(_model(classes, scale, data.vocab.size, data.block_size), seed, device)
    if classes == data.vocab.size:
        X, Y = data.train.X[:N_EXAMPLES], data.train.Y[:N_EXAMPLES]
    else:  # random contexts and uniformly random targets over C classes
        dg = torch.Generator().manual_seed(seed + classes)
        X = torch.randint(0, classes, (N_EXAMPLES, data.block_size), generator=dg)
        Y = torch.randint(0, classes, (N_EXAMPLES,), generator=dg)
    with torch.no_grad():
        logits = model(X.to(device)).float()
        loss = F.cross_entropy(logits, Y.to(device).long()).item()
    curve = fit(model, data, steps, g, device=device) if classes == data.vocab.size else None
    return {
        "classes": classes,
        "out_scale": scale,
        "logit_std": logits.std(1).mean().item(),
        "initial_loss": loss,
        "curve": curve,
    }


def run(ctx: Context) -> Result:
    data = dataset(ctx.options.data)
    classes = (data.vocab.size, *[c for c in CLASSES if c != data.vocab.size])
    tasks = [
        (c, s, ctx.options.data, ctx.steps, ctx.seed, ctx.options.device)
        for c in classes
        for s in ctx.sweep
    ]
    runs = ctx.map(_one, tasks, "(classes, scale) nets")
    rows = []
    for r in runs:
        ln_c = expected_initial_loss(r["classes"])
        row = {
            "classes": r["classes"],
            "out_scale": r["out_scale"],
            "expected_ln_C": ln_c,
            "initial_loss": r["initial_loss"],
            "excess": r["initial_loss"] - ln_c,
            "logit_std": r["logit_std"],
        }
        if r["curve"] is not None:
            n = max(len(r["curve"]) // 10, 1)
            row["loss_first_10pct"] = r["curve"][:n].mean().item()
            row["loss_last_10pct"] = r["curve"][-n:].mean().item()
        rows.append(row)
    # The calibrated scale: the largest whose initial loss is within 1% of ln C
    # (a larger one is confidently wrong; a smaller one only shrinks the logits further).
    parts, calibrated = [], {}
    for c in classes:
        mine = [r for r in rows if r["classes"] == c]
        ok = [r for r in mine if r["excess"] <= 0.01 * r["expected_ln_C"]]
        calibrated[c] = max((r["out_scale"] for r in ok), default=None)
        worst = max(mine, key=lambda r: r["excess"])
        parts.append(
            f"{c} classes (ln C = {fmt(mine[0]['expected_ln_C'], 4)}): initial loss "
            + ", ".join(f"{fmt(r['initial_loss'], 4)} at scale {fmt(r['out_scale'])}" for r in mine)
            + f"; worst excess {fmt(worst['excess'])} nats at scale {fmt(worst['out_scale'])}"
        )
    trained = [r for r in rows if "loss_last_10pct" in r]
    best_end = min(trained, key=lambda r: r["loss_last_10pct"])
    worst_end = max(trained, key=lambda r: r["loss_last_10pct"])
    answer = (
        "; ".join(parts)
        + ". Largest scale within 1% of ln C: "
        + ", ".join(
            f"{c} classes {fmt(calibrated[c]) if calibrated[c] is not None else 'none'}"
            for c in classes
        )
        + ". "
        f"Training the {classes[0]}-class net {ctx.steps:,} steps, the first 10% of steps "
        "average "
        + ", ".join(
            f"{fmt(r['loss_first_10pct'], 4)} (scale {fmt(r['out_scale'])})" for r in trained
        )
        + f"; in the last 10% scale {fmt(worst_end['out_scale'])} is still "
        f"{fmt(worst_end['loss_last_10pct'] - best_end['loss_last_10pct'])} nats behind "
        f"scale {fmt(best_end['out_scale'])} ({fmt(best_end['loss_last_10pct'], 4)})."
    )
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 3.8))
    for c in classes:
        mine = [r for r in rows if r["classes"] == c and r["out_scale"] > 0]
        (line,) = a1.plot(
            [r["out_scale"] for r in mine],
            [r["initial_loss"] for r in mine],
            "o-",
            label=f"C = {c}",
        )
        a1.axhline(mine[0]["expected_ln_C"], ls="--", c=line.get_color(), lw=0.8)
    a1.set_xscale("log")
    a1.set_xlabel("output weight scale (log scale; scale 0 is not drawn)")
    a1.set_ylabel("initial loss (nats; dashed: ln C)")
    a1.set_title("initial loss against the output scale")
    a1.legend(fontsize=8, loc="upper left")
    for r in runs:
        if r["curve"] is not None:
            x, y = smooth(r["curve"], max(ctx.steps // 50, 1))
            a2.plot(x, y, label=f"scale {fmt(r['out_scale'])}")
    ln_c = expected_initial_loss(classes[0])
    reference_line(a2, ln_c, f"ln {classes[0]} = {ln_c:.3f}", right=True)
    a2.set_xlabel("step")
    a2.set_ylabel(f"training loss, C = {classes[0]} (nats)")
    a2.set_title("training from each start")
    a2.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    big = max(ctx.sweep)
    start = {
        c: next(r["initial_loss"] for r in rows if r["classes"] == c and r["out_scale"] == big)
        for c in classes
    }
    return Result(
        answer=answer,
        headline=(
            "Calibrated wins: an output scale up to "
            + ", ".join(
                f"{fmt(calibrated[c]) if calibrated[c] is not None else 'none'} (C={c})"
                for c in classes
            )
            + " starts within 1% of ln C, while scale "
            + f"{fmt(big)} starts at "
            + ", ".join(
                f"{fmt(start[c], 4)} (ln {c} = {fmt(expected_initial_loss(c), 4)})" for c in classes
            )
            + f"; after {ctx.steps:,} steps scale {fmt(worst_end['out_scale'])} is still "
            f"{fmt(worst_end['loss_last_10pct'] - best_end['loss_last_10pct'])} nats behind "
            f"scale {fmt(best_end['out_scale'])}."
        ),
        columns={
            "classes": "classes C",
            "out_scale": "output scale",
            "excess": "initial loss - ln C (nats)",
            "initial_loss": "initial loss (nats)",
            "expected_ln_C": "ln C (nats)",
            "logit_std": "logit std",
            "loss_first_10pct": "train loss, first 10% (nats)",
            "loss_last_10pct": "train loss, last 10% (nats)",
        },
        rows=rows,
        method=(
            "The lecture's single-layer MLP (10-d embedding, 200 Kaiming tanh units) with "
            "output weights N(0, 1) * scale and a zero output bias, for each scale in "
            f"{', '.join(fmt(s) for s in ctx.sweep)}, same seed. With {classes[0]} classes: the "
            f"names data; with 1,000: random contexts and uniformly random targets. Initial "
            f"loss over {N_EXAMPLES:,} examples before any update; then the {classes[0]}-class "
            f"nets train {ctx.steps:,} steps (SGD, lr 0.1, batch 32)."
        ),
        figures={
            "calibration": (
                fig,
                "Left: initial loss against the output scale, with ln C dashed. Right: "
                "training from each output scale (C = 27), with ln C dotted.",
            )
        },
    )
