"""Routing telemetry (moe_py/telemetry.py): the load statistics against NumPy, the keys a
training run logs, and the optional TensorBoard writer (moe_py/tensorboard_log.py)."""
import glob
import json
import os
import struct
import sys

import numpy as np
import pytest

import moe_py
from moe_py import data
from moe_py.models import ModelConfig
from moe_py.telemetry import LOAD_KEYS, load_bands, load_metrics, load_shares, load_stats
from moe_py.train import TrainConfig, read_metrics, train

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
NEW_KEYS = (*LOAD_KEYS.values(), "assignments_before_capacity", "assignments_after_capacity", "dead_share")


def test_load_stats_are_numpys_on_a_hand_made_load():
    tokens = np.array([0, 2, 4, 6, 8])  # mean 4: shares 0, .5, 1, 1.5, 2
    shares = tokens / tokens.mean()
    s = load_stats(tokens)
    assert s["min"] == 0.0 and s["max"] == 2.0 and s["p50"] == 1.0
    # linear interpolation: the 5th percentile sits 0.2 of the way from share 0 to share 0.5
    assert s["p5"] == pytest.approx(0.1) and s["p95"] == pytest.approx(1.9)
    assert s["std"] == pytest.approx(np.sqrt(0.5))  # population std of the shares
    rng = np.random.default_rng(0)
    for tokens in (rng.integers(0, 50, 8), rng.integers(0, 3, 64), np.array([7]), np.array([0, 0, 9, 1])):
        shares = tokens / tokens.mean()
        s = load_stats(tokens)
        assert s["min"] == pytest.approx(shares.min()) and s["max"] == pytest.approx(shares.max())
        assert s["std"] == pytest.approx(np.std(shares))
        for name, q in (("p5", 5), ("p50", 50), ("p95", 95)):
            assert s[name] == pytest.approx(np.percentile(shares, q, method="linear")), name
    # shares of any scale (expert_share sums to 1) give the same statistics as the counts
    assert load_stats(tokens / tokens.sum()) == pytest.approx(load_stats(tokens))
    assert load_shares([0, 0, 0]).tolist() == [0.0, 0.0, 0.0]  # nothing routed: no division by 0


def test_load_metrics_count_assignments_drops_and_dead_experts():
    m = load_metrics([np.array([3, 0, 5, 0]), np.array([2, 2, 2, 2])], dropped=[1, 0])
    assert m["assignments_before_capacity"] == [8, 8]
    assert m["assignments_after_capacity"] == [7, 8]
    assert m["dead_share"] == [0.5, 0.0]
    assert m["load_max"] == [2.5, 1.0] and m["load_min"] == [0.0, 1.0] and m["load_std"][1] == 0.0
    assert all(isinstance(v, int) for v in m["assignments_before_capacity"] + m["assignments_after_capacity"])


def tiny_run(tmp_path, steps=4, **train_kw):
    moe = moe_py.MoEConfig(d_model=16, d_ff=8, num_experts=4, top_k=2, capacity_factor=1.0)
    model = ModelConfig(max_seq_len=16, d_model=16, n_layers=3, n_heads=2, moe=moe, seed=0)
    kw = dict(corpus="synthetic", steps=steps, batch_size=4, seq_len=16, warmup=1, eval_every=2,
              eval_batches=1, checkpoint_every=100, grad_accum=2)
    kw.update(train_kw)
    out = str(tmp_path / "run")
    train(model, TrainConfig(**kw), out, corpus=data.synthetic_corpus(n_docs=60, split_seed=0), quiet=True)
    return out


