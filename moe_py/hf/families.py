"""What each supported transformers MoE block is in moe_py's terms: its router as MoEConfig
fields, where its router and shared expert live, and how its tensors map onto ours.

A block is read through one table of (our tensor, HF tensor, view) triples (`tensor_map`):
from_hf copies each HF view into ours, to_hf ours into the HF view, and the tests compare
gradients through the same views, so the layout is written down once.

Router semantics per family (transformers 5.24.0), and how they map:
- mixtral, qwen2_moe, qwen3_moe, olmoe, qwen3_next: softmax over all experts, top-k, the k
  weights renormalised when `norm_topk_prob` (Mixtral: always) -> softmax_topk.
- granitemoe: top-k of the logits, then a softmax over those k. exp(z_i) / sum_{j in top-k}
  exp(z_j) is the softmax's top-k renormalised, and the top-k logits are the top-k
  probabilities, so this is softmax_topk with normalize_topk=True (equal up to rounding).
- deepseek_v2: softmax, top-k ("greedy") or group-limited ("group_limited_greedy": a group
  scores its best probability; HF masks the other groups with 0.0, moe_py with -inf, the same
  choice since every probability is > 0), never renormalised, times routed_scaling_factor
  -> softmax_topk with group_score="max".
- ernie4_5_moe: softmax; selection by probability + e_score_correction_bias (a selection-only
  bias, [1, E] in HF); the chosen probabilities divided by max(their sum, norm_min) ->
  softmax_topk with the bias loaded (frozen: bias_update_rate 0) and topk_norm_min.
- gpt_oss: logits with a learned bias, top-k of them, a softmax over the k -> softmax_topk
  with normalize_topk and router_bias; its experts are clamped SwiGLU with biases, stored
  transposed with gate and up interleaved.
- llama4 (Llama4TextMoe): top-k logits, sigmoid of each, the score multiplying the expert's
  input (every expert runs on every token, the others on 0 * x, which adds nothing to bias-free
  experts) -> sigmoid_topk unnormalised with combine="input"; its experts lack
  @use_experts_implementation, so their layout (transposed, [gate; up]) is written here.
- deepseek_v3, glm4_moe, dots1: sigmoid scores; selection by score + e_score_correction_bias,
  limited to the `topk_group` best of `n_group` groups (a group scores the sum of its two best
  biased scores; the other groups are masked with -inf in 5.24.0, as in moe_py's kernel); the
  unbiased scores of the chosen experts, renormalised when `norm_topk_prob` (HF adds 1e-20 to
  the denominator), times `routed_scaling_factor` -> sigmoid_topk with the bias loaded into
  the router's expert_bias. HF computes these routers in float32 even for float64 weights,
  so float64 blocks agree to float32 rounding.
Shared experts: DeepSeek-V2/V3, Ernie 4.5, GLM4 and dots1's plain SwiGLU MLP (width moe_intermediate_size *
n_shared_experts) is moe_py's own shared expert (num_shared_experts=1); Qwen2-MoE's and
Qwen3-Next's are sigmoid-gated (sigmoid(x g) * MLP(x)), kept as the torch SharedExpert.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .experts_backend import Layout, expert_view, hf_names, layout_of


@dataclass(frozen=True)
class Family:
    router_attr: str  # the block's router submodule
    router: Callable[[object], Dict]  # block -> MoEConfig router fields
    bias: str = ""  # the router's selection bias, dotted from the block ("": none)
    shared: Optional[str] = None  # None, "plain" (moe_py's shared expert) or "gated" (SharedExpert)
    shared_attr: str = ""  # the block's shared MLP submodule (a block may set it to None)
    layout: Optional[Layout] = None  # the experts' layout when they lack @use_experts_implementation


def _softmax(block) -> Dict:
    return dict(router="softmax_topk", normalize_topk=bool(getattr(block.gate, "norm_topk_prob", True)))


def _softmax_over_topk_logits(block) -> Dict:
    return dict(router="softmax_topk", normalize_topk=True)


def _softmax_deepseek_v2(block) -> Dict:
    g = block.gate
    grouped = g.topk_method == "group_limited_greedy"
    if g.topk_method not in ("greedy", "group_limited_greedy"):
        raise ValueError(f"block: DeepSeek-V2 topk_method {g.topk_method!r} (greedy or group_limited_greedy)")
    return dict(router="softmax_topk", normalize_topk=False, routed_scaling_factor=float(g.routed_scaling_factor),
                **(dict(n_group=int(g.num_group), topk_group=int(g.topk_group), group_score="max") if grouped else {}))


def _softmax_ernie(block) -> Dict:
    return dict(router="softmax_topk", normalize_topk=True, topk_norm_min=float(block.gate.norm_min),
                bias_update_rate=0.0)


def _softmax_logit_bias(block) -> Dict:
    return dict(router="softmax_topk", normalize_topk=True, router_bias=True)


def _sigmoid_scaled_input(block) -> Dict:
    return dict(router="sigmoid_topk", normalize_topk=False, bias_update_rate=0.0, combine="input")


def _sigmoid_grouped(block) -> Dict:
    g = block.gate
    return dict(router="sigmoid_topk", normalize_topk=bool(g.norm_topk_prob), n_group=int(g.num_group),
                topk_group=int(g.topk_group), routed_scaling_factor=float(g.routed_scaling_factor))


_V3_BIAS = "gate.e_score_correction_bias"
FAMILIES: Dict[str, Family] = {
    "MixtralSparseMoeBlock": Family("gate", _softmax),
    "Qwen3MoeSparseMoeBlock": Family("gate", _softmax),
    "OlmoeSparseMoeBlock": Family("gate", _softmax),
    "Qwen2MoeSparseMoeBlock": Family("gate", _softmax, shared="gated", shared_attr="shared_expert"),
    "Qwen3NextSparseMoeBlock": Family("gate", _softmax, shared="gated", shared_attr="shared_expert"),
    "GraniteMoeMoE": Family("router", _softmax_over_topk_logits),
    "DeepseekV2Moe": Family("gate", _softmax_deepseek_v2, shared="plain", shared_attr="shared_experts"),
    "Ernie4_5_MoeSparseMoeBlock": Family("gate", _softmax_ernie, "gate.moe_statics.e_score_correction_bias",
                                         shared="plain", shared_attr="shared_experts"),
    "GptOssMLP": Family("router", _softmax_logit_bias),
    "Llama4TextMoe": Family("router", _sigmoid_scaled_input, shared="plain", shared_attr="shared_expert",
                            layout=Layout(is_transposed=True, is_concatenated=True, has_gate=True, has_bias=False)),
    "DeepseekV3MoE": Family("gate", _sigmoid_grouped, _V3_BIAS, shared="plain", shared_attr="shared_experts"),
    "Glm4MoeMoE": Family("gate", _sigmoid_grouped, _V3_BIAS, shared="plain", shared_attr="shared_experts"),
    "Dots1MoE": Family("gate", _sigmoid_grouped, _V3_BIAS, shared="plain", shared_attr="shared_experts"),
}


def family_of(block) -> Family:
    name = type(block).__name__
    if name not in FAMILIES:
        raise TypeError(f"block: expected a transformers MoE block of {sorted(FAMILIES)}, got {name}")
    return FAMILIES[name]


def router_of(block):
    return getattr(block, family_of(block).router_attr)


def experts_layout(block) -> Layout:
    fam = family_of(block)
    return fam.layout if fam.layout is not None else layout_of(block.experts)


def shared_kind(block) -> Optional[str]:
    """The block's shared expert: None, "plain" or "gated" (Ernie 4.5 may have none)."""
    fam = family_of(block)
    if fam.shared is None or getattr(block, fam.shared_attr, None) is None:
        return None
    return fam.shared


