"""Per-layer summaries of a probe record: rows for the terminal and the HTML report."""

from __future__ import annotations

import math
from dataclasses import dataclass

from plumb.record import Record
from plumb.report.figures import short_names

COLUMNS = ("mean", "std", "saturated", "dead", "grad_std", "grad_data", "update_data")


@dataclass
class LayerRow:
    name: str
    short: str
    kind: str
    latest: dict[str, float]  # COLUMNS -> value (missing: absent)
    first: dict[str, float]
    series: dict[str, list[float]]  # COLUMNS -> values over record steps


def _weight_of(rec: Record, layer: str) -> str | None:
    """The layer's weight parameter (``LAYER.weight``), if it has one, under the name the
    record keeps it (a tied weight is recorded once: ``lm_head.weight`` is an alias of
    ``wte.weight``)."""
    name = f"{layer}.weight" if layer else "weight"
    for p in rec.params:
        if p["name"] == name or name in p.get("aliases", ()):
            return p["name"]
    return None


def layer_rows(rec: Record) -> list[LayerRow]:
    names = rec.layer_names()
    short = short_names(names)
    out = []
    for name in names:
        weight = _weight_of(rec, name.partition("#")[0])
        series: dict[str, list[float]] = {c: [] for c in COLUMNS}
        for row in rec.rows:
            layer = row.get("layer", {}).get(name)
            if layer is None:
                continue
            values = {
                "mean": layer.get("mean"),
                "std": layer.get("std"),
                "saturated": layer.get("saturated", layer.get("zero")),
                "dead": layer.get("dead"),
                "grad_std": layer.get("grad_std"),
            }
            if weight is not None and weight in row.get("param", {}):
                values["grad_data"] = row["param"][weight].get("grad_data")
                values["update_data"] = row["param"][weight].get("update_data")
            for c in COLUMNS:
                if values.get(c) is not None:
                    series[c].append(values[c])
        latest = {c: v[-1] for c, v in series.items() if v}
        first = {c: v[0] for c, v in series.items() if v}
        out.append(LayerRow(name, short[name], rec.kind(name), latest, first, series))
    return out


def fmt(column: str, value: float | None) -> str:
    if value is None:
        return ""
    if not math.isfinite(value):
        return str(value)
    if column in ("saturated", "dead"):
        return f"{100 * value:.2f}%"
    if column in ("mean",):
        return f"{value:+.3f}"
    if column == "std":
        return f"{value:.3f}"
    if column == "update_data":
        return f"{value:.2f}"
    return f"{value:.2e}"


HEADERS = {
    "mean": "mean",
    "std": "std",
    "saturated": "sat/zero",
    "dead": "dead",
    "grad_std": "grad std",
    "grad_data": "W grad:data",
    "update_data": "W log10 upd:data",
}


#: the terminal's shorter column titles (the table fits 100 columns)
TERMINAL_HEADERS = {**HEADERS, "grad_data": "grad:data", "update_data": "log upd"}
NAME_WIDTH = 18  # longer layer names are cut in the middle (the report has them whole)


def _cut(name: str, width: int) -> str:
    if len(name) <= width:
        return name
    half = (width - 1) // 2
    return name[:half] + "~" + name[-(width - 1 - half) :]


def terminal_table(rec: Record) -> str:
    """The notebook's per-layer printouts as one table (latest record step), at most 100
    columns wide: W grad:data and the weight's log10 update:data; a cell a finding rests
    on is marked with "!"."""
    rows = layer_rows(rec)
    if not rows:
        return "(no layer statistics recorded)"
    step = rec.rows[-1]["step"] if rec.rows else 0
    flags = flagged_cells(rec)
    width = min(max(len(r.short) for r in rows), NAME_WIDTH) + 2
    header = f"{'layer':<{width}}{'kind':<10}" + "".join(
        f"{TERMINAL_HEADERS[c]:>10}" for c in COLUMNS
    )
    lines = [f"layer statistics at step {step} (training forward/backward):", header]
    lines.append("-" * len(header))
    for r in rows:
        cells = "".join(
            f"{fmt(c, r.latest.get(c)) + ('!' if c in flags.get(r.name, ()) else ''):>10}"
            for c in COLUMNS
        )
        lines.append(f"{_cut(r.short, width - 2):<{width}}{r.kind[:9]:<10}{cells}")
    return "\n".join(lines)


#: finding code -> the per-layer column its evidence is read from
FLAG_COLUMNS = {
    "saturated-activations": "saturated",
    "dead-units": "dead",
    "activations-vanishing": "std",
    "activations-exploding": "std",
    "gradients-vanishing": "grad_std",
    "gradients-exploding": "grad_std",
    "overconfident-init": "std",
    "uneven-updates": "update_data",
    "untrained-parameters": "update_data",
    "symmetric-weights": "grad_data",
}


def flagged_cells(rec: Record) -> dict[str, set[str]]:
    """layer -> the columns of the layer table that a finding of ``rec`` rests on (a
    finding at a parameter marks its layer)."""
    names = set(rec.layer_names())
    out: dict[str, set[str]] = {}
    for f in rec.findings or []:
        col = FLAG_COLUMNS.get(f.get("code", ""))
        where = str(f.get("where", ""))
        if col is None:
            continue
        layer = where if where in names else where.rpartition(".")[0]
        if layer in names:
            out.setdefault(layer, set()).add(col)
    return out
