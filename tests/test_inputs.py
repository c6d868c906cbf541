"""Bad input gets a clear exception naming the argument; odd layouts give the same bits."""
import json
import warnings

import numpy as np
import pytest

import moe_py
from moe_py._checks import NonFiniteError, check_row_count
from moe_py.config import MoEConfig
from moe_py.models import ModelConfig


def cfg(**kw):
    base = dict(d_model=8, d_ff=16, num_experts=4, top_k=2)
    base.update(kw)
    return moe_py.MoEConfig(**base)


@pytest.mark.parametrize("kw,word", [
    (dict(top_k=5), "top_k"), (dict(top_k=0), "top_k"), (dict(num_experts=0), "num_experts"),
    (dict(d_model=0), "d_model"), (dict(d_ff=-1), "d_ff"), (dict(capacity_factor=-1.0), "capacity_factor"),
    (dict(capacity_factor=float("nan")), "capacity_factor"), (dict(capacity_factor=float("inf")), "capacity_factor"),
    (dict(router="top1"), "router"), (dict(activation="relu"), "activation"), (dict(dtype="float16"), "dtype"),
    (dict(load_balance_coef=float("nan")), "load_balance_coef"), (dict(z_loss_coef=float("inf")), "z_loss_coef"),
    (dict(entropy_coef=float("nan")), "entropy_coef"), (dict(seed=-1), "seed"),
    # clamped SwiGLU's alpha and limit: positive, finite, and for clamped_swiglu alone
    (dict(activation="clamped_swiglu", swiglu_alpha=0.0), "^swiglu_alpha: expected a number > 0"),
    (dict(activation="clamped_swiglu", swiglu_limit=-7.0), "^swiglu_limit: expected a number > 0"),
    (dict(activation="clamped_swiglu", swiglu_limit=float("inf")), "^swiglu_limit: expected a finite"),
    (dict(activation="clamped_swiglu", swiglu_alpha="1.7"), "^swiglu_alpha: expected a finite"),
    (dict(swiglu_alpha=1.5), "^swiglu_alpha: only activation \\('clamped_swiglu',\\) reads it"),
    (dict(activation="gelu", swiglu_limit=5.0), "^swiglu_limit: only activation"),
    (dict(ffn_bias=1), "^ffn_bias: expected a bool"),
    (dict(combine="inputs"), "^combine: expected one of \\('output', 'input'\\)"),
    (dict(ffn_bias=True, num_shared_experts=1), "^ffn_bias: the shared experts have no biases"),
])
def test_config_errors_name_the_field(kw, word):
    with pytest.raises(ValueError, match=word):
        cfg(**kw)


def test_layer_input_errors():
    layer = moe_py.MoELayer(cfg())
    x = np.zeros((3, 8), np.float32)
    with pytest.raises(ValueError, match="x"):
        layer(np.zeros((3, 7), np.float32))
    for bad in (x.astype(np.float16), x.astype(np.int32), x.astype(np.float64)):
        with pytest.raises(TypeError, match="x"):
            layer(bad)
    nan = x.copy()
    nan[1, 2] = np.nan
    with pytest.raises(ValueError, match="x"):
        layer(nan)
    with pytest.raises(ValueError, match="padding_mask"):
        layer(x, padding_mask=np.ones(4, bool))
    with pytest.raises(ValueError, match="padding_mask"):
        layer(x, padding_mask=np.ones((1, 3), bool))  # would broadcast; refused
    with pytest.raises(TypeError, match="padding_mask"):
        layer(x, padding_mask=np.ones(3, np.float32))
    with pytest.raises(ValueError, match="padding_mask"):
        layer(x, padding_mask=np.array([1, 2, 0]))
    fresh = moe_py.MoELayer(cfg())
    with pytest.raises(RuntimeError, match="backward"):
        fresh.backward(x)
    layer(x)
    with pytest.raises(ValueError, match="dy"):
        layer.backward(np.zeros((3, 9), np.float32))
    with pytest.raises(TypeError, match="dy"):
        layer.backward(np.zeros((3, 8), np.float64))
    layer.params["w1"] = np.zeros((4, 8, 15), np.float32)
    with pytest.raises(ValueError, match="w1"):
        layer(x)
    layer.params["w1"] = np.zeros((4, 8, 16), np.float64)
    with pytest.raises(TypeError, match="w1"):
        layer(x)


def test_other_argument_errors():
    with pytest.raises(ValueError, match="n"):
        moe_py.set_num_threads(0)
    layer = moe_py.MoELayer(cfg())
    with pytest.raises(ValueError, match="start_std"):
        layer.set_noise_annealing(-1.0, 10)
    with pytest.raises(ValueError, match="anneal_steps"):
        layer.set_noise_annealing(1.0, 0)


