"""A tiny SD1.x-shaped denoiser and text encoder for end-to-end tests of the FateZero controller.

The denoiser is a small UNet on a ``4 x 16 x 16`` latent with real spatial transformers at four
resolutions (16x16, 8x8, 4x4, 2x2; channels 32/64/64/64; 2 heads): ResBlocks (GroupNorm, SiLU,
3x3 convs, timestep embedding), stride-2 down convs, a middle block, a nearest-upsampling up path
with skip connections. Each transformer block is ComfyUI's ``BasicTransformerBlock`` as it calls
attention replace patches (ComfyUI 0.3.64, ``comfy/ldm/modules/attention.py``:
``BasicTransformerBlock.forward``, ``patches_replace["attn1"/"attn2"]``): ``n = norm1(x)``,
``q, k, v = to_q(n), to_k(n), to_v(n)`` (projected, heads merged), ``controller.attn1(q, k, v,
call)``, ``to_out``, residual; then ``norm2`` and cross-attention with ``k, v = to_k(context),
to_v(context)`` through ``controller.attn2``; then a feed-forward. Without a controller the block
runs plain attention. The batch is frame-major chunks named by ``chunks`` (``[uncond F | cond F]``
while editing), and the context has one row per batch element.

The network predicts v and returns ``eps = sqrt(1 - a) z + sqrt(a) v`` (``a = alpha_bar(t)``, SD1.x
table; the standard v-prediction relation), so eps has unit scale at every noise level and is
close to z at high noise, as a trained denoiser's is (the same random network predicting eps
directly reconstructed a 10-step DDIM inversion with errors of about 8 on a unit-scale latent).

Fixed features make the attention spatially meaningful. Channels ``0 .. RESERVED-1`` of every
transformer's tokens carry no content (``proj_in`` writes nothing there, ``attn1.to_out`` neither):

- channel 0 is a region indicator ``REGION_AMPLITUDE * g``, ``g`` the fraction of each token's
  cell inside ``REGION`` (top-right 1/4 x 1/4 of the frame: latent rows 0-3, columns 12-15; at the
  4x4 mask level exactly the cell (0, 3));
- channels ``1 .. POS_CHANNELS`` are 2D Fourier position features (:func:`position_features`).

Cross-attention ("cat" looks at the region): every cross-attention has a unit direction ``a_h``
per head; ``to_q`` maps channel 0 onto it and ``to_k`` maps text dimension 0 onto it, both with
gain ``CROSS_GAIN``, and the random parts of ``to_q``/``to_k`` are projected off ``a_h``. The score
is then the random score plus ``CROSS_GAIN**2 * n_0 * e_0 / sqrt(d)`` exactly (``n_0``: normalised
region channel, ``e_0``: text dimension 0). In the text encoder only the animal words ("cat",
"dog") have a non-zero dimension 0 (``ANIMAL_AMPLITUDE``). So the source cross-attention of "cat"
(and "dog") peaks at the region at every level; the two words differ in their other dimensions,
so swapping them changes the values read there.

Self-attention (local, sharp, structure-carrying as in SD): the same construction maps the position
channels onto a per-head basis with gain ``SELF_POS_GAIN``, so nearby tokens score higher; the
random content scores are sharpened by ``QK_GAIN`` and the attention output weighted by
``ATTN1_OUT_GAIN``, so the maps matter for the result (what attention fusion acts on).

Weights are initialised explicitly from a seeded generator (fan-in scaled normals, then the
constructions above).

It lives beside ``tiny_models/`` rather than in it: those are ComfyUI's own UNet classes with
seeded random weights, for the host tier, while this one is plain PyTorch, so the CPU tier runs
without ComfyUI, and its attention is built so that an edit's mask and locality have known answers
(a random SD1.5-topology UNet attends nowhere in particular).
"""

from __future__ import annotations

import math
import re
import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from ddim_reference import sd1_alphas_cumprod
from fatezero_core.layers import AttnCall, LayerInfo

