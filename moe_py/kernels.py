"""The raw C++ kernels, for benchmarks and experts.

The layers call these kernels after checking their arguments; called from here they check
nothing beyond their types (signatures in moe_py/_core.pyi; every argument by keyword).
Use them to time one kernel alone, to replay a recorded call, or to see inside a real step:
`wrapped` routes every call moe_py makes to the named kernels through your wrapper, because
moe_py looks its kernels up at call time.

    from moe_py import kernels
    c = kernels.kernel("matmul", np.float32)(a=a, b=b)
    with kernels.wrapped(lambda name, fn: timed(fn), "experts_forward_f32"):
        layer(x)
"""
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

from . import _kernels
from . import _core  # after _kernels, which sets the OpenMP environment before _core loads

__all__ = ["kernel", "wrapped", "fma_peak"]


def kernel(name: str, dtype: Optional[object] = None) -> Callable:
    """The kernel `name`; with a dtype (float32 or float64), its binding for that dtype:
    kernel("matmul", np.float32) is the kernel named matmul_f32."""
    return getattr(_core, name) if dtype is None else _kernels.kernel(name, dtype)


@contextmanager
def wrapped(wrap: Callable[[str, Callable], Callable], *names: str) -> Iterator[None]:
    """Inside the block, every call to the kernel `name` (full name, e.g. "experts_forward_f32")
    from anywhere in moe_py goes to wrap(name, kernel) instead; on leaving, the kernels are
    restored."""
    originals = {name: getattr(_core, name) for name in names}
    try:
        for name, fn in originals.items():
            setattr(_core, name, wrap(name, fn))
        yield
    finally:
        for name, fn in originals.items():
            setattr(_core, name, fn)


def fma_peak(iters: int):
    """(FLOPs done, checksum) of a register-only FP32 FMA loop of `iters` iterations on every
    OpenMP thread: 16 independent SIMD accumulators per thread, 2 FLOPs per lane per FMA.
    Divide the FLOPs by the call's wall time for the machine's FMA peak."""
    return _kernels.fma_peak(iters)
