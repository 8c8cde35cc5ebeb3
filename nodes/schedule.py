"""DDIM sigmas for inversion and editing on a ComfyUI model (design decision 3).

The official timesteps ``t = 1 + k * (1000 // N)`` are used for every N. (ComfyUI's ``ddim_uniform``
gives the same ones only when 1000 mod N <= 1; for N = 30 it returns 31 steps.) The clean end is
either sigma 0 (``comfy``) or the official ``alphas_cumprod[0]`` (sigma ~0.029, ``official``).
"""

from __future__ import annotations

import torch

from ..fatezero_core.ddim import diffusers_timesteps
from ..fatezero_core.errors import FateZeroError

SCHEDULE_ENDS = ("comfy", "official")


def edit_sigmas(model_sampling, steps: int, end: str = "comfy") -> torch.Tensor:
    """Descending sigmas ``[s_N, ..., s_1, s_end]`` for FateZero editing."""
    if end not in SCHEDULE_ENDS:
        raise FateZeroError(f"Unknown schedule end '{end}'; use one of {SCHEDULE_ENDS}.")
    t = diffusers_timesteps(steps, num_train_timesteps=len(model_sampling.sigmas))
    sigmas = model_sampling.sigma(torch.as_tensor(t, dtype=torch.float32)).float().cpu()
    tail = 0.0 if end == "comfy" else float(model_sampling.sigma(torch.tensor(0.0)))
    return torch.cat([sigmas, torch.tensor([tail])])


def inversion_sigmas(model_sampling, steps: int, end: str = "comfy") -> torch.Tensor:
    """Ascending sigmas ``[s_end, s_1, ..., s_N]``: the edit schedule walked backwards."""
    return edit_sigmas(model_sampling, steps, end).flip(0)
