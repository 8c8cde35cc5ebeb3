// Pure helpers for the FateZero frontend extension: no DOM, no ComfyUI imports, so node's test
// runner can import this file directly (tests/js/).
//
// Word rules are the pack's Python ones (fatezero_core/prompt_syntax.py, prompt_align.py and
// edit_text.py), so what the node shows matches what the node will accept; the cases both sides
// are tested on are in tests/data/word_rules.json:
// - a prompt is read in ComfyUI's prompt syntax: `(word:1.2)` and `(word)` are the bare word,
//   `\(` is a literal parenthesis, and `embedding:name` is a word of its own (assumed to exist);
// - a prompt's words are its whitespace-separated bare words (text joined across a group without
//   whitespace stays one word: `(jeep:1.2),` is the word `jeep,`);
// - a word is compared lowercased, without the punctuation around it ("Jeep," == "jeep");
// - word lists (blend_words, target_blend_words) are separated by commas, semicolons or newlines;
//   an entry may hold several words ("Wonder Woman") that must appear consecutively, and holds no
//   ':' (except in `embedding:name`);
// - reweight and cross_replace_words are "word: value" lists of target-prompt words.

const ALNUM = /[\p{L}\p{N}]/u;
const LIST_SEPARATORS = /[,;\n]/;
const EMBEDDING_PREFIX = "embedding:";
// Stand-ins for escaped parentheses while groups are read (private-use characters).
const ESCAPED = [["\\(", "\ue000"], ["\\)", "\ue001"]];
const FLOAT = /^[+-]?(?:(?:\d+(?:_\d+)*)(?:\.(?:\d+(?:_\d+)*)?)?|\.\d+(?:_\d+)*)(?:[eE][+-]?\d+(?:_\d+)*)?$|^[+-]?(?:inf|infinity|nan)$/i;

/** `text` without the punctuation around it (case kept); all-punctuation text is kept whole. */
export function stripWord(text) {
  const chars = Array.from(String(text ?? ""));
  let start = 0;
  let end = chars.length;
  while (start < end && !ALNUM.test(chars[start])) start += 1;
  while (end > start && !ALNUM.test(chars[end - 1])) end -= 1;
  const core = chars.slice(start, end).join("");
  return core || chars.join("");
}

/** The comparison key of a word: lowercased, without the punctuation around it. */
export function wordKey(text) {
  return stripWord(String(text ?? "").toLowerCase());
}

function isFloat(text) {
  return FLOAT.test(text.trim());
}

/** Top-level parts of `text`: plain runs and `( ... )` groups, read as ComfyUI reads them. */
function splitGroups(text) {
  const parts = [];
  let start = 0;
  let depth = 0;
  for (let i = 0; i < text.length; i += 1) {
    if (text[i] === "(") {
      if (depth === 0 && i > start) {
        parts.push(text.slice(start, i));
        start = i;
      }
      depth += 1;
    } else if (text[i] === ")") {
      depth -= 1;
      if (depth === 0) {
        parts.push(text.slice(start, i + 1));
        start = i + 1;
      }
    }
  }
  if (start < text.length) parts.push(text.slice(start));
  return parts;
}

/** The text runs of `text` with the weight syntax removed, each tokenized on its own. */
function segments(text) {
  const out = [];
  for (const part of splitGroups(text)) {
    if (part.length >= 2 && part[0] === "(" && part[part.length - 1] === ")") {
      let inner = part.slice(1, -1);
      const colon = inner.lastIndexOf(":");
      if (colon > 0 && isFloat(inner.slice(colon + 1))) inner = inner.slice(0, colon);
      out.push(...segments(inner));
    } else {
      out.push(part);
    }
  }
  return out;
}

function unescape(text) {
  let out = text;
  for (const [literal, standIn] of ESCAPED) out = out.split(standIn).join(literal[1]);
  return out;
}

/** `"a jeep embedding:x, road"` -> `["a jeep", "embedding:x, road"]` (the separator dropped). */
function splitEmbeddings(segment) {
  const runs = [];
  let start = 0;
  let i = 0;
  for (;;) {
    const found = [segment.indexOf(` ${EMBEDDING_PREFIX}`, i), segment.indexOf(`\n${EMBEDDING_PREFIX}`, i)]
      .filter((p) => p >= 0);
    if (found.length === 0) break;
    const cut = Math.min(...found);
    runs.push(segment.slice(start, cut));
    start = cut + 1;
    i = start;
  }
  runs.push(segment.slice(start));
  return runs.filter((run) => run.length > 0);
}

/**
 * The bare words of `prompt` in ComfyUI's prompt syntax, as FateZero aligns them
 * (fatezero_core/prompt_syntax.py `read_prompt`): weights removed, whitespace-separated, an
 * embedding a word of its own written `embedding:name`.
 */
