"""Fold each BatchNorm into the Linear before it, for inference.

In eval mode a BatchNorm is an affine map per unit with frozen statistics:

    y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta = s * x + (beta - s * mu)
    with s = gamma / sqrt(running_var + eps)

and x = h W + b, so the pair is one Linear:  W' = W * s (per output unit),
b' = s * (b - mu) + beta. The folded net computes the same function with one layer
fewer per block (``plumb experiment bn-folding`` measures both claims).
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
from torch import Tensor, nn

from plumb import nn as pnn
from plumb.errors import PlumbError

LINEARS = (pnn.Linear, nn.Linear)
NORMS = tuple(
    t for t in pnn.BATCHNORMS if t not in (nn.BatchNorm2d, nn.BatchNorm3d)
)  # after a Linear


def _scale_shift(bn: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
    """(s, mu, beta) of a BatchNorm's eval-mode map y = s * (x - mu) + beta."""
    if isinstance(bn, pnn.LectureBatchNorm1d):  # running std, no eps
        return (bn.weight / bn.running_std).flatten(), bn.running_mean.flatten(), bn.bias.flatten()
    if bn.running_mean is None:
        raise PlumbError(
            f"cannot fold {type(bn).__name__} without running statistics "
            "(track_running_stats=False): it always normalises with the batch"
        )
    s = torch.rsqrt(bn.running_var + bn.eps)
    beta = torch.zeros_like(s)
    if bn.weight is not None:
        s = s * bn.weight
        beta = bn.bias
    return s, bn.running_mean, beta


@torch.no_grad()
def fold_linear(linear: nn.Module, bn: nn.Module) -> nn.Module:
    """One Linear computing ``bn(linear(x))`` as ``bn`` does in eval mode."""
    s, mu, beta = (t.detach().to(linear.weight.dtype) for t in _scale_shift(bn))
    plumb_layout = isinstance(linear, pnn.Linear)  # W is (fan_in, fan_out)
    w = linear.weight * (s if plumb_layout else s[:, None])
    b = linear.bias if linear.bias is not None else torch.zeros_like(s)
    fan_in, fan_out = w.shape if plumb_layout else w.shape[::-1]
    out = (
        pnn.Linear(fan_in, fan_out, bias=True, generator=torch.Generator())
        if plumb_layout
        else nn.Linear(fan_in, fan_out, bias=True)
    ).to(w.device)
    out.weight.copy_(w)
    out.bias.copy_(s * (b - mu) + beta)
    return out


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with every ``Linear -> BatchNorm`` pair inside a
    Sequential replaced by one Linear (``model`` itself is not touched). BatchNorms not
    right after a Linear are kept. Returns the copy."""
    folded = copy.deepcopy(model).eval()
    for seq in [m for m in folded.modules() if isinstance(m, nn.Sequential)]:
        items = list(seq._modules.items())
        kept: OrderedDict[str, nn.Module] = OrderedDict()
        i = 0
        while i < len(items):
            name, mod = items[i]
            nxt = items[i + 1][1] if i + 1 < len(items) else None
            if isinstance(mod, LINEARS) and isinstance(nxt, NORMS):
                kept[name] = fold_linear(mod, nxt)
                i += 2
            else:
                kept[name] = mod
                i += 1
        seq._modules = kept
    return folded


__all__ = ["fold_batchnorm", "fold_linear"]
