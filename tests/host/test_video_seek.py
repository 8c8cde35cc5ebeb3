"""A large ``skip_first_frames``: the loader seeks instead of decoding every skipped frame, and keeps
no sound from before the loaded span; frames and samples are those of a decode from the start.

Runs in ComfyUI's Python, which has PyAV (the seek reads frame timestamps with it; without PyAV the
loader decodes from the start, as the core tier's tests check). Every reference here decodes the
whole clip directly (OpenCV for frames, PyAV for sound) and slices it.
"""

from __future__ import annotations

import tracemalloc
from fractions import Fraction

import cv2
import numpy as np
import pytest
import torch
from video_writers import write_video
from sound_videos import SAMPLE_RATE

N, H, W, FPS = 96, 64, 96, 8


@pytest.fixture(scope="module")
def loading(comfy_nodes):
    return comfy_nodes.fatezero_core.video_loading


@pytest.fixture(scope="module")
def audio(comfy_nodes):
    return comfy_nodes.fatezero_core.video_audio


def distinct_frames(n: int = N) -> np.ndarray:
    """``[n, H, W, 3]`` uint8 frames no two alike: a seeded texture that drifts a pixel a frame."""
    rng = np.random.default_rng(0)
    field = rng.integers(0, 256, (H, W + n, 3), dtype=np.uint8)
    return np.stack([field[:, k:k + W] for k in range(n)])


