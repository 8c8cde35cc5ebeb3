"""Loading clips (``video_loading``) and cutting their sound (``video_audio``), on clips the tests write.

The synthetic clip: 12 frames of 96x64 (W x H). Frame k has a grey background of value 20*k+10
(its "brightness code", readable after lossy compression) and a pure red 16x16 square whose
top-left corner is at x = 24 + 2*k, y = 24.
"""

import os

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from video_writers import write_video
from fatezero_core import video_loading
from fatezero_core.video_audio import crop_audio, selection_audio_span
from fatezero_core.video_loading import load_frames, output_size, select_frames
from fatezero_core.errors import VideoError
from fatezero_core.media_types import is_image_file, is_video_file, natural_sort_key

N_FRAMES, H, W, FPS = 12, 64, 96, 8.0
SQ = 16


def make_frames(n=N_FRAMES, h=H, w=W):
    """uint8 RGB frames [n, h, w, 3] with brightness codes and a moving red square."""
    frames = np.empty((n, h, w, 3), np.uint8)
    for k in range(n):
        frames[k] = 20 * k + 10
        x0 = 24 + 2 * k
        frames[k, 24:24 + SQ, x0:x0 + SQ] = (255, 0, 0)
    return frames


def as_float(frames):
    return torch.from_numpy(frames).float() / 255.0


def codes(frames: torch.Tensor):
    """Brightness code of each frame: the median of the green channel is the background."""
    g = frames[..., 1].flatten(1).median(dim=1).values * 255.0
    return [round((v - 10.0) / 20.0) for v in g.tolist()]


def red_centroid(frame: torch.Tensor):
    """(x, y) centroid of the red square, weighted by how much redder than green each pixel is."""
    wgt = (frame[..., 0] - frame[..., 1]).clamp(min=0)
    ys, xs = torch.meshgrid(torch.arange(frame.shape[0]), torch.arange(frame.shape[1]), indexing="ij")
    total = wgt.sum()
    return float((wgt * xs).sum() / total), float((wgt * ys).sum() / total)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "clip.avi"
    write_video(path, as_float(make_frames()), FPS)
    return str(path)


# ------------------------------------------------------------------------------ file kinds


def test_extensions():
    assert is_video_file("a/b/Clip.MP4") and is_video_file("x.gif") and is_video_file("x.avi")
    assert not is_video_file("x.png") and not is_video_file("x")
    assert is_image_file("f.PNG") and is_image_file("f.jpeg") and not is_image_file("f.gif")


def test_natural_sort_key():
    names = ["frame10.png", "frame2.png", "Frame1.png", "frame02b.png", "frame100.png"]
    assert sorted(names, key=natural_sort_key) == [
        "Frame1.png", "frame2.png", "frame02b.png", "frame10.png", "frame100.png",
    ]


# ------------------------------------------------------------------------------ loading


def test_load_all_frames_unresized(clip):
    frames, fps = load_frames(clip, resize_mode="none")
    assert frames.dtype == torch.float32 and tuple(frames.shape) == (12, 64, 96, 3)
    assert 0.0 <= frames.min() and frames.max() <= 1.0
    assert fps == 8.0
    assert codes(frames) == list(range(12))
    # RGB order: the square is red, not blue.
    sq = frames[0, 26:38, 26:38]
    assert sq[..., 0].mean() > 0.9 and sq[..., 2].mean() < 0.1


@pytest.mark.parametrize(
    "cap, skip, nth, expected",
    [
        (0, 0, 1, list(range(12))),
        (3, 0, 1, [0, 1, 2]),
        (0, 5, 1, list(range(5, 12))),
        (0, 0, 4, [0, 4, 8]),
        (3, 2, 3, [2, 5, 8]),
        (0, 2, 3, [2, 5, 8, 11]),
        (100, 11, 5, [11]),
    ],
)
def test_frame_selection(clip, cap, skip, nth, expected):
    frames, fps = load_frames(
        clip, frame_load_cap=cap, skip_first_frames=skip, select_every_nth=nth, resize_mode="none"
    )
    assert codes(frames) == expected
    assert fps == pytest.approx(8.0 / nth)


