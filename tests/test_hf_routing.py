"""moe_py.hf.routing.collect_routing and `analyze-hf` on tiny random transformers checkpoints
(built here with save_pretrained; nothing downloads). Expected routing comes from the
model's own forward (output_router_logits) and the gate formulas written out in torch."""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from moe_py import analysis  # noqa: E402
from moe_py.cli import main  # noqa: E402
from moe_py.hf.routing import collect_routing  # noqa: E402

COMMON = dict(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, num_experts_per_tok=2)


def qwen3():
    return transformers.Qwen3MoeConfig(**COMMON, intermediate_size=32, moe_intermediate_size=16, head_dim=8,
                                       num_experts=8, norm_topk_prob=True)


def olmoe():
    return transformers.OlmoeConfig(**COMMON, intermediate_size=16, num_experts=8)  # norm_topk_prob False


def deepseek_v3():
    # multi-head latent attention: as many key/value heads as heads
    return transformers.DeepseekV3Config(**{**COMMON, "num_key_value_heads": 4}, intermediate_size=32, moe_intermediate_size=16,
                                         first_k_dense_replace=0, n_routed_experts=8, n_shared_experts=1,
                                         n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
                                         q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
                                         qk_nope_head_dim=8, v_head_dim=8)


def build(config):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # larger router weights than the init, so routing is decided, not a coin flip
        for name, p in model.named_parameters():
            if name.endswith("gate.weight") and p.dim() == 2 and p.shape[0] == _experts(config):
                p.normal_(0, 1.0)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # selection by score + bias, weights by score
                b.copy_(torch.linspace(-0.05, 0.05, b.numel()))
    return model


def _experts(config):
    return getattr(config, "num_experts", None) or config.n_routed_experts


