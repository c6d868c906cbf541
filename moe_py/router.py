"""Token routing: RouterOutput and Router (docs/design.md, "Routing", "Routers", "Losses").

The maths lives in cpp/router.cpp, cpp/router_select.cpp and cpp/losses.cpp; this file
checks arguments, keeps the router's state (noise annealing, the expert bias and the loads
it is updated from) and what backward needs.
"""
from __future__ import annotations

import math
from typing import Any, Dict, NamedTuple, Optional

import numpy as np

from ._kernels import DropPolicy, GroupScore, RouterForwardResult, RouterKind, RouterOptions, kernel
from ._checks import (NonFiniteError, as_grad, as_mask, as_token_ids, as_tokens,
                      check_grad_buffer, check_param, check_row_count, sequence_length)
from ._guard import OneCaller
from . import interventions
from .config import MoEConfig, routers_with
from .interventions import RoutingIntervention

LOSS_NAMES = ("load_balance", "z_loss", "entropy")


class RouterOutput(NamedTuple):
    """Per-token routing decisions, all flattened to [T, ...] (T = prod(x.shape[:-1])).

    Padded tokens have all-zero probabilities and weights, entropy 0 and indices -1.
    Slots: k per token, except expert choice, where a token has as many slots as the most
    experts any token was taken by, and the unused ones hold -1 / weight 0.
    """

    topk_weights: np.ndarray  # [T, slots] combine weights; 0 for padded tokens, dropped and empty slots
    topk_indices: np.ndarray  # [T, slots] int64, descending selection score, ties to the lower index; -1 empty
    router_probs: np.ndarray  # [T, E] the scores after noise: softmax, sigmoid, sqrt(softplus), 1/k one-hot (hash)
    router_probs_clean: np.ndarray  # [T, E] the same scores before noise
    router_logits: np.ndarray  # [T, E] x @ w_router (+ b_router), before noise (hash: 0)
    entropy: np.ndarray  # [T] entropy of router_probs_clean normalised per token, in nats
    tokens_per_expert: np.ndarray  # [E] int64 real assignments, before capacity dropping
    dropped: np.ndarray  # [T, slots] bool, slots dropped for capacity


def row_entropy(probs: np.ndarray) -> np.ndarray:
    """-sum p log p of each row of probs [..., E] in nats (0 * log 0 = 0): the router
    kernel's own entropy, for any probabilities (noisy ones, a load, a label mix)."""
    probs = np.asarray(probs)
    if probs.dtype not in (np.float32, np.float64):
        raise TypeError(f"probs: expected float32 or float64, got {probs.dtype}")
    if probs.ndim < 1:
        raise ValueError("probs: expected shape [..., E]")
    flat = np.ascontiguousarray(probs.reshape(-1, probs.shape[-1]))
    return kernel("row_entropy", probs.dtype)(probs=flat).reshape(probs.shape[:-1])


def balance_distribution(probs: np.ndarray, mask: np.ndarray, router: str) -> np.ndarray:
    """[T, E]: what the load-balance loss averages for `router`'s scores `probs` (the
    probabilities, or sigmoid scores normalised per real token), by the kernel's own code."""
    return kernel("balance_distribution", probs.dtype)(
        probs=np.ascontiguousarray(probs), mask=np.asarray(mask, np.uint8), kind=RouterKind.__members__[router])


def _router_output(res: RouterForwardResult) -> RouterOutput:
    return RouterOutput(*(getattr(res, f) for f in RouterOutput._fields))


def read_only(r: RouterOutput) -> RouterOutput:
    """Read-only views of the routing arrays: backward reads the originals, so what a user
    is handed must not write into them."""
    views = []
    for a in r:
        v = a.view()
        v.flags.writeable = False
        views.append(v)
    return RouterOutput(*views)


class _Saved(NamedTuple):
    """What a forward keeps for its backward."""
    x2: np.ndarray
    w: Optional[np.ndarray]  # None for hash routing
    mask: np.ndarray
    routed: RouterOutput
    training: bool
    options: RouterOptions
    balance_counts: Optional[np.ndarray]  # the global scope's earlier loads
    # an ablated or re-k'd forward (moe_py/interventions.py): its weights are not the ones
    # router_backward differentiates, so it has no backward
    inference_only: bool = False


