"""The probe record: what a ``Monitor`` measured, on the host and on disk.

On disk, in ``RUN_DIR/probes/`` (format version ``RECORD_FORMAT``; format 1 is read too):

    meta.json               {"format": 2, "every", "hist_every", "bins", "saturation_layer",
                             "thresholds", "layers": [{name, type, kind}] (type
                             "function" for an activation function seen inside a module),
                             "params": [{name, shape, layer, aliases?}] (aliases: the
                             other names of a tied parameter), "chains": [[weight layers
                             that feed each other, in forward order]], "model"}
    scalars.jsonl           one JSON object per record step:
                             {"step": 100, "loss": 2.41,
                              "layer": {NAME: {"mean", "std", "min", "max", "grad_mean",
                                               "grad_std", "saturated" | "zero", "dead",
                                               "in_rms", "calls"}},   (forward order)
                              "param": {NAME: {"mean", "std", "rms", "grad_mean",
                                               "grad_std", "grad_data", "update_data",
                                               "grad_carry"}}}
                             (a stat a layer does not have is absent; "calls" only when a
                             module ran more than once; NaN/Infinity are written as
                             Python's json writes them)
    loss.safetensors        "loss": float32 (steps,), the training loss of every step
    histograms.safetensors  for each SERIES ("layer/NAME", "layer_grad/NAME",
                             "param_grad/NAME"): "SERIES/steps" int64 (H,),
                             "SERIES/counts" int32 (H, bins), "SERIES/range" float32 (H, 2)
                             [min, max]; "satmap/steps" int64 (M,) and "satmap/maps"
                             float16 (M, examples, units) for the saturation layer

Layer NAMEs are ``model.named_modules()`` names (``MODULE.tanh`` for an activation
function called in a module's forward); a module called k times in a step is one row
pooling all k calls (``Monitor(per_call=True)``: ``NAME``, ``NAME#2``, ...).
``plumb.load_run(DIR)`` reads it all.
"""

from __future__ import annotations

import contextlib
import gc
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from plumb.errors import PlumbError
from plumb.io import atomic_write_bytes, read_json, read_tensors, write_json, write_tensors
from plumb.kinds import RECTIFYING, SATURATING
from plumb.stats import N_STATS, Stat, summary

RECORD_FORMAT = 2
READABLE_FORMATS = (1, 2)  # format 1 rows lack calls, in_rms, min/max, grad_carry
PROBES = "probes"