export function promptWords(prompt) {
  let escaped = String(prompt ?? "");
  for (const [literal, standIn] of ESCAPED) escaped = escaped.split(literal).join(standIn);
  const words = [];
  let joins = false; // the next text continues the last word (no whitespace in between)
  const addText = (text) => {
    const fragments = text.split(/\s+/).filter((f) => f.length > 0);
    if (fragments.length && joins && !/^\s/.test(text)) words[words.length - 1] += fragments.shift();
    words.push(...fragments);
    joins = words.length > 0 && text.length > 0 && !/\s$/.test(text);
  };
  for (const segment of segments(escaped)) {
    for (let run of splitEmbeddings(unescape(segment))) {
      if (run.startsWith(EMBEDDING_PREFIX)) {
        const body = run.slice(EMBEDDING_PREFIX.length);
        const name = body.trim().split(/\s+/)[0];
        if (name) {
          words.push(EMBEDDING_PREFIX + name);
          joins = true;
          run = body.trimStart().slice(name.length);
          if (!run) continue;
        }
      }
      addText(run);
    }
  }
  return words;
}

/** A prompt's words: `[{text, word, key}]` (`text` the bare word, `word` stripped, `key` compared). */
export function tokenize(prompt) {
  return promptWords(prompt).map((text) => ({ text, word: stripWord(text), key: wordKey(text) }));
}

/**
 * Word-level diff of two prompts by longest common subsequence of the word keys.
 *
 * Returns `[{op, text, word, key, source, target}]` in reading order, where `op` is "keep"
 * (in both prompts; `text` is the target's spelling), "remove" (only in the source) or "add"
 * (only in the target); `source`/`target` are the word indices (null where absent). Inside a
 * changed stretch the removed words come before the added ones.
 */
export function diffWords(sourcePrompt, targetPrompt) {
  const src = tokenize(sourcePrompt);
  const tgt = tokenize(targetPrompt);
  const n = src.length;
  const m = tgt.length;
  // lcs[i][j]: LCS length of src[i:] and tgt[j:]
  const lcs = Array.from({ length: n + 1 }, () => new Array(m + 1).fill(0));
  for (let i = n - 1; i >= 0; i -= 1) {
    for (let j = m - 1; j >= 0; j -= 1) {
      lcs[i][j] = src[i].key === tgt[j].key
        ? lcs[i + 1][j + 1] + 1
        : Math.max(lcs[i + 1][j], lcs[i][j + 1]);
    }
  }
  const ops = [];
  const pending = { remove: [], add: [] };
  const flush = () => {
    ops.push(...pending.remove, ...pending.add);
    pending.remove = [];
    pending.add = [];
  };
  let i = 0;
  let j = 0;
  while (i < n || j < m) {
    if (i < n && j < m && src[i].key === tgt[j].key) {
      flush();
      ops.push({ op: "keep", ...tgt[j], source: i, target: j });
      i += 1;
      j += 1;
    } else if (j >= m || (i < n && lcs[i + 1][j] >= lcs[i][j + 1])) {
      pending.remove.push({ op: "remove", ...src[i], source: i, target: null });
      i += 1;
    } else {
      pending.add.push({ op: "add", ...tgt[j], source: null, target: j });
      j += 1;
    }
  }
  flush();
  return ops;
}

function uniqueWords(items) {
  const seen = new Set();
  const out = [];
  for (const item of items) {
    if (!item.key || seen.has(item.key) || !ALNUM.test(item.key)) continue;
    seen.add(item.key);
    out.push(item.word);
  }
  return out;
}

/**
 * The words that differ: `{source: [...removed source words], target: [...added target words]}`,
 * punctuation stripped, case kept, first spelling of each word only, all-punctuation words left out.
 * `diff` is the result of {@link diffWords}.
 */
export function changedWords(diff) {
  return {
    source: uniqueWords(diff.filter((d) => d.op === "remove")),
    target: uniqueWords(diff.filter((d) => d.op === "add")),
  };
}

/** Entries of a word list ("jeep, Wonder Woman"), trimmed, empty ones dropped. */
export function parseList(text) {
  return String(text ?? "")
    .split(LIST_SEPARATORS)
    .map((entry) => entry.trim())
    .filter((entry) => entry.length > 0);
}

/** The keys of an entry's words: an entry is plain words, not prompt syntax. */
function entryKeys(entry) {
  return String(entry ?? "").split(/\s+/).filter((w) => w.length > 0).map(wordKey);
}

function entryKey(entry) {
  return entryKeys(entry).join(" ");
}

/** Whether a word-list entry holds a ':' the node refuses (`embedding:name` may hold one). */
function hasValueSeparator(entry) {
  const bare = entry.toLowerCase().startsWith(EMBEDDING_PREFIX)
    ? entry.slice(EMBEDDING_PREFIX.length) : entry;
  return bare.includes(":");
}

/** Whether the list already names `word` (case and surrounding punctuation ignored). */
export function listHas(text, word) {
  const key = entryKey(word);
  return key.length > 0 && parseList(text).some((entry) => entryKey(entry) === key);
}

