"""plumb under ``torch.distributed``: the process group, the global step (its loss and
an agreed stop), the names and shards wrappers add, and the collectives the probes use.
This module knows nothing of what is measured: ``plumb.stats.merge_ranks`` pools each
rank's sufficient statistics with ``all_gather`` below (one collective of a few numbers
per record step; full tensors are never gathered, steps that record nothing run none).

What is pooled over ranks and what is not:

- layer outputs, their gradients and weight-layer inputs: every rank saw different
  examples, so they are merged. The gradient each rank sees is of its own loss; DDP and
  FSDP average the ranks' parameter gradients, so the global step's gradient with
  respect to an activation is 1/world of the local one, and the probes scale it so
  (``grad_scale``);
- a replicated parameter (DDP), its gradient (already averaged) and its update are the
  same on every rank: the local statistics are the global ones;
- a sharded parameter (FSDP2's ``fully_shard``: a DTensor with a ``Shard`` placement),
  its gradient and update: each rank holds a piece, so they are merged;
- per-unit "off for every example" masks: AND over ranks; histogram counts: summed
  over ranks on edges agreed first (the merged min and max).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from plumb import nn as pnn

#: Path components that wrappers insert into module and parameter names.
WRAPPER_PARTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DistributedDataParallel / DataParallel / torch.compile,
    so that names are the model's own (no ``module.`` or ``_orig_mod.`` prefix)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def init_from_env(device: str = "cpu") -> tuple[int, int]:
    """Join the process group that ``torchrun`` (or ``plumb train --nproc``) describes in
    the environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): gloo on the CPU, nccl
    on CUDA (each process on the GPU of its LOCAL_RANK). (rank, world size)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        cuda = str(device).startswith("cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return world()


def sync_batchnorm(model: nn.Module) -> None:
    """BatchNorm over the global batch: plumb's BatchNorm1d with ``sync=True``; a
    ``torch.nn`` BatchNorm needs ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``
    (it replaces modules, so it is the caller's: refused here)."""
    for name, m in model.named_modules():
        if isinstance(m, pnn.BatchNorm1d):
            m.sync = True
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm):
            raise ValueError(
                f"{name} is a torch.nn {type(m).__name__}: convert the model with "
                "torch.nn.SyncBatchNorm.convert_sync_batchnorm before training it on several ranks"
            )


class GlobalStep:
    """An engine's step under ``torch.distributed``: the loss it returns is the mean of
    the ranks' losses (the global batch's loss), and a stop request on any rank (a
    signal) becomes a stop on every rank after the same step, so that no rank waits
    in a collective for one that has left: one all-reduce of two numbers per step."""

    def __init__(self, engine: Any, should_stop: Any = None):
        self.engine, self.should_stop = engine, should_stop
        self.name = engine.name
        self.stop = False

    def __call__(self, x: Any, y: Any, lr: float | None, i: int, probes: Any = None):
        loss, ok, measured = self.engine(x, y, lr, i, probes)
        flag = 1.0 if self.should_stop is not None and self.should_stop() else 0.0
        buf = torch.stack([loss.detach().float().reshape(()), loss.new_tensor(flag).float()])
        dist.all_reduce(buf)
        self.stop = bool(buf[1] > 0)
        return buf[0] / world()[1], ok, measured

    def stopped(self) -> bool:
        return self.stop


def clean_name(name: str) -> str:
    """``name`` without the components wrappers insert (FSDP1, activation checkpointing)."""
    return ".".join(p for p in name.split(".") if p not in WRAPPER_PARTS)


_DTENSOR_TYPES: dict[type, bool] = {}


def is_dtensor(t: Tensor) -> bool:
    """A DTensor (FSDP2's parameters, tensor parallel), by what its class has: no import
    of torch.distributed. Per class, once (a record step asks ~150 times, and a missing
    attribute costs an exception each time)."""
    cls = type(t)
    known = _DTENSOR_TYPES.get(cls)
    if known is None:
        known = _DTENSOR_TYPES[cls] = hasattr(cls, "to_local") and hasattr(cls, "placements")
    return known


def local(t: Tensor) -> Tensor:
    """A DTensor's local piece, else ``t``."""
    return t.to_local() if is_dtensor(t) else t


def is_sharded(p: Tensor) -> bool:
    """True for a DTensor that some rank holds only a piece of (a ``Shard`` placement)."""
    return is_dtensor(p) and any(pl.is_shard() for pl in p.placements)


def all_gather(t: Tensor) -> Tensor:
    """Every rank's ``t`` (1-D, the same size on each), concatenated in rank order."""
    out = t.new_empty(world()[1] * t.numel())
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, t)
    return out


def sum_counts(counts: Tensor, local_rows: list[int]) -> Tensor:
    """Histogram counts summed over ranks; rows in ``local_rows`` (replicated tensors,
    the same on every rank) counted once."""
    rank, size = world()
    if size == 1:
        return counts
    c = counts.clone()
    if local_rows and rank != 0:
        c[torch.tensor(local_rows, device=c.device)] = 0
    dist.all_reduce(c)
    return c


def from_rank0(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a pickled broadcast), so that every rank acts on
    the same findings; ``obj`` itself without a process group."""
    _, size = world()
    if size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_ranks(t: Tensor) -> Tensor:
    """``t`` averaged over the ranks (the global loss of equal-sized shares)."""
    _, size = world()
    if size == 1:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / size
