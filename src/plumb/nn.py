"""From-scratch layers, written out as in the lecture, as ``torch.nn.Module`` subclasses.

The math is plain tensor code under torch autograd, so hooks, ``state_dict``, optimizers,
``.to(device)`` and ``torch.compile`` work as with ``torch.nn``. Two deliberate
differences from ``torch.nn``:

* :class:`Linear` stores its weight as ``(fan_in, fan_out)`` and computes ``x @ W + b``,
  like the lecture (``torch.nn.Linear`` stores ``(out, in)`` and computes ``x @ W.T + b``).
* Constructors take a ``generator`` so that initialisation is reproducible without
  touching torch's global RNG; the default init is the lecture's.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

Variance = Literal["torch", "lecture"]


class Embedding(nn.Module):
    """Lookup table: ``out[..., :] = C[ix]`` with ``C ~ N(0, 1)`` of shape (num, dim)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, generator=None):
        super().__init__()
        self.weight = nn.Parameter(
            torch.randn((num_embeddings, embedding_dim), generator=generator)
        )

    def forward(self, ix: Tensor) -> Tensor:
        # Datasets store ids as small integers; indexing needs int64 (uint8 would be a mask).
        return self.weight[ix.long()]

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, {self.weight.shape[1]}"


class Flatten(nn.Module):
    """Concatenate the context's embeddings: (B, T, C) -> (B, T*C), as ``emb.view(B, -1)``."""

    def forward(self, x: Tensor) -> Tensor:
        return x.view(x.shape[0], -1)


