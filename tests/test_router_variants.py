"""The routers beyond softmax top-k (docs/design.md, "Routers"): gradients, thread
invariance, and each algorithm's defining property, checked against an independent
computation. Their outputs are compared with the PyTorch float64 reference in
tests/test_reference.py."""
import dataclasses
import json
import warnings

import numpy as np
import pytest

import moe_py
from moe_py.testing import assert_matches_reference, assert_thread_invariant, gradcheck

ROUTER_CASES = {
    "softmax_grouped": dict(router="softmax_topk", num_experts=8, n_group=4, topk_group=2),
    "sigmoid": dict(router="sigmoid_topk", routed_scaling_factor=1.5),
    "sigmoid_k1": dict(router="sigmoid_topk", top_k=1),
    "sigmoid_grouped": dict(router="sigmoid_topk", num_experts=8, n_group=4, topk_group=2),
    "expert_choice": dict(router="expert_choice"),
    "expert_choice_cap2": dict(router="expert_choice", capacity_factor=2.0, top_k=1),
    "sinkhorn": dict(router="sinkhorn"),
    "sinkhorn_k1_capacity": dict(router="sinkhorn", top_k=1, capacity_factor=0.8),
    "hash": dict(router="hash"),
    "shared": dict(num_shared_experts=2, shared_d_ff=5),
    "scope_sequence": dict(load_balance_scope="sequence"),
    "scope_global": dict(load_balance_scope="global"),
    "sigmoid_sequence_shared": dict(router="sigmoid_topk", load_balance_scope="sequence",
                                    num_shared_experts=1),
    # the Hugging Face families' variants (docs/design.md, "Routers beyond softmax top-k")
    "router_bias": dict(router_bias=True),  # gpt-oss
    "expert_choice_router_bias": dict(router="expert_choice", router_bias=True),
    "softmax_grouped_max": dict(num_experts=8, n_group=4, topk_group=2, group_score="max",
                                normalize_topk=False, routed_scaling_factor=2.0),  # DeepSeek-V2
    "sigmoid_grouped_max": dict(router="sigmoid_topk", num_experts=8, n_group=4, topk_group=2,
                                group_score="max"),
    "softmax_norm_min": dict(topk_norm_min=0.97),  # Ernie 4.5 (with the expert bias of prepare)
    "sqrtsoftplus": dict(router="sqrtsoftplus_topk", routed_scaling_factor=1.5),  # DeepSeek-V4
    "sqrtsoftplus_k1_grouped": dict(router="sqrtsoftplus_topk", top_k=1, num_experts=8, n_group=4,
                                    topk_group=2, router_bias=True),
}


def config(**kw) -> moe_py.MoEConfig:
    return moe_py.MoEConfig(**{"d_model": 6, "d_ff": 7, "num_experts": 4, "top_k": 2,
                               "dtype": "float64", "seed": 5, "load_balance_coef": 0.1,
                               "z_loss_coef": 0.01, "entropy_coef": 0.05, **kw})


def batch(cfg, B=3, S=7, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, S, cfg.d_model)).astype(cfg.np_dtype)
    mask = rng.random((B, S)) > 0.25
    ids = rng.integers(0, 256, (B, S))
    return x, mask, ids


def decisive(layer):
    """A router whose choices no finite-difference step flips."""
    if "w_router" in layer.params:
        layer.params["w_router"] *= 20.0
    return layer


def prepare(layer):
    """The state a case routes with besides its weights: a learned logit bias (router_bias)
    and a selection bias for the routers that carry one (loaded, as Ernie 4.5's, or moved by
    the aux-loss-free update), both away from 0 so that they matter."""
    router = layer.router if isinstance(layer, moe_py.MoELayer) else layer
    E = layer.cfg.num_experts
    if "b_router" in layer.params:
        layer.params["b_router"][...] = 0.3 * np.cos(1.3 * np.arange(E))
    if layer.cfg.traits.expert_bias:
        router.expert_bias[...] = 0.02 * np.sin(0.7 * np.arange(E) + 1.0)
    return layer


