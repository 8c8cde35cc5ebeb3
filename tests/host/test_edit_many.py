"""Invert once, edit many: the inversion comes from ComfyUI's cache while the edit changes.

In-process (tiny SD1.5-topology model): FateZero Source Prompt + FateZero Edit Settings give the
deprecated settings node's edit; a ``positive`` that is not the settings' target is refused; a
long negative prompt gives the same edit whether ComfyUI batches it with the target or not.

On the server (tiny checkpoint): changing only the target prompt of the shipped style workflow
serves DDIM Invert, VAE Encode and the video loader from the cache, and its edit equals a run
that inverted afresh; the training workflow keeps its tuned model cached; three edits of one
inversion in one queue (FateZero Edit List) equal each edit queued alone; the workflow saved with
the deprecated settings node still runs.
"""

from __future__ import annotations

import copy
import shutil
import uuid

import pytest
import torch
from safetensors.torch import load_file

from host_server import execution_error
from test_group_norm import chunk_spy, max_rel
from test_invert_sample import SOURCE, TARGET, empty, invert, moving_latent, sample, settings
from test_workflows import load_api
from test_workflows_host import sd15_shape_checkpoint, shrink, write_video_file

# The shipped style edit reweights "watercolor": every target here keeps that word.
NEW_TARGET = "watercolor painting of a silver jeep driving down a snowy road in the countryside"
EDIT_WIDGETS = dict(blend_words="", target_blend_words="", cross_replace_steps=0.8,
                    cross_replace_words="", self_replace_steps=0.6, blend_threshold=0.3,
                    reweight="", mode="auto", local_latent_blend=False, soft_mask=False)


# ------------------------------------------------------------------------------------------------
# In-process
# ------------------------------------------------------------------------------------------------


def source_prompt(nodes, clip, text=SOURCE):
    return nodes.source_prompt.FateZeroSourcePrompt.execute(clip=clip, source_prompt=text).args


def edit_settings(nodes, clip, source, target=TARGET, **kw):
    args = dict(EDIT_WIDGETS, **kw)
    return nodes.edit_settings.FateZeroEditSettings.execute(
        clip=clip, source_prompt=source, target_prompt=target, **args).args


@pytest.mark.usefixtures("host_inference_mode")
def test_source_prompt_and_edit_settings_edit_as_the_deprecated_node(nodes, tiny_sd15, tiny_clip):
    old_source, old_target, old_spec = settings(nodes, tiny_clip, blend_words="cat")
    source_cond, source = source_prompt(nodes, tiny_clip)
    target_cond, spec, name = edit_settings(nodes, tiny_clip, source, blend_words="cat")
    assert torch.equal(source_cond[0][0], old_source[0][0])
    assert torch.equal(target_cond[0][0], old_target[0][0])
    assert (spec.source_fingerprint, spec.target_fingerprint) == (old_spec.source_fingerprint,
                                                                  old_spec.target_fingerprint)
    assert name == "fatezero/a_dog_sitting_on_a_wooden_table"

    inverted, store = invert(nodes, tiny_sd15, source_cond, moving_latent())
    new, _ = sample(nodes, tiny_sd15, target_cond, empty(tiny_clip), inverted, store, spec, cfg=2.0)
    old, _ = sample(nodes, tiny_sd15, old_target, empty(tiny_clip), inverted, store, old_spec, cfg=2.0)
    assert torch.equal(new["samples"], old["samples"])


@pytest.mark.usefixtures("host_inference_mode")
def test_a_positive_that_is_not_the_settings_target_is_refused(nodes, tiny_sd15, tiny_clip, user_error_types):
    import nodes as core_nodes

    source_cond, source = source_prompt(nodes, tiny_clip)
    _, spec, _ = edit_settings(nodes, tiny_clip, source)
    inverted, store = invert(nodes, tiny_sd15, source_cond, moving_latent(), steps=2)
    other = core_nodes.CLIPTextEncode().encode(tiny_clip, "a red bus parked in a city street at night")[0]
    with pytest.raises(user_error_types) as error:
        sample(nodes, tiny_sd15, other, empty(tiny_clip), inverted, store, spec, cfg=2.0)
    message = str(error.value)
    assert "'positive' is not the target prompt" in message
    assert f"'{TARGET}'" in message and f"'{SOURCE}'" in message


