"""FateZero Tune-A-Video Train: one-shot tuning of an SD1.x MODEL on the clip to be edited.

The run (``tav_tuning``) tunes the network the Tune-A-Video Loader builds, on a clone: the input
MODEL is never modified. A save name writes the tuned UNet in the FateZero layout (diffusers 2D
names plus ``attn_temporal``/``norm_temporal``/``conv_temporal``) to ``models/tuneavideo``
(``tav_folder``); the Tune-A-Video Loader reloads it to the same network, bit for bit. A name that
exists or a folder that cannot be written is refused before training; a save that still fails
afterwards never overwrites a file and only warns, naming the path: the MODEL output keeps the
tuned network.

Optional regularization, the official recipe of the released shape checkpoints: class images of the
object's class made by the same base model (``class_latent``) and their prompt (``class_prompt``,
"a photo of a car"); each iteration then runs the class step before the clip step
(``DDPMTrainer.step`` / ``step2d``, ``video_diffusion/trainer/ddpm_trainer.py``, FateZero 9b6cb7b).
"""

from __future__ import annotations

import torch

import comfy.model_management
from comfy_api.latest import io

from ..fatezero_core.errors import FateZeroError
from ..fatezero_core.store import STORE_DTYPES
from ..fatezero_core.tav import train as core
from .video_runtime import model_group_norm
from .patching import model_key_rule, refuse_context_windows
from .tav_folder import save_path
from .tav_network import sd1_unet_problem
from .tav_tuning import save_tuned, tune
from .training_progress import progress_reporter
from .user_errors import FateZeroNodeError, reports_user_errors

PRECISIONS = ["auto", "fp32", "bf16", "fp16"]
TRAINABLE_SETS = ["official", "no temporal conv"]


def check_base_model(model) -> None:
    """An SD1.x MODEL without temporal layers (connect the checkpoint, LoRA allowed)."""
    problem = sd1_unet_problem(model)
    if problem:
        raise FateZeroNodeError(
            f"Tune-A-Video training needs a Stable Diffusion 1.x model, but {problem}. Connect an "
            "SD1.x checkpoint (SD1.4/SD1.5, LoRA allowed).")
    if model_key_rule(model) or model_group_norm(model) == "clip":
        raise FateZeroNodeError(
            "This model already has Tune-A-Video layers. Connect the SD1.x checkpoint it was tuned "
            "from (Load Checkpoint, LoRA allowed) instead of the Tune-A-Video Loader.")
    refuse_context_windows(model)


def copy_conditioning(conditioning):
    """A CONDITIONING of copies (ComfyUI's executor hands inference tensors; training reads them
    outside inference mode)."""
    return [[c.clone(), dict(o)] for c, o in conditioning]


def check_class_inputs(class_latent, class_prompt, frames: int):
    """The class latents ``[N, 4, h, w]`` when both regularization inputs are connected, None when
    neither is; one without the other is refused, saying what to connect."""
    if class_latent is None and class_prompt is None:
        return None
    if class_prompt is None:
        raise FateZeroNodeError(
            "class_latent is connected but class_prompt is not. Connect the CLIP Text Encode of the "
            "prompt the class images were made with (e.g. 'a photo of a car'), or disconnect class_latent.")
    if class_latent is None:
        raise FateZeroNodeError(
            "class_prompt is connected but class_latent is not. Connect the class images' latents "
            "(a KSampler batch of the class prompt, or VAE Encode of class images), or disconnect class_prompt.")
    samples = class_latent["samples"]
    core.check_class_latent(samples, frames)
    return samples


