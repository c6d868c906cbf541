"""Transformer building blocks, each a forward/backward pair over C++ kernels, and the
Block that joins them with an FFN (moe_py/ffn.py).

Every module keeps `params` and `grads` dicts (backward adds into grads) and
saves in forward exactly what its backward reads.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Tuple, Union

import numpy as np

from ._kernels import kernel

if TYPE_CHECKING:  # for annotations only
    from .ffn import FFN
    from .layer import MoEOutput


class Module:
    params: Dict[str, np.ndarray]
    grads: Dict[str, np.ndarray]

    def _init_grads(self) -> None:
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}


class Linear(Module):
    """y = x W, W [d_in, d_out], no bias. compute_dtype "bfloat16" (float32 only): bfloat16
    operands (x, W and, in the backward, dy) with float32 sums, as under torch autocast."""

    def __init__(self, d_in: int, d_out: int, rng: np.random.Generator, dtype, std: float = 0.02):
        self.params = {"w": (rng.standard_normal((d_in, d_out)) * std).astype(dtype)}
        self._init_grads()
        self.compute_dtype: Optional[str] = None

    def _bf16(self) -> Dict[str, bool]:
        return {"bf16": True} if self.compute_dtype == "bfloat16" else {}

    def forward(self, x2: np.ndarray) -> np.ndarray:
        self._x = x2
        self._mode = self._bf16()  # the backward computes as its forward did
        return kernel("linear_forward", x2.dtype)(x=x2, w=self.params["w"], **self._mode)

    def backward(self, dy2: np.ndarray, need_dx: bool = True) -> np.ndarray:
        return kernel("linear_backward", dy2.dtype)(x=self._x, w=self.params["w"], dy=dy2,
                                                    dw=self.grads["w"], need_dx=need_dx, **self._mode)


class RMSNorm(Module):
    def __init__(self, d: int, dtype, eps: float = 1e-6):
        self.eps = eps
        self.params = {"g": np.ones(d, dtype=dtype)}
        self._init_grads()

    def forward(self, x2: np.ndarray) -> np.ndarray:
        y, self._rstd = kernel("rmsnorm_forward", x2.dtype)(x=x2, g=self.params["g"], eps=self.eps)
        self._x = x2
        return y

    def backward(self, dy2: np.ndarray) -> np.ndarray:
        return kernel("rmsnorm_backward", dy2.dtype)(x=self._x, g=self.params["g"], rstd=self._rstd,
                                                     dy=dy2, dg=self.grads["g"])


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
        x = kernel("gather_rows", tok.dtype)(x=tok, row_token=self._ids)
        x.reshape(B, S, -1)[...] += self.params["positions"][:S]
        self._shape = (B, S)
        return x

    def backward(self, dx2: np.ndarray) -> None:
        B, S = self._shape
        kernel("scatter_add_rows", dx2.dtype)(dout=dx2, ids=self._ids, table_grad=self.grads["tokens"])
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
        out, self._probs = kernel("attention_forward", x2.dtype)(qkv=qkv, mask=mask, heads=self.heads)
        self._qkv, self._mask = qkv, mask
        return self.proj.forward(out.reshape(B * S, -1))

    def backward(self, dy2: np.ndarray) -> np.ndarray:
        dout = self.proj.backward(dy2)
        B, S, _ = self._qkv.shape
        dqkv = kernel("attention_backward", dy2.dtype)(
            qkv=self._qkv, mask=self._mask, probs=self._probs, dout=dout.reshape(B, S, -1),
            heads=self.heads)
        return self.qkv.backward(dqkv.reshape(B * S, -1))


class Block(Module):
    """One transformer layer: x += Attn(RMSNorm(x)); x += FFN(RMSNorm(x)).

    The FFN is anything with the FFN interface of moe_py/ffn.py (a MoELayer, a DenseFFN,
    ...); `make_ffn(rng)` builds it after the attention, so the draws from rng keep their order.
    """

    def __init__(self, d_model: int, n_heads: int, make_ffn: Callable[[np.random.Generator], Any],
                 rng: np.random.Generator, dtype, out_std: float):
        self.norm1 = RMSNorm(d_model, dtype)
        self.attn = CausalSelfAttention(d_model, n_heads, rng, dtype, out_std)
        self.norm2 = RMSNorm(d_model, dtype)
        self.ffn = make_ffn(rng)

    def children(self) -> Dict[str, Union[Module, FFN]]:
        return {"norm1": self.norm1, "attn": self.attn, "norm2": self.norm2, "ffn": self.ffn}

    def forward(self, x2: np.ndarray, mask: np.ndarray, shape, training: bool,
                token_ids: Optional[np.ndarray] = None, routing=None) -> Tuple[np.ndarray, MoEOutput]:
        """x2 [B*S, d] -> (x2 after the layer, the FFN's output with its routing and losses).
        The FFN sees [B, S, d] (the sequence balance scope needs the sequences) and the
        token ids [B, S] (the hash router reads them)."""
        # in place on the sublayers' fresh outputs (nothing else holds them)
        a = self.attn.forward(self.norm1.forward(x2), mask, shape)
        a += x2
        x2 = a
        self._ffn_shape = tuple(shape) + (x2.shape[-1],)
        h = self.norm2.forward(x2).reshape(self._ffn_shape)
        # routing (an intervention) reaches only FFNs that route; None keeps the FFN interface
        extra = {} if routing is None else {"routing": routing}
        out = self.ffn.forward(h, padding_mask=mask.reshape(shape), training=training,
                               token_ids=token_ids, **extra)
        return x2 + out.y.reshape(x2.shape), out

    def backward(self, dx2: np.ndarray, aux_weight: float) -> np.ndarray:
        d_ffn = self.ffn.backward(dx2.reshape(self._ffn_shape), aux_weight=aux_weight)
        d = self.norm2.backward(d_ffn.reshape(dx2.shape))
        d += dx2
        dx = self.norm1.backward(self.attn.backward(d))
        dx += d
        return dx
