"""A slow, obvious float64 NumPy implementation of the router and the MoE layer, forward and
backward, written from docs/design.md and not from the C++ kernels: every expert runs on
every token and a one-hot combine picks the chosen ones. Use it to check a layer:
`assert_matches_reference(layer, x, mask)`. Router noise is not modelled (it is off unless
set_noise_annealing was called; the reference refuses a layer with noise on).
"""
from __future__ import annotations

import math
from typing import Dict, NamedTuple, Optional

import numpy as np

from ..config import MoEConfig


class ReferenceResult(NamedTuple):
    router: Dict[str, np.ndarray]  # the RouterOutput fields
    losses: Dict[str, float]  # load_balance, z_loss, entropy
    aux_loss: float
    y: np.ndarray  # [T, d_model]
    dx: np.ndarray  # [T, d_model]: d(sum(dy * y) + aux_loss) / dx
    grads: Dict[str, np.ndarray]  # the same keys as layer.grads


def _softmax(l):
    e = np.exp(l - l.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _act(h1, h3, activation):
    """(a, da/dh1, da/dh3) of the expert activation."""
    if activation == "swiglu":
        s = 1.0 / (1.0 + np.exp(-h1))
        return h1 * s * h3, h3 * (s + h1 * s * (1 - s)), h1 * s
    erf = np.vectorize(math.erf, otypes=[float])
    Phi = 0.5 * (1.0 + erf(h1 / math.sqrt(2.0)))
    phi = np.exp(-0.5 * h1 * h1) / math.sqrt(2 * math.pi)
    return h1 * Phi, Phi + h1 * phi, None


def reference_forward_backward(cfg: MoEConfig, params: Dict[str, np.ndarray], x: np.ndarray,
                               mask: Optional[np.ndarray] = None, dy: Optional[np.ndarray] = None,
                               training: bool = True) -> ReferenceResult:
    """The layer (or, with no expert weights in params, the router alone) on x [T, d_model]
    with mask [T] (True = real). dy None: the router's own backward contract, the gradient of
    aux_loss alone (with dy of zeros for the layer)."""
    p64 = {k: np.asarray(v, np.float64) for k, v in params.items()}
    x = np.asarray(x, np.float64).reshape(-1, cfg.d_model)
    T, D, E, k = x.shape[0], cfg.d_model, cfg.num_experts, cfg.top_k
    real = np.ones(T, bool) if mask is None else np.asarray(mask).reshape(-1).astype(bool)
    R = int(real.sum())
    W = p64["w_router"]

    # ---- router forward (docs/design.md section 2)
    logits = x @ W
    probs = np.where(real[:, None], _softmax(logits), 0.0)
    idx = np.full((T, k), -1, np.int64)
    for t in np.flatnonzero(real):
        idx[t] = np.argsort(-probs[t], kind="stable")[:k]  # descending, ties to the lower index
    soft = np.zeros((T, k))
    S = np.ones(T)
    for t in np.flatnonzero(real):
        soft[t] = probs[t, idx[t]]
        if cfg.normalize_topk:
            S[t] = soft[t].sum()
            soft[t] /= S[t]
    dropped = np.zeros((T, k), bool)
    if cfg.capacity_factor is not None:
        cap = min(math.ceil(cfg.capacity_factor * R * k / E), R * k)
        if cfg.drop_policy == "position":
            used = np.zeros(E, np.int64)
            for j in range(k):  # every first choice before any second choice, then token order
                for t in np.flatnonzero(real):
                    if used[idx[t, j]] < cap:
                        used[idx[t, j]] += 1
                    else:
                        dropped[t, j] = True
        else:  # "probs": each expert keeps its highest-probability assignments
            for e in range(E):
                slots = [(t, j) for t in np.flatnonzero(real) for j in range(k) if idx[t, j] == e]
                slots.sort(key=lambda tj: -probs[tj[0], e])  # stable: ties keep (t, j) order
                for t, j in slots[cap:]:
                    dropped[t, j] = True
    ste = cfg.straight_through
    weights = np.where(real[:, None], 1.0 if ste else soft, 0.0) * ~dropped
    tpe = np.bincount(idx[real].reshape(-1), minlength=E).astype(np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(probs > 0, probs * np.log(np.where(probs > 0, probs, 1.0)), 0.0)
    entropy = -plogp.sum(axis=1)
    m = logits.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(axis=1, keepdims=True)))[:, 0]
    f = tpe / (R * k) if R else np.zeros(E)
    P = probs[real].mean(axis=0) if R else np.zeros(E)
    losses = {"load_balance": float(E * (f * P).sum()) if R else 0.0,
              "z_loss": float((lse[real] ** 2).mean()) if R else 0.0,
              "entropy": float(entropy[real].mean()) if R else 0.0}
    aux = (cfg.load_balance_coef * losses["load_balance"] + cfg.z_loss_coef * losses["z_loss"]
           + cfg.entropy_coef * losses["entropy"])
    router = {"topk_weights": weights, "topk_indices": idx, "router_probs": probs,
              "router_probs_clean": probs.copy(), "router_logits": logits, "entropy": entropy,
              "tokens_per_expert": tpe, "dropped": dropped}

    grads = {name: np.zeros_like(v) for name, v in p64.items()}
    dx = np.zeros_like(x)
    d_weights = np.zeros((T, k))
    y = np.zeros_like(x)
    if "w1" in p64:  # ---- every expert on every token, then a one-hot combine
        dyv = np.zeros_like(x) if dy is None else np.asarray(dy, np.float64).reshape(T, D)
        for e in range(E):
            h1 = x @ p64["w1"][e]
            h3 = x @ p64["w3"][e] if cfg.activation == "swiglu" else None
            a, da_dh1, da_dh3 = _act(h1, h3, cfg.activation)
            out = a @ p64["w2"][e]
            coef = ((idx == e) * weights).sum(axis=1)  # the combine weight of e per token
            y += coef[:, None] * out
            sel = (idx == e) & ~dropped & real[:, None]
            d_weights += sel * (dyv @ out.T).diagonal()[:, None]
            g = coef[:, None] * dyv
            grads["w2"][e] += a.T @ g
            da = g @ p64["w2"][e].T
            dh1 = da * da_dh1
            grads["w1"][e] += x.T @ dh1
            dx += dh1 @ p64["w1"][e].T
            if h3 is not None:
                dh3 = da * da_dh3
                grads["w3"][e] += x.T @ dh3
                dx += dh3 @ p64["w3"][e].T
    elif dy is not None:  # the router alone: dy is d(topk_weights)
        d_weights = np.asarray(dy, np.float64).reshape(T, k) * ~dropped

    # ---- router backward: the weights' gradient reaches the probabilities unless the
    # straight-through weights are constant (eval)
    dprobs = np.zeros((T, E))
    if not (ste and not training):
        for t in np.flatnonzero(real):
            dw = d_weights[t]
            if cfg.normalize_topk:
                dp_sel = (dw - (dw * soft[t]).sum()) / S[t]
            else:
                dp_sel = dw
            dprobs[t, idx[t]] += dp_sel
    if R:
        dprobs[real] += cfg.load_balance_coef * E * f / R  # through P only
        with np.errstate(divide="ignore", invalid="ignore"):
            logp = np.where(probs > 0, np.log(np.where(probs > 0, probs, 1.0)), 0.0)
        dprobs[real] += cfg.entropy_coef * -(logp[real] + 1.0) / R
    dlogits = probs * (dprobs - (dprobs * probs).sum(axis=1, keepdims=True))
    if R:
        dlogits[real] += cfg.z_loss_coef * 2.0 * lse[real, None] * probs[real] / R
    dlogits[~real] = 0.0
    dx += dlogits @ W.T
    grads["w_router"] += x.T @ dlogits
    dx[~real] = 0.0
    return ReferenceResult(router, losses, float(aux), y, dx, grads)


