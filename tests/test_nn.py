import pytest
import torch
from hyp import examples
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from plumb import nn as pnn


def _pair(dim, momentum, eps, affine, track):
    torch_bn = nn.BatchNorm1d(
        dim, eps=eps, momentum=momentum, affine=affine, track_running_stats=track
    ).double()
    ours = pnn.BatchNorm1d(
        dim, eps=eps, momentum=momentum, affine=affine, track_running_stats=track
    ).double()
    if affine:
        with torch.no_grad():
            g, b = torch.randn(dim).double(), torch.randn(dim).double()
            torch_bn.weight.copy_(g), ours.weight.copy_(g)
            torch_bn.bias.copy_(b), ours.bias.copy_(b)
    return torch_bn, ours


@settings(max_examples=examples(60), deadline=None)
@given(
    n=st.integers(2, 40),
    dim=st.integers(1, 24),
    length=st.one_of(st.none(), st.integers(1, 6)),
    momentum=st.floats(0.01, 1.0),
    eps=st.sampled_from([1e-5, 1e-3, 0.1]),
    affine=st.booleans(),
    track=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_batchnorm_matches_torch(n, dim, length, momentum, eps, affine, track, seed):
    """Outputs, input and parameter gradients and running buffers equal torch.nn.BatchNorm1d
    over several training steps, then in eval mode."""
    torch.manual_seed(seed)
    torch_bn, ours = _pair(dim, momentum, eps, affine, track)
    shape = (n, dim) if length is None else (n, dim, length)
    for _ in range(3):
        x = (torch.randn(shape) * 3 + 1).double()
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = torch_bn(xa), ours(xb)
        torch.testing.assert_close(yb, ya)
        dy = torch.randn(shape).double()
        ya.backward(dy)
        yb.backward(dy)
        torch.testing.assert_close(xb.grad, xa.grad)
        if affine:
            torch.testing.assert_close(ours.weight.grad, torch_bn.weight.grad)
            torch.testing.assert_close(ours.bias.grad, torch_bn.bias.grad)
        if track:
            torch.testing.assert_close(ours.running_mean, torch_bn.running_mean)
            torch.testing.assert_close(ours.running_var, torch_bn.running_var)
    torch_bn.eval(), ours.eval()
    x = torch.randn(shape).double()
    torch.testing.assert_close(ours(x), torch_bn(x))


@settings(max_examples=examples(30), deadline=None)
@given(n=st.integers(2, 30), dim=st.integers(1, 16), seed=st.integers(0, 2**16))
def test_batchnorm_lecture_convention(n, dim, seed):
    """Lecture convention: unbiased variance both to normalise and to track."""
    torch.manual_seed(seed)
    bn = pnn.BatchNorm1d(dim, variance="lecture").double()
    x = torch.randn(n, dim).double()
    y = bn(x)
    mean, var = x.mean(0), x.var(0, correction=1)
    torch.testing.assert_close(y, (x - mean) / torch.sqrt(var + 1e-5))
    torch.testing.assert_close(bn.running_var, 0.9 * torch.ones(dim).double() + 0.1 * var)
    torch.testing.assert_close(bn.running_mean, 0.1 * mean)


def test_batchnorm_conventions_differ_as_expected():
    x = torch.randn(8, 5)
    torch_conv, lect = pnn.BatchNorm1d(5), pnn.BatchNorm1d(5, variance="lecture")
    # unbiased var is larger by n/(n-1): the lecture's output is smaller by sqrt((n-1)/n) (eps aside)
    ratio = (lect(x) / torch_conv(x)).abs().mean().item()
    assert abs(ratio - (7 / 8) ** 0.5) < 1e-3
    torch.testing.assert_close(lect.running_var, torch_conv.running_var)


def test_batchnorm_batch_of_one_raises_like_torch():
    with pytest.raises(ValueError, match="Expected more than 1 value per channel") as ours:
        pnn.BatchNorm1d(4)(torch.randn(1, 4))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        nn.BatchNorm1d(4)(torch.randn(1, 4))
    assert "when training" in str(ours.value)
    bn = pnn.BatchNorm1d(4).eval()
    assert bn(torch.randn(1, 4)).shape == (1, 4)  # eval mode: fine


def test_batchnorm_eval_is_batch_independent():
    bn = pnn.BatchNorm1d(6)
    for _ in range(5):
        bn(torch.randn(16, 6))
    bn.eval()
    x = torch.randn(10, 6)
    torch.testing.assert_close(bn(x)[:3], bn(x[:3]))


@settings(max_examples=examples(40), deadline=None)
@given(
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    eps=st.sampled_from([1e-5, 1e-2]),
    seed=st.integers(0, 2**16),
)
def test_layernorm_matches_torch(shape, eps, seed):
    torch.manual_seed(seed)
    dim = shape[-1]
    ref, ours = nn.LayerNorm(dim, eps=eps).double(), pnn.LayerNorm(dim, eps=eps).double()
    with torch.no_grad():
        w, b = torch.randn(dim).double(), torch.randn(dim).double()
        ref.weight.copy_(w), ours.weight.copy_(w), ref.bias.copy_(b), ours.bias.copy_(b)
    x = torch.randn(shape).double() * 2
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ref(xa), ours(xb)
    torch.testing.assert_close(yb, ya)
    dy = torch.randn(shape).double()
    ya.backward(dy), yb.backward(dy)
    torch.testing.assert_close(xb.grad, xa.grad)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad)


