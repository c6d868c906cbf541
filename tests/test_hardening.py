"""Regression tests for the reliability probe's findings (issue "Hardening"): each fails on
the code before the fix."""
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import moe_py
from moe_py import _kernels
from moe_py._checks import NonFiniteError, check_row_count
from moe_py.checkpoint import CheckpointError, load_model, save_checkpoint
from moe_py.config import MoEConfig
from moe_py.machine import rss_mib
from moe_py.models import ModelConfig, TransformerLM
from moe_py.optim import AdamW
from moe_py.run_folder import RunFolder


def small_layer(**kw):
    cfg = dict(d_model=16, d_ff=24, num_experts=4, top_k=2, seed=1)
    cfg.update(kw)
    return moe_py.MoELayer(MoEConfig(**cfg))


# 1. arrays handed to users never alias what backward reads ---------------------------------

def test_router_output_is_read_only_and_backward_checks_indices():
    layer = small_layer()
    x = np.random.default_rng(0).standard_normal((30, 16)).astype(np.float32)
    o = layer(x)
    with pytest.raises(ValueError, match="read-only"):
        o.router.topk_indices[:, 0] = 4
    idx = o.router.topk_indices
    idx.flags.writeable = True  # a determined user: the C++ still refuses
    idx[:, 0] = 1_000_000
    with pytest.raises(ValueError, match="saved topk_indices"):
        layer.backward(np.ones_like(x))


# 2. memory that stays flat -------------------------------------------------------------------

CACHE_ON = moe_py.build_info()["block_cache"] == "on"


@pytest.mark.skipif(not CACHE_ON, reason="sanitizer build: no block cache, ASan keeps freed memory")
def test_rss_stays_flat_over_varying_batches():
    layer = small_layer(d_model=64, d_ff=256, num_experts=8)
    rng = np.random.default_rng(0)

    def step():
        T = int(rng.integers(1500, 4000))
        x = rng.standard_normal((T, 64)).astype(np.float32)
        o = layer(x, padding_mask=rng.random(T) > rng.random())
        layer.backward(np.ones_like(o.y))

    for _ in range(50):
        step()
    at_50 = rss_mib()
    for _ in range(450):
        step()
    assert rss_mib() <= 1.3 * at_50, (at_50, rss_mib())


@pytest.mark.skipif(not CACHE_ON, reason="sanitizer build: no block cache")
def test_pool_release_returns_the_cache():
    layer = small_layer(d_model=64, d_ff=2048, num_experts=2)
    x = np.ones((4096, 64), np.float32)
    layer.backward(np.ones_like(layer(x).y))
    assert _kernels.pool_cached_bytes() > 0
    _kernels.pool_release()
    assert _kernels.pool_cached_bytes() == 0


