"""AdamW and the gradient norm (cpp/optim.cpp) against float64 formulas written here."""
import math

import numpy as np
import pytest

from moe_py.optim import AdamW, global_grad_norm, lr_at


def adamw_reference(p, g, m, v, t, lr, b1, b2, eps, wd, scale, decay_this):
    """Loshchilov & Hutter's AdamW with bias correction, in float64."""
    p, g, m, v = (a.astype(np.float64) for a in (p, g, m, v))
    g = g * scale
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
    if decay_this:
        p = p * (1 - lr * wd)
    return p - lr * m_hat / (np.sqrt(v_hat) + eps), m, v


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-13), (np.float32, 2e-6)])
@pytest.mark.parametrize("n", [7, 70_001])  # serial and parallel paths
def test_adamw_matches_the_formula_over_steps(dtype, tol, n):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((n, 1)).astype(dtype)  # a matrix: decayed
    gain = rng.standard_normal(5).astype(dtype)  # a vector: not decayed
    gw, gg = np.zeros_like(w), np.zeros_like(gain)
    opt = AdamW([("w", w, gw), ("gain", gain, gg)], betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ref = {"w": (w.copy(), np.zeros_like(w), np.zeros_like(w)),
           "gain": (gain.copy(), np.zeros_like(gain), np.zeros_like(gain))}
    for t in range(1, 4):
        gw[...] = rng.standard_normal(gw.shape)
        gg[...] = rng.standard_normal(gg.shape)
        lr, scale = 0.01 * t, 0.5
        opt.step(lr, grad_scale=scale)
        for name, g, decayed in (("w", gw, True), ("gain", gg, False)):
            p0, m0, v0 = ref[name]
            ref[name] = adamw_reference(p0, g, m0, v0, t, lr, 0.9, 0.95, 1e-8, 0.1, scale, decayed)
    for name, p in (("w", w), ("gain", gain)):
        assert p.dtype == dtype
        np.testing.assert_allclose(p, ref[name][0], rtol=tol, atol=tol)
        np.testing.assert_allclose(opt.m[name], ref[name][1], rtol=tol, atol=tol)
        np.testing.assert_allclose(opt.v[name], ref[name][2], rtol=tol, atol=tol)


def test_experts_biases_are_not_decayed_their_weights_are():
    """An expert bias [E, width] is E vectors: no weight decay, as for the norm gains."""
    from moe_py.optim import decays
    b = np.ones((4, 6))
    assert not decays("blocks.0.ffn.b1", b) and not decays("b2", b) and not decays("blocks.1.norm2.g", b[0])
    assert decays("blocks.0.ffn.w1", np.ones((4, 6, 6))) and decays("heads.0.w", b)
    w, g = np.ones((4, 6)), np.zeros((4, 6))
    bias, gb = np.ones((4, 6)), np.zeros((4, 6))
    AdamW([("ffn.w2", w, g), ("ffn.b2", bias, gb)], weight_decay=0.5).step(0.1)
    assert np.all(w == 1 - 0.1 * 0.5) and np.all(bias == 1)  # zero gradient: decay alone moves w


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_grad_norm_is_the_float64_norm(dtype):
    rng = np.random.default_rng(1)
    grads = [rng.standard_normal(s).astype(dtype) for s in [(3,), (200, 300), (100_001,)]]
    want = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads))
    assert global_grad_norm(grads) == pytest.approx(want, rel=1e-13)
    assert global_grad_norm([]) == 0.0


def test_adamw_rejects_mismatched_state():
    p = np.zeros(4, np.float32)
    opt = AdamW([("p", p, np.zeros(4, np.float32))])
    opt.m["p"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="m, v"):
        opt.step(0.1)


def test_lr_schedule_known_values():
    assert lr_at(0, 1.0, 10, 100) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 10, 100) == pytest.approx(1.0)
    assert lr_at(10, 1.0, 10, 100) == pytest.approx(1.0)
    assert lr_at(55, 1.0, 10, 100) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(100, 1.0, 10, 100) == pytest.approx(0.1)
