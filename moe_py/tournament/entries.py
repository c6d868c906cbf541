"""The tournament's entries: one table of name -> config overrides, and the one function
that turns an entry, the base configs and a seed into the configs of its run.

An entry names every router-specific field it relies on (router, load_balance_coef, ...), so
the base configs contribute only the model's shape and the training schedule. Entries whose
routers this moe_py does not have are still listed: building them fails with a ValueError
naming the entry, so enabling one is a matter of the routers landing, not of editing code.

The active-parameter budget: every MoE entry activates top_k experts of width d_ff per token;
the dense baseline's FFN has width top_k * d_ff (what `train --dense` and `compare` use); an
entry with s shared experts routes top_k - s experts and gets s shared experts of width d_ff
(each shared expert replaces one routed one). The router's own weights (d_model x E per MoE
layer) come on top; the table reports total and active parameters of every entry.

The upcycled entry (docs/design.md, "Upcycling a dense run") trains the dense baseline for the
first half of the steps (steps // 2, in <entry>/dense-parent-seed-<s>), upcycles it with
granularity top_k into E experts of width d_ff (top_k of them per token: the dense parent's
active FLOPs) and trains that for the rest, from step 0 with a fresh optimiser and its own
warm-up and cosine, as `upcycle` + `train --resume` would. Its second half reads the batches of
seed s + UPCYCLE_SEED_OFFSET, so that it does not read its parent's batches again.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..config import MoEConfig
from ..models import ModelConfig
from ..train import TrainConfig


@dataclass(frozen=True)
class Entry:
    name: str
    summary: str  # one line for the table's notes
    moe: Optional[Dict[str, Any]]  # MoEConfig fields set by the entry; None: the dense baseline
    train: Dict[str, Any] = field(default_factory=dict)  # TrainConfig fields set by the entry
    upcycle: bool = False  # half the steps dense, then upcycled (moe_py/upcycle.py) for the rest


# Aux-loss-free routers and the balanced-by-construction ones get no load-balance loss, so
# that each entry's balancing comes from its own mechanism only.
ENTRIES: Tuple[Entry, ...] = (
    Entry("dense", "dense FFN of width top_k x d_ff (no router)", None),
    Entry("softmax_lb", "softmax top-k with the load-balance loss (coef 0.01)",
          {"router": "softmax_topk", "load_balance_coef": 0.01}),
    Entry("softmax_noise", "softmax top-k, no load-balance loss, router noise of std 1 "
          "annealed linearly to 0 over the run",
          {"router": "softmax_topk", "load_balance_coef": 0.0}, {"noise_std": 1.0}),
    Entry("sigmoid_bias", "sigmoid top-k with the aux-loss-free expert bias (rate 1e-3)",
          {"router": "sigmoid_topk", "load_balance_coef": 0.0, "bias_update_rate": 1e-3}),
    Entry("sigmoid_shared", "sigmoid top-k with the expert bias, one shared expert in place "
          "of one routed expert",
          {"router": "sigmoid_topk", "load_balance_coef": 0.0, "bias_update_rate": 1e-3,
           "num_shared_experts": 1}),
    Entry("expert_choice", "expert choice: each expert picks its tokens",
          {"router": "expert_choice", "load_balance_coef": 0.0}),
    Entry("sinkhorn", "Sinkhorn-balanced assignment (S-BASE)",
          {"router": "sinkhorn", "load_balance_coef": 0.0}),
    Entry("hash", "hash routing on the token id (no learned router)",
          {"router": "hash", "load_balance_coef": 0.0}),
    # the Hugging Face families' router variants (docs/design.md, "Routers beyond softmax top-k")
    Entry("softmax_router_bias", "softmax top-k with a learned logit bias (gpt-oss) and the "
          "load-balance loss (coef 0.01)",
          {"router": "softmax_topk", "load_balance_coef": 0.01, "router_bias": True}),
    Entry("softmax_group_max", "softmax top-k within the best of 2 expert groups, a group scored by "
          "its best expert (DeepSeek-V2), with the load-balance loss (coef 0.01)",
          {"router": "softmax_topk", "load_balance_coef": 0.01, "n_group": 2, "topk_group": 1,
           "group_score": "max"}),
    Entry("softmax_bias", "softmax top-k chosen by probability + the aux-loss-free expert bias "
          "(rate 1e-3), weights over max(sum, 1e-12) (Ernie 4.5)",
          {"router": "softmax_topk", "load_balance_coef": 0.0, "bias_update_rate": 1e-3,
           "topk_norm_min": 1e-12}),
    Entry("sqrtsoftplus_bias", "sqrt(softplus) top-k with the aux-loss-free expert bias (rate 1e-3; "
          "DeepSeek-V4)",
          {"router": "sqrtsoftplus_topk", "load_balance_coef": 0.0, "bias_update_rate": 1e-3}),
    Entry("softmax_unnormalised", "softmax top-k weighted by the probabilities as they are, not "
          "renormalised over the k (Qwen3-MoE/OLMoE with norm_topk_prob=False, Jamba), with the "
          "load-balance loss (coef 0.01)",
          {"router": "softmax_topk", "load_balance_coef": 0.01, "normalize_topk": False}),
    Entry("sigmoid_input", "sigmoid top-k, the chosen scores scaling the experts' inputs instead of "
          "their outputs (Llama 4), with the load-balance loss (coef 0.01)",
          {"router": "sigmoid_topk", "load_balance_coef": 0.01, "bias_update_rate": 0.0,
           "normalize_topk": False, "combine": "input"}),
    Entry("gpt_oss", "softmax top-k with a learned logit bias, experts with gpt-oss's clamped SwiGLU "
          "(alpha 1.702, limit 7) and biases, with the load-balance loss (coef 0.01)",
          {"router": "softmax_topk", "load_balance_coef": 0.01, "router_bias": True,
           "activation": "clamped_swiglu", "ffn_bias": True}),
    Entry("upcycled", "the dense baseline for steps // 2 steps, then upcycled (its FFN split into "
          "top_k experts per copy, E in all) to softmax top-k with the load-balance loss for the rest",
          {"router": "softmax_topk", "load_balance_coef": 0.01}, upcycle=True),
)
# The upcycled entry's second half: batches of seed s + this (not its parent's again).
UPCYCLE_SEED_OFFSET = 10_000
ENTRY_NAMES = tuple(e.name for e in ENTRIES)

# What entry_configs does to keep the active parameters equal, for the table's header.
BUDGET = ("Active-parameter budget: every MoE entry activates top_k experts of width d_ff per "
          "token, the dense baseline's FFN has width top_k x d_ff, and an entry with s shared "
          "experts routes top_k - s experts beside s shared experts of width d_ff; the routers' "
          "own weights come on top (see the params column).")


def select_entries(names: Optional[Sequence[str]], table: Sequence[Entry] = ENTRIES) -> List[Entry]:
    """The entries named (all when None), in the table's order; unknown names raise."""
    by_name = {e.name: e for e in table}
    if names is None:
        return list(table)
    names = list(names)
    unknown = [n for n in names if n not in by_name]
    if unknown or not names:
        raise ValueError(f"routers: expected names from {tuple(by_name)}, got {names!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"routers: each entry once, got {names!r}")
    return [e for e in table if e.name in names]


def _moe_config(entry: Entry, base: MoEConfig, seed: int) -> MoEConfig:
    fields = dataclasses.asdict(base)
    fields["normalize_topk"] = None  # resolved again for the entry's own top_k
    assert entry.moe is not None, "a dense entry has no MoE config"
    fields.update(entry.moe)
    shared = fields.get("num_shared_experts", 0)
    if shared:
        fields["top_k"] = base.top_k - shared
        fields["shared_d_ff"] = base.d_ff
        if fields["top_k"] < 1:
            raise ValueError(f"top_k: {shared} shared expert(s) replace routed ones, so top_k "
                             f"must exceed {shared}; got {base.top_k}")
    fields["seed"] = seed
    return MoEConfig(**fields)


def parent_configs(entry: Entry, base_model: ModelConfig, base_train: TrainConfig, seed: int,
                   lr: Optional[float] = None) -> Tuple[ModelConfig, TrainConfig]:
    """An upcycled entry's dense parent: the dense baseline's configs for the first
    steps // 2 steps."""
    if base_train.steps < 2:
        raise ValueError(f"tournament entry {entry.name!r}: steps: expected at least 2 (half dense, "
                         f"half upcycled), got {base_train.steps}")
    dense = Entry(f"{entry.name} (dense parent)", "", None)
    return entry_configs(dense, base_model, dataclasses.replace(base_train, steps=base_train.steps // 2),
                         seed, lr)


def _upcycled_configs(entry: Entry, base_model: ModelConfig, base_train: TrainConfig, seed: int,
                      lr: Optional[float]) -> Tuple[ModelConfig, TrainConfig]:
    from ..upcycle import SET_BY_UPCYCLING, upcycled_configs
    assert base_model.moe is not None and entry.moe is not None
    dense_model, dense_train = parent_configs(entry, base_model, base_train, seed, lr)
    base = base_model.moe
    moe = {k: v for k, v in dataclasses.asdict(base).items()
           if k not in SET_BY_UPCYCLING}
    moe.update(normalize_topk=None, num_shared_experts=0, shared_d_ff=None, **entry.moe)
    try:
        return upcycled_configs(dense_model, dense_train, base.num_experts, granularity=base.top_k,
                                top_k=base.top_k, seed=seed + UPCYCLE_SEED_OFFSET,
                                steps=base_train.steps - base_train.steps // 2, moe=moe)
    except (ValueError, TypeError) as e:
        raise ValueError(f"tournament entry {entry.name!r}: this moe_py rejects its config ({e})") from None


def entry_configs(entry: Entry, base_model: ModelConfig, base_train: TrainConfig,
                  seed: int, lr: Optional[float] = None) -> Tuple[ModelConfig, TrainConfig]:
    """The model and training configs of `entry` at `seed` (the model's weights and the data
    order both; the split is base_train.split_seed's for every seed), with learning rate `lr`
    (None: base_train's). base_model.moe gives the experts' shape (num_experts, top_k, d_ff,
    ...). A config this moe_py rejects raises ValueError naming the entry."""
    if base_model.moe is None:
        raise ValueError("base_model: expected an MoE model (its moe sets the experts' shape), "
                         "got a dense one")
    base = base_model.moe
    if entry.upcycle:
        return _upcycled_configs(entry, base_model, base_train, seed, lr)
    try:
        moe = None if entry.moe is None else _moe_config(entry, base, seed)
        model = dataclasses.replace(base_model, moe=moe, d_ff=base.active_ffn_width, seed=seed)
        train = dataclasses.replace(base_train, seed=seed, **entry.train)
        if lr is not None:
            train = dataclasses.replace(train, lr=lr)
    except (ValueError, TypeError) as e:
        raise ValueError(f"tournament entry {entry.name!r}: this moe_py rejects its config "
                         f"({e})") from None
    return model, train


def available_entries(table: Sequence[Entry] = ENTRIES) -> List[str]:
    """Names of the entries whose configs this moe_py accepts (at the default sizes)."""
    base = ModelConfig(moe=MoEConfig())
    names = []
    for e in table:
        try:
            entry_configs(e, base, TrainConfig(), 0)
        except ValueError:
            continue
        names.append(e.name)
    return names
