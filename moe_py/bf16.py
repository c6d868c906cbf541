"""bfloat16 compute of the expert GEMMs (MoEConfig.compute_dtype="bfloat16"; docs/design.md,
"bfloat16 compute").

Parameters, inputs, outputs and gradients stay float32 (master weights). Every expert GEMM,
forward and backward, reads bfloat16-rounded operands (round to nearest, ties to even) and
sums in float32; the router, the losses, the activations' arithmetic and the combine stay
float32, as under torch.autocast("cpu", dtype=torch.bfloat16) with an fp32 router.

The bfloat16 copy of the expert weights is made once per parameter update: on a bfloat16
kernel, their packs as the kernel's products read them (bfloat16 pairs, the forward's and
the transposes the backward multiplies by), so that no call packs weights; on the fallback,
a rounded float32 copy. The layer keeps it with a fingerprint of the float32 weights' bits
(cpp/bf16.h: any changed value changes it), read again at each forward, which costs one
read of the weights against a conversion's read, rounding and write. So an optimiser step,
a checkpoint load or an in-place edit by hand is seen, with no call to make.

The GEMM kernel (cpp/small_gemm_bf16.h), chosen once per process from what the CPU can run:
- "amx": TDPBF16PS on AMX tiles, where the CPU has AMX-BF16 and the OS lets the process use
  it, and the kernel passes its self-check against a float64 product;
- "avx512_bf16": VDPBF16PS, where the CPU and the OS have AVX512-BF16 (the same self-check);
- "fallback": rounded operands in the float32 FMA GEMMs. A float32 product of two bfloat16
  values is exact, so these are the numbers of a bfloat16 GEMM with float32 sums, in k order;
  slower than float32, not faster;
- "emulated" and "amx_emulated": the avx512_bf16 and amx kernels' code with the instruction
  emulated by float32 FMAs on AVX2 (for testing that code on any CPU; slower still).
The kernels differ only in the order of the float32 sums. `moe_py.machine.bf16_path()` (in
`info`) names the one in use; the environment variable MOE_PY_BF16_KERNEL (read when moe_py
is imported) or `set_kernel` picks another, e.g. the fallback on a bf16-capable CPU.
"""
from __future__ import annotations

import contextlib
import os
from typing import Dict, Iterator, Optional, Tuple

import numpy as np

from . import _kernels

KERNELS = ("amx", "avx512_bf16", "amx_emulated", "emulated", "fallback")
KERNEL_ENV = "MOE_PY_BF16_KERNEL"


def kernel() -> str:
    """The bfloat16 GEMM kernel in use in this process."""
    return _kernels.bf16_kernel()


def available_kernels() -> Tuple[str, ...]:
    """The kernels this CPU and OS can run."""
    return tuple(k for k in KERNELS if _kernels.bf16_kernel_available(k))


def set_kernel(name: str) -> None:
    """Run compute_dtype="bfloat16" on kernel `name` from now on, in this process."""
    if name not in KERNELS:
        raise ValueError(f"kernel: expected one of {', '.join(KERNELS)}, got {name!r}")
    if not _kernels.bf16_kernel_available(name):
        raise ValueError(f"kernel: {name!r} does not run on this CPU (available: "
                         f"{', '.join(available_kernels())})")
    _kernels.set_bf16_kernel(name)


@contextlib.contextmanager
def using_kernel(name: str) -> Iterator[None]:
    """set_kernel(name) for the duration of a with block, then the previous kernel again."""
    before = kernel()
    set_kernel(name)
    try:
        yield
    finally:
        _kernels.set_bf16_kernel(before)


def _kernel_from_environment() -> None:
    name = os.environ.get(KERNEL_ENV, "")
    if name and name != "auto":
        try:
            set_kernel(name)
        except ValueError as e:
            raise ValueError(f"{KERNEL_ENV}={name!r}: {e}") from None


_kernel_from_environment()


def round_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 x rounded to bfloat16 (nearest, ties to even; +-inf kept, NaN stays NaN, a
    finite value past the largest bfloat16 becomes inf), returned as float32."""
    x = np.asarray(x)
    if x.dtype != np.float32:
        raise TypeError(f"x: expected float32, got {x.dtype}")
    return _kernels.round_to_bf16(np.ascontiguousarray(x))


class GemmWeights:
    """The expert weights as one parameter update's bfloat16 GEMMs read them (immutable once
    made): on a bfloat16 kernel, the float32 weights with their packs for that kernel (the
    forward's, and the backward's, packed when a backward first asks); on the fallback, a
    rounded copy of them."""

    def __init__(self, weights: Dict[str, np.ndarray], kernel_name: str, activation, linear: bool) -> None:
        self.kernel = kernel_name
        # the backward's packs too, whatever runs by then (None once retired)
        self._packing: Optional[Dict[str, object]] = dict(
            {n: weights[n] for n in ("w1", "w3", "w2")}, activation=activation, linear=linear, kernel=kernel_name)
        self._backward = None
        if kernel_name == "fallback":
            self.weights = {n: _kernels.round_to_bf16(w) if w.size else w for n, w in weights.items()}
            self.forward_args: Dict[str, object] = {}
        else:
            self.weights = weights
            self.forward_args = {"packed": _kernels.pack_expert_weights(**self._packing, backward=False)}

    def backward_args(self) -> Dict[str, object]:
        """The experts_backward arguments that carry the backward's packs (none on the fallback)."""
        if self.kernel == "fallback":
            return {}
        if self._backward is None:
            if self._packing is None:
                raise RuntimeError("the expert weights were changed in place after this forward "
                                   "(a parameter update between a forward and its backward)")
            self._backward = _kernels.pack_expert_weights(**self._packing, backward=True)
        return {"packed": self._backward}

    def retire(self) -> None:
        """The owner is about to change the weights' values in place: from now on a backward
        that would still pack them raises instead of packing the new values."""
        self._packing = None


class GemmWeightCache:
    """GemmWeights of a dict of float32 expert weights, remade only when the weights changed
    (storage, shape or any value: their fingerprint) or the kernel did. fixed_values: the
    owner never changes the values in place (it replaces the arrays, or itself), so no
    fingerprint is taken (moe_py.hf keys its own cache on torch's version counters)."""

    def __init__(self, fixed_values: bool = False) -> None:
        self._fingerprint = not fixed_values
        self._key: Optional[Tuple] = None
        self._entry: Optional[GemmWeights] = None

    def __call__(self, weights: Dict[str, np.ndarray], activation, linear: bool) -> GemmWeights:
        name = kernel()
        key = (name, activation, linear) + tuple(
            (n, w.__array_interface__["data"][0], w.shape,
             _kernels.fingerprint(w) if w.size and self._fingerprint else b"")
            for n, w in sorted(weights.items()))
        if key != self._key or self._entry is None:
            # a new entry, never edited: a pending backward keeps what its forward used
            self._entry = GemmWeights(weights, name, activation, linear)
            self._key = key
        return self._entry

    def retire(self) -> None:
        """GemmWeights.retire on the current entry, which is then never handed out again."""
        if self._entry is not None:
            self._entry.retire()
        self._entry, self._key = None, None
