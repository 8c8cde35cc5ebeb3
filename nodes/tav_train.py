"""FateZero Tune-A-Video Train: one-shot tuning of an SD1.x MODEL on the clip to be edited.

The network tuned is exactly the one the Tune-A-Video Loader builds (``tav_loader``): temporal
attention after every transformer block and temporal-conv LoRA after every inflated conv, inserted
as object patches on a clone of the input MODEL; clip-level ResNet/output GroupNorm
(``clip_runtime``); and spatio-temporal self-attention with the Tune-A-Video keys (previous + first
frame), which FateZero's own nodes apply through their attn1 patches and the trainer through
:func:`~.patching.add_clip_self_attention`. The objective and optimiser are
``fatezero_core.tav.train`` (the official settings).

What is trained and how the result is carried:

- the temporal layers are new modules (fp32 masters while training, then the UNet's compute
  dtype), owned by the output MODEL's object patches;
- every attn1/attn2 ``to_q`` is trained as a copy of the weight the input MODEL runs with (its
  LoRA included) through a ComfyUI weight wrapper on a private training clone; the output MODEL
  carries the result as ``set`` weight patches after the input's own patches, so the base
  weights are never written, other LoRA keys keep applying, and a LoRA loaded after this node
  patches the tuned ``to_q`` as usual;
- the frozen 2D weights are the input model's own tensors (shared, never copied). Gradient
  checkpointing wraps the forward of each layer of the top-level UNet blocks while training, as ComfyUI's own
  Train LoRA node does, and is removed before the node returns, also on Cancel or error.

A save name writes the tuned UNet in the FateZero layout (diffusers 2D names plus
``attn_temporal``/``norm_temporal``/``conv_temporal``) to ``models/tuneavideo``; the Tune-A-Video
Loader reloads it to the same network, bit for bit. A name that exists or a folder that cannot be
written is refused before training; a save that still fails afterwards never overwrites a file and
only warns, naming the path: the MODEL output keeps the tuned network.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile

import torch
import torch.utils.checkpoint
from torch import nn

import comfy.model_management
import comfy.samplers
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..fatezero_core.errors import FateZeroError
from ..fatezero_core.keyframes import TAV_KEY_RULE
from ..fatezero_core.module_paths import ModuleResolver, resolved_children, resolved_modules
from ..fatezero_core.tav import train as core
from ..fatezero_core.tav.checkpoint import sd1_inflated_convs, sd1_transformer_blocks, write_checkpoint
from .clip_runtime import clip_runtime, model_group_norm
from .patching import add_clip_self_attention, model_key_rule, model_object, refuse_context_windows, unet_resolver
from .tav_loader import (
    FOLDER,
    compute_dtype,
    diffusers_key_map,
    diffusers_state_dict,
    insert_temporal_layers,
    module_path,
    sd1_unet_problem,
)
from .user_errors import FateZeroNodeError, reports_user_errors

log = logging.getLogger("comfyui-fatezero")

PRECISIONS = ["auto", "fp32", "bf16", "fp16"]
TRAINABLE_SETS = ["official", "no temporal conv"]
SAVE_NAME = re.compile(r"^[\w\-. ]+(/[\w\-. ]+)*$")
PREVIEW_EVERY = 10  # steps between loss-curve previews


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------

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


def training_dtype(precision: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on a CUDA device that has it, else fp16 (with loss scaling) on CUDA, fp32
    elsewhere (CPU, MPS)."""
    if precision == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def save_path(save_name: str) -> str | None:
    """``models/tuneavideo/<save_name>.safetensors`` (first ``tuneavideo`` folder), or None for an
    empty name. Never outside that folder, never an existing file, never where nothing can be
    written: checked before any training."""
    name = save_name.strip().replace("\\", "/")
    if not name:
        return None
    if name.lower().endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if not SAVE_NAME.match(name) or any(part in (".", "..") for part in name.split("/")):
        raise FateZeroNodeError(
            f"save_name '{save_name}' is not a plain file name; use letters, digits, '-', '_' and "
            "'/' for a subfolder, e.g. 'my_clip_tuned_200'.")
    root = os.path.abspath(folder_paths.get_folder_paths(FOLDER)[0])
    path = os.path.join(root, *name.split("/")) + ".safetensors"
    if os.path.lexists(path):
        raise FateZeroNodeError(f"{path} already exists; choose another save_name or delete that file.")
    problem = unwritable(os.path.dirname(path))
    if problem:
        raise FateZeroNodeError(f"Cannot save the tuned model to {path}: {problem}. Choose another save_name, "
                                "or make that folder writable.")
    return path


