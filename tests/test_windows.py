"""Key frames shared by context windows (``fatezero_core.windows``) and the anchor rules.

Expected values are worked by hand from the rules' definitions: ``mid`` of 24 frames is frame 11;
``anchors/8`` on 24 frames puts anchors at 0, 8, 16 and 23; the windows are the ones ComfyUI's
``standard_static`` schedule makes for 24 frames in windows of 8 with overlap 3
(``comfy/context_windows.py``, ``create_windows_static_standard``): starts 0, 5, 10, 15 and a last
window shifted back to end at frame 23.
"""

from __future__ import annotations

import pytest
import torch

from fatezero_core.attention import spatio_temporal_attention
from fatezero_core.controller import CaptureController
from fatezero_core.keyframes import (Anchor, format_key_rule, key_frame_index, key_frame_table,
                                     parse_key_rule)
from fatezero_core.layers import AttnCall, LayerInfo
from fatezero_core.store import AttentionStore, CaptureConfig
from fatezero_core.windows import SharedKeys, plan_windows, shared_frames, window_key_table

FRAMES = 24
STATIC_8_3 = [list(range(s, s + 8)) for s in (0, 5, 10, 15)] + [list(range(16, 24))]
BATCHED_8 = [list(range(s, s + 8)) for s in (0, 8, 16)]


def test_anchor_rule_reads_the_two_nearest_anchors():
    rule = parse_key_rule("anchors/8")
    assert rule == (Anchor(8, False), Anchor(8, True))
    expected = {0: (0, 8), 5: (0, 8), 8: (8, 16), 15: (8, 16), 16: (16, 23), 20: (16, 23), 23: (23, 23)}
    for frame, keys in expected.items():
        assert tuple(key_frame_index(e, frame, FRAMES) for e in rule) == keys
    assert format_key_rule(rule) == "anchors/8"
    assert parse_key_rule(format_key_rule(rule)) == rule
    assert parse_key_rule("anchor_after/4, first") == (Anchor(4, True), "first")


@pytest.mark.parametrize("text", ["anchors/0", "anchors/x", "anchor_before/-2"])
def test_bad_anchor_spacing_says_what_to_write(text):
    with pytest.raises(Exception, match="anchors/N"):
        parse_key_rule(text)


def test_window_table_names_frames_of_the_whole_clip():
    table = key_frame_table(parse_key_rule("mid"), FRAMES, [16, 17])
    assert table.tolist() == [[11], [11]]
    table = key_frame_table(parse_key_rule("prev, first"), FRAMES, [8, 9])
    assert table.tolist() == [[7, 0], [8, 0]]


@pytest.mark.parametrize("rule, frames", [
    ("mid", (11,)),
    ("self, mid", (11,)),
    ("prev, first", (0,)),
    ("first, mid, last", (0, 11, 23)),
    ("anchors/8", (0, 8, 16, 23)),
    ("self", ()),
])
def test_shared_frames_are_the_named_frames_closed_under_the_rule(rule, frames):
    assert shared_frames(parse_key_rule(rule), FRAMES) == frames


def test_a_rule_whose_shared_frames_reach_every_frame_shares_none():
    # last -> prev of last -> ... -> frame 0: the closure is the clip itself.
    assert shared_frames(parse_key_rule("prev, last"), FRAMES, limit=8) == ()


def test_anchors_outnumbering_a_window_are_still_shared():
    # 300 frames, anchors every 16: 0, 16, ..., 288 and 299, 20 frames for windows of 16.
    anchors = shared_frames(parse_key_rule("anchors/16"), 300, limit=16)
    assert anchors == tuple(range(0, 300, 16)) + (299,)
    windows = [list(range(s, s + 16)) for s in range(0, 300 - 16, 12)] + [list(range(284, 300))]
    assert plan_windows(windows, parse_key_rule("anchors/16"), 300).exact


def test_mid_needs_only_the_key_pass():
    plan = plan_windows(STATIC_8_3, parse_key_rule("mid"), FRAMES)
    assert plan.shared == (11,)
    assert plan.exact and all(not k for k in plan.keep)