def training_dtype(precision: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on a CUDA device that has it, else fp16 (with loss scaling) on CUDA, fp32
    elsewhere (CPU, MPS)."""
    if precision == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return STORE_DTYPES[precision]


class FateZeroTuneAVideoTrain(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FateZero_TuneAVideoTrain",
            display_name="FateZero Tune-A-Video Train",
            category="FateZero/training",
            description=(
                "One-shot Tune-A-Video tuning of an SD1.x model on the clip to edit, for shape edits "
                "(jeep -> Porsche) on your own footage: temporal attention and temporal-conv LoRA are "
                "added and trained with every to_q, on the whole clip with spatio-temporal attention "
                "(previous + first frame) and clip-level GroupNorm, exactly the network the Tune-A-Video "
                "Loader builds. Connect the MODEL to FateZero DDIM Invert and FateZero Sample."),
            inputs=[
                io.Model.Input("model", tooltip="SD1.x MODEL to tune (Load Checkpoint, LoRA allowed). It is not modified."),
                io.Latent.Input("latent", tooltip="The clip's VAE-encoded frames (VAE Encode of Load Video Frames), frame-major, at least 2 frames."),
                io.Conditioning.Input("source", tooltip="Source prompt: what the clip shows (the 'source' output of FateZero Source Prompt)."),
                io.Int.Input("steps", default=core.OFFICIAL_STEPS, min=1, max=10000,
                             tooltip="Training steps (one clip per step). The released checkpoints are 150-250 steps (jeep 200, swan 150, man_skate 250)."),
                io.Float.Input("learning_rate", default=core.OFFICIAL_LEARNING_RATE, min=1e-7, max=1e-2, step=1e-6,
                               tooltip="AdamW learning rate, constant (official 1e-5)."),
                io.Int.Input("seed", default=core.OFFICIAL_SEED, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Seed of the timesteps, noise and initial temporal layers (official 74831)."),
                io.Boolean.Input("gradient_checkpointing", default=True,
                                 tooltip="Recompute each UNet layer in backward: much less memory (0.38x measured), a little more time per step (1.1x)."),
                io.Combo.Input("precision", options=PRECISIONS, default="auto",
                               tooltip="Compute precision. auto: bf16 where the GPU supports it, else fp16 with loss scaling; fp32 on CPU. Trained tensors stay fp32."),
                io.Combo.Input("trainable", options=TRAINABLE_SETS, default="official",
                               tooltip="official: every to_q of attn1/attn2, the temporal attention (not its norm) and the temporal-conv LoRA (FateZero). no temporal conv: the original Tune-A-Video set, without temporal convs."),
                io.Int.Input("lora_rank", default=core.OFFICIAL_LORA_RANK, min=1, max=1280,
                             tooltip="Rank of the temporal-conv LoRA (official shape configs: 160; a rank above a conv's channels becomes channels // 2)."),
                io.String.Input("save_name", default="",
                                tooltip="Optional: also save the tuned UNet as models/tuneavideo/<save_name>.safetensors (FateZero layout) for the Tune-A-Video Loader. Empty: nothing is saved."),
                io.Combo.Input("optimizer", options=list(core.OPTIMIZERS), default="AdamW",
                               tooltip="AdamW: full-precision states (8 bytes per trained parameter), any device. AdamW8bit: bitsandbytes' 8-bit states (2 bytes per parameter), the official default; needs a CUDA GPU and the bitsandbytes package."),
                io.Latent.Input("class_latent", optional=True,
                                tooltip="Optional regularization (official recipe): VAE-encoded images of the object's class made by the same base model, e.g. a KSampler batch of 'a photo of a car', at least as many as the clip's frames. Each step first trains on as many consecutive class images as the clip has frames, as single images, so the model keeps drawing other members of the class (a Porsche for a jeep). Needs class_prompt."),
                io.Conditioning.Input("class_prompt", optional=True,
                                      tooltip="The prompt the class images were made with ('a photo of a car'), encoded with the same CLIP. Needs class_latent."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The tuned Tune-A-Video MODEL: use it for DDIM Invert and FateZero Sample (key frames auto: previous + first)."),
                io.Image.Output(display_name="loss_curve", tooltip="Loss per step (grey) and its running mean (blue)."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    @reports_user_errors
    def execute(cls, model, latent, source, steps, learning_rate, seed, gradient_checkpointing, precision,
                trainable, lora_rank, save_name, optimizer="AdamW", class_latent=None,
                class_prompt=None) -> io.NodeOutput:
        samples = latent["samples"]
        frames = core.check_video_latent(samples)
        class_samples = check_class_inputs(class_latent, class_prompt, frames)
        check_base_model(model)
        core.check_optimizer(optimizer, model.load_device.type)
        path = save_path(save_name)
        rank = lora_rank if trainable == "official" else None
        node_id = cls.hidden.unique_id if cls.hidden else None
        class_losses: list[float] = []  # filled by the class steps, read by the progress bar
        progress = progress_reporter(steps, node_id, class_losses if class_samples is not None else None)
        dtype = training_dtype(precision, model.load_device)
        with torch.inference_mode(False), torch.enable_grad():
            try:
                run, trained = tune(model, samples.clone(), copy_conditioning(source), steps, learning_rate, seed,
                                    gradient_checkpointing, dtype, rank, progress,
                                    class_samples=None if class_samples is None else class_samples.clone(),
                                    class_prompt=None if class_samples is None else copy_conditioning(class_prompt),
                                    optimizer=optimizer, class_losses=class_losses)
            except torch.OutOfMemoryError:
                comfy.model_management.soft_empty_cache()
                raise FateZeroError(core.oom_advice(frames, samples.shape[2], samples.shape[3],
                                                    gradient_checkpointing, precision)) from None
        if path:
            metadata = {"fatezero_layout": "fatezero", "tuned_steps": steps, "learning_rate": learning_rate,
                        "seed": seed, "frames": frames, "lora_rank": rank or 0, "optimizer": optimizer,
                        "class_images": 0 if class_samples is None else int(class_samples.shape[0])}
            save_tuned(run, path, metadata, node_id)
        return io.NodeOutput(trained, core.loss_curve_image(run.losses, class_losses=run.class_losses or None))
