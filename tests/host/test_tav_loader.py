"""Tune-A-Video Loader in a real ComfyUI: tiny Tune-A-Video checkpoints written by the tests.

Checkpoints are diffusers UNet3D state dicts: the 2D weights are the tiny SD1.5-topology UNet's
(``tiny_models.build_tiny_sd15``, model_channels 32) under their diffusers names (ComfyUI's
``unet_to_diffusers`` map read backwards), plus temporal weights of the right shapes in one of the
two public layouts: official Tune-A-Video (``attn_temp``/``norm_temp``) or FateZero
(``attn_temporal``/``norm_temporal`` and ``conv_temporal`` as a LoRA pair or a full Conv1d).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import uuid
from pathlib import Path

import pytest
import torch

from fatezero_core.tav import checkpoint as core_tav
from fatezero_core.tav.modules import effective_lora_rank

FRAMES, LATENT, STEPS = 3, 8, 2
PROMPT = "a silver jeep driving down a curvy road"
REPO = Path(__file__).resolve().parents[2]
API_WORKFLOW = REPO / "workflows" / "api" / "shape_edit_tav.json"
UI_WORKFLOW = REPO / "workflows" / "shape_edit_tav.json"
ATTN_Q = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"

pytestmark = pytest.mark.usefixtures("host_inference_mode")


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------


def diffusers_unet(patcher) -> dict[str, torch.Tensor]:
    """The 2D weights of a ComfyUI SD1.x UNet under their diffusers names."""
    import comfy.utils

    sd = patcher.model.diffusion_model.state_dict()
    wanted = core_tav.sd1_unet_key_shapes(int(sd["input_blocks.0.0.weight"].shape[0]))
    out = {}
    for diffusers_key, comfy_key in comfy.utils.unet_to_diffusers(patcher.model.model_config.unet_config).items():
        if diffusers_key in wanted and comfy_key in sd:
            out[diffusers_key] = sd[comfy_key].detach().clone()
    assert out.keys() == wanted.keys()
    return out


def add_temporal(sd2d: dict, layout: str = "fatezero", conv: str | None = "lora", identity: bool = False,
                 rank: int = 8, seed: int = 1, gain: float = 0.5) -> dict[str, torch.Tensor]:
    """``sd2d`` plus temporal weights. ``identity``: zero attention output projections and identity
    convs (dirac Conv1d, or LoRA with ``up`` = 0), so the model must equal the 2D one."""
    tav = core_tav
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    attn, norm = ("attn_temp", "norm_temp") if layout == "official" else ("attn_temporal", "norm_temporal")
    out = dict(sd2d)
    for block in tav.sd1_transformer_blocks():
        c = sd2d[f"{block}.norm1.weight"].shape[0]
        for proj in ("to_q", "to_k", "to_v"):
            out[f"{block}.{attn}.{proj}.weight"] = rnd(c, c, scale=c ** -0.5)
        out[f"{block}.{attn}.to_out.0.weight"] = torch.zeros(c, c) if identity else rnd(c, c, scale=gain * c ** -0.5)
        out[f"{block}.{attn}.to_out.0.bias"] = torch.zeros(c) if identity else rnd(c, scale=0.05)
        out[f"{block}.{norm}.weight"] = 1.0 + rnd(c, scale=0.1)
        out[f"{block}.{norm}.bias"] = rnd(c, scale=0.1)
    for name in tav.sd1_inflated_convs() if conv else ():
        c = sd2d[f"{name}.weight"].shape[0]
        if conv == "lora":
            r = effective_lora_rank(c, rank)
            out[f"{name}.conv_temporal.down.weight"] = rnd(r, c, 3, scale=(3 * c) ** -0.5)
            out[f"{name}.conv_temporal.up.weight"] = torch.zeros(c, r, 3) if identity else rnd(c, r, 3, scale=gain * (3 * r) ** -0.5)
        else:
            weight = torch.zeros(c, c, 3)
            weight[range(c), range(c), 1] = 1.0
            out[f"{name}.conv_temporal.weight"] = weight if identity else weight + rnd(c, c, 3, scale=gain * (3 * c) ** -0.5)
            out[f"{name}.conv_temporal.bias"] = torch.zeros(c) if identity else rnd(c, scale=0.05)
    return out


def save(sd: dict, path: Path) -> str:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, str(path))
    return path.name


# ------------------------------------------------------------------------------------------------
# Fixtures and helpers
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def loader(nodes):
    return nodes.tav_loader


@pytest.fixture
def folder(nodes):
    return nodes.tav_folder


@pytest.fixture
def network(nodes):
    return nodes.tav_network


@pytest.fixture
def tav_dir(loader, tmp_path, monkeypatch) -> Path:
    """An empty folder as the only ``tuneavideo`` model folder."""
    import folder_paths

    folder = tmp_path / "tuneavideo"
    folder.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "tuneavideo", ([str(folder)], set()))
    return folder


@pytest.fixture
def tiny_2d(tiny_sd15) -> dict:
    return diffusers_unet(tiny_sd15)


def load(loader, name, base=None):
    return loader.FateZeroTuneAVideoLoader.execute(checkpoint=name, base_model=base).args[0]


def encode(clip, text):
    import nodes as core_nodes

    return core_nodes.CLIPTextEncode().encode(clip, text)[0]


def frames_latent(seed=0):
    return torch.randn(FRAMES, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(seed))


def ksample(model, positive, negative, latent, cfg=7.5):
    import nodes as core_nodes

    out = core_nodes.KSampler().sample(model, 0, STEPS, cfg, "ddim", "ddim_uniform", positive, negative,
                                       {"samples": latent}, 1.0)
    return out[0]["samples"]


# ------------------------------------------------------------------------------------------------
# Folder and schema
# ------------------------------------------------------------------------------------------------


def test_tuneavideo_folder_is_registered(loader):
    import folder_paths

    assert "tuneavideo" in folder_paths.folder_names_and_paths
    default = str(Path(folder_paths.models_dir) / "tuneavideo")
    assert default in folder_paths.get_folder_paths("tuneavideo")


def test_lists_weight_files_and_diffusers_folders(loader, folder, tav_dir, tmp_path, monkeypatch):
    import folder_paths

    for rel in ("jeep.safetensors", "sub/man_skate.bin", "old.ckpt", "weights.pt", "notes.txt",
                "pipeline/unet/diffusion_pytorch_model.bin", "pipeline/text_encoder/pytorch_model.bin",
                "pipeline/vae/diffusion_pytorch_model.bin", "unet_only/diffusion_pytorch_model.safetensors",
                "empty_folder/readme.md", ".hidden/x.safetensors"):
        (tav_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (tav_dir / rel).write_bytes(b"x")
    extra = tmp_path / "extra_tav"
    (extra / "swan_150" / "unet").mkdir(parents=True)
    (extra / "swan_150" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "tuneavideo", ([str(tav_dir), str(extra)], set()))

    names = folder.list_checkpoints()
    assert names == ["jeep.safetensors", "old.ckpt", "pipeline", "sub/man_skate.bin", "swan_150",
                     "unet_only", "weights.pt"]
    options = loader.FateZeroTuneAVideoLoader.GET_NODE_INFO_V1()["input"]["required"]["checkpoint"][1]["options"]
    assert options == names
    assert folder.resolve_checkpoint("swan_150") == str(extra / "swan_150")
    assert folder.resolve_checkpoint("sub/man_skate.bin") == str(tav_dir / "sub" / "man_skate.bin")
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    for bad in ("../outside.safetensors", "empty_folder", "nothing.safetensors"):
        with pytest.raises(ValueError, match="was not found"):
            folder.resolve_checkpoint(bad)


def test_schema(loader, comfy_nodes):
    info = loader.FateZeroTuneAVideoLoader.GET_NODE_INFO_V1()
    assert (info["name"], info["display_name"], info["category"]) == (
        "FateZero_TuneAVideoLoader", "Tune-A-Video Loader", "FateZero/loaders")
    assert info["description"] and info["output"] == ["MODEL"]
    assert info["input"]["optional"]["base_model"][0] == "MODEL"
    for section in ("required", "optional"):
        for name, spec in info["input"][section].items():
            assert spec[1].get("tooltip"), name
    assert loader.FateZeroTuneAVideoLoader in comfy_nodes.nodes.node_classes()


# ------------------------------------------------------------------------------------------------
# Where the temporal layers go: ComfyUI's own key conversion
# ------------------------------------------------------------------------------------------------

# ComfyUI (ldm openaimodel) module path of every SD1.x transformer block and kernel-3 conv, written
# from the ldm UNet layout (input_blocks: conv_in, then per level 2 x [ResBlock, SpatialTransformer]
# and a Downsample; output_blocks: per level 3 x [ResBlock, SpatialTransformer], the last with an
# Upsample), for SD1.5 (num_res_blocks 2, channel_mult [1, 2, 4, 4]).
BLOCK_PATHS = {
    "down_blocks.0.attentions.0.transformer_blocks.0": "input_blocks.1.1.transformer_blocks.0",
    "down_blocks.0.attentions.1.transformer_blocks.0": "input_blocks.2.1.transformer_blocks.0",
    "down_blocks.1.attentions.0.transformer_blocks.0": "input_blocks.4.1.transformer_blocks.0",
    "down_blocks.1.attentions.1.transformer_blocks.0": "input_blocks.5.1.transformer_blocks.0",
    "down_blocks.2.attentions.0.transformer_blocks.0": "input_blocks.7.1.transformer_blocks.0",
    "down_blocks.2.attentions.1.transformer_blocks.0": "input_blocks.8.1.transformer_blocks.0",
    "mid_block.attentions.0.transformer_blocks.0": "middle_block.1.transformer_blocks.0",
    "up_blocks.1.attentions.0.transformer_blocks.0": "output_blocks.3.1.transformer_blocks.0",
    "up_blocks.1.attentions.1.transformer_blocks.0": "output_blocks.4.1.transformer_blocks.0",
    "up_blocks.1.attentions.2.transformer_blocks.0": "output_blocks.5.1.transformer_blocks.0",
    "up_blocks.2.attentions.0.transformer_blocks.0": "output_blocks.6.1.transformer_blocks.0",
    "up_blocks.2.attentions.1.transformer_blocks.0": "output_blocks.7.1.transformer_blocks.0",
    "up_blocks.2.attentions.2.transformer_blocks.0": "output_blocks.8.1.transformer_blocks.0",
    "up_blocks.3.attentions.0.transformer_blocks.0": "output_blocks.9.1.transformer_blocks.0",
    "up_blocks.3.attentions.1.transformer_blocks.0": "output_blocks.10.1.transformer_blocks.0",
    "up_blocks.3.attentions.2.transformer_blocks.0": "output_blocks.11.1.transformer_blocks.0",
}
CONV_PATHS = {"conv_in": "input_blocks.0.0", "conv_out": "out.2"}
for _level in range(4):
    for _j in range(2):
        _n = 3 * _level + _j + 1
        CONV_PATHS[f"down_blocks.{_level}.resnets.{_j}.conv1"] = f"input_blocks.{_n}.0.in_layers.2"
        CONV_PATHS[f"down_blocks.{_level}.resnets.{_j}.conv2"] = f"input_blocks.{_n}.0.out_layers.3"
    if _level < 3:
        CONV_PATHS[f"down_blocks.{_level}.downsamplers.0.conv"] = f"input_blocks.{3 * _level + 3}.0.op"
    for _j in range(3):
        _n = 3 * _level + _j
        CONV_PATHS[f"up_blocks.{_level}.resnets.{_j}.conv1"] = f"output_blocks.{_n}.0.in_layers.2"
        CONV_PATHS[f"up_blocks.{_level}.resnets.{_j}.conv2"] = f"output_blocks.{_n}.0.out_layers.3"
    if _level < 3:  # after the ResBlock and, from level 1 on, the SpatialTransformer
        CONV_PATHS[f"up_blocks.{_level}.upsamplers.0.conv"] = f"output_blocks.{3 * _level + 2}.{2 if _level else 1}.conv"
for _j in range(2):
    CONV_PATHS[f"mid_block.resnets.{_j}.conv1"] = f"middle_block.{2 * _j}.in_layers.2"
    CONV_PATHS[f"mid_block.resnets.{_j}.conv2"] = f"middle_block.{2 * _j}.out_layers.3"


def test_owner_paths_come_from_comfyui_conversion(network, tiny_sd15):
    """Every temporal owner the core names maps, through ComfyUI's unet_to_diffusers, to the ldm
    module the layout says, and that module is a transformer block or a 3x3 conv of the UNet."""
    from comfy.ldm.modules.attention import BasicTransformerBlock

    assert sorted(core_tav.sd1_transformer_blocks()) == sorted(BLOCK_PATHS)
    assert sorted(core_tav.sd1_inflated_convs()) == sorted(CONV_PATHS)
    key_map = network.diffusers_key_map(tiny_sd15.model.model_config.unet_config)
    unet = tiny_sd15.model.diffusion_model
    for block, path in BLOCK_PATHS.items():
        assert network.module_path(block, key_map) == path, block
        assert isinstance(unet.get_submodule(path), BasicTransformerBlock)
    for conv, path in CONV_PATHS.items():
        assert network.module_path(conv, key_map) == path, conv
        assert isinstance(unet.get_submodule(path), torch.nn.Conv2d) and unet.get_submodule(path).kernel_size == (3, 3)


@pytest.mark.parametrize("owner", ["up_blocks.0.attentions.0.transformer_blocks.0",
                                   "down_blocks.3.attentions.0.transformer_blocks.0",
                                   "down_blocks.0.attentions.0.transformer_blocks.1", "mid_block.resnets.2.conv1"])
def test_owners_outside_the_unet_are_refused(network, tiny_sd15, owner):
    key_map = network.diffusers_key_map(tiny_sd15.model.model_config.unet_config)
    with pytest.raises(ValueError, match=rf"no single module for {owner}"):
        network.module_path(owner, key_map)


# ------------------------------------------------------------------------------------------------
# Loading and temporal layers
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout, conv", [("official", None), ("fatezero", "lora"), ("fatezero", "full")])
def test_identity_temporal_layers_equal_the_clip_norm_2d_model(nodes, loader, tav_dir, tiny_sd15, tiny_2d,
                                                               tiny_clip, layout, conv):
    """Zero output projections and identity convs: under a plain core KSampler the model is the 2D
    model with clip-level ResNet/output GroupNorms (how Tune-A-Video models are tuned): bit for
    bit the pack's clip-norm 2D model, and the hand-written official network to float rounding."""
    from test_group_norm import TOL, official_network

    name = save(add_temporal(tiny_2d, layout, conv, identity=True), tav_dir / "noop.safetensors")
    model = load(loader, name, tiny_sd15)
    # one container per temporal layer; the 45 norm containers, 7 of them without a temporal conv
    assert len(model.object_patches) == 16 + (52 if conv else 45)
    assert all(k.startswith("diffusion_model.") for k in model.object_patches)
    pos, neg = encode(tiny_clip, PROMPT), encode(tiny_clip, "")
    latent = frames_latent()
    per_frame = ksample(tiny_sd15, pos, neg, latent)
    video_norm = ksample(nodes.video_runtime.with_group_norm(tiny_sd15, "clip"), pos, neg, latent)
    official = ksample(official_network(FRAMES), pos, neg, latent)
    ours = ksample(model, pos, neg, latent)
    assert torch.isfinite(ours).all()
    assert torch.equal(ours, video_norm), float((ours - video_norm).abs().max())
    # An uncalmed random UNet amplifies float rounding (hand-written norm vs torch's) tenfold here.
    assert float((ours - official).abs().max() / official.abs().mean()) < 10 * TOL
    assert float((ours - per_frame).abs().max() / per_frame.abs().mean()) > 1e-3


