"""The transformers experts implementation "moe_py": HF's routing, moe_py's expert kernels.

    import moe_py.hf                       # registers "moe_py" in transformers' ExpertsInterface
    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="moe_py")

transformers (5.x) sends every experts forward of a model decorated with
@use_experts_implementation through `fn(experts, hidden_states, top_k_index, top_k_weights)`;
this `fn` runs y[t] = sum_j top_k_weights[t, j] * FFN_{top_k_index[t, j]}(hidden_states[t])
on moe_py.RoutedExperts (the layer's own kernels and dispatch) inside one autograd Function,
so gradients reach hidden_states, gate_up_proj, down_proj and top_k_weights (the HF router
trains through it as through "eager").

Weights: the kernels want w1, w3 [E, d, F] and w2 [E, F, d] contiguous; HF keeps
gate_up_proj [E, 2F, d] (gate rows over up rows) and down_proj [E, d, F], or their transposes
(is_transposed), with gate and up interleaved when not is_concatenated. `_LAYOUT` reads our
three matrices as views of HF's tensors; the same views write our gradients back into HF's
layout. The contiguous copy is made once per parameter update, not once per forward: a cache
on the experts module is keyed on each parameter's storage and torch's version counter
(`tensor._version`, which every in-place update, an optimiser step included, increments).

Supported: gated experts whose act_fn is SiLU (SwiGLU), ungated ones (has_gate=False) whose
act_fn is the erf GELU; float32, float64, and bfloat16 by conversion (parameters and inputs
are upcast to float32, the output and gradients rounded back to bfloat16; the bf16 kernels of
the bf16 issue do not exist yet). Anything else (another activation, a custom _apply_gate,
biases, has_post_expert_norm, expert parallelism) raises NotImplementedError naming it:
never a silently different function.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Tuple

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from .. import _kernels
from ..config import MoEConfig
from ..routed_experts import RoutedExperts

NAME = "moe_py"
# the float dtype moe_py computes in, by the torch dtype of the expert weights
_COMPUTE = {torch.float32: torch.float32, torch.float64: torch.float64, torch.bfloat16: torch.float32}


def expert_view(experts, name: str, hf_tensor: torch.Tensor) -> torch.Tensor:
    """Our expert matrix `name` (w1: gate, w3: up [E, d, F]; w2 [E, F, d]) as a view of a tensor
    laid out as HF's gate_up_proj (or up_proj) for w1/w3, or down_proj for w2."""
    t = hf_tensor if experts.is_transposed else hf_tensor.transpose(1, 2)  # HF: [E, out, in]
    if name == "w2" or not experts.has_gate:
        return t
    F = t.shape[2] // 2
    if experts.is_concatenated:
        return t[:, :, :F] if name == "w1" else t[:, :, F:]
    return t[:, :, 0::2] if name == "w1" else t[:, :, 1::2]


def _views(experts, gate_up: torch.Tensor, down: torch.Tensor) -> Dict[str, torch.Tensor]:
    names = ("w1", "w3") if experts.has_gate else ("w1",)
    return {**{n: expert_view(experts, n, gate_up) for n in names}, "w2": expert_view(experts, "w2", down)}


def _hf_params(experts) -> Tuple[torch.Tensor, torch.Tensor]:
    first = experts.gate_up_proj if experts.has_gate else experts.up_proj
    return first, experts.down_proj


def activation_of(experts) -> str:
    """Our activation for the module's gate, or NotImplementedError naming what differs."""
    from transformers.activations import GELUActivation, SiLUActivation
    from transformers.integrations import moe as hf_moe

    name = type(experts).__name__
    for flag in ("has_bias", "has_post_expert_norm", "_is_expert_parallel"):
        if getattr(experts, flag, False):
            raise NotImplementedError(f"experts_implementation={NAME!r}: {name}.{flag}=True is not supported")
    act = experts.act_fn
    if experts.has_gate:
        if type(experts)._apply_gate is not hf_moe._default_apply_gate:
            raise NotImplementedError(f"experts_implementation={NAME!r}: {name} has its own _apply_gate")
        if not experts.is_concatenated:  # HF's default gate splits [gate; up] whatever the flag says
            raise NotImplementedError(f"experts_implementation={NAME!r}: {name}.is_concatenated=False "
                                      "with transformers' default _apply_gate")
        if isinstance(act, (torch.nn.SiLU, SiLUActivation)):
            return "swiglu"
        raise NotImplementedError(f"experts_implementation={NAME!r}: {name}.act_fn "
                                  f"{type(act).__name__} (gated experts need SiLU)")
    if isinstance(act, torch.nn.GELU) and act.approximate == "none" or \
            isinstance(act, GELUActivation) and act.act is torch.nn.functional.gelu:
        return "gelu"
    raise NotImplementedError(f"experts_implementation={NAME!r}: {name}.act_fn {type(act).__name__} "
                              f"(ungated experts need the erf GELU)")


