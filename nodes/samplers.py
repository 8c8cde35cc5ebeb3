"""Sampler functions and the guider that run FateZero through ComfyUI's sampling machinery.

Both samplers are ``KSAMPLER`` functions (k-diffusion signature), so previews, progress, interrupt,
LoRA patches and ControlNet conditioning work as in any KSampler (design decision 3). ComfyUI's
sampler state is the VE latent ``x = z * sqrt(1 + sigma^2)``; the DDIM equations use the VP ``z``.
"""

from __future__ import annotations

import torch

import comfy.model_patcher
import comfy.samplers

from ..fatezero_core.ddim import alphas_cumprod_from_sigmas, ddim_invert_step, ve_to_vp, vp_to_ve
from ..fatezero_core.controller import SourcePassComplete, latent_blend
from .patching import PASS_KEY, sampler_step


def inversion_sampler(on_step):
    """DDIM inversion (paper eq. 3) over ascending sigmas; ``on_step(j, z_next)`` after each step.

    The input latent is taken as the clean VP latent at ``sigmas[0]``. At step j the model runs on
    ``z_j`` at the *next* sigma, as the official ``next_clean2noise_step`` does. Returns the VE
    latent at the last sigma, ready for DDIM sampling with no added noise.
    """

    def sample_fatezero_ddim_inversion(model, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = extra_args or {}
        s_in = x.new_ones([x.shape[0]])
        alpha_bars = alphas_cumprod_from_sigmas(sigmas.detach().to("cpu", torch.float64))  # MPS: no float64
        z = x
        for j in range(len(sigmas) - 1):
            sigma_next = sigmas[j + 1]
            x_in = vp_to_ve(z, sigma_next)
            denoised = model(x_in, sigma_next * s_in, **extra_args)
            eps = (x_in - denoised) / sigma_next
            z = ddim_invert_step(z, eps, alpha_bars[j], alpha_bars[j + 1])
            on_step(j, z)
            if callback is not None:
                callback({"x": vp_to_ve(z, sigma_next), "i": j, "sigma": sigma_next,
                          "sigma_hat": sigma_next, "denoised": denoised})
        return vp_to_ve(z, sigmas[-1])

    return sample_fatezero_ddim_inversion


def edit_sampler(after_step=None):
    """DDIM (eta 0) over descending sigmas; ``after_step(i, x, sigma_next) -> x`` after each step.

    The update ``x + (x - denoised) / sigma * (sigma_next - sigma)`` is DDIM eq. 2 in VE form, the
    same arithmetic as core ``ddim``/``euler``. The result is the VP latent at the last sigma, so
    the official end point (sigma ~0.029) decodes like the official code's output.
    """

    def sample_fatezero_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = extra_args or {}
        s_in = x.new_ones([x.shape[0]])
        for i in range(len(sigmas) - 1):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            denoised = model(x, sigma * s_in, **extra_args)
            if callback is not None:
                callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
            d = (x - denoised) / sigma
            x = x + d * (sigma_next - sigma)
            if after_step is not None:
                x = after_step(i, x, sigma_next)
        return ve_to_vp(x, sigmas[-1])

    return sample_fatezero_ddim


def latent_blend_step(controller, store):
    """``after_step`` applying the local latent blend (reference doc section 3.5) in VP space."""

    def after_step(i, x, sigma_next):
        mask = controller.latent_blend_mask(i, tuple(x.shape[-2:]))
        if mask is None:
            return x
        z_src = store.latent(controller.latent_blend_source_index(i)).to(x)
        z = latent_blend(ve_to_vp(x, sigma_next), z_src, mask.to(x))
        return vp_to_ve(z, sigma_next)

    return after_step


class FateZeroGuider(comfy.samplers.CFGGuider):
    """CFG guider that, for a ``recompute`` store, runs the source pass before every edit step.

    The source pass evaluates the model on the stored inversion latent with the source prompt at
    the step's own sigma, flagged as ``source`` so the controller captures its attention for this step
    only (design decision 4). Its output is never used, so the controller may end it with
    ``SourcePassComplete`` after the last stored layer (the full-resolution decoder blocks after
    it are skipped). Everything else is plain CFG.
    """

    def __init__(self, model_patcher, store=None):
        super().__init__(model_patcher)
        self.store = store

    def set_source(self, source_conditioning):
        self.inner_set_conds({"source": source_conditioning})

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        if self.store is not None and self.store.placement == "recompute":
            self._regenerate_source(x, timestep, model_options)
        return super().predict_noise(x, timestep, model_options=model_options, seed=seed)

    def _regenerate_source(self, x, timestep, model_options):
        options = comfy.model_patcher.create_model_options_clone(model_options)
        transformer_options = options.setdefault("transformer_options", {})
        sample_sigmas = transformer_options["sample_sigmas"]
        step = sampler_step({"sample_sigmas": sample_sigmas, "sigmas": timestep})
        j = self.store.config.num_steps - 1 - step
        self.store.begin_regeneration(j)
        # The source pass replays inversion step j, which ran at this step's own sigma: a midpoint
        # sampler's intermediate sigma (dpm_2, dpmpp_2s) maps to the same step, not another pass.
        sigma = sample_sigmas[step].to(timestep)
        z = self.store.latent(j).to(device=x.device, dtype=x.dtype)
        transformer_options[PASS_KEY] = "source"
        try:
            comfy.samplers.calc_cond_batch(self.inner_model, [self.conds["source"]],
                                           vp_to_ve(z, sigma), sigma.expand_as(timestep), options)
        except SourcePassComplete:
            pass  # every stored layer of this step is captured


def zero_noise(latent: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(latent, device="cpu")
