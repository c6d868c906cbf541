"""Training tokens/s of the default `train` model: moe_py against the same model in
PyTorch eager (torch_reference.eager_lm: same weights, same batches, same threads, steps
interleaved), in one run, and moe_py's rate as a share of the machine's best same-run SGEMM
and FMA peak (common.py).

    .venv/bin/pip install torch==2.13.0
    .venv/bin/python benchmarks/bench_train.py [--threads 1 2] [--steps 8]
"""
import argparse

import numpy as np

from common import (NumpyBlasThreads, Table, best_sgemm, default_model_and_batches, fma_peak, fmt,
                    interleaved_medians, machine_line, optional_torch, set_threads)
from moe_py.cli import configs_from_args
from moe_py.config import ACTIVATION_TRAITS
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


def step_flops(cfg, B, S):
    """FLOPs of the model's matrix products in one training step over all B*S positions:
    forward (attention scores causal, S/2 keys per query on average; MoE experts at top_k of
    them, plus the router) and backward at twice the forward."""
    D, L = cfg.d_model, cfg.n_layers
    attn = 2 * D * 3 * D + 2 * D * D + 2 * 2 * (S / 2) * D
    n_mats = 3 if ACTIVATION_TRAITS[cfg.activation].gated else 2
    if cfg.moe is not None:
        ffn = cfg.moe.top_k * n_mats * 2 * D * cfg.moe.d_ff + 2 * D * cfg.moe.num_experts
    else:
        ffn = n_mats * 2 * D * cfg.d_ff
    head = cfg.n_predict * 2 * D * cfg.vocab_size
    return 3.0 * B * S * (L * (attn + ffn) + head)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    torch = optional_torch()
    if torch is None:
        print("torch not installed: moe_py only (pip install 'moe_py[torch]')")
    else:
        from torch_reference import eager_lm
    _, defaults, batches = default_model_and_batches(args.steps + args.warmup)
    real = float(np.median([b.mask.sum() for b in batches]))
    print(f"default model, batch {defaults.batch_size} x {defaults.seq_len}, ~{real:.0f} real tokens/step, "
          f"median of {args.steps} steps after {args.warmup} warm-up")
    print(machine_line())
    np_blas = NumpyBlasThreads()
    np_blas.set(1)
    B, S = defaults.batch_size, defaults.seq_len
    table = Table([("model", -6), ("threads", 7), ("moe_py tok/s", 13), ("torch tok/s", 12), ("ratio", 6),
                   ("GF/s", 6), ("best SGEMM", 11), ("%best", 6), ("peak", 6), ("%peak", 6),
                   ("loss moe_py", 12), ("loss torch", 11)], sep=" ")
    table.print_head()
    for dense in (False, True):
        model_cfg, _ = configs_from_args(defaults, dense=dense)
        flops = step_flops(model_cfg, B, S)
        for n in args.threads:
            set_threads(n, torch)
            model, step = moe_py_step_fn(model_cfg)
            loss_ref = model.loss_and_backward(batches[0].inputs, batches[0].targets, batches[0].mask)
            loss_ref = loss_ref["loss"] + loss_ref["aux_loss"]
            steps = {"moe_py": lambda i: step(batches[i])}
            loss_t = None
            if torch is not None:
                model2, _ = moe_py_step_fn(model_cfg)
                tstep, tfwd = eager_lm(model2)
                with torch.no_grad():
                    b = batches[0]
                    loss_t = float(tfwd(torch.from_numpy(b.inputs), torch.from_numpy(b.targets), torch.from_numpy(b.mask)))
                steps["torch"] = lambda i: tstep(batches[i])
            t = interleaved_medians(steps, len(batches) - args.warmup, args.warmup)
            # the roofline: the FFN's own GEMM shape (all B*S rows, or k copies of them)
            ffn = model_cfg.moe
            rows = B * S * (ffn.top_k if ffn is not None else 1)
            sg = best_sgemm(rows, model_cfg.d_model, ffn.d_ff if ffn is not None else model_cfg.d_ff,
                            n, torch, np_blas)
            peak = fma_peak()
            ours, theirs = t["moe_py"], t.get("torch")
            gfs = flops / ours / 1e9
            table.print_row(["dense" if dense else "moe", str(n), f"{real / ours:.0f}",
                             fmt(theirs and real / theirs, ".0f"), fmt(theirs and theirs / ours, ".2f"),
                             f"{gfs:.1f}", f"{sg['best']:.1f}", f"{100 * gfs / sg['best']:.0f}%",
                             f"{peak:.0f}", f"{100 * gfs / peak:.0f}%", f"{loss_ref:.5f}",
                             "" if loss_t is None else f"{loss_t:.5f}"])
    print("ratio = torch step time / moe_py step time (> 1: moe_py faster), steps interleaved; the two")
    print("losses are the first batch's loss + aux loss of the same initial weights (same maths check).")
    print("GF/s = FLOPs of the model's matrix products per step (forward x 3, over all B*S positions)")
    print("per second of moe_py's step; best SGEMM = the best of moe_py's GEMM, NumPy's @ and torch.mm")
    print("at the FFN's GEMM shape on the same threads; peak = measured FP32 FMA loop (GFLOP/s).")
    print("Small GEMMs (d_model 128), attention, norms and the optimiser keep a training step well")
    print("below a single large SGEMM: %best is a ceiling check, not a target.")


if __name__ == "__main__":
    main()
