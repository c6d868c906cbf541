"""Save and load one MoE layer: its config beside its weights and router state (noise, expert bias), in one
.npz written atomically with a checksum (the format of moe_py/checkpoint.py, for a layer)."""
from __future__ import annotations

import dataclasses
import io
import json

import numpy as np

from .checkpoint import CheckpointError, array_checksum, json_entry, load_router_state, read_archive
from .config import MoEConfig, config_from_dict
from .layer import MoELayer
from .run_folder import atomic_write

_KIND = "moe_py.MoELayer"


def save(layer: MoELayer, path: str) -> None:
    """Write `layer` (config, parameters, router state: noise, expert bias) to path (.npz)."""
    if not isinstance(layer, MoELayer):
        raise TypeError(f"layer: expected a MoELayer, got {type(layer).__name__}")
    arrays = {f"param.{k}": v for k, v in layer.params.items()}
    arrays["kind"] = np.array(_KIND)
    arrays["config"] = np.array(json.dumps(dataclasses.asdict(layer.cfg)))
    arrays["router"] = np.array(json.dumps(layer.router.state()))
    arrays["checksum"] = np.array(array_checksum(arrays))
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]  # numpy's stub lets **arrays reach allow_pickle: bool
    atomic_write(path, buf.getvalue())


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
