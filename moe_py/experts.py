"""Expert FFNs with dispatch and combine (cpp/experts.cpp, cpp/dispatch.cpp).

swiglu: FFN(x) = (silu(x W1) * (x W3)) W2;  gelu: FFN(x) = gelu(x W1) W2 with the
exact (erf) GELU, as torch.nn.GELU() by default; clamped_swiglu (gpt-oss):
g = min(x W1, limit), u = clamp(x W3, -limit, limit), FFN(x) = ((u + 1) g sigmoid(alpha g)) W2.
With MoEConfig.ffn_bias each GEMM adds its bias: x W1 + b1, x W3 + b3, a W2 + b2 (the shared
experts have none).
y[t] = sum_j topk_weights[t, j] * FFN_{topk_indices[t, j]}(x[t]) (MoEConfig.combine "output"),
or sum_j FFN_{topk_indices[t, j]}(topk_weights[t, j] * x[t]) ("input", Llama 4).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import numpy as np

from ._kernels import Activation, kernel
from ._checks import check_grad_buffer, check_param
from .bf16 import GemmWeightCache
from .config import MoEConfig
from .dispatch import LocalDispatcher


# The experts' parameters, in the order they are drawn and listed: the weights, then (with
# MoEConfig.ffn_bias) the biases, each added after its GEMM. w3 and b3 are the gated
# activations' alone.
EXPERT_KEYS = ("w1", "w3", "w2", "b1", "b3", "b2")
BIAS_KEYS = EXPERT_KEYS[3:]
# How each expert's weight matrices lie: "column" (x W: w1, w3 [d_model, d_ff], w2 [d_ff,
# d_model]; moe_py's layers) or "linear" (nn.Linear's x W^T: w1, w3 [d_ff, d_model], w2
# [d_model, d_ff]; transformers' experts). Their gradients lie as they do. The kernels give
# the same bits in both (tests/test_experts_linear.py).
LAYOUTS = ("column", "linear")


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")


def expert_param_shapes(cfg: MoEConfig, num_experts: Optional[int] = None,
                        layout: str = "column") -> Dict[str, Tuple[int, ...]]:
    """{name: shape} of the parameters cfg's experts have (num_experts of them: default all)."""
    E = cfg.num_experts if num_experts is None else num_experts
    D, F, gated = cfg.d_model, cfg.d_ff, cfg.activation_traits.gated
    i, o = (F, D) if layout == "linear" else (D, F)  # w1's two axes
    shapes = {"w1": (E, i, o), "w3": (E, i, o), "w2": (E, o, i), "b1": (E, F), "b3": (E, F), "b2": (E, D)}
    has = {"w1": True, "w3": gated, "w2": True, "b1": cfg.ffn_bias, "b3": cfg.ffn_bias and gated,
           "b2": cfg.ffn_bias}
    return {k: shapes[k] for k in EXPERT_KEYS if has[k]}


def init_expert_weights(cfg: MoEConfig, rng: np.random.Generator, layout: str = "column") -> Dict[str, np.ndarray]:
    """w1, w3 ~ N(0, 1/d_model), w2 ~ N(0, 1/d_ff): unit-variance activations through the FFN.
    Biases start at 0 (and draw nothing: the weights are those of the same seed without).
    layout "linear": the same weights, each expert's matrix transposed."""
    D, F = cfg.d_model, cfg.d_ff
    scale = {"w1": 1 / np.sqrt(D), "w3": 1 / np.sqrt(D), "w2": 1 / np.sqrt(F)}
    out: Dict[str, np.ndarray] = {
        k: (rng.standard_normal(shape) * scale[k] if k in scale else np.zeros(shape)).astype(cfg.np_dtype)
        for k, shape in expert_param_shapes(cfg).items()}
    if layout == "linear":
        out.update({k: np.ascontiguousarray(out[k].transpose(0, 2, 1)) for k in scale if k in out})
    return out


def activation_args(cfg: MoEConfig) -> dict:
    """The expert kernels' activation arguments for cfg (alpha and limit: clamped only)."""
    out: Dict[str, Any] = {"activation": Activation.__members__[cfg.activation]}
    if cfg.activation_traits.clamped:
        out.update(swiglu_alpha=float(cfg.swiglu_alpha), swiglu_limit=float(cfg.swiglu_limit))
    return out


