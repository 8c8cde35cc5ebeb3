"""The mask preview of FateZero Sample, checked pixel by pixel against its description.

README, FateZero Sample: "a per-frame preview: the blend mask (left, white = may change) and the
edited words' source attention (right)". The image has the decoded frames' size per half (8 pixels
per latent cell, SD1's VAE); the attention is shown divided by each frame's maximum (the official
``SpatialBlender.get_mask`` normalisation, ``video_diffusion/prompt_attention/spatial_blend.py``) and the mask is the eq. 6 mask of the blend words at the latent size.
"""

from __future__ import annotations

import types

import torch

from fatezero_core.edit_maps import preview_image

LATENT = (4, 6)


def maps_with(word_map, blend_tokens=(2,), threshold=0.3, soft=False):
    settings = types.SimpleNamespace(blend_tokens=blend_tokens, blend_threshold=threshold, soft_mask=soft)
    return types.SimpleNamespace(preview_map=word_map, settings=settings)


def expected_image(mask, heat):
    """``[F, 8h, 16w, 3]`` from ``[F, h, w]`` latent-size halves, one pixel at a time."""
    frames, h, w = mask.shape
    out = torch.zeros(frames, 8 * h, 16 * w, 3)
    for f in range(frames):
        for y in range(8 * h):
            for x in range(16 * w):
                half, cx = (mask, x) if x < 8 * w else (heat, x - 8 * w)
                out[f, y, x, :] = half[f, y // 8, cx // 8]
    return out


def word_maps():
    """Frame 0: one peak cell (value 4) and a weak cell; frame 1: all zero."""
    word_map = torch.zeros(2, *LATENT)
    word_map[0, 1, 1] = 4.0
    word_map[0, 3, 5] = 1.0
    return word_map


def test_left_is_the_blend_mask_and_right_the_normalised_attention():
    word_map = word_maps()
    # Mask: the 3x3 neighbourhood of the peak (max-pool, then 4 / 4 > 0.3); the weak cell's
    # neighbourhood has 1 / 4 = 0.25, below the threshold. The zero frame stays black.
    mask = torch.zeros(2, *LATENT)
    mask[0, 0:3, 0:3] = 1.0
    heat = torch.zeros(2, *LATENT)
    heat[0, 1, 1] = 1.0
    heat[0, 3, 5] = 0.25
    got = preview_image(maps_with(word_map), 2, LATENT)
    assert got.shape == (2, 32, 96, 3) and got.dtype == torch.float32
    assert torch.equal(got, expected_image(mask, heat))


def test_a_lower_threshold_and_a_soft_mask_grow_the_mask():
    word_map = word_maps()
    hard = preview_image(maps_with(word_map, threshold=0.2), 2, LATENT)
    mask = torch.zeros(2, *LATENT)
    mask[0, 0:3, 0:3] = 1.0
    mask[0, 2:4, 4:6] = 1.0  # 0.25 > 0.2
    heat = torch.zeros(2, *LATENT)
    heat[0, 1, 1], heat[0, 3, 5] = 1.0, 0.25
    assert torch.equal(hard, expected_image(mask, heat))

    soft = preview_image(maps_with(word_map, threshold=0.2, soft=True), 2, LATENT)
    ramp = torch.zeros(2, *LATENT)
    ramp[0, 0:3, 0:3] = 1.0
    ramp[0, 2:4, 4:6] = (0.25 - 0.2) / 0.8  # 0 at the threshold, 1 at the frame's peak
    assert torch.allclose(soft, expected_image(ramp, heat))


def test_without_blend_words_the_left_half_is_black():
    word_map = word_maps()
    got = preview_image(maps_with(word_map, blend_tokens=None), 2, LATENT)
    heat = torch.zeros(2, *LATENT)
    heat[0, 1, 1], heat[0, 3, 5] = 1.0, 0.25
    assert torch.equal(got, expected_image(torch.zeros(2, *LATENT), heat))


def test_a_coarser_attention_map_is_shown_at_the_latent_size():
    """The mask layers are at 1/4 of the latent size: each attention cell covers 2x2 latent cells
    here (a 2x3 map for a 4x6 latent), in the mask and in the heat map."""
    word_map = torch.tensor([[[0.0, 2.0, 0.0], [0.0, 0.0, 1.0]]])
    heat = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 0.0, 0.5]]]).repeat_interleave(2, 1).repeat_interleave(2, 2)
    # max-pool 3x3 at the map's own size: every cell sees the peak 2 -> all > 0.3 after normalising
    mask = torch.ones(1, *LATENT)
    got = preview_image(maps_with(word_map), 1, LATENT)
    assert torch.equal(got, expected_image(mask, heat))


def test_no_preview_map_gives_a_black_image_of_the_frames_size():
    for maps in (None, maps_with(None)):
        got = preview_image(maps, 3, LATENT)
        assert got.shape == (3, 32, 96, 3)
        assert not got.any()
