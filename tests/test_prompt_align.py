"""Prompt alignment against hand-worked token tables (official ``make_controller`` and its mappers).

The fake tokenizer mimics CLIP BPE: lowercase, punctuation split into separate tokens, and a few
words that split into several tokens ("porsche" -> 2 tokens, "watercolor" -> 3 tokens). Unknown
words raise KeyError so every table below is explicit.
"""

from __future__ import annotations

import re

import pytest
import torch

from fatezero_core.errors import PromptError
from fatezero_core.prompt_align import (
    BOS,
    EOS,
    TokenAlignment,
    align_prompts,
    choose_mode,
    cross_replace_alphas,
    embedding_token_ids,
    equalizer,
    is_embedding_id,
    refinement_mapper,
    replacement_mapper,
    require_word_token_indices,
    self_replace_window,
    tokenize_prompt,
    word_token_indices,
)

# ---- fake CLIP vocabulary -------------------------------------------------------------------
A, SILVER, JEEP, DRIVING, DOWN, ROAD = 320, 3000, 3001, 3002, 3003, 3004
PAINTING, OF, CAR, IN, THE, COUNTRYSIDE = 3005, 3006, 3007, 3008, 3009, 3010
RED, WONDER, WOMAN, ON, CAT = 3011, 3012, 3013, 3014, 3015
P1, P2 = 5001, 5002  # "porsche"
W1, W2, W3 = 6001, 6002, 6003  # "watercolor"
COMMA, DOT, DASH = 267, 269, 268
LPAREN, RPAREN, LBRACKET, RBRACKET, COLON = 263, 264, 336, 337, 281
EMBEDDING, STYLE = 7001, 7002

VOCAB = {
    "a": [A], "silver": [SILVER], "jeep": [JEEP], "driving": [DRIVING], "down": [DOWN],
    "road": [ROAD], "painting": [PAINTING], "of": [OF], "car": [CAR], "in": [IN], "the": [THE],
    "countryside": [COUNTRYSIDE], "red": [RED], "wonder": [WONDER], "woman": [WOMAN],
    "on": [ON], "cat": [CAT], "porsche": [P1, P2], "watercolor": [W1, W2, W3],
    ",": [COMMA], ".": [DOT], "-": [DASH],
    "(": [LPAREN], ")": [RPAREN], "[": [LBRACKET], "]": [RBRACKET], ":": [COLON],
    "embedding": [EMBEDDING], "style": [STYLE],
}


def fake_tokenize(text: str) -> list[int]:
    """CLIP-like BPE ids without BOS/EOS: lowercased, punctuation as separate tokens."""
    ids: list[int] = []
    for piece in re.findall(r"[a-z]+|[^\sa-z]", text.lower()):
        ids.extend(VOCAB[piece])
    return ids


def tok(prompt: str):
    return tokenize_prompt(prompt, fake_tokenize)


JEEP_PROMPT = "a silver jeep driving down a road"
WATERCOLOR_PROMPT = "watercolor painting of a silver jeep driving down a road"
PORSCHE_PROMPT = "a silver porsche driving down a road"


# ---- tokenize_prompt ------------------------------------------------------------------------


def test_tokenize_prompt_layout_and_spans():
    pt = tok("A Porsche car, in the countryside.")
    #  pos: 0    1  2   3   4    5  6   7    8            9   10   11..76
    #       BOS  a  p1  p2  car  ,  in  the  countryside  .   EOS  EOS padding
    expected = [BOS, A, P1, P2, CAR, COMMA, IN, THE, COUNTRYSIDE, DOT, EOS] + [EOS] * 66
    assert list(pt.ids) == expected
    assert len(pt.ids) == 77
    assert pt.words == ("A", "Porsche", "car,", "in", "the", "countryside.")
    assert [list(s) for s in pt.word_spans] == [[1], [2, 3], [4, 5], [6], [7], [8, 9]]
    assert [list(s) for s in pt.core_spans] == [[1], [2, 3], [4], [6], [7], [8]]
    assert pt.num_content_tokens == 9
    assert pt.eos_index == 10
    assert list(pt.sequence) == expected[:11]


def test_tokenize_prompt_rejects_more_than_75_tokens():
    ok = tok(" ".join(["a"] * 75))
    assert list(ok.ids) == [BOS] + [A] * 75 + [EOS]
    with pytest.raises(PromptError, match=r"76 tokens.*at most 75.*shorten it by 1"):
        tok(" ".join(["a"] * 76))
    # 26 words of 3 tokens each = 78 tokens
    with pytest.raises(PromptError, match=r"78 tokens"):
        tok(" ".join(["watercolor"] * 26))