class Experts:
    """The expert FFNs of one layer, run on tokens grouped by expert. Their parameters are
    params[prefix + "w1"] etc. (expert_param_shapes; a layer's shared experts use the prefix
    "shared_"). The dispatcher (moe_py/dispatch.py) moves the routed rows to the experts and
    back: all of them are here with the LocalDispatcher; with an all-to-all one, only this
    process's slice [lo, hi) of the experts is (params hold hi - lo experts).
    layout (LAYOUTS): how the weights and their gradients lie; "linear" ones are read and
    written in place when each expert's matrix is C-contiguous, even with the experts apart
    (the halves of one [E, 2 d_ff, d_model] array). fixed_values: the caller never changes
    the weights' values in place (see bf16.GemmWeightCache)."""

    def __init__(self, cfg: MoEConfig, params: Dict[str, np.ndarray], grads: Dict[str, np.ndarray],
                 prefix: str = "", dispatcher=None, layout: str = "column", fixed_values: bool = False):
        check_layout(layout)
        self.cfg = cfg
        self.layout = layout
        self.params = params
        self.grads = grads
        self.prefix = prefix
        self.dispatcher = dispatcher if dispatcher is not None else LocalDispatcher()
        lo, hi = self.dispatcher.local_experts(cfg.num_experts)
        self.num_local = hi - lo
        self._shapes = expert_param_shapes(cfg, self.num_local, layout)
        self._activation = activation_args(cfg)
        if layout == "linear":
            self._activation["linear"] = True
        # bfloat16 compute (the config's, or one call's): the kernels round what they read;
        # the weights come packed (or rounded, on the fallback), remade only when they changed
        self._bf16_weights = GemmWeightCache(fixed_values)
        self._fixed_values = fixed_values
        self._checked: Optional[tuple] = None  # the arrays _weights checked last
        self._saved: Optional[tuple] = None

    def retire_bf16_weights(self) -> None:
        """Before the caller changes the weights' values in place although it promised
        fixed_values (it reuses their memory for the next update's): a pending backward that
        would read them raises instead (bf16.GemmWeights.retire)."""
        self._bf16_weights.retire()

    def _weights(self) -> Dict[str, np.ndarray]:
        """The kernels' parameter arguments (w3 empty when not gated), checked (with
        fixed_values, once per set of arrays: their values cannot have changed since)."""
        dt, p = self.cfg.np_dtype, self.prefix
        out: Dict[str, np.ndarray] = {"w3": np.zeros((0, 0, 0), dtype=dt)}
        arrays = {name: self.params[p + name] for name in self._shapes}
        checked = self._checked
        if not (self._fixed_values and checked is not None and len(checked) == len(arrays)
                and all(a is b for a, b in zip(arrays.values(), checked))):
            for name, shape in self._shapes.items():
                check_param(arrays[name], shape, dt, p + name)
            self._checked = tuple(arrays.values())  # held, so never mistaken for new ones
        out.update(arrays)
        return out

    def _grad_buffers(self, grads: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """The kernels' gradient arguments from `grads` (dw3 empty when not gated), checked."""
        dt, p = self.cfg.np_dtype, self.prefix
        out: Dict[str, np.ndarray] = {"dw3": np.zeros((0, 0, 0), dtype=dt)}
        for name, shape in self._shapes.items():
            check_grad_buffer(grads.get(p + name), shape, dt, f"grads['{p + name}']",
                              per_expert=name[0] == "w")
            out["d" + name] = grads[p + name]
        return out

    def compute(self, x2: np.ndarray, topk_indices: np.ndarray, topk_weights: np.ndarray,
                dropped: np.ndarray, compute_dtype: Optional[str] = None) -> Tuple[np.ndarray, tuple]:
        """x2 [T, d_model] -> (y [T, d_model], what backward needs); changes nothing here.
        Padded tokens (index -1) and dropped slots cost nothing. compute_dtype: this call's
        GEMM arithmetic, None for the config's (the backward of this call uses the same)."""
        weights = self._weights()
        activation = self._activation
        gemm_weights = None
        if (compute_dtype or self.cfg.compute_dtype) == "bfloat16":
            gemm_weights = self._bf16_weights(weights, activation["activation"], self.layout == "linear")
            weights = gemm_weights.weights
            activation = dict(activation, bf16=True)
        xe, offsets, state = self.dispatcher.dispatch(x2, topk_indices, topk_weights, dropped,
                                                      self.cfg.num_experts, self.cfg.combine)
        h1, h3, ye = kernel("experts_forward", self.cfg.np_dtype)(
            xs=xe, offsets=offsets, **weights, **activation,
            **(gemm_weights.forward_args if gemm_weights else {}))
        y = self.dispatcher.combine(ye, state)
        return y, (state, offsets, xe, h1, h3, weights, activation, gemm_weights)

    def commit(self, saved: tuple) -> None:
        self._saved = saved

    def forward(self, x2: np.ndarray, topk_indices: np.ndarray, topk_weights: np.ndarray,
                dropped: np.ndarray) -> np.ndarray:
        y, saved = self.compute(x2, topk_indices, topk_weights, dropped)
        self.commit(saved)
        return y

    def backward(self, dy2: np.ndarray, saved: Optional[tuple] = None,
                 grads: Optional[Dict[str, np.ndarray]] = None,
                 accumulate: bool = True) -> Tuple[np.ndarray, np.ndarray]:
        """dy2 [T, d_model] -> (dx2 [T, d_model], d_topk_weights [T, k]); adds into grads
        (default: self.grads), or with accumulate False writes them there (what the buffers
        held is never read). `saved`: a forward's saved state (default: the latest forward's)."""
        saved = self._saved if saved is None else saved
        if saved is None:
            raise RuntimeError("backward called before forward")
        state, offsets, xe, h1, h3, weights, activation, gemm_weights = saved
        buffers = self._grad_buffers(self.grads if grads is None else grads)
        dye, dw_out = self.dispatcher.combine_backward(dy2, state)
        dxe = kernel("experts_backward", self.cfg.np_dtype)(
            xs=xe, offsets=offsets, w1=weights["w1"], w3=weights["w3"], w2=weights["w2"], h1=h1,
            h3=h3, dye=dye, **activation, **buffers, accumulate=accumulate,
            **(gemm_weights.backward_args() if gemm_weights else {}))
        dx2, dw_in = self.dispatcher.dispatch_backward(dxe, state)
        d_weights = dw_out if dw_out is not None else dw_in  # from where the weights applied
        assert d_weights is not None
        return dx2, d_weights


def every_token(real: np.ndarray, n_experts: int, dtype) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Routing that sends every real token (real: bool [T]) to each of n_experts experts
    with weight 1: (indices [T, n], weights [T, n], dropped [T, n]). Dense FFNs and shared
    experts run on the expert kernels this way."""
    real = real.reshape(-1, 1).astype(bool)
    idx = np.where(real, np.arange(n_experts, dtype=np.int64), -1)
    weights = np.broadcast_to(real, idx.shape).astype(dtype)
    return idx, weights, np.zeros(idx.shape, bool)


def shared_config(cfg: MoEConfig) -> MoEConfig:
    """The MoEConfig of a layer's shared experts, as experts of width shared_d_ff."""
    return MoEConfig(d_model=cfg.d_model, d_ff=cfg.shared_width, num_experts=cfg.num_shared_experts,
                     top_k=cfg.num_shared_experts, activation=cfg.activation,  # no ffn_bias: see MoEConfig
                     swiglu_alpha=cfg.swiglu_alpha, swiglu_limit=cfg.swiglu_limit, dtype=cfg.dtype,
                     compute_dtype=cfg.compute_dtype)


def init_shared_weights(cfg: MoEConfig, rng: np.random.Generator) -> Dict[str, np.ndarray]:
    if not cfg.num_shared_experts:
        return {}
    return {"shared_" + k: v for k, v in init_expert_weights(shared_config(cfg), rng).items()}


class SharedExperts:
    """A layer's num_shared_experts always-on experts (DeepSeekMoE, Qwen-MoE): every real
    token goes through each of them with weight 1, and their sum is added to the routed
    output. Weights: params["shared_w1"] [S, d_model, shared_d_ff], "shared_w3", "shared_w2"."""

    def __init__(self, cfg: MoEConfig, params: Dict[str, np.ndarray], grads: Dict[str, np.ndarray]):
        self.cfg = shared_config(cfg)
        self.experts = Experts(self.cfg, params, grads, prefix="shared_")

    def compute(self, x2: np.ndarray, mask: np.ndarray,
                compute_dtype: Optional[str] = None) -> Tuple[np.ndarray, tuple]:
        idx, weights, dropped = every_token(mask, self.cfg.num_experts, x2.dtype)
        return self.experts.compute(x2, idx, weights, dropped, compute_dtype)

    def backward(self, dy2: np.ndarray, saved: tuple) -> np.ndarray:
        return self.experts.backward(dy2, saved)[0]
