"""The lecture's figures (and a few more) drawn from a probe record, headless (Agg).

Each function takes a ``plumb.record.Record`` and returns a matplotlib Figure, or None
when the record has nothing to draw. ``render_all`` returns {name: PNG bytes}.
"""

from __future__ import annotations

import io
import math
import sys

import matplotlib
import numpy as np

if "ipykernel" not in sys.modules:  # headless PNGs; a notebook keeps its inline backend
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from plumb.kinds import RECTIFYING, SATURATING
from plumb.record import UPDATE_DATA, Record

UPDATE_GUIDE = -3.0  # log10(1e-3): the lecture's rule of thumb for update:data


def short_names(names: list[str]) -> dict[str, str]:
    """Drop the prefix every name shares (``layers.tanh1`` -> ``tanh1``)."""
    if len(names) < 2:
        return {n: n or "(model)" for n in names}
    parts = [n.split(".") for n in names]
    k = 0
    while all(len(p) > k + 1 for p in parts) and len({p[k] for p in parts}) == 1:
        k += 1
    return {n: ".".join(p[k:]) or "(model)" for n, p in zip(names, parts, strict=True)}


def nonlinear_layers(rec: Record) -> list[str]:
    """The layers the lecture plots: saturating/rectifying activations if there are
    any, else every probed layer."""
    names = rec.layer_names()
    chosen = [n for n in names if rec.kind(n) in SATURATING + RECTIFYING + ("gelu", "silu")]
    return chosen or names


