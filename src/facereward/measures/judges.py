"""The judges measures share (identity embedder, landmark detector, FID features), built once per `MeasureEnv`.

A judge spec is a string: identity `auto | toy | dlib | arcface:FILE.onnx | none`, landmarks `auto | toy | dlib | none`,
FID/KID features `auto | identity | inception:FILE | none`. `auto` means the toy judge on toy-world images and dlib
otherwise (`MeasureEnv.toy`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def identity_judge(spec: str, toy: bool):
    """The identity embedder a spec names (None for "none")."""
    from facereward.measures.identity import get_identity_embedder

    if spec == "none":
        return None
    if spec == "auto":
        spec = "toy" if toy else "dlib"
    if spec.startswith("arcface:"):
        return get_identity_embedder("arcface", path=spec.split(":", 1)[1])
    return get_identity_embedder(spec)


def landmark_judge(spec: str, toy: bool):
    """The landmark detector a spec names (None for "none")."""
    from facereward.measures.landmarks import get_landmark_detector

    if spec == "none":
        return None
    return get_landmark_detector("toy" if spec == "auto" and toy else ("dlib" if spec == "auto" else spec))


def fid_extractor(spec: str, identity):
    """FID/KID features: auto/identity (the identity judge's embeddings), inception:PATH (pytorch-fid), or none."""
    from facereward.measures.fid import CallableFeatures, InceptionV3Features

    if spec == "none":
        return None
    if spec in ("auto", "identity"):
        if identity is None:
            if spec == "identity":
                raise ValueError("features=identity needs an identity judge (identity is 'none')")
            return None
        return CallableFeatures(identity.name, identity.embed)
    if spec.startswith("inception:"):
        return InceptionV3Features(spec.split(":", 1)[1])
    raise ValueError(f"features must be auto, identity, inception:PATH or none, got {spec!r}")


class MeasureEnv:
    """What measures are built in: the device, whether the images are toy-world faces, the default judge specs,
    the judges themselves (built once, shared by every measure of one consumer), a per-batch memo, and `used`
    (what each judge resolved to, for results.json)."""

    def __init__(self, device: torch.device | str | None = None, toy: bool = False, identity: str = "auto",
                 landmarks: str = "auto", features: str = "auto"):
        self.device = torch.device(device or "cpu")
        self.toy = toy
        self.specs = {"identity": identity, "landmarks": landmarks, "features": features}
        self.used: dict[str, str] = {}
        self._judges: dict[tuple[str, str], Any] = {}
        self._memo: dict[tuple, tuple[Tensor, Any]] = {}

    def _judge(self, kind: str, spec: str | None, build: Callable[[str], Any]) -> Any:
        spec = spec or self.specs[kind]
        if (kind, spec) not in self._judges:
            self._judges[kind, spec] = build(spec)
        return self._judges[kind, spec]

    def identity(self, spec: str | None = None):
        """The identity judge of `spec` (default: the env's); None for "none"."""
        return self._judge("identity", spec, lambda s: identity_judge(s, self.toy))

    def landmarks(self, spec: str | None = None):
        """The landmark judge of `spec` (default: the env's); None for "none"."""
        return self._judge("landmarks", spec, lambda s: landmark_judge(s, self.toy))

    def features(self, spec: str | None = None, identity: str | None = None):
        """The FID/KID feature extractor of `spec` (None for "none", or "auto" without an identity judge)."""
        return self._judge("features", spec, lambda s: fid_extractor(s, self.identity(identity)))

    def memo(self, key: Any, images: Tensor, fn: Callable[[Tensor], Any]) -> Any:
        """`fn(images)`, computed once per images tensor until `new_batch` (e.g. GT embeddings shared by IDS and Deg)."""
        slot = (key, id(images))
        if slot not in self._memo:
            self._memo[slot] = (images, fn(images))  # holding the tensor keeps its id unique
        return self._memo[slot][1]

    def new_batch(self) -> None:
        self._memo.clear()


__all__ = ["MeasureEnv", "fid_extractor", "identity_judge", "landmark_judge"]
