"""Core of Tune-A-Video tuning (``fatezero_core.tav.train``), against the official settings and
definitions (``fatezero-reference-implementation.md`` section 4, "Tuning")."""

from __future__ import annotations

import pytest
import torch

from fatezero_core.attention import attention, video_self_attention
from fatezero_core.errors import FateZeroError
from fatezero_core.tav import checkpoint as tav
from fatezero_core.tav import train as core


def test_trainable_names_follow_the_official_rule():
    # train_tune_a_video.py: names ending in attn_temporal or .to_q, and conv_temporal; not norm_temporal
    for name in ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
                 "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_q.weight",
                 "attn_temporal.to_k.weight", "attn_temporal.to_out.0.bias",
                 "conv_temporal.down.weight", "conv_temporal.up.weight"):
        assert core.is_trainable(name), name
    for name in ("norm_temporal.weight", "norm_temporal.bias", "attn1.to_k.weight", "attn2.to_v.weight",
                 "attn1.to_out.0.weight", "norm1.weight", "ff.net.0.proj.weight"):
        assert not core.is_trainable(name), name


def test_official_defaults():
    assert core.OFFICIAL_LEARNING_RATE == 1e-5 and core.OFFICIAL_LORA_RANK == 160
    assert 150 <= core.OFFICIAL_STEPS <= 250 and core.OFFICIAL_SEED == 74831
    opt = core.make_optimizer([torch.nn.Parameter(torch.zeros(2))])
    group = opt.param_groups[0]
    assert isinstance(opt, torch.optim.AdamW)
    assert (group["lr"], group["betas"], group["weight_decay"], group["eps"]) == (1e-5, (0.9, 0.999), 1e-2, 1e-8)


@pytest.mark.parametrize("shape, message", [((1, 4, 8, 8), "at least 2 frames"), ((3, 8, 8, 8), "frames, 4, h, w"),
                                            ((1, 3, 4, 8, 8), "frames, 4, h, w")])
def test_video_latent_errors(shape, message):
    with pytest.raises(FateZeroError, match=message):
        core.check_video_latent(torch.zeros(shape))
    assert core.check_video_latent(torch.zeros(2, 4, 8, 8)) == 2


def widths():
    blocks = {b: (320 if b.startswith(("down_blocks.0", "up_blocks.3")) else 640) for b in tav.sd1_transformer_blocks()}
    convs = {c: 4 if c == "conv_out" else 320 for c in tav.sd1_inflated_convs()}
    return blocks, convs


def test_fresh_layers_are_the_official_untuned_layers_in_the_fatezero_layout():
    blocks, convs = widths()
    ckpt = core.fresh_temporal_checkpoint(blocks, convs, lora_rank=160, heads=8, seed=1)
    flat = core.fatezero_layout({}, ckpt.temporal_attention, {c: w.state_dict for c, w in ckpt.temporal_convs.items()})
    # the loader's own splitter reads it back as the FateZero layout with LoRA convs
    again = tav.split_tav_state_dict(dict(flat, **{"conv_in.weight": torch.zeros(320, 4, 3, 3)}))
    assert again.layout == tav.LAYOUT_FATEZERO
    assert set(again.temporal_attention) == set(blocks) and set(again.temporal_convs) == set(convs)
    assert again.temporal_convs["conv_out"].rank == 2  # 160 > 4 channels -> 4 // 2
    assert again.temporal_convs["conv_in"].rank == 160
    for block, group in ckpt.temporal_attention.items():
        c = blocks[block]
        assert torch.equal(group["attn_temporal.to_out.0.weight"], torch.zeros(c, c))  # untuned: identity
        assert torch.equal(group["attn_temporal.to_out.0.bias"], torch.zeros(c))
        assert torch.equal(group["norm_temporal.weight"], torch.ones(c))
        bound = (6 / (2 * c)) ** 0.5  # Xavier uniform
        assert 0 < group["attn_temporal.to_q.weight"].abs().max() <= bound
    for conv, weights in ckpt.temporal_convs.items():
        assert torch.equal(weights.state_dict["conv_temporal.up.weight"], torch.zeros_like(weights.state_dict["conv_temporal.up.weight"]))
        down = weights.state_dict["conv_temporal.down.weight"]
        assert abs(float(down.std()) - 1.0 / weights.rank) < 0.2 / weights.rank  # N(0, 1/r) as official
    same = core.fresh_temporal_checkpoint(blocks, convs, lora_rank=160, heads=8, seed=1)
    other = core.fresh_temporal_checkpoint(blocks, convs, lora_rank=160, heads=8, seed=2)
    key = "down_blocks.0.attentions.0.transformer_blocks.0"
    assert torch.equal(same.temporal_attention[key]["attn_temporal.to_q.weight"], ckpt.temporal_attention[key]["attn_temporal.to_q.weight"])
    assert not torch.equal(other.temporal_attention[key]["attn_temporal.to_q.weight"], ckpt.temporal_attention[key]["attn_temporal.to_q.weight"])
    assert core.fresh_temporal_checkpoint(blocks, convs, None, 8, 1).temporal_convs == {}


