"""Speed of one MoE layer, forward + backward, float32 (docs/design.md, "Performance").

For each shape (T, d_model, d_ff, E, k) and thread count this prints:
  - moe_py's median time and GFLOP/s (FLOPs of the work actually done: the expert GEMMs,
    2*T*k*D*F each, 3 forward + 6 backward for SwiGLU, plus the router GEMMs, 2*T*D*E
    forward + 2 * 2*T*D*E backward);
  - the ratio to a PyTorch eager layer of the same maths with the same weights, on the same
    number of threads, timed interleaved with ours in the same run (skipped when torch is
    missing; torch_reference.EagerMoELayer);
  - the share of the machine's best SGEMM rate measured in the same run: one GEMM
    [T*k, D] x [D, F] through moe_py's own GEMM path, NumPy's @ and torch.mm, whichever is
    fastest (common.best_sgemm), and of the measured FP32 FMA peak;
  - a per-kernel breakdown of moe_py's layer (router, dispatch, experts, combine, and the
    Python around them), timed by wrapping the kernels the layer calls;
  - peak RSS (per row, by resetting the kernel's high-water mark where Linux allows it,
    and for the whole process at the end);
  - the router cost of every routing algorithm at one shape (--router-shape): the share of
    the layer's forward + backward time spent in the routing kernels.

Usage:
  python benchmarks/bench_layer.py                      # the full run (~2 min on 2 cores)
  python benchmarks/bench_layer.py --threads 2 --repeats 3 --shapes 1024,128,256,16,2
  python benchmarks/bench_layer.py --no-torch --no-breakdown

A benchmark, not a test: it prints numbers and asserts nothing about them.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from typing import Dict, List, Tuple

import numpy as np

import moe_py
from common import (ForeignLoad, NumpyBlasThreads, Table, best_sgemm, end_rss_window, fma_peak, fmt,
                    geomean, interleaved_times, kernel_breakdown, machine_line, optional_torch,
                    peak_rss_mb, rss_str, set_threads, spread, start_rss_window,
                    whole_run_peak_rss_mb)

Shape = Tuple[int, int, int, int, int]
FINE_GRAINED = (4096, 512, 128, 64, 8)  # many small experts (DeepSeekMoE, Qwen-MoE)
DEFAULT_SHAPES = [(2048, 256, 512, 8, 2), (4096, 512, 1024, 8, 2), (1024, 128, 256, 16, 2),
                  (8192, 256, 256, 64, 8), FINE_GRAINED]
ROUTER_SHAPE = (8192, 256, 256, 64, 8)  # the most tokens and experts: the routers' worst case
ROUTER_LIMITS = {"expert_choice": 0.15}  # the bound on routing's share; 0.10 otherwise
# the kernels one layer step calls, with their breakdown column titles
KERNELS = {"router_forward_f32": "rt_fwd", "dispatch_plan": "plan", "gather_rows_f32": "gather",
           "experts_forward_f32": "exp_fwd", "combine_forward_f32": "comb_fwd",
           "combine_backward_f32": "comb_bwd", "experts_backward_f32": "exp_bwd",
           "gather_rows_backward_f32": "gath_bwd", "router_backward_f32": "rt_bwd"}
# routing + dispatch + combine (everything but the expert FFN kernels)
OVERHEAD_KERNELS = [k for k in KERNELS if not k.startswith("experts_")]


def layer_flops(shape: Shape) -> Dict[str, float]:
    """FLOPs of one forward + backward of a dropless SwiGLU layer."""
    T, D, F, E, k = shape
    gemm = 2.0 * T * k * D * F  # one expert GEMM over all T*k assignments
    router = 2.0 * T * D * E
    return {"experts_fwd": 3 * gemm, "experts_bwd": 6 * gemm,
            "router_fwd": router, "router_bwd": 2 * router, "total": 9 * gemm + 3 * router}


def shape_str(s: Shape) -> str:
    return "(" + ",".join(str(v) for v in s) + ")"


def inputs(shape: Shape) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x and dy of the shape, and token ids for hash routing."""
    T, D = shape[:2]
    rng = np.random.default_rng(1)
    x = rng.standard_normal((T, D), dtype=np.float32)
    dy = rng.standard_normal((T, D), dtype=np.float32)
    return x, dy, rng.integers(0, 256, T)


