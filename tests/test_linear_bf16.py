"""bfloat16 compute of the linear layers (ModelConfig.compute_dtype="bfloat16": the attention
projections and the heads, as torch autocast runs nn.Linear): every bfloat16 kernel against
float64 products of the rounded operands, the threads, bad input, and the model's plumbing."""
import numpy as np
import pytest

import moe_py
from moe_py import bf16
from moe_py._kernels import kernel
from moe_py.bf16 import round_to_bf16
from moe_py.models import ModelConfig, TransformerLM

U32 = 2.0 ** -24  # float32's unit roundoff
# (n, in, out): the big tiles (at least 8 of 128 x 256), the small ones (fewer: the weight
# gradient of every shape here), edges of both
SHAPES = [(300, 64, 96), (1030, 128, 384), (37, 5, 70)]


@pytest.fixture(params=bf16.available_kernels())
def gemm_kernel(request):
    with bf16.using_kernel(request.param):
        yield request.param


def operands(n, d_in, d_out, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d_in)).astype(np.float32)
    w = rng.standard_normal((d_in, d_out)).astype(np.float32)
    dy = rng.standard_normal((n, d_out)).astype(np.float32)
    return x, w, dy


def within(got, want, mag, K):
    """|got - want| <= (K + 2) u32 mag: a float32 sum of K exact products, in any order."""
    return np.all(np.abs(got - want) <= (K + 2) * U32 * mag)


@pytest.mark.parametrize("shape", SHAPES)
def test_the_products_are_the_float64_products_of_the_rounded_operands(gemm_kernel, shape):
    n, d_in, d_out = shape
    x, w, dy = operands(*shape)
    X, W, DY = (round_to_bf16(a).astype(np.float64) for a in (x, w, dy))
    y = kernel("linear_forward", np.float32)(x=x, w=w, bf16=True)
    assert within(y, X @ W, np.abs(X) @ np.abs(W), d_in)
    dw0 = np.random.default_rng(1).standard_normal((d_in, d_out)).astype(np.float32)
    dw = dw0.copy()
    dx = kernel("linear_backward", np.float32)(x=x, w=w, dy=dy, dw=dw, bf16=True)
    assert within(dx, DY @ W.T, np.abs(DY) @ np.abs(W.T), d_out)
    assert within(dw, dw0 + X.T @ DY, np.abs(dw0) + np.abs(X.T) @ np.abs(DY), n)
    # and not the float32 product: the operands were rounded
    assert not np.array_equal(y, kernel("linear_forward", np.float32)(x=x, w=w))


def linear_bits():
    x, w, dy = operands(1030, 128, 384, seed=2)
    dw = np.zeros_like(w)
    y = kernel("linear_forward", np.float32)(x=x, w=w, bf16=True)
    dx = kernel("linear_backward", np.float32)(x=x, w=w, dy=dy, dw=dw, bf16=True)
    return {"y": y, "dx": dx, "dw": dw}


def test_the_bits_do_not_depend_on_the_threads():
    runs = []
    for n in (1, 2, 3):
        moe_py.set_num_threads(n)
        runs.append(linear_bits())
    moe_py.set_num_threads(2)
    for r in runs[1:]:
        assert all(np.array_equal(r[k], runs[0][k]) for k in r)


def test_float64_is_refused_naming_bf16():
    x = np.zeros((3, 4))
    with pytest.raises(ValueError, match="bf16"):
        kernel("linear_forward", np.float64)(x=x, w=np.zeros((4, 2)), bf16=True)
    with pytest.raises(ValueError, match="bf16"):
        kernel("linear_backward", np.float64)(x=x, w=np.zeros((4, 2)), dy=np.zeros((3, 2)),
                                              dw=np.zeros((4, 2)), bf16=True)


def test_the_model_runs_its_projections_and_heads_in_bfloat16():
    """The attention projections and the heads follow ModelConfig.compute_dtype (the FFNs do
    already); the step's loss stays within bfloat16's reach of float32's."""
    kw = dict(vocab_size=64, max_seq_len=16, d_model=32, n_layers=2, n_heads=2, d_ff=48, n_predict=2,
              moe=dict(d_model=32, d_ff=24, num_experts=4, top_k=2))
    fp32 = TransformerLM(ModelConfig(**kw))
    ours = TransformerLM(ModelConfig(**{**kw, "moe": dict(kw["moe"], compute_dtype="bfloat16")},
                                     compute_dtype="bfloat16"))
    linears = [lin for b in ours.blocks for lin in (b.attn.qkv, b.attn.proj)] + ours.heads
    assert all(lin.compute_dtype == "bfloat16" for lin in linears)
    assert all(lin.compute_dtype is None for b in fp32.blocks for lin in (b.attn.qkv, b.attn.proj))
    ids = np.random.default_rng(0).integers(0, 64, (3, 16))
    mask = np.ones((3, 16), bool)
    a = fp32.loss_and_backward(ids, ids, mask)["loss"]
    b = ours.loss_and_backward(ids, ids, mask)["loss"]
    assert a != b and abs(a - b) <= 3 * 2.0 ** -8 * abs(a)
    for (name, _, g32), (_, _, g16) in zip(fp32.named_parameters(), ours.named_parameters()):
        if name.endswith(("w_qkv", "w_out")) or name.startswith("heads"):
            cos = np.vdot(g32, g16) / (np.linalg.norm(g32) * np.linalg.norm(g16))
            assert cos >= 0.99, name
