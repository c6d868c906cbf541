"""bfloat16 compute of the expert GEMMs (MoEConfig.compute_dtype="bfloat16", moe_py/bf16.py):
the rounding against independent references, the GEMMs against float64 products of the
rounded operands, the layer against float32 and the float64 reference, the weights' cache."""
import gc
import weakref

import numpy as np
import pytest

import moe_py
from moe_py import MoEConfig, MoELayer, bf16
from moe_py import _kernels
from moe_py._kernels import kernel
from moe_py.bf16 import round_to_bf16
from moe_py.machine import bf16_path
from moe_py.testing import BF16_REL_FRO, assert_matches_reference

U = 2.0 ** -8  # bfloat16's unit roundoff


def bits(*u):
    return np.array(u, np.uint32).view(np.float32)


def nearest_even_bf16(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even onto the bfloat16 grid, by comparing distances in float64 to the
    two neighbours (an independent route from the kernel's integer rounding)."""
    u = x.view(np.uint32)
    down = (u & 0xFFFF0000).view(np.float32).astype(np.float64)  # towards 0
    up_bits = (u & 0xFFFF0000) + 0x10000  # away from 0 (0x7F80 0000 past the largest: inf)
    with np.errstate(invalid="ignore"):  # NaN patterns are filtered out by the caller
        up = up_bits.view(np.float32).astype(np.float64)
    xd = x.astype(np.float64)
    with np.errstate(invalid="ignore"):
        d_down, d_up = np.abs(xd - down), np.abs(up - xd)
        # at the top of the range "up" is inf: a value past the midpoint to 2^128 rounds to it
        top = np.isinf(up) & np.isfinite(xd)
        d_up[top] = np.abs(2.0 ** 128 * np.sign(xd[top]) - xd[top])
        even_down = ((u >> 16) & 1) == 0
        take_up = (d_up < d_down) | ((d_up == d_down) & ~even_down)
    out = np.where(take_up, up, down)
    out[(u & 0xFFFF) == 0] = xd[(u & 0xFFFF) == 0]  # already on the grid (inf included)
    return out.astype(np.float32)


SPECIAL = bits(
    0x3F808000, 0x3F818000, 0xBF808000,  # ties: to even down, to even up, negative
    0x3F807FFF, 0x3F808001,  # just below and above a tie
    0x00000001, 0x00008000, 0x00018000, 0x80008001, 0x007FFFFF,  # subnormals (ties among them)
    0x7F7FFFFF, 0x7F7F7FFF, 0x7F7F8000, 0xFF7FFFFF,  # the top: overflow to +-inf, or not
    0x7F800000, 0xFF800000, 0x00000000, 0x80000000)  # +-inf, +-0
NANS = bits(0x7FC00000, 0x7F800001, 0xFF800001, 0x7FA00000)  # quiet, payload only in low bits


def test_rounding_matches_nearest_even_and_torch():
    rng = np.random.default_rng(0)
    x = np.concatenate([SPECIAL, rng.integers(0, 2 ** 32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)])
    x = x[~np.isnan(x)]
    got = round_to_bf16(x)
    assert np.array_equal(got.view(np.uint32), nearest_even_bf16(x).view(np.uint32))
    assert (got.view(np.uint32) & 0xFFFF == 0).all()
    torch = pytest.importorskip("torch")
    theirs = torch.from_numpy(x).to(torch.bfloat16).to(torch.float32).numpy()
    assert np.array_equal(got.view(np.uint32), theirs.view(np.uint32))


def test_rounding_keeps_nan_and_names_a_wrong_dtype():
    got = round_to_bf16(NANS)
    assert np.isnan(got).all() and np.array_equal(np.signbit(got), np.signbit(NANS))
    assert round_to_bf16(SPECIAL[:3]).tolist() == [1.0, 1.015625, -1.0]
    with pytest.raises(TypeError, match="x"):
        round_to_bf16(np.ones(3))


def grouped(E, rows, D, F, seed=0):
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
    xs = rng.standard_normal((offsets[-1], D)).astype(np.float32)
    w = {n: round_to_bf16((rng.standard_normal(s) / np.sqrt(s[1])).astype(np.float32))
         for n, s in (("w1", (E, D, F)), ("w3", (E, D, F)), ("w2", (E, F, D)))}
    return offsets, xs, w


def test_the_gemms_are_bf16_products_summed_in_float32():
    """h1 = round(x) W1 (W1 rounded), against the float64 product of the rounded operands:
    equal up to float32 accumulation, |err| <= K 2^-24 sum |x w| (K = d_model)."""
    E, D, F = 3, 300, 40
    offsets, xs, w = grouped(E, [5, 300, 0], D, F)
    h1, h3, ye = kernel("experts_forward", np.float32)(xs=xs, offsets=offsets, **w,
                                                       activation=moe_py._kernels.Activation.swiglu, bf16=True)
    xr = round_to_bf16(xs).astype(np.float64)
    for e in range(E):
        rows = slice(offsets[e], offsets[e + 1])
        for h, name in ((h1, "w1"), (h3, "w3")):
            want = xr[rows] @ w[name][e].astype(np.float64)
            bound = D * 2.0 ** -24 * (np.abs(xr[rows]) @ np.abs(w[name][e].astype(np.float64)))
            assert (np.abs(h[rows] - want) <= bound).all()
    # and not the float32 product: the rounding is really there
    plain = kernel("experts_forward", np.float32)(xs=xs, offsets=offsets, **w,
                                                  activation=moe_py._kernels.Activation.swiglu)[0]
    assert np.abs(plain - h1).max() > 1e-3


KERNELS = bf16.available_kernels()  # every bfloat16 GEMM kernel this CPU runs, the fallback included


@pytest.fixture(params=KERNELS)
def gemm_kernel(request):
    with bf16.using_kernel(request.param):
        yield request.param


@pytest.mark.parametrize("path", ["by_expert", "two_phase"])
def test_both_backward_paths_give_the_same_bits(path, gemm_kernel):
    E, D, F = 4, 64, 48
    offsets, xs, w = grouped(E, [300, 7, 0, 260], D, F, seed=1)
    act = moe_py._kernels.Activation.swiglu
    h1, h3, ye = kernel("experts_forward", np.float32)(xs=xs, offsets=offsets, **w, activation=act, bf16=True)
    dye = np.random.default_rng(2).standard_normal(ye.shape).astype(np.float32)

    def run(p):
        g = {"d" + n: np.zeros_like(v) for n, v in w.items()}
        dxs = kernel("experts_backward", np.float32)(xs=xs, offsets=offsets, **w, h1=h1, h3=h3, dye=dye,
                                                     activation=act, path=p, bf16=True, **g)
        return dxs, g
    a, b = run(path), run("auto")
    assert np.array_equal(a[0], b[0]) and all(np.array_equal(a[1][n], b[1][n]) for n in a[1])


HARDWARE_KERNELS = [k for k in KERNELS if k != "fallback"]


@pytest.mark.parametrize("linear", [False, True])
@pytest.mark.parametrize("name", HARDWARE_KERNELS)
def test_packed_weights_give_the_bits_of_a_call_that_packs_them(name, linear):
    """The packs made once per update (pack_expert_weights) are what a call packs for itself:
    forward and backward, both layouts, an expert without rows."""
    E, D, F = 4, 64, 48
    offsets, xs, w = grouped(E, [300, 7, 0, 260], D, F, seed=3)
    if linear:
        w = {n: np.ascontiguousarray(v.transpose(0, 2, 1)) for n, v in w.items()}
    act = moe_py._kernels.Activation.swiglu
    with bf16.using_kernel(name):
        packs = {b: _kernels.pack_expert_weights(**w, activation=act, linear=linear, backward=b) for b in (False, True)}
        assert packs[False].kernel == name and packs[True].backward
        fwd = kernel("experts_forward", np.float32)
        own = fwd(xs=xs, offsets=offsets, **w, activation=act, bf16=True, linear=linear)
        given = fwd(xs=xs, offsets=offsets, **w, activation=act, bf16=True, linear=linear, packed=packs[False])
        assert all(np.array_equal(a, b) for a, b in zip(own, given))
        h1, h3, ye = own
        dye = np.random.default_rng(4).standard_normal(ye.shape).astype(np.float32)

        def backward(**extra):
            g = {"d" + n: np.zeros_like(v) for n, v in w.items()}
            dxs = kernel("experts_backward", np.float32)(xs=xs, offsets=offsets, **w, h1=h1, h3=h3, dye=dye,
                                                         activation=act, bf16=True, linear=linear, **g, **extra)
            return [dxs] + [g[n] for n in sorted(g)]
        assert all(np.array_equal(a, b) for a, b in zip(backward(), backward(packed=packs[True])))
        # and the call reads the packs, not the weights
        other = {n: v * 2 for n, v in w.items()}
        doubled = _kernels.pack_expert_weights(**other, activation=act, linear=linear)
        y2 = fwd(xs=xs, offsets=offsets, **w, activation=act, bf16=True, linear=linear, packed=doubled)[2]
        assert np.array_equal(y2, fwd(xs=xs, offsets=offsets, **other, activation=act, bf16=True, linear=linear)[2])


@pytest.mark.skipif(not HARDWARE_KERNELS, reason="no bfloat16 kernel on this CPU")
def test_a_backward_runs_on_its_forwards_kernel():
    """The backward's packs are made for the kernel the forward ran on, and run on it, even
    if another was chosen meanwhile: the bits of a step on that kernel alone."""
    cfg = MoEConfig(d_model=32, d_ff=48, num_experts=4, top_k=2, compute_dtype="bfloat16", seed=3)
    rng = np.random.default_rng(3)
    x, dy = rng.standard_normal((2, 50, 32)).astype(np.float32)
    name = HARDWARE_KERNELS[0]
    with bf16.using_kernel(name):
        want = step(MoELayer(cfg), x, dy)
        mixed = MoELayer(cfg)
        mixed.zero_grad()
        y = mixed(x).y
    with bf16.using_kernel("fallback"):
        dx = mixed.backward(dy)
    assert np.array_equal(y, want[0]) and np.array_equal(dx, want[1])
    assert all(np.array_equal(mixed.grads[n], want[2][n]) for n in want[2])


def test_packs_are_checked_against_the_call():
    E, D, F = 3, 32, 16
    offsets, xs, w = grouped(E, [5, 0, 9], D, F)
    act = moe_py._kernels.Activation.swiglu
    fwd = kernel("experts_forward", np.float32)
    with bf16.using_kernel("fallback"):
        with pytest.raises(ValueError, match="kernel"):
            _kernels.pack_expert_weights(**w, activation=act)
    if not HARDWARE_KERNELS:
        return
    with bf16.using_kernel(HARDWARE_KERNELS[0]):
        backward_packs = _kernels.pack_expert_weights(**w, activation=act, backward=True)
        with pytest.raises(ValueError, match="packed: a backward's packs given to a forward"):
            fwd(xs=xs, offsets=offsets, **w, activation=act, bf16=True, packed=backward_packs)
        forward_packs = _kernels.pack_expert_weights(**w, activation=act)
        with pytest.raises(ValueError, match="packed: given without bf16"):
            fwd(xs=xs, offsets=offsets, **w, activation=act, packed=forward_packs)
        gelu = moe_py._kernels.Activation.gelu
        with pytest.raises(ValueError, match="packed: made for other weights"):
            fwd(xs=xs, offsets=offsets, **w, activation=gelu, bf16=True, packed=forward_packs)
        _, _, wide = grouped(E, [5, 0, 9], D, 2 * F)
        with pytest.raises(ValueError, match="packed: made for other weights"):
            fwd(xs=xs, offsets=offsets, **wide, activation=act, bf16=True, packed=forward_packs)


def layer_pair(**kw):
    """The same layer (weights and all) in float32 and with bfloat16 compute."""
    fp32 = MoELayer(MoEConfig(**kw, seed=1))
    bf16 = MoELayer(MoEConfig(**kw, compute_dtype="bfloat16", seed=1))
    for n in fp32.params:
        assert np.array_equal(fp32.params[n], bf16.params[n])
    return fp32, bf16


def step(layer, x, dy):
    layer.zero_grad()
    out = layer(x)
    dx = layer.backward(dy)
    return out.y.astype(np.float64), dx.astype(np.float64), {n: g.astype(np.float64) for n, g in layer.grads.items()}


def cosine(a, b):
    return float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("shape", [(4096, 512, 1024, 8, 2), (4096, 512, 128, 64, 8)])
def test_the_layer_is_within_the_issues_bounds_of_float32(shape, gemm_kernel):
    """At bench_layer's largest and fine-grained shapes: y within 1e-2 (relative, Frobenius),
    dx and every gradient at cosine >= 0.999 to float32's."""
    T, D, F, E, k = shape
    fp32, bf16 = layer_pair(d_model=D, d_ff=F, num_experts=E, top_k=k)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, D)).astype(np.float32)
    dy = rng.standard_normal((T, D)).astype(np.float32)
    (y32, dx32, g32), (y16, dx16, g16) = step(fp32, x, dy), step(bf16, x, dy)
    assert np.linalg.norm(y16 - y32) <= 1e-2 * np.linalg.norm(y32)
    assert cosine(dx16, dx32) >= 0.999
    for n in g32:
        assert cosine(g16[n], g32[n]) >= 0.999, n
    # float32's own arithmetic does not count as bf16: the two differ
    assert np.linalg.norm(y16 - y32) > 1e-4 * np.linalg.norm(y32)


