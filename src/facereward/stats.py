"""Bootstrap intervals and paired tests (docs/methods.md 3.1): evaluate's intervals over images, its paired
comparisons of two methods, and the resampling behind the user study's intervals.

Every interval is a percentile bootstrap over the test images: draw `n_boot` resamples of the image indices with
replacement (seeded), compute the statistic on each, and take the (1 - level)/2 and (1 + level)/2 quantiles. A set
measure (FID/KID) is recomputed on each resample; when its reference set is the test set's own GT, the GT features are
resampled with the same indices (the pairing is kept), and the resampled values are shifted by their bias (repeated
images alone move FID and KID). Paired comparisons of two methods use the same resamples for
both, so the interval is that of the mean per-image difference; the bootstrap p-value is the two-sided
percentile-inversion one, and the Wilcoxon signed-rank test (scipy) is the rank-based check beside it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

DEFAULT_BOOTSTRAP = 1000
DEFAULT_SET_BOOTSTRAP = 100  # FID/KID recompute a matrix square root per resample


def bootstrap_indices(n: int, n_boot: int, seed: int = 0) -> np.ndarray:
    """(n_boot, n) image indices drawn with replacement, deterministic in `seed`."""
    if n < 1:
        raise ValueError("bootstrap: no images")
    if n_boot < 1:
        raise ValueError(f"bootstrap: the number of resamples must be at least 1, got {n_boot}")
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def percentile_interval(statistics: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The (1 - level)/2 and (1 + level)/2 quantiles (numpy's linear interpolation) of bootstrap statistics; NaNs
    (a resample the statistic is undefined on) are left out."""
    if not 0 < level < 1:
        raise ValueError(f"bootstrap: level must be in (0, 1), got {level}")
    values = np.asarray(statistics, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return math.nan, math.nan
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def mean_interval(values, n_boot: int = DEFAULT_BOOTSTRAP, level: float = 0.95, seed: int = 0,
                  indices: np.ndarray | None = None) -> tuple[float, float]:
    """The percentile-bootstrap interval of the mean of per-image `values` (docs/methods.md 3.1)."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"bootstrap: expected a non-empty 1-d list of per-image values, got shape {x.shape}")
    idx = bootstrap_indices(x.size, n_boot, seed) if indices is None else indices
    return percentile_interval(x[idx].mean(axis=1), level)


def bootstrap_interval(n_items: int, statistic: Callable[[np.ndarray], np.ndarray], n_resamples: int = DEFAULT_BOOTSTRAP,
                       seed: int = 0, level: float = 0.95) -> tuple[np.ndarray, np.ndarray, int]:
    """A percentile interval of a vector `statistic(indices)` over resamples of n_items: (low, high, resamples used).

    A resample where the statistic raises ValueError (no finite estimate) is dropped and not counted; all dropped
    gives NaN. Elementwise quantiles as `percentile_interval`.
    """
    samples = []
    for idx in bootstrap_indices(n_items, n_resamples, seed):
        try:
            samples.append(np.asarray(statistic(idx), dtype=float))
        except ValueError:
            continue
    if not samples:
        shape = np.shape(statistic(np.arange(n_items)))
        return np.full(shape, np.nan), np.full(shape, np.nan), 0
    if not 0 < level < 1:
        raise ValueError(f"bootstrap: level must be in (0, 1), got {level}")
    low, high = np.quantile(np.stack(samples), [(1 - level) / 2, (1 + level) / 2], axis=0)
    return low, high, len(samples)


def set_interval(features: np.ndarray, reference: np.ndarray, compute: Callable[[np.ndarray, np.ndarray], float],
                 paired_reference: bool, n_boot: int = DEFAULT_SET_BOOTSTRAP, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """The percentile-bootstrap interval of a set measure `compute(features, reference)` over resampled images;
    `paired_reference`: the reference rows are the same images' GT, resampled with the same indices."""
    idx = bootstrap_indices(len(features), n_boot, seed)
    stats = [compute(features[i], reference[i] if paired_reference else reference) for i in idx]
    return percentile_interval(_unbiased(np.asarray(stats), compute(features, reference)), level)


def _unbiased(statistics: np.ndarray, value: float) -> np.ndarray:
    """Bootstrap statistics of a set measure shifted by their bias (their mean minus the full-set value): a resample
    repeats images, which alone moves FID and KID, so the raw percentiles can miss the full-set value."""
    finite = statistics[np.isfinite(statistics)]
    return statistics - (finite.mean() - value) if finite.size else statistics


@dataclass
class Comparison:
    """A paired test of method `a` against `b` on one column: mean(a - b), its bootstrap interval and two p-values."""

    a: str
    b: str
    column: str
    n: int
    difference: float
    lower: float
    upper: float
    p_bootstrap: float
    p_wilcoxon: float  # NaN for set measures (no per-image values)
    lower_better: bool = False

    @property
    def significant(self) -> bool:
        """The interval excludes 0."""
        return self.lower > 0 or self.upper < 0

    def winner(self) -> str | None:
        """The better method when the interval excludes 0, else None."""
        if not self.significant:
            return None
        return self.a if (self.difference > 0) != self.lower_better else self.b


def bootstrap_p_value(statistics: np.ndarray) -> float:
    """Two-sided p-value of "the statistic is 0" from its bootstrap distribution: twice the smaller tail beyond 0,
    with the +1 correction (1 + count) / (1 + n), capped at 1."""
    s = np.asarray(statistics, dtype=np.float64)
    s = s[np.isfinite(s)]
    if s.size == 0:
        return math.nan
    tail = min(np.sum(s <= 0), np.sum(s >= 0))
    return float(min(1.0, 2 * (tail + 1) / (s.size + 1)))


def wilcoxon_p_value(differences) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired differences (zeros dropped; exact for small n without ties,
    scipy's normal approximation otherwise); 1.0 when every difference is 0."""
    from scipy.stats import wilcoxon

    d = np.asarray(differences, dtype=np.float64)
    if not np.any(d != 0):
        return 1.0
    return float(wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)


def compare_paired(a: str, b: str, column: str, values_a, values_b, n_boot: int = DEFAULT_BOOTSTRAP,
                   level: float = 0.95, seed: int = 0, lower_better: bool = False) -> Comparison:
    """The paired comparison of two methods' per-image values on the same images (docs/methods.md 3.1)."""
    x, y = np.asarray(values_a, dtype=np.float64), np.asarray(values_b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or x.size == 0:
        raise ValueError(f"compare {a!r} and {b!r} on {column!r}: need the same non-empty set of images, got {x.shape} and {y.shape}")
    d = x - y
    boots = d[bootstrap_indices(d.size, n_boot, seed)].mean(axis=1)
    lo, hi = percentile_interval(boots, level)
    return Comparison(a, b, column, int(d.size), float(d.mean()), lo, hi, bootstrap_p_value(boots), wilcoxon_p_value(d),
                      lower_better)


def compare_sets(a: str, b: str, column: str, features_a: np.ndarray, features_b: np.ndarray, reference: np.ndarray,
                 compute: Callable[[np.ndarray, np.ndarray], float], paired_reference: bool,
                 n_boot: int = DEFAULT_SET_BOOTSTRAP, level: float = 0.95, seed: int = 0,
                 lower_better: bool = True) -> Comparison:
    """A set measure's difference compute(A) - compute(B), bootstrapped with the same image resamples for both."""
    if len(features_a) != len(features_b):
        raise ValueError(f"compare {a!r} and {b!r} on {column!r}: different numbers of images")
    diff = compute(features_a, reference) - compute(features_b, reference)
    boots = []
    for i in bootstrap_indices(len(features_a), n_boot, seed):
        ref = reference[i] if paired_reference else reference
        boots.append(compute(features_a[i], ref) - compute(features_b[i], ref))
    boots = _unbiased(np.asarray(boots), diff)
    lo, hi = percentile_interval(boots, level)
    return Comparison(a, b, column, len(features_a), float(diff), lo, hi, bootstrap_p_value(boots), math.nan, lower_better)


__all__ = ["Comparison", "DEFAULT_BOOTSTRAP", "DEFAULT_SET_BOOTSTRAP", "bootstrap_indices", "bootstrap_interval", "bootstrap_p_value",
           "compare_paired", "compare_sets", "mean_interval", "percentile_interval", "set_interval", "wilcoxon_p_value"]
