"""Synthetic blind-face-restoration degradation (docs/methods.md section 0), numpy + OpenCV.

Images are float32 HWC RGB in [0, 1]. The pipeline, in this order:

    blur (Gaussian kernel, isotropic or anisotropic) -> bilinear downsample to int(w // f) -> Gaussian noise
    -> JPEG -> bilinear resize back to the HQ size -> [colour jitter] -> [gray] -> [round to 8 bit]

Presets (docs/methods.md section 0; noise sigma on the 0..255 scale):

    preset      blur sigma   downsample   noise     JPEG       colour jitter  gray
    diffbir     [0.1, 12]    [1, 12]      [0, 15]   [30, 100)  -              -
    codeformer  [1, 15]      [4, 30]      [0, 20]   [30, 80)   -              -
    gfpgan      [0.1, 10]    [0.8, 8]     [0, 20]   [60, 100)  p=0.3          p=0.01
    difface     [0.1, 15]    [0.8, 32]    [0, 20]   [30, 100)  -              p=0.01

All use a 41x41 kernel, isotropic with p=0.5, else anisotropic (two sigmas from the range and a
rotation in U[-pi, pi]). JPEG quality is an integer from [lo, hi), as numpy's randint (DiffBIR's and both
seeds' datasets) and BasicSR's int(uniform(lo, hi)) draw it. Every LQ is a pure function of (image, preset,
seed, index[, noise variant]).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

import cv2
import numpy as np

from facereward.registry import Registry

__all__ = [
    "DegradationPreset",
    "DegradationFn",
    "make_blur_kernel",
    "sample_degradation_params",
    "apply_degradation",
    "degrade",
    "register_degradation",
    "get_degradation",
    "list_degradations",
]

Range = tuple[float, float]
_NOISE_STREAM = 2  # third seed word of a noise variant's own stream
DegradationFn = Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, dict]]


@dataclass(frozen=True)
class DegradationPreset:
    """Parameter ranges of the degradation pipeline; every range (lo, hi) is sampled uniformly.

    Defaults are the DiffBIR ranges. `noise_sigma` and `color_jitter_shift` are on the 0..255 scale.
    Colour jitter follows GFPGAN's `color_jitter`: each channel is shifted by its own
    U[-shift, shift] / 255 (shift 20), applied with probability `color_jitter_p` after the pipeline;
    gray (probability `gray_p`) then turns the LQ into 3-channel gray, also as GFPGAN does.
    """

    name: str
    blur_kernel_size: int = 41
    blur_sigma: Range = (0.1, 12.0)
    p_isotropic: float = 0.5
    downsample: Range = (1.0, 12.0)
    noise_sigma: Range = (0.0, 15.0)
    jpeg_quality: tuple[int, int] = (30, 100)  # integers from [lo, hi) (lo when lo == hi)
    color_jitter_p: float = 0.0
    color_jitter_shift: float = 20.0
    gray_p: float = 0.0

    def __post_init__(self) -> None:
        for field in ("blur_sigma", "downsample", "noise_sigma", "jpeg_quality"):
            lo, hi = getattr(self, field)
            if not lo <= hi:
                raise ValueError(f"degradation preset {self.name!r}: {field} range ({lo}, {hi}) has lo > hi")
            object.__setattr__(self, field, (lo, hi))
        k = self.blur_kernel_size
        if k < 1 or k % 2 == 0:
            raise ValueError(f"degradation preset {self.name!r}: blur_kernel_size must be odd and positive, got {k}")
        if self.blur_sigma[0] <= 0:
            raise ValueError(f"degradation preset {self.name!r}: blur_sigma must be > 0, got {self.blur_sigma}")
        if self.downsample[0] <= 0:
            raise ValueError(f"degradation preset {self.name!r}: downsample factor must be > 0, got {self.downsample}")
        if self.noise_sigma[0] < 0:
            raise ValueError(f"degradation preset {self.name!r}: noise_sigma must be >= 0, got {self.noise_sigma}")
        q_lo, q_hi = self.jpeg_quality
        if int(q_lo) != q_lo or int(q_hi) != q_hi or not 1 <= q_lo <= q_hi <= 100:
            raise ValueError(f"degradation preset {self.name!r}: jpeg_quality must be integers in [1, 100], got {self.jpeg_quality}")
        object.__setattr__(self, "jpeg_quality", (int(q_lo), int(q_hi)))
        for field in ("p_isotropic", "color_jitter_p", "gray_p"):
            p = getattr(self, field)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"degradation preset {self.name!r}: {field} must be in [0, 1], got {p}")

    def to_dict(self) -> dict[str, Any]:
        """The preset as a JSON-serialisable dict."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


# --------------------------------------------------------------------------- the pipeline