def test_a_training_run_logs_the_load_distribution_per_layer(tmp_path):
    rows = read_metrics(tiny_run(tmp_path))
    for r in rows:
        for key in NEW_KEYS:
            assert len(r[key]) == 3, key  # one per MoE layer
        for i, share in enumerate(r["expert_share"]):
            before, after = r["assignments_before_capacity"][i], r["assignments_after_capacity"][i]
            # top-2 over every real token of both micro-batches; capacity 1.0 drops some
            assert 0 < after <= before and before % 2 == 0
            assert before - after == round(r["drop_rate"][i] * before)
            s = load_stats(share)
            for stat, key in LOAD_KEYS.items():
                assert r[key][i] == pytest.approx(s[stat], abs=1e-5), key
            assert r["load_min"][i] <= r["load_p5"][i] <= r["load_p50"][i] <= r["load_p95"][i] <= r["load_max"][i]
            assert r["dead_share"][i] == np.mean(np.asarray(share) == 0)
    # the plots' reader: the logged keys, or the same numbers from expert_share for old runs
    bands = load_bands(rows)
    old = load_bands([{k: v for k, v in r.items() if k not in NEW_KEYS} for r in rows])
    for k in bands:
        assert bands[k].shape == (len(rows), 3)
        np.testing.assert_allclose(old[k], bands[k], atol=1e-5)


# ---- TensorBoard ----------------------------------------------------------------------

def read_events(logdir):
    """Every Event in the TFRecord files of logdir (length, its CRC, the bytes, their CRC),
    parsed with tensorboardX's own protobuf: no TensorBoard UI needed."""
    from tensorboardX.proto.event_pb2 import Event
    events = []
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            raw = f.read()
        at = 0
        while at < len(raw):
            (n,) = struct.unpack("<Q", raw[at:at + 8])
            ev = Event()
            ev.ParseFromString(raw[at + 12:at + 12 + n])
            events.append(ev)
            at += 12 + n + 4
    return events


def need_tensorboardx():
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        if CI:
            pytest.fail("CI installs the tensorboard extra: tensorboardX must import")
        pytest.skip("tensorboardX (the tensorboard extra) is not installed")


def test_train_tensorboard_writes_the_scalars_and_load_histograms(tmp_path):
    need_tensorboardx()
    from moe_py.cli import main
    out = str(tmp_path / "run")
    assert main(["train", "--out", out, "--corpus", "synthetic", "--steps", "3", "--d-model", "16",
                 "--layers", "2", "--heads", "2", "--experts", "4", "--d-ff", "8", "--seq-len", "16",
                 "--batch-size", "4", "--eval-every", "2", "--eval-batches", "1", "--tensorboard",
                 "--quiet"]) == 0
    scalars, hists = {}, {}
    for ev in read_events(os.path.join(out, "tensorboard")):
        for v in ev.summary.value:
            if v.HasField("histo"):
                hists.setdefault(v.tag, {})[ev.step] = v.histo
            else:
                scalars.setdefault(v.tag, {})[ev.step] = v.simple_value
    rows = read_metrics(out)
    for r in rows:
        assert scalars["loss"][r["step"]] == pytest.approx(r["loss"])
        assert scalars["lr"][r["step"]] == pytest.approx(r["lr"])
        for i in range(2):
            for key in ("load_balance", "entropy", "max_over_mean", "dead_share", *LOAD_KEYS.values()):
                assert scalars[f"layer{i}/{key}"][r["step"]] == pytest.approx(r[key][i], rel=1e-6), key
            h = hists[f"layer{i}/load"][r["step"]]
            assert h.num == 4 and h.max == pytest.approx(r["load_max"][i], rel=1e-5)
    assert sorted(scalars["val_loss"]) == [2, 3]
    assert {"grad_norm", "aux_loss"} <= set(scalars)
    # not part of the run: resuming with or without it is the same run
    with open(os.path.join(out, "config.json")) as f:
        assert "tensorboard" not in json.load(f)["train"]
    assert main(["train", "--out", out, "--resume", "--steps", "4", "--tensorboard", "--quiet"]) == 0
    steps = sorted({ev.step for ev in read_events(os.path.join(out, "tensorboard")) if ev.summary.value})
    assert steps == [1, 2, 3, 4]


def test_a_missing_tensorboard_extra_is_named(monkeypatch):
    from moe_py.tensorboard_log import TensorBoardLog
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import fails as if not installed
    with pytest.raises(RuntimeError, match=r"pip install 'moe_py\[tensorboard\]'"):
        TensorBoardLog("unused")
