"""The eager PyTorch MoE layers and models the benchmarks hold moe_py against: the same
maths, written the way a PyTorch user would, with moe_py's weights copied in.

- EagerMoELayer: moe_py.MoELayer's default maths (bench_layer.py), tokens sorted by expert.
- eager_lm(): the `train` command's TransformerLM, functional (bench_train.py).
- MixtralMoE, NoFFN, TorchLM, lm_train_step(): a torch transformer LM with a swappable MoE
  block: moe_py.torch.MoE, a Hugging Face Mixtral-style block, or none (bench_torch.py,
  replay_cold.py).

Importing this module imports torch.
"""
from __future__ import annotations

from typing import Dict

import numpy as np
import torch
import torch.nn.functional as F

import moe_py


class EagerMoELayer:
    """softmax top-k router with normalised top-k weights, tokens sorted by expert, one
    matmul per expert, silu(x W1) * (x W3) then W2, index_add_ to combine, plus the same aux
    losses (load balance through P only, z-loss); autograd backward."""

    def __init__(self, params: Dict[str, np.ndarray], cfg: moe_py.MoEConfig):
        self.cfg = cfg
        self.params = {name: torch.tensor(np.array(v), requires_grad=True) for name, v in params.items()}

    def forward(self, x):
        cfg, p = self.cfg, self.params
        T = x.shape[0]
        E, k = cfg.num_experts, cfg.top_k
        with torch.autocast("cpu", enabled=False):  # the router in float32 under autocast too
            logits = x.float() @ p["w_router"] if x.dtype == torch.bfloat16 else x @ p["w_router"]
        probs = torch.softmax(logits, dim=-1)
        top_p, top_i = torch.topk(probs, k, dim=-1)
        if cfg.normalize_topk:
            top_p = top_p / top_p.sum(dim=-1, keepdim=True)
        flat_e = top_i.reshape(-1)
        order = torch.argsort(flat_e, stable=True)
        counts = torch.bincount(flat_e, minlength=E)
        token = order // k
        xs = x.index_select(0, token)
        # split/unbind rather than slicing and indexing: the backward of a slice (or of
        # w1[e]) writes a zero tensor of the full size per expert, which would make the
        # reference needlessly slow at large E
        w1s, w3s, w2s = p["w1"].unbind(0), p["w3"].unbind(0), p["w2"].unbind(0)
        outs = []
        for e, xe in enumerate(torch.split(xs, counts.tolist())):
            if xe.shape[0] == 0:
                continue
            h = F.silu(xe @ w1s[e]) * (xe @ w3s[e])
            outs.append(h @ w2s[e])
        ye = torch.cat(outs) * top_p.reshape(-1).index_select(0, order).unsqueeze(1)
        y = torch.zeros_like(x).index_add_(0, token, ye)
        # aux losses, as cpp/losses.h: f (no gradient) from the assignments
        f = counts.to(x.dtype) / (T * k)
        load_balance = E * (f * probs.mean(dim=0)).sum()
        z_loss = torch.logsumexp(logits, dim=-1).pow(2).mean()
        aux = cfg.load_balance_coef * load_balance + cfg.z_loss_coef * z_loss
        if cfg.entropy_coef:
            ent = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1).mean()
            aux = aux + cfg.entropy_coef * ent
        return y, aux

    def zero_grad(self) -> None:
        for t in self.params.values():
            t.grad = None

    def step(self, x, dy):
        """forward + backward of sum(dy * y) + aux; returns (y, dx)."""
        y, aux = self.forward(x)
        torch.autograd.backward([y, aux], [dy, torch.ones_like(aux)])
        return y, x.grad


def layer_differences(layer: moe_py.MoELayer, ref: EagerMoELayer, x: np.ndarray,
                      dy: np.ndarray) -> Dict[str, float]:
    """One forward + backward of both on the same input: max |y - y_ref| and |dx - dx_ref|
    beside the largest |y_ref| and |dx_ref|, and the largest relative gradient difference."""
    layer.zero_grad()
    y = layer(x).y
    dx = layer.backward(dy)
    ref.zero_grad()
    tx = torch.from_numpy(x.copy()).requires_grad_(True)
    ty, tdx = ref.step(tx, torch.from_numpy(dy.copy()))
    ty, tdx = ty.detach().numpy(), tdx.numpy()
    grads = {name: ref.params[name].grad.numpy() for name in layer.params}
    return {
        "y": float(np.abs(y - ty).max()), "y_scale": float(np.abs(ty).max()),
        "dx": float(np.abs(dx - tdx).max()), "dx_scale": float(np.abs(tdx).max()),
        "dw": max(float(np.abs(layer.grads[name] - g).max() / max(np.abs(g).max(), 1e-30))
                  for name, g in grads.items()),
    }