def test_prev_chains_through_earlier_windows_in_frame_order():
    plan = plan_windows(STATIC_8_3, parse_key_rule("prev, first"), FRAMES)
    # Window starts 5, 10, 15, 16 read frames 4, 9, 14, 15, computed last by windows 0, 1, 2, 3.
    assert plan.shared == (0,)
    assert plan.keep == (frozenset({4}), frozenset({9}), frozenset({14}), frozenset({15}), frozenset())
    assert plan.exact
    batched = plan_windows(BATCHED_8, parse_key_rule("prev, first"), FRAMES)
    assert batched.keep == (frozenset({7}), frozenset({15}), frozenset()) and batched.exact


def test_prev_into_a_window_not_run_yet_is_stood_in_for_and_reported():
    windows = [list(range(8, 16)), list(range(0, 8)), list(range(16, 24))]
    plan = plan_windows(windows, parse_key_rule("prev, first"), FRAMES)
    assert plan.stand_ins == ((0, 7, 8),)
    assert not plan.exact


def _layer(name="input_4_0", side=2, heads=2, channels=8):
    return LayerInfo(name, side, side, side * 2, side * 2, heads, channels)


@pytest.mark.parametrize("rule, windows", [("mid", STATIC_8_3), ("anchors/8", STATIC_8_3),
                                           ("first, mid, last", BATCHED_8)])
def test_windowed_capture_equals_the_one_batch_capture(rule, windows):
    """One self-attention layer: the key pass and the windows, as the host runs them, give every
    frame the one-batch attention output and fill the store with the one-batch tensors."""
    g = torch.Generator().manual_seed(0)
    layer = _layer()
    q, k, v = (torch.randn(FRAMES, layer.tokens, layer.channels, generator=g) for _ in range(3))
    config = CaptureConfig(num_frames=FRAMES, latent_size=(4, 4), sigmas=(0.0, 1.0),
                           key_rule=parse_key_rule(rule), min_st_channels=0, layer_set="relative+full")
    whole, windowed = (AttentionStore(config, "cpu", "fp32") for _ in range(2))
    expected = CaptureController(whole).attn1(q, k, v, AttnCall(layer, 0, ("cond",)))
    controller = CaptureController(windowed)
    plan = plan_windows(windows, config.key_rule, FRAMES)
    controller.shared_keys.begin(plan)
    controller.shared_keys.enter_key_pass()
    key = list(plan.shared)
    controller.attn1(q[key], k[key], v[key], AttnCall(layer, 0, ("cond",), tuple(key), True))
    out = torch.zeros_like(expected)
    for index, frames in enumerate(windows):
        controller.shared_keys.enter_window(index)
        out[frames] = controller.attn1(q[frames], k[frames], v[frames], AttnCall(layer, 0, ("cond",), tuple(frames)))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    for store in (whole, windowed):
        store.set_latents([torch.zeros(FRAMES, 4, 4, 4)] * 2)
        store.finish()
    for name in ("q", "k"):
        torch.testing.assert_close(windowed.get(0, layer.name, name), whole.get(0, layer.name, name), rtol=0, atol=0)


def test_window_key_table_appends_shared_frames_after_the_window():
    shared = SharedKeys()
    plan = plan_windows(BATCHED_8, parse_key_rule("mid"), FRAMES)
    shared.begin(plan)
    shared.enter_key_pass()
    k = torch.arange(FRAMES, dtype=torch.float32).view(FRAMES, 1, 1)
    shared.keep("l", "cond", [11], k[[11]], k[[11]] * 10)
    frames = tuple(range(16, 24))
    k_all, v_all, table, key_frames = window_key_table(plan.rule, FRAMES, frames, shared, "l", "cond",
                                                       k[list(frames)], k[list(frames)] * 10)
    assert table.tolist() == [[8]] * 8 and key_frames.tolist() == [[11]] * 8
    assert float(k_all[8]) == 11 and float(v_all[8]) == 110
    out = spatio_temporal_attention(torch.ones(8, 1, 2), torch.ones(9, 1, 2), v_all.expand(-1, -1, 2), 1, table)
    assert torch.all(out == 110)
