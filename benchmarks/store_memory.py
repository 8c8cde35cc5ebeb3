"""Attention-store memory: the official map store vs ours, SD1.x shapes at 512x512.

Run: ``.venv/bin/python benchmarks/store_memory.py`` (CPU is enough; about 20 s).

Columns of the table (bytes in decimal units, 1 MB = 1e6 B):

- ``frames``, ``rule (K)``: frame count and key-frame rule; K is the official key-frame count
  (``mid`` -> 1, SD configs; ``prev, first`` -> 2, Tune-A-Video configs).
- ``kept``: key frames whose source keys our store keeps (distinct frames the rule refers to:
  1 for ``mid``, f-1 for ``prev, first``).
- ``steps``: DDIM steps N.
- ``official/step``, ``official total``: the official map store, ``s*f*H*sum_l q_l*(77 + K*q_l)``
  (fp16), times N: every cross map ``q x 77`` and self map ``q x K*q`` of the layers with
  ``q <= 32*32``, per frame and head (FateZero ``video_diffusion/prompt_attention/
  attention_store.py``, ``AttentionStore.forward`` and ``between_steps``). Its latents and running
  sum are not counted. For f=8, H=8 this is 777,265,152 B per step for K=1 and 1,490,821,120 B for
  K=2.
- ``compact/step``, ``compact total``: our ``gpu``, ``cpu`` and ``disk`` placements (same bytes;
  they live in GPU memory, host RAM or one file per step): source queries, key-frame keys and
  cross probabilities in fp16, plus one float32 inversion latent per step; the total is
  ``N * attention + (N + 1) * latent``. Worked out by the estimate DDIM Invert checks before it
  inverts (``fatezero_core/store_size.py``, ``estimate_store``, from ComfyUI's SD1.5 UNet config).
- ``recompute/step``, ``recompute total``: the ``recompute`` placement, latents only.
- ``x official``: our total divided by the official total.

The script also captures one real inversion step through ``CaptureController`` into an
``AttentionStore`` with synthetic tensors of the real SD1.x shapes (8 frames, both rules) and checks
that ``nbytes_by_step()`` equals the estimate. Results go to ``benchmarks/results/store_memory.json``.
The last lines compare against the design targets (8 frames, 512 px, K=1, per step).
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import torch

import _report

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fatezero_core.keyframes import key_frame_table, key_frames_used, parse_key_rule  # noqa: E402
from fatezero_core.sd1 import HEADS as SD1_HEADS  # noqa: E402
from fatezero_core.store import CaptureConfig  # noqa: E402
from fatezero_core.store_size import estimate_store, unet_attention_layers  # noqa: E402
from tiny_models.sd15 import SD15_UNET_CONFIG  # noqa: E402
from tiny_models.store_probe import LATENT, measure_one_step, sd1_stored_layers  # noqa: E402

FRAMES = (8, 16, 32, 64)
RULES = (("mid", 1), ("prev, first", 2))
STEPS = (10, 50)
TARGETS = {"compact_vs_official": 0.2, "recompute_vs_official": 0.01}
TEXT_TOKENS = 77


def official_map_store_bytes_per_step(frames: int, heads: int, layers, key_frames: int,
                                      bytes_per_value: int = 2) -> int:
    """``s * f * H * sum_l q_l * (77 + K * q_l)``; ``layers`` are the stored query lengths ``q_l``
    (at 512 px: five of 1024, five of 256, one of 64), ``key_frames`` is K (1 for ``[mid]``, 2 for
    ``[-1, first]``)."""
    total = sum(q * (TEXT_TOKENS + key_frames * q) for q in layers)
    return bytes_per_value * frames * heads * total


def compact_estimate(frames: int, rule: str, steps: int = 1):
    """The shipped estimate for SD1.5 at 512 px, fp16, ``relative``: per stored layer ``(q, C, H)``
    ``f*q*C`` (source queries) + ``K_kept*q*C`` (source keys of the key frames in use) +
    ``f*H*q*77`` (cross-attention probabilities) per step, and one float32 latent ``[f, 4, h, w]``
    per step (all a ``recompute`` store keeps)."""
    config = CaptureConfig(num_frames=frames, latent_size=(LATENT, LATENT),
                           sigmas=tuple(float(s) for s in range(steps + 1)), key_rule=parse_key_rule(rule),
                           min_st_channels=640, layer_set="relative")
    return estimate_store(unet_attention_layers(SD15_UNET_CONFIG), config, torch.float16)


def kept_key_frames(rule: str, frames: int) -> int:
    return len(key_frames_used(key_frame_table(parse_key_rule(rule), frames)))


def row(frames: int, rule: str, k: int, steps: int) -> dict:
    layers = sd1_stored_layers(LATENT, "relative")
    kept = kept_key_frames(rule, frames)
    official = official_map_store_bytes_per_step(frames, SD1_HEADS, [q for q, _, _ in layers], k)
    estimate = compact_estimate(frames, rule, steps)
    attention, latent = estimate.attention_per_step, estimate.latent_per_step
    compact_total = estimate.nbytes
    recompute_total = estimate.latents
    return dict(frames=frames, rule=rule, K=k, kept=kept, steps=steps,
                official_per_step=official, official_total=steps * official,
                compact_attention_per_step=attention, latent_per_step=latent,
                compact_per_step=attention + latent, compact_total=compact_total,
                recompute_per_step=latent, recompute_total=recompute_total,
                compact_ratio_per_step=(attention + latent) / official,
                recompute_ratio_per_step=latent / official,
                compact_ratio_total=compact_total / (steps * official),
                recompute_ratio_total=recompute_total / (steps * official))


def gb(n: int) -> str:
    return f"{n / 1e9:,.2f} GB" if n >= 1e8 else _report.mb(n)


def main() -> int:
    rows = [row(f, rule, k, n) for f in FRAMES for rule, k in RULES for n in STEPS]
    header = ("frames", "rule (K)", "kept", "steps", "official/step", "official total",
              "compact/step", "compact total", "x official", "recompute/step", "recompute total",
              "x official")
    cells = [
        (str(r["frames"]), f"{r['rule']} ({r['K']})", str(r["kept"]), str(r["steps"]),
         _report.mb(r["official_per_step"]), gb(r["official_total"]),
         _report.mb(r["compact_per_step"]), gb(r["compact_total"]), f"{r['compact_ratio_total']:.3f}",
         _report.mb(r["recompute_per_step"]), gb(r["recompute_total"]), f"{r['recompute_ratio_total']:.5f}")
        for r in rows
    ]
    print("Attention store bytes, SD1.x 512x512 (64x64 latent, 11 stored layers, 8 heads, fp16; "
          "latents float32)")
    print("compact = gpu / cpu / disk placements (same bytes: GPU memory, host RAM, or files)")
    print(_report.table(header, cells))

    print("\nMeasured: one captured step through CaptureController -> AttentionStore.nbytes_by_step()")
    measured = []
    for rule, k in RULES:
        m = measure_one_step(rule, 8)
        estimate = compact_estimate(8, rule)
        formula, latent = estimate.attention_per_step, estimate.latent_per_step
        m.update(formula_bytes=formula, equal=m["attention_bytes"] == formula and
                 m["latent_bytes_per_step"] == latent)
        measured.append(m)
        print(f"  8 frames, {rule} ({k}): measured {m['attention_bytes']:,} B attention + "
              f"{m['latent_bytes_per_step']:,} B latent over {m['layers']} layers; estimate "
              f"{formula:,} B + {latent:,} B -> {'equal' if m['equal'] else 'DIFFERENT'} "
              f"({m['seconds']:.1f} s)")

    target_row = next(r for r in rows if r["frames"] == 8 and r["K"] == 1 and r["steps"] == 50)
    targets = {
        "compact_vs_official": target_row["compact_ratio_per_step"],
        "recompute_vs_official": target_row["recompute_ratio_per_step"],
    }
    status = {name: targets[name] <= goal for name, goal in TARGETS.items()}

    path = _report.write_json("store_memory.json", dict(
        setting="SD1.x 512x512, relative layer set, fp16 store, float32 latents",
        machine=dict(platform=platform.platform(), python=platform.python_version(),
                     torch=torch.__version__, cuda=torch.cuda.is_available()),
        rows=rows, measured=measured,
        targets={name: dict(measured=targets[name], goal=TARGETS[name], ok=status[name],
                            setting="8 frames, 512 px, K=1 (mid), per step")
                 for name in TARGETS},
    ))
    print(f"\nwrote {path.relative_to(ROOT)}")
    for name, goal in TARGETS.items():
        print(_report.target_line(name, targets[name], goal, "{:.4f}")[0])
    return 0 if all(m["equal"] for m in measured) else 1


if __name__ == "__main__":
    sys.exit(main())