def check_differentiable(saved: _Saved) -> None:
    """Refuse the backward of a forward that removed experts or changed top_k."""
    if saved.inference_only:
        raise RuntimeError("backward: this forward removed experts or changed top_k "
                           "(routing.ablate / routing.top_k), which is for inference only")


class _Routed(NamedTuple):
    output: RouterOutput  # the arrays backward reads (never handed out as they are)
    losses: Dict[str, float]
    aux_loss: float
    saved: _Saved


def init_router_weight(cfg: MoEConfig, rng: np.random.Generator) -> np.ndarray:
    # small so that routing starts close to uniform (as Megatron's 0.02 init std)
    w = rng.standard_normal((cfg.d_model, cfg.num_experts)) * 0.02
    return w.astype(cfg.np_dtype)


# The router's parameters, by name: the weight and the optional logit bias.
ROUTER_PARAMS = ("w_router", "b_router")


def init_router_params(cfg: MoEConfig, rng: np.random.Generator) -> Dict[str, np.ndarray]:
    """w_router [d_model, E], drawn from rng for every router (so that what is drawn after it
    does not depend on the router), and with router_bias b_router [E] at 0 (a bias at 0 routes
    as the router without one); {} for a router without a weight."""
    w = init_router_weight(cfg, rng)
    if not cfg.traits.has_weight:
        return {}
    params = {"w_router": w}
    if cfg.router_bias:
        params["b_router"] = np.zeros(cfg.num_experts, cfg.np_dtype)
    return params


