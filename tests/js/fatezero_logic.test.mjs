// Unit tests of web/fatezero_logic.js, run with node's built-in runner: `node --test tests/js/`.
import { test } from "node:test";
import assert from "node:assert/strict";

import {
  addWord, analyse, changedWords, diffWords, effectiveMode, listHas, missingWords, parseList,
  promptHas, removeWord, stripWord, tokenize, viewPaths, weightedWords, wordKey,
} from "../../web/fatezero_logic.js";

const ops = (diff) => diff.map((d) => `${{ keep: "=", remove: "-", add: "+" }[d.op]}${d.text}`);

test("wordKey and stripWord ignore case and the punctuation around a word", () => {
  assert.equal(wordKey("Jeep,"), "jeep");
  assert.equal(wordKey("(Porsche)."), "porsche");
  assert.equal(wordKey("don't"), "don't");
  assert.equal(wordKey("---"), "---"); // all punctuation is kept whole
  assert.equal(stripWord("\"Wonder"), "Wonder");
  assert.equal(wordKey("Café!"), "café");
  assert.equal(wordKey(""), "");
});

test("tokenize splits on any whitespace", () => {
  assert.deepEqual(tokenize("  a\tsilver\n jeep,  ").map((w) => w.text), ["a", "silver", "jeep,"]);
  assert.deepEqual(tokenize(""), []);
  assert.deepEqual(tokenize(undefined), []);
});

test("diffWords: a replaced word is removed then added; the rest is kept", () => {
  const diff = diffWords("a silver jeep driving down a curvy road",
    "a Porsche car driving down a curvy road");
  assert.deepEqual(ops(diff), ["=a", "-silver", "-jeep", "+Porsche", "+car", "=driving", "=down",
    "=a", "=curvy", "=road"]);
  assert.deepEqual(diff[1], { op: "remove", text: "silver", word: "silver", key: "silver",
    source: 1, target: null });
  assert.deepEqual(diff[3], { op: "add", text: "Porsche", word: "Porsche", key: "porsche",
    source: null, target: 1 });
});

test("diffWords: added style words and a removed word (refine edits)", () => {
  assert.deepEqual(ops(diffWords("a jeep car", "watercolor painting of a jeep car")),
    ["+watercolor", "+painting", "+of", "=a", "=jeep", "=car"]);
  assert.deepEqual(ops(diffWords("a black swan swimming", "a swan swimming")),
    ["=a", "-black", "=swan", "=swimming"]);
  assert.deepEqual(ops(diffWords("", "a cat")), ["+a", "+cat"]);
  assert.deepEqual(ops(diffWords("a cat", "")), ["-a", "-cat"]);
  assert.deepEqual(diffWords("", ""), []);
});

test("diffWords compares case-insensitively, ignoring punctuation around words", () => {
  const diff = diffWords("A Silver jeep, on the road.", "a silver JEEP on the road");
  assert.ok(diff.every((d) => d.op === "keep"), ops(diff).join(" "));
  assert.equal(diff[2].text, "JEEP"); // kept words show the target's spelling
});

test("diffWords keeps the longest common subsequence", () => {
  const diff = diffWords("a b c d e", "a c b d e");
  assert.equal(diff.filter((d) => d.op === "keep").length, 4);
  assert.equal(diff.filter((d) => d.op === "remove").length, 1);
  assert.equal(diff.filter((d) => d.op === "add").length, 1);
  // every source word and every target word appears exactly once, in order
  assert.deepEqual(diff.filter((d) => d.op !== "add").map((d) => d.source), [0, 1, 2, 3, 4]);
  assert.deepEqual(diff.filter((d) => d.op !== "remove").map((d) => d.target), [0, 1, 2, 3, 4]);
});

test("changedWords: stripped, first spelling once, no punctuation-only words", () => {
  const diff = diffWords("a Jeep, a jeep - driving", "a car, a car driving");
  assert.deepEqual(changedWords(diff), { source: ["Jeep"], target: ["car"] });
  assert.deepEqual(changedWords(diffWords("a silver jeep", "a Porsche car")),
    { source: ["silver", "jeep"], target: ["Porsche", "car"] });
  assert.deepEqual(changedWords(diffWords("same words", "Same words.")), { source: [], target: [] });
});

test("parseList splits on commas, semicolons and newlines", () => {
  assert.deepEqual(parseList(" jeep, Wonder Woman ;car\n\n ,"), ["jeep", "Wonder Woman", "car"]);
  assert.deepEqual(parseList(""), []);
  assert.deepEqual(parseList(null), []);
});

test("addWord appends comma-separated, without duplicates", () => {
  assert.equal(addWord("", "jeep"), "jeep");
  assert.equal(addWord("jeep", "silver"), "jeep, silver");
  assert.equal(addWord("jeep, ", "silver"), "jeep, silver");
  assert.equal(addWord("jeep;car", "road"), "jeep;car, road"); // the user's own separators stay
  assert.equal(addWord("jeep, silver", "Jeep"), "jeep, silver"); // already there (case)
  assert.equal(addWord("Jeep,", "jeep"), "Jeep,"); // already there (punctuation)
  assert.equal(addWord("jeep", "  "), "jeep");
  let list = "";
  for (const word of ["jeep", "car", "jeep", "CAR", "road"]) list = addWord(list, word);
  assert.equal(list, "jeep, car, road");
});

