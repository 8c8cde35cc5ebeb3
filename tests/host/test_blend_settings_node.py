"""FateZero Attention Blend Settings, driven in-process with a tiny CLIP and ComfyUI's real tokenizer."""

import copy
import pickle
import types

import pytest
import torch

SOURCE = "a silver jeep driving down a curvy road in the countryside"
TARGET = "a Porsche car driving down a curvy road in the countryside"


@pytest.fixture
def node(comfy_nodes):
    return comfy_nodes.nodes.blend_settings.FateZeroAttentionBlendSettings


@pytest.fixture
def node_error(comfy_nodes):
    return comfy_nodes.nodes.user_errors.FateZeroNodeError


def run(node, clip, **overrides):
    params = dict(source_prompt=SOURCE, target_prompt=TARGET, blend_words="jeep",
                  cross_replace_steps=0.8, self_replace_steps=0.6, blend_threshold=0.3,
                  mode="auto", local_latent_blend=False, soft_mask=False)
    params.update(overrides)
    return node.execute(clip=clip, **params)


def expect_error(node, clip, node_error, match, **overrides):
    with pytest.raises(node_error, match=match) as info:
        run(node, clip, **overrides)
    error = info.value
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)
    return error


# ------------------------------------------------------------------------------------------------
# Schema
# ------------------------------------------------------------------------------------------------


def test_widgets(node):
    """Widget details an artist relies on (identity, sockets and tooltips: test_object_info)."""
    info = node.GET_NODE_INFO_V1()
    inputs = {**info["input"]["required"], **info["input"].get("optional", {})}
    assert inputs["clip"][0] == "CLIP"
    assert inputs["source_prompt"][1]["multiline"] and inputs["target_prompt"][1]["multiline"]
    assert inputs["cross_replace_steps"][1]["default"] == 0.8
    assert inputs["self_replace_steps"][1]["default"] == 0.6
    assert inputs["blend_threshold"][1]["default"] == 0.3 and inputs["blend_threshold"][1]["max"] == 10.0
    assert inputs["mode"][1]["options"] == ["auto", "replace", "refine"]
    assert inputs["mode"][1]["default"] == "auto"
    assert inputs["local_latent_blend"][1]["default"] is False
    assert inputs["soft_mask"][1]["default"] is False
    for name in ("blend_words", "target_blend_words", "cross_replace_words", "reweight"):
        assert inputs[name][0] == "STRING"


# ------------------------------------------------------------------------------------------------
# Outputs
# ------------------------------------------------------------------------------------------------


def test_conditioning_equals_clip_text_encode(node, tiny_clip):
    import nodes as comfy_core_nodes

    source, target, _ = run(node, tiny_clip).args
    for cond, text in ((source, SOURCE), (target, TARGET)):
        (expected,) = comfy_core_nodes.CLIPTextEncode().encode(tiny_clip, text)
        assert len(cond) == len(expected) == 1
        assert torch.equal(cond[0][0], expected[0][0])
        assert torch.equal(cond[0][1]["pooled_output"], expected[0][1]["pooled_output"])
    assert not torch.equal(source[0][0], target[0][0])


def test_spec_carries_prompts_words_and_options(comfy_nodes, node, tiny_clip):
    _, _, spec = run(
        node, tiny_clip, blend_words="jeep, silver", target_blend_words="Porsche car",
        cross_replace_words="Porsche: 0.5, road: 0.2-0.9", reweight="Porsche: 2, curvy: 0.5",
        self_replace_steps=0.7, blend_threshold=0.4, mode="replace", local_latent_blend=True,
        soft_mask=True,
    ).args
    assert isinstance(spec, comfy_nodes.fatezero_core.edit_spec.EditSpec)
    assert spec.source_prompt == SOURCE and spec.target_prompt == TARGET
    assert spec.blend_words == ("jeep", "silver")
    assert spec.target_blend_words == ("Porsche car",)
    assert spec.cross_replace_steps == {"default_": 0.8, "Porsche": 0.5, "road": (0.2, 0.9)}
    assert spec.reweight == {"Porsche": 2.0, "curvy": 0.5}
    assert spec.self_replace_steps == pytest.approx(0.7)
    assert spec.blend_threshold == pytest.approx(0.4)
    assert spec.mode == "replace" and spec.latent_blend and spec.soft_mask

    settings = spec.edit_settings(num_steps=10)
    assert settings is not None


