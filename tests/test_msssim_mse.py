"""The `mse` and `ms-ssim` rows (the LRPO reward server's l2 and ssim terms): MSE and its exp(-c MSE) reward, and
MS-SSIM as pyiqa's `ms_ssim` computes it, against an independent float64 numpy re-implementation and hand cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from facereward.measures import create_measure, get_measure, list_measures
from facereward.measures.msssim import MIN_SIZE, ms_ssim


def _pair(b: int, h: int, w: int, seed: int = 0, noise: float = 0.1):
    g = torch.Generator().manual_seed(seed)
    gt = torch.rand(b, 3, h, w, generator=g)
    return (gt + noise * torch.randn(b, 3, h, w, generator=g)).clamp(0, 1), gt


# ---- the table ------------------------------------------------------------------------------------------------

def test_both_rows_are_in_the_table():
    rows = {s.name: s for s in list_measures()}
    assert {"mse", "ms-ssim"} <= set(rows)
    mse, msssim = get_measure("mse"), get_measure("ms-ssim")
    assert (mse.kind, mse.lower_better, mse.differentiable, mse.reward_params) == ("FR", True, True, ("c",))
    assert (msssim.kind, msssim.lower_better, msssim.differentiable) == ("FR", False, True)
    assert mse.reward is not None and msssim.reward is not None


# ---- mse --------------------------------------------------------------------------------------------------------

def test_mse_by_hand_and_signed_is_four_times_unit():
    x = torch.tensor([[[[0.0, 0.5]]], [[[1.0, 1.0]]]])
    gt = torch.tensor([[[[0.5, 0.5]]], [[[0.0, 1.0]]]])
    unit = create_measure("mse")(x, gt)
    assert unit.tolist() == [0.125, 0.5]  # (0.25 + 0) / 2, (1 + 0) / 2
    assert create_measure("mse", range="signed")(x, gt).tolist() == [0.5, 2.0]
    x, gt = _pair(3, 8, 8)
    unit, signed = create_measure("mse")(x, gt), create_measure("mse", range="signed")(x, gt)
    assert torch.allclose(signed, 4 * unit, rtol=1e-12, atol=0)
    assert torch.allclose(unit, ((x.double() - gt.double()) ** 2).mean(dim=(1, 2, 3)), rtol=1e-12, atol=0)
    assert create_measure("mse")(gt, gt).tolist() == [0.0, 0.0, 0.0]


def test_mse_reward_is_the_servers_l2_term():
    x, gt = _pair(3, 8, 8, seed=1, noise=0.2)
    xs, gs = 2 * x - 1, 2 * gt - 1  # the server's images are on [-1, 1]
    server = torch.exp(-15 * F.mse_loss(xs, gs, reduction="none").mean(dim=[1, 2, 3]))
    reward = create_measure("mse", as_reward=True)(x, gt)
    assert reward.dtype == torch.float32 and reward.shape == (3,)
    assert torch.allclose(reward, server, rtol=1e-6, atol=0)
    # by hand: unit MSE 0.125 -> signed 0.5 -> exp(-7.5); c and range are options
    a, b = torch.tensor([[[[0.0, 0.5]]]]), torch.tensor([[[[0.5, 0.5]]]])
    assert create_measure("mse", as_reward=True)(a, b).item() == pytest.approx(math.exp(-7.5), rel=1e-6)
    assert create_measure("mse", as_reward=True, c=2.0, range="unit")(a, b).item() == pytest.approx(math.exp(-0.25), rel=1e-6)
    # no clamp, as the server: values outside [0, 1] count as given
    assert create_measure("mse", as_reward=True)(a + 1, b).item() == pytest.approx(math.exp(-15 * 4 * 1.125), rel=1e-5)


def test_mse_gradients_and_errors():
    x, gt = _pair(2, 8, 8)
    x = x.requires_grad_(True)
    create_measure("mse", as_reward=True)(x, gt).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="range must be 'unit' or 'signed', got 'pm1'"):
        create_measure("mse", range="pm1")
    with pytest.raises(ValueError, match="option 'c' applies only to its reward form"):
        create_measure("mse", c=3.0)
    with pytest.raises(ValueError, match="c must be > 0"):
        create_measure("mse", as_reward=True, c=0.0)(x, gt)
    with pytest.raises(ValueError, match="shape mismatch"):
        create_measure("mse")(x, gt[:, :, :4])


# ---- ms-ssim: an independent float64 numpy re-implementation ---------------------------------------------------

def _np_window() -> np.ndarray:
    r = np.arange(11, dtype=np.float64) - 5.0
    h = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * 1.5**2))
    h /= h.sum()
    return h.astype(np.float32).astype(np.float64)  # pyiqa keeps its window as float32


def _np_valid(img: np.ndarray, win: np.ndarray) -> np.ndarray:
    patches = np.lib.stride_tricks.sliding_window_view(img, win.shape)
    return np.einsum("ijkl,kl->ij", patches, win)


def _np_halve(img: np.ndarray) -> np.ndarray:
    """avg_pool2d(2) with padding (H % 2, W % 2) on both ends, zeros counted: an odd side is ceil(s / 2)."""
    ph, pw = img.shape[0] % 2, img.shape[1] % 2
    p = np.pad(img, ((ph, ph), (pw, pw)))
    oh, ow = (p.shape[0] - 2) // 2 + 1, (p.shape[1] - 2) // 2 + 1
    return p[: 2 * oh, : 2 * ow].reshape(oh, 2, ow, 2).mean(axis=(1, 3))


def _np_ms_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """x, y: (H, W) luma on integer levels of [0, 255], float64."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    weights = np.array([0.0448, 0.2856, 0.3001, 0.2363, 0.1333], dtype=np.float32).astype(np.float64)
    win, out = _np_window(), 1.0
    for k in range(5):
        if k:
            x, y = _np_halve(x), _np_halve(y)
        m1, m2 = _np_valid(x, win), _np_valid(y, win)
        v1 = _np_valid(x * x, win) - m1 * m1
        v2 = _np_valid(y * y, win) - m2 * m2
        v12 = _np_valid(x * y, win) - m1 * m2
        cs = np.maximum((2 * v12 + c2) / (v1 + v2 + c2), 0)
        lum = (2 * m1 * m2 + c1) / (m1 * m1 + m2 * m2 + c1)
        out *= (lum * cs).mean() ** weights[k] if k == 4 else cs.mean() ** weights[k]
    return out


