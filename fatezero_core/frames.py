"""Frame-major batches of clips, and the clip-level GroupNorm of the official inflated UNet.

The host runs the UNet on ``(B*F, ...)``: B chunks (uncond/cond under CFG, the ``recompute`` source
pass, ...), each holding the F frames of one clip in order. Layers that mix frames need F; convs
and norms get no side information in the UNet's forward, so a shared :class:`FrameContext`, set by
the host around each UNet call, tells them how many clips the running batch holds.

Clip-level GroupNorm: FateZero's ``UNetPseudo3DConditionModel`` and Tune-A-Video's
``UNet3DConditionModel`` apply ``torch.nn.GroupNorm`` to ``[b, c, f, h, w]`` in every ResNet block
(``norm1``, ``norm2`` in ``ResnetBlockPseudo3D.forward``, ``video_diffusion/models/resnet.py`` of
github.com/ChenyangQiQi/FateZero at 9b6cb7b; ``ResnetBlock3D.forward``, ``tuneavideo/models/resnet.py``
of github.com/showlab/Tune-A-Video) and at the output (``conv_norm_out`` in each UNet's
``forward``), so mean and variance pool over each channel group *and every frame of the clip*. A
2-D UNet with frames as the batch normalises each frame alone: a different network.
:class:`VideoNormSequential` runs the same modules with the leading GroupNorm applied per clip.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import nn

from .errors import FateZeroError
from .module_paths import ModuleResolver, resolved_modules


def frames_per_chunk(batch: int, chunks: int) -> int:
    """Frames of one clip in a frame-major batch of ``chunks`` clips (``batch = chunks * F``)."""
    if chunks < 1 or batch % chunks != 0:
        raise FateZeroError(
            f"A batch of {batch} latents cannot hold {chunks} whole clips. FateZero and "
            "Tune-A-Video layers need the same frames for every cond in a UNet call (the whole clip, "
            "or one context window of it): turn off batch splitting for this model.")
    return batch // chunks


class FrameContext:
    """How many clips the batch now running through the UNet holds, or that it holds still images.

    The host sets it around each UNet call (``with context.running(chunks): ...``); layers ask
    ``frames(batch)``. Outside a call, or when the host gives no count, the whole batch is one
    clip. Shared, never copied: a deep copy returns the same object, so model clones that copy
    their options keep talking to the layers that are actually installed.

    ``running(chunks, stills=True)``: the batch is single images, as the official inflated UNet
    runs a 4-D input (the class images of Tune-A-Video tuning, ``DDPMTrainer.step2d`` in
    ``video_diffusion/trainer/ddpm_trainer.py``, FateZero 9b6cb7b): every image is its own
    one-frame clip for the norms (``frames`` is 1), and temporal layers are skipped (calling the
    context gives ``None``), as ``PseudoConv3d.forward`` and ``SpatioTemporalTransformerModel.forward``
    skip their temporal parts when the input is not 5-D.
    """

    def __init__(self) -> None:
        self._chunks: Optional[int] = None
        self._stills = False

    @property
    def chunks(self) -> Optional[int]:
        return self._chunks

    @property
    def stills(self) -> bool:
        return self._stills

    @contextmanager
    def running(self, chunks: Optional[int], stills: bool = False) -> Iterator["FrameContext"]:
        previous = self._chunks, self._stills
        self._chunks, self._stills = chunks, stills
        try:
            yield self
        finally:
            self._chunks, self._stills = previous

    def replay(self):
        """A context manager that puts back the state in force now: a layer recomputed later (in
        backward, under gradient checkpointing, after the host's call has returned) must see the
        batch as its forward did."""
        return self.running(self._chunks, self._stills)

    def frames(self, batch: int) -> int:
        """Frames per clip of a batch of ``batch`` latents (1 for still images)."""
        if self._stills:
            return 1
        return frames_per_chunk(batch, self._chunks or 1)

    def __call__(self, batch: int) -> Optional[int]:
        """The frame count temporal layers run with: ``None`` (skip) for still images."""
        if self._stills:
            return None
        return self.frames(batch)

    def __deepcopy__(self, memo) -> "FrameContext":
        return self


def video_group_norm(norm: nn.Module, x: torch.Tensor, frames: int) -> torch.Tensor:
    """``norm`` (a GroupNorm module) on the frame-major batch ``x`` ``(B*F, C, ...)``, with
    statistics over each clip of ``frames`` frames.

    This is the official layer itself: ``norm`` is called on the ``[b, c, f, h, w]`` view, exactly
    as ``ResnetBlockPseudo3D.forward`` calls ``norm1``/``norm2`` (FateZero ``models/resnet.py``) and
    ``UNetPseudo3DConditionModel.forward`` calls ``conv_norm_out`` (``unet_3d_condition.py``); the
    host's module keeps its own weight casting and patches. ``frames`` comes from
    :func:`frames_per_chunk` (via :class:`FrameContext`), which has already refused a batch that
    is not whole clips.
    """
    clips = x.unflatten(0, (-1, frames)).transpose(1, 2)  # [b, c, f, *spatial]
    return norm(clips).transpose(1, 2).flatten(0, 1)


class VideoNormSequential(nn.Sequential):
    """The same modules as a ResNet block's ``in_layers`` / ``out_layers`` or the UNet's ``out``
    (GroupNorm first, as :func:`video_norm_paths` finds them), with that GroupNorm computed over each
    clip (:func:`video_group_norm`).

    The modules are the host's own objects under their own indices, so every weight keeps its
    state-dict key and weight patches (LoRA) still find it; anything appended after them (a
    Tune-A-Video temporal conv) runs as before.
    """

    def __init__(self, *modules: nn.Module, frames: FrameContext):
        super().__init__(*modules)
        self.frames = frames

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm, *rest = self
        x = video_group_norm(norm, x, self.frames.frames(x.shape[0]))
        for module in rest:
            x = module(x)
        return x

    def __getitem__(self, index):
        # A ResNet block with up/down sampling runs ``in_layers[:-1]`` and ``in_layers[-1]``
        # separately: a slice that still starts with the norm keeps it clip-level.
        if isinstance(index, slice):
            modules = list(self._modules.values())[index]
            if modules and modules[0] is self[0]:
                return VideoNormSequential(*modules, frames=self.frames)
            return nn.Sequential(*modules)
        return super().__getitem__(index)


def video_norm_paths(resolve: ModuleResolver) -> list[str]:
    """Paths (inside an ldm-style SD UNet, as ComfyUI builds it, read through ``resolve``) of the
    containers whose leading GroupNorm the official UNet applies over the clip: every ResNet block's
    ``in_layers`` and ``out_layers`` (``norm1``, ``norm2``) and the output ``out``
    (``conv_norm_out``). The transformers' input norms stay per frame, as in the official code."""
    paths = []
    for path, module in resolved_modules(resolve):
        video_level = path == "out" or path.rsplit(".", 1)[-1] in ("in_layers", "out_layers")
        if video_level and isinstance(module, nn.Sequential) and len(module) and isinstance(module[0], nn.GroupNorm):
            paths.append(path)
    return paths


__all__ = ["VideoNormSequential", "FrameContext", "video_group_norm", "video_norm_paths", "frames_per_chunk"]
