"""Routing analysis on RouterOutputs (NumPy, mask-aware): utilisation, imbalance,
entropy, expert-label specialisation, co-activation, layer transitions, routing
stability, cross-layer co-occurrence and top-k margins. Padded tokens count nowhere: `mask` [T] (True = real)
defaults to the tokens whose first index is not -1."""
from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from .router import RouterOutput, row_entropy, unrouted_tokens
from .specialisation import (NULL_DRAWS, NULL_SEED, band, entropy_nats, mutual_information, normalized_mi,
                             specialisation_report)


def _real(r: RouterOutput, mask: Optional[np.ndarray]) -> np.ndarray:
    if mask is None:
        return r.topk_indices[:, 0] >= 0
    return np.asarray(mask).reshape(-1).astype(bool)


def _num_experts(r: RouterOutput) -> int:
    return int(r.router_probs.shape[1])


def _entropy(p: np.ndarray) -> float:
    """Entropy in nats of one distribution (the router's own row entropy)."""
    return float(row_entropy(np.asarray(p, dtype=np.float64)))


def utilisation(r: RouterOutput, mask=None) -> np.ndarray:
    """Share of the real tokens' top-k assignments (before dropping) per expert; sums to 1.
    A real token's slot with index -1 (left without an expert) is no assignment."""
    idx = r.topk_indices[_real(r, mask)].reshape(-1)
    counts = np.bincount(idx[idx >= 0], minlength=_num_experts(r)).astype(np.float64)
    return counts / counts.sum() if counts.sum() else counts


def imbalance(r: RouterOutput, mask=None) -> Dict[str, Any]:
    """max/mean and coefficient of variation of the utilisation, dead experts (no
    assignment), and the drop rate (dropped real slots / real slots)."""
    u = utilisation(r, mask)
    real = _real(r, mask)
    slots = int((r.topk_indices[real] >= 0).sum())  # expert choice leaves slots empty
    mean = u.mean() if u.size else 0.0
    return {"max_over_mean": float(u.max() / mean) if mean > 0 else 0.0,
            "cv": float(u.std() / mean) if mean > 0 else 0.0,
            "dead": [int(e) for e in np.flatnonzero(u == 0)] if u.sum() else [],
            "drop_rate": float(r.dropped[real].sum() / slots) if slots else 0.0}


def unrouted_share(r: RouterOutput, mask=None) -> float:
    """Share of the real tokens that reach no expert: every one of their slots was dropped
    for capacity or left without an expert (index -1)."""
    real = _real(r, mask)
    if not real.any():
        return 0.0
    return float(unrouted_tokens(r, real)[real].mean())


def entropy_stats(r: RouterOutput, mask=None) -> Dict[str, Any]:
    """Per-token entropy of the CLEAN router probabilities (noise never enters) and its mean;
    the entropy of the load, i.e. of the share of real assignments per expert, and the
    effective number of experts exp(load entropy) (E when balanced, 1 when collapsed); and,
    for reference, the entropy of the mean clean probabilities (which can look balanced while
    the top-k choices are not)."""
    real = _real(r, mask)
    tok = r.entropy[real].astype(np.float64)
    h = _entropy(utilisation(r, mask)) if real.any() else 0.0
    mean_p = r.router_probs_clean[real].mean(axis=0) if real.any() else np.zeros(_num_experts(r))
    return {"token_entropy": tok, "mean_token_entropy": float(tok.mean()) if tok.size else 0.0,
            "load_entropy": h, "effective_experts": float(np.exp(h)) if real.any() else 0.0,
            "mean_prob_entropy": _entropy(mean_p) if real.any() else 0.0}


