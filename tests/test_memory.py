"""The kernels' memory: the block cache keeps the resident set flat over varying batches and
the experts' scratch free of fresh page faults, and gives its memory back on request."""
import numpy as np
import pytest

import moe_py
from moe_py import _kernels
from moe_py.config import MoEConfig
from moe_py.machine import rss_mib


def small_layer(**kw):
    cfg = dict(d_model=16, d_ff=24, num_experts=4, top_k=2, seed=1)
    cfg.update(kw)
    return moe_py.MoELayer(MoEConfig(**cfg))


CACHE_ON = moe_py.build_info()["block_cache"] == "on"


@pytest.mark.skipif(not CACHE_ON, reason="sanitizer build: no block cache, ASan keeps freed memory")
def test_rss_stays_flat_over_varying_batches():
    layer = small_layer(d_model=64, d_ff=256, num_experts=8)
    rng = np.random.default_rng(0)

    def step():
        T = int(rng.integers(1500, 4000))
        x = rng.standard_normal((T, 64)).astype(np.float32)
        o = layer(x, padding_mask=rng.random(T) > rng.random())
        layer.backward(np.ones_like(o.y))

    for _ in range(50):
        step()
    at_50 = rss_mib()
    for _ in range(450):
        step()
    assert rss_mib() <= 1.3 * at_50, (at_50, rss_mib())


@pytest.mark.skipif(not CACHE_ON, reason="sanitizer build: no block cache")
def test_pool_release_returns_the_cache():
    layer = small_layer(d_model=64, d_ff=2048, num_experts=2)
    x = np.ones((4096, 64), np.float32)
    layer.backward(np.ones_like(layer(x).y))
    assert _kernels.pool_cached_bytes() > 0
    _kernels.pool_release()
    assert _kernels.pool_cached_bytes() == 0


@pytest.mark.skipif(not CACHE_ON, reason="sanitizer build: no block cache")
@pytest.mark.parametrize("threads", [1, 2])
def test_repeated_expert_backward_takes_no_fresh_pages(threads):
    """The experts' per-call scratch (packed weights, per-thread tiles of 128 KiB here) comes
    back from the block cache: glibc returned such blocks to the OS between calls, and each
    call faulted ~230 (1 thread) to ~350 (2 threads) fresh pages back in."""
    import resource
    rng = np.random.default_rng(0)
    N, D, F, E = 4096, 128, 128, 8
    xs = rng.standard_normal((N, D)).astype(np.float32)
    offsets = np.arange(0, N + 1, N // E, dtype=np.int64)
    w1, w3 = (0.05 * rng.standard_normal((E, D, F)).astype(np.float32) for _ in range(2))
    w2 = 0.05 * rng.standard_normal((E, F, D)).astype(np.float32)
    dye = rng.standard_normal((N, D)).astype(np.float32)
    grads = [np.zeros_like(w1), np.zeros_like(w3), np.zeros_like(w2)]
    act = _kernels.Activation.swiglu
    h1, h3, _ = _kernels.kernel("experts_forward", np.float32)(
        xs=xs, offsets=offsets, w1=w1, w3=w3, w2=w2, activation=act)
    moe_py.set_num_threads(threads)  # the autouse fixture of conftest.py restores it

    def call():
        _kernels.kernel("experts_backward", np.float32)(
            xs=xs, offsets=offsets, w1=w1, w3=w3, w2=w2, h1=h1, h3=h3, dye=dye,
            activation=act, dw1=grads[0], dw3=grads[1], dw2=grads[2])
    call()
    call()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        call()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
    assert faults < 20, faults
