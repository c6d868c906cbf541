"""Upcycling a dense run (moe_py/upcycle.py, `python -m moe_py upcycle`): the MoE computes
its dense parent's function at step 0, the experts are the FFN's copies or shards with
Drop-Upcycling's re-initialised units, and the run folder trains on with train --resume."""
import json
import os
import re

import numpy as np
import pytest

from moe_py.checkpoint import load_model
from moe_py.cli import main
from moe_py.config import MoEConfig
from moe_py.models import ModelConfig, TransformerLM
from moe_py.train import TrainConfig, read_metrics, train
from moe_py.upcycle import upcycle_model, upcycle_run, upcycled_configs, weight_sum_at_uniform

D_FF = 64  # the dense FFN's width


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    """A dense float32 run of a few steps: d_model 32, 2 layers."""
    out = str(tmp_path_factory.mktemp("upcycle") / "dense")
    mc = ModelConfig(d_model=32, n_layers=2, n_heads=2, d_ff=D_FF, max_seq_len=32)
    tc = TrainConfig(corpus="synthetic", steps=12, batch_size=4, seq_len=32, eval_every=6, eval_batches=2,
                     checkpoint_every=6, warmup=2)
    train(mc, tc, out, quiet=True)
    return out


@pytest.mark.parametrize("experts,granularity,top_k,router", [
    (4, 1, 1, "softmax_topk"),  # unnormalised: router 0, W2 x E
    (4, 1, 2, "softmax_topk"),  # normalised: moe_py's router init, W2 as it is
    (8, 2, 2, "softmax_topk"),  # granular: one router column per copy, W2 x g
    (8, 2, 4, "softmax_topk"),
    (4, 1, 2, "sigmoid_topk"),
    (4, 1, 1, "sigmoid_topk"),  # unnormalised sigmoid: W2 x 2
    (4, 1, 2, "sqrtsoftplus_topk"),
])
def test_upcycled_model_computes_the_dense_function_at_step_0(dense_run, tmp_path, experts, granularity,
                                                              top_k, router):
    rec = upcycle_run(dense_run, str(tmp_path / "up"), experts, granularity, top_k=top_k,
                      moe={"router": router})
    assert rec["exact_at_step_0"]
    assert abs(rec["val_loss"]["dense"] - rec["val_loss"]["upcycled"]) < 1e-6, rec["val_loss"]
    # and on a batch the logits agree to float32 rounding
    dense, _ = load_model(os.path.join(dense_run, "checkpoint.npz"))
    up, data = load_model(os.path.join(tmp_path, "up", "checkpoint.npz"))
    assert int(data["step"]) == 0 and int(data["optim.t"]) == 0
    ids = np.random.default_rng(0).integers(0, 256, (3, 32))
    a = dense.forward(ids, training=False).head_logits[0]
    b = up.forward(ids, training=False).head_logits[0]
    np.testing.assert_allclose(b, a, atol=2e-5, rtol=0)


def test_the_cli_prints_both_losses_and_the_run_trains_on_with_resume(dense_run, tmp_path, capsys):
    out = str(tmp_path / "up")
    assert main(["upcycle", dense_run, "--num-experts", "4", "--top-k", "2", "--out", out,
                 "--steps", "3"]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    m = re.fullmatch(r"val loss: dense ([\d.]+), upcycled ([\d.]+)", line)
    assert m, line
    assert abs(float(m.group(1)) - float(m.group(2))) < 1e-6
    assert read_metrics(out) == []
    saved = json.loads(open(os.path.join(out, "config.json")).read())
    assert saved["model"]["moe"]["num_experts"] == 4 and saved["model"]["moe"]["d_ff"] == D_FF
    assert saved["train"]["steps"] == 3 and saved["train"]["lr_decay_steps"] == 3
    assert main(["train", "--out", out, "--resume", "--quiet"]) == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3] and "expert_share" in rows[0]
    assert np.isfinite(rows[-1]["val_loss"])
    # a second upcycle into the same folder is refused, and an MoE run is no parent
    assert main(["upcycle", dense_run, "--num-experts", "4", "--out", out]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["upcycle", out, "--num-experts", "4", "--out", str(tmp_path / "x")]) == 2
    assert "dense" in capsys.readouterr().err


def _dense_and_configs(dense_run, experts, granularity, top_k=None, seed=0):
    dense, data = load_model(os.path.join(dense_run, "checkpoint.npz"))
    tc = TrainConfig.from_dict(json.loads(str(data["train_config"])))
    cfg, _ = upcycled_configs(dense.cfg, tc, experts, granularity, top_k, seed)
    return dense, cfg


