"""FateZero Tune-A-Video Train in a real ComfyUI, on the tiny SD1.5-topology model (CPU).

The clip is a seeded latent of a bright square moving one latent pixel per frame over a dark
background, so frames are related as in a video and the temporal layers have something to learn.
"""

from __future__ import annotations

import copy
import logging
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

    def recording(steps, node_id, *args):
        report = original(steps, node_id, *args)

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


def video_latent(frames: int = FRAMES, size: int = LATENT) -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    x = torch.randn(frames, 4, size, size, generator=g) * 0.1 - 0.5
    for f in range(frames):
        x[f, :, 2:5, 1 + f:4 + f] += 1.5
    return x


def encode(clip, text):
    import nodes as core_nodes

    return core_nodes.CLIPTextEncode().encode(clip, text)[0]


def run_train(train, model, source, steps=4, lr=FAST_LR, save_name="", latent=None, **kw):
    args = dict(model=model, latent={"samples": video_latent() if latent is None else latent}, source=source,
                steps=steps, learning_rate=lr, seed=SEED, gradient_checkpointing=True, precision="auto",
                trainable="official", lora_rank=160, save_name=save_name)
    args.update(kw)
    return train.FateZeroTuneAVideoTrain.execute(**args)


def unet_out(model, x, sigma, cond, noise=None):
    """The model's denoised prediction at ``x0 + sigma * noise`` (``x0``: the processed latent
    ``x``) for a frame-major clip, through ComfyUI's sampling call."""
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

    if noise is None:
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


def test_saved_file_reloads_to_the_same_network_bit_for_bit(nodes, train, tiny_sd15, tiny_clip, tav_dir):
    source = encode(tiny_clip, PROMPT)
    model, _ = run_train(train, tiny_sd15, source, steps=2, save_name="clip/tuned").args
    path = tav_dir / "clip" / "tuned.safetensors"
    assert path.is_file() and not list(tav_dir.rglob("*.partial"))
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        assert f.metadata()["fatezero_layout"] == "fatezero"
    assert any(k.endswith(".attn_temporal.to_q.weight") for k in keys)
    assert any(k.endswith(".conv_temporal.down.weight") for k in keys)
    reloaded = nodes.tav_loader.FateZeroTuneAVideoLoader.execute(checkpoint="clip/tuned.safetensors",
                                                                  base_model=tiny_sd15).args[0]
    x = video_latent()
    for sigma in (0.5, 8.0):
        assert torch.equal(unet_out(reloaded, x, sigma, source), unet_out(model, x, sigma, source))
    # and the tuned model differs from the untuned one: the file carries the training
    assert not torch.equal(unet_out(tiny_sd15, x, 0.5, source), unet_out(model, x, 0.5, source))


def test_a_save_puts_every_tensor_under_its_own_owner_whatever_the_layer_order(
        nodes, comfy_nodes, train, tiny_sd15, tiny_clip, tav_dir, monkeypatch):
    """Fresh temporal layers listed in another order than the UNet's (here: reversed) are still
    saved each under the block or conv it runs at: the file reloads to the tuned network."""
    tuning = comfy_nodes.fatezero_core.tav.train
    fresh = tuning.fresh_temporal_checkpoint

    def reversed_order(*args, **kwargs):
        ckpt = fresh(*args, **kwargs)
        ckpt.temporal_attention = dict(reversed(ckpt.temporal_attention.items()))
        ckpt.temporal_convs = dict(reversed(ckpt.temporal_convs.items()))
        return ckpt

    monkeypatch.setattr(tuning, "fresh_temporal_checkpoint", reversed_order)
    source = encode(tiny_clip, PROMPT)
    model, _ = run_train(train, tiny_sd15, source, steps=1, save_name="reordered").args
    reloaded = nodes.tav_loader.FateZeroTuneAVideoLoader.execute(checkpoint="reordered.safetensors",
                                                                  base_model=tiny_sd15).args[0]
    x = video_latent()
    assert torch.equal(unet_out(reloaded, x, 0.5, source), unet_out(model, x, 0.5, source))


