"""The inputs of the prompt nodes, shared by FateZero Source Prompt, FateZero Edit Settings and the
deprecated FateZero Attention Blend Settings (same names, order and defaults, so saved workflows keep their values)."""

from __future__ import annotations

from comfy_api.latest import io

from ..fatezero_core.prompt_align import MODES

MODE_OPTIONS = ["auto"] + [m for m in MODES if m != "auto"]


def source_prompt_inputs() -> list:
    """The CLIP and the source prompt: FateZero Source Prompt's inputs, first on the deprecated node."""
    return [
        io.Clip.Input("clip", tooltip="The CLIP of the SD1.x checkpoint used for inversion and editing."),
        io.String.Input(
            "source_prompt", multiline=True, dynamic_prompts=False,
            tooltip=(
                "Describes the input video, e.g. 'a silver jeep driving down a curvy road'. "
                "At most 75 tokens; ComfyUI prompt syntax works as in CLIP Text Encode."
            ),
        ),
    ]


def target_prompt_input() -> io.String.Input:
    return io.String.Input(
        "target_prompt", multiline=True, dynamic_prompts=False,
        tooltip=(
            "The edited video, e.g. 'a Porsche car driving down a curvy road'. At most 75 "
            "tokens. '(word:1.2)' and 'embedding:name' work as in CLIP Text Encode: a "
            "weight scales the word's embedding, not its attention (that is reweight)."
        ),
    )


def edit_widget_inputs() -> list:
    """Words, windows, threshold, mode and blends: every widget after the prompts."""
    return [
        io.String.Input(
            "blend_words", default="",
            tooltip=(
                "Comma-separated words of the SOURCE prompt whose region may change (e.g. "
                "'jeep'); their attention makes the blend mask. Empty: self-attention is "
                "replaced everywhere (style edits)."
            ),
        ),
        io.String.Input(
            "target_blend_words", default="", optional=True,
            tooltip=(
                "Optional comma-separated words of the TARGET prompt added to the local "
                "latent blend mask (e.g. 'Porsche car')."
            ),
        ),
        io.Float.Input(
            "cross_replace_steps", default=0.8, min=0.0, max=1.0, step=0.01,
            tooltip=(
                "Fraction of the steps (from the start) during which the source prompt's "
                "cross-attention replaces the target's for unchanged words."
            ),
        ),
        io.String.Input(
            "cross_replace_words", default="", optional=True,
            tooltip=(
                "Optional per-word windows for target words, overriding cross_replace_steps: "
                "'watercolor: 0.5, jeep: 0.2-0.9' (fractions of the steps; a single number "
                "means from 0)."
            ),
        ),
        io.Float.Input(
            "self_replace_steps", default=0.6, min=0.0, max=1.0, step=0.01,
            tooltip=(
                "Fraction of the steps (from the start) during which the source's "
                "self-attention is blended in, keeping structure and motion."
            ),
        ),
        io.Float.Input(
            "blend_threshold", default=0.3, min=0.0, max=10.0, step=0.01,
            tooltip=(
                "Mask threshold on the normalised blend-word attention: lower grows the "
                "edited region. 1 or more means full replacement (no region changes)."
            ),
        ),
        io.String.Input(
            "reweight", default="", optional=True,
            tooltip=(
                "Optional attention scale for target words: 'watercolor: 10, silver: 2' "
                "(1 = unchanged). Independent of prompt weights like '(watercolor:1.2)'."
            ),
        ),
        io.Combo.Input(
            "mode", options=MODE_OPTIONS, default="auto",
            tooltip=(
                "replace: swap words one for one (both prompts need the same number of "
                "words). refine: add or remove words. auto: replace when the word counts "
                "match, refine otherwise."
            ),
        ),
        io.Boolean.Input(
            "local_latent_blend", default=False,
            tooltip=(
                "Also blend the latents: outside the blend-word mask the source video is "
                "kept exactly. Needs blend_words."
            ),
        ),
        io.Boolean.Input(
            "soft_mask", default=False,
            tooltip=(
                "Soft mask: rises from 0 at blend_threshold to 1 at the strongest "
                "attention instead of a hard cut (threshold 0: the attention itself; "
                "1 or more: still full replacement)."
            ),
        ),
    ]


__all__ = ["MODE_OPTIONS", "edit_widget_inputs", "source_prompt_inputs", "target_prompt_input"]
