"""The one weighted spec `{weights, options}` and what it builds: a weighted sum of measures (docs/methods.md 2.2).

LRPO's reward, ReFL's reward term and its structural losses, evaluate's reward column: each is a `MeasuresConfig`
built by `WeightedSum.from_config`, as rewards (higher is better) or as raw measures (a loss to minimise).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from facereward.measures.judges import MeasureEnv
from facereward.measures.table import (
    Captions,
    Measure,
    MissingNeeds,
    SetMeasure,
    create_measure,
    register_measure,
)

# docs/methods.md 2.2: the original LRPO composite ("clipiqa" needs options.clipiqa.path, a local CLIP folder)
PAPER_WEIGHTS: dict[str, float] = {"frm": 0.3, "lpips": 0.3, "clipiqa": 0.1, "wavelet": 0.3}


@dataclass
class MeasuresConfig:
    """Which measures, their weights, and their options (per name): `{weights: {name: w}, options: {name: {...}}}`."""

    weights: dict[str, float] = field(default_factory=lambda: {"frm": 0.3, "wavelet": 0.3})
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # e.g. {"frm": {"path": "toy-frm"}}


@dataclass
class WeightedOutput:
    total: Tensor  # (B,) the weighted sum
    components: dict[str, Tensor]  # name -> (B,) unweighted score


class WeightedSum:
    """sum_j w_j m_j(x, gt) over built measures (docs/methods.md 2.2); returns the total and every unweighted term."""

    def __init__(self, measures: dict[str, Callable[..., Tensor]], weights: dict[str, float], where: str = "rewards"):
        if not measures:
            raise ValueError(f"{where}.weights: no measures configured")
        if set(measures) != set(weights):
            raise ValueError(f"{where}.weights: names {sorted(weights)} differ from the measures {sorted(measures)}")
        for name, w in weights.items():
            if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w):
                raise ValueError(f"{where}.weights.{name}: expected a finite number, got {w!r}")
        self.measures = dict(measures)
        self.weights = {k: float(v) for k, v in weights.items()}

    @classmethod
    def from_config(cls, config: MeasuresConfig, as_reward: bool = True, device: torch.device | str | None = None,
                    env: MeasureEnv | None = None, where: str = "rewards", defaults: dict[str, dict[str, Any]] | None = None,
                    require_differentiable: str = "") -> WeightedSum:
        """Build every weighted measure with its options (`defaults` under them); errors name `where.weights.NAME`.

        `require_differentiable`: when set, a measure gradients cannot pass is an error that ends with this text.
        """
        extra = sorted(set(config.options) - set(config.weights))
        if extra:
            raise ValueError(f"{where}.options.{extra[0]}: options for a measure without a weight (add {where}.weights.{extra[0]})")
        env = env or MeasureEnv(device)
        measures = {}
        for name in config.weights:
            options = config.options.get(name) or {}
            if not isinstance(options, dict):
                raise ValueError(f"{where}.options.{name}: expected a mapping, got {options!r}")  # noqa: TRY004 (a config error)
            try:
                measure = create_measure(name, as_reward=as_reward, device=device, env=env,
                                         **{**(defaults or {}).get(name, {}), **options})
            except MissingNeeds as err:  # stays MissingNeeds, so a default column (evaluate's reward) can skip it
                raise MissingNeeds(f"{where}.weights.{name}: {err}") from None
            except ValueError as err:
                raise ValueError(f"{where}.weights.{name}: {err}") from None
            if isinstance(measure, SetMeasure):
                raise ValueError(f"{where}.weights.{name}: {name!r} scores a whole set, not each image")
            if require_differentiable and not getattr(measure, "differentiable", False):
                raise ValueError(f"{where}.weights.{name}: {name!r} is not differentiable ({require_differentiable})")
            measures[name] = measure
        return cls(measures, config.weights, where)

    @property
    def differentiable(self) -> bool:
        return all(getattr(m, "differentiable", False) for m in self.measures.values())

    @property
    def needs_gt(self) -> bool:
        return any(getattr(m, "needs_gt", False) for m in self.measures.values())

    def to(self, device: torch.device | str) -> WeightedSum:
        """Move every measure that is movable (has `.to`) to `device`; returns self."""
        for measure in self.measures.values():
            if hasattr(measure, "to"):
                measure.to(device)
        return self

    def scorers(self, prefix: str = "reward") -> dict[str, Callable[[Tensor, Tensor | None, Captions], Tensor]]:
        """{prefix: total, "prefix/NAME": term}: scorers of (images, gt, captions), e.g. held-out judges."""
        out: dict[str, Callable[[Tensor, Tensor | None, Captions], Tensor]] = {prefix: lambda x, gt, c: self(x, gt, c).total}
        for name, measure in self.measures.items():
            out[f"{prefix}/{name}"] = measure
        return out

    def __call__(self, images: Tensor, gt: Tensor | None = None, captions: Captions = None) -> WeightedOutput:
        if gt is None and self.needs_gt:
            missing = [n for n, m in self.measures.items() if getattr(m, "needs_gt", False)]
            raise ValueError(f"measures {missing} need the ground truth, got gt=None")
        components = {}
        total = torch.zeros(images.shape[0], device=images.device)
        for name, measure in self.measures.items():
            score = measure(images, gt, captions)
            if score.shape != (images.shape[0],):
                raise ValueError(f"measure {name!r} returned shape {tuple(score.shape)}, expected ({images.shape[0]},)")
            components[name] = score.float()
            total = total + self.weights[name] * components[name]
        return WeightedOutput(total=total, components=components)


def _weighted_reward(env: MeasureEnv, weights: dict[str, float] | None = None, options: dict[str, dict] | None = None):
    """The `reward` row: a weighted sum of reward forms, e.g. the composite LRPO trains on (evaluate's reward column)."""
    if not weights:
        return None
    composite = WeightedSum.from_config(MeasuresConfig(dict(weights), dict(options or {})), as_reward=True, env=env,
                                        where="reward")
    env.used["reward"] = " + ".join(f"{w:g} {name}" for name, w in composite.weights.items())

    def fn(x, gt, captions):
        return composite(x, gt, captions).total
    fn.column = "reward (composite)"
    fn.to = composite.to
    fn.differentiable = composite.differentiable
    fn.needs_gt = composite.needs_gt
    return fn


register_measure("reward", _weighted_reward, kind="NR", lower_better=False, differentiable=False,
                 needs="options weights (and options), as lrpo's rewards: {weights: {NAME: W}, options: {NAME: {...}}}",
                 description="a weighted sum of reward forms (docs/methods.md 2.2), e.g. LRPO's", overwrite=True)

__all__ = ["PAPER_WEIGHTS", "MeasuresConfig", "Measure", "WeightedOutput", "WeightedSum"]
