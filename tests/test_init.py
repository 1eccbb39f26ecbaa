import math

import pytest
import torch
from torch import nn

from plumb import init
from plumb.errors import PlumbError


@pytest.mark.parametrize(
    ("name", "param"),
    [
        ("linear", None),
        ("sigmoid", None),
        ("tanh", None),
        ("relu", None),
        ("leaky_relu", None),
        ("leaky_relu", 0.2),
        ("selu", None),
        ("conv2d", None),
    ],
)
def test_gains_equal_torch(name, param):
    assert init.calculate_gain(name, param) == pytest.approx(nn.init.calculate_gain(name, param))


def test_identity_gain_is_one():
    assert init.calculate_gain("identity") == 1.0  # torch only knows the name "linear"


def test_unknown_gain():
    with pytest.raises(PlumbError, match="unknown nonlinearity"):
        init.calculate_gain("swishy")


@pytest.mark.parametrize("shape", [(30, 100), (100, 27), (5, 3, 4), (8, 4, 3, 3)])
def test_fans_against_torch(shape):
    w = torch.empty(shape)
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(w)
    assert init.fans(w, layout="out_in") == (fan_in, fan_out)
    if len(shape) == 2:
        # plumb's Linear stores (fan_in, fan_out): the transpose of torch's layout
        assert init.fans(w.T, layout="in_out") == (fan_in, fan_out)


@pytest.mark.parametrize("fn", [init.kaiming_normal_, init.kaiming_uniform_])
@pytest.mark.parametrize("gain", [1.0, 5 / 3, math.sqrt(2)])
def test_kaiming_std(fn, gain):
    w = torch.empty(400, 300)  # plumb layout: fan_in 400
    fn(w, gain, generator=torch.Generator().manual_seed(0))
    assert w.std().item() == pytest.approx(gain / math.sqrt(400), rel=0.02)
    w2 = torch.empty(300, 400)
    fn(w2, gain, mode="fan_in", layout="out_in", generator=torch.Generator().manual_seed(0))
    assert w2.std().item() == pytest.approx(gain / math.sqrt(400), rel=0.02)


@pytest.mark.parametrize("fn", [init.xavier_normal_, init.xavier_uniform_])
def test_xavier_std(fn):
    w = torch.empty(200, 600)
    fn(w, 1.0, generator=torch.Generator().manual_seed(0))
    assert w.std().item() == pytest.approx(math.sqrt(2 / 800), rel=0.02)


def test_kaiming_keeps_tanh_activations_unsaturated_through_depth():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 200, generator=g)
    for _ in range(10):
        w = init.kaiming_normal_(torch.empty(200, 200), 5 / 3, generator=g)
        x = torch.tanh(x @ w)
    assert 0.5 < x.std().item() < 0.8  # the lecture's ~0.65
    assert (x.abs() > 0.97).float().mean().item() < 0.1


def test_lecture_order_of_ops_is_bitwise():
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    ours = init.kaiming_normal_(torch.empty(30, 200), 5 / 3, generator=g1)
    notebook = torch.randn((30, 200), generator=g2) * (5 / 3) / ((30) ** 0.5)
    assert torch.equal(ours, notebook)


def test_expected_initial_loss_and_calibration():
    assert init.expected_initial_loss(27) == pytest.approx(3.2958, abs=1e-4)
    assert init.expected_initial_loss(1000) == pytest.approx(math.log(1000))
    with pytest.raises(PlumbError):
        init.expected_initial_loss(0)
    g = torch.Generator().manual_seed(0)
    h = torch.tanh(torch.randn(512, 200, generator=g))
    w, b = torch.randn(200, 27, generator=g), torch.randn(27, generator=g)
    y = torch.randint(0, 27, (512,), generator=g)
    loss_raw = nn.functional.cross_entropy(h @ w + b, y).item()
    init.calibrate_output_(w, b, 0.01)
    loss_cal = nn.functional.cross_entropy(h @ w + b, y).item()
    assert loss_raw > 2 * init.expected_initial_loss(27)
    assert abs(loss_cal - init.expected_initial_loss(27)) < 0.05
