"""The Stable Diffusion 1.x UNet layout, in diffusers names (the ``UNet2DConditionModel`` config of
SD1.4/SD1.5: ``block_out_channels`` (320, 640, 1280, 1280), ``layers_per_block`` 2, cross-attention
down blocks 0-2 and up blocks 1-3, 8 heads).

One definition for everything that needs the layout: Tune-A-Video checkpoints (which blocks carry
temporal layers) and the SD1.x attention shapes the store benchmarks and tests use
(``tiny_models/store_probe.py``).
"""

from __future__ import annotations

from typing import List, NamedTuple

MODEL_CHANNELS = 320
CHANNEL_MULT = (1, 2, 4, 4)
LAYERS_PER_BLOCK = 2
DOWN_LEVELS_WITH_ATTENTION = (0, 1, 2)
UP_LEVELS_WITH_ATTENTION = (1, 2, 3)
HEADS = 8


class AttentionBlock(NamedTuple):
    """One of the 16 transformer blocks: ``path`` its diffusers module path, ``level`` its
    downsampling level (0: full latent resolution, 3: the middle block), ``channel_mult`` its width
    in units of ``model_channels``."""

    path: str
    level: int
    channel_mult: int

    def channels(self, model_channels: int = MODEL_CHANNELS) -> int:
        return model_channels * self.channel_mult


def _block(owner: str, level: int) -> AttentionBlock:
    return AttentionBlock(f"{owner}.transformer_blocks.0", level, CHANNEL_MULT[level])


def sd1_attention_blocks() -> List[AttentionBlock]:
    """The 16 transformer blocks in call order: down blocks, middle, up blocks (up level ``i``
    runs at downsampling level ``3 - i``)."""
    last = len(CHANNEL_MULT) - 1
    down = [_block(f"down_blocks.{i}.attentions.{j}", i)
            for i in DOWN_LEVELS_WITH_ATTENTION for j in range(LAYERS_PER_BLOCK)]
    up = [_block(f"up_blocks.{i}.attentions.{j}", last - i)
          for i in UP_LEVELS_WITH_ATTENTION for j in range(LAYERS_PER_BLOCK + 1)]
    return down + [_block("mid_block.attentions.0", last)] + up


def sd1_transformer_blocks() -> List[str]:
    """The 16 diffusers transformer-block paths, in call order."""
    return [block.path for block in sd1_attention_blocks()]
