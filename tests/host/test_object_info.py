"""The headless server lists the pack's nodes with their typed sockets (``/object_info``).

``node_id`` s, socket types, output order and input names are what saved workflows reference, so
they are pinned here for the FateZero nodes. New widgets may be added to a node; a listed
input or output may not be renamed, retyped, reordered or removed.
"""

import pytest

# Input sockets that carry a link (not a widget value); every other input is a widget.
LINK_TYPES = {"MODEL", "CLIP", "CLIP_VISION", "VAE", "CONDITIONING", "LATENT", "IMAGE", "MASK",
              "SAMPLER", "VIDEO", "FATEZERO_ATTN_STORE", "FATEZERO_BLEND_SETTINGS",
              "FATEZERO_SOURCE_PROMPT"}

EXPECTED = {
    "FateZero_LoadVideoFrames": {
        "display_name": "FateZero Load Video Frames",
        "category": "FateZero/video",
        "required": {"video": "COMBO", "frame_load_cap": "INT", "skip_first_frames": "INT",
                     "select_every_nth": "INT", "size": "INT", "resize_mode": "COMBO"},
        "optional": {"sequence_fps": "FLOAT", "source_video": "VIDEO", "segments": "INT", "segment_index": "INT",
                     "anchor_frames": "STRING"},
        "output": ["IMAGE", "INT", "FLOAT", "AUDIO", "STRING", "INT", "INT"],
        "output_name": ["frames", "frame_count", "fps", "audio", "frame_positions", "span_start", "span_frames"],
    },
    "FateZero_DDIMInvert": {
        "display_name": "FateZero DDIM Invert (capture attention)",
        "category": "FateZero/sampling",
        "required": {"model": "MODEL", "source": "CONDITIONING", "latent": "LATENT", "steps": "INT",
                     "key_frames": "COMBO", "st_min_channels": "INT", "store_placement": "COMBO",
                     "store_dtype": "COMBO", "layer_set": "COMBO", "schedule_end": "COMBO"},
        "optional": {},
        "output": ["LATENT", "FATEZERO_ATTN_STORE"],
        "output_name": ["inverted_latent", "attention_store"],
    },
    "FateZero_SourcePrompt": {
        "display_name": "FateZero Source Prompt",
        "category": "FateZero/attention",
        "required": {"clip": "CLIP", "source_prompt": "STRING"},
        "optional": {},
        "output": ["CONDITIONING", "FATEZERO_SOURCE_PROMPT"],
        "output_name": ["source", "source_prompt"],
    },
    "FateZero_EditSettings": {
        "display_name": "FateZero Edit Settings",
        "category": "FateZero/attention",
        "required": {"clip": "CLIP", "source_prompt": "FATEZERO_SOURCE_PROMPT", "target_prompt": "STRING",
                     "blend_words": "STRING", "cross_replace_steps": "FLOAT",
                     "self_replace_steps": "FLOAT", "blend_threshold": "FLOAT", "mode": "COMBO",
                     "local_latent_blend": "BOOLEAN", "soft_mask": "BOOLEAN"},
        "optional": {"target_blend_words": "STRING", "cross_replace_words": "STRING",
                     "reweight": "STRING"},
        "output": ["CONDITIONING", "FATEZERO_BLEND_SETTINGS", "STRING"],
        "output_name": ["target", "blend_settings", "name"],
    },
    "FateZero_EditList": {
        "display_name": "FateZero Edit List",
        "category": "FateZero/attention",
        "required": {"target_1": "CONDITIONING", "blend_settings_1": "FATEZERO_BLEND_SETTINGS"},
        "optional": {f"{kind}_{k}": t for k in (2, 3, 4)
                     for kind, t in (("target", "CONDITIONING"), ("blend_settings", "FATEZERO_BLEND_SETTINGS"))},
        "output": ["CONDITIONING", "FATEZERO_BLEND_SETTINGS", "STRING"],
        "output_name": ["target", "blend_settings", "name"],
        "output_is_list": [True, True, True],  # ComfyUI runs what follows once per edit
    },
    "FateZero_AttentionBlendSettings": {
        "display_name": "FateZero Attention Blend Settings (deprecated)",
        "deprecated": True,  # saved workflows still load and run; the menu steers to the new nodes
        "category": "FateZero/attention",
        "required": {"clip": "CLIP", "source_prompt": "STRING", "target_prompt": "STRING",
                     "blend_words": "STRING", "cross_replace_steps": "FLOAT",
                     "self_replace_steps": "FLOAT", "blend_threshold": "FLOAT", "mode": "COMBO",
                     "local_latent_blend": "BOOLEAN", "soft_mask": "BOOLEAN"},
        "optional": {"target_blend_words": "STRING", "cross_replace_words": "STRING",
                     "reweight": "STRING"},
        "output": ["CONDITIONING", "CONDITIONING", "FATEZERO_BLEND_SETTINGS"],
        "output_name": ["source", "target", "blend_settings"],
    },
    "FateZero_Sample": {
        "display_name": "FateZero Sample",
        "category": "FateZero/sampling",
        "required": {"model": "MODEL", "positive": "CONDITIONING", "negative": "CONDITIONING",
                     "latent": "LATENT", "attention_store": "FATEZERO_ATTN_STORE",
                     "blend_settings": "FATEZERO_BLEND_SETTINGS", "cfg": "FLOAT",
                     "fusion": "BOOLEAN"},
        "optional": {"sampler": "SAMPLER"},
        "output": ["LATENT", "IMAGE"],
        "output_name": ["latent", "mask_preview"],
    },
    "FateZero_VideoMetrics": {
        "display_name": "FateZero Video Metrics",
        "category": "FateZero/video",
        "required": {"edited_frames": "IMAGE", "source_prompt": "STRING", "target_prompt": "STRING",
                     "flow": "COMBO", "save_json": "BOOLEAN", "filename_prefix": "STRING"},
        "optional": {"source_frames": "IMAGE", "clip_vision": "CLIP_VISION", "clip": "CLIP"},
        "output": ["STRING", "IMAGE"],
        "output_name": ["table", "plot"],
        "output_node": True,  # a sink: ComfyUI runs it for its table and plot
    },
}


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return comfy_server.object_info()


