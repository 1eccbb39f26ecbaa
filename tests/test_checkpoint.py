"""Runs that survive: checkpoints, exact resume, signals, kill -9, divergence, hostile
checkpoints and data (fuzzed), the run-directory lock, and failing disks."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hyp import examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from plumb import io as plumb_io
from plumb.checkpoint import CHECKPOINT, read_checkpoint, save_checkpoint
from plumb.cli import main
from plumb.data import load_dataset
from plumb.errors import PlumbError
from plumb.guard import RunLock
from plumb.models import preset_config
from plumb.pipeline import train_run
from plumb.train import TrainConfig

SMALL = ["--n-layers", "2", "--n-hidden", "24", "--threads", "1"]
QUIET = ["--no-progress", "--samples", "0", "--print-every", "100000"]
RESUME_QUIET = ["--no-progress", "--samples", "0"]


def small_cfgs(steps: int, **train):
    model = preset_config("lecture-deep", n_layers=2, n_hidden=24)
    return model, TrainConfig(
        steps=steps, threads=1, checkpoint_every=20, print_every=10**6, **train
    )


def same_files(a: Path, b: Path, names=("losses.safetensors", "model.safetensors")) -> None:
    for name in names:
        x, y = load_file(a / name), load_file(b / name)
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), (name, k)


def plumb_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "plumb.cli", *args]


# --- checkpoints and exact resume -------------------------------------------------


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_resume_is_bit_exact(tmp_path, optimizer):
    lr = 0.1 if optimizer == "sgd" else 1e-3
    model, cfg = small_cfgs(120, optimizer=optimizer, lr=lr)
    train_run(model, cfg, tmp_path / "straight", progress=False, samples=0, report=False)
    model, half = small_cfgs(60, optimizer=optimizer, lr=lr)
    train_run(model, half, tmp_path / "split", progress=False, samples=0, report=False)
    assert read_checkpoint(tmp_path / "split").step == 60
    run = train_run(
        None, None, tmp_path / "split", progress=False, samples=0, report=False, resume=True,
        steps=120,
    )  # fmt: skip
    assert run.resumed_from == 60 and run.status == "complete"
    same_files(tmp_path / "straight", tmp_path / "split")
    ckpt = read_checkpoint(tmp_path / "split")
    assert ckpt.step == 120 and ckpt.state["status"] == "complete"
    # the probe record continues: the same record steps as the straight run
    from plumb.record import load_run

    a, b = load_run(tmp_path / "straight"), load_run(tmp_path / "split")
    assert [r["step"] for r in a.rows] == [r["step"] for r in b.rows]
    assert a.rows[-1]["param"] == b.rows[-1]["param"]


def test_weight_average_survives_a_stop_and_resume_bit_exact(tmp_path, monkeypatch):
    """A run averaging its weights (SWA), stopped half-way through the averaging (a
    signal after step 70) and resumed, ends with the same averaged weights, recalibrated
    BatchNorm statistics and losses as the run never stopped: the mean travels in the
    checkpoint."""
    import itertools

    from plumb.guard import StopSignals

    model, cfg = small_cfgs(120, average_from=40, average_every=10)
    straight = train_run(model, cfg, tmp_path / "straight", progress=False, samples=0, report=False)
    assert straight.result.averaged == 8  # steps 40, 50, ..., 110
    assert straight.metrics["averaged_iterates"] == 8 and straight.metrics["bn_calibrated"]
    # the recalibration's training-mode, no-grad pass is plumb's own: not a finding
    findings = json.loads((tmp_path / "straight" / "findings.json").read_text())["findings"]
    assert not [f for f in findings if f["code"].startswith("batchnorm-")]
    calls = itertools.count(1)
    monkeypatch.setattr(StopSignals, "requested", lambda self: next(calls) >= 71)
    model, cfg = small_cfgs(120, average_from=40, average_every=10)
    stopped = train_run(model, cfg, tmp_path / "split", progress=False, samples=0, report=False)
    assert stopped.status == "interrupted" and stopped.result.averaged == 0
    assert read_checkpoint(tmp_path / "split").step == 71
    monkeypatch.undo()
    run = train_run(
        None, None, tmp_path / "split", progress=False, samples=0, report=False, resume=True
    )
    assert run.resumed_from == 71 and run.result.averaged == 8
    same_files(tmp_path / "straight", tmp_path / "split")


def test_checkpoint_every_and_previous_kept(tmp_path, monkeypatch):
    written = []
    real = save_checkpoint

    def spy(*args, **kw):
        written.append(kw["step"])
        return real(*args, **kw)

    monkeypatch.setattr("plumb.pipeline.save_checkpoint", spy)
    model, cfg = small_cfgs(70)
    train_run(model, cfg, tmp_path / "r", progress=False, samples=0, report=False)
    assert written == [20, 40, 60, 70]
    ckpt = read_checkpoint(tmp_path / "r")
    assert set(ckpt.model_state()) == set(load_file(tmp_path / "r" / "model.safetensors"))
    # no temporary files left behind
    assert not [p for p in (tmp_path / "r").iterdir() if p.name.endswith(".tmp")]


def test_resume_cli_errors(tmp_path, capsys):
    assert main(["train", *SMALL, *QUIET, "--steps", "30", "--out", str(tmp_path / "r")]) == 0
    cases = [
        (["train", "--resume", str(tmp_path / "r"), "--steps", "10"], "below the 30 steps"),
        (["train", "--resume", str(tmp_path / "r"), "--lr", "0.5"], "drop --lr"),
        (["train", "--resume", str(tmp_path / "nope")], "does not exist"),
        (["train", *SMALL, "--steps", "5", "--out", str(tmp_path / "r")], "already holds a run"),
        (["train", "--checkpoint-every", "0", "--out", str(tmp_path / "x")], "--checkpoint-every"),
    ]
    before = (tmp_path / "r" / CHECKPOINT).read_bytes()
    for argv, message in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (argv, err)
    assert (tmp_path / "r" / CHECKPOINT).read_bytes() == before
    assert not (tmp_path / "x").exists()


def test_resume_refuses_changed_data(tmp_path, capsys):
    data = tmp_path / "words.txt"
    data.write_text("\n".join(["anna", "bob", "carla", "dave", "eve"] * 20) + "\n")
    assert main(["train", *SMALL, *QUIET, "--steps", "10", "--data", str(data), "--out", str(tmp_path / "r")]) == 0  # fmt: skip
    data.write_text("something else\n" * 50)
    assert main(["train", "--resume", str(tmp_path / "r"), "--steps", "20"]) == 2
    assert "sha256 differs" in capsys.readouterr().err


# --- divergence ---------------------------------------------------------------------

DIVERGE = ["--norm", "none", "--no-out-norm", "--activation", "linear", "--lr", "1e4"]


def test_nonfinite_stops_with_finding_and_keeps_checkpoint(tmp_path, capsys):
    out = tmp_path / "r"
    argv = ["train", *SMALL, *QUIET, *DIVERGE, "--steps", "50", "--checkpoint-every", "1"]
    assert main([*argv, "--out", str(out)]) == 3
    err = capsys.readouterr().err
    assert "non-finite" in err and "last good checkpoint" in err
    import json

    findings = json.loads((out / "findings.json").read_text())
    first = findings["findings"][0]
    assert first["code"] == "non-finite" and first["where"].startswith("layers.")
    ckpt = read_checkpoint(out)
    stopped = json.loads((out / "metrics.json").read_text())
    assert stopped["stopped"] == "nonfinite" and ckpt.step == stopped["steps"]
    assert all(torch.isfinite(v).all() for v in ckpt.model_state().values())
    assert "This run ended early" in (out / "report.html").read_text()


def test_nonfinite_skip(tmp_path):
    out = tmp_path / "r"
    argv = ["train", *SMALL, *QUIET, *DIVERGE, "--steps", "20", "--on-nonfinite", "skip"]
    assert main([*argv, "--out", str(out)]) == 0
    import json

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 20 and metrics["skipped_steps"]
    assert read_checkpoint(out).step == 20


# --- signals and kill -9 (real processes) --------------------------------------------


def _wait_for_checkpoint(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while not (path / CHECKPOINT).exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout
        time.sleep(0.05)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_checkpoints_reports_and_resumes(tmp_path, sig, code):
    steps = "4000"
    ref = tmp_path / "ref"
    argv = ["train", *SMALL, *QUIET, "--no-probes", "--checkpoint-every", "100", "--steps", steps]
    out = tmp_path / "run"
    proc = subprocess.Popen(
        plumb_cmd(*argv, "--out", str(out)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_checkpoint(out, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert f"plumb train --resume {out}" in err and "Traceback" not in err
    ckpt = read_checkpoint(out)
    assert ckpt.state["status"] == "interrupted" and 0 < ckpt.step < 4000
    assert (out / "metrics.json").is_file() and not (out / ".lock").exists()
    assert main(["train", "--resume", str(out), *RESUME_QUIET]) == 0
    assert main([*argv, "--out", str(ref)]) == 0
    same_files(ref, out)


@pytest.mark.slow
def test_kill9_at_random_moments_always_resumes(tmp_path):
    """20 kill -9 at random moments of training (after the first checkpoint, up to and
    past the end): every checkpoint left behind loads, and every resumed run ends
    bit-identical to one never interrupted."""
    argv = ["train", *SMALL, *QUIET, "--no-probes", "--checkpoint-every", "25", "--steps", "3000"]
    ref = tmp_path / "ref"
    assert main([*argv, "--out", str(ref)]) == 0
    # the window the kills fall in: how long a run goes on after its first checkpoint
    # (measured, not the whole in-process run: with the step in C, training is a small
    # part of it, and most kills landed after the end)
    probe = tmp_path / "probe"
    proc = subprocess.Popen(plumb_cmd(*argv, "--out", str(probe)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    _wait_for_checkpoint(probe, proc)
    t0 = time.time()
    proc.wait()
    span = 1.1 * (time.time() - t0)  # up to and a little past the end
    rng = random.Random(1234)
    kill_points = []
    for k in range(20):
        out = tmp_path / f"k{k}"
        proc = subprocess.Popen(plumb_cmd(*argv, "--out", str(out)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        _wait_for_checkpoint(out, proc)
        time.sleep(rng.uniform(0, span))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ckpt = read_checkpoint(out)  # never a checkpoint that fails to load
        kill_points.append(ckpt.step)
        assert main(["train", "--resume", str(out), *RESUME_QUIET]) == 0  # stale lock taken over
        same_files(ref, out)
    print("checkpoint steps at the kills:", kill_points)
    assert len(set(kill_points)) > 5  # the kills landed at many different moments


# --- the lock ------------------------------------------------------------------------


def test_lock_refuses_a_second_run_and_takes_over_a_stale_one(tmp_path, capsys):
    out = tmp_path / "r"
    with RunLock(out):
        assert main(["train", *SMALL, *QUIET, "--steps", "5", "--out", str(out)]) == 2
        assert f"{out} is in use by plumb (pid {os.getpid()}" in capsys.readouterr().err
    assert not (out / ".lock").exists()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (out / ".lock").write_text(f'{{"host": "{os.uname().nodename}", "pid": {dead.pid}}}')
    assert main(["train", *SMALL, *QUIET, "--steps", "5", "--out", str(out)]) == 0
    assert not (out / ".lock").exists()


def test_two_processes_on_one_directory(tmp_path):
    out = tmp_path / "r"
    # long enough to still run when the second starts (SIGTERM ends it): ~0.1 ms a step
    argv = [
        "train",
        *SMALL,
        *QUIET,
        "--no-probes",
        "--steps",
        "1000000",
        "--checkpoint-every",
        "500",
    ]
    first = subprocess.Popen(plumb_cmd(*argv, "--out", str(out)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        _wait_for_checkpoint(out, first)
        second = subprocess.run(plumb_cmd(*argv, "--out", str(out)), capture_output=True, text=True)
        assert second.returncode == 2
        assert "is in use by plumb" in second.stderr and second.stderr.count("\n") == 1
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)
    read_checkpoint(out)


# --- hostile checkpoints ---------------------------------------------------------------


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> bytes:
    out = tmp_path_factory.mktemp("good")
    model, cfg = small_cfgs(20, probes=False)
    train_run(model, cfg, out, progress=False, samples=0, report=False)
    return (out / CHECKPOINT).read_bytes()


def _resume_error(tmp_path: Path, payload: bytes, capsys) -> str:
    out = tmp_path / "bad"
    out.mkdir(exist_ok=True)
    (out / CHECKPOINT).write_bytes(payload)
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--steps", "30"]) == 2
    assert (out / CHECKPOINT).read_bytes() == payload  # nothing overwritten
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


def test_hostile_checkpoints_one_line_errors(tmp_path, good_checkpoint, capsys):
    g = good_checkpoint
    n = int.from_bytes(g[:8], "little")
    flipped = bytearray(g)
    flipped[-5] ^= 0x10  # a bit in the tensor data
    assert "empty or truncated" in _resume_error(tmp_path, b"", capsys)
    assert "truncated" in _resume_error(tmp_path, g[: len(g) // 2], capsys)
    assert "checksum" in _resume_error(tmp_path, bytes(flipped), capsys)
    liar = (n + 10**6).to_bytes(8, "little") + g[8:]
    assert "claims" in _resume_error(tmp_path, liar, capsys)
    assert "not a usable" in _resume_error(tmp_path, os.urandom(4096), capsys)


def test_checkpoint_from_another_config(tmp_path, capsys):
    out = tmp_path / "a"
    model, cfg = small_cfgs(20, probes=False)
    train_run(model, cfg, out, progress=False, samples=0, report=False)
    ckpt = read_checkpoint(out)
    other = preset_config("lecture-deep", n_layers=3, n_hidden=24)
    from plumb.models import MLP

    bigger = MLP(other)
    state = dict(ckpt.state)
    save_checkpoint(
        tmp_path / "b",
        model=bigger,
        optimizer=torch.optim.SGD(bigger.parameters(), lr=0.1),
        generator=torch.Generator(),
        step=ckpt.step,
        losses=ckpt.losses,
        config=state["config"],  # claims the small config, holds the bigger model
    )
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "b"), "--steps", "30"]) == 2
    assert "another run" in capsys.readouterr().err


# --- fuzz: the checkpoint loader and the data loader -----------------------------------

FUZZ = settings(
    max_examples=examples(10_000),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    database=None,
)


@FUZZ
@given(data=st.data())
def test_fuzz_checkpoint_loader(tmp_path_factory, good_checkpoint, data):
    """Random bytes, or a good checkpoint cut, bit-flipped or overwritten: a load or a
    PlumbError, never another exception."""
    g = good_checkpoint
    kind = data.draw(st.sampled_from(["random", "truncate", "flip", "splice"]))
    if kind == "random":
        payload = data.draw(st.binary(max_size=512))
    elif kind == "truncate":
        payload = g[: data.draw(st.integers(0, len(g) - 1))]
    elif kind == "flip":
        b = bytearray(g)
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(b) - 1))
            b[i] ^= 1 << data.draw(st.integers(0, 7))
        payload = bytes(b)
    else:
        i = data.draw(st.integers(0, len(g)))
        payload = g[:i] + data.draw(st.binary(max_size=64)) + g[i + 1 :]
    path = _fuzz_dir(tmp_path_factory) / CHECKPOINT
    path.write_bytes(payload)
    try:
        read_checkpoint(path)
    except PlumbError as e:
        assert "\n" not in str(e)


@FUZZ
@given(
    lines=st.lists(
        st.one_of(st.text(max_size=30), st.binary(max_size=30).map(lambda b: b.decode("latin-1"))),
        max_size=30,
    ),
    raw=st.binary(max_size=300),
    use_raw=st.booleans(),
    block=st.integers(1, 6),
)
def test_fuzz_data_loader(tmp_path_factory, lines, raw, use_raw, block):
    path = _fuzz_dir(tmp_path_factory) / "data.txt"
    if use_raw:
        path.write_bytes(raw)
    else:
        path.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
    try:
        data = load_dataset(path, block_size=block)
    except PlumbError as e:
        assert "\n" not in str(e)
    else:
        assert data.vocab.size >= 2 and data.train.X.shape[1] == block


_FUZZ_DIR: list[Path] = []


def _fuzz_dir(factory) -> Path:
    if not _FUZZ_DIR:
        _FUZZ_DIR.append(factory.mktemp("fuzz"))
    return _FUZZ_DIR[0]


# --- failing disks ---------------------------------------------------------------------


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_failed_write_keeps_previous_checkpoint(tmp_path, good_checkpoint, monkeypatch, err):
    out = tmp_path / "r"
    out.mkdir()
    (out / CHECKPOINT).write_bytes(good_checkpoint)
    ckpt = read_checkpoint(out)

    real_fdopen = os.fdopen

    class HalfWritten:  # the disk fills up half-way through the new file
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, payload):
            self.f.write(payload[: len(payload) // 2])
            raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: HalfWritten(real_fdopen(fd, *a, **k)))
    from plumb.models import MLP

    model = MLP(preset_config("lecture-deep", n_layers=2, n_hidden=24))
    with pytest.raises(PlumbError, match="previous checkpoint is intact"):
        save_checkpoint(
            out,
            model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            generator=torch.Generator(),
            step=ckpt.step,
            losses=ckpt.losses,
            config=ckpt.state["config"],
        )
    monkeypatch.undo()
    assert (out / CHECKPOINT).read_bytes() == good_checkpoint
    assert [p.name for p in out.iterdir()] == [CHECKPOINT]  # the temp file is gone


def test_read_only_run_directory(tmp_path, good_checkpoint, capsys, monkeypatch):
    """A run directory on a read-only filesystem (EROFS injected at os.open for writes
    under it, so the test means the same as root, who ignores permission bits): one
    error line naming the cause, exit 2, the checkpoint untouched, nothing else written."""
    out = tmp_path / "r"
    out.mkdir()
    (out / CHECKPOINT).write_bytes(good_checkpoint)
    real_open = os.open
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT

    def read_only(path, flags, *args, **kwargs):
        if str(path).startswith(str(out)) and flags & writes:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    assert main(["train", "--resume", str(out), "--steps", "30", *RESUME_QUIET]) == 2
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Read-only file system" in err and "permissions" in err
    assert (out / CHECKPOINT).read_bytes() == good_checkpoint
    assert [p.name for p in out.iterdir()] == [CHECKPOINT]


def test_atomic_write_failure_leaves_old_file(tmp_path, monkeypatch):
    path = tmp_path / "f.json"
    plumb_io.write_json(path, {"a": 1})
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(errno.EIO, "io")))
    with pytest.raises(OSError):
        plumb_io.write_json(path, {"a": 2})
    monkeypatch.undo()
    assert plumb_io.read_json(path) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_disk_full_during_training(tmp_path, monkeypatch, capsys):
    """The second checkpoint write fails (ENOSPC): one error line, exit 2, the first
    checkpoint still loads, and the run resumes from it to the same end."""
    import plumb.checkpoint as ck

    real, calls = ck.atomic_write_bytes, []

    def flaky(path, payload):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, payload)

    monkeypatch.setattr(ck, "atomic_write_bytes", flaky)
    argv = ["train", *SMALL, *QUIET, "--no-probes", "--steps", "60", "--checkpoint-every", "20"]
    out = tmp_path / "r"
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1 and "No space left" in err and "previous checkpoint is intact" in err
    )
    monkeypatch.undo()
    assert read_checkpoint(out).step == 20
    assert not (out / ".lock").exists()
    assert main(["train", "--resume", str(out), *RESUME_QUIET]) == 0
    assert main([*argv, "--out", str(tmp_path / "ref")]) == 0
    same_files(tmp_path / "ref", out)


def test_finite_check_sees_any_bad_gradient_and_changes_nothing():
    from plumb.models import MLP
    from plumb.train import _finite

    model = MLP(preset_config("lecture-deep", n_layers=2, n_hidden=24))
    loss = torch.nn.functional.cross_entropy(model(torch.randint(0, 27, (8, 3))), torch.arange(8))
    loss.backward()
    params = list(model.parameters())
    before = [p.grad.clone() for p in params]
    assert _finite(loss, params)
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before, strict=True))
    for bad in (float("nan"), float("inf"), -float("inf")):
        params[3].grad.view(-1)[0] = bad
        assert not _finite(loss, params)
        params[3].grad.view(-1)[0] = 0.0
    assert not _finite(torch.tensor(float("nan")), params)


def test_every_file_gets_the_mode_a_plain_open_gives(tmp_path):
    """0666 minus the umask for everything plumb writes (the atomic writer's temp file
    is 0600), so a report on a web server or a run on a shared disk can be read. The
    umask 002 makes the expected 0664 differ from both 0600 and 0644."""
    old = os.umask(0o002)
    try:
        out = tmp_path / "run"
        args = ["train", "--steps", "60", "--out", str(out), "--samples", "2", "--no-progress"]
        assert main([*args, "--tensorboard", "--probe-every", "10"]) == 0
        files = [p for p in out.rglob("*") if p.is_file()]
        assert len(files) > 10 and any(p.suffix == ".html" for p in files)
        modes = {str(p.relative_to(out)): oct(p.stat().st_mode & 0o777) for p in files}
        assert set(modes.values()) == {oct(0o664)}, modes
    finally:
        os.umask(old)


def test_validation_during_training_survives_resume(tmp_path):
    """--eval-every: the val loss in eval mode at every N steps and at the end, in
    metrics.json (curve and best), val.json and the report; a resumed run continues
    the same curve, bit for bit."""
    # one lr schedule for both (a decay scaled to each run's own --steps would differ)
    flags = ["--samples", "0", "--no-progress", "--threads", "1", "--eval-every", "50", "--lr-decay-step", "150000"]  # fmt: skip
    full, half = tmp_path / "full", tmp_path / "half"
    assert main(["train", "--steps", "200", "--out", str(full), *flags]) == 0
    assert main(["train", "--steps", "100", "--out", str(half), *flags]) == 0
    assert main(["train", "--resume", str(half), "--steps", "200", "--samples", "0"]) == 0
    m = json.loads((full / "metrics.json").read_text())
    curve = m["val_curve"]
    assert curve["steps"] == [50, 100, 150, 200]
    assert curve["loss"][-1] == m["loss"]["val"]  # the last evaluation is the final model's
    assert curve["loss"][0] > curve["loss"][-1]  # it learns
    best = min(range(4), key=lambda i: curve["loss"][i])
    assert m["best_val"] == {"step": curve["steps"][best], "loss": curve["loss"][best]}
    assert json.loads((full / "val.json").read_text())["val"] == [
        list(p) for p in zip(curve["steps"], curve["loss"], strict=True)
    ]
    assert json.loads((half / "metrics.json").read_text())["val_curve"] == curve
    assert "best validation loss during training" in (full / "report.html").read_text()
    with pytest.raises(PlumbError, match="--eval-every"):
        TrainConfig(eval_every=0)
