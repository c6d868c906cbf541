"""experts_implementation="moe_py": whole transformers models against their own "eager" experts
(the independent reference), every gradient included, and the layouts against transformers'
batched_mm backend."""
import copy
import gc
import subprocess
import sys
import weakref

import numpy as np
import pytest

from moe_py.testing import BF16_REL_FRO

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import moe_py.hf  # noqa: E402,F401  (registers the backend)
from moe_py.hf import experts_backend  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.integrations.moe import batched_mm_experts_forward, use_experts_implementation  # noqa: E402

TINY = dict(vocab_size=64, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def tiny_configs():
    return {
        "qwen3_moe": transformers.Qwen3MoeConfig(**TINY, intermediate_size=40, moe_intermediate_size=24, head_dim=12,
                                                 num_experts=6, num_experts_per_tok=2, norm_topk_prob=True),
        "mixtral": transformers.MixtralConfig(**TINY, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2),
        "olmoe": transformers.OlmoeConfig(**TINY, intermediate_size=24, num_experts=8, num_experts_per_tok=3),
        "deepseek_v3": transformers.DeepseekV3Config(
            **{**TINY, "num_key_value_heads": 4}, intermediate_size=40, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
            n_group=2, topk_group=1, n_shared_experts=1, first_k_dense_replace=0, q_lora_rank=None,
            kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12),
        # clamped SwiGLU with biases, interleaved and transposed; a small limit so the clamps act
        "gpt_oss": transformers.GptOssConfig(**TINY, intermediate_size=24, num_local_experts=4,
                                             num_experts_per_tok=2, head_dim=12, swiglu_limit=0.3),
    }


def model_pair(kind, dtype):
    """The same random model with transformers' eager experts and with moe_py's."""
    cfg = tiny_configs()[kind]
    torch.manual_seed(0)
    eager = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), experts_implementation="eager", dtype=dtype)
    with torch.no_grad():
        for p in eager.parameters():  # away from init's zeros/ones so every path carries signal
            p.add_(0.05 * torch.randn_like(p))
    ours = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), experts_implementation="moe_py", dtype=dtype)
    ours.load_state_dict(eager.state_dict())
    return eager, ours


