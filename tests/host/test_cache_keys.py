"""The loaders' ``fingerprint_inputs`` as ComfyUI's own cache sees it (``execution.IsChangedCache``
and ``comfy_execution/caching.py`` ``CacheKeySetInputSignature``, ComfyUI 0.3.64).

A loader that cannot read its file answers "always rerun" (NaN): two queued prompts must then get
cache keys that are different, so the node runs again and reports the problem instead of being
served from the cache.
"""

from __future__ import annotations

import asyncio
import importlib

import pytest


def cache_key(class_type: str, inputs: dict):
    """The output-cache key ComfyUI computes for a one-node prompt, as for a freshly queued one."""
    from comfy_execution.caching import CacheKeySetInputSignature
    from comfy_execution.graph import DynamicPrompt
    from execution import IsChangedCache

    async def compute():
        prompt = DynamicPrompt({"1": {"class_type": class_type, "inputs": dict(inputs)}})
        keys = CacheKeySetInputSignature(prompt, ["1"], IsChangedCache("prompt", prompt, None))
        await keys.add_keys(["1"])
        return keys.get_data_key("1")

    return asyncio.run(compute())


@pytest.fixture
def registered(comfy_nodes, monkeypatch):
    """Register node classes under their ids in ComfyUI's ``nodes.NODE_CLASS_MAPPINGS``, as
    ComfyUI's ``load_custom_node`` does for a V3 extension."""
    host_nodes = importlib.import_module("nodes")

    def register(node):
        node_id = node.GET_SCHEMA().node_id
        monkeypatch.setitem(host_nodes.NODE_CLASS_MAPPINGS, node_id, node)
        return node_id

    return register


def assert_never_served_from_cache(class_type: str, inputs: dict) -> None:
    first, second = cache_key(class_type, inputs), cache_key(class_type, inputs)
    assert first != second
    assert {first: "cached output"}.get(second) is None  # the lookup ComfyUI's cache does


def test_video_loader_with_a_missing_file_is_never_served_from_cache(registered, comfy_nodes, comfy_input_dir):
    node_id = registered(comfy_nodes.nodes.video.FateZeroLoadVideoFrames)
    inputs = dict(video="gone.mp4", frame_load_cap=8, skip_first_frames=0, select_every_nth=1, size=64,
                  resize_mode="crop", sequence_fps=8.0)
    assert_never_served_from_cache(node_id, inputs)


def test_video_loader_with_a_readable_file_is_served_from_cache(registered, comfy_nodes, comfy_input_dir):
    (comfy_input_dir / "clip.mp4").write_bytes(b"some bytes")  # the fingerprint hashes, never decodes
    node_id = registered(comfy_nodes.nodes.video.FateZeroLoadVideoFrames)
    inputs = dict(video="clip.mp4", frame_load_cap=8, skip_first_frames=0, select_every_nth=1, size=64,
                  resize_mode="crop", sequence_fps=8.0)
    assert cache_key(node_id, inputs) == cache_key(node_id, inputs)


def test_tune_a_video_loader_with_a_missing_checkpoint_is_never_served_from_cache(registered, comfy_nodes):
    node_id = registered(comfy_nodes.nodes.tav_loader.FateZeroTuneAVideoLoader)
    assert_never_served_from_cache(node_id, {"checkpoint": "no_such_tuned_unet.safetensors"})
