"""``tools/fatezero_run.py`` end to end against the headless ComfyUI with the tiny checkpoint.

The runner runs as a subprocess, as a user would run it: it uploads the clip through
``/upload/image``, queues a shipped API workflow (the checkpoint and frame size swapped for tiny
ones with ``--set``), follows the websocket, and downloads what the run wrote.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import torch

from video_writers import write_video

REPO = Path(__file__).resolve().parents[2]
RUNNER = REPO / "tools" / "fatezero_run.py"
API = REPO / "workflows" / "api"


def write_video_file(path: Path, shade: int = 0) -> Path:
    frames = torch.zeros(5, 40, 72, 3)
    for k in range(5):
        frames[k] = (25 * k + 30 + shade) / 255.0
        frames[k, 8:24, 6 + 6 * k:22 + 6 * k] = torch.tensor([0.2, 0.3, 0.9])
    write_video(path, frames, 10.0)
    return path


def run(server, workflow: str, video: Path, out: Path, *extra: str, timeout: float = 900):
    cmd = [sys.executable, str(RUNNER), str(API / f"{workflow}.json"), "--video", str(video),
           "--server", server.url, "--out", str(out), "--steps", "2", "--frames", "2",
           "--set", f"CheckpointLoaderSimple.ckpt_name={server.checkpoint}",
           "--set", "FateZero_LoadVideoFrames.size=64", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def check_video(path: Path, frames: int = 2, size: int = 64) -> None:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        decoded = list(container.decode(stream))
    assert len(decoded) == frames and (stream.width, stream.height) == (size, size)


def test_runner_edits_a_clip_with_progress_and_downloads(comfy_server, tmp_path):
    clip = write_video_file(tmp_path / "runner clip.mp4")
    out = tmp_path / "out"
    result = run(comfy_server, "style_watercolor", clip, out,
                 "--source", "a silver jeep driving down a curvy road in the countryside",
                 "--target", "watercolor painting of a silver jeep driving down a curvy road in the countryside")
    assert result.returncode == 0, (result.stderr, comfy_server.log_tail())
    assert (comfy_server.input_dir / "runner clip.mp4").read_bytes() == clip.read_bytes()
    err = result.stderr
    assert "runner clip.mp4 | FateZero Sample (#7) [" in err and "] 2/2" in err
    assert "FateZero DDIM Invert (capture attention) (#5)" in err
    videos = sorted(out.glob("*.mp4"))
    assert len(videos) == 1
    check_video(videos[0])
    previews = sorted((out / "previews").glob("*.png"))
    # the blend mask of each frame, from Preview Image (and from FateZero Sample's own node preview)
    assert len(previews) >= 2 and len(previews) % 2 == 0
    assert sorted(result.stdout.splitlines()) == sorted(str(p) for p in videos + previews)
    assert videos[0].name == "runner clip_style_watercolor_00001_.mp4"  # named after the clip


def test_runner_queues_a_folder(comfy_server, tmp_path):
    folder = tmp_path / "clips"
    folder.mkdir()
    write_video_file(folder / "bear_a.mp4", shade=3)
    write_video_file(folder / "bear_b.avi", shade=9)
    (folder / "readme.txt").write_text("not a clip")
    out = tmp_path / "out"
    result = run(comfy_server, "attribute_edit", folder, out)
    assert result.returncode == 0, (result.stderr, comfy_server.log_tail())
    for stem in ("bear_a", "bear_b"):
        videos = list((out / stem).glob("*.mp4"))
        assert len(videos) == 1, result.stderr
        check_video(videos[0])
        previews = list((out / stem / "previews").glob("*.png"))
        assert len(previews) >= 2 and len(previews) % 2 == 0


def test_runner_reports_an_execution_error_and_exits_1(comfy_server, tmp_path):
    clip = write_video_file(tmp_path / "runner_err.mp4", shade=20)
    result = run(comfy_server, "attribute_edit", clip, tmp_path / "out",
                 "--source", "a silver jeep on a road", "--target", "a red jeep on a road")
    assert result.returncode == 1
    assert "ComfyUI could not run the workflow" in result.stderr
    assert "(FateZero_EditSettings): FateZeroNodeError:" in result.stderr
    assert "blend word 'bear' is not in the prompt" in result.stderr
    assert not (tmp_path / "out").exists()


def test_runner_reports_a_refused_workflow_and_exits_1(comfy_server, tmp_path):
    clip = write_video_file(tmp_path / "runner_refused.mp4", shade=30)
    result = run(comfy_server, "style_watercolor", clip, tmp_path / "out",
                 "--set", "CheckpointLoaderSimple.ckpt_name=v1-5-pruned-emaonly.safetensors")
    assert result.returncode == 1
    assert "ComfyUI refused the workflow" in result.stderr
    assert "node 1 (CheckpointLoaderSimple): Value not in list: ckpt_name: 'v1-5-pruned-emaonly.safetensors'" in result.stderr


def test_runner_with_comfyui_starts_runs_and_stops_a_server(comfyui_path, tiny_checkpoint, tmp_path):
    """No server at --server: the runner starts ComfyUI from COMFYUI_PATH (run from the folder
    holding it, given by its relative name, --cpu, a test base directory through --comfyui-args), runs a folder of clips,
    names each result after its clip, and stops the server as Ctrl-C does (it empties its temp
    folder)."""
    import host_server

    base = host_server.prepare_base_directory(tmp_path / "base", REPO)
    shutil.copyfile(tiny_checkpoint, base / "models" / "checkpoints" / tiny_checkpoint.name)
    folder = tmp_path / "clips"
    folder.mkdir()
    write_video_file(folder / "bear_a.mp4", shade=5)
    write_video_file(folder / "bear b.avi", shade=11)
    port = host_server.free_port()
    out = tmp_path / "out"
    cmd = [sys.executable, str(RUNNER), str(API / "style_watercolor.json"), "--video", str(folder),
           "--server", f"127.0.0.1:{port}", "--comfyui", Path(comfyui_path).name, "--cpu",
           "--comfyui-args", f"--base-directory {base} --database-url sqlite:///:memory:",
           "--out", str(out), "--steps", "2", "--frames", "2",
           "--set", f"CheckpointLoaderSimple.ckpt_name={tiny_checkpoint.name}",
           "--set", "FateZero_LoadVideoFrames.size=64"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=Path(comfyui_path).parent)
    assert result.returncode == 0, result.stderr
    own = [Path(comfyui_path) / env / "bin" / "python" for env in ("venv", ".venv")]
    python = next((str(p) for p in own if p.is_file()), sys.executable)
    assert (f"starting ComfyUI: {python} main.py --listen 127.0.0.1 --port {port} "
            "--disable-auto-launch --cpu --base-directory") in result.stderr
    assert "ComfyUI is up" in result.stderr and "stopped the ComfyUI it started" in result.stderr
    for stem in ("bear_a", "bear b"):
        videos = list((out / stem).glob("*.mp4"))
        assert [v.name for v in videos] == [f"{stem}_style_watercolor_00001_.mp4"], result.stderr
        check_video(videos[0])
    assert sorted(p.name for p in (base / "output" / "fatezero").glob("*.mp4")) == [
        "bear b_style_watercolor_00001_.mp4", "bear_a_style_watercolor_00001_.mp4"]
    assert not answers(port), "the server the runner started is still running"
    assert not (base / "temp").exists()  # ComfyUI's own clean-up on Ctrl-C (main.py cleanup_temp) ran


def answers(port: int) -> bool:
    """Does a ComfyUI answer on ``port``?"""
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/system_stats", timeout=5)
        return True
    except (urllib.error.URLError, ConnectionError, OSError):
        return False


def kill_leftover_server(port: int) -> None:
    """Kill a ``main.py`` still listening on ``port`` (Linux), so a failing test leaks nothing."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"main.py" in args and f"--port\0{port}\0".encode() in b"\0".join(args) + b"\0":
            os.kill(int(cmdline.parent.name), signal.SIGKILL)


