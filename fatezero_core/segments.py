"""Segments of a long clip, each loaded with the clip's shared key frames.

A clip too long for one GPU (or to be spread over several ComfyUI servers, ``tools/fatezero_run.py
--segments``) is cut into consecutive segments. So that every segment attends to the same key
frames, each segment is loaded with the clip's shared key frames (:func:`.windows.shared_frames`
of the workflow's key rule on the whole clip: ``mid``, ``first, mid, last``, the anchors of
``anchors/N``, with what they attend to in turn), in whole-clip order. The key rule placed on
those positions (:func:`.keyframes.place_rule`) then names the whole clip's frames, and with
per-frame statistics elsewhere (``group_norm=frame``) a segment's frames come out as in one batch
of the whole clip. An offset (``prev``) reaching past a segment's first frame reads the nearest
loaded frame instead (:class:`.keyframes.Placed`): such rules are not one-batch exact at the
borders.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import FateZeroError
from .keyframes import key_frame_index, parse_key_rule
from .windows import shared_frames


@dataclass(frozen=True)
class SegmentPlan:
    """Which clip frames one segment run loads: ``positions`` (sorted clip frames: the span and the
    shared key frames), of which ``span_frames`` frames from ``span_start`` on are the segment's
    own (the shared key frames before the span come first)."""

    clip_frames: int
    positions: tuple[int, ...]
    span_start: int
    span_frames: int

    @property
    def span(self) -> range:
        first = self.positions[self.span_start]
        return range(first, first + self.span_frames)


def segment_span(clip_frames: int, index: int, count: int) -> range:
    """Clip frames of segment ``index`` of ``count`` equal consecutive segments (the first ones a
    frame longer when the clip does not divide evenly)."""
    if count < 1 or not 0 <= index < count:
        raise FateZeroError(f"segment_index {index} is not one of the {count} segments: use 0 to {count - 1}.")
    if count > clip_frames:
        raise FateZeroError(
            f"{count} segments need at least {count} frames; the clip has {clip_frames}. Use at most "
            f"{clip_frames} segments.")
    return range(index * clip_frames // count, (index + 1) * clip_frames // count)


def anchor_frames(rule_text: str, clip_frames: int, limit: int) -> tuple[int, ...]:
    """The shared key frames of ``rule_text`` on a clip of ``clip_frames``: what the rule names by
    position, closed under the rule while that adds at most ``limit`` frames (else the named
    frames alone: ``prev`` chains would load the whole clip)."""
    if not rule_text or not rule_text.strip():
        return ()
    rule = parse_key_rule(rule_text)
    frames = shared_frames(rule, clip_frames, limit)
    if frames:
        return frames
    return tuple(sorted({key_frame_index(e, i, clip_frames) for e in rule if not isinstance(e, int)
                         for i in range(clip_frames)}))


def plan_segment(clip_frames: int, index: int = 0, count: int = 1, rule_text: str = "") -> SegmentPlan:
    """The :class:`SegmentPlan` of segment ``index`` of ``count`` with the shared key frames of
    ``rule_text`` (a key-frame rule; empty: no extra frames)."""
    span = segment_span(clip_frames, index, count)
    extra = anchor_frames(rule_text, clip_frames, len(span))
    positions = tuple(sorted(set(span) | set(extra)))
    return SegmentPlan(clip_frames, positions, positions.index(span.start), len(span))


__all__ = ["SegmentPlan", "anchor_frames", "plan_segment", "segment_span"]
