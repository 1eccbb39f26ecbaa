"""plumb's BatchNorm1d against torch.nn.BatchNorm1d over a training run."""

from __future__ import annotations

import copy
import math

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn

from plumb import nn as pnn
from plumb.experiments.base import (
    Context,
    Result,
    build,
    dataset,
    deep_config,
    fmt,
    replace_modules,
)

NAME = "batchnorm-parity"
TITLE = "BatchNorm1d from scratch vs torch.nn"
QUESTION = (
    "Does plumb's from-scratch BatchNorm1d train exactly like torch.nn.BatchNorm1d "
    "(outputs, gradients, running buffers), and what does the lecture's unbiased "
    "batch variance change?"
)
STEPS = (2000, 30)
CONVENTIONS = ("torch", "lecture")
#: float32 round-off, accumulated: differences below this are "the same computation".
SAME = 1e-4


def torch_twin(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with each plumb BatchNorm1d replaced by torch.nn.BatchNorm1d
    holding the same parameters and buffers."""

    def to_torch(ours: nn.Module) -> nn.Module:
        bn = nn.BatchNorm1d(ours.dim, eps=ours.eps, momentum=ours.momentum)
        with torch.no_grad():
            for attr in ("weight", "bias", "running_mean", "running_var"):
                getattr(bn, attr).copy_(getattr(ours, attr))
        return bn

    return replace_modules(copy.deepcopy(model), pnn.BatchNorm1d, to_torch)


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(((x - y).abs().max().item() for x, y in zip(a, b, strict=True)), default=0.0)


def _one(task: tuple[str, str | None, int, int, str]) -> dict:
    variance, path, steps, seed, device = task
    data = dataset(path)
    cfg = deep_config(data, norm="batch", out_norm=True, gain=1.0, bn_variance=variance)
    ours, g = build(cfg, seed, device)
    theirs = torch_twin(ours)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ours, theirs)]
    X, Y = data.train.X.to(device), data.train.Y.to(device)
    trace = {"logits": [], "grads": [], "running": [], "loss": []}
    bn_first = None
    for i in range(steps):
        ix = torch.randint(0, X.shape[0], (32,), generator=g).to(device)
        logits, grads = [], []
        for model, opt in zip((ours, theirs), opts, strict=True):
            out = model(X[ix])
            loss = F.cross_entropy(out, Y[ix].long())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            logits.append(out.detach())
            grads.append([p.grad for p in model.parameters()])
            opt.step()
        if i == 0:
            with torch.no_grad():  # the first BatchNorm's output scale, ours vs torch's
                h = ours.layers.linear1(ours.layers.flatten(ours.layers.embedding(X[ix])))
                # copies: measuring must not move the running buffers of the runs
                a, b = copy.deepcopy(ours.layers.norm1), copy.deepcopy(theirs.layers.norm1)
                bn_first = a(h).std().item() / b(h).std().item()
        trace["logits"].append((logits[0] - logits[1]).abs().max().item())
        trace["grads"].append(_max_diff(grads[0], grads[1]))
        trace["running"].append(_max_diff(_buffers(ours), _buffers(theirs)))
        trace["loss"].append(loss.item())
    eval_diff = (
        (_eval(ours, data.val.X, device) - _eval(theirs, data.val.X, device)).abs().max().item()
    )
    return {"variance": variance, **trace, "eval": eval_diff, "bn_scale_ratio": bn_first}


def _buffers(model: nn.Module) -> list[torch.Tensor]:
    return [b for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var"))]


@torch.no_grad()
def _eval(model: nn.Module, X: torch.Tensor, device: str) -> torch.Tensor:
    model.eval()
    out = model(X.to(device))
    model.train()
    return out


def run(ctx: Context) -> Result:
    tasks = [(v, ctx.options.data, ctx.steps, ctx.seed, ctx.options.device) for v in CONVENTIONS]
    runs = ctx.map(_one, tasks, "conventions")
    rows = []
    for r in runs:
        rows.append(
            {
                "variance": r["variance"],
                "steps": ctx.steps,
                "max_logit_diff_step0": r["logits"][0],
                "max_logit_diff": max(r["logits"]),
                "max_grad_diff": max(r["grads"]),
                "max_running_diff": max(r["running"]),
                "max_eval_output_diff": r["eval"],
                "first_bn_std_ratio": r["bn_scale_ratio"],
            }
        )
    same, lec = rows
    n = 32
    predicted = math.sqrt((n - 1) / n)
    verdict = (
        "the same computation"
        if max(same["max_logit_diff"], same["max_grad_diff"], same["max_running_diff"]) < SAME
        else "NOT the same computation"
    )
    answer = (
        f"With torch's convention (biased batch variance to normalise, unbiased for the "
        f"running buffer) plumb's layer and torch.nn's agree over {ctx.steps:,} steps to "
        f"{fmt(same['max_logit_diff'])} in the logits, {fmt(same['max_grad_diff'])} in any "
        f"gradient and {fmt(same['max_running_diff'])} in the running buffers "
        f"(eval-mode outputs: {fmt(same['max_eval_output_diff'])}): {verdict} up to float32 "
        f"round-off (threshold {SAME:g}). The lecture's convention normalises with the "
        f"unbiased variance, so at a batch of {n} every normalised activation is scaled by "
        f"sqrt((n-1)/n) = {predicted:.4f}; measured on the first layer: "
        f"{same['first_bn_std_ratio']:.4f} (torch convention) and "
        f"{lec['first_bn_std_ratio']:.4f} (lecture convention). That changes the logits by "
        f"{fmt(lec['max_logit_diff_step0'])} at step 0, and the two trainings drift apart to "
        f"{fmt(lec['max_logit_diff'])}: a different network from the same start."
    )
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for r in runs:
        for ax, key, title in zip(
            axes,
            ("logits", "grads", "running"),
            ("max |logit diff|", "max |grad diff|", "max |running buffer diff|"),
            strict=True,
        ):
            ax.plot([max(v, 1e-12) for v in r[key]], label=f"variance={r['variance']}", lw=0.8)
            ax.set_yscale("log")
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("step")
    axes[0].set_ylabel("max |difference| (log scale; exact 0 drawn at 1e-12)")
    axes[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return Result(
        answer=answer,
        headline=f"plumb's BatchNorm1d trains like torch's: with torch's variance convention "
        f"logits and gradients differ by at most "
        f"{fmt(max(same['max_logit_diff'], same['max_grad_diff']))} over {ctx.steps:,} steps "
        f"(float32 round-off); the lecture's unbiased batch variance scales xhat by "
        f"{lec['first_bn_std_ratio']:.4f}, a different network from the same start.",
        rows=rows,
        method=(
            "The lecture's deep net (5 x [Linear, BatchNorm1d, tanh] + Linear + BatchNorm1d) is "
            "built with plumb's BatchNorm1d, then copied with every BatchNorm1d replaced by "
            "torch.nn.BatchNorm1d holding the same parameters and buffers. Both copies train "
            f"side by side on the same {ctx.steps:,} batches of 32 (SGD, lr 0.1); every step "
            "records the largest absolute difference of the logits, of every parameter "
            "gradient and of every running buffer. Done once with variance='torch' and once "
            "with variance='lecture' (unbiased batch variance, as the notebook's x.var())."
        ),
        figures={
            "differences": (
                fig,
                "Largest absolute difference per step between plumb's and torch's BatchNorm "
                "nets (log scale), for both variance conventions.",
            )
        },
        extra={
            "predicted_scale": predicted,
            "traces": {
                r["variance"]: {k: r[k] for k in ("logits", "grads", "running")} for r in runs
            },
        },
    )
