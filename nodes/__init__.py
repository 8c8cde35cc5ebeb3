"""ComfyUI nodes of comfyui-fatezero (V3 API).

This package is the only code that imports ComfyUI. Each module holds one node family and adapts
host objects to ``fatezero_core``; the extension below registers every node class.
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .blend_settings import FateZeroAttentionBlendSettings
from .edit_list import FateZeroEditList
from .edit_settings import FateZeroEditSettings
from .invert import FateZeroDDIMInvert
from .metrics import FateZeroVideoMetrics
from .sample import FateZeroSample
from .source_prompt import FateZeroSourcePrompt
from .tav_loader import FateZeroTuneAVideoLoader
from .tav_train import FateZeroTuneAVideoTrain
from .video import FateZeroLoadVideoFrames


def node_classes() -> list[type[io.ComfyNode]]:
    """Every node class of the pack, in menu order."""
    return [FateZeroLoadVideoFrames, FateZeroSourcePrompt, FateZeroTuneAVideoLoader, FateZeroTuneAVideoTrain,
            FateZeroDDIMInvert, FateZeroEditSettings, FateZeroEditList, FateZeroSample, FateZeroVideoMetrics,
            FateZeroAttentionBlendSettings]


class FateZeroExtension(ComfyExtension):
    """Registers the FateZero nodes with ComfyUI."""

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return node_classes()


async def comfy_entrypoint() -> FateZeroExtension:
    """Called by ComfyUI when it loads the pack."""
    return FateZeroExtension()


__all__ = ["FateZeroExtension", "comfy_entrypoint", "node_classes"]