def make_blur_kernel(kernel_size: int, sigma_x: float, sigma_y: float | None = None, rotation: float = 0.0) -> np.ndarray:
    """A (kernel_size, kernel_size) float32 Gaussian kernel summing to 1.

    Anisotropic when sigma_y differs from sigma_x: covariance R diag(sigma_x^2, sigma_y^2) R^T with
    R the rotation by `rotation` radians (BasicSR's bivariate Gaussian).
    """
    sigma_y = sigma_x if sigma_y is None else sigma_y
    half = kernel_size // 2
    ax = np.arange(-half, half + 1, dtype=np.float64)
    xx, yy = np.meshgrid(ax, ax)
    c, s = math.cos(rotation), math.sin(rotation)
    rot = np.array([[c, -s], [s, c]])
    cov = rot @ np.diag([sigma_x**2, sigma_y**2]) @ rot.T
    inv = np.linalg.inv(cov)
    expo = inv[0, 0] * xx * xx + (inv[0, 1] + inv[1, 0]) * xx * yy + inv[1, 1] * yy * yy
    kernel = np.exp(-0.5 * expo)
    return (kernel / kernel.sum()).astype(np.float32)


def _at(rng_range: Range, strength: float) -> float:
    lo, hi = rng_range
    return float(lo + strength * (hi - lo))


def sample_degradation_params(
    preset: DegradationPreset, rng: np.random.Generator, strength: float | None = None
) -> dict[str, Any]:
    """Draw one set of pipeline parameters from `preset` (JSON-serialisable dict).

    With `strength` in [0, 1] nothing is drawn: every range sits at lo + strength * (hi - lo),
    the kernel is isotropic, no jitter, no gray. JPEG quality is the exception, taken as
    hi - strength * (hi - lo), so that a larger strength is always a harsher degradation.
    """
    if strength is not None:
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        sigma = _at(preset.blur_sigma, strength)
        q_lo, q_hi = preset.jpeg_quality  # a fixed ladder from hi (strength 0) to lo, not a draw
        return {
            "preset": preset.name,
            "strength": float(strength),
            "kernel": "isotropic",
            "kernel_size": preset.blur_kernel_size,
            "sigma_x": sigma,
            "sigma_y": sigma,
            "rotation": 0.0,
            "downsample": _at(preset.downsample, strength),
            "noise_sigma": _at(preset.noise_sigma, strength),
            "jpeg_quality": int(round(q_hi - strength * (q_hi - q_lo))),
            "color_jitter": None,
            "gray": False,
        }

    if rng.random() < preset.p_isotropic:
        kernel = "isotropic"
        sigma_x = sigma_y = float(rng.uniform(*preset.blur_sigma))
        rotation = 0.0
    else:
        kernel = "anisotropic"
        sigma_x = float(rng.uniform(*preset.blur_sigma))
        sigma_y = float(rng.uniform(*preset.blur_sigma))
        rotation = float(rng.uniform(-math.pi, math.pi))
    params: dict[str, Any] = {
        "preset": preset.name,
        "strength": None,
        "kernel": kernel,
        "kernel_size": preset.blur_kernel_size,
        "sigma_x": sigma_x,
        "sigma_y": sigma_y,
        "rotation": rotation,
        "downsample": float(rng.uniform(*preset.downsample)),
        "noise_sigma": float(rng.uniform(*preset.noise_sigma)),
        "jpeg_quality": int(rng.integers(preset.jpeg_quality[0], max(preset.jpeg_quality[1], preset.jpeg_quality[0] + 1))),
        "color_jitter": None,
        "gray": False,
    }
    if preset.color_jitter_p > 0 and rng.random() < preset.color_jitter_p:
        shift = preset.color_jitter_shift / 255.0
        params["color_jitter"] = [float(v) for v in rng.uniform(-shift, shift, 3)]
    if preset.gray_p > 0 and rng.random() < preset.gray_p:
        params["gray"] = True
    return params


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    # OpenCV's JPEG expects BGR; the YCbCr conversion inside JPEG depends on channel order.
    bgr = cv2.cvtColor(np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8), cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", bgr, [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
    if not ok:
        raise RuntimeError("OpenCV failed to JPEG-encode the image")
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0


