"""Where ``disk`` attention stores live: a folder of this ComfyUI process that no other one empties.

ComfyUI deletes its whole temp folder when it starts and when it stops (``main.py``
``cleanup_temp``, ComfyUI 0.3.64), so a second ComfyUI on the same install (one per GPU is common)
would delete a running one's stores. Stores live next to the temp folder instead, in
``fatezero_stores/<host>-<pid>``: the process removes its folder when it exits,
and a later process removes the folders of processes that are gone (killed, so their exit handler
never ran). A folder of a process that still runs, or of another machine sharing the install, is
never touched.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import socket

import folder_paths
import psutil  # a ComfyUI requirement (comfy.model_management uses it)

ROOT_NAME = "fatezero_stores"
_folders: dict[str, str] = {}  # root -> this process's folder in it


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def process_folder_name(pid: int | None = None) -> str:
    """``<host>-<pid>`` of process ``pid`` (this one by default)."""
    return f"{_host()}-{os.getpid() if pid is None else pid}"


def _gone(name: str) -> bool:
    """True when ``name`` is a folder of this machine whose process no longer runs.

    A reused pid keeps a dead process's folder until that pid is free again (a new process with
    that pid shares the folder and removes it at exit): a live process's folder is never taken."""
    match = re.fullmatch(r"(.+)-(\d+)", name)
    return match is not None and match[1] == _host() and not psutil.pid_exists(int(match[2]))


def remove_stale_folders(root: str) -> list[str]:
    """Delete the folders in ``root`` left by processes of this machine that are gone; returns
    their names."""
    try:
        names = [entry.name for entry in os.scandir(root) if entry.is_dir(follow_symlinks=False)]
    except OSError:
        return []
    stale = [name for name in names if _gone(name)]
    for name in stale:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return stale


def _root() -> str:
    temp = os.path.abspath(folder_paths.get_temp_directory())
    return os.path.join(os.path.dirname(temp), ROOT_NAME)


def planned_store_folder() -> str:
    """The folder :func:`store_folder` returns, without creating it (what DDIM Invert names when it
    checks the free disk space for a ``disk`` store)."""
    return _folders.get(_root()) or os.path.join(_root(), process_folder_name())


def store_folder() -> str:
    """This process's folder for ``disk`` stores (created if needed) beside ComfyUI's temp folder.

    The first call for a root also clears the folders of processes that are gone and arranges
    for this process's folder to be removed at exit.
    """
    root = _root()
    folder = _folders.get(root)
    if folder is None:
        remove_stale_folders(root)
        folder = os.path.join(root, process_folder_name())
        atexit.register(shutil.rmtree, folder, True)
        _folders[root] = folder
    os.makedirs(folder, exist_ok=True)
    return folder


__all__ = ["ROOT_NAME", "planned_store_folder", "process_folder_name", "remove_stale_folders", "store_folder"]
