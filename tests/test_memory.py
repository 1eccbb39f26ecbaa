"""plumb.memory: large freed blocks come from the heap and stay there for the next step."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# In a fresh process: a 24 MiB tensor written and freed, with glibc's mallinfo2 read after
# each. hblkhd: bytes held in mmap'ed blocks (a block mapped on its own, given back to the
# system when freed, faulted in afresh next time); fordblks: free bytes the heap keeps
# (not trimmed) for the next allocations.
SCRIPT = """
import ctypes, sys, torch

class Info(ctypes.Structure):
    _fields_ = [(f, ctypes.c_size_t) for f in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
if sys.argv[1] == "on":
    from plumb.memory import reuse_freed_memory
    assert reuse_freed_memory() is True
t = torch.ones(6 << 20)
held = libc.mallinfo2()
del t
freed = libc.mallinfo2()
print(held.hblkhd, freed.fordblks)
"""


def mallinfo(mode: str) -> tuple[int, int]:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True
    )
    mapped, kept = out.stdout.split()
    return int(mapped), int(kept)


@pytest.mark.skipif(not GLIBC, reason="mallopt thresholds are glibc's")
def test_a_large_tensor_comes_from_the_heap_and_stays_there():
    MiB = 1 << 20
    # glibc's defaults: a block over 128 KiB is mapped on its own and unmapped when freed
    # (the dynamic threshold rises only after such frees, and the heap's top is trimmed
    # past twice it), so a step's gradients are faulted in again, page by page
    mapped, kept = mallinfo("off")
    assert mapped >= 24 * MiB and kept < 24 * MiB
    # fixed thresholds: from the heap, and still there once freed
    mapped, kept = mallinfo("on")
    assert mapped < 24 * MiB and kept >= 24 * MiB
