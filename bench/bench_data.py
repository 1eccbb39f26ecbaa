"""Load time and peak memory of a 1,000,000-line dataset (one process, fresh interpreter).

Writes a synthetic file of 1,000,000 name-like items (3-12 lowercase letters, seeded),
then times ``plumb.load_dataset`` on it and reports the peak resident memory of the
process above what torch's import alone takes.

    python bench/bench_data.py [--lines 1000000]
"""

from __future__ import annotations

import argparse
import random
import resource
import string
import tempfile
import time
from pathlib import Path


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=1_000_000)
    args = ap.parse_args()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "big.txt"
        path.write_text(
            "\n".join(
                "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 12)))
                for _ in range(args.lines)
            )
        )
        import torch  # noqa: F401  (counted in the baseline, not in the dataset's cost)

        from plumb.data import load_dataset

        base = peak_rss_mib()
        t0 = time.perf_counter()
        data = load_dataset(path)
        seconds = time.perf_counter() - t0
        n = sum(data.counts().values())
        stored = sum(s.X.nbytes + s.Y.nbytes for s in data.splits.values()) / 2**20
        print(
            f"{args.lines:,} lines -> {n:,} examples ({data.train.X.dtype}): "
            f"load {seconds:.2f} s, peak memory +{peak_rss_mib() - base:.0f} MiB "
            f"(examples stored: {stored:.0f} MiB)"
        )


if __name__ == "__main__":
    main()
