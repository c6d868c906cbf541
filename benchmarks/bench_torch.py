"""moe_py.torch.MoE inside a PyTorch model, against an eager torch MoE block written the way
Hugging Face's Mixtral block is (router softmax, top-k, a loop over the experts that were hit,
index_add_), in the same small transformer LM: the default `train` model's sizes, the same
weights, batches and threads, steps interleaved. Also the block's time inside the model
against the same block called alone, and the module's overhead over the NumPy layer it
wraps, at the two largest bench_layer shapes.

    .venv/bin/python benchmarks/bench_torch.py [--threads 1 2] [--steps 10]
"""
import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

import moe_py
from moe_py.cli import _configs, build_parser
from moe_py.data import BatchSampler, python_source_corpus
from moe_py.torch import MoE, _MoEFunction
from bench_train import interleaved_medians as interleaved
from roofline import machine_line


class EagerMoE(torch.nn.Module):
    """HF-Mixtral-style block with moe_py's parameter layout, plus the same aux losses."""

    def __init__(self, src: MoE):
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


class LM(torch.nn.Module):
    """Embeddings, n_layers x [RMSNorm, causal attention, RMSNorm, MoE], RMSNorm, head."""

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


def step_fn(model):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(b):
        logits, aux = model(torch.from_numpy(b.inputs), torch.from_numpy(b.mask))
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.from_numpy(b.targets).reshape(-1),
                               ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        (loss + aux).backward()
        opt.step()
        return float(loss)
    return step


def overhead(shape, repeats=5):
    """Median seconds of forward + backward: the NumPy layer, and the module around it."""
    T, D, Fd, E, k = shape
    cfg = moe_py.MoEConfig(d_model=D, d_ff=Fd, num_experts=E, top_k=k, seed=0)
    m = MoE(cfg)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, D), dtype=np.float32)
    dy = rng.standard_normal((T, D), dtype=np.float32)
    tx, tdy = torch.from_numpy(x).requires_grad_(True), torch.from_numpy(dy)

    def numpy_side():
        m.layer.zero_grad()
        m.layer(x)
        m.layer.backward(dy)

    def torch_side():
        m.zero_grad(set_to_none=True)
        tx.grad = None
        y, aux, _ = m(tx)
        torch.autograd.backward([y, aux], [tdy, torch.ones_like(aux)])
    return interleaved([lambda _: numpy_side(), lambda _: torch_side()], [None] * (repeats + 1), 1)


class FunctionTimer:
    """Wall time of every moe_py.torch forward and backward (the autograd Function: the C++
    layer and its glue) while active."""

    def __init__(self):
        self.seconds = 0.0

    def __enter__(self):
        self._fwd, self._bwd = _MoEFunction.forward, _MoEFunction.backward

        def timed(fn):
            def run(ctx, *args):
                t = time.perf_counter()
                try:
                    return fn(ctx, *args)
                finally:
                    self.seconds += time.perf_counter() - t
            return staticmethod(run)
        _MoEFunction.forward, _MoEFunction.backward = timed(self._fwd), timed(self._bwd)
        return self

    def __exit__(self, *exc):
        _MoEFunction.forward, _MoEFunction.backward = staticmethod(self._fwd), staticmethod(self._bwd)


def inside_vs_alone(model, batches, warmup):
    """Median ms per MoE block of forward + backward: inside the training model, and the
    same block called alone, again and again, on a batch of the same shape and padding."""
    step = step_fn(model)
    inside = []
    for i, b in enumerate(batches):
        with FunctionTimer() as ft:
            step(b)
        if i >= warmup:
            inside.append(ft.seconds / len(model.blocks))
    block = model.blocks[0].moe
    b = batches[0]
    x = torch.randn(*b.inputs.shape, block.cfg.d_model, requires_grad=True)
    mask = torch.from_numpy(b.mask)
    dy = torch.randn(*b.inputs.shape, block.cfg.d_model)
    alone = []
    for i in range(len(batches)):
        with FunctionTimer() as ft:
            y, aux, _ = block(x, padding_mask=mask)
            torch.autograd.backward([y, aux], [dy, torch.ones_like(aux)])
        if i >= warmup:
            alone.append(ft.seconds)
    return 1e3 * float(np.median(inside)), 1e3 * float(np.median(alone))


