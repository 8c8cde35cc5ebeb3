"""A tiny SD1.5 checkpoint in the original LDM key layout, which ``CheckpointLoaderSimple``
(``comfy.sd.load_checkpoint_guess_config``) detects as SD1.5.

``CheckpointLoaderSimple`` only recognises SD1.5 with model_channels 320 and context_dim 768
(``comfy/supported_models.py`` ``SD15.unet_config``), so the file keeps those and the SD1.5
topology but uses channel_mult [1, 1, 1, 1] (320 channels on every level); its tensors are strided
views of a few shared buffers (:class:`SharedStorage`), so the file stays a few MB.
"""

from __future__ import annotations

import math
import os

import torch

from .encoders import tiny_vae_state_dict
from .sd15 import sd15_base_model, sd15_unet_config
from .seeded_init import SEED, init_kind

CHECKPOINT_CHANNEL_MULT = [1, 1, 1, 1]


def _meta_shapes(module: torch.nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in module.state_dict().items()}


def checkpoint_shapes(channel_mult=CHECKPOINT_CHANNEL_MULT) -> dict[str, torch.Size]:
    """Key -> shape of the tiny checkpoint's UNet and CLIP, in the original LDM key layout.

    Built on the meta device, so nothing is allocated. ``SD15_CHANNEL_MULT`` gives the real
    SD1.5 UNet shape (860 M parameters once loaded).
    """
    import comfy.sd1_clip

    meta = torch.device("meta")
    model = sd15_base_model(sd15_unet_config(320, channel_mult=list(channel_mult)), torch.float32, meta)
    shapes = {f"model.diffusion_model.{k}": s for k, s in _meta_shapes(model.diffusion_model).items()}

    clip_model = comfy.sd1_clip.SD1ClipModel(device=meta, dtype=torch.float32)
    clip_sd = {k: torch.empty(s, device=meta) for k, s in _meta_shapes(clip_model).items()}
    clip_sd = model.model_config.process_clip_state_dict_for_saving(clip_sd)
    shapes.update({k: v.shape for k, v in clip_sd.items()})
    return shapes


class SharedStorage:
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
        kind, std = init_kind(name, shape)
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
    """
    storage = SharedStorage(seed)
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
