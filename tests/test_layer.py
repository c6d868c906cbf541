"""MoELayer: whole-layer gradients, dense equivalence, padding, expert gradients."""
import threading

import numpy as np
import pytest

import moe_py
from moe_py.testing import gradcheck

GRAD_TOL = 1e-6  # float64 central differences, see test_router_softmax_topk.py


def make_layer(rng, D=6, F=5, E=4, k=2, dtype="float64", **kw):
    cfg = moe_py.MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=k, dtype=dtype, **kw)
    layer = moe_py.MoELayer(cfg)
    # a router that is far from uniform, so that top-k is not near a tie
    layer.params["w_router"][...] = rng.standard_normal((D, E))
    return layer


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("capacity_factor", [None, 0.75])
def test_layer_gradient_matches_finite_differences(activation, k, padded, capacity_factor):
    rng = np.random.default_rng(11)
    layer = make_layer(rng, E=5, k=k, activation=activation, capacity_factor=capacity_factor,
                       load_balance_coef=0.2, z_loss_coef=0.02, entropy_coef=0.1)
    x = rng.standard_normal((2, 6, 6))
    mask = rng.random((2, 6)) > 0.3 if padded else None
    o = layer(x, padding_mask=mask)
    if capacity_factor is not None:
        assert o.router.dropped.any()
    report = gradcheck(layer, {"x": x, "padding_mask": mask}, tol=GRAD_TOL, max_entries=10**6)
    assert report.skipped == 0 and report.checked == x.size + sum(p.size for p in layer.params.values())


# The expert variants of the Hugging Face families, each through the whole layer's gradient
# (k = 2, padding, capacity): gpt-oss's clamped SwiGLU with a limit that clamps often, the
# experts' biases, and Llama 4's input-scaled combine (also with its top-1 sigmoid router).
VARIANTS = {"clamped_swiglu": dict(activation="clamped_swiglu", swiglu_limit=0.6, swiglu_alpha=1.5),
            "ffn_bias": dict(ffn_bias=True), "gelu_ffn_bias": dict(activation="gelu", ffn_bias=True),
            "input_combine": dict(combine="input", ffn_bias=True),
            "llama4_input_combine": dict(combine="input", router="sigmoid_topk", top_k=1)}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_expert_variants_gradient_matches_finite_differences(variant):
    rng = np.random.default_rng(12)
    kw = {"k": 2, **VARIANTS[variant]}
    kw["k"] = kw.pop("top_k", kw["k"])
    layer = make_layer(rng, E=5, capacity_factor=0.5, load_balance_coef=0.2, z_loss_coef=0.02, **kw)
    for name, v in layer.params.items():  # biases (when there are) away from their init of 0
        if name.startswith("b"):
            v[...] = rng.standard_normal(v.shape) * 0.5
    x = rng.standard_normal((2, 6, 6))
    mask = rng.random((2, 6)) > 0.3
    assert layer(x, padding_mask=mask).router.dropped.any()
    report = gradcheck(layer, {"x": x, "padding_mask": mask}, tol=GRAD_TOL, max_entries=10**6)
    assert report.skipped == 0 and report.checked == x.size + sum(p.size for p in layer.params.values())


def dense_swiglu(x, w1, w3, w2):
    h1 = x @ w1
    return ((h1 / (1 + np.exp(-h1))) * (x @ w3)) @ w2


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-12), ("float32", 1e-5)])
def test_one_expert_top1_is_a_dense_swiglu_ffn(dtype, tol):
    rng = np.random.default_rng(12)
    cfg = moe_py.MoEConfig(d_model=16, d_ff=24, num_experts=1, top_k=1, dtype=dtype,
                           load_balance_coef=0.0, z_loss_coef=0.0)
    layer = moe_py.MoELayer(cfg)
    x = rng.standard_normal((33, 16)).astype(dtype)
    o = layer(x)
    w1, w3, w2 = (layer.params[n][0].astype(np.float64) for n in ("w1", "w3", "w2"))
    ref = dense_swiglu(x.astype(np.float64), w1, w3, w2)
    assert (o.router.topk_weights == 1).all()  # softmax over one expert
    np.testing.assert_allclose(o.y, ref, rtol=tol, atol=tol)


