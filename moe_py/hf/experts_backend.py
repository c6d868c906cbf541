"""The transformers experts implementation "moe_py": HF's routing, moe_py's expert kernels.

    import moe_py.hf                       # registers "moe_py" in transformers' ExpertsInterface
    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="moe_py")

transformers (5.x) sends every experts forward of a model decorated with
@use_experts_implementation through `fn(experts, hidden_states, top_k_index, top_k_weights)`;
this `fn` runs y[t] = sum_j top_k_weights[t, j] * FFN_{top_k_index[t, j]}(hidden_states[t])
on moe_py.RoutedExperts (the layer's own kernels and dispatch) inside one autograd Function,
so gradients reach hidden_states, gate_up_proj, down_proj and top_k_weights (the HF router
trains through it as through "eager").

Weights: HF keeps gate_up_proj [E, 2F, d] (gate rows over up rows) and down_proj [E, d, F],
nn.Linear's layout, or their transposes (is_transposed), with gate and up interleaved when not
is_concatenated. `expert_view` reads each of ours (w1 gate, w3 up, w2; biases b1, b3, b2) as
a view of HF's tensors. In the default layout (62 of the 67 families), in float32 and
float64, the kernels read those views in place (RoutedExperts' "linear" layout: each
expert's matrix is contiguous, gate and up are its halves) and write the weight gradients
straight into HF-shaped buffers: no copy either way. bfloat16 weights in that layout get a
float32 copy in the same layout (the gradients come out in it too, and are rounded to
bfloat16). Otherwise (is_transposed, interleaved) the kernels get a contiguous copy in
moe_py's column layout. A copy is made once per
parameter update, not once per forward: a cache on the experts module is keyed on each
parameter's storage and torch's version counter (`tensor._version`, which every in-place
update, an optimiser step included, increments), and the same views write the gradients
back into HF's layout. The copies live in buffers the module keeps and refills at each
update; before a refill the previous RoutedExperts is released (RoutedExperts.release), so
that a backward pending from before the update raises rather than reading the new values.

Supported: gated experts whose act_fn is SiLU (SwiGLU), gpt-oss's clamped SwiGLU gate, ungated
ones (has_gate=False) whose act_fn is the erf GELU, each with or without biases; float32,
float64 and bfloat16. bfloat16 weights run moe_py's bfloat16 compute (MoEConfig's
compute_dtype="bfloat16": bfloat16 GEMM operands, float32 sums, float32 master copies of
the weights here; the output and the gradients are rounded back to bfloat16), and so do
float32 weights inside torch.autocast("cpu", dtype=torch.bfloat16), as eager's matmuls would
be. Anything else (another activation, another custom
_apply_gate, has_post_expert_norm, expert parallelism) raises NotImplementedError naming it:
never a silently different function.
"""
from __future__ import annotations

import threading
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from ..config import MoEConfig
from ..routed_experts import RoutedExperts
from ..torch import autocast_bf16

NAME = "moe_py"
# the float dtype moe_py computes in, by the torch dtype of the expert weights
_COMPUTE = {torch.float32: torch.float32, torch.float64: torch.float64, torch.bfloat16: torch.float32}


class Layout(NamedTuple):
    """How an HF experts module stores and gates its experts (the flags
    @use_experts_implementation sets, or a family's for an undecorated module: Llama 4)."""
    is_transposed: bool  # [E, in, out] instead of nn.Linear's [E, out, in]
    is_concatenated: bool  # [gate; up] instead of interleaved gate/up columns
    has_gate: bool  # gate_up_proj (gated) or up_proj
    has_bias: bool  # gate_up_proj_bias (or up_proj_bias) and down_proj_bias


def layout_of(experts) -> Layout:
    return Layout(experts.is_transposed, experts.is_concatenated, experts.has_gate, experts.has_bias)


