"""Attention blending masks from the source cross-attention (paper eqs. 6-7; FateZero
``video_diffusion/prompt_attention/spatial_blend.py``, ``SpatialBlender.get_mask``).

The mask marks the query rows whose self-attention keeps the *edit* map (M = 1); elsewhere the
source map is copied. Built from the stored source cross-attention of the blend words at the
1/4-resolution layers, exactly in the official order:

1. sum the probabilities of the blend words' tokens, mean over layers and heads -> ``[F, h, w]``;
2. 3x3 max-pool (stride 1, padding 1; a small dilation);
3. nearest resize to the layer's token grid;
4. divide by each frame's maximum;
5. threshold: ``M = m > th``. ``th >= 1`` gives M = 0 (full replacement). The soft variant (an
   extension, off by default) ramps instead: ``M = clamp((m - th) / (1 - th), 0, 1)``, 0 at or
   below the threshold and 1 at the frame's peak, so ``th = 0`` keeps ``m`` itself and
   ``th >= 1`` is full replacement as well.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def word_attention_map(probs: Sequence[torch.Tensor], token_indices: Sequence[int], size) -> torch.Tensor:
    """Step 1: ``[F, h, w]`` mean (over layers and heads) of the summed word-token attention.

    ``probs`` are ``[F, H, h*w, T]`` cross-attention maps of layers sharing the grid ``size``.
    """
    index = torch.as_tensor(list(token_indices), dtype=torch.long, device=probs[0].device)
    per_layer = [p.float().index_select(-1, index).sum(-1).mean(1) for p in probs]
    frames = per_layer[0].shape[0]
    return torch.stack(per_layer).mean(0).reshape(frames, *size)


def dilate(word_map: torch.Tensor) -> torch.Tensor:
    """Step 2: 3x3 max-pool, frames treated as channels."""
    return F.max_pool2d(word_map.unsqueeze(1), 3, stride=1, padding=1).squeeze(1)


def normalise_per_frame(m: torch.Tensor) -> torch.Tensor:
    """Step 4: divide by each frame's maximum; an all-zero frame stays zero (never NaN)."""
    peak = m.flatten(1).amax(1).clamp_min(torch.finfo(m.dtype).tiny)
    return m / peak.view(-1, 1, 1)


def blend_mask(word_map: torch.Tensor, size, threshold: float, soft: bool = False) -> torch.Tensor:
    """Steps 2-5: the ``[F, h*w]`` row mask for a layer whose token grid is ``size``."""
    m = F.interpolate(dilate(word_map).unsqueeze(1), size=tuple(size), mode="nearest").squeeze(1)
    m = normalise_per_frame(m)
    if threshold >= 1:
        mask = torch.zeros_like(m)
    elif soft:
        mask = ((m - threshold) / (1 - threshold)).clamp(0, 1)
    else:
        mask = (m > threshold).to(m.dtype)
    return mask.flatten(1)


def union(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Logical OR of two {0,1} masks (soft masks: element-wise max)."""
    return torch.maximum(a, b)
