"""Weights to and from Hugging Face transformers MoE blocks (transformers 5.x layout):
MixtralSparseMoeBlock and Qwen2MoeSparseMoeBlock (whose shared expert becomes a SharedExpert).

The layouts: gate.weight [E, d] is w_router transposed; experts.gate_up_proj [E, 2F, d] holds
W1 (the gate, first F rows) over W3 (the up projection), each transposed; experts.down_proj
[E, d, F] is W2 transposed. Both blocks route with softmax top-k; Mixtral always normalises
the k weights, Qwen2-MoE when config.norm_topk_prob. HF computes the router softmax in
float32 even for float64 weights, so float64 outputs agree only to float32 rounding.
Aux-loss coefficients: HF's load_balancing_loss_func is top_k times moe_py's load balance,
so load_balance_coef = top_k * router_aux_loss_coef; no z-loss or entropy term.
"""
from __future__ import annotations

import torch

from ..config import MoEConfig
from ..torch import TORCH_DTYPES, MoE, SharedExpert


def _kind(block) -> str:
    name = type(block).__name__
    if name == "MixtralSparseMoeBlock":
        return "mixtral"
    if name == "Qwen2MoeSparseMoeBlock":
        return "qwen2_moe"
    raise TypeError(f"block: expected a transformers MixtralSparseMoeBlock or "
                    f"Qwen2MoeSparseMoeBlock, got {name}")


def from_hf(block, router_aux_loss_coef=None):
    """router_aux_loss_coef: HF's coefficient (default: the block's config's, if it has one;
    else moe_py's defaults are kept)."""
    kind = _kind(block)
    experts, gate = block.experts, block.gate
    act = getattr(experts.act_fn, "__class__", type(None)).__name__
    if act not in ("SiLU", "SiLUActivation"):
        raise ValueError(f"block: expected a SiLU (SwiGLU) expert activation, got {act}")
    E, twoF, D = experts.gate_up_proj.shape
    F = twoF // 2
    dtype = experts.gate_up_proj.dtype
    if dtype not in TORCH_DTYPES:
        raise TypeError(f"block: expected float32 or float64 weights, got {dtype}")
    normalize = True if kind == "mixtral" else bool(gate.norm_topk_prob)
    if router_aux_loss_coef is None:
        router_aux_loss_coef = getattr(getattr(block, "config", None), "router_aux_loss_coef", None)
    coefs = {} if router_aux_loss_coef is None else dict(
        load_balance_coef=gate.top_k * float(router_aux_loss_coef), z_loss_coef=0.0, entropy_coef=0.0)
    cfg = MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=gate.top_k, normalize_topk=normalize,
                    dtype=TORCH_DTYPES[dtype], **coefs)
    m = MoE(cfg)
    if kind == "qwen2_moe":
        sh = block.shared_expert
        m.shared = SharedExpert(D, sh.gate_proj.out_features, dtype)
    to_module(block, m)
    return m


def to_module(block, m) -> None:
    """Copy a block's weights into the module m (in place: the C++ layer sees them)."""
    with torch.no_grad():
        gu = block.experts.gate_up_proj.detach()
        F = gu.shape[1] // 2
        m.w_router.copy_(block.gate.weight.detach().t())
        m.w1.copy_(gu[:, :F, :].transpose(1, 2))
        m.w3.copy_(gu[:, F:, :].transpose(1, 2))
        m.w2.copy_(block.experts.down_proj.detach().transpose(1, 2))
        if m.shared is not None:
            sh = block.shared_expert
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(m.shared, name).weight.copy_(getattr(sh, name).weight)
            m.shared.gate.weight.copy_(block.shared_expert_gate.weight)


def to_hf(m, block) -> None:
    """Write the module's weights into a block of the same kind and shape."""
    kind = _kind(block)
    if (kind == "qwen2_moe") != (m.shared is not None):
        raise ValueError("block: a Qwen2-MoE block needs a module with a shared expert, and a "
                         "Mixtral block one without")
    with torch.no_grad():
        gu = block.experts.gate_up_proj
        want = (m.cfg.num_experts, 2 * m.cfg.d_ff, m.cfg.d_model)
        if tuple(gu.shape) != want:
            raise ValueError(f"block: experts.gate_up_proj has shape {list(gu.shape)}, expected {list(want)}")
        block.gate.weight.copy_(m.w_router.detach().t())
        gu[:, :m.cfg.d_ff, :].copy_(m.w1.detach().transpose(1, 2))
        gu[:, m.cfg.d_ff:, :].copy_(m.w3.detach().transpose(1, 2))
        block.experts.down_proj.copy_(m.w2.detach().transpose(1, 2))
        if m.shared is not None:
            sh = block.shared_expert
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(sh, name).weight.copy_(getattr(m.shared, name).weight)
            block.shared_expert_gate.weight.copy_(m.shared.gate.weight)
