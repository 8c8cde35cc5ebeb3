"""Training chosen weights of a ComfyUI UNet on a private clone, without touching the shared weights.

ComfyUI runs a model's weights through weight wrappers (``ModelPatcher.add_weight_wrapper``,
``comfy/model_patcher.py``; applied by ``comfy.ops`` ``cast_bias_weight``, ComfyUI 0.3.64): a
wrapper hands one weight a trainable copy (:class:`TrainedWeight`), another hands every other
weight detached (:func:`freeze_weights`). Gradient checkpointing wraps the forward of each layer of
the UNet's top-level blocks for the duration of a run (:func:`gradient_checkpointing`), as
ComfyUI's own Train LoRA node does (``TrainLoraNode`` with ``patch``, ``comfy_extras/nodes_train.py``).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch
import torch.utils.checkpoint
from torch import nn

from ..fatezero_core.frames import FrameContext
from ..fatezero_core.module_paths import ModuleResolver, resolved_children, resolved_modules
from .patching import unet_resolver


def query_weight_keys(resolve: ModuleResolver) -> list[str]:
    """State-dict keys of every attn1/attn2 ``to_q`` weight of the UNet that ``resolve`` reads
    (``diffusion_model.``)."""
    return [f"diffusion_model.{name}.weight" for name, _ in resolved_modules(resolve)
            if name.endswith(("attn1.to_q", "attn2.to_q"))]


class TrainedWeight(nn.Module):
    """A ComfyUI weight wrapper that runs a module with a trainable copy of its weight."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return self.weight.to(device=weight.device, dtype=weight.dtype)


def _frozen(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach()


def freeze_weights(trainer, skip: set[str]) -> None:
    """Keep autograd away from the shared 2D weights without touching them: ComfyUI parameters
    require grad (backward would fill a gradient for every weight of the UNet) and, when created
    under the executor's ``inference_mode``, cannot be saved for backward at all. A weight function
    on the training clone hands each op ComfyUI's cast copy, detached (one layer's weights at a time
    under gradient checkpointing); the model's tensors and flags are not changed."""
    for name, module in resolved_modules(unet_resolver(trainer)):
        if not hasattr(module, "weight_function"):
            continue
        for attr in ("weight", "bias"):
            key = f"diffusion_model.{name}.{attr}"
            if getattr(module, attr, None) is not None and key not in skip:
                trainer.add_weight_wrapper(key, _frozen)


def checkpoint_units(resolve: ModuleResolver) -> list[nn.Module]:
    """The layers of every top-level UNet block (ResBlocks, SpatialTransformers, samplers, inserted
    temporal convs) of the UNet that ``resolve`` reads: the UNet calls them one by one, so each is
    recomputed on its own."""
    blocks = [*resolved_children(resolve, "input_blocks"), ("middle_block", None),
              *resolved_children(resolve, "output_blocks")]
    return [layer for block, _ in blocks for _, layer in resolved_children(resolve, block)]


def _checkpointed(module: nn.Module, frames: FrameContext | None = None) -> None:
    """Recompute ``module``'s forward in backward (an instance attribute, removed afterwards).

    ``frames``: the clip runtime's frame context, whose state of the forward (clips in the batch,
    still images) is put back for the recomputation (``context_fn`` of
    ``torch.utils.checkpoint.checkpoint``): backward runs after the UNet call that set it."""
    forward = module.forward

    def contexts():
        return nullcontext(), (frames.replay() if frames is not None else nullcontext())

    def run(*args, **kwargs):
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, context_fn=contexts, **kwargs)

    module.forward = run


@contextmanager
def gradient_checkpointing(trainer, enabled: bool = True, frames: FrameContext | None = None) -> Iterator[None]:
    """Every layer of ``trainer``'s top-level UNet blocks recomputed in backward inside the block,
    with ``frames`` (the model's frame context) as it was in the forward; the layers' own forwards
    are back afterwards, also on an interrupt or an error."""
    units = checkpoint_units(unet_resolver(trainer)) if enabled else []
    for unit in units:
        _checkpointed(unit, frames)
    try:
        yield
    finally:
        for unit in units:
            unit.__dict__.pop("forward", None)


__all__ = ["TrainedWeight", "checkpoint_units", "freeze_weights", "gradient_checkpointing", "query_weight_keys"]
