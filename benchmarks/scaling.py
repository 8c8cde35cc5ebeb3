"""Scaling: time and memory of inversion + edit vs the number of frames (8, 16, 32, 64).

Run with ComfyUI's python::

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfyui-venv/bin/python benchmarks/scaling.py

Model: SD1.5 shape (model_channels 320, 8 heads, seeded random weights; fp32 on the CPU, fp16 on a
GPU) at a fixed small resolution (CPU: 64x64 px, GPU: 256x256 px). Each frame count runs in a
fresh subprocess: build the model, reset the peak RSS and CUDA peak, run ``FateZero DDIM Invert``
(``cpu`` placement) then ``FateZero Sample`` (cfg 7.5, cross and self windows 1.0, blend word
"cat"), and report:

- per-step time of the inversion and of the edit (intervals between per-step callbacks) and
  their sum, ``step pair``; also in process CPU seconds;
- ``peak - base``: peak resident memory above the memory with the model loaded (``VmHWM`` after
  a ``clear_refs`` reset); on a GPU also the CUDA peak above the model's own allocation;
- the store's accounted bytes.

The time target uses wall time, or process CPU seconds when other processes oversubscribe the
CPU (``--metric auto``; the script says which). Exponents are least-squares slopes of log(value) against log(frames); linear growth is 1, and a
fixed cost per step (weights read once per forward) pulls them below 1. Quadratic growth would
show as 2. The growth table gives the cost of each added frame between frame counts and the
exponent of each doubling; the last doubling (32 -> 64 frames), where the fixed cost matters
least, is a target too. Results go to ``benchmarks/results/scaling.json``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import _calls
import _host
import _probes
import _report
import _script
import tiny_models

FRAMES = (8, 16, 32, 64)
GOAL = 1.15


def child(args) -> dict:
    args.frames = int(args.frames)
    nodes = _host.setup(threads=args.threads, host_attention=args.host_attention)
    import torch

    model = tiny_models.build_sd15()
    clip = tiny_models.build_tiny_clip()
    source, target, spec = _calls.blend_settings(nodes, clip, blend_words="cat",
                                                cross_replace_steps=1.0, self_replace_steps=1.0)
    negative = _calls.empty_conditioning(clip)
    latent = _calls.moving_latent(args.frames, args.size // 8)
    if _host.on_gpu():  # load the weights first, so the CUDA peak below is above them
        import comfy.model_management

        comfy.model_management.load_models_gpu([model])
    base = _probes.rss_bytes()
    _probes.reset_peak()
    cuda_base = torch.cuda.memory_allocated() if torch.cuda.is_available() else None
    with torch.inference_mode():
        with _probes.StepTimer() as inv:
            inverted, store = _calls.invert(nodes, model, source, latent, args.steps, "cpu")
        with _probes.StepTimer() as edit:
            out, _ = _calls.fatezero_sample(nodes, model, target, negative, inverted, store, spec, 7.5)
    peak = _probes.peak_rss_bytes()
    cuda_peak = _probes.cuda_peak_bytes()
    result = dict(frames=args.frames, size=args.size, steps=args.steps,
                  invert_per_step=inv.per_step, edit_per_step=edit.per_step,
                  invert_cpu_per_step=inv.cpu_per_step, edit_cpu_per_step=edit.cpu_per_step,
                  invert_wall=inv.wall, edit_wall=edit.wall, rss_base=base, peak_rss=peak,
                  peak_over_base=peak - base, store_nbytes=store.nbytes,
                  cuda_peak=cuda_peak, cuda_peak_over_base=None if cuda_peak is None else cuda_peak - cuda_base,
                  finite=bool(torch.isfinite(out["samples"]).all()), machine=_host.machine())
    store.release()
    return result


def main() -> int:
    parser = _script.Arguments(__doc__, sizes=(64, 256), steps=3, frames=",".join(map(str, FRAMES)))
    _script.add_host_arguments(parser, metric_for="the exponent targets")
    args = _script.parent_or_child(parser, child)
    if args is None:
        return 0
    gpu, size, _ = parser.setting(args)
    frames = [int(f) for f in args.frames.split(",")]
    metric, metric_why = _host.choose_metric(args.metric)
    t0 = time.perf_counter()
    results = []
    for f in frames:
        child_args = ["--frames", str(f), "--size", str(size), "--steps", str(args.steps)]
        child_args += _script.host_child_args(args)
        r = _script.run_child(Path(__file__).resolve(), child_args, timeout=3600)
        r["pair_per_step"] = r["invert_per_step"] + r["edit_per_step"]
        r["pair_cpu_per_step"] = r["invert_cpu_per_step"] + r["edit_cpu_per_step"]
        print(f"  {f} frames: step pair {r['pair_per_step']:.2f} s, peak - base "
              f"{_report.mb(r['peak_over_base'])} ({time.perf_counter() - t0:.0f} s)", flush=True)
        results.append(r)
    m = results[0]["machine"]
    where = _host.where_it_ran(m, gpu)
    print(f"\nScaling of FateZero DDIM Invert + FateZero Sample (cpu store, cfg 7.5, every step fused) "
          f"with frames: SD1.5-shape UNet, {size}x{size} px, {args.steps} steps. Ran {where}; "
          "each frame count in a fresh process.")
    rows = [(r["frames"], f"{r['invert_per_step']:.2f}", f"{r['edit_per_step']:.2f}",
             f"{r['pair_per_step']:.2f}", f"{r['pair_cpu_per_step']:.2f}",
             f"{r['pair_per_step'] / r['frames']:.3f}", _report.mb(r["peak_over_base"]),
             _report.mb(r["store_nbytes"]),
             "-" if r["cuda_peak_over_base"] is None else _report.mb(r["cuda_peak_over_base"]))
            for r in results]
    print(_report.table(("frames", "invert s/step", "edit s/step", "step pair s", "pair CPU s",
                       "s per frame", "peak - base", "store", "CUDA peak - base"), rows))

    xs = [r["frames"] for r in results]
    exponents = {
        "time": _report.fit_exponent(xs, [r["pair_per_step"] for r in results]),
        "time_cpu_seconds": _report.fit_exponent(xs, [r["pair_cpu_per_step"] for r in results]),
        "memory": _report.fit_exponent(xs, [max(1, r["peak_over_base"]) for r in results]),
        "store_bytes": _report.fit_exponent(xs, [r["store_nbytes"] for r in results]),
    }
    if gpu:
        exponents["cuda_memory"] = _report.fit_exponent(xs, [max(1, r["cuda_peak_over_base"]) for r in results])
    print("\nfitted exponents (log value vs log frames): "
          + ", ".join(f"{k} {v:.3f}" for k, v in exponents.items()))
    # A fixed cost per step (reading the weights, unfused layers at this small size) pulls the
    # fitted exponent below 1; the cost of each added frame shows the growth itself: constant when
    # linear, rising in proportion to the frames when quadratic.
    print("\ngrowth between frame counts (added cost per added frame; exponent of the doubling):")
    growth_rows = []
    for a, b in zip(results, results[1:]):
        df = b["frames"] - a["frames"]
        growth_rows.append((f"{a['frames']} -> {b['frames']}",
                            f"{(b['pair_per_step'] - a['pair_per_step']) / df:.3f}",
                            f"{_report.fit_exponent([a['frames'], b['frames']], [a['pair_per_step'], b['pair_per_step']]):.3f}",
                            _report.mb((b["peak_over_base"] - a["peak_over_base"]) / df),
                            f"{_report.fit_exponent([a['frames'], b['frames']], [a['peak_over_base'], b['peak_over_base']]):.3f}"))
    print(_report.table(("frames", "s/step pair per added frame", "time exponent", "peak per added frame",
                       "memory exponent"), growth_rows))
    if len(results) > 1:
        prev, last = results[-2:]
        key_t = "pair_per_step" if metric == "wall" else "pair_cpu_per_step"
        exponents["time_last_doubling"] = _report.fit_exponent(
            [prev["frames"], last["frames"]], [prev[key_t], last[key_t]])
    time_key = "time" if metric == "wall" else "time_cpu_seconds"
    print(f"the time target uses {metric_why}.")
    targets = {"time": exponents[time_key], "memory": exponents["memory"]}
    if "time_last_doubling" in exponents:
        targets["time_last_doubling"] = exponents["time_last_doubling"]
    if gpu:
        targets["cuda_memory"] = exponents["cuda_memory"]
    lines, status = [], {}
    for name, value in targets.items():
        line, ok = _report.target_line(f"{name}_exponent", value, GOAL)
        lines.append(line)
        status[name] = dict(measured=value, goal=GOAL, ok=ok)
    _script.finish("scaling.json", dict(
        setting=dict(size=size, steps=args.steps, frames=frames, placement="cpu", cfg=7.5,
                     reduced_resolution=not gpu),
        machine=m, metric=metric_why, results=results, exponents=exponents, targets=status),
        args, t0, lines)
    return 0 if all(r["finite"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
