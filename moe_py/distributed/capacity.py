"""Capacity dropping over the global batch (docs/design.md, "Routing", step 5).

In expert parallelism each rank routes its own tokens, but an expert's capacity
C = ceil(c * R * k / E) counts the real tokens R of the whole global batch, and which
assignments it keeps depends on every rank's. The router kernel (cpp/router.cpp) decides
drops for one process; here the same rules are applied to the global batch, whose token
order is rank 0's tokens, then rank 1's, ... (how the trainer splits a batch), so the
drops equal those of a single process routing the whole batch. Each rank routes dropless,
then marks its own slots with `global_drops`.
"""
from __future__ import annotations

import math

import numpy as np

from .comm import allgather_rows


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


def slot_counts(topk_indices: np.ndarray, mask: np.ndarray, E: int) -> np.ndarray:
    """[k, E]: this rank's real tokens whose slot j chose expert e."""
    k = topk_indices.shape[1]
    real = mask.astype(bool)
    out = np.zeros((k, E), np.int64)
    for j in range(k):
        out[j] = np.bincount(topk_indices[real, j], minlength=E)
    return out


def drops_position(topk_indices, mask, all_counts: np.ndarray, rank: int, C: int) -> np.ndarray:
    """The "position" policy: every token's first choice before any second choice, then
    global token order. all_counts [P, k, E] holds every rank's slot_counts. An assignment
    (slot j, expert e) of this rank comes after all slots j' < j of every rank and after
    slot j of the ranks before it; it is kept while fewer than C came before it."""
    T, k = topk_indices.shape
    real = mask.astype(bool)
    totals = all_counts.sum(axis=0)  # [k, E]
    before = np.cumsum(totals, axis=0) - totals + all_counts[:rank].sum(axis=0)
    dropped = np.zeros((T, k), bool)
    for j in range(k):
        e = topk_indices[real, j]
        dropped[real, j] = before[j, e] + rank_within_groups(e) >= C
    return dropped


def drops_probs(comm, topk_indices, router_probs, mask, token_offset: int, C: int) -> np.ndarray:
    """The "probs" policy: each expert keeps its C assignments of highest probability,
    ties to the lower global token, then the lower slot. Needs every rank's (expert,
    probability) of each real slot: one Allgatherv of 2 ints and 1 float per slot."""
    T, k = topk_indices.shape
    t, j = np.nonzero(np.broadcast_to(mask.astype(bool)[:, None], (T, k)))
    e = topk_indices[t, j]
    ids = np.stack([(t + token_offset) * k + j, e], axis=1).astype(np.int64)
    all_ids, _ = allgather_rows(comm, ids)
    all_p, _ = allgather_rows(comm, router_probs[t, e])
    key, ex = all_ids[:, 0], all_ids[:, 1]
    order = np.lexsort((key, -all_p, ex))  # by expert, probability down, then (token, slot)
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
