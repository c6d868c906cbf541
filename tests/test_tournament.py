"""The router tournament end to end on a tiny model: its table's numbers are recomputed here
from the runs' own files (metrics.jsonl by hand, routing by routing the held-out sample
through the checkpoints with NumPy), a rerun trains nothing and rewrites the same bytes, and
entries and arguments this moe_py cannot run fail naming themselves."""
import json
import os
import statistics

import numpy as np
import pytest

from moe_py.checkpoint import load_model
from moe_py.cli import main
from moe_py.config import MoEConfig
from moe_py.data import BatchSampler, load_corpus
from moe_py.models import ModelConfig, TransformerLM
from moe_py.train import TrainConfig
from moe_py.tournament import Entry, entry_configs, run_tournament
from moe_py.tournament.table import comparisons

ENTRIES = ["dense", "softmax_lb", "softmax_noise"]
STEPS = 6
TINY = ["--corpus", "synthetic", "--d-model", "16", "--layers", "2", "--heads", "2", "--experts", "4",
        "--d-ff", "8", "--seq-len", "16", "--batch-size", "4", "--eval-every", "3",
        "--eval-batches", "2", "--checkpoint-every", "3"]


def tournament(out, *extra):
    return main(["tournament", "--out", out, "--routers", *ENTRIES, "--seeds", "2",
                 "--steps", str(STEPS), *TINY, *extra])


