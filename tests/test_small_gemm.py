"""The expert/attention/linear GEMM micro-kernel (cpp/small_gemm.h) against NumPy in float64
and float32: every transposition, edge sizes around the micro-tile (12 rows x 32 columns in
float32 AVX-512, 6 x 16 in AVX2), k blocks of 256, accumulation, and the pre-packed B."""
import numpy as np
import pytest

import moe_py
from moe_py import _core
from moe_py._kernels import kernel

SHAPES = [(1, 1, 1), (12, 32, 256), (13, 33, 257), (11, 31, 255), (25, 16, 7), (5, 8, 600),
          (100, 77, 300), (48, 130, 513), (7, 1, 40), (29, 520, 270)]


def run(dtype, M, N, K, trans_a, trans_b, accumulate, packed, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((K, M) if trans_a else (M, K)).astype(dtype)
    b = rng.standard_normal((N, K) if trans_b else (K, N)).astype(dtype)
    c0 = rng.standard_normal((M, N)).astype(dtype)
    c = c0.copy()
    kernel("small_gemm", dtype)(a=a, b=b, trans_a=trans_a, trans_b=trans_b, c=c, accumulate=accumulate, packed=packed)
    oa = a.T.astype(np.float64) if trans_a else a.astype(np.float64)
    ob = b.T.astype(np.float64) if trans_b else b.astype(np.float64)
    want = oa @ ob + (c0.astype(np.float64) if accumulate else 0.0)
    return c, want


@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("accumulate", [False, True])
def test_small_gemm_matches_numpy_float64(M, N, K, trans_a, trans_b, accumulate):
    for packed in (False, True):
        c, want = run(np.float64, M, N, K, trans_a, trans_b, accumulate, packed)
        np.testing.assert_allclose(c, want, rtol=1e-12, atol=1e-12 * np.sqrt(K))


@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (False, True), (True, False)])
def test_small_gemm_matches_numpy_float32(M, N, K, trans_a, trans_b):
    c, want = run(np.float32, M, N, K, trans_a, trans_b, True, False)
    np.testing.assert_allclose(c, want, rtol=1e-4, atol=1e-5 * np.sqrt(K) * 4)


def test_packed_b_gives_the_same_bits_and_k_blocks_add_up():
    """A product over K rows equals the same product accumulated k block (256 rows) by k
    block: the experts' backward relies on it to add each row tile's weight-gradient share in
    turn. With the SIMD micro-kernels, pack_b + small_gemm_packed is also bitwise small_gemm
    (the BLAS fallback of builds without AVX2 may pick other kernels for a transposed B)."""
    simd = moe_py.build_info()["gemm_kernel"] != "blas"
    for dtype in (np.float32, np.float64):
        for ta, tb in [(False, False), (False, True), (True, False)]:
            c1, _ = run(dtype, 37, 70, 700, ta, tb, True, False, seed=3)
            c2, _ = run(dtype, 37, 70, 700, ta, tb, True, True, seed=3)
            assert np.array_equal(c1, c2) or not simd
        rng = np.random.default_rng(4)
        xs = rng.standard_normal((700, 37)).astype(dtype)   # [K, M]: A = xs^T
        dh = rng.standard_normal((700, 70)).astype(dtype)
        fn = kernel("small_gemm", dtype)
        whole = np.zeros((37, 70), dtype)
        fn(a=xs, b=dh, trans_a=True, trans_b=False, c=whole, accumulate=True, packed=False)
        tiles = np.zeros((37, 70), dtype)
        for r0 in range(0, 700, 256):
            fn(a=np.ascontiguousarray(xs[r0:r0 + 256]), b=np.ascontiguousarray(dh[r0:r0 + 256]),
               trans_a=True, trans_b=False, c=tiles, accumulate=True, packed=False)
        assert np.array_equal(whole, tiles)


def test_empty_products():
    for M, N, K in [(0, 5, 3), (4, 0, 3), (4, 5, 0)]:
        for acc in (False, True):
            c, want = run(np.float64, M, N, K, False, False, acc, False)
            np.testing.assert_array_equal(c, want)


def test_bad_shapes_are_value_errors():
    a = np.zeros((3, 4)); b = np.zeros((5, 6))
    with pytest.raises(ValueError, match="b"):
        _core.small_gemm_f64(a=a, b=b, trans_a=False, trans_b=False, c=np.zeros((3, 6)),
                             accumulate=False, packed=False)
    with pytest.raises(ValueError, match="c"):
        _core.small_gemm_f64(a=a, b=np.zeros((4, 6)), trans_a=False, trans_b=False,
                             c=np.zeros((3, 5)), accumulate=False, packed=False)


def test_a_column_range_has_the_bits_of_the_whole_product():
    """Each C element's sum is the same whatever the product's width: a transposed A read by
    many panels (here 600 columns) is copied to a contiguous block first, by few (40) it is
    read in place, and both must give the same bits. That copy is the SIMD micro-kernels';
    the BLAS fallback of builds without AVX2 is held to rounding only: OpenBLAS picks its
    kernels by shape (bitwise on a Zen 4 with the SkylakeX kernels, not on a Zen 2)."""
    simd = moe_py.build_info()["gemm_kernel"] != "blas"
    rng = np.random.default_rng(5)
    for dtype in (np.float32, np.float64):
        fn = kernel("small_gemm", dtype)
        a = rng.standard_normal((300, 37)).astype(dtype)    # A^T: [K, M]
        b = rng.standard_normal((300, 600)).astype(dtype)
        wide = np.zeros((37, 600), dtype)
        fn(a=a, b=b, trans_a=True, trans_b=False, c=wide, accumulate=False, packed=False)
        narrow = np.zeros((37, 40), dtype)
        fn(a=a, b=np.ascontiguousarray(b[:, 64:104]), trans_a=True, trans_b=False, c=narrow,
           accumulate=False, packed=False)
        if simd:
            assert np.array_equal(wide[:, 64:104], narrow)
        else:
            np.testing.assert_allclose(wide[:, 64:104], narrow, rtol=1e-5 if dtype == np.float32 else 1e-13,
                                       atol=1e-4 if dtype == np.float32 else 1e-12)
