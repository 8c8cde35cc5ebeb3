"""The tiny models the host tests run on: finite, non-trivial, and loadable the way users load models."""

import torch


def test_tiny_sd15_is_sd15_topology_and_finite(tiny_sd15):
    import comfy.supported_models

    base = tiny_sd15.model
    assert isinstance(base.model_config, comfy.supported_models.SD15)
    unet = base.diffusion_model
    assert unet.model_channels == 32
    assert len(unet.input_blocks) == 12 and len(unet.output_blocks) == 12
    assert all(not p.isnan().any() for p in unet.parameters())

    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(2, 77, 768, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([3.0, 3.0])
    with torch.no_grad():
        denoised = base.apply_model(x, sigma, c_crossattn=ctx)
        other = base.apply_model(x, sigma, c_crossattn=ctx.flip(1))
    eps = (x - denoised) / 3.0
    assert denoised.shape == x.shape and torch.isfinite(denoised).all()
    assert 0.05 < eps.std().item() < 20.0
    assert not torch.allclose(denoised, other)  # the text conditioning matters


def test_tiny_sd15_is_deterministic_and_fresh_per_call():
    import tiny_models

    a = tiny_models.build_tiny_sd15(seed=3)
    b = tiny_models.build_tiny_sd15(seed=3)
    assert a.model is not b.model
    sa, sb = a.model.diffusion_model.state_dict(), b.model.diffusion_model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    with torch.no_grad():
        next(a.model.diffusion_model.parameters()).add_(1.0)  # changing one model leaves others alone
    assert torch.equal(tiny_models.build_tiny_sd15(seed=3).model.diffusion_model.state_dict()[next(iter(sb))],
                       sb[next(iter(sb))])
    c = tiny_models.build_tiny_sd15(seed=4).model.diffusion_model.state_dict()
    assert not torch.equal(sa["out.2.weight"], c["out.2.weight"])


def test_init_parameters_is_seeded():
    import tiny_models

    def make(seed):
        return tiny_models.init_parameters_(torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.LayerNorm(4)), seed)

    a, b, c = make(1), make(1), make(2)
    assert torch.equal(a[0].weight, b[0].weight) and not torch.equal(a[0].weight, c[0].weight)
    assert torch.allclose(a[1].weight, torch.ones(4), atol=0.1)


def test_tiny_clip_encodes_like_sd1(tiny_clip):
    tokens = tiny_clip.tokenize("a silver jeep driving down a curvy road")
    assert set(tokens) == {"l"}
    ids = [t[0] for t in tokens["l"][0]]
    assert ids[0] == 49406 and ids[-1] == 49407 and len(ids) == 77
    assert tiny_clip.tokenizer.clip_l.tokenizer("cat")["input_ids"] == [49406, 2368, 49407]

    cond = tiny_clip.encode_from_tokens_scheduled(tokens)
    emb, extra = cond[0]
    assert emb.shape == (1, 77, 768) and torch.isfinite(emb).all() and emb.std() > 0.1
    assert extra["pooled_output"].shape == (1, 768)
    other = tiny_clip.encode_from_tokens_scheduled(tiny_clip.tokenize("a red car"))[0][0]
    assert not torch.allclose(emb, other)


def test_tiny_vae_round_trip_shapes(tiny_vae):
    pixels = torch.rand(3, 64, 96, 3, generator=torch.Generator().manual_seed(0))
    latent = tiny_vae.encode(pixels)
    assert latent.shape == (3, 4, 8, 12) and torch.isfinite(latent).all()
    assert 0.5 < latent.std().item() < 50.0
    images = tiny_vae.decode(latent)
    assert images.shape == (3, 64, 96, 3)
    assert images.min() >= 0.0 and images.max() <= 1.0 and images.std() > 0.01


def test_tiny_checkpoint_loads_as_sd15(tiny_checkpoint):
    import comfy.sd
    import comfy.supported_models

    assert tiny_checkpoint.stat().st_size < 64 * 2**20
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint))
    assert type(model.model.model_config) is comfy.supported_models.SD15
    assert model.model.diffusion_model.model_channels == 320

    cond = clip.encode_from_tokens_scheduled(clip.tokenize("a jeep on a road"))[0][0]
    assert cond.shape == (1, 77, 768) and torch.isfinite(cond).all() and cond.std() > 0.1

    latent = vae.encode(torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(0)))
    assert latent.shape == (2, 4, 8, 8) and torch.isfinite(latent).all()
    x = model.model.process_latent_in(latent)
    with torch.no_grad():
        denoised = model.model.apply_model(x, torch.tensor([2.0, 2.0]), c_crossattn=cond.expand(2, -1, -1))
    assert torch.isfinite(denoised).all() and (x - denoised).std() > 0.01
    assert vae.decode(latent).shape == (2, 64, 64, 3)