def eager_lm(model):
    """(train step, forward) of moe_py's TransformerLM `model` in PyTorch eager, with its
    weights copied in. step(batch) runs one AdamW step with gradient clipping at 1 and
    returns the loss; forward(ids, targets, mask) returns the loss + aux loss."""
    cfg = model.cfg
    P = {n: torch.tensor(p.copy(), requires_grad=True) for n, p, _ in model.named_parameters()}

    def rmsnorm(x, g, eps=1e-6):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g

    def moe_ffn(h, real, prefix, mcfg):
        T, D = h.shape
        E, k = mcfg.num_experts, mcfg.top_k
        logits = h @ P[prefix + "w_router"]
        probs = torch.softmax(logits, -1)
        w, idx = torch.topk(probs, k, -1)
        w = w / w.sum(-1, keepdim=True) if mcfg.normalize_topk else w
        w = w * real[:, None]
        flat = idx.reshape(-1)
        tok = torch.arange(T).repeat_interleave(k)
        keep = real.repeat_interleave(k).bool()
        flat, tok, wf = flat[keep], tok[keep], w.reshape(-1)[keep]
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=E).tolist()
        xs = h[tok[order]]
        outs = []
        for xe, w1, w3, w2 in zip(torch.split(xs, counts), P[prefix + "w1"].unbind(0),
                                  P[prefix + "w3"].unbind(0), P[prefix + "w2"].unbind(0)):
            outs.append((F.silu(xe @ w1) * (xe @ w3)) @ w2)
        ye = torch.cat(outs) * wf[order][:, None]
        y = torch.zeros_like(h).index_add_(0, tok[order], ye)
        R = real.sum()
        f = torch.bincount(flat, minlength=E).double() / (R * k)
        Pm = (probs * real[:, None]).sum(0) / R
        lb = E * (f.to(Pm.dtype) * Pm).sum()
        z = (torch.logsumexp(logits, -1) ** 2 * real).sum() / R
        return y, mcfg.load_balance_coef * lb + mcfg.z_loss_coef * z

    def forward(ids, targets, mask):
        B, S = ids.shape
        real = mask.reshape(-1).to(P["embed.tokens"].dtype)
        x = (P["embed.tokens"][ids] + P["embed.positions"][:S]).reshape(B * S, -1)
        H, D = cfg.n_heads, cfg.d_model
        causal = torch.tril(torch.ones(S, S, dtype=torch.bool))
        attn_mask = causal[None, None] & mask[:, None, None, :]
        aux = 0.0
        for i in range(cfg.n_layers):
            p = f"blocks.{i}."
            h = rmsnorm(x, P[p + "norm1.g"])
            q, kk, v = (h @ P[p + "attn.w_qkv"]).reshape(B, S, 3, H, D // H).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, kk, v, attn_mask=attn_mask)
            a = a.transpose(1, 2).reshape(B * S, D) * real[:, None]
            x = x + a @ P[p + "attn.w_out"]
            h = rmsnorm(x, P[p + "norm2.g"])
            if cfg.moe is not None:
                y, al = moe_ffn(h, real, p + "ffn.", cfg.moe)
                aux = aux + al
            else:
                y = ((F.silu(h @ P[p + "ffn.w1"][0]) * (h @ P[p + "ffn.w3"][0])) @ P[p + "ffn.w2"][0]) * real[:, None]
            x = x + y
        logits = rmsnorm(x, P["norm_f.g"]) @ P["heads.0.w"]
        return F.cross_entropy(logits, targets.reshape(-1), ignore_index=-100) + aux

    opt = torch.optim.AdamW(list(P.values()), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)

    def step(b):
        opt.zero_grad(set_to_none=True)
        loss = forward(torch.from_numpy(b.inputs), torch.from_numpy(b.targets), torch.from_numpy(b.mask))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(P.values()), 1.0)
        opt.step()
        return float(loss.detach())
    return step, forward


