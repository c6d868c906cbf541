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
    x = ref["x"].astype(dtype)
    out = obj(x, padding_mask=ref["mask"])
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
    assert len(FILES) >= 16
