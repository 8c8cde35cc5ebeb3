"""The official code's DDIM, written from the spec for tests, and a host-style denoiser wrapper.

Reference: FateZero at 9b6cb7b with diffusers 0.11.1 (``fatezero-reference-implementation.md``
section 1). The SD1.x scheduler config is scaled_linear betas 0.00085 -> 0.012, T = 1000,
``steps_offset=1``, ``set_alpha_to_one=False``. Everything here works on integer train timesteps
and ``alphas_cumprod`` in the VP form, as diffusers' ``DDIMScheduler`` does; nothing is shared with
``fatezero_core``'s sigma-based loops.
"""

from __future__ import annotations

import torch

T = 1000


def sd1_alphas_cumprod() -> torch.Tensor:
    """``alphas_cumprod`` of SD1.x, float64: ``betas = linspace(sqrt(0.00085), sqrt(0.012), T) ** 2``."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


ALPHAS_CUMPROD = sd1_alphas_cumprod()
SIGMA_TABLE = ((1 - ALPHAS_CUMPROD) / ALPHAS_CUMPROD).sqrt().float()  # ComfyUI's float32 table


def set_timesteps(num_steps: int) -> list[int]:
    """``DDIMScheduler.set_timesteps``: ``(arange(N) * (T // N))[::-1] + steps_offset``."""
    ratio = T // num_steps
    return [k * ratio + 1 for k in range(num_steps)][::-1]


def final_alpha(end: str) -> float:
    """The clean end: ``set_alpha_to_one=False`` (official) uses ``alphas_cumprod[0]``."""
    return float(ALPHAS_CUMPROD[0]) if end == "official" else 1.0


def _alpha(t: int, end: str) -> float:
    return float(ALPHAS_CUMPROD[t]) if t >= 0 else final_alpha(end)


def invert(eps_fn, z0: torch.Tensor, num_steps: int, end: str = "official") -> list[torch.Tensor]:
    """``ddim_clean2noisy_loop`` with ``next_clean2noise_step``: ``[z_0, z_1, ..., z_N]`` (float64).

    Step k evaluates ``eps_fn(z, t)`` at ``t = timesteps[N-1-k]`` on the current latent, then
    ``z = sqrt(a') (z - sqrt(1 - a) eps) / sqrt(a) + sqrt(1 - a') eps`` with ``a = alpha[t - ratio]``
    (the clean end below 0) and ``a' = alpha[t]``."""
    timesteps, ratio = set_timesteps(num_steps), T // num_steps
    z, out = z0.double(), [z0.double()]
    for t in reversed(timesteps):
        eps = eps_fn(z, t).double()
        a, a_next = _alpha(t - ratio, end), float(ALPHAS_CUMPROD[t])
        z = a_next ** 0.5 * (z - (1 - a) ** 0.5 * eps) / a ** 0.5 + (1 - a_next) ** 0.5 * eps
        out.append(z)
    return out


def sample(eps_fn, z_T: torch.Tensor, num_steps: int, end: str = "official") -> torch.Tensor:
    """The editing loop with ``DDIMScheduler.step`` (eta 0), float64: at each ``t`` (descending)
    ``x0 = (z - sqrt(1 - a) eps) / sqrt(a)``, ``z = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps`` with
    ``a_prev = alpha[t - ratio]`` (the clean end below 0)."""
    ratio = T // num_steps
    z = z_T.double()
    for t in set_timesteps(num_steps):
        eps = eps_fn(z, t).double()
        a, a_prev = float(ALPHAS_CUMPROD[t]), _alpha(t - ratio, end)
        x0 = (z - (1 - a) ** 0.5 * eps) / a ** 0.5
        z = a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps
    return z


def eps_denoiser(eps_fn):
    """``eps_fn(z, t)`` (VP latent, integer train timestep) as a k-diffusion denoiser
    ``model(x, sigma) -> denoised``, as ComfyUI's EPS model wraps a UNet: the input is scaled to
    ``z = x / sqrt(1 + sigma^2)``, ``t`` is the table entry nearest in log sigma
    (``ModelSamplingDiscrete.timestep``) and ``denoised = x - sigma * eps``."""
    log_table = SIGMA_TABLE.log()

    def model(x, sigma, **extra):
        s = float(sigma[0])
        t = int((log_table - torch.tensor(s).log()).abs().argmin())
        eps = eps_fn(x / (1 + s * s) ** 0.5, t)
        return x - s * eps.to(x.dtype)

    return model
