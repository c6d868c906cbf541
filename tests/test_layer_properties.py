"""Property-based tests (hypothesis): random valid layers and batches keep every invariant
of docs/design.md; random invalid inputs always get a ValueError or TypeError that names the
argument. Bounded so the suite stays fast."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moe_py
from moe_py.config import ACTIVATIONS, ROUTERS

SETTINGS = dict(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def cases(draw):
    E = draw(st.integers(1, 6))
    router = draw(st.sampled_from(ROUTERS))
    T = draw(st.integers(0, 40))
    lead = draw(st.sampled_from([(T,), (1, T)]))
    scopes = ["batch", "global"] + (["sequence"] if len(lead) == 2 and T > 0 else [])
    cfg = moe_py.MoEConfig(
        d_model=draw(st.integers(1, 12)), d_ff=draw(st.integers(1, 12)), num_experts=E,
        top_k=draw(st.integers(1, E)), router=router,
        capacity_factor=draw(st.one_of(st.none(), st.floats(0.05, 4.0))),
        activation=draw(st.sampled_from(ACTIVATIONS)),
        dtype=draw(st.sampled_from(["float32", "float64"])),
        straight_through=draw(st.booleans()) and router not in ("expert_choice", "hash"),
        entropy_coef=draw(st.sampled_from([0.0, 0.01])),
        num_shared_experts=draw(st.integers(0, 2)),
        load_balance_scope=draw(st.sampled_from(scopes)),
        seed=draw(st.integers(0, 2**31)))
    mask_kind = draw(st.sampled_from(["none", "random", "all_padding"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    x = (rng.standard_normal(lead + (cfg.d_model,)) * draw(st.sampled_from([0.1, 1.0, 10.0])))
    x = x.astype(cfg.np_dtype)
    mask = None if mask_kind == "none" else (
        np.zeros(lead, bool) if mask_kind == "all_padding" else rng.random(lead) > 0.3)
    ids = rng.integers(0, 256, lead) if router == "hash" else None
    return cfg, x, mask, draw(st.booleans()), ids


@settings(**SETTINGS)
@given(cases())
def test_valid_layers_keep_every_invariant(case):
    cfg, x, mask, training, ids = case
    layer = moe_py.MoELayer(cfg)
    out = layer(x, padding_mask=mask, training=training, token_ids=ids)
    real = np.ones(x.shape[:-1], bool) if mask is None else mask
    flat_real = real.reshape(-1)
    r = out.router
    slots = r.topk_indices.shape[1]
    ec = cfg.router == "expert_choice"
    assert out.y.shape == x.shape and np.isfinite(out.y).all()
    assert np.all(out.y[~real] == 0)
    assert np.array_equal(r.topk_indices[~flat_real], np.full((int((~flat_real).sum()), slots), -1))
    assert slots == cfg.top_k or ec
    if ec:  # each expert takes exactly C = min(R, ceil(c R k / E)) tokens, each at most once
        R = int(flat_real.sum())
        C = min(R, int(np.ceil(cfg.capacity * R * cfg.top_k / cfg.num_experts)))
        assert np.array_equal(r.tokens_per_expert, np.full(cfg.num_experts, C))
        for row in r.topk_indices[flat_real]:
            chosen = row[row >= 0]
            assert len(set(chosen.tolist())) == len(chosen)
    else:
        assert np.all(r.topk_indices[flat_real] >= 0)
        assert int(r.tokens_per_expert.sum()) == int(flat_real.sum()) * cfg.top_k
    assert np.isfinite(out.aux_loss) and all(np.isfinite(v) for v in out.losses.values())
    dy = np.ones_like(x)
    dx = layer.backward(dy)
    assert dx.shape == x.shape and np.isfinite(dx).all() and np.all(dx[~real] == 0)
    for g in layer.grads.values():
        assert np.isfinite(g).all()
    # the same call twice (eval: no noise state moves) gives the same bits
    a = layer(x, padding_mask=mask, training=False, token_ids=ids).y
    b = layer(x, padding_mask=mask, training=False, token_ids=ids).y
    assert np.array_equal(a, b)


@settings(max_examples=15, deadline=None)
@given(cases())
def test_small_float64_gradients_match_finite_differences(case):
    cfg, x, mask, _, ids = case
    if cfg.dtype != "float64" or x.size == 0 or x.size > 120:
        return
    layer = moe_py.MoELayer(cfg)
    rng = np.random.default_rng(0)
    dy = rng.standard_normal(x.shape)
    o = layer(x, padding_mask=mask, training=False, token_ids=ids)
    layer.zero_grad()
    dx = layer.backward(dy)
    eps = 1e-6
    for _ in range(4):
        i = tuple(int(rng.integers(s)) for s in x.shape)
        xp, xm = x.copy(), x.copy()
        xp[i] += eps
        xm[i] -= eps
        op = layer(xp, padding_mask=mask, training=False, token_ids=ids)
        om = layer(xm, padding_mask=mask, training=False, token_ids=ids)
        same = (np.array_equal(op.router.topk_indices, o.router.topk_indices)
                and np.array_equal(om.router.topk_indices, o.router.topk_indices)
                and np.array_equal(op.router.dropped, o.router.dropped)
                and np.array_equal(om.router.dropped, o.router.dropped))
        if not same:  # the perturbation flips a discrete routing choice: no derivative there
            continue
        num = ((op.y * dy).sum() + op.aux_loss - (om.y * dy).sum() - om.aux_loss) / (2 * eps)
        assert abs(num - dx[i]) <= 1e-5 * max(1.0, abs(num)), (i, num, dx[i])


ARG_MESSAGE = r"^(x|padding_mask|dy|top_k|num_experts|d_model|d_ff|capacity_factor|activation|router|dtype|seed|load_balance_coef|z_loss_coef|entropy_coef|straight_through|normalize_topk)\b"


@settings(**SETTINGS)
@given(st.data())
def test_invalid_inputs_raise_errors_naming_the_argument(data):
    cfg = moe_py.MoEConfig(d_model=4, d_ff=4, num_experts=3, top_k=2)
    layer = moe_py.MoELayer(cfg)
    ok = np.ones((5, 4), np.float32)
    kind = data.draw(st.sampled_from([
        "x_dtype", "x_width", "x_nan", "x_string", "mask_shape", "mask_values", "mask_dtype",
        "dy_shape", "dy_nan", "config"]))
    with pytest.raises((ValueError, TypeError), match=ARG_MESSAGE):
        if kind == "x_dtype":
            layer(ok.astype(data.draw(st.sampled_from([np.float64, np.int32, np.float16]))))
        elif kind == "x_width":
            layer(np.ones((5, data.draw(st.sampled_from([0, 3, 5, 8]))), np.float32))
        elif kind == "x_nan":
            bad = ok.copy()
            bad[data.draw(st.integers(0, 4)), data.draw(st.integers(0, 3))] = \
                data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
            layer(bad)
        elif kind == "x_string":
            layer("not an array")
        elif kind == "mask_shape":
            layer(ok, padding_mask=np.ones(data.draw(st.sampled_from([4, 6, 0])), bool))
        elif kind == "mask_values":
            layer(ok, padding_mask=np.array([0, 1, 2, 1, 0]))
        elif kind == "mask_dtype":
            layer(ok, padding_mask=np.ones(5, np.float32))
        elif kind == "dy_shape":
            layer(ok)
            layer.backward(np.ones((5, data.draw(st.sampled_from([3, 5]))), np.float32))
        elif kind == "dy_nan":
            layer(ok)
            bad = np.ones_like(ok)
            bad[0, 0] = np.nan
            layer.backward(bad)
        else:
            field, value = data.draw(st.sampled_from([
                ("d_model", 0), ("d_model", -3), ("d_ff", 1.5), ("num_experts", 0),
                ("top_k", 4), ("top_k", 0), ("capacity_factor", -1.0),
                ("capacity_factor", float("nan")), ("activation", "relu"), ("router", "nope"),
                ("dtype", "float16"), ("seed", -1), ("seed", 2**70), ("load_balance_coef", float("inf")),
                ("z_loss_coef", -1.0), ("straight_through", "yes"), ("normalize_topk", 3)]))
            moe_py.MoEConfig(**{"d_model": 4, "d_ff": 4, "num_experts": 3, "top_k": 2, field: value})
