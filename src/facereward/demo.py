"""`facereward demo`: the main job on the embedded toy world, end to end.

Held-out toy faces are degraded; the shipped base restores them; a short ReFL run and a short LRPO run post-train
it (from the shipped toy FRM); all three are evaluated side by side and written, with an HTML report, to OUT/.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from facereward.data.testset import write_toy_testset
from facereward.data.toyfaces import TOY_WORLD_IDENTITIES
from facereward.evaluate import EvaluateConfig, EvaluateResult, evaluate
from facereward.measures import MeasuresConfig
from facereward.weights import default_frm_path, default_restorer_path

DEMO_PRESET = "diffbir"

# The demo's post-training recipes: configs/refl_toy.yaml (all 60 steps) and configs/lrpo_toy.yaml (12 of its 20
# epochs), evaluated less often; both trainers' full toy experiments are in the README. QUICK_* shorten them for `--quick`.
DEMO_REFL: dict[str, Any] = {
    "run": {"log_every": 2, "save_every": 10},
    "data": {"toy_faces": 800, "toy_identities": TOY_WORLD_IDENTITIES, "size": 64, "seed": 1},
    "train_steps": 60, "batch_size": 4, "lr": 5.0e-5, "sample_steps": 10, "grad_window": 2, "eta": "random",
    "reward_weight": 1.0e-4, "reg_weight": 1.0e-4, "losses": {"weights": {"wavelet": 0.01}},
    "dynamic_frm": {"every": 2, "lr": 3.0e-4},
    "held_out": {"every": 15, "toy_faces": 8, "sample_steps": 10},
}
DEMO_LRPO: dict[str, Any] = {
    "run": {"log_every": 1, "save_every": 4},
    "data": {"toy_faces": 96, "toy_identities": TOY_WORLD_IDENTITIES, "size": 64, "random_flip": False},
    "group_size": 4, "inputs_per_batch": 2, "batches_per_epoch": 1, "epochs": 12, "sample_steps": 8,
    "micro_batch": 4, "train_batch_size": 4, "lr": 1.0e-5,
    "rewards": {"weights": {"frm": 0.3, "wavelet": 0.3, "ids": 0.2, "ssim": 0.2}, "options": {"frm": {"scale": 0.1}}},
    "held_out": {"every": 4, "toy_faces": 8, "sample_steps": 8},
}
QUICK_REFL: dict[str, Any] = {"train_steps": 6, "held_out": {"every": 3}}
QUICK_LRPO: dict[str, Any] = {"epochs": 3, "held_out": {"every": 3}}
QUICK_FACES, QUICK_STEPS = 8, 20


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of `base` with `update` merged in, nested mappings key by key."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else copy.deepcopy(value)
    return out


@dataclass
class DemoResult:
    """The evaluation of every method, the training run folders (name -> path), the report and the timings (s)."""

    evaluation: EvaluateResult
    runs: dict[str, Path] = field(default_factory=dict)
    report: Path | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def _train(kind: str, recipe: dict[str, Any], out_dir: Path, progress: bool) -> Path:
    """Run (or resume, when its folder has a checkpoint) one demo trainer; returns its model folder (FACEREWARD_SMOKE
    caps apply, as to every trainer's config)."""
    from facereward.config import config_from_dict
    from facereward.smoke import cap_config

    recipe = merge(recipe, {"run": {"output_dir": str(out_dir), "resume": "auto", "progress": progress}})
    if kind == "refl":
        from facereward.train.refl import ReFLConfig, train_refl

        return train_refl(cap_config(config_from_dict(ReFLConfig, recipe, "demo refl")))
    from facereward.train.lrpo import LRPOConfig, train_lrpo

    return train_lrpo(cap_config(config_from_dict(LRPOConfig, recipe, "demo lrpo")))


def run_demo(out_dir: str | Path, n: int | None = None, model: str | Path | None = None, frm: str | Path | None = None,
             steps: int | None = None, seed: int = 0, device: str | None = None, identity: str = "auto",
             landmarks: str = "auto", progress: bool = True, train: bool = True, quick: bool = False,
             refl: dict[str, Any] | None = None, lrpo: dict[str, Any] | None = None, report: bool = True) -> DemoResult:
    """The demo: test set -> (ReFL and LRPO post-training of `model`) -> evaluate LQ, stage 1, base, ReFL, LRPO -> report.

    `n` held-out faces (default 16, 8 with `quick`) restored with `steps` DDIM steps (default 50, 20 with `quick`);
    `refl` / `lrpo` are merged into the demo recipes (DEMO_REFL, DEMO_LRPO). A rerun resumes finished or stopped
    training runs from their checkpoints instead of starting over.
    """
    out_dir = Path(out_dir)
    n = n if n is not None else (QUICK_FACES if quick else 16)
    steps = steps if steps is not None else (QUICK_STEPS if quick else 50)
    model_path = Path(model or default_restorer_path())
    frm_path = Path(frm or default_frm_path())
    seconds: dict[str, float] = {}
    start = time.monotonic()
    size = _model_size(model_path)
    testset = write_toy_testset(out_dir / "toy-test", n, size=size, split="test", seed=seed, preset=DEMO_PRESET)
    seconds["test set"] = time.monotonic() - start
    common = {"init_from": str(model_path), "run": {"seed": seed}, "data": {"size": size}}
    refl_recipe = merge(merge(DEMO_REFL, QUICK_REFL) if quick else DEMO_REFL,
                        merge(common, {"rewards": {"options": {"frm": {"path": str(frm_path)}}}}))
    lrpo_recipe = merge(merge(DEMO_LRPO, QUICK_LRPO) if quick else DEMO_LRPO,
                        merge(common, {"rewards": {"options": {"frm": {"path": str(frm_path)}}}}))
    refl_recipe, lrpo_recipe = merge(refl_recipe, refl or {}), merge(lrpo_recipe, lrpo or {})
    models = {"base": str(model_path)}
    runs: dict[str, Path] = {}
    if train:
        for name, kind, recipe in (("ReFL", "refl", refl_recipe), ("LRPO", "lrpo", lrpo_recipe)):
            t0 = time.monotonic()
            folder = out_dir / "runs" / kind
            models[name] = str(_train(kind, recipe, folder, progress))
            runs[name] = folder
            seconds[name] = time.monotonic() - t0
    rewards = lrpo_recipe["rewards"]  # the composite LRPO trains on is the table's reward column
    config = EvaluateConfig(
        testset=str(testset), out_dir=str(out_dir), models=models, include_lq=True, include_stage1=["base"], sample_steps=steps,
        eta=0.0, seed=seed, device=device, identity=identity, landmarks=landmarks, options={"frm": {"path": str(frm_path)}},
        reward=MeasuresConfig(weights=rewards["weights"], options=rewards.get("options", {})), progress=progress,
    )
    t0 = time.monotonic()
    evaluation = evaluate(config)
    seconds["evaluate"] = time.monotonic() - t0
    result = DemoResult(evaluation, runs, None, seconds)
    if report:
        from facereward.report import build_report

        what = "restored by the shipped base" + (", then post-trained by short ReFL and LRPO runs" if train else "")
        intro = (f"{n} held-out toy faces ({DEMO_PRESET} degradation, seed {seed}), {what}; "
                 f"evaluated with {steps} DDIM steps. Timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))
        result.report = build_report([out_dir], out_dir / "report.html", title="facereward demo", intro=intro)
    (out_dir / "demo.json").write_text(json.dumps({"seconds": seconds, "runs": {k: str(v) for k, v in runs.items()},
                                                   "models": models}, indent=1))
    return result


def _model_size(model: str | Path) -> int:
    meta = json.loads((Path(model) / "facereward.json").read_text())
    return int(meta["config"]["size"])
