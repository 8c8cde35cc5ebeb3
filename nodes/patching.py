"""Host adapter: turns ComfyUI attention replace patches into :class:`AttnCall` s for a controller.

Patches go on a ``model.clone()`` (never the caller's MODEL), one attn1 and one attn2 replace per
transformer block, keyed ``(block, number, block_index)``: ``ModelPatcher.set_model_attn1_replace``
stores the key, and ``BasicTransformerBlock.forward`` looks it up with the block's ``block_index``
(ComfyUI 0.3.64, ``comfy/model_patcher.py``, ``comfy/ldm/modules/attention.py``).
The patch functions are closures, so ``ModelPatcher.clone()``'s deep copy of ``model_options``
shares them instead of duplicating the controller.

Modules are read through :func:`unet_resolver`: the model's own view of its UNet, never the live
module tree, which may still hold another clone's object patches.
"""

from __future__ import annotations

import hashlib
import logging

import torch

from ..fatezero_core.attention import attention, video_self_attention
from ..fatezero_core.errors import FateZeroError
from ..fatezero_core.frames import frames_per_chunk
from ..fatezero_core.layers import AttnCall, LayerInfo
from ..fatezero_core.module_paths import ModuleResolver, resolved_children
from ..fatezero_core.sampling import step_of_sigma
from .context_windows import call_window, context_handler

PASS_KEY = "fatezero_pass"  # transformer_options flag of the recompute source pass
KEY_RULE_KEY = "fatezero_key_rule"  # model default key-frame rule (Tune-A-Video models)
# transformer_options flag of a UNet call on still images (the class step of Tune-A-Video tuning):
# per-image self-attention and norms, no temporal layers (the official UNet on a 4-D input)
STILL_IMAGES_KEY = "fatezero_still_images"

log = logging.getLogger("comfyui-fatezero")


def model_object(patcher, path: str):
    """The object at ``path`` (e.g. ``diffusion_model.input_blocks.1``) in the model ``patcher``
    builds: its own object patches where it has them, else the shared model's own objects.

    ComfyUI applies a clone's object patches into the model all clones share and leaves them there
    after sampling until another clone loads (``comfy/model_patcher.py`` ``patch_model``,
    ``unpatch_model``); ``ModelPatcher.get_model_object`` reads a name patched that way from its
    backup. Every level of ``path`` is read that way, so a path through a replaced container reaches
    the replacement this patcher installs, never one that another clone left behind."""
    parts = path.split(".")
    obj = patcher.model
    for depth, part in enumerate(parts, 1):
        name = ".".join(parts[:depth])
        if name in patcher.object_patches or name in patcher.object_patches_backup:
            obj = patcher.get_model_object(name)
        else:
            obj = getattr(obj, part)
    return obj


def unet_resolver(patcher) -> ModuleResolver:
    """``resolve(path)`` of the UNet ``patcher`` builds (paths inside ``diffusion_model``; ``""``
    is the UNet itself), for the core's module-path functions."""

    def resolve(path: str):
        return model_object(patcher, f"diffusion_model.{path}" if path else "diffusion_model")

    return resolve


def attention_block_keys(resolve: ModuleResolver) -> list[tuple[str, int, int]]:
    """``(block_name, number, block_index)`` of every transformer block with attn1/attn2 in the
    UNet that ``resolve`` reads (:func:`unet_resolver`)."""
    keys = []
    groups = [("input", resolved_children(resolve, "input_blocks")), ("middle", [("middle_block", None)]),
              ("output", resolved_children(resolve, "output_blocks"))]
    for name, blocks in groups:
        for number, (block, _) in enumerate(blocks):
            for layer, module in resolved_children(resolve, block):
                if not hasattr(module, "transformer_blocks"):
                    continue
                for index, (_, tb) in enumerate(resolved_children(resolve, f"{layer}.transformer_blocks")):
                    if hasattr(tb, "attn1") and hasattr(tb, "attn2"):
                        keys.append((name, number, index))
    return keys


def sampler_step(extra: dict) -> int:
    """The running sampler's step for this call: ``step_of_sigma`` of the call's ``sigmas``
    (``_calc_cond_batch``) in the schedule ``sample_sigmas`` (``CFGGuider.inner_sample``), both put
    in ``transformer_options`` by ComfyUI (``comfy/samplers.py``, 0.3.64)."""
    return step_of_sigma(extra["sample_sigmas"], extra["sigmas"])


