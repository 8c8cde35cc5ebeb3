"""Tune-A-Video Loader: a Tune-A-Video / FateZero inflated UNet as an ordinary SD1.x MODEL.

The checkpoint's 2D weights are loaded by ComfyUI's own diffusers-UNet loader
(``comfy.sd.load_diffusion_model_state_dict``), or into the base model's config through ComfyUI's
key conversion (``comfy.utils.unet_to_diffusers``); its temporal layers are then inserted as object
patches (``tav_network``), so LoRA, ControlNet and every sampler work as with any SD1.x model, and
the model carries the Tune-A-Video key-frame rule for FateZero DDIM Invert's key_frames "auto".
Checkpoints are listed from and resolved in ``models/tuneavideo`` (``tav_folder``).
"""

from __future__ import annotations

import copy
import logging

import comfy.model_patcher
import comfy.sd
import comfy.supported_models
from comfy_api.latest import io

from ..fatezero_core.errors import CheckpointError
from ..fatezero_core.tav.checkpoint import LAYOUT_PLAIN, TavCheckpoint, load_tav_checkpoint
from .tav_folder import list_checkpoints, resolve_checkpoint, weights_fingerprint
from .tav_network import diffusers_key_map, insert_temporal_layers, sd1_unet_problem
from .user_errors import FateZeroNodeError, reports_user_errors

log = logging.getLogger("comfyui-fatezero")


# --------------------------------------------------------------------------------------------------
# The 2D UNet
# --------------------------------------------------------------------------------------------------

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
        inserted = len(insert_temporal_layers(model, ckpt))
        if ckpt.layout == LAYOUT_PLAIN:
            log.warning("Tune-A-Video Loader: %s has no temporal layers; loaded as a plain SD1.x UNet.", checkpoint)
        else:
            log.info("Tune-A-Video Loader: %s (%s layout), %d temporal layers.", checkpoint, ckpt.layout, inserted)
        return io.NodeOutput(model)
