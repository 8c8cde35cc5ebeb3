"""Inserting Tune-A-Video temporal layers into an ldm-style (ComfyUI) SD1.x UNet.

The host swaps whole containers (object patches) instead of renaming modules, so every 2D weight
keeps its state-dict key and weight patches such as LoRA still find it:

- temporal attention runs after a transformer block: the block list ``<...>.transformer_blocks``
  becomes ``ModuleList([*blocks, temporal])`` (the original blocks keep their indices);
- a temporal conv runs on an inflated conv's output: the ``nn.Sequential`` whose *last* element is
  the conv (``in_layers``, ``out_layers``, ``input_blocks.0``, ``out``), or whose last element is a
  module ending with that conv (``Downsample.op``, ``Upsample.conv``), is rebuilt with the same
  type and the same module objects, plus the temporal layer appended.

Functions here only build the replacement containers; the host installs them (and undoes that) at
the paths returned. They read the modules through a resolver (``fatezero_core.module_paths``) that
answers for the model being built, because the host's live module tree may still hold another
model's replacements. ``fatezero_core.frames.FrameContext`` carries the frame count of the batch now
running to layers that cannot see it themselves (convs get no side information in the UNet's forward).
"""

from __future__ import annotations

from typing import Tuple

from torch import nn

from ..errors import CheckpointError
from ..module_paths import ModuleResolver


def _split(path: str) -> Tuple[str, str]:
    if "." not in path:
        raise CheckpointError(f"'{path}' is not a path inside the UNet.")
    parent, child = path.rsplit(".", 1)
    return parent, child


def _submodule(resolve: ModuleResolver, path: str, what: str) -> nn.Module:
    try:
        return resolve(path)
    except AttributeError:
        raise CheckpointError(
            f"The model has no {what} at '{path}'; it is not an SD1.x UNet as ComfyUI builds it."
        ) from None


def _is_last(container: nn.Module, child: str) -> bool:
    return child == str(len(container) - 1)


def _require_last(container: nn.Module, kind: type, child: str, message: str) -> None:
    """Appending after ``child`` must move no other weight: it has to be ``container``'s last."""
    if not isinstance(container, kind) or not _is_last(container, child):
        raise CheckpointError(message)


def block_list_patch(resolve: ModuleResolver, block_path: str, extra: nn.Module) -> Tuple[str, nn.ModuleList]:
    """``(path, replacement)`` that runs ``extra`` after the transformer block at ``block_path``
    (e.g. ``input_blocks.1.1.transformer_blocks.0``): the block list (as ``resolve`` names it) with
    ``extra`` appended.

    The block must be the last of its list, so no other block moves."""
    owner, child = _split(block_path)
    blocks = _submodule(resolve, owner, "transformer block list")
    _require_last(blocks, nn.ModuleList, child,
                  f"Cannot insert temporal attention after '{block_path}': it is not the last block of "
                  f"'{owner}'. Tune-A-Video models are SD1.x UNets with one block per transformer.")
    return owner, nn.ModuleList([*blocks, extra])


def conv_patch(resolve: ModuleResolver, conv_path: str, extra: nn.Module) -> Tuple[str, nn.Sequential]:
    """``(path, replacement)`` that runs ``extra`` on the output of the conv at ``conv_path``.

    The replacement is the nearest ``nn.Sequential`` ancestor as ``resolve`` names it (same type,
    same module objects) with ``extra`` appended: the conv's own Sequential when the conv is its
    last element (``...in_layers.2``, ``out.2``, ``input_blocks.0.0``), else the Sequential whose
    last element is the conv's owner when the conv is that owner's final operation
    (``Downsample.op``, ``Upsample.conv``: ``input_blocks.3.0.op`` -> ``input_blocks.3``)."""
    parent_path, child = _split(conv_path)
    parent = _submodule(resolve, parent_path, "conv owner")
    if isinstance(parent, nn.Sequential):
        _require_last(parent, nn.Sequential, child,
                      f"Cannot insert a temporal conv after '{conv_path}': it is not the last layer of "
                      f"'{parent_path}', so appending would move other weights.")
        return parent_path, type(parent)(*parent, extra)
    if child not in ("op", "conv"):
        raise CheckpointError(
            f"Cannot insert a temporal conv after '{conv_path}': only convs in a Sequential or the "
            "conv of a Downsample/Upsample can be inflated."
        )
    outer_path, owner = _split(parent_path)
    outer = _submodule(resolve, outer_path, "block")
    _require_last(outer, nn.Sequential, owner,
                  f"Cannot insert a temporal conv after '{conv_path}': '{parent_path}' is not the last "
                  f"layer of a Sequential.")
    return outer_path, type(outer)(*outer, extra)


__all__ = ["block_list_patch", "conv_patch"]
