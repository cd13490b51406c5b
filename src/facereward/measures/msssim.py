"""Multi-scale SSIM as pyiqa's ``ms_ssim`` metric computes it with its default options (the LRPO reward server's
``ssim`` term: ``pyiqa.create_metric("ms_ssim")`` on images clamped to [0, 1]).

Contract: ``ms_ssim(pred, target)`` takes ``(B, C, H, W)`` float tensors of equal shape, C = 3 (RGB) or 1, on
[0, 1], and returns ``(B,)`` float64, 1 for identical images, usually in [0, 1], higher is better. Gradients reach
both inputs (the 8-bit rounding is a straight-through estimator, as in pyiqa). Both sides must be at least
``MIN_SIZE`` = 161 pixels; smaller images are a one-line ValueError (pyiqa fails deep in ``F.conv2d`` instead).

The pyiqa conventions followed (IQA-PyTorch, files ``pyiqa/default_model_configs.py`` entry ``ms_ssim``,
``pyiqa/archs/ssim_arch.py`` ``MS_SSIM`` / ``ms_ssim`` / ``ssim``, ``pyiqa/archs/func_util.py``
``preprocess_rgb``, ``pyiqa/utils/color_util.py`` ``to_y_channel`` / ``rgb2yiq``, ``pyiqa/matlab_utils/functions.py``
``fspecial`` / ``filter2``):

* Default options: ``test_y_channel=True``, ``color_space='yiq'``, ``downsample=False`` (no MATLAB-style
  ``round(min(H, W) / 256)`` average-pooling before each scale), ``is_prod=True``, data range 255.
* Colour: an RGB image becomes its YIQ luma, ``Y = 0.299 R + 0.587 G + 0.114 B``, computed as pyiqa does, a matmul
  of the channel-last image with the (float32) NTSC YIQ matrix in the input's dtype; a 1-channel image is used
  as it is (pyiqa accepts 1 or 3 channels; other channel counts are refused here).
* Value scale: ``x * 255`` rounded to integer levels in the input's dtype (round half to even), with the
  straight-through gradient ``x - x.detach() + x.round()``; then float64 for everything after.
* Window: MATLAB's ``fspecial('gaussian', 11, 1.5)`` (computed in float64, entries below ``eps * max`` zeroed,
  normalised), stored as float32 and then used in float64, as pyiqa's ``fspecial(...).float()`` / ``.to(X)`` does;
  'valid' filtering (no padding), one 2-D correlation per plane.
* Per scale: ``C1 = (0.01 * 255)^2``, ``C2 = (0.03 * 255)^2``; ``cs_map = relu((2 s12 + C2) / (s1^2 + s2^2 + C2))``
  (negative contrast-structure responses are set to 0), ``ssim_map = (2 m1 m2 + C1) / (m1^2 + m2^2 + C1) * cs_map``;
  ``cs`` and ``ssim`` are the means of the maps over channel and space.
* Between scales: ``F.avg_pool2d(kernel_size=2)`` with ``padding = (H % 2, W % 2)``, i.e. an odd side is
  zero-padded by one on *both* ends and the zeros count in the average (``count_include_pad``), so its first
  row/column is halved; a side s becomes ceil(s / 2).
* Pooling over the 5 scales: weights ``(0.0448, 0.2856, 0.3001, 0.2363, 0.1333)`` (a float32 tensor, used in
  float64), ``prod_{k<4} cs_k ** w_k * ssim_4 ** w_4``: the contrast-structure term of scales 1-4 and the full SSIM
  (with luminance) of the coarsest scale.
* Minimum size: after 4 halvings a side s is ceil(s / 16), which the 11x11 valid window needs to be >= 11, so
  s >= 161.

Like pyiqa, values outside [0, 1] are not clamped here (pyiqa's wrapper rejects them; the measure's ``clamp``
option clamps first, and its reward form does so by default, as the LRPO server does). A ``cs`` mean of exactly 0
(anti-correlated images) gives a score of 0 and an infinite gradient of ``cs ** w``, as in pyiqa.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ms_ssim", "MIN_SIZE", "SCALE_WEIGHTS"]

SCALE_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
_WIN, _SIGMA = 11, 1.5
_DATA_RANGE = 255.0
_C1 = (0.01 * _DATA_RANGE) ** 2
_C2 = (0.03 * _DATA_RANGE) ** 2
# the smallest side whose 5th scale, ceil(side / 2**4), still holds the 11x11 window
MIN_SIZE = (_WIN - 1) * 2 ** (len(SCALE_WEIGHTS) - 1) + 1
# NTSC RGB -> YIQ (rows Y, I, Q); only Y is used, the matmul with the whole matrix is pyiqa's arithmetic
_YIQ = ((0.299, 0.587, 0.114), (0.5959, -0.2746, -0.3213), (0.2115, -0.5227, 0.3112))


def _window(device: torch.device) -> Tensor:
    """fspecial('gaussian', 11, 1.5) as a (1, 1, 11, 11) float64 tensor holding float32 values."""
    r = torch.arange(_WIN, dtype=torch.float64) - (_WIN - 1) / 2
    h = torch.exp(-(r.view(-1, 1) ** 2 + r.view(1, -1) ** 2) / (2 * _SIGMA**2))
    h = torch.where(h < torch.finfo(torch.float64).eps * h.max(), torch.zeros_like(h), h)
    h = h / h.sum()
    return h.to(torch.float32).to(torch.float64).view(1, 1, _WIN, _WIN).to(device)


def _to_levels(img: Tensor) -> Tensor:
    """(B, 3 or 1, H, W) on [0, 1] -> (B, 1 or C, H, W) float64 on integer levels of [0, 255] (straight-through)."""
    if img.shape[1] == 3:
        yiq = torch.tensor(_YIQ).t().to(img)  # float32 constants, then the input's dtype
        img = torch.matmul(img.permute(0, 2, 3, 1), yiq).permute(0, 3, 1, 2)[:, :1]
    x = img * _DATA_RANGE
    x = x - x.detach() + x.detach().round()
    return x.to(torch.float64)


def _scale(x: Tensor, y: Tensor, win: Tensor) -> tuple[Tensor, Tensor]:
    """One scale: (mean SSIM, mean contrast-structure) per image, 'valid' Gaussian filtering, cs clipped at 0."""
    c = x.shape[1]
    planes = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    filt = F.conv2d(planes, win.expand(5 * c, 1, _WIN, _WIN), groups=5 * c)
    mu1, mu2, e11, e22, e12 = filt.split(c, dim=1)
    mu1_sq, mu2_sq, mu12 = mu1 * mu1, mu2 * mu2, mu1 * mu2
    cs_map = torch.relu((2 * (e12 - mu12) + _C2) / ((e11 - mu1_sq) + (e22 - mu2_sq) + _C2))
    ssim_map = (2 * mu12 + _C1) / (mu1_sq + mu2_sq + _C1) * cs_map
    return ssim_map.mean(dim=(1, 2, 3)), cs_map.mean(dim=(1, 2, 3))


def ms_ssim(pred: Tensor, target: Tensor) -> Tensor:
    """Per-image MS-SSIM of [0, 1] ``(B, C, H, W)`` tensors (C = 3 RGB or 1) -> ``(B,)`` float64, as pyiqa's
    ``ms_ssim`` with its defaults (module docstring); sides below 161 pixels are a ValueError."""
    if not isinstance(pred, Tensor) or not isinstance(target, Tensor) or pred.ndim != 4 or target.ndim != 4:
        shapes = [tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in (pred, target)]
        raise ValueError(f"ms_ssim: expected two (B, C, H, W) tensors, got {shapes[0]} and {shapes[1]}")
    if pred.shape != target.shape:
        raise ValueError(f"ms_ssim: shape mismatch, pred {tuple(pred.shape)} vs target {tuple(target.shape)}")
    if pred.shape[1] not in (1, 3):
        raise ValueError(f"ms_ssim: expected 3 (RGB) or 1 channels, got {pred.shape[1]}")
    h, w = pred.shape[-2:]
    if min(h, w) < MIN_SIZE:
        raise ValueError(f"ms_ssim: image {h}x{w} is too small for 5 scales; each side must be at least {MIN_SIZE} pixels")
    x, y = _to_levels(pred), _to_levels(target.to(pred.dtype))
    win = _window(x.device)
    weights = torch.tensor(SCALE_WEIGHTS, dtype=torch.float32).to(torch.float64)
    score = None
    for k in range(len(SCALE_WEIGHTS)):
        if k:
            pad = (x.shape[2] % 2, x.shape[3] % 2)
            x = F.avg_pool2d(x, kernel_size=2, padding=pad)
            y = F.avg_pool2d(y, kernel_size=2, padding=pad)
        ssim_k, cs_k = _scale(x, y, win)
        term = (ssim_k if k == len(SCALE_WEIGHTS) - 1 else cs_k) ** weights[k].item()
        score = term if score is None else score * term
    return score
