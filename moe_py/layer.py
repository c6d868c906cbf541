"""MoELayer: a Router and its Experts joined (docs/design.md, "The MoE layer")."""
from __future__ import annotations

import math
from typing import Dict, NamedTuple, Optional

import numpy as np

from ._checks import NonFiniteError, as_grad, as_mask, as_tokens
from ._guard import OneCaller
from .config import MoEConfig
from .experts import Experts, init_expert_weights
from .router import Router, RouterOutput, init_router_weight


class ForwardContext:
    """What one forward of a MoELayer saved for its backward. Its MoEOutput holds it, so each
    output can be backpropagated on its own; the layer also keeps the latest one."""

    __slots__ = ("layer", "router_saved", "experts_saved", "lead")

    def __init__(self, layer, router_saved, experts_saved, lead):
        self.layer, self.router_saved, self.experts_saved, self.lead = \
            layer, router_saved, experts_saved, lead


class MoEOutput(NamedTuple):
    """What every FFN's forward returns (moe_py/ffn.py); a dense FFN has no router."""

    y: np.ndarray  # shape of x; 0 for padded tokens
    router: Optional[RouterOutput]  # None for a dense FFN
    aux_loss: float  # load_balance_coef*load_balance + z_loss_coef*z_loss + entropy_coef*entropy
    losses: Dict[str, float]  # the unweighted components: load_balance, z_loss, entropy
    context: Optional[ForwardContext] = None  # this forward's saved state (MoELayer)

    def backward(self, dy, aux_weight: float = 1.0) -> np.ndarray:
        """The layer's backward for this very forward (even after later forwards)."""
        if self.context is None:
            raise RuntimeError("this output carries no forward state: call its layer's backward")
        return self.context.layer.backward(dy, aux_weight, out=self)


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
        self._params: Dict[str, np.ndarray] = {"w_router": init_router_weight(cfg, rng)}
        self._params.update(init_expert_weights(cfg, rng))
        self._grads: Dict[str, np.ndarray] = {k: np.zeros_like(v) for k, v in self._params.items()}
        self.router = Router(cfg, self._params, self._grads)
        self.experts = Experts(cfg, self._params, self._grads)
        self._latest: Optional[ForwardContext] = None
        self._guard = OneCaller("MoELayer")

    # The router and the experts share these two dicts: assigning a new dict replaces the
    # arrays inside them, so that the layer never keeps computing with the old ones.
    @property
    def params(self) -> Dict[str, np.ndarray]:
        return self._params

    @params.setter
    def params(self, new: Dict[str, np.ndarray]) -> None:
        _replace_arrays(self._params, new, "params")

    @property
    def grads(self) -> Dict[str, np.ndarray]:
        return self._grads

    @grads.setter
    def grads(self, new: Dict[str, np.ndarray]) -> None:
        _replace_arrays(self._grads, new, "grads")

    def state_dict(self) -> Dict[str, np.ndarray]:
        """Copies of the parameters (the config is in layer.cfg; moe_py.save keeps both)."""
        return {k: v.copy() for k, v in self._params.items()}

    def load_state_dict(self, state: Dict[str, np.ndarray]) -> None:
        """Load parameters saved by state_dict(): the same keys, shapes and dtypes, finite."""
        _replace_arrays(self._params, state, "state")

    def set_noise_annealing(self, start_std: float, anneal_steps: int) -> None:
        self.router.set_noise_annealing(start_std, anneal_steps)

    @property
    def noise_std(self) -> float:
        return self.router.noise_std

    def __call__(self, x, padding_mask=None, training: bool = True) -> MoEOutput:
        with self._guard.forward():
            x2, lead = as_tokens(x, self.cfg.d_model, self.cfg.np_dtype)
            mask = as_mask(padding_mask, lead)
            # nothing on the layer changes until both halves have succeeded
            routed = self.router.compute(x2, mask, training)
            r = routed.output
            y2, saved = self.experts.compute(x2, r.topk_indices, r.topk_weights, r.dropped)
            if not np.isfinite(y2).all():
                raise NonFiniteError(
                    f"x: the layer's output is not finite (max |x| = {np.abs(x2).max():.3g}; "
                    f"values this large overflow the router or the experts in {self.cfg.dtype})")
            public = self.router.commit(routed)
            ctx = ForwardContext(self, routed.saved, saved, lead)
            self._latest = ctx
            return MoEOutput(y2.reshape(lead + (self.cfg.d_model,)), public, routed.aux_loss,
                             dict(routed.losses), ctx)

    forward = __call__

    def backward(self, dy, aux_weight: float = 1.0, out: Optional[MoEOutput] = None) -> np.ndarray:
        """aux_weight scales the aux-loss gradient (e.g. 1/M when M micro-batches are
        accumulated and the aux loss is averaged over them); 1 is the contract above.
        `out` picks the forward to differentiate (default: the latest); `out.backward(dy)`
        says the same."""
        with self._guard.backward():
            ctx = self._latest if out is None else out.context
            if ctx is None:
                raise RuntimeError("backward called before forward")
            if ctx.layer is not self:
                raise ValueError("out: the output of another layer")
            if isinstance(aux_weight, bool) or not isinstance(aux_weight, (int, float, np.number)) \
                    or not math.isfinite(aux_weight):
                raise ValueError(f"aux_weight: expected a finite number, got {aux_weight!r}")
            D = self.cfg.d_model
            dy2 = as_grad(dy, ctx.lead + (D,), self.cfg.np_dtype, "dy").reshape(-1, D)
            dx2, d_weights = self.experts.backward(dy2, ctx.experts_saved)
            if not np.isfinite(d_weights).all():
                raise NonFiniteError(f"dy: the gradient through the experts is not finite (max |dy| "
                                     f"= {np.abs(dy2).max():.3g} overflows in {self.cfg.dtype})")
            self.router.backward_into(d_weights, dx2, float(aux_weight), ctx.router_saved)
            if not np.isfinite(dx2).all():
                raise NonFiniteError(f"dx is not finite: dy (max |dy| = {np.abs(dy2).max():.3g}) "
                                     f"or aux_weight={aux_weight} x the aux-loss coefficients overflow "
                                     f"in {self.cfg.dtype}")
            return dx2.reshape(ctx.lead + (D,))

    def zero_grad(self) -> None:
        for g in self.grads.values():
            g.fill(0)

    def num_parameters(self) -> Dict[str, int]:
        """Total parameters, and those active per token (router + k experts)."""
        total = sum(v.size for v in self.params.values())
        per_expert = sum(v[0].size for k, v in self.params.items() if k != "w_router")
        active = self.params["w_router"].size + self.cfg.top_k * per_expert
        return {"total": int(total), "active": int(active)}


def _replace_arrays(target: Dict[str, np.ndarray], new: Dict[str, np.ndarray], what: str) -> None:
    """Copy `new`'s arrays into `target`, in place, after checking they match key by key."""
    if not isinstance(new, dict) or set(new) != set(target):
        keys = sorted(new) if isinstance(new, dict) else type(new).__name__
        raise ValueError(f"{what}: expected a dict with keys {sorted(target)}, got {keys}")
    for k, v in new.items():
        v = np.asarray(v)
        if v.shape != target[k].shape or v.dtype != target[k].dtype:
            raise ValueError(f"{what}['{k}']: expected {target[k].dtype} {list(target[k].shape)}, "
                             f"got {v.dtype} {list(v.shape)}")
        if what != "grads" and not np.isfinite(v).all():
            raise ValueError(f"{what}['{k}']: contains NaN or Inf")
    for k, v in new.items():
        target[k][...] = v
