"""Attention-store size from shapes: the official map store vs ours (design decision 4).

Pure arithmetic, no tensors. The official formula is the one in
``fatezero-reference-implementation.md`` section 2 ("Memory per inversion step"):

    bytes = s * f * H * sum_l q_l * (77 + K * q_l)

over the stored layers ``l`` (query length ``q_l``), with ``s`` bytes per value (2 for fp16), ``f``
frames, ``H`` heads and ``K`` key frames: every cross map ``q x 77`` and every self map ``q x K*q``,
per frame and head. For SD1.x at 512 px, f=8, H=8 this gives 777,265,152 B per step for K=1 and
1,490,821,120 B for K=2.

Our compact store (:class:`fatezero_core.store.AttentionStore`) keeps, per stored layer, the
source queries of every frame (``f x q x C``), the source keys of the key frames the rule actually
uses (``K_kept x q x C``) and the cross-attention probabilities (``f x H x q x 77``). The
``recompute`` placement keeps only the inversion latents (float32).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .layers import LayerInfo, LayerSet
from .sd1 import HEADS as SD1_HEADS
from .sd1 import sd1_attention_blocks

TEXT_TOKENS = 77


def official_map_store_bytes_per_step(frames: int, heads: int, layers: Iterable[int], key_frames: int,
                                      bytes_per_value: int = 2) -> int:
    """Bytes the official map store records per inversion step (reference doc section 2).

    ``s * f * H * sum_l q_l * (77 + K * q_l)``; ``layers`` are the stored query lengths ``q_l``
    (at 512 px: five of 1024, five of 256, one of 64), ``key_frames`` is K (1 for ``[mid]``, 2 for
    ``[-1, first]``). The running sum, latents and edit-time copies are not included.
    """
    total = sum(q * (TEXT_TOKENS + key_frames * q) for q in layers)
    return bytes_per_value * frames * heads * total


def compact_store_bytes_per_step(frames: int, layers: Iterable[Sequence[int]], key_frames_kept: int,
                                 bytes_per_value: int = 2, tokens: int = TEXT_TOKENS) -> int:
    """Attention bytes our compact store records per inversion step (latents not included).

    ``layers`` holds ``(q_l, channels_l, heads_l)`` for each stored layer. Per layer:
    ``f*q*C`` (source queries) + ``K_kept*q*C`` (source keys of the key frames in use) +
    ``f*H*q*tokens`` (cross-attention probabilities), times ``bytes_per_value``. ``K_kept`` is the
    number of distinct frames the key rule refers to (``keyframes.key_frames_used``): 1 for
    ``mid``, f-1 for ``prev, first``, f for ``self, mid``.
    """
    values = 0
    for q, channels, heads in layers:
        values += frames * q * channels + key_frames_kept * q * channels + frames * heads * q * tokens
    return bytes_per_value * values


def recompute_store_bytes_per_step(frames: int, latent_h: int, latent_w: int, channels: int = 4,
                                   bytes_per_value: int = 4) -> int:
    """Bytes of one inversion latent ``[f, C, h, w]`` as the store keeps it (float32).

    This is all a ``recompute`` store holds per step (it keeps ``z_0 .. z_N``, i.e. N + 1 latents);
    the compact placements keep the same latents on top of their attention bytes.
    """
    return frames * channels * latent_h * latent_w * bytes_per_value


def _side(size: int, level: int) -> int:
    # A stride-2 conv with padding 1 maps s to ceil(s / 2) (layers.LayerInfo.level).
    for _ in range(level):
        size = -(-size // 2)
    return size


def sd1_layer_infos(latent_side: int | tuple[int, int] = 64) -> list[LayerInfo]:
    """The 16 SD1.x attention layers (named by diffusers block path; token grids, 8 heads,
    channels) in call order."""
    lh, lw = (latent_side, latent_side) if isinstance(latent_side, int) else latent_side
    return [LayerInfo(block.path, _side(lh, block.level), _side(lw, block.level), lh, lw, SD1_HEADS, block.channels())
            for block in sd1_attention_blocks()]


def sd1_stored_layers(latent_side: int | tuple[int, int] = 64,
                      layer_set: str = "relative") -> list[tuple[int, int, int]]:
    """``(q, C, heads)`` of the SD1.x layers the store keeps under ``layer_set``, in call order.

    At a 64x64 latent (512 px) with ``relative`` (and ``official``): input 4,5 (32x32, 640),
    input 7,8 (16x16, 1280), middle (8x8, 1280), output 3,4,5 (16x16, 1280), output 6,7,8
    (32x32, 640); 8 heads each. Selection is :class:`fatezero_core.layers.LayerSet`'s own rule.
    """
    rule = LayerSet(layer_set)
    return [(info.tokens, info.channels, info.heads)
            for info in sd1_layer_infos(latent_side) if rule.stores(info)]
