"""Initialisation: gains, Kaiming and Xavier schemes, output calibration, expected loss.

The reasoning (lecture; He et al. 2015; Glorot & Bengio 2010): for ``y = x @ W`` with
i.i.d. ``x`` of variance ``v`` and ``W ~ N(0, s^2)``, ``Var(y) = fan_in * s^2 * v``.
Choosing ``s = gain / sqrt(fan_in)`` keeps the variance constant through depth, where
``gain`` undoes the squashing (or halving) of the nonlinearity that follows:

    identity/linear 1, sigmoid 1, tanh 5/3, relu sqrt(2), leaky_relu sqrt(2 / (1 + a^2)),
    selu 3/4                                        (= torch.nn.init.calculate_gain)

Weight layout: plumb's :class:`~plumb.nn.Linear` stores ``(fan_in, fan_out)``; torch's
``nn.Linear`` and conv layers store ``(out, in, *kernel)``. :func:`fans` takes the layout
into account so both work.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from plumb.errors import PlumbError

Layout = Literal["in_out", "out_in"]


def calculate_gain(nonlinearity: str, param: float | None = None) -> float:
    """Recommended gain for a nonlinearity (same values as ``torch.nn.init.calculate_gain``)."""
    if nonlinearity in ("linear", "identity", "sigmoid") or nonlinearity.startswith("conv"):
        return 1.0
    if nonlinearity == "tanh":
        return 5.0 / 3
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        a = 0.01 if param is None else float(param)
        return math.sqrt(2.0 / (1 + a**2))
    if nonlinearity == "selu":
        return 3.0 / 4
    raise PlumbError(
        f"unknown nonlinearity {nonlinearity!r}: use one of linear, identity, sigmoid, "
        "tanh, relu, leaky_relu, selu"
    )


def fans(tensor: Tensor, layout: Layout = "in_out") -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a weight. ``in_out``: plumb's ``(fan_in, fan_out)``;
    ``out_in``: torch's ``(out, in, *kernel)`` where each fan is multiplied by the kernel size."""
    if tensor.dim() < 2:
        raise PlumbError(
            f"fans need a weight with at least 2 dimensions, got shape {tuple(tensor.shape)}"
        )
    if layout == "in_out":
        return tensor.shape[0], tensor.shape[1]
    receptive = math.prod(tensor.shape[2:]) if tensor.dim() > 2 else 1
    return tensor.shape[1] * receptive, tensor.shape[0] * receptive


def _draw(tensor: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)


@torch.no_grad()
def normal_(tensor: Tensor, scale: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
    """``tensor = randn * scale``: plain N(0, 1) (scale 1) or an explicit scale (the lecture's
    hand-tuned ``W1 * 0.2``, ``W2 * 0.01``). A scale of 0 still draws, so that changing a
    scale never shifts the random numbers every later tensor gets."""
    return tensor.copy_(_draw(tensor, generator) * scale)


@torch.no_grad()
def kaiming_normal_(
    tensor: Tensor,
    gain: float = 1.0,
    mode: Literal["fan_in", "fan_out"] = "fan_in",
    layout: Layout = "in_out",
    generator: torch.Generator | None = None,
) -> Tensor:
    """``W ~ N(0, std^2)``, ``std = gain / sqrt(fan)``.

    Computed as ``randn * gain / sqrt(fan)`` left to right, the lecture's order of ops
    (``torch.randn(...) * (5/3) / (30 ** 0.5)``), so lecture runs reproduce bit for bit."""
    fan_in, fan_out = fans(tensor, layout)
    fan = fan_in if mode == "fan_in" else fan_out
    return tensor.copy_(_draw(tensor, generator) * gain / fan**0.5)


@torch.no_grad()
def kaiming_uniform_(
    tensor: Tensor,
    gain: float = 1.0,
    mode: Literal["fan_in", "fan_out"] = "fan_in",
    layout: Layout = "in_out",
    generator: torch.Generator | None = None,
) -> Tensor:
    """``W ~ U(-b, b)``, ``b = gain * sqrt(3 / fan)`` (same variance as kaiming_normal_)."""
    fan_in, fan_out = fans(tensor, layout)
    bound = gain * math.sqrt(3.0 / (fan_in if mode == "fan_in" else fan_out))
    return tensor.uniform_(-bound, bound, generator=generator)


@torch.no_grad()
def xavier_normal_(
    tensor: Tensor, gain: float = 1.0, layout: Layout = "in_out", generator=None
) -> Tensor:
    """``W ~ N(0, std^2)``, ``std = gain * sqrt(2 / (fan_in + fan_out))`` (Glorot & Bengio)."""
    fan_in, fan_out = fans(tensor, layout)
    return tensor.copy_(_draw(tensor, generator) * (gain * math.sqrt(2.0 / (fan_in + fan_out))))


@torch.no_grad()
def xavier_uniform_(
    tensor: Tensor, gain: float = 1.0, layout: Layout = "in_out", generator=None
) -> Tensor:
    """``W ~ U(-b, b)``, ``b = gain * sqrt(6 / (fan_in + fan_out))``."""
    fan_in, fan_out = fans(tensor, layout)
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return tensor.uniform_(-bound, bound, generator=generator)


def expected_initial_loss(num_classes: int) -> float:
    """Cross-entropy of a uniform prediction: ``-ln(1 / K) = ln(K)`` (ln 27 = 3.2958).

    A freshly initialised classifier should start here; a much larger initial loss
    means the logits start large and confidently wrong."""
    if num_classes < 1:
        raise PlumbError(f"num_classes must be >= 1, got {num_classes}")
    return math.log(num_classes)


@torch.no_grad()
def calibrate_output_(weight: Tensor, bias: Tensor | None = None, scale: float = 0.01) -> None:
    """Shrink the output layer so the initial logits are near 0 and the softmax near
    uniform: ``W *= scale``, ``b = 0``. The loss then starts near ``ln(num_classes)``
    instead of paying for confidently wrong random logits (the lecture's ``W2 * 0.01``)."""
    weight.mul_(scale)
    if bias is not None:
        bias.zero_()
