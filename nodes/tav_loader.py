"""Tune-A-Video Loader: a Tune-A-Video / FateZero inflated UNet as an ordinary SD1.x MODEL.

The checkpoint's 2D weights are loaded into a ComfyUI SD1.x UNet (diffusers names mapped with
``comfy.utils.unet_to_diffusers``, as ComfyUI's own diffusers-UNet loader does). Its temporal
layers are added as object patches on the ``ModelPatcher`` (``fatezero_core.tav.inflate``), so the
2D weights keep their keys and LoRA, ControlNet and every sampler work as with any SD1.x model:

- temporal attention after each transformer block: ``<SpatialTransformer>.transformer_blocks``
  becomes ``ModuleList([block, TemporalBlockAdapter])``;
- temporal convs after each inflated conv: the Sequential holding the conv (or the Downsample /
  Upsample ending with it) is replaced by one holding the same modules plus the temporal conv.

The clip runtime (``clip_runtime``, a ``DIFFUSION_MODEL`` wrapper) tells the temporal layers how
many clips the running batch holds (one per ``cond_or_uncond`` entry) and moves them to the UNet's
device when ComfyUI has not. The ResNet and output GroupNorms pool over the clip, as in the
Tune-A-Video UNet the checkpoint was tuned as, in every sampler.
The model also carries the Tune-A-Video key-frame rule (previous + first frame), which FateZero
DDIM Invert uses when its key_frames is "auto" (``fatezero-reference-implementation.md`` section 4).
"""

from __future__ import annotations

import copy
import logging
import math
import os

import torch
from torch import nn

import comfy.model_base
import comfy.model_detection
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models
import comfy.utils
import folder_paths
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from comfy_api.latest import io

from ..fatezero_core.errors import CheckpointError
from ..fatezero_core.frames import FrameContext
from ..fatezero_core.keyframes import TAV_KEY_RULE, format_key_rule
from ..fatezero_core.tav.checkpoint import (
    DIFFUSERS_WEIGHT_FILES,
    LAYOUT_PLAIN,
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIXES,
    TavCheckpoint,
    load_tav_checkpoint,
    resolve_checkpoint_file,
    temporal_targets,
)
from ..fatezero_core.tav.inflate import block_list_patch, conv_patch
from ..fatezero_core.tav.modules import FramewiseTemporalConv, TemporalAttention, temporal_module_from_state_dict
from .clip_runtime import clip_runtime, use_clip_group_norm
from .patching import KEY_RULE_KEY
from .user_errors import FateZeroNodeError, user_errors

FOLDER = "tuneavideo"
WEIGHT_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES

# ComfyUI's SD1.5 diffusers-UNet config (comfy/model_detection.py, unet_config_from_diffusers_unet),
# with the width taken from the checkpoint (320 for every released SD1.x model).
SD15_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "adm_in_channels": None, "dtype": None, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
    "context_dim": 768, "num_heads": 8, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
# What a base model's UNet must share with the checkpoint's (compared by name for the message).
TOPOLOGY_KEYS = ("in_channels", "out_channels", "model_channels", "channel_mult", "num_res_blocks",
                 "transformer_depth", "transformer_depth_middle", "transformer_depth_output",
                 "context_dim", "use_linear_in_transformer", "adm_in_channels")

folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER))

log = logging.getLogger("comfyui-fatezero")


# --------------------------------------------------------------------------------------------------
# The tuneavideo folder: single files and diffusers folders
# --------------------------------------------------------------------------------------------------

def is_diffusers_folder(path: str) -> bool:
    """A diffusers pipeline folder (``unet/diffusion_pytorch_model.*``) or UNet folder
    (``diffusion_pytorch_model.*`` directly)."""
    return any(os.path.isfile(os.path.join(path, sub, name))
               for sub in ("unet", "") for name in DIFFUSERS_WEIGHT_FILES)


def list_checkpoints() -> list[str]:
    """Weight files and diffusers folders under every ``tuneavideo`` folder, as relative paths
    with ``/``. A diffusers folder is listed once, not its files."""
    names: set[str] = set()
    for root in folder_paths.get_folder_paths(FOLDER):
        if not os.path.isdir(root):
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            rel = os.path.relpath(dirpath, root)
            if rel != "." and is_diffusers_folder(dirpath):
                names.add(rel.replace(os.sep, "/"))
                dirnames[:] = []
                continue
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in filenames:
                if not name.startswith(".") and name.lower().endswith(WEIGHT_SUFFIXES):
                    names.add(os.path.normpath(os.path.join(rel, name)).replace(os.sep, "/"))
    return sorted(names, key=str.lower)


