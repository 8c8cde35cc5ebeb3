"""Throughput of the headless runner over one vs two ComfyUI servers.

Run: ``COMFYUI_PATH=~/ComfyUI ~/ComfyUI/venv/bin/python benchmarks/many_servers.py`` (CPU, two
single-thread servers, four clips of 8 frames at 64 px: a few minutes). ``--gpu`` starts the
servers without ``--cpu``, one per visible GPU when there are several (``CUDA_VISIBLE_DEVICES``),
else both on the one GPU.

Each server is ``main.py`` with this pack and a seeded tiny SD1.5-topology checkpoint
(``tiny_models.checkpoint.write_tiny_sd15_checkpoint``) in a base directory of its own (nothing
shared but the pack), started before the clock runs and stopped after. The timed part is one
``tools/fatezero_run.py`` run of ``workflows/api/style_watercolor.json`` on a folder of
``--clips`` clips with ``--server`` given once or twice: upload, queue, progress, download, all
of it, after an untimed run of one clip on each server (the checkpoint loaded, the graph run once). Each server's CPU work runs on ``--threads`` threads (``OMP_NUM_THREADS`` and torch's own
count through ComfyUI's environment), so two servers use twice the cores of one: a machine with
fewer free cores than the servers' threads measures contention, not the runner; the script
refuses to report on a machine whose load average says so unless ``--force``.

Target: two servers do the clips >= 1.8x faster than one.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "tests" / "host"))
sys.path.insert(0, str(REPO))

import _host  # noqa: E402
import _report  # noqa: E402

RUNNER = REPO / "tools" / "fatezero_run.py"
WORKFLOW = REPO / "workflows" / "api" / "style_watercolor.json"
GOAL = 1.8


def write_clips(folder: Path, count: int, frames: int, seed: int) -> Path:
    """``count`` random clips; every timed run gets clips of its own ``seed``, so no server serves
    a node from its cache of an earlier run."""
    from video_writers import write_video
    import torch

    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    for k in range(count):
        write_video(folder / f"clip_{k}.mp4", torch.rand(frames, 72, 96, 3, generator=g), 8.0)
    return folder


class Server:
    """``main.py`` in a base directory of its own, on a free local port (``--cpu`` unless
    ``gpu``; ``CUDA_VISIBLE_DEVICES`` = ``device`` when given)."""

    def __init__(self, base: Path, gpu: bool, device: int | None):
        import host_server

        self.port = host_server.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(self.port),
                        "--disable-auto-launch", "--base-directory", str(base),
                        "--database-url", "sqlite:///:memory:", *([] if gpu else ["--cpu"])]
        self.env = dict(os.environ, **({} if device is None else {"CUDA_VISIBLE_DEVICES": str(device)}))
        self.log = open(base / "server.log", "wb")
        self.process = subprocess.Popen(self.command, cwd=_host.comfyui_path(), stdout=self.log,
                                        stderr=subprocess.STDOUT, env=self.env)

    def wait_up(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"ComfyUI exited ({self.process.returncode}); see {self.log.name}")
            try:
                urllib.request.urlopen(self.url + "/system_stats", timeout=5).close()
                return
            except OSError:
                time.sleep(0.5)
        raise SystemExit(f"ComfyUI did not answer at {self.url} within {timeout:g} s; see {self.log.name}")

    def stop(self) -> None:
        import host_server

        host_server.stop_process(self.process)
        self.log.close()


def start_servers(count: int, root: Path, checkpoint: Path, args) -> list[Server]:
    import host_server

    servers = []
    for i in range(count):
        base = host_server.prepare_base_directory(root / f"base_{i}", REPO)
        shutil.copyfile(checkpoint, base / "models" / "checkpoints" / checkpoint.name)
        device = i % args.gpus if args.gpu and args.gpus > 1 else None
        servers.append(Server(base, args.gpu, device))
    try:
        for server in servers:
            server.wait_up()
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers


def timed_run(servers, clips: Path, out: Path, checkpoint: str, args) -> float:
    cmd = [sys.executable, str(RUNNER), str(WORKFLOW), "--video", str(clips), "--out", str(out),
           "--steps", str(args.steps), "--frames", str(args.frames),
           "--set", f"CheckpointLoaderSimple.ckpt_name={checkpoint}",
           "--set", f"FateZero_LoadVideoFrames.size={args.size}"]
    for server in servers:
        cmd += ["--server", server.url]
    started = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"the runner failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per server (default 1)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per server count (median)")
    parser.add_argument("--gpu", action="store_true", help="servers on the GPU (no --cpu)")
    parser.add_argument("--gpus", type=int, default=1, help="with --gpu: GPUs to spread the servers over")
    parser.add_argument("--force", action="store_true", help="report even on a busy machine")
    args = parser.parse_args()
    _host.check_environment()
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    load = os.getloadavg()[0]
    # Quiet enough: the load leaves the two servers' threads their cores (under 1 on 2 cores).
    busy = not args.gpu and load >= max(1.0, (os.cpu_count() or 1) - 2 * args.threads + 1)
    if busy and not args.force:
        raise SystemExit(f"load average {load:.2f} on {os.cpu_count()} cores: two {args.threads}-thread servers "
                         "would share cores with other work; run on a quiet machine or pass --force")
    # This process only writes the checkpoint (on the CPU); the servers do the work.
    _host.setup(force_cpu=True, threads=1)
    from tiny_models.checkpoint import write_tiny_sd15_checkpoint

    root = Path(tempfile.mkdtemp(prefix="fatezero_many_servers_"))
    rows, times = [], {}
    try:
        checkpoint = root / "fatezero_tiny_sd15.ckpt"
        write_tiny_sd15_checkpoint(checkpoint)
        servers = start_servers(2, root, checkpoint, args)
        try:
            # Untimed: each server loads the checkpoint and runs the graph once (one clip each), so
            # neither count pays a first run the other does not.
            timed_run(servers, write_clips(root / "warm", 2, args.frames, seed=1000), root / "out_warm",
                      checkpoint.name, args)
            for count in (1, 2):
                runs = [timed_run(servers[:count], write_clips(root / f"clips_{count}_{r}", args.clips, args.frames,
                                                               seed=10 * count + r),
                                  root / f"out_{count}_{r}", checkpoint.name, args)
                        for r in range(args.repeats)]
                times[count] = _report.median(runs)
                rows.append([str(count), f"{times[count]:.1f}", f"{60 * args.clips / times[count]:.2f}",
                             f"{times[1] / times[count]:.2f}"])
        finally:
            for server in servers:
                server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    speedup = times[1] / times[2]
    print(_report.table(["servers", "wall s", "clips/min", "speed-up"], rows))
    ok = speedup >= GOAL
    print(f"target two servers vs one: {speedup:.2f}x (goal >= {GOAL}) {'ok' if ok else 'MISS'}"
          + (" (busy machine: contention, not the runner)" if busy else ""))
    name = "many_servers.gpu.json" if args.gpu else "many_servers.json"
    path = _report.write_json(name, {"args": vars(args), "machine": _host.machine(), "load_average": load,
                                     "busy": busy, "seconds": times, "speedup": speedup, "goal": GOAL})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
