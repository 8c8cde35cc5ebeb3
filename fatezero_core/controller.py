"""Attention controllers: capture during inversion, fusion during editing (paper eqs. 4-8).

The host calls ``controller.attn1(q, k, v, call)`` for self-attention and ``controller.attn2`` for
cross-attention with projected, head-merged tensors ``[B, N, heads*dim_head]`` where the batch is
made of equal frame-major chunks named by ``call.chunks`` (ComfyUI: one chunk of F frames per
entry of ``cond_or_uncond``, as ``comfy/samplers.py`` ``_calc_cond_batch`` batches them; the
tensors are what ``comfy/ldm/modules/attention.py`` ``BasicTransformerBlock.forward`` hands an
attn1/attn2 replace patch). Both return the attention output before ``to_out``.

- :class:`CaptureController` (inversion): spatio-temporal self-attention; records source queries,
  key-frame keys and cross-attention probabilities of the ``cond`` chunk into the store.
- :class:`EditController` (editing): fuses the ``cond`` chunk only, as the official code does;
  ``uncond`` keeps its own attention (FateZero ``attention_store.py``, ``AttentionControl.__call__``
  passes only ``attn[h // 2:]``); ``source`` chunks (``recompute`` store) are captured into the
  store's scratch for the current step. Masks and maps derived from attention live in its
  :class:`fatezero_core.edit_maps.EditMaps`, which ``attn2`` feeds (``maps.observe_cross``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import (apply_probs, attention, attention_probs, blended_self_attention,
                        spatio_temporal_attention, unrepeated_tokens)
from .cross_fusion import fuse_cross_probs
from .edit_maps import EditMaps
from .ddim import inversion_step_for_edit_step
from .errors import FateZeroError
from .keyframes import (PER_FRAME_RULE, gather_key_frames, key_frame_table, key_frames_used, remap_table,
                        rule_for_channels)
from .layers import AttnCall, LayerInfo, LayerSet
from .store import AttentionStore
from .windows import SharedKeys, window_key_table


class _Controller:
    """Shared spatio-temporal bookkeeping and the capture of one source chunk.

    A call whose chunks hold a context window of the clip (``call.window``) attends to the clip's
    key frames through :attr:`shared_keys` (:mod:`.windows`), and reads and writes the store by
    clip frame."""

    def __init__(self, store: AttentionStore):
        self.store = store
        self.config = store.config
        self.layer_set = LayerSet(self.config.layer_set)
        self.shared_keys = SharedKeys()
        self._tables: dict[tuple, torch.Tensor] = {}
        self._used: dict[tuple, list[int]] = {}

    def _rule(self, layer: LayerInfo):
        return rule_for_channels(self.config.key_rule, layer.channels, self.config.min_st_channels)

    def _table(self, layer: LayerInfo, frames: int) -> torch.Tensor:
        key = (self._rule(layer), frames)
        if key not in self._tables:
            self._tables[key] = key_frame_table(key[0], frames)
        return self._tables[key]

    def _used_frames(self, layer: LayerInfo) -> list[int]:
        """Clip frames whose source keys the store keeps for ``layer`` (its ``k`` rows, in order)."""
        rule = self._rule(layer)
        if rule not in self._used:
            self._used[rule] = key_frames_used(key_frame_table(rule, self.config.num_frames)).tolist()
        return self._used[rule]

    def _keys(self, layer: LayerInfo, kind: str, call: AttnCall, k, v):
        """``(k, v, table, key_frames)``: keys and values holding every key frame of the chunk's
        frames, the ``[F, K]`` table into them, and (in a window) the clip frame each entry reads."""
        if call.window is None:
            return k, v, self._table(layer, k.shape[0]), None
        rule = self._rule(layer)
        if rule != PER_FRAME_RULE:
            self.shared_keys.keep(layer.name, kind, call.window, k, v)
        return window_key_table(rule, self.config.num_frames, call.window, self.shared_keys, layer.name,
                                kind, k, v)

    def _capture_self(self, step: int, layer: LayerInfo, q, k, table, window) -> None:
        if window is None:
            self.store.put(step, layer.name, "q", q)
            self.store.put(step, layer.name, "k", k.index_select(0, key_frames_used(table).to(k.device)))
            return
        frames = self.config.num_frames
        self.store.put(step, layer.name, "q", q, rows=window, total=frames)
        used = {f: row for row, f in enumerate(self._used_frames(layer))}
        picked = [(p, used[f]) for p, f in enumerate(window) if f in used]
        if picked:
            positions, rows = zip(*picked)
            self.store.put(step, layer.name, "k", k[list(positions)], rows=rows, total=len(used))

    def _capture_cross(self, step: int, layer: LayerInfo, probs, window) -> None:
        if window is None:
            self.store.put(step, layer.name, "probs", probs)
        else:
            self.store.put(step, layer.name, "probs", probs, rows=window, total=self.config.num_frames)

    def _cross_source(self, step, layer, q, k, v, capture: bool, window=None):
        if not self.layer_set.stores(layer):
            return attention(q, k, v, layer.heads)
        # Stored layers always go through the materialised probabilities, captured or not, so an
        # inversion's latents do not depend on the placement (``recompute`` captures nothing then).
        probs = attention_probs(q, k, layer.heads)
        if capture:
            self._capture_cross(step, layer, probs, window)
        return apply_probs(probs, v, layer.heads)

    def _self_source(self, step, layer, q, k, v, kind, call, capture: bool):
        k_all, v_all, table, _ = self._keys(layer, kind, call, k, v)
        if capture and self.layer_set.stores(layer):
            self._capture_self(step, layer, q, k, table if call.window is None else None, call.window)
        return spatio_temporal_attention(q, k_all, v_all, layer.heads, table)


def _chunks(call: AttnCall, *tensors):
    """Yield ``(kind, (t0[chunk], t1[chunk], ...))`` for every chunk of the batch."""
    frames = call.frames(tensors[0].shape[0])
    for c, kind in enumerate(call.chunks):
        sl = slice(c * frames, (c + 1) * frames)
        yield kind, tuple(t[sl] for t in tensors)


def _batched_chunks(call: AttnCall, q, k, v):
    """Cross-attention chunks: keys of a batch of 1 (shared prompt) broadcast to every chunk, and
    each chunk's prompt without the repetition padding of a batched call (``unrepeated_tokens``)."""
    if k.shape[0] != q.shape[0]:
        k = k.expand(q.shape[0], -1, -1)
        v = v.expand(q.shape[0], -1, -1)
    for kind, (qc, kc, vc) in _chunks(call, q, k, v):
        yield kind, (qc, *unrepeated_tokens(kc, vc))


