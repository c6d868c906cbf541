"""The distribution of one step's expert load, per MoE layer, as training logs it
(metrics.jsonl, TensorBoard) and the plots read it.

An expert's load is its share of the uniform load: its assignments divided by the mean
assignments per expert (1.0 = uniform, 0 = dead, at most E). The load is counted before
capacity dropping (RouterOutput.tokens_per_expert summed over the step's micro-batches and,
under MPI, over ranks), as `expert_share` is; what capacity drops is counted apart
(`assignments_before_capacity`, `assignments_after_capacity`)."""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np

# statistic -> the metrics.jsonl key of its list over layers
LOAD_KEYS = {"min": "load_min", "max": "load_max", "std": "load_std",
             "p5": "load_p5", "p50": "load_p50", "p95": "load_p95"}
PERCENTILES = {"p5": 5.0, "p50": 50.0, "p95": 95.0}
DIGITS = 6  # rounding in metrics.jsonl, as expert_share's


def load_shares(loads) -> np.ndarray:
    """Each expert's load over the mean load per expert (float64); all zeros when nothing
    was routed. `loads` may be counts or any multiple of them (expert_share's shares)."""
    t = np.asarray(loads, dtype=np.float64)
    total = t.sum()
    return t * (t.size / total) if total > 0 else np.zeros_like(t)


def load_stats(loads) -> Dict[str, float]:
    """min, max, std (population, ddof=0) and the 5/50/95th percentiles (NumPy's default
    linear interpolation between order statistics) of load_shares(loads)."""
    s = load_shares(loads)
    p5, p50, p95 = np.percentile(s, list(PERCENTILES.values()))
    return {"min": float(s.min()), "max": float(s.max()), "std": float(s.std()),
            "p5": float(p5), "p50": float(p50), "p95": float(p95)}


def load_metrics(loads: Sequence[np.ndarray], dropped: Sequence[int]) -> Dict[str, list]:
    """The per-layer load metrics of a step: LOAD_KEYS' statistics, the assignments of real
    tokens before and after capacity dropping (ints), and dead_share, the share of experts
    that got no assignment in the step. loads: tokens_per_expert per layer; dropped: the
    assignments capacity dropped per layer."""
    stats = [load_stats(t) for t in loads]
    out: Dict[str, list] = {key: [round(s[stat], DIGITS) for s in stats] for stat, key in LOAD_KEYS.items()}
    before = [int(np.asarray(t).sum()) for t in loads]
    out["assignments_before_capacity"] = before
    out["assignments_after_capacity"] = [b - int(d) for b, d in zip(before, dropped)]
    out["dead_share"] = [float(np.mean(np.asarray(t) == 0)) for t in loads]
    return out


def load_bands(rows: List[dict]) -> Dict[str, np.ndarray]:
    """{statistic or "dead_share": [steps, layers] array} of the MoE rows of a metrics.jsonl;
    rows written before these keys existed get them from their expert_share (rounded to 6
    digits there, so equal to what was logged up to that rounding)."""
    cols: Dict[str, list] = {k: [] for k in (*LOAD_KEYS, "dead_share")}
    for r in rows:
        if all(key in r for key in LOAD_KEYS.values()) and "dead_share" in r:
            for stat, key in LOAD_KEYS.items():
                cols[stat].append(r[key])
            cols["dead_share"].append(r["dead_share"])
            continue
        per_layer = [load_stats(sh) for sh in r["expert_share"]]
        for stat in LOAD_KEYS:
            cols[stat].append([s[stat] for s in per_layer])
        cols["dead_share"].append([float(np.mean(np.asarray(sh) == 0)) for sh in r["expert_share"]])
    return {k: np.asarray(v, dtype=np.float64) for k, v in cols.items()}
