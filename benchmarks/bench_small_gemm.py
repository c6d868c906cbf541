"""The expert tiles' GEMMs on one thread: moe_py's micro-kernel (cpp/small_gemm.cpp, as the
expert kernels call it, op(B) packed inside each call) against the OpenBLAS moe_py links
(scipy-openblas32, cblas_sgemm) and torch.mm when torch is installed, float32; then, where
the CPU has a bfloat16 GEMM kernel (`info`'s bf16_gemm), moe_py's (the same call with
compute_dtype="bfloat16": float32 operands rounded as they are packed) against torch.mm on
bfloat16 tensors. GFLOP/s, medians of interleaved samples.

    .venv/bin/python benchmarks/bench_small_gemm.py [--samples 7]

Rows: a forward tile (256 token rows x d_model) x W1 (d_model x d_ff), and the weight
gradient X^T dH (d_model x 256) x (256 x d_ff) of one 256-row tile, at the expert widths of
the bench_layer shapes; the second reads a transposed A.
"""
import argparse
import ctypes
import statistics
import time

import numpy as np

import moe_py
from common import machine_line, one_thread_sgemm
from moe_py import _core, bf16, kernels

SIZES = [(128, 128), (256, 256), (256, 512), (512, 128), (512, 1024)]  # (d_model, d_ff)
TILE = 256


def rate(fn, flops):
    """GFLOP/s of one sample: as many calls as fill ~20 ms."""
    n, t = 1, 0.0
    while True:
        start = time.perf_counter()
        for _ in range(n):
            fn()
        t = time.perf_counter() - start
        if t > 0.02:
            return flops * n / t / 1e9
        n *= 2


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=7)
    args = ap.parse_args()
    moe_py.set_num_threads(1)
    _, sgemm, _ = one_thread_sgemm()
    try:
        import torch
        torch.set_num_threads(1)
    except ImportError:
        torch = None
    print(machine_line())
    print(f"moe_py GEMM micro-kernel: {moe_py.build_info()['gemm_kernel']}; 1 thread, float32, "
          f"median of {args.samples} interleaved samples")
    bf16_kernel = bf16.kernel() if bf16.kernel() != "fallback" else None
    print(f"bfloat16 kernel: {bf16_kernel or 'none (fallback only): no bfloat16 columns'}")
    print(f"{'product':44s} {'moe_py':>8} {'OpenBLAS':>9} {'torch.mm':>9}"
          + (f" {'bf16 ours':>10} {'bf16 torch':>11}" if bf16_kernel else "") + "  GFLOP/s")
    ptr = lambda x: x.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
    rng = np.random.default_rng(0)
    small_gemm = kernels.kernel("small_gemm", np.float32)
    for D, F in SIZES:
        for trans_a in (False, True):
            M, N, K = (D, F, TILE) if trans_a else (TILE, F, D)
            a = rng.standard_normal((K, M) if trans_a else (M, K), dtype=np.float32)
            b = rng.standard_normal((K, N), dtype=np.float32)
            c = np.zeros((M, N), np.float32)
            ours = lambda: small_gemm(a=a, b=b, trans_a=trans_a, trans_b=False, c=c,  # noqa: E731
                                      accumulate=False, packed=False)
            blas_args = (101, 112 if trans_a else 111, 111, M, N, K, ctypes.c_float(1), ptr(a),
                         M if trans_a else K, ptr(b), N, ctypes.c_float(0), ptr(c), N)
            theirs = lambda: sgemm(*blas_args)  # noqa: E731
            fns = [ours, theirs]
            if torch is not None:
                ta, tb, tc = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(c)
                fns.append(lambda: torch.mm(ta.T if trans_a else ta, tb, out=tc))
            else:
                fns.append(lambda: None)
            if bf16_kernel:
                fns.append(lambda: _core.small_gemm_bf16(kernel=bf16_kernel, a=a, b=b, trans_a=trans_a,
                                                         trans_b=False, c=c, accumulate=False, packed=False))
                if torch is not None:
                    ha, hb = torch.from_numpy(a).bfloat16(), torch.from_numpy(b).bfloat16()
                    hc = torch.zeros((M, N), dtype=torch.bfloat16)
                    fns.append(lambda: torch.mm(ha.T if trans_a else ha, hb, out=hc))
            flops = 2.0 * M * N * K
            samples = [[] for _ in fns]
            for _ in range(args.samples):
                for f, s in zip(fns, samples):
                    s.append(rate(f, flops))
            med = [statistics.median(s) for s in samples] + [float("nan")] * (5 - len(fns))
            if torch is None:
                med[2] = float("nan")
            name = (f"X^T dH  [{D}x{TILE}]x[{TILE}x{F}] (weight grad)" if trans_a
                    else f"X W1    [{TILE}x{D}]x[{D}x{F}] (forward tile)")
            print(f"{name:44s} {med[0]:8.0f} {med[1]:9.0f} {med[2]:9.0f}"
                  + (f" {med[3]:10.0f} {med[4]:11.0f}" if bf16_kernel else ""))
            want = (a.T if trans_a else a).astype(np.float64) @ b
            ours()
            assert np.allclose(c, want, rtol=1e-3, atol=1e-3 * np.sqrt(K)), "wrong product"
            if bf16_kernel:
                fns[3]()
                assert np.allclose(c, want, rtol=3e-2, atol=3e-2 * np.sqrt(K)), "wrong bfloat16 product"


if __name__ == "__main__":
    main()
