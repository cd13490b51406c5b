"""Sliced evaluation (docs/methods.md 3.1): every per-image column per group of an attribute, with bootstrap intervals,
and the worst group per method and column. Attributes come from an attributes CSV or, on a toy test set, from the
toy world's own record of each face (`facereward.data.attributes`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from facereward.data.attributes import read_attributes_csv, toy_attributes

from .config import EvaluateConfig
from .outputs import format_value
from facereward.stats import mean_interval

MISSING = "(missing)"


def load_attributes(config: EvaluateConfig, names: list[str], toy: bool) -> dict[str, dict[str, str]]:
    """{image stem: {attr: value}} for every evaluated image, from config.attributes or the toy test set; every
    attribute config.slice_by names must be known for at least one image (one-line ValueErrors)."""
    if config.attributes:
        table = read_attributes_csv(config.attributes)
        source = config.attributes
    elif toy:
        table = toy_attributes(config.testset)
        source = f"{config.testset} (toy traits)"
    else:
        raise ValueError("slice_by: the test set is not a toy test set, so give an attributes CSV (--attributes FILE: "
                         "one line per image, name,attr=value,...)")
    missing = [n for n in names if n not in table]
    if missing and not config.attributes:
        raise ValueError(f"{source}: no traits for {len(missing)} of the test images (e.g. {missing[0]!r})")
    for attr in config.slice_by:
        if not any(attr in table.get(n, {}) for n in names):
            known = sorted({k for n in names for k in table.get(n, {})})
            raise ValueError(f"slice_by: {source} has no attribute {attr!r} for these images "
                             f"(known: {', '.join(known) or 'none'})")
    return {n: table.get(n, {}) for n in names}


def slice_scores(config: EvaluateConfig, names: list[str], attributes: dict[str, dict[str, str]],
                 per_image: dict[str, dict[str, list[float]]], lower_better: dict[str, bool]) -> dict[str, Any]:
    """{"groups": {attr: {value: {"n", "rows": {method: {column: [mean, lower, upper]}}}}},
        "worst": {attr: {method: {column: {"value", "mean", "n"}}}}}; images without the attribute form MISSING.
    The worst group is the one with the lowest mean (highest where lower is better) among groups of at least
    config.min_slice images."""
    groups: dict[str, Any] = {}
    worst: dict[str, Any] = {}
    for attr in config.slice_by:
        values = [attributes[n].get(attr, MISSING) for n in names]
        groups[attr], worst[attr] = {}, {}
        for value in sorted(set(values)):
            idx = np.array([i for i, v in enumerate(values) if v == value])
            rows = {}
            for method, columns in per_image.items():
                rows[method] = {}
                for column, scores in columns.items():
                    x = np.asarray(scores, dtype=np.float64)[idx]
                    lo, hi = mean_interval(x, config.bootstrap, config.ci_level, config.seed)
                    rows[method][column] = [float(x.mean()), lo, hi]
            groups[attr][value] = {"n": int(idx.size), "rows": rows}
        for method, columns in per_image.items():
            worst[attr][method] = {}
            for column in columns:
                candidates = [(g["rows"][method][column][0], value, g["n"]) for value, g in groups[attr].items()
                              if g["n"] >= config.min_slice and value != MISSING]
                if not candidates:
                    continue
                sign = -1.0 if lower_better.get(column, False) else 1.0
                mean, value, n = min(candidates, key=lambda c: sign * c[0])
                worst[attr][method][column] = {"value": value, "mean": mean, "n": n}
    return {"groups": groups, "worst": worst}


def _cell(mean: float, lo: float, hi: float) -> str:
    if math.isnan(lo):
        return format_value(mean)
    return f"{format_value(mean)} [{format_value(lo)}, {format_value(hi)}]"


def slice_markdown(slices: dict[str, Any], level: float) -> str:
    """Per attribute, a table of method x group with intervals, then the worst group per method and column."""
    parts = []
    for attr, groups in slices["groups"].items():
        columns = list(dict.fromkeys(c for g in groups.values() for r in g["rows"].values() for c in r))
        lines = [f"### By {attr} (mean [{level * 100:g}% interval])", "",
                 "| method | " + attr + " | n | " + " | ".join(columns) + " |", "|---|---|---|" + "---|" * len(columns)]
        for method in next(iter(groups.values()))["rows"]:
            for value, g in groups.items():
                cells = [_cell(*g["rows"][method][c]) if c in g["rows"][method] else "-" for c in columns]
                lines.append(f"| {method} | {value} | {g['n']} | " + " | ".join(cells) + " |")
        worst = slices["worst"][attr]
        lines += ["", f"Worst {attr} group per method:", "", "| method | " + " | ".join(columns) + " |",
                  "|---|" + "---|" * len(columns)]
        for method, by_column in worst.items():
            cells = [f"{by_column[c]['value']} ({format_value(by_column[c]['mean'])}, n={by_column[c]['n']})"
                     if c in by_column else "-" for c in columns]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def attributes_source(config: EvaluateConfig) -> str:
    return str(Path(config.attributes)) if config.attributes else "toy traits"


__all__ = ["MISSING", "attributes_source", "load_attributes", "slice_markdown", "slice_scores"]
