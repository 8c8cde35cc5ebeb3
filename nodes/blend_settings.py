"""FateZero Attention Blend Settings (deprecated): both prompts and the edit options in one node.

Kept so workflows saved with it still load and run, unchanged. It makes DDIM Invert depend on the
target prompt and every edit widget (ComfyUI keys a node's cache on everything upstream), so each
change of an edit inverts again: new graphs use FateZero Source Prompt + FateZero Edit Settings.
"""

from __future__ import annotations

from comfy_api.latest import io

from .edit_inputs import edit_widget_inputs, source_prompt_inputs, target_prompt_input
from .prompt_encoding import edit_spec, encode_source
from .sockets import BlendSettings
from .user_errors import reports_user_errors


class FateZeroAttentionBlendSettings(io.ComfyNode):
    """Source/target prompts and FateZero's attention-fusion settings (deprecated)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FateZero_AttentionBlendSettings",
            display_name="FateZero Attention Blend Settings (deprecated)",
            category="FateZero/attention",
            is_deprecated=True,
            description=(
                "Deprecated: use FateZero Source Prompt and FateZero Edit Settings, so changing the "
                "target prompt or a word setting no longer runs the inversion again. Still works "
                "as before: encodes the source and target prompts with the CLIP (like CLIP Text "
                "Encode) and bundles the word-level edit settings for FateZero Sample. SD1.x only."
            ),
            inputs=[
                *source_prompt_inputs(),
                target_prompt_input(),
                *edit_widget_inputs(),
            ],
            outputs=[
                io.Conditioning.Output(display_name="source", tooltip="The encoded source prompt."),
                io.Conditioning.Output(display_name="target", tooltip="The encoded target prompt."),
                BlendSettings.Output(
                    display_name="blend_settings",
                    tooltip="Prompts, their tokens and fusion settings for FateZero Sample.",
                ),
            ],
        )

    @classmethod
    @reports_user_errors
    def execute(cls, clip, source_prompt, target_prompt, **edit) -> io.NodeOutput:
        source, source_prompt_data = encode_source(clip, source_prompt)
        target, spec = edit_spec(clip, source_prompt_data, target_prompt, **edit)
        return io.NodeOutput(source, target, spec)
