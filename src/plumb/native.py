"""A record step's statistics of many CPU tensors in one native call (``rowstats.c``).

Torch reduces a tensor one statistic at a time (mean, the centred norm, min, max: a pass
each, plus the stacking copy that batches tensors of one size), so a record step of the
zoo's GPT read its ~23 MB of activations, gradients and parameters about six times: 5.4 ms
of a 17 ms step on this machine (2-core AMD EPYC, 1 thread). ``rowstats.c`` reads each
tensor twice where it lies (a shifted sum with min and max, then the squared deviations,
mostly from cache), float32 arithmetic in runs of 8 summed in float64, for all tensors of
the step in one call, each distinct tensor once: ~1.1 ms for the same tensors
(``bench/bench_probes.py`` measures the whole step). Its error bounds are in the C source.

The library is compiled once per process, on first use, with ``$CC``, else the first of
``cc``/``gcc``/``clang`` found (torch's inductor needs such a compiler on the CPU too),
into a private temporary directory: -O3 for this CPU, contraction off. Its sums run in a
fixed lane order, so every machine computes the same bits (see the C source). Where no
compiler works, or with ``PLUMB_NATIVE=0``, ``available()`` is False and ``plumb.stats``
keeps torch's reductions: same statistics, float32 sums of whole rows.
"""

from __future__ import annotations

import atexit
import ctypes
import operator
import os
import shutil
import subprocess
import tempfile
from importlib import resources

import numpy as np
import torch
from torch import Tensor

FLAGS = ("-O3", "-ffp-contract=off", "-shared", "-fPIC")
TUNED = ("-march=native",)  # dropped when the compiler refuses it

_fn = None  # plumb_row_stats
_hist = None  # plumb_histograms
_step = None  # plumb_mlp_step (mlpstep.c), with torch's sgemm in ``_sgemm``
_act = None  # plumb_activation (mlpstep.c's activations alone, for tests)
_off = None  # plumb_off_counts
_sgemm: int | None = None
_tried = False
SOURCES = ("rowstats.c", "mlpstep.c")


def _compilers() -> list[str]:
    names = [os.environ["CC"]] if os.environ.get("CC") else []
    names += ["cc", "gcc", "clang"]
    return [p for p in dict.fromkeys(shutil.which(n) for n in names) if p]


def _load():
    """The compiled ``plumb_row_stats`` (``plumb_histograms`` and ``plumb_mlp_step``
    beside it in ``_hist``, ``_step``), or None (no compiler, a failed build, disabled)."""
    global _fn, _hist, _step, _act, _off, _tried
    if _tried:
        return _fn
    _tried = True
    if os.environ.get("PLUMB_NATIVE", "1") == "0":
        return None
    out = tempfile.mkdtemp(prefix="plumb-native-")
    atexit.register(shutil.rmtree, out, True)
    srcs = []
    for name in SOURCES:
        srcs.append(os.path.join(out, name))
        with open(srcs[-1], "w") as f:
            f.write(resources.files("plumb").joinpath(name).read_text())
    lib = os.path.join(out, "plumb_native.so")
    for cc in _compilers():
        for flags in (FLAGS + TUNED, FLAGS):
            try:
                done = subprocess.run(
                    [cc, *flags, "-o", lib, *srcs, "-lm"], capture_output=True, timeout=120
                )
            except (OSError, subprocess.SubprocessError):
                break
            if done.returncode == 0:
                try:
                    so = ctypes.CDLL(lib)
                    fn, hist, step = so.plumb_row_stats, so.plumb_histograms, so.plumb_mlp_step
                except (OSError, AttributeError):
                    continue
                fn.restype = hist.restype = None
                fn.argtypes = [ctypes.c_int64] + [ctypes.c_void_p] * 4
                fn.argtypes += [ctypes.c_int64, ctypes.c_void_p]
                hist.argtypes = [ctypes.c_int64] + [ctypes.c_void_p] * 5
                hist.argtypes += [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
                step.restype = ctypes.c_int
                step.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_float]
                step.argtypes += [ctypes.c_int64, ctypes.c_void_p]
                act = so.plumb_activation
                act.restype = None
                act.argtypes = [ctypes.c_int64, ctypes.c_float] + [ctypes.c_void_p] * 2
                act.argtypes += [ctypes.c_int64]
                off = so.plumb_off_counts
                off.restype = None
                off.argtypes = [ctypes.c_int64] + [ctypes.c_void_p] * 11
                _fn, _hist, _step, _act, _off = fn, hist, step, act, off
                return _fn
    return None


