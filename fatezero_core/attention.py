"""Attention kernels for capture and fusion (paper eqs. 5-8).

Tensors arrive as the host projects them: ``[B, N, heads*dim_head]`` with heads merged. Self-
attention never materialises a ``q x Kq`` map: the blended self-attention of eq. 7,

    (M * softmax(Qe Ke^T) + (1 - M) * softmax(Qs Ks^T)) Ve
        = M * softmax(Qe Ke^T) Ve + (1 - M) * softmax(Qs Ks^T) Ve,

is a per-query-row mix of two scaled-dot-product attentions over the edit values ``Ve``, because
the mask ``M`` is one value per query row (FateZero ``video_diffusion/prompt_attention/
attention_util.py``, ``AttentionControlEdit.forward``: the mask is reshaped to ``[f, 1, q, 1]``
and applied in ``replace_self_attention``). So no ``q x Kq`` self-attention map is ever stored or
materialised; cross-attention maps are small (``q x 77``) and are materialised for
prompt-to-prompt control (``replace_cross_attention`` of ``AttentionReplace``/``AttentionRefine``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .frames import frames_per_chunk
from .keyframes import gather_key_frames, is_identity_table, key_frame_table


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, N, H*d] -> [B, H, N, d]``."""
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, N, d] -> [B, N, H*d]``."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Plain multi-head attention ``softmax(QK^T / sqrt(d)) V`` through SDPA."""
    out = F.scaled_dot_product_attention(split_heads(q, heads), split_heads(k, heads), split_heads(v, heads))
    return merge_heads(out)


MAX_TOKEN_REPEATS = 4  # ComfyUI pads cond batches by at most 4 repetitions (comfy/conds.py can_concat)


def unrepeated_tokens(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-attention keys and values without repetition padding: ``[F, r*T, C] -> [F, T, C]``
    when the token axis is ``r`` exact copies of its first ``T`` tokens, else unchanged.

    ComfyUI batches conditionings of different lengths by repeating the shorter ones up to a
    common length (``comfy/conds.py`` ``CONDCrossAttn.concat``): a 77-token target next to a
    231-token negative prompt arrives as three copies. Attention over ``r`` copies of each key
    equals attention over one (every copy gets ``1/r`` of the weight and has the same value), so
    the copies are dropped: the result is the same whether the host batched the prompts or not,
    and the cross-attention map has the prompt's own token slots.
    """
    length = k.shape[1]
    for repeats in range(MAX_TOKEN_REPEATS, 1, -1):
        if length % repeats:
            continue
        period = length // repeats
        copies_k = k.unflatten(1, (repeats, period))
        copies_v = v.unflatten(1, (repeats, period))
        if torch.equal(copies_k, copies_k[:, :1].expand_as(copies_k)) and \
                torch.equal(copies_v, copies_v[:, :1].expand_as(copies_v)):
            return k[:, :period], v[:, :period]
    return k, v


def spatio_temporal_attention(q, k, v, heads: int, table: torch.Tensor) -> torch.Tensor:
    """Self-attention of each frame over its key frames' tokens (eq. 8).

    ``q, k, v``: ``[F, N, C]`` of one chunk; ``table``: ``[F, K]`` key frames per frame.
    """
    if is_identity_table(table):
        return attention(q, k, v, heads)
    return attention(q, gather_key_frames(k, table), gather_key_frames(v, table), heads)


def video_self_attention(q, k, v, heads: int, rule, chunks: int = 1) -> torch.Tensor:
    """Spatio-temporal self-attention (eq. 8) of a frame-major batch of ``chunks`` clips, each
    over its own frames: ``q, k, v`` are ``[chunks*F, N, C]``; ``rule`` a key-frame rule
    (``keyframes``), e.g. Tune-A-Video's ``(-1, "first")``. This is the network's own
    self-attention, without capture or fusion (used to tune a Tune-A-Video model)."""
    frames = frames_per_chunk(q.shape[0], chunks)
    table = key_frame_table(rule, frames)
    outs = [spatio_temporal_attention(q[s], k[s], v[s], heads, table)
            for s in (slice(c * frames, (c + 1) * frames) for c in range(chunks))]
    return outs[0] if chunks == 1 else torch.cat(outs)


def row_blend(edit: torch.Tensor, source: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Eq. 7 applied to attention outputs: ``M * edit + (1 - M) * source`` per query row.

    ``mask`` is ``[F, N]`` (1 keeps the edited row); ``None`` means full replacement (M = 0).
    """
    if mask is None:
        return source
    m = mask.to(edit.dtype).unsqueeze(-1)
    return source + m * (edit - source)


def blended_self_attention(q_edit, k_edit_keys, v_edit_keys, q_src, k_src_keys, heads, mask):
    """Fused self-attention of eq. 7 as two SDPA calls mixed per query row.

    ``*_keys`` are already gathered over key frames (``[F, K*N, C]``); the source map is applied to
    the *edit* values, as the official code does (it swaps the probability map, not the output).
    """
    v_heads = split_heads(v_edit_keys, heads)
    src = F.scaled_dot_product_attention(split_heads(q_src, heads), split_heads(k_src_keys, heads), v_heads)
    if mask is None:
        return merge_heads(src)
    edit = F.scaled_dot_product_attention(split_heads(q_edit, heads), split_heads(k_edit_keys, heads), v_heads)
    return row_blend(merge_heads(edit), merge_heads(src), mask)


def attention_probs(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """``softmax(QK^T / sqrt(d))`` as ``[B, H, N, T]`` (used for cross-attention only)."""
    qh, kh = split_heads(q, heads), split_heads(k, heads)
    scale = qh.shape[-1] ** -0.5
    return torch.softmax((qh @ kh.transpose(-1, -2)).float() * scale, dim=-1).to(q.dtype)


def apply_probs(probs: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """``P V`` with ``P`` as ``[B, H, N, T]`` and ``v`` as ``[B, T, H*d]``; heads merged."""
    return merge_heads(probs.to(v.dtype) @ split_heads(v, heads))
