"""Dispatch and combine kernels (cpp/dispatch.cpp) against small NumPy loops."""
import numpy as np
import pytest

import moe_py
from moe_py import _kernels
from moe_py._kernels import kernel


def random_routing(rng, T=37, k=3, E=5):
    idx = np.stack([rng.permutation(E)[:k] for _ in range(T)]).astype(np.int64)
    idx[rng.random(T) < 0.2] = -1  # padded tokens
    dropped = (rng.random((T, k)) < 0.25) & (idx >= 0)
    return idx, dropped


def plan_loop(idx, dropped, E):
    """Rows grouped by expert; inside an expert, in (token, slot) order."""
    T, k = idx.shape
    rows = [(int(idx[t, j]), t, j) for t in range(T) for j in range(k)
            if idx[t, j] >= 0 and not dropped[t, j]]
    rows.sort(key=lambda r: (r[0], r[1], r[2]))
    offsets = np.zeros(E + 1, np.int64)
    for e, _, _ in rows:
        offsets[e + 1] += 1
    slot_row = -np.ones((T, k), np.int64)
    for r, (_, t, j) in enumerate(rows):
        slot_row[t, j] = r
    return np.cumsum(offsets), np.array([t for _, t, _ in rows], np.int64), slot_row


@pytest.mark.parametrize("seed", range(3))
def test_dispatch_plan_matches_a_stable_sort_by_expert(seed):
    rng = np.random.default_rng(seed)
    idx, dropped = random_routing(rng)
    offsets, row_token, slot_row = _kernels.dispatch_plan(
        topk_indices=idx, dropped=dropped.view(np.uint8), num_experts=5)
    want = plan_loop(idx, dropped, 5)
    for got, exp in zip((offsets, row_token, slot_row), want):
        np.testing.assert_array_equal(got, exp)


def test_dispatch_plan_rejects_out_of_range_experts():
    idx = np.array([[0, 5]], np.int64)
    with pytest.raises(ValueError, match="topk_indices"):
        _kernels.dispatch_plan(topk_indices=idx, dropped=np.zeros((1, 2), np.uint8), num_experts=5)


@pytest.fixture
def routed():
    rng = np.random.default_rng(7)
    idx, dropped = random_routing(rng)
    _, row_token, slot_row = plan_loop(idx, dropped, 5)
    T, k, d = idx.shape[0], idx.shape[1], 6
    x = rng.standard_normal((T, d))
    ye = rng.standard_normal((len(row_token), d))
    w = rng.random((T, k)) * (slot_row >= 0)
    return x, ye, w, row_token, slot_row


def test_gather_rows_and_its_backward(routed):
    x, ye, _, row_token, slot_row = routed
    xs = kernel("gather_rows", np.float64)(x=x, row_token=row_token)
    np.testing.assert_array_equal(xs, x[row_token])
    dxs = ye
    dx = kernel("gather_rows_backward", np.float64)(dxs=dxs, slot_row=slot_row)
    want = np.zeros_like(x)
    for t in range(slot_row.shape[0]):
        for j in range(slot_row.shape[1]):
            if slot_row[t, j] >= 0:
                want[t] += dxs[slot_row[t, j]]
    np.testing.assert_allclose(dx, want, rtol=0, atol=1e-14)
    # the adjoint of the gather: <gather(x), dxs> = <x, gather_backward(dxs)>
    assert np.isclose((xs * dxs).sum(), (x * dx).sum(), rtol=1e-13)


def test_combine_forward_and_backward(routed):
    _, ye, w, _, slot_row = routed
    T, k = slot_row.shape
    y = kernel("combine_forward", np.float64)(ye=ye, slot_row=slot_row, topk_weights=w)
    want = np.zeros((T, ye.shape[1]))
    for t in range(T):
        for j in range(k):
            if slot_row[t, j] >= 0:
                want[t] += w[t, j] * ye[slot_row[t, j]]
    np.testing.assert_allclose(y, want, rtol=0, atol=1e-14)

    dy = np.random.default_rng(1).standard_normal(y.shape)
    dye, dw = kernel("combine_backward", np.float64)(dy=dy, ye=ye, slot_row=slot_row, topk_weights=w)
    want_dye = np.zeros_like(ye)
    want_dw = np.zeros_like(w)
    for t in range(T):
        for j in range(k):
            r = slot_row[t, j]
            if r >= 0:
                want_dye[r] = w[t, j] * dy[t]
                want_dw[t, j] = dy[t] @ ye[r]
    np.testing.assert_allclose(dye, want_dye, rtol=0, atol=1e-14)
    np.testing.assert_allclose(dw, want_dw, rtol=1e-13, atol=1e-14)


