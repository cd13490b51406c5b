"""Identity metrics IDS and Deg (docs/methods.md section 3) and the face embedders behind them.

An `IdentityEmbedder` maps BCHW RGB images in [0, 1] to L2-normalised ``(B, D)`` embeddings; its
`name` goes into result tables as is, so a table says which network measured identity:

* ``DlibIdentityEmbedder`` ("dlib-resnet128"): dlib's 128-d face-recognition ResNet, shipped in
  face-recognition-models, so it works offline with no download.
* ``ArcFaceOnnxEmbedder`` ("arcface:<file stem>"): an insightface-layout ArcFace ONNX file the
  user supplies (e.g. ``w600k_r50.onnx``), the network BFR papers report IDS/Deg with.

Users add their own with `register_identity_embedder`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from facereward.measures.landmarks import (
    detect_face_boxes,
    dlib_model_file,
    images_to_uint8,
)
from facereward.registry import Registry

__all__ = [
    "IdentityEmbedder",
    "DlibIdentityEmbedder",
    "ArcFaceOnnxEmbedder",
    "identity_similarity",
    "identity_degrees",
    "identity_scores",
    "register_identity_embedder",
    "get_identity_embedder",
    "list_identity_embedders",
]


@runtime_checkable
class IdentityEmbedder(Protocol):
    """`embed(images)` maps BCHW RGB [0, 1] images to L2-normalised (B, dim) float embeddings."""

    name: str
    dim: int

    def embed(self, images: Tensor) -> Tensor: ...


def _normalise(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class DlibIdentityEmbedder:
    """dlib's 128-d face-recognition ResNet on 150x150 chips aligned by the 5-point predictor.

    Faces are found by dlib's HOG detector (largest face); when none is found the whole image,
    inset by `fallback_inset`, is taken as the face box (inputs are aligned crops).
    `last_detected[i]` says whether image i of the last `embed` call had a real detection.
    """

    name = "dlib-resnet128"
    dim = 128

    def __init__(
        self, models_dir: str | Path | None = None, upsample: int = 1, jitter: int = 0, fallback_inset: float = 0.25
    ) -> None:
        import dlib

        self.shape_predictor = dlib.shape_predictor(str(dlib_model_file("shape_predictor_5_face_landmarks.dat", models_dir)))
        self.recognizer = dlib.face_recognition_model_v1(
            str(dlib_model_file("dlib_face_recognition_resnet_model_v1.dat", models_dir))
        )
        self.detector = dlib.get_frontal_face_detector()
        self.upsample = int(upsample)
        self.jitter = int(jitter)
        self.fallback_inset = float(fallback_inset)
        self.last_detected: list[bool] = []

    def embed(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) RGB [0, 1] -> (B, 128) float32, unit norm."""
        import dlib

        arrays = images_to_uint8(images, "DlibIdentityEmbedder.embed")
        boxes, self.last_detected = detect_face_boxes(self.detector, arrays, self.upsample, self.fallback_inset)
        chips = [
            dlib.get_face_chip(img, self.shape_predictor(img, box), size=150, padding=0.25)
            for img, box in zip(arrays, boxes)
        ]
        if not chips:
            return torch.zeros(0, self.dim)
        desc = self.recognizer.compute_face_descriptor(chips, self.jitter)
        return _normalise(torch.tensor(np.array([np.asarray(d) for d in desc]), dtype=torch.float64)).float()


