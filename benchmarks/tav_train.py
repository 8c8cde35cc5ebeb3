"""Seconds per step and peak memory of FateZero Tune-A-Video Train.

Run with ComfyUI's python::

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfyui-venv/bin/python benchmarks/tav_train.py

Model: a UNet of SD1.5 shape (model_channels 320, 8 heads, context 768, ~860 M parameters) with
seeded random weights, built under ``torch.inference_mode`` as a checkpoint loader builds it; fp32
on the CPU, fp16 weights on a GPU. The node runs in-process as ComfyUI's executor runs it (under
``torch.inference_mode``) with the official trainable set (every to_q, temporal attention,
temporal-conv LoRA rank 160), lr 1e-5, precision ``auto`` (fp32 on the CPU, bf16/fp16 on a GPU).
Each setting (gradient checkpointing on / off; on, with class images) is a fresh subprocess, so
peaks never mix. ``class-images`` adds the official regularization: ``2 x frames`` class latents of
the clip's size and a class prompt, so each iteration runs the class step (as many still images as
frames) before the clip step; its cost is that run against ``checkpointing``:

- ``s/step``: median wall time of the steps after the first (the first loads the model and
  builds the optimizer state);
- ``peak RSS`` / ``peak - base``: peak resident memory of the process while training, and that
  peak minus the resident memory just before (model built);
- ``CUDA peak``: ``torch.cuda.max_memory_allocated`` while training (GPU only).

Defaults: 8 frames, 128x128 px (16x16 latent) and 3 steps on the CPU; 512x512 px and 6 steps on a
GPU, where the goal is <= 12 GB of VRAM for 8 frames at 512 px (the official script is reported
at ~20 GB with xformers). Results go to ``benchmarks/results/tav_train.json``.
"""

from __future__ import annotations

import time
from pathlib import Path

import _calls
import _host
import _probes
import _report
import _script
import tiny_models

RUNS = ("checkpointing", "no-checkpointing", "class-images")
# The class step is a second forward/backward on as many still images as the clip has frames,
# without the temporal layers: an iteration with it should cost at most about two without it, and
# its activations are freed before the clip step, so the peak should barely grow.
CLASS_TIME_GOAL = 2.2
CLASS_MEMORY_GOAL = 1.15
VRAM_GOAL_GB = 12.0  # 8 frames at 512 px on a consumer card
# Gradient checkpointing must pay for itself on any device: training memory (peak - base) with it,
# as a fraction of the memory without it.
CHECKPOINTING_GOAL = 0.6