def test_edit_settings_need_a_source_prompt_node(nodes, tiny_clip, user_error_types):
    with pytest.raises(user_error_types, match="must come from FateZero Source Prompt"):
        edit_settings(nodes, tiny_clip, "a cat")


def test_edit_list_names_each_edit_after_its_target(nodes, tiny_clip, user_error_types):
    _, source = source_prompt(nodes, tiny_clip)
    edits = [edit_settings(nodes, tiny_clip, source, target=t)
             for t in (TARGET, "a fox sitting on a wooden table", TARGET)]
    out = nodes.edit_list.FateZeroEditList.execute(
        target_1=edits[0][0], blend_settings_1=edits[0][1], target_2=edits[1][0],
        blend_settings_2=edits[1][1], target_4=edits[2][0], blend_settings_4=edits[2][1]).args
    targets, specs, names = out
    assert [s.target_prompt for s in specs] == [TARGET, "a fox sitting on a wooden table", TARGET]
    assert all(t is e[0] for t, e in zip(targets, edits))
    assert names == ["fatezero/a_dog_sitting_on_a_wooden_table", "fatezero/a_fox_sitting_on_a_wooden_table",
                     "fatezero/a_dog_sitting_on_a_wooden_table_2"]
    with pytest.raises(user_error_types, match="Edit 2 has no blend_settings_2"):
        nodes.edit_list.FateZeroEditList.execute(target_1=edits[0][0], blend_settings_1=edits[0][1],
                                                 target_2=edits[1][0])


LONG_NEGATIVE = ", ".join(["blurry, low quality, jpeg artifacts, watermark, text, deformed hands"] * 5)


def batched_and_separate(nodes, model, clip, negative, placement, monkeypatch):
    """The same edit with cond and uncond in one UNet call, then in separate calls (ComfyUI runs
    them one by one when it reports no free memory)."""
    import comfy.samplers

    source_cond, source = source_prompt(nodes, clip)
    target_cond, spec, _ = edit_settings(nodes, clip, source, blend_words="cat")
    inverted, store = invert(nodes, model, source_cond, moving_latent(), store_placement=placement)
    spied, calls = chunk_spy(model)
    batched, _ = sample(nodes, spied, target_cond, negative, inverted, store, spec, cfg=7.5)
    assert max(calls) >= 2, "cond and uncond were not batched"
    calls.clear()
    with monkeypatch.context() as patch:
        patch.setattr(comfy.samplers.model_management, "get_free_memory", lambda *a, **k: 0)
        separate, _ = sample(nodes, spied, target_cond, negative, inverted, store, spec, cfg=7.5)
    assert max(calls) == 1, calls
    return batched["samples"], separate["samples"]


@pytest.mark.usefixtures("host_inference_mode")
@pytest.mark.parametrize("placement", ["cpu", "recompute"])
def test_a_long_negative_prompt_edits_alike_batched_or_not(nodes, tiny_sd15, tiny_clip, monkeypatch, placement):
    """Batched, the 77-token target is repeated to the negative's 154 tokens (``comfy/conds.py``);
    the fusion sees the target's own 77 slots, so the only difference left is the float rounding
    of other batch shapes that ComfyUI's batching gives any prompt: measured on the empty negative
    (same shapes, no padding), amplified by cfg 7.5 over the steps."""
    import nodes as core_nodes

    long_negative = core_nodes.CLIPTextEncode().encode(tiny_clip, LONG_NEGATIVE)[0]
    assert long_negative[0][0].shape[1] == 154  # about 120 tokens: two 77-token chunks
    padded = max_rel(*batched_and_separate(nodes, tiny_sd15, tiny_clip, long_negative, placement, monkeypatch))
    unpadded = max_rel(*batched_and_separate(nodes, tiny_sd15, tiny_clip, empty(tiny_clip), placement, monkeypatch))
    assert padded <= max(2 * unpadded, 1e-6), (padded, unpadded)


