"""Runs the frontend extension's pure-logic tests (``tests/js``) with node's built-in test runner."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_js_logic_with_node_test_runner():
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not on PATH: the web/fatezero_logic.js tests need Node.js 18 or newer")
    result = subprocess.run([node, "--test", "tests/js/"], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-8000:]
    assert "# fail 0" in output and "# pass 0" not in output, output[-8000:]
