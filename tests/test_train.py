"""Training: the loss goes down, runs are reproducible, resume is exact, NaN stops cleanly."""
import json
import os

import numpy as np
import pytest

import moe_py
from moe_py import data
from moe_py.checkpoint import load_model
from moe_py.models import ModelConfig, TransformerLM
from moe_py.optim import AdamW
from moe_py.train import TrainConfig, TrainingDiverged, read_metrics, train

TIMING_KEYS = {"tokens_per_s", "rss_mib"}  # measured, not computed


@pytest.fixture(scope="module")
def corpus():
    return data.synthetic_corpus(n_docs=200, split_seed=0)


def small_cfgs(steps=20, **train_kw):
    moe = moe_py.MoEConfig(d_model=32, d_ff=32, num_experts=4, top_k=2)
    model = ModelConfig(max_seq_len=32, d_model=32, n_layers=2, n_heads=2, moe=moe, seed=0)
    kw = dict(corpus="synthetic", steps=steps, batch_size=8, seq_len=32, lr=3e-3, warmup=5,
              eval_every=10, eval_batches=2, checkpoint_every=10)
    kw.update(train_kw)
    return model, TrainConfig(**kw)


def strip_timing(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def test_twenty_steps_lower_the_loss_and_write_a_run_folder(tmp_path, corpus):
    model, tc = small_cfgs()
    train(model, tc, str(tmp_path), corpus=corpus, quiet=True)
    rows = read_metrics(str(tmp_path))
    assert len(rows) == 20
    assert np.mean([r["loss"] for r in rows[-5:]]) < rows[0]["loss"] - 0.5
    for key in ("loss", "aux_loss", "load_balance", "z_loss", "entropy", "expert_share", "drop_rate",
                "grad_norm", "lr", "tokens_per_s"):
        assert key in rows[0], key
    assert "val_loss" in rows[9] and "val_loss" in rows[19]
    assert len(rows[0]["expert_share"]) == 2 and sum(rows[0]["expert_share"][0]) == pytest.approx(1.0)
    for f in ("config.json", "metrics.jsonl", "checkpoint.npz"):
        assert os.path.exists(tmp_path / f)


def test_same_command_twice_gives_the_same_metrics(tmp_path, corpus):
    model, tc = small_cfgs(steps=6, grad_accum=2)
    train(model, tc, str(tmp_path / "a"), corpus=corpus, quiet=True)
    train(model, tc, str(tmp_path / "b"), corpus=corpus, quiet=True)
    assert strip_timing(read_metrics(str(tmp_path / "a"))) == strip_timing(read_metrics(str(tmp_path / "b")))


def test_resume_continues_exactly(tmp_path, corpus):
    model, tc = small_cfgs(steps=12, checkpoint_every=6, noise_std=0.5)
    full = tmp_path / "full"
    part = tmp_path / "part"
    train(model, tc, str(full), corpus=corpus, quiet=True)
    train(model, tc, str(part), corpus=corpus, quiet=True, until=6)
    assert len(read_metrics(str(part))) == 6
    train(model, tc, str(part), corpus=corpus, quiet=True, resume=True)
    assert strip_timing(read_metrics(str(part))) == strip_timing(read_metrics(str(full)))
    a, _ = load_model(str(full / "checkpoint.npz"))
    b, _ = load_model(str(part / "checkpoint.npz"))
    for (n, p, _), (_, q, _) in zip(a.named_parameters(), b.named_parameters()):
        assert np.array_equal(p, q), n


def test_checkpoint_round_trip(tmp_path, corpus):
    model, tc = small_cfgs(steps=3)
    train(model, tc, str(tmp_path), corpus=corpus, quiet=True)
    m, raw = load_model(str(tmp_path / "checkpoint.npz"))
    assert int(raw["step"]) == 3
    assert m.cfg == ModelConfig.from_dict(json.loads(str(raw["model_config"])))
    batch = data.BatchSampler(corpus.val, 2, 32, 0).batch(0)
    out1 = m.forward(batch.inputs, batch.mask, training=False)
    m2, _ = load_model(str(tmp_path / "checkpoint.npz"))
    out2 = m2.forward(batch.inputs, batch.mask, training=False)
    assert np.array_equal(out1.head_logits[0], out2.head_logits[0])


def test_gradient_accumulation_logs_the_per_token_mean(tmp_path, corpus):
    """With two micro-batches the logged loss is the per-token mean over both
    (not a sum, nor a mean of the two micro-batch means)."""
    model, two = small_cfgs(steps=1, batch_size=4, grad_accum=2, lr=0.0)
    sampler = data.BatchSampler(corpus.train, 4, 32, 0)
    b0, b1 = sampler.batch(0), sampler.batch(1)  # the step's two micro-batches
    from moe_py.lm_losses import cross_entropy
    from moe_py.models import TransformerLM
    m = TransformerLM(model)
    nll = n = 0.0
    for bb in (b0, b1):
        out = m.forward(bb.inputs, bb.mask)
        k = int((bb.targets != -100).sum())
        nll += cross_entropy(out.head_logits[0], bb.targets)[0] * k
        n += k
    train(model, two, str(tmp_path), corpus=corpus, quiet=True)
    logged = read_metrics(str(tmp_path))[0]["loss"]
    assert logged == pytest.approx(nll / n, rel=1e-6)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, corpus, monkeypatch):
    model, tc = small_cfgs(steps=6, checkpoint_every=2)
    train(model, tc, str(tmp_path), corpus=corpus, quiet=True, until=2)
    before = (tmp_path / "checkpoint.npz").read_bytes()
    import moe_py.models as models
    real = models.TransformerLM.loss_and_backward

    def poisoned(self, *a, **kw):
        res = real(self, *a, **kw)
        next(self.named_parameters())[2][...] = np.nan
        return res

    monkeypatch.setattr(models.TransformerLM, "loss_and_backward", poisoned)
    with pytest.raises(TrainingDiverged, match="training diverged at step 3: .*the last good checkpoint"):
        train(model, tc, str(tmp_path), corpus=corpus, quiet=True, resume=True)
    assert (tmp_path / "checkpoint.npz").read_bytes() == before


