"""The inputs of the Tune-A-Video training parity check, made the same way wherever they are made.

``make_reference.py`` (the official trainer, in its own environment) and
``tests/host/test_tav_train_parity.py`` (this pack's node path, in ComfyUI's) both build their
inputs here, from names and shapes alone, with nothing but torch: every tensor comes from its own
CPU generator seeded from ``SEED`` and the tensor's name, so the two sides agree without shipping
megabytes of weights. ``fingerprint`` hashes what was made; the reference records it and the test
refuses to compare against inputs that differ.

What is made:

- the UNet: SD1.x architecture (diffusers names, FateZero layout for the temporal layers) at
  ``MODEL_CHANNELS`` wide, every tensor explicitly initialised (:func:`initial_tensor`), the
  temporal layers included and none of them zero, so they matter in every forward;
- the clip (``FRAMES`` latents) and ``CLASS_IMAGES`` class latents, as VAE Encode gives them
  (before the SD scale factor), and the source and class prompt embeddings ``[1, 77, 768]``;
- the per-iteration draws: the data loader's item for the class step, one timestep and noise per
  class image, the clip step's timestep and noise (:func:`draws`).
"""

from __future__ import annotations

import hashlib
import zlib
from typing import Dict, List, Sequence

import torch

SEED = 20230923
MODEL_CHANNELS = 32  # SD1.x topology at 1/10 width (GroupNorm's 32 groups need a multiple of 32)
CONTEXT_DIM = 768
FRAMES = 3
LATENT = 8  # latent side (64 px)
CLASS_IMAGES = 5
LORA_RANK = 8
LEARNING_RATE = 1e-5  # official (config/tune/jeep.yaml)
ITERATIONS = 2
NUM_TRAIN_TIMESTEPS = 1000
VAE_SCALE = 0.18215  # what the official trainer multiplies the VAE's sample by; ComfyUI's SD1 latent format


def _generator(name: str) -> torch.Generator:
    return torch.Generator().manual_seed((SEED * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63))


def initial_tensor(name: str, shape: Sequence[int]) -> torch.Tensor:
    """The starting value of the UNet tensor ``name`` (diffusers / FateZero-layout name), fp32.

    Norm affine parameters (GroupNorm, LayerNorm: a module name containing ``norm``) are
    ``1 + 0.1 N(0, 1)`` (weight) and ``0.05 N(0, 1)`` (bias); other biases ``0.05 N(0, 1)``; every
    other tensor ``N(0, 1) / sqrt(fan_in)`` (fan_in: the elements per output channel), so activations
    keep their scale through the network."""
    g = _generator(name)
    values = torch.randn(tuple(shape), generator=g, dtype=torch.float32)
    parts = name.split(".")
    module, kind = (parts[-2] if len(parts) > 1 else ""), parts[-1]
    if "norm" in module:
        return 1.0 + 0.1 * values if kind == "weight" else 0.05 * values
    if kind == "bias" or values.ndim < 2:
        return 0.05 * values
    fan_in = values[0].numel()
    return values / fan_in ** 0.5


def initial_state_dict(shapes: Dict[str, Sequence[int]]) -> Dict[str, torch.Tensor]:
    return {name: initial_tensor(name, shape) for name, shape in shapes.items()}


def clip_latents() -> torch.Tensor:
    """The clip as VAE Encode gives it, frame-major ``[FRAMES, 4, LATENT, LATENT]`` (scale ~5, as
    an SD VAE's unscaled latents)."""
    return 5.0 * torch.randn(FRAMES, 4, LATENT, LATENT, generator=_generator("clip latents"))


def class_latents() -> torch.Tensor:
    """The class images as VAE Encode gives them, ``[CLASS_IMAGES, 4, LATENT, LATENT]``."""
    return 5.0 * torch.randn(CLASS_IMAGES, 4, LATENT, LATENT, generator=_generator("class latents"))


def prompt_embedding(which: str) -> torch.Tensor:
    """The text encoder's output ``[1, 77, CONTEXT_DIM]`` of the ``source`` or ``class`` prompt."""
    return torch.randn(1, 77, CONTEXT_DIM, generator=_generator(f"{which} prompt"))


def draws() -> List[Dict[str, object]]:
    """One dict per iteration, in the order the official trainer draws them: ``class_item`` (the
    dataset index the shuffled loader hands out: a permutation of ``range(CLASS_IMAGES)``),
    ``class_timesteps`` ``[FRAMES]`` and ``class_noise`` ``[FRAMES, 4, h, w]`` (``step2d``), then
    ``clip_timestep`` and ``clip_noise`` ``[FRAMES, 4, h, w]`` (frame-major; ``step``)."""
    g = _generator("draws")
    order = torch.randperm(CLASS_IMAGES, generator=g).tolist()
    out = []
    for i in range(ITERATIONS):
        out.append(dict(
            class_item=order[i % CLASS_IMAGES],
            class_timesteps=torch.randint(0, NUM_TRAIN_TIMESTEPS, (FRAMES,), generator=g),
            class_noise=torch.randn(FRAMES, 4, LATENT, LATENT, generator=g),
            clip_timestep=int(torch.randint(0, NUM_TRAIN_TIMESTEPS, (1,), generator=g)),
            clip_noise=torch.randn(FRAMES, 4, LATENT, LATENT, generator=g),
        ))
    return out


def fingerprint(tensors: Dict[str, torch.Tensor]) -> str:
    """sha256 over the names, shapes and bytes of ``tensors`` in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def inputs_fingerprint(unet: Dict[str, torch.Tensor]) -> str:
    """Everything both sides start from: the UNet's tensors, latents, embeddings and draws."""
    tensors = {f"unet/{k}": v for k, v in unet.items()}
    tensors.update({"clip_latents": clip_latents(), "class_latents": class_latents(),
                    "source_prompt": prompt_embedding("source"), "class_prompt": prompt_embedding("class")})
    for i, d in enumerate(draws()):
        tensors[f"draw{i}/class_item"] = torch.tensor([d["class_item"]])
        tensors[f"draw{i}/class_timesteps"] = d["class_timesteps"]
        tensors[f"draw{i}/class_noise"] = d["class_noise"]
        tensors[f"draw{i}/clip_timestep"] = torch.tensor([d["clip_timestep"]])
        tensors[f"draw{i}/clip_noise"] = d["clip_noise"]
    return fingerprint(tensors)
