"""An experiment's folder: PNG figures, results.csv and results.json, and index.html
stating question, method and answer; plus the suite's index linking every page.

Pages are self-contained (figures inline as data: URIs, no scripts, the report's CSP);
every string goes through ``html.escape``.
"""

from __future__ import annotations

import base64
import csv
import io
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from plumb._version import __version__
from plumb.io import atomic_write_bytes, jsonable, write_json
from plumb.report.figures import png
from plumb.report.html import e, page


def machine() -> str:
    """Where the numbers were taken, for the page."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu
            )
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} core(s), {torch.get_num_threads()} torch thread(s), "
        f"torch {torch.__version__}, plumb {__version__}"
    )


def csv_bytes(rows: list[dict[str, Any]]) -> bytes:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    w = csv.DictWriter(buf, columns, lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: _cell(v) for k, v in row.items()})
    return buf.getvalue().encode()


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else str(v)


def page_cell(v: Any, percent: bool = False) -> str:
    """A table cell for a reader: 4 significant figures (3 for a percentage), thousands
    separated; None is "n/a" (the measure does not apply), NaN or inf "diverged" (the
    experiments record a diverged run's losses as NaN and nothing else as NaN)."""
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "diverged"
        if percent:
            return f"{100 * v:.3g}%"
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3e}"
        if v == int(v) and abs(v) < 1e5:
            return f"{int(v):,}"
        return f"{v:.4g}"
    return str(v)


def header(key: str) -> str:
    """A plain header for a row key without one: words, not snake_case."""
    return key.replace("_", " ")


def html_table(rows: list[dict[str, Any]], columns: dict[str, str] | None = None) -> str:
    """``rows`` as a table of ``columns`` ({key: header}; None: every key, in order)."""
    if not rows:
        return '<p class="muted">(no rows)</p>'
    if columns is None:
        keys: list[str] = []
        for row in rows:
            keys += [k for k in row if k not in keys]
        columns = {k: header(k) for k in keys}
    head = "".join(f'<th{" class=l" if i == 0 else ""}>{e(h)}</th>' for i, h in enumerate(columns.values()))  # fmt: skip
    body = "".join(
        "<tr>"
        + "".join(
            f"<td{' class=l' if i == 0 else ''}>{e(page_cell(row.get(k), h.endswith('(%)')))}</td>"
            for i, (k, h) in enumerate(columns.items())
        )
        + "</tr>"
        for row in rows
    )
    return f'<table class="results"><tr>{head}</tr>{body}</table>'


def quick_note(meta: dict[str, Any]) -> str:
    """The warning a quick run carries on its page and the index."""
    return (
        f"Quick run (--quick): {meta['steps']:,} training steps"
        + (f" and a reduced sweep ({_values(meta['sweep'])})" if meta.get("sweep") else "")
        + ", sized for tests. Its numbers show the mechanics, not the answer: "
        "run without --quick for the page's real figures."
    )


def _values(values: list[float]) -> str:
    return ", ".join(f"{v:.4g}" for v in values)


