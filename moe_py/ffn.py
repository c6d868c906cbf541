"""The FFN interface every transformer Block uses, its dense implementation, and the one
place that decides which FFN a model gets.

An FFN has `params`/`grads` dicts and
    forward(x, padding_mask=None, training=True, token_ids=None) -> MoEOutput
                                                   (router None when dense; ids for hash routing)
    backward(dy, aux_weight=1.0) -> dx
    num_parameters() -> {"total": ..., "active": ...}           (active: used by one token)
    has_router: bool
MoELayer (moe_py/layer.py) and DenseFFN below implement it; a new kind of FFN (shared
experts, another router) plugs in through build_ffn without touching the model.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Protocol, Tuple

import numpy as np

from .config import MoEConfig
from .experts import Experts, every_token, init_expert_weights
from .layer import MoELayer, MoEOutput


class FFN(Protocol):
    """The FFN interface above, for type checking (MoELayer, DenseFFN and the expert-parallel
    layer have it)."""

    params: Dict[str, np.ndarray]
    grads: Dict[str, np.ndarray]
    has_router: bool

    def forward(self, x: Any, padding_mask: Any = None, training: bool = True,
                token_ids: Any = None) -> MoEOutput: ...

    def backward(self, dy: Any, aux_weight: float = 1.0) -> np.ndarray: ...

    def num_parameters(self) -> Dict[str, int]: ...


class DenseFFN:
    """The dense baseline: one SwiGLU/GELU FFN on every real token. It runs the
    expert kernels with a single expert that every real token goes to with weight 1,
    so it shares the experts' code (and speed) instead of repeating it."""

    has_router = False

    def __init__(self, d: int, d_ff: int, activation: str, rng: np.random.Generator, dtype: str,
                 out_scale: float, compute_dtype: Optional[str] = None):
        self.cfg = MoEConfig(d_model=d, d_ff=d_ff, num_experts=1, top_k=1, activation=activation,
                             dtype=dtype, compute_dtype=compute_dtype)
        self.params = init_expert_weights(self.cfg, rng)
        self.params["w2"] *= out_scale
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.experts = Experts(self.cfg, self.params, self.grads)
        self._lead: Optional[Tuple[int, ...]] = None  # the leading shape of forward's x

    def forward(self, x, padding_mask=None, training: bool = True, token_ids=None) -> MoEOutput:
        x = np.asarray(x)
        self._lead = x.shape[:-1]
        x2 = x.reshape(-1, self.cfg.d_model)
        mask = np.ones(x2.shape[0], bool) if padding_mask is None else np.asarray(padding_mask)
        y = self.experts.forward(x2, *every_token(mask, 1, x2.dtype))
        return MoEOutput(y.reshape(x.shape), None, 0.0, {})

    def backward(self, dy, aux_weight: float = 1.0) -> np.ndarray:
        assert self._lead is not None, "backward before forward"
        dx2, _ = self.experts.backward(np.asarray(dy).reshape(-1, self.cfg.d_model))
        return dx2.reshape(self._lead + (self.cfg.d_model,))

    def num_parameters(self) -> Dict[str, int]:
        total = int(sum(v.size for v in self.params.values()))
        return {"total": total, "active": total}


def build_ffn(d_model: int, d_ff: int, activation: str, moe: Optional[MoEConfig],
              rng: np.random.Generator, dtype: str, out_scale: float, compute_dtype: Optional[str] = None):
    """The FFN of one Block: a DenseFFN of width d_ff when `moe` is None, else a MoELayer
    with its own seed drawn from rng. out_scale shrinks the output projection (residual
    branches start small)."""
    if moe is None:
        return DenseFFN(d_model, d_ff, activation, rng, dtype, out_scale, compute_dtype)
    layer = MoELayer(dataclasses.replace(moe, seed=int(rng.integers(2**31))))
    layer.params["w2"] *= out_scale
    return layer
