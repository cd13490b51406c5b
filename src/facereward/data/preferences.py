"""Preference data (docs/methods.md 1.1) as JSONL: one labelled pair, or one ranking, per line.

A pair line::

    {"chosen": PATH, "rejected": PATH, "lq": PATH?, "gt": PATH?, "caption": STR?,
     "source": STR? ("human", "oracle", "auto-svm", ...), "annotator": STR?, "tie": BOOL? (false)}

A ranking line ``{"ranking": [PATH best, ..., PATH worst], "lq"?, "gt"?, "caption"?, "source"?,
"annotator"?}`` stands for all k(k-1)/2 pairs, the better-ranked image being the chosen one.
Paths are relative to the JSONL file's folder unless absolute. Every problem is reported as one
line ``FILE:LINE: problem`` in a `PreferenceDataError`.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from facereward.atomic import append_jsonl, atomic_write_text

__all__ = [
    "PreferenceDataError",
    "PreferencePair",
    "append_pair",
    "expand_ranking",
    "load_pairs",
    "split_pairs",
    "write_pairs",
]

PATH_KEYS = ("chosen", "rejected", "lq", "gt")
TEXT_KEYS = ("caption", "source", "annotator")
PAIR_KEYS = frozenset(PATH_KEYS + TEXT_KEYS + ("tie",))
RANKING_KEYS = frozenset(("ranking", "lq", "gt") + TEXT_KEYS)


class PreferenceDataError(ValueError):
    """A bad preference file or record; the message is one line, 'FILE:LINE: problem' where known."""


@dataclass
class PreferencePair:
    """One preference: `chosen` is better than `rejected` (or as good, when `tie`); paths absolute."""

    chosen: Path
    rejected: Path
    lq: Path | None = None
    gt: Path | None = None
    caption: str | None = None
    source: str | None = None
    annotator: str | None = None
    tie: bool = False
    origin: str | None = field(default=None, compare=False)  # "FILE:LINE" it was read from, for messages

    def to_record(self, base_dir: str | Path | None = None) -> dict[str, Any]:
        """The JSONL record; paths under `base_dir` become relative to it (with '/'), others stay absolute."""
        record: dict[str, Any] = {}
        for key in PATH_KEYS:
            value = getattr(self, key)
            if value is not None:
                record[key] = _relative(Path(value), base_dir)
        for key in TEXT_KEYS:
            value = getattr(self, key)
            if value is not None:
                record[key] = value
        if self.tie:
            record["tie"] = True
        return record


# ----------------------------------------------------------------------------------------------
# validation


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return {str: "string", int: "number", float: "number", list: "list", dict: "object"}.get(type(value), type(value).__name__)


def _check_record(record: Any) -> str:
    """Validate keys and types of one decoded line; return its kind ("pair" or "ranking")."""
    if not isinstance(record, dict):
        raise PreferenceDataError(f"expected a JSON object, got {_type_name(record)}")
    kind = "ranking" if "ranking" in record else "pair"
    allowed = RANKING_KEYS if kind == "ranking" else PAIR_KEYS
    unknown = [k for k in record if k not in allowed]
    if unknown:
        names = ", ".join(repr(k) for k in unknown)
        what = "a ranking line" if kind == "ranking" else "a pair line"
        raise PreferenceDataError(f"unknown key(s) {names} in {what} (allowed: {', '.join(sorted(allowed))})")
    if kind == "pair":
        for key in ("chosen", "rejected"):
            if key not in record or record[key] is None:
                raise PreferenceDataError(f"missing {key!r} (a pair line needs 'chosen' and 'rejected', or use 'ranking')")
    for key in PATH_KEYS:
        value = record.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise PreferenceDataError(f"{key!r} must be a non-empty string (an image path), got {_type_name(value)}")
    for key in TEXT_KEYS:
        if key in record and record[key] is not None and not isinstance(record[key], str):
            raise PreferenceDataError(f"{key!r} must be a string, got {_type_name(record[key])}")
    if "tie" in record and not isinstance(record["tie"], bool):
        raise PreferenceDataError(f"'tie' must be true or false, got {_type_name(record['tie'])}")
    if kind == "ranking":
        ranking = record["ranking"]
        if not isinstance(ranking, list):
            raise PreferenceDataError(f"'ranking' must be a list of image paths (best first), got {_type_name(ranking)}")
        if len(ranking) < 2:
            raise PreferenceDataError(f"'ranking' needs at least 2 images, got {len(ranking)}")
        for i, item in enumerate(ranking):
            if not isinstance(item, str) or not item.strip():
                raise PreferenceDataError(f"'ranking' entry {i} must be a non-empty string (an image path), got {_type_name(item)}")
    return kind


def expand_ranking(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A ranking record -> its k(k-1)/2 pair records (better-ranked is chosen), shared fields copied."""
    record = dict(record)
    if "ranking" not in record:
        raise PreferenceDataError("expand_ranking: the record has no 'ranking'")
    _check_record(record)
    ranking = record.pop("ranking")
    if len(set(ranking)) != len(ranking):
        dup = next(p for p in ranking if ranking.count(p) > 1)
        raise PreferenceDataError(f"'ranking' lists {dup!r} more than once")
    shared = {k: v for k, v in record.items() if v is not None}
    return [dict(shared, chosen=better, rejected=worse) for i, better in enumerate(ranking) for worse in ranking[i + 1 :]]


