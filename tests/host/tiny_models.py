"""Tiny random-weight SD1.5-topology models built with ComfyUI's own classes.

Nothing is downloaded: every model here is created from ComfyUI's configs and filled with seeded
random values. ComfyUI's ops skip parameter initialisation (``comfy.ops.disable_weight_init``), so
an uninitialised model holds whatever memory it got (often NaN): every builder initialises every
parameter explicitly through :func:`init_parameters_`.

- :func:`build_tiny_sd15`: SD1.5 UNet topology (4 levels, 2 res blocks each, attention on the first
  three, context 768, 8 heads) with ``model_channels=32`` instead of 320, as a ``ModelPatcher``.
- :func:`build_tiny_clip`: a ``comfy.sd.CLIP`` with the real SD1 tokenizer (shipped in
  ``comfy/sd1_tokenizer``) and a 2-layer, 768-wide CLIP-L text model, so conditioning is
  ``[1, 77, 768]`` as with SD1.5.
- :func:`build_tiny_clip_vision`: a ``comfy.clip_vision.ClipVisionModel`` (what CLIP Vision Loader
  outputs): a 2-layer, 64-wide ViT with 32 px patches on 224 px inputs and a projection to 768,
  the width of the tiny CLIP's text embeddings.
- :func:`build_tiny_vae`: a ``comfy.sd.VAE`` wrapping a TAESD-layout autoencoder (8x down/up
  scaling, 4 latent channels; about 2 M parameters). Its decoder does not invert its encoder:
  images survive encode/decode only in shape and range, not in content.
- :func:`write_tiny_sd15_checkpoint`: a checkpoint in the original LDM key layout that
  ``CheckpointLoaderSimple`` (``comfy.sd.load_checkpoint_guess_config``) detects as SD1.5. See its
  docstring for why its UNet is wider than the in-process one and how the file stays small.

This module imports ComfyUI only inside functions, so it can be imported before the host is set up
(and without ComfyUI at all).
"""

from __future__ import annotations

import math
import os

import torch

SEED = 20231001

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

TINY_MODEL_CHANNELS = 32
TINY_CLIP_LAYERS = 2
TINY_CLIP_INTERMEDIATE = 1024

# Checkpoint UNet: CheckpointLoaderSimple only recognises SD1.5 with model_channels=320 and
# context_dim=768 (comfy/supported_models.py SD15.unet_config), so the file keeps those and the
# SD1.5 topology but uses channel_mult [1, 1, 1, 1] (320 channels on every level).
CHECKPOINT_CHANNEL_MULT = [1, 1, 1, 1]
SD15_CHANNEL_MULT = [1, 2, 4, 4]  # the real SD1.5 UNet, for tests that need its exact shape

TAESD_VAE_SCALE = 0.04


# --------------------------------------------------------------------------------------------
# Initialisation
# --------------------------------------------------------------------------------------------


def _fan_in(shape: torch.Size) -> int:
    return max(1, math.prod(shape[1:])) if len(shape) >= 2 else 1


def _init_kind(name: str, shape: torch.Size) -> tuple[str, float]:
    """``(kind, std)`` for one parameter: ``normal`` around 0, ``around_one`` or a ``constant``.

    - ``*.vae_scale`` / ``*.vae_shift`` (TAESD latent scaling): the constants 1 and 0;
    - biases: N(0, 0.02);
    - other 0-d/1-d parameters (norm weights): 1 + N(0, 0.02);
    - matrices, conv kernels, embeddings: N(0, 1/fan_in), which keeps activations O(1).
    """
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "vae_scale":
        return "constant", 1.0
    if leaf == "vae_shift":
        return "constant", 0.0
    if leaf == "bias":
        return "normal", 0.02
    if len(shape) <= 1:
        return "around_one", 0.02
    return "normal", 1.0 / math.sqrt(_fan_in(shape))