def test_a_closed_terminal_stops_the_comfyui_the_runner_started(comfyui_path, tiny_checkpoint, tmp_path):
    """SIGHUP to the runner mid-run: the server it started gets Ctrl-C (SIGINT), logs "Stopped
    server", empties its temp folder and frees the port."""
    import host_server

    base = host_server.prepare_base_directory(tmp_path / "base", REPO)
    shutil.copyfile(tiny_checkpoint, base / "models" / "checkpoints" / tiny_checkpoint.name)
    port = host_server.free_port()
    cmd = [sys.executable, str(RUNNER), str(API / "style_watercolor.json"),
           "--video", str(write_video_file(tmp_path / "hangup.mp4", shade=7)),
           "--server", f"127.0.0.1:{port}", "--comfyui", comfyui_path, "--cpu",
           "--comfyui-args", f"--base-directory {base} --database-url sqlite:///:memory:",
           "--out", str(tmp_path / "out"), "--steps", "2", "--frames", "2",
           "--set", f"CheckpointLoaderSimple.ckpt_name={tiny_checkpoint.name}",
           "--set", "FateZero_LoadVideoFrames.size=64"]
    runner = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        seen = []
        for line in runner.stderr:  # until the clip is queued on the started server
            seen.append(line)
            if "queued as" in line:
                break
        assert runner.poll() is None, "".join(seen)
        runner.send_signal(signal.SIGHUP)
        err = "".join(seen) + runner.communicate(timeout=120)[1]
    finally:
        runner.kill()
        runner.wait()
        if runner.returncode != 130:
            kill_leftover_server(port)
    assert runner.returncode == 130, err
    assert "stopped the ComfyUI it started" in err
    log = Path(err.split("the server's log is in ", 1)[1].split()[0])
    assert "Stopped server" in log.read_text(errors="replace")
    log.unlink()
    assert not (base / "temp").exists()
    assert not answers(port), "the server the runner started is still running"