def _resolve(value: str | os.PathLike, base_dir: Path) -> Path:
    path = Path(value)
    if not path.is_absolute():
        path = base_dir / path
    return Path(os.path.normpath(path))


def _relative(path: Path, base_dir: str | Path | None) -> str:
    if base_dir is not None:
        base = Path(os.path.abspath(base_dir))
        absolute = Path(os.path.abspath(path))
        try:
            return absolute.relative_to(base).as_posix()
        except ValueError:
            return str(absolute)
    return str(path)


def _pair_from_record(record: Mapping[str, Any], base_dir: Path, origin: str | None) -> PreferencePair:
    paths = {k: (_resolve(record[k], base_dir) if record.get(k) is not None else None) for k in PATH_KEYS}
    return PreferencePair(
        chosen=paths["chosen"],
        rejected=paths["rejected"],
        lq=paths["lq"],
        gt=paths["gt"],
        caption=record.get("caption"),
        source=record.get("source"),
        annotator=record.get("annotator"),
        tie=bool(record.get("tie", False)),
        origin=origin,
    )


# ----------------------------------------------------------------------------------------------
# reading


def load_pairs(path: str | Path, check_files: bool = True) -> list[PreferencePair]:
    """Read a preference JSONL (pairs and rankings; blank lines ignored) into validated pairs.

    Errors (one line, 'FILE:LINE: problem'): invalid JSON, unknown keys, wrong types, missing
    chosen/rejected, self-pairs, the same unordered pair twice, missing image files (`check_files`).
    """
    path = Path(path)
    if not path.is_file():
        raise PreferenceDataError(f"{path}: no such file")
    base_dir = Path(os.path.abspath(path.parent))
    pairs: list[PreferencePair] = []
    seen: dict[frozenset[Path], tuple[int, PreferencePair]] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise PreferenceDataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise PreferenceDataError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
        try:
            kind = _check_record(record)
            records = expand_ranking(record) if kind == "ranking" else [record]
        except PreferenceDataError as err:
            raise PreferenceDataError(f"{where}: {err}") from None
        for rec in records:
            pair = _pair_from_record(rec, base_dir, where)
            if pair.chosen == pair.rejected:
                raise PreferenceDataError(f"{where}: self-pair: chosen and rejected are the same image ({rec['chosen']})")
            key = frozenset((pair.chosen, pair.rejected))
            if key in seen:
                first_line, first = seen[key]
                if first.tie != pair.tie or (not pair.tie and first.chosen != pair.chosen):
                    raise PreferenceDataError(
                        f"{where}: contradicting duplicate of the pair on line {first_line} "
                        f"({_verdict(first)} there, {_verdict(pair)} here)"
                    )
                raise PreferenceDataError(
                    f"{where}: duplicate pair ({rec['chosen']}, {rec['rejected']}), already on line {first_line}"
                )
            seen[key] = (lineno, pair)
            if check_files:
                for key_name in PATH_KEYS:
                    p = getattr(pair, key_name)
                    if p is not None and not p.is_file():
                        raise PreferenceDataError(f"{where}: {key_name} image not found: {p}")
            pairs.append(pair)
    return pairs