def _density(counts: np.ndarray, rng: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = float(rng[0]), float(rng[1])
    bins = len(counts)
    edges = np.linspace(lo, hi, bins + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    width = (hi - lo) / bins if hi > lo else 1.0
    total = counts.sum()
    return centers, counts / (total * width) if total else counts.astype(float)


MAX_LEGEND = 12  # entries a legend lists; the rest are summed up in one line


def _legend(ax, n_lines: int) -> None:
    """A legend beside the plot (never over the data); past MAX_LEGEND lines, the first
    and last few by name and one entry for the rest."""
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return
    if len(handles) > MAX_LEGEND:
        keep = list(range(MAX_LEGEND // 2)) + list(
            range(len(handles) - MAX_LEGEND // 2 + 1, len(handles))
        )
        hidden = len(handles) - len(keep)
        handles = [handles[i] for i in keep]
        labels = [labels[i] for i in keep]
        handles.insert(MAX_LEGEND // 2, plt.Line2D([], [], color="none"))
        labels.insert(MAX_LEGEND // 2, f"... {hidden} more (in forward order)")
    ax.legend(
        handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False
    )


def _compact(v: float, _pos: int | None = None) -> str:
    """A step count in few characters: 950, 15k, 1.2M (long labels run into each other)."""
    a = abs(v)
    if a >= 1e6:
        return f"{v / 1e6:g}M"
    if a >= 1e3:
        return f"{v / 1e3:g}k"
    return f"{v:g}"


def step_axis(ax, bins: int = 6) -> None:
    """An x axis of steps: at most ``bins`` integer ticks, labelled compactly."""
    ax.xaxis.set_major_locator(MaxNLocator(nbins=bins, integer=True))
    ax.xaxis.set_major_formatter(FuncFormatter(_compact))
    ax.set_xlabel("step", fontsize=ax.xaxis.label.get_fontsize())


MAX_PANELS = 12  # histograms-over-time panels; deeper models show layers spread over depth


def spread(names: list[str], k: int) -> list[str]:
    """At most ``k`` of ``names``, evenly over the list, first and last included."""
    if len(names) <= k:
        return names
    idx = np.unique(np.round(np.linspace(0, len(names) - 1, k)).astype(int))
    return [names[i] for i in idx]


def _figure(height: float = 4.0):
    return plt.subplots(figsize=(11, height), layout="constrained")


def hist_step(rec: Record, section: str, names: list[str]) -> int | None:
    """The latest histogram step of ``section`` among ``names``."""
    last = [
        int(rec.histogram(section, n)[0][-1]) for n in names if len(rec.histogram(section, n)[0])
    ]
    return max(last) if last else None


def _distribution(rec: Record, section: str, names: list[str], title: str, label) -> Figure | None:
    """One density line per name, all from the same histogram step (named in the title;
    the labels' statistics are that step's)."""
    step = hist_step(rec, section, names)
    if step is None:
        return None
    drawn = False
    fig, ax = _figure()
    short = short_names(names)
    for name in names:
        steps, counts, ranges = rec.histogram(section, name)
        at = np.flatnonzero(steps == step)
        if len(at) == 0 or not np.all(np.isfinite(ranges[at[0]])):
            continue
        x, y = _density(counts[at[0]], ranges[at[0]])
        ax.plot(x, y, label=label(short[name], name, step))
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_title(f"{title} (step {step})")
    ax.set_ylabel("density")
    ax.set_ylim(bottom=0)  # from 0: a U shape is as deep as it is
    _legend(ax, len(names))
    return fig


def activation_distribution(rec: Record) -> Figure | None:
    names = nonlinear_layers(rec)

    def label(short: str, name: str, step: int) -> str:
        s = rec.at(step, "layer", name)
        text = f"{short}: mean {s.get('mean', np.nan):+.2f}, std {s.get('std', np.nan):.2f}"
        if "saturated" in s:
            text += f", saturated {100 * s['saturated']:.1f}%"
        if "zero" in s:
            text += f", zero {100 * s['zero']:.1f}%"
        return text

    return _distribution(rec, "layer", names, "activation distribution", label)


def gradient_distribution(rec: Record) -> Figure | None:
    names = nonlinear_layers(rec)

    def label(short: str, name: str, step: int) -> str:
        s = rec.at(step, "layer", name)
        return (
            f"{short}: mean {s.get('grad_mean', np.nan):+.2e}, std {s.get('grad_std', np.nan):.2e}"
        )

    return _distribution(rec, "layer_grad", names, "gradient distribution", label)


def weight_params(rec: Record) -> list[str]:
    """Weights as the lecture plots them: parameters with 2+ dimensions."""
    return [p["name"] for p in rec.params if len(p["shape"]) >= 2]


def weight_gradient_distribution(rec: Record) -> Figure | None:
    names = weight_params(rec)

    def label(short: str, name: str, step: int) -> str:
        s = rec.at(step, "param", name)
        shape = next(tuple(p["shape"]) for p in rec.params if p["name"] == name)
        return f"{short} {shape}: grad:data {s.get('grad_data', np.nan):.2e}"

    return _distribution(rec, "param_grad", names, "weight gradient distribution", label)


def update_ratio(rec: Record) -> Figure | None:
    names = weight_params(rec) or [p["name"] for p in rec.params]
    short = short_names(names)
    fig, ax = _figure()
    drawn = False
    for name in names:
        steps, values = rec.series("param", name, "update_data")
        if len(steps):
            ax.plot(steps, values, label=short[name])
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.axhline(UPDATE_GUIDE, color="k", linestyle="--", linewidth=1, label="1e-3 (guide)")
    ax.set_title(f"update:data ratio, {UPDATE_DATA}")
    step_axis(ax)
    ax.set_ylabel("log10 ratio")
    _legend(ax, len(names))
    return fig


def classes_of(rec: Record) -> int | None:
    """The number of classes of a plumb run (its vocabulary), else None."""
    v = ((rec.config or {}).get("model") or {}).get("vocab_size")
    return int(v) if isinstance(v, int) and v > 1 else None


def loss_axis(ax, classes: int | None) -> None:
    """Losses in nats on a log axis (plain numbers on the ticks), ln C marked: the loss
    of guessing uniformly among C classes, where a calibrated model starts."""
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    if classes:
        ax.axhline(math.log(classes), ls=":", color="0.4", lw=1, label=f"ln {classes} = {math.log(classes):.3f} (uniform guess)")  # fmt: skip
    ax.set_ylabel("loss (nats, log axis)")


def loss_curve(rec: Record, window: int | None = None) -> Figure | None:
    """The training loss (window means) and, when evaluated during training, the
    validation curve with its best point; in nats on a log axis, ln C marked."""
    loss = np.asarray(rec.loss, np.float64)
    if len(loss) == 0:
        return None
    window = window or max(1, len(loss) // 200)
    n = len(loss) // window * window
    fig, ax = _figure()
    val = getattr(rec, "val", np.zeros((0, 2)))
    pos = lambda a: np.where(a > 0, a, np.nan)  # noqa: E731 - a log axis drops <= 0
    if n >= window and window > 1:
        means = loss[:n].reshape(-1, window).mean(1)
        ax.plot(
            np.arange(len(means)) * window + window / 2,
            pos(means),
            label=f"train (training mode, mean of {window} steps)",
        )
    else:
        ax.plot(np.arange(len(loss)), pos(loss), label="train (training mode)")
    if len(val):
        ax.plot(val[:, 0], pos(val[:, 1]), "o-", ms=3, label="val (eval mode)")
    if len(val) and np.isfinite(val[:, 1]).any():  # (a diverged run's evaluations are NaN)
        best = int(np.nanargmin(val[:, 1]))
        ax.plot(
            val[best, 0],
            pos(val[best : best + 1, 1]),
            "*",
            ms=12,
            color="C3",
            label=f"best val {val[best, 1]:.4f} at step {int(val[best, 0]):,}",
        )
    loss_axis(ax, classes_of(rec))
    ax.legend(loc="upper right", fontsize=8)
    every = f", mean of {window} steps" if window > 1 else ""
    ax.set_title("loss" if len(val) else f"training loss{every}")
    step_axis(ax)
    return fig


def saturation_map(rec: Record) -> Figure | None:
    steps, maps = rec.saturation_maps()
    if len(steps) == 0:
        return None
    layer = rec.meta.get("saturation_layer") or "?"
    m = maps[-1]
    fig, ax = plt.subplots(
        figsize=(10, min(8, max(2.5, 10 * m.shape[0] / max(m.shape[1], 1)))), layout="constrained"
    )
    ax.imshow(m, cmap="gray", interpolation="nearest", vmin=0, vmax=1, aspect="auto")
    kind = rec.kind(layer)
    what = (
        "saturated (|t| > 0.97)"
        if kind == "tanh"
        else "saturated"
        if kind in SATURATING
        else "zero"
    )
    ax.set_title(f"{short_names([layer])[layer]} at step {int(steps[-1])}: white = {what}")
    ax.set_xlabel("unit")
    ax.set_ylabel("example")
    return fig


def histogram_heatmaps(rec: Record, section: str = "layer") -> Figure | None:
    """fastai's "colorful dimension": per layer, the histogram of every record step as a
    column (log(1 + count)), on a common value grid per layer."""
    every = [n for n in nonlinear_layers(rec) if len(rec.histogram(section, n)[0]) >= 2]
    if not every:
        return None
    names = spread(every, MAX_PANELS)
    short = short_names(every)
    cols = min(3, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(
        rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False, layout="constrained"
    )
    for ax, name in zip(axes.flat, names, strict=False):
        steps, counts, ranges = rec.histogram(section, name)
        finite = np.all(np.isfinite(ranges), axis=1)
        steps, counts, ranges = steps[finite], counts[finite], ranges[finite]
        if len(steps) == 0:
            continue
        lo, hi = float(ranges[:, 0].min()), float(ranges[:, 1].max())
        if hi <= lo:  # a constant layer (all zero: dead): a unit-wide band around it
            lo, hi = lo - 0.5, lo + 0.5
        grid = np.linspace(lo, hi, counts.shape[1] + 1)
        image = np.zeros((counts.shape[1], len(steps)))
        for j, (c, (a, b)) in enumerate(zip(counts, ranges, strict=True)):
            centers = a + (np.arange(len(c)) + 0.5) * (b - a) / len(c)
            idx = np.clip(np.searchsorted(grid, centers) - 1, 0, len(grid) - 2)
            np.add.at(image[:, j], idx, c)
        im = ax.imshow(
            np.log1p(image),
            origin="lower",
            aspect="auto",
            extent=(float(steps[0]), float(steps[-1]), lo, hi),
            cmap="viridis",
            interpolation="nearest",
        )
        ax.set_title(short[name], fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("value", fontsize=8)
        bar = fig.colorbar(im, ax=ax, pad=0.01)
        bar.set_label("log(1 + count)", fontsize=7)
        bar.ax.tick_params(labelsize=7)
        step_axis(ax, bins=4)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    shown = (
        ""
        if len(names) == len(every)
        else f": {len(names)} of {len(every)} layers, spread over depth"
    )
    fig.suptitle(f"activation histograms over time (log(1 + count)){shown}")
    return fig


FIGURES = {
    "activations": activation_distribution,
    "gradients": gradient_distribution,
    "weight_gradients": weight_gradient_distribution,
    "update_ratio": update_ratio,
    "loss": loss_curve,
    "saturation": saturation_map,
    "histograms_over_time": histogram_heatmaps,
}


def png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def render_all(rec: Record) -> dict[str, bytes]:
    out = {}
    for name, draw in FIGURES.items():
        fig = draw(rec)
        if fig is not None:
            out[name] = png(fig)
    return out
