#!/usr/bin/env python3
"""Run a FateZero workflow (API format) on ComfyUI, headless.

    python tools/fatezero_run.py workflows/api/style_watercolor.json --comfyui ~/ComfyUI \\
        --video clip.mp4 \\
        --source "a silver jeep driving down a curvy road in the countryside" \\
        --target "watercolor painting of a silver jeep driving down a curvy road in the countryside"

With ``--comfyui DIR`` and no server answering at ``--server`` (default 127.0.0.1:8188), starts
ComfyUI from DIR headless (``main.py`` with DIR's own ``venv``/``.venv`` Python if it has one,
else this Python; ``--cpu`` if asked), waits for it, and stops it when the run ends, also on an
error, Ctrl-C, kill or a closed terminal. A server already answering is used only when its command
line has what ``--cpu``/``--comfyui-args`` ask for. Uploads the clip (``--video`` may also be a
folder: every video in it is queued), points the workflow's FateZero Load Video Frames node at it,
puts the prompts on FateZero Source Prompt and FateZero Edit Settings, names the saved files after the clip
(every ``filename_prefix`` becomes ``<folder>/<clip>_<workflow>``), queues the graph, shows a
progress bar from the server's websocket, and downloads every file the run wrote (videos,
previews) into ``--out``, never over a file already there (the new one is numbered:
``name_1.mp4``). Exits 0 when every clip succeeded, 1 with the server's error text when ComfyUI
refused or failed a run, 2 for problems found before anything was sent (a ComfyUI that would not
start included), 130 when interrupted (queued runs are cancelled).

Several servers (``--server`` repeated, ``--servers-file``, or ``--comfyui DIR --gpus N``, which
starts one per GPU): one job in flight per server, the clips queued over them (:class:`Pool`), each
uploaded to the server that runs it; a job whose server fails or stops answering runs again on
another. ``--segments K`` / ``--segment-frames N`` edit one clip in segments, each with the clip's
shared key frames (:func:`segment_graph`), joined on a server with the clip's sound
(:func:`join_graph`). Needs the ``websocket-client``
package (the client ComfyUI's own ``script_examples`` use); the rest is the standard library.
"""

from __future__ import annotations

import argparse
import itertools
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the pack: its torch-free file list
from fatezero_core.media_types import VIDEO_EXTENSIONS, is_video_file, natural_sort_key  # noqa: E402

try:
    import websocket  # websocket-client
except ImportError:  # main() says how to install it before anything is sent
    websocket = None

LOADER = "FateZero_LoadVideoFrames"
# Where --source and --target go: the new graph's prompt nodes, or the deprecated settings node.
SOURCE_NODES = ("FateZero_SourcePrompt", "FateZero_AttentionBlendSettings")
TARGET_NODES = ("FateZero_EditSettings", "FateZero_AttentionBlendSettings")
INVERT = "FateZero_DDIMInvert"
TRAIN = "FateZero_TuneAVideoTrain"
POLL_EVERY_S = 5.0
RECV_WAIT_S = 1.0  # longest wait for one websocket message before checking timeouts and polling
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "0.0.0.0"})
STOP_WAIT_S = 20.0


class RunnerError(Exception):
    """A problem to report and exit with (``code`` 1: from the server, 2: local)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


class ServerGone(RunnerError):
    """The server did not answer: with several servers its job goes to another one."""


# ------------------------------------------------------------------------------------------------
# HTTP
# ------------------------------------------------------------------------------------------------


class Client:
    def __init__(self, server: str, timeout: float = 60.0):
        if "://" not in server:
            server = "http://" + server
        parts = urllib.parse.urlsplit(server)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RunnerError(f"--server: cannot read '{server}'; use host:port or http://host:port", 2)
        self.base = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
        self.ws_base = ("wss" if parts.scheme == "https" else "ws") + self.base[len(parts.scheme):]
        self.timeout = timeout
        self.client_id = uuid.uuid4().hex

    def request(self, path: str, data: bytes | None = None, headers: dict | None = None,
                method: str | None = None, timeout: float | None = None):
        req = urllib.request.Request(self.base + path, data=data, headers=headers or {}, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise ServerGone(f"cannot reach ComfyUI at {self.base}: {reason}. Is the server running "
                              "(python main.py --listen ...) and is --server right?") from None

    def answers(self) -> bool:
        """True when a ComfyUI answers ``/system_stats`` at this address within 2 s."""
        try:
            status, _ = self.request("/system_stats", timeout=2.0)
        except RunnerError:
            return False
        return status == 200

    def server_argv(self) -> list[str] | None:
        """The command line of the server at this address (``argv`` in ComfyUI's /system_stats),
        or None when it does not say."""
        status, body = self.json("/system_stats")
        system = body.get("system") if status == 200 and isinstance(body, dict) else None
        argv = system.get("argv") if isinstance(system, dict) else None
        return [str(a) for a in argv] if isinstance(argv, list) else None

    def json(self, path: str, body=None, method: str | None = None):
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        status, raw = self.request(path, data, headers, method)
        try:
            return status, json.loads(raw) if raw else {}
        except json.JSONDecodeError:
            return status, {"error": raw.decode("utf-8", "replace")}

    def upload(self, path: Path, subfolder: str = "") -> str:
        """Upload ``path`` into the server's input folder (its ``subfolder``, which replaces a file
        of the same name there); returns the name the loader takes."""
        boundary = uuid.uuid4().hex
        name = path.name.replace('"', "_")
        fields = {"type": "input", **({"subfolder": subfolder, "overwrite": "true"} if subfolder else {})}
        body = b"".join([
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n".encode(),
            path.read_bytes(),
            *(f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}'.encode()
              for key, value in fields.items()),
            f"\r\n--{boundary}--\r\n".encode(),
        ])
        status, raw = self.request("/upload/image", body,
                                   {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        if status != 200:
            raise RunnerError(f"uploading {path} failed ({status}): {raw.decode('utf-8', 'replace')[:500]}")
        info = json.loads(raw)
        return f"{info['subfolder']}/{info['name']}" if info.get("subfolder") else info["name"]

    def download(self, item: dict, folder: Path) -> Path:
        """Save the output file ``item`` (an entry of /history outputs) in ``folder`` under its
        own name, numbered when that name is taken there (see :func:`write_new_file`)."""
        name = plain_file_name(item["filename"])
        query = urllib.parse.urlencode({"filename": name, "subfolder": item.get("subfolder", ""),
                                        "type": item.get("type", "output")})
        status, raw = self.request(f"/view?{query}")
        if status != 200:
            raise RunnerError(f"downloading {name} failed ({status})")
        return write_new_file(folder, name, raw)

    def open_websocket(self, stream=None):
        """A ``websocket.WebSocket`` on ``/ws`` for this client id (ComfyUI sends this client's
        progress there), or None when it cannot connect: then the runner polls /history."""
        try:
            ws = websocket.create_connection(f"{self.ws_base}/ws?clientId={self.client_id}", timeout=self.timeout)
        except (OSError, websocket.WebSocketException) as err:
            print(f"fatezero_run: no websocket ({err}); polling for the result instead",
                  file=stream or sys.stderr)
            return None
        ws.settimeout(RECV_WAIT_S)
        return ws


def plain_file_name(name) -> str:
    """``name`` when it is a plain file name, else a :class:`RunnerError`: a name the server
    gives for a saved file must not point anywhere else in ``--out`` (``..``, ``a/b``)."""
    if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\\0"):
        raise RunnerError(f"the server named an output file {name!r}, which is not a plain file name; "
                          "it was not saved")
    return name


def write_new_file(folder: Path, name: str, data: bytes) -> Path:
    """Write ``data`` as ``folder/name``; when that exists, as ``<stem>_1<suffix>``, ``_2``, ...
    Never overwrites: each name is claimed with an exclusive create, so two runs sharing ``--out``
    cannot write over each other either."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunnerError(f"cannot create the output folder {folder}: {err.strerror or err}") from None
    stem, suffix = Path(name).stem, Path(name).suffix
    for number in itertools.count():
        path = folder / (name if number == 0 else f"{stem}_{number}{suffix}")
        try:
            fh = open(path, "xb")
        except FileExistsError:
            continue
        except OSError as err:
            raise RunnerError(f"cannot save {path}: {err.strerror or err}") from None
        try:
            with fh:
                fh.write(data)
        except OSError as err:
            path.unlink(missing_ok=True)  # no half-written file left behind
            raise RunnerError(f"cannot save {path}: {err.strerror or err}") from None
        return path