def resolve_checkpoint(name: str) -> str:
    """Absolute path of a listed checkpoint; never outside the ``tuneavideo`` folders."""
    roots = folder_paths.get_folder_paths(FOLDER)
    for root in roots:
        root = os.path.abspath(root)
        path = os.path.abspath(os.path.join(root, name))
        if os.path.commonpath([root, path]) != root:
            continue
        if os.path.isfile(path) or (os.path.isdir(path) and is_diffusers_folder(path)):
            return path
    raise FateZeroNodeError(
        f"Tune-A-Video checkpoint '{name}' was not found in {', '.join(roots) or 'any tuneavideo folder'}. "
        "Put a .safetensors/.bin file or a diffusers folder (with unet/diffusion_pytorch_model.*) "
        "there, or add a 'tuneavideo:' path in extra_model_paths.yaml, then refresh."
    )


# --------------------------------------------------------------------------------------------------
# The 2D UNet
# --------------------------------------------------------------------------------------------------

def _model_channels(ckpt: TavCheckpoint) -> int:
    return int(ckpt.unet_2d["conv_in.weight"].shape[0])


def checkpoint_unet_config(ckpt: TavCheckpoint) -> dict:
    """ComfyUI's SD1.5 UNet config at the checkpoint's width (already checked to be SD1.x)."""
    return comfy.model_detection.convert_config(dict(SD15_UNET_CONFIG, model_channels=_model_channels(ckpt)))


def _names(keys, limit: int = 6) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


def comfy_unet_state_dict(ckpt: TavCheckpoint, unet_config: dict, expected: dict) -> dict:
    """The checkpoint's 2D weights under ComfyUI names (``comfy.utils.unet_to_diffusers``), for a
    UNet whose state dict has the keys and shapes of ``expected``. Every missing, unexpected or
    misshapen weight is named (diffusers names, as in the file)."""
    names: dict[str, list[str]] = {}
    for diffusers_key, comfy_key in comfy.utils.unet_to_diffusers(unet_config).items():
        names.setdefault(comfy_key, []).append(diffusers_key)
    out, used, missing, wrong = {}, set(), [], []
    for comfy_key, reference in expected.items():
        candidates = names.get(comfy_key, [comfy_key])
        key = next((k for k in candidates if k in ckpt.unet_2d), None)
        if key is None:
            missing.append(candidates[0])
            continue
        used.add(key)
        tensor = ckpt.unet_2d[key]
        if tuple(tensor.shape) != tuple(reference.shape):
            wrong.append(f"{key} {list(tensor.shape)} (model: {list(reference.shape)})")
        out[comfy_key] = tensor
    unexpected = set(ckpt.unet_2d) - used
    if missing or unexpected or wrong:
        parts = [missing and f"missing {_names(missing)}", unexpected and f"unexpected {_names(unexpected)}",
                 wrong and f"other shapes: {_names(wrong, 4)}"]
        raise CheckpointError(
            f"{ckpt.source} does not fit the UNet it is loaded into ({'; '.join(p for p in parts if p)}). "
            "Use an SD1.x Tune-A-Video checkpoint, and as base model the SD1.x checkpoint it was tuned from."
        )
    return out


def sd1_unet_problem(patcher, unet_config: dict | None = None) -> str | None:
    """Why ``patcher`` is not an SD1.x UNet of ``unet_config``'s topology (default: SD1.x at the
    model's own width), or None."""
    model = getattr(patcher, "model", None)
    if not isinstance(model, comfy.model_base.BaseModel) or not isinstance(getattr(model, "diffusion_model", None), UNetModel):
        return f"it is not a Stable Diffusion 1.x UNet (found {type(getattr(model, 'diffusion_model', model)).__name__})"
    theirs = model.model_config.unet_config
    if unet_config is None:
        unet_config = comfy.model_detection.convert_config(
            dict(SD15_UNET_CONFIG, model_channels=theirs.get("model_channels")))
    differences = [f"{k} {theirs.get(k)!r} instead of {unet_config.get(k)!r}"
                   for k in TOPOLOGY_KEYS if theirs.get(k) != unet_config.get(k)]
    return f"its UNet differs ({'; '.join(differences)})" if differences else None


