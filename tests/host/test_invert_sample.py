"""DDIM Invert + FateZero Sample in-process on a tiny SD1.5-topology model (real ComfyUI host)."""

from __future__ import annotations

import copy

import pytest
import torch

from ids import placement_id

FRAMES = 4
LATENT = 16  # 128 px frames: levels 16/8/4/2, so the 1/4-resolution mask layers exist
STEPS = 10  # 1000 mod 10 == 0: ComfyUI's ddim_uniform has the same sigmas as the official ones
SOURCE = "a cat sitting on a wooden table"
TARGET = "a dog sitting on a wooden table"


pytestmark = pytest.mark.usefixtures("host_inference_mode")


def moving_latent(frames=FRAMES, seed=0, size=LATENT):
    """Correlated frames: one random field shifted by a pixel per frame (model latent units)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, 4, size, size + frames, generator=g)
    return torch.cat([base[..., i:i + size] for i in range(frames)])


def settings(nodes, clip, source=SOURCE, target=TARGET, **kw):
    args = dict(blend_words="", target_blend_words="", cross_replace_steps=0.8,
                cross_replace_words="", self_replace_steps=0.6, blend_threshold=0.3,
                reweight="", mode="auto", local_latent_blend=False, soft_mask=False)
    args.update(kw)
    out = nodes.blend_settings.FateZeroAttentionBlendSettings.execute(
        clip=clip, source_prompt=source, target_prompt=target, **args)
    return out.args  # (source_cond, target_cond, spec)


def empty(clip):
    """The official negative: the empty prompt, encoded as core CLIPTextEncode does."""
    import nodes as core_nodes

    return core_nodes.CLIPTextEncode().encode(clip, "")[0]


def invert(nodes, model, source_cond, latent, **kw):
    args = dict(steps=STEPS, key_frames="mid", st_min_channels=0, store_placement="cpu",
                store_dtype="fp32", layer_set="relative", schedule_end="comfy")
    args.update(kw)
    out = nodes.invert.FateZeroDDIMInvert.execute(model=model, source=source_cond,
                                                  latent={"samples": latent}, **args)
    return out.args  # (inverted latent dict, store)


def sample(nodes, model, positive, negative, inverted, store, spec, cfg=1.0, fusion=True, sampler=None):
    out = nodes.sample.FateZeroSample.execute(model=model, positive=positive, negative=negative,
                                              latent=inverted, attention_store=store,
                                              blend_settings=spec, cfg=cfg, fusion=fusion, sampler=sampler)
    return out.args  # (latent dict, preview image)


def calm(model, scale=0.01):
    """Scale the output conv: a random UNet's eps is chaotic in its input (GroupNorm renormalises
    any input dependence), so DDIM round trips diverge; a small eps keeps them meaningful while the
    attention still depends on the frames."""
    out = model.model.diffusion_model.out[2]
    with torch.no_grad():
        out.weight.mul_(scale)
        out.bias.mul_(scale)
    return model


def test_reconstruction_with_full_replacement(nodes, tiny_sd15, tiny_clip):
    """Edit with the source prompt, cross 1.0 and self 1.0: the input latents come back.

    Measured: max error 0.11 fused vs 0.26 plain DDIM (latent max 4.1); plain sampling lacks the
    inversion's spatio-temporal attention, the fused edit replays it.
    """
    model = calm(tiny_sd15)
    latent = moving_latent()
    src, tgt, spec = settings(nodes, tiny_clip, target=SOURCE, cross_replace_steps=1.0,
                              self_replace_steps=1.0)
    inverted, store = invert(nodes, model, src, latent)
    neg = empty(tiny_clip)
    fused, _ = sample(nodes, model, tgt, neg, inverted, store, spec, cfg=1.0)
    plain, _ = sample(nodes, model, tgt, neg, inverted, store, spec, cfg=1.0, fusion=False)
    err_fused = float((fused["samples"] - latent).abs().max())
    err_plain = float((plain["samples"] - latent).abs().max())
    assert torch.isfinite(fused["samples"]).all()
    assert err_fused < 0.05 * float(latent.abs().max()), err_fused
    assert err_fused < 0.6 * err_plain, (err_fused, err_plain)


def test_round_trip_is_exact_for_a_content_independent_denoiser(nodes, tiny_sd15, tiny_clip):
    """With conv_in zeroed, eps depends only on the timestep and text, so DDIM inversion followed
    by editing must return the input to float precision: any schedule, step-index or latent-scaling
    slip in the nodes breaks this."""
    with torch.no_grad():
        tiny_sd15.model.diffusion_model.input_blocks[0][0].weight.zero_()
    latent = moving_latent()
    src, tgt, spec = settings(nodes, tiny_clip, target=SOURCE)
    inverted, store = invert(nodes, tiny_sd15, src, latent)
    out, _ = sample(nodes, tiny_sd15, tgt, empty(tiny_clip), inverted, store, spec, cfg=1.0)
    assert float((out["samples"] - latent).abs().max()) < 1e-3


def test_fusion_off_equals_core_ddim_ksampler(nodes, tiny_sd15, tiny_clip):
    """FateZero Sample with fusion off (per-frame norms) is the core DDIM KSampler path, bit for
    bit (test_group_norm checks the clip-level network the same way)."""
    import nodes as core_nodes

    latent = moving_latent()
    src, tgt, spec = settings(nodes, tiny_clip)
    neg = empty(tiny_clip)
    inverted, store = invert(nodes, tiny_sd15, src, latent, group_norm="frame")
    ours, _ = sample(nodes, tiny_sd15, tgt, neg, inverted, store, spec, cfg=7.5, fusion=False)
    (core,) = core_nodes.KSamplerAdvanced().sample(
        tiny_sd15, "disable", 0, STEPS, 7.5, "ddim", "ddim_uniform", tgt, neg, inverted, 0, STEPS,
        "disable")
    assert torch.equal(ours["samples"], core["samples"])


@pytest.mark.parametrize("end", ["comfy", "official"])
def test_every_sampler_gives_the_latent_in_one_space(nodes, tiny_sd15, tiny_clip, end):
    """The built-in DDIM and a sampler override return the same thing (x at sigmas[-1], as every
    k-diffusion sampler), so FateZero Sample's latent does not depend on the path: with fusion off
    the built-in loop and ComfyUI's own ``ddim`` sampler (an Euler step, the same arithmetic) give
    the same latent, bit for bit, at either schedule end."""
    import comfy.samplers

    latent = moving_latent()
    src, tgt, spec = settings(nodes, tiny_clip)
    neg = empty(tiny_clip)
    inverted, store = invert(nodes, tiny_sd15, src, latent, schedule_end=end)
    ours, _ = sample(nodes, tiny_sd15, tgt, neg, inverted, store, spec, cfg=7.5, fusion=False)
    host, _ = sample(nodes, tiny_sd15, tgt, neg, inverted, store, spec, cfg=7.5, fusion=False,
                     sampler=comfy.samplers.sampler_object("ddim"))
    assert torch.equal(ours["samples"], host["samples"])


@pytest.mark.parametrize("enabled", [True, False])
def test_loops_show_the_console_progress_bar_like_any_sampler(nodes, tiny_sd15, tiny_clip, capfd,
                                                              monkeypatch, enabled):
    """DDIM Invert and FateZero Sample pass ComfyUI's progress-bar setting to their loops, which
    show tqdm's bar as k-diffusion's samplers do (``trange(..., disable=disable)``), and none when
    ComfyUI's bar is off (``--disable-progress-bars`` / ``comfy.utils.PROGRESS_BAR_ENABLED``)."""
    import comfy.utils

    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_ENABLED", enabled)
    src, tgt, spec = settings(nodes, tiny_clip)
    capfd.readouterr()
    inverted, store = invert(nodes, tiny_sd15, src, moving_latent())
    inversion_err = capfd.readouterr().err
    sample(nodes, tiny_sd15, tgt, empty(tiny_clip), inverted, store, spec, cfg=7.5)
    edit_err = capfd.readouterr().err
    bar = f"{STEPS}/{STEPS}"
    assert (bar in inversion_err, bar in edit_err) == (enabled, enabled), (inversion_err, edit_err)


