// FateZero frontend extension (served by ComfyUI from WEB_DIRECTORY).
//
// - FateZero Edit Settings (and the deprecated Attention Blend Settings): a panel under the widgets
//   with the word-level difference between the source prompt (typed on the FateZero Source Prompt
//   node linked to it) and the target prompt, the changed words as one-click blend words, and
//   warnings for words the node would refuse (a blend word missing from its prompt, ...).
//   It follows the widgets live: widget callbacks plus a light poll of the values (which also
//   catches workflow loads, undo and values set by other extensions).
// - FateZero Sample: the mask preview images of the last run shown on the node, with a caption.
// - FateZero Video Metrics: the table of the last run shown on the node, above its plot.
//
// The word logic lives in fatezero_logic.js (no DOM; unit-tested with node's test runner).

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { addWord, analyse, listHas, removeWord, viewPaths } from "./fatezero_logic.js";

const SETTINGS_NODES = ["FateZero_EditSettings", "FateZero_AttentionBlendSettings"];
const SOURCE_SOCKET = "FATEZERO_SOURCE_PROMPT";
const SAMPLE_NODE = "FateZero_Sample";
const METRICS_NODE = "FateZero_VideoMetrics";
const METRICS_WIDGET = "fatezero_metrics_table";
const PANEL_WIDGET = "fatezero_words";
const CAPTION_WIDGET = "fatezero_preview_caption";
const WATCHED = ["source_prompt", "target_prompt", "blend_words", "target_blend_words",
  "reweight", "cross_replace_words", "mode", "local_latent_blend"];
const POLL_MS = 400;

const STYLE = `
.fatezero-panel { font: 12px/1.45 sans-serif; color: var(--input-text, #ddd);
  box-sizing: border-box; overflow: hidden; }
.fatezero-panel .fz-inner { padding: 4px 6px; }
.fatezero-panel .fz-row { margin: 2px 0 4px; }
.fatezero-panel .fz-label { color: var(--descrip-text, #999); margin-right: 4px; }
.fatezero-panel .fz-diff { word-break: break-word; }
.fatezero-panel .fz-diff span { margin-right: 0.3em; }
.fatezero-panel .fz-keep { color: var(--descrip-text, #aaa); }
.fatezero-panel .fz-remove { color: #ff8080; text-decoration: line-through; }
.fatezero-panel .fz-add { color: #7ee08a; font-weight: 600; }
.fatezero-panel button.fz-chip { font: inherit; cursor: pointer; margin: 1px 3px 1px 0;
  padding: 0 6px; border-radius: 9px; border: 1px solid var(--border-color, #555);
  background: var(--comfy-input-bg, #222); color: var(--input-text, #ddd); }
.fatezero-panel button.fz-chip:hover { border-color: #8ab4f8; }
.fatezero-panel button.fz-chip.fz-on { background: #2c5d9e; border-color: #8ab4f8; color: #fff; }
.fatezero-panel .fz-none { color: var(--descrip-text, #888); font-style: italic; }
.fatezero-panel .fz-warning { color: #ffb347; }
.fatezero-caption { font: 11px/1.4 sans-serif; color: var(--descrip-text, #aaa);
  box-sizing: border-box; overflow: hidden; }
.fatezero-caption .fz-inner { padding: 2px 6px; }
.fatezero-metrics pre { margin: 0; font: 11px/1.35 monospace; color: var(--input-text, #ddd);
  white-space: pre; overflow-x: auto; }
`;

