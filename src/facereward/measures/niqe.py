"""NIQE (Mittal, Soundararajan and Bovik, "Making a 'Completely Blind' Image Quality Analyzer", 2013), docs/methods.md 3.

A no-reference score, lower is better: the distance between a multivariate Gaussian (MVG) fitted to natural-scene
features of an image's patches and one fitted to pristine images. Computed as the authors' MATLAB release
(`computequality.m`, `computefeature.m`, `estimateaggdparam.m`, `estimatemodelparam.m`) computes it, which BasicSR's
`calculate_niqe` and pyiqa's `niqe` follow:

1. luminance on [0, 255], rounded to integer levels as the release reads 8-bit images (`channel` "y": the Y of
   YCbCr as BasicSR's `calculate_niqe(convert_to="y")`; "gray": MATLAB's `rgb2gray`, as the release and pyiqa);
   the image is cropped to a whole number of `block_size` blocks;
2. MSCN coefficients `(I - mu) / (sigma + 1)`, `mu = w * I`, `sigma = sqrt(|w * I^2 - mu^2|)`, `w` the 7x7 Gaussian
   window (sigma 7/6) summing to 1, borders replicated;
3. per block, 18 features: the AGGD fit (shape alpha, variance (beta_l + beta_r) / 2) of the MSCN block, and for each
   of the 4 products of the block with its circular shifts by (0, 1), (1, 0), (1, 1), (1, -1): alpha, the mean
   `(beta_r - beta_l) Gamma(2/alpha) / Gamma(1/alpha)`, beta_l, beta_r. The AGGD fit is moment matching: alpha is
   the value on the grid 0.2:0.001:10 whose `Gamma(2/a)^2 / (Gamma(1/a) Gamma(3/a))` is nearest the sample's
   normalised `(E|x|)^2 / E[x^2]` ratio, `beta = std * sqrt(Gamma(1/alpha) / Gamma(3/alpha))` per side;
4. the same at scale 2, after MATLAB's `imresize(I, 0.5)` (bicubic with antialiasing), on blocks of half the size:
   36 features per block;
5. the MVG of the image's blocks: the NaN-ignoring mean and the covariance of the blocks with no NaN feature;
   `NIQE = sqrt((mu_p - mu)^T ((S_p + S) / 2)^+ (mu_p - mu))`, `^+` the pseudo-inverse.

The pristine model (`mu_prisparam`, `cov_prisparam`) is loaded from a file the user gives (the release's
`modelparameters.mat`, BasicSR's `niqe_pris_params.npz`, or a file written here) or fitted with `fit_niqe_model`
(`facereward fit-niqe`): the release's `estimatemodelparam`, which keeps the blocks of each pristine image whose
sharpness (the mean of `sigma` over the block) exceeds `sharpness_threshold` (0.75) times the image's largest.

Computed in float64 torch (batched, any device). Not differentiable: the shape alpha is a table lookup, so NIQE is a
metric, not a reward.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "NIQE",
    "NIQEModel",
    "aggd_fit",
    "fit_niqe_model",
    "gaussian_window",
    "load_niqe_model",
    "luminance",
    "matlab_imresize",
    "mscn",
    "niqe_distance",
    "niqe_features",
    "save_niqe_model",
]

N_FEATURES = 36  # 18 per scale, 2 scales
BLOCK_SIZE = 96  # the release's recommended block (no overlap)
SHARPNESS_THRESHOLD = 0.75  # estimatemodelparam(..., sh_th = 0.75)
CHANNELS = ("y", "gray")
_SHIFTS = ((0, 1), (1, 0), (1, 1), (1, -1))  # horizontal, vertical, the two diagonals (computefeature.m)
_GRAY_WEIGHTS = (0.298936021293775, 0.587043074451121, 0.114020904255103)  # MATLAB rgb2gray


def gaussian_window(size: int = 7, sigma: float = 7.0 / 6.0, dtype: torch.dtype = torch.float64) -> Tensor:
    """MATLAB's `fspecial('gaussian', size, sigma)`: a (size, size) Gaussian summing to 1."""
    ax = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(ax[:, None] ** 2 + ax[None, :] ** 2) / (2 * sigma**2))
    return g / g.sum()


