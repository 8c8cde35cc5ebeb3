"""FateZero Tune-A-Video Train's training path against the official FateZero trainer.

The reference (``tests/data/tav_train_parity/reference.safetensors``) is the official code's own
result: ``DDPMTrainer.step`` / ``step2d`` on the official ``UNetPseudo3DConditionModel`` (FateZero
9b6cb7b, diffusers 0.11.1, accelerate 0.15.0), made by ``make_reference.py`` beside it from the
inputs of ``inputs.py``. Here the same inputs go through this pack's path: ComfyUI's SD1.5 UNet with
the temporal layers inserted (``tav_tuning.tune``, what the node runs), two iterations, fp32, AdamW,
with and without class images. Every trained tensor must equal the official one within 1e-4 of its
mean |value|, and the losses of both steps must agree.

Weights reach both networks under diffusers names (``inputs.initial_tensor``). Here they take the
pack's own converters: the 2D and temporal names of the FateZero layout are split by
``fatezero_core.tav.checkpoint.split_tav_state_dict`` (what the Tune-A-Video Loader reads a file
with), the 2D weights go to ComfyUI's UNet keys through ``tav_network.diffusers_key_map`` (ComfyUI's
``comfy.utils.unet_to_diffusers``), the temporal layers in as the run's starting layers
(``tune(initial=...)``), and the result comes back in the FateZero layout
(``TuneRun.layout_state_dict``). The official per-step draws are replayed through ``tune(draws=...)``.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

PARITY = Path(__file__).resolve().parents[1] / "data" / "tav_train_parity"
TOLERANCE = 1e-4  # of the official tensor's mean |value|
LOSS_TOLERANCE = 1e-5  # relative
# A tensor whose true gradient is exactly zero in this small UNet: the last transformer block's
# temporal-attention output bias adds one constant per channel, and the only thing after it is the
# output GroupNorm, which at 32 channels in 32 groups removes every per-channel constant. Its
# gradient is float rounding noise (~1e-10 after clipping, below AdamW's eps), different in any two
# implementations, and AdamW turns noise into steps of up to ~lr: both trainers move it by noise.
# Checked with a bound of 2 lr per optimizer step instead; at SD1.x width (10 channels per group)
# the bias has a real gradient.
NO_GRADIENT = {"up_blocks.3.attentions.2.transformer_blocks.0.attn_temporal.to_out.0.bias"}


def load_inputs():
    spec = importlib.util.spec_from_file_location("tav_train_parity_inputs", PARITY / "inputs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


I = load_inputs()


@pytest.fixture(scope="module")
def reference():
    from safetensors import safe_open

    with safe_open(str(PARITY / "reference.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["reference"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return meta, tensors


def starting_weights(comfy_nodes, nodes):
    """Every UNet tensor of the run's start under its FateZero-layout name, made by ``inputs``:
    the 2D names and shapes of an SD1.x UNet at ``MODEL_CHANNELS``, and the temporal layers the
    pack inserts (their owners and shapes as ``fresh_temporal_checkpoint`` makes them)."""
    core = comfy_nodes.fatezero_core
    shapes = core.tav.checkpoint.sd1_unet_key_shapes(I.MODEL_CHANNELS, I.CONTEXT_DIM)
    blocks = {b.path: b.channels(I.MODEL_CHANNELS) for b in core.sd1.sd1_attention_blocks()}
    convs = {c: shapes[f"{c}.weight"][0] for c in core.tav.checkpoint.sd1_inflated_convs()}
    fresh = core.tav.train.fresh_temporal_checkpoint(blocks, convs, I.LORA_RANK, 8, seed=0)
    layout = core.tav.train.fatezero_layout(
        {k: torch.empty(s) for k, s in shapes.items()}, fresh.temporal_attention,
        {owner: weights.state_dict for owner, weights in fresh.temporal_convs.items()})
    return I.initial_state_dict({k: v.shape for k, v in layout.items()})


def comfy_model(nodes, unet_2d):
    """ComfyUI's SD1.5 UNet at ``MODEL_CHANNELS`` with the diffusers-named 2D weights loaded."""
    import comfy.model_patcher
    import tiny_models.sd15 as sd15

    model = sd15.sd15_base_model(sd15.sd15_unet_config(I.MODEL_CHANNELS), torch.float32)
    key_map = nodes.tav_network.diffusers_key_map(model.model_config.unet_config)
    model.diffusion_model.load_state_dict({key_map[k]: v for k, v in unet_2d.items()}, strict=True)
    model.eval()
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


class OfficialDraws:
    """The reference's draws, replayed in the order the loop asks for them; the class images of each
    step start where this pack's ``class_start`` puts the official dataset item."""

    def __init__(self, tuning, with_class: bool):
        self.tuning, self.draws, self.with_class = tuning, I.draws(), with_class
        self.clip_queue, self.class_queue = list(self.draws), list(self.draws) if with_class else []
        self.starts: list[int] = []

    def class_step(self, count, frames, shape):
        d = self.class_queue.pop(0)
        assert (count, frames, tuple(shape)) == (I.CLASS_IMAGES, I.FRAMES, (4, I.LATENT, I.LATENT))
        start = self.tuning.class_start(d["class_item"], count, frames)
        self.starts.append(start)
        return start, d["class_timesteps"], d["class_noise"]

    def clip_step(self, x0):
        assert len(self.class_queue) == (len(self.clip_queue) - 1 if self.with_class else 0)  # class first
        d = self.clip_queue.pop(0)
        return d["clip_timestep"], d["clip_noise"]


