"""moe_py.hf.from_hf / to_hf, block for block against transformers' own modules: the forward
output, the router logits and every gradient, with padding, in float32 and float64."""
import importlib
import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from moe_py.hf import from_hf, to_hf  # noqa: E402
from moe_py.hf.blocks import ours  # noqa: E402
from moe_py.hf.families import hf_tensor, router_of, tensor_map  # noqa: E402

D = 16
# family -> (module, block class, config class, config fields)
BLOCKS = {
    "mixtral": ("mixtral", "MixtralSparseMoeBlock", "MixtralConfig",
                dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("qwen2_moe", "Qwen2MoeSparseMoeBlock", "Qwen2MoeConfig",
                  dict(moe_intermediate_size=12, shared_expert_intermediate_size=20, num_experts=5,
                       num_experts_per_tok=2, norm_topk_prob=False)),
    "qwen3_moe": ("qwen3_moe", "Qwen3MoeSparseMoeBlock", "Qwen3MoeConfig",
                  dict(moe_intermediate_size=12, num_experts=6, num_experts_per_tok=2, norm_topk_prob=True)),
    "olmoe": ("olmoe", "OlmoeSparseMoeBlock", "OlmoeConfig",
              dict(intermediate_size=12, num_experts=8, num_experts_per_tok=3)),
    "qwen3_next": ("qwen3_next", "Qwen3NextSparseMoeBlock", "Qwen3NextConfig",
                   dict(moe_intermediate_size=12, shared_expert_intermediate_size=20, num_experts=6,
                        num_experts_per_tok=2, norm_topk_prob=True)),
    "granitemoe": ("granitemoe", "GraniteMoeMoE", "GraniteMoeConfig",
                   dict(intermediate_size=12, num_local_experts=5, num_experts_per_tok=2)),
    "deepseek_v2": ("deepseek_v2", "DeepseekV2Moe", "DeepseekV2Config",
                    dict(moe_intermediate_size=12, n_routed_experts=8, num_experts_per_tok=3, n_group=4,
                         topk_group=2, topk_method="group_limited_greedy", n_shared_experts=1,
                         routed_scaling_factor=1.5, num_attention_heads=4, num_key_value_heads=4)),
    "ernie4_5_moe": ("ernie4_5_moe", "Ernie4_5_MoeSparseMoeBlock", "Ernie4_5_MoeConfig",
                     dict(moe_intermediate_size=12, moe_num_experts=6, moe_k=2, moe_num_shared_experts=1,
                          moe_norm_min=0.5)),
    "gpt_oss": ("gpt_oss", "GptOssMLP", "GptOssConfig",
                dict(intermediate_size=12, num_local_experts=5, num_experts_per_tok=2, swiglu_limit=0.5)),
    "llama4": ("llama4", "Llama4TextMoe", "Llama4TextConfig",
               dict(intermediate_size=12, intermediate_size_mlp=20, num_local_experts=4, num_experts_per_tok=1)),
    "deepseek_v3": ("deepseek_v3", "DeepseekV3MoE", "DeepseekV3Config",
                    dict(moe_intermediate_size=12, n_routed_experts=8, num_experts_per_tok=3, n_group=4,
                         topk_group=2, n_shared_experts=2, routed_scaling_factor=2.5, norm_topk_prob=True)),
    "glm4_moe": ("glm4_moe", "Glm4MoeMoE", "Glm4MoeConfig",
                 dict(moe_intermediate_size=12, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
                      topk_group=1, n_shared_experts=1, routed_scaling_factor=1.5, norm_topk_prob=False)),
    "dots1": ("dots1", "Dots1MoE", "Dots1Config",
              dict(moe_intermediate_size=12, n_routed_experts=6, num_experts_per_tok=2, n_group=1,
                   topk_group=1, n_shared_experts=1, routed_scaling_factor=1.0, norm_topk_prob=True)),
}


def hf_block(kind, dtype, seed=0):
    module, block_cls, cfg_cls, fields = BLOCKS[kind]
    mod = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
    cfg = getattr(transformers, cfg_cls)(hidden_size=D, **fields)
    torch.manual_seed(seed)
    block = getattr(mod, block_cls)(cfg)
    for name, t in list(block.named_parameters()) + list(block.named_buffers()):
        with torch.no_grad():
            # biases small enough to change some choices, not all
            t.copy_(torch.randn_like(t) * (0.05 if "bias" in name else 0.3))
    return block.to(dtype).eval()


def hf_forward(block, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = block(x)
    out = out[0] if isinstance(out, tuple) else out  # gpt-oss and Llama 4 also return router outputs
    return out.reshape(x.shape)  # Llama 4 returns its tokens flattened


TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-13)}
# HF computes these routers' softmax/sigmoid in float32 even for float64 weights
FLOAT32_ROUTERS = {"llama4", "deepseek_v2", "ernie4_5_moe", "qwen2_moe", "qwen3_moe", "olmoe", "qwen3_next", "granitemoe", "mixtral",
                   "deepseek_v3", "glm4_moe", "dots1"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", sorted(BLOCKS))
def test_from_hf_computes_what_the_block_computes(kind, dtype):
    block = hf_block(kind, dtype)
    m = from_hf(block)
    tol = TOL[torch.float32] if kind in FLOAT32_ROUTERS else TOL[dtype]
    B, S = 3, 7
    x = torch.randn(B, S, D, dtype=dtype)
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[1, 4:] = False  # padding: moe_py routes it nowhere; compare the real tokens
    r = torch.randn(B, S, D, dtype=dtype) * mask[..., None]  # a loss that ignores padding

    gate = router_of(block)
    seen = []  # the router's own outputs: its logits first (Llama 4: its scores, then the logits)
    hook = gate.register_forward_hook(lambda _m, _i, out: seen.append(out))
    xa = x.clone().requires_grad_(True)
    want = hf_forward(block, xa)
    hook.remove()
    (want * r).sum().backward()
    xb = x.clone().requires_grad_(True)
    got, _aux, router = m(xb, padding_mask=mask.numpy())
    (got * r).sum().backward()  # the aux loss is not HF's forward: left out of the gradient

    torch.testing.assert_close(got[mask], want.detach()[mask], **tol)
    logits = seen[0][1 if kind == "llama4" else 0].detach().reshape(B, S, -1)
    torch.testing.assert_close(torch.tensor(router.router_logits).reshape(B, S, -1)[mask], logits.to(dtype)[mask], **tol)
    torch.testing.assert_close(xb.grad[mask], xa.grad[mask], **tol)
    for name, dotted, view in tensor_map(block):
        if name == "expert_bias":  # a selection bias: no gradient on either side
            continue
        mine = ours(m, name).grad
        theirs = view(hf_tensor(block, dotted).grad)
        torch.testing.assert_close(mine, theirs, **tol, msg=lambda s, n=name: f"{n}: {s}")


@pytest.mark.parametrize("kind", sorted(BLOCKS))
def test_to_hf_writes_trained_weights_back(kind):
    block, fresh = hf_block(kind, torch.float32), hf_block(kind, torch.float32, seed=1)
    m = from_hf(block)
    opt = torch.optim.AdamW(m.parameters(), lr=0.05)
    x = torch.randn(4, 6, D)
    y, aux, _ = m(x)
    (y.pow(2).mean() + aux).backward()
    opt.step()
    if m.cfg.traits.expert_bias:
        m.update_expert_bias()
    to_hf(m, fresh)
    with torch.no_grad():
        torch.testing.assert_close(hf_forward(fresh, x), m(x)[0], rtol=1e-5, atol=2e-6)


def test_wrong_blocks_are_refused():
    m = from_hf(hf_block("mixtral", torch.float32))
    with pytest.raises(ValueError, match="block: a Qwen2MoeSparseMoeBlock needs a gated shared expert"):
        to_hf(m, hf_block("qwen2_moe", torch.float32))
    with pytest.raises(ValueError, match="block: gate.weight reads as shape"):
        to_hf(m, hf_block("olmoe", torch.float32))
    with pytest.raises(TypeError, match="block: expected a transformers MoE block"):
        from_hf(torch.nn.Linear(2, 2))
