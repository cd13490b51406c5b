"""Haar low-pass band and DWT_L1 (docs/methods.md 1.2): hand-checked values, padding, gradients."""

from __future__ import annotations

import pytest
import torch

from facereward.measures.wavelet import dtcwt_lowpass, haar_lowpass, lowpass, lowpass_l1


def test_one_level_haar_ll_by_hand():
    x = torch.arange(16, dtype=torch.float64).view(1, 1, 4, 4)
    # blocks [[0,1],[4,5]], [[2,3],[6,7]], [[8,9],[12,13]], [[10,11],[14,15]]: LL = sum / 2
    expected = torch.tensor([[10.0, 18.0], [42.0, 50.0]], dtype=torch.float64) / 2
    assert torch.equal(haar_lowpass(x, levels=1)[0, 0], expected)
    assert torch.equal(haar_lowpass(x, levels=1, normalise=True)[0, 0], expected / 2)


def test_constant_image_gains_a_factor_two_per_level():
    x = torch.full((2, 3, 16, 16), 0.25, dtype=torch.float64)
    for levels, want in [(0, 0.25), (1, 0.5), (2, 1.0), (3, 2.0)]:
        ll = haar_lowpass(x, levels=levels)
        assert ll.shape == (2, 3, 16 // 2**levels, 16 // 2**levels)
        assert torch.allclose(ll, torch.full_like(ll, want))


def test_orthonormal_energy_of_ll_never_exceeds_the_image_energy():
    x = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert haar_lowpass(x, 1).pow(2).sum() <= x.pow(2).sum()
    ramp = torch.zeros(1, 1, 2, 2, dtype=torch.float64) + 3.0  # a constant block keeps all its energy
    assert torch.isclose(haar_lowpass(ramp, 1).pow(2).sum(), ramp.pow(2).sum())


def test_odd_sizes_are_padded_by_reflection():
    x = torch.arange(9, dtype=torch.float64).view(1, 1, 3, 3)
    ll = haar_lowpass(x, levels=1)
    assert ll.shape == (1, 1, 2, 2)
    # reflect-padded to [[0,1,2,1],[3,4,5,4],[6,7,8,7],[3,4,5,4]]
    expected = torch.tensor([[0 + 1 + 3 + 4, 2 + 1 + 5 + 4], [6 + 7 + 3 + 4, 8 + 7 + 5 + 4]], dtype=torch.float64) / 2
    assert torch.equal(ll[0, 0], expected)
    assert haar_lowpass(torch.rand(2, 3, 20, 13), levels=3).shape == (2, 3, 3, 2)


def test_lowpass_l1_zero_on_identical_and_positive_otherwise():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, 32, 32, generator=g)
    assert torch.equal(lowpass_l1(x, x), torch.zeros(3))
    y = x.clone()
    y[1] += 0.1
    d = lowpass_l1(y, x)  # the project's default: the original's 3-level DT-CWT, unnormalised
    assert d.shape == (3,)
    assert d[0] == 0 and d[2] == 0
    assert torch.isclose(d[1], torch.tensor(0.1 * 4), atol=1e-5)  # the DT-CWT low-pass has gain 4 at 3 levels
    haar = lowpass_l1(y, x, wavelet="haar")
    assert torch.isclose(haar[1], torch.tensor(0.1 * 8), atol=1e-5)  # a shift of 0.1 -> 0.1 * 2^3 in Haar's LL


def test_lowpass_l1_ignores_high_frequencies_that_pixel_l1_sees():
    x = torch.full((1, 1, 16, 16), 0.5)
    checker = (torch.arange(16).view(-1, 1) + torch.arange(16).view(1, -1)) % 2 * 0.2 - 0.1
    y = x + checker  # zero-mean in every 2x2 block
    assert (y - x).abs().mean() > 0.09
    assert lowpass_l1(y, x, wavelet="haar") < 1e-6
    assert lowpass_l1(y, x) < 0.05 * (y - x).abs().mean()  # the dual-tree low-pass keeps 2.7% of it (its gain is 4)


def test_gradients_flow_to_the_input():
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    gt = torch.rand(2, 3, 16, 16)
    lowpass_l1(x, gt).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_errors_are_clear():
    with pytest.raises(ValueError, match="shape mismatch"):
        lowpass_l1(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match="levels"):
        haar_lowpass(torch.rand(1, 3, 8, 8), levels=-1)
    with pytest.raises(ValueError, match="B, C, H, W"):
        haar_lowpass(torch.rand(3, 8, 8))


# The DT-CWT low-pass (near_sym_b, qshift_b, 3 levels) of this 16x16 pattern, as pytorch_wavelets'
# DTCWTForward computes it (float64), recorded once; our implementation is independent of that package.
_DTCWT_REFERENCE = [1.392665, 0.162618, -0.544741, -0.259971, 0.351202, 0.983877, 1.954174, 2.639231,
                    0.285688, 2.031154, 4.319928, 5.677716, 1.145745, 2.64185, 5.115438, 6.980971]


def test_dtcwt_lowpass_matches_the_reference_transform():
    i = torch.arange(16, dtype=torch.float64)
    x = (torch.sin(i[:, None] * 0.7) * torch.cos(i[None, :] * 0.3) + 0.01 * i[:, None] * i[None, :]).view(1, 1, 16, 16)
    low = dtcwt_lowpass(x, levels=3)
    assert low.shape == (1, 1, 4, 4)
    assert torch.allclose(low.flatten(), torch.tensor(_DTCWT_REFERENCE, dtype=torch.float64), atol=2e-6)


def test_dtcwt_sizes_gain_and_normalise():
    assert dtcwt_lowpass(torch.rand(2, 3, 64, 64), 3).shape == (2, 3, 16, 16)  # level 1 keeps the size
    assert dtcwt_lowpass(torch.rand(1, 3, 33, 47), 2).shape == (1, 3, 18, 24)  # odd sizes extended
    const = torch.full((1, 3, 32, 32), 0.5, dtype=torch.float64)
    assert torch.allclose(dtcwt_lowpass(const, 3), torch.full((1, 3, 8, 8), 0.5 * 4, dtype=torch.float64))  # x2 per q-shift level
    assert torch.allclose(lowpass(const, 3, "dtcwt", normalise=True), torch.full((1, 3, 8, 8), 0.5, dtype=torch.float64))


def test_lowpass_l1_dtcwt_variant_and_unknown_wavelet():
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    gt = torch.rand(2, 3, 32, 32)
    d = lowpass_l1(x, gt, wavelet="dtcwt")
    d.sum().backward()
    assert d.shape == (2,) and x.grad.abs().sum() > 0
    assert lowpass_l1(gt, gt, wavelet="dtcwt").abs().max() == 0
    with pytest.raises(ValueError, match="wavelet must be one of haar, dtcwt"):
        lowpass_l1(x, gt, wavelet="db4")