def test_tokenize_prompt_rejects_tokenizer_with_bos_eos():
    with pytest.raises(PromptError, match="without|only the content"):
        tokenize_prompt("a cat", lambda text: [BOS, *fake_tokenize(text), EOS])


def test_tokenize_prompt_rejects_tokenizer_that_merges_words():
    def merging(text):
        ids = fake_tokenize(text)
        return [9999] if text == "a cat" else ids

    with pytest.raises(PromptError, match="word by word"):
        tokenize_prompt("a cat", merging)


# ---- word lookup ----------------------------------------------------------------------------


def test_word_lookup_ignores_attached_punctuation():
    pt = tok("A Porsche car, in the countryside.")
    assert word_token_indices(pt, "countryside") == [8]  # not the "." at 9
    assert word_token_indices(pt, "countryside.") == [8]
    assert word_token_indices(pt, "car") == [4]  # not the "," at 5
    assert word_token_indices(pt, "porsche") == [2, 3]  # both BPE pieces


def test_word_lookup_is_case_insensitive():
    pt = tok(JEEP_PROMPT)
    assert word_token_indices(pt, "Jeep") == [3]
    assert word_token_indices(pt, "JEEP") == [3]
    assert word_token_indices(tok("A Porsche car"), "porsche") == [2, 3]


def test_word_lookup_returns_all_occurrences():
    assert word_token_indices(tok(JEEP_PROMPT), "a") == [1, 6]


def test_word_lookup_multi_word_matches_consecutive_words():
    pt = tok("a Wonder Woman, on a wonder road")
    # a=1 wonder=2 woman=3 ,=4 on=5 a=6 wonder=7 road=8
    assert word_token_indices(pt, "Wonder Woman") == [2, 3]
    assert word_token_indices(pt, "wonder") == [2, 7]
    assert word_token_indices(pt, "woman on") == [3, 5]


def test_word_lookup_integer_is_word_index():
    pt = tok("A Porsche car, in the countryside.")
    assert word_token_indices(pt, 1) == [2, 3]
    assert word_token_indices(pt, 2) == [4]
    assert word_token_indices(pt, 6) == []
    assert word_token_indices(pt, -1) == []


def test_word_lookup_missing_word_is_empty_and_required_lookup_raises():
    pt = tok(JEEP_PROMPT)
    assert word_token_indices(pt, "truck") == []
    assert word_token_indices(pt, "jeeps") == []
    with pytest.raises(PromptError) as info:
        require_word_token_indices(pt, "truck")
    message = str(info.value)
    assert "blend word 'truck'" in message
    assert f"'{JEEP_PROMPT}'" in message
    assert "use one of: a, silver, jeep, driving, down, road" in message
    with pytest.raises(PromptError, match="word index"):
        require_word_token_indices(pt, 7)
    assert require_word_token_indices(pt, "Jeep") == [3]


def test_word_lookup_rejects_empty_and_non_words():
    pt = tok(JEEP_PROMPT)
    with pytest.raises(PromptError, match="empty"):
        word_token_indices(pt, "  ")
    with pytest.raises(PromptError):
        word_token_indices(pt, True)
    with pytest.raises(PromptError):
        word_token_indices(pt, 1.5)


# ---- replace mapper -------------------------------------------------------------------------


def official_replacement_mapper(src, tgt) -> torch.Tensor:
    """The official loop's result, restated for comparison (M[j, j] after the last changed word)."""
    changed = [k for k, (ws, wt) in enumerate(zip(src.words, tgt.words)) if ws != wt]
    m = torch.zeros(77, 77)
    i = j = k = 0
    while i < 77 and j < 77:
        if k < len(changed) and src.word_spans[changed[k]].start == i:
            s, t = list(src.word_spans[changed[k]]), list(tgt.word_spans[changed[k]])
            if len(s) == len(t):
                for a, b in zip(s, t):
                    m[a, b] = 1
            else:
                for b in t:
                    m[s, b] = 1 / len(t)
            i, j, k = i + len(s), j + len(t), k + 1
        else:
            row = i if k < len(changed) else j
            m[row, j] = 1
            i, j = i + 1, j + 1
    return m


