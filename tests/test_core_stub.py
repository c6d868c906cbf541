"""The typed boundary: _core.pyi matches the compiled bindings, every kernel is keyword-only
and documented, and only moe_py/_kernels.py imports _core."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from moe_py import _core

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_stub_matches_the_compiled_bindings():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_core_stub.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_every_kernel_with_arguments_is_keyword_only():
    stub = open(os.path.join(ROOT, "moe_py", "_core.pyi")).read()
    defs = re.findall(r"^def (\w+)\((.*)\) ->", stub, re.M)
    assert len(defs) > 40
    for name, args in defs:
        assert args == "" or args.startswith("*, "), name


def test_positional_or_misspelt_arguments_fail_at_once_with_the_signature():
    x = np.zeros((4, 8), np.float32)
    w = np.zeros((8, 3), np.float32)
    with pytest.raises(TypeError, match=r"\(\*, x: .*, w: "):
        _core.linear_forward_f32(x, w)
    with pytest.raises(TypeError, match="incompatible function arguments"):
        _core.linear_forward_f32(x=x, weight=w)
    assert _core.linear_forward_f32(x=x, w=w).shape == (4, 3)


def test_only_the_kernels_module_imports_core():
    """The layers reach _core through _kernels.py; kernels.py is the public door to the same
    kernels for benchmarks and experiments."""
    pkg = os.path.join(ROOT, "moe_py")
    for name in os.listdir(pkg):
        if name.endswith(".py") and name not in ("_kernels.py", "kernels.py"):
            text = open(os.path.join(pkg, name)).read()
            assert not re.search(r"import _core|_core\.", text), name