def layer_breakdown(layer, x, dy, args, forward=None) -> Dict[str, float]:
    """Median seconds per kernel of forward + backward, plus 'total' and 'python'; `forward`
    replaces layer(x) (e.g. to pass token ids)."""
    forward = forward or (lambda: layer(x))
    return kernel_breakdown(lambda: (forward(), layer.backward(dy)), list(KERNELS), args.repeats,
                            args.warmup, before=layer.zero_grad)


def bench_shape(shape: Shape, threads: List[int], args, torch_mod, np_blas,
                peaks: Dict[int, float]) -> List[dict]:
    T, D, F, E, k = shape
    cfg = moe_py.MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=k, dtype="float32", seed=0)
    layer = moe_py.MoELayer(cfg)
    x, dy, _ = inputs(shape)
    # forward + backward of each side; zero_grad untimed before each, as grads accumulate
    fns = {"moe": lambda i: (layer(x), layer.backward(dy))}
    befores = {"moe": layer.zero_grad}
    ref = None
    if torch_mod is not None:
        from torch_reference import EagerMoELayer, layer_differences
        ref = EagerMoELayer(layer.params, cfg)
        tx = torch_mod.from_numpy(x.copy()).requires_grad_(True)
        tdy = torch_mod.from_numpy(dy.copy())

        def torch_before():
            ref.zero_grad()
            tx.grad = None
        fns["torch"], befores["torch"] = (lambda i: ref.step(tx, tdy)), torch_before

    rows = []
    for j, n in enumerate(threads):
        set_threads(n, torch_mod)
        row = {"shape": shape, "threads": n, "gflop": layer_flops(shape)["total"] / 1e9}
        load = ForeignLoad()
        if ref is not None and j == 0:  # correctness, once per shape: same maths, same weights
            row["check"] = layer_differences(layer, ref, x, dy)
        for name, fn in fns.items():  # working memory of one untimed step of each side
            window = start_rss_window()
            befores[name]()
            fn(0)
            row[name + "_rss"] = end_rss_window(window)
        for name, ts in interleaved_times(fns, args.repeats, args.warmup, befores).items():
            row[name + "_s"], row[name + "_spread"] = statistics.median(ts), spread(ts)
        # before the SGEMM rates: NumPy's OpenBLAS threads spin for a while after its
        # multi-threaded SGEMM and would take a core from the breakdown's kernels
        if args.breakdown:
            row["breakdown"] = layer_breakdown(layer, x, dy, args)
        row["sgemm"] = best_sgemm(T * k, D, F, n, torch_mod, np_blas, repeats=max(args.repeats, 7))
        row["fma_peak"] = peaks[n]
        row["foreign"] = load.cores()
        rows.append(row)
        print(f"  done {shape_str(shape)} threads={n}: moe {row['moe_s'] * 1e3:.1f} ms"
              + (f", torch {row['torch_s'] * 1e3:.1f} ms" if ref is not None else ""),
              file=sys.stderr, flush=True)
    return rows


def router_costs(shape: Shape, threads: List[int], args) -> List[dict]:
    """For every router: the median layer time (training mode, forward + backward) and the
    time in its routing kernels (router_forward + router_backward, the Python around them
    excluded), from the same instrumented runs."""
    from moe_py.config import ROUTERS
    T, D, F, E, k = shape
    x, dy, ids = inputs(shape)
    rows = []
    for n in threads:
        set_threads(n)
        for router in ROUTERS:
            layer = moe_py.MoELayer(moe_py.MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=k,
                                                     dtype="float32", router=router, seed=0))
            forward = (lambda lay=layer: lay(x, token_ids=ids)) if router == "hash" else None
            b = layer_breakdown(layer, x, dy, args, forward)
            route = b["router_forward_f32"] + b["router_backward_f32"]
            rows.append({"router": router, "threads": n, "total": b["total"], "route": route})
            print(f"  done router {router} threads={n}: {route / b['total']:.1%} of "
                  f"{b['total'] * 1e3:.1f} ms", file=sys.stderr, flush=True)
    return rows


