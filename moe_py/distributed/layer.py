"""ExpertParallelMoELayer: MoELayer's API and maths with the experts spread over MPI ranks.

Rank q of P holds experts [q E/P, (q+1) E/P) of the layer and a replica of the router.
Each rank passes its own tokens, and the layer behaves as one MoELayer given the global
batch (every rank's tokens, in rank order):

  forward   route locally (Router.compute, dropless) -> global stats (one Allgather:
            tokens_per_expert, sum of probabilities, loss sums) -> capacity over the
            global batch -> dispatch_plan + gather_rows (rows grouped by expert, so the rows
            for rank q are one contiguous block) -> counts per (rank, expert) by Alltoall
            -> rows by one Alltoallv -> local experts (experts_forward) -> outputs back by
            one Alltoallv -> combine_forward on the tokens' own rank
  backward  combine_backward -> dy rows out (Alltoallv) -> experts_backward (expert
            weight gradients stay on their rank) -> dx rows back (Alltoallv) ->
            gather_rows_backward -> router_backward with the global statistics; the
            router gradient is summed over ranks (see below)

Why a sum, not a mean: every rank's share of the objective is already normalised by the
global batch (the aux losses by the global R; the trainer weights each rank's tokens by
n_r / N_global), so the ranks' gradients add up to the single-process one exactly, also
when padding leaves the ranks uneven loads. Averaging per-rank means would match only for
equal loads.

Rows received from the ranks arrive rank by rank; each local expert's rows are put back
in rank order, which is the global token order, so every expert sees exactly the rows,
tiles and reduction order of the single-process layer: its outputs and weight gradients
are bitwise those of MoELayer. The router's losses and their gradients combine per-rank
partial sums, so they match to rounding (1e-15 relative in float64).

Every rank calls every collective in the same order, whatever its tokens: a rank with no
tokens, or no rows for some expert, sends and receives zero counts. Not supported yet:
router noise (its counter-based draws are indexed by the local token, so they would differ
from the single-process draws) and routers other than softmax_topk.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Dict, Optional

import numpy as np

from .. import _kernels
from .._checks import NonFiniteError, as_grad, as_mask, as_tokens
from .._guard import OneCaller
from .._kernels import Activation, kernel
from ..config import MoEConfig
from ..layer import MoELayer, MoEOutput, _replace_arrays
from ..router import Router
from . import comm as C
from .capacity import capacity, drops_position, drops_probs, slot_counts

SUPPORTED_ROUTERS = ("softmax_topk",)
# Timed per call into `timings` (seconds, accumulated); the a2a phases time the MPI calls
# alone, so they include waiting for the slowest rank.
FORWARD_PHASES = ("route", "dispatch", "a2a_out", "experts", "a2a_back", "combine")
BACKWARD_PHASES = ("combine_bwd", "a2a_out_bwd", "experts_bwd", "a2a_back_bwd", "router_bwd",
                   "allreduce")


class _Context:
    """One forward's saved state (an MoEOutput carries it, as MoELayer's)."""

    __slots__ = ("layer", "router_saved", "lead", "R_local", "R_global", "tpe", "slot_row",
                 "send_rows", "recv_rows", "perm", "inv", "local_offsets", "xe", "h1", "h3",
                 "ye_back", "topk_weights", "weights")

    def __init__(self, **kw):
        for k, v in kw.items():
            setattr(self, k, v)


class ExpertParallelMoELayer:
    """MoELayer's API (`layer(x, padding_mask, training) -> MoEOutput`, `backward(dy)`),
    the experts split over the ranks of `comm`. A collective: every rank calls forward and
    backward together, each with its own tokens (any count, 0 included).

    params: w_router [d_model, E] (replicated), w1/w3 [E/P, d_model, d_ff] and
    w2 [E/P, d_ff, d_model] (this rank's experts, `expert_range`). `full_params`
    (a MoELayer's params) sets the weights; by default they are MoELayer(cfg)'s, so the
    same seed gives the same layer at any P. The outputs' per-token arrays are this
    rank's tokens; losses and tokens_per_expert are those of the global batch.
    reduce_router_grad=False leaves each rank's own router gradient in grads (a trainer
    that all-reduces every replicated gradient at once sets it).
    """

    has_router = True

    def __init__(self, cfg: MoEConfig, comm=None, full_params: Optional[Dict[str, np.ndarray]] = None,
                 reduce_router_grad: bool = True):
        if not isinstance(cfg, MoEConfig):
            raise TypeError(f"cfg: expected a MoEConfig, got {type(cfg).__name__}")
        if cfg.router not in SUPPORTED_ROUTERS:
            raise NotImplementedError(
                f"router: expert parallelism supports {SUPPORTED_ROUTERS} so far, got {cfg.router!r}")
        self.comm = C.check_comm(comm)
        P, rank = self.comm.Get_size(), self.comm.Get_rank()
        E = cfg.num_experts
        if E % P:
            raise ValueError(f"num_experts: expected a multiple of the number of MPI ranks ({P}), "
                             f"got {E}")
        self.cfg, self.size, self.rank = cfg, P, rank
        self.local_experts = E // P
        self.expert_range = (rank * self.local_experts, (rank + 1) * self.local_experts)
        reference = MoELayer(cfg)  # the single-process layer's initial weights (same seed)
        if full_params is not None:  # checks keys, shapes, dtypes, finiteness
            _replace_arrays(reference.params, full_params, "full_params")
        lo, hi = self.expert_range
        self.params: Dict[str, np.ndarray] = {
            k: (v.copy() if k == "w_router" else np.ascontiguousarray(v[lo:hi]))
            for k, v in reference.params.items()}
        self.grads: Dict[str, np.ndarray] = {k: np.zeros_like(v) for k, v in self.params.items()}
        # Routing runs dropless on each rank; capacity is applied over the global batch.
        self.router = Router(dataclasses.replace(cfg, capacity_factor=None), self.params, self.grads)
        self.reduce_router_grad = bool(reduce_router_grad)
        self._activation = Activation.__members__[cfg.activation]
        self._latest: Optional[_Context] = None
        self._guard = OneCaller("ExpertParallelMoELayer")
        self.timings: Dict[str, float] = {p: 0.0 for p in FORWARD_PHASES + BACKWARD_PHASES}
        self.bytes_sent = 0  # bytes of rows this rank sent to other ranks (all-to-alls)

    @classmethod
    def from_layer(cls, layer: MoELayer, comm=None, reduce_router_grad: bool = True):
        """The expert-parallel twin of a MoELayer: its config, weights and noise state."""
        out = cls(layer.cfg, comm, layer.params, reduce_router_grad)
        out.router.load_noise_state(layer.router.noise_state())
        return out

    # ---- parameters -----------------------------------------------------------
    def gather_params(self) -> Dict[str, np.ndarray]:
        """Collective: the whole layer's parameters (every expert) on every rank."""
        return {k: v.copy() if k == "w_router" else C.allgather_blocks(self.comm, v)
                for k, v in self.params.items()}

    def load_full_params(self, full: Dict[str, np.ndarray]) -> None:
        """Take this rank's experts (and the router) from a whole layer's parameters."""
        ref = MoELayer(self.cfg)
        _replace_arrays(ref.params, full, "full")
        lo, hi = self.expert_range
        for k, v in ref.params.items():
            self.params[k][...] = v if k == "w_router" else v[lo:hi]

    def zero_grad(self) -> None:
        for g in self.grads.values():
            g.fill(0)

    def num_parameters(self) -> Dict[str, int]:
        """Of the whole layer (all ranks), as MoELayer's."""
        per_expert = sum(v[0].size for k, v in self.params.items() if k != "w_router")
        router = self.params["w_router"].size
        return {"total": int(router + self.cfg.num_experts * per_expert),
                "active": int(router + self.cfg.top_k * per_expert)}

    def set_noise_annealing(self, start_std: float, anneal_steps: int) -> None:
        self.router.set_noise_annealing(start_std, anneal_steps)

    @property
    def noise_std(self) -> float:
        return self.router.noise_std

    # ---- forward ----------------------------------------------------------------
    def _tick(self, name: str, t0: float) -> float:
        t1 = time.perf_counter()
        self.timings[name] += t1 - t0
        return t1

    def _global_stats(self, r, mask: np.ndarray, losses: Dict[str, float]):
        """One Allgather of each rank's counts and partial sums; every rank adds them in
        rank order, so all ranks hold the same bits (whatever MPI's reduction order)."""
        E, k = self.cfg.num_experts, self.cfg.top_k
        R = int(mask.sum())
        probs_sum = r.router_probs.sum(axis=0, dtype=np.float64)  # padded rows are 0
        mine = np.concatenate((
            [float(mask.shape[0]), float(R), losses["z_loss"] * R, losses["entropy"] * R],
            r.tokens_per_expert.astype(np.float64), probs_sum,
            slot_counts(r.topk_indices, mask, E).ravel().astype(np.float64)))
        every = C.allgather_blocks(self.comm, mine[None, :])  # [P, 4 + 2E + kE]
        total = every[0].copy()
        for row in every[1:]:
            total += row
        counts = every[:, 4 + 2 * E:].astype(np.int64).reshape(self.size, k, E)
        token_offset = int(every[:self.rank, 0].sum())
        return R, total, counts, token_offset

    def __call__(self, x, padding_mask=None, training: bool = True) -> MoEOutput:
        with self._guard.forward():
            return self._forward(x, padding_mask, training)

    forward = __call__

    def _forward(self, x, padding_mask, training: bool) -> MoEOutput:
        cfg, comm = self.cfg, self.comm
        E, k, D, dt = cfg.num_experts, cfg.top_k, cfg.d_model, cfg.np_dtype
        t0 = time.perf_counter()
        x2, lead = as_tokens(x, D, dt)
        mask = as_mask(padding_mask, lead)
        if training and self.router.noise_std > 0:
            raise NotImplementedError("noise_std: router noise is not supported with expert "
                                      "parallelism yet (its draws are indexed by local token)")
        routed = self.router.compute(x2, mask, training)
        r = routed.output
        R, total, counts, token_offset = self._global_stats(r, mask, routed.losses)
        R_g = int(total[1])
        tpe = total[4:4 + E].astype(np.int64)
        losses = _global_losses(total, R_g, E, k)
        aux = float(cfg.load_balance_coef * losses["load_balance"] + cfg.z_loss_coef * losses["z_loss"]
                    + cfg.entropy_coef * losses["entropy"])
        if not math.isfinite(aux):
            raise NonFiniteError(f"aux_loss is not finite ({losses}): x too large, or a coefficient")
        if cfg.capacity_factor is not None:
            cap = capacity(cfg.capacity_factor, R_g, k, E)
            if cfg.drop_policy == "position":
                dropped = drops_position(r.topk_indices, mask, counts, self.rank, cap)
            else:
                dropped = drops_probs(comm, r.topk_indices, r.router_probs, mask, token_offset, cap)
            r.dropped[...] = dropped  # the arrays backward reads: set before anyone sees them
            r.topk_weights[dropped] = 0
        r.tokens_per_expert[...] = tpe
        t0 = self._tick("route", t0)

        # Rows grouped by expert: the rows for rank q are experts [q El, (q+1) El), contiguous.
        offsets, row_token, slot_row = _kernels.dispatch_plan(
            topk_indices=r.topk_indices, dropped=r.dropped.view(np.uint8), num_experts=E)
        xs = kernel("gather_rows", dt)(x=x2, row_token=row_token)
        El = self.local_experts
        per_expert = np.diff(offsets).reshape(self.size, El)
        t0 = self._tick("dispatch", t0)
        recv_counts = C.alltoall_counts(comm, per_expert)  # [source rank, local expert]
        send_rows, recv_rows = per_expert.sum(axis=1), recv_counts.sum(axis=1)
        xr = C.alltoallv_rows(comm, xs, send_rows, recv_rows)
        self._count_bytes(send_rows, D, dt)
        t0 = self._tick("a2a_out", t0)

        perm, inv = _expert_major(recv_counts)
        xe = xr if perm is None else kernel("gather_rows", dt)(x=xr, row_token=perm)
        local_offsets = np.concatenate(([0], np.cumsum(recv_counts.sum(axis=0)))).astype(np.int64)
        w1, w3, w2 = self._expert_weights()
        h1, h3, ye = kernel("experts_forward", dt)(xs=xe, offsets=local_offsets, w1=w1, w3=w3, w2=w2,
                                                   activation=self._activation)
        ye_r = ye if inv is None else kernel("gather_rows", dt)(x=ye, row_token=inv)
        t0 = self._tick("experts", t0)

        ye_back = C.alltoallv_rows(comm, ye_r, recv_rows, send_rows)
        self._count_bytes(recv_rows, D, dt)
        t0 = self._tick("a2a_back", t0)

        y2 = kernel("combine_forward", dt)(ye=ye_back, slot_row=slot_row, topk_weights=r.topk_weights)
        if not np.isfinite(y2).all():
            raise NonFiniteError(f"x: the layer's output is not finite (max |x| = {np.abs(x2).max():.3g})")
        public = self.router.commit(routed)
        self.router.losses, self.router.aux_loss = losses, aux
        ctx = _Context(layer=self, router_saved=routed.saved, lead=lead, R_local=R, R_global=R_g,
                       tpe=tpe, slot_row=slot_row, send_rows=send_rows, recv_rows=recv_rows,
                       perm=perm, inv=inv, local_offsets=local_offsets, xe=xe, h1=h1, h3=h3,
                       ye_back=ye_back, topk_weights=r.topk_weights, weights=(w1, w3, w2))
        self._latest = ctx
        self._tick("combine", t0)
        return MoEOutput(y2.reshape(lead + (D,)), public, aux, dict(losses), ctx)

    def _expert_weights(self):
        w3 = self.params.get("w3", np.zeros((0, 0, 0), dtype=self.cfg.np_dtype))
        return self.params["w1"], w3, self.params["w2"]

    def _count_bytes(self, rows: np.ndarray, D: int, dt) -> None:
        # rows kept on this rank cross no wire
        self.bytes_sent += int((rows.sum() - rows[self.rank]) * D * np.dtype(dt).itemsize)

    # ---- backward ---------------------------------------------------------------
    def backward(self, dy, aux_weight: float = 1.0, out: Optional[MoEOutput] = None) -> np.ndarray:
        """Collective: the gradient of sum(dy * y) + aux_weight * aux_loss with respect to
        this rank's x; expert gradients into this rank's grads, the router's summed over
        ranks (unless reduce_router_grad is False)."""
        with self._guard.backward():
            return self._backward(dy, aux_weight, out)

    def _backward(self, dy, aux_weight: float, out: Optional[MoEOutput]) -> np.ndarray:
        ctx = self._latest if out is None else out.context
        if ctx is None:
            raise RuntimeError("backward called before forward")
        if ctx.layer is not self:
            raise ValueError("out: the output of another layer")
        if isinstance(aux_weight, bool) or not isinstance(aux_weight, (int, float, np.number)) \
                or not math.isfinite(aux_weight):
            raise ValueError(f"aux_weight: expected a finite number, got {aux_weight!r}")
        cfg, comm = self.cfg, self.comm
        D, dt = cfg.d_model, cfg.np_dtype
        t0 = time.perf_counter()
        dy2 = as_grad(dy, ctx.lead + (D,), dt, "dy").reshape(-1, D)
        dye, d_weights = kernel("combine_backward", dt)(dy=dy2, ye=ctx.ye_back, slot_row=ctx.slot_row,
                                                        topk_weights=ctx.topk_weights)
        t0 = self._tick("combine_bwd", t0)
        dye_r = C.alltoallv_rows(comm, dye, ctx.send_rows, ctx.recv_rows)
        self._count_bytes(ctx.send_rows, D, dt)
        t0 = self._tick("a2a_out_bwd", t0)
        dye_e = dye_r if ctx.perm is None else kernel("gather_rows", dt)(x=dye_r, row_token=ctx.perm)
        w1, w3, w2 = ctx.weights
        g3 = self.grads.get("w3", np.zeros((0, 0, 0), dtype=dt))
        dxs_e = kernel("experts_backward", dt)(
            xs=ctx.xe, offsets=ctx.local_offsets, w1=w1, w3=w3, w2=w2, h1=ctx.h1, h3=ctx.h3,
            dye=dye_e, activation=self._activation, dw1=self.grads["w1"], dw3=g3, dw2=self.grads["w2"])
        dxs_r = dxs_e if ctx.inv is None else kernel("gather_rows", dt)(x=dxs_e, row_token=ctx.inv)
        t0 = self._tick("experts_bwd", t0)
        dxs = C.alltoallv_rows(comm, dxs_r, ctx.recv_rows, ctx.send_rows)
        self._count_bytes(ctx.recv_rows, D, dt)
        t0 = self._tick("a2a_back_bwd", t0)
        dx2 = kernel("gather_rows_backward", dt)(dxs=dxs, slot_row=ctx.slot_row)
        if not np.isfinite(d_weights).all():
            raise NonFiniteError("dy: the gradient through the experts is not finite")
        dw = np.zeros_like(self.grads["w_router"]) if self.reduce_router_grad else self.grads["w_router"]
        self._router_backward(ctx, d_weights, dx2, float(aux_weight), dw)
        t0 = self._tick("router_bwd", t0)
        if self.reduce_router_grad:
            C.allreduce_sum_inplace(comm, dw)
            self.grads["w_router"] += dw
        self._tick("allreduce", t0)
        if not np.isfinite(dx2).all():
            raise NonFiniteError("dx is not finite: dy or aux_weight x the aux-loss coefficients "
                                 f"overflow in {cfg.dtype}")
        return dx2.reshape(ctx.lead + (D,))

    def _router_backward(self, ctx: _Context, d_weights, dx2, aux_weight: float, dw) -> None:
        """router_backward with the global statistics. The kernel normalises by this rank's
        R: the load-balance gradient E f_e / R with f_e = tokens_per_expert / (R k), the
        z-loss and entropy ones by 1 / R. Given the global tokens_per_expert and the
        coefficients scaled by (R / R_global)^2 and R / R_global, it yields the global-batch
        gradients for this rank's tokens."""
        cfg = self.cfg
        x2, w, mask, r, training = ctx.router_saved
        if ctx.R_global == 0:
            s1 = s2 = 0.0
        else:
            s1 = ctx.R_local / ctx.R_global
            s2 = s1 * s1
        kernel("router_backward", cfg.np_dtype)(
            x=x2, w_router=w, mask=mask, router_logits=r.router_logits,
            router_probs_clean=r.router_probs_clean, router_probs=r.router_probs,
            entropy=r.entropy, topk_indices=r.topk_indices, dropped=r.dropped.view(np.uint8),
            tokens_per_expert=ctx.tpe, d_topk_weights=d_weights, top_k=cfg.top_k,
            normalize_topk=bool(cfg.normalize_topk), straight_through=bool(cfg.straight_through),
            training=training, load_balance_coef=aux_weight * cfg.load_balance_coef * s2,
            z_loss_coef=aux_weight * cfg.z_loss_coef * s1,
            entropy_coef=aux_weight * cfg.entropy_coef * s1, dx=dx2, dw_router=dw)


def _global_losses(total: np.ndarray, R: int, E: int, k: int) -> Dict[str, float]:
    """The router losses of cpp/losses.h over the global batch, from summed partials:
    load_balance = E sum_e f_e P_e with f_e = tokens_per_expert[e] / (R k) and
    P_e = sum of probs[:, e] / R (in the kernel's order of operations); z-loss and
    entropy: summed per-token values / R. All 0 when R = 0."""
    if R == 0:
        return {"load_balance": 0.0, "z_loss": 0.0, "entropy": 0.0}
    tpe, psum = total[4:4 + E], total[4 + E:4 + 2 * E]
    lb = 0.0
    for e in range(E):
        lb += (float(tpe[e]) / float(R * k)) * (float(psum[e]) / float(R))
    return {"load_balance": float(E) * lb, "z_loss": float(total[2]) / R,
            "entropy": float(total[3]) / R}


def _expert_major(recv_counts: np.ndarray):
    """Rows arrive grouped by source rank, then local expert; the experts want them by
    expert, then source rank (= global token order). Returns the row gather that does it
    and its inverse, or (None, None) when the two orders coincide (one expert per rank,
    or one rank)."""
    P, El = recv_counts.shape
    if P == 1 or El == 1:
        return None, None
    start = (np.cumsum(recv_counts.ravel()) - recv_counts.ravel()).reshape(P, El)
    parts = [np.arange(start[s, e], start[s, e] + recv_counts[s, e], dtype=np.int64)
             for e in range(El) for s in range(P)]
    perm = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    inv = np.empty_like(perm)
    inv[perm] = np.arange(len(perm), dtype=np.int64)
    return perm, inv
