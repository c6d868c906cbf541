"""Expert FFNs with dispatch and combine (cpp/experts.cpp, cpp/dispatch.cpp).

swiglu: FFN(x) = (silu(x W1) * (x W3)) W2;  gelu: FFN(x) = gelu(x W1) W2 with the
exact (erf) GELU, as torch.nn.GELU() by default. No biases.
y[t] = sum_j topk_weights[t, j] * FFN_{topk_indices[t, j]}(x[t]).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np

from . import _kernels
from ._kernels import Activation, kernel
from ._checks import check_grad_buffer, check_param
from .config import MoEConfig


def init_expert_weights(cfg: MoEConfig, rng: np.random.Generator) -> Dict[str, np.ndarray]:
    """w1, w3 ~ N(0, 1/d_model), w2 ~ N(0, 1/d_ff): unit-variance activations through the FFN."""
    E, D, F = cfg.num_experts, cfg.d_model, cfg.d_ff
    out = {"w1": rng.standard_normal((E, D, F)) / np.sqrt(D)}
    if cfg.activation == "swiglu":
        out["w3"] = rng.standard_normal((E, D, F)) / np.sqrt(D)
    out["w2"] = rng.standard_normal((E, F, D)) / np.sqrt(F)
    return {k: v.astype(cfg.np_dtype) for k, v in out.items()}


class Experts:
    """The E expert FFNs of one layer, run on tokens grouped by expert. Their weights are
    params[prefix + "w1"] etc. (a layer's shared experts use the prefix "shared_")."""

    def __init__(self, cfg: MoEConfig, params: Dict[str, np.ndarray], grads: Dict[str, np.ndarray],
                 prefix: str = ""):
        self.cfg = cfg
        self.params = params
        self.grads = grads
        self.prefix = prefix
        self._activation = Activation.__members__[cfg.activation]
        self._saved = None

    def _weights(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        cfg = self.cfg
        E, D, F, dt, p = cfg.num_experts, cfg.d_model, cfg.d_ff, cfg.np_dtype, self.prefix
        check_param(self.params[p + "w1"], (E, D, F), dt, p + "w1")
        check_param(self.params[p + "w2"], (E, F, D), dt, p + "w2")
        if cfg.activation == "swiglu":
            check_param(self.params[p + "w3"], (E, D, F), dt, p + "w3")
            w3 = self.params[p + "w3"]
        else:
            w3 = np.zeros((0, 0, 0), dtype=dt)
        return self.params[p + "w1"], w3, self.params[p + "w2"]

    def compute(self, x2: np.ndarray, topk_indices: np.ndarray, topk_weights: np.ndarray,
                dropped: np.ndarray) -> Tuple[np.ndarray, tuple]:
        """x2 [T, d_model] -> (y [T, d_model], what backward needs); changes nothing here.
        Padded tokens and dropped slots cost nothing."""
        w1, w3, w2 = self._weights()
        dt = self.cfg.np_dtype
        offsets, row_token, slot_row = _kernels.dispatch_plan(
            topk_indices=topk_indices, dropped=dropped.view(np.uint8),
            num_experts=self.cfg.num_experts)
        xs = kernel("gather_rows", dt)(x=x2, row_token=row_token)
        h1, h3, ye = kernel("experts_forward", dt)(
            xs=xs, offsets=offsets, w1=w1, w3=w3, w2=w2, activation=self._activation)
        y = kernel("combine_forward", dt)(ye=ye, slot_row=slot_row, topk_weights=topk_weights)
        return y, (offsets, slot_row, xs, h1, h3, ye, topk_weights, (w1, w3, w2))

    def commit(self, saved: tuple) -> None:
        self._saved = saved

    def forward(self, x2: np.ndarray, topk_indices: np.ndarray, topk_weights: np.ndarray,
                dropped: np.ndarray) -> np.ndarray:
        y, saved = self.compute(x2, topk_indices, topk_weights, dropped)
        self.commit(saved)
        return y

    def backward(self, dy2: np.ndarray, saved: Optional[tuple] = None) -> Tuple[np.ndarray, np.ndarray]:
        """dy2 [T, d_model] -> (dx2 [T, d_model], d_topk_weights [T, k]); adds into grads.
        `saved`: a forward's saved state (default: the latest forward's)."""
        saved = self._saved if saved is None else saved
        if saved is None:
            raise RuntimeError("backward called before forward")
        offsets, slot_row, xs, h1, h3, ye, topk_weights, (w1, w3, w2) = saved
        dt = self.cfg.np_dtype
        E, D, F, p = self.cfg.num_experts, self.cfg.d_model, self.cfg.d_ff, self.prefix
        for name, shape in (("w1", (E, D, F)), ("w3", (E, D, F)), ("w2", (E, F, D))):
            if p + name in self.params:
                check_grad_buffer(self.grads.get(p + name), shape, dt, f"grads['{p + name}']")
        dye, d_weights = kernel("combine_backward", dt)(
            dy=dy2, ye=ye, slot_row=slot_row, topk_weights=topk_weights)
        g3 = self.grads.get(p + "w3", np.zeros((0, 0, 0), dtype=dt))
        dxs = kernel("experts_backward", dt)(
            xs=xs, offsets=offsets, w1=w1, w3=w3, w2=w2, h1=h1, h3=h3, dye=dye,
            activation=self._activation, dw1=self.grads[p + "w1"], dw3=g3, dw2=self.grads[p + "w2"])
        dx2 = kernel("gather_rows_backward", dt)(dxs=dxs, slot_row=slot_row)
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
                     top_k=cfg.num_shared_experts, activation=cfg.activation, dtype=cfg.dtype)


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

    def compute(self, x2: np.ndarray, mask: np.ndarray) -> Tuple[np.ndarray, tuple]:
        idx, weights, dropped = every_token(mask, self.cfg.num_experts, x2.dtype)
        return self.experts.compute(x2, idx, weights, dropped)

    def backward(self, dy2: np.ndarray, saved: tuple) -> np.ndarray:
        return self.experts.backward(dy2, saved)[0]
