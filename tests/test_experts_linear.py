"""The expert kernels on nn.Linear-layout weights (linear=True: w1, w3 [E, d_ff, d_model], w2
[E, d_model, d_ff], as transformers stores experts), read and written in place even when the
experts lie apart (gate and up, the halves of one gate_up_proj [E, 2 d_ff, d_model]).

Every sum is the same in both layouts: the same products in the same k order. So the linear
layout is held bit for bit to the column layout (tests/test_experts.py holds that one to a
NumPy loop), with the weight gradients transposed, where the small GEMM is this project's
micro-kernel; the BLAS fallback of a generic build may order a transposed product otherwise,
so there it is held to rounding."""
import numpy as np
import pytest

import moe_py
from moe_py import bf16
from moe_py._kernels import Activation, kernel

EXACT = moe_py.build_info()["gemm_kernel"] != "blas"
ALPHA, LIMIT = 1.702, 1.0


def same(a, b):
    if EXACT:
        assert np.array_equal(a, b)
    else:
        np.testing.assert_allclose(a, b, rtol=1e-5 if a.dtype == np.float32 else 1e-12, atol=1e-6)


def case(activation, dtype, rows=(300, 0, 257, 40), D=40, F=56, bias=False, seed=0):
    """Column-layout weights, the same weights in the linear layout (w1 and w3 as the halves
    of one gate_up array, w2 contiguous), xs, offsets, dye and the kernels' keywords."""
    rng = np.random.default_rng(seed)
    E, glu = len(rows), activation != "gelu"
    offsets = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
    xs = rng.standard_normal((offsets[-1], D)).astype(dtype)
    gate_up = (rng.standard_normal((E, 2 * F if glu else F, D)) / np.sqrt(D)).astype(dtype)
    down = (rng.standard_normal((E, D, F)) / np.sqrt(F)).astype(dtype)
    lin = {"w1": gate_up[:, :F], "w3": gate_up[:, F:] if glu else np.zeros((0, 0, 0), dtype), "w2": down}
    col = {k: np.ascontiguousarray(v.transpose(0, 2, 1)) for k, v in lin.items()}
    kw = {"activation": Activation.__members__[activation]}
    if activation == "clamped_swiglu":
        kw.update(swiglu_alpha=ALPHA, swiglu_limit=LIMIT)
    if bias:
        b = {"b1": rng.standard_normal((E, F)), "b3": rng.standard_normal((E, F)) if glu else None,
             "b2": rng.standard_normal((E, D))}
        kw.update({k: v.astype(dtype) for k, v in b.items() if v is not None})
    dye = rng.standard_normal((offsets[-1], D)).astype(dtype)
    return col, lin, gate_up, xs, offsets, dye, kw


def run(weights, linear, xs, offsets, dye, kw, grads, path="auto"):
    """(h1, h3, ye, dxs) of one forward and backward; the weight gradients go into grads."""
    dtype = xs.dtype
    h1, h3, ye = kernel("experts_forward", dtype)(xs=xs, offsets=offsets, **weights, linear=linear, **kw)
    bias_grads = {"d" + k: np.zeros_like(v) for k, v in kw.items() if k[0] == "b" and k != "bf16"}
    act = {k: v for k, v in kw.items() if "d" + k not in bias_grads}
    dxs = kernel("experts_backward", dtype)(
        xs=xs, offsets=offsets, **weights, h1=h1, h3=h3, dye=dye, linear=linear, path=path,
        dw1=grads["w1"], dw3=grads["w3"], dw2=grads["w2"], **act, **bias_grads)
    return [h1, h3, ye, dxs, *bias_grads.values()]


def linear_grads(lin, gate_up):
    """Zeroed gradient buffers in the linear layout: dw1, dw3 the halves of one array."""
    g = np.zeros_like(gate_up)
    F = lin["w2"].shape[2]
    return {"w1": g[:, :F], "w3": g[:, F:] if lin["w3"].size else np.zeros_like(lin["w3"]),
            "w2": np.zeros_like(lin["w2"])}