def test_progress_reports_each_selected_frame(clip):
    calls = []
    load_frames(clip, frame_load_cap=3, select_every_nth=2, size=32, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    calls.clear()
    load_frames(clip, skip_first_frames=3, select_every_nth=2, size=32, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(i, 5) for i in range(1, 6)]  # frames 3, 5, 7, 9, 11


class CountingCapture:
    def __init__(self, cap):
        self.cap, self.reads, self.grabs = cap, 0, 0

    def read(self):
        self.reads += 1
        return self.cap.read()

    def grab(self):
        self.grabs += 1
        return self.cap.grab()

    def __getattr__(self, name):
        return getattr(self.cap, name)


def test_decoding_stops_at_the_cap_and_skips_without_retrieving(clip, monkeypatch):
    opened = []
    real_open = video_loading._open_capture

    def counting_open(path):
        opened.append(CountingCapture(real_open(path)))
        return opened[-1]

    monkeypatch.setattr(video_loading, "_open_capture", counting_open)
    frames, _ = load_frames(clip, frame_load_cap=2, skip_first_frames=4, select_every_nth=2, resize_mode="none")
    assert codes(frames) == [4, 6]
    assert len(opened) == 1
    assert opened[0].reads == 2  # frames 4 and 6 only
    assert opened[0].grabs == 5  # frames 0-3 and 5; nothing after frame 6 is touched


# ------------------------------------------------------------------------------ resizing


def test_crop_mode_matches_official_preprocessing(clip):
    src, _ = load_frames(clip, resize_mode="none")
    out, _ = load_frames(clip, size=32, resize_mode="crop")
    assert tuple(out.shape) == (12, 32, 32, 3)
    # Official: short side to 32 with antialiased bilinear (64x96 -> 32x48), centre crop 32x32.
    ref = F.interpolate(src.permute(0, 3, 1, 2), size=(32, 48), mode="bilinear", antialias=True)
    ref = ref[:, :, :, 8:40].permute(0, 2, 3, 1)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_crop_mode_square_position(clip):
    out, _ = load_frames(clip, size=32, resize_mode="crop")
    for k in range(12):
        # Source centroid (x0 + 7.5, 31.5) -> half scale: (c + 0.5) / 2 - 0.5 -> minus crop offset 8.
        cx, cy = red_centroid(out[k])
        assert cx == pytest.approx((24 + 2 * k) / 2 - 4.5, abs=0.5)
        assert cy == pytest.approx(15.5, abs=0.5)
    assert codes(out) == list(range(12))


def test_crop_mode_without_scaling_is_a_centre_crop(clip):
    src, _ = load_frames(clip, resize_mode="none")
    out, _ = load_frames(clip, size=64, resize_mode="crop")
    torch.testing.assert_close(out, src[:, :, 16:80])


def test_crop_mode_upscales(clip):
    out, _ = load_frames(clip, size=128, resize_mode="crop", frame_load_cap=1)
    assert tuple(out.shape) == (1, 128, 128, 3)
    cx, cy = red_centroid(out[0])
    assert cx == pytest.approx((24 + 7.5 + 0.5) * 2 - 0.5 - 32, abs=0.75)
    assert cy == pytest.approx((31.5 + 0.5) * 2 - 0.5, abs=0.75)


@pytest.mark.parametrize("size, shape", [(40, (40, 56)), (48, (48, 72)), (64, (64, 96)), (16, (16, 24))])
def test_keep_aspect_shapes_snap_to_8(clip, size, shape):
    out, _ = load_frames(clip, size=size, resize_mode="keep_aspect", frame_load_cap=2)
    assert tuple(out.shape) == (2, *shape, 3)
    assert output_size(64, 96, size=size, resize_mode="keep_aspect") == shape


def test_keep_aspect_portrait():
    assert output_size(100, 60, size=48, resize_mode="keep_aspect") == (80, 48)
    assert output_size(60, 60, size=48, resize_mode="keep_aspect") == (48, 48)


def test_none_mode_crops_to_multiples_of_8(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(50, 70, 3), dtype=np.uint8)
    path = tmp_path / "odd.png"
    cv2.imwrite(str(path), img[..., ::-1])
    out, _ = load_frames(path, resize_mode="none", size=512)
    assert tuple(out.shape) == (1, 48, 64, 3)
    torch.testing.assert_close(out[0], as_float(img[1:49, 3:67]))


# ------------------------------------------------------------------------------ other sources


def test_image_sequence_directory_natural_order(tmp_path):
    frames = make_frames()
    seq = tmp_path / "seq"
    seq.mkdir()
    for k in range(12):  # frame1.png .. frame12.png: a plain string sort would misorder these
        cv2.imwrite(str(seq / f"frame{k + 1}.png"), frames[k][..., ::-1])
    (seq / "notes.txt").write_text("not a frame")
    cv2.imwrite(str(seq / ".hidden.png"), frames[0][..., ::-1])
    (seq / "sub").mkdir()

    out, fps = load_frames(seq, resize_mode="none", sequence_fps=12.0)
    assert tuple(out.shape) == (12, 64, 96, 3)
    assert codes(out) == list(range(12))
    torch.testing.assert_close(out, as_float(frames))
    assert fps == 12.0

    out, fps = load_frames(seq, skip_first_frames=1, select_every_nth=5, resize_mode="none")
    assert codes(out) == [1, 6, 11] and fps == pytest.approx(8.0 / 5)


def test_image_sequence_with_mixed_sizes_is_refused_when_shapes_differ(tmp_path):
    seq = tmp_path / "mixed"
    seq.mkdir()
    cv2.imwrite(str(seq / "0.png"), np.zeros((64, 96, 3), np.uint8))
    cv2.imwrite(str(seq / "1.png"), np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(VideoError, match="same size"):
        load_frames(seq, resize_mode="none")
    out, _ = load_frames(seq, size=32, resize_mode="crop")  # crop mode evens them out
    assert tuple(out.shape) == (2, 32, 32, 3)


def test_single_png(tmp_path):
    img = make_frames()[3]
    path = tmp_path / "still.png"
    cv2.imwrite(str(path), img[..., ::-1])
    out, fps = load_frames(path, resize_mode="none", sequence_fps=5.0)
    assert tuple(out.shape) == (1, 64, 96, 3) and fps == 5.0
    torch.testing.assert_close(out[0], as_float(img))


def test_sixteen_bit_png_is_scaled_to_0_1(tmp_path):
    img = np.full((16, 16, 3), 32768, np.uint16)
    img[..., 0] = 65535
    path = tmp_path / "deep.png"
    cv2.imwrite(str(path), img)  # BGR: channel 0 is blue
    out, _ = load_frames(path, resize_mode="none")
    assert out[0, 0, 0, 2] == pytest.approx(1.0)
    assert out[0, 0, 0, 0] == pytest.approx(32768 / 65535)


def write_gif(path, frames):
    if not hasattr(cv2, "imwriteanimation"):
        pytest.skip("this OpenCV build cannot write GIFs (cv2.imwriteanimation needs OpenCV >= 4.11)")
    anim = cv2.Animation()
    anim.frames = [np.ascontiguousarray(f[..., ::-1]) for f in frames]
    anim.durations = [100] * len(frames)
    anim.loop_count = 0
    assert cv2.imwriteanimation(str(path), anim)


def gif_frames(n=6):
    """Clip frames with backgrounds 36*(k+1): OpenCV's GIF palette has green levels in steps of
    36, so the usual 20-step brightness codes would collapse. The red square moves as usual."""
    frames = make_frames(n=n)
    for k in range(n):
        frames[k][frames[k, ..., 1] > 0] = 36 * (k + 1)
    return frames


def gif_codes(frames: torch.Tensor):
    g = frames[..., 1].flatten(1).median(dim=1).values * 255.0
    return [round(v / 36.0) - 1 for v in g.tolist()]


def test_animated_gif(tmp_path):
    path = tmp_path / "anim.gif"
    write_gif(path, gif_frames())
    out, fps = load_frames(path, resize_mode="none")
    assert tuple(out.shape) == (6, 64, 96, 3)
    assert gif_codes(out) == list(range(6))
    for k in range(6):
        cx, cy = red_centroid(out[k])
        assert cx == pytest.approx(24 + 2 * k + 7.5, abs=0.5) and cy == pytest.approx(31.5, abs=0.5)
    assert fps == pytest.approx(10.0)


def test_gif_fallback_when_the_capture_cannot_open(tmp_path, monkeypatch):
    path = tmp_path / "anim.gif"
    write_gif(path, gif_frames())
    monkeypatch.setattr(video_loading, "_open_capture", lambda p: None)
    out, fps = load_frames(path, resize_mode="none", skip_first_frames=1, select_every_nth=2)
    assert gif_codes(out) == [1, 3, 5]
    assert fps == pytest.approx(10.0 / 2)


def test_mp4(tmp_path):
    path = write_video(tmp_path / "out" / "clip.mp4", as_float(make_frames()), 24.0)
    out, fps = load_frames(path, resize_mode="none")
    assert tuple(out.shape) == (12, 64, 96, 3)
    assert codes(out) == list(range(12)) and fps == 24.0


# ------------------------------------------------------------------------------ errors


def test_missing_file(tmp_path):
    with pytest.raises(VideoError, match="not found in") as exc:
        load_frames(tmp_path / "nope.mp4")
    assert "nope.mp4" in str(exc.value) and str(tmp_path) in str(exc.value)


def test_corrupt_file(tmp_path):
    path = tmp_path / "broken.mp4"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(VideoError, match="Could not read any frames from 'broken.mp4'"):
        load_frames(path)


def test_truncated_png(tmp_path):
    path = tmp_path / "cut.png"
    ok, buf = cv2.imencode(".png", make_frames()[0])
    path.write_bytes(buf.tobytes()[:40])
    with pytest.raises(VideoError, match="image is damaged"):
        load_frames(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    with pytest.raises(VideoError, match="empty"):
        load_frames(path)


def test_unsupported_extension_and_empty_folder(tmp_path):
    (tmp_path / "clip.txt").write_text("hello")
    with pytest.raises(VideoError, match="not a supported"):
        load_frames(tmp_path / "clip.txt")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(VideoError, match="holds no images"):
        load_frames(tmp_path / "nothing")


def test_a_large_skip_gives_the_frames_of_a_decode_from_the_start(tmp_path):
    """Past ``SEEK_FROM_FRAME`` the loader seeks where PyAV can check the landing, else decodes
    from the start: either way the frames of a full decode, sliced (reference: OpenCV's own loop)."""
    rng = np.random.default_rng(0)
    field = rng.integers(0, 256, (H, W + 64, 3), dtype=np.uint8)
    path = write_video(tmp_path / "long.mp4", as_float(np.stack([field[:, k:k + W] for k in range(64)])), FPS)
    cap = cv2.VideoCapture(path, cv2.CAP_FFMPEG)
    reference = []
    while (frame := cap.read()[1]) is not None:
        reference.append(torch.from_numpy(frame[..., ::-1].copy()).float() / 255.0)
    cap.release()
    skip = video_loading.SEEK_FROM_FRAME + 9
    frames, _ = load_frames(path, skip_first_frames=skip, select_every_nth=2, frame_load_cap=4, resize_mode="none")
    assert len(reference) == 64
    assert torch.equal(frames, torch.stack(reference[skip::2][:4]))


@pytest.mark.parametrize("skip", [12, 40])
def test_zero_frames_after_skip(clip, skip):
    with pytest.raises(VideoError) as exc:
        load_frames(clip, skip_first_frames=skip)
    msg = str(exc.value)
    assert "has 12 frames" in msg and f"skip_first_frames={skip}" in msg and "at most 11" in msg


def test_zero_frames_after_skip_single_image(tmp_path):
    path = tmp_path / "one.png"
    cv2.imwrite(str(path), make_frames()[0])
    with pytest.raises(VideoError, match="has 1 frame and skip_first_frames=1"):
        load_frames(path, skip_first_frames=1)


@pytest.mark.parametrize("size, hint", [(30, "use 24 or 32"), (4, "use 8"), (0, "use 8"), (-16, "use 8"), (513, "use 512 or 520")])
def test_size_must_be_multiple_of_8(clip, size, hint):
    with pytest.raises(VideoError, match="multiple of 8") as exc:
        load_frames(clip, size=size)
    assert hint in str(exc.value)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"select_every_nth": 0}, "select_every_nth must be at least 1"),
        ({"frame_load_cap": -1}, "frame_load_cap must be at least 0"),
        ({"skip_first_frames": -2}, "skip_first_frames must be at least 0"),
        ({"select_every_nth": 1.5}, "whole number"),
        ({"resize_mode": "stretch"}, "resize_mode must be one of"),
        ({"sequence_fps": 0}, "sequence_fps must be a positive number"),
    ],
)
def test_bad_settings(clip, kwargs, match):
    with pytest.raises(VideoError, match=match):
        load_frames(clip, **kwargs)


