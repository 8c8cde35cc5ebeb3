"""A headless ComfyUI server (``main.py --cpu``) for end-to-end tests, and a small HTTP client.

The server runs from ``COMFYUI_PATH`` with the test's Python, on a free local port, with every
folder it writes to (models, custom_nodes, input, output, temp, user) under a temporary base
directory (``--base-directory``) and an in-memory database, so the ComfyUI checkout is not
touched. The pack is made visible as ``custom_nodes/comfyui-fatezero``, a symlink to this repo.

Named ``host_server`` so it never shadows ComfyUI's own ``server`` module.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

PACK_FOLDER = "comfyui-fatezero"
START_TIMEOUT_S = 300.0


class ServerError(RuntimeError):
    """The server did not start, refused a prompt, or a prompt did not finish in time."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(process: subprocess.Popen) -> None:
    """Terminate ``process`` (kill it after 20 s) and reap it."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=20)


def prepare_base_directory(base: Path, repo: Path) -> Path:
    """Create ComfyUI's folder layout under ``base`` with this pack linked into custom_nodes."""
    for sub in ("custom_nodes", "models/checkpoints", "input", "output", "temp", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_FOLDER
    if not link.exists():
        link.symlink_to(repo, target_is_directory=True)
    return base


class ComfyServer:
    """A running ``main.py`` process plus the JSON calls the tests need.

    Attributes: ``url`` (``http://127.0.0.1:<port>``), ``base`` (the base directory),
    ``input_dir``, ``output_dir``, ``checkpoints_dir``, ``log_path``.
    """

    def __init__(self, comfyui_path: str | os.PathLike, base: Path, python: str | None = None,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.comfyui_path = Path(comfyui_path)
        self.base = Path(base)
        self.python = python or sys.executable
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.input_dir = self.base / "input"
        self.output_dir = self.base / "output"
        self.checkpoints_dir = self.base / "models" / "checkpoints"
        self.log_path = self.base / "server.log"
        self.extra_args = tuple(extra_args)
        self.process: subprocess.Popen | None = None
        self._log = None
        self.client_id = uuid.uuid4().hex

    # ---------------------------------------------------------------- lifecycle
    def start(self, timeout: float = START_TIMEOUT_S) -> "ComfyServer":
        cmd = [
            self.python, str(self.comfyui_path / "main.py"),
            "--cpu", "--listen", "127.0.0.1", "--port", str(self.port), "--disable-auto-launch",
            "--base-directory", str(self.base), "--database-url", "sqlite:///:memory:",
            *self.extra_args,
        ]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(cmd, cwd=self.comfyui_path, stdout=self._log,
                                        stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"ComfyUI exited with code {self.process.returncode} while "
                                  f"starting.\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/object_info", timeout=10) as resp:
                    if resp.status == 200:
                        json.loads(resp.read())
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                pass
            time.sleep(0.5)
        self.stop()
        raise ServerError(f"ComfyUI did not answer /object_info within {timeout:.0f} s.\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no server log)"

    # ---------------------------------------------------------------- HTTP
    def get_json(self, path: str, timeout: float = 60):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as resp:
            return json.loads(resp.read())

    def post_json(self, path: str, body: dict, timeout: float = 60) -> tuple[int, dict]:
        request = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:
                raw = resp.read()
                return resp.status, (json.loads(raw) if raw else {})
        except urllib.error.HTTPError as err:
            raw = err.read()
            try:
                return err.code, json.loads(raw)
            except json.JSONDecodeError:
                return err.code, {"error": raw.decode(errors="replace")}

    def object_info(self, node_class: str | None = None) -> dict:
        path = "/object_info" + (f"/{urllib.parse.quote(node_class)}" if node_class else "")
        return self.get_json(path)

    def submit(self, prompt: dict) -> tuple[int, dict]:
        """POST an API-format graph to ``/prompt``; returns ``(status, body)`` unchanged."""
        return self.post_json("/prompt", {"prompt": prompt, "client_id": self.client_id})

    def queue(self, prompt: dict) -> str:
        """POST an API-format graph; returns the prompt id, raising if validation refused it."""
        status, body = self.submit(prompt)
        if status != 200 or "prompt_id" not in body:
            raise ServerError(f"/prompt refused the graph ({status}): {json.dumps(body, indent=1)}")
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        """Poll ``/history/<id>`` until the prompt finished; returns its history entry."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get_json(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and (
                entry["status"].get("status_str") in ("success", "error")
            ):
                return entry
            if self.process is not None and self.process.poll() is not None:
                raise ServerError(f"ComfyUI exited while running the prompt.\n{self.log_tail()}")
            time.sleep(0.25)
        raise ServerError(f"prompt {prompt_id} did not finish within {timeout:.0f} s.\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 600) -> dict:
        """Queue ``prompt`` and wait for its history entry."""
        return self.wait(self.queue(prompt), timeout=timeout)


def execution_error(entry: dict) -> dict | None:
    """The ``execution_error`` message data of a history entry, or None."""
    for name, data in entry.get("status", {}).get("messages", []):
        if name == "execution_error":
            return data
    return None
