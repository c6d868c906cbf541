"""Writes the reference .npz files in this folder with an independent PyTorch
float64 implementation of docs/design.md's router, losses and MoE layer.

It is deliberately a different algorithm from moe_py's: every expert runs on
every token (dense), combine is a one-hot contraction, top-k is torch.topk on
float64 with a tiny index tie-breaker, capacity is a Python loop.

    .venv/bin/pip install torch==2.13.0
    .venv/bin/python tests/reference/make_reference.py [NAME...]
"""
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
# `make_reference.py NAME...` writes only the named cases (a case's inputs depend on the
# cases before it in its stream, so every case is still made): the others stay as they were.
ONLY = set(sys.argv[1:]) or None
torch.set_default_dtype(torch.float64)


def splitmix64(z):
    M = (1 << 64) - 1
    z = (z + 0x9E3779B97F4A7C15) & M
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M
    return z ^ (z >> 31)


def hash_experts(token_id, E, k, seed):
    """docs/design.md: score_e = splitmix64(splitmix64(splitmix64(seed) ^ id) + e); the k
    largest scores, ties to the lower expert."""
    key = splitmix64(seed) ^ token_id
    score = [splitmix64((splitmix64(key) + e) & ((1 << 64) - 1)) for e in range(E)]
    return sorted(range(E), key=lambda e: (-score[e], e))[:k]


def sinkhorn_scales(probs, real, iterations, tol):
    """docs/design.md: Sinkhorn on the softmax probabilities of the real tokens, float64."""
    cost = probs[real]
    R, E = cost.shape
    d1 = torch.ones(E)
    for _ in range(iterations):
        d0 = (1.0 / R) / ((cost * d1).sum(1) + 1e-8)
        new = (1.0 / E) / ((cost * d0[:, None]).sum(0) + 1e-8)
        change = (new - d1).abs().mean()
        d1 = new
        if change <= tol:
            break
    return d1


def topk_desc(values, k):
    """torch.topk with ties (none in random data) to the lower index."""
    E = values.shape[-1]
    return torch.topk(values - 1e-15 * torch.arange(E), k, dim=-1).indices


