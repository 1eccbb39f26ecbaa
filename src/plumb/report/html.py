"""The self-contained HTML report: one file, figures inline as data: URIs, no scripts.

Every string that comes from data or the user (items, samples, layer names, config
values, findings) goes through ``html.escape``; a Content-Security-Policy forbids
scripts and every fetch, so the page cannot run or load anything even if a string
escaped escaping.
"""

from __future__ import annotations

import base64
import html
import json
import math
import time
from typing import Any

from plumb.doctor import finding_html
from plumb.doctor.fixes import Headline, headline
from plumb.doctor.rules import CODES
from plumb.record import UPDATE_DATA, Record
from plumb.report.figures import FIGURES
from plumb.report.tables import COLUMNS, HEADERS, flagged_cells, fmt, layer_rows
from plumb.style import STYLE

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

CAPTIONS = {
    "activations": "Distribution of each activation layer's outputs at the last histogram step "
    "(the lecture's first plot). Saturated tanh units sit at ±1.",
    "gradients": "Distribution of the gradient flowing into each activation layer's output. "
    "Healthy: similar widths across depth.",
    "weight_gradients": "Distribution of each weight's gradient, with grad:data = std(grad)/std(W).",
    "update_ratio": f"update:data = {UPDATE_DATA} per weight over training; the dashed line is "
    "the lecture's ~1e-3 guide.",
    "loss": "Training loss in nats (training mode, averaged over windows of steps) on a log "
    "axis; the dotted line is ln C, the loss of a uniform guess among C classes.",
    "saturation": "Saturation map of one layer for one batch: white = the unit passes "
    "(almost) no gradient for that example; an all-white column is a dead unit.",
    "histograms_over_time": "Histogram of each activation layer at every histogram step "
    "(fastai's colorful dimension).",
}


def e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def page(title: str, body: str, refresh: int | None = None) -> str:
    """The one page shell of everything plumb writes as HTML (the report, the experiment
    pages and their index): self-contained, the Content-Security-Policy that forbids
    scripts and every fetch, the shared style. ``body`` is trusted HTML (escape what
    goes into it with ``e``). ``refresh``: seconds after which the browser reloads the
    page (a meta refresh: no script, so the policy stays as it is)."""
    again = f'<meta http-equiv="refresh" content="{int(refresh)}">\n' if refresh else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
{again}
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(title)}</title><style>{STYLE}</style></head>
<body class="plumb">
{body}
</body></html>
"""


def sparkline(values: list[float], width: int = 90, height: int = 18) -> str:
    """An inline SVG polyline of ``values`` (finite ones), scaled to the box."""
    pts = [(i, v) for i, v in enumerate(values) if v is not None and math.isfinite(v)]
    if len(pts) < 2:
        return ""
    lo, hi = min(v for _, v in pts), max(v for _, v in pts)
    span = hi - lo or 1.0
    n = max(len(values) - 1, 1)
    coords = " ".join(
        f"{i / n * (width - 2) + 1:.1f},{height - 1 - (v - lo) / span * (height - 2):.1f}"
        for i, v in pts
    )
    return (
        f'<svg width="{width}" height="{height}" role="img" aria-label="trend">'
        f'<polyline fill="none" stroke="#369" stroke-width="1.2" points="{coords}"/></svg>'
    )


def _kv_table(d: dict[str, Any]) -> str:
    rows = "".join(
        f'<tr><td class="l"><code>{e(k)}</code></td><td class="l">{e(_short(v))}</td></tr>'
        for k, v in d.items()
    )
    return f"<table>{rows}</table>"


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, list | dict):
        text = json.dumps(v, ensure_ascii=False)
        return text if len(text) <= 160 else text[:157] + "..."
    return str(v)


STOPPED = {
    "signal": "interrupted by a signal after step {steps:,} of {total:,}: resume with "
    "`plumb train --resume RUN_DIR`",
    "nonfinite": "stopped at step {steps:,} of {total:,} by a non-finite loss or gradient "
    "(see Findings); the last good checkpoint is kept",
}


def _ended_early(rec: Record) -> str:
    m = rec.metrics or {}
    if m.get("stopped") not in STOPPED:
        return ""
    text = STOPPED[m["stopped"]].format(
        steps=int(m.get("steps", 0)), total=int(m.get("steps_configured", 0))
    )
    return f'<div class="finding error"><b>This run ended early:</b> {e(text)}</div>'


def _loss(v: Any) -> str:
    """A loss to 4 decimals; a non-finite one (null in JSON) as "not finite"."""
    return f"{float(v):.4f}" if isinstance(v, int | float) and math.isfinite(v) else "not finite"


def losses_html(rec: Record) -> str:
    """The eval-mode losses of the splits, the best validation point, the training loss."""
    parts = []
    m = rec.metrics or {}
    losses = m.get("loss", {})
    if losses:
        cells = "".join(f"<th>{e(k)}</th>" for k in losses)
        vals = "".join(f"<td>{_loss(v)}</td>" for v in losses.values())
        parts.append(f"<table><tr><th>eval mode</th>{cells}</tr><tr><td></td>{vals}</tr></table>")
    best = m.get("best_val")
    if best:
        parts.append(
            f"<p>best validation loss during training: {float(best['loss']):.4f} at step "
            f"{int(best['step']):,} (of {len(m.get('val_curve', {}).get('steps', []))} "
            "evaluations in eval mode)</p>"
        )
    if len(rec.loss):
        tail = rec.loss[-min(len(rec.loss), 100) :]
        parts.append(
            f"<p>training loss: first step {float(rec.loss[0]):.4f}, "
            f"mean of the last {len(tail)} steps {float(tail.mean()):.4f}</p>"
        )
    return "\n".join(parts)


def _summary(rec: Record) -> str:
    """The run's details: facts, configuration, data, samples (folded in the report)."""
    parts = []
    m = rec.metrics or {}
    if rec.config:
        cfg = rec.config
        facts = {
            k: m[k]
            for k in ("steps", "step0_loss", "num_parameters", "train_seconds", "us_per_step")
            if k in m
        }
        vocab = cfg.get("data", {}).get("vocab")
        if vocab:
            facts["expected initial loss ln(V)"] = math.log(len(vocab) + 1)
        if facts:
            parts.append("<h3>Run</h3>" + _kv_table(facts))
        parts.append(
            '<div class="grid"><div><h3>Model</h3>'
            + _kv_table(cfg.get("model", {}))
            + "</div><div><h3>Training</h3>"
            + _kv_table(cfg.get("train", {}))
            + "</div><div><h3>Data</h3>"
            + _kv_table({k: v for k, v in cfg.get("data", {}).items()})
            + "</div></div>"
        )
    else:
        parts.append(
            f'<p class="muted">A Monitor record ({e(rec.meta.get("model", "model"))}, '
            f"{len(rec.loss):,} steps) without a plumb run config.</p>"
        )
    preview = (rec.extras or {}).get("data_preview", {})
    if preview:
        items = "".join(
            f"<tr><td class='l'>{e(split)}</td><td class='l mono'>"
            + ", ".join(e(w) for w in words)
            + "</td></tr>"
            for split, words in preview.items()
        )
        parts.append(f"<h3>Dataset items (first of each split)</h3><table>{items}</table>")
    if rec.samples:
        items = "".join(
            f"<tr><td class='l mono'>{e(w)}</td><td class='l muted'>{e(where)}</td></tr>"
            for w, where in rec.samples
        )
        parts.append(f"<h3>Samples</h3><table>{items}</table>")
    return "\n".join(parts)


