"""Transformer parts and the whole LM: float64 gradient checks, padding, attention maths."""
import numpy as np
import pytest

import moe_py
from moe_py.testing import gradcheck
from moe_py.models import ModelConfig, TransformerLM
from moe_py.nn import CausalSelfAttention, RMSNorm

GRAD_TOL = 1e-6  # float64 central differences (see test_router_softmax_topk.py)


def test_rmsnorm_gradient_and_value():
    rng = np.random.default_rng(0)
    norm = RMSNorm(7, np.float64)
    norm.params["g"][...] = rng.standard_normal(7)
    x = rng.standard_normal((5, 7))
    dy = rng.standard_normal((5, 7))
    y = norm.forward(x)
    ref = x / np.sqrt((x ** 2).mean(1, keepdims=True) + norm.eps) * norm.params["g"]
    np.testing.assert_allclose(y, ref, rtol=1e-13)

    def f(x, g):  # g is norm.params["g"] itself: gradcheck perturbs it in place
        loss = float(np.sum(norm.forward(x) * dy))
        norm.grads["g"][...] = 0
        return loss, {"x": norm.backward(dy), "g": norm.grads["g"].copy()}
    gradcheck(f, {"x": x, "g": norm.params["g"]}, tol=GRAD_TOL, max_entries=10**6)


def reference_attention(x, mask, w_qkv, w_out, heads):
    """Plain NumPy causal attention with key padding, written independently."""
    B, S, D = x.shape
    hd = D // heads
    qkv = x @ w_qkv
    q, k, v = qkv[..., :D], qkv[..., D:2 * D], qkv[..., 2 * D:]
    out = np.zeros((B, S, D))
    for b in range(B):
        for h in range(heads):
            sl = slice(h * hd, (h + 1) * hd)
            s = q[b, :, sl] @ k[b, :, sl].T / np.sqrt(hd)
            allowed = np.tril(np.ones((S, S), bool)) & mask[b][None, :]
            s = np.where(allowed, s, -np.inf)
            for i in range(S):
                if not mask[b, i]:
                    continue
                p = np.exp(s[i] - s[i].max())
                out[b, i, sl] = (p / p.sum()) @ v[b, :, sl]
    return out @ w_out


def test_attention_matches_reference_and_gradient():
    rng = np.random.default_rng(1)
    B, S, D, H = 2, 5, 6, 2
    attn = CausalSelfAttention(D, H, rng, np.float64, out_std=0.5)
    attn.params["w_qkv"][...] = rng.standard_normal((D, 3 * D)) * 0.5
    x = rng.standard_normal((B, S, D))
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 1, 0]], bool)
    m8 = mask.astype(np.uint8)
    y = attn.forward(x.reshape(B * S, D), m8, (B, S)).reshape(B, S, D)
    ref = reference_attention(x, mask, attn.params["w_qkv"], attn.params["w_out"], H)
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-14)
    assert (y[~mask] == 0).all()

    dy = rng.standard_normal((B * S, D))

    def f(x, w_qkv, w_out):  # the weights are attn's own arrays, perturbed in place
        loss = float(np.sum(attn.forward(x.reshape(B * S, D), m8, (B, S)) * dy))
        for g in attn.grads.values():
            g[...] = 0
        dx = attn.backward(dy).reshape(x.shape)
        return loss, {"x": dx, **{k: g.copy() for k, g in attn.grads.items()}}
    gradcheck(f, {"x": x, **attn.params}, tol=GRAD_TOL, max_entries=10**6)


def tiny_model(moe: bool, n_predict: int = 2, dtype="float64", **moe_kw):
    moe_cfg = None
    if moe:
        moe_cfg = moe_py.MoEConfig(d_model=8, d_ff=6, num_experts=3, top_k=2, dtype=dtype,
                                   load_balance_coef=0.1, z_loss_coef=0.01, **moe_kw)
    cfg = ModelConfig(vocab_size=11, d_model=8, n_layers=2, n_heads=2, d_ff=6, max_seq_len=7,
                      moe=moe_cfg, n_predict=n_predict, dtype=dtype, seed=1)
    return TransformerLM(cfg)


def batch(rng, B=2, S=7, V=11):
    ids = rng.integers(0, V, (B, S))
    mask = np.ones((B, S), bool)
    mask[1, 4:] = False
    targets = np.roll(ids, -1, 1)
    targets[:, -1] = -100
    targets[1, 3:] = -100
    ids[~mask] = 0
    return ids, targets, mask


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_full_model_gradient(moe):
    m = tiny_model(moe)
    rng = np.random.default_rng(2)
    ids, targets, mask = batch(rng)

    report = gradcheck(m, {"inputs": ids, "targets": targets, "mask": mask}, tol=GRAD_TOL,
                       max_entries=10**6)
    assert report.skipped == 0 and report.checked == sum(p.size for _, p, _ in m.named_parameters())


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_padding_does_not_change_the_real_tokens(moe):
    """A row padded to a longer window gives the same loss and gradients as the
    real tokens alone: attention, the MoE statistics and the loss ignore padding."""
    m = tiny_model(moe, n_predict=1)
    rng = np.random.default_rng(3)
    ids = rng.integers(1, 11, (1, 4))
    targets = np.append(ids[0, 1:], -100)[None]
    r_short = m.loss_and_backward(ids, targets, np.ones((1, 4), bool))
    g_short = {n: g.copy() for n, _, g in m.named_parameters()}
    m.zero_grad()
    ids_pad = np.concatenate([ids, np.zeros((1, 3), np.int64)], 1)
    targets_pad = np.concatenate([targets, np.full((1, 3), -100)], 1)
    mask_pad = np.array([[1, 1, 1, 1, 0, 0, 0]], bool)
    r_pad = m.loss_and_backward(ids_pad, targets_pad, mask_pad)
    assert r_pad["loss"] == pytest.approx(r_short["loss"], rel=1e-12)
    assert r_pad["aux_loss"] == pytest.approx(r_short["aux_loss"], rel=1e-12)
    for n, _, g in m.named_parameters():
        if n == "embed.positions":  # positions past the short window get no gradient either way
            np.testing.assert_allclose(g[:4], g_short[n][:4], rtol=1e-10, atol=1e-13)
            assert (g[4:] == 0).all()
        else:
            np.testing.assert_allclose(g, g_short[n], rtol=1e-10, atol=1e-13, err_msg=n)