# ------------------------------------------------------------------------------------------------
# Workflow editing
# ------------------------------------------------------------------------------------------------


def load_workflow(path: Path) -> dict:
    try:
        graph = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise RunnerError(f"cannot read the workflow {path}: {err}", 2) from None
    if isinstance(graph, dict) and "nodes" in graph and "links" in graph:
        raise RunnerError(f"{path} is a UI workflow; use its API-format twin (workflows/api/) or save "
                          "it with 'Export (API)' in ComfyUI", 2)
    if not isinstance(graph, dict) or not graph or not all(
            isinstance(n, dict) and "class_type" in n and isinstance(n.get("inputs"), dict)
            for n in graph.values()):
        raise RunnerError(f"{path} is not an API-format workflow ({{id: {{class_type, inputs}}}})", 2)
    return graph


def nodes_of(graph: dict, class_type: str) -> list[str]:
    return [i for i, n in graph.items() if n["class_type"] == class_type]


def one_node(graph: dict, class_type, why: str) -> str:
    """The one node of ``class_type`` (or of one of several types) in ``graph``."""
    kinds = (class_type,) if isinstance(class_type, str) else tuple(class_type)
    found = [node_id for kind in kinds for node_id in nodes_of(graph, kind)]
    if len(found) != 1:
        raise RunnerError(f"{why} needs exactly one {' or '.join(kinds)} node in the workflow, found {len(found)}", 2)
    return found[0]


def parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_sets(graph: dict, sets: list[str]) -> None:
    """``--set NODE.INPUT=VALUE``: NODE is a node id or a class_type (every node of that type);
    VALUE is read as JSON when it parses (numbers, true/false), else taken as text."""
    for item in sets:
        target, sep, value = item.partition("=")
        node, dot, input_name = target.rpartition(".")
        if not sep or not dot or not node or not input_name:
            raise RunnerError(f"--set {item!r}: write NODE.INPUT=VALUE, e.g. FateZero_Sample.cfg=6", 2)
        ids = [node] if node in graph else nodes_of(graph, node)
        if not ids:
            raise RunnerError(f"--set {item!r}: no node with id or class_type '{node}'", 2)
        for node_id in ids:
            graph[node_id]["inputs"][input_name] = parse_value(value)


def name_outputs(graph: dict, video_stem: str, workflow_stem: str) -> None:
    """Every save node's ``filename_prefix`` becomes ``<its folder>/<clip>_<workflow>`` (plus
    ``_<node id>`` when the workflow saves from several nodes), so each clip's results are told
    apart by name: ``fatezero/jeep_watercolor`` -> ``fatezero/bear_style_watercolor``."""
    savers = [i for i, n in graph.items() if isinstance(n["inputs"].get("filename_prefix"), str)]
    for node_id in savers:
        inputs = graph[node_id]["inputs"]
        folder = inputs["filename_prefix"].replace("\\", "/").rpartition("/")[0]
        name = f"{video_stem}_{workflow_stem}" + (f"_{node_id}" if len(savers) > 1 else "")
        inputs["filename_prefix"] = f"{folder}/{name}" if folder else name


def class_image_batches(graph: dict) -> list[str]:
    """Ids of the Empty Latent Image nodes whose batch becomes Tune-A-Video Train's class images
    (directly, or through a KSampler), as in ``workflows/shape_edit_train.json``."""
    found = []
    for train in nodes_of(graph, TRAIN):
        link = graph[train]["inputs"].get("class_latent")
        seen = set()
        while isinstance(link, list) and link and str(link[0]) in graph and str(link[0]) not in seen:
            node_id = str(link[0])
            seen.add(node_id)
            node = graph[node_id]
            if node["class_type"] == "EmptyLatentImage":
                found.append(node_id)
                break
            link = node["inputs"].get("latent_image")
    return found


def enough_class_images(graph: dict, frames: int, stream) -> None:
    """Each class step of the trainer uses as many class images as the clip has frames: a
    ``--frames`` above the class batch raises the batch to twice the frames (and says so)."""
    for node_id in class_image_batches(graph):
        inputs = graph[node_id]["inputs"]
        if isinstance(inputs.get("batch_size"), int) and inputs["batch_size"] < frames:
            inputs["batch_size"] = 2 * frames
            say(stream, f"--frames {frames}: the class images (node {node_id}) are now a batch of "
                        f"{2 * frames}, at least as many as the frames.")


def prepare(graph: dict, video_name: str, args, video_stem: str = "clip", stream=None) -> dict:
    graph = json.loads(json.dumps(graph))
    loader = one_node(graph, LOADER, "--video")
    graph[loader]["inputs"]["video"] = video_name
    name_outputs(graph, video_stem, args.workflow.stem)
    if args.frames is not None:
        graph[loader]["inputs"]["frame_load_cap"] = args.frames
        if args.frames > 0:
            enough_class_images(graph, args.frames, stream or sys.stderr)
    if args.source is not None:
        graph[one_node(graph, SOURCE_NODES, "--source")]["inputs"]["source_prompt"] = args.source
    if args.target is not None:
        graph[one_node(graph, TARGET_NODES, "--target")]["inputs"]["target_prompt"] = args.target
    if args.steps is not None:
        for node_id in nodes_of(graph, INVERT) or [one_node(graph, INVERT, "--steps")]:
            graph[node_id]["inputs"]["steps"] = args.steps
    apply_sets(graph, args.set or [])
    return graph


