"""Speed of one MoE layer, forward + backward, float32 (docs/design.md, "Performance").

For each shape (T, d_model, d_ff, E, k) and thread count this prints:
  - moe_py's median time and GFLOP/s (FLOPs of the work actually done: the
    expert GEMMs, 2*T*k*D*F each, 3 forward + 6 backward for SwiGLU, plus the
    router GEMMs, 2*T*D*E forward + 2 * 2*T*D*E backward);
  - the ratio to a PyTorch eager layer of the same maths with the same weights,
    on the same number of threads, timed interleaved with ours in the same run
    (skipped when torch is missing);
  - the share of the machine's best SGEMM rate measured in the same run: one GEMM
    [T*k, D] x [D, F] through moe_py's own GEMM path, NumPy's @ and torch.mm,
    whichever is fastest (roofline.py), and of the measured FP32 FMA peak;
  - a per-kernel breakdown of moe_py's layer (router, dispatch, experts,
    combine, and the Python around them), timed by wrapping the _core kernels
    the layer calls;
  - peak RSS (per row, by resetting the kernel's high-water mark where Linux
    allows it, and for the whole process at the end);
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
import ctypes
import gc
import math
import os
import platform
import resource
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

import moe_py
from moe_py import _core
from moe_py.machine import rss_mib
from roofline import NumpyBlasThreads, best_sgemm, fma_peak, machine_line

DEFAULT_SHAPES = [
    (2048, 256, 512, 8, 2),
    (4096, 512, 1024, 8, 2),
    (1024, 128, 256, 16, 2),
    (8192, 256, 256, 64, 8),
    (4096, 512, 128, 64, 8),  # fine-grained: many small experts (DeepSeekMoE, Qwen-MoE)
]
FINE_GRAINED = (4096, 512, 128, 64, 8)
Shape = Tuple[int, int, int, int, int]


# ---------------------------------------------------------------------------
# FLOPs, timing, memory
# ---------------------------------------------------------------------------
def layer_flops(shape: Shape) -> Dict[str, float]:
    """FLOPs of one forward + backward of a dropless SwiGLU layer."""
    T, D, F, E, k = shape
    gemm = 2.0 * T * k * D * F  # one expert GEMM over all T*k assignments
    router = 2.0 * T * D * E
    return {"experts_fwd": 3 * gemm, "experts_bwd": 6 * gemm,
            "router_fwd": router, "router_bwd": 2 * router,
            "total": 9 * gemm + 3 * router}


def median_time(fn: Callable[[], object], repeats: int, warmup: int,
                before: Optional[Callable[[], None]] = None) -> Tuple[float, List[float]]:
    """Median wall time of fn() over `repeats` calls after `warmup` untimed ones;
    `before` runs untimed ahead of every call."""
    times = []
    for i in range(warmup + repeats):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
    return statistics.median(times), times


_PEAK_BEFORE_RESETS = [0.0]


def _reset_peak_rss() -> bool:
    """Reset the process's RSS high-water mark (Linux >= 4.0); False if not possible.
    The peak so far is kept for whole_run_peak_rss_mb()."""
    _PEAK_BEFORE_RESETS[0] = max(_PEAK_BEFORE_RESETS[0], peak_rss_mb())
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _trim_heap() -> None:
    """Give freed heap back to the OS (glibc), so RSS before a timed run is what is live."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def current_rss_mb() -> float:
    rss = rss_mib()
    return float("nan") if rss is None else rss


def start_rss_window() -> Tuple[float, bool]:
    """(RSS now, whether the high-water mark could be reset) before a timed run."""
    _trim_heap()
    ok = _reset_peak_rss()
    return current_rss_mb(), ok


def end_rss_window(window: Tuple[float, bool]) -> Tuple[float, float]:
    """(peak RSS during the window, peak minus RSS at its start), MB; nan if unknown."""
    before, ok = window
    if not ok:
        return float("nan"), float("nan")
    peak = peak_rss_mb()
    return peak, peak - before


def peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux (bytes on macOS)
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024.0 * 1024.0) if sys.platform == "darwin" else r / 1024.0


def whole_run_peak_rss_mb() -> float:
    return max(_PEAK_BEFORE_RESETS[0], peak_rss_mb())


class ForeignLoad:
    """CPU time other processes used while we ran (busy time in /proc/stat minus
    this process's own CPU time), as average busy cores: on a 2-core machine
    anything else running skews the 2-thread rows badly, so each row says so."""

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample() -> Optional[Tuple[float, float, float]]:
        try:
            with open("/proc/stat") as f:
                v = [float(a) for a in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        hz = os.sysconf("SC_CLK_TCK")
        busy = (sum(v) - v[3] - (v[4] if len(v) > 4 else 0.0)) / hz  # all but idle, iowait
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return busy, ru.ru_utime + ru.ru_stime, time.perf_counter()

    def cores(self) -> float:
        """Average cores busy with other work since construction (nan if unknown)."""
        end = self._sample()
        if self._start is None or end is None:
            return float("nan")
        busy, own, wall = (b - a for a, b in zip(self._start, end))
        return max(0.0, (busy - own) / wall) if wall > 0 else float("nan")


# ---------------------------------------------------------------------------
# Thread control: moe_py (OpenMP), torch, numpy's own OpenBLAS
# ---------------------------------------------------------------------------
def set_threads(n: int, torch_mod) -> None:
    # torch and moe_py may share one libgomp (the first one loaded wins the
    # soname), so set torch first and moe_py last, then check.
    if torch_mod is not None:
        torch_mod.set_num_threads(n)
    moe_py.set_num_threads(n)
    got = moe_py.get_num_threads()
    if got != n:
        raise RuntimeError(f"moe_py runs on {got} threads after set_num_threads({n})")


# ---------------------------------------------------------------------------
# PyTorch eager reference: the same maths as moe_py's default layer
# ---------------------------------------------------------------------------
class TorchMoE:
    """softmax top-k router with normalised top-k weights, tokens sorted by expert,
    one matmul per expert, silu(x W1) * (x W3) then W2, index_add_ to combine,
    plus the same aux losses (load balance through P only, z-loss); autograd backward."""

    def __init__(self, torch_mod, params: Dict[str, np.ndarray], cfg: moe_py.MoEConfig):
        self.torch = torch_mod
        self.cfg = cfg
        self.params = {name: torch_mod.tensor(np.array(v), requires_grad=True)
                       for name, v in params.items()}

    def forward(self, x):
        torch, cfg = self.torch, self.cfg
        p = self.params
        T = x.shape[0]
        E, k = cfg.num_experts, cfg.top_k
        logits = x @ p["w_router"]
        probs = torch.softmax(logits, dim=-1)
        top_p, top_i = torch.topk(probs, k, dim=-1)
        if cfg.normalize_topk:
            top_p = top_p / top_p.sum(dim=-1, keepdim=True)
        flat_e = top_i.reshape(-1)
        order = torch.argsort(flat_e, stable=True)
        counts = torch.bincount(flat_e, minlength=E)
        token = order // k
        xs = x.index_select(0, token)
        # split/unbind rather than slicing and indexing: the backward of a slice
        # (or of w1[e]) writes a zero tensor of the full size per expert, which
        # would make the reference needlessly slow at large E
        w1s, w3s, w2s = p["w1"].unbind(0), p["w3"].unbind(0), p["w2"].unbind(0)
        outs = []
        for e, xe in enumerate(torch.split(xs, counts.tolist())):
            if xe.shape[0] == 0:
                continue
            h = torch.nn.functional.silu(xe @ w1s[e]) * (xe @ w3s[e])
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
        torch = self.torch
        y, aux = self.forward(x)
        torch.autograd.backward([y, aux], [dy, torch.ones_like(aux)])
        return y, x.grad


# ---------------------------------------------------------------------------
# moe_py per-kernel breakdown: wrap the _core functions the layer calls
# ---------------------------------------------------------------------------
KERNELS = ["router_forward_f32", "dispatch_plan", "gather_rows_f32", "experts_forward_f32",
           "combine_forward_f32", "combine_backward_f32", "experts_backward_f32",
           "gather_rows_backward_f32", "router_backward_f32"]
SHORT = {"router_forward_f32": "rt_fwd", "dispatch_plan": "plan", "gather_rows_f32": "gather",
         "experts_forward_f32": "exp_fwd", "combine_forward_f32": "comb_fwd",
         "combine_backward_f32": "comb_bwd", "experts_backward_f32": "exp_bwd",
         "gather_rows_backward_f32": "gath_bwd", "router_backward_f32": "rt_bwd"}
# routing + dispatch + combine (everything but the expert FFN kernels)
OVERHEAD_KERNELS = [k for k in KERNELS if not k.startswith("experts_")]


class KernelTimer:
    """Replaces _core kernels with timing wrappers while active (the layer looks
    them up on _core at call time, so the real code path is timed)."""

    def __init__(self) -> None:
        self.acc: Dict[str, float] = {name: 0.0 for name in KERNELS}
        self._orig: Dict[str, Callable] = {}

    def __enter__(self):
        for name in KERNELS:
            fn = getattr(_core, name)
            self._orig[name] = fn

            def wrapped(*a, _fn=fn, _name=name, **kw):
                t0 = time.perf_counter()
                try:
                    return _fn(*a, **kw)
                finally:
                    self.acc[_name] += time.perf_counter() - t0

            setattr(_core, name, wrapped)
        return self

    def __exit__(self, *exc):
        for name, fn in self._orig.items():
            setattr(_core, name, fn)

    def reset(self) -> None:
        for name in self.acc:
            self.acc[name] = 0.0


def breakdown(layer, x, dy, repeats: int, warmup: int,
              call: Optional[Callable[[], object]] = None) -> Dict[str, float]:
    """Median seconds per kernel, plus 'total' and 'python' (the rest: argument
    checks, allocation, the Python glue), over instrumented forward + backward.
    `call` replaces the forward layer(x) (e.g. to pass token ids)."""
    runs: List[Dict[str, float]] = []
    with KernelTimer() as kt:
        for i in range(warmup + repeats):
            layer.zero_grad()
            kt.reset()
            t0 = time.perf_counter()
            layer(x) if call is None else call()
            layer.backward(dy)
            total = time.perf_counter() - t0
            if i >= warmup:
                r = dict(kt.acc)
                r["total"] = total
                r["python"] = total - sum(kt.acc.values())
                runs.append(r)
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


# ---------------------------------------------------------------------------
# One shape
# ---------------------------------------------------------------------------
def sgemm_rates(shape: Shape, n: int, repeats: int, torch_mod,
                np_blas: NumpyBlasThreads) -> Dict[str, float]:
    """GFLOP/s of C = A[T*k, D] @ B[D, F] (the layer's expert GEMMs as one product) through
    moe_py, NumPy and torch.mm on n threads, and the best of them."""
    T, D, F, E, k = shape
    return best_sgemm(T * k, D, F, n, torch_mod, np_blas, repeats=max(repeats, 7))


def interleaved_medians(fns: Dict[str, Callable[[], object]], repeats: int, warmup: int,
                        befores: Dict[str, Callable[[], None]]) -> Dict[str, Tuple[float, List[float]]]:
    """Median wall time of each fn, timed A B A B ... so that a slow spell of the machine
    hits every side alike; `befores[name]` runs untimed ahead of each call."""
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            befores[name]()
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if i >= warmup:
                times[name].append(dt)
    return {name: (statistics.median(ts), ts) for name, ts in times.items()}


def bench_shape(shape: Shape, threads: List[int], args, torch_mod, np_blas,
                peaks: Dict[int, float]) -> List[dict]:
    T, D, F, E, k = shape
    cfg = moe_py.MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=k, dtype="float32", seed=0)
    layer = moe_py.MoELayer(cfg)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((T, D), dtype=np.float32)
    dy = rng.standard_normal((T, D), dtype=np.float32)
    flops = layer_flops(shape)

    tm = None
    if torch_mod is not None:
        tm = TorchMoE(torch_mod, layer.params, cfg)
        tx = torch_mod.from_numpy(x.copy()).requires_grad_(True)
        tdy = torch_mod.from_numpy(dy.copy())

        def torch_before():
            tm.zero_grad()
            tx.grad = None

        def torch_step():
            tm.step(tx, tdy)

    rows = []
    checked = False
    for n in threads:
        set_threads(n, torch_mod)
        row = {"shape": shape, "threads": n, "gflop": flops["total"] / 1e9}
        load = ForeignLoad()

        # correctness, once per shape: same maths, same weights
        if tm is not None and not checked:
            layer.zero_grad()
            y = layer(x).y
            dx = layer.backward(dy)
            torch_before()
            ty, tdx = tm.step(tx, tdy)
            ty = ty.detach().numpy()
            tdx = tdx.numpy()
            row["check"] = {
                "y": float(np.abs(y - ty).max()), "y_scale": float(np.abs(ty).max()),
                "dx": float(np.abs(dx - tdx).max()), "dx_scale": float(np.abs(tdx).max()),
                "dw": max(float(np.abs(layer.grads[name] - tm.params[name].grad.numpy()).max()
                                / max(np.abs(tm.params[name].grad.numpy()).max(), 1e-30))
                          for name in layer.params),
            }
            checked = True

        # forward + backward, moe_py and torch interleaved (zero_grad untimed: grads accumulate)
        fns = {"moe": lambda: (layer(x), layer.backward(dy))}
        befores = {"moe": layer.zero_grad}
        if tm is not None:
            fns["torch"], befores["torch"] = torch_step, torch_before
        for name, fn in fns.items():  # working memory of one untimed step of each side
            win = start_rss_window()
            befores[name]()
            fn()
            row[name + "_rss"] = end_rss_window(win)
        timed = interleaved_medians(fns, args.repeats, args.warmup, befores)
        for name, (t, ts) in timed.items():
            row[name + "_s"], row[name + "_spread"] = t, (max(ts) - min(ts)) / t

        # before the SGEMM rates: NumPy's OpenBLAS threads spin for a while after its
        # multi-threaded SGEMM and would take a core from the breakdown's kernels
        if args.breakdown:
            row["breakdown"] = breakdown(layer, x, dy, args.repeats, args.warmup)
        row["sgemm"] = sgemm_rates(shape, n, args.repeats, torch_mod, np_blas)
        row["fma_peak"] = peaks[n]
        row["foreign"] = load.cores()
        rows.append(row)
        print(f"  done {shape_str(shape)} threads={n}: moe {row['moe_s'] * 1e3:.1f} ms"
              + (f", torch {row['torch_s'] * 1e3:.1f} ms" if tm is not None else ""),
              file=sys.stderr, flush=True)
    return rows