# ------------------------------------------------------------------------------------------------
# Server
# ------------------------------------------------------------------------------------------------


def ids_of(prompt: dict, class_type: str) -> list[str]:
    return [i for i, n in prompt.items() if n["class_type"] == class_type]


def save_edit_latent(prompt: dict, prefix) -> str:
    """Add core Save Latent after FateZero Sample; returns its node id."""
    sample_id = ids_of(prompt, "FateZero_Sample")[0]
    node_id = str(max(int(i) for i in prompt) + 1)
    prompt[node_id] = {"class_type": "SaveLatent", "inputs": {"samples": [sample_id, 0], "filename_prefix": prefix}}
    return node_id


def saved_latents(server, entry: dict, node_id: str) -> list[torch.Tensor]:
    files = entry["outputs"][node_id]["latents"]
    return [load_file(str(server.output_dir / f["subfolder"] / f["filename"]))["latent_tensor"] for f in files]


def cached_ids(entry: dict) -> set[str]:
    return set(next(data for kind, data in entry["status"]["messages"] if kind == "execution_cached")["nodes"])


def run_ok(server, prompt: dict) -> dict:
    entry = server.run(prompt, timeout=900)
    assert entry["status"]["status_str"] == "success", (execution_error(entry), server.log_tail())
    return entry


def style_prompt(server, video: str, tag: str) -> dict:
    prompt = shrink(load_api("style_watercolor"), server, video, prefix=f"many_{tag}")
    save_edit_latent(prompt, f"many_{tag}/latent")
    return prompt


def set_target(prompt: dict, target: str) -> dict:
    prompt = copy.deepcopy(prompt)
    prompt[ids_of(prompt, "FateZero_EditSettings")[0]]["inputs"]["target_prompt"] = target
    return prompt


def test_changing_the_target_reruns_only_the_edit(comfy_server):
    video = write_video_file(comfy_server.input_dir, "many_cache.avi")
    tag = uuid.uuid4().hex[:6]
    first = style_prompt(comfy_server, video, tag)
    run_ok(comfy_server, first)

    second = set_target(first, NEW_TARGET)
    entry = run_ok(comfy_server, second)
    cached = cached_ids(entry)
    for kind in ("FateZero_DDIMInvert", "VAEEncode", "FateZero_LoadVideoFrames", "FateZero_SourcePrompt"):
        assert set(ids_of(second, kind)) <= cached, f"{kind} ran again"
    for kind in ("FateZero_EditSettings", "FateZero_Sample"):
        assert not set(ids_of(second, kind)) & cached, f"{kind} came from the cache"
    latent_id = ids_of(second, "SaveLatent")[0]
    edited = saved_latents(comfy_server, entry, latent_id)[0]

    # The same clip under another name: the loader and everything after it run afresh.
    fresh_video = "many_cache_fresh.avi"
    shutil.copyfile(comfy_server.input_dir / video, comfy_server.input_dir / fresh_video)
    fresh = copy.deepcopy(second)
    fresh[ids_of(fresh, "FateZero_LoadVideoFrames")[0]]["inputs"]["video"] = fresh_video
    fresh_entry = run_ok(comfy_server, fresh)
    assert not set(ids_of(fresh, "FateZero_DDIMInvert")) & cached_ids(fresh_entry)
    assert torch.equal(saved_latents(comfy_server, fresh_entry, latent_id)[0], edited)