def expert_label_table(r: RouterOutput, labels, n_labels: int, mask=None, slot: str = "all") -> np.ndarray:
    """Counts [E, n_labels] of assignments (every top-k slot, or only first choices)
    of real tokens with a label (>= 0) to each expert."""
    labels = np.asarray(labels).reshape(-1)
    keep = _real(r, mask) & (labels >= 0)
    idx = r.topk_indices[keep]
    if slot == "first":
        idx = idx[:, :1]
    elif slot != "all":
        raise ValueError(f"slot: expected 'all' or 'first', got {slot!r}")
    lab = np.repeat(labels[keep], idx.shape[1])
    idx = idx.reshape(-1)
    table = np.zeros((_num_experts(r), n_labels), dtype=np.int64)
    np.add.at(table, (idx[idx >= 0], lab[idx >= 0]), 1)
    return table


def specialisation(r: RouterOutput, labels, n_labels: int, mask=None) -> Dict[str, float]:
    """Mutual information (nats) between the chosen expert (each top-k assignment
    counted once) and the token's label, and its ratio to the label entropy:
    1 when the expert determines the label, about 0 when routing ignores it. Its nulls
    (byte tables, the conditional MI given the byte) are in specialisation.py."""
    table = expert_label_table(r, labels, n_labels, mask)
    hl = entropy_nats(table.sum(0))
    mi = mutual_information(table)
    return {"mi": mi, "label_entropy": hl, "normalized_mi": mi / hl if hl > 0 else 0.0}


def specialisation_with_nulls(r: RouterOutput, labels, tokens, n_labels: int, mask=None,
                              r_at_init: Optional[RouterOutput] = None) -> Dict[str, Any]:
    """specialisation.specialisation_report for the real, labelled tokens of one layer."""
    labels = np.asarray(labels).reshape(-1)
    keep = _real(r, mask) & (labels >= 0)
    return specialisation_report(r.topk_indices[keep], labels[keep], np.asarray(tokens).reshape(-1)[keep],
                                 _num_experts(r), n_labels,
                                 experts_at_init=None if r_at_init is None else r_at_init.topk_indices[keep])


def top_labels(table: np.ndarray, label_names: Sequence[str], top: int = 3) -> Dict[int, List]:
    """For each expert, its most frequent labels with their share of its assignments."""
    out = {}
    for e, row in enumerate(table):
        total = row.sum()
        order = np.argsort(-row, kind="stable")[:top]
        out[e] = [(label_names[i], float(row[i] / total) if total else 0.0) for i in order if row[i] > 0]
    return out


def top_ngrams(r: RouterOutput, tokens, mask=None, n: int = 3, top: int = 5,
               row_len: Optional[int] = None, spell: Callable[[Sequence[int]], Any] = bytes) -> Dict[int, List]:
    """For each expert, the n-grams ending at the tokens it takes most often, each as
    spell(token ids) (default: the bytes; a tokenizer's decode for its ids).
    tokens [T] (or [B, S]: then row_len = S); n-grams never cross a row start
    (every row_len tokens) or padding."""
    tokens = np.asarray(tokens)
    if tokens.ndim == 2:
        row_len = tokens.shape[1]
    tokens = tokens.reshape(-1)
    real = _real(r, mask)
    counters: Dict[int, Counter] = {e: Counter() for e in range(_num_experts(r))}
    spelled: Dict[tuple, Any] = {}
    for t in np.flatnonzero(real):
        if t - n + 1 < 0 or not real[t - n + 1:t + 1].all():
            continue
        if row_len and t % row_len < n - 1:
            continue
        ids = tuple(int(b) for b in tokens[t - n + 1:t + 1])
        gram = spelled.get(ids)
        if gram is None:
            gram = spelled[ids] = spell(ids)
        for e in r.topk_indices[t]:
            if e >= 0:
                counters[int(e)][gram] += 1
    return {e: c.most_common(top) for e, c in counters.items()}


