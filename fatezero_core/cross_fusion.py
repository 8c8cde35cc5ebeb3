"""Prompt-to-prompt cross-attention fusion (paper eq. 5; FateZero
``video_diffusion/prompt_attention/attention_util.py``, ``AttentionControlEdit.forward`` with the
``replace_cross_attention`` of ``AttentionReplace``, ``AttentionRefine`` and ``AttentionReweight``).

For unchanged words the edit's cross-attention map is replaced by the source map captured during
inversion; a per-token, per-step schedule ``alpha`` decides where:

    A' = alpha * R(S) + (1 - alpha) * A

with ``S`` the stored source map, ``A`` the edit map and ``R`` the word mapping:

- replace: ``R(S) = S M`` with the ``[77, 77]`` token mapper ``M``;
- refine:  ``R(S) = S[..., mapper] * a + A * (1 - a)``, ``a = 0`` for new target tokens;
- reweight: ``R_eq(S) = e * R(S)``, a column scale by the equalizer ``e`` (no renormalisation).
"""

from __future__ import annotations

import torch


def replace_source_probs(src: torch.Tensor, mapper: torch.Tensor) -> torch.Tensor:
    """``S M``: source-token columns moved onto the target tokens (P2P word swap)."""
    return src @ mapper.to(src.dtype)


def refine_source_probs(src, edit, mapper: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """Aligned source columns; new target tokens keep the edit's own attention."""
    a = alphas.to(src.dtype)
    return src.index_select(-1, mapper.to(src.device)) * a + edit * (1 - a)


def fuse_cross_probs(edit, src, mode: str, mapper, refine_alphas, equalizer, alpha_row):
    """``A'`` for one layer call: ``edit``/``src`` are ``[F, H, N, T]``, ``alpha_row`` is ``[T]``."""
    if mode == "replace":
        mapped = replace_source_probs(src, mapper)
    else:
        mapped = refine_source_probs(src, edit, mapper, refine_alphas)
    if equalizer is not None:
        mapped = mapped * equalizer.to(mapped.dtype)
    alpha = alpha_row.to(edit.dtype)
    return alpha * mapped + (1 - alpha) * edit
