"""plumb.memory: large freed blocks are reused, not faulted in again every step."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# A training step's pattern: several 4 MiB tensors made, written and freed, again and again.
# Prints the minor page faults per repetition (one per 4 KiB page touched afresh).
SCRIPT = """
import resource, sys, torch
if sys.argv[1] == "on":
    from plumb.memory import reuse_freed_memory
    assert reuse_freed_memory() is True
def step():
    ts = [torch.ones(1 << 20) for _ in range(4)]
    del ts
step(); step()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 10)
"""


def faults(mode: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip())


@pytest.mark.skipif(not GLIBC, reason="mallopt thresholds are glibc's")
def test_freed_tensors_are_reused_without_page_faults():
    # glibc's defaults give the top of the heap back once 8 MiB of it is free: the 16 MiB
    # a step frees is mapped afresh next step (hundreds of faults); with the thresholds
    # fixed, none
    before, after = faults("off"), faults("on")
    assert before >= 256, before  # at least 1 MiB of pages faulted in again per step
    assert after <= 8, after
