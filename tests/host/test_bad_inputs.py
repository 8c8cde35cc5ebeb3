"""Bad input gets a clear node error, and nothing is lost.

Each case drives the nodes in-process on the tiny SD1.5-topology model inside a real ComfyUI and
checks that the node raises one of the pack's user errors (``FateZeroError`` from the core, or
``FateZeroNodeError`` from a node) whose message says what to change, never an AttributeError,
KeyError or shape error from deep inside the sampler.
"""

from __future__ import annotations

import gc
import os
import re
import weakref

import pytest
import torch

from test_invert_sample import LATENT, SOURCE, TARGET, empty, invert, moving_latent, sample, settings

pytestmark = pytest.mark.usefixtures("host_inference_mode")

STEPS = 2  # the checks run before sampling; a short inversion is enough to make a store


@pytest.fixture
def case(nodes, tiny_sd15, tiny_clip):
    """A finished 4-frame, 128 px, ``STEPS``-step inversion and everything needed to edit it."""
    src, tgt, spec = settings(nodes, tiny_clip, blend_words="cat")
    latent = moving_latent()
    inverted, store = invert(nodes, tiny_sd15, src, latent, steps=STEPS)
    return dict(model=tiny_sd15, src=src, tgt=tgt, spec=spec, neg=empty(tiny_clip), latent=latent,
                inverted=inverted, store=store)


def expect_user_error(user_error_types, pattern, fn, *args, **kwargs):
    """Run ``fn``; it must raise a pack user error whose message matches ``pattern``."""
    with pytest.raises(Exception) as info:
        fn(*args, **kwargs)
    error = info.value
    assert isinstance(error, user_error_types), f"{type(error).__name__}: {error}"
    message = str(error)
    assert re.search(pattern, message), message
    return message


def edit(nodes, case, **overrides):
    """FateZero Sample on ``case`` with some inputs replaced."""
    args = dict(model=case["model"], positive=case["tgt"], negative=case["neg"],
                inverted=case["inverted"], store=case["store"], spec=case["spec"], cfg=7.5)
    args.update(overrides)
    return sample(nodes, args.pop("model"), args.pop("positive"), args.pop("negative"),
                  args.pop("inverted"), args.pop("store"), args.pop("spec"), **args)


# ------------------------------------------------------------------------------------------------
# Store vs latent
# ------------------------------------------------------------------------------------------------


def test_store_from_4_frames_with_a_3_frame_latent(nodes, case, user_error_types):
    short = {"samples": case["inverted"]["samples"][:3]}
    message = expect_user_error(user_error_types, "3 frames but the store was captured on 4",
                                edit, nodes, case, inverted=short)
    assert "same" in message  # says what to change: the inverted latent of the same node


def test_blend_settings_of_another_source_prompt(nodes, case, tiny_clip, user_error_types):
    """The store remembers the source conditioning it was inverted with; blend settings typed with
    another source prompt are refused (the only source check: the store has no prompt text)."""
    _, _, other = settings(nodes, tiny_clip, source="a cat lying on a wooden table",
                           target="a dog lying on a wooden table", blend_words="cat")
    expect_user_error(user_error_types, "different source conditioning.*FateZero Source Prompt",
                      edit, nodes, case, spec=other)