def unwritable(folder: str) -> str | None:
    """Why no file can be created in ``folder`` (or, while it does not exist, in the nearest
    existing folder above it, where its subfolders would go), or None. A hidden file is created
    and removed there: permissions, read-only file systems and a file in the way all show."""
    existing = folder
    while not os.path.lexists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing} is a file, not a folder"
    try:
        handle, probe = tempfile.mkstemp(dir=existing, prefix=".fatezero_write_check_")
    except OSError as error:
        return f"{existing} is not writable ({error.strerror or error})"
    os.close(handle)
    os.remove(probe)
    return None


# --------------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------------

def query_weight_keys(resolve: ModuleResolver) -> list[str]:
    """State-dict keys of every attn1/attn2 ``to_q`` weight of the UNet that ``resolve`` reads
    (``diffusion_model.``)."""
    return [f"diffusion_model.{name}.weight" for name, _ in resolved_modules(resolve)
            if name.endswith(("attn1.to_q", "attn2.to_q"))]


def fresh_layers(model, heads: int, lora_rank: int | None, seed: int):
    """Untuned temporal layers for every SD1.x transformer block and inflated conv of ``model``'s
    UNet, found through ComfyUI's key conversion."""
    resolve = unet_resolver(model)
    key_map = diffusers_key_map(model.model.model_config.unet_config)
    blocks = {b: int(resolve(module_path(b, key_map)).norm1.normalized_shape[0]) for b in sd1_transformer_blocks()}
    convs = {c: int(resolve(module_path(c, key_map)).weight.shape[0]) for c in sd1_inflated_convs()}
    return core.fresh_temporal_checkpoint(blocks, convs, lora_rank, heads, seed)


class TrainedWeight(nn.Module):
    """A ComfyUI weight wrapper that runs a module with a trainable copy of its weight."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return self.weight.to(device=weight.device, dtype=weight.dtype)


def _frozen(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach()


def freeze_weights(trainer, skip: set[str]) -> None:
    """Keep autograd away from the shared 2D weights without touching them: ComfyUI parameters
    require grad (backward would fill a gradient for every weight of the UNet) and, when created
    under the executor's ``inference_mode``, cannot be saved for backward at all. A weight function
    on the training clone hands each op ComfyUI's cast copy, detached (one layer's weights at a time
    under gradient checkpointing); the model's tensors and flags are not changed."""
    for name, module in resolved_modules(unet_resolver(trainer)):
        if not hasattr(module, "weight_function"):
            continue
        for attr in ("weight", "bias"):
            key = f"diffusion_model.{name}.{attr}"
            if getattr(module, attr, None) is not None and key not in skip:
                trainer.add_weight_wrapper(key, _frozen)


def checkpointed(module: nn.Module) -> None:
    """Recompute ``module``'s forward in backward (instance attribute, removed by :func:`restore`)."""
    forward = module.forward

    def run(*args, **kwargs):
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    module.forward = run


def restore(modules) -> None:
    for module in modules:
        module.__dict__.pop("forward", None)


def checkpoint_units(resolve: ModuleResolver) -> list[nn.Module]:
    """The layers of every top-level UNet block (ResBlocks, SpatialTransformers, samplers, inserted
    temporal convs) of the UNet that ``resolve`` reads: the UNet calls them one by one, so each is
    recomputed on its own."""
    blocks = [*resolved_children(resolve, "input_blocks"), ("middle_block", None),
              *resolved_children(resolve, "output_blocks")]
    return [layer for block, _ in blocks for _, layer in resolved_children(resolve, block)]


