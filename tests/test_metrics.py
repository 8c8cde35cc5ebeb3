"""Video metrics on clips and embeddings built here (``fatezero_core.metrics``).

Clips: a smooth random texture (bicubic-upsampled noise) seen through a window that moves by a
whole number of pixels per frame, so frame ``t+1`` is frame ``t`` shifted by exactly ``s`` and the
pixels that enter at the border are the only ones frame ``t`` cannot explain; the same texture
standing still; and frames of independent noise. CLIP-style embeddings come from a seeded random
projection of 8x8-pooled pixels (a stand-in encoder: similar frames give similar embeddings).
Expected values are worked out from the definitions (Frame-Acc/Tem-Con as the official
``CLIP/frame_acc_tem_con.py`` computes them; warp error of Lai et al. 2018; SSIM of Wang et al.
2004).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fatezero_core import metrics
from fatezero_core.errors import MetricsError

H = W = 64
SHIFT = (2, 1)  # (dx, dy) pixels per frame


def texture(h: int, w: int, seed: int = 0, cell: int = 4) -> torch.Tensor:
    """``[h, w, 3]`` smooth random texture in 0..1."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, h // cell + 4, w // cell + 4, generator=g)
    fine = F.interpolate(coarse, scale_factor=cell, mode="bicubic", align_corners=False)
    return fine[0, :, :h, :w].clamp(0, 1).permute(1, 2, 0).contiguous()


def moving_video(frames: int = 6, shift=SHIFT, seed: int = 0) -> torch.Tensor:
    """Frame ``k`` is the window at ``(8 + dx*k, 8 + dy*k)``: ``frame[k+1](x) = frame[k](x + s)``."""
    dx, dy = shift
    big = texture(H + 16 + dy * frames, W + 16 + dx * frames, seed)
    return torch.stack([big[8 + dy * k:8 + dy * k + H, 8 + dx * k:8 + dx * k + W] for k in range(frames)])


def still_video(frames: int = 4) -> torch.Tensor:
    return texture(H, W, seed=3).expand(frames, -1, -1, -1).clone()