def test_store_at_one_size_with_a_latent_of_another(nodes, case, user_error_types):
    small = {"samples": case["inverted"]["samples"][..., : LATENT // 2, : LATENT // 2].contiguous()}
    expect_user_error(user_error_types,
                      r"64x64 px but the store was captured at 128x128 px.*same frame size",
                      edit, nodes, case, inverted=small)


def test_latent_that_is_not_the_stores_inverted_latent(nodes, case, user_error_types):
    """Same frames, same size, but inverted with another step count: refused by the latent's
    fingerprint (the store's own sigmas would otherwise be used with the wrong noisy latent)."""
    other, _ = invert(nodes, case["model"], case["src"], case["latent"], steps=STEPS * 2)
    wiring = r"not the inverted latent of this attention store.*inverted_latent and attention_store"
    expect_user_error(user_error_types, wiring, edit, nodes, case, inverted=other)
    # the VAE-encoded frames themselves (un-inverted) are refused the same way
    expect_user_error(user_error_types, wiring, edit, nodes, case,
                      inverted={"samples": case["latent"]})


def test_inverted_latent_check_tolerates_copies(nodes, case, user_error_types):
    check = nodes.sample.check_inverted_latent
    samples = case["inverted"]["samples"]
    check(case["store"], samples.clone())
    check(case["store"], samples.double().float().contiguous())
    # the fingerprint identifies wiring, not single values: a 1e-4 relative change is caught
    expect_user_error(user_error_types, r"not the inverted latent.*differs in values",
                      check, case["store"], samples * (1 + 1e-4))
    expect_user_error(user_error_types, r"differs in shape \[4, 4, 16, 8\] vs \[4, 4, 16, 16\]",
                      check, case["store"], samples[..., :8])


def test_five_dimensional_latent(nodes, case, user_error_types):
    video = {"samples": case["latent"].unsqueeze(0)}  # [1, 4, F, h, w]-like: a video latent
    pattern = r"image latent batch \[frames, 4, h, w\].*VAE Encode"
    expect_user_error(user_error_types, pattern, nodes.invert.FateZeroDDIMInvert.execute,
                      model=case["model"], source=case["src"], latent=video, steps=STEPS,
                      key_frames="mid", st_min_channels=0, store_placement="cpu",
                      store_dtype="fp32", layer_set="relative", schedule_end="comfy")
    expect_user_error(user_error_types, pattern, edit, nodes, case,
                      inverted={"samples": case["inverted"]["samples"].unsqueeze(0)})


# ------------------------------------------------------------------------------------------------
# Store identity and lifetime
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("other", ["another_seed", "lora_clone"])
def test_store_from_another_model(nodes, case, user_error_types, other):
    import tiny_models

    if other == "another_seed":
        model = tiny_models.build_tiny_sd15(seed=tiny_models.SEED + 1)
    else:
        model = case["model"].clone()
        key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
        weight = model.get_model_object(key)
        model.add_patches({key: (0.1 * torch.ones(weight.shape),)}, 1.0)
    expect_user_error(user_error_types, r"different model.*invert again with the model you edit",
                      edit, nodes, case, model=model)


@pytest.mark.parametrize("wired", ["latent dict", "string", "blend settings"])
def test_not_an_attention_store(nodes, case, user_error_types, wired):
    thing = {"latent dict": case["inverted"], "string": "store", "blend settings": case["spec"]}[wired]
    expect_user_error(user_error_types, "'attention_store' must come from FateZero DDIM Invert",
                      edit, nodes, case, store=thing)


@pytest.mark.parametrize("placement", ["cpu", "disk", "recompute"])
def test_released_store(nodes, case, user_error_types, placement):
    store = case["store"]
    inverted = case["inverted"]
    if placement != "cpu":
        inverted, store = invert(nodes, case["model"], case["src"], case["latent"], steps=STEPS,
                                 store_placement=placement)
    directory = store.directory
    store.release()
    if directory is not None:
        assert not os.path.exists(directory)
    expect_user_error(user_error_types, r"released.*run FateZero DDIM Invert again",
                      edit, nodes, case, inverted=inverted, store=store)


def test_interrupted_inversion_leaves_no_store(nodes, tiny_sd15, tiny_clip, monkeypatch, tmp_path):
    """Cancel at step 3 of 5 (through the progress hook, as ComfyUI's server does): the node
    raises the interrupt, no store object survives and the ``disk`` store's folder is gone."""
    import comfy.model_management
    import comfy.utils
    import folder_paths

    temp = tmp_path / "temp"
    monkeypatch.setattr(folder_paths, "temp_directory", str(temp))
    made = []
    base = nodes.invert.AttentionStore

    class RecordingStore(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append((weakref.ref(self), self.directory))

    monkeypatch.setattr(nodes.invert, "AttentionStore", RecordingStore)
    seen = []

    def hook(value, total, preview_image, prompt_id=None, node_id=None):
        seen.append(value)
        if value == 3:
            comfy.model_management.interrupt_current_processing(True)  # the user hits Cancel
        comfy.model_management.throw_exception_if_processing_interrupted()

    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", hook)
    src, _, _ = settings(nodes, tiny_clip)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        invert(nodes, tiny_sd15, src, moving_latent(), steps=5, store_placement="disk")
    assert seen == [1, 2, 3]
    assert not comfy.model_management.processing_interrupted()
    gc.collect()

    assert len(made) == 1
    ref, directory = made[0]
    stores = tmp_path / "fatezero_stores"  # beside the temp folder (nodes/store_folder.py)
    assert directory is not None and directory.startswith(str(stores))
    assert ref() is None, "the interrupted inversion's store is still alive"
    assert not os.path.exists(directory)
    assert not list(stores.glob("*/fatezero_store_*"))

    # Nothing is lost: the same inputs invert fine afterwards.
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", None)
    _, store = invert(nodes, tiny_sd15, src, moving_latent(), steps=5, store_placement="disk")
    assert store.complete and len(store.files()) == 5


# ------------------------------------------------------------------------------------------------
# Settings and model options
# ------------------------------------------------------------------------------------------------


def test_blend_word_not_in_prompt(nodes, tiny_clip, user_error_types):
    message = expect_user_error(user_error_types, "blend word 'dog' is not in the prompt",
                                settings, nodes, tiny_clip, source=SOURCE, target=TARGET,
                                blend_words="dog")
    assert "cat" in message  # the words that can be used are listed


def test_context_handlers_fatezero_cannot_run_in_are_refused(nodes, case, user_error_types):
    windowed = case["model"].clone()
    windowed.model_options["context_handler"] = object()
    pattern = r"context windows over the frames.*Context Windows \(Manual\) with dim 0"
    expect_user_error(user_error_types, pattern, invert, nodes, windowed, case["src"],
                      case["latent"], steps=STEPS)
    expect_user_error(user_error_types, pattern, edit, nodes, case, model=windowed)
    assert "context_handler" not in case["model"].model_options



def test_every_node_reports_user_errors_the_same_way(nodes, comfy_nodes):
    """One convention: every node's ``execute`` is wrapped by ``reports_user_errors``, which turns a
    core ``FateZeroError`` raised anywhere inside into a short node error (chain dropped)."""
    report = nodes.user_errors.reports_user_errors

    def fails():
        raise comfy_nodes.fatezero_core.errors.FateZeroError("change this setting")

    wrapped = report(fails)
    with pytest.raises(nodes.user_errors.FateZeroNodeError, match="change this setting") as info:
        wrapped()
    assert info.value.__cause__ is None and info.value.__suppress_context__
    unwrapped = [node.__name__ for node in nodes.node_classes()
                 if node.execute.__func__.__code__ is not wrapped.__code__]
    assert not unwrapped, f"execute without reports_user_errors: {unwrapped}"
