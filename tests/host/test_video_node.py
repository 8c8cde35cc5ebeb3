"""FateZero Load Video Frames, driven in-process with files the tests write into the input folder.

The clip: 12 frames of 96x64 (W x H) at 8 fps; frame k has a grey background of value 20*k+10,
which survives MJPEG compression well enough to tell frames apart.
"""

import builtins
import math
import os

import numpy as np
import pytest
import torch
from video_writers import write_image_sequence, write_video

N, H, W, FPS = 12, 64, 96, 8.0


def frames_array(n=N, h=H, w=W):
    data = np.empty((n, h, w, 3), np.uint8)
    for k in range(n):
        data[k] = 20 * k + 10
        data[k, 24:40, 24 + 2 * k:40 + 2 * k] = (255, 0, 0)
    return torch.from_numpy(data).float() / 255.0


def brightness_codes(frames):
    """Recover k from each frame's background (top-left corner)."""
    corner = frames[:, :8, :8, :].mean(dim=(1, 2, 3)) * 255.0
    return [round((v.item() - 10) / 20) for v in corner]


@pytest.fixture
def node(comfy_nodes):
    return comfy_nodes.nodes.video.FateZeroLoadVideoFrames


@pytest.fixture
def video_file(comfy_input_dir):
    write_video(comfy_input_dir / "clip.avi", frames_array(), FPS)
    return "clip.avi"


class Loaded:
    """A loader result: ``args`` are its first four outputs (frames, frame_count, fps, audio);
    ``segment`` the segment outputs (frame_positions, span_start, span_frames)."""

    def __init__(self, out):
        self.args, self.segment = tuple(out.args[:4]), tuple(out.args[4:])


def run(node, video, **overrides):
    params = dict(frame_load_cap=8, skip_first_frames=0, select_every_nth=1, size=64, resize_mode="crop")
    params.update(overrides)
    return Loaded(node.execute(video=video, **params))


def node_error(comfy_nodes):
    return comfy_nodes.nodes.user_errors.FateZeroNodeError


# ------------------------------------------------------------------------------------------------
# Schema
# ------------------------------------------------------------------------------------------------


def test_widgets(node):
    """Widget details an artist relies on (identity, sockets and tooltips: test_object_info)."""
    info = node.GET_NODE_INFO_V1()
    assert info["output_name"] == ["frames", "frame_count", "fps", "audio", "frame_positions", "span_start",
                                   "span_frames"]
    optional = info["input"]["optional"]
    assert optional["segments"][1]["default"] == 1 and optional["segment_index"][1]["default"] == 0
    assert optional["anchor_frames"][1]["default"] == ""
    assert info["input"]["optional"]["source_video"][0] == "VIDEO"
    video_input = info["input"]["required"]["video"]
    assert video_input[0] == "COMBO" and video_input[1]["video_upload"] is True
    required = info["input"]["required"]
    assert required["frame_load_cap"][1]["default"] == 8
    assert required["skip_first_frames"][1]["default"] == 0
    assert required["select_every_nth"][1]["default"] == 1
    assert required["size"][1]["default"] == 512 and required["size"][1]["step"] == 8
    assert required["resize_mode"][1]["options"] == ["crop", "keep_aspect", "none"]
    assert required["resize_mode"][1]["default"] == "crop"


def test_lists_videos_images_and_sequence_folders(node, comfy_input_dir, video_file):
    frames = frames_array(3)
    write_image_sequence(comfy_input_dir / "seq", frames)
    write_image_sequence(comfy_input_dir, frames[:1], prefix="still")
    (comfy_input_dir / "empty_folder").mkdir()
    (comfy_input_dir / "notes.txt").write_text("not a video")
    (comfy_input_dir / ".hidden.mp4").write_bytes(b"x")
    options = node.GET_NODE_INFO_V1()["input"]["required"]["video"][1]["options"]
    assert options == ["clip.avi", "still00000.png", "seq/"]


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------


