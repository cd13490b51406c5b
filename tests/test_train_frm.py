"""train-frm: Bradley-Terry training on preference pairs raises held-out accuracy; checkpoints and resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from facereward.data.imageio import write_image
from facereward.data.preferences import append_pair
from facereward.models.frm import FaceRewardModel, FRMConfig
from facereward.train.accelerator import RunConfig
from facereward.train.checkpoints import find_checkpoint
from facereward.train.frm import TrainFRMConfig, train_frm


def _blur(img: np.ndarray, k: int) -> np.ndarray:
    import cv2

    return cv2.blur(img, (k, k)) if k > 1 else img


@pytest.fixture
def pairs_file(tmp_path):
    """Sharp (chosen) vs blurred (rejected) random textures: a preference any FRM can learn."""
    rng = np.random.default_rng(0)
    path = tmp_path / "pairs.jsonl"
    for i in range(48):
        base = rng.random((32, 32, 3)).astype(np.float32)
        write_image(tmp_path / f"img/{i}_sharp.png", base)
        write_image(tmp_path / f"img/{i}_blur.png", _blur(base, 5))
        append_pair(path, {"chosen": f"img/{i}_sharp.png", "rejected": f"img/{i}_blur.png", "lq": f"img/{i}_blur.png",
                           "source": "test"})
    return path


def _config(tmp_path, pairs_file, train_steps=40, **kw):
    return TrainFRMConfig(
        run=RunConfig(output_dir=str(tmp_path / "run"), save_every=20, log_every=5, progress=False),
        pairs=str(pairs_file), held_out_fraction=0.25, train_steps=train_steps, batch_size=8, lr=3e-3, eval_every=20,
        model=FRMConfig(backbone="cnn", input_size=32, cnn_widths=[8, 16], cnn_depth=1), **kw,
    )


def test_train_frm_learns_the_preference_and_resumes(tmp_path, pairs_file):
    best = train_frm(_config(tmp_path, pairs_file))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["train_pairs"] + metrics["held_out_pairs"] == 48
    assert metrics["best_held_out_accuracy"] >= 0.9
    frm = FaceRewardModel.from_pretrained(best)
    sharp = torch.rand(4, 3, 32, 32)
    blurred = torch.nn.functional.avg_pool2d(sharp, 5, stride=1, padding=2)
    assert (frm.score(sharp) > frm.score(blurred)).all()
    assert find_checkpoint(tmp_path / "run", "latest").name == "step-00000040"
    cfg = _config(tmp_path, pairs_file, train_steps=60)
    cfg.run.resume = "latest"
    train_frm(cfg)
    assert find_checkpoint(tmp_path / "run", "latest").name == "step-00000060"
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())["history"]
    assert [h["step"] for h in history] == [20, 40, 60]  # the resumed run continued at 40, keeping the earlier entries


def test_train_frm_needs_pairs(tmp_path):
    with pytest.raises(ValueError, match="--pairs"):
        train_frm(TrainFRMConfig(run=RunConfig(output_dir=str(tmp_path / "r"), progress=False)))


def test_shipped_toy_frm_scores_fall_with_degradation():
    """The shipped toy FRM (scripts/toy_frm_experiment.py) on fresh held-out faces: Spearman <= -0.8 per face."""
    from scipy.stats import spearmanr

    from facereward.data.degradation import degrade
    from facereward.data.toyfaces import ToyFaceWorld
    from facereward.weights import WEIGHTS_DIR

    frm = FaceRewardModel.from_pretrained(WEIGHTS_DIR / "toy-frm")
    faces = ToyFaceWorld(seed=0, n_identities=200).sample(12, size=64, split="test", seed=99)
    strengths = [0.0, 0.2, 0.4, 0.6, 0.8]
    scores = np.zeros((len(faces), len(strengths)))
    with torch.no_grad():
        for j, s in enumerate(strengths):
            batch = np.stack([degrade(f.image, "diffbir", seed=5, index=i, strength=s)[0] for i, f in enumerate(faces)])
            scores[:, j] = frm.score(torch.from_numpy(batch.transpose(0, 3, 1, 2).copy())).numpy()
    per_face = [spearmanr(strengths, row).statistic for row in scores]
    assert np.mean(per_face) <= -0.8
    result = json.loads((WEIGHTS_DIR / "toy-frm" / "result.json").read_text())
    assert result["held_out_pairwise_accuracy"] >= 0.85
