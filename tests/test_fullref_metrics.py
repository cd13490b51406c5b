"""Full-reference PSNR / SSIM as BasicSR computes them (docs/methods.md section 3).

References used:

* scikit-image. ``peak_signal_noise_ratio(data_range=255)`` is the same formula as BasicSR.
  ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
  data_range=255)`` filters with ``scipy.ndimage.gaussian_filter`` (truncate 3.5 -> radius
  int(3.5*1.5+0.5)=5, i.e. the same 11-tap kernel exp(-x^2/(2*1.5^2)) normalised), mode 'reflect',
  and then averages the SSIM map after cropping ``(win_size-1)//2 = 5`` pixels per side. Inside that
  crop the reflected border never enters the window, so its mean is exactly BasicSR's 'valid' mean;
  C1, C2 and the formula are the same, and with ``channel_axis`` it averages the per-channel means.
  Hence skimage matches to float rounding, no special handling needed.
* A direct numpy transcription of BasicSR's ``calculate_psnr`` / ``_ssim`` / ``calculate_ssim`` /
  ``to_y_channel`` using ``cv2.filter2D`` and ``cv2.getGaussianKernel`` exactly as BasicSR does
  (including its float32 Y conversion), checked to 1e-4.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
from skimage.color import rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from facereward.measures.fullref import psnr, rgb_to_y, ssim

TOL = 1e-4


# ----------------------------------------------------------------------------------------------
# BasicSR reference (basicsr/metrics/psnr_ssim.py + basicsr/utils/matlab_functions.py), HWC numpy.
# Our tensors are RGB; BasicSR's images are BGR, so the reference flips channels before bgr2ycbcr.
# ----------------------------------------------------------------------------------------------
def _bsr_to_y_channel(img_bgr_255: np.ndarray) -> np.ndarray:
    img = img_bgr_255.astype(np.float32) / 255.0
    y = np.dot(img, [24.966, 128.553, 65.481]) + 16.0  # bgr2ycbcr(y_only=True) ...
    y = (y / 255.0).astype(np.float32)  # ... _convert_output_img_type for float32 input
    return y[..., None] * 255.0


def _bsr_prepare(img_rgb_255: np.ndarray, crop_border: int, test_y: bool) -> np.ndarray:
    img = img_rgb_255[..., ::-1]  # RGB -> BGR, as cv2 would have loaded it
    if crop_border != 0:
        img = img[crop_border:-crop_border, crop_border:-crop_border, ...]
    if test_y:
        img = _bsr_to_y_channel(img)
    return img.astype(np.float64)


def bsr_calculate_psnr(img, img2, crop_border, test_y_channel=False):
    img = _bsr_prepare(img, crop_border, test_y_channel)
    img2 = _bsr_prepare(img2, crop_border, test_y_channel)
    mse = np.mean((img - img2) ** 2)
    if mse == 0:
        return float("inf")
    return 10.0 * np.log10(255.0 * 255.0 / mse)


def _bsr_ssim(img, img2):
    c1 = (0.01 * 255) ** 2
    c2 = (0.03 * 255) ** 2
    kernel = cv2.getGaussianKernel(11, 1.5)
    window = np.outer(kernel, kernel.transpose())
    mu1 = cv2.filter2D(img, -1, window)[5:-5, 5:-5]
    mu2 = cv2.filter2D(img2, -1, window)[5:-5, 5:-5]
    mu1_sq = mu1**2
    mu2_sq = mu2**2
    mu1_mu2 = mu1 * mu2
    sigma1_sq = cv2.filter2D(img**2, -1, window)[5:-5, 5:-5] - mu1_sq
    sigma2_sq = cv2.filter2D(img2**2, -1, window)[5:-5, 5:-5] - mu2_sq
    sigma12 = cv2.filter2D(img * img2, -1, window)[5:-5, 5:-5] - mu1_mu2
    ssim_map = ((2 * mu1_mu2 + c1) * (2 * sigma12 + c2)) / ((mu1_sq + mu2_sq + c1) * (sigma1_sq + sigma2_sq + c2))
    return ssim_map.mean()


def bsr_calculate_ssim(img, img2, crop_border, test_y_channel=False):
    img = _bsr_prepare(img, crop_border, test_y_channel)
    img2 = _bsr_prepare(img2, crop_border, test_y_channel)
    ssims = [
        _bsr_ssim(np.ascontiguousarray(img[..., i]), np.ascontiguousarray(img2[..., i])) for i in range(img.shape[2])
    ]
    return np.array(ssims).mean()


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def _pair(b=3, h=40, w=36, seed=0):
    """Correlated random pair in [0,1] (target + noise + blur-ish offset) so SSIM is far from 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(b, 3, h, w, generator=g, dtype=torch.float64)
    target = _smooth(target)
    pred = (target + 0.08 * torch.randn(b, 3, h, w, generator=g, dtype=torch.float64)).clamp(0, 1)
    return pred.float(), target.float()