def run_all(layer, x, mask):
    o = layer(x, padding_mask=mask)
    layer.zero_grad()
    dx = layer.backward(np.ones(x.shape, x.dtype))
    return [o.y, dx, *o.router, *[layer.grads[k].copy() for k in sorted(layer.grads)]]


def test_non_contiguous_inputs_match_contiguous_copies():
    rng = np.random.default_rng(0)
    layer = moe_py.MoELayer(cfg(capacity_factor=1.0))
    base = rng.standard_normal((8, 10)).astype(np.float32)
    views = [base.T[:, :8],                      # transposed view [10, 8]
             rng.standard_normal((10, 16)).astype(np.float32)[:, ::2],  # strided
             np.asfortranarray(rng.standard_normal((10, 8)).astype(np.float32))]
    mask = np.ones((10, 2), bool)[:, 0]
    mask[3] = False
    mask_view = np.repeat(mask, 2)[::2]  # non-contiguous
    for v in views:
        got = run_all(layer, v, mask_view)
        want = run_all(layer, np.ascontiguousarray(v), np.ascontiguousarray(mask))
        for a, b in zip(got, want):
            assert np.array_equal(a, b)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_empty_and_all_padding_batches(dtype):
    layer = moe_py.MoELayer(cfg(dtype=dtype, capacity_factor=1.0, entropy_coef=0.1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x, mask in [(np.zeros((0, 8), dtype), None), (np.ones((2, 3, 8), dtype), np.zeros((2, 3), bool))]:
            o = layer(x, padding_mask=mask)
            assert (o.y == 0).all() and o.aux_loss == 0.0
            assert o.losses == {"load_balance": 0.0, "z_loss": 0.0, "entropy": 0.0}
            layer.zero_grad()
            dx = layer.backward(np.ones_like(x))
            assert (dx == 0).all() and all((g == 0).all() for g in layer.grads.values())


def test_shapes_single_token_and_batched_equal_flat():
    rng = np.random.default_rng(1)
    layer = moe_py.MoELayer(cfg(dtype="float64"))
    x = rng.standard_normal((2, 5, 8))
    assert layer(x[0, 0]).y.shape == (8,)
    mask = rng.random((2, 5)) > 0.3
    a = run_all(layer, x, mask)
    b = run_all(layer, x.reshape(10, 8), mask.reshape(10))
    for u, v in zip(a, b):
        assert np.array_equal(u.reshape(v.shape), v)


# ---- configs: bounds and NumPy scalars; non-finite values named where they are made ----

def small_layer(**kw):
    cfg = dict(d_model=16, d_ff=24, num_experts=4, top_k=2, seed=1)
    cfg.update(kw)
    return moe_py.MoELayer(MoEConfig(**cfg))


def test_zero_capacity_is_refused():
    with pytest.raises(ValueError, match="capacity_factor"):
        MoEConfig(capacity_factor=0)


@pytest.mark.parametrize("kw,word", [({"seed": 2**64}, "seed"), ({"seed": -1}, "seed")])
def test_config_bounds_name_the_field(kw, word):
    with pytest.raises(ValueError, match=word):
        MoEConfig(**kw)


def test_numpy_scalars_become_python_scalars():
    cfg = MoEConfig(d_model=np.uint8(200), d_ff=np.int64(8), num_experts=np.int32(4),
                    load_balance_coef=np.float32(0.5), straight_through=np.bool_(True))
    assert type(cfg.d_model) is int and cfg.d_model * 3 == 600
    json.dumps(ModelConfig(d_model=200, n_heads=4, moe=cfg).to_dict())


def test_noise_too_large_for_float32_is_refused():
    with pytest.raises(ValueError, match="start_std"):
        small_layer().set_noise_annealing(1e39, 10)


def test_huge_coefficient_names_itself():
    layer = small_layer(z_loss_coef=1e308)
    x = np.random.default_rng(0).standard_normal((10, 16)).astype(np.float32) * 30
    with pytest.raises(NonFiniteError, match="z_loss_coef"):
        layer(x)


def test_nan_aux_weight_is_refused():
    layer = small_layer()
    x = np.ones((5, 16), np.float32)
    layer(x)
    with pytest.raises(ValueError, match="aux_weight"):
        layer.backward(np.ones_like(x), aux_weight=float("nan"))


def test_huge_x_names_x_not_an_internal_argument():
    layer = small_layer()
    x = np.full((5, 16), 1e20, np.float32)
    with pytest.raises(ValueError, match="^x: "):
        layer(x)


def test_masked_nan_is_still_nan():
    x = np.ma.masked_array(np.ones((4, 16), np.float32), mask=np.zeros((4, 16), bool))
    x.data[0, 0] = np.nan
    x.mask[0, 0] = True
    with pytest.raises(ValueError, match="x: contains NaN"):
        small_layer()(x)


def test_rows_past_the_32_bit_blas_are_refused():
    with pytest.raises(ValueError, match="32-bit"):
        check_row_count(2**31, "x")
    check_row_count(2**31 - 1, "x")
