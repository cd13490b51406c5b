"""Train the toy Face Reward Model from oracle labels and measure it (the README's FRM numbers).

    python scripts/toy_frm_experiment.py --out runs/toy-frm [--quick] [--ship DIR [--force]]

`--ship DIR` copies the best FRM to DIR; an existing DIR (e.g. the shipped src/facereward/weights/toy-frm, which
refl, lrpo and evaluate use by default) is replaced only with --force. `--quick` (also under FACEREWARD_SMOKE=1)
is a tiny smoke run that only checks the script works.

1. Preference sets with no person in the loop: toy faces of the TRAIN identities -> candidates (the shipped
   restorer at eta 0 / 0.5 / 1, the LQ, the GT degraded at strengths 0.1 / 0.3 / 0.5, the GT) -> toy-oracle
   labels; the same from TEST identities for the held-out pairs.
2. `train-frm` (small CNN, Bradley-Terry with a learnable logit scale).
3. Held-out pairwise accuracy, and the FRM score of held-out faces against degradation strength (Spearman).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from facereward import smoke
from facereward.data.degradation import degrade
from facereward.data.toyfaces import ToyFaceWorld
from facereward.data.toyfaces import TOY_WORLD_IDENTITIES, TOY_WORLD_SEED
from facereward.labelling.oracle import build_toy_preferences
from facereward.models.frm import FaceRewardModel, FRMConfig
from facereward.train.accelerator import RunConfig
from facereward.train.frm import TrainFRMConfig, train_frm

STRENGTHS = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


@torch.no_grad()
def strength_curve(frm: FaceRewardModel, n_faces: int = 40, seed: int = 7) -> dict:
    """FRM scores of held-out (test-identity) faces degraded at each strength, and their Spearman correlations."""
    world = ToyFaceWorld(seed=TOY_WORLD_SEED, n_identities=TOY_WORLD_IDENTITIES)
    faces = world.sample(n_faces, size=64, split="test", seed=seed)
    scores = np.zeros((n_faces, len(STRENGTHS)))
    for j, s in enumerate(STRENGTHS):
        batch = np.stack([degrade(f.image, "diffbir", seed=seed, index=i, strength=s)[0] for i, f in enumerate(faces)])
        scores[:, j] = frm.score(torch.from_numpy(batch.transpose(0, 3, 1, 2).copy())).numpy()
    per_face = [spearmanr(STRENGTHS, row).statistic for row in scores]
    return {
        "strengths": STRENGTHS,
        "mean_score": scores.mean(axis=0).tolist(),
        "spearman_of_mean_curve": float(spearmanr(STRENGTHS, scores.mean(axis=0)).statistic),
        "spearman_per_face_mean": float(np.mean(per_face)),
        "spearman_pooled": float(spearmanr(np.tile(STRENGTHS, n_faces), scores.reshape(-1)).statistic),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/toy-frm")
    parser.add_argument("--train-inputs", type=int, default=160)
    parser.add_argument("--test-inputs", type=int, default=40)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--ship", default=None, help="copy the best FRM here (e.g. src/facereward/weights/toy-frm)")
    parser.add_argument("--force", action="store_true", help="let --ship replace an existing folder")
    parser.add_argument("--reuse", action="store_true", help="reuse preference sets already in --out")
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run (4 + 2 inputs, 4 steps)")
    args = parser.parse_args()
    if args.ship and Path(args.ship).exists() and not args.force:
        parser.error(f"--ship {args.ship} exists (the shipped toy FRM is used by refl, lrpo and evaluate); add --force to replace it")
    if args.quick or smoke.active():
        args.train_inputs, args.test_inputs, args.steps = 4, 2, 4
    out = Path(args.out)
    start = time.perf_counter()
    if not (args.reuse and (out / "train-prefs" / "pairs.jsonl").is_file()):
        build_toy_preferences(out / "train-prefs", n_inputs=args.train_inputs, k=2, split="train", seed=0, steps=20)
        build_toy_preferences(out / "test-prefs", n_inputs=args.test_inputs, k=2, split="test", seed=1, steps=20)
    prefs_seconds = time.perf_counter() - start
    config = TrainFRMConfig(
        run=RunConfig(output_dir=str(out / "train"), save_every=500, log_every=50, seed=0),
        pairs=str(out / "train-prefs" / "pairs.jsonl"), eval_pairs=str(out / "test-prefs" / "pairs.jsonl"),
        model=FRMConfig(backbone="cnn", input_size=64, cnn_widths=[16, 32, 64, 128], cnn_depth=1),
        train_steps=args.steps, batch_size=32, lr=1e-3, eval_every=min(100, args.steps),
    )
    t0 = time.perf_counter()
    best = train_frm(config)
    train_seconds = time.perf_counter() - t0
    frm = FaceRewardModel.from_pretrained(best)
    metrics = json.loads((out / "train" / "metrics.json").read_text())
    result = {
        "held_out_pairwise_accuracy": metrics["best_held_out_accuracy"],
        "train_pairs": metrics["train_pairs"],
        "held_out_pairs": metrics["held_out_pairs"],
        "strength_curve": strength_curve(frm),
        "seconds": {"preferences": round(prefs_seconds), "train": round(train_seconds)},
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"wrote {out}/result.json, the FRM in {best} ({time.perf_counter() - start:.0f} s)")
    if args.ship:
        shutil.rmtree(args.ship, ignore_errors=True)
        shutil.copytree(best, args.ship)
        (Path(args.ship) / "result.json").write_text(json.dumps(result, indent=2))
        print(f"shipped the FRM to {args.ship}")


if __name__ == "__main__":
    main()
