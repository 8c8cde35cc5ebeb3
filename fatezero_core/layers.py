"""What the controller knows about one attention call, and which layers the store keeps.

The host describes each attention call with an :class:`AttnCall`. Layers are selected by their
resolution relative to the latent (design decision 5): the official code keeps the layers whose
query length is at most 32*32 = 1024 tokens, which at 512 px (64x64 latent) are the layers at 1/2,
1/4 and 1/8 of the latent side; the blend mask is made from the 1/4-resolution cross-attention
(reference doc sections 2 and 3.4).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import FateZeroError
from .frames import frames_per_chunk

CHUNK_KINDS = ("uncond", "cond", "source")

LAYER_SETS = ("relative", "relative+full", "official")
MASK_LEVEL = 2  # 1/4 of the latent side: the official 16x16 maps at 512 px


@dataclass(frozen=True)
class LayerInfo:
    """A hooked attention layer.

    ``name`` is a stable id (the host's block key, e.g. ``"input_4_0"``); ``height``/``width`` the
    token grid of this layer; ``latent_height``/``latent_width`` the UNet input size; ``channels``
    the block's inner width (for the ``least_sc_channel`` switch).
    """

    name: str
    height: int
    width: int
    latent_height: int
    latent_width: int
    heads: int
    channels: int

    @property
    def tokens(self) -> int:
        return self.height * self.width

    @property
    def level(self) -> int:
        """Downsampling level: 0 at full latent resolution, 1 at 1/2, 2 at 1/4, ...

        A stride-2 conv with padding 1 maps a side s to ceil(s/2), so level d has side
        ceil(latent / 2**d); this holds for any size that is a multiple of 8 pixels.
        """
        side, level = self.latent_height, 0
        while side > self.height and level < 16:
            side = -(-side // 2)
            level += 1
        if side != self.height:
            raise FateZeroError(
                f"Layer {self.name} has a {self.height}x{self.width} token grid that is not a "
                f"downsampling of the {self.latent_height}x{self.latent_width} latent."
            )
        return level


@dataclass(frozen=True)
class AttnCall:
    """One attention call as the host makes it.

    ``step`` is the index of the current step in the running sampler's own schedule (inversion:
    ascending, edit: descending). ``chunks`` names each equal slice of the batch in order:
    ``"uncond"`` and ``"cond"`` are CFG branches of the current latent, ``"source"`` is the
    regenerating source pass of the ``recompute`` store. Frames per chunk = batch / len(chunks).
    """

    layer: LayerInfo
    step: int
    chunks: tuple[str, ...]

    def frames(self, batch: int) -> int:
        return frames_per_chunk(batch, len(self.chunks))


@dataclass(frozen=True)
class LayerSet:
    """Which layers are stored and fused (design decision 5).

    - ``relative`` (default): layers at 1/2, 1/4 and 1/8 of the latent side; identical to the
      official choice at 512 px and well defined at any size.
    - ``relative+full``: also the full-resolution layers (more memory, beyond the official code).
    - ``official``: the official absolute rule, query length <= 1024 tokens.
    """

    rule: str = "relative"  # one of LAYER_SETS: the node's combo (the host refuses other values)

    def stores(self, layer: LayerInfo) -> bool:
        if self.rule == "official":
            return layer.tokens <= 1024
        level = layer.level
        return 1 <= level <= 3 or (self.rule == "relative+full" and level == 0)

    def is_mask_layer(self, layer: LayerInfo) -> bool:
        """Cross-attention layers the blend mask is made from (the 1/4-resolution ones)."""
        return layer.level == MASK_LEVEL and self.stores(layer)
