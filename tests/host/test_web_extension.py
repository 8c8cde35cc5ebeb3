"""The frontend extension (``web/``) in a real headless Chromium against a real ComfyUI server.

The ``comfy_server`` fixture starts ``main.py --cpu`` with this pack; Chromium (the Debian
``chromium`` package at ``/usr/bin/chromium``) opens the server's page and is driven over the
DevTools protocol (plain CDP over a websocket, ``websocket-client``). Checked:

- ``web/*.js`` are served under ``/extensions/comfyui-fatezero/`` and listed for the frontend;
- on FateZero Attention Blend Settings the word diff of the two prompts is shown, a click on a
  suggested word adds it to ``blend_words`` (a second click removes it), a blend word missing from
  the source prompt shows a warning, and the panel is not sent to the server with the graph;
- after a run, FateZero Sample shows its mask preview images on the node (``node.imgs``).

Screenshots of both go to the test's tmp folder (``fatezero_panel.png``, ``fatezero_sample.png``).
Without Chromium these tests skip with the reason; ``apt-get install chromium`` provides it.
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import struct
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from host_server import PACK_FOLDER, execution_error

CHROMIUM = Path("/usr/bin/chromium")
EXTENSION = f"/extensions/{PACK_FOLDER}/fatezero.js"
LOGIC = f"/extensions/{PACK_FOLDER}/fatezero_logic.js"
VIEWPORT = (1400, 1000)
SETTINGS = "FateZero_AttentionBlendSettings"
SOURCE = "a silver jeep driving down a curvy road"
TARGET = "a Porsche car driving down a curvy road"


# ------------------------------------------------------------------------------------------------
# A minimal DevTools protocol client
# ------------------------------------------------------------------------------------------------


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


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


# ------------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(comfy_server, tmp_path_factory):
    """Headless Chromium on the server's page, with the app and this pack's extension loaded."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found: install Debian's chromium package "
                    "(apt-get install chromium) to run the frontend tests")
    pytest.importorskip("websocket", reason="the websocket-client package is needed to drive Chromium")
    # A first visit opens the template browser over the canvas; mark it as seen (a user setting
    # in the test server's temporary user folder).
    status, _ = comfy_server.post_json("/settings/Comfy.TutorialCompleted", True)
    assert status == 200, status
    profile = tmp_path_factory.mktemp("chromium_profile")
    log_path = profile.parent / "chromium.log"
    port = _free_port()
    cmd = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
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
                pytest.fail(f"chromium exited with {process.returncode}:\n"
                            f"{log_path.read_text(errors='replace')[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as r:
                    targets = [t for t in json.loads(r.read()) if t.get("type") == "page"]
            except (urllib.error.URLError, ConnectionError, OSError, json.JSONDecodeError):
                time.sleep(0.2)
        assert targets, "chromium opened no page target"
        page = DevTools(targets[0]["webSocketDebuggerUrl"])
        page.call("Runtime.enable")
        page.call("Page.enable")
        page.call("Emulation.setDeviceMetricsOverride", width=VIEWPORT[0], height=VIEWPORT[1],
                  deviceScaleFactor=1, mobile=False)
        page.call("Page.navigate", url=comfy_server.url + "/")
        page.wait_for(
            "!!(window.app && app.graph && window.LiteGraph"
            f" && LiteGraph.registered_node_types[{json.dumps(SETTINGS)}]"
            " && app.extensions.some((e) => e.name === 'FateZero.Frontend')"
            # the page restores or loads its start-up workflow after the app is set up
            " && app.extensionManager?.workflow?.activeWorkflow)",
            timeout=120, what="the ComfyUI app with the FateZero extension")
        yield page
    finally:
        if page is not None:
            page.close()
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=20)


@pytest.fixture
def page(browser):
    """The page with an empty graph; fails the test if this pack's scripts logged errors."""
    browser.evaluate("app.graph.clear(), app.canvas.ds.offset = [0, 0], app.canvas.ds.scale = 1, true")
    browser.events.clear()
    yield browser
    errors = browser.extension_errors()
    assert not errors, "errors from the FateZero extension in the page:\n" + "\n".join(errors)


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------