def test_replacement_mapper_equal_token_counts_is_identity_and_matches_official():
    src, tgt = tok(JEEP_PROMPT), tok("a red car driving down a road")
    m = replacement_mapper(src, tgt)
    assert m.shape == (77, 77) and m.dtype == torch.float32
    # silver(2) -> red(2), jeep(3) -> car(3): every word has one token, so the map is the identity
    assert torch.equal(m, torch.eye(77))
    assert torch.equal(m, official_replacement_mapper(src, tgt))

    src3, tgt3 = tok("a silver jeep, in the countryside"), tok("a red car, on the road")
    assert torch.equal(replacement_mapper(src3, tgt3), official_replacement_mapper(src3, tgt3))


def test_replacement_mapper_more_target_tokens_hand_table():
    src, tgt = tok(JEEP_PROMPT), tok(PORSCHE_PROMPT)
    # src: 0 BOS 1 a 2 silver 3 jeep 4 driving 5 down 6 a 7 road 8 EOS 9.. pad
    # tgt: 0 BOS 1 a 2 silver 3 p1 4 p2 5 driving 6 down 7 a 8 road 9 EOS 10.. pad
    expected = torch.zeros(77, 77)
    entries = [
        (0, 0, 1.0), (1, 1, 1.0), (2, 2, 1.0),
        (3, 3, 0.5), (3, 4, 0.5),  # jeep -> porsche: 1/len(target tokens) each
        (4, 5, 1.0), (5, 6, 1.0), (6, 7, 1.0), (7, 8, 1.0),
    ]
    entries += [(i, i + 1, 1.0) for i in range(8, 76)]  # EOS -> EOS, pad -> pad
    for i, j, w in entries:
        expected[i, j] = w
    m = replacement_mapper(src, tgt)
    assert torch.equal(m, expected)
    assert m[76].sum() == 0  # the last source pad has no target partner
    # the official loop writes M[j, j] after the changed word: driving would read "down"
    official = official_replacement_mapper(src, tgt)
    assert official[5, 5] == 1 and official[4, 5] == 0
    assert m[4, 5] == 1 and m[5, 5] == 0


def test_replacement_mapper_fewer_target_tokens_hand_table():
    src, tgt = tok(PORSCHE_PROMPT), tok(JEEP_PROMPT)
    # src: 0 BOS 1 a 2 silver 3 p1 4 p2 5 driving 6 down 7 a 8 road 9 EOS
    # tgt: 0 BOS 1 a 2 silver 3 jeep 4 driving 5 down 6 a 7 road 8 EOS
    expected = torch.zeros(77, 77)
    entries = [
        (0, 0, 1.0), (1, 1, 1.0), (2, 2, 1.0),
        (3, 3, 1.0), (4, 3, 1.0),  # both porsche pieces -> jeep, weight 1/1
        (5, 4, 1.0), (6, 5, 1.0), (7, 6, 1.0), (8, 7, 1.0),
    ]
    entries += [(i, i - 1, 1.0) for i in range(9, 77)]
    for i, j, w in entries:
        expected[i, j] = w
    m = replacement_mapper(src, tgt)
    assert torch.equal(m, expected)
    assert m[:, 76].sum() == 0  # the last target pad has no source partner


def test_replacement_mapper_columns_sum_to_one_for_equal_token_counts():
    m = replacement_mapper(tok("a silver jeep, in the countryside"), tok("a red car, on the road"))
    assert torch.equal(m.sum(0), torch.ones(77))
    assert torch.equal(m.sum(1), torch.ones(77))


def test_replacement_mapper_unequal_word_counts_raises():
    with pytest.raises(PromptError, match=r"same number of words.*7.*10.*refine"):
        replacement_mapper(tok(JEEP_PROMPT), tok(WATERCOLOR_PROMPT))


# ---- refine mapper --------------------------------------------------------------------------


