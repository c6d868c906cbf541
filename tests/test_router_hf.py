"""moe_py's routers against the router modules of Hugging Face transformers (docs/design.md,
"Routers beyond softmax top-k", "The Hugging Face families"): the same weights in, the same
experts and combine weights out. GptOss, DeepSeek-V4 and DBRX compute in the weights' dtype, so
they agree with moe_py in float64 to 1e-12; GraniteMoe, DeepSeek-V2, Ernie 4.5 and Jamba take
the softmax (or the logits) in float32 inside their router, so they agree only to float32
rounding (the experts are the same: no two candidates of these batches are within float32
rounding of each other).
Needs torch and transformers (the hf extra); skipped without them."""
import dataclasses

import numpy as np
import pytest

import moe_py

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

D, T = 16, 48
FLOAT64 = dict(rtol=1e-12, atol=1e-14)
FLOAT32 = dict(rtol=2e-6, atol=1e-7)  # HF's float32 softmax and top-k, returned as float64


def inputs(E, scale, seed):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((T, D)), rng.standard_normal((D, E)) * scale


def hf_module(cls, config, w):
    """An HF router of `config` in float64 with router weight w [D, E] (HF keeps it as [E, D])."""
    m = cls(config).to(torch.float64)
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(w.T))
    return m


def hf_route(m, x):
    """(indices, weights) of an HF router's forward on x, as float64 NumPy arrays."""
    with torch.no_grad():
        out = m(torch.from_numpy(x))
    weights, indices = out[1], out[2]
    return indices.numpy(), weights.to(torch.float64).numpy()


def moe_route(cfg, w, x, b_router=None, expert_bias=None):
    router = moe_py.Router(dataclasses.replace(cfg, d_model=D, dtype="float64"))
    router.params["w_router"][...] = w
    if b_router is not None:
        router.params["b_router"][...] = b_router
    if expert_bias is not None:
        router.expert_bias[...] = expert_bias
    r = router(x, training=False)
    return r.topk_indices, r.topk_weights


def by_expert(indices, weights):
    """Each token's experts and weights in expert order (top-k with sorted=False has none)."""
    order = np.argsort(indices, axis=1)
    return np.take_along_axis(indices, order, axis=1), np.take_along_axis(weights, order, axis=1)


def granitemoe_router(E, k):
    # top-k of the logits, then a softmax over those k: exp(z_i) / sum_{j in top-k} exp(z_j),
    # which is p_i / sum_{j in top-k} p_j of the full softmax, over the same k experts
    from transformers.models.granitemoe.modeling_granitemoe import GraniteMoeTopKRouter
    return GraniteMoeTopKRouter, transformers.GraniteMoeConfig(hidden_size=D, num_local_experts=E,
                                                               num_experts_per_tok=k)


def jamba_router(E, k):
    # Jamba (and Qwen3-MoE / OLMoE with norm_topk_prob=False): the top-k probabilities as they are
    from transformers.models.jamba.modeling_jamba import JambaTopKRouter
    return JambaTopKRouter, transformers.JambaConfig(hidden_size=D, num_experts=E, num_experts_per_tok=k)


@pytest.mark.parametrize("family, normalize, seed", [(granitemoe_router, True, 1), (jamba_router, False, 7)])
def test_softmax_topk_families(family, normalize, seed):
    E, k = 6, 2
    x, w = inputs(E, 0.5, seed=seed)
    hf_idx, hf_w = hf_route(hf_module(*family(E, k), w), x)
    idx, wts = moe_route(moe_py.MoEConfig(num_experts=E, top_k=k, normalize_topk=normalize), w, x)
    np.testing.assert_array_equal(idx, hf_idx)
    np.testing.assert_allclose(wts, hf_w, **FLOAT32)  # GraniteMoe: logits.float(); Jamba: a float32 softmax


def test_gpt_oss_router_with_bias_is_softmax_topk_with_router_bias():
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter
    E, k = 8, 4
    x, w = inputs(E, 0.5, seed=2)
    config = transformers.GptOssConfig(hidden_size=D, num_local_experts=E, num_experts_per_tok=k)
    hf = hf_module(GptOssTopKRouter, config, w)
    bias = np.random.default_rng(3).standard_normal(E)
    with torch.no_grad():
        hf.bias.copy_(torch.from_numpy(bias))
    hf_idx, hf_w = hf_route(hf, x)
    cfg = moe_py.MoEConfig(num_experts=E, top_k=k, normalize_topk=True, router_bias=True)
    idx, wts = moe_route(cfg, w, x, b_router=bias)
    np.testing.assert_array_equal(idx, hf_idx)
    np.testing.assert_allclose(wts, hf_w, **FLOAT64)
    # the bias matters here: without it other experts win
    assert not np.array_equal(moe_route(dataclasses.replace(cfg, router_bias=False), w, x)[0], idx)


