"""Reward per compute on the toy world: LRPO training all trainable steps, a sliding window of them, or a random
subset per sample (docs/methods.md 2.4), over several seeds; a table and a plot of held-out reward against
training wall-clock.

    python scripts/reward_per_compute.py [--seeds 0 1 2] [--count 3] [--out runs/reward-per-compute]
        -> OUT/table.md, OUT/reward_per_compute.png, OUT/MODE-sSEED/ (each run; rerunning resumes or skips them)

Each run is the toy recipe (configs/lrpo_toy.yaml) with held-out evaluation every 5 epochs on 16 faces, in its own
process, one after another (so the runs do not share the cores). "Reaches" is the training wall-clock at which a
run's held-out reward first reaches the mean final held-out reward of the full recipe.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

MODES = {"all": [], "window": ["--set", "trained_steps=window"], "random": ["--set", "trained_steps=random"]}


def run(mode: str, seed: int, count: int, out: Path, smoke: bool) -> list[dict]:
    folder = out / f"{mode}-s{seed}"
    metrics = folder / "metrics.json"
    if not (metrics.is_file() and (folder / "model").is_dir()):
        extra = ["--set", f"trained_count={count}"] if mode != "all" else []
        smoke_args = ["--set", "epochs=2", "--set", "held_out.every=1", "--set", "held_out.toy_faces=2"] if smoke else [
            "--set", "held_out.every=5", "--set", "held_out.toy_faces=16"]
        cmd = [sys.executable, "-m", "facereward.cli", "lrpo", "--config", "configs/lrpo_toy.yaml", *MODES[mode], *extra,
               "--set", f"run.seed={seed}", "--set", "run.resume=auto", "--set", "run.progress=false", *smoke_args,
               "--output-dir", str(folder)]
        print(" ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True)
    return json.loads(metrics.read_text())["epochs"]


def reaches(rows: list[dict], target: float) -> float | None:
    for row in rows:
        if row.get("held_out/reward", -1e9) >= target:
            return row.get("time/train_s", 0.0)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--count", type=int, default=3, help="trained steps per sample for window and random")
    parser.add_argument("--out", default="runs/reward-per-compute")
    args = parser.parse_args()
    smoke = os.environ.get("FACEREWARD_SMOKE") == "1"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {(m, s): run(m, s, args.count, out, smoke) for m in MODES for s in args.seeds}
    finals = {k: [r for r in rows if "held_out/reward" in r][-1]["held_out/reward"] for k, rows in results.items()}
    target = statistics.mean(finals[("all", s)] for s in args.seeds)
    full_time = statistics.mean(results[("all", s)][-1]["time/train_s"] for s in args.seeds)
    lines = [f"Toy LRPO recipe, seeds {args.seeds}; target = the full recipe's mean final held-out reward {target:.4f}; "
             f"full recipe's mean training wall-clock {full_time:.1f} s.", "",
             "| trained steps | seed | training wall-clock | final held-out reward | reaches the target at | of the full run's time |",
             "|---|---|---|---|---|---|"]
    for (mode, seed), rows in results.items():
        at = reaches(rows, target)
        lines.append(f"| {mode} | {seed} | {rows[-1]['time/train_s']:.1f} s | {finals[(mode, seed)]:.4f} | "
                     + (f"{at:.1f} s | {at / full_time:.2f}x |" if at is not None else "never | - |"))
    table = "\n".join(lines) + "\n"
    (out / "table.md").write_text(table)
    print(table)
    from facereward.report import reward_per_compute

    fig = reward_per_compute([(f"{m} s{s}", rows) for (m, s), rows in results.items()])
    if fig is not None:
        fig.savefig(out / "reward_per_compute.png", dpi=110)
        print(f"-> {out / 'reward_per_compute.png'}")


if __name__ == "__main__":
    main()
