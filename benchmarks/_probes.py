"""Timing and memory probes of the benchmarks (no ComfyUI import at module level).

- :class:`StepTimer`: per-step wall and CPU time through the sampler's per-step callback;
- memory: resident set size and its peak (``VmHWM``, resettable through ``/proc/self/clear_refs``),
  ``malloc_trim``, the CUDA peak when a GPU is present, and the bytes of a folder.
"""

from __future__ import annotations

import gc
import os
import re
import time


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
