"""The README's ReFL table: base vs ReFL vs ReFL without the dynamic FRM vs ReFL without regulariser/structural term.

    python scripts/refl_experiment.py --out runs/refl-exp            # <= 15 minutes on 2 CPU cores
    python scripts/refl_experiment.py --out /tmp/refl-quick --quick  # a one-minute smoke run
    python scripts/refl_experiment.py --out runs/refl-exp --grid-only  # redraw OUT/eval/grid.png from the saved outputs

Every variant starts from the shipped toy restorer and rewards with the shipped toy FRM, trains on toy faces of
the training identities, and is evaluated on held-out identities with `facereward evaluate` (FRM score with the
initial FRM, PSNR, SSIM, IDS and LMD with the toy judges). The held-out FRM curves of each run go beside the table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from facereward import smoke
from facereward.data.training_data import DataConfig
from facereward.data.testset import write_toy_testset
from facereward.data.toyfaces import TOY_WORLD_IDENTITIES, TOY_WORLD_SEED
from facereward.evaluate import EvaluateConfig, evaluate, redraw_grid
from facereward.train.accelerator import RunConfig
from facereward.train.heldout import HeldOutConfig
from facereward.measures import MeasuresConfig
from facereward.train.refl import DynamicFRMConfig, ReFLConfig, train_refl
from facereward.weights import WEIGHTS_DIR, default_restorer_path

VARIANTS = {
    "ReFL": {},
    "ReFL w/o dynamic FRM": {"dynamic_frm_every": 0},
    "ReFL w/o reg. + structural": {"reg_weight": 0.0, "structural_weight": 0.0},
}


def variant_config(out: Path, name: str, args: argparse.Namespace) -> ReFLConfig:
    change = VARIANTS[name]
    return smoke.cap_config(ReFLConfig(  # FACEREWARD_SMOKE=1: ReFLConfig's own caps (toy faces, steps) as well
        run=RunConfig(output_dir=str(out / "runs" / name.replace(" ", "_").replace("/", "").replace(".", "")), seed=0,
                      progress=False, log_every=10, save_every=10_000),
        data=DataConfig(toy_faces=800, toy_seed=TOY_WORLD_SEED, toy_identities=TOY_WORLD_IDENTITIES, size=64, seed=1),
        train_steps=args.steps, batch_size=args.batch_size, lr=args.lr, sample_steps=args.sampling_steps, grad_window=2, eta="random",
        reward_weight=args.reward_weight, reg_weight=change.get("reg_weight", args.reg_weight),
        losses=MeasuresConfig(weights={"wavelet": change.get("structural_weight", args.structural_weight)},
                              options={"wavelet": {"wavelet": "dtcwt", "levels": 3, "clamp": True}}),
        dynamic_frm=DynamicFRMConfig(every=change.get("dynamic_frm_every", args.frm_every), lr=args.frm_lr),
        held_out=HeldOutConfig(every=max(1, args.steps // 4), toy_faces=8, sample_steps=args.sampling_steps),
    ))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 4 steps per variant, 8 test faces")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--sampling-steps", type=int, default=10)
    parser.add_argument("--reward-weight", type=float, default=1e-4)
    parser.add_argument("--reg-weight", type=float, default=1e-4)
    parser.add_argument("--structural-weight", type=float, default=0.01)
    parser.add_argument("--frm-every", type=int, default=2)
    parser.add_argument("--frm-lr", type=float, default=3e-4)
    parser.add_argument("--test-faces", type=int, default=32)
    parser.add_argument("--grid-only", action="store_true",
                        help="train nothing: redraw OUT/eval/grid.png from a finished run's saved outputs and test set")
    args = parser.parse_args()
    if args.grid_only:
        print(f"wrote {redraw_grid(args.out / 'eval', testset=args.out / 'toy-test')}")
        return
    if args.quick:
        args.steps, args.test_faces = 4, 8
    if smoke.active():  # FACEREWARD_SMOKE=1 (the README test): smaller still
        args.steps, args.test_faces, args.sampling_steps, args.batch_size = 2, 4, 3, 2
    torch.set_num_threads(2)
    start = time.time()
    testset = write_toy_testset(args.out / "toy-test", args.test_faces, size=64, seed=0)
    models = {"base": str(default_restorer_path())}
    curves = {}
    for name in VARIANTS:
        t0 = time.time()
        cfg = variant_config(args.out, name, args)
        models[name] = str(train_refl(cfg))
        metrics = json.loads((Path(cfg.run.output_dir) / "metrics.json").read_text())
        curves[name] = metrics["held_out"]
        print(f"{name}: trained in {time.time() - t0:.0f} s", flush=True)
    result = evaluate(EvaluateConfig(
        testset=str(testset), out_dir=str(args.out / "eval"), models=models, include_lq=True, sample_steps=args.sampling_steps,
        eta=0.0, seed=0, options={"frm": {"path": str(WEIGHTS_DIR / "toy-frm")}}, fid="none", progress=False,
    ))
    lines = [result.table, "", "Held-out FRM score during training (8 faces; initial FRM / live FRM):", "",
             "| run | " + " | ".join(f"step {h['step']}" for h in next(iter(curves.values()))) + " |",
             "|---|" + "---|" * len(next(iter(curves.values())))]
    for name, hist in curves.items():
        cells = [f"{h['frm/initial']:.2f}" + (f" / {h['frm/live']:.2f}" if "frm/live" in h else "") for h in hist]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"Total wall time: {time.time() - start:.0f} s ({torch.get_num_threads()} threads)."]
    text = "\n".join(lines) + "\n"
    (args.out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
