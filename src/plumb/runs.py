"""The run directory: what ``plumb train --out DIR`` writes and the other commands read.

    DIR/config.json        format version, model config, train config, data (path, sha256,
                           vocabulary, block size, split sizes)
    DIR/model.safetensors  weights and buffers (state_dict); never pickle
    DIR/metrics.json       step-0 loss, split losses, timing, parameter count
    DIR/losses.safetensors per-step training loss ("loss") and learning rate ("lr"), float32

Every file is written atomically (``plumb.io``): a crash mid-write leaves the previous
file intact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from plumb.data import Vocab
from plumb.errors import PlumbError
from plumb.io import read_json, read_tensors, write_json, write_tensors
from plumb.models import MLP, ModelConfig
from plumb.train import TrainConfig

FORMAT_VERSION = 1


def save_run(
    out: Path,
    model: MLP,
    train_cfg: TrainConfig,
    data_info: dict[str, Any],
    losses: torch.Tensor | None = None,
    lrs: torch.Tensor | None = None,
    preset: str | None = None,
) -> None:
    """Write the run's config (with the preset it was built from, when given), weights
    and losses (``mark_finished`` writes its metrics, last)."""
    config = {
        "format": FORMAT_VERSION,
        "model": model.config.to_dict(),
        "train": train_cfg.to_dict(),
        "data": data_info,
    }
    if preset:
        config["preset"] = preset
    write_json(out / "config.json", config)
    write_tensors(out / "model.safetensors", model.state_dict())
    if losses is not None:
        write_tensors(out / "losses.safetensors", {"loss": losses.float(), "lr": lrs.float()})


def mark_finished(out: Path, metrics: dict[str, Any]) -> None:
    """Write ``metrics.json``, the run's last file and its "finished" mark: ``plumb train
    --resume`` of a complete checkpoint whose ``metrics.json`` is missing, or from another
    step, finishes the run (evaluates and writes its outputs) instead of saying there is
    nothing to do."""
    write_json(out / "metrics.json", metrics)


def finished_steps(out: Path) -> int | None:
    """The step count ``mark_finished`` wrote in ``out/metrics.json``, None if absent."""
    try:
        return int(read_json(out / "metrics.json")["steps"])
    except (PlumbError, KeyError, TypeError, ValueError):
        return None


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
