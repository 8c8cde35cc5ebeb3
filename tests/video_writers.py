"""Write test clips with OpenCV: frames ``[F, H, W, 3]`` in 0..1 RGB as a video file or PNG files.

Both tiers import this (``tests`` is on pytest's ``pythonpath``); the loader under test reads
what these write. Nothing that ships writes clips: the pack saves through ComfyUI's own nodes.
"""

from __future__ import annotations

import os

import cv2
import numpy as np
import torch

# .avi as Motion-JPEG (near-lossless at OpenCV's default quality), the rest as MPEG-4 Part 2.
_FOURCC = {".avi": "MJPG", ".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v"}


def _as_uint8(frames: torch.Tensor | np.ndarray) -> np.ndarray:
    """``[F, H, W, 3]`` frames in 0..1 -> uint8 RGB array."""
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(frames)
    if frames.dim() != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"frames must be shaped [F, H, W, 3] with F >= 1; got {tuple(frames.shape)}")
    x = frames.detach().to("cpu", torch.float32).clamp(0.0, 1.0).mul(255.0).round_()
    return x.to(torch.uint8).numpy()


def write_video(path: str | os.PathLike, frames: torch.Tensor | np.ndarray, fps: float) -> str:
    """Write ``frames`` as a video at ``fps`` (``.avi``, ``.mp4``, ``.m4v`` or ``.mov``); returns
    the path. Parent folders are created."""
    path = os.fspath(path)
    fourcc = _FOURCC[os.path.splitext(path)[1].lower()]
    data = _as_uint8(frames)
    _, h, w, _ = data.shape
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*fourcc), float(fps), (w, h))
    assert writer.isOpened(), f"OpenCV cannot write {path} with {fourcc}"
    try:
        for frame in data:
            writer.write(np.ascontiguousarray(frame[..., ::-1]))
    finally:
        writer.release()
    assert os.path.getsize(path) > 0, f"writing {path} produced no data"
    return path


def write_image_sequence(
    directory: str | os.PathLike, frames: torch.Tensor | np.ndarray, *, prefix: str = "frame_", start: int = 0
) -> list[str]:
    """Write ``frames`` as PNG files ``{prefix}{index:05d}.png`` in ``directory`` (created if
    needed); returns the paths in order (natural and lexical order agree)."""
    directory = os.fspath(directory)
    data = _as_uint8(frames)
    os.makedirs(directory, exist_ok=True)
    paths = []
    for i, frame in enumerate(data):
        out = os.path.join(directory, f"{prefix}{start + i:05d}.png")
        assert cv2.imwrite(out, np.ascontiguousarray(frame[..., ::-1])), f"OpenCV cannot write {out}"
        paths.append(out)
    return paths
