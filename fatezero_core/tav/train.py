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
  to 1.0 (the official script uses 8-bit AdamW; plain AdamW is the same update in full precision);
- every step: the whole clip as one sample, one timestep ``t ~ U{0, ..., 999}``, Gaussian noise,
  ``loss = mse(eps_theta(x_t, t, c_src), eps)`` in fp32.

The host supplies the network (``predict``: noisy latent and timestep in, noise prediction out)
and the trainable tensors; nothing here imports a host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

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


@dataclass(frozen=True)
class OptimizerSettings:
    """AdamW settings of the official Tune-A-Video / FateZero tuning config."""

    lr: float = OFFICIAL_LEARNING_RATE
    betas: Tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    eps: float = 1e-8
    max_grad_norm: float = 1.0


def is_trainable(name: str) -> bool:
    """The official selection by module/parameter name (``train_tune_a_video.py`` L153-159):
    ``...to_q.*``, ``...attn_temporal.*`` and ``...conv_temporal.*``; never ``norm_temporal``."""
    parts = name.split(".")
    return "to_q" in parts or "attn_temporal" in parts or "conv_temporal" in parts


def check_video_latent(samples: torch.Tensor) -> int:
    """Frames of a frame-major clip latent ``[F, 4, h, w]``; errors say what to connect instead."""
    if samples.ndim != 4 or samples.shape[1] != 4:
        raise FateZeroError(
            f"Tune-A-Video training expects the clip's SD latent [frames, 4, h, w], got shape "
            f"{list(samples.shape)}; encode the frames of Load Video Frames with a plain VAE Encode "
            "(an SD1.x VAE).")
    frames = int(samples.shape[0])
    if frames < MIN_FRAMES:
        raise FateZeroError(
            f"Tune-A-Video training needs a clip of at least {MIN_FRAMES} frames (got {frames}): its "
            "temporal layers learn how frames follow each other. Load more frames (8 as the paper).")
    return frames


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


def make_optimizer(params: Iterable[torch.Tensor], settings: OptimizerSettings = OptimizerSettings()) -> torch.optim.Optimizer:
    """AdamW with the official settings (``settings``)."""
    return torch.optim.AdamW(list(params), lr=settings.lr, betas=settings.betas,
                             weight_decay=settings.weight_decay, eps=settings.eps)


def train_step(loss_fn: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer,
               params: Sequence[torch.Tensor], max_grad_norm: float = 1.0,
               scaler: Optional["torch.amp.GradScaler"] = None) -> float:
    """One optimisation step: ``loss_fn()`` (forward), backward, gradient-norm clipping, AdamW.

    With ``scaler`` (fp16 training) the loss is scaled before backward and the gradients unscaled
    before clipping; a step with inf/nan gradients is skipped by the scaler, as in the official
    mixed-precision loop. Returns the loss value."""
    optimizer.zero_grad(set_to_none=True)
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


def tune_video(denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
              sigma_of: Callable[[int], torch.Tensor], x0: torch.Tensor, params: Sequence[torch.Tensor],
              steps: int, settings: OptimizerSettings, seed: int,
              scaler: Optional["torch.amp.GradScaler"] = None,
              on_step: Optional[Callable[[int, List[float]], None]] = None,
              before_step: Optional[Callable[[], None]] = None) -> List[float]:
    """The official one-shot tuning loop (``train_tune_a_video.py``) on one clip; returns the losses.

    Each step draws a timestep and noise (:func:`draw_step`, seeded on the CPU), noises the clip as
    ``x = x0 + sigma(t) * eps`` (the eps parameterisation in the host's VE form), runs ``denoise``
    on the whole clip, and takes the MSE to the noise (:func:`noise_prediction_loss`) through one
    AdamW step with gradient clipping (:func:`train_step`). ``before_step`` may raise to stop (the
    host's interrupt); ``on_step(done, losses)`` reports progress."""
    optimizer = make_optimizer(params, settings)
    generator = torch.Generator().manual_seed(seed)
    x0 = x0.to(torch.float32)
    losses: List[float] = []
    for step in range(steps):
        if before_step is not None:
            before_step()
        timestep, noise = draw_step(generator, x0)
        noise = noise.to(x0.device)
        sigma = sigma_of(timestep).to(x0.device, torch.float32)

        def loss_fn():
            x = x0 + sigma * noise
            denoised = denoise(x, sigma.expand(x.shape[0]))
            return noise_prediction_loss(eps_from_denoised(x, denoised.float(), sigma), noise)

        losses.append(train_step(loss_fn, optimizer, params, settings.max_grad_norm, scaler))
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


def loss_curve_image(losses: Sequence[float], width: int = 512, height: int = 256) -> torch.Tensor:
    """The loss per step (grey) and its running mean over a tenth of the steps (blue) on a white
    plot with axes and min/max labels, as an IMAGE batch ``[1, height, width, 3]`` in [0, 1]."""
    img = np.full((height, width, 3), 255, np.uint8)
    left, right, top, bottom = 48, width - 8, 8, height - 20
    cv2.line(img, (left, top), (left, bottom), (0, 0, 0), 1)
    cv2.line(img, (left, bottom), (right, bottom), (0, 0, 0), 1)
    if losses:
        lo, hi = min(losses), max(losses)
        span = hi - lo if hi > lo else 1.0
        n = len(losses)

        def points(values):
            xs = [left + (right - left) * (i / max(n - 1, 1)) for i in range(n)]
            ys = [bottom - (bottom - top) * ((v - lo) / span) for v in values]
            return np.array([[round(x), round(y)] for x, y in zip(xs, ys)], np.int32).reshape(-1, 1, 2)

        cv2.polylines(img, [points(losses)], False, CURVE_RAW, 1, cv2.LINE_AA)
        cv2.polylines(img, [points(running_mean(losses, max(1, n // 10)))], False, CURVE_MEAN, 2, cv2.LINE_AA)
        font = cv2.FONT_HERSHEY_SIMPLEX
        cv2.putText(img, f"{hi:.3g}", (2, top + 10), font, 0.35, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(img, f"{lo:.3g}", (2, bottom), font, 0.35, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(img, f"step {n}  loss {losses[-1]:.4f}", (left + 4, height - 5), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
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
    "OFFICIAL_STEPS", "OptimizerSettings", "check_video_latent", "draw_step", "eps_from_denoised",
    "fatezero_layout", "fresh_temporal_checkpoint", "is_trainable", "loss_curve_image",
    "make_optimizer", "noise_prediction_loss", "oom_advice", "running_mean", "train_step", "tune_video",
]