def test_cancel_mid_training_saves_nothing_and_outputs_nothing(train, tiny_sd15, tiny_clip, tav_dir, monkeypatch):
    import comfy.model_management
    import comfy.utils

    def hook(value, total, preview, node_id=None):
        if value == 2:
            comfy.model_management.interrupt_current_processing(True)

    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", hook)
    before = state_of(tiny_sd15)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            run_train(train, tiny_sd15, encode(tiny_clip, PROMPT), steps=6, save_name="cancelled")
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert not any(tav_dir.rglob("*"))
    unet = tiny_sd15.model.diffusion_model
    assert not any("forward" in m.__dict__ for m in unet.modules())  # checkpointing removed
    assert state_matches(before, state_of(tiny_sd15))


def write_lora(path: Path, rank: int = 4) -> list[str]:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(9)
    tensors = {}
    layers = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (32, 32),
              "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k": (32, 32)}
    for layer, (out_dim, in_dim) in layers.items():
        tensors[f"{layer}.lora_down.weight"] = torch.randn(rank, in_dim, generator=g) * 0.3
        tensors[f"{layer}.lora_up.weight"] = torch.randn(out_dim, rank, generator=g) * 0.3
        tensors[f"{layer}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, str(path))
    return list(layers)


ATTN1 = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1"


def test_lora_patched_base_trains_from_the_lora_weights(train, tiny_sd15, tiny_clip, tmp_path, monkeypatch):
    import folder_paths
    import nodes as core_nodes

    loras = tmp_path / "loras"
    loras.mkdir()
    write_lora(loras / "tiny.safetensors")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", ([str(loras)], folder_paths.supported_pt_extensions))
    (with_lora,) = core_nodes.LoraLoaderModelOnly().load_lora_model_only(tiny_sd15, "tiny.safetensors", 1.0)
    assert f"{ATTN1}.to_q.weight" in with_lora.patches and f"{ATTN1}.to_k.weight" in with_lora.patches
    lora_state, plain_state = loaded_unet_state(with_lora), loaded_unet_state(tiny_sd15)
    lr = 1e-7  # a tiny step: the tuned to_q must stay next to the LoRA weight it started from
    model, _ = run_train(train, with_lora, encode(tiny_clip, PROMPT), steps=2, lr=lr).args
    tuned = loaded_unet_state(model)
    q, k = f"{ATTN1}.to_q.weight", f"{ATTN1}.to_k.weight"
    assert torch.equal(tuned[k], lora_state[k]) and not torch.equal(tuned[k], plain_state[k])  # LoRA kept
    assert not torch.equal(tuned[q], lora_state[q])  # trained ...
    step = float((tuned[q] - lora_state[q]).abs().max())
    assert step <= 2 * 2 * lr * 1.01, step  # ... by at most lr per AdamW step (+ decay), from the LoRA weight
    assert float((lora_state[q] - plain_state[q]).abs().max()) > 100 * step


@pytest.mark.parametrize("latent, message", [
    (torch.zeros(1, 4, LATENT, LATENT), "at least 2 frames"),
    (torch.zeros(4, 16, LATENT, LATENT), r"\[frames, 4, h, w\]"),
    (torch.zeros(1, 4, 4, LATENT, LATENT), r"\[frames, 4, h, w\]"),
])
def test_bad_latents_are_refused(nodes, train, tiny_sd15, tiny_clip, latent, message):
    with pytest.raises(nodes.user_errors.FateZeroNodeError, match=message):
        run_train(train, tiny_sd15, encode(tiny_clip, PROMPT), latent=latent)


def test_models_that_are_not_sd1_are_refused(nodes, train, tiny_clip):
    import tiny_models

    other = tiny_models.build_tiny_sd15(context_dim=1024)
    with pytest.raises(nodes.user_errors.FateZeroNodeError, match="Stable Diffusion 1.x model.*context_dim 1024"):
        run_train(train, other, encode(tiny_clip, PROMPT))


def test_a_tuned_model_and_bad_save_names_are_refused(nodes, train, tiny_sd15, tiny_clip, tav_dir):
    source = encode(tiny_clip, PROMPT)
    for name in ("../outside", "/abs/path", "a/../b"):
        with pytest.raises(nodes.user_errors.FateZeroNodeError, match="plain file name"):
            run_train(train, tiny_sd15, source, save_name=name)
    (tav_dir / "exists.safetensors").write_bytes(b"x")
    with pytest.raises(nodes.user_errors.FateZeroNodeError, match="already exists"):
        run_train(train, tiny_sd15, source, save_name="exists")
    tuned = tiny_sd15.clone()
    tuned.model_options.setdefault("transformer_options", {})["fatezero_key_rule"] = "prev, first"
    with pytest.raises(nodes.user_errors.FateZeroNodeError, match="already has Tune-A-Video layers"):
        run_train(train, tuned, source)


def test_an_unwritable_save_folder_is_refused_before_training(nodes, train, tiny_sd15, tiny_clip, tav_dir, losses):
    (tav_dir / "clip").write_bytes(b"a file where the folder should be")
    with pytest.raises(nodes.user_errors.FateZeroNodeError,
                       match=r"Cannot save the tuned model to .*clip.*tuned\.safetensors: .*clip is a file, not a folder"):
        run_train(train, tiny_sd15, encode(tiny_clip, PROMPT), save_name="clip/tuned")
    assert losses == []  # refused before the first step
    assert [p.name for p in tav_dir.iterdir()] == ["clip"]


def in_the_way_of(path: Path, what: str) -> None:
    if what == "a file at the name":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"someone else's file")
    else:  # a file where the folder should be
        path.parent.write_bytes(b"someone else's file")


