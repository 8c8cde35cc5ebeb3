"""Numbers for a video edit: temporal consistency, edit accuracy, warp error, structure.

- **Tem-Con** (FateZero paper Table 1; official script ``CLIP/frame_acc_tem_con.py``): mean
  cosine similarity of the L2-normalised CLIP image embeddings of the ``F - 1`` consecutive frame
  pairs. FateZero reports 0.965 with CLIP ViT-B/32.
- **Frame-Acc** (same script): per frame, ``softmax(100 * cos(image, [source, target]))``; a frame
  counts when ``p_target >= p_source`` (ties count). The share of such frames (paper: 0.903).
- **CLIP-T**: mean cosine of each frame's image embedding with the target prompt's text embedding
  (the "CLIP score" of text-driven video editing papers, here as a cosine, not x100).
- **warp error** (Lai et al., "Learning Blind Video Temporal Consistency", ECCV 2018): optical
  flow of the *source* frames (OpenCV DIS or Farneback), each edited frame compared with its
  predecessor warped by that flow (kornia), mean absolute difference over the pixels the flow can
  explain. Pixels are left out where the forward and backward flows disagree (the occlusion test of
  Sundaram et al., ECCV 2010: ``|b + f(x + b)|^2 > 0.01 (|b|^2 + |f(x + b)|^2) + 0.5`` px^2) or the
  flow leaves the frame. The same number for the source frames is the floor an edit can reach.
- **SSIM to source** (Wang et al., IEEE TIP 2004; kornia, 11x11 Gaussian window): grey-level
  structure of each edited frame against its source frame, so "the background stayed" is a number.

Frames are ComfyUI IMAGE tensors ``[F, H, W, C]`` in 0..1 (C >= 3; extra channels are dropped).
CLIP embeddings come from the caller (the node asks ComfyUI's CLIP models); :func:`clip_input`
prepares the frames for them the way the official script does. Nothing here imports ComfyUI.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from kornia.color import rgb_to_grayscale
from kornia.geometry.transform import remap
from kornia.metrics import ssim as kornia_ssim
from kornia.geometry import create_meshgrid

from .errors import MetricsError
from .video_loading import scaled_size

__all__ = [
    "FLOW_METHODS",
    "VideoMetrics",
    "clip_input",
    "tem_con",
    "frame_acc",
    "clip_t",
    "optical_flows",
    "warp",
    "occlusion_mask",
    "warp_errors",
    "structure_similarity",
    "check_frames",
    "measure_video",
    "plot_metrics",
]

FLOW_METHODS: tuple[str, ...] = ("dis", "farneback")
"""OpenCV optical flow methods: ``dis`` (Kroeger et al. 2016, medium preset) or ``farneback``."""

CLIP_SIZE = 224
FRAME_ACC_LOGIT_SCALE = 100.0  # the official script's logits: 100 * cosine
OCCLUSION_ALPHA, OCCLUSION_BETA = 0.01, 0.5  # Sundaram et al. 2010
SSIM_WINDOW = 11
MIN_FRAMES = 2
MIN_SIZE = 16


# --------------------------------------------------------------------------------------------
# Frames
# --------------------------------------------------------------------------------------------


def _image(frames: torch.Tensor, name: str) -> torch.Tensor:
    """``[F, H, W, 3]`` float32 view of an IMAGE batch (grey expanded, alpha dropped)."""
    if not isinstance(frames, torch.Tensor) or frames.dim() != 4 or frames.shape[-1] not in (1, 3, 4):
        shape = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise MetricsError(f"'{name}' must be an IMAGE batch [frames, height, width, channels]; got {shape}.")
    frames = frames.float()
    return frames.expand(-1, -1, -1, 3) if frames.shape[-1] == 1 else frames[..., :3]


def _rgb(frames: torch.Tensor, name: str) -> torch.Tensor:
    """:func:`_image`, also checked to be a clip the flow can measure."""
    frames = _image(frames, name)
    count, height, width = frames.shape[:3]
    if count < MIN_FRAMES:
        raise MetricsError(
            f"'{name}' has {count} frame; the video metrics compare consecutive frames, so connect "
            f"at least {MIN_FRAMES} frames.")
    if min(height, width) < MIN_SIZE:
        raise MetricsError(f"'{name}' frames are {width}x{height}; the optical flow needs at least "
                           f"{MIN_SIZE}x{MIN_SIZE} pixels.")
    return frames


def clip_input(frames: torch.Tensor, size: int = CLIP_SIZE) -> torch.Tensor:
    """Frames as the official CLIP script feeds them, still in 0..1: ``[F, size, size, 3]``.

    Official ``CLIP/frame_acc_tem_con.py``: ``crop_read_image_path`` keeps a portrait frame's
    (h > w) bottom ``w x w`` square; then CLIP's ``preprocess`` sends the short side to ``size``
    (bicubic, antialiased like PIL; long side ``int(scale * long)``) and cuts out the centre
    ``size x size`` (offsets rounded as torchvision's ``CenterCrop``).
    CLIP's mean/std normalisation is the encoder's own step (ComfyUI's ``encode_image``).
    """
    x = _image(frames, "frames")
    h, w = x.shape[1:3]
    if h > w:
        x = x[:, h - w:]
        h = w
    x = x.permute(0, 3, 1, 2)
    sh, sw = scaled_size(h, w, size)
    if (sh, sw) != (h, w):
        x = F.interpolate(x, size=(sh, sw), mode="bicubic", align_corners=False, antialias=True)
    top, left = int(round((sh - size) / 2.0)), int(round((sw - size) / 2.0))
    x = x[:, :, top:top + size, left:left + size].clamp(0.0, 1.0)
    return x.permute(0, 2, 3, 1).contiguous()


# --------------------------------------------------------------------------------------------
# CLIP metrics (from embeddings)
# --------------------------------------------------------------------------------------------


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


def tem_con(image_embeds: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Tem-Con: ``(mean, per pair [F-1])`` cosine of consecutive frames' image embeddings ``[F, D]``."""
    e = _unit(image_embeds)
    per_pair = (e[1:] * e[:-1]).sum(-1)
    return float(per_pair.mean()), per_pair


def frame_acc(image_embeds: torch.Tensor, source_text: torch.Tensor,
              target_text: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Frame-Acc: ``(share, p_target [F], success [F])``, the official recipe.

    ``logits = 100 * cos(image, [source, target])``, softmax over the two prompts; a frame is a
    success when ``p_target >= p_source`` (ties count).
    """
    texts = _unit(torch.stack([source_text.reshape(-1), target_text.reshape(-1)]))
    probs = (FRAME_ACC_LOGIT_SCALE * _unit(image_embeds) @ texts.T).softmax(-1)
    success = probs[:, 1] >= probs[:, 0]
    return float(success.float().mean()), probs[:, 1], success


def clip_t(image_embeds: torch.Tensor, target_text: torch.Tensor) -> tuple[float, torch.Tensor]:
    """CLIP-T: ``(mean, per frame [F])`` cosine of each frame with the target prompt."""
    per_frame = _unit(image_embeds) @ _unit(target_text.reshape(-1))
    return float(per_frame.mean()), per_frame


# --------------------------------------------------------------------------------------------
# Optical flow, warping, warp error
# --------------------------------------------------------------------------------------------


def _grey_uint8(frames: torch.Tensor) -> np.ndarray:
    grey = rgb_to_grayscale(frames.permute(0, 3, 1, 2).clamp(0, 1))[:, 0]
    return (grey * 255.0).round().to(torch.uint8).cpu().numpy()


def _flow(first: np.ndarray, second: np.ndarray, method: str) -> np.ndarray:
    """``[H, W, 2]`` flow with ``first(x) ~ second(x + flow(x))`` (OpenCV's convention)."""
    if method == "dis":
        # A new solver per call: DIS keeps state between calls, so results would depend on order.
        return cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM).calc(first, second, None)
    # Farneback with OpenCV's documented example parameters (pyramid 0.5, 3 levels, window 15).
    return cv2.calcOpticalFlowFarneback(first, second, None, 0.5, 3, 15, 3, 5, 1.2, 0)


def optical_flows(frames: torch.Tensor, method: str = "dis") -> tuple[torch.Tensor, torch.Tensor]:
    """``(forward, backward)`` flows of consecutive frames, each ``[F-1, 2, H, W]`` in pixels.

    ``forward[t]`` maps frame ``t`` to ``t+1``; ``backward[t]`` maps frame ``t+1`` back to ``t``
    (so ``frame[t+1](x) ~ frame[t](x + backward[t](x))``). Computed on grey-level 8-bit frames.
    """
    if method not in FLOW_METHODS:
        raise MetricsError(f"Unknown flow method '{method}'; use one of {', '.join(FLOW_METHODS)}.")
    grey = _grey_uint8(_rgb(frames, "frames"))
    forward = [_flow(grey[t], grey[t + 1], method) for t in range(len(grey) - 1)]
    backward = [_flow(grey[t + 1], grey[t], method) for t in range(len(grey) - 1)]

    def stack(flows):
        return torch.from_numpy(np.stack(flows)).permute(0, 3, 1, 2).float().to(frames.device)

    return stack(forward), stack(backward)


def _sample_positions(flow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, _, h, w = flow.shape
    grid = create_meshgrid(h, w, normalized_coordinates=False, device=flow.device, dtype=flow.dtype)
    return grid[..., 0] + flow[:, 0], grid[..., 1] + flow[:, 1]


def warp(images: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """``images [N, C, H, W]`` sampled at ``x + flow(x)`` (bilinear; the edge pixel outside the
    frame, so a sub-pixel flow at the border does not fade to black)."""
    map_x, map_y = _sample_positions(flow)
    return remap(images, map_x, map_y, mode="bilinear", padding_mode="border", align_corners=True)


def occlusion_mask(forward: torch.Tensor, backward: torch.Tensor) -> torch.Tensor:
    """``[N, 1, H, W]`` 1 where frame ``t+1``'s pixel is explained by frame ``t``, else 0.

    A pixel is kept when its backward flow stays inside the frame (within half a pixel of the
    edge pixels' centres) and the forward flow found where it points nearly undoes it (Sundaram
    et al. 2010, ``alpha = 0.01``, ``beta = 0.5`` px^2).
    """
    h, w = backward.shape[-2:]
    map_x, map_y = _sample_positions(backward)
    inside = (map_x >= -0.5) & (map_x <= w - 0.5) & (map_y >= -0.5) & (map_y <= h - 0.5)
    fwd = warp(forward, backward)
    mismatch = (backward + fwd).square().sum(1)
    bound = OCCLUSION_ALPHA * (backward.square().sum(1) + fwd.square().sum(1)) + OCCLUSION_BETA
    return (inside & (mismatch <= bound)).unsqueeze(1).float()


def warp_errors(frames: torch.Tensor, backward: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per pair ``[F-1]``: masked mean absolute difference of frame ``t+1`` and frame ``t`` warped
    to it by ``backward[t]``, over RGB values in 0..1. A pair with no kept pixel is NaN."""
    x = _rgb(frames, "frames").permute(0, 3, 1, 2).to(backward.device)
    predecessor = warp(x[:-1], backward)
    diff = (x[1:] - predecessor).abs().mean(1, keepdim=True)
    kept = mask.sum((1, 2, 3))
    return torch.where(kept > 0, (diff * mask).sum((1, 2, 3)) / kept.clamp_min(1), torch.nan)


def structure_similarity(source: torch.Tensor, edit: torch.Tensor) -> torch.Tensor:
    """Per frame ``[F]``: SSIM of the grey-level edited frame against the source frame."""
    a = rgb_to_grayscale(_rgb(source, "source_frames").permute(0, 3, 1, 2))
    b = rgb_to_grayscale(_rgb(edit, "edited_frames").permute(0, 3, 1, 2).to(a.device))
    return kornia_ssim(a, b, SSIM_WINDOW, max_val=1.0).mean((1, 2, 3))


# --------------------------------------------------------------------------------------------
# All together
# --------------------------------------------------------------------------------------------


@dataclass
class VideoMetrics:
    """Every number of one measurement; ``None`` where a metric was not measured (see ``notes``).

    Per-frame lists: ``*_per_pair`` have ``F - 1`` values (pair ``t-1, t`` at index ``t-1``);
    ``*_per_frame`` have ``F``.
    """

    frames: int
    height: int
    width: int
    flow_method: str
    flow_from: str  # "source" or "edit": whose frames the flow was computed on
    warp_error: float
    warp_error_per_pair: list[float]
    kept_pixels: float  # share of pixels the occlusion test kept, over every pair
    source_warp_error: float | None = None
    source_warp_error_per_pair: list[float] | None = None
    ssim: float | None = None
    ssim_per_frame: list[float] | None = None
    tem_con: float | None = None
    tem_con_per_pair: list[float] | None = None
    source_tem_con: float | None = None
    source_tem_con_per_pair: list[float] | None = None
    frame_acc: float | None = None
    p_target_per_frame: list[float] | None = None
    clip_t: float | None = None
    clip_t_per_frame: list[float] | None = None
    notes: list[str] = field(default_factory=list)

    def rows(self) -> list[tuple[str, float | None, float | None, str]]:
        """``(metric, edit, source, meaning)`` for the table, every metric, measured or not."""
        return [
            ("Tem-Con", self.tem_con, self.source_tem_con,
             "higher = steadier: CLIP cosine of consecutive frames"),
            ("Frame-Acc", self.frame_acc, None,
             "higher: share of frames closer to the target prompt than the source prompt"),
            ("CLIP-T", self.clip_t, None, "higher: CLIP cosine of frames and target prompt"),
            ("warp error", self.warp_error, self.source_warp_error,
             "lower = steadier: change from the flow-warped previous frame (0..1)"),
            ("SSIM to source", self.ssim, None, "higher: grey-level structure kept from the source"),
        ]

    def table(self) -> str:
        """The metrics as an aligned text table with a heading line and the notes."""
        def cell(value):
            return "-" if value is None or not math.isfinite(value) else f"{value:.4f}"

        header = ("metric", "edit", "source", "meaning")
        body = [(name, cell(e), cell(s), meaning) for name, e, s, meaning in self.rows()]
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(3)]
        lines = [f"FateZero video metrics: {self.frames} frames, {self.width}x{self.height}, "
                 f"flow {self.flow_method} on the {self.flow_from} frames, "
                 f"{100 * self.kept_pixels:.1f}% of pixels kept by the occlusion test"]
        for row in [header, *body]:
            lines.append("  ".join(c.ljust(w) for c, w in zip(row[:3], widths)) + "  " + row[3])
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)

    def as_dict(self) -> dict:
        """JSON-ready: every field (NaN becomes ``None``)."""
        def clean(value):
            if isinstance(value, float) and not math.isfinite(value):
                return None
            if isinstance(value, list):
                return [clean(v) for v in value]
            return value

        return {k: clean(v) for k, v in asdict(self).items()}


def _values(t: torch.Tensor) -> list[float]:
    return [float(v) for v in t.detach().float().cpu()]


def _mean(values: torch.Tensor) -> float:
    finite = values[torch.isfinite(values)]
    return float(finite.mean()) if finite.numel() else math.nan


def _check_embeds(embeds: torch.Tensor | None, frames: int, name: str) -> None:
    if embeds is not None and (embeds.dim() != 2 or embeds.shape[0] != frames):
        raise MetricsError(f"{name} must be [{frames}, width] (one CLIP embedding per frame); "
                           f"got {tuple(embeds.shape)}.")


def check_frames(edit: torch.Tensor, source: torch.Tensor | None = None):
    """``(edit, source)`` as ``[F, H, W, 3]`` float32, refused unless measurable together."""
    edit = _rgb(edit, "edited_frames")
    count, height, width = edit.shape[:3]
    if source is not None:
        source = _rgb(source, "source_frames").to(edit.device)
        if source.shape[0] != count:
            raise MetricsError(
                f"The edit has {count} frames but the source {source.shape[0]}: connect the frames "
                "the edit was made from (the same Load Video Frames output that was inverted).")
        if source.shape[1:3] != edit.shape[1:3]:
            raise MetricsError(
                f"The edited frames are {width}x{height} but the source frames "
                f"{source.shape[2]}x{source.shape[1]}: connect the frames the edit was made from, "
                "or scale one batch to the other's size first.")
    return edit, source


def measure_video(edit: torch.Tensor, source: torch.Tensor | None = None, *,
                  edit_embeds: torch.Tensor | None = None, source_embeds: torch.Tensor | None = None,
                  source_text: torch.Tensor | None = None, target_text: torch.Tensor | None = None,
                  flow_method: str = "dis", notes: tuple[str, ...] = ()) -> VideoMetrics:
    """Measure ``edit`` (and compare with ``source`` when given).

    The flow comes from ``source`` when given, else from ``edit`` itself (then it follows the
    edit's own motion and the warp error says less; a note says so). CLIP metrics need the image
    embeddings ``[F, D]``; Frame-Acc needs both prompt embeddings ``[D]``, CLIP-T the target's.
    """
    edit, source = check_frames(edit, source)
    count, height, width = edit.shape[:3]
    notes = list(notes)
    _check_embeds(edit_embeds, count, "edit_embeds")
    _check_embeds(source_embeds, count, "source_embeds")

    forward, backward = optical_flows(source if source is not None else edit, flow_method)
    mask = occlusion_mask(forward, backward)
    per_pair = warp_errors(edit, backward, mask)
    m = VideoMetrics(frames=count, height=height, width=width, flow_method=flow_method,
                     flow_from="source" if source is not None else "edit",
                     warp_error=_mean(per_pair), warp_error_per_pair=_values(per_pair),
                     kept_pixels=float(mask.mean()))
    if source is None:
        notes.append("no source frames: the flow follows the edit itself, and the source warp "
                     "error and SSIM are not measured; connect source_frames to compare.")
    else:
        floor = warp_errors(source, backward, mask)
        m.source_warp_error, m.source_warp_error_per_pair = _mean(floor), _values(floor)
        ssim = structure_similarity(source, edit)
        m.ssim, m.ssim_per_frame = float(ssim.mean()), _values(ssim)
    if edit_embeds is not None:
        m.tem_con, pairs = tem_con(edit_embeds)
        m.tem_con_per_pair = _values(pairs)
        if target_text is not None:
            m.clip_t, per_frame = clip_t(edit_embeds, target_text)
            m.clip_t_per_frame = _values(per_frame)
            if source_text is not None:
                m.frame_acc, p_target, _ = frame_acc(edit_embeds, source_text, target_text)
                m.p_target_per_frame = _values(p_target)
    if source_embeds is not None:
        m.source_tem_con, pairs = tem_con(source_embeds)
        m.source_tem_con_per_pair = _values(pairs)
    if not all(math.isfinite(v) for v in m.warp_error_per_pair):
        notes.append("some frame pairs have no pixel the flow can explain (cut or fast motion); "
                     "the warp error averages the other pairs.")
    m.notes = notes
    return m


# --------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------

PLOT_WIDTH, PANEL_HEIGHT = 512, 112
_BACKGROUND, _GRID, _TEXT = (30, 30, 30), (70, 70, 70), (220, 220, 220)
EDIT_COLOUR, SOURCE_COLOUR, EXTRA_COLOUR = (255, 150, 40), (120, 180, 255), (120, 220, 120)  # RGB


def _panel(canvas: np.ndarray, top: int, title: str, series, frames: int, missing: str) -> None:
    """One panel: ``series`` is ``[(label, colour, first_frame, values)]``."""
    left, right, pad_top, pad_bottom = 64, PLOT_WIDTH - 12, top + 20, top + PANEL_HEIGHT - 18
    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.putText(canvas, title, (8, top + 14), font, 0.42, _TEXT, 1, cv2.LINE_AA)
    cv2.rectangle(canvas, (left, pad_top), (right, pad_bottom), _GRID, 1)
    values = [v for _, _, _, vals in series for v in vals if v is not None and math.isfinite(v)]
    if not values:
        cv2.putText(canvas, missing, (left + 8, (pad_top + pad_bottom) // 2 + 4), font, 0.38,
                    _TEXT, 1, cv2.LINE_AA)
        return
    low, high = min(values), max(values)
    span = high - low if high > low else max(abs(high), 1e-3) * 0.1
    low, high = low - 0.1 * span, high + 0.1 * span
    for value, y in ((high, pad_top + 8), (low, pad_bottom)):
        cv2.putText(canvas, f"{value:.3g}", (4, y), font, 0.32, _TEXT, 1, cv2.LINE_AA)

    def xy(frame, value):
        x = left + (right - left) * frame / max(frames - 1, 1)
        y = pad_bottom - (pad_bottom - pad_top) * (value - low) / (high - low)
        return int(round(x)), int(round(y))

    every = max(1, math.ceil(frames / 16))  # frame numbers under the ticks, at most 16
    for i in range(frames):
        x = xy(i, low)[0]
        cv2.line(canvas, (x, pad_bottom), (x, pad_bottom + 3), _GRID, 1)
        if i % every == 0 or i == frames - 1:
            label = str(i)
            width = cv2.getTextSize(label, font, 0.32, 1)[0][0]
            cv2.putText(canvas, label, (x - width // 2, pad_bottom + 14), font, 0.32, _TEXT, 1,
                        cv2.LINE_AA)
    legend_x = left + 8 + cv2.getTextSize(title, font, 0.42, 1)[0][0]
    for label, colour, first, vals in series:
        points = [xy(first + i, v) for i, v in enumerate(vals) if v is not None and math.isfinite(v)]
        if not points:
            continue
        if len(points) > 1:
            cv2.polylines(canvas, [np.array(points, np.int32)], False, colour, 2, cv2.LINE_AA)
        for p in points:
            cv2.circle(canvas, p, 3, colour, -1, cv2.LINE_AA)
        cv2.putText(canvas, label, (legend_x, top + 14), font, 0.38, colour, 1, cv2.LINE_AA)
        legend_x += cv2.getTextSize(label, font, 0.38, 1)[0][0] + 12


def plot_metrics(m: VideoMetrics) -> torch.Tensor:
    """Per-frame values as a ComfyUI IMAGE ``[1, 4 * PANEL_HEIGHT, PLOT_WIDTH, 3]`` in 0..1.

    Panels, top to bottom: warp error per pair (edit, source), Tem-Con per pair (edit, source),
    CLIP-T and the target probability of Frame-Acc per frame, SSIM to source per frame; frame
    numbers along the bottom of each panel. Pair values sit at the later frame of the pair. A
    metric that was not measured says so in its panel.
    """
    canvas = np.zeros((4 * PANEL_HEIGHT, PLOT_WIDTH, 3), np.uint8)
    canvas[:] = _BACKGROUND
    panels = [
        ("warp error", [("edit", EDIT_COLOUR, 1, m.warp_error_per_pair),
                        ("source", SOURCE_COLOUR, 1, m.source_warp_error_per_pair or [])],
         "not measured"),
        ("Tem-Con", [("edit", EDIT_COLOUR, 1, m.tem_con_per_pair or []),
                     ("source", SOURCE_COLOUR, 1, m.source_tem_con_per_pair or [])],
         "not measured: connect a CLIP vision model"),
        ("CLIP-T / p(target)", [("CLIP-T", EDIT_COLOUR, 0, m.clip_t_per_frame or []),
                                ("p(target)", EXTRA_COLOUR, 0, m.p_target_per_frame or [])],
         "not measured: connect CLIP vision + text models and prompts"),
        ("SSIM to source", [("edit", EDIT_COLOUR, 0, m.ssim_per_frame or [])],
         "not measured: connect the source frames"),
    ]
    for i, (title, series, missing) in enumerate(panels):
        _panel(canvas, i * PANEL_HEIGHT, title, series, m.frames, missing)
    return torch.from_numpy(canvas).float().div_(255.0).unsqueeze(0)
