"""The toy world's hidden quality: its stand-in for a person (docs/methods.md 1.1), scored against the GT.

`toy_quality` is what the toy oracle labels preferences by and what evaluate's toy-quality column shows;
`detail_score` is its high-frequency term, also a measure (and an auto-labeller feature) of its own.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from facereward.measures.fullref import rgb_to_y, ssim
from facereward.measures.identity import (
    IdentityEmbedder,
    get_identity_embedder,
    identity_similarity,
)
from facereward.measures.landmarks import (
    LandmarkDetector,
    get_landmark_detector,
    landmark_distance,
)

__all__ = ["LANDMARK_SCALE_PX", "ORACLE_WEIGHTS", "detail_score", "toy_quality"]

# toy_quality = sum_i w_i * term_i; the four terms are each in [0, 1] (identity clamped at 0).
ORACLE_WEIGHTS = {"ssim_y": 0.25, "identity": 0.25, "landmarks": 0.25, "detail": 0.25}
LANDMARK_SCALE_PX = 2.0  # at 64 px; scaled with the image width
_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
_EPS = 1e-8


@lru_cache(maxsize=1)
def _toy_judges() -> tuple[IdentityEmbedder, LandmarkDetector]:
    return get_identity_embedder("toy"), get_landmark_detector("toy")


def _laplacian_energy(images: Tensor) -> Tensor:
    """Mean squared 3x3 Laplacian of the luma (Y on [0, 1]) over the interior pixels -> (B,)."""
    y = (rgb_to_y(images.to(torch.float64).clamp(0, 1) * 255.0) - 16.0) / 219.0
    lap = F.conv2d(y, _LAPLACIAN.to(y.device).view(1, 1, 3, 3))
    return lap.pow(2).flatten(1).mean(dim=1)


def detail_score(images: Tensor, gt: Tensor) -> Tensor:
    """min(r, 1/r) with r = (E(x) + eps) / (E(gt) + eps), E the Laplacian energy of the luma -> (B,) in [0, 1].

    1 when the image has as much high-frequency energy as the GT; lower when detail is missing
    (blur) or in excess (noise, ringing).
    """
    r = (_laplacian_energy(images) + _EPS) / (_laplacian_energy(gt) + _EPS)
    return torch.minimum(r, 1.0 / r)


def _check_batch(images: Tensor, gt: Tensor) -> tuple[Tensor, Tensor]:
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"toy_quality: expected (B, 3, H, W) images in [0, 1], got {getattr(images, 'shape', type(images).__name__)}")
    if gt.ndim == 4 and gt.shape[0] == 1 and images.shape[0] > 1:
        gt = gt.expand_as(images)
    if gt.shape != images.shape:
        raise ValueError(f"toy_quality: images {tuple(images.shape)} and gt {tuple(gt.shape)} differ in shape")
    return images.detach().float().cpu(), gt.detach().float().cpu()  # the toy judges run on the CPU


@torch.no_grad()
def toy_quality(
    images: Tensor,
    gt: Tensor,
    identity: IdentityEmbedder | None = None,
    landmarks: LandmarkDetector | None = None,
    weights: dict[str, float] | None = None,
) -> Tensor:
    """Hidden GT-referenced quality of (B, 3, H, W) [0, 1] images -> (B,) float64 in [0, 1]; higher is better.

    q = 0.25 SSIM_Y(x, gt) + 0.25 max(0, IDS(x, gt)) + 0.25 exp(-LMD(x, gt) / (2 px * W / 64))
        + 0.25 min(r, 1/r),  r = Laplacian energy of x's luma / that of gt's (`detail_score`),
    with IDS / LMD from the shipped toy judges (or the `identity` / `landmarks` given). `gt` may be
    one image (1, 3, H, W) for the whole batch. `weights` replaces ORACLE_WEIGHTS (the same four keys).
    """
    weights = ORACLE_WEIGHTS if weights is None else weights
    if set(weights) != set(ORACLE_WEIGHTS):
        raise ValueError(f"toy_quality: weights must name exactly {sorted(ORACLE_WEIGHTS)}, got {sorted(weights)}")
    images, gt = _check_batch(images, gt)
    if identity is None or landmarks is None:
        toy_id, toy_lmk = _toy_judges()
        identity, landmarks = identity or toy_id, landmarks or toy_lmk
    b, w = images.shape[0], images.shape[-1]
    both = torch.cat([images, gt], dim=0)
    emb = identity.embed(both)
    pts = landmarks.detect(both)
    terms = {
        "ssim_y": ssim(images, gt, y_channel=True),
        "identity": identity_similarity(emb[:b], emb[b:]).clamp_min(0.0),
        "landmarks": torch.exp(-landmark_distance(pts[:b], pts[b:]) / (LANDMARK_SCALE_PX * w / 64.0)),
        "detail": detail_score(images, gt),
    }
    return sum(float(weights[k]) * terms[k].to(torch.float64).cpu() for k in ORACLE_WEIGHTS)
