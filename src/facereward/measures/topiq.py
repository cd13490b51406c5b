"""TOPIQ no-reference quality (Chen et al. 2023, "TOPIQ: A Top-down Approach from Semantics to Distortions for Image
Quality Assessment") in plain torch: pyiqa's ``CFANet`` (pyiqa/archs/topiq_arch.py) with ``use_ref=False`` and
``semantic_model_name='resnet50'``, as ``pyiqa.create_metric('topiq_nr')`` / ``('topiq_nr-face')`` build it.

No pyiqa, timm or torchvision: the timm ResNet-50 feature extractor is rebuilt here with timm's key names, so the
released files load unchanged. Nothing is downloaded; the file comes from a local path.

Variants (``WEIGHT_FILES``; both files have the same layout, only the default resize differs):

* ``"koniq"`` (``topiq_nr``): ``cfanet_nr_koniq_res50-9a73138b.pth``, trained on KonIQ-10k; images at their own size.
* ``"face"`` (``topiq_nr-face``): ``topiq_nr_cgfiqa_res50-0a8b8e4f.pth``, trained on CGFIQA-40k;
  ``test_img_size=512``. pyiqa first runs facexlib (RetinaFace detection, 5-point alignment, 512x512 crop, batch size
  1 only) because ``'gfiqa'`` is in its model name; that step is NOT reproduced: inputs must already be aligned face
  crops (as FFHQ-style restorations are). pyiqa's earlier ``topiq_nr_gfiqa_res50-d76bf1ae.pth``
  (``topiq_nr-face-v1``, also ``test_img_size=512``) comes from the same code, so it should load as ``"face"`` too.

Computation, for images ``(B, 3, H, W)`` float RGB on ``[0, 1]`` (the range is not checked; pyiqa asserts it),
as pyiqa's ``CFANet.forward`` in eval mode with its default single crop:

1. Resize (pyiqa >= 0.1.14: ``torchvision.transforms.functional.resize(x, test_img_size, antialias=True)``): an int
   ``s`` sets the shorter side to ``s`` and the longer to ``int(s * long / short)`` (truncated); a ``(h, w)`` pair is
   used as given; bilinear, ``align_corners=False``, antialiased; skipped when the size already matches or
   ``test_img_size`` is None. (pyiqa < 0.1.14 instead resized faces to 512x512 bicubic when ``align_crop_face=False``.)
2. ImageNet normalisation ``(x - (0.485, 0.456, 0.406)) / (0.229, 0.224, 0.225)``.
3. timm ``resnet50`` ``features_only`` taps: ``act1`` (64 ch, stride 2), ``layer1..layer4`` (256, 512, 1024, 2048 ch,
   strides 4..32); BatchNorm always with running statistics (pyiqa's ``fix_bn``), eps 1e-5.
4. For each tap, coarsest first: ``GatedConv`` (1x1 ``splitconv`` to 2C channels, halves ``a, b``;
   ``gelu(a) * sigmoid-gate(b)`` with a 1x1 -> 3x3 -> 3x3 64-channel gate), adaptive average pooling to the layer4
   grid when larger in both dimensions, 1x1 conv to 256 + GELU, plus the learnt 32x32 position embedding
   (``h_emb`` / ``w_emb`` tiled, bicubic-resized to the grid), one pre-norm transformer encoder layer (4 heads,
   FFN 1024, exact GELU).
5. Cross-scale attention, coarse to fine: the layer4 tokens query each finer level in turn through a pre-norm decoder
   layer (LayerNorm on query and memory, cross attention, FFN; its ``self_attn`` weights are in the file but pyiqa
   never calls them); then one more encoder layer (``attn_pool``), the mean over tokens, and the score MLP
   (LN, Linear, GELU, LN, Linear, GELU, Linear -> 1).
6. pyiqa's ``dist_to_mos`` with one class multiplies by 1: the regression output is the score, ``(B,)`` float32,
   higher is better, about ``[0, 1]`` (pyiqa ``score_range '~0, ~1'``; not clamped).

Dropout layers are left out (pyiqa evaluates in eval mode), so ``.train()`` changes nothing. Weights are frozen
(``requires_grad=False``); the score is differentiable in the images.

Accepted file
-------------
Read by :mod:`facereward.measures.weightfile` (``.safetensors`` too). As pyiqa's ``load_pretrained_network(...,
weight_keys='params')``: a ``{'params': state_dict}`` wrapper is unwrapped (other top-level entries ignored) and a
``module.`` key prefix stripped; a flat state dict is accepted too. pyiqa loads the released file strictly into the
whole ``CFANet``, so the state dict is the whole model's, the ResNet-50 included (45,250,054 float32 values, 181.0 MB,
matching the released file's size):

* ``semantic_model.*``: timm resnet50 ``features_only`` (``FeatureListNet``) names: ``conv1.weight``, ``bn1.*``,
  ``layer{1..4}.{j}.conv{1,2,3}.weight``, ``bn{1,2,3}.*``, ``layer{n}.0.downsample.{0,1}.*``; no ``fc``;
* ``weight_pool.{0..4}.splitconv.*`` and ``.weight_blk.{0,2,4}.*``; ``dim_reduce.{0..4}.0.*``;
* ``sa_attn_blks.{0..4}.layers.0.*`` and ``attn_pool.*`` (``self_attn.in_proj_weight/in_proj_bias/out_proj.*``,
  ``linear1``, ``linear2``, ``norm1``, ``norm2``); ``attn_blks.{0..3}.layers.0.*`` (also ``multihead_attn.*``,
  ``norm3``);
* ``score_linear.{0,1,3,4,6}.*``, ``h_emb`` ``(1, 128, 32, 1)``, ``w_emb`` ``(1, 128, 1, 32)``.

Every key must be present with its exact shape and a floating dtype (stored as float32). The BatchNorm
``num_batches_tracked`` counters are ignored (accepted if present, as integer scalars like in the released files,
not required). Any other key is an error.

Options: ``TOPIQNR(path, variant="koniq" | "face", test_img_size="pyiqa" | None | int | (h, w), config=None)``;
``"pyiqa"`` takes the variant's default above; ``config`` (``TOPIQConfig``) only shrinks the model for tests.

Verification (tests/test_topiq.py): checkpoints fabricated in the layout above (written out independently in
tests/topiq_reference.py from pyiqa's and timm's sources; random values, fixed seed) load strictly, and the scores
match a functional float64 re-implementation of pyiqa's forward over the raw state dict (``torch.nn.functional`` only,
attention as ``multi_head_attention_forward``) to 1e-5.

Errors are one line naming the file: ``FileNotFoundError`` for a missing file; ``ValueError`` for an unknown variant
or bad ``test_img_size``, an unreadable / non-dict / pickle-unsafe file, a missing key, a wrong shape or dtype, or an
unexpected key (e.g. a full-reference ``cfanet_fr_*`` file).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facereward.measures.weightfile import check_layout, file_label, read_state_dict

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TEST_IMG_SIZES",
    "TOPIQNR",
    "WEIGHT_FILES",
    "TOPIQConfig",
    "pyiqa_resize",
    "resized_size",
]

# variant -> released pyiqa weight file (default_model_urls in pyiqa/archs/topiq_arch.py)
WEIGHT_FILES: dict[str, str] = {
    "koniq": "cfanet_nr_koniq_res50-9a73138b.pth",
    "face": "topiq_nr_cgfiqa_res50-0a8b8e4f.pth",
}
# variant -> pyiqa default_model_configs test_img_size ('topiq_nr': none, 'topiq_nr-face': 512)
TEST_IMG_SIZES: dict[str, int | None] = {"koniq": None, "face": 512}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImgSize = int | tuple[int, int] | None


@dataclass(frozen=True)
class TOPIQConfig:
    """Architecture sizes; the defaults are the released files' (timm resnet50, inter_dim 256, 4 heads).

    Other values exist only so tests can run small models; no released file has them.
    """

    stem_width: int = 64
    stage_planes: tuple[int, ...] = (64, 128, 256, 512)
    stage_blocks: tuple[int, ...] = (3, 4, 6, 3)
    inter_dim: int = 256
    num_heads: int = 4
    gate_width: int = 64  # GatedConv's hidden width, fixed at 64 in pyiqa
    pos_grid: int = 32  # h_emb / w_emb grid

    @property
    def feature_dims(self) -> tuple[int, ...]:
        return (self.stem_width,) + tuple(4 * p for p in self.stage_planes)

    @property
    def ffn_dim(self) -> int:
        return min(4 * self.inter_dim, 2048)


# ----------------------------------------------------------------------------------------------------------------
# preprocessing
# ----------------------------------------------------------------------------------------------------------------


def _check_img_size(size: ImgSize) -> ImgSize:
    if size is None:
        return None
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    if (
        isinstance(size, (tuple, list))
        and len(size) == 2
        and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)
    ):
        return (int(size[0]), int(size[1]))
    raise ValueError(f"TOPIQ test_img_size must be None, a positive int (shorter side) or (h, w), got {size!r}")


def resized_size(height: int, width: int, size: int | tuple[int, int]) -> tuple[int, int]:
    """torchvision ``resize`` output size: an int sets the shorter side (longer one truncated), a pair is (h, w)."""
    if not isinstance(size, int):
        return (size[0], size[1])
    if width <= height:
        return (int(size * height / width), size)
    return (size, int(size * width / height))


def pyiqa_resize(images: Tensor, size: ImgSize) -> Tensor:
    """pyiqa's test-time resize: bilinear, antialiased, ``align_corners=False``; a no-op at the same size or for None."""
    if size is None:
        return images
    out = resized_size(images.shape[-2], images.shape[-1], size)
    if out == tuple(images.shape[-2:]):
        return images
    return F.interpolate(images, size=out, mode="bilinear", align_corners=False, antialias=True)