@pytest.mark.parametrize("steps", [10, 50, 30])
def test_official_schedule_against_the_host_ddim_uniform(comfy_nodes, tiny_sd15, steps):
    """On the model's own sigma table ComfyUI's ``ddim_uniform`` runs the official timesteps
    ``1 + k (1000 // N)`` when 1000 mod N <= 1, bit for bit; for N = 30 it runs 31 steps. The
    ``official`` end is alphas_cumprod[0] = 1 - 0.00085."""
    import comfy.samplers

    official_sigmas = comfy_nodes.fatezero_core.sampling.official_sigmas
    model_sampling = tiny_sd15.get_model_object("model_sampling")
    ours = official_sigmas(model_sampling.sigmas, steps)
    host = comfy.samplers.calculate_sigmas(model_sampling, "ddim_uniform", steps).cpu()
    if steps == 30:
        assert (len(ours), len(host)) == (31, 32)
    else:
        assert torch.equal(ours, host)
    end = float(official_sigmas(model_sampling.sigmas, steps, "official")[-1])
    assert abs(1 / (1 + end * end) - (1 - 0.00085)) < 1e-6


def test_model_passed_in_is_not_modified(nodes, tiny_sd15, tiny_clip):
    before_options = copy.deepcopy(tiny_sd15.model_options)
    before_patches = dict(tiny_sd15.patches)
    before_objects = dict(tiny_sd15.object_patches)
    latent = moving_latent()
    src, tgt, spec = settings(nodes, tiny_clip, blend_words="cat")
    neg = empty(tiny_clip)
    inverted, store = invert(nodes, tiny_sd15, src, latent)
    sample(nodes, tiny_sd15, tgt, neg, inverted, store, spec, cfg=7.5)
    assert tiny_sd15.model_options == before_options
    assert tiny_sd15.patches == before_patches
    assert tiny_sd15.object_patches == before_objects


