"""The measures table (docs/methods.md 3): one row per way of scoring images, and `create_measure` to build one.

A row names a measure, its kind ("FR" full-reference, "NR" no-reference, "set" a distribution against a reference
set), whether lower is better, whether gradients reach the images, what it needs, a builder `build(env, **options)`
and, where it has one, how its score becomes a reward (higher is better). `create_measure(name, as_reward=...)`
turns a row into a callable `(images, gt=None, captions=None) -> (B,)`, so one registration serves as an evaluate
column, a held-out judge, an LRPO reward and (when differentiable) a ReFL reward or loss term:

    from facereward.measures import register_measure

    def sharpness(images, gt=None, captions=None):   # (B, 3, H, W) in [0, 1] -> (B,)
        k = torch.tensor([[0., 1, 0], [1, -4, 1], [0, 1, 0]]).view(1, 1, 3, 3).repeat(3, 1, 1, 1)
        return torch.nn.functional.conv2d(images, k.to(images), groups=3).pow(2).mean(dim=(1, 2, 3))

    register_measure("sharpness", fn=sharpness, kind="NR", lower_better=False, differentiable=True)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from facereward.measures.judges import MeasureEnv
from facereward.measures.provenance import measure_provenance
from facereward.registry import Registry

Kind = Literal["FR", "NR", "set"]
KINDS = ("FR", "NR", "set")
Captions = str | Sequence[str | None] | None


class MissingNeeds(ValueError):
    """A measure was asked for without what it needs (a weight file, a judge); the message says what."""


@dataclass(frozen=True)
class MeasureSpec:
    """One row. `build(env, **options)` returns a scorer `fn(images, gt, captions) -> (B,)` (or a `SetMeasure` for
    kind "set"); `reward(score, **params)` maps the score to a reward, `reward_defaults` are the options a reward
    uses unless given (build options and the `reward_params` that go to `reward`)."""

    name: str
    build: Callable[..., Any]
    kind: Kind
    lower_better: bool
    differentiable: bool = False
    needs: str = ""
    description: str = ""
    column: str = ""
    reward: Callable[..., Tensor] | None = None
    reward_params: tuple[str, ...] = ()
    reward_defaults: dict[str, Any] = field(default_factory=dict)


@dataclass
class SetMeasure:
    """A built set-level measure: its column, a feature extractor (`.name`, `.features(images)`; measures on the same
    extractor share its features), `compute(features (N, D), reference (M, D)) -> float` and, where there is one,
    `resample`: the same value by a faster route, for evaluate's bootstrap resamples."""

    name: str
    column: str
    extractor: Any
    compute: Callable[[np.ndarray, np.ndarray], float]
    lower_better: bool = True
    kind: str = "set"
    provenance: dict[str, Any] = field(default_factory=dict)  # what it was built from (measures.provenance)
    resample: Callable[[np.ndarray, np.ndarray], float] | None = None


class Measure:
    """A built per-image measure: `measure(images, gt=None, captions=None) -> (B,)`.

    As a reward (`as_reward`), the row's transform is applied, so higher is always better. `clamp` clamps the
    images to [0, 1] first. `differentiable`: gradients reach the images; `needs_gt`: full-reference.
    """

    def __init__(self, spec: MeasureSpec, fn: Callable[..., Tensor], as_reward: bool = False,
                 reward_params: dict[str, Any] | None = None, clamp: bool = False, column: str = ""):
        self.spec, self.fn, self.as_reward, self.clamp = spec, fn, as_reward, bool(clamp)
        self.name = spec.name
        self.reward_params = dict(reward_params or {})
        self.column = column or getattr(fn, "column", "") or spec.column or spec.name
        self.differentiable = bool(getattr(fn, "differentiable", spec.differentiable))
        self.needs_gt = spec.kind == "FR" or bool(getattr(fn, "needs_gt", False))
        self.lower_better = spec.lower_better and not as_reward
        self.provenance: dict[str, Any] = {}  # what it was built from (measures.provenance; set by create_measure)

    def to(self, device: torch.device | str) -> Measure:
        """Move the scorer (when it has `.to`) to `device`; returns self."""
        if hasattr(self.fn, "to"):
            self.fn.to(device)
        return self

    def __call__(self, images: Tensor, gt: Tensor | None = None, captions: Captions = None) -> Tensor:
        if gt is None and self.needs_gt:
            raise ValueError(f"measure {self.name!r} is full-reference and needs the ground truth, got gt=None")
        score = self.fn(images.clamp(0, 1) if self.clamp else images, gt, captions)
        if self.as_reward:
            score = self.spec.reward(score, **self.reward_params)
        return score

    def __repr__(self) -> str:
        return f"Measure({self.name!r}{', as_reward' if self.as_reward else ''})"


_REGISTRY: Registry[MeasureSpec] = Registry(
    "measure", hint="see `facereward evaluate --list-metrics`; register your own with facereward.measures.register_measure"
)
# old names: an error that names the new one
RENAMED: dict[str, str] = {"identity": "ids"}


