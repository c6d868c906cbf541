"""Every analysis metric on hand-built routing whose answer is known."""
import json

import numpy as np
import pytest

import moe_py
from moe_py import analysis
from moe_py.router import RouterOutput


def routed(indices, E, probs=None, dropped=None):
    """A RouterOutput from chosen indices [T, k] (-1 rows = padding)."""
    idx = np.asarray(indices, dtype=np.int64)
    T, k = idx.shape
    real = idx[:, 0] >= 0
    if probs is None:
        probs = np.zeros((T, E))
        for t in range(T):
            if real[t]:
                probs[t] = 0.1 / E
                probs[t, idx[t]] += 0.9 / k
    probs = np.where(real[:, None], probs, 0.0)
    ent = np.array([-(p[p > 0] * np.log(p[p > 0])).sum() for p in probs])
    w = np.where(real[:, None], 1.0 / k, 0.0) * np.ones((T, k))
    return RouterOutput(w, idx, probs, probs, np.log(probs + 1e-300), ent,
                        np.bincount(idx[real].reshape(-1), minlength=E),
                        np.zeros((T, k), bool) if dropped is None else np.asarray(dropped))


def test_uniform_utilisation_and_dead_experts():
    r = routed(np.arange(8).reshape(8, 1) % 4, 4)
    assert analysis.utilisation(r).tolist() == [0.25] * 4
    imb = analysis.imbalance(r)
    assert imb["cv"] == 0 and imb["max_over_mean"] == 1 and imb["dead"] == []
    r = routed([[0], [0], [1], [0]], 3)
    assert analysis.imbalance(r)["dead"] == [2]
    assert analysis.imbalance(r)["max_over_mean"] == pytest.approx(0.75 / (1 / 3))


def test_drop_rate_and_padding_count_nowhere():
    r = routed([[0, 1], [1, 2], [-1, -1], [2, 0]], 3, dropped=[[0, 1], [0, 0], [0, 0], [1, 1]])
    assert analysis.imbalance(r)["drop_rate"] == pytest.approx(3 / 6)
    no_pad = routed([[0, 1], [1, 2], [2, 0]], 3, dropped=[[0, 1], [0, 0], [1, 1]])
    assert np.array_equal(analysis.utilisation(r), analysis.utilisation(no_pad))
    assert analysis.imbalance(r) == analysis.imbalance(no_pad)
    assert np.allclose(analysis.coactivation(r), analysis.coactivation(no_pad))


def test_specialisation_perfect_and_random():
    labels = np.arange(400) % 4
    perfect = routed(labels.reshape(-1, 1), 4)
    s = analysis.specialisation(perfect, labels, 4)
    assert s["normalized_mi"] == pytest.approx(1.0, abs=1e-12)
    assert s["label_entropy"] == pytest.approx(np.log(4))
    rng = np.random.default_rng(0)
    rand = routed(rng.integers(0, 4, (20000, 1)), 4)
    assert analysis.specialisation(rand, rng.integers(0, 4, 20000), 4)["normalized_mi"] < 0.01
    table = analysis.expert_label_table(perfect, labels, 4)
    assert np.array_equal(table, np.eye(4, dtype=int) * 100)


def test_entropy_stats():
    E = 4
    probs = np.full((3, E), 1 / E)
    r = routed([[0], [1], [2]], E, probs=probs)
    st = analysis.entropy_stats(r)
    assert st["mean_token_entropy"] == pytest.approx(np.log(E))
    # three real assignments to three experts: 3 effective experts, though the mean
    # probabilities are uniform over all four
    assert st["effective_experts"] == pytest.approx(3)
    assert st["mean_prob_entropy"] == pytest.approx(np.log(E))


def test_coactivation_transitions_stability_margin():
    r = routed([[0, 1], [0, 1], [2, 3], [0, 2]], 4)
    co = analysis.coactivation(r)
    assert co[0, 1] == pytest.approx(0.5) and co[0, 0] == pytest.approx(0.75) and co[1, 3] == 0
    assert np.array_equal(analysis.layer_transitions(r, r), np.diag([3, 0, 1, 0]))
    assert analysis.routing_stability(r, r) == {"changed": 0.0, "jaccard": 1.0}
    other = routed([[2, 3], [2, 3], [0, 1], [1, 3]], 4)
    assert analysis.routing_stability(r, other) == {"changed": 1.0, "jaccard": 0.0}
    half = routed([[0, 2], [0, 1], [2, 3], [0, 2]], 4)
    st = analysis.routing_stability(r, half)
    assert st["changed"] == 0.25 and st["jaccard"] == pytest.approx((1 / 3 + 3) / 4)
    p = np.array([[0.5, 0.3, 0.15, 0.05]])
    m = analysis.topk_margin(routed([[0, 1]], 4, probs=p))
    assert m == pytest.approx([0.15])


def test_ngrams_stay_within_rows():
    tokens = np.frombuffer(b"abcabcxyz", np.uint8).astype(np.int64)
    r = routed(np.array([[0]] * 6 + [[1]] * 3), 2)
    g = analysis.top_ngrams(r, tokens.reshape(3, 3), n=3)
    assert g[0] == [(b"abc", 2)] and g[1] == [(b"xyz", 1)]


def test_on_a_real_layer_with_padding():
    rng = np.random.default_rng(1)
    layer = moe_py.MoELayer(moe_py.MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=2))
    x = rng.standard_normal((50, 8)).astype(np.float32)
    mask = rng.random(50) > 0.3
    r = layer(x, padding_mask=mask).router
    labels = rng.integers(0, 3, 50)
    s = analysis.summarize([r, r], labels=labels, label_names=["a", "b", "c"], mask=mask, tokens=rng.integers(0, 256, 50))
    json.dumps(s)
    assert sum(analysis.utilisation(r, mask)) == pytest.approx(1.0)
    assert analysis.expert_label_table(r, labels, 3, mask).sum() == mask.sum() * 2


def test_unrouted_tokens_and_first_choice_changes():
    # token 0 loses one of two slots (still routed), token 1 loses both, token 3 has one slot
    # left without an expert (-1) and the other dropped; token 2 is padding
    r = routed([[0, 1], [1, 2], [-1, -1], [2, 0]], 3, dropped=[[0, 1], [1, 1], [0, 0], [0, 1]])
    r = r._replace(topk_indices=np.array([[0, 1], [1, 2], [-1, -1], [-1, 0]]))
    mask = np.array([True, True, False, True])
    assert analysis.unrouted_share(r, mask) == pytest.approx(2 / 3)
    assert analysis.utilisation(r, mask).tolist() == pytest.approx([2 / 5, 2 / 5, 1 / 5])
    a = routed([[0, 1], [1, 2], [2, 0], [3, 1]], 4)
    b = routed([[0, 2], [2, 1], [2, 0], [1, 3]], 4)  # top-1 changes for tokens 1 and 3 only
    assert analysis.first_choice_changed(a, b) == 0.5
    assert analysis.first_choice_changed(a, a) == 0.0
    # the top-k sets: token 0's changed though its top-1 did not; tokens 1 and 3 kept theirs
    assert analysis.routing_stability(a, b)["changed"] == 0.25
    assert analysis.first_choice_changed(a, b, np.array([True, False, True, False])) == 0.0