def test_refinement_mapper_watercolor_hand_table():
    src, tgt = tok(JEEP_PROMPT), tok(WATERCOLOR_PROMPT)
    # source x (9 ids): 0 BOS 1 a 2 silver 3 jeep 4 driving 5 down 6 a 7 road 8 EOS
    # target y (14 ids): 0 BOS 1 w1 2 w2 3 w3 4 painting 5 of 6 a 7 silver 8 jeep 9 driving
    #                    10 down 11 a 12 road 13 EOS
    # x is a subsequence of y, so the best score is 9 matches: BOS->BOS, a(1)->a(6) (the only "a"
    # before silver(7)), silver, jeep, driving, down, a(6)->a(11), road, EOS; w1..of are new.
    mapper, alphas = refinement_mapper(src, tgt)
    assert mapper.dtype == torch.long and alphas.dtype == torch.float32
    assert mapper.shape == (77,) and alphas.shape == (77,)
    expected_head = [0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]  # new tokens point at 0
    assert mapper[:14].tolist() == expected_head
    assert alphas[:14].tolist() == [1, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1]
    # past the target's EOS: mapper[n] = n, alpha 1 (P2P)
    assert mapper[14:].tolist() == list(range(14, 77))
    assert alphas[14:].tolist() == [1.0] * 63


def test_refinement_mapper_tie_prefers_earliest_target_match():
    # x = BOS a jeep EOS, y = BOS a a jeep EOS. Scores: S[2][3] (x[:2]=BOS a, y[:3]=BOS a a) = 2
    # and its left neighbour S[2][2] = 2, so the traceback takes "left": the second target "a" is
    # new and the first one is matched to source 1.
    mapper, alphas = refinement_mapper(tok("a jeep"), tok("a a jeep"))
    assert mapper[:5].tolist() == [0, 1, 0, 2, 3]
    assert alphas[:5].tolist() == [1, 1, 0, 1, 1]
    assert mapper[5:].tolist() == list(range(5, 77))


def test_refinement_mapper_tie_prefers_skipping_later_source_token():
    # x = BOS a a jeep EOS, y = BOS a jeep EOS. At (i=3, j=2) (second source "a", target "a"):
    # left S[3][1] = 1, up S[2][2] = 2 = S[3][2], so the traceback goes up (skips source 2) and
    # matches target 1 to source 1.
    mapper, alphas = refinement_mapper(tok("a a jeep"), tok("a jeep"))
    assert mapper[:4].tolist() == [0, 1, 3, 4]
    assert alphas.tolist() == [1.0] * 77
    # past the target's EOS P2P keeps mapper[n] = n (here n=4 is the source EOS)
    assert mapper[4:].tolist() == list(range(4, 77))


def test_refinement_mapper_substitution_is_a_new_token():
    # mismatch (-1) never beats two gaps (0): "silver" is new, "red" is dropped
    mapper, alphas = refinement_mapper(tok("a red car"), tok("a silver car"))
    assert mapper[:5].tolist() == [0, 1, 0, 3, 4]
    assert alphas[:5].tolist() == [1, 1, 0, 1, 1]


# ---- equalizer ------------------------------------------------------------------------------


def test_equalizer_target_positions():
    tgt = tok(WATERCOLOR_PROMPT)
    e = equalizer(tgt, {"watercolor": 10})
    expected = torch.ones(77)
    expected[[1, 2, 3]] = 10
    assert torch.equal(e, expected)

    e2 = equalizer(tgt, {"Jeep": 2.0, "a": 0.5, 1: 3})
    expected2 = torch.ones(77)
    expected2[8] = 2.0
    expected2[[6, 11]] = 0.5
    expected2[4] = 3  # word index 1 = "painting"
    assert torch.equal(e2, expected2)


def test_equalizer_missing_word_raises():
    with pytest.raises(PromptError, match=r"reweight word 'porsche' is not in the prompt"):
        equalizer(tok(WATERCOLOR_PROMPT), {"watercolor": 10, "porsche": 5})
    with pytest.raises(PromptError, match="finite"):
        equalizer(tok(WATERCOLOR_PROMPT), {"watercolor": float("nan")})


# ---- schedules ------------------------------------------------------------------------------


def test_cross_replace_alphas_float():
    alpha = cross_replace_alphas(tok(WATERCOLOR_PROMPT), 50, 0.8)
    assert alpha.shape == (51, 77)
    # int(0.8 * 51) = 40: rows 0..39 are 1
    assert torch.equal(alpha[:40], torch.ones(40, 77))
    assert torch.equal(alpha[40:], torch.zeros(11, 77))