def test_padded_tokens_give_zero_output_and_gradient_and_match_removal():
    rng = np.random.default_rng(13)
    layer = make_layer(rng, E=4, k=2, capacity_factor=1.25, entropy_coef=0.05)
    x = rng.standard_normal((24, 6))
    mask = rng.random(24) > 0.35
    dy = rng.standard_normal(x.shape)
    o = layer(x, padding_mask=mask)
    layer.zero_grad()
    dx = layer.backward(dy)
    grads = {k: v.copy() for k, v in layer.grads.items()}
    assert (o.y[~mask] == 0).all() and (dx[~mask] == 0).all()

    ref = layer(x[mask])
    layer.zero_grad()
    dx_ref = layer.backward(dy[mask])
    assert ref.losses == pytest.approx(o.losses, rel=1e-12)
    np.testing.assert_allclose(ref.y, o.y[mask], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dx_ref, dx[mask], rtol=1e-10, atol=1e-13)
    for name in grads:
        np.testing.assert_allclose(layer.grads[name], grads[name], rtol=1e-10, atol=1e-13)


def test_idle_experts_get_exactly_zero_gradient_and_busy_ones_do_not():
    rng = np.random.default_rng(14)
    layer = make_layer(rng, E=6, k=1)
    # steer every token to experts 0 and 1 only
    layer.params["w_router"][...] = 0
    layer.params["w_router"][0, 0] = 5.0
    layer.params["w_router"][0, 1] = -5.0
    x = rng.standard_normal((20, 6))
    o = layer(x)
    used = set(o.router.topk_indices.ravel().tolist())
    assert used == {0, 1}
    layer.zero_grad()
    layer.backward(rng.standard_normal(x.shape))
    for name in ("w1", "w3", "w2"):
        g = layer.grads[name]
        assert np.isfinite(g).all()
        for e in range(6):
            if e in used:
                assert np.abs(g[e]).sum() > 0, (name, e)
            else:
                assert (g[e] == 0).all(), (name, e)
    assert np.abs(layer.grads["w_router"]).sum() > 0


def test_k1_router_learns_from_the_task_loss():
    rng = np.random.default_rng(15)
    layer = make_layer(rng, E=4, k=1, load_balance_coef=0.0, z_loss_coef=0.0)
    assert layer.cfg.normalize_topk is False
    x = rng.standard_normal((16, 6))
    layer(x)
    layer.zero_grad()
    layer.backward(rng.standard_normal(x.shape))
    assert np.abs(layer.grads["w_router"]).max() > 1e-3


