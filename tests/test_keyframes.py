"""Key-frame rules (paper eq. 8; FateZero ``SparseCausalAttention.forward``) and layer levels /
layer sets (which layers are stored, fused and make the blend mask)."""

from __future__ import annotations

import pytest
import torch

from fatezero_core.errors import FateZeroError
from fatezero_core.keyframes import (
    format_key_rule,
    gather_key_frames,
    key_frame_table,
    key_frames_used,
    parse_frame_positions,
    parse_key_rule,
    place_rule,
    remap_table,
    rule_for_channels,
)
from fatezero_core.segments import plan_segment
from fatezero_core.layers import LayerInfo, LayerSet


def rows(rule, frames):
    return key_frame_table(parse_key_rule(rule), frames).tolist()


# ------------------------------------------------------------------ key_frame_table
def test_mid_is_frame_f_minus_1_over_2():
    assert rows("mid", 8) == [[3]] * 8
    assert rows("mid", 7) == [[3]] * 7
    assert rows("mid", 2) == [[0]] * 2


def test_self_mid():
    assert rows("self, mid", 8) == [[i, 3] for i in range(8)]


def test_prev_first():
    # frame 0 has no previous frame: it uses itself (clipped), as the official [-1, 'first']
    assert rows("prev, first", 5) == [[0, 0], [0, 0], [1, 0], [2, 0], [3, 0]]


def test_last_and_first():
    assert rows("last", 6) == [[5]] * 6
    assert rows("first, last", 3) == [[0, 2]] * 3


def test_offsets_are_clipped():
    assert rows([-2, 3], 5) == [[0, 3], [0, 4], [0, 4], [1, 4], [2, 4]]
    assert rows("next", 3) == [[1], [2], [2]]


def test_one_frame():
    for rule in ("mid", "self, mid", "prev, first", "last", [-3, 5]):
        table = key_frame_table(parse_key_rule(rule), 1)
        assert table.shape == (1, len(parse_key_rule(rule)))
        assert table.eq(0).all()


def test_table_is_long_f_by_k():
    t = key_frame_table(parse_key_rule("prev, first"), 8)
    assert t.dtype == torch.long and t.shape == (8, 2)


# ------------------------------------------------------------------ parse_key_rule
@pytest.mark.parametrize("text, expected", [
    ("mid", ("mid",)),
    ("middle", ("mid",)),
    ("[mid]", ("mid",)),
    ("prev, first", (-1, "first")),
    ("['prev', 'first']", (-1, "first")),
    ("self mid", (0, "mid")),
    ("Last", ("last",)),
    ("-1, first", (-1, "first")),
    ("next", (1,)),
    ("previous", (-1,)),
])
def test_parse_strings(text, expected):
    assert parse_key_rule(text) == expected


def test_parse_lists_and_ints():
    assert parse_key_rule(["prev", "first"]) == (-1, "first")
    assert parse_key_rule([-1, "first"]) == (-1, "first")
    assert parse_key_rule(("self", 2)) == (0, 2)
    assert parse_key_rule(-1) == (-1,)
    assert parse_key_rule(0) == (0,)


@pytest.mark.parametrize("bad", ["centre", "mid, second", ["prev", "frist"], "1.5"])
def test_parse_rejects_unknown_names(bad):
    with pytest.raises(FateZeroError, match="Unknown key-frame entry"):
        parse_key_rule(bad)


@pytest.mark.parametrize("empty", ["", "[]", []])
def test_parse_rejects_empty(empty):
    with pytest.raises(FateZeroError, match="empty"):
        parse_key_rule(empty)


def test_format_round_trips():
    for rule in ("mid", "prev, first", "self, mid", "last, 2, -3"):
        parsed = parse_key_rule(rule)
        assert parse_key_rule(format_key_rule(parsed)) == parsed
    assert format_key_rule((-1, "first")) == "prev, first"


