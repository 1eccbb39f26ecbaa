import math

import pytest
import torch
import torch.nn.functional as F

from plumb import nn as pnn
from plumb.errors import PlumbError
from plumb.models import LECTURE_SEED, MLP, PRESET_TRAIN, PRESETS, ModelConfig, preset_config


def test_parameter_counts_match_lecture():
    assert MLP(preset_config("lecture-mlp:batchnorm")).num_parameters() == 12097
    assert MLP(preset_config("lecture-deep")).num_parameters() == 47024


def test_deep_architecture_and_bias_policy():
    m = MLP(preset_config("lecture-deep"))
    kinds = [type(layer).__name__ for layer in m.layers]
    assert kinds == ["Embedding", "Flatten"] + ["Linear", "BatchNorm1d", "Tanh"] * 5 + [
        "Linear",
        "BatchNorm1d",
    ]
    assert all(
        layer.bias is None for layer in m.layers if isinstance(layer, pnn.Linear)
    )  # all feed a BN
    mlp = MLP(preset_config("lecture-mlp:batchnorm"))
    assert mlp.layers.linear1.bias is None and mlp.layers.output.bias is not None
    always = MLP(ModelConfig(bias="always"))
    assert always.layers.linear1.bias is not None


def test_init_draws_in_the_notebooks_order():
    """lecture-mlp:kaiming draws C, W1, b1, W2, b2 from one generator, as the notebook."""
    g = torch.Generator().manual_seed(LECTURE_SEED)
    C = torch.randn((27, 10), generator=g)
    W1 = torch.randn((30, 200), generator=g) * (5 / 3) / ((30) ** 0.5)
    b1 = torch.randn(200, generator=g) * 0.01
    W2 = torch.randn((200, 27), generator=g) * 0.01
    b2 = torch.randn(27, generator=g) * 0
    m = MLP(preset_config("lecture-mlp:kaiming"), torch.Generator().manual_seed(LECTURE_SEED))
    L = m.layers
    for ours, ref in [
        (L.embedding.weight, C),
        (L.linear1.weight, W1),
        (L.linear1.bias, b1),
        (L.output.weight, W2),
        (L.output.bias, b2),
    ]:
        assert torch.equal(ours.detach(), ref)


def test_deep_init_matches_notebook():
    g = torch.Generator().manual_seed(LECTURE_SEED)
    C = torch.randn((27, 10), generator=g)
    Ws = [
        torch.randn((fi, fo), generator=g) / fi**0.5
        for fi, fo in [(30, 100)] + [(100, 100)] * 4 + [(100, 27)]
    ]
    m = MLP(preset_config("lecture-deep"), torch.Generator().manual_seed(LECTURE_SEED))
    assert torch.equal(m.layers.embedding.weight.detach(), C)
    lins = [layer for layer in m.layers if isinstance(layer, pnn.Linear)]
    for lin, W in zip(lins, Ws, strict=True):
        assert torch.equal(lin.weight.detach(), W)
    assert torch.allclose(m.layers.output_norm.weight, torch.full((27,), 0.1))


@pytest.mark.parametrize("stage", ["fix-softmax", "kaiming", "batchnorm"])
def test_calibrated_stages_start_near_ln_vocab(names, stage):
    m = MLP(preset_config(f"lecture-mlp:{stage}"), torch.Generator().manual_seed(0))
    loss = F.cross_entropy(m(names.train.X[:4096]), names.train.Y[:4096].long()).item()
    assert abs(loss - math.log(27)) < 0.15


def test_original_stage_is_confidently_wrong(names):
    m = MLP(preset_config("lecture-mlp:original"), torch.Generator().manual_seed(LECTURE_SEED))
    loss = F.cross_entropy(m(names.train.X[:4096]), names.train.Y[:4096].long()).item()
    assert loss > 15  # the lecture's 27.9 at step 0


@pytest.mark.parametrize("norm", ["none", "batch", "layer"])
@pytest.mark.parametrize("activation", ["tanh", "relu", "leaky_relu", "sigmoid", "linear"])
@pytest.mark.parametrize("init", ["kaiming", "xavier", "normal", "torch"])
def test_every_config_builds_and_runs(norm, activation, init):
    cfg = ModelConfig(n_hidden=64, n_layers=2, norm=norm, activation=activation, init=init)
    m = MLP(cfg, torch.Generator().manual_seed(0))
    out = m(torch.randint(0, 27, (8, 3)))
    assert out.shape == (8, 27) and torch.isfinite(out).all()
    # the first hidden layer (fan_in 30 != fan_out 64, so the schemes differ by 25%) has
    # the scheme's std, with torch.nn.init's gain: 1,920 draws estimate a std to ~1.6%
    w = m.layers.linear1.weight
    fan_in, fan_out = w.shape
    gain = torch.nn.init.calculate_gain(activation)
    want = {
        "kaiming": gain / math.sqrt(fan_in),
        "xavier": gain * math.sqrt(2 / (fan_in + fan_out)),
        "normal": 1.0,
        "torch": 1 / math.sqrt(3 * fan_in),  # U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    }[init]
    assert w.std().item() == pytest.approx(want, rel=0.08)


@pytest.mark.parametrize(
    "bad",
    [
        dict(n_hidden=0),
        dict(block_size=-1),
        dict(norm="group"),
        dict(activation="gelu"),
        dict(init="he"),
        dict(weight_scale=float("nan")),
        dict(gain=0.0),
        dict(bn_momentum=0.0),
        dict(n_layers=-1),
        dict(norm="none", out_norm=True),
    ],
)
def test_bad_config(bad):
    with pytest.raises(PlumbError):
        ModelConfig(**bad)


def test_presets_and_unknown_preset():
    assert {"lecture-deep", "lecture-mlp", "lecture-mlp:batchnorm", "best-10min"} <= set(PRESETS)
    best = MLP(preset_config("best-10min", vocab_size=27))  # docs/engines.md's 248,202
    assert best.num_parameters() == 248202 and best.config.block_size == 8
    assert best.config.n_layers == 3 and best.config.n_hidden == 300
    train = PRESET_TRAIN["best-10min"]
    assert (train["batch_size"], train["steps"], train["lr_decay_step"]) == (16, 300_000, None)
    assert train["average_from"] == 75_000  # SWA over the last 3/4 at a constant lr
    assert train["threads"] == 1  # deterministic for a seed on a machine
    with pytest.raises(PlumbError, match="unknown preset"):
        preset_config("gpt-5")
    cfg = ModelConfig.from_dict(preset_config("lecture-deep").to_dict())
    assert cfg == preset_config("lecture-deep")
