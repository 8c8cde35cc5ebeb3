"""DDIM Invert sizes its attention store before it runs (real ComfyUI host, tiny SD1.5 model).

The estimate DDIM Invert makes from the model's UNet config must equal ``store.nbytes`` of the
store the same node run then captures; with little free memory a ``cpu`` or ``gpu`` store is
refused before the UNet runs once, with a message naming ``disk`` and ``recompute``, which still
run under the same limit.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.usefixtures("host_inference_mode")

SOURCE = "a cat sitting on a wooden table"


def encode(clip, text):
    import nodes as core_nodes

    return core_nodes.CLIPTextEncode().encode(clip, text)[0]


def frames_latent(frames, height, width, seed=0):
    return torch.randn(frames, 4, height, width, generator=torch.Generator().manual_seed(seed))


def counting(model, calls: list):
    """A clone whose every UNet evaluation is counted (``model_function_wrapper``, as
    ``comfy/samplers.py`` ``_calc_cond_batch`` calls it)."""
    clone = model.clone()

    def wrapper(apply_model, args):
        calls.append(args["input"].shape[0])
        return apply_model(args["input"], args["timestep"], **args["c"])

    clone.set_model_unet_function_wrapper(wrapper)
    return clone


def invert(nodes, model, source, latent, **kw):
    args = dict(steps=3, key_frames="mid", st_min_channels=0, store_placement="cpu",
                store_dtype="fp16", layer_set="relative", schedule_end="comfy")
    args.update(kw)
    out = nodes.invert.FateZeroDDIMInvert.execute(model=model, source=source,
                                                  latent={"samples": latent}, **args)
    return out.args  # (inverted latent dict, store)


@pytest.mark.parametrize("frames, size, kw", [
    (4, (16, 16), dict()),
    (3, (12, 20), dict(key_frames="prev, first", layer_set="relative+full", st_min_channels=64,
                       store_dtype="fp32")),
    (5, (16, 16), dict(key_frames="prev, first", layer_set="official", st_min_channels=-1,
                       store_dtype="bf16", store_placement="gpu")),
    (2, (16, 24), dict(key_frames="self, mid", store_placement="disk", steps=2)),
    (4, (16, 16), dict(store_placement="recompute")),
], ids=["mid-fp16", "prev-first-96x160-full", "official-bf16-in-place", "disk", "recompute"])
def test_estimate_equals_the_store_a_node_run_holds(nodes, tiny_sd15, tiny_clip, frames, size, kw):
    source = encode(tiny_clip, SOURCE)
    _, store = invert(nodes, tiny_sd15, source, frames_latent(frames, *size), **kw)
    dtype = kw.get("store_dtype", "fp16")
    estimate = nodes.store_memory.store_estimate(tiny_sd15, store.config, dtype, source)
    assert estimate.nbytes_for(store.placement) == store.nbytes > 0
    if store.keeps_attention:
        assert estimate.attention_per_step == store.nbytes_by_step()[0]
    store.release()


def _limit_between(nodes, model, source, frames, size, steps):
    """RAM that holds the latents and one step (``disk``, ``recompute``) but not every step."""
    from comfyui_fatezero.fatezero_core.store import CaptureConfig
    from comfyui_fatezero.fatezero_core.store_size import STORE_MEMORY_FRACTION

    config = CaptureConfig(num_frames=frames, latent_size=size, sigmas=tuple(float(s) for s in range(steps + 1)),
                           key_rule=("mid",), min_st_channels=0, layer_set="relative")
    estimate = nodes.store_memory.store_estimate(model, config, "fp16", source)
    free = int((estimate.latents + estimate.attention_per_step) / STORE_MEMORY_FRACTION) + 1
    assert estimate.nbytes > free * STORE_MEMORY_FRACTION  # a cpu store cannot fit
    return estimate, free


@pytest.mark.parametrize("placement", ["cpu", "gpu"])
def test_a_store_that_cannot_fit_is_refused_before_the_unet_runs(nodes, tiny_sd15, tiny_clip, monkeypatch,
                                                                 placement):
    frames, size, steps = 4, (16, 16), 3
    source = encode(tiny_clip, SOURCE)
    estimate, free = _limit_between(nodes, tiny_sd15, source, frames, size, steps)
    monkeypatch.setattr(nodes.store_memory, "available_ram", lambda: free)
    calls = []
    with pytest.raises(nodes.user_errors.FateZeroNodeError) as info:
        invert(nodes, counting(tiny_sd15, calls), source, frames_latent(frames, *size), steps=steps,
               store_placement=placement)
    message = str(info.value)
    assert calls == []
    assert f"'{placement}' attention store" in message and "of RAM" in message  # --cpu: gpu is RAM
    assert "'disk' (" in message and "'recompute' (" in message
    from comfyui_fatezero.fatezero_core.store_size import format_bytes

    assert format_bytes(estimate.nbytes) in message and format_bytes(estimate.latents) in message


def test_a_gpu_store_is_checked_against_the_free_memory_comfyui_reports(nodes, tiny_sd15, tiny_clip,
                                                                       monkeypatch):
    """A model on a GPU: the store is sized against ``get_free_memory`` of its device."""
    import comfy.model_management

    frames, size, steps = 4, (16, 16), 3
    source = encode(tiny_clip, SOURCE)
    estimate, free = _limit_between(nodes, tiny_sd15, source, frames, size, steps)
    asked = []

    def get_free_memory(dev=None, torch_free_too=False):
        asked.append(dev)
        return free

    monkeypatch.setattr(comfy.model_management, "get_free_memory", get_free_memory)
    calls = []
    on_gpu = counting(tiny_sd15, calls)
    on_gpu.load_device = torch.device("cuda", 0)  # never used: the refusal comes first
    with pytest.raises(nodes.user_errors.FateZeroNodeError) as info:
        invert(nodes, on_gpu, source, frames_latent(frames, *size), steps=steps, store_placement="gpu")
    message = str(info.value)
    assert calls == [] and asked == [torch.device("cuda", 0)]
    assert "memory on the model's device" in message
    assert "'cpu' (" in message and "'disk' (" in message and "'recompute' (" in message


@pytest.mark.parametrize("placement", ["disk", "recompute"])
def test_disk_and_recompute_still_run_under_the_limit(nodes, tiny_sd15, tiny_clip, monkeypatch, placement):
    frames, size, steps = 4, (16, 16), 3
    source = encode(tiny_clip, SOURCE)
    estimate, free = _limit_between(nodes, tiny_sd15, source, frames, size, steps)
    monkeypatch.setattr(nodes.store_memory, "available_ram", lambda: free)
    calls = []
    _, store = invert(nodes, counting(tiny_sd15, calls), source, frames_latent(frames, *size), steps=steps,
                      store_placement=placement)
    assert len(calls) == steps
    assert store.complete and store.nbytes == estimate.nbytes_for(placement)
    store.release()
