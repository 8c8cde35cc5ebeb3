"""LATENT inputs as FateZero reads them: a batch of frames, and a cheap fingerprint of it.

Shared by FateZero DDIM Invert (which records the fingerprint of the latent it outputs) and
FateZero Sample (which checks the latent it receives against it).
"""

from __future__ import annotations

import torch

from ..fatezero_core.errors import FateZeroError


def frames_latent(latent: dict) -> torch.Tensor:
    """The ``[frames, 4, h, w]`` samples of a LATENT, or a clear error for any other shape."""
    samples = latent["samples"]
    if samples.ndim != 4:
        raise FateZeroError(
            f"FateZero expects an image latent batch [frames, 4, h, w], got shape {list(samples.shape)}; "
            "encode the frames with a plain VAE Encode."
        )
    if samples.shape[0] < 1:
        raise FateZeroError("The latent holds no frames; load at least one frame.")
    return samples


def latent_fingerprint(samples: torch.Tensor) -> dict:
    """Cheap identity of a latent tensor: its shape, sum and sum of absolute values (float64).

    FateZero Sample compares it with the latent it receives, so a latent from another inversion
    (another video, step count or schedule end) is refused instead of silently mis-edited.
    """
    values = samples.detach().to(device="cpu", dtype=torch.float64)  # MPS has no float64
    return {"shape": tuple(samples.shape), "sum": float(values.sum()),
            "abs_sum": float(values.abs().sum())}


__all__ = ["frames_latent", "latent_fingerprint"]
