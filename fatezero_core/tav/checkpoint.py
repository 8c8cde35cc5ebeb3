"""Tune-A-Video checkpoints: safe loading, layout detection, SD1.x validation and key mapping.

A Tune-A-Video UNet is a diffusers SD1.x ``UNet2DConditionModel`` whose 2D keys keep their names
and shapes, plus temporal keys. FateZero's loader accepts exactly that: every 2D key of the 3D
model, nothing else but ``*_temporal*`` keys (``UNetPseudo3DConditionModel.load_2d_state_dict``,
``video_diffusion/models/unet_3d_condition.py``, github.com/ChenyangQiQi/FateZero at 9b6cb7b).
The temporal keys come in three layouts:

- ``tuneavideo`` (official release): ``<block>.attn_temp.*`` and ``<block>.norm_temp.*``, the
  ``BasicTransformerBlock`` of github.com/showlab/Tune-A-Video (``tuneavideo/models/attention.py``);
- ``fatezero``: ``<block>.attn_temporal.*``, ``<block>.norm_temporal.*``
  (``SpatioTemporalTransformerBlock``, FateZero ``video_diffusion/models/attention.py``) and,
  optionally, ``<conv>.conv_temporal.{weight,bias}`` (full Conv1d) or
  ``<conv>.conv_temporal.{down,up}.weight`` (``LoRALinearLayer``, ``models/lora.py``): the
  ``conv_temporal`` of ``PseudoConv3d`` (``models/resnet.py``);
- ``plain``: no temporal keys (an ordinary SD1.x diffusers UNet).

Official Tune-A-Video files are read with ``attn_temp``/``norm_temp`` renamed to FateZero's names;
they have no ``conv_temporal``, so their convs stay 2D.

``<block>`` is one of the 16 ``...attentions.N.transformer_blocks.0`` paths, ``<conv>`` one of the
52 kernel-3 convs (the SD1.x layout is ``fatezero_core.sd1``). Everything here is pure and in
diffusers names: state dicts in, state dicts and diffusers paths out. The host loads
``TavCheckpoint.unet_2d`` with its own diffusers loader and finds the owner of each module that
``temporal_targets`` describes in its own UNet through its own key mapping.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, NamedTuple, Optional, Tuple

import torch

from ..errors import CheckpointError
from ..sd1 import (
    CHANNEL_MULT,
    LAYERS_PER_BLOCK,
    MODEL_CHANNELS,
    AttentionBlock,
    sd1_attention_blocks,
    sd1_transformer_blocks,
)

StateDict = Dict[str, torch.Tensor]

LAYOUT_TUNEAVIDEO = "tuneavideo"
LAYOUT_FATEZERO = "fatezero"
LAYOUT_PLAIN = "plain"

LATENT_CHANNELS = 4
MID_BLOCK_RESNETS = 2  # diffusers' UNetMidBlock2DCrossAttn: a resnet on each side of its transformer

UNET_ROOTS = ("conv_in", "time_embedding", "down_blocks", "mid_block", "up_blocks", "conv_norm_out", "conv_out")

ATTENTION_KEYS = (
    "attn_temporal.to_q.weight",
    "attn_temporal.to_k.weight",
    "attn_temporal.to_v.weight",
    "attn_temporal.to_out.0.weight",
    "attn_temporal.to_out.0.bias",
    "norm_temporal.weight",
    "norm_temporal.bias",
)
CONV_FULL_KEYS = ("conv_temporal.weight", "conv_temporal.bias")
CONV_LORA_KEYS = ("conv_temporal.down.weight", "conv_temporal.up.weight")

_TEMPORAL_RENAME = {
    "attn_temp": "attn_temporal",
    "norm_temp": "norm_temporal",
    "attn_temporal": "attn_temporal",
    "norm_temporal": "norm_temporal",
    "conv_temporal": "conv_temporal",
}
_LAYOUT_OF_NAME = {
    "attn_temp": LAYOUT_TUNEAVIDEO,
    "norm_temp": LAYOUT_TUNEAVIDEO,
    "attn_temporal": LAYOUT_FATEZERO,
    "norm_temporal": LAYOUT_FATEZERO,
    "conv_temporal": LAYOUT_FATEZERO,
}
_BLOCK_KEY = re.compile(r"^(?P<owner>.+\.transformer_blocks\.\d+)\.(?P<name>attn_temp|norm_temp|attn_temporal|norm_temporal)\.(?P<rest>.+)$")
_CONV_KEY = re.compile(r"^(?P<owner>.+)\.(?P<name>conv_temporal)\.(?P<rest>.+)$")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _names(keys: Iterable[str], limit: int = 6) -> str:
    """``a, b, c (and N more)``: a short, sorted listing of key names for messages."""
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


# --------------------------------------------------------------------------------------------------
# SD1.x topology
# --------------------------------------------------------------------------------------------------

_ATTENTION_BLOCKS = {block.path: block for block in sd1_attention_blocks()}


def sd1_inflated_convs() -> List[str]:
    """The 52 kernel-3 convs that FateZero inflates (conv_in, resnet conv1/conv2, down/up sampler
    convs, conv_out; not the 1x1 shortcuts), in UNet order: ``PseudoConv3d`` gets a
    ``conv_temporal`` only when ``kernel_size > 1`` (FateZero ``video_diffusion/models/resnet.py``)."""
    levels = len(CHANNEL_MULT)
    convs = ["conv_in"]
    for i in range(levels):
        convs += [f"down_blocks.{i}.resnets.{j}.conv{n}" for j in range(LAYERS_PER_BLOCK) for n in (1, 2)]
        if i < levels - 1:
            convs.append(f"down_blocks.{i}.downsamplers.0.conv")
    convs += [f"mid_block.resnets.{j}.conv{n}" for j in range(MID_BLOCK_RESNETS) for n in (1, 2)]
    for i in range(levels):
        convs += [f"up_blocks.{i}.resnets.{j}.conv{n}" for j in range(LAYERS_PER_BLOCK + 1) for n in (1, 2)]
        if i < levels - 1:
            convs.append(f"up_blocks.{i}.upsamplers.0.conv")
    return convs + ["conv_out"]


def _conv_shapes(prefix: str, c_out: int, c_in: int, kernel: int) -> Dict[str, Tuple[int, ...]]:
    return {f"{prefix}.weight": (c_out, c_in, kernel, kernel), f"{prefix}.bias": (c_out,)}


def _linear_shapes(prefix: str, c_out: int, c_in: int, bias: bool = True) -> Dict[str, Tuple[int, ...]]:
    shapes = {f"{prefix}.weight": (c_out, c_in)}
    if bias:
        shapes[f"{prefix}.bias"] = (c_out,)
    return shapes


def _norm_shapes(prefix: str, channels: int) -> Dict[str, Tuple[int, ...]]:
    return {f"{prefix}.weight": (channels,), f"{prefix}.bias": (channels,)}


def _resnet_shapes(prefix: str, c_in: int, c_out: int, c_time: int) -> Dict[str, Tuple[int, ...]]:
    shapes = {**_norm_shapes(f"{prefix}.norm1", c_in), **_conv_shapes(f"{prefix}.conv1", c_out, c_in, 3),
              **_linear_shapes(f"{prefix}.time_emb_proj", c_out, c_time),
              **_norm_shapes(f"{prefix}.norm2", c_out), **_conv_shapes(f"{prefix}.conv2", c_out, c_out, 3)}
    if c_in != c_out:
        shapes.update(_conv_shapes(f"{prefix}.conv_shortcut", c_out, c_in, 1))
    return shapes


def _attention_shapes(attention: AttentionBlock, model_channels: int, context_dim: int) -> Dict[str, Tuple[int, ...]]:
    """The ``Transformer2DModel`` holding ``attention`` (one block, conv proj_in/proj_out, GEGLU
    feed-forward)."""
    c, block = attention.channels(model_channels), attention.path
    prefix = block.rsplit(".transformer_blocks.", 1)[0]
    shapes = {**_norm_shapes(f"{prefix}.norm", c), **_conv_shapes(f"{prefix}.proj_in", c, c, 1),
              **_conv_shapes(f"{prefix}.proj_out", c, c, 1)}
    for norm in ("norm1", "norm2", "norm3"):
        shapes.update(_norm_shapes(f"{block}.{norm}", c))
    for attn, c_kv in (("attn1", c), ("attn2", context_dim)):
        shapes.update(_linear_shapes(f"{block}.{attn}.to_q", c, c, bias=False))
        shapes.update(_linear_shapes(f"{block}.{attn}.to_k", c, c_kv, bias=False))
        shapes.update(_linear_shapes(f"{block}.{attn}.to_v", c, c_kv, bias=False))
        shapes.update(_linear_shapes(f"{block}.{attn}.to_out.0", c, c))
    shapes.update(_linear_shapes(f"{block}.ff.net.0.proj", 8 * c, c))
    shapes.update(_linear_shapes(f"{block}.ff.net.2", c, 4 * c))
    return shapes


def _attention_after(resnet: str, model_channels: int, context_dim: int) -> Dict[str, Tuple[int, ...]]:
    """The transformer that follows resnet ``<prefix>.resnets.<j>`` (``<prefix>.attentions.<j>``)
    where ``sd1`` places one, else nothing."""
    prefix, j = resnet.rsplit(".resnets.", 1)
    attention = _ATTENTION_BLOCKS.get(f"{prefix}.attentions.{j}.transformer_blocks.0")
    return _attention_shapes(attention, model_channels, context_dim) if attention else {}


def _level_shapes(prefix: str, resnet_inputs: List[int], c: int, model_channels: int, sampler: Optional[str],
                  context_dim: int, c_time: int) -> Dict[str, Tuple[int, ...]]:
    """One down/up level: a resnet per input width (each followed by its transformer where the
    level has attention), then its down/up sampler conv."""
    shapes = {}
    for j, c_in in enumerate(resnet_inputs):
        shapes.update(_resnet_shapes(f"{prefix}.resnets.{j}", c_in, c, c_time))
        shapes.update(_attention_after(f"{prefix}.resnets.{j}", model_channels, context_dim))
    if sampler:
        shapes.update(_conv_shapes(f"{prefix}.{sampler}.0.conv", c, c, 3))
    return shapes


def _down_shapes(model_channels: int, context_dim: int, c_time: int) -> Dict[str, Tuple[int, ...]]:
    shapes, c_prev, last = {}, model_channels, len(CHANNEL_MULT) - 1
    for i, mult in enumerate(CHANNEL_MULT):
        c = model_channels * mult
        inputs = [c_prev] + [c] * (LAYERS_PER_BLOCK - 1)
        shapes.update(_level_shapes(f"down_blocks.{i}", inputs, c, model_channels,
                                    "downsamplers" if i < last else None, context_dim, c_time))
        c_prev = c
    return shapes


def _up_shapes(model_channels: int, context_dim: int, c_time: int) -> Dict[str, Tuple[int, ...]]:
    """Resnet inputs are the previous output concatenated with the matching skip connection."""
    reversed_c = [model_channels * m for m in reversed(CHANNEL_MULT)]
    shapes, c_prev, last = {}, reversed_c[0], len(reversed_c) - 1
    for i, c in enumerate(reversed_c):
        c_skip_last = reversed_c[min(i + 1, last)]
        inputs = [(c_prev if j == 0 else c) + (c_skip_last if j == LAYERS_PER_BLOCK else c)
                  for j in range(LAYERS_PER_BLOCK + 1)]
        shapes.update(_level_shapes(f"up_blocks.{i}", inputs, c, model_channels,
                                    "upsamplers" if i < last else None, context_dim, c_time))
        c_prev = c
    return shapes


def sd1_unet_key_shapes(model_channels: int = MODEL_CHANNELS, context_dim: int = 768) -> Dict[str, Tuple[int, ...]]:
    """Every key of a diffusers SD1.x ``UNet2DConditionModel`` with its shape (686 keys)."""
    c0, c_time, c_mid = model_channels, 4 * model_channels, model_channels * CHANNEL_MULT[-1]
    shapes = {**_conv_shapes("conv_in", c0, LATENT_CHANNELS, 3),
              **_linear_shapes("time_embedding.linear_1", c_time, c0),
              **_linear_shapes("time_embedding.linear_2", c_time, c_time)}
    shapes.update(_down_shapes(model_channels, context_dim, c_time))
    for j in range(MID_BLOCK_RESNETS):
        shapes.update(_resnet_shapes(f"mid_block.resnets.{j}", c_mid, c_mid, c_time))
    shapes.update(_attention_after("mid_block.resnets.0", model_channels, context_dim))
    shapes.update(_up_shapes(model_channels, context_dim, c_time))
    shapes.update(_norm_shapes("conv_norm_out", c0))
    shapes.update(_conv_shapes("conv_out", LATENT_CHANNELS, c0, 3))
    return shapes


# --------------------------------------------------------------------------------------------------
# Splitting a checkpoint
# --------------------------------------------------------------------------------------------------

@dataclass
class TemporalConvWeights:
    """One ``conv_temporal``: ``form`` "full" (Conv1d C->C) or "lora" (``down``/``up``, ``rank``)."""

    form: str
    rank: Optional[int]
    state_dict: StateDict


@dataclass
class TavCheckpoint:
    """A checkpoint split for loading.

    ``unet_2d``: every non-temporal key, diffusers names unchanged (what an SD1.x loader takes).
    ``temporal_attention``: transformer-block path -> state dict with ``attn_temporal.*``/
    ``norm_temporal.*`` names (official Tune-A-Video names renamed). ``temporal_convs``: conv path
    (e.g. ``down_blocks.0.resnets.0.conv1``) -> weights with ``conv_temporal.*`` names."""

    layout: str
    unet_2d: StateDict
    temporal_attention: Dict[str, StateDict] = field(default_factory=dict)
    temporal_convs: Dict[str, TemporalConvWeights] = field(default_factory=dict)
    source: str = "checkpoint"


class TemporalTarget(NamedTuple):
    """One temporal module and its owner: ``owner`` is the diffusers path of the transformer block
    (``kind`` "attention", the module runs after it) or of the 2D conv (``kind`` "conv", the module
    runs on that conv's output). The host finds the owner in its own UNet by its own key mapping."""

    owner: str
    kind: str
    state_dict: StateDict


def strip_unet_prefix(sd: StateDict) -> StateDict:
    """Drop a leading ``unet.`` when every key carries it (a UNet saved from a pipeline)."""
    if sd and all(k.startswith("unet.") for k in sd):
        return {k[len("unet."):]: v for k, v in sd.items()}
    return sd


def _check_unet_roots(keys: Iterable[str], source: str) -> None:
    """Only diffusers UNet keys (optionally all under ``unet.``) are accepted."""
    foreign = [k for k in keys if k.split(".", 1)[0] not in UNET_ROOTS]
    if not foreign:
        return
    hint = ""
    if any(k.startswith("model.diffusion_model.") for k in foreign):
        hint = (" It looks like a full Stable Diffusion checkpoint (ComfyUI/LDM names): load it with "
                "Load Checkpoint instead.")
    raise CheckpointError(
        f"{source} has {_count(len(foreign), 'key')} that are not diffusers UNet keys: {_names(foreign)}.{hint} "
        "A Tune-A-Video checkpoint is a diffusers UNet (keys like conv_in.weight, "
        "down_blocks.0.resnets.0.conv1.weight); pick its unet folder or its "
        "diffusion_pytorch_model file."
    )


def _temporal_name(key: str) -> Optional[str]:
    """The temporal component of ``key`` (``attn_temp``, ``conv_temporal``, ...), else None."""
    return next((part for part in key.split(".") if part in _TEMPORAL_RENAME), None)


def detect_layout(temporal_names: Iterable[str], source: str = "checkpoint") -> str:
    """``tuneavideo``, ``fatezero`` or ``plain`` from the temporal names present."""
    layouts = {_LAYOUT_OF_NAME[name] for name in temporal_names}
    if len(layouts) > 1:
        raise CheckpointError(
            f"{source} mixes official Tune-A-Video temporal keys (attn_temp/norm_temp) with FateZero "
            "ones (attn_temporal/norm_temporal/conv_temporal); use a checkpoint saved by one of the two."
        )
    return layouts.pop() if layouts else LAYOUT_PLAIN


def _group_temporal(keys: Iterable[str], sd: StateDict, source: str) -> Tuple[Dict[str, StateDict], Dict[str, StateDict]]:
    """Temporal keys grouped per owner (block or conv path), names normalised to FateZero's."""
    blocks: Dict[str, StateDict] = {}
    convs: Dict[str, StateDict] = {}
    malformed = []
    for key in keys:
        match = _BLOCK_KEY.match(key) or _CONV_KEY.match(key)
        if match is None:
            malformed.append(key)
            continue
        groups = convs if match["name"] == "conv_temporal" else blocks
        local = f"{_TEMPORAL_RENAME[match['name']]}.{match['rest']}"
        groups.setdefault(match["owner"], {})[local] = sd[key]
    if malformed:
        raise CheckpointError(
            f"{source} has temporal keys outside any transformer block or conv: {_names(malformed)}. "
            "Expected <block>.transformer_blocks.0.attn_temp(oral).* or <conv>.conv_temporal.*."
        )
    return blocks, convs


def _check_owners(owners: Iterable[str], allowed: frozenset, what: str, source: str) -> None:
    unknown = [o for o in owners if o not in allowed]
    if unknown:
        raise CheckpointError(
            f"{source} has temporal {what} at paths that are not in a Stable Diffusion 1.x UNet: "
            f"{_names(unknown)}. Tune-A-Video checkpoints must be SD1.x UNets."
        )


def _as_written(local_key: str, layout: str) -> str:
    """A normalised temporal key spelled as the checkpoint spells it (``attn_temp`` in official
    Tune-A-Video files), for messages."""
    if layout == LAYOUT_TUNEAVIDEO:
        return re.sub(r"^(attn|norm)_temporal\.", r"\1_temp.", local_key)
    return local_key


def _check_group_keys(owner: str, group: StateDict, expected: Iterable[str], source: str,
                      layout: str = LAYOUT_FATEZERO) -> None:
    """Every expected key present, nothing else; offending names given in full."""
    expected = set(expected)
    missing = sorted(f"{owner}.{_as_written(k, layout)}" for k in expected - group.keys())
    unexpected = sorted(f"{owner}.{_as_written(k, layout)}" for k in group.keys() - expected)
    if missing or unexpected:
        found = "; ".join(filter(None, [missing and f"missing {_names(missing)}",
                                        unexpected and f"unexpected {_names(unexpected)}"]))
        raise CheckpointError(
            f"{source} has incomplete temporal weights ({found}). Re-export the checkpoint, or use "
            "an ordinary SD1.x loader if it was not meant to be a Tune-A-Video model."
        )


def _check_all_owners_present(present: Iterable[str], required: List[str], what: str, source: str) -> None:
    present = set(present)
    missing = [o for o in required if o not in present]
    if missing:
        raise CheckpointError(
            f"{source} lacks temporal {what} for {_names(missing)} ({len(missing)} of "
            f"{len(required)} layers). The checkpoint is incomplete; re-export it."
        )


def _conv_weights(conv: str, group: StateDict, source: str) -> TemporalConvWeights:
    """Form ("full"/"lora") and rank of one ``conv_temporal`` group, keys checked."""
    if "conv_temporal.weight" in group or "conv_temporal.bias" in group:
        _check_group_keys(conv, group, CONV_FULL_KEYS, source)
        return TemporalConvWeights("full", None, group)
    _check_group_keys(conv, group, CONV_LORA_KEYS, source)
    return TemporalConvWeights("lora", int(group["conv_temporal.down.weight"].shape[0]), group)


def split_tav_state_dict(sd: StateDict, source: str = "checkpoint") -> TavCheckpoint:
    """Split a diffusers (Tune-A-Video / FateZero / plain SD1.x) UNet state dict into its 2D part
    and its temporal parts, with the layout detected from the keys (see the module docstring).
    Raises ``CheckpointError`` naming offending keys."""
    sd = strip_unet_prefix(sd)
    _check_unet_roots(sd.keys(), source)
    temporal_keys = [k for k in sd if _temporal_name(k)]
    layout = detect_layout({_temporal_name(k) for k in temporal_keys}, source)
    blocks, conv_groups = _group_temporal(temporal_keys, sd, source)
    _check_owners(blocks, frozenset(sd1_transformer_blocks()), "attention", source)
    _check_owners(conv_groups, frozenset(sd1_inflated_convs()), "convs", source)
    for block, group in blocks.items():
        _check_group_keys(block, group, ATTENTION_KEYS, source, layout)
    if layout != LAYOUT_PLAIN:
        _check_all_owners_present(blocks, sd1_transformer_blocks(), "attention", source)
    if conv_groups:
        _check_all_owners_present(conv_groups, sd1_inflated_convs(), "convs", source)
    convs = {conv: _conv_weights(conv, group, source) for conv, group in conv_groups.items()}
    unet_2d = {k: v for k, v in sd.items() if not _temporal_name(k)}
    return TavCheckpoint(layout, unet_2d, blocks, convs, source)


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------

def _found_context_dim(sd2d: StateDict) -> Optional[int]:
    weight = sd2d.get("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight")
    return int(weight.shape[1]) if weight is not None and weight.ndim == 2 else None


def _not_sd1(source: str, found: str) -> CheckpointError:
    return CheckpointError(
        f"{source} is not a Stable Diffusion 1.x UNet (found {found}). Tune-A-Video checkpoints are "
        "SD1.x (SD1.4/SD1.5) UNets; pick one tuned from SD1.x, and load other models with the "
        "ordinary loaders."
    )


def sd1_unet_mismatch(sd2d: StateDict, context_dim: int = 768) -> Optional[str]:
    """How ``sd2d`` differs from an SD1.x diffusers UNet of its own width (missing, unexpected or
    misshapen keys, named), or None when it has exactly those keys and shapes. ``context_dim`` is
    the cross-attention width (768: CLIP ViT-L)."""
    conv_in = sd2d.get("conv_in.weight")
    if conv_in is None or conv_in.ndim != 4:
        return "no 4-D conv_in.weight"
    expected = sd1_unet_key_shapes(int(conv_in.shape[0]), context_dim)
    missing, unexpected = expected.keys() - sd2d.keys(), sd2d.keys() - expected.keys()
    if missing or unexpected:
        parts = [missing and f"{_count(len(missing), 'missing key')}: {_names(missing)}",
                 unexpected and f"{_count(len(unexpected), 'unexpected key')}: {_names(unexpected)}"]
        return "; ".join(filter(None, parts))
    wrong = [f"{k} {list(sd2d[k].shape)} instead of {list(shape)}"
             for k, shape in expected.items() if tuple(sd2d[k].shape) != shape]
    if wrong:
        found_ctx = _found_context_dim(sd2d)
        ctx = (f"cross-attention context dim {found_ctx} instead of {context_dim}; "
               if found_ctx not in (None, context_dim) else "")
        return f"{ctx}{_count(len(wrong), 'key')} with other shapes: {_names(wrong, 4)}"
    return None


def check_sd1_unet(sd2d: StateDict, context_dim: int = 768, source: str = "checkpoint") -> int:
    """Check that ``sd2d`` has exactly the keys and shapes of an SD1.x diffusers UNet, whatever
    its width (``sd1_unet_mismatch``); returns ``model_channels`` (320 for SD1.x). Raises
    ``CheckpointError`` naming missing, unexpected or misshapen keys."""
    mismatch = sd1_unet_mismatch(sd2d, context_dim)
    if mismatch:
        raise _not_sd1(source, mismatch)
    return int(sd2d["conv_in.weight"].shape[0])


def _attention_shapes_expected(channels: int) -> Dict[str, Tuple[int, ...]]:
    c = channels
    return {"attn_temporal.to_q.weight": (c, c), "attn_temporal.to_k.weight": (c, c),
            "attn_temporal.to_v.weight": (c, c), "attn_temporal.to_out.0.weight": (c, c),
            "attn_temporal.to_out.0.bias": (c,), "norm_temporal.weight": (c,), "norm_temporal.bias": (c,)}


def _conv_shapes_expected(channels: int, weights: TemporalConvWeights) -> Dict[str, Tuple[int, ...]]:
    c, r = channels, weights.rank
    if weights.form == "full":
        return {"conv_temporal.weight": (c, c, 3), "conv_temporal.bias": (c,)}
    return {"conv_temporal.down.weight": (r, c, 3), "conv_temporal.up.weight": (c, r, 3)}


def _shape_mismatches(owner: str, group: StateDict, expected: Dict[str, Tuple[int, ...]]) -> List[str]:
    return [f"{owner}.{k} {list(group[k].shape)} instead of {list(shape)}"
            for k, shape in expected.items() if tuple(group[k].shape) != shape]


def check_temporal_shapes(ckpt: TavCheckpoint) -> None:
    """Temporal weights must match the width of the 2D layer they follow: attention width = the
    block's ``norm1`` width; conv_temporal channels = the 2D conv's output channels."""
    wrong: List[str] = []
    for block, group in ckpt.temporal_attention.items():
        channels = ckpt.unet_2d[f"{block}.norm1.weight"].shape[0]
        wrong += _shape_mismatches(block, group, _attention_shapes_expected(channels))
    for conv, weights in ckpt.temporal_convs.items():
        channels = ckpt.unet_2d[f"{conv}.weight"].shape[0]
        wrong += _shape_mismatches(conv, weights.state_dict, _conv_shapes_expected(channels, weights))
    if wrong:
        raise CheckpointError(
            f"{ckpt.source} has temporal weights whose shapes do not fit its UNet: {_names(wrong, 4)}. "
            "The checkpoint is damaged or mixes two models; re-export it."
        )


def check_tav_checkpoint(ckpt: TavCheckpoint, context_dim: int = 768) -> None:
    """``check_sd1_unet`` on the 2D part, then ``check_temporal_shapes``."""
    check_sd1_unet(ckpt.unet_2d, context_dim, ckpt.source)
    check_temporal_shapes(ckpt)


def temporal_targets(ckpt: TavCheckpoint) -> List[TemporalTarget]:
    """``(owner, kind, state_dict)`` for every temporal module, in UNet order: attention blocks
    first, then convs."""
    attention = [TemporalTarget(b, "attention", ckpt.temporal_attention[b])
                 for b in sd1_transformer_blocks() if b in ckpt.temporal_attention]
    convs = [TemporalTarget(c, "conv", ckpt.temporal_convs[c].state_dict)
             for c in sd1_inflated_convs() if c in ckpt.temporal_convs]
    return attention + convs


# --------------------------------------------------------------------------------------------------
# Safe loading
# --------------------------------------------------------------------------------------------------

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pt", ".ckpt", ".pth")
DIFFUSERS_WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
)