def _filter(image: Tensor, taps: list[float]) -> Tensor:
    """Correlate (B, 1, H, W) with the separable window outer(taps, taps), borders replicated.

    Two 1-D passes of shifted sums: exact in float64 and much faster than a float64 conv2d on a CPU.
    """
    pad = len(taps) // 2
    x = F.pad(image, (pad, pad, pad, pad), mode="replicate")
    h, w = image.shape[-2:]
    x = sum(t * x[..., k : k + h, :] for k, t in enumerate(taps))
    return sum(t * x[..., :, k : k + w] for k, t in enumerate(taps))


def mscn(image: Tensor, c: float = 1.0) -> tuple[Tensor, Tensor]:
    """MSCN coefficients and the local sigma of (B, 1, H, W) luminance (docs/methods.md 3); borders replicated.

    The window is `gaussian_window()` (7x7, sigma 7/6), applied as its two 1-D factors. Where the pixel equals its
    weighted mean (a constant patch) the coefficient is exactly 0: float rounding would make it a random +-1e-13
    that the AGGD fit counts on the left or right side (|I - mu| <= 1e-9 on the [0, 255] scale is taken as 0).
    """
    ax = torch.arange(7, dtype=torch.float64) - 3
    g = torch.exp(-(ax**2) / (2 * (7.0 / 6.0) ** 2))
    taps = (g / g.sum()).tolist()  # gaussian_window() == outer(taps, taps)
    mu = _filter(image, taps)
    sigma = torch.sqrt((_filter(image * image, taps) - mu * mu).abs())
    centred = image - mu
    centred = torch.where(centred.abs() <= 1e-9, torch.zeros_like(centred), centred)
    return centred / (sigma + c), sigma


_GRIDS: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}


