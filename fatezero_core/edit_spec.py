"""The user's edit request, independent of the step count: plain data from the edit's node to
FateZero Sample.

An :class:`EditSpec` is what FateZero Edit Settings emits: both prompts laid out on CLIP's token
positions (laid out once, with the CLIP's own tokenizer, by :meth:`EditSpec.from_prompts`) and the
fusion options. It holds no tokenizer or other live object. The step count is only known once the
store is at hand, so :meth:`EditSpec.edit_settings` builds the per-step tensors then.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .controller import EditSettings
from .errors import PromptError
from .prompt_align import PromptTokens, Tokenize, align_tokens, require_word_token_indices, tokenize_prompt
from .prompt_syntax import EmbeddingLength


@dataclass(frozen=True)
class SourcePrompt:
    """The source prompt as the inversion saw it: the text as typed and the host's hash of its
    encoding. The edit side reads the words from here, so the source prompt is typed once and the
    inversion depends on nothing that belongs to an edit."""

    text: str
    fingerprint: str


@dataclass(frozen=True)
class EditSpec:
    """Prompts and fusion options (FateZero ``video_diffusion/prompt_attention/attention_util.py``,
    ``make_controller``; official defaults).

    ``source_tokens``/``target_tokens``: the prompts as typed (in ComfyUI's prompt syntax), laid
    out by :func:`fatezero_core.prompt_align.tokenize_prompt`. ``blend_words``: source-prompt words
    whose cross-attention makes the blend mask (empty: full self-attention replacement).
    ``target_blend_words``: target-prompt words added to the local latent blend mask.
    ``blend_threshold >= 1`` means full replacement.
    """

    source_tokens: PromptTokens
    target_tokens: PromptTokens
    mode: str = "auto"
    cross_replace_steps: object = 0.8
    self_replace_steps: object = 0.6
    blend_words: tuple[str, ...] = ()
    target_blend_words: tuple[str, ...] = ()
    blend_threshold: float = 0.3
    soft_mask: bool = False
    reweight: Mapping[str, float] | None = None
    latent_blend: bool = False
    latent_blend_aligned: bool = False
    source_fingerprint: str = ""  # host hash of the encoded source prompt, checked against the store
    target_fingerprint: str = ""  # host hash of the encoded target prompt, checked against 'positive'

    @classmethod
    def from_prompts(cls, source_prompt: str, target_prompt: str, tokenize: Tokenize,
                     embedding_length: EmbeddingLength | None = None, **options) -> "EditSpec":
        """Lay both prompts out with ``tokenize`` (``text -> content token ids``, the CLIP's own)
        and ``embedding_length`` (``name -> vectors`` of a textual-inversion embedding, None for
        no such file; None: no embeddings); ``options`` are the other fields."""
        return cls(tokenize_prompt(source_prompt, tokenize, embedding_length),
                   tokenize_prompt(target_prompt, tokenize, embedding_length), **options)

    @property
    def source_prompt(self) -> str:
        return self.source_tokens.prompt

    @property
    def target_prompt(self) -> str:
        return self.target_tokens.prompt

    def check(self) -> None:
        """Validate words and windows now, so the settings node fails early with a clear message."""
        self.edit_settings(num_steps=50)

    def edit_settings(self, num_steps: int, fuse: bool = True) -> EditSettings:
        alignment = align_tokens(self.source_tokens, self.target_tokens, num_steps, mode=self.mode,
                                 cross_replace_steps=self.cross_replace_steps,
                                 self_replace_steps=self.self_replace_steps, reweight=self.reweight)
        blend = _token_positions(alignment.source, self.blend_words, "blend word")
        target_blend = _token_positions(alignment.target, self.target_blend_words, "target blend word")
        if self.latent_blend and not blend:
            raise PromptError("The local latent blend needs blend words: add them or turn it off.")
        return EditSettings.from_alignment(
            alignment, blend_tokens=blend, blend_threshold=self.blend_threshold,
            soft_mask=self.soft_mask, target_blend_tokens=target_blend,
            latent_blend=self.latent_blend, latent_blend_aligned=self.latent_blend_aligned,
            source_token_ids=tuple(alignment.source.ids), target_token_ids=tuple(alignment.target.ids),
            fuse=fuse)


def _token_positions(prompt_tokens, words, what) -> tuple[int, ...] | None:
    if not words:
        return None
    positions = []
    for word in words:
        positions += require_word_token_indices(prompt_tokens, word, what=what)
    return tuple(sorted(set(positions)))
