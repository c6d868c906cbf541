"""bfloat16 compute (MoEConfig.compute_dtype="bfloat16") against float32, PyTorch autocast and
the machine's bfloat16 GEMM, in one run (the bf16 issue's figures; docs/design.md, "bfloat16
compute").

For each bench_layer shape (T, d_model, d_ff, E, k), on the given threads, interleaved:
  - moe_py's layer, forward + backward, in float32 and in bfloat16 on the kernel in use
    (`info`'s bf16_gemm; MOE_PY_BF16_KERNEL=fallback forces the fallback): fp32/bf16 is the
    speed-up over our own float32 (target >= 1.7x, geomean over the shapes);
  - PyTorch eager, the same maths and weights (torch_reference.EagerMoELayer), under
    torch.autocast("cpu", dtype=torch.bfloat16) with its router in float32: torch/bf16
    (target >= 1.3x);
  - the best bfloat16 GEMM of the run, torch.mm on bfloat16 tensors at the experts' shape
    [T*k, D] x [D, F], and moe_py's bf16 layer rate (all its FLOPs over its whole time, as
    bench_layer counts them) as a share of it (target >= 70 % at the two largest shapes).
Then the default `train` model's training tokens/s, float32 against bfloat16 (target >= 1.4x),
and its step split into the kernels compute_dtype covers (experts, linear layers) and the rest.

    .venv/bin/python benchmarks/bench_bf16.py [--threads 2] [--repeats 5] [--no-train]

A benchmark, not a test: it prints numbers and asserts nothing about them.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from typing import Dict, List

import numpy as np

import moe_py
from bench_layer import DEFAULT_SHAPES, Shape, inputs, layer_flops, parse_shape, shape_str
from common import (ForeignLoad, Table, _median_rate, fmt, geomean, interleaved_medians, interleaved_times,
                    kernel_breakdown, machine_line, optional_torch, set_threads, spread)
from moe_py.machine import bf16_path

TWO_LARGEST = sorted(DEFAULT_SHAPES, key=lambda s: layer_flops(s)["total"])[-2:]
EXPERT_KERNELS = ["experts_forward_f32", "experts_backward_f32"]


def best_bf16_gemm(M: int, K: int, N: int, torch_mod, repeats: int) -> float:
    """GFLOP/s of torch.mm on bfloat16 tensors [M, K] x [K, N] (oneDNN on the CPU)."""
    rng = np.random.default_rng(0)
    a = torch_mod.from_numpy(rng.standard_normal((M, K), dtype=np.float32)).bfloat16()
    b = torch_mod.from_numpy(rng.standard_normal((K, N), dtype=np.float32)).bfloat16()
    with torch_mod.no_grad():
        return _median_rate(lambda: torch_mod.mm(a, b), 2.0 * M * K * N, repeats)


def bench_shape(shape: Shape, n: int, args, torch_mod) -> dict:
    T, D, F, E, k = shape
    kw = dict(d_model=D, d_ff=F, num_experts=E, top_k=k, seed=0)
    fp32 = moe_py.MoELayer(moe_py.MoEConfig(**kw))
    bf16 = moe_py.MoELayer(moe_py.MoEConfig(**kw, compute_dtype="bfloat16"))
    x, dy, _ = inputs(shape)
    fns = {"fp32": lambda i: (fp32(x), fp32.backward(dy)), "bf16": lambda i: (bf16(x), bf16.backward(dy))}
    befores = {"fp32": fp32.zero_grad, "bf16": bf16.zero_grad}
    if torch_mod is not None:
        from torch_reference import EagerMoELayer
        ref = EagerMoELayer(fp32.params, fp32.cfg)
        tx = torch_mod.from_numpy(x.copy()).requires_grad_(True)
        tdy = torch_mod.from_numpy(dy.copy())

        def autocast_step(i):
            with torch_mod.autocast("cpu", dtype=torch_mod.bfloat16):
                y, aux = ref.forward(tx)
            torch_mod.autograd.backward([y, aux], [tdy, torch_mod.ones_like(aux)])

        def torch_before():
            ref.zero_grad()
            tx.grad = None
        fns["torch_autocast"], befores["torch_autocast"] = autocast_step, torch_before
    set_threads(n, torch_mod)
    load = ForeignLoad()
    row = {"shape": shape, "threads": n, "gflop": layer_flops(shape)["total"] / 1e9}
    for name, ts in interleaved_times(fns, args.repeats, args.warmup, befores).items():
        row[name], row[name + "_spread"] = statistics.median(ts), spread(ts)
    if torch_mod is not None:
        row["bf16_gemm"] = best_bf16_gemm(T * k, D, F, torch_mod, max(args.repeats, 7))
    # where the bf16 layer's time goes: its expert kernels, and the rest (router, dispatch,
    # combine, checks, Python)
    b = kernel_breakdown(lambda: (bf16(x), bf16.backward(dy)), EXPERT_KERNELS, args.repeats, args.warmup,
                         bf16.zero_grad)
    row["bf16_experts"], row["bf16_total"] = sum(b[n] for n in EXPERT_KERNELS), b["total"]
    row["foreign"] = load.cores()
    print(f"  done {shape_str(shape)} threads={n}", file=sys.stderr, flush=True)
    return row


def print_layer(rows: List[dict]) -> None:
    table = Table([("shape (T,D,F,E,k)", -24), ("thr", 4), ("fp32 ms", 9), ("bf16 ms", 9), ("fp32/bf16", 10),
                   ("autocast ms", 12), ("torch/bf16", 11), ("bf16 GF/s", 10), ("bf16 mm GF/s", 13),
                   ("%mm", 7), ("spread", 7), ("other", 6)], sep=" ")
    table.print_head()
    for r in rows:
        gfs = r["gflop"] / r["bf16"]
        mm = r.get("bf16_gemm")
        table.print_row([shape_str(r["shape"]), str(r["threads"]), f"{r['fp32'] * 1e3:.1f}", f"{r['bf16'] * 1e3:.1f}",
                         f"{r['fp32'] / r['bf16']:.2f}", fmt(r.get("torch_autocast") and r["torch_autocast"] * 1e3, ".1f"),
                         fmt(r.get("torch_autocast") and r["torch_autocast"] / r["bf16"], ".2f"), f"{gfs:.0f}",
                         fmt(mm, ".0f"), fmt(mm and 100 * gfs / mm, ".0f"),
                         f"{max(r['fp32_spread'], r['bf16_spread']):.2f}", f"{r['foreign']:.2f}"])
    for n in sorted({r["threads"] for r in rows}):
        mine = [r for r in rows if r["threads"] == n]
        line = f"threads={n}: geomean fp32/bf16 {geomean([r['fp32'] / r['bf16'] for r in mine]):.2f} (target >= 1.7)"
        if all("torch_autocast" in r for r in mine):
            line += f", torch autocast/bf16 {geomean([r['torch_autocast'] / r['bf16'] for r in mine]):.2f} (>= 1.3)"
        big = [r for r in mine if r["shape"] in TWO_LARGEST and "bf16_gemm" in r]
        if big:
            line += ", %bf16 mm at the two largest shapes " + ", ".join(
                f"{100 * r['gflop'] / r['bf16'] / r['bf16_gemm']:.0f}%" for r in big) + " (>= 70%)"
        print(line)


def print_breakdown(rows: List[dict]) -> None:
    print("bf16 layer by kernel (a separate, non-interleaved run): the expert kernels' share of its time, and "
          "their rate on the expert GEMMs' FLOPs")
    for r in rows:
        f = layer_flops(r["shape"])
        rate = (f["experts_fwd"] + f["experts_bwd"]) / 1e9 / r["bf16_experts"]
        mm = r.get("bf16_gemm")
        print(f"  {shape_str(r['shape'])} threads={r['threads']}: experts {r['bf16_experts'] * 1e3:.1f} of "
              f"{r['bf16_total'] * 1e3:.1f} ms ({100 * r['bf16_experts'] / r['bf16_total']:.0f} %), "
              f"{rate:.0f} GFLOP/s" + (f" = {100 * rate / mm:.0f} % of the bf16 mm" if mm else ""))


def bench_train(threads: List[int], args) -> None:
    from bench_train import moe_py_step_fn
    from common import default_model_and_batches
    model_cfg, defaults, batches = default_model_and_batches(args.steps + args.warmup)
    bf16_cfg = dataclasses.replace(model_cfg, compute_dtype="bfloat16",
                                   moe=dataclasses.replace(model_cfg.moe, compute_dtype="bfloat16"))
    real = float(np.median([b.mask.sum() for b in batches]))
    print(f"\ndefault model training, batch {defaults.batch_size} x {defaults.seq_len} (~{real:.0f} real tokens/step), "
          f"median of {args.steps} interleaved steps after {args.warmup} warm-up")
    table = Table([("threads", 7), ("fp32 tok/s", 11), ("bf16 tok/s", 11), ("bf16/fp32", 10)], sep=" ")
    table.print_head()
    for n in threads:
        set_threads(n)
        _, step32 = moe_py_step_fn(model_cfg)
        _, step16 = moe_py_step_fn(bf16_cfg)
        t = interleaved_medians({"fp32": lambda i: step32(batches[i]), "bf16": lambda i: step16(batches[i])},
                                args.steps, args.warmup)
        table.print_row([str(n), f"{real / t['fp32']:.0f}", f"{real / t['bf16']:.0f}", f"{t['fp32'] / t['bf16']:.2f}"])
    print("bf16/fp32 = fp32 step time / bf16 step time (target >= 1.4x)")
    # What bounds it: compute_dtype covers the GEMMs of the experts and of the linear layers
    # (attention projections, head); attention itself, the norms, the routers, the loss and
    # the optimiser run in float32.
    covered = EXPERT_KERNELS + ["linear_forward_f32", "linear_backward_f32"]
    share = {}
    for name, cfg in (("fp32", model_cfg), ("bf16", bf16_cfg)):
        _, step = moe_py_step_fn(cfg)
        b = kernel_breakdown(lambda: step(batches[0]), covered, args.steps, args.warmup)
        share[name] = (b["total"], sum(b[n] for n in covered))
    (t32, e32), (t16, e16) = share["fp32"], share["bf16"]
    print(f"the bfloat16-covered kernels (experts, linear layers) per step (threads={threads[-1]}, medians of "
          f"{args.steps}; not interleaved): float32 {e32 * 1e3:.1f} of {t32 * 1e3:.1f} ms ({100 * e32 / t32:.0f} %), "
          f"bfloat16 {e16 * 1e3:.1f} of {t16 * 1e3:.1f} ms; the float32 step with them at their bfloat16 time: "
          f"{t32 / (t32 - e32 + e16):.2f}x faster, with them taking no time at all: {t32 / (t32 - e32):.2f}x")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, nargs="+", default=[2])
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls before timing")
    ap.add_argument("--shapes", type=parse_shape, nargs="+", default=DEFAULT_SHAPES, metavar="T,D,F,E,k")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch columns")
    ap.add_argument("--no-train", dest="train", action="store_false", help="skip the training rates")
    ap.add_argument("--steps", type=int, default=8, help="timed training steps")
    args = ap.parse_args(argv)
    torch_mod = None if args.no_torch else optional_torch()
    print(machine_line())
    print(f"bf16 kernel: {bf16_path()}")
    rows = [bench_shape(s, n, args, torch_mod) for s in args.shapes for n in args.threads]
    print_layer(rows)
    print("fp32/bf16 and torch/bf16: time ratios (> 1: moe_py's bf16 faster); bf16 GF/s: the layer's FLOPs")
    print("(bench_layer's count) over its bf16 time; bf16 mm: torch.mm on bfloat16 tensors at [T*k, D] x [D, F];")
    print("spread: (max - min) / median of moe_py's sides; other: cores other processes used meanwhile.")
    print_breakdown(rows)
    if args.train:
        bench_train(args.threads, args)


if __name__ == "__main__":
    main()
