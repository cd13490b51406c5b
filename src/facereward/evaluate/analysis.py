"""Intervals, paired comparisons and slices of an evaluate run (docs/methods.md 3.1), from its per-image scores and
its set measures' features; written beside the means into results.{md,csv,json}."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .config import EvaluateConfig
from .published import check_markdown, check_published, read_published
from .slices import load_attributes, slice_markdown, slice_scores
from facereward.stats import compare_paired, compare_sets, mean_interval, set_interval


@dataclass
class SetScores:
    """What a set measure (FID/KID) needs to be recomputed on resamples: how (its `resample` route where it has one),
    its features per method and its reference; `paired_reference`: the reference rows are the test images' own GT,
    in the same order."""

    column: str
    compute: Callable[[np.ndarray, np.ndarray], float]
    features: dict[str, np.ndarray]
    reference: np.ndarray
    paired_reference: bool
    lower_better: bool = True


@dataclass
class Plan:
    """The checked analysis options of one run: the pairs to compare, the images' attributes, the published table."""

    pairs: list[tuple[str, str]]
    names: list[str]
    attributes: dict[str, dict[str, str]] | None = None
    published: dict[str, Any] | None = None


def plan_analysis(config: EvaluateConfig, methods: list[str], names: list[str], toy: bool) -> Plan:
    """Check ci/compare/slice_by/check_published before anything is restored (one-line ValueErrors)."""
    if not 0 < config.ci_level < 1:
        raise ValueError(f"ci_level must be in (0, 1), got {config.ci_level}")
    for key in ("bootstrap", "set_bootstrap", "min_slice"):
        if int(getattr(config, key)) < 1:
            raise ValueError(f"{key} must be at least 1, got {getattr(config, key)}")
    if isinstance(config.slice_by, str):
        config.slice_by = [a.strip() for a in config.slice_by.split(",") if a.strip()]
    if config.attributes and not config.slice_by:
        raise ValueError("attributes: an attributes file is given but nothing to slice by (slice_by / --slice-by ATTR)")
    attributes = load_attributes(config, names, toy) if config.slice_by else None
    published = read_published(config.check_published) if config.check_published else None
    return Plan(check_compare(config, methods), names, attributes, published)


def run_analysis(config: EvaluateConfig, plan: Plan, rows: dict[str, dict[str, float]],
                 per_image: dict[str, dict[str, list[float]]], set_scores: list[SetScores],
                 provenance: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], list[str]]:
    """The analysis a run asked for ({"intervals", "comparisons", "slices", "check"}) and its markdown sections."""
    lower_better = {column: bool(p.get("lower_better")) for column, p in provenance.items()}
    analysis: dict[str, Any] = {}
    sections: list[str] = []
    if config.ci:
        analysis["intervals"] = intervals(config, per_image, set_scores)
    if plan.pairs:
        analysis["comparisons"] = comparisons(config, plan.pairs, per_image, set_scores, lower_better)
        sections.append("## Paired comparisons\n\n" + comparison_table(analysis["comparisons"], config.ci_level))
    if plan.attributes is not None:
        analysis["slices"] = slice_scores(config, plan.names, plan.attributes, per_image, lower_better)
        sections.append("## Slices\n\n" + slice_markdown(analysis["slices"], config.ci_level))
    if plan.published is not None:
        analysis["check"] = check_published(plan.published, rows, provenance, asdict(config))
        sections.append(check_markdown(analysis["check"], config.check_published))
    return analysis, sections


def check_compare(config: EvaluateConfig, methods: list[str]) -> list[tuple[str, str]]:
    """config.compare as (A, B) pairs of evaluated methods; anything else is a one-line ValueError."""
    pairs = []
    for pair in config.compare:
        if isinstance(pair, str):
            pair = [p.strip() for p in pair.split(",")]
        if len(pair) != 2 or pair[0] == pair[1]:
            raise ValueError(f"compare: expected two different method names, got {pair!r}")
        for name in pair:
            if name not in methods:
                raise ValueError(f"compare: {name!r} is not an evaluated method ({', '.join(methods)})")
        pairs.append((str(pair[0]), str(pair[1])))
    return pairs


def intervals(config: EvaluateConfig, per_image: dict[str, dict[str, list[float]]],
              set_scores: list[SetScores]) -> dict[str, dict[str, list[float]]]:
    """{method: {column: [lower, upper]}}: the bootstrap interval of every cell (docs/methods.md 3.1)."""
    out: dict[str, dict[str, list[float]]] = {}
    for method, columns in per_image.items():
        out[method] = {}
        for column, values in columns.items():
            out[method][column] = list(mean_interval(values, config.bootstrap, config.ci_level, config.seed))
    for s in set_scores:
        for method, feats in s.features.items():
            out.setdefault(method, {})[s.column] = list(set_interval(feats, s.reference, s.compute, s.paired_reference,
                                                                     config.set_bootstrap, config.ci_level, config.seed))
    return out


def comparisons(config: EvaluateConfig, pairs: list[tuple[str, str]], per_image: dict[str, dict[str, list[float]]],
                set_scores: list[SetScores], lower_better: dict[str, bool]) -> list[dict[str, Any]]:
    """For each pair and each column both methods have: the paired difference A - B, its interval and p-values."""
    rows = []
    for a, b in pairs:
        for column in per_image[a]:
            if column in per_image[b]:
                c = compare_paired(a, b, column, per_image[a][column], per_image[b][column], config.bootstrap,
                                   config.ci_level, config.seed, lower_better.get(column, False))
                rows.append({**asdict(c), "better": c.winner()})
        for s in set_scores:
            if a in s.features and b in s.features:
                c = compare_sets(a, b, s.column, s.features[a], s.features[b], s.reference, s.compute, s.paired_reference,
                                 config.set_bootstrap, config.ci_level, config.seed, s.lower_better)
                rows.append({**asdict(c), "better": c.winner()})
    return rows


def comparison_table(rows: list[dict[str, Any]], level: float) -> str:
    """The paired comparisons as markdown: difference [interval], both p-values, and which is better (or "tie")."""
    pct = f"{level * 100:g}%"
    lines = [f"| A | B | column | A - B | {pct} interval | p (bootstrap) | p (Wilcoxon) | better at {pct} |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        wil = "-" if math.isnan(r["p_wilcoxon"]) else f"{r['p_wilcoxon']:.3g}"
        lines.append(f"| {r['a']} | {r['b']} | {r['column']} | {r['difference']:+.4g} | [{r['lower']:+.4g}, {r['upper']:+.4g}] "
                     f"| {r['p_bootstrap']:.3g} | {wil} | {r['better'] or 'neither'} |")
    return "\n".join(lines)


__all__ = ["Plan", "SetScores", "check_compare", "plan_analysis", "run_analysis", "comparison_table", "comparisons", "intervals"]
