"""Specialisation and its nulls against brute-force float64 sums over explicit probability
tables (no shared code with moe_py.specialisation)."""
import itertools
import math

import numpy as np
import pytest

from moe_py.specialisation import (byte_null, conditional_floor, conditional_mi, expert_label_counts,
                                   label_given_byte, normalized_mi, random_byte_tables,
                                   shuffled_within, specialisation_report)


def _brute_conditional(experts, labels, strata):
    """I(E; L | S) / H(L | S) from dictionaries of slot counts, term by term."""
    slots = [(int(s), int(e), int(l)) for row, l, s in zip(experts, labels, strata) for e in row if e >= 0]
    n = len(slots)
    p_sel, p_sl, p_se, p_s = {}, {}, {}, {}
    for s, e, l in slots:
        p_sel[s, e, l] = p_sel.get((s, e, l), 0) + 1 / n
        p_sl[s, l] = p_sl.get((s, l), 0) + 1 / n
        p_se[s, e] = p_se.get((s, e), 0) + 1 / n
        p_s[s] = p_s.get(s, 0) + 1 / n
    mi = sum(p * math.log(p * p_s[s] / (p_se[s, e] * p_sl[s, l])) for (s, e, l), p in p_sel.items())
    h = -sum(p * math.log(p / p_s[s]) for (s, l), p in p_sl.items())
    return mi / h if h > 0 else 0.0


def _brute_normalized(experts, labels):
    return _brute_conditional(experts, labels, np.zeros(len(labels), np.int64))


def test_conditional_mi_matches_brute_force_on_small_tables():
    rng = np.random.default_rng(0)
    for trial in range(10):
        T, E, L, B, k = int(rng.integers(5, 200)), int(rng.integers(2, 6)), int(rng.integers(2, 5)), 6, 2
        experts = np.stack([rng.permutation(E)[:k] for _ in range(T)])
        experts[rng.random(T) < 0.1, 1] = -1  # some slots without an expert
        labels = rng.integers(0, L, T)
        strata = rng.integers(0, B, T)
        assert conditional_mi(experts, labels, strata, E, L) == pytest.approx(
            _brute_conditional(experts, labels, strata), rel=1e-10, abs=1e-14)
        assert normalized_mi(expert_label_counts(experts, labels, E, L)) == pytest.approx(
            _brute_normalized(experts, labels), rel=1e-10, abs=1e-14)


def test_a_label_that_is_a_function_of_the_byte_leaves_nothing_beyond_it():
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 40, 3000)
    labels = tokens % 3  # the label is fixed by the byte
    experts = np.stack([rng.permutation(8)[:2] for _ in range(3000)])
    # an expert that copies the label: plenty of MI, none of it beyond the byte
    experts[:, 0] = labels
    assert normalized_mi(expert_label_counts(experts, labels, 8, 3)) > 0.2
    assert conditional_mi(experts, labels, tokens, 8, 3) == pytest.approx(0.0, abs=1e-12)
    assert label_given_byte(labels, tokens, 3)["byte_label_mi"] == pytest.approx(1.0)
    assert label_given_byte(labels, tokens, 3)["label_entropy_given_byte"] == pytest.approx(0.0, abs=1e-12)


def test_routing_that_reads_context_clears_the_floor_and_a_byte_router_does_not():
    rng = np.random.default_rng(2)
    T = 6000
    tokens = rng.integers(0, 30, T)
    labels = rng.integers(0, 4, T)  # the label is independent of the byte (a document's domain)
    by_label = np.stack([labels * 2, labels * 2 + 1], axis=1)  # experts that know the domain
    table = random_byte_tables(rng, 8, 2)
    by_byte = table[tokens]
    context = specialisation_report(by_label, labels, tokens, 8, 4, draws=20)
    byte = specialisation_report(by_byte, labels, tokens, 8, 4, draws=20)
    assert context["mi_given_byte"] == pytest.approx(1.0) and context["beyond_byte"]
    assert byte["mi_given_byte"] == pytest.approx(0.0, abs=1e-12) and not byte["beyond_byte"]  # one expert pair per byte
    assert byte["mi"] < context["mi_byte_null"]["p95"] + 1e-12  # a byte table sits in the byte null
    assert context["mi_byte_null"]["draws"] == 20 and context["mi_given_byte_floor"]["draws"] == 20
    assert context["mi_first_choice"] == pytest.approx(1.0)


def test_shuffles_stay_within_their_stratum_and_the_nulls_are_reproducible():
    rng = np.random.default_rng(3)
    strata = rng.integers(0, 5, 500)
    perm = shuffled_within(strata, rng)
    assert sorted(perm) == list(range(500)) and np.array_equal(strata[perm], strata)
    assert not np.array_equal(perm, np.arange(500))
    tokens, labels = rng.integers(0, 50, 800), rng.integers(0, 3, 800)
    assert byte_null(tokens, labels, 8, 2, 3, draws=5) == byte_null(tokens, labels, 8, 2, 3, draws=5)
    experts = random_byte_tables(rng, 8, 2)[tokens]
    assert conditional_floor(experts, labels, tokens, 8, 3, draws=5) == \
        conditional_floor(experts, labels, tokens, 8, 3, draws=5)
    tables = random_byte_tables(rng, 8, 3)
    assert all(len(set(row)) == 3 for row in tables.tolist())


def test_brute_force_helper_is_itself_right_on_a_hand_example():
    # E determines L exactly, two equiprobable labels, one stratum: I = H = ln 2
    experts = np.array([[0], [1], [0], [1]])
    labels = np.array([0, 1, 0, 1])
    assert _brute_normalized(experts, labels) == pytest.approx(1.0)
    assert list(itertools.chain(*experts.tolist())) == [0, 1, 0, 1]


def test_the_byte_null_gives_each_token_as_many_experts_as_the_router_did():
    rng = np.random.default_rng(4)
    tokens, labels = rng.integers(0, 40, 3000), rng.integers(0, 3, 3000)
    # every token on every expert (as expert choice can do): no table can say anything
    every = byte_null(tokens, labels, 4, 4, 3, draws=5, slots_per_token=np.full(3000, 4))
    assert every["all"]["mean"] == pytest.approx(0.0, abs=1e-12)
    # k slots for every token is the default
    assert byte_null(tokens, labels, 8, 2, 3, draws=5) == \
        byte_null(tokens, labels, 8, 2, 3, draws=5, slots_per_token=np.full(3000, 2))
    # tokens with no expert count nowhere, as in the trained routing
    some = byte_null(tokens, labels, 8, 3, 3, draws=5, slots_per_token=rng.integers(0, 4, 3000))
    assert 0 < some["all"]["mean"] < 1
