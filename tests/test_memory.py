"""What a real AttentionStore keeps for SD1.x shapes, against byte counts worked out from the shapes.

The official map store keeps, per inversion step, every cross map ``q x 77`` and self map
``q x K*q`` of the layers with ``q <= 32*32``, per frame and head, in fp16 (FateZero
``video_diffusion/prompt_attention/attention_store.py``, ``AttentionStore.forward``): for SD1.x at
512 px, 8 frames, 8 heads that is ``2 * 8 * 8 * sum_l q_l (77 + K q_l)`` = 777,265,152 B for K=1.
Ours keeps per stored layer the source queries of every frame, the source keys of the key frames the
rule uses and the cross-attention probabilities, plus one float32 latent per step.
"""

from __future__ import annotations

import pytest

from fatezero_core.keyframes import key_frame_table, key_frames_used, parse_key_rule
from tiny_models.store_probe import measure_one_step, sd1_stored_layers

# SD1.x at 512 px (64x64 latent), call order: input 4,5 (32x32, 640 channels), input 7,8 (16x16,
# 1280), middle (8x8, 1280), output 3,4,5 (16x16, 1280), output 6,7,8 (32x32, 640); 8 heads each.
SD1_512_STORED = ([(1024, 640, 8)] * 2 + [(256, 1280, 8)] * 2 + [(64, 1280, 8)]
                  + [(256, 1280, 8)] * 3 + [(1024, 640, 8)] * 3)


def official_bytes(frames, key_frames, heads=8):
    return 2 * frames * heads * sum(q * (77 + key_frames * q) for q, _, _ in SD1_512_STORED)


def compact_bytes(frames, kept):
    return 2 * sum(frames * q * c + kept * q * c + frames * h * q * 77 for q, c, h in SD1_512_STORED)


def latent_bytes(frames):
    return frames * 4 * 64 * 64 * 4  # float32


def test_official_store_at_512_px_is_the_published_size():
    assert official_bytes(8, 1) == 777_265_152
    assert official_bytes(8, 2) == 1_490_821_120


def test_sd1_stored_layers_at_512():
    assert sd1_stored_layers(64) == SD1_512_STORED
    assert sd1_stored_layers(64, "official") == SD1_512_STORED
    full = sd1_stored_layers(64, "relative+full")
    assert len(full) == 16 and full.count((4096, 320, 8)) == 5


def test_sd1_stored_layers_other_sizes():
    # 768 px (96 latent): relative keeps 1/2..1/8 (48, 24, 12); official only q <= 1024
    assert [q for q, _, _ in sd1_stored_layers(96)] == [48**2] * 2 + [24**2] * 2 + [12**2] + [24**2] * 3 + [48**2] * 3
    assert [q for q, _, _ in sd1_stored_layers(96, "official")] == [24**2] * 2 + [12**2] + [24**2] * 3
    # non-square and non-power-of-two: 480x640 px -> 60x80 latent -> 30x40, 15x20, 8x10
    assert [q for q, _, _ in sd1_stored_layers((60, 80))][:5] == [1200, 1200, 300, 300, 80]


@pytest.mark.parametrize("rule, kept", [("mid", 1), ("prev, first", 7)])
def test_store_keeps_the_bytes_worked_out_from_the_shapes(rule, kept):
    """One synthetic SD1.x step at 512 px captured into a real store (what store_memory.py prints)."""
    frames = 8
    assert len(key_frames_used(key_frame_table(parse_key_rule(rule), frames))) == kept  # frame 7 is nobody's previous
    measured = measure_one_step(rule, frames)
    assert measured["attention_bytes"] == compact_bytes(frames, kept)
    assert measured["latent_bytes_per_step"] == latent_bytes(frames) == 524_288
    assert measured["layers"] == len(SD1_512_STORED)
    # the targets: <= 0.2x the official store with attention, <= 0.01x with latents only
    official = official_bytes(frames, len(parse_key_rule(rule)))
    assert (measured["attention_bytes"] + latent_bytes(frames)) / official <= 0.2
    assert latent_bytes(frames) / official <= 0.01