def register_measure(name: str, build: Callable[..., Any] | None = None, *, fn: Callable[..., Tensor] | None = None,
                     kind: Kind = "NR", lower_better: bool = False, differentiable: bool = False, needs: str = "",
                     description: str = "", column: str = "", reward: Callable[..., Tensor] | None | Literal["auto"] = "auto",
                     reward_params: Sequence[str] = (), reward_defaults: dict[str, Any] | None = None,
                     overwrite: bool = False) -> None:
    """Add a row. Give `build(env, **options) -> scorer` or, for a measure without options, the scorer `fn` itself.

    `reward`: how a score becomes a reward; "auto" (default) is the score itself when higher is better and none
    (not usable as a reward) when lower is better; pass e.g. `lambda d: -d` to allow it.
    """
    if kind not in KINDS:
        raise ValueError(f"measure {name!r}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not name or "," in name or "=" in name:
        raise ValueError(f"measure name must be non-empty and without ',' or '=', got {name!r}")
    if (build is None) == (fn is None):
        raise ValueError(f"measure {name!r}: give exactly one of build= or fn=")
    if fn is not None:
        if not callable(fn):
            raise TypeError(f"measure {name!r}: fn must be callable, got {type(fn).__name__}")
        scorer = fn
        build = lambda env: scorer  # noqa: E731
    if not callable(build):
        raise TypeError(f"measure {name!r}: build must be callable, got {type(build).__name__}")
    if reward == "auto":
        reward = None if lower_better or kind == "set" else _same
    _REGISTRY.register(name, MeasureSpec(name, build, kind, bool(lower_better), bool(differentiable), needs, description,
                                         column, reward, tuple(reward_params), dict(reward_defaults or {})), overwrite)


def _same(score: Tensor) -> Tensor:
    return score


def unregister_measure(name: str) -> None:
    """Remove a row (for tests and interactive sessions)."""
    _REGISTRY.unregister(name)


def get_measure(name: str) -> MeasureSpec:
    """The row of `name`; a ValueError listing the known names (or naming the new name of an old one) otherwise."""
    if name in RENAMED and name not in _REGISTRY:
        raise ValueError(f"measure {name!r} was renamed: use {RENAMED[name]!r}")
    return _REGISTRY.get(name)


def list_measures() -> list[MeasureSpec]:
    """Every row, by name."""
    return [_REGISTRY.get(n) for n in _REGISTRY.names()]


def format_measure_table(specs: Sequence[MeasureSpec] | None = None) -> str:
    """The table as markdown (what `evaluate --list-metrics` prints)."""
    lines = ["| name | type | lower is better | differentiable | reward | needs |", "|---|---|---|---|---|---|"]
    for s in specs if specs is not None else list_measures():
        yes = lambda v: "yes" if v else "no"  # noqa: E731
        lines.append(f"| {s.name} | {s.kind} | {yes(s.lower_better)} | {yes(s.differentiable)} | "
                     f"{yes(s.reward is not None)} | {s.needs or '-'} |")
    return "\n".join(lines)


def parse_measure_names(text: str | Sequence[str], where: str = "metrics") -> list[str]:
    """"psnr, ssim" or ["psnr", "ssim"] -> ["psnr", "ssim"]; unknown names and repeats are one-line errors."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n and n.strip()]
    if not names:
        raise ValueError(f"{where}: no measure names given (see --list-metrics)")
    for n in names:
        try:
            get_measure(n)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{where}: {repeated[0]!r} is given twice")
    return names


class _Recording(dict):
    """env.used while one measure is built: which judges the builder resolved (for its provenance)."""

    def __init__(self, base: dict[str, str]):
        super().__init__(base)
        self.touched: dict[str, str] = {}

    def __setitem__(self, key: str, value: str) -> None:
        super().__setitem__(key, value)
        self.touched[key] = value


def create_measure(name: str, as_reward: bool = False, device: torch.device | str | None = None,
                   env: MeasureEnv | None = None, **options: Any) -> Measure | SetMeasure:
    """Build the measure `name` with its options (docs/methods.md 3), on `device` (or `env.device`).

    `as_reward=True` gives its reward form (higher is better; a ValueError for a measure without one). `env` shares
    judges between measures (default: a new one). Options every measure takes: `clamp` (images to [0, 1] first) and
    `column` (its header in tables). Bad or missing options are one-line ValueErrors.
    """
    spec = get_measure(name)
    if as_reward and spec.reward is None:
        raise ValueError(f"measure {name!r} has no reward form (lower is better); use it as a metric or a loss")
    env = env or MeasureEnv(device)
    options = {**(spec.reward_defaults if as_reward else {}), **options}
    clamp, column = bool(options.pop("clamp", False)), str(options.pop("column", "") or "")
    params = {k: options.pop(k) for k in spec.reward_params if k in options}
    if params and not as_reward:
        raise ValueError(f"measure {name!r}: option {sorted(params)[0]!r} applies only to its reward form")
    given = {**options, **params, "clamp": clamp}
    used, env.used = env.used, _Recording(env.used)
    try:
        built = spec.build(env, **options)
    except TypeError as err:
        raise ValueError(f"measure {name!r}: bad options {sorted(options)} ({err})") from None
    except FileNotFoundError as err:  # a weight file an option names: one line naming it, no traceback
        raise ValueError(f"measure {name!r}: {err}") from None
    finally:
        judges, env.used = env.used.touched, used
        for key, value in judges.items():  # item by item, so an enclosing build records them too
            used[key] = value
    if built is None:
        raise MissingNeeds(f"measure {name!r} needs {spec.needs or 'something that was not given'}")
    provenance = {**measure_provenance(spec, given, built), "judges": dict(judges)}
    if isinstance(built, SetMeasure):
        built.provenance = provenance
        if as_reward:
            raise ValueError(f"measure {name!r} scores a whole set; it has no per-image reward form")
        if column:
            built.column = column
        return built
    if not callable(built):
        raise TypeError(f"measure {name!r}: its builder returned a {type(built).__name__}, which is not callable")
    measure = Measure(spec, built, as_reward, params, clamp, column)
    measure.provenance = provenance
    target = device if device is not None else env.device
    return measure.to(target)


__all__ = [
    "KINDS",
    "RENAMED",
    "Measure",
    "MeasureEnv",
    "MeasureSpec",
    "MissingNeeds",
    "SetMeasure",
    "create_measure",
    "format_measure_table",
    "get_measure",
    "list_measures",
    "parse_measure_names",
    "register_measure",
    "unregister_measure",
]
