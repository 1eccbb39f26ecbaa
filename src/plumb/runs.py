"""The run directory: what ``plumb train --out DIR`` writes and the other commands read.

    DIR/config.json        format version, model config, train config, data (path, sha256,
                           vocabulary, block size, split sizes)
    DIR/model.safetensors  weights and buffers (state_dict); never pickle
    DIR/metrics.json       step-0 loss, split losses, timing, parameter count
    DIR/losses.safetensors per-step training loss ("loss") and learning rate ("lr"), float32

Every file is written to a temporary name, fsynced, then renamed over the old one, so a
crash mid-write leaves the previous file intact.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as st_save
from torch import nn

from plumb.data import Vocab
from plumb.errors import PlumbError
from plumb.models import MLP, ModelConfig
from plumb.train import TrainConfig

FORMAT_VERSION = 1


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` so that readers see the old file or the new one, whole:
    a temp file in the same directory, fsync, rename, then fsync of the directory (so the
    rename itself survives a power cut)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # a platform without directory fds: the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def jsonable(x: Any) -> Any:
    """JSON-safe copy: non-finite floats as strings ("nan", "inf": strict JSON), tuples
    as lists, tensors and arrays as lists, numpy scalars as Python numbers."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    if isinstance(x, bool | int | str) or x is None:
        return x
    if hasattr(x, "tolist"):  # tensors, arrays, numpy scalars
        return jsonable(x.tolist())
    return float(x) if hasattr(x, "__float__") else str(x)


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def write_tensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    clean = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    atomic_write_bytes(path, st_save(clean, metadata={"format": "plumb", **(metadata or {})}))


def save_run(
    out: Path,
    model: MLP,
    train_cfg: TrainConfig,
    data_info: dict[str, Any],
    metrics: dict[str, Any],
    losses: torch.Tensor | None = None,
    lrs: torch.Tensor | None = None,
) -> None:
    config = {
        "format": FORMAT_VERSION,
        "model": model.config.to_dict(),
        "train": train_cfg.to_dict(),
        "data": data_info,
    }
    write_json(out / "config.json", config)
    write_tensors(out / "model.safetensors", model.state_dict())
    if losses is not None:
        write_tensors(out / "losses.safetensors", {"loss": losses.float(), "lr": lrs.float()})
    write_json(out / "metrics.json", metrics)


def read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PlumbError(f"{path} is missing: is {path.parent} a plumb run directory?") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PlumbError(
            f"{path} is not valid JSON ({e}): the run is damaged; retrain it"
        ) from None
    if not isinstance(obj, dict):
        raise PlumbError(f"{path} should hold a JSON object: the run is damaged; retrain it")
    return obj


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise PlumbError(f"{path} is missing: is {path.parent} a plumb run directory?")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PlumbError(
            f"{path} is not a readable safetensors file ({msg}): retrain the run"
        ) from None


class Run:
    """A trained run read back from its directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise PlumbError(
                f"run directory {self.path} does not exist: pass --run DIR of a `plumb train --out DIR`"
            )
        self.config = read_json(self.path / "config.json")
        if self.config.get("format") != FORMAT_VERSION:
            raise PlumbError(
                f"{self.path}/config.json has format {self.config.get('format')!r}; this plumb reads "
                f"format {FORMAT_VERSION}: retrain with this version"
            )
        try:
            self.model_config = ModelConfig.from_dict(self.config["model"])
            self.train_config = TrainConfig.from_dict({**self.config["train"], "device": "cpu"})
            self.vocab = Vocab(tuple(self.config["data"]["vocab"]))
        except (KeyError, TypeError) as e:
            raise PlumbError(
                f"{self.path}/config.json lacks {e}: the run is damaged; retrain it"
            ) from None

    @property
    def data_info(self) -> dict[str, Any]:
        return self.config["data"]

    def metrics(self) -> dict[str, Any]:
        return read_json(self.path / "metrics.json")

    def losses(self) -> dict[str, torch.Tensor]:
        return read_tensors(self.path / "losses.safetensors")

    def load_model(self, device: str | torch.device = "cpu") -> MLP:
        model = MLP(self.model_config, generator=torch.Generator())
        state = read_tensors(self.path / "model.safetensors")
        load_state(model, state, self.path / "model.safetensors")
        return model.to(device).eval()


def load_state(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise PlumbError(
            f"{source} does not match the model in config.json "
            f"(missing {missing[:3]}, unexpected {extra[:3]}): it comes from another run"
        )
    for name, t in state.items():
        if t.shape != expected[name].shape or t.dtype != expected[name].dtype:
            raise PlumbError(
                f"{source}: tensor {name} has shape {tuple(t.shape)} {t.dtype}, the model "
                f"needs {tuple(expected[name].shape)} {expected[name].dtype}: it comes from another run"
            )
    model.load_state_dict(state)