def test_cross_replace_alphas_pair_and_per_word_window():
    tgt = tok(WATERCOLOR_PROMPT)
    alpha = cross_replace_alphas(tgt, 50, {"default_": 0.8, "Watercolor": (0.2, 0.5)})
    # watercolor tokens 1, 2, 3: int(0.2 * 51) = 10 <= r < int(0.5 * 51) = 25
    word = torch.zeros(51)
    word[10:25] = 1
    default = torch.zeros(51)
    default[:40] = 1
    for col in range(77):
        assert torch.equal(alpha[:, col], word if col in (1, 2, 3) else default), col

    pair = cross_replace_alphas(tgt, 50, (0.2, 1.0))
    assert pair[:10].sum() == 0 and torch.equal(pair[10:], torch.ones(41, 77))

    no_default = cross_replace_alphas(tgt, 10, {"jeep": 0.5})
    # default (0, 1): all 11 rows; jeep (token 8): int(0.5 * 11) = 5 -> rows 0..4
    assert torch.equal(no_default[:, 0], torch.ones(11))
    assert no_default[:, 8].tolist() == [1.0] * 5 + [0.0] * 6


def test_cross_replace_alphas_bad_input_raises():
    tgt = tok(WATERCOLOR_PROMPT)
    with pytest.raises(PromptError, match="cross_replace_steps word 'porsche'"):
        cross_replace_alphas(tgt, 50, {"default_": 0.8, "porsche": 0.3})
    with pytest.raises(PromptError, match="0 <= start <= end <= 1"):
        cross_replace_alphas(tgt, 50, (0.9, 0.2))
    with pytest.raises(PromptError, match="0 <= start <= end <= 1"):
        cross_replace_alphas(tgt, 50, 1.5)
    with pytest.raises(PromptError, match="fraction"):
        cross_replace_alphas(tgt, 50, "0.8")


def test_self_replace_window():
    assert self_replace_window(50, 0.6) == (0, 30)
    assert self_replace_window(50, (0.2, 0.8)) == (10, 40)
    assert self_replace_window(50, 1) == (0, 50)
    assert self_replace_window(30, 0.5) == (0, 15)
    with pytest.raises(PromptError, match="self_replace_steps"):
        self_replace_window(50, 2)
    with pytest.raises(PromptError, match="self_replace_steps"):
        self_replace_window(50, (0.5, 0.1))


# ---- mode and the bundle --------------------------------------------------------------------


def test_choose_mode():
    jeep, porsche, water = tok(JEEP_PROMPT), tok(PORSCHE_PROMPT), tok(WATERCOLOR_PROMPT)
    assert choose_mode(jeep, porsche, "auto") == "replace"
    assert choose_mode(jeep, water, "auto") == "refine"
    assert choose_mode(jeep, porsche, "refine") == "refine"
    assert choose_mode(jeep, porsche, "Replace") == "replace"
    with pytest.raises(PromptError, match="refine"):
        choose_mode(jeep, water, "replace")
    with pytest.raises(PromptError, match="unknown alignment mode"):
        choose_mode(jeep, water, "swap")


def test_align_prompts_refine_bundle():
    al = align_prompts(
        JEEP_PROMPT, WATERCOLOR_PROMPT, fake_tokenize, 50,
        cross_replace_steps=0.8, self_replace_steps=0.6, reweight={"watercolor": 10},
    )
    assert isinstance(al, TokenAlignment)
    assert al.mode == "refine"
    mapper, alphas = refinement_mapper(tok(JEEP_PROMPT), tok(WATERCOLOR_PROMPT))
    assert torch.equal(al.mapper, mapper) and torch.equal(al.refine_alphas, alphas)
    assert al.equalizer[1:4].tolist() == [10.0, 10.0, 10.0] and al.equalizer.sum() == 74 + 30
    assert al.cross_alphas.shape == (51, 77) and al.cross_alphas[39:41, 0].tolist() == [1.0, 0.0]
    assert al.self_window == (0, 30)
    assert al.target.words[0] == "watercolor" and al.num_steps == 50


def test_align_prompts_replace_bundle():
    al = align_prompts(JEEP_PROMPT, PORSCHE_PROMPT, fake_tokenize, 10)
    assert al.mode == "replace"
    assert torch.equal(al.mapper, replacement_mapper(tok(JEEP_PROMPT), tok(PORSCHE_PROMPT)))
    assert al.refine_alphas is None and al.equalizer is None
    assert al.cross_alphas.shape == (11, 77) and al.self_window == (0, 6)
    with pytest.raises(PromptError, match="refine"):
        align_prompts(JEEP_PROMPT, WATERCOLOR_PROMPT, fake_tokenize, 10, mode="replace")


