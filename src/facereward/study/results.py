"""The answers of a blind pairwise study (`facereward study`) and their statistics (`facereward study-results`).

An answers file is JSONL, one answer a line, appended by the study page at every key press::

    {"rater": "ana", "image": "0007", "method_a": "ours", "method_b": "gfpgan", "choice": "a", "time": "..."}

`method_a` was shown on the left, `method_b` on the right; `choice` is "a" (left better), "b" (right better) or
"tie" (can't tell). Other keys (time, response_ms) are kept for the record and not used here.

Statistics (plain numpy; each function's docstring states its formula):

- `wilson_interval`: the Wilson score interval of a proportion; a tie counts as half a win.
- `bradley_terry`: Bradley-Terry log-strengths by Hunter's (2004) MM algorithm, ties as half a win to each side,
  normalised so the log-strengths sum to 0 (the same as: the geometric mean of the strengths is 1).
- the intervals of the ranking: `facereward.stats.bootstrap_interval`, answers resampled with replacement.
- `fleiss_kappa` (all raters of a comparison at once), `cohen_kappa` (two raters), `percent_agreement`.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from facereward.stats import bootstrap_interval

__all__ = [
    "CHOICES",
    "Answer",
    "StudyResultsError",
    "analyse",
    "bradley_terry",
    "cohen_kappa",
    "fleiss_kappa",
    "load_answers",
    "percent_agreement",
    "read_answers",
    "results_markdown",
    "wilson_interval",
    "write_results",
]

CHOICES = ("a", "b", "tie")
Z95 = 1.959963984540054  # the 97.5 % quantile of the standard normal
RESULTS_JSON = "study_results.json"
RESULTS_MD = "study_results.md"
BT_NORMALISATION = "log-strengths sum to 0 (equivalently: the geometric mean of the strengths is 1)"
TIE_RULE = "a tie counts as half a win for each side"


class StudyResultsError(ValueError):
    """A bad answers file; one-line message naming FILE:LINE."""


# ----------------------------------------------------------------------------------------------
# the answers file


@dataclass(frozen=True)
class Answer:
    """One comparison answered: `method_a` was on the left, `method_b` on the right."""

    rater: str
    image: str
    method_a: str
    method_b: str
    choice: str  # "a", "b" or "tie"
    time: str | None = None
    response_ms: int | None = None

    @property
    def score_a(self) -> float:
        """1 when A won, 0.5 on a tie, 0 when B won."""
        return {"a": 1.0, "tie": 0.5, "b": 0.0}[self.choice]

    @property
    def key(self) -> tuple[str, frozenset[str]]:
        """The comparison, whichever side each method was on: (image, {method_a, method_b})."""
        return self.image, frozenset((self.method_a, self.method_b))

    @property
    def winner(self) -> str | None:
        return {"a": self.method_a, "b": self.method_b}.get(self.choice)

    def to_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {"rater": self.rater, "image": self.image, "method_a": self.method_a,
                                  "method_b": self.method_b, "choice": self.choice}
        if self.time is not None:
            record["time"] = self.time
        if self.response_ms is not None:
            record["response_ms"] = self.response_ms
        return record


def parse_answer(text: str, where: str) -> Answer:
    """One JSONL line as an Answer; StudyResultsError('WHERE: problem') when it is not one."""
    try:
        record = json.loads(text)
    except ValueError as err:
        raise StudyResultsError(f"{where}: not valid JSON ({err})") from None
    if not isinstance(record, dict):
        raise StudyResultsError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in ("rater", "image", "method_a", "method_b", "choice"):
        value = record.get(key)
        if not isinstance(value, str) or not value.strip():
            raise StudyResultsError(f"{where}: {key!r} must be a non-empty string, got {value!r}")
    if record["choice"] not in CHOICES:
        raise StudyResultsError(f"{where}: 'choice' must be one of {', '.join(CHOICES)}, got {record['choice']!r}")
    if record["method_a"] == record["method_b"]:
        raise StudyResultsError(f"{where}: method_a and method_b are the same ({record['method_a']!r})")
    time = record.get("time")
    ms = record.get("response_ms")
    return Answer(record["rater"], record["image"], record["method_a"], record["method_b"], record["choice"],
                  time if isinstance(time, str) else None, ms if isinstance(ms, int) and not isinstance(ms, bool) else None)


def read_answers(path: str | Path, allow_torn_tail: bool = False) -> tuple[list[Answer], int | None]:
    """All answers of `path` (none when it does not exist) and the number of a torn last line that was skipped.

    Blank lines are skipped; any other bad line is a StudyResultsError naming FILE:LINE. With
    `allow_torn_tail`, an invalid last line without a final newline (a write cut off by a crash) is skipped
    and its line number returned instead.
    """
    path = Path(path)
    if not path.exists():
        return [], None
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise StudyResultsError(f"{path}: not UTF-8 text ({err})") from None
    lines = text.splitlines()
    answers: list[Answer] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            answers.append(parse_answer(line, f"{path}:{lineno}"))
        except StudyResultsError:
            if allow_torn_tail and lineno == len(lines) and not text.endswith("\n"):
                return answers, lineno
            raise
    return answers, None


def load_answers(path: str | Path) -> list[Answer]:
    """The answers of an existing, non-empty answers file (every line checked; errors name FILE:LINE)."""
    path = Path(path)
    if not path.is_file():
        raise StudyResultsError(f"{path}: no such file")
    answers, _ = read_answers(path)
    if not answers:
        raise StudyResultsError(f"{path}: no answers in the file")
    return answers


# ----------------------------------------------------------------------------------------------
# statistics


def wilson_interval(successes: float | np.ndarray, n: float | np.ndarray, z: float = Z95) -> tuple[Any, Any]:
    """The Wilson score interval of a proportion p = successes / n (z = 1.96: 95 %).

        centre = (p + z^2 / (2n)) / (1 + z^2 / n)
        half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / (4 n^2))
        interval = [centre - half, centre + half]

    `successes` may be fractional (ties counted as half a success: the interval then treats the n comparisons
    as n Bernoulli trials with that mean, an approximation). n = 0 gives (nan, nan). Works elementwise on arrays.
    """
    s = np.asarray(successes, dtype=float)
    n = np.asarray(n, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = s / n
        denom = 1 + z * z / n
        centre = (p + z * z / (2 * n)) / denom
        half = z / denom * np.sqrt(np.maximum(p * (1 - p) / n + z * z / (4 * n * n), 0.0))
        low, high = np.clip(centre - half, 0, 1), np.clip(centre + half, 0, 1)
    low, high = np.where(n > 0, low, np.nan), np.where(n > 0, high, np.nan)
    if low.ndim == 0:
        return float(low), float(high)
    return low, high


def _strongly_connected(edges: np.ndarray) -> bool:
    """Whether every node reaches every other along edges[i, j] (i -> j)."""
    m = len(edges)
    reach = edges.astype(bool) | np.eye(m, dtype=bool)
    for k in range(m):  # Warshall's transitive closure
        reach |= reach[:, k : k + 1] & reach[k : k + 1, :]
    return bool(reach.all())


def bradley_terry(wins: np.ndarray, prior: float = 0.0, tol: float = 1e-9, max_iter: int = 100_000) -> np.ndarray:
    """Bradley-Terry log-strengths of M methods from a win matrix, by Hunter's (2004) MM algorithm.

    Model: P(i beats j) = g_i / (g_i + g_j). `wins[i, j]` is how often i beat j, a tie adding 0.5 to both
    wins[i, j] and wins[j, i]. With W_i = sum_j wins[i, j] and N_ij = wins[i, j] + wins[j, i], every
    iteration updates all strengths at once (Hunter 2004, eq. 3.5):

        g_i <- W_i / sum_{j != i} N_ij / (g_i + g_j)

    then rescales them to geometric mean 1, until the log-strengths move less than `tol`. The returned
    log-strengths log g_i sum to 0 (geometric mean of g is 1).

    The maximum-likelihood estimate is finite only when the "i beat j" graph is strongly connected (Hunter's
    Assumption 1: every method won against, and lost to, some chain of the others); otherwise a ValueError.
    `prior` > 0 adds `prior` virtual comparisons to every pair of methods, each a tie (wins[i, j] += prior / 2
    for all i != j): the graph is then complete, the estimate always finite, and the strengths shrink a little
    towards each other (a tie is the same evidence for both sides).
    """
    w = np.asarray(wins, dtype=float)
    m = w.shape[0]
    if w.ndim != 2 or w.shape != (m, m) or m < 2:
        raise ValueError(f"wins must be a square matrix of at least 2 methods, got shape {w.shape}")
    if (w < 0).any() or not np.isfinite(w).all():
        raise ValueError("wins must be finite and non-negative")
    if prior < 0:
        raise ValueError(f"prior must be >= 0, got {prior}")
    off = 1 - np.eye(m)
    w = (w + prior / 2) * off
    if not _strongly_connected(w > 0):
        raise ValueError("no finite Bradley-Terry maximum-likelihood estimate: some method never won, or never lost, "
                         "against the rest (the comparison graph is not strongly connected); use a prior > 0")
    total_wins = w.sum(axis=1)
    n = w + w.T
    log_g = np.zeros(m)
    for _ in range(max_iter):
        g = np.exp(log_g)
        new = np.log(total_wins) - np.log((n / (g[:, None] + g[None, :])).sum(axis=1))
        new -= new.mean()
        step = np.abs(new - log_g).max()
        log_g = new
        if step < tol:
            break
    return log_g


def percent_agreement(counts: np.ndarray) -> float:
    """Mean pairwise agreement over items (Fleiss' P-bar).

    counts[i, k] = how many raters put item i in category k (n_i = sum_k counts[i, k] >= 2, may vary by item):

        P_i = sum_k counts[i, k] (counts[i, k] - 1) / (n_i (n_i - 1))    (the share of rater pairs that agree)
        P-bar = mean_i P_i
    """
    c = np.asarray(counts, dtype=float)
    n = c.sum(axis=1)
    if len(c) == 0 or (n < 2).any():
        raise ValueError("every item needs at least 2 ratings")
    return float(((c * (c - 1)).sum(axis=1) / (n * (n - 1))).mean())


def fleiss_kappa(counts: np.ndarray) -> float:
    """Fleiss' kappa of items rated by several raters each (the number of raters may vary by item).

        p_k = sum_i counts[i, k] / sum_i n_i           (the share of all ratings in category k)
        P_e = sum_k p_k^2                                (chance agreement)
        kappa = (P-bar - P_e) / (1 - P_e)                (P-bar: `percent_agreement`)

    nan when P_e = 1 (every rating in one category: kappa is undefined).
    """
    c = np.asarray(counts, dtype=float)
    p_bar = percent_agreement(c)
    p = c.sum(axis=0) / c.sum()
    p_e = float((p * p).sum())
    return float("nan") if p_e >= 1 - 1e-12 else (p_bar - p_e) / (1 - p_e)


def cohen_kappa(a: Sequence[Any], b: Sequence[Any]) -> float:
    """Cohen's kappa of two raters' labels of the same items.

        p_o = share of items where a and b agree
        p_e = sum_k P(a = k) P(b = k)                   (each rater's own label frequencies)
        kappa = (p_o - p_e) / (1 - p_e)

    nan when p_e = 1 (both raters used one and the same label throughout).
    """
    if len(a) != len(b) or not len(a):
        raise ValueError(f"need two equally long, non-empty label lists, got {len(a)} and {len(b)}")
    n = len(a)
    p_o = sum(x == y for x, y in zip(a, b)) / n
    fa, fb = Counter(a), Counter(b)
    p_e = sum(fa[k] * fb[k] for k in fa) / (n * n)
    return float("nan") if p_e >= 1 - 1e-12 else (p_o - p_e) / (1 - p_e)


# ----------------------------------------------------------------------------------------------
# the analysis


def _num(x: Any) -> float | None:
    """A float for JSON (nan -> None)."""
    x = float(x)
    return None if math.isnan(x) else x


def _outcome(answer: Answer, first: str) -> str:
    """The answer relative to the pair's alphabetical order: 'first', 'second' or 'tie' (sides don't matter)."""
    if answer.choice == "tie":
        return "tie"
    return "first" if answer.winner == first else "second"


def _agreement(answers: list[Answer]) -> dict[str, Any]:
    latest: dict[tuple[str, frozenset[str]], dict[str, str]] = defaultdict(dict)  # key -> rater -> outcome
    for a in answers:  # a rater's later answer to the same comparison replaces the earlier one
        latest[a.key][a.rater] = _outcome(a, min(a.method_a, a.method_b))
    shared = {k: v for k, v in latest.items() if len(v) >= 2}
    out: dict[str, Any] = {
        "kappa": "Fleiss' kappa over the comparisons (image and pair of methods) that at least two raters answered, "
                 "3 categories (first method better, second better, tie); per pair of raters Cohen's kappa",
        "comparisons": len(shared),
        "percent_agreement": None,
        "fleiss_kappa": None,
        "pairs": [],
    }
    if not shared:
        return out
    cats = ("first", "second", "tie")
    counts = np.array([[sum(o == c for o in by_rater.values()) for c in cats] for by_rater in shared.values()])
    out["percent_agreement"] = percent_agreement(counts)
    out["fleiss_kappa"] = _num(fleiss_kappa(counts))
    raters = sorted({r for v in shared.values() for r in v})
    for r1, r2 in itertools.combinations(raters, 2):
        both = [(v[r1], v[r2]) for v in shared.values() if r1 in v and r2 in v]
        if both:
            x, y = zip(*both)
            out["pairs"].append({"raters": [r1, r2], "shared": len(both), "agreement": sum(p == q for p, q in both) / len(both),
                                 "cohen_kappa": _num(cohen_kappa(x, y))})
    return out


def analyse(answers: list[Answer], n_bootstrap: int = 1000, seed: int = 0, prior: float = 1.0) -> dict[str, Any]:
    """Win rates (Wilson), head-to-head rates, the Bradley-Terry ranking (bootstrap intervals) and rater agreement."""
    if not answers:
        raise StudyResultsError("no answers to analyse")
    methods = sorted({m for a in answers for m in (a.method_a, a.method_b)})
    if len(methods) < 2:
        raise StudyResultsError("the answers compare fewer than 2 methods")
    index = {m: i for i, m in enumerate(methods)}
    m = len(methods)
    ia = np.array([index[a.method_a] for a in answers])
    ib = np.array([index[a.method_b] for a in answers])
    score = np.array([a.score_a for a in answers])

    def win_matrix(idx: np.ndarray) -> np.ndarray:
        flat = np.bincount(ia[idx] * m + ib[idx], weights=score[idx], minlength=m * m)
        flat += np.bincount(ib[idx] * m + ia[idx], weights=1 - score[idx], minlength=m * m)
        return flat.reshape(m, m)

    everything = np.arange(len(answers))
    wins = win_matrix(everything)
    n_pair = wins + wins.T
    log_g = bradley_terry(wins, prior=prior)
    low, high, used = bootstrap_interval(len(answers), lambda idx: bradley_terry(win_matrix(idx), prior=prior), n_bootstrap, seed)

    ties = np.zeros((m, m))
    decided = np.zeros((m, m))  # decided[i, j]: i beat j outright
    for a in answers:
        i, j = index[a.method_a], index[a.method_b]
        if a.choice == "tie":
            ties[i, j] += 1
            ties[j, i] += 1
        else:
            w, l = (i, j) if a.choice == "a" else (j, i)
            decided[w, l] += 1
    n_method = n_pair.sum(axis=1)
    rate_low, rate_high = wilson_interval(wins.sum(axis=1), n_method)
    order = sorted(range(m), key=lambda i: (-log_g[i], methods[i]))
    ranking = []
    for rank, i in enumerate(order, start=1):
        ranking.append({
            "rank": rank, "method": methods[i],
            "bt_log_strength": float(log_g[i]), "bt_ci": [_num(low[i]), _num(high[i])], "bt_strength": float(np.exp(log_g[i])),
            "win_rate": _num(wins[i].sum() / n_method[i]) if n_method[i] else None,
            "win_rate_ci": [_num(rate_low[i]), _num(rate_high[i])],
            "wins": int(decided[i].sum()), "ties": int(ties[i].sum()), "losses": int(decided[:, i].sum()), "n": int(n_method[i]),
        })
    head_to_head = []
    for i, j in itertools.combinations(order, 2):
        if n_pair[i, j] == 0:
            continue
        lo, hi = wilson_interval(wins[i, j], n_pair[i, j])
        head_to_head.append({"method": methods[i], "opponent": methods[j], "n": int(n_pair[i, j]),
                             "wins": int(decided[i, j]), "ties": int(ties[i, j]), "losses": int(decided[j, i]),
                             "win_rate": float(wins[i, j] / n_pair[i, j]), "win_rate_ci": [_num(lo), _num(hi)]})
    raters = Counter(a.rater for a in answers)
    return {
        "n_answers": len(answers),
        "raters": dict(sorted(raters.items())),
        "n_images": len({a.image for a in answers}),
        "methods": methods,
        "settings": {
            "ties": TIE_RULE,
            "win_rate_interval": "95% Wilson score interval (ties as half a win)",
            "bradley_terry": f"MM algorithm (Hunter 2004); {TIE_RULE}; {BT_NORMALISATION}; "
                             f"prior: {prior} virtual tie(s) added to every pair of methods",
            "bt_prior": prior,
            "bt_interval": f"95% percentile bootstrap, answers resampled with replacement, {n_bootstrap} resamples, seed {seed}",
            "bootstrap": n_bootstrap,
            "bootstrap_used": used,
            "seed": seed,
        },
        "ranking": ranking,
        "head_to_head": head_to_head,
        "agreement": _agreement(answers),
    }


def _f(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _cell(text: str) -> str:
    """A name as a markdown table cell (a '|' would end the cell)."""
    return text.replace("|", "\\|")


def _ci(pair: list[float | None], digits: int = 3) -> str:
    return f"[{_f(pair[0], digits)}, {_f(pair[1], digits)}]"


def results_markdown(results: dict[str, Any], title: str = "Study results") -> str:
    """The results as markdown: the ranking, the head-to-head rates, rater agreement, and how each was computed."""
    s = results["settings"]
    raters = results["raters"]
    lines = [
        f"# {title}",
        "",
        (f"{results['n_answers']} answers from {len(raters)} rater(s) ({', '.join(f'{r}: {n}' for r, n in raters.items())}) "
         f"on {results['n_images']} image(s), {len(results['methods'])} methods. Ties count as half a win for each side."),
        "",
        "## Ranking",
        "",
        "| rank | method | BT log-strength | 95% bootstrap CI | win rate | 95% Wilson CI | W-T-L | n |",
        "|---:|---|---:|---|---:|---|---|---:|",
    ]
    for r in results["ranking"]:
        lines.append(f"| {r['rank']} | {_cell(r['method'])} | {r['bt_log_strength']:+.3f} | {_ci(r['bt_ci'])} | {_f(r['win_rate'])} | "
                     f"{_ci(r['win_rate_ci'])} | {r['wins']}-{r['ties']}-{r['losses']} | {r['n']} |")
    lines += ["", "## Head to head", "", "| method | vs | win rate | 95% Wilson CI | W-T-L | n |", "|---|---|---:|---|---|---:|"]
    for h in results["head_to_head"]:
        lines.append(f"| {_cell(h['method'])} | {_cell(h['opponent'])} | {h['win_rate']:.3f} | {_ci(h['win_rate_ci'])} | "
                     f"{h['wins']}-{h['ties']}-{h['losses']} | {h['n']} |")
    ag = results["agreement"]
    lines += ["", "## Agreement between raters", ""]
    if not ag["comparisons"]:
        lines.append("No comparison was answered by two or more raters.")
    else:
        lines.append(f"{ag['comparisons']} comparison(s) answered by two or more raters: percent agreement "
                     f"{_f(ag['percent_agreement'])} (mean share of agreeing rater pairs), Fleiss' kappa {_f(ag['fleiss_kappa'])}.")
        lines += ["", "| rater | rater | shared | agreement | Cohen's kappa |", "|---|---|---:|---:|---:|"]
        for p in ag["pairs"]:
            lines.append(f"| {_cell(p['raters'][0])} | {_cell(p['raters'][1])} | {p['shared']} | {p['agreement']:.3f} | {_f(p['cohen_kappa'])} |")
    lines += [
        "",
        "## Method",
        "",
        f"- Win rate: (wins + ties / 2) / comparisons; {s['win_rate_interval']}.",
        f"- Bradley-Terry: {s['bradley_terry']}.",
        f"- BT intervals: {s['bt_interval']} ({s['bootstrap_used']} used).",
        f"- Agreement: {ag['kappa']}; outcomes compared whichever side each method was shown on.",
    ]
    return "\n".join(lines) + "\n"


def write_results(results: dict[str, Any], out_dir: str | Path, title: str = "Study results") -> tuple[Path, Path, str]:
    """Write study_results.json and study_results.md into out_dir (atomically); returns both paths and the markdown."""
    from facereward.atomic import atomic_write_json, atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    markdown = results_markdown(results, title)
    atomic_write_json(out / RESULTS_JSON, results)
    atomic_write_text(out / RESULTS_MD, markdown)
    return out / RESULTS_JSON, out / RESULTS_MD, markdown
