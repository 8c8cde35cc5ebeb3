"""SD1.5-topology UNets built with ComfyUI's own classes, as ``ModelPatcher`` objects.

- :func:`build_tiny_sd15`: SD1.5 UNet topology (4 levels, 2 res blocks each, attention on the first
  three, context 768, 8 heads) with ``model_channels=32`` instead of 320: fp32, CPU (tests).
- :func:`build_sd15`: the SD1.5 shape itself (model_channels 320, ~860 M parameters), fp16 on a
  GPU and fp32 on the CPU (benchmarks).
"""

from __future__ import annotations

import gc

import torch

from .seeded_init import SEED, init_parameters_, init_parameters_fast_

# SD1.5 UNet config as comfy/model_detection.py (unet_config_from_diffusers_unet, "SD15") lists it.
SD15_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
    "context_dim": 768, "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
SD15_CHANNEL_MULT = [1, 2, 4, 4]  # the real SD1.5 UNet, for tests that need its exact shape
TINY_MODEL_CHANNELS = 32

_UNET_WEIGHTS: dict[tuple, dict[str, torch.Tensor]] = {}


def sd15_unet_config(model_channels: int = TINY_MODEL_CHANNELS, **overrides) -> dict:
    """The SD1.5 UNet config with ``model_channels`` scaled (8 heads kept, so dim_head scales too)."""
    config = dict(SD15_UNET_CONFIG, model_channels=model_channels)
    config.update(overrides)
    return config


def sd15_base_model(config: dict, dtype: torch.dtype, device=None):
    """ComfyUI's SD1.5 ``BaseModel`` for a UNet ``config`` (parameters left uninitialised).

    Its ``model_config`` is a real ``comfy.supported_models.SD15``, so the latent format, model
    sampling (eps, scaled-linear betas) and everything keyed on it are SD1.5's."""
    import comfy.supported_models

    model_config = comfy.supported_models.SD15(config)
    model_config.set_inference_dtype(dtype, None)
    return model_config.get_model({}, device=device)


def build_tiny_sd15(seed: int = SEED, model_channels: int = TINY_MODEL_CHANNELS, **overrides):
    """A ``ModelPatcher`` over an SD1.5-topology ``BaseModel`` (fp32, CPU, seeded random weights).

    Every call builds new modules; the seeded weights are generated once per (seed, config) and
    copied in.
    """
    import comfy.model_patcher

    config = sd15_unet_config(model_channels, **overrides)
    model = sd15_base_model(config, torch.float32)
    key = (seed, repr(sorted(config.items())))
    weights = _UNET_WEIGHTS.get(key)
    if weights is None:
        init_parameters_(model.diffusion_model, seed)
        _UNET_WEIGHTS[key] = {k: v.detach().clone() for k, v in model.diffusion_model.state_dict().items()}
    else:
        model.diffusion_model.load_state_dict(weights)
    model.eval()
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def build_sd15(model_channels: int = 320, seed: int = SEED, load_device=None, dtype=None):
    """``ModelPatcher`` over an SD1.5-shape UNet with seeded random weights
    (:func:`init_parameters_fast_`), offloaded to the CPU.

    ``load_device`` defaults to ComfyUI's torch device (the CPU under ``--cpu``); ``dtype`` to fp16
    on a CUDA device and fp32 elsewhere, as a checkpoint loader picks them.
    """
    import comfy.model_management
    import comfy.model_patcher

    load_device = load_device or comfy.model_management.get_torch_device()
    if dtype is None:
        dtype = torch.float16 if torch.device(load_device).type == "cuda" else torch.float32
    model = sd15_base_model(sd15_unet_config(model_channels), dtype)
    init_parameters_fast_(model.diffusion_model, seed)
    model.eval()
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=load_device,
                                               offload_device=torch.device("cpu"))
    gc.collect()
    return patcher


def unet_parameter_count(patcher) -> int:
    """Parameters of the patcher's UNet (``diffusion_model``)."""
    return sum(p.numel() for p in patcher.model.diffusion_model.parameters())
