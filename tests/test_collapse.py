"""Collapse warnings: known answers for the watch, and a collapsing run that warns."""
import pytest

import moe_py
from moe_py import data
from moe_py.collapse import CollapseWatch, worst_max_over_mean
from moe_py.models import ModelConfig
from moe_py.train import TrainConfig, read_metrics, train


def test_watch_fires_once_after_the_streak():
    w = CollapseWatch(low_share=0.1, max_over_mean=3.0, steps=3)
    balanced = [[0.25, 0.25, 0.25, 0.25]]
    dead = [[0.5, 0.49, 0.01, 0.0]]  # an expert at 0 x uniform
    assert w.update(dead) == [] and w.update(dead) == []
    assert w.update(balanced) == []  # the streak restarts
    assert w.update(dead) == [] and w.update(dead) == []
    fired = w.update(dead)
    assert len(fired) == 1 and "layer 0" in fired[0]
    assert w.update(dead) == []  # once per layer
    piled = CollapseWatch(0.1, 3.0, 1).update([[0.8, 0.1, 0.05, 0.05], [0.25] * 4])
    assert len(piled) == 1 and "layer 0" in piled[0]
    assert worst_max_over_mean([[0.8, 0.1, 0.05, 0.05], [0.25] * 4]) == pytest.approx(3.2)


def test_a_collapsing_run_warns_and_logs_it(tmp_path):
    moe = moe_py.MoEConfig(d_model=16, d_ff=16, num_experts=4, top_k=1, load_balance_coef=0.0)
    model = ModelConfig(max_seq_len=16, d_model=16, n_layers=1, n_heads=2, moe=moe)
    # a threshold no real routing meets: every step counts as collapsed
    tc = TrainConfig(corpus="synthetic", steps=4, batch_size=4, seq_len=16, eval_every=4,
                     eval_batches=1, collapse_low_share=2.0, collapse_steps=3)
    with pytest.warns(RuntimeWarning, match="routing collapse in layer 0"):
        train(model, tc, str(tmp_path), corpus=data.synthetic_corpus(n_docs=30), quiet=True)
    rows = read_metrics(str(tmp_path))
    assert [("collapse_warnings" in r) for r in rows] == [False, False, True, False]
    assert all(len(r["max_over_mean"]) == 1 for r in rows)
