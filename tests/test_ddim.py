"""Tests for fatezero_core.ddim: schedules, single steps, inversion/sampling round trips."""

import math

import pytest
import torch

from fatezero_core.ddim import (
    DDIMSchedule,
    alphas_cumprod_from_sigmas,
    ddim_denoise_step,
    ddim_invert,
    ddim_invert_step,
    ddim_sample,
    ddim_uniform_sigmas,
    diffusers_timesteps,
    inversion_step_for_edit_step,
    sd1_alphas_cumprod,
    sigmas_from_alphas_cumprod,
    ve_to_vp,
    vp_to_ve,
)
from fatezero_core.errors import FateZeroError

ENDS = ("comfy", "official")


def sd1_sigma_table() -> torch.Tensor:
    """SD1 per-timestep sigmas as the host stores them (float32, ascending, 1000 entries)."""
    return sigmas_from_alphas_cumprod(sd1_alphas_cumprod()).float()


def random_pair(dtype=torch.float64, shape=(2, 4, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=g, dtype=torch.float64)
    b = torch.randn(shape, generator=g, dtype=torch.float64)
    return a.to(dtype), b.to(dtype)


# ---------------------------------------------------------------------------------------------
# Tables and timesteps
# ---------------------------------------------------------------------------------------------

def test_sd1_alphas_cumprod_known_values():
    a = sd1_alphas_cumprod()
    assert a.dtype == torch.float64 and a.shape == (1000,)
    assert a[0].item() == pytest.approx(1 - 0.00085, abs=1e-12)
    assert (a[1:] < a[:-1]).all()
    # Last SD1 value; its sigma is the familiar ~14.61 sigma_max.
    assert a[-1].item() == pytest.approx(0.0046, abs=1e-4)
    assert sigmas_from_alphas_cumprod(a)[-1].item() == pytest.approx(14.6146, abs=1e-3)


def test_sigma_alpha_conversions_are_inverse():
    a = sd1_alphas_cumprod()
    torch.testing.assert_close(alphas_cumprod_from_sigmas(sigmas_from_alphas_cumprod(a)), a)
    assert alphas_cumprod_from_sigmas(torch.tensor(0.0, dtype=torch.float64)).item() == 1.0


def test_diffusers_timesteps_50_steps():
    t = diffusers_timesteps(50)
    assert t.dtype == torch.int64
    assert t.tolist() == list(range(981, 0, -20))
    assert t[0] == 981 and t[-1] == 1 and len(t) == 50


def test_diffusers_timesteps_5_steps():
    assert diffusers_timesteps(5).tolist() == [801, 601, 401, 201, 1]


def test_diffusers_timesteps_uneven_division_uses_floor_spacing():
    # 1000 // 7 = 142: the schedule stops at 853, short of the top of the table.
    assert diffusers_timesteps(7).tolist() == [853, 711, 569, 427, 285, 143, 1]


@pytest.mark.parametrize("n", [5, 10, 50])
def test_ddim_uniform_equals_sigmas_at_diffusers_timesteps(n):
    table = sd1_sigma_table()
    got = ddim_uniform_sigmas(table, n)
    expected = torch.cat([table[diffusers_timesteps(n)], torch.zeros(1)])
    assert got.shape == (n + 1,)
    assert torch.equal(got, expected)
    assert got[-1] == 0 and (got[1:] < got[:-1]).all()


def test_ddim_uniform_keeps_going_when_steps_do_not_divide_1000():
    # Host behaviour (ComfyUI 0.3.64 ddim_uniform): spacing 1000 // 30 = 33 and it takes every
    # table entry 1, 34, ..., 991 below 1000, i.e. 31 steps for 30 requested.
    table = sd1_sigma_table()
    got = ddim_uniform_sigmas(table, 30)
    assert got.shape == (32,)
    assert torch.equal(got[:-1], table[torch.arange(1, 1000, 33)].flip(0))


def test_ddim_uniform_table_starting_at_zero_gets_no_extra_zero():
    table = sd1_sigma_table().clone()
    table[:2] = 0.0
    got = ddim_uniform_sigmas(table, 5)
    # Spacing uses 6 steps: 1000 // 6 = 166 -> t = 1, 167, ..., 997 (descending), no appended 0.
    assert torch.equal(got, table[torch.arange(1, 1000, 166)].flip(0))


# ---------------------------------------------------------------------------------------------
# DDIMSchedule
# ---------------------------------------------------------------------------------------------

def test_sd1_schedule_ends():
    comfy = DDIMSchedule.sd1(50, end="comfy")
    official = DDIMSchedule.sd1(50, end="official")
    assert comfy.alpha_bars[0].item() == 1.0
    assert official.alpha_bars[0].item() == pytest.approx(0.99915, abs=1e-5)
    assert comfy.sigmas_ascending()[0].item() == 0.0
    assert official.sigmas_ascending()[0].item() == pytest.approx(0.0292, abs=1e-4)
    # Everything but the clean end is shared.
    assert torch.equal(comfy.alpha_bars[1:], official.alpha_bars[1:])
    assert torch.equal(comfy.timesteps, official.timesteps)


def test_sd1_schedule_layout():
    s = DDIMSchedule.sd1(50)
    assert s.num_steps == 50
    assert s.alpha_bars.dtype == torch.float64 and s.alpha_bars.shape == (51,)
    assert s.timesteps.tolist() == list(range(1, 1000, 20))  # ascending, inversion order
    torch.testing.assert_close(s.alpha_bars[1:], sd1_alphas_cumprod()[s.timesteps])
    assert torch.equal(s.sigmas_descending(), s.sigmas_ascending().flip(0))


@pytest.mark.parametrize("n", [5, 10, 50])
def test_sd1_comfy_schedule_matches_host_ddim_uniform(n):
    table = sd1_sigma_table()
    host = ddim_uniform_sigmas(table, n)
    sched = DDIMSchedule.sd1(n, end="comfy")
    # The host table is float32; ours is float64.
    torch.testing.assert_close(sched.sigmas_descending(), host.double(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("n", [5, 50])
def test_from_sigmas_recovers_timesteps_and_alphas(n):
    table = sd1_sigma_table()
    inversion_sigmas = ddim_uniform_sigmas(table, n).flip(0)  # [0, s_1, ..., s_N]
    from_host = DDIMSchedule.from_sigmas(inversion_sigmas, sigmas_table=table)
    sd1 = DDIMSchedule.sd1(n, end="comfy")
    assert from_host.num_steps == n
    assert torch.equal(from_host.timesteps, sd1.timesteps)
    torch.testing.assert_close(from_host.alpha_bars, sd1.alpha_bars, rtol=1e-6, atol=0)
    assert DDIMSchedule.from_sigmas(inversion_sigmas).timesteps is None


def test_from_sigmas_accepts_a_list():
    s = DDIMSchedule.from_sigmas([0.0, 0.5, 2.0])
    assert s.num_steps == 2
    torch.testing.assert_close(
        s.alpha_bars, torch.tensor([1.0, 1 / 1.25, 1 / 5.0], dtype=torch.float64)
    )


# ---------------------------------------------------------------------------------------------
# Single steps
# ---------------------------------------------------------------------------------------------

def test_denoise_to_sigma_zero_with_true_eps_recovers_clean_latent():
    z0, eps = random_pair()
    a = sd1_alphas_cumprod()[501].item()
    z_t = math.sqrt(a) * z0 + math.sqrt(1 - a) * eps
    torch.testing.assert_close(ddim_denoise_step(z_t, eps, a, 1.0), z0, rtol=0, atol=1e-12)
    # Same as the clean estimate x0 = (z - sqrt(1-a) eps) / sqrt(a).
    x0 = (z_t - math.sqrt(1 - a) * eps) / math.sqrt(a)
    torch.testing.assert_close(ddim_denoise_step(z_t, eps, a, 1.0), x0, rtol=0, atol=1e-12)


def test_steps_follow_the_forward_process_with_true_eps():
    z0, eps = random_pair()
    ac = sd1_alphas_cumprod()
    a_lo, a_hi = ac[200], ac[700]  # 0-d float64 tensors
    z_lo = a_lo.sqrt() * z0 + (1 - a_lo).sqrt() * eps
    z_hi = a_hi.sqrt() * z0 + (1 - a_hi).sqrt() * eps
    torch.testing.assert_close(ddim_invert_step(z_lo, eps, a_lo, a_hi), z_hi, rtol=0, atol=1e-12)
    torch.testing.assert_close(ddim_denoise_step(z_hi, eps, a_hi, a_lo), z_lo, rtol=0, atol=1e-12)


def test_invert_step_matches_paper_eq3_written_out():
    z, eps = random_pair()
    a_prev, a_t = 0.9, 0.4
    expected = (
        math.sqrt(a_t) * (z - math.sqrt(1 - a_prev) * eps) / math.sqrt(a_prev)
        + math.sqrt(1 - a_t) * eps
    )
    torch.testing.assert_close(ddim_invert_step(z, eps, a_prev, a_t), expected, rtol=0, atol=1e-12)


def test_steps_compute_in_latent_dtype():
    z, eps = random_pair(dtype=torch.float32)
    out = ddim_denoise_step(z, eps.double(), torch.tensor(0.5, dtype=torch.float64), 0.9)
    assert out.dtype == torch.float32
    assert ddim_invert_step(z.half(), eps, 0.9, 0.5).dtype == torch.float16


# ---------------------------------------------------------------------------------------------
# Loops and round trips
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("end", ENDS)
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-6), (torch.float32, 3e-5)])
def test_round_trip_with_constant_eps_is_exact(end, dtype, atol):
    # Measured max abs error (N=50, |z0| up to ~3.1): ~3e-14 in float64, ~1.4e-5 in float32.
    sched = DDIMSchedule.sd1(50, end=end)
    z0, c = random_pair(dtype)
    latents = ddim_invert(lambda z, j: c, z0, sched)
    assert len(latents) == 51 and latents[0] is z0
    out = ddim_sample(lambda z, i: c, latents[-1], sched)
    assert out.dtype == dtype
    torch.testing.assert_close(out, z0, rtol=0, atol=atol)


