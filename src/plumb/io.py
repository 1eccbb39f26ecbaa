"""File I/O for everything plumb writes: atomic writes, JSON and safetensors files,
hashing. The ground floor: it imports nothing of plumb but the error type.

Every file is written to a temporary name in the same directory, fsynced, then renamed
over the old one (and the directory fsynced), so a crash mid-write leaves the previous
file whole; a reader sees the old file or the new one.
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

from plumb.errors import PlumbError


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
        if hasattr(os, "fchmod"):  # mkstemp makes 0600: give what a plain open() gives
            os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def umask() -> int:
    """The process's umask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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


def finite_or_null(x: Any) -> Any:
    """A copy with every non-finite float as None: strict JSON (no bare NaN, which
    Python writes and most readers refuse), the value written as null."""
    if isinstance(x, dict):
        return {k: finite_or_null(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [finite_or_null(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as strict JSON (non-finite floats as null), atomically."""
    text = json.dumps(finite_or_null(obj), indent=2, sort_keys=False, allow_nan=False)
    atomic_write_bytes(path, (text + "\n").encode())


def write_tensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    clean = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    atomic_write_bytes(path, st_save(clean, metadata={"format": "plumb", **(metadata or {})}))


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
