"""FateZero Video Metrics, driven in-process with tiny random CLIP vision and text models built
from ComfyUI's own classes (``tiny_models``), on the synthetic clips of ``tests/test_metrics.py``."""

from __future__ import annotations

import json
import math

import pytest
import torch

from test_metrics import moving_video, noise_video

SOURCE = "a cat sitting on a wooden table"
TARGET = "a dog sitting on a wooden table"
METRICS = ("Tem-Con", "Frame-Acc", "CLIP-T", "warp error", "SSIM to source")


@pytest.fixture
def node(comfy_nodes):
    return comfy_nodes.nodes.metrics.FateZeroVideoMetrics


@pytest.fixture(scope="module")
def tiny_clip_vision(comfyui_path):
    import tiny_models

    return tiny_models.build_tiny_clip_vision()


@pytest.fixture
def clips():
    source = moving_video(frames=4)
    return source, (1.0 - source).clamp(0, 1)  # an "edit": another look, the source's motion


def run(node, edited, **kw):
    args = dict(source_frames=None, clip_vision=None, clip=None, source_prompt=SOURCE,
                target_prompt=TARGET, flow="dis", save_json=False, filename_prefix="fatezero/metrics")
    args.update(kw)
    return node.execute(edited_frames=edited, **args)


def rows(table: str) -> dict[str, list[str]]:
    """``metric -> [edit, source]`` cells of the node's table."""
    out = {}
    for line in table.splitlines():
        for name in METRICS:
            if line.startswith(name + "  "):
                out[name] = line[len(name):].split()[:2]
    return out


def test_schema(node):
    schema = node.GET_SCHEMA()
    assert schema.node_id == "FateZero_VideoMetrics"
    assert schema.display_name == "FateZero Video Metrics"
    assert schema.is_output_node  # a sink: ComfyUI runs it for its table and plot
    assert all(i.tooltip for i in schema.inputs)
    info = node.GET_NODE_INFO_V1()
    assert info["output"] == ["STRING", "IMAGE"]
    assert info["input"]["required"]["edited_frames"][0] == "IMAGE"
    optional = info["input"]["optional"]
    assert optional["clip_vision"][0] == "CLIP_VISION" and optional["clip"][0] == "CLIP"
    assert optional["source_frames"][0] == "IMAGE"


def test_registered_after_sample(comfy_nodes):
    ids = [cls.GET_SCHEMA().node_id for cls in comfy_nodes.nodes.node_classes()]
    assert ids.index("FateZero_VideoMetrics") == ids.index("FateZero_Sample") + 1


def test_node_runs_with_every_model_and_lists_every_metric(node, clips, tiny_clip_vision, tiny_clip,
                                                           host_inference_mode):
    source, edit = clips
    out = run(node, edit, source_frames=source, clip_vision=tiny_clip_vision, clip=tiny_clip)
    table, plot = out.args
    cells = rows(table)
    assert set(cells) == set(METRICS), table
    for name in METRICS:
        assert math.isfinite(float(cells[name][0])), (name, table)
    assert math.isfinite(float(cells["warp error"][1])) and math.isfinite(float(cells["Tem-Con"][1]))
    assert "note:" not in table
    assert plot.shape == (1, 448, 512, 3) and plot.dtype == torch.float32
    assert 0.0 <= float(plot.min()) and float(plot.max()) <= 1.0
    assert out.ui["text"] == (table,)
    assert len(out.ui["images"]) == 1 and out.ui["images"][0]["type"] == "temp"


def test_without_clip_models_the_clip_metrics_are_skipped_with_a_note(node, clips, host_inference_mode):
    source, edit = clips
    table, plot = run(node, edit, source_frames=source).args
    cells = rows(table)
    assert cells["Tem-Con"][0] == cells["Frame-Acc"][0] == cells["CLIP-T"][0] == "-"
    assert math.isfinite(float(cells["warp error"][0])) and math.isfinite(float(cells["SSIM to source"][0]))
    assert "CLIP metrics skipped: connect a CLIP Vision Loader" in table
    assert plot.shape == (1, 448, 512, 3)


def test_warp_error_needs_no_model_and_tells_noise_from_motion(node, host_inference_mode):
    moving, noise = moving_video(frames=4), noise_video(frames=4)
    steady = float(rows(run(node, moving).args[0])["warp error"][0])
    jumpy = float(rows(run(node, noise).args[0])["warp error"][0])
    assert jumpy > 20 * steady


def test_text_embedding_is_the_text_models_own_projection(nodes, tiny_clip, host_inference_mode):
    """Reference: ComfyUI's CLIP-L forward with its projection switched on (``projected_pooled``)."""
    projection = nodes.metrics.text_projection(tiny_clip, 768)
    ours = nodes.metrics.text_embedding(tiny_clip, projection, TARGET)
    inner = tiny_clip.cond_stage_model.clip_l
    inner.set_clip_options({"projected_pooled": True})
    try:
        _, reference = inner.encode_token_weights(tiny_clip.tokenize(TARGET)["l"])
    finally:
        inner.reset_clip_options()
    assert ours.shape == (768,)
    assert torch.allclose(ours, reference[0].float(), atol=1e-5, rtol=1e-4)
    unprojected = tiny_clip.encode_from_tokens(tiny_clip.tokenize(TARGET), return_pooled=True)[1]
    assert not torch.allclose(ours, unprojected[0].float(), atol=1e-3)  # SD1 CLIP: pooled is unprojected


