"""FateZero Load Video Frames: a clip from ComfyUI's input folder as an IMAGE batch and its sound.

Thin adapter over ``fatezero_core.video_loading`` and ``video_audio``: the node lists and resolves
files in the input folder (``input_files``; or takes a core VIDEO), reports decoding progress to
ComfyUI, and lets the core do the reading, resizing and audio cutting. AUDIO follows ComfyUI's
convention (``comfy_extras`` ``nodes_audio``): ``{"waveform": [1, C, S] float, "sample_rate":
int}``, or None for no sound, which core Create Video takes as "no audio track". With
``segments``/``anchor_frames`` it loads one segment of the clip with the clip's shared key frames
(``fatezero_core.segments.plan_segment``) and says where they sit (``frame_positions``, for FateZero
DDIM Invert) and which of them are the segment's own (``span_start``/``span_frames``).
"""

from __future__ import annotations

import os

import comfy.utils
import folder_paths
from comfy_api.latest import InputImpl, io

from ..fatezero_core.video_audio import crop_audio, read_audio, selection_audio_span
from ..fatezero_core.video_loading import RESIZE_MODES, load_frames, select_frames
from ..fatezero_core.errors import FateZeroError
from ..fatezero_core.keyframes import format_frame_positions
from ..fatezero_core.segments import plan_segment
from ..fatezero_core.media_types import is_image_file, is_video_file, natural_sort_key
from .input_files import FileDigests, frames_fingerprint, safe_input_path
from .user_errors import FateZeroNodeError, reports_user_errors

MAX_FRAMES = 100_000
MAX_SIZE = 8192
FILE_DIGESTS = FileDigests(max_files=256)
"""Digests of the files the loader fingerprinted (ComfyUI asks on every queued prompt)."""


def _has_images(directory: str) -> bool:
    """True when ``directory`` directly holds at least one still image (stops at the first)."""
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                if not entry.name.startswith(".") and is_image_file(entry.name) and entry.is_file():
                    return True
    except OSError:
        return False
    return False


def list_input_sources() -> list[str]:
    """Video files, GIFs and images in the input folder, then sub-folders holding image sequences.

    Folders are listed with a trailing ``/`` so they read as image sequences in the dropdown.
    """
    base = folder_paths.get_input_directory()
    files: list[str] = []
    folders: list[str] = []
    try:
        entries = list(os.scandir(base))
    except OSError:
        return []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            if entry.is_file():
                if is_video_file(entry.name) or is_image_file(entry.name):
                    files.append(entry.name)
            elif entry.is_dir() and _has_images(entry.path):
                folders.append(entry.name + "/")
        except OSError:
            continue
    return sorted(files, key=natural_sort_key) + sorted(folders, key=natural_sort_key)


def resolve_source(video: str) -> str:
    """Real path of a dropdown value, refused when it leaves the input folder.

    Accepts ComfyUI's annotated names (``"clip.mp4 [output]"``); anything else is relative to the
    input folder.
    """
    if not isinstance(video, str) or not video.strip():
        raise FateZeroNodeError(
            "No video was chosen: upload a video, GIF or image, or put an image-sequence folder in "
            f"ComfyUI's input folder '{folder_paths.get_input_directory()}' and pick it."
        )
    name, base = folder_paths.annotated_filepath(video.strip())
    if base is None:
        base = folder_paths.get_input_directory()
    return safe_input_path(base, name)


def _missing_message(video: str, path: str) -> str:
    folder = folder_paths.get_input_directory()
    return (
        f"'{video}' was not found in ComfyUI's input folder '{folder}' (looked for '{path}'). "
        "Upload the video again, or copy it into that folder and refresh the page."
    )


def _audio(waveform_and_rate) -> dict | None:
    if waveform_and_rate is None:
        return None
    waveform, sample_rate = waveform_and_rate
    return {"waveform": waveform, "sample_rate": int(sample_rate)}


def _video_file(video) -> str | None:
    """The file behind a core VIDEO (Load Video's ``VideoFromFile``), or None for one in memory.

    Only a ``VideoFromFile`` is asked: the default ``get_stream_source`` of other VIDEOs encodes
    the whole clip to memory first.
    """
    if not isinstance(video, InputImpl.VideoFromFile):
        return None
    path = video.get_stream_source()
    return path if isinstance(path, str) and os.path.isfile(path) else None


# The whole-number settings, in schema order: (name, default, min, max, step, tooltip).
_WHOLE_NUMBER_INPUTS = (
    ("frame_load_cap", 8, 0, MAX_FRAMES, 1,
     "Most frames to load after skipping and striding; 0 loads every frame. "
     "FateZero's official clips are 8 frames; memory and time grow with this."),
    ("skip_first_frames", 0, 0, 10 * MAX_FRAMES, 1,
     "Frames to drop from the start of the clip before loading."),
    ("select_every_nth", 1, 1, 1000, 1,
     "Keep every n-th frame after skipping (1 keeps all). The fps output is "
     "divided by n so the clip keeps its duration."),
    ("size", 512, 8, MAX_SIZE, 8,
     "Target size in pixels, a multiple of 8. 'crop': output is size x size; "
     "'keep_aspect': the short side becomes size. SD1.x works best at 512."),
)

