"""plumb.Monitor: exactness against the lecture, any torch.nn model, cleanup, cost rules."""

from __future__ import annotations

import json
import math
import re
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import plumb
from plumb import Monitor, PlumbError, native
from plumb.models import LECTURE_SEED, MLP, preset_config
from plumb.optim import SGD

# the lecture's published numbers (a copy of shared/reference/lecture_part3.json)
REFERENCE = Path(__file__).resolve().parent / "data" / "lecture_part3.json"


# rowstats.c's float32 run: each float32 partial sum adds at most K terms (its header
# derives the bounds asserted by _assert_native_rows from it)
NATIVE_K = int(
    re.search(r"#define K (\d+)", (resources.files("plumb") / "rowstats.c").read_text())[1]
)
U = 2.0**-24  # float32's unit roundoff


def _assert_native_rows(got: torch.Tensor, want: torch.Tensor, n: torch.Tensor) -> None:
    """Rows (mean, M2, min, max) of plumb.native against their float64 definitions
    ``want``, within rowstats.c's bounds: the mean within K u (max - min), M2 within
    (K + 2) u of M2 + n (m - mean)^2 (m: the mean in float32), plus what the mean's error
    E moves M2 by (n E (2 u |mean| + 3 E)) and float64 roundoff; min and max exact.
    Rows with NaN or infinities equal the definitions' (NaN where they have NaN)."""
    for g, w, k in zip(got.double(), want.double(), n.double().tolist(), strict=True):
        if not torch.isfinite(w).all():
            torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)
            continue
        mean, m2, lo, hi = w.tolist()
        e = NATIVE_K * U * (hi - lo)
        assert abs(g[0].item() - mean) <= e + 1e-15 * abs(mean), (g, w)
        dm = float(torch.tensor(mean).float()) - mean
        tol = (NATIVE_K + 2) * U * (m2 + k * dm * dm) + k * e * (2 * U * abs(mean) + 3 * e)
        assert abs(g[1].item() - m2) <= tol + 1e-13 * m2 + 1e-300, (g, w)
        assert g[2].item() == lo and g[3].item() == hi


def _reference() -> dict:
    if REFERENCE.is_file():
        return json.loads(REFERENCE.read_text())["deep_batchnorm_mlp"]["after_1001_steps"]
    pytest.skip(f"{REFERENCE} not found")


def test_lecture_deep_probes_match_the_notebook(names):
    """lecture-deep, 1,001 steps, 1 thread: the probes report the notebook's printouts.

    Checked twice: against the notebook's own procedure (retain_grad, t.std(), ...) run on
    this machine, and against the published numbers to their printed precision (2
    decimals); gradient figures (printed with 7 digits) agree to 2e-6 relative: the last
    digit differs because float32 backward rounding differs between the lecture's torch
    and CPU and this one (the forward, and the eval losses, are bit-identical). The
    notebook's t.mean() sums in float32 (~1e-7 relative roundoff per addition); plumb's
    kernel (plumb.native) sums runs of 8 in float32 and the rest in float64, so they
    agree to 1e-6 of the spread, not bit for bit."""
    ref = _reference()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(LECTURE_SEED)
    model = MLP(preset_config("lecture-deep", vocab_size=names.vocab.size), g)
    opt = SGD(model.parameters(), lr=0.1)
    X, Y = names.train.X, names.train.Y
    tanhs = [m for n, m in model.named_modules() if n.startswith("layers.tanh")]
    outs: list[torch.Tensor] = []

    def keep(module, args, out):
        out.retain_grad()
        outs.append(out)

    with Monitor(model, every=1000) as mon:
        for i in range(1001):
            handles = [m.register_forward_hook(keep) for m in tanhs] if i == 1000 else []
            ix = torch.randint(0, X.shape[0], (32,), generator=g)
            loss = F.cross_entropy(model(X[ix]), Y[ix].long())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            mon.step(loss)
            for h in handles:
                h.remove()
    row = mon.history.rows[-1]
    assert row["step"] == 1000
    for k, (t, pub) in enumerate(zip(outs, ref["tanh_layers"], strict=True)):
        s = row["layer"][f"layers.tanh{k + 1}"]
        sat = ((t.abs() > 0.97).float().mean() * 100).item()
        if native.available():  # within rowstats.c's bound of the exact mean
            d = t.double()
            assert abs(s["mean"] - d.mean().item()) <= NATIVE_K * U * (d.max() - d.min()).item()
        else:  # torch's float32 reductions, as the notebook's
            assert s["mean"] == t.mean().item()
        assert s["mean"] == pytest.approx(t.mean().item(), abs=1e-6 * t.std().item())
        assert s["std"] == pytest.approx(t.std().item(), rel=1e-6)
        assert 100 * s["saturated"] == pytest.approx(sat, rel=1e-6)
        assert s["grad_std"] == pytest.approx(t.grad.std().item(), rel=1e-6)
        assert f"{s['mean']:+.2f}" == f"{pub['mean']:+.2f}"
        assert f"{s['std']:.2f}" == f"{pub['std']:.2f}"
        assert f"{100 * s['saturated']:.2f}" == f"{pub['saturated_pct']:.2f}"
        assert s["grad_std"] == pytest.approx(ref["tanh_output_grad_std"][k], rel=2e-6)
    weights = [(n, p) for n, p in model.named_parameters() if p.ndim == 2]
    for (name, p), pub in zip(weights, ref["weight_grad"], strict=True):
        s = row["param"][name]
        assert list(p.shape) == pub["shape"] or list(p.shape)[::-1] == pub["shape"]
        assert s["grad_std"] == pytest.approx(p.grad.std().item(), rel=1e-6)
        assert s["grad_data"] == pytest.approx((p.grad.std() / p.std()).item(), rel=1e-6)
        assert s["grad_std"] == pytest.approx(pub["grad_std"], rel=2e-6)
        assert s["grad_data"] == pytest.approx(pub["grad_data_ratio"], rel=2e-6)
        # SGD: the update is -lr * grad, so update:data is the lecture's ud
        ud = math.log10((0.1 * p.grad).std().item() / p.std().item())
        assert s["update_data"] == pytest.approx(ud, abs=1e-4)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.gn = nn.GroupNorm(2, 8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 16)
        self.ln = nn.LayerNorm(16)
        self.gelu = nn.GELU()
        self.fc2 = nn.Linear(16, 16)
        self.sig = nn.Sigmoid()
        self.silu = nn.SiLU()
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = self.gn(self.relu(self.bn(self.conv(x))))
        x = self.pool(x).flatten(1)
        x = self.gelu(self.ln(self.fc(x)))
        x = self.silu(self.sig(self.fc2(x)))
        return self.head(x)


