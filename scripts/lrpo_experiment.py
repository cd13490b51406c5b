"""LRPO on the toy world: base vs LRPO vs two ablations (the README's LRPO table), in <= 15 minutes on 2 CPU cores.

    python scripts/lrpo_experiment.py --out runs/lrpo-experiment [--quick]   # --quick: a one-minute smoke run

1. Three LRPO runs of configs/lrpo_toy.yaml (the shipped toy restorer, training identities of the toy
   world): full LRPO, LRPO without the likelihood regulariser (reg_weight 0), LRPO with uniform advantages.
   Composite reward: the shipped toy FRM (scaled by 0.1: its scores span about -11..4) + exp(-15 DWT_L1)
   + toy identity cosine + SSIM.
2. `facereward.evaluate` on held-out (test-identity) toy faces: PSNR, SSIM, IDS, LMD; the composite
   reward and its parts are scored here from the same saved restorations.
3. OUT/results.md: the table, the training reward curve per run, the run times; OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from facereward import smoke
from facereward.config import load_config
from facereward.data.imageio import read_image
from facereward.data.training_data import DataConfig
from facereward.data.testset import write_toy_testset
from facereward.data.toyfaces import TOY_WORLD_IDENTITIES, TOY_WORLD_SEED
from facereward.evaluate import EvaluateConfig, evaluate, markdown_table
from facereward.measures import MeasureEnv, WeightedSum
from facereward.train.accelerator import RunConfig
from facereward.train.heldout import HeldOutConfig
from facereward.train.lrpo import LRPOConfig, rewards_with_defaults, train_lrpo
from facereward.weights import default_restorer_path

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "lrpo_toy.yaml"
VARIANTS = {  # name -> LRPOConfig fields that differ from full LRPO
    "LRPO": {},
    "LRPO w/o likelihood reg.": {"reg_weight": 0.0},
    "LRPO uniform adv.": {"adv_weighting": "uniform"},
}


@dataclass
class Settings:
    epochs: int
    steps: int
    group_size: int
    inputs_per_batch: int
    train_faces: int
    test_faces: int
    lr: float
    train_batch_size: int  # the minibatch: one optimizer step per (minibatch, trained step), as the original
    reg_steps: int = 5


FULL = Settings(epochs=20, steps=8, group_size=4, inputs_per_batch=2, train_faces=96, test_faces=24, lr=1e-5, train_batch_size=4)
QUICK = Settings(epochs=2, steps=3, group_size=2, inputs_per_batch=2, train_faces=4, test_faces=4, lr=5e-5, train_batch_size=2,
                 reg_steps=2)


def lrpo_config(out: Path, s: Settings, fields: dict) -> LRPOConfig:
    """One run's config: configs/lrpo_toy.yaml at the settings `s`, on the training identities of the toy world."""
    config = load_config(LRPOConfig, RECIPE, [])
    config.run = RunConfig(output_dir=str(out), save_every=1000, log_every=1, progress=False)
    config.data = DataConfig(toy_faces=s.train_faces, toy_seed=TOY_WORLD_SEED, toy_identities=TOY_WORLD_IDENTITIES, size=64,
                             random_flip=False)
    config.held_out = HeldOutConfig(every=0)
    for key, value in {"group_size": s.group_size, "inputs_per_batch": s.inputs_per_batch, "epochs": s.epochs,
                       "sample_steps": s.steps, "micro_batch": s.train_batch_size, "train_batch_size": s.train_batch_size,
                       "lr": s.lr, "reg_steps": s.reg_steps, **fields}.items():
        setattr(config, key, value)
    return config


@torch.no_grad()
def composite_columns(testset: Path, outputs: Path, reward: WeightedSum) -> dict[str, float]:
    """The composite reward and its parts on one method's saved restorations of the test set."""
    hq_files = sorted((testset / "hq").glob("*.png"))
    restored = torch.from_numpy(np.stack([read_image(outputs / f.name) for f in hq_files]).transpose(0, 3, 1, 2).copy())
    hq = torch.from_numpy(np.stack([read_image(f) for f in hq_files]).transpose(0, 3, 1, 2).copy())
    captions = [(f.with_suffix(".txt").read_text().strip() if f.with_suffix(".txt").is_file() else "") for f in hq_files]
    out = reward(restored.float(), hq.float(), captions)
    return {"reward": float(out.total.mean()), **{f"reward/{k}": float(v.mean()) for k, v in out.components.items()}}