@pytest.mark.parametrize("name", sorted(ROUTER_CASES))
@pytest.mark.parametrize("training", [True, False])
def test_layer_and_router_gradcheck(name, training):
    cfg = config(**ROUTER_CASES[name])
    x, mask, ids = batch(cfg)
    layer = prepare(decisive(moe_py.MoELayer(cfg)))
    if cfg.load_balance_scope == "global":
        layer.router.step_loads[...] = np.arange(cfg.num_experts) * 3  # an earlier micro-batch
    inputs = {"x": x, "padding_mask": mask, "training": training, "token_ids": ids}
    report = gradcheck(layer, inputs, max_entries=25)
    assert report.checked > 20
    router = prepare(decisive(moe_py.Router(cfg)))
    if cfg.router != "hash":  # the hash router has no weight and no gradient to check
        assert gradcheck(router, inputs, max_entries=25).checked > 10


@pytest.mark.parametrize("name", sorted(ROUTER_CASES))
def test_matches_the_numpy_reference_in_float32_and_float64(name):
    for dtype in ("float64", "float32"):
        cfg = config(**ROUTER_CASES[name], dtype=dtype)
        x, mask, ids = batch(cfg, seed=1)
        for training in (True, False):
            layer = prepare(moe_py.MoELayer(cfg))
            if cfg.load_balance_scope == "global":
                layer.router.step_loads[...] = 4
            assert_matches_reference(layer, x, mask, training=training, token_ids=ids)


def routed_everything() -> dict:
    """Every router's outputs and gradients at a size where the kernels split work across
    threads (module level: assert_thread_invariant runs it in fresh processes)."""
    res = {}
    for name, kw in sorted(ROUTER_CASES.items()):
        for dtype in ("float32", "float64"):
            cfg = dataclasses.replace(config(**kw, dtype=dtype), d_model=48, d_ff=40)
            rng = np.random.default_rng(2)
            x = rng.standard_normal((5, 120, 48)).astype(dtype)
            mask = rng.random((5, 120)) > 0.1
            ids = rng.integers(0, 256, (5, 120))
            layer = prepare(moe_py.MoELayer(cfg))
            o = layer(x, padding_mask=mask, token_ids=ids)
            dx = layer.backward(np.ones_like(o.y) * 0.1 + x * 0.01)
            tag = f"{name}_{dtype}"
            res[f"{tag}_y"], res[f"{tag}_dx"] = o.y, dx
            for f in o.router._fields:
                res[f"{tag}_{f}"] = getattr(o.router, f)
            for n, g in layer.grads.items():
                res[f"{tag}_grad_{n}"] = g.copy()
    return res


def test_every_router_is_bitwise_the_same_at_1_2_and_3_threads():
    assert_thread_invariant(routed_everything)


# ---- sigmoid_topk and its aux-loss-free bias ------------------------------------------

def test_expert_bias_changes_the_choice_but_not_the_weights():
    cfg = config(router="sigmoid_topk", top_k=1)
    x, mask, _ = batch(cfg)
    layer = moe_py.MoELayer(cfg)
    before = layer(x, padding_mask=mask).router
    layer.router.expert_bias[...] = [5.0, 0.0, 0.0, 0.0]  # expert 0 wins every selection
    after = layer(x, padding_mask=mask).router
    real = mask.reshape(-1)
    assert np.all(after.topk_indices[real, 0] == 0)
    # the combine weight is the sigmoid score of the chosen expert, never score + bias
    scores = 1.0 / (1.0 + np.exp(-after.router_logits[real, 0]))
    np.testing.assert_allclose(after.topk_weights[real, 0], scores, rtol=1e-12)
    np.testing.assert_array_equal(after.router_probs, before.router_probs)


