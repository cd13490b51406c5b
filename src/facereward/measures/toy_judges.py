"""Small judges trained on the procedural face world (`data.toyfaces`), shipped with the package.

They stand in for ArcFace and a landmark detector when the demo reports IDS/Deg and LMD on toy
faces (docs/methods.md section 3); `scripts/train_toy_judges.py` retrains both from scratch and writes
the weights plus `metrics.json` (their accuracy on held-out identities) to the default folder:

* ``ToyIdentityEmbedder`` ("toy-id"): BCHW RGB [0, 1] -> L2-normalised (B, 128) embeddings
  (the `metrics.identity.IdentityEmbedder` protocol). Trained with a CosFace head on the world's
  train identities, with synthetic-degradation augmentation, so that similarity to the clean
  image falls smoothly with degradation strength.
* ``ToyLandmarkRegressor`` ("toy-lmk"): BCHW RGB [0, 1] -> (B, 68, 2) pixel (x, y) in the input's
  pixel frame, iBUG order (the `metrics.landmarks.LandmarkDetector` protocol); heatmaps plus a
  soft-argmax, trained on the world's true landmarks.

Both work at 64 px internally; other input sizes are resized (area down, bilinear up).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "IBUG_FLIP",
    "INPUT_SIZE",
    "ToyIdentityConfig",
    "ToyIdentityEmbedder",
    "ToyLandmarkConfig",
    "ToyLandmarkRegressor",
    "best_threshold",
    "default_toy_judges_dir",
    "load_toy_identity_embedder",
    "load_toy_landmark_regressor",
    "roc_auc",
    "save_toy_judge",
    "verification_accuracy",
    "verification_pairs",
]

INPUT_SIZE = 64
IDENTITY_FILE = "toy-id"
LANDMARK_FILE = "toy-lmk"

# Index of each iBUG-68 landmark's mirror partner (for horizontal-flip augmentation).
IBUG_FLIP: tuple[int, ...] = (
    tuple(range(16, -1, -1))  # jaw 0..16
    + tuple(range(26, 21, -1))  # brows 17..21 <-> 26..22
    + tuple(range(21, 16, -1))
    + (27, 28, 29, 30)  # nose bridge
    + (35, 34, 33, 32, 31)  # nostrils
    + (45, 44, 43, 42, 47, 46)  # right eye <-> left eye
    + (39, 38, 37, 36, 41, 40)
    + (54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55)  # outer lips
    + (64, 63, 62, 61, 60, 67, 66, 65)  # inner lips
)


def default_toy_judges_dir() -> Path:
    """The shipped weights folder, ``facereward/weights/toy-judges``."""
    return Path(__file__).resolve().parents[1] / "weights" / "toy-judges"


def _to_input_size(images: Tensor, name: str) -> Tensor:
    """Check a (B, 3, H, W) tensor and resize it to 64x64 (area when shrinking, bilinear otherwise)."""
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{name}: expected a (B, 3, H, W) RGB tensor in [0, 1], got {shape}")
    images = images.float()
    h, w = images.shape[-2:]
    if (h, w) == (INPUT_SIZE, INPUT_SIZE):
        return images
    if h >= INPUT_SIZE and w >= INPUT_SIZE:
        return F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="area")
    return F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)


def _cbr(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _up(x: Tensor, factor: int) -> Tensor:
    return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)


class _Stage(nn.Sequential):
    """A stride-2 conv then `depth - 1` stride-1 convs (conv-BN-ReLU each)."""

    def __init__(self, cin: int, cout: int, depth: int) -> None:
        layers = _cbr(cin, cout, 2)
        for _ in range(depth - 1):
            layers += _cbr(cout, cout, 1)
        super().__init__(*layers)


# --------------------------------------------------------------------------- identity


@dataclass
class ToyIdentityConfig:
    """Architecture of `ToyIdentityEmbedder` (4 stride-2 stages: 64 -> 4 px, then a flat FC head)."""

    channels: tuple[int, ...] = (16, 32, 64, 128)
    depths: tuple[int, ...] = (1, 2, 2, 2)
    head_channels: int = 32
    dim: int = 128
    dropout: float = 0.1


class ToyIdentityEmbedder(nn.Module):
    """Identity embedder for toy faces: (B, 3, H, W) RGB [0, 1] -> L2-normalised (B, 128)."""

    name = "toy-id"

    def __init__(self, config: ToyIdentityConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or ToyIdentityConfig()
        self.dim = int(config.dim)
        # Verification threshold on cosine similarity (set by training; stored in the json config).
        self.threshold: float | None = None
        stages, cin = [], 3
        for cout, depth in zip(config.channels, config.depths):
            stages.append(_Stage(cin, cout, depth))
            cin = cout
        self.backbone = nn.Sequential(*stages)
        spatial = INPUT_SIZE // 2 ** len(config.channels)
        self.reduce = nn.Sequential(nn.Conv2d(cin, config.head_channels, 1, bias=False), nn.BatchNorm2d(config.head_channels))
        self.dropout = nn.Dropout(config.dropout)
        self.fc = nn.Linear(config.head_channels * spatial * spatial, config.dim)
        self.bn = nn.BatchNorm1d(config.dim)

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) RGB [0, 1] -> (B, dim) unit-norm embeddings (differentiable)."""
        x = _to_input_size(images, "ToyIdentityEmbedder") * 2.0 - 1.0
        x = self.reduce(self.backbone(x)).flatten(1)
        x = self.bn(self.fc(self.dropout(x)))
        return F.normalize(x, dim=-1)

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) RGB [0, 1] -> (B, 128) float32 unit-norm embeddings, in eval mode, no grad."""
        was_training = self.training
        self.eval()
        try:
            device = next(self.parameters()).device
            out = self.forward(images.to(device)) if len(images) else torch.zeros(0, self.dim, device=device)
        finally:
            self.train(was_training)
        return out.float()


# --------------------------------------------------------------------------- landmarks


@dataclass
class ToyLandmarkConfig:
    """Architecture of `ToyLandmarkRegressor`: encoder 64 -> 4 px, heatmaps at 16 px with stage 3-4 context."""

    channels: tuple[int, ...] = (16, 32, 64, 128)
    depths: tuple[int, ...] = (1, 2, 2, 2)
    head_channels: int = 32
    num_landmarks: int = 68
    beta: float = 1.0  # initial soft-argmax inverse temperature (learned)


class ToyLandmarkRegressor(nn.Module):
    """68-point landmark regressor for toy faces: (B, 3, H, W) RGB [0, 1] -> (B, 68, 2) pixel (x, y).

    `forward` returns normalised coordinates u = (x + 0.5) / W, v = (y + 0.5) / H (fractions of the
    image extent); `detect` maps them back to pixel coordinates with pixel centres at integers, the
    `data.toyfaces` convention, at the input's size.
    """

    name = "toy-lmk"

    def __init__(self, config: ToyLandmarkConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or ToyLandmarkConfig()
        if len(config.channels) != 4:
            raise ValueError(f"ToyLandmarkConfig.channels needs 4 stages, got {config.channels}")
        c = config.channels
        self.stages = nn.ModuleList(_Stage(cin, cout, d) for cin, cout, d in zip((3, *c[:-1]), c, config.depths))
        # Head at 16 px: stage-2 features plus 1x1-projected, upsampled context from stages 3 and 4.
        w = config.head_channels
        self.lat2 = nn.Conv2d(c[1], w, 1, bias=False)
        self.lat3 = nn.Conv2d(c[2], w, 1, bias=False)
        self.lat4 = nn.Conv2d(c[3], w, 1, bias=False)
        self.fuse = nn.Sequential(nn.BatchNorm2d(w), nn.ReLU(inplace=True), *_cbr(w, 2 * w, 1))
        self.heatmap = nn.Conv2d(2 * w, config.num_landmarks, 1)
        self.log_beta = nn.Parameter(torch.tensor(float(config.beta)).log())

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) RGB [0, 1] -> (B, 68, 2) normalised (x, y) in [0, 1] (differentiable)."""
        x = _to_input_size(images, "ToyLandmarkRegressor") * 2.0 - 1.0
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        x = self.lat2(feats[1]) + _up(self.lat3(feats[2]), 2) + _up(self.lat4(feats[3]), 4)
        x = self.fuse(x)
        logits = self.heatmap(x) * self.log_beta.exp()  # (B, K, h, w)
        b, k, h, w = logits.shape
        prob = logits.flatten(2).softmax(-1).view(b, k, h, w)
        xs = (torch.arange(w, device=x.device, dtype=prob.dtype) + 0.5) / w
        ys = (torch.arange(h, device=x.device, dtype=prob.dtype) + 0.5) / h
        px = (prob.sum(2) * xs).sum(-1)
        py = (prob.sum(3) * ys).sum(-1)
        return torch.stack([px, py], -1)

    @torch.no_grad()
    def detect(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) RGB [0, 1] -> (B, 68, 2) float32 pixel (x, y) in the input's size, eval, no grad."""
        was_training = self.training
        self.eval()
        try:
            device = next(self.parameters()).device
            k = self.config.num_landmarks
            norm = self.forward(images.to(device)) if len(images) else torch.zeros(0, k, 2, device=device)
        finally:
            self.train(was_training)
        h, w = images.shape[-2:]
        return (norm * torch.tensor([w, h], dtype=norm.dtype, device=norm.device) - 0.5).float()


