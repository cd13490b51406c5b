"""DISTS full-reference distance (Ding et al. 2020, "Image Quality Assessment: Unifying Structure and Texture
Similarity") in plain torch, as ``pyiqa.create_metric("dists")`` computes it (pyiqa/archs/dists_arch.py, itself the
authors' DISTS_pytorch/DISTS_pt.py).

No torchvision and no pyiqa: the VGG16 ``features`` stack is rebuilt with torchvision's module indices (through
:mod:`facereward.measures.lpips`, which owns the VGG16 layout and its file loader), so torchvision's ImageNet file
loads unchanged. Nothing is downloaded; both files come from local paths the user names.

Computation (for ``x`` the restored image and ``gt`` the reference; the formula is symmetric in the two):

1. Inputs: ``(B, 3, H, W)`` float RGB on ``[0, 1]``, same shape, any ``H, W >= 1``. No resizing and no cropping:
   neither pyiqa's arch nor its ``InferenceModel`` resizes (the authors' demo script's "shorter side to 256 when
   larger" is a PIL step of that script only, not part of pyiqa's metric), and ``as_loss`` only turns gradients on.
2. ImageNet normalisation ``(z - [.485, .456, .406]) / [.229, .224, .225]`` feeds the backbone.
3. VGG16 ``features[0:30]`` with each 2x2 max-pool (indices 4, 9, 16, 23) replaced by an L2 pooling:
   ``sqrt(conv2d(z^2, h) + 1e-12)`` depthwise, stride 2, padding 1, with ``h`` the 3x3 kernel
   ``outer(w, w) / sum``, ``w = hanning(5)[1:-1] = [.5, 1, .5]`` (i.e. ``[[1,2,1],[2,4,2],[1,2,1]] / 16``).
   The final max-pool (index 30) is never used.
4. Six taps: the raw, un-normalised input (stage 0, 3 channels) and the ReLU outputs ``relu1_2, relu2_2, relu3_3,
   relu4_3, relu5_3`` (``features`` indices 3, 8, 15, 22, 29; 64, 128, 256, 512, 512 channels): 1475 channels.
5. Per tap and channel, over all H, W positions (biased moments): structure ``S1 = (2 mx my + c1) / (mx^2 + my^2 +
   c1)`` and texture ``S2 = (2 cov_xy + c2) / (var_x + var_y + c2)`` with ``cov_xy = mean(x y) - mx my``,
   ``c1 = c2 = 1e-6``.
6. ``D = 1 - sum_c (alpha_c S1_c + beta_c S2_c) / (sum alpha + sum beta)``: one distance per image, shape ``(B,)``
   (pyiqa returns ``(B, 1)``), 0 for identical images, lower is better, pyiqa's score range ``[0, 1]``.
   Differentiable in ``x`` and ``gt`` (usable as a loss); every weight is frozen and the module is in eval mode.
   Computed in the module's dtype (float32 unless moved).

Accepted files
--------------
Read by :mod:`facereward.measures.weightfile` (``.safetensors`` or ``torch.load(weights_only=True)``; pickled code
refused): a flat ``{name: tensor}`` dict, no wrapper and no key prefix stripped, float tensors of any dtype (stored
as float32).

* ``weights_path``: pyiqa's ``DISTS_weights-f5e65c96.pth``, which is byte-identical to the authors'
  ``DISTS_pytorch/weights.pt`` (sha256 f5e65c96230b...): exactly the keys ``alpha`` and ``beta``, each of shape
  ``(1, 1475, 1, 1)``, channels in tap order (3 input, 64, 128, 256, 512, 512). It holds no VGG weights; any other
  key (e.g. ``stage1.0.weight`` from a saved pyiqa module) is an error.
* ``backbone_path``: torchvision's ``vgg16-397923af.pth`` (``vgg16(weights="IMAGENET1K_V1")``, what pyiqa builds its
  stages from), full model (``features.N.*``; ``classifier.*`` ignored) or features only (``N.*``): see
  :mod:`facereward.measures.lpips` for the exact keys and shapes. The 13 convolutions are all used.

Errors are one line and name the file: ``FileNotFoundError`` for a missing file; ``ValueError`` for an unreadable /
non-dict / pickle-unsafe file, a missing key, a wrong shape, or an unexpected key; ``ValueError`` for inputs that are
not two same-shape ``(B, 3, H, W)`` tensors.

Parity: tests/test_dists.py checks this module against tests/dists_reference.py, a float64 functional forward written
from pyiqa's source over the raw state dicts (``F.conv2d`` / ``F.relu`` with the kernel rebuilt from the Hann
formula), on fabricated files in the released key layouts.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facereward.measures.lpips import NETS, _build_features, _load_backbone_tensors
from facereward.measures.weightfile import check_layout, file_label, read_state_dict

__all__ = ["CHANNELS", "DISTS", "WEIGHT_FILES", "L2Pool", "l2pool_kernel"]

# constructor argument -> released file name
WEIGHT_FILES: dict[str, str] = {
    "weights_path": "DISTS_weights-f5e65c96.pth",  # pyiqa (== authors' DISTS_pytorch/weights.pt): alpha, beta
    "backbone_path": "vgg16-397923af.pth",  # torchvision vgg16 IMAGENET1K_V1
}

CHANNELS = (3, 64, 128, 256, 512, 512)  # taps: input, relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_TAPS = (3, 8, 15, 22, 29)  # torchvision vgg16 `features` indices of the ReLU taps
_L2POOL_AT = (4, 9, 16, 23)  # max-pools replaced by L2 pooling
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_C1 = 1e-6
_C2 = 1e-6
_POOL_EPS = 1e-12


def l2pool_kernel() -> Tensor:
    """The 3x3 L2-pooling kernel: ``outer(w, w) / sum`` with ``w = hanning(5)[1:-1]`` (= [[1,2,1],[2,4,2],[1,2,1]]/16)."""
    w = torch.hann_window(5, periodic=False, dtype=torch.float64)[1:-1]
    k = torch.outer(w, w)
    return (k / k.sum()).to(torch.float32)


class L2Pool(nn.Module):
    """Depthwise ``sqrt(conv(x^2, hann3x3) + 1e-12)``, stride 2, padding 1: output ``ceil(H/2) x ceil(W/2)``."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        # not persistent: it is a constant, so the features state dict is exactly torchvision's conv keys
        self.register_buffer("kernel", l2pool_kernel().expand(channels, 1, 3, 3).clone(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        out = F.conv2d(x * x, self.kernel, stride=2, padding=1, groups=self.channels)
        return torch.sqrt(out + _POOL_EPS)

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


def _load_alpha_beta(path: str | Path) -> dict[str, Tensor]:
    shape = (1, sum(CHANNELS), 1, 1)
    return check_layout(
        read_state_dict(path, "DISTS", "weights"),
        {"alpha": shape, "beta": shape},
        file_label("DISTS", "weights", path),
        layout_name=f"the 'alpha' / 'beta' layout of {WEIGHT_FILES['weights_path']}",
    )


class DISTS(nn.Module):
    """DISTS distance between ``(B, 3, H, W)`` images on ``[0, 1]``; ``forward(x, gt) -> (B,)``, lower is better.

    ``DISTS("DISTS_weights-f5e65c96.pth", "vgg16-397923af.pth")``; see the module docstring for the files.
    """

    def __init__(self, weights_path: str | Path | None = None, backbone_path: str | Path | None = None):
        super().__init__()
        if weights_path is None:
            raise ValueError(f"DISTS needs weights_path (pyiqa's {WEIGHT_FILES['weights_path']})")
        if backbone_path is None:
            raise ValueError(f"DISTS needs backbone_path (torchvision's {WEIGHT_FILES['backbone_path']})")
        ab = _load_alpha_beta(weights_path)
        backbone = _load_backbone_tensors("vgg", backbone_path, who="DISTS")

        features = _build_features(NETS["vgg"][0][: _TAPS[-1] + 1])
        for i in _L2POOL_AT:
            features[i] = L2Pool(features[i - 2].out_channels)
        features.load_state_dict(backbone, strict=True)
        self.features = features
        self.register_buffer("alpha", ab["alpha"])
        self.register_buffer("beta", ab["beta"])
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def taps(self, z: Tensor) -> list[Tensor]:
        """The six feature maps DISTS compares: ``z`` itself, then relu1_2 .. relu5_3 of the L2-pooled VGG16."""
        outs = [z]
        h = (z - self.mean) / self.std
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in _TAPS:
                outs.append(h)
        return outs

    @staticmethod
    def _check_inputs(x: Tensor, gt: Tensor) -> None:
        if not isinstance(x, Tensor) or not isinstance(gt, Tensor):
            raise ValueError("DISTS: x and gt must be torch tensors")
        if x.ndim != 4 or x.shape != gt.shape or x.shape[1] != 3 or x.numel() == 0:
            raise ValueError(
                f"DISTS: expected two non-empty (B, 3, H, W) tensors of the same shape, "
                f"got {tuple(x.shape)} and {tuple(gt.shape)}"
            )

    def forward(self, x: Tensor, gt: Tensor) -> Tensor:
        self._check_inputs(x, gt)
        b = x.shape[0]
        dtype = self.alpha.dtype
        feats = self.taps(torch.cat([x, gt], dim=0).to(dtype))  # one backbone pass for both images
        s1, s2 = [], []
        for f in feats:
            fx, fy = f[:b], f[b:]
            mx, my = fx.mean(dim=(2, 3)), fy.mean(dim=(2, 3))
            vx = ((fx - mx[..., None, None]) ** 2).mean(dim=(2, 3))
            vy = ((fy - my[..., None, None]) ** 2).mean(dim=(2, 3))
            cov = (fx * fy).mean(dim=(2, 3)) - mx * my
            s1.append((2 * mx * my + _C1) / (mx**2 + my**2 + _C1))
            s2.append((2 * cov + _C2) / (vx + vy + _C2))
        w_sum = self.alpha.sum() + self.beta.sum()
        structure = torch.cat(s1, dim=1) @ self.alpha.flatten()
        texture = torch.cat(s2, dim=1) @ self.beta.flatten()
        return 1 - (structure + texture) / w_sum