def make_timestep_eps(schedule, z_weight):
    """eps as a function of (latent, model timestep); the timestep is looked up per direction."""
    n = schedule.num_steps
    t = schedule.timesteps

    def eps_at(z, timestep):
        return z_weight * torch.tanh(z) + 0.05 * math.sin(float(timestep) / 100.0)

    def invert_eps(z, j):
        return eps_at(z, t[j])

    def sample_eps(z, i):
        return eps_at(z, t[n - 1 - i])

    return invert_eps, sample_eps


@pytest.mark.parametrize("end", ENDS)
def test_round_trip_with_timestep_only_eps_is_exact(end):
    # eps independent of z: inversion and sampling see the same eps at each timestep, so the
    # round trip is exact. A wrong step <-> timestep mapping would break this.
    sched = DDIMSchedule.sd1(50, end=end)
    invert_eps, sample_eps = make_timestep_eps(sched, z_weight=0.0)
    z0, _ = random_pair()
    out = ddim_sample(sample_eps, ddim_invert(invert_eps, z0, sched)[-1], sched)
    torch.testing.assert_close(out, z0, rtol=0, atol=1e-10)


@pytest.mark.parametrize("end", ENDS)
def test_round_trip_with_smooth_eps_is_close_but_not_exact(end):
    # DDIM inversion step j evaluates eps at (z_j, t_{j+1}), the less noisy latent, while the
    # matching denoise step evaluates it at (z_{j+1}, t_{j+1}). When eps depends on z the two
    # differ by O(step size), so the round trip error is first order in 1/N.
    # Measured max abs error (|z0| up to ~3.1): N=50 0.0341, N=100 0.0180.
    z0, _ = random_pair()

    def round_trip_error(n):
        sched = DDIMSchedule.sd1(n, end=end)
        invert_eps, sample_eps = make_timestep_eps(sched, z_weight=0.1)
        out = ddim_sample(sample_eps, ddim_invert(invert_eps, z0, sched)[-1], sched)
        return (out - z0).abs().max().item()

    err50, err100 = round_trip_error(50), round_trip_error(100)
    assert 1e-3 < err50 <= 0.045
    assert err100 < 0.6 * err50


