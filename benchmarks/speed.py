"""Speed: FateZero Sample vs a plain core KSampler (ddim) step, and inversion vs a plain forward.

Run with ComfyUI's python::

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfyui-venv/bin/python benchmarks/speed.py

One process, one model (SD1.5 shape, model_channels 320, 8 heads, seeded random weights; fp32 on
the CPU, fp16 on a GPU), the same frames and the same sigmas (ddim_uniform = the FateZero
schedule) for every variant. Each repetition runs, in an order that is reversed on every other
repetition so slow drifts cancel:

- ``plain forward``: core ``KSamplerAdvanced`` (ddim, cfg 1: one forward of the frames per step,
  no hooks);
- ``invert <placement>``: the ``FateZero DDIM Invert`` node (spatio-temporal attention, capture);
- ``plain KSampler``: core ``KSamplerAdvanced`` (ddim, cfg 7.5, no added noise);
- ``plain KSampler clip norm``: the same on the model with clip-level ResNet/output GroupNorms
  (what FateZero Sample runs by default): the cost of the norm alone;
- ``sample <placement>``: the ``FateZero Sample`` node (cfg 7.5) on that placement's store, with
  every step fused (cross and self windows 1.0, blend word "cat": the most work per step;
  the official windows 0.8 / 0.6 fuse fewer steps).

Time per step: the wall-clock interval between consecutive per-step sampler callbacks (steps
1..N-1; the first step's one-off work is left out); ``wall/step`` is the whole node call divided by
N; the CPU-time ratio uses the process's CPU seconds over the same intervals (the work done, which
other processes on the machine do not inflate). The target lines use wall time, or CPU time when
the CPU is oversubscribed by other processes (``--metric auto``; the script says which). Ratios are
medians over repetitions of (variant / the plain run of the same repetition). On a GPU the times
are absolute, with the CUDA peak of each run; on the CPU the script runs at reduced resolution
(128x128 px, 3 steps) and says so. Below 128 px the CPU UNet is bound by reading its weights
(a forward of 8 frames costs 80% of one of 16 at 64 px), which inflates the ``recompute`` ratio,
whose extra source pass is a second UNet call per step (``benchmarks/NOTES.md``). Results go to ``benchmarks/results/speed.json``.
"""

from __future__ import annotations

import sys
import time

import _calls
import _host
import _probes
import _report
import _script
import tiny_models

PLACEMENTS = ("gpu", "cpu", "disk", "recompute")
TARGETS = (  # (name, variant, baseline, goal)
    [(f"sample_{p}_vs_plain_ksampler", f"sample {p}", "plain KSampler", 1.7 if p == "recompute" else 1.3)
     for p in PLACEMENTS]
    + [(f"invert_{p}_vs_plain_forward", f"invert {p}", "plain forward", 1.2) for p in ("cpu",)]
    # the clip-level ResNet/output GroupNorm must cost no more than a few percent of a step
    + [("clip_group_norm_ksampler_vs_plain_ksampler", "plain KSampler clip norm", "plain KSampler", 1.05)]
)


