"""The C++ kernel of a given name for a dtype (_core binds one set per dtype)."""
import numpy as np

from . import _core

_SUFFIX = {np.dtype(np.float32): "_f32", np.dtype(np.float64): "_f64"}


def kernel(name: str, dtype):
    return getattr(_core, name + _SUFFIX[np.dtype(dtype)])


def build_facts() -> dict:
    return dict(_core.build_facts())


def get_num_threads() -> int:
    return int(_core.get_num_threads())