def test_object_patches_keep_every_2d_key(loader, tav_dir, tiny_sd15, tiny_2d):
    import comfy.lora
    import comfy.model_management

    model = load(loader, save(add_temporal(tiny_2d, "fatezero", "lora"), tav_dir / "t.safetensors"), tiny_sd15)
    keys = set(model.object_patches)
    assert "diffusion_model.input_blocks.1.1.transformer_blocks" in keys
    assert {"diffusion_model.input_blocks.0", "diffusion_model.input_blocks.3",
            "diffusion_model.output_blocks.2", "diffusion_model.output_blocks.5",
            "diffusion_model.input_blocks.1.0.in_layers", "diffusion_model.input_blocks.1.0.out_layers",
            "diffusion_model.out"} <= keys
    plain_keys = set(tiny_sd15.model.state_dict())
    comfy.model_management.load_models_gpu([model])  # installs the object patches
    unet = model.model.diffusion_model
    assert len(unet.input_blocks[1][1].transformer_blocks) == 2
    assert type(unet.input_blocks[3]).__name__ == "TimestepEmbedSequential" and len(unet.input_blocks[3]) == 2
    patched = set(model.model.state_dict())
    assert plain_keys <= patched
    assert all("temporal" in k for k in patched - plain_keys)
    lora_keys = comfy.lora.model_lora_keys_unet(model.model, {})
    assert lora_keys["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"] == ATTN_Q
    temporal = sum(p.numel() * p.element_size() for k, p in model.model.named_parameters() if "temporal" in k)
    assert model.model_size() >= tiny_sd15.model_size() + temporal


