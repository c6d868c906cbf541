"""RoutedExperts: the experts for a caller's routing, against an independent float64
PyTorch reference, against MoELayer on the layer's own routing, and the contract's padding
and capacity rules against a plain loop."""
import math

import numpy as np
import pytest

import moe_py
from moe_py import MoEConfig, MoELayer, RoutedExperts

torch = pytest.importorskip("torch")


def torch_ffn(x, t, e, cfg):
    """One expert's FFN in torch (biases when t has them), written from the formulas."""
    def lin(v, w, b):
        return v @ t[w][e] + (t[b][e] if b in t else 0)
    h = lin(x, "w1", "b1")
    if cfg.activation == "swiglu":
        h = torch.nn.functional.silu(h) * lin(x, "w3", "b3")
    elif cfg.activation == "clamped_swiglu":
        g = torch.clamp(h, max=cfg.swiglu_limit)
        u = torch.clamp(lin(x, "w3", "b3"), -cfg.swiglu_limit, cfg.swiglu_limit)
        h = (u + 1) * g * torch.sigmoid(cfg.swiglu_alpha * g)
    else:
        h = torch.nn.functional.gelu(h)
    return lin(h, "w2", "b2")


def _torch_reference(x, idx, w, mask, params, cfg, dy):
    """y and the gradients of sum(dy * y), by autograd in float64, slot by slot."""
    t = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in params.items()}
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    wt = torch.tensor(w, dtype=torch.float64, requires_grad=True)
    rows = []
    for i in range(x.shape[0]):
        acc = torch.zeros(x.shape[1], dtype=torch.float64)
        for j in range(idx.shape[1]):
            e = int(idx[i, j])
            if not mask[i] or e < 0:
                continue
            if cfg.combine == "input":  # the weight scales the input
                acc = acc + torch_ffn(wt[i, j] * xt[i], t, e, cfg)
            else:
                acc = acc + wt[i, j] * torch_ffn(xt[i], t, e, cfg)
        rows.append(acc)
    y = torch.stack(rows)
    (y * torch.tensor(dy)).sum().backward()
    grads = {k: v.grad.numpy() for k, v in t.items()}
    return y.detach().numpy(), xt.grad.numpy(), wt.grad.numpy(), grads


@pytest.mark.parametrize("kw", [dict(activation="swiglu"), dict(activation="gelu"),
                                dict(activation="clamped_swiglu", swiglu_limit=0.8, swiglu_alpha=1.3),
                                dict(ffn_bias=True), dict(activation="gelu", ffn_bias=True),
                                dict(activation="clamped_swiglu", swiglu_limit=0.8, ffn_bias=True),
                                dict(combine="input"), dict(combine="input", activation="gelu"),
                                dict(combine="input", ffn_bias=True, activation="clamped_swiglu",
                                     swiglu_limit=0.8)])
def test_forward_and_backward_match_float64_torch(kw):
    cfg = MoEConfig(d_model=6, d_ff=10, num_experts=5, top_k=2, dtype="float64", **kw)
    rng = np.random.default_rng(1)
    T, k = 9, 3  # k of the caller's own, not cfg.top_k
    x = rng.standard_normal((T, 6))
    idx = rng.integers(-1, 5, (T, k))
    w = rng.standard_normal((T, k))
    mask = rng.random(T) > 0.3
    dy = rng.standard_normal((T, 6))
    experts = RoutedExperts(cfg)
    for name, v in experts.params.items():  # biases (when there are) away from their init of 0
        if name.startswith("b"):
            v[...] = rng.standard_normal(v.shape)
    out = experts(x, idx, w, padding_mask=mask)
    dx, dw = out.backward(dy)
    y_ref, dx_ref, dw_ref, g_ref = _torch_reference(x, idx, w, mask, experts.params, cfg, dy)
    np.testing.assert_allclose(out.y, y_ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(dx, dx_ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(dw, dw_ref, rtol=0, atol=1e-12)
    assert set(g_ref) == set(experts.grads)
    for name, g in g_ref.items():
        np.testing.assert_allclose(experts.grads[name], g, rtol=0, atol=1e-12, err_msg=name)
    # padded tokens: nothing out, nothing back, whatever their indices said
    assert not out.y[~mask].any() and not dx[~mask].any() and not dw[~mask].any()
    assert not out.dropped.any()


def test_equals_moelayer_on_its_own_routing():
    """The layer's experts are this entry's: same y and the same expert gradients, bitwise
    (capacity by position included, so the drops must agree too)."""
    cfg = MoEConfig(d_model=8, d_ff=12, num_experts=4, top_k=2, capacity_factor=0.75, seed=3)
    layer = MoELayer(cfg)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 7, 8)).astype(np.float32)
    mask = np.ones((2, 7), bool)
    mask[1, 5:] = False
    out = layer(x, padding_mask=mask)
    r = out.router
    experts = layer.routed_experts()
    mine = experts(x, r.topk_indices.reshape(2, 7, -1), r.topk_weights.reshape(2, 7, -1), padding_mask=mask)
    assert np.array_equal(mine.y, out.y)
    assert np.array_equal(mine.dropped.reshape(-1, 2), r.dropped)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    layer.zero_grad()
    mine.backward(dy)
    kept = {k: layer.grads[k].copy() for k in ("w1", "w3", "w2")}
    layer.zero_grad()
    layer.backward(dy)
    for k in kept:
        assert np.array_equal(kept[k], layer.grads[k]), k


