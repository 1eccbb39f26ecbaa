"""plumb under torch.distributed: 2 gloo ranks x batch B/2 record the statistics of
1 process x batch B on the same examples (DDP and FSDP2), and mixed precision records
unscaled gradients."""

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import plumb
from plumb.dist import clean_name, unwrap

B, STEPS, WORLD = 32, 4, 2


def _model() -> nn.Module:
    """A small net with every kind the statistics treat differently: tanh (saturation),
    ReLU (zeros, dead units), LayerNorm (a gain of ones), an output layer."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(12, 48),
        nn.Tanh(),
        nn.Linear(48, 48),
        nn.LayerNorm(48),
        nn.ReLU(),
        nn.Linear(48, 10),
    )


def _data():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(STEPS, B, 12, generator=g) * 2.0
    Y = torch.randint(0, 10, (STEPS, B), generator=g)
    return X, Y


def _train(model, mon_model, share: slice, out):
    X, Y = _data()
    opt = torch.optim.SGD(mon_model.parameters(), lr=0.5, momentum=0.9)
    with plumb.Monitor(mon_model, every=1, hist_every=1, out=out, report=False) as mon:
        for i in range(STEPS):
            loss = F.cross_entropy(mon_model(X[i, share]), Y[i, share])
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(loss)
    return mon


def _summary(mon) -> dict:
    h = mon.history
    hists = {k: [c.tolist() for c in v["counts"]] for k, v in h.hists.items()}
    return {"rows": h.rows, "hists": hists, "loss": h.loss.tolist()}


def _worker(rank: int, mode: str, init: str, result: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        model = _model()
        if mode == "doctor":
            _doctor_worker(rank, model, result)
            return
        if mode == "ddp":
            wrapped = nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard

            for layer in model:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer)
            wrapped = fully_shard(model)
        share = slice(rank * B // WORLD, (rank + 1) * B // WORLD)
        out = os.path.join(os.path.dirname(result), f"run{rank}")
        mon = _train(model, wrapped, share, out)
        if rank == 0:
            with open(result, "w") as f:
                json.dump(_summary(mon), f)
        # both ranks past every collective before either tears the group down: a rank
        # that destroys it while its peer's gloo threads still talk to it aborts the
        # peer ("terminate called without an active exception", seen once under load
        # in the FSDP2 case)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _doctor_worker(rank: int, model: nn.Module, result: str) -> None:
    """diagnose() and the in-loop doctor on a DDP model whose ranks see different data
    (rank 1's inputs 4x larger): every rank must end with the same findings."""
    ddp = nn.parallel.DistributedDataParallel(model)
    X, Y = _data()
    share = slice(rank * B // WORLD, (rank + 1) * B // WORLD)
    scale = 1.0 + 3.0 * rank

    def batch(i=[0]):  # noqa: B006 - a counter
        i[0] += 1
        return X[i[0] % STEPS, share] * scale, Y[i[0] % STEPS, share]

    opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
    diag = plumb.diagnose(ddp, batch, F.cross_entropy, opt, steps=20)
    out = os.path.join(os.path.dirname(result), f"mon{rank}")
    with plumb.Monitor(ddp, every=1, doctor=True, check_every=5, out=out) as mon:
        for _ in range(12):
            x, y = batch()
            loss = F.cross_entropy(ddp(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(loss)
    with open(f"{result}.{rank}", "w") as f:
        json.dump({"diagnose": diag.to_dict(), "monitor": mon.diagnosis.to_dict()}, f)


def _spawn(mode: str, tmp) -> dict:
    result = os.path.join(tmp, "result.json")
    init = "file://" + os.path.join(tmp, "rendezvous")
    mp.start_processes(_worker, args=(mode, init, result), nprocs=WORLD, start_method="spawn")
    with open(result) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def single():
    model = _model()
    return json.loads(json.dumps(_summary(_train(model, model, slice(0, B), None))))


def _close(a: float, b: float, scale: float) -> bool:
    if not (math.isfinite(a) and math.isfinite(b)):
        return (a != a and b != b) or a == b
    return abs(a - b) <= 1e-5 * max(abs(b), scale) + 1e-12


def _compare(got: dict, want: dict, skip: tuple[str, ...] = ()) -> int:
    assert len(got["rows"]) == len(want["rows"]) == STEPS
    assert np.allclose(got["loss"], want["loss"], rtol=1e-5)
    checked = 0
    for rg, rw in zip(got["rows"], want["rows"], strict=True):
        for section in ("layer", "param"):
            assert set(rg[section]) == set(rw[section]), section
            for name, w in rw[section].items():
                g = rg[section][name]
                assert set(g) - set(skip) == set(w) - set(skip), (name, set(g) ^ set(w))
                for stat, v in w.items():
                    if isinstance(v, list | dict) or stat in skip:
                        continue
                    # a mean or grad mean is judged against its std (near-zero means)
                    scale = w.get("grad_std" if stat.startswith("grad") else "std", 0.0)
                    assert _close(g[stat], v, abs(scale)), (rw["step"], section, name, stat)
                    checked += 1
    assert got["hists"].keys() == want["hists"].keys()
    for k in want["hists"]:
        assert got["hists"][k] == want["hists"][k], k
    return checked


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_ranks_record_the_global_step(single, mode):
    with tempfile.TemporaryDirectory() as tmp:
        got = _spawn(mode, tmp)
        assert os.path.exists(os.path.join(tmp, "run0", "probes", "meta.json"))
        assert not os.path.exists(os.path.join(tmp, "run1"))  # only rank 0 writes
    checked = _compare(got, single)
    assert checked > 300
    row = got["rows"][-1]
    # the statistics that matter are there, under the model's own names
    assert {"0", "1", "2", "3", "4", "5"} <= set(row["layer"])
    assert "saturated" in row["layer"]["1"] and "zero" in row["layer"]["4"]
    assert "grad_data" in row["param"]["2.weight"] and "update_data" in row["param"]["2.weight"]


def test_gradient_accumulation_records_the_whole_optimizer_step(single):
    """k micro-batches per optimizer step, mon.step after it: activations of all k are
    pooled (calls = k) and the gradients are the accumulated ones, so the record equals
    one batch of k times the size."""
    k = 4
    model = _model()
    X, Y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    with plumb.Monitor(model, every=1, hist_every=1, doctor=True, report=False) as mon:
        for i in range(STEPS):
            opt.zero_grad()
            total = 0.0
            for j in range(k):
                part = slice(j * B // k, (j + 1) * B // k)
                loss = F.cross_entropy(model(X[i, part]), Y[i, part]) / k
                loss.backward()
                total += loss.detach()
            opt.step()
            mon.step(total)
    got = json.loads(json.dumps(_summary(mon)))
    assert got["rows"][0]["layer"]["1"]["calls"] == k
    assert _compare(got, single, skip=("calls",)) > 300
    assert "gradients-accumulating" not in mon.diagnosis.codes


def test_doctor_findings_agree_across_ranks():
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.json")
        init = "file://" + os.path.join(tmp, "rendezvous")
        mp.start_processes(
            _worker, args=("doctor", init, result), nprocs=WORLD, start_method="spawn"
        )
        got = [json.loads(Path(f"{result}.{r}").read_text()) for r in range(WORLD)]
        assert os.path.exists(os.path.join(tmp, "mon0", "report.html"))
        assert os.path.exists(os.path.join(tmp, "mon0", "findings.json"))
        assert not os.path.exists(os.path.join(tmp, "mon1"))
    for part in ("diagnose", "monitor"):
        a, b = (g[part] for g in got)
        a.pop("seconds", None), b.pop("seconds", None)
        assert a == b, part
    assert got[0]["diagnose"]["steps"] == 20 and got[0]["diagnose"]["suggested_lr"] is not None


def test_names_drop_the_wrappers():
    m = _model()
    assert unwrap(torch.compile(m)) is m
    assert clean_name("_fsdp_wrapped_module.0._checkpoint_wrapped_module.weight") == "0.weight"


def _amp_loop(scaler_scale: float | None, poison: int | None = None):
    model = _model()
    X, Y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = None
    if scaler_scale is not None:
        scaler = torch.amp.GradScaler("cpu", init_scale=scaler_scale, growth_interval=1000)
    with plumb.Monitor(model, every=1, scaler=scaler, doctor=True, report=False) as mon:
        for i in range(STEPS):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=scaler is not None):
                loss = F.cross_entropy(model(X[i]), Y[i])
            opt.zero_grad()
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                if i == poison:  # an overflow in one gradient: the scaler skips this step
                    model[0].weight.grad[0, 0] = float("inf")
                scaler.step(opt)
                scaler.update()
            mon.step(loss)
    return mon


def test_mixed_precision_records_unscaled_gradients_and_skipped_steps():
    plain = _amp_loop(None).history.rows
    amp = _amp_loop(2.0**16).history.rows
    # bf16 autocast changes the values a little; a missing unscale would be 65536x off
    for name in ("1", "4", "5"):
        g, w = amp[0]["layer"][name]["grad_std"], plain[0]["layer"][name]["grad_std"]
        assert 0.8 < g / w < 1.25, (name, g, w)
    for name in ("0.weight", "5.weight"):
        g, w = amp[0]["param"][name]["grad_std"], plain[0]["param"][name]["grad_std"]
        assert 0.8 < g / w < 1.25, (name, g, w)
    mon = _amp_loop(2.0**16, poison=1)
    rows = mon.history.rows
    assert [r.get("skipped", False) for r in rows] == [False, True, False, False]
    assert "non-finite" not in mon.diagnosis.codes
    assert all(math.isfinite(r["layer"]["1"]["grad_std"]) for r in rows)


# --- plumb train on several processes ------------------------------------------------------
def _plumb(*args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "plumb", "train", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        **kw,
    )


FLAGS = ("--samples", "0", "--no-report", "--no-progress", "--threads", "1", "--engine", "eager")


def _losses(run) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(Path(run) / "losses.safetensors"))["loss"]


def _weights(run) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(run) / "model.safetensors"))


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """lecture-deep (BatchNorm: synchronised over the ranks) for 200 steps on 2 ranks,
    the same run in two halves (100, then --resume to 200), and 1 process."""
    root = tmp_path_factory.mktemp("ddp")
    full, half = root / "full", root / "half"
    decay = ("--lr-decay-step", "150000")  # one schedule for both halves and the whole
    r = _plumb("--nproc", "2", "--steps", "200", "--out", str(full), *FLAGS, *decay)
    assert r.returncode == 0, r.stderr
    r = _plumb("--nproc", "2", "--steps", "100", "--out", str(half), *FLAGS, *decay)
    assert r.returncode == 0, r.stderr
    r = _plumb("--nproc", "2", "--resume", str(half), "--steps", "200", *FLAGS[:4])
    assert r.returncode == 0, r.stderr
    from plumb.models import preset_config
    from plumb.pipeline import train_run
    from plumb.train import TrainConfig

    one = root / "one"
    train_run(
        preset_config("lecture-deep"),
        TrainConfig(steps=200, threads=1, engine="eager"),
        one,
        progress=False,
        samples=0,
        report=False,
    )
    return full, half, one, r


def test_two_ranks_train_as_one_process(ddp_runs):
    full, _, one, _ = ddp_runs
    a, b = _losses(full), _losses(one)
    assert a.shape == b.shape == (200,)
    rel = ((a - b).abs() / b.abs()).max().item()
    assert rel < 1e-4, rel
    m = json.loads((full / "metrics.json").read_text())
    m1 = json.loads((one / "metrics.json").read_text())
    for split, v in m1["loss"].items():
        assert m["loss"][split] == pytest.approx(v, rel=1e-4)
    assert (full / "probes" / "meta.json").is_file() and (full / "checkpoint.safetensors").is_file()


def test_two_ranks_resume_bit_exactly(ddp_runs):
    full, half, _, r = ddp_runs
    assert "resuming" in r.stdout and r.stdout.count("plumb: resuming") == 1  # rank 0 prints
    assert torch.equal(_losses(full), _losses(half))
    wf, wh = _weights(full), _weights(half)
    assert wf.keys() == wh.keys() and all(torch.equal(wf[k], wh[k]) for k in wf)


def _start(out, *extra):
    return subprocess.Popen(
        [
            *(sys.executable, "-m", "plumb", "train", "--nproc", "2", "--steps", "200000"),
            *("--out", str(out), "--checkpoint-every", "20", *FLAGS, *extra),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_checkpoint(out, proc, timeout=120.0):
    t0 = time.monotonic()
    while not (Path(out) / "checkpoint.safetensors").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < timeout
        time.sleep(0.1)


def _ranks(launcher_pid: int) -> list[int]:
    kids = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
    return [int(k) for k in kids]


def test_sigterm_to_the_launcher_stops_every_rank_with_a_checkpoint(tmp_path):
    from plumb.checkpoint import read_checkpoint

    out = tmp_path / "run"
    proc = _start(out)
    _wait_for_checkpoint(out, proc)
    ranks = _ranks(proc.pid)
    assert len(ranks) == 2
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    ck = read_checkpoint(out)
    assert ck.state["status"] == "interrupted" and ck.step > 0
    assert "Traceback" not in stderr and "interrupted after step" in stderr
    assert all(not Path(f"/proc/{pid}").exists() for pid in ranks)


def test_a_rank_that_dies_brings_the_run_down_in_one_line(tmp_path):
    from plumb.checkpoint import read_checkpoint

    out = tmp_path / "run"
    proc = _start(out)
    _wait_for_checkpoint(out, proc)
    ranks = _ranks(proc.pid)
    os.kill(ranks[1], signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert lines == [lines[-1]] and lines[-1].startswith("plumb: error: rank 1 of 2 was killed")
    assert read_checkpoint(out).step > 0  # the last good checkpoint reads and verifies