def hf_names(layout: Layout) -> List[Tuple[str, str]]:
    """(our expert tensor, the HF attribute holding it), ours in RoutedExperts' order."""
    first = "gate_up_proj" if layout.has_gate else "up_proj"
    names = [("w1", first)] + ([("w3", first)] if layout.has_gate else []) + [("w2", "down_proj")]
    if layout.has_bias:
        names += [("b" + n[1], f"{attr}_bias") for n, attr in names]
    return names


def expert_view(layout: Layout, name: str, hf_tensor: torch.Tensor, linear: bool = False) -> torch.Tensor:
    """Our expert tensor `name` as a view of the HF tensor hf_names() pairs it with: w1 (gate),
    w3 (up) [E, d, F] and w2 [E, F, d], or with `linear` (nn.Linear's layout) [E, F, d] and
    [E, d, F]; b1, b3 [E, F], b2 [E, d]."""
    t = hf_tensor
    weight = name[0] == "w"
    if weight and layout.is_transposed == linear:  # HF's [E, out, in] (or [E, in, out]) is not ours
        t = t.transpose(1, 2)
    if name[1] == "2" or not layout.has_gate:
        return t
    axis = 1 if weight and linear else t.dim() - 1  # the axis of the outputs: gate and up
    F = t.shape[axis] // 2
    if layout.is_concatenated:
        return t.narrow(axis, 0, F) if name[1] == "1" else t.narrow(axis, F, F)
    step = [slice(None)] * t.dim()
    step[axis] = slice(0 if name[1] == "1" else 1, None, 2)
    return t[tuple(step)]


def linear_layout(layout: Layout) -> bool:
    """Whether the kernels can read the weights in HF's own layout (see the module docstring):
    nn.Linear's, with gate and up concatenated (or no gate)."""
    return not layout.is_transposed and (layout.is_concatenated or not layout.has_gate)


def in_place(layout: Layout, dtype: torch.dtype) -> bool:
    """Whether the kernels read HF's own memory: its layout, and a dtype they compute in."""
    return linear_layout(layout) and _COMPUTE[dtype] == dtype


def _hf_params(experts) -> List[torch.Tensor]:
    attrs = dict.fromkeys(attr for _, attr in hf_names(layout_of(experts)))
    return [getattr(experts, a) for a in attrs]


def _views(experts, params: List[torch.Tensor], linear: bool = False) -> Dict[str, torch.Tensor]:
    """Our tensors as views of `params` (tensors laid out as _hf_params(experts))."""
    names = hf_names(layout_of(experts))
    by_attr = dict(zip(dict.fromkeys(attr for _, attr in names), params))
    return {ours: expert_view(layout_of(experts), ours, by_attr[attr], linear) for ours, attr in names}


def _copies(experts, sources: List[torch.Tensor], dtype: torch.dtype, refill: bool) -> List[torch.Tensor]:
    """Contiguous copies of `sources` in dtype, in buffers the module keeps from one parameter
    update to the next and refills in place (refill): new ones at every update were hundreds
    of MB of pages to fault in per training step, which cost several times the copying. The
    RoutedExperts built over them before has been released (_routed_experts), so that a
    backward still pending from before the update raises instead of packing the new values."""
    buffers = getattr(experts, "_moe_py_copies", None)
    if buffers is None or [(b.shape, b.dtype) for b in buffers] != [(s.shape, dtype) for s in sources]:
        buffers = [torch.empty(s.shape, dtype=dtype) for s in sources]
        experts._moe_py_copies = buffers
        refill = True
    if refill:
        for b, s in zip(buffers, sources):
            b.copy_(s.detach())
    return buffers


# class-specific gates that are gpt-oss's clamped SwiGLU: min(g, limit) and clamp(u, +-limit),
# (u + 1) * g * sigmoid(alpha g), with the module's alpha and limit (split by is_concatenated)
CLAMPED_SWIGLU_GATES = ("GptOssExperts._apply_gate", "OpenAIPrivacyFilterExperts._apply_gate")


