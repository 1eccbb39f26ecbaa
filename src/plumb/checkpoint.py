"""Checkpoints: everything a run needs to continue bit for bit, in one safetensors file.

``RUN_DIR/checkpoint.safetensors`` holds

    tensors   model/<name>        weights and buffers
              optim/<i>/<key>     optimizer state tensors (AdamW's exp_avg, ...)
              rng/generator       the torch.Generator that draws init and batches
              rng/torch           torch's global CPU RNG state
              losses              the per-step loss of steps [0, step)
    metadata  plumb   JSON: format, step, model and train config, data file sha256,
                      optimizer param_groups and non-tensor state, the run's status
              digest  sha256 over every tensor's name, dtype, shape and bytes

Never pickle: loading cannot run code. The file is written atomically (temp file, fsync,
rename, fsync of the directory: ``io.atomic_write_bytes``), so the previous checkpoint stays whole until the new one
is complete; a reader sees one or the other. ``load_checkpoint`` checks the header, the
digest and every field, and turns anything wrong into one ``PlumbError`` line.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

from plumb.errors import PlumbError
from plumb.io import atomic_write_bytes
from plumb.runs import load_state

CHECKPOINT = "checkpoint.safetensors"
FORMAT = 1
#: The header of a checkpoint is small; a length beyond this is a lie, not a header.
MAX_HEADER = 16 << 20


@dataclass
class Checkpoint:
    """A checkpoint read back: tensors and the JSON state."""

    path: Path
    step: int
    state: dict[str, Any]  # the "plumb" metadata
    tensors: dict[str, Tensor]

    def model_state(self) -> dict[str, Tensor]:
        return {k[len("model/") :]: v for k, v in self.tensors.items() if k.startswith("model/")}

    @property
    def losses(self) -> Tensor:
        return self.tensors["losses"]


def digest(tensors: dict[str, Tensor]) -> str:
    """sha256 over each tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_checkpoint(
    run_dir: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    step: int,
    losses: Tensor,
    config: dict[str, Any],
    status: str = "running",
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``run_dir/checkpoint.safetensors`` for a run that has done ``step`` steps.

    ``config`` is the run's JSON config (model, train, data); ``losses`` the first
    ``step`` per-step losses; ``extra`` more JSON state (the validation curve). A write that fails (full disk, read-only directory) raises
    a ``PlumbError`` and leaves the previous checkpoint as it was."""
    tensors: dict[str, Tensor] = {
        f"model/{k}": v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()
    }
    opt = optimizer.state_dict()
    optim_meta: dict[str, dict[str, Any]] = {}
    for idx, st in opt["state"].items():
        for key, value in st.items():
            if isinstance(value, Tensor):
                tensors[f"optim/{idx}/{key}"] = value.detach().cpu().contiguous().clone()
            else:
                optim_meta.setdefault(str(idx), {})[key] = value
    tensors["rng/generator"] = generator.get_state()
    tensors["rng/torch"] = torch.random.get_rng_state()
    tensors["losses"] = losses.detach().float().cpu()[:step].contiguous().clone()
    meta = {
        "format": FORMAT,
        "step": step,
        "status": status,
        "config": config,
        "extra": extra or {},
        "optimizer": {
            "class": type(optimizer).__name__,
            "param_groups": opt["param_groups"],
            "state": optim_meta,
        },
    }
    try:
        text = json.dumps(meta, allow_nan=False)
    except ValueError:
        raise PlumbError("the run's state holds a NaN or Inf: not writing a checkpoint") from None
    payload = st_save(tensors, metadata={"plumb": text, "digest": digest(tensors)})
    path = Path(run_dir) / CHECKPOINT
    try:
        atomic_write_bytes(path, payload)
    except OSError as e:
        why = os.strerror(e.errno) if e.errno else str(e)
        hint = "free some space" if e.errno == errno.ENOSPC else "check the directory's permissions"
        raise PlumbError(
            f"cannot write checkpoint {path} ({why}): {hint}; the previous checkpoint is intact"
        ) from None
    return path


def _bad(path: Path, why: str) -> PlumbError:
    return PlumbError(f"{path} is not a usable plumb checkpoint ({why}): {_advice(path)}")


def _advice(path: Path) -> str:
    return f"delete it to start {path.parent} afresh, or resume from a copy of the run"


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read and check a checkpoint file (see the module doc); a ``PlumbError`` says what
    is wrong with it."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise PlumbError(
            f"{path} does not exist: the run has no checkpoint yet (was it started with "
            "`plumb train --out DIR`?)"
        )
    try:
        data = path.read_bytes()
    except OSError as e:
        raise PlumbError(f"cannot read {path} ({os.strerror(e.errno or 0) or e})") from None
    if len(data) < 8:
        raise _bad(path, f"{len(data)} bytes: empty or truncated")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER or 8 + n > len(data):
        raise _bad(path, f"its header claims {n} bytes, the file has {len(data) - 8}")
    try:
        header = json.loads(data[8 : 8 + n])
        metadata = header.get("__metadata__") or {}
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        size = len(data) - 8 - n
        if ends and max(ends) != size:
            raise _bad(
                path,
                f"truncated or padded: its header describes {max(ends)} bytes of tensors, the file has {size}",
            )
        tensors = st_load(data)
    except PlumbError:
        raise
    except (
        SafetensorError,
        ValueError,
        RuntimeError,
        AttributeError,
        KeyError,
        TypeError,
        IndexError,
    ) as e:
        msg = (str(e).splitlines() or [type(e).__name__])[0][:120]
        raise _bad(path, f"unreadable safetensors: {msg}") from None
    if not isinstance(metadata, dict) or "plumb" not in metadata or "digest" not in metadata:
        raise _bad(path, "no plumb metadata: not written by plumb")
    if digest(tensors) != metadata["digest"]:
        raise _bad(path, "its tensors do not match their checksum: damaged on disk")
    try:
        state = json.loads(metadata["plumb"])
    except (json.JSONDecodeError, TypeError):
        raise _bad(path, "its metadata is not JSON") from None
    _check_state(path, state, tensors)
    return Checkpoint(path, state["step"], state, tensors)


def _check_state(path: Path, state: Any, tensors: dict[str, Tensor]) -> None:
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        got = state.get("format") if isinstance(state, dict) else None
        raise _bad(path, f"format {got!r}; this plumb reads format {FORMAT}")
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise _bad(path, f"step {step!r} is not a count of steps")
    config = state.get("config")
    if not isinstance(config, dict) or not all(
        isinstance(config.get(k), dict) for k in ("model", "train", "data")
    ):
        raise _bad(path, "no model/train/data config")
    opt = state.get("optimizer")
    if not isinstance(opt, dict) or not isinstance(opt.get("param_groups"), list):
        raise _bad(path, "no optimizer state")
    for key in ("rng/generator", "rng/torch", "losses"):
        if key not in tensors:
            raise _bad(path, f"tensor {key} is missing")
    losses = tensors["losses"]
    if losses.dim() != 1 or losses.shape[0] != step or losses.dtype != torch.float32:
        raise _bad(path, f"losses hold {tuple(losses.shape)} values for {step} steps")
    for key in ("rng/generator", "rng/torch"):
        if tensors[key].dtype != torch.uint8 or tensors[key].dim() != 1:
            raise _bad(path, f"{key} is not a generator state")


def restore(
    ckpt: Checkpoint,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
) -> None:
    """Put a checkpoint's weights, optimizer state and RNG states back (in place)."""
    load_state(model, ckpt.model_state(), ckpt.path)
    saved = ckpt.state["optimizer"]
    if saved.get("class") != type(optimizer).__name__:
        raise _bad(
            ckpt.path, f"optimizer {saved.get('class')!r}, the run uses {type(optimizer).__name__}"
        )
    state: dict[int, dict[str, Any]] = {}
    for key, t in ckpt.tensors.items():
        if key.startswith("optim/"):
            _, idx, name = key.split("/", 2)
            state.setdefault(int(idx), {})[name] = t
    for idx, extra in saved.get("state", {}).items():
        state.setdefault(int(idx), {}).update(extra)
    try:
        optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise _bad(ckpt.path, f"optimizer state does not fit the model: {e}") from None
    try:
        generator.set_state(ckpt.tensors["rng/generator"])
        torch.random.set_rng_state(ckpt.tensors["rng/torch"])
    except (RuntimeError, TypeError) as e:
        raise _bad(ckpt.path, f"RNG state rejected: {e}") from None


__all__ = ["CHECKPOINT", "Checkpoint", "read_checkpoint", "restore", "save_checkpoint"]
