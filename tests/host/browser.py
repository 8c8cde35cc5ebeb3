"""Headless Chromium on a ComfyUI page, driven over the DevTools protocol (host tests).

Chromium is the Debian ``chromium`` package (``apt-get install chromium``); the protocol runs over
plain websockets (``websocket-client``). :func:`open_comfyui_page` starts a browser on a fresh
profile, opens the server's page, waits for the app with this pack's extension, and stops the
browser afterwards.
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from host_server import PACK_FOLDER, free_port, stop_process

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
VIEWPORT = (1400, 1000)
# The app is set up, this pack's extension and node types are registered, and the start-up
# workflow (restored or default) is open.
APP_READY = ("!!(window.app && app.graph && window.LiteGraph"
             " && LiteGraph.registered_node_types['FateZero_AttentionBlendSettings']"
             " && app.extensions.some((e) => e.name === 'FateZero.Frontend')"
             " && app.extensionManager?.workflow?.activeWorkflow)")


class PageError(AssertionError):
    """JavaScript evaluated in the page threw, or a wait in the page timed out."""


class DevTools:
    """One page target: ``call`` a CDP method, ``evaluate`` JavaScript, keep the events seen."""

    def __init__(self, ws_url: str, timeout: float = 120.0) -> None:
        import websocket

        # Chromium refuses DevTools websockets that carry an Origin header it does not allow.
        self.ws = websocket.create_connection(ws_url, timeout=timeout, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []

    def close(self) -> None:
        self.ws.close()

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        call_id = self.next_id
        self.ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == call_id:
                if "error" in message:
                    raise PageError(f"{method} failed: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)

    def evaluate(self, expression: str):
        """Value of ``expression`` (promises awaited, result returned by value)."""
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True,
                           returnByValue=True, userGesture=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise PageError(f"JavaScript error: {text}\nin: {expression[:400]}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0, what: str = ""):
        """Poll ``expression`` until it is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        last_error = None
        while time.monotonic() < deadline:
            try:
                value = self.evaluate(expression)
                if value:
                    return value
            except PageError as exc:
                last_error = exc
            time.sleep(0.2)
        raise PageError(f"timed out after {timeout:.0f} s waiting for {what or expression}"
                        + (f" (last error: {last_error})" if last_error else ""))

    def click(self, x: float, y: float) -> None:
        """A real left click at page coordinates (CSS pixels)."""
        self.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left",
                      buttons=1 if kind == "mousePressed" else 0, clickCount=1)

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def extension_errors(self) -> list[str]:
        """Uncaught exceptions and console errors that point at this pack's scripts."""
        found = []
        for event in self.events:
            if event["method"] == "Runtime.exceptionThrown":
                text = json.dumps(event["params"])
            elif event["method"] == "Runtime.consoleAPICalled" and event["params"]["type"] == "error":
                text = json.dumps(event["params"])
            else:
                continue
            if PACK_FOLDER in text or "FateZero" in text:
                found.append(text[:2000])
        return found


def _page_targets(port: int) -> list | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as r:
            return [t for t in json.loads(r.read()) if t.get("type") == "page"] or None
    except (urllib.error.URLError, ConnectionError, OSError, json.JSONDecodeError):
        return None


@contextlib.contextmanager
def open_comfyui_page(server_url: str, profile: Path):
    """Yield a :class:`DevTools` page on ``server_url`` with the app ready (see ``APP_READY``)."""
    log_path = profile.parent / f"{profile.name}.log"
    port = free_port()
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--disable-dev-shm-usage", "--mute-audio", "--hide-scrollbars",
        f"--user-data-dir={profile}", f"--remote-debugging-port={port}",
        f"--window-size={VIEWPORT[0]},{VIEWPORT[1]}", "about:blank",
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    page = None
    try:
        deadline = time.monotonic() + 60
        targets = None
        while time.monotonic() < deadline and targets is None:
            if process.poll() is not None:
                raise PageError(f"chromium exited with {process.returncode}:\n"
                                f"{log_path.read_text(errors='replace')[-3000:]}")
            targets = _page_targets(port)
            if targets is None:
                time.sleep(0.2)
        assert targets, "chromium opened no page target"
        page = DevTools(targets[0]["webSocketDebuggerUrl"])
        page.call("Runtime.enable")
        page.call("Page.enable")
        page.call("Emulation.setDeviceMetricsOverride", width=VIEWPORT[0], height=VIEWPORT[1],
                  deviceScaleFactor=1, mobile=False)
        page.call("Page.navigate", url=server_url + "/")
        page.wait_for(APP_READY, timeout=120, what="the ComfyUI app with the FateZero extension")
        yield page
    finally:
        if page is not None:
            page.close()
        stop_process(process)