def test_extension_scripts_are_served(comfy_server):
    listed = comfy_server.get_json("/extensions")
    assert EXTENSION in listed and LOGIC in listed, listed
    for path, marker in ((EXTENSION, "registerExtension"), (LOGIC, "export function diffWords")):
        with urllib.request.urlopen(comfy_server.url + path, timeout=30) as resp:
            assert resp.status == 200
            assert "javascript" in resp.headers.get("Content-Type", "")
            assert marker in resp.read().decode()


PANEL_STATE = """(() => {
  const node = window.fzNode;
  const panel = node.fatezero.element;
  const value = (name) => node.widgets.find((w) => w.name === name).value;
  return {
    diff: [...panel.querySelectorAll('[data-fz-op]')].map((e) => [e.dataset.fzOp, e.textContent]),
    chips: [...panel.querySelectorAll('button.fz-chip')].map(
      (b) => [b.dataset.fzField, b.dataset.fzWord, b.classList.contains('fz-on')]),
    warnings: [...panel.querySelectorAll('.fz-warning')].map((e) => e.textContent),
    blend_words: value('blend_words'),
    target_blend_words: value('target_blend_words'),
    visible: panel.isConnected && panel.getBoundingClientRect().height > 0,
  };
})()"""

# The centre of a suggestion button once it sits still on top of the page (the canvas places DOM
# widgets on its next frames), else null.
CHIP_CENTRE = """(async () => {
  const find = () => window.fzNode.fatezero.element.querySelector(
    'button.fz-chip[data-fz-field=%s][data-fz-word=%s]');
  const centre = () => {
    const chip = find();
    if (!chip) return null;
    const r = chip.getBoundingClientRect();
    const x = r.x + r.width / 2, y = r.y + r.height / 2;
    return document.elementFromPoint(x, y) === chip ? [x, y] : null;
  };
  const before = centre();
  await new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)));
  const after = centre();
  return before && after && before[0] === after[0] && before[1] === after[1] ? after : null;
})()"""


def chip_centre(page, field: str, word: str) -> list[float]:
    return page.wait_for(CHIP_CENTRE % (json.dumps(field), json.dumps(word)),
                         what=f"the '{word}' button for {field} to be clickable")


