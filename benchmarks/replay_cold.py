"""Why the MoE block is slower inside a model than called alone: one experts_backward call
captured inside bench_torch.py's model (moe_py.torch.MoE blocks, default model sizes), then
replayed on its own: warm (repeated back to back), after sweeping 64 MB and 600 MB of other
memory through the caches, and after such a sweep followed by reading the call's own
arrays back in. Medians in ms, with the call's median time inside the model.

    .venv/bin/python benchmarks/replay_cold.py [--threads 2] [--repeats 9]
"""
import argparse
import time

import numpy as np
import torch

from common import default_model_and_batches, machine_line, set_threads
from moe_py import kernels
from moe_py.torch import MoE
from torch_reference import TorchLM, lm_train_step

KERNEL = "experts_backward_f32"


def capture(steps: int):
    """The arguments (copied) and inside-the-model times of experts_backward_f32 calls."""
    model_cfg, _, batches = default_model_and_batches(2 + steps)
    torch.manual_seed(0)
    step = lm_train_step(TorchLM(model_cfg, lambda: MoE(model_cfg.moe)))
    for b in batches[:2]:
        step(b)
    calls, times = [], []

    def recording(name, real):
        def record(**kw):
            t = time.perf_counter()
            out = real(**kw)
            times.append(time.perf_counter() - t)
            calls.append({k: v.copy() if isinstance(v, np.ndarray) else v for k, v in kw.items()})
            return out
        return record
    with kernels.wrapped(recording, KERNEL):
        for b in batches[2:]:
            step(b)
    return calls, times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    set_threads(args.threads, torch)
    print(machine_line())
    calls, inside = capture(4)
    call = calls[0]
    memory = np.zeros((600 << 20) // 4, np.float32)
    arrays = [v for v in call.values() if isinstance(v, np.ndarray)]

    def sweep(mb):  # read and write mb MB of other memory, evicting the call's data
        memory[: (mb << 20) // 4] += 1

    def sweep_then_read():
        sweep(600)
        for a in arrays:
            a.sum()
    cases = {
        "warm (back to back)": lambda: None,
        "after a 64 MB sweep": lambda: sweep(64),
        "after a 600 MB sweep": lambda: sweep(600),
        "after a 600 MB sweep, then reading its arrays": sweep_then_read,
    }
    times = {name: [] for name in cases}
    experts_backward = kernels.kernel(KERNEL)
    experts_backward(**call)
    for _ in range(args.repeats):
        for name, before in cases.items():
            before()
            t = time.perf_counter()
            experts_backward(**call)
            times[name].append(time.perf_counter() - t)
    print(f"{KERNEL} at N={call['xs'].shape[0]} rows, d_model {call['xs'].shape[1]}, "
          f"{len(call['offsets']) - 1} experts, {args.threads} thread(s); median ms")
    label = "inside the model (every layer's calls)"
    print(f"  {label:<63s}{1e3 * np.median(inside):6.2f}")
    for name, ts in times.items():
        print(f"  {'replayed alone, ' + name:<63s}{1e3 * np.median(ts):6.2f}")


if __name__ == "__main__":
    main()