def _check_base(base, unet_config: dict) -> None:
    """The base MODEL must be an SD1.x UNet of the checkpoint's topology; differences named."""
    problem = sd1_unet_problem(base, unet_config)
    if problem:
        raise FateZeroNodeError(
            f"The base model does not fit the Tune-A-Video checkpoint: {problem}. Connect the SD1.x "
            "checkpoint it was tuned from, or leave base_model empty."
        )


def _standalone_model_config(ckpt: TavCheckpoint):
    """SD1.5 model config, dtype chosen as ComfyUI's UNET loader chooses it."""
    model_config = comfy.supported_models.SD15(checkpoint_unet_config(ckpt))
    load_device = comfy.model_management.get_torch_device()
    unet_dtype = comfy.model_management.unet_dtype(
        model_params=comfy.utils.calculate_parameters(ckpt.unet_2d),
        supported_dtypes=list(model_config.supported_inference_dtypes),
        weight_dtype=comfy.utils.weight_dtype(ckpt.unet_2d))
    manual_cast = comfy.model_management.unet_manual_cast(unet_dtype, load_device, model_config.supported_inference_dtypes)
    model_config.set_inference_dtype(unet_dtype, manual_cast)
    return model_config, load_device


def build_unet_model(ckpt: TavCheckpoint, base=None):
    """A new ``ModelPatcher`` over a new SD1.x ``BaseModel`` holding the checkpoint's 2D weights.

    Without ``base``: ComfyUI's SD1.5 model config (latent format, eps sampling) at the
    checkpoint's width and ComfyUI's usual UNet dtype. With ``base``: the base model's config,
    prediction type, model sampling, devices, model options and non-UNet object patches; its UNet
    weights (and weight patches such as LoRA) are replaced by the checkpoint's, its base weights
    are left untouched.
    """
    if base is None:
        model_config, load_device = _standalone_model_config(ckpt)
        offload_device = comfy.model_management.unet_offload_device()
        model = model_config.get_model({}, "")
    else:
        _check_base(base, checkpoint_unet_config(ckpt))
        source = base.model
        model_config, load_device, offload_device = source.model_config, base.load_device, base.offload_device
        model = type(source)(model_config, model_type=source.model_type)
        model.model_sampling = copy.deepcopy(source.model_sampling)
    weights = comfy_unet_state_dict(ckpt, model_config.unet_config, model.diffusion_model.state_dict())
    model.diffusion_model.load_state_dict(weights, strict=True)
    del weights
    model = model.to(offload_device).eval()
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)
    if base is not None:
        _carry_over(base, patcher)
    return patcher


def _carry_over(base, patcher) -> None:
    """Model options and object patches outside the UNet (e.g. a ModelSamplingDiscrete patch)."""
    patcher.model_options = copy.deepcopy(base.model_options)
    dropped = sorted(k for k in base.object_patches if k == "diffusion_model" or k.startswith("diffusion_model."))
    for name, obj in base.object_patches.items():
        if name not in dropped:
            patcher.add_object_patch(name, obj)
    if base.patches or dropped:
        log.warning("Tune-A-Video Loader: the base model's UNet weight patches (%d keys, e.g. LoRA) and "
                    "UNet object patches (%s) do not apply to the Tune-A-Video UNet; apply LoRA and "
                    "UNet patches after the loader.", len(base.patches), ", ".join(dropped) or "none")


# --------------------------------------------------------------------------------------------------
# Temporal layers
# --------------------------------------------------------------------------------------------------

class TemporalBlockAdapter(nn.Module):
    """Temporal attention as one more entry of a SpatialTransformer's block list.

    Called like a ``BasicTransformerBlock``: ``x`` is ``(B*F, HW, C)`` with one clip of F frames
    per ``cond_or_uncond`` entry (``comfyui-host-contract.md`` section 7a); the clip runtime's
    frame context gives F."""

    def __init__(self, temporal: TemporalAttention, frames: FrameContext):
        super().__init__()
        self.temporal = temporal
        self.frames = frames

    def forward(self, x, context=None, transformer_options={}):
        return self.temporal(x, self.frames(x.shape[0]))


def compute_dtype(patcher) -> torch.dtype:
    """The dtype the UNet computes in (its manual-cast dtype, else its weight dtype)."""
    return patcher.model.manual_cast_dtype or patcher.model.get_dtype()