def test_blend_settings_panel(page, tmp_path):
    page.evaluate(f"""(() => {{
      const node = LiteGraph.createNode({json.dumps(SETTINGS)});
      node.pos = [120, 60];
      app.graph.add(node);
      window.fzNode = node;
      const widget = (name) => node.widgets.find((w) => w.name === name);
      // the source prompt as typed by a user (textarea input event), the target set in code
      const textarea = widget('source_prompt').element;
      textarea.value = {json.dumps(SOURCE)};
      textarea.dispatchEvent(new Event('input', {{bubbles: true}}));
      widget('target_prompt').value = {json.dumps(TARGET)};
      app.graph.setDirtyCanvas(true, true);
      return true;
    }})()""")
    state = page.wait_for(f"(() => {{ const s = {PANEL_STATE}; return s.chips.length ? s : null; }})()",
                          what="the word diff panel")
    assert state["visible"]
    assert state["diff"] == [
        ["keep", "a"], ["remove", "silver"], ["remove", "jeep"], ["add", "Porsche"], ["add", "car"],
        ["keep", "driving"], ["keep", "down"], ["keep", "a"], ["keep", "curvy"], ["keep", "road"]]
    assert state["chips"] == [["blend_words", "silver", False], ["blend_words", "jeep", False],
                              ["target_blend_words", "Porsche", False],
                              ["target_blend_words", "car", False]]
    assert state["warnings"] == [] and state["blend_words"] == ""

    # a real mouse click on the suggested source word adds it to blend_words
    page.click(*chip_centre(page, "blend_words", "jeep"))
    state = page.wait_for(f"(() => {{ const s = {PANEL_STATE}; return s.blend_words ? s : null; }})()",
                          what="blend_words to change after the click")
    assert state["blend_words"] == "jeep"
    assert ["blend_words", "jeep", True] in state["chips"]
    # clicking it again takes it out; the target word goes to target_blend_words
    page.click(*chip_centre(page, "blend_words", "jeep"))
    page.wait_for("window.fzNode.widgets.find((w) => w.name === 'blend_words').value === ''",
                  what="blend_words to be emptied by the second click")
    for field, word in (("blend_words", "jeep"), ("target_blend_words", "Porsche")):
        page.click(*chip_centre(page, field, word))
        page.wait_for(f"window.fzNode.widgets.find((w) => w.name === {json.dumps(field)}).value",
                      what=f"{field} to change after the click")
    page.wait_for("window.fzNode.widgets.find((w) => w.name === 'target_blend_words').value === 'Porsche'",
                  what="target_blend_words to change after the click")

    # a blend word that is not in the source prompt, set without any widget callback: the
    # panel follows the value anyway and warns
    page.evaluate("window.fzNode.widgets.find((w) => w.name === 'blend_words').value = 'jeep, truck'")
    state = page.wait_for(f"(() => {{ const s = {PANEL_STATE}; return s.warnings.length ? s : null; }})()",
                          what="the missing-word warning")
    assert state["blend_words"] == "jeep, truck" and state["target_blend_words"] == "Porsche"
    assert len(state["warnings"]) == 1
    assert "blend word 'truck' is not in the source prompt" in state["warnings"][0]
    assert ["blend_words", "jeep", True] in state["chips"]
    assert ["target_blend_words", "Porsche", True] in state["chips"]

    # the panel is frontend-only: neither the saved workflow nor the prompt sent to the server
    # carries it, and the node's widget values are unchanged in count
    sent = page.evaluate("""(async () => {
      const p = await app.graphToPrompt();
      const id = String(window.fzNode.id);
      const saved = p.workflow.nodes.find((n) => String(n.id) === id);
      return {inputs: Object.keys(p.output[id].inputs), values: saved.widgets_values.length,
              declared: window.fzNode.widgets.filter((w) => w.serialize !== false).length};
    })()""")
    assert "fatezero_words" not in sent["inputs"]
    assert {"source_prompt", "target_prompt", "blend_words", "target_blend_words"} <= set(sent["inputs"])
    assert sent["values"] == sent["declared"]

    # the screenshot shows the panel, coloured: red removed words, green added ones
    time.sleep(0.5)
    shot = page.screenshot(tmp_path / "fatezero_panel.png")
    width, height = _png_size(shot)
    assert (width, height) == VIEWPORT and shot.stat().st_size > 10_000
    box = page.evaluate("(() => { const r = window.fzNode.fatezero.element.getBoundingClientRect();"
                        " return [r.left, r.top, r.right, r.bottom]; })()")
    _assert_panel_colours(shot, box)


def _assert_panel_colours(shot: Path, box) -> None:
    try:
        from PIL import Image
    except ImportError:  # Pillow comes with ComfyUI; without it the pixel check is left out
        return
    with Image.open(shot) as image:
        left, top, right, bottom = (int(round(v)) for v in box)
        assert right - left > 100 and bottom - top > 40, box
        data = image.convert("RGB").crop((left, top, right, bottom)).tobytes()
    pixels = list(zip(data[0::3], data[1::3], data[2::3]))
    reddish = sum(1 for r, g, b in pixels if r > 200 and g < 160 and b < 160)
    greenish = sum(1 for r, g, b in pixels if g > 180 and r < 170 and b < 170)
    orange = sum(1 for r, g, b in pixels if r > 220 and 140 < g < 200 and b < 110)
    assert reddish > 20, "no red (removed words) in the panel"
    assert greenish > 20, "no green (added words) in the panel"
    assert orange > 20, "no orange (warning) in the panel"


def _write_clip(folder: Path, name: str) -> str:
    import torch

    from fatezero_core.video_io import write_video

    frames = torch.zeros(5, 48, 64, 3)
    for k in range(5):
        frames[k] = (30 * k + 20) / 255.0
        frames[k, 12:28, 8 + 4 * k:24 + 4 * k] = torch.tensor([0.9, 0.1, 0.1])
    write_video(folder / name, frames, 8.0)
    return name


FRAMES, SIZE = 2, 64


