"""`facereward demo`: held-out toy faces -> degraded -> restored by the shipped model -> the evaluate table and grid."""

from __future__ import annotations

import json
from pathlib import Path

from facereward.data.imageio import write_image
from facereward.data.testset import write_degraded_testset
from facereward.data.toyfaces import ToyFaceWorld, write_toy_marker
from facereward.evaluate import EvaluateConfig, EvaluateResult, evaluate
from facereward.weights import default_restorer_path

# The world the shipped toy restorer was trained on (scripts/toy_restorer.yaml); the demo uses its test identities.
TOY_WORLD_SEED = 0
TOY_WORLD_IDENTITIES = 200
DEMO_PRESET = "diffbir"


def make_toy_testset(out_dir: str | Path, n: int, size: int = 64, seed: int = 0, preset: str = DEMO_PRESET) -> Path:
    """Write n held-out (test-identity) toy faces and their degraded copies: OUT/lq, OUT/hq, manifest.json, toyworld.json."""
    out_dir = Path(out_dir)
    world = ToyFaceWorld(seed=TOY_WORLD_SEED, n_identities=TOY_WORLD_IDENTITIES)
    faces = world.sample(n, size=size, split="test", seed=seed)
    source = out_dir / "source-hq"
    for i, face in enumerate(faces):
        write_image(source / f"{i:04d}.png", face.image)
        (source / f"{i:04d}.txt").write_text(face.caption + "\n")
    write_degraded_testset(source, out_dir, preset=preset, seed=seed, size=size, progress=False)
    world_info = {"world_seed": TOY_WORLD_SEED, "n_identities": TOY_WORLD_IDENTITIES, "split": "test", "sample_seed": seed,
                  "identities": [f.identity for f in faces], "landmarks": [f.landmarks.tolist() for f in faces]}
    write_toy_marker(out_dir, world_info)
    return out_dir


def run_demo(out_dir: str | Path, n: int = 16, model: str | Path | None = None, steps: int = 50, seed: int = 0,
             device: str | None = None, identity: str = "auto", landmarks: str = "auto", progress: bool = True) -> EvaluateResult:
    """Make the held-out test set, restore it with `model` (default: the shipped one) and evaluate LQ, stage 1 and stage 2."""
    out_dir = Path(out_dir)
    testset = make_toy_testset(out_dir / "toy-test", n, size=_model_size(model), seed=seed)
    config = EvaluateConfig(
        testset=str(testset), out_dir=str(out_dir), models={"base": str(model or default_restorer_path())},
        include_lq=True, include_stage1=True, steps=steps, eta=0.0, seed=seed, device=device,
        identity=identity, landmarks=landmarks, progress=progress,
    )
    return evaluate(config)


def _model_size(model: str | Path | None) -> int:
    meta = json.loads((Path(model or default_restorer_path()) / "facereward.json").read_text())
    return int(meta["config"]["size"])
