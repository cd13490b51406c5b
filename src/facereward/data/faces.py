"""Faces in whole photos: detection, five landmarks, alignment to the FFHQ template, paste-back.

Photos here are uint8 (or float [0, 1]) HWC RGB numpy arrays of any size. A `FaceDetector` finds
faces with dlib's CNN detector (`mmod_human_face_detector.dat`), its HOG detector (fast) or
OpenCV's Haar cascade (the fallback when dlib's files are missing) and places the five FFHQ points
(eye centres, nose tip, mouth corners) with dlib's 68-point predictor. `alignment_affine` maps
them onto the FFHQ template by a similarity transform, `warp_face` cuts the crop and `paste_face`
puts a (restored) crop back through the inverse transform under a feathered mask, as
GFPGAN/CodeFormer's FaceRestoreHelper does.
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

__all__ = [
    "FFHQ_TEMPLATE_512",
    "ffhq_template",
    "DetectedFace",
    "FaceDetector",
    "DETECTORS",
    "five_points_from_68",
    "alignment_affine",
    "warp_face",
    "paste_face",
    "feather_mask",
    "dlib_models_dir",
    "dlib_model_file",
]

# The five-point template of FFHQ-aligned 512 px faces that GFPGAN/CodeFormer (facexlib) align to:
# left eye centre, right eye centre (in the image), nose tip, left and right mouth corner; pixel (x, y).
FFHQ_TEMPLATE_512 = np.array(
    [[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935], [201.26117, 371.41043], [313.08905, 371.15118]],
    dtype=np.float32,
)
# Grey of the area outside the photo in a crop (facexlib's border value, RGB of its BGR (135, 133, 132)).
BORDER_RGB = (132, 133, 135)

DETECTORS = ("cnn", "hog", "haar")
DEFAULT_UPSAMPLE = {"cnn": 0, "hog": 1, "haar": 0}  # dlib pyramid doublings of the detection copy
DEFAULT_MIN_SCORE = {"cnn": 0.0, "hog": 0.3, "haar": 0.0}
# the five points' mean place in a dlib HOG box, as fractions of its width and height (used without the predictor)
BOX_POINTS = np.array([[0.305, 0.262], [0.753, 0.266], [0.543, 0.517], [0.292, 0.650], [0.763, 0.651]], dtype=np.float32)
Detector = Literal["cnn", "hog", "haar"]


def ffhq_template(size: int) -> np.ndarray:
    """The FFHQ five-point template for a `size` x `size` crop: the 512 px points scaled by size / 512."""
    return FFHQ_TEMPLATE_512 * (float(size) / 512.0)


# --------------------------------------------------------------------------- dlib model files


def dlib_models_dir(models_dir: str | Path | None = None) -> Path:
    """The folder holding dlib's .dat files: `models_dir`, or face-recognition-models' `models/`."""
    if models_dir is not None:
        return Path(models_dir)
    # Never import face_recognition_models: it imports pkg_resources, which recent setuptools lacks.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "dlib model files: package face-recognition-models is not installed; "
            "install it or pass models_dir=<folder with the .dat files>"
        )
    return Path(spec.origin).parent / "models"


def dlib_model_file(filename: str, models_dir: str | Path | None = None) -> Path:
    """Path of one dlib model file; FileNotFoundError naming the path when it is missing."""
    path = dlib_models_dir(models_dir) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path}: dlib model file not found (from face-recognition-models, or pass models_dir=)")
    return path


# --------------------------------------------------------------------------- detection


@dataclass
class DetectedFace:
    """One face in photo pixels: `box` (x0, y0, x1, y1), detector `score`, `landmarks` (5, 2) FFHQ-order (x, y)."""

    box: tuple[float, float, float, float]
    score: float
    landmarks: np.ndarray

    @property
    def size(self) -> float:
        """The face's size in pixels: the longer side of its box (what `--min-face` compares)."""
        return float(max(self.box[2] - self.box[0], self.box[3] - self.box[1]))


def five_points_from_68(points68: np.ndarray) -> np.ndarray:
    """iBUG 68 points -> the template's five: eye centres (mean of each 6-point contour), nose tip (30), mouth corners (48, 54)."""
    p = np.asarray(points68, dtype=np.float32)
    return np.stack([p[36:42].mean(0), p[42:48].mean(0), p[30], p[48], p[54]]).astype(np.float32)


