"""FateZero Attention Blend Settings: both prompts, encoded once, plus the edit options.

The node encodes the source and target prompts exactly as core CLIPTextEncode does and emits the
``fatezero_core.edit_spec.EditSpec`` that FateZero Sample uses to fuse attention. The spec maps
words to token positions with the same CLIP tokenizer that encoded the prompts, so the words the
settings name are the tokens that were encoded (design decision 7).

Prompts use ComfyUI's syntax: ``(word:1.3)``, ``(word)``, ``\\(``, ``embedding:name``. Words are
aligned on the bare words (``fatezero_core.prompt_syntax``), and before encoding the node checks
that ComfyUI's own tokenization puts the same tokens (embedding vectors included) at the same
positions. A weight means what it means in CLIP Text Encode, a scale of the word's embedding; the
attention reweight of a word is only the ``reweight`` field.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from comfy_api.latest import io

from ..fatezero_core.edit_spec import EditSpec
from ..fatezero_core.edit_text import cross_replace_setting, parse_reweight, parse_words
from ..fatezero_core.prompt_align import BOS, EOS, MODES, PromptTokens, is_embedding_id, tokenize_prompt
from ..fatezero_core.prompt_syntax import EMBEDDING_PREFIX
from .patching import conditioning_fingerprint
from .sockets import BlendSettings
from .user_errors import FateZeroNodeError, reports_user_errors

MODE_OPTIONS = ["auto"] + [m for m in MODES if m != "auto"]


# --------------------------------------------------------------------------------------------
# CLIP
# --------------------------------------------------------------------------------------------


def clip_tokenizer(clip) -> Callable[[str], list[int]]:
    """``text -> content token ids`` (no BOS/EOS) from the CLIP model's own SD1 tokenizer."""
    if clip is None:
        raise FateZeroNodeError(
            "No CLIP is connected: connect the CLIP output of Load Checkpoint (or of a LoRA loader)."
        )
    hf_tokenizer = getattr(getattr(getattr(clip, "tokenizer", None), "clip_l", None), "tokenizer", None)
    if hf_tokenizer is None or not callable(hf_tokenizer):
        raise FateZeroNodeError(
            "This CLIP has no SD1 (CLIP-L) tokenizer. FateZero supports Stable Diffusion 1.x "
            "checkpoints only: load an SD1.x checkpoint and connect its CLIP."
        )

    def tokenize(text: str) -> list[int]:
        return list(hf_tokenizer(text)["input_ids"][1:-1])

    return tokenize


def embedding_lookup(clip) -> Callable[[str], int | None] | None:
    """``name -> number of vectors`` of a textual-inversion embedding, as this CLIP loads it.

    None when the CLIP has no embeddings folder: ComfyUI then reads ``embedding:name`` as text.
    Asks ComfyUI's own tokenizer (``clip.tokenize('embedding:name')``); a name it does not find,
    or finds only after dropping characters, counts as missing.
    """
    if getattr(clip.tokenizer.clip_l, "embedding_directory", None) is None:
        return None
    known: dict[str, int | None] = {}

    def length(name: str) -> int | None:
        if name not in known:
            chunks = clip.tokenize(EMBEDDING_PREFIX + name).get("l", [])
            tokens = [t[0] for chunk in chunks for t in chunk]
            vectors = sum(1 for t in tokens if not isinstance(t, int))
            text = [t for t in tokens if isinstance(t, int) and t not in (BOS, EOS)]
            known[name] = vectors if vectors and not text else None
        return known[name]

    return length


def _same_token(ours: int, theirs) -> bool:
    if is_embedding_id(ours):
        return not isinstance(theirs, int)  # an embedding vector is a tensor in ComfyUI's tokens
    return isinstance(theirs, int) and theirs == ours


