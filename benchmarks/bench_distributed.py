"""Expert parallelism over MPI: where one step's time goes, and what the wire carries.

    .venv/bin/python benchmarks/bench_distributed.py                 # P = 1 and 2, ~30 s
    .venv/bin/python benchmarks/bench_distributed.py --ranks 1 2 --shape 4096 256 512 8 2 --repeats 10

It starts `mpiexec -n P` (one OpenMP thread per rank) for each P, and prints:
  1. one ExpertParallelMoELayer forward + backward on a global batch of T tokens (each rank
     T/P), float32: the median time of each phase (the slowest rank's, since the others
     wait for it in the next collective) and of the whole step; the bytes sent per step;
  2. the default `train` model (synthetic corpus, same sizes): tokens/s of whole
     expert-parallel training steps (data parallel dense parts, gradient all-reduce);
  3. the all-to-all cost model of docs/design.md ("Expert parallelism") with this run's
     numbers: bytes per step by P, and the bandwidth a cluster would need to keep the
     all-to-alls under 30 % of a layer step.
Nothing is asserted; the machine is shared, so the report starts with its load average.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

PHASES = [("route", "route (router, global stats, capacity)"),
          ("dispatch", "dispatch (group rows by expert)"), ("a2a_out", "all-to-all out"),
          ("experts", "experts"), ("a2a_back", "all-to-all back"), ("combine", "combine"),
          ("combine_bwd", "combine backward"), ("a2a_out_bwd", "all-to-all out (dy)"),
          ("experts_bwd", "experts backward"), ("a2a_back_bwd", "all-to-all back (dx)"),
          ("router_bwd", "un-dispatch + router backward"), ("allreduce", "all-reduce (router grad)")]
COMM = ("a2a_out", "a2a_back", "a2a_out_bwd", "a2a_back_bwd", "allreduce")


# ---- the worker: runs under mpiexec ---------------------------------------------------

def worker(args) -> None:
    from mpi4py import MPI
    import moe_py
    from moe_py.distributed import ExpertParallelMoELayer
    moe_py.set_num_threads(1)
    comm = MPI.COMM_WORLD
    P, rank = comm.Get_size(), comm.Get_rank()
    T, D, F, E, k = args.shape
    cfg = moe_py.MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=k, seed=0)
    layer = ExpertParallelMoELayer(cfg, comm)
    rng = np.random.default_rng(0)  # the same global batch at every P
    x = rng.standard_normal((T, D)).astype(np.float32)
    dy = rng.standard_normal((T, D)).astype(np.float32)
    rows = np.array_split(np.arange(T), P)[rank]
    xl, dyl = x[rows], dy[rows]
    steps, phases, sent = [], [], []
    for i in range(args.repeats + 2):  # two warm-up steps
        layer.zero_grad()
        layer.reset_timings()
        b0 = layer.bytes_sent
        comm.Barrier()
        t0 = time.perf_counter()
        layer(xl)
        layer.backward(dyl)
        comm.Barrier()
        t1 = time.perf_counter()
        mine = np.array([layer.timings[p] for p, _ in PHASES] + [layer.bytes_sent - b0], np.float64)
        every = np.empty((P, len(mine)))
        comm.Allgather(mine, every)
        if i >= 2:
            steps.append(t1 - t0)
            phases.append(every[:, :-1].max(axis=0))
            sent.append(every[:, -1].sum())
    out = {"P": P, "step_s": float(np.median(steps)),
           "phases_s": dict(zip([p for p, _ in PHASES], np.median(np.array(phases), axis=0).tolist())),
           "bytes_per_step": float(np.median(sent))}
    if args.train_steps:
        out["train"] = train_rate(comm, args.train_steps)
    if rank == 0:
        with open(args.worker, "w") as f:
            json.dump(out, f)


def train_rate(comm, n_steps: int) -> dict:
    """tokens/s of whole expert-parallel steps of the default model (synthetic corpus)."""
    from moe_py.cli import build_parser, configs_from_args
    from moe_py.data import BatchSampler, load_corpus
    from moe_py.distributed import ExpertParallel
    from moe_py.models import TransformerLM
    from moe_py.optim import AdamW
    from moe_py.train import train_step
    args = build_parser().parse_args(["train", "--corpus", "synthetic"])
    model_cfg, train_cfg = configs_from_args(args, dense=False)
    corpus = load_corpus("synthetic", split_seed=0)
    sampler = BatchSampler(corpus.train, train_cfg.batch_size, train_cfg.seq_len, 0)
    model = TransformerLM(model_cfg)
    parallel = ExpertParallel(comm)
    parallel.prepare(model)
    optim = AdamW(model.named_parameters())
    # time the dense gradients' all-reduce inside train_step
    grad_sync = {"s": 0.0}
    plain = parallel.sync_grads

    def timed_sync(model):
        t = time.perf_counter()
        plain(model)
        grad_sync["s"] += time.perf_counter() - t
    parallel.sync_grads = timed_sync
    times, comm_s, tokens = [], [], 0
    for step in range(n_steps + 1):
        b = sampler.batch(step)
        for layer in model.moe_layers:
            layer.reset_timings()
        grad_sync["s"] = 0.0
        comm.Barrier()
        t0 = time.perf_counter()
        m = train_step(model, [b], optim, 1e-3, train_cfg, parallel)
        comm.Barrier()
        if step:  # the first step warms up
            times.append(time.perf_counter() - t0)
            comm_s.append(grad_sync["s"] + sum(layer.timings[c] for layer in model.moe_layers
                                               for c in COMM))
            tokens = m["tokens"]
    step_s = float(np.median(times))
    return {"tokens_per_step": tokens, "step_s": step_s, "tokens_per_s": tokens / step_s,
            "comm_share": float(np.median(np.array(comm_s) / np.array(times)))}


# ---- the launcher ---------------------------------------------------------------------

def run(P: int, args) -> dict:
    here = os.path.abspath(__file__)
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "out.json")
        cmd = [mpiexec, "-n", str(P), sys.executable, here, "--worker", out, "--repeats",
               str(args.repeats), "--train-steps", str(args.train_steps), "--shape",
               *map(str, args.shape)]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"mpiexec -n {P} failed:\n{proc.stdout}\n{proc.stderr}")
        with open(out) as f:
            return json.load(f)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--shape", type=int, nargs=5, default=[4096, 256, 512, 8, 2],
                   metavar=("T", "D", "F", "E", "K"), help="global tokens, d_model, d_ff, experts, top_k")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--train-steps", type=int, default=6, help="0: skip the training part")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    from common import machine_line  # imports moe_py, which the workers import only after mpi4py
    T, D, F, E, k = args.shape
    print(f"{machine_line()}; {os.cpu_count()} cores; load average before: {os.getloadavg()[0]:.2f}")
    print(f"one thread per rank; layer T={T} (global), d_model={D}, d_ff={F}, E={E}, k={k}, "
          f"float32, swiglu; {args.repeats} steps, medians")
    res = {P: run(P, args) for P in args.ranks}
    print(f"load average after: {os.getloadavg()[0]:.2f}\n")

    print(f"{'phase (ms, slowest rank)':<40}" + "".join(f"{'P=' + str(P):>10}" for P in res))
    for key, name in PHASES:
        print(f"{name:<40}" + "".join(f"{1e3 * r['phases_s'][key]:>10.2f}" for r in res.values()))
    print(f"{'step (fwd + bwd, wall)':<40}" + "".join(f"{1e3 * r['step_s']:>10.2f}" for r in res.values()))
    print(f"{'  of which communication':<40}" + "".join(
        f"{100 * sum(r['phases_s'][c] for c in COMM) / r['step_s']:>9.1f}%" for r in res.values()))
    print(f"{'bytes sent per step (all ranks, MB)':<40}" + "".join(
        f"{r['bytes_per_step'] / 1e6:>10.2f}" for r in res.values()))
    print(f"{'  cost model, uniform routing (MB)':<40}" + "".join(
        f"{a2a_bytes(T, D, k, P, 4) / 1e6:>10.2f}" for P in res))
    if args.train_steps:
        print(f"\ndefault train model, synthetic corpus, {res[args.ranks[0]]['train']['tokens_per_step']} "
              "tokens per step:")
        for P, r in res.items():
            print(f"  P={P}: {r['train']['tokens_per_s']:,.0f} tokens/s ({1e3 * r['train']['step_s']:.1f} ms/step; "
                  f"all-to-alls and all-reduces on rank 0: {100 * r['train']['comm_share']:.0f} % of it)")
    cost_model(res, args)


def a2a_bytes(T: int, D: int, k: int, P: int, itemsize: int) -> float:
    """All ranks' bytes per layer step under uniform routing without drops: each of the
    T*k assignments goes to another rank with probability (P-1)/P, and its row crosses
    the wire 4 times (x out, y back, dy out, dx back)."""
    return 4.0 * T * k * D * itemsize * (P - 1) / P


def cost_model(res: dict, args) -> None:
    T, D, F, E, k = args.shape
    base = res.get(1)
    if base is None:
        return
    compute = base["step_s"]  # one rank doing the whole layer: no communication at all
    expert_flops = 18.0 * T * k * D * F  # swiglu: 3 GEMMs forward, 6 backward, 2*D*F per row each
    gflops = expert_flops / (base["phases_s"]["experts"] + base["phases_s"]["experts_bwd"]) / 1e9
    print(f"\ncost model (docs/design.md): this core ran the experts at {gflops:.0f} GFLOP/s and the "
          f"whole layer step in {1e3 * compute:.1f} ms at P=1.")
    print("All-to-all bandwidth per rank (GB/s, each direction) needed to keep communication under "
          "30 % of a layer step,\nif compute splits perfectly over P ranks, each `speed` times this core:")
    print(f"{'speed':>8}" + "".join(f"{'P=' + str(P):>9}" for P in (2, 8, 64)))
    for speed in (1, 10, 100):
        need = [a2a_bytes(T, D, k, P, 4) / P / (0.3 / 0.7 * compute / P / speed) / 1e9 for P in (2, 8, 64)]
        print(f"{str(speed) + 'x':>8}" + "".join(f"{v:>9.2f}" for v in need))


if __name__ == "__main__":
    main()