# float64: the same maths in another order (dense vs grouped experts, other GEMMs): a few
# ulps of O(1-10) values. float32: ~6e-8 relative rounding through a few GEMMs and a softmax.
TOLERANCES = {"float64": dict(rtol=1e-10, atol=1e-11), "float32": dict(rtol=2e-4, atol=2e-5)}
_INT_FIELDS = ("topk_indices", "tokens_per_expert", "dropped")


def assert_matches_reference(layer, x, mask=None, dy=None, training: bool = True,
                             rtol: Optional[float] = None, atol: Optional[float] = None) -> None:
    """Run a MoELayer (or a Router) and the reference on the same input and compare y, dx,
    every gradient, the losses and every RouterOutput field. dy defaults to a fixed random
    array (for a Router it is d(topk_weights)). Tolerances default to TOLERANCES[dtype]."""
    from ..layer import MoELayer
    from ..router import Router
    if not isinstance(layer, (MoELayer, Router)):
        raise TypeError(f"layer: expected a MoELayer or a Router, got {type(layer).__name__}")
    if layer.noise_std if isinstance(layer, MoELayer) else layer.noise_std:
        raise ValueError("layer: the reference models no router noise; call it with noise off")
    cfg = layer.cfg
    tol = dict(TOLERANCES[cfg.dtype])
    tol.update({k: v for k, v in (("rtol", rtol), ("atol", atol)) if v is not None})
    x = np.asarray(x, cfg.np_dtype)
    T = int(np.prod(x.shape[:-1]))
    is_layer = isinstance(layer, MoELayer)
    if dy is None:
        shape = x.shape if is_layer else (T, cfg.top_k)
        dy = np.random.default_rng(12345).standard_normal(shape).astype(cfg.np_dtype)
    saved_grads = {k: g.copy() for k, g in layer.grads.items()}
    layer.zero_grad()
    out = layer(x, padding_mask=mask, training=training)
    if is_layer:
        dx = layer.backward(dy)
        router, y, losses, aux = out.router, out.y, out.losses, out.aux_loss
    else:
        dx = layer.backward(dy)
        router, y, losses, aux = out, None, layer.losses, layer.aux_loss
    grads = {k: g.copy() for k, g in layer.grads.items()}
    for k, g in layer.grads.items():
        g[...] = saved_grads[k]
    ref = reference_forward_backward(cfg, layer.params, x, mask, dy, training)
    problems = []

    def close(name, got, want):
        got, want = np.asarray(got, np.float64).reshape(np.shape(want)), np.asarray(want)
        if not np.allclose(got, want, **tol):
            err = float(np.max(np.abs(got - want))) if want.size else 0.0
            problems.append(f"{name}: max |diff| {err:.3e} (rtol {tol['rtol']}, atol {tol['atol']})")
    for f in router._fields:
        got = getattr(router, f)
        if f in _INT_FIELDS:
            if not np.array_equal(got.reshape(ref.router[f].shape), ref.router[f]):
                problems.append(f"router.{f}: differs")
        else:
            close(f"router.{f}", got, ref.router[f])
    for n, v in losses.items():
        close(f"losses['{n}']", v, ref.losses[n])
    close("aux_loss", aux, ref.aux_loss)
    if y is not None:
        close("y", y, ref.y)
    close("dx", dx, ref.dx)
    for n, g in grads.items():
        close(f"grads['{n}']", g, ref.grads[n])
    if problems:
        raise AssertionError("moe_py differs from the NumPy reference:\n  " + "\n  ".join(problems))
