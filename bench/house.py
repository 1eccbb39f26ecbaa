"""The house's structural figures, from the code (an AST walk): the largest modules, the
longest functions, the widest signatures and the largest classes.

    python bench/house.py [--top 5] [SRC]
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "plumb"


def figures(src: Path) -> dict[str, list[tuple[int, str]]]:
    modules, functions, signatures, classes = [], [], [], []
    for path in sorted(src.rglob("*.py")):
        rel = str(path.relative_to(src.parent))
        text = path.read_text()
        modules.append((len(text.splitlines()), rel))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                a = node.args
                width = len(a.posonlyargs + a.args + a.kwonlyargs) - (
                    1 if a.args and a.args[0].arg in ("self", "cls") else 0
                )
                where = f"{rel}:{node.name}"
                functions.append((node.end_lineno - node.lineno + 1, where))
                signatures.append((width, where))
            elif isinstance(node, ast.ClassDef):
                methods = [n for n in node.body if isinstance(n, ast.FunctionDef)]
                size = node.end_lineno - node.lineno + 1
                classes.append((size, f"{rel}:{node.name} ({len(methods)} methods)"))
    return {
        "largest module (lines)": modules,
        "longest function (lines)": functions,
        "widest signature (parameters)": signatures,
        "largest class (lines)": classes,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", nargs="?", type=Path, default=SRC)
    ap.add_argument("--top", type=int, default=5)
    args = ap.parse_args()
    for title, rows in figures(args.src).items():
        print(title)
        for n, where in sorted(rows, reverse=True)[: args.top]:
            print(f"  {n:5d}  {where}")


if __name__ == "__main__":
    main()
