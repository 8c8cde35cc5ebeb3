"""Edit quality: warp error (and the CLIP metrics) of fused editing vs plain DDIM vs the source.

Run with ComfyUI's python::

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfyui-venv/bin/python benchmarks/edit_quality.py

One clip, one inversion, two edits from it, measured with the FateZero Video Metrics node's own
code (``nodes/metrics.py`` for the CLIP embeddings, ``fatezero_core.metrics`` for the numbers):

- ``source``: the source frames measured against themselves: the warp error floor, SSIM 1;
- ``source shuffled``: the same frames in a shuffled order (no two neighbours stay neighbours),
  flow from that order: what temporally incoherent frames score;
- ``fused``: FateZero DDIM Invert (``cpu`` store) then FateZero Sample with fusion (blend word
  ``cat``, official windows cross 0.8 / self 0.6, cfg 7.5), VAE-decoded;
- ``plain DDIM``: FateZero Sample with ``fusion`` off (DDIM from the same inverted latent).

Without weights (the default): a synthetic clip (a panning pattern of sinusoids with a disc
crossing it, 8 frames), the tiny SD1.5-topology UNet, TAESD-layout VAE and CLIP text model of
``tiny_models/`` and its tiny CLIP vision model, all random. That shows the pipeline
runs and the metrics tell coherent from shuffled frames; it says nothing about edit quality
(a random VAE does not even reconstruct its input). ``--checkpoint`` (an SD1.5 checkpoint) with
``--clip-vision`` / ``--clip-text`` (e.g. openai/clip-vit-large-patch14 for both) and ``--video``
measure real edits, and add the target ``fused < plain``. Results go to
``benchmarks/results/edit_quality.json``.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import _calls
import _host
import _report
import _script
import tiny_models

VARIANTS = ("source", "source shuffled", "fused", "plain DDIM")
COLUMNS = (("warp error", "warp_error"), ("Tem-Con", "tem_con"), ("Frame-Acc", "frame_acc"),
           ("CLIP-T", "clip_t"), ("SSIM to source", "ssim"))


def synthetic_video(frames: int, size: int, seed: int = tiny_models.SEED):
    """``[F, size, size, 3]`` in 0..1: seeded sinusoids panning by (2, 1) px per frame and a
    bright disc crossing the frame by ``size / (2 F)`` px per frame."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32),
                            torch.arange(size, dtype=torch.float32), indexing="ij")
    waves = [(torch.rand(2, generator=g) * 2 - 1) * 2 * math.pi / 24 for _ in range(9)]
    phases = torch.rand(9, generator=g) * 2 * math.pi
    out = []
    for k in range(frames):
        x, y = xs + 2 * k, ys + k
        channels = [0.5 + sum(0.15 * torch.sin(w[0] * x + w[1] * y + p)
                              for w, p in zip(waves[3 * c:3 * c + 3], phases[3 * c:3 * c + 3]))
                    for c in range(3)]
        frame = torch.stack(channels, -1)
        cx, cy = size * (0.25 + 0.5 * k / max(frames - 1, 1)), size * 0.5
        disc = ((xs - cx) ** 2 + (ys - cy) ** 2 <= (size / 6) ** 2).unsqueeze(-1)
        frame = torch.where(disc, torch.tensor([0.95, 0.85, 0.3]), frame)
        out.append(frame.clamp(0, 1))
    return torch.stack(out)


def shuffled_order(frames: int, seed: int = tiny_models.SEED) -> list[int]:
    """A seeded order of ``range(frames)`` in which no two original neighbours are adjacent."""
    import torch

    g = torch.Generator().manual_seed(seed)
    for _ in range(10_000):
        order = torch.randperm(frames, generator=g).tolist()
        if all(abs(a - b) != 1 for a, b in zip(order, order[1:])):
            return order
    raise RuntimeError(f"no shuffled order of {frames} frames without neighbours")


def load_models(args):
    """``(model, clip, vae, clip_vision, metrics_clip, description)``: real files where given,
    otherwise the tiny random models of ``tiny_models/``."""
    import comfy.clip_vision
    import comfy.sd

    if args.checkpoint:
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(args.checkpoint)
        what = f"checkpoint {Path(args.checkpoint).name}"
    else:
        model, clip, vae = tiny_models.build_tiny_sd15(), tiny_models.build_tiny_clip(), tiny_models.build_tiny_vae()
        what = "tiny random SD1.5-topology UNet, TAESD-layout VAE and CLIP (tiny_models/)"
    if args.clip_vision:
        clip_vision = comfy.clip_vision.load(args.clip_vision)
        what += f"; CLIP vision {Path(args.clip_vision).name}"
    else:
        clip_vision = tiny_models.build_tiny_clip_vision()
        what += "; tiny random CLIP vision"
    if args.clip_text:
        metrics_clip = comfy.sd.load_clip([args.clip_text], clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)
        what += f", CLIP text {Path(args.clip_text).name}"
    else:
        metrics_clip = clip if not args.checkpoint else None  # a checkpoint's CLIP has no projection
        what += ", the tiny CLIP's text model" if metrics_clip is not None else ", no CLIP text model"
    return model, clip, vae, clip_vision, metrics_clip, what


