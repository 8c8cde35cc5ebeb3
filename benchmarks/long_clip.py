"""Long clips in context windows: time and memory of FateZero DDIM Invert + FateZero Sample vs frames.

Run with ComfyUI's python (one torch thread on a shared CPU)::

    OMP_NUM_THREADS=1 COMFYUI_PATH=/path/to/ComfyUI /path/to/comfyui-venv/bin/python benchmarks/long_clip.py

The MODEL goes through core ``Context Windows (Manual)`` (``comfy_extras/nodes_context_windows.py``,
``ContextWindowsManualNode.execute``: windows of 16 frames, overlap 0, ``standard_static``, pyramid
fusion, dim 0), then ``FateZero DDIM Invert`` (``recompute`` store, ``group_norm=frame``, key frames
``mid``) and ``FateZero Sample`` (cfg 7.5, blend word "cat"), called in-process as ComfyUI's executor
calls them (``tests/host/test_context_windows.py`` drives them the same way). Every window attends to
the clip's shared key frames (the key pass, ``nodes/context_windows.py`` ``install_window_passes``)
and, with ``recompute``, regenerates only its own source attention
(``nodes/samplers.py`` ``FateZeroGuider.regenerate_source_frames``), so nothing but the clip's
latents should grow with the frames. Overlap 0 makes the frames the UNet runs exactly proportional
to the clip's (with overlap 4 the windows run 1.25-1.5x the frames, depending on how they tile).

CPU (default): the tiny SD1.5-topology UNet of ``tiny_models`` (``build_tiny_sd15``, model_channels
32, fp32, seeded random weights) with every self-attention layer spatio-temporal
(``st_min_channels`` 0), 128x128 px, 4 steps, frames 16, 32, 64, 128, 256. Each frame count runs in
two fresh processes (peaks never mix): one with glibc's default allocator for the times and the
peak a ComfyUI process shows, one with its mmap threshold fixed (:func:`run_at`), whose peak RSS
follows the memory in use (``live``) for the memory targets. Per frame count it reports:

- wall and process CPU seconds of the two nodes, and per step (intervals between per-step callbacks,
  ``benchmarks/_probes.py`` ``StepTimer``);
- ``peak - base``: peak resident memory (``VmHWM`` after a ``clear_refs`` reset) above the memory
  with the model built, over both nodes; ``sampling``: the same up to the mask preview
  (:class:`PreviewProbe`); ``held after invert``: resident memory the inversion's outputs keep
  (after ``malloc_trim``);
- ``data``: the bytes of what the run itself holds for the clip: the input latent, the inverted
  latent, the store's latents (``AttentionStore.latent_nbytes``: z_0..z_N, fp32) and attention
  (``recompute``: none between steps), the edited latent and the mask preview (an image per frame,
  ``fatezero_core/edit_maps.py`` ``preview_image``).

Targets: the time exponent (least-squares slope of log time against log frames) <= 1.1, and the
last doubling's; the live peak's growth per added frame (least-squares slope against frames), up
to the mask preview and with it, no more than the clip's data per frame plus ``WORKING_COPIES``
latent-sized copies per frame: the full-clip tensors ComfyUI's sampling holds while it runs (noise,
the latent image, ``x``, ``denoised``, the per-cond outputs and sums of ``comfy/context_windows.py``
``IndexListContextHandler.execute``, the CFG combination, the source latent of a ``recompute``
step). The time targets use wall time, or process CPU seconds when other processes oversubscribe
the CPU (``--metric auto``; the script says which).

With a GPU (CUDA): the SD1.5-shape UNet (``build_sd15``, fp16, official ``st_min_channels``), 240
frames at 512x512 px, 10 steps, one process: the CUDA peak (goal <= 8 GB) and seconds per step of
both nodes, with the GPU's name. Results go to ``benchmarks/results/long_clip.json``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import _calls
import _host
import _probes
import _report
import _script
import tiny_models

CPU_FRAMES = "16,32,64,128,256"
GPU_FRAMES = "240"
TIME_GOAL = 1.1
VRAM_GOAL_GB = 8.0
# Full-clip latent-sized tensors ComfyUI's sampling holds next to the run's own data while a step
# runs (see the module docstring); the margin of the memory target.
WORKING_COPIES = 16
CFG = 7.5
MMAP_VARIABLE = "MALLOC_MMAP_THRESHOLD_"
# bytes: every tensor of 64 KiB or more (the clip's latents, a window's activations) is mapped on
# its own and unmapped when freed.
MMAP_THRESHOLD = 65536


def windowed(model, length: int, overlap: int, schedule: str):
    """``model`` with core context windows, as the ``Context Windows (Manual)`` node returns it."""
    from comfy_extras.nodes_context_windows import ContextWindowsManualNode

    out = ContextWindowsManualNode.execute(model, context_length=length, context_overlap=overlap,
                                           context_schedule=schedule, context_stride=1,
                                           closed_loop=False, fuse_method="pyramid", dim=0)
    return out.args[0] if hasattr(out, "args") else out[0]


class PreviewProbe:
    """The edit's peak resident memory up to the mask preview: FateZero Sample builds the preview
    (``fatezero_core/edit_maps.py`` ``preview_image``, an image per frame at pixel size) after the
    sampling loop, so the peak read when it is called is the sampling's own."""

    def __init__(self, nodes):
        self.module = nodes.sample
        self.peak = None

    def __enter__(self):
        original = self._original = self.module.preview_image

        def preview_image(*args, **kwargs):
            self.peak = _probes.peak_rss_bytes()
            return original(*args, **kwargs)

        self.module.preview_image = preview_image
        return self

    def __exit__(self, *exc):
        self.module.preview_image = self._original
        return False


