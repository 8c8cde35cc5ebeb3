"""The SD1.x UNet layout the pack assumes (``fatezero_core.sd1``) is ComfyUI's SD1.5 UNet.

``sd1`` names the 16 transformer blocks in diffusers terms, with their downsampling level, width and
head count; Tune-A-Video checkpoints and the store-size formulas are laid out on it. The reference
here is ComfyUI itself: a UNet built from ``comfy.supported_models.SD15`` (``tiny_sd15``: the SD1.5
config with ``model_channels`` 32), ComfyUI's own diffusers-to-ComfyUI key map
(``comfy.utils.unet_to_diffusers``), and one forward pass that records every transformer block's
self-attention call as ComfyUI makes it (``attn1_patch``: block, heads, activation shape, width).
"""

from __future__ import annotations

import re

import torch

LATENT = 16  # latent side of the forward pass: level d runs at LATENT / 2**d


def attention_calls(model_patcher) -> list[dict]:
    """Every attn1 call of one forward pass, in call order, as ComfyUI reports it to a patch."""
    calls = []

    def record(n, context, value, extra):
        calls.append({"block": tuple(extra["block"]), "block_index": extra["block_index"],
                      "heads": extra["n_heads"], "side": extra["activations_shape"][-1],
                      "channels": n.shape[-1]})
        return n, context, value

    patched = model_patcher.clone()
    patched.set_model_attn1_patch(record)
    x = torch.randn(1, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        patched.model.apply_model(x, torch.tensor([1.0]), c_crossattn=context,
                                  transformer_options=patched.model_options["transformer_options"])
    return calls


def comfy_block(diffusers_path: str, key_map: dict) -> tuple[tuple[str, int], int]:
    """``(('input', 1), 0)`` for ``down_blocks.0.attentions.0.transformer_blocks.0``: ComfyUI's
    block and transformer index of a diffusers transformer block, from ComfyUI's own key map."""
    comfy_key = key_map[f"{diffusers_path}.attn1.to_q.weight"]
    match = re.match(r"(input|middle|output)_blocks?(?:\.(\d+))?\.1\.transformer_blocks\.(\d+)\.", comfy_key)
    assert match, comfy_key
    kind, number, index = match.groups()
    return (kind, 0 if kind == "middle" else int(number)), int(index)


def test_sd1_blocks_are_comfyuis_sd15_blocks_in_call_order(tiny_sd15):
    import comfy.utils

    from fatezero_core import sd1

    unet_config = tiny_sd15.model.model_config.unet_config
    model_channels = unet_config["model_channels"]
    key_map = comfy.utils.unet_to_diffusers(unet_config)
    expected = []
    for block in sd1.sd1_attention_blocks():
        comfy_name, index = comfy_block(block.path, key_map)
        expected.append({"block": comfy_name, "block_index": index, "heads": sd1.HEADS,
                         "side": LATENT >> block.level, "channels": block.channels(model_channels)})
    assert attention_calls(tiny_sd15) == expected


def test_sd1_constants_are_the_sd15_config(tiny_sd15):
    from fatezero_core import sd1

    config = tiny_sd15.model.model_config.unet_config
    assert tuple(config["channel_mult"]) == sd1.CHANNEL_MULT
    assert set(config["num_res_blocks"]) == {sd1.LAYERS_PER_BLOCK}
    assert config["num_heads"] == sd1.HEADS
    with_attention = [level for level, depth in enumerate(config["transformer_depth"][::sd1.LAYERS_PER_BLOCK])
                      if depth > 0]
    assert tuple(with_attention) == sd1.DOWN_LEVELS_WITH_ATTENTION
