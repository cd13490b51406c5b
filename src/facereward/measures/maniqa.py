"""MANIQA (Yang et al., "MANIQA: Multi-dimension Attention Network for No-Reference Image Quality Assessment", 2022).

A no-reference quality score, higher is better, computed as pyiqa's ``MANIQA`` arch computes it at test time
(pyiqa/archs/maniqa_arch.py and maniqa_swin.py; metric ``maniqa`` = the KonIQ-10k model, ``maniqa-pipal`` = the PIPAL22
model), in plain torch: timm's ``vit_base_patch8_224`` is rebuilt here with timm's key names, no timm / einops.

Computation, for images ``(B, 3, H, W)`` float RGB on [0, 1] (``S`` = 224 the crop size, ``n`` = ``test_sample`` = 20):

1. normalise with pyiqa's IMAGENET_INCEPTION constants, mean = std = (0.5, 0.5, 0.5): ``x -> (x - 0.5) / 0.5``;
2. if ``min(H, W) <= S``: ``F.interpolate(x, scale_factor=(S + 1) / min(H, W), mode="bilinear")`` (align_corners
   False, no antialias; the kernel uses that scale factor, not the output/input size ratio); H, W are now its size;
3. ``n`` deterministic crops of ``S x S`` (pyiqa's ``uniform_crop``, its eval path; the random crop is its training
   path only): with ``g = floor(sqrt(n))`` and ``G = ceil(sqrt(n))``, steps ``dh = (H - S) // g``, ``dw = (W - S) // g``;
   the crops sit at ``(i * dh, j * dw)`` for ``i, j`` in ``range(G)``, row-major, and the first ``n`` are kept. For
   n = 20 that is rows ``i = 0..3`` by columns ``j = 0..4``: the full width is spanned but the bottom
   ``H - S - 3 * dh`` rows are never seen (pyiqa's quirk, kept). The crops are batched image-major (``b * n + k``);
4. ViT-B/8 (embed 768, 12 heads, LayerNorm eps 1e-6, exact GELU): patch embedding, class token, position embedding,
   blocks; the outputs of blocks 6, 7, 8, 9 (0-based; pyiqa's forward hooks ``outputs[6..9]``) without the class
   token are concatenated on channels: ``(B n, 784, 3072)``. Blocks 10, 11, ``vit.norm`` and ``vit.head`` are loaded
   (the file has them) but do not affect the score, so they are not run;
5. stage 1: tokens to ``(B n, 3072, 784)``; two TABlocks (attention across channels: q, k, v are Linear(784, 784) on
   the token axis, ``softmax(q k^T / sqrt(784)) v``, then pyiqa's ``.transpose(1, 2).reshape(B, C, N)``, which mixes the
   channel and token axes and is kept as trained, plus the residual); view as ``(B n, 3072, 28, 28)``; 1x1 conv to 768;
   a Swin stage of two layers, each: 2 Swin blocks (window 4, shift 0 then 2, 4 heads, relative position bias, MLP
   768, LayerNorm eps 1e-5), a 3x3 conv + ReLU, and ``x = scale * layer(x) + x``;
6. stage 2: the same with a 1x1 conv 768 -> 384 and a Swin stage of width 384;
7. per token of every crop: ``score = ReLU(fc(ReLU(fc(t))))``, ``weight = sigmoid(fc(ReLU(fc(t))))``; one number per
   image: ``sum(weight * score) / (sum(weight) + 1e-8)`` over all ``n * 784`` tokens of its crops jointly (not a mean
   of per-crop scores). Shape ``(B,)``; pyiqa's score range "~0, ~1" (non-negative, not clipped).

``scale`` is 0.13 for ``pipal`` (pyiqa's default) and 0.8 for ``koniq`` (pyiqa default_model_configs ``maniqa``).
Dropouts are inert (eval). Differentiable wrt the images; the weights are frozen.

Weights (local files only; ``WEIGHT_FILES``): ``MANIQA_PIPAL-ae6d356b.pth`` (pyiqa's PIPAL22 file) and
``ckpt_koniq10k.pt`` (the MANIQA authors' KonIQ-10k release, which pyiqa re-hosts under the same name). Both are flat
``{name: tensor}`` state dicts of the whole model, ViT included: pyiqa's ``load_pretrained_network`` iterates
``.items()`` of what ``torch.load`` returns and the authors' predict_one_image.py feeds ckpt_koniq10k.pt to
``load_state_dict``. Read by :mod:`facereward.measures.weightfile` (``.safetensors`` too), accepted as pyiqa's
loader accepts them: an optional ``{"params": {...}}`` wrapper (pyiqa's ``pretrained_model_path`` route) and a
``module.`` key prefix (stripped). A whole pickled nn.Module (the authors' inference.py expects one:
``net = torch.load(model_path)``) cannot be read with ``weights_only=True``; re-save its state dict where the MANIQA
code is importable: ``python -c "import torch; torch.save(torch.load('IN.pt', map_location='cpu',
weights_only=False).state_dict(), 'OUT.pth')"``.

Key layout (``maniqa_layout()``), checked strictly (every key, its exact shape; no other key):
``vit.{cls_token (1,1,768), pos_embed (1,785,768), patch_embed.proj.{weight (768,3,8,8), bias}}``,
``vit.blocks.{0..11}.{norm1, attn.qkv (2304,768), attn.proj, norm2, mlp.fc1 (3072,768), mlp.fc2}.{weight, bias}``,
``vit.norm``, ``vit.head`` (1000, 768); ``tablock{1,2}.{0,1}.c_{q,k,v}`` (784, 784); ``conv1`` (768, 3072, 1, 1),
``conv2`` (384, 768, 1, 1); ``swintransformer{1,2}.downsample`` (a 3x3 stride-2 conv the forward never uses),
``.layers.{0,1}.conv`` (3x3), ``.layers.{0,1}.blocks.{0,1}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``,
``...attn.relative_position_bias_table`` (49, 4), the buffers ``...attn.relative_position_index`` (16, 16) and
``...blocks.1.attn_mask`` (49, 16, 16), which are used as the file has them, as pyiqa does; ``fc_score.{0,3}``,
``fc_weight.{0,3}``. The dims are ``MANIQAConfig`` fields so tests can run a reduced model.

Errors, one line naming the file: ``FileNotFoundError`` for a missing file; ``ValueError`` for an unreadable file, a
pickled object, a non-state-dict, a missing / unexpected key, a wrong shape or dtype, an out-of-range position index.

Not reproduced: pyiqa's training path (one random crop), its (B, 1) output shape (here (B,)) and its InferenceModel's
[0, 1] range assertion (inputs are not range-checked here).

Parity: tests/test_maniqa.py checks this module against tests/maniqa_reference.py, a functional forward written from
pyiqa's source against the raw state dict (``F.linear`` / ``F.conv2d`` / explicit softmax attention, windows sliced
one by one, numpy crop grid, float64), on a reduced config with a fabricated checkpoint: to 1e-5 in float32 and 1e-10
with this module in float64. The full-size layout is checked key by key and shape by shape.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facereward.measures.weightfile import check_layout, file_label, read_state_dict

__all__ = ["MANIQA", "VARIANT_SCALE", "WEIGHT_FILES", "MANIQAConfig", "check_state_dict", "crop_offsets",
           "maniqa_layout", "resize_for_crops", "uniform_crops"]

WEIGHT_FILES: dict[str, str] = {"pipal": "MANIQA_PIPAL-ae6d356b.pth", "koniq": "ckpt_koniq10k.pt"}
# Swin residual scale per variant: pyiqa's MANIQA default (pipal) and default_model_configs' `maniqa` (koniq)
VARIANT_SCALE: dict[str, float] = {"pipal": 0.13, "koniq": 0.8}
INCEPTION_MEAN = (0.5, 0.5, 0.5)  # pyiqa/archs/constants.py IMAGENET_INCEPTION_MEAN / _STD
INCEPTION_STD = (0.5, 0.5, 0.5)
# the fix for a whole pickled model (the authors' inference.py saves one), added to the "pickled objects" error
_RESAVE_HINT = ("if it is a whole pickled MANIQA model, re-save its state dict where the MANIQA code is importable: "
                "python -c \"import torch; torch.save(torch.load('IN.pt', map_location='cpu', "
                "weights_only=False).state_dict(), 'OUT.pth')\"")


@dataclass(frozen=True)
class MANIQAConfig:
    """Architecture dims; the defaults are the released models' (ViT-B/8 at 224, pyiqa's MANIQA defaults)."""

    embed_dim: int = 768  # ViT width, and MANIQA's embed_dim (conv1 maps 4 * embed_dim -> embed_dim)
    vit_depth: int = 12
    vit_heads: int = 12
    vit_mlp_ratio: float = 4.0
    vit_num_classes: int = 1000  # timm's ImageNet head, in the file though unused
    patch_size: int = 8
    img_size: int = 224  # the crop size
    feature_blocks: tuple[int, ...] = (6, 7, 8, 9)
    num_tab: int = 2
    swin_depths: tuple[int, ...] = (2, 2)
    swin_heads: tuple[int, ...] = (4, 4)
    window_size: int = 4
    dim_mlp: int = 768

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size


# ---------------------------------------------------------------- preprocessing (pyiqa arch_util.uniform_crop)

def resize_for_crops(x: Tensor, crop: int) -> Tensor:
    """pyiqa's upscale before cropping: bilinear by (crop + 1) / min(H, W) when min(H, W) <= crop, else unchanged."""
    h, w = x.shape[-2:]
    if min(h, w) > crop:
        return x
    return F.interpolate(x, scale_factor=(crop + 1) / min(h, w), mode="bilinear")


