"""The compact store + SDPA fusion equals the naive map-materialising reference (fp32).

Synthetic attention calls of a small UNet (latent 16x16, four resolution levels) are replayed
through both controllers: inversion with capture, then editing with ``[uncond F | cond F]`` chunks,
and for ``recompute`` a source pass before every edit step, as the host drives it.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from fatezero_core import blend_mask as bm
from fatezero_core.controller import CaptureController, EditController, EditSettings
from fatezero_core.keyframes import parse_key_rule
from fatezero_core.layers import AttnCall, LayerInfo
from fatezero_core.store import AttentionStore, CaptureConfig
from reference import NaiveMapController
from ids import placement_id

LATENT = 16
HEADS = 2
TOKENS = 77
STEPS = 5
MIN_ST = 64
LAYERS = [
    LayerInfo("in_0", 16, 16, LATENT, LATENT, HEADS, 32),
    LayerInfo("in_1", 8, 8, LATENT, LATENT, HEADS, 64),
    LayerInfo("in_2", 4, 4, LATENT, LATENT, HEADS, 64),
    LayerInfo("mid", 2, 2, LATENT, LATENT, HEADS, 64),
    LayerInfo("out_2a", 4, 4, LATENT, LATENT, HEADS, 64),
    LayerInfo("out_2b", 4, 4, LATENT, LATENT, HEADS, 64),
    LayerInfo("out_1", 8, 8, LATENT, LATENT, HEADS, 64),
    LayerInfo("out_0", 16, 16, LATENT, LATENT, HEADS, 32),
]


def rand(seed, *shape):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def fixed_seed(*parts) -> int:
    """The same integer in every process (Python salts ``hash`` of strings per process)."""
    return zlib.crc32(repr(parts).encode()) % 2**31


def self_qkv(tag, step, li, frames, chunks):
    layer = LAYERS[li]
    seed = fixed_seed(tag, step, li, "self")
    return [rand(seed + n, chunks * frames, layer.tokens, layer.channels) for n in range(3)]


def cross_qkv(tag, step, li, frames, chunks):
    layer = LAYERS[li]
    seed = fixed_seed(tag, step, li, "cross")
    # Scaled queries give peaky maps, so thresholds select real regions.
    q = 3 * rand(seed, chunks * frames, layer.tokens, layer.channels)
    k = rand(seed + 1, chunks, TOKENS, layer.channels).repeat_interleave(frames, 0)
    v = rand(seed + 2, chunks, TOKENS, layer.channels).repeat_interleave(frames, 0)
    return q, k, v


def unet_pass(controller, tag, step, frames, chunks, call_step=None):
    """One UNet evaluation: attn1 then attn2 of every layer, outputs collected.

    ``step`` picks the synthetic tensors; ``call_step`` is what the host reports (the running
    sampler's step index, which differs from the inversion step for edit-time source passes).
    """
    outs = []
    for li, layer in enumerate(LAYERS):
        call = AttnCall(layer, step if call_step is None else call_step, chunks)
        outs.append(controller.attn1(*self_qkv(tag, step, li, frames, len(chunks)), call))
        outs.append(controller.attn2(*cross_qkv(tag, step, li, frames, len(chunks)), call))
    return outs


def alignment(mode, reweight):
    """Hand-made alignment tensors (prompt alignment has its own token-table tests)."""
    n = STEPS
    alphas = torch.zeros(n + 1, TOKENS)
    alphas[: int(0.8 * (n + 1))] = 1
    alphas[: int(0.4 * (n + 1)), 5] = 0  # token 5 has its own window (0.4, 0.8)
    if mode == "replace":
        mapper = torch.eye(TOKENS)
        mapper[2, 2] = 0
        mapper[2, 2], mapper[2, 3] = 0.5, 0.5  # one source token split over two target tokens
        mapper[3, 3] = 0
        mapper[3, 4] = 1
        mapper[4, 4] = 0
        refine_alphas = None
    else:
        mapper = torch.cat([torch.arange(0, 2), torch.tensor([2, 2]), torch.arange(3, TOKENS - 1)])
        refine_alphas = torch.ones(TOKENS)
        refine_alphas[2:4] = 0  # new target tokens keep the edit attention
    equalizer = None
    if reweight:
        equalizer = torch.ones(TOKENS)
        equalizer[6] = 10.0
    source_ids = tuple(range(TOKENS))
    target_ids = source_ids[:2] + (900, 901, 902) + source_ids[5:]  # tokens 2-4 are new words
    return dict(mode=mode, mapper=mapper, refine_alphas=refine_alphas, equalizer=equalizer,
                cross_alphas=alphas, self_window=(0, int(0.6 * n) + 1), source_token_ids=source_ids,
                target_token_ids=target_ids)


EDITS = {
    "replace": ("replace", False),
    "refine": ("refine", False),
    "reweight": ("refine", True),
}
BLENDS = {"no-blend": None, "th0.3": 0.3, "th2": 2.0}
RULES = ["mid", "self, mid", "prev, first"]
PLACEMENTS = ["gpu", "cpu", "disk", "recompute"]


def run_both(edit, blend, rule, frames, placement, tmp_path, soft=False, latent_blend=False):
    rule_t = parse_key_rule(rule)
    config = CaptureConfig(num_frames=frames, latent_size=(LATENT, LATENT),
                           sigmas=tuple(float(s) for s in torch.linspace(0, 5, STEPS + 1)),
                           key_rule=rule_t, min_st_channels=MIN_ST, layer_set="relative")
    store = AttentionStore(config, placement=placement, dtype="fp32", disk_dir=str(tmp_path))
    core = CaptureController(store)
    naive = NaiveMapController(rule_t, MIN_ST, stored_levels={1, 2, 3})
    naive.layer_info = {layer.name: layer for layer in LAYERS}
    naive.num_steps = STEPS

    for j in range(STEPS):
        a = unet_pass(core, "src", j, frames, ("cond",))
        b = unet_pass(naive, "src", j, frames, ("cond",))
        for x, y in zip(a, b):
            assert (x - y).abs().max() <= 1e-5
        store.end_step(j)
    store.set_latents([rand(900 + j, frames, 4, LATENT, LATENT) for j in range(STEPS + 1)])
    store.finish()

    al = alignment(*EDITS[edit])
    blend_tokens = (2, 3) if blend is not None else None
    settings = EditSettings(**al, blend_tokens=blend_tokens, blend_threshold=blend or 0.3,
                            soft_mask=soft, latent_blend=latent_blend,
                            target_blend_tokens=(3, 4) if latent_blend else None)
    editor = EditController(store, settings)
    naive.mode = "edit"
    naive.edit = dict(al, blend_tokens=blend_tokens, threshold=blend or 0.3, soft=soft,
                      target_tokens=(3, 4) if latent_blend else None)

    worst = 0.0
    for i in range(STEPS):
        j = STEPS - 1 - i
        if placement == "recompute":
            store.begin_regeneration(j)
            unet_pass(editor, "src", j, frames, ("source",), call_step=i)
        a = unet_pass(editor, "edit", i, frames, ("uncond", "cond"))
        b = unet_pass(naive, "edit", i, frames, ("uncond", "cond"))
        for x, y in zip(a, b):
            worst = max(worst, float((x - y).abs().max()))
        if latent_blend:
            ma = editor.maps.latent_blend_mask(i, (LATENT, LATENT))
            if ma is not None:
                mb = naive.latent_mask(i, (LATENT, LATENT))
                assert torch.equal(ma, mb)
    return worst, store, editor


@pytest.mark.parametrize("placement", PLACEMENTS, ids=placement_id)
@pytest.mark.parametrize("frames", [1, 8])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("blend", list(BLENDS))
@pytest.mark.parametrize("edit", list(EDITS))
def test_fused_equals_naive(edit, blend, rule, frames, placement, tmp_path):
    worst, store, _ = run_both(edit, BLENDS[blend], rule, frames, placement, tmp_path)
    assert worst <= 1e-5, f"max abs diff {worst:.3g}"
    store.release()


def test_soft_mask_ramps_from_the_threshold_and_respects_full_replacement():
    """Soft masks obey blend_threshold (tooltip: >= 1 is full replacement): 0 at or below the
    threshold, 1 at the frame's peak, linear between; a hand-made map, no pooling effect."""
    word_map = torch.zeros(1, 4, 4)
    word_map[0, 1:3, 1:3] = torch.tensor([[1.0, 0.5], [0.5, 0.5]])  # 3x3 pooling: peak 1 nearby
    pooled = bm.dilate(word_map)
    expected = ((pooled / pooled.max() - 0.4) / 0.6).clamp(0, 1).flatten(1)
    assert torch.allclose(bm.blend_mask(word_map, (4, 4), 0.4, soft=True), expected)
    assert torch.equal(bm.blend_mask(word_map, (4, 4), 1.0, soft=True), torch.zeros(1, 16))
    assert torch.equal(bm.blend_mask(word_map, (4, 4), 2.0, soft=True), torch.zeros(1, 16))
    assert torch.allclose(bm.blend_mask(word_map, (4, 4), 0.0, soft=True),
                          (pooled / pooled.max()).flatten(1))


@pytest.mark.parametrize("threshold", [0.3, 2.0])
def test_soft_mask_equals_naive(tmp_path, threshold):
    worst, _, _ = run_both("refine", threshold, "mid", 8, "cpu", tmp_path, soft=True)
    assert worst <= 1e-5


def test_latent_blend_mask_equals_naive(tmp_path):
    worst, _, editor = run_both("replace", 0.3, "mid", 8, "cpu", tmp_path, latent_blend=True)
    assert worst <= 1e-5
    # the official window int(0.2 N) < i + 1 < int(0.8 N): N=5 -> i + 1 in {2, 3}
    assert [i for i in range(STEPS) if editor.maps.latent_blend_active(i)] == [1, 2]


def test_fusion_changes_the_output(tmp_path):
    """Guard against a vacuous comparison: fusion must differ from plain attention."""
    _, store, editor = run_both("refine", None, "mid", 8, "cpu", tmp_path)
    plain = EditController(store, EditSettings(**alignment("refine", False), fuse=False))
    i = 0
    fused = unet_pass(editor, "edit", i, 8, ("uncond", "cond"))
    unfused = unet_pass(plain, "edit", i, 8, ("uncond", "cond"))
    diffs = [float((a - b).abs().max()) for a, b in zip(fused, unfused)]
    # uncond halves are identical; stored layers (levels 1-3) differ
    assert max(diffs) > 1e-2
    assert diffs[0] == 0.0 and diffs[1] == 0.0  # full-resolution layer is never fused


def test_threshold_two_is_full_replacement(tmp_path):
    """blend_th >= 1 gives M = 0, the same output as no blend words at all."""
    a, _, ed_a = run_both("replace", 2.0, "mid", 8, "cpu", tmp_path)
    b, _, ed_b = run_both("replace", None, "mid", 8, "cpu", tmp_path)
    oa = unet_pass(ed_a, "edit", 1, 8, ("uncond", "cond"))
    ob = unet_pass(ed_b, "edit", 1, 8, ("uncond", "cond"))
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(oa, ob))


def test_a_prompt_padded_by_repetition_attends_as_the_prompt_itself():
    """ComfyUI pads a shorter conditioning by repeating it (``comfy/conds.py``); softmax over r
    copies of every key gives each copy 1/r of the weight and the same value, so the output is
    attention over one copy. The copies are dropped exactly; anything else is left alone."""
    from fatezero_core.attention import attention, unrepeated_tokens

    q, k, v = rand(1, 2, 16, 64), rand(2, 2, TOKENS, 64), rand(3, 2, TOKENS, 64)
    k3, v3 = k.repeat(1, 3, 1), v.repeat(1, 3, 1)
    assert torch.allclose(attention(q, k3, v3, HEADS), attention(q, k, v, HEADS), atol=1e-6)
    kk, vv = unrepeated_tokens(k3, v3)
    assert torch.equal(kk, k) and torch.equal(vv, v)
    real = rand(4, 2, 3 * TOKENS, 64)  # a long negative prompt: no copies
    assert unrepeated_tokens(real, real)[0] is real
    almost = k3.clone()
    almost[:, -1, 0] += 1e-3  # the last copy differs in one value
    assert unrepeated_tokens(almost, v3)[0].shape[1] == 3 * TOKENS


@pytest.mark.parametrize("placement", ["cpu", "recompute"])
def test_a_long_negative_prompt_batched_with_the_target_gives_the_unbatched_edit(tmp_path, placement):
    """cond/uncond in one call (the 77-token target repeated to the 231-token negative's length)
    or in two calls: the same outputs, bit for bit, on every layer."""
    _, store, editor = run_both("refine", 0.3, "mid", 4, placement, tmp_path)
    batched_editor = EditController(store, editor.settings)
    separate_editor = EditController(store, editor.settings)
    frames, i = 4, 1
    if placement == "recompute":  # the step's source attention, regenerated once for both
        store.begin_regeneration(STEPS - 1 - i)
        unet_pass(batched_editor, "src", STEPS - 1 - i, frames, ("source",), call_step=i)
    for li, layer in enumerate(LAYERS):
        q, k_cond, v_cond = cross_qkv("edit", i, li, frames, 1)
        q_un = rand(fixed_seed("q-un", li), frames, layer.tokens, layer.channels)
        k_un = rand(fixed_seed("k-un", li), 1, 3 * TOKENS, layer.channels).expand(frames, -1, -1)
        v_un = rand(fixed_seed("v-un", li), 1, 3 * TOKENS, layer.channels).expand(frames, -1, -1)
        batched = batched_editor.attn2(
            torch.cat([q_un, q]), torch.cat([k_un, k_cond.repeat(1, 3, 1)]),
            torch.cat([v_un, v_cond.repeat(1, 3, 1)]), AttnCall(layer, i, ("uncond", "cond")))
        alone = torch.cat([
            separate_editor.attn2(q_un, k_un, v_un, AttnCall(layer, i, ("uncond",))),
            separate_editor.attn2(q, k_cond, v_cond, AttnCall(layer, i, ("cond",)))])
        assert torch.equal(batched, alone), layer.name
