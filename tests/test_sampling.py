"""The shipping sampler loops and schedule (fatezero_core.sampling), against the DDIM equations.

References are written from the paper's equations in VP form (eq. 2 denoise, eq. 3 invert) with
``a = 1 / (1 + sigma^2)``, not from the loops' VE arithmetic.
"""

from __future__ import annotations

import math

import pytest
import torch

from ddim_reference import SIGMA_TABLE as TABLE, eps_denoiser
from fatezero_core.ddim import ve_to_vp
from fatezero_core.errors import FateZeroError
from fatezero_core.sampling import latent_blend_step, official_sigmas, sample_ddim, sample_ddim_inversion, step_of_sigma


def alpha(sigma) -> float:
    return 1.0 / (1.0 + float(sigma) ** 2)


def test_official_sigmas_are_the_official_timesteps():
    for steps in (50, 30, 10):
        delta = 1000 // steps
        sigmas = official_sigmas(TABLE, steps)
        expected = [TABLE[1 + k * delta] for k in range(steps - 1, -1, -1)]
        assert len(sigmas) == steps + 1  # ddim_uniform gives 31 sigmas + end for 30 steps
        assert torch.equal(sigmas[:-1], torch.stack(expected)) and sigmas[-1] == 0
    official_end = official_sigmas(TABLE, 10, "official")[-1]
    assert math.isclose(alpha(official_end), 0.99915, rel_tol=1e-6)  # alphas_cumprod[0]


def test_official_sigmas_floor_the_spacing_and_refuse_steps_past_the_table():
    # diffusers' set_timesteps for 7 steps: 1000 // 7 = 142, so the schedule stops at 853.
    timesteps = [853, 711, 569, 427, 285, 143, 1]
    assert torch.equal(official_sigmas(TABLE, 7)[:-1], TABLE[timesteps])
    lcm_table = TABLE[19::20]  # ComfyUI's distilled (LCM) model sampling keeps 50 timesteps
    assert torch.equal(official_sigmas(lcm_table, 10)[:-1], lcm_table[[46, 41, 36, 31, 26, 21, 16, 11, 6, 1]])
    with pytest.raises(FateZeroError, match="cannot exceed the model's 50 training timesteps"):
        official_sigmas(lcm_table, 51)
    with pytest.raises(FateZeroError, match="reach timestep 50"):
        official_sigmas(lcm_table, 50)


def test_inversion_follows_eq3_and_sampling_eq2_walks_back():
    g = torch.Generator().manual_seed(7)
    z0 = torch.randn(3, 4, 8, 8, generator=g)
    base = torch.randn(3, 4, 8, 8, generator=g)
    model = eps_denoiser(lambda z, t: base * (1 + float(TABLE[t])))  # content-independent, sigma-dependent
    sigmas = official_sigmas(TABLE, 5, "official").flip(0)
    seen = []
    x_T = sample_ddim_inversion(model, z0, sigmas, on_step=lambda j, z: seen.append(z))
    z = z0.double()
    for j in range(5):
        a, a_next = alpha(sigmas[j]), alpha(sigmas[j + 1])
        eps = (base * (1 + float(sigmas[j + 1]))).double()  # evaluated at the next sigma
        z = math.sqrt(a_next) * (z - math.sqrt(1 - a) * eps) / math.sqrt(a) + math.sqrt(1 - a_next) * eps
        assert torch.allclose(seen[j].double(), z, atol=1e-5), j
    assert torch.allclose(x_T.double(), z / math.sqrt(alpha(sigmas[-1])), atol=1e-4)  # VE out
    back = sample_ddim(model, x_T, sigmas.flip(0))
    assert torch.allclose(ve_to_vp(back, sigmas[0]), z0, atol=1e-4)  # a content-independent eps inverts exactly


