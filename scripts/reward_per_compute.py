"""Reward per compute on the toy world: LRPO training all trainable steps, a sliding window of them, or a random
subset per sample (docs/methods.md 2.4), over several seeds; a table and a plot of held-out reward against
training wall-clock.

    python scripts/reward_per_compute.py [--seeds 0 1 2] [--count 3] [--out runs/reward-per-compute]
        -> OUT/table.md, OUT/reward_per_compute.png, OUT/MODE-sSEED/ (each run; rerunning resumes or skips them)

Each run is the toy recipe (configs/lrpo_toy.yaml) with held-out evaluation every 5 epochs on 16 faces, in its own
process, one after another (so the runs do not share the cores; about 18 min on 2 CPU cores). The table gives each
option's mean final held-out reward and training wall-clock against the full recipe's, and per seed when a run first
reaches that seed's full-recipe final; the plot draws each option's seed-mean curve against wall-clock.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from facereward.smoke import active

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
    return json.loads(metrics.read_text())["train_log"]


def reaches(rows: list[dict], target: float) -> float | None:
    """The training wall-clock at which `rows` first hold a held-out reward >= `target` (None: never)."""
    for row in rows:
        if row.get("held_out/reward", -1e9) >= target:
            return row.get("time/train_s", 0.0)
    return None


def held_out(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "held_out/reward" in r]


def mean_curve(runs: list[list[dict]]) -> list[dict]:
    """The seeds' held-out rows averaged epoch by epoch (reward and training wall-clock), for the plot."""
    out = []
    for points in zip(*(held_out(rows) for rows in runs)):
        out.append({"epoch": points[0]["epoch"], "held_out/reward": statistics.mean(p["held_out/reward"] for p in points),
                    "time/train_s": statistics.mean(p.get("time/train_s", 0.0) for p in points)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--count", type=int, default=3, help="trained steps per sample for window and random")
    parser.add_argument("--out", default="runs/reward-per-compute")
    args = parser.parse_args()
    smoke = active()  # FACEREWARD_SMOKE=1
    if smoke:  # scaled down like every smoke run: 2 epochs, and one seed
        args.seeds = args.seeds[:1]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {(m, s): run(m, s, args.count, out, smoke) for m in MODES for s in args.seeds}
    first = {k: held_out(rows)[0]["held_out/reward"] for k, rows in results.items()}
    final = {k: held_out(rows)[-1]["held_out/reward"] for k, rows in results.items()}
    clock = {k: rows[-1]["time/train_s"] for k, rows in results.items()}
    full_clock = statistics.mean(clock[("all", s)] for s in args.seeds)
    lines = [f"Toy LRPO recipe (configs/lrpo_toy.yaml), {args.count} trained steps per sample for window and random, "
             f"seeds {args.seeds}. Training wall-clock leaves out the held-out evaluations.", "",
             "| trained steps | mean final held-out reward | mean gain over epoch 0 | mean training wall-clock | of the full recipe's |",
             "|---|---|---|---|---|"]
    for mode in MODES:
        keys = [(mode, s) for s in args.seeds]
        lines.append(f"| {mode} | {statistics.mean(final[k] for k in keys):.4f} | "
                     f"{statistics.mean(final[k] - first[k] for k in keys):+.4f} | "
                     f"{statistics.mean(clock[k] for k in keys):.1f} s | "
                     f"{statistics.mean(clock[k] for k in keys) / full_clock:.2f}x |")
    lines += ["", "Per seed; \"reaches\" is when the run's held-out reward first reaches the same seed's full-recipe final:",
              "", "| trained steps | seed | training wall-clock | final held-out reward | reaches it at | of that full run's time |",
              "|---|---|---|---|---|---|"]
    for (mode, seed), rows in results.items():
        at = reaches(rows, final[("all", seed)])
        lines.append(f"| {mode} | {seed} | {clock[(mode, seed)]:.1f} s | {final[(mode, seed)]:.4f} | "
                     + (f"{at:.1f} s | {at / clock[('all', seed)]:.2f}x |" if at is not None else "never | - |"))
    table = "\n".join(lines) + "\n"
    (out / "table.md").write_text(table)
    print(table)
    from facereward.report import reward_per_compute

    fig = reward_per_compute([(f"{m} (mean of {len(args.seeds)} seeds)", mean_curve([results[(m, s)] for s in args.seeds]))
                              for m in MODES])
    if fig is not None:
        fig.savefig(out / "reward_per_compute.png", dpi=110)
        print(f"-> {out / 'reward_per_compute.png'}")


if __name__ == "__main__":
    main()