def test_model_exposes_router_outputs_and_sums_layer_aux_losses():
    m = tiny_model(True, n_predict=1)
    rng = np.random.default_rng(4)
    ids, targets, mask = batch(rng)
    out = m.forward(ids, mask)
    assert len(out.routers) == 2 and len(out.layer_losses) == 2
    per_layer = sum(l.router.aux_loss for l in m.moe_layers)
    assert out.aux_loss == pytest.approx(per_layer, rel=1e-14)
    for r in out.routers:
        assert (r.topk_indices[~mask.reshape(-1)] == -1).all()
        assert r.entropy.shape == (ids.size,)


def test_parameter_counts():
    moe = tiny_model(True)
    dense = tiny_model(False)
    c_moe, c_dense = moe.num_parameters(), dense.num_parameters()
    expert = 3 * 8 * 6  # w1, w3, w2 of one expert
    assert c_moe["total"] - c_moe["active"] == 2 * (3 - 2) * expert
    assert c_dense["total"] == c_dense["active"]


def test_mixed_dense_and_moe_blocks():
    moe = moe_py.MoEConfig(d_model=8, d_ff=6, num_experts=3, top_k=2, dtype="float64")
    cfg = ModelConfig(vocab_size=11, d_model=8, n_layers=5, n_heads=2, d_ff=12, max_seq_len=7,
                      moe=moe, first_dense=1, moe_every=2, dtype="float64")
    m = TransformerLM(cfg)
    assert [b.ffn.has_router for b in m.blocks] == [False, True, False, True, False]
    assert len(m.moe_layers) == 2
    n = m.num_parameters()
    per_expert = 3 * 8 * 6
    assert n["total"] - n["active"] == 2 * (3 - 2) * per_expert  # one idle expert per MoE block
    rng = np.random.default_rng(0)
    ids, targets, mask = batch(rng)
    out = m.forward(ids, mask)
    assert len(out.routers) == 2 and len(out.layer_losses) == 2
    report = gradcheck(m, {"inputs": ids, "targets": targets, "mask": mask}, tol=GRAD_TOL,
                       max_entries=20)
    assert report.skipped == 0
    with pytest.raises(ValueError, match="first_dense"):
        ModelConfig(first_dense=-1)
    with pytest.raises(ValueError, match="moe_every"):
        ModelConfig(moe_every=0)


def test_empty_token_ids_are_refused_naming_inputs():
    import moe_py
    from moe_py.models import ModelConfig, TransformerLM
    model = TransformerLM(ModelConfig(max_seq_len=16, d_model=16, n_layers=1, n_heads=2,
                                      moe=moe_py.MoEConfig(d_model=16, d_ff=16, num_experts=4, top_k=2)))
    for shape in ((2, 0), (0, 4)):
        with pytest.raises(ValueError, match="inputs: expected at least one sequence of at least one token"):
            model.forward(np.zeros(shape, np.int64))


def one_layer_lm():
    moe = moe_py.MoEConfig(d_model=16, d_ff=16, num_experts=2, top_k=1)
    return TransformerLM(ModelConfig(max_seq_len=8, d_model=16, n_layers=1, n_heads=2, moe=moe))


def test_model_config_rejects_a_non_config_moe():
    with pytest.raises(TypeError, match="moe"):
        ModelConfig(moe=5)


def test_model_backward_checks_its_calls():
    m = one_layer_lm()
    with pytest.raises(RuntimeError, match="before forward"):
        m.backward([np.zeros((1, 8, 256), np.float32)])
    out = m.forward(np.zeros((1, 8), np.int64))
    with pytest.raises(ValueError, match="one gradient per head"):
        m.backward([np.zeros_like(out.head_logits[0])] * 2)


def test_the_expert_variants_reach_the_model_and_its_gradient():
    """MoEConfig's expert variants (biases, clamped SwiGLU, input combine) reach every MoE block of the LM:
    their parameters are the model's, with the right gradient, and biases are not decayed."""
    from moe_py.optim import decays
    m = tiny_model(True, n_predict=1, ffn_bias=True, activation="clamped_swiglu", swiglu_limit=0.5,
                   combine="input")
    names = [n for n, _, _ in m.named_parameters()]
    for i in range(2):
        assert {f"blocks.{i}.ffn.{b}" for b in ("b1", "b3", "b2")} <= set(names)
    rng = np.random.default_rng(4)
    for n, p, _ in m.named_parameters():
        if n.rsplit(".", 1)[-1] in ("b1", "b3", "b2"):
            p[...] = rng.standard_normal(p.shape) * 0.3
            assert p.ndim == 2 and not decays(n, p)
        elif n.endswith(".w1"):
            assert decays(n, p)
    ids, targets, mask = batch(rng)
    # a sample of every array's entries (the whole-model check of every entry is
    # test_full_model_gradient's; the variants' own every-entry checks are test_layer.py's)
    report = gradcheck(m, {"inputs": ids, "targets": targets, "mask": mask}, tol=GRAD_TOL, max_entries=8)
    assert report.skipped == 0
