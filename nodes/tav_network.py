"""The Tune-A-Video network on a ComfyUI ``ModelPatcher``: SD1.x checks, the UNet's weights under
diffusers names, and the temporal layers inserted as object patches.

The core names every module in diffusers terms (``fatezero_core.tav.checkpoint``); ComfyUI's own
key conversion (``comfy.utils.unet_to_diffusers``, the one its diffusers-UNet loader uses) finds
where that module sits in ComfyUI's UNet. The temporal layers go in as object patches
(``fatezero_core.tav.inflate``), so the 2D weights keep their keys and LoRA, ControlNet and every
sampler work as with any SD1.x model:

- temporal attention after each transformer block: ``<SpatialTransformer>.transformer_blocks``
  becomes ``ModuleList([block, TemporalBlockAdapter])``;
- temporal convs after each inflated conv: the Sequential holding the conv (or the Downsample /
  Upsample ending with it) is replaced by one holding the same modules plus the temporal conv.

The clip runtime (``video_runtime``) tells the layers how many clips the running batch holds and
keeps them on the UNet's device; the ResNet and output GroupNorms pool over the clip, as in the
Tune-A-Video UNet the layers belong to. The model also carries the Tune-A-Video key-frame rule
(previous and first frame: ``SparseCausalAttention.forward`` in ``tuneavideo/models/attention.py``,
github.com/showlab/Tune-A-Video), which FateZero DDIM Invert uses when its key_frames is "auto".
"""

from __future__ import annotations

import torch
from torch import nn

import comfy.model_base
import comfy.supported_models
import comfy.utils
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

from ..fatezero_core.errors import CheckpointError
from ..fatezero_core.frames import FrameContext
from ..fatezero_core.keyframes import TAV_KEY_RULE, format_key_rule
from ..fatezero_core.sd1 import HEADS
from ..fatezero_core.tav import train as tuning
from ..fatezero_core.tav.checkpoint import (
    TavCheckpoint,
    sd1_inflated_convs,
    sd1_transformer_blocks,
    sd1_unet_mismatch,
    temporal_targets,
)
from ..fatezero_core.tav.inflate import block_list_patch, conv_patch
from ..fatezero_core.tav.modules import FramewiseTemporalConv, TemporalAttention, temporal_module_from_state_dict
from .video_runtime import video_runtime, use_video_group_norm
from .patching import KEY_RULE_KEY, unet_resolver


# --------------------------------------------------------------------------------------------------
# The UNet under diffusers names
# --------------------------------------------------------------------------------------------------

def diffusers_key_map(unet_config: dict) -> dict[str, str]:
    """diffusers UNet key -> ComfyUI UNet key for a UNet of ``unet_config``: ComfyUI's own
    conversion (``comfy.utils.unet_to_diffusers``), the one its diffusers-UNet loader uses."""
    return comfy.utils.unet_to_diffusers(unet_config)


def module_path(owner: str, key_map: dict[str, str]) -> str:
    """ComfyUI module path of the diffusers module ``owner`` (a transformer block or a conv), read
    from the mapping of its weights: ``<owner>.<rest>`` maps to ``<path>.<rest>``."""
    prefix = owner + "."
    paths = {comfy_key[: -len(key) + len(owner)] for key, comfy_key in key_map.items()
             if key.startswith(prefix) and comfy_key.endswith(key[len(owner):])}
    if len(paths) != 1:
        raise CheckpointError(
            f"ComfyUI's UNet has no single module for {owner} (found {sorted(paths) or 'none'}); "
            "Tune-A-Video layers need a Stable Diffusion 1.x UNet.")
    return paths.pop()


def diffusers_state_dict(patcher) -> dict[str, torch.Tensor]:
    """The UNet's 2D weights (as loaded, not copied) under their diffusers names, read from the
    model ``patcher`` builds (``unet_resolver``)."""
    resolve = unet_resolver(patcher)
    weights = {}
    for key, comfy_key in diffusers_key_map(patcher.model.model_config.unet_config).items():
        owner, name = comfy_key.rsplit(".", 1)
        try:
            tensor = getattr(resolve(owner), name)
        except AttributeError:
            continue
        if isinstance(tensor, torch.Tensor):
            weights[key] = tensor
    return weights


def sd1_unet_problem(patcher, model_channels: int | None = None) -> str | None:
    """Why ``patcher`` is not an SD1.x UNet (of width ``model_channels``; default: its own), or
    None. SD1.x: ComfyUI's own SD1.5 criteria (``comfy.supported_models.SD15.unet_config``) and,
    through ComfyUI's key conversion, the SD1.x diffusers keys and shapes
    (``fatezero_core.tav.checkpoint.sd1_unet_mismatch``)."""
    model = getattr(patcher, "model", None)
    if not isinstance(model, comfy.model_base.BaseModel) or not isinstance(getattr(model, "diffusion_model", None), UNetModel):
        return f"it is not a Stable Diffusion 1.x UNet (found {type(getattr(model, 'diffusion_model', model)).__name__})"
    theirs = model.model_config.unet_config
    wanted = dict(comfy.supported_models.SD15.unet_config)
    wanted["model_channels"] = theirs.get("model_channels") if model_channels is None else model_channels
    differences = [f"{k} {theirs.get(k)!r} instead of {v!r}" for k, v in wanted.items() if theirs.get(k) != v]
    if differences:
        return f"its UNet differs ({'; '.join(differences)})"
    mismatch = sd1_unet_mismatch(diffusers_state_dict(patcher))
    return f"its UNet is not shaped as SD1.x ({mismatch})" if mismatch else None


