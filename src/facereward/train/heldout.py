"""Periodic held-out evaluation for the reward trainers: a fixed batch of LQ faces restored and scored.

The held-out faces are the test identities of the training toy world (never trained on), or the first
pairs of a paired test folder. Restoration uses per-image seeded noise, so two evaluations of the same
model give the same numbers and a change between evaluations is the model's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from facereward.atomic import atomic_write_json
from facereward.data.datasets import PairedFolderDataset, collate_batch
from facereward.data.degradation import degrade
from facereward.data.training_data import DataConfig, resolve_preset, toy_world
from facereward.measures import (
    Measure,
    MeasureEnv,
    MissingNeeds,
    SetMeasure,
    create_measure,
)
from facereward.models.frm import FaceRewardModel
from facereward.models.restorer import Restorer, SamplerOptions
from facereward.models.seeded import restore_batch
from facereward.train.hacking import new_alarms

Scorer = Callable[[Tensor, Tensor, list[str]], Tensor]
"""(restored [0, 1], hq [0, 1], captions) -> (B,) scores."""


@dataclass
class HeldOutConfig:
    """What to evaluate on and how often; `every: 0` turns held-out evaluation off."""

    every: int = 50
    toy_faces: int = 16  # held-out toy faces (test identities of data's toy world), used when data.toy_faces > 0
    testset: str | None = None  # a paired folder (lq/, hq/); used instead of toy faces when given
    max_images: int = 16  # at most this many pairs of `testset`
    sample_steps: int = 10  # DDIM steps for the held-out restorations
    eta: float | str | None = 0.0  # None: the restorer's default
    spacing: str | None = None  # timestep spacing leading | linspace | trailing; None: the restorer's
    final_alpha_bar: str | None = None  # one | first; None: the restorer's
    batch_size: int = 16
    seed: int = 1234
    # the judges: measures of facereward.measures (full-reference or not; a plugin's too), options per measure
    measures: list[str] = field(default_factory=lambda: ["psnr", "ssim", "ids"])
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    identity: str = "auto"  # identity judge of ids: auto (toy for toy data, else none: ids is left out), toy, dlib, arcface:PATH
    # the reward-hacking alarm (facereward.train.hacking): the training reward rises while a frozen judge falls
    hacking_patience: int = 3  # evaluations in a row that fire it; 0 turns it off
    hacking_judges: list[str] = field(default_factory=lambda: ["frm/initial", "ids", "psnr"])  # those present are watched
    stop_on_hacking: bool = False  # stop training (checkpoint and final model written) when it fires


def load_heldout_batch(config: HeldOutConfig, data: DataConfig, size: int) -> dict:
    """The fixed held-out batch {"lq", "hq", "caption"} (CPU tensors in [0, 1])."""
    if config.testset:
        ds = PairedFolderDataset(config.testset, size=size)
        if not ds.has_hq:
            raise ValueError(f"held_out.testset {config.testset}: needs hq/ (held-out scores are full-reference)")
        items = [ds[i] for i in range(min(len(ds), config.max_images))]
        return collate_batch(items)
    if data.toy_faces <= 0:
        raise ValueError("held_out: set held_out.testset (a paired lq/ hq/ folder) or train on toy faces, or held_out.every=0")
    resolve_preset(data)
    faces = toy_world(data).sample(config.toy_faces, size=size, split="test", seed=config.seed)
    hq = [f.image for f in faces]
    lq = [degrade(img, data.preset, seed=config.seed, index=i)[0] for i, img in enumerate(hq)]
    to_t = lambda images: torch.from_numpy(np.stack(images).transpose(0, 3, 1, 2).copy()).float()
    return {"lq": to_t(lq), "hq": to_t(hq), "caption": [f.caption for f in faces]}


class HeldOutEvaluator:
    """`evaluator(restorer)` -> {NAME per held-out measure, "frm/NAME" per FRM, NAME per extra scorer}: means over the batch."""

    def __init__(self, config: HeldOutConfig, data: DataConfig, size: int, device: torch.device | str,
                 frms: dict[str, FaceRewardModel] | None = None, extra: dict[str, Scorer] | None = None):
        self.config, self.device = config, torch.device(device)
        self.sampler = SamplerOptions(spacing=config.spacing, final_alpha_bar=config.final_alpha_bar)
        self.batch = load_heldout_batch(config, data, size)
        self.frms = frms or {}
        self.extra = extra or {}
        toy = not config.testset
        # "auto" on a real test folder means no identity judge: dlib per held-out step is slow and may miss faces
        identity = "none" if config.identity == "auto" and not toy else config.identity
        env = MeasureEnv("cpu", toy=toy, identity=identity)  # the held-out batch is scored on the CPU
        unknown = sorted(set(config.options) - set(config.measures))
        if unknown:
            raise ValueError(f"held_out.options.{unknown[0]}: options for a measure not in held_out.measures")
        self.measures: dict[str, Measure] = {}
        for name in config.measures:
            try:
                measure = create_measure(name, env=env, **(config.options.get(name) or {}))
            except MissingNeeds:
                if name == "ids" and identity == "none":
                    continue  # no identity judge: ids is left out, as the config says
                raise
            except ValueError as err:
                raise ValueError(f"held_out.measures: {err}") from None
            if isinstance(measure, SetMeasure):
                raise ValueError(f"held_out.measures: {name!r} scores a whole set, not each image")
            self.measures[name] = measure

    @torch.no_grad()
    def restore(self, restorer: Restorer, net: nn.Module | None = None) -> Tensor:
        """The held-out restorations (CPU, [0, 1]), per-image seeded; `net` replaces the stage-2 network (`Restorer.predict_eps`)."""
        was_training = restorer.training
        restorer.eval()
        out = []
        n, bs = self.batch["lq"].shape[0], self.config.batch_size
        for start in range(0, n, bs):
            idx = list(range(start, min(n, start + bs)))
            lq = self.batch["lq"][idx].to(self.device)
            res = restore_batch(restorer, lq, idx, steps=self.config.sample_steps, eta=self.config.eta, seed=self.config.seed,
                                net=net, sampler=self.sampler)
            out.append(res["restored"].float().cpu())
        restorer.train(was_training)
        return torch.cat(out)

    @torch.no_grad()
    def __call__(self, restorer: Restorer, net: nn.Module | None = None) -> dict[str, float]:
        restored, hq, captions = self.restore(restorer, net), self.batch["hq"], self.batch["caption"]
        scores = {name: float(measure(restored, hq, captions).mean()) for name, measure in self.measures.items()}
        for name, frm in self.frms.items():
            scores[f"frm/{name}"] = float(frm.score(restored.to(self.device), captions).float().mean())
        for name, fn in self.extra.items():
            scores[name] = float(fn(restored.to(self.device), hq.to(self.device), captions).float().mean())
        return scores


class HeldOutMonitor:
    """Held-out evaluation on its cadence plus the reward-hacking alarm (facereward.train.hacking), as every reward
    trainer runs them.

    `records` holds one entry per evaluation: {unit: n, "train_reward": the mean training reward since the previous
    evaluation (absent for the baseline at 0), judge: score, ..., "alarms": [judges] when the alarm fired}. Only the
    main process evaluates (`evaluator` None elsewhere); `evaluate` returns on every process whether to stop.
    Checkpoint `state()` and pass it back as `state` to resume with the same records and alarms.
    """

    def __init__(self, config: HeldOutConfig, evaluator: HeldOutEvaluator | None, accelerator, trainer: str, unit: str,
                 total: int, state: dict | None = None):
        self.config, self.evaluator, self.accelerator = config, evaluator, accelerator
        self.trainer, self.unit, self.total = trainer, unit, total
        state = state or {}
        self.records: list[dict[str, Any]] = list(state.get("records", []))
        self._since = [torch.tensor(v, device=accelerator.device) for v in state.get("reward_since", [])]
        self.last: dict[str, float] = {}  # the scores of the newest evaluation (empty on other processes)

    def due(self, n: int) -> bool:
        """Whether `n` (a step or an epoch) is an evaluation point: every `held_out.every`, and the last."""
        return self.config.every > 0 and (n % self.config.every == 0 or n == self.total)

    def add_reward(self, reward: Tensor | float) -> None:
        """One training reward (a step's or an epoch's mean); kept on the device until the next evaluation."""
        self._since.append(torch.as_tensor(reward, device=self.accelerator.device).detach().float().reshape(()))

    def evaluate(self, n: int, restorer: Restorer, net: nn.Module | None = None) -> bool:
        """Evaluate at `n`, record it and run the alarm (warns, records the judge, and with `stop_on_hacking` asks every
        process to stop); returns True on every process when training should stop."""
        self.last = {}
        if self.evaluator is not None:
            self.last = self.evaluator(restorer, net=net)
            train = {"train_reward": float(torch.stack(self._since).mean())} if self._since else {}
            self.records.append({self.unit: n, **train, **self.last})
            for alarm in new_alarms(self.records, self.config.hacking_judges, self.config.hacking_patience, n, step_key=self.unit):
                warnings.warn(f"{self.trainer}: {alarm.message()}", stacklevel=2)
                self.records[-1].setdefault("alarms", []).append(alarm.judge)
                if self.config.stop_on_hacking:
                    self.accelerator.set_trigger()
        self._since.clear()
        self.accelerator.wait_for_everyone()
        return self.accelerator.check_trigger()

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps: the records and the training rewards since the last evaluation."""
        return {"records": self.records, "reward_since": [float(r) for r in self._since]}


def write_metrics(path: str | Path, unit: str, held_out: list[dict[str, Any]], train_log: list[dict[str, Any]]) -> None:
    """OUTPUT/metrics.json, the same shape for every trainer: {"unit": "step" | "epoch", "held_out": [records],
    "train_log": [what was logged, per step or epoch]}; written atomically."""
    atomic_write_json(path, {"unit": unit, "held_out": held_out, "train_log": train_log})