def test_random_temporal_layers_couple_frames(loader, tav_dir, tiny_sd15, tiny_2d, tiny_clip):
    model = load(loader, save(add_temporal(tiny_2d, "fatezero", "lora"), tav_dir / "t.safetensors"), tiny_sd15)
    pos, neg = encode(tiny_clip, PROMPT), encode(tiny_clip, "")
    a = frames_latent()
    b = a.clone()
    b[0] += 1.0
    plain_a, plain_b = ksample(tiny_sd15, pos, neg, a), ksample(tiny_sd15, pos, neg, b)
    assert torch.allclose(plain_a[1:], plain_b[1:], atol=1e-5)  # 2D model: frames independent
    tav_a, tav_b = ksample(model, pos, neg, a), ksample(model, pos, neg, b)
    assert torch.isfinite(tav_a).all()
    assert float((tav_a[1:] - tav_b[1:]).abs().max()) > 1e-3  # frame 0 reaches the others
    assert float((tav_a - plain_a).abs().max()) > 1e-3


def test_cond_and_uncond_clips_stay_separate(loader, tav_dir, tiny_sd15, tiny_2d):
    """A CFG batch ``[uncond F | cond F]`` equals the two clips run alone: temporal layers split it
    by ``cond_or_uncond`` (attention) and by the wrapper's frame context (convs)."""
    import comfy.model_management
    import comfy.patcher_extension

    model = load(loader, save(add_temporal(tiny_2d, "fatezero", "full"), tav_dir / "t.safetensors"), tiny_sd15)
    comfy.model_management.load_models_gpu([model])
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2 * FRAMES, 4, LATENT, LATENT, generator=g)
    context = torch.randn(2 * FRAMES, 77, 768, generator=g)
    sigma = torch.full((2 * FRAMES,), 3.0)

    def run(rows, cond_or_uncond):
        options = {"cond_or_uncond": cond_or_uncond,
                   "wrappers": comfy.patcher_extension.copy_nested_dicts(model.wrappers)}
        return model.model.apply_model(x[rows], sigma[rows], c_crossattn=context[rows], transformer_options=options)

    both = run(slice(None), [1, 0])
    alone = torch.cat([run(slice(0, FRAMES), [1]), run(slice(FRAMES, None), [0])])
    # Rounding differs with the batch (and the thread count); mixing the clips would differ by far
    # more (test_random_temporal_layers_couple_frames: frames change each other's output).
    assert torch.allclose(both, alone, atol=1e-4), float((both - alone).abs().max())
    as_one_video = run(slice(None), [0])
    assert float((as_one_video - both).abs().max()) > 1e-4


