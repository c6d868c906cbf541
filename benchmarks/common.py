"""What the benchmark scripts share: timing, threads, the machine and its limits, memory.

The scripts import this module (and torch_reference.py) by bare name: Python puts a script's
own folder first on sys.path, whether it is run from the checkout's root or from benchmarks/.
No script imports another script.

- interleaved_medians(): sides timed A B A B ..., so that a slow spell of the machine hits
  every side alike; ForeignLoad says how busy other processes kept the CPUs meanwhile.
- best_sgemm(): the best SGEMM rate of any library in this process at a given shape and
  thread count: moe_py's own GEMM path (matmul_f32: fixed tiles on our OpenMP threads, the GEMM
  micro-kernel of cpp/small_gemm.cpp in each), NumPy's `@` (its own bundled OpenBLAS, thread
  count set through ctypes) and torch.mm (oneDNN/MKL). A benchmark that divides by its own
  GEMM alone cannot see a slow BLAS.
- fma_peak(): the FP32 FMA peak measured with a register-only FMA loop (moe_py.kernels.fma_peak:
  16 independent SIMD accumulators per thread, 2 FLOPs per lane per FMA).
- start_rss_window() / end_rss_window(): the peak RSS of a stretch of code and its rise.
"""
from __future__ import annotations

import ctypes
import gc
import math
import os
import resource
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

import moe_py
from moe_py import kernels
from moe_py.machine import rss_mib


# ---- timing ---------------------------------------------------------------------------

def interleaved_times(fns: Dict[str, Callable[[int], object]], repeats: int, warmup: int,
                      befores: Optional[Dict[str, Callable[[], None]]] = None) -> Dict[str, List[float]]:
    """Wall times of fns[name](i) for the calls i = warmup .. warmup + repeats - 1 (the first
    `warmup` calls are untimed), every side once per round; befores[name]() runs untimed
    ahead of each call. i lets a side pick the round's batch."""
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            if befores and name in befores:
                befores[name]()
            t0 = time.perf_counter()
            fn(i)
            dt = time.perf_counter() - t0
            if i >= warmup:
                times[name].append(dt)
    return times


def interleaved_medians(fns: Dict[str, Callable[[int], object]], repeats: int, warmup: int,
                        befores: Optional[Dict[str, Callable[[], None]]] = None) -> Dict[str, float]:
    """Median seconds per call of each side of interleaved_times()."""
    return {name: statistics.median(ts)
            for name, ts in interleaved_times(fns, repeats, warmup, befores).items()}


def spread(times: Sequence[float]) -> float:
    """(max - min) / median: how far a side's timings wander within one run."""
    return (max(times) - min(times)) / statistics.median(times)


class KernelTimer:
    """Seconds spent in each of the named moe_py kernels while active, by wrapping them
    (moe_py.kernels.wrapped), so the real code path of a layer or model is timed."""

    def __init__(self, names: Sequence[str]) -> None:
        self.acc: Dict[str, float] = dict.fromkeys(names, 0.0)

    def _timed(self, name: str, fn: Callable) -> Callable:
        def run(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.acc[name] += time.perf_counter() - t0
        return run

    def __enter__(self):
        self._ctx = kernels.wrapped(self._timed, *self.acc)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)

    def reset(self) -> None:
        self.acc = dict.fromkeys(self.acc, 0.0)


def kernel_breakdown(step: Callable[[], object], names: Sequence[str], repeats: int, warmup: int,
                     before: Optional[Callable[[], None]] = None) -> Dict[str, float]:
    """Median seconds per step() in each named kernel, plus 'total' and 'python' (the rest:
    argument checks, allocation, the Python glue); before() runs untimed ahead of each step."""
    runs: List[Dict[str, float]] = []
    with KernelTimer(names) as kt:
        for i in range(warmup + repeats):
            if before is not None:
                before()
            kt.reset()
            t0 = time.perf_counter()
            step()
            total = time.perf_counter() - t0
            if i >= warmup:
                runs.append(dict(kt.acc, total=total, python=total - sum(kt.acc.values())))
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


# ---- threads ---------------------------------------------------------------------------

def set_threads(n: int, torch_mod=None) -> None:
    """n threads for moe_py and torch. They may share one libgomp (the first one loaded wins
    the soname), so torch is set first and moe_py last, then checked."""
    if torch_mod is not None:
        torch_mod.set_num_threads(n)
    moe_py.set_num_threads(n)
    got = moe_py.get_num_threads()
    if got != n:
        raise RuntimeError(f"moe_py runs on {got} threads after set_num_threads({n})")