def default_model_and_batches(n: int):
    """The default `train` model's config, its defaults, and its first n training batches."""
    defaults = build_parser().parse_args(["train"])
    model_cfg, _ = _configs(defaults, dense=False)
    corpus = python_source_corpus(max_bytes=500_000)
    sampler = BatchSampler(corpus.train, defaults.batch_size, defaults.seq_len, 0)
    return model_cfg, defaults, [sampler.batch(i) for i in range(n)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    print(machine_line())
    model_cfg, defaults, batches = default_model_and_batches(args.steps + args.warmup)
    real = float(np.median([b.mask.sum() for b in batches]))
    print(f"default model sizes: d_model {model_cfg.d_model}, {model_cfg.n_layers} layers, "
          f"{model_cfg.moe.num_experts} experts of width {model_cfg.moe.d_ff}, top-{model_cfg.moe.top_k}; "
          f"batch {defaults.batch_size} x {defaults.seq_len} (~{real:.0f} real tokens); "
          f"median of {args.steps} interleaved steps after {args.warmup}")
    print(f"{'threads':>7} {'moe_py.torch tok/s':>19} {'eager torch tok/s':>18} {'ratio':>6} "
          f"{'MoE share of eager step':>24} {'ceiling':>8}")
    inside = {}
    for n in args.threads:
        torch.set_num_threads(n)
        moe_py.set_num_threads(n)
        torch.manual_seed(0)
        ours = LM(model_cfg, lambda: MoE(model_cfg.moe))
        torch.manual_seed(0)
        eager = LM(model_cfg, lambda: MoE(model_cfg.moe))
        for b_src, b_dst in zip(ours.blocks, eager.blocks):  # the same weights everywhere
            b_dst.moe = EagerMoE(b_src.moe)
        eager.load_state_dict({k: v for k, v in ours.state_dict().items()}, strict=False)
        torch.manual_seed(0)
        rest = LM(model_cfg, NoFFN)
        t = interleaved([step_fn(ours), step_fn(eager), step_fn(rest)], batches, args.warmup)
        share = 1 - t[2] / t[1]
        print(f"{n:>7} {real / t[0]:>19.0f} {real / t[1]:>18.0f} {t[1] / t[0]:>6.2f} "
              f"{100 * share:>23.0f}% {t[1] / t[2]:>8.2f}", flush=True)
        inside[n] = inside_vs_alone(ours, batches, args.warmup)
    print("ratio = eager step time / moe_py.torch step time (> 1: the moe_py module is faster).")
    print("MoE share = 1 - (step time of the same model with no FFN work) / (eager step time);")
    print("ceiling = the ratio an MoE block that took no time at all would reach (Amdahl).")
    for n, (t_in, t_alone) in inside.items():
        print(f"moe_py MoE block, forward + backward, {n} thread(s): {t_in:.2f} ms inside the model, "
              f"{t_alone:.2f} ms called alone on a batch of the same shape ({100 * (t_in / t_alone - 1):+.0f} %)")
    print()
    for shape in [(8192, 256, 256, 64, 8), (4096, 512, 1024, 8, 2)]:
        moe_py.set_num_threads(max(args.threads))
        torch.set_num_threads(max(args.threads))
        t_np, t_torch = overhead(shape)
        print(f"module overhead at {shape}, {max(args.threads)} threads: NumPy layer {t_np * 1e3:.1f} ms, "
              f"torch module {t_torch * 1e3:.1f} ms ({100 * (t_torch / t_np - 1):+.1f} %)")


if __name__ == "__main__":
    main()
