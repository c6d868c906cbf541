"""Routing interventions: replay or force a routing, remove experts, change k
(docs/design.md, "Routing interventions").

    out = layer(x)                                              # record: out.router.topk_indices
    again = layer(x, routing=RoutingIntervention(replay=out.router.topk_indices.reshape(...)))
    model.forward(ids, routing=replay_of(model_out.routers, ids.shape))  # a whole model
    pruned = layer(x, training=False, routing=RoutingIntervention(ablate=(3, 5)))
    wider = layer(x, training=False, routing=RoutingIntervention(top_k=4))

replay: each real token goes to the given experts (a recorded routing, or any token -> expert
map: forced routing); the router still computes its scores, and the combine weights are
computed from them at the given experts exactly as if it had selected them (normalised,
scaled, straight-through, capacity as configured). So gradients reach the router through the
weights, as Megatron-Core's router replay does, and replaying a recorded routing with
unchanged weights (and the same noise step, or no noise) gives bitwise the same outputs and
gradients.
ablate: the named experts are never selected; each token takes its k best experts among the
others. With `renormalize` (the default) the weights are divided by the share of the token's
score mass the remaining experts hold (for softmax: the probabilities renormalised over the
experts left); without it they are the scores as the full router gives them. Inference only.
top_k: route each token to this many experts (llama.cpp's expert-count override).
Inference only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np


@dataclass(frozen=True)
class RoutingIntervention:
    replay: Optional[np.ndarray] = None  # [..., k] int experts per token (x.shape[:-1] + (k,))
    ablate: Tuple[int, ...] = ()  # experts removed (never selected)
    renormalize: bool = True  # with ablate: weights over the remaining score mass
    top_k: Optional[int] = None  # route to this many experts instead of cfg.top_k

    @property
    def inference_only(self) -> bool:
        return bool(self.ablate) or self.top_k is not None


def replay_of(routers, shape: tuple) -> List[RoutingIntervention]:
    """Interventions that replay a recorded forward: `routers` its RouterOutputs (one per MoE
    layer, e.g. ModelOutput.routers), `shape` its tokens' leading shape (e.g. [B, S])."""
    return [RoutingIntervention(replay=np.asarray(r.topk_indices).reshape(tuple(shape) + (-1,)))
            for r in routers]


def checked(routing, cfg, lead: tuple, real: np.ndarray,
            training: bool) -> Tuple[Optional[np.ndarray], Optional[np.ndarray], int]:
    """(forced indices int64 [T, k] or None, expert mask uint8 [E] or None, k) for a router
    of `cfg` on tokens of leading shape `lead` (real: the padding mask [T]); ValueError
    naming what is wrong."""
    if not isinstance(routing, RoutingIntervention):
        raise TypeError(f"routing: expected a RoutingIntervention, got {type(routing).__name__}")
    E, k = cfg.num_experts, cfg.top_k
    if cfg.traits.experts_choose:
        raise NotImplementedError(f"routing: {cfg.router} lets experts pick tokens; replay, ablation "
                                  "and a top-k override need a router whose tokens pick experts")
    if routing.inference_only and training:
        raise ValueError("routing: ablate and top_k change the model at inference only: call with "
                         "training=False")
    if routing.top_k is not None:
        if isinstance(routing.top_k, bool) or not isinstance(routing.top_k, (int, np.integer)) \
                or not 1 <= routing.top_k <= E:
            raise ValueError(f"routing.top_k: expected an integer in [1, {E}], got {routing.top_k!r}")
        k = int(routing.top_k)
    mask = None
    if routing.ablate:
        removed = np.asarray(routing.ablate)
        if not np.issubdtype(removed.dtype, np.integer) or removed.ndim != 1 or \
                removed.min() < 0 or removed.max() >= E or len(set(removed.tolist())) != len(removed):
            raise ValueError(f"routing.ablate: expected distinct experts in [0, {E}), got {routing.ablate!r}")
        if E - len(removed) < k:
            raise ValueError(f"routing.ablate: {E - len(removed)} experts left, fewer than top_k = {k}")
        mask = np.ones(E, np.uint8)
        mask[removed] = 0
    forced = None
    if routing.replay is not None:
        if routing.top_k is not None or routing.ablate:
            raise ValueError("routing.replay: the replayed experts are the routing; give ablate or "
                             "top_k without it")
        a = np.asarray(routing.replay)
        if not np.issubdtype(a.dtype, np.integer) or a.shape != tuple(lead) + (k,):
            raise ValueError(f"routing.replay: expected integer experts of shape {list(lead) + [k]}, "
                             f"got {a.dtype} {list(a.shape)}")
        forced = np.ascontiguousarray(a.reshape(-1, k), dtype=np.int64)
        _check_replay_rows(forced, real, E)
    return forced, mask, k


def _check_replay_rows(forced: np.ndarray, real: np.ndarray, E: int) -> None:
    """Every real token's replayed experts are distinct experts in [0, E) (padded tokens'
    rows are ignored: padding goes nowhere)."""
    rows = forced[real.astype(bool)]
    if rows.size and (rows.min() < 0 or rows.max() >= E):
        raise ValueError(f"routing.replay: expected experts in [0, {E}) for every real token, got "
                         f"values in [{rows.min()}, {rows.max()}]")
    s = np.sort(rows, axis=1)
    if (s[:, 1:] == s[:, :-1]).any():
        raise ValueError("routing.replay: a token's experts must be distinct (as a top-k is)")


def renormalize_weights(weights: np.ndarray, scores: np.ndarray, mask: np.ndarray, real: np.ndarray) -> None:
    """Divide each real token's weights (in place) by the share of its score mass the experts
    left (mask 1) hold: the scores renormalised over those experts."""
    total = scores.sum(axis=1)
    kept = scores[:, mask.astype(bool)].sum(axis=1)
    live = real.astype(bool) & (kept > 0)
    weights[live] *= (total[live] / kept[live])[:, None].astype(weights.dtype)
