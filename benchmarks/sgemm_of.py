"""SGEMM rate and kernel set of any OpenBLAS shared library, one thread, in this process.

    .venv/bin/python benchmarks/sgemm_of.py                 # PyPI's scipy-openblas32 (moe_py's)
    .venv/bin/python benchmarks/sgemm_of.py /usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0
    .venv/bin/python benchmarks/sgemm_of.py --shape 256 128 128   # M N K of one expert tile

Prints the core type the library picked and the median GFLOP/s of C[M,N] = A[M,K] @ B[K,N]
(row-major, float32; default 4096 x 1024 x 512) over 15 calls after 0.5 s of warm-up. A
library that does not know the CPU falls back to generic kernels: this shows it in one line.
"""
import ctypes
import statistics
import sys
import time

import numpy as np

from common import one_thread_sgemm


def main(argv):
    M, N, K = 4096, 1024, 512
    if "--shape" in argv:
        i = argv.index("--shape")
        M, N, K = (int(v) for v in argv[i + 1:i + 4])
        argv = argv[:i] + argv[i + 4:]
    path, sgemm, core = one_thread_sgemm(argv[0] if argv else None)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((M, K), dtype=np.float32)
    b = rng.standard_normal((K, N), dtype=np.float32)
    c = np.zeros((M, N), np.float32)
    ptr = lambda x: x.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
    args = (101, 111, 111, M, N, K, ctypes.c_float(1), ptr(a), K, ptr(b), N, ctypes.c_float(0), ptr(c), N)
    warm = time.perf_counter()
    while time.perf_counter() - warm < 0.5:  # clocks up, pages touched
        sgemm(*args)
    times = []
    for _ in range(15):
        t = time.perf_counter()
        sgemm(*args)
        times.append(time.perf_counter() - t)
    assert np.allclose(c[:4, :4], a[:4] @ b[:, :4], rtol=1e-3, atol=1e-3)
    print(f"{path}\n  core type {core().decode()}, SGEMM [{M}x{K}]x[{K}x{N}] 1 thread: "
          f"{2 * M * N * K / statistics.median(times) / 1e9:.0f} GFLOP/s")


if __name__ == "__main__":
    main(sys.argv[1:])