class _Cached(NamedTuple):
    key: tuple
    experts: RoutedExperts


def _routed_experts(experts, k: int) -> RoutedExperts:
    """The module's weights in moe_py's layout, converted when they changed since last time."""
    params = _hf_params(experts)
    key = tuple((p.data_ptr(), p._version, p.dtype, tuple(p.shape)) for p in params) + (k,)
    cached = getattr(experts, "_moe_py_cache", None)
    if cached is not None and cached.key == key:
        return cached.experts
    activation = activation_of(experts)
    dtype = params[0].dtype
    if dtype not in _COMPUTE:
        raise TypeError(f"experts_implementation={NAME!r}: expert weights of dtype {dtype} "
                        "(float32, float64 or bfloat16 expected)")
    compute = _COMPUTE[dtype]
    with torch.no_grad():
        ours = {n: v.to(compute).contiguous().numpy().copy() for n, v in _views(experts, *params).items()}
    E, D, F = ours["w1"].shape
    cfg = MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=min(k, E), activation=activation,
                    dtype=str(compute).removeprefix("torch."))
    routed = RoutedExperts(cfg, params=ours, grads={})
    experts._moe_py_cache = _Cached(key, routed)  # replaced, never edited: a pending backward keeps its arrays
    return routed


class RoutedExpertsFunction(torch.autograd.Function):
    """y of one experts forward; one C++ backward gives d hidden_states, d top_k_weights and
    the gradients of the HF expert parameters (in HF's layout and dtype)."""

    @staticmethod
    def forward(ctx, experts, hidden_states, top_k_index, top_k_weights, *params):
        routed = _routed_experts(experts, top_k_index.shape[-1])
        compute = torch.float64 if routed.cfg.dtype == "float64" else torch.float32
        x = hidden_states.detach().to(compute).contiguous().numpy()
        w = top_k_weights.detach().to(compute).contiguous().numpy()
        out = routed(x, top_k_index.detach().numpy(), w)
        ctx.experts, ctx.routed, ctx.out = experts, routed, out
        ctx.dtypes = (hidden_states.dtype, top_k_weights.dtype)
        return torch.from_numpy(out.y).to(hidden_states.dtype)

    @staticmethod
    @once_differentiable  # the backward is C++: a second derivative raises instead of being 0
    def backward(ctx, dy):
        routed: RoutedExperts = ctx.routed
        fresh = {n: _kernels.zeros(a.shape, a.dtype) for n, a in routed.params.items()}
        compute = torch.float64 if routed.cfg.dtype == "float64" else torch.float32
        dx, dw = ctx.out.backward(dy.detach().to(compute).contiguous().numpy(), grads=fresh)
        params = _hf_params(ctx.experts)
        hf_grads = [torch.zeros(p.shape, dtype=compute) for p in params]
        for name, view in _views(ctx.experts, *hf_grads).items():
            view.copy_(torch.from_numpy(fresh[name]))
        x_dtype, w_dtype = ctx.dtypes
        return (None, torch.from_numpy(dx).to(x_dtype), None, torch.from_numpy(dw).to(w_dtype),
                *(g.to(p.dtype) for g, p in zip(hf_grads, params)))


def moe_py_experts_forward(experts, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' experts-function signature: hidden_states [T, d], top_k_index and
    top_k_weights [T, k] -> [T, d] in hidden_states' dtype."""
    if hidden_states.device.type != "cpu":
        raise ValueError(f"hidden_states: moe_py runs on the CPU; got a tensor on {hidden_states.device}")
    return RoutedExpertsFunction.apply(experts, hidden_states, top_k_index, top_k_weights,
                                       *_hf_params(experts))


def register() -> None:
    """Make "moe_py" a valid experts_implementation (idempotent)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(NAME, moe_py_experts_forward)