@pytest.mark.parametrize("kw", [dict(), dict(activation="gelu"), dict(activation="clamped_swiglu", ffn_bias=True),
                                dict(num_shared_experts=1, top_k=3), dict(combine="input", router="sigmoid_topk")])
def test_the_layer_meets_the_documented_bound_against_float64(kw, gemm_kernel):
    # clamped_swiglu at its default limit of 7, which these values reach rarely: a clamp
    # inside the bulk moves the gradient of every value within ~u of it (see BF16_REL_FRO)
    cfg = dict(d_model=48, d_ff=64, num_experts=6, top_k=2)
    layer = MoELayer(MoEConfig(**{**cfg, **kw}, compute_dtype="bfloat16", seed=4))
    for name in ("b1", "b3", "b2"):
        if name in layer.params:
            layer.params[name][...] = np.random.default_rng(5).standard_normal(layer.params[name].shape) * 0.1
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3, 70, 48)).astype(np.float32)
    mask = rng.random((3, 70)) > 0.2
    assert_matches_reference(layer, x, mask)
    with pytest.raises(AssertionError, match="bfloat16 bound"):  # the bound is tight enough to bite
        assert_matches_reference(layer, x, mask, rtol=BF16_REL_FRO / 100)


def test_the_bf16_weights_are_made_once_per_update(gemm_kernel):
    """The packed (on the fallback: rounded) weights are made at the first forward after an
    update, the backward's packs at the first backward; an update seen in one value in place."""
    layer = MoELayer(MoEConfig(d_model=16, d_ff=24, num_experts=4, top_k=2, compute_dtype="bfloat16", seed=2))
    rng = np.random.default_rng(0)
    x, dy = rng.standard_normal((2, 40, 16)).astype(np.float32)
    cache = layer.experts._bf16_weights
    layer(x)
    first = cache._entry
    assert first.kernel == gemm_kernel
    y = layer(x).y
    layer.backward(dy)
    backward_packs = first._backward
    assert (backward_packs is None) == (gemm_kernel == "fallback")
    layer(x)
    layer.backward(dy)
    assert cache._entry is first and first._backward is backward_packs  # unchanged weights: the same
    layer.params["w2"][1, 3, 5] += 0.5  # one value, in place, as an optimiser step writes
    y2 = layer(x).y
    assert cache._entry is not first
    fresh = MoELayer(MoEConfig(d_model=16, d_ff=24, num_experts=4, top_k=2, compute_dtype="bfloat16", seed=2))
    fresh.params["w2"][...] = layer.params["w2"]
    assert np.array_equal(fresh(x).y, y2) and not np.array_equal(y, y2)


