"""The race: ReFL, LRPO (all trained steps; a sliding window of 3), DiffusionNFT and Diffusion-DPO (oracle-labelled
pairs; the model's own samples ranked by the reward) on the toy world from the shipped base, several seeds each;
held-out figures against training wall-clock, with 95% intervals across seeds (docs/results.md, benchmarks/README.md).

    python scripts/race.py [--seeds 0 1 2] [--out runs/race] [--methods refl lrpo-all ...]
        -> OUT/table.md, OUT/race.png, OUT/results.json, OUT/METHOD-sSEED/ (each run; a rerun skips finished runs)

Each method runs its toy recipe (configs/*_toy.yaml) in its own process, one after another, with no held-out
evaluation inside the run (so its wall-clock is training only) and a checkpoint at ten evenly spaced points. Every
checkpoint (and the base) is then evaluated the same way: 16 faces of held-out identities restored with 8 DDIM steps at
eta 0, scored by the composite reward of configs/lrpo_toy.yaml, the initial toy FRM, IDS, PSNR and the toy oracle.
The DPO oracle pairs (`facereward toy-preferences`, one set for all seeds) are made once; their time is reported apart.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from facereward.smoke import active

# method -> (command, config, extra --set overrides, the unit its checkpoints count, its length in that unit)
METHODS: dict[str, tuple[str, str, list[str], str, int]] = {
    "refl": ("refl", "configs/refl_toy.yaml", [], "step", 60),
    "lrpo-all": ("lrpo", "configs/lrpo_toy.yaml", [], "epoch", 20),
    "lrpo-window": ("lrpo", "configs/lrpo_toy.yaml", ["trained_steps=window", "trained_count=3"], "epoch", 20),
    "nft": ("nft", "configs/nft_toy.yaml", [], "epoch", 20),
    "dpo-oracle": ("dpo", "configs/dpo_toy.yaml", ["pairs={pairs}"], "epoch", 20),
    "dpo-self": ("dpo", "configs/dpo_toy.yaml", [], "epoch", 20),
}
REFERENCE = "lrpo-all"  # the full LRPO recipe: the time and reward every other method is measured against
PAIR_INPUTS = 40  # dpo-oracle: toy-preferences on 40 training faces, 2 oracle-labelled pairs each (80 pairs)
COLUMNS = ("reward", "frm/initial", "ids", "psnr", "toy-quality")


def length(method: str, smoke: bool) -> int:
    return 2 if smoke else METHODS[method][4]


def train(method: str, seed: int, out: Path, pairs: Path, smoke: bool) -> Path:
    """Run one (method, seed) unless its model already exists; returns its folder."""
    command, config, extra, unit, _ = METHODS[method]
    folder = out / f"{method}-s{seed}"
    if (folder / "model").is_dir() and (folder / "metrics.json").is_file():
        return folder
    n = length(method, smoke)
    sets = [s.format(pairs=pairs) for s in extra] + [
        f"run.seed={seed}", "run.resume=auto", "run.progress=false", "held_out.every=0", "run.log_every=1",
        f"run.save_every={max(1, n // 10)}", "run.keep_checkpoints=100",
        f"{'train_steps' if unit == 'step' else 'epochs'}={n}"]
    cmd = [sys.executable, "-m", "facereward", command, "--config", config, "--output-dir", str(folder)]
    for s in sets:
        cmd += ["--set", s]
    print(" ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)
    return folder


def make_pairs(out: Path, smoke: bool) -> tuple[Path, float]:
    """The oracle-labelled pairs of dpo-oracle (made once); returns (pairs.jsonl, seconds it took)."""
    folder = out / "oracle-pairs"
    done = folder / "pairs.jsonl"
    timing = folder / "seconds.txt"
    if done.is_file() and timing.is_file():
        return done, float(timing.read_text())
    from facereward.labelling.oracle import build_toy_preferences

    start = time.perf_counter()
    build_toy_preferences(folder, n_inputs=4 if smoke else PAIR_INPUTS, k=4, steps=8, pairs_per_item=2, progress=False)
    seconds = time.perf_counter() - start
    timing.write_text(f"{seconds:.1f}")
    return done, seconds


class Judge:
    """One evaluation for every checkpoint: held-out faces, the composite reward, the initial FRM, IDS, PSNR, oracle."""

    def __init__(self, smoke: bool):
        from facereward.config import load_config
        from facereward.measures import MeasureEnv, WeightedSum
        from facereward.models.frm import FaceRewardModel
        from facereward.models.restorer import Restorer
        from facereward.train.heldout import HeldOutConfig, HeldOutEvaluator
        from facereward.train.lrpo import LRPOConfig, rewards_with_defaults
        from facereward.weights import WEIGHTS_DIR, default_restorer_path

        recipe = load_config(LRPOConfig, Path("configs/lrpo_toy.yaml"), [])
        reward = WeightedSum.from_config(rewards_with_defaults(recipe.rewards), as_reward=True, device="cpu",
                                         env=MeasureEnv("cpu", toy=True), where="rewards")
        held = HeldOutConfig(toy_faces=4 if smoke else 16, sample_steps=2 if smoke else 8,
                             measures=["psnr", "ids", "toy-quality"])
        self.evaluator = HeldOutEvaluator(held, recipe.data, 64, "cpu",
                                          frms={"initial": FaceRewardModel.from_pretrained(WEIGHTS_DIR / "toy-frm")},
                                          extra={"reward": reward.scorers()["reward"]})
        self.base_path = default_restorer_path()
        self.restorer = Restorer.from_pretrained(self.base_path)
        self.base_state = {k: v.clone() for k, v in self.restorer.stage2_trainable().state_dict().items()}

    def __call__(self, stage2: Path | None) -> dict[str, float]:
        net = self.restorer.stage2_trainable()
        net.load_state_dict(self.base_state if stage2 is None else load_file(stage2))
        return self.evaluator(self.restorer)


def curve(folder: Path, judge: Judge, cache: dict) -> list[dict]:
    """[{"at": step or epoch, "time/train_s", COLUMN...}] for the base and every checkpoint of the run in `folder`."""
    log = json.loads((folder / "metrics.json").read_text())["train_log"]
    clock = {int(row.get("epoch", row.get("step", -1))): row["time/train_s"] for row in log if "time/train_s" in row}
    if "base" not in cache:
        cache["base"] = judge(None)
    points = [{"at": 0, "time/train_s": 0.0, **cache["base"]}]
    for ckpt in sorted((folder / "checkpoints").glob("step-*")):
        at = int(ckpt.name.split("-")[1])
        key = str(ckpt)
        if key not in cache:
            cache[key] = judge(ckpt / "stage2.safetensors")
        points.append({"at": at, "time/train_s": clock[at], **cache[key]})
    return points


def interval(values: list[float]) -> tuple[float, float]:
    """The mean and the half-width of its 95% t-interval across seeds (0 for one seed)."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, 0.0
    t95 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571}.get(len(values), 1.96)
    return mean, t95 * statistics.stdev(values) / math.sqrt(len(values))


