"""MoELayer: a Router and its Experts joined (docs/design.md, "The MoE layer")."""
from __future__ import annotations

import math
import threading
from typing import Any, Dict, NamedTuple, Optional, Protocol, Tuple

import numpy as np

from ._checks import NonFiniteError, as_grad, as_mask, as_token_ids, as_tokens, sequence_length
from ._guard import OneCaller
from ._kernels import all_finite
from .config import MoEConfig, check_compute_dtype
from .experts import EXPERT_KEYS, Experts, SharedExperts, init_expert_weights, init_shared_weights
from .interventions import RoutingIntervention
from .routed_experts import RoutedExperts
from .router import ROUTER_PARAMS, Router, RouterOutput, check_differentiable, init_router_params


class ForwardContext:
    """What one forward of a MoELayer saved for its backward. Its MoEOutput holds it, so each
    output can be backpropagated on its own; the layer also keeps the latest one."""

    __slots__ = ("layer", "router_saved", "experts_saved", "shared_saved", "lead", "thread")

    def __init__(self, layer, router_saved, experts_saved, shared_saved, lead):
        self.layer, self.router_saved, self.experts_saved, self.shared_saved, self.lead = \
            layer, router_saved, experts_saved, shared_saved, lead
        self.thread = threading.get_ident()  # the thread that made this forward


class SavedForward(Protocol):
    """What MoEOutput.context holds: one forward's saved state for its layer's backward
    (ForwardContext for MoELayer; moe_py/distributed/layer.py has its own)."""

    layer: Any  # the layer that made the forward (MoEOutput.backward calls its backward)
    lead: Tuple[int, ...]  # x.shape[:-1] of that forward


class MoEOutput(NamedTuple):
    """What every FFN's forward returns (moe_py/ffn.py); a dense FFN has no router."""

    y: np.ndarray  # shape of x; 0 for padded tokens
    router: Optional[RouterOutput]  # None for a dense FFN
    aux_loss: float  # load_balance_coef*load_balance + z_loss_coef*z_loss + entropy_coef*entropy
    losses: Dict[str, float]  # the unweighted components: load_balance, z_loss, entropy
    context: Optional[SavedForward] = None  # this forward's saved state (MoE layers)

    def backward(self, dy, aux_weight: float = 1.0) -> np.ndarray:
        """The layer's backward for this very forward (even after later forwards)."""
        if self.context is None:
            raise RuntimeError("this output carries no forward state: call its layer's backward")
        return self.context.layer.backward(dy, aux_weight, out=self)


