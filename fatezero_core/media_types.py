"""File types the loader reads and the order it lists them in: one place for the node, the core
and the runner (which imports this module without torch, so it holds nothing else)."""

from __future__ import annotations

import os
import re

VIDEO_EXTENSIONS: tuple[str, ...] = (
    ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".wmv", ".flv", ".ts",
    ".gif",
)
"""File extensions (lower case) read as videos. ``.gif`` is here: a GIF is read frame by frame."""

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff",
)
"""File extensions (lower case) read as still images, alone or as frames of a sequence directory."""


def file_extension(path: str | os.PathLike) -> str:
    """The lower-case extension of ``path`` (``""`` without one)."""
    return os.path.splitext(os.fspath(path))[1].lower()


def is_video_file(path: str | os.PathLike) -> bool:
    """True when ``path`` has a video extension (``VIDEO_EXTENSIONS``, GIF included)."""
    return file_extension(path) in VIDEO_EXTENSIONS


def is_image_file(path: str | os.PathLike) -> bool:
    """True when ``path`` has a still-image extension (``IMAGE_EXTENSIONS``)."""
    return file_extension(path) in IMAGE_EXTENSIONS


def natural_sort_key(name: str) -> tuple:
    """Sort key that orders digit runs by value: ``frame2`` < ``frame10`` < ``Frame11``.

    Text parts compare case-insensitively; the original name breaks ties so the order is total.
    """
    parts = re.split(r"(\d+)", name)
    key = tuple(int(p) if i % 2 else p.lower() for i, p in enumerate(parts))
    return key, name