def test_combine_gradients_match_finite_differences(routed):
    _, ye, w, _, slot_row = routed
    rng = np.random.default_rng(2)
    dy = rng.standard_normal((slot_row.shape[0], ye.shape[1]))
    f = lambda ye_, w_: (dy * kernel("combine_forward", np.float64)(  # noqa: E731
        ye=ye_, slot_row=slot_row, topk_weights=w_)).sum()
    dye, dw = kernel("combine_backward", np.float64)(dy=dy, ye=ye, slot_row=slot_row, topk_weights=w)
    eps = 1e-6
    for _ in range(10):
        i = tuple(rng.integers(s) for s in ye.shape)
        e = np.zeros_like(ye)
        e[i] = eps
        assert np.isclose((f(ye + e, w) - f(ye - e, w)) / (2 * eps), dye[i], atol=1e-8)
        i = tuple(rng.integers(s) for s in w.shape)
        e = np.zeros_like(w)
        e[i] = eps
        assert np.isclose((f(ye, w + e) - f(ye, w - e)) / (2 * eps), dw[i], atol=1e-8)


def test_weighted_dispatch_and_its_backward(routed):
    """combine "input": each row is its slot's weight times the token; the backward sums the
    rows' gradients back weighted, and d_w[t, j] = <x[t], dxs[row]>."""
    x, ye, w, row_token, slot_row = routed
    T, k = slot_row.shape
    xs = kernel("dispatch_weighted", np.float64)(x=x, slot_row=slot_row, topk_weights=w, rows=len(row_token))
    want = np.zeros((len(row_token), x.shape[1]))
    for t in range(T):
        for j in range(k):
            if slot_row[t, j] >= 0:
                want[slot_row[t, j]] = w[t, j] * x[t]
    np.testing.assert_array_equal(xs, want)
    dxs = ye
    dx, dw = kernel("dispatch_weighted_backward", np.float64)(dxs=dxs, x=x, slot_row=slot_row, topk_weights=w)
    want_dx, want_dw = np.zeros_like(x), np.zeros_like(w)
    for t in range(T):
        for j in range(k):
            r = slot_row[t, j]
            if r >= 0:
                want_dx[t] += w[t, j] * dxs[r]
                want_dw[t, j] = x[t] @ dxs[r]
    np.testing.assert_allclose(dx, want_dx, rtol=0, atol=1e-14)
    np.testing.assert_allclose(dw, want_dw, rtol=1e-13, atol=1e-14)
    # central differences of sum(dxs * xs) in x and w
    rng = np.random.default_rng(3)
    f = lambda x_, w_: (dxs * kernel("dispatch_weighted", np.float64)(  # noqa: E731
        x=x_, slot_row=slot_row, topk_weights=w_, rows=len(row_token))).sum()
    eps = 1e-6
    for _ in range(10):
        for a, g, other in ((x, dx, "w"), (w, dw, "x")):
            i = tuple(rng.integers(s) for s in a.shape)
            e = np.zeros_like(a)
            e[i] = eps
            args = ((x + e, w), (x - e, w)) if other == "w" else ((x, w + e), (x, w - e))
            assert np.isclose((f(*args[0]) - f(*args[1])) / (2 * eps), g[i], atol=1e-8)


def test_weighted_dispatch_needs_every_row_filled(routed):
    x, _, w, row_token, slot_row = routed
    with pytest.raises(ValueError, match="rows: a row no slot fills"):
        kernel("dispatch_weighted", np.float64)(x=x, slot_row=slot_row, topk_weights=w, rows=len(row_token) + 1)
    with pytest.raises(ValueError, match="slot_row: out of range"):
        kernel("dispatch_weighted", np.float64)(x=x, slot_row=slot_row, topk_weights=w, rows=len(row_token) - 1)


def test_scatter_add_rows_sums_per_id():
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 4, 50)
    dout = rng.standard_normal((50, 3))
    table = np.ones((4, 3))
    kernel("scatter_add_rows", np.float64)(dout=dout, ids=ids, table_grad=table)
    want = np.ones((4, 3))
    for t, v in enumerate(ids):
        want[v] += dout[t]
    np.testing.assert_allclose(table, want, rtol=0, atol=1e-13)


def test_kernels_give_the_same_bits_at_1_2_3_threads(routed):
    x, ye, w, row_token, slot_row = routed
    x32, ye32, w32 = (a.astype(np.float32) for a in (x, ye, w))
    outs = []
    for n in (1, 2, 3):
        moe_py.set_num_threads(n)
        outs.append([kernel("gather_rows", np.float32)(x=x32, row_token=row_token),
                     kernel("gather_rows_backward", np.float32)(dxs=ye32, slot_row=slot_row),
                     kernel("combine_forward", np.float32)(ye=ye32, slot_row=slot_row, topk_weights=w32),
                     *kernel("combine_backward", np.float32)(dy=x32, ye=ye32, slot_row=slot_row,
                                                             topk_weights=w32),
                     kernel("dispatch_weighted", np.float32)(x=x32, slot_row=slot_row, topk_weights=w32,
                                                             rows=len(row_token)),
                     *kernel("dispatch_weighted_backward", np.float32)(dxs=ye32, x=x32, slot_row=slot_row,
                                                                       topk_weights=w32)])
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert np.array_equal(a, b)
