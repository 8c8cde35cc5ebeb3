"""FateZero under ComfyUI's core context windows (``Context Windows (Manual)`` on the MODEL).

With per-frame statistics (``group_norm=frame``) and key frames shared by every window, a windowed
inversion and edit equal the one-batch ones: the shared key frames run once per model evaluation
(the key pass) and every window attends to exactly their keys and values; ``prev`` reaches into
the previous window under schedules that run windows in frame order. References are the same
nodes on the same model without windows.
"""

from __future__ import annotations

import logging

import pytest
import torch

from test_invert_sample import calm, empty, settings

pytestmark = pytest.mark.usefixtures("host_inference_mode")

FRAMES = 24
LATENT = 8  # 64 px: levels 8/4/2/1, the 1/4-resolution mask layers exist
STEPS = 4
TOLERANCE = 1e-5  # fp32; the latents are of order 1 (max about 5)


@pytest.fixture
def model(tiny_sd15):
    """The tiny SD1.5 model with a small eps (``calm``): a random UNet is chaotic in its input, and
    float rounding, which differs with the batch size, would grow over the steps."""
    return calm(tiny_sd15)


def clip_latent(frames=FRAMES, size=LATENT, seed=0):
    """Correlated frames: one random field shifted by a cell per frame."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, 4, size, size + frames, generator=g)
    return torch.cat([base[..., i:i + size] for i in range(frames)])


def windowed(model, length=8, overlap=0, schedule="standard_static", fuse="pyramid"):
    from comfy_extras.nodes_context_windows import ContextWindowsManualNode

    out = ContextWindowsManualNode.execute(model, context_length=length, context_overlap=overlap,
                                           context_schedule=schedule, context_stride=1,
                                           closed_loop=False, fuse_method=fuse, dim=0)
    return out.args[0] if hasattr(out, "args") else out[0]


def edit(nodes, model, clip, key_frames, placement="cpu", group_norm="frame", latent=None, cfg=7.5,
         **spec_options):
    """Invert + FateZero Sample; returns (inverted latent, edited latent, mask preview)."""
    latent = clip_latent() if latent is None else latent
    options = dict(blend_words="cat")
    options.update(spec_options)
    src, tgt, spec = settings(nodes, clip, **options)
    inverted, store = nodes.invert.FateZeroDDIMInvert.execute(
        model=model, source=src, latent={"samples": latent}, steps=STEPS, key_frames=key_frames,
        st_min_channels=0, store_placement=placement, store_dtype="fp32", layer_set="relative",
        schedule_end="comfy", group_norm=group_norm).args
    out, preview = nodes.sample.FateZeroSample.execute(
        model=model, positive=tgt, negative=empty(clip), latent=inverted, attention_store=store,
        blend_settings=spec, cfg=cfg, fusion=True).args
    return inverted["samples"], out["samples"], preview


def max_difference(a, b):
    return float((a - b).abs().max())


def report_difference(case: str, ours, reference) -> None:
    """Print how far a windowed edit is from the one-batch one (the README states it), and check
    it is an edit of the same clip, not noise."""
    scale = float(reference.abs().max())
    difference = max_difference(ours, reference)
    print(f"{case}: max |windowed - one batch| = {difference:.3g} (edited latent max {scale:.3g})")
    assert torch.isfinite(ours).all()
    assert difference < scale


_references: dict = {}


def one_batch(nodes, model, clip, key_frames, **kw):
    key = (key_frames, tuple(sorted(kw.items())))
    if key not in _references:
        _references[key] = edit(nodes, model, clip, key_frames, **kw)
    return _references[key]


CASES = [
    # (key frames, schedule, overlap, store placement)
    ("mid", "standard_static", 0, "cpu"),
    ("mid", "standard_static", 3, "cpu"),
    ("mid", "standard_uniform", 3, "cpu"),
    ("first, mid, last", "standard_uniform", 0, "cpu"),
    ("anchors/8", "standard_static", 3, "cpu"),
    ("anchors/8", "standard_uniform", 3, "cpu"),
    ("prev, first", "standard_static", 0, "cpu"),
    ("prev, first", "standard_static", 3, "cpu"),
    ("prev, first", "batched", 0, "cpu"),
    ("mid", "standard_static", 3, "recompute"),
    ("mid", "standard_uniform", 3, "recompute"),
    ("anchors/8", "standard_static", 0, "recompute"),
    ("prev, first", "standard_static", 3, "recompute"),
]


@pytest.mark.parametrize("key_frames, schedule, overlap, placement", CASES)
def test_windowed_edit_equals_the_one_batch_edit(nodes, model, tiny_clip, key_frames, schedule,
                                                 overlap, placement):
    reference = one_batch(nodes, model, tiny_clip, key_frames)
    ours = edit(nodes, windowed(model, 8, overlap, schedule), tiny_clip, key_frames, placement)
    inverted, edited, preview = ours
    assert max_difference(inverted, reference[0]) < TOLERANCE
    assert max_difference(edited, reference[1]) < TOLERANCE
    assert max_difference(preview, reference[2]) < TOLERANCE
    assert max_difference(reference[1], reference[0]) > 1e-2  # the edit did something


@pytest.mark.parametrize("schedule, fuse", [("standard_static", "relative"), ("standard_static", "flat"),
                                             ("looped_uniform", "overlap-linear")])
def test_any_fuse_method_and_looped_windows(nodes, model, tiny_clip, schedule, fuse):
    """Frames in several windows get the same output from each, so any fuse method gives it back;
    looped windows wrap around the clip's end and still attend to the clip's middle frame."""
    reference = one_batch(nodes, model, tiny_clip, "mid")
    ours = edit(nodes, windowed(model, 8, 3, schedule, fuse), tiny_clip, "mid")
    assert max_difference(ours[1], reference[1]) < TOLERANCE


@pytest.mark.parametrize("placement", ["cpu", "recompute"])
def test_local_latent_blend_across_windows(nodes, model, tiny_clip, placement):
    """The latent blend's masks (source words from the store, target words summed per frame over
    the windows) are the one-batch masks. At 128 px the 1/4-resolution maps are 4x4, so the mask
    does not cover the whole frame (at 64 px the 3x3 dilation of a 2x2 map does), and the random
    model's maps are flat enough that only a high threshold leaves part of the frame out."""
    latent = clip_latent(size=16)
    options = dict(local_latent_blend=True, target_blend_words="dog", blend_threshold=0.9)
    if placement not in _references:
        _references[placement] = (edit(nodes, model, tiny_clip, "mid", latent=latent, **options),
                                  edit(nodes, model, tiny_clip, "mid", latent=latent, blend_threshold=0.9))
    reference, plain = _references[placement]
    ours = edit(nodes, windowed(model, 8, 3), tiny_clip, "mid", placement, latent=latent, **options)
    assert max_difference(ours[1], reference[1]) < TOLERANCE
    assert max_difference(plain[1], reference[1]) > 1e-3  # the blend changed the edit