def available() -> bool:
    """True when the native statistics can run (compiled on the first call)."""
    return _load() is not None


def sgemm() -> int | None:
    """The address of the Fortran ``sgemm_`` of the BLAS that torch's CPU library calls
    (MKL in x86 wheels, OpenBLAS in ARM ones), checked on one product against torch's,
    or None: no such symbol, a product that disagrees, or plumb.native unavailable."""
    global _sgemm
    if _sgemm is not None or _load() is None:
        return _sgemm or None
    _sgemm = 0
    lib_dir = os.path.join(os.path.dirname(torch.__file__), "lib")
    for name in sorted(os.listdir(lib_dir)) if os.path.isdir(lib_dir) else []:
        if not name.startswith(("libtorch_cpu.", "torch_cpu.")):
            continue
        try:
            addr = ctypes.cast(ctypes.CDLL(os.path.join(lib_dir, name)).sgemm_, ctypes.c_void_p)
        except (OSError, AttributeError):
            continue
        if addr.value and _sgemm_agrees(addr.value):
            _sgemm = addr.value
            break
    return _sgemm or None


def _sgemm_agrees(addr: int) -> bool:
    """C = A B for a (3, 5) x (5, 4) product through ``addr``, against torch's."""
    fn = ctypes.CFUNCTYPE(None, *([ctypes.c_void_p] * 13))(addr)
    g = torch.Generator().manual_seed(0)
    a, b, c = torch.randn(3, 5, generator=g), torch.randn(5, 4, generator=g), torch.zeros(3, 4)
    dims = [ctypes.c_int64(v) for v in (4, 3, 5)]  # N, M, K (column-major C^T = B^T A^T)
    one, zero = ctypes.c_float(1.0), ctypes.c_float(0.0)
    ref = ctypes.byref
    fn(b"N", b"N", ref(dims[0]), ref(dims[1]), ref(dims[2]), ref(one), b.data_ptr(),
       ref(dims[0]), a.data_ptr(), ref(dims[2]), ref(zero), c.data_ptr(), ref(dims[0]))  # fmt: skip
    return bool(torch.allclose(c, a @ b, rtol=1e-5, atol=1e-5))


def _check(ts: list[Tensor]) -> None:
    for t in ts:
        if t.dtype is not torch.float32 or not t.is_cpu or not t.is_contiguous():
            raise ValueError("plumb.native wants contiguous float32 CPU tensors")


_DTYPE = operator.attrgetter("dtype")
_IS_CPU = operator.attrgetter("is_cpu")


def readable(ts: list[Tensor]) -> bool:
    """Whether the kernels can read every tensor where it lies (float32, CPU, contiguous),
    with one pass per property (no Python per tensor)."""
    return (
        set(map(_DTYPE, ts)) <= {torch.float32}
        and all(map(_IS_CPU, ts))
        and all(map(Tensor.is_contiguous, ts))
    )


def _check_all(ts: list[Tensor]) -> None:
    """``_check`` of many tensors, with one pass per property."""
    if not readable(ts):
        _check(ts)  # raises


def row_stats(xs: list[Tensor], bs: list[Tensor | None]) -> Tensor:
    """(len(xs), 4) float64: mean, M2 = sum (v - mean)^2, min, max of each ``v = xs[i]``
    (``xs[i] - bs[i]`` in float32 where ``bs[i]`` is given); NaN min/max where v holds a
    NaN. Tensors: float32, contiguous, on the CPU (``bs[i]`` the shape of ``xs[i]``).
    Within rowstats.c's bounds of the exact values: the mean within 8 u (max - min), M2
    within 10 u of sum (v - m)^2 (m: the mean in float32), u = 2^-24."""
    return torch.from_numpy(Rows(xs, bs).stats())