def _verdict(pair: PreferencePair) -> str:
    if pair.tie:
        return "a tie"
    return f"{pair.chosen.name} preferred"


# ----------------------------------------------------------------------------------------------
# writing


def _as_record(pair_or_dict: PreferencePair | Mapping[str, Any], base_dir: Path) -> dict[str, Any]:
    if isinstance(pair_or_dict, PreferencePair):
        return pair_or_dict.to_record(base_dir)
    if not isinstance(pair_or_dict, Mapping):
        raise PreferenceDataError(f"expected a PreferencePair or a dict, got {type(pair_or_dict).__name__}")
    record = {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in pair_or_dict.items()}
    kind = _check_record(record)
    if kind == "pair" and _resolve(record["chosen"], base_dir) == _resolve(record["rejected"], base_dir):
        raise PreferenceDataError(f"self-pair: chosen and rejected are the same image ({record['chosen']})")
    return record


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def append_pair(path: str | Path, pair_or_dict: PreferencePair | Mapping[str, Any]) -> None:
    """Append one line (a pair or ranking record) in a single write, then flush and fsync.

    A PreferencePair's paths are written relative to the file's folder when inside it. If an
    earlier crash left a torn last line, the new record still starts on a line of its own.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base_dir = Path(os.path.abspath(path.parent))
    try:
        record = _as_record(pair_or_dict, base_dir)
    except PreferenceDataError as err:
        raise PreferenceDataError(f"{path}: cannot append: {err}") from None
    append_jsonl(path, record)


def write_pairs(path: str | Path, pairs: Iterable[PreferencePair | Mapping[str, Any]]) -> None:
    """Write all records to `path` atomically (temp file, fsync, rename): readers see old or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base_dir = Path(os.path.abspath(path.parent))
    lines = []
    for i, pair in enumerate(pairs):
        try:
            lines.append(json.dumps(_as_record(pair, base_dir), ensure_ascii=False) + "\n")
        except PreferenceDataError as err:
            raise PreferenceDataError(f"{path}: record {i}: {err}") from None
    atomic_write_text(path, "".join(lines))
    _fsync_dir(base_dir)


# ----------------------------------------------------------------------------------------------
# held-out split


def split_pairs(
    pairs: Sequence[PreferencePair],
    held_out_fraction: float,
    seed: int = 0,
    by: str = "lq",
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, held_out), with about `held_out_fraction` of the pairs held out, whole groups at a time.

    by="lq": a group is all pairs of one LQ input (pairs without lq group by their chosen path), so
    an input is never on both sides; by="chosen": group by chosen path; by="none": single pairs.
    Deterministic in `seed`; both sides keep the input order; train is non-empty when there are
    at least two groups.
    """
    if not 0.0 <= held_out_fraction < 1.0:
        raise ValueError(f"split_pairs: held_out_fraction must be in [0, 1), got {held_out_fraction}")
    if by not in ("lq", "chosen", "none"):
        raise ValueError(f"split_pairs: by must be 'lq', 'chosen' or 'none', got {by!r}")
    groups: dict[str, list[int]] = {}
    for i, pair in enumerate(pairs):
        if by == "lq":
            key = f"lq:{pair.lq}" if pair.lq is not None else f"chosen:{pair.chosen}"
        elif by == "chosen":
            key = f"chosen:{pair.chosen}"
        else:
            key = f"pair:{i}"
        groups.setdefault(key, []).append(i)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    target = held_out_fraction * len(pairs)
    held: set[int] = set()
    for n_taken, key in enumerate(keys):
        if len(held) >= target or (n_taken == len(keys) - 1 and n_taken > 0):
            break
        held.update(groups[key])
    train = [p for i, p in enumerate(pairs) if i not in held]
    held_out = [p for i, p in enumerate(pairs) if i in held]
    return train, held_out
