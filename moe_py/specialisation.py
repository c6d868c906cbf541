"""Expert specialisation and the nulls it must beat (float64, plug-in estimates).

Which experts take which token categories, measured as mutual information between the chosen
expert E (each top-k assignment counted once) and the token's label L, over H(L). On a
byte-level corpus that number alone says little: the label is largely fixed by the byte
(on Python source I(byte; label) / H(label) is about 0.4; on byte-class labels it is 1),
and any router that is a function of the byte inherits that information without learning
anything. So every layer is reported with:

- `mi`               I(E; L) / H(L) over all top-k slots;
- `mi_first_choice`  the same over first choices only, comparable between k = 1 and k = 2;
- `mi_byte_null`     `mi` (and the first-choice value) of random byte -> expert tables
                     giving each token as many experts as the router did (k for top-k),
                     mean and 5-95 % range over `draws` tables: what routing by the byte
                     alone gives on the same tokens;
- `mi_given_byte`    I(E; L | byte) / H(L | byte): what the expert says about the label
                     beyond the byte (0 when the label is a function of the byte);
- `mi_given_byte_floor`  the same estimator with each token's experts shuffled among the
                     tokens of the same byte (conditional independence, `draws` times):
                     the estimator's bias at this sample size, mean and 5-95 % range;
- `beyond_byte`      mi_given_byte - floor mean > floor's 5-95 % width (and > ROUNDING).

The nulls use a fixed generator (NULL_SEED), so the same routing gives the same numbers.

"Byte" is the token: for a model with a tokenizer (moe_py.hf analyze-hf) the strata and the
null tables are over token ids, i.e. the null is a hash router over the vocabulary
(`strata_of` numbers the ids present; bytes keep their own values, so byte-level results are
unchanged).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np

NULL_DRAWS = 32  # random tables / shuffles per null (the issue asks for >= 20)
NULL_SEED = 20261204  # the nulls' own generator: the same routing gives the same report


# Normalised MI values (in [0, 1]) closer than this differ by summation order alone: a
# byte router's mi_given_byte and its floor are both 0 up to a few ULPs either side.
ROUNDING = 1e-12

def entropy_nats(counts: np.ndarray) -> float:
    """Entropy in nats of the distribution proportional to counts (0 for no counts)."""
    c = np.asarray(counts, dtype=np.float64).reshape(-1)
    c = c[c > 0]
    if c.size == 0:
        return 0.0
    p = c / c.sum()
    return float(-(p * np.log(p)).sum())


def mutual_information(joint_counts: np.ndarray) -> float:
    """I(A; B) in nats of a joint count table [A, B] (plug-in)."""
    joint = np.asarray(joint_counts, dtype=np.float64)
    n = joint.sum()
    if n == 0:
        return 0.0
    joint = joint / n
    pa, pb = joint.sum(1), joint.sum(0)
    nz = joint > 0
    return float((joint[nz] * np.log(joint[nz] / np.outer(pa, pb)[nz])).sum())


def normalized_mi(joint_counts: np.ndarray) -> float:
    """I(A; B) / H(B) of a joint count table [A, B]; 0 when H(B) is 0."""
    hb = entropy_nats(np.asarray(joint_counts, dtype=np.float64).sum(0))
    return mutual_information(joint_counts) / hb if hb > 0 else 0.0


def _slots(experts: np.ndarray, labels: np.ndarray, strata: np.ndarray):
    """One row per (token, slot) with an expert: expert, label and stratum."""
    k = experts.shape[1]
    e = experts.reshape(-1)
    keep = e >= 0
    return e[keep], np.repeat(labels, k)[keep], np.repeat(strata, k)[keep]


def expert_label_counts(experts: np.ndarray, labels: np.ndarray, n_experts: int, n_labels: int) -> np.ndarray:
    """[E, L] counts of (expert, label) over every slot with an expert (index >= 0)."""
    e, lab, _ = _slots(experts, labels, np.zeros(len(labels), np.int64))
    return np.bincount(e * n_labels + lab, minlength=n_experts * n_labels).reshape(n_experts, n_labels)


def conditional_mi(experts: np.ndarray, labels: np.ndarray, strata: np.ndarray, n_experts: int,
                   n_labels: int, n_strata: int = 256) -> float:
    """I(E; L | S) / H(L | S) (plug-in, nats over nats) over every slot with an expert:
    experts [T, k], labels [T] >= 0, strata [T] in [0, n_strata) (the byte). 0 when the
    label is a function of the stratum (H(L | S) = 0)."""
    e, lab, s = _slots(np.asarray(experts), np.asarray(labels), np.asarray(strata))
    if e.size == 0:
        return 0.0
    counts = np.bincount((s * n_experts + e) * n_labels + lab,
                         minlength=n_strata * n_experts * n_labels).reshape(n_strata, n_experts, n_labels)
    counts = counts.astype(np.float64)
    n = counts.sum()
    p_s = counts.sum(axis=(1, 2)) / n
    mi, h = 0.0, 0.0
    for stratum in np.flatnonzero(p_s):
        table = counts[stratum]
        mi += p_s[stratum] * mutual_information(table)
        h += p_s[stratum] * entropy_nats(table.sum(0))
    return mi / h if h > 0 else 0.0


def band(values) -> Dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "p5": float(np.quantile(v, 0.05)),
            "p95": float(np.quantile(v, 0.95)), "draws": int(v.size)}


def strata_of(tokens: np.ndarray):
    """(strata [T], n_strata) for the token values: bytes as they are (256 strata), larger
    ids (a tokenizer's) numbered 0.. in the order of their value among those present, so a
    large vocabulary costs only the ids in the sample."""
    tokens = np.asarray(tokens, dtype=np.int64)
    if tokens.size == 0 or (tokens.min() >= 0 and tokens.max() < 256):
        return tokens, 256
    values, strata = np.unique(tokens, return_inverse=True)
    return strata.reshape(tokens.shape), int(values.size)


def random_byte_tables(rng: np.random.Generator, n_experts: int, k: int, n_bytes: int = 256) -> np.ndarray:
    """[n_bytes, k]: for each byte value k distinct experts, uniformly at random."""
    order = np.argsort(rng.random((n_bytes, n_experts)), axis=1)
    return order[:, :k]


def byte_null(tokens: np.ndarray, labels: np.ndarray, n_experts: int, k: int, n_labels: int,
              draws: int = NULL_DRAWS, seed: int = NULL_SEED,
              slots_per_token: Optional[np.ndarray] = None, n_bytes: int = 256) -> Dict[str, Dict[str, float]]:
    """Normalised MI of random byte -> expert tables on these tokens: {"all": band over every
    slot, "first_choice": band over the first slot}, each {"mean", "p5", "p95", "draws"}.
    Each draw ranks the experts at random for every byte value; a token takes the first
    slots_per_token[t] experts of its byte's ranking (default k each), so a router that
    gives tokens different numbers of experts (expert choice) is matched token by token.
    tokens in [0, n_bytes) (strata_of's numbering for a tokenizer's ids)."""
    rng = np.random.default_rng(seed)
    tokens = np.asarray(tokens, dtype=np.int64)
    n = np.full(len(tokens), k, np.int64) if slots_per_token is None else np.asarray(slots_per_token)
    width = int(n.max()) if n.size else 0
    unused = np.arange(width)[None, :] >= n[:, None]  # slots beyond a token's count
    all_slots, first = [], []
    for _ in range(draws):
        experts = random_byte_tables(rng, n_experts, max(width, 1), n_bytes)[tokens][:, :width]
        experts[unused] = -1
        all_slots.append(normalized_mi(expert_label_counts(experts, labels, n_experts, n_labels)))
        first.append(normalized_mi(expert_label_counts(experts[:, :1], labels, n_experts, n_labels)))
    return {"all": band(all_slots), "first_choice": band(first)}


def shuffled_within(strata: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A permutation of 0..T-1 that moves each item only among items of its own stratum."""
    order = np.lexsort((rng.random(len(strata)), strata))  # strata in order, shuffled inside
    by_stratum = np.argsort(strata, kind="stable")
    perm = np.empty(len(strata), np.int64)
    perm[by_stratum] = order
    return perm


def conditional_floor(experts: np.ndarray, labels: np.ndarray, strata: np.ndarray, n_experts: int,
                      n_labels: int, draws: int = NULL_DRAWS, seed: int = NULL_SEED,
                      n_strata: int = 256) -> Dict[str, float]:
    """conditional_mi with each token's experts (all k slots together) given to another token
    of the same stratum, `draws` times: the estimator under conditional independence."""
    rng = np.random.default_rng(seed)
    values = [conditional_mi(experts[shuffled_within(strata, rng)], labels, strata, n_experts, n_labels,
                             n_strata)
              for _ in range(draws)]
    return band(values)


def specialisation_report(experts: np.ndarray, labels: np.ndarray, tokens: np.ndarray, n_experts: int,
                          n_labels: int, draws: int = NULL_DRAWS,
                          experts_at_init: Optional[np.ndarray] = None) -> Dict[str, Any]:
    """The keys of the module docstring for one layer: experts [T, k] (-1: no expert), labels
    [T] and tokens [T] (bytes) of the real, labelled tokens only. experts_at_init: the same
    tokens routed by the model at initialisation, reported as `mi_at_init` and
    `mi_given_byte_at_init`."""
    experts = np.asarray(experts, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    tokens, n_strata = strata_of(tokens)
    k = experts.shape[1]
    # the null gives each token as many experts as the router did (k for top-k routers)
    null = byte_null(tokens, labels, n_experts, k, n_labels, draws, slots_per_token=(experts >= 0).sum(1),
                     n_bytes=n_strata)
    floor = conditional_floor(experts, labels, tokens, n_experts, n_labels, draws, n_strata=n_strata)
    given = conditional_mi(experts, labels, tokens, n_experts, n_labels, n_strata)
    out = {"mi": normalized_mi(expert_label_counts(experts, labels, n_experts, n_labels)),
           "mi_first_choice": normalized_mi(expert_label_counts(experts[:, :1], labels, n_experts, n_labels)),
           "mi_byte_null": {**null["all"], "first_choice": null["first_choice"]},
           "mi_given_byte": given,
           "mi_given_byte_floor": floor,
           "beyond_byte": bool(given - floor["mean"] > max(floor["p95"] - floor["p5"], ROUNDING)),
           "label_given_byte": label_given_byte(labels, tokens, n_labels, n_strata)}
    if experts_at_init is not None:
        init = np.asarray(experts_at_init, dtype=np.int64)
        out["mi_at_init"] = normalized_mi(expert_label_counts(init, labels, n_experts, n_labels))
        out["mi_given_byte_at_init"] = conditional_mi(init, labels, tokens, n_experts, n_labels, n_strata)
    return out


def label_given_byte(labels: np.ndarray, tokens: np.ndarray, n_labels: int,
                     n_bytes: int = 256) -> Dict[str, float]:
    """How much of the label the byte already fixes: I(byte; label) / H(label), and
    H(label | byte) in nats (0: the label is a function of the byte). tokens in [0, n_bytes)."""
    counts = np.bincount(np.asarray(tokens, np.int64) * n_labels + np.asarray(labels, np.int64),
                         minlength=n_bytes * n_labels).reshape(n_bytes, n_labels)
    h_label = entropy_nats(counts.sum(0))
    mi = mutual_information(counts)
    return {"byte_label_mi": mi / h_label if h_label > 0 else 0.0, "label_entropy_given_byte": h_label - mi}
