"""ControlNet conditioning composes with FateZero (real ComfyUI host, tiny models, CPU).

A tiny ControlNet is built the way ``comfy.controlnet.load_controlnet_state_dict`` builds one for
an SD1.x checkpoint (``comfy.cldm.cldm.ControlNet`` from the UNet config, wrapped in
``comfy.controlnet.ControlNet``), with every parameter seeded, and applied with core
``ControlNetApplyAdvanced``. The zero convolutions of a real, untrained ControlNet start at zero;
here they are random like everything else, so the control visibly changes the UNet's output.
"""

from __future__ import annotations

import pytest
import torch

from test_invert_sample import FRAMES, LATENT, empty, invert, moving_latent, sample, settings

pytestmark = pytest.mark.usefixtures("host_inference_mode")

CONTROLNET_SEED = 7
STEPS = 5  # few steps: every UNet call also runs the ControlNet


def build_tiny_controlnet(seed: int = CONTROLNET_SEED):
    """A ``comfy.controlnet.ControlNet`` matching the tiny SD1.5 UNet (model_channels 32), on CPU."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops
    import tiny_models

    config = tiny_models.sd15_unet_config()
    config.pop("out_channels")  # as load_controlnet_state_dict does
    cpu = torch.device("cpu")
    control_model = comfy.cldm.cldm.ControlNet(
        hint_channels=3, dtype=torch.float32, device=cpu,
        operations=comfy.ops.disable_weight_init, **config)
    tiny_models.init_parameters_(control_model, seed)
    zero_convs = [m for m in control_model.zero_convs] + [control_model.middle_block_out]
    assert all(float(conv[0].weight.abs().sum()) > 0 for conv in zero_convs)
    control_model.eval()
    return comfy.controlnet.ControlNet(control_model, load_device=cpu, manual_cast_dtype=None)


def hint_frames(frames: int = FRAMES, size: int = LATENT * 8, seed: int = 11) -> torch.Tensor:
    """IMAGE batch ``[F, H, W, 3]`` in 0..1 at the frames' pixel size, one hint per frame."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(frames, size, size, 3, generator=g)


def apply_controlnet(positive, negative, control_net, strength=1.0):
    import nodes as core_nodes

    return core_nodes.ControlNetApplyAdvanced().apply_controlnet(
        positive, negative, control_net, hint_frames(), strength, 0.0, 1.0, vae=None)


def mean_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().mean())


def test_controlnet_conditioned_edit_runs_and_differs(nodes, tiny_sd15, tiny_clip):
    latent = moving_latent()
    src, tgt, spec = settings(nodes, tiny_clip, blend_words="cat")
    neg = empty(tiny_clip)
    inverted, store = invert(nodes, tiny_sd15, src, latent, steps=STEPS)
    plain, _ = sample(nodes, tiny_sd15, tgt, neg, inverted, store, spec, cfg=7.5)

    pos_cn, neg_cn = apply_controlnet(tgt, neg, build_tiny_controlnet())
    assert "control" in pos_cn[0][1] and "control" not in tgt[0][1]
    controlled, preview = sample(nodes, tiny_sd15, pos_cn, neg_cn, inverted, store, spec, cfg=7.5)

    out = controlled["samples"]
    assert out.shape == plain["samples"].shape == latent.shape
    assert torch.isfinite(out).all() and torch.isfinite(preview).all()
    diff = mean_abs(out, plain["samples"])
    assert diff > 0.05 * float(plain["samples"].abs().mean()), diff


def test_controlnet_on_source_is_replayed_by_recompute(nodes, tiny_sd15, tiny_clip):
    """ControlNet on the source conditioning acts during inversion, and a ``recompute`` store
    replays it: its edit equals the edit from a ``cpu`` store that captured the attention.
    (cfg 1 keeps the UNet batch small; the replay does not depend on the guidance.)"""
    latent = moving_latent()
    src, tgt, spec = settings(nodes, tiny_clip, blend_words="cat")
    neg = empty(tiny_clip)
    src_cn, _ = apply_controlnet(src, neg, build_tiny_controlnet())

    inv_plain, _ = invert(nodes, tiny_sd15, src, latent, steps=STEPS)
    inv_cpu, store_cpu = invert(nodes, tiny_sd15, src_cn, latent, steps=STEPS)
    inv_re, store_re = invert(nodes, tiny_sd15, src_cn, latent, steps=STEPS,
                              store_placement="recompute")
    assert torch.isfinite(inv_cpu["samples"]).all()
    assert torch.equal(inv_cpu["samples"], inv_re["samples"])
    assert mean_abs(inv_cpu["samples"], inv_plain["samples"]) > 1e-3  # the control acted

    out_cpu, prev_cpu = sample(nodes, tiny_sd15, tgt, neg, inv_cpu, store_cpu, spec, cfg=1.0)
    out_re, prev_re = sample(nodes, tiny_sd15, tgt, neg, inv_re, store_re, spec, cfg=1.0)
    assert torch.isfinite(out_re["samples"]).all()
    err = float((out_cpu["samples"] - out_re["samples"]).abs().max())
    assert err <= 1e-4, err
    assert torch.equal(prev_cpu, prev_re)

    # Sensitivity: replaying the source *without* the ControlNet gives another edit.
    store_re.record.source_conditioning = src
    out_dropped, _ = sample(nodes, tiny_sd15, tgt, neg, inv_re, store_re, spec, cfg=1.0)
    assert float((out_dropped["samples"] - out_cpu["samples"]).abs().max()) > 100 * max(err, 1e-6)
