"""Low-pass wavelet bands and the structural-consistency distance "DWT_L1" (docs/methods.md 1.2 and 2.2).

The original DiffusionReward / LRPO code takes the low-pass band of a 3-level *dual-tree complex* wavelet
transform (pytorch_wavelets' ``DTCWTForward(J=3, biort="near_sym_b", qshift="qshift_b")``), unnormalised:
``dtcwt_lowpass``, the default everywhere (``wavelet: dtcwt``). ``haar_lowpass`` is the cheaper alternative
(``wavelet: haar``): an orthonormal 2D Haar DWT, one level mapping each 2x2 block ``[[a, b], [c, d]]`` to
``(a + b + c + d) / 2``. The two bands are not numerically equal (a constant image gains x4 over 3 levels under
the DT-CWT, x8 under Haar), so weights tuned for the original (``w_dwt = 0.01``, the ``exp(-15 * DWT_L1)``
reward) assume ``dtcwt``; ``normalise=True`` gives block means instead, for either.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["haar_lowpass", "dtcwt_lowpass", "lowpass", "lowpass_l1", "WAVELETS"]

WAVELETS = ("haar", "dtcwt")

# Kingsbury's filters as the DT-CWT literature publishes them (the defaults of common DT-CWT packages):
# level 1, the biorthogonal "near_sym_b" low-pass (13 taps, symmetric); levels >= 2, the "qshift_b" pair.
_NEAR_SYM_B_H0O = (
    -0.0017578125, 0.0, 0.022265625, -0.046875, -0.0482421875, 0.296875, 0.55546875,
    0.296875, -0.0482421875, -0.046875, 0.022265625, 0.0, -0.0017578125,
)
_QSHIFT_B_H0A = (
    0.003253142763653182, -0.00388321199915849, 0.03466034684485349, -0.03887280126882779,
    -0.11720388769911527, 0.27529538466888204, 0.7561456438925225, 0.5688104207121227,
    0.011866092033797, -0.1067118046866654, 0.023825384794920298, 0.01702522388155399,
    -0.005439475937274115, -0.004556895628475491,
)
_QSHIFT_B_H0B = tuple(reversed(_QSHIFT_B_H0A))


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
        # docs/methods.md 1.2 (LL band), Haar variant: LL = (a + b + c + d) / 2 = 2 * mean of the 2x2 block.
        x = F.avg_pool2d(_pad_even(x), kernel_size=2, stride=2) * 2.0
    return x / 2.0 ** int(levels) if normalise else x


def _symmetric_index(n: int, pad: int, device: torch.device) -> Tensor:
    """Indices of a length-n axis extended by `pad` on each side with half-sample symmetry (x[-1] = x[0])."""
    idx = torch.arange(-pad, n + pad, device=device) % (2 * n)
    return torch.where(idx >= n, 2 * n - 1 - idx, idx)


def _correlate(x: Tensor, taps: Tensor, dim: int, stride: int = 1) -> Tensor:
    """'Valid' filtering of every plane of x along `dim` (2 = rows, 3 = columns) with reversed `taps` (a convolution)."""
    b, c, h, w = x.shape
    k = taps.flip(0).to(x.dtype)
    weight = k.view(1, 1, -1, 1) if dim == 2 else k.view(1, 1, 1, -1)
    out = F.conv2d(x.reshape(b * c, 1, h, w), weight, stride=(stride, 1) if dim == 2 else (1, stride))
    return out.reshape(b, c, *out.shape[-2:])


def _level1_lowpass(x: Tensor, h0o: Tensor, dim: int) -> Tensor:
    """Undecimated odd-length low-pass along `dim`, symmetric extension: same size out."""
    idx = _symmetric_index(x.shape[dim], h0o.numel() // 2, x.device)
    return _correlate(x.index_select(dim, idx), h0o, dim)


def _qshift_lowpass(x: Tensor, ha: Tensor, hb: Tensor, dim: int) -> Tensor:
    """The decimating q-shift low-pass along `dim` (length a multiple of 4 -> half): the two trees interleaved."""
    n, m = x.shape[dim], ha.numel()
    xe = x.index_select(dim, _symmetric_index(n, m, x.device))
    even = xe.narrow(dim, 2, xe.shape[dim] - 2)
    tree_a = _correlate(even.index_select(dim, torch.arange(0, even.shape[dim], 2, device=x.device)), ha, dim, stride=2)
    odd = xe.narrow(dim, 3, xe.shape[dim] - 3)
    tree_b = _correlate(odd.index_select(dim, torch.arange(0, odd.shape[dim], 2, device=x.device)), hb, dim, stride=2)
    quarter = n // 4
    tree_a, tree_b = tree_a.narrow(dim, 0, quarter), tree_b.narrow(dim, 0, quarter)
    return torch.stack([tree_a, tree_b], dim=dim + 1).flatten(dim, dim + 1)


def _extend_to_multiple_of_4(x: Tensor, dim: int) -> Tensor:
    if x.shape[dim] % 4 == 0:
        return x
    n = x.shape[dim]
    return torch.cat([x.narrow(dim, 0, 1), x, x.narrow(dim, n - 1, 1)], dim=dim)


def dtcwt_lowpass(x: Tensor, levels: int = 3) -> Tensor:
    """Low-pass image of a `levels`-level 2D dual-tree complex wavelet transform (near_sym_b, qshift_b).

    The original DiffusionReward/LRPO structural band: level 1 keeps the full size, each further level
    halves it (so 64 px -> 16 px for 3 levels). Odd sizes repeat their last row/column first. Differentiable.
    """
    _check(x, "dtcwt_lowpass")
    if int(levels) != levels or levels < 1:
        raise ValueError(f"dtcwt_lowpass: levels must be a positive integer, got {levels!r}")
    h0o = torch.tensor(_NEAR_SYM_B_H0O, dtype=torch.float64, device=x.device)
    h0a = torch.tensor(_QSHIFT_B_H0A, dtype=torch.float64, device=x.device)
    h0b = torch.tensor(_QSHIFT_B_H0B, dtype=torch.float64, device=x.device)
    if x.shape[2] % 2:
        x = torch.cat([x, x[:, :, -1:]], dim=2)
    if x.shape[3] % 2:
        x = torch.cat([x, x[:, :, :, -1:]], dim=3)
    low = _level1_lowpass(_level1_lowpass(x, h0o, 3), h0o, 2)
    for _ in range(int(levels) - 1):
        low = _extend_to_multiple_of_4(_extend_to_multiple_of_4(low, 2), 3)
        low = _qshift_lowpass(_qshift_lowpass(low, h0b, h0a, 3), h0b, h0a, 2)
    return low


def lowpass(x: Tensor, levels: int = 3, wavelet: str = "dtcwt", normalise: bool = False) -> Tensor:
    """The low-pass band of a `levels`-level wavelet transform: "dtcwt" (dual-tree, the originals') or "haar" (orthonormal DWT)."""
    if wavelet == "haar":
        return haar_lowpass(x, levels, normalise)
    if wavelet == "dtcwt":
        low = dtcwt_lowpass(x, levels)
        return low / 2.0 ** (int(levels) - 1) if normalise else low
    raise ValueError(f"wavelet must be one of {', '.join(WAVELETS)}, got {wavelet!r}")


def lowpass_l1(x: Tensor, gt: Tensor, levels: int = 3, normalise: bool = False, wavelet: str = "dtcwt") -> Tensor:
    """DWT_L1 (docs/methods.md 1.2, 2.2): per-image mean |LL(x) - LL(gt)| -> (B,), LL from `lowpass`.

    The defaults are both originals' (3-level DT-CWT, unnormalised: a constant image's band is 4x it); the
    whole project uses them unless told otherwise.

    Inputs are images of the same shape (facereward uses [0, 1]); differentiable in both.
    """
    _check(x, "lowpass_l1")
    _check(gt, "lowpass_l1")
    if x.shape != gt.shape:
        raise ValueError(f"lowpass_l1: shape mismatch, x {tuple(x.shape)} vs gt {tuple(gt.shape)}")
    diff = lowpass(x, levels, wavelet, normalise) - lowpass(gt.to(x.dtype), levels, wavelet, normalise)
    return diff.abs().flatten(1).mean(dim=1)