def test_update_expert_bias_follows_the_sign_rule_on_training_loads_only():
    cfg = config(router="sigmoid_topk", bias_update_rate=0.01)
    x, mask, _ = batch(cfg)
    layer = moe_py.MoELayer(cfg)
    loads = np.zeros(cfg.num_experts, np.int64)
    for seed in range(2):  # two micro-batches of one step
        xb, mb, _ = batch(cfg, seed=seed)
        loads += layer(xb, padding_mask=mb).router.tokens_per_expert
    layer(x, padding_mask=mask, training=False)  # evaluation never counts
    layer.update_expert_bias()
    expect = 0.01 * np.sign(loads.mean() - loads)
    np.testing.assert_allclose(layer.router.expert_bias, expect, rtol=0, atol=1e-15)
    assert not layer.router.step_loads.any()  # counted afresh for the next step
    zero = moe_py.MoELayer(config(router="sigmoid_topk", bias_update_rate=0.0))
    zero(x, padding_mask=mask)
    zero.update_expert_bias()
    assert not zero.router.expert_bias.any()


def test_the_trainer_moves_the_bias_once_per_step_and_the_checkpoint_keeps_it(tmp_path):
    from moe_py.checkpoint import load_model
    from moe_py.cli import main
    out = str(tmp_path / "run")
    assert main(["train", "--corpus", "synthetic", "--steps", "3", "--d-model", "16",
                 "--n-layers", "1", "--n-heads", "2", "--d-ff", "16", "--batch-size", "2",
                 "--seq-len", "16", "--grad-accum", "2", "--router", "sigmoid_topk",
                 "--bias-update-rate", "0.25", "--out", out]) == 0
    model, _ = load_model(out + "/checkpoint.npz")
    b = model.moe_layers[0].router.expert_bias
    with open(out + "/metrics.jsonl") as f:
        shares = [np.array(m["expert_share"][0]) for m in map(json.loads, f) if "expert_share" in m]
    assert len(shares) == 3
    # one sign step per optimiser step, from the loads of both micro-batches (logged per step)
    want = sum(0.25 * np.sign(1.0 / len(s) - s) for s in shares)
    np.testing.assert_allclose(b, want, atol=1e-6)
    assert np.abs(b).sum() > 0


def test_group_limited_routing_picks_inside_the_best_groups():
    cfg = config(router="sigmoid_topk", num_experts=8, n_group=4, topk_group=1, top_k=2,
                 dtype="float64")
    x, mask, _ = batch(cfg)
    r = moe_py.MoELayer(cfg)(x, padding_mask=mask).router
    for t in np.flatnonzero(mask.reshape(-1)):
        s = r.router_probs[t]
        group_score = [np.sort(s[g * 2:(g + 1) * 2]).sum() for g in range(4)]
        best = int(np.argmax(group_score))
        assert sorted(r.topk_indices[t].tolist()) == [2 * best, 2 * best + 1]