def coactivation(r: RouterOutput, mask=None) -> np.ndarray:
    """[E, E]: share of real tokens whose top-k contains both i and j (diagonal: i at all)."""
    real = _real(r, mask)
    E = _num_experts(r)
    onehot = np.zeros((int(real.sum()), E))
    rows = np.repeat(np.arange(onehot.shape[0]), r.topk_indices.shape[1])
    idx = r.topk_indices[real].reshape(-1)
    onehot[rows[idx >= 0], idx[idx >= 0]] = 1.0
    return onehot.T @ onehot / max(1, onehot.shape[0])


def layer_transitions(r_a: RouterOutput, r_b: RouterOutput, mask=None, slot: str = "first") -> np.ndarray:
    """[E_a, E_b] counts over the real tokens of (first choice in layer a, first choice in
    layer b) (slot "first"), or of every pair (i in the token's top-k set in a, j in its
    top-k set in b) (slot "all": k_a * k_b pairs per token; empty slots count nowhere)."""
    if slot not in ("first", "all"):
        raise ValueError(f"slot: expected 'all' or 'first', got {slot!r}")
    real = _real(r_a, mask)
    a, b = r_a.topk_indices[real], r_b.topk_indices[real]
    if slot == "first":
        a, b = a[:, :1], b[:, :1]
    # every (slot of a, slot of b) pair of each token
    a, b = np.repeat(a, b.shape[1], axis=1).reshape(-1), np.tile(b, (1, a.shape[1])).reshape(-1)
    both = (a >= 0) & (b >= 0)  # a token no expert took has no first choice
    Ea, Eb = _num_experts(r_a), _num_experts(r_b)
    return np.bincount(a[both] * Eb + b[both], minlength=Ea * Eb).astype(np.int64).reshape(Ea, Eb)


def cross_layer_cooccurrence(r_a: RouterOutput, r_b: RouterOutput, mask=None, draws: int = NULL_DRAWS,
                             seed: int = NULL_SEED) -> Dict[str, Any]:
    """How the top-k set a token gets in layer a goes with the one it gets in layer b (OLMoE's
    cross-layer co-occurrence):
    - `share` [E_a, E_b]: share of real tokens with i in their set in a and j in b;
    - `independent` [E_a, E_b]: the same if the two sets were independent (outer product
      of the per-expert shares of tokens), so share / independent is the pair's lift;
    - `mi`: I(A; B) / H(B) of the all-pairs table (layer_transitions slot "all"): 0 when
      layer b's choice says nothing about layer a's;
    - `mi_shuffled`: `mi` with layer b's sets shuffled among the real tokens, `draws` times
      from a fixed generator (mean, 5-95 %): the plug-in estimator's floor at this sample;
    - `above_null`: mi - that mean > the 5-95 % width (as specialisation's `beyond_byte`)."""
    real = _real(r_a, mask)
    table = layer_transitions(r_a, r_b, real, slot="all")
    n = max(1, int(real.sum()))
    share_a = np.array([(r_a.topk_indices[real] == e).any(1).sum() for e in range(_num_experts(r_a))]) / n
    share_b = np.array([(r_b.topk_indices[real] == e).any(1).sum() for e in range(_num_experts(r_b))]) / n
    rng = np.random.default_rng(seed)
    rows = np.flatnonzero(real)
    shuffled = []
    for _ in range(draws):
        idx_b = r_b.topk_indices.copy()
        idx_b[rows] = r_b.topk_indices[rng.permutation(rows)]
        shuffled.append(normalized_mi(layer_transitions(r_a, r_b._replace(topk_indices=idx_b), real, "all")))
    mi = normalized_mi(table)
    null = band(shuffled)
    return {"share": table / n, "independent": np.outer(share_a, share_b), "mi": mi, "mi_shuffled": null,
            "above_null": bool(mi - null["mean"] > max(null["p95"] - null["p5"], 1e-12))}


