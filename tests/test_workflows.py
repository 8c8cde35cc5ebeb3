"""The shipped example workflows: UI format and API format agree, and both fit the node schemas.

Every ``workflows/<name>.json`` (the frontend's saved-workflow format, schema version 0.4) has an
API-format twin ``workflows/api/<name>.json`` (what ``/prompt`` takes). Node schemas come from
``tests/data/object_info.json``: the parts of a ComfyUI 0.3.64 ``/object_info`` that a workflow
depends on (input order, types, ranges, options, outputs) for the pack's nodes and every core node
the workflows use. ``tests/host/test_workflows_host.py`` compares that snapshot with a live server
and rewrites it with ``FATEZERO_UPDATE_OBJECT_INFO=1``.

How the frontend maps ``widgets_values`` to inputs (ComfyUI frontend 1.27, ``getOrderedInputSpecs``
and ``Comfy.UploadImage``): one value per widget input (INT, FLOAT, STRING, BOOLEAN, COMBO without
``forceInput``) in ``input_order`` (required, then optional); an INT marked
``control_after_generate`` (or named ``seed``/``noise_seed``) is followed by its control value; a
node with an upload combo gets an ``upload`` button last, serialised as ``"image"``. A widget that
is linked appears in ``inputs`` with ``"widget": {"name": ...}`` and keeps a value in
``widgets_values``; the API format then holds the link instead of the value.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO / "workflows"
API_WORKFLOWS = WORKFLOWS / "api"
OBJECT_INFO = REPO / "tests" / "data" / "object_info.json"

PACK_PREFIX = "FateZero_"
# Frontend-only nodes: saved in UI workflows, never sent to the server.
VIRTUAL_NODES = frozenset({"Note", "MarkdownNote", "Reroute", "PrimitiveNode"})
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
UPLOAD_FLAGS = ("image_upload", "video_upload", "animated_image_upload")
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
UPLOAD_WIDGET_VALUE = "image"
# Combo inputs whose options are the files in a folder: their options depend on the machine, so
# the snapshot records the folder instead of the list.
FILE_INPUTS = {
    "CheckpointLoaderSimple": {"ckpt_name": "checkpoints"},
    "ControlNetLoader": {"control_net_name": "controlnet"},
    "LoraLoaderModelOnly": {"lora_name": "loras"},
    "FateZero_LoadVideoFrames": {"video": "input"},
    "FateZero_TuneAVideoLoader": {"checkpoint": "tuneavideo"},
}
# Input options kept in the snapshot: what decides widget order, ranges and socket types.
KEPT_OPTIONS = ("default", "min", "max", "step", "round", "multiline", "dynamicPrompts",
                "forceInput", "control_after_generate", *UPLOAD_FLAGS)
UI_NODE_KEYS = ("id", "type", "pos", "size", "flags", "order", "mode", "inputs", "outputs",
                "properties", "widgets_values")
UI_TOP_KEYS = ("last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra",
               "version")
SD15_CHECKPOINT = "v1-5-pruned-emaonly.safetensors"


# ------------------------------------------------------------------------------------------------
# Schema snapshot (shared with the host test that regenerates it)
# ------------------------------------------------------------------------------------------------


def normalize_node(name: str, info: dict, file_inputs: dict | None = None) -> dict:
    """The parts of one ``/object_info`` entry a workflow depends on, in a stable form.

    Inputs are listed in the frontend's widget order (``input_order``: required, then optional),
    combos as ``{"type": "COMBO", "options": [...]}`` whether declared V1- (``[[...]]``) or
    V3-style (``["COMBO", {"options": [...]}]``); file-list combos record their folder instead
    of the options. Tooltips and descriptions are left out.
    """
    files = (FILE_INPUTS if file_inputs is None else file_inputs).get(name, {})
    raw_inputs = info.get("input", {})
    order = info.get("input_order") or {sec: list(raw_inputs.get(sec, {})) for sec in ("required", "optional")}
    inputs = []
    for section in ("required", "optional"):
        declared = raw_inputs.get(section, {})
        for input_name in order.get(section, []):
            spec = declared[input_name]
            kind = spec[0]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            entry = {"name": input_name, "section": section}
            if isinstance(kind, list) or kind == "COMBO":
                entry["type"] = "COMBO"
                options = kind if isinstance(kind, list) else opts.get("options", [])
                if input_name in files:
                    entry["files"] = files[input_name]
                else:
                    entry["options"] = list(options)
            else:
                entry["type"] = kind
            for key in KEPT_OPTIONS:
                if key in opts:
                    entry[key] = opts[key]
            inputs.append(entry)
    outputs = [
        {"name": out_name, "type": out_type, "is_list": bool(is_list)}
        for out_name, out_type, is_list in zip(
            info.get("output_name", info.get("output", [])), info.get("output", []),
            info.get("output_is_list", [False] * len(info.get("output", []))),
        )
    ]
    return {
        "display_name": info.get("display_name") or name,
        "category": info.get("category", ""),
        "output_node": bool(info.get("output_node", False)),
        "inputs": inputs,
        "outputs": outputs,
    }


def load_snapshot() -> dict:
    return json.loads(OBJECT_INFO.read_text())


def widget_slots(spec: dict) -> list[tuple[str, str]]:
    """``(kind, input_name)`` per entry of ``widgets_values``: kind is ``value``, ``control``
    (control_after_generate) or ``upload`` (the upload button, input_name ``upload``)."""
    slots = []
    for inp in spec["inputs"]:
        if inp["type"] in WIDGET_TYPES and not inp.get("forceInput"):
            slots.append(("value", inp["name"]))
            if inp["type"] == "INT" and (inp.get("control_after_generate")
                                         or inp["name"] in ("seed", "noise_seed")):
                slots.append(("control", inp["name"]))
    if any(inp["section"] == "required" and inp["type"] == "COMBO" and any(inp.get(f) for f in UPLOAD_FLAGS)
           for inp in spec["inputs"]):
        slots.append(("upload", "upload"))
    return slots


def is_widget(inp: dict) -> bool:
    return inp["type"] in WIDGET_TYPES and not inp.get("forceInput")


def types_match(output_type: str, input_type: str) -> bool:
    if "*" in (output_type, input_type):
        return True
    outs, ins = set(output_type.split(",")), set(input_type.split(","))
    return bool(outs & ins)


def value_problem(inp: dict, value) -> str | None:
    """Why ``value`` is not acceptable for widget input ``inp``, or None."""
    kind = inp["type"]
    if kind == "INT":
        if isinstance(value, bool) or not isinstance(value, int):
            return f"{value!r} is not an integer"
    elif kind == "FLOAT":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"{value!r} is not a number"
    elif kind == "BOOLEAN":
        if not isinstance(value, bool):
            return f"{value!r} is not a boolean"
    elif kind == "STRING":
        if not isinstance(value, str):
            return f"{value!r} is not a string"
        if inp.get("dynamicPrompts") and ("{" in value or "}" in value):
            return f"{value!r} has braces, which dynamic prompts would rewrite"
    elif kind == "COMBO":
        if not isinstance(value, str) or not value:
            return f"{value!r} is not a choice"
        if "files" not in inp and value not in inp["options"]:
            return f"{value!r} is not one of {inp['options']}"
    if kind in ("INT", "FLOAT"):
        if "min" in inp and value < inp["min"]:
            return f"{value!r} is below the minimum {inp['min']}"
        if "max" in inp and value > inp["max"]:
            return f"{value!r} is above the maximum {inp['max']}"
    return None


# ------------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------------


def workflow_names() -> list[str]:
    return sorted(p.stem for p in WORKFLOWS.glob("*.json"))


def api_names() -> list[str]:
    return sorted(p.stem for p in API_WORKFLOWS.glob("*.json"))


def load_ui(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text())


def load_api(name: str) -> dict:
    return json.loads((API_WORKFLOWS / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def snapshot() -> dict:
    return load_snapshot()["nodes"]


NAMES = workflow_names()


def real_nodes(ui: dict) -> list[dict]:
    return [n for n in ui["nodes"] if n["type"] not in VIRTUAL_NODES]


def node_by_id(ui: dict) -> dict[int, dict]:
    return {n["id"]: n for n in ui["nodes"]}


def links_by_id(ui: dict) -> dict[int, list]:
    return {link[0]: link for link in ui["links"]}


# ------------------------------------------------------------------------------------------------
# Snapshot and file set
# ------------------------------------------------------------------------------------------------


def test_snapshot_is_wellformed(snapshot):
    data = load_snapshot()
    assert data["comfyui_version"]
    assert {"FateZero_LoadVideoFrames", "FateZero_DDIMInvert", "FateZero_SourcePrompt",
            "FateZero_EditSettings", "FateZero_Sample"} <= set(snapshot)
    for name, spec in snapshot.items():
        assert spec == normalize_node(name, _as_object_info(spec)), name  # a fixed point
        names = [i["name"] for i in spec["inputs"]]
        assert len(names) == len(set(names)), name


def _as_object_info(spec: dict) -> dict:
    """Rebuild an ``/object_info``-shaped entry from a normalised one (for the fixed-point check)."""
    info = {"input": {}, "input_order": {}, "output": [], "output_name": [], "output_is_list": [],
            "display_name": spec["display_name"], "category": spec["category"],
            "output_node": spec["output_node"]}
    for inp in spec["inputs"]:
        opts = {k: inp[k] for k in KEPT_OPTIONS if k in inp}
        if inp["type"] == "COMBO":
            opts["options"] = inp.get("options", [])
        info["input"].setdefault(inp["section"], {})[inp["name"]] = [inp["type"], opts]
        info["input_order"].setdefault(inp["section"], []).append(inp["name"])
    for out in spec["outputs"]:
        info["output"].append(out["type"])
        info["output_name"].append(out["name"])
        info["output_is_list"].append(out["is_list"])
    return info


def test_every_workflow_has_an_api_twin():
    assert NAMES, "no workflows found"
    assert NAMES == api_names()


@pytest.mark.parametrize("name", NAMES)
def test_every_node_type_is_known(name, snapshot):
    for node in real_nodes(load_ui(name)):
        assert node["type"] in snapshot, f"{name}: node type {node['type']} is not in {OBJECT_INFO.name}"
    for node_id, node in load_api(name).items():
        assert node["class_type"] in snapshot, f"{name}/api: {node['class_type']} unknown"


# ------------------------------------------------------------------------------------------------
# UI format
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_shape(name):
    ui = load_ui(name)
    for key in UI_TOP_KEYS:
        assert key in ui, f"{name}: missing top-level '{key}'"
    assert ui["version"] == 0.4
    ids = [n["id"] for n in ui["nodes"]]
    assert len(ids) == len(set(ids)), f"{name}: duplicate node ids"
    assert ui["last_node_id"] >= max(ids)
    link_ids = [link[0] for link in ui["links"]]
    assert len(link_ids) == len(set(link_ids)), f"{name}: duplicate link ids"
    assert ui["last_link_id"] >= max(link_ids, default=0)
    for node in ui["nodes"]:
        for key in UI_NODE_KEYS:
            assert key in node, f"{name}: node {node.get('id')} lacks '{key}'"
        assert len(node["pos"]) == 2 and len(node["size"]) == 2
        assert node["mode"] == 0, f"{name}: node {node['id']} is muted or bypassed"
        if node["type"] not in VIRTUAL_NODES:
            assert node["properties"]["Node name for S&R"] == node["type"]
    for group in ui["groups"]:
        assert group["title"] and len(group["bounding"]) == 4


@pytest.mark.parametrize("name", NAMES)
def test_ui_links_are_consistent_and_type_check(name, snapshot):
    ui = load_ui(name)
    nodes = node_by_id(ui)
    for link in ui["links"]:
        assert len(link) == 6, f"{name}: link {link} is not [id, from, from_slot, to, to_slot, type]"
        link_id, src, src_slot, dst, dst_slot, link_type = link
        source, target = nodes[src], nodes[dst]
        out = source["outputs"][src_slot]
        assert link_id in (out["links"] or []), f"{name}: link {link_id} not listed on its output"
        assert out["type"] == link_type
        inp = target["inputs"][dst_slot]
        assert inp["link"] == link_id, f"{name}: link {link_id} not set on its input"
        out_spec = snapshot[source["type"]]["outputs"][src_slot]
        in_spec = {i["name"]: i for i in snapshot[target["type"]]["inputs"]}[inp["name"]]
        assert out_spec["type"] == out["type"], f"{name}: node {src} output {src_slot} type"
        assert in_spec["type"] == inp["type"], f"{name}: node {dst} input {inp['name']} type"
        assert types_match(out_spec["type"], in_spec["type"]), (
            f"{name}: link {link_id} connects {out_spec['type']} to {inp['name']} ({in_spec['type']})")
    listed = {link[0] for link in ui["links"]}
    for node in ui["nodes"]:
        for out in node.get("outputs", []):
            assert set(out["links"] or []) <= listed, f"{name}: node {node['id']} names an unknown link"
        for inp in node.get("inputs", []):
            assert inp["link"] is None or inp["link"] in listed


@pytest.mark.parametrize("name", NAMES)
def test_ui_sockets_match_schema(name, snapshot):
    """Every node lists its sockets in schema order, each required socket is connected, and
    linked widgets are marked as widgets."""
    for node in real_nodes(load_ui(name)):
        spec = snapshot[node["type"]]
        by_name = {i["name"]: i for i in spec["inputs"]}
        sockets = [i for i in spec["inputs"] if not is_widget(i)]
        listed = [i for i in node["inputs"] if "widget" not in i]
        assert [i["name"] for i in listed] == [i["name"] for i in sockets], (
            f"{name}: node {node['id']} ({node['type']}) sockets")
        for inp in listed:
            if by_name[inp["name"]]["section"] == "required":
                assert inp["link"] is not None, f"{name}: node {node['id']} input {inp['name']} unconnected"
            else:
                assert inp.get("shape") == 7 or inp["link"] is not None
        for inp in node["inputs"]:
            if "widget" in inp:
                assert inp["widget"]["name"] == inp["name"] and is_widget(by_name[inp["name"]])
                assert inp["link"] is not None, f"{name}: node {node['id']} lists an unlinked widget"
        assert [(o["name"], o["type"]) for o in node["outputs"]] == [
            (o["name"], o["type"]) for o in spec["outputs"]], f"{name}: node {node['id']} outputs"
        for slot, out in enumerate(node["outputs"]):
            assert out.get("slot_index", slot) == slot


@pytest.mark.parametrize("name", NAMES)
def test_ui_widget_values_are_complete_and_in_range(name, snapshot):
    for node in real_nodes(load_ui(name)):
        spec = snapshot[node["type"]]
        by_name = {i["name"]: i for i in spec["inputs"]}
        slots = widget_slots(spec)
        values = node["widgets_values"]
        assert len(values) == len(slots), (
            f"{name}: node {node['id']} ({node['type']}) has {len(values)} widget values, "
            f"expected {len(slots)}: {[s[1] for s in slots]}")
        for (kind, input_name), value in zip(slots, values):
            if kind == "upload":
                assert value == UPLOAD_WIDGET_VALUE
            elif kind == "control":
                assert value in CONTROL_VALUES
            else:
                problem = value_problem(by_name[input_name], value)
                assert problem is None, f"{name}: node {node['id']} {node['type']}.{input_name}: {problem}"


@pytest.mark.parametrize("name", NAMES)
def test_ui_execution_order_is_topological(name):
    ui = load_ui(name)
    nodes = node_by_id(ui)
    orders = [n["order"] for n in ui["nodes"]]
    assert len(orders) == len(set(orders)), f"{name}: duplicate 'order' values"
    for _, src, _, dst, _, _ in ui["links"]:
        assert nodes[src]["order"] < nodes[dst]["order"], f"{name}: node {src} runs after {dst}"


# ------------------------------------------------------------------------------------------------
# API format and UI <-> API agreement
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_shape(name, snapshot):
    api = load_api(name)
    assert isinstance(api, dict) and api
    for node_id, node in api.items():
        assert isinstance(node_id, str) and node_id.isdigit()
        assert set(node) <= {"class_type", "inputs", "_meta"}, f"{name}/api: node {node_id} keys"
        assert isinstance(node["class_type"], str) and isinstance(node["inputs"], dict)
        spec = snapshot[node["class_type"]]
        by_name = {i["name"]: i for i in spec["inputs"]}
        for input_name, value in node["inputs"].items():
            assert input_name in by_name, f"{name}/api: {node['class_type']} has no input {input_name}"
            inp = by_name[input_name]
            if isinstance(value, list):
                assert len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)
                source = api[value[0]]
                out = snapshot[source["class_type"]]["outputs"][value[1]]
                assert types_match(out["type"], inp["type"]), (
                    f"{name}/api: {value} ({out['type']}) into {node_id}.{input_name} ({inp['type']})")
            else:
                assert is_widget(inp), f"{name}/api: socket {node_id}.{input_name} holds a literal"
                problem = value_problem(inp, value)
                assert problem is None, f"{name}/api: {node_id}.{input_name}: {problem}"
        missing = [i["name"] for i in spec["inputs"]
                   if i["section"] == "required" and i["name"] not in node["inputs"]]
        assert not missing, f"{name}/api: node {node_id} lacks required inputs {missing}"


@pytest.mark.parametrize("name", NAMES)
def test_ui_and_api_twins_agree(name, snapshot):
    ui, api = load_ui(name), load_api(name)
    nodes = real_nodes(ui)
    assert sorted(api, key=int) == [str(n["id"]) for n in sorted(nodes, key=lambda n: n["id"])], f"{name}: node ids differ"
    links = links_by_id(ui)
    for node in nodes:
        twin = api[str(node["id"])]
        where = f"{name}: node {node['id']} ({node['type']})"
        assert twin["class_type"] == node["type"], where
        spec = snapshot[node["type"]]
        expected = {}
        for inp in node["inputs"]:
            if inp["link"] is not None:
                _, src, src_slot, _, _, _ = links[inp["link"]]
                expected[inp["name"]] = [str(src), src_slot]
        for (kind, input_name), value in zip(widget_slots(spec), node["widgets_values"]):
            if kind == "value" and input_name not in expected:
                expected[input_name] = value
        assert twin["inputs"] == expected, where
        for key, value in expected.items():  # == treats 1 and 1.0 (and True) alike
            assert type(twin["inputs"][key]) is type(value), f"{where}.{key}"
        title = node.get("title") or spec["display_name"]
        assert twin.get("_meta", {}).get("title") == title, f"{where}: _meta.title"


# ------------------------------------------------------------------------------------------------
# What the examples are meant to show
# ------------------------------------------------------------------------------------------------


def api_nodes(name: str, class_type: str) -> list[dict]:
    return [n for n in load_api(name).values() if n["class_type"] == class_type]


def single(name: str, class_type: str) -> dict:
    found = api_nodes(name, class_type)
    assert len(found) == 1, f"{name}: expected one {class_type}, found {len(found)}"
    return found[0]["inputs"]


@pytest.mark.parametrize("name", NAMES)
def test_every_example_edits_decodes_and_saves(name):
    api = load_api(name)
    classes = [n["class_type"] for n in api.values()]
    for needed in ("FateZero_LoadVideoFrames", "FateZero_SourcePrompt", "FateZero_EditSettings",
                   "FateZero_DDIMInvert", "FateZero_Sample", "VAEEncode", "VAEDecode",
                   "CreateVideo", "SaveVideo", "PreviewImage"):
        assert needed in classes, f"{name}: no {needed}"
    loader_id = next(i for i, n in api.items() if n["class_type"] == "FateZero_LoadVideoFrames")
    sample_id = next(i for i, n in api.items() if n["class_type"] == "FateZero_Sample")
    assert single(name, "CreateVideo")["fps"] == [loader_id, 2], f"{name}: fps is not the clip's"
    previews = [n["inputs"]["images"] for n in api_nodes(name, "PreviewImage")]
    assert [sample_id, 1] in previews, f"{name}: the mask preview is not shown"
    invert, sample = single(name, "FateZero_DDIMInvert"), single(name, "FateZero_Sample")
    assert invert["model"] == sample["model"], f"{name}: inversion and edit use different models"
    source = next(i for i, n in api.items() if n["class_type"] == "FateZero_SourcePrompt")
    settings = next(i for i, n in api.items() if n["class_type"] == "FateZero_EditSettings")
    assert invert["source"] == [source, 0] and sample["blend_settings"] == [settings, 1]
    assert api[settings]["inputs"]["source_prompt"] == [source, 1]
    assert api[sample["latent"][0]]["class_type"] == "FateZero_DDIMInvert"
    assert sample["attention_store"] == [sample["latent"][0], 1]


def upstream(api: dict, node_id: str) -> set[str]:
    """Every node ``node_id`` depends on (ComfyUI keys its cache on all of them)."""
    seen, todo = set(), [node_id]
    while todo:
        for value in api[todo.pop()]["inputs"].values():
            if isinstance(value, list) and len(value) == 2 and value[0] not in seen:
                seen.add(value[0])
                todo.append(value[0])
    return seen


EDIT_SIDE = {"FateZero_EditSettings", "FateZero_EditList", "FateZero_AttentionBlendSettings",
             "FateZero_Sample", "ControlNetApplyAdvanced", "ControlNetLoader"}


@pytest.mark.parametrize("name", NAMES)
def test_the_inversion_and_the_training_depend_on_nothing_of_the_edit(name):
    """ComfyUI reruns a node when anything upstream changes: nothing that belongs to an edit (target
    prompt, words, cfg, ControlNet) may be upstream of DDIM Invert or Tune-A-Video Train."""
    api = load_api(name)
    for node_id, node in api.items():
        if node["class_type"] in ("FateZero_DDIMInvert", "FateZero_TuneAVideoTrain"):
            found = {api[i]["class_type"] for i in upstream(api, node_id)} & EDIT_SIDE
            assert not found, f"{name}: {node['class_type']} depends on {sorted(found)}"


@pytest.mark.parametrize("name", [n for n in NAMES if "tav" not in n])
def test_sd15_examples_use_the_standard_checkpoint_name(name):
    assert single(name, "CheckpointLoaderSimple")["ckpt_name"] == SD15_CHECKPOINT


def test_style_watercolor_reproduces_the_official_jeep_watercolor_config():
    settings = single("style_watercolor", "FateZero_EditSettings")
    source = single("style_watercolor", "FateZero_SourcePrompt")
    assert source["source_prompt"] == "a silver jeep driving down a curvy road in the countryside"
    assert settings["target_prompt"] == ("watercolor painting of a silver jeep driving down a curvy "
                                         "road in the countryside")
    assert (settings["mode"], settings["cross_replace_steps"], settings["self_replace_steps"]) == ("auto", 0.8, 0.8)
    assert settings["reweight"] == "watercolor: 10"
    assert settings["blend_words"] == "" and settings["target_blend_words"] == ""
    assert not settings["local_latent_blend"]
    invert = single("style_watercolor", "FateZero_DDIMInvert")
    assert (invert["steps"], invert["key_frames"], invert["st_min_channels"]) == (50, "auto", -1)
    assert single("style_watercolor", "FateZero_Sample")["cfg"] == 7.5
    loader = single("style_watercolor", "FateZero_LoadVideoFrames")
    assert (loader["frame_load_cap"], loader["size"], loader["resize_mode"]) == (8, 512, "crop")


def test_attribute_edit_reproduces_the_official_bear_tiger_config():
    settings = single("attribute_edit", "FateZero_EditSettings")
    source = single("attribute_edit", "FateZero_SourcePrompt")
    assert source["source_prompt"] == "a brown bear walking on the rock against a wall"
    assert settings["target_prompt"] == "a red tiger walking on the rock against a wall"
    assert (settings["mode"], settings["cross_replace_steps"], settings["self_replace_steps"]) == ("replace", 0.7, 0.7)
    assert (settings["blend_words"], settings["target_blend_words"]) == ("bear", "tiger")
    assert settings["blend_threshold"] == 0.3
    assert single("attribute_edit", "FateZero_DDIMInvert")["steps"] == 50
    assert single("attribute_edit", "FateZero_Sample")["cfg"] == 7.5


def test_controlnet_edit_conditions_the_target_prompt_on_canny_edges_of_the_frames():
    api = load_api("controlnet_edit")
    ids = {n["class_type"]: i for i, n in api.items()}
    apply = api[ids["ControlNetApplyAdvanced"]]["inputs"]
    settings = ids["FateZero_EditSettings"]
    assert apply["positive"] == [settings, 0]
    assert apply["control_net"] == [ids["ControlNetLoader"], 0]
    assert api[ids["ControlNetLoader"]]["inputs"]["control_net_name"] == "control_v11p_sd15_canny.safetensors"
    assert apply["image"] == [ids["Canny"], 0]
    assert api[ids["Canny"]]["inputs"]["image"] == [ids["FateZero_LoadVideoFrames"], 0]
    sample = api[ids["FateZero_Sample"]]["inputs"]
    assert sample["positive"] == [ids["ControlNetApplyAdvanced"], 0]
    assert sample["negative"] == [ids["ControlNetApplyAdvanced"], 1]
    invert = api[ids["FateZero_DDIMInvert"]]["inputs"]
    assert invert["source"] == [ids["FateZero_SourcePrompt"], 0]  # inversion stays unconditioned by the hint


def test_lora_edit_patches_the_model_for_inversion_and_edit():
    api = load_api("lora_edit")
    ids = {n["class_type"]: i for i, n in api.items()}
    lora = api[ids["LoraLoaderModelOnly"]]["inputs"]
    assert lora["model"] == [ids["CheckpointLoaderSimple"], 0]
    assert lora["lora_name"].endswith(".safetensors")
    assert api[ids["FateZero_DDIMInvert"]]["inputs"]["model"] == [ids["LoraLoaderModelOnly"], 0]
    assert api[ids["FateZero_Sample"]]["inputs"]["model"] == [ids["LoraLoaderModelOnly"], 0]


def test_long_clip_keeps_the_store_off_memory():
    loader = single("long_clip_recompute", "FateZero_LoadVideoFrames")
    assert loader["frame_load_cap"] >= 32
    invert = single("long_clip_recompute", "FateZero_DDIMInvert")
    assert invert["store_placement"] == "recompute" and invert["steps"] == 50
    ui = load_ui("long_clip_recompute")
    text = " ".join([n.get("title", "") for n in ui["nodes"]]
                    + [str(v) for n in ui["nodes"] if n["type"] in VIRTUAL_NODES for v in n["widgets_values"]])
    assert "disk" in text, "the long-clip example should say how to keep the store on disk instead"


def test_shape_edit_train_tunes_on_the_clip_then_inverts_and_edits_with_the_tuned_model():
    api = load_api("shape_edit_train")
    ids = {n["class_type"]: i for i, n in api.items()}
    train = api[ids["FateZero_TuneAVideoTrain"]]["inputs"]
    assert train["model"] == [ids["CheckpointLoaderSimple"], 0]
    assert train["latent"] == [ids["VAEEncode"], 0]
    assert api[ids["VAEEncode"]]["inputs"]["pixels"] == [ids["FateZero_LoadVideoFrames"], 0]
    assert train["source"] == [ids["FateZero_SourcePrompt"], 0]  # tuned on the source prompt
    assert (train["steps"], train["learning_rate"], train["lora_rank"]) == (200, 1e-5, 160)  # jeep_tuned_200
    assert (train["trainable"], train["precision"], train["gradient_checkpointing"]) == ("official", "auto", True)
    assert train["save_name"]
    for node in ("FateZero_DDIMInvert", "FateZero_Sample"):
        assert api[ids[node]]["inputs"]["model"] == [ids["FateZero_TuneAVideoTrain"], 0]
    assert api[ids["FateZero_DDIMInvert"]]["inputs"]["key_frames"] == "auto"
    assert "FateZero_TuneAVideoLoader" not in ids
    assert any(n["inputs"].get("images") == [ids["FateZero_TuneAVideoTrain"], 1]
               for n in api_nodes("shape_edit_train", "PreviewImage"))
    assert train["optimizer"] == "AdamW"  # runs everywhere; AdamW8bit (official) needs CUDA + bitsandbytes


def test_shape_edit_train_makes_its_class_images_with_the_same_model():
    """The official regularization: a KSampler batch of 'a photo of a car' (official
    class_data_prompt of config/tune/jeep.yaml) from the same checkpoint, its latents and prompt
    feeding the trainer's class inputs; enough images for the clip's frames."""
    api = load_api("shape_edit_train")
    ids = {n["class_type"]: i for i, n in api.items()}
    train = api[ids["FateZero_TuneAVideoTrain"]]["inputs"]
    sampler_id = train["class_latent"][0]
    sampler = api[sampler_id]
    assert sampler["class_type"] == "KSampler" and train["class_latent"] == [sampler_id, 0]
    assert sampler["inputs"]["model"] == [ids["CheckpointLoaderSimple"], 0]  # the base model, not the tuned one
    prompt = api[train["class_prompt"][0]]
    assert prompt["class_type"] == "CLIPTextEncode" and prompt["inputs"]["text"] == "a photo of a car"
    assert prompt["inputs"]["clip"] == [ids["CheckpointLoaderSimple"], 1]
    assert sampler["inputs"]["positive"] == train["class_prompt"]
    empty = api[sampler["inputs"]["latent_image"][0]]
    assert empty["class_type"] == "EmptyLatentImage"
    assert empty["inputs"]["batch_size"] >= api[ids["FateZero_LoadVideoFrames"]]["inputs"]["frame_load_cap"]
    assert (empty["inputs"]["width"], empty["inputs"]["height"]) == (512, 512)
    assert sampler["inputs"]["denoise"] == 1.0


def test_long_clip_windows_edits_every_frame_of_the_clip_in_context_windows():
    """Every frame, Context Windows (Manual) on the MODEL of both DDIM Invert and FateZero Sample
    (windows of 16 over the frames, dim 0), a store that holds no attention, per-frame norms (the
    windowed edit then equals the one-batch edit) and the clip's fps and sound kept."""
    name = "long_clip_windows"
    api = load_api(name)
    ids = {n["class_type"]: i for i, n in api.items()}
    loader = ids["FateZero_LoadVideoFrames"]
    assert api[loader]["inputs"]["frame_load_cap"] == 0
    windows = api[ids["ContextWindowsManual"]]["inputs"]
    assert windows["model"] == [ids["CheckpointLoaderSimple"], 0]
    assert (windows["context_length"], windows["context_overlap"], windows["context_schedule"],
            windows["fuse_method"], windows["dim"]) == (16, 4, "standard_static", "pyramid", 0)
    for node in ("FateZero_DDIMInvert", "FateZero_Sample"):
        assert api[ids[node]]["inputs"]["model"] == [ids["ContextWindowsManual"], 0], node
    invert = api[ids["FateZero_DDIMInvert"]]["inputs"]
    assert (invert["store_placement"], invert["group_norm"], invert["steps"]) == ("recompute", "frame", 50)
    create = api[ids["CreateVideo"]]["inputs"]
    assert create["audio"] == [loader, 3] and create["fps"] == [loader, 2]
    ui = load_ui(name)
    note = " ".join(str(v) for n in ui["nodes"] if n["type"] in VIRTUAL_NODES for v in n["widgets_values"])
    for said in (invert["key_frames"], "group_norm", "recompute", "context_length"):
        assert said in note, f"{name}: the note does not explain {said!r}"


@pytest.mark.parametrize("frames", [48, 240, 300])
def test_long_clip_windows_key_frames_are_shared_by_every_window(frames):
    """The shipped key rule's frames fit one key pass (at most a window's frames) for a 10 s shot
    at 24-30 fps, so every window attends to the same key frames (``fatezero_core/windows.py``)."""
    from fatezero_core.keyframes import parse_key_rule
    from fatezero_core.windows import shared_frames

    invert = single("long_clip_windows", "FateZero_DDIMInvert")
    length = single("long_clip_windows", "ContextWindowsManual")["context_length"]
    rule = parse_key_rule(invert["key_frames"])
    assert shared_frames(rule, frames, limit=length), f"{invert['key_frames']} on {frames} frames"


@pytest.mark.parametrize("name", NAMES)
def test_the_readme_names_every_workflow(name):
    assert f"`workflows/{name}.json`" in (REPO / "README.md").read_text(), f"README does not list {name}"