def test_diffusers_folders_and_bin_files_load(loader, folder, tav_dir, tiny_sd15, tiny_2d):
    sd = add_temporal(tiny_2d, "official", None)
    save(sd, tav_dir / "jeep_tuned" / "unet" / "diffusion_pytorch_model.bin")
    save({f"unet.{k}": v for k, v in sd.items()}, tav_dir / "unet_only" / "diffusion_pytorch_model.safetensors")
    assert folder.list_checkpoints() == ["jeep_tuned", "unet_only"]
    for name in ("jeep_tuned", "unet_only"):
        model = load(loader, name, tiny_sd15)
        assert len(model.object_patches) == 16 + 45  # official layout: attention only, and the norms
        weight = model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn1.to_q.weight
        assert torch.equal(weight, tiny_2d["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"])


def test_checkpoint_weights_replace_the_base_weights(loader, tav_dir, tiny_sd15, tiny_2d):
    sd = add_temporal(tiny_2d)
    sd["conv_in.weight"] = sd["conv_in.weight"] * 2.0
    base_before = tiny_sd15.model.diffusion_model.input_blocks[0][0].weight.clone()
    model = load(loader, save(sd, tav_dir / "t.safetensors"), tiny_sd15)
    assert model.model is not tiny_sd15.model
    assert torch.equal(model.model.diffusion_model.input_blocks[0][0].weight, 2.0 * base_before)
    assert torch.equal(tiny_sd15.model.diffusion_model.input_blocks[0][0].weight, base_before)