def test_prev_under_an_unordered_schedule_warns_and_differs(nodes, model, tiny_clip, caplog):
    """standard_uniform shifts its windows every step, so a window may reach back into frames no
    earlier window computed: the nearest frame stands in, and the node says so."""
    reference = one_batch(nodes, model, tiny_clip, "prev, first")
    with caplog.at_level(logging.WARNING, logger="comfyui-fatezero"):
        ours = edit(nodes, windowed(model, 8, 3, "standard_uniform"), tiny_clip, "prev, first")
    assert any("stands in" in r.getMessage() for r in caplog.records)
    difference = max_difference(ours[1], reference[1])
    print(f"prev, first under standard_uniform (8/3): max |windowed - one batch| = {difference:.3g}")
    assert torch.isfinite(ours[1]).all()


def test_clip_level_group_norm_in_windows_is_measured(nodes, model, tiny_clip):
    """group_norm=clip pools the statistics over the window the UNet sees, not over the clip: the
    windowed edit differs from the one-batch one, by the amount the README states."""
    reference = one_batch(nodes, model, tiny_clip, "mid", group_norm="clip")
    ours = edit(nodes, windowed(model, 8, 3), tiny_clip, "mid", group_norm="clip")
    report_difference("group_norm=clip, mid, windows 8/3", ours[1], reference[1])


