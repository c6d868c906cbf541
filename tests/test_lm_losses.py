"""cross_entropy and its multi-token form."""
import math
import warnings

import numpy as np
import pytest

from moe_py.testing import gradcheck
from moe_py.lm_losses import cross_entropy, multi_token_cross_entropy, multi_token_labels


def test_cross_entropy_hand_computed():
    logits = np.array([[0.0, 0.0], [math.log(3.0), 0.0], [5.0, -1.0]])
    labels = np.array([0, 1, -100])
    loss, d = cross_entropy(logits, labels)
    # rows: ln 2, and -log(1/4) = ln 4; the third is ignored
    assert loss == pytest.approx((math.log(2) + math.log(4)) / 2, rel=1e-14)
    np.testing.assert_allclose(d, [[0.25 - 0.5, 0.25], [0.375, 0.125 - 0.5], [0, 0]], rtol=1e-14, atol=1e-16)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_all_ignored_gives_zero_and_no_nan(dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss, d = cross_entropy(np.random.randn(4, 7).astype(dtype), np.full(4, -100))
    assert loss == 0.0 and d.dtype == dtype and (d == 0).all()
    loss, d = cross_entropy(np.zeros((0, 7), dtype), np.zeros(0, np.int64))
    assert loss == 0.0 and d.shape == (0, 7)


def test_cross_entropy_gradient_and_custom_ignore_index():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 5, 9))
    labels = rng.integers(0, 9, (2, 5))
    labels[0, 2] = 7  # ignore_index below
    loss, d = cross_entropy(logits, labels, ignore_index=7)
    gradcheck(lambda logits: (lambda r: (r[0], {"logits": r[1]}))(
        cross_entropy(logits, labels, ignore_index=7)), {"logits": logits}, tol=1e-8,
        max_entries=10**6)
    keep = labels != 7
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ref = -np.take_along_axis(lp, labels[..., None], -1)[..., 0][keep].mean()
    assert loss == pytest.approx(ref, rel=1e-13)


def test_cross_entropy_bad_labels():
    with pytest.raises(ValueError, match="labels"):
        cross_entropy(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError, match="labels"):
        cross_entropy(np.zeros((2, 3)), np.array([0, 1, 2]))
    with pytest.raises(TypeError, match="logits"):
        cross_entropy(np.zeros((2, 3), np.int64), np.array([0, 1]))


def test_multi_token_labels_shift_with_the_mask():
    targets = np.array([[11, 12, 13, -100, -100], [21, 22, 23, 24, 25]])
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    lab = multi_token_labels(targets, mask, 3)
    assert lab[0].tolist() == [[11, 12, 13, -100, -100], [21, 22, 23, 24, 25]]
    assert lab[1].tolist() == [[12, 13, -100, -100, -100], [22, 23, 24, 25, -100]]
    assert lab[2].tolist() == [[13, -100, -100, -100, -100], [23, 24, 25, -100, -100]]


def test_multi_token_loss_ignores_padding_entirely():
    rng = np.random.default_rng(1)
    B, S, V = 2, 6, 5
    mask = np.ones((B, S), bool)
    mask[0, 4:] = False
    targets = rng.integers(0, V, (B, S))
    targets[0, 3:] = -100  # no real next byte after position 3 of row 0
    heads = [rng.standard_normal((B, S, V)) for _ in range(2)]
    losses, grads = multi_token_cross_entropy(heads, targets, mask)
    for g in grads:
        assert (g[~mask] == 0).all()
    # changing logits or targets at padded positions changes nothing
    heads2 = [h.copy() for h in heads]
    for h in heads2:
        h[0, 4:] = 100.0
    t2 = targets.copy()
    t2[0, 4:] = 1
    losses2, _ = multi_token_cross_entropy(heads2, t2, mask)
    assert losses2 == losses
