"""OMP_NUM_THREADS from the environment: clamped before libgomp reads it, never a crash."""
import os
import subprocess
import sys
import threading

import pytest

import moe_py
from moe_py import _kernels
from moe_py._omp_env import MAX_THREADS, clamp_omp_num_threads

CALL = ("import numpy as np, moe_py; "
        "layer = moe_py.MoELayer(moe_py.MoEConfig(d_model=16, d_ff=16, num_experts=4, top_k=2)); "
        "out = layer(np.ones((1, 4, 16), np.float32)); layer.backward(np.ones_like(out.y)); "
        "print(moe_py.get_num_threads())")


@pytest.mark.slow  # 1024 OpenMP threads: not under the sanitizers' memory overhead
@pytest.mark.parametrize("value", ["200000", "40000"])
def test_a_huge_omp_num_threads_is_clamped_not_a_crash(value):
    env = dict(os.environ, OMP_NUM_THREADS=value)
    run = subprocess.run([sys.executable, "-c", CALL], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[-1] == str(MAX_THREADS)
    assert f"OMP_NUM_THREADS={value}: more than {MAX_THREADS} threads" in run.stderr


def test_the_clamp_reads_lists_and_leaves_other_text_to_libgomp():
    env = {"OMP_NUM_THREADS": "5000,2"}
    with pytest.warns(RuntimeWarning, match="OMP_NUM_THREADS=5000,2"):
        clamp_omp_num_threads(env)
    assert env["OMP_NUM_THREADS"] == f"{MAX_THREADS},2"
    for text in ("4", "abc", "", "2,3"):
        env = {"OMP_NUM_THREADS": text}
        clamp_omp_num_threads(env)
        assert env["OMP_NUM_THREADS"] == text


# ---- set_num_threads: bounds, and the count reaches other Python threads ----

@pytest.mark.parametrize("n", [0, 200_000, 2**31, True, 2.0])
def test_absurd_thread_counts_are_refused(n):
    with pytest.raises(ValueError, match="n: expected"):
        moe_py.set_num_threads(n)


def test_thread_count_reaches_other_python_threads():
    moe_py.set_num_threads(3)
    seen = {}

    def work():  # fma_peak's FLOP count is proportional to the team size that ran it
        seen["flops"], _ = _kernels.fma_peak(iters=1)
    t = threading.Thread(target=work)
    t.start()
    t.join()
    here, _ = _kernels.fma_peak(iters=1)
    moe_py.set_num_threads(1)
    single, _ = _kernels.fma_peak(iters=1)
    assert seen["flops"] == here == 3 * single