@pytest.mark.parametrize("path", ["by_expert", "two_phase"])
@pytest.mark.parametrize("activation", ["swiglu", "gelu", "clamped_swiglu"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_linear_layout_gives_the_column_layouts_bits_transposed(dtype, activation, path):
    col, lin, gate_up, xs, offsets, dye, kw = case(activation, dtype, bias=activation != "swiglu")
    cg = {k: np.zeros_like(v) for k, v in col.items()}
    want = run(col, False, xs, offsets, dye, kw, cg, path)
    outs = []
    for n in (1, 2, 3):
        moe_py.set_num_threads(n)
        lg = linear_grads(lin, gate_up)
        outs.append((run(lin, True, xs, offsets, dye, kw, lg, path), lg))
    for got, lg in outs:
        for a, b in zip(want, got):
            same(a, b)
        for k in ("w1", "w3", "w2"):
            same(cg[k], lg[k].transpose(0, 2, 1))
    for (a, ga), (b, gb) in zip(outs, outs[1:]):  # and the same bits at 1, 2 and 3 threads
        assert all(np.array_equal(x, y) for x, y in zip(a, b))
        assert all(np.array_equal(ga[k], gb[k]) for k in ga)
    assert np.all(outs[0][1]["w1"][1] == 0)  # the expert with no rows is untouched


@pytest.mark.parametrize("kernel_name", bf16.available_kernels())
def test_linear_layout_in_bfloat16_on_every_kernel(kernel_name):
    col, lin, gate_up, xs, offsets, dye, kw = case("swiglu", np.float32, seed=3)
    col, lin = ({k: bf16.round_to_bf16(v) if v.size else v for k, v in d.items()} for d in (col, lin))
    kw["bf16"] = True
    with bf16.using_kernel(kernel_name):
        cg = {k: np.zeros_like(v) for k, v in col.items()}
        want = run(col, False, xs, offsets, dye, kw, cg)
        lg = {k: np.zeros_like(v) for k, v in lin.items()}
        got = run(lin, True, xs, offsets, dye, kw, lg)
    for a, b in zip(want, got):
        same(a, b)
    for k in ("w1", "w3", "w2"):
        same(cg[k], lg[k].transpose(0, 2, 1))


def test_weights_of_another_form_are_read_as_their_values():
    """A weight array that is not stacked in place (Fortran order, a strided last axis) is
    converted, as any other array argument: the same numbers, never other ones."""
    col, lin, gate_up, xs, offsets, dye, kw = case("swiglu", np.float64, rows=(9, 4), D=8, F=6)
    want = kernel("experts_forward", np.float64)(xs=xs, offsets=offsets, **lin, linear=True, **kw)
    odd = {"w1": np.asfortranarray(lin["w1"]), "w3": np.repeat(lin["w3"], 2, axis=2)[:, :, ::2],
           "w2": lin["w2"]}
    got = kernel("experts_forward", np.float64)(xs=xs, offsets=offsets, **odd, linear=True, **kw)
    for a, b in zip(want, got):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("bad", ["read_only", "overlapping", "fortran", "shape"])
def test_a_gradient_buffer_it_cannot_write_in_place_is_refused(bad):
    col, lin, gate_up, xs, offsets, dye, kw = case("swiglu", np.float64, rows=(9, 4), D=8, F=6)
    h1, h3, _ = kernel("experts_forward", np.float64)(xs=xs, offsets=offsets, **lin, linear=True, **kw)
    g = linear_grads(lin, gate_up)
    if bad == "read_only":
        g["w2"].flags.writeable = False
    elif bad == "overlapping":  # expert 1's matrix would start inside expert 0's
        g["w2"] = np.lib.stride_tricks.as_strided(np.zeros(200), (2, 8, 6), (8 * 3, 8 * 6, 8))
    elif bad == "fortran":
        g["w2"] = np.asfortranarray(g["w2"])
    else:
        g["w2"] = np.zeros((2, 6, 8))  # the column layout's shape
    with pytest.raises((ValueError, TypeError), match="dw2"):
        kernel("experts_backward", np.float64)(xs=xs, offsets=offsets, **lin, h1=h1, h3=h3, dye=dye,
                                               linear=True, dw1=g["w1"], dw3=g["w3"], dw2=g["w2"], **kw)
