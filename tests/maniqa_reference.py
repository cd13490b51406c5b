"""An independent functional MANIQA forward (pyiqa's test-time path) on a raw state dict, for tests/test_maniqa.py.

Written from pyiqa's source (pyiqa/archs/maniqa_arch.py, maniqa_swin.py, arch_util.uniform_crop) and timm's
VisionTransformer, with torch.nn.functional ops on the state dict's tensors and nothing from
facereward.measures.maniqa: the crop grid uses numpy as pyiqa does, every attention is an explicit softmax, the Swin
windows are cut out one by one with slicing (not reshaped), and it runs in float64. The Swin buffers
(relative_position_index, attn_mask) are taken from the state dict, as pyiqa's load_state_dict does.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

IMAGENET_INCEPTION_MEAN = (0.5, 0.5, 0.5)  # pyiqa/archs/constants.py
IMAGENET_INCEPTION_STD = (0.5, 0.5, 0.5)


def pyiqa_uniform_crop(x: Tensor, crop_size: int, crop_num: int) -> Tensor:
    """pyiqa arch_util.uniform_crop for one tensor, verbatim in behaviour."""
    b, c, h, w = x.shape
    if min(h, w) <= crop_size:
        x = F.interpolate(x, scale_factor=(crop_size + 1) / min(h, w), mode="bilinear")
        b, c, h, w = x.shape
    step_h = (h - crop_size) // int(np.sqrt(crop_num))
    step_w = (w - crop_size) // int(np.sqrt(crop_num))
    side = int(np.ceil(np.sqrt(crop_num)))
    tiles = []
    for i in range(side):
        for j in range(side):
            tiles.append(x[..., i * step_h:i * step_h + crop_size, j * step_w:j * step_w + crop_size])
    return torch.stack(tiles[:crop_num], dim=1).reshape(b * crop_num, c, crop_size, crop_size)


def _lin(sd: dict, name: str, x: Tensor) -> Tensor:
    return F.linear(x, sd[name + ".weight"], sd[name + ".bias"])


def _ln(sd: dict, name: str, x: Tensor, eps: float) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps)


def _mha(q: Tensor, k: Tensor, v: Tensor, scale: float, bias: Tensor | None = None) -> Tensor:
    logits = torch.matmul(q * scale, k.transpose(-1, -2))
    if bias is not None:
        logits = logits + bias
    return torch.matmul(torch.softmax(logits, dim=-1), v)


def _vit_hooks(sd: dict, x: Tensor, heads: int, patch: int) -> list[Tensor]:
    """timm VisionTransformer forward; the output of every Block (what pyiqa's forward hooks collect)."""
    x = F.conv2d(x, sd["vit.patch_embed.proj.weight"], sd["vit.patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["vit.cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + sd["vit.pos_embed"]
    outs = []
    i = 0
    while f"vit.blocks.{i}.norm1.weight" in sd:
        p = f"vit.blocks.{i}."
        bsz, n, c = x.shape
        hd = c // heads
        qkv = _lin(sd, p + "attn.qkv", _ln(sd, p + "norm1", x, 1e-6)).reshape(bsz, n, 3, heads, hd)
        q, k, v = (qkv[:, :, j].transpose(1, 2) for j in range(3))
        a = _mha(q, k, v, hd ** -0.5).transpose(1, 2).reshape(bsz, n, c)
        x = x + _lin(sd, p + "attn.proj", a)
        hdn = F.gelu(_lin(sd, p + "mlp.fc1", _ln(sd, p + "norm2", x, 1e-6)))
        x = x + _lin(sd, p + "mlp.fc2", hdn)
        outs.append(x)
        i += 1
    return outs


def _tab(sd: dict, name: str, x: Tensor) -> Tensor:
    """pyiqa TABlock: x (B, C, N); Linear(N, N) maps, softmax over channels, transpose-then-reshape."""
    bsz, c, n = x.shape
    q, k, v = (_lin(sd, f"{name}.c_{t}", x) for t in "qkv")
    attn = torch.softmax(q @ k.transpose(-2, -1) * n ** -0.5, dim=-1)
    return (attn @ v).transpose(1, 2).reshape(bsz, c, n) + x


def _swin_block(sd: dict, p: str, x: Tensor, res: int, heads: int, window: int, shifted: bool) -> Tensor:
    """pyiqa SwinBlock on tokens (B, res*res, C); the windows are sliced out one at a time."""
    bsz, _, c = x.shape
    ws, shift = window, (window // 2 if shifted else 0)
    if res <= ws:
        ws, shift = res, 0
    y = _ln(sd, p + "norm1", x, 1e-5).reshape(bsz, res, res, c)
    if shift:
        y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))
    table, index = sd[p + "attn.relative_position_bias_table"], sd[p + "attn.relative_position_index"]
    bias = table[index.reshape(-1)].reshape(ws * ws, ws * ws, heads).permute(2, 0, 1)
    mask = sd[p + "attn_mask"] if shift else None
    hd = c // heads
    out = torch.zeros_like(y)
    nwin = res // ws
    for wi in range(nwin):
        for wj in range(nwin):
            tok = y[:, wi * ws:(wi + 1) * ws, wj * ws:(wj + 1) * ws, :].reshape(bsz, ws * ws, c)
            qkv = _lin(sd, p + "attn.qkv", tok).reshape(bsz, ws * ws, 3, heads, hd)
            q, k, v = (qkv[:, :, j].transpose(1, 2) for j in range(3))
            full_bias = bias if mask is None else bias + mask[wi * nwin + wj]
            a = _mha(q, k, v, hd ** -0.5, full_bias).transpose(1, 2).reshape(bsz, ws * ws, c)
            out[:, wi * ws:(wi + 1) * ws, wj * ws:(wj + 1) * ws, :] = _lin(sd, p + "attn.proj", a).reshape(bsz, ws, ws, c)
    if shift:
        out = torch.roll(out, shifts=(shift, shift), dims=(1, 2))
    x = x + out.reshape(bsz, res * res, c)
    return x + _lin(sd, p + "mlp.fc2", F.gelu(_lin(sd, p + "mlp.fc1", _ln(sd, p + "norm2", x, 1e-5))))


def _swin(sd: dict, name: str, x: Tensor, heads: list[int], depths: list[int], window: int, scale: float) -> Tensor:
    """pyiqa maniqa_swin.SwinTransformer on a (B, C, h, w) map."""
    bsz, c, h, w = x.shape
    t = x.permute(0, 2, 3, 1).reshape(bsz, h * w, c)  # 'b c h w -> b (h w) c'
    for li, (depth, hd) in enumerate(zip(depths, heads)):
        start = t
        for bi in range(depth):
            t = _swin_block(sd, f"{name}.layers.{li}.blocks.{bi}.", t, h, hd, window, bi % 2 == 1)
        m = t.permute(0, 2, 1).reshape(bsz, c, h, w)
        m = F.relu(F.conv2d(m, sd[f"{name}.layers.{li}.conv.weight"], sd[f"{name}.layers.{li}.conv.bias"], padding=1))
        t = scale * m.reshape(bsz, c, h * w).permute(0, 2, 1) + start
    return t.permute(0, 2, 1).reshape(bsz, c, h, w)


def reference_maniqa(
    state_dict: dict[str, Tensor],
    images: Tensor,
    *,
    patch: int,
    crop: int,
    vit_heads: int,
    swin_heads: list[int],
    swin_depths: list[int],
    window: int,
    scale: float,
    test_sample: int,
    num_tab: int = 2,
) -> Tensor:
    """pyiqa MANIQA.forward in eval mode, squeezed to (B,); computed in float64."""
    sd = {k: (v.double() if v.is_floating_point() else v) for k, v in state_dict.items()}
    x = images.double()
    mean = torch.tensor(IMAGENET_INCEPTION_MEAN, dtype=torch.float64, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_INCEPTION_STD, dtype=torch.float64, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std
    bsz = x.shape[0]
    x = pyiqa_uniform_crop(x, crop, test_sample)
    outs = _vit_hooks(sd, x, vit_heads, patch)
    feats = torch.cat([outs[i][:, 1:] for i in (6, 7, 8, 9)], dim=2)
    side = crop // patch

    x = feats.permute(0, 2, 1)  # 'b (h w) c -> b c (h w)'
    for i in range(num_tab):
        x = _tab(sd, f"tablock1.{i}", x)
    x = x.reshape(x.shape[0], x.shape[1], side, side)
    x = F.conv2d(x, sd["conv1.weight"], sd["conv1.bias"])
    x = _swin(sd, "swintransformer1", x, swin_heads, swin_depths, window, scale)

    x = x.reshape(x.shape[0], x.shape[1], side * side)
    for i in range(num_tab):
        x = _tab(sd, f"tablock2.{i}", x)
    x = x.reshape(x.shape[0], x.shape[1], side, side)
    x = F.conv2d(x, sd["conv2.weight"], sd["conv2.bias"])
    x = _swin(sd, "swintransformer2", x, swin_heads, swin_depths, window, scale)

    x = x.permute(0, 2, 3, 1).reshape(x.shape[0], side * side, x.shape[1])  # 'b c h w -> b (h w) c'
    s = F.relu(_lin(sd, "fc_score.3", F.relu(_lin(sd, "fc_score.0", x)))).reshape(bsz, -1)
    w = torch.sigmoid(_lin(sd, "fc_weight.3", F.relu(_lin(sd, "fc_weight.0", x)))).reshape(bsz, -1)
    return (w * s).sum(dim=-1) / (w.sum(dim=-1) + 1e-8)
