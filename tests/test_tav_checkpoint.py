"""Tune-A-Video checkpoints: loading, layout detection, validation and the temporal owners
(``fatezero_core.tav.checkpoint``). Checkpoints are synthetic: a scaled SD1.x topology
(model_channels 32, context 16, 2 heads) with small random tensors, written by the tests."""

import pytest
import torch

from fatezero_core.errors import CheckpointError
from fatezero_core.tav.checkpoint import (
    TavCheckpoint,
    check_sd1_unet,
    check_tav_checkpoint,
    check_temporal_shapes,
    load_state_dict_file,
    load_tav_checkpoint,
    sd1_inflated_convs,
    sd1_transformer_blocks,
    sd1_unet_key_shapes,
    split_tav_state_dict,
    temporal_targets,
    write_checkpoint,
)
from fatezero_core.tav.modules import TemporalAttention, TemporalConv, temporal_module_from_state_dict

MODEL_CHANNELS, CONTEXT, HEADS, LORA_RANK = 32, 16, 2, 16

# Known shapes of the real SD1.5 UNet (diffusers names).
SD15_SHAPES = {
    "conv_in.weight": (320, 4, 3, 3),
    "time_embedding.linear_1.weight": (1280, 320),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
    "down_blocks.1.resnets.0.conv_shortcut.weight": (640, 320, 1, 1),
    "down_blocks.2.downsamplers.0.conv.weight": (1280, 1280, 3, 3),
    "mid_block.attentions.0.transformer_blocks.0.ff.net.2.weight": (1280, 5120),
    "up_blocks.0.resnets.0.conv1.weight": (1280, 2560, 3, 3),
    "up_blocks.1.resnets.2.conv1.weight": (1280, 1920, 3, 3),
    "up_blocks.3.resnets.0.conv1.weight": (320, 960, 3, 3),
    "up_blocks.3.resnets.2.conv_shortcut.weight": (320, 640, 1, 1),
    "conv_out.weight": (4, 320, 3, 3),
}

ATTENTION_NAMES = {
    "attn_temporal.to_q.weight", "attn_temporal.to_k.weight", "attn_temporal.to_v.weight",
    "attn_temporal.to_out.0.weight", "attn_temporal.to_out.0.bias",
    "norm_temporal.weight", "norm_temporal.bias",
}


# ---------------------------------------------------------------------------------------------------
# Synthetic checkpoints
# ---------------------------------------------------------------------------------------------------

def unet_2d(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=gen) * 0.05
            for k, shape in sd1_unet_key_shapes(MODEL_CHANNELS, CONTEXT).items()}


def blocks_of(sd: dict) -> list:
    """Transformer blocks found from the 2D keys themselves."""
    suffix = ".norm1.weight"
    return [k[:-len(suffix)] for k in sd if k.endswith(suffix) and ".transformer_blocks." in k]


def k3_convs_of(sd: dict) -> list:
    """Convs with a 3x3 kernel found from the 2D keys themselves."""
    return [k[:-len(".weight")] for k, v in sd.items()
            if k.endswith(".weight") and v.ndim == 4 and v.shape[-1] == 3]


def add_temporal_attention(sd: dict, attn: str, norm: str, seed: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    out = dict(sd)
    for block in blocks_of(sd):
        c = sd[f"{block}.norm1.weight"].shape[0]
        for proj in ("to_q", "to_k", "to_v"):
            out[f"{block}.{attn}.{proj}.weight"] = torch.randn(c, c, generator=gen) * 0.1
        out[f"{block}.{attn}.to_out.0.weight"] = torch.randn(c, c, generator=gen) * 0.1
        out[f"{block}.{attn}.to_out.0.bias"] = torch.randn(c, generator=gen) * 0.1
        out[f"{block}.{norm}.weight"] = 1 + torch.randn(c, generator=gen) * 0.1
        out[f"{block}.{norm}.bias"] = torch.randn(c, generator=gen) * 0.1
    return out


def add_temporal_convs(sd: dict, rank=None, seed: int = 2) -> dict:
    gen = torch.Generator().manual_seed(seed)
    out = dict(sd)
    for conv in k3_convs_of(sd):
        c = sd[f"{conv}.weight"].shape[0]
        if rank is None:
            out[f"{conv}.conv_temporal.weight"] = torch.randn(c, c, 3, generator=gen) * 0.1
            out[f"{conv}.conv_temporal.bias"] = torch.randn(c, generator=gen) * 0.1
        else:
            r = c // 2 if rank > c else rank
            out[f"{conv}.conv_temporal.down.weight"] = torch.randn(r, c, 3, generator=gen) * 0.1
            out[f"{conv}.conv_temporal.up.weight"] = torch.randn(c, r, 3, generator=gen) * 0.1
    return out


def tuneavideo_checkpoint() -> dict:
    return add_temporal_attention(unet_2d(), "attn_temp", "norm_temp")


def fatezero_checkpoint(rank=None) -> dict:
    return add_temporal_convs(add_temporal_attention(unet_2d(), "attn_temporal", "norm_temporal"), rank)


CHECKPOINTS = {
    "tuneavideo": (tuneavideo_checkpoint, "tuneavideo", 0, None),
    "fatezero-full": (fatezero_checkpoint, "fatezero", 52, "full"),
    "fatezero-lora": (lambda: fatezero_checkpoint(LORA_RANK), "fatezero", 52, "lora"),
}


def save(sd: dict, path) -> None:
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(dict(sd), str(path))


def temporal_key_count(ckpt: TavCheckpoint) -> int:
    """Temporal tensors of a split checkpoint, attention and convs together."""
    return (sum(len(group) for group in ckpt.temporal_attention.values())
            + sum(len(conv.state_dict) for conv in ckpt.temporal_convs.values()))


def split_ok(sd: dict):
    ckpt = split_tav_state_dict(sd, source="test.safetensors")
    check_tav_checkpoint(ckpt, context_dim=CONTEXT)
    return ckpt


# ---------------------------------------------------------------------------------------------------
# Topology and path mapping
# ---------------------------------------------------------------------------------------------------

def test_key_shapes_are_those_of_sd15():
    shapes = sd1_unet_key_shapes()
    assert len(shapes) == 686
    for key, shape in SD15_SHAPES.items():
        assert shapes[key] == shape, key
    assert not [k for k in shapes if k.startswith(("down_blocks.0.resnets", "mid_block")) and "conv_shortcut" in k]
    assert len([k for k in shapes if "up_blocks" in k and k.endswith("conv_shortcut.weight")]) == 12


def test_block_and_conv_lists_match_the_topology():
    sd = unet_2d()
    assert sorted(sd1_transformer_blocks()) == sorted(blocks_of(sd))
    assert sorted(sd1_inflated_convs()) == sorted(k3_convs_of(sd))
    assert len(sd1_transformer_blocks()) == 16 and len(sd1_inflated_convs()) == 52


@pytest.mark.parametrize("owner, name, what", [
    ("up_blocks.0.attentions.0.transformer_blocks.0", "attn_temporal.to_q.weight", "attention"),
    ("down_blocks.3.attentions.0.transformer_blocks.0", "attn_temporal.to_q.weight", "attention"),
    ("down_blocks.0.attentions.0.transformer_blocks.1", "attn_temporal.to_q.weight", "attention"),
    ("down_blocks.3.downsamplers.0.conv", "conv_temporal.weight", "convs"),
    ("up_blocks.3.upsamplers.0.conv", "conv_temporal.weight", "convs"),
    ("down_blocks.1.resnets.0.conv_shortcut", "conv_temporal.weight", "convs"),
    ("mid_block.resnets.2.conv1", "conv_temporal.weight", "convs"),
])
def test_temporal_owners_outside_sd1_are_refused(owner, name, what):
    sd = fatezero_checkpoint()
    sd[f"{owner}.{name}"] = torch.zeros(MODEL_CHANNELS, MODEL_CHANNELS)
    with pytest.raises(CheckpointError, match=rf"temporal {what} at paths that are not in a Stable Diffusion 1\.x UNet: {owner}"):
        split_tav_state_dict(sd)


# ---------------------------------------------------------------------------------------------------
# Loading and splitting, both layouts and both file formats
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_checkpoint_maps_fully(tmp_path, name, suffix):
    make, layout, n_convs, form = CHECKPOINTS[name]
    original = make()
    path = tmp_path / f"unet{suffix}"
    save(original, path)

    loaded = load_state_dict_file(path)
    assert loaded.keys() == original.keys()
    ckpt = split_tav_state_dict(loaded, source=str(path))
    check_tav_checkpoint(ckpt, context_dim=CONTEXT)

    assert ckpt.layout == layout
    assert len(ckpt.unet_2d) + temporal_key_count(ckpt) == len(original)
    assert ckpt.unet_2d.keys() == sd1_unet_key_shapes(MODEL_CHANNELS, CONTEXT).keys()
    assert sorted(ckpt.temporal_attention) == sorted(sd1_transformer_blocks())
    for block, group in ckpt.temporal_attention.items():
        assert set(group) == ATTENTION_NAMES
        attn = "attn_temp" if layout == "tuneavideo" else "attn_temporal"
        assert torch.equal(group["attn_temporal.to_q.weight"], original[f"{block}.{attn}.to_q.weight"])
    assert len(ckpt.temporal_convs) == n_convs
    assert {c.form for c in ckpt.temporal_convs.values()} == ({form} if form else set())

    targets = temporal_targets(ckpt)
    assert sum(len(t.state_dict) for t in targets) == temporal_key_count(ckpt)
    assert [t.owner for t in targets if t.kind == "attention"] == sd1_transformer_blocks()
    assert [t.owner for t in targets if t.kind == "conv"] == (sd1_inflated_convs() if n_convs else [])


def test_lora_rank_is_read_per_conv():
    ckpt = split_ok(fatezero_checkpoint(rank=LORA_RANK))
    assert ckpt.temporal_convs["conv_in"].rank == LORA_RANK
    assert ckpt.temporal_convs["conv_out"].rank == 2          # 4 channels < rank 16: official C // 2
    assert {c.rank for k, c in ckpt.temporal_convs.items() if k != "conv_out"} == {LORA_RANK}


@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_temporal_weights_load_strictly_into_the_modules(name):
    make, *_ = CHECKPOINTS[name]
    ckpt = split_ok(make())
    frames = 3
    for target in temporal_targets(ckpt):
        module = temporal_module_from_state_dict(target.kind, target.state_dict, heads=HEADS)
        assert module.state_dict().keys() == target.state_dict.keys()
        if target.kind == "attention":
            assert isinstance(module, TemporalAttention)
            c = target.state_dict["norm_temporal.weight"].shape[0]
            x = torch.randn(2 * frames, 4, c)
        else:
            assert isinstance(module, TemporalConv)
            c = module.channels
            x = torch.randn(2 * frames, c, 2, 2)
        assert module(x, frames).shape == x.shape
        # also through plain load_state_dict on a fresh module of the right size
        if target.kind == "attention":
            TemporalAttention(c, HEADS, c // HEADS).load_state_dict(target.state_dict, strict=True)
        else:
            TemporalConv(c, module.rank).load_state_dict(target.state_dict, strict=True)


def test_plain_sd1_unet_has_no_temporal_parts():
    sd = unet_2d()
    ckpt = split_ok(sd)
    assert ckpt.layout == "plain"
    assert ckpt.unet_2d.keys() == sd.keys()
    assert temporal_targets(ckpt) == []


def test_unet_prefix_is_accepted():
    sd = {f"unet.{k}": v for k, v in tuneavideo_checkpoint().items()}
    ckpt = split_ok(sd)
    assert ckpt.layout == "tuneavideo" and "conv_in.weight" in ckpt.unet_2d


def test_diffusers_folders_and_nested_state_dicts(tmp_path):
    sd = fatezero_checkpoint()
    (tmp_path / "pipe" / "unet").mkdir(parents=True)
    save(sd, tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors")
    assert load_state_dict_file(tmp_path / "pipe").keys() == sd.keys()
    assert load_state_dict_file(tmp_path / "pipe" / "unet").keys() == sd.keys()
    (tmp_path / "binpipe" / "unet").mkdir(parents=True)
    torch.save({"state_dict": sd, "global_step": 200}, str(tmp_path / "binpipe" / "unet" / "diffusion_pytorch_model.bin"))
    assert load_state_dict_file(tmp_path / "binpipe").keys() == sd.keys()
    assert load_tav_checkpoint(tmp_path / "pipe", context_dim=CONTEXT).layout == "fatezero"


# ---------------------------------------------------------------------------------------------------
# Bad checkpoints
# ---------------------------------------------------------------------------------------------------

def test_unexpected_keys_are_named():
    sd = tuneavideo_checkpoint()
    sd["foo.bar"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"foo\.bar"):
        split_tav_state_dict(sd)


def test_full_ldm_checkpoint_gets_a_hint():
    sd = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="Load Checkpoint"):
        split_tav_state_dict(sd)


def test_unexpected_key_inside_the_unet_is_named():
    sd = unet_2d()
    sd["down_blocks.0.resnets.0.extra.weight"] = torch.zeros(1)
    ckpt = split_tav_state_dict(sd)
    with pytest.raises(CheckpointError, match=r"unexpected keys?: down_blocks\.0\.resnets\.0\.extra\.weight"):
        check_sd1_unet(ckpt.unet_2d, context_dim=CONTEXT)


@pytest.mark.parametrize("attn", ["attn_temp", "attn_temporal"])
def test_missing_temporal_piece_is_named_as_written(attn):
    sd = tuneavideo_checkpoint() if attn == "attn_temp" else fatezero_checkpoint()
    block = "up_blocks.2.attentions.1.transformer_blocks.0"
    del sd[f"{block}.{attn}.to_q.weight"]
    with pytest.raises(CheckpointError, match=rf"missing {block}\.{attn}\.to_q\.weight"):
        split_tav_state_dict(sd)


def test_block_without_temporal_attention_is_named():
    sd = tuneavideo_checkpoint()
    block = "mid_block.attentions.0.transformer_blocks.0"
    for key in [k for k in sd if k.startswith(f"{block}.attn_temp") or k.startswith(f"{block}.norm_temp")]:
        del sd[key]
    with pytest.raises(CheckpointError, match=rf"lacks temporal attention for {block} \(1 of 16"):
        split_tav_state_dict(sd)


def test_conv_without_temporal_part_is_named():
    sd = fatezero_checkpoint()
    del sd["up_blocks.1.upsamplers.0.conv.conv_temporal.weight"]
    del sd["up_blocks.1.upsamplers.0.conv.conv_temporal.bias"]
    with pytest.raises(CheckpointError, match=r"lacks temporal convs for up_blocks\.1\.upsamplers\.0\.conv \(1 of 52"):
        split_tav_state_dict(sd)


def test_mixed_conv_forms_in_one_conv_are_named():
    sd = fatezero_checkpoint(rank=LORA_RANK)
    sd["conv_in.conv_temporal.bias"] = torch.zeros(MODEL_CHANNELS)
    with pytest.raises(CheckpointError, match=r"conv_in\.conv_temporal\.(down|up)\.weight"):
        split_tav_state_dict(sd)


def test_extra_temporal_key_is_named():
    sd = fatezero_checkpoint()
    block = "down_blocks.0.attentions.0.transformer_blocks.0"
    sd[f"{block}.attn_temporal.to_q.bias"] = torch.zeros(MODEL_CHANNELS)
    with pytest.raises(CheckpointError, match=rf"unexpected {block}\.attn_temporal\.to_q\.bias"):
        split_tav_state_dict(sd)


def test_mixed_layouts_are_refused():
    sd = tuneavideo_checkpoint()
    sd.update({k: v for k, v in fatezero_checkpoint().items() if "conv_temporal" in k})
    with pytest.raises(CheckpointError, match="mixes"):
        split_tav_state_dict(sd)


def test_temporal_shapes_must_fit_the_unet():
    sd = fatezero_checkpoint()
    block = "down_blocks.1.attentions.0.transformer_blocks.0"
    sd[f"{block}.attn_temporal.to_q.weight"] = torch.zeros(MODEL_CHANNELS, MODEL_CHANNELS)
    ckpt = split_tav_state_dict(sd)
    with pytest.raises(CheckpointError, match=rf"{block}\.attn_temporal\.to_q\.weight \[32, 32\] instead of \[64, 64\]"):
        check_temporal_shapes(ckpt)


def test_conv_in_with_8_input_channels_is_not_sd1():
    sd = unet_2d()
    sd["conv_in.weight"] = torch.zeros(MODEL_CHANNELS, 8, 3, 3)
    with pytest.raises(CheckpointError, match=r"not a Stable Diffusion 1\.x UNet.*conv_in\.weight \[32, 8, 3, 3\]"):
        check_sd1_unet(sd, context_dim=CONTEXT, source="inpaint.safetensors")


def test_missing_cross_attention_is_not_sd1():
    sd = unet_2d()
    block = "down_blocks.2.attentions.1.transformer_blocks.0"
    for key in [k for k in sd if k.startswith(f"{block}.attn2.")]:
        del sd[key]
    with pytest.raises(CheckpointError, match=rf"not a Stable Diffusion 1\.x UNet.*missing keys: {block}\.attn2\."):
        check_sd1_unet(sd, context_dim=CONTEXT)


def test_other_context_dim_is_reported():
    with pytest.raises(CheckpointError, match="context dim 16 instead of 768"):
        check_sd1_unet(unet_2d())                                          # default: 768, SD1.x


def test_missing_conv_in_is_not_sd1():
    sd = unet_2d()
    del sd["conv_in.weight"]
    with pytest.raises(CheckpointError, match="not a Stable Diffusion 1.x UNet"):
        check_sd1_unet(sd, context_dim=CONTEXT)


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_truncated_file_is_reported_as_corrupt(tmp_path, suffix):
    path = tmp_path / f"broken{suffix}"
    save(tuneavideo_checkpoint(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"broken\{suffix} looks corrupt"):
        load_state_dict_file(path)


def test_random_bytes_are_not_a_checkpoint(tmp_path):
    path = tmp_path / "noise.ckpt"
    path.write_bytes(bytes(range(256)) * 10)
    with pytest.raises(CheckpointError, match="looks corrupt or is not a checkpoint"):
        load_state_dict_file(path)


_UNPICKLED = []


def _record_unpickling():
    _UNPICKLED.append(True)
    return {}


class _Payload:
    def __reduce__(self):
        return (_record_unpickling, ())


def test_arbitrary_objects_are_never_unpickled(tmp_path):
    path = tmp_path / "payload.pt"
    torch.save({"conv_in.weight": torch.zeros(1), "extra": _Payload()}, str(path))
    with pytest.raises(CheckpointError, match=r"payload\.pt holds Python objects besides tensors"):
        load_state_dict_file(path)
    assert _UNPICKLED == []


def test_missing_paths_and_other_files_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_state_dict_file(tmp_path / "nope.safetensors")
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(CheckpointError, match="without UNet weights"):
        load_state_dict_file(tmp_path / "empty_folder")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="unsupported extension"):
        load_state_dict_file(tmp_path / "notes.txt")


def test_non_tensor_entries_are_refused(tmp_path):
    path = tmp_path / "odd.bin"
    torch.save({"conv_in.weight": torch.zeros(1), "epoch": 3}, str(path))
    with pytest.raises(CheckpointError, match="epoch"):
        load_state_dict_file(path)


# ------------------------------------------------------------------------------------------------
# Writing a checkpoint: a new file or nothing
# ------------------------------------------------------------------------------------------------


def small_state() -> dict:
    g = torch.Generator().manual_seed(4)
    return {"a.weight": torch.randn(3, 5, generator=g), "b.bias": torch.randn(7, generator=g)}


def read_back(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_a_checkpoint_is_written_with_its_metadata_and_nothing_else(tmp_path):
    state = small_state()
    path = tmp_path / "sub" / "tuned.safetensors"
    write_checkpoint(path, state, {"tuned_steps": 200, "fatezero_layout": "fatezero"})
    tensors, metadata = read_back(path)
    assert tensors.keys() == state.keys() and all(torch.equal(tensors[k], state[k]) for k in state)
    assert metadata == {"tuned_steps": "200", "fatezero_layout": "fatezero"}
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["sub", "tuned.safetensors"]  # no temporary file left


@pytest.mark.parametrize("hard_links", [True, False], ids=["hard links", "no hard links"])
def test_an_existing_file_is_never_overwritten(tmp_path, monkeypatch, hard_links):
    """A file that appeared at the name while the data was being written stays as it is, also on
    a file system without hard links (FAT/exFAT: ``os.link`` is not permitted there)."""
    if not hard_links:
        def no_links(src, dst, *args, **kwargs):
            raise PermissionError(1, "Operation not permitted", src)
        monkeypatch.setattr("os.link", no_links)
    path = tmp_path / "tuned.safetensors"
    path.write_bytes(b"someone else's file")
    with pytest.raises(FileExistsError):
        write_checkpoint(path, small_state(), {})
    assert path.read_bytes() == b"someone else's file"
    assert [p.name for p in tmp_path.iterdir()] == ["tuned.safetensors"]
    if not hard_links:  # and a new name is still written in full
        write_checkpoint(tmp_path / "new.safetensors", small_state(), {"k": 1})
        tensors, metadata = read_back(tmp_path / "new.safetensors")
        assert torch.equal(tensors["b.bias"], small_state()["b.bias"]) and metadata == {"k": "1"}


def test_a_failed_write_leaves_no_file(tmp_path):
    path = tmp_path / "tuned.safetensors"
    with pytest.raises(ValueError, match="non contiguous"):  # safetensors refuses it mid-way
        write_checkpoint(path, {"a": torch.randn(4, 6).t()}, {})
    (tmp_path / "blocked").write_bytes(b"a file where the folder should be")
    with pytest.raises(NotADirectoryError):  # not FileExistsError: the checkpoint's name is free
        write_checkpoint(tmp_path / "blocked" / "tuned.safetensors", small_state(), {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocked"]
