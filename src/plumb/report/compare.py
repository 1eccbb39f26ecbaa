"""``plumb compare RUN_A RUN_B [...]``: one self-contained page that sets runs side by side:
the losses overlaid (training and validation), the configuration fields that differ, the
eval losses, the per-layer statistics and the findings, run by run."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from plumb.doctor import finding_html
from plumb.errors import PlumbError
from plumb.io import atomic_write_bytes
from plumb.record import Record, load_run
from plumb.report.figures import classes_of, loss_axis, png
from plumb.report.html import e, page, run_headline, sparkline
from plumb.report.tables import HEADERS, fmt, layer_rows

#: The per-layer columns compared (the latest value of each run).
COMPARED = ("std", "saturated", "grad_std", "grad_data", "update_data")


def _labels(recs: list[Record]) -> list[str]:
    """Each run's directory name, or its path where two names collide."""
    names = [r.path.name for r in recs]
    return [str(r.path) if names.count(n) > 1 else n for r, n in zip(recs, names, strict=True)]


def loss_figure(recs: list[Record], labels: list[str]) -> bytes | None:
    """Training loss (window means) and the validation curve of every run, in one colour
    per run, in nats on a log axis with ln C marked; the legend outside the axes."""
    if not any(len(r.loss) for r in recs):
        return None
    fig, ax = plt.subplots(figsize=(11, 4.2), layout="constrained")
    for i, (rec, label) in enumerate(zip(recs, labels, strict=True)):
        loss = np.asarray(rec.loss, np.float64)
        if not len(loss):
            continue
        w = max(1, len(loss) // 200)
        n = len(loss) // w * w
        means = loss[:n].reshape(-1, w).mean(1) if n else loss
        x = np.arange(len(means)) * w + w / 2
        pos = np.where(means > 0, means, np.nan)  # a log axis drops <= 0
        ax.plot(x, pos, color=f"C{i}", lw=1, label=f"{label}: train")
        val = getattr(rec, "val", np.zeros((0, 2)))
        if len(val):
            ax.plot(
                val[:, 0], np.where(val[:, 1] > 0, val[:, 1], np.nan), "o--", ms=3,
                color=f"C{i}", label=f"{label}: val (eval mode)",
            )  # fmt: skip
    ax.set_xlabel("step")
    classes = {classes_of(r) for r in recs} - {None}
    loss_axis(ax, classes.pop() if len(classes) == 1 else None)
    ax.set_title("loss: training (window means) and validation")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return png(fig)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif not isinstance(v, list):
            out[f"{prefix}{k}"] = v
    return out


#: fields that change how a run is watched or saved, not what it learns
BOOKKEEPING = (
    "train.print_every",
    "train.checkpoint_every",
    "train.probe_every",
    "train.hist_every",
    "train.eval_every",
    "train.probes",
    "train.doctor",
    "train.threads",
    "train.engine",
    "train.compile",
    "train.on_nonfinite",
)


def _decays(rec: Record) -> bool:
    t = (rec.config or {}).get("train", {})
    decay = t.get("lr_decay_step")
    return decay is not None and decay < int(t.get("steps", 0))


def config_diff(recs: list[Record]) -> tuple[list[str], dict[str, list[Any]], dict[str, list[Any]]]:
    """(fields that are the same everywhere, {field: value per run} for those that differ
    and matter, {field: values} for those that differ and do not) over the model and
    training configuration (data: path and sha256). Not mattering: bookkeeping
    (``BOOKKEEPING``), and the lr decay's step and final lr when no run reaches its
    decay step."""
    flats = []
    for r in recs:
        cfg = r.config or {}
        data = cfg.get("data", {})
        flats.append(
            _flat({"model": cfg.get("model", {}), "train": cfg.get("train", {})})
            | {"data.path": data.get("path"), "data.sha256": data.get("sha256")}
            | {"preset": cfg.get("preset", "-")}
        )
    keys = sorted({k for f in flats for k in f})
    differ = {k: [f.get(k, "-") for f in flats] for k in keys}
    same = [k for k, v in differ.items() if all(x == v[0] for x in v)]
    idle = set(BOOKKEEPING)
    if not any(_decays(r) for r in recs):
        idle |= {"train.lr_decay_step", "train.lr_final"}
    matter = {k: v for k, v in differ.items() if k not in same and k not in idle}
    rest = {k: v for k, v in differ.items() if k not in same and k in idle}
    return same, matter, rest


def _score(rec: Record) -> tuple[str, float] | None:
    """What a run reached: (what, loss): the eval-mode val loss, else the mean training
    loss of its last 100 steps."""
    val = ((rec.metrics or {}).get("loss") or {}).get("val")
    if isinstance(val, int | float) and np.isfinite(val):
        return "val", float(val)
    if len(rec.loss):
        tail = np.asarray(rec.loss[-min(len(rec.loss), 100) :], np.float64)
        if np.isfinite(tail).all():
            return "training loss", float(tail.mean())
    return None


def summary(recs: list[Record], labels: list[str]) -> str:
    """Which run is better and by how much: "kaiming beats original by 0.55 nats of val
    loss (2.07 vs 2.62)", each other run in turn; plain text."""
    scores = [_score(r) for r in recs]
    kinds = {s[0] for s in scores if s}
    if len(kinds) != 1 or any(s is None for s in scores):
        return "The runs have no common loss to rank them by."
    what = kinds.pop()
    order = sorted(range(len(recs)), key=lambda i: scores[i][1])  # type: ignore[index]
    best = order[0]
    b = scores[best][1]  # type: ignore[index]
    parts = []
    for i in order[1:]:
        v = scores[i][1]  # type: ignore[index]
        if v - b < 5e-4:
            parts.append(f"{labels[best]} and {labels[i]} tie on {what} ({b:.4f})")
        else:
            parts.append(
                f"{labels[best]} beats {labels[i]} by {v - b:.3f} nats of {what} "
                f"({b:.4f} vs {v:.4f})"
            )
    return "; ".join(parts)


def _losses_table(recs: list[Record], labels: list[str]) -> str:
    splits: list[str] = []
    for r in recs:
        splits += [s for s in (r.metrics or {}).get("loss", {}) if s not in splits]
    head = "<tr><th class='l'>eval mode</th>" + "".join(f"<th>{e(x)}</th>" for x in labels)
    rows = []
    for s in splits:
        vals = [(r.metrics or {}).get("loss", {}).get(s) for r in recs]
        vals = [v if isinstance(v, int | float) and np.isfinite(v) else None for v in vals]
        best = min((v for v in vals if v is not None), default=None)
        cells = "".join(
            "<td></td>"
            if v is None
            else f"<td>{'<b>' if v == best else ''}{float(v):.4f}{'</b>' if v == best else ''}</td>"
            for v in vals
        )
        rows.append(f"<tr><td class='l'>{e(s)}</td>{cells}</tr>")
    bests = [(r.metrics or {}).get("best_val") for r in recs]
    if any(bests):
        cells = "".join(
            f"<td>{float(b['loss']):.4f} @ {int(b['step']):,}</td>" if b else "<td></td>"
            for b in bests
        )
        rows.append(f"<tr><td class='l'>best val during training</td>{cells}</tr>")
    return f"<table>{head}</tr>{''.join(rows)}</table>" if rows else ""


def _layers_table(recs: list[Record], labels: list[str]) -> str:
    per_run = [{row.name: row for row in layer_rows(r)} for r in recs]
    short = {n: row.short for rows in per_run for n, row in rows.items()}
    order: list[str] = []
    for rows in per_run:
        order += [n for n in rows if n not in order]
    if not order:
        return '<p class="muted">No layer statistics recorded.</p>'
    head1 = "<tr><th class='l' rowspan='2'>layer</th>" + "".join(
        f"<th colspan='{len(recs)}'>{e(HEADERS[c])}</th>" for c in COMPARED
    )
    head2 = "<tr>" + "".join(f"<th>{e(x)}</th>" for _ in COMPARED for x in labels) + "</tr>"
    body = []
    for name in order:
        cells = []
        for c in COMPARED:
            for rows in per_run:
                r = rows.get(name)
                if r is None or c not in r.latest:
                    cells.append("<td></td>")
                else:
                    cells.append(
                        f"<td>{e(fmt(c, r.latest[c]))}<br>{sparkline(r.series[c], 60, 14)}</td>"
                    )
        body.append(
            f"<tr><td class='l'><code title='{e(name)}'>{e(short[name])}</code></td>"
            f"{''.join(cells)}</tr>"
        )
    return f"<table>{head1}</tr>{head2}{''.join(body)}</table>"


def _findings_table(recs: list[Record], labels: list[str]) -> str:
    cols = []
    for r in recs:
        head = run_headline(r).html()
        if r.doctor is None and not r.findings:
            cols.append(head)
        else:
            cols.append(head + "".join(finding_html(f, r.config) for f in r.findings))
    head = "".join(f"<th class='l'>{e(x)}</th>" for x in labels)
    cells = "".join(f"<td class='l top'>{c}</td>" for c in cols)
    return f"<table class='fixed'><tr>{head}</tr><tr>{cells}</tr></table>"


def _diff_table(differ: dict[str, list[Any]], labels: list[str]) -> str:
    rows = "".join(
        f"<tr><td class='l'><code>{e(k)}</code></td>"
        + "".join(f"<td class='l'>{e(v)}</td>" for v in vals)
        + "</tr>"
        for k, vals in differ.items()
    )
    return (
        "<table><tr><th class='l'>field</th>"
        + "".join(f"<th class='l'>{e(x)}</th>" for x in labels)
        + f"</tr>{rows}</table>"
    )


def build_compare(recs: list[Record]) -> str:
    labels = _labels(recs)
    fig = loss_figure(recs, labels)
    img = (
        f'<figure><img alt="loss" src="data:image/png;base64,{base64.b64encode(fig).decode()}">'
        "<figcaption>Each run in its own colour: training loss (solid, window means) and "
        "validation loss in eval mode (dashed, when evaluated during training).</figcaption>"
        "</figure>"
        if fig
        else '<p class="muted">No losses recorded.</p>'
    )
    same, differ, idle = config_diff(recs)
    diff = _diff_table(differ, labels) if differ else "<p>No setting that matters differs.</p>"
    idle_html = (
        f"<details><summary>{len(idle)} more differ without changing what the runs learn "
        "(bookkeeping, or an lr decay no run reaches)</summary>"
        f"{_diff_table(idle, labels)}</details>"
        if idle
        else ""
    )
    body = f"""<h1>plumb compare: {e(" vs ".join(labels))}</h1>
<div class="headline unknown"><b>{e(summary(recs, labels))}</b></div>
<h2>What differs</h2>
{diff}
{idle_html}
<p class="muted">{len(same)} further configuration fields are the same in every run.</p>
<h2>Loss</h2>
{_losses_table(recs, labels)}
{img}
<h2>Findings</h2>
{_findings_table(recs, labels)}
<h2>Layers (latest record step; trend over the run)</h2>
{_layers_table(recs, labels)}
<p class="muted">{" · ".join(e(str(r.path)) for r in recs)}</p>"""
    return page("plumb compare: " + " vs ".join(labels), body)


def write_compare(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Write the comparison page of ``run_dirs`` (two or more) to ``out``."""
    if len(run_dirs) < 2:
        raise PlumbError("compare needs two or more run directories")
    recs = [load_run(d) for d in run_dirs]
    out = Path(out)
    atomic_write_bytes(out, build_compare(recs).encode("utf-8"))
    return out