def test_invert_calls_eps_with_current_latent_and_step_index():
    sched = DDIMSchedule.sd1(5)
    z0, _ = random_pair()
    calls, seen = [], []
    latents = ddim_invert(
        lambda z, j: calls.append((z, j)) or 0.1 * z,
        z0,
        sched,
        callback=lambda j, z: seen.append((j, z)),
    )
    assert [j for _, j in calls] == [0, 1, 2, 3, 4]
    assert all(z is latents[j] for z, j in calls)  # eps_fn(z_j, j)
    assert [j for j, _ in seen] == [0, 1, 2, 3, 4]
    assert all(z is latents[j + 1] for j, z in seen)  # callback(j, z_{j+1})


def test_sample_walks_alpha_bars_backwards():
    sched = DDIMSchedule.sd1(5, end="official")
    z0, eps = random_pair()
    a = sched.alpha_bars
    z_T = a[-1].sqrt() * z0 + (1 - a[-1]).sqrt() * eps
    steps = []
    out = ddim_sample(lambda z, i: eps, z_T, sched, callback=lambda i, z: steps.append((i, z)))
    assert [i for i, _ in steps] == [0, 1, 2, 3, 4]
    # With the true eps every intermediate latent sits on the forward process at alpha_bars[N-1-i].
    for i, z in steps:
        ab = a[4 - i]
        torch.testing.assert_close(z, ab.sqrt() * z0 + (1 - ab).sqrt() * eps, rtol=0, atol=1e-12)
    # The official end stops at alpha_bar[0] = 0.99915, not at the clean latent.
    assert (out - z0).abs().max().item() > 1e-3