def _smooth(x):
    # cheap 3x3 box smoothing so images have structure (not iid noise)
    k = torch.ones(3, 1, 3, 3, dtype=x.dtype) / 9
    return torch.nn.functional.conv2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=3)


def _u8(x: torch.Tensor) -> np.ndarray:
    """(B,3,H,W) [0,1] -> (B,H,W,3) float64 on [0,255], quantised exactly like quantize=True."""
    return np.round(np.clip(x.double().numpy(), 0, 1) * 255.0).transpose(0, 2, 3, 1)


# ----------------------------------------------------------------------------------------------
# Agreement with scikit-image
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("crop", [0, 4])
def test_psnr_matches_skimage(crop):
    pred, target = _pair(seed=1)
    ours = psnr(pred, target, crop_border=crop)
    assert ours.shape == (3,) and ours.dtype == torch.float64
    p, t = _u8(pred), _u8(target)
    for i in range(3):
        sl = (slice(crop, -crop or None), slice(crop, -crop or None))
        ref = peak_signal_noise_ratio(t[i][sl], p[i][sl], data_range=255)
        assert abs(ours[i].item() - ref) < TOL, (i, ours[i].item(), ref)


@pytest.mark.parametrize("crop", [0, 3])
def test_ssim_matches_skimage(crop):
    pred, target = _pair(seed=2)
    ours = ssim(pred, target, crop_border=crop)
    assert ours.shape == (3,) and ours.dtype == torch.float64
    p, t = _u8(pred), _u8(target)
    for i in range(3):
        sl = (slice(crop, -crop or None), slice(crop, -crop or None))
        ref = structural_similarity(
            t[i][sl], p[i][sl], gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
            data_range=255, channel_axis=-1,
        )
        assert 0.1 < ref < 0.99  # a non-trivial operating point
        assert abs(ours[i].item() - ref) < TOL, (i, ours[i].item(), ref)


def test_y_psnr_matches_skimage_ycbcr():
    pred, target = _pair(seed=3)
    ours = psnr(pred, target, crop_border=2, y_channel=True)
    p, t = _u8(pred), _u8(target)
    for i in range(3):
        yp = rgb2ycbcr(p[i][2:-2, 2:-2] / 255.0)[..., 0]  # skimage: 16 + 65.481 R + 128.553 G + 24.966 B
        yt = rgb2ycbcr(t[i][2:-2, 2:-2] / 255.0)[..., 0]
        ref = peak_signal_noise_ratio(yt, yp, data_range=255)
        assert abs(ours[i].item() - ref) < TOL, (i, ours[i].item(), ref)


# ----------------------------------------------------------------------------------------------
# Agreement with BasicSR's own code path (cv2.filter2D, float32 to_y_channel)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("crop,y", [(0, False), (4, False), (0, True), (4, True)])
def test_matches_basicsr_reference(crop, y):
    pred, target = _pair(b=2, h=48, w=44, seed=4)
    ps, ss = psnr(pred, target, crop, y), ssim(pred, target, crop, y)
    p, t = _u8(pred), _u8(target)
    for i in range(2):
        assert abs(ps[i].item() - bsr_calculate_psnr(p[i], t[i], crop, y)) < TOL
        assert abs(ss[i].item() - bsr_calculate_ssim(p[i], t[i], crop, y)) < TOL


