"""The shipping DDIM loops and their arithmetic (fatezero_core.sampling, fatezero_core.ddim) against
the official code's DDIM, written from the spec in ``ddim_reference`` (diffusers' ``DDIMScheduler``
on integer timesteps, ``set_alpha_to_one=False``, ``steps_offset=1``)."""

import math

import pytest
import torch

import ddim_reference as ref
from fatezero_core.ddim import (alphas_cumprod_from_sigmas, ddim_invert_step, inversion_step_for_edit_step, ve_to_vp,
                                vp_to_ve)
from fatezero_core.errors import FateZeroError
from fatezero_core.sampling import official_sigmas, sample_ddim, sample_ddim_inversion

ENDS = ("comfy", "official")


def video_latent(seed=0, shape=(2, 4, 8, 8)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def smooth_eps(z, t):
    """An eps that depends on the latent and the timestep, as a trained model's does."""
    return 0.1 * torch.tanh(z) + 0.05 * math.sin(t / 100.0)


def test_reference_table_has_the_sd1_values():
    a = ref.ALPHAS_CUMPROD
    assert a[0].item() == pytest.approx(1 - 0.00085, abs=1e-12)
    assert a[-1].item() == pytest.approx(0.0046, abs=1e-4)
    assert ref.SIGMA_TABLE[-1].item() == pytest.approx(14.6146, abs=1e-3)  # SD1's sigma_max


def test_alpha_and_vp_ve_conversions():
    a = alphas_cumprod_from_sigmas(((1 - ref.ALPHAS_CUMPROD) / ref.ALPHAS_CUMPROD).sqrt())
    torch.testing.assert_close(a, ref.ALPHAS_CUMPROD)
    assert alphas_cumprod_from_sigmas(torch.tensor(0.0)).item() == 1.0
    z = video_latent()
    for sigma in (0.0, 0.0292, 3.0, torch.tensor(14.6)):
        torch.testing.assert_close(ve_to_vp(vp_to_ve(z, sigma), sigma), z)
    sigma = ref.SIGMA_TABLE[600].double()
    torch.testing.assert_close(vp_to_ve(z.double(), sigma), z.double() / ref.ALPHAS_CUMPROD[600].sqrt())


def test_invert_step_is_eq3_in_the_latent_dtype():
    z, eps = video_latent(1).double(), video_latent(2).double()
    a_prev, a_t = 0.9, 0.4
    expected = (math.sqrt(a_t) * (z - math.sqrt(1 - a_prev) * eps) / math.sqrt(a_prev)
                + math.sqrt(1 - a_t) * eps)
    torch.testing.assert_close(ddim_invert_step(z, eps, a_prev, a_t), expected, rtol=0, atol=1e-12)
    assert ddim_invert_step(z.half(), eps, torch.tensor(0.9, dtype=torch.float64), 0.5).dtype == torch.float16


@pytest.mark.parametrize("end", ENDS)
def test_inversion_and_edit_loops_are_the_official_ddim(end):
    """Every inversion latent and the edited result equal the official loops' (eps at the next
    timestep on the current latent while inverting; the clean end of ``end``). Measured max abs
    difference (float32 loops vs float64 reference): inversion 6.6e-7, edit 1.7e-6."""
    steps = 10
    z0 = video_latent()
    model = ref.eps_denoiser(smooth_eps)
    sigmas = official_sigmas(ref.SIGMA_TABLE, steps, end)
    seen = [z0]
    x_T = sample_ddim_inversion(model, z0, sigmas.flip(0), on_step=lambda j, z: seen.append(z))
    expected = ref.invert(smooth_eps, z0, steps, end)
    for j, (z, z_ref) in enumerate(zip(seen, expected)):
        torch.testing.assert_close(z.double(), z_ref, rtol=0, atol=1e-5, msg=f"inversion step {j}")
    torch.testing.assert_close(ve_to_vp(x_T, sigmas[0]).double(), expected[-1], rtol=0, atol=1e-5)
    edited = ve_to_vp(sample_ddim(model, x_T, sigmas), sigmas[-1])  # x at sigmas[-1] -> VP
    expected_edit = ref.sample(smooth_eps, expected[-1], steps, end)
    torch.testing.assert_close(edited.double(), expected_edit, rtol=0, atol=1e-5)


@pytest.mark.parametrize("end", ENDS)
def test_edit_loop_with_the_true_noise_walks_the_forward_process(end):
    """With the true eps every latent after edit step i is ``sqrt(a) z_0 + sqrt(1 - a) eps`` at the
    next sigma; the official end stops at alphas_cumprod[0] = 0.99915, short of z_0."""
    z0, eps = video_latent(1).double(), video_latent(2).double()
    sigmas = official_sigmas(ref.SIGMA_TABLE, 5, end).double()
    a = 1 / (1 + sigmas ** 2)
    x = vp_to_ve(a[0].sqrt() * z0 + (1 - a[0]).sqrt() * eps, sigmas[0])
    latents = []

    def after_step(i, x, sigma_next):
        latents.append(ve_to_vp(x, sigma_next))
        return x

    out = sample_ddim(ref.eps_denoiser(lambda z, t: eps), x, sigmas, after_step=after_step)
    assert len(latents) == 5
    for i, z in enumerate(latents):
        torch.testing.assert_close(z, a[i + 1].sqrt() * z0 + (1 - a[i + 1]).sqrt() * eps, rtol=0, atol=1e-10)
    torch.testing.assert_close(ve_to_vp(out, sigmas[-1]), latents[-1], rtol=0, atol=0)
    gap = (ve_to_vp(out, sigmas[-1]) - z0).abs().max().item()
    assert gap > 1e-3 if end == "official" else gap < 1e-10


@pytest.mark.parametrize("end", ENDS)
def test_round_trip_error_is_first_order_in_the_step_size(end):
    """Inversion step j evaluates eps at (z_j, t_{j+1}), the less noisy latent, the matching edit
    step at (z_{j+1}, t_{j+1}); when eps depends on z the round trip is off by O(1/N).
    Measured max abs error (|z0| up to 4.1): N=50 0.036, N=100 0.019."""
    z0 = video_latent().double()
    model = ref.eps_denoiser(smooth_eps)

    def round_trip_error(steps):
        sigmas = official_sigmas(ref.SIGMA_TABLE, steps, end).double()
        back = sample_ddim(model, sample_ddim_inversion(model, z0, sigmas.flip(0)), sigmas)
        return (ve_to_vp(back, sigmas[-1]) - z0).abs().max().item()

    err50, err100 = round_trip_error(50), round_trip_error(100)
    assert 1e-3 < err50 <= 0.045
    assert err100 < 0.6 * err50


def test_edit_step_reads_the_inversion_step_of_its_timestep():
    assert [inversion_step_for_edit_step(i, 5) for i in range(5)] == [4, 3, 2, 1, 0]
    # Edit step i runs at sigmas[i]; inversion step j = N-1-i ran at its next sigma, the same one.
    sigmas = official_sigmas(ref.SIGMA_TABLE, 50)
    inversion = sigmas.flip(0)
    for i in (0, 17, 49):
        assert inversion[inversion_step_for_edit_step(i, 50) + 1] == sigmas[i]
    with pytest.raises(FateZeroError, match="same number of steps"):
        inversion_step_for_edit_step(5, 5)
