"""The fused engine: the hand-written backward against autograd, its updates against the
optimizers', the compiled step against the eager engine, its probes against the hooks'."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hyp import examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

import plumb
import plumb.cstep
from plumb import native
from plumb import nn as pnn
from plumb.fused import FusedStep, build_spec, forward_backward, supports
from plumb.models import MLP, ModelConfig, preset_config
from plumb.optim import SGD
from plumb.probes import Probes
from plumb.train import TrainConfig, select_engine, train


def _batch(cfg: ModelConfig, B: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    X = torch.randint(0, cfg.vocab_size, (B, cfg.block_size), generator=g).to(torch.uint8)
    Y = torch.randint(0, cfg.vocab_size, (B,), generator=g)
    return X, Y


configs = st.builds(
    dict,
    n_layers=st.integers(0, 3),
    n_hidden=st.integers(2, 24),
    n_embd=st.integers(1, 6),
    block_size=st.integers(1, 4),
    vocab_size=st.integers(2, 30),
    norm=st.sampled_from(["none", "batch", "layer", "lecture-batch"]),
    activation=st.sampled_from(["tanh", "relu", "leaky_relu", "sigmoid", "linear"]),
    out_norm=st.booleans(),
    bias=st.sampled_from(["auto", "always", "never"]),
    bn_variance=st.sampled_from(["torch", "lecture"]),
    gain=st.floats(0.3, 3.0),
)


@settings(max_examples=examples(150), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=configs, B=st.integers(2, 48), seed=st.integers(0, 10_000))
def test_backward_matches_autograd(c, B, seed):
    """Every gradient of the hand-written backward within 1e-5 relative of autograd's
    (float64, so that the comparison is of the math, not of rounding), the loss and the
    running buffers equal."""
    if c["out_norm"] and c["norm"] == "none":
        c["out_norm"] = False
    cfg = ModelConfig(**c)
    model = MLP(cfg, torch.Generator().manual_seed(seed)).double()
    twin = copy.deepcopy(model)
    X, Y = _batch(cfg, B, seed)
    loss = F.cross_entropy(model(X), Y)
    loss.backward()
    specs, params, buffers, names = build_spec(twin)
    with torch.no_grad():
        mine, grads, _ = forward_backward(specs, params, buffers, X, Y)
    if not math.isfinite(loss.item()):  # a degenerate draw (e.g. a zero-variance batch
        assert not math.isfinite(mine.item())  # in a norm with the unbiased variance): NaN
        return  # on both sides, which is agreement
    assert mine.item() == pytest.approx(loss.item(), rel=1e-12)
    ref = dict(model.named_parameters())
    scale = max(p.grad.norm().item() for p in model.parameters())
    for name, g in zip(names, grads, strict=True):
        want = ref[name].grad
        err = (g - want).norm().item()
        # 1e-5 relative; a gradient that is 0 in exact math (a bias before a norm) is
        # compared against the largest gradient's scale, and, when every gradient is 0
        # (all ReLUs dead), against 1e-12: float64 round-off of O(1) terms is ~1e-16
        tol = 1e-5 * want.norm().item() + 1e-10 * scale + 1e-12
        assert err <= tol, (name, err, want.norm().item())
    for a, b in zip(model.buffers(), twin.buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_lecture_deep_float32_gradients_and_first_loss(names):
    g = torch.Generator().manual_seed(2147483647)
    model = MLP(preset_config("lecture-deep", vocab_size=names.vocab.size), g)
    twin = copy.deepcopy(model)
    ix = torch.randint(0, names.train.X.shape[0], (32,), generator=g)
    X, Y = names.train.X[ix], names.train.Y[ix].long()
    loss = F.cross_entropy(model(X), Y)
    loss.backward()
    specs, params, buffers, pnames = build_spec(twin)
    with torch.no_grad():
        mine, grads, _ = forward_backward(specs, params, buffers, X, Y)
    assert mine.item() == pytest.approx(3.2870, abs=5e-5)  # the notebook's step-0 loss
    ref = dict(model.named_parameters())
    for name, gr in zip(pnames, grads, strict=True):
        want = ref[name].grad
        if name.endswith("bias") and "output" not in name:
            continue
        assert (gr - want).norm() <= 1e-5 * want.norm(), name


@pytest.mark.parametrize("native_step", [False, True], ids=["python", "c"])
@pytest.mark.parametrize("optimizer", ["sgd", "sgd-weight-decay", "adamw"])
def test_updates_match_the_optimizers(optimizer, native_step):
    """Three fused steps (the Python function run eagerly, and the step in C) against
    autograd + plumb's SGD (with and without weight decay) / torch's AdamW: parameters,
    optimizer state and buffers within float32 rounding."""
    if native_step and not (native.available() and native.sgemm()):
        pytest.skip("no C compiler or no sgemm in torch's library")
    cfg = ModelConfig(
        n_layers=2, n_hidden=16, n_embd=4, norm="batch", activation="tanh", out_norm=True
    )
    a = MLP(cfg, torch.Generator().manual_seed(0))
    b = copy.deepcopy(a)

    def make(m):
        if optimizer == "sgd":
            return SGD(m.parameters(), lr=0.1)
        if optimizer == "sgd-weight-decay":  # large enough to move every weight visibly
            return SGD(m.parameters(), lr=0.1, weight_decay=0.5)
        return torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)

    oa, ob = make(a), make(b)
    fused = FusedStep(b, ob, compile=False, native=native_step)
    assert (fused.native is not None) == native_step
    for k in range(3):
        X, Y = _batch(cfg, 16, k)
        loss = F.cross_entropy(a(X), Y)
        oa.zero_grad()
        loss.backward()
        oa.step()
        mine, ok = fused(X, Y, oa.param_groups[0]["lr"])
        assert bool(ok) and mine.item() == pytest.approx(loss.item(), abs=1e-6)
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    for x, y in zip(a.buffers(), b.buffers(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    if optimizer == "adamw":
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            sa, sb = oa.state[p], ob.state[q]
            assert float(sa["step"]) == float(sb["step"]) == 3
            torch.testing.assert_close(sa["exp_avg_sq"], sb["exp_avg_sq"], rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("native_step", [False, True], ids=["python", "c"])
def test_a_non_finite_step_updates_nothing(native_step):
    if native_step and not (native.available() and native.sgemm()):
        pytest.skip("no C compiler or no sgemm in torch's library")
    cfg = ModelConfig(n_layers=1, n_hidden=8, n_embd=2, norm="none")
    model = MLP(cfg, torch.Generator().manual_seed(0))
    opt = SGD(model.parameters(), lr=0.1)
    fused = FusedStep(model, opt, compile=False, native=native_step)
    with torch.no_grad():
        model.layers.output.weight[0, 0] = float("inf")
    before = [p.clone() for p in model.parameters()]
    X, Y = _batch(cfg, 8, 0)
    _, ok = fused(X, Y, 0.1)
    assert not bool(ok)
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, q)


def test_engine_selection_and_fallback(monkeypatch):
    """auto takes the fused engine for any run when its step runs in C (nothing to
    compile), else only runs long enough to pay for the compile; outside the family the
    eager engine, saying why."""
    cfg = ModelConfig(n_layers=1, n_hidden=8, n_embd=2)
    model = MLP(cfg, torch.Generator().manual_seed(0))
    sgd = SGD(model.parameters(), lr=0.1)
    long = TrainConfig(steps=50_000)
    if native.available() and native.sgemm():
        engine, why = select_engine("auto", model, sgd, TrainConfig(steps=500))
        assert engine.name == "fused" and "nothing to compile" in why
        assert engine.step.native is not None
    monkeypatch.setattr(plumb.cstep, "usable", lambda params, buffers: False)
    assert select_engine("auto", model, sgd, long)[0].name == "fused"
    engine, why = select_engine("auto", model, sgd, TrainConfig(steps=500))
    assert engine.name == "eager" and "500 steps" in why
    engine, why = select_engine("fused", model, torch.optim.Adam(model.parameters()), long)
    assert engine.name == "eager" and "Adam" in why
    engine, why = select_engine("fused", torch.nn.Linear(2, 2), sgd, long)
    assert engine.name == "eager" and "not plumb's MLP" in why
    assert select_engine("eager", model, sgd, long)[0].name == "eager"
    assert supports(model, torch.optim.AdamW(model.parameters())) is None
    # a layer kind the table of operations does not hold (an activation someone added to
    # plumb.nn without its fused entry) sends the model to eager with the reason
    odd = MLP(cfg, torch.Generator().manual_seed(0))
    act = next(n for n, m in odd.layers.named_children() if isinstance(m, pnn.Tanh))
    setattr(odd.layers, act, torch.nn.GELU())
    engine, why = select_engine("fused", odd, SGD(odd.parameters(), lr=0.1), long)
    assert engine.name == "eager" and f"layers.{act} is a GELU" in why
    with pytest.raises(plumb.PlumbError, match="engine must be one of"):
        TrainConfig(engine="turbo")


@pytest.mark.slow
@pytest.mark.parametrize("step_in", ["c", "graph"])
@pytest.mark.parametrize("optimizer, lr", [("sgd", 0.1), ("adamw", 3e-3)])
def test_compiled_loss_curve_matches_eager(names, optimizer, lr, step_in, monkeypatch):
    """1,000 steps of lecture-deep, the fused engine (its plain steps in C, or all in the
    compiled graph) against the eager engine: every step's loss within 1e-4, the final
    weights close, the eval losses equal to four decimals."""
    if step_in == "graph":  # the step in C off: auto's choice and the FusedStep's
        monkeypatch.setattr(plumb.cstep, "usable", lambda params, buffers: False)
    elif not (native.available() and native.sgemm()):
        pytest.skip("no C compiler or no sgemm in torch's library")

    def run(engine):
        g = torch.Generator().manual_seed(2147483647)
        model = MLP(preset_config("lecture-deep", vocab_size=names.vocab.size), g)
        cfg = TrainConfig(
            steps=1000, lr=lr, optimizer=optimizer, lr_decay_step=None, engine=engine, threads=1
        )
        result = train(model, names, cfg, g, progress=False)
        assert result.engine == engine
        return model, result

    me, re_ = run("eager")
    mf, rf = run("fused")
    diff = (re_.losses - rf.losses).abs()
    assert diff.max().item() < 1e-4, diff.max().item()
    assert (rf.compile_seconds > 0) == (step_in == "graph")  # C: nothing compiled
    assert plumb.split_loss(me, names.val) == pytest.approx(
        plumb.split_loss(mf, names.val), abs=1e-4
    )


@pytest.mark.slow
def test_fused_record_steps_measure_what_the_hooks_measure(names):
    """The same model state and batch measured by the compiled fused record step and by
    the hook probes: every statistic within 1e-4 (float32 rounding of different kernels),
    the same keys in the same forward order."""

    def measure(engine):
        g = torch.Generator().manual_seed(2147483647)
        model = MLP(preset_config("lecture-deep", vocab_size=names.vocab.size), g)
        cfg = TrainConfig(steps=21, lr_decay_step=None, engine=engine, threads=1)
        with Probes(model, every=10, hist_every=20) as p:
            result = train(model, names, cfg, g, progress=False, monitor=p)
        assert result.engine == engine
        return p.history

    hooks, fused = measure("eager"), measure("fused")
    assert [r["step"] for r in fused.rows] == [0, 10, 20]
    for a, b in zip(hooks.rows, fused.rows, strict=True):
        assert list(a["layer"]) == list(b["layer"])
        for section in ("layer", "param"):
            for name, stats in a[section].items():
                for stat, v in stats.items():
                    if stat == "grad_carry":
                        continue
                    w = b[section][name][stat]
                    if stat == "update_data" and name.endswith("bias") and "output" not in name:
                        continue  # biases before a norm: updates at rounding level
                    if stat in ("grad_mean", "mean") and abs(v) < 1e-6:
                        continue  # at rounding level (a mean of ~0)
                    assert w == pytest.approx(v, rel=1e-3, abs=1e-6), (
                        a["step"],
                        section,
                        name,
                        stat,
                    )
    assert set(hooks.hists) == set(fused.hists)
    for key in hooks.hists:
        ca, cb = hooks.hists[key]["counts"][-1], fused.hists[key]["counts"][-1]
        assert abs(int(ca.sum()) - int(cb.sum())) == 0 and (
            abs(ca - cb).sum() <= 0.01 * ca.sum() + 2
        )
    assert len(fused.satmaps) == 2


def test_many_models_in_one_process_each_compile_once():
    """Dynamo allows ``recompile_limit`` compilations per code object, then fails under
    fullgraph: FusedSteps of different shapes must not share one (limit lowered to 1
    here, so the second shape would already fail). ``config.patch`` restores the limit
    (monkeypatch's undo deleted the config entry, breaking every later compile)."""
    with torch._dynamo.config.patch(recompile_limit=1):
        _three_shapes()


def _three_shapes() -> None:
    for h in (6, 7, 8):
        m = MLP(
            preset_config("lecture-deep", vocab_size=11, n_hidden=h, n_layers=1),
            torch.Generator().manual_seed(0),
        )
        step = FusedStep(m, SGD(m.parameters(), lr=0.1), native=False)
        X, Y = torch.randint(0, 11, (4, 3)), torch.randint(0, 11, (4,))
        loss, ok = step(X, Y, 0.1)
        assert bool(ok) and math.isfinite(float(loss))


def test_histogram_counts_after_the_graph_equal_the_in_graph_scatter():
    """On the CPU the fused histogram step returns each value's bin and counts them by one
    bincount after the graph; the counts equal the in-graph scatter-add's (what CUDA
    runs) exactly, and every row's counts add up to its number of values."""
    cfg = preset_config("lecture-deep", vocab_size=27, n_hidden=16, n_layers=2)
    X, Y = _batch(cfg, 12, 0)
    got = {}
    for outside in (True, False):
        m = MLP(cfg, torch.Generator().manual_seed(3))
        step = FusedStep(m, SGD(m.parameters(), lr=0.1), compile=False)
        step._count_outside = outside
        _, _, measured = step.record(X, Y, 0.1, bins=32, histograms=True)
        got[outside] = (measured.counts, list(measured.hist_keys))
    (a, keys), (b, keys_b) = got[True], got[False]
    assert keys == keys_b and a.shape == (len(keys), 32) and a.dtype == b.dtype
    assert torch.equal(a, b)
    sizes = {(r.section, r.name): r.numel for r in step.plan.rows}
    assert a.sum(1).tolist() == [sizes[k] for k in keys]


# --- the step in C (plumb.cstep) ------------------------------------------------------------
needs_native = pytest.mark.skipif(
    not (native.available() and native.sgemm()),
    reason="no C compiler or no sgemm in torch's library: the graph runs instead",
)


def _err(got: Tensor, want: Tensor) -> float:
    return (got.double() - want).norm().item()


@needs_native
@settings(max_examples=examples(100), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    c=configs,
    B=st.integers(2, 48),
    seed=st.integers(0, 10_000),
    optimizer=st.sampled_from(["sgd", "sgd-weight-decay", "adamw"]),
)
def test_native_step_is_as_accurate_as_the_graph(c, B, seed, optimizer):
    """One step in C against the same step of the Python function (what the graph
    compiles), both in float32, each measured against autograd in float64: the loss,
    every gradient and every updated parameter and buffer of the C step are within 4x the
    Python step's error plus 1e-5 of the value's norm (float32 rounding, not a different
    formula: a wrong term is off by its own size), and the two agree on ``ok``. Updated
    parameters are compared for SGD (AdamW's see below)."""
    if c["out_norm"] and c["norm"] == "none":
        c["out_norm"] = False
    cfg = ModelConfig(**c)
    ref = MLP(cfg, torch.Generator().manual_seed(seed)).double()
    X, Y = _batch(cfg, B, seed)

    def make(m):
        if optimizer == "adamw":
            return torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
        return SGD(m.parameters(), lr=0.1, weight_decay=0.5 if "decay" in optimizer else 0.0)

    o64 = make(ref)
    loss64 = F.cross_entropy(ref(X), Y)
    loss64.backward()
    grads64 = {n: p.grad.clone() for n, p in ref.named_parameters()}
    o64.step()
    runs = {}
    for in_c in (False, True):
        m = MLP(cfg, torch.Generator().manual_seed(seed))
        step = FusedStep(m, make(m), compile=False, native=in_c)
        assert (step.native is not None) == in_c
        if in_c:
            loss, ok = step(X, Y, step.optimizer.param_groups[0]["lr"])
            grads = step.native.work.grads
        else:
            snap = [p.clone() for p in step.params], [b.clone() for b in step.buffers]
            _, grads, _ = forward_backward(step.specs, *snap, X, Y)
            loss, ok = step(X, Y, step.optimizer.param_groups[0]["lr"])
        runs[in_c] = (loss, bool(ok), dict(zip(step.names, grads, strict=True)), m)
    (lp, okp, gp, mp), (ln, okn, gn, mn) = runs[False], runs[True]
    assert okn == okp
    if not math.isfinite(loss64.item()) or not okp:
        return  # a degenerate draw (a zero-variance batch in an unbiased norm): agreed
    want = loss64.item()
    assert abs(ln.item() - want) <= 4 * abs(lp.item() - want) + 1e-5 * abs(want)
    for name, g64 in grads64.items():
        tol = 4 * _err(gp[name], g64) + 1e-5 * g64.norm().item() + 1e-7
        assert _err(gn[name], g64) <= tol, name
    after = dict(ref.named_parameters())
    # AdamW's first step moves each weight by ~lr sign(g): a gradient that is 0 in exact
    # math (a bias before a norm) is float32 noise of either sign on either side, so its
    # update is not comparable; AdamW's update is test_updates_match_the_optimizers'
    for (name, p), q in zip(mp.named_parameters(), mn.parameters(), strict=True):
        if optimizer == "adamw":
            break
        tol = 4 * _err(p, after[name]) + 1e-5 * after[name].norm().item() + 1e-7
        assert _err(q, after[name]) <= tol, name
    for a, b, w in zip(mp.buffers(), mn.buffers(), ref.buffers(), strict=True):
        assert _err(b, w) <= 4 * _err(a, w) + 1e-5 * w.norm().item() + 1e-7


@needs_native
@pytest.mark.parametrize("act, slope", [(1, 0.0), (2, 0.0), (3, 0.0), (4, 0.2)])
def test_native_activations_are_within_a_few_ulp(act, slope):
    """mlpstep.c's tanh, sigmoid, relu and leaky relu on a dense grid over [-30, 30] and on
    inf, -inf, NaN, 0, -0 and subnormals, against float64: within 8 ulp of the float32
    result or 1e-7 absolute (tanh's rational approximation is within 7 ulp, exp ~2); NaN
    stays NaN, the infinities go to the limits."""
    y = torch.cat(
        [
            torch.linspace(-30, 30, 200_001),
            torch.tensor([math.inf, -math.inf, 0.0, -0.0, 1e-40, -1e-40, 1e-30, 88.5, -88.5]),
        ]
    )
    a = torch.empty_like(y)
    native._act(act, slope, y.data_ptr(), a.data_ptr(), y.numel())
    y64 = y.double()
    want = {
        1: torch.tanh(y64),
        2: torch.sigmoid(y64),
        3: y64.clamp_min(0),
        4: torch.where(y64 > 0, y64, y64 * slope),
    }[act]
    ulp = torch.finfo(torch.float32).eps * want.abs().float().clamp_min(1e-38)
    close = (a.double() - want).abs() <= torch.maximum(8 * ulp.double(), torch.tensor(1e-7))
    assert (close | (a.double() == want)).all()  # == for the infinities
    nan = torch.tensor([math.nan])
    native._act(act, slope, nan.data_ptr(), nan.data_ptr(), 1)
    assert math.isnan(nan.item())


@needs_native
def test_native_step_refuses_bad_ids_and_follows_replaced_optimizer_state():
    """An id outside the embedding raises as indexing would, before anything changes; a
    new batch size gets its own workspace; AdamW state replaced by ``load_state_dict``
    (new tensors) is followed, so a resumed run continues as the Python step does."""
    cfg = ModelConfig(n_layers=2, n_hidden=12, n_embd=3, norm="batch", activation="tanh")
    runs = []
    for in_c in (False, True):
        m = MLP(cfg, torch.Generator().manual_seed(0))
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        step = FusedStep(m, opt, compile=False, native=in_c)
        for k in range(2):
            step(*_batch(cfg, 16, k), 1e-2)
        saved = copy.deepcopy(opt.state_dict())
        step(*_batch(cfg, 16, 9), 1e-2)  # a step the resume forgets
        opt.load_state_dict(saved)
        step.state[:] = [opt.state[p] for p in step.params]
        for k in range(2, 4):
            step(*_batch(cfg, 8 if k == 3 else 16, k), 1e-2)
        runs.append((m, opt, step))
    (ma, oa, _), (mb, ob, sb) = runs
    for p, q in zip(ma.parameters(), mb.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
        assert float(oa.state[p]["step"]) == float(ob.state[q]["step"]) == 4
    before = [p.clone() for p in mb.parameters()]
    X, Y = _batch(cfg, 8, 0)
    X = X.long()
    X[3, 0] = cfg.vocab_size
    with pytest.raises(IndexError, match="index out of range"):
        sb(X, Y, 1e-2)
    assert all(torch.equal(p, q) for p, q in zip(mb.parameters(), before, strict=True))


@needs_native
@pytest.mark.parametrize("optimizer", ["sgd-wd", "adamw", "non-finite"])
def test_native_record_measures_the_updates_it_applies(optimizer):
    """The step in C keeps each parameter's update as it applies it (value after - value
    before, in float32, no copy of the parameters): the record's update rows are, bit for
    bit, plumb.native's statistics of after - before; a step that updates nothing (a
    non-finite gradient) records p - p."""
    cfg = ModelConfig(n_layers=2, n_hidden=12, n_embd=3, norm="batch", activation="tanh")
    m = MLP(cfg, torch.Generator().manual_seed(1))
    if optimizer == "adamw":
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
    else:
        opt = SGD(m.parameters(), lr=0.1, weight_decay=1e-2)
    step = FusedStep(m, opt, compile=False, native=True)
    step(*_batch(cfg, 16, 0), 0.1)
    if optimizer == "non-finite":
        with torch.no_grad():
            m.layers.output.weight[0, 0] = float("inf")
    before = [p.detach().clone() for p in step.params]
    _, ok, me = step.record(*_batch(cfg, 16, 1), 0.1)
    assert bool(ok) == (optimizer != "non-finite")
    rows = me.rows()[0]
    at = {k: i for i, k in enumerate(rows.keys)}
    for name, p, b in zip(step.names, step.params, before, strict=True):
        got = rows.values[at[("param_update", name)], 1:5]
        want = native.row_stats([p.detach()], [b])[0]
        assert np.array_equal(got.numpy(), want.numpy(), equal_nan=True), name
    if optimizer == "non-finite":
        assert rows.values[at[("param_update", "layers.output.weight")], 1].isnan()
    else:
        assert (rows.values[[at[("param_update", n)] for n in step.names], 2] > 0).all()


@needs_native
def test_native_step_follows_replaced_storage():
    """A parameter or buffer whose storage was replaced (``p.data = ...``) is stepped
    where it is now: the C step takes new pointers (it never writes through the old,
    freed ones) and goes on as the Python step does."""
    cfg = ModelConfig(n_layers=2, n_hidden=12, n_embd=3, norm="batch", activation="tanh")
    runs = []
    for in_c in (False, True):
        m = MLP(cfg, torch.Generator().manual_seed(0))
        step = FusedStep(m, SGD(m.parameters(), lr=0.1), compile=False, native=in_c)
        step(*_batch(cfg, 16, 0), 0.1)
        w = step.params[1]  # the first Linear's weight
        w.data = w.data.clone()
        rm = step.buffers[0]
        rm.data = rm.data.clone()
        kept = w.detach().clone()
        for k in range(1, 4):
            step(*_batch(cfg, 16, k), 0.1)
        assert not torch.equal(w, kept)  # the new storage is the one updated
        runs.append(m)
    for p, q in zip(runs[0].state_dict().values(), runs[1].state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


@needs_native
@pytest.mark.parametrize(
    "norm, activation", [("batch", "tanh"), ("layer", "relu"), ("none", "sigmoid")]
)
def test_native_record_step_measures_what_the_python_step_measures(norm, activation):
    """A record step with the step in C (statistics by plumb.native, in place) against
    the Python function's (stacked torch reductions), same state and batch: the same rows
    and counts, every mean within 1e-5 of its row's spread and |mean|, M2 within 1e-4, min and max
    within 1e-5 of the row's scale (float32 rounding of two kernels), off counts and
    all-off units within one value of each other (a tanh a few ulp apart can cross the
    threshold), histograms with the same totals and at most 1 % + 2 values moved."""
    cfg = ModelConfig(n_layers=2, n_hidden=20, n_embd=4, norm=norm, activation=activation)
    X, Y = _batch(cfg, 24, 1)
    steps = {}
    for in_c in (False, True):
        m = MLP(cfg, torch.Generator().manual_seed(5))
        steps[in_c] = FusedStep(m, SGD(m.parameters(), lr=0.1), compile=False, native=in_c)
        steps[in_c](X, Y, 0.1)  # a step first: the updates and BatchNorm's buffers move
    act = f"layers.{activation}1" if activation != "relu" else "layers.relu1"
    # the C step's record builds its native calls once per workspace: a second batch of
    # the same size must be read anew, and a new batch size gets new buffers and calls
    for seed, B in ((1, 24), (2, 24), (3, 16)):
        X, Y = _batch(cfg, B, seed)
        a, b = (
            steps[c].record(X, Y, 0.1, bins=16, histograms=True, saturation_layer=act)[2]
            for c in (False, True)
        )
        _same_measurements(a, b, cfg, B)


@pytest.mark.skipif(not native.available(), reason="no C compiler: the graph measures")
@pytest.mark.parametrize("corrupt", [False, True])
def test_probes_take_the_fused_records_laid_out_values_only_where_they_checked_them(
    monkeypatch, corrupt
):
    """The step in C hands its record's values laid out as a snapshot (rows, then the
    fraction of dead units, from plumb.native); the probes lay out the first record of
    each kind themselves, compare bit for bit, and take the engine's buffer afterwards.
    The record (rows, histograms, dead-unit window) equals that of the same run laid out
    by the probes every step; an engine buffer that differs once (here: one value off)
    is never taken."""
    from plumb.fused import FusedStep as FS

    cfg = ModelConfig(n_layers=3, n_hidden=24, n_embd=4, norm="none", activation="relu")
    runs = {}
    for fast in (True, False):
        orig = FS._native_record

        def record(self, *a, _orig=orig, _fast=fast, **k):
            out = _orig(self, *a, **k)
            if out is not None and not _fast:  # the probes lay out every step
                out[2].flat = None
            elif out is not None and corrupt:
                out[2].flat[-1] += 1.0  # a dead fraction (the rows are the values)
            return out

        monkeypatch.setattr(FS, "record", FS.record)  # untouched
        monkeypatch.setattr(FS, "_native_record", record)
        m = MLP(cfg, torch.Generator().manual_seed(3))
        with torch.no_grad():  # 8 units of the first layer dead for every example
            m.layers.linear1.bias[:8] = -50.0
        step = FS(m, SGD(m.parameters(), lr=0.2), native=True)
        mon = plumb.Monitor(m, report=False, every=2, hist_every=6)
        mon.attach()
        mon.external = True
        for i in range(24):
            X, Y = _batch(cfg, 16, i)
            if mon.wants_record():
                loss, _, me = step.record(
                    X, Y, 0.2, bins=mon.bins, histograms=mon.wants_histograms()
                )
            else:
                loss, me = step(X, Y, 0.2)[0], None
            mon.step(loss, me)
        mon.flush()
        runs[fast] = (mon.history, mon.window_dead(), dict(mon._fast))
        monkeypatch.setattr(FS, "_native_record", orig)
    (fast, dead_fast, taken), (slow, dead_slow, _) = runs[True], runs[False]
    if corrupt:
        assert taken == {True: None, False: None}  # checked, differed: never taken
    else:
        assert taken[True] is not None and taken[False] is not None  # both kinds taken
    import json

    assert json.dumps(fast.rows) == json.dumps(slow.rows) and len(fast.rows) == 12
    assert fast.hists.keys() == slow.hists.keys() and len(fast.hists) > 10
    for key, h in fast.hists.items():
        assert h["steps"] == slow.hists[key]["steps"] == [0, 6, 12, 18]
        for a, b in zip(h["counts"], slow.hists[key]["counts"], strict=True):
            assert (a == b).all()
    assert dead_fast == dead_slow and len(dead_fast) == 3
    assert dead_fast["layers.relu1"][0] >= 8 / 24
    assert all(r["layer"]["layers.relu1"]["dead"] >= 8 / 24 for r in fast.rows)


def _same_measurements(a, b, cfg, B):
    sa, sb = a.rows()[0], b.rows()[0]
    assert sa.keys == sb.keys and len(sa.keys) > 30
    va, vb = sa.values, sb.values
    assert torch.equal(va[:, 0], vb[:, 0])  # N
    spread = (va[:, 2] / va[:, 0]).sqrt()
    scale = torch.maximum(va[:, 3].abs(), va[:, 4].abs())
    # + 1e-5 |mean|: the stacked side's float32 sum errs by ~u |mean| per few values
    assert ((va[:, 1] - vb[:, 1]).abs() <= 1e-5 * (spread + va[:, 1].abs()) + 1e-30).all()
    assert ((va[:, 2] - vb[:, 2]).abs() <= 1e-4 * va[:, 2] + 1e-30).all()
    for col in (3, 4):
        assert ((va[:, col] - vb[:, col]).abs() <= 1e-5 * scale + 1e-30).all()
    assert ((va[:, 5] - vb[:, 5]).abs() <= 1).all()
    assert [r for r, _ in sa.units] == [r for r, _ in sb.units]
    for (_, ma), (_, mb) in zip(sa.units, sb.units, strict=True):
        assert (ma != mb).sum() <= 1
    assert a.hist_keys == b.hist_keys and a.counts.shape == b.counts.shape
    assert torch.equal(a.counts.sum(1), b.counts.sum(1))
    assert ((a.counts - b.counts).abs().sum(1) <= 0.01 * a.counts.sum(1) + 2).all()
    # the logits and their gradient, for the doctor (no hooks see them in this engine)
    assert a.output.shape == b.output.shape == (B, cfg.vocab_size)
    torch.testing.assert_close(b.output, a.output, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b.output_grad, a.output_grad, rtol=1e-4, atol=1e-7)
    assert (a.smap is None) == (b.smap is None)
    if a.smap is not None:
        assert (a.smap - b.smap).abs().max() <= 1 / 20  # one unit of 20 across the threshold
