"""The layers' way into the C++ extension moe_py._core (typed in _core.pyi); the public
moe_py.kernels hands the same kernels to benchmarks and experiments.

Kernels that exist per dtype are bound twice (name_f32, name_f64): `kernel(name, dtype)`
picks one. Everything is looked up on _core at call time, so a profiler may wrap _core's
functions (moe_py.kernels.wrapped does). Call every kernel by keyword: a misspelt or
missing keyword fails at once with the kernel's signature in the message.
"""
from typing import Callable

import numpy as np

from ._omp_env import clamp_omp_num_threads

clamp_omp_num_threads()  # before _core loads libgomp, which reads it once
from . import _core  # noqa: E402

Activation = _core.Activation
DropPolicy = _core.DropPolicy
GroupScore = _core.GroupScore
RouterForwardResult = _core.RouterForwardResult
RouterKind = _core.RouterKind
RouterOptions = _core.RouterOptions

_SUFFIX = {np.dtype(np.float32): "_f32", np.dtype(np.float64): "_f64"}


def kernel(name: str, dtype) -> Callable:
    """The `name` kernel for arrays of `dtype` (float32 or float64)."""
    return getattr(_core, name + _SUFFIX[np.dtype(dtype)])


# ---- kernels with one binding for every dtype ---------------------------------------

def dispatch_plan(**kw):
    return _core.dispatch_plan(**kw)


def load_balance_of_sums(**kw) -> float:
    return float(_core.load_balance_of_sums(**kw))


def multi_token_labels(**kw):
    return _core.multi_token_labels(**kw)


def set_num_threads(n: int) -> None:
    _core.set_num_threads(n=n)


def get_num_threads() -> int:
    return int(_core.get_num_threads())


def build_facts() -> dict:
    return dict(_core.build_facts())


def fma_peak(iters: int):
    return _core.fma_peak(iters=iters)


def pool_cached_bytes() -> int:
    return int(_core.pool_cached_bytes())


def pool_release() -> None:
    _core.pool_release()


def zeros(shape, dtype) -> np.ndarray:
    """Zeros from the block cache (no fresh pages for a buffer made every step)."""
    return kernel("zeros", dtype)(shape=[int(d) for d in shape])


def _contiguous_parts(a: np.ndarray):
    """a as C-contiguous pieces the kernels read without a copy: a itself, or each matrix of a
    stack of contiguous ones (the halves of transformers' gate_up_proj); None otherwise."""
    if a.flags.c_contiguous:
        return [a]
    if a.ndim > 1 and a[0].flags.c_contiguous:
        return list(a)
    return None


def all_finite(a) -> bool:
    """np.isfinite(a).all() in one parallel pass per contiguous piece, with no temporary
    (float arrays; anything else goes through NumPy)."""
    if isinstance(a, np.ndarray) and a.dtype in _SUFFIX:
        parts = _contiguous_parts(a)
        if parts is not None:
            return all(bool(kernel("all_finite", a.dtype)(a=m)) for m in parts)
    return bool(np.isfinite(a).all())


def round_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 x rounded to bfloat16 values (kept as float32)."""
    return _core.round_to_bf16(x=x)


def fingerprint(x: np.ndarray) -> bytes:
    """Bytes that change whenever any one value of the float32 array x changes: 64 per
    contiguous piece (no copy of a stack of contiguous matrices)."""
    parts = _contiguous_parts(x) if isinstance(x, np.ndarray) else None
    return b"".join(bytes(_core.fingerprint(x=m)) for m in (parts if parts is not None else [x]))


def pack_expert_weights(**kw):
    """Float32 expert weights packed for the bfloat16 kernel in use (cpp/experts.h)."""
    return _core.pack_expert_weights(**kw)


def bf16_kernel() -> str:
    """The bfloat16 GEMM kernel compute_dtype="bfloat16" runs on now (cpp/small_gemm_bf16.h)."""
    return str(_core.bf16_kernel())


def set_bf16_kernel(name: str) -> None:
    _core.set_bf16_kernel(kernel=name)


def bf16_kernel_available(name: str) -> bool:
    return bool(_core.bf16_kernel_available(kernel=name))


def bf16_kernel_pays(name: str) -> bool:
    return bool(_core.bf16_kernel_pays(kernel=name))


def bf16_self_check(name: str) -> bool:
    return bool(_core.bf16_self_check(kernel=name))
