"""Degradation pipeline: determinism, preset ranges (docs/methods.md section 0), registry, severity."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from facereward.data.degradation import (
    DegradationPreset,
    degrade,
    get_degradation,
    list_degradations,
    make_blur_kernel,
    register_degradation,
)

# docs/methods.md section 0, copied here on purpose: the test must fail if the code drifts from the spec.
SPEC = {
    "diffbir": dict(sigma=(0.1, 12), down=(1, 12), noise=(0, 15), jpeg=(30, 100), jitter=0.0, gray=0.0),
    "codeformer": dict(sigma=(1, 15), down=(4, 30), noise=(0, 20), jpeg=(30, 80), jitter=0.0, gray=0.0),
    "gfpgan": dict(sigma=(0.1, 10), down=(0.8, 8), noise=(0, 20), jpeg=(60, 100), jitter=0.3, gray=0.01),
    "difface": dict(sigma=(0.1, 15), down=(0.8, 32), noise=(0, 20), jpeg=(30, 100), jitter=0.0, gray=0.01),
}


def structured_image(size: int = 64, square: int = 16) -> np.ndarray:
    """Checkerboard on a colour gradient: edges that blur, downsampling and noise destroy.

    Squares are large enough (16 px) that mild blur keeps most of them: with finer squares even
    strength 0.2 flattens the image and PSNR saturates.
    """
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    checker = (((np.arange(size)[:, None] // square) + (np.arange(size)[None, :] // square)) % 2).astype(np.float32)
    img = np.stack([0.2 + 0.6 * x, 0.2 + 0.6 * y, 0.5 * (x + y)], axis=2) * 0.5 + 0.5 * checker[:, :, None]
    return np.clip(img, 0, 1).astype(np.float32)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((a.astype(np.float64) - b) ** 2)))


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return structured_image()


def test_same_seed_index_same_bytes_regardless_of_order(image):
    first = {i: degrade(image, "diffbir", seed=3, index=i)[0].tobytes() for i in range(4)}
    again = {i: degrade(image, "diffbir", seed=3, index=i)[0].tobytes() for i in reversed(range(4))}
    assert first == again
    assert len(set(first.values())) == 4  # different index -> different LQ
    assert degrade(image, "diffbir", seed=4, index=0)[0].tobytes() != first[0]


def test_output_shape_dtype_range(image):
    for name in SPEC:
        for index in range(5):
            lq, _ = degrade(image, name, seed=0, index=index)
            assert lq.shape == image.shape and lq.dtype == np.float32
            assert lq.min() >= 0.0 and lq.max() <= 1.0
    rect = image[:20, :37]
    assert degrade(rect, "codeformer", index=1)[0].shape == rect.shape
    tiny = image[:5, :7]  # smaller than the 41-px kernel and than the downsample factor
    assert degrade(tiny, "difface", index=2)[0].shape == tiny.shape


@pytest.mark.parametrize("name", list(SPEC))
def test_sampled_params_within_preset_ranges(name):
    spec = SPEC[name]
    img = np.full((8, 8, 3), 0.5, np.float32)
    kinds, jitters, grays = set(), 0, 0
    for index in range(200):
        _, p = degrade(img, name, seed=1, index=index)
        json.dumps(p)  # JSON-serialisable
        assert p["preset"] == name and p["kernel_size"] == 41
        kinds.add(p["kernel"])
        lo, hi = spec["sigma"]
        assert lo <= p["sigma_x"] <= hi and lo <= p["sigma_y"] <= hi
        if p["kernel"] == "isotropic":
            assert p["sigma_x"] == p["sigma_y"]
        else:
            assert -math.pi <= p["rotation"] <= math.pi
        assert spec["down"][0] <= p["downsample"] <= spec["down"][1]
        assert spec["noise"][0] <= p["noise_sigma"] <= spec["noise"][1]
        assert isinstance(p["jpeg_quality"], int) and spec["jpeg"][0] <= p["jpeg_quality"] <= spec["jpeg"][1]
        if p["color_jitter"] is not None:
            jitters += 1
            assert len(p["color_jitter"]) == 3 and all(abs(v) <= 20 / 255 for v in p["color_jitter"])
        grays += bool(p["gray"])
    assert kinds == {"isotropic", "anisotropic"}
    if spec["jitter"] == 0:
        assert jitters == 0
    else:
        assert 30 <= jitters <= 90  # p = 0.3 over 200 draws
    if spec["gray"] == 0:
        assert grays == 0


def test_preset_objects_match_spec():
    for name, spec in SPEC.items():
        p = get_degradation(name)
        assert p.blur_sigma == spec["sigma"] and p.downsample == spec["down"]
        assert p.noise_sigma == spec["noise"] and p.jpeg_quality == spec["jpeg"]
        assert p.color_jitter_p == spec["jitter"] and p.gray_p == spec["gray"]
        assert p.p_isotropic == 0.5 and p.blur_kernel_size == 41


def test_gray_and_jitter_applied():
    always = DegradationPreset("always-gray-jitter", color_jitter_p=1.0, gray_p=1.0, noise_sigma=(10, 10))
    lq, p = degrade(structured_image(), always, index=0)
    assert p["gray"] and p["color_jitter"] is not None
    assert np.array_equal(lq[..., 0], lq[..., 1]) and np.array_equal(lq[..., 1], lq[..., 2])
    lq_color, _ = degrade(structured_image(), "diffbir", index=0)
    assert not np.array_equal(lq_color[..., 0], lq_color[..., 1])


@pytest.mark.parametrize("sx,sy,rot", [(0.1, 0.1, 0.0), (3.0, 3.0, 0.0), (12.0, 2.0, 1.0), (1.5, 9.0, -2.5)])
def test_kernel_normalised(sx, sy, rot):
    k = make_blur_kernel(41, sx, sy, rot)
    assert k.shape == (41, 41)
    assert abs(float(k.sum(dtype=np.float64)) - 1.0) < 1e-5
    assert (k >= 0).all() and k[20, 20] == k.max()


def test_anisotropic_kernel_is_rotated():
    k = make_blur_kernel(41, 8.0, 1.0, 0.0)
    # long axis along x: spread along the row through the centre, not the column
    assert k[20, 30] > 10 * k[30, 20]
    k90 = make_blur_kernel(41, 8.0, 1.0, math.pi / 2)
    assert np.allclose(k90, k.T, atol=1e-7)


def test_registry_callable_roundtrip(image):
    def invert(img, rng):
        return 1.0 - img, {"flip": bool(rng.random() < 2)}

    register_degradation("test-invert", invert)
    try:
        assert "test-invert" in list_degradations()
        assert get_degradation("test-invert") is invert
        lq, p = degrade(image, "test-invert", seed=0, index=0)
        assert np.allclose(lq, 1.0 - image) and p == {"preset": "test-invert", "flip": True}
        with pytest.raises(ValueError, match="already registered"):
            register_degradation("test-invert", invert)
        with pytest.raises(ValueError, match="strength"):
            degrade(image, "test-invert", strength=0.5)
    finally:
        from facereward.data import degradation

        degradation._REGISTRY.unregister("test-invert")


def test_registry_preset_roundtrip(image):
    mine = DegradationPreset("test-mild", blur_sigma=(0.5, 0.5), downsample=(2, 2), noise_sigma=(0, 0), jpeg_quality=(95, 95))
    register_degradation("test-mild", mine)
    try:
        lq, p = degrade(image, "test-mild", index=7)
        assert p["downsample"] == 2 and p["jpeg_quality"] == 95 and p["noise_sigma"] == 0
        assert np.array_equal(lq, degrade(image, mine, index=7)[0])
    finally:
        from facereward.data import degradation

        degradation._REGISTRY.unregister("test-mild")


def test_unknown_name_lists_known():
    with pytest.raises(ValueError, match=r"unknown degradation 'nope'.*codeformer, difface, diffbir, gfpgan"):
        get_degradation("nope")
    with pytest.raises(ValueError, match="unknown degradation"):
        degrade(np.zeros((8, 8, 3), np.float32), "nope")


def test_invalid_presets_rejected():
    with pytest.raises(ValueError, match="lo > hi"):
        DegradationPreset("bad", blur_sigma=(5, 1))
    with pytest.raises(ValueError, match="odd"):
        DegradationPreset("bad", blur_kernel_size=40)
    with pytest.raises(ValueError, match="jpeg_quality"):
        DegradationPreset("bad", jpeg_quality=(0, 101))


@pytest.mark.parametrize("name", list(SPEC))
def test_strength_is_monotone(image, name):
    scores = {s: psnr(degrade(image, name, seed=0, index=0, strength=s)[0], image) for s in (0.0, 0.2, 0.6, 1.0)}
    assert scores[1.0] < scores[0.2] - 0.9
    assert scores[1.0] <= scores[0.6] <= scores[0.2] <= scores[0.0]


def test_strength_params_fixed_points(image):
    _, p = degrade(image, "diffbir", strength=0.5)
    assert p["kernel"] == "isotropic" and p["sigma_x"] == pytest.approx(0.1 + 0.5 * 11.9)
    assert p["downsample"] == pytest.approx(6.5) and p["noise_sigma"] == pytest.approx(7.5)
    assert p["jpeg_quality"] == 65 and p["color_jitter"] is None and not p["gray"]
    _, p1 = degrade(image, "gfpgan", strength=1.0, index=3)
    assert p1["jpeg_quality"] == 60 and p1["downsample"] == pytest.approx(8.0)  # harshest end
    with pytest.raises(ValueError, match="strength"):
        degrade(image, "diffbir", strength=1.5)


def test_blur_and_noise_each_lower_psnr(image):
    """Blur alone and noise alone, each more severe at strength 1 than at 0.2."""
    blur = DegradationPreset("blur-only", blur_sigma=(0.1, 6), downsample=(1, 1), noise_sigma=(0, 0), jpeg_quality=(100, 100))
    noise = DegradationPreset("noise-only", blur_sigma=(0.1, 0.1), downsample=(1, 1), noise_sigma=(0, 30), jpeg_quality=(100, 100))
    for preset in (blur, noise):
        weak = psnr(degrade(image, preset, strength=0.2)[0], image)
        strong = psnr(degrade(image, preset, strength=1.0)[0], image)
        assert strong < weak - 3.0, preset.name


def test_uint8_input_and_bad_shape(image):
    u8 = np.round(image * 255).astype(np.uint8)
    assert np.array_equal(degrade(u8, index=2)[0], degrade(u8.astype(np.float32) / 255, index=2)[0])
    with pytest.raises(ValueError, match="HWC RGB"):
        degrade(image[..., 0])