def loss_and_grads(model, ids, mask):
    model.zero_grad()
    loss = model(ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral", "olmoe", "deepseek_v3", "gpt_oss"])
def test_a_model_trains_as_with_eager_experts(kind, dtype, rtol):
    eager, ours = model_pair(kind, dtype)
    ids = torch.randint(0, 64, (3, 10))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # padding reaches the experts in HF models; both backends see the same rows
    want, want_g = loss_and_grads(eager, ids, mask)
    got, got_g = loss_and_grads(ours, ids, mask)
    torch.testing.assert_close(got, want, rtol=rtol, atol=0)
    assert got_g.keys() == want_g.keys()
    # the router's weight gets a gradient (gpt-oss calls it "router", the others "gate")
    assert any(("gate" in n or "router" in n) and "experts" not in n for n in got_g)
    for n in want_g:
        scale = want_g[n].abs().max()
        assert scale > 0, n
        assert (got_g[n] - want_g[n]).abs().max() <= rtol * 10 * scale, n

    # an optimiser step changes the weights in place: the next forward must see them
    for model in (eager, ours):
        torch.optim.SGD(model.parameters(), lr=0.5).step()
    torch.testing.assert_close(loss_and_grads(ours, ids, mask)[0], loss_and_grads(eager, ids, mask)[0],
                               rtol=rtol, atol=0)


def experts_of(model):
    return [m for m in model.modules() if hasattr(m, "_moe_py_cache")]


def test_the_experts_are_rebuilt_only_after_an_update():
    _, ours = model_pair("qwen3_moe", torch.float32)
    ids = torch.randint(0, 64, (2, 6))
    ours(ids)
    first = [m._moe_py_cache.experts for m in experts_of(ours)]
    assert len(first) == 2
    ours(ids)
    assert [m._moe_py_cache.experts for m in experts_of(ours)] == first
    with torch.no_grad():
        experts_of(ours)[0].down_proj.mul_(2)
    ours(ids)
    now = [m._moe_py_cache.experts for m in experts_of(ours)]
    assert now[0] is not first[0] and now[1] is first[1]


@pytest.mark.parametrize("kind, dtype, linear", [("qwen3_moe", torch.float32, True), ("olmoe", torch.float64, True),
                                                  ("gpt_oss", torch.float32, False), ("qwen3_moe", torch.bfloat16, True)])
def test_the_default_layout_is_read_and_written_in_place(kind, dtype, linear):
    """nn.Linear-layout experts in float32/float64: the kernels read HF's own memory and the
    weight gradients need no copy; bfloat16 ones, a float32 copy in the same layout;
    transposed or interleaved ones (gpt-oss) go through a column-layout copy."""
    _, ours = model_pair(kind, dtype)
    ours(torch.randint(0, 64, (2, 6))).logits.sum().backward()
    mod = experts_of(ours)[0]
    routed = mod._moe_py_cache.experts
    assert routed.layout == ("linear" if linear else "column")
    if dtype != torch.bfloat16:
        assert np.shares_memory(routed.params["w1"], mod.gate_up_proj.detach().numpy()) == linear


def test_changing_the_weights_between_forward_and_backward_raises_as_with_eager():
    for impl in ("eager", "moe_py"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_configs()["qwen3_moe"], experts_implementation=impl)
        loss = model(torch.randint(0, 64, (2, 6))).logits.sum()
        with torch.no_grad():
            next(m for m in model.modules() if hasattr(m, "gate_up_proj")).gate_up_proj.mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


def make_experts(d=12, f=10, e=5, **flags):
    """A standalone experts module of the given layout (as transformers' decorated classes)."""
    class Experts(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.num_experts, t = e, flags.get("is_transposed", False)
            up = 2 * f if flags.get("has_gate", True) else f
            self.register_parameter("gate_up_proj" if flags.get("has_gate", True) else "up_proj",
                                    torch.nn.Parameter(torch.randn((e, d, up) if t else (e, up, d), dtype=torch.float64)))
            self.down_proj = torch.nn.Parameter(torch.randn((e, f, d) if t else (e, d, f), dtype=torch.float64))
            if flags.get("has_bias", False):
                first = "gate_up_proj" if flags.get("has_gate", True) else "up_proj"
                self.register_parameter(first + "_bias", torch.nn.Parameter(torch.randn(e, up, dtype=torch.float64)))
                self.down_proj_bias = torch.nn.Parameter(torch.randn(e, d, dtype=torch.float64))
            self.act_fn = torch.nn.SiLU() if flags.get("has_gate", True) else torch.nn.GELU()

    cls = use_experts_implementation(Experts, **flags)
    return cls(transformers.PretrainedConfig())


@pytest.mark.parametrize("flags", [{}, {"is_transposed": True}, {"has_gate": False},
                                   {"has_gate": False, "is_transposed": True}, {"has_bias": True},
                                   {"has_bias": True, "is_transposed": True, "has_gate": False}])
def test_every_layout_matches_transformers_batched_mm(flags):
    torch.manual_seed(1)
    mod = make_experts(**flags)
    x = torch.randn(9, 12, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, 5, (9, 2))
    w = torch.rand(9, 2, dtype=torch.float64, requires_grad=True)
    results = []
    for fn in (batched_mm_experts_forward, experts_backend.moe_py_experts_forward):
        mod.zero_grad()
        x.grad = w.grad = None
        y = fn(mod, x, idx, w)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)).sum().backward()
        results.append([y.detach(), x.grad, w.grad] + [p.grad.clone() for p in mod.parameters()])
    for got, want in zip(*reversed(results)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_bfloat16_weights_run_bfloat16_compute_and_keep_the_dtypes():
    eager, ours = model_pair("qwen3_moe", torch.float32)
    ours.to(torch.bfloat16)
    ids = torch.randint(0, 64, (2, 8))
    loss = ours(ids, labels=ids).loss
    loss.backward()
    for p in ours.parameters():
        assert p.grad is not None and p.grad.dtype == torch.bfloat16
    want = eager(ids, labels=ids).loss.detach()
    # bfloat16 weights and activations (8 mantissa bits) against the float32 model
    assert abs(loss.item() - want.item()) < 0.05 * abs(want.item())


@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])
def test_bfloat16_weights_are_seen_after_an_optimiser_step(kind):
    """Their float32 copies (HF's layout, or the column layout for gpt-oss) are refilled in
    the module's buffers on the step and the packs remade (keyed on torch's versions, no
    fingerprint): the next loss and gradients are those of a fresh model holding the stepped
    weights."""
    _, ours = model_pair(kind, torch.float32)
    ours.to(torch.bfloat16)
    ids = torch.randint(0, 64, (2, 8))
    before = ours(ids, labels=ids).loss
    before.backward()
    buffers = [b.data_ptr() for b in experts_of(ours)[0]._moe_py_copies]
    torch.optim.SGD(ours.parameters(), lr=0.5).step()
    after, grads = loss_and_grads(ours, ids, None)
    assert [b.data_ptr() for b in experts_of(ours)[0]._moe_py_copies] == buffers  # refilled, not new
    _, fresh = model_pair(kind, torch.float32)
    fresh.to(torch.bfloat16)
    fresh.load_state_dict(ours.state_dict())
    want, want_grads = loss_and_grads(fresh, ids, None)
    assert torch.equal(after, want) and not torch.equal(after, before.detach())
    assert all(torch.equal(grads[n], want_grads[n]) for n in want_grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_update_frees_the_previous_experts_at_once(dtype):
    """The forward after an optimiser step releases the experts built before it, so they
    (packs, copies' users, the step's saved activations) go then, not at some later cyclic
    garbage collection: left to it, hundreds of MB a step were faulted in anew."""
    _, ours = model_pair("qwen3_moe", torch.float32)
    ours.to(dtype)
    ids = torch.randint(0, 64, (2, 8))
    opt = torch.optim.SGD(ours.parameters(), lr=0.1)
    gc.disable()
    try:
        ours(ids, labels=ids).loss.backward()
        before = [weakref.ref(m._moe_py_cache.experts) for m in experts_of(ours)]
        opt.step()
        ours(ids, labels=ids).loss.backward()
        assert all(r() is None for r in before)
    finally:
        gc.enable()


def test_unsupported_flags_raise_naming_them():
    x, idx, w = torch.randn(4, 12), torch.zeros(4, 2, dtype=torch.long), torch.rand(4, 2)
    mod = make_experts(has_post_expert_norm=True)
    with pytest.raises(NotImplementedError, match="has_post_expert_norm"):
        experts_backend.moe_py_experts_forward(mod, x.double(), idx, w.double())
    mod = make_experts(is_concatenated=False)  # interleaved needs the module's own gate (gpt-oss)
    with pytest.raises(NotImplementedError, match="is_concatenated"):
        experts_backend.moe_py_experts_forward(mod, x.double(), idx, w.double())
    mod = make_experts()
    mod.act_fn = torch.nn.GELU()
    with pytest.raises(NotImplementedError, match="act_fn GELU"):
        experts_backend.moe_py_experts_forward(mod, x.double(), idx, w.double())
    mod = make_experts()
    type(mod)._apply_gate = lambda self, gate_up: gate_up.chunk(2, dim=-1)[0]
    with pytest.raises(NotImplementedError, match="has its own _apply_gate"):
        experts_backend.moe_py_experts_forward(mod, x.double(), idx, w.double())


def test_moe_py_does_not_import_transformers_until_moe_py_hf():
    code = "import sys, moe_py, moe_py.torch; assert 'transformers' not in sys.modules; " \
           "import moe_py.hf; assert 'transformers' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_activation_checkpointing_recomputes_the_same_experts():
    eager, ours = model_pair("qwen3_moe", torch.float64)
    ids = torch.randint(0, 64, (2, 9))
    for model in (eager, ours):
        model.train()
        model.activation_checkpointing_enable()
    want, want_g = loss_and_grads(eager, ids, torch.ones_like(ids))
    got, got_g = loss_and_grads(ours, ids, torch.ones_like(ids))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    for n in want_g:
        torch.testing.assert_close(got_g[n], want_g[n], rtol=1e-10, atol=1e-12)


def test_under_autocast_the_model_trains_with_float32_gradients():
    eager, ours = model_pair("qwen3_moe", torch.float32)
    ids = torch.randint(0, 64, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ours(ids, labels=ids).loss
        want = eager(ids, labels=ids).loss
    got.backward()
    assert all(p.grad.dtype == torch.float32 for p in ours.parameters() if p.grad is not None)
    assert abs(got.item() - want.item()) < 1e-2 * abs(want.item())  # both ran their experts in bf16


def test_under_autocast_float32_experts_compute_in_bfloat16():
    """float32 weights inside autocast: bfloat16 GEMM operands with float32 sums, against
    transformers' batched_mm in float64 on the rounded weights and inputs (the one rounding
    it skips, of the activation before down_proj, is within the testing kit's bound)."""
    torch.manual_seed(4)
    mod = make_experts(d=32, f=24, e=4).float()
    x = torch.randn(40, 32)
    idx = torch.stack([torch.randint(0, 4, (40,)), torch.randint(0, 4, (40,))], 1)
    idx[:, 1] = (idx[:, 0] + 1) % 4
    w = torch.rand(40, 2)
    plain = experts_backend.moe_py_experts_forward(mod, x, idx, w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = experts_backend.moe_py_experts_forward(mod, x, idx, w)
    ref = make_experts(d=32, f=24, e=4)
    with torch.no_grad():
        for p, q in zip(ref.parameters(), mod.parameters()):
            p.copy_(q.bfloat16().double())
        want = batched_mm_experts_forward(ref, x.bfloat16().double(), idx, w.double())
    assert got.dtype == torch.float32 and not torch.equal(got, plain)
    err = float((got.detach().double() - want).norm() / want.norm())
    assert err < BF16_REL_FRO, err
