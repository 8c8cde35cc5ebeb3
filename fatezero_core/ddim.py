"""Deterministic DDIM (eta = 0): noise schedules, single steps, inversion and sampling loops.

Notation. ``alpha_bar`` (written a below) is the cumulative product of (1 - beta); ``z`` is the
variance-preserving (VP) latent, ``z_t = sqrt(a_t) z_0 + sqrt(1 - a_t) eps``. ComfyUI works with
the variance-exploding (VE) form ``x = z * sqrt(1 + sigma^2)`` and ``sigma = sqrt((1 - a) / a)``.

FateZero paper equations used here:

- eq. (2), denoise:  z_{t-1} = sqrt(a_{t-1}) (z_t - sqrt(1 - a_t) eps) / sqrt(a_t) + sqrt(1 - a_{t-1}) eps
- eq. (3), invert:   z_t = sqrt(a_t) (z_{t-1} - sqrt(1 - a_{t-1}) eps) / sqrt(a_{t-1}) + sqrt(1 - a_t) eps

Both move a latent along the same deterministic trajectory from one alpha_bar to another; they
differ only in direction (and, in the loops, in which latent the model sees).

Index conventions (see ``DDIMSchedule``):

- ``alpha_bars`` has N + 1 entries in inversion order: index 0 is the clean end, index N the
  noisiest. Inversion step j (0..N-1) goes from ``alpha_bars[j]`` to ``alpha_bars[j + 1]``.
- ``timesteps[j]`` is the train timestep of ``alpha_bars[j + 1]``: the timestep at which the model
  is evaluated in inversion step j and in denoise step i = N - 1 - j.

Pure PyTorch; no host imports.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from .errors import FateZeroError

Scalar = Union[float, int, torch.Tensor]
EpsFn = Callable[[torch.Tensor, int], torch.Tensor]
StepCallback = Callable[[int, torch.Tensor], None]

SCHEDULE_ENDS = ("comfy", "official")


# --------------------------------------------------------------------------------------------
# Noise tables
# --------------------------------------------------------------------------------------------

def sd1_alphas_cumprod(
    num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> torch.Tensor:
    """alpha_bar[t] for Stable Diffusion 1.x, t = 0..T-1, float64.

    "scaled_linear" betas: ``beta = linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2`` and
    ``alpha_bar[t] = prod_{s<=t} (1 - beta_s)``. alpha_bar[0] = 1 - 0.00085 = 0.99915.
    """
    if num_train_timesteps < 2:
        raise FateZeroError(
            f"num_train_timesteps must be at least 2, got {num_train_timesteps}; "
            "Stable Diffusion 1.x uses 1000."
        )
    betas = torch.linspace(
        beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64
    ) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """VE noise level of each alpha_bar: ``sigma = sqrt((1 - a) / a)`` (sigma 0 at a = 1)."""
    a = torch.as_tensor(alphas_cumprod)
    return ((1.0 - a) / a).sqrt()


def alphas_cumprod_from_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """alpha_bar of each VE noise level: ``a = 1 / (1 + sigma^2)`` (inverse of the above)."""
    s = torch.as_tensor(sigmas)
    return 1.0 / (1.0 + s * s)


# --------------------------------------------------------------------------------------------
# Step schedules
# --------------------------------------------------------------------------------------------

def _check_num_steps(num_steps: int, num_train_timesteps: int) -> int:
    if isinstance(num_steps, bool):
        raise FateZeroError(f"Steps must be a whole number, got {num_steps!r}.")
    try:
        num_steps = operator.index(num_steps)
    except TypeError:
        raise FateZeroError(f"Steps must be a whole number, got {num_steps!r}.") from None
    if num_steps < 1:
        raise FateZeroError(f"Steps must be at least 1, got {num_steps}; use e.g. 50.")
    if num_steps > num_train_timesteps:
        raise FateZeroError(
            f"Steps ({num_steps}) cannot exceed the model's {num_train_timesteps} training "
            "timesteps; use fewer steps (FateZero uses 50)."
        )
    return num_steps


def diffusers_timesteps(
    num_steps: int, num_train_timesteps: int = 1000, steps_offset: int = 1
) -> torch.Tensor:
    """Train timesteps of diffusers' ``DDIMScheduler`` ("leading" spacing), descending, int64.

    ``t_k = k * (T // N) + steps_offset`` for k = N-1 .. 0. SD1.x (T = 1000, offset 1):
    N = 50 -> 981, 961, ..., 21, 1; N = 5 -> 801, 601, 401, 201, 1.
    """
    num_steps = _check_num_steps(num_steps, num_train_timesteps)
    step = num_train_timesteps // num_steps
    timesteps = torch.arange(num_steps - 1, -1, -1, dtype=torch.int64) * step + steps_offset
    if steps_offset < 0 or int(timesteps[0]) >= num_train_timesteps:
        raise FateZeroError(
            f"{num_steps} steps with steps_offset {steps_offset} reach timestep "
            f"{int(timesteps[0])}, outside 0..{num_train_timesteps - 1}; use fewer steps."
        )
    return timesteps


def ddim_uniform_sigmas(sigmas_table: torch.Tensor, num_steps: int) -> torch.Tensor:
    """The sigmas ComfyUI 0.3.64's ``ddim_uniform`` scheduler gives for ``model_sampling.sigmas``.

    ``sigmas_table`` is the ascending per-timestep table (T entries, index = train timestep).
    With ``d = max(T // N, 1)`` the scheduler takes the table at t = 1, 1 + d, 1 + 2d, ... (< T),
    reverses them and appends 0, so the result is descending and ends with sigma 0 (alpha_bar 1).
    These are exactly the diffusers timesteps ``t = 1 + k d`` (``diffusers_timesteps``) whenever
    ``N < T`` and ``T mod N <= 1`` (for T = 1000: N = 5, 8, 10, 20, 25, 40, 50, 100, ...):
    length N + 1. For other N the host keeps going up to T - 1 and returns
    ``ceil((T - 1) / d)`` steps instead of N (31 for N = 30, 999 for N = 1000); this function
    reproduces that.
    If ``sigmas_table[1]`` is ~0 (abs 1e-5) the host uses N + 1 for the spacing and appends no 0.

    Values are taken from the table unchanged, in its dtype (ComfyUI's table is float32, so the
    result then matches the host's bit for bit).
    """
    table = torch.as_tensor(sigmas_table)
    if table.ndim != 1 or table.numel() < 2:
        raise FateZeroError(
            "The sigma table must be a 1-D tensor with one entry per training timestep "
            f"(model_sampling.sigmas); got shape {tuple(table.shape)}."
        )
    steps = _check_num_steps(num_steps, table.numel())
    starts_at_zero = math.isclose(float(table[1]), 0.0, abs_tol=1e-5)
    if starts_at_zero:
        steps += 1
    spacing = max(table.numel() // steps, 1)
    picked = table[torch.arange(1, table.numel(), spacing)].flip(0)
    if starts_at_zero:
        return picked
    return torch.cat([picked, picked.new_zeros(1)])


# --------------------------------------------------------------------------------------------
# Schedule object
# --------------------------------------------------------------------------------------------

def _as_float64_vector(values, what: str) -> torch.Tensor:
    try:
        vec = torch.as_tensor(values).detach().to("cpu", torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise FateZeroError(f"{what} must be a list or 1-D tensor of numbers ({exc}).") from exc
    if vec.ndim != 1 or vec.numel() < 2:
        raise FateZeroError(
            f"{what} must be a 1-D list of at least 2 values (N steps need N + 1); "
            f"got shape {tuple(vec.shape)}."
        )
    if not torch.isfinite(vec).all():
        raise FateZeroError(f"{what} contains inf or NaN; check the schedule that feeds it.")
    return vec


def nearest_timesteps(sigmas: torch.Tensor, sigmas_table: torch.Tensor) -> torch.Tensor:
    """Train timestep of each positive sigma: index of the nearest table entry in log sigma.

    Same rule as ComfyUI's ``ModelSamplingDiscrete.timestep``. Returns int64.
    """
    log_table = torch.as_tensor(sigmas_table).to("cpu", torch.float64).log()
    log_s = torch.as_tensor(sigmas).to("cpu", torch.float64).log()
    return (log_s[None, :] - log_table[:, None]).abs().argmin(dim=0)


@dataclass(frozen=True, eq=False)
class DDIMSchedule:
    """One deterministic DDIM schedule, stored in inversion order.

    Fields:
        alpha_bars: float64, length N + 1, ascending noise (descending values). ``alpha_bars[0]``
            is the clean end (1.0 for sigma 0), ``alpha_bars[N]`` the noisiest. Inversion step j
            goes ``alpha_bars[j] -> alpha_bars[j + 1]``; denoise step i goes
            ``alpha_bars[N - i] -> alpha_bars[N - 1 - i]``.
        timesteps: int64, length N, ascending, or None when unknown. ``timesteps[j]`` is the train
            timestep of ``alpha_bars[j + 1]``, where the model runs in inversion step j and in
            denoise step N - 1 - j.
    """

    alpha_bars: torch.Tensor
    timesteps: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        a = self.alpha_bars
        if not isinstance(a, torch.Tensor) or a.dtype != torch.float64 or a.ndim != 1:
            raise FateZeroError("DDIMSchedule.alpha_bars must be a 1-D float64 tensor.")
        if a.numel() < 2:
            raise FateZeroError("A DDIM schedule needs at least 1 step (2 alpha_bar values).")
        if not torch.isfinite(a).all() or (a <= 0).any() or (a > 1).any():
            raise FateZeroError("alpha_bar values must lie in (0, 1]; check the sigmas given.")
        if not (a[1:] < a[:-1]).all():
            raise FateZeroError(
                "alpha_bars must strictly decrease (noise must rise step by step from the clean "
                "end); remove repeated values or reverse the schedule."
            )
        if self.timesteps is not None and tuple(self.timesteps.shape) != (a.numel() - 1,):
            raise FateZeroError(
                f"timesteps must have one entry per step ({a.numel() - 1}); "
                f"got shape {tuple(self.timesteps.shape)}."
            )

    @property
    def num_steps(self) -> int:
        """N, the number of DDIM steps."""
        return self.alpha_bars.numel() - 1

    def sigmas_ascending(self) -> torch.Tensor:
        """VE sigmas in inversion order ``[s_0, ..., s_N]`` (s_0 = 0 when alpha_bars[0] = 1)."""
        return sigmas_from_alphas_cumprod(self.alpha_bars)

    def sigmas_descending(self) -> torch.Tensor:
        """VE sigmas in denoising order ``[s_N, ..., s_0]``, as a host sampler takes them."""
        return self.sigmas_ascending().flip(0)

    @classmethod
    def from_sigmas(
        cls, inversion_sigmas, sigmas_table: Optional[torch.Tensor] = None
    ) -> "DDIMSchedule":
        """Schedule from ascending sigmas ``[s_0, s_1, ..., s_N]`` (s_0 usually 0).

        This is the order a host passes to an inversion sampler (the reversed ``ddim_uniform``
        sigmas). ``alpha_bar = 1 / (1 + sigma^2)``. With ``sigmas_table`` (the model's per-timestep
        sigmas) the timesteps are filled in by nearest log sigma; otherwise they are None.
        """
        sig = _as_float64_vector(inversion_sigmas, "Inversion sigmas")
        if sig[0] < 0:
            raise FateZeroError(f"Sigmas cannot be negative; the first one is {float(sig[0])}.")
        if not (sig[1:] > sig[:-1]).all():
            hint = (
                "they run high to low: flip them for inversion (clean end, sigma 0, first)"
                if sig[0] > sig[-1]
                else "remove repeated values"
            )
            raise FateZeroError(f"Inversion sigmas must strictly increase; {hint}.")
        timesteps = None if sigmas_table is None else nearest_timesteps(sig[1:], sigmas_table)
        return cls(alphas_cumprod_from_sigmas(sig), timesteps)

    @classmethod
    def sd1(cls, num_steps: int, end: str = "comfy") -> "DDIMSchedule":
        """SD1.x schedule on the diffusers timesteps ``t_j = 1 + j * (1000 // N)`` (ascending).

        ``alpha_bars[j + 1] = alpha_bar[t_j]``. The clean end ``alpha_bars[0]`` depends on ``end``:

        - ``"comfy"``: 1.0 (sigma 0), where ComfyUI's ``ddim_uniform`` schedule ends.
        - ``"official"``: alpha_bar[0] = 0.99915 (sigma ~0.029). The official FateZero code uses
          diffusers' DDIMScheduler with ``set_alpha_to_one=False``: its first inversion step comes
          from ``t - Delta < 0`` and then uses ``alpha_final = alphas_cumprod[0]``, and its last
          denoise step lands there too (design.md decision 3).

        The two differ only in the first inversion step and the last denoise step (~0.03 x eps).
        For N with ``1000 mod N > 1`` ComfyUI's ``ddim_uniform`` returns more steps than N (see
        ``ddim_uniform_sigmas``); build the host's schedule with ``from_sigmas`` in that case.
        """
        if end not in SCHEDULE_ENDS:
            raise FateZeroError(f"Schedule end must be one of {SCHEDULE_ENDS}, got {end!r}.")
        alphas_cumprod = sd1_alphas_cumprod()
        timesteps = diffusers_timesteps(num_steps, alphas_cumprod.numel()).flip(0)
        clean = torch.ones(1, dtype=torch.float64) if end == "comfy" else alphas_cumprod[:1]
        return cls(torch.cat([clean, alphas_cumprod[timesteps]]), timesteps)


# --------------------------------------------------------------------------------------------
# Single steps
# --------------------------------------------------------------------------------------------

def _alpha_bar(value: Scalar, name: str) -> float:
    a = float(value)
    if not 0.0 < a <= 1.0:
        raise FateZeroError(f"{name} must lie in (0, 1], got {a}.")
    return a


def _ddim_move(z: torch.Tensor, eps: torch.Tensor, a_from: float, a_to: float) -> torch.Tensor:
    """``sqrt(a_to) (z - sqrt(1 - a_from) eps) / sqrt(a_from) + sqrt(1 - a_to) eps`` in z's dtype.

    Coefficients are computed in float64 and applied as ``c_z * z + c_eps * eps``.
    """
    c_z = math.sqrt(a_to / a_from)
    c_eps = math.sqrt(1.0 - a_to) - math.sqrt(a_to) * math.sqrt(1.0 - a_from) / math.sqrt(a_from)
    return z * c_z + eps.to(z.dtype) * c_eps


def ddim_invert_step(
    z: torch.Tensor, eps: torch.Tensor, alpha_bar_from: Scalar, alpha_bar_to: Scalar
) -> torch.Tensor:
    """One inversion step, paper eq. (3), toward more noise (alpha_bar_to <= alpha_bar_from).

    ``z_t = sqrt(a_t) (z_{t-1} - sqrt(1 - a_{t-1}) eps) / sqrt(a_{t-1}) + sqrt(1 - a_t) eps``
    with ``a_{t-1} = alpha_bar_from`` and ``a_t = alpha_bar_to``.
    """
    a_from = _alpha_bar(alpha_bar_from, "alpha_bar_from")
    a_to = _alpha_bar(alpha_bar_to, "alpha_bar_to")
    if a_to > a_from:
        raise FateZeroError(
            f"An inversion step must add noise (alpha_bar_to {a_to} <= alpha_bar_from {a_from}); "
            "use ddim_denoise_step to go the other way."
        )
    return _ddim_move(z, eps, a_from, a_to)


def ddim_denoise_step(
    z: torch.Tensor, eps: torch.Tensor, alpha_bar_from: Scalar, alpha_bar_to: Scalar
) -> torch.Tensor:
    """One DDIM (eta 0) denoising step, paper eq. (2), toward less noise (to >= from).

    ``z_{t-1} = sqrt(a_{t-1}) (z_t - sqrt(1 - a_t) eps) / sqrt(a_t) + sqrt(1 - a_{t-1}) eps``
    with ``a_t = alpha_bar_from`` and ``a_{t-1} = alpha_bar_to``. With ``alpha_bar_to = 1`` this
    is the clean estimate ``x0 = (z - sqrt(1 - a_t) eps) / sqrt(a_t)``.
    """
    a_from = _alpha_bar(alpha_bar_from, "alpha_bar_from")
    a_to = _alpha_bar(alpha_bar_to, "alpha_bar_to")
    if a_to < a_from:
        raise FateZeroError(
            f"A denoising step must remove noise (alpha_bar_to {a_to} >= alpha_bar_from {a_from}); "
            "use ddim_invert_step to go the other way."
        )
    return _ddim_move(z, eps, a_from, a_to)


# --------------------------------------------------------------------------------------------
# Loops
# --------------------------------------------------------------------------------------------

def ddim_invert(
    eps_fn: EpsFn,
    z0: torch.Tensor,
    schedule: DDIMSchedule,
    callback: Optional[StepCallback] = None,
) -> list[torch.Tensor]:
    """DDIM inversion (eq. 3 per step); returns all N + 1 latents ``[z_0, z_1, ..., z_N]``.

    Step j (0..N-1) calls ``eps = eps_fn(z_j, j)``: the model must be evaluated at the NEXT
    timestep, ``schedule.timesteps[j]`` (alpha_bars[j + 1]), with the current latent z_j, as the
    official ``next_clean2noise_step`` does. Then
    ``z_{j+1} = ddim_invert_step(z_j, eps, alpha_bars[j], alpha_bars[j + 1])`` and
    ``callback(j, z_{j+1})`` if given. ``z_0`` is the input itself.
    """
    a = schedule.alpha_bars
    latents = [z0]
    z = z0
    for j in range(schedule.num_steps):
        eps = eps_fn(z, j)
        z = ddim_invert_step(z, eps, a[j], a[j + 1])
        latents.append(z)
        if callback is not None:
            callback(j, z)
    return latents


def ddim_sample(
    eps_fn: EpsFn,
    z_T: torch.Tensor,
    schedule: DDIMSchedule,
    callback: Optional[StepCallback] = None,
) -> torch.Tensor:
    """Deterministic DDIM sampling (eq. 2 per step) from ``z_T``; returns the clean-end latent.

    Step i (0..N-1) calls ``eps = eps_fn(z, i)``, with the model at timestep
    ``schedule.timesteps[N - 1 - i]`` (the timestep of inversion step N - 1 - i), then goes
    ``alpha_bars[N - i] -> alpha_bars[N - 1 - i]`` and calls ``callback(i, z)`` if given.
    """
    a = schedule.alpha_bars
    n = schedule.num_steps
    z = z_T
    for i in range(n):
        j = n - 1 - i
        eps = eps_fn(z, i)
        z = ddim_denoise_step(z, eps, a[j + 1], a[j])
        if callback is not None:
            callback(i, z)
    return z


def inversion_step_for_edit_step(i: int, num_steps: int) -> int:
    """Inversion step whose captured data belongs to denoise (edit) step i: ``N - 1 - i``.

    Denoise step i runs the model at ``timesteps[N - 1 - i]``, the timestep at which inversion
    step N - 1 - i ran it, so the timesteps match exactly (reference doc 3.2: store index
    ``len(store) - 1 - i``), although the inversion model input was the less noisy latent.
    """
    if not 0 <= i < num_steps:
        raise FateZeroError(
            f"Edit step {i} is outside 0..{num_steps - 1}; the edit must use the same number of "
            "steps as the inversion."
        )
    return num_steps - 1 - i


# --------------------------------------------------------------------------------------------
# Host (VE) form
# --------------------------------------------------------------------------------------------

def _ve_scale(sigma: Scalar, like: torch.Tensor) -> torch.Tensor:
    """``sqrt(1 + sigma^2)`` in ``like``'s dtype/device; a per-sample sigma broadcasts on dim 0."""
    # On the CPU: some devices (MPS) have no float64.
    s = torch.as_tensor(sigma).detach().to(device="cpu", dtype=torch.float64)
    scale = (1.0 + s * s).sqrt().to(device=like.device, dtype=like.dtype)
    if scale.ndim == 1 and scale.numel() > 1:
        scale = scale.view(-1, *([1] * (like.ndim - 1)))
    return scale


def vp_to_ve(z: torch.Tensor, sigma: Scalar) -> torch.Tensor:
    """Host sampler state from a VP latent: ``x = z * sqrt(1 + sigma^2)`` (= z / sqrt(alpha_bar))."""
    return z * _ve_scale(sigma, z)


def ve_to_vp(x: torch.Tensor, sigma: Scalar) -> torch.Tensor:
    """VP latent from the host sampler state: ``z = x / sqrt(1 + sigma^2)``."""
    return x / _ve_scale(sigma, x)


__all__ = [
    "DDIMSchedule",
    "SCHEDULE_ENDS",
    "alphas_cumprod_from_sigmas",
    "ddim_denoise_step",
    "ddim_invert",
    "ddim_invert_step",
    "ddim_sample",
    "ddim_uniform_sigmas",
    "diffusers_timesteps",
    "inversion_step_for_edit_step",
    "nearest_timesteps",
    "sd1_alphas_cumprod",
    "sigmas_from_alphas_cumprod",
    "ve_to_vp",
    "vp_to_ve",
]
