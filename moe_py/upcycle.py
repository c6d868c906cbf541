"""Upcycling a dense run into an MoE run (`python -m moe_py upcycle DENSE_RUN --num-experts E`):
the weight surgery (`upcycle_model`) and the run folder it starts (`upcycle_run`).
docs/design.md, "Upcycling a dense run", has the construction and why it is exact.

Every MoE block's experts come from that block's dense FFN (width F): with granularity g,
expert e = c * g + j is shard j (hidden units [j F/g, (j+1) F/g): columns of W1 and W3, rows
of W2) of copy c, so E must be a multiple of g (E/g copies), as in Megatron-Core. Drop-
Upcycling re-initialises round(r F/g) hidden units of each expert (its own random subset)
with the values a fresh moe_py model of the same config starts from. The router starts
either as moe_py's own random init with the g shards of a copy sharing one column
(normalised top-k weights) or at 0 (unnormalised weights); W2 of every expert is scaled by
g / (the sum of a token's k combine weights at uniform scores), so that the MoE computes the
dense FFN at step 0 when r = 0 and g divides k. Everything else is copied.
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any, Dict, Optional, Tuple

import numpy as np

from .checkpoint import load_model, save_checkpoint
from .config import ROUTER_TRAITS, MoEConfig, check_seed, positive_int
from .data import Corpus
from .models import ModelConfig, TransformerLM
from .optim import AdamW
from .router import Router
from .run_folder import RunFolder, atomic_write, resolve_checkpoint, run_dir_of
from .train import TrainConfig, evaluate, run_inputs, val_sampler_of

# the MoEConfig fields upcycling takes from the dense model and its own arguments
SET_BY_UPCYCLING = ("d_model", "d_ff", "activation", "dtype", "compute_dtype", "num_experts", "top_k", "seed")
FILE = "upcycle.json"  # what the upcycled run folder records of its parent and the surgery

# The routers whose tokens pick their own k experts by score with soft weights: for those,
# identical experts and the router below reproduce the dense FFN exactly.
SUPPORTED_ROUTERS = tuple(r for r, t in ROUTER_TRAITS.items()
                          if t.picks_by_score and t.soft_weights and not t.experts_choose and not t.chooses_over_batch)


def check_upcycle(d_ff: int, moe: MoEConfig, granularity: int, reinit_fraction: float) -> None:
    """ValueError when the dense width, the MoE config and the options do not fit together."""
    positive_int("granularity", granularity)
    if d_ff % granularity:
        raise ValueError(f"granularity: expected a divisor of the dense FFN width d_ff ({d_ff}), "
                         f"got {granularity}")
    if moe.num_experts % granularity:
        raise ValueError(f"num_experts: expected a multiple of granularity ({granularity}): each copy "
                         f"of the dense FFN is split into {granularity} experts; got {moe.num_experts}")
    if moe.d_ff * granularity != d_ff:
        raise ValueError(f"moe.d_ff: expected d_ff / granularity = {d_ff // granularity}, got {moe.d_ff}")
    if isinstance(reinit_fraction, bool) or not isinstance(reinit_fraction, (int, float)) \
            or not 0 <= reinit_fraction <= 1:
        raise ValueError(f"reinit_fraction: expected a number in [0, 1], got {reinit_fraction!r}")
    if moe.router not in SUPPORTED_ROUTERS:
        raise ValueError(f"router: upcycling supports {SUPPORTED_ROUTERS} (each token picks its own "
                         f"experts by score), got {moe.router!r}")
    if moe.combine != "output":  # FFN(w x) is not w FFN(x): the copies would not add up to the FFN
        raise ValueError(f"combine: upcycling needs the weights on the experts' outputs ('output'), "
                         f"got {moe.combine!r}")
    if moe.n_group != 1:
        raise ValueError(f"n_group: upcycling does not support group-limited routing, got {moe.n_group}")
    if moe.num_shared_experts:
        raise ValueError("num_shared_experts: upcycling makes routed experts only; got "
                         f"{moe.num_shared_experts} shared")


def weight_sum_at_uniform(moe: MoEConfig) -> float:
    """The sum of a token's k combine weights when every expert has the same score (what the
    router gives a token whose logits are all 0): 1 for normalised softmax weights, k/E
    unnormalised, routed_scaling_factor times 1 or k/2 for sigmoid scores. Measured by the
    router itself on a zero token, so that it is the router's own arithmetic."""
    router = Router(dataclasses.replace(moe, capacity_factor=None))
    out = router(np.zeros((1, moe.d_model), moe.np_dtype), training=False)
    return float(np.asarray(out.topk_weights, np.float64).sum())


def is_exact(moe: MoEConfig, granularity: int, reinit_fraction: float) -> bool:
    """Whether the upcycled model computes its dense parent's function at step 0: no unit
    re-initialised, and each token's k experts are k/g whole copies of the FFN (g divides
    k), with no capacity to drop any of them."""
    return reinit_fraction == 0 and moe.top_k % granularity == 0 and moe.capacity is None


