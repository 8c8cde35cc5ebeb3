"""Host side of frame-major clips: one ``DIFFUSION_MODEL`` wrapper that tells inserted layers how many
clips the running batch holds, and the clip-level GroupNorm patches that use it.

Tune-A-Video temporal layers (``tav_loader``) and the clip-level ResNet/output GroupNorm of the
official inflated UNet (``fatezero_core.frames``) both need the frame count of the batch now in the
UNet. One wrapper per model supplies it: around each UNet call it sets the shared
:class:`~fatezero_core.frames.FrameContext` to ``len(cond_or_uncond)`` clips (ComfyUI batches one
whole clip per cond entry: uncond and cond under CFG, the ``recompute`` source pass, ControlNet or
not, together or in separate calls), or to still images when the call is flagged
``STILL_IMAGES_KEY`` (:func:`still_images_options`). Everything goes on a clone the caller owns; the MODEL a node
receives is never modified.
"""

from __future__ import annotations

import torch
from torch import nn

import comfy.model_management
import comfy.model_patcher
from comfy.patcher_extension import CallbacksMP, WrappersMP

from ..fatezero_core.errors import FateZeroError
from ..fatezero_core.frames import VideoNormSequential, FrameContext, video_norm_paths
from .patching import STILL_IMAGES_KEY, unet_resolver

WRAPPER_KEY = "fatezero_clip"
GROUP_NORM_KEY = "fatezero_group_norm"  # transformer_options flag: "clip" once the norms are patched
GROUP_NORMS = ("clip", "frame")


class VideoRuntime:
    """The ``DIFFUSION_MODEL`` wrapper of a model with clip-aware layers, and the keeper of the
    layers it owns (Tune-A-Video temporal layers). Shared by every clone of the model: a deep copy
    returns the same object.

    Around each UNet call it sets the clip count of the batch and puts the layers on the UNet
    input's device: ComfyUI moves them itself only when it moves the whole network with them
    applied, not when the network is partially loaded or already loaded and only the object
    patches change. They leave the device in :meth:`leave`, when ComfyUI detaches the model."""

    def __init__(self) -> None:
        self.frames = FrameContext()
        self.modules: list[nn.Module] = []

    def follow(self, device: torch.device) -> None:
        for module in self.modules:
            if next(module.parameters()).device != device:
                module.to(device)

    def __call__(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        self.follow(x.device)
        chunks = len(transformer_options.get("cond_or_uncond") or ()) or None
        with self.frames.running(chunks, stills=bool(transformer_options.get(STILL_IMAGES_KEY))):
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)

    def leave(self, patcher, unpatch_all: bool = True) -> None:
        """``ON_DETACH`` callback (``ModelPatcher.detach``, ComfyUI 0.3.64
        ``comfy/model_patcher.py``): ComfyUI unloaded ``patcher``, let another clone of its network
        take its place (whose network then no longer holds these layers, so moving the network
        would not move them), or dropped it. The layers go to ``patcher``'s offload device, unless
        a model ComfyUI still has loaded runs them."""
        device = patcher.offload_device
        if all(next(module.parameters()).device == device for module in self.modules):
            return
        if any(self in loaded.get_wrappers(WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY)
               for loaded in comfy.model_management.loaded_models() if loaded is not None and loaded is not patcher):
            return
        self.follow(device)

    def __deepcopy__(self, memo) -> "VideoRuntime":
        return self


def video_runtime(patcher) -> VideoRuntime:
    """The model's clip runtime, installed on ``patcher`` (a clone the caller owns) if it has none:
    the wrapper, and the callback that takes its layers off the device with the model."""
    existing = patcher.get_wrappers(WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY)
    if existing:
        return existing[0]
    runtime = VideoRuntime()
    patcher.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, runtime)
    patcher.add_callback_with_key(CallbacksMP.ON_DETACH, WRAPPER_KEY, runtime.leave)
    return runtime


def still_images_options(model_options: dict) -> dict:
    """A copy of sampling ``model_options`` whose UNet calls run the batch as still images (each
    latent alone: per-image norms and self-attention, no temporal layers), as the official
    inflated UNet runs a 4-D input."""
    options = comfy.model_patcher.create_model_options_clone(model_options)
    options.setdefault("transformer_options", {})[STILL_IMAGES_KEY] = True
    return options


def model_group_norm(model) -> str:
    """``clip`` when the model's ResNet/output GroupNorms already pool over the clip
    (a Tune-A-Video model, or a clone made by :func:`use_video_group_norm`), else ``frame``."""
    return model.model_options.get("transformer_options", {}).get(GROUP_NORM_KEY, "frame")


def use_video_group_norm(patcher) -> None:
    """Make the ResNet and output GroupNorms of ``patcher``'s UNet pool over each clip.

    Object patches on ``patcher`` (a clone the caller owns) replace each norm's container by a
    :class:`VideoNormSequential` of the same modules, composed with whatever this model already
    has there (a Tune-A-Video temporal conv). Idempotent."""
    if model_group_norm(patcher) == "clip":
        return
    runtime = video_runtime(patcher)
    resolve = unet_resolver(patcher)
    for path in video_norm_paths(resolve):
        patcher.add_object_patch(f"diffusion_model.{path}", VideoNormSequential(*resolve(path), frames=runtime.frames))
    patcher.model_options.setdefault("transformer_options", {})[GROUP_NORM_KEY] = "clip"


def with_group_norm(model, group_norm: str):
    """``model`` itself for ``frame`` on a per-frame model; a clone with clip-level norms for
    ``clip``. A model tuned with clip-level norms (Tune-A-Video) cannot run per frame."""
    if group_norm not in GROUP_NORMS:
        raise FateZeroError(f"Unknown group_norm '{group_norm}'; use one of {GROUP_NORMS}.")
    current = model_group_norm(model)
    if group_norm == current:
        return model
    if current == "clip":
        raise FateZeroError(
            "This model normalises its ResNet blocks over the whole clip (a Tune-A-Video model is "
            "tuned that way) and cannot run with group_norm 'frame': set group_norm to 'clip'."
        )
    clone = model.clone()
    use_video_group_norm(clone)
    return clone
