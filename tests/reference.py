"""A naive FateZero controller written straight from the spec, for equality tests.

It does what the official code does (FateZero ``video_diffusion/prompt_attention/``:
``attention_store.py`` ``AttentionStore.forward``, ``attention_util.py`` ``AttentionControlEdit.forward``,
``spatial_blend.py`` ``SpatialBlender``; ``models/attention.py`` ``SparseCausalAttention.forward``):
it materialises every softmax map, stores full maps during inversion, and at edit time blends
*maps* (``M * A_edit + (1 - M) * S``) before multiplying by the values. Nothing here is shared with ``fatezero_core`` except the
:class:`AttnCall`/``LayerInfo`` descriptions and the token-alignment tensors it is handed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def key_table(rule, frames):
    rows = []
    for i in range(frames):
        row = []
        for e in rule:
            if e == "first":
                row.append(0)
            elif e == "last":
                row.append(frames - 1)
            elif e == "mid":
                row.append((frames - 1) // 2)
            else:
                row.append(min(max(i + e, 0), frames - 1))
        rows.append(row)
    return rows


def heads_of(x, h):
    b, n, c = x.shape
    return x.reshape(b, n, h, c // h).permute(0, 2, 1, 3)


def softmax_map(q, k, h):
    """Materialised ``[B, H, N, T]`` probabilities."""
    qh, kh = heads_of(q, h), heads_of(k, h)
    return torch.softmax(qh @ kh.transpose(-1, -2) / qh.shape[-1] ** 0.5, dim=-1)


def out_of(probs, v, h):
    o = probs @ heads_of(v, h)
    b, hh, n, d = o.shape
    return o.permute(0, 2, 1, 3).reshape(b, n, hh * d)


def st_keys(x, rule, frames):
    table = key_table(rule, frames)
    return torch.stack([torch.cat([x[j] for j in row], 0) for row in table])


class NaiveMapController:
    """Capture and edit with full softmax maps (the official map store)."""

    def __init__(self, key_rule, min_st_channels, stored_levels, mask_level=2):
        self.key_rule = key_rule
        self.min_st_channels = min_st_channels
        self.stored_levels = stored_levels
        self.mask_level = mask_level
        self.maps = {}  # (step, layer, kind) -> map
        self.mode = "capture"
        self.edit = None
        self.num_steps = None
        self.target_sum = None

    def rule(self, layer):
        return self.key_rule if layer.channels >= self.min_st_channels else (0,)

    def stored(self, layer):
        return layer.level in self.stored_levels

    def step_of(self, call):
        return call.step if self.mode == "capture" else self.num_steps - 1 - call.step

    def attn1(self, q, k, v, call):
        layer, frames = call.layer, q.shape[0] // len(call.chunks)
        j = self.step_of(call)
        outs = []
        for c, kind in enumerate(call.chunks):
            qc, kc, vc = (t[c * frames:(c + 1) * frames] for t in (q, k, v))
            keys, vals = st_keys(kc, self.rule(layer), frames), st_keys(vc, self.rule(layer), frames)
            a = softmax_map(qc, keys, layer.heads)
            if kind in ("cond", "source") and self.mode == "capture" or kind == "source":
                if self.stored(layer):
                    self.maps[(j, layer.name, "self")] = a
            elif kind == "cond" and self.edit is not None and self.stored(layer):
                e = self.edit
                if e["self_window"][0] <= call.step < e["self_window"][1]:
                    s = self.maps[(j, layer.name, "self")]
                    m = self.mask(j, layer)
                    a = s if m is None else m[:, None, :, None] * a + (1 - m[:, None, :, None]) * s
            outs.append(out_of(a, vals, layer.heads))
        return torch.cat(outs)

    def attn2(self, q, k, v, call):
        layer, frames = call.layer, q.shape[0] // len(call.chunks)
        j = self.step_of(call)
        if k.shape[0] != q.shape[0]:
            k, v = k.expand(q.shape[0], -1, -1), v.expand(q.shape[0], -1, -1)
        outs = []
        for c, kind in enumerate(call.chunks):
            qc, kc, vc = (t[c * frames:(c + 1) * frames] for t in (q, k, v))
            a = softmax_map(qc, kc, layer.heads)
            if kind in ("cond", "source") and self.mode == "capture" or kind == "source":
                if self.stored(layer):
                    self.maps[(j, layer.name, "cross")] = a
            elif kind == "cond" and self.edit is not None and self.stored(layer):
                e = self.edit
                if e.get("target_tokens") and layer.level == self.mask_level:
                    self.add_target(layer, a)
                s = self.maps[(j, layer.name, "cross")]
                if e["mode"] == "replace":
                    r = torch.einsum("fhpw,wn->fhpn", s, e["mapper"])
                else:
                    r = s[..., e["mapper"]] * e["refine_alphas"] + a * (1 - e["refine_alphas"])
                if e.get("equalizer") is not None:
                    r = r * e["equalizer"]
                alpha = e["cross_alphas"][call.step]
                a = alpha * r + (1 - alpha) * a
            outs.append(out_of(a, vc, layer.heads))
        return torch.cat(outs)

    # ------------------------------------------------------------------ masks
    def word_map(self, j, tokens):
        layers = [(name, info) for (step, name, kind), _ in self.maps.items()
                  if step == j and kind == "cross" and self.layer_info[name].level == self.mask_level
                  for info in [self.layer_info[name]]]
        total = 0
        for name, info in layers:
            a = self.maps[(j, name, "cross")]
            total = total + sum(a[..., t] for t in tokens)  # [F, H, N]
        total = total / len(layers)
        info = layers[0][1]
        return total.mean(1).reshape(-1, info.height, info.width)

    def finish_map(self, word_map, size, soft=False):
        m = F.max_pool2d(word_map[:, None], (3, 3), (1, 1), padding=(1, 1))
        m = F.interpolate(m, size=size)[:, 0]
        peak = m.amax(dim=(1, 2), keepdim=True)
        m = torch.where(peak > 0, m / torch.where(peak > 0, peak, torch.ones_like(peak)), torch.zeros_like(m))
        th = self.edit["threshold"]
        if th >= 1:  # official: blend_th >= 1 is full replacement, soft or not
            return torch.zeros_like(m).flatten(1)
        if soft:  # linear ramp from 0 at the threshold to 1 at the frame's peak
            return torch.clamp((m - th) / (1 - th), 0, 1).flatten(1)
        return (m > th).float().flatten(1)

    def mask(self, j, layer):
        e = self.edit
        if not e.get("blend_tokens"):
            return None
        return self.finish_map(self.word_map(j, e["blend_tokens"]), (layer.height, layer.width), e.get("soft", False))

    def add_target(self, layer, a):
        n_layers = sum(1 for info in self.layer_info.values() if info.level == self.mask_level
                       and self.stored(info))
        word = sum(a[..., t] for t in self.edit["target_tokens"]).mean(1).reshape(-1, layer.height, layer.width)
        self.target_sum = word / n_layers if self.target_sum is None else self.target_sum + word / n_layers

    def latent_mask(self, i, size):
        j = self.num_steps - 1 - i
        m = self.finish_map(self.word_map(j, self.edit["blend_tokens"]), size)
        if self.edit.get("target_tokens") and self.target_sum is not None:
            m = torch.maximum(m, self.finish_map(self.target_sum, size))
        return m.view(-1, 1, *size)