function ensureStyle() {
  if (document.getElementById("fatezero-style")) return;
  const style = document.createElement("style");
  style.id = "fatezero-style";
  style.textContent = STYLE;
  document.head.append(style);
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function findWidget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

function isLinked(node, name) {
  const input = node.inputs?.find((i) => i.name === name);
  return input != null && input.link != null;
}

/** Edit Settings read the source prompt from the FateZero Source Prompt node linked to them. */
function hasSourceSocket(node) {
  return node.inputs?.some((i) => i.name === "source_prompt" && i.type === SOURCE_SOCKET) ?? false;
}

function sourceNode(node) {
  const slot = node.inputs?.findIndex((i) => i.name === "source_prompt" && i.type === SOURCE_SOCKET) ?? -1;
  if (slot < 0 || node.inputs[slot].link == null) return null;
  return node.getInputNode?.(slot) ?? null;
}

function promptValue(node, name) {
  if (name === "source_prompt" && hasSourceSocket(node)) {
    return findWidget(sourceNode(node) ?? {}, "source_prompt")?.value;
  }
  return findWidget(node, name)?.value;
}

/** A prompt the panel cannot read: linked from another node's output, or no source connected. */
function promptFromLink(node, name) {
  if (name === "source_prompt" && hasSourceSocket(node)) {
    const source = sourceNode(node);
    return source == null || isLinked(source, "source_prompt");
  }
  return isLinked(node, name);
}

/** Chain `fn` after an existing method or callback of `target`. */
function chain(target, key, fn) {
  const original = target[key];
  target[key] = function (...args) {
    const result = original?.apply(this, args);
    fn.apply(this, args);
    return result;
  };
}

function markChanged(node) {
  node.setDirtyCanvas?.(true, true);
  app.graph?.setDirtyCanvas?.(true, true);
}

/** Grow the node when the panel needs more room than it has (never shrink under the user). */
function fitNode(node) {
  if (typeof node.computeSize !== "function" || !node.size) return;
  const wanted = node.computeSize();
  if (wanted[1] > node.size[1] + 1 || wanted[0] > node.size[0] + 1) {
    node.setSize([Math.max(node.size[0], wanted[0]), Math.max(node.size[1], wanted[1])]);
  }
  markChanged(node);
}

/**
 * A frontend-only DOM widget (not saved, not sent with the prompt) as tall as its content.
 * Returns `{widget, element, inner, measure}`; fill `inner`, then call `measure()`.
 */
function addContentWidget(node, name, className, initialHeight) {
  ensureStyle();
  const element = el("div", className);
  const inner = el("div", "fz-inner");
  element.append(inner);
  const box = { element, inner, height: initialHeight };
  const widget = node.addDOMWidget(name, name.replace(/_/g, "-"), element, {
    serialize: false,
    hideOnZoom: true,
    margin: 6,
    getValue: () => "",
    setValue: () => {},
    getMinHeight: () => box.height,
    getMaxHeight: () => box.height,
  });
  widget.serialize = false; // not part of widgets_values, so saved workflows keep their layout
  box.widget = widget;
  box.measure = () => {
    // Unattached or not yet sized by the canvas, the text would wrap in a narrow column.
    if (!element.isConnected || element.clientWidth < 120) return;
    const height = Math.max(24, Math.ceil(inner.offsetHeight) + 2 * (widget.margin ?? 10) + 2);
    if (height !== box.height) {
      box.height = height;
      fitNode(node);
    }
  };
  if (typeof ResizeObserver === "function") {
    box.observer = new ResizeObserver(() => box.measure());
    box.observer.observe(inner);
    chain(node, "onRemoved", () => box.observer.disconnect());
  }
  requestAnimationFrame(() => box.measure());
  return box;
}

// --------------------------------------------------------------------------------------------
// Blend settings: prompt diff, one-click blend words, warnings
// --------------------------------------------------------------------------------------------

function readValues(node) {
  const values = {};
  for (const name of WATCHED) values[name] = promptValue(node, name);
  return values;
}

function setListWidget(node, name, value) {
  const widget = findWidget(node, name);
  if (!widget || widget.value === value) return;
  widget.value = value;
  widget.callback?.(widget.value, app.canvas, node);
  node.onWidgetChanged?.(name, widget.value, undefined, widget);
  node.fatezero?.refresh(true);
  markChanged(node);
}

function renderChips(row, node, field, words, emptyText) {
  const current = findWidget(node, field)?.value ?? "";
  if (!words.length) {
    row.append(el("span", "fz-none", emptyText));
    return;
  }
  for (const word of words) {
    const on = listHas(current, word);
    const chip = el("button", on ? "fz-chip fz-on" : "fz-chip", on ? `\u2713 ${word}` : `+ ${word}`);
    chip.type = "button";
    chip.dataset.fzField = field;
    chip.dataset.fzWord = word;
    chip.title = on ? `Remove '${word}' from ${field}` : `Add '${word}' to ${field}`;
    chip.addEventListener("pointerdown", (event) => event.stopPropagation());
    chip.addEventListener("click", (event) => {
      event.preventDefault();
      event.stopPropagation();
      const value = findWidget(node, field)?.value ?? "";
      setListWidget(node, field, listHas(value, word) ? removeWord(value, word) : addWord(value, word));
    });
    row.append(chip);
  }
}

function renderPanel(node, inner, values) {
  inner.replaceChildren();
  if (hasSourceSocket(node) && sourceNode(node) == null) {
    inner.append(el("div", "fz-row fz-none",
      "Connect a FateZero Source Prompt to source_prompt to see the word diff."));
    return null;
  }
  const linked = ["source_prompt", "target_prompt"].filter((name) => promptFromLink(node, name));
  if (linked.length) {
    inner.append(el("div", "fz-row fz-none",
      `${linked.join(" and ")} ${linked.length > 1 ? "come" : "comes"} from a link: the word `
      + "diff is shown for typed prompts only."));
    return null;
  }
  const result = analyse(values);

  const diffRow = el("div", "fz-row fz-diff");
  diffRow.append(el("span", "fz-label", "Diff:"));
  if (!result.diff.length) diffRow.append(el("span", "fz-none", "type both prompts"));
  for (const item of result.diff) {
    const span = el("span", `fz-${item.op}`, item.text);
    span.dataset.fzOp = item.op;
    span.title = { keep: "in both prompts", remove: "only in the source prompt",
      add: "only in the target prompt" }[item.op];
    diffRow.append(span);
  }
  inner.append(diffRow);

  if (result.diff.length) {
    inner.append(el("div", "fz-row fz-label",
      `${result.sourceCount} \u2192 ${result.targetCount} words: ${result.mode} mode`));
  }

  const sourceRow = el("div", "fz-row fz-source-words");
  sourceRow.append(el("span", "fz-label", "blend_words:"));
  renderChips(sourceRow, node, "blend_words", result.changed.source, "no changed source words");
  inner.append(sourceRow);

  const targetRow = el("div", "fz-row fz-target-words");
  targetRow.append(el("span", "fz-label", "target_blend_words:"));
  renderChips(targetRow, node, "target_blend_words", result.changed.target,
    "no changed target words");
  inner.append(targetRow);

  for (const warning of result.warnings) {
    const line = el("div", "fz-row fz-warning", `\u26a0 ${warning.message}`);
    line.dataset.fzField = warning.field;
    if (warning.word) line.dataset.fzWord = warning.word;
    inner.append(line);
  }
  return result;
}

function setupBlendSettings(node) {
  if (node.fatezero || findWidget(node, PANEL_WIDGET)) return;
  const box = addContentWidget(node, PANEL_WIDGET, "fatezero-panel", 96);
  let signature = null;
  const state = {
    widget: box.widget,
    element: box.element,
    result: null,
    refresh(force = false) {
      const values = readValues(node);
      const links = ["source_prompt", "target_prompt"].map((n) => promptFromLink(node, n));
      const next = JSON.stringify([values, links]);
      if (!force && next === signature) return state.result;
      signature = next;
      state.result = renderPanel(node, box.inner, values);
      box.measure();
      return state.result;
    },
  };
  node.fatezero = state;

  for (const name of WATCHED) {
    const w = findWidget(node, name);
    if (w) chain(w, "callback", () => state.refresh());
  }
  chain(node, "onConnectionsChange", () => state.refresh());
  chain(node, "onConfigure", () => state.refresh(true));

  state.timer = setInterval(() => {
    if (!node.graph) return; // removed, or not added yet
    state.refresh();
  }, POLL_MS);
  chain(node, "onRemoved", () => {
    clearInterval(state.timer);
    state.timer = null;
  });
  // The DOM element has no size until it is attached; render once it is.
  requestAnimationFrame(() => state.refresh(true));
  state.refresh(true);
}

// --------------------------------------------------------------------------------------------
// Sample: mask preview images after a run
// --------------------------------------------------------------------------------------------

function loadImage(url) {
  return new Promise((resolve) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => resolve(null);
    img.src = url;
  });
}

