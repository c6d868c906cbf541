"""The default router (softmax top-k) and the router losses: gradients, padding, noise, STE,
capacity, known values. The other routers: tests/test_router_variants.py."""
import math
import warnings

import numpy as np
import pytest

import moe_py
from moe_py.testing import gradcheck

# Central differences in float64 with eps=1e-6 agree with an exact gradient to
# ~1e-9 on these O(1) functions; 1e-6 leaves room and still catches any
# missing term (those show up at 1e-2 or worse).
GRAD_TOL = 1e-6


def make_router(rng, D=6, E=5, k=2, dtype="float64", scale=1.0, **kw):
    cfg = moe_py.MoEConfig(d_model=D, d_ff=4, num_experts=E, top_k=k, dtype=dtype, **kw)
    r = moe_py.Router(cfg)
    r.params["w_router"][...] = rng.standard_normal((D, E)) * scale
    return r


OPTIONS = [
    dict(k=1),
    dict(k=2),
    dict(k=2, normalize_topk=False),
    dict(k=4, E=6),
    dict(k=3, E=6, normalize_topk=True),
    dict(k=2, capacity_factor=0.5),
    dict(k=2, capacity_factor=1.0),
    dict(k=1, capacity_factor=0.75),
]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("padded", [False, True])
def test_router_gradient_matches_finite_differences(opts, padded):
    rng = np.random.default_rng(1)
    r = make_router(rng, load_balance_coef=0.3, z_loss_coef=0.05, entropy_coef=0.2, **opts)
    x = rng.standard_normal((3, 7, r.cfg.d_model))
    mask = rng.random((3, 7)) > 0.3 if padded else None
    out = r(x, padding_mask=mask)
    if "capacity_factor" in opts:
        assert out.dropped.any(), "the case is meant to drop slots"
    report = gradcheck(r, {"x": x, "padding_mask": mask}, tol=GRAD_TOL, max_entries=10**6)
    assert report.skipped == 0 and report.checked == x.size + r.params["w_router"].size


@pytest.mark.parametrize("name", ["load_balance", "z_loss", "entropy"])
def test_each_loss_gradient_alone(name):
    rng = np.random.default_rng(2)
    coefs = dict(load_balance_coef=0.0, z_loss_coef=0.0, entropy_coef=0.0)
    coefs[{"load_balance": "load_balance_coef", "z_loss": "z_loss_coef", "entropy": "entropy_coef"}[name]] = 1.0
    r = make_router(rng, E=6, k=2, **coefs)
    x = rng.standard_normal((11, 6))
    mask = np.arange(11) % 4 != 0

    def f(x, w_router):  # only this loss has a coefficient: aux_loss is the loss itself
        r(x, padding_mask=mask)
        r.zero_grad()
        return r.losses[name], {"x": r.backward(None), "w_router": r.grads["w_router"].copy()}
    gradcheck(f, {"x": x, "w_router": r.params["w_router"]}, tol=GRAD_TOL, max_entries=10**6)


def test_losses_match_hand_computation():
    rng = np.random.default_rng(3)
    r = make_router(rng, E=4, k=2, load_balance_coef=0.5, z_loss_coef=0.25, entropy_coef=0.125)
    x = rng.standard_normal((9, 6))
    mask = np.array([1, 1, 0, 1, 1, 1, 0, 1, 1], dtype=bool)
    out = r(x, padding_mask=mask)
    logits = x[mask] @ r.params["w_router"]
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    R = mask.sum()
    top2 = np.argsort(-p, axis=1, kind="stable")[:, :2]
    f = np.bincount(top2.ravel(), minlength=4) / (R * 2)
    lb = 4 * np.sum(f * p.mean(0))
    lse = np.log(np.exp(logits).sum(1))
    z = np.mean(lse ** 2)
    ent = np.mean(-(p * np.log(p)).sum(1))
    assert out.tokens_per_expert.tolist() == np.bincount(top2.ravel(), minlength=4).tolist()
    np.testing.assert_allclose(r.losses["load_balance"], lb, rtol=1e-12)
    np.testing.assert_allclose(r.losses["z_loss"], z, rtol=1e-12)
    np.testing.assert_allclose(r.losses["entropy"], ent, rtol=1e-12)
    np.testing.assert_allclose(r.aux_loss, 0.5 * lb + 0.25 * z + 0.125 * ent, rtol=1e-12)
    np.testing.assert_allclose(out.entropy[mask], -(p * np.log(p)).sum(1), rtol=1e-12)
    np.testing.assert_array_equal(out.topk_indices[mask], top2)


