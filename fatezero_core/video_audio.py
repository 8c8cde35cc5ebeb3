"""The sound of exactly the frames :func:`~fatezero_core.video_loading.load_frames` kept.

A float waveform ``[1, C, S]`` in -1..1 and its sample rate. Decoding uses PyAV (``av``, a ComfyUI
requirement), imported only when audio is read. Nothing here imports ComfyUI; errors a user can
fix raise :class:`~fatezero_core.errors.VideoError` saying what to change.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from .errors import VideoError

__all__ = ["selection_audio_span", "crop_audio", "read_audio"]


def selection_audio_span(
    frame_count: int, fps: float, *, skip_first_frames: int = 0, select_every_nth: int = 1
) -> tuple[float, float]:
    """``(start, duration)`` in seconds of the sound of ``frame_count`` frames loaded at ``fps``.

    ``fps`` is the rate ``load_frames`` returned (source rate / ``select_every_nth``). The
    loaded clip plays from source frame ``skip_first_frames`` for ``frame_count / fps`` seconds:
    each kept frame stands for the ``select_every_nth`` source frames up to the next kept one.
    """
    source_fps = fps * select_every_nth
    return skip_first_frames / source_fps, frame_count / fps


def crop_audio(waveform: torch.Tensor, sample_rate: int, start: float, duration: float) -> torch.Tensor:
    """The samples of ``[..., C, S]`` from ``start`` seconds for ``duration`` seconds.

    Returns ``round(duration * sample_rate)`` samples; where the source has none (before its
    start, after its end) they are silence, so the sound always lasts exactly ``duration``.
    """
    total = round(duration * sample_rate)
    first = round(start * sample_rate)
    out = waveform.new_zeros((*waveform.shape[:-1], total))
    lo, hi = max(first, 0), min(first + total, waveform.shape[-1])
    if hi > lo:
        out[..., lo - first:hi - first] = waveform[..., lo:hi]
    return out


def _import_av():
    try:
        import av
    except ImportError as exc:
        raise VideoError(
            "Reading a clip's sound needs PyAV (the 'av' package, installed with ComfyUI): "
            "run 'pip install av' in ComfyUI's Python."
        ) from exc
    return av


def _frame_samples(frame) -> np.ndarray:
    """One decoded audio frame as float32 ``[C, n]`` in -1..1, whatever its sample format."""
    data = frame.to_ndarray()
    channels = len(frame.layout.channels)
    if not frame.format.is_planar:
        data = data.reshape(-1, channels).T
    if data.dtype.kind == "u":  # unsigned PCM is centred on half its range
        half = float(1 << (8 * data.dtype.itemsize - 1))
        return ((data.astype(np.float32) - half) / half).astype(np.float32)
    if data.dtype.kind == "i":
        return data.astype(np.float32) / float(-np.iinfo(data.dtype).min)
    return data.astype(np.float32, copy=False)


def read_audio(path: str | os.PathLike, start: float, duration: float) -> tuple[torch.Tensor, int] | None:
    """``(waveform [1, C, S], sample_rate)`` of the file's first audio stream, None without one.

    ``start`` and ``duration`` are seconds on the clip's timeline: 0 is the first video frame
    (the video stream's start time), so the sound lines up with the frames ``load_frames``
    returns. The result has exactly ``round(duration * sample_rate)`` samples (silence where the
    stream has none). Decoding stops at the end of the span; what comes before it is decoded and
    dropped frame by frame, so memory stays at the span's size however late it starts.

    Raises:
        VideoError: PyAV is missing, or the file's audio cannot be decoded.
    """
    av = _import_av()
    path = os.fspath(path)
    errors = (OSError, ValueError, getattr(av, "FFmpegError", OSError))
    try:
        with av.open(path) as container:
            if not container.streams.audio:
                return None
            stream = container.streams.audio[0]
            sample_rate = int(stream.sample_rate or 0)
            if sample_rate <= 0:
                return None
            video = container.streams.video[0] if container.streams.video else None
            origin = float(video.start_time * video.time_base) if video is not None and video.start_time is not None else 0.0
            total = round(duration * sample_rate)
            out = None
            cursor = None
            for frame in container.decode(stream):
                if cursor is None:  # place the stream by its first frame; then samples are contiguous
                    when = frame.time if frame.time is not None else 0.0
                    cursor = round((when - origin - start) * sample_rate)
                    out = torch.zeros(1, len(frame.layout.channels), total)
                if cursor + frame.samples > 0:  # frames before the span are decoded, not kept
                    _place(out, _frame_samples(frame), cursor)
                cursor += frame.samples
                if cursor >= total:
                    break
    except errors as exc:
        raise VideoError(
            f"The sound of '{os.path.basename(path)}' could not be decoded ({exc}). Re-encode the "
            "clip (for example as H.264 + AAC .mp4), or remove its audio track."
        ) from None
    if out is None:
        return None
    return out, sample_rate


def _place(out: torch.Tensor, samples: np.ndarray, offset: int) -> None:
    """Copy ``[C, n]`` samples starting at sample ``offset`` of ``out`` ``[1, C, S]``, cut to it."""
    channels, total = out.shape[1], out.shape[2]
    lo, hi = max(offset, 0), min(offset + samples.shape[1], total)
    if hi > lo:
        out[0, :, lo:hi] = torch.from_numpy(samples[:channels, lo - offset:hi - offset])
