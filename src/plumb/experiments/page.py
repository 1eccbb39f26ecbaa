"""An experiment's folder: PNG figures, results.csv and results.json, and index.html
stating question, method and answer; plus the suite's index linking every page.

Pages are self-contained (figures inline as data: URIs, no scripts, the report's CSP);
every string goes through ``html.escape``.
"""

from __future__ import annotations

import base64
import csv
import io
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
    return str(v)


def html_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return '<p class="muted">(no rows)</p>'
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    head = "".join(f"<th>{e(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{e(_cell(row.get(c, '')))}</td>" for c in columns) + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


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
                "question": spec.QUESTION,
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
        f'<h3>{e(t)} (<a href="{e(t)}.csv">{e(t)}.csv</a>)</h3>{html_table(rows)}'
        for t, rows in result.tables.items()
    )
    timing = "".join(f"<li>{e(n)}</li>" for n in meta.get("parallel", []))
    body = f"""<p class="muted"><a href="../index.html">all experiments</a></p>
<h1>{e(spec.TITLE)} <span class="muted">({e(name)})</span></h1>
<h2>Question</h2><p>{e(spec.QUESTION)}</p>
<h2>Method</h2><p>{e(result.method)}</p>
<h2>Answer</h2><p><b>{e(result.headline)}</b></p><p>{e(result.answer)}</p>
<h2>Results</h2>
<p><a href="results.csv">results.csv</a> · <a href="results.json">results.json</a></p>
{html_table(result.rows)}
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
        f"<td>{e(x['seconds'])} s</td></tr>"
        for x in entries
    )
    total = sum(float(x["seconds"]) for x in entries)
    body = f"""<h1>plumb experiments</h1>
<p>The lecture's experiments, rerun. Each page states its question, its method and the
answer its own numbers give.</p>
<table><tr><th class="l">experiment</th><th class="l">topic</th><th class="l">answer (headline)</th>
<th>time</th></tr>{rows}</table>
<p class="muted">{len(entries)} experiment(s), {total:.0f} s in all; {e(machine())};
written {e(time.strftime("%Y-%m-%d %H:%M:%S"))}.</p>"""
    path = root / "index.html"
    atomic_write_bytes(path, page("plumb experiments", body).encode())
    write_json(root / "index.json", jsonable(entries))
    return path