LATENT = 16
CHANNELS = (32, 64, 64, 64)
HEADS = 2
CONTEXT_DIM = 32
TOKENS = 77
TIME_DIM = 64
MIN_ST_CHANNELS = 64  # the 32-channel full-resolution level uses per-frame self-attention

BOS, EOS = 49406, 49407
REGION = (0.0, 0.25, 0.75, 1.0)  # rows [0, 0.25), columns [0.75, 1.0) of the frame
REGION_AMPLITUDE = 3.0
ANIMAL_AMPLITUDE = 3.0
CROSS_GAIN = 3.0
QK_GAIN = 2.5  # self-attention: sharper-than-default random (content) scores
POS_FREQS = (1, 2)  # 2D Fourier position features, frequencies in units of pi per frame side
POS_AMPLITUDE = 1.5
SELF_POS_GAIN = 3.0  # self-attention: weight of the position score (locality)
ATTN1_OUT_GAIN = 3.0  # self-attention output weight: the maps shape the result, as in SD
RES_OUT_GAIN = 0.3  # second ResBlock conv: keeps the residual stream from growing
POS_CHANNELS = 4 * len(POS_FREQS)
RESERVED = 1 + POS_CHANNELS  # channel 0: region; 1..POS_CHANNELS: position

# ----------------------------------------------------------------------------- text encoder

WORDS = ("a", "an", "the", "cat", "dog", "is", "sitting", "on", "in", "grass", "garden", "sofa",
         "red", "black", "white", "photo", "of", "and", "with", "jumping", "tiger", ",", ".", "!")
ANIMALS = ("cat", "dog")
_WORD_IDS = {w: 1000 + n for n, w in enumerate(WORDS)}
VOCAB_ROWS = 64  # rows 0, 1: BOS, EOS; 2..: known words; unknown ids by modulo
_SPLIT = re.compile(r"[a-z0-9]+|[^a-z0-9\s]")


def tokenize(text: str) -> list[int]:
    """Word-level stand-in for CLIP BPE: lowercase, punctuation split off, content ids only."""
    ids = []
    for piece in _SPLIT.findall(text.lower()):
        if piece in _WORD_IDS:
            ids.append(_WORD_IDS[piece])
        else:
            ids.append(20000 + zlib.crc32(piece.encode()) % 20000)
    return ids


def token_ids(text: str) -> list[int]:
    """CLIP's 77-slot layout: BOS, content, EOS, EOS padding."""
    ids = tokenize(text)
    if len(ids) > TOKENS - 2:
        raise ValueError(f"prompt too long: {len(ids)} tokens")
    return [BOS, *ids, EOS] + [EOS] * (TOKENS - 2 - len(ids))


def _row(token: int) -> int:
    if token == BOS:
        return 0
    if token == EOS:
        return 1
    if 1000 <= token < 1000 + len(WORDS):
        return 2 + token - 1000
    return 2 + len(WORDS) + token % (VOCAB_ROWS - 2 - len(WORDS))


class TinyTextEncoder(nn.Module):
    """Embedding table plus positional embedding: ``encode(prompt) -> [1, 77, CONTEXT_DIM]``."""

    def __init__(self, seed: int = 1):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        table = torch.randn(VOCAB_ROWS, CONTEXT_DIM, generator=g)
        pos = 0.3 * torch.randn(TOKENS, CONTEXT_DIM, generator=g)
        table[:, 0] = 0.0
        pos[:, 0] = 0.0
        for word in ANIMALS:
            table[_row(_WORD_IDS[word]), 0] = ANIMAL_AMPLITUDE
        self.register_buffer("table", table)
        self.register_buffer("pos", pos)

    def forward(self, ids) -> torch.Tensor:
        rows = torch.tensor([_row(int(t)) for t in ids], dtype=torch.long)
        return (self.table[rows] + self.pos)[None]

    def encode(self, prompt: str) -> torch.Tensor:
        return self(token_ids(prompt))