class History:
    """The host-side record of one Monitor: losses, scalar rows, histograms, maps."""

    def __init__(self, meta: dict[str, Any]):
        self.meta = meta
        self.loss_chunks: list[np.ndarray] = []
        self.rows: list[dict[str, Any]] = []
        self.hists: dict[str, dict[str, list]] = {}
        self.satmaps: list[tuple[int, np.ndarray]] = []

    @property
    def loss(self) -> np.ndarray:
        if not self.loss_chunks:
            return np.empty(0, np.float32)
        return np.concatenate(self.loss_chunks)

    @classmethod
    def restore(cls, run_dir: str | Path, meta: dict[str, Any], losses: torch.Tensor) -> History:
        """The record of a run resumed after ``len(losses)`` steps: the rows, histograms
        and maps on disk from before that step (a later flush that the checkpoint does
        not cover is dropped), and ``losses`` (the checkpoint's) as the per-step loss."""
        step = len(losses)
        h = cls(meta)
        probes = Path(run_dir) / PROBES
        h.loss_chunks = [losses.float().numpy().astype(np.float32)]
        if (probes / "scalars.jsonl").is_file():
            h.rows = [r for r in _read_jsonl(probes / "scalars.jsonl") if r["step"] < step]
        hist_file = probes / "histograms.safetensors"
        if hist_file.is_file():
            stored = read_tensors(hist_file)
            for key in {k.rsplit("/", 1)[0] for k in stored if not k.startswith("satmap/")}:
                keep = stored[f"{key}/steps"] < step
                h.hists[key] = {
                    "steps": stored[f"{key}/steps"][keep].tolist(),
                    "counts": list(stored[f"{key}/counts"][keep].numpy()),
                    "range": list(stored[f"{key}/range"][keep].numpy()),
                }
            if "satmap/steps" in stored:
                maps = stored["satmap/maps"].float().numpy()
                h.satmaps = [
                    (int(s), maps[k])
                    for k, s in enumerate(stored["satmap/steps"].tolist())
                    if s < step
                ]
        return h

    def add(self, start: int, losses: torch.Tensor, snaps: list) -> tuple[list, dict]:
        """Bring losses (from step ``start``) and device snapshots to the host: one copy
        for all values, one for all histograms."""
        loss = losses.numpy().astype(np.float32)
        self.loss_chunks.append(loss)
        rows: list[dict[str, Any]] = []
        new_hists: dict[str, list] = {}
        if not snaps:
            return rows, new_hists
        with paused_gc():
            values = _host([s.values for s in snaps], np.float64)
            with_hist = [s for s in snaps if s.hist is not None]
            if with_hist:
                counts = _host([s.hist for s in with_hist], np.int32)
                ranges = _host([s.hist_range for s in with_hist], np.float32)
            decoded = _decode_runs(snaps, values)
            for s, row in zip(snaps, decoded, strict=True):
                i = s.step - start
                if 0 <= i < len(loss):
                    row = {"step": s.step, "loss": float(loss[i]), **row}  # the same step
                if getattr(s, "skipped", False):
                    row["skipped"] = True  # the GradScaler skipped the update (inf/NaN grads)
                rows.append(row)
                if s.satmap is not None:
                    self.satmaps.append((s.step, s.satmap.float().cpu().numpy()))
            if with_hist:
                self._add_hists(with_hist, counts, ranges, new_hists)
        self.rows.extend(rows)
        return rows, new_hists

    def _add_hists(self, snaps: list, counts: np.ndarray, ranges: np.ndarray, new: dict) -> None:
        """Append each histogram step's counts and ranges (rows of ``counts``, ``ranges``:
        the steps' ``hist_keys`` one after another) to their keys, and to ``new`` as
        (step, counts, range); steps in a run with the same keys are added key by key."""
        offset = i = 0
        while i < len(snaps):
            keys = snaps[i].layout.hist_keys
            j = i + 1
            while j < len(snaps) and (
                snaps[j].layout.hist_keys is keys or snaps[j].layout.hist_keys == keys
            ):
                j += 1
            n, steps = len(keys), [s.step for s in snaps[i:j]]
            size = (j - i) * n
            cs = counts[offset : offset + size].reshape(j - i, n, -1)
            rs = ranges[offset : offset + size].reshape(j - i, n, -1)
            for k, (section, name) in enumerate(keys):
                key = f"{section}/{name}"
                c, r = list(cs[:, k]), list(rs[:, k])
                h = self.hists.get(key)
                if h is None:
                    h = self.hists[key] = {"steps": [], "counts": [], "range": []}
                h["steps"] += steps
                h["counts"] += c
                h["range"] += r
                new.setdefault(key, []).extend(zip(steps, c, r, strict=True))
            offset += size
            i = j


def _host(tensors: list[torch.Tensor], dtype: type) -> np.ndarray:
    """The tensors' values one after another, as one new host array of ``dtype``: CPU
    tensors read where they lie into it, in one copy (a flush's histogram counts are
    ~30 MB of int64 for 1,000 steps: a joined int64 copy and then an int32 one cost
    ~15 ms more, most of it the first touch of the fresh pages); device tensors joined
    on their device, then copied."""
    if all(t.is_cpu for t in tensors):
        return np.concatenate([t.numpy() for t in tensors], dtype=dtype, casting="same_kind")
    return torch.cat(tensors).cpu().numpy().astype(dtype, copy=False)


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Python's cyclic garbage collector off for the block (as it was after). A flush
    builds ~40 dicts per row, ~40,000 for a block of record steps: each ~700 allocations
    set off a collection, and now and then one over every object of the process (~0.1 s
    here, with torch loaded), all to find no garbage: the rows are dicts of floats and
    strings, which hold no cycles."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _decode_runs(snaps: list, values: np.ndarray) -> list[dict[str, Any]]:
    """``decode`` of every snapshot, consecutive snapshots of one layout decoded together
    (``decode_many``); ``values`` holds their values one after another."""
    rows: list[dict[str, Any]] = []
    offset = 0
    i = 0
    while i < len(snaps):
        layout, n = snaps[i].layout, snaps[i].values.numel()
        key = _decoded_by(layout)
        j = i + 1  # histogram steps (their hist_keys) decode with the steps around them
        while (
            j < len(snaps)
            and snaps[j].values.numel() == n
            and (snaps[j].layout is layout or _decoded_by(snaps[j].layout) == key)
        ):
            j += 1
        block = values[offset : offset + (j - i) * n].reshape(j - i, n)
        rows += decode_many([s.step for s in snaps[i:j]], layout, block)
        offset += (j - i) * n
        i = j
    return rows