class TuneRun:
    """One tuning run: the output MODEL (a clone of the input with fresh temporal layers), a
    private training clone, and the trainable tensors."""

    def __init__(self, model, samples, source, lora_rank: int | None, seed: int, precision: str,
                 checkpointing: bool):
        self.model, self.samples, self.source = model, samples, source
        self.seed, self.checkpointing, self.precision = seed, checkpointing, precision
        heads = int(model.model.model_config.unet_config.get("num_heads", 8)) or 8
        fresh = fresh_layers(model, heads, lora_rank, seed)
        self.output = model.clone()
        insert_temporal_layers(self.output, fresh, dtype=torch.float32)  # fp32 masters
        self.layers = list(clip_runtime(self.output).modules)
        # diffusers owner paths of the layers, in insertion order (the fresh tensors are dropped)
        self.attention_owners, self.conv_owners = list(fresh.temporal_attention), list(fresh.temporal_convs)
        self.q_keys = query_weight_keys(unet_resolver(model))
        self.trainer = None
        self.device = model.load_device
        self.dtype = training_dtype(precision, self.device)
        self.q_params: dict[str, nn.Parameter] = {}
        self.losses: list[float] = []

    # ---- setup -----------------------------------------------------------------------------------
    def training_clone(self):
        trainer = self.output.clone()
        add_clip_self_attention(trainer, TAV_KEY_RULE,
                                on_call=comfy.model_management.throw_exception_if_processing_interrupted)
        if self.dtype != compute_dtype(self.model):
            trainer.set_model_compute_dtype(self.dtype)
        # Load once so the weights are the ones the input MODEL runs with (LoRA applied).
        comfy.model_management.load_models_gpu([trainer], force_full_load=True)
        freeze_weights(trainer, set(self.q_keys))
        for key in self.q_keys:
            weight = model_object(trainer, key)
            self.q_params[key] = nn.Parameter(weight.detach().to(self.device, torch.float32, copy=True))
            trainer.add_weight_wrapper(key, TrainedWeight(self.q_params[key]))
        for layer in self.layers:
            layer.to(self.device).train()
            for name, param in layer.named_parameters():
                param.requires_grad_(core.is_trainable(name))
        self.trainer = trainer
        return trainer

    def params(self) -> list[torch.Tensor]:
        temporal = [p for layer in self.layers for p in layer.parameters() if p.requires_grad]
        return list(self.q_params.values()) + temporal

    # ---- loop (run by TrainSampler inside ComfyUI's sampling setup) --------------------------------
    def loop(self, model_wrap, extra_args, x0, steps: int, lr: float, progress) -> None:
        scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 and self.device.type == "cuda" else None
        sampling = model_wrap.inner_model.model_sampling
        blocks = checkpoint_units(unet_resolver(self.trainer)) if self.checkpointing else []
        for block in blocks:
            checkpointed(block)
        try:
            self.losses = core.tune_clip(
                lambda x, sigma: model_wrap(x, sigma, **extra_args),
                lambda timestep: sampling.sigma(torch.tensor([float(timestep)])),
                x0, self.params(), steps, core.OptimizerSettings(lr=lr), self.seed, scaler,
                on_step=progress, before_step=comfy.model_management.throw_exception_if_processing_interrupted)
        finally:
            restore(blocks)

    # ---- result ----------------------------------------------------------------------------------
    def finish(self):
        """The output MODEL: tuned ``to_q`` as ``set`` patches, temporal layers in compute dtype."""
        for key, param in self.q_params.items():
            base = model_object(self.model, key)
            self.output.add_patches({key: ("set", (param.detach().to(device=self.model.offload_device, dtype=base.dtype),))})
        dtype = compute_dtype(self.output)
        for layer in self.layers:
            layer.requires_grad_(False)
            layer.to(device=self.output.offload_device, dtype=dtype).eval()
        return self.output

    def layout_state_dict(self) -> dict[str, torch.Tensor]:
        """The tuned UNet as the output MODEL runs it, in the FateZero checkpoint layout."""
        comfy.model_management.load_models_gpu([self.output], force_full_load=True)
        unet_2d = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in diffusers_state_dict(self.output).items()}
        groups = {owner: {k: v.detach().to("cpu", copy=True).contiguous() for k, v in layer.state_dict().items()}
                  for owner, layer in zip(self.attention_owners + self.conv_owners, self.layers)}
        attention = {o: groups[o] for o in self.attention_owners}
        convs = {o: groups[o] for o in self.conv_owners}
        return core.fatezero_layout(unet_2d, attention, convs)


class TrainSampler(comfy.samplers.Sampler):
    """Runs the tuning loop where a sampler would run, so ComfyUI loads the model, converts the
    conditioning and applies every patch and wrapper as for sampling (as its Train LoRA node)."""

    def __init__(self, run: TuneRun, steps: int, lr: float, progress):
        self.run, self.steps, self.lr, self.progress = run, steps, lr, progress

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        self.run.loop(model_wrap, extra_args, latent_image, self.steps, self.lr, self.progress)
        return latent_image


