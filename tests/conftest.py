"""Pytest set-up shared by every test tier.

The repository root is a ComfyUI custom-node package: its ``__init__.py`` is ComfyUI's entry
point and imports ``nodes/``, which needs ComfyUI. Pytest would collect the root as a test package
and import that ``__init__.py`` before running any test, so the core tests would need ComfyUI.
The plugin below makes pytest collect the root as a plain directory instead; nothing else about
collection changes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


class _RepoRootIsNotATestPackage:
    @pytest.hookimpl(tryfirst=True)
    def pytest_collect_directory(self, path: Path, parent):
        if Path(path) == REPO:
            return pytest.Dir.from_parent(parent, path=Path(path))
        return None


def pytest_configure(config):
    if not config.pluginmanager.has_plugin("fatezero-repo-root"):
        config.pluginmanager.register(_RepoRootIsNotATestPackage(), "fatezero-repo-root")