def test_backward_includes_the_aux_loss_gradient():
    rng = np.random.default_rng(16)
    layer = make_layer(rng, E=4, k=2, load_balance_coef=1.0, z_loss_coef=0.1)
    x = rng.standard_normal((10, 6))
    layer(x)
    layer.zero_grad()
    dx = layer.backward(np.zeros_like(x))  # no task gradient: only the aux loss remains
    router = moe_py.Router(layer.cfg)
    router.params["w_router"][...] = layer.params["w_router"]
    router(x)
    router.zero_grad()
    np.testing.assert_allclose(dx, router.backward(None), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(layer.grads["w_router"], router.grads["w_router"], rtol=1e-12)
    assert np.abs(layer.grads["w_router"]).max() > 0


def test_grads_accumulate_until_zero_grad():
    rng = np.random.default_rng(17)
    layer = make_layer(rng)
    x = rng.standard_normal((9, 6))
    dy = rng.standard_normal(x.shape)
    layer(x)
    layer.zero_grad()
    layer.backward(dy)
    once = {k: v.copy() for k, v in layer.grads.items()}
    layer.backward(dy)
    for k in once:
        np.testing.assert_allclose(layer.grads[k], 2 * once[k], rtol=1e-12)
    layer.zero_grad()
    assert all((g == 0).all() for g in layer.grads.values())


def test_params_and_grads_have_the_contract_shapes():
    for act, keys in (("swiglu", {"w_router", "w1", "w3", "w2"}), ("gelu", {"w_router", "w1", "w2"})):
        cfg = moe_py.MoEConfig(d_model=8, d_ff=12, num_experts=3, top_k=2, activation=act)
        layer = moe_py.MoELayer(cfg)
        assert set(layer.params) == keys and set(layer.grads) == keys
        shapes = {"w_router": (8, 3), "w1": (3, 8, 12), "w3": (3, 8, 12), "w2": (3, 12, 8)}
        for k in keys:
            assert layer.params[k].shape == shapes[k] and layer.params[k].dtype == np.float32
            assert layer.grads[k].shape == shapes[k] and layer.grads[k].dtype == np.float32


def test_float32_agrees_with_float64():
    rng = np.random.default_rng(18)
    l64 = make_layer(rng, D=16, F=32, E=4, k=2)
    l32 = moe_py.MoELayer(moe_py.MoEConfig(**{**l64.cfg.__dict__, "dtype": "float32"}))
    for k in l64.params:
        l32.params[k][...] = l64.params[k]
    x = rng.standard_normal((40, 16))
    dy = rng.standard_normal(x.shape)
    o64, o32 = l64(x), l32(x.astype(np.float32))
    np.testing.assert_array_equal(o64.router.topk_indices, o32.router.topk_indices)
    # float32 rounding (~6e-8 relative) through two GEMMs of depth 16-32
    np.testing.assert_allclose(o32.y, o64.y, rtol=1e-4, atol=1e-5)
    l64.zero_grad(), l32.zero_grad()
    dx64, dx32 = l64.backward(dy), l32.backward(dy.astype(np.float32))
    np.testing.assert_allclose(dx32, dx64, rtol=1e-4, atol=1e-5)
    for k in l64.grads:
        np.testing.assert_allclose(l32.grads[k], l64.grads[k], rtol=1e-4, atol=1e-4)


def test_two_forwards_then_the_first_backward_gives_the_first_gradient():
    cfg = moe_py.MoEConfig(d_model=12, d_ff=16, num_experts=4, top_k=2, seed=2)
    rng = np.random.default_rng(0)
    x1, x2 = (rng.standard_normal((9, 12)).astype(np.float32) for _ in range(2))
    dy1, dy2 = (rng.standard_normal((9, 12)).astype(np.float32) for _ in range(2))
    ref = moe_py.MoELayer(cfg)
    ref(x1)
    want1 = ref.backward(dy1)
    g1 = {k: v.copy() for k, v in ref.grads.items()}
    ref.zero_grad()
    ref(x2)
    want2 = ref.backward(dy2)

    layer = moe_py.MoELayer(cfg)
    o1 = layer(x1)
    layer(x2)  # a later forward
    np.testing.assert_array_equal(o1.backward(dy1), want1)  # not x2's gradient
    for k in g1:
        np.testing.assert_array_equal(layer.grads[k], g1[k])
    layer.zero_grad()
    np.testing.assert_array_equal(layer.backward(dy2), want2)  # no out: the latest forward
    np.testing.assert_array_equal(layer.backward(dy1, out=o1), want1)
    other = moe_py.MoELayer(cfg)
    with pytest.raises(ValueError, match="another layer"):
        other.backward(dy1, out=o1)


def test_the_model_refuses_the_backward_of_an_older_forward():
    from moe_py.models import ModelConfig, TransformerLM
    moe = moe_py.MoEConfig(d_model=16, d_ff=16, num_experts=2, top_k=1)
    m = TransformerLM(ModelConfig(max_seq_len=8, d_model=16, n_layers=1, n_heads=2, moe=moe))
    ids = np.zeros((1, 8), np.int64)
    o1 = m.forward(ids)
    o2 = m.forward(ids)
    with pytest.raises(RuntimeError, match="earlier forward"):
        m.backward([np.zeros_like(o1.head_logits[0])], out=o1)
    m.backward([np.zeros_like(o2.head_logits[0])], out=o2)


def test_save_and_load_a_layer(tmp_path):
    cfg = moe_py.MoEConfig(d_model=12, d_ff=16, num_experts=4, top_k=2, activation="gelu",
                           capacity_factor=1.5, seed=3)
    layer = moe_py.MoELayer(cfg)
    layer.set_noise_annealing(0.5, 10)
    x = np.random.default_rng(0).standard_normal((9, 12)).astype(np.float32)
    layer(x)  # one noisy step: the noise state must come back too
    path = str(tmp_path / "layer.npz")
    moe_py.save(layer, path)
    back = moe_py.load(path)
    assert back.cfg == layer.cfg and back.noise_std == layer.noise_std
    np.testing.assert_array_equal(back(x).y, layer(x).y)
    state = layer.state_dict()
    state["w1"] = state["w1"][:, :, :3]
    with pytest.raises(ValueError, match=r"state\['w1'\]: expected float32 \[4, 12, 16\]"):
        back.load_state_dict(state)
    with pytest.raises(ValueError, match="keys"):
        back.load_state_dict({"w1": layer.params["w1"]})
    open(path, "wb").write(b"garbage")
    with pytest.raises(ValueError, match="not a saved moe_py layer"):
        moe_py.load(path)


def test_a_layer_with_the_expert_variants_saves_loads_and_counts_its_biases(tmp_path):
    cfg = moe_py.MoEConfig(d_model=12, d_ff=16, num_experts=4, top_k=2, activation="clamped_swiglu",
                           swiglu_limit=0.9, swiglu_alpha=1.1, ffn_bias=True, seed=3)
    layer = moe_py.MoELayer(cfg)
    shapes = {"b1": (4, 16), "b3": (4, 16), "b2": (4, 12)}
    for name, shape in shapes.items():
        assert layer.params[name].shape == shape and not layer.params[name].any()  # zeros at init
        assert layer.grads[name].shape == shape
        layer.params[name][...] = np.random.default_rng(1).standard_normal(shape)
    # the weights are those of the same seed without biases: biases draw nothing
    plain = moe_py.MoELayer(moe_py.MoEConfig(**{**cfg.__dict__, "ffn_bias": False}))
    for k in plain.params:
        assert np.array_equal(plain.params[k], layer.params[k]), k
    per_expert = 3 * 12 * 16 + 16 + 16 + 12
    assert layer.num_parameters() == {"total": 12 * 4 + 4 * per_expert, "active": 12 * 4 + 2 * per_expert}
    x = np.random.default_rng(0).standard_normal((9, 12)).astype(np.float32)
    path = str(tmp_path / "layer.npz")
    moe_py.save(layer, path)
    back = moe_py.load(path)
    assert back.cfg == layer.cfg
    np.testing.assert_array_equal(back(x).y, layer(x).y)


def test_changing_x_in_place_after_forward_leaves_the_backward_unchanged():
    cfg = moe_py.MoEConfig(d_model=16, d_ff=16, num_experts=4, top_k=2, dtype="float64")
    x = np.random.default_rng(0).standard_normal((2, 8, 16))
    dy = np.random.default_rng(1).standard_normal((2, 8, 16))
    clean = moe_py.MoELayer(cfg)
    clean(x.copy())
    dx_clean = clean.backward(dy)
    layer = moe_py.MoELayer(cfg)
    layer(x)
    x *= 10  # the caller reuses its buffer before the backward
    dx = layer.backward(dy)
    assert np.array_equal(dx, dx_clean)
    for k in clean.grads:
        assert np.array_equal(layer.grads[k], clean.grads[k]), k


def test_a_deleted_parameter_is_named_not_a_key_error():
    layer = moe_py.MoELayer(moe_py.MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=2))
    out = layer(np.ones((2, 8), np.float32))
    del layer.params["w3"]
    with pytest.raises(ValueError, match=r"params: expected the keys \['w1', 'w2', 'w3', 'w_router'\]"):
        layer(np.ones((2, 8), np.float32))
    with pytest.raises(ValueError, match="params: expected the keys"):
        layer.backward(np.ones_like(out.y))


