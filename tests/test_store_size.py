"""The store's size worked out before the inversion (``fatezero_core/store_size.py``) against the
bytes a real capture holds, and the refusal of a placement that cannot hold them.

The captures are real DDIM inversions of the tiny UNet (``tests/tiny_unet.py``) through the
capture controller into an ``AttentionStore``; ``AttentionStore.nbytes`` counts the tensors it
actually keeps, so estimate and capture must agree to the byte. The layer lists and byte counts
written out below are worked out by hand from the networks' layouts, not from the code under test.
"""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch

from ddim_reference import SIGMA_TABLE, eps_denoiser
from fatezero_core.controller import CaptureController
from fatezero_core.errors import StoreTooLargeError
from fatezero_core.keyframes import parse_key_rule
from fatezero_core.sampling import official_sigmas, sample_ddim_inversion, step_of_sigma
from fatezero_core.sd1 import sd1_attention_blocks
from fatezero_core.store import STORE_DTYPES, AttentionStore, CaptureConfig
from fatezero_core.store_size import (STORE_MEMORY_FRACTION, AttentionLayerShape, StoreEstimate,
                                      check_store_fits, estimate_store, unet_attention_layers)
from tiny_models.sd15 import SD15_UNET_CONFIG
from tiny_unet import LATENT, TinyTextEncoder, TinyUNet

# The tiny UNet's transformers in call order (TinyUNet.__init__): one per level on the way down
# (16x16: 32 channels, 8x8/4x4/2x2: 64), the middle, one per level on the way up; 2 heads each.
TINY_LAYERS = [AttentionLayerShape(level, 2, channels) for level, channels in
               [(0, 32), (1, 64), (2, 64), (3, 64), (2, 64), (1, 64), (0, 32)]]


@pytest.fixture(scope="module")
def model():
    return TinyUNet(seed=0).eval()


@pytest.fixture(scope="module")
def source(model):
    return TinyTextEncoder(seed=1).eval().encode("a cat sitting on a wooden table")


def tiny_capture(model, source, frames, steps, rule="mid", layer_set="relative", min_channels=64,
                 dtype="fp16", placement="cpu", disk_dir=None) -> AttentionStore:
    """FateZero DDIM Invert's calls on the tiny UNet: source prompt, cfg 1, capture controller."""
    sigmas = official_sigmas(SIGMA_TABLE, steps).flip(0)
    config = CaptureConfig(num_frames=frames, latent_size=(LATENT, LATENT), sigmas=tuple(sigmas.tolist()),
                           key_rule=parse_key_rule(rule), min_st_channels=min_channels, layer_set=layer_set)
    store = AttentionStore(config, placement=placement, dtype=dtype, disk_dir=disk_dir)
    context = source.expand(frames, -1, -1)

    def denoise(x, sigma, **extra):
        step = step_of_sigma(sigmas, sigma) - 1  # inversion step j runs at sigma j + 1
        return eps_denoiser(lambda z, t: model(z, t, context, step=step, chunks=("cond",)))(x, sigma)

    g = torch.Generator().manual_seed(frames)
    z0 = torch.randn(frames, 4, LATENT, LATENT, generator=g)
    latents = [z0]

    def on_step(j, z):
        store.end_step(j)
        latents.append(z)

    model.controller = CaptureController(store)
    try:
        with torch.no_grad():
            sample_ddim_inversion(denoise, z0, sigmas, on_step=on_step)
    finally:
        model.controller = None
    store.set_latents(latents)
    return store.finish()


def test_tiny_layer_list_is_the_tiny_unet(model):
    assert [(layer.level, layer.heads, layer.channels) for layer in model.layers()] == \
        [(s.level, s.heads, s.channels) for s in TINY_LAYERS]


@pytest.mark.parametrize("frames, steps, rule, layer_set, min_channels, dtype", [
    (3, 2, "mid", "relative", 64, "fp16"),
    (5, 2, "prev, first", "relative+full", 64, "fp32"),  # 16x16 layers per frame, the rest prev+first
    (4, 3, "prev, first", "official", 0, "bf16"),  # every layer spatio-temporal
    (1, 2, "self, mid", "relative", 64, "fp16"),
    (6, 1, "mid", "relative+full", 0, "fp16"),
])
def test_estimate_equals_the_bytes_a_real_capture_holds(model, source, frames, steps, rule, layer_set,
                                                        min_channels, dtype):
    store = tiny_capture(model, source, frames, steps, rule, layer_set, min_channels, dtype)
    estimate = estimate_store(TINY_LAYERS, store.config, STORE_DTYPES[dtype])
    assert estimate.nbytes == store.nbytes
    assert estimate.attention_per_step == store.nbytes_by_step()[0]
    assert estimate.latents == store.latent_nbytes
    store.release()


