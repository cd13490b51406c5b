"""The shipped toy judges (metrics.toy_judges) meet the accuracy their metrics.json states.

Everything is measured on freshly rendered held-out (test-split) identities of the demo world,
with sample seeds that the training script's evaluation does not use.
"""

from __future__ import annotations

import itertools
import json
import re

import numpy as np
import pytest
import torch

from facereward.data.degradation import degrade
from facereward.data.toyfaces import ToyFaceWorld
from facereward.measures.identity import IdentityEmbedder, identity_scores
from facereward.measures.landmarks import LandmarkDetector, landmark_distance
from facereward.measures.toy_judges import (
    ToyIdentityEmbedder,
    ToyLandmarkRegressor,
    default_toy_judges_dir,
    load_toy_identity_embedder,
    load_toy_landmark_regressor,
    roc_auc,
    verification_accuracy,
    verification_pairs,
)

ACC_TOL = 0.03  # verification accuracy may be this much below metrics.json
AUC_TOL = 0.02
LMK_TOL_PX = 0.3  # landmark error may be this much above metrics.json
STRENGTHS = (0.0, 0.3, 0.6, 0.9)


def _bchw(images) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2), dtype=np.float32))


@pytest.fixture(scope="module")
def metrics() -> dict:
    return json.loads((default_toy_judges_dir() / "metrics.json").read_text())


@pytest.fixture(scope="module")
def embedder() -> ToyIdentityEmbedder:
    return load_toy_identity_embedder()


@pytest.fixture(scope="module")
def regressor() -> ToyLandmarkRegressor:
    return load_toy_landmark_regressor()


@pytest.fixture(scope="module")
def world() -> ToyFaceWorld:
    return ToyFaceWorld(seed=0, n_identities=200, test_fraction=0.2)


@pytest.fixture(scope="module")
def held_out(world):
    """200 faces (5 per held-out identity), seed 123: not a seed the training script evaluates on."""
    faces = world.sample(200, 64, "test", seed=123)
    assert {f.split for f in faces} == {"test"}
    return faces


@pytest.fixture(scope="module")
def degraded_series(held_out):
    """20 faces, each degraded at every strength in STRENGTHS (same seed and index per face)."""
    faces = held_out[:20]
    return {
        s: _bchw([f.image if s == 0 else degrade(f.image, "diffbir", 5, i, strength=s)[0] for i, f in enumerate(faces)])
        for s in STRENGTHS
    }


def test_shipped_files_small_and_consistent(embedder, metrics):
    folder = default_toy_judges_dir()
    for stem in ("toy-id", "toy-lmk"):
        size = (folder / f"{stem}.safetensors").stat().st_size
        assert size < 2 * 1024 * 1024, f"{stem}.safetensors is {size} bytes"
    assert embedder.threshold == pytest.approx(metrics["identity"]["threshold"])
    assert 0.9 <= metrics["identity"]["accuracy"] <= 1.0
    assert metrics["landmarks"]["mean_error_px_clean"] <= 1.5


def test_protocols_and_shapes(embedder, regressor, held_out):
    assert isinstance(embedder, IdentityEmbedder) and embedder.name == "toy-id" and embedder.dim == 128
    assert isinstance(regressor, LandmarkDetector) and regressor.name == "toy-lmk"
    x = _bchw([f.image for f in held_out[:4]])
    emb = embedder.embed(x)
    assert emb.shape == (4, 128) and emb.dtype == torch.float32 and not emb.requires_grad
    assert torch.allclose(emb.norm(dim=-1), torch.ones(4), atol=1e-5)
    pts = regressor.detect(x)
    assert pts.shape == (4, 68, 2) and pts.dtype == torch.float32 and not pts.requires_grad
    assert not embedder.training and not regressor.training


def test_identical_images_cosine_one(embedder, held_out):
    x = _bchw([f.image for f in held_out[:6]])
    scores = identity_scores(embedder, x, x.clone())
    assert torch.allclose(scores["ids"], torch.ones(6, dtype=torch.float64), atol=1e-5)
    assert float(scores["deg"].max()) < 0.5
    # batch composition does not matter in eval mode
    single = embedder.embed(x[:1])
    assert float((single[0] * embedder.embed(x)[0]).sum()) == pytest.approx(1.0, abs=1e-5)