def activation_of(experts, layout: Optional[Layout] = None) -> Dict[str, Any]:
    """The MoEConfig fields of the module's expert FFN, or NotImplementedError naming what
    moe_py does not compute. `layout`: for a module without @use_experts_implementation."""
    from transformers.activations import GELUActivation, SiLUActivation
    from transformers.integrations import moe as hf_moe

    name = type(experts).__name__
    for flag in ("has_post_expert_norm", "_is_expert_parallel"):
        if getattr(experts, flag, False):
            raise NotImplementedError(f"experts_implementation={NAME!r}: {name}.{flag}=True is not supported")
    layout = layout_of(experts) if layout is None else layout
    bias = {"ffn_bias": True} if layout.has_bias else {}
    act = getattr(experts, "act_fn", None)
    if layout.has_gate:
        gate = getattr(type(experts), "_apply_gate", hf_moe._default_apply_gate)
        if gate.__qualname__ in CLAMPED_SWIGLU_GATES:
            return dict(activation="clamped_swiglu", swiglu_alpha=float(experts.alpha),
                        swiglu_limit=float(experts.limit), **bias)
        if gate is not hf_moe._default_apply_gate:
            raise NotImplementedError(f"experts_implementation={NAME!r}: {name} has its own _apply_gate")
        if not layout.is_concatenated:  # HF's default gate splits [gate; up] whatever the flag says
            raise NotImplementedError(f"experts_implementation={NAME!r}: {name}.is_concatenated=False "
                                      "with transformers' default _apply_gate")
        if isinstance(act, (torch.nn.SiLU, SiLUActivation)):
            return dict(activation="swiglu", **bias)
        raise NotImplementedError(f"experts_implementation={NAME!r}: {name}.act_fn "
                                  f"{type(act).__name__} (gated experts need SiLU)")
    if isinstance(act, torch.nn.GELU) and act.approximate == "none" or \
            isinstance(act, GELUActivation) and act.act is torch.nn.functional.gelu:
        return dict(activation="gelu", **bias)
    raise NotImplementedError(f"experts_implementation={NAME!r}: {name}.act_fn {type(act).__name__} "
                              f"(ungated experts need the erf GELU)")


class _Cached(NamedTuple):
    key: tuple
    experts: RoutedExperts


def _routed_experts(experts, k: int) -> RoutedExperts:
    """The module's experts as a RoutedExperts: on views of its weights (in_place), else on
    float32 copies in HF's layout (bfloat16 weights) or column-layout copies; rebuilt only when
    a weight changed since last time."""
    params = _hf_params(experts)
    key = tuple((p.data_ptr(), p._version, p.dtype, tuple(p.shape)) for p in params) + (k,)
    cached = getattr(experts, "_moe_py_cache", None)
    if cached is not None and cached.key == key:
        return cached.experts
    refill = cached is None or cached.key[:-1] != key[:-1]  # the weights changed (not only k)
    if cached is not None and refill:  # before its copies (if any) are refilled below
        cached.experts.release()
    ffn = activation_of(experts)
    dtype = params[0].dtype
    if dtype not in _COMPUTE:
        raise TypeError(f"experts_implementation={NAME!r}: expert weights of dtype {dtype} "
                        "(float32, float64 or bfloat16 expected)")
    compute = _COMPUTE[dtype]
    layout = layout_of(experts)
    linear = linear_layout(layout)
    if in_place(layout, dtype):  # the parameters' own memory: the autograd
        # Function saves them, so that an in-place change before the backward raises, as with eager
        ours = {n: v.detach().numpy() for n, v in _views(experts, params, linear).items()}
    elif linear:  # bfloat16: float32 copies in HF's layout (no transposing copy either way)
        copies = _copies(experts, params, compute, refill)
        ours = {n: v.numpy() for n, v in _views(experts, copies, linear).items()}
    else:  # another layout: copies in the column layout
        views = _views(experts, params, linear)
        copies = _copies(experts, list(views.values()), compute, refill)
        ours = {n: c.numpy() for n, c in zip(views, copies)}
    E = ours["w1"].shape[0]
    D, F = (ours["w1"].shape[2], ours["w1"].shape[1]) if linear else ours["w1"].shape[1:]
    cfg = MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=min(k, E),
                    dtype=str(compute).removeprefix("torch."),
                    compute_dtype="bfloat16" if dtype == torch.bfloat16 else None, **ffn)
    # fixed_values: our copies change only when the key above changes, and the RoutedExperts
    # over them is released first (views of HF's memory may change unseen by the key, through
    # .data: bfloat16 compute under autocast fingerprints them)
    routed = RoutedExperts(cfg, params=ours, grads={}, layout="linear" if linear else "column",
                           fixed_values=not in_place(layout, dtype))
    experts._moe_py_cache = _Cached(key, routed)  # replaced, never edited: a pending backward keeps its packs
    return routed


