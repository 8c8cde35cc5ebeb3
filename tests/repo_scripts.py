"""Import the repo's stand-alone scripts (``tools/``: not a package) in tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def load_script(relative_path: str):
    """The module of ``REPO/relative_path``, imported by path once (named after the file)."""
    path = REPO / relative_path
    name = path.stem
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