def routed_call(cfg):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((30, cfg.d_model)).astype(np.float32)
    idx = np.stack([rng.permutation(cfg.num_experts)[:cfg.top_k] for _ in range(30)])
    w = rng.random((30, cfg.top_k)).astype(np.float32)
    return x, idx, w, rng.standard_normal((30, cfg.d_model)).astype(np.float32)


@pytest.mark.parametrize("name", HARDWARE_KERNELS)
def test_a_backward_after_a_release_raises_instead_of_packing_new_values(name):
    """RoutedExperts.release (its owner will change the weights in place): a pending
    backward whose packs were not made yet raises; one whose packs were made still runs on
    them; later forwards pack the weights anew."""
    cfg = MoEConfig(d_model=16, d_ff=12, num_experts=3, top_k=2, compute_dtype="bfloat16")
    x, idx, w, dy = routed_call(cfg)

    def zeros(r):
        return {k: np.zeros_like(v) for k, v in r.params.items()}
    with bf16.using_kernel(name):
        routed = moe_py.RoutedExperts(cfg, fixed_values=True)
        pending = routed(x, idx, w)
        routed.release()
        routed.params["w2"] *= 2  # what the owner may do once it released
        with pytest.raises(RuntimeError, match="changed in place after this forward"):
            pending.backward(dy)

        routed = moe_py.RoutedExperts(cfg, fixed_values=True)
        want = routed(x, idx, w).backward(dy, grads=zeros(routed))  # the backward's packs made
        pending = routed(x, idx, w)
        routed.release()
        routed.params["w2"] *= 2
        assert all(np.array_equal(a, b) for a, b in zip(pending.backward(dy, grads=zeros(routed)), want))
        fresh = moe_py.RoutedExperts(cfg, params={k: v.copy() for k, v in routed.params.items()})
        assert np.array_equal(routed(x, idx, w).y, fresh(x, idx, w).y)


