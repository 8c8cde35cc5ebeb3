"""FateZero's schedule and sampling loops, as k-diffusion sampler functions.

Each loop has the signature and contract of k-diffusion's samplers (``comfy/k_diffusion/sampling.py``,
e.g. ``sample_euler``): ``sampler(model, x, sigmas, extra_args, callback, disable, ...)``, called by
ComfyUI's ``KSAMPLER.sample`` (``comfy/samplers.py``), so the host's machinery (CFG, LoRA, ControlNet,
previews, progress, interrupt) runs around it. ``model(x, sigma, **extra_args)`` returns the
denoised VE latent; the host's sampler state is the VE latent ``x = z * sqrt(1 + sigma^2)``, the
DDIM equations use the VP ``z`` (``ddim`` module docstring). Like every k-diffusion sampler, each
loop returns ``x`` at ``sigmas[-1]`` and shows its steps with tqdm's ``trange(..., disable=disable)``.

- :func:`official_sigmas`: the official DDIM timesteps ``1 + k * (1000 // N)`` as sigmas of the
  model's table, with the clean end at sigma 0 (``comfy``) or at ``alphas_cumprod[0]``
  (``official``, sigma ~0.029, as diffusers' ``set_alpha_to_one=False``).
- :func:`sample_ddim_inversion`: paper eq. 3 over ascending sigmas.
- :func:`sample_ddim`: paper eq. 2 (eta 0) over descending sigmas.
- :func:`latent_blend_step`: the local latent blend after each edit step (FateZero
  ``attention_util.py``, ``AttentionControlEdit.step_callback``).
"""

from __future__ import annotations

import torch

try:
    from tqdm.auto import trange
except ImportError:  # tqdm comes with ComfyUI (its requirements.txt); the bare core runs without a bar
    def trange(n, disable=None):
        return range(n)

from .ddim import alphas_cumprod_from_sigmas, ddim_invert_step, ve_to_vp, vp_to_ve
from .edit_maps import latent_blend
from .errors import FateZeroError


def official_sigmas(sigma_table: torch.Tensor, steps: int, end: str = "comfy") -> torch.Tensor:
    """Descending edit sigmas ``[s_N, ..., s_1, s_end]``; ``.flip(0)`` gives the inversion's.

    The official code's diffusers ``DDIMScheduler`` (``steps_offset=1``, "leading" spacing) runs
    the train timesteps ``t_k = 1 + k * (T // N)``, k = N-1 .. 0 (SD1.x, T = 1000: N = 50 ->
    981, 961, ..., 1). The clean end is sigma 0 (``comfy``) or the sigma of ``alphas_cumprod[0]``
    (``official``: ``set_alpha_to_one=False``). ComfyUI's ``ddim_uniform`` gives the same
    timesteps only when 1000 mod N <= 1; for N = 30 it returns 31 steps. The table is indexed,
    not interpolated, so the sigmas are bit-equal to it. ``end`` is one of ``SCHEDULE_ENDS`` (the
    node's combo: the host refuses other values).
    """
    table = sigma_table.detach().float().cpu()
    num_train_timesteps = len(table)
    # A distilled model sampling (LCM) keeps only 50 timesteps in its table.
    if steps > num_train_timesteps:
        raise FateZeroError(
            f"Steps ({steps}) cannot exceed the model's {num_train_timesteps} training "
            "timesteps; use fewer steps (FateZero uses 50)."
        )
    t = torch.arange(steps - 1, -1, -1, dtype=torch.int64) * (num_train_timesteps // steps) + 1
    if int(t[0]) >= num_train_timesteps:
        raise FateZeroError(
            f"{steps} steps with steps_offset 1 reach timestep {int(t[0])}, outside "
            f"0..{num_train_timesteps - 1}; use fewer steps."
        )
    tail = torch.zeros(1) if end == "comfy" else table[:1]
    return torch.cat([table[t], tail])


def sample_ddim_inversion(model, x, sigmas, extra_args=None, callback=None, disable=None, on_step=None):
    """DDIM inversion (paper eq. 3) over ascending sigmas; ``on_step(j, z_next)`` after each step.

    ``x`` is the clean VP latent at ``sigmas[0]``. Step j runs the model on ``z_j`` at the *next*
    sigma, as the official ``next_clean2noise_step`` does, and moves
    ``z_{j+1} = sqrt(a') (z_j - sqrt(1 - a) eps) / sqrt(a) + sqrt(1 - a') eps``. Returns ``x`` at
    the last sigma (the VE latent), ready for DDIM sampling with no added noise.
    """
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    # alpha_bar on the CPU in float64: some devices (MPS) have no float64.
    alpha_bars = alphas_cumprod_from_sigmas(sigmas.detach().to("cpu", torch.float64))
    z = x
    for j in trange(len(sigmas) - 1, disable=disable):
        sigma_next = sigmas[j + 1]
        x_in = vp_to_ve(z, sigma_next)
        denoised = model(x_in, sigma_next * s_in, **extra_args)
        eps = (x_in - denoised) / sigma_next
        z = ddim_invert_step(z, eps, alpha_bars[j], alpha_bars[j + 1])
        if on_step is not None:
            on_step(j, z)
        if callback is not None:
            callback({"x": vp_to_ve(z, sigma_next), "i": j, "sigma": sigma_next,
                      "sigma_hat": sigma_next, "denoised": denoised})
    return vp_to_ve(z, sigmas[-1])


def sample_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None, after_step=None):
    """DDIM (eta 0, paper eq. 2) over descending sigmas; ``after_step(i, x, sigma_next) -> x``.

    In VE form eq. 2 is ``x + (x - denoised) / sigma * (sigma_next - sigma)``, the arithmetic of
    k-diffusion's ``sample_euler`` (ComfyUI's ``ddim`` sampler). Returns ``x`` at the last sigma,
    as every k-diffusion sampler does; ``ddim.ve_to_vp(x, sigmas[-1])`` is the VP latent there
    (the same latent at the default end, sigma 0).
    """
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        x = x + (x - denoised) / sigma * (sigma_next - sigma)
        if after_step is not None:
            x = after_step(i, x, sigma_next)
    return x