def metrics(path):
    with open(os.path.join(path, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def held_out_routing(checkpoint):
    """The run's validation sample routed through `checkpoint` (eval mode): per MoE layer
    the top-k indices and clean probabilities of the real tokens."""
    model, raw = load_model(checkpoint)
    tc = json.loads(str(raw["train_config"]))
    # the split and the held-out windows come from the split seed, never the run's seed
    corpus = load_corpus(tc["corpus"], split_seed=tc["split_seed"], max_bytes=tc["corpus_bytes"])
    sampler = BatchSampler(corpus.val, tc["batch_size"], tc["seq_len"], tc["split_seed"])
    idx, probs = [], []
    for batch in sampler.iter_eval(tc["eval_batches"]):
        out = model.forward(batch.inputs, batch.mask, training=False)
        real = batch.mask.reshape(-1)
        idx.append([r.topk_indices[real] for r in out.routers])
        probs.append([r.router_probs_clean[real] for r in out.routers])
    return ([np.concatenate(layer) for layer in zip(*idx)],
            [np.concatenate(layer).astype(np.float64) for layer in zip(*probs)])


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tournament") / "t")
    # an interrupted run waiting to be resumed: softmax_lb seed 1 stopped after step 3. It is
    # made by `train` with its defaults, so the tournament taking it as its own (it refuses a
    # folder of another config) shows that softmax_lb is the default `train` run
    assert main(["train", "--out", os.path.join(out, "softmax_lb", "seed-1"), "--steps", str(STEPS),
                 "--seed", "1", *TINY]) == 0
    full = metrics(os.path.join(out, "softmax_lb", "seed-1"))
    from moe_py.run_folder import RunFolder
    folder = RunFolder(os.path.join(out, "softmax_lb", "seed-1"))
    folder.truncate_metrics(3)
    folder.steps_after(3)
    folder.publish(folder.step_checkpoint(3), 5)
    assert tournament(out) == 0
    with open(os.path.join(out, "tournament.json")) as f:
        table = json.load(f)
    return out, {r["entry"]: r for r in table["rows"]}, full


def test_val_loss_and_its_interval_come_from_each_runs_metrics(done):
    t_975_1 = 12.706204736174698  # Student t, 1 degree of freedom, 0.975 quantile (tables)
    out, rows, _ = done
    assert list(rows) == ENTRIES
    for name, row in rows.items():
        runs = [metrics(os.path.join(out, name, f"seed-{s}")) for s in (0, 1)]
        finals = [m[-1]["val_loss"] for m in runs]
        assert [m[-1]["step"] for m in runs] == [STEPS, STEPS]
        assert row["val_loss"]["per_seed"] == finals
        assert row["val_loss"]["mean"] == pytest.approx(statistics.mean(finals), rel=1e-12)
        assert row["val_loss"]["std"] == pytest.approx(statistics.stdev(finals), rel=1e-9)
        assert row["val_loss"]["half_width"] == pytest.approx(t_975_1 * statistics.stdev(finals) / 2 ** 0.5,
                                                              rel=1e-9)
        assert "tokens_per_s" not in row  # runs made at different loads are no benchmark
    with open(os.path.join(out, "tournament.md")) as f:
        md = f.read()
    v = rows["softmax_lb"]["val_loss"]
    assert f"| `softmax_lb` | 0.003 | {v['mean']:.4f} ± {v['half_width']:.4f} |" in md
    assert "tokens/s" not in md


def test_specialisation_columns_come_from_analysis_json(done):
    out, rows, _ = done
    row = rows["softmax_lb"]
    for s in (0, 1):
        with open(os.path.join(out, "softmax_lb", f"seed-{s}", "analysis.json")) as f:
            res = json.load(f)
        for key in ("mi", "mi_first_choice", "mi_given_byte"):
            assert row[key]["per_seed_per_layer"][s] == res[key]
        assert row["mi_byte_null"]["per_seed_per_layer"][s] == [b["mean"] for b in res["mi_byte_null"]]
        assert row["mi_given_byte_floor"]["per_seed_per_layer"][s] == [b["mean"] for b in res["mi_given_byte_floor"]]
    assert len(row["beyond_byte"]) == 2 and all(0 <= b <= 2 for b in row["beyond_byte"])


def test_routing_numbers_match_the_checkpoints(done):
    out, rows, _ = done
    row = rows["softmax_noise"]
    for s in (0, 1):
        run = os.path.join(out, "softmax_noise", f"seed-{s}")
        idx, probs = held_out_routing(os.path.join(run, "checkpoint.npz"))
        load = [np.bincount(i.reshape(-1), minlength=4).max() / (i.size / 4) for i in idx]
        assert row["max_over_mean"]["per_seed_per_layer"][s] == pytest.approx(load, rel=1e-12)
        entropy = [float(-(p * np.log(np.where(p > 0, p, 1))).sum(1).mean()) for p in probs]
        assert row["entropy"]["per_seed_per_layer"][s] == pytest.approx(entropy, abs=1e-5)
        before, _ = held_out_routing(os.path.join(run, "checkpoints", "step-000003.npz"))
        changed = [float((a[:, 0] != b[:, 0]).mean()) for a, b in zip(before, idx)]
        assert row["top1_changed"]["per_seed_per_layer"][s] == pytest.approx(changed, rel=1e-12)
    assert row["top1_changed"]["between_steps"] == [3, STEPS]
    assert row["drop_rate"]["mean"] == 0 and row["unrouted"]["mean"] == 0  # dropless
    assert "max_over_mean" not in rows["dense"]


def test_budget_dense_width_is_top_k_experts(done):
    _, rows, _ = done
    router = 2 * 16 * 4  # two MoE layers of d_model x E router weights
    assert rows["dense"]["params_active"] == rows["softmax_lb"]["params_active"] - router
    assert rows["softmax_lb"]["params_active"] == rows["softmax_noise"]["params_active"]
    base = ModelConfig(moe=MoEConfig())  # at the default sizes too
    dense, _ = entry_configs(Entry("d", "", None), base, TrainConfig(), 0)
    moe, _ = entry_configs(Entry("m", "", {"router": "softmax_topk"}), base, TrainConfig(), 0)
    d, m = TransformerLM(dense).num_parameters(), TransformerLM(moe).num_parameters()
    assert d["active"] == m["active"] - 4 * 128 * 8


def test_interrupted_run_was_resumed_and_rerun_reproduces(done, capsys):
    out, _, full = done
    resumed = metrics(os.path.join(out, "softmax_lb", "seed-1"))
    def strip(rows):  # all but the timing and memory of each step
        return [{k: v for k, v in m.items() if k not in ("tokens_per_s", "rss_mib")} for m in rows]
    assert strip(resumed) == strip(full)  # resumed from step 3 as if never stopped...
    assert resumed[:3] == full[:3]  # ...and not retrained: steps 1-3 keep their own timings
    files = {n: open(os.path.join(out, n), "rb").read() for n in ("tournament.md", "tournament.json")}
    stamp = os.stat(os.path.join(out, "dense", "seed-0", "metrics.jsonl")).st_mtime_ns
    capsys.readouterr()
    assert tournament(out) == 0
    assert "0 trained, 0 resumed, 6 complete already" in capsys.readouterr().out
    assert os.stat(os.path.join(out, "dense", "seed-0", "metrics.jsonl")).st_mtime_ns == stamp
    for name, data in files.items():
        with open(os.path.join(out, name), "rb") as f:
            assert f.read() == data, name
    for png in ("val_loss", "load_imbalance", "specialisation", "expert_label_grid"):
        with open(os.path.join(out, png + ".png"), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", png
    assert main(["analyze", os.path.join(out, "softmax_lb", "seed-0")]) == 0


def test_a_changed_config_is_refused_naming_the_entry(done, capsys):
    out, _, _ = done
    capsys.readouterr()
    assert tournament(out, "--lr", "0.001") == 2
    err = capsys.readouterr().err
    assert "'dense'" in err and "train.lr" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv,word", [(["--seeds", "0"], "seeds"), (["--routers", "nope"], "routers")])
def test_bad_arguments(argv, word, tmp_path, capsys):
    assert main(["tournament", "--out", str(tmp_path / "t"), *argv, *TINY]) == 2
    err = capsys.readouterr().err
    assert word in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "t")


@pytest.mark.parametrize("moe", [{"router": "no_such_router"}, {"router": "softmax_topk", "no_such_field": 1}])
def test_a_rejected_entry_fails_before_anything_trains(moe, tmp_path):
    entries = (Entry("dense", "", None), Entry("future", "a router this moe_py lacks", moe))
    with pytest.raises(ValueError, match="tournament entry 'future'"):
        run_tournament(str(tmp_path / "t"), entries=entries, progress=False)
    assert not os.path.exists(tmp_path / "t")


def test_comparisons_are_paired_t_tests_with_one_holm_correction():
    scipy_stats = pytest.importorskip("scipy.stats")

    def row(name, losses):
        return {"entry": name, "val_loss": {"per_seed": losses}}
    rows = [row("a", [1.0, 1.2, 1.1]), row("b", [1.5, 1.71, 1.6]), row("c", [1.3, 1.0, 1.2])]
    tests = comparisons(rows)
    assert [(t["a"], t["b"]) for t in tests] == [("a", "b"), ("a", "c"), ("b", "c")]
    p = [scipy_stats.ttest_rel(x["val_loss"]["per_seed"], y["val_loss"]["per_seed"]).pvalue
         for x, y in ((rows[0], rows[1]), (rows[0], rows[2]), (rows[1], rows[2]))]
    assert [t["p"] for t in tests] == pytest.approx(p, rel=1e-8)
    order = np.argsort(p)  # Holm: the smallest p times 3, the next times 2, ...
    expected = np.maximum.accumulate(np.minimum(1, np.array(p)[order] * [3, 2, 1]))
    assert [tests[i]["p_holm"] for i in order] == pytest.approx(list(expected), rel=1e-8)
    assert [t["separable"] for t in tests] == [p_holm < 0.05 for p_holm in (t["p_holm"] for t in tests)]
    assert tests[0]["separable"]  # b is above a by 0.5 +- 0.01 at every seed
    assert not tests[1]["separable"]  # a and c cross
    one_seed = comparisons([row("a", [1.0]), row("b", [2.0])])
    assert one_seed[0]["p"] is None and not one_seed[0]["separable"]


def test_the_entry_table_names_every_router_of_the_issue_once():
    from moe_py.tournament import ENTRIES, available_entries
    routers = [e.moe["router"] for e in ENTRIES if e.moe is not None]
    assert sorted(set(routers)) == ["expert_choice", "hash", "sigmoid_topk", "sinkhorn", "softmax_topk",
                                    "sqrtsoftplus_topk"]
    assert len({e.name for e in ENTRIES}) == len(ENTRIES) == 16
    assert all("load_balance_coef" in e.moe for e in ENTRIES if e.moe is not None)
    assert {"dense", "softmax_lb", "softmax_noise"} <= set(available_entries())
    assert set(available_entries()) == {e.name for e in ENTRIES}  # every router of this moe_py


def test_the_families_router_entries_train_and_make_a_row(tmp_path):
    # the transformers families' variants (entries.py), each trained by the tournament itself
    new = ["softmax_router_bias", "softmax_group_max", "softmax_bias", "sqrtsoftplus_bias",
           "softmax_unnormalised", "sigmoid_input", "gpt_oss"]
    out = str(tmp_path / "t")
    assert main(["tournament", "--out", out, "--routers", *new, "--seeds", "1", "--steps", "2",
                 *TINY]) == 0
    with open(os.path.join(out, "tournament.json")) as f:
        rows = {r["entry"]: r for r in json.load(f)["rows"]}
    assert list(rows) == new
    for name in new:
        final = metrics(os.path.join(out, name, "seed-0"))[-1]
        assert final["step"] == 2 and np.isfinite(final["val_loss"])
        assert rows[name]["val_loss"]["per_seed"] == [final["val_loss"]]