def test_portrait_frames_use_their_bottom_square(nodes, tiny_clip_vision, host_inference_mode):
    frames = torch.rand(2, 448, 224, 3, generator=torch.Generator().manual_seed(0))
    ours = nodes.metrics.image_embeddings(tiny_clip_vision, frames)
    bottom = tiny_clip_vision.encode_image(frames[:, 224:], crop=True)["image_embeds"].float()
    top = tiny_clip_vision.encode_image(frames[:, :224], crop=True)["image_embeds"].float()
    assert torch.allclose(ours, bottom, atol=1e-5) and not torch.allclose(ours, top, atol=1e-3)


@pytest.mark.parametrize("unset", ["zeros", "nan"])
def test_a_clip_without_text_projection_is_refused(node, nodes, clips, tiny_clip_vision,
                                                   host_inference_mode, unset):
    """An SD1.x checkpoint has no weights for the text projection; ComfyUI leaves the layer unset
    (zeros after a checkpoint load in a fresh process, any values in general): both are refused."""
    import tiny_models

    clip = tiny_models.build_tiny_clip()  # its own weights: the shared fixture stays intact
    weight = clip.cond_stage_model.clip_l.transformer.text_projection.weight
    with torch.no_grad():
        weight.fill_(0.0 if unset == "zeros" else math.nan)
    source, edit = clips
    with pytest.raises(nodes.user_errors.FateZeroNodeError, match="no text projection") as info:
        run(node, edit, source_frames=source, clip_vision=tiny_clip_vision, clip=clip)
    assert "CLIP Loader" in str(info.value) and "SD1.x checkpoint" in str(info.value)
    assert info.value.__cause__ is None


def test_text_and_vision_of_different_widths_are_refused(node, nodes, clips, tiny_clip,
                                                         host_inference_mode):
    import tiny_models

    vision = tiny_models.build_tiny_clip_vision(projection_dim=512)
    with pytest.raises(nodes.user_errors.FateZeroNodeError,
                       match="768 wide but the CLIP vision model's are 512"):
        run(node, clips[1], clip_vision=vision, clip=tiny_clip)


def test_frame_count_mismatch_is_a_node_error(node, nodes, clips, host_inference_mode):
    source, edit = clips
    with pytest.raises(nodes.user_errors.FateZeroNodeError, match="4 frames but the source 3"):
        run(node, edit, source_frames=source[:3])


def test_json_file_in_the_output_folder(node, clips, tiny_clip_vision, tiny_clip, tmp_path,
                                        monkeypatch, host_inference_mode):
    import folder_paths

    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path))
    source, edit = clips
    table, _ = run(node, edit, source_frames=source, clip_vision=tiny_clip_vision, clip=tiny_clip,
                   save_json=True).args
    files = list((tmp_path / "fatezero").glob("metrics_*_.json"))
    assert len(files) == 1, files
    data = json.loads(files[0].read_text())
    cells = rows(table)
    assert f"{data['warp_error']:.4f}" == cells["warp error"][0]
    assert f"{data['frame_acc']:.4f}" == cells["Frame-Acc"][0]
    assert len(data["warp_error_per_pair"]) == 3 and len(data["clip_t_per_frame"]) == 4
    assert "saved fatezero/metrics_00001_.json" in table


def test_server_runs_the_node_as_the_graphs_output(comfy_server):
    """Queued through ``/prompt`` with no other output node: ComfyUI runs it as a sink, and the
    history carries its table (``text``), its plot preview and the JSON file it saved."""
    from video_writers import write_video

    write_video(comfy_server.input_dir / "fz_metrics.avi", moving_video(frames=4), 8.0)
    graph = {
        "1": {"class_type": "FateZero_LoadVideoFrames", "inputs": {
            "video": "fz_metrics.avi", "frame_load_cap": 4, "skip_first_frames": 0,
            "select_every_nth": 1, "size": 64, "resize_mode": "crop"}},
        "2": {"class_type": "FateZero_VideoMetrics", "inputs": {
            "edited_frames": ["1", 0], "source_frames": ["1", 0], "source_prompt": SOURCE,
            "target_prompt": TARGET, "flow": "farneback", "save_json": True,
            "filename_prefix": "fz_metrics/run"}},
    }
    entry = comfy_server.run(graph)
    assert entry["status"]["status_str"] == "success", comfy_server.log_tail()
    shown = entry["outputs"]["2"]
    table = shown["text"][0]
    assert set(rows(table)) == set(METRICS) and "CLIP metrics skipped" in table
    assert float(rows(table)["SSIM to source"][0]) == pytest.approx(1.0, abs=1e-4)  # source vs itself
    assert len(shown["images"]) == 1
    saved = list((comfy_server.output_dir / "fz_metrics").glob("run_*_.json"))
    assert len(saved) == 1 and json.loads(saved[0].read_text())["flow_method"] == "farneback"