def compute_dtype(patcher) -> torch.dtype:
    """The dtype the UNet computes in (its manual-cast dtype, else its weight dtype)."""
    return patcher.model.manual_cast_dtype or patcher.model.get_dtype()


def attention_heads(patcher) -> int:
    """Heads of the UNet's attention: its config's ``num_heads``, else the SD1.x count."""
    heads = int(patcher.model.model_config.unet_config.get("num_heads", HEADS))
    return heads if heads > 0 else HEADS


# --------------------------------------------------------------------------------------------------
# Temporal layers
# --------------------------------------------------------------------------------------------------

class TemporalBlockAdapter(nn.Module):
    """Temporal attention as one more entry of a SpatialTransformer's block list.

    Called like a ``BasicTransformerBlock``: ``x`` is ``(B*F, HW, C)`` with one clip of F frames
    per ``cond_or_uncond`` entry (ComfyUI batches the conds of a call that way: ``_calc_cond_batch``
    in ``comfy/samplers.py``, 0.3.64); the clip runtime's frame context gives F. A batch of still
    images (the class step of tuning) passes through unchanged, as the official block applies no
    temporal attention to a 4-D input (``SpatioTemporalTransformerModel.forward``, FateZero
    ``video_diffusion/models/attention.py``)."""

    def __init__(self, temporal: TemporalAttention, frames: FrameContext):
        super().__init__()
        self.temporal = temporal
        self.frames = frames

    def forward(self, x, context=None, transformer_options={}):
        frames = self.frames(x.shape[0])
        return x if frames is None else self.temporal(x, frames)


def insert_temporal_layers(patcher, ckpt: TavCheckpoint, dtype: torch.dtype | None = None) -> dict[str, nn.Module]:
    """Object patches for every temporal layer of ``ckpt`` and for clip-level GroupNorms, the clip
    runtime, the key-frame rule. The layers take ``dtype`` (default: the UNet's compute dtype) and
    are listed, in ``temporal_targets`` order, in ``video_runtime(patcher).modules``.

    Returns each inserted layer under its owner's diffusers path, in that order (empty for a plain
    SD1.x checkpoint)."""
    targets = temporal_targets(ckpt)
    if not targets:
        return {}
    resolve = unet_resolver(patcher)
    heads = attention_heads(patcher)
    dtype = dtype or compute_dtype(patcher)
    runtime = video_runtime(patcher)
    key_map = diffusers_key_map(patcher.model.model_config.unet_config)
    layers: dict[str, nn.Module] = {}
    for target in targets:
        layer = temporal_module_from_state_dict(target.kind, target.state_dict, heads=heads)
        layer = layer.to(device=patcher.offload_device, dtype=dtype).eval()
        runtime.modules.append(layer)
        layers[target.owner] = layer
        owner = module_path(target.owner, key_map)
        if target.kind == "attention":
            path, container = block_list_patch(resolve, owner, TemporalBlockAdapter(layer, runtime.frames))
        else:
            path, container = conv_patch(resolve, owner, FramewiseTemporalConv(layer, runtime.frames))
        patcher.add_object_patch(f"diffusion_model.{path}", container)
    use_video_group_norm(patcher)  # it was tuned with clip-level ResNet statistics
    nbytes = sum(p.numel() * p.element_size() for layer in layers.values() for p in layer.parameters())
    patcher.size = patcher.model_size() + nbytes  # so ComfyUI reserves memory for them too
    patcher.model_options.setdefault("transformer_options", {})[KEY_RULE_KEY] = format_key_rule(TAV_KEY_RULE)
    return layers


def fresh_layers(model, lora_rank: int | None, seed: int) -> TavCheckpoint:
    """Untuned temporal layers for every SD1.x transformer block and inflated conv of ``model``'s
    UNet, found through ComfyUI's key conversion."""
    resolve = unet_resolver(model)
    key_map = diffusers_key_map(model.model.model_config.unet_config)
    blocks = {b: int(resolve(module_path(b, key_map)).norm1.normalized_shape[0]) for b in sd1_transformer_blocks()}
    convs = {c: int(resolve(module_path(c, key_map)).weight.shape[0]) for c in sd1_inflated_convs()}
    return tuning.fresh_temporal_checkpoint(blocks, convs, lora_rank, attention_heads(model), seed)


__all__ = ["attention_heads", "compute_dtype", "diffusers_key_map", "diffusers_state_dict", "fresh_layers",
           "insert_temporal_layers", "module_path", "sd1_unet_problem"]