@pytest.mark.parametrize("placement", ["gpu", "disk", "recompute"], ids=placement_id)
def test_placements_match_cpu(nodes, tiny_sd15, tiny_clip, placement):
    latent = moving_latent()
    src, tgt, spec = settings(nodes, tiny_clip, blend_words="cat")
    neg = empty(tiny_clip)
    inv_a, store_a = invert(nodes, tiny_sd15, src, latent)
    inv_b, store_b = invert(nodes, tiny_sd15, src, latent, store_placement=placement)
    assert torch.equal(inv_a["samples"], inv_b["samples"])
    out_a, prev_a = sample(nodes, tiny_sd15, tgt, neg, inv_a, store_a, spec, cfg=7.5)
    out_b, prev_b = sample(nodes, tiny_sd15, tgt, neg, inv_b, store_b, spec, cfg=7.5)
    assert float((out_a["samples"] - out_b["samples"]).abs().max()) <= 1e-4
    assert torch.equal(prev_a, prev_b)


@pytest.mark.parametrize("end", ["comfy", "official"])
@pytest.mark.parametrize("name", ["dpm_2", "dpmpp_2s_ancestral"])
def test_recompute_equals_cpu_under_a_midpoint_sampler(nodes, tiny_sd15, tiny_clip, name, end):
    """A midpoint sampler evaluates the model between two step sigmas; the recompute source pass
    must replay the step's own inversion attention there, as the cpu store hands it out. With the
    official (non-zero) end, dpm_2 takes a midpoint on the last step too."""
    import comfy.samplers

    latent = moving_latent()
    src, tgt, spec = settings(nodes, tiny_clip, blend_words="cat")
    neg = empty(tiny_clip)
    inv_a, store_a = invert(nodes, tiny_sd15, src, latent, schedule_end=end)
    inv_b, store_b = invert(nodes, tiny_sd15, src, latent, store_placement="recompute", schedule_end=end)
    outs = [sample(nodes, tiny_sd15, tgt, neg, inv, store, spec, cfg=7.5,
                   sampler=comfy.samplers.sampler_object(name))[0]["samples"]
            for inv, store in ((inv_a, store_a), (inv_b, store_b))]
    assert float((outs[0] - outs[1]).abs().max()) <= 1e-4