def upcycle_model(dense: TransformerLM, cfg: ModelConfig, granularity: int = 1,
                  reinit_fraction: float = 0.0, seed: int = 0) -> Tuple[TransformerLM, Dict[str, Any]]:
    """The MoE model of config `cfg` (cfg.moe set; its other fields as dense.cfg's) made from
    the dense model: see the module's docstring. `seed` draws the re-initialised units (and
    cfg.seed the fresh values they take). Returns (model, facts: the W2 scale, the router's
    init, the units re-initialised per expert, whether step 0 is exact)."""
    if dense.cfg.moe is not None:
        raise ValueError("dense: expected a dense model (trained with train --dense), got an MoE one")
    moe = cfg.moe
    if moe is None:
        raise ValueError("cfg: expected an MoE config (cfg.moe), got a dense one")
    shape_fields = ("vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads", "d_ff", "activation",
                    "n_predict", "dtype")
    for name in shape_fields:
        if getattr(cfg, name) != getattr(dense.cfg, name):
            raise ValueError(f"cfg.{name}: expected the dense model's {getattr(dense.cfg, name)!r}, "
                             f"got {getattr(cfg, name)!r}")
    check_upcycle(dense.cfg.d_ff, moe, granularity, reinit_fraction)
    check_seed(seed)
    model = TransformerLM(cfg)  # every weight starts as moe_py's own init; then overwritten
    g, E, Fe = granularity, moe.num_experts, moe.d_ff
    n_reinit = int(round(reinit_fraction * Fe))
    normalised = bool(moe.normalize_topk)
    scale = g / weight_sum_at_uniform(moe)
    rng = np.random.default_rng([seed, 0x5C1E])  # the re-initialised units
    dense_params = {n: p for n, p, _ in dense.named_parameters()}
    reinit: Dict[str, list] = {}
    for name, p, _ in model.named_parameters():
        parts = name.split(".")
        in_moe = parts[0] == "blocks" and parts[2] == "ffn" and cfg.is_moe_block(int(parts[1]))
        if not in_moe:
            src = dense_params[name]
            if src.shape != p.shape:
                raise ValueError(f"{name}: dense {list(src.shape)}, upcycled {list(p.shape)}")
            p[...] = src
    for i, block in enumerate(model.blocks):
        if not cfg.is_moe_block(i):
            continue
        params, prefix = block.ffn.params, f"blocks.{i}.ffn."
        fresh = {k: v.copy() for k, v in params.items()}
        units = []
        for e in range(E):
            cols = slice((e % g) * Fe, (e % g + 1) * Fe)  # expert e = copy e // g, shard e % g
            drop = np.sort(rng.choice(Fe, size=n_reinit, replace=False)) if n_reinit else np.zeros(0, np.int64)
            for k in ("w1", "w3"):
                if k in params:
                    params[k][e] = dense_params[prefix + k][0][:, cols]
                    params[k][e][:, drop] = fresh[k][e][:, drop]
            params["w2"][e] = dense_params[prefix + "w2"][0][cols, :]
            params["w2"][e][drop, :] = fresh["w2"][e][drop, :]
            units.append(drop.tolist())
        params["w2"] *= params["w2"].dtype.type(scale)
        if normalised:  # moe_py's own router init, the g shards of copy c sharing column c
            params["w_router"][...] = np.repeat(fresh["w_router"][:, :E // g], g, axis=1)
        else:  # every score equal: each token's weights are the uniform ones scale undoes
            params["w_router"][...] = 0
        reinit[f"block {i}"] = units
    facts = {"granularity": g, "reinit_fraction": float(reinit_fraction), "units_reinit_per_expert": n_reinit,
             "w2_scale": scale, "router_init": "moe_py init, one column per copy" if normalised else "zero",
             "exact_at_step_0": is_exact(moe, g, reinit_fraction), "reinit_units": reinit}
    return model, facts


def upcycled_configs(dense_cfg: ModelConfig, dense_train: TrainConfig, num_experts: int,
                     granularity: int = 1, top_k: Optional[int] = None, seed: Optional[int] = None,
                     steps: Optional[int] = None, moe: Optional[Dict[str, Any]] = None
                     ) -> Tuple[ModelConfig, TrainConfig]:
    """The upcycled run's configs: the dense model's shape with every block's FFN an MoE of
    num_experts experts of width d_ff / granularity (top_k default: granularity, the dense
    parent's active FFN FLOPs), `moe` setting any other MoEConfig field; the dense run's
    training config with seed `seed` (default: the dense run's) and `steps` (default: the
    dense run's), its schedule's horizons fixed at those steps (the schedule starts again)."""
    positive_int("granularity", granularity)
    if dense_cfg.d_ff % granularity:
        raise ValueError(f"granularity: expected a divisor of the dense FFN width d_ff "
                         f"({dense_cfg.d_ff}), got {granularity}")
    seed = dense_train.seed if seed is None else seed
    check_seed(seed)
    fields = dict(moe or {})
    for reserved in SET_BY_UPCYCLING:
        if reserved in fields:
            raise ValueError(f"moe: {reserved} is set by upcycling, not by the caller")
    moe_cfg = MoEConfig(d_model=dense_cfg.d_model, d_ff=dense_cfg.d_ff // granularity, num_experts=num_experts,
                        top_k=granularity if top_k is None else top_k, activation=dense_cfg.activation,
                        dtype=dense_cfg.dtype, compute_dtype=dense_cfg.compute_dtype, seed=seed, **fields)
    model_cfg = dataclasses.replace(dense_cfg, moe=moe_cfg, first_dense=0, moe_every=1, seed=seed)
    train_cfg = dataclasses.replace(dense_train, seed=seed, steps=dense_train.steps if steps is None else steps,
                                    lr_decay_steps=0, noise_anneal_steps=0)
    return model_cfg, train_cfg


def upcycle_run(dense_run: str, out: str, num_experts: int, granularity: int = 1,
                reinit_fraction: float = 0.0, top_k: Optional[int] = None, seed: Optional[int] = None,
                steps: Optional[int] = None, moe: Optional[Dict[str, Any]] = None, overwrite: bool = False,
                corpus: Optional[Corpus] = None) -> Dict[str, Any]:
    """Write an MoE run folder at `out` upcycled from the latest checkpoint of `dense_run`
    (a run folder, or a checkpoint): config.json, an empty metrics.jsonl, a checkpoint at
    step 0 with a fresh optimiser, and upcycle.json, so that `train --out OUT --resume`
    trains it on. Returns upcycle.json's content, with the dense and the upcycled model's
    validation losses on the dense run's held-out windows ("val_loss")."""
    path = resolve_checkpoint(dense_run)
    dense, data = load_model(path)
    if dense.cfg.moe is not None:
        raise ValueError(f"dense_run: {dense_run} is an MoE run; upcycling starts from a dense one "
                         "(train --dense)")
    dense_train = TrainConfig.from_dict(json.loads(str(data["train_config"])), f"{path}: train config")
    model_cfg, train_cfg = upcycled_configs(dense.cfg, dense_train, num_experts, granularity, top_k, seed,
                                            steps, moe)
    assert model_cfg.moe is not None
    check_upcycle(dense.cfg.d_ff, model_cfg.moe, granularity, reinit_fraction)
    train_cfg, corpus = run_inputs(model_cfg, train_cfg, corpus)
    run = RunFolder(out)
    with run.locked():
        if run.holds_run() and not overwrite:
            raise ValueError(f"out: {out} already holds a run: choose another folder, or --overwrite")
        if run.holds_run():
            run.clear()
        run.remove_stale_temporaries()
        model, facts = upcycle_model(dense, model_cfg, granularity, reinit_fraction, train_cfg.seed)
        if not facts["exact_at_step_0"] and reinit_fraction == 0:
            warnings.warn(f"top_k={model_cfg.moe.top_k} is not a multiple of granularity={granularity} "
                          "(or capacity may drop tokens): the upcycled model does not compute the dense "
                          "model's function at step 0", RuntimeWarning, stacklevel=2)
        if train_cfg.noise_std > 0:  # as train does for a new run
            model.set_noise_annealing(train_cfg.noise_std, train_cfg.noise_anneal_steps)
        sampler = val_sampler_of(corpus, dense_train)  # the dense run's held-out windows
        val = {"dense": evaluate(dense, sampler, dense_train.eval_batches),
               "upcycled": evaluate(model, sampler, dense_train.eval_batches)}
        run.write_config(model_cfg, train_cfg, corpus)
        run.start_metrics()
        optim = AdamW(model.named_parameters(), weight_decay=train_cfg.weight_decay)  # fresh: step 0
        ckpt = run.step_checkpoint(0)
        save_checkpoint(ckpt, model, optim, 0, dataclasses.asdict(train_cfg))
        run.publish(ckpt, max(1, train_cfg.keep_checkpoints))
        record = {"parent": os.path.abspath(path), "parent_step": int(data["step"]),
                  # the parent's run folder from this one (it moves with a folder of both)
                  "parent_run": os.path.relpath(run_dir_of(path), out),
                  "num_experts": num_experts, "top_k": model_cfg.moe.top_k, "seed": train_cfg.seed,
                  "val_loss": val, "eval_batches": dense_train.eval_batches,
                  **{k: v for k, v in facts.items() if k != "reinit_units"},
                  "reinit_units": facts["reinit_units"]}
        atomic_write(os.path.join(out, FILE), json.dumps(record, indent=1).encode())
    record["out"] = out
    return record


def val_loss_line(record: Dict[str, Any]) -> str:
    """The line `upcycle` prints: both models' validation loss on the same windows."""
    return f"val loss: dense {record['val_loss']['dense']:.6f}, upcycled {record['val_loss']['upcycled']:.6f}"