def _as_uint8(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint8:
        return np.ascontiguousarray(image[..., :3])
    return np.ascontiguousarray(np.clip(np.round(image[..., :3] * 255.0), 0, 255).astype(np.uint8))


class FaceDetector:
    """Faces and their five FFHQ points in a uint8 (or float [0, 1]) RGB photo of any size.

    Detection runs on a copy whose long side is at most `max_side` (huge photos cost no more than a
    `max_side` one) with dlib's `upsample` pyramid doublings (default: 0 for cnn, 1 for hog), so faces from
    about 80 px (40 px with one doubling) of the detection copy are found; detections scoring under
    `min_score` are dropped. Boxes are mapped back and the 68-point predictor runs on the full-resolution
    photo. "cnn"/"hog" fall back to "haar" with a warning when dlib or its files are missing (then the five
    points come from the box alone, see `landmarks`).
    """

    def __init__(self, kind: Detector = "cnn", models_dir: str | Path | None = None, max_side: int = 1024,
                 upsample: int | None = None, min_score: float | None = None) -> None:
        if kind not in DETECTORS:
            raise ValueError(f"detector must be one of {', '.join(DETECTORS)}, got {kind!r}")
        self.max_side = int(max_side)
        self.predictor = None
        try:
            import dlib

            self.predictor = dlib.shape_predictor(str(dlib_model_file("shape_predictor_68_face_landmarks.dat", models_dir)))
            if kind == "cnn":
                self._dlib = dlib.cnn_face_detection_model_v1(str(dlib_model_file("mmod_human_face_detector.dat", models_dir)))
            elif kind == "hog":
                self._dlib = dlib.get_frontal_face_detector()
        except (ImportError, FileNotFoundError, RuntimeError) as err:
            if kind != "haar":
                warnings.warn(f"face detector {kind!r} unavailable ({err}); falling back to OpenCV's Haar cascade", stacklevel=2)
            kind = "haar"
        if kind == "haar":
            cascade = Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"
            self._haar = cv2.CascadeClassifier(str(cascade))
            if self._haar.empty():
                raise FileNotFoundError(f"{cascade}: OpenCV's Haar cascade is missing (opencv-python-headless<5 ships it)")
        self.kind = kind
        # upsample: dlib's detectors find faces from about 80 px; one doubling (4x the time) finds them from 40 px.
        # The CNN costs ~2-5 s for a 512 px photo on 2 CPU cores at 0 doublings, so it gets none by default.
        self.upsample = int(upsample) if upsample is not None else DEFAULT_UPSAMPLE[kind]
        # min_score: with one doubling HOG finds the astronaut's hand at 0.12, where its faces score 0.6-1.6
        self.min_score = float(min_score) if min_score is not None else DEFAULT_MIN_SCORE[kind]
        self.name = f"dlib-{kind}" if kind != "haar" else "opencv-haar"

    def boxes(self, image: np.ndarray) -> list[tuple[tuple[float, float, float, float], float]]:
        """[(box (x0, y0, x1, y1) in photo pixels, score)] from the detector alone."""
        img = _as_uint8(image)
        h, w = img.shape[:2]
        if min(h, w) < 8:
            return []
        scale = min(1.0, self.max_side / max(h, w))
        small = img if scale == 1.0 else cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
        found: list[tuple[tuple[float, float, float, float], float]] = []
        if self.kind == "cnn":
            for d in self._dlib(small, self.upsample):
                r = d.rect
                found.append(((r.left(), r.top(), r.right() + 1, r.bottom() + 1), float(d.confidence)))
        elif self.kind == "hog":
            rects, scores, _ = self._dlib.run(small, self.upsample, 0.0)
            for r, s in zip(rects, scores):
                found.append(((r.left(), r.top(), r.right() + 1, r.bottom() + 1), float(s)))
        else:
            gray = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
            rects, _, weights = self._haar.detectMultiScale3(gray, scaleFactor=1.1, minNeighbors=5, minSize=(20, 20),
                                                              outputRejectLevels=True)
            for (x, y, bw, bh), s in zip(rects, np.ravel(weights) if len(rects) else []):
                # the 68-point predictor expects dlib's box: on the astronaut and the test group photo Haar's is
                # about as large (dlib's is 0.96x) and sits 10% of its side higher, so it is moved down
                cx, cy, side = x + bw / 2, y + bh / 2 + 0.1 * max(bw, bh), 0.96 * max(bw, bh)
                found.append(((cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2), float(s)))
        sx, sy = w / small.shape[1], h / small.shape[0]
        return [((b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy), s) for b, s in found if s >= self.min_score]

    def landmarks(self, image: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
        """The five FFHQ points (5, 2) of the face in `box`, from the 68-point predictor on the full photo.

        Without the predictor (no dlib files: the Haar fallback) they are placed where they sit on average in a
        dlib box (measured on the astronaut and the test group photo): rough, but the face still gets aligned.
        """
        if self.predictor is None:
            x0, y0, x1, y1 = box
            return (BOX_POINTS * np.array([x1 - x0, y1 - y0]) + np.array([x0, y0])).astype(np.float32)
        import dlib

        img = _as_uint8(image)
        rect = dlib.rectangle(int(round(box[0])), int(round(box[1])), int(round(box[2])) - 1, int(round(box[3])) - 1)
        shape = self.predictor(img, rect)
        return five_points_from_68(np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32))

    def detect(self, image: np.ndarray) -> list[DetectedFace]:
        """Every face in the photo, largest first, with its five points."""
        img = _as_uint8(image)
        faces = [DetectedFace(box=tuple(float(v) for v in b), score=s, landmarks=self.landmarks(img, b)) for b, s in self.boxes(img)]
        return sorted(faces, key=lambda f: -f.size)


# --------------------------------------------------------------------------- alignment


def alignment_affine(landmarks: np.ndarray, size: int) -> np.ndarray | None:
    """The 2x3 similarity (rotation, uniform scale, shift) taking five FFHQ-order points onto the `size` px template.

    Fitted by `cv2.estimateAffinePartial2D(..., method=cv2.LMEDS)` as facexlib does; None when degenerate.
    """
    src = np.asarray(landmarks, dtype=np.float32).reshape(-1, 2)
    matrix, _ = cv2.estimateAffinePartial2D(src, ffhq_template(size), method=cv2.LMEDS)
    if matrix is None or not np.all(np.isfinite(matrix)) or abs(np.linalg.det(matrix[:, :2])) < 1e-12:
        return None
    return matrix.astype(np.float64)


def _affine_scale(matrix: np.ndarray) -> float:
    return float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))


