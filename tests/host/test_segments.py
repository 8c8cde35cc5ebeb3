"""A long clip edited in segments, each loaded with the clip's shared key frames, equals the clip
edited in one batch (``group_norm=frame``, anchor key rules): the segments attend to the same
anchors without seeing each other. The reference is the same nodes on the whole clip; the segment
runs get their frames and ``frame_positions`` from ``fatezero_core.segments.plan_segment``, as
FateZero Load Video Frames computes them (its own outputs are checked on a real file below)."""

from __future__ import annotations

import pytest
import torch

from test_context_windows import LATENT, STEPS, TOLERANCE, clip_latent, max_difference, model  # noqa: F401
from test_invert_sample import empty, settings

pytestmark = pytest.mark.usefixtures("host_inference_mode")

FRAMES = 32


def edit(nodes, model, clip, key_frames, latent, frame_positions=""):
    """Invert + FateZero Sample with ``group_norm=frame``; returns (inverted, edited) latents."""
    src, tgt, spec = settings(nodes, clip, blend_words="cat")
    inverted, store = nodes.invert.FateZeroDDIMInvert.execute(
        model=model, source=src, latent={"samples": latent}, steps=STEPS, key_frames=key_frames,
        st_min_channels=0, store_placement="cpu", store_dtype="fp32", layer_set="relative",
        schedule_end="comfy", group_norm="frame", frame_positions=frame_positions).args
    out, _ = nodes.sample.FateZeroSample.execute(
        model=model, positive=tgt, negative=empty(clip), latent=inverted, attention_store=store,
        blend_settings=spec, cfg=7.5, fusion=True).args
    return inverted["samples"], out["samples"]


def segmented_edit(nodes, model, clip, key_frames, segments, latent):
    """Every segment edited alone with the clip's anchors; anchors dropped; joined in order."""
    from fatezero_core.keyframes import format_frame_positions
    from fatezero_core.segments import plan_segment

    parts = [], []
    for index in range(segments):
        plan = plan_segment(FRAMES, index, segments, key_frames)
        positions = format_frame_positions(FRAMES, plan.positions)
        inverted, edited = edit(nodes, model, clip, key_frames, latent=latent[list(plan.positions)],
                                   frame_positions=positions)
        span = slice(plan.span_start, plan.span_start + plan.span_frames)
        parts[0].append(inverted[span])
        parts[1].append(edited[span])
    return torch.cat(parts[0]), torch.cat(parts[1])


@pytest.mark.parametrize("key_frames, segments", [("mid", 2), ("first, mid, last", 2), ("anchors/8", 2),
                                                  ("first, mid, last", 3)])
def test_segments_equal_the_one_batch_edit(nodes, model, tiny_clip, key_frames, segments):
    latent = clip_latent(FRAMES, LATENT)
    reference = edit(nodes, model, tiny_clip, key_frames, latent=latent)
    inverted, edited = segmented_edit(nodes, model, tiny_clip, key_frames, segments, latent)
    print(f"{key_frames}, {segments} segments: inverted {max_difference(inverted, reference[0]):.2e}, "
          f"edited {max_difference(edited, reference[1]):.2e}")
    assert max_difference(inverted, reference[0]) < TOLERANCE
    assert max_difference(edited, reference[1]) < TOLERANCE
    assert max_difference(reference[1], reference[0]) > 1e-2  # the edit did something


def test_without_the_anchors_the_segments_differ(nodes, model, tiny_clip):
    """The check above has teeth: a segment that attends to its own middle frame is another edit."""
    latent = clip_latent(FRAMES, LATENT)
    reference = edit(nodes, model, tiny_clip, "mid", latent=latent)
    second = edit(nodes, model, tiny_clip, "mid", latent=latent[16:])
    assert max_difference(second[1], reference[1][16:]) > 1e-3