test("listHas and removeWord", () => {
  assert.ok(listHas("jeep, Wonder  Woman", "wonder woman"));
  assert.ok(!listHas("jeep, Wonder Woman", "wonder"));
  assert.ok(!listHas("", "jeep"));
  assert.equal(removeWord("jeep, silver; car", "SILVER"), "jeep, car");
  assert.equal(removeWord("jeep", "jeep"), "");
  assert.equal(removeWord("jeep;car", "road"), "jeep;car"); // not listed: unchanged
});

test("promptHas matches single and consecutive words", () => {
  const prompt = "Wonder Woman, wearing a cowboy hat, is skiing";
  assert.ok(promptHas(prompt, "wonder woman"));
  assert.ok(promptHas(prompt, "HAT"));
  assert.ok(promptHas(prompt, "cowboy hat"));
  assert.ok(!promptHas(prompt, "woman wonder"));
  assert.ok(!promptHas(prompt, "hats"));
  assert.ok(!promptHas(prompt, ""));
});

test("missingWords lists the entries that are not in the prompt", () => {
  const source = "a silver jeep driving down a curvy road";
  assert.deepEqual(missingWords("jeep, car, Silver; curvy road", source), ["car"]);
  assert.deepEqual(missingWords("", source), []);
  assert.deepEqual(missingWords("jeep", ""), ["jeep"]);
});

test("weightedWords reads 'word: value' lists", () => {
  assert.deepEqual(weightedWords("watercolor: 10, silver: 2"), ["watercolor", "silver"]);
  assert.deepEqual(weightedWords("jeep: 0.2-0.9; Wonder Woman: 0.5"), ["jeep", "Wonder Woman"]);
  assert.deepEqual(weightedWords(": 3"), []);
});

test("effectiveMode: auto follows the word counts", () => {
  assert.equal(effectiveMode("auto", 4, 4), "replace");
  assert.equal(effectiveMode("auto", 4, 6), "refine");
  assert.equal(effectiveMode("refine", 4, 4), "refine");
  assert.equal(effectiveMode("replace", 4, 6), "replace");
  assert.equal(effectiveMode(undefined, 1, 2), "refine");
});

test("analyse: missing blend words give warnings naming the word and the prompt", () => {
  const result = analyse({
    source_prompt: "a silver jeep driving down a curvy road",
    target_prompt: "a Porsche car driving down a curvy road",
    blend_words: "jeep, car",
    target_blend_words: "Porsche car, jeep",
    mode: "auto",
  });
  assert.deepEqual(result.changed, { source: ["silver", "jeep"], target: ["Porsche", "car"] });
  assert.deepEqual(result.missing, { blend: ["car"], target: ["jeep"] });
  assert.equal(result.mode, "replace");
  assert.equal(result.sourceCount, 8);
  assert.deepEqual(result.warnings.map((w) => [w.field, w.word]),
    [["blend_words", "car"], ["target_blend_words", "jeep"]]);
  assert.match(result.warnings[0].message, /blend word 'car' is not in the source prompt/);
  assert.match(result.warnings[1].message, /target blend word 'jeep' is not in the target prompt/);
});

test("analyse: no warnings when every word is found (case and punctuation ignored)", () => {
  const result = analyse({
    source_prompt: "A Silver Jeep, driving.",
    target_prompt: "a Porsche car, driving.",
    blend_words: "jeep; SILVER",
    target_blend_words: "porsche CAR",
    reweight: "porsche: 2",
    cross_replace_words: "Car: 0.2-0.9",
  });
  assert.deepEqual(result.warnings, []);
});

test("analyse: other settings the node would refuse", () => {
  const result = analyse({
    source_prompt: "a jeep car",
    target_prompt: "watercolor painting of a jeep car",
    blend_words: "jeep: 2",
    reweight: "watercolour: 10",
    cross_replace_words: "painting: 0.5",
    mode: "replace",
    local_latent_blend: true,
  });
  const fields = result.warnings.map((w) => w.field);
  assert.deepEqual(fields, ["blend_words", "reweight", "mode"]);
  assert.match(result.warnings[0].message, /contains ':'/);
  assert.match(result.warnings[1].message, /reweight word 'watercolour' is not in the target prompt/);
  assert.match(result.warnings[2].message, /source 3, target 6/);
  const noWords = analyse({ source_prompt: "a jeep", target_prompt: "a car", local_latent_blend: true });
  assert.deepEqual(noWords.warnings.map((w) => w.field), ["local_latent_blend"]);
});

test("analyse tolerates missing values", () => {
  const result = analyse({});
  assert.deepEqual(result.diff, []);
  assert.deepEqual(result.warnings, []);
  assert.deepEqual(analyse(undefined).changed, { source: [], target: [] });
});

test("viewPaths builds /view queries for an executed message's images", () => {
  assert.deepEqual(viewPaths([
    { filename: "ComfyUI_temp_abc_00001_.png", subfolder: "", type: "temp" },
    { filename: "a b&c.png", subfolder: "x/y", type: "output" },
    { subfolder: "" },
  ]), [
    "/view?filename=ComfyUI_temp_abc_00001_.png&subfolder=&type=temp",
    "/view?filename=a+b%26c.png&subfolder=x%2Fy&type=output",
  ]);
  assert.deepEqual(viewPaths(undefined), []);
});
