// The word-rule cases shared with the Python tests (tests/data/word_rules.json), run with node's
// built-in runner: `node --test tests/js/`.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";

import * as logic from "../../web/fatezero_logic.js";
import { wordRuleOutcomes } from "./word_rules_cases.mjs";

const table = JSON.parse(readFileSync(new URL("../data/word_rules.json", import.meta.url), "utf8"));
const outcomes = wordRuleOutcomes(logic, table);

table.prompt_words.forEach((c, i) => {
  test(`prompt words of ${JSON.stringify(c.prompt)}`, () => {
    assert.deepEqual(outcomes.prompt_words[i], c.words);
  });
});

table.word_checks.forEach((c, i) => {
  test(`${c.field} ${JSON.stringify(c.words)} against ${JSON.stringify(c.prompt)}`, () => {
    assert.deepEqual(outcomes.word_checks[i], c.rejected);
  });
});
