"""The SD1.x UNet's attention layers as the host describes them, and one synthetic inversion step
captured into a real ``AttentionStore``.

Random tensors of the real SD1.x attention shapes stand in for the UNet: what the store keeps
depends only on those shapes, so its accounting can be checked against byte counts worked out from
the shapes without building a model (``benchmarks/store_memory.py`` and ``tests/test_memory.py``).
Imports the top-level ``fatezero_core`` (the repository root on ``sys.path``), never ComfyUI.
"""

from __future__ import annotations

import gc
import time

import torch

from fatezero_core.controller import CaptureController
from fatezero_core.keyframes import parse_key_rule
from fatezero_core.layers import AttnCall, LayerInfo, LayerSet, downsampled_side
from fatezero_core.sd1 import HEADS, sd1_attention_blocks
from fatezero_core.store import AttentionStore, CaptureConfig

LATENT = 64  # 512 px


def sd1_layer_infos(latent_side: int | tuple[int, int] = LATENT) -> list[LayerInfo]:
    """The 16 SD1.x attention layers (named by diffusers block path; token grids, 8 heads,
    channels) in call order, for a latent of ``latent_side``."""
    lh, lw = (latent_side, latent_side) if isinstance(latent_side, int) else latent_side
    return [LayerInfo(block.path, downsampled_side(lh, block.level), downsampled_side(lw, block.level),
                      lh, lw, HEADS, block.channels())
            for block in sd1_attention_blocks()]


def sd1_stored_layers(latent_side: int | tuple[int, int] = LATENT,
                      layer_set: str = "relative") -> list[tuple[int, int, int]]:
    """``(q, C, heads)`` of the SD1.x layers the store keeps under ``layer_set``, in call order
    (:class:`fatezero_core.layers.LayerSet`'s own rule)."""
    rule = LayerSet(layer_set)
    return [(info.tokens, info.channels, info.heads)
            for info in sd1_layer_infos(latent_side) if rule.stores(info)]


def measure_one_step(rule: str, frames: int = 8) -> dict:
    """Capture one synthetic step of real SD1.x shapes at 512 px and read the store's accounting.

    Full-resolution layers (4096 tokens) are not stored under ``relative``; they are skipped
    because their self-attention is the slow part of a CPU pass and adds nothing to the store.
    """
    config = CaptureConfig(num_frames=frames, latent_size=(LATENT, LATENT), sigmas=(0.0, 1.0),
                           key_rule=parse_key_rule(rule), min_st_channels=640, layer_set="relative")
    store = AttentionStore(config, placement="cpu", dtype="fp16")
    controller = CaptureController(store)
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    with torch.no_grad():
        for layer in sd1_layer_infos(LATENT):
            if layer.level == 0:
                continue
            call = AttnCall(layer, 0, ("cond",))
            shape = (frames, layer.tokens, layer.channels)
            controller.attn1(*(torch.randn(shape, generator=g) for _ in range(3)), call)
            ctx = torch.randn(1, 77, layer.channels, generator=g)
            controller.attn2(torch.randn(shape, generator=g), ctx, ctx, call)
    store.end_step(0)
    store.set_latents([torch.randn(frames, 4, LATENT, LATENT, generator=g) for _ in range(2)])
    store.finish()
    result = dict(rule=rule, frames=frames, steps_captured=1,
                  attention_bytes=store.nbytes_by_step()[0],
                  latent_bytes_per_step=store.latent_nbytes // 2,
                  layers=len(store.nbytes_by_layer()), seconds=time.perf_counter() - start)
    store.release()
    del store, controller
    gc.collect()
    return result
