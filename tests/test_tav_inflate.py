"""Inserting temporal layers into an ldm-style UNet without renaming its 2D weights
(``fatezero_core.tav.inflate``). The UNet here is a small stand-in with the
same container layout as ComfyUI's openaimodel: TimestepEmbedSequential blocks, ResBlock
in_layers/out_layers, Downsample.op, Upsample.conv, SpatialTransformer.transformer_blocks, out."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fatezero_core.errors import CheckpointError, FateZeroError
from fatezero_core.frames import FrameContext, frames_per_chunk
from fatezero_core.module_paths import tree_resolver
from fatezero_core.tav.inflate import block_list_patch, conv_patch
from fatezero_core.tav.modules import FramewiseTemporalConv, TemporalAttention, TemporalConv

C, FRAMES = 8, 4


class TimestepEmbedSequential(nn.Sequential):
    pass


class ResBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(2, C), nn.SiLU(), nn.Conv2d(C, C, 3, padding=1))
        self.out_layers = nn.Sequential(nn.GroupNorm(2, C), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(C, C, 3, padding=1))

    def forward(self, x):
        return x + self.out_layers(self.in_layers(x))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(C)
        self.proj = nn.Linear(C, C)

    def forward(self, x, context=None, transformer_options={}):
        return x + self.proj(self.norm(x))


class SpatialTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.transformer_blocks = nn.ModuleList([Block()])

    def forward(self, x):
        b, c, h, w = x.shape
        t = x.movedim(1, 3).flatten(1, 2)
        for block in self.transformer_blocks:
            t = block(t, context=None, transformer_options={})
        return t.reshape(b, h, w, c).movedim(3, 1)


class Downsample(nn.Module):
    def __init__(self):
        super().__init__()
        self.op = nn.Conv2d(C, C, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MiniUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_blocks = nn.ModuleList([
            TimestepEmbedSequential(nn.Conv2d(4, C, 3, padding=1)),
            TimestepEmbedSequential(ResBlock(), SpatialTransformer()),
            TimestepEmbedSequential(Downsample()),
        ])
        self.output_blocks = nn.ModuleList([TimestepEmbedSequential(ResBlock(), SpatialTransformer(), Upsample())])
        self.out = nn.Sequential(nn.GroupNorm(2, C), nn.SiLU(), nn.Conv2d(C, 4, 3, padding=1))

    def forward(self, x):
        for block in [*self.input_blocks, *self.output_blocks]:
            for layer in block:
                x = layer(x)
        return self.out(x)


CONVS = ["input_blocks.0.0", "input_blocks.1.0.in_layers.2", "input_blocks.1.0.out_layers.3",
         "input_blocks.2.0.op", "output_blocks.0.0.in_layers.2", "output_blocks.0.0.out_layers.3",
         "output_blocks.0.2.conv", "out.2"]
BLOCKS = ["input_blocks.1.1.transformer_blocks.0", "output_blocks.0.1.transformer_blocks.0"]


def set_attr(root: nn.Module, path: str, value: nn.Module) -> nn.Module:
    """What ComfyUI's object patches do (``comfy.utils.set_attr``)."""
    *parents, name = path.split(".")
    owner = root
    for part in parents:
        owner = getattr(owner, part)
    previous = getattr(owner, name)
    setattr(owner, name, value)
    return previous


class Attention(nn.Module):
    """Stand-in for the host's block adapter: the whole batch is one clip."""

    def __init__(self, temporal):
        super().__init__()
        self.temporal = temporal

    def forward(self, x, context=None, transformer_options={}):
        return self.temporal(x, x.shape[0])