def test_a_diverging_moe_run_says_training_diverged(tmp_path, corpus, capsys):
    """A learning rate of 1e30 makes the gradient inside the model non-finite (before, the MoE
    layer's input check said "dy: contains NaN or Inf", as if the user had passed it)."""
    from moe_py.cli import main
    out = str(tmp_path / "r")
    assert main(["train", "--out", out, "--corpus", "synthetic", "--steps", "20", "--d-model", "16",
                 "--layers", "1", "--heads", "2", "--experts", "4", "--d-ff", "16", "--batch-size", "4",
                 "--seq-len", "16", "--lr", "1e30"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("moe_py: training diverged at step ") and "no checkpoint had been written yet" in err


def test_a_micro_batch_too_big_for_memory_is_refused_before_anything(tmp_path, monkeypatch):
    from moe_py import memory_estimate
    from moe_py.memory_estimate import activation_bytes, check_memory
    model = ModelConfig(max_seq_len=128, moe=moe_py.MoEConfig())
    tc = TrainConfig(batch_size=100_000_000, seq_len=128, steps=1)
    out = tmp_path / "r"
    with pytest.raises(ValueError, match=r"batch_size: a micro-batch of 100000000 x 128 bytes needs about"):
        train(model, tc, str(out))
    assert not out.exists()
    # the estimate grows with the batch and is far below the memory for the default run
    assert activation_bytes(model, 16, 128) < 2**30 < activation_bytes(model, 16_000, 128)
    # where the memory is unknown nothing is refused up front
    monkeypatch.setattr(memory_estimate, "available_bytes", lambda: None)
    check_memory(model, tc)


def test_sample_length_is_bounded():
    from moe_py.models import TransformerLM
    from moe_py.sample import MAX_SAMPLE_LENGTH, generate
    model = TransformerLM(ModelConfig(max_seq_len=16, d_model=16, n_layers=1, n_heads=2, moe=None, d_ff=16))
    with pytest.raises(ValueError, match="length: expected an integer in"):
        generate(model, b"a", MAX_SAMPLE_LENGTH + 1)
    assert len(generate(model, b"a", 3)) == 4


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_finishes_the_step_writes_a_checkpoint_and_exits_130(tmp_path, sig):
    import signal
    import subprocess
    import sys
    import time
    out = str(tmp_path / "r")
    cmd = [sys.executable, "-m", "moe_py", "train", "--out", out, "--corpus", "synthetic", "--steps", "100000",
           "--d-model", "16", "--layers", "1", "--heads", "2", "--experts", "4", "--d-ff", "16",
           "--batch-size", "4", "--seq-len", "16", "--checkpoint-every", "1000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(metrics) and open(metrics).read().count("\n") >= 3):
        time.sleep(0.05)
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("moe_py: interrupted at step ") and f"({sig})" in line and "--resume" in line
    step = int(line.split("interrupted at step ")[1].split()[0])
    _, raw = load_model(os.path.join(out, "checkpoint.npz"))
    assert int(raw["step"]) == step == read_metrics(out)[-1]["step"]  # nothing lost


def one_layer_lm():
    moe = moe_py.MoEConfig(d_model=16, d_ff=16, num_experts=2, top_k=1)
    return TransformerLM(ModelConfig(max_seq_len=8, d_model=16, n_layers=1, n_heads=2, moe=moe))


def test_a_diverging_moe_layer_stops_training_with_the_designed_message():
    from moe_py.data import synthetic_corpus, BatchSampler
    from moe_py.train import TrainConfig, TrainingDiverged, train_step
    m = one_layer_lm()
    m.moe_layers[0].params["w2"][...] = 1e38  # finite weights whose output overflows
    batch = BatchSampler(synthetic_corpus(n_docs=20, split_seed=0).train, 2, 8, 0).batch(0)
    with pytest.raises(TrainingDiverged, match="non-finite loss or gradient"):
        train_step(m, [batch], AdamW(m.named_parameters()), 1e-3, TrainConfig(seq_len=8))
