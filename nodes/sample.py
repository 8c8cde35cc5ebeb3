"""FateZero Sample: DDIM editing with attention fusion, paper eq. 5 ``eps = ATT-FUSION(...)``."""

from __future__ import annotations

import logging

import torch

import comfy.utils
import latent_preview
from comfy_api.latest import io, ui

from ..fatezero_core.controller import EditController
from ..fatezero_core.ddim import ve_to_vp
from ..fatezero_core.edit_maps import EditMaps, preview_image
from ..fatezero_core.edit_spec import EditSpec
from ..fatezero_core.errors import FateZeroError, StoreMismatchError
from ..fatezero_core.store import AttentionStore
from .video_runtime import with_group_norm
from .latents import frames_latent, latent_fingerprint
from .context_windows import install_window_passes, own_handler
from .control_windows import use_windowed_control
from .patching import conditioning_fingerprint, model_fingerprint, patched_clone
from .samplers import FateZeroGuider, edit_ksampler, zero_noise
from .sockets import AttnStore, BlendSettings
from .user_errors import reports_user_errors

log = logging.getLogger("comfyui-fatezero")


def check_store(store, samples, model) -> None:
    if not isinstance(store, AttentionStore):
        raise FateZeroError("'attention_store' must come from FateZero DDIM Invert.")
    store.check_readable()
    frames, _, h, w = samples.shape
    store.config.check_edit(num_frames=frames, latent_size=(h, w), model_fingerprint=model_fingerprint(model))
    check_inverted_latent(store, samples)


LATENT_RTOL = 1e-6


def check_inverted_latent(store, samples) -> None:
    """Refuse a latent that is not the one DDIM Invert output together with ``store``.

    Compares the fingerprint recorded at inversion (shape, sum, abs-sum) with a relative tolerance,
    so moving the latent between devices is fine; a latent from another inversion is not.
    """
    expected = store.record.inverted_latent
    if expected is None:
        return
    actual = latent_fingerprint(samples)
    scale = max(expected["abs_sum"], actual["abs_sum"], 1e-30)
    differences = []
    if tuple(actual["shape"]) != tuple(expected["shape"]):
        differences.append(f"shape {list(actual['shape'])} vs {list(expected['shape'])}")
    else:
        if abs(actual["sum"] - expected["sum"]) > LATENT_RTOL * scale:
            differences.append("values (sum)")
        if abs(actual["abs_sum"] - expected["abs_sum"]) > LATENT_RTOL * scale:
            differences.append("magnitude (sum of absolute values)")
    if differences:
        raise StoreMismatchError(
            "This latent is not the inverted latent of this attention store (it differs in "
            + ", ".join(differences) + "): connect FateZero DDIM Invert's inverted_latent and "
            "attention_store outputs from the same node.")


def check_spec(spec, store, positive) -> None:
    if not isinstance(spec, EditSpec):
        raise FateZeroError("'blend_settings' must come from FateZero Edit Settings.")
    if store.record.source_fingerprint != spec.source_fingerprint:
        raise StoreMismatchError(
            f"The store was inverted with a different source conditioning than these blend "
            f"settings' source prompt '{spec.source_prompt}': wire the 'source' output of FateZero "
            "Source Prompt into FateZero DDIM Invert and its 'source_prompt' into FateZero Edit "
            "Settings.")
    if spec.target_fingerprint and conditioning_fingerprint(positive) != spec.target_fingerprint:
        raise StoreMismatchError(
            f"'positive' is not the target prompt of these blend settings: they edit the source "
            f"'{spec.source_prompt}' into the target '{spec.target_prompt}', and their words, "
            "windows and reweights name that target's tokens. Connect the 'target' output of the "
            "same FateZero Edit Settings to 'positive' (ControlNet may be applied in between).")


