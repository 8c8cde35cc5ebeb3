"""Socket types this pack adds to ComfyUI.

Sockets match by type name, so these strings are part of saved workflows: never rename them.
"""

from comfy_api.latest import io

AttnStore = io.Custom("FATEZERO_ATTN_STORE")
"""Attention captured by FateZero DDIM Invert, consumed by FateZero Sample."""

BlendSettings = io.Custom("FATEZERO_BLEND_SETTINGS")
"""A ``fatezero_core.edit_spec.EditSpec``: both prompts laid out on their token positions and the
fusion options (plain data)."""


SourcePromptSocket = io.Custom("FATEZERO_SOURCE_PROMPT")
"""A ``fatezero_core.edit_spec.SourcePrompt``: the source prompt's text and encoding hash, from
FateZero Source Prompt to FateZero Edit Settings."""

__all__ = ["AttnStore", "BlendSettings", "SourcePromptSocket"]