# ----------------------------------------------------------------------------------------------
# Hand-computed values
# ----------------------------------------------------------------------------------------------
def test_psnr_constant_offset_by_hand():
    a = torch.zeros(1, 3, 16, 16)
    b = torch.full((1, 3, 16, 16), 10 / 255)
    expected = 10 * math.log10(255**2 / 100)  # 28.1308...
    assert abs(psnr(a, b).item() - expected) < 1e-9
    # all-zeros vs all-ones: difference 255 levels -> 10*log10(1) = 0 dB
    assert abs(psnr(a, torch.ones_like(a)).item() - 0.0) < 1e-12
    # offsets in one channel only: mse = 10^2 / 3
    c = a.clone()
    c[:, 1] = 10 / 255
    assert abs(psnr(a, c).item() - 10 * math.log10(255**2 / (100 / 3))) < 1e-9


def test_identical_images_inf_psnr_and_unit_ssim():
    pred, _ = _pair(seed=5)
    assert torch.isinf(psnr(pred, pred)).all() and (psnr(pred, pred) > 0).all()
    assert torch.allclose(ssim(pred, pred), torch.ones(3, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.allclose(ssim(pred, pred, y_channel=True), torch.ones(3, dtype=torch.float64), atol=1e-12, rtol=0)


def test_ssim_constant_images_by_hand():
    # Constant planes: sigma terms vanish, SSIM = (2ab + C1) / (a^2 + b^2 + C1) on the [0,255] scale.
    a, b = 100.0, 120.0
    x = torch.full((1, 3, 20, 20), a / 255)
    y = torch.full((1, 3, 20, 20), b / 255)
    c1 = (0.01 * 255) ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    assert abs(ssim(x, y).item() - expected) < 1e-9


def test_quantize_rounds_to_uint8_levels():
    t = torch.full((1, 3, 16, 16), 0.5)
    p = t + 0.4 / 255  # less than half a level away: same PNG
    assert torch.isinf(psnr(p, t, quantize=True)).all()
    assert abs(psnr(p, t, quantize=False).item() - 10 * math.log10(255**2 / 0.16)) < 1e-4
    # quantize clamps like tensor2img: out-of-range values saturate
    assert torch.isinf(psnr(torch.full_like(t, 1.3), torch.ones_like(t))).all()


# ----------------------------------------------------------------------------------------------
# crop_border
# ----------------------------------------------------------------------------------------------
def test_crop_border_excludes_border_errors():
    target = _pair(b=2, h=32, w=32, seed=6)[1]
    pred = target.clone()
    pred[..., :3, :] = 1 - pred[..., :3, :]  # error confined to a 3-pixel top border
    pred[..., :, -2:] = 0.0  # and a 2-pixel right border
    assert torch.isfinite(psnr(pred, target, crop_border=2)).all()
    assert torch.isinf(psnr(pred, target, crop_border=3)).all()
    assert torch.isfinite(psnr(pred, target)).all()
    assert (ssim(pred, target) < 0.999).all()
    assert torch.allclose(ssim(pred, target, crop_border=3), torch.ones(2, dtype=torch.float64), atol=1e-12, rtol=0)


def test_crop_border_counts_only_inner_pixels():
    # One wrong interior pixel in a 20x20 image: mse is over the cropped 14x14 region.
    t = torch.zeros(1, 3, 20, 20)
    p = t.clone()
    p[0, 0, 10, 10] = 51 / 255
    mse = 51**2 / (3 * 14 * 14)
    assert abs(psnr(p, t, crop_border=3).item() - 10 * math.log10(255**2 / mse)) < 1e-9


# ----------------------------------------------------------------------------------------------
# Y channel
# ----------------------------------------------------------------------------------------------
def test_rgb_to_y_pure_colours_by_hand():
    img = torch.zeros(1, 3, 1, 5, dtype=torch.float64)
    img[0, 0, 0, 0] = 255  # red
    img[0, 1, 0, 1] = 255  # green
    img[0, 2, 0, 2] = 255  # blue
    img[0, :, 0, 3] = 255  # white; pixel 4 stays black
    y = rgb_to_y(img)
    assert y.shape == (1, 1, 1, 5) and y.dtype == torch.float64
    expected = torch.tensor([16 + 65.481, 16 + 128.553, 16 + 24.966, 235.0, 16.0], dtype=torch.float64)
    assert torch.allclose(y[0, 0, 0], expected, atol=1e-9, rtol=0)
    # arbitrary value: (R,G,B)=(200,100,50) -> 16 + (65.481*200 + 128.553*100 + 24.966*50)/255
    px = torch.tensor([200.0, 100.0, 50.0], dtype=torch.float64).view(1, 3, 1, 1)
    assert abs(rgb_to_y(px).item() - (16 + (65.481 * 200 + 128.553 * 100 + 24.966 * 50) / 255)) < 1e-9


def test_y_channel_psnr_uses_luma_only():
    # A chroma change that keeps Y (almost) unchanged barely moves Y-PSNR but strongly moves RGB PSNR.
    t = torch.full((1, 3, 16, 16), 0.5)
    p = t.clone()
    p[:, 0] += 24.966 * 20 / 255 / 255   # +dR
    p[:, 2] -= 65.481 * 20 / 255 / 255   # -dB chosen so 65.481 dR == 24.966 dB up to rounding
    assert psnr(p, t, y_channel=True, quantize=False).item() > 100
    assert psnr(p, t, quantize=False).item() < 50


# ----------------------------------------------------------------------------------------------
# Batching
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("y", [False, True])
def test_batched_equals_per_image(y):
    pred, target = _pair(b=4, h=30, w=26, seed=7)
    bp, bs = psnr(pred, target, 2, y), ssim(pred, target, 2, y)
    for i in range(4):
        assert abs(bp[i].item() - psnr(pred[i : i + 1], target[i : i + 1], 2, y).item()) < 1e-12
        assert abs(bs[i].item() - ssim(pred[i : i + 1], target[i : i + 1], 2, y).item()) < 1e-12
    # and the images really differ, so the batch isn't trivially constant
    assert bp.unique().numel() == 4 and bs.unique().numel() == 4


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", [psnr, ssim])
def test_bad_shapes_raise(fn):
    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(ValueError, match="mismatch"):
        fn(x, torch.rand(2, 3, 32, 30))
    with pytest.raises(ValueError, match="4-D"):
        fn(x[0], x[0])
    with pytest.raises(ValueError, match="channels"):
        fn(x[:, :2], x[:, :2])
    with pytest.raises(ValueError, match="crop_border"):
        fn(x, x, crop_border=-1)
    with pytest.raises(ValueError, match="need at least"):
        fn(x, x, crop_border=16)


def test_ssim_too_small_for_window():
    x = torch.rand(1, 3, 20, 20)
    ssim(x, x, crop_border=4)  # 12x12 left: fine
    with pytest.raises(ValueError, match="11x11"):
        ssim(x, x, crop_border=5)  # 10x10 left
    with pytest.raises(ValueError, match="11x11"):
        ssim(torch.rand(1, 3, 10, 40), torch.rand(1, 3, 10, 40))
    assert torch.isfinite(psnr(x, torch.rand(1, 3, 20, 20), crop_border=5)).all()  # PSNR has no window


def test_rgb_to_y_rejects_non_rgb():
    with pytest.raises(ValueError, match="B, 3, H, W"):
        rgb_to_y(torch.rand(1, 4, 8, 8))
    with pytest.raises(ValueError, match="B, 3, H, W"):
        rgb_to_y(torch.rand(3, 8, 8))
