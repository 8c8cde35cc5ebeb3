"""One Tune-A-Video tuning run on a ComfyUI model, and the file it may write.

The network tuned is exactly the one the Tune-A-Video Loader builds (``tav_network``): temporal
attention after every transformer block and temporal-conv LoRA after every inflated conv, inserted
as object patches on a clone of the input MODEL; clip-level ResNet/output GroupNorm
(``video_runtime``); and spatio-temporal self-attention with the Tune-A-Video keys (previous + first
frame), which FateZero's own nodes apply through their attn1 patches and the trainer through
:func:`~.patching.add_video_self_attention`. The objective and optimiser are
``fatezero_core.tav.train`` (the official settings).

What is trained and how the result is carried:

- the temporal layers are new modules (fp32 masters while training, then the UNet's compute
  dtype), owned by the output MODEL's object patches;
- every attn1/attn2 ``to_q`` is trained as a copy of the weight the input MODEL runs with (its
  LoRA included) through a ComfyUI weight wrapper on a private training clone; the output MODEL
  carries the result as ``set`` weight patches after the input's own patches, so the base
  weights are never written, other LoRA keys keep applying, and a LoRA loaded after the tuning
  patches the tuned ``to_q`` as usual;
- the frozen 2D weights are the input model's own tensors (shared, never copied), read through
  weight wrappers (``unet_training``).

The loop runs where a sampler would (:class:`TrainSampler`, as ComfyUI's Train LoRA node,
``comfy_extras/nodes_train.py``), so ComfyUI loads the model, converts the conditioning and applies
every patch and wrapper as for sampling. With class images (the official regularization), the
class step runs through the same guider with the class prompt, its UNet calls flagged as still
images (``video_runtime.still_images_options``): per-image norms and self-attention, no temporal
layers, as the official UNet runs the 4-D class batch.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

import comfy.model_management
import comfy.samplers

from ..fatezero_core.keyframes import TAV_KEY_RULE
from ..fatezero_core.tav import train as tuning
from ..fatezero_core.tav.checkpoint import write_checkpoint
from .patching import STILL_IMAGES_KEY, add_video_self_attention, model_object, unet_resolver
from .tav_network import compute_dtype, diffusers_state_dict, fresh_layers, insert_temporal_layers
from .training_progress import show_text
from .video_runtime import still_images_options, video_runtime
from .unet_training import TrainedWeight, freeze_weights, gradient_checkpointing, query_weight_keys

log = logging.getLogger("comfyui-fatezero")


def _cpu_copy(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}


class TuneRun:
    """One tuning run: the output MODEL (a clone of the input with fresh temporal layers), a
    private training clone, and the trainable tensors.

    ``initial``: the temporal layers to start from (a ``TavCheckpoint`` in the FateZero layout;
    default: fresh ones from ``seed``), e.g. another trainer's, to compare two runs."""

    def __init__(self, model, lora_rank: int | None, seed: int, dtype: torch.dtype, checkpointing: bool,
                 optimizer: str = "AdamW", initial=None, class_losses: list[float] | None = None):
        self.model, self.seed, self.dtype, self.checkpointing = model, seed, dtype, checkpointing
        self.optimizer = optimizer
        fresh = initial if initial is not None else fresh_layers(model, lora_rank, seed)
        self.output = model.clone()
        self.layers = insert_temporal_layers(self.output, fresh, dtype=torch.float32)  # owner -> fp32 master
        # which owners hold temporal attention and which temporal convs (the fresh tensors are dropped)
        self.attention_owners, self.conv_owners = list(fresh.temporal_attention), list(fresh.temporal_convs)
        self.q_keys = query_weight_keys(unet_resolver(model))
        self.trainer = None
        self.device = model.load_device
        self.q_params: dict[str, nn.Parameter] = {}
        self.losses: list[float] = []
        self.class_losses: list[float] = [] if class_losses is None else class_losses

    # ---- setup -----------------------------------------------------------------------------------
    def training_clone(self):
        trainer = self.output.clone()
        add_video_self_attention(trainer, TAV_KEY_RULE,
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
        for layer in self.layers.values():
            layer.to(self.device).train()
            for name, param in layer.named_parameters():
                param.requires_grad_(tuning.is_trainable(name))
        self.trainer = trainer
        return trainer

    def params(self) -> list[torch.Tensor]:
        temporal = [p for layer in self.layers.values() for p in layer.parameters() if p.requires_grad]
        return list(self.q_params.values()) + temporal

    # ---- loop (run by TrainSampler inside ComfyUI's sampling setup) --------------------------------
    def loop(self, model_wrap, extra_args, x0, steps: int, lr: float, progress, class_latents=None,
             draws=None) -> None:
        """The tuning loop on the processed clip latent ``x0``; ``class_latents`` (as VAE Encode
        gives them) add the class step, run as still images with the guider's class prompt."""
        scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 and self.device.type == "cuda" else None
        sampling = model_wrap.inner_model.model_sampling
        classes = None
        if class_latents is not None:
            still_args = dict(extra_args, model_options=still_images_options(extra_args["model_options"]))
            latents = model_wrap.inner_model.process_latent_in(class_latents.to(x0.device))
            classes = tuning.ClassImages(latents, lambda x, sigma: model_wrap(x, sigma, **still_args),
                                         self.class_losses)
        with gradient_checkpointing(self.trainer, self.checkpointing, video_runtime(self.trainer).frames):
            self.losses = tuning.tune_video(
                lambda x, sigma: model_wrap(x, sigma, **extra_args),
                lambda timestep: sampling.sigma(torch.tensor([float(timestep)])),
                x0, self.params(), steps, tuning.OptimizerSettings(lr=lr), self.seed, scaler,
                on_step=progress, before_step=comfy.model_management.throw_exception_if_processing_interrupted,
                classes=classes, draws=draws, optimizer=self.optimizer)

    # ---- result ----------------------------------------------------------------------------------
    def finish(self):
        """The output MODEL: tuned ``to_q`` as ``set`` patches, temporal layers in compute dtype."""
        for key, param in self.q_params.items():
            base = model_object(self.model, key)
            self.output.add_patches({key: ("set", (param.detach().to(device=self.model.offload_device, dtype=base.dtype),))})
        dtype = compute_dtype(self.output)
        for layer in self.layers.values():
            layer.requires_grad_(False)
            layer.to(device=self.output.offload_device, dtype=dtype).eval()
        return self.output

    def layout_state_dict(self) -> dict[str, torch.Tensor]:
        """The tuned UNet as the output MODEL runs it, in the FateZero checkpoint layout: each
        owner's tensors are those of the layer inserted at that owner."""
        comfy.model_management.load_models_gpu([self.output], force_full_load=True)
        unet_2d = _cpu_copy(diffusers_state_dict(self.output))
        attention = {owner: _cpu_copy(self.layers[owner].state_dict()) for owner in self.attention_owners}
        convs = {owner: _cpu_copy(self.layers[owner].state_dict()) for owner in self.conv_owners}
        return tuning.fatezero_layout(unet_2d, attention, convs)


class TrainGuider(comfy.samplers.CFGGuider):
    """The conditional prediction only (cfg 1, as in training) with the clip's prompt, or with the
    class prompt (conds ``class``) for a call on still images: the class step sees nothing of the
    clip's prompt, as ``DDPMTrainer.step2d`` encodes only ``class_prompt_ids``. Both prompts go
    through ComfyUI's cond processing together (``CFGGuider.inner_sample``, ``process_conds``)."""

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        stills = model_options.get("transformer_options", {}).get(STILL_IMAGES_KEY)
        cond = self.conds.get("class" if stills else "positive")
        return comfy.samplers.sampling_function(self.inner_model, x, timestep, None, cond, 1.0,
                                                model_options=model_options, seed=seed)


class TrainSampler(comfy.samplers.Sampler):
    """Runs the tuning loop where a sampler would run, so ComfyUI loads the model, converts the
    conditioning and applies every patch and wrapper as for sampling (as its Train LoRA node)."""

    def __init__(self, run: TuneRun, steps: int, lr: float, progress, class_latents=None, draws=None):
        self.run, self.steps, self.lr, self.progress = run, steps, lr, progress
        self.class_latents, self.draws = class_latents, draws

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        self.run.loop(model_wrap, extra_args, latent_image, self.steps, self.lr, self.progress,
                      self.class_latents, self.draws)
        return latent_image


def tune(model, samples, source, steps, learning_rate, seed, gradient_checkpointing, dtype, lora_rank, progress,
         class_samples=None, class_prompt=None, optimizer="AdamW", class_losses=None, draws=None, initial=None):
    """Tune a clone of ``model`` on the clip ``samples`` in ``dtype``; returns ``(run, output MODEL)``.

    ``class_samples`` (VAE-encoded class images) with ``class_prompt`` (CONDITIONING) add the
    official class step to every iteration; its losses are appended to ``class_losses`` (a list
    the caller may watch, e.g. the progress bar) and kept as ``run.class_losses``. ``draws``
    (``fatezero_core.tav.train.TuningDraws``) and ``initial`` (temporal layers to start from, a
    FateZero-layout ``TavCheckpoint``) replace the seed's; both are seams for comparing with another
    trainer, the node never passes them."""
    run = TuneRun(model, lora_rank, seed, dtype, gradient_checkpointing, optimizer, initial, class_losses)
    trainer = run.training_clone()
    guider = TrainGuider(trainer)
    conds = {"positive": source, "negative": []}
    if class_samples is not None:
        conds["class"] = class_prompt
    guider.inner_set_conds(conds)
    guider.set_cfg(1.0)
    sampler = TrainSampler(run, steps, learning_rate, progress, class_samples, draws)
    dummy_sigmas = torch.tensor([1.0, 0.0])
    guider.sample(torch.zeros_like(samples), samples, sampler, dummy_sigmas, seed=seed, disable_pbar=True)
    return run, run.finish()


def save_tuned(run: TuneRun, path: str, metadata: dict, node_id) -> None:
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


__all__ = ["TrainGuider", "TuneRun", "save_tuned", "tune"]