class Router:
    """The router of MoEConfig.router, usable on its own (docs/design.md, "Routers").

    `router(x, padding_mask=None, training=True, token_ids=None) -> RouterOutput`; the
    losses of that call are in `router.losses` (unweighted) and `router.aux_loss`
    (weighted sum). `router.backward(d_topk_weights=None) -> dx` is the gradient of
    `sum(d_topk_weights * topk_weights) + aux_loss`; it adds into `grads`.
    The hash router has no weight (params holds no w_router) and needs token_ids.

    State that is not a parameter: `expert_bias` (the selection-only bias of the top-k
    routers, moved by update_expert_bias() when bias_update_rate > 0), the expert loads of the
    training forwards since the last update_expert_bias() (which the global balance scope
    also reads), and the noise. With router_bias, params["b_router"] [E] is a learned bias of
    the logits (a parameter, with a gradient).

    `params`/`grads` may be passed in so a layer shares one dict with its router.
    """

    def __init__(self, cfg: MoEConfig, params: Optional[Dict[str, np.ndarray]] = None,
                 grads: Optional[Dict[str, np.ndarray]] = None):
        self.cfg = cfg
        self.params = params if params is not None else {}
        self.grads = grads if grads is not None else {}
        self.has_weight = cfg.traits.has_weight
        for name, value in init_router_params(cfg, np.random.default_rng(cfg.seed)).items():
            self.params.setdefault(name, value)
            self.grads.setdefault(name, np.zeros_like(self.params[name]))
        self.expert_bias: np.ndarray = np.zeros(cfg.num_experts, cfg.np_dtype)
        self.step_loads = np.zeros(cfg.num_experts, np.int64)
        self._noise_start = 0.0
        self._noise_anneal_steps = 1
        self._noise_step = 0
        self._saved: Optional[_Saved] = None
        self._guard = OneCaller("Router")
        self.losses: Dict[str, float] = {name: 0.0 for name in LOSS_NAMES}
        self.aux_loss = 0.0

    # ---- noise annealing (opt-in) --------------------------------------------
    def set_noise_annealing(self, start_std: float, anneal_steps: int) -> None:
        """Turn on NoisyTop-k: std(step) = start_std * max(0, 1 - step / anneal_steps),
        step = training-mode forward calls since this call."""
        if not self.cfg.traits.picks_by_score:
            raise ValueError(f"start_std: router noise needs one of {routers_with('picks_by_score')}, "
                             f"not {self.cfg.router!r}")
        if isinstance(start_std, bool) or not isinstance(start_std, (int, float, np.number)) \
                or not math.isfinite(start_std) or start_std < 0:
            raise ValueError(f"start_std: expected a finite number >= 0, got {start_std!r}")
        # noise of this std (draws reach ~10 std) must stay finite in the layer's dtype
        limit = float(np.finfo(self.cfg.np_dtype).max) / 1e3
        if start_std > limit:
            raise ValueError(f"start_std: expected at most {limit:.3g} for a {self.cfg.dtype} "
                             f"router (larger noise overflows the logits), got {start_std!r}")
        if isinstance(anneal_steps, bool) or not isinstance(anneal_steps, (int, np.integer)) \
                or anneal_steps < 1:
            raise ValueError(f"anneal_steps: expected a positive integer, got {anneal_steps!r}")
        self._noise_start = float(start_std)
        self._noise_anneal_steps = int(anneal_steps)
        self._noise_step = 0

    @property
    def noise_std(self) -> float:
        """The noise std the next training-mode forward uses (0.0 when noise is off)."""
        return self._noise_start * max(0.0, 1.0 - self._noise_step / self._noise_anneal_steps)

    # ---- the aux-loss-free expert bias (the top-k routers) ------------------------
    def update_expert_bias(self) -> None:
        """DeepSeek-V3's bias step from the loads since the last call (training forwards,
        real tokens only): b_e += bias_update_rate * sign(mean_load - load_e); then the
        loads start again from 0. A router without the bias only clears the loads."""
        rate = self.cfg.bias_rate
        if rate > 0:
            loads = self.step_loads.astype(np.float64)
            step = rate * np.sign(loads.mean() - loads)
            self.expert_bias[...] = (self.expert_bias.astype(np.float64) + step).astype(self.cfg.np_dtype)
        self.step_loads[...] = 0

    # ---- state that is not a parameter (checkpoints keep it) ----------------------
    def state(self) -> Dict[str, object]:
        return {"start_std": self._noise_start, "anneal_steps": self._noise_anneal_steps,
                "step": self._noise_step, "expert_bias": [float(b) for b in self.expert_bias],
                "step_loads": [int(c) for c in self.step_loads]}

    def load_state(self, state: Dict[str, Any]) -> None:
        """Restore state(); a file written before the expert bias existed has no bias."""
        missing = [k for k in ("start_std", "anneal_steps", "step")
                   if not isinstance(state, dict) or k not in state]
        if missing:
            raise ValueError(f"state: expected a router state with {missing}, got {state!r:.80}")
        self._noise_start = float(state["start_std"])
        self._noise_anneal_steps = int(state["anneal_steps"])
        self._noise_step = int(state["step"])
        E = self.cfg.num_experts
        for key, target in (("expert_bias", self.expert_bias), ("step_loads", self.step_loads)):
            values = np.asarray(state.get(key, np.zeros(E)), dtype=target.dtype)
            if values.shape != (E,):
                raise ValueError(f"state['{key}']: expected {E} values, got {values.shape}")
            target[...] = values

    # ---- forward / backward --------------------------------------------------
    def _check_params(self) -> Optional[np.ndarray]:
        if not self.has_weight:
            return None
        w = self.params["w_router"]
        check_param(w, (self.cfg.d_model, self.cfg.num_experts), self.cfg.np_dtype, "w_router")
        return w

    def _check_bias(self) -> Optional[np.ndarray]:
        if not self.cfg.router_bias:
            return None
        b = self.params["b_router"]
        check_param(b, (self.cfg.num_experts,), self.cfg.np_dtype, "b_router")
        return b

    def options(self, training: bool, seq_len: int = 0) -> RouterOptions:
        """The kernel options of one call (the backward reuses the forward's)."""
        cfg = self.cfg
        o = RouterOptions()
        o.kind = RouterKind.__members__[cfg.router]
        o.top_k = cfg.top_k
        o.normalize_topk = bool(cfg.normalize_topk)
        o.straight_through = bool(cfg.straight_through)
        o.training = bool(training)
        o.noise_std = self.noise_std if training else 0.0
        o.noise_seed = cfg.seed
        o.noise_step = self._noise_step
        o.capacity_factor = -1.0 if cfg.capacity is None else float(cfg.capacity)
        o.drop_policy = DropPolicy.__members__[cfg.drop_policy]
        o.routed_scaling_factor = float(cfg.routed_scaling_factor)
        o.topk_norm_min = float(cfg.topk_norm_min)
        o.n_group, o.topk_group = cfg.n_group, cfg.topk_group
        o.group_score = GroupScore.__members__[cfg.group_score]
        o.sinkhorn_iterations = cfg.sinkhorn_iterations
        o.sinkhorn_tolerance = float(cfg.sinkhorn_tolerance)
        o.hash_seed = cfg.seed
        o.seq_len = seq_len
        return o

    def compute(self, x2: np.ndarray, mask: np.ndarray, training: bool, seq_len: int = 0,
                token_ids: Optional[np.ndarray] = None, routing: Optional[RoutingIntervention] = None,
                lead: Optional[tuple] = None) -> _Routed:
        """Route already-checked tokens x2 [T, d_model] with mask uint8 [T] (seq_len: rows
        per sequence for the sequence balance scope; token_ids int64 [T] for hash; routing:
        an intervention, moe_py/interventions.py, for tokens of leading shape `lead`);
        changes nothing on the router until commit() (a forward that fails later leaves it
        as it was)."""
        cfg = self.cfg
        w = self._check_params()
        forced = available = None
        k = cfg.top_k
        if routing is not None:
            forced, available, k = interventions.checked(routing, cfg, lead or (x2.shape[0],), mask, training)
        check_row_count(x2.shape[0] * k, "x")
        opt = self.options(training, seq_len)
        opt.top_k = k
        # the global scope counts the loads of this step's earlier training forwards
        counts = self.step_loads.copy() if training and cfg.load_balance_scope == "global" else None
        bias = self.expert_bias if cfg.traits.expert_bias else None
        res = kernel("router_forward", cfg.np_dtype)(
            x=x2, w_router=w, mask=mask, num_experts=cfg.num_experts, options=opt,
            expert_bias=bias, balance_counts=counts, token_ids=token_ids, forced_indices=forced,
            expert_mask=available, b_router=self._check_bias())
        losses = {"load_balance": res.load_balance, "z_loss": res.z_loss, "entropy": res.entropy_loss}
        aux = float(cfg.load_balance_coef * losses["load_balance"] + cfg.z_loss_coef * losses["z_loss"]
                    + cfg.entropy_coef * losses["entropy"])
        if not math.isfinite(aux):
            raise NonFiniteError(
                f"aux_loss is not finite: load_balance_coef={cfg.load_balance_coef} x {losses['load_balance']}"
                f" + z_loss_coef={cfg.z_loss_coef} x {losses['z_loss']} + entropy_coef="
                f"{cfg.entropy_coef} x {losses['entropy']} (x too large, or a coefficient too large)")
        routed = _router_output(res)
        if available is not None and routing is not None and routing.renormalize:
            interventions.renormalize_weights(routed.topk_weights, routed.router_probs, available, mask)
        inference_only = routing is not None and routing.inference_only
        return _Routed(routed, losses, aux, _Saved(x2, w, mask, routed, bool(training), opt, counts,
                                                   inference_only))

    def commit(self, r: _Routed) -> RouterOutput:
        """Keep a computed routing for backward; returns the read-only view users get."""
        if r.saved.training:
            if self._noise_start > 0:
                self._noise_step += 1
            self.step_loads += r.output.tokens_per_expert
        self.losses, self.aux_loss, self._saved = r.losses, r.aux_loss, r.saved
        return read_only(r.output)

    def __call__(self, x, padding_mask=None, training: bool = True, token_ids=None,
                 routing: Optional[RoutingIntervention] = None) -> RouterOutput:
        with self._guard.forward():
            x2, lead = as_tokens(x, self.cfg.d_model, self.cfg.np_dtype)
            mask = as_mask(padding_mask, lead)
            ids = as_token_ids(token_ids, lead, required=self.cfg.traits.needs_token_ids)
            seq_len = sequence_length(lead, self.cfg.load_balance_scope)
            out = self.commit(self.compute(x2, mask, training, seq_len, ids, routing, lead))
            self._lead = lead
            return out

    forward = __call__

    def backward_into(self, d_topk_weights: Optional[np.ndarray], dx2: np.ndarray,
                      aux_weight: float = 1.0, saved: Optional["_Saved"] = None,
                      balance_scale: float = 1.0, token_scale: float = 1.0) -> None:
        """Add the gradient of sum(d_topk_weights * topk_weights) + aux_weight * aux_loss
        w.r.t. the flattened x into dx2 [T, d_model], and w.r.t. w_router into grads.
        `saved`: a forward's saved state (default: the latest forward's). balance_scale and
        token_scale further scale the load-balance and the z-loss/entropy coefficients (an
        expert-parallel rank's share of the global batch)."""
        saved = self._saved if saved is None else saved
        if saved is None:
            raise RuntimeError("backward called before forward")
        r = saved.routed
        cfg = self.cfg
        if d_topk_weights is not None:
            d_topk_weights = as_grad(d_topk_weights, r.topk_weights.shape, cfg.np_dtype,
                                     "d_topk_weights")
        if not self.has_weight:
            return  # hash routing: no weight, and nothing it computes depends on x
        assert saved.w is not None  # a router with a weight saved it (_check_params)
        check_grad_buffer(self.grads.get("w_router"), saved.w.shape, cfg.np_dtype,
                          "grads['w_router']")
        db = None
        if cfg.router_bias:
            db = self.grads.get("b_router")
            check_grad_buffer(db, (cfg.num_experts,), cfg.np_dtype, "grads['b_router']")
        kernel("router_backward", cfg.np_dtype)(
            x=saved.x2, w_router=saved.w, mask=saved.mask, router_logits=r.router_logits,
            router_probs_clean=r.router_probs_clean, router_probs=r.router_probs,
            entropy=r.entropy, topk_indices=r.topk_indices, dropped=r.dropped.view(np.uint8),
            tokens_per_expert=r.tokens_per_expert, d_topk_weights=d_topk_weights,
            options=saved.options, balance_counts=saved.balance_counts,
            load_balance_coef=aux_weight * cfg.load_balance_coef * balance_scale,
            z_loss_coef=aux_weight * cfg.z_loss_coef * token_scale,
            entropy_coef=aux_weight * cfg.entropy_coef * token_scale,
            dx=dx2, dw_router=self.grads["w_router"], db_router=db)

    def backward(self, d_topk_weights: Optional[np.ndarray] = None) -> np.ndarray:
        """Gradient of sum(d_topk_weights * topk_weights) + aux_loss; returns dx (shape of x)."""
        with self._guard.backward():
            if self._saved is None:
                raise RuntimeError("backward called before forward")
            check_differentiable(self._saved)
            dx2 = np.zeros_like(self._saved.x2)
            self.backward_into(d_topk_weights, dx2)
            return dx2.reshape(self._lead + (self.cfg.d_model,))

    def zero_grad(self) -> None:
        for g in self.grads.values():
            g.fill(0)


def unrouted_tokens(r: RouterOutput, real: np.ndarray) -> np.ndarray:
    """bool [T]: the real tokens (real: bool [T]) that no expert processes, because no expert
    took them (expert choice) or every slot was dropped for capacity."""
    live = (r.topk_indices >= 0) & ~r.dropped
    return np.asarray(real, bool).reshape(-1) & ~live.any(axis=1)


_SLOT_FILL = {"topk_weights": 0, "topk_indices": -1, "dropped": False}


def concat_router_outputs(outputs) -> RouterOutput:
    """RouterOutputs of several batches as one: the per-token fields concatenated (slot
    fields padded to the widest batch with -1 / 0 / False: expert choice's slots vary),
    tokens_per_expert summed."""
    outputs = list(outputs)
    width = max(r.topk_indices.shape[1] for r in outputs)
    fields = []
    for f in RouterOutput._fields:
        parts = [getattr(r, f) for r in outputs]
        if f == "tokens_per_expert":
            fields.append(sum(parts))
            continue
        if f in _SLOT_FILL:
            parts = [np.pad(p, ((0, 0), (0, width - p.shape[1])), constant_values=_SLOT_FILL[f])
                     for p in parts]
        fields.append(np.concatenate(parts))
    return RouterOutput(*fields)