def input_types(info, section):
    """``{name: type}`` of one input section; combo widgets (a list of options) are ``COMBO``."""
    return {name: spec[0] if isinstance(spec[0], str) else "COMBO"
            for name, spec in info["input"].get(section, {}).items()}


def test_pack_loaded_without_errors(comfy_server, object_info):
    lines = [line for line in comfy_server.log_tail(500_000).splitlines() if "comfyui-fatezero" in line]
    assert lines, "the pack is not listed among the custom nodes ComfyUI loaded"
    assert not [line for line in lines if "IMPORT FAILED" in line], lines


def test_every_pack_node_listed(object_info):
    listed = {node_id for node_id in object_info if node_id.startswith("FateZero_")}
    assert set(EXPECTED) <= listed, sorted(set(EXPECTED) - listed)


@pytest.mark.parametrize("node_id", list(EXPECTED))
def test_node_listed_with_typed_sockets(object_info, node_id):
    assert node_id in object_info
    info, expected = object_info[node_id], EXPECTED[node_id]
    assert info["name"] == node_id
    assert info["display_name"] == expected["display_name"]
    assert info["category"] == expected["category"]
    assert info["description"]
    assert info["python_module"].startswith("custom_nodes")
    assert info["output_node"] is expected.get("output_node", False)

    # outputs: types, names and order are what links in saved workflows point at
    assert info["output"] == expected["output"]
    assert info["output_name"] == expected["output_name"]
    assert info["output_is_list"] == expected.get("output_is_list", [False] * len(expected["output"]))
    assert info.get("deprecated", False) is expected.get("deprecated", False)
    tooltips = info.get("output_tooltips") or []
    assert len(tooltips) == len(expected["output"]) and all(tooltips), tooltips

    for section in ("required", "optional"):
        types = input_types(info, section)
        for name, type_name in expected[section].items():
            assert types.get(name) == type_name, (section, name, types)
        # no unexpected link socket (a new one would break graphs that do not connect it)
        links = {name for name, type_name in types.items() if type_name in LINK_TYPES}
        assert links == {n for n, t in expected[section].items() if t in LINK_TYPES}, (section, links)


def test_custom_socket_types_connect_producer_to_consumer(object_info):
    """The custom types match by string between the nodes that make and take them."""
    invert, settings, sample, source = (object_info[n] for n in
                                        ("FateZero_DDIMInvert", "FateZero_EditSettings",
                                         "FateZero_Sample", "FateZero_SourcePrompt"))
    source_out = source["output"][source["output_name"].index("source_prompt")]
    assert settings["input"]["required"]["source_prompt"][0] == source_out == "FATEZERO_SOURCE_PROMPT"
    store_out = invert["output"][invert["output_name"].index("attention_store")]
    blend_out = settings["output"][settings["output_name"].index("blend_settings")]
    assert sample["input"]["required"]["attention_store"][0] == store_out == "FATEZERO_ATTN_STORE"
    assert sample["input"]["required"]["blend_settings"][0] == blend_out == "FATEZERO_BLEND_SETTINGS"
    assert invert["output"][0] == sample["input"]["required"]["latent"][0] == "LATENT"


@pytest.mark.parametrize("node_id", list(EXPECTED))
def test_every_input_has_a_tooltip(object_info, node_id):
    info = object_info[node_id]
    assert info["description"], node_id
    names = []
    for section in ("required", "optional"):
        for name, spec in info["input"].get(section, {}).items():
            names.append(name)
            assert len(spec) > 1 and isinstance(spec[1], dict), (node_id, name, spec)
            tooltip = spec[1].get("tooltip")
            assert isinstance(tooltip, str) and tooltip.strip(), (node_id, name)
    assert set(EXPECTED[node_id]["required"]) | set(EXPECTED[node_id]["optional"]) <= set(names)


def test_every_pack_node_input_has_a_tooltip(object_info):
    """Also for the pack's other nodes (anything with the ``FateZero_`` prefix)."""
    for node_id, info in object_info.items():
        if not node_id.startswith("FateZero_"):
            continue
        assert info["description"], node_id
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), (node_id, name)


def test_widget_options(object_info):
    """Defaults an artist relies on: official settings, upload widget on the video input."""
    video = object_info["FateZero_LoadVideoFrames"]["input"]["required"]["video"]
    assert video[1].get("video_upload") is True
    invert = object_info["FateZero_DDIMInvert"]["input"]["required"]
    assert invert["steps"][1]["default"] == 50
    assert set(invert["store_placement"][1]["options"]) >= {"cpu", "gpu", "disk", "recompute"}
    sample = object_info["FateZero_Sample"]["input"]["required"]
    assert sample["cfg"][1]["default"] == 7.5
    assert sample["fusion"][1]["default"] is True


def test_single_node_endpoint(comfy_server):
    for node_id in EXPECTED:
        info = comfy_server.object_info(node_id)
        assert list(info) == [node_id]
