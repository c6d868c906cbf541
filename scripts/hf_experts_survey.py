"""Which transformers MoE families experts_implementation="moe_py" takes, read from the
installed transformers: every experts class decorated with @use_experts_implementation, its
layout flags and its verdict. The verdict is moe_py/hf/experts_backend.py's own
(activation_of) on the class built on the meta device from its family's default configs;
for a class no default config builds, it is read from the source (flags, a custom _apply_gate,
the activation the configs name) by the same rules.

    .venv/bin/python scripts/hf_experts_survey.py [--list]
"""
import argparse
import collections
import importlib
import inspect
import pathlib
import re

import torch
import transformers
from transformers.integrations.moe import _default_apply_gate

from moe_py.hf.experts_backend import CLAMPED_SWIGLU_GATES, activation_of

DECORATED = re.compile(r"@use_experts_implementation(?:\(([^)]*)\))?\s*\nclass (\w+)")
ACT = re.compile(r"self\.act_fn = ACT2FN\[(?:config\.(\w+)|\"(\w+)\")\]")
REFUSED_FLAGS = ("has_post_expert_norm=True",)


def default_configs(family: str):
    try:
        mod = importlib.import_module(f"transformers.models.{family}.configuration_{family}")
    except ImportError:
        return []
    out = []
    for name, cls in vars(mod).items():
        if inspect.isclass(cls) and name.endswith("Config") and cls.__module__ == mod.__name__:
            try:
                out.append(cls())
            except Exception:  # a config that needs arguments says nothing here
                pass
    return out


def activations(family: str, cls) -> set:
    """The act_fn names the experts class would get from its family's default configs."""
    m = ACT.search(inspect.getsource(cls.__init__))
    if m is None:
        return {"(not ACT2FN)"}
    if m.group(2):
        return {m.group(2)}
    found = set()
    for cfg in default_configs(family):
        for sub in (cfg, getattr(cfg, "text_config", None)):
            value = getattr(sub, m.group(1), None) if sub is not None else None
            if isinstance(value, str):
                found.add(value)
    return found or {"?"}


def built_verdict(family: str, cls) -> str | None:
    """activation_of's verdict on `cls` built (without memory) from each default config."""
    verdicts = set()
    for cfg in default_configs(family):
        for sub in (cfg, getattr(cfg, "text_config", None)):
            try:
                with torch.device("meta"):
                    experts = cls(sub)
            except Exception:  # not this class's config
                continue
            try:
                verdicts.add("supported (" + activation_of(experts)["activation"] + ")")
            except NotImplementedError as e:
                verdicts.add("refused: " + str(e).split(": ", 1)[1])
    return " / ".join(sorted(verdicts)) if verdicts else None


def read_verdict(flags: str, cls, acts: set) -> str:
    refused = [f for f in REFUSED_FLAGS if f in flags]
    if refused:
        return "refused: " + ", ".join(refused)
    if cls._apply_gate.__qualname__ in CLAMPED_SWIGLU_GATES:
        return "supported (clamped_swiglu)"
    if cls._apply_gate is not _default_apply_gate:
        return "refused: own _apply_gate"
    if "has_gate=False" not in flags and "is_concatenated=False" in flags:
        return "refused: is_concatenated=False"
    need = {"gelu"} if "has_gate=False" in flags else {"silu", "swish"}
    if acts <= need:
        return "supported"
    if acts & need:
        return "supported for its " + "/".join(sorted(acts & need)) + " configs"
    return "refused: act " + "/".join(sorted(acts))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--list", action="store_true", help="one line per family")
    a = p.parse_args()
    root = pathlib.Path(transformers.__file__).parent / "models"
    rows = []
    for path in sorted(root.glob("*/modeling_*.py")):
        src = path.read_text()
        if "@use_experts_implementation" not in src:
            continue
        family = path.parent.name
        mod = importlib.import_module(f"transformers.models.{family}.{path.stem}")
        for flags, name in DECORATED.findall(src):
            cls = getattr(mod, name)
            found = built_verdict(family, cls)
            how = "built" if found else "read"
            rows.append((family, name, flags, found or read_verdict(flags, cls, activations(family, cls)), how))
    if a.list:
        for row in rows:
            print(" | ".join(str(c) for c in row))
    counts = collections.Counter(r[3].split(":")[0].split(" (")[0].split(" for ")[0] for r in rows)
    print(f"transformers {transformers.__version__}: {len({r[0] for r in rows})} families decorate "
          f"{len(rows)} experts classes; " + ", ".join(f"{n} {v}" for v, n in counts.most_common()))


if __name__ == "__main__":
    main()
