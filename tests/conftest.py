import numpy as np
import pytest

import moe_py


@pytest.fixture(autouse=True)
def _restore_threads():
    n = moe_py.get_num_threads()
    yield
    moe_py.set_num_threads(n)


def numerical_grad(f, arr, eps=1e-6):
    """Central differences of the scalar f() w.r.t. every entry of arr (perturbed in place)."""
    g = np.zeros_like(arr)
    flat, gflat = arr.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        fp = f()
        flat[i] = old - eps
        fm = f()
        flat[i] = old
        gflat[i] = (fp - fm) / (2 * eps)
    return g


def max_rel_err(a, b):
    """max |a - b| / max(1, |b|): relative for large gradients, absolute for small."""
    return float(np.max(np.abs(a - b) / np.maximum(1.0, np.abs(b)))) if a.size else 0.0
