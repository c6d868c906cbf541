"""Routing interventions (moe_py/interventions.py): replay is bitwise, forced routing uses
exactly the given experts, ablation never selects a removed expert and an expert no token
reaches changes nothing when removed, top-k overrides; the routing trace round trip; the
`ablate` command."""
import json
import subprocess
import sys

import numpy as np
import pytest

import moe_py
from moe_py import MoEConfig, MoELayer
from moe_py.interventions import RoutingIntervention as RI, replay_of
from moe_py.models import ModelConfig, TransformerLM
from moe_py.routing_trace import read_trace, replay_routing


def _inputs(shape=(3, 7, 8), seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    mask = np.ones(shape[:-1], bool)
    mask[-1, -3:] = False
    ids = rng.integers(0, 256, shape[:-1])
    dy = rng.standard_normal(shape).astype(np.float32)
    return x, mask, ids, dy


def _grads(layer):
    return {k: v.copy() for k, v in layer.grads.items()}


# the Hugging Face families' options: a logit bias, a loaded selection bias, a floored
# normalisation, groups scored by their best expert (docs/design.md, "Routers beyond softmax top-k")
HF_OPTIONS = dict(router_bias=True, topk_norm_min=0.9, n_group=3, topk_group=2, group_score="max")


def _with_biases(layer):
    if "b_router" in layer.params:
        layer.params["b_router"][...] = np.linspace(-0.5, 0.5, layer.cfg.num_experts)
    if layer.cfg.traits.expert_bias:
        layer.router.expert_bias[...] = np.linspace(0.03, -0.02, layer.cfg.num_experts)
    return layer


@pytest.mark.parametrize("router, options", [
    ("softmax_topk", {}), ("sigmoid_topk", {}), ("sqrtsoftplus_topk", {}), ("sinkhorn", {}),
    ("hash", {}), ("softmax_topk", HF_OPTIONS), ("sqrtsoftplus_topk", HF_OPTIONS)])
@pytest.mark.parametrize("training", [True, False])
def test_replaying_a_recorded_routing_is_bitwise(router, options, training):
    cfg = MoEConfig(d_model=8, d_ff=12, num_experts=6, top_k=2, router=router, capacity_factor=0.8,
                    num_shared_experts=1, seed=4, **options)
    x, mask, ids, dy = _inputs()
    layer = _with_biases(MoELayer(cfg))
    out = layer(x, padding_mask=mask, token_ids=ids, training=training)
    layer.zero_grad()
    dx = layer.backward(dy)
    grads = _grads(layer)
    # the same weights and biases, fresh router state (no noise, batch scope)
    again = _with_biases(MoELayer(cfg))
    replayed = again(x, padding_mask=mask, token_ids=ids, training=training,
                     routing=RI(replay=out.router.topk_indices.reshape(3, 7, 2)))
    again.zero_grad()
    dx2 = again.backward(dy)
    assert np.array_equal(out.y, replayed.y) and np.array_equal(dx, dx2)
    assert out.aux_loss == replayed.aux_loss and out.losses == replayed.losses
    for f in out.router._fields:
        assert np.array_equal(getattr(out.router, f), getattr(replayed.router, f)), f
    for k, g in grads.items():
        assert np.array_equal(g, again.grads[k]), k


def test_forced_routing_uses_exactly_the_given_experts_and_trains_the_router():
    cfg = MoEConfig(d_model=8, d_ff=12, num_experts=6, top_k=2, seed=1)
    x, mask, _, dy = _inputs()
    layer = MoELayer(cfg)
    forced = np.broadcast_to(np.array([5, 3]), (3, 7, 2)).copy()
    out = layer(x, padding_mask=mask, routing=RI(replay=forced))
    idx = out.router.topk_indices.reshape(3, 7, 2)
    assert (idx[mask] == [5, 3]).all() and (idx[~mask] == -1).all()
    p = out.router.router_probs.reshape(3, 7, 6)[mask]
    w = out.router.topk_weights.reshape(3, 7, 2)[mask]
    np.testing.assert_allclose(w, p[:, [5, 3]] / p[:, [5, 3]].sum(1, keepdims=True), rtol=1e-6)
    assert out.router.tokens_per_expert.tolist() == [0, 0, 0, mask.sum(), 0, mask.sum()]
    layer.zero_grad()
    layer.backward(dy)
    assert np.abs(layer.grads["w_router"]).sum() > 0  # through the recomputed weights


def test_bad_replays_are_named():
    cfg = MoEConfig(d_model=8, d_ff=12, num_experts=6, top_k=2)
    x, mask, _, _ = _inputs()
    layer = MoELayer(cfg)
    with pytest.raises(ValueError, match="routing.replay: expected integer experts of shape"):
        layer(x, routing=RI(replay=np.zeros((3, 7, 3), int)))
    with pytest.raises(ValueError, match="routing.replay: expected experts in"):
        layer(x, routing=RI(replay=np.full((3, 7, 2), 6)))
    with pytest.raises(ValueError, match="distinct"):
        layer(x, routing=RI(replay=np.zeros((3, 7, 2), int)))
    with pytest.raises(NotImplementedError, match="expert_choice"):
        MoELayer(MoEConfig(d_model=8, d_ff=12, num_experts=6, top_k=2, router="expert_choice"))(
            x, routing=RI(replay=np.zeros((3, 7, 2), int)))


@pytest.mark.parametrize("router", ["softmax_topk", "sigmoid_topk", "sqrtsoftplus_topk", "hash"])
def test_ablated_experts_are_never_selected(router):
    cfg = MoEConfig(d_model=8, d_ff=12, num_experts=6, top_k=2, router=router, seed=2)
    x, mask, ids, _ = _inputs()
    layer = MoELayer(cfg)
    out = layer(x, padding_mask=mask, token_ids=ids, training=False, routing=RI(ablate=(0, 4)))
    idx = out.router.topk_indices[mask.reshape(-1)]
    assert not np.isin(idx, [0, 4]).any() and (idx >= 0).all()
    with pytest.raises(RuntimeError, match="inference only"):
        out.backward(np.ones_like(out.y))
    with pytest.raises(ValueError, match="training=False"):
        layer(x, token_ids=ids, routing=RI(ablate=(0,)))
    with pytest.raises(ValueError, match="routing.ablate: expected distinct experts"):
        layer(x, token_ids=ids, training=False, routing=RI(ablate=(6,)))
    with pytest.raises(ValueError, match="experts left"):
        layer(x, token_ids=ids, training=False, routing=RI(ablate=(0, 1, 2, 3, 4)))


def test_removing_an_expert_no_token_reaches_changes_nothing():
    cfg = MoEConfig(d_model=8, d_ff=12, num_experts=6, top_k=2, seed=3)
    x, mask, _, _ = _inputs()
    x = np.abs(x)
    layer = MoELayer(cfg)
    layer.params["w_router"][:, 5] = -50.0  # with x >= 0, expert 5 scores last for every token
    out = layer(x, padding_mask=mask, training=False)
    assert out.router.tokens_per_expert[5] == 0
    for renormalize in (True, False):
        ab = layer(x, padding_mask=mask, training=False, routing=RI(ablate=(5,), renormalize=renormalize))
        assert np.array_equal(ab.y, out.y)  # its probability underflows to 0: nothing to renormalise
        assert np.array_equal(ab.router.topk_indices, out.router.topk_indices)


def test_renormalising_divides_by_the_mass_left():
    cfg = MoEConfig(d_model=8, d_ff=12, num_experts=6, top_k=2, normalize_topk=False, seed=5)
    x, mask, _, _ = _inputs()
    layer = MoELayer(cfg)
    keep = layer(x, padding_mask=mask, training=False, routing=RI(ablate=(1,), renormalize=False))
    renorm = layer(x, padding_mask=mask, training=False, routing=RI(ablate=(1,)))
    real = mask.reshape(-1)
    p = keep.router.router_probs[real]
    left = 1.0 - p[:, 1]
    np.testing.assert_allclose(renorm.router.topk_weights[real], keep.router.topk_weights[real] / left[:, None],
                               rtol=1e-6)


def test_top_k_override_at_inference():
    cfg = MoEConfig(d_model=8, d_ff=12, num_experts=6, top_k=2, seed=6)
    x, mask, _, _ = _inputs()
    layer = MoELayer(cfg)
    out = layer(x, padding_mask=mask, training=False, routing=RI(top_k=4))
    assert out.router.topk_indices.shape[1] == 4
    two = layer(x, padding_mask=mask, training=False, routing=RI(top_k=2))
    base = layer(x, padding_mask=mask, training=False)
    assert np.array_equal(two.y, base.y)  # k = cfg.top_k is no change
    with pytest.raises(ValueError, match="routing.top_k"):
        layer(x, training=False, routing=RI(top_k=7))


def _tiny_model_cfg(**moe):
    return ModelConfig(d_model=16, n_layers=2, n_heads=2, max_seq_len=16,
                       moe=MoEConfig(d_model=16, d_ff=16, num_experts=4, top_k=2, **moe))


def test_model_replay_per_layer_is_bitwise():
    model = TransformerLM(_tiny_model_cfg())
    ids = np.random.default_rng(0).integers(0, 256, (2, 16))
    out = model.forward(ids, training=False)
    again = model.forward(ids, training=False, routing=replay_of(out.routers, ids.shape))
    assert all(np.array_equal(a, b) for a, b in zip(out.head_logits, again.head_logits))
    with pytest.raises(ValueError, match="one intervention"):
        model.forward(ids, routing=[None])


def _train(tmp_path, *extra):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "moe_py", "train", "--corpus", "synthetic", "--steps", "4", "--batch-size", "2",
           "--seq-len", "16", "--d-model", "16", "--n-layers", "2", "--n-heads", "2", "--num-experts", "4",
           "--d-ff", "16", "--eval-every", "2", "--eval-batches", "2", "--checkpoint-every", "2",
           "--out", str(out), *extra]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out


