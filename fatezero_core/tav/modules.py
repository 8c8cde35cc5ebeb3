"""Tune-A-Video temporal layers, written for a frame-major batch.

The host runs the UNet on a batch laid out as ``(B*F, ...)``: B chunks (e.g. uncond/cond for CFG),
each holding the F frames of one clip in order. Every layer here takes the frame count explicitly
and mixes information only along the frame axis, at each spatial position (official
``video_diffusion/models/attention.py`` and ``resnet.py`` in github.com/ChenyangQiQi/FateZero at
9b6cb7b).

Parameter names match the official checkpoints once the per-block prefix is stripped, so a state
dict from ``checkpoint.split_tav_state_dict`` loads with ``load_state_dict(strict=True)``:

- ``TemporalAttention``: ``norm_temporal.{weight,bias}``, ``attn_temporal.{to_q,to_k,to_v}.weight``,
  ``attn_temporal.to_out.0.{weight,bias}``;
- ``TemporalConv``: ``conv_temporal.{weight,bias}`` (full Conv1d) or
  ``conv_temporal.{down,up}.weight`` (LoRA pair).

Weights are cast to the input's device and dtype on each call (a no-op when they already match), so
the layers stay correct when the host keeps them elsewhere; for speed the host should still place
them on the device the UNet runs on.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..errors import CheckpointError

# Sequences per scaled_dot_product_attention call. CUDA attention kernels put the batch on a grid
# axis limited to 65535 blocks; the frame axis is short, so splitting the batch costs nothing.
_MAX_SEQUENCES_PER_CALL = 32768


def _like(param: Optional[torch.Tensor], x: torch.Tensor) -> Optional[torch.Tensor]:
    """``param`` on ``x``'s device and dtype (the same tensor when it already is)."""
    if param is None:
        return None
    return param.to(device=x.device, dtype=x.dtype)


class _Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, _like(self.weight, x), _like(self.bias, x))


class _LayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, _like(self.weight, x), _like(self.bias, x), self.eps)