@pytest.mark.parametrize("granularity", [1, 2])
def test_experts_are_the_ffns_shards_with_drop_upcycling_units_reinitialised(dense_run, granularity):
    E, r = 4, 0.25
    dense, cfg = _dense_and_configs(dense_run, E, granularity)
    model, facts = upcycle_model(dense, cfg, granularity, reinit_fraction=r, seed=3)
    fresh = TransformerLM(cfg)  # the values the re-initialised units take: moe_py's own init
    Fe = D_FF // granularity
    n = int(round(r * Fe))
    assert facts["units_reinit_per_expert"] == n and not facts["exact_at_step_0"]
    for i, block in enumerate(model.blocks):
        p, dp, fp = block.ffn.params, dense.blocks[i].ffn.params, fresh.blocks[i].ffn.params
        subsets = set()
        for e in range(E):
            cols = slice((e % granularity) * Fe, (e % granularity + 1) * Fe)
            drop = np.array(facts["reinit_units"][f"block {i}"][e], np.int64)
            keep = np.setdiff1d(np.arange(Fe), drop)
            assert len(drop) == n
            subsets.add(tuple(drop))
            for k in ("w1", "w3"):
                np.testing.assert_array_equal(p[k][e][:, keep], dp[k][0][:, cols][:, keep])
                np.testing.assert_array_equal(p[k][e][:, drop], fp[k][e][:, drop])
            s = p["w2"].dtype.type(facts["w2_scale"])
            np.testing.assert_array_equal(p["w2"][e][keep], dp["w2"][0][cols][keep] * s)
            np.testing.assert_array_equal(p["w2"][e][drop], fp["w2"][e][drop] * s)
        assert len(subsets) > 1  # a subset per expert
        # the shards of one copy share their router column
        w = p["w_router"]
        for e in range(E):
            np.testing.assert_array_equal(w[:, e], w[:, (e // granularity) * granularity])
    # everything outside the FFNs is the dense model's
    dense_params = {n: v for n, v, _ in dense.named_parameters()}
    for name, v, _ in model.named_parameters():
        if ".ffn." not in name:
            np.testing.assert_array_equal(v, dense_params[name])


def test_the_w2_scale_undoes_the_uniform_weights():
    # normalised weights sum to 1, unnormalised softmax ones to k / E, sigmoid ones to k / 2
    assert weight_sum_at_uniform(MoEConfig(d_model=8, num_experts=4, top_k=2)) == pytest.approx(1.0)
    assert weight_sum_at_uniform(MoEConfig(d_model=8, num_experts=4, top_k=1)) == pytest.approx(0.25)
    assert weight_sum_at_uniform(MoEConfig(d_model=8, num_experts=4, top_k=1, router="sigmoid_topk")) \
        == pytest.approx(0.5)


@pytest.mark.parametrize("kw,word", [
    (dict(num_experts=4, granularity=3), "granularity"),  # 3 does not divide d_ff 64
    (dict(num_experts=3, granularity=2), "num_experts"),  # not a multiple of g
    (dict(num_experts=4, reinit_fraction=1.5), "reinit_fraction"),
    (dict(num_experts=4, moe={"router": "expert_choice"}), "router"),
    (dict(num_experts=4, moe={"combine": "input"}), "combine"),
])
def test_bad_upcycles_are_refused(dense_run, tmp_path, kw, word):
    with pytest.raises(ValueError, match=word):
        upcycle_run(dense_run, str(tmp_path / "up"), **kw)
    assert not os.path.exists(tmp_path / "up" / "config.json")


def test_the_upcycled_tournament_entry_trains_half_dense_then_half_upcycled_resumably(tmp_path):
    from moe_py.run_folder import RunFolder
    from moe_py.tournament import run_tournament
    from moe_py.tournament.entries import UPCYCLE_SEED_OFFSET
    out = str(tmp_path / "t")
    base_model = ModelConfig(d_model=16, n_layers=2, n_heads=2, max_seq_len=16,
                             moe=MoEConfig(d_model=16, d_ff=8, num_experts=4, top_k=2))
    base_train = TrainConfig(corpus="synthetic", steps=6, batch_size=4, seq_len=16, eval_every=3, eval_batches=2,
                             checkpoint_every=3)
    kw = dict(routers=["dense", "upcycled"], seeds=1, base_model=base_model, base_train=base_train,
              progress=False)
    table = run_tournament(out, **kw)
    run, parent = os.path.join(out, "upcycled", "seed-0"), os.path.join(out, "upcycled", "dense-parent-seed-0")
    assert table["actions"] == {os.path.join(out, "dense", "seed-0"): "trained", run: "trained"}
    p_cfg, u_cfg = RunFolder(parent).read_config(), RunFolder(run).read_config()
    assert p_cfg["model"]["moe"] is None and p_cfg["model"]["d_ff"] == 16 and p_cfg["train"]["steps"] == 3
    moe = u_cfg["model"]["moe"]
    # granularity top_k: E experts of the MoE entries' width, k per token (the parent's active FLOPs)
    assert (moe["num_experts"], moe["d_ff"], moe["top_k"]) == (4, 8, 2)
    assert u_cfg["train"]["steps"] == 3 and u_cfg["train"]["seed"] == UPCYCLE_SEED_OFFSET
    record = json.loads(open(os.path.join(run, "upcycle.json")).read())
    assert record["parent_step"] == 3 and record["exact_at_step_0"]
    assert abs(record["val_loss"]["dense"] - record["val_loss"]["upcycled"]) < 1e-6
    row = next(r for r in table["rows"] if r["entry"] == "upcycled")
    final = read_metrics(run)[-1]["val_loss"]
    assert row["val_loss"]["mean"] == pytest.approx(final)
    # the loss curve covers the whole run: the parent's steps, then the upcycled ones after them
    from moe_py.tournament.summary import summarise_run
    assert [s for s, _ in summarise_run(run)["val_curve"]] == [3, 6]
    # interrupted at step 0 of its second half: resumed, to the same numbers
    folder = RunFolder(run)
    folder.truncate_metrics(0)
    folder.steps_after(0)
    folder.publish(folder.step_checkpoint(0), 5)
    parent_ckpt = os.stat(os.path.join(parent, "checkpoint.npz")).st_mtime_ns
    again = run_tournament(out, **kw)
    assert again["actions"][run] == "trained"  # all its steps, from its step-0 checkpoint
    assert os.stat(os.path.join(parent, "checkpoint.npz")).st_mtime_ns == parent_ckpt  # kept
    assert RunFolder(run).kept_checkpoints()[0].endswith("step-000000.npz")
    assert read_metrics(run)[-1]["val_loss"] == final