# ---- ComfyUI prompt syntax ------------------------------------------------------------------
# Tables worked by hand from ComfyUI 0.3.64's reading (comfy/sd1_clip.py: token_weights,
# escape_important, the embedding split of tokenize_with_weights): weights are removed, the words
# keep exactly the tokens ComfyUI encodes.

EMBEDDINGS = {"style": 2, "grain": 1}


def tok_syntax(prompt: str):
    return tokenize_prompt(prompt, fake_tokenize, EMBEDDINGS.get)


def content(pt) -> list[int]:
    return list(pt.sequence[1:-1])


@pytest.mark.parametrize("prompt,words,ids", [
    ("(watercolor:1.3) painting of a jeep", ("watercolor", "painting", "of", "a", "jeep"),
     [W1, W2, W3, PAINTING, OF, A, JEEP]),
    ("a (silver jeep:1.2), in the countryside", ("a", "silver", "jeep,", "in", "the", "countryside"),
     [A, SILVER, JEEP, COMMA, IN, THE, COUNTRYSIDE]),
    ("((jeep)) on a (road)", ("jeep", "on", "a", "road"), [JEEP, ON, A, ROAD]),
    ("(a ((red:0.8) car):1.1)", ("a", "red", "car"), [A, RED, CAR]),
    # the weight is the number after the LAST colon; a colon before a non-number is text
    ("(red:car)", ("red:car",), [RED, COLON, CAR]),
    ("(red:car:1.5)", ("red:car",), [RED, COLON, CAR]),
    # escaped parentheses and unmatched ones are text; a stray ')' keeps the rest as text
    (r"a \(jeep\)", ("a", "(jeep)"), [A, LPAREN, JEEP, RPAREN]),
    ("a (jeep", ("a", "(jeep"), [A, LPAREN, JEEP]),
    ("a) (jeep)", ("a)", "(jeep)"), [A, RPAREN, LPAREN, JEEP, RPAREN]),
    # square brackets mean nothing to ComfyUI: their tokens are encoded
    ("a [jeep]", ("a", "[jeep]"), [A, LBRACKET, JEEP, RBRACKET]),
    # a group boundary inside a word is a token boundary but not a word boundary
    ("a (red)car", ("a", "redcar"), [A, RED, CAR]),
    ("()jeep", ("jeep",), [JEEP]),
])
def test_weight_syntax_gives_the_bare_words(prompt, words, ids):
    pt = tok_syntax(prompt)
    assert pt.words == words
    assert content(pt) == ids
    assert pt.prompt == prompt


def test_weighted_words_are_found_without_their_syntax():
    pt = tok_syntax("a (silver jeep:1.2), in the (countryside)")
    #  pos: BOS a silver jeep , in the countryside
    assert word_token_indices(pt, "jeep") == [3]  # not the "," at 4
    assert word_token_indices(pt, "silver jeep") == [2, 3]
    assert word_token_indices(pt, "countryside") == [7]
    assert word_token_indices(tok_syntax(r"a \(jeep\)"), "jeep") == [3]  # BOS a ( jeep )
    assert word_token_indices(tok_syntax("a [jeep]"), "jeep") == [3]


def test_embedding_takes_its_vector_count_of_positions():
    pt = tok_syntax("a jeep, embedding:style painting")
    e = list(embedding_token_ids("style", 2))
    assert pt.words == ("a", "jeep,", "embedding:style", "painting")
    assert content(pt) == [A, JEEP, COMMA, *e, PAINTING]
    assert all(is_embedding_id(i) for i in e) and not any(is_embedding_id(i) for i in (A, JEEP, BOS, EOS))
    assert [list(s) for s in pt.word_spans] == [[1], [2, 3], [4, 5], [6]]
    assert word_token_indices(pt, "embedding:style") == [4, 5]
    assert word_token_indices(pt, "Embedding:Style") == [4, 5]
    assert word_token_indices(pt, "painting") == [6]
    assert word_token_indices(pt, "style") == []  # the bare name is not a word of the prompt


def test_embedding_ids_are_stable_per_name_and_distinct_between_names():
    assert embedding_token_ids("style", 2) == embedding_token_ids("style", 2)
    assert set(embedding_token_ids("style", 2)).isdisjoint(embedding_token_ids("grain", 1))
    assert len(set(embedding_token_ids("style", 3))) == 3