# ----------------------------------------------------------------------------------------------------------------
# timm resnet50 features (key names of timm.create_model('resnet50', features_only=True))
# ----------------------------------------------------------------------------------------------------------------


class _FrozenBatchNorm(nn.Module):
    """BatchNorm2d keys (weight, bias, running_mean, running_var) that always normalises with running statistics."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class _Bottleneck(nn.Module):
    """timm ``Bottleneck`` (stride on the 3x3 conv, 1x1 conv + BN projection shortcut when the shape changes)."""

    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        cout = 4 * planes
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = _FrozenBatchNorm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = _FrozenBatchNorm(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = _FrozenBatchNorm(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), _FrozenBatchNorm(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class _ResNetFeatures(nn.Module):
    """ResNet stem + four stages; returns the five timm ``features_only`` taps (act1, layer1..layer4)."""

    def __init__(self, cfg: TOPIQConfig):
        super().__init__()
        self.conv1 = nn.Conv2d(3, cfg.stem_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = _FrozenBatchNorm(cfg.stem_width)
        cin = cfg.stem_width
        for n, (planes, blocks) in enumerate(zip(cfg.stage_planes, cfg.stage_blocks)):
            stride = 1 if n == 0 else 2
            stage = []
            for j in range(blocks):
                stage.append(_Bottleneck(cin, planes, stride if j == 0 else 1))
                cin = 4 * planes
            setattr(self, f"layer{n + 1}", nn.Sequential(*stage))
        self.num_stages = len(cfg.stage_planes)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = F.relu(self.bn1(self.conv1(x)))
        feats = [x]
        x = F.max_pool2d(x, 3, stride=2, padding=1)
        for n in range(self.num_stages):
            x = getattr(self, f"layer{n + 1}")(x)
            feats.append(x)
        return feats


# ----------------------------------------------------------------------------------------------------------------
# CFANet (NR) head
# ----------------------------------------------------------------------------------------------------------------


class _Attention(nn.Module):
    """``nn.MultiheadAttention``'s parameters and key names (packed q/k/v ``in_proj``, ``out_proj``), sequence-first
    ``(L, B, D)`` tokens, keys and values from the same tensor, no dropout."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, query: Tensor, memory: Tensor) -> Tensor:
        n_q, batch, dim = query.shape
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)

        def heads(t: Tensor) -> Tensor:  # (L, B, D) -> (B, heads, L, D / heads)
            return t.reshape(t.shape[0], batch, self.heads, dim // self.heads).permute(1, 2, 0, 3)

        q, k, v = heads(F.linear(query, wq, bq)), heads(F.linear(memory, wk, bk)), heads(F.linear(memory, wv, bv))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.permute(2, 0, 1, 3).reshape(n_q, batch, dim))


