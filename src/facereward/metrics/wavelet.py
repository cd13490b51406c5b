"""Low-pass wavelet bands and the structural-consistency distance "DWT_L1" (METHODS.md 1.2 and 2.2).

The original DiffusionReward / LRPO code takes the low-pass band of a 3-level *dual-tree complex*
wavelet transform. Here the transform is the orthonormal 2D Haar DWT (no extra dependency, exact,
cheap, differentiable): one level maps each 2x2 block ``[[a, b], [c, d]]`` to the LL coefficient
``(a + b + c + d) / 2``, so a constant image ``v`` becomes ``2 v`` per level (``2**levels * v``
after ``levels`` levels). The two low-pass bands are not numerically equal, so loss weights tuned
for the original (``w_dwt = 0.01``, the ``exp(-15 * DWT_L1)`` reward) may need retuning; pass
``normalise=True`` to get block means (``LL / 2**levels``) instead of orthonormal coefficients.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["haar_lowpass", "lowpass_l1"]


def _check(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor) or x.ndim != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected a (B, C, H, W) tensor, got {shape}")


def _pad_even(x: Tensor) -> Tensor:
    """Pad the bottom/right edge by one row/column when H/W is odd: reflection, or replication for size 1."""
    h, w = x.shape[-2:]
    pad_h, pad_w = h % 2, w % 2
    if not (pad_h or pad_w):
        return x
    mode = "reflect" if min(h, w) >= 2 else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)


def haar_lowpass(x: Tensor, levels: int = 3, normalise: bool = False) -> Tensor:
    """LL band of an orthonormal 2D Haar DWT applied `levels` times: (B, C, H, W) -> (B, C, ~H/2^L, ~W/2^L).

    Odd sizes at any level are padded by reflection (bottom/right) first. Differentiable.
    `normalise=True` divides by 2**levels (block means rather than orthonormal coefficients).
    """
    _check(x, "haar_lowpass")
    if int(levels) != levels or levels < 0:
        raise ValueError(f"haar_lowpass: levels must be a non-negative integer, got {levels!r}")
    for _ in range(int(levels)):
        # METHODS.md 1.2 (LL band), Haar variant: LL = (a + b + c + d) / 2 = 2 * mean of the 2x2 block.
        x = F.avg_pool2d(_pad_even(x), kernel_size=2, stride=2) * 2.0
    return x / 2.0 ** int(levels) if normalise else x


def lowpass_l1(x: Tensor, gt: Tensor, levels: int = 3, normalise: bool = False) -> Tensor:
    """DWT_L1 (METHODS.md 1.2, 2.2), Haar variant: per-image mean |LL(x) - LL(gt)| -> (B,).

    Inputs are images of the same shape (facereward uses [0, 1]); differentiable in both.
    """
    _check(x, "lowpass_l1")
    _check(gt, "lowpass_l1")
    if x.shape != gt.shape:
        raise ValueError(f"lowpass_l1: shape mismatch, x {tuple(x.shape)} vs gt {tuple(gt.shape)}")
    diff = haar_lowpass(x, levels, normalise) - haar_lowpass(gt.to(x.dtype), levels, normalise)
    return diff.abs().flatten(1).mean(dim=1)