def noise_video(frames: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.rand(frames, H, W, 3, generator=torch.Generator().manual_seed(seed))


def embed(frames: torch.Tensor, dim: int = 32, seed: int = 5) -> torch.Tensor:
    """Stand-in image encoder: centred 8x8-pooled pixels times a seeded random matrix."""
    pooled = F.avg_pool2d(frames.permute(0, 3, 1, 2), 8).flatten(1) - 0.5
    proj = torch.randn(pooled.shape[1], dim, generator=torch.Generator().manual_seed(seed))
    return pooled @ proj


# --------------------------------------------------------------------------------------------
# CLIP preprocessing and the CLIP metrics
# --------------------------------------------------------------------------------------------


def test_clip_input_keeps_the_bottom_square_of_a_portrait_frame():
    frames = torch.zeros(2, 448, 224, 3)
    frames[:, 224:] = torch.rand(2, 224, 224, 3, generator=torch.Generator().manual_seed(0))
    out = metrics.clip_input(frames)
    assert out.shape == (2, 224, 224, 3)
    assert torch.equal(out, frames[:, 224:])  # already 224: no resize, the bottom square as it is


def test_clip_input_centre_crops_a_landscape_frame():
    frames = torch.rand(1, 224, 448, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(metrics.clip_input(frames), frames[:, :, 112:336])


def test_clip_input_resizes_the_short_side():
    frames = torch.zeros(1, 600, 300, 3)
    frames[:, 300:] = 1.0  # bottom square white, top black: only white may remain
    out = metrics.clip_input(frames)
    assert out.shape == (1, 224, 224, 3)
    assert torch.allclose(out, torch.ones_like(out), atol=1e-5)


def test_tem_con_of_hand_made_embeddings():
    embeds = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    mean, pairs = metrics.tem_con(embeds)
    assert pairs.tolist() == pytest.approx([0.0, 1 / math.sqrt(2)])
    assert mean == pytest.approx(0.5 / math.sqrt(2))


def test_identical_frames_give_tem_con_one():
    mean, pairs = metrics.tem_con(embed(still_video()))
    assert mean == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(pairs, torch.ones(3), atol=1e-6)


def test_frame_acc_is_the_official_softmax_rule_with_ties_counting():
    src, tgt = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    images = torch.tensor([[0.0, 1.0],    # the target: success
                           [1.0, 0.0],    # the source: failure
                           [1.0, 1.0],    # halfway: a tie, counts
                           [1.0, 0.99]])  # a little closer to the source: failure
    share, p_target, success = metrics.frame_acc(images, src, tgt)
    assert success.tolist() == [True, False, True, False]
    assert share == 0.5
    # p_target = softmax(100 * [cos_src, cos_tgt])[1] = 1 / (1 + exp(100 * (cos_src - cos_tgt)))
    cos = torch.tensor([1.0, 0.99]) / math.hypot(1.0, 0.99)
    expected = 1 / (1 + math.exp(100 * float(cos[0] - cos[1])))
    assert p_target[2] == pytest.approx(0.5)
    assert p_target[3] == pytest.approx(expected, rel=1e-4)


def test_clip_t_is_the_mean_cosine_with_the_target():
    images = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    mean, per_frame = metrics.clip_t(images, torch.tensor([2.0, 0.0]))
    assert per_frame.tolist() == pytest.approx([1.0, 1 / math.sqrt(2)])
    assert mean == pytest.approx((1 + 1 / math.sqrt(2)) / 2)


# --------------------------------------------------------------------------------------------
# Warping and the occlusion test on hand-made flows
# --------------------------------------------------------------------------------------------


def test_warp_samples_at_x_plus_flow():
    ramp = torch.arange(W, dtype=torch.float32).expand(1, 1, H, W).clone()
    flow = torch.zeros(1, 2, H, W)
    flow[:, 0] = 3.0
    out = metrics.warp(ramp, flow)
    assert torch.allclose(out[..., :W - 3], ramp[..., 3:], atol=1e-4)
    assert torch.allclose(out[..., W - 3:], torch.full_like(out[..., W - 3:], W - 1.0))  # edge pixel


def test_occlusion_test_keeps_consistent_flow_and_drops_the_rest():
    backward = torch.zeros(1, 2, H, W)
    backward[:, 0] = -2.0
    forward = torch.zeros(1, 2, H, W)
    forward[:, 0] = 2.0
    mask = metrics.occlusion_mask(forward, backward)[0, 0]
    # x - 2 must stay within half a pixel of the frame: columns 0 and 1 point outside
    assert mask[:, :2].sum() == 0 and bool((mask[:, 2:] == 1).all())
    # forward +5 does not undo backward -2: |(-2) + 5|^2 = 9 > 0.01 * (4 + 25) + 0.5
    forward[:, 0] = 5.0
    assert metrics.occlusion_mask(forward, backward).sum() == 0
    # +2.5: 0.25 <= 0.01 * (4 + 6.25) + 0.5 = 0.6025, still consistent
    forward[:, 0] = 2.5
    assert metrics.occlusion_mask(forward, backward)[0, 0, :, 2:].min() == 1


# --------------------------------------------------------------------------------------------
# Optical flow and warp error on clips
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", metrics.FLOW_METHODS)
def test_known_shift_is_recovered_and_explains_the_frames(method):
    clip = moving_video()
    forward, backward = metrics.optical_flows(clip, method)
    assert forward.shape == backward.shape == (5, 2, H, W)
    dx, dy = SHIFT
    # frame[t+1](x) = frame[t](x + s): the backward flow is +s, the forward flow -s
    assert backward[:, 0].median() == pytest.approx(dx, abs=0.05)
    assert backward[:, 1].median() == pytest.approx(dy, abs=0.05)
    assert forward[:, 0].median() == pytest.approx(-dx, abs=0.05)
    mask = metrics.occlusion_mask(forward, backward)
    # only the columns/rows entering at the right/bottom border are unexplained
    truth = torch.zeros(H, W)
    truth[:H - dy, :W - dx] = 1
    agree = (mask[:, 0] == truth).float().mean()
    assert agree >= 0.99, agree
    errors = metrics.warp_errors(clip, backward, mask)
    unwarped = (clip[1:] - clip[:-1]).abs().mean()
    assert float(errors.max()) < 0.02 * float(unwarped), (errors, unwarped)


@pytest.mark.parametrize("method", metrics.FLOW_METHODS)
def test_identical_frames_give_zero_warp_error(method):
    m = metrics.measure_video(still_video(), flow_method=method)
    assert m.kept_pixels == 1.0
    assert m.warp_error == pytest.approx(0.0, abs=1e-4)  # flow ~0: bilinear rounding only


def test_independent_noise_scores_clearly_worse_than_a_moving_clip():
    smooth, noise = moving_video(), noise_video()
    ms = metrics.measure_video(smooth, edit_embeds=embed(smooth))
    mn = metrics.measure_video(noise, edit_embeds=embed(noise))
    assert mn.warp_error > 20 * ms.warp_error, (mn.warp_error, ms.warp_error)
    # independent frames: centred random features, expected cosine 0; the moving clip's frames
    # share most of their content
    assert ms.tem_con > 0.5 > mn.tem_con, (ms.tem_con, mn.tem_con)


def test_shuffled_frames_have_more_warp_error_than_the_clip():
    clip = moving_video(frames=8)
    order = torch.tensor([3, 7, 0, 5, 2, 6, 1, 4])
    a = metrics.measure_video(clip, clip)
    b = metrics.measure_video(clip[order], clip[order])
    assert b.warp_error > 5 * a.warp_error


def test_flow_comes_from_the_source_frames():
    """An edit that keeps the source's motion has the source's low warp error; the same edit
    measured against a still source (a flow of zero) does not."""
    source = moving_video()
    edit = 1.0 - source  # a different look, the same motion
    moving = metrics.measure_video(edit, source)
    assert moving.flow_from == "source"
    assert moving.warp_error < 0.02 and moving.source_warp_error < 0.02
    still = metrics.measure_video(edit, still_video(6))
    assert still.warp_error > 5 * moving.warp_error


# --------------------------------------------------------------------------------------------
# Structure, the measurement, table, JSON, plot
# --------------------------------------------------------------------------------------------


def test_ssim_is_one_for_the_source_itself_and_low_for_noise():
    clip = moving_video()
    assert torch.allclose(metrics.structure_similarity(clip, clip), torch.ones(6), atol=1e-5)
    assert float(metrics.structure_similarity(clip, noise_video()).max()) < 0.2


def test_values_are_deterministic():
    clip, noise = moving_video(), noise_video()
    runs = [metrics.measure_video(noise, clip, edit_embeds=embed(noise), source_embeds=embed(clip),
                                  source_text=torch.ones(32), target_text=-torch.ones(32)).as_dict()
            for _ in range(2)]
    assert runs[0] == runs[1]


def test_full_measurement_fills_every_metric_and_table_row():
    source, edit = moving_video(), moving_video(seed=9)
    text_src, text_tgt = torch.randn(2, 32, generator=torch.Generator().manual_seed(2))
    m = metrics.measure_video(edit, source, edit_embeds=embed(edit), source_embeds=embed(source),
                              source_text=text_src, target_text=text_tgt)
    for name in ("tem_con", "source_tem_con", "frame_acc", "clip_t", "warp_error",
                 "source_warp_error", "ssim"):
        assert getattr(m, name) is not None and math.isfinite(getattr(m, name)), name
    assert len(m.warp_error_per_pair) == len(m.tem_con_per_pair) == 5
    assert len(m.ssim_per_frame) == len(m.clip_t_per_frame) == len(m.p_target_per_frame) == 6
    lines = {line.split("  ")[0]: line for line in m.table().splitlines()}
    for name, value in (("Tem-Con", m.tem_con), ("Frame-Acc", m.frame_acc), ("CLIP-T", m.clip_t),
                        ("warp error", m.warp_error), ("SSIM to source", m.ssim)):
        assert f"{value:.4f}" in lines[name], lines[name]
    assert f"{m.source_warp_error:.4f}" in lines["warp error"]
    data = m.as_dict()
    assert data["frame_acc"] == m.frame_acc and data["notes"] == []


def test_missing_inputs_leave_metrics_out_with_a_note():
    m = metrics.measure_video(moving_video())
    assert m.flow_from == "edit"
    assert m.tem_con is m.frame_acc is m.clip_t is m.ssim is m.source_warp_error is None
    assert any("source" in note for note in m.notes)
    row = {r[0]: r for r in m.rows()}
    assert row["Tem-Con"][1] is None and row["warp error"][1] == m.warp_error


def test_plot_is_an_image_of_four_panels():
    m = metrics.measure_video(moving_video())
    image = metrics.plot_metrics(m)
    assert image.shape == (1, 4 * metrics.PANEL_HEIGHT, metrics.PLOT_WIDTH, 3)
    assert image.dtype == torch.float32 and 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    edit = torch.tensor(metrics.EDIT_COLOUR, dtype=torch.float32) / 255
    panel = image[0, :metrics.PANEL_HEIGHT]
    lit = (panel - edit).abs().amax(-1) < 0.02
    assert lit.sum() > 50  # the warp error line is drawn in the edit colour
    assert ((image[0, metrics.PANEL_HEIGHT:] - edit).abs().amax(-1) < 0.02).sum() == 0  # nothing else


@pytest.mark.parametrize("edit, source, message", [
    (torch.rand(1, H, W, 3), None, "at least 2 frames"),
    (torch.rand(4, H, W, 3), torch.rand(3, H, W, 3), "4 frames but the source 3"),
    (torch.rand(4, H, W, 3), torch.rand(4, H, W + 8, 3), "64x64 but the source frames 72x64"),
    (torch.rand(4, H, W), None, "IMAGE batch"),
    (torch.rand(4, 8, 8, 3), None, "at least 16x16"),
])
def test_bad_frames_are_refused_with_what_to_change(edit, source, message):
    with pytest.raises(MetricsError, match=message):
        metrics.measure_video(edit, source)


def test_unknown_flow_method_is_refused():
    with pytest.raises(MetricsError, match="dis, farneback"):
        metrics.measure_video(moving_video(), flow_method="raft")
