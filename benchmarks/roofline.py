"""The machine's real limits, measured in the same run as the thing they judge.

- best_sgemm(): the best SGEMM rate of any library in this process at a given shape and thread
  count: moe_py's own GEMM path (_core.matmul_f32: fixed tiles on our OpenMP threads, the GEMM
  micro-kernel of cpp/small_gemm.cpp in each), NumPy's `@` (its own bundled OpenBLAS, thread count set through ctypes) and
  torch.mm (oneDNN/MKL). A benchmark that divides by its own GEMM alone cannot see a slow BLAS.
- fma_peak(): the FP32 FMA peak measured with a register-only FMA loop (_core.fma_peak:
  16 independent SIMD accumulators per thread, 2 FLOPs per lane per FMA).
"""
from __future__ import annotations

import ctypes
import statistics
import time
from typing import Callable, Dict, Optional

import numpy as np

import moe_py
from moe_py import _core


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
    threads, and 'best', the highest of them. moe_py's thread count is set by the caller."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((M, K), dtype=np.float32)
    b = rng.standard_normal((K, N), dtype=np.float32)
    flops = 2.0 * M * K * N
    out = {"moe_py": _median_rate(lambda: _core.matmul_f32(a=a, b=b), flops, repeats)}
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
    _core.fma_peak(iters=iters // 10)  # wake the threads and the clocks up
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        flops, _ = _core.fma_peak(iters=iters)
        rates.append(flops / (time.perf_counter() - t0) / 1e9)
    return max(rates)  # the peak is the best the loop reached


def machine_line() -> str:
    """CPU model, SIMD flags and the BLAS core type, for the head of every report."""
    info = moe_py.build_info()
    return (f"CPU {info['cpu']} [{info['cpu_simd']}]; moe_py BLAS {info['blas']} "
            f"{info['blas_version']}, core type {info['blas_corename']}; compiled for "
            f"{info['march']}")
