"""Writes the reference .npz files in this folder with an independent PyTorch
float64 implementation of docs/design.md's router, losses and MoE layer.

It is deliberately a different algorithm from moe_py's: every expert runs on
every token (dense), combine is a one-hot contraction, top-k is torch.topk on
float64 with a tiny index tie-breaker, capacity is a Python loop.

    .venv/bin/pip install torch==2.13.0
    .venv/bin/python tests/reference/make_reference.py
"""
import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
torch.set_default_dtype(torch.float64)


def route(x, w, mask, k, normalize, ste, capacity_factor, coefs):
    E = w.shape[1]
    T = x.shape[0]
    logits = x @ w
    probs = torch.softmax(logits, dim=-1)
    real = torch.from_numpy(mask)
    R = int(real.sum())
    # top-k on the probabilities; ties (none in random data) to the lower index
    order = torch.topk(probs.detach() - 1e-15 * torch.arange(E), k, dim=-1).indices
    sel = torch.gather(probs, 1, order)
    soft = sel / sel.sum(-1, keepdim=True) if normalize else sel
    weights = soft + (1.0 - soft).detach() if ste else soft
    dropped = torch.zeros(T, k, dtype=torch.bool)
    counts = torch.zeros(E, dtype=torch.long)
    for t in range(T):
        if real[t]:
            for j in range(k):
                counts[order[t, j]] += 1
    if capacity_factor is not None:
        cap = math.ceil(capacity_factor * R * k / E)
        used = [0] * E
        for j in range(k):
            for t in range(T):
                if not real[t]:
                    continue
                e = int(order[t, j])
                if used[e] < cap:
                    used[e] += 1
                else:
                    dropped[t, j] = True
    keep = real[:, None] & ~dropped
    weights = weights * keep
    ent = -(probs * torch.log(probs)).sum(-1)
    if R:
        f = counts.double() / (R * k)
        P = (probs * real[:, None]).sum(0) / R
        lb = E * (f * P).sum()
        z = (torch.logsumexp(logits, -1) ** 2 * real).sum() / R
        en = (ent * real).sum() / R
    else:
        lb = z = en = torch.zeros(())
    aux = coefs[0] * lb + coefs[1] * z + coefs[2] * en
    r = real[:, None]
    fields = dict(topk_weights=weights, topk_indices=torch.where(r, order, -1),
                  router_probs=probs * r, router_probs_clean=probs * r, router_logits=logits,
                  entropy=ent * real, tokens_per_expert=counts, dropped=dropped)
    return fields, dict(load_balance=lb, z_loss=z, entropy=en), aux


def experts_dense(x, w1, w3, w2, activation):
    h = torch.einsum("td,edf->etf", x, w1)
    a = F.silu(h) * torch.einsum("td,edf->etf", x, w3) if activation == "swiglu" else F.gelu(h)
    return torch.einsum("etf,efd->etd", a, w2)  # [E, T, D]: every expert on every token


def make_case(name, rng, kind, T=24, D=10, F_=18, E=6, k=2, lead=None, normalize=None, ste=False,
              capacity_factor=None, activation="swiglu", padded=True):
    normalize = (k > 1) if normalize is None else normalize
    coefs = (0.1, 0.01, 0.05)
    x = rng.standard_normal((T, D))
    mask = rng.random(T) > 0.25 if padded else np.ones(T, bool)
    params = {"w_router": rng.standard_normal((D, E)) * 0.7,
              "w1": rng.standard_normal((E, D, F_)) / math.sqrt(D),
              "w2": rng.standard_normal((E, F_, D)) / math.sqrt(F_)}
    if activation == "swiglu":
        params["w3"] = rng.standard_normal((E, D, F_)) / math.sqrt(D)
    tp = {n: torch.tensor(v, requires_grad=True) for n, v in params.items()}
    tx = torch.tensor(x, requires_grad=True)
    fields, losses, aux = route(tx, tp["w_router"], mask, k, normalize, ste, capacity_factor, coefs)
    if capacity_factor is not None:
        assert fields["dropped"].any(), name
    out = {}
    if kind == "router":
        G = rng.standard_normal((T, k))
        objective = (torch.tensor(G) * fields["topk_weights"]).sum() + aux
        out["G"] = G
        used = ["w_router"]
    else:
        ye = experts_dense(tx, tp["w1"], tp.get("w3"), tp["w2"], activation)
        onehot = F.one_hot(fields["topk_indices"].clamp(min=0), E).double()  # [T, k, E]
        coef = (onehot * fields["topk_weights"][..., None]).sum(1)  # [T, E]
        y = torch.einsum("te,etd->td", coef, ye)
        dy = rng.standard_normal((T, D))
        objective = (torch.tensor(dy) * y).sum() + aux
        out["dy"], out["y"] = dy, y.detach().numpy()
        used = list(params)
    objective.backward()
    shape = (lead + (D,)) if lead else (T, D)
    for key in ("dy", "y"):
        if key in out:
            out[key] = out[key].reshape(shape)
    out["x"] = x.reshape(shape)
    out["mask"] = mask.reshape(shape[:-1])
    out["dx"] = tx.grad.numpy().reshape(shape)
    for n in used:
        out[f"param_{n}"] = params[n]
        out[f"grad_{n}"] = tp[n].grad.numpy()
    for f, v in fields.items():
        out[f"router_{f}"] = v.detach().numpy()
    for n, v in losses.items():
        out[f"loss_{n}"] = np.array(float(v.detach()))
    out["aux_loss"] = np.array(float(aux.detach()))
    cfg = dict(d_model=D, d_ff=F_, num_experts=E, top_k=k, normalize_topk=normalize,
               capacity_factor=capacity_factor, activation=activation, straight_through=ste,
               load_balance_coef=coefs[0], z_loss_coef=coefs[1], entropy_coef=coefs[2], dtype="float64")
    out["kind"] = np.array(kind)
    out["cfg"] = np.array(json.dumps(cfg))
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


if __name__ == "__main__":
    main()
