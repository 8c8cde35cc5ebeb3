"""The maps an edit derives from attention: blend masks, the preview map, the latent-blend target.

:class:`EditMaps` owns everything the edit computes *from* attention rather than *as* attention
(paper eqs. 6-7; FateZero ``video_diffusion/prompt_attention/spatial_blend.py``, ``SpatialBlender``,
and ``attention_util.py``, ``AttentionControlEdit.step_callback``):

- the eq. 6 self-attention blend masks, built from the stored source cross-attention of the blend
  words and cached for one inversion step;
- the preview map: the source attention of the shown words at the first fused step;
- the local latent blend's target-word map, a running sum over edit steps of the edit's own
  cross-attention of the target blend words, and the latent-blend mask built from both.

The edit controller feeds it through one call, :meth:`EditMaps.observe_cross`, with the ``cond``
chunk's cross-attention probabilities of every fused layer; the sampling loop
(``fatezero_core.sampling.latent_blend_step``) and :func:`preview_image` read from it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from . import blend_mask as bm
from .ddim import inversion_step_for_edit_step
from .errors import FateZeroError
from .layers import VAE_SCALE, LayerInfo, LayerSet
from .store import AttentionStore


class EditMaps:
    """Masks and maps of one edit, from ``store`` (source attention) and the edit's settings.

    ``settings`` is the :class:`fatezero_core.controller.EditSettings` of the edit; edit step ``i``
    reads inversion step ``j = N - 1 - i`` (official ``AttentionControlEdit.forward``:
    ``len(attention_store_all_step) - cur_step - 1``).
    """

    def __init__(self, store: AttentionStore, settings):
        self.store = store
        self.settings = settings
        self.layer_set = LayerSet(store.config.layer_set)
        self.num_steps = store.config.num_steps
        self.num_frames = store.config.num_frames
        self._masks: dict[tuple, torch.Tensor] = {}
        self.target_map: torch.Tensor | None = None
        self._target_map_parts: dict[tuple[int, str], set[int]] = {}  # (step, layer): frames summed
        self.preview_map: torch.Tensor | None = None  # source word attention at the first edit step
        self._preview_step: int | None = None
        self._preview_frames: set[int] = set()

    def observe_cross(self, i: int, j: int, layer: LayerInfo, edit_probs: torch.Tensor,
                      frames: Sequence[int] | None = None) -> None:
        """Take the ``cond`` chunk's fused-layer cross-attention ``[F, H, h*w, T]`` of edit step i
        (inversion step j): the mask layers add to the target map and fix the preview map.
        ``frames``: the clip frames of the chunk's rows in a context window (None: all, in order)."""
        if not self.layer_set.is_mask_layer(layer):
            return
        frames = tuple(range(self.num_frames)) if frames is None else tuple(frames)
        if self.settings.latent_blend:
            self._accumulate_target_map(i, layer, edit_probs, frames)
        self._fill_preview(i, j, frames)

    def _fill_preview(self, i: int, j: int, frames: tuple[int, ...]) -> None:
        """The preview map is the source word attention at the first fused step, filled window by
        window when the clip runs in context windows."""
        if self._preview_step is None:
            self._preview_step = i
        missing = [f for f in frames if f not in self._preview_frames]
        if i != self._preview_step or not missing:
            return
        word_map, _ = self.source_word_map(j, self.preview_tokens(), missing)
        if self.preview_map is None:
            self.preview_map = torch.zeros(self.num_frames, *word_map.shape[1:], dtype=word_map.dtype)
        self.preview_map[torch.as_tensor(missing)] = word_map.to(self.preview_map)
        self._preview_frames.update(missing)

    # ------------------------------------------------------------------ masks
    def preview_tokens(self) -> tuple[int, ...]:
        """Tokens shown in previews: the blend words, else the source tokens the edit changes.

        A source token is changed when a target token it maps to has another id (replace: along
        the mapper, so equal token counts, where the mapper is the identity, still show the swapped
        word; refine: it is not aligned with any kept target token)."""
        s = self.settings
        if s.blend_tokens:
            return s.blend_tokens
        if s.mode == "replace":
            src, tgt = s.source_token_ids, s.target_token_ids
            changed = [t for t in range(1, s.mapper.shape[0])
                       if any(src[t] != tgt[n] for n in torch.nonzero(s.mapper[t]).flatten().tolist())]
        else:
            kept = {int(m) for m, a in zip(s.mapper.tolist(), s.refine_alphas.tolist()) if a == 1}
            changed = [t for t in range(1, s.mapper.numel()) if t not in kept]
        return tuple(changed[:8]) or (1,)

    def _mask_layers(self) -> list[LayerInfo]:
        layers = [info for info in self.store.layers("cross") if self.layer_set.is_mask_layer(info)]
        if not layers:
            raise FateZeroError(
                "Blend words need the source cross-attention at 1/4 of the latent size, which this "
                "store does not hold (frames too small, or layer set 'official' at a large size): "
                "use the 'relative' layer set or frames of at least 64 px."
            )
        return layers

    def source_word_map(self, j: int, tokens, frames: Sequence[int] | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
        """``[F, h, w]`` source attention of ``tokens`` at the mask layers, inversion step j (of
        the clip frames ``frames`` only, when given)."""
        layers = self._mask_layers()
        probs = [self.store.get(j, info.name, "probs", dtype=torch.float32, rows=frames) for info in layers]
        size = (layers[0].height, layers[0].width)
        return bm.word_attention_map(probs, tokens, size), size

    def self_mask(self, j: int, layer: LayerInfo, frames: Sequence[int] | None = None) -> torch.Tensor | None:
        """Eq. 6 mask for one layer's query rows (``[F, h*w]``; the rows of clip frames ``frames``
        when given: every step of the mask is per frame), or None for full replacement."""
        s = self.settings
        if not s.blend_tokens:
            return None
        key = (j, layer.height, layer.width, None if frames is None else tuple(frames))
        if key not in self._masks:
            if self._masks and next(iter(self._masks))[0] != j:
                self._masks.clear()  # keep one step of masks
            word_map, _ = self.source_word_map(j, s.blend_tokens, frames)
            self._masks[key] = bm.blend_mask(word_map, (layer.height, layer.width), s.blend_threshold, s.soft_mask)
        return self._masks[key]

    # ------------------------------------------------------ local latent blend
    def _accumulate_target_map(self, i, layer, edit_probs, frames: tuple[int, ...]):
        """Running sum over steps of the edit's own target-word attention (official
        ``AttentionStore.between_steps``' ``attention_store``, read by ``step_callback``).

        The official mask takes the layer mean of per-layer sums over steps; summing each layer's
        map divided by the number of mask layers is the same quantity. Each (step, layer, frame)
        counts once, however often the sampler evaluates the conditional branch in that step
        (midpoint samplers, several positive conds) and however many context windows hold the frame.
        """
        tokens = self.settings.target_blend_tokens
        seen = self._target_map_parts.setdefault((i, layer.name), set())
        rows = [p for p, f in enumerate(frames) if f not in seen]
        if not tokens or not rows:
            return
        seen.update(frames[p] for p in rows)
        word = bm.word_attention_map([edit_probs[rows]], tokens, (layer.height, layer.width))
        if self.target_map is None:
            self.target_map = torch.zeros(self.num_frames, *word.shape[1:], dtype=word.dtype, device=word.device)
        at = torch.as_tensor([frames[p] for p in rows], device=word.device)
        self.target_map[at] += word / len(self._mask_layers())

    def latent_blend_active(self, i: int) -> bool:
        """Official window: ``int(a N) < i + 1 < int(b N)`` (N=50: steps 10..38)."""
        a, b = self.settings.latent_blend_window
        n = self.num_steps
        return self.settings.latent_blend and int(a * n) < i + 1 < int(b * n)

    def latent_blend_source_index(self, i: int) -> int:
        """Inversion latent mixed in after edit step i.

        Parity (default): ``z_{N-i}``, one step noisier than the edit latent, as the official code
        does; aligned: ``z_{N-1-i}``, the same noise level.
        """
        j = inversion_step_for_edit_step(i, self.num_steps)
        return j if self.settings.latent_blend_aligned else j + 1

    def latent_blend_mask(self, i: int, latent_size) -> torch.Tensor | None:
        """``[F, 1, h, w]`` union of the source- and target-word masks, or None when inactive."""
        if not self.latent_blend_active(i):
            return None
        s = self.settings
        word_map, _ = self.source_word_map(inversion_step_for_edit_step(i, self.num_steps), s.blend_tokens)
        mask = bm.blend_mask(word_map, latent_size, s.blend_threshold, s.soft_mask)
        if s.target_blend_tokens and self.target_map is not None:
            target = bm.blend_mask(self.target_map, latent_size, s.blend_threshold, s.soft_mask)
            mask = bm.union(mask, target)
        return mask.view(mask.shape[0], 1, *latent_size)


def latent_blend(z: torch.Tensor, z_src: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Local latent blend: ``z_src + M (z - z_src)``: outside the mask the source latent is kept."""
    return z_src + mask.to(z.dtype) * (z - z_src)


def preview_image(maps: EditMaps | None, frames: int, latent_size) -> torch.Tensor:
    """``[F, 8h, 16w, 3]`` grey image of the preview map, at the pixel size of the decoded frames.

    Left half: the blend mask at latent size (white = edited; black without blend words); right
    half: the preview words' source attention divided by each frame's maximum, nearest-resized to
    the latent size. Each latent cell becomes an 8x8 block. All black without a preview map
    (no fusion, or no fused mask layer ran).
    """
    h, w = latent_size
    if maps is None or maps.preview_map is None:
        return torch.zeros(frames, h * VAE_SCALE, w * 2 * VAE_SCALE, 3)
    word_map = maps.preview_map
    s = maps.settings
    mask = (bm.blend_mask(word_map, (h, w), s.blend_threshold, s.soft_mask).view(frames, 1, h, w)
            if s.blend_tokens else torch.zeros(frames, 1, h, w))
    heat = F.interpolate(bm.normalise_per_frame(word_map).unsqueeze(1), size=(h, w), mode="nearest")
    pair = torch.cat([mask, heat], dim=-1).float().cpu()
    big = F.interpolate(pair, scale_factor=VAE_SCALE, mode="nearest")
    return big.squeeze(1).unsqueeze(-1).expand(-1, -1, -1, 3).contiguous()


__all__ = ["EditMaps", "latent_blend", "preview_image"]