class CaptureController(_Controller):
    """Inversion (eq. 4): spatio-temporal self-attention with capture of the ``cond`` chunk.

    ``call.step`` is the inversion step index ``j`` (ascending noise). With a ``recompute`` store
    only the layer manifest and latents are kept.
    """

    def attn1(self, q, k, v, call: AttnCall) -> torch.Tensor:
        layer = call.layer
        self.store.register_layer(layer, "self", self.layer_set.stores(layer))
        capture = self.store.keeps_attention
        outs = [self._self_source(call.step, layer, *t, kind, call, capture and kind == "cond")
                for kind, t in _chunks(call, q, k, v)]
        return torch.cat(outs)

    def attn2(self, q, k, v, call: AttnCall) -> torch.Tensor:
        layer = call.layer
        self.store.register_layer(layer, "cross", self.layer_set.stores(layer))
        capture = self.store.keeps_attention
        outs = [self._cross_source(call.step, layer, *t, capture and kind == "cond", call.window)
                for kind, t in _batched_chunks(call, q, k, v)]
        return torch.cat(outs)


@dataclass(frozen=True)
class EditSettings:
    """Everything the fusion needs besides the store (FateZero ``attention_util.py``,
    ``make_controller``: the replace/refine/reweight controller, its windows and blenders).

    ``mode``: ``"replace"`` or ``"refine"``; ``mapper``: ``[77, 77]`` float (replace) or ``[77]``
    long (refine); ``refine_alphas``: ``[77]`` (refine); ``equalizer``: ``[77]`` or None;
    ``cross_alphas``: ``[N+1, 77]``; ``self_window``: edit steps ``start <= i < end`` with self
    fusion. ``blend_tokens``: token positions of the blend words in the *source* prompt (None: no
    mask, i.e. full self-attention replacement); ``target_blend_tokens``: in the target prompt, for
    the local latent blend. ``fuse=False`` disables all fusion (plain spatio-temporal sampling).
    """

    mode: str
    mapper: torch.Tensor
    cross_alphas: torch.Tensor
    self_window: tuple[int, int]
    refine_alphas: torch.Tensor | None = None
    equalizer: torch.Tensor | None = None
    blend_tokens: tuple[int, ...] | None = None
    blend_threshold: float = 0.3
    soft_mask: bool = False
    target_blend_tokens: tuple[int, ...] | None = None
    latent_blend: bool = False
    latent_blend_window: tuple[float, float] = (0.2, 0.8)
    latent_blend_aligned: bool = False
    source_token_ids: tuple[int, ...] = ()
    target_token_ids: tuple[int, ...] = ()
    fuse: bool = True

    def __post_init__(self):
        if self.mode not in ("replace", "refine"):
            raise FateZeroError(f"Unknown edit mode '{self.mode}'; use replace or refine.")
        if self.mode == "refine" and self.refine_alphas is None:
            raise FateZeroError("Refine mode needs the refine alphas of the token alignment.")
        slots = self.mapper.shape[0]
        if len(self.source_token_ids) != slots or len(self.target_token_ids) != slots:
            raise FateZeroError(f"Edit settings need the {slots} token ids of both prompts.")

    @classmethod
    def from_alignment(cls, alignment, **options) -> "EditSettings":
        """Build from a :class:`fatezero_core.prompt_align.TokenAlignment`."""
        return cls(mode=alignment.mode, mapper=alignment.mapper, cross_alphas=alignment.cross_alphas,
                   self_window=tuple(alignment.self_window), refine_alphas=alignment.refine_alphas,
                   equalizer=alignment.equalizer, **options)