class Linear(nn.Module):
    """``y = x @ W + b`` with ``W`` of shape (fan_in, fan_out).

    Default init (the lecture's): ``W = randn(fan_in, fan_out) / sqrt(fan_in)``, i.e.
    Kaiming normal with gain 1, so ``Var(y_j) = Var(x)`` for unit-variance inputs;
    ``b = 0``. See :mod:`plumb.init` for the other schemes.
    """

    def __init__(self, fan_in: int, fan_out: int, bias: bool = True, *, generator=None):
        super().__init__()
        self.fan_in, self.fan_out = fan_in, fan_out
        w = torch.randn((fan_in, fan_out), generator=generator) / fan_in**0.5
        self.weight = nn.Parameter(w)
        self.bias = nn.Parameter(torch.zeros(fan_out)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        out = x @ self.weight
        if self.bias is not None:
            out = out + self.bias
        return out

    def extra_repr(self) -> str:
        return f"fan_in={self.fan_in}, fan_out={self.fan_out}, bias={self.bias is not None}"


def _check_batch(x: Tensor, dim: int, name: str) -> None:
    if x.dim() not in (2, 3) or x.shape[1] != dim:
        raise ValueError(
            f"{name}: expected input of shape (N, {dim}) or (N, {dim}, L), got {tuple(x.shape)}"
        )


class BatchNorm1d(nn.Module):
    """Batch normalisation over the batch (and length) dimensions of (N, C) or (N, C, L).

    Training mode, per channel c, over the ``n`` values of the batch:

        mean = sum(x) / n
        var  = sum((x - mean)^2) / n        (``variance="torch"``: biased, as torch.nn)
        var  = sum((x - mean)^2) / (n - 1)  (``variance="lecture"``: unbiased, ``x.var()``)
        xhat = (x - mean) / sqrt(var + eps)
        y    = gamma * xhat + beta

    and the running buffers move toward the batch statistics,

        running_mean = (1 - momentum) * running_mean + momentum * mean
        running_var  = (1 - momentum) * running_var  + momentum * var_unbiased

    (torch.nn always tracks the unbiased variance; so does the lecture). Eval mode (or
    ``track_running_stats=False`` off) normalises with the running buffers instead, so
    the output of one example no longer depends on the rest of its batch.

    ``sync=True`` (under ``torch.distributed``): the batch is the global one, every
    rank's share of it: n, sum(x) and then sum((x - mean)^2) are summed over the ranks
    (differentiable all-reduces, two per training forward), so N ranks with B/N
    examples each normalise exactly as one process with B (``torch.nn.SyncBatchNorm``'s
    role for plumb's layer).
    """

    def __init__(
        self,
        dim: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        variance: Variance = "torch",
        sync: bool = False,
    ):
        super().__init__()
        self.sync = sync
        if variance not in ("torch", "lecture"):
            raise ValueError(f"variance must be 'torch' or 'lecture', got {variance!r}")
        self.dim, self.eps, self.momentum, self.variance = dim, eps, momentum, variance
        self.affine, self.track_running_stats = affine, track_running_stats
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None  # gamma
        self.bias = nn.Parameter(torch.zeros(dim)) if affine else None  # beta
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(dim))
            self.register_buffer("running_var", torch.ones(dim))
        else:
            self.running_mean = self.running_var = None

    @property
    def gamma(self) -> Tensor | None:
        """The lecture's name for the scale parameter (``weight``, as torch.nn names it)."""
        return self.weight

    @property
    def beta(self) -> Tensor | None:
        """The lecture's name for the shift parameter (``bias``)."""
        return self.bias

    def forward(self, x: Tensor) -> Tensor:
        _check_batch(x, self.dim, "BatchNorm1d")
        two_d = x.dim() == 2
        dims = (0,) if two_d else (0, 2)
        use_batch = self.training or not self.track_running_stats
        if use_batch:
            n = x.numel() // self.dim
            if n <= 1:
                raise ValueError(
                    "Expected more than 1 value per channel when training, "
                    f"got input size {tuple(x.shape)}"
                )
            correction = 1 if self.variance == "lecture" else 0
            if self.sync and self.training and _distributed():
                mean, var, n = _global_moments(x, dims, correction)
            else:
                mean = x.mean(dims, keepdim=True)
                var = x.var(dims, keepdim=True, correction=correction)
        else:
            mean, var = self.running_mean, self.running_var
            if not two_d:
                mean, var = mean.view(1, -1, 1), var.view(1, -1, 1)
        xhat = (x - mean) / torch.sqrt(var + self.eps)
        if self.affine:
            gamma, beta = (
                (self.weight, self.bias)
                if two_d
                else (self.weight.view(1, -1, 1), self.bias.view(1, -1, 1))
            )
            out = gamma * xhat + beta
        else:
            out = xhat
        if self.training and self.track_running_stats:
            self._update_running(mean, var, n)
        return out

    @torch.no_grad()
    def _update_running(self, mean: Tensor, var: Tensor, n: int | Tensor) -> None:
        # running <- (1 - m) * running + m * batch, with the lecture's two roundings, for
        # both buffers in three foreach calls (fewer dispatches than eight separate ops).
        if self.variance == "torch":
            var = var * (n / (n - 1))  # torch.nn tracks the unbiased variance
        m = self.momentum
        buffers = [self.running_mean, self.running_var]
        torch._foreach_mul_(buffers, 1 - m)
        torch._foreach_add_(buffers, torch._foreach_mul([mean.view(-1), var.view(-1)], m))

    def extra_repr(self) -> str:
        return (
            f"{self.dim}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, variance={self.variance!r}"
            + (", sync=True" if self.sync else "")
        )


class _SumOverRanks(torch.autograd.Function):
    """y = sum over ranks of x; its gradient is the sum over ranks of dL/dy (every rank's
    loss depends on y)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _global_moments(
    x: Tensor, dims: tuple[int, ...], correction: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Mean and variance over every rank's share of the batch (two-pass: no
    cancellation), differentiable: the all-reduce's backward sums the gradients. The
    global count stays a tensor (no host sync in the step)."""
    n_local = x.numel() // x.shape[1]
    sums = torch.cat([x.sum(dims), x.new_full((1,), float(n_local))])
    sums = _SumOverRanks.apply(sums)
    n = sums[-1].detach()
    shape = (1, -1) if x.dim() == 2 else (1, -1, 1)
    mean = (sums[:-1] / n).view(shape)
    sq = _SumOverRanks.apply((x - mean).square().sum(dims))
    var = (sq / (n - correction)).view(shape)
    return mean, var, n