# ---------------------------------------------------------------------------
# Router cost per algorithm
# ---------------------------------------------------------------------------
ROUTER_SHAPE = (8192, 256, 256, 64, 8)  # the most tokens and experts: the routers' worst case
ROUTER_LIMITS = {"expert_choice": 0.15}  # the issue's bound on routing's share; 0.10 otherwise


def router_costs(shape: Shape, threads: List[int], args) -> List[dict]:
    """For every router: the median layer time (training mode, forward + backward) and the
    time in its routing kernels (router_forward + router_backward, the Python around them
    excluded), from the same instrumented runs."""
    from moe_py.config import ROUTERS
    T, D, F, E, k = shape
    rng = np.random.default_rng(1)
    x = rng.standard_normal((T, D), dtype=np.float32)
    dy = rng.standard_normal((T, D), dtype=np.float32)
    ids = rng.integers(0, 256, T)
    rows = []
    for n in threads:
        set_threads(n, None)
        for router in ROUTERS:
            cfg = moe_py.MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=k, dtype="float32",
                                   router=router, seed=0)
            layer = moe_py.MoELayer(cfg)
            call = (lambda lay=layer: lay(x, token_ids=ids)) if router == "hash" else None
            b = breakdown(layer, x, dy, args.repeats, args.warmup, call)
            route = b["router_forward_f32"] + b["router_backward_f32"]
            rows.append({"router": router, "threads": n, "total": b["total"], "route": route})
            print(f"  done router {router} threads={n}: {route / b['total']:.1%} of "
                  f"{b['total'] * 1e3:.1f} ms", file=sys.stderr, flush=True)
    return rows