function previewUrls(images) {
  const rand = typeof app.getRandParam === "function" ? app.getRandParam() : `&rand=${Math.random()}`;
  return viewPaths(images).map((path) => api.apiURL(`${path}${rand}`));
}

function setCaption(node, text) {
  if (!node.fatezeroCaption) {
    node.fatezeroCaption = addContentWidget(node, CAPTION_WIDGET, "fatezero-caption", 40);
  }
  const box = node.fatezeroCaption;
  box.inner.textContent = text;
  box.measure();
}

async function showSamplePreview(node, message) {
  const images = Array.isArray(message?.images) ? message.images : [];
  if (!images.length) return;
  const frames = images.length;
  setCaption(node, `Mask preview, ${frames} frame${frames === 1 ? "" : "s"}. Left: blend mask `
    + "(white = edited). Right: the blend words' source attention.");
  const urls = previewUrls(images);
  node.fatezeroPreview = { frames, urls, loaded: 0 };
  // ComfyUI shows an executed node's images when it next draws the node; load them here as well
  // so the preview is there even for a node that is off screen or collapsed during the run.
  const loaded = (await Promise.all(urls.map(loadImage))).filter(Boolean);
  if (node.fatezeroPreview?.urls !== urls) return; // a newer run took over
  node.fatezeroPreview.loaded = loaded.length;
  if (loaded.length && !(node.imgs?.length)) {
    node.imageIndex = null;
    node.imgs = loaded;
  }
  fitNode(node);
}

function showMetricsTable(node, message) {
  const text = Array.isArray(message?.text) ? message.text.join("\n") : "";
  if (!text) return;
  if (!node.fatezeroMetrics) {
    node.fatezeroMetrics = addContentWidget(node, METRICS_WIDGET, "fatezero-metrics", 120);
  }
  const box = node.fatezeroMetrics;
  box.inner.replaceChildren(el("pre", null, text));
  box.measure();
}

// --------------------------------------------------------------------------------------------

app.registerExtension({
  name: "FateZero.Frontend",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (SETTINGS_NODES.includes(nodeData?.name)) {
      chain(nodeType.prototype, "onNodeCreated", function () {
        setupBlendSettings(this);
      });
    } else if (nodeData?.name === SAMPLE_NODE) {
      chain(nodeType.prototype, "onExecuted", function (message) {
        showSamplePreview(this, message);
      });
    } else if (nodeData?.name === METRICS_NODE) {
      chain(nodeType.prototype, "onExecuted", function (message) {
        showMetricsTable(this, message);
      });
    }
  },
});
