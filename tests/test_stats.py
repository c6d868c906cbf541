"""Seed statistics against scipy.stats (a test-only dependency): t quantiles and CDF,
intervals, paired tests, and Holm's correction against its definition."""
import math

import numpy as np
import pytest

scipy_stats = pytest.importorskip("scipy.stats")

from moe_py.stats import betainc, holm, mean_interval, paired_test, t_cdf, t_ppf, verdict


@pytest.mark.parametrize("df", [1, 2, 3, 4, 7, 29, 200])
def test_t_distribution_matches_scipy(df):
    for t in (-12.0, -2.5, -0.3, 0.0, 0.7, 1.96, 4.3, 30.0):
        assert t_cdf(t, df) == pytest.approx(scipy_stats.t.cdf(t, df), rel=1e-10, abs=1e-14)
    for q in (0.6, 0.9, 0.975, 0.995, 0.025):
        assert t_ppf(q, df) == pytest.approx(scipy_stats.t.ppf(q, df), rel=1e-9)


def test_incomplete_beta_matches_scipy():
    special = pytest.importorskip("scipy.special")
    for a, b, x in [(0.5, 0.5, 0.3), (1.0, 0.5, 0.99), (15.0, 0.5, 0.2), (2.0, 3.0, 0.7), (100.0, 0.5, 0.999)]:
        assert betainc(a, b, x) == pytest.approx(special.betainc(a, b, x), rel=1e-10)


def test_interval_and_paired_test_match_scipy():
    rng = np.random.default_rng(3)
    for n in (2, 3, 5, 10):
        a = rng.normal(2.5, 0.1, n)
        b = a + rng.normal(0.03, 0.05, n)
        ci = mean_interval(a)
        lo, hi = scipy_stats.t.interval(0.95, n - 1, loc=a.mean(), scale=scipy_stats.sem(a))
        assert (ci["low"], ci["high"]) == (pytest.approx(lo, rel=1e-10), pytest.approx(hi, rel=1e-10))
        test = paired_test(a, b)
        ref = scipy_stats.ttest_rel(a, b)
        assert test["p"] == pytest.approx(ref.pvalue, rel=1e-8)
        assert test["mean"] == pytest.approx(float(np.mean(a - b)), rel=1e-12)
        ref_ci = ref.confidence_interval(0.95)
        assert (test["low"], test["high"]) == (pytest.approx(ref_ci.low, rel=1e-9), pytest.approx(ref_ci.high, rel=1e-9))


def test_one_seed_gives_no_interval_and_no_verdict():
    ci = mean_interval([2.0])
    assert ci["low"] is None and ci["half_width"] is None
    t = paired_test([2.0], [2.1])
    assert t["p"] is None and verdict(t, "MoE", "dense").startswith("one seed")
    with pytest.raises(ValueError, match="b: expected as many seeds"):
        paired_test([1.0, 2.0], [1.0])


def test_verdict_only_when_the_interval_excludes_zero():
    assert verdict(paired_test([1.0, 1.1, 1.05], [2.0, 2.1, 2.05]), "MoE", "dense").startswith("MoE lower")
    assert verdict(paired_test([2.0, 2.1, 2.05], [1.0, 1.1, 1.06]), "MoE", "dense").startswith("dense lower")
    flip = verdict(paired_test([2.0, 2.3, 2.1], [2.05, 2.06, 2.2]), "MoE", "dense")
    assert flip.startswith("no difference at this budget (95 % CI [")


def _holm_by_definition(p):
    """Holm's step-down procedure written out: adjusted p_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    adjusted = [0.0] * m
    best = 0.0
    for j, i in enumerate(order):
        best = max(best, min(1.0, (m - j) * p[i]))
        adjusted[i] = best
    return adjusted


def test_holm_matches_its_definition_and_scipy_rejections():
    rng = np.random.default_rng(0)
    for _ in range(20):
        p = list(rng.uniform(0, 0.2, int(rng.integers(1, 30))))
        got = holm(p)
        assert got == pytest.approx(_holm_by_definition(p), rel=1e-12)
        # Holm's rejections at 0.05, by the step-down rule itself
        order = sorted(range(len(p)), key=lambda i: p[i])
        reject = [False] * len(p)
        for j, i in enumerate(order):
            if p[i] >= 0.05 / (len(p) - j):
                break
            reject[i] = True
        assert [g < 0.05 for g in got] == reject
    assert holm([0.01, None, 0.04]) == [0.02, None, 0.04]


def test_holm_matches_scipy_false_discovery_control_when_available():
    if not hasattr(scipy_stats, "false_discovery_control"):
        pytest.skip("scipy without false_discovery_control")
    # Holm is not in scipy.stats; its adjusted p-values bound Benjamini-Hochberg's from above
    p = [0.001, 0.008, 0.039, 0.041, 0.042, 0.06, 0.074, 0.205]
    bh = scipy_stats.false_discovery_control(p)
    assert all(h >= b - 1e-15 for h, b in zip(holm(p), bh))
    assert math.isclose(holm(p)[0], 0.008)
