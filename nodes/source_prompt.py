"""FateZero Source Prompt: the prompt that describes the input video, typed once.

Its ``source`` CONDITIONING feeds FateZero DDIM Invert (and Tune-A-Video Train); its
``source_prompt`` feeds every FateZero Edit Settings. The inversion then depends only on the
frames, the model, this prompt and its own settings: ComfyUI serves it from its cache while the
target prompt, the words, cfg, the sampler or ControlNet change.
"""

from __future__ import annotations

from comfy_api.latest import io

from .edit_inputs import source_prompt_inputs
from .prompt_encoding import encode_source
from .sockets import SourcePromptSocket
from .user_errors import reports_user_errors


class FateZeroSourcePrompt(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FateZero_SourcePrompt",
            display_name="FateZero Source Prompt",
            category="FateZero/attention",
            description=(
                "Describe the input video once. 'source' goes to FateZero DDIM Invert; "
                "'source_prompt' goes to each FateZero Edit Settings, which read its words. "
                "Encodes exactly as CLIP Text Encode. SD1.x only."
            ),
            inputs=[
                *source_prompt_inputs(),
            ],
            outputs=[
                io.Conditioning.Output(display_name="source",
                                       tooltip="The encoded source prompt: connect to FateZero DDIM Invert."),
                SourcePromptSocket.Output(display_name="source_prompt",
                                          tooltip="The source prompt's words: connect to FateZero Edit Settings."),
            ],
        )

    @classmethod
    @reports_user_errors
    def execute(cls, clip, source_prompt) -> io.NodeOutput:
        return io.NodeOutput(*encode_source(clip, source_prompt))