def _aggd_grid(device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The shape grid 0.2:0.001:10 and its Gamma(2/a)^2 / (Gamma(1/a) Gamma(3/a)), once per device and dtype."""
    key = (device, dtype)
    if key not in _GRIDS:
        gam = 0.2 + 0.001 * torch.arange(9801, device=device, dtype=dtype)
        _GRIDS[key] = gam, torch.exp(2 * torch.lgamma(2 / gam) - torch.lgamma(1 / gam) - torch.lgamma(3 / gam))
    return _GRIDS[key]


def aggd_fit(samples: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """AGGD (alpha, beta_l, beta_r) of each row of `samples` (N, M) by moment matching (docs/methods.md 3).

    As `estimateaggdparam.m`: a side with no samples gives NaN betas, and then alpha is the grid's first value (0.2).
    """
    x = samples
    neg, pos = x < 0, x > 0
    left_std = torch.sqrt((x * x * neg).sum(-1) / neg.sum(-1))
    right_std = torch.sqrt((x * x * pos).sum(-1) / pos.sum(-1))
    gammahat = left_std / right_std
    rhat = x.abs().mean(-1) ** 2 / (x * x).mean(-1)
    rhatnorm = rhat * (gammahat**3 + 1) * (gammahat + 1) / (gammahat**2 + 1) ** 2
    gam, r_gam = _aggd_grid(x.device, x.dtype)
    index = (r_gam[None, :] - rhatnorm[:, None]).abs().argmin(-1)
    alpha = torch.where(torch.isnan(rhatnorm), gam[0], gam[index])
    ratio = torch.exp(0.5 * (torch.lgamma(1 / alpha) - torch.lgamma(3 / alpha)))  # sqrt(Gamma(1/a) / Gamma(3/a))
    return alpha, left_std * ratio, right_std * ratio


def _block_features(blocks: Tensor) -> Tensor:
    """(N, h, w) MSCN blocks -> (N, 18) features (computefeature.m)."""
    alpha, beta_l, beta_r = aggd_fit(blocks.flatten(1))
    feats = [alpha, (beta_l + beta_r) / 2]
    for shift in _SHIFTS:
        pair = blocks * torch.roll(blocks, shifts=shift, dims=(1, 2))  # MATLAB circshift within the block
        alpha, beta_l, beta_r = aggd_fit(pair.flatten(1))
        mean = (beta_r - beta_l) * torch.exp(torch.lgamma(2 / alpha) - torch.lgamma(1 / alpha))
        feats += [alpha, mean, beta_l, beta_r]
    return torch.stack(feats, dim=-1)


def _to_blocks(x: Tensor, size: int) -> Tensor:
    """(B, 1, H, W) with H, W multiples of `size` -> (B, n_blocks, size, size), blocks in row-major order."""
    b, _, h, w = x.shape
    nh, nw = h // size, w // size
    return x.reshape(b, nh, size, nw, size).permute(0, 1, 3, 2, 4).reshape(b, nh * nw, size, size)


def _cubic(x: Tensor) -> Tensor:
    a = x.abs()
    return ((1.5 * a**3 - 2.5 * a**2 + 1) * (a <= 1) + (-0.5 * a**3 + 2.5 * a**2 - 4 * a + 2) * ((a > 1) & (a <= 2))).to(x.dtype)


def _resize_matrix(in_len: int, scale: float, device: torch.device, dtype: torch.dtype) -> Tensor:
    """MATLAB imresize's bicubic contributions along one axis as an (out, in) matrix (antialiasing when scale < 1)."""
    out_len = math.ceil(in_len * scale)
    width = 4.0 / scale if scale < 1 else 4.0
    u = torch.arange(1, out_len + 1, dtype=dtype, device=device) / scale + 0.5 * (1 - 1 / scale)
    left = torch.floor(u - width / 2)
    taps = math.ceil(width) + 2
    index = left[:, None] + torch.arange(taps, dtype=dtype, device=device)[None, :]  # 1-based
    dist = u[:, None] - index
    weights = scale * _cubic(scale * dist) if scale < 1 else _cubic(dist)
    weights = weights / weights.sum(dim=1, keepdim=True)
    mirror = torch.cat([torch.arange(in_len, device=device), torch.arange(in_len - 1, -1, -1, device=device)])
    cols = mirror[torch.remainder(index.long() - 1, 2 * in_len)]  # symmetric borders, 0-based
    matrix = torch.zeros(out_len, in_len, dtype=dtype, device=device)
    return matrix.scatter_add_(1, cols, weights)


def matlab_imresize(image: Tensor, scale: float) -> Tensor:
    """MATLAB `imresize(I, scale)` (bicubic, antialiasing, symmetric borders, no rounding) of (B, C, H, W) float."""
    h, w = image.shape[-2:]
    rows = _resize_matrix(h, scale, image.device, image.dtype)
    cols = _resize_matrix(w, scale, image.device, image.dtype)
    return rows @ image @ cols.T


def luminance(images: Tensor, channel: str = "y", quantize: bool = True) -> Tensor:
    """(B, 3, H, W) RGB in [0, 1] (or (B, 1, H, W) gray) -> (B, 1, H, W) float64 luminance on [0, 255]."""
    if channel not in CHANNELS:
        raise ValueError(f"niqe channel must be one of {', '.join(CHANNELS)}, got {channel!r}")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"niqe expects (B, 3, H, W) RGB or (B, 1, H, W) gray images, got {tuple(images.shape)}")
    x = images.to(torch.float64)
    x = torch.round(x.clamp(0, 1) * 255) if quantize else x * 255
    if x.shape[1] == 3:
        if channel == "y":
            from facereward.measures.fullref import rgb_to_y

            x = rgb_to_y(x)
        else:
            w = torch.tensor(_GRAY_WEIGHTS, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            x = (x * w).sum(dim=1, keepdim=True)
        if quantize:
            x = torch.round(x)
    return x


def _check_block_size(block_size: int) -> int:
    if int(block_size) != block_size or block_size < 8 or block_size % 2:
        raise ValueError(f"niqe block_size must be an even integer >= 8, got {block_size!r}")
    return int(block_size)


def niqe_features(
    images: Tensor, block_size: int = BLOCK_SIZE, channel: str = "y", crop_border: int = 0, quantize: bool = True
) -> tuple[Tensor, Tensor]:
    """The 36 NIQE features of every block and the blocks' sharpness (docs/methods.md 3).

    images (B, 3, H, W) in [0, 1] -> features (B, n_blocks, 36) and sharpness (B, n_blocks), float64.
    """
    block_size = _check_block_size(block_size)
    with torch.no_grad():
        y = luminance(images, channel, quantize)
        if crop_border:
            y = y[..., crop_border:-crop_border, crop_border:-crop_border]
        h, w = y.shape[-2:]
        nh, nw = h // block_size, w // block_size
        if nh == 0 or nw == 0:
            raise ValueError(f"niqe: a {w}x{h} image (after crop_border {crop_border}) is smaller than one "
                             f"{block_size}x{block_size} block; evaluate larger images or set a smaller block_size")
        y = y[..., : nh * block_size, : nw * block_size]
        feats, sharpness = [], None
        for scale in (1, 2):
            coeffs, sigma = mscn(y)
            size = block_size // scale
            blocks = _to_blocks(coeffs, size)
            b, n = blocks.shape[:2]
            feats.append(_block_features(blocks.reshape(b * n, size, size)).reshape(b, n, 18))
            if scale == 1:
                sharpness = _to_blocks(sigma, size).mean(dim=(-1, -2))
                y = matlab_imresize(y, 0.5)
    return torch.cat(feats, dim=-1), sharpness


def _nan_mvg(features: Tensor) -> tuple[Tensor, Tensor, int]:
    """(N, 36) -> (NaN-ignoring mean, covariance of the rows with no NaN (N - 1 normalised), rows used)."""
    mu = torch.nanmean(features, dim=0)
    complete = features[~torch.isnan(features).any(dim=1)]
    n = complete.shape[0]
    if n < 2:  # one block: no spread to estimate; the pristine covariance alone is used
        return mu, torch.zeros(features.shape[1], features.shape[1], dtype=features.dtype, device=features.device), n
    centred = complete - complete.mean(dim=0)
    return mu, centred.T @ centred / (n - 1), n


def niqe_distance(features: Tensor, mu_pristine: Tensor, cov_pristine: Tensor) -> Tensor:
    """sqrt((mu_p - mu)^T ((S_p + S) / 2)^+ (mu_p - mu)) for each image's (n_blocks, 36) features (docs/methods.md 3)."""
    out = []
    mu_p = mu_pristine.to(features)
    cov_p = cov_pristine.to(features)
    for f in features:
        mu, cov, _ = _nan_mvg(f)
        d = mu_p - mu
        out.append(torch.sqrt(d @ torch.linalg.pinv((cov_p + cov) / 2) @ d))
    return torch.stack(out)


@dataclass
class NIQEModel:
    """A pristine MVG: `mu` (36,), `cov` (36, 36), and how it was made (`meta`: block_size, channel, ...)."""

    mu: Tensor
    cov: Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.mu = torch.as_tensor(np.asarray(self.mu, dtype=np.float64)).reshape(-1)
        self.cov = torch.as_tensor(np.asarray(self.cov, dtype=np.float64))
        if self.mu.shape != (N_FEATURES,) or self.cov.shape != (N_FEATURES, N_FEATURES):
            raise ValueError(f"a NIQE model has mu_prisparam of 36 values and cov_prisparam 36x36, got "
                             f"{tuple(self.mu.shape)} and {tuple(self.cov.shape)}")
        if not (torch.isfinite(self.mu).all() and torch.isfinite(self.cov).all()):
            raise ValueError("the NIQE model has non-finite values")


_MU_KEYS = ("mu_prisparam", "mu_pris_param")  # the MATLAB release / BasicSR's npz
_COV_KEYS = ("cov_prisparam", "cov_pris_param")


def load_niqe_model(path: str | Path) -> NIQEModel:
    """A pristine model from `.mat` (the release's modelparameters.mat), `.npz` or `.safetensors` (mu/cov_prisparam)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such NIQE model file (the MATLAB release's modelparameters.mat, or "
                                "one written by `facereward fit-niqe`)")
    meta: dict[str, Any] = {}
    suffix = path.suffix.lower()
    try:
        if suffix == ".mat":
            import scipy.io

            data = scipy.io.loadmat(str(path))
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                data = {k: npz[k] for k in npz.files}
        elif suffix == ".safetensors":
            from safetensors import safe_open
            from safetensors.numpy import load_file

            data = load_file(str(path))
            with safe_open(str(path), framework="numpy") as fh:
                meta = json.loads((fh.metadata() or {}).get("niqe", "{}"))
        else:
            raise ValueError(f"{path}: a NIQE model must be .mat, .npz or .safetensors")
    except (OSError, ValueError) as err:
        if str(err).startswith(str(path)):
            raise
        raise ValueError(f"{path}: cannot read the NIQE model ({err.__class__.__name__}: {err})") from None
    mu = next((data[k] for k in _MU_KEYS if k in data), None)
    cov = next((data[k] for k in _COV_KEYS if k in data), None)
    if mu is None or cov is None:
        found = ", ".join(k for k in data if not k.startswith("__")) or "none"
        raise ValueError(f"{path}: expected keys mu_prisparam and cov_prisparam (found: {found})")
    try:
        return NIQEModel(mu, cov, meta)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def save_niqe_model(path: str | Path, model: NIQEModel) -> Path:
    """Write `model` as `.safetensors` (with its meta) or `.npz`; the keys are the release's mu/cov_prisparam."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"mu_prisparam": model.mu.numpy().astype(np.float64), "cov_prisparam": model.cov.numpy().astype(np.float64)}
    if path.suffix.lower() == ".npz":
        np.savez(path, **arrays)
    elif path.suffix.lower() == ".safetensors":
        from safetensors.numpy import save_file

        save_file(arrays, str(path), metadata={"niqe": json.dumps(model.meta)})
    else:
        raise ValueError(f"{path}: write the NIQE model as .safetensors or .npz")
    return path


def fit_niqe_model(
    images: Iterable[Tensor | np.ndarray],
    block_size: int = BLOCK_SIZE,
    channel: str = "y",
    sharpness_threshold: float = SHARPNESS_THRESHOLD,
) -> NIQEModel:
    """Fit the pristine MVG on pristine images (estimatemodelparam.m; docs/methods.md 3).

    Each image is HWC float [0, 1] (numpy) or (3, H, W) / (1, 3, H, W) (torch), any size of at least one block;
    of each image the blocks with sharpness > `sharpness_threshold` x its sharpest block are kept.
    """
    kept, n_images = [], 0
    for image in images:
        x = torch.from_numpy(np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1))) if isinstance(image, np.ndarray) else image
        x = x[None] if x.ndim == 3 else x
        feats, sharp = niqe_features(x, block_size, channel)
        for f, s in zip(feats, sharp):
            kept.append(f[s > sharpness_threshold * s.max()])
            n_images += 1
    if not kept:
        raise ValueError("fit_niqe_model: no images")
    feats = torch.cat(kept)
    mu, cov, n = _nan_mvg(feats)
    if n < 2:
        raise ValueError(f"fit_niqe_model: only {n} usable patches from {n_images} images; give more (or larger) pristine images")
    if n <= N_FEATURES:
        warnings.warn(f"fit_niqe_model: {n} patches for a 36-d covariance: it is singular; give more pristine images",
                      stacklevel=2)
    meta = {"block_size": block_size, "channel": channel, "sharpness_threshold": sharpness_threshold,
            "n_images": n_images, "n_patches": int(feats.shape[0])}
    return NIQEModel(mu, cov, meta)


