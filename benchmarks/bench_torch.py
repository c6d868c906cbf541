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

import moe_py
from common import default_model_and_batches, interleaved_medians, machine_line, set_threads
from moe_py.torch import MoE, MoEFunction
from torch_reference import MixtralMoE, NoFFN, TorchLM, lm_train_step


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
    t = interleaved_medians({"numpy": lambda i: numpy_side(), "torch": lambda i: torch_side()}, repeats, 1)
    return t["numpy"], t["torch"]


class FunctionTimer:
    """Wall time of every moe_py.torch forward and backward (the autograd Function: the C++
    layer and its glue) while active."""

    def __init__(self):
        self.seconds = 0.0

    def __enter__(self):
        self._fwd, self._bwd = MoEFunction.forward, MoEFunction.backward

        def timed(fn):
            def run(ctx, *args):
                t = time.perf_counter()
                try:
                    return fn(ctx, *args)
                finally:
                    self.seconds += time.perf_counter() - t
            return staticmethod(run)
        MoEFunction.forward, MoEFunction.backward = timed(self._fwd), timed(self._bwd)
        return self

    def __exit__(self, *exc):
        MoEFunction.forward, MoEFunction.backward = staticmethod(self._fwd), staticmethod(self._bwd)


def inside_vs_alone(model, batches, warmup):
    """Median ms per MoE block of forward + backward: inside the training model, and the
    same block called alone, again and again, on a batch of the same shape and padding."""
    step = lm_train_step(model)
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
        set_threads(n, torch)
        torch.manual_seed(0)
        ours = TorchLM(model_cfg, lambda: MoE(model_cfg.moe))
        torch.manual_seed(0)
        eager = TorchLM(model_cfg, lambda: MoE(model_cfg.moe))
        for b_src, b_dst in zip(ours.blocks, eager.blocks):  # the same weights everywhere
            b_dst.moe = MixtralMoE(b_src.moe)
        eager.load_state_dict({k: v for k, v in ours.state_dict().items()}, strict=False)
        torch.manual_seed(0)
        rest = TorchLM(model_cfg, NoFFN)
        steps = {name: lm_train_step(m) for name, m in (("ours", ours), ("eager", eager), ("rest", rest))}
        t = interleaved_medians({name: (lambda i, s=s: s(batches[i])) for name, s in steps.items()},
                                len(batches) - args.warmup, args.warmup)
        share = 1 - t["rest"] / t["eager"]
        print(f"{n:>7} {real / t['ours']:>19.0f} {real / t['eager']:>18.0f} {t['eager'] / t['ours']:>6.2f} "
              f"{100 * share:>23.0f}% {t['eager'] / t['rest']:>8.2f}", flush=True)
        inside[n] = inside_vs_alone(ours, batches, args.warmup)
    print("ratio = eager step time / moe_py.torch step time (> 1: the moe_py module is faster).")
    print("MoE share = 1 - (step time of the same model with no FFN work) / (eager step time);")
    print("ceiling = the ratio an MoE block that took no time at all would reach (Amdahl).")
    for n, (t_in, t_alone) in inside.items():
        print(f"moe_py MoE block, forward + backward, {n} thread(s): {t_in:.2f} ms inside the model, "
              f"{t_alone:.2f} ms called alone on a batch of the same shape ({100 * (t_in / t_alone - 1):+.0f} %)")
    print()
    for shape in [(8192, 256, 256, 64, 8), (4096, 512, 1024, 8, 2)]:
        set_threads(max(args.threads), torch)
        t_np, t_torch = overhead(shape)
        print(f"module overhead at {shape}, {max(args.threads)} threads: NumPy layer {t_np * 1e3:.1f} ms, "
              f"torch module {t_torch * 1e3:.1f} ms ({100 * (t_torch / t_np - 1):+.1f} %)")


if __name__ == "__main__":
    main()
