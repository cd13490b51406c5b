"""MUSIQ (Ke et al. 2021, "MUSIQ: Multi-scale Image Quality Transformer") as pyiqa's ``MUSIQ`` arch runs it.

A no-reference quality score, in plain torch (no pyiqa, timm or torchvision), numerically the same as
``pyiqa.create_metric("musiq" | "musiq-spaq" | "musiq-paq2piq" | "musiq-ava")`` (pyiqa/archs/musiq_arch.py,
pyiqa/data/multiscale_trans_util.py, pyiqa/matlab_utils ``ExactPadding2d``) on the same input.

Computation, for images ``(B, 3, H, W)`` float RGB on ``[0, 1]`` (all images of a batch share H, W):

1. ``x = 2 * (x - 0.5)``: ``[-1, 1]``, as the official TF code feeds it.
2. Multi-scale patches. For each longer-side length ``L`` of ``sorted(longer_side_lengths)`` (default
   ``(224, 384)``), scale id ``s = 0, 1, ...``: resize to ``round(H * L / max(H, W)) x round(W * L / max(H, W))``
   (Python ``round``, i.e. half to even) with ``F.interpolate(mode="bicubic", align_corners=False)``, no
   antialiasing, no clamping (also when the size is unchanged); then the original-resolution image as the
   last scale (``max_seq_len_from_original_res``: ``-1``, the default, keeps all its patches; ``n >= 0``
   pads/cuts to ``n``; ``None`` leaves it out).
   Each scale image is zero-padded TF-'SAME' style to a multiple of 32 (``pad = ceil(h/32)*32 - h``, split
   ``pad // 2`` before, the rest after) and cut into non-overlapping 32x32 patches in row-major order.
   Each patch gets a hashed spatial position ``gh(i) * G + gw(j)`` (grid ``G = 10``), with ``g(k) =
   min(floor(k * float32(G / count)), G - 1)`` - torch's 'nearest' interpolation of ``arange(G)`` to
   ``count`` entries, float32 rounding included - and its scale id. The resized scales are padded with
   zero patches (position 0, scale 0, mask off) to ``ceil(L / 32) ** 2`` tokens.
3. Per patch, a BiT ResNet stem: weight-standardised 7x7/2 conv (``(w - mean) / (std + 1e-5)``, torch's
   unbiased std, no bias, zero 'SAME' padding), GroupNorm(32, eps 1e-6), ReLU, zero 'SAME' pad + 3x3/2
   max-pool, one bottleneck (1x1, 3x3, 1x1 weight-standardised convs with GroupNorm(32, eps 1e-4), 64 -> 256
   channels, projected shortcut) -> ``(8, 8, 256)`` flattened in HWC order (TF's) -> ``Linear(16384, 384)``.
4. Transformer encoder: add hashed position embeddings ``(1, G*G, 384)`` and scale embeddings ``(3, 384)``,
   prepend the CLS token, 14 pre-norm blocks (LayerNorm eps 1e-6; 6-head attention whose scores are set
   to ``-1000`` (not ``-inf``) wherever the query or the key is a padding token; MLP 384 -> 1152 -> 384,
   exact GELU), final LayerNorm.
5. Head on the CLS token: ``Linear(384, 1)`` -> the score for ``koniq10k`` / ``spaq`` / ``paq2piq``
   (ranges about 0..100); ``ava``: ``Linear(384, 10)``, softmax, ``sum_i i * p_i`` (pyiqa's
   ``dist_to_mos``) -> a mean opinion score in [1, 10]. Higher is better. Output ``(B,)`` float32.

The whole chain is differentiable in the images; the weights are frozen (``requires_grad=False``) and the
module is in eval mode (pyiqa applies steps 1-2 only in eval mode).

Weight files (pyiqa's converted TF checkpoints; ``WEIGHT_FILES``): ``musiq_koniq_ckpt-e95806b9.pth``,
``musiq_spaq_ckpt-358bb6af.pth``, ``musiq_paq2piq_ckpt-364c0c84.pth``, ``musiq_ava_ckpt-e8d3f067.pth``.
Each is a flat ``{name: tensor}`` state dict of pyiqa's ``MUSIQ`` (``torch.save(model.state_dict())`` in
pyiqa/scripts/convert_musiq_to_pth.py), no wrapper; a ``.safetensors`` file with the same tensors is accepted
too, and a ``module.`` key prefix is stripped, as pyiqa's loader does (reading rules:
:mod:`facereward.measures.weightfile`). Key layout (``key_layout(variant)``):
``conv_root.weight (64, 3, 7, 7)``, ``gn_root.{weight,bias}``, ``block1.{conv1,conv2,conv3,conv_proj}.weight``,
``block1.{gn1,gn2,gn3,gn_proj}.{weight,bias}``, ``embedding.{weight,bias}`` (``(384, 16384)``),
``transformer_encoder.{posembed_input.position_emb (1, 100, 384), scaleembed_input.scale_emb (3, 384),
cls (1, 1, 384), encoder_norm.*}``, ``transformer_encoder.transformer.encoderblock_{0..13}.{norm1, norm2,
attention.{query,key,value,out}, mlp.{fc1,fc2}}.{weight,bias}``, and the head: ``head.weight (1, 384)`` /
``head.bias (1,)``, or for ``ava`` ``head.0.weight (10, 384)`` / ``head.0.bias (10,)``. The three 1-output
files share one layout, so the variant name cannot be checked against the file; only ``ava`` differs.

Errors are one line naming the file: ``FileNotFoundError`` for a missing file; ``ValueError`` for an
unreadable / non-dict / pickle-unsafe file, a missing key, an unexpected key, a wrong shape or a non-float
tensor; ``ValueError`` for an unknown variant or a bad input shape.

Parity: tests/test_musiq.py checks this module against tests/musiq_reference.py, an independent functional
re-derivation of pyiqa's forward (its concatenated patch/position/scale/mask encoding built with
``F.unfold`` and nearest ``F.interpolate``, then ``F.conv2d`` / ``F.group_norm`` / ``F.layer_norm`` ops on
the raw state dict), on checkpoints fabricated in the released key layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from facereward.measures.weightfile import check_layout, file_label, read_state_dict

__all__ = ["MUSIQ", "MUSIQConfig", "WEIGHT_FILES", "SCORE_RANGES", "VARIANTS", "key_layout", "load_musiq"]

WEIGHT_FILES: dict[str, str] = {
    "koniq10k": "musiq_koniq_ckpt-e95806b9.pth",
    "spaq": "musiq_spaq_ckpt-358bb6af.pth",
    "paq2piq": "musiq_paq2piq_ckpt-364c0c84.pth",
    "ava": "musiq_ava_ckpt-e8d3f067.pth",
}
VARIANTS = tuple(WEIGHT_FILES)
# pyiqa default_model_configs score_range (musiq, musiq-spaq, musiq-paq2piq, musiq-ava)
SCORE_RANGES: dict[str, tuple[float, float]] = {
    "koniq10k": (0.0, 100.0),
    "spaq": (0.0, 100.0),
    "paq2piq": (0.0, 100.0),
    "ava": (1.0, 10.0),
}
_NUM_CLASS = {"koniq10k": 1, "spaq": 1, "paq2piq": 1, "ava": 10}

_STEM_DIM = 64  # resnet_token_dim
_MASK_FILL = -1e3  # pyiqa's attention fill value for padding tokens


@dataclass(frozen=True)
class MUSIQConfig:
    """Architecture and multi-scale options; the defaults are pyiqa's (and the released files')."""

    patch_size: int = 32
    hidden_size: int = 384
    mlp_dim: int = 1152
    num_heads: int = 6
    num_layers: int = 14
    num_scales: int = 3
    grid_size: int = 10  # spatial_pos_grid_size of the hashed position embedding
    longer_side_lengths: tuple[int, ...] = (224, 384)
    max_seq_len_from_original_res: int | None = -1
    num_class: int = 1

    @property
    def token_dim(self) -> int:
        """Embedding input: the stem's (patch/4)^2 x 256 feature map, flattened."""
        return _STEM_DIM * 4 * (self.patch_size // 4) ** 2


def _check_variant(variant: str) -> str:
    if variant not in _NUM_CLASS:
        raise ValueError(f"MUSIQ: unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    return variant


def _variant_config(variant: str, config: MUSIQConfig | None) -> MUSIQConfig:
    cfg = config if config is not None else MUSIQConfig()
    return replace(cfg, num_class=_NUM_CLASS[_check_variant(variant)])


def key_layout(variant: str = "koniq10k", config: MUSIQConfig | None = None) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a pyiqa MUSIQ state dict for ``variant`` (real dims unless ``config`` says otherwise)."""
    cfg = _variant_config(variant, config)
    d, m, s = cfg.hidden_size, cfg.mlp_dim, _STEM_DIM
    layout: dict[str, tuple[int, ...]] = {
        "conv_root.weight": (s, 3, 7, 7),
        "gn_root.weight": (s,),
        "gn_root.bias": (s,),
        "block1.conv1.weight": (s, s, 1, 1),
        "block1.conv2.weight": (s, s, 3, 3),
        "block1.conv3.weight": (4 * s, s, 1, 1),
        "block1.conv_proj.weight": (4 * s, s, 1, 1),
    }
    for name, c in (("gn1", s), ("gn2", s), ("gn3", 4 * s), ("gn_proj", 4 * s)):
        layout[f"block1.{name}.weight"] = (c,)
        layout[f"block1.{name}.bias"] = (c,)
    layout["embedding.weight"] = (d, cfg.token_dim)
    layout["embedding.bias"] = (d,)
    te = "transformer_encoder"
    layout[f"{te}.posembed_input.position_emb"] = (1, cfg.grid_size**2, d)
    layout[f"{te}.scaleembed_input.scale_emb"] = (cfg.num_scales, d)
    layout[f"{te}.cls"] = (1, 1, d)
    for i in range(cfg.num_layers):
        b = f"{te}.transformer.encoderblock_{i}"
        for ln in ("norm1", "norm2"):
            layout[f"{b}.{ln}.weight"] = (d,)
            layout[f"{b}.{ln}.bias"] = (d,)
        for proj in ("query", "key", "value", "out"):
            layout[f"{b}.attention.{proj}.weight"] = (d, d)
            layout[f"{b}.attention.{proj}.bias"] = (d,)
        layout[f"{b}.mlp.fc1.weight"] = (m, d)
        layout[f"{b}.mlp.fc1.bias"] = (m,)
        layout[f"{b}.mlp.fc2.weight"] = (d, m)
        layout[f"{b}.mlp.fc2.bias"] = (d,)
    layout[f"{te}.encoder_norm.weight"] = (d,)
    layout[f"{te}.encoder_norm.bias"] = (d,)
    head = "head.0" if cfg.num_class > 1 else "head"
    layout[f"{head}.weight"] = (cfg.num_class, d)
    layout[f"{head}.bias"] = (cfg.num_class,)
    return layout


# ---------------------------------------------------------------- preprocessing


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF 'SAME' padding (before, after) along one axis: output ceil(size / stride), the odd pixel after."""
    total = (math.ceil(size / stride) - 1) * stride + kernel - size
    return total // 2, total - total // 2


def _pad_same(x: Tensor, kernel: int, stride: int) -> Tensor:
    top, bottom = same_padding(x.shape[-2], kernel, stride)
    left, right = same_padding(x.shape[-1], kernel, stride)
    return F.pad(x, (left, right, top, bottom))


def resized_size(h: int, w: int, longer_side: int) -> tuple[int, int]:
    """Aspect-preserving size with the longer side ``longer_side`` (Python round: half to even)."""
    ratio = longer_side / max(h, w)
    return round(h * ratio), round(w * ratio)


def hash_grid_index(count: int, grid_size: int) -> Tensor:
    """Grid cell of each of ``count`` patches along one axis: torch 'nearest' resampling of range(grid_size)."""
    step = torch.tensor(grid_size / count, dtype=torch.float32)  # torch computes the scale in float32
    idx = torch.floor(torch.arange(count, dtype=torch.float32) * step).long()
    return idx.clamp_(max=grid_size - 1)


def hashed_positions(count_h: int, count_w: int, grid_size: int) -> Tensor:
    """Row-major ``(count_h * count_w,)`` spatial position ids ``gh * grid_size + gw`` in [0, grid_size^2)."""
    gh = hash_grid_index(count_h, grid_size)
    gw = hash_grid_index(count_w, grid_size)
    return (gh[:, None] * grid_size + gw[None, :]).reshape(-1)


@dataclass
class _Tokens:
    patches: Tensor  # (B, N, 3, p, p)
    positions: Tensor  # (N,) long
    scales: Tensor  # (N,) long
    mask: Tensor  # (N,) bool, False on padding tokens


def _patchify(x: Tensor, p: int, grid_size: int, scale_id: int, max_len: int) -> _Tokens:
    """Zero-'SAME'-pad to a multiple of p, cut row-major p x p patches, pad/cut to ``max_len`` (-1: keep all)."""
    b, c, h, w = x.shape
    nh, nw = math.ceil(h / p), math.ceil(w / p)
    x = _pad_same(x, p, p)
    patches = x.reshape(b, c, nh, p, nw, p).permute(0, 2, 4, 1, 3, 5).reshape(b, nh * nw, c, p, p)
    pos = hashed_positions(nh, nw, grid_size).to(x.device)
    scales = torch.full_like(pos, scale_id)
    mask = torch.ones_like(pos, dtype=torch.bool)
    if max_len >= 0:
        n = nh * nw
        if n < max_len:
            extra = max_len - n
            patches = torch.cat([patches, patches.new_zeros(b, extra, c, p, p)], dim=1)
            pos = torch.cat([pos, pos.new_zeros(extra)])
            scales = torch.cat([scales, scales.new_zeros(extra)])
            mask = torch.cat([mask, mask.new_zeros(extra)])
        patches, pos, scales, mask = patches[:, :max_len], pos[:max_len], scales[:max_len], mask[:max_len]
    return _Tokens(patches, pos, scales, mask)


def multiscale_tokens(x: Tensor, cfg: MUSIQConfig) -> _Tokens:
    """``[-1, 1]`` images (B, 3, H, W) -> the concatenated tokens of all scales (pyiqa's get_multiscale_patches)."""
    _, _, h, w = x.shape
    p = cfg.patch_size
    parts: list[_Tokens] = []
    lengths = sorted(cfg.longer_side_lengths)
    for scale_id, side in enumerate(lengths):
        rh, rw = resized_size(h, w, side)
        if rh < 1 or rw < 1:
            raise ValueError(f"MUSIQ: image {h}x{w} is too elongated to resize to longer side {side}")
        resized = F.interpolate(x, size=(rh, rw), mode="bicubic", align_corners=False)
        parts.append(_patchify(resized, p, cfg.grid_size, scale_id, math.ceil(side / p) ** 2))
    if cfg.max_seq_len_from_original_res is not None:
        parts.append(_patchify(x, p, cfg.grid_size, len(lengths), cfg.max_seq_len_from_original_res))
    return _Tokens(
        torch.cat([t.patches for t in parts], dim=1),
        torch.cat([t.positions for t in parts]),
        torch.cat([t.scales for t in parts]),
        torch.cat([t.mask for t in parts]),
    )


# ---------------------------------------------------------------- network


class StdConv2d(nn.Module):
    """Bias-free conv with weight standardisation and zero TF-'SAME' padding (BiT / pyiqa ``StdConv``)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cout, cin, kernel, kernel))
        self.kernel, self.stride = kernel, stride

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(_pad_same(x, self.kernel, self.stride), w, stride=self.stride)


class _Bottleneck(nn.Module):
    """BiT bottleneck 64 -> 256 at stride 1 with a projected shortcut (pyiqa ``block1``)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = StdConv2d(cin, cin, 1)
        self.gn1 = nn.GroupNorm(32, cin, eps=1e-4)
        self.conv2 = StdConv2d(cin, cin, 3)
        self.gn2 = nn.GroupNorm(32, cin, eps=1e-4)
        self.conv3 = StdConv2d(cin, cout, 1)
        self.gn3 = nn.GroupNorm(32, cout, eps=1e-4)
        self.conv_proj = StdConv2d(cin, cout, 1)
        self.gn_proj = nn.GroupNorm(32, cout, eps=1e-4)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = self.gn_proj(self.conv_proj(x))
        y = F.relu(self.gn1(self.conv1(x)))
        y = F.relu(self.gn2(self.conv2(y)))
        return F.relu(self.gn3(self.conv3(y)) + shortcut)


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"MUSIQ: hidden_size {dim} is not divisible by num_heads {heads}")
        self.heads = heads
        self.query, self.key, self.value, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        """``keep``: (N, N) bool, False where the query or the key is a padding token."""
        b, n, d = x.shape

        def split(t: Tensor) -> Tensor:
            return t.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = (q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5
        attn = scores.masked_fill(~keep, _MASK_FILL).softmax(dim=-1)
        return self.out((attn @ v).transpose(1, 2).reshape(b, n, d))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim: int, mlp_dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attention = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, mlp_dim)

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        x = x + self.attention(self.norm1(x), keep)
        return x + self.mlp(self.norm2(x))


class _PositionEmb(nn.Module):
    def __init__(self, grid_size: int, dim: int):
        super().__init__()
        self.position_emb = nn.Parameter(torch.zeros(1, grid_size * grid_size, dim))


class _ScaleEmb(nn.Module):
    def __init__(self, num_scales: int, dim: int):
        super().__init__()
        self.scale_emb = nn.Parameter(torch.zeros(num_scales, dim))


class _Encoder(nn.Module):
    def __init__(self, cfg: MUSIQConfig):
        super().__init__()
        d = cfg.hidden_size
        self.posembed_input = _PositionEmb(cfg.grid_size, d)
        self.scaleembed_input = _ScaleEmb(cfg.num_scales, d)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.encoder_norm = nn.LayerNorm(d, eps=1e-6)
        self.transformer = nn.ModuleDict(
            {f"encoderblock_{i}": _Block(d, cfg.mlp_dim, cfg.num_heads) for i in range(cfg.num_layers)}
        )

    def forward(self, x: Tensor, positions: Tensor, scales: Tensor, mask: Tensor) -> Tensor:
        x = x + self.posembed_input.position_emb[0, positions] + self.scaleembed_input.scale_emb[scales]
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        valid = torch.cat([mask.new_ones(1), mask])
        keep = valid[:, None] & valid[None, :]
        for block in self.transformer.values():
            x = block(x, keep)
        return self.encoder_norm(x)


class MUSIQ(nn.Module):
    """MUSIQ no-reference score: images (B, 3, H, W) on [0, 1] -> (B,) float32, higher is better.

    ``MUSIQ.from_pretrained(path, variant)`` loads a released pyiqa file; ``MUSIQ(variant)`` builds the
    zero-initialised network (see the module docstring for the computation and the key layout).
    """

    def __init__(self, variant: str = "koniq10k", config: MUSIQConfig | None = None):
        super().__init__()
        self.variant = _check_variant(variant)
        cfg = self.config = _variant_config(variant, config)
        n_scales = len(cfg.longer_side_lengths) + (cfg.max_seq_len_from_original_res is not None)
        if n_scales > cfg.num_scales:
            raise ValueError(f"MUSIQ: {n_scales} scales requested but the scale embedding has {cfg.num_scales}")
        if cfg.patch_size % 4:
            raise ValueError(f"MUSIQ: patch_size must be a multiple of 4, got {cfg.patch_size}")
        self.conv_root = StdConv2d(3, _STEM_DIM, 7, 2)
        self.gn_root = nn.GroupNorm(32, _STEM_DIM, eps=1e-6)
        self.block1 = _Bottleneck(_STEM_DIM, 4 * _STEM_DIM)
        self.embedding = nn.Linear(cfg.token_dim, cfg.hidden_size)
        self.transformer_encoder = _Encoder(cfg)
        linear = nn.Linear(cfg.hidden_size, cfg.num_class)
        self.head = nn.Sequential(linear) if cfg.num_class > 1 else linear  # keys head.0.* vs head.*
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_pretrained(
        cls, path: str | Path, variant: str = "koniq10k", config: MUSIQConfig | None = None
    ) -> MUSIQ:
        """Load a pyiqa MUSIQ weight file for ``variant`` strictly (one-line errors naming the file)."""
        model = cls(variant, config)
        who = f"MUSIQ ({variant})"
        sd = read_state_dict(path, who, expected=WEIGHT_FILES[variant], strip_prefix="module.")
        state = check_layout(
            sd, key_layout(variant, model.config), file_label(who, "weight", path),
            layout_name=f"pyiqa's MUSIQ layout for variant '{variant}'", hint=_head_hint,
        )
        model.load_state_dict(state, strict=True)
        return model

    def stem(self, patches: Tensor) -> Tensor:
        """(M, 3, p, p) patches -> (M, (p/4)^2 * 256) tokens flattened in HWC order (the TF layout)."""
        x = F.relu(self.gn_root(self.conv_root(patches)))
        x = F.max_pool2d(_pad_same(x, 3, 2), 3, 2)
        x = self.block1(x)
        return x.permute(0, 2, 3, 1).flatten(1)

    def forward(self, images: Tensor) -> Tensor:
        if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"MUSIQ expects images of shape (B, 3, H, W) in [0, 1], got {shape}")
        dtype = self.embedding.weight.dtype
        x = (images.to(dtype) - 0.5) * 2
        tok = multiscale_tokens(x, self.config)
        b, n = tok.patches.shape[:2]
        feats = self.embedding(self.stem(tok.patches.flatten(0, 1)).reshape(b, n, -1))
        out = self.transformer_encoder(feats, tok.positions, tok.scales, tok.mask)
        logits = self.head(out[:, 0])
        if self.config.num_class == 1:
            return logits[:, 0]
        probs = logits.softmax(dim=-1)  # dist_to_mos: the expected class index 1..C
        return probs @ torch.arange(1, self.config.num_class + 1, dtype=probs.dtype, device=probs.device)

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}"


def load_musiq(path: str | Path, variant: str = "koniq10k", config: MUSIQConfig | None = None) -> MUSIQ:
    """A frozen, eval-mode :class:`MUSIQ` from a local pyiqa weight file."""
    return MUSIQ.from_pretrained(path, variant, config)


# ---------------------------------------------------------------- loading


def _head_hint(key: str, sd: dict[str, Tensor]) -> str:
    """For a missing head key: the file may be the other head's (ava's 10 classes vs the 1-output files)."""
    if key in sd or not key.startswith("head."):
        return ""
    if key.startswith("head.0"):
        return "a 1-output file? use koniq10k/spaq/paq2piq"
    return "an ava file? use variant='ava'" if "head.0.weight" in sd else ""

