"""Spatio-temporal attention when the host runs a long clip in context windows.

A host may run the frames of a long clip through the UNet a window at a time (ComfyUI's context
windows: ``comfy/context_windows.py``, ``IndexListContextHandler.execute``, ComfyUI 0.3.64). Each
call then holds only the window's frames, but eq. 8 asks each frame to attend to its key frames,
which are frames of the whole clip (``mid`` is the clip's middle frame) and often outside the
window. So that every window attends to exactly those keys and values, one model evaluation runs:

1. the *key pass*: the clip's shared key frames (:func:`shared_frames`: the frames the rule names
   by position, ``first``/``mid``/``last``/anchors, with whatever they attend to in turn) through
   the UNet alone, once; their keys and values at every layer are kept in :class:`SharedKeys` for
   every window of the evaluation;
2. the windows in the host's order. A key frame outside the window that is reached by an offset
   (``prev``) is read from the latest earlier window that computed it (:class:`WindowPlan` says
   which window keeps which frames), so under schedules that run windows in frame order the chain
   of ``prev`` runs through every earlier window exactly as in one batch.

Where neither holds (a schedule whose windows are not in frame order, reaching back into a window
that has not run yet), the nearest frame of the window stands in for the missing key frame: the
window then attends as a clip of its own for that entry. :attr:`WindowPlan.stand_ins` lists every
such case, so the host can say the result is not the one-batch result.

With per-frame statistics everywhere else (GroupNorm per frame, no temporal layers), a windowed
model evaluation therefore equals the one-batch one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .keyframes import KeyRule, key_frame_index, key_frame_table


def shared_frames(rule: KeyRule, num_frames: int, limit: int | None = None) -> tuple[int, ...]:
    """The key pass's frames: every frame ``rule`` names by position (``first``, ``mid``,
    ``last``, anchors), closed under the rule (the keys of those frames, and theirs), sorted.

    Empty when closing the named frames adds more than ``limit`` frames (e.g. ``prev, last``
    reaches every frame from the last one): running it would be running the clip in one batch.
    The named frames themselves always run (anchors attend only to anchors: a long shot's anchors
    may outnumber a window, and the key pass then holds more frames than a window)."""
    # An offset stays an offset when the rule is placed in a longer clip (keyframes.Placed).
    named = {key_frame_index(e, i, num_frames) for e in rule if not isinstance(getattr(e, "entry", e), int)
             for i in range(num_frames)}
    frames, frontier = set(named), set(named)
    while frontier:
        reached = {key_frame_index(e, f, num_frames) for e in rule for f in frontier}
        frontier = reached - frames
        frames |= frontier
        if limit is not None and len(frames) - len(named) > limit:
            return ()
    return tuple(sorted(frames))


@dataclass(frozen=True)
class WindowPlan:
    """Where each window's outside key frames come from, for one model evaluation.

    ``shared``: the key pass's frames; ``windows``: the host's windows in the order it runs them;
    ``keep[w]``: frames of window ``w`` that later windows read; ``stand_ins``: ``(window, key
    frame, stand-in frame)`` for every key frame that is neither shared nor computed by an earlier
    window."""

    num_frames: int
    rule: KeyRule
    shared: tuple[int, ...]
    windows: tuple[tuple[int, ...], ...]
    keep: tuple[frozenset[int], ...]
    stand_ins: tuple[tuple[int, int, int], ...]

    @property
    def exact(self) -> bool:
        return not self.stand_ins

    def kept_frames(self) -> frozenset[int]:
        """Every frame whose keys outlive the window that computed them."""
        return frozenset(self.shared).union(*self.keep)


def nearest_frame(frames: Sequence[int], frame: int) -> int:
    return min(frames, key=lambda f: (abs(f - frame), f))


def plan_windows(windows: Sequence[Sequence[int]], rule: KeyRule, num_frames: int) -> WindowPlan:
    """The :class:`WindowPlan` of ``windows`` (absolute frames, in the order the host runs them)
    for key-frame ``rule`` on a clip of ``num_frames``."""
    windows = tuple(tuple(int(f) for f in w) for w in windows)
    limit = max((len(w) for w in windows), default=num_frames)
    shared = shared_frames(rule, num_frames, limit)
    shared_set = set(shared)
    computed_by: dict[int, int] = {}
    keep = [set() for _ in windows]
    stand_ins = []
    for w, frames in enumerate(windows):
        inside = set(frames)
        for frame in frames:
            for entry in rule:
                key = key_frame_index(entry, frame, num_frames)
                if key in inside or key in shared_set:
                    continue
                if key in computed_by:
                    keep[computed_by[key]].add(key)
                else:
                    stand_ins.append((w, key, nearest_frame(frames, key)))
        for frame in frames:
            computed_by[frame] = w
    return WindowPlan(num_frames, tuple(rule), shared, windows, tuple(frozenset(k) for k in keep),
                      tuple(dict.fromkeys(stand_ins)))


class SharedKeys:
    """Keys and values of frames outside the running window, for one model evaluation.

    The host calls :meth:`begin` with the evaluation's plan, :meth:`enter_key_pass` before the
    key pass and :meth:`enter_window` before each window; the controller calls :meth:`keep` with
    every self-attention call's keys and values and :meth:`lookup` for a key frame the call lacks.
    Rows are kept per (layer, chunk kind, frame): ``uncond``, ``cond`` and ``source`` frames
    differ."""

    def __init__(self) -> None:
        self.plan: WindowPlan | None = None
        self._window: int | None = None
        self._rows: dict[tuple[str, str, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def begin(self, plan: WindowPlan) -> None:
        self.plan, self._window = plan, None
        self._rows.clear()

    def end(self) -> None:
        self.plan, self._window = None, None
        self._rows.clear()

    def enter_key_pass(self) -> None:
        self._window = None

    def enter_window(self, index: int) -> None:
        self._window = index

    def _wanted(self) -> frozenset[int] | tuple[int, ...]:
        if self.plan is None:
            return ()
        return self.plan.shared if self._window is None else self.plan.keep[self._window]

    def keep(self, layer: str, kind: str, frames: Sequence[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep the rows of ``k``/``v`` (one per frame of ``frames``) that later calls read."""
        wanted = self._wanted()
        for position, frame in enumerate(frames):
            if frame in wanted:
                # Copies: views would keep the window's whole keys alive for the evaluation.
                self._rows[(layer, kind, frame)] = (k[position].clone(), v[position].clone())

    def lookup(self, layer: str, kind: str, frame: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self._rows.get((layer, kind, frame))


def window_key_table(rule: KeyRule, num_frames: int, frames: Sequence[int], shared: SharedKeys,
                     layer: str, kind: str, k: torch.Tensor, v: torch.Tensor):
    """Keys and values holding every key frame of a window's ``frames`` and the table into them.

    ``k``/``v`` are the window's own ``[Fw, N, C]``; key frames outside the window are appended
    from ``shared`` (or stood in for by the window's nearest frame when it has none, see the module
    docstring). Returns ``(k_all, v_all, table, key_frames)``: ``table`` is ``[Fw, K]`` into
    ``k_all``, ``key_frames`` the clip frame whose keys each table entry ends up reading
    (``[Fw, K]``, for reading the source keys of the same frames)."""
    wanted = key_frame_table(rule, num_frames, frames)
    position = {f: p for p, f in enumerate(frames)}
    extra_k, extra_v, column = [], [], {}
    read = {}
    for key in torch.unique(wanted).tolist():
        if key in position:
            column[key], read[key] = position[key], key
            continue
        row = shared.lookup(layer, kind, key)
        if row is None:
            stand_in = nearest_frame(frames, key)
            column[key], read[key] = position[stand_in], stand_in
            continue
        column[key], read[key] = len(frames) + len(extra_k), key
        extra_k.append(row[0])
        extra_v.append(row[1])
    table = wanted.clone().apply_(column.__getitem__)
    key_frames = wanted.clone().apply_(read.__getitem__)
    if extra_k:
        k = torch.cat([k, torch.stack(extra_k).to(k)])
        v = torch.cat([v, torch.stack(extra_v).to(v)])
    return k, v, table, key_frames


__all__ = ["SharedKeys", "WindowPlan", "plan_windows", "shared_frames", "window_key_table"]
