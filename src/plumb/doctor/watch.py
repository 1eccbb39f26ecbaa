"""The doctor's own probes: what its rules need beyond the Monitor's per-tensor statistics.

* BatchNorm mode on every forward (no tensor work): a BatchNorm in training mode under
  ``torch.no_grad()``/``inference_mode`` (an evaluation that normalises with the batch and
  moves the running statistics), or in eval mode under autograd (a training forward that
  does not normalise the batch).
* The RMS of each weight layer's *input*, sqrt(mean(x^2)): the scale that layer sees.
  Kaiming init (fan_in) keeps it constant across depth.
* Per unit of each saturating/rectifying layer, whether it was ever active (passed gradient)
  for any example of the window: dead units are the ones that never were.
* The model's input (scale of the features) and its first output (is it already a softmax?).
* Weight symmetry at the start and at the end (units of a layer that are identical).

Tensor work happens only on the driver's record steps and stays on the device until
``collect``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from plumb import nn as pnn
from plumb.probes import layer_kind
from plumb.stats import RECTIFYING, SATURATING, off_mask, unit_dim


def weight_unit_dim(module: nn.Module) -> int:
    """The dimension of ``module.weight`` that indexes output units: 1 for plumb's
    ``Linear`` (stored (fan_in, fan_out), as the lecture), 0 for torch.nn layers."""
    return 1 if isinstance(module, pnn.Linear) else 0


def unit_spread(w: Tensor, dim: int) -> float:
    """||W - mean over units of W|| / ||W||: 0 when every unit (slice along ``dim``) is the
    same vector, ~1 for a random init. An all-zero W counts as symmetric (0)."""
    w = w.detach().double()
    norm = w.norm().item()
    if not math.isfinite(norm):
        return float("nan")
    if norm == 0.0:
        return 0.0
    return (w - w.mean(dim, keepdim=True)).norm().item() / norm


def _uses_running_stats(m: nn.Module) -> bool:
    return getattr(m, "track_running_stats", True) and getattr(m, "running_mean", None) is not None


def _first_tensor(x: Any) -> Tensor | None:
    if isinstance(x, Tensor):
        return x
    if isinstance(x, tuple | list):
        return next((t for t in x if isinstance(t, Tensor)), None)
    if isinstance(x, dict):
        return next((t for t in x.values() if isinstance(t, Tensor)), None)
    return None


@dataclass
class BatchNormEvent:
    name: str
    mode: str  # "train-mode-in-eval" | "eval-mode-in-training"
    count: int = 0
    first_step: int = 0
    frozen: bool = False  # its affine parameters do not require grad


@dataclass
class Seen:
    """What the watch collected, on the host."""

    weight_layers: list[str] = field(default_factory=list)  # call order of first forward
    input_rms: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    dead: dict[str, tuple[float, int, int]] = field(default_factory=dict)  # frac, units, examples
    bn_events: dict[tuple[str, str], BatchNormEvent] = field(default_factory=dict)
    model_input: dict[str, float] | None = None
    output: Tensor | None = None  # the first training forward's output (detached, CPU)
    symmetry_start: dict[str, float] = field(default_factory=dict)
    symmetry_end: dict[str, float] = field(default_factory=dict)


class Watch:
    """Attach with ``with Watch(model) as w:`` (it starts recording); set ``w.record`` before
    each training step (whether tensor statistics are wanted this step), ``w.step()``
    after it."""

    def __init__(self, model: nn.Module):
        self.model = getattr(model, "_orig_mod", model)
        named = dict(self.model.named_modules())
        self.kinds = {n: layer_kind(m) for n, m in named.items()}
        self._named = named
        self.weight_modules = {
            n: m
            for n, m in named.items()
            if self.kinds[n] in ("linear", "conv")
            and isinstance(getattr(m, "weight", None), Tensor)
            and m.weight.dim() >= 2
        }
        self._record = False
        self._record_handles: list[Any] = []
        self.step_count = 0
        self.seen = Seen()
        self._handles: list[Any] = []
        self._rms: dict[str, list[tuple[int, Tensor]]] = {}
        self._alive: dict[str, Tensor] = {}
        self._examples: dict[str, int] = {}
        self._input: list[Tensor] = []

    # ----- attach / detach ---------------------------------------------------------
    def __enter__(self) -> Watch:
        self.seen.symmetry_start = self.symmetry()
        for name, m in self._named.items():
            if self.kinds[name] == "batchnorm":  # mode checks: every forward, no tensor work
                self._handles.append(m.register_forward_pre_hook(self._bn_hook(name)))
        self.record = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.record = False
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @property
    def record(self) -> bool:
        """Whether the coming steps measure tensors. The measuring hooks are attached only
        while it is True (a module with no hooks takes torch's fast call path)."""
        return self._record

    @record.setter
    def record(self, on: bool) -> None:
        if on and not self._record_handles:
            for name, m in self._named.items():
                kind = self.kinds[name]
                if name in self.weight_modules:
                    h = m.register_forward_pre_hook(self._input_hook(name))
                    self._record_handles.append(h)
                if kind in SATURATING + RECTIFYING:
                    h = m.register_forward_hook(self._unit_hook(name, kind))
                    self._record_handles.append(h)
            self._record_handles.append(self.model.register_forward_pre_hook(self._model_in_hook))
            self._record_handles.append(self.model.register_forward_hook(self._model_out_hook))
        elif not on:
            for h in self._record_handles:
                h.remove()
            self._record_handles.clear()
        self._record = bool(on)

    def step(self) -> None:
        self.step_count += 1

    def symmetry(self) -> dict[str, float]:
        return {
            n: unit_spread(m.weight, weight_unit_dim(m))
            for n, m in self.weight_modules.items()
            if m.weight.shape[weight_unit_dim(m)] > 1
        }

    # ----- hooks -------------------------------------------------------------------
    def _active(self) -> bool:
        return self.record and torch.is_grad_enabled()

    def _bn_hook(self, name: str):
        def hook(module: nn.Module, args: Any) -> None:
            grad = torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
            if not grad and module.training:
                mode = "train-mode-in-eval"
            elif grad and not module.training and _uses_running_stats(module):
                mode = "eval-mode-in-training"
            else:
                return
            event = self.seen.bn_events.get((name, mode))
            if event is None:
                frozen = not any(p.requires_grad for p in module.parameters(recurse=False))
                event = BatchNormEvent(name, mode, 0, self.step_count, frozen)
                self.seen.bn_events[(name, mode)] = event
            event.count += 1

        return hook

    def _input_hook(self, name: str):
        def hook(module: nn.Module, args: Any) -> None:
            if not self._active():
                return
            if name not in self.seen.weight_layers:
                self.seen.weight_layers.append(name)
            x = _first_tensor(args)
            if x is None or not x.is_floating_point() or x.numel() == 0:
                return
            rms = x.detach().float().square().mean().sqrt()
            self._rms.setdefault(name, []).append((self.step_count, rms))

        return hook

    def _unit_hook(self, name: str, kind: str):
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if not self._active():
                return
            y = _first_tensor(out)
            if y is None or not y.is_floating_point() or y.dim() < 2:
                return
            ud = unit_dim(kind, y.dim())
            off = off_mask(kind, y.detach()).movedim(ud, -1).reshape(-1, y.shape[ud])
            alive = ~off.all(0)
            prev = self._alive.get(name)
            self._alive[name] = alive if prev is None or prev.shape != alive.shape else prev | alive
            self._examples[name] = self._examples.get(name, 0) + y.shape[0]

        return hook

    def _model_in_hook(self, module: nn.Module, args: Any) -> None:
        if not self._active() or self._input:
            return
        x = _first_tensor(args)
        if x is not None and x.is_floating_point() and x.numel() > 1:
            x = x.detach().float()
            flat = x.movedim(1, -1).reshape(-1, x.shape[1]) if x.dim() > 1 else x.reshape(-1, 1)
            per_feature = flat.square().mean(0).sqrt()
            self._input = [x.square().mean().sqrt(), x.mean(), x.std(), per_feature.amax()]

    def _model_out_hook(self, module: nn.Module, args: Any, out: Any) -> None:
        if self.seen.output is None and self._active():
            y = _first_tensor(out)
            if y is not None and y.is_floating_point():
                self.seen.output = y.detach().float().cpu()

    # ----- to the host -------------------------------------------------------------
    def reset_window(self) -> None:
        """Start a new window for dead units (units must be active somewhere in it)."""
        self._alive, self._examples = {}, {}

    def collect(self) -> Seen:
        """Copy what is on the device to the host (one synchronisation per tensor list) and
        measure the weights' unit spread as they are now."""
        for name, pairs in self._rms.items():
            if pairs:
                values = torch.stack([v for _, v in pairs]).cpu().tolist()
                self.seen.input_rms.setdefault(name, []).extend(
                    (s, v) for (s, _), v in zip(pairs, values, strict=True)
                )
        self._rms = {}
        self.seen.dead = {
            name: (1.0 - alive.float().mean().item(), alive.numel(), self._examples[name])
            for name, alive in self._alive.items()
        }
        if self._input and self.seen.model_input is None:
            rms, mean, std, peak = (float(v) for v in torch.stack(self._input).cpu())
            self.seen.model_input = {"rms": rms, "mean": mean, "std": std, "max_feature_rms": peak}
        self.seen.symmetry_end = self.symmetry()
        return self.seen
