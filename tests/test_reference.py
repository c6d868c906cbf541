"""moe_py against reference outputs written by an independent PyTorch float64
implementation (tests/reference/make_reference.py). Needs no torch at test time."""
import glob
import json
import os

import numpy as np
import pytest

import moe_py

FILES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "reference", "*.npz")))
INT_FIELDS = ("topk_indices", "tokens_per_expert", "dropped")
FIELDS = ("topk_weights", "router_probs", "router_probs_clean", "router_logits", "entropy")
# float64: both sides compute the same maths in a different order (dense vs grouped
# experts, different GEMMs), so they agree to a few ulps of the O(1-10) values.
TOL64 = dict(rtol=1e-10, atol=1e-11)
# float32: ~6e-8 relative rounding through a few GEMMs of depth <= 18 and a softmax.
TOL32 = dict(rtol=2e-4, atol=2e-5)


def run(ref, dtype):
    cfg = moe_py.MoEConfig(**{**json.loads(str(ref["cfg"])), "dtype": dtype})
    kind = str(ref["kind"])
    obj = moe_py.Router(cfg) if kind == "router" else moe_py.MoELayer(cfg)
    for key in ref.files:
        if key.startswith("param_"):
            obj.params[key[6:]][...] = ref[key]
    router = obj if kind == "router" else obj.router
    if "state_expert_bias" in ref.files:
        router.expert_bias[...] = ref["state_expert_bias"]
    if "state_balance_counts" in ref.files:  # the global scope's loads of earlier micro-batches
        router.step_loads[...] = ref["state_balance_counts"]
    ids = ref["state_token_ids"] if "state_token_ids" in ref.files else None
    training = bool(ref["training"]) if "training" in ref.files else True
    x = ref["x"].astype(dtype)
    out = obj(x, padding_mask=ref["mask"], training=training, token_ids=ids)
    obj.zero_grad()
    if kind == "router":
        dx = obj.backward(ref["G"].astype(dtype))
        router, losses, aux, y = out, obj.losses, obj.aux_loss, None
    else:
        dx = obj.backward(ref["dy"].astype(dtype))
        router, losses, aux, y = out.router, out.losses, out.aux_loss, out.y
    return router, losses, aux, y, dx, obj.grads


def close(name, got, want, tol):
    err = float(np.max(np.abs(got - want))) if np.size(want) else 0.0
    np.testing.assert_allclose(got, want, err_msg=f"{name}: max abs diff {err:.3e}", **tol)


@pytest.mark.parametrize("path", FILES, ids=lambda p: os.path.basename(p)[:-4])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_matches_pytorch_reference(path, dtype):
    ref = np.load(path)
    tol = TOL64 if dtype == "float64" else TOL32
    router, losses, aux, y, dx, grads = run(ref, dtype)
    for f in INT_FIELDS:
        assert np.array_equal(getattr(router, f), ref[f"router_{f}"]), f
    for f in FIELDS:
        close(f, getattr(router, f), ref[f"router_{f}"], tol)
    for n in ("load_balance", "z_loss", "entropy"):
        close(n, np.array(losses[n]), ref[f"loss_{n}"], tol)
    close("aux_loss", np.array(aux), ref["aux_loss"], tol)
    if y is not None:
        close("y", y, ref["y"], tol)
    close("dx", dx, ref["dx"], tol)
    for key in ref.files:
        if key.startswith("grad_"):
            close(key, grads[key[5:]], ref[key], tol)


def test_reference_files_exist():
    assert len(FILES) >= 42


@pytest.mark.parametrize("path", FILES, ids=lambda p: os.path.basename(p)[:-4])
def test_numpy_reference_matches_the_pytorch_reference(path):
    """moe_py.testing's NumPy reference and the independent PyTorch one agree in float64."""
    from moe_py.testing import reference_forward_backward
    ref = np.load(path)
    cfg = moe_py.MoEConfig(**{**json.loads(str(ref["cfg"])), "dtype": "float64"})
    params = {k[6:]: ref[k] for k in ref.files if k.startswith("param_")}
    dy = ref["G"] if str(ref["kind"]) == "router" else ref["dy"]
    state = {k[6:]: ref[k] for k in ref.files if k.startswith("state_")}
    training = bool(ref["training"]) if "training" in ref.files else True
    r = reference_forward_backward(cfg, params, ref["x"], ref["mask"], dy, training,
                                   state.get("expert_bias"), state.get("balance_counts"),
                                   state.get("token_ids"))
    tol = dict(rtol=1e-12, atol=1e-12)
    for f in r.router:
        want = ref[f"router_{f}"]
        np.testing.assert_allclose(r.router[f], want.reshape(r.router[f].shape), err_msg=f, **tol)
    for n in ("load_balance", "z_loss", "entropy"):
        np.testing.assert_allclose(r.losses[n], ref[f"loss_{n}"], err_msg=n, **tol)
    np.testing.assert_allclose(r.aux_loss, ref["aux_loss"], **tol)
    np.testing.assert_allclose(r.dx, ref["dx"].reshape(r.dx.shape), **tol)
    if "y" in ref.files:
        np.testing.assert_allclose(r.y, ref["y"].reshape(r.y.shape), **tol)
    for k in ref.files:
        if k.startswith("grad_"):
            np.testing.assert_allclose(r.grads[k[5:]], ref[k], err_msg=k, **tol)


@pytest.mark.parametrize("kw", [dict(), dict(activation="gelu", capacity_factor=0.7),
                                dict(top_k=1, straight_through=True), dict(dtype="float32"),
                                dict(top_k=4, normalize_topk=False, entropy_coef=0.05),
                                dict(activation="clamped_swiglu", swiglu_limit=0.6, swiglu_alpha=1.2,
                                     num_shared_experts=1),
                                dict(ffn_bias=True, capacity_factor=0.7),
                                dict(activation="gelu", ffn_bias=True),
                                dict(combine="input", ffn_bias=True, capacity_factor=0.7),
                                dict(combine="input", router="sigmoid_topk", top_k=1)])
def test_layer_and_router_match_the_numpy_reference(kw):
    from moe_py.testing import assert_matches_reference
    cfg = moe_py.MoEConfig(**{"d_model": 10, "d_ff": 12, "num_experts": 5, "top_k": 2,
                              "dtype": "float64", **kw})
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 7, 10)).astype(cfg.np_dtype)
    mask = rng.random((3, 7)) > 0.3
    for training in (True, False):
        layer = moe_py.MoELayer(cfg)
        for name in ("b1", "b3", "b2"):  # biases (when there are) away from their init of 0
            if name in layer.params:
                layer.params[name][...] = rng.standard_normal(layer.params[name].shape)
        assert_matches_reference(layer, x, mask, training=training)
        assert_matches_reference(moe_py.Router(cfg), x, mask, training=training)
