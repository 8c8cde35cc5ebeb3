"""Invert once, edit many: what a second queue costs when only the target prompt changed.

Run: ``COMFYUI_PATH=~/ComfyUI ~/ComfyUI/venv/bin/python benchmarks/edit_many.py`` (CPU: about 2 min).

The graph runs in ComfyUI's own executor (``execution.PromptExecutor``, classic cache) in this
process, as the server runs it: core Load Checkpoint (a seeded tiny SD1.5-topology checkpoint
written to a private models folder), Empty Image -> VAE Encode -> FateZero DDIM Invert ->
FateZero Sample -> Save Latent, prompts from FateZero Source Prompt + FateZero Edit Settings (the
new graph) or from the deprecated FateZero Attention Blend Settings (the old graph). Each graph is
queued twice, the second time with another target prompt.

Columns: ``second queue`` is the wall time of the second queue; ``edit alone`` is the time the
first queue spent in the nodes an edit needs (the settings node that encodes the target, FateZero
Sample, Save Latent), timed between ComfyUI's ``executing`` messages; ``ratio`` their quotient.
Target: the new graph's second queue costs <= 1.1x an edit alone (the old graph runs the
inversion again).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _host  # noqa: E402
import _report  # noqa: E402

SOURCE = "a silver jeep driving down a curvy road in the countryside"
TARGETS = ("watercolor painting of a silver jeep driving down a curvy road in the countryside",
           "oil painting of a silver jeep driving down a curvy road in the countryside")
EDIT_WIDGETS = dict(blend_words="", cross_replace_steps=0.8, self_replace_steps=0.8, blend_threshold=0.3,
                    mode="auto", local_latent_blend=False, soft_mask=False)
EDIT_NODES = ("FateZero_EditSettings", "FateZero_AttentionBlendSettings", "FateZero_Sample", "SaveLatent")


def graph(kind: str, checkpoint: str, target: str, frames: int, size: int, steps: int) -> dict:
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": size, "height": size, "batch_size": frames, "color": 0x6080A0}},
        "4": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 2]}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "9": {"class_type": "SaveLatent", "inputs": {"samples": ["8", 0], "filename_prefix": "fatezero_bench/edit"}},
    }
    invert = {"model": ["1", 0], "latent": ["4", 0], "steps": steps, "key_frames": "auto", "st_min_channels": -1,
              "store_placement": "cpu", "store_dtype": "fp16", "layer_set": "relative", "schedule_end": "comfy"}
    sample = {"model": ["1", 0], "negative": ["6", 0], "latent": ["5", 0], "attention_store": ["5", 1], "cfg": 7.5,
              "fusion": True}
    if kind == "new":
        prompt["3"] = {"class_type": "FateZero_SourcePrompt", "inputs": {"clip": ["1", 1], "source_prompt": SOURCE}}
        prompt["7"] = {"class_type": "FateZero_EditSettings",
                       "inputs": {"clip": ["1", 1], "source_prompt": ["3", 1], "target_prompt": target, **EDIT_WIDGETS}}
        invert["source"], sample["positive"], sample["blend_settings"] = ["3", 0], ["7", 0], ["7", 1]
    else:
        prompt["3"] = {"class_type": "FateZero_AttentionBlendSettings",
                       "inputs": {"clip": ["1", 1], "source_prompt": SOURCE, "target_prompt": target, **EDIT_WIDGETS}}
        invert["source"], sample["positive"], sample["blend_settings"] = ["3", 0], ["3", 1], ["3", 2]
    prompt["5"] = {"class_type": "FateZero_DDIMInvert", "inputs": invert}
    prompt["8"] = {"class_type": "FateZero_Sample", "inputs": sample}
    return prompt


class TimingServer:
    """The part of ComfyUI's ``PromptServer`` the executor talks to: records when each node starts."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.events: list[tuple[float, str, dict]] = []

    def send_sync(self, event, data, sid=None):
        self.events.append((time.perf_counter(), event, data if isinstance(data, dict) else {}))

    def queue_updated(self):
        pass


def node_seconds(events, end: float) -> dict[str, float]:
    """Seconds from each ``executing`` message to the next one (or to ``end``)."""
    starts = [(t, d.get("node")) for t, e, d in events if e == "executing" and d.get("node")]
    return {node: (starts[k + 1][0] if k + 1 < len(starts) else end) - t for k, (t, node) in enumerate(starts)}


def queue(executor, server, prompt) -> tuple[float, dict[str, float], list[str]]:
    server.events.clear()
    start = time.perf_counter()
    executor.execute(prompt, str(uuid.uuid4()), {"client_id": "benchmark"}, ["9"])
    end = time.perf_counter()
    if not executor.success:
        raise RuntimeError(f"the graph failed: {executor.status_messages[-1]}")
    cached = next(d["nodes"] for _, e, d in server.events if e == "execution_cached")
    return end - start, node_seconds(server.events, end), cached


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    started = time.perf_counter()
    nodes = _host.setup()
    import execution
    import folder_paths
    import nodes as core_nodes
    import tiny_models

    for cls in nodes.node_classes():
        core_nodes.NODE_CLASS_MAPPINGS[cls.GET_SCHEMA().node_id] = cls
    models = Path(tempfile.mkdtemp(prefix="fatezero_bench_models_"))
    checkpoint = "fatezero_bench_tiny.ckpt"
    tiny_models.write_tiny_sd15_checkpoint(models / checkpoint)
    folder_paths.add_model_folder_path("checkpoints", str(models), is_default=True)
    folder_paths.set_output_directory(tempfile.mkdtemp(prefix="fatezero_bench_out_"))
    print(_host.describe_run(f"{args.size}x{args.size} px, {args.frames} frames, {args.steps} steps, "
                             "cpu store, cfg 7.5"), flush=True)

    rows, results = [], {}
    for kind in ("new", "old"):
        server = TimingServer()
        executor = execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC)
        first, per_node, _ = queue(executor, server, graph(kind, checkpoint, TARGETS[0], args.frames, args.size, args.steps))
        prompt = graph(kind, checkpoint, TARGETS[1], args.frames, args.size, args.steps)
        edit_alone = sum(s for node, s in per_node.items() if prompt[node]["class_type"] in EDIT_NODES)
        second, _, cached = queue(executor, server, prompt)
        ratio = second / edit_alone
        inverted_again = "5" not in cached
        results[kind] = dict(first_s=first, second_s=second, edit_alone_s=edit_alone, ratio=ratio,
                             inversion_rerun=inverted_again, cached=sorted(cached))
        rows.append([kind, f"{first:.2f}", f"{second:.2f}", f"{edit_alone:.2f}", f"{ratio:.3f}",
                     "yes" if inverted_again else "no"])
    print(_report.table(["graph", "first queue s", "second queue s", "edit alone s", "ratio",
                         "inverts again"], rows))
    seconds = time.perf_counter() - started
    path = _report.write_json("edit_many.json", {"frames": args.frames, "size": args.size, "steps": args.steps,
                                            "results": results, "script_seconds": seconds})
    print(f"wrote {path.relative_to(_report.ROOT)}; total {seconds:.0f} s")
    line, _ = _report.target_line("new graph: second queue (target changed) / edit alone",
                                  results["new"]["ratio"], 1.1)
    print(line)


if __name__ == "__main__":
    main()
