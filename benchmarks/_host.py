"""Shared set-up for the benchmarks that run this pack inside a real ComfyUI.

- :func:`setup` finds ComfyUI through ``COMFYUI_PATH``, checks that the running Python can import
  it (it must be that ComfyUI environment's Python), parses ComfyUI's arguments (``--cpu`` when no
  GPU is present) and imports this pack by path, as ComfyUI imports a custom node.
- :func:`build_sd15` builds a UNet of SD1.5 shape (model_channels 320, 8 heads, context 768,
  ~860 M parameters) with seeded random weights, every parameter initialised explicitly.
- :func:`build_clip`: a 2-layer CLIP-L-wide text model with the real SD1 tokenizer, so prompts
  become ``[1, 77, 768]`` conditioning as with SD1.5 (the text encoder is not benchmarked).
- memory probes: peak RSS (``VmHWM``), resettable through ``/proc/self/clear_refs``, and the CUDA
  peak when a GPU is present.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import importlib.util
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PACK_MODULE = "comfyui_fatezero"
SOURCE = "a cat sitting on a wooden table"
TARGET = "a dog sitting on a wooden table"
SEED = 20231001

_state: dict = {}


# ------------------------------------------------------------------------------------ host set-up
def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def comfyui_path() -> str:
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        _fail("set COMFYUI_PATH to a ComfyUI checkout and run this script with that ComfyUI "
              "environment's python, e.g.\n  COMFYUI_PATH=/path/to/ComfyUI "
              "/path/to/comfyui-venv/bin/python " + " ".join(sys.argv))
    if not os.path.isfile(os.path.join(path, "main.py")):
        _fail(f"COMFYUI_PATH={path} has no main.py; point it at a ComfyUI checkout.")
    return os.path.abspath(path)


def check_environment() -> str:
    """Fail with a clear message unless COMFYUI_PATH is set and this Python can import ComfyUI."""
    path = comfyui_path()
    missing = [m for m in ("torch", "safetensors", "einops", "aiohttp", "comfy", "comfy_api")
               if _find_spec(m, path) is None]
    if missing:
        _fail(f"{sys.executable} cannot import {', '.join(missing)}: run this script with the python "
              f"of the ComfyUI environment at {path} (e.g. its venv's bin/python).")
    return path


def _find_spec(name: str, path: str):
    if path not in sys.path:
        sys.path.insert(0, path)
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


def set_threads(threads: int | None) -> str:
    """Torch CPU threads: ``threads`` if given, else torch's default, or 1 when the machine is
    already busier than its cores (OpenMP threads then wait on each other: measured 4x slower)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
        return f"{threads} torch thread(s) (--threads)"
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    cores = os.cpu_count() or 1
    if load > cores:
        torch.set_num_threads(1)
        return f"1 torch thread: load average {load:.1f} on {cores} cores (other processes)"
    return f"{torch.get_num_threads()} torch thread(s), load average {load:.1f} on {cores} cores"


def oversubscribed() -> bool:
    """True when the 1-minute load average exceeds the cores: other processes share the CPU."""
    try:
        return os.getloadavg()[0] > (os.cpu_count() or 1)
    except OSError:
        return False


def choose_metric(metric: str) -> tuple[str, str]:
    """``wall`` or ``cpu`` (process CPU seconds) for the targets; ``auto`` picks ``cpu`` on a shared,
    oversubscribed CPU, where wall time mostly measures the other processes. Returns (metric, why)."""
    if metric != "auto":
        return metric, f"{metric} time (--metric {metric})"
    if not on_gpu() and oversubscribed():
        load = os.getloadavg()[0]
        return "cpu", (f"process CPU time: the CPU is shared (load average {load:.1f} on "
                       f"{os.cpu_count()} cores), so wall time mostly measures other processes")
    return "wall", "wall-clock time"


HOST_ATTENTION_FLAGS = {"default": [], "pytorch": ["--use-pytorch-cross-attention"],
                        "sub-quad": ["--use-quad-cross-attention"], "split": ["--use-split-cross-attention"]}


def add_host_arguments(parser, metric_for: str | None = None) -> None:
    """``--threads`` and ``--host-attention`` (every script); ``--metric`` when a target is timed."""
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: auto)")
    parser.add_argument("--host-attention", choices=sorted(HOST_ATTENTION_FLAGS), default="default",
                        help="ComfyUI's attention kernel for unfused layers and the plain baselines")
    if metric_for:
        parser.add_argument("--metric", choices=("auto", "wall", "cpu"), default="auto",
                            help=f"time for {metric_for}: wall clock, or process CPU seconds "
                                 "(auto: cpu when other processes oversubscribe the CPU)")


def host_child_args(args) -> list[str]:
    """The ``add_host_arguments`` options of ``args``, for a child process of the same script."""
    return ["--host-attention", args.host_attention] + (["--threads", str(args.threads)] if args.threads else [])


