#!/usr/bin/env bash
# The type check (run by .ci/run after the tests, so .venv exists with moe_py built into it):
# mypy over the package ([tool.mypy] in pyproject.toml), then mypy.stubtest of moe_py/_core.pyi
# against the compiled module (tests/test_core_stub.py checks the stub is not stale).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m mypy
.venv/bin/python -m mypy.stubtest moe_py._core --allowlist scripts/stubtest_allowlist.txt
