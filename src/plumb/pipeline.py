"""End-to-end jobs the CLI offers, as plain Python calls: train a run and save it,
evaluate a saved run, sample from it."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from plumb._version import __version__
from plumb.checkpoint import CHECKPOINT, Checkpoint, read_checkpoint, restore, save_checkpoint
from plumb.data import Dataset, load_dataset
from plumb.dist import world
from plumb.doctor import Diagnosis, Finding, check_cadence, diagnose
from plumb.doctor.rules import nonfinite_finding
from plumb.errors import PlumbError
from plumb.guard import RunLock, StopSignals
from plumb.io import sha256_file, write_json
from plumb.models import MLP, ModelConfig
from plumb.monitor import Monitor
from plumb.record import History
from plumb.report import write_report
from plumb.report.tensorboard import TensorBoardSink
from plumb.runs import Run, mark_finished, save_run
from plumb.sample import sample
from plumb.train import (
    Callbacks,
    Resume,
    TrainConfig,
    TrainResult,
    calibrate_batchnorm,
    make_optimizer,
    resolve_device,
    split_loss,
    train,
    use_threads,
)

VAL_FILE = "val.json"  # the validation curve so far (step, loss), while the run trains


@dataclass
class TrainedRun:
    out: Path
    model: MLP
    data: Dataset
    result: TrainResult
    metrics: dict[str, Any]
    samples: list[tuple[str, str]]
    status: str = "complete"  # complete | interrupted | diverged
    exit_code: int = 0  # 0; 130/143 after SIGINT/SIGTERM; 3 after a non-finite step
    resumed_from: int = 0  # the checkpoint's step, when resumed
    nonfinite: Finding | None = None  # the doctor's finding for the step that diverged


def check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise PlumbError(f"--out {out} exists and is not a directory: choose another path")


def build(
    model_cfg: ModelConfig, train_cfg: TrainConfig, data_path: str | Path | None = None
) -> tuple[Dataset, MLP, torch.device, torch.Generator]:
    """Load the data, then build the model (vocab size from the data) on the configured
    device from the seed's generator, which the batches then continue to draw from."""
    data = load_dataset(data_path, block_size=model_cfg.block_size)
    model_cfg = dataclasses.replace(model_cfg, vocab_size=data.vocab.size)  # validates again
    train_cfg.validate()
    device = resolve_device(train_cfg.device)  # (threads: train sets them)
    g = torch.Generator().manual_seed(train_cfg.seed)
    return data, MLP(model_cfg, g).to(device), device, g


def resume_configs(
    out: Path, steps: int | None = None, data_path: str | Path | None = None
) -> tuple[Checkpoint, ModelConfig, TrainConfig, str]:
    """The checkpoint of run ``out`` and the configs and data file to continue it with
    (to ``steps`` in all, default: the run's own total)."""
    ckpt = read_checkpoint(out)
    cfg = ckpt.state["config"]
    try:
        model_cfg = ModelConfig.from_dict(cfg["model"])
        train_cfg = TrainConfig.from_dict(cfg["train"])
    except (TypeError, PlumbError) as e:
        raise PlumbError(f"{ckpt.path} holds a config this plumb cannot use ({e})") from None
    if steps is not None:
        if steps < ckpt.step:
            raise PlumbError(
                f"--steps {steps} is below the {ckpt.step} steps {out} has done: give more"
            )
        train_cfg = dataclasses.replace(train_cfg, steps=steps)
    path = str(data_path or cfg["data"].get("path", ""))
    if not Path(path).is_file():
        raise PlumbError(f"the run's data file {path} is gone: pass --data PATH (the same file)")
    if sha256_file(path) != cfg["data"].get("sha256"):
        raise PlumbError(
            f"{path} is not the file {out} was trained on (sha256 differs): pass the same file"
        )
    return ckpt, model_cfg, train_cfg, path


def _data_info(data: Dataset) -> dict[str, Any]:
    return {
        "path": str(Path(data.source).resolve()),
        "sha256": sha256_file(data.source),
        "vocab": list(data.vocab.chars),
        "block_size": data.block_size,
        "split_seed": 42,
        "examples": data.counts(),
        "max_item_chars": max(len(w) for s in data.splits.values() for w in s.items)
        if data.train.items
        else 0,
    }


