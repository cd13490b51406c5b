"""The automatic labeller paired with human labels (docs/methods.md 1.1): a linear SVM (or logistic regression) on GT-referenced features.

Each candidate gets full-reference features against its GT (`FullReferenceFeatures`: measures of the measures
table, by default PSNR, SSIM-Y, the low-frequency wavelet L1 (DT-CWT) and identity similarity, optionally LPIPS and
the detail ratio). A pair
(a, b) becomes d = (f(a) - f(b)) / s, s the per-feature std over the training candidates; the
classifier is trained on both orders (d -> 1, -d -> 0) with no intercept, so
P(a > b) = sigmoid(g * w.d) and P(b > a) = 1 - P(a > b) exactly. For the SVM, g is a Platt scale
fitted on its decision values (also without intercept). Models save as JSON (coefficients, scaler
and feature settings; no pickle).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from facereward.candidates import load_candidates
from facereward.data.imageio import image_to_tensor, read_image
from facereward.data.preferences import PreferencePair, split_pairs, write_pairs

__all__ = ["PSNR_CAP", "AutoLabeller", "FullReferenceFeatures", "auto_labeller_agreement"]

PSNR_CAP = 60.0  # dB; identical images (PSNR = inf, e.g. the GT as a candidate) get this value
KINDS = ("svm", "logreg")
FORMAT_VERSION = 1


DEFAULT_FEATURES = ("psnr", "ssim-y", "wavelet", "ids")
# the old saved feature names (format 1) -> measure names
_OLD_NAMES = {"psnr": "psnr", "ssim": "ssim-y", "lowpass_l1": "wavelet", "ids": "ids", "lpips": "lpips", "detail": "detail"}


class FullReferenceFeatures:
    """Per-candidate features against the GT: (B, 3, H, W) images, gt -> (B, F) float64 numpy, one column per measure.

    The columns are measures of `facereward.measures` (full-reference, by name, with `options` per name). The
    default: "psnr" (dB, RGB, capped at PSNR_CAP), "ssim-y", "wavelet" (the low-pass L1 of a 3-level DT-CWT) and
    "ids" (the `identity` judge; left out with identity="none"); `lpips=(net, backbone_path, heads_path)` adds
    "lpips", `detail=True` the oracle's Laplacian-energy ratio "detail".
    """

    def __init__(
        self,
        identity: str = "toy",
        lpips: Any = None,
        detail: bool = False,
        levels: int = 3,
        wavelet: str = "dtcwt",
        device: str | torch.device = "cpu",
        measures: Sequence[str] | None = None,
        options: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        from facereward.measures import MeasureEnv, create_measure

        self.device = torch.device(device)
        if measures is None:
            measures = [m for m in DEFAULT_FEATURES if m != "ids" or identity not in (None, "none")]
            measures += (["lpips"] if lpips is not None else []) + (["detail"] if detail else [])
            options = {"psnr": {"max_db": PSNR_CAP}, "wavelet": {"levels": int(levels), "wavelet": wavelet},
                       "ids": {"judge": identity},
                       **({"lpips": dict(zip(("net", "backbone_path", "heads_path"), map(str, lpips)))} if lpips is not None else {}),
                       **(options or {})}
        self.names = list(measures)
        self.options = {k: dict(v) for k, v in (options or {}).items() if k in self.names}
        env = MeasureEnv("cpu")  # judges run on the CPU, where they are loaded
        self.measures = [create_measure(name, env=env, device=self.device, **self.options.get(name, {})) for name in self.names]
        not_fr = [m.name for m in self.measures if not getattr(m, "needs_gt", False)]
        if not_fr:
            raise ValueError(f"FullReferenceFeatures: {not_fr[0]!r} is not a full-reference measure")

    def config(self) -> dict[str, Any]:
        """JSON-serialisable settings that rebuild these features with `from_config`."""
        return {"names": self.names, "measures": self.names, "options": self.options}

    @classmethod
    def from_config(cls, config: dict[str, Any], device: str | torch.device = "cpu") -> FullReferenceFeatures:
        """Rebuild from `config()`; also reads files saved before features were measures (format 1)."""
        if "measures" in config:
            return cls(measures=config["measures"], options=config.get("options") or {}, device=device)
        names = [_OLD_NAMES[n] for n in config["names"]]
        if "lpips" in names and config.get("lpips") is None:
            raise ValueError("these features used an LPIPS module given as an object; pass features= with the same LPIPS to load")
        options = {"psnr": {"max_db": PSNR_CAP}, "ids": {"judge": config.get("identity") or "none"},
                   "wavelet": {"levels": config.get("levels", 3), "wavelet": config.get("wavelet", "haar")}}  # saved before the wavelet field: Haar
        if config.get("lpips"):
            options["lpips"] = dict(zip(("net", "backbone_path", "heads_path"), config["lpips"]))
        return cls(measures=names, options=options, device=device)

    @torch.no_grad()
    def __call__(self, images: Tensor, gt: Tensor) -> np.ndarray:
        if gt.shape[0] == 1 and images.shape[0] > 1:
            gt = gt.expand_as(images)
        if images.shape != gt.shape:
            raise ValueError(f"FullReferenceFeatures: images {tuple(images.shape)} and gt {tuple(gt.shape)} differ in shape")
        images, gt = images.float().to(self.device), gt.float().to(self.device)
        cols = [m(images, gt).to(torch.float64).cpu() for m in self.measures]
        return torch.stack(cols, dim=1).numpy()


def _need_gt(pair: PreferencePair) -> Path:
    if pair.gt is None:
        where = f" ({pair.origin})" if pair.origin else ""
        raise ValueError(f"auto labelling needs the ground truth, but a pair{where} has no 'gt' ({pair.chosen})")
    return Path(pair.gt)


class AutoLabeller:
    """Linear pairwise classifier on standardised feature differences; kind "svm" (linear SVM + Platt) or "logreg"."""

    def __init__(self, kind: str = "svm", C: float = 1.0, features: FullReferenceFeatures | None = None) -> None:
        if kind not in KINDS:
            raise ValueError(f"AutoLabeller: unknown kind {kind!r}; known: {', '.join(KINDS)}")
        if not C > 0:
            raise ValueError(f"AutoLabeller: C must be > 0, got {C}")
        self.kind, self.C = kind, float(C)
        self._features = features
        self.coef_: np.ndarray | None = None
        self.scale_: float = 1.0
        self.std_: np.ndarray | None = None
        self.mean_: np.ndarray | None = None
        self._cache: dict[tuple[Path, Path], np.ndarray] = {}

    @property
    def features(self) -> FullReferenceFeatures:
        if self._features is None:
            self._features = FullReferenceFeatures()
        return self._features

    @property
    def source(self) -> str:
        return f"auto-{self.kind}"

    @property
    def fitted(self) -> bool:
        return self.coef_ is not None

    # ---- features ----------------------------------------------------------------------------
    def candidate_features(self, images: Sequence[str | Path], gts: Sequence[str | Path]) -> np.ndarray:
        """Features of image files against their GT files -> (N, F); cached by (image, gt) path."""
        keys = [(Path(i), Path(g)) for i, g in zip(images, gts)]
        todo: dict[Path, list[Path]] = {}
        for img, gt in keys:
            if (img, gt) not in self._cache:
                todo.setdefault(gt, [])
                if img not in todo[gt]:
                    todo[gt].append(img)
        for gt, imgs in todo.items():
            gt_t = image_to_tensor(read_image(gt))
            batch = torch.cat([image_to_tensor(read_image(p)) for p in imgs])
            for img, f in zip(imgs, self.features(batch, gt_t)):
                self._cache[(img, gt)] = f
        return np.stack([self._cache[k] for k in keys]) if keys else np.zeros((0, len(self.features.names)))

    def pair_features(self, pairs: Sequence[PreferencePair]) -> tuple[np.ndarray, np.ndarray]:
        """(features of chosen, features of rejected), each (N, F); every pair needs a gt."""
        gts = [_need_gt(p) for p in pairs]
        fa = self.candidate_features([p.chosen for p in pairs], gts)
        fb = self.candidate_features([p.rejected for p in pairs], gts)
        return fa, fb

    # ---- fitting -----------------------------------------------------------------------------
    def fit(self, pairs: Sequence[PreferencePair]) -> AutoLabeller:
        """Fit on labelled pairs (ties are skipped); returns self."""
        pairs = [p for p in pairs if not p.tie]
        if len(pairs) < 2:
            raise ValueError(f"AutoLabeller.fit: need at least 2 non-tie pairs, got {len(pairs)}")
        return self.fit_features(*self.pair_features(pairs))

    def fit_features(self, f_chosen: np.ndarray, f_rejected: np.ndarray) -> AutoLabeller:
        """Fit on feature arrays of chosen and rejected candidates, (N, F) each; returns self."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.svm import LinearSVC

        fa, fb = np.asarray(f_chosen, np.float64), np.asarray(f_rejected, np.float64)
        if fa.shape != fb.shape or fa.ndim != 2 or len(fa) < 1:
            raise ValueError(f"AutoLabeller.fit_features: expected two (N, F) arrays, got {fa.shape} and {fb.shape}")
        both = np.concatenate([fa, fb])
        self.mean_ = both.mean(axis=0)
        std = both.std(axis=0)
        self.std_ = np.where(std > 1e-12, std, 1.0)
        d = (fa - fb) / self.std_  # docs/methods.md 1.1 (auto labeller): standardised feat(chosen) - feat(rejected)
        x = np.concatenate([d, -d])
        y = np.concatenate([np.ones(len(d), int), np.zeros(len(d), int)])
        if self.kind == "logreg":
            clf = LogisticRegression(C=self.C, fit_intercept=False, max_iter=5000).fit(x, y)
            self.coef_, self.scale_ = clf.coef_.ravel().copy(), 1.0
        else:
            svm = LinearSVC(C=self.C, fit_intercept=False, max_iter=20000).fit(x, y)
            self.coef_ = svm.coef_.ravel().copy()
            margin = (x @ self.coef_).reshape(-1, 1)
            platt = LogisticRegression(C=1e4, fit_intercept=False, max_iter=5000).fit(margin, y)
            self.scale_ = float(platt.coef_.ravel()[0])
        return self

    def _check_fitted(self) -> None:
        if not self.fitted:
            raise RuntimeError("AutoLabeller: not fitted yet (call fit(pairs) or load(path))")

    # ---- prediction --------------------------------------------------------------------------
    def proba_from_features(self, f_first: np.ndarray, f_second: np.ndarray) -> np.ndarray:
        """P(first better than second) for feature arrays (N, F) -> (N,)."""
        self._check_fitted()
        z = self.scale_ * (((np.asarray(f_first) - np.asarray(f_second)) / self.std_) @ self.coef_)
        return 1.0 / (1.0 + np.exp(-np.clip(z, -500, 500)))

    def predict_proba(self, pair: PreferencePair | Sequence[PreferencePair]) -> float | np.ndarray:
        """P(pair.chosen is better than pair.rejected): a float for one pair, (N,) for a list."""
        single = isinstance(pair, PreferencePair)
        pairs = [pair] if single else list(pair)
        self._check_fitted()
        p = self.proba_from_features(*self.pair_features(pairs)) if pairs else np.zeros(0)
        return float(p[0]) if single else p

    def agreement(self, pairs: Sequence[PreferencePair]) -> float:
        """Fraction of non-tie pairs whose chosen image the labeller also prefers (P > 0.5)."""
        pairs = [p for p in pairs if not p.tie]
        if not pairs:
            raise ValueError("AutoLabeller.agreement: no non-tie pairs")
        return float(np.mean(self.predict_proba(pairs) > 0.5))

    def label_unlabelled(
        self,
        candidates_dir: str | Path,
        human_pairs: Sequence[PreferencePair],
        out_jsonl: str | Path,
        min_confidence: float = 0.0,
    ) -> int:
        """Label every candidate pair of `candidates_dir` not in `human_pairs`; returns the count written.

        Fits on `human_pairs` first when not fitted. Confidence is max(P, 1 - P); pairs below
        `min_confidence` are skipped. Lines carry source "auto-<kind>"; written atomically.
        """
        if not 0.0 <= min_confidence <= 1.0:
            raise ValueError(f"label_unlabelled: min_confidence must be in [0, 1], got {min_confidence}")
        if not self.fitted:
            self.fit(human_pairs)
        items = load_candidates(candidates_dir)
        known = {frozenset((Path(p.chosen).resolve(), Path(p.rejected).resolve())) for p in human_pairs}
        records: list[PreferencePair] = []
        for item in items:
            if item.gt is None:
                raise ValueError(f"{candidates_dir}: item {item.name!r} has no GT; auto labelling needs the ground truth")
            paths = item.paths
            todo = [(i, j) for i, j in itertools.combinations(range(len(paths)), 2)
                    if frozenset((paths[i].resolve(), paths[j].resolve())) not in known]
            if not todo:
                continue
            feats = self.candidate_features(paths, [item.gt] * len(paths))
            p = self.proba_from_features(feats[[i for i, _ in todo]], feats[[j for _, j in todo]])
            for (i, j), pi in zip(todo, p.tolist()):
                if max(pi, 1.0 - pi) < min_confidence:
                    continue
                chosen, rejected = (i, j) if pi >= 0.5 else (j, i)
                records.append(PreferencePair(chosen=paths[chosen], rejected=paths[rejected], lq=item.lq, gt=item.gt,
                                              caption=item.caption or None, source=self.source, annotator=self.source))
        write_pairs(out_jsonl, records)
        return len(records)

    # ---- persistence ---------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the fitted labeller as JSON (kind, C, coefficients, Platt scale, scaler, feature settings)."""
        self._check_fitted()
        data = {"format_version": FORMAT_VERSION, "kind": self.kind, "C": self.C, "coef": self.coef_.tolist(),
                "scale": self.scale_, "mean": self.mean_.tolist(), "std": self.std_.tolist(), "features": self.features.config()}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path, features: FullReferenceFeatures | None = None) -> AutoLabeller:
        """Read a labeller written by `save`; features are rebuilt from its settings unless given (names must match)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such auto-labeller file")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            kind, C, coef = data["kind"], data["C"], np.asarray(data["coef"], np.float64)
            scale, mean, std, fcfg = float(data["scale"]), np.asarray(data["mean"]), np.asarray(data["std"]), data["features"]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: not an auto-labeller file ({err.__class__.__name__}: {err})") from None
        features = features or FullReferenceFeatures.from_config(fcfg)
        saved = fcfg["measures"] if "measures" in fcfg else [_OLD_NAMES.get(n, n) for n in fcfg["names"]]
        if features.names != saved or len(coef) != len(features.names):
            raise ValueError(f"{path}: saved for features {fcfg['names']}, given {features.names}")
        labeller = cls(kind, C, features)
        labeller.coef_, labeller.scale_, labeller.mean_, labeller.std_ = coef, scale, mean, std
        return labeller


def auto_labeller_agreement(
    pairs: Sequence[PreferencePair],
    kind: str = "svm",
    C: float = 1.0,
    held_out_fraction: float = 0.25,
    seed: int = 0,
    features: FullReferenceFeatures | None = None,
) -> dict[str, Any]:
    """Train on part of the (human) pairs, report agreement on the rest, split by LQ input: {kind, n_train, n_test, agreement}."""
    pairs = [p for p in pairs if not p.tie]
    train, test = split_pairs(pairs, held_out_fraction, seed=seed, by="lq")
    if not train or not test:
        raise ValueError(f"auto_labeller_agreement: split gave {len(train)} train / {len(test)} held-out pairs; need more inputs")
    labeller = AutoLabeller(kind, C, features).fit(train)
    agreement = labeller.agreement(test)
    return {"kind": kind, "n_train": len(train), "n_test": len(test), "agreement": agreement,
            "train_agreement": labeller.agreement(train), "features": labeller.features.names,
            "coef": dict(zip(labeller.features.names, labeller.coef_.tolist()))}
