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


def format_key_rule(rule: KeyRule) -> str:
    """Canonical text form, e.g. ``"prev, first"``; used in store configs and messages."""
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
    if isinstance(entry, Anchor):
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

