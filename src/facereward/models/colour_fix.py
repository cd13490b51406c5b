"""DiffBIR's wavelet colour fix (docs/methods.md 0, "Sampling"): the restoration's detail on the reference's colours.

The low band is five passes of a 3x3 binomial blur dilated by 1, 2, 4, 8, 16 (replicate padding); the output is the
restoration minus its low band plus the reference's low band, where the reference is the stage-1 output C(lq).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_KERNEL = ((0.0625, 0.125, 0.0625), (0.125, 0.25, 0.125), (0.0625, 0.125, 0.0625))


def wavelet_low_band(image: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """The low band after `levels` dilated binomial blurs of a (B, C, H, W) batch; image - low is the high band."""
    channels = image.shape[1]
    kernel = torch.tensor(_KERNEL, dtype=image.dtype, device=image.device).expand(channels, 1, 3, 3)
    low = image
    for level in range(levels):
        radius = 2**level
        low = F.conv2d(F.pad(low, (radius,) * 4, mode="replicate"), kernel, groups=channels, dilation=radius)
    return low


def wavelet_colour_fix(image: torch.Tensor, reference: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """`image`'s high band plus `reference`'s low band (same shapes; any value range, the map is affine-equivariant)."""
    if image.shape != reference.shape:
        raise ValueError(f"colour fix: image {tuple(image.shape)} and reference {tuple(reference.shape)} differ in shape")
    reference = reference.to(image.dtype)
    return image - wavelet_low_band(image, levels) + wavelet_low_band(reference, levels)
