"""Command-line flags built from the config dataclasses, so each default lives in one place.

A flag's name is its field's (`top_k` -> `--top-k`, plus any short alias), its type and
default are the field's, and its help text is the one-line comment after the field in the
dataclass source (as nanoGPT's GPTConfig documents its fields).
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
from typing import Dict, Mapping, Optional, Sequence

_FIELD_LINE = re.compile(r"^\s+(\w+)\s*:[^#]*#\s*(.+?)\s*$")


def field_comments(cls) -> Dict[str, str]:
    """{field name: the comment on its line} for a dataclass defined in a source file."""
    out = {}
    for line in inspect.getsource(cls).splitlines():
        m = _FIELD_LINE.match(line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def _parse_bool_or_none(text: str):
    return None if text == "auto" else {"true": True, "false": False}[text.lower()]


def add_config_flags(parser, cls, names: Sequence[str], aliases: Optional[Mapping[str, Sequence[str]]] = None,
                     choices: Optional[Mapping[str, Sequence]] = None) -> None:
    """Add one flag per field of `cls` named in `names` to parser (or an argument group)."""
    aliases, choices = aliases or {}, choices or {}
    helps = field_comments(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in names:
        f = fields[name]
        if name not in helps:
            raise AssertionError(f"{cls.__name__}.{name} has no comment to use as help")
        flags = ["--" + name.replace("_", "-"), *aliases.get(name, ())]
        default = f.default
        kind = str(f.type).replace(" ", "")
        kw = dict(dest=name, default=default, help=f"{helps[name]} (default: {default})")
        if kind == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        elif kind == "Optional[bool]":
            kw.update(type=_parse_bool_or_none, metavar="{true,false,auto}")
            kw["help"] = f"{helps[name]} (default: auto)"
        elif kind in ("int", "float", "str", "Optional[int]", "Optional[float]", "Optional[str]"):
            kw["type"] = {"int": int, "float": float, "str": str}[kind.replace("Optional[", "").rstrip("]")]
        else:
            raise AssertionError(f"{cls.__name__}.{name}: no flag for type {kind}")
        if name in choices:
            kw["choices"] = tuple(choices[name])
        parser.add_argument(*flags, **kw)


def config_from_args(cls, args: argparse.Namespace, **overrides):
    """cls built from the args whose dest is one of its fields, then `overrides`."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(overrides)
    return cls(**values)
