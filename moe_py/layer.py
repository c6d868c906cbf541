"""MoELayer: a Router and its Experts joined (docs/design.md, "The MoE layer")."""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional

import numpy as np

from ._checks import as_grad, as_mask, as_tokens
from .config import MoEConfig
from .experts import Experts, init_expert_weights
from .router import Router, RouterOutput, init_router_weight


class MoEOutput(NamedTuple):
    """What every FFN's forward returns (moe_py/ffn.py); a dense FFN has no router."""

    y: np.ndarray  # shape of x; 0 for padded tokens
    router: Optional[RouterOutput]  # None for a dense FFN
    aux_loss: float  # load_balance_coef*load_balance + z_loss_coef*z_loss + entropy_coef*entropy
    losses: Dict[str, float]  # the unweighted components: load_balance, z_loss, entropy


class MoELayer:
    """`layer(x, padding_mask=None, training=True) -> MoEOutput`;
    `layer.backward(dy) -> dx`, the gradient of `sum(dy * y) + aux_loss` w.r.t. x,
    adding the parameter gradients into `grads` (`zero_grad()` clears them).

    params: w_router [d_model, E], w1 [E, d_model, d_ff], w3 [E, d_model, d_ff]
    (swiglu only), w2 [E, d_ff, d_model]; grads: the same keys and shapes.
    It implements the FFN interface of moe_py/ffn.py.
    """

    has_router = True

    def __init__(self, cfg: MoEConfig):
        self.cfg = cfg
        rng = np.random.default_rng(cfg.seed)
        self.params: Dict[str, np.ndarray] = {"w_router": init_router_weight(cfg, rng)}
        self.params.update(init_expert_weights(cfg, rng))
        self.grads: Dict[str, np.ndarray] = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.router = Router(cfg, self.params, self.grads)
        self.experts = Experts(cfg, self.params, self.grads)
        self._lead = None

    def set_noise_annealing(self, start_std: float, anneal_steps: int) -> None:
        self.router.set_noise_annealing(start_std, anneal_steps)

    @property
    def noise_std(self) -> float:
        return self.router.noise_std

    def __call__(self, x, padding_mask=None, training: bool = True) -> MoEOutput:
        x2, lead = as_tokens(x, self.cfg.d_model, self.cfg.np_dtype)
        mask = as_mask(padding_mask, lead)
        r = self.router.route(x2, mask, training)
        y2 = self.experts.forward(x2, r.topk_indices, r.topk_weights, r.dropped)
        self._lead = lead
        return MoEOutput(y2.reshape(lead + (self.cfg.d_model,)), r, self.router.aux_loss,
                         dict(self.router.losses))

    forward = __call__

    def backward(self, dy, aux_weight: float = 1.0) -> np.ndarray:
        """aux_weight scales the aux-loss gradient (e.g. 1/M when M micro-batches are
        accumulated and the aux loss is averaged over them); 1 is the contract above."""
        if self._lead is None:
            raise RuntimeError("backward called before forward")
        D = self.cfg.d_model
        dy2 = as_grad(dy, self._lead + (D,), self.cfg.np_dtype, "dy").reshape(-1, D)
        dx2, d_weights = self.experts.backward(dy2)
        self.router.backward_into(d_weights, dx2, aux_weight)
        return dx2.reshape(self._lead + (D,))

    def zero_grad(self) -> None:
        for g in self.grads.values():
            g.fill(0)

    def num_parameters(self) -> Dict[str, int]:
        """Total parameters, and those active per token (router + k experts)."""
        total = sum(v.size for v in self.params.values())
        per_expert = sum(v[0].size for k, v in self.params.items() if k != "w_router")
        active = self.params["w_router"].size + self.cfg.top_k * per_expert
        return {"total": int(total), "active": int(active)}
