"""The toy oracle: preference labels from hidden, GT-referenced quality, so the demo needs no person (docs/methods.md 1.1).

`facereward.measures.toy_quality` scores restorations of toy faces against their ground truth with the
shipped toy judges; `oracle_label` compares two images (optionally with Bradley-Terry label noise, to mimic
human annotators); `label_candidates` labels the pairs of a candidates folder
(`facereward.candidates`) into a preference JSONL; `build_toy_preferences` does the whole chain
for the demo: toy faces of one split -> candidates -> oracle labels.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from facereward.candidates import load_candidates, make_candidates
from facereward.data.imageio import image_to_tensor, read_image
from facereward.data.preferences import PreferencePair, write_pairs
from facereward.data.testset import write_toy_testset
from facereward.measures.toy_quality import toy_quality

__all__ = [
    "bradley_terry_first_wins",
    "build_toy_preferences",
    "label_candidates",
    "oracle_label",
]

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
    testset = write_toy_testset(out_dir / "testset", n_inputs, size=size, split=split, seed=seed)
    make_candidates(testset, out_dir, {"base": model}, k=k, etas=etas, steps=steps, seed=seed, include_lq=True,
                    include_gt=True, degraded_strengths=strengths, batch_size=batch_size, progress=progress,
                    device=device)
    pairs_path = out_dir / "pairs.jsonl"
    label_candidates(out_dir, pairs_path, pairs_per_item=pairs_per_item, noise=noise, seed=seed, min_margin=min_margin)
    return pairs_path