def _transposed(t: torch.Tensor) -> torch.Tensor:
    return t.t()


def _expert_axis(t: torch.Tensor) -> torch.Tensor:  # an nn.Linear weight as a [1, in, out] expert
    return t.t()[None]


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _flat(t: torch.Tensor) -> torch.Tensor:  # Ernie keeps its bias as [1, E]
    return t.reshape(-1)


Triple = Tuple[str, str, Callable[[torch.Tensor], torch.Tensor]]


def tensor_map(block) -> List[Triple]:
    """(our name, the block's dotted tensor name, view of the HF tensor in our layout). Our
    names are the MoE module's parameters, "expert_bias" (the router's selection bias) and
    "shared.*" (the torch SharedExpert)."""
    fam = family_of(block)
    layout = experts_layout(block)
    triples: List[Triple] = [("w_router", f"{fam.router_attr}.weight", _transposed)]
    if fam.router(block).get("router_bias"):
        triples.append(("b_router", f"{fam.router_attr}.bias", _same))
    for name, attr in hf_names(layout):
        triples.append((name, f"experts.{attr}", functools.partial(expert_view, layout, name)))
    if fam.bias:
        triples.append(("expert_bias", fam.bias, _flat))
    shared = shared_kind(block)
    if shared == "plain":
        for ours, hf in (("shared_w1", "gate_proj"), ("shared_w3", "up_proj"), ("shared_w2", "down_proj")):
            triples.append((ours, f"{fam.shared_attr}.{hf}.weight", _expert_axis))
    elif shared == "gated":
        for hf in ("gate_proj", "up_proj", "down_proj"):
            triples.append((f"shared.{hf}.weight", f"{fam.shared_attr}.{hf}.weight", _same))
        triples.append(("shared.gate.weight", "shared_expert_gate.weight", _same))
    return triples


def hf_tensor(block, dotted: str) -> torch.Tensor:
    obj = block
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj
