"""The shipped API workflows one after another on one server, as an artist runs them.

ComfyUI keeps the checkpoint's MODEL cached from one prompt to the next and leaves the object
patches of the last model clone it sampled applied to the network every clone of that MODEL
shares, until another clone loads. A workflow must therefore work whatever ran before it on the
same cached checkpoint.

What a workflow can leave on the checkpoint's network comes in two kinds: clip-level GroupNorm
containers (every FateZero edit on it with clip-level norms: style_watercolor, attribute_edit,
long_clip_recompute, lora_edit, controlnet_edit) and Tune-A-Video containers with them
(shape_edit_train; shape_edit_tav builds a network of its own and leaves nothing on the
checkpoint's; long_clip_windows runs per-frame norms and leaves nothing either, but must still run
after what the others leave). So the sequence runs every workflow directly after style_watercolor
and directly after shape_edit_train, and those two directly after every workflow: 26 of the 56
ordered pairs, in 27 runs (an Eulerian circuit). The other 30 pairs put one edit after another,
which only repeats what style_watercolor leaves behind for another reader; leaving them out halves
the runs.

All runs use one checkpoint of the real SD1.5 UNet shape (random weights; Tune-A-Video Train and
Loader need the SD1.x topology), 2 frames at 64 px, 1 DDIM / training step; only files and sizes
are swapped (``test_workflows_host.shrink``). The first Tune-A-Video Train saves the checkpoint
that shape_edit_tav loads; later ones save nothing (each save writes the whole UNet).
"""

from __future__ import annotations

import uuid

from host_server import execution_error
from test_workflows import api_names, load_api
from test_workflows_host import check_outputs, shrink, write_video_file, write_tiny_controlnet, write_tiny_lora

CHECKPOINT = "fatezero_sd15_shape.ckpt"
LORA = "fatezero_sd15_shape_lora.safetensors"
CONTROLNET = "fatezero_sd15_shape_controlnet.pth"
# 320-channel attention projections, so the LoRA fits SD1.5's first level.
LORA_LAYERS = (
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
    "lora_unet_up_blocks_3_attentions_0_transformer_blocks_0_attn1_to_v",
    "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_out_0",
)
FRAMES, STEPS = 2, 1
FIRST = "shape_edit_train"  # saves the Tune-A-Video checkpoint shape_edit_tav loads
HUBS = ("style_watercolor", "shape_edit_train")  # the two kinds of leftovers


def hub_pairs(names: list[str], hubs) -> set[tuple[str, str]]:
    """Ordered pairs of different names with a hub on either side."""
    return {(a, b) for a in names for b in names if a != b and (a in hubs or b in hubs)}


def walk_through(pairs: set[tuple[str, str]], start: str) -> list[str]:
    """Names in an order, from ``start``, in which each pair ``(a, b)`` appears as ``a`` directly
    followed by ``b`` exactly once and no other pair appears: an Eulerian circuit of ``pairs``
    (Hierholzer; every name must be left as often as it is entered)."""
    successors: dict[str, list[str]] = {}
    for a, b in sorted(pairs):
        successors.setdefault(a, []).append(b)
    stack, order = [start], []
    while stack:
        if successors.get(stack[-1]):
            stack.append(successors[stack[-1]].pop())
        else:
            order.append(stack.pop())
    return order[::-1]


def write_files(server) -> dict:
    import tiny_models

    models = server.base / "models"
    if not (models / "checkpoints" / CHECKPOINT).exists():
        tiny_models.write_tiny_sd15_checkpoint(models / "checkpoints" / CHECKPOINT,
                                               channel_mult=tiny_models.SD15_CHANNEL_MULT)
    write_tiny_lora(models / "loras" / LORA, layers=LORA_LAYERS)
    write_tiny_controlnet(models / "controlnet" / CONTROLNET, channel_mult=tiny_models.SD15_CHANNEL_MULT)
    return {"lora": LORA, "controlnet": CONTROLNET}


def prompt_for(server, name: str, run: int, files: dict, tuned: str | None) -> dict:
    prompt = shrink(load_api(name), server, f"seq_{name}.avi", prefix=f"seq_{run:02d}_{name}_{uuid.uuid4().hex[:6]}",
                    frames=FRAMES, files=files)
    for node in prompt.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = CHECKPOINT
        elif kind == "FateZero_DDIMInvert":
            inputs["steps"] = STEPS
        elif kind == "FateZero_TuneAVideoTrain":
            inputs["steps"] = STEPS
            if tuned is not None:
                inputs["save_name"] = ""
        elif kind == "FateZero_TuneAVideoLoader":
            inputs["checkpoint"] = tuned
    return prompt


def sequence() -> list[str]:
    return walk_through(hub_pairs(api_names(), HUBS), FIRST)


def test_the_sequence_runs_each_hub_pair_once():
    names, order = api_names(), sequence()
    assert set(HUBS) <= set(names) and len(names) == 8
    pairs = list(zip(order, order[1:]))
    assert order[0] == FIRST and len(pairs) == 26 and set(pairs) == hub_pairs(names, HUBS)
    every = {(a, b) for a in "abc" for b in "abc" if a != b}
    order = walk_through(every, "b")
    assert order[0] == "b" and sorted(zip(order, order[1:])) == sorted(every)  # each pair exactly once


def test_every_workflow_runs_after_style_and_train_edits_on_one_cached_checkpoint(comfy_server):
    files = write_files(comfy_server)
    names = api_names()
    for name in names:
        write_video_file(comfy_server.input_dir, f"seq_{name}.avi")
    tuned, failures, previous = None, [], None
    for run, name in enumerate(sequence()):
        if name == "shape_edit_tav" and tuned is None:
            failures.append(f"{previous} -> {name}: not run, the first {FIRST} saved no checkpoint")
            previous = name
            continue
        prompt = prompt_for(comfy_server, name, run, files, tuned)
        entry = comfy_server.run(prompt, timeout=600)
        if entry["status"]["status_str"] != "success":
            error = execution_error(entry) or {}
            failures.append(f"{previous} -> {name}: {error.get('node_type')}: {error.get('exception_message')}")
        else:
            shown = {i: n for i, n in prompt.items() if n["_meta"]["title"] != "Training loss"}
            check_outputs(comfy_server, shown, entry, FRAMES)
            if tuned is None and name == FIRST:
                train = next(n for n in prompt.values() if n["class_type"] == "FateZero_TuneAVideoTrain")
                tuned = f"{train['inputs']['save_name']}.safetensors"
        previous = name
    assert not failures, "\n".join(failures)