def _loop_drops(idx, w, mask, E, c, policy):
    """The contract's capacity rule, one assignment at a time."""
    T, k = idx.shape
    R = int(mask.sum())
    C = min(R * k, math.ceil(c * R * k / E))
    slots = [(t, j) for t in range(T) for j in range(k) if mask[t] and idx[t, j] >= 0]
    if policy == "position":
        order = sorted(slots, key=lambda s: (s[1], s[0]))
    else:
        order = sorted(slots, key=lambda s: (-w[s], s[0], s[1]))
    taken = np.zeros(E, int)
    dropped = np.zeros((T, k), bool)
    for t, j in order:
        e = idx[t, j]
        dropped[t, j] = taken[e] >= C
        taken[e] += 1
    return dropped


@pytest.mark.parametrize("policy", ["position", "probs"])
@pytest.mark.parametrize("c", [0.5, 1.0, 1.5])
def test_capacity_drops_follow_the_contract(policy, c):
    E, k, T = 4, 2, 30
    cfg = MoEConfig(d_model=4, d_ff=6, num_experts=E, top_k=k, capacity_factor=c, drop_policy=policy,
                    dtype="float64")
    rng = np.random.default_rng(5)
    idx = np.stack([rng.choice(E, k, replace=False) for _ in range(T)])
    idx[3, 1] = -1  # an empty slot takes no capacity
    w = np.round(rng.random((T, k)), 1)  # ties, broken by token then slot
    mask = rng.random(T) > 0.2
    x = rng.standard_normal((T, 4))
    experts = RoutedExperts(cfg)
    out = experts(x, idx, w, padding_mask=mask)
    expected = _loop_drops(idx, w, mask, E, c, policy)
    assert np.array_equal(out.dropped, expected)
    # a dropped slot adds nothing: the same as weight 0 without capacity
    free = RoutedExperts(MoEConfig(d_model=4, d_ff=6, num_experts=E, top_k=k, dtype="float64"),
                         experts.params, {kk: np.zeros_like(v) for kk, v in experts.params.items()})
    np.testing.assert_array_equal(out.y, free(x, idx, np.where(expected, 0.0, w), padding_mask=mask).y)
    _, dw = out.backward(np.ones_like(x))
    assert not dw[expected].any()


@pytest.mark.parametrize("kw", [dict(), dict(activation="clamped_swiglu", swiglu_limit=1.0, ffn_bias=True),
                                dict(combine="input", ffn_bias=True)])
def test_bitwise_at_1_2_3_threads(kw):
    cfg = MoEConfig(d_model=16, d_ff=24, num_experts=6, top_k=2, **kw)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((64, 16)).astype(np.float32)
    idx = rng.integers(0, 6, (64, 2))
    w = rng.random((64, 2)).astype(np.float32)
    dy = rng.standard_normal((64, 16)).astype(np.float32)
    before = moe_py.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            moe_py.set_num_threads(n)
            experts = RoutedExperts(cfg)
            out = experts(x, idx, w)
            dx, dw = out.backward(dy)
            results.append((out.y, dx, dw, *experts.grads.values()))
    finally:
        moe_py.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert np.array_equal(a, b)


@pytest.mark.parametrize("field, value, error, message", [
    ("idx", np.full((5, 2), 4), ValueError, "topk_indices: expected experts in \\[0, 4\\)"),
    ("idx", np.full((5, 2), -2), ValueError, "topk_indices"),
    ("idx", np.zeros((5, 2)), TypeError, "topk_indices: expected integers"),
    ("idx", np.zeros((4, 2), int), ValueError, "topk_indices: expected shape"),
    ("w", np.full((5, 2), np.nan, np.float32), ValueError, "topk_weights"),
    ("w", np.ones((5, 3), np.float32), ValueError, "topk_weights"),
    ("w", np.ones((5, 2)), TypeError, "topk_weights"),
])
def test_bad_routing_is_named(field, value, error, message):
    cfg = MoEConfig(d_model=4, d_ff=6, num_experts=4, top_k=2)
    args = {"idx": np.zeros((5, 2), int), "w": np.ones((5, 2), np.float32)}
    args[field] = value
    with pytest.raises(error, match=message):
        RoutedExperts(cfg)(np.ones((5, 4), np.float32), args["idx"], args["w"])