def train_run(
    model_cfg: ModelConfig | None,
    train_cfg: TrainConfig | None,
    out: str | Path,
    data_path: str | Path | None = None,
    *,
    progress: bool = True,
    on_print=None,
    samples: int = 20,
    report: bool = True,
    tensorboard: str | Path | None = None,
    on_finding=None,
    resume: bool = False,
    steps: int | None = None,
    on_engine=None,
    preset: str | None = None,
) -> TrainedRun:
    """Load data, build the model (vocab size and block size from the data), train with
    the probes attached (unless ``train_cfg.probes`` is off), evaluate every split in eval
    mode, and save the run directory ``out``: config, weights, metrics, losses, the probe
    record, ``samples`` samples, and ``report.html`` (``report=True``). With the probes on
    and ``train_cfg.doctor``, the doctor's rules run during training (``on_finding(finding,
    step)`` for each new finding) and their findings go to ``findings.json``.

    A checkpoint (``plumb.checkpoint``) is written every ``train_cfg.checkpoint_every``
    steps and at the end; ``resume=True`` continues the run in ``out`` from it (configs
    from the checkpoint; ``steps`` may raise the total), bit for bit on the CPU. The
    directory is locked while the run trains. SIGINT/SIGTERM end the run after the
    current step with a checkpoint and the report (``exit_code`` 130/143); a non-finite
    loss or gradient stops it (``exit_code`` 3) keeping the last good checkpoint.

    Everything is validated before ``out`` is created, so bad input writes nothing.

    Under ``torch.distributed`` (``torchrun``, ``plumb train --nproc``) every rank calls
    this: DDP trains on each rank's share of every batch, and rank 0 alone locks,
    checkpoints, evaluates and writes; the other ranks return the run's status."""
    out = Path(out)
    rank, _ = world()
    check_out_dir(out)
    if rank == 0:
        RunLock(out).check_free()  # a live run there: say so before anything else
    ckpt = None
    if resume:
        ckpt, model_cfg, train_cfg, data_path = resume_configs(out, steps, data_path)
        preset = ckpt.state["config"].get("preset")
    elif (out / CHECKPOINT).exists() or (out / "config.json").exists():
        raise PlumbError(
            f"{out} already holds a run: continue it with `plumb train --resume {out}`, "
            "or choose another --out"
        )
    data, model, device, g = build(model_cfg, train_cfg, data_path)
    if samples < 0:
        raise PlumbError(f"samples must be >= 0, got {samples}")
    optimizer = make_optimizer(model, train_cfg)
    if ckpt is not None:
        restore(ckpt, model, optimizer, g)
    data_info = _data_info(data)
    config = {"model": model.config.to_dict(), "train": train_cfg.to_dict(), "data": data_info}
    if preset:
        config["preset"] = preset  # the name the run was built from (pages show it)
    lock = RunLock(out) if rank == 0 else contextlib.nullcontext()
    with lock, StopSignals() as signals:
        for tmp in out.glob(".*.tmp") if rank == 0 else ():  # left by a run killed mid-write
            tmp.unlink(missing_ok=True)
        monitor = _monitor(out, model, optimizer, data, train_cfg, tensorboard, on_finding)
        if monitor is not None and ckpt is not None:
            monitor.restore(History.restore(out, monitor.meta(), ckpt.losses), ckpt.step)

        # the validation loss in eval mode every eval_cadence() steps and at the end, kept
        # in the checkpoint (a resumed run continues the curve) and in val.json (readable
        # while the run trains)
        val: list[list[float]] = list(ckpt.state.get("extra", {}).get("val", []) if ckpt else [])
        every = train_cfg.eval_cadence()

        def on_step(i: int, loss: torch.Tensor) -> None:
            done = i + 1
            if rank == 0 and (done % every == 0 or done == train_cfg.steps):
                v = split_loss(model, data.val, device)
                val.append([done, v if math.isfinite(v) else None])  # JSON: null if diverged
                write_json(out / VAL_FILE, {"every": every, "val": val})
                for sink in monitor.sinks if monitor is not None else ():
                    if hasattr(sink, "val"):
                        sink.val(done, val[-1][1])

        def checkpoint(step: int, losses: torch.Tensor, status: str = "running") -> None:
            if monitor is not None and monitor.attached:
                monitor.flush()  # the record on disk covers the checkpoint (every rank)
            if rank != 0:
                return
            save_checkpoint(
                out,
                model=model,
                optimizer=optimizer,
                generator=g,
                step=step,
                losses=losses,
                config=config,
                status=status,
                extra={"val": [p for p in val if p[0] <= step]},
            )

        with monitor if monitor is not None else contextlib.nullcontext():
            calls = Callbacks(
                on_step=on_step,
                on_print=on_print,
                on_checkpoint=checkpoint,
                should_stop=signals.requested,
                on_engine=on_engine,
            )
            resumed = Resume(ckpt.step, ckpt.losses) if ckpt is not None else None
            result = train(
                model, data, train_cfg, g, optimizer=optimizer, monitor=monitor, calls=calls,
                resume=resumed, progress=progress,
            )  # fmt: skip
        status = {None: "complete", "signal": "interrupted", "nonfinite": "diverged"}[
            result.stopped
        ]
        if result.stopped != "nonfinite":  # a diverged run keeps its last good checkpoint
            checkpoint(result.steps_done, result.losses, status)
        diagnosis = monitor.diagnosis if monitor is not None else None
        if rank == 0:
            run = _finish(
                out, model, data, device, train_cfg, data_info, result, diagnosis, samples, val,
                preset=preset,
            )  # fmt: skip
        else:
            run = TrainedRun(out, model, data, result, {}, [])
        run.status = status
        # interrupted: by this process's signal, or (another rank's) agreed stop: 143
        stop_code = signals.exit_code if signals.requested() else 143
        run.exit_code = {"complete": 0, "diverged": 3}.get(status, stop_code)
        run.resumed_from = ckpt.step if ckpt is not None else 0
        if report and monitor is not None and rank == 0:
            write_report(out)
    return run


