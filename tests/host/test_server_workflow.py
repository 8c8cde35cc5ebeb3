"""API-format graphs on the headless server: the pack's nodes with core nodes and the tiny checkpoint.

The clip is written by the test into the server's input folder; the checkpoint is the tiny SD1.5
one (``tiny_models.write_tiny_sd15_checkpoint``) loaded by core ``CheckpointLoaderSimple``.
"""

import cv2
import pytest
import torch

from video_writers import write_video
from host_server import execution_error

N_FRAMES, SIZE = 3, 64


def write_video_file(folder, name="fz_clip.avi", shade=0):
    frames = torch.zeros(6, 48, 80, 3)
    for k in range(6):
        frames[k] = (20 * k + 10 + shade) / 255.0
        frames[k, 10:26, 10 + 4 * k:26 + 4 * k] = torch.tensor([1.0, 0.0, 0.0])
    write_video(folder / name, frames, 8.0)
    return name


def graph(checkpoint, video, blend_words="jeep", prefix="fz_smoke"):
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "FateZero_LoadVideoFrames", "inputs": {
            "video": video, "frame_load_cap": N_FRAMES, "skip_first_frames": 1,
            "select_every_nth": 1, "size": SIZE, "resize_mode": "crop"}},
        "3": {"class_type": "FateZero_AttentionBlendSettings", "inputs": {
            "clip": ["1", 1], "source_prompt": "a silver jeep on a road",
            "target_prompt": "a red car on a road", "blend_words": blend_words,
            "cross_replace_steps": 0.8, "self_replace_steps": 0.6, "blend_threshold": 0.3,
            "mode": "auto", "local_latent_blend": False, "soft_mask": False}},
        "4": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 2]}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["3", 1], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": 0, "steps": 2, "cfg": 2.0, "sampler_name": "ddim", "scheduler": "ddim_uniform",
            "denoise": 0.5}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }


def messages(entry, name):
    return [data for kind, data in entry["status"]["messages"] if kind == name]


def test_workflow_with_tiny_checkpoint_runs(comfy_server):
    video = write_video_file(comfy_server.input_dir)
    entry = comfy_server.run(graph(comfy_server.checkpoint, video))
    assert entry["status"]["status_str"] == "success", (execution_error(entry), comfy_server.log_tail())
    images = entry["outputs"]["7"]["images"]
    assert len(images) == N_FRAMES
    for image in images:
        path = comfy_server.output_dir / image["subfolder"] / image["filename"]
        pixels = cv2.imread(str(path))
        assert pixels is not None and pixels.shape == (SIZE, SIZE, 3)
        assert pixels.std() > 0  # random weights, but not a blank image


def test_unchanged_video_is_cached_and_a_changed_one_reloads(comfy_server):
    video = write_video_file(comfy_server.input_dir, "fz_cache.avi")
    first = comfy_server.run(graph(comfy_server.checkpoint, video, prefix="fz_cache"))
    assert first["status"]["status_str"] == "success"
    again = comfy_server.run(graph(comfy_server.checkpoint, video, prefix="fz_cache"))
    cached = messages(again, "execution_cached")[0]["nodes"]
    assert "2" in cached and "3" in cached

    write_video_file(comfy_server.input_dir, "fz_cache.avi", shade=5)  # same name, new content
    changed = comfy_server.run(graph(comfy_server.checkpoint, video, prefix="fz_cache"))
    assert changed["status"]["status_str"] == "success"
    assert "2" not in messages(changed, "execution_cached")[0]["nodes"]


def test_missing_video_is_refused_at_validation(comfy_server):
    status, body = comfy_server.submit(graph(comfy_server.checkpoint, "no_such_clip.mp4"))
    assert status == 400
    errors = body["node_errors"]["2"]["errors"]
    assert any("no_such_clip.mp4" in e["details"] and "was not found" in e["details"] for e in errors)


def test_video_outside_input_folder_is_refused(comfy_server):
    status, body = comfy_server.submit(graph(comfy_server.checkpoint, "../models/checkpoints/x.avi"))
    assert status == 400
    details = " ".join(e["details"] for e in body["node_errors"]["2"]["errors"])
    assert "must be inside the input folder" in details


def test_bad_blend_word_fails_at_the_settings_node(comfy_server):
    video = write_video_file(comfy_server.input_dir, "fz_err.avi")
    entry = comfy_server.run(graph(comfy_server.checkpoint, video, blend_words="car", prefix="fz_err"))
    assert entry["status"]["status_str"] == "error"
    error = execution_error(entry)
    assert error["node_id"] == "3" and error["node_type"] == "FateZero_AttentionBlendSettings"
    assert "blend word 'car' is not in the prompt" in error["exception_message"]
    assert error["exception_type"].endswith("FateZeroNodeError")
    frames = "".join(error["traceback"])
    assert "fatezero_core" not in frames  # raised from the node, not from deep inside the core


def test_zero_frames_fail_at_the_loader(comfy_server):
    video = write_video_file(comfy_server.input_dir, "fz_zero.avi")
    prompt = graph(comfy_server.checkpoint, video, prefix="fz_zero")
    prompt["2"]["inputs"]["skip_first_frames"] = 100
    entry = comfy_server.run(prompt)
    error = execution_error(entry)
    assert error is not None and error["node_id"] == "2"
    assert "No frames left to load" in error["exception_message"]


def fatezero_graph(server, video, steps=3):
    """load -> encode -> invert -> sample -> decode -> save, with the pack's editing nodes."""
    prompt = graph(server.checkpoint, video, prefix="fz_edit")
    del prompt["5"], prompt["6"], prompt["7"]
    prompt.update({
        "5": {"class_type": "FateZero_DDIMInvert", "inputs": {
            "model": ["1", 0], "source": ["3", 0], "latent": ["4", 0], "steps": steps,
            "key_frames": "auto", "st_min_channels": -1, "store_placement": "cpu",
            "store_dtype": "fp32", "layer_set": "relative", "schedule_end": "comfy"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "7": {"class_type": "FateZero_Sample", "inputs": {
            "model": ["1", 0], "positive": ["3", 1], "negative": ["6", 0], "latent": ["5", 0],
            "attention_store": ["5", 1], "blend_settings": ["3", 2], "cfg": 2.0, "fusion": True}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "fz_edit"}},
    })
    return prompt


def test_fatezero_edit_end_to_end(comfy_server):
    info = comfy_server.object_info()
    if not {"FateZero_DDIMInvert", "FateZero_Sample"} <= set(info):
        pytest.skip("FateZero DDIM Invert / Sample are not in this checkout")
    video = write_video_file(comfy_server.input_dir, "fz_edit.avi")
    entry = comfy_server.run(fatezero_graph(comfy_server, video))
    assert entry["status"]["status_str"] == "success", (execution_error(entry), comfy_server.log_tail())
    images = entry["outputs"]["9"]["images"]
    assert len(images) == N_FRAMES
    for image in images:
        pixels = cv2.imread(str(comfy_server.output_dir / image["subfolder"] / image["filename"]))
        assert pixels is not None and pixels.shape == (SIZE, SIZE, 3)
