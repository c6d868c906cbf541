"""moe_py.hf: weights from and to transformers' MoE blocks, checked against the blocks."""
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from moe_py.hf import from_hf, to_hf  # noqa: E402


def hf_blocks(dtype):
    transformers = pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
    torch.manual_seed(0)
    mix = MixtralSparseMoeBlock(transformers.MixtralConfig(
        hidden_size=16, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2))
    qwen = Qwen2MoeSparseMoeBlock(transformers.Qwen2MoeConfig(
        hidden_size=16, moe_intermediate_size=12, shared_expert_intermediate_size=20, num_experts=5,
        num_experts_per_tok=2, norm_topk_prob=False))
    for b in (mix, qwen):
        for p in b.parameters():
            torch.nn.init.normal_(p, std=0.3)
        b.to(dtype).eval()
    return {"mixtral": mix, "qwen2_moe": qwen}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_from_hf_matches_the_hf_block(kind, dtype):
    import warnings
    block = hf_blocks(dtype)[kind]
    m = from_hf(block)
    x = torch.randn(3, 7, 16, dtype=dtype)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = block(x)
    # HF's router softmax runs in float32 even for float64 weights: float32 rounding either way
    torch.testing.assert_close(m(x)[0], want, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_to_hf_writes_trained_weights_back(kind):
    import warnings
    blocks, fresh = hf_blocks(torch.float32), hf_blocks(torch.float32)
    m = from_hf(blocks[kind])
    opt = torch.optim.AdamW(m.parameters(), lr=0.05)
    x = torch.randn(4, 6, 16)
    y, aux, _ = m(x)
    (y.pow(2).mean() + aux).backward()
    opt.step()
    to_hf(m, fresh[kind])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(fresh[kind](x), m(x)[0], rtol=1e-5, atol=2e-6)
    other = "qwen2_moe" if kind == "mixtral" else "mixtral"
    with pytest.raises(ValueError, match="block"):
        to_hf(m, fresh[other])
    with pytest.raises(TypeError, match="block: expected a transformers"):
        from_hf(torch.nn.Linear(2, 2))