#: ``plumb_off_counts``' kinds: tanh |v| > t, sigmoid |v - 0.5| > t, else (a rectifier) v <= 0
OFF_KINDS = {"tanh": 1, "sigmoid": 2}


class Rows:
    """``row_stats`` of fixed tensors, and the off counts of some (``plumb_off_counts``),
    with the call's arguments built once: ``stats()``, ``off()`` and ``fill()`` read the
    values the tensors hold at the call. A record step that measures the same buffers
    every time (``plumb.fused``'s step in C) builds one and keeps it: ~80 tensors'
    arguments cost more Python than the kernel takes to read them. Holds the tensors
    (their memory stays valid while it lives).

    ``bs[i]`` None, a tensor (row i is ``xs[i] - bs[i]``), or ``MISSING`` (row i is NaN:
    nothing to measure). ``offs``: (tensor, kind, threshold, units, inner) per output
    whose values are counted off (``plumb.stats.off_mask``: kind "tanh" |v| > threshold,
    "sigmoid" |v - 0.5| > threshold, else v <= 0, in float32), laid out (outer, units,
    inner); units 0: no per-unit masks."""

    MISSING = "missing"

    def __init__(
        self,
        xs: list[Tensor],
        bs: list[Tensor | str | None],
        offs: list[tuple[Tensor, str, float, int, int]] = (),  # type: ignore[assignment]
        off_rows: list[int] | None = None,
        dead: list[int] | None = None,
    ):
        if _load() is None:
            raise RuntimeError("plumb.native is not available (see plumb.native.available)")
        if len(bs) != len(xs):
            raise ValueError("plumb.native.row_stats: one bs[i] (or None) per xs[i]")
        # The same values twice (a layer's input is the layer before's output) are read
        # once: equal (pointer, length) without ``b`` give equal rows, bit for bit. Built
        # with whole-list operations: a record step of an eager model builds one for ~100
        # to ~250 tensors, and ~1 us of Python per tensor was ~10 % of its cost.
        xs = list(xs)
        _check_all(xs)
        ptrs = list(map(Tensor.data_ptr, xs))
        lens = list(map(Tensor.numel, xs))
        keys = list(zip(ptrs, lens, strict=True))
        same = [-1] * len(xs)
        bps = [0] * len(xs)
        plain = [i for i, b in enumerate(bs) if b is None]
        first = dict(zip([keys[i] for i in reversed(plain)], reversed(plain), strict=True))
        for i in [i for i in plain if first[keys[i]] != i]:
            same[i] = first[keys[i]]
        for i in [i for i, b in enumerate(bs) if isinstance(b, str)]:
            same[i] = -2
        upd = [i for i, b in enumerate(bs) if b is not None and not isinstance(b, str)]
        before = [bs[i] for i in upd]
        _check_all(before)
        if [lens[i] for i in upd] != list(map(Tensor.numel, before)):
            raise ValueError("plumb.native.row_stats: bs[i] must be None or the size of xs[i]")
        for i, p in zip(upd, map(Tensor.data_ptr, before), strict=True):
            bps[i] = p
        n = self.n = len(xs)
        self._keep = (xs, list(bs), [o[0] for o in offs])
        # the calls' argument arrays, as numpy arrays (their addresses passed)
        self._arrays = (
            np.array(ptrs, dtype=np.uint64),
            np.array(bps, dtype=np.uint64),
            np.array(lens, dtype=np.int64),
            np.array(same, dtype=np.int64),
        )
        self._args = (n, *(a.ctypes.data for a in self._arrays))
        _check([o[0] for o in offs])
        units = [int(o[3]) for o in offs]
        for t, _, _, u, inner in offs:
            if u < 0 or inner < 1 or (u > 0 and t.numel() % (u * inner)):
                raise ValueError("plumb.native.Rows: an off tensor is not (outer, units, inner)")
        k = len(offs)
        self.units = units  # per off tensor
        self.n_off, self.n_units = k, sum(units)
        self._off_args = (
            k,
            (ctypes.c_void_p * k)(*[o[0].data_ptr() for o in offs]),
            (ctypes.c_int64 * k)(*[o[0].numel() for o in offs]),
            (ctypes.c_int64 * k)(*[OFF_KINDS.get(o[1], 0) for o in offs]),
            (ctypes.c_float * k)(*[o[2] for o in offs]),
            (ctypes.c_int64 * k)(*units),
            (ctypes.c_int64 * k)(*[o[4] for o in offs]),
            ctypes.create_string_buffer(
                max(units, default=0)
                + max((u * o[4] for u, o in zip(units, offs, strict=True)), default=0)
                + 1
            ),
        )
        self._in_order = (ctypes.c_int64 * k)(*range(k))
        self.off_rows = None if off_rows is None else list(off_rows)  # for ``fill``
        if off_rows is not None and (
            len(off_rows) != k or any(not 0 <= r < self.n for r in off_rows)
        ):
            raise ValueError("plumb.native.Rows: one row (of the n) per off tensor")
        self._layout: tuple | None = None  # fill's (stride, column, at, fractions at, size)
        # per off tensor, its entry in fill's fractions (-1: none; only tensors with units)
        self.dead = None if dead is None else [int(d) for d in dead]
        if self.dead is not None and (
            len(self.dead) != k
            or any(d >= 0 and u == 0 for d, u in zip(self.dead, units, strict=True))
        ):
            raise ValueError("plumb.native.Rows: one dead index per off tensor, -1 without units")
        self._no_fractions = (ctypes.c_int64 * max(k, 1))(*([-1] * max(k, 1)))

    def stats(self) -> np.ndarray:
        """(n, 4) float64, a new array: ``row_stats`` of the tensors as they are now."""
        out = np.empty((self.n, 4), dtype=np.float64)
        _fn(*self._args, 4, out.ctypes.data)
        return out

    def off(self) -> tuple[np.ndarray, np.ndarray]:
        """(values off per off tensor, per-unit all-off flags of every off tensor with
        units, concatenated in order: 1.0 off for every example, else 0.0), new float64
        arrays."""
        counts = np.empty(self.n_off, dtype=np.float64)
        all_off = np.empty(self.n_units, dtype=np.float64)
        if self.n_off:
            _off(
                *self._off_args,
                self._in_order,
                self._no_fractions,
                counts.ctypes.data,
                all_off.ctypes.data,
            )
        return counts, all_off

    def set_layout(
        self, stride: int, column: int, off_column: int, tail: int | None = None
    ) -> None:
        """Where ``fill`` writes in its flat float64 buffer: row i's mean, M2, min, max at
        ``i * stride + column`` onwards, off tensor j's count at ``off_rows[j] * stride +
        off_column``, and with ``tail``, at ``tail + dead[j]`` the fraction of off tensor
        j's units off for every example (``Rows(dead=...)``)."""
        k = self.n_off
        if self.off_rows is None and k:
            raise ValueError("plumb.native.Rows: give Rows the off tensors' rows to fill")
        if not (0 <= column <= stride - 4 and 0 <= off_column < stride):
            raise ValueError("plumb.native.Rows.set_layout: columns outside the stride")
        size = self.n * stride
        frac = [-1] * k
        if tail is not None:
            if self.dead is None or tail < size:
                raise ValueError("plumb.native.Rows.set_layout: a tail after the rows, and dead")
            frac = [tail + d if d >= 0 else -1 for d in self.dead]
            size = max(size, max(frac, default=-1) + 1)
        at = [r * stride + off_column for r in self.off_rows or ()]
        self._layout = (
            stride,
            column,
            (ctypes.c_int64 * max(k, 1))(*at),
            (ctypes.c_int64 * max(k, 1))(*(frac or [-1])),
            size,
        )

    def fill(self, flat: Tensor) -> np.ndarray:
        """Write the statistics, off counts and dead fractions into ``flat`` (1-D float64,
        contiguous, CPU, at least ``set_layout``'s size) where ``set_layout`` says; returns
        the per-unit flags (as ``off``), a new array."""
        layout = self._layout
        if layout is None:
            raise ValueError("plumb.native.Rows.fill: set_layout first")
        stride, column, at, frac, size = layout
        if (
            flat.dtype is not torch.float64
            or not flat.is_cpu
            or not flat.is_contiguous()
            or flat.numel() < size
        ):
            raise ValueError(f"plumb.native.Rows.fill: want >= {size} contiguous float64 values")
        base = flat.data_ptr()
        _fn(*self._args, stride, base + 8 * column)
        all_off = np.empty(self.n_units, dtype=np.float64)
        if self.n_off:
            _off(*self._off_args, at, frac, base, all_off.ctypes.data)
        return all_off