def insert_temporal_layers(patcher, ckpt: TavCheckpoint, dtype: torch.dtype | None = None) -> int:
    """Object patches for every temporal layer of ``ckpt`` and for clip-level GroupNorms, the clip
    runtime, the key-frame rule. The layers take ``dtype`` (default: the UNet's compute dtype) and
    are listed, in ``temporal_targets`` order, in ``clip_runtime(patcher).modules``.

    Returns the number of temporal layers inserted (0 for a plain SD1.x checkpoint)."""
    targets = temporal_targets(ckpt)
    if not targets:
        return 0
    unet = patcher.model.diffusion_model
    heads = int(patcher.model.model_config.unet_config.get("num_heads", 8))
    if heads <= 0:
        heads = 8
    dtype = dtype or compute_dtype(patcher)
    runtime = clip_runtime(patcher)
    nbytes = 0
    for target in targets:
        layer = temporal_module_from_state_dict(target.kind, target.state_dict, heads=heads)
        layer = layer.to(device=patcher.offload_device, dtype=dtype).eval()
        runtime.modules.append(layer)
        nbytes += sum(p.numel() * p.element_size() for p in layer.parameters())
        if target.kind == "attention":
            path, container = block_list_patch(unet, target.path, TemporalBlockAdapter(layer, runtime.frames))
        else:
            path, container = conv_patch(unet, target.path, FramewiseTemporalConv(layer, runtime.frames))
        patcher.add_object_patch(f"diffusion_model.{path}", container)
    use_clip_group_norm(patcher)  # it was tuned with clip-level ResNet statistics
    patcher.size = patcher.model_size() + nbytes  # so ComfyUI reserves memory for them too
    patcher.model_options.setdefault("transformer_options", {})[KEY_RULE_KEY] = format_key_rule(TAV_KEY_RULE)
    return len(targets)


def weights_fingerprint(path: str) -> str:
    file = resolve_checkpoint_file(path)
    stat = os.stat(file)
    return f"{file}:{stat.st_size}:{stat.st_mtime_ns}"


# --------------------------------------------------------------------------------------------------
# Node
# --------------------------------------------------------------------------------------------------

class FateZeroTuneAVideoLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FateZero_TuneAVideoLoader",
            display_name="Tune-A-Video Loader",
            category="FateZero/loaders",
            description=(
                "Loads a Tune-A-Video UNet (one-shot tuned on a video, as used by FateZero's shape "
                "edits) from models/tuneavideo: official Tune-A-Video (attn_temp) or FateZero "
                "(attn_temporal, conv_temporal) checkpoints, as a single file or a diffusers folder. "
                "Outputs an SD1.x MODEL with temporal attention and temporal convs inserted; use it "
                "with FateZero DDIM Invert / Sample (key frames 'auto' become previous + first "
                "frame), KSampler or LoRA loaders."),
            inputs=[
                io.Combo.Input(
                    "checkpoint", options=list_checkpoints(),
                    tooltip=("Tune-A-Video checkpoint in models/tuneavideo (or a 'tuneavideo:' path of "
                             "extra_model_paths.yaml): a .safetensors/.bin/.pt/.ckpt UNet file or a "
                             "diffusers folder with unet/diffusion_pytorch_model.*. SD1.x only."),
                ),
                io.Model.Input(
                    "base_model", optional=True,
                    tooltip=("Optional SD1.x MODEL the checkpoint was tuned from (e.g. from Load "
                             "Checkpoint): its model sampling, model options and non-UNet patches are "
                             "kept, its UNet weights replaced. Empty: an SD1.5 model is built from the "
                             "UNet alone."),
                ),
            ],
            outputs=[
                io.Model.Output(display_name="model",
                                tooltip="SD1.x MODEL with the Tune-A-Video temporal layers."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, checkpoint, base_model=None):
        try:
            return weights_fingerprint(resolve_checkpoint(checkpoint))
        except (FateZeroNodeError, CheckpointError, OSError):
            return math.nan  # never equal: the node runs and reports the problem

    @classmethod
    def execute(cls, checkpoint, base_model=None) -> io.NodeOutput:
        path = resolve_checkpoint(checkpoint)
        with user_errors():
            ckpt = load_tav_checkpoint(path)
            model = build_unet_model(ckpt, base_model)
            inserted = insert_temporal_layers(model, ckpt)
        if ckpt.layout == LAYOUT_PLAIN:
            log.warning("Tune-A-Video Loader: %s has no temporal layers; loaded as a plain SD1.x UNet.", checkpoint)
        else:
            log.info("Tune-A-Video Loader: %s (%s layout), %d temporal layers.", checkpoint, ckpt.layout, inserted)
        return io.NodeOutput(model)


NODES = [FateZeroTuneAVideoLoader]