def step_of_sigma(sigmas: torch.Tensor, sigma: torch.Tensor) -> int:
    """Index of the schedule sigma nearest ``sigma``: the step a model evaluation reads.

    The DDIM loops evaluate exactly at schedule sigmas (the inversion runs step ``j`` at
    ``sigmas[j + 1]``; its capture shifts by one). A sampler override's intermediate evaluation
    (``dpm_2``'s midpoint ``sqrt(s_i s_{i+1})``, ``dpmpp_2s_ancestral``'s, which lands on
    ``s_{i+1}``) reads the step of the nearest noise level. No edit step starts at the last sigma
    of a descending schedule: an evaluation nearest it (the last step's midpoint when the end is
    not 0, as with ``schedule_end`` official) belongs to the last step."""
    # Runs at every attention call: one device sync (the argmin), as a plain lookup would.
    s = sigmas.detach().to(sigma.device)
    nearest = int((s - sigma.reshape(-1)[0]).abs().argmin())
    if nearest == len(s) - 1 and nearest > 0 and bool(s[-1] < s[0]):
        return nearest - 1
    return nearest


def latent_blend_step(masks, store):
    """``after_step`` for :func:`sample_ddim`: the local latent blend ``z_src + M (z - z_src)``
    (official ``AttentionControlEdit.step_callback`` and ``SpatialBlender.__call__``) in VP space,
    with ``masks`` the edit's ``edit_maps.EditMaps`` (its
    ``latent_blend_mask`` / ``latent_blend_source_index``) and the store's inversion latents."""

    def after_step(i, x, sigma_next):
        mask = masks.latent_blend_mask(i, tuple(x.shape[-2:]))
        if mask is None:
            return x
        z_src = store.latent(masks.latent_blend_source_index(i)).to(x)
        return vp_to_ve(latent_blend(ve_to_vp(x, sigma_next), z_src, mask.to(x)), sigma_next)

    return after_step


__all__ = ["latent_blend_step", "official_sigmas", "sample_ddim", "sample_ddim_inversion", "step_of_sigma"]