# ------------------------------------------------------------------ gather_key_frames
def test_gather_key_frames_shape_and_content():
    frames, n, c = 4, 3, 2
    x = torch.arange(frames * n * c, dtype=torch.float32).view(frames, n, c)
    table = key_frame_table(parse_key_rule("prev, first"), frames)
    out = gather_key_frames(x, table)
    assert out.shape == (frames, 2 * n, c)
    for i in range(frames):
        expected = torch.cat([x[max(i - 1, 0)], x[0]])
        assert torch.equal(out[i], expected)


def test_gather_from_kept_frames_only():
    """Keys stored for the used frames only, gathered through the remapped table, are the same."""
    frames = 6
    x = torch.randn(frames, 5, 4)
    table = key_frame_table(parse_key_rule("mid, last"), frames)
    kept = key_frames_used(table)
    assert kept.tolist() == [2, 5]
    out = gather_key_frames(x.index_select(0, kept), remap_table(table, kept))
    assert torch.equal(out, gather_key_frames(x, table))


def test_key_frames_used_counts():
    assert key_frames_used(key_frame_table(("mid",), 8)).tolist() == [3]
    # frame 7 is nobody's previous frame
    assert key_frames_used(key_frame_table((-1, "first"), 8)).tolist() == list(range(7))
    assert key_frames_used(key_frame_table((0, "mid"), 8)).tolist() == list(range(8))


# ------------------------------------------------------------------ rule_for_channels
def test_rule_for_channels_threshold():
    rule = ("mid",)
    assert rule_for_channels(rule, 640, 640) == rule  # >= threshold: spatio-temporal
    assert rule_for_channels(rule, 1280, 640) == rule
    assert rule_for_channels(rule, 320, 640) == (0,)  # below: own frame only
    assert rule_for_channels(rule, 640, 1280) == (0,)
    assert key_frame_table(rule_for_channels(rule, 320, 640), 4).tolist() == [[0], [1], [2], [3]]


# ------------------------------------------------------------------ LayerInfo.level
def layer(side, latent=64, channels=640):
    lh, lw = (latent, latent) if isinstance(latent, int) else latent
    h, w = (side, side) if isinstance(side, int) else side
    return LayerInfo(f"l{h}x{w}", h, w, lh, lw, 8, channels)


@pytest.mark.parametrize("side, level", [(64, 0), (32, 1), (16, 2), (8, 3)])
def test_level_power_of_two(side, level):
    assert layer(side).level == level


@pytest.mark.parametrize("side, level", [(60, 0), (30, 1), (15, 2), (8, 3)])
def test_level_non_power_of_two(side, level):
    # a stride-2 conv with padding 1: 60 -> 30 -> 15 -> 8
    assert layer(side, latent=60).level == level


def test_level_non_square():
    # 512x768 px -> 64x96 latent; the grid height decides the level
    assert layer((16, 24), latent=(64, 96)).level == 2


def test_level_rejects_grid_that_is_no_downsampling():
    with pytest.raises(FateZeroError, match="not a downsampling"):
        layer(20, latent=64).level


# ------------------------------------------------------------------ LayerSet
def test_layer_set_relative():
    rule = LayerSet("relative")
    assert [rule.stores(layer(s)) for s in (64, 32, 16, 8)] == [False, True, True, True]
    # relative to the latent: at 1024 px (128 latent) the 64x64 level is stored, 128x128 is not
    assert [rule.stores(layer(s, 128)) for s in (128, 64, 32, 16)] == [False, True, True, True]
    assert [rule.stores(layer(s, 60)) for s in (60, 30, 15, 8)] == [False, True, True, True]


def test_layer_set_relative_full():
    rule = LayerSet("relative+full")
    assert all(rule.stores(layer(s)) for s in (64, 32, 16, 8))
    assert all(rule.stores(layer(s, 128)) for s in (128, 64, 32, 16))


def test_layer_set_official_is_absolute():
    rule = LayerSet("official")
    assert [rule.stores(layer(s)) for s in (64, 32, 16, 8)] == [False, True, True, True]
    # query length <= 1024 tokens regardless of the latent: at 1024 px only 32x32 and 16x16
    assert [rule.stores(layer(s, 128)) for s in (128, 64, 32, 16)] == [False, False, True, True]
    # at 256 px (32 latent) the full-resolution layer is stored too
    assert [rule.stores(layer(s, 32)) for s in (32, 16, 8, 4)] == [True, True, True, True]


