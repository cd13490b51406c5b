"""Everything that scores images: one table of measures (docs/methods.md 3) and the weighted spec that combines them.

    from facereward.measures import create_measure, list_measures, register_measure
    d = create_measure("lpips", backbone_path="vgg16.pth", heads_path="vgg.pth")     # (images, gt) -> (B,), lower is better
    r = create_measure("lpips", as_reward=True, backbone_path=..., heads_path=...)   # 1 - LPIPS, differentiable

`register_reward` and `register_metric` are the old registration calls, kept for one release (deprecated).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from facereward.measures import builtins as _builtins  # noqa: F401 (registers the built-in rows)
from facereward.measures.composite import (
    PAPER_WEIGHTS,
    MeasuresConfig,
    WeightedOutput,
    WeightedSum,
)
from facereward.measures.judges import MeasureEnv
from facereward.measures.table import (
    Measure,
    MeasureSpec,
    MissingNeeds,
    SetMeasure,
    create_measure,
    format_measure_table,
    get_measure,
    list_measures,
    parse_measure_names,
    register_measure,
    unregister_measure,
)


def register_reward(name: str, factory: Callable[..., Any], overwrite: bool = False) -> None:
    """Deprecated: `register_measure`. Registers `factory(**options) -> reward(images, gt, captions)` as a measure
    whose reward form is its score (`differentiable` and `needs_gt` are read from what the factory returns)."""
    warnings.warn("register_reward is deprecated; use facereward.measures.register_measure (a measure is a reward, "
                  "an evaluate column and a held-out judge at once)", DeprecationWarning, stacklevel=2)
    if not callable(factory):
        raise TypeError(f"reward {name!r}: factory must be callable, got {type(factory).__name__}")
    register_measure(name, lambda env, **options: factory(**options), kind="NR", lower_better=False,
                     differentiable=False, overwrite=overwrite)


class _LegacyContext:
    """What an old `register_metric` factory reads: options by field name, the device, the shared judges."""

    def __init__(self, env: MeasureEnv, options: dict[str, Any], name: str):
        self.env, self._options, self.name = env, options, name
        self.device, self.toy, self.judges = env.device, env.toy, env.used

    def get(self, field: str, default: Any = None) -> Any:
        return self._options.get(field, default)

    def options(self, metric: str) -> dict[str, Any]:
        return dict(self._options)

    def identity(self):
        return self.env.identity()

    def landmarks(self):
        return self.env.landmarks()

    def fid_features(self):
        return self.env.features()

    def memo(self, key: Any, images, fn):
        return self.env.memo(key, images, fn)


def register_metric(name: str, factory: Callable[..., Any], kind: str = "NR", lower_better: bool = False, needs: str = "",
                    description: str = "", reward: str = "", overwrite: bool = False) -> None:
    """Deprecated: `register_measure`. Registers an old `factory(ctx) -> fn(images, gt, captions)` as a measure."""
    warnings.warn("register_metric is deprecated; use facereward.measures.register_measure", DeprecationWarning, stacklevel=2)
    if not callable(factory):
        raise TypeError(f"metric {name!r}: factory must be callable, got {type(factory).__name__}")
    register_measure(name, lambda env, **options: factory(_LegacyContext(env, options, name)), kind=kind,
                     lower_better=lower_better, needs=needs, description=description, overwrite=overwrite)


__all__ = [
    "PAPER_WEIGHTS",
    "Measure",
    "MeasureEnv",
    "MeasureSpec",
    "MeasuresConfig",
    "MissingNeeds",
    "SetMeasure",
    "WeightedOutput",
    "WeightedSum",
    "create_measure",
    "format_measure_table",
    "get_measure",
    "list_measures",
    "parse_measure_names",
    "register_measure",
    "register_metric",
    "register_reward",
    "unregister_measure",
]
