"""The lecture's experiments as reproducible commands (``plumb experiment NAME|all``).

    from plumb.experiments import run_experiment, Options
    page = run_experiment("gain-sweep", "runs/experiments", Options(quick=True))

Each experiment writes ``ROOT/NAME/`` (PNG figures, results.csv, results.json and an
index.html stating question, method and the answer computed from its numbers);
``run_all`` also writes ``ROOT/index.html`` linking every page.
"""

from __future__ import annotations

import dataclasses
import importlib
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from plumb.errors import PlumbError
from plumb.experiments.base import Context, Options, Result
from plumb.experiments.page import machine, write_experiment, write_index

#: name -> module (in plumb.experiments), in the order of the suite.
MODULES: dict[str, str] = {
    "loss-log": "loss_log",
    "init-comparison": "init_comparison",
    "gain-sweep": "gain_sweep",
    "batchnorm-parity": "batchnorm_parity",
    "gradient-flow": "gradient_flow",
    "update-ratio": "update_ratio",
    "eval-mode-bug": "eval_mode_bug",
    "bn-rescue": "bn_rescue",
    "norm-alternatives": "norm_alternatives",
    "zero-init": "zero_init",
    "bn-folding": "bn_folding",
    "calibration": "calibration",
}
NAMES = tuple(MODULES)


def spec(name: str) -> ModuleType:
    """The module of experiment ``name`` (an unknown name lists the available ones)."""
    if name not in MODULES:
        raise PlumbError(f"unknown experiment {name!r}: choose one of {', '.join(NAMES)} or all")
    return importlib.import_module(f"plumb.experiments.{MODULES[name]}")


def sweep_flag(name: str) -> str | None:
    """The sweep flag experiment ``name`` reads (e.g. ``gains``), if any."""
    sweep = getattr(spec(name), "SWEEP", None)
    return sweep.flag if sweep else None


def sweeps() -> dict[str, list[str]]:
    """{flag: [experiments that read it]}, in the order of the suite."""
    flags: dict[str, list[str]] = {}
    for name in NAMES:
        if sweep_flag(name):
            flags.setdefault(sweep_flag(name), []).append(name)
    return flags


def check_sweeps(names: list[str], options: Options) -> None:
    """Every sweep flag given must be read by one of ``names``, with valid values."""
    for flag, values in options.sweep.items():
        readers = [n for n in names if sweep_flag(n) == flag]
        if not readers:
            users = sweeps().get(flag, [])
            raise PlumbError(
                f"--{flag} is not read by {', '.join(names)}"
                + (f": it sets the sweep of {', '.join(users)}" if users else "")
            )
        for n in readers:
            spec(n).SWEEP.check(values)


def context(name: str, options: Options) -> Context:
    mod = spec(name)
    default, quick = mod.STEPS
    steps = options.steps or (quick if options.quick else default)
    sweep = None
    if getattr(mod, "SWEEP", None):
        sw = mod.SWEEP
        sweep = sw.check(list(options.sweep.get(sw.flag) or sw.defaults(options.quick)))
    return Context(name, options, steps, sweep)


def question(mod: ModuleType, ctx: Context) -> str:
    """The experiment's question about the sweep that runs: ``{sweep}`` in ``QUESTION``
    becomes the values (e.g. "0.01, 0.1 and 1"), ``{steps}`` the training steps."""
    values = [f"{v:.4g}" for v in ctx.sweep or []]
    listed = ", ".join(values[:-1]) + f" and {values[-1]}" if len(values) > 1 else "".join(values)
    return mod.QUESTION.format(sweep=listed, steps=f"{ctx.steps:,}")


def run_experiment(
    name: str, root: str | Path = "runs/experiments", options: Options | None = None
) -> Path:
    """Run experiment ``name`` and write ``root/name/``; returns the page's path."""
    page, entry = _run(name, root, options or Options())
    update_index(Path(root), [entry])
    return page


def update_index(root: Path, entries: list[dict[str, Any]]) -> Path:
    """Write ``root/index.html`` listing ``entries`` and every experiment already in
    ``root/index.json`` (a page's "all experiments" link always lands), in NAMES order."""
    import json

    known: dict[str, dict[str, Any]] = {}
    try:
        old = json.loads((root / "index.json").read_text())
        known = {x["name"]: x for x in old if isinstance(x, dict) and (root / str(x.get("name")) / "index.html").is_file()}  # fmt: skip
    except (OSError, ValueError, TypeError, KeyError):
        known = {}
    known.update({x["name"]: x for x in entries})
    order = {n: i for i, n in enumerate(NAMES)}
    return write_index(root, sorted(known.values(), key=lambda x: order.get(x["name"], 99)))


def _run(name: str, root: str | Path, options: Options) -> tuple[Path, dict[str, Any]]:
    """Run and write one experiment: (its page, its index entry)."""
    options.validate()
    check_sweeps([name], options)
    mod = spec(name)
    ctx = context(name, options)
    t0 = time.perf_counter()
    result: Result = mod.run(ctx)
    seconds = round(time.perf_counter() - t0, 1)
    meta: dict[str, Any] = {
        "question": question(mod, ctx),
        "steps": ctx.steps,
        "sweep": ctx.sweep,
        "seed": options.seed,
        "device": options.device,
        "quick": options.quick,
        "seconds": seconds,
        "parallel": ctx.parallel_notes,
        "machine": machine(),
        "written": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    page = write_experiment(Path(root) / name, name, mod, result, meta)
    entry = {
        "name": name,
        "title": mod.TITLE,
        "headline": result.headline,
        "seconds": seconds,
        "quick": options.quick,
    }
    return page, entry


def run_all(
    root: str | Path = "runs/experiments",
    options: Options | None = None,
    names: list[str] | None = None,
    on_done: Callable[[str, dict[str, Any]], None] | None = None,
) -> Path:
    """Run ``names`` (default: all twelve) in order and write ``root/index.html``."""
    options = options or Options()
    options.validate()
    names = list(NAMES) if names is None else names
    for n in names:
        spec(n)
    check_sweeps(names, options)
    entries = []
    for n in names:
        # a sweep flag applies to the experiments that read it; the others ignore it
        sweep = {k: v for k, v in options.sweep.items() if k == sweep_flag(n)}
        _, entry = _run(n, root, dataclasses.replace(options, sweep=sweep))
        entries.append(entry)
        if on_done:
            on_done(n, entry)
    return update_index(Path(root), entries)


__all__ = ["NAMES", "Options", "Result", "run_all", "run_experiment", "spec"]


def sweep_help(flag: str) -> str:
    """The ``--FLAG`` help line: which experiments read it, and its values."""
    readers = sweeps()[flag]
    return f"{' and '.join(readers)}: {spec(readers[0]).SWEEP.help}"