class MoELayer:
    """`layer(x, padding_mask=None, training=True, token_ids=None) -> MoEOutput`;
    `layer.backward(dy) -> dx`, the gradient of `sum(dy * y) + aux_loss` w.r.t. x,
    adding the parameter gradients into `grads` (`zero_grad()` clears them).
    token_ids (shape x.shape[:-1]) are read by the hash router only.

    params: w_router [d_model, E] (not for hash routing), b_router [E] (router_bias only),
    w1 [E, d_model, d_ff], w3 [E, d_model, d_ff] (gated activations only), w2 [E, d_ff, d_model],
    with cfg.ffn_bias b1, b3 [E, d_ff] (b3 gated only) and b2 [E, d_model], and with shared experts
    shared_w1 [S, d_model, shared_d_ff], shared_w3, shared_w2; grads: the same keys and
    shapes. It implements the FFN interface of moe_py/ffn.py.
    """

    has_router = True

    def __init__(self, cfg: MoEConfig):
        self.cfg = cfg
        rng = np.random.default_rng(cfg.seed)
        # drawn for every router, so that the experts start the same whatever the router
        self._params: Dict[str, np.ndarray] = init_router_params(cfg, rng)
        self._params.update(init_expert_weights(cfg, rng))
        self._params.update(init_shared_weights(cfg, rng))
        self._grads: Dict[str, np.ndarray] = {k: np.zeros_like(v) for k, v in self._params.items()}
        self._names = tuple(self._params)
        self.router = Router(cfg, self._params, self._grads)
        self.experts = Experts(cfg, self._params, self._grads)
        self.shared = SharedExperts(cfg, self._params, self._grads) if cfg.num_shared_experts else None
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

    def update_expert_bias(self) -> None:
        """The aux-loss-free expert-bias step (Router.update_expert_bias); the trainer
        calls it once per optimiser step, after all micro-batches."""
        self.router.update_expert_bias()

    def _check_keys(self) -> None:
        """params and grads are plain dicts a caller can edit: a deleted or added key is named
        here instead of surfacing as a KeyError deep inside a kernel call."""
        for what, d in (("params", self._params), ("grads", self._grads)):
            if set(d) != set(self._names):
                raise ValueError(f"{what}: expected the keys {sorted(self._names)}, got {sorted(d)} "
                                 "(a key was deleted or added)")

    def __call__(self, x, padding_mask=None, training: bool = True, token_ids=None,
                 routing: Optional[RoutingIntervention] = None,
                 compute_dtype: Optional[str] = None) -> MoEOutput:
        """routing: replay or force a routing, remove experts or change k for this call
        (moe_py/interventions.py). compute_dtype: "bfloat16" runs this call's expert GEMMs
        (and its backward's) in bfloat16 whatever cfg.compute_dtype says (torch autocast);
        None keeps the config's."""
        with self._guard.forward():
            self._check_keys()
            cfg = self.cfg
            check_compute_dtype(compute_dtype, cfg.dtype)
            x2, lead = as_tokens(x, cfg.d_model, cfg.np_dtype, owned=True)  # the router's backward reads it
            mask = as_mask(padding_mask, lead)
            ids = as_token_ids(token_ids, lead, required=cfg.traits.needs_token_ids)
            # nothing on the layer changes until every part has succeeded
            routed = self.router.compute(x2, mask, training,
                                         sequence_length(lead, cfg.load_balance_scope), ids, routing, lead)
            r = routed.output
            y2, saved = self.experts.compute(x2, r.topk_indices, r.topk_weights, r.dropped, compute_dtype)
            shared_saved = None
            if self.shared is not None:
                y_shared, shared_saved = self.shared.compute(x2, mask, compute_dtype)
                y2 += y_shared
            if not all_finite(y2):
                raise NonFiniteError(
                    f"x: the layer's output is not finite (max |x| = {np.abs(x2).max():.3g}; "
                    f"values this large overflow the router or the experts in {self.cfg.dtype})")
            public = self.router.commit(routed)
            ctx = ForwardContext(self, routed.saved, saved, shared_saved, lead)
            self._latest = ctx
            return MoEOutput(y2.reshape(lead + (self.cfg.d_model,)), public, routed.aux_loss,
                             dict(routed.losses), ctx)

    forward = __call__

    def backward(self, dy, aux_weight: float = 1.0, out: Optional[MoEOutput] = None) -> np.ndarray:
        """aux_weight scales the aux-loss gradient (e.g. 1/M when M micro-batches are
        accumulated and the aux loss is averaged over them); 1 is the contract above.
        `out` picks the forward to differentiate (default: the latest); `out.backward(dy)`
        says the same."""
        ctx = backward_context(self, out, aux_weight)
        check_differentiable(ctx.router_saved)
        with self._guard.backward(ctx.thread):
            self._check_keys()
            D = self.cfg.d_model
            dy2 = as_grad(dy, ctx.lead + (D,), self.cfg.np_dtype, "dy").reshape(-1, D)
            dx2, d_weights = self.experts.backward(dy2, ctx.experts_saved)
            if not all_finite(d_weights):
                raise NonFiniteError(f"dy: the gradient through the experts is not finite (max |dy| "
                                     f"= {np.abs(dy2).max():.3g} overflows in {self.cfg.dtype})")
            if ctx.shared_saved is not None:
                assert self.shared is not None  # shared_saved is only set by the shared experts
                dx2 += self.shared.backward(dy2, ctx.shared_saved)
            self.router.backward_into(d_weights, dx2, float(aux_weight), ctx.router_saved)
            if not all_finite(dx2):
                raise NonFiniteError(f"dx is not finite: dy (max |dy| = {np.abs(dy2).max():.3g}) "
                                     f"or aux_weight={aux_weight} x the aux-loss coefficients overflow "
                                     f"in {self.cfg.dtype}")
            return dx2.reshape(ctx.lead + (D,))

    def routed_experts(self) -> RoutedExperts:
        """This layer's experts for a routing the caller gives (moe_py/routed_experts.py):
        they share its weights and add into its grads."""
        return RoutedExperts(self.cfg, self._params, self._grads)

    def zero_grad(self) -> None:
        for g in self.grads.values():
            g.fill(0)

    def num_parameters(self) -> Dict[str, int]:
        """Total parameters, and those active per token: the router, k routed experts (expert
        choice: capacity_factor * k on average) and every shared expert."""
        total = sum(v.size for v in self.params.values())
        router = sum(self.params[k].size for k in ROUTER_PARAMS if k in self.params)
        per_expert = sum(self.params[k][0].size for k in EXPERT_KEYS if k in self.params)
        shared = sum(v.size for k, v in self.params.items() if k.startswith("shared_"))
        active = router + int(round(self.cfg.experts_per_token * per_expert)) + shared
        return {"total": int(total), "active": int(active)}


def backward_context(layer, out: Optional[MoEOutput], aux_weight):
    """The forward state a backward differentiates (out's, or the layer's latest), after
    checking the arguments every MoE layer's backward takes."""
    ctx = layer._latest if out is None else out.context
    if ctx is None:
        raise RuntimeError("backward called before forward")
    if ctx.layer is not layer:
        raise ValueError("out: the output of another layer")
    if isinstance(aux_weight, bool) or not isinstance(aux_weight, (int, float, np.number)) \
            or not math.isfinite(aux_weight):
        raise ValueError(f"aux_weight: expected a finite number, got {aux_weight!r}")
    return ctx


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
