"""How many bytes an attention store will hold, worked out before the inversion runs, and the
refusal of a placement that cannot hold them.

The store (:mod:`fatezero_core.store`) keeps, per inversion step and stored layer
(:class:`fatezero_core.layers.LayerSet`):

- self-attention: the source queries of every frame ``[F, N, C]`` and the source keys of the key
  frames the layer's rule refers to ``[F_key, N, C]``; a layer narrower than ``min_st_channels``
  attends within its own frame (:func:`fatezero_core.keyframes.rule_for_channels`), so it keeps the
  keys of every frame;
- cross-attention: the source probabilities ``[F, heads, N, T]`` (``T`` = 77 for one CLIP chunk);

in the store dtype, plus the inversion latents ``z_0 .. z_N`` ``[F, 4, h, w]`` in float32. The
byte count here walks the same layers with the same rules, so it equals
:attr:`fatezero_core.store.AttentionStore.nbytes` of the finished capture exactly.

The layers come from plain numbers: :func:`unet_attention_layers` reads the UNet config the host
holds (ComfyUI: ``model.model.model_config.unet_config``) the way ComfyUI builds the UNet from it
(ComfyUI 0.3.64 ``comfy/ldm/modules/diffusionmodules/openaimodel.py``, ``UNetModel.__init__``).
No ComfyUI import: the config is a dict.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from .errors import FateZeroError, StoreTooLargeError
from .keyframes import key_frame_table, key_frames_used, rule_for_channels
from .layers import VAE_SCALE, LayerInfo, LayerSet, downsampled_side

TEXT_TOKENS = 77  # one CLIP chunk: BOS + 75 + EOS
LATENT_CHANNELS = 4  # SD1.x latent
LATENT_BYTES = 4  # the store keeps the inversion latents in float32 (AttentionStore.set_latents)

# A store may take at most this fraction of the memory (or disk space) that is free when DDIM
# Invert starts. The rest is for what runs beside it and grows after the check: the UNet's
# activations while inverting and, later, the edit's (twice the frames with CFG), the decoded
# frames and previews, ComfyUI's and the system's own allocations. Free memory read before a run is
# only a snapshot, so passing the check is no promise; failing it means the store would certainly
# not fit (or would push the machine into swap), which is what it exists to catch before the
# inversion spends its time.
STORE_MEMORY_FRACTION = 0.8


@dataclass(frozen=True)
class AttentionLayerShape:
    """One transformer block of the UNet (one attn1 + attn2 pair the host hooks): its downsampling
    ``level`` (0 = full latent resolution), attention ``heads`` and inner width ``channels``
    (heads x head width: the last dimension of the q, k, v the patches receive)."""

    level: int
    heads: int
    channels: int


def _per_block(value, count: int, name: str) -> list[int]:
    if isinstance(value, int):
        return [value] * count
    values = [int(v) for v in value]
    if len(values) != count:
        raise FateZeroError(
            f"The model's UNet config lists {len(values)} '{name}' entries for {count} blocks; "
            "FateZero cannot work out its attention layers. Use an SD1.x model."
        )
    return values


def unet_attention_layers(unet_config: Mapping) -> list[AttentionLayerShape]:
    """The attention layers of a UNet built from ``unet_config``, in call order (input blocks,
    middle, output blocks), as ComfyUI's ``UNetModel.__init__`` builds them: after each input
    res block of ``level`` a ``SpatialTransformer`` of ``transformer_depth`` blocks (read in
    order), the middle block's ``transformer_depth_middle`` blocks at the last level, and the output
    blocks' ``transformer_depth_output`` read from its end. Heads: ``num_heads`` with head width
    ``ch // num_heads``, or ``ch // num_head_channels`` heads of ``num_head_channels``; the
    last setting carries on to later blocks, as in ComfyUI.
    """
    try:
        model_channels = int(unet_config["model_channels"])
        channel_mult = [int(m) for m in unet_config["channel_mult"]]
        res_blocks = unet_config["num_res_blocks"]
    except (KeyError, TypeError):
        raise FateZeroError(
            "The model has no SD-style UNet config (model_channels, channel_mult, num_res_blocks), "
            "so FateZero cannot size its attention store. Use an SD1.x model."
        ) from None
    res_blocks = _per_block(res_blocks, len(channel_mult), "num_res_blocks")
    if not unet_config.get("use_spatial_transformer", True):
        return []  # no SpatialTransformer: no attn1/attn2 for the host to hook
    depth_in = _per_block(unet_config.get("transformer_depth", 1), sum(res_blocks), "transformer_depth")
    depth_out = _per_block(unet_config.get("transformer_depth_output", 1),
                           sum(n + 1 for n in res_blocks), "transformer_depth_output")
    depth_mid = unet_config.get("transformer_depth_middle")
    if depth_mid is None:
        depth_mid = depth_in[-1]  # ComfyUI's detection fills it in; older configs used the last
    attention_blocks = unet_config.get("num_attention_blocks")
    legacy = bool(unet_config.get("legacy", True))
    heads = int(unet_config.get("num_heads", -1))
    head_channels = int(unet_config.get("num_head_channels", -1))

    def shape(ch: int, level: int, depth: int) -> list[AttentionLayerShape]:
        # ComfyUI reassigns num_heads when num_head_channels is set, but always from the block's
        # own width right before use, so a block's heads depend on its width alone.
        n_heads = heads if head_channels == -1 else ch // head_channels
        dim_head = ch // n_heads if head_channels == -1 or legacy else head_channels
        return [AttentionLayerShape(level, n_heads, n_heads * dim_head)] * depth

    layers: list[AttentionLayerShape] = []
    depth_in = list(depth_in)
    for level, mult in enumerate(channel_mult):
        for nr in range(res_blocks[level]):
            depth = depth_in.pop(0)
            if depth > 0 and (attention_blocks is None or nr < attention_blocks[level]):
                layers += shape(mult * model_channels, level, depth)
    last = len(channel_mult) - 1
    ch = channel_mult[last] * model_channels
    layers += shape(ch, last, max(int(depth_mid), 0))
    depth_out = list(depth_out)
    for level in range(last, -1, -1):
        for i in range(res_blocks[level] + 1):
            depth = depth_out.pop()
            if depth > 0 and (attention_blocks is None or i < attention_blocks[level]):
                layers += shape(channel_mult[level] * model_channels, level, depth)
    return layers


@dataclass(frozen=True)
class StoreEstimate:
    """The bytes a capture will hold: ``attention_per_step`` (every stored layer's tensors of one
    inversion step), ``latent_per_step`` (one float32 latent ``z_j``), for ``steps`` steps and
    ``frames`` frames of a ``latent_size`` latent; :attr:`nbytes` is what
    ``AttentionStore.nbytes`` reports once the capture finishes (``gpu``, ``cpu``, ``disk``)."""

    steps: int
    frames: int
    latent_size: tuple[int, int]
    attention_per_step: int
    latent_per_step: int

    @property
    def attention(self) -> int:
        return self.steps * self.attention_per_step

    @property
    def latents(self) -> int:
        """``z_0 .. z_N``: N + 1 latents, kept on the CPU by every placement."""
        return (self.steps + 1) * self.latent_per_step

    @property
    def nbytes(self) -> int:
        return self.attention + self.latents

    def nbytes_for(self, placement: str) -> int:
        """``AttentionStore.nbytes`` of a finished capture in ``placement``."""
        return self.latents if placement == "recompute" else self.nbytes

    def needs(self, placement: str, device_is_ram: bool = False) -> dict[str, int]:
        """Bytes ``placement`` takes of each resource: ``"device"`` (the model's device memory),
        ``"ram"`` (host memory) and ``"disk"`` (the store folder). ``disk`` also holds one step
        in RAM: the capture keeps a step until it is written, the edit the step it read last.
        ``device_is_ram``: the model runs on the CPU (or shares its memory), so ``gpu`` tensors
        take RAM."""
        needs = {
            "gpu": {"device": self.attention, "ram": self.latents},
            "cpu": {"ram": self.nbytes},
            "disk": {"disk": self.attention, "ram": self.latents + self.attention_per_step},
            "recompute": {"ram": self.latents},
        }[placement]
        if device_is_ram and "device" in needs:
            needs = {"ram": needs["device"] + needs["ram"]}
        return needs

    def describe(self) -> str:
        h, w = self.latent_size
        return (f"{self.steps} steps x {format_bytes(self.attention_per_step)} of attention for "
                f"{self.frames} frames at {w * VAE_SCALE}x{h * VAE_SCALE} px, plus "
                f"{format_bytes(self.latents)} of latents")


def estimate_store(layers: Iterable[AttentionLayerShape], config, dtype: torch.dtype,
                   context_tokens: int = TEXT_TOKENS, latent_channels: int = LATENT_CHANNELS) -> StoreEstimate:
    """Bytes a capture with ``config`` (a :class:`fatezero_core.store.CaptureConfig`: frames,
    latent size, steps, key rule, ``min_st_channels``, layer set) into a store of ``dtype`` will
    hold, for the UNet whose attention ``layers`` are given (:func:`unet_attention_layers`).
    ``context_tokens``: the source prompt's token slots (77 per CLIP chunk)."""
    frames = config.num_frames
    lh, lw = config.latent_size
    layer_set = LayerSet(config.layer_set)
    value = torch.empty((), dtype=dtype).element_size()
    kept: dict[tuple, int] = {}
    per_step = 0
    for index, shape in enumerate(layers):
        # The LayerInfo the host builds for this block, so the layer set decides as it does there.
        info = LayerInfo(f"layer_{index}", downsampled_side(lh, shape.level), downsampled_side(lw, shape.level),
                         lh, lw, shape.heads, shape.channels)
        if not layer_set.stores(info):
            continue
        rule = rule_for_channels(config.key_rule, shape.channels, config.min_st_channels)
        if rule not in kept:
            kept[rule] = len(key_frames_used(key_frame_table(rule, frames)))
        n, c = info.tokens, shape.channels
        per_step += value * (frames * n * c + kept[rule] * n * c + frames * shape.heads * n * context_tokens)
    latent = frames * latent_channels * lh * lw * LATENT_BYTES
    return StoreEstimate(config.num_steps, frames, (lh, lw), per_step, latent)


def format_bytes(n: int) -> str:
    """Decimal units, as the README's memory tables: ``1.23 GB``, ``45.6 MB``."""
    if n >= 1e9:
        return f"{n / 1e9:,.2f} GB"
    if n >= 1e6:
        return f"{n / 1e6:,.1f} MB"
    return f"{n / 1e3:,.1f} kB"


_WHERE = {"device": "memory on the model's device", "ram": "RAM", "disk": "disk space"}
_RECOMPUTE = "each edit step then runs the UNet once more on the stored latent"


def _limit(free: int) -> int:
    return int(free * STORE_MEMORY_FRACTION)


def _fits(needs: Mapping[str, int], free: Mapping[str, int | None]) -> bool:
    return all(free.get(r) is None or need <= _limit(free[r]) for r, need in needs.items())


def check_store_fits(estimate: StoreEstimate, placement: str, free: Mapping[str, int | None],
                     device_is_ram: bool = False, disk_folder: str = "") -> None:
    """Refuse ``placement`` when what it needs (:meth:`StoreEstimate.needs`) exceeds
    :data:`STORE_MEMORY_FRACTION` of what is ``free`` (``"device"``, ``"ram"``, ``"disk"``
    bytes; a resource given as None is not checked), with the estimate, the free memory and the
    placements that would fit. ``disk_folder`` is where ``disk`` files would go."""
    needs = estimate.needs(placement, device_is_ram)
    for resource, need in needs.items():
        available = free.get(resource)
        if available is None or need <= _limit(available):
            continue
        if resource == "ram" and estimate.latents > _limit(available):
            raise StoreTooLargeError(
                f"The inversion latents alone need {format_bytes(estimate.latents)} of RAM "
                f"({estimate.steps + 1} latents of {format_bytes(estimate.latent_per_step)}), but only "
                f"{format_bytes(available)} is available. Invert fewer frames, fewer steps or smaller "
                "frames.")
        where = _WHERE[resource]
        what = (estimate.describe() if resource == "ram" and placement == "cpu"
                else f"{estimate.steps} steps x {format_bytes(estimate.attention_per_step)} of attention")
        # Models ComfyUI keeps loaded count as used device memory; freeing them is a remedy too.
        loaded = (" (as ComfyUI reports it: models it keeps loaded count as used, 'Free model and "
                  "node cache' unloads them)") if resource == "device" else ""
        raise StoreTooLargeError(
            f"The '{placement}' attention store would need {format_bytes(need)} of {where} ({what}), "
            f"but {format_bytes(available)} is free{loaded} and a store may take at most "
            f"{STORE_MEMORY_FRACTION:.0%} of it ({format_bytes(_limit(available))}), so DDIM Invert "
            f"stopped before inverting. {_alternatives(estimate, placement, free, device_is_ram, disk_folder)}")


def _alternatives(estimate, placement, free, device_is_ram, disk_folder) -> str:
    options = []
    if placement == "gpu" and not device_is_ram:
        cpu = estimate.needs("cpu")["ram"]
        if _fits({"ram": cpu}, free):
            options.append(f"'cpu' ({format_bytes(cpu)} of RAM)")
    if placement != "disk":
        disk = estimate.attention
        folder = f" in '{disk_folder}'" if disk_folder else ""
        room = ""
        if free.get("disk") is not None:
            room = f", {format_bytes(free['disk'])} free there"
            if not _fits({"disk": disk}, free):
                room += ": not enough, free some disk space first"
        ram = estimate.needs("disk")["ram"]
        options.append(f"'disk' ({format_bytes(disk)} of files{folder}{room}; RAM: "
                       f"{format_bytes(ram)}, the latents and one step)")
    options.append(f"'recompute' (RAM: {format_bytes(estimate.latents)}, the inversion latents only; "
                   f"{_RECOMPUTE})")
    listed = ", ".join(options[:-1]) + (" or " if len(options) > 1 else "") + options[-1]
    return f"Set store_placement to {listed}; or invert fewer frames, fewer steps or smaller frames."
