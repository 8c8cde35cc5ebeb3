"""The words of a prompt written in ComfyUI's prompt syntax, as CLIP Text Encode encodes them.

ComfyUI (``comfy/sd1_clip.py``, ``SDTokenizer.tokenize_with_weights``, 0.3.64) reads a prompt as:

- ``(text)`` multiplies the weight of ``text`` by 1.1 (nestable); ``(text:1.3)`` sets it to 1.3
  (the number after the last ``:`` of the group, when it parses as a float);
- ``\\(`` and ``\\)`` are literal parentheses; an unmatched parenthesis is plain text;
- ``[text]``, ``{a|b}``, ``<lora:...>`` are plain text (ComfyUI gives them no meaning: the
  brackets are encoded as tokens);
- ``embedding:name`` (at the start of a weighted group, or after a space or a newline) is replaced
  by the vectors of the textual-inversion file ``name`` in ``models/embeddings``; a trailing comma
  of the name is tried without it;
- every weighted group and every embedding is tokenized on its own ("piece"), so a group boundary
  is also a token boundary.

A weight only scales the embedding of its tokens; it adds, removes and moves no token. So the words
FateZero aligns are the *bare* words, the prompt with the weight syntax removed, and each bare word
is encoded as exactly the tokens ComfyUI gives it. This module finds those words; the token ids
come from the CLIP tokenizer (:func:`fatezero_core.prompt_align.tokenize_prompt`), and the node
checks the result against ComfyUI's own tokenization before encoding.

Word boundaries are whitespace, as for a plain prompt: ``(jeep:1.2),`` is the one word ``jeep,``
(tokens ``jeep`` and ``,``). An embedding always starts a word of its own, named
``embedding:name``; text right after it (``embedding:name,``) belongs to that word.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from .errors import PromptError

EMBEDDING_PREFIX = "embedding:"
WEIGHT_UP = 1.1  # ComfyUI's factor for ``(text)``; documented here, weights are not used for alignment

EmbeddingLength = Callable[[str], Optional[int]]

# Stand-ins for escaped parentheses while groups are read (private-use characters, never part of a
# float, so ``(a:1\\))`` keeps no weight, as in ComfyUI).
_ESCAPED = {"\\(": "\ue000", "\\)": "\ue001"}


@dataclass(frozen=True)
class Atom:
    """A run of a word that is tokenized in one piece.

    ``text``: bare text without whitespace, or the embedding's name. ``piece``: index of the text
    piece ComfyUI tokenizes it with (-1 for an embedding). ``size``: number of vectors of an
    embedding (0 for text).
    """

    text: str
    piece: int = -1
    size: int = 0

    @property
    def is_embedding(self) -> bool:
        return self.size > 0

    @property
    def display(self) -> str:
        return EMBEDDING_PREFIX + self.text if self.is_embedding else self.text


@dataclass(frozen=True)
class PromptReading:
    """``words``: each word as its atoms. ``pieces``: the text pieces ComfyUI tokenizes whole."""

    words: tuple[tuple[Atom, ...], ...]
    pieces: tuple[str, ...]


def _split_groups(text: str) -> list[str]:
    """Top-level parts: plain runs and ``( ... )`` groups.

    ComfyUI's reading: a ``(`` at depth 0 opens a group, the ``)`` that brings the depth back to 0
    closes it; a stray ``)`` makes the depth negative, and everything up to the next ``(`` that
    returns it to 0 stays plain text.
    """
    parts: list[str] = []
    start = depth = 0
    for i, ch in enumerate(text):
        if ch == "(":
            if depth == 0 and i > start:
                parts.append(text[start:i])
                start = i
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                parts.append(text[start:i + 1])
                start = i + 1
    if start < len(text):
        parts.append(text[start:])
    return parts


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _segments(text: str) -> list[str]:
    """The prompt's text runs with the weight syntax removed, each tokenized on its own."""
    out: list[str] = []
    for part in _split_groups(text):
        if len(part) >= 2 and part[0] == "(" and part[-1] == ")":
            inner = part[1:-1]
            colon = inner.rfind(":")
            if colon > 0 and _is_float(inner[colon + 1:]):
                inner = inner[:colon]
            out.extend(_segments(inner))
        else:
            out.append(part)
    return out


def _unescape(text: str) -> str:
    for literal, stand_in in _ESCAPED.items():
        text = text.replace(stand_in, literal[1])
    return text


def _split_embeddings(segment: str) -> list[str]:
    """``"a jeep embedding:x, road"`` -> ``["a jeep", "embedding:x, road"]`` (ComfyUI's split on a
    space or newline before ``embedding:``; the separator itself is dropped)."""
    runs, start, i = [], 0, 0
    while True:
        found = [p for p in (segment.find(" " + EMBEDDING_PREFIX, i), segment.find("\n" + EMBEDDING_PREFIX, i)) if p >= 0]
        if not found:
            break
        cut = min(found)
        runs.append(segment[start:cut])
        start = i = cut + 1
    runs.append(segment[start:])
    return [r for r in runs if r]


class _WordBuilder:
    """Collects atoms into whitespace-separated words."""

    def __init__(self) -> None:
        self.words: list[list[Atom]] = []
        self.pieces: list[str] = []
        self.joins = False  # the next text continues the last word (no whitespace in between)

    def text(self, text: str) -> None:
        piece = len(self.pieces)
        self.pieces.append(text)
        fragments = text.split()
        if fragments and self.joins and not text[0].isspace():
            self.words[-1].append(Atom(fragments.pop(0), piece))
        self.words.extend([Atom(f, piece)] for f in fragments)
        self.joins = bool(self.words) and bool(text) and not text[-1].isspace()

    def embedding(self, name: str, size: int) -> None:
        self.words.append([Atom(name, size=size)])
        self.joins = True


def _embedding(run: str, embedding_length: EmbeddingLength) -> tuple[str, int, str]:
    """``(name, vectors, leftover text)`` for a run that starts with ``embedding:``.

    Raises:
        PromptError: no name, or no embedding file of that name.
    """
    body = run[len(EMBEDDING_PREFIX):]
    parts = body.split()
    if not parts:
        raise PromptError(
            f"'{EMBEDDING_PREFIX}' is not followed by a name; write {EMBEDDING_PREFIX}name with the "
            "file name of a textual-inversion embedding in ComfyUI's models/embeddings folder"
        )
    name = parts[0]
    leftover = body.lstrip()[len(name):]  # with its whitespace, which decides the word boundaries
    size = embedding_length(name)
    if size is None:
        bare = name.strip(",")
        if len(bare) < len(name):  # ComfyUI retries 'name,' as 'name' and keeps the commas as text
            leftover = name[len(bare):] + leftover
            name, size = bare, embedding_length(bare)
    if not size:
        raise PromptError(
            f"the embedding '{EMBEDDING_PREFIX}{name}' was not found: put '{name}.safetensors' (or "
            ".pt / .bin) in ComfyUI's models/embeddings folder, or remove it from the prompt "
            "(CLIP Text Encode would silently drop it)"
        )
    return name, int(size), leftover


def read_prompt(prompt: str, embedding_length: Optional[EmbeddingLength] = None) -> PromptReading:
    """The bare words of ``prompt`` in ComfyUI's prompt syntax (see the module docstring).

    ``embedding_length(name)`` returns the number of vectors of the embedding ``name`` (None when
    there is no such file). Without it, ``embedding:name`` is plain text, as in a ComfyUI CLIP
    that has no embeddings folder.

    Raises:
        PromptError: an ``embedding:`` without a name, or one that does not exist.
    """
    escaped = prompt
    for literal, stand_in in _ESCAPED.items():
        escaped = escaped.replace(literal, stand_in)
    words = _WordBuilder()
    for segment in _segments(escaped):
        for run in _split_embeddings(_unescape(segment)):
            if embedding_length is not None and run.startswith(EMBEDDING_PREFIX):
                name, size, run = _embedding(run, embedding_length)
                words.embedding(name, size)
                if not run:
                    continue
            words.text(run)
    return PromptReading(tuple(tuple(w) for w in words.words), tuple(words.pieces))


__all__ = ["EMBEDDING_PREFIX", "Atom", "PromptReading", "read_prompt"]