def test_fresh_layers_leave_the_global_generator_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    core.fresh_temporal_checkpoint({"mid_block.attentions.0.transformer_blocks.0": 16}, {}, None, 8, 3)
    assert torch.equal(torch.rand(3), expected)


def test_draw_step_is_the_official_sample():
    g = torch.Generator().manual_seed(0)
    x0 = torch.zeros(3, 4, 2, 2)
    draws = [core.draw_step(g, x0) for _ in range(400)]
    timesteps = [t for t, _ in draws]
    assert all(0 <= t < 1000 for t in timesteps) and len(set(timesteps)) > 300
    assert draws[0][1].shape == x0.shape and draws[0][1].dtype == torch.float32
    noise = torch.stack([n for _, n in draws])
    assert abs(float(noise.mean())) < 0.05 and abs(float(noise.std()) - 1) < 0.05
    again = core.draw_step(torch.Generator().manual_seed(0), x0)
    assert again[0] == draws[0][0] and torch.equal(again[1], draws[0][1])


def test_eps_from_denoised_inverts_the_eps_parameterisation():
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    sigma = torch.tensor([2.5])
    x = x0 + sigma * eps
    assert torch.allclose(core.eps_from_denoised(x, x - sigma * eps, sigma), eps, atol=1e-6)
    assert float(core.noise_prediction_loss(eps + 1.0, eps)) == pytest.approx(1.0)
    assert core.noise_prediction_loss(eps.half(), eps).dtype == torch.float32


def test_train_step_descends_and_clips():
    target = torch.tensor([3.0, -2.0])
    w = torch.nn.Parameter(torch.zeros(2))
    opt = core.make_optimizer([w], core.OptimizerSettings(lr=0.1, weight_decay=0.0))
    losses = [core.train_step(lambda: ((w - target) ** 2).mean(), opt, [w]) for _ in range(60)]
    assert losses[-1] < 0.2 * losses[0]
    # the gradient is clipped to norm 1 before the step (the official max_grad_norm)
    v = torch.nn.Parameter(torch.zeros(2))
    sgd = torch.optim.SGD([v], lr=1.0)
    core.train_step(lambda: (100 * v * torch.tensor([3.0, 4.0])).sum(), sgd, [v], max_grad_norm=1.0)
    assert torch.allclose(v.detach(), -torch.tensor([0.6, 0.8]), atol=1e-6)
    with pytest.raises(FateZeroError, match="not finite"):
        core.train_step(lambda: (v * float("nan")).sum(), sgd, [v])


def test_running_mean_and_loss_curve():
    assert core.running_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    image = core.loss_curve_image([2.0, 1.5, 1.0, 0.8, 0.5], width=200, height=100)
    assert image.shape == (1, 100, 200, 3) and 0 <= float(image.min()) and float(image.max()) <= 1
    blue = (image[0, :, :, 2] > image[0, :, :, 0] + 0.3)
    assert blue.any()  # the running mean is drawn
    rows = blue.float().nonzero()[:, 0]
    cols = blue.float().nonzero()[:, 1]
    # falling loss: the curve's left end is higher in the picture (smaller row) than its right end
    assert rows[cols < cols.min() + 10].float().mean() < rows[cols > cols.max() - 10].float().mean()
    assert core.loss_curve_image([]).shape == (1, 256, 512, 3)


def test_oom_advice_names_what_to_change():
    text = core.oom_advice(8, 64, 64, checkpointing=False, precision="fp32")
    assert "gradient_checkpointing on" in text and "bf16" in text and "fewer frames (now 8)" in text and "512x512" in text
    text = core.oom_advice(8, 64, 64, checkpointing=True, precision="bf16")
    assert "gradient_checkpointing" not in text and "bf16" not in text