def crop_offsets(h: int, w: int, crop: int, n: int) -> list[tuple[int, int]]:
    """The (top, left) of pyiqa's n uniform crops of an h x w image (already at least crop x crop)."""
    g = math.isqrt(n)
    grid = g if g * g == n else g + 1  # int(np.ceil(np.sqrt(n)))
    dh, dw = (h - crop) // g, (w - crop) // g
    return [(i * dh, j * dw) for i in range(grid) for j in range(grid)][:n]


def uniform_crops(x: Tensor, crop: int, n: int) -> Tensor:
    """(B, C, H, W) -> (B * n, C, crop, crop), image-major, as pyiqa's ``uniform_crop``."""
    x = resize_for_crops(x, crop)
    b, c, h, w = x.shape
    crops = [x[..., t:t + crop, s:s + crop] for t, s in crop_offsets(h, w, crop, n)]
    return torch.stack(crops, dim=1).reshape(b * n, c, crop, crop)


# ---------------------------------------------------------------- ViT-B/8 (timm vision_transformer key names)

class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _ViTAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # scale head_dim ** -0.5, as timm's fused path
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class _ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _ViTAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class _ViT(nn.Module):
    def __init__(self, cfg: MANIQAConfig):
        super().__init__()
        d = cfg.embed_dim
        self.patch_embed = _PatchEmbed(d, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid ** 2 + 1, d))
        self.blocks = nn.ModuleList(_ViTBlock(d, cfg.vit_heads, cfg.vit_mlp_ratio) for _ in range(cfg.vit_depth))
        self.norm = nn.LayerNorm(d, eps=1e-6)  # unused by MANIQA
        self.head = nn.Linear(d, cfg.vit_num_classes)  # unused by MANIQA
        self.taps = tuple(cfg.feature_blocks)

    def forward(self, x: Tensor) -> Tensor:
        """Crops (N, 3, S, S) -> the tapped blocks' patch tokens concatenated on channels, (N, L, len(taps) * d)."""
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        outs: dict[int, Tensor] = {}
        for i, block in enumerate(self.blocks[: max(self.taps) + 1]):
            x = block(x)
            if i in self.taps:
                outs[i] = x[:, 1:]
        return torch.cat([outs[i] for i in self.taps], dim=2)


