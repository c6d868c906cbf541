"""Collapse reported as episodes: known answers for the watch, a collapsing run that reports
it, and a resumed run that reports what an uninterrupted one does."""
import pytest

import moe_py
from moe_py import data
from moe_py.collapse import CollapseWatch, summary_lines, worst_max_over_mean
from moe_py.models import ModelConfig
from moe_py.train import TrainConfig, read_metrics, train

BALANCED = [[0.25, 0.25, 0.25, 0.25]]
DEAD = [[0.5, 0.49, 0.01, 0.0]]  # an expert at 0 x uniform


def feed(watch, steps_and_shares):
    return [watch.update(step, share) for step, share in steps_and_shares]


def test_an_episode_is_confirmed_after_the_streak_and_closed_by_a_good_step():
    w = CollapseWatch(low_share=0.1, max_over_mean=3.0, steps=3)
    out = feed(w, [(1, DEAD), (2, DEAD), (3, BALANCED), (4, DEAD), (5, DEAD)])
    assert out == [[]] * 5  # two bad steps, a good one: the streak restarts
    fired = w.update(6, DEAD)
    assert len(fired) == 1 and "layer 0 since step 4" in fired[0]
    # the template quotes the value that crossed (0.00 < 0.1), not the one within (1.96 < 3)
    assert "smallest expert share 0.00 x uniform (threshold 0.1)" in fired[0] and "largest" not in fired[0]
    assert w.update(7, DEAD) == []  # reported once while it lasts
    assert w.stable_since() is None
    closed = w.update(8, BALANCED)
    assert len(closed) == 1 and "back within thresholds at step 8" in closed[0] and "steps 4-7" in closed[0]
    assert w.stable_since() == 8
    assert [(e.start, e.end) for e in w.episodes] == [(4, 7)]


def test_every_episode_is_kept_and_the_summary_says_since_when_all_is_well():
    w = CollapseWatch(0.1, 3.0, 2)
    feed(w, [(1, DEAD), (2, DEAD), (3, BALANCED), (4, BALANCED), (5, DEAD), (6, DEAD), (7, DEAD), (8, BALANCED)])
    s = w.summary(DEAD)
    assert [(e["start"], e["end"]) for e in s["episodes"]] == [(1, 2), (5, 7)]
    assert s["stable_since"] == 8 and s["dead_experts"] == [[3]]
    lines = summary_lines(s, 8)
    assert "steps 1-2" in lines[0] and "steps 5-7" in lines[0]
    assert "all layers within thresholds since step 8" in lines[1]
    assert lines[2] == "dead experts at the last step: layer 0: [3]"
    quiet = CollapseWatch(0.1, 3.0, 2)
    feed(quiet, [(1, BALANCED)])
    assert "no collapse episode" in summary_lines(quiet.summary(BALANCED), 1)[0]


def test_piled_load_crosses_the_high_threshold():
    piled = CollapseWatch(0.1, 3.0, 1).update(1, [[0.8, 0.1, 0.05, 0.05], [0.25] * 4])
    assert len(piled) == 1 and "layer 0" in piled[0] and "largest 3.20 x uniform" in piled[0]
    assert "smallest" not in piled[0]
    assert worst_max_over_mean([[0.8, 0.1, 0.05, 0.05], [0.25] * 4]) == pytest.approx(3.2)


def _tiny(collapse_low_share=2.0, steps=4):
    moe = moe_py.MoEConfig(d_model=16, d_ff=16, num_experts=4, top_k=1, load_balance_coef=0.0)
    model = ModelConfig(max_seq_len=16, d_model=16, n_layers=1, n_heads=2, moe=moe)
    # low_share 2.0: a threshold no real routing meets, every step counts as collapsed
    tc = TrainConfig(corpus="synthetic", steps=steps, batch_size=4, seq_len=16, eval_every=4,
                     eval_batches=1, collapse_low_share=collapse_low_share, collapse_steps=3,
                     checkpoint_every=2)
    return model, tc


def test_a_collapsing_run_reports_the_episode_and_its_summary(tmp_path):
    model, tc = _tiny()
    with pytest.warns(RuntimeWarning, match="routing collapse in layer 0 since step 1"):
        train(model, tc, str(tmp_path), corpus=data.synthetic_corpus(n_docs=30), quiet=True)
    rows = read_metrics(str(tmp_path))
    assert [("collapse_events" in r) for r in rows] == [False, False, True, False]
    assert all(len(r["max_over_mean"]) == 1 for r in rows)
    summary = rows[-1]["collapse_summary"]
    assert summary["stable_since"] is None and summary["episodes"][0]["start"] == 1
    assert "collapse_summary" not in rows[-2]


def test_a_resumed_run_reports_the_episodes_of_an_uninterrupted_one(tmp_path):
    model, tc = _tiny(steps=6)
    corpus = data.synthetic_corpus(n_docs=30)
    with pytest.warns(RuntimeWarning):
        train(model, tc, str(tmp_path / "whole"), corpus=corpus, quiet=True)
    train(model, tc, str(tmp_path / "parts"), corpus=corpus, quiet=True, until=2)  # no episode yet
    # the episode was confirmed at step 3, after the resume: the replayed steps 1-2 count
    with pytest.warns(RuntimeWarning, match="since step 1"):
        train(model, tc, str(tmp_path / "parts"), corpus=corpus, quiet=True, resume=True)
    whole, parts = read_metrics(str(tmp_path / "whole")), read_metrics(str(tmp_path / "parts"))
    assert whole[-1]["collapse_summary"] == parts[-1]["collapse_summary"]