def test_recompute_source_pass_skips_the_blocks_after_the_last_stored_layer(nodes, tiny_sd15, tiny_clip,
                                                                           monkeypatch):
    """Each edit step's source pass ends after its last stored layer (the full-resolution decoder
    blocks never run for it) and the guider goes on with the CFG pass: the UNet's output layer runs
    once per step, for the edit only."""
    latent = moving_latent()
    src, tgt, spec = settings(nodes, tiny_clip, blend_words="cat")
    inverted, store = invert(nodes, tiny_sd15, src, latent, store_placement="recompute")
    final = tiny_sd15.model.diffusion_model.out[-1]  # the UNet's last conv, after every block
    calls = []
    handle = final.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    ended = []
    controller = nodes.sample.EditController
    original = controller._maybe_end_source_pass

    def spy(self, call, kind):
        try:
            original(self, call, kind)
        except Exception as exc:
            ended.append(type(exc).__name__)
            raise

    monkeypatch.setattr(controller, "_maybe_end_source_pass", spy)
    try:
        sample(nodes, tiny_sd15, tgt, empty(tiny_clip), inverted, store, spec, cfg=7.5)
    finally:
        handle.remove()
    assert ended == ["SourcePassComplete"] * STEPS
    assert calls == [2 * FRAMES] * STEPS  # uncond + cond only: no source-pass call reached it


def test_edit_differs_and_preview_shows_mask(nodes, tiny_sd15, tiny_clip):
    """At 256 px the mask grid is 8x8 (at 128 px a 3x3-dilated 4x4 grid is all on). A random
    model's cross-attention is nearly flat, so the threshold sits close to the peak."""
    size = 32
    latent = moving_latent(size=size)
    src, tgt, spec = settings(nodes, tiny_clip, blend_words="cat", blend_threshold=0.97)
    neg = empty(tiny_clip)
    inverted, store = invert(nodes, tiny_sd15, src, latent)
    edited, preview = sample(nodes, tiny_sd15, tgt, neg, inverted, store, spec, cfg=7.5)
    rec_src, rec_tgt, rec_spec = settings(nodes, tiny_clip, target=SOURCE, blend_words="cat")
    recon, _ = sample(nodes, tiny_sd15, rec_tgt, neg, inverted, store, rec_spec, cfg=7.5)
    assert float((edited["samples"] - recon["samples"]).abs().mean()) > 1e-3
    assert preview.shape == (FRAMES, size * 8, size * 16, 3)
    mask_half, heat_half = preview[:, :, : size * 8], preview[:, :, size * 8:]
    assert set(mask_half.unique().tolist()) == {0.0, 1.0}  # some rows edited, some kept
    assert float(heat_half.amax()) == 1.0 and float(heat_half.amin()) < 1.0
    _, _, full = settings(nodes, tiny_clip, blend_words="cat", blend_threshold=2.0)
    _, none = sample(nodes, tiny_sd15, tgt, neg, inverted, store, full, cfg=7.5)
    assert float(none[:, :, : size * 8].amax()) == 0.0  # threshold >= 1: full replacement


def test_lora_patched_model_runs_and_differs(nodes, tiny_sd15, tiny_clip):
    latent = moving_latent()
    src, tgt, spec = settings(nodes, tiny_clip, blend_words="cat")
    neg = empty(tiny_clip)
    lora = tiny_sd15.clone()
    key = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
    weight = lora.get_model_object(key)
    g = torch.Generator().manual_seed(3)
    lora.add_patches({key: (0.5 * torch.randn(weight.shape, generator=g),)}, 1.0)
    inv_plain, store_plain = invert(nodes, tiny_sd15, src, latent)
    inv_lora, store_lora = invert(nodes, lora, src, latent)
    out_plain, _ = sample(nodes, tiny_sd15, tgt, neg, inv_plain, store_plain, spec, cfg=7.5)
    out_lora, _ = sample(nodes, lora, tgt, neg, inv_lora, store_lora, spec, cfg=7.5)
    assert torch.isfinite(out_lora["samples"]).all()
    assert float((out_plain["samples"] - out_lora["samples"]).abs().mean()) > 1e-3
    # a store from the plain model is refused for the LoRA model, as a node error
    with pytest.raises(nodes.user_errors.FateZeroNodeError, match="different model"):
        sample(nodes, lora, tgt, neg, inv_plain, store_plain, spec, cfg=7.5)