def test_the_trace_file_round_trips_and_replays_a_training_step(tmp_path):
    run = _train(tmp_path, "--trace-routing", "--grad-accum", "2")
    records = read_trace(str(run))
    assert len(records) == 4 * 2 * 2  # steps x micro-batches x MoE layers
    first = records[0]
    assert {k: first[k] for k in ("step", "micro_batch", "stage", "block", "layer", "moe_layer", "rank",
                                  "num_tokens", "topk", "shape")} == \
        {"step": 1, "micro_batch": 0, "stage": "pre_dispatch", "block": "decoder", "layer": 0,
         "moe_layer": 0, "rank": 0, "num_tokens": 32, "topk": 2, "shape": [2, 16]}
    # the file is what was routed: step 1's first micro-batch replays bitwise through a model
    # at the initial weights (the same seed), on the same batch
    from moe_py.train import TrainConfig, corpus_of, train_sampler_of
    from moe_py.run_folder import RunFolder
    saved = RunFolder(str(run)).read_config()
    model = TransformerLM(ModelConfig.from_dict(saved["model"]))
    tcfg = TrainConfig.from_dict(saved["train"])
    batch = train_sampler_of(corpus_of(tcfg), tcfg).batch(0)
    plain = model.forward(batch.inputs, batch.mask, training=True)
    for r, rec in zip(plain.routers, [x for x in records if x["step"] == 1 and x["micro_batch"] == 0]):
        assert np.array_equal(r.topk_indices, rec["top_indices"])
    model2 = TransformerLM(ModelConfig.from_dict(saved["model"]))
    replayed = model2.forward(batch.inputs, batch.mask, training=True, routing=replay_routing(records, 1, 0))
    assert all(np.array_equal(a, b) for a, b in zip(plain.head_logits, replayed.head_logits))
    # resumed with more steps, the trace holds each step once
    subprocess.run([sys.executable, "-m", "moe_py", "train", "--out", str(run), "--resume", "--steps", "6",
                    "--trace-routing"], check=True, capture_output=True, text=True)
    steps = [r["step"] for r in read_trace(str(run))]
    assert steps == sorted(steps) and len(steps) == 6 * 2 * 2