def where_it_ran(m: dict, gpu: bool) -> str:
    """``on <GPU> (CUDA)`` or the CPU, its threads and the reduced-resolution notice."""
    if gpu:
        return f"on {m['gpu']} (CUDA)"
    return f"on CPU ({m['cpu']}, {m['cpu_cores']} cores; {m['threads_note']}), no GPU: reduced resolution"


def setup(force_cpu: bool | None = None, threads: int | None = None, host_attention: str = "default"):
    """Import ComfyUI (``--cpu`` without a GPU) and this pack; returns the pack's ``nodes`` package.

    ``host_attention`` picks ComfyUI's own attention kernel (its command-line flag), used by every
    layer the pack does not fuse and by the plain baselines: ``default`` is ComfyUI's choice
    (sub-quadratic on the CPU, SDPA on a GPU); the fused layers always use torch SDPA."""
    if "nodes" in _state:
        return _state["nodes"]
    path = check_environment()
    import torch

    _state["threads"] = set_threads(threads)
    cpu = (not torch.cuda.is_available()) if force_cpu is None else force_cpu
    if path in sys.path:
        sys.path.remove(path)
    sys.path.insert(0, path)
    saved = sys.argv
    sys.argv = ([saved[0], "--cpu"] if cpu else [saved[0]]) + HOST_ATTENTION_FLAGS[host_attention]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.cli_args  # noqa: F401  (parses sys.argv now)
        import comfy.model_management  # noqa: F401
        import comfy.samplers  # noqa: F401
        import folder_paths  # noqa: F401
        import latent_preview  # noqa: F401
        import nodes as core_nodes  # noqa: F401
        from comfy_api.latest import io  # noqa: F401
    except Exception as exc:  # the usual cause: another Python than ComfyUI's
        _fail(f"cannot import ComfyUI from COMFYUI_PATH={path} with {sys.executable} "
              f"({type(exc).__name__}: {exc}). Run this script with that ComfyUI environment's python.")
    finally:
        sys.argv = saved
    spec = importlib.util.spec_from_file_location(
        PACK_MODULE, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[PACK_MODULE] = pack
    spec.loader.exec_module(pack)
    for name in ("invert", "sample", "blend_settings"):
        importlib.import_module(f"{PACK_MODULE}.nodes.{name}")
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False  # no tqdm bars, for core and FateZero nodes alike
    # FateZero Sample saves its mask previews to ComfyUI's temp folder: use a private one.
    temp = tempfile.mkdtemp(prefix="fatezero_bench_")
    folder_paths.set_temp_directory(temp)
    atexit.register(shutil.rmtree, temp, True)
    sys.path.insert(0, str(ROOT / "tests" / "host"))  # tiny_models: seeded parameter init
    _state.update(nodes=pack.nodes, cpu=cpu, torch=torch, host_attention=host_attention)
    return pack.nodes


def device():
    import comfy.model_management

    return comfy.model_management.get_torch_device()


def on_gpu() -> bool:
    if "cpu" in _state:
        return not _state["cpu"]
    import torch

    return torch.cuda.is_available()


def attention_backend() -> str:
    import comfy.ldm.modules.attention as attn

    return attn.optimized_attention.__name__


def machine() -> dict:
    import torch

    info = dict(platform=platform.platform(), python=platform.python_version(), torch=torch.__version__,
                cpu=_cpu_name(), cpu_cores=os.cpu_count(), torch_threads=torch.get_num_threads(),
                ram_gb=round(_meminfo_kb("MemTotal") / 2**20, 1), device=str(device()) if _state else None,
                gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                host_attention=attention_backend() if _state else None,
                threads_note=_state.get("threads"), load_average=_loadavg())
    return info


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _meminfo_kb(key: str) -> int:
    try:
        text = open("/proc/meminfo").read()
        return int(re.search(rf"{key}:\s+(\d+)", text).group(1))
    except (OSError, AttributeError):
        return 0


def describe_run(setting: str) -> str:
    if on_gpu():
        return f"Ran on {machine()['gpu']} (CUDA), {setting}."
    m = machine()
    return (f"Ran on CPU ({m['cpu']}, {m['cpu_cores']} cores, {_state.get('threads')}), no GPU: "
            f"reduced resolution, {setting}. Host attention: {m['host_attention']}.")


# ----------------------------------------------------------------------------------------- models
def build_sd15(model_channels: int = 320, seed: int = SEED):
    """``ModelPatcher`` over an SD1.5-shape UNet with seeded random weights (fp16 on GPU, fp32 on CPU)."""
    import torch
    import comfy.model_patcher
    import comfy.supported_models
    import tiny_models

    config = tiny_models.sd15_unet_config(model_channels)
    model_config = comfy.supported_models.SD15(config)
    dtype = torch.float16 if on_gpu() else torch.float32
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({})
    init_parameters_fast_(model.diffusion_model, seed)
    model.eval()
    offload = torch.device("cpu")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=device(), offload_device=offload)
    gc.collect()
    return patcher