def apply_degradation(image: np.ndarray, params: dict[str, Any], rng: np.random.Generator, quantize: bool = True) -> np.ndarray:
    """Run the pipeline with fixed `params` (from `sample_degradation_params`); `rng` draws the noise.

    Returns float32 HWC in [0, 1], same shape as `image`, rounded to 8-bit levels when `quantize` (as GFPGAN does and
    as an LQ file is; both seeds' training data is not rounded).
    """
    h, w = image.shape[:2]
    kernel = make_blur_kernel(params["kernel_size"], params["sigma_x"], params["sigma_y"], params["rotation"])
    out = cv2.filter2D(image, -1, kernel, borderType=cv2.BORDER_REFLECT_101)

    factor = params["downsample"]
    lq_w, lq_h = max(1, int(w // factor)), max(1, int(h // factor))  # int(w // f), as the seeds' and DiffBIR's datasets
    out = cv2.resize(out, (lq_w, lq_h), interpolation=cv2.INTER_LINEAR)

    if params["noise_sigma"] > 0:
        out = out + rng.standard_normal(out.shape, dtype=np.float32) * np.float32(params["noise_sigma"] / 255.0)
    out = np.clip(out, 0.0, 1.0)

    out = _jpeg(out, params["jpeg_quality"])
    out = cv2.resize(out, (w, h), interpolation=cv2.INTER_LINEAR)

    if params.get("color_jitter") is not None:
        out = np.clip(out + np.asarray(params["color_jitter"], dtype=np.float32), 0.0, 1.0)
    if params.get("gray"):
        out = np.repeat(cv2.cvtColor(np.clip(out, 0.0, 1.0), cv2.COLOR_RGB2GRAY)[:, :, None], 3, axis=2)
    if not quantize:
        return np.clip(out, 0.0, 1.0).astype(np.float32)
    return (np.clip(np.round(out * 255.0), 0, 255) / 255.0).astype(np.float32)


# --------------------------------------------------------------------------- registry

_REGISTRY: Registry[DegradationPreset | DegradationFn] = Registry("degradation")


def register_degradation(name: str, preset_or_callable: DegradationPreset | DegradationFn, overwrite: bool = False) -> None:
    """Make a preset, or a callable `(image, rng) -> (lq, params)`, available under `name`."""
    if not isinstance(preset_or_callable, DegradationPreset) and not callable(preset_or_callable):
        raise TypeError(f"degradation {name!r}: expected a DegradationPreset or a callable (image, rng) -> (lq, params), "
                        f"got {type(preset_or_callable).__name__}")
    _REGISTRY.register(name, preset_or_callable, overwrite)


def get_degradation(name: str) -> DegradationPreset | DegradationFn:
    """The preset or callable registered as `name`; ValueError listing the known names otherwise."""
    return _REGISTRY.get(name)


def list_degradations() -> list[str]:
    """Registered degradation names, sorted."""
    return _REGISTRY.names()


for _preset in (
    DegradationPreset("diffbir"),
    DegradationPreset("codeformer", blur_sigma=(1.0, 15.0), downsample=(4.0, 30.0), noise_sigma=(0.0, 20.0), jpeg_quality=(30, 80)),
    DegradationPreset("gfpgan", blur_sigma=(0.1, 10.0), downsample=(0.8, 8.0), noise_sigma=(0.0, 20.0), jpeg_quality=(60, 100),
                      color_jitter_p=0.3, gray_p=0.01),
    DegradationPreset("difface", blur_sigma=(0.1, 15.0), downsample=(0.8, 32.0), noise_sigma=(0.0, 20.0), jpeg_quality=(30, 100),
                      gray_p=0.01),
):
    register_degradation(_preset.name, _preset)
del _preset


# --------------------------------------------------------------------------- entry point


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"degrade expects an HWC RGB image, got shape {image.shape}")
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    if not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"degrade expects float [0, 1] or uint8 pixels, got dtype {image.dtype}")
    return np.ascontiguousarray(image, dtype=np.float32)


def degrade(
    image: np.ndarray,
    preset: str | DegradationPreset | DegradationFn = "diffbir",
    seed: int = 0,
    index: int = 0,
    strength: float | None = None,
    noise_variant: int = 0,
    quantize: bool = True,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Degrade one HQ image; returns (lq float32 HWC in [0, 1], JSON-serialisable params).

    Deterministic per (seed, index), whatever the call order: the generator is
    `np.random.default_rng([seed, index])`. `strength` in [0, 1] replaces sampling with a fixed,
    monotone severity (presets only; see `sample_degradation_params`). `noise_variant` > 0 keeps the
    parameters of (seed, index) but draws the Gaussian noise from its own stream (presets only): copies of one
    image that differ only in their noise, as the LRPO original's groups. `quantize`: round to 8-bit levels.
    """
    if seed < 0 or index < 0 or noise_variant < 0:
        raise ValueError(f"seed, index and noise_variant must be non-negative, got seed={seed}, index={index}, "
                         f"noise_variant={noise_variant}")
    image = _check_image(image)
    spec = get_degradation(preset) if isinstance(preset, str) else preset
    name = preset if isinstance(preset, str) else getattr(spec, "name", getattr(spec, "__name__", type(spec).__name__))
    rng = np.random.default_rng([int(seed), int(index)])

    if isinstance(spec, DegradationPreset):
        params = sample_degradation_params(spec, rng, strength)
        noise_rng = rng if noise_variant == 0 else np.random.default_rng([int(seed), int(index), _NOISE_STREAM, int(noise_variant)])
        return apply_degradation(image, params, noise_rng, quantize), params

    if noise_variant:
        raise ValueError(f"degradation {name!r} is a callable; per-copy noise (noise_variant) needs a DegradationPreset")
    if strength is not None:
        raise ValueError(f"degradation {name!r} is a callable; strength works only with a DegradationPreset")
    if not callable(spec):
        raise TypeError(f"preset must be a name, a DegradationPreset or a callable, got {type(spec).__name__}")
    result = spec(image, rng)
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], dict)):
        raise TypeError(f"degradation {name!r} must return (lq, params_dict)")
    lq = np.asarray(result[0], dtype=np.float32)
    if lq.shape != image.shape:
        raise ValueError(f"degradation {name!r} returned shape {lq.shape}; expected the input shape {image.shape}")
    params = {"preset": name, **result[1]}
    return np.clip(lq, 0.0, 1.0), params
