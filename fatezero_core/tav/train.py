"""One-shot Tune-A-Video tuning on one clip, as pure functions.

Tune-A-Video (Wu et al., ICCV 2023) tunes a text-to-image UNet on the one clip to be edited, with
the standard noise-prediction objective, so shape edits keep the clip's motion. FateZero ships its
own copy of the script (``train_tune_a_video.py`` in github.com/ChenyangQiQi/FateZero at 9b6cb7b:
``train``, with ``config/tune/*.yaml``), whose settings are the defaults here:

- trainable: every module whose name ends in ``.to_q`` (attn1 and attn2 of each transformer block,
  and the temporal attention's own q) or ``attn_temporal``, plus ``conv_temporal`` (the
  temporal-conv LoRA, rank 160 in the released shape configs, ``C // 2`` where 160 > C);
  ``norm_temporal`` is *not* trained;
- AdamW, lr 1e-5 constant, betas (0.9, 0.999), weight decay 1e-2, eps 1e-8, gradient norm clipped
  to 1.0; the official script defaults to bitsandbytes' 8-bit AdamW (``use_8bit_adam``), offered as
  ``AdamW8bit`` beside full-precision ``AdamW``. Gradients are zeroed, never freed, between steps:
  accelerate 0.15's ``AcceleratedOptimizer.zero_grad`` passes ``set_to_none=False``, so a tensor
  that took part in one step keeps a zero gradient and AdamW keeps moving it (momentum, weight
  decay) in a step that gives it no gradient (the class step below, for the temporal layers);
- every step: the whole clip as one sample, one timestep ``t ~ U{0, ..., 999}``, Gaussian noise,
  ``loss = mse(eps_theta(x_t, t, c_src), eps)`` in fp32;
- with class images (the official "synthetic negative-prompt dataset" of ``class_data_root`` and
  ``class_data_prompt``; ``DDPMTrainer.step`` in ``video_diffusion/trainer/ddpm_trainer.py``), each
  iteration first runs the class step (``DDPMTrainer.step2d``): ``F`` consecutive class images
  (``F`` = the clip's frames, chosen as ``ImageSequenceDataset.__getitem__`` in
  ``video_diffusion/data/dataset.py`` chooses them) as single images with the class prompt, one
  timestep and noise per image, the same MSE, its own backward, clipping and optimizer step; then
  the clip step. Two optimizer steps per iteration.

The host supplies the network (``predict``: noisy latent and timestep in, noise prediction out)
and the trainable tensors; nothing here imports a host.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Protocol, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ..errors import FateZeroError
from .checkpoint import LAYOUT_FATEZERO, TavCheckpoint, TemporalConvWeights
from .modules import TemporalAttention, TemporalConv, effective_lora_rank

NUM_TRAIN_TIMESTEPS = 1000
OFFICIAL_LEARNING_RATE = 1e-5
OFFICIAL_LORA_RANK = 160  # model_config.lora of jeep_posche / swan_duck_flamingo
OFFICIAL_STEPS = 200  # jeep_tuned_200; the released checkpoints are 150-250 steps
OFFICIAL_SEED = 74831
MIN_FRAMES = 2
OPTIMIZERS = ("AdamW", "AdamW8bit")


@dataclass(frozen=True)
class OptimizerSettings:
    """AdamW settings of the official Tune-A-Video / FateZero tuning config."""

    lr: float = OFFICIAL_LEARNING_RATE
    betas: Tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    eps: float = 1e-8
    max_grad_norm: float = 1.0


def check_optimizer(name: str, device_type: str) -> None:
    """Refuse an optimizer that cannot run here, saying what to change. ``AdamW8bit`` is
    bitsandbytes' ``bnb.optim.AdamW8bit`` (the official ``use_8bit_adam``), which needs the package
    and a CUDA device."""
    if name not in OPTIMIZERS:
        raise FateZeroError(f"Unknown optimizer '{name}'; use one of {', '.join(OPTIMIZERS)}.")
    if name != "AdamW8bit":
        return
    if device_type != "cuda":
        raise FateZeroError(
            f"optimizer AdamW8bit needs a CUDA GPU (bitsandbytes), but this model trains on the "
            f"{device_type.upper()}. Set optimizer to AdamW.")
    _bitsandbytes()


def _bitsandbytes():
    try:
        import bitsandbytes
    except ImportError:
        raise FateZeroError(
            "optimizer AdamW8bit needs the bitsandbytes package, which is not installed in ComfyUI's "
            "Python. Install it there (pip install bitsandbytes) and restart ComfyUI, or set optimizer "
            "to AdamW.") from None
    return bitsandbytes


def is_trainable(name: str) -> bool:
    """The official selection by module/parameter name (``train_tune_a_video.py`` L153-159):
    ``...to_q.*``, ``...attn_temporal.*`` and ``...conv_temporal.*``; never ``norm_temporal``."""
    parts = name.split(".")
    return "to_q" in parts or "attn_temporal" in parts or "conv_temporal" in parts


def _latent_count(samples: torch.Tensor, shape_error: str) -> int:
    """Images of an SD latent ``[N, 4, h, w]``; ``shape_error`` (the shape appended) otherwise."""
    if samples.ndim != 4 or samples.shape[1] != 4:
        raise FateZeroError(shape_error.format(shape=list(samples.shape)))
    return int(samples.shape[0])


def check_video_latent(samples: torch.Tensor) -> int:
    """Frames of a frame-major clip latent ``[F, 4, h, w]``; errors say what to connect instead."""
    frames = _latent_count(samples, (
        "Tune-A-Video training expects the clip's SD latent [frames, 4, h, w], got shape {shape}; "
        "encode the frames of Load Video Frames with a plain VAE Encode (an SD1.x VAE)."))
    if frames < MIN_FRAMES:
        raise FateZeroError(
            f"Tune-A-Video training needs a clip of at least {MIN_FRAMES} frames (got {frames}): its "
            "temporal layers learn how frames follow each other. Load more frames (8 as the paper).")
    return frames


def check_class_latent(samples: torch.Tensor, frames: int) -> int:
    """Count of the class images ``[N, 4, h, w]`` (VAE-encoded), at least the clip's ``frames``:
    each class step takes ``frames`` consecutive images."""
    count = _latent_count(samples, (
        "class_latent must be SD latents [images, 4, h, w], got shape {shape}; VAE Encode the class "
        "images (or connect the KSampler's LATENT that made them)."))
    if count < frames:
        raise FateZeroError(
            f"class_latent holds {count} image(s), but each class step uses as many as the clip has "
            f"frames ({frames}). Make at least {frames} class images (the batch_size of their Empty "
            "Latent Image), e.g. 2-4x the frame count so the steps see different ones.")
    return count


# --------------------------------------------------------------------------------------------------
# Fresh temporal layers
# --------------------------------------------------------------------------------------------------

def fresh_temporal_checkpoint(block_channels: Dict[str, int], conv_channels: Dict[str, int],
                              lora_rank: Optional[int], heads: int, seed: int) -> TavCheckpoint:
    """The temporal part of a Tune-A-Video UNet before tuning, in the FateZero layout.

    ``block_channels``: diffusers transformer-block path -> width; ``conv_channels``: diffusers
    conv path -> output channels (empty or ``lora_rank=None``: no temporal convs). Layers start as
    the official ones do, so the untuned network is the 2D one: temporal attention with Xavier
    q/k/v and zero output projection (its bias zero too, see ``TemporalAttention``), LoRA convs
    with ``down ~ N(0, 1/r)`` and ``up = 0``. ``seed`` fixes the random parts."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        attention = {}
        for block, c in block_channels.items():
            if c % heads:
                raise FateZeroError(f"A {c}-wide transformer block cannot be split into {heads} heads.")
            attention[block] = dict(TemporalAttention(c, heads, c // heads).state_dict())
        convs = {}
        for conv, c in (conv_channels.items() if lora_rank else ()):
            layer = TemporalConv(c, lora_rank=lora_rank)
            convs[conv] = TemporalConvWeights("lora", effective_lora_rank(c, lora_rank), dict(layer.state_dict()))
    finally:
        torch.random.set_rng_state(generator_state)
    return TavCheckpoint(LAYOUT_FATEZERO, {}, attention, convs, source="fresh Tune-A-Video layers")


def fatezero_layout(unet_2d: Dict[str, torch.Tensor], attention: Dict[str, Dict[str, torch.Tensor]],
                    convs: Dict[str, Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """One flat diffusers state dict in the FateZero layout, the one the official
    ``UNetPseudo3DConditionModel.from_2d_model`` loads (``video_diffusion/models/
    unet_3d_condition.py``): 2D keys unchanged, ``<block>.attn_temporal.*``,
    ``<block>.norm_temporal.*`` and ``<conv>.conv_temporal.*``."""
    out = dict(unet_2d)
    for owner, group in list(attention.items()) + list(convs.items()):
        for name, tensor in group.items():
            out[f"{owner}.{name}"] = tensor
    return out


# --------------------------------------------------------------------------------------------------
# Objective and step
# --------------------------------------------------------------------------------------------------

def draw_step(generator: torch.Generator, x0: torch.Tensor,
              num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> Tuple[int, torch.Tensor]:
    """One training sample of the official loop: ``t ~ U{0..T-1}`` and ``eps ~ N(0, I)`` shaped
    like the clip (one timestep for all frames: the clip is one sample). Drawn on the CPU from
    ``generator``, so a seed gives the same run on every device."""
    timestep = int(torch.randint(0, num_train_timesteps, (1,), generator=generator))
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32)
    return timestep, noise


def noise_prediction_loss(eps_pred: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """``mse(eps_theta, eps)`` over every element, in fp32 (``F.mse_loss(pred.float(), target.float())``)."""
    return F.mse_loss(eps_pred.float(), eps.float(), reduction="mean")


def eps_from_denoised(x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The noise prediction of an eps model run as a denoiser: ``x = x0 + sigma * eps`` and
    ``denoised = x - sigma * eps_theta``, so ``eps_theta = (x - denoised) / sigma``."""
    return (x - denoised) / sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


def make_optimizer(params: Iterable[torch.Tensor], settings: OptimizerSettings = OptimizerSettings(),
                   name: str = "AdamW") -> torch.optim.Optimizer:
    """``name`` (``AdamW``: torch's, fp32 states; ``AdamW8bit``: bitsandbytes', 8-bit states, see
    :func:`check_optimizer`) with the official settings (``settings``), as ``train_tune_a_video.py``
    builds its ``optimizer_class``."""
    if name not in OPTIMIZERS:
        raise FateZeroError(f"Unknown optimizer '{name}'; use one of {', '.join(OPTIMIZERS)}.")
    kwargs = dict(lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay, eps=settings.eps)
    if name == "AdamW8bit":
        return _bitsandbytes().optim.AdamW8bit(list(params), **kwargs)
    return torch.optim.AdamW(list(params), **kwargs)


def train_step(loss_fn: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer,
               params: Sequence[torch.Tensor], max_grad_norm: float = 1.0,
               scaler: Optional["torch.amp.GradScaler"] = None) -> float:
    """One optimisation step: ``loss_fn()`` (forward), backward, gradient-norm clipping, AdamW.

    Gradients are zeroed in place first, never set to ``None`` (accelerate 0.15's
    ``AcceleratedOptimizer.zero_grad``: ``set_to_none=False``; the official trainer zeroes after
    each step, the same thing for tensors that start without a gradient): a tensor the loss does
    not reach keeps a zero gradient once it has had one, and AdamW still applies its momentum and
    weight decay to it. When every tensor gets a gradient, this is the same update as freeing them.

    With ``scaler`` (fp16 training) the loss is scaled before backward and the gradients unscaled
    before clipping; a step with inf/nan gradients is skipped by the scaler, as in the official
    mixed-precision loop. Returns the loss value."""
    optimizer.zero_grad(set_to_none=False)
    loss = loss_fn()
    if not torch.isfinite(loss):
        raise FateZeroError(
            "The training loss is not finite. Lower the learning rate, or use precision fp32/bf16 "
            "instead of fp16.")
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
    return float(loss.detach())


def class_start(index: int, count: int, frames: int) -> int:
    """First of the ``frames`` consecutive class images that dataset item ``index`` uses, out of
    ``count``: ``index % (count - frames)`` (``ImageSequenceDataset.__getitem__`` and
    ``get_class_indices``). So the last image is never used; with exactly ``frames`` images (where
    the official modulo divides by zero) every step uses all of them."""
    return index % (count - frames) if count > frames else 0


class TuningDraws(Protocol):
    """The random draws of a tuning run, in the order the loop asks for them (a seam: the default is
    :class:`SeededDraws`; a test may replay another trainer's draws)."""

    def class_step(self, count: int, frames: int, shape: Sequence[int]) -> Tuple[int, torch.Tensor, torch.Tensor]:
        """``(start, timesteps [frames] int64, noise [frames, *shape] fp32)`` of one class step."""

    def clip_step(self, x0: torch.Tensor) -> Tuple[int, torch.Tensor]:
        """``(timestep, noise shaped like x0)`` of one clip step."""


class SeededDraws:
    """The draws of the official trainer's distributions from one CPU generator seeded with
    ``seed``, so a seed gives the same run on every device.

    - clip step: :func:`draw_step`;
    - class step: the data loader's order, then one timestep and noise per image as
      ``DDPMTrainer.step2d`` draws them. The official loader shuffles (``shuffle=True``) a dataset
      of ``max(1, count)`` items, so every ``count`` iterations take a fresh permutation of
      ``0..count-1``; item ``i`` starts at :func:`class_start`.

    A run without class images draws exactly the clip steps' sequence."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)
        self._order: List[int] = []

    def class_step(self, count: int, frames: int, shape: Sequence[int]) -> Tuple[int, torch.Tensor, torch.Tensor]:
        if not self._order:
            self._order = torch.randperm(count, generator=self.generator).tolist()
        start = class_start(self._order.pop(0), count, frames)
        timesteps = torch.randint(0, NUM_TRAIN_TIMESTEPS, (frames,), generator=self.generator)
        noise = torch.randn((frames, *shape), generator=self.generator, dtype=torch.float32)
        return start, timesteps, noise

    def clip_step(self, x0: torch.Tensor) -> Tuple[int, torch.Tensor]:
        return draw_step(self.generator, x0)


@dataclass
class ClassImages:
    """Regularization data of the official trainer: class latents ``[N, 4, h, w]`` (processed, as
    the model reads them; ``N`` >= the clip's frames) and ``denoise``, the host's network run on a
    batch of them as still images with the class prompt (per-image norms and self-attention, no
    temporal layers: the official UNet on a 4-D input). The loop appends each class step's loss to
    ``losses``."""

    latents: torch.Tensor
    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    losses: List[float] = field(default_factory=list)


def _noised_loss(denoise, x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The objective at ``x = x0 + sigma * noise``; ``sigma`` is ``[1]`` (one for the clip) or one
    per image."""
    sigma = sigma.reshape(-1, *([1] * (x0.ndim - 1)))

    def loss_fn():
        x = x0 + sigma * noise
        denoised = denoise(x, sigma.flatten().expand(x.shape[0]))
        return noise_prediction_loss(eps_from_denoised(x, denoised.float(), sigma.flatten()), noise)

    return loss_fn


def tune_video(denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
              sigma_of: Callable[[int], torch.Tensor], x0: torch.Tensor, params: Sequence[torch.Tensor],
              steps: int, settings: OptimizerSettings, seed: int,
              scaler: Optional["torch.amp.GradScaler"] = None,
              on_step: Optional[Callable[[int, List[float]], None]] = None,
              before_step: Optional[Callable[[], None]] = None,
              classes: Optional[ClassImages] = None, draws: Optional[TuningDraws] = None,
              optimizer: str = "AdamW") -> List[float]:
    """The official one-shot tuning loop (``train_tune_a_video.py``, ``DDPMTrainer.step``) on one
    clip; returns the clip steps' losses.

    Each iteration draws a timestep and noise (``draws``, default :class:`SeededDraws` of ``seed``),
    noises the clip as ``x = x0 + sigma(t) * eps`` (the eps parameterisation in the host's VE form),
    runs ``denoise`` on the whole clip, and takes the MSE to the noise (:func:`noise_prediction_loss`)
    through one optimizer step with gradient clipping (:func:`train_step`). With ``classes``, a class
    step on ``F`` of its latents as still images comes first (``DDPMTrainer.step2d``), with its own
    optimizer step. ``before_step`` may raise to stop (the host's interrupt); ``on_step(done,
    losses)`` reports progress after each iteration."""
    opt = make_optimizer(params, settings, optimizer)
    draws = draws if draws is not None else SeededDraws(seed)
    x0 = x0.to(torch.float32)
    frames = x0.shape[0]
    losses: List[float] = []
    for step in range(steps):
        if before_step is not None:
            before_step()
        if classes is not None:
            start, timesteps, noise = draws.class_step(classes.latents.shape[0], frames, classes.latents.shape[1:])
            images = classes.latents[start:start + frames].to(torch.float32)
            sigma = torch.cat([sigma_of(int(t)).reshape(1) for t in timesteps]).to(images.device, torch.float32)
            loss_fn = _noised_loss(classes.denoise, images, sigma, noise.to(images.device))
            classes.losses.append(train_step(loss_fn, opt, params, settings.max_grad_norm, scaler))
            if before_step is not None:
                before_step()
        timestep, noise = draws.clip_step(x0)
        sigma = sigma_of(timestep).to(x0.device, torch.float32)
        losses.append(train_step(_noised_loss(denoise, x0, sigma, noise.to(x0.device)), opt, params,
                                 settings.max_grad_norm, scaler))
        if on_step is not None:
            on_step(step + 1, losses)
    return losses


def running_mean(values: Sequence[float], window: int) -> List[float]:
    """Trailing mean over the last ``window`` values at every position."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


# --------------------------------------------------------------------------------------------------
# Loss curve
# --------------------------------------------------------------------------------------------------

CURVE_RAW = (170, 170, 170)
CURVE_MEAN = (30, 90, 200)
CLASS_RAW = (240, 200, 160)
CLASS_MEAN = (220, 110, 20)


def loss_curve_image(losses: Sequence[float], width: int = 512, height: int = 256,
                     class_losses: Optional[Sequence[float]] = None) -> torch.Tensor:
    """The loss per step (grey) and its running mean over a tenth of the steps (blue) on a white
    plot with axes and min/max labels, as an IMAGE batch ``[1, height, width, 3]`` in [0, 1].
    With ``class_losses`` (the class steps of the same iterations) those are drawn too, on the same
    scale: per step in light orange, running mean in orange."""
    img = np.full((height, width, 3), 255, np.uint8)
    left, right, top, bottom = 48, width - 8, 8, height - 20
    cv2.line(img, (left, top), (left, bottom), (0, 0, 0), 1)
    cv2.line(img, (left, bottom), (right, bottom), (0, 0, 0), 1)
    extra = list(class_losses or ())
    if losses:
        lo, hi = min(list(losses) + extra), max(list(losses) + extra)
        span = hi - lo if hi > lo else 1.0
        n = len(losses)

        def points(values):
            xs = [left + (right - left) * (i / max(n - 1, 1)) for i in range(len(values))]
            ys = [bottom - (bottom - top) * ((v - lo) / span) for v in values]
            return np.array([[round(x), round(y)] for x, y in zip(xs, ys)], np.int32).reshape(-1, 1, 2)

        if extra:
            cv2.polylines(img, [points(extra)], False, CLASS_RAW, 1, cv2.LINE_AA)
        cv2.polylines(img, [points(losses)], False, CURVE_RAW, 1, cv2.LINE_AA)
        if extra:
            cv2.polylines(img, [points(running_mean(extra, max(1, n // 10)))], False, CLASS_MEAN, 2, cv2.LINE_AA)
        cv2.polylines(img, [points(running_mean(losses, max(1, n // 10)))], False, CURVE_MEAN, 2, cv2.LINE_AA)
        font = cv2.FONT_HERSHEY_SIMPLEX
        cv2.putText(img, f"{hi:.3g}", (2, top + 10), font, 0.35, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(img, f"{lo:.3g}", (2, bottom), font, 0.35, (0, 0, 0), 1, cv2.LINE_AA)
        label = f"step {n}  loss {losses[-1]:.4f}"
        if extra:
            label += f"  class {extra[-1]:.4f}"
        cv2.putText(img, label, (left + 4, height - 5), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        if extra:
            cv2.putText(img, "clip", (right - 70, top + 10), font, 0.4, CURVE_MEAN, 1, cv2.LINE_AA)
            cv2.putText(img, "class", (right - 38, top + 10), font, 0.4, CLASS_MEAN, 1, cv2.LINE_AA)
    return torch.from_numpy(img).float().div(255.0).unsqueeze(0)


def oom_advice(frames: int, height: int, width: int, checkpointing: bool, precision: str) -> str:
    """What to change when training runs out of memory, most effective first."""
    steps = []
    if not checkpointing:
        steps.append("turn gradient_checkpointing on")
    if precision in ("fp32", "auto"):
        steps.append("set precision to bf16 (or fp16)")
    steps.append(f"load fewer frames (now {frames}) or a smaller size (now {width * 8}x{height * 8} px)")
    return "Tune-A-Video training ran out of GPU memory: " + "; ".join(steps) + "."


__all__ = [
    "MIN_FRAMES", "NUM_TRAIN_TIMESTEPS", "OFFICIAL_LEARNING_RATE", "OFFICIAL_LORA_RANK", "OFFICIAL_SEED",
    "OFFICIAL_STEPS", "OPTIMIZERS", "ClassImages", "OptimizerSettings", "SeededDraws", "TuningDraws",
    "check_class_latent", "check_optimizer", "check_video_latent", "class_start", "draw_step",
    "eps_from_denoised", "fatezero_layout", "fresh_temporal_checkpoint", "is_trainable", "loss_curve_image",
    "make_optimizer", "noise_prediction_loss", "oom_advice", "running_mean", "train_step", "tune_video",
]
