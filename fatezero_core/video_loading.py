"""Load a clip's frames as an IMAGE batch: decoding, frame selection and resizing.

Sources ``load_frames`` understands:

- a video file (``VIDEO_EXTENSIONS``), decoded with ``cv2.VideoCapture`` (FFmpeg backend first);
  a large ``skip_first_frames`` seeks instead of decoding the skipped frames, where PyAV (a
  ComfyUI requirement) can confirm from the container's timestamps that the seek found the frame;
- an animated GIF (``.gif`` counts as a video; OpenCV's FFmpeg backend reads it, and
  ``cv2.imreadanimation`` / ``cv2.imreadmulti`` are used as a fallback where that fails);
- a single still image (``IMAGE_EXTENSIONS``), loaded as a one-frame clip;
- a directory of still images, read as an image sequence in natural order (``frame2`` before
  ``frame10``); files with other extensions and hidden files are ignored.

Frames come out as ComfyUI IMAGE tensors: ``float32 [F, H, W, 3]``, RGB, values in 0..1, on the
CPU, with H and W multiples of 8 (the VAE downsamples by 8).

The "crop" resize mode is the official FateZero preprocessing (``ImageSequenceDataset.transform``):
scale the short side to ``size`` with antialiased bilinear interpolation (``int(scale * long)`` for
the long side), then centre-crop ``size x size``. The sound under the loaded frames is
:mod:`.video_audio`'s.

Nothing here imports ComfyUI. Errors a user can fix raise :class:`~fatezero_core.errors.VideoError`
with a message that says what to change.
"""

from __future__ import annotations

import heapq
import math
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .errors import VideoError
from .media_types import (
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    file_extension,
    is_image_file,
    is_video_file,
    natural_sort_key,
)

__all__ = [
    "RESIZE_MODES",
    "SEEK_FROM_FRAME",
    "VideoSource",
    "video_source",
    "list_image_sequence",
    "output_size",
    "resize_frames",
    "scaled_size",
    "load_frames",
    "select_frames",
]

RESIZE_MODES: tuple[str, ...] = ("crop", "keep_aspect", "none")
"""Accepted values of ``resize_mode``."""


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


def list_image_sequence(directory: str | os.PathLike) -> list[str]:
    """Full paths of the still images directly inside ``directory``, in natural order.

    Hidden files, sub-directories and files without an image extension are skipped.
    """
    directory = os.fspath(directory)
    names = [
        n for n in os.listdir(directory)
        if not n.startswith(".") and is_image_file(n) and os.path.isfile(os.path.join(directory, n))
    ]
    names.sort(key=natural_sort_key)
    return [os.path.join(directory, n) for n in names]


def _supported_list() -> str:
    return ", ".join(VIDEO_EXTENSIONS + IMAGE_EXTENSIONS)


@dataclass(frozen=True)
class VideoSource:
    """What :func:`load_frames` reads for a path: its ``kind`` ("video", "image" or "sequence")
    and the ``files`` it decodes, in load order (the one file itself for a video or an image)."""

    kind: str
    path: str
    files: tuple[str, ...]


def video_source(path: str | os.PathLike) -> VideoSource:
    """Classify ``path`` and check that it exists, is non-empty and has a supported type."""
    path = os.fspath(path)
    if not path:
        raise VideoError("No video was chosen: pick a video file, an image or an image folder.")
    if not os.path.exists(path):
        folder = os.path.dirname(os.path.abspath(path))
        raise VideoError(
            f"'{os.path.basename(path)}' was not found in '{folder}'. "
            "Put the file there (or upload it) and pick it again, or choose another file."
        )
    if os.path.isdir(path):
        files = list_image_sequence(path)
        if not files:
            raise VideoError(
                f"The folder '{path}' holds no images to use as a frame sequence. Put the "
                f"frames in it as {', '.join(IMAGE_EXTENSIONS)} files, or pick a video file."
            )
        return VideoSource("sequence", path, tuple(files))
    if not (is_video_file(path) or is_image_file(path)):
        raise VideoError(
            f"'{os.path.basename(path)}' is not a supported video or image type. "
            f"Convert it to one of: {_supported_list()}."
        )
    if os.path.getsize(path) == 0:
        raise VideoError(
            f"'{os.path.basename(path)}' is empty (0 bytes). The upload or copy probably failed: "
            "copy the file again."
        )
    return VideoSource("video" if is_video_file(path) else "image", path, (path,))