def test_deepseek_v2_group_limited_greedy_is_group_score_max():
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
    E, k = 8, 2
    x, w = inputs(E, 1.0, seed=4)
    config = transformers.DeepseekV2Config(
        hidden_size=D, num_attention_heads=2, num_key_value_heads=2, n_routed_experts=E,
        num_experts_per_tok=k, n_group=4, topk_group=2, topk_method="group_limited_greedy",
        routed_scaling_factor=2.5)
    hf = hf_module(DeepseekV2TopkRouter, config, w)
    assert hf.num_experts == E and hf.topk_method == "group_limited_greedy"
    hf_idx, hf_w = by_expert(*hf_route(hf, x))
    # DeepSeek-V2's weights are the chosen probabilities times the scale, never normalised
    cfg = moe_py.MoEConfig(num_experts=E, top_k=k, normalize_topk=False, n_group=4, topk_group=2,
                           group_score="max", routed_scaling_factor=2.5)
    idx, wts = by_expert(*moe_route(cfg, w, x))
    np.testing.assert_array_equal(idx, hf_idx)
    np.testing.assert_allclose(wts, hf_w, **FLOAT32)  # DeepSeek-V2: float32 logits and softmax
    # DeepSeek-V3's rule (the sum of a group's two best) picks other experts for some tokens
    top2 = by_expert(*moe_route(dataclasses.replace(cfg, group_score="top2_sum"), w, x))[0]
    assert (top2 != idx).any(axis=1).sum() > 0


def test_ernie_4_5_router_is_softmax_topk_with_a_frozen_bias_and_a_norm_floor():
    from transformers.models.ernie4_5_moe.modeling_ernie4_5_moe import Ernie4_5_MoeTopKRouter
    E, k, norm_min = 8, 2, 0.45
    x, w = inputs(E, 0.6, seed=5)
    config = transformers.Ernie4_5_MoeConfig(hidden_size=D, moe_num_experts=E, moe_k=k,
                                             moe_norm_min=norm_min)
    hf = hf_module(Ernie4_5_MoeTopKRouter, config, w)
    bias = np.random.default_rng(6).standard_normal(E) * 0.1
    with torch.no_grad():
        hf.moe_statics.e_score_correction_bias.copy_(torch.from_numpy(bias)[None])
    hf_idx, hf_w = hf_route(hf, x)
    cfg = moe_py.MoEConfig(num_experts=E, top_k=k, normalize_topk=True, topk_norm_min=norm_min,
                           bias_update_rate=0.0)
    idx, wts = moe_route(cfg, w, x, expert_bias=bias)
    np.testing.assert_array_equal(idx, hf_idx)
    np.testing.assert_allclose(wts, hf_w, **FLOAT32)  # Ernie: float32 logits and softmax
    # both sides of the floor, and a bias that changes the choice
    S = wts.sum(axis=1)
    assert (S < 1 - 1e-6).any() and np.isclose(S, 1).any()
    assert not np.array_equal(moe_route(cfg, w, x)[0], idx)


def test_deepseek_v4_router_is_sqrtsoftplus_topk():
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4TopKRouter
    E, k = 8, 3
    x, w = inputs(E, 3.0, seed=7)  # logits beyond 20 too: torch's softplus threshold
    config = transformers.DeepseekV4Config(
        hidden_size=D, num_attention_heads=2, num_key_value_heads=1, n_routed_experts=E,
        num_experts_per_tok=k, routed_scaling_factor=1.5)
    hf = hf_module(DeepseekV4TopKRouter, config, w)
    assert hf.num_experts == E
    bias = np.random.default_rng(8).standard_normal(E) * 0.2
    with torch.no_grad():
        hf.e_score_correction_bias.copy_(torch.from_numpy(bias))
    hf_idx, hf_w = by_expert(*hf_route(hf, x))
    assert np.abs(x @ w).max() > 20
    cfg = moe_py.MoEConfig(router="sqrtsoftplus_topk", num_experts=E, top_k=k, normalize_topk=True,
                           routed_scaling_factor=1.5, bias_update_rate=0.0)
    idx, wts = by_expert(*moe_route(cfg, w, x, expert_bias=bias))
    np.testing.assert_array_equal(idx, hf_idx)
    np.testing.assert_allclose(wts, hf_w, **FLOAT64)
    assert not np.array_equal(by_expert(*moe_route(cfg, w, x))[0], idx)  # the bias matters


@pytest.mark.parametrize("p_norm", [1.0, None])
def test_dbrx_router_is_softmax_topk_normalised_by_the_one_norm_or_not_at_all(p_norm):
    # DBRX divides the k probabilities by their p-norm (moe_normalize_expert_weights): p = 1 is
    # their sum (normalize_topk=True), None leaves them (normalize_topk=False); another p is
    # no moe_py router
    from transformers.models.dbrx.modeling_dbrx import DbrxFFN
    E, k = 6, 2
    x, w = inputs(E, 0.5, seed=8)
    config = transformers.DbrxConfig(d_model=D, ffn_config=dict(
        hidden_size=D, ffn_hidden_size=8, moe_num_experts=E, moe_top_k=k,
        moe_normalize_expert_weights=p_norm))
    ffn = DbrxFFN(config).to(torch.float64).eval()
    with torch.no_grad():
        ffn.router.layer.weight.copy_(torch.from_numpy(w.T))
        hf_w, hf_idx = ffn.route_tokens_to_experts(ffn.router(torch.from_numpy(x)))
    idx, wts = moe_route(moe_py.MoEConfig(num_experts=E, top_k=k, normalize_topk=p_norm == 1), w, x)
    np.testing.assert_array_equal(idx, hf_idx.numpy())
    np.testing.assert_allclose(wts, hf_w.numpy(), **FLOAT64)  # DBRX: softmax in the logits' dtype