def _batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 3, 6, 6, generator=g), torch.randint(0, 4, (16,), generator=g))
        for _ in range(n)
    ]


def test_any_torch_model_with_adam(tmp_path):
    torch.manual_seed(0)
    model = ConvNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    seen = {}

    def spy(name):
        def hook(m, a, out):
            seen[name] = out.detach().clone()

        return hook

    with Monitor(model, every=2, hist_every=4, out=tmp_path / "run") as mon:
        for i, (x, y) in enumerate(_batches(6)):
            handles = []
            if i == 4:
                handles = [
                    getattr(model, n).register_forward_hook(spy(n)) for n in ("conv", "relu", "sig")
                ]
                before = model.fc.weight.detach().clone()
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(loss)
            if i == 4:
                delta = model.fc.weight.detach() - before
                p_rms = model.fc.weight.square().mean().sqrt().item()
            for h in handles:
                h.remove()
    rec = plumb.load_run(tmp_path / "run")
    assert [r["step"] for r in rec.rows] == [0, 2, 4]
    kinds = {x["name"]: x["kind"] for x in rec.layers}
    assert kinds["conv"] == "conv" and kinds["bn"] == "batchnorm" and kinds["gn"] == "groupnorm"
    assert kinds["gelu"] == "gelu" and kinds["silu"] == "silu" and kinds["pool"] == "other"
    row = rec.rows[-1]["layer"]
    assert row["conv"]["mean"] == pytest.approx(seen["conv"].mean().item(), abs=1e-6)
    assert row["conv"]["std"] == pytest.approx(seen["conv"].std().item(), rel=1e-5)
    relu = seen["relu"]
    assert row["relu"]["zero"] == pytest.approx((relu == 0).float().mean().item())
    # a dead channel: zero for every example and position
    dead = (relu == 0).permute(1, 0, 2, 3).reshape(8, -1).all(1).float().mean().item()
    assert row["relu"]["dead"] == pytest.approx(dead)
    sig = seen["sig"]
    sat = ((sig < 0.015) | (sig > 0.985)).float().mean().item()
    assert row["sig"]["saturated"] == pytest.approx(sat)
    assert "saturated" not in row["gelu"] and "zero" not in row["gelu"]
    # Adam's update, measured from the actual change, relative to the weight's RMS
    s = rec.rows[-1]["param"]["fc.weight"]
    expected = math.log10(delta.square().mean().sqrt().item() / p_rms)
    assert s["update_data"] == pytest.approx(expected, abs=1e-4)
    assert rec.meta["saturation_layer"] == "sig"
    steps, maps = rec.saturation_maps()
    assert steps.tolist() == [0, 4] and maps.shape == (2, 16, 16)


def test_hooks_only_on_record_steps_and_removed_on_exception():
    model = ConvNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def n_hooks():
        return sum(len(m._forward_hooks) for m in model.modules())

    with pytest.raises(RuntimeError, match="boom"), Monitor(model, every=3) as mon:
        for i, (x, y) in enumerate(_batches(5)):
            # record steps: every module (the module stack for functional activations)
            assert n_hooks() == (len(list(model.modules())) if i % 3 == 0 else 0)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(loss)
            if i == 3:
                raise RuntimeError("boom")
    assert n_hooks() == 0
    with Monitor(model):  # attachable again after the failure
        pass


def test_hooks_stay_between_record_steps_and_measure_each_step_alone():
    """With a record step every step the hooks stay attached (the same handles, not
    registered again); each step's row is that step's own (act's 2 calls, lin1's std),
    its gradients held without a copy, and with every=2 they come off after each record
    step, as before."""
    torch.manual_seed(0)
    model = Shared()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xs = [torch.randn(8, 4) * (k + 1) for k in range(4)]
    ids, want = [], []
    with Monitor(model, every=1) as mon:
        for x in xs:
            ids.append(tuple(model.lin1._forward_hooks))
            with torch.no_grad():
                want.append(model.lin1(model.act(x)).std().item())
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            # one process, no GradScaler: the gradients are held as autograd gave them,
            # not multiplied by 1.0 into copies (each step's factor, not only the first's)
            assert mon._grad_factor() is None
            opt.step()
            mon.step(loss)
    assert len(ids[0]) == 1 and len(set(ids)) == 1  # one post-hook, the same one throughout
    rows = mon.history.rows
    assert [r["layer"]["act"]["calls"] for r in rows] == [2, 2, 2, 2]
    assert [r["layer"]["lin1"]["std"] for r in rows] == pytest.approx(want, rel=1e-6)
    assert not model.lin1._forward_hooks
    with Monitor(model, every=2) as mon:
        for i, x in enumerate(xs):
            assert len(model.lin1._forward_hooks) == (1 if i % 2 == 0 else 0)
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(loss)


