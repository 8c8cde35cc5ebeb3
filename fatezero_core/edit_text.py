"""The small text fields of an edit: word lists, per-word windows and reweights.

FateZero Edit Settings takes these as comma-, semicolon- or newline-separated text;
they become the ``blend_words``, ``cross_replace_steps`` and ``reweight`` of
:class:`fatezero_core.edit_spec.EditSpec`, the official configs' ``blend_words``,
``cross_replace_steps`` dict and ``eq_params`` (read by ``make_controller`` in the official
``video_diffusion/prompt_attention/attention_util.py``). Errors name the node's
fields, since that is where the user types them.
"""

from __future__ import annotations

import math
import re

from .errors import PromptError
from .prompt_syntax import EMBEDDING_PREFIX

_SEPARATORS = re.compile(r"[,;\n]")
_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_RANGE = re.compile(rf"^\s*({_NUMBER})\s*(?:-|\.\.|to)\s*({_NUMBER})\s*$")


def _entries(text: str | None) -> list[str]:
    """Comma-, semicolon- or newline-separated entries, stripped, empty ones dropped."""
    if text is None:
        return []
    if not isinstance(text, str):
        raise PromptError(f"Expected text, got {type(text).__name__}.")
    return [part.strip() for part in _SEPARATORS.split(text) if part.strip()]


def parse_words(text: str | None, field: str) -> tuple[str, ...]:
    """``"jeep, Wonder Woman"`` -> ``("jeep", "Wonder Woman")``; duplicates are dropped."""
    words = []
    for entry in _entries(text):
        bare = entry[len(EMBEDDING_PREFIX):] if entry.lower().startswith(EMBEDDING_PREFIX) else entry
        if ":" in bare:
            raise PromptError(
                f"{field}: '{entry}' contains ':'. List plain words separated by commas, "
                "for example 'jeep, car'."
            )
        if entry.lower() not in (w.lower() for w in words):
            words.append(entry)
    return tuple(words)


def _split_entry(entry: str, field: str, example: str) -> tuple[str, str]:
    word, sep, value = entry.rpartition(":")
    word, value = word.strip(), value.strip()
    if not sep or not word or not value:
        raise PromptError(
            f"{field}: could not read '{entry}'. Write 'word: value' entries separated by "
            f"commas, for example '{example}'."
        )
    return word, value


def _float(value: str, field: str, word: str, example: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise PromptError(
            f"{field}: the value '{value}' for '{word}' is not a number. Use entries like "
            f"'{example}'."
        )
    return number


def _add_unique(mapping: dict, word: str, value, field: str) -> None:
    key = word.lower()
    if any(k.lower() == key for k in mapping):
        raise PromptError(f"{field}: '{word}' is listed twice; keep one entry per word.")
    mapping[word] = value


def parse_reweight(text: str | None) -> dict[str, float] | None:
    """``"watercolor: 10, silver: 2"`` -> ``{"watercolor": 10.0, "silver": 2.0}`` (None if empty)."""
    field, example = "reweight", "watercolor: 10, silver: 2"
    weights: dict[str, float] = {}
    for entry in _entries(text):
        word, value = _split_entry(entry, field, example)
        _add_unique(weights, word, _float(value, field, word, example), field)
    return weights or None


def _fraction(value: float, field: str, word: str) -> float:
    if not 0.0 <= value <= 1.0:
        raise PromptError(
            f"{field}: {value:g} for '{word}' is outside 0..1. Windows are fractions of the "
            "sampling steps, for example 0.5 (the first half) or 0.2-0.9."
        )
    return value


def parse_cross_replace_words(text: str | None) -> dict[str, object]:
    """``"watercolor: 0.5, jeep: 0.2-0.9"`` -> ``{"watercolor": 0.5, "jeep": (0.2, 0.9)}``.

    A single number ``c`` means the window ``0..c``; ``a-b`` (also ``a..b``, ``a to b``) means
    ``a..b``. Both are fractions of the sampling steps.
    """
    field, example = "cross_replace_words", "watercolor: 0.5, jeep: 0.2-0.9"
    windows: dict[str, object] = {}
    for entry in _entries(text):
        word, value = _split_entry(entry, field, example)
        match = _RANGE.match(value)
        if match:
            start = _fraction(_float(match.group(1), field, word, example), field, word)
            end = _fraction(_float(match.group(2), field, word, example), field, word)
            if start > end:
                raise PromptError(
                    f"{field}: the window {value} for '{word}' ends before it starts; write the "
                    f"smaller number first, for example {end:g}-{start:g}."
                )
            window: object = (start, end)
        else:
            window = _fraction(_float(value, field, word, example), field, word)
        _add_unique(windows, word, window, field)
    return windows


def cross_replace_setting(steps: float, words_text: str | None) -> float | dict[str, object]:
    """``cross_replace_steps`` of the spec: the fraction ``steps`` alone, or with per-word windows
    the official dict ``{"default_": steps, word: window, ...}``."""
    per_word = parse_cross_replace_words(words_text)
    return {"default_": float(steps), **per_word} if per_word else float(steps)




_NAME_CHARACTERS = re.compile(r"[^0-9a-z]+")
MAX_NAME_LENGTH = 60


def prompt_file_name(prompt: str, max_length: int = MAX_NAME_LENGTH) -> str:
    """A file-name stem for an edit, from its target prompt: lower-case words joined by ``_``,
    prompt syntax and punctuation dropped, cut at a word boundary (``"watercolor painting of a
    (jeep:1.2)"`` -> ``"watercolor_painting_of_a_jeep_1_2"``). Never empty."""
    words = [w for w in _NAME_CHARACTERS.split(prompt.lower()) if w]
    name = ""
    for word in words:
        candidate = f"{name}_{word}" if name else word
        if len(candidate) > max_length:
            break
        name = candidate
    return name or (words[0][:max_length] if words else "edit")


__all__ = ["cross_replace_setting", "parse_cross_replace_words", "parse_reweight", "parse_words",
           "prompt_file_name"]