def test_video_self_attention_is_per_video_with_previous_and_first_frame_keys():
    g = torch.Generator().manual_seed(2)
    frames, tokens, channels, heads = 3, 5, 8, 2
    q, k, v = (torch.randn(2 * frames, tokens, channels, generator=g) for _ in range(3))
    out = video_self_attention(q, k, v, heads, (-1, "first"), chunks=2)
    for c in range(2):
        for f in range(frames):
            i = c * frames + f
            keys = [c * frames + max(f - 1, 0), c * frames]  # previous frame, then the first (eq. 8, TAV)
            ref = attention(q[i:i + 1], torch.cat([k[j] for j in keys])[None], torch.cat([v[j] for j in keys])[None], heads)
            assert torch.allclose(out[i], ref[0], atol=1e-6), (c, f)
    with pytest.raises(FateZeroError, match="whole clips"):
        video_self_attention(q, k, v, heads, (-1, "first"), chunks=4)


def test_tune_video_runs_the_official_sample_and_learns():
    """The loop draws (t, eps) exactly as draw_step with the seed, noises x = x0 + sigma(t) eps, and
    lowers the noise-prediction MSE of a model that can represent the noise."""
    torch.manual_seed(0)
    x0 = torch.randn(4, 4, 8, 8)
    weight = torch.nn.Parameter(torch.zeros(()))
    seen = []

    def denoise(x, sigma):  # an eps model eps_theta = weight * (x - x0), run as a denoiser
        seen.append((x.detach().clone(), float(sigma[0])))
        eps_theta = weight * (x - x0)
        return x - sigma.reshape(-1, 1, 1, 1) * eps_theta

    def sigma_of(t):
        return torch.tensor([0.1 + t / 1000.0])

    steps_seen = []
    losses = core.tune_video(denoise, sigma_of, x0, [weight], 60, core.OptimizerSettings(lr=0.05), seed=7,
                            on_step=lambda done, so_far: steps_seen.append((done, len(so_far))))
    generator = torch.Generator().manual_seed(7)
    t0, eps0 = core.draw_step(generator, x0)
    sigma0 = 0.1 + t0 / 1000.0
    assert seen[0][1] == pytest.approx(sigma0)
    assert torch.allclose(seen[0][0], x0 + sigma0 * eps0, atol=1e-6)
    # eps_theta = weight * sigma * eps: the loss is (w sigma - 1)^2 mean(eps^2), exactly at step 0 (w = 0)
    assert losses[0] == pytest.approx(float((eps0 ** 2).mean()), rel=1e-5)
    assert steps_seen == [(k, k) for k in range(1, 61)]
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10


def test_class_images_start_where_the_official_dataset_starts_them():
    # ImageSequenceDataset.__getitem__: class_index = index % (num_class_images - n_sample_frame),
    # then n_sample_frame consecutive images from it (the last image is never reached)
    assert [core.class_start(i, 10, 8) for i in range(10)] == [0, 1, 0, 1, 0, 1, 0, 1, 0, 1]
    assert [core.class_start(i, 5, 3) for i in range(5)] == [0, 1, 0, 1, 0]
    assert [core.class_start(i, 4, 4) for i in range(4)] == [0, 0, 0, 0]  # exactly F images: all of them


def test_class_latent_errors():
    assert core.check_class_latent(torch.zeros(8, 4, 8, 8), 8) == 8
    with pytest.raises(FateZeroError, match="holds 5 image.*frames \\(8\\).*at least 8"):
        core.check_class_latent(torch.zeros(5, 4, 8, 8), 8)
    with pytest.raises(FateZeroError, match=r"\[images, 4, h, w\]"):
        core.check_class_latent(torch.zeros(8, 3, 8, 8), 8)


def test_optimizer_choice_and_what_to_change():
    core.check_optimizer("AdamW", "cpu")
    with pytest.raises(FateZeroError, match="needs a CUDA GPU.*Set optimizer to AdamW"):
        core.check_optimizer("AdamW8bit", "cpu")
    with pytest.raises(FateZeroError, match="use one of AdamW, AdamW8bit"):
        core.check_optimizer("SGD", "cpu")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(FateZeroError, match="pip install bitsandbytes.*or set optimizer to AdamW"):
            core.check_optimizer("AdamW8bit", "cuda")


def test_seeded_draws_without_class_images_are_the_clip_draws():
    x0 = torch.zeros(3, 4, 2, 2)
    seeded, generator = core.SeededDraws(5), torch.Generator().manual_seed(5)
    for _ in range(3):
        t, eps = seeded.clip_step(x0)
        t_ref, eps_ref = core.draw_step(generator, x0)
        assert t == t_ref and torch.equal(eps, eps_ref)