def write_experiment(out: Path, name: str, spec: Any, result: Any, meta: dict[str, Any]) -> Path:
    """Write ``out/`` for one experiment; returns the page's path."""
    out.mkdir(parents=True, exist_ok=True)
    figures = []
    for fname, (fig, caption) in result.figures.items():
        data = png(fig)
        atomic_write_bytes(out / f"{fname}.png", data)
        figures.append((fname, caption, data))
    atomic_write_bytes(out / "results.csv", csv_bytes(result.rows))
    for tname, rows in result.tables.items():
        atomic_write_bytes(out / f"{tname}.csv", csv_bytes(rows))
    write_json(
        out / "results.json",
        jsonable(
            {
                "experiment": name,
                "title": spec.TITLE,
                "question": meta.get("question", spec.QUESTION),
                "method": result.method,
                "answer": result.answer,
                "headline": result.headline,
                "settings": meta,
                "rows": result.rows,
                "tables": result.tables,
                "extra": result.extra,
            }
        ),
    )
    figs = "".join(
        f'<figure><img alt="{e(fname)}" src="data:image/png;base64,'
        f'{base64.b64encode(data).decode("ascii")}"><figcaption>{e(caption)} '
        f'(<a href="{e(fname)}.png">{e(fname)}.png</a>)</figcaption></figure>'
        for fname, caption, data in figures
    )
    extra_tables = "".join(
        f'<h3>{e(header(t))} (<a href="{e(t)}.csv">{e(t)}.csv</a>)</h3>'
        f"{html_table(rows, result.table_columns.get(t))}"
        for t, rows in result.tables.items()
    )
    timing = "".join(f"<li>{e(n)}</li>" for n in meta.get("parallel", []))
    quick = f'<p class="quick">{e(quick_note(meta))}</p>' if meta["quick"] else ""
    shown = (
        ""
        if result.columns is None
        else " The table shows the columns that decide; the files hold every measure."
    )
    body = f"""<p class="muted"><a href="../index.html">all experiments</a></p>
<h1>{e(spec.TITLE)} <span class="muted">({e(name)})</span></h1>
{quick}<p class="headline"><b>{e(result.headline)}</b></p>
<p>{e(result.answer)}</p>
<h2>Question</h2><p>{e(meta.get("question", spec.QUESTION))}</p>
<h2>Method</h2><p>{e(result.method)}</p>
<h2>Results</h2>
<p><a href="results.csv">results.csv</a> · <a href="results.json">results.json</a>.{e(shown)}</p>
{html_table(result.rows, result.columns)}
{extra_tables}
<h2>Figures</h2>
{figs or '<p class="muted">No figures.</p>'}
<h2>How it ran</h2>
<p>{e(meta["seconds"])} s in all; steps {e(meta["steps"])}, seed {e(meta["seed"])},
device {e(meta["device"])}{", quick mode" if meta["quick"] else ""}; {e(meta["machine"])};
written {e(meta["written"])}.</p>
<ul>{timing}</ul>"""
    path = out / "index.html"
    atomic_write_bytes(path, page(f"plumb experiment: {name}", body).encode())
    return path


def write_index(root: Path, entries: list[dict[str, Any]]) -> Path:
    """``root/index.html``: one row per experiment, linking its page."""
    rows = "".join(
        f'<tr><td class="l"><a href="{e(x["name"])}/index.html">{e(x["name"])}</a></td>'
        f'<td class="l">{e(x["title"])}</td><td class="l">{e(x["headline"])}</td>'
        f'<td class="nowrap">{e(x["seconds"])} s{"<br>quick" if x.get("quick") else ""}</td></tr>'
        for x in entries
    )
    total = sum(float(x["seconds"]) for x in entries)
    quick = [x["name"] for x in entries if x.get("quick")]
    note = (
        f'<p class="quick">{len(quick)} of {len(entries)} experiment(s) ran with --quick '
        "(few steps, reduced sweeps, sized for tests): their answers show the mechanics, "
        "not the lecture's result. Run without --quick for the real figures.</p>"
        if quick
        else ""
    )
    body = f"""<h1>plumb experiments</h1>
{note}<p>The lecture's experiments, rerun. Each page states its answer first, then its
question, its method and the numbers the answer comes from.</p>
<table><tr><th class="l">experiment</th><th class="l">topic</th><th class="l">answer</th>
<th>time</th></tr>{rows}</table>
<p class="muted">{len(entries)} experiment(s), {total:.0f} s in all; {e(machine())};
written {e(time.strftime("%Y-%m-%d %H:%M:%S"))}.</p>"""
    path = root / "index.html"
    atomic_write_bytes(path, page("plumb experiments", body).encode())
    write_json(root / "index.json", jsonable(entries))
    return path
