"""A slow, obvious float64 NumPy implementation of the router and the MoE layer, forward and
backward, written from docs/design.md and not from the C++ kernels: every expert runs on
every token and a one-hot combine picks the chosen ones. Use it to check a layer:
`assert_matches_reference(layer, x, mask)`. Router noise is not modelled (it is off unless
set_noise_annealing was called; the reference refuses a layer with noise on).
"""
from __future__ import annotations

import math
from typing import Any, Dict, NamedTuple, Optional

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


def _act(h1, h3, cfg: MoEConfig):
    """(a, da/dh1, da/dh3) of the expert activation."""
    if cfg.activation == "swiglu":
        s = 1.0 / (1.0 + np.exp(-h1))
        return h1 * s * h3, h3 * (s + h1 * s * (1 - s)), h1 * s
    if cfg.activation == "clamped_swiglu":  # a clamp passes the gradient on its bounds too
        alpha, lim = cfg.swiglu_alpha, cfg.swiglu_limit
        g, u = np.minimum(h1, lim), np.clip(h3, -lim, lim)
        s = 1.0 / (1.0 + np.exp(-alpha * g))
        dg = (u + 1) * (s + alpha * g * s * (1 - s)) * (h1 <= lim)
        return (u + 1) * g * s, dg, g * s * (np.abs(h3) <= lim)
    erf = np.vectorize(math.erf, otypes=[float])
    Phi = 0.5 * (1.0 + erf(h1 / math.sqrt(2.0)))
    phi = np.exp(-0.5 * h1 * h1) / math.sqrt(2 * math.pi)
    return h1 * Phi, Phi + h1 * phi, None


def _splitmix64(z: int) -> int:
    M = (1 << 64) - 1
    z = (z + 0x9E3779B97F4A7C15) & M
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M
    return z ^ (z >> 31)


def _hash_choice(token_id: int, E: int, k: int, seed: int) -> list:
    key = _splitmix64(seed) ^ int(token_id)
    score = [_splitmix64((_splitmix64(key) + e) & ((1 << 64) - 1)) for e in range(E)]
    return sorted(range(E), key=lambda e: (-score[e], e))[:k]


def _sinkhorn_d1(cost: np.ndarray, iterations: int, tol: float) -> np.ndarray:
    R, E = cost.shape
    d1 = np.ones(E)
    for _ in range(iterations):
        d0 = (1.0 / R) / ((cost * d1).sum(axis=1) + 1e-8)
        new = (1.0 / E) / ((cost * d0[:, None]).sum(axis=0) + 1e-8)
        change = np.abs(new - d1).mean()
        d1 = new
        if change <= tol:
            break
    return d1


def _top(values: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-values, kind="stable")[:k]  # descending, ties to the lower index


def _select(cfg: MoEConfig, probs, logits, real, training, bias, token_ids) -> np.ndarray:
    """The chosen experts [T, slots] of docs/design.md's routers (-1: none / padding)."""
    T, E, k = probs.shape[0], cfg.num_experts, cfg.top_k
    rows = np.flatnonzero(real)
    if cfg.router == "expert_choice":
        cap = cfg.capacity
        assert cap is not None  # expert choice always has one (1.0 by default)
        C = min(len(rows), math.ceil(cap * len(rows) * k / E))
        chosen = np.zeros((T, E), bool)
        for e in range(E):
            chosen[rows[_top(probs[rows, e], C)], e] = True
        width = max(1, int(chosen.sum(axis=1).max())) if T else 1
        idx = np.full((T, width), -1, np.int64)
        for t in range(T):
            es = [e for e in _top(probs[t], E) if chosen[t, e]]
            idx[t, :len(es)] = es
        return idx
    idx = np.full((T, k), -1, np.int64)
    if cfg.router == "hash":
        for t in rows.tolist():
            idx[t] = _hash_choice(token_ids[t], E, k, cfg.seed)
        return idx
    if cfg.router == "sinkhorn" and training:
        score = np.zeros((T, E))
        if len(rows):
            d1 = _sinkhorn_d1(probs[rows], cfg.sinkhorn_iterations, cfg.sinkhorn_tolerance)
            score[rows] = d1 * probs[rows]
    else:
        score = probs + (0.0 if bias is None else bias)
    G, size = cfg.n_group, E // cfg.n_group
    best = 1 if cfg.group_score == "max" else 2
    for t in rows.tolist():
        v = score[t]
        if G > 1:  # the topk_group groups with the best sums of their `best` best values
            gscore = [np.sort(v[g * size:(g + 1) * size])[::-1][:best].sum() for g in range(G)]
            keep = np.repeat(np.isin(np.arange(G), _top(np.array(gscore), cfg.topk_group)), size)
            v = np.where(keep, v, -np.inf)
        idx[t] = _top(v, k)
    return idx


