"""The README's and docs' toy tables again, with 95% intervals, on two held-out test sets (sample seeds 0 and 1).

For each experiment (the toy base, the demo, the ReFL experiment, the LRPO experiment, ReFL on the toy one-step
base beside the 50-step base) its trained models are
evaluated as the experiment evaluates them (faces, DDIM steps, measures), with `--ci` and a paired comparison of
every method against the base, on the held-out toy test set of seed 0 and on a second of seed 1. Missing training
runs are made first by their own scripts (`facereward demo`, scripts/refl_experiment.py, scripts/lrpo_experiment.py),
which resume finished runs. Writes OUT/EXPERIMENT/seedS/results.* and OUT/summary.md.

    python scripts/interval_tables.py --out runs/intervals
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from facereward import smoke
from facereward.config import load_config
from facereward.data.testset import write_toy_testset
from facereward.evaluate import EvaluateConfig, evaluate
from facereward.evaluate.outputs import format_cell
from facereward.measures import MeasuresConfig
from facereward.train.lrpo import LRPOConfig, rewards_with_defaults
from facereward.weights import WEIGHTS_DIR, default_onestep_path, default_restorer_path

ROOT = Path(__file__).resolve().parent.parent
SEEDS = (0, 1)
FRM = {"frm": {"path": str(WEIGHTS_DIR / "toy-frm")}}


def lrpo_reward() -> MeasuresConfig:
    """The composite LRPO trains on (configs/lrpo_toy.yaml): the demo's and the LRPO experiment's reward column."""
    rewards = rewards_with_defaults(load_config(LRPOConfig, ROOT / "configs" / "lrpo_toy.yaml", []).rewards)
    return MeasuresConfig(weights=dict(rewards.weights), options=dict(rewards.options))


def ensure(folder: Path, command: list[str]) -> None:
    """Run `command` (an experiment script) unless `folder` already holds its trained models."""
    if not folder.exists():
        print("running", " ".join(command), flush=True)
        subprocess.run(command, check=True, cwd=ROOT)


def experiments(args: argparse.Namespace) -> dict[str, dict]:
    """name -> how the experiment evaluates: models, faces, DDIM steps, measures, stage 1 rows, and the main method
    (compared with each other row as well as every row with the base)."""
    base = str(default_restorer_path())
    demo, refl, lrpo = args.demo, args.refl, args.lrpo
    ensure(demo / "runs" / "lrpo" / "model", [sys.executable, "-m", "facereward", "demo", "--out-dir", str(demo), "--no-progress"])
    ensure(refl / "runs", [sys.executable, "scripts/refl_experiment.py", "--out", str(refl)])
    ensure(lrpo / "lrpo", [sys.executable, "scripts/lrpo_experiment.py", "--out", str(lrpo)])
    onestep = args.onestep
    ensure(onestep / "model", [sys.executable, "-m", "facereward", "refl", "--config", "configs/refl_onestep_toy.yaml",
                               "--set", f"run.output_dir={onestep}"])
    common = ["psnr", "ssim", "ids", "deg", "lmd", "toy-quality"]
    return {
        "base": dict(models={"base": base}, faces=32, steps=50, stage1=["base"], measures=[*common, "frm", "reward"], main=""),
        "demo": dict(models={"base": base, "ReFL": str(demo / "runs" / "refl" / "model"),
                             "LRPO": str(demo / "runs" / "lrpo" / "model")}, faces=16, steps=6, stage1=False,
                     measures=[*common, "frm", "reward"], main="ReFL"),
        "refl": dict(models={"base": base, **{name: str(refl / "runs" / name / "model") for name in
                                              ("ReFL", "ReFL_wo_dynamic_FRM", "ReFL_wo_reg_+_structural")}},
                     faces=32, steps=10, stage1=False, measures=[*common, "frm"], main="ReFL"),
        "lrpo": dict(models={"base": base, "LRPO": str(lrpo / "lrpo" / "model"),
                             "LRPO w/o likelihood reg.": str(lrpo / "lrpo-wo-likelihood-reg" / "model"),
                             "LRPO uniform adv.": str(lrpo / "lrpo-uniform-adv" / "model")},
                     faces=24, steps=8, stage1=False, measures=["reward", "psnr", "ssim", "ids", "lmd", "toy-quality"],
                     main="LRPO"),
        "onestep": dict(models={"base": base, "one-step": str(default_onestep_path()), "one-step ReFL": str(onestep / "model")},
                        faces=32, steps=50, stage1=False, measures=[*common, "frm"], main="one-step ReFL",
                        extra=[["one-step", "LQ"]]),
    }


def run(out: Path, name: str, spec: dict, seed: int, bootstrap: int) -> dict:
    """Evaluate one experiment on the held-out test set of `seed`, with intervals, every method against base and the
    main method against the others."""
    folder = out / name / f"seed{seed}"
    testset = write_toy_testset(folder / "toy-test", spec["faces"], size=64, seed=seed)
    lq = ["LQ"] if name in ("base", "demo", "refl", "onestep") else []
    others = [m for m in [*lq, *(f"{m} (stage 1)" for m in spec["stage1"] or []), *spec["models"]] if m != "base"]
    result = evaluate(EvaluateConfig(
        testset=str(testset), out_dir=str(folder), models=spec["models"], include_lq=bool(lq), include_stage1=spec["stage1"],
        sample_steps=spec["steps"], eta=0.0, seed=0, measures=spec["measures"], options=FRM, reward=lrpo_reward(),
        ci=True, bootstrap=bootstrap, compare=[[m, "base"] for m in others]
        + [[spec["main"], m] for m in others if spec["main"] and m not in (spec["main"], "LQ")] + spec.get("extra", []),
        progress=False,
        save_outputs=False))
    return {"rows": result.rows, "intervals": result.analysis["intervals"], "comparisons": result.analysis["comparisons"]}


def summary(name: str, spec: dict, by_seed: dict[int, dict]) -> str:
    """One experiment: its table per seed with intervals, and each method minus base on both seeds."""
    parts = [f"## {name}: {spec['faces']} held-out faces per seed, {spec['steps']} DDIM steps (eta 0)"]
    for seed, res in by_seed.items():
        columns = list(next(iter(res["rows"].values())))
        lines = [f"Seed {seed} (mean [95% interval]):", "", "| | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
        for method, values in res["rows"].items():
            lines.append(f"| {method} | " + " | ".join(format_cell(values[c], res["intervals"][method].get(c)) for c in columns) + " |")
        parts.append("\n".join(lines))
    lines = ["Paired differences A - B over the same faces (95% bootstrap interval; * where it excludes 0):", "",
             "| A | B | column | " + " | ".join(f"seed {s}" for s in by_seed) + " | holds on both |",
             "|---|---|---|" + "---|" * len(by_seed) + "---|"]
    first = next(iter(by_seed.values()))["comparisons"]
    for i, c in enumerate(first):
        cells, signs = [], []
        for res in by_seed.values():
            d = res["comparisons"][i]
            star = "*" if d["lower"] > 0 or d["upper"] < 0 else ""
            cells.append(f"{d['difference']:+.4g} [{d['lower']:+.3g}, {d['upper']:+.3g}]{star}")
            signs.append(0 if not star else (1 if d["difference"] > 0 else -1))
        holds = "yes" if signs[0] != 0 and all(s == signs[0] for s in signs) else "no"
        lines.append(f"| {c['a']} | {c['b']} | {c['column']} | " + " | ".join(cells) + f" | {holds} |")
    parts.append("\n".join(lines))
    return "\n\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/intervals"))
    parser.add_argument("--demo", type=Path, default=Path("runs/intervals/demo"), help="the demo's output folder (made if missing)")
    parser.add_argument("--refl", type=Path, default=Path("runs/refl-exp"), help="scripts/refl_experiment.py's --out")
    parser.add_argument("--lrpo", type=Path, default=Path("runs/lrpo-experiment"), help="scripts/lrpo_experiment.py's --out")
    parser.add_argument("--onestep", type=Path, default=Path("runs/onestep-refl"),
                        help="ReFL on the toy one-step base (configs/refl_onestep_toy.yaml; made if missing)")
    parser.add_argument("--only", default="", help="comma-separated experiments (base, demo, refl, lrpo, onestep); default all")
    parser.add_argument("--bootstrap", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.time()
    specs = experiments(args)
    if args.only:
        specs = {k: v for k, v in specs.items() if k in args.only.split(",")}
    if smoke.active():  # FACEREWARD_SMOKE=1 (the README test): a few faces, few steps
        for spec in specs.values():
            spec.update(faces=4, steps=2)
        args.bootstrap = 50
    parts, payload = [], {}
    for name, spec in specs.items():
        t0 = time.time()
        by_seed = {seed: run(args.out, name, spec, seed, args.bootstrap) for seed in SEEDS}
        payload[name] = by_seed
        parts.append(summary(name, spec, by_seed))
        print(f"{name}: {time.time() - t0:.0f} s", flush=True)
    text = "\n\n".join(parts) + f"\n\nTotal {time.time() - start:.0f} s with {torch.get_num_threads()} threads.\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.md").write_text(text)
    (args.out / "summary.json").write_text(json.dumps(payload, indent=1, default=float))
    print(text)


if __name__ == "__main__":
    main()