def test_sparse_embedding_gradients_are_measured_as_the_dense_gradient(tmp_path):
    """nn.Embedding(sparse=True) with SparseAdam: the Monitor measures the sparse gradient
    as the dense one it stands for (the same numbers a dense embedding gives), and the
    user's loop runs to the end."""

    class Bag(nn.Module):
        def __init__(self, sparse: bool):
            super().__init__()
            torch.manual_seed(0)
            self.emb = nn.Embedding(50, 16, sparse=sparse)
            self.fc = nn.Linear(16, 50)

        def forward(self, x):
            return self.fc(self.emb(x).mean(1))

    grads = {}
    for sparse in (True, False):
        model = Bag(sparse)
        emb_opt = (torch.optim.SparseAdam if sparse else torch.optim.Adam)(
            list(model.emb.parameters()), lr=1e-2
        )
        fc_opt = torch.optim.Adam(model.fc.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(1)
        out = tmp_path / str(sparse)
        with Monitor(model, every=1, hist_every=2, out=out) as mon:
            for _ in range(6):
                x, y = (
                    torch.randint(0, 50, (8, 5), generator=g),
                    torch.randint(0, 50, (8,), generator=g),
                )
                loss = F.cross_entropy(model(x), y)
                emb_opt.zero_grad()
                fc_opt.zero_grad()
                loss.backward()
                emb_opt.step()
                fc_opt.step()
                mon.step(loss)
        rec = plumb.load_run(out)
        assert [r["step"] for r in rec.rows] == list(range(6))
        grads[sparse] = rec.rows[0]["param"]["emb.weight"]
    # step 0: the same weights and batch, so the same gradient, whichever way it is held
    for stat in ("grad_mean", "grad_std", "grad_data"):
        assert grads[True][stat] == pytest.approx(grads[False][stat], rel=1e-5, abs=1e-9)
    assert grads[True]["grad_std"] > 0


def test_attach_twice_and_bad_arguments():
    model = nn.Sequential(nn.Linear(2, 2))
    with Monitor(model), pytest.raises(PlumbError, match="already attached"), Monitor(model):
        pass
    with pytest.raises(PlumbError, match="no trainable parameters"):
        Monitor(nn.Sequential(nn.ReLU()))
    for bad in (0, -1, 1.5):
        with pytest.raises(PlumbError, match="every must be an integer"):
            Monitor(model, every=bad)
    with pytest.raises(PlumbError, match="multiple of every"):
        Monitor(model, every=10, hist_every=15)
    with pytest.raises(PlumbError, match="no module named"):
        Monitor(model, layers=["nope"])
    with pytest.raises(PlumbError, match="outside"):
        Monitor(model).step(1.0)


class Shared(nn.Module):
    """``act`` runs twice per forward: once on the data (no gradient), once inside."""

    def __init__(self):
        super().__init__()
        self.lin1, self.act, self.lin2 = nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)

    def forward(self, x):
        return self.lin2(self.act(self.lin1(self.act(x))))


@pytest.mark.parametrize("per_call", [False, True])
def test_repeated_calls_pool_and_validation_forwards_are_not_recorded(per_call):
    torch.manual_seed(0)
    model = Shared()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 4)
    with torch.no_grad():  # what the training forward computes, before the update
        a = model.act(x)
        h = model.lin1(a)
        b = model.act(h)
    with Monitor(model, every=1, per_call=per_call) as mon:
        model(torch.randn(8, 4) * 100)  # a validation forward that forgot no_grad
        with torch.no_grad():
            model(torch.randn(8, 4))  # an evaluation pass
        loss = model(x).pow(2).mean()
        model(x).sum()  # a graph never back-propagated
        opt.zero_grad()
        loss.backward()
        opt.step()
        mon.step(loss)
    layers = mon.history.rows[0]["layer"]
    if per_call:
        assert list(layers) == ["act", "lin1", "act#2", "lin2"]  # forward order
        assert layers["act"]["mean"] == pytest.approx(a.mean().item())
        assert "grad_std" not in layers["act"]  # the input x needs no gradient
        assert layers["act#2"]["std"] == pytest.approx(b.std().item(), rel=1e-6)
    else:
        assert list(layers) == ["act", "lin1", "lin2"]
        both = torch.cat([a.flatten(), b.flatten()])
        act = layers["act"]
        assert act["calls"] == 2
        assert act["mean"] == pytest.approx(both.mean().item(), rel=1e-6)
        assert act["std"] == pytest.approx(both.std().item(), rel=1e-6)
        assert act["min"] == pytest.approx(both.min().item())
        assert act["saturated"] == pytest.approx((both.abs() > 0.97).float().mean().item())
        assert "grad_std" in act  # from the second call, the only one with a gradient
    # the validation forward (inputs x100) would have pushed lin1's |mean| far up
    assert layers["lin1"]["std"] == pytest.approx(h.std().item(), rel=1e-6)
    assert layers["lin1"]["in_rms"] == pytest.approx(a.square().mean().sqrt().item(), rel=1e-6)