def histograms(xs: list[Tensor], lo: Tensor, scale: Tensor, slots: list[int], out: Tensor) -> None:
    """Add to ``out (n_slots, bins)`` int64, row ``slots[i]``, the counts of ``xs[i]``'s
    values on ``bins`` equal bins: bin = floor((v - lo[i]) * scale[i]) in float32, NaN in
    bin 0, clamped to [0, bins - 1] (``plumb.stats.Plan.bin_indices``' arithmetic).
    ``lo``, ``scale``: float32 (len(xs),); tensors as for ``row_stats``."""
    if out.dtype != torch.int64 or not out.is_contiguous() or out.device.type != "cpu":
        raise ValueError("plumb.native.histograms counts into a contiguous int64 CPU table")
    Histograms(xs, slots, out.shape[0], out.shape[1]).add(lo, scale, out)


class Histograms:
    """``histograms`` of fixed tensors into fixed slots, the call's arguments built once
    (as ``Rows``): ``add(lo, scale, out)`` counts the values the tensors hold now."""

    def __init__(self, xs: list[Tensor], slots: list[int], n_slots: int, bins: int):
        if _load() is None:
            raise RuntimeError("plumb.native is not available (see plumb.native.available)")
        _check(xs)
        n = len(xs)
        if len(slots) != n:
            raise ValueError("plumb.native.histograms: one lo, scale and slot per tensor")
        if any(not 0 <= s < n_slots for s in slots):
            raise ValueError("plumb.native.histograms: a slot outside the table")
        self.n, self.shape = n, (n_slots, bins)
        self._keep = list(xs)
        self._scratch = torch.empty(4 * bins, dtype=torch.int64)
        self._xs = (ctypes.c_void_p * n)(*[x.data_ptr() for x in xs])
        self._ns = (ctypes.c_int64 * n)(*[x.numel() for x in xs])
        self._slots = (ctypes.c_int64 * n)(*slots)

    def counts(self, lo: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """A new (n_slots, bins) int64 table of the counts; ``lo``, ``scale``: (n,)
        float32 arrays, per tensor."""
        lo = np.ascontiguousarray(lo, dtype=np.float32)
        scale = np.ascontiguousarray(scale, dtype=np.float32)
        if lo.shape != (self.n,) or scale.shape != (self.n,):
            raise ValueError("plumb.native.histograms: one lo, scale and slot per tensor")
        out = np.zeros(self.shape, dtype=np.int64)
        _hist(
            self.n,
            self._xs,
            self._ns,
            lo.ctypes.data,
            scale.ctypes.data,
            self._slots,
            self.shape[1],
            self._scratch.data_ptr(),
            out.ctypes.data,
        )
        return out

    def add(self, lo: Tensor, scale: Tensor, out: Tensor) -> None:
        """Add the counts into ``out`` ((n_slots, bins) int64, contiguous, CPU); ``lo``,
        ``scale``: (n,) per tensor."""
        if out.dtype != torch.int64 or not out.is_contiguous() or out.device.type != "cpu":
            raise ValueError("plumb.native.histograms counts into a contiguous int64 CPU table")
        if tuple(out.shape) != self.shape:
            raise ValueError(f"plumb.native.histograms: the table is not {self.shape}")
        lo, scale = lo.float().contiguous().cpu(), scale.float().contiguous().cpu()
        if lo.numel() != self.n or scale.numel() != self.n:
            raise ValueError("plumb.native.histograms: one lo, scale and slot per tensor")
        _hist(
            self.n,
            self._xs,
            self._ns,
            lo.data_ptr(),
            scale.data_ptr(),
            self._slots,
            self.shape[1],
            self._scratch.data_ptr(),
            out.data_ptr(),
        )