def test_spec_is_plain_data(node, tiny_clip):
    """The blend settings carry the prompts' token layouts, not the CLIP or a closure over it:
    they pickle and copy like any data, and a copy aligns the prompts exactly as the original."""
    _, _, spec = run(node, tiny_clip, reweight="Porsche: 2").args
    for copied in (pickle.loads(pickle.dumps(spec)), copy.deepcopy(spec)):
        assert copied == spec and copied is not spec
        got, ref = copied.edit_settings(num_steps=10), spec.edit_settings(num_steps=10)
        for name in ("mapper", "cross_alphas", "equalizer"):
            assert torch.equal(getattr(got, name), getattr(ref, name)), name
        assert got.blend_tokens == ref.blend_tokens == (3,)


def test_tokenizer_is_the_clip_models_own(comfy_nodes, node, tiny_clip):
    tokenize = comfy_nodes.nodes.prompt_encoding.clip_tokenizer(tiny_clip)
    assert tokenize("cat") == [2368]
    hf = tiny_clip.tokenizer.clip_l.tokenizer
    assert tokenize("countryside,") == hf("countryside,")["input_ids"][1:-1]
    _, _, spec = run(node, tiny_clip).args
    encoded = [t[0] for t in tiny_clip.tokenize(SOURCE)["l"][0]]
    assert list(spec.source_tokens.ids) == encoded


def test_empty_blend_words_mean_full_replacement(node, tiny_clip):
    _, _, spec = run(node, tiny_clip, blend_words="  ").args
    assert spec.blend_words == ()
    assert spec.cross_replace_steps == pytest.approx(0.8)
    assert spec.reweight is None


def test_refine_with_different_word_counts(node, tiny_clip):
    _, _, spec = run(node, tiny_clip, target_prompt="a watercolor painting of " + SOURCE, blend_words="").args
    settings = spec.edit_settings(num_steps=5)
    assert settings is not None


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


def test_blend_word_not_in_prompt(node, tiny_clip, node_error):
    err = expect_error(node, tiny_clip, node_error, "blend word 'car' is not in the prompt", blend_words="car")
    assert "jeep" in str(err)  # lists the words that can be used


def test_target_blend_word_not_in_target(node, tiny_clip, node_error):
    expect_error(node, tiny_clip, node_error, "target blend word 'jeep' is not in the prompt",
                 target_blend_words="jeep")


def test_replace_with_unequal_word_counts(node, tiny_clip, node_error):
    expect_error(node, tiny_clip, node_error, "replace mode needs prompts with the same number of words",
                 mode="replace", target_prompt="a red Porsche car driving down a curvy road in the countryside")


def test_prompt_over_75_tokens(node, tiny_clip, node_error):
    long_prompt = " ".join(["jeep"] * 80)
    expect_error(node, tiny_clip, node_error, "at most 75 fit", source_prompt=long_prompt)


def test_a_tokenization_that_disagrees_with_the_words_is_refused(node, tiny_clip, node_error, monkeypatch):
    original = tiny_clip.tokenize

    def shifted(text, **kw):  # ComfyUI putting another token where the words have "car"
        tokens = original(text, **kw)
        car = tiny_clip.tokenizer.clip_l.tokenizer("car")["input_ids"][1]
        tokens["l"] = [[(t + 1, *rest) if t == car else (t, *rest) for t, *rest in chunk] for chunk in tokens["l"]]
        return tokens

    monkeypatch.setattr(tiny_clip, "tokenize", shifted)
    expect_error(node, tiny_clip, node_error, r"ComfyUI encodes the target prompt .* at the word 'car', token 3")


def test_empty_prompt(node, tiny_clip, node_error):
    expect_error(node, tiny_clip, node_error, "source_prompt is empty", source_prompt="  ")


def test_reweight_word_not_in_target(node, tiny_clip, node_error):
    expect_error(node, tiny_clip, node_error, "reweight word 'jeep' is not in the prompt", reweight="jeep: 2")


def test_latent_blend_needs_blend_words(node, tiny_clip, node_error):
    expect_error(node, tiny_clip, node_error, "latent blend needs blend words",
                 blend_words="", local_latent_blend=True)


@pytest.mark.parametrize("field,text,match", [
    ("reweight", "Porsche 2", "could not read 'Porsche 2'"),
    ("cross_replace_words", "Porsche: 0.9-0.2", "ends before it starts"),
    ("blend_words", "jeep: 2", "contains ':'"),
    ("target_blend_words", "car: 2", "contains ':'"),
])
def test_text_field_parse_errors(node, tiny_clip, node_error, field, text, match):
    """Each text field's parse error reaches the user as a node error (the parsing itself:
    tests/test_edit_text.py)."""
    expect_error(node, tiny_clip, node_error, match, **{field: text})


