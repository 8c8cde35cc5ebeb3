"""Prompts as FateZero reads them: encoded with the CLIP exactly as core CLIP Text Encode does, and
tokenized with the same CLIP tokenizer, so the words an edit names are the tokens that were encoded.

Shared by FateZero Source Prompt, FateZero Edit Settings and the deprecated FateZero Attention
Blend Settings. Prompts use ComfyUI's syntax: ``(word:1.3)``, ``(word)``, ``\\(``,
``embedding:name``. Words are aligned on the bare words (``fatezero_core.prompt_syntax``), and
before encoding :func:`encode` checks that ComfyUI's own tokenization puts the same tokens
(embedding vectors included) at the same positions. A weight means what it means in CLIP Text
Encode, a scale of the word's embedding; the attention reweight of a word is only ``reweight``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from ..fatezero_core.edit_spec import EditSpec, SourcePrompt
from ..fatezero_core.edit_text import cross_replace_setting, parse_reweight, parse_words, prompt_file_name
from ..fatezero_core.prompt_align import BOS, EOS, PromptTokens, is_embedding_id, tokenize_prompt
from ..fatezero_core.prompt_syntax import EMBEDDING_PREFIX
from .patching import conditioning_fingerprint
from .user_errors import FateZeroNodeError


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


def require_text(which: str, text: str) -> None:
    if not text.strip():
        raise FateZeroNodeError(f"{which} is empty: describe the video in a few words.")


def encode_prompt(clip, text: str, which: str):
    """``text`` encoded as CLIP Text Encode does, after the token-position check of :func:`encode`."""
    require_text(f"{which}_prompt", text)
    layout = tokenize_prompt(text, clip_tokenizer(clip), embedding_lookup(clip))
    return encode(clip, text, which, layout)


def encode_source(clip, text: str):
    """``(conditioning, SourcePrompt)`` of the source prompt."""
    conditioning = encode_prompt(clip, text, "source")
    return conditioning, SourcePrompt(text=text, fingerprint=conditioning_fingerprint(conditioning))


def edit_spec(clip, source: SourcePrompt, target_prompt: str, *, blend_words, cross_replace_steps,
              self_replace_steps, blend_threshold, mode, local_latent_blend, soft_mask,
              target_blend_words="", cross_replace_words="", reweight=""):
    """``(target conditioning, EditSpec)`` of one edit of ``source``, the widgets as typed.

    Both prompts are laid out with this CLIP's tokenizer here, once: the spec carries the token
    layouts, not the CLIP. The words are checked against both prompts first (the core's messages
    name the fields), so a wrong word fails here rather than in FateZero Sample."""
    require_text("target_prompt", target_prompt)
    spec = EditSpec.from_prompts(
        source.text, target_prompt, clip_tokenizer(clip), embedding_lookup(clip),
        mode=mode,
        cross_replace_steps=cross_replace_setting(cross_replace_steps, cross_replace_words),
        self_replace_steps=float(self_replace_steps),
        blend_words=parse_words(blend_words, "blend_words"),
        target_blend_words=parse_words(target_blend_words, "target_blend_words"),
        blend_threshold=float(blend_threshold),
        soft_mask=bool(soft_mask),
        reweight=parse_reweight(reweight),
        latent_blend=bool(local_latent_blend),
        source_fingerprint=source.fingerprint,
    )
    spec.check()
    target = encode(clip, target_prompt, "target", spec.target_tokens)
    return target, dataclasses.replace(spec, target_fingerprint=conditioning_fingerprint(target))


OUTPUT_FOLDER = "fatezero"


def output_prefix(target_prompt: str) -> str:
    """Save Video's ``filename_prefix`` for an edit: ``fatezero/<target prompt as a file name>``."""
    return f"{OUTPUT_FOLDER}/{prompt_file_name(target_prompt)}"


__all__ = ["clip_tokenizer", "output_prefix", "edit_spec", "embedding_lookup", "encode", "encode_prompt", "encode_source"]