def _unreadable(path: str, what: str = "video") -> VideoError:
    return VideoError(
        f"Could not read any frames from '{os.path.basename(path)}': the {what} is damaged, "
        "incomplete, or in a format OpenCV cannot decode. Re-encode it (for example as an "
        "H.264 .mp4) or export it as a folder of PNG frames."
    )


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def _open_capture(path: str) -> cv2.VideoCapture | None:
    """Open ``path`` with the FFmpeg backend, falling back to any backend; None when neither can."""
    for api in (cv2.CAP_FFMPEG, cv2.CAP_ANY):
        cap = cv2.VideoCapture(path, api)
        if cap.isOpened():
            return cap
        cap.release()
    return None


def _decode_image_file(path: str) -> np.ndarray:
    """Read a still image as an RGB ``[H, W, 3]`` array (uint8, uint16 or float).

    Goes through ``np.fromfile`` + ``cv2.imdecode`` so non-ASCII paths work on every OS. EXIF
    orientation is applied; an alpha channel is dropped; grey images become RGB.
    """
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise VideoError(f"Could not open '{path}': {exc}. Check the file's permissions.") from exc
    img = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH) if data.size else None
    if img is None:
        raise _unreadable(path, "image")
    return np.ascontiguousarray(img[..., ::-1])


def _gif_fallback(path: str) -> tuple[list[np.ndarray], float | None]:
    """Decode every frame of a GIF with OpenCV's image codecs (RGB frames, fps or None)."""
    data = np.fromfile(path, dtype=np.uint8)
    if hasattr(cv2, "imdecodeanimation"):
        ok, anim = cv2.imdecodeanimation(data)
        if ok and len(anim.frames):
            durations = [d for d in anim.durations if d > 0]
            fps = 1000.0 / (sum(durations) / len(durations)) if durations else None
            return [np.ascontiguousarray(f[..., 2::-1]) for f in anim.frames], fps
    if hasattr(cv2, "imdecodemulti"):
        ok, frames = cv2.imdecodemulti(data, cv2.IMREAD_COLOR)
        if ok and frames:
            return [np.ascontiguousarray(f[..., ::-1]) for f in frames], None
    return [], None


@dataclass(frozen=True)
class _Selection:
    skip: int
    nth: int
    cap: int

    def wants(self, index: int) -> bool:
        return index >= self.skip and (index - self.skip) % self.nth == 0

    def expected(self, total: int) -> int:
        """How many frames a source of ``total`` frames yields (0 when ``total`` is unknown)."""
        n = math.ceil(max(0, total - self.skip) / self.nth)
        return min(n, self.cap) if self.cap else n


SEEK_FROM_FRAME = 32
"""``skip_first_frames`` from which a video file is positioned by seeking rather than by decoding
every skipped frame (OpenCV's seek decodes from the key frame before a point 16 frames back)."""


def _presentation_time(path: str, index: int) -> tuple[float, float] | None:
    """``(seconds, tick)``: when frame ``index`` (presentation order) shows, from the video
    stream's start, and the stream's time base; read from packet timestamps with PyAV, without
    decoding. None without PyAV, or when a packet has no timestamp or the clip is shorter.

    Packets come in decode order with non-decreasing ``dts`` and ``pts >= dts``, so once a
    packet's ``dts`` passes the ``index + 1`` smallest ``pts`` seen, no later frame shows earlier.
    """
    try:
        import av
    except ImportError:
        return None
    try:
        with av.open(path) as container:
            if not container.streams.video:
                return None
            stream = container.streams.video[0]
            if stream.start_time is None or not stream.time_base:
                return None
            earliest: list[int] = []  # the index + 1 smallest pts, negated (a max-heap)
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue  # the end-of-stream marker
                if packet.pts is None:
                    return None
                if len(earliest) <= index:
                    heapq.heappush(earliest, -packet.pts)
                elif packet.pts < -earliest[0]:
                    heapq.heapreplace(earliest, -packet.pts)
                if len(earliest) > index and packet.dts is not None and packet.dts > -earliest[0]:
                    break
            if len(earliest) <= index:
                return None
            tick = float(stream.time_base)
            return (-earliest[0] - stream.start_time) * tick, tick
    except (OSError, ValueError, getattr(av, "FFmpegError", OSError)):
        return None


def _read_at(cap: cv2.VideoCapture, index: int, when: float, tick: float) -> np.ndarray | None:
    """Seek ``cap`` to frame ``index`` and read it (RGB), or None when the frame it landed on is
    not the one that shows at ``when`` seconds (:func:`_presentation_time`; ``cap``'s position is
    then unknown).

    OpenCV seeks by ``index / fps``, exact only at a constant frame rate; the frame read is
    checked against the frame's own timestamp in the container.
    """
    if not cap.set(cv2.CAP_PROP_POS_FRAMES, index):
        return None
    ok, frame = cap.read()
    if not ok or frame is None or abs(cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0 - when) > tick / 2:
        return None
    return np.ascontiguousarray(frame[..., ::-1])