/**
 * `text` with `word` appended as a comma-separated entry; unchanged when `word` is empty or
 * already listed. The existing entries keep their spelling and separators.
 */
export function addWord(text, word) {
  const clean = String(word ?? "").trim();
  const current = String(text ?? "");
  if (!clean || listHas(current, clean)) return current;
  const head = current.replace(/[\s,;]+$/, "");
  return head ? `${head}, ${clean}` : clean;
}

/** `text` without the entries naming `word`; the rest rejoined with ", ". */
export function removeWord(text, word) {
  const key = entryKey(word);
  if (!key || !listHas(text, word)) return String(text ?? "");
  return parseList(text).filter((entry) => entryKey(entry) !== key).join(", ");
}

/** Whether `entry` (one or more words) appears in `prompt` as consecutive words. */
export function promptHas(prompt, entry) {
  const keys = entryKeys(entry);
  if (keys.length === 0) return false;
  const words = tokenize(prompt).map((w) => w.key);
  for (let start = 0; start + keys.length <= words.length; start += 1) {
    if (keys.every((key, k) => words[start + k] === key)) return true;
  }
  return false;
}

/** The entries of the word list `text` that are not in `prompt`. */
export function missingWords(text, prompt) {
  return parseList(text).filter((entry) => !hasValueSeparator(entry) && !promptHas(prompt, entry));
}

/** The word part of each "word: value" entry (entries without a value are kept whole). */
export function weightedWords(text) {
  return parseList(text)
    .map((entry) => {
      const cut = entry.lastIndexOf(":");
      return (cut >= 0 ? entry.slice(0, cut) : entry).trim();
    })
    .filter((word) => word.length > 0);
}

/** Which alignment `mode` will run: "replace" or "refine" ("auto" follows the word counts). */
export function effectiveMode(mode, sourceCount, targetCount) {
  const key = String(mode ?? "auto").trim().toLowerCase();
  if (key === "replace" || key === "refine") return key;
  return sourceCount === targetCount ? "replace" : "refine";
}

/**
 * Everything the Blend Settings panel shows, from the node's widget values.
 *
 * `values`: {source_prompt, target_prompt, blend_words, target_blend_words, reweight,
 * cross_replace_words, mode, local_latent_blend}. Returns
 * `{diff, changed, sourceCount, targetCount, mode, missing: {blend, target}, warnings}` where each
 * warning is `{field, word, message}`.
 */
export function analyse(values) {
  const v = values ?? {};
  const source = String(v.source_prompt ?? "");
  const target = String(v.target_prompt ?? "");
  const diff = diffWords(source, target);
  const sourceCount = tokenize(source).length;
  const targetCount = tokenize(target).length;
  const warnings = [];
  const warn = (field, word, message) => warnings.push({ field, word, message });

  const blendMissing = missingWords(v.blend_words, source);
  const targetMissing = missingWords(v.target_blend_words, target);
  for (const word of blendMissing) {
    warn("blend_words", word, `blend word '${word}' is not in the source prompt`);
  }
  for (const word of targetMissing) {
    warn("target_blend_words", word, `target blend word '${word}' is not in the target prompt`);
  }
  for (const field of ["blend_words", "target_blend_words"]) {
    for (const entry of parseList(v[field]).filter(hasValueSeparator)) {
      warn(field, entry, `${field}: '${entry}' contains ':'; list plain words separated by commas`);
    }
  }
  for (const field of ["reweight", "cross_replace_words"]) {
    for (const word of weightedWords(v[field])) {
      if (!promptHas(target, word)) {
        warn(field, word, `${field} word '${word}' is not in the target prompt`);
      }
    }
  }
  const modeKey = String(v.mode ?? "auto").trim().toLowerCase();
  if (modeKey === "replace" && source.trim() && target.trim() && sourceCount !== targetCount) {
    warn("mode", null,
      `replace mode needs the same number of words (source ${sourceCount}, target ${targetCount}); `
      + "use auto or refine");
  }
  if (v.local_latent_blend === true && parseList(v.blend_words).length === 0) {
    warn("local_latent_blend", null, "local_latent_blend needs blend_words");
  }
  return {
    diff,
    changed: changedWords(diff),
    sourceCount,
    targetCount,
    mode: effectiveMode(v.mode, sourceCount, targetCount),
    missing: { blend: blendMissing, target: targetMissing },
    warnings,
  };
}

/**
 * `/view` paths (no host) of an executed message's images, in order:
 * `[{filename, subfolder, type}]` -> `"/view?filename=...&subfolder=...&type=..."`.
 */
export function viewPaths(images) {
  if (!Array.isArray(images)) return [];
  return images
    .filter((image) => image && typeof image.filename === "string" && image.filename)
    .map((image) => {
      const query = new URLSearchParams({
        filename: image.filename,
        subfolder: image.subfolder ?? "",
        type: image.type ?? "output",
      });
      return `/view?${query.toString()}`;
    });
}