def _edit_graph(checkpoint: str, video: str) -> dict:
    """load -> encode -> invert -> FateZero Sample, with the mask preview as the only image output."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "FateZero_LoadVideoFrames", "inputs": {
            "video": video, "frame_load_cap": FRAMES, "skip_first_frames": 0,
            "select_every_nth": 1, "size": SIZE, "resize_mode": "crop"}},
        "3": {"class_type": SETTINGS, "inputs": {
            "clip": ["1", 1], "source_prompt": "a silver jeep on a road",
            "target_prompt": "a red car on a road", "blend_words": "jeep",
            "target_blend_words": "", "cross_replace_steps": 0.8, "cross_replace_words": "",
            "self_replace_steps": 0.6, "blend_threshold": 0.3, "reweight": "", "mode": "auto",
            "local_latent_blend": False, "soft_mask": False}},
        "4": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 2]}},
        "5": {"class_type": "FateZero_DDIMInvert", "inputs": {
            "model": ["1", 0], "source": ["3", 0], "latent": ["4", 0], "steps": 2,
            "key_frames": "auto", "st_min_channels": -1, "store_placement": "cpu",
            "store_dtype": "fp32", "layer_set": "relative", "schedule_end": "comfy"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "7": {"class_type": "FateZero_Sample", "inputs": {
            "model": ["1", 0], "positive": ["3", 1], "negative": ["6", 0], "latent": ["5", 0],
            "attention_store": ["5", 1], "blend_settings": ["3", 2], "cfg": 2.0, "fusion": True}},
        "8": {"class_type": "PreviewImage", "inputs": {"images": ["7", 1]}},
    }


def test_sample_node_shows_mask_preview(page, comfy_server, tmp_path):
    info = comfy_server.object_info()
    needed = {"FateZero_LoadVideoFrames", "FateZero_DDIMInvert", "FateZero_Sample", SETTINGS}
    if not needed <= set(info):
        pytest.skip(f"{sorted(needed - set(info))} not in this checkout")
    invert_inputs = info["FateZero_DDIMInvert"]["input"]
    prompt = _edit_graph(comfy_server.checkpoint, _write_clip(comfy_server.input_dir, "fz_web.avi"))
    known = {**invert_inputs.get("required", {}), **invert_inputs.get("optional", {})}
    prompt["5"]["inputs"] = {k: v for k, v in prompt["5"]["inputs"].items() if k in known}

    # load the graph in the page and queue it from there, as the Run button does: the page's
    # websocket then receives the 'executed' messages
    queued = page.evaluate(f"""(async () => {{
      await app.loadApiJson({json.dumps(prompt)}, 'fatezero_web_test');
      const node = app.graph.getNodeById(7);
      window.fzSample = node;
      // Sample to the right of everything else, in view
      const others = app.graph.nodes.filter((n) => n !== node);
      const right = Math.max(...others.map((n) => n.pos[0] + n.size[0]));
      const top = Math.min(...others.map((n) => n.pos[1]));
      node.pos = [right + 80, top];
      app.canvas.ds.scale = 1;
      app.canvas.ds.offset = [-(right + 80) + 700, -top + 80];
      app.graph.setDirtyCanvas(true, true);
      const p = await app.graphToPrompt();
      const res = await window.comfyAPI.api.api.queuePrompt(0, p);
      return res.prompt_id;
    }})()""")
    entry = comfy_server.wait(queued, timeout=600)
    assert entry["status"]["status_str"] == "success", (execution_error(entry), comfy_server.log_tail())
    images = entry["outputs"]["7"]["images"]
    assert len(images) == FRAMES and all(i["type"] == "temp" for i in images)

    state = page.wait_for("""(() => {
      const node = window.fzSample;
      if (!node.imgs || !node.imgs.length || !node.fatezeroPreview) return null;
      app.graph.setDirtyCanvas(true, true);
      const caption = node.widgets.find((w) => w.name === 'fatezero_preview_caption');
      return {imgs: node.imgs.length, loaded: node.imgs.every((i) => i.complete && i.naturalWidth > 0),
              sizes: node.imgs.map((i) => [i.naturalWidth, i.naturalHeight]),
              srcs: node.imgs.map((i) => i.src), frames: node.fatezeroPreview.frames,
              caption: caption ? caption.element.textContent : null};
    })()""", timeout=60, what="FateZero Sample's preview images")
    assert state["imgs"] == FRAMES and state["frames"] == FRAMES and state["loaded"]
    assert all(size == [2 * SIZE, SIZE] for size in state["sizes"]), state["sizes"]
    assert all("/view?" in src and "type=temp" in src for src in state["srcs"])
    assert state["caption"] and "blend mask" in state["caption"]

    time.sleep(1.0)
    shot = page.screenshot(tmp_path / "fatezero_sample.png")
    assert _png_size(shot) == VIEWPORT and shot.stat().st_size > 10_000
