"""The ComfyUI host of the benchmarks that run this pack inside a real ComfyUI.

- :func:`setup` finds ComfyUI through ``COMFYUI_PATH``, checks that the running Python can import
  it (it must be that ComfyUI environment's Python), parses ComfyUI's arguments (``--cpu`` when no
  GPU is present) and imports this pack by path, as ComfyUI imports a custom node.
- torch threads, the time metric, and the machine a run reports.

The seeded models come from the repository's ``tiny_models/`` (shared with the tests); this module
puts the repository root last on ``sys.path`` for it, so ComfyUI's folder, inserted first by
:func:`setup`, keeps its ``nodes`` module ahead of this pack's ``nodes/`` folder.
"""

from __future__ import annotations

import atexit
import importlib
import importlib.util
import os
import platform
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACK_MODULE = "comfyui_fatezero"
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # tiny_models/

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
    _state.update(nodes=pack.nodes, cpu=cpu, torch=torch)
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