# --------------------------------------------------------------------------- save / load


def save_toy_judge(model: ToyIdentityEmbedder | ToyLandmarkRegressor, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write `<folder>/<name>.safetensors` (float32 state dict) and `<name>.json` (config); returns the json path."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stem = IDENTITY_FILE if isinstance(model, ToyIdentityEmbedder) else LANDMARK_FILE
    state = {k: v.detach().cpu().float().contiguous() for k, v in model.state_dict().items() if v.is_floating_point()}
    weights = folder / f"{stem}.safetensors"
    save_file(state, str(weights))
    weights.chmod(0o644)
    meta: dict[str, Any] = {"name": model.name, "class": type(model).__name__, "config": asdict(model.config)}
    if isinstance(model, ToyIdentityEmbedder):
        meta["threshold"] = model.threshold
    meta.update(extra or {})
    path = folder / f"{stem}.json"
    path.write_text(json.dumps(meta, indent=2) + "\n")
    return path


def _load(cls: type, config_cls: type, stem: str, path: str | Path | None, device: str | torch.device) -> Any:
    from safetensors.torch import load_file

    folder = Path(path) if path is not None else default_toy_judges_dir()
    if folder.suffix in (".json", ".safetensors"):
        folder = folder.parent
    weights, meta_path = folder / f"{stem}.safetensors", folder / f"{stem}.json"
    for p in (meta_path, weights):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: toy judge {stem!r} not found (retrain it with scripts/train_toy_judges.py)")
    meta = json.loads(meta_path.read_text())
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in meta.get("config", {}).items()}
    model = cls(config_cls(**cfg))
    state = load_file(str(weights))
    # BatchNorm's integer num_batches_tracked buffers are not saved; they do not affect eval.
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"{weights}: state dict does not match {cls.__name__} (missing {missing}, unexpected {unexpected})")
    if isinstance(model, ToyIdentityEmbedder):
        model.threshold = meta.get("threshold")
    return model.to(device).eval()


