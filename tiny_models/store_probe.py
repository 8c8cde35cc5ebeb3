"""One synthetic SD1.x inversion step captured into a real ``AttentionStore``.

Random tensors of the real SD1.x attention shapes stand in for the UNet: what the store keeps
depends only on those shapes, so its accounting can be checked against the byte formulas of
``fatezero_core.memory`` without building a model (``benchmarks/store_memory.py`` and
``tests/test_memory.py``). Imports the top-level ``fatezero_core`` (the repository root on
``sys.path``), never ComfyUI.
"""

from __future__ import annotations

import gc
import time

import torch

from fatezero_core.controller import CaptureController
from fatezero_core.keyframes import parse_key_rule
from fatezero_core.layers import AttnCall
from fatezero_core.memory import sd1_layer_infos
from fatezero_core.store import AttentionStore, CaptureConfig

LATENT = 64  # 512 px


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
