"""FateZero Video Metrics: the numbers of an edit (Tem-Con, Frame-Acc, CLIP-T, warp error, SSIM).

Thin adapter over ``fatezero_core.metrics``: this module asks ComfyUI's CLIP models for the
embeddings (image embeddings through ``ClipVisionModel.encode_image``, prompt embeddings through
``CLIP.encode_from_tokens`` and the text model's own projection), then lets the core measure, and
shows the table and the plot on the node (and saves a JSON file when asked).
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F

import comfy.clip_model
import folder_paths
from comfy_api.latest import io, ui

from ..fatezero_core.metrics import FLOW_METHODS, check_frames, clip_input, measure_video, plot_metrics
from .user_errors import FateZeroNodeError, reports_user_errors

CONNECT_TEXT_MODEL = (
    "Connect a full CLIP text model with CLIP Loader (type stable_diffusion), the text half of the "
    "same CLIP as the vision model: e.g. openai/clip-vit-large-patch14's model.safetensors, which "
    "CLIP Vision Loader and CLIP Loader can both read; or disconnect 'clip' to skip Frame-Acc and "
    "CLIP-T.")


def image_embeddings(clip_vision, frames: torch.Tensor) -> torch.Tensor:
    """``[F, D]`` CLIP image embeddings, frames prepared as the official script does."""
    size = int(getattr(clip_vision, "image_size", 224))
    pixels = clip_input(frames, size)  # ComfyUI then only normalises (the frames are size x size)
    return clip_vision.encode_image(pixels, crop=True)["image_embeds"].float()


def text_projection(clip, width: int) -> torch.Tensor:
    """The ``[D, d]`` projection of the CLIP's one text model into the image embedding space.

    ComfyUI's SD1.x CLIP (a checkpoint's, and CLIP Loader's ``stable_diffusion`` type) returns the
    pooled output *before* this projection, so the node applies it. A checkpoint has no weights for
    it: ComfyUI then leaves the layer unset (zeros in a fresh process), which is refused here.
    """
    models = [m for m in clip.cond_stage_model.modules() if isinstance(m, comfy.clip_model.CLIPTextModel)]
    if not models:
        raise FateZeroNodeError(
            f"The connected CLIP ({type(clip.cond_stage_model).__name__}) holds no CLIP text model. "
            + CONNECT_TEXT_MODEL)
    if len(models) > 1:
        raise FateZeroNodeError(
            f"The connected CLIP holds {len(models)} text models (as SDXL's does); the metrics need "
            "one. " + CONNECT_TEXT_MODEL)
    weight = models[0].text_projection.weight.detach()
    if not torch.isfinite(weight).all() or (weight == 0).float().mean() > 0.5:
        raise FateZeroNodeError(
            "The connected CLIP text model has no text projection (an SD1.x checkpoint's CLIP has "
            "none), so its prompt embeddings are not in the image embedding space. "
            + CONNECT_TEXT_MODEL)
    if weight.shape[0] != width:
        raise FateZeroNodeError(
            f"The CLIP text model's embeddings are {weight.shape[0]} wide but the CLIP vision "
            f"model's are {width}: connect the text and vision halves of the same CLIP (CLIP-L "
            "text with ViT-L/14 vision).")
    return weight


def text_embedding(clip, projection: torch.Tensor, text: str) -> torch.Tensor:
    """``[D]`` projected pooled embedding of ``text`` (the EOS token of the last layer)."""
    _, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled="unprojected")
    pooled = pooled.float().reshape(1, -1)
    return F.linear(pooled, projection.to(device=pooled.device, dtype=torch.float32))[0]


def clip_embeddings(edited, source, clip_vision, clip, source_prompt: str, target_prompt: str):
    """Embeddings for the core (``None`` where a model or prompt is missing) and notes on why."""
    out = dict(edit_embeds=None, source_embeds=None, source_text=None, target_text=None)
    notes = []
    if clip_vision is None:
        notes.append("CLIP metrics skipped: connect a CLIP Vision Loader to 'clip_vision' for "
                     "Tem-Con, and a CLIP text model and the prompts for Frame-Acc and CLIP-T.")
        return out, notes
    out["edit_embeds"] = image_embeddings(clip_vision, edited)
    if source is not None:
        out["source_embeds"] = image_embeddings(clip_vision, source)
    if clip is None:
        notes.append("Frame-Acc and CLIP-T skipped: connect a CLIP text model to 'clip'.")
        return out, notes
    projection = text_projection(clip, out["edit_embeds"].shape[-1])
    if target_prompt.strip():
        out["target_text"] = text_embedding(clip, projection, target_prompt)
    else:
        notes.append("CLIP-T and Frame-Acc skipped: type the target prompt.")
    if source_prompt.strip():
        out["source_text"] = text_embedding(clip, projection, source_prompt)
    elif target_prompt.strip():
        notes.append("Frame-Acc skipped: type the source prompt.")
    return out, notes


def write_json(data: dict, filename_prefix: str) -> str:
    """Write ``data`` to ComfyUI's output folder as ``<prefix>_<counter>_.json``; returns the path."""
    output = folder_paths.get_output_directory()
    folder, name, counter, _, _ = folder_paths.get_save_image_path(filename_prefix, output)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}_{counter:05}_.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
    return path