@pytest.mark.parametrize("field", ["dtype", "router", "activation", "drop_policy", "load_balance_scope"])
def test_a_non_string_choice_is_a_value_error_naming_the_field(field):
    with pytest.raises(ValueError, match=f"{field}: expected one of"):
        moe_py.MoEConfig(**{field: {}})


def test_a_threads_own_output_backpropagates_after_another_threads_forward():
    """Thread A's forward, then thread B's forward on the same layer, then A differentiates its
    own output: that is A's forward, so it is allowed (the check is per forward, not the
    latest); B differentiating A's output is refused."""
    layer = moe_py.MoELayer(moe_py.MoEConfig(d_model=16, d_ff=16, num_experts=4, top_k=2))
    x = np.ones((8, 16), np.float32)
    out_a = layer(x)
    out_b = []
    t = threading.Thread(target=lambda: out_b.append(layer(x)))
    t.start()
    t.join()
    out_a.backward(np.ones_like(x))  # A's own forward: allowed
    err = []

    def from_b():
        try:
            out_a.backward(np.ones_like(x))
        except RuntimeError as e:
            err.append(str(e))
    t = threading.Thread(target=from_b)
    t.start()
    t.join()
    assert "another thread than its forward" in err[0]


# ---- outputs are read-only, one layer per thread, failed calls change nothing, grads and params ----