def resolve_checkpoint_file(path: "str | os.PathLike") -> Path:
    """The weights file for ``path``: the file itself, or for a diffusers folder
    ``unet/diffusion_pytorch_model.*`` (pipeline folder) or ``diffusion_pytorch_model.*`` (unet
    folder), safetensors first."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise CheckpointError(f"{path} does not exist; pick an existing checkpoint file or folder.")
    for folder in (path / "unet", path):
        for name in DIFFUSERS_WEIGHT_FILES:
            if (folder / name).is_file():
                return folder / name
    raise CheckpointError(
        f"{path} is a folder without UNet weights: expected unet/diffusion_pytorch_model.safetensors "
        "(or .bin) inside it, or diffusion_pytorch_model.safetensors (or .bin) directly."
    )


def _corrupt(path: Path, error: BaseException, advice: str) -> CheckpointError:
    text = str(error).split("WeightsUnpickler error:")[-1]   # torch's own advice precedes this
    first_line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    detail = first_line.split(". ")[0][:160]
    return CheckpointError(f"{path} looks corrupt or is not a checkpoint ({type(error).__name__}: {detail}). {advice}")


def _read_safetensors(path: Path) -> object:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as error:  # safetensors raises its own error type, OSError, or ValueError
        raise _corrupt(path, error, "Download it again.") from error


def _read_pickle(path: Path) -> object:
    """``torch.load`` restricted to tensors and plain containers (``weights_only=True``)."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "unsupported global" in str(error).lower():
            raise CheckpointError(
                f"{path} holds Python objects besides tensors, so it is refused for safety (only "
                "tensors are read from .bin/.pt/.ckpt/.pth files). Use a .safetensors copy of it."
            ) from error
        raise _corrupt(path, error, "Download it again.") from error
    except Exception as error:  # truncated or damaged zip archive, not a pickle at all
        raise _corrupt(path, error, "Download it again.") from error


