"""Checkpoints and saved layers that are whole archives but not valid ones: every fault is one
CheckpointError naming the file and the cause (never a KeyError, TypeError or JSON error)."""
import json

import numpy as np
import pytest

import moe_py
from moe_py.checkpoint import CheckpointError, array_checksum, load_model, save_checkpoint
from moe_py.models import ModelConfig, TransformerLM
from moe_py.optim import AdamW


def rewrite(path, out, change):
    """A copy of the archive at path with `change(arrays)` applied and a fresh checksum (so
    that only the content, not the checksum, is wrong)."""
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays.pop("checksum")
    change(arrays)
    arrays["checksum"] = np.array(array_checksum(arrays))
    np.savez(out, **arrays)
    return str(out)


@pytest.fixture
def saved_layer(tmp_path):
    layer = moe_py.MoELayer(moe_py.MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=2))
    path = str(tmp_path / "layer.npz")
    moe_py.save(layer, path)
    return path


def _config_with(arrays, **extra):
    arrays["config"] = np.array(json.dumps({**json.loads(str(arrays["config"])), **extra}))


@pytest.mark.parametrize("change, words", [
    (lambda a: _config_with(a, no_such_field=1), "unknown field(s) ['no_such_field']"),
    (lambda a: a.__setitem__("config", np.array("{not json")), "'config' entry is not valid JSON"),
    (lambda a: a.__setitem__("config", np.array("[1, 2]")), "expected a JSON object of MoEConfig fields"),
    (lambda a: _config_with(a, dtype={}), "dtype: expected one of"),
    (lambda a: a.__setitem__("router", np.array("{}")), "'router' entry is not a router state"),
    (lambda a: a.pop("param.w3"), "its parameters do not fit its config"),
])
def test_a_saved_layer_that_is_not_valid_is_a_checkpoint_error(saved_layer, tmp_path, change, words):
    bad = rewrite(saved_layer, tmp_path / "bad.npz", change)
    with pytest.raises(CheckpointError, match="not a saved moe_py layer: .*bad.npz") as e:
        moe_py.load(bad)
    assert words in str(e.value)


def test_a_checkpoint_step_that_is_not_an_integer_is_a_checkpoint_error(tmp_path):
    model = TransformerLM(ModelConfig(max_seq_len=8, d_model=8, n_layers=1, n_heads=2, d_ff=8))
    path = str(tmp_path / "c.npz")
    save_checkpoint(path, model, AdamW(model.named_parameters()), 3, {})
    for step in ("abc", -1, 2.5):
        bad = rewrite(path, tmp_path / "bad.npz", lambda a: a.__setitem__("step", np.array(step)))
        with pytest.raises(CheckpointError, match="its step is .*not an integer >= 0"):
            load_model(bad)
    assert int(load_model(path)[1]["step"]) == 3


def one_layer_lm():
    moe = moe_py.MoEConfig(d_model=16, d_ff=16, num_experts=2, top_k=1)
    return TransformerLM(ModelConfig(max_seq_len=8, d_model=16, n_layers=1, n_heads=2, moe=moe))


def saved_checkpoint(tmp_path):
    m = one_layer_lm()
    path = str(tmp_path / "c.npz")
    save_checkpoint(path, m, AdamW(m.named_parameters()), 3, {})
    return path


@pytest.mark.parametrize("damage", ["truncate", "empty", "flip", "random", "text"])
def test_damaged_checkpoints_say_so(tmp_path, damage):
    path = saved_checkpoint(tmp_path)
    data = bytearray(open(path, "rb").read())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "empty":
        data = b""
    elif damage == "flip":
        data[len(data) // 3] ^= 0x10
    elif damage == "random":
        data = np.random.default_rng(0).bytes(5000)
    else:
        data = b"just some text\n" * 100
    open(path, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match="not a valid moe_py checkpoint"):
        load_model(path)


def test_checkpoint_missing_array_is_named_with_its_shape(tmp_path):
    path = saved_checkpoint(tmp_path)
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files if k != "model.norm_f.g" and k != "checksum"}
    np.savez(path, **arrays)
    with pytest.raises(CheckpointError, match=r"model.norm_f.g' \(expected float32 \[16\]\)"):
        load_model(path)