def test_base_model_sampling_and_options_are_kept(loader, tav_dir, tiny_sd15, tiny_2d, caplog):
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    base = ModelSamplingDiscrete().patch(tiny_sd15, "v_prediction", True)[0]
    base.model_options["transformer_options"]["marker"] = "kept"
    base.add_patches({ATTN_Q: (torch.ones(32, 32),)}, 1.0)
    objects, options = dict(base.object_patches), copy.deepcopy(base.model_options)
    with caplog.at_level(logging.WARNING):
        model = load(loader, save(add_temporal(tiny_2d), tav_dir / "t.safetensors"), base)
    assert model.get_model_object("model_sampling") is base.get_model_object("model_sampling")
    assert model.model_options["transformer_options"]["marker"] == "kept"
    assert model.model.model_config is base.model.model_config
    assert not model.patches  # the base UNet's weight patches do not carry over ...
    assert "weight patches" in caplog.text  # ... and the user is told
    assert base.object_patches == objects and base.model_options == options


@pytest.mark.parametrize("overrides, named", [
    ({"model_channels": 64}, "model_channels 64 instead of 32"),
    ({"context_dim": 1024}, "context_dim 1024 instead of 768"),
])
def test_base_model_of_another_architecture_is_refused(loader, tav_dir, tiny_2d, overrides, named):
    import tiny_models

    base = tiny_models.build_tiny_sd15(**overrides)
    name = save(add_temporal(tiny_2d), tav_dir / "t.safetensors")
    with pytest.raises(ValueError, match=named):
        load(loader, name, base)


def test_base_model_of_another_topology_is_refused(loader, tav_dir, tiny_2d):
    """ComfyUI calls it SD1.5 (same width and context), but its levels are all 32 wide."""
    import tiny_models

    base = tiny_models.build_tiny_sd15(channel_mult=[1, 1, 1, 1])
    name = save(add_temporal(tiny_2d), tav_dir / "t.safetensors")
    with pytest.raises(ValueError, match=r"not shaped as SD1\.x \(4 missing keys: down_blocks\.1\.resnets\.0\.conv_shortcut"):
        load(loader, name, base)


def test_tiny_unet_alone_is_not_detected_by_comfyui(loader, tav_dir, tiny_2d):
    """Without a base model ComfyUI's own detection decides, and it knows SD1.x at width 320 only."""
    name = save(add_temporal(tiny_2d), tav_dir / "t.safetensors")
    with pytest.raises(ValueError, match=r"does not detect .* on its own \(its width is 32; .* 320\).*base_model"):
        load(loader, name)


def test_temporal_layers_take_the_model_dtype(loader, tav_dir, tiny_2d, tiny_clip):
    """A bf16 base model: the temporal layers are built in bf16 and sampling runs."""
    import comfy.model_patcher
    import comfy.supported_models
    import tiny_models

    config = comfy.supported_models.SD15(tiny_models.sd15_unet_config())
    config.set_inference_dtype(torch.bfloat16, None)
    base_model = config.get_model({})
    base_model.diffusion_model.load_state_dict(tiny_models.build_tiny_sd15().model.diffusion_model.state_dict())
    cpu = torch.device("cpu")
    base = comfy.model_patcher.ModelPatcher(base_model, load_device=cpu, offload_device=cpu)
    model = load(loader, save(add_temporal(tiny_2d), tav_dir / "t.safetensors"), base)
    from comfy.patcher_extension import WrappersMP

    runtime = model.get_wrappers(WrappersMP.DIFFUSION_MODEL, "fatezero_clip")[0]
    assert runtime.modules and {p.dtype for m in runtime.modules for p in m.parameters()} == {torch.bfloat16}
    out = ksample(model, encode(tiny_clip, PROMPT), encode(tiny_clip, ""), frames_latent())
    assert torch.isfinite(out).all()


def test_plain_sd1_unet_loads_without_temporal_layers(loader, tav_dir, tiny_sd15, tiny_2d):
    model = load(loader, save(tiny_2d, tav_dir / "plain.safetensors"), tiny_sd15)
    assert not model.object_patches
    assert "fatezero_key_rule" not in model.model_options["transformer_options"]


# ------------------------------------------------------------------------------------------------
# With FateZero nodes and LoRA
# ------------------------------------------------------------------------------------------------


