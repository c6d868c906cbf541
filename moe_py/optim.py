"""AdamW, the learning-rate schedule and gradient clipping. The update and the norm run in
C++ (cpp/optim.cpp) on the kernels' threads: element-wise, and the norm summed in fixed
chunks, so training stays bitwise reproducible at any thread count."""
from __future__ import annotations

import math
from typing import Dict, Iterable, Tuple

import numpy as np

from ._kernels import kernel
from .experts import BIAS_KEYS


def lr_at(step: int, base_lr: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to min_ratio * base_lr at `total`."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def global_grad_norm(grads: Iterable[np.ndarray]) -> float:
    """sqrt of the sum of squares, accumulated in float64 in parameter order."""
    total = 0.0
    for g in grads:
        total += kernel("sum_squares", g.dtype)(g=g)
    return math.sqrt(total)


def decays(name: str, p: np.ndarray) -> bool:
    """Weight decay applies to matrices, not to vectors: norm gains, and the experts' biases,
    whose [E, width] arrays are E vectors (named b1, b3, b2 in their FFN)."""
    return p.ndim >= 2 and name.rsplit(".", 1)[-1] not in BIAS_KEYS


class AdamW:
    """Decoupled weight decay (Loshchilov & Hutter), applied to matrices only
    (not to norm gains or biases: `decays`); bias-corrected moments."""

    def __init__(self, named_params: Iterable[Tuple[str, np.ndarray, np.ndarray]],
                 betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.1):
        self.entries = list(named_params)
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.weight_decay = weight_decay
        self.m = {n: np.zeros_like(p) for n, p, _ in self.entries}
        self.v = {n: np.zeros_like(p) for n, p, _ in self.entries}
        self.t = 0

    def step(self, lr: float, grad_scale: float = 1.0) -> None:
        """One update with gradients multiplied by grad_scale (clipping)."""
        self.t += 1
        b1, b2 = self.beta1, self.beta2
        c1, c2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        for name, p, g in self.entries:
            decay = 1 - lr * self.weight_decay if decays(name, p) else 1.0
            kernel("adamw_step", p.dtype)(
                param=p, grad=g, m=self.m[name], v=self.v[name], lr=lr, beta1=b1, beta2=b2,
                bias1=c1, bias2=c2, eps=self.eps, decay=decay, grad_scale=grad_scale)

    def state_dict(self) -> Dict[str, np.ndarray]:
        out = {"t": np.array(self.t)}
        for n in self.m:
            out[f"m.{n}"] = self.m[n]
            out[f"v.{n}"] = self.v[n]
        return out

    def load_state_dict(self, state: Dict[str, np.ndarray]) -> None:
        self.t = int(state["t"])
        for n in self.m:
            self.m[n][...] = state[f"m.{n}"]
            self.v[n][...] = state[f"v.{n}"]