def encode(clip, text: str, which: str, layout: PromptTokens):
    """CONDITIONING for ``text``, encoded as core CLIPTextEncode does.

    Checks first that ComfyUI's tokenization puts the tokens of ``layout`` (the words the
    alignment uses) at the same positions, so no word is matched to another word's tokens.
    """
    tokens = clip.tokenize(text)
    if set(tokens) != {"l"}:
        raise FateZeroNodeError(
            f"This CLIP produces {sorted(tokens)} token streams; FateZero supports Stable Diffusion "
            "1.x checkpoints only (a single CLIP-L text encoder). Load an SD1.x checkpoint."
        )
    chunks = tokens["l"]
    theirs = [t[0] for t in chunks[0]] if len(chunks) == 1 else []
    if len(theirs) != len(layout.ids) or not all(map(_same_token, layout.ids, theirs)):
        first = next((i for i, (a, b) in enumerate(zip(layout.ids, theirs)) if not _same_token(a, b)),
                     min(len(theirs), len(layout.ids)))
        word = next((w for w, span in zip(layout.words, layout.word_spans) if first in span), None)
        where = f" at the word '{word}'" if word else ""
        raise FateZeroNodeError(
            f"ComfyUI encodes the {which} prompt '{text}' with other tokens than FateZero reads from "
            f"its words (they differ{where}, token {first}), so words cannot be matched to tokens. "
            "FateZero reads '(word:1.2)', '(word)', '\\(' and 'embedding:name'; rewrite the "
            "syntax there, for example with spaces around parentheses."
        )
    return clip.encode_from_tokens_scheduled(tokens)


# --------------------------------------------------------------------------------------------
# Node
# --------------------------------------------------------------------------------------------


class FateZeroAttentionBlendSettings(io.ComfyNode):
    """Source/target prompts and FateZero's attention-fusion settings."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FateZero_AttentionBlendSettings",
            display_name="FateZero Attention Blend Settings",
            category="FateZero/attention",
            description=(
                "Type the source prompt (what the video shows) and the target prompt (what it "
                "should become) once: this node encodes both with the CLIP (like CLIP Text Encode) "
                "and bundles the word-level edit settings for FateZero Sample. Words keep their "
                "place in the video where the prompts agree; blend words mark the region that may "
                "change. SD1.x only."
            ),
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP of the SD1.x checkpoint used for inversion and editing."),
                io.String.Input(
                    "source_prompt", multiline=True, dynamic_prompts=False,
                    tooltip=(
                        "Describes the input video, e.g. 'a silver jeep driving down a curvy road'. "
                        "Use the same prompt as for FateZero DDIM Invert (connect the source output). "
                        "ComfyUI prompt syntax works as in CLIP Text Encode."
                    ),
                ),
                io.String.Input(
                    "target_prompt", multiline=True, dynamic_prompts=False,
                    tooltip=(
                        "The edited video, e.g. 'a Porsche car driving down a curvy road'. At most 75 "
                        "tokens. '(word:1.2)' and 'embedding:name' work as in CLIP Text Encode: a "
                        "weight scales the word's embedding, not its attention (that is reweight)."
                    ),
                ),
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
            ],
            outputs=[
                io.Conditioning.Output(display_name="source", tooltip="The encoded source prompt."),
                io.Conditioning.Output(display_name="target", tooltip="The encoded target prompt."),
                BlendSettings.Output(
                    display_name="blend_settings",
                    tooltip="Prompts, tokenizer and fusion settings for FateZero Sample.",
                ),
            ],
        )

    @classmethod
    @reports_user_errors
    def execute(cls, clip, source_prompt, target_prompt, blend_words, cross_replace_steps,
                self_replace_steps, blend_threshold, mode, local_latent_blend, soft_mask,
                target_blend_words="", cross_replace_words="", reweight="") -> io.NodeOutput:
        tokenize = clip_tokenizer(clip)
        embedding_length = embedding_lookup(clip)
        for which, text in (("source_prompt", source_prompt), ("target_prompt", target_prompt)):
            if not text.strip():
                raise FateZeroNodeError(f"{which} is empty: describe the video in a few words.")

        spec = EditSpec(
            source_prompt=source_prompt,
            target_prompt=target_prompt,
            tokenize=tokenize,
            mode=mode,
            cross_replace_steps=cross_replace_setting(cross_replace_steps, cross_replace_words),
            self_replace_steps=float(self_replace_steps),
            blend_words=parse_words(blend_words, "blend_words"),
            target_blend_words=parse_words(target_blend_words, "target_blend_words"),
            blend_threshold=float(blend_threshold),
            soft_mask=bool(soft_mask),
            reweight=parse_reweight(reweight),
            latent_blend=bool(local_latent_blend),
            embedding_length=embedding_length,
        )
        spec.check()
        source_layout = tokenize_prompt(source_prompt, tokenize, embedding_length)
        target_layout = tokenize_prompt(target_prompt, tokenize, embedding_length)

        source = encode(clip, source_prompt, "source", source_layout)
        target = encode(clip, target_prompt, "target", target_layout)
        spec = dataclasses.replace(spec, source_fingerprint=conditioning_fingerprint(source))
        return io.NodeOutput(source, target, spec)
