"""bfloat16 compute of the expert GEMMs (MoEConfig.compute_dtype="bfloat16"; docs/design.md,
"bfloat16 compute").

Parameters, inputs, outputs and gradients stay float32 (master weights). Every expert GEMM,
forward and backward, reads bfloat16-rounded operands (round to nearest, ties to even) and
sums in float32; the router, the losses, the activations' arithmetic and the combine stay
float32, as under torch.autocast("cpu", dtype=torch.bfloat16) with an fp32 router.

The rounded copy of the expert weights is made once per parameter update: the layer keeps
it with a fingerprint of the float32 weights' bits (cpp/bf16.h: any changed value changes
it), read again at each forward, which costs one read of the weights against a conversion's
read, rounding and write. So an optimiser step, a checkpoint load or an in-place edit by
hand is seen, with no call to make.

The arithmetic path: this build has no bfloat16 GEMM kernel yet, so every path is the
fallback, rounded operands in float32 FMA GEMMs (a float32 product of two bfloat16 values is
exact, so the numbers are those of a bfloat16 GEMM with float32 accumulation in the same
summation order). It is slower than float32, not faster: `moe_py.machine.bf16_path()`
(in `info`) says so.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np

from . import _kernels


def round_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 x rounded to bfloat16 (nearest, ties to even; +-inf kept, NaN stays NaN, a
    finite value past the largest bfloat16 becomes inf), returned as float32."""
    x = np.asarray(x)
    if x.dtype != np.float32:
        raise TypeError(f"x: expected float32, got {x.dtype}")
    return _kernels.round_to_bf16(np.ascontiguousarray(x))


class RoundedWeights:
    """The bfloat16-rounded copy of a dict of float32 weights, remade only when the weights
    changed (storage, shape or any value: their fingerprint)."""

    def __init__(self) -> None:
        self._key: Optional[Tuple] = None
        self._rounded: Dict[str, np.ndarray] = {}

    def __call__(self, weights: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        key = tuple((n, w.__array_interface__["data"][0], w.shape, _kernels.fingerprint(w) if w.size else b"")
                    for n, w in sorted(weights.items()))
        if key != self._key:
            # a new dict, never edited in place: a pending backward keeps what its forward used
            self._rounded = {n: _kernels.round_to_bf16(w) if w.size else w for n, w in weights.items()}
            self._key = key
        return self._rounded
