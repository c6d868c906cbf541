"""RoutedExperts: the experts of a MoE layer run for a routing the caller gives.

    experts = RoutedExperts(cfg)                      # or layer.routed_experts(): its weights
    out = experts(x, topk_indices, topk_weights, padding_mask=None)
    dx, d_topk_weights = out.backward(dy)             # weight gradients added into experts.grads

y[t] = sum_j topk_weights[t, j] * FFN_{topk_indices[t, j]}(x[t]) (or, with cfg.combine "input",
sum_j FFN_{topk_indices[t, j]}(topk_weights[t, j] * x[t]); d_topk_weights is then
<dL/d(expert input), x[t]>), on the same kernels and the
same dispatch as MoELayer (so, for the same routing and weights, bitwise MoELayer's y, dx and
expert gradients). This is the seam a transformers experts backend, routing replay, forced
routing and expert ablation call: none of them needs its own copy of the expert compute.

The contract's semantics (docs/design.md, "Routing" and "Padding"):
- padded tokens (padding_mask False/0) go to no expert, whatever their indices say: their
  y, dx and d_topk_weights are 0, and they take no capacity;
- an index of -1 is an empty slot (no expert, gradient 0), as expert choice produces;
- cfg.capacity_factor (None: dropless) drops the assignments over C = ceil(c * R * k / E)
  per expert: with drop_policy "position" every token's first slot before any second slot,
  then token order; with "probs" by topk_weights, highest first (they stand in for the
  router's probabilities, which this entry does not see). Dropped slots contribute nothing
  and get gradient 0 (no renormalisation); `out.dropped` marks them.
The router's parameters and losses are not involved: `cfg` gives the experts' shapes
(num_experts, d_model, d_ff, activation and its alpha/limit, ffn_bias, dtype), the combine
and the capacity.
"""
from __future__ import annotations

import threading
from typing import Dict, NamedTuple, Optional, Tuple

import numpy as np

from ._checks import NonFiniteError, as_grad, as_mask, as_tokens, check_row_count
from ._guard import OneCaller
from ._kernels import all_finite
from .capacity import capacity, drops_position, drops_probs, slot_counts
from .config import MoEConfig, check_compute_dtype
from .experts import EXPERT_KEYS, Experts, check_layout, init_expert_weights


class RoutedExpertsContext:
    """What one forward saved for its backward."""

    __slots__ = ("owner", "saved", "lead", "k", "thread")

    def __init__(self, owner, saved, lead, k):
        self.owner, self.saved, self.lead, self.k = owner, saved, lead, k
        self.thread = threading.get_ident()


class RoutedExpertsOutput(NamedTuple):
    y: np.ndarray  # shape of x; 0 for padded tokens
    dropped: np.ndarray  # [..., k] bool: slots dropped for capacity
    context: RoutedExpertsContext

    def backward(self, dy, grads: Optional[Dict[str, np.ndarray]] = None,
                 accumulate: bool = True) -> Tuple[np.ndarray, np.ndarray]:
        return self.context.owner.backward(dy, out=self, grads=grads, accumulate=accumulate)


