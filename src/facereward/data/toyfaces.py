"""The procedural face world: deterministic synthetic faces with identities, landmarks and captions.

Faces are drawn in a canonical head frame (origin at the face centre, x right, y down, one unit
about half a face width), given a pseudo-depth, turned by the per-image pose and rendered at
`size * ss` pixels with anti-aliased OpenCV fills and lines, then area-downsampled to `size`.
Identity traits come from (world seed, identity id); per-image parameters from
(world seed, identity id, image index). Landmarks follow the iBUG/dlib 68-point order, in
output pixel coordinates where pixel (0, 0) has its centre at (0, 0).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import cv2
import numpy as np

SKIN_TONES: dict[str, tuple[float, float, float]] = {
    "pale": (0.97, 0.86, 0.78),
    "fair": (0.94, 0.78, 0.66),
    "light": (0.87, 0.68, 0.54),
    "olive": (0.76, 0.58, 0.42),
    "tan": (0.64, 0.45, 0.31),
    "brown": (0.48, 0.32, 0.22),
    "dark": (0.34, 0.22, 0.15),
}
HAIR_COLORS: dict[str, tuple[float, float, float]] = {
    "black": (0.07, 0.06, 0.06),
    "dark brown": (0.20, 0.12, 0.07),
    "brown": (0.40, 0.25, 0.13),
    "auburn": (0.50, 0.20, 0.09),
    "red": (0.75, 0.32, 0.12),
    "blonde": (0.88, 0.72, 0.43),
    "grey": (0.72, 0.72, 0.72),
}
EYE_COLORS: dict[str, tuple[float, float, float]] = {
    "dark brown": (0.20, 0.11, 0.05),
    "brown": (0.40, 0.22, 0.08),
    "hazel": (0.52, 0.44, 0.18),
    "green": (0.24, 0.56, 0.30),
    "blue": (0.25, 0.48, 0.80),
    "grey": (0.55, 0.60, 0.65),
}
HAIR_STYLES = ("short", "long", "bob", "curly", "buzz")
GLASSES_SHAPES = ("round", "square", "oval")
FRAME_COLORS = {"black": (0.05, 0.05, 0.06), "tortoise": (0.30, 0.16, 0.07), "gold": (0.80, 0.64, 0.30)}
SPLITS = ("train", "test")

_UNIT = 0.29  # canonical unit in output pixels per image size
_CENTER = (0.5, 0.47)  # canonical origin, as a fraction of the image size


# --------------------------------------------------------------------------------------------
# Parameters


@dataclass(frozen=True)
class IdentityTraits:
    """Everything about one identity that stays fixed across its images (canonical units)."""

    identity: int
    face_width: float
    jaw_exponent: float
    jaw_drop: float
    chin_length: float
    eye_y: float
    eye_sep: float
    eye_width: float
    eye_height: float
    eye_tilt: float
    nose_length: float
    nose_width: float
    mouth_gap: float
    mouth_width: float
    lip_upper: float
    lip_lower: float
    brow_gap: float
    brow_thickness: float
    brow_arch: float
    ear_size: float
    skin_name: str
    skin_rgb: tuple[float, float, float]
    skin_roughness: float
    lip_rgb: tuple[float, float, float]
    hair_name: str
    hair_rgb: tuple[float, float, float]
    hair_style: str
    hair_volume: float
    hairline: float
    bangs: bool
    parting: float
    eye_name: str
    eye_rgb: tuple[float, float, float]
    iris_phases: tuple[float, ...]
    lash_length: float
    freckles: np.ndarray = field(repr=False)  # (k, 4): x, y, radius, opacity (canonical)
    glasses: str | None = None
    frame_name: str = "black"
    frame_thickness: float = 0.02
    hair_seed: int = 0


@dataclass
class ToyFaceSpec:
    """Per-image parameters; with the world seed it fully determines one render."""

    identity: int
    image_index: int
    world_seed: int = 0
    yaw: float = 0.0
    roll: float = 0.0
    scale: float = 1.0
    shift: tuple[float, float] = (0.0, 0.0)  # fraction of the image size
    smile: float = 0.0
    mouth_open: float = 0.0
    eye_open: float = 1.0
    brow_raise: float = 0.0
    gaze: tuple[float, float] = (0.0, 0.0)
    light_azimuth: float = -math.pi / 2  # image-plane direction the light comes from (y down)
    light_elevation: float = 1.0  # pi/2 = straight from the front
    light_strength: float = 0.5
    background: tuple[tuple[float, float, float], ...] = ((0.5, 0.5, 0.5), (0.6, 0.6, 0.6))
    background_angle: float = 0.0
    blobs: tuple[tuple[float, ...], ...] = ()  # (x, y, radius, r, g, b, opacity) in image fractions
    clothing_rgb: tuple[float, float, float] = (0.2, 0.3, 0.5)
    noise_seed: int = 0
    expression: str = "neutral"  # what smile, mouth_open, eye_open and brow_raise were drawn for


@dataclass
class ToyFace:
    """One rendered face: float32 HWC RGB image in [0, 1], (68, 2) pixel landmarks, caption."""

    image: np.ndarray
    landmarks: np.ndarray
    caption: str
    identity: int
    split: str
    spec: ToyFaceSpec | None = None


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in keys])


def _jitter_rgb(rng: np.random.Generator, rgb: tuple[float, float, float], amount: float) -> tuple[float, float, float]:
    out = np.clip(np.asarray(rgb) * (1.0 + rng.uniform(-amount, amount)) + rng.uniform(-amount, amount, 3) * 0.3, 0, 1)
    return tuple(float(v) for v in out)


@lru_cache(maxsize=4096)
def identity_traits(world_seed: int, identity: int) -> IdentityTraits:
    """The fixed traits of `identity` in the world with `world_seed`."""
    r = _rng(world_seed, identity, 101)
    u = r.uniform
    skin_name = str(r.choice(list(SKIN_TONES)))
    skin = _jitter_rgb(r, SKIN_TONES[skin_name], 0.05)
    hair_name = str(r.choice(list(HAIR_COLORS), p=[0.22, 0.2, 0.18, 0.1, 0.1, 0.14, 0.06]))
    hair = _jitter_rgb(r, HAIR_COLORS[hair_name], 0.08)
    style = str(r.choice(HAIR_STYLES, p=[0.3, 0.25, 0.17, 0.16, 0.12]))
    volumes = {"short": u(0.1, 0.2), "long": u(0.1, 0.2), "bob": u(0.12, 0.22), "curly": u(0.28, 0.42), "buzz": u(0.02, 0.04)}
    volume = volumes[style]
    eye_name = str(r.choice(list(EYE_COLORS)))
    eye = _jitter_rgb(r, EYE_COLORS[eye_name], 0.08)
    lip_rgb = np.asarray(skin) * np.array([0.95, 0.62, 0.62]) + np.array([0.08, 0.0, 0.02]) * u(0.5, 1.5)
    lip = tuple(float(v) for v in np.clip(lip_rgb, 0, 1))
    eye_y = u(-0.28, -0.17)
    n_freckles = int(r.choice([0, 0, 0, 0, 0, 0, int(u(40, 80)), int(u(80, 150))]))
    fx = r.normal(0, 0.3, n_freckles)
    fy = eye_y + 0.3 + r.normal(0, 0.09, n_freckles) - 0.1 * np.exp(-fx * fx / 0.02)
    freckles = np.stack([fx, fy, u(0.007, 0.016, n_freckles), u(0.2, 0.45, n_freckles)], 1).reshape(-1, 4)
    freckles.flags.writeable = False
    glasses = str(r.choice(GLASSES_SHAPES)) if u() < 0.35 else None
    frame_name = str(r.choice(list(FRAME_COLORS)))
    return IdentityTraits(
        identity=identity,
        face_width=u(0.8, 0.92),
        jaw_exponent=u(0.62, 1.05),
        jaw_drop=u(0.85, 1.3),
        chin_length=u(0.4, 0.52),
        eye_y=eye_y,
        eye_sep=u(0.34, 0.41),
        eye_width=u(0.15, 0.19),
        eye_height=u(0.36, 0.5),
        eye_tilt=u(-0.02, 0.04),
        nose_length=u(0.44, 0.6),
        nose_width=u(0.11, 0.18),
        mouth_gap=u(0.22, 0.3),
        mouth_width=u(0.24, 0.33),
        lip_upper=u(0.04, 0.08),
        lip_lower=u(0.055, 0.1),
        brow_gap=u(0.2, 0.27),
        brow_thickness=u(0.035, 0.075),
        brow_arch=u(0.02, 0.07),
        ear_size=u(0.85, 1.15),
        skin_name=skin_name,
        skin_rgb=skin,
        skin_roughness=u(0.015, 0.04),
        lip_rgb=lip,
        hair_name=hair_name,
        hair_rgb=hair,
        hair_style=style,
        hair_volume=volume,
        hairline=u(-1.08, -0.92),
        bangs=bool(style != "buzz" and u() < 0.3),
        parting=u(-0.45, 0.45),
        eye_name=eye_name,
        eye_rgb=eye,
        iris_phases=tuple(float(v) for v in u(0, 2 * math.pi, 4)),
        lash_length=u(0.22, 0.4),
        freckles=freckles,
        glasses=glasses,
        frame_name=frame_name,
        frame_thickness=u(0.012, 0.03),
        hair_seed=int(r.integers(0, 2**31 - 1)),
    )


def image_spec(world_seed: int, identity: int, image_index: int) -> ToyFaceSpec:
    """The per-image parameters of image `image_index` of `identity`."""
    r = _rng(world_seed, identity, image_index, 202)
    u = r.uniform
    hue = u(0, 1)
    bg = tuple(_hsv(hue + u(-0.12, 0.12), u(0.1, 0.5), u(0.35, 0.95)) for _ in range(2))
    n_blobs = int(r.integers(2, 6))
    blobs = tuple((u(0, 1), u(0, 1), u(0.1, 0.4), *_hsv(u(0, 1), u(0.1, 0.6), u(0.3, 1.0)), u(0.2, 0.6)) for _ in range(n_blobs))
    expression = r.choice(["neutral", "smile", "laugh", "surprise", "sleepy"], p=[0.35, 0.3, 0.12, 0.13, 0.1])
    smiles = {"neutral": u(0, 0.25), "smile": u(0.5, 1.0), "laugh": u(0.7, 1.0), "surprise": u(0, 0.2), "sleepy": u(0, 0.3)}
    smile = smiles[expression]
    mouth_open = {"laugh": u(0.5, 1.0), "surprise": u(0.5, 1.0)}.get(expression, u(0, 0.12))
    eye_open = {"surprise": u(1.1, 1.3), "sleepy": u(0.15, 0.45)}.get(expression, u(0.8, 1.05))
    brow_raise = {"surprise": u(0.06, 0.12)}.get(expression, u(-0.02, 0.03))
    return ToyFaceSpec(
        identity=identity,
        image_index=image_index,
        world_seed=world_seed,
        yaw=u(-0.32, 0.32),
        roll=u(-0.14, 0.14),
        scale=u(0.92, 1.08),
        shift=(u(-0.03, 0.03), u(-0.025, 0.025)),
        smile=smile,
        mouth_open=mouth_open,
        eye_open=eye_open,
        brow_raise=brow_raise,
        gaze=(u(-0.3, 0.3), u(-0.15, 0.1)),
        light_azimuth=u(-math.pi, 0.0),
        light_elevation=u(0.3, 1.45),
        light_strength=u(0.3, 0.7),
        background=bg,
        background_angle=u(0, 2 * math.pi),
        blobs=blobs,
        clothing_rgb=_hsv(u(0, 1), u(0.2, 0.8), u(0.15, 0.8)),
        noise_seed=int(r.integers(0, 2**31 - 1)),
        expression=str(expression),
    )


def _hsv(h: float, s: float, v: float) -> tuple[float, float, float]:
    h = (h % 1.0) * 6.0
    i, f = int(h) % 6, h - int(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    return [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]


# --------------------------------------------------------------------------------------------
# Geometry


def _mirror(points: np.ndarray) -> np.ndarray:
    return points * np.array([-1.0, 1.0])


def _resample(curve: np.ndarray, n: int) -> np.ndarray:
    """`n` points evenly spaced in arc length along a polyline."""
    seg = np.linalg.norm(np.diff(curve, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    t = np.linspace(0, s[-1], n)
    return np.stack([np.interp(t, s, curve[:, 0]), np.interp(t, s, curve[:, 1])], 1)


def _spline(points: np.ndarray, per: int = 8, closed: bool = False) -> np.ndarray:
    """Catmull-Rom curve through `points` with `per` samples per segment."""
    p = np.asarray(points, dtype=np.float64)
    if closed:
        p = np.vstack([p[-1:], p, p[:2]])
    else:
        p = np.vstack([2 * p[:1] - p[1:2], p, 2 * p[-1:] - p[-2:-1]])
    windows = np.stack([p[i : len(p) - 3 + i] for i in range(4)], 1)  # (segments, 4, 2)
    c = np.einsum("tk,skd->std", _catmull_rom_basis(per), windows).reshape(-1, 2)
    return c if closed else np.vstack([c, p[-2:-1]])


@lru_cache(maxsize=32)
def _catmull_rom_basis(per: int) -> np.ndarray:
    t = np.linspace(0, 1, per, endpoint=False)[:, None]
    return 0.5 * np.hstack([-t + 2 * t**2 - t**3, 2 - 5 * t**2 + 3 * t**3, t + 4 * t**2 - 3 * t**3, -(t**2) + t**3])


def _canonical_landmarks(t: IdentityTraits, s: ToyFaceSpec) -> np.ndarray:
    """The 68 landmarks in the canonical head frame (before pose)."""
    lm = np.zeros((68, 2))
    w, ye = t.face_width, t.eye_y
    tip = ye + t.nose_length
    ym = tip + t.mouth_gap
    chin = ym + t.chin_length + 0.3 * s.mouth_open * 0.14
    y0 = ye + 0.06
    a = np.linspace(0, math.pi / 2, 80)
    jaw = np.stack([-w * np.cos(a) ** t.jaw_exponent, y0 + (chin - y0) * np.sin(a) ** t.jaw_drop], 1)
    left = _resample(jaw, 9)
    lm[0:9] = left
    lm[9:17] = _mirror(left[:8][::-1])

    x_in, x_out = t.eye_sep - t.eye_width * 0.95, t.eye_sep + t.eye_width * 1.3
    y_in = ye - t.brow_gap - s.brow_raise
    y_out = ye - t.brow_gap * 0.72 - s.brow_raise * 0.7
    f = np.array([1.0, 0.75, 0.5, 0.25, 0.0])  # 17..21 go from the outer end to the inner end
    brow = np.stack([-(x_in + (x_out - x_in) * f), y_in + (y_out - y_in) * f - t.brow_arch * np.sin(math.pi * f**0.8)], 1)
    lm[17:22] = brow
    lm[22:27] = _mirror(brow[::-1])

    lm[27:31] = np.stack([np.zeros(4), ye - 0.02 + (tip - ye + 0.02) * np.array([0, 0.33, 0.66, 1.0])], 1)
    nw = t.nose_width
    lm[31:33] = [[-nw, tip + 0.05], [-nw * 0.5, tip + 0.08]]
    lm[33] = [0, tip + 0.095]
    lm[34:36] = _mirror(lm[31:33][::-1])

    eh = t.eye_width * t.eye_height * max(s.eye_open, 0.03)
    cx = -t.eye_sep
    out_c = np.array([cx - t.eye_width, ye - t.eye_tilt])
    in_c = np.array([cx + t.eye_width * 0.95, ye + 0.005])
    up = [out_c + (in_c - out_c) * g - [0, eh * math.sin(math.pi * g) ** 0.8 * 1.05] for g in (1 / 3, 2 / 3)]
    lo = [out_c + (in_c - out_c) * g + [0, eh * 0.75 * math.sin(math.pi * g)] for g in (2 / 3, 1 / 3)]
    eye = np.array([out_c, up[0], up[1], in_c, lo[0], lo[1]])
    lm[36:42] = eye
    lm[42:48] = _mirror(eye[[3, 2, 1, 0, 5, 4]])

    mw = t.mouth_width * (1 + 0.15 * s.smile)
    gap = s.mouth_open * 0.14
    yu, yl = ym - gap * 0.3, ym + gap * 0.7
    ut, lt = t.lip_upper, t.lip_lower
    half_outer = np.array([
        [-mw, ym],  # 48
        [-mw * 0.6, yu - ut * 0.8],  # 49
        [-mw * 0.22, yu - ut * 1.1],  # 50
        [0, yu - ut * 0.92],  # 51
    ])
    lm[48:52] = half_outer
    lm[52:55] = _mirror(half_outer[:3][::-1])
    lm[55:58] = [[mw * 0.6, yl + lt * 0.85], [mw * 0.25, yl + lt * 1.0], [0, yl + lt * 1.05]]
    lm[58:60] = _mirror(lm[55:57][::-1])
    lm[60:63] = [[-mw * 0.88, ym], [-mw * 0.4, yu - 0.004], [0, yu]]
    lm[63:65] = _mirror(lm[60:62][::-1])
    lm[65:68] = [[mw * 0.4, yl + 0.004], [0, yl], [-mw * 0.4, yl + 0.004]]
    bend = lm[48:68, 0] / mw
    lm[48:68, 1] -= s.smile * 0.09 * bend**2 - s.smile * 0.015
    return lm


@dataclass
class _Pose:
    """Canonical head frame -> internal (supersampled) pixel coordinates, pixel-centre convention."""

    cx: float
    cy: float
    unit: float  # internal pixels per canonical unit
    yaw: float
    roll: float
    width: float
    ss: int

    def depth(self, p: np.ndarray) -> np.ndarray:
        return 0.85 * np.sqrt(np.clip(1.0 - (p[..., 0] / (self.width * 1.1)) ** 2, 0.0, 1.0))

    def __call__(self, p: np.ndarray, z: np.ndarray | None = None) -> np.ndarray:
        """Project canonical points (..., 2) at depth `z` (default: on the face surface)."""
        p = np.asarray(p, dtype=np.float64)
        zz = self.depth(p) if z is None else z
        xr = p[..., 0] * math.cos(self.yaw) + zz * math.sin(self.yaw)
        yr = p[..., 1]
        cr, sr = math.cos(self.roll), math.sin(self.roll)
        x = self.cx + self.unit * (xr * cr - yr * sr)
        y = self.cy + self.unit * (xr * sr + yr * cr)
        return np.stack([x, y], -1) - 0.5

    def inverse(self, xx: np.ndarray, yy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Image points -> yawed canonical (x already turned; good for shading)."""
        dx, dy = (xx + 0.5 - self.cx) / self.unit, (yy + 0.5 - self.cy) / self.unit
        cr, sr = math.cos(self.roll), math.sin(self.roll)
        return dx * cr + dy * sr, -dx * sr + dy * cr


