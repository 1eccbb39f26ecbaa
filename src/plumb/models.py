"""Model configs, the MLP builder, and the lecture's presets.

The model is makemore's MLP (Bengio et al. 2003):

    ids (B, block_size) -> Embedding -> Flatten -> n_layers x [Linear, Norm?, Act]
                        -> Linear(n_hidden, vocab) [-> Norm]  -> logits (B, vocab)

Initialisation happens in one ordered pass over the layers with one ``torch.Generator``:
embedding, then each Linear's weight and bias in order, as the lecture draws ``C, W1, b1,
W2, b2``. Every bias is drawn (``randn * bias_scale``) even when its scale is 0, so that
changing one scale never shifts the random numbers of the tensors after it.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from plumb import init as pinit
from plumb import nn as pnn
from plumb.errors import PlumbError
from plumb.kinds import CHILDREN_ONLY

NORMS = ("none", "batch", "layer", "lecture-batch")
INITS = ("kaiming", "xavier", "normal", "torch")
BIAS_POLICIES = ("auto", "always", "never")
LECTURE_SEED = 2147483647


@dataclass
class ModelConfig:
    """Everything that defines a model's architecture and its initialisation."""

    vocab_size: int = 27
    block_size: int = 3
    n_embd: int = 10
    n_hidden: int = 100
    n_layers: int = 5  # hidden [Linear, Norm, Act] blocks
    norm: str = "batch"  # none | batch | layer | lecture-batch (the notebook's first BN)
    activation: str = "tanh"  # tanh | relu | leaky_relu | sigmoid | linear
    out_norm: bool = False  # a norm layer after the output Linear (lecture-deep)
    init: str = "kaiming"  # hidden weights: kaiming | xavier | normal | torch
    gain: float | None = None  # None: the activation's recommended gain (tanh 5/3)
    weight_scale: float = 1.0  # extra factor on hidden weights ('normal': their std)
    out_init: str | None = None  # output Linear's scheme (gain 1); None: same as init
    out_scale: float = 0.1  # calibration: output norm's gamma, else output weights, *= this
    bias: str = "auto"  # auto (no bias before a norm) | always | never
    bias_scale: float = 0.0  # hidden biases ~ N(0, bias_scale^2)
    out_bias_scale: float = 0.0  # output bias ~ N(0, out_bias_scale^2)
    bn_variance: str = "torch"  # torch | lecture (unbiased batch variance)
    bn_momentum: float = 0.1
    bn_eps: float = 1e-5

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("vocab_size", "block_size", "n_embd", "n_hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise PlumbError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.n_layers, int) or self.n_layers < 0:
            raise PlumbError(f"n_layers must be an integer >= 0, got {self.n_layers!r}")
        choices = {
            "norm": NORMS,
            "activation": tuple(pnn.ACTIVATIONS),
            "init": INITS,
            "bias": BIAS_POLICIES,
            "bn_variance": ("torch", "lecture"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise PlumbError(
                    f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}"
                )
        if self.out_init is not None and self.out_init not in INITS:
            raise PlumbError(f"out_init must be one of {', '.join(INITS)}; got {self.out_init!r}")
        for name in ("weight_scale", "out_scale", "bias_scale", "out_bias_scale", "bn_eps"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise PlumbError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.gain is not None and (not math.isfinite(self.gain) or self.gain <= 0):
            raise PlumbError(f"gain must be a finite number > 0, got {self.gain!r}")
        if not 0 < self.bn_momentum <= 1:
            raise PlumbError(f"bn_momentum must be in (0, 1], got {self.bn_momentum!r}")
        if self.out_norm and self.norm == "none":
            raise PlumbError(
                "out_norm needs a norm layer type: use norm 'batch' or 'layer' (--norm), "
                "or no output norm (--no-out-norm)"
            )

    @property
    def effective_gain(self) -> float:
        if self.gain is not None:
            return self.gain
        return pinit.calculate_gain("linear" if self.activation == "linear" else self.activation)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise PlumbError(f"unknown model config field(s): {', '.join(unknown)}")
        return cls(**d)


def _norm(cfg: ModelConfig, dim: int) -> nn.Module:
    if cfg.norm == "batch":
        return pnn.BatchNorm1d(
            dim, eps=cfg.bn_eps, momentum=cfg.bn_momentum, variance=cfg.bn_variance
        )
    if cfg.norm == "layer":
        return pnn.LayerNorm(dim, eps=cfg.bn_eps)
    if cfg.norm == "lecture-batch":
        return pnn.LectureBatchNorm1d(dim, momentum=cfg.bn_momentum)
    raise AssertionError(cfg.norm)


def _has_bias(cfg: ModelConfig, followed_by_norm: bool) -> bool:
    # A bias right before a norm layer is subtracted out again by the mean: redundant.
    return cfg.bias == "always" or (cfg.bias == "auto" and not followed_by_norm)


class MLP(nn.Module):
    """makemore's MLP language model; ``forward(ids) -> logits`` of shape (B, vocab)."""

    def __init__(self, config: ModelConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.config = cfg = config
        g = torch.Generator().manual_seed(LECTURE_SEED) if generator is None else generator
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["embedding"] = pnn.Embedding(cfg.vocab_size, cfg.n_embd, generator=torch.Generator())
        layers["flatten"] = pnn.Flatten()
        fan_in = cfg.n_embd * cfg.block_size
        act = pnn.ACTIVATIONS[cfg.activation]
        hidden = cfg.norm != "none"
        for i in range(1, cfg.n_layers + 1):
            layers[f"linear{i}"] = self._linear(fan_in, cfg.n_hidden, _has_bias(cfg, hidden))
            if hidden:
                layers[f"norm{i}"] = _norm(cfg, cfg.n_hidden)
            # activation layers are named after the function (tanh1, relu2, identity3)
            layers[f"{'identity' if cfg.activation == 'linear' else cfg.activation}{i}"] = act()
            fan_in = cfg.n_hidden
        layers["output"] = self._linear(fan_in, cfg.vocab_size, _has_bias(cfg, cfg.out_norm))
        if cfg.out_norm:
            layers["output_norm"] = _norm(cfg, cfg.vocab_size)
        self.layers = pnn.Sequential(layers)
        self.reset_parameters(g)

    @staticmethod
    def _linear(fan_in: int, fan_out: int, bias: bool) -> pnn.Linear:
        # Weights are drawn in reset_parameters; a throwaway generator keeps construction
        # from touching torch's global RNG.
        return pnn.Linear(fan_in, fan_out, bias, generator=torch.Generator())

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        """Draw every parameter in layer order from ``generator`` (see the module doc)."""
        cfg = self.config
        self.layers.embedding.weight.copy_(
            torch.randn(self.layers.embedding.weight.shape, generator=generator)
        )
        linears = [m for m in self.layers if isinstance(m, pnn.Linear)]
        for i, lin in enumerate(linears):
            is_out = i == len(linears) - 1
            scheme = (cfg.out_init or cfg.init) if is_out else cfg.init
            gain = 1.0 if is_out else cfg.effective_gain
            _init_weight(lin.weight, scheme, gain, generator)
            if not is_out:
                lin.weight.mul_(cfg.weight_scale)
            if lin.bias is not None:
                if scheme == "torch":
                    bound = 1 / math.sqrt(lin.fan_in)
                    lin.bias.uniform_(-bound, bound, generator=generator)
                else:
                    pinit.normal_(
                        lin.bias, cfg.out_bias_scale if is_out else cfg.bias_scale, generator
                    )
        # Output calibration: start with logits near 0, loss near ln(vocab_size).
        if cfg.out_norm:
            self.layers.output_norm.weight.mul_(cfg.out_scale)
        else:
            self.layers.output.weight.mul_(cfg.out_scale)

    def forward(self, ids: Tensor) -> Tensor:
        return self.layers(ids)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


CHILDREN_ONLY.add(MLP.forward)  # self.layers(ids): nothing but its children


def _init_weight(w: Tensor, scheme: str, gain: float, g: torch.Generator) -> None:
    if scheme == "kaiming":
        pinit.kaiming_normal_(w, gain, generator=g)
    elif scheme == "xavier":
        pinit.xavier_normal_(w, gain, generator=g)
    elif scheme == "normal":
        pinit.normal_(w, 1.0, generator=g)
    elif scheme == "torch":  # torch.nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        bound = 1 / math.sqrt(w.shape[0])
        w.uniform_(-bound, bound, generator=g)
    else:
        raise AssertionError(scheme)


# --- presets ----------------------------------------------------------------------------

_MLP = dict(n_embd=10, n_hidden=200, n_layers=1, norm="none", activation="tanh", bias="always")

#: The lecture's loss-log stages (single hidden layer of 200 tanh units), in order.
LECTURE_STAGES: dict[str, dict[str, Any]] = {
    # W1, b1, W2, b2 ~ N(0, 1): confidently wrong logits and a saturated tanh layer.
    "original": dict(_MLP, init="normal", out_scale=1.0, bias_scale=1.0, out_bias_scale=1.0),
    # W2 * 0.01, b2 * 0: initial loss near ln(27).
    "fix-softmax": dict(_MLP, init="normal", out_scale=0.01, bias_scale=1.0),
    # also W1 * 0.2, b1 * 0.01: tanh out of its flat tails.
    "fix-tanh": dict(_MLP, init="normal", weight_scale=0.2, out_scale=0.01, bias_scale=0.01),
    # W1 * (5/3) / sqrt(30): the semi-principled Kaiming init.
    "kaiming": dict(_MLP, init="kaiming", out_init="normal", out_scale=0.01, bias_scale=0.01),
    # Kaiming + the notebook's hand-written batch norm (no b1).
    "batchnorm": dict(
        _MLP,
        init="kaiming",
        out_init="normal",
        out_scale=0.01,
        norm="lecture-batch",
        bias="auto",
        bn_momentum=0.001,
    ),
}

PRESETS: dict[str, dict[str, Any]] = {
    # 5 x [Linear, BatchNorm1d, Tanh] + Linear + BatchNorm1d; last gamma * 0.1; the
    # notebook's BatchNorm (unbiased variance) and Linear init randn / sqrt(fan_in).
    "lecture-deep": dict(
        n_embd=10,
        n_hidden=100,
        n_layers=5,
        norm="batch",
        activation="tanh",
        out_norm=True,
        init="kaiming",
        gain=1.0,
        out_scale=0.1,
        bias="auto",
        bn_variance="lecture",
    ),
    # What the fused engine's speed buys: the best validation loss on names found for an
    # MLP-family model trained in at most 10 minutes on the 2-core CPU VM (README;
    # the search, run by run, is in docs/engines.md): an 8-character context (makemore
    # part 5's flat MLP), a wider embedding, three BatchNorm'd tanh layers of 300, batch
    # 16 (BatchNorm's noise regularises: batch 32 and 8 did worse), trained at a constant
    # lr with its weights averaged (PRESET_TRAIN).
    "best-10min": None,  # lecture-deep's recipe, resized: filled in below
    "lecture-mlp": LECTURE_STAGES["kaiming"],
    **{f"lecture-mlp:{stage}": cfg for stage, cfg in LECTURE_STAGES.items()},
}

PRESETS["best-10min"] = {
    **PRESETS["lecture-deep"],
    **dict(block_size=8, n_embd=24, n_hidden=300, n_layers=3, bn_variance="torch"),
}

#: Training defaults of each preset: the lecture's step schedule (lr 0.1, then 0.01).
PRESET_TRAIN: dict[str, dict[str, Any]] = {
    "lecture-deep": dict(steps=200_000, lr=0.1, lr_decay_step=150_000, lr_final=0.01),
    # batch 16, lr 0.1 throughout, the weights averaged from step 75,000 on (SWA: the
    # mean of the iterates generalises better than any one of them; decaying the lr
    # instead gave 1.9712, and decaying it under the average did worse), one thread
    # (deterministic for a seed on a machine); docs/engines.md
    "best-10min": dict(
        steps=300_000,
        batch_size=16,
        lr=0.1,
        lr_decay_step=None,
        average_from=75_000,
        threads=1,
    ),
    **{
        name: dict(steps=200_000, lr=0.1, lr_decay_step=100_000, lr_final=0.01)
        for name in PRESETS
        if name.startswith("lecture-mlp")
    },
}


def preset_config(name: str, **overrides: Any) -> ModelConfig:
    """The :class:`ModelConfig` of a preset (``lecture-deep``, ``lecture-mlp[:STAGE]``)."""
    if name not in PRESETS:
        raise PlumbError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


__all__ = ["LECTURE_STAGES", "MLP", "PRESETS", "PRESET_TRAIN", "ModelConfig", "preset_config"]
