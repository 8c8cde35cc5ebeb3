"""What the controller knows about one attention call, and which layers the store keeps.

The host describes each attention call with an :class:`AttnCall`. Layers are selected by their
resolution relative to the latent: the official code keeps the layers whose query length is at
most 32*32 = 1024 tokens (FateZero ``video_diffusion/prompt_attention/attention_store.py``,
``AttentionStore.forward``: ``attn.shape[-2] <= 32 ** 2``), which at 512 px (64x64 latent) are the
layers at 1/2, 1/4 and 1/8 of the latent side; its blend mask is made from the 1/4-resolution
cross-attention (``spatial_blend.py``, ``SpatialBlender.__call__``: ``down_cross[2:4] +
up_cross[:3]``, the 16x16 maps at 512 px). The relative rule picks the same layers at 512 px and
is defined at every size.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import FateZeroError
from .frames import frames_per_chunk

CHUNK_KINDS = ("uncond", "cond", "source")

LAYER_SETS = ("relative", "relative+full", "official")
MASK_LEVEL = 2  # 1/4 of the latent side: the official 16x16 maps at 512 px
VAE_SCALE = 8  # SD1 VAE: one latent cell is 8x8 pixels
MAX_LEVEL = 16


def downsampled_side(side: int, level: int) -> int:
    """A latent side after ``level`` UNet downsamplings: a stride-2 conv with padding 1 maps a
    side s to ceil(s / 2), so this holds for any size that is a multiple of 8 pixels."""
    for _ in range(level):
        side = -(-side // 2)
    return side


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
        """Downsampling level: 0 at full latent resolution, 1 at 1/2, 2 at 1/4, ...: the level
        whose :func:`downsampled_side` of the latent height is this layer's grid height."""
        level = 0
        while downsampled_side(self.latent_height, level) > self.height and level < MAX_LEVEL:
            level += 1
        if downsampled_side(self.latent_height, level) != self.height:
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

    ``window``: the clip frames each chunk holds, when the host runs the clip in context windows
    (None: the whole clip, in order); ``key_pass``: the call belongs to the pass over the clip's
    shared key frames that precedes the windows (:mod:`fatezero_core.windows`).
    """

    layer: LayerInfo
    step: int
    chunks: tuple[str, ...]
    window: tuple[int, ...] | None = None
    key_pass: bool = False

    def frames(self, batch: int) -> int:
        return frames_per_chunk(batch, len(self.chunks))


@dataclass(frozen=True)
class LayerSet:
    """Which layers are stored and fused.

    - ``relative`` (default): layers at 1/2, 1/4 and 1/8 of the latent side; identical to the
      official choice at 512 px and well defined at any size.
    - ``relative+full``: also the full-resolution layers (more memory, beyond the official code).
    - ``official``: the official absolute rule, query length <= 1024 tokens (``AttentionStore.forward``).
    """

    rule: str = "relative"  # one of LAYER_SETS: the node's combo (the host refuses other values)

    def stores(self, layer: LayerInfo) -> bool:
        if self.rule == "official":
            return layer.tokens <= 1024
        level = layer.level
        return 1 <= level <= 3 or (self.rule == "relative+full" and level == 0)

    def is_mask_layer(self, layer: LayerInfo) -> bool:
        """Stored cross-attention layers the blend masks are made from: the 1/4-resolution ones
        (:class:`fatezero_core.edit_maps.EditMaps`)."""
        return layer.level == MASK_LEVEL and self.stores(layer)
