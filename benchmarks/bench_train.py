"""Training tokens/s of the default `train` model: moe_py against the same model in
PyTorch eager (same weights, same batches, same threads, steps interleaved), in one run,
and moe_py's rate as a share of the machine's best same-run SGEMM and FMA peak (roofline.py).

    .venv/bin/pip install torch==2.13.0
    .venv/bin/python benchmarks/bench_train.py [--threads 1 2] [--steps 8]
"""
import argparse
import time

import numpy as np

import moe_py
from roofline import NumpyBlasThreads, best_sgemm, fma_peak, machine_line
from moe_py.cli import _configs, build_parser
from moe_py.data import BatchSampler, python_source_corpus
from moe_py.models import TransformerLM
from moe_py.optim import AdamW, global_grad_norm




def moe_py_step_fn(model_cfg, seed=0):
    model = TransformerLM(model_cfg)
    optim = AdamW(model.named_parameters())

    def step(b):
        model.zero_grad()
        res = model.loss_and_backward(b.inputs, b.targets, b.mask)
        norm = global_grad_norm(g for _, _, g in model.named_parameters())
        optim.step(1e-3, min(1.0, 1.0 / (norm + 1e-12)))
        return res["loss"]
    return model, step


def torch_model(model, torch):
    """The same architecture in PyTorch eager, with moe_py's weights copied in."""
    F = torch.nn.functional
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


def step_flops(cfg, B, S):
    """FLOPs of the model's matrix products in one training step over all B*S positions:
    forward (attention scores causal, S/2 keys per query on average; MoE experts at top_k of
    them, plus the router) and backward at twice the forward."""
    D, L = cfg.d_model, cfg.n_layers
    attn = 2 * D * 3 * D + 2 * D * D + 2 * 2 * (S / 2) * D
    n_mats = 3 if cfg.activation == "swiglu" else 2
    if cfg.moe is not None:
        ffn = cfg.moe.top_k * n_mats * 2 * D * cfg.moe.d_ff + 2 * D * cfg.moe.num_experts
    else:
        ffn = n_mats * 2 * D * cfg.d_ff
    head = cfg.n_predict * 2 * D * cfg.vocab_size
    return 3.0 * B * S * (L * (attn + ffn) + head)


def interleaved_medians(steps, batches, warmup):
    """Median seconds per step of each step function, run A B A B over the same batches."""
    times = [[] for _ in steps]
    for i, b in enumerate(batches):
        for j, step in enumerate(steps):
            t = time.perf_counter()
            step(b)
            if i >= warmup:
                times[j].append(time.perf_counter() - t)
    return [float(np.median(ts)) for ts in times]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    try:
        import torch
    except ImportError:
        torch = None
        print("torch not installed: moe_py only (pip install 'moe_py[torch]')")
    defaults = build_parser().parse_args(["train"])
    corpus = python_source_corpus(max_bytes=500_000)
    sampler = BatchSampler(corpus.train, defaults.batch_size, defaults.seq_len, 0)
    batches = [sampler.batch(i) for i in range(args.steps + args.warmup)]
    real = float(np.median([b.mask.sum() for b in batches]))
    print(f"default model, batch {defaults.batch_size} x {defaults.seq_len}, ~{real:.0f} real tokens/step, "
          f"median of {args.steps} steps after {args.warmup} warm-up")
    print(machine_line())
    np_blas = NumpyBlasThreads()
    np_blas.set(1)
    B, S = defaults.batch_size, defaults.seq_len
    hdr = (f"{'model':<6} {'threads':>7} {'moe_py tok/s':>13} {'torch tok/s':>12} {'ratio':>6} "
           f"{'GF/s':>6} {'best SGEMM':>11} {'%best':>6} {'peak':>6} {'%peak':>6} "
           f"{'loss moe_py':>12} {'loss torch':>11}")
    print(hdr)
    print("-" * len(hdr))
    for dense in (False, True):
        model_cfg, _ = _configs(defaults, dense=dense)
        flops = step_flops(model_cfg, B, S)
        for n in args.threads:
            if torch is not None:
                torch.set_num_threads(n)  # torch and moe_py share libgomp: set torch first
            moe_py.set_num_threads(n)
            assert moe_py.get_num_threads() == n
            model, step = moe_py_step_fn(model_cfg)
            loss_ref = model.loss_and_backward(batches[0].inputs, batches[0].targets, batches[0].mask)
            loss_ref = loss_ref["loss"] + loss_ref["aux_loss"]
            steps = [step]
            if torch is not None:
                model2, _ = moe_py_step_fn(model_cfg)
                tstep, tfwd = torch_model(model2, torch)
                with torch.no_grad():
                    b = batches[0]
                    loss_t = float(tfwd(torch.from_numpy(b.inputs), torch.from_numpy(b.targets), torch.from_numpy(b.mask)))
                steps.append(tstep)
            t = interleaved_medians(steps, batches, args.warmup)
            # the roofline: the FFN's own GEMM shape (all B*S rows, or k copies of them)
            ffn = model_cfg.moe
            rows = B * S * (ffn.top_k if ffn is not None else 1)
            sg = best_sgemm(rows, model_cfg.d_model, ffn.d_ff if ffn is not None else model_cfg.d_ff,
                            n, torch, np_blas)
            peak = fma_peak()
            gfs = flops / t[0] / 1e9
            row = f"{'dense' if dense else 'moe':<6} {n:>7} {real / t[0]:>13.0f}"
            if torch is not None:
                row += f" {real / t[1]:>12.0f} {t[1] / t[0]:>6.2f}"
            else:
                row += f" {'-':>12} {'-':>6}"
            row += (f" {gfs:>6.1f} {sg['best']:>11.1f} {100 * gfs / sg['best']:>5.0f}% {peak:>6.0f}"
                    f" {100 * gfs / peak:>5.0f}% {loss_ref:>12.5f}")
            if torch is not None:
                row += f" {loss_t:>11.5f}"
            print(row, flush=True)
    print("ratio = torch step time / moe_py step time (> 1: moe_py faster), steps interleaved; the two")
    print("losses are the first batch's loss + aux loss of the same initial weights (same maths check).")
    print("GF/s = FLOPs of the model's matrix products per step (forward x 3, over all B*S positions)")
    print("per second of moe_py's step; best SGEMM = the best of moe_py's GEMM, NumPy's @ and torch.mm")
    print("at the FFN's GEMM shape on the same threads; peak = measured FP32 FMA loop (GFLOP/s).")
    print("Small GEMMs (d_model 128), attention, norms and the optimiser keep a training step well")
    print("below a single large SGEMM: %best is a ceiling check, not a target.")


if __name__ == "__main__":
    main()