class LayerNorm(nn.Module):
    """Normalise each example over its last dimension (no batch dependence, no buffers):

    mean = sum_j x_j / d,   var = sum_j (x_j - mean)^2 / d   (biased, as torch.nn)
    y    = gamma * (x - mean) / sqrt(var + eps) + beta
    """

    def __init__(self, dim: int, eps: float = 1e-5, elementwise_affine: bool = True):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if elementwise_affine else None

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(-1, keepdim=True)
        var = x.var(-1, keepdim=True, correction=0)
        xhat = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight * xhat + self.bias if self.weight is not None else xhat

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


class Tanh(nn.Module):
    """``tanh(x) = (e^x - e^-x) / (e^x + e^-x)``; gradient ``1 - tanh(x)^2`` vanishes where |t| -> 1."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x)


class Sigmoid(nn.Module):
    """``sigmoid(x) = 1 / (1 + e^-x)``; gradient ``s (1 - s)`` is at most 1/4."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(x)


class ReLU(nn.Module):
    """``relu(x) = max(x, 0)``; a unit whose input is negative for every example is dead."""

    def forward(self, x: Tensor) -> Tensor:
        return x.clamp_min(0)


class LeakyReLU(nn.Module):
    """``leaky_relu(x) = x if x > 0 else a * x``."""

    def __init__(self, negative_slope: float = 0.01):
        super().__init__()
        self.negative_slope = negative_slope

    def forward(self, x: Tensor) -> Tensor:
        return torch.where(x > 0, x, x * self.negative_slope)

    def extra_repr(self) -> str:
        return f"negative_slope={self.negative_slope}"


class Sequential(nn.Sequential):
    """Apply layers in order (``torch.nn.Sequential``, so children are named ``0``, ``1``, ...)."""


ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": Tanh,
    "relu": ReLU,
    "leaky_relu": LeakyReLU,
    "sigmoid": Sigmoid,
    "linear": nn.Identity,
}


class LectureBatchNorm1d(nn.Module):
    """The lecture's first, hand-written batch norm (single hidden layer, "add a batch
    norm layer"), kept op for op so that run reproduces the notebook bit for bit:

        y = gain * (x - mean) / std + bias        std unbiased (``x.std(0)``), no eps
        running_mean = 0.999 * running_mean + 0.001 * mean
        running_std  = 0.999 * running_std  + 0.001 * std

    It tracks the running *standard deviation* (not the variance) and has no eps; prefer
    :class:`BatchNorm1d` for anything but reproducing the lecture.
    """

    def __init__(self, dim: int, momentum: float = 0.001):
        super().__init__()
        self.dim, self.momentum = dim, momentum
        self.weight = nn.Parameter(torch.ones((1, dim)))  # bngain
        self.bias = nn.Parameter(torch.zeros((1, dim)))  # bnbias
        self.register_buffer("running_mean", torch.zeros((1, dim)))
        self.register_buffer("running_std", torch.ones((1, dim)))

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            mean, std = x.mean(0, keepdim=True), x.std(0, keepdim=True)
            with torch.no_grad():
                m = self.momentum
                self.running_mean.copy_((1 - m) * self.running_mean + m * mean)
                self.running_std.copy_((1 - m) * self.running_std + m * std)
        else:
            mean, std = self.running_mean, self.running_std
        return self.weight * (x - mean) / std + self.bias

    def extra_repr(self) -> str:
        return f"{self.dim}, momentum={self.momentum}"


#: Every batch-normalisation layer plumb knows (its own and torch.nn's): the one tuple
#: the probes, the training loop's calibration and the folding read.
BATCHNORMS: tuple[type[nn.Module], ...] = (
    BatchNorm1d,
    LectureBatchNorm1d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
)