def test_cross_replace_word_not_in_target(node, tiny_clip, node_error):
    expect_error(node, tiny_clip, node_error, "cross_replace_steps word 'jeep' is not in the prompt",
                 cross_replace_words="jeep: 0.5")


def test_missing_clip(node, node_error):
    expect_error(node, None, node_error, "No CLIP is connected")


def test_non_sd1_clip(node, node_error):
    fake = types.SimpleNamespace(tokenizer=types.SimpleNamespace(clip_g=object()))
    expect_error(node, fake, node_error, "FateZero supports Stable Diffusion 1.x")


def test_clip_with_extra_token_streams(node, tiny_clip, node_error, monkeypatch):
    original = tiny_clip.tokenize
    monkeypatch.setattr(tiny_clip, "tokenize", lambda text, **kw: {**original(text, **kw), "g": []})
    expect_error(node, tiny_clip, node_error, "Stable Diffusion 1.x")


# ------------------------------------------------------------------------------------------------
# ComfyUI prompt syntax: weights and embeddings
# ------------------------------------------------------------------------------------------------

EMBEDDING = "fz_style"
EMBEDDING_VECTORS = 2


def clip_text_encode(clip, text):
    import nodes as comfy_core_nodes

    (cond,) = comfy_core_nodes.CLIPTextEncode().encode(clip, text)
    return cond


def assert_same_conditioning(ours, theirs):
    assert len(ours) == len(theirs) == 1
    assert torch.equal(ours[0][0], theirs[0][0])
    assert torch.equal(ours[0][1]["pooled_output"], theirs[0][1]["pooled_output"])


def comfy_token_ids(clip, text):
    return [t[0] if isinstance(t[0], int) else None for t in clip.tokenize(text)["l"][0]]


@pytest.fixture
def clip_with_embedding(tiny_clip, tmp_path, monkeypatch):
    """The tiny CLIP with an embeddings folder holding ``fz_style`` (2 seeded 768-wide vectors,
    A1111 safetensors layout), as Load Checkpoint gives it ComfyUI's models/embeddings."""
    from safetensors.torch import save_file

    folder = tmp_path / "embeddings"
    folder.mkdir()
    vectors = torch.randn(EMBEDDING_VECTORS, 768, generator=torch.Generator().manual_seed(7)) * 0.02
    save_file({"emb_params": vectors}, str(folder / f"{EMBEDDING}.safetensors"))
    monkeypatch.setattr(tiny_clip.tokenizer.clip_l, "embedding_directory", [str(folder)])
    return tiny_clip


SYNTAX_PROMPTS = [
    "a (silver jeep:1.2), driving down a curvy road in the countryside",
    "((watercolor)) painting of a [silver] jeep (driving:0.8) down a curvy road",
    r"a silver jeep \(4x4\) on a (curvy (road:1.3):0.9)",
    "a (red)car, (on:a) road",
    "a) (jeep",
]


@pytest.mark.parametrize("prompt", SYNTAX_PROMPTS)
def test_syntax_prompts_encode_as_clip_text_encode(node, tiny_clip, prompt):
    source, target, spec = run(node, tiny_clip, source_prompt=prompt, target_prompt=prompt,
                               blend_words="").args
    assert_same_conditioning(source, clip_text_encode(tiny_clip, prompt))
    assert_same_conditioning(target, clip_text_encode(tiny_clip, prompt))
    assert list(spec.source_tokens.ids) == comfy_token_ids(tiny_clip, prompt)


def test_weighted_prompts_align_like_their_bare_words(node, tiny_clip):
    weighted_source = "a (silver jeep:1.2) driving down a curvy road in the (countryside)"
    weighted_target = "a (Porsche car:1.3) driving down a curvy road in the countryside"
    options = dict(blend_words="jeep", target_blend_words="Porsche car", reweight="curvy: 0.5",
                   cross_replace_words="Porsche: 0.5")
    *_, spec = run(node, tiny_clip, source_prompt=weighted_source, target_prompt=weighted_target, **options).args
    *_, plain = run(node, tiny_clip, **options).args
    got, ref = spec.edit_settings(num_steps=10), plain.edit_settings(num_steps=10)
    assert got.mode == ref.mode == "replace"
    # BOS a silver jeep ...: jeep is position 3; ComfyUI gave that token the weight 1.2
    assert got.blend_tokens == ref.blend_tokens == (3,)
    assert tiny_clip.tokenize(weighted_source)["l"][0][3][1] == pytest.approx(1.2)
    assert got.target_blend_tokens == ref.target_blend_tokens
    for name in ("mapper", "cross_alphas", "equalizer"):
        assert torch.equal(getattr(got, name), getattr(ref, name)), name
    assert spec.source_tokens.ids == plain.source_tokens.ids