def print_router_costs(rows: List[dict], shape: Shape) -> None:
    print()
    print(f"Router cost at {shape_str(shape)} (T,D,F,E,k), float32, training mode (Sinkhorn on), "
          f"forward + backward; routing = the router_forward and router_backward kernels")
    table = Table([("router", -15), ("threads", 8), ("layer ms", 10), ("routing ms", 12), ("share", 8),
                   ("limit", 7), ("", 0)])
    print(table.line([t for t, _ in table.columns]))
    for r in rows:
        limit = ROUTER_LIMITS.get(r["router"], 0.10)
        share = r["route"] / r["total"]
        table.print_row([r["router"], str(r["threads"]), f"{r['total'] * 1e3:.1f}", f"{r['route'] * 1e3:.2f}",
                         f"{share:.1%}", f"{limit:.0%}", "" if share <= limit else "  OVER"])


MAIN_TABLE = Table([("shape (T,D,F,E,k)", -24), ("thr", 4), ("GFLOP", 7), ("moe ms", 9), ("moe GF/s", 9),
                    ("torch ms", 10), ("torch GF/s", 11), ("x torch", 8), ("best", 7), ("%best", 7),
                    ("ours", 7), ("numpy", 7), ("t.mm", 7), ("peak", 6), ("%peak", 6),
                    ("RSS moe MB", 13), ("RSS torch MB", 14), ("other", 6)])
MAIN_NOTES = """\
GF/s = GFLOP/s of the expert + router GEMMs done (18*T*k*D*F + 6*T*D*E per step).
x torch = torch time / moe_py time (>1: moe_py faster); the two are timed interleaved.
best = the best GFLOP/s of one [T*k,D]x[D,F] SGEMM on the same threads among moe_py's
own GEMM path (ours), NumPy's @ (numpy) and torch.mm (t.mm), all measured in this run;
%best = moe GF/s / best. peak = FP32 FMA peak of a measured FMA loop on the same threads.
RSS = peak RSS of the process during one untimed step (high-water mark reset before it)
and, in brackets, its rise over the RSS just before (freed heap trimmed first).
other = average CPU cores busy with OTHER processes while the row ran (should be ~0;
anything above ~0.1 makes that row's multi-thread numbers unreliable)."""
BREAKDOWN_TABLE = Table([("shape", -24), ("thr", 4)] + [(c, 9) for c in KERNELS.values()]
                        + [("python", 9), ("total", 9), ("rt+disp+comb", 13), ("exp fwd GF/s", 13),
                           ("exp bwd GF/s", 13)])
BREAKDOWN_NOTES = """\
rt = router (gate GEMM, softmax, top-k, losses), plan/gather = dispatch,
comb = combine, exp = expert FFN kernels; python = the rest of the step (argument
checks incl. the isfinite scans of x, dy and the weights, allocation, glue).
rt+disp+comb = (rt_fwd+plan+gather+comb_fwd+comb_bwd+gath_bwd+rt_bwd) / total."""


def met(ok: bool) -> str:
    return "MET" if ok else "NOT met"


