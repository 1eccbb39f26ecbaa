"""The house, one way down: plumb's modules import each other without cycles, counting
imports at every level (a function-level import that dodged a cycle would close one
here), and the floors stay where the layout puts them."""

from __future__ import annotations

import ast
from pathlib import Path

import plumb

SRC = Path(plumb.__file__).resolve().parent


def _graph() -> dict[str, set[str]]:
    mods = {}
    for p in SRC.rglob("*.py"):
        parts = p.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = p
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(p.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                for a in node.names:  # `from plumb import nn` imports plumb.nn, not plumb
                    sub = f"{base}.{a.name}"
                    targets.append(sub if sub in mods else base)
            edges[m] |= {t for t in targets if t in mods and t != m}
    return edges


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(edges[v]):
            if state.get(w) == 1:
                return [*path[path.index(w) :], w]
            if w not in state and (found := visit(w)):
                return found
        state[v] = 2
        path.pop()
        return None

    for v in sorted(edges):
        if v not in state and (found := visit(v)):
            return found
    return None


def _reach(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in edges[todo.pop()]:
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def test_no_import_cycles():
    edges = _graph()
    assert _cycle(edges) is None, " -> ".join(_cycle(edges))


def test_the_floors():
    edges = _graph()
    assert edges["plumb.io"] <= {"plumb.errors"}  # the ground floor
    assert not edges["plumb.memory"]
    assert not edges["plumb.native"]  # the C statistics: ground floor, like memory
    assert edges["plumb.cstep"] <= {"plumb.native"}  # the fused step in C: only its library
    assert edges["plumb.kinds"] <= {"plumb.nn"}  # what a layer is: read by every room
    # process groups know nothing of what is measured (plumb.stats pools over ranks)
    assert not edges["plumb.dist"] & {"plumb.stats", "plumb.probes", "plumb.record"}
    low_floors = ("plumb.train", "plumb.probes", "plumb.stats", "plumb.record", "plumb.fused")
    low_floors += (*tuple(m for m in edges if m.startswith("plumb.probes.")), "plumb.kinds")
    for low in low_floors:
        reached = _reach(edges, low)
        assert not any(
            m.startswith(("plumb.doctor", "plumb.report", "plumb.monitor")) for m in reached
        ), (low, reached)
    assert not any(m.startswith("plumb.report") for m in _reach(edges, "plumb.doctor"))
    assert "plumb.catalogue" in edges and not (SRC / "doctor" / "catalogue.py").exists()


def test_a_test_of_the_test_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