class FateZeroSample(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FateZero_Sample",
            display_name="FateZero Sample",
            category="FateZero/sampling",
            description=(
                "Denoise the inverted latent with the target prompt while fusing the captured "
                "source attention: cross-attention replaced for unchanged words, self-attention "
                "blended through a mask from the blend words. DDIM (eta 0) with the inversion's "
                "sigmas and no added noise."),
            inputs=[
                io.Model.Input("model", tooltip="The same model (and LoRA) used for inversion."),
                io.Conditioning.Input("positive", tooltip="Target prompt conditioning: the 'target' output of FateZero Edit Settings (ControlNet may be applied to it)."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning (official: empty prompt)."),
                io.Latent.Input("latent", tooltip="The inverted latent from FateZero DDIM Invert."),
                AttnStore.Input("attention_store", tooltip="The attention store from FateZero DDIM Invert."),
                BlendSettings.Input("blend_settings", tooltip="Prompts, words and windows from FateZero Edit Settings."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01, tooltip="Classifier-free guidance (official: 7.5)."),
                io.Boolean.Input("fusion", default=True, tooltip="Off: plain DDIM from the inverted latent, no attention fusion (for comparison)."),
                io.Sampler.Input("sampler", optional=True, tooltip="Optional sampler override; the default is DDIM (eta 0), which the local latent blend needs."),
            ],
            outputs=[
                io.Latent.Output(display_name="latent", tooltip="The edited latent: VAE Decode it."),
                io.Image.Output(display_name="mask_preview", tooltip="Per frame: blend mask (left, white = edited) and the edited words' source cross-attention (right)."),
            ],
        )

    @classmethod
    @reports_user_errors
    def execute(cls, model, positive, negative, latent, attention_store, blend_settings, cfg,
                fusion, sampler=None) -> io.NodeOutput:
        samples = frames_latent(latent)
        store = attention_store
        check_store(store, samples, model)
        check_spec(blend_settings, store, positive)
        steps = store.config.num_steps
        settings = blend_settings.edit_settings(steps, fuse=fusion)
        sigmas = torch.tensor(store.config.sigmas, dtype=torch.float32).flip(0)

        # The network the inversion ran: its GroupNorm choice comes with the store.
        controller, maps, patched = None, None, with_group_norm(model, store.config.group_norm)
        regenerate = fusion and store.placement == "recompute"
        if fusion:
            maps = EditMaps(store, settings)
            # The recompute source pass ends after its last stored layer: FateZeroGuider catches
            # SourcePassComplete.
            controller = EditController(store, settings, maps,
                                        end_source_pass_after_last_stored_layer=regenerate)
            patched = patched_clone(patched, controller, step_offset=0)
        elif patched is model:
            patched = model.clone()  # the window helpers below go on a clone this node owns
        use_windowed_control(patched)  # per-frame ControlNet hints follow the context window
        guider = FateZeroGuider(patched, store if fusion else None)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        if regenerate:
            guider.set_source(store.record.source_conditioning)
        if controller is not None:
            guider.windowed = install_window_passes(
                patched, controller, guider.regenerate_source_frames if regenerate else None)
        else:
            own_handler(patched)  # plain DDIM in windows (per-frame attention, nothing shared)

        if sampler is None:
            sampler = edit_ksampler(maps if settings.latent_blend else None, store)
        elif settings.latent_blend:
            log.warning("FateZero: the local latent blend needs the built-in DDIM sampler; it is "
                        "off with a sampler override.")

        callback = latent_preview.prepare_callback(patched, steps)
        try:
            out = guider.sample(zero_noise(samples), samples, sampler, sigmas, callback=callback,
                                disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=0)
        finally:
            store.end_edit()  # the step read last (disk, recompute) is not kept between edits
        # Every sampler, the built-in DDIM and an override alike, returns x at sigmas[-1]
        # (k-diffusion's contract); the edited latent is the VP latent there: x itself at the
        # default end (sigma 0), the latent the official code decodes at its end (alphas_cumprod[0]).
        out = ve_to_vp(out, sigmas[-1])
        preview = preview_image(maps, samples.shape[0], tuple(samples.shape[-2:]))
        return io.NodeOutput({"samples": out}, preview, ui=ui.PreviewImage(preview, cls=cls))