class _EncoderLayer(nn.Module):
    """pyiqa ``TransformerEncoderLayer`` (always pre-norm): x + attn(LN1 x); x + FFN(LN2 x)."""

    def __init__(self, dim: int, heads: int, ffn: int):
        super().__init__()
        self.self_attn = _Attention(dim, heads)
        self.linear1 = nn.Linear(dim, ffn)
        self.linear2 = nn.Linear(ffn, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.self_attn(h, h)
        return x + self.linear2(F.gelu(self.linear1(self.norm2(x))))


class _DecoderLayer(nn.Module):
    """pyiqa ``TransformerDecoderLayer``: q + attn(LN1 q, LN2 memory); q + FFN(LN3 q). ``self_attn`` is unused."""

    def __init__(self, dim: int, heads: int, ffn: int):
        super().__init__()
        self.self_attn = _Attention(dim, heads)
        self.multihead_attn = _Attention(dim, heads)
        self.linear1 = nn.Linear(dim, ffn)
        self.linear2 = nn.Linear(ffn, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, query: Tensor, memory: Tensor) -> Tensor:
        query = query + self.multihead_attn(self.norm1(query), self.norm2(memory))
        return query + self.linear2(F.gelu(self.linear1(self.norm3(query))))


class _Stack(nn.Module):
    """pyiqa ``TransformerEncoder`` / ``TransformerDecoder`` with its one layer (``layers.0``)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layers = nn.ModuleList([layer])

    def forward(self, *args: Tensor) -> Tensor:
        return self.layers[0](*args)


class _GatedConv(nn.Module):
    """pyiqa ``GatedConv``: gelu(a) * gate(b) with (a, b) the halves of a 1x1 conv to 2C channels."""

    def __init__(self, dim: int, width: int):
        super().__init__()
        self.splitconv = nn.Conv2d(dim, 2 * dim, 1)
        self.weight_blk = nn.Sequential(
            nn.Conv2d(dim, width, 1),
            nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(width, 1, 3, padding=1),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.splitconv(x).chunk(2, dim=1)
        return F.gelu(a) * self.weight_blk(b)


# ----------------------------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------------------------


def _fr_hint(key: str, sd: dict[str, Tensor]) -> str:
    return "this looks like a full-reference CFANet (topiq_fr) file" if "weight_pool.0.0.weight" in sd else ""


# ----------------------------------------------------------------------------------------------------------------
# the measure
# ----------------------------------------------------------------------------------------------------------------


class TOPIQNR(nn.Module):
    """TOPIQ-NR score of ``(B, 3, H, W)`` images on ``[0, 1]``; ``forward(images) -> (B,)``, higher is better.

    ``TOPIQNR(path, "koniq")`` or ``TOPIQNR(path, "face")`` (aligned face crops); ``test_img_size="pyiqa"`` takes
    the variant's pyiqa default (None / 512), or give None, a shorter-side int or an ``(h, w)`` pair.
    """

    def __init__(
        self,
        path: str | Path,
        variant: str = "koniq",
        test_img_size: ImgSize | str = "pyiqa",
        config: TOPIQConfig | None = None,
    ):
        super().__init__()
        if variant not in WEIGHT_FILES:
            raise ValueError(f"TOPIQ: unknown variant {variant!r}; choose one of {', '.join(map(repr, WEIGHT_FILES))}")
        self.variant = variant
        self.test_img_size = TEST_IMG_SIZES[variant] if test_img_size == "pyiqa" else _check_img_size(test_img_size)
        cfg = config or TOPIQConfig()
        self.config = cfg
        sd = read_state_dict(path, "TOPIQ", "weights", expected=WEIGHT_FILES[variant], unwrap=("params",),
                             strip_prefix="module.")

        # Build on the meta device (no init cost), then take the checked tensors as the parameters.
        with torch.device("meta"):
            d, heads, ffn = cfg.inter_dim, cfg.num_heads, cfg.ffn_dim
            self.semantic_model = _ResNetFeatures(cfg)
            self.weight_pool = nn.ModuleList(_GatedConv(c, cfg.gate_width) for c in cfg.feature_dims)
            self.dim_reduce = nn.ModuleList(nn.Sequential(nn.Conv2d(c, d, 1), nn.GELU()) for c in cfg.feature_dims)
            self.sa_attn_blks = nn.ModuleList(_Stack(_EncoderLayer(d, heads, ffn)) for _ in cfg.feature_dims)
            self.attn_blks = nn.ModuleList(_Stack(_DecoderLayer(d, heads, ffn)) for _ in cfg.feature_dims[1:])
            self.attn_pool = _EncoderLayer(d, heads, ffn)
            self.score_linear = nn.Sequential(
                nn.LayerNorm(d), nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d), nn.Linear(d, d), nn.GELU(), nn.Linear(d, 1)
            )
            self.h_emb = nn.Parameter(torch.empty(1, d // 2, cfg.pos_grid, 1))
            self.w_emb = nn.Parameter(torch.empty(1, d // 2, 1, cfg.pos_grid))
        layout = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        counters = [  # BatchNorm num_batches_tracked: in the released files, never used; checked if present, dropped
            f"semantic_model.{name}.num_batches_tracked"
            for name, m in self.semantic_model.named_modules()
            if isinstance(m, _FrozenBatchNorm)
        ]
        checked = check_layout(
            sd, layout | dict.fromkeys(counters, ()), file_label("TOPIQ", "weights", path),
            layout_name="pyiqa's CFANet NR resnet50 layout", integer_keys=counters, optional=counters, hint=_fr_hint,
        )
        for key in counters:
            checked.pop(key, None)
        self.load_state_dict(checked, strict=True, assign=True)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def preprocess(self, images: Tensor) -> Tensor:
        """[0, 1] RGB -> pyiqa's test-time resize, then ImageNet normalisation (float32)."""
        if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"TOPIQ expects images of shape (B, 3, H, W) in [0, 1], got {shape}")
        x = pyiqa_resize(images.to(self.mean.dtype), self.test_img_size)
        return (x - self.mean) / self.std

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) on [0, 1] -> (B,) float32 TOPIQ-NR scores (about [0, 1], higher is better)."""
        feats = self.semantic_model(self.preprocess(images))
        th, tw = feats[-1].shape[-2:]
        grid_h, grid_w = self.h_emb.shape[2], self.w_emb.shape[3]
        pos = torch.cat([self.h_emb.expand(-1, -1, -1, grid_w), self.w_emb.expand(-1, -1, grid_h, -1)], dim=1)

        tokens = []  # per level, coarsest first: (L, B, D)
        for i in reversed(range(len(feats))):
            f = self.weight_pool[i](feats[i])
            if f.shape[2] > th and f.shape[3] > tw:
                f = F.adaptive_avg_pool2d(f, (th, tw))
            f = self.dim_reduce[i](f) + F.interpolate(pos, size=f.shape[-2:], mode="bicubic", align_corners=False)
            tokens.append(self.sa_attn_blks[i](f.flatten(2).permute(2, 0, 1)))

        query = tokens[0]
        for blk, memory in zip(self.attn_blks, tokens[1:]):
            query = blk(query, memory)
        pooled = self.attn_pool(query).mean(dim=0)
        return self.score_linear(pooled)[:, 0]  # dist_to_mos with one class is the identity

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}, test_img_size={self.test_img_size!r}"
