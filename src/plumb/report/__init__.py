"""Views of a probe record: figures (PNG), the HTML report, TensorBoard, the terminal."""

from __future__ import annotations

from pathlib import Path

from plumb.io import atomic_write_bytes
from plumb.record import load_run
from plumb.report.figures import render_all
from plumb.report.html import build_html


def write_report(run_dir: str | Path, *, figures_dir: bool = True) -> Path:
    """(Re)build ``RUN_DIR/report.html`` (and ``RUN_DIR/figures/*.png``) from the record."""
    rec = load_run(run_dir)
    pngs = render_all(rec)
    if figures_dir:
        for name, data in pngs.items():
            atomic_write_bytes(Path(run_dir) / "figures" / f"{name}.png", data)
    path = Path(run_dir) / "report.html"
    atomic_write_bytes(path, build_html(rec, pngs).encode("utf-8"))
    return path


__all__ = ["build_html", "render_all", "write_report"]