def write_pyav(path, frames: np.ndarray, codec: str = "mpeg4", gop: int = 4, pts_ms=None):
    """Write ``frames`` with PyAV: a key frame every ``gop`` frames, at ``FPS`` or at the given
    presentation times in milliseconds (a variable frame rate)."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=Fraction(FPS))
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.codec_context.gop_size = gop
        if pts_ms is not None:
            stream.codec_context.time_base = stream.time_base = Fraction(1, 1000)
        for k, picture in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[k], Fraction(1, 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return str(path)


def decode_all(path) -> torch.Tensor:
    """Every frame, in order, decoded with OpenCV from the start: float RGB in 0..1."""
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(torch.from_numpy(frame[..., ::-1].copy()).float() / 255.0)
    cap.release()
    return torch.stack(frames)


class CountingCapture:
    """A real ``cv2.VideoCapture`` that counts the frames the loader asks it for."""

    calls = {"grab": 0, "read": 0}
    real = cv2.VideoCapture

    def __init__(self, *args):
        self._capture = self.real(*args)

    def grab(self):
        self.calls["grab"] += 1
        return self._capture.grab()

    def read(self, *args):
        self.calls["read"] += 1
        return self._capture.read(*args)

    def __getattr__(self, name):
        return getattr(self._capture, name)


@pytest.fixture
def counted(monkeypatch):
    CountingCapture.calls = {"grab": 0, "read": 0}
    monkeypatch.setattr(cv2, "VideoCapture", CountingCapture)
    return CountingCapture.calls


def load(loading, path, skip, nth=1, cap=5):
    frames, _ = loading.load_frames(path, skip_first_frames=skip, select_every_nth=nth, frame_load_cap=cap,
                                    size=8, resize_mode="none")
    return frames


CLIPS = {
    "mp4, key frame every 4": lambda d: write_pyav(d / "gop4.mp4", distinct_frames()),
    "mkv, key frame every 4": lambda d: write_pyav(d / "gop4.mkv", distinct_frames()),
    "mp4 written by OpenCV": lambda d: write_video(d / "opencv.mp4", torch.from_numpy(distinct_frames()) / 255.0, FPS),
    "avi, Motion-JPEG": lambda d: write_video(d / "mjpeg.avi", torch.from_numpy(distinct_frames()) / 255.0, FPS),
}


@pytest.mark.parametrize("clip", list(CLIPS))
@pytest.mark.parametrize("skip, nth", [(50, 2), (87, 1), (32, 3)])
def test_a_large_skip_seeks_to_the_frames_a_full_decode_gives(loading, tmp_path, counted, clip, skip, nth):
    path = CLIPS[clip](tmp_path)
    reference = decode_all(path)
    assert reference.shape[0] == N
    kept = reference[skip::nth][:5]

    counted.update(grab=0, read=0)
    frames = load(loading, path, skip, nth)

    assert torch.equal(frames, kept)
    # Only the kept frames and those between them are decoded by the loader (the seek decodes
    # from the key frame before it inside OpenCV): not the `skip` frames before the first.
    assert counted["read"] == len(kept)
    assert counted["grab"] == (len(kept) - 1) * (nth - 1)


def test_a_variable_frame_rate_clip_gives_the_frames_a_full_decode_gives(loading, tmp_path):
    """OpenCV seeks by ``index / fps``, which misses frames of a variable-rate clip: the loader
    checks where it landed and decodes from the start when it is not the asked frame."""
    times = np.cumsum([0] + [100 if k % 3 else 250 for k in range(1, N)]).tolist()
    path = write_pyav(tmp_path / "vfr.mp4", distinct_frames(), pts_ms=times)
    reference = decode_all(path)
    assert reference.shape[0] == N

    missed = []
    for skip in range(loading.SEEK_FROM_FRAME, N - 3):
        cap = cv2.VideoCapture(path, cv2.CAP_FFMPEG)
        cap.set(cv2.CAP_PROP_POS_FRAMES, skip)
        ok, raw = cap.read()
        cap.release()
        landed = torch.from_numpy(raw[..., ::-1].copy()).float() / 255.0
        if not torch.equal(landed, reference[skip]):
            missed.append(skip)
        assert torch.equal(load(loading, path, skip, cap=3), reference[skip:skip + 3]), skip
    assert missed, "OpenCV's own seek found every frame of this clip: it no longer tests the check"


# ------------------------------------------------------------------------------------- sound
def decode_sound(path) -> np.ndarray:
    """The whole first audio stream decoded with PyAV: float ``[C, S]`` (16-bit PCM / 32768)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        parts = [frame.to_ndarray().reshape(-1, len(frame.layout.channels)).T
                 for frame in container.decode(stream)]
    return np.concatenate(parts, axis=1).astype(np.float32) / 32768.0


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory):
    """Two minutes of seeded noise, 16 kHz stereo 16-bit PCM, under 16 lossless video frames."""
    import av

    path = tmp_path_factory.mktemp("long") / "long.mkv"
    sound = np.random.default_rng(1).uniform(-0.5, 0.5, (120 * SAMPLE_RATE, 2)).astype(np.float32)
    with av.open(str(path), "w") as out:
        video = out.add_stream("ffv1", rate=FPS)
        video.width, video.height, video.pix_fmt = W, H, "yuv420p"
        track = out.add_stream("pcm_s16le", rate=SAMPLE_RATE, layout="stereo")
        for picture in distinct_frames(16):
            for packet in video.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
                out.mux(packet)
        for packet in video.encode(None):
            out.mux(packet)
        for second in range(120):  # one-second frames, as a recorder would write them
            frame = av.AudioFrame.from_ndarray(
                sound[second * SAMPLE_RATE:(second + 1) * SAMPLE_RATE].reshape(1, -1), format="flt",
                layout="stereo")
            frame.sample_rate, frame.pts = SAMPLE_RATE, second * SAMPLE_RATE
            for packet in track.encode(frame):
                out.mux(packet)
        for packet in track.encode(None):
            out.mux(packet)
    return path


@pytest.mark.parametrize("start, duration", [(0.0, 1.0), (61.3, 2.0), (118.0, 4.0)])
def test_sound_late_in_a_long_clip_is_the_full_decode_sliced(audio, long_clip, start, duration):
    waveform, rate = audio.read_audio(long_clip, start, duration)
    assert rate == SAMPLE_RATE
    full = decode_sound(long_clip)
    first, count = round(start * rate), round(duration * rate)
    expected = np.zeros((full.shape[0], count), np.float32)
    part = full[:, first:first + count]
    expected[:, :part.shape[1]] = part  # silence past the clip's end
    assert waveform.shape == (1, full.shape[0], count)
    assert np.array_equal(waveform[0].numpy(), expected)


def test_sound_before_the_span_is_not_kept(audio, long_clip):
    """Reading 2 s from 110 s into the clip holds about those 2 s, not the 110 s before them
    (16 kHz stereo float: 14 MB)."""
    before = 110 * SAMPLE_RATE * 2 * 4
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        waveform, _ = audio.read_audio(long_clip, 110.0, 2.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert waveform.shape[-1] == 2 * SAMPLE_RATE
    assert peak < before / 20, f"{peak / 1e6:.1f} MB traced while reading a 2 s span"