def reaches(points: list[dict], target: float) -> float | None:
    """The training wall-clock at which `points` first hold a held-out reward >= `target` after training started (None:
    never; the base point does not count)."""
    for p in points[1:]:
        if p["reward"] >= target:
            return p["time/train_s"]
    return None


def table(curves: dict[tuple[str, int], list[dict]], methods: list[str], seeds: list[int], pair_s: float) -> str:
    def cell(values: list[float], digits: int) -> str:
        mean, half = interval(values)
        return f"{mean:.{digits}f} ± {half:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"

    ref_final = {s: curves[(REFERENCE, s)][-1]["reward"] for s in seeds if (REFERENCE, s) in curves}
    ref_clock = {s: curves[(REFERENCE, s)][-1]["time/train_s"] for s in seeds if (REFERENCE, s) in curves}
    base = curves[(methods[0], seeds[0])][0]
    lines = [f"Held-out: 16 faces of held-out identities, 8 DDIM steps, eta 0; mean ± 95% t-interval over seeds {seeds}. "
             f"\"Reaches\": the training wall-clock at which a run's held-out composite reward first reaches the same seed's "
             f"{REFERENCE} final, as a fraction of that {REFERENCE} run's wall-clock (checkpoints at tenths of each run).", "",
             "| method | composite reward | initial FRM | IDS | PSNR (dB) | oracle | training wall-clock (s) | reaches LRPO's final at | seeds that reach it |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| base | {base['reward']:.4f} | {base['frm/initial']:.3f} | {base['ids']:.4f} | {base['psnr']:.2f} | "
             f"{base['toy-quality']:.4f} | - | - | - |"]
    for m in methods:
        runs = [(s, curves[(m, s)]) for s in seeds if (m, s) in curves]
        if not runs:
            continue
        finals = [c[-1] for _, c in runs]
        fractions = [reaches(c, ref_final[s]) for s, c in runs if s in ref_final]
        fractions = [f / ref_clock[s] for (s, _), f in zip(runs, fractions) if f is not None]
        lines.append(f"| {m} | {cell([f['reward'] for f in finals], 4)} | {cell([f['frm/initial'] for f in finals], 3)} | "
                     f"{cell([f['ids'] for f in finals], 4)} | {cell([f['psnr'] for f in finals], 2)} | "
                     f"{cell([f['toy-quality'] for f in finals], 4)} | {cell([f['time/train_s'] for f in finals], 1)} | "
                     + (f"{statistics.mean(fractions):.2f}x (mean of those that do) | " if fractions else "never | ")
                     + f"{len(fractions)}/{len(runs)} |")
    ref_runs = {s: curves[(REFERENCE, s)][-1] for s in seeds if (REFERENCE, s) in curves}
    lines += ["", f"Final minus {REFERENCE}'s final, paired by seed (mean ± 95% t-interval over the seeds' differences):", "",
              "| method | composite reward | initial FRM | IDS | PSNR (dB) | oracle |", "|---|---|---|---|---|---|"]
    for m in methods:
        paired = [(curves[(m, s)][-1], ref_runs[s]) for s in seeds if (m, s) in curves and s in ref_runs]
        if m == REFERENCE or not paired:
            continue
        cells = []
        for column, digits in zip(COLUMNS, (4, 3, 4, 2, 4)):
            mean, half = interval([a[column] - b[column] for a, b in paired])
            cells.append(f"{mean:+.{digits}f} ± {half:.{digits}f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if "dpo-oracle" in methods:
        lines += ["", f"dpo-oracle's {2 * PAIR_INPUTS} pairs (toy-preferences: {PAIR_INPUTS} training faces, 4 restorations, the LQ, "
                  f"3 degradations of the GT and the GT each; 2 oracle-labelled pairs per face) took {pair_s:.0f} s "
                  "to make, once for all seeds; not in its training wall-clock."]
    return "\n".join(lines) + "\n"


def plot(curves: dict[tuple[str, int], list[dict]], methods: list[str], seeds: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for m in methods:
        runs = [curves[(m, s)] for s in seeds if (m, s) in curves]
        if not runs:
            continue
        n = min(len(r) for r in runs)
        xs = [statistics.mean(r[i]["time/train_s"] for r in runs) for i in range(n)]
        stats = [interval([r[i]["reward"] for r in runs]) for i in range(n)]
        ys = [s[0] for s in stats]
        line, = ax.plot(xs, ys, marker="o", ms=3, label=m)
        ax.fill_between(xs, [y - s[1] for y, s in zip(ys, stats)], [y + s[1] for y, s in zip(ys, stats)],
                        color=line.get_color(), alpha=0.12)
    ax.set_xlabel("training wall-clock (s)")
    ax.set_ylabel("held-out composite reward")
    ax.set_title(f"Toy race: seed means, 95% bands over {len(seeds)} seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out", type=Path, default=Path("runs/race"))
    args = parser.parse_args()
    smoke = active()  # FACEREWARD_SMOKE=1: two epochs/steps, one seed, 4 faces
    seeds = args.seeds[:1] if smoke else args.seeds
    args.out.mkdir(parents=True, exist_ok=True)
    pairs, pair_s = make_pairs(args.out, smoke) if "dpo-oracle" in args.methods else (Path("-"), 0.0)
    folders = {(m, s): train(m, s, args.out, pairs, smoke) for s in seeds for m in args.methods}
    torch.set_num_threads(max(1, torch.get_num_threads()))
    judge = Judge(smoke)
    cache_path = args.out / "evaluations.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    curves = {key: curve(folder, judge, cache) for key, folder in folders.items()}
    cache_path.write_text(json.dumps(cache, indent=1))
    text = table(curves, args.methods, seeds, pair_s)
    (args.out / "table.md").write_text(text)
    (args.out / "results.json").write_text(json.dumps({f"{m}-s{s}": c for (m, s), c in curves.items()}, indent=1))
    plot(curves, args.methods, seeds, args.out / "race.png")
    print(text)
    print(f"-> {args.out / 'table.md'}, {args.out / 'race.png'}")


if __name__ == "__main__":
    main()