# ---------------------------------------------------------------- MANIQA stages (pyiqa maniqa_arch / maniqa_swin)

class _TABlock(nn.Module):
    """Attention across channels; the Linear maps act on the token axis (dim = number of tokens)."""

    def __init__(self, tokens: int):
        super().__init__()
        self.c_q = nn.Linear(tokens, tokens)
        self.c_k = nn.Linear(tokens, tokens)
        self.c_v = nn.Linear(tokens, tokens)

    def forward(self, x: Tensor) -> Tensor:
        b, c, n = x.shape
        y = F.scaled_dot_product_attention(self.c_q(x), self.c_k(x), self.c_v(x), scale=n ** -0.5)
        # pyiqa: (attn @ v).transpose(1, 2).reshape(B, C, N): not a transpose back, a reinterpretation
        return y.transpose(1, 2).reshape(b, c, n) + x


def _window_partition(x: Tensor, ws: int) -> Tensor:
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, c)


def _window_reverse(win: Tensor, ws: int, h: int, w: int) -> Tensor:
    c = win.shape[-1]
    x = win.view(-1, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def _relative_position_index(ws: int) -> Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
    return rel[..., 0] * (2 * ws - 1) + rel[..., 1]


def _shift_mask(res: int, ws: int, shift: int) -> Tensor:
    img = torch.zeros(1, res, res, 1)
    cuts = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
    for label, (hs, vs) in enumerate((hs, vs) for hs in cuts for vs in cuts):
        img[:, hs, vs, :] = label
    win = _window_partition(img, ws).squeeze(-1)
    diff = win.unsqueeze(1) - win.unsqueeze(2)
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


class _WindowAttention(nn.Module):
    def __init__(self, dim: int, ws: int, heads: int):
        super().__init__()
        self.heads = heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, heads))
        self.register_buffer("relative_position_index", _relative_position_index(ws))
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        attn = (q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1) + bias.permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = (attn.view(b // nw, nw, self.heads, n, n) + mask[None, :, None]).view(b, self.heads, n, n)
        x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class _SwinBlock(nn.Module):
    def __init__(self, dim: int, res: int, heads: int, ws: int, shift: int, dim_mlp: int):
        super().__init__()
        if res <= ws:  # Swin: no partition when the window covers the map
            ws, shift = res, 0
        self.res, self.ws, self.shift = res, ws, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _WindowAttention(dim, ws, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _Mlp(dim, dim_mlp)
        self.register_buffer("attn_mask", _shift_mask(res, ws, shift) if shift > 0 else None)

    def forward(self, x: Tensor) -> Tensor:
        b, _, c = x.shape
        h = self.res
        y = self.norm1(x).view(b, h, h, c)
        if self.shift:
            y = torch.roll(y, (-self.shift, -self.shift), dims=(1, 2))
        y = self.attn(_window_partition(y, self.ws), self.attn_mask)
        y = _window_reverse(y, self.ws, h, h)
        if self.shift:
            y = torch.roll(y, (self.shift, self.shift), dims=(1, 2))
        x = x + y.reshape(b, h * h, c)
        return x + self.mlp(self.norm2(x))


class _SwinLayer(nn.Module):
    def __init__(self, dim: int, res: int, depth: int, heads: int, ws: int, dim_mlp: int):
        super().__init__()
        self.res = res
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1)
        self.blocks = nn.ModuleList(
            _SwinBlock(dim, res, heads, ws, 0 if i % 2 == 0 else ws // 2, dim_mlp) for i in range(depth))

    def forward(self, x: Tensor) -> Tensor:
        for blk in self.blocks:
            x = blk(x)
        b, _, c = x.shape
        x = F.relu(self.conv(x.transpose(1, 2).reshape(b, c, self.res, self.res)))
        return x.flatten(2).transpose(1, 2)


class _SwinStage(nn.Module):
    """pyiqa's maniqa_swin.SwinTransformer: (N, C, h, w) -> same shape."""

    def __init__(self, dim: int, cfg: MANIQAConfig, scale: float):
        super().__init__()
        self.scale = scale
        self.downsample = nn.Conv2d(dim, dim, 3, stride=2, padding=1)  # in the file; the forward never uses it
        self.layers = nn.ModuleList(
            _SwinLayer(dim, cfg.grid, d, hd, cfg.window_size, cfg.dim_mlp)
            for d, hd in zip(cfg.swin_depths, cfg.swin_heads, strict=True))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        for layer in self.layers:
            x = self.scale * layer(x) + x
        return x.transpose(1, 2).reshape(b, c, h, w)


def _head(dim: int, last: nn.Module) -> nn.Sequential:
    # indices as pyiqa's Sequential(Linear, ReLU, Dropout, Linear, act): keys .0 and .3
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Identity(), nn.Linear(dim, 1), last)


# ---------------------------------------------------------------- loading

def _build(cfg: MANIQAConfig, scale: float) -> nn.ModuleDict:
    t = cfg.grid ** 2
    d = cfg.embed_dim
    return nn.ModuleDict({
        "vit": _ViT(cfg),
        "tablock1": nn.ModuleList(_TABlock(t) for _ in range(cfg.num_tab)),
        "conv1": nn.Conv2d(d * len(cfg.feature_blocks), d, 1),
        "swintransformer1": _SwinStage(d, cfg, scale),
        "tablock2": nn.ModuleList(_TABlock(t) for _ in range(cfg.num_tab)),
        "conv2": nn.Conv2d(d, d // 2, 1),
        "swintransformer2": _SwinStage(d // 2, cfg, scale),
        "fc_score": _head(d // 2, nn.ReLU()),
        "fc_weight": _head(d // 2, nn.Sigmoid()),
    })


def maniqa_layout(config: MANIQAConfig | None = None) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the state dict the weight file must hold (built on the meta device: no memory)."""
    with torch.device("meta"):
        net = _build(config or MANIQAConfig(), 1.0)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def check_state_dict(sd: Mapping[str, Tensor], config: MANIQAConfig, where: str) -> dict[str, Tensor]:
    """Strict layout check of ``maniqa_layout(config)`` (``weightfile.check_layout``); ``where`` prefixes errors.

    The Swin ``relative_position_index`` buffers must be integer tensors (returned as they are), the rest float
    (returned as float32).
    """
    layout = maniqa_layout(config)
    integer = [k for k in layout if k.endswith("relative_position_index")]
    return check_layout(sd, layout, where, layout_name="pyiqa's MANIQA layout", integer_keys=integer)


class MANIQA(nn.Module):
    """MANIQA(images) -> (B,) quality scores, images (B, 3, H, W) RGB on [0, 1]; pyiqa ``maniqa`` / ``maniqa-pipal``.

    ``variant`` "koniq" (ckpt_koniq10k.pt, scale 0.8) or "pipal" (MANIQA_PIPAL-ae6d356b.pth, scale 0.13); ``scale``
    None takes the variant's; ``test_sample`` crops per image (pyiqa: 20). Frozen, eval mode.
    """

    def __init__(
        self,
        path: str | Path,
        variant: str = "koniq",
        test_sample: int = 20,
        scale: float | None = None,
        config: MANIQAConfig | None = None,
    ):
        super().__init__()
        if variant not in WEIGHT_FILES:
            raise ValueError(f"MANIQA variant must be one of {sorted(WEIGHT_FILES)}, got {variant!r}")
        if isinstance(test_sample, bool) or not isinstance(test_sample, int) or test_sample < 1:
            raise ValueError(f"MANIQA test_sample must be a positive integer, got {test_sample!r}")
        cfg = config or MANIQAConfig()
        if max(cfg.feature_blocks) >= cfg.vit_depth:
            raise ValueError(f"MANIQA config: feature_blocks {cfg.feature_blocks} need a ViT deeper than {cfg.vit_depth}")
        self.variant, self.config, self.test_sample = variant, cfg, test_sample
        self.scale = VARIANT_SCALE[variant] if scale is None else float(scale)

        who = f"MANIQA ({variant})"
        sd = read_state_dict(path, who, expected=WEIGHT_FILES[variant], unwrap=("params",), strip_prefix="module.",
                             pickled_hint=_RESAVE_HINT)
        where = file_label(who, "weight", path)
        sd = check_state_dict(sd, cfg, where)
        for key, t in sd.items():
            if key.endswith("relative_position_index"):
                rows = sd[key[: -len("index")] + "bias_table"].shape[0]
                if t.numel() and (int(t.min()) < 0 or int(t.max()) >= rows):
                    raise ValueError(f"{where}: key '{key}' holds indices outside [0, {rows})")
        sd = {k: v.to(torch.long) if k.endswith("relative_position_index") else v for k, v in sd.items()}

        with torch.device("meta"):  # no random init of ~135M parameters: the file's tensors are assigned
            net = _build(cfg, self.scale)
        net.load_state_dict(sd, strict=True, assign=True)
        for name, module in net.items():
            self.add_module(name, module)
        self.register_buffer("mean", torch.tensor(INCEPTION_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(INCEPTION_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def forward(self, images: Tensor) -> Tensor:
        if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"MANIQA expects images of shape (B, 3, H, W), got {shape}")
        b = images.shape[0]
        g = self.config.grid
        x = (images.to(self.mean.dtype) - self.mean) / self.std
        x = self.vit(uniform_crops(x, self.config.img_size, self.test_sample))  # (B n, g*g, 4 d)
        n = x.shape[0]

        x = x.transpose(1, 2)  # (B n, 4 d, g*g)
        for tab in self.tablock1:
            x = tab(x)
        x = self.swintransformer1(self.conv1(x.reshape(n, -1, g, g)))

        x = x.flatten(2)
        for tab in self.tablock2:
            x = tab(x)
        x = self.swintransformer2(self.conv2(x.reshape(n, -1, g, g)))

        x = x.flatten(2).transpose(1, 2)  # (B n, g*g, d / 2)
        score = self.fc_score(x).reshape(b, -1)
        weight = self.fc_weight(x).reshape(b, -1)
        return (weight * score).sum(dim=-1) / (weight.sum(dim=-1) + 1e-8)

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}, test_sample={self.test_sample}, scale={self.scale}"
