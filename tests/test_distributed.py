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
from moe_py.router import ROUTER_PARAMS, concat_router_outputs, unrouted_tokens

HERE = os.path.dirname(os.path.abspath(__file__))
WORKERS = os.path.join(HERE, "mpi_workers")
sys.path.insert(0, WORKERS)
from cases import EvalWindows, as_sequences, layer_setup, prepare, token_ids, train_setup  # noqa: E402


def _find_mpiexec():
    """mpiexec beside the interpreter, else the one PyPI's mpich installed (found through its
    metadata: a venv that only sees .venv's packages, as scripts/sanitize.sh's, still finds
    it), else the one on PATH."""
    local = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.path.exists(local):
        return local
    try:
        from importlib.metadata import PackageNotFoundError, distribution
        for f in distribution("mpich").files or ():
            if str(f).endswith("bin/mpiexec") and os.path.exists(f.locate()):
                return os.path.realpath(f.locate())
    except PackageNotFoundError:
        pass
    return shutil.which("mpiexec")


def _mpiexec() -> str:
    import importlib.util
    problem = None
    if importlib.util.find_spec("mpi4py") is None:
        problem = "mpi4py is not installed (pip install 'moe_py[mpi]')"
    exe = _find_mpiexec()
    if problem is None and exe is None:
        problem = "no mpiexec beside the interpreter, from PyPI's mpich or on PATH (pip install mpich)"
    if problem:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI must run the MPI tests, but {problem}")
        pytest.skip(problem)
    return exe