def test_zero_router_is_balanced_and_picks_lowest_indices():
    rng = np.random.default_rng(4)
    r = make_router(rng, E=8, k=3)
    r.params["w_router"][...] = 0
    out = r(rng.standard_normal((16, 6)))
    assert r.losses["load_balance"] == pytest.approx(1.0, abs=1e-12)
    assert (out.topk_indices == [0, 1, 2]).all()
    assert out.entropy == pytest.approx(math.log(8), abs=1e-12)
    # a router that sends every token to expert 0 with high probability scores higher
    r.params["w_router"][...] = rng.standard_normal((6, 8)) * 0.1
    r.params["w_router"][:, 0] = 2.0
    r(np.abs(rng.standard_normal((64, 6))))
    assert r.losses["load_balance"] > 1.5


def test_perfectly_balanced_assignment_gives_one():
    # d_model = E and w = I: the logits are x itself, so the routing is chosen by hand.
    E = 4
    cfg = moe_py.MoEConfig(d_model=E, d_ff=2, num_experts=E, top_k=1, dtype="float64")
    r = moe_py.Router(cfg)
    r.params["w_router"][...] = np.eye(E)
    x = np.eye(E) * 50.0  # token t goes to expert t with probability ~1
    out = r(x)
    assert out.topk_indices[:, 0].tolist() == [0, 1, 2, 3]
    assert r.losses["load_balance"] == pytest.approx(1.0, abs=1e-12)
    out = r(np.tile(np.eye(E)[0] * 50.0, (4, 1)))  # everything on expert 0: E * 1 * ~1
    assert r.losses["load_balance"] == pytest.approx(E, rel=1e-12)


def test_capacity_keeps_first_choices_before_second_choices():
    E = 2
    cfg = moe_py.MoEConfig(d_model=E, d_ff=2, num_experts=E, top_k=2, capacity_factor=0.5,
                           dtype="float64")
    r = moe_py.Router(cfg)
    r.params["w_router"][...] = np.eye(E)
    # tokens 0-2 prefer expert 1, token 3 prefers expert 0; R=4, C = ceil(0.5*4*2/2) = 2
    x = np.array([[0.0, 1.0], [0.0, 2.0], [0.0, 3.0], [1.0, 0.0]])
    out = r(x)
    assert out.topk_indices.tolist() == [[1, 0], [1, 0], [1, 0], [0, 1]]
    # first choices in token order: expert 1 takes tokens 0, 1 (full), token 2 dropped;
    # expert 0 takes token 3; then second choices: expert 0 takes token 0, the rest dropped
    assert out.dropped.tolist() == [[False, False], [False, True], [True, True], [False, True]]
    assert (out.topk_weights[out.dropped] == 0).all()
    assert (out.topk_weights[~out.dropped] > 0).all()
    assert out.tokens_per_expert.tolist() == [4, 4]  # counted before dropping