@pytest.mark.parametrize("what", ["a file at the name", "a file at the folder"])
def test_a_save_that_fails_after_training_keeps_the_model_and_names_the_path(
        train, tiny_sd15, tiny_clip, tav_dir, losses, monkeypatch, caplog, what):
    """Something takes the save's place while training runs: the node still outputs the tuned MODEL,
    warns with the path, and leaves the other file as it is."""
    import comfy.utils

    path = tav_dir / "clip" / "tuned.safetensors"

    def hook(value, total, preview, node_id=None):
        if value == 1:
            in_the_way_of(path, what)

    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", hook)
    with caplog.at_level(logging.WARNING, logger="comfyui-fatezero"):
        model, curve = run_train(train, tiny_sd15, encode(tiny_clip, PROMPT), steps=2, save_name="clip/tuned").args
    assert len(losses) == 2 and curve.shape == (1, 256, 512, 3)
    assert len(model.get_wrappers("diffusion_model", "fatezero_clip")[0].modules) == 68  # the tuned layers
    blocker = path if what == "a file at the name" else path.parent
    assert blocker.read_bytes() == b"someone else's file"
    assert sorted(p.relative_to(tav_dir).as_posix() for p in tav_dir.rglob("*")) == sorted(
        {blocker.relative_to(tav_dir).as_posix(), "clip"})
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"NOT saved to {path}" in w for w in warnings), warnings


