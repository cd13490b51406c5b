"""The reward protocol, the registry of rewards by name, and the weighted composite (docs/methods.md 2.2)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from facereward.plugins import import_plugins
from facereward.registry import Registry

Captions = str | Sequence[str | None] | None

# docs/methods.md 2.2: the original LRPO composite. "clipiqa" needs rewards.options.clipiqa.path (a local CLIP folder).
PAPER_WEIGHTS: dict[str, float] = {"frm": 0.3, "lpips": 0.3, "clipiqa": 0.1, "wavelet": 0.3}


@runtime_checkable
class Reward(Protocol):
    """`reward(images, gt, captions) -> (B,)`: images (B, 3, H, W) in [0, 1]; higher is better.

    `differentiable`: gradients reach the images (ReFL needs it; LRPO does not). `needs_gt`: uses `gt`.
    """

    differentiable: bool
    needs_gt: bool

    def __call__(self, images: Tensor, gt: Tensor | None = None, captions: Captions = None) -> Tensor: ...


RewardFactory = Callable[..., Reward]

_REGISTRY: Registry[RewardFactory] = Registry(
    "reward", hint="register your own with facereward.rewards.register_reward(name, factory)"
)


def register_reward(name: str, factory: RewardFactory, overwrite: bool = False) -> None:
    """Make `factory(**options) -> Reward` (a class works) available by `name` in configs and composites."""
    if not callable(factory):
        raise TypeError(f"reward {name!r}: factory must be callable, got {type(factory).__name__}")
    _REGISTRY.register(name, factory, overwrite)


def list_rewards() -> list[str]:
    """Registered reward names, sorted."""
    return _REGISTRY.names()


def build_reward(name: str, **options: Any) -> Reward:
    """Build the reward registered as `name` with its options; ValueError for unknown names or bad options."""
    factory = _REGISTRY.get(name)
    try:
        reward = factory(**options)
    except TypeError as err:
        raise ValueError(f"reward {name!r}: bad options {sorted(options)} ({err})") from None
    if not callable(reward):
        raise TypeError(f"reward {name!r}: its factory returned a {type(reward).__name__}, which is not callable")
    return reward


@dataclass
class RewardsConfig:
    """Which rewards, their weights, their options (per name) and modules that register custom rewards."""

    weights: dict[str, float] = field(default_factory=lambda: {"frm": 0.3, "wavelet": 0.3})
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # e.g. {"frm": {"path": "toy-frm"}}
    imports: list[str] = field(default_factory=list)  # modules or .py files imported first (they call register_reward)


@dataclass
class RewardOutput:
    total: Tensor  # (B,) the weighted sum
    components: dict[str, Tensor]  # name -> (B,) unweighted score


class CompositeReward:
    """R = sum_j w_j r_j (docs/methods.md 2.2); returns the total and every unweighted component."""

    def __init__(self, rewards: dict[str, Reward], weights: dict[str, float]):
        if not rewards:
            raise ValueError("rewards.weights: no rewards configured")
        if set(rewards) != set(weights):
            raise ValueError(f"rewards.weights: names {sorted(weights)} differ from the rewards {sorted(rewards)}")
        for name, w in weights.items():
            if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w):
                raise ValueError(f"rewards.weights.{name}: expected a finite number, got {w!r}")
        self.rewards = dict(rewards)
        self.weights = {k: float(v) for k, v in weights.items()}

    @classmethod
    def from_config(cls, config: RewardsConfig, device: torch.device | str | None = None) -> CompositeReward:
        """Import plugins, build each weighted reward with its options, and move it to `device`."""
        import_plugins(config.imports, option="rewards.imports")
        extra = sorted(set(config.options) - set(config.weights))
        if extra:
            raise ValueError(f"rewards.options.{extra[0]}: options for a reward without a weight (add rewards.weights.{extra[0]})")
        rewards = {}
        for name in config.weights:
            options = config.options.get(name) or {}
            if not isinstance(options, dict):
                raise ValueError(f"rewards.options.{name}: expected a mapping, got {options!r}")  # noqa: TRY004 (a config error)
            try:
                rewards[name] = build_reward(name, **options)
            except ValueError as err:
                raise ValueError(f"rewards.weights.{name}: {err}") from None
        composite = cls(rewards, config.weights)
        return composite.to(device) if device is not None else composite

    @property
    def differentiable(self) -> bool:
        return all(getattr(r, "differentiable", False) for r in self.rewards.values())

    @property
    def needs_gt(self) -> bool:
        return any(getattr(r, "needs_gt", False) for r in self.rewards.values())

    def to(self, device: torch.device | str) -> CompositeReward:
        """Move every reward that is movable (has `.to`) to `device`; returns self."""
        for reward in self.rewards.values():
            if hasattr(reward, "to"):
                reward.to(device)
        return self

    def scorers(self) -> dict[str, Callable[[Tensor, Tensor | None, Captions], Tensor]]:
        """{"reward": total, "reward/NAME": component}: scorers of (images, gt, captions), e.g. for held-out evaluation."""
        out: dict[str, Callable[[Tensor, Tensor | None, Captions], Tensor]] = {"reward": lambda x, gt, c: self(x, gt, c).total}
        for name, reward in self.rewards.items():
            out[f"reward/{name}"] = reward
        return out

    def __call__(self, images: Tensor, gt: Tensor | None = None, captions: Captions = None) -> RewardOutput:
        if gt is None and self.needs_gt:
            missing = [n for n, r in self.rewards.items() if getattr(r, "needs_gt", False)]
            raise ValueError(f"rewards {missing} need the ground truth, got gt=None")
        components = {}
        total = torch.zeros(images.shape[0], device=images.device)
        for name, reward in self.rewards.items():
            score = reward(images, gt, captions)
            if score.shape != (images.shape[0],):
                raise ValueError(f"reward {name!r} returned shape {tuple(score.shape)}, expected ({images.shape[0]},)")
            components[name] = score.float()
            total = total + self.weights[name] * components[name]
        return RewardOutput(total=total, components=components)