def test_fatezero_invert_and_edit_use_the_tav_key_rule(nodes, loader, tav_dir, tiny_sd15, tiny_2d, tiny_clip):
    model = load(loader, save(add_temporal(tiny_2d, gain=0.2), tav_dir / "t.safetensors"), tiny_sd15)
    source, target, spec = nodes.blend_settings.FateZeroAttentionBlendSettings.execute(
        clip=tiny_clip, source_prompt="a silver jeep driving down a road",
        target_prompt="a Porsche car driving down a road", blend_words="silver, jeep",
        cross_replace_steps=0.5, self_replace_steps=0.5, blend_threshold=0.3, mode="replace",
        local_latent_blend=False, soft_mask=False, target_blend_words="Porsche, car").args
    inverted, store = nodes.invert.FateZeroDDIMInvert.execute(
        model=model, source=source, latent={"samples": frames_latent()}, steps=STEPS, key_frames="auto",
        st_min_channels=-1, store_placement="cpu", store_dtype="fp32", layer_set="relative",
        schedule_end="comfy").args
    assert store.config.key_rule == (-1, "first")  # prev, first
    assert store.config.min_st_channels == 0
    edited, preview = nodes.sample.FateZeroSample.execute(
        model=model, positive=target, negative=encode(tiny_clip, ""), latent=inverted,
        attention_store=store, blend_settings=spec, cfg=7.5, fusion=True).args
    assert edited["samples"].shape == (FRAMES, 4, LATENT, LATENT)
    assert torch.isfinite(edited["samples"]).all() and preview.shape[0] == FRAMES


def write_lora(path: Path, rank: int = 4) -> str:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(9)
    layer = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{layer}.lora_down.weight": torch.randn(rank, 32, generator=g),
               f"{layer}.lora_up.weight": torch.randn(32, rank, generator=g),
               f"{layer}.alpha": torch.tensor(float(rank))}, str(path))
    return path.name


def test_lora_loader_on_top_changes_the_output(loader, tav_dir, tiny_sd15, tiny_2d, tiny_clip, tmp_path, monkeypatch):
    import comfy.model_management
    import comfy.utils
    import folder_paths
    import nodes as core_nodes

    loras = tmp_path / "loras"
    loras.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", ([str(loras)], folder_paths.supported_pt_extensions))
    lora_name = write_lora(loras / "tiny_lora.safetensors")
    model = load(loader, save(add_temporal(tiny_2d), tav_dir / "t.safetensors"), tiny_sd15)
    (with_lora,) = core_nodes.LoraLoaderModelOnly().load_lora_model_only(model, lora_name, 1.0)
    assert ATTN_Q in with_lora.patches
    assert with_lora.object_patches == model.object_patches  # temporal layers kept

    pos, neg = encode(tiny_clip, PROMPT), encode(tiny_clip, "")
    latent = frames_latent()
    before = ksample(model, pos, neg, latent)
    after = ksample(with_lora, pos, neg, latent)
    assert float((after - before).abs().max()) > 1e-3
    comfy.model_management.load_models_gpu([with_lora])
    unet = with_lora.model.diffusion_model
    assert len(unet.input_blocks[1][1].transformer_blocks) == 2
    patched_q = comfy.utils.get_attr(with_lora.model, ATTN_Q)
    assert not torch.equal(patched_q, tiny_2d["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"])
    assert torch.equal(ksample(model, pos, neg, latent), before)  # the loaded model is unchanged


# ------------------------------------------------------------------------------------------------
# Bad files
# ------------------------------------------------------------------------------------------------


def test_corrupt_file_is_reported(loader, tav_dir):
    (tav_dir / "broken.safetensors").write_bytes(b"\x00\x01not a safetensors file" * 10)
    with pytest.raises(ValueError, match="looks corrupt"):
        load(loader, "broken.safetensors")


def test_non_sd1_unet_is_refused(loader, tav_dir, tiny_2d):
    sd = add_temporal(tiny_2d)
    for key in [k for k in sd if ".attn2.to_k." in k or ".attn2.to_v." in k]:
        sd[key] = torch.zeros(sd[key].shape[0], 1024)
    name = save(sd, tav_dir / "sd2.safetensors")
    with pytest.raises(ValueError, match=r"not a Stable Diffusion 1\.x UNet.*context dim 1024"):
        load(loader, name)


def test_full_checkpoint_and_incomplete_temporal_weights_are_named(loader, tav_dir, tiny_2d):
    save({f"model.diffusion_model.{k}": v for k, v in list(tiny_2d.items())[:4]}, tav_dir / "full.safetensors")
    with pytest.raises(ValueError, match="Load Checkpoint"):
        load(loader, "full.safetensors")
    sd = add_temporal(tiny_2d, "official", None)
    del sd["mid_block.attentions.0.transformer_blocks.0.norm_temp.bias"]
    save(sd, tav_dir / "partial.safetensors")
    with pytest.raises(ValueError, match=r"mid_block\.attentions\.0\.transformer_blocks\.0\.norm_temp\.bias"):
        load(loader, "partial.safetensors")


def test_pickle_with_objects_is_refused(loader, tav_dir, tiny_2d):
    torch.save({"state_dict": tiny_2d, "config": uuid.UUID(int=1)}, str(tav_dir / "unsafe.ckpt"))
    with pytest.raises(ValueError, match="refused for safety"):
        load(loader, "unsafe.ckpt")