def print_report(rows: List[dict], shapes: List[Shape], threads: List[int], have_torch: bool,
                 breakdown_on: bool) -> None:
    print()
    print("== forward + backward, float32, median of repeats ==")
    MAIN_TABLE.print_head()
    for r in rows:
        moe_gfs, ts, sg = r["gflop"] / r["moe_s"], r.get("torch_s"), r["sgemm"]
        MAIN_TABLE.print_row([
            shape_str(r["shape"]), str(r["threads"]), f"{r['gflop']:.2f}", f"{r['moe_s'] * 1e3:.1f}",
            f"{moe_gfs:.1f}", fmt(ts and ts * 1e3, ".1f"), fmt(ts and r["gflop"] / ts, ".1f"),
            fmt(ts and ts / r["moe_s"], ".2f"), f"{sg['best']:.1f}", f"{100 * moe_gfs / sg['best']:.0f}%",
            f"{sg['moe_py']:.1f}", fmt(sg.get("numpy"), ".1f"), fmt(sg.get("torch"), ".1f"),
            f"{r['fma_peak']:.0f}", f"{100 * moe_gfs / r['fma_peak']:.0f}%", rss_str(r["moe_rss"]),
            rss_str(r.get("torch_rss")), fmt(r["foreign"], ".2f")])
    print(MAIN_NOTES)
    busy = [r for r in rows if r["foreign"] > 0.1]
    if busy:
        print(f"WARNING: {len(busy)} row(s) ran while other processes used the CPUs; re-run on an "
              "idle machine.")
    spreads = [r[side + "_spread"] for r in rows for side in ("moe", "torch") if side + "_spread" in r]
    print(f"run-to-run spread (max-min)/median: up to {100 * max(spreads):.0f}%")

    checks = [r for r in rows if "check" in r]
    if checks:
        print()
        print("== correctness: moe_py vs torch, same weights and inputs ==")
        for r in checks:
            c = r["check"]
            print(f"{shape_str(r['shape']):<24} max|dy|: y {c['y']:.2e} (of max {c['y_scale']:.2f})"
                  f"  dx {c['dx']:.2e} (of max {c['dx_scale']:.2f})  grads max rel {c['dw']:.2e}")

    if breakdown_on:
        print()
        print("== moe_py breakdown: median ms per kernel (forward + backward) ==")
        BREAKDOWN_TABLE.print_head()
        for r in rows:
            b, fl = r["breakdown"], layer_flops(r["shape"])
            BREAKDOWN_TABLE.print_row(
                [shape_str(r["shape"]), str(r["threads"])] + [f"{b[k] * 1e3:.2f}" for k in KERNELS]
                + [f"{b['python'] * 1e3:.2f}", f"{b['total'] * 1e3:.1f}",
                   f"{100 * sum(b[k] for k in OVERHEAD_KERNELS) / b['total']:.1f}%",
                   f"{fl['experts_fwd'] / b['experts_forward_f32'] / 1e9:.1f}",
                   f"{fl['experts_bwd'] / b['experts_backward_f32'] / 1e9:.1f}"])
        print(BREAKDOWN_NOTES)

    print()
    print("== targets ==")
    by = {(r["shape"], r["threads"]): r for r in rows}
    tmax = max(threads)
    largest = sorted(shapes, key=lambda s: layer_flops(s)["total"], reverse=True)
    # shapes within 10% of the largest FLOP count count as "the largest"
    top = [s for s in largest if layer_flops(s)["total"] >= 0.9 * layer_flops(largest[0])["total"]]
    if have_torch:
        for n, goal in sorted({1: 1.3, 2: 2.0}.items()):
            if n not in threads:
                continue
            at_n = [by[(s, n)] for s in shapes]
            g = geomean([r["torch_s"] / r["moe_s"] for r in at_n])
            # what the ratio would be if moe_py ran every GEMM at the best same-run SGEMM rate
            ceiling = geomean([r["sgemm"]["best"] * r["torch_s"] / r["gflop"] for r in at_n])
            print(f"vs PyTorch eager, geomean over {len(shapes)} shapes at {n} thread(s): {g:.2f}x "
                  f"(target >= {goal}x: {met(g >= goal)}; ceiling at 100% of the best SGEMM: {ceiling:.2f}x)")
    else:
        print("vs PyTorch: skipped (torch not available)")

    def pct_best(s):
        r = by[(s, tmax)]
        return 100 * r["gflop"] / r["moe_s"] / r["sgemm"]["best"]
    for s in largest[:2]:
        print(f"% of the best same-run SGEMM at {shape_str(s)}, {tmax} threads: {pct_best(s):.0f}% "
              f"(target >= 80%: {met(pct_best(s) >= 80)})")
    if FINE_GRAINED in shapes:
        p = pct_best(FINE_GRAINED)
        print(f"% of the best same-run SGEMM at the fine-grained {shape_str(FINE_GRAINED)}, "
              f"{tmax} threads: {p:.0f}% (target >= 60%: {met(p >= 60)})")
    for s in top:
        if 1 in threads and tmax > 1:
            sp = by[(s, 1)]["moe_s"] / by[(s, tmax)]["moe_s"]
            print(f"speed-up 1 -> {tmax} threads at {shape_str(s)}: {sp:.2f}x "
                  f"(target >= 1.8x at 2 threads: {met(sp >= 1.8)})")
    for s in top:
        if breakdown_on:
            b = by[(s, tmax)]["breakdown"]
            overhead = sum(b[k] for k in OVERHEAD_KERNELS)
            share, with_py = 100 * overhead / b["total"], 100 * (overhead + b["python"]) / b["total"]
            print(f"routing+dispatch+combine at {shape_str(s)}, {tmax} threads: {share:.1f}% of the "
                  f"layer ({with_py:.1f}% with the Python glue) (target <= 10%: {met(share <= 10)})")


