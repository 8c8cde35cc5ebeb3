"""The word rules of the edit fields, from the case table the frontend tests read too.

``tests/data/word_rules.json`` is the one list of cases: how a prompt in ComfyUI's syntax splits
into words, and which words of each edit field the node refuses. Here each case runs through the
functions the nodes use (``prompt_align.tokenize_prompt`` reading the prompt with
``prompt_syntax``, ``edit_text``'s field parsers, the word lookup, the equalizer and the
cross-attention schedule); ``tests/js/word_rules.test.mjs`` runs the same cases through
``web/fatezero_logic.js``.

The tokenizer is a CLIP-like stand-in (lowercase; letter runs, single digits and punctuation runs
as separate tokens, as CLIP's BPE pre-split does); the rules under test depend only on where its
tokens fall, not on their ids.
"""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path

import pytest

from fatezero_core.edit_text import parse_cross_replace_words, parse_reweight, parse_words
from fatezero_core.errors import PromptError
from fatezero_core.prompt_align import (
    cross_replace_alphas,
    equalizer,
    require_word_token_indices,
    tokenize_prompt,
)

TABLE = json.loads((Path(__file__).parent / "data" / "word_rules.json").read_text(encoding="utf-8"))
CLIP_PIECES = re.compile(r"[^\W\d_]+|\d|[^\w\s]+|_+")


def clip_like_tokenize(text: str) -> list[int]:
    return [1000 + zlib.crc32(piece.encode()) % 40000 for piece in CLIP_PIECES.findall(text.lower())]


def read(case: dict):
    embeddings = case.get("embeddings", {})
    return tokenize_prompt(case["prompt"], clip_like_tokenize, embeddings.get)


def refused(case: dict) -> list[str]:
    """What the node refuses of ``case['words']``, checked entry by entry against the prompt."""
    field, text, tokens = case["field"], case["words"], read(case)
    try:
        if field in ("blend_words", "target_blend_words"):
            entries = parse_words(text, field)
        elif field == "reweight":
            entries = parse_reweight(text)
        else:
            entries = parse_cross_replace_words(text)
    except PromptError as error:  # refused as a whole (a ':' in a word list)
        assert f"'{text.strip()}'" in str(error), str(error)
        return [text.strip()]
    rejected = []
    for word in entries:
        try:
            if field in ("blend_words", "target_blend_words"):
                require_word_token_indices(tokens, word, what=field)
            elif field == "reweight":
                equalizer(tokens, {word: entries[word]})
            else:
                cross_replace_alphas(tokens, 10, {"default_": 0.8, word: entries[word]})
        except PromptError as error:
            assert f"'{word}' is not in the prompt" in str(error), str(error)
            rejected.append(word)
    return rejected


@pytest.mark.parametrize("case", TABLE["prompt_words"], ids=lambda c: repr(c["prompt"]))
def test_prompt_words(case):
    assert list(read(case).word_keys) == case["words"]


@pytest.mark.parametrize("case", TABLE["word_checks"], ids=lambda c: f"{c['field']}:{c['words']!r}")
def test_word_checks(case):
    assert refused(case) == case["rejected"]