@pytest.mark.skipif(not CACHE_ON, reason="sanitizer build: no block cache")
@pytest.mark.parametrize("threads", [1, 2])
def test_repeated_expert_backward_takes_no_fresh_pages(threads):
    """The experts' per-call scratch (packed weights, per-thread tiles of 128 KiB here) comes
    back from the block cache: glibc returned such blocks to the OS between calls, and each
    call faulted ~230 (1 thread) to ~350 (2 threads) fresh pages back in."""
    import resource
    rng = np.random.default_rng(0)
    N, D, F, E = 4096, 128, 128, 8
    xs = rng.standard_normal((N, D)).astype(np.float32)
    offsets = np.arange(0, N + 1, N // E, dtype=np.int64)
    w1, w3 = (0.05 * rng.standard_normal((E, D, F)).astype(np.float32) for _ in range(2))
    w2 = 0.05 * rng.standard_normal((E, F, D)).astype(np.float32)
    dye = rng.standard_normal((N, D)).astype(np.float32)
    grads = [np.zeros_like(w1), np.zeros_like(w3), np.zeros_like(w2)]
    act = _kernels.Activation.swiglu
    h1, h3, _ = _kernels.kernel("experts_forward", np.float32)(
        xs=xs, offsets=offsets, w1=w1, w3=w3, w2=w2, activation=act)
    moe_py.set_num_threads(threads)  # the autouse fixture of conftest.py restores it

    def call():
        _kernels.kernel("experts_backward", np.float32)(
            xs=xs, offsets=offsets, w1=w1, w3=w3, w2=w2, h1=h1, h3=h3, dye=dye,
            activation=act, dw1=grads[0], dw3=grads[1], dw2=grads[2])
    call()
    call()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        call()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
    assert faults < 20, faults


# 3. thread counts ---------------------------------------------------------------------------

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


# 4. capacity overflow ------------------------------------------------------------------------

def test_huge_capacity_factor_is_dropless():
    x = np.random.default_rng(0).standard_normal((50, 16)).astype(np.float32)
    y_free = small_layer()(x).y
    o = small_layer(capacity_factor=1e300)(x)
    assert not o.router.dropped.any()
    np.testing.assert_array_equal(o.y, y_free)


def test_zero_capacity_is_refused():
    with pytest.raises(ValueError, match="capacity_factor"):
        MoEConfig(capacity_factor=0)


# 5. one layer, two threads ----------------------------------------------------------------------

def test_a_layer_in_use_by_another_thread_raises():
    layer = small_layer()
    x = np.ones((8, 16), np.float32)
    layer._guard._lock.acquire()  # as if another thread were inside forward
    try:
        with pytest.raises(RuntimeError, match="in use by another thread"):
            layer(x)
    finally:
        layer._guard._lock.release()
    layer(x)
    err = []
    t = threading.Thread(target=lambda: err.append(_raises(lambda: layer.backward(np.ones_like(x)))))
    t.start()
    t.join()
    assert "another thread" in err[0]


def _raises(fn):
    try:
        fn()
    except RuntimeError as e:
        return str(e)
    return ""


# 6. a forward that raises leaves the layer as it was ------------------------------------------

def test_failed_forward_changes_nothing():
    layer = small_layer()
    layer.set_noise_annealing(0.5, 10)
    rng = np.random.default_rng(0)
    x, dy = rng.standard_normal((20, 16)).astype(np.float32), rng.standard_normal((20, 16)).astype(np.float32)
    layer(x)
    std = layer.noise_std
    layer.zero_grad()
    want = layer.backward(dy).copy(), {k: g.copy() for k, g in layer.grads.items()}
    w1 = layer.params["w1"].copy()
    layer.params["w1"][0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="w1"):
        layer(rng.standard_normal((7, 16)).astype(np.float32))
    layer.params["w1"][...] = w1
    assert layer.noise_std == std
    layer.zero_grad()
    np.testing.assert_array_equal(layer.backward(dy), want[0])
    for k, g in layer.grads.items():
        np.testing.assert_array_equal(g, want[1][k])


# 8. corpus folders read regular files only ------------------------------------------------------

def test_a_named_pipe_in_a_corpus_folder_does_not_hang(tmp_path):
    (tmp_path / "a.txt").write_text("hello world, " * 2000)
    os.mkfifo(tmp_path / "pipe.txt")
    code = f"from moe_py.data import load_corpus; c = load_corpus({str(tmp_path)!r}); print(len(c.train))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    with pytest.raises(ValueError, match="not a regular file"):
        from moe_py.data import load_corpus
        load_corpus(str(tmp_path / "pipe.txt"))


# 9. non-finite values are caught where they are made ---------------------------------------------

def test_noise_too_large_for_float32_is_refused():
    with pytest.raises(ValueError, match="start_std"):
        small_layer().set_noise_annealing(1e39, 10)


def test_huge_coefficient_names_itself():
    layer = small_layer(z_loss_coef=1e308)
    x = np.random.default_rng(0).standard_normal((10, 16)).astype(np.float32) * 30
    with pytest.raises(NonFiniteError, match="z_loss_coef"):
        layer(x)


def test_nan_aux_weight_is_refused():
    layer = small_layer()
    x = np.ones((5, 16), np.float32)
    layer(x)
    with pytest.raises(ValueError, match="aux_weight"):
        layer.backward(np.ones_like(x), aux_weight=float("nan"))


def test_huge_x_names_x_not_an_internal_argument():
    layer = small_layer()
    x = np.full((5, 16), 1e20, np.float32)
    with pytest.raises(ValueError, match="^x: "):
        layer(x)


def test_masked_nan_is_still_nan():
    x = np.ma.masked_array(np.ones((4, 16), np.float32), mask=np.zeros((4, 16), bool))
    x.data[0, 0] = np.nan
    x.mask[0, 0] = True
    with pytest.raises(ValueError, match="x: contains NaN"):
        small_layer()(x)


# 10. clear errors -------------------------------------------------------------------------------

def tiny_model():
    moe = MoEConfig(d_model=16, d_ff=16, num_experts=2, top_k=1)
    return TransformerLM(ModelConfig(max_seq_len=8, d_model=16, n_layers=1, n_heads=2, moe=moe))


def saved_checkpoint(tmp_path):
    m = tiny_model()
    path = str(tmp_path / "c.npz")
    save_checkpoint(path, m, AdamW(m.named_parameters()), 3, {})
    return path


@pytest.mark.parametrize("damage", ["truncate", "empty", "flip", "random", "text"])
def test_damaged_checkpoints_say_so(tmp_path, damage):
    path = saved_checkpoint(tmp_path)
    data = bytearray(open(path, "rb").read())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "empty":
        data = b""
    elif damage == "flip":
        data[len(data) // 3] ^= 0x10
    elif damage == "random":
        data = np.random.default_rng(0).bytes(5000)
    else:
        data = b"just some text\n" * 100
    open(path, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match="not a valid moe_py checkpoint"):
        load_model(path)


def test_checkpoint_missing_array_is_named_with_its_shape(tmp_path):
    path = saved_checkpoint(tmp_path)
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files if k != "model.norm_f.g" and k != "checksum"}
    np.savez(path, **arrays)
    with pytest.raises(CheckpointError, match=r"model.norm_f.g' \(expected float32 \[16\]\)"):
        load_model(path)


def test_torn_metrics_line_is_dropped_with_a_warning(tmp_path):
    run = RunFolder(str(tmp_path))
    run.start_metrics()
    run.append_metrics({"step": 1, "loss": 2.0})
    with open(run.metrics, "a") as f:
        f.write('{"step": 2, "lo')
    with pytest.warns(RuntimeWarning, match="torn last line"):
        assert run.read_metrics() == [{"step": 1, "loss": 2.0}]


@pytest.mark.parametrize("kw,word", [({"seed": 2**64}, "seed"), ({"seed": -1}, "seed")])
def test_config_bounds_name_the_field(kw, word):
    with pytest.raises(ValueError, match=word):
        MoEConfig(**kw)


def test_numpy_scalars_become_python_scalars():
    cfg = MoEConfig(d_model=np.uint8(200), d_ff=np.int64(8), num_experts=np.int32(4),
                    load_balance_coef=np.float32(0.5), straight_through=np.bool_(True))
    assert type(cfg.d_model) is int and cfg.d_model * 3 == 600
    json.dumps(ModelConfig(d_model=200, n_heads=4, moe=cfg).to_dict())


def test_model_config_rejects_a_non_config_moe():
    with pytest.raises(TypeError, match="moe"):
        ModelConfig(moe=5)


def test_model_backward_checks_its_calls():
    m = tiny_model()
    with pytest.raises(RuntimeError, match="before forward"):
        m.backward([np.zeros((1, 8, 256), np.float32)])
    out = m.forward(np.zeros((1, 8), np.int64))
    with pytest.raises(ValueError, match="one gradient per head"):
        m.backward([np.zeros_like(out.head_logits[0])] * 2)


def test_grad_buffer_errors_name_layer_grads():
    layer = small_layer()
    x = np.ones((6, 16), np.float32)
    layer(x)
    layer.grads["w1"] = np.zeros((2, 2), np.float32)  # a wrong entry put into the dict
    with pytest.raises(ValueError, match=r"grads\['w1'\]"):
        layer.backward(np.ones_like(x))


def test_assigning_params_takes_effect():
    layer = small_layer()
    x = np.random.default_rng(0).standard_normal((6, 16)).astype(np.float32)
    before = layer(x).y
    new = {k: v * 2 for k, v in layer.params.items()}
    layer.params = new
    after = layer(x).y
    assert not np.array_equal(before, after)
    np.testing.assert_array_equal(layer.params["w2"], new["w2"])
    with pytest.raises(ValueError, match="params"):
        layer.params = {"w1": new["w1"]}


def test_rows_past_the_32_bit_blas_are_refused():
    with pytest.raises(ValueError, match="32-bit"):
        check_row_count(2**31, "x")
    check_row_count(2**31 - 1, "x")


def test_cli_refuses_absurd_threads_in_one_line(capsys):
    from moe_py.cli import main
    assert main(["--threads", "200000", "demo"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "threads" in err


def test_cli_out_of_memory_is_one_line(monkeypatch, capsys):
    from moe_py import cli

    def boom(args):
        raise MemoryError()
    monkeypatch.setattr(cli, "_demo", boom)
    assert cli.main(["demo"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "out of memory" in err


def test_a_diverging_moe_layer_stops_training_with_the_designed_message():
    from moe_py.data import synthetic_corpus, BatchSampler
    from moe_py.train import TrainConfig, TrainingDiverged, train_step
    m = tiny_model()
    m.moe_layers[0].params["w2"][...] = 1e38  # finite weights whose output overflows
    batch = BatchSampler(synthetic_corpus(n_docs=20, split_seed=0).train, 2, 8, 0).batch(0)
    with pytest.raises(TrainingDiverged, match="non-finite loss or gradient"):
        train_step(m, [batch], AdamW(m.named_parameters()), 1e-3, TrainConfig(seq_len=8))