def unwrap_state_dict(obj: object, source: str = "checkpoint") -> StateDict:
    """A flat ``{name: tensor}`` dict, unwrapping nested ``{"state_dict": ...}``."""
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{source} holds no state dict (found {type(obj).__name__}); it is not a UNet checkpoint.")
    not_tensors = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(
            f"{source} has entries that are not named tensors: {_names(not_tensors)}; it is not a "
            "UNet state dict."
        )
    return obj


def load_state_dict_file(path: "str | os.PathLike") -> StateDict:
    """Load a UNet state dict safely: ``.safetensors``, or ``.bin/.pt/.ckpt/.pth`` with
    ``torch.load(weights_only=True)``, or a diffusers folder (``resolve_checkpoint_file``). Never
    unpickles arbitrary objects: a pickle can run code when loaded. Raises ``CheckpointError`` for missing, corrupt or foreign files."""
    file = resolve_checkpoint_file(path)
    suffix = file.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        obj = _read_safetensors(file)
    elif suffix in PICKLE_SUFFIXES:
        obj = _read_pickle(file)
    else:
        raise CheckpointError(
            f"{file} has an unsupported extension {suffix or '(none)'}; use .safetensors "
            "(or .bin/.pt/.ckpt/.pth) or a diffusers folder."
        )
    return unwrap_state_dict(obj, str(file))