def test_windows_leave_the_model_and_a_second_run_alike(nodes, model, tiny_clip):
    """The node's MODEL keeps its handler untouched (the pack registers its callbacks on its own
    clone's copy), and the same graph queued twice gives the same edit."""
    model = windowed(model, 8, 3)
    handler = model.model_options["context_handler"]
    first = edit(nodes, model, tiny_clip, "mid")
    second = edit(nodes, model, tiny_clip, "mid")
    assert handler.callbacks == {}
    assert torch.equal(first[1], second[1])


@pytest.mark.parametrize("placement", ["cpu", "recompute"])
def test_a_clip_shorter_than_a_window_runs_in_one_batch(nodes, model, tiny_clip, placement):
    latent = clip_latent(frames=6)
    reference = edit(nodes, model, tiny_clip, "mid", latent=latent)
    ours = edit(nodes, windowed(model, 8), tiny_clip, "mid", placement, latent=latent)
    assert max_difference(ours[1], reference[1]) < TOLERANCE


def test_tune_a_video_model_in_windows_is_measured(nodes, model, tiny_clip, tmp_path, monkeypatch):
    """A Tune-A-Video model's temporal attention and clip-level norms see the frames of the window,
    as AnimateDiff's motion modules do: the windowed edit differs from the one-batch one, by the
    amount the README states."""
    import folder_paths
    from test_tav_loader import add_temporal, diffusers_unet, save

    folder = tmp_path / "tuneavideo"
    folder.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "tuneavideo", ([str(folder)], set()))
    name = save(add_temporal(diffusers_unet(model), gain=0.2), folder / "t.safetensors")
    tav = nodes.tav_loader.FateZeroTuneAVideoLoader.execute(checkpoint=name, base_model=model).args[0]
    reference = edit(nodes, tav, tiny_clip, "auto", group_norm="clip")
    ours = edit(nodes, windowed(tav, 8, 3), tiny_clip, "auto", group_norm="clip")
    report_difference("Tune-A-Video (prev, first), windows 8/3", ours[1], reference[1])


def test_per_frame_controlnet_hint_follows_the_windows(nodes, model, tiny_clip):
    """ControlNet with one hint image per frame, on the source (inversion) and on the target
    (edit): in windows every window's ControlNet sees its own frames' hints, so the windowed edit
    equals the one-batch edit with the same hints."""
    import nodes as core_nodes
    from test_controlnet_edit import build_tiny_controlnet

    hint = torch.rand(FRAMES, LATENT * 8, LATENT * 8, 3, generator=torch.Generator().manual_seed(3))
    control = build_tiny_controlnet()
    src, tgt, spec = settings(nodes, tiny_clip, blend_words="cat")
    neg = empty(tiny_clip)
    apply = core_nodes.ControlNetApplyAdvanced().apply_controlnet
    src_cn, _ = apply(src, neg, control, hint, 0.5, 0.0, 1.0, vae=None)
    tgt_cn, neg_cn = apply(tgt, neg, control, hint, 0.5, 0.0, 1.0, vae=None)

    def run(m):
        inverted, store = nodes.invert.FateZeroDDIMInvert.execute(
            model=m, source=src_cn, latent={"samples": clip_latent()}, steps=STEPS, key_frames="mid",
            st_min_channels=0, store_placement="cpu", store_dtype="fp32", layer_set="relative",
            schedule_end="comfy", group_norm="frame").args
        out, _ = nodes.sample.FateZeroSample.execute(
            model=m, positive=tgt_cn, negative=neg_cn, latent=inverted, attention_store=store,
            blend_settings=spec, cfg=7.5, fusion=True).args
        return out["samples"]

    reference = run(model)
    ours = run(windowed(model, 8, 3))
    assert max_difference(ours, reference) < TOLERANCE
    assert max_difference(reference, one_batch(nodes, model, tiny_clip, "mid")[1]) > 1e-2  # the hint acts