def test_fingerprint_follows_the_file(loader, tav_dir, tiny_2d):
    path = tav_dir / "t.safetensors"
    save(add_temporal(tiny_2d), path)
    first = loader.FateZeroTuneAVideoLoader.fingerprint_inputs("t.safetensors")
    assert first == loader.FateZeroTuneAVideoLoader.fingerprint_inputs("t.safetensors")
    save(add_temporal(tiny_2d, seed=3, conv="full"), path)
    assert loader.FateZeroTuneAVideoLoader.fingerprint_inputs("t.safetensors") != first
    assert math.isnan(loader.FateZeroTuneAVideoLoader.fingerprint_inputs("missing.safetensors"))


# ------------------------------------------------------------------------------------------------
# Headless server
# ------------------------------------------------------------------------------------------------


def test_object_info_lists_the_loader_and_its_files(comfy_server, tiny_sd15):
    folder = comfy_server.base / "models" / "tuneavideo"
    save(add_temporal(diffusers_unet(tiny_sd15)), folder / "listed_tav.safetensors")
    info = comfy_server.object_info("FateZero_TuneAVideoLoader")["FateZero_TuneAVideoLoader"]
    assert info["display_name"] == "Tune-A-Video Loader" and info["category"] == "FateZero/loaders"
    assert info["output"] == ["MODEL"]
    assert "listed_tav.safetensors" in info["input"]["required"]["checkpoint"][1]["options"]
    assert info["input"]["optional"]["base_model"][0] == "MODEL"
    assert "FateZero_TuneAVideoLoader" in comfy_server.object_info()


def test_ui_workflow_is_the_twin_of_the_api_workflow():
    ui, api = json.loads(UI_WORKFLOW.read_text()), json.loads(API_WORKFLOW.read_text())
    real = {str(n["id"]): n for n in ui["nodes"] if n["type"] != "Note"}
    assert sorted(real) == sorted(api)
    links = {link[0]: link for link in ui["links"]}
    for node_id, node in real.items():
        assert api[node_id]["class_type"] == node["type"]
        for inp in node["inputs"]:
            if inp["link"] is not None:
                _, src, slot, dst, _, _ = links[inp["link"]]
                assert api[node_id]["inputs"][inp["name"]] == [str(src), slot] and str(dst) == node_id
    loader_node = next(n for n in api.values() if n["class_type"] == "FateZero_TuneAVideoLoader")
    assert api[loader_node["inputs"]["base_model"][0]]["class_type"] == "CheckpointLoaderSimple"
    settings = next(n for n in api.values() if n["class_type"] == "FateZero_EditSettings")["inputs"]
    source = api[settings["source_prompt"][0]]
    assert source["class_type"] == "FateZero_SourcePrompt"
    assert source["inputs"]["source_prompt"] == "a silver jeep driving down a curvy road in the countryside"
    assert settings["target_prompt"] == "a Porsche car driving down a curvy road in the countryside"
    assert (settings["mode"], settings["cross_replace_steps"], settings["self_replace_steps"],
            settings["blend_threshold"]) == ("replace", 0.5, 0.5, 0.3)
    assert (settings["blend_words"], settings["target_blend_words"]) == ("silver, jeep", "Porsche, car")
    invert = next(n for n in api.values() if n["class_type"] == "FateZero_DDIMInvert")["inputs"]
    assert (invert["steps"], invert["key_frames"]) == (50, "auto")
    assert next(n for n in api.values() if n["class_type"] == "FateZero_Sample")["inputs"]["cfg"] == 7.5


def shared_tav_diffusers_file(folder: Path, seed: int = 5) -> str:
    """A diffusers-layout Tune-A-Video UNet of the real SD1.5 shape (FateZero layout, LoRA temporal
    convs) as ``unet/diffusion_pytorch_model.bin``: every tensor a seeded strided view of a few
    shared buffers, so the 900 M-parameter file is a few MB on disk (``torch.save`` writes a
    storage once)."""
    import tiny_models

    storage = tiny_models.SharedStorage(seed)
    shapes = dict(core_tav.sd1_unet_key_shapes(320))
    for block in core_tav.sd1_transformer_blocks():
        c = shapes[f"{block}.norm1.weight"][0]
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            shapes[f"{block}.attn_temporal.{proj}.weight"] = (c, c)
        shapes[f"{block}.attn_temporal.to_out.0.bias"] = (c,)
        shapes[f"{block}.norm_temporal.weight"] = (c,)
        shapes[f"{block}.norm_temporal.bias"] = (c,)
    for name in core_tav.sd1_inflated_convs():
        c = shapes[f"{name}.weight"][0]
        r = effective_lora_rank(c, 8)
        shapes[f"{name}.conv_temporal.down.weight"] = (r, c, 3)
        shapes[f"{name}.conv_temporal.up.weight"] = (c, r, 3)
    sd = {k: storage.tensor(k, torch.Size(v)) for k, v in sorted(shapes.items())}
    path = folder / "unet" / "diffusion_pytorch_model.bin"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, str(path))
    return folder.name


