"""The toy oracle: preference labels from hidden, GT-referenced quality, so the demo needs no person (docs/methods.md 1.1).

`toy_quality` scores restorations of toy faces against their ground truth with the shipped toy
judges; `oracle_label` compares two images (optionally with Bradley-Terry label noise, to mimic
human annotators); `label_candidates` labels the pairs of a candidates folder
(`facereward.candidates`) into a preference JSONL; `build_toy_preferences` does the whole chain
for the demo: toy faces of one split -> candidates -> oracle labels.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from facereward.candidates import load_candidates, make_candidates
from facereward.data.imageio import image_to_tensor, read_image, write_image
from facereward.data.preferences import PreferencePair, write_pairs
from facereward.metrics.fullref import rgb_to_y, ssim
from facereward.metrics.identity import (
    IdentityEmbedder,
    get_identity_embedder,
    identity_similarity,
)
from facereward.metrics.landmarks import (
    LandmarkDetector,
    get_landmark_detector,
    landmark_distance,
)

__all__ = [
    "ORACLE_WEIGHTS",
    "bradley_terry_first_wins",
    "build_toy_preferences",
    "detail_score",
    "label_candidates",
    "oracle_label",
    "toy_quality",
    "write_toy_paired_set",
]

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
) -> Tensor:
    """Hidden GT-referenced quality of (B, 3, H, W) [0, 1] images -> (B,) float64 in [0, 1]; higher is better.

    q = 0.25 SSIM_Y(x, gt) + 0.25 max(0, IDS(x, gt)) + 0.25 exp(-LMD(x, gt) / (2 px * W / 64))
        + 0.25 min(r, 1/r),  r = Laplacian energy of x's luma / that of gt's (`detail_score`),
    with IDS / LMD from the shipped toy judges (or the `identity` / `landmarks` given). `gt` may be
    one image (1, 3, H, W) for the whole batch.
    """
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
    return sum(ORACLE_WEIGHTS[k] * terms[k].to(torch.float64).cpu() for k in ORACLE_WEIGHTS)


def bradley_terry_first_wins(q_first: Tensor, q_second: Tensor, noise: float = 0.0,
                             generator: torch.Generator | None = None) -> Tensor:
    """(B,) bool: does the first image win? noise = 0: q_first >= q_second; else P = sigmoid((q1 - q2) / noise)."""
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    q_first, q_second = torch.as_tensor(q_first, dtype=torch.float64), torch.as_tensor(q_second, dtype=torch.float64)
    if noise == 0:
        return q_first >= q_second
    p = torch.sigmoid((q_first - q_second) / noise)
    return torch.rand(p.shape, generator=generator, dtype=torch.float64) < p


def _as_batch(x: Tensor | str | Path | Sequence[str | Path]) -> Tensor:
    if isinstance(x, Tensor):
        return x.unsqueeze(0) if x.ndim == 3 else x
    paths = [x] if isinstance(x, (str, Path)) else list(x)
    return torch.cat([image_to_tensor(read_image(p)) for p in paths])


def oracle_label(
    first: Tensor | str | Path | Sequence[str | Path],
    second: Tensor | str | Path | Sequence[str | Path],
    gt: Tensor | str | Path | Sequence[str | Path],
    noise: float = 0.0,
    seed: int = 0,
) -> Tensor:
    """Which of two images (or batches; tensors or image paths) is better: (B,) long, 0 = first, 1 = second.

    noise = 0 compares `toy_quality` (ties go to the first); noise > 0 samples Bradley-Terry with
    P(first) = sigmoid((q1 - q2) / noise), seeded by `seed`.
    """
    a, b, g = _as_batch(first), _as_batch(second), _as_batch(gt)
    if a.shape != b.shape:
        raise ValueError(f"oracle_label: first {tuple(a.shape)} and second {tuple(b.shape)} differ in shape")
    q = toy_quality(torch.cat([a, b]), torch.cat([g.expand_as(a) if g.shape[0] == 1 else g] * 2))
    wins = bradley_terry_first_wins(q[: len(a)], q[len(a):], noise, torch.Generator().manual_seed(int(seed)))
    return (~wins).long()


def label_candidates(
    candidates_dir: str | Path,
    out_jsonl: str | Path,
    pairs_per_item: int | None = None,
    noise: float = 0.0,
    seed: int = 0,
    min_margin: float = 0.0,
) -> int:
    """Label candidate pairs of every item with the toy oracle into `out_jsonl` (source "oracle"); returns the count.

    All k(k-1)/2 pairs per item, or `pairs_per_item` of them sampled (seeded). Pairs whose quality
    difference is below `min_margin`, or exactly zero, are skipped as ambiguous. Needs the GT of
    every item. The file is written atomically (replaced if it exists).
    """
    if noise < 0:
        raise ValueError(f"label_candidates: noise must be >= 0, got {noise}")
    if pairs_per_item is not None and pairs_per_item < 1:
        raise ValueError(f"label_candidates: pairs_per_item must be >= 1 or None, got {pairs_per_item}")
    items = load_candidates(candidates_dir)
    generator = torch.Generator().manual_seed(int(seed))
    annotator = "toy-oracle" if noise == 0 else f"toy-oracle(noise={noise:g})"
    records: list[PreferencePair] = []
    for index, item in enumerate(items):
        if item.gt is None:
            raise ValueError(f"{candidates_dir}: item {item.name!r} has no GT; the toy oracle needs the ground truth")
        if len(item.candidates) < 2:
            continue
        images = torch.cat([image_to_tensor(read_image(p)) for p in item.paths])
        q = toy_quality(images, image_to_tensor(read_image(item.gt)))
        pairs = list(itertools.combinations(range(len(item.paths)), 2))
        if pairs_per_item is not None and pairs_per_item < len(pairs):
            rng = np.random.default_rng([int(seed), index])
            pairs = [pairs[i] for i in sorted(rng.choice(len(pairs), pairs_per_item, replace=False))]
        i_idx = torch.tensor([i for i, _ in pairs])
        j_idx = torch.tensor([j for _, j in pairs])
        margin = (q[i_idx] - q[j_idx]).abs()
        first_wins = bradley_terry_first_wins(q[i_idx], q[j_idx], noise, generator)
        for (i, j), m, win in zip(pairs, margin.tolist(), first_wins.tolist()):
            if m == 0.0 or m < min_margin:
                continue
            chosen, rejected = (i, j) if win else (j, i)
            records.append(PreferencePair(
                chosen=item.paths[chosen], rejected=item.paths[rejected], lq=item.lq, gt=item.gt,
                caption=item.caption or None, source="oracle", annotator=annotator))
    write_pairs(out_jsonl, records)
    return len(records)


def write_toy_paired_set(out_dir: str | Path, n: int, size: int = 64, split: str = "train", seed: int = 0,
                         preset: str = "diffbir") -> Path:
    """n toy faces of `split` identities plus seeded degraded copies: OUT/lq, OUT/hq, manifest.json, toyworld.json.

    Same world as the demo and the shipped restorer (world seed 0, 200 identities); use split="train"
    for FRM training data and split="test" for its held-out evaluation.
    """
    from facereward.data.testset import write_degraded_testset
    from facereward.data.toyfaces import ToyFaceWorld, write_toy_marker
    from facereward.demo import TOY_WORLD_IDENTITIES, TOY_WORLD_SEED

    out_dir = Path(out_dir)
    world = ToyFaceWorld(seed=TOY_WORLD_SEED, n_identities=TOY_WORLD_IDENTITIES)
    faces = world.sample(n, size=size, split=split, seed=seed)
    source = out_dir / "source-hq"
    for i, face in enumerate(faces):
        write_image(source / f"{i:04d}.png", face.image)
        (source / f"{i:04d}.txt").write_text(face.caption + "\n")
    write_degraded_testset(source, out_dir, preset=preset, seed=seed, size=size, progress=False)
    info = {"world_seed": TOY_WORLD_SEED, "n_identities": TOY_WORLD_IDENTITIES, "split": split, "sample_seed": seed,
            "identities": [f.identity for f in faces], "landmarks": [f.landmarks.tolist() for f in faces]}
    write_toy_marker(out_dir, info)
    return out_dir


def build_toy_preferences(
    out_dir: str | Path,
    n_inputs: int = 200,
    k: int = 6,
    model: str | Path | None = None,
    seed: int = 0,
    steps: int = 20,
    size: int | None = None,
    split: str = "train",
    etas: Sequence[float] = (0.0, 0.5, 1.0),
    strengths: Sequence[float] = (0.1, 0.3, 0.5),
    pairs_per_item: int | None = None,
    noise: float = 0.0,
    min_margin: float = 0.0,
    batch_size: int = 16,
    progress: bool = True,
    device: str | None = None,
) -> Path:
    """Toy preference set with no person: faces of `split` -> candidates -> toy-oracle labels; returns OUT/pairs.jsonl.

    OUT/testset/ holds the paired toy set; OUT itself is the candidates folder (candidates.json, lq/, gt/,
    candidates/): k restorations by `model` (default: the shipped toy restorer) at `etas`, the LQ input,
    the GT degraded at `strengths` (models "lq@S") and the GT. `size` defaults to the model's size.
    """
    from facereward.weights import default_restorer_path

    out_dir = Path(out_dir)
    model = Path(model) if model is not None else default_restorer_path()
    meta_path = model / "facereward.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{model}: not a facereward restorer folder (no facereward.json)")
    model_size = int(json.loads(meta_path.read_text())["config"]["size"])
    if size is None:
        size = model_size
    elif size != model_size:
        raise ValueError(f"build_toy_preferences: size {size} differs from the model's size {model_size} ({model})")
    testset = write_toy_paired_set(out_dir / "testset", n_inputs, size=size, split=split, seed=seed)
    make_candidates(testset, out_dir, {"base": model}, k=k, etas=etas, steps=steps, seed=seed, include_lq=True,
                    include_gt=True, degraded_strengths=strengths, batch_size=batch_size, progress=progress,
                    device=device)
    pairs_path = out_dir / "pairs.jsonl"
    label_candidates(out_dir, pairs_path, pairs_per_item=pairs_per_item, noise=noise, seed=seed, min_margin=min_margin)
    return pairs_path
