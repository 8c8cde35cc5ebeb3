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
    table = model_sampling.sigmas.float().cpu()
    t = diffusers_timesteps(steps, num_train_timesteps=len(table))
    # Index the table (as ddim_uniform does) rather than interpolate, so the sigmas are bit-equal.
    tail = torch.zeros(1) if end == "comfy" else table[:1]
    return torch.cat([table[torch.as_tensor(t, dtype=torch.long)], tail])


def inversion_sigmas(model_sampling, steps: int, end: str = "comfy") -> torch.Tensor:
    """Ascending sigmas ``[s_end, s_1, ..., s_N]``: the edit schedule walked backwards."""
    return edit_sigmas(model_sampling, steps, end).flip(0)
