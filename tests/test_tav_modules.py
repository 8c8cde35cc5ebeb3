"""Tune-A-Video temporal layers on a frame-major batch (``fatezero_core.tav.modules``): the
temporal attention of FateZero's ``SpatioTemporalTransformerBlock`` and the ``conv_temporal`` of its
``PseudoConv3d`` (``video_diffusion/models/attention.py``, ``models/resnet.py``,
github.com/ChenyangQiQi/FateZero at 9b6cb7b), checked against naive references."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fatezero_core.tav import modules as tav_modules
from fatezero_core.tav.modules import (
    FramewiseTemporalConv,
    TemporalAttention,
    TemporalConv,
    effective_lora_rank,
    temporal_module_from_state_dict,
)

FRAMES, CHUNKS, TOKENS, DIM, HEADS = 5, 2, 6, 16, 4


def randomise_(module: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return module


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randn(CHUNKS * FRAMES, TOKENS, DIM, generator=torch.Generator().manual_seed(seed))


def naive_temporal_attention(block: TemporalAttention, x: torch.Tensor, frames: int) -> torch.Tensor:
    """Softmax maps materialised, one chunk and one token at a time."""
    attn, out = block.attn_temporal, x.clone()
    heads = attn.heads
    for c in range(x.shape[0] // frames):
        for d in range(x.shape[1]):
            seq = x[c * frames:(c + 1) * frames, d]                          # (F, C)
            h = F.layer_norm(seq, (DIM,), block.norm_temporal.weight, block.norm_temporal.bias)
            q, k, v = (p(h).view(frames, heads, -1).transpose(0, 1) for p in (attn.to_q, attn.to_k, attn.to_v))
            w = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)
            mixed = (w @ v).transpose(0, 1).reshape(frames, -1)
            out[c * frames:(c + 1) * frames, d] = seq + attn.to_out[0](mixed)
    return out


def test_state_dict_names_match_checkpoint_names():
    block = TemporalAttention(DIM, HEADS, DIM // HEADS)
    assert set(block.state_dict()) == {
        "norm_temporal.weight", "norm_temporal.bias",
        "attn_temporal.to_q.weight", "attn_temporal.to_k.weight", "attn_temporal.to_v.weight",
        "attn_temporal.to_out.0.weight", "attn_temporal.to_out.0.bias",
    }
    assert set(TemporalConv(8).state_dict()) == {"conv_temporal.weight", "conv_temporal.bias"}
    assert set(TemporalConv(8, lora_rank=2).state_dict()) == {"conv_temporal.down.weight", "conv_temporal.up.weight"}


def test_fresh_temporal_attention_is_exact_noop():
    block = TemporalAttention(DIM, HEADS, DIM // HEADS)
    assert torch.count_nonzero(block.attn_temporal.to_out[0].bias) == 0
    x = tokens()
    assert torch.equal(block(x, FRAMES), x)


def test_zero_output_projection_is_exact_noop_whatever_the_other_weights():
    block = randomise_(TemporalAttention(DIM, HEADS, DIM // HEADS))
    with torch.no_grad():
        block.attn_temporal.to_out[0].weight.zero_()
        block.attn_temporal.to_out[0].bias.zero_()
    x = tokens()
    assert torch.equal(block(x, FRAMES), x)


def test_temporal_attention_matches_naive_reference():
    block = randomise_(TemporalAttention(DIM, HEADS, DIM // HEADS))
    x = tokens()
    torch.testing.assert_close(block(x, FRAMES), naive_temporal_attention(block, x, FRAMES), atol=1e-5, rtol=1e-5)


def test_temporal_attention_couples_frames_within_a_chunk_only():
    block = randomise_(TemporalAttention(DIM, HEADS, DIM // HEADS))
    x = tokens()
    y = x.clone()
    y[0] = -2 * y[0]                                             # chunk 0, frame 0 (not a shift,
                                                                 # which the LayerNorm removes)
    out_x, out_y = block(x, FRAMES), block(y, FRAMES)
    assert not torch.allclose(out_x[3], out_y[3])                # chunk 0, frame 3 sees frame 0
    assert torch.equal(out_x[FRAMES:], out_y[FRAMES:])           # chunk 1 is untouched


def test_without_temporal_layer_frames_stay_independent():
    block = TemporalAttention(DIM, HEADS, DIM // HEADS)          # identity at initialisation
    x = tokens()
    y = x.clone()
    y[0] = -2 * y[0]
    assert torch.equal(block(x, FRAMES)[3], block(y, FRAMES)[3])


def test_temporal_attention_splits_huge_batches_without_changing_results(monkeypatch):
    block = randomise_(TemporalAttention(DIM, HEADS, DIM // HEADS))
    x = tokens()
    whole = block(x, FRAMES)
    monkeypatch.setattr(tav_modules, "_MAX_SEQUENCES_PER_CALL", 5)
    torch.testing.assert_close(block(x, FRAMES), whole, atol=1e-6, rtol=0)


def test_temporal_attention_follows_input_dtype():
    block = randomise_(TemporalAttention(DIM, HEADS, DIM // HEADS))
    x = tokens().double()
    out = block(x, FRAMES)
    assert out.dtype == torch.float64
    assert block.norm_temporal.weight.dtype == torch.float32


# ---------------------------------------------------------------------------------------------------
# Temporal convs
# ---------------------------------------------------------------------------------------------------

def frames_2d(channels: int = 6, seed: int = 2) -> torch.Tensor:
    return torch.randn(CHUNKS * FRAMES, channels, 4, 3, generator=torch.Generator().manual_seed(seed))


def naive_temporal_conv(weight, bias, x, frames):
    """y[f] = b + W0 x[f-1] + W1 x[f] + W2 x[f+1] at each pixel, zero outside the clip."""
    clips = x.view(-1, frames, *x.shape[1:])                     # (B, F, C, H, W)
    padded = F.pad(clips, (0, 0, 0, 0, 0, 0, 1, 1))
    out = sum(torch.einsum("oc,bfchw->bfohw", weight[:, :, t], padded[:, t:t + frames]) for t in range(3))
    if bias is not None:
        out = out + bias.view(1, 1, -1, 1, 1)
    return out.reshape(x.shape[0], weight.shape[0], *x.shape[2:])


def test_full_form_is_conv_without_residual():
    layer = randomise_(TemporalConv(6))
    x = frames_2d()
    expected = naive_temporal_conv(layer.conv_temporal.weight, layer.conv_temporal.bias, x, FRAMES)
    torch.testing.assert_close(layer(x, FRAMES), expected, atol=1e-5, rtol=1e-5)


def test_lora_form_is_residual_low_rank():
    layer = randomise_(TemporalConv(6, lora_rank=2))
    x = frames_2d()
    down = naive_temporal_conv(layer.conv_temporal.down.weight, None, x, FRAMES)
    expected = x + naive_temporal_conv(layer.conv_temporal.up.weight, None, down, FRAMES)
    torch.testing.assert_close(layer(x, FRAMES), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rank", [None, 3])
def test_identity_temporal_conv_after_conv2d_equals_conv2d(rank):
    conv2d = randomise_(nn.Conv2d(3, 6, 3, padding=1))
    layer = TemporalConv(6, lora_rank=rank)
    x = frames_2d(3)
    torch.testing.assert_close(layer(conv2d(x), FRAMES), conv2d(x), atol=1e-6, rtol=0)
    if rank is not None:
        assert torch.equal(layer(conv2d(x), FRAMES), conv2d(x))


@pytest.mark.parametrize("rank", [None, 3])
def test_random_temporal_conv_couples_neighbouring_frames_within_a_chunk(rank):
    layer = randomise_(TemporalConv(6, lora_rank=rank))
    x = frames_2d()
    y = x.clone()
    y[2] += 1.0                                                  # chunk 0, frame 2
    out_x, out_y = layer(x, FRAMES), layer(y, FRAMES)
    assert not torch.allclose(out_x[1], out_y[1])
    assert not torch.allclose(out_x[3], out_y[3])
    assert torch.equal(out_x[FRAMES:], out_y[FRAMES:])


def test_lora_rank_above_channels_falls_back_to_half():
    assert effective_lora_rank(4, 160) == 2
    assert effective_lora_rank(320, 160) == 160
    assert TemporalConv(4, lora_rank=16).conv_temporal.down.weight.shape == (2, 4, 3)


def test_framewise_wrapper_keeps_the_2d_keys_and_asks_the_host_for_frames():
    conv2d = randomise_(nn.Conv2d(3, 6, 3, padding=1))
    temporal = randomise_(TemporalConv(6))
    asked = []

    def frames(batch):
        asked.append(batch)
        return batch // CHUNKS

    seq = nn.Sequential(conv2d, FramewiseTemporalConv(temporal, frames))
    assert {"0.weight", "0.bias"} <= set(seq.state_dict())
    x = frames_2d(3)
    torch.testing.assert_close(seq(x), temporal(conv2d(x), FRAMES), atol=0, rtol=0)
    assert asked == [CHUNKS * FRAMES]


def test_framewise_wrapper_passes_through_when_there_are_no_frames():
    conv2d = randomise_(nn.Conv2d(3, 6, 3, padding=1))
    seq = nn.Sequential(conv2d, FramewiseTemporalConv(randomise_(TemporalConv(6)), lambda batch: None))
    x = frames_2d(3)
    assert torch.equal(seq(x), conv2d(x))


def test_modules_rebuild_from_their_state_dicts():
    block = randomise_(TemporalAttention(DIM, HEADS, DIM // HEADS))
    rebuilt = temporal_module_from_state_dict("attention", block.state_dict(), heads=HEADS)
    x = tokens()
    assert torch.equal(rebuilt(x, FRAMES), block(x, FRAMES))
    for rank in (None, 2):
        layer = randomise_(TemporalConv(6, lora_rank=rank))
        rebuilt = temporal_module_from_state_dict("conv", layer.state_dict())
        assert rebuilt.form == layer.form and rebuilt.rank == layer.rank
        assert torch.equal(rebuilt(frames_2d(), FRAMES), layer(frames_2d(), FRAMES))
