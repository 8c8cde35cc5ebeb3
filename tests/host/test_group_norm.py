"""Clip-level GroupNorm in a real ComfyUI: the pack's network equals the official inflated UNet's.

The reference is written from the official layer, not from the pack: a copy of the tiny SD1.5 UNet
whose ResNet ``in_layers``/``out_layers`` norms and output norm are replaced by a hand-written
GroupNorm over ``[b, c, f, h, w]`` (mean and biased variance over each channel group of every
frame of the clip, then the per-channel affine), i.e. what ``torch.nn.GroupNorm`` computes on the
5-D tensors of FateZero's ``ResnetBlockPseudo3D`` and ``conv_norm_out``. The reference model runs
the pack's nodes with ``group_norm='frame'`` (nothing added), the pack with ``'clip'``.
"""

from __future__ import annotations

import pytest
import torch

from test_invert_sample import FRAMES, calm, empty, invert, moving_latent, sample, settings

pytestmark = pytest.mark.usefixtures("host_inference_mode")

TOL = 1e-5  # max |difference| / mean |reference|, fp32
STEPS = 4


class NaiveVideoGroupNorm(torch.nn.Module):
    """GroupNorm with statistics over each clip of ``frames`` frames, written out."""

    def __init__(self, norm: torch.nn.GroupNorm, frames: int):
        super().__init__()
        self.groups, self.eps, self.frames = norm.num_groups, norm.eps, frames
        self.weight, self.bias = norm.weight, norm.bias

    def forward(self, x):
        n, c, h, w = x.shape
        clips = x.reshape(n // self.frames, self.frames, c, h, w).permute(0, 2, 1, 3, 4)  # [b, c, f, h, w]
        g = clips.reshape(n // self.frames, self.groups, -1)
        mean = g.mean(-1, keepdim=True)
        var = ((g - mean) ** 2).mean(-1, keepdim=True)
        y = ((g - mean) / torch.sqrt(var + self.eps)).reshape(clips.shape)
        y = y * self.weight.view(1, c, 1, 1, 1) + self.bias.view(1, c, 1, 1, 1)
        return y.permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


def official_network(frames: int = FRAMES):
    """A fresh tiny SD1.5 ModelPatcher whose ResNet and output norms are the naive clip norms."""
    import tiny_models
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

    model = tiny_models.build_tiny_sd15()
    unet = model.model.diffusion_model
    replaced = 0
    for module in list(unet.modules()):
        if isinstance(module, ResBlock):
            module.in_layers[0] = NaiveVideoGroupNorm(module.in_layers[0], frames)
            module.out_layers[0] = NaiveVideoGroupNorm(module.out_layers[0], frames)
            replaced += 2
    unet.out[0] = NaiveVideoGroupNorm(unet.out[0], frames)
    assert replaced == 2 * 22  # SD1.5: 8 encoder, 2 middle and 12 decoder ResNet blocks
    return model


def chunk_spy(model):
    """A clone of ``model`` recording the number of clips of every UNet call."""
    from comfy.patcher_extension import WrappersMP

    calls = []

    def spy(executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        calls.append(len(transformer_options["cond_or_uncond"]))
        return executor(x, timesteps, context, y, control, transformer_options, **kwargs)

    clone = model.clone()
    clone.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "test_spy", spy)
    return clone, calls


@pytest.fixture
def separate_cond_calls(monkeypatch):
    """ComfyUI batches cond and uncond into one UNet call when memory allows; with no free memory
    reported it runs them one by one."""
    import comfy.samplers

    monkeypatch.setattr(comfy.samplers.model_management, "get_free_memory", lambda *a, **k: 0)


def edit_pair(nodes, clip, model, reference, placement="cpu", cfg=7.5):
    """(pack, reference) edited latents and the pack's inversion latents, same inputs."""
    latent = moving_latent()
    src, tgt, spec = settings(nodes, clip, blend_words="cat", target_blend_words="dog",
                              local_latent_blend=True, mode="replace")
    neg = empty(clip)
    out = []
    for network, norm in ((model, "clip"), (reference, "frame")):
        inverted, store = invert(nodes, network, src, latent, steps=STEPS, store_placement=placement,
                                 group_norm=norm)
        assert store.config.group_norm == norm
        edited, _ = sample(nodes, network, tgt, neg, inverted, store, spec, cfg=cfg)
        out.append((inverted["samples"], edited["samples"]))
    return out


def max_rel(a, b):
    value = float((a - b).abs().max() / b.abs().mean())
    print(f"max |a - b| / mean |b| = {value:.3g}")
    return value


def test_reference_network_is_not_the_per_frame_network(nodes, tiny_sd15, tiny_clip):
    """Guard: on this model and clip, per-frame and clip-level norms give clearly other latents."""
    latent = moving_latent()
    src, _, _ = settings(nodes, tiny_clip)
    per_frame, _ = invert(nodes, calm(tiny_sd15), src, latent, steps=STEPS, group_norm="frame")
    official, _ = invert(nodes, calm(official_network()), src, latent, steps=STEPS, group_norm="frame")
    assert max_rel(per_frame["samples"], official["samples"]) > 1e-2


def test_inversion_and_cfg_edit_equal_the_official_network(nodes, tiny_sd15, tiny_clip):
    model, calls = chunk_spy(calm(tiny_sd15))
    (inv, ours), (inv_ref, ref) = edit_pair(nodes, tiny_clip, model, calm(official_network()))
    assert max_rel(inv, inv_ref) < TOL
    assert max_rel(ours, ref) < TOL
    assert 2 in calls  # cond and uncond ran in one UNet call: two clips in one batch


def test_cond_and_uncond_in_separate_calls(nodes, tiny_sd15, tiny_clip, separate_cond_calls):
    model, calls = chunk_spy(calm(tiny_sd15))
    (inv, ours), (inv_ref, ref) = edit_pair(nodes, tiny_clip, model, calm(official_network()))
    assert set(calls) == {1}
    assert max_rel(inv, inv_ref) < TOL and max_rel(ours, ref) < TOL


def test_recompute_equals_the_official_network(nodes, tiny_sd15, tiny_clip):
    (_, ours), (_, ref) = edit_pair(nodes, tiny_clip, calm(tiny_sd15), calm(official_network()),
                                    placement="recompute")
    assert max_rel(ours, ref) < TOL


def test_frame_mode_adds_nothing_and_clip_mode_leaves_the_input_model_alone(nodes, tiny_sd15, tiny_clip):
    latent = moving_latent()
    src, tgt, spec = settings(nodes, tiny_clip)
    before = dict(tiny_sd15.object_patches)
    _, store = invert(nodes, tiny_sd15, src, latent)  # default: clip
    assert store.config.group_norm == "clip"
    assert tiny_sd15.object_patches == before and "fatezero_group_norm" not in tiny_sd15.model_options.get(
        "transformer_options", {})
    assert nodes.video_runtime.with_group_norm(tiny_sd15, "frame") is tiny_sd15
    video_norm_model = nodes.video_runtime.with_group_norm(tiny_sd15, "clip")
    assert video_norm_model is not tiny_sd15
    assert len(video_norm_model.object_patches) == 2 * 22 + 1


def test_batch_that_is_not_whole_videos_is_refused(nodes, tiny_sd15):
    """Two clips declared for a batch of 3 latents: a clear error, never a silent per-frame norm."""
    from comfyui_fatezero.fatezero_core.errors import FateZeroError

    model = nodes.video_runtime.with_group_norm(tiny_sd15, "clip")
    runtime = nodes.video_runtime.video_runtime(model)
    norm = model.get_model_object("diffusion_model.out")
    with runtime.frames.running(2), pytest.raises(FateZeroError, match="cannot hold 2 whole clips"):
        norm(torch.randn(3, 32, 4, 4))


def test_sample_uses_the_store_choice(nodes, tiny_sd15, tiny_clip):
    """A store inverted per frame is edited per frame (fusion off: the core DDIM path bit for bit),
    one inverted over the clip is edited over the clip."""
    import nodes as core_nodes

    latent = moving_latent()
    src, tgt, spec = settings(nodes, tiny_clip)
    neg = empty(tiny_clip)
    for norm, network in (("frame", tiny_sd15), ("clip", nodes.video_runtime.with_group_norm(tiny_sd15, "clip"))):
        inverted, store = invert(nodes, tiny_sd15, src, latent, group_norm=norm)
        ours, _ = sample(nodes, tiny_sd15, tgt, neg, inverted, store, spec, cfg=7.5, fusion=False)
        (core,) = core_nodes.KSamplerAdvanced().sample(
            network, "disable", 0, store.config.num_steps, 7.5, "ddim", "ddim_uniform", tgt, neg,
            inverted, 0, store.config.num_steps, "disable")
        assert torch.equal(ours["samples"], core["samples"]), norm