class NIQE:
    """NIQE(x): images (B, 3, H, W) in [0, 1] -> (B,) float64, lower is better (docs/methods.md 3).

    `model`: a NIQEModel or a model file. `block_size` and `channel` default to what the model was fitted with
    (its meta), else the release's 96 px and BasicSR's Y channel.
    """

    differentiable = False
    needs_gt = False

    def __init__(self, model: NIQEModel | str | Path, block_size: int | None = None, channel: str | None = None,
                 crop_border: int = 0):
        self.model = model if isinstance(model, NIQEModel) else load_niqe_model(model)
        self.block_size = _check_block_size(block_size or self.model.meta.get("block_size", BLOCK_SIZE))
        self.channel = channel or self.model.meta.get("channel", "y")
        if self.channel not in CHANNELS:
            raise ValueError(f"niqe channel must be one of {', '.join(CHANNELS)}, got {self.channel!r}")
        self.crop_border = int(crop_border)

    def to(self, device: torch.device | str) -> NIQE:
        return self  # the model is moved to the images' device at each call

    def __call__(self, images: Tensor, gt: Tensor | None = None, captions: Any = None) -> Tensor:
        feats, _ = niqe_features(images, self.block_size, self.channel, self.crop_border)
        return niqe_distance(feats, self.model.mu, self.model.cov)
