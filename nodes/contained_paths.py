"""Names a user gives for files inside one of ComfyUI's folders: where they lead, and whether that
stays inside the folder.

A name is taken as written: ``..`` parts are resolved by name and symlinks are not followed, as
ComfyUI checks where a save or a ``/view`` request goes (``os.path.commonpath`` of the absolute
paths in ``folder_paths.get_save_image_path`` and in the ``/view`` route of ``server.py``, ComfyUI
0.3.64), so a link someone put in the folder works wherever it points.
"""

from __future__ import annotations

import os


def is_within(path: str, folder: str) -> bool:
    """``path`` is ``folder`` or lies below it (both absolute and normalised)."""
    try:
        return os.path.commonpath([path, folder]) == folder
    except ValueError:  # different drives on Windows
        return False


def join_inside(folder: str | os.PathLike, name: str) -> str | None:
    """The absolute, normalised path that ``name`` names in ``folder``, or None when it leads
    outside ``folder`` (``..`` parts that climb out, or an absolute path elsewhere)."""
    root = os.path.abspath(os.fspath(folder))
    path = os.path.abspath(os.path.join(root, name))
    return path if is_within(path, root) else None


__all__ = ["is_within", "join_inside"]