def _monitor(out, model, optimizer, data, train_cfg, tensorboard, on_finding) -> Monitor | None:
    """The Monitor (writing ``out/probes``), with the doctor when configured."""
    if not train_cfg.probes:
        return None
    sinks = []
    if tensorboard is not None:
        sinks.append(TensorBoardSink(tensorboard))
    every, hist_every = train_cfg.cadence()
    return Monitor(
        model,
        every,
        hist_every=hist_every,
        out=out,
        report=False,
        sinks=sinks,
        optimizer=optimizer,
        doctor=train_cfg.doctor,
        classes=data.vocab.size,
        check_every=check_cadence(every, train_cfg.steps),
        on_finding=on_finding,
    )


def _finish(
    out, model, data, device, train_cfg, data_info, result, diagnosis, samples, val=(), preset=None
) -> TrainedRun:
    """Evaluate, and write config, weights, metrics, losses, findings and samples."""
    calibrated = bool(result.averaged) or (  # train() recalibrated an averaged model
        train_cfg.calibrate_bn and calibrate_batchnorm(model, data.train, device) > 0
    )
    losses = {name: split_loss(model, split, device) for name, split in data.splits.items()}
    metrics = {
        "plumb_version": __version__,
        "steps": result.steps_done,
        "steps_configured": train_cfg.steps,
        "stopped": result.stopped,
        "skipped_steps": result.skipped,
        "step0_loss": result.step0_loss,
        "final_train_loss_1000_steps": result.last_mean(),
        "loss": losses,
        "bn_calibrated": bool(calibrated),
        "averaged_iterates": result.averaged,  # the weights are the mean of this many
        # the validation curve during training (eval mode) and its best point
        "val_curve": {"steps": [int(s) for s, _ in val], "loss": [v for _, v in val]},
        "best_val": (
            dict(zip(("step", "loss"), min(finite, key=lambda p: p[1]), strict=True))
            if (finite := [p for p in val if p[1] is not None])
            else None
        ),
        "num_parameters": model.num_parameters(),
        "train_seconds": result.seconds,
        "engine": result.engine,
        "compile_seconds": result.compile_seconds,
        "us_per_step": result.us_per_step,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    save_run(out, model.cpu(), train_cfg, data_info, result.losses, result.lrs, preset=preset)
    stop = result.nonfinite
    nonfinite = None
    if stop is not None:
        nonfinite = nonfinite_finding(stop.step, stop.what, stop.where, stop.loss, stop.lr)
        if diagnosis is None:
            findings = {"ok": False, "steps": result.steps_done, "findings": []}
        else:
            findings = diagnosis.to_dict()
        findings["ok"] = False
        findings["findings"] = [nonfinite.to_dict()] + [
            f for f in findings["findings"] if f.get("code") != "non-finite"
        ]
        write_json(out / "findings.json", findings)
    elif diagnosis is not None:
        write_json(out / "findings.json", diagnosis.to_dict())
    model.to(device)
    rows = sample_run(out, n=samples, device=train_cfg.device) if samples else []
    write_json(
        out / "samples.json",
        {
            "samples": [list(r) for r in rows],
            "data_preview": {
                "first items of the file": _first_items(data.source, 12),
                **{f"{name} split": split.items[:8] for name, split in data.splits.items()},
            },
        },
    )
    mark_finished(out, metrics)  # last: a run killed before this resumes to finish
    return TrainedRun(out, model, data, result, metrics, rows, nonfinite=nonfinite)


def _first_items(path: str | Path, n: int) -> list[str]:
    """The first ``n`` items of a data file (stripped, blank lines skipped), read lazily."""
    items: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                items.append(line.strip())
                if len(items) == n:
                    break
    return items


def training_items(run: Run, data_path: str | Path | None = None) -> dict[str, set[str]] | None:
    """The run's split items, re-read from its data file when it is unchanged (else None)."""
    path = Path(data_path or run.data_info.get("path", ""))
    if not path.is_file() or sha256_file(path) != run.data_info.get("sha256"):
        return None
    data = load_dataset(path, block_size=run.data_info["block_size"])
    return {name: set(split.items) for name, split in data.splits.items()}


def sample_run(
    run_dir: str | Path,
    n: int = 20,
    seed: int = 2147483647 + 10,
    temperature: float = 1.0,
    top_k: int | None = None,
    device: str = "cpu",
) -> list[tuple[str, str]]:
    """``n`` samples from a saved run, each with where it occurs: ``train``, ``val``,
    ``test`` or ``new`` (``?`` when the data file is gone or changed)."""
    run = Run(run_dir)
    dev = resolve_device(device)
    model = run.load_model(dev)
    items = training_items(run)
    max_len = max(2 * int(run.data_info.get("max_item_chars", 50)), 16)
    words = sample(
        model,
        run.vocab,
        run.data_info["block_size"],
        n,
        generator=torch.Generator().manual_seed(seed),
        temperature=temperature,
        top_k=top_k,
        max_len=max_len,
        device=dev,
    )
    return [(w, _where(w, items)) for w in words]


def _where(word: str, items: dict[str, set[str]] | None) -> str:
    if items is None:
        return "?"
    for name in ("train", "val", "test"):
        if word in items[name]:
            return name
    return "new"


def eval_run(
    run_dir: str | Path,
    splits=("train", "val", "test"),
    device: str = "cpu",
    data_path: str | Path | None = None,
) -> dict[str, float]:
    """Loss of a saved run on each split (eval mode), from its data file."""
    run = Run(run_dir)
    path = data_path or run.data_info.get("path")
    if not Path(path).is_file():
        raise PlumbError(f"the run's data file {path} is gone: pass --data PATH")
    data = load_dataset(path, block_size=run.data_info["block_size"])
    if tuple(data.vocab.chars) != run.vocab.chars:
        raise PlumbError(
            f"{path} has another vocabulary than the run was trained on: pass the run's data file"
        )
    dev = resolve_device(device)
    model = run.load_model(dev)
    unknown = [s for s in splits if s not in data.splits]
    if unknown:
        raise PlumbError(f"unknown split(s) {', '.join(unknown)}: use train, val, test")
    return {s: split_loss(model, data.splits[s], dev) for s in splits}


def doctor_run(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    data_path: str | Path | None = None,
    steps: int = 100,
    verify: bool = False,
) -> Diagnosis:
    """``plumb doctor``: build the model as ``train_run`` would and diagnose ``steps``
    training steps of it (batches drawn as the training loop draws them, at the
    configured lr, optimizer and seed); ``verify``: measure each finding's fix."""
    data, model, device, g = build(model_cfg, train_cfg, data_path)
    use_threads(train_cfg)  # (this path never reaches train(), which sets them there)
    X, Y = data.train.X.to(device), data.train.Y.to(device).long()
    if X.shape[0] == 0:
        raise PlumbError("the training split is empty: give a data file with more items")

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.randint(0, X.shape[0], (train_cfg.batch_size,), generator=g).to(device)
        return X[ix], Y[ix]

    model.train()
    return diagnose(
        model,
        batch,
        torch.nn.functional.cross_entropy,
        make_optimizer(model, train_cfg),
        steps,
        verify=verify,
    )