def init_parameters_fast_(module, seed: int = SEED, pool: int = 1 << 24) -> None:
    """Fill every parameter with seeded random values, explicitly (ComfyUI's ops skip init).

    Same distributions as ``tests/host/tiny_models.init_parameters_`` (weights N(0, 1/fan_in),
    biases N(0, 0.02), norm weights 1 + N(0, 0.02)), but drawn from one pool of ``pool`` normal
    values that each parameter reads at a seeded offset: ~860 M values are filled at memory
    speed instead of being generated one by one.
    """
    import torch
    import tiny_models

    g = torch.Generator().manual_seed(seed)
    values = torch.randn(pool, generator=g)
    with torch.no_grad():
        for name, param in sorted(module.named_parameters(), key=lambda item: item[0]):
            kind, std = tiny_models._init_kind(name, param.shape)
            flat = param.view(-1)
            if kind == "constant":
                flat.fill_(std)
                continue
            done = 0
            while done < flat.numel():
                start = int(torch.randint(0, pool, (1,), generator=g))
                n = min(flat.numel() - done, pool - start)
                chunk = flat[done:done + n]
                chunk.copy_(values[start:start + n]).mul_(std)
                if kind == "around_one":
                    chunk.add_(1.0)
                done += n
    bad = [n for n, p in module.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise AssertionError(f"parameters left non-finite after init: {bad[:5]}")


def build_clip():
    import tiny_models

    return tiny_models.build_tiny_clip()


def parameter_count(patcher) -> int:
    return sum(p.numel() for p in patcher.model.diffusion_model.parameters())


def moving_latent(frames: int, size: int, seed: int = 0):
    """Correlated frames: one random field shifted by a pixel per frame (latent units)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, 4, size, size + frames, generator=g)
    return torch.cat([base[..., i:i + size] for i in range(frames)])


def blend_settings(nodes, clip, blend_words: str = "cat", **kw):
    """Source/target conditioning and edit spec from the Attention Blend Settings node."""
    args = dict(source_prompt=SOURCE, target_prompt=TARGET, blend_words=blend_words,
                target_blend_words="", cross_replace_steps=0.8, cross_replace_words="",
                self_replace_steps=0.6, blend_threshold=0.3, reweight="", mode="auto",
                local_latent_blend=False, soft_mask=False)
    args.update(kw)
    out = nodes.blend_settings.FateZeroAttentionBlendSettings.execute(clip=clip, **args)
    return out.args


def empty_conditioning(clip):
    import nodes as core_nodes

    return core_nodes.CLIPTextEncode().encode(clip, "")[0]


# -------------------------------------------------------------------------------------- node calls
def invert(nodes, model, source, latent, steps: int, placement: str, **kw):
    args = dict(steps=steps, key_frames="auto", st_min_channels=-1, store_placement=placement,
                store_dtype="fp16", layer_set="relative", schedule_end="comfy")
    args.update(kw)
    out = nodes.invert.FateZeroDDIMInvert.execute(model=model, source=source,
                                                  latent={"samples": latent}, **args)
    return out.args  # (inverted latent dict, store)


def fatezero_sample(nodes, model, positive, negative, inverted, store, spec, cfg: float = 7.5,
                    fusion: bool = True):
    out = nodes.sample.FateZeroSample.execute(model=model, positive=positive, negative=negative,
                                              latent=inverted, attention_store=store,
                                              blend_settings=spec, cfg=cfg, fusion=fusion)
    return out.args


def core_ddim(model, positive, negative, latent: dict, steps: int, cfg: float):
    """Core ``KSamplerAdvanced`` with ddim / ddim_uniform and no added noise (the same sigmas)."""
    import nodes as core_nodes

    return core_nodes.KSamplerAdvanced().sample(
        model, "disable", 0, steps, cfg, "ddim", "ddim_uniform", positive, negative, latent, 0,
        steps, "disable")[0]


class StepTimer:
    """Times sampler steps through ``latent_preview.prepare_callback``, which both core KSampler
    and the FateZero nodes call once per run; the callback fires once per step, after the model
    call. ``per_step`` is the mean wall-clock interval between consecutive callbacks (steps 1..N-1, so the
    first step's one-off work is left out); ``wall`` is the whole node call."""

    def __init__(self):
        self.stamps: list[float] = []
        self.cpu_stamps: list[float] = []

    def __enter__(self):
        import latent_preview

        self._orig = latent_preview.prepare_callback
        stamps, cpu_stamps = self.stamps, self.cpu_stamps

        def prepare_callback(model, steps, x0_output_dict=None):
            inner = self._orig(model, steps, x0_output_dict)

            def callback(step, x0, x, total_steps):
                sync()
                stamps.append(time.perf_counter())
                cpu_stamps.append(time.process_time())
                return inner(step, x0, x, total_steps)

            return callback

        latent_preview.prepare_callback = prepare_callback
        sync()
        self.start = time.perf_counter()
        self.cpu_start = time.process_time()
        return self

    def __exit__(self, *exc):
        import latent_preview

        sync()
        self.wall = time.perf_counter() - self.start
        self.cpu = time.process_time() - self.cpu_start
        latent_preview.prepare_callback = self._orig
        return False

    @property
    def per_step(self) -> float:
        s = self.stamps
        return (s[-1] - s[0]) / (len(s) - 1) if len(s) > 1 else self.wall

    @property
    def cpu_per_step(self) -> float:
        """Process CPU time per step (all threads): the work done, whatever else runs."""
        s = self.cpu_stamps
        return (s[-1] - s[0]) / (len(s) - 1) if len(s) > 1 else self.cpu


def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------- memory
def _status_kb(key: str) -> int:
    text = open("/proc/self/status").read()
    return int(re.search(rf"{key}:\s+(\d+)", text).group(1))


def rss_bytes() -> int:
    return _status_kb("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (``VmHWM``) since start or the last reset."""
    try:
        return _status_kb("VmHWM") * 1024
    except (OSError, AttributeError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux ``clear_refs`` 5) and the CUDA peak."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def trim_heap() -> bool:
    """Return freed heap memory to the OS (glibc ``malloc_trim``), so RSS counts live memory only.

    glibc keeps freed blocks of the heap mapped: after a sampling run RSS stays 2-4x above the
    memory still in use (measured: 96 MB of live store tensors held 400 MB of RSS, 100 MB after
    the trim)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def cuda_peak_bytes() -> int | None:
    import torch

    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None


def dir_bytes(path) -> int:
    if not path or not os.path.isdir(path):
        return 0
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


# ---------------------------------------------------------------------------------------- helpers
def run_child(script: Path, args: list[str], timeout: float = 1800) -> dict:
    """Run ``script --child ARGS`` in a fresh interpreter (same Python, same environment) and
    return the JSON object it prints on its last stdout line."""
    cmd = [sys.executable, str(script), "--child", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise RuntimeError(f"child {' '.join(args)} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def add_per_run_arguments(parser, runs, default_run: str, steps: int | None, steps_help: str) -> None:
    """``--size/--frames/--steps/--runs``, the host options and the hidden ``--child/--run`` of a
    script that measures each of ``runs`` in a fresh process (:func:`run_each`)."""
    import argparse

    parser.add_argument("--size", type=int, default=None, help="frame side in px (CPU 128, GPU 512)")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--steps", type=int, default=steps, help=steps_help)
    parser.add_argument("--runs", default=",".join(runs), help=f"comma list of {runs}")
    add_host_arguments(parser)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--run", default=default_run, help=argparse.SUPPRESS)


def run_each(script: Path, args, size: int, steps: int, report) -> list[dict]:
    """Every run of ``args.runs`` as ``script --child`` at ``size``/``args.frames``/``steps``;
    ``report(result)`` after each. Returns the results in order."""
    results = []
    for run in (r.strip() for r in args.runs.split(",") if r.strip()):
        child_args = ["--run", run, "--size", str(size), "--frames", str(args.frames),
                      "--steps", str(steps)] + host_child_args(args)
        results.append(run_child(script, child_args))
        report(results[-1])
    return results


def median(values):
    return statistics.median(values)


def fit_exponent(xs, ys) -> float:
    """Least-squares slope of log(y) against log(x)."""
    import math

    lx = [math.log(x) for x in xs]
    ly = [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def table(header, rows) -> str:
    cells = [tuple(str(c) for c in header)] + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    out = []
    for n, line in enumerate(cells):
        out.append("  ".join(c.rjust(w) for c, w in zip(line, widths)))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def target_line(name: str, measured: float, goal: float, fmt: str = "{:.3f}") -> tuple[str, bool]:
    ok = measured <= goal
    return f"target {name}: {fmt.format(measured)} (goal <= {goal}) {'ok' if ok else 'MISS'}", ok


def write_json(name: str, payload: dict, host_attention: str | None = None) -> Path:
    """Write ``benchmarks/results/<name>``; a run with a non-default host attention kernel gets its
    own file (``speed.host-pytorch.json``), so it never replaces the default run's results."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    kernel = host_attention or _state.get("host_attention", "default")
    if kernel != "default":
        stem, _, suffix = name.rpartition(".")
        name = f"{stem}.host-{kernel}.{suffix}"
    path = RESULTS / name
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path


def mb(n) -> str:
    return f"{n / 1e6:,.1f} MB"