def routing_stability(r_a: RouterOutput, r_b: RouterOutput, mask=None) -> Dict[str, float]:
    """The same tokens routed twice (e.g. two checkpoints): share of real tokens whose
    top-k set changed, and the mean Jaccard similarity of the two sets."""
    real = _real(r_a, mask)
    a, b = r_a.topk_indices[real], r_b.topk_indices[real]
    if not len(a):
        return {"changed": 0.0, "jaccard": 1.0}
    E = max(_num_experts(r_a), _num_experts(r_b))
    # an empty slot (-1) goes to a spare column E that is then cut off
    sa, sb = np.zeros((len(a), E + 1), bool), np.zeros((len(b), E + 1), bool)
    np.put_along_axis(sa, np.where(a >= 0, a, E), True, axis=1)
    np.put_along_axis(sb, np.where(b >= 0, b, E), True, axis=1)
    sa, sb = sa[:, :E], sb[:, :E]
    inter, union = (sa & sb).sum(1), (sa | sb).sum(1)
    jaccard = np.where(union > 0, inter / np.maximum(union, 1), 1.0)  # both empty: the same
    return {"changed": float((sa != sb).any(1).mean()), "jaccard": float(jaccard.mean())}


def first_choice_changed(r_a: RouterOutput, r_b: RouterOutput, mask=None) -> float:
    """The same tokens routed twice (e.g. two checkpoints): share of real tokens whose top-1
    expert differs."""
    real = _real(r_a, mask)
    if not real.any():
        return 0.0
    return float((r_a.topk_indices[real, 0] != r_b.topk_indices[real, 0]).mean())


def topk_margin(r: RouterOutput, mask=None) -> np.ndarray:
    """p_k - p_(k+1) of the clean probabilities per real token (p_k when k == E):
    small margins mark tokens whose routing a small change would flip."""
    real = _real(r, mask)
    p = -np.sort(-r.router_probs_clean[real].astype(np.float64), axis=1)
    k = min(r.topk_indices.shape[1], p.shape[1])
    return p[:, k - 1] - (p[:, k] if k < p.shape[1] else 0.0)


def summarize(routers: List[RouterOutput], labels=None, label_names=None, mask=None, tokens=None,
              row_len: Optional[int] = None, spell: Callable[[Sequence[int]], Any] = bytes) -> List[dict]:
    """A JSON-serialisable summary per layer (spell: as in top_ngrams)."""
    out = []
    for i, r in enumerate(routers):
        ent = entropy_stats(r, mask)
        margin = topk_margin(r, mask)
        layer = {"layer": i, "utilisation": utilisation(r, mask).round(6).tolist(),
                 "imbalance": imbalance(r, mask), "unrouted": unrouted_share(r, mask),
                 "entropy": {k: v for k, v in ent.items() if k != "token_entropy"},
                 "entropy_quantiles": np.quantile(ent["token_entropy"], [0.1, 0.5, 0.9]).tolist()
                 if ent["token_entropy"].size else [],
                 "margin_median": float(np.median(margin)) if margin.size else 0.0,
                 "coactivation": coactivation(r, mask).round(6).tolist()}
        if labels is not None and label_names is not None:
            table = expert_label_table(r, labels, len(label_names), mask)
            layer["specialisation"] = specialisation(r, labels, len(label_names), mask)
            layer["expert_label_table"] = table.tolist()
            layer["top_labels"] = {str(e): v for e, v in top_labels(table, label_names).items()}
        if tokens is not None:
            layer["top_trigrams"] = {str(e): [(g.decode("utf-8", "replace") if isinstance(g, bytes) else g, c)
                                              for g, c in v]
                                     for e, v in top_ngrams(r, tokens, mask, 3, 5, row_len, spell).items()}
        if i + 1 < len(routers):
            layer["transitions_to_next"] = layer_transitions(r, routers[i + 1], mask).tolist()
            co = cross_layer_cooccurrence(r, routers[i + 1], mask)
            layer["cooccurrence_to_next"] = {k: v.round(6).tolist() if isinstance(v, np.ndarray) else v
                                             for k, v in co.items()}
        out.append(layer)
    return out