def find_videos(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        videos = sorted((p for p in path.iterdir()
                         if p.is_file() and is_video_file(p) and not p.name.startswith(".")),
                        key=lambda p: natural_sort_key(p.name))
        if not videos:
            raise RunnerError(f"no video files in {path} ({', '.join(sorted(VIDEO_EXTENSIONS))})", 2)
        return videos
    raise RunnerError(f"--video: {path} does not exist", 2)


# ------------------------------------------------------------------------------------------------
# A ComfyUI started for this run
# ------------------------------------------------------------------------------------------------


def comfyui_folder(path: Path) -> Path:
    """The ComfyUI folder ``--comfyui`` names, as an absolute path (relative to the current
    folder, ``~`` expanded), so the server's Python and ``main.py`` are found from any folder.
    A folder without ComfyUI's ``main.py`` is a one-line :class:`RunnerError` saying so."""
    folder = path.expanduser().resolve()
    if not folder.is_dir():
        raise RunnerError(f"--comfyui: there is no folder {folder}; give the folder that holds ComfyUI's main.py", 2)
    if not (folder / "main.py").is_file():
        inside = folder / "ComfyUI"
        hint = (f"did you mean {inside}?" if (inside / "main.py").is_file()
                else "give the folder that holds ComfyUI's main.py")
        raise RunnerError(f"--comfyui: {folder} is not a ComfyUI folder (it has no main.py); {hint}", 2)
    return folder


def comfyui_python(folder: Path) -> str:
    """The Python of the ComfyUI in ``folder``: its ``venv`` or ``.venv`` if it has one (the
    portable build's ``python_embeded`` too), else the Python running this script."""
    candidates = []
    for env in ("venv", ".venv"):
        candidates += [folder / env / "bin" / "python", folder / env / "Scripts" / "python.exe"]
    candidates.append(folder.parent / "python_embeded" / "python.exe")
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return sys.executable


def say(stream, text: str) -> None:
    """Print ``text`` on ``stream``; a terminal that is gone (SIGHUP) must not stop a clean-up."""
    try:
        print(text, file=stream, flush=True)
    except (OSError, ValueError):
        pass


def _interrupt_when_runner_dies():
    """A ``preexec_fn`` for the started ComfyUI on Linux: the kernel sends it SIGINT when this
    runner dies in a way it cannot handle itself (SIGKILL, a crash): ``prctl(PR_SET_PDEATHSIG)``,
    man 2 prctl. None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig, sigint = 1, int(signal.SIGINT)
    return lambda: prctl(pr_set_pdeathsig, sigint)


def option_groups(args: list[str]) -> list[list[str]]:
    """Command-line ``args`` as groups of one option and its values (``--x=1`` read as ``--x 1``)."""
    groups: list[list[str]] = []
    for arg in args:
        if arg.startswith("-") or not groups:
            name, eq, value = arg.partition("=") if arg.startswith("--") else (arg, "", "")
            groups.append([name, value] if eq else [name])
        else:
            groups[-1].append(arg)
    return groups


def missing_options(wanted: list[str], running: list[str]) -> list[str]:
    """The options (with their values) of ``wanted`` that the command line ``running`` lacks."""
    have = [arg for group in option_groups(running) for arg in group]
    missing = []
    for group in option_groups(wanted):
        n = len(group)
        if not any(have[i:i + n] == group for i in range(len(have) - n + 1)):
            missing += group
    return missing


class LocalServer:
    """``main.py`` of the ComfyUI in ``folder``, listening where ``--server`` points.

    Its output goes to a log file in the temp folder (named when it starts, removed after a
    clean run). It runs in its own process group, so Ctrl-C reaches only this script, which
    cancels the queued runs and then stops the server as Ctrl-C stops ComfyUI: SIGINT, on which
    its ``main.py`` shuts down and empties its temp folder (it has no SIGTERM handler). On Linux
    the kernel sends the same SIGINT if this script is killed outright.
    """

    def __init__(self, folder: Path, client: Client, cpu: bool = False, extra: tuple[str, ...] = (),
                 stream=None, gpu: int | None = None):
        parts = urllib.parse.urlsplit(client.base)
        folder = comfyui_folder(folder)
        if parts.hostname not in LOCAL_HOSTS:
            raise RunnerError(f"--comfyui starts ComfyUI on this machine, but --server points at "
                              f"{parts.hostname}; use 127.0.0.1:PORT", 2)
        self.folder, self.client, self.stream = folder, client, stream or sys.stderr
        self.python = comfyui_python(folder)
        self.command = [self.python, "main.py", "--listen", parts.hostname, "--port", str(parts.port or 80),
                        "--disable-auto-launch", *(["--cpu"] if cpu else []), *extra]
        self.process: subprocess.Popen | None = None
        self.log_path: Path | None = None
        # One GPU per server (--gpus): the server sees only its own card, as device 0.
        self.env = None if gpu is None else dict(os.environ, CUDA_VISIBLE_DEVICES=str(gpu))
        self.gpu = gpu

    def start(self, timeout: float) -> None:
        self.launch()
        self.wait_up(timeout)

    def launch(self) -> None:
        """Start the process; :meth:`wait_up` waits for it (several servers start side by side)."""
        log = tempfile.NamedTemporaryFile(prefix="fatezero_comfyui_", suffix=".log", delete=False)
        self.log_path = Path(log.name)
        gpu = "" if self.gpu is None else f"CUDA_VISIBLE_DEVICES={self.gpu} "
        print(f"fatezero_run: starting ComfyUI: {gpu}{shlex.join(self.command)} (in {self.folder}; log "
              f"{self.log_path})", file=self.stream)
        if os.name == "nt":
            group = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
        else:
            group = {"start_new_session": True, "preexec_fn": _interrupt_when_runner_dies()}
        with log:
            self.process = subprocess.Popen(self.command, cwd=self.folder, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=self.env, **group)

    def wait_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.client.answers():
            if self.process.poll() is not None:
                raise RunnerError(f"ComfyUI exited with code {self.process.returncode} while starting:\n"
                                  f"{self.log_tail()}", 2)
            if time.monotonic() > deadline:
                raise RunnerError(f"ComfyUI did not answer at {self.client.base} within {timeout:g} s "
                                  f"(--start-timeout):\n{self.log_tail()}", 2)
            time.sleep(0.5)
        print(f"fatezero_run: ComfyUI is up at {self.client.base}", file=self.stream)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:] if self.log_path else ""
        except OSError:
            return "(no log)"

    def stop(self, keep_log: bool = False) -> None:
        """Stop the server: SIGINT (Ctrl-C) to its process group, killed after ``STOP_WAIT_S``
        or on a second interrupt. The log is kept when ``keep_log``."""
        if self.process is not None and self.process.poll() is None:
            self._signal_group(signal.SIGINT if os.name != "nt" else None)
            why = ""
            try:
                self.process.wait(timeout=STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                why = f"it was still running {STOP_WAIT_S:g} s after Ctrl-C"
            except KeyboardInterrupt:
                why = "interrupted again while it stopped"
            if self.process.poll() is None:
                self._signal_group(signal.SIGKILL if os.name != "nt" else None, kill=True)
                self.process.wait(timeout=STOP_WAIT_S)
                say(self.stream, f"fatezero_run: killed the ComfyUI it started ({why})")
            else:
                say(self.stream, f"fatezero_run: stopped the ComfyUI it started at {self.client.base}")
        if self.log_path is not None and not keep_log:
            self.log_path.unlink(missing_ok=True)

    def _signal_group(self, signum, kill: bool = False) -> None:
        """``signum`` to the server's process group (POSIX); on Windows, where no Ctrl-C reaches
        another process group, terminate or kill the process."""
        if signum is None:
            if kill:
                self.process.kill()
            else:
                self.process.terminate()
            return
        try:
            os.killpg(self.process.pid, signum)  # its own session: the group id is its pid
        except ProcessLookupError:
            pass


def ensure_server(client: Client, args, stream) -> LocalServer | None:
    """Start ComfyUI from ``--comfyui`` unless one already answers at ``--server``."""
    if not args.comfyui:
        return None
    extra = shlex.split(args.comfyui_args or "")
    if client.answers():
        check_running_options(client, ["--cpu"] * args.cpu + extra)
        print(f"fatezero_run: using the ComfyUI already running at {client.base} (this run did not "
              "start it, so it is left running)", file=stream)
        return None
    server = LocalServer(args.comfyui, client, cpu=args.cpu, extra=tuple(extra), stream=stream)
    try:
        server.start(args.start_timeout)
    except BaseException:
        server.stop(keep_log=True)
        raise
    return server


def check_running_options(client: Client, wanted: list[str]) -> None:
    """Refuse a server this run did not start when ``--cpu``/``--comfyui-args`` ask for options
    its command line lacks: they cannot apply to it, and a run on it would silently differ."""
    if not wanted:
        return
    running = client.server_argv()
    if running is None:
        raise RunnerError(f"a ComfyUI this run did not start is running at {client.base} and does not "
                          "report its options, so --cpu/--comfyui-args cannot apply: stop it, run without "
                          "them, or pick a free port with --server", 2)
    missing = missing_options(wanted, running)
    if missing:
        raise RunnerError(f"a ComfyUI this run did not start is running at {client.base} without "
                          f"{shlex.join(missing)}: stop it, run without --cpu/--comfyui-args to use it as it "
                          "is, or pick a free port with --server", 2)


STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


def _interrupt_on_signal(signum, frame):
    raise KeyboardInterrupt  # so the started server is stopped by the same path as Ctrl-C


# ------------------------------------------------------------------------------------------------
# Errors and progress
# ------------------------------------------------------------------------------------------------


def refusal_text(body: dict, graph: dict) -> str:
    """The server's answer to a refused /prompt, as lines a person can act on."""
    lines = []
    error = body.get("error")
    if isinstance(error, dict):
        lines.append(": ".join(x for x in (error.get("message"), error.get("details")) if x))
    elif error:
        lines.append(str(error))
    for node_id, info in (body.get("node_errors") or {}).items():
        kind = info.get("class_type") or graph.get(node_id, {}).get("class_type", "?")
        for err in info.get("errors", []):
            text = ": ".join(x for x in (err.get("message"), err.get("details")) if x)
            lines.append(f"  node {node_id} ({kind}): {text}")
    return "\n".join(lines) or json.dumps(body)


def failure_text(entry: dict | None, data: dict | None, verbose: bool) -> str:
    """Text of an execution_error / execution_interrupted (from the websocket or /history)."""
    if data is None and entry:
        for kind, msg in entry.get("status", {}).get("messages", []):
            if kind in ("execution_error", "execution_interrupted"):
                data = dict(msg, _kind=kind)
    if not data:
        return "the run failed; the server gave no error message"
    if data.get("_kind") == "execution_interrupted":
        return f"interrupted at node {data.get('node_id')} ({data.get('node_type')})"
    text = (f"node {data.get('node_id')} ({data.get('node_type')}): "
            f"{data.get('exception_type', 'Error').rsplit('.', 1)[-1]}: {data.get('exception_message', '').strip()}")
    if verbose and data.get("traceback"):
        text += "\n" + "".join(data["traceback"])
    return text


class ProgressBar:
    """A text bar on stderr: redrawn in place on a terminal, a line per 10% otherwise."""

    def __init__(self, label: str, stream=None, width: int = 30, lines: bool = False):
        self.label, self.stream, self.width = label, stream or sys.stderr, width
        # ``lines``: several bars share the stream (one per server), so none redraws in place.
        self.tty = not lines and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.key = None
        self.last_decile = -1
        self.open = False

    def update(self, node: str, value: int, maximum: int) -> None:
        maximum = max(int(maximum), 1)
        value = min(max(int(value), 0), maximum)
        filled = round(self.width * value / maximum)
        line = (f"{self.label} | {node} [{'#' * filled}{'-' * (self.width - filled)}] "
                f"{value}/{maximum}")
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
            self.open = True
        else:
            if (node, maximum) != self.key:
                self.key, self.last_decile = (node, maximum), -1
            decile = 10 * value // maximum
            if decile != self.last_decile:
                self.last_decile = decile
                self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        self.finish()
        self.stream.write(f"{self.label} | {text}\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.open:
            self.stream.write("\n")
            self.stream.flush()
            self.open = False


# ------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------


class Job:
    def __init__(self, video: Path, graph: dict):
        self.video, self.graph = video, graph
        self.prompt_id: str | None = None
        self.error: str | None = None
        self.done = False
        self.failure: dict | None = None
        self.files: list[Path] = []


class Runner:
    def __init__(self, client: Client, out: Path, timeout: float | None, verbose: bool, stream=None):
        self.client, self.out, self.timeout, self.verbose = client, out, timeout, verbose
        self.stream = stream or sys.stderr
        self.ws = None  # a websocket.WebSocket while progress comes from the server
        self.events: dict[str, dict] = {}  # prompt_id -> {"done": bool, "failure": data}

    def node_label(self, graph: dict, node_id) -> str:
        node = graph.get(str(node_id), {})
        title = node.get("_meta", {}).get("title") or node.get("class_type") or "?"
        return f"{title} (#{node_id})"

    def submit(self, job: Job) -> None:
        status, body = self.client.json("/prompt", {"prompt": job.graph, "client_id": self.client.client_id})
        if status != 200 or "prompt_id" not in body:
            job.error = "ComfyUI refused the workflow:\n" + refusal_text(body, job.graph)
            job.done = True
            return
        job.prompt_id = body["prompt_id"]

    def handle(self, message: str, bars: dict[str, ProgressBar], graphs: dict[str, dict]) -> None:
        try:
            msg = json.loads(message)
        except json.JSONDecodeError:
            return
        kind, data = msg.get("type"), msg.get("data") or {}
        prompt_id = data.get("prompt_id")
        if prompt_id not in graphs:
            return
        state = self.events.setdefault(prompt_id, {"done": False, "failure": None})
        bar = bars[prompt_id]
        if kind == "progress":
            bar.update(self.node_label(graphs[prompt_id], data.get("node")), data.get("value", 0), data.get("max", 1))
        elif kind == "executing" and data.get("node") is None:
            state["done"] = True
        elif kind == "execution_success":
            state["done"] = True
        elif kind in ("execution_error", "execution_interrupted"):
            state["failure"] = dict(data, _kind=kind)
            state["done"] = True

    def wait(self, job: Job, bars: dict, graphs: dict) -> dict:
        """Wait for ``job`` to finish; returns its /history entry."""
        deadline = None if not self.timeout else time.monotonic() + self.timeout
        next_poll = time.monotonic() + POLL_EVERY_S
        bar = bars[job.prompt_id]
        while True:
            state = self.events.get(job.prompt_id, {})
            if state.get("done"):
                entry = self.history(job.prompt_id, wait=10.0)
                if entry is not None:
                    return entry
            if deadline is not None and time.monotonic() > deadline:
                raise RunnerError(f"{job.video.name}: no result within {self.timeout:g} s (prompt {job.prompt_id})")
            if self.ws is not None:
                message = self.receive(bar)
                if message is not None:
                    self.handle(message, bars, graphs)
            else:
                time.sleep(0.5)
            if time.monotonic() >= next_poll:
                next_poll = time.monotonic() + POLL_EVERY_S
                entry = self.history(job.prompt_id)
                if entry is not None:
                    return entry

    def receive(self, bar: ProgressBar) -> str | None:
        """The next text message within ``RECV_WAIT_S``, else None. Binary messages (ComfyUI's
        previews) are skipped; a closed or broken connection switches to polling."""
        try:
            opcode, data = self.ws.recv_data()
        except websocket.WebSocketTimeoutException:
            return None
        except (OSError, websocket.WebSocketException) as err:
            reason = str(err) or type(err).__name__
        else:
            if opcode == websocket.ABNF.OPCODE_TEXT:
                return data.decode("utf-8") if isinstance(data, bytes) else data
            if opcode != websocket.ABNF.OPCODE_CLOSE:
                return None
            reason = "the server closed it"
        bar.message(f"websocket lost ({reason}); polling instead")
        self.ws.shutdown()
        self.ws = None
        return None

    def history(self, prompt_id: str, wait: float = 0.0) -> dict | None:
        end = time.monotonic() + wait
        while True:
            status, body = self.client.json(f"/history/{prompt_id}")
            entry = body.get(prompt_id) if status == 200 else None
            if entry and entry.get("status", {}).get("completed") is not None:
                return entry
            if entry and entry.get("status", {}).get("status_str") in ("success", "error"):
                return entry
            if time.monotonic() >= end:
                return None
            time.sleep(0.25)

    def collect(self, job: Job, entry: dict, subfolder: str, bar: ProgressBar) -> None:
        """Download every file of ``entry`` into ``--out``; a file that cannot be saved is
        reported in ``job.error`` and the others are still saved."""
        target = self.out / subfolder if subfolder else self.out
        problems = []
        for outputs in entry.get("outputs", {}).values():
            for items in outputs.values():
                if not isinstance(items, list):
                    continue
                for item in items:
                    if isinstance(item, dict) and item.get("filename"):
                        folder = target / "previews" if item.get("type") == "temp" else target
                        try:
                            path = self.client.download(item, folder)
                        except RunnerError as err:
                            problems.append(str(err))
                            continue
                        job.files.append(path)
                        if path.name != item["filename"]:
                            bar.message(f"{folder / item['filename']} already exists: saved as {path.name}")
        if problems:
            job.error = "\n".join(problems)

    def run(self, jobs: list[Job]) -> int:
        self.ws = self.client.open_websocket(self.stream)
        bars = {}
        graphs = {}
        try:
            for job in jobs:
                label = job.video.name
                self.submit(job)
                bar = ProgressBar(label, self.stream)
                if job.error:
                    bar.message(job.error)
                    continue
                bars[job.prompt_id], graphs[job.prompt_id] = bar, job.graph
                bar.message(f"queued as {job.prompt_id}")
            for job in jobs:
                if job.error:
                    continue
                bar = bars[job.prompt_id]
                entry = self.wait(job, bars, graphs)
                job.done = True
                bar.finish()
                status = entry.get("status", {}).get("status_str")
                if status != "success":
                    failure = self.events.get(job.prompt_id, {}).get("failure")
                    job.error = "ComfyUI could not run the workflow: " + failure_text(entry, failure, self.verbose)
                    bar.message(job.error)
                    continue
                self.collect(job, entry, job.video.stem if len(jobs) > 1 else "", bar)
                for path in job.files:
                    print(path, file=sys.stdout)
                if job.error:
                    bar.message(job.error)
                bar.message(f"done: {len(job.files)} file(s) in {self.out}")
        except KeyboardInterrupt:
            pending = [j.prompt_id for j in jobs if j.prompt_id and not j.done]
            if pending:
                self.client.json("/queue", {"delete": pending})
                self.client.json("/interrupt", {})
            say(self.stream, "fatezero_run: interrupted; queued runs cancelled")
            return 130
        finally:
            if self.ws is not None:
                self.ws.close(timeout=RECV_WAIT_S)
        failed = [j for j in jobs if j.error]
        return 1 if failed else 0


# ------------------------------------------------------------------------------------------------
# Several servers: a queue of clips (and segments of clips), one job in flight per server
# ------------------------------------------------------------------------------------------------

SEGMENT_FOLDER = "fatezero_segments"  # where a segment's frames are saved on its server
SAVERS = frozenset({"SaveVideo", "SaveImage", "PreviewImage", "SaveAnimatedWEBP", "SaveAnimatedPNG",
                    "SaveLatent", "SaveAudio", "PreviewAudio"})
WAIT_STEP_S = 0.5  # how often the main thread wakes to notice Ctrl-C and the end


def read_servers(args) -> list[str]:
    """The addresses of ``--server`` (repeatable) and ``--servers-file`` (one a line, ``#``
    comments), in order, without repeats; with ``--gpus N`` the one address and the next N-1
    ports."""
    servers = list(args.server or [])
    if args.servers_file:
        try:
            text = args.servers_file.read_text(encoding="utf-8")
        except OSError as err:
            raise RunnerError(f"--servers-file: cannot read {args.servers_file}: {err.strerror or err}", 2) from None
        servers += [line.split("#", 1)[0].strip() for line in text.splitlines() if line.split("#", 1)[0].strip()]
    servers = list(dict.fromkeys(servers or ["127.0.0.1:8188"]))
    if args.gpus:
        if len(servers) == 1:
            base = Client(servers[0])
            parts = urllib.parse.urlsplit(base.base)
            port = parts.port or 8188
            servers = [f"{parts.hostname}:{port + i}" for i in range(args.gpus)]
        elif len(servers) != args.gpus:
            raise RunnerError(f"--gpus {args.gpus} with {len(servers)} --server addresses: give one address "
                              "(the servers take its port and the next ones) or one address per GPU", 2)
    return servers


def start_servers(clients: list[Client], args, stream) -> list[LocalServer]:
    """Start ComfyUI from ``--comfyui`` at every address where none answers (side by side: all
    launched, then waited for), server i on GPU i with ``--gpus``. On any failure the ones
    started are stopped before the error goes on."""
    if not args.comfyui:
        return []
    extra = shlex.split(args.comfyui_args or "")
    started: list[LocalServer] = []
    try:
        for i, client in enumerate(clients):
            if client.answers():
                check_running_options(client, ["--cpu"] * args.cpu + extra)
                say(stream, f"fatezero_run: using the ComfyUI already running at {client.base} (this run did "
                            "not start it, so it is left running)")
                continue
            server = LocalServer(args.comfyui, client, cpu=args.cpu, extra=tuple(extra), stream=stream,
                                 gpu=i if args.gpus else None)
            started.append(server)
            server.launch()
        for server in started:
            server.wait_up(args.start_timeout)
    except BaseException:
        for server in started:
            server.stop(keep_log=True)
        raise
    return started


def segment_graph(graph: dict, index: int, count: int, tag: str) -> dict:
    """The prepared ``graph`` for segment ``index`` of ``count``: Load Video Frames loads the
    segment with the clip's shared key frames of DDIM Invert's rule (``segments``,
    ``segment_index``, ``anchor_frames``), DDIM Invert places its rule on them
    (``frame_positions``), and instead of the workflow's outputs the frames going into Create Video,
    less the anchor frames (core Image From Batch with the loader's ``span_start``/``span_frames``),
    are saved as PNG images (lossless: the clip is encoded once, after the join)."""
    graph = json.loads(json.dumps(graph))
    loader = one_node(graph, LOADER, "--segments")
    inverts = nodes_of(graph, INVERT)
    rules = {json.dumps(graph[i]["inputs"].get("key_frames")) for i in inverts}
    if len(rules) != 1:
        raise RunnerError(f"--segments needs a FateZero DDIM Invert node; found {len(inverts)} with "
                          f"{len(rules)} key rules", 2)
    rule = graph[inverts[0]]["inputs"].get("key_frames")
    if not isinstance(rule, str) or rule == "auto":
        raise RunnerError("--segments loads the clip's shared key frames with every segment, so the key rule must "
                          "be named: add e.g. --set FateZero_DDIMInvert.key_frames=anchors/16 (or mid, or "
                          "'first, mid, last'); Tune-A-Video models: their own rule", 2)
    graph[loader]["inputs"].update(segments=count, segment_index=index, anchor_frames=rule)
    for node_id in inverts:
        graph[node_id]["inputs"]["frame_positions"] = [loader, 4]
    videos = nodes_of(graph, "CreateVideo")
    if len(videos) != 1:
        raise RunnerError(f"--segments joins the segments into one video: the workflow needs exactly one Create "
                          f"Video node, found {len(videos)}", 2)
    images = graph[videos[0]]["inputs"].get("images")
    for node_id in [i for i, n in graph.items() if n["class_type"] in SAVERS or "filename_prefix" in n["inputs"]]:
        del graph[node_id]
    graph["fz_span"] = {"class_type": "ImageFromBatch", "_meta": {"title": "segment frames"},
                        "inputs": {"image": images, "batch_index": [loader, 5], "length": [loader, 6]}}
    graph["fz_save"] = {"class_type": "SaveImage", "_meta": {"title": "segment"},
                        "inputs": {"images": ["fz_span", 0],
                                   "filename_prefix": f"{SEGMENT_FOLDER}/{tag}_{index:03d}"}}
    return graph


def join_graph(graph: dict, frames_folder: str, video_name: str) -> dict:
    """A graph that encodes the joined frames in ``frames_folder`` (an input sub-folder) as the
    workflow's video, with the fps and the sound of the whole clip ``video_name`` (its own
    selection, loaded at 8 px: only its rate and sound are used)."""
    loader = graph[one_node(graph, LOADER, "--segments")]["inputs"]
    video_node = nodes_of(graph, "CreateVideo")[0]
    savers = [i for i, n in graph.items() if n["class_type"] == "SaveVideo"
              and n["inputs"].get("video") == [video_node, 0]]
    save = graph[savers[0]]["inputs"] if savers else {"filename_prefix": "fatezero/clip", "format": "auto",
                                                      "codec": "auto"}
    selection = {k: loader[k] for k in ("frame_load_cap", "skip_first_frames", "select_every_nth", "sequence_fps")
                 if k in loader}
    return {
        "1": {"class_type": LOADER, "_meta": {"title": "joined segments"},
              "inputs": {"video": frames_folder + "/", "frame_load_cap": 0, "skip_first_frames": 0,
                         "select_every_nth": 1, "size": 512, "resize_mode": "none"}},
        "2": {"class_type": LOADER, "_meta": {"title": "clip sound"},
              "inputs": {**selection, "video": video_name, "size": 8, "resize_mode": "crop"}},
        "3": {"class_type": "CreateVideo", "inputs": {"images": ["1", 0], "fps": ["2", 2], "audio": ["2", 3]}},
        "4": {"class_type": "SaveVideo", "inputs": {"video": ["3", 0], "filename_prefix": save["filename_prefix"],
                                                    "format": save.get("format", "auto"),
                                                    "codec": save.get("codec", "auto")}},
    }


def count_graph(graph: dict) -> dict:
    """A graph that reports how many frames the workflow's Load Video Frames selects from its clip
    (loaded at 8 px; core Preview Any shows the count), for ``--segment-frames``."""
    loader = graph[one_node(graph, LOADER, "--segment-frames")]["inputs"]
    inputs = {k: v for k, v in loader.items() if k not in ("segments", "segment_index", "anchor_frames")}
    return {"1": {"class_type": LOADER, "_meta": {"title": "frame count"},
                  "inputs": {**inputs, "size": 8, "resize_mode": "crop"}},
            "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 1]}}}


def counted_frames(entry: dict) -> int:
    """The frame count :func:`count_graph` reported, from its /history entry."""
    for outputs in entry.get("outputs", {}).values():
        for text in outputs.get("text", []) if isinstance(outputs, dict) else []:
            if str(text).strip().isdigit():
                return int(str(text).strip())
    raise RunnerError("the server did not report the clip's frame count (core Preview Any missing?)")


class Task:
    """A clip (``segment`` None), one segment of a clip, the join of a clip's segments, or the
    count of a clip's frames that decides its segments (``--segment-frames``)."""

    def __init__(self, video: Path, segment: int | None = None, join: bool = False, count: bool = False):
        self.video, self.segment, self.join, self.count = video, segment, join, count
        self.tried: set[str] = set()  # servers that failed it
        self.error: str | None = None
        self.files: list[Path] = []
        self.server: str | None = None  # the server that ran it

    @property
    def label(self) -> str:
        if self.join:
            return f"{self.video.name} (join)"
        if self.count:
            return f"{self.video.name} (frame count)"
        return self.video.name if self.segment is None else f"{self.video.name} [segment {self.segment + 1}]"


class Worker:
    """One server: its own client id and websocket, the clips uploaded to it, one job at a time."""

    def __init__(self, address: str, client: Client, pool: "Pool"):
        self.address, self.client, self.pool = address, client, pool
        self.runner = Runner(client, pool.out, pool.timeout, pool.verbose, pool.stream)
        self.uploads: dict[Path, str] = {}
        self.alive = True
        self.prompt_id: str | None = None
        self.ran = 0

    def upload(self, video: Path) -> str:
        if video not in self.uploads:
            self.uploads[video] = self.client.upload(video)
        return self.uploads[video]

    def loop(self) -> None:
        try:
            self._loop()
        finally:
            if self.runner.ws is not None:
                try:
                    self.runner.ws.close(timeout=RECV_WAIT_S)
                except (OSError, websocket.WebSocketException):
                    pass  # a server that is gone cannot be told goodbye
                self.runner.ws = None

    def _loop(self) -> None:
        pool = self.pool
        while self.alive and not pool.stopping:
            task = pool.take(self)
            if task is None:
                return
            try:
                entry_error = self.run_task(task)
            except ServerGone as err:
                self.alive = False
                pool.failed_on(self, task, f"{self.address} is gone ({err})", server_gone=True)
                return
            except RunnerError as err:
                pool.finish(task, str(err))
                continue
            except Exception as err:  # a bug must not leave the pool waiting for this task
                pool.finish(task, f"{type(err).__name__}: {err}")
                continue
            if entry_error is None:
                self.ran += 1
                pool.finish(task, None, self.address)
            else:
                text, retry = entry_error
                if retry:
                    pool.failed_on(self, task, text)
                else:
                    pool.finish(task, text)

    def run_task(self, task: Task):
        """Run ``task`` here; returns None on success, else ``(error text, worth retrying elsewhere)``."""
        pool = self.pool
        bar = ProgressBar(f"{task.label} @ {self.address}", pool.stream, lines=True)
        name = self.upload(task.video)
        if task.join:
            graph = pool.join_here(self, task, name)
        elif task.count:
            graph = count_graph(prepare(pool.graph, name, pool.args, task.video.stem))
        else:
            graph = prepare(pool.graph, name, pool.args, task.video.stem)
            if task.segment is not None:
                graph = segment_graph(graph, task.segment, pool.segments_of[task.video], pool.tags[task.video])
        job = Job(task.video, graph)
        if self.runner.ws is None:
            self.runner.ws = self.client.open_websocket(pool.stream)
        self.runner.submit(job)
        if job.error:
            bar.message(job.error)
            return job.error, True  # a server may lack a model or node another one has
        self.prompt_id = job.prompt_id
        bar.message(f"queued as {job.prompt_id}")
        try:
            entry = self.runner.wait(job, {job.prompt_id: bar}, {job.prompt_id: graph})
        except RunnerError as err:
            if isinstance(err, ServerGone):
                raise
            self.client.json("/interrupt", {"prompt_id": job.prompt_id})
            return str(err), True
        finally:
            self.prompt_id = None
        bar.finish()
        if entry.get("status", {}).get("status_str") != "success":
            failure = self.runner.events.get(job.prompt_id, {}).get("failure")
            text = "ComfyUI could not run the workflow: " + failure_text(entry, failure, pool.verbose)
            bar.message(text)
            # A FateZero node's own error says what to change in the inputs: every server says the same.
            user_error = (failure or {}).get("exception_type", "").endswith("FateZeroNodeError")
            return text, not user_error
        if task.segment is not None:
            pool.keep_segment(self, task, entry)
            bar.message("done")
            return None
        if task.count:
            pool.add_segments(task.video, counted_frames(entry))
            return None
        subfolder = task.video.stem if pool.many_clips else ""
        self.runner.collect(job, entry, subfolder, bar)
        task.files = job.files
        with pool.lock:
            for path in job.files:
                print(path, file=sys.stdout, flush=True)
        if job.error:
            bar.message(job.error)
            return job.error, False
        bar.message(f"done: {len(job.files)} file(s) in {pool.out}")
        return None


class Pool:
    """Tasks over workers: a worker takes the first waiting task it has not failed; a task that
    fails on a server (or whose server is gone) waits for another server; a clip's join is
    queued once all its segments are done."""

    def __init__(self, addresses: list[str], clients: list[Client], graph: dict, args, stream):
        self.graph, self.args, self.stream = graph, args, stream
        self.out, self.timeout, self.verbose = args.out, args.timeout or None, args.verbose
        self.segment_mode = bool(args.segments or args.segment_frames)
        self.segments_of: dict[Path, int] = {}
        self.lock = threading.Condition()
        self.workers = [Worker(a, c, self) for a, c in zip(addresses, clients)]
        self.waiting: list[Task] = []
        self.running = 0
        self.tasks: list[Task] = []
        self.stopping = False
        self.tags: dict[Path, str] = {}
        self.segment_files: dict[Path, dict[int, list[Path]]] = {}
        self.scratch = Path(tempfile.mkdtemp(prefix="fatezero_segments_"))
        self.many_clips = False

    # -- the queue (every method below holds the lock) --

    def take(self, worker: Worker) -> Task | None:
        with self.lock:
            while not self.stopping:
                for task in self.waiting:
                    if worker.address not in task.tried:
                        self.waiting.remove(task)
                        self.running += 1
                        return task
                if not self.waiting and self.running == 0:
                    return None
                self.lock.wait(WAIT_STEP_S)
            return None

    def finish(self, task: Task, error: str | None, server: str | None = None) -> None:
        with self.lock:
            if self.stopping:  # interrupted: the servers going away are no news
                self.running -= 1
                return
            task.error, task.server = error, server
            self.running -= 1
            if error is not None:
                say(self.stream, f"{task.label} | failed: {error}")
            elif task.segment is not None and all(
                    t.error is None and t.server for t in self.tasks if t.video == task.video and t.segment is not None):
                join = Task(task.video, join=True)
                self.tasks.append(join)
                self.waiting.append(join)
            self.lock.notify_all()

    def failed_on(self, worker: Worker, task: Task, why: str, server_gone: bool = False) -> None:
        with self.lock:
            if self.stopping:
                self.running -= 1
                return
            task.tried.add(worker.address)
            self.running -= 1
            left = [w.address for w in self.workers if w.alive and w.address not in task.tried]
            if left:
                say(self.stream, f"{task.label} | {why}; it goes to another server")
                self.waiting.append(task)
            else:
                task.error = (f"no server left to run it: {why}" if server_gone or not any(w.alive for w in self.workers)
                              else f"it failed on every server ({', '.join(sorted(task.tried))}); the last: {why}")
                say(self.stream, f"{task.label} | failed: {task.error}")
            self.lock.notify_all()

    def fail_stranded(self) -> None:
        """Tasks that wait while no live server may take them get their final error."""
        with self.lock:
            for task in list(self.waiting):
                if not any(w.alive and w.address not in task.tried for w in self.workers):
                    self.waiting.remove(task)
                    task.error = task.error or "no server left to run it (every server is gone or failed it)"
                    say(self.stream, f"{task.label} | failed: {task.error}")

    # -- segments --

    def add_segments(self, video: Path, frames: int) -> None:
        """Queue the segments of ``video`` once its frame count is known (``--segment-frames``)."""
        count = max(1, -(-frames // self.args.segment_frames))
        with self.lock:
            self.segments_of[video] = count
            segments = [Task(video, segment) for segment in range(count)]
            self.tasks += segments
            self.waiting += segments
            self.lock.notify_all()
        say(self.stream, f"{video.name} | {frames} frames: {count} segment(s) of at most {self.args.segment_frames}")

    def keep_segment(self, worker: Worker, task: Task, entry: dict) -> None:
        """Download the segment's frames into the scratch folder, in frame order."""
        folder = self.scratch / self.tags[task.video] / f"{task.segment:03d}"
        shutil.rmtree(folder, ignore_errors=True)
        files = []
        for outputs in entry.get("outputs", {}).values():
            for item in outputs.get("images", []) if isinstance(outputs, dict) else []:
                if isinstance(item, dict) and item.get("type") == "output" and item.get("filename"):
                    files.append(worker.client.download(item, folder))
        if not files:
            raise RunnerError(f"{task.label}: the server saved no frames for the segment")
        with self.lock:
            self.segment_files.setdefault(task.video, {})[task.segment] = files

    def join_here(self, worker: Worker, task: Task, video_name: str) -> dict:
        """Upload every segment's frames to ``worker`` as one numbered sequence; the join graph."""
        subfolder = f"fatezero_join_{self.tags[task.video]}"
        parts = self.segment_files[task.video]
        for segment in range(self.segments_of[task.video]):
            for i, path in enumerate(parts[segment]):
                named = path.with_name(f"s{segment:03d}_{i:06d}{path.suffix}")
                if path != named:
                    path.rename(named)
                    parts[segment][i] = named
                worker.client.upload(named, subfolder)
        graph = prepare(self.graph, video_name, self.args, task.video.stem)
        return join_graph(graph, subfolder, video_name)

    # -- running --

    def run(self, videos: list[Path]) -> int:
        self.many_clips = len(videos) > 1
        for video in videos:
            self.tags[video] = f"{video.stem}_{uuid.uuid4().hex[:8]}".replace("/", "_")
            if self.args.segment_frames:
                self.tasks.append(Task(video, count=True))
            elif self.segments_of.setdefault(video, self.args.segments or 0):
                self.tasks += [Task(video, segment) for segment in range(self.args.segments)]
            else:
                self.tasks.append(Task(video))
        self.waiting = list(self.tasks)
        threads = [threading.Thread(target=w.loop, name=f"server {w.address}", daemon=True) for w in self.workers]
        try:
            for thread in threads:
                thread.start()
            while any(t.is_alive() for t in threads):
                for thread in threads:
                    thread.join(WAIT_STEP_S)
                self.fail_stranded()
        except KeyboardInterrupt:
            self.cancel()
            say(self.stream, "fatezero_run: interrupted; the runs in flight were cancelled")
            return 130
        finally:
            shutil.rmtree(self.scratch, ignore_errors=True)
        self.fail_stranded()
        for worker in self.workers:
            say(self.stream, f"fatezero_run: {worker.address} ran {worker.ran} job(s)"
                             + ("" if worker.alive else " (gone)"))
        # A clip's result is its own task's, or with --segments its join's.
        done = [t for t in self.tasks if t.segment is None and not t.count and t.join == self.segment_mode and t.server
                and not t.error]
        return 0 if len(done) == len(videos) and not any(t.error for t in self.tasks) else 1

    def cancel(self) -> None:
        with self.lock:
            self.stopping = True
            self.lock.notify_all()
        for worker in self.workers:
            if worker.alive and worker.prompt_id:
                try:
                    worker.client.json("/queue", {"delete": [worker.prompt_id]})
                    worker.client.json("/interrupt", {})
                except RunnerError:
                    pass


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="fatezero_run.py",
        description="Run a FateZero API-format workflow on a running ComfyUI, with a progress bar.")
    parser.add_argument("workflow", type=Path, help="API-format workflow (e.g. workflows/api/style_watercolor.json)")
    parser.add_argument("--video", type=Path, required=True,
                        help="a clip, or a folder: every video file in it is queued")
    parser.add_argument("--source", help="source prompt: what the clip shows")
    parser.add_argument("--target", help="target prompt: what it should become")
    parser.add_argument("--server", action="append", metavar="ADDRESS",
                        help="ComfyUI address (default 127.0.0.1:8188); repeat it for several servers: each runs "
                             "one job at a time, the clips (or segments) are spread over them, and a job whose "
                             "server fails or is gone runs again on another one")
    parser.add_argument("--servers-file", type=Path, metavar="FILE",
                        help="a file of ComfyUI addresses, one a line (# starts a comment), added to --server")
    parser.add_argument("--gpus", type=int, metavar="N",
                        help="with --comfyui: start one ComfyUI per GPU (CUDA_VISIBLE_DEVICES=0..N-1) on the port of "
                             "--server and the next N-1 ports (or on N --server addresses), all stopped at the end")
    parser.add_argument("--segment-frames", type=int, metavar="N",
                        help="like --segments, with segments of at most N frames (a server counts the clip's frames first)")
    parser.add_argument("--segments", type=int, metavar="K",
                        help="cut each clip into K consecutive segments, edited on any of the servers, each with the "
                             "clip's shared key frames of DDIM Invert's key rule (name it, e.g. --set "
                             "FateZero_DDIMInvert.key_frames=anchors/16), then joined into one video with the "
                             "clip's sound")
    parser.add_argument("--comfyui", type=Path, metavar="DIR",
                        help="ComfyUI folder: when no server answers at --server, start it from here "
                             "headless for this run (its venv/.venv Python if present) and stop it after")
    parser.add_argument("--cpu", action="store_true",
                        help="start that ComfyUI with --cpu (with --comfyui; one already running must have it)")
    parser.add_argument("--comfyui-args", metavar="ARGS",
                        help="more arguments for the started ComfyUI, e.g. \"--lowvram\" (with --comfyui; "
                             "one already running must have them)")
    parser.add_argument("--start-timeout", type=float, default=300.0,
                        help="seconds to wait for the started ComfyUI to answer (default 300)")
    parser.add_argument("--out", type=Path, default=Path("fatezero_output"),
                        help="folder for the results (default ./fatezero_output)")
    parser.add_argument("--steps", type=int, help="DDIM steps (FateZero DDIM Invert; the edit reuses them)")
    parser.add_argument("--frames", type=int, help="frames to load (frame_load_cap; 0 = all)")
    parser.add_argument("--set", action="append", metavar="NODE.INPUT=VALUE",
                        help="set any input, NODE being a node id or class_type; repeatable "
                             "(e.g. --set CheckpointLoaderSimple.ckpt_name=my_model.safetensors)")
    parser.add_argument("--timeout", type=float, default=0, help="seconds to wait per clip (0: no limit)")
    parser.add_argument("--verbose", action="store_true", help="print the server's traceback on failure")
    args = parser.parse_args(argv)
    if (args.cpu or args.comfyui_args) and not args.comfyui:
        parser.error("--cpu and --comfyui-args need --comfyui DIR (they apply to a ComfyUI this script starts)")
    if args.gpus is not None and (args.gpus < 1 or not args.comfyui):
        parser.error("--gpus N starts N servers: it needs --comfyui DIR and N of at least 1")
    if args.segments is not None and args.segments < 2:
        parser.error("--segments K cuts a clip into K segments: K must be at least 2")
    if args.segment_frames is not None and (args.segment_frames < 1 or args.segments):
        parser.error("--segment-frames N: give N of at least 1, and not together with --segments")
    for name in ("steps", "frames"):
        value = getattr(args, name)
        if value is not None and value < (1 if name == "steps" else 0):
            parser.error(f"--{name} must be {'at least 1' if name == 'steps' else '0 or more'}")
    return args


def main(argv=None, stream=None) -> int:
    args = parse_args(argv)
    stream = stream or sys.stderr
    server, code = None, 1
    started: list[LocalServer] = []
    previous = {}
    if args.comfyui and threading.current_thread() is threading.main_thread():
        # kill and a closed terminal (SIGHUP) stop the started server too, as Ctrl-C does
        previous = {signum: signal.signal(signum, _interrupt_on_signal) for signum in STOP_SIGNALS}
    try:
        if websocket is None:
            raise RunnerError("the websocket-client package is missing (it shows the progress): install it with "
                              f"'{sys.executable} -m pip install websocket-client'", 2)
        graph = load_workflow(args.workflow)
        videos = find_videos(args.video)
        addresses = read_servers(args)
        clients = [Client(address) for address in addresses]
        if args.comfyui:
            args.comfyui = comfyui_folder(args.comfyui)
        checked = prepare(graph, "check.mp4", args, stream=stream)  # report workflow problems before starting or uploading
        if len(clients) > 1 or args.segments or args.segment_frames:
            if args.segments or args.segment_frames:
                segment_graph(checked, 0, args.segments or 2, "check")
            started = start_servers(clients, args, stream)
            code = Pool(addresses, clients, graph, args, stream).run(videos)
            return code
        client = clients[0]
        server = ensure_server(client, args, stream)
        jobs = []
        for video in videos:
            name = client.upload(video)
            jobs.append(Job(video, prepare(graph, name, args, video.stem, stream=io.StringIO())))  # said once above
        code = Runner(client, args.out, args.timeout or None, args.verbose, stream).run(jobs)
    except RunnerError as err:
        print(f"fatezero_run: {err}", file=stream)
        code = err.code
    except KeyboardInterrupt:
        say(stream, "fatezero_run: interrupted")
        code = 130
    finally:
        for one in ([server] if server is not None else []) + started:
            one.stop(keep_log=code != 0)
            if code != 0 and one.log_path is not None:
                say(stream, f"fatezero_run: the server's log is in {one.log_path} ({one.client.base})")
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
    return code


if __name__ == "__main__":
    sys.exit(main())
