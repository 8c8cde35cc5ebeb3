"""File types the loader reads: one list for the node, the core and the runner (which imports
this module without torch, so it holds nothing else)."""

VIDEO_EXTENSIONS: tuple[str, ...] = (
    ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".wmv", ".flv", ".ts",
    ".gif",
)
"""File extensions (lower case) read as videos. ``.gif`` is here: a GIF is read frame by frame."""

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff",
)
"""File extensions (lower case) read as still images, alone or as frames of a sequence directory."""
