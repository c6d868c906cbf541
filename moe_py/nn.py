"""Transformer building blocks, each a forward/backward pair over C++ kernels.

Every module keeps `params` and `grads` dicts (backward adds into grads) and
saves in forward exactly what its backward reads.
"""
from __future__ import annotations

from typing import Dict

import numpy as np

from ._kernels import kernel
from .config import MoEConfig
from .experts import Experts, init_expert_weights


class Module:
    params: Dict[str, np.ndarray]
    grads: Dict[str, np.ndarray]

    def _init_grads(self) -> None:
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}


class Linear(Module):
    """y = x W, W [d_in, d_out], no bias."""

    def __init__(self, d_in: int, d_out: int, rng: np.random.Generator, dtype, std: float = 0.02):
        self.params = {"w": (rng.standard_normal((d_in, d_out)) * std).astype(dtype)}
        self._init_grads()

    def forward(self, x2: np.ndarray) -> np.ndarray:
        self._x = x2
        return kernel("linear_forward", x2.dtype)(x2, self.params["w"])

    def backward(self, dy2: np.ndarray, need_dx: bool = True) -> np.ndarray:
        return kernel("linear_backward", dy2.dtype)(self._x, self.params["w"], dy2, self.grads["w"], need_dx)


class RMSNorm(Module):
    def __init__(self, d: int, dtype, eps: float = 1e-6):
        self.eps = eps
        self.params = {"g": np.ones(d, dtype=dtype)}
        self._init_grads()

    def forward(self, x2: np.ndarray) -> np.ndarray:
        y, self._rstd = kernel("rmsnorm_forward", x2.dtype)(x2, self.params["g"], self.eps)
        self._x = x2
        return y

    def backward(self, dy2: np.ndarray) -> np.ndarray:
        return kernel("rmsnorm_backward", dy2.dtype)(self._x, self.params["g"], self._rstd, dy2, self.grads["g"])


class Embedding(Module):
    """Token embedding plus a learned position embedding."""

    def __init__(self, vocab: int, max_seq_len: int, d: int, rng: np.random.Generator, dtype):
        self.params = {"tokens": (rng.standard_normal((vocab, d)) * 0.02).astype(dtype),
                       "positions": (rng.standard_normal((max_seq_len, d)) * 0.02).astype(dtype)}
        self._init_grads()

    def forward(self, ids: np.ndarray) -> np.ndarray:
        """ids int64 [B, S] -> [B*S, d]."""
        B, S = ids.shape
        tok = self.params["tokens"]
        self._ids = np.ascontiguousarray(ids.reshape(-1), dtype=np.int64)
        x = kernel("gather_rows", tok.dtype)(tok, self._ids)
        x.reshape(B, S, -1)[...] += self.params["positions"][:S]
        self._shape = (B, S)
        return x

    def backward(self, dx2: np.ndarray) -> None:
        B, S = self._shape
        kernel("scatter_add_rows", dx2.dtype)(dx2, self._ids, self.grads["tokens"])
        # sum over the batch in a fixed order (NumPy's reduction is thread-free)
        self.grads["positions"][:S] += dx2.reshape(B, S, -1).sum(axis=0)


class CausalSelfAttention(Module):
    """Multi-head causal self-attention; padded keys are invisible, padded queries output 0."""

    def __init__(self, d: int, heads: int, rng: np.random.Generator, dtype, out_std: float):
        if d % heads:
            raise ValueError(f"n_heads: expected a divisor of d_model ({d}), got {heads}")
        self.heads = heads
        self.qkv = Linear(d, 3 * d, rng, dtype)
        self.proj = Linear(d, d, rng, dtype, std=out_std)
        self.params = {"w_qkv": self.qkv.params["w"], "w_out": self.proj.params["w"]}
        self.grads = {"w_qkv": self.qkv.grads["w"], "w_out": self.proj.grads["w"]}

    def forward(self, x2: np.ndarray, mask: np.ndarray, shape) -> np.ndarray:
        B, S = shape
        qkv = self.qkv.forward(x2).reshape(B, S, -1)
        out, self._probs = kernel("attention_forward", x2.dtype)(qkv, mask, self.heads)
        self._qkv, self._mask = qkv, mask
        return self.proj.forward(out.reshape(B * S, -1))

    def backward(self, dy2: np.ndarray) -> np.ndarray:
        dout = self.proj.backward(dy2)
        B, S, _ = self._qkv.shape
        dqkv = kernel("attention_backward", dy2.dtype)(self._qkv, self._mask, self._probs,
                                                       dout.reshape(B, S, -1), self.heads)
        return self.qkv.backward(dqkv.reshape(B * S, -1))


class DenseFFN(Module):
    """The dense baseline: one SwiGLU/GELU FFN on every real token. It runs the
    expert kernels with a single expert that every real token goes to with weight 1,
    so it shares the experts' code (and speed) instead of repeating it."""

    def __init__(self, d: int, d_ff: int, activation: str, rng: np.random.Generator, dtype: str,
                 out_scale: float):
        self.cfg = MoEConfig(d_model=d, d_ff=d_ff, num_experts=1, top_k=1, activation=activation,
                             dtype=dtype)
        self.params = init_expert_weights(self.cfg, rng)
        self.params["w2"] *= out_scale
        self._init_grads()
        self.experts = Experts(self.cfg, self.params, self.grads)

    def forward(self, x2: np.ndarray, mask: np.ndarray) -> np.ndarray:
        real = mask.reshape(-1, 1).astype(bool)
        idx = np.where(real, 0, -1).astype(np.int64)
        return self.experts.forward(x2, idx, real.astype(x2.dtype), np.zeros(idx.shape, bool))

    def backward(self, dy2: np.ndarray) -> np.ndarray:
        dx2, _ = self.experts.backward(dy2)
        return dx2