def test_loads_frames_count_and_fps(node, video_file):
    out = run(node, video_file, frame_load_cap=4)
    frames, count, fps, audio = out.args
    assert audio is None  # the clip has no sound
    assert frames.shape == (4, 64, 64, 3) and frames.dtype == torch.float32
    assert 0.0 <= frames.min() and frames.max() <= 1.0
    assert count == 4 and isinstance(count, int)
    assert fps == pytest.approx(FPS) and isinstance(fps, float)
    assert brightness_codes(frames) == [0, 1, 2, 3]


def test_selection_and_fps(node, video_file):
    frames, count, fps, _ = run(node, video_file, frame_load_cap=0, skip_first_frames=3, select_every_nth=2).args
    assert brightness_codes(frames) == [3, 5, 7, 9, 11]
    assert count == 5 and fps == pytest.approx(FPS / 2)


def test_resize_modes(node, video_file):
    assert run(node, video_file, size=32, resize_mode="crop").args[0].shape[1:3] == (32, 32)
    assert run(node, video_file, size=32, resize_mode="keep_aspect").args[0].shape[1:3] == (32, 48)
    assert run(node, video_file, size=32, resize_mode="none").args[0].shape[1:3] == (64, 96)


def test_image_sequence_folder(node, comfy_input_dir):
    write_image_sequence(comfy_input_dir / "seq", frames_array(5))
    frames, count, fps, audio = node.execute(video="seq/", frame_load_cap=0, skip_first_frames=0,
                                             select_every_nth=1, size=64, resize_mode="crop",
                                             sequence_fps=12.0).args[:4]
    assert count == 5 and brightness_codes(frames) == [0, 1, 2, 3, 4]
    assert audio is None
    assert fps == pytest.approx(12.0)
    assert run(node, "seq", frame_load_cap=2).args[1] == 2  # without the trailing '/'


def test_progress_bar(node, video_file, monkeypatch):
    import comfy.utils

    calls = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK",
                        lambda value, total, preview, node_id=None: calls.append((value, total)))
    run(node, video_file, frame_load_cap=5)
    assert [v for v, _ in calls] == [1, 2, 3, 4, 5]
    assert calls[-1] == (5, 5)


def test_interrupt_during_decoding_propagates(node, video_file, monkeypatch):
    import comfy.model_management
    import comfy.utils

    def hook(value, total, preview, node_id=None):
        raise comfy.model_management.InterruptProcessingException()

    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", hook)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        run(node, video_file)


# ------------------------------------------------------------------------------------------------
# Caching
# ------------------------------------------------------------------------------------------------


def fingerprint(node, video, **overrides):
    params = dict(frame_load_cap=8, skip_first_frames=0, select_every_nth=1, size=64, resize_mode="crop")
    params.update(overrides)
    return node.fingerprint_inputs(video=video, **params)


def test_fingerprint_follows_content_and_params(node, video_file, comfy_input_dir):
    first = fingerprint(node, video_file)
    assert first == fingerprint(node, video_file)
    assert first != fingerprint(node, video_file, size=32)
    assert first != fingerprint(node, video_file, select_every_nth=2)
    assert first != fingerprint(node, video_file, resize_mode="keep_aspect")
    assert first == fingerprint(node, video_file, segments=1, segment_index=0, anchor_frames="")
    segment = fingerprint(node, video_file, segments=2, segment_index=1)
    assert len({first, segment, fingerprint(node, video_file, segments=2, segment_index=0),
                fingerprint(node, video_file, segments=2, segment_index=1, anchor_frames="mid")}) == 4
    write_video(comfy_input_dir / "clip.avi", frames_array().flip(0), FPS)
    assert fingerprint(node, video_file) != first


def test_fingerprint_of_missing_file_never_matches(node, comfy_input_dir):
    value = fingerprint(node, "gone.mp4")
    assert isinstance(value, float) and math.isnan(value)


@pytest.fixture
def input_files(comfy_nodes):
    return comfy_nodes.nodes.input_files