def save_tuned(run: "TuneRun", path: str, metadata: dict, node_id) -> None:
    """Write the tuned UNet to ``path``; when that fails (a file that appeared there meanwhile,
    a full disk, a folder gone or made read-only) only warn, naming the path: the MODEL output
    still carries the tuned network."""
    from safetensors import SafetensorError

    try:
        write_checkpoint(path, run.layout_state_dict(), metadata)
    except FileExistsError:
        reason = "a file with that name appeared while training; it was left as it is"
    except (OSError, SafetensorError) as error:
        reason = str(error)
    else:
        log.info("Tune-A-Video Train: saved %s", path)
        return
    message = (f"Tune-A-Video Train: the tuned model was NOT saved to {path} ({reason}). The MODEL output "
               "still has it for this run; change save_name and run again to save it.")
    log.warning(message)
    show_text(node_id, message)


def show_text(node_id, text: str) -> None:
    """``text`` under the node in the ComfyUI frontend, when a client is connected."""
    try:
        from server import PromptServer
        server = PromptServer.instance
    except (ImportError, AttributeError):
        return
    if node_id is not None and getattr(server, "client_id", None):
        server.send_progress_text(text, node_id)


def progress_reporter(steps: int, node_id):
    """ComfyUI progress bar with the running loss (text under the node) and the loss curve as the
    preview every few steps."""
    bar = comfy.utils.ProgressBar(steps, node_id=node_id)

    def report(step: int, losses: list[float]) -> None:
        window = core.running_mean(losses, max(1, steps // 10))[-1]
        preview = None
        if step % PREVIEW_EVERY == 0 or step == steps:
            from PIL import Image
            image = core.loss_curve_image(losses)[0].mul(255).byte().numpy()
            preview = ("PNG", Image.fromarray(image), 512)
        bar.update_absolute(step, steps, preview)
        show_text(node_id, f"step {step}/{steps}  loss {window:.4f}")
        if step % PREVIEW_EVERY == 0 or step == steps:
            log.info("Tune-A-Video Train: step %d/%d, loss %.4f (running mean %.4f)", step, steps, losses[-1], window)

    return report


def tune(model, samples, source, steps, learning_rate, seed, gradient_checkpointing, precision, lora_rank,
         progress):
    """Tune a clone of ``model`` on the clip ``samples``; returns ``(run, output MODEL)``."""
    run = TuneRun(model, samples, source, lora_rank, seed, precision, gradient_checkpointing)
    trainer = run.training_clone()
    guider = comfy.samplers.CFGGuider(trainer)
    guider.set_conds(source, [])
    guider.set_cfg(1.0)  # the conditional prediction only, as in training
    sampler = TrainSampler(run, steps, learning_rate, progress)
    dummy_sigmas = torch.tensor([1.0, 0.0])
    guider.sample(torch.zeros_like(samples), samples, sampler, dummy_sigmas, seed=seed, disable_pbar=True)
    return run, run.finish()


# --------------------------------------------------------------------------------------------------
# Node
# --------------------------------------------------------------------------------------------------

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
                trainable, lora_rank, save_name) -> io.NodeOutput:
        samples = latent["samples"]
        frames = core.check_clip_latent(samples)
        check_base_model(model)
        path = save_path(save_name)
        rank = lora_rank if trainable == "official" else None
        node_id = cls.hidden.unique_id if cls.hidden else None
        progress = progress_reporter(steps, node_id)
        with torch.inference_mode(False), torch.enable_grad():
            try:
                run, trained = tune(model, samples.clone(), [[c.clone(), dict(o)] for c, o in source],
                                    steps, learning_rate, seed, gradient_checkpointing, precision, rank, progress)
            except torch.OutOfMemoryError:
                comfy.model_management.soft_empty_cache()
                raise FateZeroError(core.oom_advice(frames, samples.shape[2], samples.shape[3],
                                                    gradient_checkpointing, precision)) from None
        if path:
            save_tuned(run, path, {"fatezero_layout": "fatezero", "tuned_steps": steps, "learning_rate": learning_rate,
                                   "seed": seed, "frames": frames, "lora_rank": rank or 0}, node_id)
        return io.NodeOutput(trained, core.loss_curve_image(run.losses))
