"""Seed statistics for comparisons: Student-t intervals over seeds, paired t-tests and the
Holm step-down correction. Pure Python (math only): scipy is not a dependency, and the
tests hold these to scipy.stats.

Every comparison moe_py prints (compare, tournament) is paired: seed s gives both arms the
same batches and the same held-out windows, so the per-seed gaps are what varies."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

CONFIDENCE = 0.95  # of every interval moe_py prints


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((a + m2 - 1.0) * (a + m2)),
                    -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1.0))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b), a, b > 0, 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    # the fraction converges fast for x < (a + 1) / (a + b + 2); use the symmetry otherwise
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df degrees of freedom."""
    if df <= 0:
        raise ValueError(f"df: expected > 0, got {df!r}")
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t > 0 else tail


def t_ppf(q: float, df: float) -> float:
    """The q-quantile of Student's t with df degrees of freedom (bisection on t_cdf)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"q: expected in (0, 1), got {q!r}")
    if q == 0.5:
        return 0.0
    if q < 0.5:
        return -t_ppf(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < q:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def _mean_sd(values: Sequence[float]):
    v = [float(x) for x in values]
    n = len(v)
    mean = math.fsum(v) / n
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in v) / (n - 1)) if n > 1 else float("nan")
    return n, mean, sd


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Dict[str, Any]:
    """Mean over seeds with its two-sided t-interval: {"mean", "low", "high", "half_width",
    "n", "sd"}. With one value the interval is undefined (low/high/half_width None)."""
    if len(values) == 0:
        raise ValueError("values: expected at least one value")
    n, mean, sd = _mean_sd(values)
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "half_width": None, "n": n, "sd": None}
    half = t_ppf(0.5 + confidence / 2.0, n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "half_width": half, "n": n, "sd": sd}


def paired_test(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> Dict[str, Any]:
    """Paired comparison of two arms over the same seeds: the gaps a[s] - b[s], their mean
    with its t-interval, and the two-sided p-value of "mean gap = 0" (None with fewer than
    two seeds; 0 or 1 when every gap is equal)."""
    if len(a) != len(b):
        raise ValueError(f"b: expected as many seeds as a ({len(a)}), got {len(b)}")
    gaps = [float(x) - float(y) for x, y in zip(a, b)]
    out = {"gaps": gaps, **mean_interval(gaps, confidence), "p": None}
    n, mean, sd = _mean_sd(gaps)
    if n >= 2:
        if sd == 0.0:
            out["p"] = 1.0 if mean == 0.0 else 0.0
        else:
            t = mean / (sd / math.sqrt(n))
            out["p"] = 2.0 * t_cdf(-abs(t), n - 1)
    return out


def holm(pvalues: Sequence[Optional[float]]) -> List[Optional[float]]:
    """Holm's step-down adjusted p-values (same order as given; None stays None and is not
    counted): reject hypothesis i at level alpha when adjusted[i] < alpha. Controls the
    family-wise error over every comparison scanned."""
    have = [(p, i) for i, p in enumerate(pvalues) if p is not None]
    m = len(have)
    out: List[Optional[float]] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(have)):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def verdict(test: Dict[str, Any], name_a: str, name_b: str) -> str:
    """A sentence for paired_test(a, b) (gaps a - b): which arm is lower when the interval
    excludes 0, otherwise "no difference at this budget"; the interval either way."""
    if test["low"] is None:
        return f"one seed: no interval, no verdict (gap {test['mean']:+.4f})"
    ci = f"{100 * CONFIDENCE:.0f} % CI [{test['low']:+.4f}, {test['high']:+.4f}]"
    if test["high"] < 0:
        return f"{name_a} lower ({ci})"
    if test["low"] > 0:
        return f"{name_b} lower ({ci})"
    return f"no difference at this budget ({ci})"