def main() -> int:
    parser = _script.Arguments(__doc__, steps=(10, 50))
    parser.add_argument("--cfg", type=float, default=7.5)
    parser.add_argument("--flow", choices=("dis", "farneback"), default="dis")
    parser.add_argument("--checkpoint", help="an SD1.5 checkpoint file (real weights)")
    parser.add_argument("--clip-vision", help="a CLIP vision file for CLIP Vision Loader")
    parser.add_argument("--clip-text", help="a full CLIP text model file for CLIP Loader")
    parser.add_argument("--video", help="a video or image folder to edit instead of the synthetic clip")
    parser.add_argument("--source-prompt", default=_calls.SOURCE)
    parser.add_argument("--target-prompt", default=_calls.TARGET)
    parser.add_argument("--blend-words", default="cat")
    _script.add_host_arguments(parser)
    args = parser.parse_args()
    t_script = time.perf_counter()
    nodes, (_, size, steps) = _script.start_in_process(parser, args, f"cfg {args.cfg}")
    import torch

    from comfyui_fatezero.fatezero_core.metrics import measure_video
    from comfyui_fatezero.fatezero_core.video_loading import load_frames

    model, clip, vae, clip_vision, metrics_clip, models_used = load_models(args)
    print(f"models: {models_used}", flush=True)
    if args.video:
        source_frames, _ = load_frames(args.video, frame_load_cap=args.frames, size=size)
        clip_name = Path(args.video).name
    else:
        source_frames = synthetic_video(args.frames, size)
        clip_name = "synthetic: panning sinusoids (2, 1) px/frame and a crossing disc"
    order = shuffled_order(source_frames.shape[0])

    frames: dict = {}
    with torch.inference_mode():
        positive_source, target, spec = _calls.blend_settings(
            nodes, clip, blend_words=args.blend_words, source_prompt=args.source_prompt,
            target_prompt=args.target_prompt)
        negative = _calls.empty_conditioning(clip)
        latent = vae.encode(source_frames)
        inverted, store = _calls.invert(nodes, model, positive_source, latent, steps, "cpu")
        for name, fusion in (("fused", True), ("plain DDIM", False)):
            out, _ = _calls.fatezero_sample(nodes, model, target, negative, inverted, store, spec,
                                           args.cfg, fusion=fusion)
            frames[name] = vae.decode(out["samples"]).float().clamp(0, 1)
        store.release()
        print(f"edits done after {time.perf_counter() - t_script:.0f} s", flush=True)

        frames["source"] = source_frames
        frames["source shuffled"] = source_frames[order]
        references = {"source": source_frames, "source shuffled": source_frames[order],
                      "fused": source_frames, "plain DDIM": source_frames}
        results = {}
        for name in VARIANTS:
            embeds, notes = nodes.metrics.clip_embeddings(
                frames[name], None, clip_vision, metrics_clip, args.source_prompt, args.target_prompt)
            results[name] = measure_video(frames[name], references[name], flow_method=args.flow,
                                          notes=tuple(notes), **embeds).as_dict()

    def cell(value):
        return "-" if value is None else f"{value:.4f}"

    print(f"\nEdit quality, {clip_name}; flow {args.flow} on the reference frames")
    print(_report.table(("variant", *(c for c, _ in COLUMNS), "kept px"),
                      [(name, *(cell(results[name][k]) for _, k in COLUMNS),
                        f"{100 * results[name]['kept_pixels']:.1f}%") for name in VARIANTS]))
    print("warp error: mean |frame - warped previous frame| over kept pixels (0..1; lower = steadier); "
          "flow of the source frames (of the shuffled order for 'source shuffled').")
    real = bool(args.checkpoint)
    if not real:
        print("random weights: fused vs plain says nothing about the method (the random VAE does "
              "not reconstruct its input); it shows that both edits run and are measured.")

    checks = [("source_warp_error_below_shuffled", results["source"]["warp_error"],
               results["source shuffled"]["warp_error"], "below")]
    if results["source"]["tem_con"] is not None:
        checks.append(("source_tem_con_above_shuffled", results["source"]["tem_con"],
                       results["source shuffled"]["tem_con"], "above"))
    if real:
        checks.append(("fused_warp_error_below_plain", results["fused"]["warp_error"],
                       results["plain DDIM"]["warp_error"], "below"))
    lines, targets = [], {}
    for name, value, other, direction in checks:
        ok = value < other if direction == "below" else value > other
        targets[name] = dict(measured=value, compared_with=other, goal=direction, ok=ok)
        lines.append(f"target {name}: {value:.4f} vs {other:.4f} (goal: {direction}) "
                     f"{'ok' if ok else 'MISS'}")
    fused, plain = results["fused"]["warp_error"], results["plain DDIM"]["warp_error"]
    report = f"fused vs plain DDIM warp error: {fused:.4f} vs {plain:.4f} (ratio {fused / plain:.3f})"

    _script.finish("edit_quality.json", dict(
        setting=dict(size=size, frames=int(source_frames.shape[0]), steps=steps, cfg=args.cfg,
                     flow=args.flow, clip=clip_name, shuffled_order=order, models=models_used,
                     real_weights=real, source_prompt=args.source_prompt,
                     target_prompt=args.target_prompt, blend_words=args.blend_words,
                     windows="cross 0.8, self 0.6", store="cpu"),
        machine=_host.machine(), results=results, targets=targets, fused_vs_plain=report),
        args, t_script, lines, notes=[report])
    return 0


if __name__ == "__main__":
    sys.exit(main())
