"""Full-reference metrics (PSNR, SSIM) as BasicSR computes them (docs/methods.md section 3).

Reproduces ``basicsr/metrics/psnr_ssim.py`` (``calculate_psnr``, ``calculate_ssim``, ``_ssim``) and
``basicsr/utils/matlab_functions.py`` (``bgr2ycbcr(..., y_only=True)`` via ``to_y_channel``), batched
in torch. Conventions:

* Inputs are ``(B, C, H, W)`` float tensors on ``[0, 1]`` in RGB order (BasicSR reads BGR with cv2;
  the Y weights are applied to the matching R, G, B planes, so the result is the same).
* They are mapped to the ``[0, 255]`` scale. With ``quantize=True`` (default) they are first clamped to
  ``[0, 1]`` and rounded to uint8 levels, ``round(x * 255)``, exactly as BasicSR's ``tensor2img``
  does before writing a PNG (numpy/torch rounding is both round-half-to-even).
* ``crop_border`` removes that many pixels from every side *before* the optional Y conversion, as
  BasicSR does.
* All arithmetic is float64. BasicSR's ``to_y_channel`` goes through float32; the resulting
  difference is at the 1e-5 level on the [0, 255] scale.
* SSIM: Gaussian window 11x11, sigma 1.5 (``cv2.getGaussianKernel(11, 1.5)`` outer product),
  ``cv2.filter2D`` followed by a 5-pixel crop == a 'valid' correlation, here ``F.conv2d`` with
  ``groups``; ``C1 = (0.01*255)^2``, ``C2 = (0.03*255)^2``; the SSIM map is averaged per channel and
  the per-channel means are averaged.
* PSNR: ``10*log10(255^2 / mse)`` with mse over all pixels and channels; ``inf`` when mse == 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["psnr", "ssim", "rgb_to_y"]

_WIN = 11
_SIGMA = 1.5
_C1 = (0.01 * 255.0) ** 2
_C2 = (0.03 * 255.0) ** 2
# BasicSR bgr2ycbcr y_only on [0,1] input: Y = img @ [24.966, 128.553, 65.481] + 16 (BGR order).
_Y_WEIGHTS_RGB = (65.481, 128.553, 24.966)
_Y_OFFSET = 16.0


def _check_pair(pred: Tensor, target: Tensor, crop_border: int, min_size: int, name: str) -> None:
    if not isinstance(pred, Tensor) or not isinstance(target, Tensor):
        raise ValueError(f"{name}: pred and target must be torch tensors")
    if pred.ndim != 4 or target.ndim != 4:
        raise ValueError(
            f"{name}: expected 4-D (B, C, H, W) tensors, got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    if pred.shape != target.shape:
        raise ValueError(f"{name}: shape mismatch, pred {tuple(pred.shape)} vs target {tuple(target.shape)}")
    if pred.shape[1] < 3:
        raise ValueError(f"{name}: expected at least 3 (RGB) channels, got {pred.shape[1]}")
    if int(crop_border) != crop_border or crop_border < 0:
        raise ValueError(f"{name}: crop_border must be a non-negative integer, got {crop_border!r}")
    h, w = pred.shape[-2] - 2 * crop_border, pred.shape[-1] - 2 * crop_border
    if h < min_size or w < min_size:
        raise ValueError(
            f"{name}: image {pred.shape[-2]}x{pred.shape[-1]} with crop_border={crop_border} leaves {h}x{w}, "
            f"need at least {min_size}x{min_size}"
        )


def _prepare(img: Tensor, crop_border: int, y_channel: bool, quantize: bool) -> Tensor:
    """[0,1] float -> float64 on the [0,255] scale, cropped, optionally Y only."""
    x = img.to(torch.float64)
    if quantize:
        x = torch.round(x.clamp(0.0, 1.0) * 255.0)
    else:
        x = x * 255.0
    if crop_border:
        x = x[..., crop_border:-crop_border, crop_border:-crop_border]
    if y_channel:
        if x.shape[1] != 3:
            raise ValueError(f"y_channel=True needs exactly 3 (RGB) channels, got {x.shape[1]}")
        x = rgb_to_y(x)
    return x


def rgb_to_y(img_255: Tensor) -> Tensor:
    """RGB ``(B, 3, H, W)`` on [0, 255] -> Y ``(B, 1, H, W)`` on [0, 255] (range [16, 235]).

    BasicSR's ``bgr2ycbcr(y_only=True)`` as used by ``to_y_channel`` (docs/methods.md section 3):
    ``Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255`` for R, G, B on [0, 255]. Computed in float64.
    """
    if not isinstance(img_255, Tensor) or img_255.ndim != 4 or img_255.shape[1] != 3:
        shape = tuple(img_255.shape) if isinstance(img_255, Tensor) else type(img_255).__name__
        raise ValueError(f"rgb_to_y: expected a (B, 3, H, W) tensor, got {shape}")
    x = img_255.to(torch.float64) / 255.0
    w = torch.tensor(_Y_WEIGHTS_RGB, dtype=torch.float64, device=x.device).view(1, 3, 1, 1)
    y = (x * w).sum(dim=1, keepdim=True) + _Y_OFFSET
    return y  # bgr2ycbcr returns y/255 for float input, to_y_channel multiplies by 255 again


def psnr(
    pred: Tensor, target: Tensor, crop_border: int = 0, y_channel: bool = False, quantize: bool = True
) -> Tensor:
    """Per-image PSNR (dB) of [0,1] ``(B, C, H, W)`` tensors on the [0,255] scale -> ``(B,)`` float64.

    As BasicSR computes it (docs/methods.md section 3): crop, optional Y channel, mse over all pixels and
    channels, ``10*log10(255^2/mse)``; ``inf`` for identical images.
    """
    _check_pair(pred, target, crop_border, 1, "psnr")
    x = _prepare(pred, crop_border, y_channel, quantize)
    y = _prepare(target, crop_border, y_channel, quantize)
    mse = ((x - y) ** 2).flatten(1).mean(dim=1)
    out = 10.0 * torch.log10((255.0 * 255.0) / mse)  # mse == 0 -> +inf, as BasicSR
    return torch.where(mse == 0, torch.full_like(out, math.inf), out)


def _gaussian_kernel(device: torch.device) -> Tensor:
    """``k = cv2.getGaussianKernel(11, 1.5)`` as float64 (11,); the 2D window is ``np.outer(k, k)``."""
    r = torch.arange(_WIN, dtype=torch.float64, device=device) - (_WIN - 1) / 2
    k = torch.exp(-(r**2) / (2 * _SIGMA**2))
    return k / k.sum()


def ssim(
    pred: Tensor, target: Tensor, crop_border: int = 0, y_channel: bool = False, quantize: bool = True
) -> Tensor:
    """Per-image SSIM of [0,1] ``(B, C, H, W)`` tensors on the [0,255] scale -> ``(B,)`` float64.

    As BasicSR computes it (docs/methods.md section 3): 11x11 Gaussian (sigma 1.5) 'valid' filtering,
    C1=(0.01*255)^2, C2=(0.03*255)^2, SSIM map mean per channel, then mean over channels.
    """
    _check_pair(pred, target, crop_border, _WIN, "ssim")
    x = _prepare(pred, crop_border, y_channel, quantize)
    y = _prepare(target, crop_border, y_channel, quantize)
    c = x.shape[1]
    # One grouped conv over [x, y, x^2, y^2, xy] stacked along channels: 5C groups of one plane each.
    stack = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    # The window is separable: a vertical then a horizontal 11-tap pass ('valid' == cv2.filter2D + [5:-5, 5:-5]).
    k = _gaussian_kernel(x.device)
    filt = F.conv2d(stack, k.view(1, 1, _WIN, 1).expand(5 * c, 1, _WIN, 1).contiguous(), groups=5 * c)
    filt = F.conv2d(filt, k.view(1, 1, 1, _WIN).expand(5 * c, 1, 1, _WIN).contiguous(), groups=5 * c)
    mu1, mu2, e11, e22, e12 = filt.split(c, dim=1)
    mu1_sq, mu2_sq, mu1_mu2 = mu1 * mu1, mu2 * mu2, mu1 * mu2
    sigma1_sq = e11 - mu1_sq
    sigma2_sq = e22 - mu2_sq
    sigma12 = e12 - mu1_mu2
    ssim_map = ((2 * mu1_mu2 + _C1) * (2 * sigma12 + _C2)) / (
        (mu1_sq + mu2_sq + _C1) * (sigma1_sq + sigma2_sq + _C2)
    )
    return ssim_map.mean(dim=(2, 3)).mean(dim=1)
