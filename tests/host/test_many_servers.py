"""``tools/fatezero_run.py`` over several ComfyUI servers: a folder of clips spread over two
servers (one killed mid-run: its clip runs again on the other), servers the runner starts (all
stopped after SIGHUP), and one clip in segments on two servers, joined, against the same clip in
one batch on one server.

Each server runs on one CPU thread (``OMP_NUM_THREADS=1`` is passed on to it) with the tiny
checkpoint, as ``test_runner_host.py`` runs one.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sound_videos import has_audio, saved_audio, write_video_with_tone
from test_runner_host import API, REPO, RUNNER, answers, kill_leftover_server, write_video_file


@pytest.fixture(scope="module")
def two_servers(comfyui_path, tiny_checkpoint, tmp_path_factory):
    """Two headless servers on two local ports, each with its own folders (no shared files)."""
    import host_server

    servers = []
    try:
        for name in ("one", "two"):
            base = host_server.prepare_base_directory(tmp_path_factory.mktemp(f"base_{name}"), REPO)
            shutil.copyfile(tiny_checkpoint, base / "models" / "checkpoints" / tiny_checkpoint.name)
            server = host_server.ComfyServer(comfyui_path, base)
            server.checkpoint = tiny_checkpoint.name
            servers.append(server)
            server.start()
        yield servers
    finally:
        for server in servers:
            server.stop()


def runner_command(servers, video: Path, out: Path, *extra: str, workflow="style_watercolor", frames=2):
    cmd = [sys.executable, str(RUNNER), str(API / f"{workflow}.json"), "--video", str(video),
           "--out", str(out), "--steps", "2", "--frames", str(frames),
           "--set", "CheckpointLoaderSimple.ckpt_name=fatezero_tiny_sd15.ckpt",
           "--set", "FateZero_LoadVideoFrames.size=64", *extra]
    for server in servers:
        cmd += ["--server", server]
    return cmd


def clip_folder(folder: Path, count: int = 4) -> Path:
    folder.mkdir()
    for k in range(count):
        write_video_file(folder / f"clip_{k}.mp4", shade=4 * k)
    return folder


def test_a_folder_over_two_servers_survives_a_killed_server(two_servers, tmp_path):
    """Four clips over two servers; the second server is killed while it runs its second clip:
    that clip runs again on the first one, and every clip has its result."""
    first, second = two_servers
    out = tmp_path / "out"
    cmd = runner_command([first.url, second.url], clip_folder(tmp_path / "clips"), out)
    runner = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    seen, queued_on_second = [], 0
    try:
        for line in runner.stderr:
            seen.append(line)
            if f"@ {second.url} | queued as" in line:
                queued_on_second += 1
                if queued_on_second == 2:
                    second.process.kill()  # gone mid-run, without a word
                    break
        stdout, rest = runner.communicate(timeout=900)
    finally:
        runner.kill()
        runner.wait()
    err = "".join(seen) + rest
    assert queued_on_second == 2, err
    assert runner.returncode == 0, err
    assert f"{second.url} is gone" in err and "it goes to another server" in err
    for k in range(4):
        videos = list((out / f"clip_{k}").glob("*.mp4"))
        assert [v.name for v in videos] == [f"clip_{k}_style_watercolor_00001_.mp4"], err
    assert f"{first.url} ran " in err and f"{second.url} ran 1 job(s) (gone)" in err
    assert len([p for p in stdout.splitlines() if p.endswith(".mp4")]) == 4
    # the killed server is restarted for the tests that follow
    second.start()


def test_started_servers_all_stop_on_sighup(comfyui_path, tiny_checkpoint, tmp_path):
    """--comfyui with --gpus 2: two servers started side by side (one per GPU: CUDA_VISIBLE_DEVICES
    0 and 1, here on the CPU); SIGHUP mid-run stops both."""
    import host_server

    base = host_server.prepare_base_directory(tmp_path / "base", REPO)
    shutil.copyfile(tiny_checkpoint, base / "models" / "checkpoints" / tiny_checkpoint.name)
    port = host_server.free_port()
    while host_server.free_port() == port + 1 or answers(port + 1):
        port = host_server.free_port()
    cmd = runner_command([f"127.0.0.1:{port}"], clip_folder(tmp_path / "clips"), tmp_path / "out",
                         "--comfyui", comfyui_path, "--cpu", "--gpus", "2",
                         "--comfyui-args", f"--base-directory {base} --database-url sqlite:///:memory:")
    runner = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    seen = []
    try:
        queued = set()
        for line in runner.stderr:
            seen.append(line)
            if "| queued as" in line:
                queued.add(line.split(" @ ", 1)[1].split(" |", 1)[0])
                if len(queued) == 2:
                    break
        assert runner.poll() is None, "".join(seen)
        runner.send_signal(signal.SIGHUP)
        err = "".join(seen) + runner.communicate(timeout=180)[1]
    finally:
        runner.kill()
        runner.wait()
        if runner.returncode != 130:
            kill_leftover_server(port)
            kill_leftover_server(port + 1)
    assert runner.returncode == 130, err
    assert f"CUDA_VISIBLE_DEVICES=0 {sys.executable}" in err or "CUDA_VISIBLE_DEVICES=0 " in err
    assert "CUDA_VISIBLE_DEVICES=1 " in err
    for p in (port, port + 1):
        assert f"stopped the ComfyUI it started at http://127.0.0.1:{p}" in err
        assert not answers(p), f"the server the runner started on port {p} is still running"


def decoded_frames(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])])


def test_a_clip_in_two_segments_on_two_servers_equals_one_batch(two_servers, tmp_path):
    """32 frames, group_norm=frame, key rule 'first, mid, last': the segments, each with the
    clip's three anchors, joined, give the one-batch result (decoded frames: both videos are
    encoded from 8-bit frames, so they may differ by the codec's rounding of a few pixels), with
    the clip's sound once over the whole."""
    first, second = two_servers
    clip = write_video_with_tone(tmp_path / "long.mkv", frames=32, fps=8.0)
    settings = ("--set", "FateZero_DDIMInvert.group_norm=frame",
                "--set", "FateZero_DDIMInvert.key_frames=first, mid, last",
                "--set", "FateZero_DDIMInvert.st_min_channels=0")
    whole = subprocess.run(runner_command([first.url], clip, tmp_path / "one", *settings, frames=32),
                           capture_output=True, text=True, timeout=900, cwd=REPO)
    assert whole.returncode == 0, whole.stderr
    split = subprocess.run(runner_command([first.url, second.url], clip, tmp_path / "two", *settings,
                                          "--segments", "2", frames=32),
                           capture_output=True, text=True, timeout=900, cwd=REPO)
    assert split.returncode == 0, split.stderr
    assert f"[segment 1] @" in split.stderr and f"[segment 2] @" in split.stderr
    reference = next((tmp_path / "one").glob("*.mp4"))
    joined = list((tmp_path / "two").glob("*.mp4"))
    assert [p.name for p in joined] == [reference.name]  # named as today
    ours, theirs = decoded_frames(joined[0]).astype(float), decoded_frames(reference).astype(float)
    assert ours.shape == theirs.shape and ours.shape[0] == 32
    difference = np.abs(ours - theirs)
    print(f"joined vs one batch, decoded 0..255: max {difference.max():g}, mean {difference.mean():.4f}")
    assert difference.max() <= 2 and difference.mean() < 0.05
    assert has_audio(joined[0])
    duration, _, _ = saved_audio(joined[0])
    assert abs(duration - 32 / 8.0) < 0.1
    # At most 11 frames a segment: a server counts the frames first, then three segments of 10-11.
    by_size = subprocess.run(runner_command([first.url, second.url], clip, tmp_path / "three", *settings,
                                            "--segment-frames", "11", frames=32),
                             capture_output=True, text=True, timeout=900, cwd=REPO)
    assert by_size.returncode == 0, by_size.stderr
    assert "long.mkv | 32 frames: 3 segment(s) of at most 11" in by_size.stderr
    three = decoded_frames(next((tmp_path / "three").glob("*.mp4"))).astype(float)
    # Three segments run batches of other sizes, so float sums run in another order. On a calmed
    # model that leaves the latents within 6e-6 of one batch (test_segments.py); this checkpoint's
    # random UNet is chaotic in its input and grows that rounding over the steps, and the codec
    # spreads each flipped pixel over its block: measured mean 0.82 / 255, max 20.
    difference = np.abs(three - theirs)
    print(f"three segments vs one batch, decoded 0..255: max {difference.max():g}, mean {difference.mean():.4f}, "
          f"99.9th percentile {np.percentile(difference, 99.9):g}")
    assert three.shape == theirs.shape and difference.mean() < 2
