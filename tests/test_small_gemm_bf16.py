"""The bfloat16 GEMM kernels (cpp/small_gemm_bf16.h) against float64 products of the rounded
operands, a NumPy model of their summation order, and each other; the kernel choice."""
import numpy as np
import pytest

from moe_py import _core, bf16
from moe_py.bf16 import round_to_bf16

KERNELS = [k for k in bf16.available_kernels() if k != "fallback"]  # the GEMM kernels this CPU runs
U32 = 2.0 ** -24  # float32's unit roundoff

# (M, N, K): odd K, K over one block (256) and over two, k past whole AMX tiles (32 k),
# row tails (of 4, 12 and 32 rows per tile), column edges (1, < 16, < 32, past a 512-column
# block)
SHAPES = [(1, 1, 1), (5, 7, 3), (13, 37, 5), (12, 32, 256), (29, 16, 257), (3, 530, 18),
          (25, 45, 513), (40, 100, 64), (70, 33, 97)]


def operands(M, N, K, ta, tb, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((K, M) if ta else (M, K)).astype(np.float32)
    b = rng.standard_normal((N, K) if tb else (K, N)).astype(np.float32)
    return a, b


def gemm(kernel, a, b, ta, tb, c, accumulate=False, packed=False):
    _core.small_gemm_bf16(kernel=kernel, a=a, b=b, trans_a=ta, trans_b=tb, c=c, accumulate=accumulate,
                          packed=packed)
    return c


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ta,tb", [(False, False), (True, False), (False, True), (True, True)])
def test_the_kernel_is_the_float64_product_of_the_rounded_operands(kernel, shape, ta, tb):
    """|C - C64| <= (K + 1) u sum|a b| (+ |C0| u with accumulate): exact up to the order of
    the float32 sums, C64 the float64 product of the bfloat16-rounded operands."""
    M, N, K = shape
    a, b = operands(M, N, K, ta, tb)
    A = round_to_bf16(a).astype(np.float64)
    B = round_to_bf16(b).astype(np.float64)
    A, B = (A.T if ta else A), (B.T if tb else B)
    c0 = np.random.default_rng(1).standard_normal((M, N)).astype(np.float32)
    want = c0 + A @ B
    mag = np.abs(c0) + np.abs(A) @ np.abs(B)
    for packed in (False, True):
        got = gemm(kernel, a, b, ta, tb, c0.copy(), accumulate=True, packed=packed)
        assert np.all(np.abs(got - want) <= (K + 2) * U32 * mag), (packed, np.abs(got - want).max())
        fresh = gemm(kernel, a, b, ta, tb, np.full((M, N), np.nan, np.float32), packed=packed)
        assert np.all(np.abs(fresh - A @ B) <= (K + 1) * U32 * (np.abs(A) @ np.abs(B)))


def documented_order(a, b, odd_first, k_block=256, c0=None):
    """An emulated kernel's sums in NumPy float32, C (+)= a b (c0: C to accumulate into):
    per k pair p, acc += a[2p+1] b[2p+1] then acc += a[2p] b[2p] (odd_first: VDPBF16PS as
    the Intel SDM writes it; its kernel sums each k block of 256 from zero and adds it into
    C in order) or the other way round (TDPBF16PS as the ISA reference writes it; its tiles
    continue C's sum). Each product of two bfloat16 values is exact in float32, so each
    float32 addition here rounds as the FMA that does it."""
    A, B = round_to_bf16(a), round_to_bf16(b)
    M, K = A.shape
    C = np.zeros((M, B.shape[1]), np.float32) if c0 is None else c0.copy()
    tiles = not odd_first
    for k0 in range(0, K, k_block):
        acc = C.copy() if tiles else np.zeros_like(C)
        for k in range(k0, min(K, k0 + k_block), 2):
            pair = [k, k + 1][:2 if k + 1 < min(K, k0 + k_block) else 1]
            for q in (reversed(pair) if odd_first else pair):
                acc = acc + np.outer(A[:, q], B[q]).astype(np.float32)
        C = acc if tiles or (k0 == 0 and c0 is None) else C + acc
    return C


@pytest.mark.parametrize("kernel,odd_first", [("emulated", True), ("amx_emulated", False)])
@pytest.mark.parametrize("shape", [(13, 37, 5), (29, 40, 257), (7, 33, 600), (40, 70, 96)])
def test_the_emulated_kernels_sum_in_the_documented_order_bit_for_bit(kernel, odd_first, shape):
    if kernel not in KERNELS:
        pytest.skip("needs AVX2 and FMA")
    M, N, K = shape
    a, b = operands(M, N, K, False, False, seed=2)
    got = gemm(kernel, a, b, False, False, np.zeros((M, N), np.float32))
    assert np.array_equal(got, documented_order(a, b, odd_first))
    c0 = np.random.default_rng(3).standard_normal((M, N)).astype(np.float32)
    got = gemm(kernel, a, b, False, False, c0.copy(), accumulate=True)
    assert np.array_equal(got, documented_order(a, b, odd_first, c0=c0))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("K", [700, 8300])  # (a tile kernel's packed product takes K whole up to 8192)
def test_packing_rounds_and_the_k_blocks_add_up_bit_for_bit(kernel, K):
    """Unrounded operands give what rounded ones give (the kernel rounds while packing);
    packed B gives unpacked B's bits; a product over K rows is the 256-row blocks' products
    added one call at a time (what lets the experts' two backward paths agree)."""
    a, b = operands(37, 70, K, True, False, seed=3)
    ref = gemm(kernel, a, b, True, False, np.zeros((37, 70), np.float32))
    assert np.array_equal(ref, gemm(kernel, round_to_bf16(a), round_to_bf16(b), True, False,
                                    np.zeros((37, 70), np.float32)))
    assert np.array_equal(ref, gemm(kernel, a, b, True, False, np.zeros((37, 70), np.float32), packed=True))
    c = np.zeros((37, 70), np.float32)
    for k0 in range(0, K, 256):
        gemm(kernel, np.ascontiguousarray(a[k0:k0 + 256]), np.ascontiguousarray(b[k0:k0 + 256]), True, False, c,
             accumulate=k0 > 0)
    assert np.array_equal(ref, c)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("ta,tb", [(False, False), (True, True)])
def test_subnormals_that_round_to_the_smallest_normal_count(kernel, ta, tb):
    """Float32 subnormals just below 2^-126 round up to it (a normal bfloat16): their products
    count, as the rounded operands' do, whichever way the kernel packs (AVX-512 kernels
    convert with VCVTNE2PS2BF16, which flushes subnormal inputs; other subnormals, zero either
    way, as VDPBF16PS and TDPBF16PS read bfloat16 subnormals)."""
    M, N, K = 37, 40, 70  # past 16 values: the vector packing's whole steps and tails
    rng = np.random.default_rng(4)
    near = np.array([0x007F8000, 0x007FFFFF, 0x807FC000, 0x007F0000, 0x00000001], np.uint32).view(np.float32)
    a = rng.choice(near, (K, M) if ta else (M, K)).astype(np.float32)
    b = (rng.choice([-1.0, 1.0], (N, K) if tb else (K, N)) * 2.0 ** 100).astype(np.float32)
    got = gemm(kernel, a, b, ta, tb, np.zeros((M, N), np.float32))
    want = gemm(kernel, round_to_bf16(a), b, ta, tb, np.zeros((M, N), np.float32))
    assert np.array_equal(got, want) and np.abs(got).max() >= 2.0 ** -26
    # and on B's side, packed or not
    op_a, op_b = (a.T if ta else a), (b.T if tb else b)
    for packed in (False, True):
        got = gemm(kernel, op_b.T.copy(), op_a.T.copy(), False, False, np.zeros((N, M), np.float32), packed=packed)
        want = gemm(kernel, op_b.T.copy(), round_to_bf16(op_a.T.copy()), False, False,
                    np.zeros((N, M), np.float32))
        assert np.array_equal(got, want)


@pytest.mark.parametrize("kernel", KERNELS)
def test_the_kernels_self_check_passes(kernel):
    assert _core.bf16_self_check(kernel=kernel)


def test_the_default_kernel_is_the_fastest_this_cpu_runs():
    """amx, else avx512_bf16 on an AMD CPU, wherever it runs (a failed self-check would make
    this fail: the default would fall back), else the fallback (VDPBF16PS on Intel is slower
    than float32 FMAs); never an emulation by default."""
    import subprocess
    import sys
    code = "import moe_py.bf16 as b; print(b.kernel())"
    env = {k: v for k, v in __import__("os").environ.items() if k != bf16.KERNEL_ENV}
    got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    amd = "AuthenticAMD" in open("/proc/cpuinfo").read()
    fast = ("amx", "avx512_bf16") if amd else ("amx",)
    assert got.strip() == next((k for k in fast if k in KERNELS), "fallback")
    if __import__("platform").machine() == "x86_64":
        assert _core.bf16_kernel_pays(kernel="amx") and _core.bf16_kernel_pays(kernel="avx512_bf16") == amd


def test_bad_kernels_are_named():
    with pytest.raises(ValueError, match="kernel: expected one of"):
        bf16.set_kernel("tpu")
    unavailable = [k for k in bf16.KERNELS if k not in KERNELS + ["fallback"]]
    for k in unavailable:
        with pytest.raises(ValueError, match="does not run on this CPU"):
            bf16.set_kernel(k)
    with pytest.raises(ValueError, match="kernel: 'fallback' has no GEMM"):
        gemm("fallback", np.zeros((2, 2), np.float32), np.zeros((2, 2), np.float32), False, False,
             np.zeros((2, 2), np.float32))
    for k in KERNELS:
        with pytest.raises(ValueError, match="b: inner dimension"):
            gemm(k, np.zeros((2, 3), np.float32), np.zeros((2, 2), np.float32), False, False,
                 np.zeros((2, 2), np.float32))
