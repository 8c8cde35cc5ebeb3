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
    parse_key_rule,
    remap_table,
    rule_for_channels,
)
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