def decode(step: int, layout: Any, values: np.ndarray) -> dict[str, Any]:
    """One record step's row from its snapshot values (see ``plumb.probes.Layout`` and
    ``decode_many``)."""
    return decode_many([step], layout, values.reshape(1, -1))[0]


def decode_many(steps: list[int], layout: Any, values: np.ndarray) -> list[dict[str, Any]]:
    """The rows of record steps that share one layout, from their values ``(S, V)``:
    per layer (forward order) mean, std, min, max, saturated | zero, dead, grad_mean,
    grad_std, in_rms, calls (when > 1); per parameter mean, std, rms, grad_mean,
    grad_std, grad_data, update_data, grad_carry (``_derive``'s definitions).

    The arithmetic runs on whole (steps, keys) arrays and is elementwise, so a step's
    numbers are the ones it would get decoded alone. Every number of every row is then
    gathered into one array, read back as Python floats at once, and the dicts are
    built step by step (``_Recipe``: which number goes where, from the layout alone)."""
    S, K = len(steps), len(layout.keys)
    stats = values[:, : K * N_STATS].reshape(S * K, N_STATS)
    rest = values[:, K * N_STATS :]
    col = summary(stats)
    with np.errstate(divide="ignore", invalid="ignore"):
        norm = np.sqrt(
            stats[:, Stat.M2] + stats[:, Stat.N] * stats[:, Stat.MEAN] * stats[:, Stat.MEAN]
        ).reshape(S, K)
    key = _decoded_by(layout)
    r = _RECIPES.get(key)
    if r is None:
        if len(_RECIPES) > 32:  # layouts keep changing: do not grow without bound
            _RECIPES.clear()
        r = _RECIPES[key] = _Recipe(layout)
    base = [col[k].reshape(S, K) for k in _SUMMARY]
    base.append(rest)
    nan = np.full((S, 1), np.nan)  # column K of these: a key the layout does not have
    std, rms = np.concatenate([base[1], nan], 1), np.concatenate([base[2], nan], 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        # grad:data = std(grad) / std(p) in float32, as the lecture's grad.std() / p.std()
        gs, ps = std[:, r.gd_grad], std[:, r.gd_param]
        grad_data = (gs.astype(np.float32) / ps.astype(np.float32)).astype(np.float64)
        spread = ps >= CONSTANT_SPREAD * rms[:, r.gd_param]  # not constant (NaN: False)
        update_data = np.log10(rms[:, r.ud_update] / rms[:, r.ud_param])
        total = np.concatenate([norm, nan], 1)[:, r.carry_grad]
        carry = np.sqrt(rest[:, r.carry_rest]) / total
        grad_carry = np.where(total > 0, carry, 0.0)
    base += [grad_data, update_data, grad_carry]
    cols = np.concatenate(base, 1)[:, r.gather].T.tolist()  # per number, its steps
    layers = [(k, list(zip(f, cols[a:b], strict=True))) for k, f, a, b in r.layers]
    params = [(k, list(zip(f, cols[a:b], strict=True))) for k, f, a, b in r.params]
    masks = spread[:, r.gd_masked].tolist() if r.gd_masked.size else [[]] * S
    rows = []
    for j, step in enumerate(steps):
        layer = {k: {f: c[j] for f, c in cs} for k, cs in layers}
        for k, calls in r.calls:  # first, as in STAT_ORDER
            layer[k] = {"calls": calls, **layer[k]}
        param = {k: {f: c[j] for f, c in cs} for k, cs in params}
        keep = masks[j]
        if not all(keep):
            for k, ok in zip(r.masked, keep, strict=True):
                if not ok:
                    del param[k]["grad_data"]
        rows.append({"step": step, "layer": layer, "param": param})
    return rows


def _decoded_by(layout: Any) -> tuple:
    """What of a layout ``decode_many`` reads (all but its histogram keys), hashable."""
    return (
        tuple(layout.keys),
        tuple(layout.calls),
        tuple(layout.order),
        tuple(layout.kinds.get(k, "other") for k in layout.order),
        tuple(layout.dead),
        tuple(layout.carry),
        tuple(getattr(layout, "params", [])),
    )


#: ``_Recipe`` per ``_decoded_by`` of a layout
_RECIPES: dict[tuple, Any] = {}

#: ``summary``'s arrays in the order ``decode_many`` stacks them
_SUMMARY = ("mean", "std", "rms", "min", "max", "off")


class _Recipe:
    """Where each number of a decoded row comes from, for one layout: columns of the
    arrays ``decode_many`` stacks (the ``_SUMMARY`` statistics per key, then the
    snapshot's rest: dead fractions and carried norms, then the derived grad:data,
    update:data and grad_carry), in row order, and the dicts' slices of them."""

    def __init__(self, layout: Any):
        K = len(layout.keys)
        n_rest = len(layout.dead) + len(layout.carry)
        stat = {k: i * K for i, k in enumerate(_SUMMARY)}
        layer: dict[str, dict[str, int]] = {k: {} for k in layout.order}
        param: dict[str, dict[str, int]] = {k: {} for k in getattr(layout, "params", [])}
        calls: dict[str, int] = {}
        at: dict[tuple[str, str], int] = {}
        for i, ((section, name), c) in enumerate(zip(layout.keys, layout.calls, strict=True)):
            at[(section, name)] = i
            if section == "layer":
                d = layer.setdefault(name, {})
                d.update((f, stat[f] + i) for f in ("mean", "std", "min", "max"))
                kind = layout.kinds.get(name, "other")
                if kind in SATURATING:
                    d["saturated"] = stat["off"] + i
                elif kind in RECTIFYING:
                    d["zero"] = stat["off"] + i
                if c > 1:
                    calls[name] = c
            elif section == "layer_grad":
                d = layer.setdefault(name, {})
                d["grad_mean"], d["grad_std"] = stat["mean"] + i, stat["std"] + i
            elif section.startswith("layer"):
                layer.setdefault(name, {})["in_rms"] = stat["rms"] + i
            elif section == "param":
                d = param.setdefault(name, {})
                d.update((f, stat[f] + i) for f in ("mean", "std", "rms"))
            elif section == "param_grad":
                d = param.setdefault(name, {})
                d["grad_mean"], d["grad_std"] = stat["mean"] + i, stat["std"] + i
            else:
                param.setdefault(name, {})["update_rms"] = i
        rest = len(_SUMMARY) * K
        for j, name in enumerate(layout.dead):
            layer[name]["dead"] = rest + j
        # derived columns: grad:data where a gradient is, update:data where an update
        # is, grad_carry per carried parameter; a missing key reads the NaN column K
        gd = [n for n, d in param.items() if "grad_std" in d]
        ud = [n for n, d in param.items() if "update_rms" in d]
        self.gd_grad = np.array([at[("param_grad", n)] for n in gd], dtype=np.int64)
        self.gd_param = np.array([at.get(("param", n), K) for n in gd], dtype=np.int64)
        self.ud_update = np.array([param[n].pop("update_rms") for n in ud], dtype=np.int64)
        self.ud_param = np.array([at.get(("param", n), K) for n in ud], dtype=np.int64)
        self.carry_grad = np.array(
            [at.get(("param_grad", n), K) for n in layout.carry], dtype=np.int64
        )
        self.carry_rest = np.array(
            [len(layout.dead) + j for j in range(len(layout.carry))], dtype=np.int64
        )
        derived = rest + n_rest
        for j, n in enumerate(gd):
            param[n]["grad_data"] = derived + j
        derived += len(gd)
        for j, n in enumerate(ud):
            param[n]["update_data"] = derived + j
        derived += len(ud)
        for j, n in enumerate(layout.carry):
            param[n]["grad_carry"] = derived + j
        # grad:data is left out at steps where the parameter is constant (it has a std)
        masked = [j for j, n in enumerate(gd) if "rms" in param[n]]
        self.gd_masked = np.array(masked, dtype=np.int64)
        self.masked = [gd[j] for j in masked]
        gather: list[int] = []
        self.layers, self.params = [], []
        for out, dicts in ((self.layers, layer), (self.params, param)):
            for k, d in dicts.items():
                if out is self.params and not d:
                    continue
                names = [f for f in STAT_ORDER if f in d] + [f for f in d if f not in STAT_ORDER]
                out.append((k, names, len(gather), len(gather) + len(names)))
                gather += [d[f] for f in names]
        self.calls = list(calls.items())  # (layer, calls) where a module ran more than once
        self.gather = np.array(gather, dtype=np.int64)


STAT_ORDER = (
    "calls",
    "mean",
    "std",
    "rms",
    "min",
    "max",
    "saturated",
    "zero",
    "dead",
    "in_rms",
    "grad_mean",
    "grad_std",
    "grad_data",
    "update_data",
    "grad_carry",
)


#: The one definition of update:data, for every view that names it.
UPDATE_DATA = "log10(rms(Δp) / rms(p))"
#: grad:data is left out while a parameter's elements differ by less than this fraction
#: of their size: a gain initialised to ones has std ~0, and std(grad) / std(p) would
#: then be a ratio of rounding (1/lr after one step), not the lecture's measure.
CONSTANT_SPREAD = 1e-2


def hist_tensors(history: History) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, h in history.hists.items():
        out[f"{key}/steps"] = torch.tensor(h["steps"], dtype=torch.int64)
        out[f"{key}/counts"] = torch.from_numpy(np.stack(h["counts"]).astype(np.int32))
        out[f"{key}/range"] = torch.from_numpy(np.stack(h["range"]).astype(np.float32))
    if history.satmaps:
        out["satmap/steps"] = torch.tensor([s for s, _ in history.satmaps], dtype=torch.int64)
        shapes = {m.shape for _, m in history.satmaps}
        if len(shapes) == 1:
            maps = np.stack([m for _, m in history.satmaps])
        else:  # batch size changed: keep the last shape, pad/crop the others
            shape = history.satmaps[-1][1].shape
            maps = np.zeros((len(history.satmaps), *shape), np.float32)
            for k, (_, m) in enumerate(history.satmaps):
                e, u = min(m.shape[0], shape[0]), min(m.shape[1], shape[1])
                maps[k, :e, :u] = m[:e, :u]
        out["satmap/maps"] = torch.from_numpy(maps.astype(np.float16))
    return out


class RecordWriter:
    """Writes a Monitor's record to ``run_dir/probes/`` as it is flushed."""

    def __init__(self, run_dir: str | Path, meta: dict[str, Any]):
        self.dir = Path(run_dir) / PROBES
        if Path(run_dir).exists() and not Path(run_dir).is_dir():
            raise PlumbError(f"{run_dir} exists and is not a directory: choose another path")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.write_meta(meta)
        atomic_write_bytes(self.dir / "scalars.jsonl", b"")
        self.history: History | None = None

    def write_meta(self, meta: dict[str, Any]) -> None:
        """Rewrite ``meta.json`` (layers found while training: functional activations,
        the weight-layer chains)."""
        write_json(self.dir / "meta.json", {"format": RECORD_FORMAT, **meta})

    def rewrite(self, history: History) -> None:
        """Write the whole of ``history`` (a resumed run's record) afresh."""
        self.history = history
        lines = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in history.rows)
        atomic_write_bytes(self.dir / "scalars.jsonl", lines.encode())
        write_tensors(self.dir / "loss.safetensors", {"loss": torch.from_numpy(history.loss)})
        if history.hists or history.satmaps:
            write_tensors(self.dir / "histograms.safetensors", hist_tensors(history))

    def write(self, history: History, rows: list[dict], new_hists: dict) -> None:
        self.history = history
        if rows:
            with open(self.dir / "scalars.jsonl", "a", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, separators=(",", ":")) + "\n")
        write_tensors(self.dir / "loss.safetensors", {"loss": torch.from_numpy(history.loss)})
        if new_hists:
            write_tensors(self.dir / "histograms.safetensors", hist_tensors(history))