def child(args) -> dict:
    nodes = _host.setup(threads=args.threads, host_attention=args.host_attention)
    import importlib

    import torch

    train = importlib.import_module(f"{_host.PACK_MODULE}.nodes.tav_train")
    start = time.perf_counter()
    with torch.inference_mode():  # as Load Checkpoint builds it in the executor
        model = tiny_models.build_sd15()
        clip = tiny_models.build_tiny_clip()
        source, _, _ = _calls.blend_settings(nodes, clip)
        latent = _calls.moving_latent(args.frames, args.size // 8)
        classes = {}
        if args.run == "class-images":
            class_prompt, _, _ = _calls.blend_settings(nodes, clip)
            classes = dict(class_latent={"samples": _calls.moving_latent(2 * args.frames, args.size // 8, seed=1)},
                           class_prompt=class_prompt)
    build_s = time.perf_counter() - start
    parameters = tiny_models.unet_parameter_count(model)  # before: the loaded tuned model also counts its temporal layers
    stamps: list[float] = []
    losses: list[float] = []
    original = train.progress_reporter

    def timed(steps, node_id, *args):
        report = original(steps, node_id, *args)

        def wrapped(step, values):
            _probes.sync()
            stamps.append(time.perf_counter())
            losses.append(values[-1])
            report(step, values)
        return wrapped

    train.progress_reporter = timed
    _probes.trim_heap()
    base = _probes.rss_bytes()
    reset_ok = _probes.reset_peak()
    start = time.perf_counter()
    with torch.inference_mode():
        out = train.FateZeroTuneAVideoTrain.execute(
            model=model, latent={"samples": latent}, source=source, steps=args.steps, learning_rate=1e-5,
            seed=74831, gradient_checkpointing=args.run != "no-checkpointing", precision="auto",
            trainable="official", lora_rank=160, save_name="", **classes)
    _probes.sync()
    seconds = time.perf_counter() - start
    peak = _probes.peak_rss_bytes()
    per_step = [b - a for a, b in zip(stamps, stamps[1:])]
    trained = out.args[0]
    runtime = trained.get_wrappers("diffusion_model", "fatezero_clip")[0]
    temporal = sum(p.numel() for m in runtime.modules for p in m.parameters())
    return dict(run=args.run, frames=args.frames, size=args.size, steps=args.steps,
                rss_base=base, peak_rss=peak, peak_over_base=peak - base, peak_reset=reset_ok,
                cuda_peak=_probes.cuda_peak_bytes(), seconds=seconds, build_seconds=build_s,
                first_step_seconds=stamps[0] - start if stamps else None,
                seconds_per_step=_report.median(per_step) if per_step else None,
                losses=losses, finite=all(map(lambda v: v == v, losses)),
                parameters=parameters, temporal_parameters=temporal,
                precision=str(train.training_dtype("auto", model.load_device)), machine=_host.machine())


def main() -> int:
    measured = _script.measure_each_run(
        _script.Arguments(__doc__, steps=(3, 6), steps_help="training steps"), RUNS, "checkpointing",
        child, Path(__file__).resolve(), lambda r: print(
            f"  {r['run']}: {r['seconds']:.0f} s, {r['seconds_per_step']:.2f} s/step, peak RSS "
            f"{_report.mb(r['peak_rss'])}", flush=True))
    if measured is None:
        return 0
    args, (gpu, size, steps), results, t0 = measured
    m = results[0]["machine"]
    print(f"\nFateZero Tune-A-Video Train: SD1.5-shape UNet ({results[0]['parameters'] / 1e6:.0f} M "
          f"parameters + {results[0]['temporal_parameters'] / 1e6:.0f} M temporal, random weights, "
          f"compute {results[0]['precision']}), {size}x{size} px, {args.frames} frames, {steps} steps, "
          f"official trainable set. Ran {_host.where_it_ran(m, gpu)}; each run in a fresh process.")
    rows = [(r["run"], f"{r['seconds_per_step']:.2f}", f"{r['first_step_seconds']:.1f}", _report.mb(r["rss_base"]),
             _report.mb(r["peak_rss"]), _report.mb(r["peak_over_base"]),
             "-" if r["cuda_peak"] is None else _report.mb(r["cuda_peak"])) for r in results]
    print(_report.table(("run", "s/iteration", "first iteration s", "base RSS", "peak RSS",
                       "peak - base", "CUDA peak"), rows))
    lines, targets = [], {}
    by_run = {r["run"]: r for r in results}
    if gpu and "checkpointing" in by_run and size == 512 and args.frames == 8:
        gb = by_run["checkpointing"]["cuda_peak"] / 2**30
        line, ok = _report.target_line("train_cuda_peak_gb_8_frames_512px", gb, VRAM_GOAL_GB, "{:.2f}")
        lines.append(line)
        targets["train_cuda_peak_gb_8_frames_512px"] = dict(measured=gb, goal=VRAM_GOAL_GB, ok=ok)
    elif not gpu:
        lines.append(f"target train_cuda_peak_gb_8_frames_512px: not measured (no GPU; goal <= {VRAM_GOAL_GB})")
    if {"checkpointing", "no-checkpointing"} <= by_run.keys():
        key = "cuda_peak" if gpu else "peak_over_base"
        ratio = by_run["checkpointing"][key] / by_run["no-checkpointing"][key]
        line, ok = _report.target_line("checkpointing_memory_vs_off", ratio, CHECKPOINTING_GOAL)
        lines.append(line)
        targets["checkpointing_memory_vs_off"] = dict(measured=ratio, goal=CHECKPOINTING_GOAL, ok=ok, memory=key)
        slow = by_run["checkpointing"]["seconds_per_step"] / by_run["no-checkpointing"]["seconds_per_step"]
        print(f"gradient checkpointing: {ratio:.2f}x the training memory, {slow:.2f}x the time per step")
    if {"checkpointing", "class-images"} <= by_run.keys():
        key = "cuda_peak" if gpu else "peak_over_base"
        plain, regularized = by_run["checkpointing"], by_run["class-images"]
        time_ratio = regularized["seconds_per_step"] / plain["seconds_per_step"]
        memory_ratio = regularized[key] / plain[key]
        print(f"class images (class step before each clip step): {regularized['seconds_per_step']:.2f} s/iteration "
              f"vs {plain['seconds_per_step']:.2f} s ({time_ratio:.2f}x); training memory {_report.mb(regularized[key])} "
              f"vs {_report.mb(plain[key])} ({memory_ratio:.2f}x, {key})")
        for name, value, goal in (("class_step_time_per_iteration_vs_without", time_ratio, CLASS_TIME_GOAL),
                                  ("class_step_memory_vs_without", memory_ratio, CLASS_MEMORY_GOAL)):
            line, ok = _report.target_line(name, value, goal)
            lines.append(line)
            targets[name] = dict(measured=value, goal=goal, ok=ok)
    _script.finish("tav_train.json", dict(
        setting=dict(size=size, frames=args.frames, steps=steps, model="SD1.5 shape, random weights",
                     trainable="official", lora_rank=160, reduced_resolution=not gpu),
        machine=m, results=results, targets=targets), args, t0, lines)
    return 0 if all(r["finite"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