_REUSED = threading.local()


def _reused(shape: torch.Size, i: int) -> torch.Tensor:
    """A float32 buffer of `shape` that this thread's backwards reuse (the i-th parameter's):
    a bfloat16 weight's gradient, rounded into a new tensor before the next backward writes
    it. Reused rather than allocated, so that its pages are not faulted in at every step."""
    buffers = _REUSED.__dict__.setdefault("buffers", {})
    key = (tuple(shape), i)
    if key not in buffers:
        buffers[key] = torch.empty(shape, dtype=torch.float32)
    return buffers[key]


class RoutedExpertsFunction(torch.autograd.Function):
    """y of one experts forward; one C++ backward gives d hidden_states, d top_k_weights and
    the gradients of the HF expert parameters (in HF's layout and dtype)."""

    @staticmethod
    def forward(ctx, experts, hidden_states, top_k_index, top_k_weights, *params):
        routed = _routed_experts(experts, top_k_index.shape[-1])
        compute = torch.float64 if routed.cfg.dtype == "float64" else torch.float32
        x = hidden_states.detach().to(compute).contiguous().numpy()
        w = top_k_weights.detach().to(compute).contiguous().numpy()
        bf16 = routed.cfg.dtype == "float32" and autocast_bf16()  # float32 weights under autocast
        out = routed(x, top_k_index.detach().numpy(), w, compute_dtype="bfloat16" if bf16 else None)
        ctx.experts, ctx.routed, ctx.out = experts, routed, out
        ctx.dtypes = (hidden_states.dtype, top_k_weights.dtype)
        ctx.save_for_backward(*params)  # the backward reads them (in place when linear)
        return torch.from_numpy(out.y).to(hidden_states.dtype)

    @staticmethod
    @once_differentiable  # the backward is C++: a second derivative raises instead of being 0
    def backward(ctx, dy):
        routed: RoutedExperts = ctx.routed
        params = ctx.saved_tensors  # raises if they changed in place since the forward
        compute = torch.float64 if routed.cfg.dtype == "float64" else torch.float32
        # the gradients in HF's layout: returned as they are, or (bfloat16 weights) rounded
        # into new tensors from this thread's reused float32 buffers
        hf_grads = [torch.empty(p.shape, dtype=compute) if p.dtype == compute else _reused(p.shape, i)
                    for i, p in enumerate(params)]
        linear = routed.layout == "linear"
        views = _views(ctx.experts, hf_grads, linear)
        # linear: the kernels write the weight gradients straight into HF's buffers; the rest
        # (biases, whose halves are not contiguous; the column layout) go through new arrays.
        # Every element of each buffer is written (accumulate False): none needs zeroing.
        direct = {n for n in views if linear and n[0] == "w"}
        grads = {n: views[n].numpy() if n in direct else np.empty(a.shape, a.dtype)
                 for n, a in routed.params.items()}
        dx, dw = ctx.out.backward(dy.detach().to(compute).contiguous().numpy(), grads=grads,
                                  accumulate=False)
        for name, view in views.items():
            if name not in direct:
                view.copy_(torch.from_numpy(grads[name]))
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
