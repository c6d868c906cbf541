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


def render(core) -> str:
    out = ['"""Typed signatures of moe_py._core, written by scripts/make_core_stub.py: do not edit."""',
           "import typing", "", "import numpy", "import numpy.typing", ""]
    for name, obj in sorted(vars(core).items()):
        if name.startswith("_") or not inspect.isclass(obj):
            continue
        out += ["", f"class {name}:", f'    """{obj.__doc__.strip().splitlines()[0]}"""']
        members = getattr(obj, "__members__", None)
        if members:  # a py::enum_
            out += [f"    {m}: typing.ClassVar[{name}]" for m in members]
            out += ["    def __init__(self, value: int) -> None: ...", "    @property",
                    "    def name(self) -> str: ...", "    @property", "    def value(self) -> int: ..."]
            continue
        for attr, prop in sorted(vars(obj).items()):
            if isinstance(prop, property):
                ret = _tidy(_doc_lines(prop.fget)[0].split("->")[-1].strip())
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
        out += ["", f"def {_tidy(sig)}:", f'    """{doc}"""']
    return "\n".join(out) + "\n"


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