def _np_luma_levels(rgb8: np.ndarray) -> np.ndarray:
    """(3, H, W) uint8 -> Y of YIQ on integer levels (the 8-bit inputs avoid rounding ties, see the caller)."""
    r, g, b = rgb8.astype(np.float64)
    return np.round(0.299 * r + 0.587 * g + 0.114 * b)


def _untie(img8: np.ndarray) -> np.ndarray:
    """8-bit (B, 3, H, W) images whose 0.299 R + 0.587 G + 0.114 B is never k + 0.5 (a tie that float32 and float64
    may round differently): R moves by one level where it would be."""
    img = img8.astype(np.int64)
    tie = (299 * img[:, 0] + 587 * img[:, 1] + 114 * img[:, 2]) % 1000 == 500
    img[:, 0][tie] = np.where(img[:, 0][tie] < 255, img[:, 0][tie] + 1, 254)
    assert not ((299 * img[:, 0] + 587 * img[:, 1] + 114 * img[:, 2]) % 1000 == 500).any()
    return img.astype(np.uint8)


def test_ms_ssim_matches_a_numpy_reimplementation_on_odd_sizes():
    h, w = 165, 171  # odd sides pad: 165 -> 83 -> 42 -> 21 -> 11, 171 -> 86 -> 43 -> 22 -> 11 (the smallest 5th scale)
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 256, size=(2, 3, h, w))
    pred[:, :, h // 3: h // 2] //= 2  # some structure: a darker band
    pred8 = _untie(pred)
    target8 = _untie(np.clip(pred8 + rng.integers(-30, 31, size=pred8.shape), 0, 255))
    pred, target = torch.from_numpy(pred8).float() / 255, torch.from_numpy(target8).float() / 255
    got = ms_ssim(pred, target)
    assert got.dtype == torch.float64 and got.shape == (2,)
    want = [_np_ms_ssim(_np_luma_levels(pred8[i]), _np_luma_levels(target8[i])) for i in range(2)]
    assert 0.1 < min(want) < max(want) < 0.99
    assert np.allclose(got.numpy(), want, rtol=1e-10, atol=0)
    # the same on a 1-channel (luma) input, used as it is
    luma_p = torch.from_numpy(np.stack([_np_luma_levels(p) for p in pred8]))[:, None] / 255
    luma_t = torch.from_numpy(np.stack([_np_luma_levels(t) for t in target8]))[:, None] / 255
    assert np.allclose(ms_ssim(luma_p, luma_t).numpy(), want, rtol=1e-10, atol=0)


def test_ms_ssim_by_hand_on_flat_images():
    # flat gray images on levels a, b, even side 176 = 16 * 11 (no padding at any halving). The window's entries are
    # float32, so they sum to s != 1 in float64: mu = a s, sigma_a^2 = a^2 s (1 - s), sigma_ab = a b s (1 - s), the
    # same at every scale; the score is cs ** (w1 + ... + w5) * l ** w5
    a, b = 100, 140
    x, gt = torch.full((1, 3, 176, 176), a / 255), torch.full((1, 3, 176, 176), b / 255)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = float(_np_window().sum())
    assert s != 1.0
    cs = (2 * a * b * s * (1 - s) + c2) / ((a * a + b * b) * s * (1 - s) + c2)
    lum = (2 * a * b * s * s + c1) / ((a * a + b * b) * s * s + c1)
    w = [float(np.float32(v)) for v in (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)]
    assert ms_ssim(x, gt).item() == pytest.approx(cs ** sum(w) * lum ** w[4], rel=1e-11)
    # with an exactly normalised window it would be l ** w5 alone, 1.7e-7 away
    assert ms_ssim(x, gt).item() != pytest.approx(((2 * a * b + c1) / (a * a + b * b + c1)) ** w[4], rel=1e-8)


def test_ms_ssim_of_identical_images_is_one_and_it_drops_with_noise():
    x, gt = _pair(2, MIN_SIZE, 170, seed=2)
    assert torch.allclose(ms_ssim(gt, gt), torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-12)
    lo, hi = ms_ssim(x, gt), ms_ssim(*_pair(2, MIN_SIZE, 170, seed=2, noise=0.02))
    assert (lo < hi).all() and (hi < 1).all()
    assert torch.allclose(create_measure("ms-ssim")(x, gt), lo, rtol=1e-12, atol=0)


def test_ms_ssim_is_differentiable_and_its_reward_is_the_score():
    x, gt = _pair(2, 176, 176, seed=3)
    x = x.requires_grad_(True)
    reward = create_measure("ms-ssim", as_reward=True)(x, gt)
    assert reward.dtype == torch.float32
    assert torch.allclose(reward, ms_ssim(x.detach(), gt).float(), rtol=1e-6, atol=0)
    reward.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # the 8-bit rounding is straight-through: a step along the gradient raises the score
    with torch.no_grad():
        stepped = ms_ssim(x + 4 / 255 * x.grad / x.grad.abs().max(), gt)
    assert (stepped > reward.double()).all()
    # the reward clamps to [0, 1] first (as the LRPO server does); the metric form does not
    assert torch.allclose(create_measure("ms-ssim", as_reward=True)(x.detach() * 1.5, gt),
                          ms_ssim((x.detach() * 1.5).clamp(0, 1), gt).float())


def test_ms_ssim_refuses_images_too_small_for_five_scales():
    assert MIN_SIZE == 161
    x, gt = _pair(1, 160, 200)
    with pytest.raises(ValueError, match=r"ms_ssim: image 160x200 is too small for 5 scales; each side must be at least 161"):
        ms_ssim(x, gt)
    with pytest.raises(ValueError, match="at least 161 pixels"):
        create_measure("ms-ssim", as_reward=True)(x, gt)
    ms_ssim(*_pair(1, 161, 161))  # the minimum works
    with pytest.raises(ValueError, match="shape mismatch"):
        ms_ssim(x, gt[..., :150])
    with pytest.raises(ValueError, match="3 \\(RGB\\) or 1 channels, got 2"):
        ms_ssim(x[:, :2], gt[:, :2])