class ArcFaceOnnxEmbedder:
    """An insightface-layout ArcFace ONNX model (input N x 3 x 112 x 112, RGB, (x255 - 127.5) / 127.5).

    Matches insightface's ``ArcFaceONNX.get_feat``: ``cv2.dnn.blobFromImages(bgr_uint8, 1/127.5,
    (112, 112), (127.5,)*3, swapRB=True)``, i.e. uint8 RGB, bilinear resize to 112x112 when needed,
    then ``(x - 127.5) / 127.5``. Inputs should be aligned face crops.
    """

    input_size = 112

    def __init__(self, path: str | Path, providers: Sequence[str] | None = None) -> None:
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: ArcFace ONNX file not found")
        if providers is None:
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        try:
            self.session = ort.InferenceSession(str(path), providers=list(providers))
        except Exception as err:  # onnxruntime raises its own exception types
            raise ValueError(f"{path}: not a loadable ONNX model ({err.__class__.__name__}: {err})") from None
        inp = self.session.get_inputs()[0]
        shape = list(inp.shape)
        if len(shape) != 4 or shape[1:] != [3, self.input_size, self.input_size]:
            raise ValueError(
                f"{path}: input {inp.name!r} has shape {shape}; an ArcFace model takes N x 3 x 112 x 112"
            )
        self.path = path
        self.input_name = inp.name
        self.dynamic_batch = not isinstance(shape[0], int) or shape[0] <= 0
        self.fixed_batch = 0 if self.dynamic_batch else int(shape[0])
        out_shape = self.session.get_outputs()[0].shape
        self.dim = int(out_shape[-1]) if isinstance(out_shape[-1], int) else -1
        self.name = f"arcface:{path.stem}"

    def preprocess(self, images: Tensor) -> np.ndarray:
        """(B, 3, H, W) RGB [0, 1] -> (B, 3, 112, 112) float32 network input."""
        import cv2

        size = self.input_size
        arrays = images_to_uint8(images, "ArcFaceOnnxEmbedder.embed")
        # blobFromImages resizes the uint8 image (bilinear) before converting to float.
        arrays = [
            a if a.shape[:2] == (size, size) else cv2.resize(a, (size, size), interpolation=cv2.INTER_LINEAR)
            for a in arrays
        ]
        if not arrays:
            return np.zeros((0, 3, size, size), dtype=np.float32)
        blob = np.stack(arrays).astype(np.float32).transpose(0, 3, 1, 2)
        return np.ascontiguousarray((blob - 127.5) / 127.5, dtype=np.float32)

    def embed(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) RGB [0, 1] -> (B, D) float32, unit norm."""
        blob = self.preprocess(images)
        if len(blob) == 0:
            return torch.zeros(0, max(self.dim, 0))
        if self.dynamic_batch:
            out = self.session.run(None, {self.input_name: blob})[0]
        else:  # a fixed batch size n: run in chunks of n, padding the last one
            n = self.fixed_batch
            chunks = []
            for i in range(0, len(blob), n):
                chunk = blob[i : i + n]
                pad = n - len(chunk)
                if pad:
                    chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), dtype=chunk.dtype)])
                chunks.append(np.asarray(self.session.run(None, {self.input_name: chunk})[0])[: n - pad])
            out = np.concatenate(chunks)
        out = np.asarray(out, dtype=np.float64).reshape(len(blob), -1)
        self.dim = out.shape[1]
        return _normalise(torch.from_numpy(out)).float()


# --------------------------------------------------------------------------- metrics


def _check_embeddings(a: Tensor, b: Tensor, name: str) -> tuple[Tensor, Tensor]:
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"{name}: expected two (B, D) tensors of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return _normalise(a.to(torch.float64)), _normalise(b.to(torch.float64))


def identity_similarity(a_emb: Tensor, b_emb: Tensor) -> Tensor:
    """IDS: cosine similarity of paired embeddings -> (B,) float64."""
    a, b = _check_embeddings(a_emb, b_emb, "identity_similarity")
    return (a * b).sum(dim=-1).clamp(-1.0, 1.0)


def identity_degrees(a_emb: Tensor, b_emb: Tensor) -> Tensor:
    """Deg: the angle between paired embeddings in degrees, arccos(clamped cosine) -> (B,) float64."""
    a, b = _check_embeddings(a_emb, b_emb, "identity_degrees")
    # Equal to arccos(cos), but exact near 0 and 180 degrees where arccos loses half the digits.
    angle = 2.0 * torch.atan2((a - b).norm(dim=-1), (a + b).norm(dim=-1))
    return angle * (180.0 / math.pi)


def identity_scores(embedder: IdentityEmbedder, pred: Tensor, ref: Tensor) -> dict[str, Tensor]:
    """{"ids": (B,), "deg": (B,)} between restored `pred` and ground-truth `ref` (BCHW RGB [0, 1]).

    Both are embedded in one call, so an embedder's `last_detected` afterwards lists pred then ref.
    """
    if pred.shape != ref.shape:
        raise ValueError(f"identity_scores: pred {tuple(pred.shape)} and ref {tuple(ref.shape)} differ in shape")
    emb = embedder.embed(torch.cat([pred, ref], dim=0))
    b = pred.shape[0]
    return {"ids": identity_similarity(emb[:b], emb[b:]), "deg": identity_degrees(emb[:b], emb[b:])}


# --------------------------------------------------------------------------- registry

_REGISTRY: Registry[Callable[..., IdentityEmbedder]] = Registry("identity embedder")


def register_identity_embedder(name: str, factory: Callable[..., IdentityEmbedder], overwrite: bool = False) -> None:
    """Make `factory(**kwargs) -> IdentityEmbedder` available as `get_identity_embedder(name, **kwargs)`."""
    if not callable(factory):
        raise TypeError(f"identity embedder {name!r}: factory must be callable, got {type(factory).__name__}")
    _REGISTRY.register(name, factory, overwrite)


def get_identity_embedder(name: str, **kwargs: Any) -> IdentityEmbedder:
    """Build the embedder registered as `name`; ValueError listing the known names otherwise."""
    return _REGISTRY.get(name)(**kwargs)


def list_identity_embedders() -> list[str]:
    """Registered identity embedder names, sorted."""
    return _REGISTRY.names()


def _arcface_factory(path: str | Path | None = None, **kwargs: Any) -> ArcFaceOnnxEmbedder:
    if path is None:
        raise ValueError("identity embedder 'arcface' needs path=<ArcFace .onnx file> (e.g. insightface's w600k_r50.onnx)")
    return ArcFaceOnnxEmbedder(path, **kwargs)


def _toy_factory(**kwargs: Any) -> IdentityEmbedder:
    from facereward.measures.toy_judges import load_toy_identity_embedder

    return load_toy_identity_embedder(**kwargs)


register_identity_embedder("dlib", DlibIdentityEmbedder)
register_identity_embedder("toy", _toy_factory)
register_identity_embedder("arcface", _arcface_factory)
