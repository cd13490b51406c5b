"""The columns of an evaluate table: measures from the measures table, built with evaluate's options and judges."""

from __future__ import annotations

import dataclasses
from typing import Any

from facereward.measures import (
    Measure,
    MeasureEnv,
    MissingNeeds,
    SetMeasure,
    create_measure,
    get_measure,
    parse_measure_names,
)

from .config import EvaluateConfig

# what `evaluate` computes when no measures are named, in column order; each only where what it needs is given
DEFAULT_MEASURES: tuple[str, ...] = ("psnr", "ssim", "psnr-y", "ssim-y", "lpips", "dists", "ids", "deg", "lmd", "toy-quality",
                                     "frm", "reward", "clipiqa", "niqe", "musiq-koniq", "musiq-spaq", "musiq-paq2piq",
                                     "musiq-ava", "maniqa-koniq", "maniqa-pipal", "topiq-nr", "topiq-nr-face", "fid", "kid")
CROP_BORDER = ("psnr", "ssim", "psnr-y", "ssim-y", "niqe")  # the measures evaluate's crop_border applies to


def measure_options(config: EvaluateConfig, name: str) -> dict[str, Any]:
    """`config.options[name]` over evaluate's defaults for it (crop_border; kid's seed; the reward column's spec)."""
    options = config.options.get(name) or {}
    if not isinstance(options, dict):
        raise ValueError(f"options.{name}: expected a mapping, got {options!r}")
    defaults: dict[str, Any] = {}
    if name in CROP_BORDER:
        defaults["crop_border"] = config.crop_border
    if name == "kid":
        defaults["seed"] = config.seed
    if name == "reward":
        defaults.update(dataclasses.asdict(config.reward))
    return {**defaults, **options}


def build_columns(config: EvaluateConfig, env: MeasureEnv, has_gt: bool, has_reference: bool) -> list[Measure | SetMeasure]:
    """The named measures (config.measures), or the default set where each applies. Asked for by name, a
    full-reference measure without GT, a set measure without a reference set, or one whose needs were not given is
    a one-line ValueError."""
    explicit = config.measures is not None
    names = parse_measure_names(config.measures, "measures") if explicit else [n for n in DEFAULT_MEASURES if n != "toy-quality" or env.toy]
    unknown = sorted(set(config.options) - set(names) - set(DEFAULT_MEASURES))
    if unknown:
        get_measure(unknown[0])  # an unknown name: the table's error
        raise ValueError(f"options.{unknown[0]}: options for a measure that is not evaluated (add it to measures)")
    built: list[Measure | SetMeasure] = []
    for name in names:
        spec = get_measure(name)
        if spec.kind == "FR" and not has_gt:
            if explicit:
                raise ValueError(f"measure {name!r} is full-reference and the test set has no hq/ folder")
            continue
        if spec.kind == "set" and not has_reference:
            if explicit:
                raise ValueError(f"measure {name!r} needs a reference set: the test set has no hq/ folder (give --fid-reference DIR)")
            continue
        try:
            measure = create_measure(name, env=env, **measure_options(config, name))
        except MissingNeeds:
            if explicit:
                raise
            continue
        if not has_gt and getattr(measure, "needs_gt", False):
            if explicit:
                raise ValueError(f"measure {name!r} needs the ground truth and the test set has no hq/ folder")
            continue
        built.append(measure)
    return built


__all__ = ["CROP_BORDER", "DEFAULT_MEASURES", "build_columns", "measure_options"]
