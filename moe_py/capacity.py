"""Capacity dropping of a routing made elsewhere (docs/design.md, "Routing", step 5).

The router kernel (cpp/router.cpp) decides drops while it routes. Two callers route
without it and apply the same rules here: the experts run for a caller's routing
(moe_py/routed_experts.py), and expert parallelism, where each rank routes its own tokens
dropless but an expert's capacity C = ceil(c * R * k / E) counts the real tokens R of the
whole global batch, and which assignments it keeps depends on every rank's. The global
batch's token order is rank 0's tokens, then rank 1's, ... (how the trainer splits a
batch), so the drops equal those of a single process routing the whole batch. A slot whose
index is -1 (no expert) takes no capacity.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np


def capacity(capacity_factor: float, R: int, k: int, E: int) -> int:
    # the kernel's expression and clamp, in the same order of operations
    raw = math.ceil(capacity_factor * float(R) * float(k) / float(E))
    return R * k if raw >= R * k else int(raw)


def rank_within_groups(keys: np.ndarray) -> np.ndarray:
    """For each element, how many earlier elements (in array order) share its key."""
    order = np.argsort(keys, kind="stable")
    out = np.empty(len(keys), np.int64)
    out[order] = _rank_in_sorted(keys[order])
    return out


def _live(topk_indices: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """[T, k]: the slots of real tokens that name an expert."""
    return mask.astype(bool)[:, None] & (topk_indices >= 0)


def slot_counts(topk_indices: np.ndarray, mask: np.ndarray, E: int) -> np.ndarray:
    """[k, E]: this rank's real tokens whose slot j chose expert e."""
    k = topk_indices.shape[1]
    live = _live(topk_indices, mask)
    out = np.zeros((k, E), np.int64)
    for j in range(k):
        out[j] = np.bincount(topk_indices[live[:, j], j], minlength=E)
    return out


def drops_position(topk_indices, mask, all_counts: np.ndarray, rank: int, C: int) -> np.ndarray:
    """The "position" policy: every token's first choice before any second choice, then
    global token order. all_counts [P, k, E] holds every rank's slot_counts. An assignment
    (slot j, expert e) of this rank comes after all slots j' < j of every rank and after
    slot j of the ranks before it; it is kept while fewer than C came before it."""
    T, k = topk_indices.shape
    live = _live(topk_indices, mask)
    totals = all_counts.sum(axis=0)  # [k, E]
    before = np.cumsum(totals, axis=0) - totals + all_counts[:rank].sum(axis=0)
    dropped = np.zeros((T, k), bool)
    for j in range(k):
        e = topk_indices[live[:, j], j]
        dropped[live[:, j], j] = before[j, e] + rank_within_groups(e) >= C
    return dropped


def drops_probs(topk_indices, slot_scores, mask, token_offset: int, C: int,
                allgather: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> np.ndarray:
    """The "probs" policy: each expert keeps its C assignments of highest score (slot_scores
    [T, k]: the router's probability of each chosen expert), ties to the lower global token,
    then the lower slot. `allgather` stacks every rank's rows in rank order (None: one
    process); it is called once for the (key, expert) pairs and once for the scores."""
    T, k = topk_indices.shape
    t, j = np.nonzero(_live(topk_indices, mask))
    e = topk_indices[t, j]
    ids = np.stack([(t + token_offset) * k + j, e], axis=1).astype(np.int64)
    scores = np.ascontiguousarray(slot_scores[t, j])
    if allgather is not None:
        ids, scores = allgather(ids), allgather(scores)
    key, ex = ids[:, 0], ids[:, 1]
    order = np.lexsort((key, -scores, ex))  # by expert, score down, then (token, slot)
    kept_rank = np.empty(len(order), np.int64)
    kept_rank[order] = _rank_in_sorted(ex[order])
    dropped = np.zeros((T, k), bool)
    mine = (key >= token_offset * k) & (key < (token_offset + T) * k)
    local = key[mine] - token_offset * k
    dropped[local // k, local % k] = kept_rank[mine] >= C
    return dropped


def _rank_in_sorted(sorted_keys: np.ndarray) -> np.ndarray:
    """Position of each element within its run of equal keys (keys already sorted)."""
    if len(sorted_keys) == 0:
        return np.zeros(0, np.int64)
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    return np.arange(len(sorted_keys)) - np.repeat(starts, np.diff(np.r_[starts, len(sorted_keys)]))
