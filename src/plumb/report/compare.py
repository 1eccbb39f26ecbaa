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
from plumb.report.figures import png
from plumb.report.html import e, page, sparkline
from plumb.report.tables import HEADERS, fmt, layer_rows

#: The per-layer columns compared (the latest value of each run).
COMPARED = ("std", "saturated", "grad_std", "grad_data", "update_data")


def _labels(recs: list[Record]) -> list[str]:
    """Each run's directory name, or its path where two names collide."""
    names = [r.path.name for r in recs]
    return [str(r.path) if names.count(n) > 1 else n for r, n in zip(recs, names, strict=True)]


def loss_figure(recs: list[Record], labels: list[str]) -> bytes | None:
    """Training loss (window means, log10) and the validation curve of every run, in one
    colour per run; the legend outside the axes."""
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
        with np.errstate(divide="ignore", invalid="ignore"):
            ax.plot(x, np.log10(means), color=f"C{i}", lw=1, label=f"{label}: train")
            val = getattr(rec, "val", np.zeros((0, 2)))
            if len(val):
                ax.plot(
                    val[:, 0], np.log10(val[:, 1]), "o--", ms=3, color=f"C{i}",
                    label=f"{label}: val (eval mode)",
                )  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("log10 loss")
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


def config_diff(recs: list[Record]) -> tuple[list[str], dict[str, list[Any]]]:
    """(fields that are the same everywhere, {field: value per run} for those that differ)
    over the model and training configuration (data: path and sha256)."""
    flats = []
    for r in recs:
        cfg = r.config or {}
        data = cfg.get("data", {})
        flats.append(
            _flat({"model": cfg.get("model", {}), "train": cfg.get("train", {})})
            | {"data.path": data.get("path"), "data.sha256": data.get("sha256")}
        )
    keys = sorted({k for f in flats for k in f})
    differ = {k: [f.get(k, "-") for f in flats] for k in keys}
    same = [k for k, v in differ.items() if all(x == v[0] for x in v)]
    return same, {k: v for k, v in differ.items() if k not in same}


def _losses_table(recs: list[Record], labels: list[str]) -> str:
    splits: list[str] = []
    for r in recs:
        splits += [s for s in (r.metrics or {}).get("loss", {}) if s not in splits]
    head = "<tr><th class='l'>eval mode</th>" + "".join(f"<th>{e(x)}</th>" for x in labels)
    rows = []
    for s in splits:
        vals = [(r.metrics or {}).get("loss", {}).get(s) for r in recs]
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
        body.append(f"<tr><td class='l'><code>{e(name)}</code></td>{''.join(cells)}</tr>")
    return f"<table>{head1}</tr>{head2}{''.join(body)}</table>"


def _findings_table(recs: list[Record], labels: list[str]) -> str:
    cols = []
    for r in recs:
        if r.doctor is None and not r.findings:
            cols.append('<span class="muted">the doctor did not run</span>')
        elif not r.findings:
            cols.append("healthy: nothing to flag")
        else:
            cols.append("".join(finding_html(f) for f in r.findings))
    head = "".join(f"<th class='l'>{e(x)}</th>" for x in labels)
    cells = "".join(f"<td class='l' style='vertical-align:top'>{c}</td>" for c in cols)
    return f"<table style='table-layout:fixed;width:100%'><tr>{head}</tr><tr>{cells}</tr></table>"


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
    same, differ = config_diff(recs)
    diff_rows = "".join(
        f"<tr><td class='l'><code>{e(k)}</code></td>"
        + "".join(f"<td class='l'>{e(v)}</td>" for v in vals)
        + "</tr>"
        for k, vals in differ.items()
    )
    diff = (
        "<table><tr><th class='l'>field</th>"
        + "".join(f"<th class='l'>{e(x)}</th>" for x in labels)
        + f"</tr>{diff_rows}</table>"
        if differ
        else "<p>The configurations are identical.</p>"
    )
    body = f"""<h1>plumb compare: {e(" vs ".join(labels))}</h1>
<p class="muted">{" · ".join(e(str(r.path)) for r in recs)}</p>
<h2>Loss</h2>
{_losses_table(recs, labels)}
{img}
<h2>What differs</h2>
{diff}
<p class="muted">{len(same)} further configuration fields are the same in every run.</p>
<h2>Findings</h2>
{_findings_table(recs, labels)}
<h2>Layers (latest record step; trend over the run)</h2>
{_layers_table(recs, labels)}"""
    return page("plumb compare: " + " vs ".join(labels), body)


def write_compare(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Write the comparison page of ``run_dirs`` (two or more) to ``out``."""
    if len(run_dirs) < 2:
        raise PlumbError("compare needs two or more run directories")
    recs = [load_run(d) for d in run_dirs]
    out = Path(out)
    atomic_write_bytes(out, build_compare(recs).encode("utf-8"))
    return out
