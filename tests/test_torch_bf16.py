"""bfloat16 through the torch module: autocast, bfloat16 tensors, the per-call compute_dtype
(skipped when torch is not installed)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import moe_py  # noqa: E402
from moe_py import MoEConfig, MoELayer  # noqa: E402
from moe_py.testing import BF16_REL_FRO  # noqa: E402
from moe_py.torch import MoE  # noqa: E402

SHAPE = dict(d_model=32, d_ff=48, num_experts=4, top_k=2, num_shared_experts=1, load_balance_coef=0.1, seed=3)


def run(m, x, dy, **kw):
    """y, aux, dx and every parameter gradient of one forward/backward of module m."""
    m.zero_grad()
    x = x.detach().clone().requires_grad_()
    y, aux, _ = m(x, **kw)
    (torch.sum(y.float() * dy) + aux).backward()
    return y, aux, x.grad, {n: p.grad.clone() for n, p in m.named_parameters()}


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 24, 32, generator=g), torch.randn(2, 24, 32, generator=g)


def rel(a, b):
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def test_autocast_runs_the_experts_as_compute_dtype_bfloat16_does():
    """Under autocast the module computes what a layer configured with compute_dtype="bfloat16"
    computes, bit for bit (forward, dx and every gradient), and outside it float32 again."""
    x, dy = data()
    m = MoE(MoEConfig(**SHAPE))
    ref = MoE(MoEConfig(**SHAPE, compute_dtype="bfloat16"))
    fp32 = run(m, x, dy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = run(m, x, dy)
    want = run(ref, x, dy)
    assert auto[0].dtype == torch.float32 and auto[1].dtype == torch.float32  # x's dtype, as torch's MoE blocks
    for a, b in zip(auto[:3], want[:3]):
        assert torch.equal(a, b)
    assert all(torch.equal(auto[3][n], want[3][n]) for n in want[3])
    assert torch.equal(run(m, x, dy)[0], fp32[0])  # nothing of the autocast call stays behind
    assert 0 < rel(auto[0], fp32[0]) < BF16_REL_FRO


def test_a_bfloat16_tensor_gets_bfloat16_out_and_float32_master_gradients():
    x, dy = data(1)
    m = MoE(MoEConfig(**SHAPE))
    ref = MoE(MoEConfig(**SHAPE, compute_dtype="bfloat16"))
    xb = x.bfloat16()
    y, aux, dx, grads = run(m, xb, dy)
    assert y.dtype == dx.dtype == torch.bfloat16 and aux.dtype == torch.float32
    assert all(g.dtype == torch.float32 for g in grads.values())
    # y's gradient reaches the module as bfloat16, y's dtype: the reference gets it rounded too
    y_ref, aux_ref, dx_ref, grads_ref = run(ref, xb.float(), dy.bfloat16().float())
    assert torch.equal(y, y_ref.bfloat16()) and torch.equal(dx, dx_ref.bfloat16()) and torch.equal(aux, aux_ref)
    assert all(torch.equal(grads[n], grads_ref[n]) for n in grads)


def test_precisions_moe_py_has_no_kernels_for_are_refused_or_left_alone():
    x, dy = data(2)
    with pytest.raises(NotImplementedError, match="float16"):
        with torch.autocast("cpu", dtype=torch.float16):
            MoE(MoEConfig(**SHAPE))(x)
    m64 = MoE(MoEConfig(**SHAPE, dtype="float64"))
    with pytest.raises(TypeError, match="x: a bfloat16 tensor needs a float32 layer"):
        m64(x.bfloat16())
    with pytest.raises(TypeError, match="x: expected dtype float32"):
        MoE(MoEConfig(**SHAPE))(x.half())
    plain = run(m64, x.double(), dy.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # torch's autocast leaves float64 alone too
        auto = run(m64, x.double(), dy.double())
    assert torch.equal(plain[0], auto[0]) and torch.equal(plain[2], auto[2])


def test_one_call_in_bfloat16_leaves_the_next_in_float32():
    """MoELayer(..., compute_dtype=) is per call: its backward uses its forward's mode even
    when a float32 call came in between."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((40, 32)).astype(np.float32)
    dy = rng.standard_normal((40, 32)).astype(np.float32)
    layer, bf16 = MoELayer(MoEConfig(**SHAPE)), MoELayer(MoEConfig(**SHAPE, compute_dtype="bfloat16"))
    want = bf16(x)
    want_dx = bf16.backward(dy)
    plain = layer(x).y.copy()
    out = layer(x, compute_dtype="bfloat16")
    again = layer(x)
    assert np.array_equal(out.y, want.y) and np.array_equal(again.y, plain)
    assert np.array_equal(out.backward(dy), want_dx)
    with pytest.raises(ValueError, match="compute_dtype"):
        layer(x, compute_dtype="float16")
    with pytest.raises(ValueError, match="compute_dtype"):
        MoELayer(MoEConfig(**dict(SHAPE, dtype="float64")))(x.astype(np.float64), compute_dtype="bfloat16")


def test_routed_experts_take_the_per_call_compute_dtype():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((10, 32)).astype(np.float32)
    idx = rng.integers(0, 4, (10, 2))
    idx[:, 1] = (idx[:, 0] + 1) % 4
    w = rng.random((10, 2)).astype(np.float32)
    kw = {k: v for k, v in SHAPE.items() if k != "num_shared_experts"}
    plain = moe_py.RoutedExperts(MoEConfig(**kw))
    ref = moe_py.RoutedExperts(MoEConfig(**kw, compute_dtype="bfloat16"))
    assert np.array_equal(plain(x, idx, w, compute_dtype="bfloat16").y, ref(x, idx, w).y)
    assert not np.array_equal(plain(x, idx, w).y, ref(x, idx, w).y)