def _landmark_depths(t: IdentityTraits, lm: np.ndarray, pose: _Pose) -> np.ndarray:
    dz = np.zeros(68)
    dz[27:31] = np.array([0.03, 0.12, 0.22, 0.32]) * t.nose_length / 0.5
    dz[31:36] = [0.1, 0.17, 0.2, 0.17, 0.1]
    dz[48:68] = 0.06
    dz[36:48] = -0.04
    return pose.depth(lm) + dz


# --------------------------------------------------------------------------------------------
# Drawing


def _smoothstep(e0: float | np.ndarray, e1: float | np.ndarray, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


class _Canvas:
    """A float RGB image plus anti-aliased mask drawing limited to regions of interest."""

    def __init__(self, image: np.ndarray):
        self.img = image
        self.n = image.shape[0]
        self.head = np.zeros(image.shape[:2], np.float32)
        self.head_box: tuple[int, int, int, int] | None = None

    def roi(self, points: np.ndarray | list[np.ndarray], pad: float = 2.0) -> tuple[int, int, int, int] | None:
        if isinstance(points, list):
            pts = np.concatenate([np.asarray(p).reshape(-1, 2) for p in points])
        else:
            pts = np.asarray(points).reshape(-1, 2)
        x0 = max(int(math.floor(pts[:, 0].min() - pad)), 0)
        y0 = max(int(math.floor(pts[:, 1].min() - pad)), 0)
        x1 = min(int(math.ceil(pts[:, 0].max() + pad)) + 1, self.n)
        y1 = min(int(math.ceil(pts[:, 1].max() + pad)) + 1, self.n)
        return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None

    def mask(
        self,
        polys: list[np.ndarray] | np.ndarray,
        roi: tuple[int, int, int, int],
        fill: bool = True,
        thickness: int = 1,
    ) -> np.ndarray:
        """Anti-aliased coverage in [0, 1] of filled polygons or polylines, cropped to `roi`."""
        x0, y0, x1, y1 = roi
        m = np.zeros((y1 - y0, x1 - x0), np.uint8)
        if isinstance(polys, np.ndarray):
            arrs = list(np.round((polys - (x0, y0)) * 16).astype(np.int32))
        else:
            arrs = [np.round((np.asarray(p) - (x0, y0)) * 16).astype(np.int32) for p in polys]
        if fill:
            for a in arrs:
                cv2.fillPoly(m, [a], 255, cv2.LINE_AA, 4)
        else:
            cv2.polylines(m, arrs, False, 255, max(int(thickness), 1), cv2.LINE_AA, 4)
        return m.astype(np.float32) * (1.0 / 255.0)

    def grid(self, roi: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        x0, y0, x1, y1 = roi
        return np.arange(x0, x1, dtype=np.float32)[None, :], np.arange(y0, y1, dtype=np.float32)[:, None]

    def paint(self, alpha: np.ndarray, roi: tuple[int, int, int, int], color, opacity: float = 1.0, head: bool = False) -> None:
        x0, y0, x1, y1 = roi
        sub = self.img[y0:y1, x0:x1]
        a = alpha * opacity if opacity != 1.0 else alpha
        sub += (np.asarray(color, np.float32) - sub) * a[..., None]
        if head:
            np.maximum(self.head[y0:y1, x0:x1], a, out=self.head[y0:y1, x0:x1])
            b = self.head_box or roi
            self.head_box = (min(b[0], x0), min(b[1], y0), max(b[2], x1), max(b[3], y1))

    def fill(self, polys: np.ndarray | list[np.ndarray], color, opacity: float = 1.0, head: bool = False) -> None:
        polys = polys if isinstance(polys, list) else [polys]
        roi = self.roi(polys)
        if roi is not None:
            self.paint(self.mask(polys, roi), roi, color, opacity, head)

    def lines(self, polys: list[np.ndarray] | np.ndarray, color, width: float, opacity: float = 1.0) -> None:
        """Anti-aliased polylines of `width` internal pixels; thinner than 1 px fades instead."""
        if len(polys) == 0:
            return
        roi = self.roi(polys, pad=width + 2)
        if roi is None:
            return
        m = self.mask(polys, roi, fill=False, thickness=int(round(width)))
        self.paint(m, roi, color, opacity * min(1.0, width))


def _rgb(c, k: float = 1.0) -> np.ndarray:
    return np.clip(np.asarray(c, np.float32) * k, 0, 1)


def _background(s: ToyFaceSpec, n: int) -> np.ndarray:
    low = max(8, n // 8)
    yy, xx = np.mgrid[0:low, 0:low].astype(np.float32) / (low - 1)
    g = (xx - 0.5) * math.cos(s.background_angle) + (yy - 0.5) * math.sin(s.background_angle) + 0.5
    c0, c1 = (np.asarray(c, np.float32) for c in s.background[:2])
    img = c0 + (c1 - c0) * np.clip(g, 0, 1)[..., None]
    for bx, by, br, r, gg, b, op in s.blobs:
        a = np.exp(-((xx - bx) ** 2 + (yy - by) ** 2) / (2 * br * br)) * op
        img += (np.array([r, gg, b], np.float32) - img) * a[..., None]
    return cv2.resize(img, (n, n), interpolation=cv2.INTER_CUBIC).clip(0, 1)


def _texture(rng: np.random.Generator, out_size: int, n: int, rough: float) -> np.ndarray:
    """Skin grain at output-pixel scale plus mottling at face scale, as a relative brightness change."""
    fine = rng.normal(0.0, 1.0, (out_size, out_size)).astype(np.float32)
    fine = cv2.GaussianBlur(fine, (0, 0), 0.6) * (rough * 1.2)
    pores = (rng.random((out_size, out_size)) < 0.03).astype(np.float32) * (-rough * 1.5)
    low = max(4, out_size // 6)
    mottle = rng.normal(0, rough * 0.5, (low, low)).astype(np.float32)
    mottle = cv2.resize(mottle, (out_size, out_size), interpolation=cv2.INTER_CUBIC)
    tex = fine + pores + mottle
    return cv2.resize(tex, (n, n), interpolation=cv2.INTER_NEAREST)


def _hair_guides(t: IdentityTraits, ychin: float, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Inner and outer guide curves of one half of the hair, from the parting down (side -1 = image left)."""
    w = t.face_width
    cy, ax, by = -0.3, w * 1.03, 1.05
    vol = t.hair_volume
    axo, byo = ax + vol, by + vol * 0.9
    theta_p = t.parting * 0.8
    style = t.hair_style
    theta_end = {"short": math.pi / 2 + 0.3, "buzz": math.pi / 2 + 0.15}.get(style, math.pi / 2)
    y_end = {"long": 2.6, "bob": ychin - 0.05, "curly": ychin + 0.25}.get(style)
    th = np.linspace(theta_p, side * theta_end, 60)
    outer = np.stack([axo * np.sin(th), cy - byo * np.cos(th)], 1)
    inner = np.stack([ax * np.sin(th), cy - by * np.cos(th)], 1)
    if y_end is not None:
        ys = np.linspace(cy, y_end, 40)[1:]
        flare = 0.18 if style == "bob" else 0.1
        grow = (ys - cy) / (y_end - cy)
        outer = np.vstack([outer, np.stack([side * (axo + flare * grow**2 * (1 + vol)), ys], 1)])
        inner = np.vstack([inner, np.stack([side * w * 0.82 + 0 * ys, ys], 1)])
    return _resample(outer, 96), _resample(inner, 96)


def _hairline(t: IdentityTraits) -> np.ndarray:
    """Forehead hairline from the image-right temple to the image-left temple (canonical)."""
    w = t.face_width
    side = t.eye_y - 0.3
    top = t.eye_y - t.brow_gap - 0.17 if t.bangs else t.hairline
    b = np.linspace(0, math.pi, 41)
    x = w * 0.92 * np.cos(b)
    y = side + (top - side) * np.sin(b) ** (0.35 if t.bangs else 0.7)
    if t.bangs:
        r = _rng(t.hair_seed, 7)
        y = y + r.uniform(0, 0.06, len(b)) * np.sin(b)
    return np.stack([x, y], 1)


def _chin_y(t: IdentityTraits) -> float:
    return t.eye_y + t.nose_length + t.mouth_gap + t.chin_length


@lru_cache(maxsize=256)
def _hair_strands(world_seed: int, identity: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Strand polylines in canonical coordinates (m, k, 2), their tones, and the hair region polygon."""
    t = identity_traits(world_seed, identity)
    r = _rng(t.hair_seed, 1)
    guides = {side: _hair_guides(t, _chin_y(t), side) for side in (-1, 1)}
    style = t.hair_style
    curly = style == "curly"
    n_side = {"short": 170, "long": 260, "bob": 220, "curly": 260, "buzz": 320}[style]
    k = {"curly": 40, "long": 20, "bob": 16}.get(style, 12)
    strands = []
    for side in (-1, 1):
        o, i_ = guides[side]
        u = r.uniform(0.05, 1.0, n_side) ** 0.7  # lane between the inner and outer guide
        if style == "buzz":
            s0 = r.uniform(0, 0.9, n_side)
            s1 = np.clip(s0 + r.uniform(0.04, 0.12, n_side), 0, 1)
        else:
            s0 = r.uniform(0.0, 0.12, n_side)
            s1 = np.clip(s0 + r.uniform(0.45, 1.1, n_side), 0, 1)
        ss = s0[:, None] + (s1 - s0)[:, None] * np.linspace(0, 1, k)[None, :]
        idx = ss * (len(o) - 1)
        lo = np.floor(idx).astype(int).clip(0, len(o) - 2)
        fr = (idx - lo)[..., None]
        po = o[lo] * (1 - fr) + o[lo + 1] * fr
        pi = i_[lo] * (1 - fr) + i_[lo + 1] * fr
        pts = pi + (po - pi) * u[:, None, None]
        tang = np.gradient(pts, axis=1)
        nrm = np.stack([-tang[..., 1], tang[..., 0]], -1)
        nrm /= np.linalg.norm(nrm, axis=-1, keepdims=True) + 1e-9
        amp = r.uniform(0.03, 0.06, n_side) if curly else r.uniform(0.0, 0.015, n_side)
        freq = r.uniform(5, 9, n_side) if curly else r.uniform(0.5, 2.0, n_side)
        ph = r.uniform(0, 2 * math.pi, n_side)
        wig = amp[:, None] * np.sin(2 * math.pi * freq[:, None] * ss + ph[:, None])
        strands.append(pts + nrm * wig[..., None])
    # strands combed from the parting toward the forehead
    n_top = {"buzz": 200, "curly": 90}.get(style, 140)
    hl = _hairline(t)
    v = r.uniform(-1, 1, n_top)
    px = guides[-1][0][0, 0]
    start = np.stack([px + v * 0.25, np.full(n_top, -0.3 - 1.0 * 1.05 * 0.95)], 1)
    end_x = v * t.face_width * 0.95 + r.normal(0, 0.05, n_top)
    end = np.stack([end_x, np.interp(end_x, hl[::-1, 0], hl[::-1, 1]) + 0.05], 1)
    if style == "buzz":
        end = start + (end - start) * r.uniform(0.1, 0.3, (n_top, 1))
    mid = (start + end) / 2 + np.stack([v * (0.05 if style == "buzz" else 0.25), -0.05 + 0 * v], 1)
    tt = np.linspace(0, 1, k)[None, :, None]
    top = (1 - tt) ** 2 * start[:, None] + 2 * (1 - tt) * tt * mid[:, None] + tt**2 * end[:, None]
    if curly:
        tang = np.gradient(top, axis=1)
        nrm = np.stack([-tang[..., 1], tang[..., 0]], -1) / (np.linalg.norm(tang, axis=-1, keepdims=True) + 1e-9)
        top = top + nrm * (0.035 * np.sin(2 * math.pi * 4 * tt + r.uniform(0, 6, (n_top, 1, 1))))
    strands.append(top)
    all_strands = np.concatenate(strands, 0)
    tone = np.clip(r.normal(1.0, 0.28, len(all_strands)), 0.45, 1.8)
    (o_l, i_l), (o_r, i_r) = guides[-1], guides[1]
    region = np.vstack([o_l[::-1], o_r, i_r[-1:], [[i_r[-1, 0], -0.3]], [[i_l[-1, 0], -0.3]], i_l[-1:]])
    if curly:
        c = region.mean(0)
        ang = np.arctan2(region[:, 1] - c[1], region[:, 0] - c[0])
        region = region + (region - c) * (0.035 * np.sin(ang * 23 + t.hair_seed % 7))[:, None]
    all_strands = all_strands.astype(np.float32)
    for a in (all_strands, tone, region):
        a.flags.writeable = False
    return all_strands, tone, region


def _draw_hair(sc: _Scene) -> None:
    """A darker base over the hair region, then strands in a few tones of the hair colour."""
    cv, t, pose = sc.cv, sc.t, sc.pose
    strands, tone, region = _hair_strands(sc.s.world_seed, t.identity)
    reg_px = pose(region, z=pose.depth(region) * 0.6)
    roi = cv.roi(reg_px, pad=4)
    if roi is None:
        return
    base = np.asarray(t.hair_rgb, np.float32)
    region_mask = cv.mask([reg_px], roi)
    buzz = t.hair_style == "buzz"
    cv.paint(region_mask, roi, _rgb(base, 0.72), 0.8 if buzz else 1.0, head=True)
    px = pose(strands, z=pose.depth(strands) * 0.6)
    width_out = max(0.014 * (1.3 if t.hair_style == "curly" else 1.0) * pose.unit / pose.ss, 0.5)
    width = width_out * pose.ss
    edges = [0.0, 0.8, 1.15, 9.0]
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (tone >= lo) & (tone < hi)
        if not sel.any():
            continue
        k = float(np.median(tone[sel]))
        m = cv.mask(px[sel], roi, fill=False, thickness=int(round(width)))
        color = _rgb(base * k + (0.12 * (k - 1.0) if k > 1.2 else 0.0))
        cv.paint(m * region_mask if buzz else m, roi, color, min(1.0, width) * 0.9)


def _draw_eyes(sc: _Scene) -> None:
    """Both eyes from their projected landmarks: sclera, iris with pupil and highlight, lids, lashes."""
    cv, t, s, lm, unit, light, skin = sc.cv, sc.t, sc.s, sc.lm, sc.unit, sc.light, sc.skin
    iris_r = t.eye_width * 0.5 * unit
    gaze = np.array(s.gaze) * iris_r
    creases, uppers, lowers, lashes = [], [], [], []
    for pts, left in ((lm[36:42], True), (lm[42:48], False)):
        upper = _spline(pts[[0, 1, 2, 3]], 10)
        lower = _spline(pts[[3, 4, 5, 0]], 10)
        uppers.append(upper)
        lowers.append(lower)
        creases.append((upper + (upper - upper.mean(0)) * 0.12 - [0, 0.07 * unit * max(0.5, s.eye_open)])[2:-2])
        lashes.append(_lashes(upper if left else upper[::-1], t.lash_length * t.eye_width * unit))
        opening = np.vstack([upper, lower[1:-1]])
        roi = cv.roi(opening, pad=3)
        if roi is None:
            continue
        iris_c = (pts[0] + pts[3]) / 2 + gaze - [0, 0.008 * unit]
        m_open = cv.mask([opening], roi)
        xx, yy = cv.grid(roi)
        top = upper[:, 1].min()
        shadow = (0.68 + 0.32 * _smoothstep(top, top + 0.5 * (pts[:, 1].max() - top) + 1e-3, yy))[..., None]
        d = np.hypot(xx - iris_c[0], yy - iris_c[1])
        a = np.arctan2(yy - iris_c[1], xx - iris_c[0])
        p = t.iris_phases
        streak = 0.5 * np.cos(17 * a + p[0]) + 0.3 * np.cos(31 * a + p[1]) + 0.2 * np.cos(47 * a + p[2] + d * 0.3)
        rel = d / iris_r
        shade = 0.8 + 0.22 * streak * _smoothstep(0.3, 0.6, rel)  # radial fibres
        shade += 0.35 * _smoothstep(0.62, 0.38, rel) - 0.55 * _smoothstep(0.72, 1.0, rel)  # collarette, limbal ring
        aa = 0.8
        iris = np.asarray(t.eye_rgb, np.float32) * np.clip(shade, 0.1, 1.6)[..., None]
        pr = iris_r * (0.36 + 0.12 * (1 - s.light_strength))
        iris *= 1.0 - _smoothstep(pr + aa, pr - aa, d)[..., None] * 0.97
        field = np.empty_like(iris)
        field[...] = (0.95, 0.93, 0.9)  # sclera
        field += (iris - field) * _smoothstep(iris_r + aa, iris_r - aa, d)[..., None]
        field *= shadow
        hx, hy = iris_c[0] + light[0] * iris_r * 0.4, iris_c[1] + min(light[1], -0.3) * iris_r * 0.4
        hr = max(iris_r * 0.17, 0.7)
        field += (1.0 - field) * _smoothstep(hr + aa, hr - aa, np.hypot(xx - hx, yy - hy))[..., None] * 0.9
        cv.paint(m_open, roi, field)
    lash_rgb = _rgb(t.hair_rgb, 0.35) * 0.6 + 0.02
    cv.lines(creases, _rgb(skin, 0.72), 0.012 * unit, 0.6)
    cv.lines(uppers, lash_rgb, 0.022 * unit, 0.95)
    cv.lines(lowers, _rgb(skin, 0.6), 0.008 * unit, 0.45)
    cv.lines(np.concatenate(lashes), lash_rgb, 0.008 * unit, 0.85)


def _lashes(lid: np.ndarray, length: float, n: int = 14) -> np.ndarray:
    """Curved strokes along an upper lid given from its outer corner, longer toward the outer corner."""
    tang = np.gradient(lid, axis=0)
    nrm = np.stack([tang[:, 1], -tang[:, 0]], 1)
    nrm /= np.linalg.norm(nrm, axis=1, keepdims=True) + 1e-9
    if nrm[len(nrm) // 2, 1] > 0:
        nrm = -nrm
    idx = np.linspace(1, len(lid) * 0.85, n).astype(int)
    outward = (lid[0] - lid[-1]) / (np.linalg.norm(lid[0] - lid[-1]) + 1e-9)
    f = (1.0 - np.arange(n) / n)[:, None]
    ln = length * (0.6 + 0.6 * f)
    base, nr = lid[idx], nrm[idx]
    d1 = nr * 0.7 + outward * 0.5 * f
    return np.stack([base, base + d1 * ln * 0.55, base + (d1 + outward * 0.4 + nr * 0.2) * ln], 1)


def _draw_brows(sc: _Scene) -> None:
    """Both brows: a soft tapered base plus short hair strokes angled away from the nose."""
    cv, t, lm, unit = sc.cv, sc.t, sc.lm, sc.unit
    rng = _rng(t.hair_seed, 3)
    color = _rgb(t.hair_rgb, 0.55 if t.hair_name in ("blonde", "grey", "red") else 0.8) * 0.9 + 0.02
    polys, hairs = [], []
    for pts in (lm[17:22], lm[22:27][::-1]):
        c = _spline(pts, 6)  # from the outer end to the inner end
        f = np.linspace(0, 1, len(c))[:, None]
        th = t.brow_thickness * unit * (0.45 + 0.55 * f)
        polys.append(np.vstack([c - [0, 1] * th * 0.55, (c + [0, 1] * th * 0.45)[::-1]]))
        n = 70
        j = rng.uniform(0, 1, n)
        i = (j * (len(c) - 1)).astype(int)
        tang = c[np.minimum(i + 1, len(c) - 1)] - c[np.maximum(i - 1, 0)]
        tang /= np.linalg.norm(tang, axis=1, keepdims=True) + 1e-9
        up = np.array([0.0, -1.0])
        dirn = -tang * (0.3 + 0.7 * (1 - j[:, None]) ** 0.5) + up * (0.9 * j[:, None] ** 2 + 0.2)
        dirn /= np.linalg.norm(dirn, axis=1, keepdims=True)
        base = c[i] + up * th[i] * rng.uniform(-0.45, 0.5, (n, 1))
        hairs.append(np.stack([base, base + dirn * th[i] * rng.uniform(0.9, 1.6, (n, 1))], 1))
    roi = cv.roi(polys)
    if roi is not None:
        cv.paint(cv.mask(polys, roi), roi, color, 0.5)
    cv.lines(np.concatenate(hairs), _rgb(color, 0.8), 0.007 * unit, 0.8)


def _lens(shape: str, c: np.ndarray, ew: float) -> np.ndarray:
    """Outline of a glasses lens of `shape` around `c`, sized from the eye half-width `ew`."""
    a = np.linspace(0, 2 * math.pi, 48, endpoint=False)
    if shape == "round":
        rx = ry = ew * 1.35
        x, y = np.cos(a), np.sin(a)
    elif shape == "square":
        rx, ry = ew * 1.5, ew * 1.05
        x, y = np.sign(np.cos(a)) * np.abs(np.cos(a)) ** 0.3, np.sign(np.sin(a)) * np.abs(np.sin(a)) ** 0.3
    else:
        rx, ry = ew * 1.55, ew * 1.0
        x, y = np.cos(a), np.sin(a) * (1 + 0.15 * np.sin(a))
    return np.stack([c[0] + rx * x, c[1] + ry * y], 1)


def _caption(t: IdentityTraits, s: ToyFaceSpec) -> str:
    if s.mouth_open > 0.45 and s.smile > 0.55:
        mood = "laughing"
    elif s.brow_raise > 0.05 and s.mouth_open > 0.4:
        mood = "surprised"
    elif s.eye_open < 0.5:
        mood = "sleepy"
    elif s.smile > 0.45:
        mood = "smiling"
    else:
        mood = "calm"
    named = {"bob": f"a {t.hair_name} bob", "buzz": f"a {t.hair_name} buzz cut"}
    hair = named.get(t.hair_style, f"{t.hair_style} {t.hair_name} hair")
    if t.bangs:
        hair += " with bangs"
    extras = [hair, f"{t.eye_name} eyes"]
    if len(t.freckles):
        extras.insert(0, "freckles")
    if t.glasses:
        extras.append(f"{t.glasses} glasses")
    subject = f"a {mood} face with {t.skin_name} skin, " + ", ".join(extras[:-1]) + f" and {extras[-1]}"
    if abs(s.yaw) > 0.18:
        subject += ", turned to the " + ("left" if s.yaw < 0 else "right")
    return f"{subject}, lit {_light_words(s.light_azimuth, s.light_elevation)}."


def _light_words(azimuth: float, elevation: float) -> str:
    """Where the light comes from; azimuth is an image-plane angle with y pointing down."""
    if elevation > 1.25:
        return "from the front"
    deg = math.degrees(azimuth) % 360
    sectors = (
        (20, "the right"), (160, "below"), (200, "the left"), (250, "the upper left"), (290, "above"), (340, "the upper right"),
    )  # fmt: skip
    return "from " + next((words for limit, words in sectors if deg < limit), "the right")


@dataclass
class _Scene:
    """What every drawing step needs: canvas, traits, spec, pose and the projected landmarks."""

    cv: _Canvas
    t: IdentityTraits
    s: ToyFaceSpec
    pose: _Pose
    lm: np.ndarray  # (68, 2) internal pixels
    size: int
    face_mask: tuple[np.ndarray, tuple[int, int, int, int]] | None = None  # skin coverage and its roi

    @property
    def unit(self) -> float:
        return self.pose.unit

    @property
    def skin(self) -> np.ndarray:
        return np.asarray(self.t.skin_rgb, np.float32)

    @property
    def ychin(self) -> float:
        return _chin_y(self.t)

    @property
    def light(self) -> tuple[float, float]:
        return math.cos(self.s.light_azimuth), math.sin(self.s.light_azimuth)


def render_face(spec: ToyFaceSpec, size: int = 64) -> tuple[np.ndarray, np.ndarray, str]:
    """Render `spec` at `size` pixels: (float32 HWC RGB image in [0, 1], (68, 2) landmarks, caption)."""
    if size < 16:
        raise ValueError(f"toyfaces: size must be at least 16 pixels, got {size}")
    t, s = identity_traits(spec.world_seed, spec.identity), spec
    ss = max(2, math.ceil(128 / size))
    n = size * ss
    pose = _Pose(
        cx=(_CENTER[0] + s.shift[0]) * n,
        cy=(_CENTER[1] + s.shift[1]) * n,
        unit=_UNIT * size * s.scale * ss,
        yaw=s.yaw,
        roll=s.roll,
        width=t.face_width,
        ss=ss,
    )
    lm_c = _canonical_landmarks(t, s)
    scene = _Scene(_Canvas(_background(s, n)), t, s, pose, pose(lm_c, z=_landmark_depths(t, lm_c, pose)), size)
    _draw_body(scene)
    _draw_hair(scene)
    _draw_neck(scene)
    _draw_skin(scene)
    _draw_freckles(scene)
    _draw_nose(scene)
    _draw_mouth(scene)
    _draw_eyes(scene)
    _draw_brows(scene)
    _apply_light(scene)
    _draw_glasses(scene)
    img = cv2.resize(scene.cv.img, (size, size), interpolation=cv2.INTER_AREA)
    lm_out = ((scene.lm + 0.5) / ss - 0.5).astype(np.float32)
    return np.clip(img, 0.0, 1.0).astype(np.float32), lm_out, _caption(t, s)


def _flat(pose: _Pose, points: np.ndarray, z: float = 0.0) -> np.ndarray:
    """Project points at a fixed depth (ears, body: things that do not wrap around the face)."""
    return pose(points, z=np.full(len(points), z))


def _draw_body(sc: _Scene) -> None:
    """Clothing over the shoulders, then the ears (the hair may cover them)."""
    t, w, yb = sc.t, sc.t.face_width, sc.ychin + 0.24
    body = np.array([
        [-3.0, 4.0], [-3.0, yb + 0.7], [-w * 2.0, yb + 0.12], [-w * 1.0, yb - 0.05], [0, yb + 0.05],
        [w * 1.0, yb - 0.05], [w * 2.0, yb + 0.12], [3.0, yb + 0.7], [3.0, 4.0],
    ])  # fmt: skip
    sc.cv.fill(_flat(sc.pose, _spline(body, 6)), _rgb(sc.s.clothing_rgb))
    a = np.linspace(0, 2 * math.pi, 28, endpoint=False)
    ears, helices = [], []
    for side in (-1, 1):
        centre = np.array([side * w * 0.98, t.eye_y + 0.15])
        ear = centre + np.stack([0.11 * t.ear_size * np.cos(a) * side, 0.22 * t.ear_size * np.sin(a)], 1)
        ears.append(_flat(sc.pose, ear))
        helices.append(ears[-1][3:20] * 0.75 + _flat(sc.pose, centre[None]) * 0.25)
    sc.cv.fill(ears, _rgb(sc.skin, 0.9), head=True)
    sc.cv.lines(helices, _rgb(sc.skin, 0.65), 0.015 * sc.unit, 0.6)


def _draw_neck(sc: _Scene) -> None:
    """The neck, darker under the chin; drawn over the back of the hair."""
    w, top, bottom = sc.t.face_width, sc.t.eye_y + 0.4, sc.ychin + 0.54
    neck = np.array([[-w * 0.6, top], [w * 0.6, top], [w * 0.66, bottom], [0, bottom + 0.12], [-w * 0.66, bottom]])
    px = _flat(sc.pose, neck, 0.2)
    roi = sc.cv.roi(px)
    if roi is not None:
        _, yy = sc.cv.grid(roi)
        chin = sc.lm[8, 1]
        dark = 0.7 + 0.2 * _smoothstep(chin, chin + 0.35 * sc.unit, yy)
        sc.cv.paint(sc.cv.mask([px], roi), roi, sc.skin * dark[..., None], head=True)


def _draw_skin(sc: _Scene) -> None:
    """The face from the jaw line up to the hairline: skin tone, grain and pores, cheek blush."""
    cv, t = sc.cv, sc.t
    face_poly = np.vstack([_spline(sc.lm[0:17], 6), sc.pose(_hairline(t))])
    roi = cv.roi(face_poly)
    if roi is None:
        return
    x0, y0, x1, y1 = roi
    tex = _texture(_rng(sc.s.noise_seed, sc.size, 303), sc.size, cv.n, t.skin_roughness)
    xx, yy = cv.grid(roi)
    cheeks = sc.pose(np.array([[-(t.eye_sep + 0.05), t.eye_y + 0.33], [t.eye_sep + 0.05, t.eye_y + 0.33]]))
    r2 = 2 * (0.2 * sc.unit) ** 2
    blush = sum(np.exp(-((xx - c[0]) ** 2 + (yy - c[1]) ** 2) / r2) for c in cheeks) * (0.12 + 0.1 * sc.s.smile)
    field = sc.skin * (1.0 + tex[y0:y1, x0:x1])[..., None]
    field += (np.array([0.85, 0.35, 0.35], np.float32) * sc.skin * 1.2 - field) * blush[..., None]
    sc.face_mask = (cv.mask([face_poly], roi), roi)
    cv.paint(sc.face_mask[0], roi, field, head=True)


def _draw_freckles(sc: _Scene) -> None:
    t = sc.t
    if not len(t.freckles) or sc.face_mask is None:
        return
    visible = (t.freckles[:, 1] > t.eye_y + 0.08) | (np.abs(t.freckles[:, 0]) < 0.12)
    px = sc.pose(t.freckles[:, :2])[visible]
    face, roi = sc.face_mask
    x0, y0, x1, y1 = roi
    m = np.zeros((y1 - y0, x1 - x0), np.uint8)  # OpenCV anti-aliases only 8-bit images
    for (fx, fy), (_, _, fr, fo) in zip(px, t.freckles[visible]):
        r = max(fr * sc.unit, 0.6)
        centre = (int(round((fx - x0) * 16)), int(round((fy - y0) * 16)))
        cv2.circle(m, centre, int(round(r * 16)), int(255 * fo * min(1.0, r)), -1, cv2.LINE_AA, 4)
    sc.cv.paint(m * (face / 255.0), roi, sc.skin * np.array([0.62, 0.45, 0.35], np.float32))


def _draw_nose(sc: _Scene) -> None:
    """Bridge shadow on the side away from the light, nostril wings, nostrils and a tip highlight."""
    cv, lm, u, light = sc.cv, sc.lm, sc.unit, sc.light
    side = 1 if light[0] < 0 else -1
    nw = sc.t.nose_width * u
    bridge = np.array([
        lm[27] + [side * 0.05 * u, 0.05 * u], lm[29] + [side * 0.07 * u, 0], lm[31 if side < 0 else 35] + [0, -0.08 * u],
    ])  # fmt: skip
    cv.lines([_spline(bridge, 6)], _rgb(sc.skin, 0.7), 0.05 * u, 0.18)
    alae, nostrils = [], []
    a = np.linspace(0, 2 * math.pi, 16, endpoint=False)
    for k, sd in ((31, -1), (35, 1)):
        inner = lm[32 if sd < 0 else 34]
        ala = lm[k] + np.array([[-sd * nw * 0.3, -0.1 * u], [sd * 0.02 * u, -0.03 * u], [-sd * nw * 0.2, 0.02 * u]])
        ala = np.vstack([ala, inner])
        alae.append(_spline(ala, 6))
        nostrils.append((lm[k] + inner) / 2 + np.stack([np.cos(a) * nw * 0.28, np.sin(a) * 0.025 * u], 1))
    cv.lines(alae, _rgb(sc.skin, 0.55), 0.016 * u, 0.55)
    cv.fill(nostrils, _rgb(sc.skin, 0.3), 0.75)
    tip = lm[30] - [light[0] * 0.02 * u, 0.02 * u]
    _glow(cv, tip, 0.045 * u, 0.045 * u, np.array([1.0, 0.97, 0.94], np.float32), 0.22)


def _glow(cv: _Canvas, centre: np.ndarray, sx: float, sy: float, color: np.ndarray, opacity: float) -> None:
    """A soft Gaussian spot of `color`."""
    roi = cv.roi(np.array([centre - 3 * max(sx, sy), centre + 3 * max(sx, sy)]))
    if roi is not None:
        xx, yy = cv.grid(roi)
        g = np.exp(-((xx - centre[0]) ** 2 / (2 * sx * sx) + (yy - centre[1]) ** 2 / (2 * sy * sy)))
        cv.paint(g, roi, color, opacity)


def _draw_mouth(sc: _Scene) -> None:
    """Lips from the outer and inner contours, the lip line, teeth when open, smile creases."""
    cv, lm, u, s = sc.cv, sc.lm, sc.unit, sc.s
    outer_up = _spline(lm[48:55], 6)
    outer_low = _spline(lm[[54, 55, 56, 57, 58, 59, 48]], 6)
    inner_up = _spline(lm[[48, 61, 62, 63, 54]], 6)
    inner_low = _spline(lm[[54, 65, 66, 67, 48]], 6)
    lip = np.asarray(sc.t.lip_rgb, np.float32)
    if s.mouth_open > 0.15:
        opening = np.vstack([inner_up, inner_low[1:-1]])
        roi = cv.roi(opening)
        if roi is not None:
            m = cv.mask([opening], roi)
            cv.paint(m, roi, np.array([0.18, 0.06, 0.06], np.float32))
            _, yy = cv.grid(roi)
            edge = inner_up[:, 1].max() + 0.04 * u
            cv.paint(_smoothstep(edge + 0.5, edge - 0.5, yy) * m, roi, np.array([0.93, 0.9, 0.84], np.float32), 0.95)
        cv.fill(np.vstack([outer_up, inner_up[::-1][1:-1]]), _rgb(lip, 0.92))
        cv.fill(np.vstack([outer_low, inner_low[::-1][1:-1]]), lip)
    else:
        cv.fill(np.vstack([outer_up, inner_low[1:-1]]), _rgb(lip, 0.92))
        cv.fill(np.vstack([outer_low, inner_up[1:-1]]), lip)
    cv.lines([inner_up], _rgb(lip, 0.45), 0.016 * u, 0.9)
    _glow(cv, lm[57] * 0.6 + lm[66] * 0.4, 0.07 * u, 0.015 * u, np.array([1.0, 0.95, 0.95], np.float32), 0.25)
    if s.smile > 0.3:
        creases = [lm[k] + np.array([[sd * 0.03 * u, -0.015 * u], [sd * 0.06 * u, 0.02 * u]]) for k, sd in ((48, -1), (54, 1))]
        cv.lines(creases, _rgb(sc.skin, 0.6), 0.012 * u, 0.4 * s.smile)


def _apply_light(sc: _Scene) -> None:
    """Lambertian shading of everything painted as head, on an ellipsoid fitted to the face."""
    cv, t, s = sc.cv, sc.t, sc.s
    if cv.head_box is None:
        return
    x0, y0, x1, y1 = cv.head_box
    u, v = sc.pose.inverse(*cv.grid(cv.head_box))
    mid = (t.hairline + sc.ychin) / 2
    nx, ny = u / (t.face_width * 1.02), (v - mid) / ((sc.ychin - t.hairline) * 0.6)
    nz = np.sqrt(np.clip(1 - nx * nx - ny * ny, 0, 1))
    lx, ly = sc.light
    ce, se = math.cos(s.light_elevation), math.sin(s.light_elevation)
    lam = np.clip((nx * lx + ny * ly) * ce + nz * se, 0, 1)
    k = s.light_strength
    shade = ((1 - 0.9 * k) + 1.4 * k * lam) * (0.78 + 0.22 * np.sqrt(nz))
    cv.img[y0:y1, x0:x1] *= (1 + cv.head[y0:y1, x0:x1] * (shade - 1))[..., None]


def _draw_glasses(sc: _Scene) -> None:
    """Lens reflections, frames, bridge and temple arms, floating a little in front of the face."""
    cv, t, u = sc.cv, sc.t, sc.unit
    if not t.glasses:
        return
    frame = np.asarray(FRAME_COLORS[t.frame_name], np.float32)
    lenses = []
    for sd in (-1, 1):
        lens = _lens(t.glasses, np.array([sd * t.eye_sep, t.eye_y + 0.03]), t.eye_width)
        lp = sc.pose(lens, z=sc.pose.depth(lens) + 0.12)
        lenses.append(lp)
        roi = cv.roi(lp)
        if roi is not None:
            xx, yy = cv.grid(roi)
            band = _smoothstep(0.5, 0.0, np.abs(((xx - lp[:, 0].mean()) + (yy - lp[:, 1].mean())) / (0.25 * u) - 0.6))
            cv.paint(cv.mask([lp], roi) * band, roi, np.array([1.0, 1.0, 1.0], np.float32), 0.18)
    fw = t.frame_thickness * u
    inner_l = lenses[0][np.argmax(lenses[0][:, 0])]
    inner_r = lenses[1][np.argmin(lenses[1][:, 0])]
    bridge = _spline(np.array([inner_l, (inner_l + inner_r) / 2 - [0, 0.04 * u], inner_r]), 6)
    cv.lines([np.vstack([lp, lp[:1]]) for lp in lenses] + [bridge], frame, fw, 0.95)
    temples = []
    for sd, lp in ((-1, lenses[0]), (1, lenses[1])):
        ear = _flat(sc.pose, np.array([[sd * t.face_width, t.eye_y + 0.02]]))[0]
        temples.append(np.array([lp[np.argmax(sd * lp[:, 0])], ear]))
    cv.lines(temples, frame, fw * 0.8, 0.9)


# --------------------------------------------------------------------------------------------
# The toy marker: which folders hold toy faces

TOY_MARKER = "toyworld.json"
# The world the shipped toy restorer, FRM and judges were trained on (scripts/toy_restorer.yaml): the demo, the
# experiments and the toy test sets use its identities (train split for training, test split for evaluation).
TOY_WORLD_SEED = 0
TOY_WORLD_IDENTITIES = 200


def write_toy_marker(folder: str | Path, info: Mapping[str, Any]) -> Path:
    """Mark `folder` as holding toy faces: write FOLDER/toyworld.json = `info` (compact JSON) and return its path.

    `info` says which world the faces come from (at least "world_seed", "n_identities", "split"). A test
    set with the marker beside lq/ and hq/ gets the toy judges (evaluate, candidates, auto-label).
    """
    from facereward.atomic import atomic_write_text

    path = Path(folder) / TOY_MARKER
    atomic_write_text(path, json.dumps(dict(info)))
    return path


def read_toy_marker(folder: str | Path) -> dict[str, Any] | None:
    """The `info` of FOLDER/toyworld.json, or None when `folder` has no marker."""
    path = Path(folder) / TOY_MARKER
    return json.loads(path.read_text()) if path.is_file() else None


def is_toy_folder(folder: str | Path) -> bool:
    """Whether `folder` carries the toy marker (its faces, or its lq/ and hq/, are toy faces)."""
    return (Path(folder) / TOY_MARKER).is_file()


# --------------------------------------------------------------------------------------------
# World and dataset writer


class ToyFaceWorld:
    """Identities 0..n_identities-1, split into train and test by identity, deterministic in `seed`."""

    def __init__(self, seed: int = 0, n_identities: int = 200, test_fraction: float = 0.2):
        if n_identities < 1:
            raise ValueError(f"toyfaces: n_identities must be at least 1, got {n_identities}")
        if not 0.0 <= test_fraction < 1.0:
            raise ValueError(f"toyfaces: test_fraction must be in [0, 1), got {test_fraction}")
        self.seed = int(seed)
        self.n_identities = int(n_identities)
        self.test_fraction = float(test_fraction)
        n_test = int(round(n_identities * test_fraction))
        if test_fraction > 0 and n_identities >= 2:
            n_test = min(max(n_test, 1), n_identities - 1)
        order = _rng(self.seed, 404).permutation(n_identities)
        test = set(int(i) for i in order[:n_test])
        self._split = {i: ("test" if i in test else "train") for i in range(n_identities)}

    def identities(self, split: str) -> list[int]:
        """Sorted identity ids in `split` ("train" or "test")."""
        _check_split(split)
        return [i for i, sp in self._split.items() if sp == split]

    def split_of(self, identity: int) -> str:
        """"train" or "test" for `identity`."""
        self._check_identity(identity)
        return self._split[int(identity)]

    def traits(self, identity: int) -> IdentityTraits:
        """The fixed traits of `identity`."""
        self._check_identity(identity)
        return identity_traits(self.seed, int(identity))

    def spec(self, identity: int, image_index: int) -> ToyFaceSpec:
        """The per-image parameters of image `image_index` of `identity`."""
        self._check_identity(identity)
        if image_index < 0:
            raise ValueError(f"toyfaces: image_index must be >= 0, got {image_index}")
        return image_spec(self.seed, int(identity), int(image_index))

    def render(self, spec: ToyFaceSpec, size: int = 64) -> ToyFace:
        """Render a (possibly edited) spec of this world."""
        self._check_identity(spec.identity)
        image, landmarks, caption = render_face(spec, size)
        return ToyFace(image, landmarks, caption, spec.identity, self._split[spec.identity], spec)

    def face(self, identity: int, image_index: int, size: int = 64) -> ToyFace:
        """Image `image_index` of `identity` at `size` pixels; the same arguments give the same face."""
        return self.render(self.spec(identity, image_index), size)

    def sample_keys(self, n: int, split: str = "train", seed: int = 0) -> list[tuple[int, int]]:
        """(identity, image_index) pairs for `sample`: identities cycled evenly in a shuffled order."""
        ids = self.identities(split)
        if not ids:
            raise ValueError(
                f"toyfaces: split {split!r} has no identities "
                f"(n_identities={self.n_identities}, test_fraction={self.test_fraction})"
            )
        rng = _rng(self.seed, SPLITS.index(split), seed, 505)
        order = [int(i) for i in rng.permutation(ids)]
        index = rng.integers(0, 2**31 - 1, size=n)
        return [(order[k % len(order)], int(index[k])) for k in range(n)]

    def sample(self, n: int, size: int = 64, split: str = "train", seed: int = 0) -> list[ToyFace]:
        """`n` faces spread over the identities of `split`, deterministic in (world seed, split, seed)."""
        return [self.face(i, j, size) for i, j in self.sample_keys(n, split, seed)]

    def _check_identity(self, identity: int) -> None:
        if not 0 <= int(identity) < self.n_identities:
            raise ValueError(f"toyfaces: identity {identity} out of range [0, {self.n_identities})")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"toyfaces: split must be 'train' or 'test', got {split!r}")


def _write_chunk(job: tuple) -> list[tuple[str, int, list[list[float]]]]:
    """Render and write one chunk of faces (runs in a worker process when workers > 1)."""
    from facereward.data.imageio import write_image

    seed, n_identities, test_fraction, size, folder, items = job
    world = ToyFaceWorld(seed, n_identities, test_fraction)
    done = []
    for name, ident, index in items:
        face = world.face(ident, index, size)
        write_image(Path(folder) / f"{name}.png", face.image)
        (Path(folder) / f"{name}.txt").write_text(face.caption + "\n")
        done.append((name, ident, [[round(float(x), 3), round(float(y), 3)] for x, y in face.landmarks]))
    return done


def write_toyfaces(
    out_dir: str | Path,
    n: int,
    size: int = 64,
    seed: int = 0,
    n_identities: int | None = None,
    test_fraction: float = 0.2,
    progress: bool = True,
    workers: int = 1,
) -> dict:
    """Write `n` faces as OUT/{train,test}/images/NNNNNN.png (+ .txt captions), landmarks.json,
    identities.json and OUT/manifest.json; the test split holds whole identities. Returns the manifest.

    OUT/ and each OUT/{split}/images/ get the toy marker (`write_toy_marker`: world seed, n_identities,
    test_fraction, size, split), so `write_degraded_testset` of an images folder makes a toy test set.

    `workers` > 1 renders in that many processes (the output is identical); on platforms that
    spawn processes, call it from under `if __name__ == "__main__":`.
    """
    from tqdm.auto import tqdm

    if n < 1:
        raise ValueError(f"toyfaces: n must be at least 1, got {n}")
    if size < 16:
        raise ValueError(f"toyfaces: size must be at least 16 pixels, got {size}")
    n_identities = max(10, n // 10) if n_identities is None else int(n_identities)
    world = ToyFaceWorld(seed, n_identities, test_fraction)
    n_test_ids = len(world.identities("test"))
    n_test = int(round(n * n_test_ids / n_identities)) if n_test_ids else 0
    counts = {"train": n - n_test, "test": n_test}
    out = Path(out_dir)
    width = max(6, len(str(n - 1)))
    jobs, chunk = [], 64
    for split in SPLITS:
        folder = out / split / "images"
        folder.mkdir(parents=True, exist_ok=True)
        keys = world.sample_keys(counts[split], split, seed) if counts[split] else []
        items = [(f"{k:0{width}d}", ident, index) for k, (ident, index) in enumerate(keys)]
        for i in range(0, len(items), chunk):
            jobs.append((split, (seed, n_identities, test_fraction, size, str(folder), items[i : i + chunk])))
    results: dict[str, list] = {split: [] for split in SPLITS}
    with tqdm(total=n, desc="toyfaces", unit="img", disable=not progress) as bar:
        if workers > 1 and len(jobs) > 1:
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
                for (split, _), done in zip(jobs, pool.map(_write_chunk, [job for _, job in jobs])):
                    results[split] += done
                    bar.update(len(done))
        else:
            for split, job in jobs:
                done = _write_chunk(job)
                results[split] += done
                bar.update(len(done))
    for split in SPLITS:
        rows = sorted(results[split])
        (out / split / "landmarks.json").write_text(json.dumps({name: lm for name, _, lm in rows}))
        (out / split / "identities.json").write_text(json.dumps({name: ident for name, ident, _ in rows}, indent=0))
    world_info = {"world_seed": seed, "n_identities": n_identities, "test_fraction": test_fraction, "size": size}
    for split in SPLITS:  # with what recomputes each image's (identity, index) from its name (data.attributes)
        write_toy_marker(out / split / "images", {**world_info, "split": split, "sample_seed": seed, "count": counts[split],
                                                  "name_width": width})
    write_toy_marker(out, {**world_info, "split": None})
    manifest = {"seed": seed, "size": size, "n": n, "n_identities": n_identities, "test_fraction": test_fraction, **counts}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest
