"""The guider and sampler objects that run FateZero's loops through ComfyUI's machinery.

The loops themselves are core k-diffusion-style functions (``fatezero_core.sampling``); wrapped in
``KSAMPLER`` (``comfy/samplers.py``) they get previews, progress, interrupt, LoRA patches and
ControlNet conditioning as in any KSampler, and return what every k-diffusion sampler returns: ``x``
at ``sigmas[-1]``.
"""

from __future__ import annotations

import torch

import comfy.model_patcher
import comfy.samplers

from ..fatezero_core.ddim import inversion_step_for_edit_step, vp_to_ve
from ..fatezero_core.sampling import latent_blend_step, sample_ddim
from .context_windows import run_frames, source_pass_ends_early
from .patching import PASS_KEY, sampler_step


class FateZeroGuider(comfy.samplers.CFGGuider):
    """CFG guider that, for a ``recompute`` store, runs the source pass before every edit step.

    The source pass evaluates the model on the stored inversion latent with the source prompt at
    the step's own sigma, flagged as ``source`` so the controller captures its attention for this
    step only: the store keeps latents, not attention, and the attention of inversion step j is
    regenerated when edit step i = N - 1 - j needs it. Its output is never used: an
    ``EditController`` built with ``end_source_pass_after_last_stored_layer`` ends it with
    ``SourcePassComplete`` after the last stored layer (the full-resolution decoder blocks after it
    are skipped), which this guider catches. Everything else is plain CFG
    (``comfy/samplers.py`` ``CFGGuider.predict_noise``).
    """

    def __init__(self, model_patcher, store=None):
        super().__init__(model_patcher)
        self.store = store
        # With window callbacks installed (``context_windows``), the source pass of an evaluation
        # that runs in windows goes window by window (regenerate_source_frames), not here.
        self.windowed = False

    def set_source(self, source_conditioning):
        self.inner_set_conds({"source": source_conditioning})

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        if self.store is not None and self.store.placement == "recompute" and not self._in_windows(x, timestep, model_options):
            self._regenerate_source(x, timestep, model_options)
        return super().predict_noise(x, timestep, model_options=model_options, seed=seed)

    def _in_windows(self, x, timestep, model_options) -> bool:
        """Whether this evaluation runs in context windows: the host's own test
        (``comfy/samplers.py`` ``calc_cond_batch``), e.g. a clip no longer than a window does not."""
        handler = model_options.get("context_handler")
        return self.windowed and handler is not None and handler.should_use_context(
            self.inner_model, [], x, timestep, model_options)

    def _source_step(self, timestep, model_options):
        """``(inversion step j, the edit step's own sigma)`` of a model evaluation at ``timestep``."""
        sample_sigmas = model_options["transformer_options"]["sample_sigmas"]
        step = sampler_step({"sample_sigmas": sample_sigmas, "sigmas": timestep})
        # The source pass replays inversion step j at the sigma it ran at (the step's own): a
        # midpoint sampler's intermediate sigma (dpm_2, dpmpp_2s) only picks the step.
        return inversion_step_for_edit_step(step, self.store.config.num_steps), sample_sigmas[step]

    def _regenerate_source(self, x, timestep, model_options):
        options = comfy.model_patcher.create_model_options_clone(model_options)
        transformer_options = options.setdefault("transformer_options", {})
        j, sigma = self._source_step(timestep, model_options)
        self.store.begin_regeneration(j)
        sigma = sigma.to(timestep)
        z = self.store.latent(j).to(device=x.device, dtype=x.dtype)
        transformer_options[PASS_KEY] = "source"
        source_pass_ends_early(lambda: comfy.samplers.calc_cond_batch(
            self.inner_model, [self.conds["source"]], vp_to_ve(z, sigma), sigma.expand_as(timestep), options))

    def regenerate_source_frames(self, model, model_options, timestep, frames, key_pass: bool):
        """The source pass of ``frames`` only, in context windows: of the clip's shared key frames
        (``key_pass``: the step's first, so it starts the step's regenerated attention) or of one
        window."""
        j, sigma = self._source_step(timestep, model_options)
        if key_pass:
            self.store.begin_regeneration(j)
        sigma = sigma.to(timestep)
        z = self.store.latent(j).to(device=timestep.device)  # the whole clip; run_frames slices it
        source_pass_ends_early(lambda: run_frames(
            model, [self.conds["source"]], vp_to_ve(z, sigma), sigma.expand(z.shape[0]), model_options,
            frames, key_pass, {PASS_KEY: "source"}))


def zero_noise(latent: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(latent, device="cpu")


def edit_ksampler(maps=None, store=None) -> comfy.samplers.KSAMPLER:
    """``sample_ddim`` as a host sampler, with the local latent blend when the edit's
    ``EditMaps`` are given."""
    after_step = latent_blend_step(maps, store) if maps is not None else None
    return comfy.samplers.KSAMPLER(sample_ddim, extra_options={"after_step": after_step})
