"""End-to-end jobs the CLI offers, as plain Python calls: train a run and save it,
evaluate a saved run, sample from it."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from plumb import __version__
from plumb.data import Dataset, load_dataset
from plumb.doctor import Diagnosis, Doctor, diagnose
from plumb.errors import PlumbError
from plumb.models import MLP, ModelConfig
from plumb.probes import Monitor
from plumb.runs import Run, save_run, sha256_file, write_json
from plumb.sample import sample
from plumb.train import (
    TrainConfig,
    TrainResult,
    calibrate_batchnorm,
    make_optimizer,
    resolve_device,
    split_loss,
    train,
)


@dataclass
class TrainedRun:
    out: Path
    model: MLP
    data: Dataset
    result: TrainResult
    metrics: dict[str, Any]
    samples: list[tuple[str, str]]


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
    if train_cfg.threads is not None:
        torch.set_num_threads(train_cfg.threads)
    device = resolve_device(train_cfg.device)
    g = torch.Generator().manual_seed(train_cfg.seed)
    return data, MLP(model_cfg, g).to(device), device, g


def train_run(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    out: str | Path,
    data_path: str | Path | None = None,
    *,
    progress: bool = True,
    on_print=None,
    samples: int = 20,
    report: bool = True,
    tensorboard: str | Path | None = None,
    on_finding=None,
) -> TrainedRun:
    """Load data, build the model (vocab size and block size from the data), train with
    the probes attached (unless ``train_cfg.probes`` is off), evaluate every split in eval
    mode, and save the run directory ``out``: config, weights, metrics, losses, the probe
    record, ``samples`` samples, and ``report.html`` (``report=True``). With the probes on
    and ``train_cfg.doctor``, the doctor's rules run during training (``on_finding(finding,
    step)`` for each new finding) and their findings go to ``findings.json``.

    Everything is validated before ``out`` is created, so bad input writes nothing."""
    out = Path(out)
    check_out_dir(out)
    data, model, device, g = build(model_cfg, train_cfg, data_path)
    if samples < 0:
        raise PlumbError(f"samples must be >= 0, got {samples}")
    sinks = []
    if tensorboard is not None:
        from plumb.report.tensorboard import TensorBoardSink

        sinks.append(TensorBoardSink(tensorboard))
    monitor = doctor = None
    optimizer = make_optimizer(model, train_cfg)
    if train_cfg.probes:
        every, hist_every = train_cfg.cadence()
        monitor = Monitor(model, every, hist_every=hist_every, out=out, report=False, sinks=sinks)
        if train_cfg.doctor:
            doctor = Doctor(
                monitor,
                optimizer=optimizer,
                classes=data.vocab.size,
                check_every=max(1000, train_cfg.steps // 20),
                on_finding=on_finding,
            )
    with contextlib.ExitStack() as stack:
        for ctx in (monitor, doctor):
            if ctx is not None:
                stack.enter_context(ctx)
        result = train(
            model,
            data,
            train_cfg,
            g,
            optimizer=optimizer,
            progress=progress,
            on_print=on_print,
            monitor=monitor,
            doctor=doctor,
        )
    calibrated = train_cfg.calibrate_bn and calibrate_batchnorm(model, data.train, device) > 0
    losses = {name: split_loss(model, split, device) for name, split in data.splits.items()}
    metrics = {
        "plumb_version": __version__,
        "steps": train_cfg.steps,
        "step0_loss": result.step0_loss,
        "final_train_loss_1000_steps": result.last_mean(),
        "loss": losses,
        "bn_calibrated": bool(calibrated),
        "num_parameters": model.num_parameters(),
        "train_seconds": result.seconds,
        "us_per_step": 1e6 * result.seconds / max(train_cfg.steps, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    data_info = {
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
    out.mkdir(parents=True, exist_ok=True)
    save_run(out, model.cpu(), train_cfg, data_info, metrics, result.losses, result.lrs)
    if doctor is not None and doctor.diagnosis is not None:
        write_json(out / "findings.json", doctor.diagnosis.to_dict())
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
    if report and monitor is not None:
        from plumb.report import write_report

        write_report(out)
    return TrainedRun(out, model, data, result, metrics, rows)


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
) -> Diagnosis:
    """``plumb doctor``: build the model as ``train_run`` would and diagnose ``steps``
    training steps of it (batches drawn as the training loop draws them, at the
    configured lr, optimizer and seed)."""
    data, model, device, g = build(model_cfg, train_cfg, data_path)
    X, Y = data.train.X.to(device), data.train.Y.to(device).long()
    if X.shape[0] == 0:
        raise PlumbError("the training split is empty: give a data file with more items")

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.randint(0, X.shape[0], (train_cfg.batch_size,), generator=g).to(device)
        return X[ix], Y[ix]

    model.train()
    return diagnose(
        model, batch, torch.nn.functional.cross_entropy, make_optimizer(model, train_cfg), steps
    )