class SourcePassComplete(Exception):
    """The end of a ``recompute`` source pass, not an error: every stored layer of the step is
    captured, and the rest of the UNet call (the full-resolution decoder blocks) can change neither
    what the step keeps nor anything else, since the pass's output is never used.

    Raised only by an :class:`EditController` built with ``end_source_pass_after_last_stored_layer``,
    from the attention call of the step's last stored layer; whoever runs the source pass catches
    it (the host offers no other way to leave a UNet forward early). Skipping those blocks made a
    ``recompute`` edit step 1.48x a plain sampling step instead of 1.63x (``benchmarks/NOTES.md``).
    """


class EditController(_Controller):
    """Editing (eq. 5): fuse the stored source attention into the ``cond`` chunk.

    ``call.step`` is the edit step index ``i`` (descending noise); it reads inversion step
    ``j = N - 1 - i``, which ran the UNet at the same timestep (FateZero ``attention_util.py``,
    ``AttentionControlEdit.forward``: ``len(attention_store_all_step) - cur_step - 1``).

    ``end_source_pass_after_last_stored_layer``: a source-only pass (``recompute``) ends with
    :class:`SourcePassComplete` right after its last stored layer; the caller of that pass must
    catch it. Off, every pass runs whole.
    """

    def __init__(self, store: AttentionStore, settings: EditSettings, maps: EditMaps | None = None,
                 end_source_pass_after_last_stored_layer: bool = False):
        super().__init__(store)
        store.check_files()  # before the first step: a store whose files are gone stops here
        self.settings = settings
        self.num_steps = self.config.num_steps
        # Blend masks, preview map and latent-blend target map: fed from attn2, read by the
        # sampling loop and the preview.
        self.maps = maps if maps is not None else EditMaps(store, settings)
        self.end_source_pass_after_last_stored_layer = end_source_pass_after_last_stored_layer
        self._last_stored = store.last_stored_layer()

    def inversion_step(self, edit_step: int) -> int:
        return inversion_step_for_edit_step(edit_step, self.num_steps)

    def _self_fusion_on(self, i: int, layer: LayerInfo) -> bool:
        start, end = self.settings.self_window
        return self.settings.fuse and start <= i < end and self.layer_set.stores(layer)

    # ------------------------------------------------------------- attention
    def attn1(self, q, k, v, call: AttnCall) -> torch.Tensor:
        layer, i = call.layer, call.step
        j = self.inversion_step(i)
        outs = []
        for kind, (qc, kc, vc) in _chunks(call, q, k, v):
            if kind == "source":
                outs.append(self._self_source(j, layer, qc, kc, vc, kind, call, True))
                continue
            k_all, v_all, table, key_frames = self._keys(layer, kind, call, kc, vc)
            if kind == "cond" and self._self_fusion_on(i, layer):
                outs.append(self._fused_self(j, layer, qc, k_all, v_all, table, key_frames, call.window))
            else:
                outs.append(spatio_temporal_attention(qc, k_all, v_all, layer.heads, table))
        self._maybe_end_source_pass(call, "self")
        return torch.cat(outs)

    def _maybe_end_source_pass(self, call: AttnCall, kind: str) -> None:
        if (self.end_source_pass_after_last_stored_layer and (call.layer.name, kind) == self._last_stored
                and all(c == "source" for c in call.chunks)):
            raise SourcePassComplete(call.layer.name)

    def _fused_self(self, j, layer, q, k, v, table, key_frames, window):
        """Eq. 7 for one chunk: ``k``/``v`` hold every key frame, ``table`` indexes them; in a
        window, the source keys are read for the clip frames ``key_frames`` names."""
        if window is None:
            q_src = self.store.get(j, layer.name, "q", q.device, q.dtype)
            k_src = self.store.get(j, layer.name, "k", k.device, k.dtype)
            k_src_keys = gather_key_frames(k_src, remap_table(table, key_frames_used(table)))
        else:
            q_src = self.store.get(j, layer.name, "q", q.device, q.dtype, rows=window)
            row = {f: r for r, f in enumerate(self._used_frames(layer))}
            # A stand-in frame (windows not in frame order) may have no stored source keys: its
            # source side then reads the key frame the rule names, which the store always keeps.
            wanted = key_frame_table(self._rule(layer), self.config.num_frames, window).to(key_frames)
            stored = torch.tensor([[f in row for f in r] for r in key_frames.tolist()], dtype=torch.bool)
            key_frames = torch.where(stored.reshape(key_frames.shape), key_frames, wanted)
            frames = torch.unique(key_frames)
            k_src = self.store.get(j, layer.name, "k", k.device, k.dtype, rows=[row[f] for f in frames.tolist()])
            k_src_keys = gather_key_frames(k_src, remap_table(key_frames, frames))
        mask = self.maps.self_mask(j, layer, window)
        return blended_self_attention(q, gather_key_frames(k, table), gather_key_frames(v, table),
                                      q_src, k_src_keys, layer.heads, mask)

    def retain_for_window(self) -> None:
        """``recompute`` in context windows, before a window's source pass: keep only the
        regenerated source keys later windows read (the clip's shared and chained key frames) and,
        for the local latent blend, the blend mask layers' cross-attention of every frame."""
        plan = self.shared_keys.plan
        kept = plan.kept_frames() if plan is not None else frozenset()
        mask_layers = {info.name for info in self.store.layers("cross") if self.layer_set.is_mask_layer(info)} \
            if self.settings.latent_blend else set()
        used = {info.name: self._used_frames(info) for info in self.store.layers("self")}

        def keep(key: str, row: int) -> bool:
            layer, field = key.rsplit(".", 1)
            if field == "k":
                return used[layer][row] in kept
            return field == "probs" and layer in mask_layers

        self.store.retain_regenerated(keep)

    def attn2(self, q, k, v, call: AttnCall) -> torch.Tensor:
        layer, i = call.layer, call.step
        j = self.inversion_step(i)
        fuse = self.settings.fuse and self.layer_set.stores(layer)
        outs = []
        for kind, (qc, kc, vc) in _batched_chunks(call, q, k, v):
            if kind == "source":
                outs.append(self._cross_source(j, layer, qc, kc, vc, True, call.window))
            elif kind == "cond" and fuse:
                out, edit_probs = self._fused_cross(i, j, layer, qc, kc, vc, call.window)
                if not call.key_pass:  # the key frames come again in their windows
                    self.maps.observe_cross(i, j, layer, edit_probs, call.window)
                outs.append(out)
                del edit_probs  # held no longer than before: the next chunk's attention may be large
            else:
                outs.append(attention(qc, kc, vc, layer.heads))
        self._maybe_end_source_pass(call, "cross")
        return torch.cat(outs)

    def _fused_cross(self, i, j, layer, q, k, v, window=None):
        """Eq. 5 cross-attention output and the edit's own probabilities it fused."""
        s = self.settings
        edit = attention_probs(q, k, layer.heads)
        src = self.store.get(j, layer.name, "probs", q.device, edit.dtype, rows=window)
        if src.shape[-1] != edit.shape[-1]:
            raise FateZeroError(
                f"The positive conditioning has {edit.shape[-1]} token slots but the source prompt "
                f"{src.shape[-1]}: the target prompt must fit in 75 tokens, as the source does. "
                "Shorten the target prompt."
            )
        fused = fuse_cross_probs(edit, src, s.mode, s.mapper.to(q.device), _to(s.refine_alphas, q.device),
                                 _to(s.equalizer, q.device), s.cross_alphas[i].to(q.device))
        return apply_probs(fused, v, layer.heads), edit


def _to(t, device):
    return None if t is None else t.to(device)