# ----------------------------------------------------------------------------- denoiser

def _normal_(t: torch.Tensor, g: torch.Generator, std: float) -> None:
    with torch.no_grad():
        t.copy_(torch.randn(t.shape, generator=g) * std)


def _fan_in(w: torch.Tensor) -> int:
    return w[0].numel()


def region_indicator(height: int, width: int) -> torch.Tensor:
    """``[height*width]`` fraction of each token cell inside ``REGION`` (row-major)."""
    r0, r1, c0, c1 = REGION

    def overlap(n, lo, hi):
        edges = torch.arange(n + 1, dtype=torch.float32) / n
        return (torch.minimum(edges[1:], torch.tensor(hi)) - torch.maximum(edges[:-1], torch.tensor(lo))).clamp_min(0) * n

    return (overlap(height, r0, r1)[:, None] * overlap(width, c0, c1)[None, :]).flatten()


def position_features(height: int, width: int) -> torch.Tensor:
    """``[height*width, POS_CHANNELS]``: cos/sin of k*pi*y and k*pi*x at the cell centres.

    The dot product of two tokens' features is ``sum_k cos(k pi dy) + cos(k pi dx)``: largest for
    the same place, falling off within about a quarter of the frame.
    """
    y = (torch.arange(height, dtype=torch.float32) + 0.5) / height
    x = (torch.arange(width, dtype=torch.float32) + 0.5) / width
    yy, xx = torch.meshgrid(y, x, indexing="ij")
    feats = []
    for k in POS_FREQS:
        for u in (yy, xx):
            feats += [torch.cos(k * math.pi * u), torch.sin(k * math.pi * u)]
    return torch.stack(feats, -1).reshape(height * width, POS_CHANNELS)


def _split(x, heads):
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def plain_attention(q, k, v, heads):
    out = F.scaled_dot_product_attention(_split(q, heads), _split(k, heads), _split(v, heads))
    b, h, n, d = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d)


class CrossAttention(nn.Module):
    def __init__(self, dim, context_dim=None):
        super().__init__()
        context_dim = context_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = CrossAttention(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = CrossAttention(dim, CONTEXT_DIM)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, context, controller, call):
        n = self.norm1(x)
        q, k, v = self.attn1.to_q(n), self.attn1.to_k(n), self.attn1.to_v(n)
        a = controller.attn1(q, k, v, call) if controller is not None else plain_attention(q, k, v, HEADS)
        x = x + self.attn1.to_out(a)
        n = self.norm2(x)
        q, k, v = self.attn2.to_q(n), self.attn2.to_k(context), self.attn2.to_v(context)
        a = controller.attn2(q, k, v, call) if controller is not None else plain_attention(q, k, v, HEADS)
        x = x + self.attn2.to_out(a)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    def __init__(self, dim, name, side):
        super().__init__()
        self.layer = LayerInfo(name, side, side, LATENT, LATENT, HEADS, dim)
        self.norm = nn.GroupNorm(8, dim)
        self.proj_in = nn.Linear(dim, dim)
        self.block = BasicTransformerBlock(dim)
        self.proj_out = nn.Linear(dim, dim)
        fixed = torch.zeros(side * side, dim)
        fixed[:, 0] = REGION_AMPLITUDE * region_indicator(side, side)
        fixed[:, 1:RESERVED] = POS_AMPLITUDE * position_features(side, side)
        self.register_buffer("fixed", fixed)

    def forward(self, x, context, controller, step, chunks):
        b, c, h, w = x.shape
        t = self.norm(x).flatten(2).transpose(1, 2)
        t = self.proj_in(t) + self.fixed
        t = self.block(t, context, controller, AttnCall(self.layer, step, tuple(chunks)))
        t = self.proj_out(t).transpose(1, 2).reshape(b, c, h, w)
        return x + t


class ResBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(TIME_DIM, cout)
        self.norm2 = nn.GroupNorm(8, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(temb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class TinyUNet(nn.Module):
    """``model(x, timestep, context, step, chunks) -> eps``.

    ``x``: ``[len(chunks) * F, 4, 16, 16]`` frame-major chunks; ``timestep``: train timestep
    (scalar or ``[B]``); ``context``: ``[B, 77, CONTEXT_DIM]`` (or ``[1, ...]``, broadcast);
    ``step``/``chunks``: what the host reports to the patches (:class:`AttnCall`). The attention
    controller is the attribute :attr:`controller` (None: plain attention).
    """

    def __init__(self, seed: int = 0):
        super().__init__()
        c0, c1, c2, c3 = CHANNELS
        self.controller = None
        self.register_buffer("alphas_cumprod", sd1_alphas_cumprod().float())
        self.time = nn.Sequential(nn.Linear(TIME_DIM, TIME_DIM), nn.SiLU(), nn.Linear(TIME_DIM, TIME_DIM))
        self.conv_in = nn.Conv2d(4, c0, 3, padding=1)
        self.in0 = ResBlock(c0, c0)
        self.att_in0 = SpatialTransformer(c0, "input_1", 16)
        self.down0 = nn.Conv2d(c0, c0, 3, stride=2, padding=1)
        self.in1 = ResBlock(c0, c1)
        self.att_in1 = SpatialTransformer(c1, "input_4", 8)
        self.down1 = nn.Conv2d(c1, c1, 3, stride=2, padding=1)
        self.in2 = ResBlock(c1, c2)
        self.att_in2 = SpatialTransformer(c2, "input_7", 4)
        self.down2 = nn.Conv2d(c2, c2, 3, stride=2, padding=1)
        self.mid1 = ResBlock(c2, c3)
        self.att_mid = SpatialTransformer(c3, "middle_0", 2)
        self.mid2 = ResBlock(c3, c3)
        self.up2 = nn.Conv2d(c3, c3, 3, padding=1)
        self.out2 = ResBlock(c3 + c2, c2)
        self.att_out2 = SpatialTransformer(c2, "output_3", 4)
        self.up1 = nn.Conv2d(c2, c2, 3, padding=1)
        self.out1 = ResBlock(c2 + c1, c1)
        self.att_out1 = SpatialTransformer(c1, "output_6", 8)
        self.up0 = nn.Conv2d(c1, c1, 3, padding=1)
        self.out0 = ResBlock(c1 + c0, c0)
        self.att_out0 = SpatialTransformer(c0, "output_9", 16)
        self.norm_out = nn.GroupNorm(8, c0)
        self.conv_out = nn.Conv2d(c0, 4, 3, padding=1)
        self._init(seed)

    def transformers(self) -> list[SpatialTransformer]:
        return [m for m in self.modules() if isinstance(m, SpatialTransformer)]

    def layers(self) -> list[LayerInfo]:
        return [m.layer for m in self.transformers()]

    @torch.no_grad()
    def _init(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                _normal_(m.weight, g, 1.0 / math.sqrt(_fan_in(m.weight)))
                if m.bias is not None:
                    _normal_(m.bias, g, 0.02)
            elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
                m.weight.fill_(1.0)
                m.bias.zero_()
        for m in self.modules():
            if isinstance(m, ResBlock):
                m.conv2.weight.mul_(RES_OUT_GAIN)  # keep the residual stream from growing
            if isinstance(m, BasicTransformerBlock):
                m.attn1.to_q.weight.mul_(QK_GAIN)
                m.attn1.to_k.weight.mul_(QK_GAIN)
                m.attn1.to_out.weight.mul_(ATTN1_OUT_GAIN)
                m.attn1.to_out.weight[:RESERVED] = 0.0  # region and position pass attn1 unchanged
                m.attn1.to_out.bias[:RESERVED] = 0.0
                self._position_self(m.attn1, g)
                self._region_cross(m.attn2, g)
            if isinstance(m, SpatialTransformer):
                m.proj_in.weight[:RESERVED] = 0.0  # reserved channels carry no content
                m.proj_in.bias[:RESERVED] = 0.0
                m.proj_out.weight.mul_(0.5)
        self.conv_out.weight.mul_(1.6)  # v of roughly unit scale

    @staticmethod
    def _position_self(attn: CrossAttention, g: torch.Generator) -> None:
        """Self-attention favours nearby tokens: per head, an orthonormal basis ``B_h`` of
        ``POS_CHANNELS`` directions; ``to_q``/``to_k`` map the position channels onto it with gain
        ``SELF_POS_GAIN`` and their random parts are projected off it, so the score is the random
        score plus ``SELF_POS_GAIN**2 * n_pos . n_pos' / sqrt(d)``."""
        dim = attn.to_q.weight.shape[0]
        d = dim // HEADS
        proj = torch.eye(dim)
        basis = torch.zeros(dim, POS_CHANNELS)
        for h in range(HEADS):
            b, _ = torch.linalg.qr(torch.randn(d, POS_CHANNELS, generator=g))
            basis[h * d:(h + 1) * d] = b
            proj[h * d:(h + 1) * d, h * d:(h + 1) * d] -= b @ b.T
        for lin in (attn.to_q, attn.to_k):
            lin.weight.copy_(proj @ lin.weight)
            lin.weight[:, 1:RESERVED] += SELF_POS_GAIN * basis

    @staticmethod
    def _region_cross(attn: CrossAttention, g: torch.Generator) -> None:
        dim = attn.to_q.weight.shape[0]
        d = dim // HEADS
        a = torch.zeros(dim)
        for h in range(HEADS):
            u = torch.randn(d, generator=g)
            a[h * d:(h + 1) * d] = u / u.norm()
        # per-head projector off a_h
        proj = torch.eye(dim)
        for h in range(HEADS):
            ah = torch.zeros(dim)
            ah[h * d:(h + 1) * d] = a[h * d:(h + 1) * d]
            proj -= torch.outer(ah, ah)
        attn.to_q.weight.copy_(proj @ attn.to_q.weight)
        attn.to_k.weight.copy_(proj @ attn.to_k.weight)
        attn.to_q.weight[:, 0] += CROSS_GAIN * a
        attn.to_k.weight[:, 0] += CROSS_GAIN * a

    def forward(self, x, timestep, context, step: int = 0, chunks=("cond",)):
        b = x.shape[0]
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(b)
        temb = self.time(timestep_embedding(t, TIME_DIM))
        if context.shape[0] != b:
            context = context.expand(b, -1, -1)
        ctl = self.controller
        args = (context, ctl, step, chunks)
        h = self.att_in0(self.in0(self.conv_in(x), temb), *args)
        s0 = h
        h = self.att_in1(self.in1(self.down0(h), temb), *args)
        s1 = h
        h = self.att_in2(self.in2(self.down1(h), temb), *args)
        s2 = h
        h = self.mid2(self.att_mid(self.mid1(self.down2(h), temb), *args), temb)
        h = self.up2(F.interpolate(h, scale_factor=2, mode="nearest"))
        h = self.att_out2(self.out2(torch.cat([h, s2], 1), temb), *args)
        h = self.up1(F.interpolate(h, scale_factor=2, mode="nearest"))
        h = self.att_out1(self.out1(torch.cat([h, s1], 1), temb), *args)
        h = self.up0(F.interpolate(h, scale_factor=2, mode="nearest"))
        h = self.att_out0(self.out0(torch.cat([h, s0], 1), temb), *args)
        v = self.conv_out(F.silu(self.norm_out(h)))
        # v-prediction converted to eps: eps = sqrt(1 - a) z + sqrt(a) v (a = alpha_bar(t)).
        a = self.alphas_cumprod[t.round().long().clamp(0, self.alphas_cumprod.numel() - 1)]
        a = a.view(-1, 1, 1, 1)
        return (1 - a).sqrt() * x + a.sqrt() * v