def test_frames_fingerprint_of_a_file(input_files, tmp_path):
    path = tmp_path / "clip.avi"
    write_video(path, frames_array(), FPS)
    digests = input_files.FileDigests()
    params = dict(frame_load_cap=4, skip_first_frames=0, select_every_nth=1, size=512, resize_mode="crop")
    fp = input_files.frames_fingerprint(path, digests, **params)
    assert len(fp) == 64 and fp == input_files.frames_fingerprint(path, digests, **params)
    assert fp == input_files.frames_fingerprint(path, input_files.FileDigests(), **params)
    assert fp != input_files.frames_fingerprint(path, digests, **{**params, "frame_load_cap": 5})
    assert fp != input_files.frames_fingerprint(path, digests, **{**params, "resize_mode": "keep_aspect"})

    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same length, one byte different
    path.write_bytes(bytes(data))
    assert input_files.frames_fingerprint(path, digests, **params) != fp


def test_frames_fingerprint_of_a_sequence(input_files, tmp_path):
    seq = tmp_path / "seq"
    write_image_sequence(seq, frames_array(3))
    digests = input_files.FileDigests()
    fp = input_files.frames_fingerprint(seq, digests, size=512)
    assert fp == input_files.frames_fingerprint(seq, digests, size=512)
    assert fp != input_files.frames_fingerprint(seq, digests, size=256)
    (seq / "readme.txt").write_text("ignored")
    assert fp == input_files.frames_fingerprint(seq, digests, size=512)

    write_image_sequence(seq, torch.zeros(1, H, W, 3), start=1)
    fp2 = input_files.frames_fingerprint(seq, digests, size=512)
    assert fp2 != fp
    write_image_sequence(seq, torch.zeros(1, H, W, 3), start=3)  # a new last frame
    assert input_files.frames_fingerprint(seq, digests, size=512) not in (fp, fp2)


