"""Expert FFN kernels (cpp/experts.cpp) against a per-expert NumPy loop, forward and backward."""
import math

import numpy as np
import pytest

import moe_py
from moe_py._kernels import Activation, kernel
from moe_py.testing import gradcheck

_erf = np.vectorize(math.erf, otypes=[float])
ACTIVATIONS = ["swiglu", "gelu", "clamped_swiglu"]
GATED = ("swiglu", "clamped_swiglu")
# clamped_swiglu's alpha and a limit of 1 rather than gpt-oss's 7: with unit-scale inputs a
# good share of the values then lies beyond the clamps, so both sides of them are tested
ALPHA, LIMIT = 1.702, 1.0


def act_kw(activation):
    """The kernels' activation arguments."""
    kw = {"activation": Activation.__members__[activation]}
    if activation == "clamped_swiglu":
        kw.update(swiglu_alpha=ALPHA, swiglu_limit=LIMIT)
    return kw


def act_forward(h1, h3, activation):
    if activation == "swiglu":
        return h1 / (1 + np.exp(-h1)) * h3
    if activation == "clamped_swiglu":
        g, u = np.minimum(h1, LIMIT), np.clip(h3, -LIMIT, LIMIT)
        return (u + 1) * g / (1 + np.exp(-ALPHA * g))
    return 0.5 * h1 * (1 + _erf(h1 / math.sqrt(2)))


def act_backward(h1, h3, da, activation):
    """(dh1, dh3) of act_forward."""
    if activation == "swiglu":
        s = 1 / (1 + np.exp(-h1))
        return da * h3 * (s + h1 * s * (1 - s)), da * h1 * s
    if activation == "clamped_swiglu":  # torch.clamp's rule: the bounds themselves pass
        g, u = np.minimum(h1, LIMIT), np.clip(h3, -LIMIT, LIMIT)
        s = 1 / (1 + np.exp(-ALPHA * g))
        return (da * (u + 1) * (s + ALPHA * g * s * (1 - s)) * (h1 <= LIMIT),
                da * g * s * ((h3 >= -LIMIT) & (h3 <= LIMIT)))
    phi = np.exp(-0.5 * h1 * h1) / math.sqrt(2 * math.pi)
    return da * (0.5 * (1 + _erf(h1 / math.sqrt(2))) + h1 * phi), None


def make(activation, rows=(5, 0, 9, 3), D=6, F=7, seed=0):
    rng = np.random.default_rng(seed)
    E = len(rows)
    offsets = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
    xs = rng.standard_normal((offsets[-1], D))
    w1 = rng.standard_normal((E, D, F)) / math.sqrt(D)
    w3 = rng.standard_normal((E, D, F)) / math.sqrt(D) if activation in GATED else np.zeros((0, 0, 0))
    w2 = rng.standard_normal((E, F, D)) / math.sqrt(F)
    return offsets, xs, w1, w3, w2


def forward(offsets, xs, w1, w3, w2, activation, **biases):
    return kernel("experts_forward", xs.dtype)(xs=xs, offsets=offsets, w1=w1, w3=w3, w2=w2,
                                               **act_kw(activation), **biases)