def test_a_released_routed_experts_is_freed_without_the_garbage_collector():
    """Its latest forward's context refers back to it: release breaks that cycle, so that
    the object (its packs, the forward's activations) goes when the last reference does."""
    cfg = MoEConfig(d_model=16, d_ff=12, num_experts=3, top_k=2, compute_dtype="bfloat16")
    x, idx, w, dy = routed_call(cfg)
    gc.disable()
    try:
        routed = moe_py.RoutedExperts(cfg)
        routed(x, idx, w).backward(dy)
        gone = weakref.ref(routed)
        routed.release()
        del routed
        assert gone() is None
    finally:
        gc.enable()


def test_a_change_of_kernel_remakes_the_bf16_weights():
    layer = MoELayer(MoEConfig(d_model=16, d_ff=24, num_experts=4, top_k=2, compute_dtype="bfloat16", seed=2))
    x = np.random.default_rng(0).standard_normal((40, 16)).astype(np.float32)
    for name in KERNELS:
        with bf16.using_kernel(name):
            layer(x)
            assert layer.experts._bf16_weights._entry.kernel == name


def test_bad_compute_dtypes_are_named():
    with pytest.raises(ValueError, match="compute_dtype"):
        MoEConfig(compute_dtype="float16")
    with pytest.raises(ValueError, match="compute_dtype"):
        MoEConfig(compute_dtype="bfloat16", dtype="float64")
    with pytest.raises(ValueError, match="bf16"):
        kernel("experts_forward", np.float64)(xs=np.zeros((0, 2)), offsets=np.zeros(2, np.int64),
                                              w1=np.zeros((1, 2, 2)), w3=np.zeros((1, 2, 2)), w2=np.zeros((1, 2, 2)),
                                              activation=moe_py._kernels.Activation.swiglu, bf16=True)