def reference_forward_backward(cfg: MoEConfig, params: Dict[str, np.ndarray], x: np.ndarray,
                               mask: Optional[np.ndarray] = None, dy: Optional[np.ndarray] = None,
                               training: bool = True, expert_bias: Optional[np.ndarray] = None,
                               balance_counts: Optional[np.ndarray] = None,
                               token_ids: Optional[np.ndarray] = None) -> ReferenceResult:
    """The layer (or, with no expert weights in params, the router alone) on x [..., d_model]
    with mask (True = real). dy None: the router's own backward contract, the gradient of
    aux_loss alone (with dy of zeros for the layer). expert_bias: the top-k routers' bias;
    balance_counts: the global scope's loads of earlier micro-batches; token_ids: hash."""
    p64 = {k: np.asarray(v, np.float64) for k, v in params.items()}
    seq = np.shape(x)[-2] if cfg.load_balance_scope == "sequence" else 0
    x = np.asarray(x, np.float64).reshape(-1, cfg.d_model)
    T, D, E, k = x.shape[0], cfg.d_model, cfg.num_experts, cfg.top_k
    real = np.ones(T, bool) if mask is None else np.asarray(mask).reshape(-1).astype(bool)
    ids = None if token_ids is None else np.asarray(token_ids).reshape(-1)
    R = int(real.sum())
    sigmoid = cfg.router == "sigmoid_topk"
    sqrtsoftplus = cfg.router == "sqrtsoftplus_topk"
    per_expert = sigmoid or sqrtsoftplus  # scores that are not a distribution

    # ---- router forward (docs/design.md, "Routing" and "Routers")
    W = p64.get("w_router", np.zeros((D, E)))
    logits = x @ W + p64.get("b_router", 0.0)
    if cfg.router == "hash":
        probs = np.zeros((T, E))
    elif sigmoid:
        probs = np.where(real[:, None], 1.0 / (1.0 + np.exp(-logits)), 0.0)
    elif sqrtsoftplus:
        # softplus as torch computes it: the logit itself above 20
        softplus = np.where(logits > 20.0, logits, np.log1p(np.exp(np.minimum(logits, 20.0))))
        probs = np.where(real[:, None], np.sqrt(softplus), 0.0)
    else:
        probs = np.where(real[:, None], _softmax(logits), 0.0)
    idx = _select(cfg, probs, logits, real, training, expert_bias, ids)
    slots = idx.shape[1]
    if cfg.router == "hash":
        for t in np.flatnonzero(real):
            probs[t, idx[t]] = 1.0 / k
    live = idx >= 0
    soft = np.where(live, np.take_along_axis(probs, np.maximum(idx, 0), axis=1), 0.0)
    S = np.ones(T)
    floored = np.zeros(T, bool)  # the denominator is topk_norm_min, a constant
    if cfg.normalize_topk:
        S = np.where(real, soft.sum(axis=1), 1.0)
        floored = real & (S < cfg.topk_norm_min)
        S = np.where(floored, cfg.topk_norm_min, S)
        soft = soft / S[:, None]
    scale = cfg.routed_scaling_factor
    soft = soft * scale
    dropped = np.zeros((T, slots), bool)
    if cfg.capacity is not None and cfg.router != "expert_choice":
        cap = min(math.ceil(cfg.capacity * R * k / E), R * k)
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
                slots_e = [(t, j) for t in np.flatnonzero(real) for j in range(k) if idx[t, j] == e]
                slots_e.sort(key=lambda tj: -probs[tj[0], e])  # stable: ties keep (t, j) order
                for t, j in slots_e[cap:]:
                    dropped[t, j] = True
    ste = cfg.straight_through
    weights = np.where(real[:, None] & live, 1.0 if ste else soft, 0.0) * ~dropped
    tpe = np.bincount(idx[real][live[real]], minlength=E).astype(np.int64)
    # the losses read each token's scores as a distribution (sigmoid: normalised)
    dist = probs / np.where(real, probs.sum(axis=1), 1.0)[:, None] if per_expert else probs
    with np.errstate(divide="ignore", invalid="ignore"):
        logd = np.where(dist > 0, np.log(np.where(dist > 0, dist, 1.0)), 0.0)
    entropy = -(dist * logd).sum(axis=1)
    m = logits.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(axis=1, keepdims=True)))[:, 0]
    # balance groups: the batch, or each sequence; f from the assignment counts
    groups = [np.arange(g * seq, (g + 1) * seq) for g in range(T // seq)] if seq else [np.arange(T)]
    groups = [g[real[g]] for g in groups if real[g].any()]
    lb, lb_rows = 0.0, np.zeros((T, E))
    for g in groups:
        if seq:
            c = np.bincount(idx[g][live[g]], minlength=E).astype(np.float64)
        else:
            c = tpe + (0 if balance_counts is None else np.asarray(balance_counts))
        f = c / c.sum()
        lb += E * (f * dist[g].mean(axis=0)).sum() / len(groups)
        lb_rows[g] = E * f / len(g) / len(groups)
    losses = {"load_balance": float(lb) if R else 0.0,
              "z_loss": float((lse[real] ** 2).mean()) if R and cfg.router != "hash" else 0.0,
              "entropy": float(entropy[real].mean()) if R else 0.0}
    aux = (cfg.load_balance_coef * losses["load_balance"] + cfg.z_loss_coef * losses["z_loss"]
           + cfg.entropy_coef * losses["entropy"])
    router = {"topk_weights": weights, "topk_indices": np.where(real[:, None], idx, -1),
              "router_probs": probs, "router_probs_clean": probs.copy(), "router_logits": logits,
              "entropy": entropy, "tokens_per_expert": tpe, "dropped": dropped}

    grads = {name: np.zeros_like(v) for name, v in p64.items()}
    dx = np.zeros_like(x)
    d_weights = np.zeros((T, slots))
    y = np.zeros_like(x)
    dyv = np.zeros_like(x) if dy is None else np.asarray(dy, np.float64).reshape(x.shape[0], -1)
    if "w1" in p64:  # ---- every expert on every token, then a one-hot combine
        kept = (idx >= 0) & ~dropped & real[:, None]
        # (names, expert, selected [T], weight [T]); a token picks an expert at most once
        routed = [(("w1", "w3", "w2", "b1", "b3", "b2"), e, (kept & (idx == e)).any(axis=1),
                   ((idx == e) * weights).sum(axis=1)) for e in range(E)]
        shared = [(("shared_w1", "shared_w3", "shared_w2", "", "", ""), s, real, real.astype(np.float64))
                  for s in range(cfg.num_shared_experts)] if "shared_w1" in p64 else []
        for names, e, sel, w in routed + shared:
            n1, n3, n2, nb1, nb3, nb2 = names
            w1, w2 = p64[n1][e], p64[n2][e]
            w3 = p64[n3][e] if n3 in p64 else None
            b1, b3, b2 = (p64[n][e] if n in p64 else 0.0 for n in (nb1, nb3, nb2))
            # combine "output": y += w FFN(x); "input": y += FFN(w x), unweighted
            scale_input = cfg.combine == "input" and n1 == "w1"
            xin = w[:, None] * x if scale_input else x
            out_scale = sel.astype(np.float64) if scale_input else w
            h1 = xin @ w1 + b1
            h3 = xin @ w3 + b3 if w3 is not None else None
            a, da_dh1, da_dh3 = _act(h1, h3, cfg)
            out = a @ w2 + b2
            y += out_scale[:, None] * out
            g = out_scale[:, None] * dyv
            grads[n2][e] += a.T @ g
            if nb2 in grads:
                grads[nb2][e] += g.sum(axis=0)
            da = g @ w2.T
            dh1 = da * da_dh1
            grads[n1][e] += xin.T @ dh1
            dxin = dh1 @ w1.T
            if nb1 in grads:
                grads[nb1][e] += dh1.sum(axis=0)
            if h3 is not None and w3 is not None:
                dh3 = da * da_dh3
                grads[n3][e] += xin.T @ dh3
                dxin += dh3 @ w3.T
                if nb3 in grads:
                    grads[nb3][e] += dh3.sum(axis=0)
            dx += w[:, None] * dxin if scale_input else dxin
            if n1 == "w1":  # d(weight of the slot on e): through the input, or the output
                dw = (dxin * x).sum(axis=1) if scale_input else (dyv * out).sum(axis=1)
                d_weights += (kept & (idx == e)) * dw[:, None]
    elif dy is not None:  # the router alone: dy is d(topk_weights)
        d_weights = dyv * ~dropped

    # ---- router backward: the weights' gradient reaches the scores unless the
    # straight-through weights are constant (eval); the losses reach them through dist
    if cfg.router != "hash":
        dprobs = np.zeros((T, E))
        if not (ste and not training):
            for t in np.flatnonzero(real):
                dw = d_weights[t] * live[t]
                if cfg.normalize_topk and floored[t]:
                    dp_sel = scale * dw / S[t]
                elif cfg.normalize_topk:
                    dp_sel = scale * (dw - (dw * soft[t] / scale).sum()) / S[t]
                else:
                    dp_sel = scale * dw
                np.add.at(dprobs[t], idx[t][live[t]], dp_sel[live[t]])
        ddist = np.zeros((T, E))
        if R:
            ddist[real] += cfg.load_balance_coef * lb_rows[real]  # through P only
            ddist[real] += cfg.entropy_coef * -(logd[real] + 1.0) / R
        if per_expert:
            sums = np.where(real, probs.sum(axis=1), 1.0)[:, None]
            dprobs += (ddist - (ddist * dist).sum(axis=1, keepdims=True)) / sums
            if sigmoid:
                dlogits = dprobs * probs * (1.0 - probs)
            else:  # d sqrt(softplus(l)) / dl = sigmoid(l) / (2 sqrt(softplus(l)))
                with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                    dlogits = np.where(real[:, None], dprobs / (1.0 + np.exp(-logits)) / (2.0 * probs), 0.0)
        else:
            dprobs += ddist
            dlogits = probs * (dprobs - (dprobs * probs).sum(axis=1, keepdims=True))
        if R:
            dlogits[real] += cfg.z_loss_coef * 2.0 * lse[real, None] * _softmax(logits)[real] / R
        dlogits[~real] = 0.0
        dx += dlogits @ W.T
        grads["w_router"] += x.T @ dlogits
        if "b_router" in grads:
            grads["b_router"] += dlogits.sum(axis=0)
    dx[~real] = 0.0
    return ReferenceResult(router, losses, float(aux), y, dx, grads)


# float64: the same maths in another order (dense vs grouped experts, other GEMMs): a few
# ulps of O(1-10) values. float32: ~6e-8 relative rounding through a few GEMMs and a softmax.
TOLERANCES = {"float64": dict(rtol=1e-10, atol=1e-11), "float32": dict(rtol=2e-4, atol=2e-5)}
# bfloat16 compute (MoEConfig.compute_dtype): rounding an operand to bfloat16 errs by at most
# u = 2^-8 of its value (8 significant bits), u / sqrt(3) rms when the errors spread evenly.
# A GEMM of two rounded operands then errs by about sqrt(2/3) u (Frobenius, relative) when
# its terms do not cancel; y goes through the gate and up GEMMs (their errors meet in the
# product), the rounded activation and the down GEMM: about 1.5 u, and each gradient through
# one or two more. Elementwise bounds would need each element's cancellation, so the bound
# is normwise: ||got - want|| <= BF16_REL_FRO ||want|| for y, dx and every gradient, twice
# that estimate, for smooth activations. A clamp (clamped_swiglu) switches the gradient of
# every value within ~u of its limit: with the limit inside the bulk of the values, gradients
# err by more. The router's forward (logits, probabilities, choices, losses) stays float32.
BF16_REL_FRO = 3 * 2.0 ** -8
_INT_FIELDS = ("topk_indices", "tokens_per_expert", "dropped")


def _slots(router, x, mask, training, token_ids) -> int:
    """Slots per token of a router's output (expert choice: decided by the batch itself)."""
    if router.cfg.router != "expert_choice":
        return router.cfg.top_k
    ref = reference_forward_backward(router.cfg, router.params, x, mask, None, training)
    return ref.router["topk_indices"].shape[1]


def assert_matches_reference(layer, x, mask=None, dy=None, training: bool = True,
                             rtol: Optional[float] = None, atol: Optional[float] = None,
                             token_ids=None) -> None:
    """Run a MoELayer (or a Router) and the reference on the same input and compare y, dx,
    every gradient, the losses and every RouterOutput field. dy defaults to a fixed random
    array (for a Router it is d(topk_weights)); token_ids go to the hash router. Tolerances
    default to TOLERANCES[dtype]; with compute_dtype="bfloat16", y, dx and the gradients
    are held normwise to BF16_REL_FRO (or rtol, if given)."""
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
        shape = x.shape if is_layer else (T, _slots(layer, x, mask, training, token_ids))
        dy = np.random.default_rng(12345).standard_normal(shape).astype(cfg.np_dtype)
    saved_grads = {k: g.copy() for k, g in layer.grads.items()}
    router_part = layer.router if isinstance(layer, MoELayer) else layer
    bias = router_part.expert_bias.copy() if cfg.traits.expert_bias else None
    earlier = router_part.step_loads.copy() \
        if training and cfg.load_balance_scope == "global" else None
    layer.zero_grad()
    out: Any = layer(x, padding_mask=mask, training=training, token_ids=token_ids)  # MoEOutput or RouterOutput
    if is_layer:
        dx = layer.backward(dy)
        router, y, losses, aux = out.router, out.y, out.losses, out.aux_loss
    else:
        dx = layer.backward(dy)
        assert isinstance(layer, Router)
        router, y, losses, aux = out, None, layer.losses, layer.aux_loss
    grads = {k: g.copy() for k, g in layer.grads.items()}
    for k, g in layer.grads.items():
        g[...] = saved_grads[k]
    ref = reference_forward_backward(cfg, layer.params, x, mask, dy, training, bias, earlier,
                                     token_ids)
    problems = []
    bf16 = getattr(cfg, "compute_dtype", None) == "bfloat16"

    def close(name, got, want, experts=False):
        got, want = np.asarray(got, np.float64).reshape(np.shape(want)), np.asarray(want)
        if bf16 and experts:  # what the bfloat16 GEMMs computed: the normwise bound
            bound = BF16_REL_FRO if rtol is None else rtol
            err = float(np.linalg.norm(got - want))
            if err > bound * float(np.linalg.norm(want)):
                problems.append(f"{name}: relative error {err / max(float(np.linalg.norm(want)), 1e-300):.3e} "
                                f"(bfloat16 bound {bound:.3e})")
            return
        if not np.allclose(got, want, rtol=tol["rtol"], atol=tol["atol"]):
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
        close("y", y, ref.y, experts=True)
    close("dx", dx, ref.dx, experts=is_layer)
    for n, g in grads.items():
        close(f"grads['{n}']", g, ref.grads[n], experts=is_layer)
    if problems:
        raise AssertionError("moe_py differs from the NumPy reference:\n  " + "\n  ".join(problems))