@pytest.mark.parametrize("prompt,words,ids", [
    # 'style,' is no file: ComfyUI retries 'style' and keeps the comma as text of that word
    ("embedding:style, road", ("embedding:style,", "road"), ["style", "style", COMMA, ROAD]),
    ("(embedding:style:1.2) painting", ("embedding:style", "painting"), ["style", "style", PAINTING]),
    ("embedding:style, (watercolor:1.2)", ("embedding:style,", "watercolor"), ["style", "style", COMMA, W1, W2, W3]),
    ("embedding:style\n(jeep)", ("embedding:style", "jeep"), ["style", "style", JEEP]),
    ("a\nembedding:grain jeep", ("a", "embedding:grain", "jeep"), [A, "grain", JEEP]),
    # an embedding needs a space, a newline or a group start before it
    ("a,embedding:style", ("a,embedding:style",), [A, COMMA, EMBEDDING, COLON, STYLE]),
])
def test_embedding_syntax_hand_tables(prompt, words, ids):
    pt = tok_syntax(prompt)
    stand_ins = {"style": iter(embedding_token_ids("style", 2)), "grain": iter(embedding_token_ids("grain", 1))}
    expected = [next(stand_ins[i]) if isinstance(i, str) else i for i in ids]
    assert pt.words == words
    assert content(pt) == expected


def test_embedding_word_lookup_skips_attached_punctuation():
    pt = tok_syntax("embedding:style, road")
    assert word_token_indices(pt, "embedding:style") == [1, 2]  # not the comma at 3


def test_embedding_without_an_embedding_lookup_is_text():
    pt = tokenize_prompt("a embedding:style", fake_tokenize)
    assert content(pt) == [A, EMBEDDING, COLON, STYLE]


def test_missing_or_unnamed_embedding_raises():
    with pytest.raises(PromptError, match=r"embedding 'embedding:nope' was not found.*models/embeddings"):
        tok_syntax("a embedding:nope jeep")
    with pytest.raises(PromptError, match=r"'embedding:' is not followed by a name"):
        tok_syntax("a jeep embedding:")


def test_embeddings_count_against_the_75_tokens():
    assert tok_syntax(" ".join(["a"] * 73) + " embedding:style").num_content_tokens == 75
    with pytest.raises(PromptError, match=r"76 tokens.*embeddings count"):
        tok_syntax(" ".join(["a"] * 74) + " embedding:style")


def test_refine_sees_an_added_embedding_as_new_tokens():
    mapper, alphas = refinement_mapper(tok_syntax("a jeep"), tok_syntax("a jeep embedding:style"))
    assert alphas[:6].tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]  # BOS a jeep e e EOS
    assert mapper[:3].tolist() == [0, 1, 2] and mapper[5] == 3


def test_replace_keeps_a_shared_embedding_in_place():
    m = replacement_mapper(tok_syntax("embedding:style jeep"), tok_syntax("embedding:style car"))
    assert m[1, 1] == 1 and m[2, 2] == 1 and m[3, 3] == 1 and m[1:4].sum() == 3


def test_prompt_weights_are_not_attention_reweights():
    """The documented rule: a weight scales the word's embedding only (done by the host's encoder);
    the equalizer comes from ``reweight`` alone and is the same as for the unweighted prompt."""
    weighted = "(watercolor:1.3) painting of a silver (jeep:0.5) driving down a road"
    plain = "watercolor painting of a silver jeep driving down a road"
    assert align_prompts(JEEP_PROMPT, weighted, fake_tokenize, 10).equalizer is None
    al = align_prompts(JEEP_PROMPT, weighted, fake_tokenize, 10, reweight={"watercolor": 2})
    assert al.equalizer[1:4].tolist() == [2.0, 2.0, 2.0] and al.equalizer.sum() == 74 + 6
    ref = align_prompts(JEEP_PROMPT, plain, fake_tokenize, 10, reweight={"watercolor": 2})
    assert torch.equal(al.equalizer, ref.equalizer)
    assert torch.equal(al.mapper, ref.mapper) and torch.equal(al.refine_alphas, ref.refine_alphas)


def test_a_piece_the_tokenizer_reads_differently_is_refused():
    def merging(text):
        return [9999] if text == "silver jeep" else fake_tokenize(text)

    with pytest.raises(PromptError, match=r"its part 'silver jeep'.*word by word"):
        tokenize_prompt("a (silver jeep:1.2)", merging)