def _mpi_env(exe: str) -> dict:
    """The environment of the ranks: one OpenMP thread each (2 cores, 2 ranks), the workers
    importable."""
    path = os.pathsep.join(p for p in (WORKERS, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    # mpi4py looks for libmpi under the interpreter's prefix: in another venv (the sanitize
    # one) point it at the library of the mpiexec found
    libmpi = os.path.join(os.path.dirname(exe), "..", "lib", "libmpi.so.12")
    if "MPI4PY_LIBMPI" not in env and os.path.exists(libmpi):
        env["MPI4PY_LIBMPI"] = os.path.realpath(libmpi)
    return env


def run_mpi(n: int, args, timeout: float = 240, check: bool = True) -> subprocess.CompletedProcess:
    """`mpiexec -n n python ARGS`."""
    exe = _mpiexec()
    proc = subprocess.run([exe, "-n", str(n), sys.executable, *args], env=_mpi_env(exe),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"mpiexec -n {n} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def mpi_ok():
    """mpiexec starts 2 ranks that see each other (a plain failure, never a skip, once
    mpi4py and mpiexec are there)."""
    proc = run_mpi(2, ["-c", "from mpi4py import MPI; c = MPI.COMM_WORLD; s = c.allreduce(c.Get_rank()); "
                             "c.Get_rank() == 0 and print(s, c.Get_size())"], timeout=60)
    assert proc.stdout.split() == ["1", "2"], proc.stdout


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
    # the routers of the routers issue that choose token by token, and their options
    "sigmoid_bias_shared": dict(cfg=_cfg(router="sigmoid_topk", num_shared_experts=1,
                                         routed_scaling_factor=2.5, capacity_factor=1.0),
                                expert_bias=[0.3, -0.2, 0.0, 0.1], tokens=48, splits=[0, 20],
                                padding=0.1, seed=9),
    "grouped_topk": dict(cfg=_cfg(num_experts=8, n_group=4, topk_group=2), tokens=40,
                         splits=[0, 24], padding=0.1, seed=10),
    # the balance loss per sequence: rank 0 holds 3 sequences of 8, rank 1 two (one all padding)
    "sequence_scope": dict(cfg=_cfg(load_balance_scope="sequence", load_balance_coef=0.1),
                           tokens=40, seq_len=8, splits=[0, 24], padded_ranges=[[32, 40]],
                           padding=0.2, seed=11),
    # the balance loss over the optimiser step: a first forward's loads count too
    "global_scope": dict(cfg=_cfg(load_balance_scope="global", load_balance_coef=0.1), tokens=36,
                         splits=[0, 14], padding=0.1, seed=12, earlier_forward=True),
    # NoisyTop-k at its second step: rank 1's draws start at global token 23
    "noise": dict(cfg=_cfg(capacity_factor=1.0), tokens=50, splits=[0, 23], padding=0.1, seed=13,
                  noise=[0.5, 10], earlier_forward=True),
    # hash: token by token from each rank's token ids; no router weight
    "hash_sequence_scope": dict(cfg=_cfg(router="hash", load_balance_scope="sequence",
                                         load_balance_coef=0.1), tokens=40, seq_len=8,
                                splits=[0, 16], padding=0.1, seed=14),
    "hash_capacity_probs": dict(cfg=_cfg(router="hash", num_experts=8, capacity_factor=0.6,
                                         drop_policy="probs", num_shared_experts=1),
                                tokens=50, splits=[0, 29], padding=0.1, seed=15),
    "hash_capacity_position": dict(cfg=_cfg(router="hash", num_experts=8, top_k=3,
                                            capacity_factor=0.8), tokens=44, splits=[0, 30], seed=16),
    # the routers that choose over the whole batch: routed globally on every rank
    "sinkhorn": dict(cfg=_cfg(router="sinkhorn", capacity_factor=1.0, load_balance_coef=0.01),
                     tokens=60, splits=[0, 26], padding=0.1, seed=17, aux_weight=0.5),
    "sinkhorn_eval": dict(cfg=_cfg(router="sinkhorn", num_experts=8), tokens=40, splits=[0, 15],
                          seed=18, training=False),
    "sinkhorn_global_scope": dict(cfg=_cfg(router="sinkhorn", num_experts=8, capacity_factor=0.9,
                                           drop_policy="probs", load_balance_scope="global",
                                           load_balance_coef=0.1),
                                  tokens=44, splits=[0, 20], padding=0.1, seed=19, earlier_forward=True),
    # 4 experts per rank; a token taken by 0..E experts (slot width set by the global batch)
    "expert_choice": dict(cfg=_cfg(router="expert_choice", num_experts=8), tokens=64,
                          splits=[0, 40], padding=0.15, seed=20, aux_weight=0.5),
    # rank 1 holds only padding; gelu, a shared expert, half the capacity
    "expert_choice_capacity": dict(cfg=_cfg(router="expert_choice", capacity_factor=0.5,
                                            num_shared_experts=1, activation="gelu"),
                                   tokens=40, splits=[0, 25], padded_ranges=[[25, 40]], seed=21),
    # rank 1 has no tokens at all; sequences of 8
    "expert_choice_rank_empty": dict(cfg=_cfg(router="expert_choice", capacity_factor=2.0,
                                              load_balance_scope="sequence", load_balance_coef=0.1),
                                     tokens=32, seq_len=8, splits=[0, 32], seed=22),
    "expert_choice_float32": dict(cfg=_cfg(router="expert_choice", dtype="float32"), tokens=48,
                                  splits=[0, 24], padding=0.1, seed=23),
    # the Hugging Face families' options, token by token: a learned logit bias (b_router, set by
    # layer_setup), a loaded selection bias, groups scored by their best expert, a norm floor
    "hf_options": dict(cfg=_cfg(router="sqrtsoftplus_topk", num_experts=8, n_group=4, topk_group=2,
                                group_score="max", topk_norm_min=0.9, router_bias=True,
                                capacity_factor=1.0),
                       expert_bias=[0.05, -0.1, 0.0, 0.2, -0.05, 0.1, 0.0, -0.2], tokens=48,
                       splits=[0, 20], padding=0.1, seed=24),
    # a logit bias on a router that routes the global batch (rank 1's gradients are scratch)
    "expert_choice_router_bias": dict(cfg=_cfg(router="expert_choice", router_bias=True), tokens=40,
                                      splits=[0, 18], padding=0.1, seed=25),
    # the expert variants: biases (sliced over the ranks as the weights are), clamped SwiGLU
    "ffn_bias_clamped": dict(cfg=_cfg(num_experts=8, ffn_bias=True, activation="clamped_swiglu",
                                      swiglu_limit=1.0, capacity_factor=0.8),
                             tokens=50, splits=[0, 21], padding=0.1, seed=27),
    # Llama 4's input-scaled combine: the weights scale the rows before they leave their rank
    "input_combine": dict(cfg=_cfg(num_experts=8, combine="input", ffn_bias=True, capacity_factor=0.8),
                          tokens=50, splits=[0, 29], padding=0.1, seed=28, aux_weight=0.5),
    "input_combine_expert_choice": dict(cfg=_cfg(router="expert_choice", combine="input"), tokens=40,
                                        splits=[0, 15], padding=0.1, seed=29),
}
GLOBAL_ROUTERS = ("expert_choice", "sinkhorn")

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
    ids = token_ids(case, len(x))
    prepare(ref, case, x, mask, ids, list(splits) + [len(x)])
    xs, ms, dys = as_sequences(case, x, mask, dy)
    ids = None if ids is None else as_sequences(case, ids)[0]
    out = ref(xs, padding_mask=ms, training=case.get("training", True), token_ids=ids)
    dx = ref.backward(dys, aux_weight=case.get("aux_weight", 1.0)).reshape(-1, cfg.d_model)
    out = out._replace(y=out.y.reshape(-1, cfg.d_model))
    return cfg, ref, out, dx, list(splits) + [len(x)]


@pytest.mark.parametrize("name", sorted(LAYER_CASES))
def test_layer_equals_single_process(layer_results, name):
    case = LAYER_CASES[name]
    cfg, ref, out, dx, bounds = _reference(case)
    tol = dict(rtol=1e-12, atol=1e-13) if cfg.dtype == "float64" else dict(rtol=1e-5, atol=1e-6)
    # the global routing runs the single-process router itself: bitwise, losses included
    routed_globally = cfg.router in GLOBAL_ROUTERS
    router_tol = dict(rtol=0, atol=0) if routed_globally else tol
    D, itemsize = cfg.d_model, np.dtype(cfg.np_dtype).itemsize
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
        for w in ref.grads:
            if w.startswith("shared_"):  # replicated, summed over ranks
                np.testing.assert_allclose(got[f"grad.{w}"], ref.grads[w], **tol, err_msg=w)
            elif w not in ROUTER_PARAMS:
                np.testing.assert_array_equal(got[f"grad.{w}"], ref.grads[w][lo:hi],
                                              err_msg=f"{name} rank {rank}: grad {w}")
        # token by token: sums over ranks of the router's partials, equal to rounding
        np.testing.assert_allclose(got["dx"], dx[sl], **router_tol, err_msg=f"{name} rank {rank}: dx")
        for w in ROUTER_PARAMS:  # w_router, and b_router with router_bias: replicated
            if w in ref.grads:
                np.testing.assert_allclose(got[f"grad.{w}"], ref.grads[w], **router_tol,
                                           err_msg=f"{name} rank {rank}: grad {w}")
        if "w_router" not in ref.grads:  # hash: no router weight on any rank
            assert "grad.w_router" not in got.files
        loss_tol = dict(rtol=0, atol=0) if routed_globally else dict(rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(got["losses"], [out.losses[n] for n in ("load_balance", "z_loss", "entropy")],
                                   **loss_tol)
        np.testing.assert_allclose(float(got["aux_loss"]), out.aux_loss, **loss_tol)
        # bytes on the wire: rows to other ranks' experts and rows back, forward and backward
        idx, kept = out.router.topk_indices, ~out.router.dropped & (out.router.topk_indices >= 0)
        owner = np.where(kept, idx // E_local, -1)
        mine = np.zeros(len(idx), bool)
        mine[sl] = True
        out_rows = int((kept & mine[:, None] & (owner != rank)).sum())
        in_rows = int((kept & ~mine[:, None] & (owner == rank)).sum())
        expected = 2 * (out_rows + in_rows) * D * itemsize
        if routed_globally:  # this rank's x, mask and d_topk_weights rows, to the other rank
            n = bounds[rank + 1] - bounds[rank]
            expected += n * (D * itemsize + 1 + idx.shape[1] * itemsize)
        assert int(got["bytes_sent"]) == expected


BAD_INPUTS = {  # argument -> (exception, words its message must contain)
    "comm": ("TypeError", "comm: expected an mpi4py Intracomm"),
    "cfg": ("TypeError", "cfg: expected a MoEConfig"),
    "full_params": ("ValueError", "full_params['w1']: expected float64 [4, 8, 8]"),
    "x_dtype": ("TypeError", "x: expected dtype float64"),
    "x_shape": ("ValueError", "x: expected shape [..., 8]"),
    "mask": ("ValueError", "padding_mask: expected shape [3]"),
    "token_ids": ("ValueError", "token_ids: the hash router needs the token ids (shape [3]"),
    "seq_len": ("ValueError", "x: the sequence balance scope needs sequences of one length on every "
                              "rank, got [2, 3]"),
    "backward_first": ("RuntimeError", "backward called before forward"),
}


def test_bad_inputs_raise_clear_errors(layer_results):
    for rank in range(2):
        seen = json.loads((layer_results / f"errors.rank{rank}.json").read_text())
        for name, (kind, words) in BAD_INPUTS.items():
            assert seen[name] is not None, f"{name}: nothing raised"
            assert seen[name][0] == kind and words in seen[name][1], (name, seen[name])


def test_gather_and_load_whole_params(layer_results):
    import moe_py
    cfg = moe_py.MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=2, num_shared_experts=1, seed=5)
    first, second = MoELayer(cfg).params, MoELayer(moe_py.MoEConfig(**{**cfg.__dict__, "seed": 6})).params
    for rank in range(2):
        got = np.load(layer_results / f"params.rank{rank}.npz")
        assert sorted(k[6:] for k in got.files if k.startswith("first.")) == sorted(first)
        for k in first:
            np.testing.assert_array_equal(got[f"first.{k}"], first[k], err_msg=k)
            np.testing.assert_array_equal(got[f"second.{k}"], second[k], err_msg=k)


def test_layer_cases_mean_what_they_say():
    """The reference batches really contain what the cases claim (or the test above
    would pass for the wrong reason)."""
    drops = {n: int(_reference(c)[2].router.dropped.sum()) for n, c in LAYER_CASES.items()}
    assert drops["capacity_position"] > 0 and drops["capacity_probs"] > 0 and drops["dropless"] == 0
    _, _, out, _, _ = _reference(LAYER_CASES["starved_expert"])
    assert out.router.tokens_per_expert[2] == 0 and out.router.tokens_per_expert.sum() > 0
    _, ref, out, _, _ = _reference(LAYER_CASES["noise"])
    assert ref.noise_std > 0 and (out.router.router_probs != out.router.router_probs_clean).any()
    _, ref, out, _, _ = _reference(LAYER_CASES["global_scope"])
    assert (ref.router.step_loads > out.router.tokens_per_expert).any()  # the earlier forward's
    _, _, out, _, _ = _reference(LAYER_CASES["all_padding"])
    assert out.router.tokens_per_expert.sum() == 0
    cfg, params, x, mask, *_ = layer_setup(LAYER_CASES["rank_all_padding"])
    assert not mask[25:].any() and mask[:25].any()
    for name in ("hash_capacity_probs", "hash_capacity_position", "sinkhorn", "sinkhorn_global_scope"):
        assert drops[name] > 0, name
    cfg, _, out, _, _ = _reference(LAYER_CASES["expert_choice"])
    real = layer_setup(LAYER_CASES["expert_choice"])[3]
    assert unrouted_tokens(out.router, real).any()  # some real token taken by no expert
    assert ((out.router.topk_indices >= 0).sum(axis=1) > cfg.top_k).any()  # and one by more than k
    # each rank routing its own tokens alone would choose differently: the global routing
    # is what the equality above checks
    for name in ("sinkhorn", "expert_choice"):
        _, _, out, _, bounds = _reference(LAYER_CASES[name])
        alone = concat_router_outputs(_route_alone(LAYER_CASES[name], bounds))
        assert alone.topk_indices.shape != out.router.topk_indices.shape or \
            (alone.topk_indices != out.router.topk_indices).any(), name


def _route_alone(case, bounds):
    cfg, params, x, mask, *_ = layer_setup(case)
    for a, b in zip(bounds[:-1], bounds[1:]):
        layer = MoELayer(cfg)
        layer.load_state_dict(params)
        yield layer(x[a:b], padding_mask=mask[a:b]).router


# ---- training: 20 steps against the single-process train_step --------------------------

def _moe(**kw):
    base = dict(d_model=32, d_ff=32, num_experts=4, top_k=2, dtype="float64")
    base.update(kw)
    return base


TRAIN_CASES = {
    # capacity drops, two micro-batches per step, padding in the windows
    "float64": dict(moe=_moe(capacity_factor=1.0), steps=20, batch_size=4, seq_len=32, grad_accum=2),
    # 4 experts per rank; an odd batch (ranks hold 3 and 2 windows); 3 multi-token heads
    "float64_uneven": dict(moe=_moe(num_experts=8, top_k=2), steps=20, batch_size=5, seq_len=24,
                           n_predict=3),
    # NoisyTop-k annealed over the 20 steps, with capacity drops
    "float64_noise": dict(moe=_moe(capacity_factor=1.0), steps=20, batch_size=4, seq_len=24,
                          noise=[1.0, 20]),
    "float32": dict(moe=_moe(dtype="float32"), steps=20, batch_size=4, seq_len=32),
    # DeepSeek-V3's recipe: sigmoid scores, the aux-loss-free expert bias (moved every step
    # from the global loads), a shared expert, the sequence-wise balance loss
    "float64_sigmoid_shared": dict(moe=_moe(router="sigmoid_topk", num_shared_experts=1,
                                            load_balance_scope="sequence", bias_update_rate=0.01),
                                   steps=20, batch_size=4, seq_len=24),
    "float64_global_scope": dict(moe=_moe(load_balance_scope="global", capacity_factor=1.25),
                                 steps=20, batch_size=4, seq_len=24, grad_accum=2),
    # the routers of the routers issue that are not token-by-token top-k (hash: the LM's byte ids)
    "float64_hash": dict(moe=_moe(router="hash", capacity_factor=1.0), steps=20, batch_size=4,
                         seq_len=24),
    "float64_sinkhorn": dict(moe=_moe(router="sinkhorn", capacity_factor=1.25), steps=20,
                             batch_size=5, seq_len=24),
    "float64_expert_choice": dict(moe=_moe(router="expert_choice", num_experts=8), steps=20,
                                  batch_size=4, seq_len=24, grad_accum=2),
    # the expert variants: biases (sliced with the weights, and their AdamW moments) and
    # Llama 4's input-scaled combine
    "float64_ffn_bias_input_combine": dict(moe=_moe(ffn_bias=True, combine="input", capacity_factor=1.0),
                                           steps=20, batch_size=4, seq_len=24),
}


@pytest.fixture(scope="module")
def train_results(mpi_ok, tmp_path_factory):
    d = tmp_path_factory.mktemp("mpi_train")
    (d / "cases.json").write_text(json.dumps(TRAIN_CASES))
    run_mpi(2, [os.path.join(WORKERS, "train_steps.py"), str(d / "cases.json"), str(d / "out.json")])
    return json.loads((d / "out.json").read_text())


def _single_process_steps(case):
    from moe_py.models import TransformerLM
    from moe_py.optim import AdamW, lr_at
    from moe_py.train import train_step
    model_cfg, train_cfg, sampler = train_setup(case)
    model = TransformerLM(model_cfg)
    if "noise" in case:
        model.set_noise_annealing(*case["noise"])
    optim = AdamW(model.named_parameters(), weight_decay=train_cfg.weight_decay)
    M, rows = train_cfg.grad_accum, []
    for step in range(case["steps"]):
        lr = lr_at(step, train_cfg.lr, train_cfg.warmup, train_cfg.steps, train_cfg.min_lr_ratio)
        rows.append(train_step(model, [sampler.batch(step * M + i) for i in range(M)], optim, lr, train_cfg))
    from moe_py.train import evaluate
    evals = {str(n): evaluate(model, EvalWindows(sampler, n), None) for n in (1, 3)}
    return rows, evals


@pytest.mark.parametrize("name", sorted(TRAIN_CASES))
def test_training_steps_equal_single_process(train_results, name):
    case = TRAIN_CASES[name]
    rtol = 1e-10 if case["moe"]["dtype"] == "float64" else 1e-5
    got = train_results[name]
    assert got["replicated_identical"], "replicated weights differ between ranks"
    want, evals = _single_process_steps(case)
    assert len(got["steps"]) == len(want) == 20
    # after training, the validation loss of one window (rank 1 holds only padding) and of 3
    for n, v in evals.items():
        np.testing.assert_allclose(got["eval"][n], v, rtol=rtol, err_msg=f"evaluate, {n} windows")
    for step, (g, w) in enumerate(zip(got["steps"], want)):
        for key in ("loss", "aux_loss", "grad_norm"):
            np.testing.assert_allclose(g[key], w[key], rtol=rtol, err_msg=f"step {step + 1}: {key}")
        for key in ("load_balance", "z_loss", "entropy", "expert_share", "drop_rate"):
            np.testing.assert_allclose(g[key], w[key], rtol=rtol, atol=1e-12, err_msg=f"step {step + 1}: {key}")
        assert g["tokens"] == w["tokens"]
    if name == "float64":
        assert max(max(w["drop_rate"]) for w in want) > 0  # the capacity really drops


# ---- the command line: train, a single-process reader, resume at another P ---------------

TINY = ["--corpus", "synthetic", "--d-model", "32", "--n-layers", "2", "--n-heads", "2", "--d-ff", "32",
        "--num-experts", "4", "--batch-size", "4", "--seq-len", "32", "--dtype", "float64",
        "--eval-every", "2", "--eval-batches", "2", "--checkpoint-every", "2", "--warmup", "2",
        "--capacity-factor", "1.25"]


def _cli(n, out, *extra, check=True):
    return run_mpi(n, ["-m", "moe_py", "train", "--expert-parallel", "--out", str(out), *TINY, *extra],
                   check=check)


def _metrics(run_dir):
    from moe_py.train import read_metrics
    return read_metrics(str(run_dir))


def test_cli_train_checkpoint_and_resume_at_another_p(mpi_ok, tmp_path):
    from moe_py.checkpoint import load_model
    from moe_py.cli import build_parser, configs_from_args
    from moe_py.train import train
    whole = tmp_path / "p2"
    proc = _cli(2, whole, "--steps", "4")
    assert "2 MPI ranks" in proc.stdout
    # the same run in this process, single-process trainer
    args = build_parser().parse_args(["train", "--steps", "4", *TINY])
    model_cfg, train_cfg = configs_from_args(args, dense=False)
    ref_dir = tmp_path / "single"
    train(model_cfg, train_cfg, str(ref_dir), quiet=True)
    got, want = _metrics(whole), _metrics(ref_dir)
    assert [m["step"] for m in got] == [1, 2, 3, 4]
    for g, w in zip(got, want):
        for key in ("loss", "aux_loss", "grad_norm", "val_loss"):
            if key in w:
                np.testing.assert_allclose(g[key], w[key], rtol=1e-10, err_msg=key)
    # the checkpoint holds every expert: it loads in one process and equals the reference
    m_ep, data = load_model(str(whole / "checkpoint.npz"))
    m_ref, data_ref = load_model(str(ref_dir / "checkpoint.npz"))
    for (n, p, _), (_, q, _) in zip(m_ep.named_parameters(), m_ref.named_parameters()):
        np.testing.assert_allclose(p, q, rtol=1e-9, atol=1e-12, err_msg=n)
    for key in data_ref:
        if key.startswith("optim."):
            np.testing.assert_allclose(data[key], data_ref[key], rtol=1e-8, atol=1e-14, err_msg=key)
    sample = subprocess.run([sys.executable, "-m", "moe_py", "sample", str(whole), "--length", "10"],
                            capture_output=True, text=True, timeout=120)
    assert sample.returncode == 0, sample.stderr

    # stop at step 2 with P = 2, resume to step 4 with P = 4 (one expert per rank)
    part = tmp_path / "resumed"
    _cli(2, part, "--steps", "2")
    run_mpi(4, ["-m", "moe_py", "train", "--expert-parallel", "--resume", "--out", str(part), "--steps", "4"])
    resumed = _metrics(part)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    for g, w in zip(resumed, want):
        np.testing.assert_allclose(g["loss"], w["loss"], rtol=1e-10)


@pytest.mark.parametrize("router", ["hash", "sinkhorn", "expert_choice"])
def test_cli_trains_every_router(mpi_ok, tmp_path, router):
    from moe_py.cli import build_parser, configs_from_args
    from moe_py.train import train
    flags = ["--steps", "2", "--router", router, *TINY]
    proc = _cli(2, tmp_path / "p2", *flags)
    # expert choice's warning for a causal LM: once (rank 0's), not once per rank
    assert proc.stderr.count("in a causal LM") == (router == "expert_choice"), proc.stderr
    model_cfg, train_cfg = configs_from_args(build_parser().parse_args(["train", *flags]), dense=False)
    assert model_cfg.moe.router == router
    train(model_cfg, train_cfg, str(tmp_path / "single"), quiet=True)
    got, want = _metrics(tmp_path / "p2"), _metrics(tmp_path / "single")
    assert [m["step"] for m in got] == [1, 2]
    for g, w in zip(got, want):
        for key in ("loss", "aux_loss", "grad_norm", "val_loss"):
            if key in w:
                np.testing.assert_allclose(g[key], w[key], rtol=1e-10, err_msg=key)


def test_cli_ranks_must_divide_experts(mpi_ok, tmp_path):
    proc = _cli(3, tmp_path / "bad", "--steps", "1", check=False)
    assert proc.returncode != 0
    assert "num_experts: expected a multiple of the number of MPI ranks (3), got 4" in proc.stderr


def test_core_does_not_import_mpi4py():
    code = ("import sys, moe_py, moe_py.cli, moe_py.train, moe_py.models, moe_py.checkpoint; "
            "moe_py.cli.build_parser(); print('mpi4py' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stdout + proc.stderr


def test_cli_refuses_mpiexec_without_expert_parallel(mpi_ok, tmp_path):
    proc = run_mpi(2, ["-m", "moe_py", "train", "--out", str(tmp_path / "r"), *TINY, "--steps", "1"],
                   check=False)
    assert proc.returncode != 0
    assert "without --expert-parallel" in proc.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("flag, a, b", [("--lr", "0.001", "0.002"), ("--num-experts", "4", "2")])
def test_ranks_started_with_different_flags_stop_naming_the_field(mpi_ok, tmp_path, flag, a, b):
    """An MPMD launch (`mpiexec -n 1 ... : -n 1 ...`) whose ranks got different flags."""
    exe = _mpiexec()
    base = [sys.executable, "-m", "moe_py", "train", "--expert-parallel", "--out", str(tmp_path / "r"),
            *TINY, "--steps", "1"]
    proc = subprocess.run([exe, "-n", "1", *base, flag, a, ":", "-n", "1", *base, flag, b], env=_mpi_env(exe),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    field = {"--lr": "train.lr", "--num-experts": "model.moe.num_experts"}[flag]
    assert f"rank 1 was started with {field} = {float(b) if flag == '--lr' else int(b)!r}" in proc.stderr, proc.stderr
    assert not (tmp_path / "r" / "checkpoint.npz").exists()