@pytest.mark.parametrize("group_score, best", [("top2_sum", 2), ("max", 1)])
@pytest.mark.parametrize("router", ["softmax_topk", "sigmoid_topk", "sqrtsoftplus_topk"])
def test_group_score_picks_the_groups_by_their_best_or_best_two(router, group_score, best):
    cfg = config(router=router, num_experts=12, n_group=4, topk_group=2, top_k=2,
                 group_score=group_score, bias_update_rate=0.0)
    x, mask, _ = batch(cfg, B=6)
    layer = decisive(moe_py.MoELayer(cfg))
    r = layer(x, padding_mask=mask).router
    differ = 0
    for t in np.flatnonzero(mask.reshape(-1)):
        s = r.router_probs[t].reshape(4, 3)
        score = np.sort(s, axis=1)[:, ::-1][:, :best].sum(axis=1)
        groups = np.argsort(-score, kind="stable")[:2]
        allowed = np.where(np.isin(np.arange(12) // 3, groups), r.router_probs[t], -np.inf)
        assert r.topk_indices[t].tolist() == np.argsort(-allowed, kind="stable")[:2].tolist()
        other = np.sort(s, axis=1)[:, ::-1][:, :3 - best].sum(axis=1)  # the other rule's scores
        differ += set(groups) != set(np.argsort(-other, kind="stable")[:2])
    assert differ > 0  # the batch tells the two rules apart


# ---- the Hugging Face families' variants ---------------------------------------------------

def test_router_bias_is_added_to_the_logits_and_is_a_parameter():
    cfg = config(router_bias=True)
    x, mask, _ = batch(cfg)
    layer = moe_py.MoELayer(cfg)
    plain = moe_py.MoELayer(dataclasses.replace(cfg, router_bias=False))
    assert set(layer.params) == set(plain.params) | {"b_router"}
    assert not layer.params["b_router"].any()  # initialised at 0: routes as without a bias
    a, b = layer(x, padding_mask=mask), plain(x, padding_mask=mask)
    np.testing.assert_array_equal(a.y, b.y)
    np.testing.assert_array_equal(a.router.router_probs, b.router.router_probs)
    bias = np.array([0.5, -0.25, 0.0, 1.0])
    layer.params["b_router"][...] = bias
    out = layer(x, padding_mask=mask)
    want = x.reshape(-1, 6) @ layer.params["w_router"] + bias
    np.testing.assert_allclose(out.router.router_logits, want, rtol=1e-13, atol=1e-13)
    assert layer.num_parameters()["total"] == plain.num_parameters()["total"] + 4
    # a bias is a weight row for an input that is always 1: the router of [x, 1] with
    # [w_router; b_router] and no bias routes alike and has b's gradient as its last row
    router = moe_py.Router(cfg)
    router.params["w_router"][...] = layer.params["w_router"]
    router.params["b_router"][...] = bias
    ones = moe_py.Router(dataclasses.replace(cfg, d_model=7, router_bias=False))
    ones.params["w_router"][...] = np.vstack([layer.params["w_router"], bias])
    x1 = np.concatenate([x, np.ones(x.shape[:-1] + (1,))], axis=-1)
    g = np.random.default_rng(3).standard_normal((x.shape[0] * x.shape[1], 2))
    ra, rb = router(x, padding_mask=mask), ones(x1, padding_mask=mask)
    np.testing.assert_allclose(ra.topk_weights, rb.topk_weights, rtol=1e-13, atol=1e-15)
    dx_a, dx_b = router.backward(g), ones.backward(g)
    np.testing.assert_allclose(dx_a, dx_b[..., :6], rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(router.grads["b_router"], ones.grads["w_router"][6], rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(router.grads["w_router"], ones.grads["w_router"][:6], rtol=1e-11, atol=1e-13)


def test_router_bias_round_trips_through_a_checkpoint_and_the_torch_module(tmp_path):
    torch = pytest.importorskip("torch")
    from moe_py.torch import MoE
    cfg = config(router="sqrtsoftplus_topk", router_bias=True)
    layer = moe_py.MoELayer(cfg)
    layer.params["b_router"][...] = [0.1, 0.2, -0.3, 0.4]
    moe_py.save(layer, str(tmp_path / "l.npz"))
    back = moe_py.load(str(tmp_path / "l.npz"))
    np.testing.assert_array_equal(back.params["b_router"], layer.params["b_router"])
    m = MoE(cfg)
    assert "b_router" in dict(m.named_parameters())
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)

    def f(x, *ps):
        y, aux, _ = m(x)
        return y, aux
    assert torch.autograd.gradcheck(f, (x, *m.parameters()), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_softmax_expert_bias_changes_the_choice_but_not_the_weights():
    # Ernie 4.5: softmax probabilities, chosen by probs + a frozen correction bias
    cfg = config(top_k=2, topk_norm_min=1e-12)
    x, mask, _ = batch(cfg)
    layer = moe_py.MoELayer(cfg)
    assert cfg.bias_rate == 0.0  # frozen unless asked for
    layer.router.expert_bias[...] = [0.0, 5.0, 0.0, 0.0]  # expert 1 wins every first place
    r = layer(x, padding_mask=mask).router
    real = mask.reshape(-1)
    assert np.all(r.topk_indices[real, 0] == 1)
    p = np.exp(r.router_logits - r.router_logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    chosen = np.take_along_axis(p, np.maximum(r.topk_indices, 0), axis=1)[real]
    np.testing.assert_allclose(r.topk_weights[real], chosen / chosen.sum(axis=1, keepdims=True),
                               rtol=1e-12)
    layer.update_expert_bias()  # rate 0: the loaded bias stays
    np.testing.assert_array_equal(layer.router.expert_bias, [0.0, 5.0, 0.0, 0.0])


def test_topk_norm_min_floors_the_denominator_of_the_weights():
    cfg = config(top_k=2, num_experts=6, topk_norm_min=0.6)
    x, mask, _ = batch(cfg, B=6)
    layer = moe_py.MoELayer(cfg)
    layer.params["w_router"] *= 60.0  # some tokens sure of two experts, some spread out
    r = layer(x, padding_mask=mask).router
    real = mask.reshape(-1)
    chosen = np.take_along_axis(r.router_probs, np.maximum(r.topk_indices, 0), axis=1)[real]
    S = chosen.sum(axis=1)
    assert (S < 0.6).any() and (S > 0.6).any()  # both branches
    np.testing.assert_allclose(r.topk_weights[real], chosen / np.maximum(S, 0.6)[:, None], rtol=1e-12)


def test_sqrtsoftplus_scores_and_their_normalised_distribution():
    cfg = config(router="sqrtsoftplus_topk", top_k=2, routed_scaling_factor=1.5)
    assert cfg.bias_rate == 1e-3  # the aux-loss-free update is on by default, as for sigmoid
    x, mask, _ = batch(cfg)
    layer = moe_py.MoELayer(cfg)
    layer.params["w_router"] *= 300.0  # logits beyond +-20 too
    r = layer(x, padding_mask=mask).router
    real = mask.reshape(-1)
    logits = r.router_logits[real]
    assert logits.max() > 20 and logits.min() < -20
    softplus = np.where(logits > 20, logits, np.log1p(np.exp(logits)))  # as torch's softplus
    s = np.sqrt(softplus)
    np.testing.assert_allclose(r.router_probs[real], s, rtol=1e-14)
    chosen = np.take_along_axis(s, r.topk_indices[real], axis=1)
    np.testing.assert_allclose(r.topk_weights[real], 1.5 * chosen / chosen.sum(axis=1, keepdims=True),
                               rtol=1e-13)
    q = s / s.sum(axis=1, keepdims=True)  # the balance loss and the entropy read q
    np.testing.assert_allclose(r.entropy[real], -(q * np.log(q)).sum(axis=1), rtol=1e-12)
    np.testing.assert_allclose(moe_py.router.balance_distribution(r.router_probs, real, cfg.router)[real],
                               q, rtol=1e-14)


def test_sqrtsoftplus_backward_survives_scores_that_underflow():
    cfg = config(router="sqrtsoftplus_topk", top_k=1, d_model=2, num_experts=2)
    r = moe_py.Router(cfg)
    r.params["w_router"][...] = [[1.0, -1.0], [0.0, 0.0]]
    x = np.array([[900.0, 0.0]])  # logits 900 and -900: the second score is exactly 0
    out = r(x)
    assert out.router_probs[0, 1] == 0.0 and out.topk_indices[0, 0] == 0
    dx = r.backward(np.ones((1, 1)))
    assert np.all(np.isfinite(dx)) and np.all(np.isfinite(r.grads["w_router"]))


# ---- expert choice ---------------------------------------------------------------------

def test_expert_choice_takes_each_experts_best_tokens():
    cfg = config(router="expert_choice", num_experts=5, top_k=2, capacity_factor=1.3)
    x, mask, _ = batch(cfg, B=4, S=9)
    r = moe_py.MoELayer(cfg)(x, padding_mask=mask).router
    real = np.flatnonzero(mask.reshape(-1))
    C = min(len(real), int(np.ceil(1.3 * len(real) * 2 / 5)))
    for e in range(5):
        takers = {t for t in real if e in r.topk_indices[t]}
        best = set(real[np.argsort(-r.router_probs[real, e], kind="stable")[:C]].tolist())
        assert takers == best
    assert np.all(r.tokens_per_expert == C)
    # a token's slots list its experts by descending probability, then -1 with weight 0
    for t in real:
        row = r.topk_indices[t]
        live = row[row >= 0]
        assert np.all(np.diff(r.router_probs[t, live]) <= 0)
        assert np.all(r.topk_weights[t, row < 0] == 0)
        np.testing.assert_allclose(r.topk_weights[t, :len(live)], r.router_probs[t, live])


def test_unrouted_share_is_logged_and_the_lm_warns(tmp_path):
    from moe_py.cli import main
    out = str(tmp_path / "ec")
    with pytest.warns(UserWarning, match="expert_choice.*future tokens"):
        assert main(["train", "--corpus", "synthetic", "--steps", "2", "--d-model", "16",
                     "--n-layers", "1", "--n-heads", "2", "--d-ff", "16", "--batch-size", "2",
                     "--seq-len", "16", "--router", "expert_choice", "--capacity-factor", "0.5",
                     "--out", out]) == 0
    with open(out + "/metrics.jsonl") as f:
        m = [json.loads(ln) for ln in f if '"unrouted"' in ln][0]
    # capacity 0.5 x k=2 serves one slot per token on average: some tokens go unserved
    assert 0 < m["unrouted"][0] < 1


# ---- Sinkhorn ---------------------------------------------------------------------------

def test_sinkhorn_balances_in_training_and_is_plain_topk_in_eval():
    cfg = config(router="sinkhorn", num_experts=4, top_k=1, d_model=6)
    x, mask, _ = batch(cfg, B=8, S=16)
    layer = moe_py.MoELayer(cfg)
    layer.params["w_router"][:, 0] += 1.0  # a router skewed towards expert 0
    layer.params["w_router"] *= 3.0
    ev = layer(x, padding_mask=mask, training=False).router
    tr = layer(x, padding_mask=mask, training=True).router
    plain = moe_py.MoELayer(dataclasses.replace(cfg, router="softmax_topk"))
    plain.params["w_router"][...] = layer.params["w_router"]
    np.testing.assert_array_equal(ev.topk_indices, plain(x, padding_mask=mask, training=False)
                                  .router.topk_indices)
    assert tr.tokens_per_expert.max() < ev.tokens_per_expert.max()
    assert tr.tokens_per_expert.min() > ev.tokens_per_expert.min()
    # the weights are the softmax scores of the chosen experts in both modes
    real = mask.reshape(-1)
    np.testing.assert_allclose(tr.topk_weights[real, 0],
                               tr.router_probs[real, tr.topk_indices[real, 0]], rtol=1e-12)


# ---- hash ---------------------------------------------------------------------------------

def test_hash_routing_depends_on_the_token_id_only():
    cfg = config(router="hash", num_experts=6, top_k=2)
    layer = moe_py.MoELayer(cfg)
    assert "w_router" not in layer.params
    rng = np.random.default_rng(0)
    ids = np.array([[3, 7, 3, 200, 7]])
    a = layer(rng.standard_normal((1, 5, 6)), token_ids=ids).router
    b = layer(rng.standard_normal((1, 5, 6)), token_ids=ids).router
    np.testing.assert_array_equal(a.topk_indices, b.topk_indices)
    np.testing.assert_array_equal(a.topk_indices[0], a.topk_indices[2])
    assert np.all(a.topk_weights == 0.5)
    assert all(len(set(row)) == 2 for row in a.topk_indices.tolist())
    with pytest.raises(ValueError, match="token_ids"):
        layer(rng.standard_normal((1, 5, 6)))
    with pytest.raises(ValueError, match="token_ids"):
        layer(rng.standard_normal((1, 5, 6)), token_ids=-ids)
    # every expert is about equally likely over many ids
    share = moe_py.MoELayer(cfg)(np.zeros((1, 6000, 6)), token_ids=np.arange(6000)[None]).router
    assert np.all(np.abs(share.tokens_per_expert / 12000 - 1 / 6) < 0.02)


# ---- shared experts ----------------------------------------------------------------------

def test_shared_experts_add_a_dense_ffn_of_every_real_token():
    cfg = config(num_shared_experts=2, shared_d_ff=5)
    x, mask, _ = batch(cfg)
    layer = moe_py.MoELayer(cfg)
    routed = moe_py.MoELayer(dataclasses.replace(cfg, num_shared_experts=0))
    for k in routed.params:
        routed.params[k][...] = layer.params[k]
    y_shared = np.zeros_like(x)
    for s in range(2):  # the SwiGLU formula, written out
        w1, w3, w2 = (layer.params[f"shared_w{i}"][s] for i in (1, 3, 2))
        h = x @ w1
        y_shared += (h / (1 + np.exp(-h)) * (x @ w3)) @ w2
    want = routed(x, padding_mask=mask).y + y_shared * mask[..., None]
    np.testing.assert_allclose(layer(x, padding_mask=mask).y, want, rtol=1e-12, atol=1e-12)
    n, n0 = layer.num_parameters(), routed.num_parameters()
    shared_size = 2 * 3 * 6 * 5
    assert n["total"] == n0["total"] + shared_size and n["active"] == n0["active"] + shared_size


# ---- balance-loss scopes -------------------------------------------------------------------

def test_sequence_scope_is_the_mean_of_per_sequence_batch_losses():
    cfg = config(load_balance_scope="sequence")
    x, mask, _ = batch(cfg)
    mask[1] = False  # a sequence of padding only counts nowhere
    layer = moe_py.MoELayer(cfg)
    per_seq = moe_py.MoELayer(dataclasses.replace(cfg, load_balance_scope="batch"))
    per_seq.params["w_router"][...] = layer.params["w_router"]
    got = layer(x, padding_mask=mask).losses["load_balance"]
    want = np.mean([per_seq(x[b], padding_mask=mask[b]).losses["load_balance"] for b in (0, 2)])
    np.testing.assert_allclose(got, want, rtol=1e-12)
    with pytest.raises(ValueError, match="sequence"):
        layer(x.reshape(-1, cfg.d_model))


def test_global_scope_counts_the_earlier_micro_batches_of_the_step():
    cfg = config(load_balance_scope="global")
    layer = moe_py.MoELayer(cfg)
    x1, m1, _ = batch(cfg, seed=1)
    x2, m2, _ = batch(cfg, seed=2)
    r1 = layer(x1, padding_mask=m1).router
    o2 = layer(x2, padding_mask=m2)
    counts = r1.tokens_per_expert + o2.router.tokens_per_expert
    f = counts / counts.sum()
    P = o2.router.router_probs[m2.reshape(-1)].mean(axis=0)
    np.testing.assert_allclose(o2.losses["load_balance"], cfg.num_experts * (f * P).sum(), rtol=1e-12)
    layer.update_expert_bias()  # the step ends: the next micro-batch starts from its own counts
    o3 = layer(x2, padding_mask=m2)
    f3 = o3.router.tokens_per_expert / o3.router.tokens_per_expert.sum()
    np.testing.assert_allclose(o3.losses["load_balance"], cfg.num_experts * (f3 * P).sum(), rtol=1e-12)


# ---- configuration and the main job ---------------------------------------------------------

@pytest.mark.parametrize("kw, word", [
    (dict(router="hash", bias_update_rate=0.1), "bias_update_rate"),
    (dict(router="sinkhorn", routed_scaling_factor=2.0), "routed_scaling_factor"),
    (dict(routed_scaling_factor=0.0, router="sigmoid_topk"), "routed_scaling_factor"),
    (dict(n_group=3), "n_group"),
    (dict(router="sinkhorn", n_group=2), "n_group"),
    (dict(n_group=2, topk_group=3), "topk_group"),
    (dict(router="expert_choice", straight_through=True), "straight_through"),
    (dict(load_balance_scope="step"), "load_balance_scope"),
    (dict(num_shared_experts=-1), "num_shared_experts"),
    (dict(shared_d_ff=0), "shared_d_ff"),
    (dict(sinkhorn_iterations=0), "sinkhorn_iterations"),
    (dict(router="sinkhorn", sinkhorn_iterations=10**6), "sinkhorn_iterations: expected at most 10000"),
    (dict(router="sigmoid_topk", bias_update_rate=1e300), r"bias_update_rate: expected a step in \[0, 1.0\]"),
    (dict(router="sigmoid_topk", bias_update_rate=-0.1), "bias_update_rate"),
    (dict(sinkhorn_tolerance=float("nan")), "sinkhorn_tolerance"),
    (dict(router="hash", router_bias=True), "router_bias: a logit bias needs a learned w_router"),
    (dict(router_bias=1), "router_bias: expected a bool"),
    (dict(n_group=2, group_score="top3_sum"), "group_score: expected one of"),
    (dict(group_score="max"), r"group_score: .*n_group=1"),
    (dict(topk_norm_min=-1e-12), "topk_norm_min: expected a number >= 0"),
    (dict(topk_norm_min=float("inf")), "topk_norm_min: expected a finite number"),
    (dict(topk_norm_min=0.1, normalize_topk=False), "topk_norm_min: floors the denominator"),
    (dict(router="expert_choice", topk_norm_min=0.1), "topk_norm_min"),
    (dict(router="expert_choice", bias_update_rate=1e-3), "bias_update_rate"),
])
def test_bad_router_options_name_the_field(kw, word):
    with pytest.raises(ValueError, match=word):
        config(**kw)


def test_noise_is_refused_by_routers_that_do_not_pick_by_score():
    for router in ("expert_choice", "sinkhorn", "hash"):
        with pytest.raises(ValueError, match="start_std"):
            moe_py.MoELayer(config(router=router)).set_noise_annealing(0.5, 10)


@pytest.mark.parametrize("router", ["sigmoid_topk", "sqrtsoftplus_topk", "expert_choice", "sinkhorn", "hash"])
def test_the_main_job_trains_with_every_router(tmp_path, router):
    from moe_py.cli import main
    out = str(tmp_path / router)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # expert choice's causality warning
        assert main(["train", "--corpus", "synthetic", "--steps", "3", "--d-model", "16",
                     "--n-layers", "2", "--n-heads", "2", "--d-ff", "16", "--batch-size", "2",
                     "--seq-len", "16", "--router", router, "--num-shared-experts", "1",
                     "--load-balance-scope", "sequence", "--out", out]) == 0
        assert main(["analyze", out]) == 0
    with open(out + "/metrics.jsonl") as f:
        rows = [json.loads(ln) for ln in f]
    assert all(np.isfinite(r["loss"]) for r in rows)


def test_golden_files_keep_the_token_ids_and_the_expert_bias(tmp_path):
    from moe_py.testing import assert_matches_golden, save_golden
    for router in ("hash", "sigmoid_topk"):
        cfg = config(router=router)
        x, mask, ids = batch(cfg)
        layer = moe_py.MoELayer(cfg)
        layer.router.expert_bias[...] = [0.3, -0.2, 0.1, 0.0]
        path = str(tmp_path / f"{router}.npz")
        save_golden(path, layer, {"x": x, "padding_mask": mask, "token_ids": ids})
        assert_matches_golden(path)  # the layer rebuilt from the file, bias and ids included
        if router == "sigmoid_topk":
            layer.router.expert_bias[...] = 0.0
            with pytest.raises(AssertionError, match="differs"):
                assert_matches_golden(path, layer)