def _compose(matrix: np.ndarray, offset_x: float, offset_y: float, factor_x: float = 1.0, factor_y: float = 1.0) -> np.ndarray:
    """The map `matrix` makes from the photo, for a region of it cut at (offset_x, offset_y) and resized by the factors."""
    # p_full = p_region / factor + offset  =>  M @ [p_full, 1] = M[:, :2] diag(1 / factor) p_region + (M[:, :2] offset + M[:, 2])
    out = matrix.copy()
    out[:, 2] = matrix[:, :2] @ np.array([offset_x, offset_y]) + matrix[:, 2]
    out[:, :2] = matrix[:, :2] / np.array([factor_x, factor_y])
    return out


def warp_face(image: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """The `size` x `size` float32 [0, 1] crop `matrix` maps the photo onto (bicubic; grey outside the photo).

    A crop much smaller than the face is taken from an area-downscaled copy of just the face's region,
    so it is not aliased, and no full-photo copy is ever made.
    """
    img = image[..., :3]
    h, w = img.shape[:2]
    inv = cv2.invertAffineTransform(matrix)
    corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], dtype=np.float64) @ inv.T
    x0, y0 = np.floor(corners.min(0)) - 2
    x1, y1 = np.ceil(corners.max(0)) + 2
    x0, y0, x1, y1 = int(max(0, x0)), int(max(0, y0)), int(min(w, x1)), int(min(h, y1))
    border = BORDER_RGB if img.dtype == np.uint8 else tuple(c / 255.0 for c in BORDER_RGB)
    if x1 <= x0 or y1 <= y0:
        crop = np.empty((size, size, 3), dtype=img.dtype)
        crop[:] = border
    else:
        region = img[y0:y1, x0:x1]
        fx = fy = 1.0
        scale = _affine_scale(matrix)
        if scale < 0.5:  # more than 2x smaller: area-average down to twice the crop's scale first
            rw, rh = max(1, round((x1 - x0) * 2.0 * scale)), max(1, round((y1 - y0) * 2.0 * scale))
            fx, fy = rw / (x1 - x0), rh / (y1 - y0)
            region = cv2.resize(region, (rw, rh), interpolation=cv2.INTER_AREA)
        # cv2 samples pixel centres: a resize by f maps p to (p + 0.5) f - 0.5, not p f
        local = _compose(matrix, x0 - 0.5 + 0.5 / fx, y0 - 0.5 + 0.5 / fy, fx, fy)
        crop = cv2.warpAffine(np.ascontiguousarray(region), local, (size, size), flags=cv2.INTER_CUBIC,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=border)
    if crop.dtype == np.uint8:
        return crop.astype(np.float32) / 255.0
    return np.clip(crop, 0.0, 1.0).astype(np.float32)


