"""Bitwise independence of the OpenMP thread count, checked in fresh processes."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
from typing import Callable, Sequence

import numpy as np

_CHILD = r"""
import pickle, sys
import numpy as np
import moe_py
n, fn_file, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
moe_py.set_num_threads(n)
with open(fn_file, "rb") as f:
    fn = pickle.load(f)
res = fn()
if isinstance(res, dict):
    arrays = {str(k): np.asarray(v) for k, v in res.items()}
elif isinstance(res, (list, tuple)):
    arrays = {str(i): np.asarray(v) for i, v in enumerate(res)}
else:
    arrays = {"0": np.asarray(res)}
np.savez(out, **arrays)
"""


def assert_thread_invariant(fn: Callable[[], object], threads: Sequence[int] = (1, 2, 3),
                            timeout: float = 600) -> None:
    """Run fn() in a new process at each OpenMP thread count and require bitwise the same
    results. fn must be picklable by reference (a module-level function) and return an
    array, a list/tuple of arrays or a dict of arrays."""
    with tempfile.TemporaryDirectory() as tmp:
        fn_file = os.path.join(tmp, "fn.pkl")
        with open(fn_file, "wb") as f:
            pickle.dump(fn, f)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([p for p in sys.path if p]))
        results = []
        for n in threads:
            out = os.path.join(tmp, f"t{n}.npz")
            env["OMP_NUM_THREADS"] = str(n)
            r = subprocess.run([sys.executable, "-c", _CHILD, str(n), fn_file, out], env=env,
                               capture_output=True, text=True, timeout=timeout)
            if r.returncode != 0:
                raise RuntimeError(f"fn failed at {n} thread(s):\n{r.stderr[-2000:]}")
            with np.load(out) as z:
                results.append({k: z[k] for k in z.files})
    for n, res in zip(threads[1:], results[1:]):
        diff = [k for k in results[0] if not np.array_equal(results[0][k], res[k])]
        if set(res) != set(results[0]) or diff:
            raise AssertionError(f"results differ between {threads[0]} and {n} threads: "
                                 f"{diff[:5] or sorted(set(res) ^ set(results[0]))}")
