// Runs the word-rule cases of tests/data/word_rules.json through a loaded web/fatezero_logic.js.
// Shared by node's test runner (word_rules.test.mjs) and the Chromium test
// (tests/host/test_web_extension.py), which passes the module as the page loaded it.

/** What the logic says for each case: `{prompt_words: [[key, ...]], word_checks: [[word, ...]]}`. */
export function wordRuleOutcomes(logic, table) {
  return {
    prompt_words: table.prompt_words.map((c) => logic.tokenize(c.prompt).map((w) => w.key)),
    word_checks: table.word_checks.map((c) => {
      const prompt = c.field === "blend_words" ? "source_prompt" : "target_prompt";
      const result = logic.analyse({ [prompt]: c.prompt, [c.field]: c.words });
      return result.warnings.filter((w) => w.field === c.field).map((w) => w.word);
    }),
  };
}