def test_none_mode_too_small(tmp_path):
    path = tmp_path / "tiny.png"
    cv2.imwrite(str(path), np.zeros((6, 20, 3), np.uint8))
    with pytest.raises(VideoError, match="too small"):
        load_frames(path, resize_mode="none")
    out, _ = load_frames(path, resize_mode="keep_aspect", size=8)
    assert tuple(out.shape) == (1, 8, 24, 3)


# ---- frames already decoded, and the sound of a selection ---------------------------------


def test_select_frames_matches_load_frames(tmp_path):
    path = write_video(tmp_path / "clip.avi", as_float(make_frames()), FPS)
    options = dict(frame_load_cap=3, skip_first_frames=2, select_every_nth=3, size=32, resize_mode="keep_aspect")
    loaded, loaded_fps = load_frames(path, **options)
    decoded, _ = load_frames(path, size=64, resize_mode="none")  # every frame, unresized
    selected, fps = select_frames(decoded, FPS, **options)
    assert codes(selected) == codes(loaded) == [2, 5, 8]
    assert selected.shape == loaded.shape == (3, 32, 48, 3)
    assert fps == loaded_fps == pytest.approx(FPS / 3)


def test_select_frames_errors():
    frames = torch.rand(4, 16, 16, 3)
    with pytest.raises(VideoError, match="No frames left to load.*has 4 frames"):
        select_frames(frames, 8.0, skip_first_frames=4, size=16)
    with pytest.raises(VideoError, match="multiple of 8"):
        select_frames(frames, 8.0, size=12)
    with pytest.raises(VideoError, match=r"shaped \[F, H, W, 3\]"):
        select_frames(frames[..., :2], 8.0, size=16)