def curve_table(curves: dict[str, list[float]]) -> str:
    """Training composite reward per epoch, one column per run."""
    n = max(len(c) for c in curves.values())
    lines = ["| epoch | " + " | ".join(curves) + " |", "|---|" + "---|" * len(curves)]
    for e in range(n):
        lines.append(f"| {e + 1} | " + " | ".join(f"{c[e]:.4f}" if e < len(c) else "-" for c in curves.values()) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/lrpo-experiment"))
    parser.add_argument("--quick", action="store_true", help="A tiny setting that only checks the script works (also under FACEREWARD_SMOKE=1).")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    s = QUICK if args.quick or smoke.active() else FULL
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()

    models, curves, run_seconds = {"base": str(default_restorer_path())}, {}, {}
    for name, fields in VARIANTS.items():
        t0 = time.time()
        run_dir = args.out / name.lower().replace(" ", "-").replace(".", "").replace("/", "")
        models[name] = str(train_lrpo(lrpo_config(run_dir, s, fields)))
        run_seconds[name] = time.time() - t0
        history = json.loads((run_dir / "metrics.json").read_text())["train_log"]
        curves[name] = [e["reward"] for e in history if "reward" in e]  # (epoch 0, with held-out on, has none)
        print(f"{name}: {run_seconds[name]:.0f} s, training reward {curves[name][0]:.4f} -> {curves[name][-1]:.4f}", flush=True)

    t0 = time.time()
    testset = write_toy_testset(args.out / "toy-test", s.test_faces, size=64, seed=0)
    result = evaluate(EvaluateConfig(testset=str(testset), out_dir=str(args.out / "eval"), models=models, include_lq=False,
                                     sample_steps=s.steps, eta=0.0, seed=0, fid="none", progress=False))
    rewards = rewards_with_defaults(load_config(LRPOConfig, RECIPE, []).rewards)
    reward = WeightedSum.from_config(rewards, env=MeasureEnv(toy=True))
    rows = {}
    for name in models:
        slug = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name).strip("_")
        rows[name] = {**composite_columns(testset, args.out / "eval" / "outputs" / slug, reward),
                      **{k: v for k, v in result.rows[name].items() if k.split(" ")[0] in ("PSNR", "SSIM", "IDS", "LMD")}}
    eval_seconds = time.time() - t0
    total = time.time() - start

    weights = " + ".join(f"{w} {n}" for n, w in rewards.weights.items())
    n_steps = (s.group_size * s.inputs_per_batch // s.train_batch_size) * (s.steps - 1)
    text = (f"{s.test_faces} held-out toy faces, {s.steps} DDIM steps (eta 0); LRPO: {s.epochs} epochs of "
            f"{s.inputs_per_batch} inputs x G={s.group_size}, T={s.steps}, lr {s.lr}, minibatches of {s.train_batch_size}: "
            f"{n_steps} optimizer steps per epoch, from the shipped toy restorer. "
            f"Composite reward = {weights} (frm scaled by 0.1).\n\n" + markdown_table(rows) +
            "\n\nTraining composite reward per epoch (mean over the epoch's samples):\n\n" + curve_table(curves) +
            "\n\nTimes: " + ", ".join(f"{k} {v:.0f} s" for k, v in run_seconds.items()) +
            f", evaluation {eval_seconds:.0f} s; total {total / 60:.1f} min with {args.threads} threads.\n")
    (args.out / "results.md").write_text(text)
    (args.out / "results.json").write_text(json.dumps({"rows": rows, "curves": curves, "run_seconds": run_seconds,
                                                        "eval_seconds": eval_seconds, "settings": s.__dict__}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
