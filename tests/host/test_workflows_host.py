"""The shipped workflows against a live ComfyUI: schema snapshot and end-to-end runs.

- ``/object_info`` of the server, normalised as ``tests/test_workflows.py`` does, must equal
  ``tests/data/object_info.json`` for every node the workflows use and every FateZero node. Run
  with ``FATEZERO_UPDATE_OBJECT_INFO=1`` to rewrite the snapshot from the server instead.
- Every API workflow is queued with only the files and sizes swapped for tiny ones (the tiny SD1.5
  checkpoint, a clip written here, 2-3 frames at 64 px, 2 DDIM steps; a tiny LoRA and a tiny
  ControlNet for the tiny checkpoint's UNet) and must finish with ``success``; its video and mask
  previews must be on disk. Prompts, blend words and every other setting are the shipped ones.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import re
import uuid
from pathlib import Path

import pytest
import torch

from video_writers import write_video
from host_server import execution_error
from test_workflows import (
    FILE_INPUTS,
    OBJECT_INFO,
    PACK_PREFIX,
    VIRTUAL_NODES,
    load_api,
    load_snapshot,
    load_ui,
    normalize_node,
    workflow_names,
)

UPDATE_ENV = "FATEZERO_UPDATE_OBJECT_INFO"
FRAMES, SIZE, STEPS = 2, 64, 2
LORA_NAME = "fatezero_tiny_lora.safetensors"
CONTROLNET_NAME = "fatezero_tiny_controlnet.pth"
LORA_RANK = 4


# ------------------------------------------------------------------------------------------------
# Snapshot
# ------------------------------------------------------------------------------------------------


def used_node_types() -> set[str]:
    used = set()
    for name in workflow_names():
        used |= {n["type"] for n in load_ui(name)["nodes"] if n["type"] not in VIRTUAL_NODES}
        used |= {n["class_type"] for n in load_api(name).values()}
    return used


def build_snapshot(object_info: dict, comfyui_version: str, names=None) -> dict:
    """The snapshot file's content for ``names`` (default: used types and every FateZero node)."""
    if names is None:
        names = used_node_types() | {n for n in object_info if n.startswith(PACK_PREFIX)}
    missing = sorted(n for n in names if n not in object_info)
    if missing:
        raise KeyError(f"the server does not know {missing}")
    return {
        "comfyui_version": comfyui_version,
        "nodes": {n: normalize_node(n, object_info[n]) for n in sorted(names)},
    }


def write_snapshot(snapshot: dict, path: Path = OBJECT_INFO) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(snapshot, indent=1, ensure_ascii=False) + "\n")


def comfyui_version(server) -> str:
    return server.get_json("/system_stats")["system"]["comfyui_version"]


@pytest.fixture(scope="module")
def live_object_info(comfy_server) -> dict:
    return comfy_server.object_info()


def test_object_info_snapshot_matches_the_live_server(comfy_server, live_object_info):
    fresh = build_snapshot(live_object_info, comfyui_version(comfy_server))
    if os.environ.get(UPDATE_ENV):
        write_snapshot(fresh)
        return
    stored = load_snapshot()
    hint = f"the node schemas changed; rerun this test with {UPDATE_ENV}=1 to rewrite {OBJECT_INFO}"
    assert stored["comfyui_version"] == fresh["comfyui_version"], hint
    assert sorted(stored["nodes"]) == sorted(fresh["nodes"]), hint
    for name, spec in fresh["nodes"].items():
        if stored["nodes"][name] != spec:
            diff = "\n".join(difflib.unified_diff(
                json.dumps(stored["nodes"][name], indent=1).splitlines(),
                json.dumps(spec, indent=1).splitlines(), "snapshot", "server", lineterm=""))
            pytest.fail(f"{name}: {hint}\n{diff}")


def test_every_non_file_combo_has_fixed_options(live_object_info):
    """A combo listing files must be in FILE_INPUTS, or the snapshot would record this machine's files."""
    snapshot = load_snapshot()["nodes"]
    for name, spec in snapshot.items():
        for inp in spec["inputs"]:
            if inp["type"] == "COMBO" and "options" in inp:
                assert not any(re.search(r"\.(safetensors|ckpt|pth?|bin|mp4|avi|webm|mov|gif|png)$", o)
                               for o in inp["options"]), f"{name}.{inp['name']} lists files"


