"""Two watches beside the record steps: BatchNorm's mode on every forward
(``BatchNormWatch``: train mode under no_grad, eval mode while training) and the window
of dead units (``DeadWindow``: units off at every record step since it was reset)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class BatchNormEvent:
    name: str
    mode: str  # "train-mode-in-eval" | "eval-mode-in-training"
    count: int = 0
    first_step: int = 0
    frozen: bool = False  # its affine parameters do not require grad


class BatchNormWatch:
    """A forward pre-hook on every BatchNorm, on every step (no tensor work): ``events``
    counts each (layer, wrong mode) seen, with the step it was first seen at."""

    def __init__(self, step: Callable[[], int]) -> None:
        self.step = step
        self.events: dict[tuple[str, str], BatchNormEvent] = {}
        self.handles: list[Any] = []

    def attach(self, modules: dict[str, nn.Module], kinds: dict[str, str]) -> None:
        for name, m in modules.items():
            if kinds[name] == "batchnorm":
                self.handles.append(m.register_forward_pre_hook(self._hook(name)))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _hook(self, name: str):
        def hook(module: nn.Module, args: Any) -> None:
            grad = torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
            if not grad and module.training:
                mode = "train-mode-in-eval"
            elif grad and not module.training and _uses_running_stats(module):
                mode = "eval-mode-in-training"
            else:
                return
            event = self.events.get((name, mode))
            if event is None:
                frozen = not any(p.requires_grad for p in module.parameters(recurse=False))
                event = BatchNormEvent(name, mode, 0, self.step(), frozen)
                self.events[(name, mode)] = event
            event.count += 1

        return hook


class DeadWindow:
    """Per layer, the units off at every record step since ``reset`` (the doctor's dead
    units: a unit must be active somewhere in the window), and the examples (positions)
    each unit has seen. ``off[layer]``: 1.0 where the unit was off at every record step.

    Record steps that bring the same layers with masks of one shape (a model's usual
    case) are ANDed in one multiply: the window keeps them stacked and ``off`` holds
    views of the stack."""

    def __init__(self) -> None:
        self.off: dict[str, Tensor] = {}
        self.examples: dict[str, int] = {}
        self._stack: tuple[tuple, Tensor] | None = None  # (keys and shape, (k, U) masks)

    def update(
        self,
        masks: dict[str, Tensor],
        positions: dict[str, int],
        stacked: Tensor | None = None,
    ) -> None:
        """AND this record step's per-unit masks into the window (``stacked``: the same
        masks as one (k, U) tensor, when they share a shape)."""
        if stacked is not None and self.and_stacked(tuple(masks), positions, stacked):
            return
        for k in masks:
            self.examples[k] = self.examples.get(k, 0) + positions.get(k, 0)
        for k, mask in masks.items():
            prev = self.off.get(k)
            self.off[k] = mask if prev is None or prev.shape != mask.shape else prev * mask
        self._stack = None
        if stacked is not None:  # from now on one multiply: the window's own stack
            stack = torch.stack([self.off[k] for k in masks])
            self._stack = (self._signature(tuple(masks), stacked), stack)
            for i, k in enumerate(masks):
                self.off[k] = stack[i]

    def and_stacked(
        self, keys: tuple[str, ...], positions: dict[str, int], stacked: Tensor
    ) -> bool:
        """``update`` by one multiply, when the window holds these layers' masks stacked
        as ``stacked`` is (False: it does not, nothing done)."""
        if self._stack is None or self._stack[0] != self._signature(keys, stacked):
            return False
        for k in keys:
            self.examples[k] = self.examples.get(k, 0) + positions.get(k, 0)
        self._stack[1].mul_(stacked)  # the views in ``off`` follow
        return True

    @staticmethod
    def _signature(keys: tuple[str, ...], stacked: Tensor) -> tuple:
        return (keys, tuple(stacked.shape), stacked.dtype, stacked.device)

    def reset(self) -> None:
        self.off, self.examples, self._stack = {}, {}, None

    def dead(self) -> dict[str, tuple[float, int, int]]:
        """{layer: (fraction of units off at every record step of the window, units,
        examples seen)} (one host read)."""
        keys = list(self.off)
        if not keys:
            return {}
        fractions = torch.stack([self.off[k].mean() for k in keys]).cpu().tolist()
        return {
            k: (f, self.off[k].numel(), self.examples.get(k, 0))
            for k, f in zip(keys, fractions, strict=True)
        }


def _uses_running_stats(m: nn.Module) -> bool:
    return getattr(m, "track_running_stats", True) and getattr(m, "running_mean", None) is not None
