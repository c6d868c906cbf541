"""Weights to and from Hugging Face transformers MoE blocks (transformers 5.x): from_hf(block)
builds a moe_py.torch.MoE computing what the block computes; to_hf(moe, block) writes its
weights back. The supported blocks, how their routers map onto moe_py's and how each tensor
is laid out: families.py.

Aux-loss coefficients: HF's load_balancing_loss_func is top_k times moe_py's load balance, so
load_balance_coef = top_k * router_aux_loss_coef; no z-loss or entropy term. A block whose
config has no router_aux_loss_coef (the aux-loss-free sigmoid families) keeps moe_py's
defaults unless one is given.
"""
from __future__ import annotations

from typing import Any, Dict

import torch

from ..config import MoEConfig
from ..torch import TORCH_DTYPES, MoE, SharedExpert
from .experts_backend import activation_of
from .families import experts_layout, family_of, hf_tensor, router_of, shared_kind, tensor_map


def from_hf(block, router_aux_loss_coef=None) -> MoE:
    """router_aux_loss_coef: HF's coefficient (default: the block's config's, if it has one;
    else moe_py's defaults are kept)."""
    fam = family_of(block)
    experts, router = block.experts, router_of(block)
    try:
        ffn = activation_of(experts, fam.layout)
    except NotImplementedError as e:
        raise ValueError(f"block: its experts are not expressible in moe_py ({e})") from None
    layout = experts_layout(block)
    w1 = hf_tensor(block, "experts.gate_up_proj")
    dtype = w1.dtype
    if dtype not in TORCH_DTYPES:
        raise TypeError(f"block: expected float32 or float64 weights, got {dtype}")
    E, D = w1.shape[0], router.weight.shape[1]
    F = experts.down_proj.shape[1 if layout.is_transposed else 2]
    if router_aux_loss_coef is None:
        router_aux_loss_coef = getattr(getattr(block, "config", None), "router_aux_loss_coef", None)
    coefs = {} if router_aux_loss_coef is None else dict(
        load_balance_coef=router.top_k * float(router_aux_loss_coef), z_loss_coef=0.0, entropy_coef=0.0)
    shared: Dict[str, Any] = {}
    if shared_kind(block) is not None:
        mlp = getattr(block, fam.shared_attr)
        if any(getattr(getattr(mlp, n), "bias", None) is not None for n in ("gate_proj", "up_proj", "down_proj")):
            raise ValueError(f"block: its shared expert {fam.shared_attr} has biases (use_bias/mlp_bias), "
                             "which moe_py's shared experts do not")
    if shared_kind(block) == "plain":
        shared = dict(num_shared_experts=1, shared_d_ff=hf_tensor(block, f"{fam.shared_attr}.gate_proj.weight").shape[0])
    cfg = MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=router.top_k, dtype=TORCH_DTYPES[dtype],
                    **ffn, **fam.router(block), **shared, **coefs)
    m = MoE(cfg)
    if shared_kind(block) == "gated":
        m.shared = SharedExpert(D, hf_tensor(block, f"{fam.shared_attr}.gate_proj.weight").shape[0], dtype)
    _copy(m, block, to_block=False)
    return m


def to_hf(m: MoE, block) -> None:
    """Write the module's weights (and the router's selection bias) into a block of the same
    family and shapes."""
    gated = shared_kind(block) == "gated"
    if gated != (m.shared is not None):
        need = "needs a" if gated else "has no"
        raise ValueError(f"block: a {type(block).__name__} {need} gated shared expert; this module "
                         f"has {'one' if m.shared is not None else 'none'}")
    _copy(m, block, to_block=True)


def ours(m: MoE, name: str) -> torch.Tensor:
    """Our side of a tensor_map triple, sharing memory with the module (and its C++ layer)."""
    if name == "expert_bias":
        return torch.from_numpy(m.layer.router.expert_bias)
    return m.get_parameter(name)


def _copy(m: MoE, block, to_block: bool) -> None:
    pairs = [(name, dotted, ours(m, name), view(hf_tensor(block, dotted))) for name, dotted, view in tensor_map(block)]
    for name, dotted, mine, theirs in pairs:  # all checked before any is written
        if tuple(mine.shape) != tuple(theirs.shape):
            raise ValueError(f"block: {dotted} reads as shape {list(theirs.shape)}, the module's "
                             f"{name} has {list(mine.shape)}")
    with torch.no_grad():
        for _, _, mine, theirs in pairs:
            (theirs if to_block else mine).copy_(mine if to_block else theirs)