# ------------------------------------------------------------------------------------------------
# Tiny models and clip
# ------------------------------------------------------------------------------------------------


def write_video_file(folder: Path, name: str, frames: int = 6) -> str:
    data = torch.zeros(frames, 48, 80, 3)
    for k in range(frames):
        data[k] = (30 * k + 20) / 255.0
        data[k, 12:30, 8 + 5 * k:26 + 5 * k] = torch.tensor([0.9, 0.8, 0.1])
    write_video(folder / name, data, 8.0)
    return name


TINY_LORA_LAYERS = (
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_v",
    "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_out_0",
)


def write_tiny_lora(path: Path, layers=TINY_LORA_LAYERS) -> list[str]:
    """A kohya-style LoRA (``lora_unet_<diffusers name>``) for a few attention projections of 320
    channels (every level of the tiny checkpoint's UNet; the first level of SD1.5's). Returns the
    LoRA's layer names."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(7)
    in_dims = {"attn2_to_k": 768}
    tensors = {}
    for layer in layers:
        in_dim = next((d for suffix, d in in_dims.items() if layer.endswith(suffix)), 320)
        tensors[f"{layer}.lora_down.weight"] = torch.randn(LORA_RANK, in_dim, generator=generator) * 0.01
        tensors[f"{layer}.lora_up.weight"] = torch.randn(320, LORA_RANK, generator=generator) * 0.01
        tensors[f"{layer}.alpha"] = torch.tensor(float(LORA_RANK))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return list(layers)


def write_tiny_controlnet(path: Path, channel_mult=None) -> None:
    """An SD1.5 ControlNet (``control_model.*`` keys) shaped for the tiny checkpoint's UNet.

    ControlNetLoader detects its UNet config from the keys as it does for real SD1.5 ControlNets;
    its zero-conv outputs must match the tiny UNet's channels (320 on every level), so it is built
    from the same config (``channel_mult``: that of another checkpoint written by ``tiny_models``).
    Weights are seeded strided views of a few buffers (a few MB on disk).
    """
    import comfy.cldm.cldm
    import tiny_models

    channel_mult = tiny_models.CHECKPOINT_CHANNEL_MULT if channel_mult is None else channel_mult
    config = tiny_models.sd15_unet_config(320, channel_mult=list(channel_mult))
    for key in ("out_channels", "use_temporal_attention", "use_temporal_resblock"):
        config.pop(key, None)
    with torch.device("meta"):
        net = comfy.cldm.cldm.ControlNet(hint_channels=3, dtype=torch.float32, device="meta", **config)
    storage = tiny_models.SharedStorage(seed=11)
    state = {f"control_model.{k}": storage.tensor(k, v.shape) for k, v in sorted(net.state_dict().items())}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, str(path))


@pytest.fixture(scope="module")
def tiny_lora(comfy_server) -> str:
    write_tiny_lora(comfy_server.base / "models" / "loras" / LORA_NAME)
    return LORA_NAME


@pytest.fixture(scope="module")
def tiny_controlnet(comfy_server) -> str:
    write_tiny_controlnet(comfy_server.base / "models" / "controlnet" / CONTROLNET_NAME)
    return CONTROLNET_NAME


# ------------------------------------------------------------------------------------------------
# Running the shipped API workflows
# ------------------------------------------------------------------------------------------------


def shrink(api: dict, server, video: str, prefix: str, frames: int = FRAMES, files: dict | None = None) -> dict:
    """``api`` with the model/clip files, the sizes and step counts swapped for tiny ones; nothing
    else changes."""
    files = files or {}
    prompt = copy.deepcopy(api)
    for node in prompt.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = server.checkpoint
        elif kind == "FateZero_LoadVideoFrames":
            inputs.update(video=video, frame_load_cap=frames, size=SIZE, skip_first_frames=0,
                          select_every_nth=1)
        elif kind == "FateZero_DDIMInvert":
            inputs["steps"] = STEPS
        elif kind == "FateZero_TuneAVideoTrain":
            inputs.update(steps=STEPS, save_name=f"{prefix}/tuned")
        elif kind == "EmptyLatentImage":  # the class images: still more than the clip's frames
            inputs.update(width=SIZE, height=SIZE, batch_size=frames + 1)
        elif kind == "KSampler":
            inputs["steps"] = STEPS
        elif kind == "LoraLoaderModelOnly":
            inputs["lora_name"] = files["lora"]
        elif kind == "ControlNetLoader":
            inputs["control_net_name"] = files["controlnet"]
        elif kind in ("SaveVideo", "SaveImage"):
            inputs["filename_prefix"] = f"{prefix}/{node['class_type']}"
    return prompt


def run_shipped(server, name: str, frames: int = FRAMES, files: dict | None = None) -> tuple[dict, dict]:
    api = load_api(name)
    video = write_video_file(server.input_dir, f"wf_{name}.avi")
    prompt = shrink(api, server, video, prefix=f"wf_{name}_{uuid.uuid4().hex[:6]}", frames=frames, files=files)
    entry = server.run(prompt, timeout=900)
    assert entry["status"]["status_str"] == "success", (name, execution_error(entry), server.log_tail())
    return prompt, entry


def check_outputs(server, prompt: dict, entry: dict, frames: int) -> None:
    for node_id, node in prompt.items():
        if node["class_type"] == "SaveVideo":
            saved = entry["outputs"][node_id]["images"]
            assert len(saved) == 1
            path = server.output_dir / saved[0]["subfolder"] / saved[0]["filename"]
            assert path.suffix == ".mp4" and path.stat().st_size > 0
            import av

            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                decoded = [f for f in container.decode(stream)]
            assert len(decoded) == frames and (stream.width, stream.height) == (SIZE, SIZE)
        elif node["class_type"] == "PreviewImage":
            previews = entry["outputs"][node_id]["images"]
            assert len(previews) == frames
            assert all(p["type"] == "temp" for p in previews)


@pytest.mark.parametrize("name", ["style_watercolor", "attribute_edit"])
def test_shipped_workflow_runs_end_to_end(comfy_server, name):
    prompt, entry = run_shipped(comfy_server, name)
    check_outputs(comfy_server, prompt, entry, FRAMES)


def test_a_workflow_saved_before_group_norm_still_runs(comfy_server):
    """API workflows saved before DDIM Invert had ``group_norm`` lack it: they still validate and
    run, with the default (clip-level norms)."""
    api = load_api("style_watercolor")
    for node in api.values():
        if node["class_type"] == "FateZero_DDIMInvert":
            del node["inputs"]["group_norm"]
    video = write_video_file(comfy_server.input_dir, "wf_old_invert.avi")
    prompt = shrink(api, comfy_server, video, prefix=f"wf_old_{uuid.uuid4().hex[:6]}")
    entry = comfy_server.run(prompt, timeout=900)
    assert entry["status"]["status_str"] == "success", (execution_error(entry), comfy_server.log_tail())
    check_outputs(comfy_server, prompt, entry, FRAMES)


def test_long_clip_workflow_runs_end_to_end_with_recompute(comfy_server):
    assert load_api("long_clip_recompute")
    prompt, entry = run_shipped(comfy_server, "long_clip_recompute", frames=3)
    assert any(n["class_type"] == "FateZero_DDIMInvert" and n["inputs"]["store_placement"] == "recompute"
               for n in prompt.values())
    check_outputs(comfy_server, prompt, entry, 3)


WINDOWED_FRAMES, WINDOWED_FPS, WINDOWED_RATE = 48, 8.0, 32000  # 32 kHz: every frame's tone under Nyquist


def test_long_clip_windows_workflow_edits_every_frame_in_windows_of_16(comfy_server):
    """The shipped whole-shot workflow on a 48-frame clip with sound: Context Windows (Manual) as
    shipped (windows of 16, overlap 4), every frame loaded (``frame_load_cap`` 0 as shipped), the
    ``recompute`` store. ComfyUI runs every model evaluation of the inversion and the edit in
    windows, each window shares the anchors, and the saved video has every frame and the clip's
    sound under them."""
    import sound_videos

    clip = "wf_long_clip_windows.mp4"
    sound_videos.write_video_with_tone(comfy_server.input_dir / clip, frames=WINDOWED_FRAMES, fps=WINDOWED_FPS,
                                     size=(80, 48), video_codec="mpeg4", audio_codec="aac", channels=1,
                                     sample_rate=WINDOWED_RATE)
    api = load_api("long_clip_windows")
    prompt = shrink(api, comfy_server, clip, prefix=f"wf_windows_{uuid.uuid4().hex[:6]}", frames=0)
    windows = next(n for n in prompt.values() if n["class_type"] == "ContextWindowsManual")["inputs"]
    assert (windows["context_length"], windows["context_overlap"]) == (16, 4)  # as shipped
    invert = next(n for n in prompt.values() if n["class_type"] == "FateZero_DDIMInvert")["inputs"]
    assert invert["store_placement"] == "recompute"
    start = len(comfy_server.log_tail(10_000_000))
    entry = comfy_server.run(prompt, timeout=900)
    assert entry["status"]["status_str"] == "success", (execution_error(entry), comfy_server.log_tail())
    check_outputs(comfy_server, prompt, entry, WINDOWED_FRAMES)

    log = comfy_server.log_tail(10_000_000)[start:]
    # ComfyUI logs this once per model evaluation it splits into windows (IndexListContextHandler
    # .should_use_context): every inversion step and every edit step.
    assert log.count(f"Using context windows 16 for {WINDOWED_FRAMES} frames.") >= 2 * STEPS, log[-3000:]
    assert "FateZero: AttentionStore(recompute, complete" in log, log[-3000:]
    assert "no earlier window computed" not in log, log[-3000:]  # every window shared every anchor

    save = next(i for i, n in prompt.items() if n["class_type"] == "SaveVideo")
    item = entry["outputs"][save]["images"][0]
    duration, samples, rate = sound_videos.saved_audio(comfy_server.output_dir / item["subfolder"] / item["filename"])
    assert duration == pytest.approx(WINDOWED_FRAMES / WINDOWED_FPS, abs=1e-3)
    per_frame = round(rate / WINDOWED_FPS)
    for k in (0, 17, 40):  # in the first window, in two windows, in the last
        part = samples[k * per_frame + per_frame // 8:(k + 1) * per_frame - per_frame // 8]
        assert sound_videos.dominant_frequency(part, rate) == pytest.approx(sound_videos.tone(k), abs=20)


def test_lora_workflow_runs_end_to_end(comfy_server, tiny_lora):
    start = len(comfy_server.log_tail(10_000_000))
    prompt, entry = run_shipped(comfy_server, "lora_edit", files={"lora": tiny_lora})
    check_outputs(comfy_server, prompt, entry, FRAMES)
    log = comfy_server.log_tail(10_000_000)[start:]
    assert "lora key not loaded" not in log, log[-3000:]


def test_controlnet_workflow_runs_end_to_end(comfy_server, tiny_controlnet):
    prompt, entry = run_shipped(comfy_server, "controlnet_edit", files={"controlnet": tiny_controlnet})
    check_outputs(comfy_server, prompt, entry, FRAMES)
    canny = next(i for i, n in prompt.items() if n["class_type"] == "Canny")
    hint_previews = [i for i, n in prompt.items()
                     if n["class_type"] == "PreviewImage" and n["inputs"]["images"] == [canny, 0]]
    assert all(len(entry["outputs"][i]["images"]) == FRAMES for i in hint_previews)


def sd15_shape_checkpoint(server) -> str:
    """A checkpoint of the real SD1.5 UNet shape (random weights) in the server's checkpoints, by
    name: the trainer and the Tune-A-Video Loader need the SD1.x topology."""
    import tiny_models

    name = "fatezero_sd15_shape.ckpt"
    path = server.base / "models" / "checkpoints" / name
    if not path.exists():
        tiny_models.write_tiny_sd15_checkpoint(path, channel_mult=tiny_models.SD15_CHANNEL_MULT)
    return name


def test_shape_edit_train_workflow_trains_saves_and_edits(comfy_server):
    """Load -> encode -> train (with class images made by a KSampler of the same checkpoint) ->
    invert -> sample -> decode -> save, with 2 training steps, on a checkpoint of the real SD1.5
    UNet shape (the trainer, like the Tune-A-Video Loader, needs the SD1.x topology; random
    weights, a few MB on disk); the tuned UNet lands in models/tuneavideo, the loss curve is
    previewed and shows the class steps too."""
    base_name = sd15_shape_checkpoint(comfy_server)
    video = write_video_file(comfy_server.input_dir, "wf_shape_edit_train.avi")
    prompt = shrink(load_api("shape_edit_train"), comfy_server, video, prefix=f"wf_train_{uuid.uuid4().hex[:6]}")
    next(n for n in prompt.values() if n["class_type"] == "CheckpointLoaderSimple")["inputs"]["ckpt_name"] = base_name
    entry = comfy_server.run(prompt, timeout=900)
    assert entry["status"]["status_str"] == "success", (execution_error(entry), comfy_server.log_tail())
    check_outputs(comfy_server, {k: n for k, n in prompt.items() if n["_meta"]["title"] != "Training loss"},
                  entry, FRAMES)
    train = next(n for n in prompt.values() if n["class_type"] == "FateZero_TuneAVideoTrain")["inputs"]
    saved = comfy_server.base / "models" / "tuneavideo" / f"{train['save_name']}.safetensors"
    assert saved.is_file() and saved.stat().st_size > 0
    loss_id = next(i for i, n in prompt.items() if n["_meta"]["title"] == "Training loss")
    assert len(entry["outputs"][loss_id]["images"]) == 1
    assert train["class_latent"] and train["class_prompt"]
    from safetensors import safe_open
    with safe_open(str(saved), "pt") as f:
        assert f.metadata()["class_images"] == str(FRAMES + 1)


@pytest.mark.parametrize("name", workflow_names())
def test_every_shipped_workflow_passes_server_validation(comfy_server, name):
    """Queued as shipped (real model and clip names, absent here): the server refuses it only for
    the missing files, so every other value passes its validation."""
    api = load_api(name)
    status, body = comfy_server.submit(api)
    assert status == 400, f"{name}: expected the missing files to be refused, got {status}: {body}"
    assert body["node_errors"], body
    refused = set()
    for node_id, errors in body["node_errors"].items():
        kind = api[node_id]["class_type"]
        for error in errors["errors"]:
            input_name = error.get("extra_info", {}).get("input_name")
            assert input_name in FILE_INPUTS.get(kind, {}), (
                f"{name}: node {node_id} ({kind}) refused for something other than a missing file: {error}")
            assert error["type"] in ("value_not_in_list", "custom_validation_failed"), error
            refused.add(kind)
    assert "FateZero_LoadVideoFrames" in refused  # the clip is not in this server's input folder


# ------------------------------------------------------------------------------------------------
# The real frontend reads the UI workflows as this repo's tests do
# ------------------------------------------------------------------------------------------------

def _slots(node: dict) -> list:
    return [(i["name"], i["type"], i.get("link"), i.get("widget")) for i in node.get("inputs", [])]


SAVED_WORKFLOWS = Path(__file__).resolve().parent.parent / "data" / "saved_workflows"


def load_pair(name: str) -> tuple[dict, dict]:
    """A shipped workflow and its API twin, or (``saved/<name>``) one saved with older nodes."""
    if name.startswith("saved/"):
        stem = name.split("/", 1)[1]
        return (json.loads((SAVED_WORKFLOWS / f"{stem}.json").read_text()),
                json.loads((SAVED_WORKFLOWS / "api" / f"{stem}.json").read_text()))
    return load_ui(name), load_api(name)


@pytest.mark.parametrize("name", workflow_names() + ["saved/style_watercolor"])
def test_frontend_loads_the_ui_workflow_and_exports_its_api_twin(browser, name):
    """ComfyUI's own frontend loads ``workflows/<name>.json``, saves it back unchanged (widget
    values, sockets, links) and exports exactly ``workflows/api/<name>.json`` for ``/prompt``;
    the same for a workflow saved with the deprecated FateZero Attention Blend Settings (which also
    predates the segment sockets and outputs: they come back unconnected, and its export is
    unchanged)."""
    ui, api = load_pair(name)
    result = json.loads(browser.evaluate(f"""(async () => {{
        await window.app.loadGraphData({json.dumps(ui)}, true, true, {json.dumps(name)});
        const p = await window.app.graphToPrompt();
        return JSON.stringify({{output: p.output, workflow: p.workflow}});
    }})()"""))
    if name.startswith("saved/"):  # titles follow today's display names ("... (deprecated)")
        strip = lambda graph: {i: {k: v for k, v in n.items() if k != "_meta"} for i, n in graph.items()}  # noqa: E731
        assert strip(result["output"]) == strip(api)
    else:
        assert result["output"] == api
    saved = {n["id"]: n for n in result["workflow"]["nodes"]}
    assert sorted(saved) == sorted(n["id"] for n in ui["nodes"])
    for node in ui["nodes"]:
        again = saved[node["id"]]
        assert again["type"] == node["type"]
        assert again.get("widgets_values", []) == node["widgets_values"], f"{name}: node {node['id']}"
        if name.startswith("saved/"):  # sockets added since it was saved come back unconnected, after its own
            added = _slots(again)[len(_slots(node)):]
            assert _slots(again)[:len(_slots(node))] == _slots(node), f"{name}: node {node['id']} inputs"
            assert all(link is None and widget is None for _, _, link, widget in added), added
        else:
            assert _slots(again) == _slots(node), f"{name}: node {node['id']} inputs"
        outputs = [(o["name"], o["type"], o.get("links") or []) for o in again.get("outputs", [])]
        if name.startswith("saved/"):  # outputs added since come back unlinked, after its own
            assert all(not links for _, _, links in outputs[len(node["outputs"]):]), outputs
            outputs = outputs[:len(node["outputs"])]
        assert outputs == [(o["name"], o["type"], o.get("links") or []) for o in node["outputs"]], (
            f"{name}: node {node['id']} outputs")
    assert result["workflow"]["links"] == ui["links"]


# ------------------------------------------------------------------------------------------------
# The clip's sound, through the shipped workflow
# ------------------------------------------------------------------------------------------------

TONED_FRAMES, TONED_FPS = 12, 8.0
SKIP, NTH, CAP = 2, 2, 3  # source frames 2, 4, 6 at 4 fps: the sound of source frames 2..7


def toned_prompt(server, name: str) -> dict:
    import sound_videos

    clip = f"{name}.mp4"
    sound_videos.write_video_with_tone(server.input_dir / clip, frames=TONED_FRAMES, fps=TONED_FPS, size=(80, 48),
                                     video_codec="mpeg4", audio_codec="aac", channels=1)
    prompt = shrink(load_api("style_watercolor"), server, clip, prefix=f"{name}_{uuid.uuid4().hex[:6]}")
    loader = next(n for n in prompt.values() if n["class_type"] == "FateZero_LoadVideoFrames")
    loader["inputs"].update(skip_first_frames=SKIP, select_every_nth=NTH, frame_load_cap=CAP)
    return prompt


def check_saved_sound(server, prompt: dict, entry: dict) -> None:
    """One saved video of CAP frames whose audio stream lasts CAP / (fps / NTH) s and starts with
    the tone of source frame SKIP."""
    import sound_videos

    check_outputs(server, prompt, entry, CAP)
    save = next(i for i, n in prompt.items() if n["class_type"] == "SaveVideo")
    item = entry["outputs"][save]["images"][0]
    duration, samples, rate = sound_videos.saved_audio(server.output_dir / item["subfolder"] / item["filename"])
    assert duration == pytest.approx(CAP / (TONED_FPS / NTH), abs=1e-3)
    per_frame = round(rate / TONED_FPS)
    for j in (0, 3):
        part = samples[j * per_frame + per_frame // 8:(j + 1) * per_frame - per_frame // 8]
        assert sound_videos.dominant_frequency(part, rate) == pytest.approx(sound_videos.tone(SKIP + j), abs=20)


def test_shipped_workflow_keeps_the_sound_of_the_selected_frames(comfy_server):
    prompt = toned_prompt(comfy_server, "wf_toned")
    create = next(n for n in prompt.values() if n["class_type"] == "CreateVideo")
    assert create["inputs"]["audio"][1] == 3  # the loader's audio output, as shipped
    entry = comfy_server.run(prompt, timeout=900)
    assert entry["status"]["status_str"] == "success", (execution_error(entry), comfy_server.log_tail())
    check_saved_sound(comfy_server, prompt, entry)


def test_core_load_video_feeds_the_edit(comfy_server):
    """Core Load Video -> the loader's source_video; the loader's own file widget names no file,
    and the server accepts it because the VIDEO is read instead."""
    prompt = toned_prompt(comfy_server, "wf_core_video")
    loader = next(n for n in prompt.values() if n["class_type"] == "FateZero_LoadVideoFrames")
    prompt["90"] = {"class_type": "LoadVideo", "inputs": {"file": loader["inputs"]["video"]}}
    loader["inputs"].update(video="not_in_the_input_folder.mp4", source_video=["90", 0])
    entry = comfy_server.run(prompt, timeout=900)
    assert entry["status"]["status_str"] == "success", (execution_error(entry), comfy_server.log_tail())
    check_saved_sound(comfy_server, prompt, entry)
