"""FateZero Edit Settings: one edit of the source video, the target prompt and its word settings.

Everything here belongs to the edit, so changing it reruns FateZero Sample and what follows, never
the inversion. Several of these on one FateZero Source Prompt edit one inversion several ways in
one queue (the official ``editing_prompts``, each with its own ``p2p_config``).
"""

from __future__ import annotations

from comfy_api.latest import io

from .edit_inputs import edit_widget_inputs, target_prompt_input
from .prompt_encoding import edit_spec, encode_source, output_prefix
from .sockets import BlendSettings, SourcePromptSocket
from .user_errors import FateZeroNodeError, reports_user_errors


def check_same_clip(clip, source) -> None:
    """The words are read with this node's CLIP: it must be the CLIP that encoded the source."""
    _, again = encode_source(clip, source.text)
    if again.fingerprint != source.fingerprint:
        raise FateZeroNodeError(
            "This node's CLIP encodes the source prompt differently from the CLIP connected to "
            "FateZero Source Prompt: connect the same CLIP (after the same LoRA) to both.")


class FateZeroEditSettings(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FateZero_EditSettings",
            display_name="FateZero Edit Settings",
            category="FateZero/attention",
            description=(
                "One edit: the target prompt (what the video should become) and the word-level "
                "settings for FateZero Sample. Words keep their place in the video where the "
                "prompts agree; blend words mark the region that may change. Changing anything "
                "here does not run the inversion again. Encodes exactly as CLIP Text Encode."
            ),
            inputs=[
                io.Clip.Input("clip", tooltip="The same CLIP as FateZero Source Prompt's."),
                SourcePromptSocket.Input("source_prompt", tooltip="The source_prompt output of FateZero Source Prompt."),
                target_prompt_input(),
                *edit_widget_inputs(),
            ],
            outputs=[
                io.Conditioning.Output(display_name="target",
                                       tooltip="The encoded target prompt: FateZero Sample's positive (ControlNet may be applied to it)."),
                BlendSettings.Output(display_name="blend_settings",
                                     tooltip="Prompts and fusion settings for FateZero Sample."),
                io.String.Output(display_name="name",
                                 tooltip="'fatezero/<target prompt as a file name>': a filename_prefix for Save Video."),
            ],
        )

    @classmethod
    @reports_user_errors
    def execute(cls, clip, source_prompt, target_prompt, **edit) -> io.NodeOutput:
        if source_prompt is None or not hasattr(source_prompt, "fingerprint"):
            raise FateZeroNodeError("'source_prompt' must come from FateZero Source Prompt.")
        check_same_clip(clip, source_prompt)
        target, spec = edit_spec(clip, source_prompt, target_prompt, **edit)
        return io.NodeOutput(target, spec, output_prefix(target_prompt))
