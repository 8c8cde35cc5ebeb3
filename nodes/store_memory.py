"""Host readings for DDIM Invert's memory check: the model's UNet config, the source prompt's token
slots and the memory, RAM and disk space that are free. The sizing and the refusal are the core's
(:mod:`fatezero_core.store_size`); this module only reads the host.
"""

from __future__ import annotations

import os
import shutil

import comfy.model_management
import psutil  # a ComfyUI requirement (comfy.model_management uses it)

from ..fatezero_core.attention import unrepeated_tokens
from ..fatezero_core.store import STORE_DTYPES
from ..fatezero_core.store_size import (TEXT_TOKENS, StoreEstimate, check_store_fits, estimate_store,
                                        unet_attention_layers)
from .store_folder import planned_store_folder


def available_ram() -> int:
    """Host memory the system can give without swapping (``psutil.virtual_memory().available``,
    what ComfyUI's ``get_free_memory`` reports for the CPU)."""
    return int(psutil.virtual_memory().available)


def device_free(model) -> int:
    """Free memory of the model's device as ComfyUI reports it (ComfyUI 0.3.64
    ``comfy/model_management.py`` ``get_free_memory``: the driver's free memory plus what PyTorch
    holds unused). Memory of models ComfyUI keeps loaded counts as used."""
    return int(comfy.model_management.get_free_memory(model.load_device))


def device_is_ram(model) -> bool:
    """True when the model computes on the CPU (``--cpu``) or in memory shared with it (MPS):
    a ``gpu`` store then lives in RAM."""
    device = model.load_device
    return comfy.model_management.is_device_cpu(device) or comfy.model_management.is_device_mps(device)


def disk_free(folder: str) -> int | None:
    """Free bytes of the file system ``folder`` will be on (it need not exist yet), or None when no
    part of its path can be read."""
    path = os.path.abspath(folder)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent
    try:
        return int(shutil.disk_usage(path).free)
    except OSError:
        return None


def context_tokens(source) -> int:
    """Token slots of the source prompt's cross-attention maps: the first conditioning's length
    without repetition padding, as the capture sees it (``unrepeated_tokens``)."""
    if not source:
        return TEXT_TOKENS
    cond = source[0][0]
    return int(unrepeated_tokens(cond, cond)[0].shape[1])


def store_estimate(model, config, store_dtype: str, source) -> StoreEstimate:
    """Bytes a capture with ``config`` on ``model`` will hold (``AttentionStore.nbytes``)."""
    layers = unet_attention_layers(model.model.model_config.unet_config)
    return estimate_store(layers, config, STORE_DTYPES[store_dtype], context_tokens=context_tokens(source))


def check_store_memory(model, config, placement: str, store_dtype: str, source) -> StoreEstimate:
    """Refuse a placement whose store cannot fit in what is free now, before anything runs;
    returns the estimate."""
    estimate = store_estimate(model, config, store_dtype, source)
    shared = device_is_ram(model)
    folder = planned_store_folder()
    free = {"device": None if shared else device_free(model), "ram": available_ram(),
            "disk": disk_free(folder)}
    check_store_fits(estimate, placement, free, device_is_ram=shared, disk_folder=folder)
    return estimate


__all__ = ["available_ram", "check_store_memory", "context_tokens", "device_free", "device_is_ram",
           "disk_free", "store_estimate"]