def chunk_kinds(extra: dict) -> tuple[str, ...]:
    """``cond_or_uncond`` (0 = positive) as chunk names; the source pass is flagged separately."""
    kinds = extra.get("cond_or_uncond", [0])
    if extra.get(PASS_KEY) == "source":
        return ("source",) * len(kinds)
    return tuple("cond" if c == 0 else "uncond" for c in kinds)


def layer_info(q: torch.Tensor, extra: dict) -> LayerInfo:
    block, index = extra["block"], extra.get("block_index", 0)
    _, _, height, width = extra["activations_shape"]
    latent_h, latent_w = extra["original_shape"][-2:]
    return LayerInfo(f"{block[0]}_{block[1]}_{index}", int(height), int(width), int(latent_h),
                     int(latent_w), int(extra["n_heads"]), int(q.shape[-1]))


def attn_call(q, extra: dict, step_offset: int) -> AttnCall:
    chunks = chunk_kinds(extra)
    window, key_pass = call_window(extra, frames_per_chunk(q.shape[0], len(chunks)))
    return AttnCall(layer_info(q, extra), sampler_step(extra) + step_offset, chunks, window, key_pass)


def refuse_context_windows(model) -> None:
    """Tune-A-Video training tunes on the whole clip in one batch, as the official trainer does."""
    if model.model_options.get("context_handler") is not None:
        raise FateZeroError(
            "This model uses context windows, which split the frames across UNet calls; "
            "Tune-A-Video training tunes on the whole clip at once. Train on the model before "
            "Context Windows (Manual) and apply the windows to the trained model instead."
        )


def patched_clone(model, controller, step_offset: int):
    """A clone of ``model`` whose attention runs through ``controller``.

    ``step_offset`` maps the sampler's sigma index to the controller's step: -1 for inversion (the
    model runs at the next, noisier sigma), 0 for editing.
    """
    context_handler(model)  # refuses a handler FateZero cannot run in, before any work
    clone = model.clone()

    def attn1(q, k, v, extra):
        return controller.attn1(q, k, v, attn_call(q, extra, step_offset))

    def attn2(q, k, v, extra):
        return controller.attn2(q, k, v, attn_call(q, extra, step_offset))

    existing = clone.model_options.get("transformer_options", {}).get("patches_replace", {})
    if existing.get("attn1") or existing.get("attn2"):
        log.warning("FateZero replaces attention patches already on this model (%s).",
                    sorted(set(existing.get("attn1", {})) | set(existing.get("attn2", {}))))
    keys = attention_block_keys(unet_resolver(clone))
    if not keys:
        raise FateZeroError("This model has no attention blocks FateZero can hook; use an SD1.x model.")
    for key in keys:
        clone.set_model_attn1_replace(attn1, *key)
        clone.set_model_attn2_replace(attn2, *key)
    return clone


def add_video_self_attention(patcher, rule, on_call=None) -> None:
    """attn1 replace patches on ``patcher`` (a clone the caller owns) that run every transformer
    block's self-attention spatio-temporally with key-frame ``rule``, per clip of the batch, with
    nothing captured or fused: the network a Tune-A-Video model is (tuned as). ``on_call()`` runs
    before each call (e.g. the host's interrupt check). A call flagged :data:`STILL_IMAGES_KEY`
    attends within each image: the official ``SparseCausalAttention.forward`` without a clip length
    (FateZero ``video_diffusion/models/attention.py``)."""

    def attn1(q, k, v, extra):
        if on_call is not None:
            on_call()
        if extra.get(STILL_IMAGES_KEY):
            return attention(q, k, v, int(extra["n_heads"]))
        chunks = len(extra.get("cond_or_uncond") or ()) or 1
        return video_self_attention(q, k, v, int(extra["n_heads"]), rule, chunks)

    for key in attention_block_keys(unet_resolver(patcher)):
        patcher.set_model_attn1_replace(attn1, *key)


def model_fingerprint(model) -> str:
    """Identity of a MODEL and its patches, recorded in the store to refuse another model."""
    base = model.model
    objects = ",".join(sorted(model.object_patches))
    return f"{type(base).__name__}:{id(base):x}:{model.patches_uuid}:{objects}"


def model_key_rule(model):
    """The key-frame rule a model asks for (Tune-A-Video: previous + first frame), or None."""
    return model.model_options.get("transformer_options", {}).get(KEY_RULE_KEY)


def conditioning_fingerprint(conditioning) -> str:
    """Hash of the text embeddings, so the edit can check it uses the same source prompt."""
    h = hashlib.sha256()
    for cond, _ in conditioning:
        h.update(cond.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