def by_hand(config, logits, model_gate):
    """(indices [T, k] as sets, weights [T, k]) from the router logits, by the family's formula,
    in float64, both sorted by descending weight."""
    logits = logits.double()
    k = config.num_experts_per_tok
    if isinstance(config, transformers.DeepseekV3Config):
        scores = logits.sigmoid()
        choice = scores + model_gate.e_score_correction_bias.double()
        G = config.n_group
        groups = choice.view(len(choice), G, -1).topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(groups).scatter(1, groups.topk(config.topk_group, dim=-1).indices, 1.0)
        choice = choice.masked_fill(keep.repeat_interleave(choice.shape[1] // G, dim=1) == 0, float("-inf"))
        idx = choice.topk(k, dim=-1).indices
        w = scores.gather(1, idx)
        w = w / w.sum(-1, keepdim=True) * config.routed_scaling_factor
        probs = scores
    else:
        probs = logits.softmax(-1)
        w, idx = probs.topk(k, dim=-1)
        if config.norm_topk_prob:
            w = w / w.sum(-1, keepdim=True)
    order = w.argsort(dim=-1, descending=True, stable=True)
    return idx.gather(1, order).numpy(), w.gather(1, order).numpy(), probs.numpy()


def padded_batch(B=3, S=12, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 256, (B, S))
    mask = np.ones((B, S), np.int64)
    mask[1, 7:] = 0  # right padding: a causal model's real tokens do not see it
    mask[2, 3:] = 0
    return ids, mask


@pytest.mark.parametrize("make,scores", [(qwen3, "softmax"), (olmoe, "softmax"), (deepseek_v3, "sigmoid")])
def test_routing_matches_the_models_own_router(make, scores):
    config = make()
    model = build(config)
    ids, mask = padded_batch()
    got = collect_routing(model, [(ids, mask)])
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                    output_router_logits=True, use_cache=False)
    assert len(got.routers) == len(out.router_logits) == 2
    assert got.score_functions == [scores, scores]
    real = mask.reshape(-1).astype(bool)
    assert np.array_equal(got.mask, real) and np.array_equal(got.tokens, ids.reshape(-1))
    gates = [m for n, m in model.named_modules() if n.endswith("mlp.gate")]
    for r, logits, gate in zip(got.routers, out.router_logits, gates):
        idx, w, probs = by_hand(config, logits.reshape(real.size, -1), gate)
        assert np.array_equal(r.topk_indices[real], idx[real])
        np.testing.assert_allclose(r.topk_weights[real], w[real], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(r.router_probs[real], probs[real], rtol=1e-5, atol=1e-7)
        # padding is cleared as moe_py's own routers clear it
        assert (r.topk_indices[~real] == -1).all() and (r.topk_weights[~real] == 0).all()
        assert (r.router_probs[~real] == 0).all() and (r.entropy[~real] == 0).all()
        assert np.array_equal(r.tokens_per_expert,
                              np.bincount(idx[real].reshape(-1), minlength=r.router_probs.shape[1]))


def numbers(tree):
    """Every number of a JSON-like tree, in order."""
    if isinstance(tree, dict):
        return [x for k in sorted(tree) for x in numbers(tree[k])]
    if isinstance(tree, (list, tuple)):
        return [x for v in tree for x in numbers(v)]
    return [float(tree)] if isinstance(tree, (int, float)) else []


def test_padding_is_in_no_statistic():
    """Other ids at the padded positions (right padding, causal model): the same summary."""
    model = build(qwen3())
    ids, mask = padded_batch()
    other = np.where(mask == 1, ids, (ids + 17) % 256)
    a = collect_routing(model, [(ids, mask)])
    b = collect_routing(model, [(other, mask)])
    labels = ids.reshape(-1) % 3
    sa = analysis.summarize(a.routers, labels, ["a", "b", "c"], a.mask, a.tokens, 12)
    sb = analysis.summarize(b.routers, labels, ["a", "b", "c"], b.mask, b.tokens, 12)
    # the same routing of the real tokens; the floats to rounding (the model's own sums
    # over a batch differ in the last bits when the padded rows differ)
    assert all(np.array_equal(x.topk_indices, y.topk_indices) for x, y in zip(a.routers, b.routers))
    assert numbers(sa) == pytest.approx(numbers(sb), rel=1e-5, abs=1e-7)  # a float32 model
    # and without the mask the padded tokens would count
    full = collect_routing(model, [ids])
    assert full.routers[0].tokens_per_expert.sum() == ids.size * 2 > a.routers[0].tokens_per_expert.sum()


def test_batches_concatenate_and_bad_batches_are_named():
    model = build(olmoe())
    ids, mask = padded_batch()
    two = collect_routing(model, [(ids, mask), {"input_ids": ids[:2], "attention_mask": mask[:2]}])
    one = collect_routing(model, [(ids, mask)])
    T = ids.size
    assert two.routers[0].topk_indices.shape[0] == T + 2 * ids.shape[1]
    assert np.array_equal(two.routers[1].topk_indices[:T], one.routers[1].topk_indices)
    with pytest.raises(ValueError, match="batches"):
        collect_routing(model, [ids[0]])
    with pytest.raises(ValueError, match="batches"):
        collect_routing(model, [(ids, mask[:, :3])])
    with pytest.raises(ValueError, match="model"):
        collect_routing(torch.nn.Linear(2, 2), [ids])


def test_cooccurrence_across_layers():
    """layers that route every token the same way: all the information, far above the shuffles."""
    from moe_py.router import RouterOutput
    rng = np.random.default_rng(0)
    T, E = 400, 4
    idx = np.stack([rng.permutation(E)[:2] for _ in range(T)])
    probs = np.full((T, E), 0.25)
    r = RouterOutput(np.full((T, 2), 0.5), idx, probs, probs, np.zeros((T, E)), np.zeros(T),
                     np.bincount(idx.reshape(-1), minlength=E), np.zeros((T, 2), bool))
    same = analysis.cross_layer_cooccurrence(r, r)
    assert same["above_null"] and same["mi"] > same["mi_shuffled"]["p95"]
    # the all-slot table counts k * k pairs per token; the first-choice one is unchanged
    assert analysis.layer_transitions(r, r, slot="all").sum() == T * 4
    assert analysis.layer_transitions(r, r).sum() == T
    other = r._replace(topk_indices=np.stack([rng.permutation(E)[:2] for _ in range(T)]))
    assert not analysis.cross_layer_cooccurrence(r, other)["above_null"]
    with pytest.raises(ValueError, match="slot"):
        analysis.layer_transitions(r, r, slot="second")


def keys_of(res):
    return set(res), set().union(*(set(layer) for layer in res["layers"]))


def test_analyze_hf_writes_what_analyze_writes(tmp_path, capsys):
    import moe_py
    from moe_py import data
    from moe_py.models import ModelConfig
    from moe_py.report import analyze_run
    from moe_py.train import TrainConfig, train
    corpus = data.synthetic_corpus(n_docs=30)
    moe = moe_py.MoEConfig(d_model=16, d_ff=8, num_experts=4, top_k=2)
    run = str(tmp_path / "run")
    train(ModelConfig(max_seq_len=16, d_model=16, n_layers=2, n_heads=2, moe=moe),
          TrainConfig(corpus="synthetic", steps=1, batch_size=4, seq_len=16, eval_every=1, eval_batches=1),
          run, corpus=corpus, quiet=True)
    analyze_run(run, max_batches=1, plots=False, corpus=corpus)  # analysis.json as `analyze` writes it
    with open(os.path.join(run, "analysis.json")) as f:
        want = json.load(f)
    model_dir = str(tmp_path / "ckpt")
    build(deepseek_v3()).save_pretrained(model_dir)
    out = str(tmp_path / "hf")
    assert main(["analyze-hf", model_dir, "--corpus", "synthetic", "--out", out, "--batches", "2",
                 "--seq-len", "16", "--batch-size", "4"]) == 0
    with open(os.path.join(out, "analysis.json")) as f:
        got = json.load(f)
    top, per_layer = keys_of(want)
    assert top <= set(got) and per_layer <= keys_of(got)[1]
    assert got["score_functions"] == ["sigmoid", "sigmoid"] and got["tokenizer"] == "bytes"
    assert got["tokens"] == 2 * 4 * 16 and got["mi_at_init"][0] is not None
    assert len(got["cross_layer_mi"]) == 1
    for name in ("expert_label", "coactivation", "specialisation", "entropy_margin", "transitions"):
        assert os.path.exists(os.path.join(out, name + ".png")), name
    assert "co-occurrence" in capsys.readouterr().out


def test_analyze_hf_with_the_checkpoints_tokenizer(tmp_path):
    """A fast tokenizer in the folder: token ids, each token labelled by its first byte."""
    tokenizers = pytest.importorskip("tokenizers")
    text = "def add(a, b):\n    return a + b\n" * 200
    (tmp_path / "c.py").write_text(text)
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.train_from_iterator([text], tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>"], initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    model_dir = str(tmp_path / "ckpt")
    config = qwen3()
    config.vocab_size = fast.vocab_size if fast.vocab_size > 256 else 300
    build(config).save_pretrained(model_dir)
    fast.save_pretrained(model_dir)
    from moe_py.hf.analyze import analyze_hf
    res = analyze_hf(model_dir, str(tmp_path / "c.py"), str(tmp_path / "out"), batches=1, seq_len=16,
                     batch_size=4, init=False, plots=False)
    assert res["tokenizer"] != "bytes" and res["mi_at_init"] == [None, None]
    assert res["label_names"][0] == "lower" and res["tokens"] > 0
    grams = [g for layer in res["layers"] for v in layer["top_trigrams"].values() for g, _ in v]
    assert grams and all(isinstance(g, str) for g in grams) and any(g in text for g in grams)


def test_analyze_hf_refuses_a_missing_folder(tmp_path, capsys):
    assert main(["analyze-hf", str(tmp_path / "nope"), "--corpus", "synthetic", "--out", str(tmp_path / "o")]) != 0
    assert "model_dir" in capsys.readouterr().err


def test_scores_are_read_off_the_weights_or_marked_weights_only():
    from moe_py.hf.routing import WEIGHTS_ONLY, router_output, score_function
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((20, 6))
    idx = np.argsort(-logits, axis=1)[:, :2]
    soft = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    sig = 1 / (1 + np.exp(-logits))
    w_soft = np.take_along_axis(soft, idx, 1)
    w_sig = np.take_along_axis(sig, idx, 1)
    assert score_function(logits, idx, w_soft / w_soft.sum(1, keepdims=True)) == "softmax"
    assert score_function(logits, idx, 2.5 * w_sig / w_sig.sum(1, keepdims=True)) == "sigmoid"
    assert score_function(soft, idx, w_soft) == "scores"  # the router output already is the scores
    assert score_function(logits, idx[:, :1], np.ones((20, 1))) == WEIGHTS_ONLY  # k = 1 decides nothing
    real = np.ones(20, bool)
    real[-3:] = False
    r, kind = router_output(idx, rng.random((20, 2)), logits, real, 6)  # weights no score function gives
    assert kind == WEIGHTS_ONLY and (r.router_logits == 0).all()
    assert np.allclose(r.router_probs[real].sum(1), 1) and (r.router_probs[~real] == 0).all()
    assert (r.topk_weights[real, 0] >= r.topk_weights[real, 1]).all()  # slots by descending weight
    with pytest.raises(ValueError, match="top_k_index"):
        router_output(idx + 6, w_soft, logits, real, 6)


def more_families():
    """Families beyond the three above: other router outputs (gpt-oss's top-k-then-softmax
    with a bias, sigmoid groups, Mixtral, a shared expert), other layouts."""
    return {
        "mixtral": transformers.MixtralConfig(**COMMON, intermediate_size=16, num_local_experts=4),
        "qwen2_moe": transformers.Qwen2MoeConfig(**COMMON, intermediate_size=32, moe_intermediate_size=16,
                                                 shared_expert_intermediate_size=16, num_experts=6),
        "gpt_oss": transformers.GptOssConfig(**COMMON, intermediate_size=16, num_local_experts=4, head_dim=8),
        "glm4_moe": transformers.Glm4MoeConfig(**COMMON, intermediate_size=32, moe_intermediate_size=16,
                                               n_routed_experts=8, n_group=2, topk_group=1,
                                               first_k_dense_replace=0, head_dim=8),
        "granitemoe": transformers.GraniteMoeConfig(**COMMON, intermediate_size=16, num_local_experts=4),
    }


RECORDED: list = []


def recording_experts(experts, hidden_states, top_k_index, top_k_weights):
    """An experts implementation that keeps what the model dispatched (the reference that
    collect_routing's hooks must reproduce) and computes a cheap stand-in output."""
    RECORDED.append((top_k_index.detach().clone(), top_k_weights.detach().double().clone()))
    return hidden_states * top_k_weights.sum(-1, keepdim=True)


@pytest.mark.parametrize("family", sorted(more_families()))
def test_routing_is_what_the_model_dispatched(family):
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register("recording", recording_experts)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(more_families()[family],
                                                          experts_implementation="recording").eval()
    ids, mask = padded_batch()
    RECORDED.clear()
    got = collect_routing(model, [(ids, mask)])
    real = mask.reshape(-1).astype(bool)
    assert len(got.routers) == len(RECORDED) == 2 and got.layer_names[0] != got.layer_names[1]
    for r, (idx, w) in zip(got.routers, RECORDED):
        idx, w = idx.numpy()[real], w.numpy()[real]
        E = r.router_probs.shape[1]
        # the same choices and weights per token, whatever the slot order
        sent = np.zeros((real.sum(), E))
        np.put_along_axis(sent, idx, w, axis=1)
        kept = np.zeros_like(sent)
        np.put_along_axis(kept, r.topk_indices[real], r.topk_weights[real], axis=1)
        np.testing.assert_allclose(kept, sent, rtol=1e-6, atol=1e-7)
        assert np.array_equal(r.tokens_per_expert, np.bincount(idx.reshape(-1), minlength=E))
        assert (r.topk_indices[~real] == -1).all() and (r.router_probs[~real] == 0).all()
        # scores: a function of the logits that orders the chosen weights as the model did
        # (or the weights themselves when none is found)
        if got.score_functions[0] != "weights only":
            chosen = np.take_along_axis(r.router_probs[real], r.topk_indices[real], axis=1)
            np.testing.assert_allclose(chosen / chosen.sum(1, keepdims=True),
                                       r.topk_weights[real] / r.topk_weights[real].sum(1, keepdims=True), rtol=2e-2)