def test_seeded_class_draws_walk_a_permutation_per_epoch():
    draws = core.SeededDraws(0)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(6, generator=g).tolist()
    for i in range(6):
        start, timesteps, noise = draws.class_step(6, 3, (4, 2, 2))
        assert start == core.class_start(order[i], 6, 3)
        assert timesteps.shape == (3,) and 0 <= int(timesteps.min()) and int(timesteps.max()) < 1000
        assert noise.shape == (3, 4, 2, 2)
        assert torch.equal(timesteps, torch.randint(0, 1000, (3,), generator=g))
        assert torch.equal(noise, torch.randn(3, 4, 2, 2, generator=g))
    draws.class_step(6, 3, (4, 2, 2))  # a new epoch: a new permutation is drawn, not an error


def test_class_step_runs_first_with_its_own_optimizer_step_and_zeroed_not_freed_gradients():
    """Each iteration: the class step (still images, F of them, one sigma per image) then the clip
    step, each an optimizer step. A tensor the class loss never reaches (here: ``temporal``) is left
    alone by the first class step (no gradient yet) and moved by later ones (its gradient is zero,
    not None: AdamW's momentum and weight decay), as accelerate 0.15's zero_grad(set_to_none=False)."""
    frames = 3
    x0 = torch.randn(frames, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    classes_x0 = torch.randn(5, 4, 2, 2, generator=torch.Generator().manual_seed(2))
    shared = torch.nn.Parameter(torch.tensor(0.5))
    temporal = torch.nn.Parameter(torch.tensor(0.25))
    calls, temporal_seen, temporal_at_clip = [], [], []

    def clip_denoise(x, sigma):
        calls.append(("clip", x.shape[0], sigma.shape))
        temporal_at_clip.append(float(temporal.detach()))
        eps = shared * x + temporal * x.roll(1, 0)
        return x - sigma.reshape(-1, 1, 1, 1) * eps

    def class_denoise(x, sigma):
        calls.append(("class", x.shape[0], tuple(sigma.tolist())))
        temporal_seen.append(float(temporal.detach()))
        return x - sigma.reshape(-1, 1, 1, 1) * shared * x

    def sigma_of(t):
        return torch.tensor([0.5 + t / 1000.0])

    classes = core.ClassImages(classes_x0, class_denoise)
    losses = core.tune_video(clip_denoise, sigma_of, x0, [shared, temporal], 3,
                             core.OptimizerSettings(lr=0.01), seed=4, classes=classes)
    assert [c[0] for c in calls] == ["class", "clip"] * 3
    assert all(c[1] == frames for c in calls)
    draws = core.SeededDraws(4)
    _, timesteps, _ = draws.class_step(5, frames, (4, 2, 2))
    assert calls[0][2] == pytest.approx(tuple(0.5 + t / 1000.0 for t in timesteps.tolist()))
    assert len(losses) == 3 and len(classes.losses) == 3
    # temporal: the first class step leaves it alone (no gradient yet), the first clip step moves it
    # by AdamW's first step (~lr), and every later class step moves it again (zero gradient, not None)
    assert temporal_seen[0] == temporal_at_clip[0] == 0.25
    assert abs(temporal_seen[1] - 0.25) == pytest.approx(0.01, rel=0.05)
    assert temporal_at_clip[1] != temporal_seen[1] and temporal_at_clip[2] != temporal_seen[2]


def test_loss_curve_with_class_losses_draws_both():
    image = core.loss_curve_image([2.0, 1.5, 1.0, 0.8], class_losses=[1.0, 1.2, 0.9, 0.95])
    orange = (image[0, :, :, 0] > image[0, :, :, 2] + 0.3)
    blue = (image[0, :, :, 2] > image[0, :, :, 0] + 0.3)
    assert orange.any() and blue.any()
    plain = core.loss_curve_image([2.0, 1.5, 1.0, 0.8])
    assert not (plain[0, :, :, 0] > plain[0, :, :, 2] + 0.3).any()


def test_frame_context_runs_still_images_without_temporal_layers():
    from fatezero_core.frames import FrameContext

    context = FrameContext()
    with context.running(1, stills=True):
        assert context.stills and context.frames(6) == 1 and context(6) is None
    with context.running(2):
        assert not context.stills and context.frames(6) == 3 and context(6) == 3
    with context.running(1, stills=True):
        later = context.replay()  # what gradient checkpointing enters to recompute a layer in backward
    assert not context.stills and context(6) == 6
    with later:
        assert context.stills and context(6) is None
    assert not context.stills
