"""moe_py inside PyTorch: `MoE(cfg)`, a torch.nn.Module over the C++ layer.

    import torch, moe_py
    from moe_py.torch import MoE
    moe = MoE(moe_py.MoEConfig(d_model=64, d_ff=128, num_experts=8, top_k=2))
    y, aux_loss, router = moe(x, padding_mask=mask)   # x: a float32/float64/bfloat16 CPU tensor
    (loss_of(y) + aux_loss).backward()               # gradients reach x and moe's parameters

bfloat16, as torch autocast users expect (float32 layers only; master weights stay float32):
the expert GEMMs, forward and backward, run in bfloat16 with float32 sums (MoEConfig's
compute_dtype="bfloat16") when the config says so, when x is a bfloat16 tensor, or inside
`torch.autocast("cpu", dtype=torch.bfloat16)`. The router, its losses, the activations and the
combine stay float32 (as Megatron-Core's moe_router_dtype="fp32"). y has x's dtype (a bfloat16
x gives a bfloat16 y and dx, rounded from the float32 result, as a bfloat16 HF model's MoE
block returns its input's dtype); aux_loss is float32 then. The parameters' gradients are
float32. Autocast to float16 raises NotImplementedError (no float16 kernels); a float64 layer
ignores autocast, as torch's own float64 ops do.

The parameters are nn.Parameters sharing storage with the C++ layer's arrays: a torch
optimiser updates them in place and the next forward sees it. Each forward keeps its own
saved state (MoEOutput.context), so a module called several times before one backward
(micro-batches, or reuse) gets every call's gradient. torch is an optional extra
(`pip install moe_py[torch]`); nothing else in moe_py imports this module.

Threads: moe_py and torch share one OpenMP runtime. moe_py.set_num_threads(n) holds for
every moe_py kernel whatever torch.set_num_threads says afterwards; without it, moe_py runs on
the OpenMP default, which torch.set_num_threads changes.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from . import _kernels
from .config import MoEConfig
from .layer import MoELayer, MoEOutput
from .router import RouterOutput

# the torch dtypes moe_py computes in, by MoEConfig.dtype name
TORCH_DTYPES = {torch.float32: "float32", torch.float64: "float64"}


def autocast_bf16() -> bool:
    """Whether torch.autocast is on for the CPU with bfloat16; autocast to another dtype
    raises (moe_py has bfloat16 and float32/float64 kernels only)."""
    if not torch.is_autocast_enabled("cpu"):
        return False
    fast = torch.get_autocast_dtype("cpu")
    if fast != torch.bfloat16:
        raise NotImplementedError(f"torch.autocast('cpu', dtype={fast}): moe_py's experts compute in "
                                  "bfloat16 or in the parameters' dtype")
    return True


def bf16_requested(x: torch.Tensor, layer_dtype: str) -> bool:
    """Whether this call's expert GEMMs run in bfloat16 beyond what the config says: x is
    bfloat16, or autocast to bfloat16 is on for the CPU (float32 layers only)."""
    if x.dtype == torch.bfloat16:
        if layer_dtype != "float32":
            raise TypeError(f"x: a bfloat16 tensor needs a float32 layer (float32 master weights), "
                            f"this one is {layer_dtype}")
        return True
    return layer_dtype == "float32" and autocast_bf16()  # torch's autocast leaves float64 alone too


class MoEFunction(torch.autograd.Function):
    """y and aux_loss of one forward; one C++ backward gives dx and every parameter's grad.
    Public so that a benchmark can time the autograd function without the module around it."""

    @staticmethod
    def forward(ctx, x, module, mask, training, token_ids, compute_dtype, *params):
        layer: MoELayer = module.layer
        out = layer(x.detach().contiguous().numpy(), padding_mask=mask, training=training,
                    token_ids=token_ids, compute_dtype=compute_dtype)
        ctx.layer, ctx.out, ctx.names = layer, out, module.param_names
        ctx.x_shape = x.shape
        module._router_out = out.router  # handed back by MoE.forward (not a tensor output)
        return torch.from_numpy(out.y), torch.tensor(out.aux_loss, dtype=x.dtype)

    @staticmethod
    @once_differentiable  # its backward is C++: a second derivative raises instead of being 0
    def backward(ctx, dy, daux):
        layer: MoELayer = ctx.layer
        # this call's parameter gradients alone, in fresh zeroed buffers from the block cache
        # (torch adds them into .grad, or takes them as .grad): no copy of the weights' size
        fresh = {n: _kernels.zeros(layer.params[n].shape, layer.params[n].dtype) for n in ctx.names}
        kept = {n: layer.grads[n] for n in ctx.names}
        layer.grads.update(fresh)  # the dict the router and the experts add into
        try:
            dx = layer.backward(dy.detach().contiguous().numpy(), aux_weight=float(daux), out=ctx.out)
        finally:
            layer.grads.update(kept)
        return (torch.from_numpy(dx).reshape(ctx.x_shape), None, None, None, None, None,
                *(torch.from_numpy(fresh[n]) for n in ctx.names))


class SharedExpert(torch.nn.Module):
    """An always-on SwiGLU expert with a sigmoid gate, as Qwen2-MoE's: sigmoid(x g) * FFN(x).
    Plain torch: the C++ core's shared experts (MoEConfig.num_shared_experts) have no gate."""

    def __init__(self, d_model: int, d_ff: int, dtype: torch.dtype):
        super().__init__()
        self.gate_proj = torch.nn.Linear(d_model, d_ff, bias=False, dtype=dtype)
        self.up_proj = torch.nn.Linear(d_model, d_ff, bias=False, dtype=dtype)
        self.down_proj = torch.nn.Linear(d_ff, d_model, bias=False, dtype=dtype)
        self.gate = torch.nn.Linear(d_model, 1, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x)
        return torch.sigmoid(self.gate(x)) * self.down_proj(h)


