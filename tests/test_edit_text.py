"""The text fields of FateZero Attention Blend Settings, read as their tooltips describe them.

blend_words / target_blend_words: comma-separated words; cross_replace_words: 'watercolor: 0.5,
jeep: 0.2-0.9' (fractions of the steps; a single number means from 0); reweight: 'watercolor: 10,
silver: 2'. Entries may also be separated by semicolons or new lines.
"""

from __future__ import annotations

import pytest

from fatezero_core.edit_text import (cross_replace_setting, parse_cross_replace_words, parse_reweight,
                                     parse_words, prompt_file_name)
from fatezero_core.errors import FateZeroError


def test_words_split_on_commas_semicolons_and_new_lines():
    assert parse_words("jeep, Wonder Woman;car\n  road ,, ", "blend_words") == ("jeep", "Wonder Woman", "car", "road")
    assert parse_words("", "blend_words") == parse_words("  ", "blend_words") == parse_words(None, "x") == ()


def test_repeated_words_are_kept_once_whatever_their_case():
    assert parse_words("jeep, Jeep, car, JEEP", "blend_words") == ("jeep", "car")


def test_an_embedding_is_a_word():
    assert parse_words("embedding:fz_style, jeep", "blend_words") == ("embedding:fz_style", "jeep")
    assert parse_words("Embedding:fz_style", "blend_words") == ("Embedding:fz_style",)


def test_reweight_reads_word_value_pairs():
    assert parse_reweight("watercolor: 10, silver: 2") == {"watercolor": 10.0, "silver": 2.0}
    assert parse_reweight("Wonder Woman: 1.5; x:-2e-1") == {"Wonder Woman": 1.5, "x": -0.2}
    assert parse_reweight("embedding:fz_style: 3") == {"embedding:fz_style": 3.0}  # the last ':' splits
    assert parse_reweight("") is None and parse_reweight(None) is None


def test_cross_replace_words_read_windows():
    assert parse_cross_replace_words("watercolor: 0.5, jeep: 0.2-0.9") == {"watercolor": 0.5, "jeep": (0.2, 0.9)}
    assert parse_cross_replace_words("a: .2..1, b: 0 to 0.25, c: 1, d: 0.3-0.3") == {
        "a": (0.2, 1.0), "b": (0.0, 0.25), "c": 1.0, "d": (0.3, 0.3)}
    assert parse_cross_replace_words("") == {} and parse_cross_replace_words(None) == {}


def test_cross_replace_setting_is_the_fraction_or_the_official_dict():
    assert cross_replace_setting(0.8, "") == 0.8 and isinstance(cross_replace_setting(1, None), float)
    assert cross_replace_setting(0.8, "Porsche: 0.5, road: 0.2-0.9") == {
        "default_": 0.8, "Porsche": 0.5, "road": (0.2, 0.9)}


@pytest.mark.parametrize("field,text,match", [
    ("reweight", "Porsche 2", "reweight: could not read 'Porsche 2'. Write 'word: value' entries"),
    ("reweight", "Porsche: lots", "reweight: the value 'lots' for 'Porsche' is not a number"),
    ("reweight", "Porsche: inf", "the value 'inf' for 'Porsche' is not a number"),
    ("reweight", "Porsche: 2, porsche: 3", "reweight: 'porsche' is listed twice"),
    ("cross_replace_words", "Porsche: 1.5", "cross_replace_words: 1.5 for 'Porsche' is outside 0..1"),
    ("cross_replace_words", "Porsche: 0.5-1.2", "1.2 for 'Porsche' is outside 0..1"),
    ("cross_replace_words", "Porsche: 0.9-0.2", "ends before it starts; .* for example 0.2-0.9"),
    ("cross_replace_words", ": 0.5", "could not read ': 0.5'"),
    ("cross_replace_words", "Porsche:", "could not read 'Porsche:'"),
    ("cross_replace_words", "jeep: 0.5, Jeep: 0.2", "'Jeep' is listed twice"),
    ("blend_words", "jeep: 2", "blend_words: 'jeep: 2' contains ':'"),
    ("target_blend_words", "car, a:b", "target_blend_words: 'a:b' contains ':'"),
])
def test_parse_errors_name_the_field_and_the_entry(field, text, match):
    parse = {"reweight": parse_reweight, "cross_replace_words": parse_cross_replace_words}.get(
        field, lambda t: parse_words(t, field))
    with pytest.raises(FateZeroError, match=match):
        parse(text)


def test_a_field_that_is_not_text_is_refused():
    with pytest.raises(FateZeroError, match="Expected text, got int"):
        parse_words(3, "blend_words")


def test_an_edit_is_named_after_its_target_prompt():
    assert prompt_file_name("watercolor painting of a silver jeep") == "watercolor_painting_of_a_silver_jeep"
    assert prompt_file_name("a (Porsche car:1.2), embedding:style") == "a_porsche_car_1_2_embedding_style"
    assert prompt_file_name("../../etc/passwd") == "etc_passwd"
    assert prompt_file_name("!!!") == "edit"
    long = "a " + "very " * 30 + "long prompt"
    name = prompt_file_name(long)
    assert len(name) <= 60 and name.startswith("a_very_") and not name.endswith("_")
    assert prompt_file_name("x" * 80) == "x" * 60  # one word longer than the limit is cut