def findings_html(rec: Record) -> str:
    if rec.doctor is not None and not rec.findings:
        return (
            '<p class="muted">The doctor checked this run and found nothing to flag '
            f"({len(CODES) - 1} checks: docs/doctor.md).</p>"
        )
    if not rec.findings:
        return '<p class="muted">No findings recorded for this run.</p>'
    return "\n".join(finding_html(f, rec.config) for f in rec.findings)


def run_headline(rec: Record) -> Headline:
    """The run's verdict: problems and the first fix, or healthy with what it reached."""
    m = rec.metrics or {}
    val = (m.get("loss") or {}).get("val")
    if isinstance(val, int | float):
        result = f"val {val:.4f}"
    elif len(rec.loss):
        tail = rec.loss[-min(len(rec.loss), 100) :]
        result = f"training loss {float(tail.mean()):.4f}"
    else:
        result = ""
    steps = int(m.get("steps", len(rec.loss)))
    findings = rec.findings if rec.doctor is not None or rec.findings else None
    return headline(findings, steps, result, rec.config)


def essentials(rec: Record) -> list[tuple[str, str]]:
    """What the run was, in a few (name, value) pairs: model, steps and batch, optimizer
    and lr schedule, the engine that ran, time, device."""
    cfg, m = rec.config or {}, rec.metrics or {}
    model, train = cfg.get("model", {}), cfg.get("train", {})
    out = []
    if cfg.get("preset"):
        out.append(("preset", str(cfg["preset"])))
    if model:
        norm = model.get("norm")
        out.append(
            (
                "model",
                f"{model.get('n_layers')} x {model.get('n_hidden')} {model.get('activation')}"
                + (f", {norm} norm" if norm and norm != "none" else "")
                + f", init {model.get('init')}",
            )
        )
    if "num_parameters" in m:
        out.append(("parameters", f"{int(m['num_parameters']):,}"))
    steps = m.get("steps", train.get("steps", len(rec.loss)))
    if train:
        out.append(("steps", f"{int(steps):,} x batch {train.get('batch_size')}"))
        lr, decay = train.get("lr"), train.get("lr_decay_step")
        sched = f"{lr:g}"
        if decay is not None and decay < int(train.get("steps", 0)):
            sched += f" -> {train.get('lr_final'):g} at step {int(decay):,}"
        else:
            sched += " (constant)"
        out.append(("optimizer", f"{train.get('optimizer')}, lr {sched}"))
    else:
        out.append(("steps", f"{len(rec.loss):,}"))
    if "engine" in m:
        out.append(("engine", str(m["engine"])))
    if "train_seconds" in m:
        t = f"{float(m['train_seconds']):.1f} s"
        if m.get("compile_seconds"):
            t += f" ({float(m['compile_seconds']):.1f} s compiling)"
        out.append(("time", t))
    if train.get("device"):
        out.append(("device", str(train["device"])))
    return out