def test_the_path_is_named():
    assert bf16_path().startswith(bf16.kernel() + ":")
    with bf16.using_kernel("fallback"):
        assert bf16_path().startswith("fallback:")


# Two kernels compute the same bfloat16 products and differ only in how float32 adds them:
# a GEMM's results differ by about sqrt(K) u32 (rms, relative; test_small_gemm_bf16 bounds them
# elementwise). Where the layer rounds a GEMM's result to bfloat16 for the next GEMM (the
# hidden activation, dh), such a gap flips the rounding of a fraction ~ sqrt(K) u32 / u of the
# values, each by one bfloat16 step (<= 2u relative): a normwise gap of 2u sqrt(sqrt(K) u32 / u)
# per rounding point, two of them in a chain for the gradients, twice that as a margin. The
# gap is largest for the AMX hardware, whose sums are not ordered like the others' (see
# test_small_gemm_bf16).
ORDER_K = 96  # the layer below: d_ff (the largest K before a rounding point)
ORDER_GAP = 2 * np.sqrt(2) * 2 * U * np.sqrt(np.sqrt(ORDER_K) * 2.0 ** -24 / U)


def test_the_kernels_agree_to_float32_summation_order():
    """Every kernel computes the same bfloat16 products; they differ only in the order of
    the float32 sums: forward, dx and every gradient within ORDER_GAP of each other, and the
    emulation of VDPBF16PS bit for bit the instruction's."""
    cfg = MoEConfig(d_model=64, d_ff=ORDER_K, num_experts=4, top_k=2, compute_dtype="bfloat16", seed=1)
    rng = np.random.default_rng(1)
    x, dy = rng.standard_normal((2, 300, 64)).astype(np.float32)
    runs = {}
    for k in KERNELS:
        with bf16.using_kernel(k):
            runs[k] = step(MoELayer(cfg), x, dy)
    base = runs["fallback"]
    for k, (y, dx, g) in runs.items():
        assert np.linalg.norm(y - base[0]) <= ORDER_GAP * np.linalg.norm(base[0]), k
        assert np.linalg.norm(dx - base[1]) <= ORDER_GAP * np.linalg.norm(base[1]), k
        for n in g:
            assert np.linalg.norm(g[n] - base[2][n]) <= ORDER_GAP * np.linalg.norm(base[2][n]), (k, n)
    if "avx512_bf16" in runs and "emulated" in runs:
        hw, em = runs["avx512_bf16"], runs["emulated"]
        assert np.array_equal(hw[0], em[0]) and np.array_equal(hw[1], em[1])
        assert all(np.array_equal(hw[2][n], em[2][n]) for n in hw[2])