def parse_shape(text: str) -> Shape:
    parts = [int(v) for v in text.replace("(", "").replace(")", "").split(",")]
    if len(parts) != 5:
        raise argparse.ArgumentTypeError(f"expected T,D,F,E,k, got {text!r}")
    return tuple(parts)  # type: ignore[return-value]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls before timing")
    ap.add_argument("--shapes", type=parse_shape, nargs="+", default=DEFAULT_SHAPES, metavar="T,D,F,E,k")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch columns")
    ap.add_argument("--no-breakdown", dest="breakdown", action="store_false",
                    help="skip the per-kernel breakdown")
    ap.add_argument("--router-shape", type=parse_shape, default=ROUTER_SHAPE, metavar="T,D,F,E,k",
                    help="the shape of the router-cost table (default: %(default)s)")
    ap.add_argument("--no-router-costs", dest="router_costs", action="store_false",
                    help="skip the router-cost table")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or min(args.threads) < 1:
        ap.error("--repeats >= 1, --warmup >= 0 and --threads >= 1 expected")

    torch_mod = None if args.no_torch else optional_torch()
    torch_note = ("skipped (--no-torch)" if args.no_torch else torch_mod.__version__ if torch_mod
                  else "not installed: torch columns skipped (pip install torch==2.13.0)")
    np_blas = NumpyBlasThreads()
    np_blas.set(1)
    print(f"moe_py {moe_py.__version__}, numpy {np.__version__}, torch {torch_note}")
    print(machine_line())
    print(f"python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs, "
          f"threads {args.threads}, repeats {args.repeats} after {args.warmup} warm-up")
    if not np_blas.available:
        print("numpy's OpenBLAS thread count could not be set: numpy column runs on its default")
    print(f"RSS after imports: {peak_rss_mb():.0f} MB", flush=True)
    probe = ForeignLoad()
    time.sleep(0.5)
    other = probe.cores()
    if other > 0.1:
        print(f"WARNING: other processes are using {other:.1f} CPU cores right now", flush=True)

    peaks = {}
    for n in args.threads:
        set_threads(n, torch_mod)
        peaks[n] = fma_peak()
    print("FP32 FMA peak (measured FMA loop): "
          + ", ".join(f"{peaks[n]:.0f} GFLOP/s at {n} thread(s)" for n in args.threads), flush=True)

    t_start = time.perf_counter()
    rows = [row for shape in args.shapes
            for row in bench_shape(shape, args.threads, args, torch_mod, np_blas, peaks)]
    costs = router_costs(args.router_shape, args.threads, args) if args.router_costs else []
    print_report(rows, args.shapes, args.threads, torch_mod is not None, args.breakdown)
    if costs:
        print_router_costs(costs, args.router_shape)
    print()
    print(f"peak RSS of the whole run (getrusage): {whole_run_peak_rss_mb():.0f} MB; "
          f"wall time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