def main() -> int:
    parser = _script.Arguments(__doc__, steps=(3, 10))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cfg", type=float, default=7.5)
    parser.add_argument("--placements", default=",".join(PLACEMENTS))
    _script.add_host_arguments(parser, metric_for="the target ratios")
    parser.add_argument("--profile", default=None, metavar="VARIANT",
                        help="after the repetitions, profile one run of VARIANT (e.g. 'sample cpu') "
                             "with torch.profiler and print the top ops")
    args = parser.parse_args()
    t_script = time.perf_counter()
    nodes, (gpu, size, steps) = _script.start_in_process(parser, args, f"cfg {args.cfg}")
    import torch

    placements = [p.strip() for p in args.placements.split(",") if p.strip()]
    metric, metric_why = _host.choose_metric(args.metric)
    key = "per_step" if metric == "wall" else "cpu_per_step"

    model = tiny_models.build_sd15()
    clip = tiny_models.build_tiny_clip()
    source, target, spec = _calls.blend_settings(nodes, clip, blend_words="cat",
                                                cross_replace_steps=1.0, self_replace_steps=1.0)
    negative = _calls.empty_conditioning(clip)
    latent = _calls.moving_latent(args.frames, size // 8)
    print(f"model ready ({tiny_models.unet_parameter_count(model) / 1e6:.0f} M parameters) after "
          f"{time.perf_counter() - t_script:.0f} s", flush=True)

    stores: dict = {}
    inverted: dict = {}

    def timed(fn, before=None):
        if before is not None:
            before()
        _probes.reset_peak()
        with _probes.StepTimer() as timer:
            with torch.inference_mode():
                fn()
        return dict(per_step=timer.per_step, cpu_per_step=timer.cpu_per_step,
                    wall_per_step=timer.wall / steps, wall=timer.wall, cuda_peak=_probes.cuda_peak_bytes())

    def plain_forward():
        _calls.core_ddim(model, source, source, {"samples": latent}, steps, 1.0)

    def invert(p):
        def run():
            inverted[p], stores[p] = _calls.invert(nodes, model, source, latent, steps, p)
        return run

    def release_before(name):
        """An inversion replaces its placement's store: free the old one outside the timing."""
        def release():
            old = stores.pop(name.split()[-1], None)
            if old is not None:
                old.release()
        return release if name.startswith("invert") else None

    def plain_ksampler():
        _calls.core_ddim(model, target, negative, inverted[placements[0]], steps, args.cfg)

    video_norm_model = nodes.video_runtime.with_group_norm(model, "clip")

    def plain_ksampler_clip_norm():
        _calls.core_ddim(video_norm_model, target, negative, inverted[placements[0]], steps, args.cfg)

    def sample(p):
        return lambda: _calls.fatezero_sample(nodes, model, target, negative, inverted[p], stores[p],
                                             spec, args.cfg)

    variants = ([("plain forward", plain_forward)] + [(f"invert {p}", invert(p)) for p in placements]
                + [("plain KSampler", plain_ksampler), ("plain KSampler clip norm", plain_ksampler_clip_norm)]
                + [(f"sample {p}", sample(p)) for p in placements])
    # Warm-up: one untimed plain forward (first-call allocations and kernel set-up).
    timed(plain_forward)
    print(f"warm-up done after {time.perf_counter() - t_script:.0f} s", flush=True)

    runs: dict[str, list[dict]] = {name: [] for name, _ in variants}
    for r in range(args.repeats):
        # Inversions must precede the samples that read their stores: alternate the order inside
        # the two halves (forward/inversions, KSampler/samples) and which half starts is fixed.
        first = variants[:1 + len(placements)]
        second = variants[1 + len(placements):]
        if r % 2:
            first = first[1:][::-1] + first[:1]
            second = second[1:][::-1] + second[:1]
        for name, fn in first + second:
            runs[name].append(timed(fn, release_before(name)))
        print(f"repetition {r + 1}/{args.repeats} done after {time.perf_counter() - t_script:.0f} s",
              flush=True)

    def ratios(variant, baseline, key="per_step"):
        return [a[key] / b[key] for a, b in zip(runs[variant], runs[baseline])]

    baseline_of = {name: ("plain forward" if name.startswith("invert") else "plain KSampler")
                   for name, _ in variants if name not in ("plain forward", "plain KSampler")}
    rows = []
    for name, _ in variants:
        per = _report.median([x["per_step"] for x in runs[name]])
        wall = _report.median([x["wall_per_step"] for x in runs[name]])
        base = baseline_of.get(name)
        ratio = _report.median(ratios(name, base)) if base else None
        wall_ratio = _report.median(ratios(name, base, "wall_per_step")) if base else None
        cpu_ratio = _report.median(ratios(name, base, "cpu_per_step")) if base else None
        peak = runs[name][-1]["cuda_peak"]
        rows.append((name, f"{per:.3f}", f"{wall:.3f}", base or "-",
                     "-" if ratio is None else f"{ratio:.3f}",
                     "-" if wall_ratio is None else f"{wall_ratio:.3f}",
                     "-" if cpu_ratio is None else f"{cpu_ratio:.3f}",
                     " ".join(f"{x['per_step']:.2f}" for x in runs[name]),
                     "-" if peak is None else _report.mb(peak)))
    print(f"\nSpeed per step, medians over {args.repeats} alternating repetitions")
    print(_report.table(("variant", "s/step", "wall s/step", "vs", "ratio", "wall ratio",
                       "CPU-time ratio", "s/step per repetition", "CUDA peak"), rows))
    print("ratio: per-step wall time (callback intervals), the targets; wall ratio: whole node "
          "call / steps; CPU-time ratio: process CPU seconds per step (robust when other "
          "processes share the cores).")

    if args.profile:
        fn = dict(variants)[args.profile]
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
        with profile(activities=activities) as prof:
            timed(fn, release_before(args.profile))
        print(f"\nprofile of one '{args.profile}' run:")
        print(prof.key_averages().table(sort_by="self_cuda_time_total" if gpu else "self_cpu_time_total",
                                        row_limit=25))

    lines, results = [], {}
    print(f"\ntarget ratios use {metric_why}.")
    for name, variant, base, goal in TARGETS:
        if variant not in runs:
            continue
        value = _report.median(ratios(variant, base, key))
        line, ok = _report.target_line(name, value, goal)
        lines.append(line)
        results[name] = dict(measured=value, goal=goal, ok=ok, metric=metric,
                             wall=_report.median(ratios(variant, base)),
                             cpu=_report.median(ratios(variant, base, "cpu_per_step")))
    _script.finish("speed.json", dict(
        setting=dict(size=size, frames=args.frames, steps=steps, cfg=args.cfg, repeats=args.repeats,
                     reduced_resolution=not gpu, windows="cross 1.0, self 1.0, blend word 'cat'"),
        machine=_host.machine(), metric=metric_why, runs=runs, targets=results), args, t_script, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