class _Stats:
    """Frames seen while decoding (selected or not) and the frame rate the source reported."""

    def __init__(self) -> None:
        self.seen = 0
        self.fps: float | None = None


def _iter_video(
    path: str, cap: cv2.VideoCapture | None, sel: _Selection, stats: _Stats
) -> Iterator[np.ndarray]:
    """Yield the selected frames of an opened video as RGB uint8 arrays; releases ``cap``.

    Frames before and between the selected ones are only grabbed, not converted or returned.
    Decoding stops as soon as ``sel.cap`` frames were yielded. A GIF that the capture cannot
    read goes through :func:`_gif_fallback`.
    """
    taken = 0
    try:
        if cap is not None:
            fps = cap.get(cv2.CAP_PROP_FPS)
            stats.fps = fps if fps and math.isfinite(fps) and fps > 0 else None
            index = 0
            when = None
            if sel.skip >= SEEK_FROM_FRAME and file_extension(path) != ".gif":
                when = _presentation_time(path, sel.skip)
            if when is not None:
                first = _read_at(cap, sel.skip, *when)
                if first is None:  # landed elsewhere: decode from the first frame as usual
                    cap.release()
                    cap = _open_capture(path)
                else:
                    index = stats.seen = sel.skip + 1
                    taken = 1
                    yield first
            while cap is not None and not (sel.cap and taken >= sel.cap):
                if sel.wants(index):
                    ok, frame = cap.read()
                    if not ok or frame is None:
                        break
                    stats.seen = index + 1
                    taken += 1
                    yield np.ascontiguousarray(frame[..., ::-1])
                else:
                    if not cap.grab():
                        break
                    stats.seen = index + 1
                index += 1
    finally:
        if cap is not None:
            cap.release()
    if stats.seen == 0 and file_extension(path) == ".gif":
        frames, fps = _gif_fallback(path)
        stats.fps = fps
        for index, frame in enumerate(frames):
            if sel.cap and taken >= sel.cap:
                break
            stats.seen = index + 1
            if sel.wants(index):
                taken += 1
                yield frame
    if stats.seen == 0:
        raise _unreadable(path)


def _iter_files(files: Sequence[str], sel: _Selection, stats: _Stats) -> Iterator[np.ndarray]:
    """Yield the selected images of a sequence, reading only those files."""
    stats.seen = len(files)
    taken = 0
    for index, file in enumerate(files):
        if sel.cap and taken >= sel.cap:
            break
        if sel.wants(index):
            taken += 1
            yield _decode_image_file(file)


def _to_float(frame: np.ndarray) -> torch.Tensor:
    """RGB array (uint8 / uint16 / float) -> float32 tensor ``[H, W, 3]`` in 0..1."""
    if frame.dtype == np.uint8:
        return torch.from_numpy(frame).to(torch.float32).div_(255.0)
    if frame.dtype == np.uint16:
        return torch.from_numpy(frame.astype(np.float32)).div_(65535.0)
    return torch.from_numpy(frame.astype(np.float32)).clamp_(0.0, 1.0)


# --------------------------------------------------------------------------------------------
# Resizing
# --------------------------------------------------------------------------------------------


