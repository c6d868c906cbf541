"""Every ```python block of the README runs as written (in a scratch folder)."""
import os
import re
import subprocess
import sys

import pytest

README = os.path.join(os.path.dirname(__file__), "..", "README.md")
BLOCKS = re.findall(r"```python\n(.*?)```", open(README).read(), re.S)


def test_the_readme_has_python_examples():
    assert BLOCKS


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_block_runs(i, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    block = BLOCKS[i]
    if "import torch" in block:
        pytest.importorskip("torch")
    if "moe_py.hf" in block:
        pytest.importorskip("transformers")
    if block.startswith("# test_"):  # an example test file: run it with pytest, twice (the
        # first run writes its golden file, the second compares with it)
        name = block.splitlines()[0][2:].strip()
        (tmp_path / name).write_text(block)
        for _ in range(2):
            r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", name],
                               cwd=tmp_path, capture_output=True, text=True)
            assert r.returncode == 0, r.stdout[-3000:]
        return
    exec(compile(block, f"README.md python block {i}", "exec"), {"__name__": "__readme__"})
