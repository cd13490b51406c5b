"""Functional reference for pyiqa's MUSIQ forward (eval mode), written from pyiqa's source for the parity test.

Independent of facereward.measures.musiq: it works on the raw state dict with torch.nn.functional ops and
follows pyiqa's own route - ``get_multiscale_patches`` packs each token as ``[patch pixels (c, y, x) | spatial
position | scale id | mask]`` along one axis (``F.unfold`` after TF-'SAME' zero padding, positions from a
nearest ``F.interpolate`` of ``arange(grid)``), and ``MUSIQ.forward`` unpacks it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _same_pad(x: Tensor, k: int, s: int) -> Tensor:
    h, w = x.shape[-2:]
    ph = (math.ceil(h / s) - 1) * s + k - h
    pw = (math.ceil(w / s) - 1) * s + k - w
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


def _hash_positions(grid: int, count_h: int, count_w: int) -> Tensor:
    g = torch.arange(grid).float().view(1, 1, grid)
    gw = F.interpolate(g, size=count_w, mode="nearest").view(count_w)
    gh = F.interpolate(g, size=count_h, mode="nearest").view(count_h)
    return (gh.view(-1, 1) * grid + gw.view(1, -1)).reshape(-1)


def _scale_tokens(img: Tensor, p: int, grid: int, scale_id: int, max_len: int) -> Tensor:
    """(n, c, h, w) -> (n, c*p*p + 3, L) columns [pixels | pos | scale | mask]."""
    n, _, h, w = img.shape
    cols = F.unfold(_same_pad(img, p, p), p, stride=p)
    pos = _hash_positions(grid, math.ceil(h / p), math.ceil(w / p)).view(1, 1, -1).repeat(n, 1, 1)
    out = torch.cat([cols, pos, torch.full_like(pos, float(scale_id)), torch.ones_like(pos)], dim=1)
    if max_len >= 0:
        out = torch.cat([out, out.new_zeros(out.shape[0], out.shape[1], max_len)], dim=-1)[..., :max_len]
    return out


def multiscale_input(img: Tensor, p: int, grid: int, sides, orig_max_len) -> Tensor:
    """pyiqa get_multiscale_patches: (n, 3, h, w) in [-1, 1] -> (n, L, 3*p*p + 3)."""
    n, _, h, w = img.shape
    outs = []
    sides = sorted(sides)
    for sid, side in enumerate(sides):
        r = side / max(h, w)
        rh, rw = round(h * r), round(w * r)
        res = F.interpolate(img, (rh, rw), mode="bicubic", align_corners=False)
        outs.append(_scale_tokens(res, p, grid, sid, int(math.ceil(side / p) ** 2)))
    if orig_max_len is not None:
        outs.append(_scale_tokens(img, p, grid, len(sides), orig_max_len))
    return torch.cat(outs, dim=-1).transpose(1, 2)


def _std_conv(x: Tensor, w: Tensor, stride: int = 1) -> Tensor:
    k = w.shape[-1]
    w = w - w.mean((1, 2, 3), keepdim=True)
    w = w / (w.std((1, 2, 3), keepdim=True) + 1e-5)
    return F.conv2d(_same_pad(x, k, stride), w, None, stride)


def _gn(x: Tensor, sd: dict, name: str, eps: float) -> Tensor:
    return F.group_norm(x, 32, sd[name + ".weight"], sd[name + ".bias"], eps)


def _lin(x: Tensor, sd: dict, name: str) -> Tensor:
    return F.linear(x, sd[name + ".weight"], sd[name + ".bias"])


def musiq_reference(
    sd: dict[str, Tensor],
    images: Tensor,
    *,
    num_heads: int = 6,
    patch_size: int = 32,
    grid: int = 10,
    sides=(224, 384),
    orig_max_len: int | None = -1,
) -> Tensor:
    """pyiqa MUSIQ(...).eval()(images) for images (b, 3, h, w) on [0, 1] -> (b,) mos."""
    p = patch_size
    x = multiscale_input((images - 0.5) * 2, p, grid, sides, orig_max_len)
    b, seq, _ = x.shape
    spatial, scale_ids, mask = x[:, :, -3].long(), x[:, :, -2].long(), x[:, :, -1].bool()
    pix = x[:, :, :-3].reshape(-1, 3, p, p)

    y = F.relu(_gn(_std_conv(pix, sd["conv_root.weight"], 2), sd, "gn_root", 1e-6))
    y = F.max_pool2d(_same_pad(y, 3, 2), 3, 2)
    short = _gn(_std_conv(y, sd["block1.conv_proj.weight"]), sd, "block1.gn_proj", 1e-4)
    z = F.relu(_gn(_std_conv(y, sd["block1.conv1.weight"]), sd, "block1.gn1", 1e-4))
    z = F.relu(_gn(_std_conv(z, sd["block1.conv2.weight"]), sd, "block1.gn2", 1e-4))
    z = _gn(_std_conv(z, sd["block1.conv3.weight"]), sd, "block1.gn3", 1e-4)
    y = F.relu(z + short)
    y = y.permute(0, 2, 3, 1).reshape(b, seq, -1)
    h = _lin(y, sd, "embedding")

    te = "transformer_encoder"
    h = h + sd[f"{te}.posembed_input.position_emb"].squeeze(0)[spatial]
    h = h + sd[f"{te}.scaleembed_input.scale_emb"][scale_ids]
    h = torch.cat([sd[f"{te}.cls"].repeat(b, 1, 1), h], dim=1)
    m = torch.cat([torch.ones(b, 1, dtype=torch.bool), mask], dim=1)
    n, c = h.shape[1], h.shape[2]
    dh = c // num_heads
    m2 = m.reshape(b, 1, n, 1) * m.reshape(b, 1, 1, n)
    i = 0
    while f"{te}.transformer.encoderblock_{i}.norm1.weight" in sd:
        blk = f"{te}.transformer.encoderblock_{i}"
        t = F.layer_norm(h, (c,), sd[f"{blk}.norm1.weight"], sd[f"{blk}.norm1.bias"], 1e-6)
        q, k, v = (
            _lin(t, sd, f"{blk}.attention.{nm}").reshape(b, n, num_heads, dh).permute(0, 2, 1, 3)
            for nm in ("query", "key", "value")
        )
        a = torch.einsum("bhqd,bhkd->bhqk", q, k) * dh**-0.5
        a = a.masked_fill(m2 == 0, -1e3).softmax(-1)
        t = torch.einsum("bhqk,bhkd->bqhd", a, v).reshape(b, n, c)
        h = h + _lin(t, sd, f"{blk}.attention.out")
        t = F.layer_norm(h, (c,), sd[f"{blk}.norm2.weight"], sd[f"{blk}.norm2.bias"], 1e-6)
        h = h + _lin(F.gelu(_lin(t, sd, f"{blk}.mlp.fc1")), sd, f"{blk}.mlp.fc2")
        i += 1
    h = F.layer_norm(h, (c,), sd[f"{te}.encoder_norm.weight"], sd[f"{te}.encoder_norm.bias"], 1e-6)
    if "head.0.weight" in sd:
        q = torch.softmax(_lin(h[:, 0], sd, "head.0"), dim=-1)
    else:
        q = _lin(h[:, 0], sd, "head")
    return (q * torch.arange(1, q.shape[-1] + 1).to(q)).sum(-1)
