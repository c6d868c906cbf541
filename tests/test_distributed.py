"""Expert parallelism under a real `mpiexec -n 2` (moe_py.distributed) against the
single-process layer and trainer, which this process runs itself on the same global batch.

The workers in tests/mpi_workers/ build their inputs from the same few numbers
(tests/mpi_workers/cases.py) and write what each rank computed; nothing the reference
computes crosses over. Without mpi4py/mpiexec these tests skip, except under CI=true,
where the MPI extra is installed and a missing or broken MPI must fail the run.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from moe_py.layer import MoELayer

HERE = os.path.dirname(os.path.abspath(__file__))
WORKERS = os.path.join(HERE, "mpi_workers")
sys.path.insert(0, WORKERS)
from cases import layer_setup, train_setup  # noqa: E402


def _mpiexec() -> str:
    problem = None
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        problem = "mpi4py is not installed (pip install 'moe_py[mpi]')"
    local = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    exe = local if os.path.exists(local) else shutil.which("mpiexec")
    if problem is None and exe is None:
        problem = "no mpiexec beside the interpreter or on PATH (pip install mpich)"
    if problem:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI must run the MPI tests, but {problem}")
        pytest.skip(problem)
    return exe


def run_mpi(n: int, args, timeout: float = 240, check: bool = True) -> subprocess.CompletedProcess:
    """`mpiexec -n n python ARGS` with one OpenMP thread per rank (2 cores, 2 ranks)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=WORKERS)
    proc = subprocess.run([_mpiexec(), "-n", str(n), sys.executable, *args], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"mpiexec -n {n} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def mpi_ok():
    """mpiexec starts 2 ranks that see each other (a plain failure, never a skip, once
    mpi4py and mpiexec are there)."""
    proc = run_mpi(2, ["-c", "from mpi4py import MPI; c = MPI.COMM_WORLD; "
                             "print(c.allreduce(c.Get_rank()), c.Get_size())"], timeout=60)
    assert proc.stdout.split() == ["1", "2", "1", "2"], proc.stdout


# ---- one layer: forward and backward against MoELayer on the global batch --------------

def _cfg(**kw):
    base = dict(d_model=16, d_ff=24, num_experts=4, top_k=2, dtype="float64", seed=3,
                z_loss_coef=0.01, entropy_coef=0.02)
    base.update(kw)
    return base


LAYER_CASES = {
    # uneven token counts, padding, every loss on
    "dropless": dict(cfg=_cfg(), tokens=74, splits=[0, 30], padding=0.2, seed=0),
    # 4 experts per rank (rows reordered expert-major), capacity drops by position
    "capacity_position": dict(cfg=_cfg(num_experts=8, capacity_factor=0.7), tokens=64,
                              splits=[0, 40], padding=0.1, seed=1),
    "capacity_probs": dict(cfg=_cfg(num_experts=8, capacity_factor=0.6, drop_policy="probs"),
                           tokens=50, splits=[0, 21], padding=0.1, seed=2),
    # expert 2 gets no token on any rank; k = 1, gelu, capacity on
    "starved_expert": dict(cfg=_cfg(top_k=1, activation="gelu", capacity_factor=1.0),
                           tokens=40, splits=[0, 20], seed=3, starve=2),
    # rank 1 holds only padding (R = 0 there) and still serves its experts
    "rank_all_padding": dict(cfg=_cfg(capacity_factor=1.25), tokens=40, splits=[0, 25],
                             padded_ranges=[[25, 40]], seed=4),
    # rank 1 has no tokens at all; aux_weight scales the aux gradient
    "rank_empty": dict(cfg=_cfg(), tokens=30, splits=[0, 30], seed=5, aux_weight=0.25),
    # no real token anywhere: every loss 0, nothing to send
    "all_padding": dict(cfg=_cfg(), tokens=12, splits=[0, 6], padding=1.1, seed=6),
    "eval_straight_through": dict(cfg=_cfg(straight_through=True, normalize_topk=False),
                                  tokens=33, splits=[0, 17], seed=7, training=False),
    "float32": dict(cfg=_cfg(dtype="float32", capacity_factor=1.0), tokens=64, splits=[0, 32],
                    padding=0.1, seed=8),
}

BITWISE_ROUTER = ("topk_indices", "topk_weights", "dropped", "router_probs", "router_probs_clean",
                  "router_logits", "entropy", "tokens_per_expert")


@pytest.fixture(scope="module")
def layer_results(mpi_ok, tmp_path_factory):
    d = tmp_path_factory.mktemp("mpi_layer")
    (d / "cases.json").write_text(json.dumps(LAYER_CASES))
    run_mpi(2, [os.path.join(WORKERS, "layer_cases.py"), str(d / "cases.json"), str(d)])
    return d


def _reference(case):
    cfg, params, x, mask, dy, splits = layer_setup(case)
    ref = MoELayer(cfg)
    ref.load_state_dict(params)
    out = ref(x, padding_mask=mask, training=case.get("training", True))
    dx = ref.backward(dy, aux_weight=case.get("aux_weight", 1.0))
    return cfg, ref, out, dx, list(splits) + [len(x)]


@pytest.mark.parametrize("name", sorted(LAYER_CASES))
def test_layer_equals_single_process(layer_results, name):
    case = LAYER_CASES[name]
    cfg, ref, out, dx, bounds = _reference(case)
    tol = dict(rtol=1e-12, atol=1e-13) if cfg.dtype == "float64" else dict(rtol=1e-5, atol=1e-6)
    k, D, itemsize = cfg.top_k, cfg.d_model, np.dtype(cfg.np_dtype).itemsize
    E_local = cfg.num_experts // 2
    for rank in range(2):
        got = np.load(layer_results / f"{name}.rank{rank}.npz")
        sl = slice(bounds[rank], bounds[rank + 1])
        lo, hi = int(got["lo"]), int(got["hi"])
        assert (lo, hi) == (rank * E_local, (rank + 1) * E_local)
        # the experts see exactly the single-process rows in the same order: bitwise
        np.testing.assert_array_equal(got["y"], out.y[sl], err_msg=f"{name} rank {rank}: y")
        for f in BITWISE_ROUTER:
            want = getattr(out.router, f)
            want = want if f == "tokens_per_expert" else want[sl]  # global counts
            np.testing.assert_array_equal(got[f"router.{f}"], want, err_msg=f"{name} rank {rank}: {f}")
        for w in ("w1", "w2", "w3"):
            if w in ref.grads:
                np.testing.assert_array_equal(got[f"grad.{w}"], ref.grads[w][lo:hi],
                                              err_msg=f"{name} rank {rank}: grad {w}")
        # sums over ranks of the router's partials: equal to rounding
        np.testing.assert_allclose(got["dx"], dx[sl], **tol, err_msg=f"{name} rank {rank}: dx")
        np.testing.assert_allclose(got["grad.w_router"], ref.grads["w_router"], **tol,
                                   err_msg=f"{name} rank {rank}: grad w_router")
        np.testing.assert_allclose(got["losses"], [out.losses[n] for n in ("load_balance", "z_loss", "entropy")],
                                   rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(float(got["aux_loss"]), out.aux_loss, rtol=1e-12, atol=1e-15)
        # bytes on the wire: rows to other ranks' experts and rows back, forward and backward
        idx, kept = out.router.topk_indices, ~out.router.dropped & (out.router.topk_indices >= 0)
        owner = np.where(kept, idx // E_local, -1)
        mine = np.zeros(len(idx), bool)
        mine[sl] = True
        out_rows = int((kept & mine[:, None] & (owner != rank)).sum())
        in_rows = int((kept & ~mine[:, None] & (owner == rank)).sum())
        assert int(got["bytes_sent"]) == 2 * (out_rows + in_rows) * D * itemsize


def test_layer_cases_mean_what_they_say():
    """The reference batches really contain what the cases claim (or the test above
    would pass for the wrong reason)."""
    drops = {n: int(_reference(c)[2].router.dropped.sum()) for n, c in LAYER_CASES.items()}
    assert drops["capacity_position"] > 0 and drops["capacity_probs"] > 0 and drops["dropless"] == 0
    _, _, out, _, _ = _reference(LAYER_CASES["starved_expert"])
    assert out.router.tokens_per_expert[2] == 0 and out.router.tokens_per_expert.sum() > 0
    _, _, out, _, _ = _reference(LAYER_CASES["all_padding"])
    assert out.router.tokens_per_expert.sum() == 0
    cfg, params, x, mask, *_ = layer_setup(LAYER_CASES["rank_all_padding"])
    assert not mask[25:].any() and mask[:25].any()
