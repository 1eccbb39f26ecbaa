"""TensorBoard export of a probe record (``pip install 'plumb[tensorboard]'``).

Tags: ``loss`` (every step), ``layer/STAT/NAME`` and ``param/STAT/NAME`` (record steps),
``hist/SECTION/NAME`` histograms (histogram steps, bucket limits from the recorded range).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from plumb.errors import PlumbError
from plumb.record import History, load_run


def _writer(logdir: str | Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise PlumbError(
            "TensorBoard export needs the tensorboard package: pip install 'plumb[tensorboard]'"
        ) from None
    return SummaryWriter(log_dir=str(logdir))


class TensorBoardSink:
    """A Monitor sink: writes each flush's rows, histograms and losses as they come."""

    def __init__(self, logdir: str | Path):
        self.logdir = Path(logdir)
        self.w = _writer(logdir)
        self._losses_written = 0

    def write(self, history, rows: list[dict[str, Any]], new_hists: dict[str, list]) -> None:
        loss = history.loss
        for step in range(self._losses_written, len(loss)):
            self.w.add_scalar("loss", float(loss[step]), step)
        self._losses_written = len(loss)
        for row in rows:
            for section in ("layer", "param"):
                for name, stats in row.get(section, {}).items():
                    for stat, v in stats.items():
                        if v is not None and np.isfinite(v):
                            self.w.add_scalar(f"{section}/{stat}/{name}", v, row["step"])
        for key, entries in new_hists.items():
            for step, counts, rng in entries:
                add_histogram(self.w, f"hist/{key}", counts, rng, step)
        self.w.flush()

    def val(self, step: int, loss: float) -> None:
        """The validation loss (eval mode) at ``step``: the scalar ``loss/val``."""
        self.w.add_scalar("loss/val", float(loss), int(step))
        self.w.flush()

    def close(self) -> None:
        self.w.close()


def add_histogram(w, tag: str, counts: np.ndarray, rng: np.ndarray, step: int) -> None:
    lo, hi = float(rng[0]), float(rng[1])
    if not (np.isfinite(lo) and np.isfinite(hi)) or counts.sum() == 0:
        return
    bins = len(counts)
    hi = hi if hi > lo else lo + 1e-12
    edges = np.linspace(lo, hi, bins + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    c = counts.astype(np.float64)
    w.add_histogram_raw(
        tag,
        min=lo,
        max=hi,
        num=int(c.sum()),
        sum=float((c * centers).sum()),
        sum_squares=float((c * centers**2).sum()),
        bucket_limits=edges[1:].tolist(),
        bucket_counts=c.tolist(),
        global_step=int(step),
    )


def export_tensorboard(run_dir: str | Path, logdir: str | Path | None = None) -> Path:
    """Write a saved record as TensorBoard event files (default ``RUN_DIR/tensorboard``)."""
    rec = load_run(run_dir)
    logdir = Path(logdir) if logdir is not None else Path(run_dir) / "tensorboard"
    sink = TensorBoardSink(logdir)
    history = History(rec.meta)
    history.loss_chunks = [np.asarray(rec.loss)]
    hists: dict[str, list] = {}
    for series in rec.histogram_keys():
        section, _, name = series.partition("/")
        steps, counts, ranges = rec.histogram(section, name)
        hists[series] = list(zip(steps.tolist(), counts, ranges, strict=True))
    sink.write(history, rec.rows, hists)
    for step, loss in rec.val:
        sink.val(int(step), float(loss))
    sink.close()
    return logdir
