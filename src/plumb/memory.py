"""The process's host memory: large CPU tensors reused instead of faulted in afresh.

glibc's malloc serves a block above ``M_MMAP_THRESHOLD`` (128 KiB at start, raised
dynamically up to 32 MiB as such blocks are freed) with a fresh ``mmap``, and gives the top
of its heap back to the system once more than ``M_TRIM_THRESHOLD`` of it is free. A
training step frees and re-allocates the same large tensors every step (gradients,
activations), so either path makes the kernel fault every page in again on first touch:
one minor fault per 4 KiB page. Measured on this machine (2-core AMD EPYC, torch 2.13 CPU,
1 thread, lecture-deep at batch 32 x width 1024, ``bench/bench_step.py``): 1,400-3,000
faults a step, 17.5-20 ms instead of 15.5 ms, and the figure wandered with the order in
which earlier allocations had moved the dynamic threshold.

``reuse_freed_memory`` fixes both thresholds (mallopt), so blocks up to 32 MiB come from the
heap and up to 1 GiB of freed heap stays mapped for the next step: 0 faults a step. It
changes no number a run computes, only where its memory comes from; it is process-wide,
so ``plumb train`` (and ``plumb.train.train``, which owns its process's loop) call it, and
the benchmarks call it for every configuration alike.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for the dynamic threshold (64-bit)
TRIM_THRESHOLD = 1 << 30

_done: bool | None = None


def reuse_freed_memory() -> bool:
    """Fix glibc malloc's mmap threshold at 32 MiB and its trim threshold at 1 GiB (once per
    process); True when they are set, False where the C library is not glibc or refuses."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    return _done