def run_pack(comfy_nodes, nodes, start, with_class: bool):
    tuning = comfy_nodes.fatezero_core.tav.train
    ckpt = comfy_nodes.fatezero_core.tav.checkpoint.split_tav_state_dict(dict(start), "the parity inputs")
    model = comfy_model(nodes, ckpt.unet_2d)
    draws = OfficialDraws(tuning, with_class)
    source = [[I.prompt_embedding("source"), {}]]
    classes = dict(class_samples=I.class_latents(), class_prompt=[[I.prompt_embedding("class"), {}]]) if with_class else {}
    with torch.inference_mode(False), torch.enable_grad():  # as the node runs it
        run, _ = nodes.tav_tuning.tune(model, I.clip_latents(), source, I.ITERATIONS, I.LEARNING_RATE, 0, False,
                                       torch.float32, I.LORA_RANK, None, draws=draws, initial=ckpt, **classes)
    assert not draws.clip_queue and not draws.class_queue
    return run, draws.starts


def relative_errors(trained: dict, start: dict, stored: dict, prefix: str) -> dict[str, float]:
    """max |pack - official| / mean |official| per trained tensor (official = start + stored * lr)."""
    errors = {}
    for key in (k[len(prefix):] for k in stored if k.startswith(prefix)):
        official = start[key] + stored[prefix + key].float() * I.LEARNING_RATE
        errors[key] = float((trained[key].float() - official).abs().max() / official.abs().mean())
    return errors


def group_of(key: str) -> str:
    if "conv_temporal" in key:
        return "temporal conv LoRA"
    if "attn_temporal" in key:
        return "temporal attention"
    return "attn1/attn2 to_q"


def test_the_inputs_are_the_references(comfy_nodes, nodes, reference):
    meta, _ = reference
    start = starting_weights(comfy_nodes, nodes)
    assert I.inputs_fingerprint(start) == meta["inputs_fingerprint"], (
        "the parity inputs differ from those the reference was made from: run make_reference.py again")


def test_class_images_are_chosen_as_the_official_dataset_chooses_them(comfy_nodes, reference):
    meta, _ = reference
    tuning = comfy_nodes.fatezero_core.tav.train
    for item, images in enumerate(meta["class_table"]):
        start = tuning.class_start(item, I.CLASS_IMAGES, I.FRAMES)
        assert images == list(range(start, start + I.FRAMES)), item


@pytest.mark.parametrize("run_name", ["without_class", "with_class"])
def test_training_equals_the_official_trainer(comfy_nodes, nodes, reference, run_name, capsys):
    meta, stored = reference
    official = meta["runs"][run_name]
    start = starting_weights(comfy_nodes, nodes)
    with_class = run_name == "with_class"
    run, starts = run_pack(comfy_nodes, nodes, start, with_class)
    assert starts == official["class_starts"]
    trained = run.layout_state_dict()
    assert set(trained) == set(start)

    errors = relative_errors(trained, start, stored, f"{run_name}/")
    assert sorted(errors) == sorted(official["trained"])  # the official trainable set, every tensor of it
    worst = {}
    for key, error in errors.items():
        group = group_of(key) + (" (no gradient)" if key in NO_GRADIENT else "")
        worst[group] = max(worst.get(group, 0.0), error)
    with capsys.disabled():
        print(f"\n{run_name}: max |pack - official| / mean |official| per group: "
              + ", ".join(f"{g} {e:.2e}" for g, e in sorted(worst.items()))
              + f"; losses {run.losses} vs {official['losses']}, class {run.class_losses} vs {official['class_losses']}")
    bad = {k: e for k, e in errors.items() if e > TOLERANCE and k not in NO_GRADIENT}
    assert not bad, sorted(bad.items(), key=lambda kv: -kv[1])[:5]
    optimizer_steps = I.ITERATIONS * (2 if with_class else 1)
    for key in NO_GRADIENT:
        official_value = start[key] + stored[f"{run_name}/{key}"].float() * I.LEARNING_RATE
        assert float((trained[key] - official_value).abs().max()) <= 2 * I.LEARNING_RATE * optimizer_steps
    for key in set(start) - set(errors):  # everything else is left as it was
        assert torch.equal(trained[key].float(), start[key]), key

    assert run.losses == pytest.approx(official["losses"], rel=LOSS_TOLERANCE)
    assert run.class_losses == pytest.approx(official["class_losses"], rel=LOSS_TOLERANCE)
    assert len(run.class_losses) == (I.ITERATIONS if with_class else 0)


def test_the_class_step_changes_the_result(comfy_nodes, nodes, reference):
    """The two reference runs differ beyond the tolerances (losses, and a good share of the tensors
    of every group), so the comparison above tells a run with class steps from one without."""
    meta, stored = reference
    start = starting_weights(comfy_nodes, nodes)
    differ: dict[str, list[bool]] = {}
    for key in meta["runs"]["with_class"]["trained"]:
        a, b = stored[f"with_class/{key}"].float(), stored[f"without_class/{key}"].float()
        beyond = float((a - b).abs().max()) * I.LEARNING_RATE > TOLERANCE * float(start[key].abs().mean())
        differ.setdefault(group_of(key), []).append(beyond)
    for group, flags in differ.items():
        assert sum(flags) >= 0.25 * len(flags), (group, sum(flags), len(flags))
    runs = meta["runs"]
    assert runs["with_class"]["losses"][-1] != pytest.approx(runs["without_class"]["losses"][-1], rel=10 * LOSS_TOLERANCE)