def small_layer(**kw):
    cfg = dict(d_model=16, d_ff=24, num_experts=4, top_k=2, seed=1)
    cfg.update(kw)
    return moe_py.MoELayer(moe_py.MoEConfig(**cfg))


def test_router_output_is_read_only_and_backward_checks_indices():
    layer = small_layer()
    x = np.random.default_rng(0).standard_normal((30, 16)).astype(np.float32)
    o = layer(x)
    with pytest.raises(ValueError, match="read-only"):
        o.router.topk_indices[:, 0] = 4
    idx = o.router.topk_indices
    idx.flags.writeable = True  # a determined user: the C++ still refuses
    idx[:, 0] = 1_000_000
    with pytest.raises(ValueError, match="saved topk_indices"):
        layer.backward(np.ones_like(x))


def test_a_layer_in_use_by_another_thread_raises():
    layer = small_layer()
    x = np.ones((8, 16), np.float32)
    layer._guard._lock.acquire()  # as if another thread were inside forward
    try:
        with pytest.raises(RuntimeError, match="in use by another thread"):
            layer(x)
    finally:
        layer._guard._lock.release()
    layer(x)
    err = []
    t = threading.Thread(target=lambda: err.append(_raises(lambda: layer.backward(np.ones_like(x)))))
    t.start()
    t.join()
    assert "another thread" in err[0]


def _raises(fn):
    try:
        fn()
    except RuntimeError as e:
        return str(e)
    return ""


def test_failed_forward_changes_nothing():
    layer = small_layer()
    layer.set_noise_annealing(0.5, 10)
    rng = np.random.default_rng(0)
    x, dy = rng.standard_normal((20, 16)).astype(np.float32), rng.standard_normal((20, 16)).astype(np.float32)
    layer(x)
    std = layer.noise_std
    layer.zero_grad()
    want = layer.backward(dy).copy(), {k: g.copy() for k, g in layer.grads.items()}
    w1 = layer.params["w1"].copy()
    layer.params["w1"][0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="w1"):
        layer(rng.standard_normal((7, 16)).astype(np.float32))
    layer.params["w1"][...] = w1
    assert layer.noise_std == std
    layer.zero_grad()
    np.testing.assert_array_equal(layer.backward(dy), want[0])
    for k, g in layer.grads.items():
        np.testing.assert_array_equal(g, want[1][k])


def test_grad_buffer_errors_name_layer_grads():
    layer = small_layer()
    x = np.ones((6, 16), np.float32)
    layer(x)
    layer.grads["w1"] = np.zeros((2, 2), np.float32)  # a wrong entry put into the dict
    with pytest.raises(ValueError, match=r"grads\['w1'\]"):
        layer.backward(np.ones_like(x))


def test_assigning_params_takes_effect():
    layer = small_layer()
    x = np.random.default_rng(0).standard_normal((6, 16)).astype(np.float32)
    before = layer(x).y
    new = {k: v * 2 for k, v in layer.params.items()}
    layer.params = new
    after = layer(x).y
    assert not np.array_equal(before, after)
    np.testing.assert_array_equal(layer.params["w2"], new["w2"])
    with pytest.raises(ValueError, match="params"):
        layer.params = {"w1": new["w1"]}