def select(router, probs, logits, real, k, opt):
    """The chosen experts [T, W] (-1: none) of every router but expert choice's weights."""
    T, E = probs.shape
    p = probs.detach()
    if router == "hash":
        idx = torch.full((T, k), -1, dtype=torch.long)
        for t in range(T):
            if real[t]:
                idx[t] = torch.tensor(hash_experts(int(opt["token_ids"][t]), E, k, opt["seed"]))
        return idx
    if router == "expert_choice":
        R = int(real.sum())
        C = min(R, math.ceil(opt["capacity_factor"] * R * k / E))
        chosen = torch.zeros(T, E, dtype=torch.bool)
        rows = torch.nonzero(torch.from_numpy(real)).flatten()
        for e in range(E):
            if C:
                top = torch.topk(p[rows, e] - 1e-15 * torch.arange(len(rows)), C).indices
                chosen[rows[top], e] = True
        W = max(1, int(chosen.sum(1).max())) if T else 1
        idx = torch.full((T, W), -1, dtype=torch.long)
        for t in range(T):
            es = [e for e in sorted(range(E), key=lambda e: (-float(p[t, e]), e)) if chosen[t, e]]
            idx[t, :len(es)] = torch.tensor(es, dtype=torch.long)
        return idx
    if router == "sinkhorn" and opt["training"]:
        d1 = sinkhorn_scales(p, torch.from_numpy(real), opt["sinkhorn_iterations"],
                             opt["sinkhorn_tolerance"])
        score = d1 * p
    else:
        score = p + torch.tensor(opt.get("expert_bias", np.zeros(E)))
    G = opt.get("n_group", 1)
    if G > 1:  # a group scores the sum of its two best (DeepSeek-V3) or its best (max, DeepSeek-V2);
        # the topk_group best groups are eligible
        grouped = score.view(T, G, E // G)
        if opt.get("group_score", "top2_sum") == "max":
            gscore = grouped.max(dim=-1).values
        else:
            gscore = torch.topk(grouped, min(2, E // G), dim=-1).values.sum(-1)
        keep = torch.zeros(T, G, dtype=torch.bool).scatter(1, topk_desc(gscore, opt["topk_group"]), True)
        score = torch.where(keep.repeat_interleave(E // G, dim=1), score, torch.tensor(-1e300))
    return topk_desc(score, k)


def route(x, w, mask, k, normalize, ste, capacity_factor, coefs, opt=None, b=None):
    opt = dict(opt or {})
    router = opt.get("router", "softmax_topk")
    T = x.shape[0]
    E = opt["E"] if w is None else w.shape[1]
    logits = torch.zeros(T, E) if w is None else x @ w
    if b is not None:  # a learned logit bias (gpt-oss)
        logits = logits + b
    real = torch.from_numpy(mask)
    R = int(real.sum())
    per_expert = router in ("sigmoid_topk", "sqrtsoftplus_topk")  # scores, not a distribution
    if router == "sigmoid_topk":
        probs = torch.sigmoid(logits)
    elif router == "sqrtsoftplus_topk":  # DeepSeek-V4
        probs = F.softplus(logits).sqrt()
    elif router == "hash":
        probs = None
    else:
        probs = torch.softmax(logits, dim=-1)
    opt["capacity_factor"] = capacity_factor
    if router == "hash":
        order = select(router, torch.zeros(T, E), logits, mask, k, opt)
        probs = torch.zeros(T, E).scatter(1, order.clamp(min=0), 1.0 / k) * real[:, None]
    else:
        order = select(router, probs, logits, mask, k, opt)
    W = order.shape[1]
    sel = torch.gather(probs, 1, order.clamp(min=0)) * (order >= 0)
    # normalised: over the sum, floored at topk_norm_min (Ernie 4.5's norm_min)
    soft = sel / sel.sum(-1, keepdim=True).clamp(min=opt.get("topk_norm_min", 0.0)) if normalize else sel
    soft = soft * opt.get("routed_scaling_factor", 1.0)
    weights = soft + (1.0 - soft).detach() if ste else soft
    dropped = torch.zeros(T, W, dtype=torch.bool)
    counts = torch.zeros(E, dtype=torch.long)
    for t in range(T):
        if real[t]:
            for j in range(W):
                if order[t, j] >= 0:
                    counts[order[t, j]] += 1
    if capacity_factor is not None and router != "expert_choice":
        cap = math.ceil(capacity_factor * R * k / E)
        if opt.get("drop_policy", "position") == "position":
            used = [0] * E
            for j in range(k):  # first choices before second choices, then token order
                for t in range(T):
                    if not real[t]:
                        continue
                    e = int(order[t, j])
                    if used[e] < cap:
                        used[e] += 1
                    else:
                        dropped[t, j] = True
        else:  # each expert keeps its highest-probability assignments, ties in (t, j) order
            for e in range(E):
                slots = [(t, j) for t in range(T) if real[t] for j in range(k) if order[t, j] == e]
                slots.sort(key=lambda tj: -float(probs[tj[0], e].detach()))
                for t, j in slots[cap:]:
                    dropped[t, j] = True
    keep = real[:, None] & ~dropped & (order >= 0)
    weights = weights * keep
    # the balance loss and the entropy read each token's scores as a distribution
    dist = probs / probs.sum(-1, keepdim=True) if per_expert else probs
    ent = -torch.where(dist > 0, dist * torch.log(torch.where(dist > 0, dist, 1.0)), 0.0).sum(-1)
    seq = opt.get("seq_len", 0)
    groups = [torch.arange(g * seq, (g + 1) * seq) for g in range(T // seq)] if seq else [torch.arange(T)]
    extra = torch.tensor(opt.get("balance_counts", np.zeros(E, np.int64)))
    lb_terms = []
    for rows in groups:
        rr = rows[real[rows]]
        if len(rr) == 0:
            continue
        if seq:
            c = torch.zeros(E, dtype=torch.long)
            for t in rr:
                for e in order[t]:
                    if e >= 0:
                        c[e] += 1
        else:
            c = counts + extra
        f = c.double() / c.sum()
        lb_terms.append(E * (f * dist[rr].mean(0)).sum())
    if R:
        lb = torch.stack(lb_terms).mean()
        z = torch.zeros(()) if router == "hash" else (torch.logsumexp(logits, -1) ** 2 * real).sum() / R
        en = (ent * real).sum() / R
    else:
        lb = z = en = torch.zeros(())
    aux = coefs[0] * lb + coefs[1] * z + coefs[2] * en
    r = real[:, None]
    fields = dict(topk_weights=weights, topk_indices=torch.where(r, order, -1),
                  router_probs=probs * r, router_probs_clean=probs * r, router_logits=logits,
                  entropy=ent * real, tokens_per_expert=counts, dropped=dropped)
    return fields, dict(load_balance=lb, z_loss=z, entropy=en), aux


def experts_dense(x, w1, w3, w2, activation, alpha=1.702, limit=7.0, b1=None, b3=None, b2=None):
    def bias(b):  # [E, width] -> added to every token of its expert
        return 0.0 if b is None else b[:, None, :]
    h = torch.einsum("td,edf->etf", x, w1) + bias(b1)
    if activation == "swiglu":
        a = F.silu(h) * (torch.einsum("td,edf->etf", x, w3) + bias(b3))
    elif activation == "clamped_swiglu":  # gpt-oss: torch.clamp's gradient rule at the bounds
        g = h.clamp(max=limit)
        u = (torch.einsum("td,edf->etf", x, w3) + bias(b3)).clamp(-limit, limit)
        a = (u + 1) * g * torch.sigmoid(alpha * g)
    else:
        a = F.gelu(h)
    return torch.einsum("etf,efd->etd", a, w2) + bias(b2)  # [E, T, D]: every expert on every token


def make_case(name, rng, kind, T=24, D=10, F_=18, E=6, k=2, lead=None, normalize=None, ste=False,
              capacity_factor=None, activation="swiglu", padded=True, **options):
    """options: router, drop_policy, routed_scaling_factor, n_group, topk_group, group_score,
    topk_norm_min, router_bias, load_balance_scope, num_shared_experts, shared_d_ff,
    expert_bias, balance_counts, training (default True), sinkhorn_iterations/tolerance
    (default 100 / 1e-4), swiglu_alpha/limit (clamped_swiglu), ffn_bias, combine."""
    router = options.get("router", "softmax_topk")
    normalize = (k > 1 and router not in ("expert_choice", "hash")) if normalize is None else normalize
    if router == "expert_choice" and capacity_factor is None:
        capacity_factor = 1.0
    coefs = (0.1, 0.01, 0.05)
    x = rng.standard_normal((T, D))
    mask = rng.random(T) > 0.25 if padded else np.ones(T, bool)
    params = {"w_router": rng.standard_normal((D, E)) * 0.7,
              "w1": rng.standard_normal((E, D, F_)) / math.sqrt(D),
              "w2": rng.standard_normal((E, F_, D)) / math.sqrt(F_)}
    gated = activation in ("swiglu", "clamped_swiglu")
    if gated:
        params["w3"] = rng.standard_normal((E, D, F_)) / math.sqrt(D)
    if options.get("ffn_bias"):  # random, not the init's zeros, so that they count
        params["b1"] = rng.standard_normal((E, F_))
        if gated:
            params["b3"] = rng.standard_normal((E, F_))
        params["b2"] = rng.standard_normal((E, D))
    if router == "hash":
        del params["w_router"]
    if options.get("router_bias"):
        params["b_router"] = rng.standard_normal(E) * 0.5
    S, FS = options.get("num_shared_experts", 0), options.get("shared_d_ff", F_)
    if S:
        params["shared_w1"] = rng.standard_normal((S, D, FS)) / math.sqrt(D)
        params["shared_w2"] = rng.standard_normal((S, FS, D)) / math.sqrt(FS)
        if gated:
            params["shared_w3"] = rng.standard_normal((S, D, FS)) / math.sqrt(D)
    opt = {"router": router, "E": E, "seed": 7, "training": options.get("training", True),
           "sinkhorn_iterations": options.get("sinkhorn_iterations", 100),
           "sinkhorn_tolerance": options.get("sinkhorn_tolerance", 1e-4)}
    for key in ("drop_policy", "routed_scaling_factor", "n_group", "topk_group", "group_score",
                "topk_norm_min"):
        if key in options:
            opt[key] = options[key]
    state = {}
    if router == "hash":
        opt["token_ids"] = state["token_ids"] = rng.integers(0, 256, T)
    if "expert_bias" in options:
        opt["expert_bias"] = state["expert_bias"] = options["expert_bias"]
    if "balance_counts" in options:
        opt["balance_counts"] = state["balance_counts"] = options["balance_counts"]
    if options.get("load_balance_scope") == "sequence":
        opt["seq_len"] = lead[-1]
    tp = {n: torch.tensor(v, requires_grad=True) for n, v in params.items()}
    tx = torch.tensor(x, requires_grad=True)
    fields, losses, aux = route(tx, tp.get("w_router"), mask, k, normalize, ste, capacity_factor,
                                coefs, opt, tp.get("b_router"))
    if capacity_factor is not None and router != "expert_choice":
        assert fields["dropped"].any(), name
    W = fields["topk_indices"].shape[1]
    out = {}
    if kind == "router":
        G = rng.standard_normal((T, W))
        objective = (torch.tensor(G) * fields["topk_weights"]).sum() + aux
        out["G"] = G
        used = [n for n in ("w_router", "b_router") if n in params]
    else:
        act = (activation, options.get("swiglu_alpha", 1.702), options.get("swiglu_limit", 7.0))
        ye = experts_dense(tx, tp["w1"], tp.get("w3"), tp["w2"], *act, tp.get("b1"), tp.get("b3"),
                           tp.get("b2"))
        onehot = F.one_hot(fields["topk_indices"].clamp(min=0), E).double()  # [T, W, E]
        coef = (onehot * fields["topk_weights"][..., None]).sum(1)  # [T, E]
        if options.get("combine") == "input":  # Llama 4: y = sum over kept slots of FFN_e(w x)
            kept = fields["topk_indices"] >= 0
            kept &= ~fields["dropped"]
            sel = (onehot * kept[..., None]).sum(1)  # [T, E]: 1 where the token's kept slot is e

            def expert(e):  # expert e's parameters, as a stack of one
                w1, w3, w2, b1, b3, b2 = (None if tp.get(n) is None else tp[n][e:e + 1]
                                          for n in ("w1", "w3", "w2", "b1", "b3", "b2"))
                return dict(w1=w1, w3=w3, w2=w2, b1=b1, b3=b3, b2=b2)
            ye = torch.stack([experts_dense(coef[:, e:e + 1] * tx, **expert(e), activation=act[0],
                                            alpha=act[1], limit=act[2])[0] for e in range(E)])
            y = torch.einsum("te,etd->td", sel, ye)
        else:
            y = torch.einsum("te,etd->td", coef, ye)
        if S:  # every shared expert on every real token, weight 1
            ys = experts_dense(tx, tp["shared_w1"], tp.get("shared_w3"), tp["shared_w2"], *act)
            y = y + ys.sum(0) * torch.from_numpy(mask)[:, None]
        dy = rng.standard_normal((T, D))
        objective = (torch.tensor(dy) * y).sum() + aux
        out["dy"], out["y"] = dy, y.detach().numpy()
        used = list(params)
    if objective.requires_grad:
        objective.backward()
    shape = (lead + (D,)) if lead else (T, D)
    for key in ("dy", "y"):
        if key in out:
            out[key] = out[key].reshape(shape)
    out["x"] = x.reshape(shape)
    out["mask"] = mask.reshape(shape[:-1])
    out["dx"] = tx.grad.numpy().reshape(shape) if tx.grad is not None else np.zeros(shape)
    for n in used:
        out[f"param_{n}"] = params[n]
        g = tp[n].grad
        out[f"grad_{n}"] = np.zeros_like(params[n]) if g is None else g.numpy()
    for key, v in state.items():
        out[f"state_{key}"] = v.reshape(shape[:-1]) if key == "token_ids" else v
    for f, v in fields.items():
        out[f"router_{f}"] = v.detach().numpy()
    for n, v in losses.items():
        out[f"loss_{n}"] = np.array(float(v.detach()))
    out["aux_loss"] = np.array(float(aux.detach()))
    cfg = dict(d_model=D, d_ff=F_, num_experts=E, top_k=k, normalize_topk=normalize,
               capacity_factor=capacity_factor, activation=activation, straight_through=ste,
               load_balance_coef=coefs[0], z_loss_coef=coefs[1], entropy_coef=coefs[2], dtype="float64")
    for key in ("router", "drop_policy", "routed_scaling_factor", "n_group", "topk_group",
                "group_score", "topk_norm_min", "router_bias", "load_balance_scope",
                "num_shared_experts", "shared_d_ff", "swiglu_alpha", "swiglu_limit", "ffn_bias", "combine"):
        if key in options:
            cfg[key] = options[key]
    if router == "hash":
        cfg["seed"] = opt["seed"]
    if router in ("sigmoid_topk", "sqrtsoftplus_topk"):
        cfg["bias_update_rate"] = 0.0  # the bias is part of the case, not moved by it
    out["kind"] = np.array(kind)
    out["training"] = np.array(opt["training"])
    out["cfg"] = np.array(json.dumps(cfg))
    if ONLY is None or name in ONLY:
        np.savez_compressed(os.path.join(HERE, f"{name}.npz"), **out)


def main():
    rng = np.random.default_rng(2026)
    for kind in ("router", "layer"):
        make_case(f"{kind}_k1", rng, kind, k=1)
        make_case(f"{kind}_k2", rng, kind, k=2)
        make_case(f"{kind}_k4_unnormalized", rng, kind, k=4, E=8, normalize=False)
        make_case(f"{kind}_k2_ste", rng, kind, k=2, ste=True)
        make_case(f"{kind}_k2_capacity1", rng, kind, k=2, capacity_factor=1.0, T=40)
        make_case(f"{kind}_k2_capacity05", rng, kind, k=2, capacity_factor=0.5)
    make_case("layer_gelu_k2", rng, "layer", k=2, activation="gelu")
    make_case("layer_gelu_k1_capacity", rng, "layer", k=1, activation="gelu", capacity_factor=0.75, E=4)
    make_case("layer_batched_padded", rng, "layer", T=24, lead=(3, 8), k=2)
    make_case("layer_unpadded_k4", rng, "layer", k=4, E=6, padded=False)
    # the routers issue's cases draw from their own stream: the ones above stay as they were
    rng = np.random.default_rng(2027)
    for kind in ("router", "layer"):
        make_case(f"{kind}_k2_capacity075_probs", rng, kind, k=2, capacity_factor=0.75,
                  drop_policy="probs")
        make_case(f"{kind}_sigmoid_k2_bias", rng, kind, k=2, E=8, router="sigmoid_topk",
                  expert_bias=rng.standard_normal(8) * 0.05, routed_scaling_factor=2.5)
        make_case(f"{kind}_sigmoid_k2_grouped", rng, kind, k=2, E=8, router="sigmoid_topk",
                  n_group=4, topk_group=2, expert_bias=rng.standard_normal(8) * 0.05)
        make_case(f"{kind}_expert_choice_k2", rng, kind, k=2, router="expert_choice", T=30)
        make_case(f"{kind}_sinkhorn_k2", rng, kind, k=2, router="sinkhorn")
        make_case(f"{kind}_hash_k2", rng, kind, k=2, router="hash")
    make_case("layer_softmax_grouped_k2", rng, "layer", k=2, E=8, n_group=2, topk_group=1)
    make_case("layer_sigmoid_k1_unnormalized", rng, "layer", k=1, router="sigmoid_topk",
              capacity_factor=0.75, E=4)
    make_case("layer_sinkhorn_eval_k1", rng, "layer", k=1, router="sinkhorn", training=False)
    make_case("layer_expert_choice_capacity2", rng, "layer", k=1, router="expert_choice",
              capacity_factor=2.0, T=20, E=4)
    make_case("layer_hash_k1_shared", rng, "layer", k=1, router="hash", num_shared_experts=1)
    make_case("layer_shared2_k2", rng, "layer", k=2, num_shared_experts=2, shared_d_ff=7)
    make_case("layer_scope_sequence", rng, "layer", T=24, lead=(3, 8), k=2,
              load_balance_scope="sequence")
    make_case("layer_scope_sequence_sigmoid", rng, "layer", T=24, lead=(4, 6), k=2,
              router="sigmoid_topk", load_balance_scope="sequence")
    make_case("layer_scope_global", rng, "layer", k=2, load_balance_scope="global",
              balance_counts=rng.integers(0, 30, 6))
    # the Hugging Face families' router variants, from their own stream again
    rng = np.random.default_rng(2028)
    for kind in ("router", "layer"):
        make_case(f"{kind}_router_bias_k2", rng, kind, k=2, router_bias=True)  # gpt-oss
        make_case(f"{kind}_softmax_grouped_max", rng, kind, k=2, E=8, n_group=4, topk_group=2,
                  group_score="max", normalize=False, routed_scaling_factor=2.0)  # DeepSeek-V2
        make_case(f"{kind}_softmax_bias_norm_min", rng, kind, k=2,  # Ernie 4.5
                  expert_bias=rng.standard_normal(6) * 0.05, topk_norm_min=0.6)
        make_case(f"{kind}_sqrtsoftplus_k2_bias", rng, kind, k=2, E=8, router="sqrtsoftplus_topk",
                  expert_bias=rng.standard_normal(8) * 0.05, routed_scaling_factor=1.5)  # DeepSeek-V4
    make_case("layer_sigmoid_grouped_max", rng, "layer", k=2, E=8, router="sigmoid_topk", n_group=4,
              topk_group=2, group_score="max")
    make_case("layer_sqrtsoftplus_k1_grouped_router_bias", rng, "layer", k=1, E=8,
              router="sqrtsoftplus_topk", n_group=4, topk_group=2, router_bias=True,
              capacity_factor=0.75)
    make_case("layer_expert_choice_router_bias", rng, "layer", k=2, router="expert_choice",
              router_bias=True, T=30)
    # the expert variants of the Hugging Face families, from their own stream (the same seed, a fresh generator)
    rng = np.random.default_rng(2028)
    make_case("layer_clamped_swiglu_k2", rng, "layer", k=2, activation="clamped_swiglu",
              swiglu_alpha=1.5, swiglu_limit=0.7, num_shared_experts=1, capacity_factor=0.75)
    make_case("layer_ffn_bias_k2", rng, "layer", k=2, ffn_bias=True, capacity_factor=0.75)
    make_case("layer_gelu_ffn_bias_k1", rng, "layer", k=1, activation="gelu", ffn_bias=True)
    make_case("layer_input_combine_k2", rng, "layer", k=2, combine="input", ffn_bias=True,
              capacity_factor=0.75)
    make_case("layer_llama4_sigmoid_k1_input_combine", rng, "layer", k=1, router="sigmoid_topk",
              combine="input", num_shared_experts=1, expert_bias=np.zeros(6))


if __name__ == "__main__":
    main()