def load_toy_identity_embedder(path: str | Path | None = None, device: str | torch.device = "cpu") -> ToyIdentityEmbedder:
    """The trained `ToyIdentityEmbedder` from folder `path` (default: the shipped one), in eval mode."""
    return _load(ToyIdentityEmbedder, ToyIdentityConfig, IDENTITY_FILE, path, device)


def load_toy_landmark_regressor(path: str | Path | None = None, device: str | torch.device = "cpu") -> ToyLandmarkRegressor:
    """The trained `ToyLandmarkRegressor` from folder `path` (default: the shipped one), in eval mode."""
    return _load(ToyLandmarkRegressor, ToyLandmarkConfig, LANDMARK_FILE, path, device)


# --------------------------------------------------------------------------- verification helpers


def verification_pairs(identities: Sequence[int], n_pairs: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`n_pairs` same-identity and `n_pairs` different-identity index pairs into `identities`.

    Returns ``(pairs (2n, 2) int, same (2n,) bool)``, distinct unordered pairs, deterministic in `seed`.
    """
    ids = np.asarray(identities)
    rng = np.random.default_rng([int(seed), 606])
    i, j = np.triu_indices(len(ids), k=1)
    same = ids[i] == ids[j]
    pos, neg = np.flatnonzero(same), np.flatnonzero(~same)
    if len(pos) < n_pairs or len(neg) < n_pairs:
        raise ValueError(f"verification_pairs: only {len(pos)} same / {len(neg)} different pairs, asked for {n_pairs}")
    pick = np.concatenate([rng.choice(pos, n_pairs, replace=False), rng.choice(neg, n_pairs, replace=False)])
    return np.stack([i[pick], j[pick]], 1), same[pick]


def roc_auc(scores: np.ndarray, same: np.ndarray) -> float:
    """ROC AUC of `scores` separating `same` (True) from different pairs (ties count one half)."""
    scores, same = np.asarray(scores, dtype=np.float64), np.asarray(same, dtype=bool)
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    n_pos, n_neg = int(same.sum()), int((~same).sum())
    return float((ranks[same].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def verification_accuracy(scores: np.ndarray, same: np.ndarray, threshold: float) -> float:
    """Fraction of pairs classified correctly by ``score >= threshold`` means same identity."""
    return float(np.mean((np.asarray(scores) >= threshold) == np.asarray(same, dtype=bool)))


def best_threshold(scores: np.ndarray, same: np.ndarray) -> float:
    """The threshold maximising `verification_accuracy` (midpoint between neighbouring scores)."""
    s = np.sort(np.unique(np.asarray(scores, dtype=np.float64)))
    cands = np.concatenate([[s[0] - 1e-6], (s[1:] + s[:-1]) / 2.0, [s[-1] + 1e-6]])
    accs = [verification_accuracy(scores, same, t) for t in cands]
    return float(cands[int(np.argmax(accs))])