def test_changing_the_target_keeps_the_tuned_model(comfy_server):
    base_name = sd15_shape_checkpoint(comfy_server)
    video = write_video_file(comfy_server.input_dir, "many_train.avi")
    prompt = shrink(load_api("shape_edit_train"), comfy_server, video, prefix=f"many_train_{uuid.uuid4().hex[:6]}")
    prompt[ids_of(prompt, "CheckpointLoaderSimple")[0]]["inputs"]["ckpt_name"] = base_name
    run_ok(comfy_server, prompt)
    entry = run_ok(comfy_server, set_target(prompt, "a Porsche car driving down a snowy road in the countryside"))
    cached = cached_ids(entry)
    assert set(ids_of(prompt, "FateZero_TuneAVideoTrain")) <= cached
    assert set(ids_of(prompt, "FateZero_DDIMInvert")) <= cached
    assert set(ids_of(prompt, "KSampler")) <= cached  # the class images are made once


TARGETS = ("watercolor painting of a silver jeep driving down a snowy road in the countryside",
           "watercolor painting of a red jeep driving down a curvy road in the countryside",
           "dark watercolor painting of a silver jeep driving down a curvy road")


def test_three_edits_of_one_inversion_in_one_queue_equal_each_edit_alone(comfy_server):
    video = write_video_file(comfy_server.input_dir, "many_list.avi")
    tag = uuid.uuid4().hex[:6]
    base = style_prompt(comfy_server, video, tag)
    settings_id = ids_of(base, "FateZero_EditSettings")[0]
    sample_id = ids_of(base, "FateZero_Sample")[0]
    latent_id = ids_of(base, "SaveLatent")[0]

    many = copy.deepcopy(base)
    list_inputs = {}
    for k, target in enumerate(TARGETS, start=1):
        node_id = settings_id if k == 1 else f"{900 + k}"
        many[node_id] = copy.deepcopy(base[settings_id])
        many[node_id]["inputs"]["target_prompt"] = target
        list_inputs.update({f"target_{k}": [node_id, 0], f"blend_settings_{k}": [node_id, 1]})
    many["950"] = {"class_type": "FateZero_EditList", "inputs": list_inputs}
    many[sample_id]["inputs"].update(positive=["950", 0], blend_settings=["950", 1])
    many[latent_id]["inputs"]["filename_prefix"] = ["950", 2]
    entry = run_ok(comfy_server, many)
    together = saved_latents(comfy_server, entry, latent_id)
    files = [f["filename"] for f in entry["outputs"][latent_id]["latents"]]
    assert len(together) == 3
    assert [f.rsplit("_", 2)[0] for f in files] == [
        "watercolor_painting_of_a_silver_jeep_driving_down_a_snowy",
        "watercolor_painting_of_a_red_jeep_driving_down_a_curvy_road",
        "dark_watercolor_painting_of_a_silver_jeep_driving_down_a"]

    for target, edited in zip(TARGETS, together):
        alone = run_ok(comfy_server, set_target(base, target))
        assert set(ids_of(base, "FateZero_DDIMInvert")) <= cached_ids(alone)
        diff = float((saved_latents(comfy_server, alone, latent_id)[0] - edited).abs().max())
        assert diff <= 1e-6, (target, diff)


def test_a_workflow_saved_with_the_deprecated_settings_node_still_runs(comfy_server):
    import json
    from pathlib import Path

    saved = Path(__file__).resolve().parent.parent / "data" / "saved_workflows" / "api" / "style_watercolor.json"
    api = json.loads(saved.read_text())
    assert ids_of(api, "FateZero_AttentionBlendSettings")
    video = write_video_file(comfy_server.input_dir, "many_saved.avi")
    prompt = shrink(api, comfy_server, video, prefix=f"many_saved_{uuid.uuid4().hex[:6]}")
    entry = run_ok(comfy_server, prompt)
    assert entry["outputs"][ids_of(prompt, "SaveVideo")[0]]["images"]