# validate_inputs' default for source_video: ComfyUI validates with links unresolved, passing a
# connected input as None and leaving an unconnected one out, so this default means "not connected".
_NOT_CONNECTED = object()


class FateZeroLoadVideoFrames(io.ComfyNode):
    """Load a video, GIF, image or image-sequence folder as frames for FateZero."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FateZero_LoadVideoFrames",
            display_name="FateZero Load Video Frames",
            category="FateZero/video",
            description=(
                "Loads a clip from ComfyUI's input folder (video file, GIF, single image, or a "
                "sub-folder of images read as a sequence in natural order) as an IMAGE batch, one "
                "frame per batch element. The default 'crop' resize is FateZero's own "
                "preprocessing: short side to `size`, then a centre crop to size x size. The "
                "official FateZero clips are 8 frames at 512 px."
            ),
            inputs=[
                io.Combo.Input(
                    "video",
                    options=list_input_sources(),
                    upload=io.UploadType.video,
                    tooltip=(
                        "A file in ComfyUI's input folder: video (mp4, mov, webm, mkv, avi, ...), "
                        "GIF or image, or a sub-folder (shown with a trailing '/') whose images are "
                        "read as frames in natural order. Use the upload button to add a video."
                    ),
                ),
                *(io.Int.Input(name, default=default, min=low, max=high, step=step, tooltip=tooltip)
                  for name, default, low, high, step, tooltip in _WHOLE_NUMBER_INPUTS),
                io.Combo.Input(
                    "resize_mode", options=list(RESIZE_MODES), default="crop",
                    tooltip=(
                        "crop: short side to size, then centre crop to a square (official FateZero "
                        "preprocessing). keep_aspect: short side to size, long side scaled and "
                        "rounded down to a multiple of 8. none: original size, rounded down to "
                        "multiples of 8 by cropping."
                    ),
                ),
                io.Float.Input(
                    "sequence_fps", default=8.0, min=0.01, max=1000.0, step=0.01, optional=True,
                    tooltip=(
                        "Frame rate reported for image sequences and single images (video files "
                        "report their own rate)."
                    ),
                ),
                io.Video.Input(
                    "source_video", optional=True,
                    tooltip=(
                        "Optional VIDEO, e.g. from core Load Video. When connected it is read "
                        "instead of the file picked in 'video', with the same frame selection, "
                        "resizing and sound."
                    ),
                ),
                # Sockets, not widgets: a saved workflow keeps widget values by position with the
                # upload button's last, so a new widget would take an older save's "image" value.
                # Connect a primitive (or the runner sets them); unconnected, the whole clip loads.
                io.Int.Input(
                    "segments", default=1, min=1, max=MAX_FRAMES, optional=True, force_input=True,
                    tooltip=(
                        "Cut the selected frames (the whole clip) into this many consecutive "
                        "segments and load only segment 'segment_index' (with the anchor_frames). "
                        "1 loads the whole clip."
                    ),
                ),
                io.Int.Input(
                    "segment_index", default=0, min=0, max=MAX_FRAMES, optional=True, force_input=True,
                    tooltip="Which segment to load, 0 for the first (with segments > 1).",
                ),
                io.String.Input(
                    "anchor_frames", default="", optional=True, force_input=True,
                    tooltip=(
                        "A key-frame rule (the one DDIM Invert uses: mid, 'first, mid, last', "
                        "anchors/16): its shared key frames of the whole clip are loaded with the "
                        "segment, in clip order, so every segment attends to the same frames. "
                        "Connect frame_positions to DDIM Invert. Empty: no extra frames."
                    ),
                ),
            ],
            outputs=[
                io.Image.Output(display_name="frames", tooltip="The frames, [F, H, W, 3] in 0..1."),
                io.Int.Output(display_name="frame_count", tooltip="Number of frames loaded (F)."),
                io.Float.Output(
                    display_name="fps",
                    tooltip="Playback rate of the loaded frames (source rate / select_every_nth).",
                ),
                io.Audio.Output(
                    display_name="audio",
                    tooltip=(
                        "The clip's sound under exactly the loaded frames (skip, every-nth and cap "
                        "applied; frame_count / fps seconds). No audio for silent clips, GIFs and "
                        "images. Connect it to Create Video's audio."
                    ),
                ),
                io.String.Output(
                    display_name="frame_positions",
                    tooltip=(
                        "Where the loaded frames sit in the whole clip ('clip 32 frames 0, 15-31'); "
                        "empty when they are the whole clip. Connect to DDIM Invert's "
                        "frame_positions so its key rule names the whole clip's frames."
                    ),
                ),
                io.Int.Output(
                    display_name="span_start",
                    tooltip="Index of the segment's first frame in 'frames' (anchor frames before it come first).",
                ),
                io.Int.Output(
                    display_name="span_frames",
                    tooltip=(
                        "Frames of the segment itself; with span_start, e.g. Image From Batch "
                        "(batch_index, length) drops the anchor frames from a result."
                    ),
                ),
            ],
        )

    @classmethod
    def validate_inputs(cls, video, source_video=_NOT_CONNECTED) -> bool | str:
        if video is None or source_video is not _NOT_CONNECTED:  # a link: checked when it runs / not read
            return True
        try:
            path = resolve_source(video)
        except FateZeroNodeError as exc:
            return str(exc)
        if not os.path.exists(path):
            return _missing_message(video, path)
        return True

    @classmethod
    def fingerprint_inputs(cls, video, frame_load_cap, skip_first_frames, select_every_nth, size,
                           resize_mode, sequence_fps=8.0, source_video=None, segments=1, segment_index=0,
                           anchor_frames=""):
        # A connected source_video never reaches here (ComfyUI passes constants only); its node's
        # own cache key covers it.
        # The segment settings join the key only when set, so the whole clip keeps its old key.
        segment = ({} if (segments, segment_index, anchor_frames) == (1, 0, "") else
                   dict(segments=segments, segment_index=segment_index, anchor_frames=anchor_frames))
        try:
            path = resolve_source(video)
            return frames_fingerprint(
                path, FILE_DIGESTS, frame_load_cap=frame_load_cap, skip_first_frames=skip_first_frames,
                select_every_nth=select_every_nth, size=size, resize_mode=resize_mode,
                sequence_fps=sequence_fps, **segment,
            )
        except (FateZeroError, FateZeroNodeError, OSError):
            # A new NaN each time, as ComfyUI's execution.py does: one shared object (math.nan) would
            # make two cache keys equal through Python's identity check, serving a stale result.
            return float("nan")

    @classmethod
    @reports_user_errors
    def execute(cls, video, frame_load_cap, skip_first_frames, select_every_nth, size,
                resize_mode, sequence_fps=8.0, source_video=None, segments=1, segment_index=0,
                anchor_frames="") -> io.NodeOutput:
        selection = dict(frame_load_cap=frame_load_cap, skip_first_frames=skip_first_frames,
                         select_every_nth=select_every_nth, size=size, resize_mode=resize_mode)
        path = _video_file(source_video) if source_video is not None else cls._input_file(video)
        if path is None:  # a VIDEO held in memory (e.g. from Create Video)
            components = source_video.get_components()
            frames, fps = select_frames(components.images, float(components.frame_rate), **selection)
        else:
            # The whole selection is decoded: the segment's place in it needs the clip's length.
            frames, fps = load_frames(path, sequence_fps=sequence_fps, progress=cls._progress(),
                                      **selection)
        plan = plan_segment(int(frames.shape[0]), segment_index, segments, anchor_frames)
        whole = len(plan.positions) == plan.clip_frames
        if not whole:
            frames = frames[list(plan.positions)]
        # The sound under the segment's own frames (the anchors are dropped from its result).
        span_skip = skip_first_frames + plan.span.start * select_every_nth
        if path is None:
            audio = cls._component_audio(components.audio, plan.span_frames, fps, span_skip, select_every_nth)
        else:
            start, duration = selection_audio_span(plan.span_frames, fps, skip_first_frames=span_skip,
                                                   select_every_nth=select_every_nth)
            audio = _audio(read_audio(path, start, duration) if is_video_file(path) else None)
        positions = "" if whole else format_frame_positions(plan.clip_frames, plan.positions)
        return io.NodeOutput(frames, int(frames.shape[0]), float(fps), audio, positions,
                             plan.span_start, plan.span_frames)

    @staticmethod
    def _input_file(video) -> str:
        path = resolve_source(video)
        if not os.path.exists(path):
            raise FateZeroNodeError(_missing_message(video, path))
        return path

    @staticmethod
    def _progress():
        pbar = None

        def progress(done: int, total: int) -> None:
            nonlocal pbar
            if pbar is None:
                pbar = comfy.utils.ProgressBar(total)
            pbar.update_absolute(done, total)

        return progress

    @staticmethod
    def _component_audio(sound, frames: int, fps: float, skip: int, nth: int):
        if not sound:
            return None
        start, duration = selection_audio_span(frames, fps, skip_first_frames=skip, select_every_nth=nth)
        rate = int(sound["sample_rate"])
        return _audio((crop_audio(sound["waveform"], rate, start, duration), rate))
