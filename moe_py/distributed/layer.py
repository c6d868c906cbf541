"""ExpertParallelMoELayer: MoELayer's API and maths with the experts spread over MPI ranks.

Rank q of P holds experts [q E/P, (q+1) E/P) of the layer and a replica of the router
(and of the shared experts, if any).
Each rank passes its own tokens, and the layer behaves as one MoELayer given the global
batch (every rank's tokens, in rank order):

  forward   route locally (Router.compute, dropless) -> global stats (one Allgather:
            tokens_per_expert, sum of probabilities, loss sums) -> capacity over the
            global batch -> the experts with an AllToAllDispatcher
            (moe_py/distributed/dispatch.py: rows to the experts' ranks and back)
  backward  the experts' backward through the same dispatcher (expert weight gradients
            stay on their rank) -> router_backward with the global statistics; the
            replicated gradients (router, shared experts) are summed over ranks (see below)

Why a sum, not a mean: every rank's share of the objective is already normalised by the
global batch (the aux losses by the global R; the trainer weights each rank's tokens by
n_r / N_global), so the ranks' gradients add up to the single-process one exactly, also
when padding leaves the ranks uneven loads. Averaging per-rank means would match only for
equal loads.

The experts see exactly the rows of the single-process layer in its order (see the
dispatcher), so their outputs and weight gradients are bitwise those of MoELayer. The
router's losses and their gradients combine per-rank partial sums, so they match to
rounding (1e-15 relative in float64).

Every rank calls every collective in the same order, whatever its tokens: a rank with no
tokens, or no rows for some expert, sends and receives zero counts. Supported: every router
of MoEConfig, every balance scope, group-limited top-k, shared experts (replicated: data
parallel), router noise (each rank's draws start at its first token's index in the global
batch).

Two ways to route:
  token by token (softmax_topk, sigmoid_topk, sqrtsoftplus_topk, hash): as above; hash reads this rank's
            token_ids and has no router weight (nothing to all-reduce, no router backward).
  global    (expert_choice, sinkhorn: the traits' chooses_over_batch): their choices depend on the whole
            batch (an expert's top-C tokens, Sinkhorn's column balancing), so no rank can
            route its tokens alone. One Allgatherv of x and of the mask gives every rank the
            global batch, which it routes with the single-process Router (capacity
            included): the routing, the losses and expert choice's capacity and slot width
            are bitwise those of MoELayer, and each rank keeps its own rows for dispatch and
            combine. Backward: one Allgatherv of d_topk_weights, then every rank runs the
            router backward on the global batch, with this rank's dx rows (from the experts)
            in place and zeros elsewhere, and keeps its rows of dx: bitwise too (a GEMM row
            depends on its own row only). The router gradient, the same on every rank, is
            kept by rank 0 alone (the others hold 0 for it), so the sum over ranks that the
            replicated gradients go through gives it exactly, once.
            Cost: every rank sends its T_r x d_model rows of x to the P - 1 others and
            routes the global batch (router FLOPs and memory P times over); fine for the
            router's share of a layer at small P, the first thing to replace at large P
            (allgather the logits [T, E] instead of x, which needs the kernel split in two).
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Dict, Optional, Tuple

import numpy as np

from .._checks import NonFiniteError, as_grad, as_mask, as_token_ids, as_tokens, sequence_length
from .._guard import OneCaller
from .._kernels import load_balance_of_sums
from ..config import MoEConfig
from ..layer import MoELayer, MoEOutput, _replace_arrays, backward_context
from ..experts import EXPERT_KEYS, Experts, SharedExperts
from ..capacity import capacity, drops_position, drops_probs, slot_counts
from ..router import ROUTER_PARAMS, Router, RouterOutput, _Saved, balance_distribution, read_only
from . import comm as C
from .dispatch import BACKWARD_PHASES as DISPATCH_BACKWARD, FORWARD_PHASES as DISPATCH_FORWARD
from .dispatch import AllToAllDispatcher

# The routed experts' parameters (weights and, with ffn_bias, biases: all [E, ...]) are split
# over the ranks along their expert axis, EXPERT_KEYS of moe_py/experts.py; every other
# parameter is replicated.
_HEAD = 6  # stats vector: T, R, sum lse^2, sum entropy, sum of sequence balance losses, sequences
# Timed per call into `timings` (seconds, accumulated): the dispatcher's phases, and the
# layer's own. The global routers' allgathers are in "route" (x, mask) and "router_bwd"
# (d_topk_weights).
FORWARD_PHASES = ("route",) + DISPATCH_FORWARD
BACKWARD_PHASES = DISPATCH_BACKWARD + ("router_bwd", "allreduce")


class _Context:
    """One forward's saved state (an MoEOutput carries it, as MoELayer's)."""

    __slots__ = ("layer", "router_saved", "lead", "scales", "experts_saved", "shared_saved", "rows")
    layer: ExpertParallelMoELayer
    router_saved: _Saved
    lead: Tuple[int, ...]
    scales: Optional[Tuple[float, float]]  # token-by-token routing: (balance, token) shares
    experts_saved: tuple
    shared_saved: Optional[tuple]
    rows: Optional[Tuple[int, int, np.ndarray]]  # global routing: this rank's rows, every rank's count

    def __init__(self, layer: ExpertParallelMoELayer, router_saved: _Saved, lead: Tuple[int, ...],
                 scales: Optional[Tuple[float, float]], experts_saved: tuple,
                 shared_saved: Optional[tuple], rows: Optional[Tuple[int, int, np.ndarray]]):
        self.layer, self.router_saved, self.lead, self.scales = layer, router_saved, lead, scales
        self.experts_saved, self.shared_saved, self.rows = experts_saved, shared_saved, rows


class _RankRouter(Router):
    """A Router whose noise draws continue the single-process ones: this rank's row 0 is
    row `token_offset` of the global batch (the kernel's noise counter starts there)."""

    token_offset = 0

    def options(self, training: bool, seq_len: int = 0):
        o = super().options(training, seq_len)
        o.noise_token_offset = self.token_offset
        return o


class ExpertParallelMoELayer:
    """MoELayer's API (`layer(x, padding_mask, training) -> MoEOutput`, `backward(dy)`),
    the experts split over the ranks of `comm`. A collective: every rank calls forward and
    backward together, each with its own tokens (any count, 0 included).

    params: w1/w3 [E/P, d_model, d_ff] and w2 [E/P, d_ff, d_model], with ffn_bias b1/b3
    [E/P, d_ff] and b2 [E/P, d_model] (this rank's experts, `expert_range`); replicated:
    w_router [d_model, E] (and b_router [E]) and the shared experts' shared_*.
    `full_params` (a MoELayer's params) sets the weights; by default they are
    MoELayer(cfg)'s, so the same seed gives the same layer at any P. The outputs'
    per-token arrays are this rank's tokens; losses and tokens_per_expert are those of the
    global batch. reduce_replicated_grads=False leaves each rank's own gradient of the
    replicated weights in grads (a trainer that all-reduces every replicated gradient at
    once sets it); True sums them over ranks in each backward.
    Routers: all of MoEConfig's (softmax_topk, sigmoid_topk, sqrtsoftplus_topk and hash
    route token by token; expert_choice and sinkhorn route the allgathered global batch: see
    the module docstring), any balance scope, group-limited top-k, shared experts, router
    noise, a router bias.
    The hash router needs `token_ids` (this rank's, shape x.shape[:-1]).
    """

    has_router = True

    def __init__(self, cfg: MoEConfig, comm=None, full_params: Optional[Dict[str, np.ndarray]] = None,
                 reduce_replicated_grads: bool = True):
        if not isinstance(cfg, MoEConfig):
            raise TypeError(f"cfg: expected a MoEConfig, got {type(cfg).__name__}")
        self.comm = C.check_comm(comm)
        P, rank = self.comm.Get_size(), self.comm.Get_rank()
        self.dispatcher = AllToAllDispatcher(self.comm, cfg.num_experts)  # checks that P divides E
        self.cfg, self.size, self.rank = cfg, P, rank
        self.local_experts = self.dispatcher.per_rank
        self.expert_range = self.dispatcher.local_experts(cfg.num_experts)
        reference = MoELayer(cfg)  # the single-process layer's initial weights (same seed)
        if full_params is not None:  # checks keys, shapes, dtypes, finiteness
            _replace_arrays(reference.params, full_params, "full_params")
        lo, hi = self.expert_range
        self.params: Dict[str, np.ndarray] = {
            k: (np.ascontiguousarray(v[lo:hi]) if k in EXPERT_KEYS else v.copy())
            for k, v in reference.params.items()}
        self.grads: Dict[str, np.ndarray] = {k: np.zeros_like(v) for k, v in self.params.items()}
        # a router that chooses over the batch routes the global batch on every rank
        self.routes_globally = cfg.traits.chooses_over_batch
        if self.routes_globally:
            # The single-process Router on the global batch, capacity included. Its weight
            # gradient goes into this rank's grads on rank 0 only: the other ranks' router
            # adds the very same values into a scratch buffer, which backward clears.
            router_grads = self.grads if rank == 0 else {
                k: np.zeros_like(self.params[k]) for k in ROUTER_PARAMS if k in self.params}
            self.router = Router(cfg, self.params, router_grads)
        else:
            # Routing runs dropless on each rank; capacity is applied over the global batch.
            self.router = _RankRouter(dataclasses.replace(cfg, capacity_factor=None), self.params,
                                      self.grads)
        # shared experts see every real token of their rank: data parallel, like the router
        self.shared = SharedExperts(cfg, self.params, self.grads) if cfg.num_shared_experts else None
        self.reduce_replicated_grads = bool(reduce_replicated_grads)
        self.experts = Experts(cfg, self.params, self.grads, dispatcher=self.dispatcher)
        self._latest: Optional[_Context] = None
        self._guard = OneCaller("ExpertParallelMoELayer")
        self._timings: Dict[str, float] = {"route": 0.0, "router_bwd": 0.0, "allreduce": 0.0}
        # bytes this rank sent for the global routers: the allgathers of x, the mask and
        # d_topk_weights (each to P - 1 ranks); the all-to-alls' are the dispatcher's
        self._bytes_gathered = 0

    @classmethod
    def from_layer(cls, layer: MoELayer, comm=None, reduce_replicated_grads: bool = True):
        """The expert-parallel twin of a MoELayer: its config, weights and router state."""
        out = cls(layer.cfg, comm, layer.params, reduce_replicated_grads)
        out.router.load_state(layer.router.state())
        return out

    @property
    def timings(self) -> Dict[str, float]:
        """Seconds spent in each phase (FORWARD_PHASES, BACKWARD_PHASES), accumulated."""
        both = {**self._timings, **self.dispatcher.timings}
        return {p: both[p] for p in FORWARD_PHASES + BACKWARD_PHASES}

    def reset_timings(self) -> None:
        for d in (self._timings, self.dispatcher.timings):
            for k in d:
                d[k] = 0.0

    @property
    def bytes_sent(self) -> int:
        """Bytes of rows this rank sent to other ranks (all-to-alls and allgathers)."""
        return self._bytes_gathered + self.dispatcher.bytes_sent

    # ---- parameters -----------------------------------------------------------
    def gather_params(self) -> Dict[str, np.ndarray]:
        """Collective: the whole layer's parameters (every expert) on every rank."""
        return {k: C.allgather_blocks(self.comm, v) if k in EXPERT_KEYS else v.copy()
                for k, v in self.params.items()}

    def load_full_params(self, full: Dict[str, np.ndarray]) -> None:
        """Take this rank's experts (and the router) from a whole layer's parameters."""
        ref = MoELayer(self.cfg)
        _replace_arrays(ref.params, full, "full")
        lo, hi = self.expert_range
        for k, v in ref.params.items():
            self.params[k][...] = v[lo:hi] if k in EXPERT_KEYS else v

    def zero_grad(self) -> None:
        for g in self.grads.values():
            g.fill(0)

    def num_parameters(self) -> Dict[str, int]:
        """Of the whole layer (all ranks), as MoELayer's."""
        cfg = self.cfg
        per_expert = sum(v[0].size for k, v in self.params.items() if k in EXPERT_KEYS)
        replicated = sum(v.size for k, v in self.params.items() if k not in EXPERT_KEYS)
        return {"total": int(replicated + cfg.num_experts * per_expert),
                "active": int(replicated + int(round(cfg.experts_per_token * per_expert)))}

    def update_expert_bias(self) -> None:
        """Router.update_expert_bias: its loads are the global batch's, so every rank takes
        the same step."""
        self.router.update_expert_bias()

    def set_noise_annealing(self, start_std: float, anneal_steps: int) -> None:
        self.router.set_noise_annealing(start_std, anneal_steps)

    @property
    def noise_std(self) -> float:
        return self.router.noise_std

    # ---- forward ----------------------------------------------------------------
    def _tick(self, name: str, t0: float) -> float:
        t1 = time.perf_counter()
        self._timings[name] += t1 - t0
        return t1

    def _global_stats(self, r, mask: np.ndarray, losses: Dict[str, float], seq_len: int):
        """One Allgather of each rank's counts and partial sums; every rank adds them in
        rank order, so all ranks hold the same bits (whatever MPI's reduction order)."""
        E = self.cfg.num_experts
        R = int(mask.sum())
        # sequences with real tokens: what the sequence balance scope averages over
        active = int(mask.reshape(-1, seq_len).any(axis=1).sum()) if seq_len else int(R > 0)
        mine = np.concatenate((
            [float(mask.shape[0]), float(R), losses["z_loss"] * R, losses["entropy"] * R,
             losses["load_balance"] * active, float(active)],
            r.tokens_per_expert.astype(np.float64), self._balance_dist_sum(r, mask),
            slot_counts(r.topk_indices, mask, E).ravel().astype(np.float64)))
        every = C.allgather_blocks(self.comm, mine[None, :])  # [P, len(mine)]
        return R, active, C.rank_order_sum(every), every

    def _balance_dist_sum(self, r, mask: np.ndarray) -> np.ndarray:
        """Sum over real tokens of what the balance loss averages into P."""
        real = mask.astype(bool)
        return balance_distribution(r.router_probs, mask, self.cfg.router)[real].sum(axis=0, dtype=np.float64)

    def __call__(self, x, padding_mask=None, training: bool = True, token_ids=None) -> MoEOutput:
        """token_ids (shape x.shape[:-1], this rank's): read by the hash router only."""
        with self._guard.forward():
            return self._forward(x, padding_mask, training, token_ids)

    forward = __call__

    def _forward(self, x, padding_mask, training: bool, token_ids) -> MoEOutput:
        cfg = self.cfg
        D, dt = cfg.d_model, cfg.np_dtype
        t0 = time.perf_counter()
        x2, lead = as_tokens(x, D, dt)
        mask = as_mask(padding_mask, lead)
        ids = as_token_ids(token_ids, lead, required=cfg.traits.needs_token_ids)
        seq_len = sequence_length(lead, cfg.load_balance_scope)
        if self.routes_globally:
            routed, r, losses, aux, rows = self._route_global(x2, mask, training, seq_len)
            scales = None
        else:
            routed, r, losses, aux, scales = self._route_tokens(x2, mask, ids, training, seq_len)
            rows = None
        self._tick("route", t0)
        return self._experts_forward(x2, lead, mask, routed, r, losses, aux, scales, rows)

    def _route_global(self, x2: np.ndarray, mask: np.ndarray, training: bool, seq_len: int):
        """Route the global batch (every rank's rows, in rank order) with the single-process
        Router; returns its routing, this rank's rows of it, the losses and the row range."""
        comm, P = self.comm, self.size
        T = x2.shape[0]
        # every rank's row count and sequence length: the rows to gather, and a check that
        # every rank raises alike (a rank raising alone would leave the others waiting)
        shapes = C.allgather_blocks(comm, np.array([[T, seq_len]], np.int64))
        if (shapes[:, 1] != seq_len).any():
            raise ValueError(f"x: the sequence balance scope needs sequences of one length on "
                             f"every rank, got {shapes[:, 1].tolist()} (x.shape[-2] by rank)")
        counts = shapes[:, 0]
        xg, _ = C.allgather_rows(comm, x2, counts)
        mg, _ = C.allgather_rows(comm, mask, counts)
        self._bytes_gathered += (P - 1) * (x2.nbytes + mask.nbytes)
        routed = self.router.compute(xg, mg, training, seq_len)
        lo = int(counts[:self.rank].sum())
        rows = (lo, lo + T, counts)
        g = routed.output
        # per-token fields: this rank's rows (contiguous views); tokens_per_expert: global
        r = RouterOutput(*(a if f == "tokens_per_expert" else a[lo:lo + T]
                           for f, a in zip(RouterOutput._fields, g)))
        return routed, r, routed.losses, routed.aux_loss, rows

    def _route_tokens(self, x2: np.ndarray, mask: np.ndarray, ids, training: bool, seq_len: int):
        """Route this rank's tokens, then make the losses, the capacity drops and the
        counts those of the global batch."""
        cfg, comm = self.cfg, self.comm
        E, k = cfg.num_experts, cfg.top_k
        if training and self.router.noise_std > 0:  # the same on every rank
            sizes = C.allgather_blocks(comm, np.array([[x2.shape[0]]], np.int64)).ravel()
            assert isinstance(self.router, _RankRouter)  # token-by-token routing's (__init__)
            self.router.token_offset = int(sizes[:self.rank].sum())
        routed = self.router.compute(x2, mask, training, seq_len, ids)
        r = routed.output
        R, active, total, every = self._global_stats(r, mask, routed.losses, seq_len)
        R_g, active_g = int(total[1]), int(total[5])
        # the global scope's earlier loads of this step: global already (see commit below)
        losses = _global_losses(total, R_g, active_g, E, seq_len, routed.saved.balance_counts)
        aux = float(cfg.load_balance_coef * losses["load_balance"] + cfg.z_loss_coef * losses["z_loss"]
                    + cfg.entropy_coef * losses["entropy"])
        if not math.isfinite(aux):
            raise NonFiniteError(f"aux_loss is not finite ({losses}): x too large, or a coefficient")
        if cfg.capacity_factor is not None:
            cap = capacity(cfg.capacity_factor, R_g, k, E)
            if cfg.drop_policy == "position":
                counts = every[:, _HEAD + 2 * E:].astype(np.int64).reshape(self.size, k, E)
                dropped = drops_position(r.topk_indices, mask, counts, self.rank, cap)
            else:
                token_offset = int(every[:self.rank, 0].sum())
                scores = np.take_along_axis(r.router_probs, np.maximum(r.topk_indices, 0), axis=1)
                dropped = drops_probs(r.topk_indices, scores, mask, token_offset, cap,
                                      lambda a: C.allgather_rows(comm, a)[0])
            r.dropped[...] = dropped  # the arrays backward reads: set before anyone sees them
            r.topk_weights[dropped] = 0
        # Global counts: what users see, what the router's step loads (expert bias, global
        # scope) add up, and what router_backward's f is made of.
        r.tokens_per_expert[...] = total[_HEAD:_HEAD + E].astype(np.int64)
        # The kernel normalises the balance gradient by this rank's R (batch and global
        # scopes) or its sequences (sequence scope), z-loss and entropy by its R.
        share = R / R_g if R_g else 0.0
        scales = (active / active_g if active_g else 0.0) if seq_len else share, share
        return routed, r, losses, aux, scales

    def _experts_forward(self, x2, lead, mask, routed, r, losses, aux, scales, rows) -> MoEOutput:
        """The experts for this rank's rows of the routing `r`, through the all-to-all
        dispatcher; the shared experts on this rank's tokens."""
        y2, experts_saved = self.experts.compute(x2, r.topk_indices, r.topk_weights, r.dropped)
        shared_saved = None
        if self.shared is not None:
            y_shared, shared_saved = self.shared.compute(x2, mask)
            y2 += y_shared
        if not np.isfinite(y2).all():
            raise NonFiniteError(f"x: the layer's output is not finite (max |x| = {np.abs(x2).max():.3g})")
        public = self.router.commit(routed)
        if rows is not None:  # the global routing: users see this rank's rows
            public = read_only(r)
        self.router.losses, self.router.aux_loss = losses, aux
        ctx = _Context(layer=self, router_saved=routed.saved, lead=lead, scales=scales,
                       experts_saved=experts_saved, shared_saved=shared_saved, rows=rows)
        self._latest = ctx
        return MoEOutput(y2.reshape(lead + (self.cfg.d_model,)), public, aux, dict(losses), ctx)

    # ---- backward ---------------------------------------------------------------
    def backward(self, dy, aux_weight: float = 1.0, out: Optional[MoEOutput] = None) -> np.ndarray:
        """Collective: the gradient of sum(dy * y) + aux_weight * aux_loss with respect to
        this rank's x; expert gradients into this rank's grads, the router's summed over
        ranks (unless reduce_replicated_grads is False)."""
        with self._guard.backward():
            return self._backward(dy, aux_weight, out)

    def _backward(self, dy, aux_weight: float, out: Optional[MoEOutput]) -> np.ndarray:
        ctx = backward_context(self, out, aux_weight)
        cfg, comm = self.cfg, self.comm
        D, dt = cfg.d_model, cfg.np_dtype
        dy2 = as_grad(dy, ctx.lead + (D,), dt, "dy").reshape(-1, D)
        dx2, d_weights = self.experts.backward(dy2, ctx.experts_saved)
        t0 = time.perf_counter()
        if not np.isfinite(d_weights).all():
            raise NonFiniteError("dy: the gradient through the experts is not finite")
        replicated = [k for k in self.grads if k not in EXPERT_KEYS]
        before = [self.grads[k].copy() for k in replicated] if self.reduce_replicated_grads else None
        if ctx.shared_saved is not None:
            assert self.shared is not None  # shared_saved is only set by the shared experts
            dx2 += self.shared.backward(dy2, ctx.shared_saved)
        if ctx.rows is not None:
            dx2 = self._router_backward_global(ctx, d_weights, dx2, float(aux_weight))
        elif self.router.has_weight:  # hash: no weight, and nothing it computes depends on x
            self._router_backward(ctx, d_weights, dx2, float(aux_weight))
        t0 = self._tick("router_bwd", t0)
        if before:  # sum this backward's replicated gradients over the ranks
            grads = [self.grads[k] for k in replicated]
            delta = np.concatenate([(g - b).ravel() for g, b in zip(grads, before)])
            C.allreduce_sum_inplace(comm, delta)
            at = 0
            for g, b in zip(grads, before):
                g[...] = b + delta[at:at + g.size].reshape(g.shape)
                at += g.size
        self._tick("allreduce", t0)
        if not np.isfinite(dx2).all():
            raise NonFiniteError("dx is not finite: dy or aux_weight x the aux-loss coefficients "
                                 f"overflow in {cfg.dtype}")
        return dx2.reshape(ctx.lead + (D,))

    def _router_backward_global(self, ctx: _Context, d_weights, dx2, aux_weight: float) -> np.ndarray:
        """The single-process router backward on the global batch (see the module
        docstring); returns this rank's rows of dx."""
        assert ctx.rows is not None  # the global routing saved its rows (_backward's test)
        lo, hi, counts = ctx.rows
        dwg, _ = C.allgather_rows(self.comm, d_weights, counts)
        self._bytes_gathered += (self.size - 1) * d_weights.nbytes
        saved = ctx.router_saved
        # other ranks' rows start at 0: the kernel adds into dx, row by row
        dxg = np.zeros_like(saved.x2)
        dxg[lo:hi] = dx2
        if self.rank != 0:
            for g in self.router.grads.values():  # the scratch copy of rank 0's gradients
                g.fill(0)
        self.router.backward_into(dwg, dxg, aux_weight, saved)
        return dxg[lo:hi]

    def _router_backward(self, ctx: _Context, d_weights, dx2, aux_weight: float) -> None:
        """router_backward with the global statistics: given the global tokens_per_expert
        (so f is the global one) and its loss coefficients scaled by this rank's share
        (ctx.scales: of the real tokens, or of the sequences for the sequence scope), the
        kernel yields the global-batch gradients for this rank's tokens."""
        assert ctx.scales is not None  # token-by-token routing saved its shares (_route_tokens)
        lb_scale, share = ctx.scales
        self.router.backward_into(d_weights, dx2, aux_weight, ctx.router_saved,
                                  balance_scale=lb_scale, token_scale=share)


def _global_losses(total: np.ndarray, R: int, active: int, E: int, seq_len: int,
                   extra_counts: Optional[np.ndarray]) -> Dict[str, float]:
    """The router losses over the global batch, from the summed partials. Batch and global
    scopes: the kernel's own load balance (load_balance_of_sums) of the global counts
    (plus this step's earlier loads for the global scope) and the global column sums.
    Sequence scope: the mean over every rank's sequences with real tokens of their balance
    losses (each sequence lies on one rank). z-loss and entropy: summed per-token values / R.
    All 0 when R = 0."""
    if R == 0:
        return {"load_balance": 0.0, "z_loss": 0.0, "entropy": 0.0}
    if seq_len:
        lb = float(total[4]) / active
    else:
        counts = total[_HEAD:_HEAD + E].astype(np.int64) + (0 if extra_counts is None else extra_counts)
        lb = load_balance_of_sums(counts=counts, prob_sums=total[_HEAD + E:_HEAD + 2 * E], real=R)
    return {"load_balance": lb, "z_loss": float(total[2]) / R, "entropy": float(total[3]) / R}
