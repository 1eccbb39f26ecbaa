"""All-zero (and constant) initialisation: which parameters ever learn, and why."""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch

from plumb import nn as pnn
from plumb.doctor.rules import SYMMETRY_SPREAD
from plumb.experiments.base import (
    Context,
    Result,
    build,
    dataset,
    deep_config,
    fit,
    fmt,
    smooth,
    unigram_loss,
)
from plumb.train import split_loss

NAME = "zero-init"
TITLE = "Zero and constant initialisation: symmetry"
QUESTION = (
    "If every weight and bias starts at zero, which parameters ever receive a gradient, "
    "what loss does the net reach, and why? What if the hidden weights are merely all "
    "equal?"
)
STEPS = (3000, 100)
SCHEMES = ("zero", "constant", "kaiming")


@torch.no_grad()
def _initialise(model, scheme: str) -> None:
    for name, p in model.named_parameters():
        if scheme == "zero":
            p.zero_()
        elif scheme == "constant" and "embedding" not in name:
            # every unit of a layer gets the same weights, W = 1/fan_in: each unit's
            # pre-activation is the mean of the layer's inputs
            p.fill_(0.0 if name.endswith("bias") else 1.0 / p.shape[0])


def unit_spread(w: torch.Tensor) -> float:
    """How different a layer's units are: max |W[:, j] - mean_j W[:, j]| / max |W|
    (plumb Linear stores W as (fan_in, fan_out); units are columns). 0: identical units."""
    scale = w.abs().max()
    if scale == 0:
        return 0.0
    return ((w - w.mean(1, keepdim=True)).abs().max() / scale).item()


def _one(task: tuple[str, str | None, int, int, str]) -> dict:
    scheme, path, steps, seed, device = task
    data = dataset(path)
    model, g = build(deep_config(data, bias="always"), seed, device)
    _initialise(model, scheme)
    params = dict(model.named_parameters())
    touched = {n: 0.0 for n in params}

    def track(i: int, loss: torch.Tensor) -> None:
        for n, p in params.items():
            if p.grad is not None:
                touched[n] = max(touched[n], p.grad.abs().max().item())

    losses = fit(model, data, steps, g, device=device, on_step=track)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, pnn.Linear)]
    return {
        "scheme": scheme,
        "touched": touched,
        "spread": {n: unit_spread(m.weight.detach().cpu()) for n, m in linears[:-1]},
        "losses": losses,
        "train_full": split_loss(model, data.train, device),
        "val": split_loss(model, data.val, device),
    }


def run(ctx: Context) -> Result:
    data = dataset(ctx.options.data)
    baseline = unigram_loss(data)
    tasks = [(s, ctx.options.data, ctx.steps, ctx.seed, ctx.options.device) for s in SCHEMES]
    runs = ctx.map(_one, tasks, "initialisations")
    rows, grads = [], []
    for r in runs:
        got = [n for n, v in r["touched"].items() if v > 0]
        rows.append(
            {
                "init": r["scheme"],
                "params_with_gradient": len(got),
                "params_total": len(r["touched"]),
                "max_hidden_unit_spread": max(r["spread"].values()),
                "train_loss_full": r["train_full"],
                "unigram_entropy": baseline,
                "val": r["val"],
            }
        )
        for n, v in r["touched"].items():
            grads.append({"init": r["scheme"], "parameter": n, "max_abs_grad": v})
    zero, const, kaiming = runs
    zero_got = [n for n, v in zero["touched"].items() if v > 0]
    symmetric = [n for n, v in const["spread"].items() if v < SYMMETRY_SPREAD]
    why = (
        "With every activation 0, dL/dW = (input)^T dL/d(out) = 0 for every weight, and "
        "dL/d(input) = dL/d(out) W^T = 0 passes nothing further down: only the output bias "
        "can move, and the net stays context-free:"
        if zero_got == [n for n in zero["touched"] if n.endswith("output.bias")]
        else "More than the output bias moved, so the net is not context-free:"
    )
    answer = (
        f"All zeros: {len(zero_got)} of {len(zero['touched'])} parameters ever get a non-zero "
        f"gradient in {ctx.steps:,} steps ({', '.join(zero_got) or 'none'}). {why} its full training loss {fmt(zero['train_full'], 4)} "
        f"vs the unigram entropy {fmt(baseline, 4)}, the best any context-free model can do. "
        f"Equal hidden weights (random embedding): {len(symmetric)} of "
        f"{len(const['spread'])} hidden layers still have identical units after training "
        f"(unit spread < {SYMMETRY_SPREAD:g}): every unit of a layer computes the same "
        "function and gets the same gradient, so the layer acts as one unit; train loss "
        f"{fmt(const['train_full'], 4)}. Kaiming (random) reaches {fmt(kaiming['train_full'], 4)}."
    )
    fig, ax = plt.subplots(figsize=(10, 3.6))
    for r in runs:
        x, y = smooth(r["losses"], max(ctx.steps // 60, 1))
        ax.plot(x, y, label=r["scheme"])
    ax.axhline(baseline, ls="--", c="k", lw=0.8, label="unigram entropy")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats, window mean)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return Result(
        answer=answer,
        headline=f"Random init wins (Kaiming: train loss {fmt(kaiming['train_full'], 4)} nats): "
        f"all-zero lets {len(zero_got)} of {len(zero['touched'])} parameters ever get a gradient "
        f"and stalls at {fmt(zero['train_full'], 4)} (the unigram entropy is "
        f"{fmt(baseline, 4)}); equal weights leave {len(symmetric)} of {len(const['spread'])} "
        f"hidden layers with identical units ({fmt(const['train_full'], 4)}).",
        rows=rows,
        method=(
            "A 5-layer tanh MLP with a bias on every Linear (100 units, no normalisation) "
            "initialised three ways: every parameter 0 (embedding included); every hidden and "
            "output weight equal to 1/fan_in and biases 0, embedding N(0, 1); and Kaiming "
            f"(gain 5/3). Trained {ctx.steps:,} steps (SGD, lr 0.1, batch 32), recording the "
            "largest |gradient| each parameter ever receives; at the end, how different the "
            "units of each hidden layer are, and the loss over the whole training split."
        ),
        figures={"loss": (fig, "Training loss per initialisation; dashed: the unigram entropy.")},
        tables={"gradients": grads},
    )
