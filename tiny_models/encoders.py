"""Seeded CLIP text, CLIP vision and VAE models built with ComfyUI's own classes (CPU, fp32).

- :func:`build_tiny_clip`: a ``comfy.sd.CLIP`` with the real SD1 tokenizer (shipped in
  ``comfy/sd1_tokenizer``) and a 2-layer, 768-wide CLIP-L text model, so conditioning is
  ``[1, 77, 768]`` as with SD1.5.
- :func:`build_tiny_clip_vision`: a ``comfy.clip_vision.ClipVisionModel`` (what CLIP Vision Loader
  outputs): a 2-layer, 64-wide ViT with 32 px patches on 224 px inputs and a projection to 768,
  the width of the tiny CLIP's text embeddings.
- :func:`build_tiny_vae`: a ``comfy.sd.VAE`` wrapping a TAESD-layout autoencoder (8x down/up
  scaling, 4 latent channels; about 2 M parameters). Its decoder does not invert its encoder:
  images survive encode/decode only in shape and range, not in content.
"""

from __future__ import annotations

import os

import torch

from .seeded_init import SEED, init_parameters_

TINY_CLIP_LAYERS = 2
TINY_CLIP_INTERMEDIATE = 1024
TAESD_VAE_SCALE = 0.04

TINY_VISION_CONFIG = {
    "hidden_act": "quick_gelu", "hidden_size": 64, "image_size": 224, "intermediate_size": 128,
    "layer_norm_eps": 1e-05, "model_type": "clip_vision_model", "num_attention_heads": 4,
    "num_channels": 3, "num_hidden_layers": 2, "patch_size": 32, "projection_dim": 768,
}


def build_tiny_clip(seed: int = SEED, num_layers: int = TINY_CLIP_LAYERS,
                    intermediate_size: int = TINY_CLIP_INTERMEDIATE):
    """A ``comfy.sd.CLIP`` usable like a checkpoint's CLIP (``tokenize``, ``encode_from_tokens...``).

    Tokenizer: ComfyUI's real SD1 tokenizer. Text model: CLIP-L layout (768 wide, 12 heads, vocab
    49408, 77 positions) with ``num_layers`` layers. Conditioning is ``[1, 77, 768]`` plus
    ``pooled_output`` ``[1, 768]``.
    """
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base

    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    cpu = torch.device("cpu")
    clip = comfy.sd.CLIP(
        target,
        model_options={
            "clip_l_model_config": {"num_hidden_layers": num_layers, "intermediate_size": intermediate_size},
            "load_device": cpu, "offload_device": cpu, "initial_device": cpu, "dtype": torch.float32,
        },
    )
    init_parameters_(clip.cond_stage_model, seed)
    return clip


def build_tiny_clip_vision(seed: int = SEED, **overrides):
    """A ``ClipVisionModel`` from ComfyUI's own class (its config file written to a temp folder),
    every parameter initialised; ``encode_image(...)["image_embeds"]`` is ``[F, 768]``."""
    import json
    import tempfile

    import comfy.clip_vision

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "clip_vision_tiny.json")
        with open(path, "w") as f:
            json.dump({**TINY_VISION_CONFIG, **overrides}, f)
        model = comfy.clip_vision.ClipVisionModel(path)
    init_parameters_(model.model, seed)
    return model


def _taesd_module(seed: int, latent_channels: int = 4):
    """TAESD with random weights; ``vae_scale`` sets the raw latents to std ~4.5, like SD1's VAE.

    The random encoder gives latents of std ~0.2 and the random decoder keeps inputs of that size
    in range; TAESD divides encoder outputs by ``vae_scale`` and multiplies decoder inputs by it,
    so the round trip is unchanged while the latents the UNet sees have SD1-like magnitudes.
    """
    import comfy.taesd.taesd

    taesd = comfy.taesd.taesd.TAESD(latent_channels=latent_channels)
    init_parameters_(taesd, seed)
    with torch.no_grad():
        taesd.vae_scale.fill_(TAESD_VAE_SCALE)
    return taesd


def tiny_vae_state_dict(seed: int = SEED) -> dict[str, torch.Tensor]:
    """State dict of a TAESD-layout VAE (``taesd_encoder.*``, ``taesd_decoder.*``, scale/shift)."""
    return {k: v.detach().clone() for k, v in _taesd_module(seed).state_dict().items()}


def build_tiny_vae(seed: int = SEED):
    """A ``comfy.sd.VAE`` (TAESD layout, random weights) that encodes/decodes with 8x scaling."""
    import comfy.sd

    return comfy.sd.VAE(sd=tiny_vae_state_dict(seed))