@pytest.mark.parametrize("skip,nth,count,fps,span", [
    (0, 1, 8, 8.0, (0.0, 1.0)),        # 8 frames at 8 fps
    (4, 1, 2, 8.0, (0.5, 0.25)),       # frames 4-5 of an 8 fps clip
    (3, 2, 3, 5.0, (0.3, 0.6)),        # source 10 fps: frames 3, 5, 7 stand for 3..8
    (2, 3, 3, 30000 / 1001 / 3, (2 * 1001 / 30000, 9 * 1001 / 30000)),  # 29.97 fps, every 3rd
])
def test_selection_audio_span(skip, nth, count, fps, span):
    start, duration = selection_audio_span(count, fps, skip_first_frames=skip, select_every_nth=nth)
    assert (start, duration) == pytest.approx(span)


def test_crop_audio_cuts_and_pads_with_silence():
    rate = 10
    wave = torch.arange(1, 21, dtype=torch.float32).expand(1, 2, 20)  # 2 s of samples 1..20
    assert crop_audio(wave, rate, 0.5, 0.8)[0, 0].tolist() == [6, 7, 8, 9, 10, 11, 12, 13]
    assert crop_audio(wave, rate, 1.5, 1.0)[0, 1].tolist() == [16, 17, 18, 19, 20, 0, 0, 0, 0, 0]
    assert crop_audio(wave, rate, -0.2, 0.4)[0, 0].tolist() == [0, 0, 1, 2]
    assert crop_audio(wave, rate, 3.0, 0.3).tolist() == [[[0, 0, 0], [0, 0, 0]]]
    assert crop_audio(wave, rate, 0.0, 2.0).shape == (1, 2, 20)