class RoutedExperts:
    """The E experts of `cfg` for caller-given routing (see the module docstring).

    params/grads: dicts holding w1 [E, d_model, d_ff], w3 (gated activations only) and w2
    [E, d_ff, d_model] (with cfg.ffn_bias also b1, b3 [E, d_ff] and b2 [E, d_model]) and
    their gradient buffers, shared with the caller (a MoELayer's own
    dicts, for instance); by default fresh weights drawn from cfg.seed and zeroed grads.
    layout "linear": the weights and their gradients are nn.Linear's, w1, w3 [E, d_ff,
    d_model] and w2 [E, d_model, d_ff] (transformers' experts), read and written in place
    (each expert's matrix C-contiguous; the experts may lie apart); the same bits.
    fixed_values: a promise that the weights' values never change in place while this object
    is in use (the caller makes a new one instead, after release() when it reuses the
    weights' memory), so that bfloat16 compute need not fingerprint them at each forward to
    see an update (moe_py.hf's cache keys on torch's versions)."""

    def __init__(self, cfg: MoEConfig, params: Optional[Dict[str, np.ndarray]] = None,
                 grads: Optional[Dict[str, np.ndarray]] = None, layout: str = "column",
                 fixed_values: bool = False):
        if not isinstance(cfg, MoEConfig):
            raise TypeError(f"cfg: expected a MoEConfig, got {type(cfg).__name__}")
        check_layout(layout)
        self.cfg, self.layout = cfg, layout
        if params is None:
            params = init_expert_weights(cfg, np.random.default_rng(cfg.seed), layout)
        if grads is None:
            grads = {k: np.zeros_like(params[k]) for k in EXPERT_KEYS if k in params}
        self.params, self.grads = params, grads
        self._experts = Experts(cfg, params, grads, layout=layout, fixed_values=fixed_values)
        self._latest: Optional[RoutedExpertsContext] = None
        self._guard = OneCaller("RoutedExperts")

    def __call__(self, x, topk_indices, topk_weights, padding_mask=None,
                 compute_dtype: Optional[str] = None) -> RoutedExpertsOutput:
        """compute_dtype: "bfloat16" runs this call's GEMMs (and its backward's) in bfloat16
        whatever cfg.compute_dtype says; None keeps the config's."""
        with self._guard.forward():
            cfg = self.cfg
            check_compute_dtype(compute_dtype, cfg.dtype)
            x2, lead = as_tokens(x, cfg.d_model, cfg.np_dtype, owned=True)  # the experts' backward reads it
            idx, k = self._indices(topk_indices, lead)
            # a copy: combine's backward reads the weights, which the caller may change meanwhile
            weights = as_grad(topk_weights, lead + (k,), cfg.np_dtype, "topk_weights").reshape(-1, k).copy()
            mask = as_mask(padding_mask, lead)
            idx[~mask.astype(bool)] = -1  # padding goes nowhere
            check_row_count(idx.shape[0] * k, "x")
            dropped = self._drops(idx, weights, mask)
            y2, saved = self._experts.compute(x2, idx, weights, dropped, compute_dtype)
            if not all_finite(y2):
                raise NonFiniteError(f"x: the experts' output is not finite (max |x| = "
                                     f"{np.abs(x2).max():.3g}, max |topk_weights| = {np.abs(weights).max():.3g})")
            ctx = RoutedExpertsContext(self, saved, lead, k)
            self._latest = ctx
            return RoutedExpertsOutput(y2.reshape(lead + (cfg.d_model,)), dropped.reshape(lead + (k,)), ctx)

    forward = __call__

    def backward(self, dy, out: Optional[RoutedExpertsOutput] = None,
                 grads: Optional[Dict[str, np.ndarray]] = None,
                 accumulate: bool = True) -> Tuple[np.ndarray, np.ndarray]:
        """(dx, d_topk_weights) of sum(dy * y), for `out`'s forward (default: the latest);
        the expert weights' gradients are added into `grads` (default: self.grads), or with
        accumulate False written there: that call's gradients alone, as an autograd backward
        needs, in buffers whose contents are never read (np.empty will do)."""
        ctx = self._latest if out is None else out.context
        if ctx is None:
            raise RuntimeError("backward called before forward")
        if ctx.owner is not self:
            raise ValueError("out: the output of another RoutedExperts")
        with self._guard.backward(ctx.thread):
            D = self.cfg.d_model
            dy2 = as_grad(dy, ctx.lead + (D,), self.cfg.np_dtype, "dy").reshape(-1, D)
            dx2, d_weights = self._experts.backward(dy2, ctx.saved, grads, accumulate)
            if not (all_finite(dx2) and all_finite(d_weights)):
                raise NonFiniteError(f"dy: the gradient through the experts is not finite (max |dy| = "
                                     f"{np.abs(dy2).max():.3g} overflows in {self.cfg.dtype})")
            return dx2.reshape(ctx.lead + (D,)), d_weights.reshape(ctx.lead + (ctx.k,))

    def release(self) -> None:
        """For an owner that replaces this object by a new one over the same weight memory
        (moe_py.hf at each parameter update): the bfloat16 packs are retired
        (Experts.retire_bf16_weights), and the latest forward's context, which refers back to
        this object, is forgotten, so that the two are freed (their packs and activations
        back to the pool) as soon as no pending backward holds that forward's output, not at
        the next cyclic garbage collection. A backward must then be given its `out`."""
        self._experts.retire_bf16_weights()
        self._latest = None

    def zero_grad(self) -> None:
        for g in self.grads.values():
            g.fill(0)

    def _indices(self, topk_indices, lead: tuple) -> Tuple[np.ndarray, int]:
        """A checked int64 copy [T, k] (the caller's array is never written)."""
        a = np.asarray(topk_indices)
        if not np.issubdtype(a.dtype, np.integer):
            raise TypeError(f"topk_indices: expected integers, got {a.dtype}")
        if a.ndim != len(lead) + 1 or a.shape[:-1] != lead or a.shape[-1] < 1:
            raise ValueError(f"topk_indices: expected shape {list(lead) + ['k']} (x's leading shape "
                             f"and k >= 1), got {list(a.shape)}")
        E = self.cfg.num_experts
        if a.size and (a.min() < -1 or a.max() >= E):
            raise ValueError(f"topk_indices: expected experts in [0, {E}) or -1 (an empty slot), "
                             f"got values in [{a.min()}, {a.max()}]")
        k = a.shape[-1]
        return a.reshape(-1, k).astype(np.int64, copy=True), k

    def _drops(self, idx: np.ndarray, weights: np.ndarray, mask: np.ndarray) -> np.ndarray:
        cfg = self.cfg
        if cfg.capacity_factor is None:
            return np.zeros(idx.shape, bool)
        R, k, E = int(mask.sum()), idx.shape[1], cfg.num_experts
        C = capacity(cfg.capacity_factor, R, k, E)
        if cfg.drop_policy == "position":
            return drops_position(idx, mask, slot_counts(idx, mask, E)[None], 0, C)
        return drops_probs(idx, weights, mask, 0, C)
