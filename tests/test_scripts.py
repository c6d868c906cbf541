"""The test files the CI scripts name exist (a renamed test file must not silently drop out
of the ISA or sanitizer runs, or fail them with "file not found")."""
import itertools
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def named_test_files(text: str):
    """tests/test_x.py and tests/test_{a,b}.py (bash brace lists) in a script."""
    for m in re.finditer(r"tests/test_(\{[a-z0-9_,]+\}|[a-z0-9_]+)\.py", text):
        part = m.group(1)
        names = part[1:-1].split(",") if part.startswith("{") else [part]
        yield from (f"tests/test_{n}.py" for n in names)


def test_the_scripts_name_existing_test_files():
    scripts = list((ROOT / "scripts").glob("*.sh")) + [ROOT / ".ci" / "run"]
    named = list(itertools.chain.from_iterable(named_test_files(p.read_text()) for p in scripts))
    assert named, "expected the ISA check to name its test files"
    missing = [n for n in named if not (ROOT / n).exists()]
    assert not missing, f"named by a script but absent: {missing}"


def test_brace_lists_are_expanded():
    assert list(named_test_files("x tests/test_{a,b_c}.py tests/test_d.py")) == \
        ["tests/test_a.py", "tests/test_b_c.py", "tests/test_d.py"]
