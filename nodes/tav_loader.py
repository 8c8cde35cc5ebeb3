"""Tune-A-Video Loader: a Tune-A-Video / FateZero inflated UNet as an ordinary SD1.x MODEL.

The checkpoint's 2D weights are loaded by ComfyUI's own diffusers-UNet loader
(``comfy.sd.load_diffusion_model_state_dict``), or into the base model's config through ComfyUI's
key conversion (``comfy.utils.unet_to_diffusers``). The same conversion finds where each temporal
layer goes: the core names its owner in diffusers terms, and the owner's ComfyUI path is read from
the mapping of the owner's weights. The temporal layers are added as object patches on the
``ModelPatcher`` (``fatezero_core.tav.inflate``), so the 2D weights keep their keys and LoRA,
ControlNet and every sampler work as with any SD1.x model:

- temporal attention after each transformer block: ``<SpatialTransformer>.transformer_blocks``
  becomes ``ModuleList([block, TemporalBlockAdapter])``;
- temporal convs after each inflated conv: the Sequential holding the conv (or the Downsample /
  Upsample ending with it) is replaced by one holding the same modules plus the temporal conv.

The clip runtime (``clip_runtime``, a ``DIFFUSION_MODEL`` wrapper) tells the temporal layers how
many clips the running batch holds (one per ``cond_or_uncond`` entry), moves them to the UNet's
device when ComfyUI has not, and off it when ComfyUI detaches the model. The ResNet and output
GroupNorms pool over the clip, as in the Tune-A-Video UNet the checkpoint was tuned as, in every
sampler.
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
import comfy.model_management
import comfy.model_patcher
import comfy.sd
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
    sd1_unet_mismatch,
    temporal_targets,
)
from ..fatezero_core.tav.inflate import block_list_patch, conv_patch
from ..fatezero_core.tav.modules import FramewiseTemporalConv, TemporalAttention, temporal_module_from_state_dict
from .clip_runtime import clip_runtime, use_clip_group_norm
from .patching import KEY_RULE_KEY, unet_resolver
from .user_errors import FateZeroNodeError, reports_user_errors

FOLDER = "tuneavideo"
WEIGHT_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES

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
    through ComfyUI's key conversion, the SD1.x diffusers keys and shapes (``fatezero_core.tav``)."""
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


def _check_base(base, ckpt: TavCheckpoint) -> None:
    """The base MODEL must be an SD1.x UNet of the checkpoint's width; differences named."""
    problem = sd1_unet_problem(base, int(ckpt.unet_2d["conv_in.weight"].shape[0]))
    if problem:
        raise FateZeroNodeError(
            f"The base model does not fit the Tune-A-Video checkpoint: {problem}. Connect the SD1.x "
            "checkpoint it was tuned from, or leave base_model empty."
        )


def _load_unet(ckpt: TavCheckpoint):
    """ComfyUI's diffusers-UNet loader (model detection, UNet dtype, devices), as UNETLoader."""
    patcher = comfy.sd.load_diffusion_model_state_dict(dict(ckpt.unet_2d))  # it pops the keys it loads
    if patcher is None:
        width = int(ckpt.unet_2d["conv_in.weight"].shape[0])
        sd15_width = comfy.supported_models.SD15.unet_config["model_channels"]
        raise CheckpointError(
            f"ComfyUI does not detect {ckpt.source} as a Stable Diffusion 1.x UNet on its own (its "
            f"width is {width}; ComfyUI's SD1.x UNets have {sd15_width}). Connect the SD1.x "
            "checkpoint it was tuned from as base_model.")
    return patcher


def _load_into_base_config(ckpt: TavCheckpoint, base):
    """A new model of the base's class and config, holding the checkpoint's 2D weights (ComfyUI's
    key conversion and weight loading)."""
    source = base.model
    model = type(source)(source.model_config, model_type=source.model_type)
    model.model_sampling = copy.deepcopy(source.model_sampling)
    key_map = diffusers_key_map(source.model_config.unet_config)
    model.load_model_weights({key_map[k]: v for k, v in ckpt.unet_2d.items()}, "")
    model = model.to(base.offload_device).eval()
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=base.load_device, offload_device=base.offload_device)
    _carry_over(base, patcher)
    return patcher


def build_unet_model(ckpt: TavCheckpoint, base=None):
    """A new ``ModelPatcher`` over a new SD1.x ``BaseModel`` holding the checkpoint's 2D weights.

    Without ``base``: ComfyUI's own diffusers-UNet loader (SD1.5 model config, latent format,
    eps sampling, ComfyUI's usual UNet dtype). With ``base``: the base model's config, prediction
    type, model sampling, devices, model options and non-UNet object patches; its UNet weights
    (and weight patches such as LoRA) are replaced by the checkpoint's, its base weights are left
    untouched.
    """
    if base is None:
        return _load_unet(ckpt)
    _check_base(base, ckpt)
    return _load_into_base_config(ckpt, base)


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
    resolve = unet_resolver(patcher)
    heads = int(patcher.model.model_config.unet_config.get("num_heads", 8))
    if heads <= 0:
        heads = 8
    dtype = dtype or compute_dtype(patcher)
    runtime = clip_runtime(patcher)
    key_map = diffusers_key_map(patcher.model.model_config.unet_config)
    nbytes = 0
    for target in targets:
        layer = temporal_module_from_state_dict(target.kind, target.state_dict, heads=heads)
        layer = layer.to(device=patcher.offload_device, dtype=dtype).eval()
        runtime.modules.append(layer)
        nbytes += sum(p.numel() * p.element_size() for p in layer.parameters())
        owner = module_path(target.owner, key_map)
        if target.kind == "attention":
            path, container = block_list_patch(resolve, owner, TemporalBlockAdapter(layer, runtime.frames))
        else:
            path, container = conv_patch(resolve, owner, FramewiseTemporalConv(layer, runtime.frames))
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
            return float("nan")  # a new NaN each time (math.nan is one object, equal to itself in keys)

    @classmethod
    @reports_user_errors
    def execute(cls, checkpoint, base_model=None) -> io.NodeOutput:
        path = resolve_checkpoint(checkpoint)
        ckpt = load_tav_checkpoint(path)
        model = build_unet_model(ckpt, base_model)
        inserted = insert_temporal_layers(model, ckpt)
        if ckpt.layout == LAYOUT_PLAIN:
            log.warning("Tune-A-Video Loader: %s has no temporal layers; loaded as a plain SD1.x UNet.", checkpoint)
        else:
            log.info("Tune-A-Video Loader: %s (%s layout), %d temporal layers.", checkpoint, ckpt.layout, inserted)
        return io.NodeOutput(model)
