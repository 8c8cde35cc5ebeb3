"""An attention store lives exactly as long as ComfyUI caches the DDIM Invert output holding it.

Runs on the headless server with ComfyUI's own (classic) execution cache: a ``disk`` store's folder
(in the server process's own folder beside ComfyUI's temp folder) is the visible trace of a live
store. It must survive a rerun that
reuses the cached inversion, go away when a changed inversion replaces the cached output, when the
user frees the node cache ("Free model and node cache", ``POST /free``) and when a graph without
that DDIM Invert node runs.
"""

import subprocess
import time

from host_server import execution_error

STORE_PREFIX = "fatezero_store_"


def graph(checkpoint: str, steps: int) -> dict:
    """Invert -> edit -> decode -> preview on an empty 3-frame latent (no clip file needed)."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "FateZero_AttentionBlendSettings", "inputs": {
            "clip": ["1", 1], "source_prompt": "a silver jeep on a road",
            "target_prompt": "a red car on a road", "blend_words": "jeep",
            "cross_replace_steps": 0.8, "self_replace_steps": 0.6, "blend_threshold": 0.3,
            "mode": "auto", "local_latent_blend": False, "soft_mask": False}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 3}},
        "4": {"class_type": "FateZero_DDIMInvert", "inputs": {
            "model": ["1", 0], "source": ["2", 0], "latent": ["3", 0], "steps": steps,
            "key_frames": "auto", "st_min_channels": -1, "store_placement": "disk",
            "store_dtype": "fp16", "layer_set": "relative", "schedule_end": "comfy"}},
        "5": {"class_type": "FateZero_Sample", "inputs": {
            "model": ["1", 0], "positive": ["2", 1], "negative": ["2", 0], "latent": ["4", 0],
            "attention_store": ["4", 1], "blend_settings": ["2", 2], "cfg": 2.0, "fusion": True}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    }


def graph_without_inversion(checkpoint: str) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["1", 2]}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    }


def store_folders(server) -> set[str]:
    """Names of the server's live ``disk`` store folders (``fatezero_stores/<host>-<pid>/``)."""
    found = set((server.base / "fatezero_stores").glob(f"*-{server.process.pid}/{STORE_PREFIX}*"))
    assert not list((server.base / "temp").glob(STORE_PREFIX + "*"))
    return {p.name for p in found}


def run_ok(server, prompt: dict) -> dict:
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", (execution_error(entry), server.log_tail())
    return entry


def wait_for(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.25)
    return condition()


def test_store_files_follow_comfyui_cache(comfy_server):
    run_ok(comfy_server, graph(comfy_server.checkpoint, steps=2))
    # A previous test's cached store (if any) was dropped when this graph replaced it.
    first = store_folders(comfy_server)
    assert len(first) == 1, first
    assert "FateZero: AttentionStore(disk, complete, 3 frames at 64x64 px, 2 steps" in comfy_server.log_tail(10**6)

    again = run_ok(comfy_server, graph(comfy_server.checkpoint, steps=2))
    cached = [data for kind, data in again["status"]["messages"] if kind == "execution_cached"][0]["nodes"]
    assert "4" in cached, "an unchanged inversion must come from ComfyUI's cache"
    assert store_folders(comfy_server) == first, "the cached store must keep its files"

    run_ok(comfy_server, graph(comfy_server.checkpoint, steps=3))
    second = store_folders(comfy_server)
    assert len(second) == 1 and second != first, (first, second)

    status, _ = comfy_server.post_json("/free", {"unload_models": True, "free_memory": True})
    assert status == 200
    assert wait_for(lambda: not store_folders(comfy_server)), store_folders(comfy_server)

    run_ok(comfy_server, graph(comfy_server.checkpoint, steps=2))
    assert len(store_folders(comfy_server)) == 1
    run_ok(comfy_server, graph_without_inversion(comfy_server.checkpoint))
    assert not store_folders(comfy_server), "a graph without the DDIM Invert node drops its store"


def test_a_second_comfyui_on_the_same_install_leaves_the_store_alone(comfy_server):
    """A second ComfyUI start on the same folders empties the temp folder (``main.py``
    ``cleanup_temp``); the first server's cached store keeps its files and the next edit runs."""
    prompt = graph(comfy_server.checkpoint, steps=2)
    run_ok(comfy_server, prompt)
    live = store_folders(comfy_server)
    assert len(live) == 1, live

    second = subprocess.run(
        [comfy_server.python, str(comfy_server.comfyui_path / "main.py"), "--cpu", "--quick-test-for-ci",
         "--base-directory", str(comfy_server.base), "--database-url", "sqlite:///:memory:"],
        cwd=comfy_server.comfyui_path, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert not (comfy_server.base / "temp").exists(), "the second start empties the temp folder"

    prompt["5"]["inputs"]["cfg"] = 3.0  # a new edit from the cached inversion
    entry = run_ok(comfy_server, prompt)
    cached = [data for kind, data in entry["status"]["messages"] if kind == "execution_cached"][0]["nodes"]
    assert "4" in cached and store_folders(comfy_server) == live