def feather_mask(shape: tuple[int, int], inverse: np.ndarray, crop_size: int, upscale: float = 1.0) -> np.ndarray:
    """The paste mask in [0, 1] over an image of `shape` (h, w): the crop's footprint eroded, then blurred.

    As facexlib: erode by 2 x upscale px, then by 2 w_edge and blur with a (2 w_edge + 1) Gaussian,
    where w_edge = sqrt(footprint area) // 20, so the seam fades over about a tenth of the face.
    """
    h, w = shape
    ones = np.ones((crop_size, crop_size), dtype=np.float32)
    mask = cv2.warpAffine(ones, inverse, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    k = max(1, int(round(2 * upscale)))
    mask = cv2.erode(mask, np.ones((k, k), np.uint8))
    w_edge = int(np.sqrt(float(mask.sum()))) // 20
    if w_edge > 0:
        mask = cv2.erode(mask, np.ones((2 * w_edge, 2 * w_edge), np.uint8))
        mask = cv2.GaussianBlur(mask, (2 * w_edge + 1, 2 * w_edge + 1), 0)
    return np.clip(mask, 0.0, 1.0)


def paste_face(canvas: np.ndarray, crop: np.ndarray, matrix: np.ndarray, upscale: float = 1.0) -> tuple[int, int, int, int] | None:
    """Blend a float [0, 1] `crop` back into `canvas` (uint8 or float, modified in place) through the inverse of `matrix`.

    `matrix` maps the original photo onto the crop; `canvas` is that photo upscaled by `upscale`. Only the
    crop's footprint is touched: pixels where the feathered mask is 0 keep their exact values. Returns the
    region (x0, y0, x1, y1) that was written, or None when the crop falls outside the canvas.
    """
    size = crop.shape[0]
    h, w = canvas.shape[:2]
    # crop px -> canvas px: p -> u (p + 0.5) - 0.5, as cv2.resize maps pixel centres
    inverse = cv2.invertAffineTransform(matrix) * float(upscale)
    inverse[:, 2] += 0.5 * (float(upscale) - 1.0)
    corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], dtype=np.float64) @ inverse.T
    x0, y0 = (int(v) for v in np.floor(corners.min(0)) - 2)
    x1, y1 = (int(v) for v in np.ceil(corners.max(0)) + 2)
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    if x1 <= x0 or y1 <= y0:
        return None
    local = inverse.copy()
    local[:, 2] -= (x0, y0)
    rh, rw = y1 - y0, x1 - x0
    face = cv2.warpAffine(np.ascontiguousarray(crop[..., :3], dtype=np.float32), local, (rw, rh), flags=cv2.INTER_CUBIC,
                          borderMode=cv2.BORDER_REPLICATE)
    mask = feather_mask((rh, rw), local, size, upscale)[..., None]
    region = canvas[y0:y1, x0:x1, :3]
    scale = 255.0 if canvas.dtype == np.uint8 else 1.0
    blended = mask * np.clip(face, 0.0, 1.0) * scale + (1.0 - mask) * region.astype(np.float32)
    touched = mask[..., 0] > 0
    if canvas.dtype == np.uint8:
        blended = np.clip(np.round(blended), 0, 255).astype(np.uint8)
    region[touched] = blended[touched].astype(canvas.dtype)
    return (x0, y0, x1, y1)
