"""Seeded random-weight models that the tests and the benchmarks share; nothing is downloaded.

Not part of the node pack: ComfyUI loads the pack's ``__init__.py``, which imports ``nodes/``
only, and the wheel packages ``fatezero_core`` only (``pyproject.toml``). Tests import it as
``import tiny_models`` (pytest puts the repository root on ``sys.path``); the benchmarks through
``benchmarks/_host.py``. It imports ComfyUI only inside functions, so it imports before the host
is set up and without ComfyUI at all.

- :mod:`tiny_models.seeded_init`: every parameter initialised explicitly with seeded values
  (ComfyUI's ops skip initialisation: an uninitialised model holds whatever memory it got).
- :mod:`tiny_models.sd15`: SD1.5-topology UNets as ``ModelPatcher`` objects, the tiny one
  (``model_channels`` 32) for tests and the full SD1.5 shape (~860 M parameters) for benchmarks.
- :mod:`tiny_models.encoders`: a CLIP text model with the real SD1 tokenizer, a CLIP vision model
  and a TAESD-layout VAE.
- :mod:`tiny_models.checkpoint`: a small ``.ckpt`` in the original LDM key layout that
  ``CheckpointLoaderSimple`` detects as SD1.5.
- :mod:`tiny_models.store_probe`: one synthetic SD1.x inversion step captured into a real
  ``AttentionStore`` (imports the top-level ``fatezero_core``; not re-exported here).
"""

from .checkpoint import (
    CHECKPOINT_CHANNEL_MULT,
    SharedStorage,
    checkpoint_shapes,
    tiny_checkpoint_state_dict,
    write_tiny_sd15_checkpoint,
)
from .encoders import (
    TAESD_VAE_SCALE,
    TINY_CLIP_INTERMEDIATE,
    TINY_CLIP_LAYERS,
    TINY_VISION_CONFIG,
    build_tiny_clip,
    build_tiny_clip_vision,
    build_tiny_vae,
    tiny_vae_state_dict,
)
from .sd15 import (
    SD15_CHANNEL_MULT,
    SD15_UNET_CONFIG,
    TINY_MODEL_CHANNELS,
    build_sd15,
    build_tiny_sd15,
    sd15_unet_config,
    unet_parameter_count,
)
from .seeded_init import SEED, init_kind, init_parameters_, init_parameters_fast_

__all__ = [
    "CHECKPOINT_CHANNEL_MULT", "SD15_CHANNEL_MULT", "SD15_UNET_CONFIG", "SEED", "SharedStorage",
    "TAESD_VAE_SCALE", "TINY_CLIP_INTERMEDIATE", "TINY_CLIP_LAYERS", "TINY_MODEL_CHANNELS",
    "TINY_VISION_CONFIG", "build_sd15", "build_tiny_clip", "build_tiny_clip_vision", "build_tiny_sd15",
    "build_tiny_vae", "checkpoint_shapes", "init_kind", "init_parameters_", "init_parameters_fast_",
    "sd15_unet_config", "tiny_checkpoint_state_dict", "tiny_vae_state_dict", "unet_parameter_count",
    "write_tiny_sd15_checkpoint",
]