@pytest.mark.parametrize("end", ["comfy", "official"])
def test_both_loops_return_x_at_the_last_sigma_as_every_k_diffusion_sampler(end):
    """k-diffusion's contract (ComfyUI ``comfy/k_diffusion/sampling.py``, e.g. ``sample_euler``): a
    sampler returns the state ``x`` at ``sigmas[-1]``, whatever the path; the edit loop's state is
    the Euler step ``x + (x - D(x, s)) / s * (s' - s)`` written here from that definition, the
    inversion's the VE form ``z * sqrt(1 + s^2)`` of its last latent. With the official end
    (sigma ~0.029) x and the VP latent differ by sqrt(1 + s^2), 1.00042."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(2, 4, 8, 8, generator=g)
    model = eps_denoiser(lambda z, t: base * (1 + 0.01 * t))
    sigmas = official_sigmas(TABLE, 5, end)
    x = torch.randn(2, 4, 8, 8, generator=g) * float(sigmas[0])
    expected = x
    for i in range(5):
        s, s_next = sigmas[i], sigmas[i + 1]
        expected = expected + (expected - model(expected, s.reshape(1))) / s * (s_next - s)
    assert torch.equal(sample_ddim(model, x, sigmas), expected)
    seen = []
    inverted = sample_ddim_inversion(model, x, sigmas.flip(0), on_step=lambda j, z: seen.append(z))
    scale = math.sqrt(1 + float(sigmas[0]) ** 2)
    torch.testing.assert_close(inverted, seen[-1] * scale, rtol=1e-6, atol=0)


def test_latent_blend_keeps_the_source_outside_the_mask():
    sigmas = official_sigmas(TABLE, 4)
    mask = torch.zeros(2, 1, 4, 4)
    mask[..., :2] = 1
    source = torch.full((2, 4, 4, 4), 3.0)

    class Masks:
        def latent_blend_mask(self, i, size):
            return mask if i == 1 else None

        def latent_blend_source_index(self, i):
            return 7

    class Store:
        def latent(self, j):
            assert j == 7
            return source

    blended = []

    def after_step(i, x, sigma_next):
        out = latent_blend_step(Masks(), Store())(i, x, sigma_next)
        blended.append((i, out / math.sqrt(1 + float(sigma_next) ** 2), x / math.sqrt(1 + float(sigma_next) ** 2)))
        return out

    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1)) * float(sigmas[0])
    sample_ddim(eps_denoiser(lambda z, t: torch.zeros_like(z)), x, sigmas, after_step=after_step)
    for i, z_out, z_in in blended:
        if i == 1:
            assert torch.allclose(z_out[..., 2:], source[..., 2:]) and torch.allclose(z_out[..., :2], z_in[..., :2])
        else:
            assert torch.equal(z_out, z_in)


class NoFloat64Tensor(torch.Tensor):
    """A tensor on a device without float64 (as MPS): a float64 result that is not a plain CPU
    tensor raises; moving it to the CPU gives a plain tensor."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **(kwargs or {}))
        if func in (torch.Tensor.cpu, torch.Tensor.tolist) or (
                func is torch.Tensor.to and "cpu" in [str(a) for a in (*args[1:], *(kwargs or {}).values())]):
            return out
        if isinstance(out, torch.Tensor):
            if out.dtype == torch.float64:
                raise TypeError("this device has no float64")
            return out.as_subclass(cls)
        return out


def test_loops_compute_the_schedule_on_the_cpu():
    """Sigmas on a device without float64 (MPS): inversion and editing still run."""
    sigmas = official_sigmas(TABLE, 3).flip(0).as_subclass(NoFloat64Tensor)
    with pytest.raises(TypeError):
        sigmas.double()  # the stand-in refuses float64 as MPS does
    model = eps_denoiser(lambda z, t: torch.zeros_like(z))
    x = torch.randn(2, 4, 8, 8)
    inverted = sample_ddim_inversion(model, x, sigmas)
    edited = sample_ddim(model, inverted, sigmas.flip(0))
    assert torch.isfinite(torch.as_tensor(edited)).all()


# ------------------------------------------------------------ which step an evaluation belongs to
EDIT_SIGMAS = torch.tensor([14.6, 4.0, 1.0, 0.25, 0.0413])  # descending, official (non-zero) end


@pytest.mark.parametrize("i", range(4))
def test_a_schedule_sigma_is_its_own_step(i):
    assert step_of_sigma(EDIT_SIGMAS, EDIT_SIGMAS[i : i + 1]) == i
    ascending = EDIT_SIGMAS.flip(0)
    assert step_of_sigma(ascending, ascending[i + 1 : i + 2]) == i + 1  # the inversion's evaluation


@pytest.mark.parametrize("i", range(4))
def test_a_midpoint_reads_the_nearest_noise_level(i):
    """dpm_2 evaluates at sqrt(s_i s_{i+1}), nearer s_{i+1}: it reads step i + 1, except on the last
    step, whose midpoint (a non-zero end) lies nearest the end sigma, where no step starts."""
    mid = (EDIT_SIGMAS[i] * EDIT_SIGMAS[i + 1]).sqrt().reshape(1)
    assert step_of_sigma(EDIT_SIGMAS, mid) == min(i + 1, 3)


def test_sigmas_at_or_past_the_ends_clamp():
    assert step_of_sigma(EDIT_SIGMAS, torch.tensor([20.0])) == 0
    assert step_of_sigma(EDIT_SIGMAS, torch.tensor([0.01])) == 3
    assert step_of_sigma(EDIT_SIGMAS, EDIT_SIGMAS[-1:]) == 3  # the end: the last step's own