def backward(offsets, xs, w1, w3, w2, h1, h3, dye, activation, grads, **kw):
    """dxs; adds into grads (dw1, dw3, dw2)."""
    return kernel("experts_backward", xs.dtype)(
        xs=xs, offsets=offsets, w1=w1, w3=w3, w2=w2, h1=h1, h3=h3, dye=dye, **act_kw(activation),
        dw1=grads[0], dw3=grads[1], dw2=grads[2], **kw)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_forward_matches_a_loop_over_experts(activation):
    offsets, xs, w1, w3, w2 = make(activation)
    h1, h3, ye = forward(offsets, xs, w1, w3, w2, activation)
    if activation == "clamped_swiglu":  # both sides of both clamps are exercised
        assert (h1 > LIMIT).any() and (h3 > LIMIT).any() and (h3 < -LIMIT).any()
    for e in range(len(offsets) - 1):
        r = slice(offsets[e], offsets[e + 1])
        g = xs[r] @ w1[e]
        u = xs[r] @ w3[e] if activation in GATED else None
        np.testing.assert_allclose(h1[r], g, rtol=1e-13, atol=1e-13)
        if u is not None:
            np.testing.assert_allclose(h3[r], u, rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(ye[r], act_forward(g, u, activation) @ w2[e], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("path", ["auto", "by_expert", "two_phase"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_backward_matches_a_loop_and_accumulates(activation, path):
    offsets, xs, w1, w3, w2 = make(activation)
    h1, h3, ye = forward(offsets, xs, w1, w3, w2, activation)
    dye = np.random.default_rng(1).standard_normal(ye.shape)
    dw1, dw2 = np.ones_like(w1), np.ones_like(w2)  # backward adds into them
    dw3 = np.ones_like(w3)
    dxs = backward(offsets, xs, w1, w3, w2, h1, h3, dye, activation, (dw1, dw3, dw2), path=path)
    for e in range(len(offsets) - 1):
        r = slice(offsets[e], offsets[e + 1])
        g = xs[r] @ w1[e]
        u = xs[r] @ w3[e] if activation in GATED else None
        a = act_forward(g, u, activation)
        da = dye[r] @ w2[e].T
        dg, du = act_backward(g, u, da, activation)
        want_dx = dg @ w1[e].T + (du @ w3[e].T if du is not None else 0)
        np.testing.assert_allclose(dxs[r], want_dx, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(dw1[e], 1 + xs[r].T @ dg, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(dw2[e], 1 + a.T @ dye[r], rtol=1e-12, atol=1e-12)
        if du is not None:
            np.testing.assert_allclose(dw3[e], 1 + xs[r].T @ du, rtol=1e-12, atol=1e-12)
    assert np.all(dw1[1] == 1) and np.all(dw2[1] == 1)  # the expert with no rows is untouched


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradients_match_finite_differences(activation):
    offsets, xs, w1, w3, w2 = make(activation, rows=(3, 0, 4), D=4, F=5)
    dye = np.random.default_rng(2).standard_normal((xs.shape[0], 4))
    if activation == "clamped_swiglu":  # central differences need every value off the bounds
        h1, h3, _ = forward(offsets, xs, w1, w3, w2, activation)
        assert (h1 > LIMIT).any() and (np.abs(h3) > LIMIT).any()
        assert min(np.abs(h1 - LIMIT).min(), np.abs(np.abs(h3) - LIMIT).min()) > 1e-3

    def f(xs, w1, w3, w2):  # the experts' loss sum(dye * ye) and its gradients
        h1, h3, ye = forward(offsets, xs, w1, w3, w2, activation)
        grads = {"w1": np.zeros_like(w1), "w3": np.zeros_like(w3), "w2": np.zeros_like(w2)}
        dxs = backward(offsets, xs, w1, w3, w2, h1, h3, dye, activation,
                       (grads["w1"], grads["w3"], grads["w2"]))
        return float((dye * ye).sum()), {"xs": dxs, **grads}
    gradcheck(f, {"xs": xs, "w1": w1, "w3": w3, "w2": w2}, tol=1e-7, max_entries=10**6)


def test_clamps_pass_the_gradient_on_their_bounds_as_torch_clamp():
    """h1 and h3 exactly at +-limit (and just inside and beyond): values and gradients as
    torch.clamp's autograd gives them in float64 (the bounds themselves pass the gradient)."""
    torch = pytest.importorskip("torch")
    lim = 7.0
    h1_vals = [lim, -lim, lim + 0.5, lim - 0.5, np.nextafter(lim, 8.0), 0.3]
    h3_vals = [lim, -lim, -lim - 0.5, lim + 0.5, np.nextafter(-lim, -8.0), -0.2]
    F, D = len(h1_vals), 2
    xs = np.array([[1.0, 0.0], [0.0, 1.0]])  # one-hot rows: h = a row of W, exactly
    w1 = np.stack([np.array(h1_vals), -np.array(h1_vals)])[None]  # [1, D, F]
    w3 = np.stack([np.array(h3_vals), np.array(h3_vals[::-1])])[None]
    w2 = np.random.default_rng(0).standard_normal((1, F, D))
    offsets = np.array([0, 2], np.int64)
    kw = dict(activation=Activation.clamped_swiglu, swiglu_alpha=ALPHA, swiglu_limit=lim)
    h1, h3, ye = kernel("experts_forward", np.float64)(xs=xs, offsets=offsets, w1=w1, w3=w3, w2=w2, **kw)
    assert np.array_equal(h1[0], h1_vals) and np.array_equal(h3[0], h3_vals)
    dye = np.random.default_rng(1).standard_normal(ye.shape)
    g = [np.zeros_like(w) for w in (w1, w3, w2)]
    dxs = kernel("experts_backward", np.float64)(xs=xs, offsets=offsets, w1=w1, w3=w3, w2=w2, h1=h1,
                                                 h3=h3, dye=dye, **kw, dw1=g[0], dw3=g[1], dw2=g[2])
    t = {n: torch.tensor(v, requires_grad=True) for n, v in (("xs", xs), ("w1", w1), ("w3", w3), ("w2", w2))}
    gate = torch.clamp(t["xs"] @ t["w1"][0], max=lim)
    up = torch.clamp(t["xs"] @ t["w3"][0], -lim, lim)
    y = ((up + 1) * gate * torch.sigmoid(ALPHA * gate)) @ t["w2"][0]
    (y * torch.tensor(dye)).sum().backward()
    np.testing.assert_allclose(ye, y.detach().numpy(), rtol=1e-14, atol=1e-14)
    for got, name in ((dxs, "xs"), (g[0], "w1"), (g[1], "w3"), (g[2], "w2")):
        np.testing.assert_allclose(got, t[name].grad.numpy(), rtol=1e-13, atol=1e-14, err_msg=name)
    # the bounds pass: the columns at +-limit have a gradient, those beyond have none
    assert np.all(g[0][0, 0, [0, 1, 3, 5]] != 0) and np.all(g[0][0, 0, [2, 4]] == 0)
    assert np.all(g[1][0, 0, [0, 1, 5]] != 0) and np.all(g[1][0, 0, [2, 3, 4]] == 0)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_same_bits_at_1_2_3_threads(activation):
    offsets, xs, w1, w3, w2 = (a.astype(np.float32) if a.dtype == np.float64 else a
                               for a in make(activation, rows=(300, 0, 700, 41), D=32, F=48))
    outs = []
    for n in (1, 2, 3):
        moe_py.set_num_threads(n)
        h1, h3, ye = forward(offsets, xs, w1, w3, w2, activation)
        g = [np.zeros_like(w) for w in (w1, w3, w2)]
        dxs = backward(offsets, xs, w1, w3, w2, h1, h3, ye, activation, g)
        outs.append([h1, h3, ye, dxs, *g])
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert np.array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_backward_by_expert_and_in_two_phases_give_the_same_bits(activation, dtype):
    """The by-expert walk adds each 256-row tile's weight-gradient share in turn; the
    two-phase walk takes one product over all of an expert's rows. The GEMM kernel's k
    blocks of 256 make them the same sums: same bits, at any thread count (experts of
    several tiles, a partial last tile, an empty expert)."""
    offsets, *arrays = make(activation, rows=(600, 0, 257, 90, 512), D=40, F=56, seed=4)
    xs, w1, w3, w2 = (a.astype(dtype) for a in arrays)
    h1, h3, ye = forward(offsets, xs, w1, w3, w2, activation)
    dye = np.random.default_rng(5).standard_normal(ye.shape).astype(dtype)
    outs = {}
    for path in ("by_expert", "two_phase"):
        for n in (1, 2, 3):
            moe_py.set_num_threads(n)
            g = [np.full_like(w, 0.5) for w in (w1, w3, w2)]
            dxs = backward(offsets, xs, w1, w3, w2, h1, h3, dye, activation, g, path=path)
            outs[path, n] = [dxs, *g]
    first = outs["by_expert", 1]
    np.testing.assert_allclose(first[1][0], 0.5 + xs[:600].astype(np.float64).T
                               @ act_backward(h1[:600], h3[:600] if activation in GATED else None,
                                              dye[:600] @ w2[0].T, activation)[0],
                               rtol=1e-4 if dtype == np.float32 else 1e-10, atol=1e-3)
    for key, other in outs.items():
        for a, b in zip(first, other):
            assert np.array_equal(a, b), key


def test_backward_path_must_be_known():
    offsets, xs, w1, w3, w2 = make("swiglu")
    h1, h3, ye = forward(offsets, xs, w1, w3, w2, "swiglu")
    with pytest.raises(ValueError, match="path"):
        kernel("experts_backward", np.float64)(
            xs=xs, offsets=offsets, w1=w1, w3=w3, w2=w2, h1=h1, h3=h3, dye=ye,
            activation=Activation.swiglu, dw1=np.zeros_like(w1), dw3=np.zeros_like(w3),
            dw2=np.zeros_like(w2), path="fused")


def test_offsets_must_cover_the_rows():
    offsets, xs, w1, w3, w2 = make("swiglu")
    with pytest.raises(ValueError, match="offsets"):
        forward(offsets[:-1], xs, w1, w3, w2, "swiglu")


@pytest.mark.parametrize("activation, kw", [
    ("clamped_swiglu", {}), ("clamped_swiglu", {"swiglu_alpha": 1.0}),
    ("swiglu", {"swiglu_alpha": 1.0, "swiglu_limit": 7.0}), ("gelu", {"swiglu_limit": 7.0})])
def test_alpha_and_limit_go_with_clamped_swiglu_only(activation, kw):
    offsets, xs, w1, w3, w2 = make(activation)
    with pytest.raises(ValueError, match="swiglu_alpha, swiglu_limit"):
        kernel("experts_forward", np.float64)(xs=xs, offsets=offsets, w1=w1, w3=w3, w2=w2,
                                              activation=Activation.__members__[activation], **kw)


# ---- biases (MoEConfig.ffn_bias): b1, b3 [E, d_ff] and b2 [E, d_model], added after each GEMM


def make_biases(activation, E, D, F, seed=7, dtype=np.float64):
    rng = np.random.default_rng(seed)
    b = {"b1": rng.standard_normal((E, F)), "b2": rng.standard_normal((E, D))}
    if activation in GATED:
        b["b3"] = rng.standard_normal((E, F))
    return {k: v.astype(dtype) for k, v in b.items()}


def bias_grads(b, fill=0.0):
    return {"d" + k: np.full_like(v, fill) for k, v in b.items()}


@pytest.mark.parametrize("path", ["by_expert", "two_phase"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_biases_match_a_loop_over_experts(activation, path):
    offsets, xs, w1, w3, w2 = make(activation)
    E, D, F = w1.shape
    b = make_biases(activation, E, D, F)
    h1, h3, ye = forward(offsets, xs, w1, w3, w2, activation, **b)
    dye = np.random.default_rng(1).standard_normal(ye.shape)
    g = [np.zeros_like(w) for w in (w1, w3, w2)]
    db = bias_grads(b, fill=1.0)  # backward adds into them
    dxs = backward(offsets, xs, w1, w3, w2, h1, h3, dye, activation, g, path=path, **db)
    for e in range(E):
        r = slice(offsets[e], offsets[e + 1])
        gate = xs[r] @ w1[e] + b["b1"][e]
        up = xs[r] @ w3[e] + b["b3"][e] if activation in GATED else None
        np.testing.assert_allclose(h1[r], gate, rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(ye[r], act_forward(gate, up, activation) @ w2[e] + b["b2"][e],
                                   rtol=1e-12, atol=1e-12)
        dg, du = act_backward(gate, up, dye[r] @ w2[e].T, activation)
        np.testing.assert_allclose(dxs[r], dg @ w1[e].T + (du @ w3[e].T if du is not None else 0),
                                   rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(db["db1"][e], 1 + dg.sum(axis=0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(db["db2"][e], 1 + dye[r].sum(axis=0), rtol=1e-12, atol=1e-12)
        if du is not None:
            np.testing.assert_allclose(db["db3"][e], 1 + du.sum(axis=0), rtol=1e-12, atol=1e-12)
    assert all(np.all(v[1] == 1) for v in db.values())  # the expert with no rows is untouched


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_bias_gradients_match_finite_differences(activation):
    offsets, xs, w1, w3, w2 = make(activation, rows=(3, 0, 4), D=4, F=5)
    b = make_biases(activation, 3, 4, 5)
    dye = np.random.default_rng(2).standard_normal((xs.shape[0], 4))

    def f(xs, w1, w3, w2, **b):
        h1, h3, ye = forward(offsets, xs, w1, w3, w2, activation, **b)
        if activation == "clamped_swiglu":  # central differences need every value off the bounds
            assert min(np.abs(h1 - LIMIT).min(), np.abs(np.abs(h3) - LIMIT).min()) > 1e-3
        g = {"w1": np.zeros_like(w1), "w3": np.zeros_like(w3), "w2": np.zeros_like(w2)}
        db = bias_grads(b)
        dxs = backward(offsets, xs, w1, w3, w2, h1, h3, dye, activation, (g["w1"], g["w3"], g["w2"]), **db)
        return float((dye * ye).sum()), {"xs": dxs, **g, **{k[1:]: v for k, v in db.items()}}
    gradcheck(f, {"xs": xs, "w1": w1, "w3": w3, "w2": w2, **b}, tol=1e-7, max_entries=10**6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_bias_gradients_have_the_same_bits_on_both_paths_at_1_2_3_threads(activation, dtype):
    """A bias gradient adds an expert's rows one by one in row order on one thread, on the
    by-expert walk (tile after tile) and on the two-phase one (one item per expert)."""
    offsets, *arrays = make(activation, rows=(600, 0, 257, 90, 512), D=24, F=40, seed=4)
    xs, w1, w3, w2 = (a.astype(dtype) for a in arrays)
    b = make_biases(activation, 5, 24, 40, dtype=dtype)
    outs = {}
    for path in ("by_expert", "two_phase"):
        for n in (1, 2, 3):
            moe_py.set_num_threads(n)
            h1, h3, ye = forward(offsets, xs, w1, w3, w2, activation, **b)
            g = [np.full_like(w, 0.5) for w in (w1, w3, w2)]
            db = bias_grads(b, fill=0.5)
            dxs = backward(offsets, xs, w1, w3, w2, h1, h3, ye, activation, g, path=path, **db)
            outs[path, n] = [h1, h3, ye, dxs, *g, *db.values()]
    first = outs["by_expert", 1]
    for key, other in outs.items():
        for a, b_ in zip(first, other):
            assert np.array_equal(a, b_), key


@pytest.mark.parametrize("drop", ["b1", "b2", "b3"])
def test_biases_come_all_or_none(drop):
    offsets, xs, w1, w3, w2 = make("swiglu")
    b = make_biases("swiglu", *w1.shape)
    del b[drop]
    with pytest.raises(ValueError, match="b1, b3, b2: expected all"):
        forward(offsets, xs, w1, w3, w2, "swiglu", **b)
    gelu_b = make_biases("gelu", *w1.shape)
    with pytest.raises(ValueError, match="b1, b3, b2: expected all"):  # gelu has no b3
        forward(offsets, xs, w1, np.zeros((0, 0, 0)), w2, "gelu", **gelu_b, b3=gelu_b["b1"])


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("path", ["by_expert", "two_phase"])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_written_gradients_are_the_bits_of_gradients_added_into_zeros(activation, path, bf16):
    """accumulate=False writes every gradient (an expert without rows: zeros) whatever the
    buffers held, NaN included: the bits of adding into zeros. Several row tiles per expert,
    so the by-expert walk writes with its first tile and adds the next."""
    offsets, *arrays = make(activation, rows=(600, 0, 257, 90), D=24, F=40, seed=5)
    xs, w1, w3, w2 = (a.astype(np.float32) for a in arrays)
    b = make_biases(activation, 4, 24, 40, dtype=np.float32)
    h1, h3, ye = forward(offsets, xs, w1, w3, w2, activation, bf16=bf16, **b)
    dye = np.random.default_rng(6).standard_normal(ye.shape).astype(np.float32)
    runs = []
    for accumulate, fill in ((True, 0.0), (False, np.nan)):
        g = [np.full_like(w, fill) for w in (w1, w3, w2)]
        db = bias_grads(b, fill=fill)
        dxs = backward(offsets, xs, w1, w3, w2, h1, h3, dye, activation, g, path=path, bf16=bf16,
                       accumulate=accumulate, **db)
        runs.append([dxs, *g, *db.values()])
    for added, written in zip(*runs):
        assert np.array_equal(added, written)
    assert np.all(runs[1][3][1] == 0)  # dw2 of the expert without rows