def test_ablate_command_prints_deltas_and_the_pruning_curve(tmp_path):
    run = _train(tmp_path)
    res = subprocess.run([sys.executable, "-m", "moe_py", "ablate", str(run)], check=True,
                         capture_output=True, text=True)
    saved = json.loads((run / "ablation.json").read_text())
    assert np.asarray(saved["deltas"]).shape == (2, 4)
    assert [p["kept"] for p in saved["pruning"]] == [4, 3, 2]
    assert saved["pruning"][0]["val_loss"] == pytest.approx(saved["val_loss"], abs=0)
    assert "experts kept" in res.stdout and (run / "ablation.png").exists() and (run / "pruning.png").exists()
    # the base is the run's own val_loss at its last step, on the same windows
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert saved["val_loss"] == pytest.approx(last["val_loss"], rel=1e-12)


def test_replayed_routing_gradient_float64_central_differences():
    """The gradient of sum(dy * y) + aux_loss with the routing fixed by replay, against
    central differences in float64 (x and the router weight)."""
    cfg = MoEConfig(d_model=5, d_ff=7, num_experts=4, top_k=2, dtype="float64", z_loss_coef=1e-2, seed=7)
    rng = np.random.default_rng(8)
    x = rng.standard_normal((6, 5))
    dy = rng.standard_normal((6, 5))
    layer = MoELayer(cfg)
    forced = np.array([[3, 1], [0, 2], [2, 3], [1, 0], [3, 0], [2, 1]])

    def objective(xv):
        out = layer(xv, routing=RI(replay=forced))
        return float((dy * out.y).sum() + out.aux_loss)

    layer.zero_grad()
    layer(x, routing=RI(replay=forced))
    dx = layer.backward(dy)
    dw = layer.grads["w_router"].copy()
    eps = 1e-6
    num = np.zeros_like(x)
    for i in np.ndindex(*x.shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += eps
        xm[i] -= eps
        num[i] = (objective(xp) - objective(xm)) / (2 * eps)
    np.testing.assert_allclose(dx, num, rtol=1e-6, atol=1e-8)
    w = layer.params["w_router"]
    numw = np.zeros_like(w)
    for i in np.ndindex(*w.shape):
        keep = w[i]
        w[i] = keep + eps
        up = objective(x)
        w[i] = keep - eps
        down = objective(x)
        w[i] = keep
        numw[i] = (up - down) / (2 * eps)
    np.testing.assert_allclose(dw, numw, rtol=1e-6, atol=1e-8)