class FateZeroVideoMetrics(io.ComfyNode):
    """Temporal consistency, edit accuracy and structure numbers for an edited clip."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FateZero_VideoMetrics",
            display_name="FateZero Video Metrics",
            category="FateZero/video",
            description=(
                "Measures an edited clip: warp error (optical flow of the source frames, each "
                "frame against its warped predecessor; needs no model), the source's own warp "
                "error and SSIM to the source (with source_frames), Tem-Con (with a CLIP vision "
                "model), Frame-Acc and CLIP-T (with a CLIP text model of the same CLIP and the "
                "prompts), as in the FateZero paper. Shows a table and a per-frame plot; can "
                "save a JSON file to the output folder."),
            inputs=[
                io.Image.Input("edited_frames", tooltip="The edited clip (VAE Decode of FateZero Sample's latent), at least 2 frames."),
                io.Image.Input("source_frames", optional=True, tooltip="The source clip the edit was made from (the Load Video Frames output that was inverted): its optical flow is used, and its own warp error and SSIM to the edit are reported."),
                io.ClipVision.Input("clip_vision", optional=True, tooltip="A CLIP vision model (CLIP Vision Loader) for Tem-Con, Frame-Acc and CLIP-T; without it those are skipped."),
                io.Clip.Input("clip", optional=True, tooltip="The text half of the same CLIP (CLIP Loader, e.g. a full CLIP-L for ViT-L/14 vision) for Frame-Acc and CLIP-T. An SD1.x checkpoint's CLIP has no text projection and is refused."),
                io.String.Input("source_prompt", multiline=True, default="", tooltip="The source prompt (what the clip shows), for Frame-Acc."),
                io.String.Input("target_prompt", multiline=True, default="", tooltip="The target prompt (what the edit asks for), for Frame-Acc and CLIP-T."),
                io.Combo.Input("flow", options=list(FLOW_METHODS), default="dis", tooltip="OpenCV optical flow: dis (DIS, medium preset) or farneback."),
                io.Boolean.Input("save_json", default=False, tooltip="Also write every number and the per-frame values to a JSON file in ComfyUI's output folder."),
                io.String.Input("filename_prefix", default="fatezero/metrics", tooltip="JSON file name prefix inside the output folder (a counter is added)."),
            ],
            outputs=[
                io.String.Output(display_name="table", tooltip="The metrics as a text table, with notes on anything skipped."),
                io.Image.Output(display_name="plot", tooltip="Per-frame values: warp error, Tem-Con, CLIP-T / p(target), SSIM to source (one 512x448 image)."),
            ],
            is_output_node=True,
        )

    @classmethod
    @reports_user_errors
    def execute(cls, edited_frames, source_frames=None, clip_vision=None, clip=None,
                source_prompt="", target_prompt="", flow="dis", save_json=False,
                filename_prefix="fatezero/metrics") -> io.NodeOutput:
        check_frames(edited_frames, source_frames)  # before any CLIP work
        embeds, notes = clip_embeddings(edited_frames, source_frames, clip_vision, clip,
                                        source_prompt, target_prompt)
        metrics = measure_video(edited_frames, source_frames, flow_method=flow, notes=tuple(notes),
                                **embeds)
        if save_json:
            path = write_json(metrics.as_dict(), filename_prefix)
            metrics.notes.append(f"saved {os.path.relpath(path, folder_paths.get_output_directory())} "
                                 "in the output folder")
        table, plot = metrics.table(), plot_metrics(metrics)
        shown = {**ui.PreviewImage(plot, cls=cls).as_dict(), "text": (table,)}
        return io.NodeOutput(table, plot, ui=shown)
