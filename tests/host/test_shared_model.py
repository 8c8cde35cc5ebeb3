"""One MODEL through FateZero edits, Tune-A-Video Train and a plain KSampler, in-process.

ComfyUI leaves the object patches of the last model clone it sampled applied to the network every
clone of a MODEL shares, until another clone loads (``comfy/model_patcher.py`` ``patch_model`` /
``unpatch_model``). A node that reads modules from that live network finds another run's
replacements; every node here must build on the MODEL it was given, and a plain sampler on the
MODEL must still run the plain network.
"""

from __future__ import annotations

import pytest
import torch

from test_invert_sample import empty, invert, moving_latent, sample, settings
from test_tav_train import PROMPT, video_latent, encode, run_train, unet_out

pytestmark = pytest.mark.usefixtures("host_inference_mode")

EDIT_FRAMES, EDIT_LATENT = 2, 8


def ksampler(model, positive, negative, latent):
    import nodes as core_nodes

    (out,) = core_nodes.KSampler().sample(model, 0, 3, 2.0, "euler", "normal", positive, negative,
                                          {"samples": latent.clone()}, denoise=1.0)
    return out["samples"]


def fatezero_edit(nodes, model, clip) -> None:
    """DDIM Invert + FateZero Sample on ``model`` with clip-level GroupNorm (the default): the
    sampled clone's GroupNorm containers stay applied to ``model``'s network afterwards."""
    source, target, spec = settings(nodes, clip, blend_words="cat")
    inverted, store = invert(nodes, model, source, moving_latent(EDIT_FRAMES, size=EDIT_LATENT), steps=2)
    sample(nodes, model, target, empty(clip), inverted, store, spec, cfg=2.0)


def test_a_plain_ksampler_after_an_edit_and_a_training_gives_its_own_result(nodes, tiny_sd15, tiny_clip):
    positive, negative = encode(tiny_clip, PROMPT), empty(tiny_clip)
    latent = torch.randn(2, 4, EDIT_LATENT, EDIT_LATENT, generator=torch.Generator().manual_seed(1))
    reference = ksampler(tiny_sd15, positive, negative, latent)
    fatezero_edit(nodes, tiny_sd15, tiny_clip)
    assert torch.equal(ksampler(tiny_sd15, positive, negative, latent), reference)
    run_train(nodes.tav_train, tiny_sd15, positive, steps=1)  # leaves Tune-A-Video containers
    assert torch.equal(ksampler(tiny_sd15, positive, negative, latent), reference)


def test_training_after_an_edit_trains_the_network_a_fresh_model_trains(nodes, tiny_sd15, tiny_clip):
    """Tune-A-Video Train on a MODEL whose network still holds an edit's GroupNorm containers tunes
    exactly what it tunes on a fresh copy of that MODEL: the same tuned network, bit for bit."""
    import tiny_models

    source = encode(tiny_clip, PROMPT)
    fatezero_edit(nodes, tiny_sd15, tiny_clip)
    after_edit, _ = run_train(nodes.tav_train, tiny_sd15, source, steps=2).args
    fresh, _ = run_train(nodes.tav_train, tiny_models.build_tiny_sd15(), source, steps=2).args
    x = video_latent()
    for sigma in (0.5, 8.0):
        assert torch.equal(unet_out(after_edit, x, sigma, source), unet_out(fresh, x, sigma, source))
