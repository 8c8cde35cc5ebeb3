"""The frontend extension (``web/``) in a real headless Chromium against a real ComfyUI server.

The ``comfy_server`` fixture starts ``main.py --cpu`` with this pack; the ``browser`` fixture opens
the server's page in headless Chromium (``browser.py``: the Debian ``chromium`` package, driven
over the DevTools protocol). Checked:

- ``web/*.js`` are served under ``/extensions/comfyui-fatezero/`` and listed for the frontend;
- on FateZero Attention Blend Settings the word diff of the two prompts is shown, a click on a
  suggested word adds it to ``blend_words`` (a second click removes it), a blend word missing from
  the source prompt shows a warning, and the panel is not sent to the server with the graph;
- after a run, FateZero Sample shows its mask preview images on the node (``node.imgs``);
- the word-rule cases shared with the Python tests (``tests/data/word_rules.json``) give the same
  words and warnings in the page as the Python node gives.

Screenshots of both go to the test's tmp folder (``fatezero_panel.png``, ``fatezero_sample.png``).
Without Chromium these tests skip with the reason; ``apt-get install chromium`` provides it.
"""

from __future__ import annotations

import base64
import json
import struct
import time
import urllib.request
from pathlib import Path

import pytest

from browser import VIEWPORT
from host_server import PACK_FOLDER, execution_error
from test_server_workflow import N_FRAMES as FRAMES, SIZE, fatezero_graph, write_video_file

EXTENSION = f"/extensions/{PACK_FOLDER}/fatezero.js"
LOGIC = f"/extensions/{PACK_FOLDER}/fatezero_logic.js"
SETTINGS = "FateZero_AttentionBlendSettings"
WORD_RULES = json.loads((Path(__file__).resolve().parents[1] / "data" / "word_rules.json")
                        .read_text(encoding="utf-8"))
WORD_RULE_RUNNER = Path(__file__).resolve().parents[1] / "js" / "word_rules_cases.mjs"
SOURCE = "a silver jeep driving down a curvy road"
TARGET = "a Porsche car driving down a curvy road"


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


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


def test_edit_settings_panel_reads_the_linked_source_prompt(page):
    """On FateZero Edit Settings the source prompt is typed on the FateZero Source Prompt node
    linked to it: the panel diffs that text with the target, and follows it when it changes."""
    page.evaluate(f"""(() => {{
      const edit = LiteGraph.createNode("FateZero_EditSettings");
      edit.pos = [420, 60];
      app.graph.add(edit);
      window.fzNode = edit;
      edit.widgets.find((w) => w.name === 'target_prompt').value = {json.dumps(TARGET)};
      return true;
    }})()""")
    page.wait_for("window.fzNode.fatezero.element.textContent.includes('Connect a FateZero Source Prompt')",
                  what="the hint to connect a source prompt")
    page.evaluate(f"""(() => {{
      const source = LiteGraph.createNode("FateZero_SourcePrompt");
      source.pos = [40, 60];
      app.graph.add(source);
      window.fzSource = source;
      source.widgets.find((w) => w.name === 'source_prompt').value = {json.dumps(SOURCE)};
      source.connect(1, window.fzNode, window.fzNode.inputs.findIndex((i) => i.name === 'source_prompt'));
      return true;
    }})()""")
    state = page.wait_for(f"(() => {{ const s = {PANEL_STATE}; return s.chips.length ? s : null; }})()",
                          what="the word diff panel of the linked prompts")
    assert ["remove", "jeep"] in state["diff"] and ["add", "Porsche"] in state["diff"]
    assert ["blend_words", "jeep", False] in state["chips"]
    page.evaluate("window.fzSource.widgets.find((w) => w.name === 'source_prompt').value = "
                  "'a silver truck driving down a curvy road'")
    state = page.wait_for(f"(() => {{ const s = {PANEL_STATE}; "
                          "return s.chips.some((c) => c[1] === 'truck') ? s : null; })()",
                          what="the panel to follow the source node")
    assert ["remove", "truck"] in state["diff"]


def test_word_rules_in_the_page(page):
    """The shared word-rule cases, run by the ``fatezero_logic.js`` the server serves, in the page:
    among them ``a (jeep:1.2) on a road``, whose blend word ``jeep`` the node accepts."""
    runner = base64.b64encode(WORD_RULE_RUNNER.read_bytes()).decode()
    outcomes = page.evaluate(f"""(async () => {{
      const logic = await import({json.dumps(LOGIC)});
      const runner = await import('data:text/javascript;base64,{runner}');
      return runner.wordRuleOutcomes(logic, {json.dumps(WORD_RULES)});
    }})()""")
    assert outcomes["prompt_words"] == [case["words"] for case in WORD_RULES["prompt_words"]]
    assert outcomes["word_checks"] == [case["rejected"] for case in WORD_RULES["word_checks"]]


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


def _preview_graph(server, video: str) -> dict:
    """The server test's edit graph (load -> encode -> invert -> FateZero Sample) with the mask
    preview as the only image output."""
    prompt = fatezero_graph(server, video, steps=2)
    del prompt["9"]
    prompt["8"] = {"class_type": "PreviewImage", "inputs": {"images": ["7", 1]}}
    return prompt


def test_sample_node_shows_mask_preview(page, comfy_server, tmp_path):
    prompt = _preview_graph(comfy_server, write_video_file(comfy_server.input_dir, "fz_web.avi"))

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
