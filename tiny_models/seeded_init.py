"""Seeded initialisation of every parameter (ComfyUI's ops, ``comfy.ops.disable_weight_init``, skip it)."""

from __future__ import annotations

import math

import torch

SEED = 20231001


def _fan_in(shape: torch.Size) -> int:
    return max(1, math.prod(shape[1:])) if len(shape) >= 2 else 1


def init_kind(name: str, shape: torch.Size) -> tuple[str, float]:
    """``(kind, std)`` for one parameter: ``normal`` around 0, ``around_one`` or a ``constant``.

    - ``*.vae_scale`` / ``*.vae_shift`` (TAESD latent scaling): the constants 1 and 0;
    - biases: N(0, 0.02);
    - other 0-d/1-d parameters (norm weights): 1 + N(0, 0.02);
    - matrices, conv kernels, embeddings: N(0, 1/fan_in), which keeps activations O(1).
    """
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "vae_scale":
        return "constant", 1.0
    if leaf == "vae_shift":
        return "constant", 0.0
    if leaf == "bias":
        return "normal", 0.02
    if len(shape) <= 1:
        return "around_one", 0.02
    return "normal", 1.0 / math.sqrt(_fan_in(shape))


def _check_finite(module: torch.nn.Module) -> None:
    bad = [n for n, p in module.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise AssertionError(f"parameters left non-finite after init: {bad[:5]}")


def _by_name(module: torch.nn.Module):
    return sorted(module.named_parameters(), key=lambda item: item[0])


def init_parameters_(module: torch.nn.Module, seed: int = SEED, gain: float = 1.0) -> torch.nn.Module:
    """Fill every parameter of ``module`` with seeded values (see :func:`init_kind`); in place.

    Parameters are visited in name order with one generator, so the result depends only on
    ``seed`` and the module layout. ``gain`` multiplies the std of weight matrices and kernels
    (use ``sqrt(2)`` for ReLU networks). Buffers are left alone.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in _by_name(module):
            kind, std = init_kind(name, param.shape)
            if kind == "constant":
                param.fill_(std)
                continue
            values = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if kind == "around_one":
                values = values.mul_(std).add_(1.0)
            else:
                values = values.mul_(std * (gain if param.dim() >= 2 else 1.0))
            param.copy_(values.to(param.dtype))
    _check_finite(module)
    return module


def init_parameters_fast_(module: torch.nn.Module, seed: int = SEED, pool: int = 1 << 24) -> None:
    """:func:`init_parameters_`'s distributions, drawn from one pool of ``pool`` normal values that
    each parameter reads at a seeded offset: the ~860 M values of an SD1.5-shape UNet are filled
    at memory speed instead of being generated one by one (other values than
    :func:`init_parameters_` gives for the same seed)."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(pool, generator=g)
    with torch.no_grad():
        for name, param in _by_name(module):
            kind, std = init_kind(name, param.shape)
            flat = param.view(-1)
            if kind == "constant":
                flat.fill_(std)
                continue
            done = 0
            while done < flat.numel():
                start = int(torch.randint(0, pool, (1,), generator=g))
                n = min(flat.numel() - done, pool - start)
                chunk = flat[done:done + n]
                chunk.copy_(values[start:start + n]).mul_(std)
                if kind == "around_one":
                    chunk.add_(1.0)
                done += n
    _check_finite(module)