def test_nonfinite_values_do_not_raise():
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1))
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Monitor(model, every=1, hist_every=1) as mon:
        loss = model(torch.randn(4, 3)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        mon.step(loss)
    row = mon.history.rows[0]
    assert math.isnan(row["loss"]) and math.isnan(row["layer"]["0"]["mean"])


@pytest.mark.slow
def test_compiled_model_gives_the_eager_statistics():
    """torch.compile'd model under the Monitor: the same numbers as eager (hooks run)."""
    torch._dynamo.reset()

    def run(compiled: bool):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.Tanh(), nn.Linear(32, 4))
        fwd = torch.compile(model) if compiled else model
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(1)
        with Monitor(fwd, every=2, hist_every=2) as mon:
            for _ in range(5):
                x, y = torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
                loss = F.cross_entropy(fwd(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                mon.step(loss)
        return mon.history

    eager, comp = run(False), run(True)
    assert len(eager.rows) == len(comp.rows) == 3
    for a, b in zip(eager.rows, comp.rows, strict=True):
        assert set(a["layer"]) == set(b["layer"]) == {"0", "1", "2", "3"}
        for section in ("layer", "param"):
            for name, stats in a[section].items():
                for stat, v in stats.items():
                    w = b[section][name][stat]
                    if stat == "update_data" and max(v, w) < math.log10(1.2e-7):
                        continue  # below float32 resolution: roundoff (0.bias feeds a BatchNorm)
                    assert w == pytest.approx(v, rel=1e-4, abs=1e-6), (
                        section,
                        name,
                        stat,
                    )


def _wide_rows():
    """Three (64, 1024) linear/tanh outputs and a tanh gradient each, and a weight with
    its gradient and its update: groups over CHUNK_BYTES, saturated values to count."""
    from plumb.stats import CHUNK_BYTES, Row

    g = torch.Generator().manual_seed(0)
    shape = (64, 1024)  # 65,536 values: 9 rows of them is over CHUNK_BYTES
    assert CHUNK_BYTES < 9 * 4 * 64 * 1024
    rows, tensors = [], []
    for k in range(3):
        t = torch.randn(shape, generator=g) * (k + 1) + k
        rows += [Row("layer", f"lin{k}", shape, "linear"), Row("layer", f"tanh{k}", shape, "tanh")]
        tensors += [t, torch.tanh(t * 2)]
        rows.append(Row("layer_grad", f"tanh{k}", shape, "tanh"))
        tensors.append(torch.randn(shape, generator=g) * 1e-3)
    w = torch.randn(shape, generator=g)
    rows += [Row("param", "w", shape), Row("param_grad", "w", shape)]
    tensors += [w, torch.randn(shape, generator=g)]
    prev = {64 * 1024: (w - 0.01 * torch.randn(shape, generator=g)).reshape(1, -1)}
    return rows, tensors, prev


def test_large_groups_reduced_in_chunks_give_the_stacked_numbers(monkeypatch):
    """Without the native statistics (a CUDA tensor, no C compiler), a record step
    without histograms reduces a group over CHUNK_BYTES a chunk of rows at a time: the
    same statistics (rows, updates, off counts, per-unit masks) as the whole stacked
    group, which histogram steps and the fused engine keep."""
    from plumb.stats import Plan

    monkeypatch.setattr(native, "available", lambda: False)
    rows, tensors, prev = _wide_rows()
    plan = Plan(rows, 16, None, torch.device("cpu"))
    whole, kept, _ = plan.row_stats(tensors, prev, stacks=True)
    chunked, gone, _ = plan.row_stats(tensors, prev, stacks=False)
    assert kept[0] is not None and gone == [None]
    torch.testing.assert_close(chunked.values, whole.values, rtol=1e-6, atol=1e-9)
    assert [r for r, _ in chunked.units] == [r for r, _ in whole.units] and len(whole.units) == 3
    for (_, a), (_, b) in zip(chunked.units, whole.units, strict=True):
        assert torch.equal(a, b)
    assert whole.values[:, 5].sum() > 0  # the tanh rows have saturated values to count


def _float64_rows(tensors, prev, plan):
    """Each RowStats row's mean, M2, min, max by their definitions, in float64 (updates
    subtracted in float32, as the step's tensors are)."""
    out = []
    for g in plan.groups:
        flat = [tensors[i].reshape(-1) for i in g.members]
        vals = list(flat)
        if g.params is not None:
            vals += [p - prev[g.numel][j] for j, p in enumerate(flat[g.params])]
        for v in vals:
            d = v.double()
            out.append([d.mean(), (d - d.mean()).square().sum(), d.min(), d.max()])
    return torch.tensor(out, dtype=torch.float64)


def test_native_record_statistics_are_the_float64_definitions():
    """On the CPU a record step without histograms takes every row's mean, M2, min, max
    from plumb.native in one call: within rowstats.c's bounds of the float64
    definitions (~1e-7 of M2), where torch's float32 reductions (the stacked path, kept
    for histograms) are off by up to ~1e-5; counts and unit masks are the stacked path's."""
    from plumb.stats import Plan

    if not native.available():
        pytest.skip("no C compiler here: plumb.stats keeps torch's reductions")
    rows, tensors, prev = _wide_rows()
    plan = Plan(rows, 16, None, torch.device("cpu"))
    whole, _, _ = plan.row_stats(tensors, prev, stacks=True)
    fast, gone, _ = plan.row_stats(tensors, prev, stacks=False)
    assert gone == [None]
    exact = _float64_rows(tensors, prev, plan)
    _assert_native_rows(fast.values[:, 1:5], exact, fast.values[:, 0])
    assert torch.equal(fast.values[:, [0, 5]], whole.values[:, [0, 5]])  # N, off counts
    torch.testing.assert_close(fast.values, whole.values, rtol=1e-4, atol=1e-7)
    assert [r for r, _ in fast.units] == [r for r, _ in whole.units] and len(whole.units) == 3
    for (_, a), (_, b) in zip(fast.units, whole.units, strict=True):
        assert torch.equal(a, b)


def test_native_histograms_and_saturation_map_equal_the_stacked_ones(monkeypatch):
    """A histogram step on the CPU counts each tensor in place (plumb.native) on its
    key's merged [min, max]: the same counts as the stacked groups' bincount, bin for
    bin (the same float32 arithmetic), a key with NaN values and one with an infinite
    max included; the saturation map is the stacked one's."""
    from plumb.stats import Plan, Row, merge

    if not native.available():
        pytest.skip("no C compiler here: plumb.stats keeps torch's reductions")
    rows, tensors, prev = _wide_rows()
    tensors[2] = tensors[2].clone()
    tensors[2][0, :7] = float("nan")  # a gradient with NaN: its key's range is NaN
    tensors[3] = tensors[3].clone()
    tensors[3][5, 9] = float("inf")
    rows.append(Row("layer", "lin0", (64, 1024), "linear"))  # a second call of lin0
    tensors.append(torch.randn(64, 1024, generator=torch.Generator().manual_seed(5)) * 3)
    plan = Plan(rows, 16, "tanh1", torch.device("cpu"))
    got = plan.row_stats(tensors, prev, satmap=True, stacks=True)
    with monkeypatch.context() as m:
        m.setattr(native, "available", lambda: False)
        want = plan.row_stats(tensors, prev, satmap=True, stacks=True)
    assert isinstance(got[1][0], list) and isinstance(want[1][0], torch.Tensor)
    keys = [k for k in dict.fromkeys(got[0].keys) if k[0] in ("layer", "layer_grad", "param_grad")]
    counts = plan.histograms(got[1], merge([got[0]]), keys)
    ref = plan.histograms(want[1], merge([want[0]]), keys)
    assert torch.equal(counts, ref)
    assert counts.sum(1).tolist() == [
        sum(t.numel() for r, t in zip(rows, tensors, strict=True) if (r.section, r.name) == k)
        for k in keys
    ]
    assert counts[keys.index(("layer_grad", "tanh0")), 0] >= 7  # NaN in bin 0
    assert got[2] is not None and torch.equal(got[2], want[2])


@pytest.mark.parametrize("n", [1, 2, 31, 32, 33, 255, 256, 257, 1000, 5000])
def test_native_statistics_of_awkward_tensors(n):
    """Lengths around the kernel's 32 lanes and its float32 runs of 8 x 32 values, a mean
    1e4 x the spread (no cancellation: the sums are shifted by the first value, then
    centred), NaN and infinities as torch has them (min/max NaN when a value is NaN),
    updates x - b in float32."""
    if not native.available():
        pytest.skip("no C compiler here: plumb.stats keeps torch's reductions")
    g = torch.Generator().manual_seed(n)
    x = 1e4 + torch.randn(n, generator=g)
    b = x - 1e-3 * torch.randn(n, generator=g)
    nan, inf = x.clone(), x.clone()
    nan[n // 2] = float("nan")
    inf[n - 1] = float("inf")
    got = native.row_stats([x, x, nan, inf], [None, b, None, None])
    for row, v in zip(got, [x, x - b, nan, inf], strict=True):
        d = v.double()
        want = torch.stack([d.mean(), (d - d.mean()).square().sum(), d.amin(), d.amax()])
        _assert_native_rows(row[None], want[None], torch.tensor([n]))
    assert got[2, 2:].isnan().all() and got[3, 3] == float("inf")
    assert got[1, 1] < 1e-3 * n  # the update's spread, not x's (b was subtracted)
    # a tensor given twice is read once; a view at the same address but shorter is not it
    head = x[: max(1, n // 2)]
    again = native.row_stats([x, head, x, x], [None, None, None, b])
    assert torch.equal(again[2], again[0]) and torch.equal(again[0], got[0])
    assert torch.equal(again[1], native.row_stats([head.clone()], [None])[0])
    assert torch.equal(again[3], got[1])  # with b: the update, not x again
    with pytest.raises(ValueError, match="the size of xs"):
        native.row_stats([x, x], [None, torch.zeros(n + 1)])
    with pytest.raises(ValueError, match="contiguous float32"):
        native.row_stats([x, x.double()], [None, None])
    with pytest.raises(ValueError, match="contiguous float32"):
        native.row_stats([x], [b.double()])
    # histograms: 7 bins over each tensor's own range (rows 2 and 3 into one slot)
    bins, vals = 7, [x, x - b, nan, inf]
    lo = torch.stack([v.amin() for v in vals])
    scale = bins / (torch.stack([v.amax() for v in vals]) - lo).clamp_min(1e-38)
    counts = torch.zeros(3, bins, dtype=torch.int64)
    native.histograms(vals, lo, scale, [0, 1, 2, 2], counts)
    want = torch.zeros(3, bins, dtype=torch.int64)
    for i, (slot, v) in enumerate(zip([0, 1, 2, 2], vals, strict=True)):
        y = ((v - lo[i]) * scale[i]).nan_to_num(0.0, posinf=bins - 1, neginf=0.0)
        want[slot] += torch.bincount(y.clamp(0, bins - 1).long(), minlength=bins)
    assert torch.equal(counts, want) and counts.sum().item() == 4 * n


@pytest.mark.parametrize("kind", ["tanh", "sigmoid", "relu", "leaky_relu"])
@pytest.mark.parametrize("shape", [(7,), (32, 100), (4, 5, 6), (3, 4, 5, 6)])
def test_native_off_counts_are_the_off_masks(kind, shape):
    """plumb.native's off kernel counts the values ``off_mask`` marks, with its float32
    comparisons at the threshold (values one ulp either side of it, +-0, subnormals,
    NaN, infinities), and per unit (``unit_dim``'s layout) whether every example is off:
    the numbers ``_KindGroup.off`` takes from torch."""
    from plumb.stats import _OFF_THRESHOLD, off_mask, unit_dim

    if not native.available():
        pytest.skip("no C compiler here: plumb.stats keeps torch's reductions")
    t = torch.tensor(_OFF_THRESHOLD.get(kind, 0.0), dtype=torch.float32)
    edge = [t, -t, 0.5 + t, 0.5 - t, torch.tensor(0.0), torch.tensor(-0.0), torch.tensor(1e-40)]
    edge += [torch.tensor(-1e-40), torch.tensor(float("nan"))]
    edge += [torch.tensor(float("inf")), torch.tensor(float("-inf"))]
    near = [torch.nextafter(e.float(), torch.tensor(d)) for e in edge for d in (-1.0, 1.0)]
    pool = torch.stack([e.float() for e in edge] + near)
    g = torch.Generator().manual_seed(len(shape) * 10 + len(kind))
    x = torch.where(
        torch.rand(shape, generator=g) < 0.5,
        pool[torch.randint(0, len(pool), shape, generator=g)],
        torch.randn(shape, generator=g) * 2,
    )
    ud = unit_dim(kind, len(shape))
    if ud is not None:  # one unit off for every example
        x.select(ud, 0).fill_(-1.0 if kind not in ("tanh", "sigmoid") else 1.0)
    units = 0 if ud is None else shape[ud]
    inner = 1 if ud is None else math.prod(shape[ud + 1 :])
    rows = native.Rows(
        [], [], [(x, kind, float(t), units, inner), (x * 0 - 1, kind, float(t), 0, 1)]
    )
    counts, all_off = rows.off()
    mask = off_mask(kind, x)
    assert counts.tolist() == [mask.sum().item(), off_mask(kind, x * 0 - 1).sum().item()]
    if ud is None:
        assert all_off.size == 0
    else:
        want = mask.movedim(ud, -1).reshape(-1, units).all(0).double()
        assert all_off.tolist() == want.tolist() and all_off[0] == 1.0
    assert 0 < counts[0] < x.numel()
    # fill: the statistics, the counts and the fraction of units off written into a
    # record's buffer where set_layout says; a row given as MISSING (no parameter values
    # before the update) is NaN
    flat_x = x.reshape(-1).contiguous()
    rows = native.Rows(
        [flat_x, flat_x, flat_x],
        [None, native.Rows.MISSING, None],
        [(x, kind, float(t), units, inner)],
        off_rows=[2],
        dead=[0 if units else -1],
    )
    rows.set_layout(6, 1, 5, tail=18 if units else None)
    buf = torch.full((19,), -7.0, dtype=torch.float64)
    flags = rows.fill(buf)
    out = buf[:18].view(3, 6)
    assert np.array_equal(flags, all_off)
    stats = native.row_stats([flat_x], [None])[0]
    for r in (0, 2):  # bit for bit, NaN (x holds NaN) included
        assert np.array_equal(out[r, 1:5].numpy(), stats.numpy(), equal_nan=True)
    assert out[1, 1:5].isnan().all() and out[2, 5] == counts[0]
    assert out[:, 0].tolist() == [-7.0] * 3 and out[:2, 5].tolist() == [-7.0] * 2  # untouched
    if units:  # the fraction of units off for every example: torch's mean of the flags
        assert buf[18].item() == torch.from_numpy(all_off).mean().item() > 0
    else:
        assert buf[18].item() == -7.0


@pytest.mark.parametrize("kind", ["tanh", "sigmoid", "relu"])
def test_saturation_map_on_the_host_is_torchs(kind):
    """A CPU output's saturation map from its host array (no tensor operations) equals
    torch's off_mask, mean over each example's positions, float16, bit for bit: (B, F),
    (B, T, F) with more than 256 examples, and NCHW-like outputs."""
    from plumb.stats import _OFF_THRESHOLD, _satmap_host, off_mask

    g = torch.Generator().manual_seed(len(kind))
    t = torch.tensor(_OFF_THRESHOLD.get(kind, 0.0))
    edge = {"tanh": [t, -t], "sigmoid": [0.5 + t, 0.5 - t], "relu": [t, -t]}[kind]
    edge = torch.stack([e for v in edge for e in (v, torch.nextafter(v, v + 1))])
    for shape, ud in (((32, 100), 1), ((300, 7, 40), 2), ((5, 6, 7, 8), 1)):
        x = torch.randn(shape, generator=g) * 2
        x = torch.tanh(x) if kind == "tanh" else torch.sigmoid(x) if kind == "sigmoid" else x
        # values at the threshold and one ulp past it, in every example's first positions
        x.view(shape[0], -1)[:, : len(edge)] = edge
        mask = off_mask(kind, x).movedim(ud, -1)
        want = mask.reshape(shape[0], -1, shape[ud]).float().mean(1)[:256, :256].half()
        got = _satmap_host(kind, x.numpy(), ud)
        assert got.dtype == torch.float16 and torch.equal(got, want)
        assert 0 < want.float().mean() < 1


def test_summarize_gives_each_rows_definitions_including_the_edge_cases():
    """The host's statistics, computed for all rows at once, equal each row's
    definitions: std = sqrt(M2 / (n - 1)) (0 for one value, NaN for none or a NaN M2),
    rms = sqrt(M2 / n + mean^2), off = off / n; bit for bit, NaN where undefined."""
    import itertools

    import numpy as np

    from plumb.stats import Stat, summary

    rows = [
        (n, mean, m2, -1.0, 2.0, off)
        for n, mean, m2, off in itertools.product(
            (0.0, 1.0, 2.0, 7.0, 3200.0),
            (0.0, -1.5, 0.1, 1e150),
            (0.0, 3.5, 1e-12, float("nan"), float("inf")),
            (0.0, 3.0),
        )
    ]
    got = summary(np.array(rows, dtype=np.float64))

    def same(a: float, b: float) -> bool:
        return a == b or (math.isnan(a) and math.isnan(b))

    for i, (n, mean, m2, lo, hi, off) in enumerate(rows):
        if n > 1 and not math.isnan(m2):
            std = math.sqrt(m2 / (n - 1))
        else:
            std = 0.0 if n == 1 else float("nan")
        rms = math.sqrt(m2 / n + mean * mean) if n > 0 else float("nan")
        want = dict(mean=mean, std=std, rms=rms, min=lo, max=hi, off=off / n if n else math.nan)
        for k, v in want.items():
            assert same(got[k][i], v), (k, rows[i], got[k][i], v)
    assert len(got["std"]) == len(rows) and Stat.OFF == 5


def test_histogram_counts_are_the_same_by_bincount_and_by_scatter(monkeypatch):
    """Plan.count bins x at floor((x - lo) * bins / (hi - lo)) clamped to the bins (NaN in
    bin 0, +inf in the last): eager on the CPU by one bincount, inside a graph (or on a
    GPU) by one scatter-add; both equal a row-by-row count, two rows sharing a slot add."""
    from plumb.stats import Plan, Row

    g = torch.Generator().manual_seed(0)
    rows = [Row("layer", f"l{i % 3}", (5, 40)) for i in range(4)] + [Row("layer", "w", (7,))]
    plan = Plan(rows, 16, None, "cpu")
    stacks = [torch.randn(4, 200, generator=g) * 3, torch.randn(1, 7, generator=g)]
    stacks[0][1, 3], stacks[0][2, 9], stacks[1][0, 2] = float("nan"), float("inf"), -5.0
    which = [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)]
    slots = [0, 1, 2, 0, 3]  # rows 0 and 3 share slot 0
    lo = torch.tensor([-2.0, -9.0, -1.0, -4.0, -1.0])
    hi = torch.tensor([2.0, 9.0, 1.0, 4.0, 1.0])
    eager = plan.count(stacks, which, slots, lo, hi, 4)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    scatter = plan.count(stacks, which, slots, lo, hi, 4)
    want = torch.zeros(4, 16, dtype=torch.int64)
    for k, (gi, r) in enumerate(which):
        for x in stacks[gi][r].tolist():
            b = 0 if math.isnan(x) else (x - lo[k].item()) * 16 / (hi[k] - lo[k]).item()
            want[slots[k], int(min(max(b, 0), 15))] += 1
    assert torch.equal(eager, want) and torch.equal(scatter, want)
    assert eager.sum().item() == 4 * 200 + 7


def test_a_flush_decodes_its_steps_together_as_each_would_decode_alone():
    """History.add decodes a flush's record steps in one pass over columns
    (``decode_many``): every row equals ``decode`` of that step alone, bit for bit, on a
    model with a cell called per time step (calls), ReLU (zero, dead), a LayerNorm whose
    gain starts constant (grad_data appears only once its values spread) and a NaN batch."""
    from plumb.record import decode

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = nn.GRUCell(8, 16)
            self.fc = nn.Linear(16, 16)
            self.act = nn.ReLU()
            self.ln = nn.LayerNorm(16)
            self.out = nn.Linear(16, 4)

        def forward(self, x):
            h = torch.zeros(x.shape[0], 16)
            for t in range(x.shape[1]):
                h = self.cell(x[:, t], h)
            return self.out(self.ln(self.act(self.fc(h))))

    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.02)
    alone, snaps = [], []
    with Monitor(net, report=False, every=1, hist_every=5) as mon:
        for i in range(24):
            x = torch.randn(8, 5, 8)
            if i == 20:
                x[0, 0, 0] = float("nan")
            loss = net(x).logsumexp(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(loss)
            s = mon.snapshots[-1]
            snaps.append(s)
            alone.append(decode(s.step, s.layout, s.values.cpu().numpy()))
        mon.flush()
        together = mon.history.rows
    assert len(together) == len(alone) == 24
    has = ["grad_data" in r["param"]["ln.weight"] for r in together]
    assert not has[0] and any(has)  # the premise: a statistic present at some steps only
    assert together[0]["layer"]["cell"]["calls"] == 5
    assert any(math.isnan(r["layer"]["fc"]["mean"]) for r in together)
    for a, t in zip(alone, together, strict=True):
        t = {k: v for k, v in t.items() if k != "loss"}
        assert json.dumps(a) == json.dumps(t)  # values, NaNs and key order
        s = next(s for s in snaps if s.step == t["step"])
        want = _reference_row(s.step, s.layout, s.values.cpu().numpy())
        assert json.dumps(want) == json.dumps(t)  # the definitions, key by key


def _recorded(net, steps, batch, **cadence):
    """The snapshots and meta of ``steps`` SGD steps of ``net`` (loss: the logits'
    logsumexp) under a Monitor that does not flush by itself; ``batch(i)``: step i's input."""
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    with Monitor(net, report=False, flush_every=10**9, **cadence) as mon:
        for i in range(steps):
            loss = net(batch(i)).logsumexp(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(loss)
        return list(mon.snapshots), mon.meta()


def test_a_flush_builds_its_rows_without_a_garbage_collection():
    """The rows of a flush are dicts of floats (no cycles): the collector stays off while
    they are built (each ~700 allocations would set one off, and now and then a full one
    over the whole process), and is on again after, as it was."""
    import gc

    from plumb.record import History

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    runs: list[int] = []

    def seen(phase, info):
        if phase == "start":
            runs.append(info["generation"])

    snaps, meta = _recorded(net, 120, lambda i: torch.randn(8, 8), every=1, hist_every=10**9)
    history = History(meta)
    threshold = gc.get_threshold()
    gc.set_threshold(50, 10, 10)  # a collection every 50 allocations, were it on
    gc.collect()  # the counts from 0: the few allocations before the rows set off none
    gc.callbacks.append(seen)
    try:
        rows, _ = history.add(0, torch.zeros(120), snaps)
    finally:
        gc.callbacks.remove(seen)
        gc.set_threshold(*threshold)
    assert len(rows) == 120 and sum(len(r["layer"]) + len(r["param"]) for r in rows) > 1000
    # at most the one collection the counts owe when the collector is back on (~45 were
    # set off while the rows were built, before it was paused)
    assert len(runs) <= 1
    assert gc.isenabled()


def test_a_flush_files_each_histogram_under_its_key_when_the_keys_change():
    """History.add files a flush's histograms by runs of steps with the same keys: with a
    layer that runs on some steps only (the keys change from step to step), every key's
    steps, counts and ranges are the snapshots' own rows, and the sinks' new entries too."""
    from plumb.record import History

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(6, 12), nn.Linear(12, 12), nn.Linear(12, 3)
            self.act = nn.Tanh()
            self.use_b = True

        def forward(self, x):
            h = self.act(self.a(x))
            if self.use_b:
                h = self.act(self.b(h))
            return self.c(h)

    torch.manual_seed(0)
    net = Net()

    def batch(i):
        net.use_b = i % 6 < 3  # runs of 3 steps with the layer, 3 without
        return torch.randn(8, 6)

    snaps, meta = _recorded(net, 16, batch, every=1, hist_every=2)
    history = History(meta)
    _, new = history.add(0, torch.zeros(16), snaps)
    with_hist = [s for s in snaps if s.hist is not None]
    key_sets = {tuple(s.layout.hist_keys) for s in with_hist}
    assert len(with_hist) == 8 and len(key_sets) == 2  # the premise: the keys change
    want: dict[str, list] = {}
    for s in with_hist:
        for j, (section, name) in enumerate(s.layout.hist_keys):
            want.setdefault(f"{section}/{name}", []).append(
                (s.step, s.hist[j].numpy(), s.hist_range[j].float().numpy())
            )
    assert sorted(history.hists) == sorted(want) == sorted(new)
    for key, entries in want.items():
        h = history.hists[key]
        assert h["steps"] == [step for step, _, _ in entries] == [e[0] for e in new[key]]
        for (_, c, r), hc, hr, (_, nc, nr) in zip(
            entries, h["counts"], h["range"], new[key], strict=True
        ):
            assert hc.dtype == np.int32 and np.array_equal(hc, c) and np.array_equal(nc, c)
            assert np.array_equal(hr, r) and np.array_equal(nr, r)


def _reference_row(step, layout, values):
    """A record row by the definitions, key by key and statistic by statistic (what
    ``decode_many`` computes on whole arrays): ``summary``'s mean, std, rms, min, max and
    off of each key; grad:data = std(grad) / std(p) in float32, left out while std(p) <
    CONSTANT_SPREAD rms(p); update:data = log10(rms(update) / rms(p)); grad_carry =
    sqrt(carried) / |grad| (0 when |grad| = 0); calls first when > 1."""
    from plumb.kinds import RECTIFYING, SATURATING
    from plumb.record import CONSTANT_SPREAD, STAT_ORDER
    from plumb.stats import N_STATS, summary

    K = len(layout.keys)
    stats = values[: K * N_STATS].reshape(K, N_STATS)
    rest = values[K * N_STATS :]
    col = summary(stats)
    layer = {k: {} for k in layout.order}
    param = {k: {} for k in layout.params}
    norm = {}
    for i, ((section, name), calls) in enumerate(zip(layout.keys, layout.calls, strict=True)):
        v = {f: float(c[i]) for f, c in col.items()}
        if section == "layer":
            d = layer.setdefault(name, {})
            d.update((f, v[f]) for f in ("mean", "std", "min", "max"))
            kind = layout.kinds.get(name, "other")
            if kind in SATURATING + RECTIFYING:
                d["saturated" if kind in SATURATING else "zero"] = v["off"]
            if calls > 1:
                d["calls"] = calls
        elif section == "layer_grad":
            layer.setdefault(name, {}).update(grad_mean=v["mean"], grad_std=v["std"])
        elif section == "layer_in":
            layer.setdefault(name, {})["in_rms"] = v["rms"]
        elif section == "param":
            param.setdefault(name, {}).update(mean=v["mean"], std=v["std"], rms=v["rms"])
        elif section == "param_grad":
            param.setdefault(name, {}).update(grad_mean=v["mean"], grad_std=v["std"])
            norm[name] = math.sqrt(stats[i, 2] + stats[i, 0] * stats[i, 1] ** 2)
        else:
            param.setdefault(name, {})["update_rms"] = v["rms"]
    for j, name in enumerate(layout.dead):
        layer[name]["dead"] = float(rest[j])
    for d in param.values():
        std, rms = d.get("std", math.nan), d.get("rms", math.nan)
        if "grad_std" in d and ("rms" not in d or std >= CONSTANT_SPREAD * rms):
            d["grad_data"] = float(np.float32(d["grad_std"]) / np.float32(std))
        if "update_rms" in d:
            d["update_data"] = float(np.log10(d.pop("update_rms") / rms))
    for j, name in enumerate(layout.carry):
        total = norm.get(name, math.nan)
        carried = math.sqrt(rest[len(layout.dead) + j])
        param[name]["grad_carry"] = carried / total if total > 0 else 0.0

    def ordered(d):
        return {
            f: d[f]
            for f in [f for f in STAT_ORDER if f in d] + [f for f in d if f not in STAT_ORDER]
        }

    return {
        "step": step,
        "layer": {k: ordered(d) for k, d in layer.items()},
        "param": {k: ordered(d) for k, d in param.items() if d},
    }
