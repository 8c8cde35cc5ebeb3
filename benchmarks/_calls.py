"""The node calls the benchmarks time and measure, with the benchmark settings.

The pack's nodes are called as ComfyUI's executor calls them (``execute`` on the node class);
``nodes`` is the pack's node package from :func:`_host.setup`. The plain baseline is core
``KSamplerAdvanced`` with the same sigmas.
"""

from __future__ import annotations

SOURCE = "a cat sitting on a wooden table"
TARGET = "a dog sitting on a wooden table"


def moving_latent(frames: int, size: int, seed: int = 0):
    """Correlated frames: one random field shifted by a pixel per frame (latent units)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, 4, size, size + frames, generator=g)
    return torch.cat([base[..., i:i + size] for i in range(frames)])


def blend_settings(nodes, clip, blend_words: str = "cat", **kw):
    """Source/target conditioning and edit spec from the Attention Blend Settings node."""
    args = dict(source_prompt=SOURCE, target_prompt=TARGET, blend_words=blend_words,
                target_blend_words="", cross_replace_steps=0.8, cross_replace_words="",
                self_replace_steps=0.6, blend_threshold=0.3, reweight="", mode="auto",
                local_latent_blend=False, soft_mask=False)
    args.update(kw)
    out = nodes.blend_settings.FateZeroAttentionBlendSettings.execute(clip=clip, **args)
    return out.args


def empty_conditioning(clip):
    import nodes as core_nodes

    return core_nodes.CLIPTextEncode().encode(clip, "")[0]


def invert(nodes, model, source, latent, steps: int, placement: str, **kw):
    args = dict(steps=steps, key_frames="auto", st_min_channels=-1, store_placement=placement,
                store_dtype="fp16", layer_set="relative", schedule_end="comfy")
    args.update(kw)
    out = nodes.invert.FateZeroDDIMInvert.execute(model=model, source=source,
                                                  latent={"samples": latent}, **args)
    return out.args  # (inverted latent dict, store)


def fatezero_sample(nodes, model, positive, negative, inverted, store, spec, cfg: float = 7.5,
                    fusion: bool = True):
    out = nodes.sample.FateZeroSample.execute(model=model, positive=positive, negative=negative,
                                              latent=inverted, attention_store=store,
                                              blend_settings=spec, cfg=cfg, fusion=fusion)
    return out.args


def core_ddim(model, positive, negative, latent: dict, steps: int, cfg: float):
    """Core ``KSamplerAdvanced`` with ddim / ddim_uniform and no added noise (the same sigmas)."""
    import nodes as core_nodes

    return core_nodes.KSamplerAdvanced().sample(
        model, "disable", 0, steps, cfg, "ddim", "ddim_uniform", positive, negative, latent, 0,
        steps, "disable")[0]
