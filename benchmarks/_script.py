"""The set-up every benchmark script repeats: its command line, child runs and the closing lines.

- :class:`Arguments`: ``--size``/``--frames``/``--steps`` with defaults per device (CPU, GPU);
  :func:`add_host_arguments` adds the host options.
- :func:`start_in_process`: a script that measures in its own process starts ComfyUI and says
  where and at which setting it runs.
- :func:`parent_or_child`, :func:`run_child`, :func:`measure_each_run`: a script that measures
  each setting in a fresh process (peaks never mix) runs itself with ``--child``.
- :func:`finish`: write ``benchmarks/results/<name>``, say where, and print the target lines last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import _host
import _report


class Setting(NamedTuple):
    gpu: bool
    size: int
    steps: int


class Arguments(argparse.ArgumentParser):
    """A benchmark's parser, first with ``--size``, ``--frames`` and ``--steps``.

    ``sizes`` and ``steps`` are (CPU, GPU) defaults, or ``steps`` one number for both; ``frames``
    a number, or a comma list (a string) for a script that runs several frame counts."""

    def __init__(self, doc: str, sizes: tuple[int, int] = (128, 512), steps=(3, 10),
                 steps_help: str = "DDIM steps", frames: int | str = 8):
        super().__init__(description=doc.split("\n")[0])
        self.sizes, self.steps = sizes, steps
        self.add_argument("--size", type=int, default=None,
                          help=f"frame side in px (CPU {sizes[0]}, GPU {sizes[1]})")
        if isinstance(frames, str):
            self.add_argument("--frames", default=frames, help="comma list of frame counts")
        else:
            self.add_argument("--frames", type=int, default=frames)
        if isinstance(steps, tuple):
            self.add_argument("--steps", type=int, default=None,
                              help=f"{steps_help} (CPU {steps[0]}, GPU {steps[1]})")
        else:
            self.add_argument("--steps", type=int, default=steps, help=steps_help)

    def setting(self, args) -> Setting:
        """The device (a GPU when ComfyUI, or else torch, has one) and its size and steps."""
        gpu = _host.on_gpu()
        steps = args.steps
        if isinstance(self.steps, tuple):
            steps = steps or self.steps[gpu]
        return Setting(gpu, args.size or self.sizes[gpu], steps)


def add_host_arguments(parser, metric_for: str | None = None) -> None:
    """``--threads`` and ``--host-attention`` (every script); ``--metric`` when a target is timed."""
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: auto)")
    parser.add_argument("--host-attention", choices=sorted(_host.HOST_ATTENTION_FLAGS), default="default",
                        help="ComfyUI's attention kernel for unfused layers and the plain baselines")
    if metric_for:
        parser.add_argument("--metric", choices=("auto", "wall", "cpu"), default="auto",
                            help=f"time for {metric_for}: wall clock, or process CPU seconds "
                                 "(auto: cpu when other processes oversubscribe the CPU)")


def host_child_args(args) -> list[str]:
    """The ``add_host_arguments`` options of ``args``, for a child process of the same script."""
    return ["--host-attention", args.host_attention] + (["--threads", str(args.threads)] if args.threads else [])



def start_in_process(parser: Arguments, args, what: str):
    """Start ComfyUI and this pack in this process and print where and how it runs (``what``
    follows the size, frames and steps). Returns ``(nodes, setting)``."""
    nodes = _host.setup(threads=args.threads, host_attention=args.host_attention)
    setting = parser.setting(args)
    print(_host.describe_run(f"{setting.size}x{setting.size} px, {args.frames} frames, "
                             f"{setting.steps} steps, {what}"), flush=True)
    return nodes, setting


def parent_or_child(parser: Arguments, child):
    """Parse the command line of a script that runs itself with ``--child`` per setting.

    In a child: print ``child(args)`` as the JSON line :func:`run_child` reads and return None.
    In the parent: check that this Python imports ComfyUI and return the arguments."""
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return None
    _host.check_environment()
    return args


def run_child(script: Path, args: list[str], timeout: float = 1800) -> dict:
    """Run ``script --child ARGS`` in a fresh interpreter (same Python, same environment) and
    return the JSON object it prints on its last stdout line."""
    cmd = [sys.executable, str(script), "--child", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise RuntimeError(f"child {' '.join(args)} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


class Measured(NamedTuple):
    args: argparse.Namespace
    setting: Setting
    results: list[dict]
    started: float


def measure_each_run(parser: Arguments, runs, default_run: str, child, script: Path, report):
    """The parent and child of a script that measures each of ``runs`` in a fresh process.

    Adds ``--runs``, the host options and the hidden ``--run``. In a child (``--run`` one of
    ``runs``): prints ``child(args)`` and returns None. In the parent: runs ``script --child`` for
    every run of ``args.runs`` at the setting's size and steps and ``args.frames``, calls
    ``report(result)`` after each, and returns :class:`Measured` (results in order)."""
    parser.add_argument("--runs", default=",".join(runs), help=f"comma list of {runs}")
    add_host_arguments(parser)
    parser.add_argument("--run", default=default_run, help=argparse.SUPPRESS)
    args = parent_or_child(parser, child)
    if args is None:
        return None
    setting = parser.setting(args)
    started = time.perf_counter()
    results = []
    for run in (r.strip() for r in args.runs.split(",") if r.strip()):
        child_args = ["--run", run, "--size", str(setting.size), "--frames", str(args.frames),
                      "--steps", str(setting.steps)] + host_child_args(args)
        results.append(run_child(script, child_args))
        report(results[-1])
    return Measured(args, setting, results, started)


def finish(name: str, payload: dict, args, started: float, lines, notes=()) -> None:
    """Write ``results/<name>`` (``payload`` plus ``script_seconds``), say so, print ``notes``,
    then the target lines: every script ends with them."""
    seconds = time.perf_counter() - started
    path = _report.write_json(name, {**payload, "script_seconds": seconds}, args.host_attention)
    print(f"wrote {path.relative_to(_report.ROOT)}; total {seconds:.0f} s")
    for line in (*notes, *lines):
        print(line)