def test_mask_layers_are_quarter_resolution():
    rule = LayerSet("relative")
    assert [rule.is_mask_layer(layer(s)) for s in (64, 32, 16, 8)] == [False, False, True, False]


# ------------------------------------------------------------------------------------------------
# A rule placed on a segment of a long clip
# ------------------------------------------------------------------------------------------------


def whole_clip_keys(rule, positions, clip_frames):
    """Independent reference: each loaded frame's key frames in the whole clip, by the plain rule."""
    table = key_frame_table(parse_key_rule(rule), clip_frames)
    return [table[p].tolist() for p in positions]


@pytest.mark.parametrize("rule", ["mid", "self, mid", "first, mid, last", "anchors/8", "anchors/5", "last"])
@pytest.mark.parametrize("segments", [2, 3])
def test_a_placed_rule_names_the_whole_clips_frames(rule, segments):
    clip_frames = 32
    for index in range(segments):
        plan = plan_segment(clip_frames, index, segments, rule)
        placed = place_rule(parse_key_rule(rule), plan.positions, clip_frames)
        table = key_frame_table(placed, len(plan.positions))
        got = [[plan.positions[k] for k in row] for row in table.tolist()]
        assert got == whole_clip_keys(rule, plan.positions, clip_frames)
        assert list(plan.span) == list(range(index * clip_frames // segments, (index + 1) * clip_frames // segments))
        assert plan.positions[plan.span_start:plan.span_start + plan.span_frames] == tuple(plan.span)


def test_mid_in_the_second_half_is_the_clips_middle_frame():
    plan = plan_segment(32, 1, 2, "mid")
    assert plan.positions == (15, *range(16, 32)) and plan.span_start == 1 and plan.span_frames == 16
    placed = place_rule(parse_key_rule("mid"), plan.positions, 32)
    assert key_frame_table(placed, 17)[:, 0].tolist() == [0] * 17  # loaded frame 0 is clip frame 15
    assert key_frame_table(parse_key_rule("mid"), 17)[:, 0].tolist() == [8] * 17  # unplaced: the segment's own


def test_an_offset_past_the_segment_reads_the_nearest_loaded_frame():
    plan = plan_segment(32, 1, 2, "prev, first")
    assert plan.positions == (0, *range(16, 32))
    table = key_frame_table(place_rule(parse_key_rule("prev, first"), plan.positions, 32), 17)
    assert table[1].tolist() == [1, 0]  # clip frame 16's prev (15) was not loaded: 16 stands in
    assert table[2].tolist() == [1, 0]


def test_placed_rule_text_round_trips_and_the_whole_clip_keeps_the_plain_rule():
    placed = place_rule(parse_key_rule("anchors/8"), (0, 8, *range(16, 32)), 32)
    text = format_key_rule(placed)
    assert text == "clip 32 frames 0, 8, 16-31: anchors/8"
    assert parse_key_rule(text) == placed
    assert place_rule(parse_key_rule("mid"), range(8), 8) == ("mid",)
    assert parse_frame_positions("") is None
    assert parse_frame_positions("clip 10 frames 0, 4-6") == (10, (0, 4, 5, 6))


@pytest.mark.parametrize("text", ["clip 10 frames 4-2", "clip 10 frames 3, 3", "clip 4 frames 0-4", "frames 1-2",
                                  "clip 10 frames x"])
def test_bad_frame_positions_say_how_to_write_them(text):
    with pytest.raises(FateZeroError, match="write 'clip N frames a-b, c'"):
        parse_frame_positions(text)


def test_a_placed_rule_on_another_batch_size_says_what_to_connect():
    placed = place_rule(parse_key_rule("mid"), (15, 16, 17), 32)
    with pytest.raises(FateZeroError, match="Connect the frame_positions"):
        key_frame_table(placed, 4)


def test_segments_that_do_not_fit_are_refused():
    with pytest.raises(FateZeroError, match="use 0 to 1"):
        plan_segment(8, 2, 2)
    with pytest.raises(FateZeroError, match="Use at most 8 segments"):
        plan_segment(8, 0, 9)
