"""Prompt-to-prompt token alignment between the source and the target prompt.

Everything the cross-attention fusion needs to know about the two prompts, as plain tensors
(file names below are in the official repository, github.com/ChenyangQiQi/FateZero at 9b6cb7b,
under ``video_diffusion/prompt_attention/``, which keeps prompt-to-prompt's code):

- token layout of a prompt and word -> token lookup (``ptp_utils.py``: ``get_word_inds``; the
  layout is ComfyUI's, ``comfy/sd1_clip.py``: ``SDTokenizer.tokenize_with_weights`` at 0.3.64);
- the replace mapper ``M[77, 77]`` (``seq_aligner.py``: ``get_replacement_mapper_``);
- the refine mapper and alphas (``seq_aligner.py``: ``get_mapper``);
- the reweight equalizer (``attention_util.py``: ``get_equalizer``);
- the per-step, per-token cross-attention schedule (``ptp_utils.py``:
  ``get_time_words_attention_alpha``) and the self-attention window (``attention_util.py``:
  ``AttentionControlEdit.__init__``, ``num_self_replace``);
- replace vs refine selection (``video_diffusion/pipelines/p2p_ddim_spatial_temporal.py``:
  ``P2pDDIMSpatioTemporalPipeline.p2preplace_edit``, which calls ``make_controller``).

Token positions follow CLIP's 77-token layout: index 0 is BOS, content starts at 1, then EOS, then
EOS padding up to 77. The tokenizer is a callable ``tokenize(text) -> list[int]`` returning the CLIP
BPE ids of ``text`` without BOS/EOS. CLIP BPE works per whitespace word, so the prompt's token ids
are the concatenation of its words' token ids. Prompts are read in ComfyUI's prompt syntax
(:mod:`fatezero_core.prompt_syntax`): words are the bare words, ``(word:1.3)`` is the word ``word``,
and an ``embedding:name`` word takes as many positions as the embedding has vectors.

Where this module deliberately differs from the official code:

- word lookup ignores case and the punctuation attached to a word ("countryside" finds
  "countryside,"), accepts multi-word entries ("Wonder Woman") and returns every occurrence;
- the replace mapper keeps source and target aligned after the last changed word (the official code
  misaligns when a changed word has a different token count; see :func:`replacement_mapper`);
- words given for reweighting, per-word schedules or blending that are not in the prompt raise
  :class:`PromptError` instead of being ignored;
- ``self_replace_steps=1`` (an int) is accepted as 1.0;
- refine gaps point at source index 0 rather than -1, so the mapper is a valid ``index_select``
  index (the gap's value is multiplied by an alpha of 0 either way).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence, Union

import torch

from .errors import PromptError
from .prompt_syntax import EmbeddingLength, read_prompt

BOS = 49406
EOS = 49407
MAX_TOKENS = 77
MAX_CONTENT_TOKENS = MAX_TOKENS - 2

MODES = ("replace", "refine", "auto")

Tokenize = Callable[[str], Sequence[int]]
Word = Union[str, int]
Window = Union[float, int, Sequence[float]]
StepsSpec = Union[float, int, Sequence[float], Mapping[str, Union[float, int, Sequence[float]]]]


# --------------------------------------------------------------------------------------------
# Tokens of one prompt
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptTokens:
    """One prompt laid out as CLIP's 77 token positions (ComfyUI ``comfy/sd1_clip.py``:
    ``SDTokenizer.tokenize_with_weights``).

    Attributes:
        prompt: the prompt text as given.
        words: the whitespace words of the prompt, bare: ComfyUI's weight syntax removed
            (``(jeep:1.2),`` -> ``jeep,``), an embedding written ``embedding:name``.
        ids: 77 token ids: BOS, the content ids, EOS, then EOS padding. An embedding's vectors
            have stand-in ids (:func:`embedding_token_ids`).
        word_spans: for each whitespace word, the token positions it occupies (a ``range``; content
            starts at position 1). Punctuation attached to the word is part of its span, as in the
            official ``get_word_inds``.
        core_spans: for each whitespace word, the positions of the word itself without the
            punctuation attached to it ("countryside," -> only the "countryside" token).
        word_keys: for each whitespace word, the lowercased word without surrounding punctuation;
            what word lookup compares against.
    """

    prompt: str
    words: tuple[str, ...]
    ids: tuple[int, ...]
    word_spans: tuple[range, ...]
    core_spans: tuple[range, ...]
    word_keys: tuple[str, ...]

    @property
    def num_content_tokens(self) -> int:
        """Number of tokens between BOS and EOS."""
        return sum(len(span) for span in self.word_spans)

    @property
    def eos_index(self) -> int:
        """Position of the EOS token that ends the prompt."""
        return self.num_content_tokens + 1

    @property
    def sequence(self) -> tuple[int, ...]:
        """BOS, content and EOS without padding (what HF ``tokenizer.encode`` returns)."""
        return self.ids[: self.eos_index + 1]


def _word_key(text: str) -> str:
    """Lowercase ``text`` and strip the punctuation around it; all-punctuation text is kept whole."""
    lowered = text.lower()
    start, end = 0, len(lowered)
    while start < end and not lowered[start].isalnum():
        start += 1
    while end > start and not lowered[end - 1].isalnum():
        end -= 1
    return lowered[start:end] or lowered


def _strip_word(word: str) -> str:
    """``word`` without the punctuation around it (case kept); all-punctuation words kept whole."""
    start, end = 0, len(word)
    while start < end and not word[start].isalnum():
        start += 1
    while end > start and not word[end - 1].isalnum():
        end -= 1
    return word[start:end] or word


def _call_tokenizer(tokenize: Tokenize, text: str) -> list[int]:
    """Token ids of ``text``, checked to be plain ints without BOS/EOS."""
    ids = [int(t) for t in tokenize(text)]
    if BOS in ids or EOS in ids:
        raise PromptError(
            f"the tokenizer returned BOS/EOS ids for '{text}'; pass a tokenizer that returns only the "
            "content tokens (in ComfyUI: clip.tokenizer.clip_l.tokenizer(text)['input_ids'][1:-1])"
        )
    return ids


def _find_subsequence(haystack: Sequence[int], needle: Sequence[int]) -> int:
    """First offset of ``needle`` inside ``haystack``, or -1."""
    n = len(needle)
    if n == 0:
        return -1
    for offset in range(len(haystack) - n + 1):
        if list(haystack[offset : offset + n]) == list(needle):
            return offset
    return -1


def _core_span(word: str, word_ids: Sequence[int], span: range, tokenize: Tokenize) -> range:
    """Positions of ``word`` without its attached punctuation (fallback: the whole span).

    The stripped word is tokenized and its ids are looked for inside the word's ids; CLIP BPE
    splits punctuation into its own tokens, so "countryside," -> [countryside, ","] contains
    [countryside].
    """
    stripped = _strip_word(word)
    if stripped == word:
        return span
    core_ids = _call_tokenizer(tokenize, stripped)
    offset = _find_subsequence(word_ids, core_ids)
    if offset < 0:
        return span
    return range(span.start + offset, span.start + offset + len(core_ids))


def embedding_token_ids(name: str, size: int) -> tuple[int, ...]:
    """Stand-in ids for the ``size`` vectors of the embedding ``name``.

    Negative, so never a CLIP token id; the same name gives the same ids in both prompts (so refine
    alignment matches an embedding kept from source to target) and different names differ.
    """
    key = zlib.crc32(name.encode("utf-8")) << 12
    return tuple(-(key + k + 1) for k in range(size))


def is_embedding_id(token_id: int) -> bool:
    """True for a stand-in id of an embedding vector (:func:`embedding_token_ids`)."""
    return token_id < 0


def tokenize_prompt(
    prompt: str, tokenize: Tokenize, embedding_length: Optional[EmbeddingLength] = None
) -> PromptTokens:
    """Lay ``prompt`` out on CLIP's 77 token positions (ComfyUI ``comfy/sd1_clip.py``:
    ``SDTokenizer.tokenize_with_weights``).

    The prompt is read in ComfyUI's prompt syntax (:func:`fatezero_core.prompt_syntax.read_prompt`;
    ``embedding_length(name)`` gives an embedding's vector count, None for no such file). Each
    bare word is tokenized on its own and the pieces are laid out from position 1, as CLIP BPE
    does per word; the result is checked against tokenizing each piece of the prompt whole, as
    ComfyUI does, so the positions are those of the tokens that get encoded.

    Raises:
        PromptError: the prompt has more than 75 content tokens, names a missing embedding, or the
            tokenizer misbehaves.
    """
    reading = read_prompt(prompt, embedding_length)
    content: list[int] = []
    spans: list[range] = []
    cores: list[range] = []
    words: list[str] = []
    piece_ids: dict[int, list[int]] = {}
    for atoms in reading.words:
        start = len(content) + 1
        named: list[int] = []  # positions of embeddings and of text with letters or digits
        for atom in atoms:
            if atom.is_embedding:
                ids = list(embedding_token_ids(atom.text, atom.size))
            else:
                ids = _call_tokenizer(tokenize, atom.text)
                piece_ids.setdefault(atom.piece, []).extend(ids)
            if atom.is_embedding or any(c.isalnum() for c in atom.text):
                named.extend(range(len(content) + 1, len(content) + 1 + len(ids)))
            content.extend(ids)
        span = range(start, len(content) + 1)
        word = "".join(atom.display for atom in atoms)
        if any(atom.is_embedding for atom in atoms):
            core = range(min(named), max(named) + 1)
        else:
            core = _core_span(word, content[start - 1:], span, tokenize)
        words.append(word)
        spans.append(span)
        cores.append(core)
    if len(content) > MAX_CONTENT_TOKENS:
        raise PromptError(
            f"the prompt '{prompt}' has {len(content)} tokens but at most {MAX_CONTENT_TOKENS} fit; "
            f"shorten it by {len(content) - MAX_CONTENT_TOKENS} tokens (long words, punctuation "
            "and embeddings count as several tokens)"
        )
    for index, piece in enumerate(reading.pieces):
        if _call_tokenizer(tokenize, piece) != piece_ids.get(index, []):
            part = "" if piece == prompt else f" (its part '{piece}')"
            raise PromptError(
                f"the prompt '{prompt}'{part} tokenizes differently as a whole than word by word, "
                "so words cannot be matched to tokens; remove unusual characters or separate them "
                "with spaces"
            )
    ids = [BOS, *content, EOS] + [EOS] * (MAX_CONTENT_TOKENS - len(content))
    return PromptTokens(
        prompt=prompt,
        words=tuple(words),
        ids=tuple(ids),
        word_spans=tuple(spans),
        core_spans=tuple(cores),
        word_keys=tuple(_word_key(w) for w in words),
    )


# --------------------------------------------------------------------------------------------
# Word -> token lookup
# --------------------------------------------------------------------------------------------


def word_token_indices(prompt_tokens: PromptTokens, word: Word) -> list[int]:
    """Token positions of ``word`` in the prompt; empty when it is not there.

    Official ``ptp_utils.py``: ``get_word_inds`` (split on " ", exact match), made robust:

    - a string matches whitespace words case-insensitively and ignoring the punctuation around
      them, and returns only the word's own tokens ("countryside" -> the "countryside" token of
      "countryside,", not the comma);
    - a string of several words ("Wonder Woman") matches consecutive whitespace words;
    - every occurrence is returned, in ascending order;
    - an int is a whitespace-word index (0 = first word), as the official code allows.

    Raises:
        PromptError: ``word`` is empty or neither text nor an int.
    """
    if isinstance(word, bool) or not isinstance(word, (str, int)):
        raise PromptError(f"a word must be text or a word index, got {word!r}")
    if isinstance(word, int):
        if 0 <= word < len(prompt_tokens.words):
            return list(prompt_tokens.core_spans[word])
        return []
    keys = [_word_key(part) for part in word.split()]
    if not keys:
        raise PromptError("an empty word was given; type a word from the prompt")
    found: set[int] = set()
    n = len(keys)
    for start in range(len(prompt_tokens.words) - n + 1):
        if list(prompt_tokens.word_keys[start : start + n]) == keys:
            for k in range(start, start + n):
                found.update(prompt_tokens.core_spans[k])
    return sorted(found)


def require_word_token_indices(
    prompt_tokens: PromptTokens, word: Word, what: str = "blend word"
) -> list[int]:
    """:func:`word_token_indices`, raising when the word is not in the prompt.

    A blend word missing from the prompt is an error: the official code gives no tokens for it, so
    ``SpatialBlender.get_mask`` (``spatial_blend.py``) divides 0 by 0 and silently masks nothing. ``what`` names the setting in the message.

    Raises:
        PromptError: naming the word, the prompt and the words that can be used.
    """
    indices = word_token_indices(prompt_tokens, word)
    if indices:
        return indices
    if isinstance(word, int):
        raise PromptError(
            f"{what} {word} is not a word index of the prompt '{prompt_tokens.prompt}' "
            f"({len(prompt_tokens.words)} words); use 0 to {len(prompt_tokens.words) - 1}"
        )
    options = ", ".join(dict.fromkeys(prompt_tokens.word_keys)) or "(the prompt is empty)"
    raise PromptError(
        f"{what} '{word}' is not in the prompt '{prompt_tokens.prompt}'; use one of: {options}"
    )


# --------------------------------------------------------------------------------------------
# Replace / refine selection and mappers
# --------------------------------------------------------------------------------------------


def _require_equal_word_counts(src: PromptTokens, tgt: PromptTokens) -> None:
    """Replace mode pairs words by position, so both prompts need the same number of words."""
    if len(src.words) != len(tgt.words):
        raise PromptError(
            f"replace mode needs prompts with the same number of words, but the source prompt "
            f"'{src.prompt}' has {len(src.words)} and the target prompt '{tgt.prompt}' has "
            f"{len(tgt.words)}; use refine (or auto) mode, or make the word counts equal"
        )


def choose_mode(src: PromptTokens, tgt: PromptTokens, mode: str = "auto") -> str:
    """``"replace"`` or ``"refine"`` (official ``p2preplace_edit``, ``is_replace_controller``).

    ``auto`` picks replace when both prompts have the same number of whitespace words and refine
    otherwise, as the official ``make_controller`` does with ``is_replace_controller=True``.

    Raises:
        PromptError: an unknown mode, or replace with unequal word counts.
    """
    key = mode.strip().lower() if isinstance(mode, str) else mode
    if key not in MODES:
        raise PromptError(f"unknown alignment mode {mode!r}; use one of: {', '.join(MODES)}")
    if key == "auto":
        return "replace" if len(src.words) == len(tgt.words) else "refine"
    if key == "replace":
        _require_equal_word_counts(src, tgt)
    return key


def replacement_mapper(src: PromptTokens, tgt: PromptTokens) -> torch.Tensor:
    """Word-swap mapper ``M[77, 77]`` (float), ``R(S) = S M`` (official ``AttentionReplace``).

    P2P ``seq_aligner.get_replacement_mapper_``: rows are source positions, columns target
    positions. Words are paired by position (``k``-th source word with ``k``-th target word):

    - equal token counts: 1:1, ``M[s_t, t_t] = 1`` (an unchanged word is its own identity);
    - different token counts: every source token of the word gives ``1 / len(target tokens)`` to
      every target token of the word;
    - BOS maps to BOS, and after the prompt the EOS and padding stay aligned, source EOS to target
      EOS and so on (the identity when both prompts have the same number of tokens). When the
      source has more tokens, the last target padding columns have no source and stay 0.

    Official quirk, not reproduced: after the last changed word the official loop writes
    ``M[j, j]`` (target position on both axes) instead of ``M[i, j]``. With equal token counts
    ``i == j`` and both agree; when a changed word has a different token count, the official mapper
    shifts every later word and EOS by the difference. Here source position ``i`` always maps to
    its own target position ``j``.

    Raises:
        PromptError: the prompts have different numbers of words.
    """
    _require_equal_word_counts(src, tgt)
    mapper = torch.zeros(MAX_TOKENS, MAX_TOKENS)
    mapper[0, 0] = 1.0
    for s_span, t_span in zip(src.word_spans, tgt.word_spans):
        if len(s_span) == len(t_span):
            for i, j in zip(s_span, t_span):
                mapper[i, j] = 1.0
        elif len(t_span) > 0:
            weight = 1.0 / len(t_span)
            for i in s_span:
                for j in t_span:
                    mapper[i, j] = weight
    for i, j in zip(range(src.eos_index, MAX_TOKENS), range(tgt.eos_index, MAX_TOKENS)):
        mapper[i, j] = 1.0
    return mapper


def _global_alignment(x: Sequence[int], y: Sequence[int]) -> list[Optional[int]]:
    """Needleman-Wunsch alignment of ``y`` (target) onto ``x`` (source).

    Scores as P2P ``seq_aligner.global_align``: match 1, mismatch -1, gap 0. The traceback walks
    back from the end preferring, among moves that reach the cell's score, (1) a target token
    aligned to a gap, then (2) a skipped source token, then (3) the diagonal. So with repeated tokens
    a target token is matched as early as possible. Returns, for each target position, the aligned
    source position or ``None`` for a new token.
    """
    match, mismatch, gap = 1, -1, 0
    rows, cols = len(x) + 1, len(y) + 1
    score = [[0] * cols for _ in range(rows)]
    for i in range(1, rows):
        score[i][0] = i * gap
    for j in range(1, cols):
        score[0][j] = j * gap
    for i in range(1, rows):
        for j in range(1, cols):
            pair = match if x[i - 1] == y[j - 1] else mismatch
            score[i][j] = max(
                score[i][j - 1] + gap, score[i - 1][j] + gap, score[i - 1][j - 1] + pair
            )
    aligned: list[Optional[int]] = [None] * len(y)
    i, j = len(x), len(y)
    while i > 0 or j > 0:
        if i == 0:
            j -= 1
        elif j == 0:
            i -= 1
        elif score[i][j] == score[i][j - 1] + gap:
            j -= 1
        elif score[i][j] == score[i - 1][j] + gap:
            i -= 1
        else:
            aligned[j - 1] = i - 1
            i -= 1
            j -= 1
    return aligned


def refinement_mapper(src: PromptTokens, tgt: PromptTokens) -> tuple[torch.Tensor, torch.Tensor]:
    """Refine mapper and alphas (``seq_aligner.py``: ``get_mapper``; official ``AttentionRefine``).

    The BOS..EOS id sequences of both prompts are globally aligned (:func:`_global_alignment`).
    Returns ``(mapper, alphas)``, a ``LongTensor[77]`` and a ``FloatTensor[77]``:

    - ``mapper[n]`` is the source position aligned to target position ``n``, ``alphas[n] = 1``;
    - a new target token (aligned to a gap) has ``alphas[n] = 0`` and ``mapper[n] = 0`` (P2P stores
      -1; any valid index gives the same result because it is multiplied by 0);
    - past the target's EOS, ``mapper[n] = n`` and ``alphas[n] = 1``, as in P2P. When the source has
      more tokens than the target this maps target padding onto source content tokens, as P2P does.

    Used as ``R(S) = S[..., mapper] * alphas + A * (1 - alphas)``.
    """
    x, y = src.sequence, tgt.sequence
    mapper = torch.arange(MAX_TOKENS, dtype=torch.long)
    alphas = torch.ones(MAX_TOKENS)
    for n, source_index in enumerate(_global_alignment(x, y)):
        if source_index is None:
            mapper[n] = 0
            alphas[n] = 0.0
        else:
            mapper[n] = source_index
    return mapper, alphas


# --------------------------------------------------------------------------------------------
# Reweighting and schedules
# --------------------------------------------------------------------------------------------


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def equalizer(tgt_tokens: PromptTokens, weights: Mapping[Word, float]) -> torch.Tensor:
    """Reweight equalizer ``e[77]`` (official ``attention_util.py``: ``get_equalizer``).

    Ones, with ``value`` at the token positions of each word in the **target** prompt; later
    entries win where words overlap. Applied as ``R_eq(S) = e * R(S)`` (no renormalisation).
    A ComfyUI prompt weight on a word (``(watercolor:1.3)``) is not part of ``e``: it scales the
    word's text embedding only, exactly as CLIP Text Encode does, and combines with ``value``.

    Raises:
        PromptError: a word is not in the target prompt (the official code ignores it silently),
            or a value is not a finite number.
    """
    if not isinstance(weights, Mapping):
        raise PromptError(
            f"reweight must be a mapping {{word: value}}, got {type(weights).__name__}"
        )
    e = torch.ones(MAX_TOKENS)
    for word, value in weights.items():
        if not _is_number(value) or not math.isfinite(value):
            raise PromptError(f"reweight value for '{word}' must be a finite number, got {value!r}")
        indices = require_word_token_indices(tgt_tokens, word, what="reweight word")
        e[indices] = float(value)
    return e


def _parse_window(value: object, what: str) -> tuple[float, float]:
    """A float ``c`` meaning ``(0, c)`` or a pair ``(start, end)``; checked ``0<=start<=end<=1``."""
    if _is_number(value):
        bounds = (0.0, float(value))
    elif (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) == 2
        and all(_is_number(v) for v in value)
    ):
        bounds = (float(value[0]), float(value[1]))
    else:
        raise PromptError(
            f"{what} must be a fraction of the steps in [0, 1] or a (start, end) pair, got {value!r}"
        )
    start, end = bounds
    if not (math.isfinite(start) and math.isfinite(end) and 0.0 <= start <= end <= 1.0):
        raise PromptError(
            f"{what} {value!r} is out of range; use fractions of the steps with "
            "0 <= start <= end <= 1"
        )
    return bounds


def cross_replace_alphas(
    tgt_tokens: PromptTokens, num_steps: int, cross_replace_steps: StepsSpec
) -> torch.Tensor:
    """Cross-attention schedule ``alpha[num_steps + 1, 77]`` (official ``ptp_utils.py``).

    P2P ``ptp_utils.get_time_words_attention_alpha``: ``cross_replace_steps`` is a float ``c``
    (meaning ``(0, c)``), a pair ``(start, end)``, or a dict ``{"default_": c_or_pair, word:
    c_or_pair}`` (``default_`` defaults to ``(0, 1)``). For a window ``(b0, b1)`` row ``r`` is 1 for
    ``int(b0 * (N + 1)) <= r < int(b1 * (N + 1))`` and 0 elsewhere; c=0.8, N=50 gives rows 0-39.
    Per-word windows override the default on that word's tokens in the **target** prompt.

    Raises:
        PromptError: a window out of ``0 <= start <= end <= 1``, or a per-word entry whose word is
            not in the target prompt (the official code ignores it silently).
    """
    if isinstance(cross_replace_steps, Mapping):
        spec = dict(cross_replace_steps)
    else:
        spec = {"default_": cross_replace_steps}
    spec.setdefault("default_", (0.0, 1.0))
    rows = num_steps + 1
    alpha = torch.zeros(rows, MAX_TOKENS)

    def fill(window: object, what: str, columns: Union[slice, list[int]]) -> None:
        b0, b1 = _parse_window(window, what)
        start, end = int(b0 * rows), int(b1 * rows)
        alpha[:, columns] = 0.0
        alpha[start:end, columns] = 1.0

    fill(spec.pop("default_"), "cross_replace_steps", slice(None))
    for word, window in spec.items():
        columns = require_word_token_indices(tgt_tokens, word, what="cross_replace_steps word")
        fill(window, f"cross_replace_steps for '{word}'", columns)
    return alpha


def self_replace_window(num_steps: int, self_replace_steps: Window) -> tuple[int, int]:
    """Self-attention fusion steps ``(start, end)``: step ``i`` fuses when ``start <= i < end``.

    Official ``AttentionControlEdit.__init__`` (``num_self_replace``): ``start = int(N * s0)``,
    ``end = int(N * s1)``; a float ``s`` means ``(0, s)`` (0.6 at N=50 -> steps 0-29). An int 1 is
    accepted as 1.0 (the official code takes only a float as ``(0, s)`` and fails on an int).

    Raises:
        PromptError: a window out of ``0 <= start <= end <= 1``.
    """
    s0, s1 = _parse_window(self_replace_steps, "self_replace_steps")
    return int(num_steps * s0), int(num_steps * s1)


# --------------------------------------------------------------------------------------------
# Everything for one edit
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class TokenAlignment:
    """What the attention controller needs for one source -> target edit.

    Attributes:
        mode: ``"replace"`` or ``"refine"``.
        mapper: replace: ``FloatTensor[77, 77]`` (:func:`replacement_mapper`); refine:
            ``LongTensor[77]`` (:func:`refinement_mapper`).
        refine_alphas: refine: ``FloatTensor[77]``, 0 for new target tokens; replace: ``None``.
        equalizer: ``FloatTensor[77]`` reweight scale, or ``None`` without reweighting.
        cross_alphas: ``FloatTensor[num_steps + 1, 77]``; row ``i`` is the token mask at step ``i``.
        self_window: ``(start, end)``; self-attention is fused at steps ``start <= i < end``.
        source, target: the two prompts' token layouts (for blend-word lookup).
        num_steps: the number of denoising steps the schedules were built for.
    """

    mode: str
    mapper: torch.Tensor
    refine_alphas: Optional[torch.Tensor]
    equalizer: Optional[torch.Tensor]
    cross_alphas: torch.Tensor
    self_window: tuple[int, int]
    source: PromptTokens
    target: PromptTokens
    num_steps: int


def align_prompts(
    src: str,
    tgt: str,
    tokenize: Tokenize,
    num_steps: int,
    embedding_length: Optional[EmbeddingLength] = None,
    **options,
) -> TokenAlignment:
    """The :class:`TokenAlignment` for editing ``src`` into ``tgt`` (official ``make_controller``).

    Prompt weights (``(word:1.3)``) only change the encoded prompt, as in CLIP Text Encode; the
    attention reweight comes from ``reweight`` alone (see :func:`equalizer`).

    Raises:
        PromptError: any bad prompt, mode, word or window, with what to change.
    """
    source = tokenize_prompt(src, tokenize, embedding_length)
    target = tokenize_prompt(tgt, tokenize, embedding_length)
    return align_tokens(source, target, num_steps, **options)


def align_tokens(
    source: PromptTokens,
    target: PromptTokens,
    num_steps: int,
    mode: str = "auto",
    cross_replace_steps: StepsSpec = 0.8,
    self_replace_steps: Window = 0.6,
    reweight: Optional[Mapping[Word, float]] = None,
) -> TokenAlignment:
    """The :class:`TokenAlignment` of two prompts already laid out by :func:`tokenize_prompt`
    (plain data: no tokenizer needed); :func:`align_prompts` lays them out first.

    Raises:
        PromptError: any bad mode, word or window, with what to change.
    """
    chosen = choose_mode(source, target, mode)
    if chosen == "replace":
        mapper, refine_alphas = replacement_mapper(source, target), None
    else:
        mapper, refine_alphas = refinement_mapper(source, target)
    return TokenAlignment(
        mode=chosen,
        mapper=mapper,
        refine_alphas=refine_alphas,
        equalizer=equalizer(target, reweight) if reweight else None,
        cross_alphas=cross_replace_alphas(target, num_steps, cross_replace_steps),
        self_window=self_replace_window(num_steps, self_replace_steps),
        source=source,
        target=target,
        num_steps=num_steps,
    )


__all__ = [
    "BOS",
    "EOS",
    "MAX_CONTENT_TOKENS",
    "MAX_TOKENS",
    "MODES",
    "PromptTokens",
    "TokenAlignment",
    "align_prompts",
    "align_tokens",
    "choose_mode",
    "cross_replace_alphas",
    "embedding_token_ids",
    "equalizer",
    "is_embedding_id",
    "refinement_mapper",
    "replacement_mapper",
    "require_word_token_indices",
    "self_replace_window",
    "tokenize_prompt",
    "word_token_indices",
]
