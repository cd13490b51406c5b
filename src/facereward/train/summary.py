"""What a trainer is about to do, and the figures a finished run ends on (read from RUN/metrics.json)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def _data(data: Any) -> str:
    if data.hq_dir:
        return f"the faces in {data.hq_dir} ({data.preset} degradation)"
    if data.toy_faces > 0:
        return f"{data.toy_faces:,} toy faces ({data.preset} degradation)"
    return "no data (set --hq-dir or --toy-faces)"


def describe_run(kind: str, config: Any) -> str:
    """One line: the run's length, model, data and output folder, and how to stop and continue it."""
    run = config.run
    if kind == "train-base":
        s1, s2 = config.stage1_steps, config.stage2_steps
        what = (f"{s1 + s2:,} steps (stage 1 {s1:,}, stage 2 {s2:,}) at batch {config.batch_size}, "
                f"{'from ' + config.init_from if config.init_from else 'from random weights'}, on {_data(config.data)}")
        unit = "steps"
    elif kind == "train-frm":
        what = f"{config.train_steps:,} steps at batch {config.batch_size} on the pairs of {config.pairs or '(none: give --pairs)'}"
        unit = "steps"
    elif kind == "refl":
        frm = (config.rewards.options.get("frm") or {}).get("path")
        what = (f"{config.train_steps:,} steps at batch {config.batch_size}, {config.sample_steps} DDIM steps, from "
                f"{config.init_from or 'the shipped toy restorer'}, FRM {frm or 'the shipped toy FRM'}, on {_data(config.data)}")
        unit = "steps"
    elif kind == "lrpo":
        what = (f"{config.epochs:,} epochs of {config.batches_per_epoch} x {config.inputs_per_batch} inputs x G={config.group_size}, "
                f"{config.sample_steps} DDIM steps, from {config.init_from or 'the shipped toy restorer'}, on {_data(config.data)}")
        unit = "epochs"
    elif kind == "nft":
        what = (f"{config.epochs:,} epochs of {config.batches_per_epoch} x {config.inputs_per_batch} inputs x G={config.group_size}, "
                f"{config.sample_steps} DDIM steps (eta {config.eta}), beta {config.beta}, from "
                f"{config.init_from or 'the shipped toy restorer'}, on {_data(config.data)}")
        unit = "epochs"
    elif kind == "dpo":
        source = (f"the pairs of {config.pairs}" if config.pairs else
                  f"online pairs (G={config.group_size}, ranked by the reward) on {_data(config.data)}")
        what = (f"{config.epochs:,} epochs, beta {config.beta:g}, from {config.init_from or 'the shipped toy restorer'}, "
                f"on {source}")
        unit = "epochs"
    else:
        raise ValueError(f"describe_run: unknown trainer {kind!r}")
    resume = {None: "", "auto": "; resuming from its newest checkpoint if it has one"}.get(run.resume, f"; resuming from {run.resume}")
    return (f"{kind}: {what} -> {run.output_dir}{resume} (a checkpoint every {run.save_every:,} {unit}; "
            f"after Ctrl-C, the same command with --resume latest continues)")


def _fmt(values: dict[str, Any], skip: tuple[str, ...] = ("step", "epoch")) -> str:
    parts = []
    for key, value in values.items():
        if key in skip or not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            continue
        parts.append(f"{key} {value:.4g}")
    return ", ".join(parts)


def final_figures(run_dir: str | Path) -> list[str]:
    """The closing lines of a finished run: its last held-out and training figures and the TensorBoard command."""
    run_dir = Path(run_dir)
    lines: list[str] = []
    path = run_dir / "metrics.json"
    metrics = json.loads(path.read_text()) if path.is_file() else {}
    if "best_held_out_accuracy" in metrics:  # train-frm
        history = metrics.get("history") or [{}]
        last = history[-1]
        lines.append(f"held-out pairwise accuracy: best {metrics['best_held_out_accuracy']:.4f}, last "
                     f"{last.get('accuracy', float('nan')):.4f} at step {last.get('step', '-')} ({metrics.get('held_out_pairs', '?')} pairs)")
    unit = metrics.get("unit", "step")
    if unit == "epoch" and metrics.get("train_log"):  # lrpo, nft, dpo: the last epoch's reward (offline dpo: its loss)
        last = metrics["train_log"][-1]
        rewards = {k: v for k, v in last.items() if k == "reward" or k.startswith("reward/")}
        rewards = rewards or {k: v for k, v in last.items() if k in ("dpo/loss", "dpo/implicit_accuracy", "dpo/reward_margin")}
        if rewards:
            lines.append(f"epoch {last.get('epoch')}: {_fmt(rewards)}")
    if metrics.get("held_out"):  # refl, lrpo
        last = metrics["held_out"][-1]
        lines.append(f"held-out at {unit} {last.get(unit)}: {_fmt({k: v for k, v in last.items() if k != unit})}")
    if unit == "step" and metrics.get("train_log"):  # train-base, refl
        last = metrics["train_log"][-1]
        losses = {k: v for k, v in last.items() if k.endswith("loss")}
        lines.append(f"last logged step {last.get('step')}: {_fmt(losses)}")
    lines.append(f"logs: tensorboard --logdir {run_dir}")
    return lines