class _Conv1d(nn.Conv1d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv1d(x, _like(self.weight, x), _like(self.bias, x), self.stride, self.padding)


def _like_layout(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``out`` (a permuted view) copied into ``x``'s memory layout, so the layers after this one
    see the same strides as without it (kernels choose their algorithm from the layout, and sizes
    of 1 make a permuted view look channels-last)."""
    return torch.empty_like(x).copy_(out)


class FrameAttention(nn.Module):
    """Multi-head attention along the frame axis: ``(N, F, C) -> (N, F, C)``.

    The ``CrossAttention`` used as ``attn_temporal`` (``attn_temp`` in the official Tune-A-Video
    release) with ``bias=False`` for q/k/v and a biased output projection ``to_out[0]``
    (official ``SpatioTemporalTransformerBlock``, ``video_diffusion/models/attention.py``)."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = _Linear(dim, inner, bias=False)
        self.to_k = _Linear(dim, inner, bias=False)
        self.to_v = _Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([_Linear(inner, dim)])

    def _attend(self, h: torch.Tensor) -> torch.Tensor:
        q, k, v = (rearrange(p(h), "n f (h d) -> n h f d", h=self.heads)
                   for p in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v)
        return rearrange(out, "n h f d -> n f (h d)")

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        chunks = [self._attend(part) for part in h.split(_MAX_SEQUENCES_PER_CALL)]
        return self.to_out[0](torch.cat(chunks) if len(chunks) > 1 else chunks[0])


class TemporalAttention(nn.Module):
    """Residual temporal attention with a pre-LayerNorm, run after the feed-forward of a
    transformer block (official ``SpatioTemporalTransformerBlock.apply_temporal_attention``).

    ``x`` is ``(B*F, HW, C)``; each spatial token attends over the F frames of its own chunk:
    ``(B*F, HW, C) -> (B*HW, F, C)``, ``x + attn_temporal(norm_temporal(x))``, and back.

    A fresh module is an exact no-op: ``to_out[0]`` weight and bias are both zero. The official
    code zeroes only the weight and leaves the bias at its random default, so an official block
    built without loading weights adds a small constant; here that cannot happen.
    """

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.norm_temporal = _LayerNorm(dim)
        self.attn_temporal = FrameAttention(dim, heads, dim_head)
        self.init_identity()

    @torch.no_grad()
    def init_identity(self) -> None:
        """Unit LayerNorm, Xavier q/k/v, zero output projection: the block returns its input."""
        nn.init.ones_(self.norm_temporal.weight)
        nn.init.zeros_(self.norm_temporal.bias)
        for proj in (self.attn_temporal.to_q, self.attn_temporal.to_k, self.attn_temporal.to_v):
            nn.init.xavier_uniform_(proj.weight)
        nn.init.zeros_(self.attn_temporal.to_out[0].weight)
        nn.init.zeros_(self.attn_temporal.to_out[0].bias)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        tokens = x.shape[1]
        h = rearrange(x, "(b f) d c -> (b d) f c", f=num_frames)
        h = h + self.attn_temporal(self.norm_temporal(h))
        return _like_layout(rearrange(h, "(b d) f c -> (b f) d c", d=tokens), x)

    @classmethod
    def from_state_dict(cls, state_dict: Dict[str, torch.Tensor], heads: int = 8) -> "TemporalAttention":
        """Build a block sized from ``state_dict`` (normalised names) and load it strictly.

        SD1.x uses 8 heads at every level, so ``dim_head = inner_dim // 8``."""
        dim = state_dict["norm_temporal.weight"].shape[0]
        inner = state_dict["attn_temporal.to_q.weight"].shape[0]
        if inner % heads:
            raise CheckpointError(
                f"Temporal attention with inner width {inner} cannot be split into {heads} heads; "
                "set the head count to the one the checkpoint was trained with (8 for SD1.x)."
            )
        module = cls(dim, heads, inner // heads)
        module.load_state_dict(state_dict, strict=True)
        return module


def effective_lora_rank(channels: int, rank: int) -> int:
    """Rank actually used by FateZero's ``LoRALinearLayer``: a rank above the channel count
    becomes ``channels // 2`` (official ``LoRALinearLayer.__init__``,
    ``video_diffusion/models/lora.py``; conv_out: 4 -> 2)."""
    return channels // 2 if rank > channels else rank


class LoraFrameConv(nn.Module):
    """``x + up(down(x))`` with kernel-3 Conv1d over frames and no biases (FateZero ``lora: r``)."""

    def __init__(self, channels: int, rank: int):
        super().__init__()
        self.down = _Conv1d(channels, rank, 3, padding=1, bias=False)
        self.up = _Conv1d(rank, channels, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.down(x))


class TemporalConv(nn.Module):
    """The temporal half of FateZero's ``PseudoConv3d``, applied after the 2D conv.

    ``x`` is ``(B*F, C, H, W)``; at each pixel the C-channel signal over the F frames goes through
    ``conv_temporal`` (official ``PseudoConv3d.forward``, ``video_diffusion/models/resnet.py``):

    - full form (``lora_rank=None``): ``Conv1d(C, C, 3, padding=1)``; the output is ``conv(x)``
      with no residual, and the dirac/zero initialisation makes it the identity;
    - LoRA form: ``x + up(down(x))`` with ``up`` initialised to zero.
    """

    def __init__(self, channels: int, lora_rank: Optional[int] = None):
        super().__init__()
        self.channels = channels
        if lora_rank is None:
            self.form, self.rank = "full", None
            self.conv_temporal = _Conv1d(channels, channels, 3, padding=1)
        else:
            self.form, self.rank = "lora", effective_lora_rank(channels, lora_rank)
            self.conv_temporal = LoraFrameConv(channels, self.rank)
        self.init_identity()

    @torch.no_grad()
    def init_identity(self) -> None:
        """Dirac weight and zero bias (full), or N(0, 1/r) down and zero up (LoRA)."""
        if self.form == "full":
            nn.init.dirac_(self.conv_temporal.weight)
            nn.init.zeros_(self.conv_temporal.bias)
        else:
            nn.init.normal_(self.conv_temporal.down.weight, std=1.0 / self.rank)
            nn.init.zeros_(self.conv_temporal.up.weight)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        height, width = x.shape[-2:]
        h = rearrange(x, "(b f) c h w -> (b h w) c f", f=num_frames)
        h = self.conv_temporal(h)
        return _like_layout(rearrange(h, "(b h w) c f -> (b f) c h w", h=height, w=width), x)

    @classmethod
    def from_state_dict(cls, state_dict: Dict[str, torch.Tensor]) -> "TemporalConv":
        """Build a layer whose form and rank follow ``state_dict`` and load it strictly."""
        if "conv_temporal.weight" in state_dict:
            module = cls(state_dict["conv_temporal.weight"].shape[0])
        else:
            down = state_dict["conv_temporal.down.weight"]
            module = cls(down.shape[1], lora_rank=down.shape[0])
        module.load_state_dict(state_dict, strict=True)
        return module


class FramewiseTemporalConv(nn.Module):
    """A ``TemporalConv`` usable as one more layer of an ``nn.Sequential``: ``forward(x)``.

    ``frames(batch)`` gives the frame count for a batch of that size; the host supplies it (it knows
    how many chunks the batch holds). Returning ``None`` skips the temporal part, e.g. for a batch
    of still images."""

    def __init__(self, temporal_conv: TemporalConv, frames: Callable[[int], Optional[int]]):
        super().__init__()
        self.temporal = temporal_conv
        self.frames = frames

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        num_frames = self.frames(x.shape[0])
        if num_frames is None:
            return x
        return self.temporal(x, num_frames)


def temporal_module_from_state_dict(kind: str, state_dict: Dict[str, torch.Tensor], heads: int = 8) -> nn.Module:
    """The module for one ``checkpoint.temporal_targets`` entry, weights loaded strictly."""
    if kind == "attention":
        return TemporalAttention.from_state_dict(state_dict, heads=heads)
    if kind == "conv":
        return TemporalConv.from_state_dict(state_dict)
    raise ValueError(f"unknown temporal module kind {kind!r} (expected 'attention' or 'conv')")