def randomise_(module: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module


def out_channels(unet, conv_path):
    return unet.get_submodule(conv_path).out_channels


def inflate(unet: MiniUNet, context: FrameContext, random: bool = False):
    """Install every patch; returns the patches and the originals they replaced."""
    patches = {}
    for i, conv in enumerate(CONVS):
        temporal = TemporalConv(out_channels(unet, conv), lora_rank=2)
        if random:
            randomise_(temporal, i)
        path, container = conv_patch(tree_resolver(unet), conv, FramewiseTemporalConv(temporal, context))
        assert path not in patches
        patches[path] = container
    for i, block in enumerate(BLOCKS):
        temporal = TemporalAttention(C, 2, C // 2)
        if random:
            randomise_(temporal, 100 + i)
        path, container = block_list_patch(tree_resolver(unet), block, Attention(temporal))
        patches[path] = container
    originals = {path: set_attr(unet, path, container) for path, container in patches.items()}
    return patches, originals


@pytest.fixture
def unet():
    return randomise_(MiniUNet(), 7).eval()


def frames_input():
    return torch.randn(FRAMES, 4, 8, 8, generator=torch.Generator().manual_seed(3))


def test_patch_paths_are_the_nearest_sequential():
    unet, context = MiniUNet(), FrameContext()
    extra = FramewiseTemporalConv(TemporalConv(C), context)
    assert conv_patch(tree_resolver(unet), "input_blocks.1.0.in_layers.2", extra)[0] == "input_blocks.1.0.in_layers"
    assert conv_patch(tree_resolver(unet), "input_blocks.0.0", extra)[0] == "input_blocks.0"
    assert conv_patch(tree_resolver(unet), "input_blocks.2.0.op", extra)[0] == "input_blocks.2"
    assert conv_patch(tree_resolver(unet), "output_blocks.0.2.conv", extra)[0] == "output_blocks.0"
    assert conv_patch(tree_resolver(unet), "out.2", extra)[0] == "out"
    path, blocks = block_list_patch(tree_resolver(unet), BLOCKS[0], extra)
    assert path == "input_blocks.1.1.transformer_blocks" and isinstance(blocks, nn.ModuleList)


def test_replacements_keep_type_and_module_objects():
    unet, context = MiniUNet(), FrameContext()
    extra = FramewiseTemporalConv(TemporalConv(C), context)
    path, seq = conv_patch(tree_resolver(unet), "output_blocks.0.2.conv", extra)
    original = unet.get_submodule(path)
    assert type(seq) is TimestepEmbedSequential
    assert all(a is b for a, b in zip(seq, original)) and len(seq) == len(original) + 1
    assert seq[-1] is extra


def test_2d_keys_and_tensors_are_unchanged(unet):
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    inflate(unet, FrameContext())
    after = unet.state_dict()
    for key, value in before.items():
        assert key in after, key
        assert torch.equal(after[key], value)
    added = set(after) - set(before)
    assert added and all(".temporal." in k for k in added)


def test_identity_temporal_layers_are_an_exact_noop(unet):
    x = frames_input()
    with torch.no_grad():
        plain = unet(x)
        inflate(unet, FrameContext())
        inflated = unet(x)
    assert torch.equal(plain, inflated)


def test_random_temporal_layers_couple_frames_and_unpatching_restores(unet):
    x = frames_input()
    y = x.clone()
    y[0] += 1.0
    with torch.no_grad():
        plain_x, plain_y = unet(x), unet(y)
        assert torch.allclose(plain_x[1:], plain_y[1:], atol=1e-6)  # frames independent
        _, originals = inflate(unet, FrameContext(), random=True)
        tav_x, tav_y = unet(x), unet(y)
        assert (tav_x[1:] - tav_y[1:]).abs().max() > 1e-3  # frame 0 now reaches the others
        for path, original in originals.items():
            set_attr(unet, path, original)
        assert torch.equal(unet(x), plain_x)


def test_frame_context_splits_the_batch_into_videos(unet):
    context = FrameContext()
    inflate(unet, context, random=True)
    x = frames_input()
    with torch.no_grad():
        conv_only = unet.input_blocks[0]
        one = conv_only(x)
        with context.running(2):
            two = conv_only(torch.cat([x, x]))
    assert torch.allclose(two[:FRAMES], one, atol=1e-6) and torch.allclose(two[FRAMES:], one, atol=1e-6)


def test_frame_context_scoping_and_copies():
    context = FrameContext()
    assert context.frames(8) == 8 and context.chunks is None
    with context.running(2):
        assert context(8) == 4
        with context.running(4):
            assert context.frames(8) == 2
        assert context.chunks == 2
    assert context.chunks is None
    assert copy.deepcopy(context) is context
    assert copy.deepcopy({"c": context})["c"] is context


def test_batch_that_is_not_whole_videos_is_refused():
    assert frames_per_chunk(12, 3) == 4
    with pytest.raises(FateZeroError, match="cannot hold 2 whole clips"):
        frames_per_chunk(7, 2)
    with FrameContext().running(2) as context, pytest.raises(FateZeroError):
        context.frames(5)


def test_conv_that_is_not_last_is_refused():
    unet = MiniUNet()
    extra = nn.Identity()
    with pytest.raises(CheckpointError, match="not the last layer"):
        conv_patch(tree_resolver(unet), "out.1", extra)
    with pytest.raises(CheckpointError, match="Downsample/Upsample"):
        conv_patch(tree_resolver(unet), "input_blocks.1.0.skip", extra)
    with pytest.raises(CheckpointError, match="no conv owner"):
        conv_patch(tree_resolver(unet), "middle_block.0.in_layers.2", extra)


def test_block_that_is_not_last_is_refused():
    unet = MiniUNet()
    unet.input_blocks[1][1].transformer_blocks.append(Block())
    with pytest.raises(CheckpointError, match="not the last block"):
        block_list_patch(tree_resolver(unet), BLOCKS[0], nn.Identity())


@pytest.mark.parametrize("rank", [None, 2])
def test_temporal_conv_output_keeps_the_input_memory_layout(rank):
    """Later kernels pick their algorithm from the strides: the output must look like the input,
    also at 1x1 where a permuted view passes for channels-last."""
    conv = TemporalConv(C, lora_rank=rank)
    for x in (torch.randn(FRAMES, C, 3, 5), torch.randn(FRAMES, C, 3, 5).to(memory_format=torch.channels_last),
              torch.randn(FRAMES, C, 1, 1)):
        out = conv(x, FRAMES)
        assert out.stride() == x.stride()
        assert torch.equal(out, x)  # identity at initialisation


def test_temporal_attention_output_keeps_the_input_memory_layout():
    block = TemporalAttention(C, 2, C // 2)
    for x in (torch.randn(FRAMES, 6, C), torch.randn(FRAMES, 1, C)):
        out = block(x, FRAMES)
        assert out.stride() == x.stride() and torch.equal(out, x)