def essentials_html(rec: Record) -> str:
    pairs = essentials(rec)
    return '<p class="essentials">' + " · ".join(f"{e(k)} <b>{e(v)}</b>" for k, v in pairs) + "</p>"


def layer_table_html(rec: Record) -> str:
    rows = layer_rows(rec)
    if not rows:
        return '<p class="muted">No layer statistics recorded.</p>'
    head = '<tr><th class="l">layer</th><th class="l">kind</th>' + "".join(
        f"<th>{e(HEADERS[c])}</th>" for c in COLUMNS
    )
    flags = flagged_cells(rec)
    body = []
    for r in rows:
        cells = []
        for c in COLUMNS:
            if c not in r.latest:
                cells.append("<td></td>")
                continue
            hot = (
                ' class="flag" title="a finding rests on this"'
                if c in flags.get(r.name, ())
                else ""
            )
            cells.append(
                f"<td{hot}>{e(fmt(c, r.latest[c]))}<br>{sparkline(r.series[c])}"
                f'<br><span class="muted">from {e(fmt(c, r.first[c]))}</span></td>'
            )
        body.append(
            f'<tr><td class="l"><code title="{e(r.name)}">{e(r.short)}</code></td>'
            f'<td class="l">{e(r.kind)}</td>{"".join(cells)}</tr>'
        )
    step = rec.rows[-1]["step"] if rec.rows else 0
    return (
        f"<p>Latest values at step {e(step)}, the trend over all record steps, and the "
        "first recorded value. sat/zero: fraction of outputs saturated (tanh |t| &gt; 0.97, "
        "sigmoid) or zero (ReLU family); dead: units saturated/zero for every example; "
        "W: the layer's weight. Cells a finding rests on are marked.</p>"
        f"<table>{head}</tr>{''.join(body)}</table>"
    )


#: The report's order: the verdict, the loss, the lecture's four figures, the layer
#: table, then the rest; run and data details folded away.
LECTURE_FIGURES = ("activations", "gradients", "weight_gradients", "update_ratio")
MORE_FIGURES = ("saturation", "histograms_over_time")


def _caption(name: str, kinds: set[str], val: bool = False) -> str:
    """The figure's caption, naming saturation only for the activations the model has
    (a GELU model's page does not talk of tanh units at +-1), and a validation curve
    only when the run has one."""
    text = CAPTIONS.get(name, name)
    if name == "loss" and val:
        text += " The validation loss (eval mode) is drawn with its best point."
    if name == "activations" and "tanh" not in kinds:
        text = text.replace(" Saturated tanh units sit at ±1.", "")
        if "sigmoid" in kinds:
            text += " Saturated sigmoid units sit at 0 and 1."
    return text


def figures_html(pngs: dict[str, bytes], names: tuple[str, ...], kinds: set[str] = frozenset({"tanh"}), val: bool = False) -> str:  # fmt: skip
    return "".join(
        f'<figure><img alt="{e(name)}" src="data:image/png;base64,'
        f'{base64.b64encode(pngs[name]).decode("ascii")}"><figcaption>'
        f"{e(_caption(name, kinds, val))}</figcaption></figure>"
        for name in names
        if name in pngs and name in FIGURES
    )


def build_html(rec: Record, pngs: dict[str, bytes], refresh: int | None = None) -> str:
    title = f"plumb report: {rec.path.name}"
    kinds = {x.get("kind") for x in rec.layers}
    lecture = figures_html(pngs, LECTURE_FIGURES, kinds)
    more = figures_html(pngs, MORE_FIGURES)
    body = f"""<h1>{e(title)}</h1>
{run_headline(rec).html()}
{essentials_html(rec)}
{_ended_early(rec)}
<h2>Findings</h2>
{findings_html(rec)}
<h2>Loss</h2>
{losses_html(rec)}
{figures_html(pngs, ("loss",), val=len(getattr(rec, "val", ())) > 0) or '<p class="muted">No losses yet.</p>'}
<h2>Inside the network</h2>
{lecture or '<p class="muted">Nothing to plot yet.</p>'}
<h2>Layers</h2>
{layer_table_html(rec)}
{"<h2>More figures</h2>" + more if more else ""}
<p class="muted">{e(str(rec.path))} · {len(rec.rows)} record steps (every {e(rec.meta.get("every"))},
histograms every {e(rec.meta.get("hist_every"))}) · written {e(time.strftime("%Y-%m-%d %H:%M:%S"))}</p>
<details><summary>Run, model, training, data and samples</summary>
{_summary(rec)}
</details>"""
    if refresh:
        body = (
            f'<p class="muted">This run is in progress: the page reloads every {refresh} s '
            "while `plumb report --watch` rebuilds it.</p>" + body
        )
    return page(title, body, refresh)
