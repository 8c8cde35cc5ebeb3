"""Store-size formulas (fatezero_core.memory) against the reference doc and a real AttentionStore."""

from __future__ import annotations

import pytest

from fatezero_core.keyframes import key_frame_table, key_frames_used, parse_key_rule
from fatezero_core.memory import (
    compact_store_bytes_per_step,
    official_map_store_bytes_per_step,
    recompute_store_bytes_per_step,
    sd1_stored_layers,
)
from tiny_models.store_probe import measure_one_step

SD1_512_QUERIES = [1024] * 2 + [256] * 2 + [64] + [256] * 3 + [1024] * 3


# ------------------------------------------------------------------ official formula
def test_official_formula_matches_reference_doc():
    """Reference doc section 2: f=8, H=8, fp16, SD1.x at 512 px."""
    assert official_map_store_bytes_per_step(8, 8, SD1_512_QUERIES, 1) == 777_265_152
    assert official_map_store_bytes_per_step(8, 8, SD1_512_QUERIES, 2) == 1_490_821_120
    # its parts: self 713.6 MB, cross 63.7 MB; fp32 doubles; f=32 is 3.11 GB
    cross = 2 * 8 * 8 * sum(q * 77 for q in SD1_512_QUERIES)
    assert round((777_265_152 - cross) / 1e6, 1) == 713.6 and round(cross / 1e6, 1) == 63.7
    assert official_map_store_bytes_per_step(8, 8, SD1_512_QUERIES, 1, bytes_per_value=4) == 2 * 777_265_152
    assert round(official_map_store_bytes_per_step(32, 8, SD1_512_QUERIES, 1) / 1e9, 2) == 3.11


def test_sd1_stored_layers_at_512():
    expected = ([(1024, 640, 8)] * 2 + [(256, 1280, 8)] * 2 + [(64, 1280, 8)]
                + [(256, 1280, 8)] * 3 + [(1024, 640, 8)] * 3)
    assert sd1_stored_layers(64) == expected
    assert sd1_stored_layers(64, "official") == expected
    full = sd1_stored_layers(64, "relative+full")
    assert len(full) == 16 and full.count((4096, 320, 8)) == 5
    assert [q for q, _, _ in sd1_stored_layers(64)] == SD1_512_QUERIES


def test_sd1_stored_layers_other_sizes():
    # 768 px (96 latent): relative keeps 1/2..1/8 (48, 24, 12); official only q <= 1024
    assert [q for q, _, _ in sd1_stored_layers(96)] == [48**2] * 2 + [24**2] * 2 + [12**2] + [24**2] * 3 + [48**2] * 3
    assert [q for q, _, _ in sd1_stored_layers(96, "official")] == [24**2] * 2 + [12**2] + [24**2] * 3
    # non-square and non-power-of-two: 480x640 px -> 60x80 latent -> 30x40, 15x20, 8x10
    assert [q for q, _, _ in sd1_stored_layers((60, 80))][:5] == [1200, 1200, 300, 300, 80]


def test_compact_formula_by_hand():
    # one layer, q=4, C=8, H=2, f=3, K kept 1: 3*4*8 + 1*4*8 + 3*2*4*77 values, fp16
    assert compact_store_bytes_per_step(3, [(4, 8, 2)], 1) == 2 * (96 + 32 + 1848)
    assert compact_store_bytes_per_step(3, [(4, 8, 2)], 1, bytes_per_value=4, tokens=10) == 4 * (96 + 32 + 240)


def test_recompute_formula():
    assert recompute_store_bytes_per_step(8, 64, 64) == 8 * 4 * 64 * 64 * 4 == 524_288


def test_design_targets_hold_at_512_px_8_frames():
    layers = sd1_stored_layers(64)
    official = official_map_store_bytes_per_step(8, 8, [q for q, _, _ in layers], 1)
    latent = recompute_store_bytes_per_step(8, 64, 64)
    assert (compact_store_bytes_per_step(8, layers, 1) + latent) / official <= 0.2
    assert latent / official <= 0.01


# --------------------------------------------------- formula == measured AttentionStore
@pytest.mark.parametrize("rule", ["mid", "prev, first"])
def test_compact_formula_equals_measured_store(rule):
    frames = 8
    kept = len(key_frames_used(key_frame_table(parse_key_rule(rule), frames)))
    assert kept == {"mid": 1, "prev, first": 7}[rule]  # frame 7 is nobody's previous frame
    # the measurement store_memory.py prints: one synthetic SD1.x step at 512 px captured into a real store
    measured = measure_one_step(rule, frames)
    formula = compact_store_bytes_per_step(frames, sd1_stored_layers(64), kept)
    assert measured["attention_bytes"] == formula
    assert measured["latent_bytes_per_step"] == recompute_store_bytes_per_step(frames, 64, 64)
    assert measured["layers"] == len(sd1_stored_layers(64))
    official = official_map_store_bytes_per_step(frames, 8, SD1_512_QUERIES, len(parse_key_rule(rule)))
    assert formula / official < 0.2
