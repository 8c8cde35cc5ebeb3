"""Deterministic DDIM (eta = 0) arithmetic the sampling loops (``sampling``) share.

Notation. ``alpha_bar`` (written a below) is the cumulative product of (1 - beta); ``z`` is the
variance-preserving (VP) latent, ``z_t = sqrt(a_t) z_0 + sqrt(1 - a_t) eps``. ComfyUI works with
the variance-exploding (VE) form ``x = z * sqrt(1 + sigma^2)`` and ``sigma = sqrt((1 - a) / a)``.

FateZero paper equations:

- eq. (2), denoise:  z_{t-1} = sqrt(a_{t-1}) (z_t - sqrt(1 - a_t) eps) / sqrt(a_t) + sqrt(1 - a_{t-1}) eps
- eq. (3), invert:   z_t = sqrt(a_t) (z_{t-1} - sqrt(1 - a_{t-1}) eps) / sqrt(a_{t-1}) + sqrt(1 - a_t) eps

Both move a latent along the same deterministic trajectory from one alpha_bar to another; they
differ only in direction (and, in the loops, in which latent the model sees). The edit loop runs
eq. 2 in the VE form the host's samplers use (``sampling.sample_ddim``); inversion uses eq. 3 here.

Pure PyTorch; no host imports.
"""

from __future__ import annotations

import math
from typing import Union

import torch

from .errors import FateZeroError

Scalar = Union[float, int, torch.Tensor]

SCHEDULE_ENDS = ("comfy", "official")


def alphas_cumprod_from_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """alpha_bar of each VE noise level: ``a = 1 / (1 + sigma^2)`` (1 at sigma 0)."""
    s = torch.as_tensor(sigmas)
    return 1.0 / (1.0 + s * s)


def ddim_invert_step(
    z: torch.Tensor, eps: torch.Tensor, alpha_bar_from: Scalar, alpha_bar_to: Scalar
) -> torch.Tensor:
    """One inversion step, paper eq. (3), toward more noise, in z's dtype.

    ``z_t = sqrt(a_t) (z_{t-1} - sqrt(1 - a_{t-1}) eps) / sqrt(a_{t-1}) + sqrt(1 - a_t) eps``
    with ``a_{t-1} = alpha_bar_from`` and ``a_t = alpha_bar_to``. The coefficients are computed in
    float64 and applied as ``c_z * z + c_eps * eps``.
    """
    a_from, a_to = float(alpha_bar_from), float(alpha_bar_to)
    c_z = math.sqrt(a_to / a_from)
    c_eps = math.sqrt(1.0 - a_to) - math.sqrt(a_to) * math.sqrt(1.0 - a_from) / math.sqrt(a_from)
    return z * c_z + eps.to(z.dtype) * c_eps


def inversion_step_for_edit_step(i: int, num_steps: int) -> int:
    """Inversion step whose captured data belongs to denoise (edit) step i: ``N - 1 - i``.

    Denoise step i runs the model at ``timesteps[i]`` (descending), the timestep at which
    inversion step N - 1 - i ran it, so the timesteps match exactly (FateZero
    ``video_diffusion/prompt_attention/attention_util.py``, ``AttentionControlEdit.forward``:
    ``len(attention_store_all_step) - cur_step - 1``), although the inversion model input was the
    less noisy latent.
    """
    if not 0 <= i < num_steps:
        raise FateZeroError(
            f"Edit step {i} is outside 0..{num_steps - 1}; the edit must use the same number of "
            "steps as the inversion."
        )
    return num_steps - 1 - i


def _ve_scale(sigma: Scalar, like: torch.Tensor) -> torch.Tensor:
    """``sqrt(1 + sigma^2)`` for one sigma, in ``like``'s dtype/device."""
    # On the CPU: some devices (MPS) have no float64.
    s = torch.as_tensor(sigma).detach().to(device="cpu", dtype=torch.float64)
    return (1.0 + s * s).sqrt().to(device=like.device, dtype=like.dtype)


def vp_to_ve(z: torch.Tensor, sigma: Scalar) -> torch.Tensor:
    """Host sampler state from a VP latent: ``x = z * sqrt(1 + sigma^2)`` (= z / sqrt(alpha_bar))."""
    return z * _ve_scale(sigma, z)


def ve_to_vp(x: torch.Tensor, sigma: Scalar) -> torch.Tensor:
    """VP latent from the host sampler state: ``z = x / sqrt(1 + sigma^2)``."""
    return x / _ve_scale(sigma, x)


__all__ = [
    "SCHEDULE_ENDS",
    "alphas_cumprod_from_sigmas",
    "ddim_invert_step",
    "inversion_step_for_edit_step",
    "ve_to_vp",
    "vp_to_ve",
]
