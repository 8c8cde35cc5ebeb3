"""The ``models/tuneavideo`` folder: the checkpoints the Tune-A-Video Loader lists and opens, and
where Tune-A-Video Train saves a tuned UNet.

The folder is registered with ComfyUI's ``folder_paths`` (so ``extra_model_paths.yaml`` may add a
``tuneavideo:`` path); a checkpoint is a weight file or a diffusers folder below any of its paths.
"""

from __future__ import annotations

import os
import re
import tempfile

import folder_paths

from ..fatezero_core.tav.checkpoint import (
    DIFFUSERS_WEIGHT_FILES,
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIXES,
    resolve_checkpoint_file,
)
from .contained_paths import join_inside
from .user_errors import FateZeroNodeError

FOLDER = "tuneavideo"
WEIGHT_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES
SAVE_NAME = re.compile(r"^[\w\-. ]+(/[\w\-. ]+)*$")

folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER))


# --------------------------------------------------------------------------------------------------
# Checkpoints to load
# --------------------------------------------------------------------------------------------------

def is_diffusers_folder(path: str) -> bool:
    """A diffusers pipeline folder (``unet/diffusion_pytorch_model.*``) or UNet folder
    (``diffusion_pytorch_model.*`` directly)."""
    return any(os.path.isfile(os.path.join(path, sub, name))
               for sub in ("unet", "") for name in DIFFUSERS_WEIGHT_FILES)


def list_checkpoints() -> list[str]:
    """Weight files and diffusers folders under every ``tuneavideo`` folder, as relative paths
    with ``/``. A diffusers folder is listed once, not its files."""
    names: set[str] = set()
    for root in folder_paths.get_folder_paths(FOLDER):
        if not os.path.isdir(root):
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            rel = os.path.relpath(dirpath, root)
            if rel != "." and is_diffusers_folder(dirpath):
                names.add(rel.replace(os.sep, "/"))
                dirnames[:] = []
                continue
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in filenames:
                if not name.startswith(".") and name.lower().endswith(WEIGHT_SUFFIXES):
                    names.add(os.path.normpath(os.path.join(rel, name)).replace(os.sep, "/"))
    return sorted(names, key=str.lower)


def resolve_checkpoint(name: str) -> str:
    """Absolute path of a listed checkpoint; never outside the ``tuneavideo`` folders."""
    roots = folder_paths.get_folder_paths(FOLDER)
    for root in roots:
        path = join_inside(root, name)
        if path is None:
            continue
        if os.path.isfile(path) or (os.path.isdir(path) and is_diffusers_folder(path)):
            return path
    raise FateZeroNodeError(
        f"Tune-A-Video checkpoint '{name}' was not found in {', '.join(roots) or 'any tuneavideo folder'}. "
        "Put a .safetensors/.bin file or a diffusers folder (with unet/diffusion_pytorch_model.*) "
        "there, or add a 'tuneavideo:' path in extra_model_paths.yaml, then refresh."
    )


def weights_fingerprint(path: str) -> str:
    """The weights file of a checkpoint with its size and modification time: changes when the file
    is replaced or rewritten."""
    file = resolve_checkpoint_file(path)
    stat = os.stat(file)
    return f"{file}:{stat.st_size}:{stat.st_mtime_ns}"


# --------------------------------------------------------------------------------------------------
# Where a tuned UNet is saved
# --------------------------------------------------------------------------------------------------

def save_path(save_name: str) -> str | None:
    """``models/tuneavideo/<save_name>.safetensors`` (first ``tuneavideo`` folder), or None for an
    empty name. Never outside that folder, never an existing file, never where nothing can be
    written: checked before any training."""
    name = save_name.strip().replace("\\", "/")
    if not name:
        return None
    if name.lower().endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    plain = SAVE_NAME.match(name) and not any(part in (".", "..") for part in name.split("/"))
    path = join_inside(folder_paths.get_folder_paths(FOLDER)[0], f"{name}.safetensors") if plain else None
    if path is None:
        raise FateZeroNodeError(
            f"save_name '{save_name}' is not a plain file name; use letters, digits, '-', '_' and "
            "'/' for a subfolder, e.g. 'my_clip_tuned_200'.")
    if os.path.lexists(path):
        raise FateZeroNodeError(f"{path} already exists; choose another save_name or delete that file.")
    problem = unwritable(os.path.dirname(path))
    if problem:
        raise FateZeroNodeError(f"Cannot save the tuned model to {path}: {problem}. Choose another save_name, "
                                "or make that folder writable.")
    return path


def unwritable(folder: str) -> str | None:
    """Why no file can be created in ``folder`` (or, while it does not exist, in the nearest
    existing folder above it, where its subfolders would go), or None. A hidden file is created
    and removed there: permissions, read-only file systems and a file in the way all show."""
    existing = folder
    while not os.path.lexists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing} is a file, not a folder"
    try:
        handle, probe = tempfile.mkstemp(dir=existing, prefix=".fatezero_write_check_")
    except OSError as error:
        return f"{existing} is not writable ({error.strerror or error})"
    os.close(handle)
    os.remove(probe)
    return None


__all__ = ["FOLDER", "list_checkpoints", "resolve_checkpoint", "save_path", "weights_fingerprint"]