def test_shape_edit_workflow_runs_headless(comfy_server):
    """The shipped API workflow, unchanged but for file names and sizes: a checkpoint of the real
    SD1.5 UNet shape (random weights, as the base MODEL plus its CLIP and VAE), a Tune-A-Video
    UNet tuned from that shape (a diffusers folder), a 4-frame clip at 64 px and 2 steps."""
    import av
    from video_writers import write_video
    from host_server import execution_error

    import tiny_models

    base_name = "fatezero_sd15_shape.ckpt"
    tiny_models.write_tiny_sd15_checkpoint(comfy_server.base / "models" / "checkpoints" / base_name,
                                           channel_mult=tiny_models.SD15_CHANNEL_MULT)
    tav_name = shared_tav_diffusers_file(comfy_server.base / "models" / "tuneavideo" / "fatezero_sd15_tav")
    clip = torch.zeros(4, 48, 80, 3)
    for k in range(4):
        clip[k] = (30 * k + 20) / 255.0
        clip[k, 12:30, 8 + 5 * k:26 + 5 * k] = torch.tensor([0.8, 0.8, 0.85])
    write_video(comfy_server.input_dir / "tav_jeep.avi", clip, 8.0)

    prompt = json.loads(API_WORKFLOW.read_text())
    prefix = f"tav_{uuid.uuid4().hex[:6]}"
    for node in prompt.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = base_name
        elif kind == "FateZero_TuneAVideoLoader":
            inputs["checkpoint"] = tav_name
        elif kind == "FateZero_LoadVideoFrames":
            inputs.update(video="tav_jeep.avi", frame_load_cap=FRAMES, size=64)
        elif kind == "FateZero_DDIMInvert":
            inputs["steps"] = STEPS
        elif kind == "SaveVideo":
            inputs["filename_prefix"] = f"{prefix}/video"
    entry = comfy_server.run(prompt, timeout=900)
    assert entry["status"]["status_str"] == "success", (execution_error(entry), comfy_server.log_tail())
    save_id = next(i for i, n in prompt.items() if n["class_type"] == "SaveVideo")
    saved = entry["outputs"][save_id]["images"]
    path = comfy_server.output_dir / saved[0]["subfolder"] / saved[0]["filename"]
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = list(container.decode(stream))
    assert len(frames) == FRAMES and (stream.width, stream.height) == (64, 64)
    preview_id = next(i for i, n in prompt.items() if n["class_type"] == "PreviewImage")
    assert len(entry["outputs"][preview_id]["images"]) == FRAMES


def test_unet_alone_loads_through_comfyui_loader(nodes, loader, tav_dir):
    """No base model: ComfyUI's diffusers-UNet loader detects the real SD1.5 shape, picks its
    usual UNet dtype and loads every 2D weight; the temporal layers, the key rule and clip-level
    GroupNorm are added as with a base."""
    import comfy.model_management
    import comfy.supported_models
    import comfy.utils

    name = shared_tav_diffusers_file(tav_dir / "sd15_tav")
    sd = core_tav.load_state_dict_file(tav_dir / name)
    model = load(loader, name)
    assert type(model.model.model_config) is comfy.supported_models.SD15
    expected_dtype = comfy.model_management.unet_dtype(
        model_params=comfy.utils.calculate_parameters({k: v for k, v in sd.items() if "temporal" not in k}),
        supported_dtypes=list(model.model.model_config.supported_inference_dtypes),
        weight_dtype=torch.float32)
    assert model.model.get_dtype() == expected_dtype
    unet = model.model.diffusion_model.state_dict()
    for key, comfy_key in comfy.utils.unet_to_diffusers(model.model.model_config.unet_config).items():
        if key in sd:
            assert torch.equal(unet[comfy_key], sd[key].to(expected_dtype)), key
    assert len(model.object_patches) == 16 + 52
    assert model.model_options["transformer_options"]["fatezero_key_rule"] == "prev, first"
    assert nodes.video_runtime.model_group_norm(model) == "clip"


# ------------------------------------------------------------------------------------------------
# The temporal layers leave the device with the model
# ------------------------------------------------------------------------------------------------

META = torch.device("meta")  # stands in for the offload device: a move there shows on a CPU-only machine


def devices(modules) -> set[torch.device]:
    return {p.device for module in modules for p in module.parameters()}


def test_temporal_layers_leave_the_device_with_the_model(nodes, tiny_sd15):
    """A clone with temporal layers (as Tune-A-Video Train builds its output: it shares its network
    with the input MODEL) is loaded; another clone of the same network takes its place, so its
    containers leave the network; ComfyUI unloads everything. The layers must then sit on the
    offload device with the network. Dropping a clone while another one running the same layers
    is loaded moves nothing."""
    import comfy.model_management

    tav = tiny_sd15.clone()
    nodes.tav_network.insert_temporal_layers(tav, nodes.tav_network.fresh_layers(tiny_sd15, 4, 0))
    layers = nodes.video_runtime.video_runtime(tav).modules
    comfy.model_management.load_models_gpu([tav])
    tav.offload_device = tiny_sd15.offload_device = META
    sibling = tav.clone()
    sibling.detach(unpatch_all=False)  # what ComfyUI does when it drops a clone
    assert devices(layers) == {torch.device("cpu")}  # tav, which runs them, is still loaded

    comfy.model_management.load_models_gpu([tiny_sd15])
    comfy.model_management.unload_all_models()
    assert devices([tiny_sd15.model.diffusion_model]) == {META}  # ComfyUI moved its network
    assert devices(layers) == {META}