def load_tav_checkpoint(path: "str | os.PathLike", context_dim: int = 768) -> TavCheckpoint:
    """Load, split and validate a Tune-A-Video / FateZero / plain SD1.x UNet checkpoint."""
    file = resolve_checkpoint_file(path)
    ckpt = split_tav_state_dict(load_state_dict_file(file), source=str(file))
    check_tav_checkpoint(ckpt, context_dim)
    return ckpt


def write_checkpoint(path: "str | os.PathLike", state_dict: StateDict, metadata: Dict[str, object]) -> None:
    """Write ``state_dict`` (and ``metadata``, as text) to a new safetensors file at ``path``,
    creating its folder; never over an existing file.

    The data goes to a hidden temporary file in the same folder first, which then takes the final
    name with ``os.link``: that fails when the name exists, atomically (``os.replace`` would
    overwrite a file that appeared meanwhile). Where the file system has no hard links (FAT,
    exFAT, some network shares) the final name is created exclusively (``open(path, "xb")``) and
    the data copied in. A refused, failed or interrupted write leaves neither the temporary file nor
    a partial checkpoint, and an existing file is never touched.

    Raises ``FileExistsError`` when ``path`` exists (and only then), ``OSError`` when the file
    system refuses the write, and safetensors' own ``SafetensorError`` when its writer fails."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except FileExistsError:  # a file where the folder should be (FileExistsError: the name is taken)
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), folder) from None
    partial = os.path.join(folder, f".fatezero_{uuid.uuid4().hex}.partial")
    try:
        save_file(state_dict, partial, metadata={k: str(v) for k, v in metadata.items()})
        _take_name(partial, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial)


def _take_name(written: str, path: str) -> None:
    """Give the complete file ``written`` the new name ``path``; ``FileExistsError`` if it exists."""
    try:
        os.link(written, path)
        return
    except FileExistsError:
        raise
    except OSError:  # no hard links on this file system: claim the name, then fill it
        pass
    with open(path, "xb") as out:
        try:
            with open(written, "rb") as source:
                shutil.copyfileobj(source, out, 1 << 24)
        except BaseException:
            out.close()
            os.remove(path)  # ours: created exclusively above
            raise