def child(args) -> dict:
    args.frames = int(args.frames)
    nodes = _host.setup(threads=args.threads, host_attention=args.host_attention)
    import torch

    gpu = _host.on_gpu()
    if gpu:
        model, st_min = tiny_models.build_sd15(), -1
    else:
        model, st_min = tiny_models.build_tiny_sd15(), 0
    clip = tiny_models.build_tiny_clip()
    source, target, spec = _calls.blend_settings(nodes, clip, blend_words="cat")
    negative = _calls.empty_conditioning(clip)
    model = windowed(model, args.context_length, args.context_overlap, args.context_schedule)
    latent = _calls.moving_latent(args.frames, args.size // 8)
    if gpu:  # the weights first, so the CUDA peak is the whole card's need at this setting
        import comfy.model_management

        comfy.model_management.load_models_gpu([model])
    result = dict(frames=args.frames, size=args.size, steps=args.steps, key_frames=args.key_frames,
                  placement=args.placement, group_norm=args.group_norm,
                  parameters=tiny_models.unet_parameter_count(model), machine=_host.machine())
    _probes.trim_heap()
    base = _probes.rss_bytes()
    _probes.reset_peak()
    try:
        with torch.inference_mode():
            with _probes.StepTimer() as inv:
                inverted, store = _calls.invert(
                    nodes, model, source, latent, args.steps, args.placement, key_frames=args.key_frames,
                    st_min_channels=st_min, group_norm=args.group_norm)
            peak_invert = _probes.peak_rss_bytes()
            _probes.trim_heap()
            held_invert = _probes.rss_bytes() - base
            # A reset here starts the edit's peak at what the inversion left; the run's peak is the
            # larger of the two.
            _probes.reset_peak()
            with _probes.StepTimer() as edit, PreviewProbe(nodes) as before_preview:
                out, preview = _calls.fatezero_sample(nodes, model, target, negative, inverted, store,
                                                      spec, CFG)
            peak_edit = _probes.peak_rss_bytes()
    except Exception as exc:  # a frame count that fails is reported, the others still measured
        return dict(result, error=f"{type(exc).__name__}: {exc}")
    data = dict(input_latent=latent.nbytes, inverted_latent=inverted["samples"].nbytes,
                store_latents=store.latent_nbytes, store_attention=store.nbytes - store.latent_nbytes,
                edited_latent=out["samples"].nbytes, mask_preview=preview.nbytes)
    result.update(
        invert_wall=inv.wall, edit_wall=edit.wall, invert_cpu=inv.cpu, edit_cpu=edit.cpu,
        invert_per_step=inv.per_step, edit_per_step=edit.per_step,
        invert_cpu_per_step=inv.cpu_per_step, edit_cpu_per_step=edit.cpu_per_step,
        rss_base=base, peak_invert_over_base=peak_invert - base, peak_edit_over_base=peak_edit - base,
        peak_over_base=max(peak_invert, peak_edit) - base, held_after_invert=held_invert,
        # No preview call (a node that stopped returning one): the edit's whole peak stands in.
        peak_sampling_over_base=max(peak_invert, before_preview.peak or peak_edit) - base,
        data=data, data_bytes=sum(data.values()), latent_frame_bytes=latent[0].nbytes,
        cuda_peak=_probes.cuda_peak_bytes(),
        cuda_reserved_peak=int(torch.cuda.max_memory_reserved()) if torch.cuda.is_available() else None,
        finite=bool(torch.isfinite(out["samples"]).all()),
        # Frames whose mask preview shows something: an all-black preview means no fused mask layer
        # ran at the first edit step, and a preview that costs one buffer instead of its build.
        mask_preview_frames_shown=int(preview.flatten(1).any(1).sum()))
    store.release()
    return result


def slope(xs, ys) -> float:
    """Least-squares slope of y against x (bytes per added frame)."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)


def run_at(script: Path, child_args: list[str], live: bool) -> dict:
    """One child run; ``live``: with glibc's mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_``), so
    every tensor above it is mapped on allocation and unmapped when freed and the peak RSS follows
    the memory in use. With glibc's default (a threshold that rises with the freed blocks), the
    peak of one frame count varied by 5-10 MB between runs here, as much as 256 frames of latents
    add at 128 px; the fixed threshold costs time (more page faults), so the times come from a run
    with the default."""
    saved = os.environ.get(MMAP_VARIABLE)
    if live:
        os.environ[MMAP_VARIABLE] = str(MMAP_THRESHOLD)
    try:
        return _script.run_child(script, child_args, timeout=3600)
    finally:
        if live:
            os.environ.pop(MMAP_VARIABLE)
            if saved is not None:
                os.environ[MMAP_VARIABLE] = saved


def main() -> int:
    parser = _script.Arguments(__doc__, sizes=(128, 512), steps=(4, 10), frames="auto")
    parser.add_argument("--key-frames", default="mid", help="key frames of DDIM Invert (e.g. mid, anchors/16)")
    parser.add_argument("--placement", default="recompute", help="store placement of DDIM Invert")
    parser.add_argument("--group-norm", default="frame", choices=("frame", "clip"))
    parser.add_argument("--context-length", type=int, default=16)
    parser.add_argument("--context-overlap", type=int, default=0)
    parser.add_argument("--context-schedule", default="standard_static")
    _script.add_host_arguments(parser, metric_for="the time exponent")
    args = _script.parent_or_child(parser, child)
    if args is None:
        return 0
    gpu, size, steps = parser.setting(args)
    frames = [int(f) for f in (args.frames if args.frames != "auto" else GPU_FRAMES if gpu else CPU_FRAMES).split(",")]
    metric, metric_why = _host.choose_metric(args.metric)
    shared = _host.oversubscribed()
    script = Path(__file__).resolve()
    t0 = time.perf_counter()
    results = []
    for f in frames:
        child_args = ["--frames", str(f), "--size", str(size), "--steps", str(steps),
                      "--key-frames", args.key_frames, "--placement", args.placement,
                      "--group-norm", args.group_norm, "--context-length", str(args.context_length),
                      "--context-overlap", str(args.context_overlap),
                      "--context-schedule", args.context_schedule] + _script.host_child_args(args)
        r = run_at(script, child_args, live=False)
        if "error" not in r and not gpu:  # on a GPU the CUDA peak is the memory that matters
            r["live"] = run_at(script, child_args, live=True)
        results.append(r)
        if "error" in r:
            print(f"  {f} frames: FAILED ({r['error']})", flush=True)
        else:
            live = r.get("live", {}).get("peak_over_base")
            print(f"  {f} frames: invert + edit {r['invert_wall'] + r['edit_wall']:.1f} s wall, "
                  f"{r['invert_cpu'] + r['edit_cpu']:.1f} s CPU, peak - base {_report.mb(r['peak_over_base'])}"
                  + (f" (live {_report.mb(live)})" if live is not None else "")
                  + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    ok_runs = [r for r in results if "error" not in r]
    failed = [r for r in results if "error" in r]
    m = (ok_runs or results)[0]["machine"]
    where = _host.where_it_ran(m, gpu)
    print(f"\nFateZero DDIM Invert + FateZero Sample in context windows ({args.context_length} frames, "
          f"overlap {args.context_overlap}, {args.context_schedule}): {args.placement} store, key frames "
          f"'{args.key_frames}', group_norm={args.group_norm}, cfg {CFG}, "
          f"{'SD1.5-shape' if gpu else 'tiny SD1.5-topology'} UNet "
          f"({(ok_runs or results)[0]['parameters'] / 1e6:.1f} M parameters, {'fp16' if gpu else 'fp32'}, "
          f"random weights), {size}x{size} px, {steps} steps. Ran {where}"
          f"{'; the CPU was shared with other processes' if shared and not gpu else ''}; "
          "each frame count in a fresh process.")

    def live(r, key):
        return r["live"][key] if "live" in r else None

    rows = [(r["frames"], f"{r['invert_wall']:.1f}", f"{r['edit_wall']:.1f}",
             f"{r['invert_cpu'] + r['edit_cpu']:.1f}",
             f"{r['invert_per_step']:.2f}", f"{r['edit_per_step']:.2f}",
             _report.mb(r["peak_over_base"]),
             *("-" if live(r, k) is None else _report.mb(live(r, k))
               for k in ("peak_sampling_over_base", "peak_over_base", "held_after_invert")),
             _report.mb(r["data_bytes"]),
             "-" if r["cuda_peak"] is None else _report.mb(r["cuda_peak"]))
            for r in ok_runs]
    rows += [(r["frames"], "failed", *["-"] * 10) for r in failed]
    print(_report.table(("frames", "invert s", "edit s", "CPU s", "invert s/step", "edit s/step",
                         "peak - base", "live: sampling", "live: peak", "live: held after invert",
                         "data", "CUDA peak"), rows))
    print("peak - base: glibc's default allocator (what a ComfyUI process shows); live: the same run "
          f"with {MMAP_VARIABLE}={MMAP_THRESHOLD} (peak RSS follows the memory in use); sampling: the "
          "peak of both nodes before FateZero Sample builds its mask preview; data: the bytes the run "
          "holds for the clip (latents, store, mask preview).")
    for r in failed:
        print(f"{r['frames']} frames failed: {r['error']}")

    lines, targets, summary = [], {}, {}

    def target(name, measured, goal, fmt="{:.3f}"):
        line, ok = _report.target_line(name, measured, goal, fmt)
        lines.append(line)
        targets[name] = dict(measured=measured, goal=goal, ok=ok)

    if len(ok_runs) > 1:
        xs = [r["frames"] for r in ok_runs]
        wall = [r["invert_wall"] + r["edit_wall"] for r in ok_runs]
        cpu = [r["invert_cpu"] + r["edit_cpu"] for r in ok_runs]
        timed = wall if metric == "wall" else cpu
        summary["time_exponent_wall"] = _report.fit_exponent(xs, wall)
        summary["time_exponent_cpu"] = _report.fit_exponent(xs, cpu)
        summary["time_exponent_last_doubling"] = _report.fit_exponent(xs[-2:], timed[-2:])
        print(f"\ntime exponent (log time vs log frames): wall {summary['time_exponent_wall']:.3f}, "
              f"CPU {summary['time_exponent_cpu']:.3f}; the targets use {metric_why}.")
        # Per added frame between frame counts: flat when the cost is linear in the frames.
        growth = []
        for a, b, ta, tb in zip(ok_runs, ok_runs[1:], timed, timed[1:]):
            df = b["frames"] - a["frames"]
            growth.append((f"{a['frames']} -> {b['frames']}", f"{(tb - ta) / df:.3f}",
                           f"{_report.fit_exponent([a['frames'], b['frames']], [ta, tb]):.3f}",
                           "-" if "live" not in a else
                           f"{(b['live']['peak_sampling_over_base'] - a['live']['peak_sampling_over_base']) / df / 1e3:,.1f} kB"))
        print(_report.table(("frames", f"{metric} s per added frame", "time exponent",
                             "live sampling peak per added frame"), growth))
    if len(ok_runs) > 1 and not gpu:
        kb = lambda n: f"{n / 1e3:,.1f} kB"  # noqa: E731
        per_frame = slope(xs, [live(r, "peak_over_base") for r in ok_runs])
        sampling_per_frame = slope(xs, [live(r, "peak_sampling_over_base") for r in ok_runs])
        held_per_frame = slope(xs, [live(r, "held_after_invert") for r in ok_runs])
        default_per_frame = slope(xs, [r["peak_over_base"] for r in ok_runs])
        last = ok_runs[-1]
        data_per_frame = {k: v / last["frames"] for k, v in last["data"].items()}
        latent_frame = last["latent_frame_bytes"]
        latents = sum(v for k, v in data_per_frame.items() if k != "mask_preview")
        inverted = sum(data_per_frame[k] for k in ("input_latent", "inverted_latent", "store_latents",
                                                   "store_attention"))
        margin = WORKING_COPIES * latent_frame
        budget_sampling = latents + margin
        budget = budget_sampling + data_per_frame["mask_preview"]
        summary.update(live_peak_bytes_per_frame=per_frame, live_sampling_peak_bytes_per_frame=sampling_per_frame,
                       live_held_after_invert_bytes_per_frame=held_per_frame,
                       default_allocator_peak_bytes_per_frame=default_per_frame,
                       data_bytes_per_frame=data_per_frame, latent_frame_bytes=latent_frame,
                       latents_bytes_per_frame=latents, margin_bytes_per_frame=margin,
                       budget_sampling_bytes_per_frame=budget_sampling, budget_bytes_per_frame=budget)
        print(f"\nmemory per added frame (least-squares slope over {xs[0]} -> {xs[-1]} frames, live runs), "
              f"against what the clip itself holds per frame (one latent frame: {latent_frame / 1e3:,.2f} kB):")
        print(_report.table(("", "measured per added frame", "clip data per frame", "+ margin",
                             "budget", "measured / budget"), [
            ("held after invert", kb(held_per_frame), kb(inverted), "-", "-", "-"),
            ("peak while sampling (both nodes)", kb(sampling_per_frame), kb(latents), kb(margin),
             kb(budget_sampling), f"{sampling_per_frame / budget_sampling:.2f}"),
            ("peak, with the mask preview", kb(per_frame), kb(latents + data_per_frame["mask_preview"]),
             kb(margin), kb(budget), f"{per_frame / budget:.2f}")]))
        print("clip data per frame: " + ", ".join(f"{k.replace('_', ' ')} {kb(v)}" for k, v in data_per_frame.items())
              + f"; margin: {WORKING_COPIES} latent-sized working copies (noise, x, denoised, per-cond "
              "outputs and window sums, CFG, the recompute source latent). With the default allocator "
              f"the peak grows {kb(default_per_frame)} per added frame.")
        target("time_exponent", summary["time_exponent_wall" if metric == "wall" else "time_exponent_cpu"],
               TIME_GOAL)
        target("time_exponent_last_doubling", summary["time_exponent_last_doubling"], TIME_GOAL)
        target("sampling_peak_per_added_frame_vs_latents_budget", sampling_per_frame / budget_sampling, 1.0,
               "{:.2f}")
        target("peak_per_added_frame_vs_latents_and_preview_budget", per_frame / budget, 1.0, "{:.2f}")
    if gpu:
        for r in ok_runs:
            print(f"\n{r['frames']} frames at {size} px on {m['gpu']}: CUDA peak "
                  f"{r['cuda_peak'] / 1e9:.2f} GB allocated ({r['cuda_reserved_peak'] / 1e9:.2f} GB "
                  f"reserved); {r['invert_per_step']:.2f} s per inversion step, {r['edit_per_step']:.2f} s "
                  f"per edit step.")
            target(f"cuda_peak_gb_{r['frames']}_frames", r["cuda_peak"] / 1e9, VRAM_GOAL_GB, "{:.2f}")
    if failed:
        lines.append(f"target all_frame_counts_ran: {len(ok_runs)} of {len(results)} MISS")
    _script.finish("long_clip.json", dict(
        setting=dict(size=size, steps=steps, frames=frames, placement=args.placement,
                     key_frames=args.key_frames, group_norm=args.group_norm, cfg=CFG,
                     context_length=args.context_length, context_overlap=args.context_overlap,
                     context_schedule=args.context_schedule, working_copies=WORKING_COPIES,
                     live_allocator={MMAP_VARIABLE: MMAP_THRESHOLD},
                     model="SD1.5 shape, random weights" if gpu else "tiny SD1.5 topology (model_channels 32), random weights",
                     reduced_resolution=not gpu),
        machine=m, cpu_shared=shared and not gpu, metric=metric_why, results=results, summary=summary,
        targets=targets), args, t0, lines)
    return 0 if not failed and all(r["finite"] for r in ok_runs) else 1


if __name__ == "__main__":
    sys.exit(main())
