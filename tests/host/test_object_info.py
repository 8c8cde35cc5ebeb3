"""The headless server lists the pack's nodes with their typed sockets (``/object_info``)."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

EXPECTED = {
    "FateZero_LoadVideoFrames": {
        "display_name": "FateZero Load Video Frames",
        "category": "FateZero/video",
        "inputs": {"video": "COMBO", "frame_load_cap": "INT", "skip_first_frames": "INT",
                   "select_every_nth": "INT", "size": "INT", "resize_mode": "COMBO",
                   "sequence_fps": "FLOAT"},
        "output": ["IMAGE", "INT", "FLOAT"],
    },
    "FateZero_AttentionBlendSettings": {
        "display_name": "FateZero Attention Blend Settings",
        "category": "FateZero/attention",
        "inputs": {"clip": "CLIP", "source_prompt": "STRING", "target_prompt": "STRING",
                   "blend_words": "STRING", "target_blend_words": "STRING",
                   "cross_replace_steps": "FLOAT", "cross_replace_words": "STRING",
                   "self_replace_steps": "FLOAT", "blend_threshold": "FLOAT", "reweight": "STRING",
                   "mode": "COMBO", "local_latent_blend": "BOOLEAN", "soft_mask": "BOOLEAN"},
        "output": ["CONDITIONING", "CONDITIONING", "FATEZERO_BLEND_SETTINGS"],
    },
}

# Nodes of the pack's other modules, checked when their module is present.
OPTIONAL = {
    "invert": ("FateZero_DDIMInvert", {
        "category_prefix": "FateZero/",
        "inputs": {"model": "MODEL", "source": "CONDITIONING", "latent": "LATENT", "steps": "INT"},
        "output_contains": ["LATENT", "FATEZERO_ATTN_STORE"],
    }),
    "sample": ("FateZero_Sample", {
        "category_prefix": "FateZero/",
        "inputs": {"model": "MODEL", "positive": "CONDITIONING", "negative": "CONDITIONING",
                   "latent": "LATENT", "attention_store": "FATEZERO_ATTN_STORE",
                   "blend_settings": "FATEZERO_BLEND_SETTINGS"},
        "output_contains": ["LATENT"],
    }),
}


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return comfy_server.object_info()


def input_types(info):
    merged = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
    return {name: spec[0] if isinstance(spec[0], str) else "COMBO" for name, spec in merged.items()}


def test_pack_loaded_without_errors(comfy_server, object_info):
    lines = [line for line in comfy_server.log_tail(500_000).splitlines() if "comfyui-fatezero" in line]
    assert lines, "the pack is not listed among the custom nodes ComfyUI loaded"
    assert not [line for line in lines if "IMPORT FAILED" in line], lines


@pytest.mark.parametrize("node_id", sorted(EXPECTED))
def test_core_nodes_listed_with_typed_sockets(object_info, node_id):
    assert node_id in object_info
    info, expected = object_info[node_id], EXPECTED[node_id]
    assert info["display_name"] == expected["display_name"]
    assert info["category"] == expected["category"]
    assert info["description"]
    assert info["output"] == expected["output"]
    assert input_types(info) == expected["inputs"]
    assert info["python_module"].startswith("custom_nodes")


@pytest.mark.parametrize("module", sorted(OPTIONAL))
def test_other_nodes_listed_when_present(object_info, module):
    if not os.path.isfile(REPO / "nodes" / f"{module}.py"):
        pytest.skip(f"nodes/{module}.py is not in this checkout")
    node_id, expected = OPTIONAL[module]
    assert node_id in object_info
    info = object_info[node_id]
    assert info["category"].startswith(expected["category_prefix"])
    types = input_types(info)
    for name, type_name in expected["inputs"].items():
        assert types.get(name) == type_name, (name, types)
    for type_name in expected["output_contains"]:
        assert type_name in info["output"]


def test_every_input_has_a_tooltip(object_info):
    for node_id, info in object_info.items():
        if not node_id.startswith("FateZero_"):
            continue
        assert info["description"], node_id
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), (node_id, name)


def test_single_node_endpoint(comfy_server):
    info = comfy_server.object_info("FateZero_LoadVideoFrames")
    assert list(info) == ["FateZero_LoadVideoFrames"]
    assert info["FateZero_LoadVideoFrames"]["input"]["required"]["video"][1]["video_upload"] is True
