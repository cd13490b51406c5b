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
from typing import Any, Callable

from facereward.data.testset import write_toy_testset
from facereward.data.toyfaces import TOY_WORLD_IDENTITIES
from facereward.evaluate import EvaluateConfig, EvaluateResult, evaluate
from facereward.measures import MeasuresConfig
from facereward.weights import default_frm_path, default_onestep_path, default_restorer_path

DEMO_PRESET = "diffbir"

# The demo's post-training recipes: configs/refl_toy.yaml and configs/lrpo_toy.yaml made fast enough for minutes on
# any 2-core machine (DEMO_CHANGES: fewer DDIM steps, ReFL at batch 2, LRPO 3 epochs at a higher lr; docs/results.md
# has what each cost), evaluated less often, without the speed measurement (run.speed off: fp32, contiguous, the same
# numbers on every machine). The full toy experiments keep the configs. QUICK_* shorten them for `--quick`.
DEMO_SAMPLE_STEPS = 6  # DDIM steps of LRPO's rollouts and of the demo's table (ReFL's rollouts take 4)
DEMO_REFL: dict[str, Any] = {
    "run": {"log_every": 4, "save_every": 20, "speed": "off"},
    "data": {"toy_faces": 800, "toy_identities": TOY_WORLD_IDENTITIES, "size": 64, "seed": 1},
    "train_steps": 60, "batch_size": 2, "lr": 5.0e-5, "sample_steps": 4, "grad_window": 2, "eta": "random",
    "reward_weight": 1.0e-4, "reg_weight": 1.0e-4, "losses": {"weights": {"wavelet": 0.01}},
    "dynamic_frm": {"every": 2, "lr": 3.0e-4},
    "held_out": {"every": 30, "toy_faces": 8, "sample_steps": 4},
}
DEMO_LRPO: dict[str, Any] = {
    "run": {"log_every": 1, "save_every": 2, "speed": "off"},
    "data": {"toy_faces": 96, "toy_identities": TOY_WORLD_IDENTITIES, "size": 64, "random_flip": False},
    "group_size": 4, "inputs_per_batch": 2, "batches_per_epoch": 1, "epochs": 3, "sample_steps": DEMO_SAMPLE_STEPS,
    "micro_batch": 4, "train_batch_size": 4, "lr": 3.0e-5,
    "rewards": {"weights": {"frm": 0.3, "wavelet": 0.3, "ids": 0.2, "ssim": 0.2}, "options": {"frm": {"scale": 0.1}}},
    "held_out": {"every": 3, "toy_faces": 8, "sample_steps": DEMO_SAMPLE_STEPS},
}
# where the demo recipes differ from configs/*_toy.yaml beyond the run length, `run` and `held_out`
DEMO_CHANGES = {"refl": ("batch_size", "sample_steps"), "lrpo": ("sample_steps", "lr")}
QUICK_REFL: dict[str, Any] = {"train_steps": 10, "held_out": {"every": 5}}
QUICK_LRPO: dict[str, Any] = {"epochs": 1, "held_out": {"every": 1}}
QUICK_FACES = 8


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


@dataclass
class CallTimes:
    """Seconds of one no-grad noise prediction of a restorer at a few batch sizes, and of one forward + backward."""

    no_grad: dict[int, float]
    grad: dict[int, float]

    def at(self, batch: int, grad: bool = False) -> float:
        """Linear in the batch between (and beyond) the measured sizes."""
        points = sorted((self.grad if grad else self.no_grad).items())
        if len(points) == 1:
            return points[0][1] * batch / points[0][0]
        (b0, t0), (b1, t1) = next(((a, b) for a, b in zip(points, points[1:]) if batch <= b[0]), points[-2:])
        return max(0.0, t0 + (t1 - t0) * (batch - b0) / (b1 - b0))


def time_calls(restorer, batches: tuple[int, ...] = (2, 16), grad_batches: tuple[int, ...] = (2, 4)) -> CallTimes:
    """Time the restorer's network: one call after a warm-up call, per batch size (a second or two)."""
    from facereward.train.speed import restorer_probe, time_call

    net = restorer.stage2_trainable()

    def best(batch: int, grad: bool) -> float:
        probe = restorer_probe(restorer, net, batch)
        time_call(probe, grad, net, restorer.device)  # warm-up: kernel choice, allocations
        return time_call(probe, grad, net, restorer.device)
    return CallTimes({b: best(b, False) for b in batches}, {b: best(b, True) for b in grad_batches})


# Each phase: OVERHEAD x its network calls' time (the rest of a step: stage 1, decoding, the FRM and its updates,
# judges, glue) + FIXED batch-16 calls' time (building ReFL's 800 training faces; the report). Fitted to the full
# and the quick demo on a 2-core Xeon (AVX-512); docs/results.md compares estimate and time.
OVERHEAD = {"ReFL": 1.23, "LRPO": 1.21, "evaluate": 1.28}
FIXED = {"ReFL": 17.0, "LRPO": 0.0, "evaluate": 0.0, "report": 17.0}


