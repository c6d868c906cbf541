"""Bitwise the same outputs and gradients at 1, 2 and 3 OpenMP threads."""
import numpy as np
import pytest

import moe_py
from moe_py import bf16
from moe_py.testing import assert_thread_invariant

def layer_results(res: dict, rng, act, dt, E, k, kw, kernel="") -> None:
    """Two forward/backward passes of one layer: every output and gradient into res."""
    cfg = moe_py.MoEConfig(d_model=64, d_ff=96, num_experts=E, top_k=k, dtype=dt, capacity_factor=1.0,
                           entropy_coef=0.01, seed=3, **{"activation": act, **kw})
    layer = moe_py.MoELayer(cfg)
    layer.set_noise_annealing(0.5, 10)
    for name in ("b1", "b3", "b2"):  # biases away from their init of 0
        if name in layer.params:
            layer.params[name][...] = rng.standard_normal(layer.params[name].shape) * 0.1
    x = rng.standard_normal((700, 64)).astype(dt)
    mask = rng.random(700) > 0.1
    for rep in range(2):
        o = layer(x, padding_mask=mask)
        layer.zero_grad()
        dx = layer.backward(np.ones_like(o.y) * 0.1 + x * 0.01)
        tag = f"{act}_{dt}_{E}_{rep}_{kw.get('combine', '')}_{kw.get('compute_dtype', '')}_{kernel}"
        res[f"{tag}_y"], res[f"{tag}_dx"] = o.y, dx
        for f in o.router._fields:
            res[f"{tag}_{f}"] = getattr(o.router, f)
        for name, g in layer.grads.items():
            res[f"{tag}_grad_{name}"] = g.copy()


def everything() -> dict:
    """Layers (noise, capacity, entropy loss, padding), the model and the optimiser: every
    output and gradient, as one dict of arrays."""
    from moe_py.models import ModelConfig, TransformerLM
    from moe_py.optim import AdamW, global_grad_norm
    res = {}
    rng = np.random.default_rng(0)
    # the expert variants: gpt-oss's clamped SwiGLU (a limit that clamps often) and biases
    clamped = dict(activation="clamped_swiglu", swiglu_limit=1.0, ffn_bias=True)
    cases = [("swiglu", "float32", 8, 2, {}), ("gelu", "float64", 8, 2, {}), ("swiglu", "float64", 1, 1, {}),
             ("clamped", "float32", 8, 2, clamped), ("swiglu", "float32", 8, 2, {"combine": "input"}),
             # bfloat16 compute: the rounded operands, the weights' rounded copy
             ("swiglu", "float32", 8, 2, {"compute_dtype": "bfloat16"}),
             ("clamped", "float32", 8, 2, {**clamped, "compute_dtype": "bfloat16"})]
    for act, dt, E, k, kw in cases:
        layer_results(res, rng, act, dt, E, k, kw)
    # every bfloat16 GEMM kernel this CPU runs (the default one is above)
    for kernel in bf16.available_kernels():
        with bf16.using_kernel(kernel):
            layer_results(res, rng, "swiglu", "float32", 8, 2, {"compute_dtype": "bfloat16"}, kernel)
    moe = moe_py.MoEConfig(d_model=32, d_ff=32, num_experts=4, top_k=2)
    m = TransformerLM(ModelConfig(vocab_size=256, max_seq_len=64, d_model=32, n_layers=2, n_heads=4,
                                  d_ff=32, moe=moe, seed=0))
    ids = rng.integers(0, 256, (6, 64))
    mask = np.ones((6, 64), bool)
    mask[2, 40:] = False
    mask[5, 10:] = False
    targets = np.roll(ids, -1, 1)
    targets[:, -1] = -100
    targets[~mask] = -100
    ids[~mask] = 0
    r = m.loss_and_backward(ids, targets, mask)
    res["model_loss"] = np.array(r["loss"])
    for name, p, g in m.named_parameters():
        res["model_grad_" + name] = g.copy()
    # the optimiser and the norm, on a tensor big enough for their parallel path
    big = rng.standard_normal(100_003).astype(np.float32)
    big_grad = rng.standard_normal(100_003).astype(np.float32)
    res["grad_norm"] = np.array(global_grad_norm([big_grad] + [g for _, _, g in m.named_parameters()]))
    opt = AdamW([("big", big, big_grad)] + list(m.named_parameters()))
    for _ in range(2):
        opt.step(1e-3, grad_scale=0.5)
    res["adamw_big"] = big
    for name, p, _ in m.named_parameters():
        res["adamw_" + name] = p.copy()
    return res


@pytest.mark.slow
def test_bitwise_identical_across_thread_counts():
    assert len(everything()) > 50
    assert_thread_invariant(everything, threads=(1, 2, 3))


def test_set_num_threads_in_process_gives_the_same_bits():
    rng = np.random.default_rng(1)
    cfg = moe_py.MoEConfig(d_model=48, d_ff=80, num_experts=6, top_k=2, capacity_factor=1.25)
    x = rng.standard_normal((530, 48)).astype(np.float32)
    results = []
    for n in (1, 2, 3):
        moe_py.set_num_threads(n)
        layer = moe_py.MoELayer(cfg)
        o = layer(x)
        dx = layer.backward(x)
        results.append((o.y, dx, *[layer.grads[k] for k in sorted(layer.grads)]))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert np.array_equal(a, b)
