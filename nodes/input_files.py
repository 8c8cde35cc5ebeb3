"""Files the loader node reads from ComfyUI's input folder: where a picked name may point, and
the fingerprint that tells ComfyUI's cache when the picked clip changed.

ComfyUI calls ``fingerprint_inputs`` for every queued prompt. A video or image file is identified
by its bytes, remembered in a :class:`FileDigests` the node owns (a rewritten file has a new stat
key and is read again); the frames of an image-sequence folder by their stat keys alone, so a
folder of thousands of frames is never read to be fingerprinted.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os

from ..fatezero_core.video_loading import video_source
from .user_errors import FateZeroNodeError

_HASH_CHUNK = 1 << 20


def _is_within(path: str, base: str) -> bool:
    try:
        return os.path.commonpath([path, base]) == base
    except ValueError:  # different drives on Windows
        return False


def safe_input_path(base_dir: str | os.PathLike, relative: str | os.PathLike) -> str:
    """Resolve a user-given ``relative`` path inside ``base_dir`` and return its real path.

    Refuses absolute paths, drive letters, and names whose ``..`` parts leave ``base_dir``. Like
    ComfyUI's own loaders and its ``/view`` route (``folder_paths.get_annotated_filepath``,
    ``server.py``, ComfyUI 0.3.64), the name is checked, not where it leads: a symlink someone put
    in the folder is followed wherever it points, so a link to footage kept elsewhere loads as it
    does in Load Image. The path need not exist yet.
    """
    relative = os.fspath(relative)
    base = os.path.abspath(os.fspath(base_dir))
    hint = (
        f"'{relative}' must be inside the input folder '{base}': give a path relative to that "
        "folder (no leading '/', drive letter or '..'), or put the file, or a link to it, in that folder."
    )
    if not relative or "\0" in relative:
        raise FateZeroNodeError(f"The path {relative!r} is empty or invalid. Pick a file in '{base}'.")
    drive, _ = os.path.splitdrive(relative)
    if os.path.isabs(relative) or drive or relative.startswith(("/", "\\")):
        raise FateZeroNodeError(hint)
    named = os.path.normpath(os.path.join(base, relative))  # '..' taken by name, as ComfyUI does
    if not _is_within(named, base):
        raise FateZeroNodeError(hint)
    return os.path.realpath(named)


def _stat_key(path: str | os.PathLike) -> str:
    """Size, mtime, ctime and inode of the file at ``path``: a rewrite changes the mtime and, on
    POSIX, the ctime (which ``os.utime`` cannot set back); a replacement file the inode."""
    st = os.stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"


class FileDigests:
    """sha256 of files' bytes, remembered for the ``max_files`` most recently asked files.

    The key is (real path, size, mtime, ctime, inode): checking an unchanged file again does not
    re-read it, and any rewrite of the file changes the key, so it is hashed anew.
    """

    def __init__(self, max_files: int = 256):
        self._digest = functools.lru_cache(maxsize=max_files)(self._read)

    def sha256(self, path: str | os.PathLike) -> str:
        """Hex sha256 of the file at ``path`` (read in 1 MiB chunks unless remembered)."""
        return self._digest(os.path.realpath(path), _stat_key(path))

    @staticmethod
    def _read(path: str, *stat_key) -> str:  # stat_key: only part of the cache key
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(_HASH_CHUNK), b""):
                digest.update(chunk)
        return digest.hexdigest()


def frames_fingerprint(path: str | os.PathLike, digests: FileDigests, **params) -> str:
    """A hex sha256 identifying the frames ``load_frames(path, **params)`` would return.

    Combines what identifies the files the loader reads (a video's or image's bytes; for a
    sequence folder each image's name and stat key, in load order) with the parameters, so
    the host's cache reruns the loader when the content or a setting changed. Parameters are
    serialised as sorted JSON (``repr`` for other types). Raises
    :class:`~fatezero_core.errors.VideoError` for a path the loader would refuse.
    """
    src = video_source(path)
    digest = hashlib.sha256(b"fatezero-frames-v2\0")
    digest.update(f"{src.kind}:{len(src.files)}\0".encode())
    for file in src.files:
        if src.kind == "sequence":
            digest.update(f"{os.path.basename(file)}\0{_stat_key(file)}\0".encode())
        else:
            digest.update(f"{digests.sha256(file)}\0".encode())
    digest.update(json.dumps(params, sort_keys=True, default=repr).encode())
    return digest.hexdigest()


__all__ = ["FileDigests", "frames_fingerprint", "safe_input_path"]
