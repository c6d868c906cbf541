"""A transformers Qwen3-MoE-shaped causal LM trained with experts_implementation="moe_py"
against transformers' own CPU experts backends (eager, batched_mm, grouped_mm): the same
weights, batch and threads, one training step (forward + loss + backward + an SGD update) per
side, sides interleaved, medians. The update makes each step pay what a backend does once
per parameter update (moe_py's float32 copies and bfloat16 packs of bfloat16 weights), as
training does. Routing, attention, norms and the LM head are transformers' in every
side; only the experts differ. A fifth side replaces the expert FFNs by a product with the
weights' sum (no_experts): its time is the rest of the step, and each side's excess over it
the experts' forward + backward.

Each side trains in a process of its own, and the parent steps them in turn. In one process
(--same-process, as this script ran before) a side's step runs on whatever the sides before
it left behind: in bfloat16, grouped_mm right after eager's same-shaped products (most
likely on oneDNN kernels eager had made for the step's expert batch sizes) was charged much
less than it costs a user who trains with it alone (benchmarks/README.md has both).

    .venv/bin/python benchmarks/bench_hf_experts.py [--threads 2] [--dtypes float32 bfloat16]

--profile N then runs N more moe_py steps per dtype under cProfile and prints where they go
(moe_py's kernels, the conversions, transformers' own code): not interleaved, not timed.

batched_mm gathers every routed row's weight matrices (S x 3 F d values for S = tokens x k);
it is skipped, saying so, when that would not fit in --max-gather-gib.
"""
import argparse
import copy
import cProfile
import multiprocessing
import os
import pstats
import resource
import statistics
import tempfile
import time

import torch
import transformers

import moe_py.hf  # noqa: F401  (registers experts_implementation="moe_py")
from transformers.integrations.moe import ExpertsInterface
from common import (ForeignLoad, NumpyBlasThreads, best_sgemm, interleaved_times, machine_line, set_threads,
                    spread)

BACKENDS = ("eager", "batched_mm", "grouped_mm", "moe_py", "no_experts")


def no_experts_forward(experts, hidden_states, top_k_index, top_k_weights):
    """The floor: everything but the expert FFNs (the output still depends on the weights, so
    the router's backward runs)."""
    return hidden_states * top_k_weights.sum(-1, keepdim=True)


ExpertsInterface.register("no_experts", no_experts_forward)


def model_config(a) -> transformers.Qwen3MoeConfig:
    return transformers.Qwen3MoeConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.width, moe_intermediate_size=a.width,
        num_hidden_layers=a.layers, num_attention_heads=a.hidden // 64, num_key_value_heads=a.hidden // 128,
        head_dim=64, num_experts=a.experts, num_experts_per_tok=a.top_k, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[])


def gather_gib(a, dtype) -> float:
    rows = a.batch * a.seq * a.top_k
    return rows * 3 * a.width * a.hidden * torch.finfo(dtype).bits / 8 / 2**30


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--width", type=int, default=1024, help="expert width (moe_intermediate_size)")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed rounds first (a side's first steps make its kernels for new shapes)")
    p.add_argument("--max-gather-gib", type=float, default=4.0)
    p.add_argument("--same-process", action="store_true",
                   help="every side in this process, sharing its caches (see above), for comparison")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="then N moe_py steps under cProfile per dtype (top entries by own time)")
    a = p.parse_args()
    set_threads(a.threads, torch)
    print(machine_line())
    print(f"transformers {transformers.__version__}, torch {torch.__version__}; Qwen3-MoE-shaped: hidden "
          f"{a.hidden}, {a.experts} experts of width {a.width}, top-{a.top_k}, {a.layers} layers, batch "
          f"{a.batch} x {a.seq}, {a.threads} threads; one training step with an SGD update, median of {a.repeats} interleaved after {a.warmup} untimed, "
          f"{'all sides in one process' if a.same_process else 'each side in its own process'}")
    cfg = model_config(a)
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), experts_implementation="eager")
    ids = torch.randint(0, a.vocab, (a.batch, a.seq))
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "weights.pt")
        torch.save(base.state_dict(), weights)
        del base
        for dname in a.dtypes:
            dtype = getattr(torch, dname)
            names = []
            for name in BACKENDS:
                if name == "batched_mm" and gather_gib(a, dtype) > a.max_gather_gib:
                    print(f"  {dname} batched_mm: skipped (its weight gather needs {gather_gib(a, dtype):.1f} GiB)")
                    continue
                names.append(name)
            load = ForeignLoad()
            sides = same_process_times if a.same_process else interleaved_side_times
            times, workers_cpu = sides(names, dname, a, weights, ids)
            busy = load.cores(workers_cpu)
            report(a, dname, times, busy)
            if a.profile:
                profile_steps(step(side_model(a, "moe_py", dname, weights)), ids, a.profile, dname)


def side_model(a, name: str, dname: str, weights: str):
    m = transformers.AutoModelForCausalLM.from_config(model_config(a), experts_implementation=name)
    m.load_state_dict(torch.load(weights))
    return m.to(getattr(torch, dname))