def init_parameters_(module: torch.nn.Module, seed: int = SEED, gain: float = 1.0) -> torch.nn.Module:
    """Fill every parameter of ``module`` with seeded values (see :func:`_init_kind`); in place.

    Parameters are visited in name order with one generator, so the result depends only on
    ``seed`` and the module layout. ``gain`` multiplies the std of weight matrices and kernels
    (use ``sqrt(2)`` for ReLU networks). Buffers are left alone.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(module.named_parameters(), key=lambda item: item[0]):
            kind, std = _init_kind(name, param.shape)
            if kind == "constant":
                param.fill_(std)
                continue
            values = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if kind == "around_one":
                values = values.mul_(std).add_(1.0)
            else:
                values = values.mul_(std * (gain if param.dim() >= 2 else 1.0))
            param.copy_(values.to(param.dtype))
    bad = [n for n, p in module.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise AssertionError(f"parameters left non-finite after init: {bad[:5]}")
    return module


# --------------------------------------------------------------------------------------------
# In-process models
# --------------------------------------------------------------------------------------------

_UNET_WEIGHTS: dict[tuple, dict[str, torch.Tensor]] = {}


def sd15_unet_config(model_channels: int = TINY_MODEL_CHANNELS, **overrides) -> dict:
    """The SD1.5 UNet config with ``model_channels`` scaled (8 heads kept, so dim_head scales too)."""
    config = dict(SD15_UNET_CONFIG, model_channels=model_channels)
    config.update(overrides)
    return config


def build_tiny_sd15(seed: int = SEED, model_channels: int = TINY_MODEL_CHANNELS, **overrides):
    """A ``ModelPatcher`` over an SD1.5-topology ``BaseModel`` (fp32, CPU, seeded random weights).

    ``model.model.model_config`` is a real ``comfy.supported_models.SD15``, so the latent format,
    model sampling (eps, scaled-linear betas) and everything keyed on it are SD1.5's. Every call
    builds new modules; the seeded weights are generated once per (seed, config) and copied in.
    """
    import comfy.model_patcher
    import comfy.supported_models

    config = sd15_unet_config(model_channels, **overrides)
    model_config = comfy.supported_models.SD15(config)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
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


TINY_VISION_CONFIG = {
    "hidden_act": "quick_gelu", "hidden_size": 64, "image_size": 224, "intermediate_size": 128,
    "layer_norm_eps": 1e-05, "model_type": "clip_vision_model", "num_attention_heads": 4,
    "num_channels": 3, "num_hidden_layers": 2, "patch_size": 32, "projection_dim": 768,
}


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


# --------------------------------------------------------------------------------------------
# Checkpoint file
# --------------------------------------------------------------------------------------------


def _meta_shapes(module: torch.nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in module.state_dict().items()}


def checkpoint_shapes(channel_mult=CHECKPOINT_CHANNEL_MULT) -> dict[str, torch.Size]:
    """Key -> shape of the tiny checkpoint's UNet and CLIP, in the original LDM key layout.

    Built on the meta device, so nothing is allocated. ``SD15_CHANNEL_MULT`` gives the real
    SD1.5 UNet shape (860 M parameters once loaded).
    """
    import comfy.sd1_clip
    import comfy.supported_models

    meta = torch.device("meta")
    config = sd15_unet_config(320, channel_mult=list(channel_mult))
    model_config = comfy.supported_models.SD15(config)
    model_config.set_inference_dtype(torch.float32, None)
    unet = model_config.get_model({}, device=meta).diffusion_model
    shapes = {f"model.diffusion_model.{k}": s for k, s in _meta_shapes(unet).items()}

    clip_model = comfy.sd1_clip.SD1ClipModel(device=meta, dtype=torch.float32)
    clip_sd = {k: torch.empty(s, device=meta) for k, s in _meta_shapes(clip_model).items()}
    clip_sd = model_config.process_clip_state_dict_for_saving(clip_sd)
    shapes.update({k: v.shape for k, v in clip_sd.items()})
    return shapes


class _SharedStorage:
    """Seeded random values shared by many tensors through strided views.

    ``torch.save`` writes a storage once however many tensors view it, so a checkpoint whose
    tensors are views of a few buffers is a few MB even when the model has 200 M parameters.
    One buffer per (kind, std); each tensor is a view whose rows start ``row_stride`` elements
    apart at a seeded offset (rows overlap as shifted windows, which is fine for random weights).
    """

    def __init__(self, seed: int, length: int = 1 << 19) -> None:
        self.length = length
        self.generator = torch.Generator().manual_seed(seed)
        self.buffers: dict[tuple[str, float], torch.Tensor] = {}

    def _buffer(self, kind: str, std: float) -> torch.Tensor:
        key = (kind, round(std, 9))
        if key not in self.buffers:
            values = torch.randn(self.length, generator=self.generator) * std
            self.buffers[key] = values.add_(1.0) if kind == "around_one" else values
        return self.buffers[key]

    def tensor(self, name: str, shape: torch.Size) -> torch.Tensor:
        kind, std = _init_kind(name, shape)
        if kind == "constant":
            return torch.full(shape, std)
        if len(shape) == 0:
            return self._buffer(kind, std)[0].clone()
        buf = self._buffer(kind, std)
        rows, cols = shape[0], max(1, math.prod(shape[1:]))
        if cols > self.length:
            raise ValueError(f"{name}: rows of {cols} values do not fit a {self.length} buffer")
        row_stride = max(1, min(cols, (self.length - cols) // max(1, rows - 1))) if rows > 1 else cols
        span = (rows - 1) * row_stride + cols
        offset = int(torch.randint(0, self.length - span + 1, (1,), generator=self.generator))
        inner = [math.prod(shape[i + 1:]) for i in range(1, len(shape))]
        return buf.as_strided(tuple(shape), (row_stride, *inner), offset)


def tiny_checkpoint_state_dict(seed: int = SEED, channel_mult=CHECKPOINT_CHANNEL_MULT) -> dict[str, torch.Tensor]:
    """UNet + CLIP + VAE of the tiny checkpoint in the original LDM key layout.

    - ``model.diffusion_model.*``: SD1.5 UNet topology with model_channels 320 and context 768
      (what ``SD15`` detection requires), channel_mult [1, 1, 1, 1];
    - ``cond_stage_model.transformer.text_model.*``: full CLIP-L (the SD1.5 loader always builds
      it from ``comfy/sd1_clip_config.json``);
    - ``first_stage_model.taesd_*``: a TAESD-layout VAE, which ``comfy.sd.VAE`` recognises by its
      keys (8x scaling, 4 latent channels).

    UNet and CLIP tensors are strided views of a few shared buffers (:class:`_SharedStorage`).
    """
    storage = _SharedStorage(seed)
    sd = {name: storage.tensor(name, shape) for name, shape in sorted(checkpoint_shapes(channel_mult).items())}
    for name, value in tiny_vae_state_dict(seed).items():
        sd[f"first_stage_model.{name}"] = value
    return sd


def write_tiny_sd15_checkpoint(path: str | os.PathLike, seed: int = SEED,
                               channel_mult=CHECKPOINT_CHANNEL_MULT) -> str:
    """Write the tiny SD1.5 checkpoint (``.ckpt``, ``{"state_dict": ...}``) to ``path``.

    ``CheckpointLoaderSimple`` / ``comfy.sd.load_checkpoint_guess_config`` load it with
    ``torch.load(weights_only=True)`` and detect SD1.5. The file is a few MB.
    """
    path = os.fspath(path)
    if not path.endswith(".ckpt"):
        raise ValueError("the tiny checkpoint is a torch pickle: give it a .ckpt name")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save({"state_dict": tiny_checkpoint_state_dict(seed, channel_mult)}, path)
    return path