def test_verification_on_held_out_identities(embedder, held_out, metrics):
    emb = embedder.embed(_bchw([f.image for f in held_out])).double()
    pairs, same = verification_pairs([f.identity for f in held_out], 300, seed=123)
    scores = (emb[pairs[:, 0]] * emb[pairs[:, 1]]).sum(-1).numpy()
    stated = metrics["identity"]
    acc = verification_accuracy(scores, same, stated["threshold"])
    auc = roc_auc(scores, same)
    assert acc >= stated["accuracy"] - ACC_TOL, f"accuracy {acc:.3f} vs stated {stated['accuracy']:.3f}"
    assert auc >= stated["roc_auc"] - AUC_TOL, f"AUC {auc:.4f} vs stated {stated['roc_auc']:.4f}"


def test_landmarks_on_held_out_faces(regressor, held_out, metrics):
    faces = held_out[:100]
    pred = regressor.detect(_bchw([f.image for f in faces]))
    err = float(landmark_distance(pred, torch.from_numpy(np.stack([f.landmarks for f in faces]))).mean())
    stated = metrics["landmarks"]["mean_error_px_clean"]
    assert err <= stated + LMK_TOL_PX, f"landmark error {err:.2f} px vs stated {stated:.2f} px"


def test_other_input_sizes(embedder, regressor, world):
    """A 128 px render: landmarks come back in 128 px coordinates, identity matches its 64 px render."""
    keys = world.sample_keys(10, "test", seed=124)
    big = [world.face(i, j, 128) for i, j in keys]
    small = [world.face(i, j, 64) for i, j in keys]
    pred = regressor.detect(_bchw([f.image for f in big]))
    err = float(landmark_distance(pred, torch.from_numpy(np.stack([f.landmarks for f in big]))).mean())
    assert err <= 2 * 1.5 + 1.0, f"landmark error at 128 px {err:.2f} px"
    cos = (embedder.embed(_bchw([f.image for f in big])) * embedder.embed(_bchw([f.image for f in small]))).sum(-1)
    assert float(cos.mean()) > 0.9


def test_identity_similarity_falls_with_degradation(embedder, degraded_series):
    clean = embedder.embed(degraded_series[0.0]).double()
    means = [float((embedder.embed(degraded_series[s]).double() * clean).sum(-1).mean()) for s in STRENGTHS]
    assert means[0] == pytest.approx(1.0, abs=1e-5)
    assert all(a > b for a, b in itertools.pairwise(means)), f"mean IDS vs strength {means}"
    assert means[1] > 0.6, f"mild degradation should keep identity, got mean IDS {means[1]:.3f}"


def test_landmark_error_grows_with_degradation(regressor, held_out, degraded_series):
    ref = torch.from_numpy(np.stack([f.landmarks for f in held_out[:20]]))
    errs = [float(landmark_distance(regressor.detect(degraded_series[s]), ref).mean()) for s in STRENGTHS]
    assert all(a < b for a, b in itertools.pairwise(errs)), f"landmark error vs strength {errs}"


def test_missing_weights_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        load_toy_identity_embedder(tmp_path)
    with pytest.raises(FileNotFoundError, match="toy-lmk"):
        load_toy_landmark_regressor(tmp_path / "nowhere")


def test_save_load_roundtrip(tmp_path, held_out):
    from facereward.measures.toy_judges import save_toy_judge

    torch.manual_seed(0)
    model = ToyIdentityEmbedder().eval()
    model.threshold = 0.25
    save_toy_judge(model, tmp_path)
    loaded = load_toy_identity_embedder(tmp_path)
    x = _bchw([f.image for f in held_out[:3]])
    assert loaded.threshold == 0.25
    assert torch.allclose(model.embed(x), loaded.embed(x), atol=1e-6)


def test_pair_helpers():
    pairs, same = verification_pairs([0, 0, 1, 1, 2, 2], 3, seed=0)
    ids = np.array([0, 0, 1, 1, 2, 2])
    assert len(pairs) == 6 and same.sum() == 3
    assert ((ids[pairs[:, 0]] == ids[pairs[:, 1]]) == same).all()
    assert roc_auc(np.array([0.9, 0.8, 0.1, 0.2]), np.array([True, True, False, False])) == 1.0
    assert roc_auc(np.array([0.5, 0.5]), np.array([True, False])) == 0.5
    assert verification_accuracy(np.array([0.9, 0.1]), np.array([True, True]), 0.5) == 0.5
