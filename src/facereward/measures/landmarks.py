"""Facial landmarks and the landmark distance LMD (docs/methods.md section 3).

A `LandmarkDetector` maps BCHW RGB images in [0, 1] to ``(B, 68, 2)`` pixel ``(x, y)`` coordinates
in the iBUG 68-point order. The built-in one is dlib's HOG face detector plus its 68-point shape
predictor (package face-recognition-models); users register their own with
`register_landmark_detector`. The dlib helpers here (model lookup, tensor -> uint8, face boxes
with a whole-image fallback for aligned crops) are shared with `metrics.identity`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from facereward.data.faces import dlib_model_file, dlib_models_dir
from facereward.registry import Registry

__all__ = [
    "LandmarkDetector",
    "DlibLandmarkDetector",
    "landmark_distance",
    "landmark_scores",
    "register_landmark_detector",
    "get_landmark_detector",
    "list_landmark_detectors",
    "dlib_models_dir",
    "dlib_model_file",
    "images_to_uint8",
    "detect_face_boxes",
]

NUM_LANDMARKS = 68


# --------------------------------------------------------------------------- dlib helpers


# dlib_models_dir / dlib_model_file live with the face detector in data.faces (a lower layer); re-exported here.


def images_to_uint8(images: Tensor, name: str = "images") -> list[np.ndarray]:
    """BCHW RGB [0, 1] tensor -> list of contiguous uint8 HWC RGB arrays (rounded like tensor2img)."""
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{name}: expected a (B, 3, H, W) RGB tensor in [0, 1], got {shape}")
    arr = torch.round(images.detach().float().cpu().clamp(0, 1) * 255.0).to(torch.uint8)
    arr = arr.permute(0, 2, 3, 1).numpy()
    return [np.ascontiguousarray(a) for a in arr]


def detect_face_boxes(
    detector: Any, images: list[np.ndarray], upsample: int = 1, fallback_inset: float = 0.25
) -> tuple[list[Any], list[bool]]:
    """One dlib rectangle per uint8 HWC image (the largest HOG detection) and whether it was detected.

    Without a detection the box is the whole image inset by `fallback_inset` of its size on each
    side: the inputs are meant to be aligned face crops. The default 0.25 is about where dlib's own
    box sits in an FFHQ-style crop (4-5 eye distances wide): on crops of the astronaut it gives
    68 landmarks within 0.4-0.8 px of those from the detected box, where 0.1 is 4-30 px off.
    """
    import dlib

    boxes, detected = [], []
    for img in images:
        found = detector(img, upsample)
        if len(found):
            boxes.append(max(found, key=lambda r: r.width() * r.height()))
            detected.append(True)
        else:
            h, w = img.shape[:2]
            dx, dy = int(round(w * fallback_inset)), int(round(h * fallback_inset))
            boxes.append(dlib.rectangle(dx, dy, w - 1 - dx, h - 1 - dy))
            detected.append(False)
    return boxes, detected


# --------------------------------------------------------------------------- detectors


@runtime_checkable
class LandmarkDetector(Protocol):
    """`detect(images)` maps BCHW RGB [0, 1] images to (B, 68, 2) float pixel (x, y), iBUG order."""

    name: str

    def detect(self, images: Tensor) -> Tensor: ...


class DlibLandmarkDetector:
    """dlib HOG face detector + 68-point shape predictor; whole-image box when no face is found.

    `last_detected[i]` says whether image i of the last `detect` call had a real detection.
    """

    name = "dlib-68"

    def __init__(self, models_dir: str | Path | None = None, upsample: int = 1, fallback_inset: float = 0.25) -> None:
        import dlib

        self.predictor = dlib.shape_predictor(str(dlib_model_file("shape_predictor_68_face_landmarks.dat", models_dir)))
        self.detector = dlib.get_frontal_face_detector()
        self.upsample = int(upsample)
        self.fallback_inset = float(fallback_inset)
        self.last_detected: list[bool] = []

    def detect(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) RGB [0, 1] -> (B, 68, 2) float32 pixel (x, y)."""
        arrays = images_to_uint8(images, "DlibLandmarkDetector.detect")
        boxes, self.last_detected = detect_face_boxes(self.detector, arrays, self.upsample, self.fallback_inset)
        pts = np.empty((len(arrays), NUM_LANDMARKS, 2), dtype=np.float32)
        for i, (img, box) in enumerate(zip(arrays, boxes)):
            shape = self.predictor(img, box)
            pts[i] = [(p.x, p.y) for p in shape.parts()]
        return torch.from_numpy(pts)


# --------------------------------------------------------------------------- metric


def landmark_distance(pred_pts: Tensor, ref_pts: Tensor) -> Tensor:
    """LMD: per image, the mean over landmarks of the pixel L2 distance -> (B,) float64."""
    if pred_pts.ndim != 3 or pred_pts.shape[-1] != 2 or pred_pts.shape != ref_pts.shape:
        raise ValueError(
            f"landmark_distance: expected two (B, N, 2) tensors of the same shape, "
            f"got {tuple(pred_pts.shape)} and {tuple(ref_pts.shape)}"
        )
    # docs/methods.md section 3: LMD = mean_k || p_k - r_k ||_2
    return (pred_pts.to(torch.float64) - ref_pts.to(torch.float64)).norm(dim=-1).mean(dim=-1)


def landmark_scores(detector: LandmarkDetector, pred: Tensor, ref: Tensor) -> dict[str, Tensor]:
    """{"lmd": (B,)} between restored `pred` and ground-truth `ref` (BCHW RGB [0, 1], same shape).

    Both are detected in one call, so a detector's `last_detected` afterwards lists pred then ref.
    """
    if pred.shape != ref.shape:
        raise ValueError(f"landmark_scores: pred {tuple(pred.shape)} and ref {tuple(ref.shape)} differ in shape")
    pts = detector.detect(torch.cat([pred, ref], dim=0))
    b = pred.shape[0]
    return {"lmd": landmark_distance(pts[:b], pts[b:])}


# --------------------------------------------------------------------------- registry

_REGISTRY: Registry[Callable[..., LandmarkDetector]] = Registry("landmark detector")


def register_landmark_detector(name: str, factory: Callable[..., LandmarkDetector], overwrite: bool = False) -> None:
    """Make `factory(**kwargs) -> LandmarkDetector` available as `get_landmark_detector(name, **kwargs)`."""
    if not callable(factory):
        raise TypeError(f"landmark detector {name!r}: factory must be callable, got {type(factory).__name__}")
    _REGISTRY.register(name, factory, overwrite)


def get_landmark_detector(name: str, **kwargs: Any) -> LandmarkDetector:
    """Build the detector registered as `name`; ValueError listing the known names otherwise."""
    return _REGISTRY.get(name)(**kwargs)


def list_landmark_detectors() -> list[str]:
    """Registered landmark detector names, sorted."""
    return _REGISTRY.names()


def _toy_factory(**kwargs: Any) -> LandmarkDetector:
    from facereward.measures.toy_judges import load_toy_landmark_regressor

    return load_toy_landmark_regressor(**kwargs)


register_landmark_detector("dlib", DlibLandmarkDetector)
register_landmark_detector("toy", _toy_factory)