class MoE(torch.nn.Module):
    """forward(x, padding_mask=None, token_ids=None) -> (y, aux_loss, router_output):
    y [..., d_model] and the scalar aux_loss are in the autograd graph; router_output is the
    layer's RouterOutput (read-only NumPy arrays). module.eval() routes with training=False
    (no noise, constant straight-through weights, Sinkhorn off). Every router of MoEConfig
    works; token_ids [...] (integers) are for router="hash". With an expert bias that moves
    (bias_update_rate > 0), call update_expert_bias() once per optimiser step (after
    optimizer.step())."""

    _router_out: Optional[RouterOutput]  # set by MoEFunction.forward: the routing of its call

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.layer = MoELayer(cfg)
        self.param_names = list(self.layer.params)
        for name in self.param_names:
            # shares memory with the C++ layer's array: no copy per step, in-place updates seen
            self.register_parameter(name, torch.nn.Parameter(torch.from_numpy(self.layer.params[name])))
        self.shared: Optional[SharedExpert] = None  # set by moe_py.hf.from_hf for Qwen2-MoE blocks

    def update_expert_bias(self) -> None:
        """The aux-loss-free expert-bias step from the loads since the last call."""
        self.layer.update_expert_bias()

    def forward(self, x: torch.Tensor, padding_mask=None,
                token_ids=None) -> Tuple[torch.Tensor, torch.Tensor, RouterOutput]:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if x.device.type != "cpu":
            raise ValueError(f"x: moe_py runs on the CPU; got a tensor on {x.device}")
        bf16 = bf16_requested(x, self.cfg.dtype)
        if x.dtype != torch.bfloat16 and TORCH_DTYPES.get(x.dtype) != self.cfg.dtype:
            raise TypeError(f"x: expected dtype {self.cfg.dtype} (the layer's) or bfloat16, got {x.dtype}")
        for name in self.param_names:
            p = getattr(self, name)
            if p.data_ptr() != self.layer.params[name].ctypes.data:
                raise RuntimeError(f"{name}: the parameter no longer shares memory with the C++ "
                                   "layer (replaced, moved or cast?); build a new MoE instead")
        mask = None
        if padding_mask is not None:
            mask = (padding_mask.detach().cpu().numpy() if isinstance(padding_mask, torch.Tensor)
                    else np.asarray(padding_mask))
        if isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.detach().cpu().numpy()
        compute_dtype = "bfloat16" if bf16 else None
        x_in = x.float() if x.dtype == torch.bfloat16 else x  # autograd casts dx back
        params = [getattr(self, n) for n in self.param_names]
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
            y, aux = MoEFunction.apply(x_in, self, mask, self.training, token_ids, compute_dtype, *params)
            router = self._router_out
        else:
            out: MoEOutput = self.layer(x_in.detach().contiguous().numpy(), padding_mask=mask,
                                        training=self.training, token_ids=token_ids, compute_dtype=compute_dtype)
            y, aux, router = torch.from_numpy(out.y), torch.tensor(out.aux_loss, dtype=x_in.dtype), out.router
        if self.shared is not None:
            keep = torch.ones(x.shape[:-1], dtype=x_in.dtype) if mask is None else \
                torch.as_tensor(np.asarray(mask)).reshape(x.shape[:-1]).to(x_in.dtype)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # torch's own Linears
                shared = self.shared(x_in)
            y = y + shared * keep[..., None]
        assert router is not None  # a MoELayer's output always carries its routing
        return y.to(x.dtype), aux, router

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"d_model={c.d_model}, d_ff={c.d_ff}, num_experts={c.num_experts}, top_k={c.top_k}, "
                f"router={c.router}, dtype={c.dtype}")
