"""Checkpoints: one .npz with the model, the optimiser, the step, both configs, the
routers' state (noise annealing, expert bias) and a SHA-256 checksum of all of it; written atomically, so a crash
never leaves a half-written file in place of the last good one. Anything that is not a
whole moe_py checkpoint raises CheckpointError ("not a valid moe_py checkpoint: ...").

`save(layer, path)` / `load(path)` (moe_py.save / moe_py.load) keep one MoE layer the same
way: its config beside its weights and router state, checksummed, written atomically."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import zipfile
from typing import Dict, Optional, Tuple

import numpy as np

from .config import MoEConfig, config_from_dict
from .layer import MoELayer
from .models import ModelConfig, TransformerLM
from .optim import AdamW
from .run_folder import atomic_write


class CheckpointError(ValueError):
    pass


def array_checksum(arrays: Dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(f"{k}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_checkpoint(path: str, model: TransformerLM, optim: AdamW, step: int, train_cfg: dict) -> None:
    arrays = {f"model.{n}": p for n, p, _ in model.named_parameters()}
    arrays.update({f"optim.{k}": v for k, v in optim.state_dict().items()})
    for i, layer in enumerate(model.moe_layers):
        arrays[f"router.{i}"] = np.array(json.dumps(layer.router.state()))
    arrays["step"] = np.array(step)
    arrays["model_config"] = np.array(json.dumps(model.cfg.to_dict()))
    arrays["train_config"] = np.array(json.dumps(train_cfg))
    _write_archive(path, arrays, fault_point="checkpoint")


def _write_archive(path: str, arrays: Dict[str, np.ndarray], fault_point: str = "") -> None:
    """The arrays and their checksum as one .npz, written atomically."""
    arrays = dict(arrays, checksum=np.array(array_checksum(arrays)))
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]  # numpy's stub lets **arrays reach allow_pickle: bool
    atomic_write(path, buf.getvalue(), fault_point=fault_point)


def read_archive(path: str, what: str, required=()) -> dict:
    """The arrays of a checksummed .npz written by save_checkpoint or moe_py.save; anything
    else raises CheckpointError("<what>: <path>: <reason>")."""
    def bad(reason: str) -> CheckpointError:
        return CheckpointError(f"{what}: {path}: {reason}")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise bad("no such file") from None
    except IsADirectoryError:
        raise bad("a folder, not a file") from None
    except (zipfile.BadZipFile, EOFError) as e:
        raise bad(f"truncated or corrupted ({e})") from None
    except (OSError, ValueError) as e:
        raise bad(f"not an .npz archive of arrays ({e.__class__.__name__})") from None
    for key in required:
        if key not in data:
            raise bad(f"no '{key}' entry")
    if "checksum" in data:
        want = str(data.pop("checksum"))
        if array_checksum(data) != want:
            raise bad("checksum mismatch (the file was changed or corrupted)")
    return data


def _read(path: str) -> dict:
    data = read_archive(path, "not a valid moe_py checkpoint", ("model_config", "step"))
    step = data["step"]
    if step.shape != () or step.dtype.kind not in "iu" or int(step) < 0:
        raise CheckpointError(f"not a valid moe_py checkpoint: {path}: its step is {step!r}, "
                              "not an integer >= 0")
    try:
        data["_model_config"] = ModelConfig.from_dict(json_entry(data, "model_config", "not a valid moe_py "
                                                                 "checkpoint", path))
    except CheckpointError:
        raise
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"not a valid moe_py checkpoint: {path}: its model config is "
                              f"invalid ({e})") from None
    return data


def json_entry(data: dict, key: str, what: str, path: str):
    """The JSON an archive entry holds; CheckpointError("<what>: <path>: ...") when it is not."""
    try:
        return json.loads(str(data[key]))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{what}: {path}: its '{key}' entry is not valid JSON ({e})") from None


def load_router_state(router, data: dict, key: str, what: str, path: str) -> None:
    """router.load_state from an archive entry, any fault as a CheckpointError."""
    try:
        router.load_state(json_entry(data, key, what, path))
    except (ValueError, TypeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{what}: {path}: its '{key}' entry is not a router state ({e})") from None


def _fill(dst: np.ndarray, data: dict, key: str, path: str, rows=None) -> None:
    """dst <- data[key] (its rows [lo, hi) when `rows` is given: a slice of the experts)."""
    if key not in data:
        raise CheckpointError(f"not a valid moe_py checkpoint: {path}: missing array '{key}' "
                              f"(expected {dst.dtype} {list(dst.shape)})")
    src = data[key] if rows is None else data[key][rows[0]:rows[1]]
    if src.shape != dst.shape:
        raise CheckpointError(f"not a valid moe_py checkpoint: {path}: array '{key}' has shape "
                              f"{list(src.shape)}, expected {list(dst.shape)}")
    dst[...] = src


def load_model(path: str) -> Tuple[TransformerLM, dict]:
    """The model of a checkpoint (with its routers' state) and the raw archive."""
    data = _read(path)
    model = TransformerLM(data["_model_config"])
    for n, p, _ in model.named_parameters():
        _fill(p, data, f"model.{n}", path)
    for i, layer in enumerate(model.moe_layers):
        # "noise.i": the name (and the noise-only content) before the expert bias existed
        key = next((k for k in (f"router.{i}", f"noise.{i}") if k in data), None)
        if key is None:
            raise CheckpointError(f"not a valid moe_py checkpoint: {path}: missing 'router.{i}'")
        load_router_state(layer.router, data, key, "not a valid moe_py checkpoint", path)
    data["_path"] = path
    return model, data


def load_optimizer(optim: AdamW, data: dict, slices: Optional[Dict[str, Tuple[int, int]]] = None) -> None:
    """The AdamW state of a checkpoint; `slices` names the parameters of which this process
    holds only rows [lo, hi) (an expert-parallel rank's experts)."""
    path = data.get("_path", "checkpoint")
    if "optim.t" not in data:
        raise CheckpointError(f"not a valid moe_py checkpoint: {path}: missing 'optim.t'")
    optim.t = int(data["optim.t"])
    slices = slices or {}
    for n in optim.m:
        _fill(optim.m[n], data, f"optim.m.{n}", path, slices.get(n))
        _fill(optim.v[n], data, f"optim.v.{n}", path, slices.get(n))


# ---- one MoE layer (moe_py.save / moe_py.load) ------------------------------------

_KIND = "moe_py.MoELayer"


def save(layer: MoELayer, path: str) -> None:
    """Write `layer` (config, parameters, router state: noise, expert bias) to path (.npz)."""
    if not isinstance(layer, MoELayer):
        raise TypeError(f"layer: expected a MoELayer, got {type(layer).__name__}")
    arrays = {f"param.{k}": v for k, v in layer.params.items()}
    arrays["kind"] = np.array(_KIND)
    arrays["config"] = np.array(json.dumps(dataclasses.asdict(layer.cfg)))
    arrays["router"] = np.array(json.dumps(layer.router.state()))
    _write_archive(path, arrays)


def load(path: str) -> MoELayer:
    """The layer saved at path; a file that is not one raises CheckpointError (a ValueError)."""
    data = read_archive(path, "not a saved moe_py layer", ("kind", "config"))
    if str(data["kind"]) != _KIND:
        raise CheckpointError(f"not a saved moe_py layer: {path}: it holds {data['kind']}")
    what = "not a saved moe_py layer"
    try:
        cfg = config_from_dict(MoEConfig, json_entry(data, "config", what, path), "config")
    except CheckpointError:
        raise
    except ValueError as e:
        raise CheckpointError(f"{what}: {path}: its {e}") from None
    layer = MoELayer(cfg)
    state = {k[len("param."):]: v for k, v in data.items() if k.startswith("param.")}
    try:
        layer.load_state_dict(state)
    except ValueError as e:
        raise CheckpointError(f"{what}: {path}: its parameters do not fit its config ({e})") from None
    # "noise": the name (and the noise-only content) before the expert bias existed
    key = next((k for k in ("router", "noise") if k in data), None)
    if key is None:
        raise CheckpointError(f"not a saved moe_py layer: {path}: missing 'router'")
    load_router_state(layer.router, data, key, what, path)
    return layer
