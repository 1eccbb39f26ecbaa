"""Layer kinds: what plumb knows a module as, shared by the probes (what a layer's
statistics mean), the fused engine (which layers it has operations for) and the doctor
(which rules apply where).

    linear, conv            weight layers (Kaiming's argument holds along a chain of them)
    embedding
    batchnorm, layernorm, groupnorm      norms
    tanh, sigmoid           saturating: a unit is *off* where its local gradient is < 6%
                            of its maximum (|t| > 0.97; s < 0.015 or s > 0.985)
    relu, leaky_relu        rectifying: off at y <= 0
    gelu, silu, softmax, flatten
    other                   anything else (recorded with generic statistics)
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from plumb import nn as pnn

TANH_SATURATION = 0.97  # |t| > 0.97, the lecture's threshold: tanh'(x) = 1 - t^2 < 0.06
# s < 0.015 or s > 0.985: the same x as tanh's 0.97, since s(x) = (1 + tanh(x / 2)) / 2
SIGMOID_SATURATION = 0.015
SATURATING = ("tanh", "sigmoid")
RECTIFYING = ("relu", "leaky_relu")
NORMS = ("batchnorm", "layernorm", "groupnorm")
WEIGHT_LAYERS = ("linear", "conv")

_KINDS: list[tuple[tuple[type, ...], str]] = [
    ((nn.Linear, pnn.Linear), "linear"),
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d), "conv"),
    ((nn.Embedding, pnn.Embedding), "embedding"),
    (pnn.BATCHNORMS, "batchnorm"),
    ((nn.LayerNorm, nn.RMSNorm, pnn.LayerNorm), "layernorm"),
    ((nn.GroupNorm,), "groupnorm"),
    ((nn.Tanh, pnn.Tanh), "tanh"),
    ((nn.Sigmoid, pnn.Sigmoid), "sigmoid"),
    ((nn.ReLU, nn.ReLU6, pnn.ReLU), "relu"),
    ((nn.LeakyReLU, pnn.LeakyReLU), "leaky_relu"),
    ((nn.GELU,), "gelu"),
    ((nn.SiLU,), "silu"),
    ((nn.Softmax,), "softmax"),
    ((nn.Flatten, pnn.Flatten), "flatten"),
]

# A class of the user's own (nanoGPT's LayerNorm, makemore's NewGELU) is known by its name
# when it is not a subclass of a known one: the first pattern that matches the class name.
_NAMED_KINDS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"batch_?norm", re.I), "batchnorm"),
    (re.compile(r"(layer|rms)_?norm", re.I), "layernorm"),
    (re.compile(r"group_?norm", re.I), "groupnorm"),
    (re.compile(r"embedding", re.I), "embedding"),
    (re.compile(r"conv\d?d?$", re.I), "conv"),
    (re.compile(r"^linear$|dense$", re.I), "linear"),
    (re.compile(r"gelu", re.I), "gelu"),
    (re.compile(r"silu|swish", re.I), "silu"),
    (re.compile(r"leaky_?relu", re.I), "leaky_relu"),
    (re.compile(r"relu", re.I), "relu"),
    (re.compile(r"tanh", re.I), "tanh"),
    (re.compile(r"sigmoid", re.I), "sigmoid"),
]

#: Forward methods that only call the module's children, so that no activation function
#: can run outside a child: torch.nn's containers (Sequential; ModuleList and ModuleDict
#: have no forward). plumb.models adds its MLP. The probes skip their functional capture
#: when every module that is not probed has one of these.
CHILDREN_ONLY: set[Any] = {nn.Sequential.forward, nn.Module.forward}

# Activation functions seen when called inside a module's forward (torch.tanh, F.tanh,
# x.tanh(), torch.sigmoid, F.relu, F.gelu, F.silu, softmax): function name -> kind.
FUNCTIONAL = {
    "tanh": "tanh",
    "sigmoid": "sigmoid",
    "relu": "relu",
    "leaky_relu": "leaky_relu",
    "gelu": "gelu",
    "silu": "silu",
    "softmax": "softmax",
}


def layer_kind(module: nn.Module) -> str:
    """What the probes know a module as (``"other"``: recorded generically). torch.nn and
    plumb.nn classes by type; a class of the user's own by its name (``LayerNorm``,
    ``NewGELU``, ``RMSNorm``), since a weight layer or a norm written from scratch is
    still one."""
    for types, kind in _KINDS:
        if isinstance(module, types):
            return kind
    name = type(module).__name__
    for pattern, kind in _NAMED_KINDS:
        if pattern.search(name):
            return kind
    return "other"
