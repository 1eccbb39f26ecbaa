"""Views of a probe record: figures (PNG), the HTML report, TensorBoard, the terminal."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from plumb.errors import PlumbError
from plumb.io import atomic_write_bytes
from plumb.record import Record
from plumb.report.figures import FIGURES, png, render_all
from plumb.report.html import (
    build_html,
    e,
    essentials_html,
    figures_html,
    findings_html,
    layer_table_html,
    losses_html,
    run_headline,
)
from plumb.style import styled


class RunView(Record):
    """A run directory read back for a notebook (``plumb.load_run``): the record, and its
    views. ``rec.plot(NAME)`` returns one figure (a ``matplotlib.figure.Figure``):
    ``activations``, ``gradients``, ``weight_gradients``, ``update_ratio`` (the lecture's
    four), ``loss``, ``saturation``, ``histograms_over_time``. In Jupyter the object shows
    itself (``_repr_html_``): the verdict, the losses with the loss figure, the per-layer
    table with sparklines."""

    def plot(self, name: str) -> Figure:
        if name not in FIGURES:
            raise PlumbError(f"unknown figure {name!r}: choose one of {', '.join(FIGURES)}")
        fig = FIGURES[name](self)
        if fig is None:
            raise PlumbError(f"{self.path} has nothing to draw for {name!r} yet")
        plt.close(fig)  # out of pyplot's list: Jupyter shows the returned figure once
        return fig

    def _repr_html_(self) -> str:
        fig = FIGURES["loss"](self)
        pngs = {"loss": png(fig)} if fig is not None else {}
        return styled(
            f"<p><b>plumb run {e(self.path.name)}</b> · {len(self.rows)} record steps</p>"
            f"{run_headline(self).html()}{essentials_html(self)}"
            f"<h4>Findings</h4>{findings_html(self)}"
            f"<h4>Loss</h4>{losses_html(self)}{figures_html(pngs, ('loss',))}"
            f"<h4>Layers</h4>{layer_table_html(self)}"
        )


def load_run(path: str | Path) -> RunView:
    """Read a run directory (the probe record and, for a ``plumb train`` run, its config,
    metrics, samples and findings) for a notebook: see :class:`RunView`."""
    return RunView(path)


def write_report(
    run_dir: str | Path, *, figures_dir: bool = True, refresh: int | None = None
) -> Path:
    """(Re)build ``RUN_DIR/report.html`` (and ``RUN_DIR/figures/*.png``) from the record
    (of a finished run, or what a run in progress has flushed: nothing of the run's is
    locked or changed). ``refresh``: the page reloads itself every that many seconds."""
    rec = load_run(run_dir)
    pngs = render_all(rec)
    if figures_dir:
        for name, data in pngs.items():
            atomic_write_bytes(Path(run_dir) / "figures" / f"{name}.png", data)
    path = Path(run_dir) / "report.html"
    atomic_write_bytes(path, build_html(rec, pngs, refresh).encode("utf-8"))
    return path


__all__ = ["RunView", "build_html", "load_run", "render_all", "write_report"]