def test_linear_is_torch_linear_transposed():
    lin = pnn.Linear(7, 4, generator=torch.Generator().manual_seed(0))
    ref = nn.Linear(7, 4)
    with torch.no_grad():
        ref.weight.copy_(lin.weight.T)
        lin.bias.normal_()
        ref.bias.copy_(lin.bias)
    x = torch.randn(5, 7)
    torch.testing.assert_close(lin(x), ref(x))
    assert pnn.Linear(3, 2, bias=False).bias is None


@pytest.mark.parametrize(
    ("ours", "ref"),
    [
        (pnn.Tanh(), nn.Tanh()),
        (pnn.Sigmoid(), nn.Sigmoid()),
        (pnn.ReLU(), nn.ReLU()),
        (pnn.LeakyReLU(0.2), nn.LeakyReLU(0.2)),
    ],
)
def test_activations_match_torch(ours, ref):
    x = torch.randn(50, 7, dtype=torch.double) * 4
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.testing.assert_close(ours(xb), ref(xa))
    ours(xb).sum().backward(), ref(xa).sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad)


def test_embedding_flatten_accept_small_int_ids():
    emb = pnn.Embedding(27, 10, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[0, 1, 2], [26, 5, 5]], dtype=torch.uint8)
    out = pnn.Flatten()(emb(ids))
    assert out.shape == (2, 30)
    torch.testing.assert_close(out[1, :10], emb.weight[26])


def test_modules_work_with_state_dict_hooks_and_optimizers():
    model = pnn.Sequential(pnn.Linear(4, 8), pnn.BatchNorm1d(8), pnn.Tanh(), pnn.Linear(8, 2))
    sd = model.state_dict()
    assert {"1.running_mean", "1.running_var", "1.weight", "1.bias", "0.weight"} <= set(sd)
    seen = []
    h = model[2].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = model(torch.randn(16, 4)).pow(2).mean()
    loss.backward()
    opt.step()
    h.remove()
    assert seen == [torch.Size([16, 8])]
    clone = pnn.Sequential(pnn.Linear(4, 8), pnn.BatchNorm1d(8), pnn.Tanh(), pnn.Linear(8, 2))
    clone.load_state_dict(model.state_dict())
    model.eval(), clone.eval()
    x = torch.randn(3, 4)
    torch.testing.assert_close(clone(x), model(x))


@pytest.mark.slow
def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    model = pnn.Sequential(pnn.Linear(6, 16), pnn.BatchNorm1d(16), pnn.Tanh(), pnn.Linear(16, 3))
    x = torch.randn(32, 6)
    eager = model(x)
    compiled = torch.compile(model)
    torch.testing.assert_close(compiled(x), eager, rtol=1e-4, atol=1e-5)