def _held_out_calls(held_out: dict[str, Any], length: int) -> tuple[int, int]:
    """(network calls, batch) of a run's held-out evaluations: at 0, every `every` and at the end."""
    every = held_out.get("every", 50)
    if every <= 0:
        return 0, 1
    evaluations = 1 + length // every + (1 if length % every else 0)
    faces, batch = held_out.get("toy_faces", 16), held_out.get("batch_size", 16)
    return evaluations * -(-faces // batch) * held_out.get("sample_steps", 10), min(faces, batch)


def estimate_seconds(times: CallTimes, refl: dict[str, Any] | None, lrpo: dict[str, Any] | None, n: int, steps: int,
                     models: int) -> dict[str, float]:
    """The demo's phases in seconds on this machine: its network calls (counted from the recipes) at `times`, times
    each phase's measured overhead, plus its fixed part (in units of a batch-16 call)."""
    from facereward.config import config_from_dict
    from facereward.train.lrpo import LRPOConfig, check_config, lrpo_workload
    from facereward.train.refl import ReFLConfig, refl_workload

    out: dict[str, float] = {}
    if refl is not None:
        cfg = config_from_dict(ReFLConfig, refl, "demo refl")
        w = refl_workload(cfg)
        calls, batch = _held_out_calls(refl.get("held_out", {}), cfg.train_steps)
        out["ReFL"] = (cfg.train_steps * (w.no_grad * times.at(w.batch) + w.grad * times.at(w.batch, True))
                       + calls * times.at(batch))
    if lrpo is not None:
        cfg = config_from_dict(LRPOConfig, lrpo, "demo lrpo")
        w = lrpo_workload(cfg, check_config(cfg))
        micro_batches = cfg.group_size * cfg.inputs_per_batch * cfg.batches_per_epoch / cfg.micro_batch
        calls, batch = _held_out_calls(lrpo.get("held_out", {}), cfg.epochs)
        out["LRPO"] = (cfg.epochs * micro_batches * (w.no_grad * times.at(w.batch) + w.grad * times.at(w.batch, True))
                       + calls * times.at(batch))
    out["evaluate"] = models * -(-n // 16) * steps * times.at(min(n, 16))
    out = {k: v * OVERHEAD[k] + FIXED[k] * times.at(16) for k, v in out.items()}
    return {**out, "report": FIXED["report"] * times.at(16)}


def run_demo(out_dir: str | Path, n: int | None = None, model: str | Path | None = None, frm: str | Path | None = None,
             steps: int | None = None, seed: int = 0, device: str | None = None, identity: str = "auto",
             landmarks: str = "auto", progress: bool = True, train: bool = True, quick: bool = False,
             refl: dict[str, Any] | None = None, lrpo: dict[str, Any] | None = None, report: bool = True,
             announce: Callable[[str], None] | None = None) -> DemoResult:
    """The demo: test set -> (ReFL and LRPO post-training of `model`) -> evaluate LQ, stage 1, base, ReFL, LRPO -> report.

    `n` held-out faces (default 16, 8 with `quick`) restored with `steps` DDIM steps (default DEMO_SAMPLE_STEPS);
    `refl` / `lrpo` are merged into the demo recipes (DEMO_REFL, DEMO_LRPO). A rerun resumes finished or stopped
    training runs from their checkpoints instead of starting over. `announce` receives the time estimate (one line)
    before the work starts.
    """
    out_dir = Path(out_dir)
    n = n if n is not None else (QUICK_FACES if quick else 16)
    steps = steps if steps is not None else DEMO_SAMPLE_STEPS
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
    if model is None:  # the shipped one-step base beside it: one network call per face (docs/methods.md 0.1)
        models["one-step"] = str(default_onestep_path())
    runs: dict[str, Path] = {}
    estimate = {}
    if announce is not None:
        from facereward.models.restorer import Restorer

        t0 = time.monotonic()
        times = time_calls(Restorer.from_pretrained(model_path))
        estimate = estimate_seconds(times, refl_recipe if train else None, lrpo_recipe if train else None, n, steps,
                                    3 if train else 1)
        total = sum(estimate.values()) + time.monotonic() - start
        announce(f"demo: about {_duration(total)} on this machine (" + ", ".join(f"{k} {_duration(v)}" for k, v in estimate.items())
                 + f"; from {len(times.no_grad) + len(times.grad)} timed network calls)")
        seconds["estimate"] = time.monotonic() - t0
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
        ci=True, compare=[[name, "base"] for name in runs],  # 95% intervals over the faces, and each method against the base
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
        t0 = time.monotonic()
        result.report = build_report([out_dir], out_dir / "report.html", title="facereward demo", intro=intro)
        seconds["report"] = time.monotonic() - t0
    (out_dir / "demo.json").write_text(json.dumps({"seconds": seconds, "estimated_seconds": estimate,
                                                   "runs": {k: str(v) for k, v in runs.items()}, "models": models}, indent=1))
    return result


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def _model_size(model: str | Path) -> int:
    meta = json.loads((Path(model) / "facereward.json").read_text())
    return int(meta["config"]["size"])
