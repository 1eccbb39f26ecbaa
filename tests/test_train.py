"""Exact reproduction of the lecture (CPU, 1 thread, torch 2.13.0): the fast checks here,
the full 200,000-step stages as slow tests."""

import pytest
import torch

from plumb import reference
from plumb.lecture import run_lecture, run_stage
from plumb.models import LECTURE_SEED, MLP, preset_config
from plumb.optim import SGD
from plumb.train import TrainConfig, calibrate_batchnorm, split_loss, train


def printed(x: float) -> str:
    return f"{x:.4f}"


def test_lecture_deep_1001_steps(names):
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(LECTURE_SEED)
    model = MLP(preset_config("lecture-deep"), g)
    result = train(
        model, names, TrainConfig(steps=1001, lr_decay_step=150_000, threads=1), g, progress=False
    )
    assert printed(result.step0_loss) == printed(reference.DEEP_STEP0_LOSS)
    train_loss, val_loss = split_loss(model, names.train), split_loss(model, names.val)
    assert (printed(train_loss), printed(val_loss)) == tuple(map(printed, reference.DEEP_1001))
    # On this build the numbers agree to the last float32 bit; allow an ulp or two elsewhere.
    assert abs(train_loss - reference.DEEP_1001[0]) < 1e-6
    assert abs(val_loss - reference.DEEP_1001[1]) < 1e-6


def test_batchnorm_stage_first_20000_steps(names):
    """The notebook's printed losses at steps 0, 10,000 and 20,000, to the last printed
    digit (make test's guard of the full reproduction, which make test-all runs)."""
    r = run_stage("batchnorm", names, steps=20_001, threads=1)
    assert [printed(v) for _, v in r.printed] == [
        printed(v) for v in reference.BATCHNORM_PRINTED[:3]
    ]


def test_sgd_is_the_notebooks_update():
    p = torch.nn.Parameter(torch.randn(50, 50))
    p.grad = torch.randn(50, 50) * 1e-2
    expected = p.detach() + (-0.1 * p.grad)
    SGD([p], lr=0.1).step()
    assert torch.equal(p.detach(), expected)


def test_sgd_weight_decay_is_torchs_l2_term():
    """weight_decay adds weight_decay * p to the gradient, as torch.optim.SGD does."""
    p = torch.nn.Parameter(torch.randn(50, 50))
    q = torch.nn.Parameter(p.detach().clone())
    p.grad = q.grad = torch.randn(50, 50) * 1e-2
    SGD([p], lr=0.1, weight_decay=0.3).step()
    torch.optim.SGD([q], lr=0.1, weight_decay=0.3).step()
    torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-6)
    plain = q.detach() + 0.1 * 0.3 * q.detach()  # the same step without the decay term
    assert (p.detach() - plain).abs().max() > 1e-3


def test_weight_average_is_the_mean_of_the_iterates_it_took():
    """WeightAverage(start=3, every=2) over 10 SGD steps holds the plain mean of the
    parameters after steps 3, 5, 7, 9 (float32 rounding of the running update), and
    apply() puts it into the model."""
    from plumb.optim import WeightAverage

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    opt = SGD(model.parameters(), lr=0.1)
    average = WeightAverage(opt, start=3, every=2)
    taken = []
    for i in range(10):
        loss = model(torch.randn(16, 5)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        average(i)
        if i in (3, 5, 7, 9):
            taken.append([p.detach().clone() for p in model.parameters()])
    assert average.count == 4
    last = [p.detach().clone() for p in model.parameters()]
    assert average.apply() == 4
    for k, p in enumerate(model.parameters()):
        mean = torch.stack([t[k] for t in taken]).mean(0)
        torch.testing.assert_close(p.detach(), mean, rtol=0, atol=1e-6)
        assert not torch.allclose(p.detach(), last[k])  # not just the last iterate


def test_lr_schedule_and_losses_stay_on_device(names):
    cfg = TrainConfig(steps=30, lr=0.2, lr_decay_step=10, lr_final=0.02, print_every=1000)
    g = torch.Generator().manual_seed(0)
    model = MLP(preset_config("lecture-deep", n_hidden=16), g)
    res = train(model, names, cfg, g, progress=False)
    assert res.lrs[:10].eq(0.2).all() and res.lrs[10:].eq(0.02).all()
    assert res.losses.shape == (30,) and torch.isfinite(res.losses).all()


def test_adamw_and_calibration(names):
    cfg = TrainConfig(steps=200, optimizer="adamw", lr=3e-3, print_every=1000)
    g = torch.Generator().manual_seed(0)
    model = MLP(preset_config("lecture-deep", n_hidden=32, n_layers=2), g)
    res = train(model, names, cfg, g, progress=False)
    assert res.losses[-50:].mean() < res.losses[:50].mean() - 0.3
    before = split_loss(model, names.val)
    assert calibrate_batchnorm(model, names.train) == 3
    bn = model.layers.norm1
    h = model.layers.linear1(model.layers.flatten(model.layers.embedding(names.train.X)))
    torch.testing.assert_close(bn.running_mean, h.mean(0).detach(), rtol=1e-4, atol=1e-5)
    assert abs(split_loss(model, names.val) - before) < 0.2
    assert model.training  # calibration leaves the mode as it found it


def test_same_seed_same_run(names):
    def run():
        g = torch.Generator().manual_seed(3)
        model = MLP(preset_config("lecture-deep", n_hidden=16, n_layers=2), g)
        return train(
            model, names, TrainConfig(steps=50, print_every=1000), g, progress=False
        ).losses

    assert torch.equal(run(), run())


@pytest.mark.slow
def test_full_lecture_reproduction():
    """All five stages, 200,000 steps each (about 15 min on 2 cores)."""
    results = {r.stage: r for r in run_lecture(jobs=2)}
    for stage, r in results.items():
        published = reference.LOSS_LOG[stage]
        assert abs(r.compared[0] - published[0]) < 0.01, stage
        assert abs(r.compared[1] - published[1]) < 0.01, stage
    bn = results["batchnorm"]
    assert (printed(bn.train), printed(bn.val)) == tuple(map(printed, reference.BATCHNORM_RUNNING))
    ours = [printed(v) for _, v in bn.printed]
    published = [printed(v) for v in reference.BATCHNORM_PRINTED]
    # Every printed loss to 4 decimals. On AMD/AVX2 MKL kernels the step-180000 loss is
    # 2.01984930, 7e-8 below the rounding boundary of the published 2.0199: we allow a
    # difference of one unit in the 4th decimal there and count exact matches.
    assert all(abs(float(a) - float(b)) <= 1.0001e-4 for a, b in zip(ours, published, strict=True))
    assert sum(a == b for a, b in zip(ours, published, strict=True)) >= 19
    k = results["kaiming"]
    assert (printed(k.train), printed(k.val)) == ("2.0377", "2.1070")