def print_router_costs(rows: List[dict], shape: Shape) -> None:
    print()
    print(f"Router cost at {shape_str(shape)} (T,D,F,E,k), float32, training mode (Sinkhorn on), "
          f"forward + backward; routing = the router_forward and router_backward kernels")
    print(f"{'router':<15}{'threads':>8}{'layer ms':>10}{'routing ms':>12}{'share':>8}{'limit':>7}")
    for r in rows:
        limit = ROUTER_LIMITS.get(r["router"], 0.10)
        share = r["route"] / r["total"]
        print(f"{r['router']:<15}{r['threads']:>8}{r['total'] * 1e3:>10.1f}{r['route'] * 1e3:>12.2f}"
              f"{share:>8.1%}{limit:>7.0%}" + ("" if share <= limit else "  OVER"))


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------
def shape_str(s: Shape) -> str:
    return "(" + ",".join(str(v) for v in s) + ")"


def rss_str(v: Optional[Tuple[float, float]]) -> str:
    if v is None or math.isnan(v[0]):
        return "-"
    return f"{v[0]:.0f} (+{v[1]:.0f})"


def geomean(v: List[float]) -> float:
    return math.exp(sum(math.log(a) for a in v) / len(v)) if v else float("nan")


def fmt(v, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def print_report(rows: List[dict], shapes: List[Shape], threads: List[int], have_torch: bool,
                 breakdown_on: bool) -> None:
    print()
    print("== forward + backward, float32, median of repeats ==")
    hdr = (f"{'shape (T,D,F,E,k)':<24}{'thr':>4}{'GFLOP':>7}{'moe ms':>9}{'moe GF/s':>9}"
           f"{'torch ms':>10}{'torch GF/s':>11}{'x torch':>8}"
           f"{'best':>7}{'%best':>7}{'ours':>7}{'numpy':>7}{'t.mm':>7}{'peak':>6}{'%peak':>6}"
           f"{'RSS moe MB':>13}{'RSS torch MB':>14}{'other':>6}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        moe_gfs = r["gflop"] / r["moe_s"]
        ts = r.get("torch_s")
        sg = r["sgemm"]
        print(f"{shape_str(r['shape']):<24}{r['threads']:>4}{r['gflop']:>7.2f}"
              f"{r['moe_s'] * 1e3:>9.1f}{moe_gfs:>9.1f}"
              f"{fmt(ts and ts * 1e3, '.1f'):>10}{fmt(ts and r['gflop'] / ts, '.1f'):>11}"
              f"{fmt(ts and ts / r['moe_s'], '.2f'):>8}"
              f"{sg['best']:>7.1f}{100 * moe_gfs / sg['best']:>6.0f}%"
              f"{sg['moe_py']:>7.1f}{fmt(sg.get('numpy'), '.1f'):>7}{fmt(sg.get('torch'), '.1f'):>7}"
              f"{r['fma_peak']:>6.0f}{100 * moe_gfs / r['fma_peak']:>5.0f}%"
              f"{rss_str(r['moe_rss']):>13}{rss_str(r.get('torch_rss')):>14}"
              f"{fmt(r['foreign'], '.2f'):>6}")
    print("GF/s = GFLOP/s of the expert + router GEMMs done (18*T*k*D*F + 6*T*D*E per step).")
    print("x torch = torch time / moe_py time (>1: moe_py faster); the two are timed interleaved.")
    print("best = the best GFLOP/s of one [T*k,D]x[D,F] SGEMM on the same threads among moe_py's")
    print("own GEMM path (ours), NumPy's @ (numpy) and torch.mm (t.mm), all measured in this run;")
    print("%best = moe GF/s / best. peak = FP32 FMA peak of a measured FMA loop on the same threads.")
    print("RSS = peak RSS of the process during one untimed step (high-water mark reset before it)")
    print("and, in brackets, its rise over the RSS just before (freed heap trimmed first).")
    print("other = average CPU cores busy with OTHER processes while the row ran (should be ~0;")
    print("anything above ~0.1 makes that row's multi-thread numbers unreliable).")
    busy = [r for r in rows if r["foreign"] > 0.1]
    if busy:
        print(f"WARNING: {len(busy)} row(s) ran while other processes used the CPUs; re-run on an "
              "idle machine.")
    spreads = [r["moe_spread"] for r in rows]
    spreads += [r["torch_spread"] for r in rows if "torch_spread" in r]
    print(f"run-to-run spread (max-min)/median: up to {100 * max(spreads):.0f}%")

    checks = [r for r in rows if "check" in r]
    if checks:
        print()
        print("== correctness: moe_py vs torch, same weights and inputs ==")
        for r in checks:
            c = r["check"]
            print(f"{shape_str(r['shape']):<24} max|dy|: y {c['y']:.2e} (of max {c['y_scale']:.2f})"
                  f"  dx {c['dx']:.2e} (of max {c['dx_scale']:.2f})"
                  f"  grads max rel {c['dw']:.2e}")

    if breakdown_on:
        print()
        print("== moe_py breakdown: median ms per kernel (forward + backward) ==")
        cols = [SHORT[k] for k in KERNELS] + ["python", "total"]
        hdr = f"{'shape':<24}{'thr':>4}" + "".join(f"{c:>9}" for c in cols) + \
            f"{'rt+disp+comb':>13}{'exp fwd GF/s':>13}{'exp bwd GF/s':>13}"
        print(hdr)
        print("-" * len(hdr))
        for r in rows:
            b = r["breakdown"]
            fl = layer_flops(r["shape"])
            over = sum(b[k] for k in OVERHEAD_KERNELS)
            print(f"{shape_str(r['shape']):<24}{r['threads']:>4}"
                  + "".join(f"{b[k] * 1e3:>9.2f}" for k in KERNELS)
                  + f"{b['python'] * 1e3:>9.2f}{b['total'] * 1e3:>9.1f}"
                  + f"{100 * over / b['total']:>12.1f}%"
                  + f"{fl['experts_fwd'] / b['experts_forward_f32'] / 1e9:>13.1f}"
                  + f"{fl['experts_bwd'] / b['experts_backward_f32'] / 1e9:>13.1f}")
        print("rt = router (gate GEMM, softmax, top-k, losses), plan/gather = dispatch,")
        print("comb = combine,", end=" ")
        print("exp = expert FFN kernels; python = the rest of the step (argument")
        print("checks incl. the isfinite scans of x, dy and the weights, allocation, glue).")
        print("rt+disp+comb = (rt_fwd+plan+gather+comb_fwd+comb_bwd+gath_bwd+rt_bwd) / total.")

    # targets
    print()
    print("== targets ==")
    by = {(r["shape"], r["threads"]): r for r in rows}
    tmax = max(threads)
    largest = sorted(shapes, key=lambda s: layer_flops(s)["total"], reverse=True)
    big_flops = layer_flops(largest[0])["total"]
    # shapes within 10% of the largest FLOP count count as "the largest"
    top = [s for s in largest if layer_flops(s)["total"] >= 0.9 * big_flops]
    two_largest = largest[:2]
    if have_torch:
        for n, goal in sorted({1: 1.3, 2: 2.0}.items()):
            if n not in threads:
                continue
            g = geomean([by[(s, n)]["torch_s"] / by[(s, n)]["moe_s"] for s in shapes])
            # what the ratio would be if moe_py ran every GEMM at the best same-run SGEMM rate
            ceiling = geomean([by[(s, n)]["sgemm"]["best"] * by[(s, n)]["torch_s"] / by[(s, n)]["gflop"]
                               for s in shapes])
            print(f"vs PyTorch eager, geomean over {len(shapes)} shapes at {n} thread(s): {g:.2f}x "
                  f"(target >= {goal}x: {'MET' if g >= goal else 'NOT met'}; "
                  f"ceiling at 100% of the best SGEMM: {ceiling:.2f}x)")
    else:
        print("vs PyTorch: skipped (torch not available)")

    def pct_best(s):
        r = by[(s, tmax)]
        return 100 * r["gflop"] / r["moe_s"] / r["sgemm"]["best"]
    for s in two_largest:
        print(f"% of the best same-run SGEMM at {shape_str(s)}, {tmax} threads: {pct_best(s):.0f}% "
              f"(target >= 80%: {'MET' if pct_best(s) >= 80 else 'NOT met'})")
    if FINE_GRAINED in shapes:
        p = pct_best(FINE_GRAINED)
        print(f"% of the best same-run SGEMM at the fine-grained {shape_str(FINE_GRAINED)}, "
              f"{tmax} threads: {p:.0f}% (target >= 60%: {'MET' if p >= 60 else 'NOT met'})")
    if 1 in threads and tmax > 1:
        for s in top:
            sp = by[(s, 1)]["moe_s"] / by[(s, tmax)]["moe_s"]
            print(f"speed-up 1 -> {tmax} threads at {shape_str(s)}: {sp:.2f}x "
                  f"(target >= 1.8x at 2 threads: {'MET' if sp >= 1.8 else 'NOT met'})")
    if breakdown_on:
        for s in top:
            b = by[(s, tmax)]["breakdown"]
            share = 100 * sum(b[k] for k in OVERHEAD_KERNELS) / b["total"]
            with_py = 100 * (sum(b[k] for k in OVERHEAD_KERNELS) + b["python"]) / b["total"]
            print(f"routing+dispatch+combine at {shape_str(s)}, {tmax} threads: {share:.1f}% "
                  f"of the layer ({with_py:.1f}% with the Python glue) "
                  f"(target <= 10%: {'MET' if share <= 10 else 'NOT met'})")


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
    ap.add_argument("--shapes", type=parse_shape, nargs="+", default=DEFAULT_SHAPES,
                    metavar="T,D,F,E,k")
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

    torch_mod = None
    torch_note = "skipped (--no-torch)"
    if not args.no_torch:
        try:
            import torch as torch_mod  # noqa: F811
            torch_note = f"{torch_mod.__version__}"
        except ImportError:
            torch_note = "not installed: torch columns skipped (pip install torch==2.13.0)"
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
    rows = []
    for shape in args.shapes:
        rows.extend(bench_shape(shape, args.threads, args, torch_mod, np_blas, peaks))
    costs = router_costs(args.router_shape, args.threads, args) if args.router_costs else []
    print_report(rows, args.shapes, args.threads, torch_mod is not None, args.breakdown)
    if costs:
        print_router_costs(costs, args.router_shape)
    print()
    print(f"peak RSS of the whole run (getrusage): {whole_run_peak_rss_mb():.0f} MB; "
          f"wall time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
