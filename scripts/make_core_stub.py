"""Writes moe_py/_core.pyi from the compiled extension's own signatures (pybind11 puts
each binding's typed signature on the first line of its docstring).

    .venv/bin/python scripts/make_core_stub.py          # rewrite the stub
    .venv/bin/python scripts/make_core_stub.py --check  # exit 1 if it is out of date

tests/test_core_stub.py runs the check, so a kernel argument added in C++ shows up here.
"""
from __future__ import annotations

import inspect
import os
import re
import sys

STUB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "moe_py", "_core.pyi")

_SHORTEN = [
    (r"typing\.SupportsInt \| typing\.SupportsIndex", "int"),
    (r"typing\.SupportsFloat \| typing\.SupportsIndex", "float"),
    (r"moe_py\._core\.", ""),
]


def _tidy(sig: str) -> str:
    for pattern, repl in _SHORTEN:
        sig = re.sub(pattern, repl, sig)
    return sig


def _doc_lines(obj) -> tuple:
    lines = (obj.__doc__ or "").strip().splitlines()
    return lines[0], " ".join(ln.strip() for ln in lines[1:] if ln.strip())


_QUALIFIED = re.compile(r"\b([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)")


def _imports(typed: list) -> list:
    """`import m` for each module m that a qualified name in the signatures comes from
    (collections.abc.Sequence -> collections.abc), so the stub names nothing it does not import."""
    modules = {name.rsplit(".", 1)[0] for text in typed for name in _QUALIFIED.findall(text)}
    std = sorted(m for m in modules if m.split(".")[0] in ("collections", "typing"))
    third = sorted(modules - set(std))
    return [f"import {m}" for m in std] + [""] + [f"import {m}" for m in third]


def render(core) -> str:
    # pybind11's classes have the metaclass pybind11_builtins.pybind11_type, a module no stub
    # describes: a stub-only stand-in says so (mypy.stubtest checks that a metaclass is declared)
    out: list = ["", "@typing.type_check_only", "class _pybind11_type(type):",
                 '    """the metaclass of pybind11\'s classes (pybind11_builtins.pybind11_type)"""']
    typed: list = ["typing.ClassVar"]  # the text the imports must cover: signatures, not docstrings
    for name, obj in sorted(vars(core).items()):
        if name.startswith("_") or not inspect.isclass(obj):
            continue
        out += ["", f"class {name}(metaclass=_pybind11_type):", f'    """{obj.__doc__.strip().splitlines()[0]}"""']
        members = getattr(obj, "__members__", None)
        if members:  # a py::enum_
            out += [f"    {m}: typing.ClassVar[{name}]" for m in members]
            out += [f"    __members__: typing.ClassVar[dict[str, {name}]]",
                    "    def __init__(self, value: int) -> None: ...",
                    "    def __int__(self) -> int: ...", "    def __index__(self) -> int: ...", "    @property",
                    "    def name(self) -> str: ...", "    @property", "    def value(self) -> int: ..."]
            continue
        for attr, prop in sorted(vars(obj).items()):
            if isinstance(prop, property):
                ret = _tidy(_doc_lines(prop.fget)[0].split("->")[-1].strip())
                typed.append(ret)
                if prop.fset is not None:  # def_readwrite: a field
                    out.append(f"    {attr}: {ret}")
                else:
                    out += ["    @property", f"    def {attr}(self) -> {ret}: ..."]
    out.append("")
    for name, obj in sorted(vars(core).items()):
        if name.startswith("_") or inspect.isclass(obj) or not callable(obj):
            continue
        sig, doc = _doc_lines(obj)
        if not sig.startswith(name + "("):
            raise SystemExit(f"{name}: no pybind11 signature in its docstring")
        if not doc:
            raise SystemExit(f"{name}: the binding has no docstring")
        typed.append(_tidy(sig))
        out += ["", f"def {_tidy(sig)}:", f'    """{doc}"""']
    head = ['"""Typed signatures of moe_py._core, written by scripts/make_core_stub.py: do not edit."""',
            *_imports(typed), ""]
    return "\n".join(head + out) + "\n"


def main(argv) -> int:
    from moe_py import _core  # the installed (or PYTHONPATH's) build
    text = render(_core)
    if "--check" in argv:
        with open(STUB) as f:
            if f.read() != text:
                print("moe_py/_core.pyi is out of date: run scripts/make_core_stub.py", file=sys.stderr)
                return 1
        return 0
    with open(STUB, "w") as f:
        f.write(text)
    print(f"wrote {os.path.normpath(STUB)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