def step(m):
    opt = torch.optim.SGD(m.parameters(), lr=1e-3)

    def run(ids):
        opt.zero_grad(set_to_none=True)
        m(ids, labels=ids).loss.backward()
        opt.step()
    return run


def side_process(conn, a, name: str, dname: str, weights: str, ids) -> None:
    """One side in its own process: a step per message, answered when done; at None, the
    process's CPU seconds, and it ends."""
    set_threads(a.threads, torch)
    run = step(side_model(a, name, dname, weights))
    conn.send("ready")
    while conn.recv() is not None:
        run(ids)
        conn.send("done")
    ru = resource.getrusage(resource.RUSAGE_SELF)
    conn.send(ru.ru_utime + ru.ru_stime)


# between two sides' steps: the OpenMP threads of the side that just stepped spin a little
# while before they sleep, and must not run into the next side's step
PAUSE_S = 0.2


def interleaved_side_times(names, dname: str, a, weights: str, ids):
    """interleaved_times of the sides' steps, each side in its own process (a step timed
    here from the message to the answer: the pipe adds well under a millisecond); and the
    sides' CPU seconds."""
    ctx = multiprocessing.get_context("spawn")
    sides = {}
    for name in names:  # built one at a time: no side's setup overlaps another's
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=side_process, args=(child, a, name, dname, weights, ids), daemon=True)
        proc.start()
        if parent.recv() != "ready":
            raise RuntimeError(f"{name}: the side's process failed to start")
        sides[name] = (proc, parent)
    def stepped(conn):
        def run(i):
            conn.send(i)
            conn.recv()
        return run
    times = interleaved_times({name: stepped(conn) for name, (_, conn) in sides.items()}, a.repeats,
                              a.warmup, befores={name: lambda: time.sleep(PAUSE_S) for name in sides})
    cpu = 0.0
    for proc, conn in sides.values():
        conn.send(None)
        cpu += conn.recv()
        proc.join()
    return times, cpu


def same_process_times(names, dname: str, a, weights: str, ids):
    """interleaved_side_times with every side in this process (--same-process)."""
    runs = {name: step(side_model(a, name, dname, weights)) for name in names}
    return interleaved_times({name: lambda _i, run=run: run(ids) for name, run in runs.items()},
                             a.repeats, a.warmup), 0.0


def report(a, dname: str, times, busy: float) -> None:
    med = {n: statistics.median(t) for n, t in times.items()}
    floor = med.pop("no_experts")
    fastest = min((n for n in med if n != "moe_py"), key=med.get)
    for n, t in med.items():
        print(f"  {dname} {n:>10}: {t:7.3f} s/step (spread {spread(times[n]):.0%}); "
              f"experts {t - floor:6.3f} s")
    print(f"  {dname} without experts: {floor:.3f} s/step (the rest of the model)")
    print(f"  {dname}: moe_py is {med[fastest] / med['moe_py']:.2f}x the fastest transformers backend "
          f"({fastest}) per step, {(med[fastest] - floor) / (med['moe_py'] - floor):.2f}x on the "
          f"experts' share; other load {busy:.2f} cores")
    if dname == "float32":
        gemm_bound(a, {n: t - floor for n, t in med.items()}, fastest, floor)


def profile_steps(run, ids, n: int, dname: str) -> None:
    """A warm-up call of run, then n under cProfile: the 15 entries with the most own time,
    per step."""
    run(ids)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        run(ids)
    prof.disable()
    stats = pstats.Stats(prof).sort_stats("tottime")
    print(f"  {dname} moe_py, own time per step (ms) over {n} profiled steps:")
    top = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:15]
    for (path, line, fn), (_, calls, own, _, _) in top:
        where = fn if path == "~" else f"{path.rsplit('/', 1)[-1]}:{line}({fn})"
        print(f"    {own / n * 1e3:8.1f}  {calls / n:5.0f} calls  {where}")


def gemm_bound(a, experts_s, fastest, floor) -> None:
    """The experts' GEMM rate per side against the best same-run SGEMM at the mean expert
    batch: the time no implementation beats, so the largest ratio any could reach."""
    rows = a.batch * a.seq * a.top_k
    flops = 9 * 2.0 * rows * a.hidden * a.width * a.layers  # 3 GEMMs forward, 6 backward
    rate = best_sgemm(rows // a.experts, a.hidden, a.width, a.threads, torch, NumpyBlasThreads())
    bound = flops / rate["best"] / 1e9
    print("  float32 experts' GEMM rate: " + ", ".join(
        f"{n} {flops / t / 1e9:.0f} GFLOP/s" for n, t in experts_s.items()) +
        f"; best same-run SGEMM [{rows // a.experts}x{a.hidden}]x[{a.hidden}x{a.width}] "
        f"{rate['best']:.0f} GFLOP/s ({max(rate, key=lambda n: rate[n] if n != 'best' else 0)})")
    print(f"  float32: at that SGEMM rate the experts would take {bound:.3f} s: at most "
          f"{experts_s[fastest] / bound:.2f}x {fastest} on the experts' share, "
          f"{(experts_s[fastest] + floor) / (bound + floor):.2f}x per step")


if __name__ == "__main__":
    main()