class MixtralMoE(torch.nn.Module):
    """HF-Mixtral-style block (router softmax, top-k, a loop over the experts that were hit,
    index_add_) with the parameters of the moe_py.torch.MoE `src`, plus the same aux losses."""

    def __init__(self, src: torch.nn.Module):
        super().__init__()
        self.cfg = src.cfg
        for name, p in src.named_parameters():
            self.register_parameter(name, torch.nn.Parameter(p.detach().clone()))

    def forward(self, x, padding_mask=None):
        cfg = self.cfg
        h = x.reshape(-1, cfg.d_model)
        real = torch.ones(h.shape[0], dtype=torch.bool) if padding_mask is None else padding_mask.reshape(-1)
        logits = h @ self.w_router
        probs = torch.softmax(logits, -1)
        top_p, top_i = torch.topk(probs, cfg.top_k, dim=-1)
        top_p = top_p / top_p.sum(-1, keepdim=True)
        top_p = top_p * real[:, None]
        out = torch.zeros_like(h)
        expert_mask = F.one_hot(top_i, cfg.num_experts).permute(2, 1, 0)  # [E, k, T]
        for e in torch.nonzero(expert_mask.sum(dim=(1, 2)) > 0).flatten().tolist():
            pos, tok = torch.where(expert_mask[e])
            xe = h[tok]
            ye = (F.silu(xe @ self.w1[e]) * (xe @ self.w3[e])) @ self.w2[e]
            out.index_add_(0, tok, ye * top_p[tok, pos, None])
        R = real.sum()
        f = torch.bincount(top_i[real].reshape(-1), minlength=cfg.num_experts).to(h.dtype) / (R * cfg.top_k)
        P = (probs * real[:, None]).sum(0) / R
        aux = cfg.load_balance_coef * cfg.num_experts * (f * P).sum() + \
            cfg.z_loss_coef * ((torch.logsumexp(logits, -1) ** 2) * real).sum() / R
        return out.reshape(x.shape), aux, None


class NoFFN(torch.nn.Module):
    """The rest of the model without any MoE work: bounds what a faster MoE block can gain."""

    def forward(self, x, padding_mask=None):
        return x * 0.0, x.new_zeros(()), None  # keeps the norm before it in the graph


class TorchLM(torch.nn.Module):
    """Embeddings, n_layers x [RMSNorm, causal attention, RMSNorm, MoE], RMSNorm, head; the
    MoE blocks come from make_moe() and are called as moe_py.torch.MoE is."""

    def __init__(self, model_cfg, make_moe):
        super().__init__()
        D = model_cfg.d_model
        self.heads = model_cfg.n_heads
        self.tok = torch.nn.Embedding(model_cfg.vocab_size, D)
        self.pos = torch.nn.Embedding(model_cfg.max_seq_len, D)
        self.blocks = torch.nn.ModuleList()
        for _ in range(model_cfg.n_layers):
            b = torch.nn.Module()
            b.n1, b.n2 = torch.nn.RMSNorm(D, eps=1e-6), torch.nn.RMSNorm(D, eps=1e-6)
            b.qkv = torch.nn.Linear(D, 3 * D, bias=False)
            b.proj = torch.nn.Linear(D, D, bias=False)
            b.moe = make_moe()
            self.blocks.append(b)
        self.norm = torch.nn.RMSNorm(D, eps=1e-6)
        self.head = torch.nn.Linear(D, model_cfg.vocab_size, bias=False)

    def forward(self, ids, mask):
        B, S = ids.shape
        x = self.tok(ids) + self.pos(torch.arange(S))[None]
        aux = 0.0
        for b in self.blocks:
            q, k, v = b.qkv(b.n1(x)).reshape(B, S, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + b.proj(a.transpose(1, 2).reshape(B, S, -1))
            y, al, _ = b.moe(b.n2(x), padding_mask=mask)
            x, aux = x + y, aux + al
        return self.head(self.norm(x)), aux


def lm_train_step(model: TorchLM):
    """step(batch): one AdamW step of `model` on the batch's cross-entropy + aux loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(b):
        logits, aux = model(torch.from_numpy(b.inputs), torch.from_numpy(b.mask))
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.from_numpy(b.targets).reshape(-1),
                               ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        (loss + aux).backward()
        opt.step()
        return float(loss.detach())
    return step
