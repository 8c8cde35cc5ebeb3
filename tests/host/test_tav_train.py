"""FateZero Tune-A-Video Train in a real ComfyUI, on the tiny SD1.5-topology model (CPU).

The clip is a seeded latent of a bright square moving one latent pixel per frame over a dark
background, so frames are related as in a video and the temporal layers have something to learn.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

FRAMES, LATENT = 4, 8
PROMPT = "a white square moving right"
SEED = 3
FAST_LR = 1e-3  # the tiny model learns visibly in a few dozen steps at this rate (official: 1e-5)

pytestmark = pytest.mark.usefixtures("host_inference_mode")


@pytest.fixture
def train(nodes):
    return nodes.tav_train


@pytest.fixture
def losses(train, monkeypatch) -> list[float]:
    """The loss of every step of the runs in the test, as the progress reporter sees them."""
    seen: list[float] = []
    original = train.progress_reporter

    def recording(steps, node_id):
        report = original(steps, node_id)

        def wrapped(step, values):
            seen.append(values[-1])
            report(step, values)
        return wrapped

    monkeypatch.setattr(train, "progress_reporter", recording)
    return seen


@pytest.fixture
def tav_dir(tmp_path, monkeypatch) -> Path:
    import folder_paths

    folder = tmp_path / "tuneavideo"
    folder.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "tuneavideo", ([str(folder)], set()))
    return folder


def clip_latent(frames: int = FRAMES, size: int = LATENT) -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    x = torch.randn(frames, 4, size, size, generator=g) * 0.1 - 0.5
    for f in range(frames):
        x[f, :, 2:5, 1 + f:4 + f] += 1.5
    return x


def encode(clip, text):
    import nodes as core_nodes

    return core_nodes.CLIPTextEncode().encode(clip, text)[0]


def run_train(train, model, source, steps=4, lr=FAST_LR, save_name="", latent=None, **kw):
    args = dict(model=model, latent={"samples": clip_latent() if latent is None else latent}, source=source,
                steps=steps, learning_rate=lr, seed=SEED, gradient_checkpointing=True, precision="auto",
                trainable="official", lora_rank=160, save_name=save_name)
    args.update(kw)
    return train.FateZeroTuneAVideoTrain.execute(**args)


def unet_out(model, x, sigma, cond):
    """The model's denoised prediction for a frame-major clip, through ComfyUI's sampling call."""
    import comfy.model_management
    import comfy.samplers

    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(cond, [])
    guider.set_cfg(1.0)
    captured = {}

    class Once(comfy.samplers.Sampler):
        def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
                   disable_pbar=False):
            captured["out"] = model_wrap(latent_image + sigma * noise, torch.full((latent_image.shape[0],), sigma),
                                         **extra_args)
            return latent_image

    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    guider.sample(noise, x, Once(), torch.tensor([sigma, 0.0]), seed=0, disable_pbar=True)
    return captured["out"]


def loaded_unet_state(model) -> dict[str, torch.Tensor]:
    """The UNet weights ``model`` runs with (its patches applied), by ComfyUI state-dict key."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([model], force_full_load=True)
    return {f"diffusion_model.{k}": v.detach().clone() for k, v in model.model.diffusion_model.state_dict().items()}


def state_matches(a, b) -> bool:
    return a[:3] == b[:3] and a[3].keys() == b[3].keys() and all(torch.equal(a[3][k], b[3][k]) for k in a[3])


def state_of(model):
    """Patches, object patches, options and the weights the model runs with."""
    return (copy.copy(model.patches), dict(model.object_patches), repr(model.model_options),
            loaded_unet_state(model))


def test_loss_falls_and_only_trainable_tensors_change(train, tiny_sd15, tiny_clip, losses):
    steps = 30
    source = encode(tiny_clip, PROMPT)
    before = loaded_unet_state(tiny_sd15)
    input_state = state_of(tiny_sd15)
    model, curve = run_train(train, tiny_sd15, source, steps=steps).args
    assert len(losses) == steps and curve.shape == (1, 256, 512, 3)
    tenth = steps // 10
    first, last = sum(losses[:tenth]) / tenth, sum(losses[-tenth:]) / tenth
    assert last < 0.8 * first, (first, last)

    after = loaded_unet_state(model)
    queries = [k for k in before if k.endswith(("attn1.to_q.weight", "attn2.to_q.weight"))]
    assert len(queries) == 32  # 16 transformer blocks
    for key, value in before.items():
        if key in queries:
            assert not torch.equal(after[key], value), key
        else:
            assert torch.equal(after[key], value), key  # frozen: bit-identical
    runtime = model.get_wrappers("diffusion_model", "fatezero_clip")[0]
    attention = [m for m in runtime.modules if hasattr(m, "norm_temporal")]
    convs = [m for m in runtime.modules if hasattr(m, "conv_temporal")]
    assert (len(attention), len(convs)) == (16, 52)
    for layer in attention:  # trained, but not its norm (official)
        assert torch.equal(layer.norm_temporal.weight, torch.ones_like(layer.norm_temporal.weight))
        assert torch.equal(layer.norm_temporal.bias, torch.zeros_like(layer.norm_temporal.bias))
        assert layer.attn_temporal.to_out[0].weight.abs().sum() > 0  # zero-initialised, then trained
    assert all(conv.conv_temporal.up.weight.abs().sum() > 0 for conv in convs)
    assert state_matches(input_state, state_of(tiny_sd15))