def test_padding_is_the_same_as_removing_the_tokens():
    rng = np.random.default_rng(5)
    for cap in (None, 1.0):
        r = make_router(rng, E=5, k=2, capacity_factor=cap, load_balance_coef=0.1,
                        z_loss_coef=0.1, entropy_coef=0.1)
        x = rng.standard_normal((20, 6))
        mask = rng.random(20) > 0.4
        G = rng.standard_normal((20, 2))
        out = r(x, padding_mask=mask)
        losses, aux = dict(r.losses), r.aux_loss
        r.zero_grad()
        dx = r.backward(G)
        dw = r.grads["w_router"].copy()
        # padded rows: zero probabilities and weights, index -1, entropy 0, no gradient
        pad = ~mask
        for field in ("router_probs", "router_probs_clean", "topk_weights", "entropy"):
            assert (getattr(out, field)[pad] == 0).all(), field
        assert (out.topk_indices[pad] == -1).all()
        assert not out.dropped[pad].any()
        assert (dx[pad] == 0).all()

        ref = r(x[mask])
        assert r.losses == pytest.approx(losses, rel=1e-12)
        assert r.aux_loss == pytest.approx(aux, rel=1e-12)
        np.testing.assert_array_equal(ref.tokens_per_expert, out.tokens_per_expert)
        np.testing.assert_array_equal(ref.dropped, out.dropped[mask])
        np.testing.assert_array_equal(ref.topk_indices, out.topk_indices[mask])
        np.testing.assert_allclose(ref.topk_weights, out.topk_weights[mask], rtol=1e-12)
        r.zero_grad()
        dx_ref = r.backward(G[mask])
        np.testing.assert_allclose(dx_ref, dx[mask], rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(r.grads["w_router"], dw, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_all_padding_and_empty_batches_are_zero_and_quiet(dtype):
    rng = np.random.default_rng(6)
    r = make_router(rng, E=4, k=2, dtype=dtype, capacity_factor=1.0, entropy_coef=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x, mask in [(rng.standard_normal((5, 6)).astype(dtype), np.zeros(5, bool)),
                        (np.zeros((0, 6), dtype), None)]:
            out = r(x, padding_mask=mask)
            assert r.losses == {"load_balance": 0.0, "z_loss": 0.0, "entropy": 0.0}
            assert r.aux_loss == 0.0
            assert (out.topk_indices == -1).all() and (out.topk_weights == 0).all()
            assert (out.tokens_per_expert == 0).all()
            r.zero_grad()
            dx = r.backward(np.ones((x.shape[0], 2), dtype))
            assert (dx == 0).all() and (r.grads["w_router"] == 0).all()


def test_noise_is_opt_in_annealed_and_training_only():
    rng = np.random.default_rng(7)
    r = make_router(rng, E=6, k=2)
    x = rng.standard_normal((30, 6))
    out = r(x)
    assert r.noise_std == 0.0
    np.testing.assert_array_equal(out.router_probs, out.router_probs_clean)

    r.set_noise_annealing(1.0, 4)
    assert r.noise_std == 1.0
    clean_entropy = out.entropy.copy()
    stds = []
    for step in range(6):
        stds.append(r.noise_std)
        out = r(x, training=True)
        # entropy is always that of the clean probabilities
        np.testing.assert_array_equal(out.entropy, clean_entropy)
        if step < 4:
            assert not np.allclose(out.router_probs, out.router_probs_clean)
        else:  # annealed to 0
            np.testing.assert_array_equal(out.router_probs, out.router_probs_clean)
    assert stds == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0, 0.0])

    r.set_noise_annealing(2.0, 10)
    out = r(x, training=False)  # eval: no noise, and the step does not advance
    np.testing.assert_array_equal(out.router_probs, out.router_probs_clean)
    assert r.noise_std == 2.0
    # the noise is a function of the seed and step: same seed, same draws
    a = make_router(np.random.default_rng(0), E=6, k=2, seed=3)
    b = make_router(np.random.default_rng(0), E=6, k=2, seed=3)
    a.set_noise_annealing(1.0, 5)
    b.set_noise_annealing(1.0, 5)
    np.testing.assert_array_equal(a(x).router_probs, b(x).router_probs)


def test_noisy_probs_drive_topk_and_load_balance():
    rng = np.random.default_rng(8)
    r = make_router(rng, E=6, k=2, scale=0.01)
    x = rng.standard_normal((40, 6))
    r.set_noise_annealing(3.0, 100)
    out = r(x)
    p = out.router_probs
    order = np.argsort(-p, axis=1, kind="stable")[:, :2]
    np.testing.assert_array_equal(out.topk_indices, order)
    f = out.tokens_per_expert / (40 * 2)
    assert r.losses["load_balance"] == pytest.approx(6 * np.sum(f * p.mean(0)), rel=1e-12)


@pytest.mark.parametrize("training", [True, False])
def test_straight_through_weights_are_one_and_gradient_is_soft(training):
    rng = np.random.default_rng(9)
    ste = make_router(rng, E=5, k=2, straight_through=True, load_balance_coef=0.1)
    soft = moe_py.Router(moe_py.MoEConfig(**{**ste.cfg.__dict__, "straight_through": False}))
    soft.params["w_router"][...] = ste.params["w_router"]
    x = rng.standard_normal((12, 6))
    G = rng.standard_normal((12, 2))
    out = ste(x, training=training)
    assert (out.topk_weights == 1.0).all()
    ref = soft(x, training=training)
    np.testing.assert_array_equal(out.topk_indices, ref.topk_indices)
    ste.zero_grad(), soft.zero_grad()
    dx = ste.backward(G)
    if training:  # the gradient of the soft weights
        dx_ref = soft.backward(G)
    else:  # outside training nothing else happens: only the aux loss has a gradient
        dx_ref = soft.backward(None)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(ste.grads["w_router"], soft.grads["w_router"], rtol=1e-12, atol=1e-15)


def test_topk_ties_go_to_the_lower_index():
    cfg = moe_py.MoEConfig(d_model=4, d_ff=2, num_experts=4, top_k=2, dtype="float64")
    r = moe_py.Router(cfg)
    r.params["w_router"][...] = np.eye(4)
    out = r(np.array([[1.0, 3.0, 3.0, 3.0], [2.0, 2.0, 0.0, 2.0]]))
    assert out.topk_indices.tolist() == [[1, 2], [0, 1]]


def test_k1_weights_are_probabilities_and_normalising_k1_warns():
    rng = np.random.default_rng(10)
    r = make_router(rng, E=4, k=1)
    assert r.cfg.normalize_topk is False
    out = r(rng.standard_normal((8, 6)))
    np.testing.assert_array_equal(out.topk_weights[:, 0], out.router_probs.max(1))
    with pytest.warns(UserWarning, match="top_k=1"):
        moe_py.MoEConfig(d_model=4, d_ff=4, num_experts=4, top_k=1, normalize_topk=True)
    assert moe_py.MoEConfig(d_model=4, d_ff=4, num_experts=4, top_k=2).normalize_topk is True


def test_probs_drop_policy_keeps_each_experts_most_probable_assignments():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((60, 8))
    w = rng.standard_normal((8, 4))
    kept_by = {}
    for policy in ("position", "probs"):
        cfg = moe_py.MoEConfig(d_model=8, d_ff=4, num_experts=4, top_k=2, capacity_factor=0.6,
                               drop_policy=policy, dtype="float64", seed=1)
        r = moe_py.Router(cfg)
        r.params["w_router"][...] = w
        out = r(x)
        kept_by[policy] = ~out.dropped
        if policy == "probs":
            for e in range(4):
                sel = out.topk_indices == e
                p = np.broadcast_to(out.router_probs[:, e:e + 1], sel.shape)
                kept, dropped = p[sel & ~out.dropped], p[sel & out.dropped]
                if dropped.size:
                    assert kept.min() >= dropped.max()
    assert kept_by["position"].sum() == kept_by["probs"].sum()  # the same capacity
    assert not np.array_equal(kept_by["position"], kept_by["probs"])
    report = gradcheck(r, {"x": x}, tol=GRAD_TOL)
    assert report.checked > 0


# ---- capacity overflow ----

def _layer(**kw):
    return moe_py.MoELayer(moe_py.MoEConfig(**{"d_model": 16, "d_ff": 24, "num_experts": 4, "top_k": 2,
                                               "seed": 1, **kw}))


def test_huge_capacity_factor_is_dropless():
    x = np.random.default_rng(0).standard_normal((50, 16)).astype(np.float32)
    y_free = _layer()(x).y
    o = _layer(capacity_factor=1e300)(x)
    assert not o.router.dropped.any()
    np.testing.assert_array_equal(o.y, y_free)
