"""CLI flags come from the config dataclasses: one default, one help text, per field."""
import dataclasses

import pytest

from moe_py.cli import configs_from_args, build_parser
from moe_py.config import MoEConfig
from moe_py.flags import field_comments
from moe_py.models import ModelConfig
from moe_py.train import TrainConfig


@pytest.mark.parametrize("cls", [MoEConfig, ModelConfig, TrainConfig])
def test_every_field_is_documented(cls):
    helps = field_comments(cls)
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in helps]
    assert not missing, f"{cls.__name__} fields without a comment: {missing}"


def test_train_flags_default_to_the_dataclass_defaults():
    model, train = configs_from_args(build_parser().parse_args(["train"]), dense=False)
    assert train == TrainConfig()
    moe_defaults = MoEConfig()
    for f in dataclasses.fields(MoEConfig):
        assert getattr(model.moe, f.name) == getattr(moe_defaults, f.name), f.name
    for name in ("d_model", "n_layers", "n_heads", "activation", "n_predict", "dtype", "seed"):
        assert getattr(model, name) == getattr(ModelConfig(), name), name
    assert model.max_seq_len == train.seq_len
    dense, _ = configs_from_args(build_parser().parse_args(["train"]), dense=True)
    assert dense.moe is None and dense.d_ff == moe_defaults.top_k * moe_defaults.d_ff


def test_flags_reach_their_fields_under_both_names():
    args = build_parser().parse_args(
        ["train", "--layers", "3", "--n-heads", "2", "--experts", "5", "--top-k", "1",
         "--capacity-factor", "1.5", "--straight-through", "--normalize-topk", "false",
         "--lr", "0.01", "--grad-clip", "0.5", "--seed", "7"])
    model, train = configs_from_args(args, dense=False)
    assert (model.n_layers, model.n_heads) == (3, 2)
    assert (model.moe.num_experts, model.moe.top_k, model.moe.capacity_factor) == (5, 1, 1.5)
    assert model.moe.straight_through is True and model.moe.normalize_topk is False
    assert (train.lr, train.grad_clip, train.seed, model.seed, model.moe.seed) == (0.01, 0.5, 7, 7, 7)


def test_help_shows_the_field_comment():
    text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "hidden width of one expert (default: 128)" in " ".join(text.split())