class Record:
    """A run directory read back for notebooks: ``plumb.load_run(DIR)``.

    ``config``/``metrics``/``samples``/``findings`` are those of a ``plumb train`` run
    (``None``/empty for a Monitor in a user's own loop); ``loss`` is the per-step loss;
    ``rows`` the scalar rows; ``series(...)``, ``histogram(...)`` and ``saturation_maps()``
    give arrays for plotting."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise PlumbError(f"run directory {self.path} does not exist")
        probes = self.path / PROBES
        if not (probes / "meta.json").is_file():
            raise PlumbError(
                f"{self.path} has no probe record ({PROBES}/meta.json): train it with "
                "`plumb train` or wrap your loop in `plumb.Monitor(model, out=DIR)`"
            )
        self.meta = read_json(probes / "meta.json")
        fmt = self.meta.get("format")
        if fmt not in READABLE_FORMATS:
            raise PlumbError(
                f"{probes}/meta.json has record format {fmt!r}; this plumb reads format "
                f"{RECORD_FORMAT}: use the plumb version that wrote it"
            )
        for key in ("layers", "params", "every", "bins"):
            if key not in self.meta:
                raise PlumbError(f"{probes}/meta.json lacks {key!r}: the record is damaged")
        self.rows = _read_jsonl(probes / "scalars.jsonl")
        loss_file = probes / "loss.safetensors"
        self.loss = read_tensors(loss_file)["loss"].numpy() if loss_file.is_file() else np.empty(0)
        hist_file = probes / "histograms.safetensors"
        self._hist = (
            {
                k: v.float().numpy() if v.dtype == torch.float16 else v.numpy()
                for k, v in read_tensors(hist_file).items()
            }
            if hist_file.is_file()
            else {}
        )
        self.config = _optional_json(self.path / "config.json")
        self.metrics = _optional_json(self.path / "metrics.json")
        self.extras = _optional_json(self.path / "samples.json") or {}
        self.val = self._val_curve()
        self.samples = self.extras.get("samples", [])
        doctor = _optional_json(self.path / "findings.json")  # None: the doctor did not run
        if doctor is not None and not (
            isinstance(doctor, dict) and isinstance(doctor.get("findings", []), list)
        ):
            raise PlumbError(
                f"{self.path / 'findings.json'} is not a doctor's findings file: delete it "
                "and rerun `plumb doctor`, or retrain"
            )
        self.doctor = doctor
        self.findings = [f for f in (doctor or {}).get("findings", []) if isinstance(f, dict)]

    @property
    def layers(self) -> list[dict[str, str]]:
        return self.meta["layers"]

    @property
    def params(self) -> list[dict[str, Any]]:
        return self.meta["params"]

    def _val_curve(self) -> np.ndarray:
        """The validation loss during training, (n, 2) rows of (step, loss): from
        metrics.json of a finished run, else val.json of one still training."""
        curve = (self.metrics or {}).get("val_curve")
        if isinstance(curve, dict) and curve.get("steps"):
            return _points(list(zip(curve["steps"], curve.get("loss", []), strict=False)))
        live = _optional_json(self.path / "val.json")
        return _points(live.get("val", [])) if isinstance(live, dict) else np.zeros((0, 2))

    def kind(self, layer: str) -> str:
        base = layer.partition("#")[0]
        return next((x["kind"] for x in self.layers if x["name"] == base), "other")

    def layer_names(self, section: str = "layer") -> list[str]:
        """Names in first-seen order over the rows (includes ``NAME#k`` repeats)."""
        seen: dict[str, None] = {}
        for row in self.rows:
            for name in row.get(section, {}):
                seen.setdefault(name, None)
        return list(seen)

    def series(self, section: str, name: str, stat: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of one statistic, e.g. ``series("param", "fc.weight", "update_data")``."""
        steps, values = [], []
        for row in self.rows:
            v = row.get(section, {}).get(name, {}).get(stat)
            if v is not None:
                steps.append(row["step"])
                values.append(v)
        return np.asarray(steps, np.int64), np.asarray(values, np.float64)

    def at(self, step: int, section: str, name: str) -> dict[str, float]:
        """One layer's or parameter's statistics at record step ``step`` ({} if none)."""
        for row in self.rows:
            if row["step"] == step:
                return row.get(section, {}).get(name, {})
        return {}

    def latest(self, section: str, name: str) -> dict[str, float]:
        for row in reversed(self.rows):
            if name in row.get(section, {}):
                return row[section][name]
        return {}

    def histogram_keys(self) -> list[str]:
        return sorted({k.rsplit("/", 1)[0] for k in self._hist if not k.startswith("satmap/")})

    def histogram(self, series: str, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(steps (H,), counts (H, bins), range (H, 2)) of e.g. ``("layer", "tanh1")``;
        sections are ``layer``, ``layer_grad`` and ``param_grad``."""
        key = f"{series}/{name}"
        if f"{key}/counts" not in self._hist:
            empty = np.empty((0, int(self.meta["bins"])))
            return np.empty(0, np.int64), empty, np.empty((0, 2))
        return self._hist[f"{key}/steps"], self._hist[f"{key}/counts"], self._hist[f"{key}/range"]

    def saturation_maps(self) -> tuple[np.ndarray, np.ndarray]:
        """(steps (M,), maps (M, examples, units)) of the saturation layer."""
        if "satmap/maps" not in self._hist:
            return np.empty(0, np.int64), np.empty((0, 0, 0))
        return self._hist["satmap/steps"], self._hist["satmap/maps"]


def _optional_json(path: Path) -> dict[str, Any] | None:
    return read_json(path) if path.is_file() else None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise PlumbError(f"{path} is missing: the probe record is incomplete")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PlumbError(f"{path} is not UTF-8 text: the probe record is damaged") from None
    lines = text.split("\n")
    if lines and lines[-1] != "":
        lines = lines[:-1]  # a last line cut short by a crash: the rows before it are whole
    rows = []
    for n, line in enumerate(lines, 1):
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise PlumbError(
                f"{path} line {n} is not valid JSON: the probe record is damaged"
            ) from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise PlumbError(f"{path} line {n} is not a probe row: the probe record is damaged")
        rows.append(row)
    return rows


def _points(pairs: Any) -> np.ndarray:
    """(n, 2) float array of (step, loss) pairs; empty when the data is not that."""
    try:
        a = np.asarray(pairs, dtype=np.float64).reshape(-1, 2)
    except (TypeError, ValueError):
        return np.zeros((0, 2))
    return a


def load_run(path: str | Path) -> Record:
    """Read a run directory's probe record (and config, metrics, samples, findings)."""
    return Record(path)


def first_nonfinite(
    row: dict[str, Any], order: list[str], params: list[str]
) -> tuple[str, str] | None:
    """Where a record step's first NaN/Inf is, in the order the step computes things:
    outputs in forward order, the loss, output gradients in backward order, parameter
    gradients, then parameters after the update. ``(where, what)`` or None."""

    def bad(section: str, name: str, *stats: str) -> bool:
        st = row.get(section, {}).get(name, {})
        return any(s in st and not np.isfinite(st[s]) for s in stats)

    for k in order:
        if bad("layer", k, "mean", "std"):
            return k, f"the output of layer '{k}' (first in forward order)"
    if "loss" in row and not np.isfinite(row["loss"]):
        return "loss", "the loss (every layer output was finite)"
    for k in reversed(order):
        if bad("layer", k, "grad_mean", "grad_std"):
            return k, f"the gradient at the output of layer '{k}' (first in backward order)"
    for p in params:
        if bad("param", p, "grad_mean", "grad_std"):
            return p, f"the gradient of parameter '{p}'"
    for p in params:
        if bad("param", p, "mean", "std"):
            return p, f"parameter '{p}' after the update"
    return None