def test_a_long_sequence_is_fingerprinted_again_without_reading_its_frames(input_files, tmp_path, monkeypatch):
    seq = tmp_path / "seq"
    seq.mkdir()
    for k in range(1000):  # never decoded by the fingerprint, so any bytes do
        (seq / f"frame_{k:04d}.png").write_bytes(b"frame %04d" % k)
    opened = []
    real_open = builtins.open

    def spy(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.path.dirname(os.path.abspath(file)) == str(seq):
            opened.append(os.path.basename(file))
        return real_open(file, *args, **kwargs)

    digests = input_files.FileDigests()
    params = dict(frame_load_cap=8, skip_first_frames=0, select_every_nth=1, size=512)
    first = input_files.frames_fingerprint(seq, digests, **params)
    monkeypatch.setattr(builtins, "open", spy)
    assert input_files.frames_fingerprint(seq, digests, **{**params, "size": 256}) != first
    assert input_files.frames_fingerprint(seq, digests, **params) == first
    assert opened == []

    frame = seq / "frame_0003.png"  # the 4th of the 8 loaded frames
    before = os.stat(frame)
    frame.write_bytes(b"FRAME 0003")  # same size, and the mtime set back: only the content differs
    os.utime(frame, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert input_files.frames_fingerprint(seq, digests, **params) != first


def test_frames_fingerprint_of_a_missing_file(comfy_nodes, input_files, tmp_path):
    with pytest.raises(comfy_nodes.fatezero_core.errors.VideoError, match="not found in"):
        input_files.frames_fingerprint(tmp_path / "gone.mp4", input_files.FileDigests())


def test_file_digests_read_a_file_once_until_it_changes_and_stay_bounded(input_files, tmp_path, monkeypatch):
    reads = []
    read = input_files.FileDigests._read
    monkeypatch.setattr(input_files.FileDigests, "_read",
                        staticmethod(lambda path, *key: reads.append(os.path.basename(path)) or read(path, *key)))
    digests = input_files.FileDigests(max_files=2)
    files = {}
    for name in ("a", "b", "c"):
        files[name] = tmp_path / name
        files[name].write_bytes(name.encode() * 1000)
    first = digests.sha256(files["a"])
    assert digests.sha256(files["a"]) == first and reads == ["a"]
    files["a"].write_bytes(b"rewritten")
    assert digests.sha256(files["a"]) != first and reads == ["a", "a"]
    digests.sha256(files["b"])
    digests.sha256(files["c"])  # holds two: "a" is dropped
    digests.sha256(files["c"])
    digests.sha256(files["a"])
    assert reads == ["a", "a", "b", "c", "a"]


# ------------------------------------------------------------------------------------------------
# Validation and errors
# ------------------------------------------------------------------------------------------------


def test_safe_input_path(comfy_nodes, input_files, tmp_path):
    base = tmp_path / "input"
    (base / "videos").mkdir(parents=True)
    (base / "videos" / "a.mp4").write_bytes(b"x")
    outside = tmp_path / "secret.mp4"
    outside.write_bytes(b"y")
    real_base = os.path.realpath(base)
    safe_input_path = input_files.safe_input_path

    assert safe_input_path(base, "videos/a.mp4") == os.path.join(real_base, "videos", "a.mp4")
    assert safe_input_path(base, "videos/../videos/a.mp4") == os.path.join(real_base, "videos", "a.mp4")
    assert safe_input_path(base, "not_there_yet.mp4") == os.path.join(real_base, "not_there_yet.mp4")

    for bad in ["../secret.mp4", "videos/../../secret.mp4", str(outside), "/etc/passwd", ""]:
        with pytest.raises(node_error(comfy_nodes)) as exc:
            safe_input_path(base, bad)
        if bad:
            assert "must be inside the input folder" in str(exc.value)

    # Links in the folder are followed wherever they point; names are checked, as ComfyUI does.
    (base / "link.mp4").symlink_to(outside)
    (base / "linkdir").symlink_to(tmp_path, target_is_directory=True)
    assert safe_input_path(base, "link.mp4") == os.path.realpath(outside)
    assert safe_input_path(base, "linkdir/secret.mp4") == os.path.realpath(outside)
    assert safe_input_path(base, "linkdir/../videos/a.mp4") == os.path.join(real_base, "videos", "a.mp4")
    for bad in ["linkdir/../../secret.mp4", "../input/../secret.mp4"]:
        with pytest.raises(node_error(comfy_nodes), match="must be inside the input folder"):
            safe_input_path(base, bad)


def test_validate_inputs(node, video_file, comfy_input_dir):
    assert node.validate_inputs(video=video_file) is True
    missing = node.validate_inputs(video="missing.mp4")
    assert isinstance(missing, str) and "missing.mp4" in missing and "was not found" in missing
    assert str(comfy_input_dir) in missing
    outside = node.validate_inputs(video="../outside.mp4")
    assert isinstance(outside, str) and "must be inside the input folder" in outside
    absolute = node.validate_inputs(video=os.path.abspath(os.sep + "etc" + os.sep + "passwd"))
    assert isinstance(absolute, str) and "must be inside the input folder" in absolute


def test_links_in_the_input_folder_are_listed_and_load_like_files(comfy_nodes, node, comfy_input_dir, tmp_path):
    """Footage kept elsewhere and linked into input/ loads, as it does in ComfyUI's Load Image."""
    footage = tmp_path / "footage"
    write_video(footage / "long take.avi", frames_array(), FPS)
    write_image_sequence(footage / "frames", frames_array(4))
    (comfy_input_dir / "take.avi").symlink_to(footage / "long take.avi")
    (comfy_input_dir / "shot").symlink_to(footage / "frames", target_is_directory=True)
    (comfy_input_dir / "footage").symlink_to(footage, target_is_directory=True)
    (comfy_input_dir / "dangling.mp4").symlink_to(tmp_path / "deleted.mp4")

    assert comfy_nodes.nodes.video.list_input_sources() == ["take.avi", "shot/"]  # footage/ holds no frames
    for video in ("take.avi", "shot/", "footage/long take.avi", "footage/frames/"):
        assert node.validate_inputs(video=video) is True, video
    assert brightness_codes(run(node, "take.avi", frame_load_cap=3).args[0]) == [0, 1, 2]
    assert brightness_codes(run(node, "shot/", frame_load_cap=0).args[0]) == [0, 1, 2, 3]
    assert brightness_codes(run(node, "footage/long take.avi", skip_first_frames=5, frame_load_cap=2).args[0]) == [5, 6]
    assert "must be inside the input folder" in node.validate_inputs(video="footage/../../footage/frames/")


def expect_node_error(comfy_nodes, node, video, match, **overrides):
    with pytest.raises(node_error(comfy_nodes), match=match) as info:
        run(node, video, **overrides)
    error = info.value
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)
    return info.value


def test_missing_file_error(comfy_nodes, node, comfy_input_dir):
    expect_node_error(comfy_nodes, node, "nothing_here.mp4", "was not found in ComfyUI's input folder")


def test_path_outside_input_error(comfy_nodes, node, comfy_input_dir):
    expect_node_error(comfy_nodes, node, "../../etc/passwd", "must be inside the input folder")


def test_zero_frames_selected_error(comfy_nodes, node, video_file):
    err = expect_node_error(comfy_nodes, node, video_file, "No frames left to load", skip_first_frames=50)
    assert "skip_first_frames" in str(err)


def test_empty_file_error(comfy_nodes, node, comfy_input_dir):
    (comfy_input_dir / "empty.mp4").write_bytes(b"")
    expect_node_error(comfy_nodes, node, "empty.mp4", "is empty")


def test_unreadable_file_error(comfy_nodes, node, comfy_input_dir):
    (comfy_input_dir / "broken.mp4").write_bytes(b"this is not a video" * 100)
    expect_node_error(comfy_nodes, node, "broken.mp4", "Could not read any frames")


def test_folder_without_images_error(comfy_nodes, node, comfy_input_dir):
    (comfy_input_dir / "nothing").mkdir()
    expect_node_error(comfy_nodes, node, "nothing/", "holds no images")


def test_size_not_multiple_of_8_error(comfy_nodes, node, video_file):
    expect_node_error(comfy_nodes, node, video_file, "multiple of 8", size=60)


def test_empty_choice_error(comfy_nodes, node, comfy_input_dir):
    expect_node_error(comfy_nodes, node, "", "No video was chosen")


# ------------------------------------------------------------------------------------------------
# Sound
# ------------------------------------------------------------------------------------------------

SELECTIONS = [  # (skip_first_frames, select_every_nth, frame_load_cap)
    (0, 1, 0),
    (3, 1, 4),
    (2, 3, 3),
    (5, 2, 0),  # the last kept frame's span runs past the clip's end: silence there
]


@pytest.fixture
def toned_video(comfy_input_dir):
    import sound_videos

    sound_videos.write_video_with_tone(comfy_input_dir / "toned.mkv", frames=N, fps=FPS)
    return "toned.mkv"


def kept_count(skip, nth, cap, total=N):
    count = len(range(skip, total, nth))
    return min(count, cap) if cap else count


@pytest.mark.parametrize("skip,nth,cap", SELECTIONS)
def test_audio_is_the_sound_of_exactly_the_selected_frames(node, toned_video, skip, nth, cap):
    import sound_videos

    frames, count, fps, audio = run(node, toned_video, skip_first_frames=skip, select_every_nth=nth,
                                    frame_load_cap=cap).args
    assert count == kept_count(skip, nth, cap) and fps == pytest.approx(FPS / nth)
    assert brightness_codes(frames) == list(range(skip, skip + count * nth, nth))
    assert set(audio) == {"waveform", "sample_rate"} and audio["sample_rate"] == sound_videos.SAMPLE_RATE
    waveform = audio["waveform"]
    expected = sound_videos.expected_window(N, FPS, skip, count, nth)
    assert waveform.dtype == torch.float32 and waveform.shape == (1, 2, len(expected))
    assert waveform.shape[-1] == round(count / fps * sound_videos.SAMPLE_RATE)  # frames / output fps
    assert torch.equal(waveform[0, 0], waveform[0, 1])
    assert np.abs(waveform[0, 0].numpy() - expected).max() < 1e-4  # 16-bit PCM rounding


def test_audio_of_an_aac_mp4_keeps_each_frames_tone(node, comfy_input_dir):
    import sound_videos

    sound_videos.write_video_with_tone(comfy_input_dir / "toned.mp4", frames=N, fps=FPS,
                                     video_codec="mpeg4", audio_codec="aac", channels=1)
    skip, nth = 4, 2
    *_, audio = run(node, "toned.mp4", skip_first_frames=skip, select_every_nth=nth, frame_load_cap=3).args
    waveform = audio["waveform"][0, 0].numpy()
    per_frame = round(sound_videos.SAMPLE_RATE / FPS)
    assert audio["waveform"].shape == (1, 1, 6 * per_frame)  # 3 frames at 4 fps = source frames 4..9
    for j in range(6):  # the middle of each source frame's span
        part = waveform[j * per_frame + per_frame // 8:(j + 1) * per_frame - per_frame // 8]
        assert sound_videos.dominant_frequency(part) == pytest.approx(sound_videos.tone(skip + j), abs=20)


def test_sound_survives_create_video_and_save_video(node, toned_video, tmp_path):
    """Loader -> core Create Video -> the file Save Video writes (VideoFromComponents.save_to)."""
    from comfy_extras.nodes_video import CreateVideo
    import sound_videos

    frames, count, fps, audio = run(node, toned_video, skip_first_frames=2, select_every_nth=3, frame_load_cap=3).args
    (video,) = CreateVideo.execute(images=frames, fps=fps, audio=audio).args
    video.save_to(str(tmp_path / "saved.mp4"))
    duration, samples, rate = sound_videos.saved_audio(tmp_path / "saved.mp4")
    assert rate == sound_videos.SAMPLE_RATE
    assert duration == pytest.approx(count / fps, abs=1e-3)  # 3 frames at 8/3 fps = 1.125 s
    per_frame = round(rate / FPS)
    middle = samples[per_frame // 8:per_frame - per_frame // 8]
    assert sound_videos.dominant_frequency(middle) == pytest.approx(sound_videos.tone(2), abs=20)

    (silent,) = CreateVideo.execute(images=frames, fps=fps, audio=None).args
    silent.save_to(str(tmp_path / "silent.mp4"))
    assert not sound_videos.has_audio(tmp_path / "silent.mp4")


# ------------------------------------------------------------------------------------------------
# Core VIDEO input
# ------------------------------------------------------------------------------------------------


def test_core_load_video_feeds_the_loader(node, toned_video):
    from comfy_extras.nodes_video import LoadVideo

    (video,) = LoadVideo.execute(file=toned_video).args
    options = dict(skip_first_frames=3, select_every_nth=2, frame_load_cap=4)
    from_video = run(node, "no_such_file.mp4", source_video=video, **options).args
    from_file = run(node, toned_video, **options).args
    assert torch.equal(from_video[0], from_file[0]) and from_video[1:3] == from_file[1:3]
    assert brightness_codes(from_video[0]) == [3, 5, 7, 9]
    assert torch.equal(from_video[3]["waveform"], from_file[3]["waveform"])


def test_a_video_in_memory_is_selected_resized_and_cut(node, comfy_input_dir):
    """A VIDEO that is not a file (core Create Video's output) goes through get_components()."""
    from comfy_extras.nodes_video import CreateVideo
    import sound_videos

    images = frames_array()
    rate = sound_videos.SAMPLE_RATE
    waveform = torch.from_numpy(sound_videos.tone_signal(N, FPS)).float().expand(1, 2, -1).clone()
    (video,) = CreateVideo.execute(images=images, fps=FPS, audio={"waveform": waveform, "sample_rate": rate}).args
    frames, count, fps, audio = run(node, "", source_video=video, skip_first_frames=1, select_every_nth=2,
                                    frame_load_cap=3, size=32).args
    assert count == 3 and fps == pytest.approx(FPS / 2) and frames.shape == (3, 32, 32, 3)
    assert brightness_codes(frames) == [1, 3, 5]
    expected = sound_videos.expected_window(N, FPS, 1, 3, 2)
    assert audio["sample_rate"] == rate and audio["waveform"].shape == (1, 2, len(expected))
    assert np.abs(audio["waveform"][0, 1].numpy() - expected).max() < 1e-6

    (mute,) = CreateVideo.execute(images=images, fps=FPS, audio=None).args
    assert run(node, "", source_video=mute, frame_load_cap=2).args[3] is None


def test_validation_skips_the_file_when_a_video_is_connected(node, comfy_input_dir):
    # ComfyUI validates with links unresolved: a connected source_video arrives as None
    assert node.validate_inputs(video="missing.mp4", source_video=None) is True
    assert "was not found" in node.validate_inputs(video="missing.mp4")


# ------------------------------------------------------------------------------------------------
# Segments of a long clip
# ------------------------------------------------------------------------------------------------


def test_defaults_load_the_whole_clip_as_before(node, video_file):
    loaded = run(node, video_file, frame_load_cap=0)
    assert loaded.segment == ("", 0, N)
    assert brightness_codes(loaded.args[0]) == list(range(N))


@pytest.mark.parametrize("index, rule, codes, positions, span_start", [
    (0, "mid", [0, 1, 2, 3, 4, 5], "clip 12 frames 0-5", 0),  # the middle frame is in the segment
    (1, "mid", [5, 6, 7, 8, 9, 10, 11], "clip 12 frames 5-11", 1),
    (1, "first, mid, last", [0, 5, 6, 7, 8, 9, 10, 11], "clip 12 frames 0, 5-11", 2),
    (0, "anchors/4", [0, 1, 2, 3, 4, 5, 8, 11], "clip 12 frames 0-5, 8, 11", 0),
    (1, "", [6, 7, 8, 9, 10, 11], "clip 12 frames 6-11", 0),
])
def test_a_segment_is_loaded_with_the_clips_anchor_frames(node, toned_video, index, rule, codes, positions,
                                                          span_start):
    """Segment ``index`` of two, with the shared key frames of ``rule`` on the whole clip, in clip
    order; the sound is that of the segment's own six frames."""
    import sound_videos

    loaded = run(node, toned_video, frame_load_cap=0, segments=2, segment_index=index, anchor_frames=rule)
    frames, count, fps, audio = loaded.args
    assert brightness_codes(frames) == codes and count == len(codes)
    assert loaded.segment == (positions, span_start, 6)
    expected = sound_videos.expected_window(N, FPS, 6 * index, 6, 1)
    assert audio["waveform"].shape[-1] == len(expected)
    assert np.abs(audio["waveform"][0, 0].numpy() - expected).max() < 1e-4


def test_segments_follow_the_selection(node, toned_video):
    """The whole clip is the selected frames: every second frame from frame 1 here."""
    loaded = run(node, toned_video, frame_load_cap=0, skip_first_frames=1, select_every_nth=2, segments=3,
                 segment_index=2, anchor_frames="mid")
    assert brightness_codes(loaded.args[0]) == [5, 9, 11]  # selected 1,3,..,11: mid is the 3rd (5)
    assert loaded.segment == ("clip 6 frames 2, 4-5", 1, 2)


def test_a_segment_that_does_not_exist_is_refused(node, video_file, comfy_nodes):
    with pytest.raises(node_error(comfy_nodes), match="segment_index 2 is not one of the 2 segments"):
        run(node, video_file, segments=2, segment_index=2)
    with pytest.raises(node_error(comfy_nodes), match="Use at most 8 segments"):
        run(node, video_file, segments=9)