def test_inversion_step_for_edit_step():
    assert [inversion_step_for_edit_step(i, 5) for i in range(5)] == [4, 3, 2, 1, 0]
    sched = DDIMSchedule.sd1(50)
    # Edit step i and inversion step N-1-i run the model at the same timestep.
    assert sched.timesteps[inversion_step_for_edit_step(0, 50)] == 981
    assert sched.timesteps[inversion_step_for_edit_step(49, 50)] == 1


# ---------------------------------------------------------------------------------------------
# Host (VE) form
# ---------------------------------------------------------------------------------------------

def test_vp_ve_are_inverses():
    z, _ = random_pair(dtype=torch.float32)
    for sigma in (0.0, 0.0292, 3.0, torch.tensor(14.6)):
        x = vp_to_ve(z, sigma)
        torch.testing.assert_close(ve_to_vp(x, sigma), z)
    a = sd1_alphas_cumprod()[600]
    sigma = sigmas_from_alphas_cumprod(a)
    torch.testing.assert_close(vp_to_ve(z.double(), sigma), z.double() / a.sqrt())


def test_vp_ve_per_sample_sigma_broadcasts_on_batch():
    z, _ = random_pair(dtype=torch.float32)
    sigma = torch.tensor([0.5, 4.0])
    x = vp_to_ve(z, sigma)
    torch.testing.assert_close(x[1], z[1] * math.sqrt(17.0))
    torch.testing.assert_close(ve_to_vp(x, sigma), z)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [0, -3])
def test_too_few_steps_is_rejected(n):
    with pytest.raises(FateZeroError, match="at least 1"):
        diffusers_timesteps(n)
    with pytest.raises(FateZeroError, match="at least 1"):
        DDIMSchedule.sd1(n)
    with pytest.raises(FateZeroError, match="at least 1"):
        ddim_uniform_sigmas(sd1_sigma_table(), n)


def test_too_many_steps_is_rejected():
    with pytest.raises(FateZeroError, match="cannot exceed"):
        diffusers_timesteps(1001)
    # 1000 steps with offset 1 would need timestep 1000, past the end of the table.
    with pytest.raises(FateZeroError, match="reach timestep 1000"):
        diffusers_timesteps(1000)


def test_non_integer_steps_are_rejected():
    with pytest.raises(FateZeroError, match="whole number"):
        diffusers_timesteps(2.5)


def test_descending_inversion_sigmas_are_rejected_with_a_flip_hint():
    with pytest.raises(FateZeroError, match="flip"):
        DDIMSchedule.from_sigmas(ddim_uniform_sigmas(sd1_sigma_table(), 5))


@pytest.mark.parametrize(
    "sigmas,match",
    [
        ([0.0, 1.0, 1.0, 2.0], "strictly increase"),
        ([-0.1, 1.0], "negative"),
        ([0.0], "at least 2"),
        ([[0.0, 1.0]], "1-D"),
        ([0.0, float("nan")], "NaN"),
    ],
)
def test_bad_inversion_sigmas_are_rejected(sigmas, match):
    with pytest.raises(FateZeroError, match=match):
        DDIMSchedule.from_sigmas(sigmas)


def test_unknown_schedule_end_is_rejected():
    with pytest.raises(FateZeroError, match="comfy"):
        DDIMSchedule.sd1(10, end="paper")


def test_schedule_rejects_non_monotonic_alpha_bars():
    with pytest.raises(FateZeroError, match="strictly decrease"):
        DDIMSchedule(torch.tensor([0.5, 0.9], dtype=torch.float64))
    with pytest.raises(FateZeroError, match="float64"):
        DDIMSchedule(torch.tensor([1.0, 0.5]))


def test_step_direction_and_range_are_checked():
    z, eps = random_pair()
    with pytest.raises(FateZeroError, match="ddim_denoise_step"):
        ddim_invert_step(z, eps, 0.5, 0.9)
    with pytest.raises(FateZeroError, match="ddim_invert_step"):
        ddim_denoise_step(z, eps, 0.9, 0.5)
    with pytest.raises(FateZeroError, match=r"\(0, 1\]"):
        ddim_denoise_step(z, eps, 0.0, 0.5)


def test_edit_step_out_of_range_is_rejected():
    with pytest.raises(FateZeroError, match="same number of steps"):
        inversion_step_for_edit_step(5, 5)


def test_bad_sigma_table_is_rejected():
    with pytest.raises(FateZeroError, match="model_sampling.sigmas"):
        ddim_uniform_sigmas(torch.ones(2, 3), 5)