def optional_torch():
    """torch, or None when it is not installed (the torch columns are then skipped)."""
    try:
        import torch
    except ImportError:
        return None
    return torch


# ---- the machine -----------------------------------------------------------------------

def machine_line() -> str:
    """CPU model, SIMD flags and the BLAS core type, for the head of every report."""
    info = moe_py.build_info()
    return (f"CPU {info['cpu']} [{info['cpu_simd']}]; moe_py BLAS {info['blas']} "
            f"{info['blas_version']}, core type {info['blas_corename']}; compiled for "
            f"{info['march']}")


class ForeignLoad:
    """CPU time other processes used while we ran (busy time in /proc/stat minus this
    process's own CPU time), as average busy cores: on a 2-core machine anything else running
    skews the 2-thread rows badly, so each row says so."""

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample() -> Optional[Tuple[float, float, float]]:
        try:
            with open("/proc/stat") as f:
                v = [float(a) for a in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        hz = os.sysconf("SC_CLK_TCK")
        busy = (sum(v) - v[3] - (v[4] if len(v) > 4 else 0.0)) / hz  # all but idle, iowait
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return busy, ru.ru_utime + ru.ru_stime, time.perf_counter()

    def cores(self, workers_cpu: float = 0.0) -> float:
        """Average cores busy with other work since construction (nan if unknown);
        workers_cpu: CPU seconds of our own worker processes in that time, not other work."""
        end = self._sample()
        if self._start is None or end is None:
            return float("nan")
        busy, own, wall = (b - a for a, b in zip(self._start, end))
        return max(0.0, (busy - own - workers_cpu) / wall) if wall > 0 else float("nan")


# ---- the machine's limits, measured in the same run as what they judge ---------------

def _median_rate(fn: Callable[[], object], flops: float, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return flops / statistics.median(times) / 1e9


class NumpyBlasThreads:
    """Sets the thread count of the OpenBLAS NumPy ships (found among the process's mapped
    libraries), so NumPy's SGEMM rate is measured on the same threads as ours."""

    def __init__(self) -> None:
        self._set = None
        paths = set()
        try:
            with open("/proc/self/maps") as f:
                for line in f:
                    p = line.split()[-1]
                    if "openblas" in p and "numpy" in p:
                        paths.add(p)
            for p in paths:
                lib = ctypes.CDLL(p)
                for name in ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_",
                             "openblas_set_num_threads"):
                    if hasattr(lib, name):
                        self._set = getattr(lib, name)
                        break
        except OSError:
            self._set = None

    @property
    def available(self) -> bool:
        return self._set is not None

    def set(self, n: int) -> None:
        if self._set is not None:
            self._set(ctypes.c_int(n))


def best_sgemm(M: int, K: int, N: int, threads: int, torch_mod=None,
               np_blas: Optional[NumpyBlasThreads] = None, repeats: int = 7,
               seed: int = 0) -> Dict[str, float]:
    """GFLOP/s of C[M,N] = A[M,K] @ B[K,N] in float32 through each library on `threads`
    threads ('moe_py', 'numpy', 'torch'), and 'best', the highest of them. moe_py's thread
    count is set by the caller."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((M, K), dtype=np.float32)
    b = rng.standard_normal((K, N), dtype=np.float32)
    flops = 2.0 * M * K * N
    matmul = kernels.kernel("matmul", np.float32)
    out = {"moe_py": _median_rate(lambda: matmul(a=a, b=b), flops, repeats)}
    if np_blas is not None and np_blas.available:
        np_blas.set(threads)
        out["numpy"] = _median_rate(lambda: a @ b, flops, repeats)
        np_blas.set(1)  # NumPy's BLAS threads spin after each call: keep them out of our way
    if torch_mod is not None:
        ta, tb = torch_mod.from_numpy(a), torch_mod.from_numpy(b)
        with torch_mod.no_grad():
            out["torch"] = _median_rate(lambda: torch_mod.mm(ta, tb), flops, repeats)
    out["best"] = max(out.values())
    return out


def fma_peak(iters: int = 20_000_000, repeats: int = 3) -> float:
    """FP32 FMA peak in GFLOP/s on moe_py's current OpenMP thread count."""
    kernels.fma_peak(iters // 10)  # wake the threads and the clocks up
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        flops, _ = kernels.fma_peak(iters)
        rates.append(flops / (time.perf_counter() - t0) / 1e9)
    return max(rates)  # the peak is the best the loop reached


def one_thread_sgemm(path: Optional[str] = None):
    """(path, cblas_sgemm, openblas_get_corename) of an OpenBLAS library set to one thread;
    without a path, the scipy-openblas32 moe_py links (its symbols carry a scipy_ prefix)."""
    if path is None:
        import scipy_openblas32
        path = os.path.join(scipy_openblas32.get_lib_dir(), scipy_openblas32.get_library(True))
    lib = ctypes.CDLL(path)
    prefix = "scipy_" if hasattr(lib, "scipy_cblas_sgemm") else ""
    getattr(lib, prefix + "openblas_set_num_threads")(1)
    core = getattr(lib, prefix + "openblas_get_corename")
    core.restype = ctypes.c_char_p
    return path, getattr(lib, prefix + "cblas_sgemm"), core


# ---- memory ----------------------------------------------------------------------------

_PEAK_BEFORE_RESETS = [0.0]


def peak_rss_mb() -> float:
    """The process's RSS high-water mark (since the last reset), MB."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return r / (1024.0 * 1024.0) if sys.platform == "darwin" else r / 1024.0


def whole_run_peak_rss_mb() -> float:
    """The highest RSS of the whole process, across the resets of start_rss_window()."""
    return max(_PEAK_BEFORE_RESETS[0], peak_rss_mb())


def _reset_peak_rss() -> bool:
    """Reset the process's RSS high-water mark (Linux >= 4.0); False if not possible."""
    _PEAK_BEFORE_RESETS[0] = whole_run_peak_rss_mb()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _trim_heap() -> None:
    """Give freed heap back to the OS (glibc), so RSS before a timed run is what is live."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def start_rss_window() -> Tuple[float, bool]:
    """(RSS now, whether the high-water mark could be reset) before the code to measure."""
    _trim_heap()
    ok = _reset_peak_rss()
    rss = rss_mib()
    return float("nan") if rss is None else rss, ok


def end_rss_window(window: Tuple[float, bool]) -> Tuple[float, float]:
    """(peak RSS since start_rss_window, that peak minus the RSS then), MB; nan if unknown."""
    before, ok = window
    if not ok:
        return float("nan"), float("nan")
    peak = peak_rss_mb()
    return peak, peak - before


def rss_str(window: Optional[Tuple[float, float]]) -> str:
    """'peak (+rise)' of an end_rss_window() result, or '-'."""
    if window is None or math.isnan(window[0]):
        return "-"
    return f"{window[0]:.0f} (+{window[1]:.0f})"


# ---- the default `train` model ----------------------------------------------------------

def default_model_and_batches(n: int, dense: bool = False):
    """The default `train` model's config (or its dense baseline's), the command's parsed
    defaults, and its first n training batches."""
    from moe_py.cli import build_parser, configs_from_args
    from moe_py.data import BatchSampler, python_source_corpus
    defaults = build_parser().parse_args(["train"])
    model_cfg, _ = configs_from_args(defaults, dense=dense)
    corpus = python_source_corpus(max_bytes=500_000)
    sampler = BatchSampler(corpus.train, defaults.batch_size, defaults.seq_len, 0)
    return model_cfg, defaults, [sampler.batch(i) for i in range(n)]


# ---- report formatting -------------------------------------------------------------------

def fmt(v, spec: str) -> str:
    """v formatted by spec, or '-' when there is no value (None or nan)."""
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def geomean(v: Sequence[float]) -> float:
    return math.exp(sum(math.log(a) for a in v) / len(v)) if v else float("nan")



class Table:
    """Columns of (title, width): cells right-aligned in them, or left for a negative width."""

    def __init__(self, columns: Sequence[Tuple[str, int]], sep: str = "") -> None:
        self.columns, self.sep = columns, sep

    def line(self, cells: Sequence[str]) -> str:
        return self.sep.join(c.ljust(-w) if w < 0 else c.rjust(w) for c, (_, w) in zip(cells, self.columns))

    def print_head(self) -> None:
        head = self.line([title for title, _ in self.columns])
        print(head)
        print("-" * len(head))

    def print_row(self, cells: Sequence[str]) -> None:
        print(self.line(cells), flush=True)
