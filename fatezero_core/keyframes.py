"""Spatio-temporal key selection for self-attention (paper eq. 8).

Each frame's queries attend to the keys and values of a list of *key frames*. The list is a rule
drawn from:

- ``"self"``: the frame itself (offset 0),
- ``"first"`` / ``"last"``: frame 0 / frame f-1,
- ``"mid"`` (or ``"middle"``): frame (f-1)//2, e.g. frame 3 of 8,
- ``"prev"`` / ``"next"``: offsets -1 / +1,
- an integer d: frame clip(i + d, 0, f-1);
- ``"anchors/N"``: the two nearest *anchors* of a long clip, anchors being every N-th frame and
  the last one (frames 0, N, 2N, ..., f-1): the anchor at or before frame i, then the next one
  (:class:`Anchor`). Every frame of a long shot then attends to frames that show its own part of
  the shot, and anchors attend only to anchors.

Frames are frames of the whole clip, also when the host runs the clip in context windows
(:mod:`.windows`): ``mid`` is the clip's middle frame, whichever window is running.

A *segment* of a long clip, loaded with the clip's shared key frames (FateZero Load Video Frames'
``segments``/``anchor_frames``, :mod:`.segments`), is a batch of frames picked from the whole clip.
:func:`place_rule` turns the clip's rule into a rule for that batch (:class:`Placed` entries, text
``clip 32 frames 15-31: mid``): each entry is evaluated at the frame's position in the whole clip
and names the loaded frame at that position, so ``mid`` still selects the clip's middle frame.

The official FateZero code uses ``["mid"]`` for Stable Diffusion (every frame attends only to the
middle frame, K=1) and ``[-1, "first"]`` (previous then first frame, K=2) for Tune-A-Video models;
the current frame is only included when the rule lists it (FateZero
``video_diffusion/models/attention.py``, ``SparseCausalAttention.forward``, and its copy
``prompt_attention/attention_register.py``, ``spatial_temporal_forward``). The paper's eq. 8 is
``["self", "mid"]``. Layers whose channel count is below ``min_channels`` (the official
``least_sc_channel``, ``SpatioTemporalTransformerBlock.__init__``) use ordinary per-frame
self-attention. The rule is recorded in the store, so an edit always uses the rule its inversion
used.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
import bisect
import re
from dataclasses import dataclass

import torch

from .errors import FateZeroError

KeyRule = tuple  # normalised: entries are "first", "last", "mid", int offsets or Anchor


@dataclass(frozen=True)
class Anchor:
    """The anchor at or before a frame (``after=False``) or the next anchor after it
    (``after=True``; the last anchor's next is itself), anchors being frames 0, N, 2N, ... and the
    clip's last frame (``every`` = N)."""

    every: int
    after: bool

    def frame(self, frame: int, num_frames: int) -> int:
        last = num_frames - 1
        if frame >= last:
            return last
        before = frame - frame % self.every
        return min(before + self.every, last) if self.after else before


@dataclass(frozen=True)
class Placed:
    """``entry`` of a clip of ``clip_frames`` frames, for a batch holding only the clip frames
    ``positions`` (sorted): batch frame i is clip frame ``positions[i]``; the key frame is the
    batch frame at the clip frame ``entry`` selects, or the nearest loaded one when that frame was
    not loaded (an offset reaching past a segment's border)."""

    entry: object
    positions: tuple
    clip_frames: int

    def frame(self, frame: int, num_frames: int) -> int:
        if num_frames != len(self.positions):
            raise FateZeroError(
                f"The key-frame rule is placed for {len(self.positions)} loaded frames of a "
                f"{self.clip_frames}-frame clip, but the batch has {num_frames} frames. Connect the "
                "frame_positions of the FateZero Load Video Frames node that loaded these frames.")
        key = key_frame_index(self.entry, self.positions[frame], self.clip_frames)
        at = bisect.bisect_left(self.positions, key)
        if at < len(self.positions) and self.positions[at] == key:
            return at
        near = [i for i in (at - 1, at) if 0 <= i < len(self.positions)]
        return min(near, key=lambda i: (abs(self.positions[i] - key), self.positions[i]))


SD_KEY_RULE: KeyRule = ("mid",)
TAV_KEY_RULE: KeyRule = (-1, "first")
PER_FRAME_RULE: KeyRule = (0,)

_NAMED_OFFSETS = {"self": 0, "prev": -1, "previous": -1, "next": 1}
_NAMED_FRAMES = {"first": "first", "last": "last", "mid": "mid", "middle": "mid"}


def parse_key_rule(rule: str | int | Iterable[str | int]) -> KeyRule:
    """Normalise a key-frame rule.

    Accepts a list (``["prev", "first"]``), a comma- or space-separated string (``"prev, first"``,
    ``"[mid]"``) or a single entry. Returns a tuple of ``"first" | "last" | "mid" | int``.
    """
    if isinstance(rule, str):
        placed = _PLACED_TEXT.match(rule)
        if placed:
            clip_frames, positions = parse_frame_positions(f"clip {placed['clip']} frames {placed['frames']}")
            return place_rule(parse_key_rule(placed["rule"]), positions, clip_frames)
        text = rule.strip().strip("[]()")
        parts = [p.strip().strip("'\"") for p in text.replace(",", " ").split()]
    elif isinstance(rule, int):
        parts = [rule]
    else:
        parts = list(rule)
    entries = []
    for part in parts:
        if isinstance(part, Anchor):
            entries.append(part)
        elif str(part).strip().lower().startswith("anchors/"):
            every = _anchor_spacing(part)
            entries += [Anchor(every, False), Anchor(every, True)]
        else:
            entries.append(_parse_entry(part))
    if not entries:
        raise FateZeroError(
            "The key-frame rule is empty. Use e.g. 'mid' (official SD default), 'prev, first' "
            "(Tune-A-Video) or 'self' for per-frame attention."
        )
    return tuple(entries)


def _anchor_spacing(part) -> int:
    try:
        every = int(str(part).split("/", 1)[1])
    except ValueError:
        every = 0
    if every < 1:
        raise FateZeroError(f"'{part}': write anchors/N with N a frame count of at least 1, e.g. anchors/16.")
    return every


def _parse_entry(part: str | int) -> str | int | Anchor:
    if isinstance(part, int):
        return part
    name = str(part).strip().lower()
    for prefix, after in (("anchor_before/", False), ("anchor_after/", True)):
        if name.startswith(prefix):
            return Anchor(_anchor_spacing(name), after)
    if name in _NAMED_OFFSETS:
        return _NAMED_OFFSETS[name]
    if name in _NAMED_FRAMES:
        return _NAMED_FRAMES[name]
    try:
        return int(name)
    except ValueError:
        raise FateZeroError(
            f"Unknown key-frame entry '{part}'. Use self, first, last, mid, prev, next, "
            "anchors/N (e.g. anchors/16) or an integer frame offset such as -1."
        ) from None


_PLACED_TEXT = re.compile(r"^\s*clip\s+(?P<clip>\d+)\s+frames\s+(?P<frames>[\d,\s-]+?)\s*:\s*(?P<rule>.+)$",
                          re.IGNORECASE)


def format_frame_positions(clip_frames: int, positions) -> str:
    """``clip 32 frames 0, 15-31``: the loaded frames' positions in a clip of ``clip_frames``
    (runs of consecutive frames written as ranges)."""
    runs, positions = [], list(positions)
    start = 0
    for i in range(1, len(positions) + 1):
        if i == len(positions) or positions[i] != positions[i - 1] + 1:
            a, b = positions[start], positions[i - 1]
            runs.append(str(a) if a == b else f"{a}-{b}")
            start = i
    return f"clip {clip_frames} frames {', '.join(runs)}"


def parse_frame_positions(text: str) -> tuple[int, tuple[int, ...]] | None:
    """``(clip_frames, positions)`` from :func:`format_frame_positions`'s text; None for empty text
    (the frames are the whole clip)."""
    if not text or not text.strip():
        return None
    match = re.fullmatch(r"\s*clip\s+(\d+)\s+frames\s+([\d,\s-]+?)\s*", text, re.IGNORECASE)
    bad = FateZeroError(
        f"frame_positions '{text}' cannot be read: write 'clip N frames a-b, c' (frames of a clip of N "
        "frames, in increasing order), as FateZero Load Video Frames' frame_positions output does, or "
        "leave it empty when the frames are the whole clip.")
    if not match:
        raise bad
    clip_frames, positions = int(match[1]), []
    for part in match[2].replace(" ", "").split(","):
        first, _, last = part.partition("-")
        if not first.isdigit() or (last and not last.isdigit()):
            raise bad
        positions += range(int(first), int(last or first) + 1)
    if not positions or positions != sorted(set(positions)) or positions[-1] >= clip_frames:
        raise bad
    return clip_frames, tuple(positions)


def place_rule(rule: KeyRule, positions, clip_frames: int) -> KeyRule:
    """``rule`` of a clip of ``clip_frames`` frames for a batch of the clip frames ``positions``
    (:class:`Placed`). A batch that is the whole clip keeps ``rule`` itself."""
    positions = tuple(int(p) for p in positions)
    if positions == tuple(range(clip_frames)):
        return tuple(rule)
    return tuple(e if isinstance(e, Placed) else Placed(e, positions, int(clip_frames)) for e in rule)


def format_key_rule(rule: KeyRule) -> str:
    """Canonical text form, e.g. ``"prev, first"``; used in store configs and messages."""
    placed = [e for e in rule if isinstance(e, Placed)]
    if placed and len(placed) == len(rule) and len({(e.positions, e.clip_frames) for e in placed}) == 1:
        where = format_frame_positions(placed[0].clip_frames, placed[0].positions)
        return f"{where}: {format_key_rule(tuple(e.entry for e in placed))}"
    names = {0: "self", -1: "prev", 1: "next"}
    words, entries, i = [], list(rule), 0
    while i < len(entries):
        e = entries[i]
        if isinstance(e, Anchor):
            pair = Anchor(e.every, True)
            if not e.after and i + 1 < len(entries) and entries[i + 1] == pair:
                words.append(f"anchors/{e.every}")
                i += 2
                continue
            words.append(f"anchor_{'after' if e.after else 'before'}/{e.every}")
        else:
            words.append(names.get(e, str(e)) if isinstance(e, int) else e)
        i += 1
    return ", ".join(words)


def key_frame_index(entry: str | int | Anchor, frame: int, num_frames: int) -> int:
    """Index of the key frame that ``entry`` selects for ``frame``, as ``SparseCausalAttention.forward``
    reads ``SparseCausalAttention_index``: ``first`` 0, ``last`` f-1, ``mid`` (f-1)//2, an offset d
    ``clip(frame + d, 0, f-1)``; an :class:`Anchor` its anchor."""
    if isinstance(entry, (Anchor, Placed)):
        return entry.frame(frame, num_frames)
    if entry == "first":
        return 0
    if entry == "last":
        return num_frames - 1
    if entry == "mid":
        return (num_frames - 1) // 2
    return min(max(frame + int(entry), 0), num_frames - 1)


def key_frame_table(rule: KeyRule, num_frames: int, frames: Sequence[int] | None = None) -> torch.Tensor:
    """``[F, K]`` long tensor: row i lists the key frames of frame i in rule order. With
    ``frames`` (frames of a clip of ``num_frames``, e.g. a context window), one row per listed
    frame, holding frames of the whole clip."""
    frames = range(num_frames) if frames is None else frames
    rows = [[key_frame_index(e, i, num_frames) for e in rule] for i in frames]
    return torch.tensor(rows, dtype=torch.long).reshape(len(rows), len(rule))


def key_frames_used(table: torch.Tensor) -> torch.Tensor:
    """Sorted distinct frames a table refers to: the only source keys a store must keep."""
    return torch.unique(table)


def remap_table(table: torch.Tensor, kept_frames: torch.Tensor) -> torch.Tensor:
    """Re-index a table into a tensor that holds only ``kept_frames`` (sorted)."""
    return torch.searchsorted(kept_frames, table)


def rule_for_channels(rule: KeyRule, channels: int, min_channels: int) -> KeyRule:
    """The official ``least_sc_channel`` switch: narrow layers attend within their own frame."""
    return rule if channels >= min_channels else PER_FRAME_RULE


def gather_key_frames(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Concatenate the key frames' tokens for every frame.

    ``x`` is ``[F_src, N, C]``; ``table`` is ``[F, K]`` indices into ``x``. Returns
    ``[F, K*N, C]``: row i is ``cat(x[table[i, 0]], ..., x[table[i, K-1]])`` along tokens, the
    ``K = W^K [z^{k_1}; ...; z^{k_K}]`` of eq. 8.
    """
    frames, k = table.shape
    picked = x.index_select(0, table.reshape(-1).to(x.device))
    return picked.reshape(frames, k * x.shape[1], x.shape[2])


def is_identity_table(table: torch.Tensor) -> bool:
    """True when every frame attends only to itself (plain per-frame self-attention)."""
    return table.shape[1] == 1 and bool(
        torch.equal(table[:, 0], torch.arange(table.shape[0], dtype=table.dtype))
    )