def test_estimate_worked_out_by_hand(model, source):
    """3 frames, 2 steps, ``mid``, fp16: the stored layers are 8x8, 4x4, 2x2, 4x4, 8x8 tokens of 64
    channels and 2 heads; each keeps q of 3 frames, k of 1 frame and probs ``[3, 2, n, 77]``."""
    per_layer = [2 * n * (3 * 64 + 1 * 64 + 3 * 2 * 77) for n in (64, 16, 4, 16, 64)]
    per_step = sum(per_layer)
    assert per_step == 235_504
    latent = 3 * 4 * 16 * 16 * 4
    store = tiny_capture(model, source, 3, 2)
    assert store.nbytes == 2 * per_step + 3 * latent == 507_872
    assert estimate_store(TINY_LAYERS, store.config, torch.float16).nbytes == 507_872


def _safetensors_data_bytes(path: str) -> int:
    """A safetensors file is an 8-byte little-endian header length, a JSON header, then the data."""
    with open(path, "rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
        json.loads(f.read(header_len))
    return os.path.getsize(path) - 8 - header_len


@pytest.mark.parametrize("placement", ["disk", "recompute"])
def test_estimate_of_disk_and_recompute(model, source, placement, tmp_path):
    store = tiny_capture(model, source, 4, 2, "prev, first", placement=placement, disk_dir=str(tmp_path))
    estimate = estimate_store(TINY_LAYERS, store.config, torch.float16)
    assert estimate.nbytes_for(placement) == store.nbytes
    if placement == "disk":
        assert sum(_safetensors_data_bytes(p) for p in store.files()) == estimate.attention
    else:
        assert store.nbytes == store.latent_nbytes == estimate.latents
    store.release()


# ------------------------------------------------------------------------- layers from the config
def test_sd15_config_gives_the_sd1_layout():
    """ComfyUI's SD1.5 UNet config against the diffusers layout (``fatezero_core/sd1.py``)."""
    layers = unet_attention_layers(SD15_UNET_CONFIG)
    assert [(s.level, s.heads, s.channels) for s in layers] == \
        [(b.level, 8, b.channels()) for b in sd1_attention_blocks()]


def test_sd2_config_heads_of_64_channels():
    config = dict(SD15_UNET_CONFIG, num_heads=-1, num_head_channels=64, context_dim=1024,
                  use_linear_in_transformer=True)
    layers = unet_attention_layers(config)
    widths = [320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320]
    assert [(s.heads, s.channels) for s in layers] == [(c // 64, c) for c in widths]


def test_sdxl_config_has_70_transformer_blocks():
    config = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
              "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
              "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
              "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
              "context_dim": 2048, "num_head_channels": 64,
              "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10]}
    layers = unet_attention_layers(config)
    expected = ([(1, 10, 640)] * 4 + [(2, 20, 1280)] * 20 + [(2, 20, 1280)] * 10
                + [(2, 20, 1280)] * 30 + [(1, 10, 640)] * 6)
    assert [(s.level, s.heads, s.channels) for s in layers] == expected


def test_sd15_at_512_px_matches_the_readme_table():
    """8 frames at 512 px, ``mid``, fp16, relative: 154 MB per step (README "Memory guidance").
    Stored at 64x64 latent: input 4,5 (32x32, 640), input 7,8 (16x16, 1280), middle (8x8, 1280),
    output 3,4,5 (16x16, 1280), output 6,7,8 (32x32, 640); 8 heads."""
    stored = [(1024, 640)] * 2 + [(256, 1280)] * 2 + [(64, 1280)] + [(256, 1280)] * 3 + [(1024, 640)] * 3
    for frames, rule, kept in [(8, "mid", 1), (8, "prev, first", 7), (64, "mid", 1)]:
        config = CaptureConfig(num_frames=frames, latent_size=(64, 64), sigmas=tuple(range(51)),
                               key_rule=parse_key_rule(rule), min_st_channels=640, layer_set="relative")
        estimate = estimate_store(unet_attention_layers(SD15_UNET_CONFIG), config, torch.float16)
        assert estimate.attention_per_step == \
            2 * sum(frames * n * c + kept * n * c + frames * 8 * n * 77 for n, c in stored)
        assert estimate.latents == 51 * frames * 4 * 64 * 64 * 4
    assert round(estimate_store(unet_attention_layers(SD15_UNET_CONFIG), CaptureConfig(
        num_frames=8, latent_size=(64, 64), sigmas=(0.0, 1.0), key_rule=("mid",), min_st_channels=640,
        layer_set="relative"), torch.float16).attention_per_step / 1e6) == 154


def test_non_square_size_grids():
    """96x160 px (12x20 latent): the UNet's stride-2 convs give 6x10, 3x5 and 2x3 grids."""
    config = CaptureConfig(num_frames=2, latent_size=(12, 20), sigmas=(0.0, 1.0), key_rule=("mid",),
                           min_st_channels=0, layer_set="relative")
    layers = unet_attention_layers(SD15_UNET_CONFIG)
    stored = [(60, 640)] * 2 + [(15, 1280)] * 2 + [(6, 1280)] + [(15, 1280)] * 3 + [(60, 640)] * 3
    expected = 4 * sum(2 * n * c + 1 * n * c + 2 * 8 * n * 77 for n, c in stored)  # fp32
    assert estimate_store(layers, config, torch.float32).attention_per_step == expected
    # 154 token slots: a two-chunk source prompt
    assert estimate_store(layers, config, torch.float32, context_tokens=154).attention_per_step == \
        expected + 4 * sum(2 * 8 * n * 77 for n, _ in stored)


# ---------------------------------------------------------------------------------- the refusal
ESTIMATE = StoreEstimate(steps=50, frames=240, latent_size=(64, 64), attention_per_step=4_000_000_000,
                         latent_per_step=240 * 4 * 64 * 64 * 4)
GB = 10**9


def test_cpu_store_refused_names_disk_and_recompute_with_their_sizes():
    with pytest.raises(StoreTooLargeError) as info:
        check_store_fits(ESTIMATE, "cpu", {"device": None, "ram": 64 * GB, "disk": 500 * GB},
                         disk_folder="/stores/x")
    message = str(info.value)
    assert "200.80 GB of RAM" in message  # 50 x 4 GB attention + 51 x 15.7 MB latents
    assert "64.00 GB is free" in message and "80%" in message
    assert "'disk' (200.00 GB of files in '/stores/x', 500.00 GB free there" in message
    assert "'recompute' (RAM: 802.2 MB, the inversion latents only" in message
    assert "not enough" not in message


def test_gpu_store_refused_offers_cpu_when_ram_has_room_and_says_disk_is_short():
    small = StoreEstimate(10, 16, (64, 64), 1_000_000_000, 16 * 4 * 64 * 64 * 4)
    with pytest.raises(StoreTooLargeError) as info:
        check_store_fits(small, "gpu", {"device": 8 * GB, "ram": 64 * GB, "disk": 5 * GB})
    message = str(info.value)
    assert "10.00 GB of memory on the model's device" in message
    assert "'cpu' (10.01 GB of RAM)" in message
    assert "5.00 GB free there: not enough" in message and "'recompute'" in message


def test_a_gpu_store_on_a_cpu_device_takes_ram():
    small = StoreEstimate(10, 16, (64, 64), 1_000_000_000, 16 * 4 * 64 * 64 * 4)
    check_store_fits(small, "gpu", {"device": None, "ram": 13 * GB}, device_is_ram=True)
    with pytest.raises(StoreTooLargeError, match="of RAM"):
        check_store_fits(small, "gpu", {"device": None, "ram": 12 * GB}, device_is_ram=True)


def test_disk_store_refused_names_recompute_only():
    with pytest.raises(StoreTooLargeError) as info:
        check_store_fits(ESTIMATE, "disk", {"ram": 64 * GB, "disk": 100 * GB}, disk_folder="/stores/x")
    message = str(info.value)
    assert "200.00 GB of disk space" in message and "'recompute'" in message
    assert "'disk' (" not in message


def test_the_margin_is_the_documented_fraction():
    need = ESTIMATE.nbytes
    free = int(need / STORE_MEMORY_FRACTION) + 2  # the store takes just under the fraction
    check_store_fits(ESTIMATE, "cpu", {"ram": free})
    with pytest.raises(StoreTooLargeError):
        check_store_fits(ESTIMATE, "cpu", {"ram": int(need / STORE_MEMORY_FRACTION) - 2})


def test_recompute_needs_only_the_latents_and_says_so_when_even_they_do_not_fit():
    check_store_fits(ESTIMATE, "recompute", {"device": 1, "ram": 2 * GB, "disk": 1})
    with pytest.raises(StoreTooLargeError, match="latents alone need 802.2 MB of RAM"):
        check_store_fits(ESTIMATE, "recompute", {"ram": 500_000_000})