def test_out_of_memory_says_what_to_change(nodes, train, tiny_sd15, tiny_clip, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(nodes.tav_tuning.TuneRun, "loop", oom)
    with pytest.raises(nodes.user_errors.FateZeroNodeError, match="fewer frames.*smaller size") as info:
        run_train(train, tiny_sd15, encode(tiny_clip, PROMPT), gradient_checkpointing=False, precision="fp32")
    assert "gradient_checkpointing on" in str(info.value) and "bf16" in str(info.value)


def test_schema(nodes, train):
    schema = train.FateZeroTuneAVideoTrain.define_schema()
    assert schema.node_id == "FateZero_TuneAVideoTrain" and schema.display_name == "FateZero Tune-A-Video Train"
    defaults = {i.id: getattr(i, "default", None) for i in schema.inputs}
    assert 150 <= defaults["steps"] <= 250 and defaults["learning_rate"] == 1e-5
    assert defaults["gradient_checkpointing"] is True and defaults["precision"] == "auto"
    assert defaults["trainable"] == "official" and defaults["lora_rank"] == 160
    assert all(i.tooltip for i in schema.inputs)
    assert train.FateZeroTuneAVideoTrain in nodes.node_classes()


def reference_prev_first_attn1(q, k, v, extra):
    """Eq. 8 with Tune-A-Video's keys, written out: frame i attends to the tokens of frame i-1
    (frame 0: itself) and of frame 0, softmax(q K^T / sqrt(d)) V per head."""
    heads = extra["n_heads"]
    f, n, c = q.shape
    d = c // heads
    out = torch.empty_like(q)
    for i in range(f):
        keys = torch.cat([k[max(i - 1, 0)], k[0]])
        values = torch.cat([v[max(i - 1, 0)], v[0]])
        qh, kh, vh = (t.reshape(t.shape[0], heads, d).transpose(0, 1) for t in (q[i], keys, values))
        weights = torch.softmax(qh @ kh.transpose(1, 2) / d ** 0.5, dim=-1)
        out[i] = (weights @ vh).transpose(0, 1).reshape(n, c)
    return out


def test_first_step_loss_is_the_objective_on_the_loader_network(nodes, train, tiny_sd15, tiny_clip, losses):
    """Before any update the temporal layers are the identity, so the network is the SD UNet with
    clip-level GroupNorm and previous+first-frame self-attention; the first loss must be
    mse(eps_theta(x0 + sigma_t * eps, t), eps) on it, with (t, eps) the seed's first draw."""
    import comfy.model_management
    from fatezero_core.tav import train as core

    source = encode(tiny_clip, PROMPT)
    latent = video_latent()
    run_train(train, tiny_sd15, source, steps=1, lr=1e-7)
    reference = tiny_sd15.clone()
    nodes.video_runtime.use_video_group_norm(reference)
    for key in nodes.patching.attention_block_keys(nodes.patching.unet_resolver(reference)):
        reference.set_model_attn1_replace(reference_prev_first_attn1, *key)
    x0 = tiny_sd15.model.process_latent_in(latent)
    timestep, noise = core.draw_step(torch.Generator().manual_seed(SEED), x0)
    sigma = float(tiny_sd15.get_model_object("model_sampling").sigma(torch.tensor([float(timestep)])))
    def loss(model):
        denoised = unet_out(model, latent, sigma, source, noise=noise)
        eps = (x0 + sigma * noise - denoised) / sigma
        return float(((eps - noise) ** 2).mean())
    expected = loss(reference)
    assert losses[0] == pytest.approx(expected, rel=1e-4)
    per_frame = tiny_sd15.clone()  # the control: the plain per-frame network gives another loss
    assert abs(loss(per_frame) - expected) > 1e-3 * expected


CLASS_PROMPT = "a photo of a square"


def class_latent(count: int = 6) -> dict:
    g = torch.Generator().manual_seed(12)
    return {"samples": torch.randn(count, 4, LATENT, LATENT, generator=g)}


def recording_unet_calls(model, calls: list):
    """A clone of ``model`` whose every UNet call is recorded: (still images?, batch, context)."""
    from comfy.patcher_extension import WrappersMP

    def record(executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        calls.append(("class" if transformer_options.get("fatezero_still_images") else "clip",
                      int(x.shape[0]), context.detach().clone()))
        return executor(x, timesteps, context, y, control, transformer_options, **kwargs)

    clone = model.clone()
    clone.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "test_record", record)
    return clone


def test_class_images_add_a_class_step_before_each_clip_step(comfy_nodes, train, tiny_sd15, tiny_clip, losses,
                                                            monkeypatch):
    """Each iteration: the class step (F class images as still images, the class prompt only, its own
    optimizer step), then the clip step (the source prompt). The loss curve shows both."""
    tuning = comfy_nodes.fatezero_core.tav.train
    steps, calls, events = 3, [], []
    original_step = tuning.train_step

    def counting_step(*args, **kwargs):  # one optimizer step, named after the UNet call it ran
        value = original_step(*args, **kwargs)
        events.append(("optimizer step", calls[-1][0]))
        return value

    monkeypatch.setattr(tuning, "train_step", counting_step)
    source, class_prompt = encode(tiny_clip, PROMPT), encode(tiny_clip, CLASS_PROMPT)
    model, curve = run_train(train, recording_unet_calls(tiny_sd15, calls), source, steps=steps,
                             class_latent=class_latent(), class_prompt=class_prompt).args
    assert [c[0] for c in calls] == ["class", "clip"] * steps
    assert events == [("optimizer step", "class"), ("optimizer step", "clip")] * steps
    assert all(batch == FRAMES for _, batch, _ in calls)
    for kind, _, context in calls:
        wanted = class_prompt if kind == "class" else source
        assert torch.equal(context, wanted[0][0].expand(FRAMES, -1, -1)), kind
    assert len(losses) == steps
    orange = (curve[0, :, :, 0] > curve[0, :, :, 2] + 0.3)
    assert orange.any()  # the class losses are on the curve


def test_still_images_run_without_temporal_layers_and_per_image(nodes, train, tiny_sd15, tiny_clip):
    """A UNet call flagged as still images on the tuned model is the plain SD UNet on each image
    (no temporal layers, per-image norms and self-attention), as the official UNet runs a 4-D
    batch, although the tuned temporal layers are not identities."""
    import comfy.samplers

    source = encode(tiny_clip, PROMPT)
    tuned, _ = run_train(train, tiny_sd15, source, steps=2, lr=1e-2).args
    x = video_latent()

    def stills_out(model):
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(source, [])
        guider.set_cfg(1.0)
        captured = {}

        class Once(comfy.samplers.Sampler):
            def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None,
                       denoise_mask=None, disable_pbar=False):
                args = dict(extra_args, model_options=nodes.video_runtime.still_images_options(extra_args["model_options"]))
                captured["out"] = model_wrap(latent_image + 0.5 * noise, torch.full((latent_image.shape[0],), 0.5), **args)
                return latent_image

        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
        guider.sample(noise, x, Once(), torch.tensor([0.5, 0.0]), seed=0, disable_pbar=True)
        return captured["out"]

    # the plain per-frame SD UNet with the tuned to_q (the only tuned 2D weights)
    plain = tiny_sd15.clone()
    plain.add_patches({k: p[-1][1] for k, p in tuned.patches.items() if k.endswith("to_q.weight")})
    expected = unet_out(plain, x, 0.5, source)
    assert torch.allclose(stills_out(tuned), expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(unet_out(tuned, x, 0.5, source), expected, atol=1e-3)  # as a clip: not so


def test_cancel_during_class_steps_saves_nothing(train, tiny_sd15, tiny_clip, tav_dir, monkeypatch):
    import comfy.model_management
    import comfy.utils

    def hook(value, total, preview, node_id=None):
        if value == 1:
            comfy.model_management.interrupt_current_processing(True)

    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", hook)
    before = state_of(tiny_sd15)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            run_train(train, tiny_sd15, encode(tiny_clip, PROMPT), steps=4, save_name="cancelled",
                      class_latent=class_latent(), class_prompt=encode(tiny_clip, CLASS_PROMPT))
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert not any(tav_dir.rglob("*"))
    assert state_matches(before, state_of(tiny_sd15))


def test_class_inputs_are_checked_before_training(nodes, train, tiny_sd15, tiny_clip, losses):
    source, class_prompt = encode(tiny_clip, PROMPT), encode(tiny_clip, CLASS_PROMPT)
    with pytest.raises(nodes.user_errors.FateZeroNodeError, match="class_prompt is not"):
        run_train(train, tiny_sd15, source, class_latent=class_latent())
    with pytest.raises(nodes.user_errors.FateZeroNodeError, match="class_latent is not"):
        run_train(train, tiny_sd15, source, class_prompt=class_prompt)
    with pytest.raises(nodes.user_errors.FateZeroNodeError, match="holds 3 image.*at least 4"):
        run_train(train, tiny_sd15, source, class_latent=class_latent(3), class_prompt=class_prompt)
    with pytest.raises(nodes.user_errors.FateZeroNodeError, match="AdamW8bit needs a CUDA GPU.*Set optimizer to AdamW"):
        run_train(train, tiny_sd15, source, optimizer="AdamW8bit")
    assert losses == []