def _check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
        raise VideoError(f"size must be a whole number of pixels (got {size!r}); try 512.")
    size = int(size)
    if size <= 0 or size % 8:
        lower, upper = (size // 8) * 8, (size // 8 + 1) * 8
        hint = f"use {lower} or {upper}" if lower > 0 else f"use {max(upper, 8)}"
        raise VideoError(f"size must be a positive multiple of 8 (got {size}); {hint}.")
    return size


def _check_mode(resize_mode: str) -> str:
    if resize_mode not in RESIZE_MODES:
        raise VideoError(
            f"resize_mode must be one of {', '.join(RESIZE_MODES)} (got {resize_mode!r})."
        )
    return resize_mode


def scaled_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Short side to ``size``, long side ``int(scale * long)`` (the official rounding)."""
    short, long = (height, width) if height < width else (width, height)
    scale = size / short
    long_target = max(int(scale * long), size)
    return (size, long_target) if height < width else (long_target, size)


def output_size(height: int, width: int, *, size: int = 512, resize_mode: str = "crop") -> tuple[int, int]:
    """Output ``(height, width)`` of a ``height x width`` frame under ``resize_mode``.

    - ``crop``: ``(size, size)``.
    - ``keep_aspect``: short side ``size``, long side scaled then snapped down to a multiple of 8.
    - ``none``: source size snapped down to multiples of 8 (``size`` is checked but not used).
    """
    size = _check_size(size)
    _check_mode(resize_mode)
    if height <= 0 or width <= 0:
        raise VideoError(f"A frame of {width}x{height} pixels cannot be used; the file is damaged.")
    if resize_mode == "crop":
        return size, size
    if resize_mode == "keep_aspect":
        sh, sw = scaled_size(height, width, size)
        return sh // 8 * 8, sw // 8 * 8
    if height < 8 or width < 8:
        raise VideoError(
            f"Frames of {width}x{height} pixels are too small: with resize_mode 'none' both sides "
            "must be at least 8 pixels. Use resize_mode 'crop' or 'keep_aspect' to scale them up."
        )
    return height // 8 * 8, width // 8 * 8


def _center_crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Centre crop the last two dims of ``x`` (start offsets rounded down, as the official code)."""
    h, w = x.shape[-2:]
    top, left = (h - height) // 2, (w - width) // 2
    return x[..., top:top + height, left:left + width]


def resize_frames(frames: torch.Tensor, *, size: int = 512, resize_mode: str = "crop") -> torch.Tensor:
    """Resize and crop ``[F, H, W, C]`` (or ``[H, W, C]``) frames in 0..1 as :func:`load_frames` does.

    Scaling uses antialiased bilinear interpolation (an area-like filter when shrinking, plain
    bilinear when enlarging), as the official preprocessing does. Returns a contiguous float32
    tensor with the same number of dims, values clamped to 0..1.
    """
    squeeze = frames.dim() == 3
    x = frames.unsqueeze(0) if squeeze else frames
    if x.dim() != 4:
        raise VideoError(f"Frames must be shaped [F, H, W, C]; got {tuple(frames.shape)}.")
    h, w = x.shape[1:3]
    out_h, out_w = output_size(h, w, size=size, resize_mode=resize_mode)
    x = x.to(torch.float32).permute(0, 3, 1, 2)
    if resize_mode != "none":
        sh, sw = scaled_size(h, w, size)
        if (sh, sw) != (h, w):
            x = F.interpolate(x, size=(sh, sw), mode="bilinear", align_corners=False, antialias=True)
            x = x.clamp_(0.0, 1.0)
    x = _center_crop(x, out_h, out_w).permute(0, 2, 3, 1).contiguous()
    return x[0] if squeeze else x


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _check_fps(sequence_fps: float) -> float:
    try:
        fps = float(sequence_fps)
    except (TypeError, ValueError):
        fps = float("nan")
    if not (math.isfinite(fps) and fps > 0):
        raise VideoError(f"sequence_fps must be a positive number (got {sequence_fps!r}); try 8.")
    return fps


def _check_count(name: str, value: int, minimum: int, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise VideoError(f"{name} must be a whole number (got {value!r}); {hint}.")
    if value < minimum:
        raise VideoError(f"{name} must be at least {minimum} (got {value}); {hint}.")
    return int(value)


class _FrameBuffer:
    """Collects same-sized frames into one preallocated ``[N, H, W, 3]`` tensor.

    The capacity starts at the expected frame count, so the usual case allocates once and never
    copies; an underestimate grows the buffer by half again.
    """

    def __init__(self, expected: int) -> None:
        self.expected = max(1, expected)
        self.data: torch.Tensor | None = None
        self.count = 0

    def append(self, frame: torch.Tensor, where: str) -> None:
        if self.data is None:
            self.data = torch.empty((self.expected, *frame.shape), dtype=torch.float32)
        elif frame.shape != self.data.shape[1:]:
            raise VideoError(
                f"Frame {self.count} of '{where}' is {frame.shape[1]}x{frame.shape[0]} after "
                f"resizing, but earlier frames are {self.data.shape[2]}x{self.data.shape[1]}. "
                "All frames must have the same size and aspect ratio: resize the frames to one "
                "size, or use resize_mode 'crop'."
            )
        if self.count == self.data.shape[0]:
            grown = torch.empty((self.count + max(8, self.count // 2), *frame.shape), dtype=torch.float32)
            grown[: self.count] = self.data
            self.data = grown
        self.data[self.count] = frame
        self.count += 1

    def result(self) -> torch.Tensor:
        assert self.data is not None
        if self.count == self.data.shape[0]:
            return self.data
        return self.data[: self.count].clone()


def _check_selection(frame_load_cap, skip_first_frames, select_every_nth, size, resize_mode) -> tuple[_Selection, int]:
    """The checked frame selection and size (raises :class:`VideoError` saying what to use)."""
    cap = _check_count("frame_load_cap", frame_load_cap, 0, "use 0 to load every frame")
    skip = _check_count("skip_first_frames", skip_first_frames, 0, "use 0 to start at the first frame")
    nth = _check_count("select_every_nth", select_every_nth, 1, "use 1 to keep every frame")
    size = _check_size(size)
    _check_mode(resize_mode)
    return _Selection(skip, nth, cap), size


def _zero_selected_error(path: str, seen: int, sel: _Selection) -> VideoError:
    name = os.path.basename(os.path.normpath(path))
    return VideoError(
        f"No frames left to load: '{name}' has {seen} frame{'s' if seen != 1 else ''} and "
        f"skip_first_frames={sel.skip} skips all of them. Set skip_first_frames to at most "
        f"{max(0, seen - 1)}."
    )


def load_frames(
    path: str | os.PathLike,
    *,
    frame_load_cap: int = 0,
    skip_first_frames: int = 0,
    select_every_nth: int = 1,
    size: int = 512,
    resize_mode: str = "crop",
    sequence_fps: float = 8.0,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, float]:
    """Load a video, GIF, image or image-sequence folder as ``(frames, fps)``.

    Frame selection: the first ``skip_first_frames`` frames are dropped, then every
    ``select_every_nth``-th frame is kept (starting with the first one left), and loading stops
    after ``frame_load_cap`` kept frames (0 loads all). Frames are decoded one at a time and only
    the kept ones are resized and stored, so memory is bounded by the output. From
    ``SEEK_FROM_FRAME`` skipped frames on, a video seeks to the first kept frame (the frames are
    those of a decode from the start; see :func:`_read_at`).

    ``frames`` is ``float32 [F, H, W, 3]`` RGB in 0..1 on the CPU, resized by ``resize_mode`` (see
    :func:`output_size`); H and W are always multiples of 8. ``fps`` is the playback rate of the
    kept frames: the source rate (``sequence_fps`` for image sequences, single images, and videos
    that report no rate) divided by ``select_every_nth``, so a video made from them lasts as long
    as the source span.

    ``progress(done, total)`` is called after each kept frame; ``total`` is the expected number of
    kept frames, estimated from the container's frame count for videos (never below ``done``).
    """
    sel, size = _check_selection(frame_load_cap, skip_first_frames, select_every_nth, size, resize_mode)
    fallback_fps = _check_fps(sequence_fps)

    src = video_source(path)
    stats = _Stats()
    if src.kind == "video":
        cap = _open_capture(src.path)
        total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0) if cap is not None else 0
        raw = _iter_video(src.path, cap, sel, stats)
    else:
        total = len(src.files)
        raw = _iter_files(src.files, sel, stats)

    expected = sel.expected(total) if total > 0 else sel.cap
    buffer = _FrameBuffer(expected)
    try:
        for frame in raw:
            buffer.append(resize_frames(_to_float(frame), size=size, resize_mode=resize_mode), src.path)
            if progress is not None:
                progress(buffer.count, max(expected, buffer.count))
    finally:
        raw.close()

    if buffer.count == 0:
        raise _zero_selected_error(src.path, stats.seen, sel)
    fps = stats.fps if src.kind == "video" and stats.fps else fallback_fps
    return buffer.result(), float(fps) / sel.nth


def select_frames(
    frames: torch.Tensor,
    fps: float,
    *,
    frame_load_cap: int = 0,
    skip_first_frames: int = 0,
    select_every_nth: int = 1,
    size: int = 512,
    resize_mode: str = "crop",
) -> tuple[torch.Tensor, float]:
    """:func:`load_frames` on frames already decoded (``[F, H, W, 3]`` in 0..1 at ``fps``).

    Same selection, resizing and returned rate as :func:`load_frames`, for a clip that another
    node decoded (ComfyUI's VIDEO). Only the kept frames are resized.
    """
    sel, size = _check_selection(frame_load_cap, skip_first_frames, select_every_nth, size, resize_mode)
    rate = _check_fps(fps)
    if frames.dim() != 4 or frames.shape[-1] != 3:
        raise VideoError(f"The video's frames must be shaped [F, H, W, 3]; got {tuple(frames.shape)}.")
    kept = frames[sel.skip::sel.nth][: sel.cap or None]
    if kept.shape[0] == 0:
        raise _zero_selected_error("the connected video", frames.shape[0], sel)
    return resize_frames(kept, size=size, resize_mode=resize_mode), rate / sel.nth