def test_a_prompt_weight_scales_the_embedding_and_is_not_a_reweight(node, tiny_clip):
    """The documented rule: '(watercolor:1.5)' changes the conditioning exactly as CLIP Text Encode
    does and leaves the attention alone; only the reweight field scales attention."""
    weighted = "(watercolor:1.5) painting of " + SOURCE
    plain = "watercolor painting of " + SOURCE
    _, target, spec = run(node, tiny_clip, target_prompt=weighted, blend_words="").args
    assert_same_conditioning(target, clip_text_encode(tiny_clip, weighted))
    assert not torch.equal(target[0][0], clip_text_encode(tiny_clip, plain)[0][0])
    assert spec.edit_settings(num_steps=10).equalizer is None

    *_, spec = run(node, tiny_clip, target_prompt=weighted, blend_words="", reweight="watercolor: 2").args
    *_, ref = run(node, tiny_clip, target_prompt=plain, blend_words="", reweight="watercolor: 2").args
    equalizer = spec.edit_settings(num_steps=10).equalizer
    watercolor = tiny_clip.tokenizer.clip_l.tokenizer("watercolor")["input_ids"][1:-1]
    positions = list(range(1, 1 + len(watercolor)))
    assert equalizer[positions].tolist() == [2.0] * len(positions)  # the reweight, not 2 x 1.5
    assert float(equalizer.sum()) == 77 - len(positions) + 2.0 * len(positions)
    assert torch.equal(equalizer, ref.edit_settings(num_steps=10).equalizer)


def test_embedding_prompts_encode_as_clip_text_encode_and_align(node, clip_with_embedding):
    clip = clip_with_embedding
    source = f"embedding:{EMBEDDING} jeep on a road"
    target = f"embedding:{EMBEDDING} jeep on a road, (watercolor:1.2)"
    cond_source, cond_target, spec = run(
        node, clip, source_prompt=source, target_prompt=target, blend_words="jeep",
        reweight=f"embedding:{EMBEDDING}: 3, watercolor: 2",
    ).args
    assert_same_conditioning(cond_source, clip_text_encode(clip, source))
    assert_same_conditioning(cond_target, clip_text_encode(clip, target))
    ids = comfy_token_ids(clip, source)
    assert ids[1:1 + EMBEDDING_VECTORS] == [None] * EMBEDDING_VECTORS  # ComfyUI put the vectors there
    settings = spec.edit_settings(num_steps=10)
    jeep = 1 + EMBEDDING_VECTORS
    assert settings.blend_tokens == (jeep,)
    assert ids[jeep] == clip.tokenizer.clip_l.tokenizer("jeep")["input_ids"][1]
    assert settings.equalizer[1:1 + EMBEDDING_VECTORS].tolist() == [3.0] * EMBEDDING_VECTORS
    # refine: the embedding and the words kept from the source map onto themselves
    assert settings.mode == "refine"
    assert settings.refine_alphas[:jeep + 4].tolist() == [1.0] * (jeep + 4)
    assert settings.mapper[:jeep + 1].tolist() == list(range(jeep + 1))


def test_an_embedding_can_be_a_blend_word(node, clip_with_embedding):
    prompt = f"a jeep in embedding:{EMBEDDING}, on a road"
    *_, spec = run(node, clip_with_embedding, source_prompt=prompt, target_prompt=prompt,
                   blend_words=f"embedding:{EMBEDDING}").args
    assert spec.edit_settings(num_steps=4).blend_tokens == tuple(range(4, 4 + EMBEDDING_VECTORS))


def test_a_missing_embedding_is_named(node, clip_with_embedding, node_error):
    expect_error(node, clip_with_embedding, node_error,
                 r"the embedding 'embedding:no_such_style' was not found.*models/embeddings",
                 target_prompt="a jeep, embedding:no_such_style")
