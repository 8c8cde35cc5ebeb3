"""Clips with a known sound, written with PyAV (ComfyUI's own video library), and how to read it back.

The sound of frame ``k`` (the time from ``k / fps`` to ``(k + 1) / fps``) is a sine of
``tone(k) = 250 * (k + 1)`` Hz at amplitude 0.5, on every channel; so the part of the sound a loader
kept tells which source frames it belongs to (below the Nyquist frequency: up to frame 30 at the
default 16 kHz, frame 62 at 32 kHz). Frame ``k``'s picture is a flat grey of value ``20 * k + 10``
(as in the other host clip tests), modulo 256 for clips longer than 12 frames.

Imports PyAV inside functions, so the module can be imported without it.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
AMPLITUDE = 0.5


def tone(k):
    """Frequency (Hz) of the sound under frame ``k`` (an int or an array of them)."""
    return 250.0 * (k + 1)


def tone_signal(frames: int, fps: float, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """The clip's sound, float64 ``[S]`` for ``frames`` frames at ``fps``."""
    t = np.arange(round(frames / fps * sample_rate)) / sample_rate
    k = np.floor(t * fps + 1e-9)
    return AMPLITUDE * np.sin(2 * np.pi * tone(k) * t)


def write_video_with_tone(path: Path, frames: int = 12, fps: float = 8.0, size=(96, 64),
                         video_codec: str = "ffv1", audio_codec: str = "pcm_s16le",
                         channels: int = 2, sample_rate: int = SAMPLE_RATE) -> Path:
    """A clip of ``frames`` grey frames with :func:`tone_signal` as its sound.

    Defaults are lossless (FFV1 + 16-bit PCM in ``.mkv``), so the samples read back are the written
    ones up to 16-bit rounding; ``mpeg4`` + ``aac`` in ``.mp4`` is the everyday kind.
    """
    import av

    width, height = size
    layout = "mono" if channels == 1 else "stereo"
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        video = out.add_stream(video_codec, rate=Fraction(fps).limit_denominator(1001))
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        audio = out.add_stream(audio_codec, rate=sample_rate, layout=layout)
        for k in range(frames):
            picture = np.full((height, width, 3), (20 * k + 10) % 256, np.uint8)
            for packet in video.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
                out.mux(packet)
        for packet in video.encode(None):
            out.mux(packet)
        sound = tone_signal(frames, fps, sample_rate)
        packed = np.repeat(sound[:, None], channels, axis=1).reshape(1, -1).astype(np.float32)
        frame = av.AudioFrame.from_ndarray(packed, format="flt", layout=layout)
        frame.sample_rate, frame.pts = sample_rate, 0
        for packet in audio.encode(frame):
            out.mux(packet)
        for packet in audio.encode(None):
            out.mux(packet)
    return path


def expected_window(frames: int, fps: float, start_frame: int, kept: int, every_nth: int,
                    sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """The sound a loader must return for ``kept`` frames from ``start_frame``, every ``every_nth``:
    source frames ``start_frame .. start_frame + kept * every_nth``, silence past the clip's end."""
    sound = tone_signal(frames, fps, sample_rate)
    first = round(start_frame / fps * sample_rate)
    length = round(kept * every_nth / fps * sample_rate)
    out = np.zeros(length)
    part = sound[first:first + length]
    out[:len(part)] = part
    return out


def dominant_frequency(samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float:
    """Frequency (Hz) of the strongest component of ``samples`` (Hann window, FFT peak)."""
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1.0 / sample_rate)[int(np.argmax(spectrum))])


def saved_audio(path: Path) -> tuple[float, np.ndarray, int]:
    """``(duration in s from the stream header, first channel's samples, sample rate)`` of the
    audio stream of a saved file, read with PyAV."""
    import av

    with av.open(str(path)) as container:
        assert container.streams.audio, f"{path.name} has no audio stream"
        stream = container.streams.audio[0]
        duration = float(stream.duration * stream.time_base)
        parts = [frame.to_ndarray()[0] for frame in container.decode(stream)]
        return duration, np.concatenate(parts), int(stream.sample_rate)


def has_audio(path: Path) -> bool:
    import av

    with av.open(str(path)) as container:
        return bool(container.streams.audio)


__all__ = ["SAMPLE_RATE", "dominant_frequency", "expected_window", "has_audio", "saved_audio",
           "tone", "tone_signal", "write_video_with_tone"]
