"""Preference JSONL: loading, validation messages (FILE:LINE: problem), rankings, writing, splitting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from facereward.data.preferences import (
    PreferenceDataError,
    PreferencePair,
    append_pair,
    expand_ranking,
    load_pairs,
    split_pairs,
    write_pairs,
)


def _touch(folder: Path, *names: str) -> None:
    for name in names:
        p = folder / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"not really a png")


def _write(path: Path, *lines: object) -> Path:
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines), encoding="utf-8")
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    _touch(tmp_path, "a.png", "b.png", "c.png", "d.png", "lq/x.png", "gt/x.png")
    return tmp_path


def test_load_resolves_relative_and_absolute_paths(folder: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "other"
    _touch(elsewhere, "e.png")
    f = _write(
        folder / "prefs.jsonl",
        {"chosen": "a.png", "rejected": "./sub/../b.png", "lq": "lq/x.png", "gt": "gt/x.png", "caption": "a face",
         "source": "human", "annotator": "ann1"},
        "",
        {"chosen": str(elsewhere / "e.png"), "rejected": "c.png", "tie": True},
    )
    pairs = load_pairs(f)
    assert len(pairs) == 2
    p, q = pairs
    assert p.chosen == folder / "a.png" and p.rejected == folder / "b.png"
    assert p.chosen.is_absolute() and p.lq == folder / "lq" / "x.png" and p.gt == folder / "gt" / "x.png"
    assert (p.caption, p.source, p.annotator, p.tie) == ("a face", "human", "ann1", False)
    assert q.chosen == elsewhere / "e.png" and q.rejected == folder / "c.png" and q.tie is True
    assert q.lq is None and q.caption is None
    assert p.origin == f"{f}:1" and q.origin == f"{f}:3"


def test_paths_are_relative_to_the_jsonl_folder_not_the_cwd(folder: Path, tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    f = _write(folder / "prefs.jsonl", {"chosen": "a.png", "rejected": "b.png"})
    (pair,) = load_pairs(Path(os.path.relpath(f)))
    assert pair.chosen == folder / "a.png"


def test_ranking_expands_to_all_pairs_best_first(folder: Path) -> None:
    record = {"ranking": ["a.png", "b.png", "c.png"], "lq": "lq/x.png", "source": "oracle"}
    pairs = expand_ranking(record)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("a.png", "b.png"), ("a.png", "c.png"), ("b.png", "c.png")]
    assert all(p["lq"] == "lq/x.png" and p["source"] == "oracle" and "ranking" not in p for p in pairs)

    f = _write(folder / "r.jsonl", record, {"chosen": "d.png", "rejected": "a.png"})
    loaded = load_pairs(f)
    assert [(p.chosen.name, p.rejected.name) for p in loaded] == [("a.png", "b.png"), ("a.png", "c.png"), ("b.png", "c.png"), ("d.png", "a.png")]
    assert all(p.origin == f"{f}:1" for p in loaded[:3]) and loaded[0].lq == folder / "lq" / "x.png"


@pytest.mark.parametrize(
    "line, problem",
    [
        ('{"chosen": "a.png", "rejected": ', "invalid JSON"),
        ('["a.png", "b.png"]', "expected a JSON object, got list"),
        ({"rejected": "b.png"}, "missing 'chosen'"),
        ({"chosen": "a.png"}, "missing 'rejected'"),
        ({"chosen": "a.png", "rejected": "b.png", "winner": "a", "note": 1}, "unknown key(s) 'winner', 'note'"),
        ({"ranking": ["a.png", "b.png"], "chosen": "a.png"}, "unknown key(s) 'chosen' in a ranking line"),
        ({"chosen": 3, "rejected": "b.png"}, "'chosen' must be a non-empty string (an image path), got number"),
        ({"chosen": "a.png", "rejected": "b.png", "tie": "yes"}, "'tie' must be true or false, got string"),
        ({"chosen": "a.png", "rejected": "b.png", "caption": ["x"]}, "'caption' must be a string, got list"),
        ({"ranking": "a.png"}, "'ranking' must be a list of image paths"),
        ({"ranking": ["a.png"]}, "'ranking' needs at least 2 images"),
        ({"ranking": ["a.png", "b.png", "a.png"]}, "'ranking' lists 'a.png' more than once"),
        ({"chosen": "a.png", "rejected": "./a.png"}, "self-pair"),
        ({"chosen": "a.png", "rejected": "missing.png"}, "rejected image not found"),
        ({"chosen": "a.png", "rejected": "b.png", "lq": "lq/nope.png"}, "lq image not found"),
    ],
)
def test_errors_name_file_line_and_problem(folder: Path, line: object, problem: str) -> None:
    f = _write(folder / "bad.jsonl", {"chosen": "c.png", "rejected": "d.png"}, line)
    with pytest.raises(PreferenceDataError) as info:
        load_pairs(f)
    message = str(info.value)
    assert message.startswith(f"{f}:2: "), message
    assert problem in message
    assert "\n" not in message


def test_duplicate_and_contradicting_duplicate_pairs(folder: Path) -> None:
    f = _write(folder / "dup.jsonl", {"chosen": "a.png", "rejected": "b.png"}, {"chosen": "c.png", "rejected": "d.png"},
               {"chosen": "a.png", "rejected": "b.png", "source": "human"})
    with pytest.raises(PreferenceDataError, match=r"dup\.jsonl:3: duplicate pair \(a\.png, b\.png\), already on line 1"):
        load_pairs(f)
    f = _write(folder / "contra.jsonl", {"chosen": "a.png", "rejected": "b.png"}, {"chosen": "b.png", "rejected": "a.png"})
    with pytest.raises(PreferenceDataError, match=r"contra\.jsonl:2: contradicting duplicate of the pair on line 1"):
        load_pairs(f)
    f = _write(folder / "tie.jsonl", {"chosen": "a.png", "rejected": "b.png"}, {"chosen": "b.png", "rejected": "a.png", "tie": True})
    with pytest.raises(PreferenceDataError, match=r"tie\.jsonl:2: contradicting duplicate .*a tie here"):
        load_pairs(f)
    # a ranking that re-states an existing pair is a duplicate too
    f = _write(folder / "rank.jsonl", {"chosen": "c.png", "rejected": "a.png"}, {"ranking": ["a.png", "b.png", "c.png"]})
    with pytest.raises(PreferenceDataError, match=r"rank\.jsonl:2: contradicting duplicate"):
        load_pairs(f)


def test_check_files_false_skips_the_existence_check(tmp_path: Path) -> None:
    f = _write(tmp_path / "p.jsonl", {"chosen": "nope1.png", "rejected": "nope2.png"})
    with pytest.raises(PreferenceDataError, match="chosen image not found"):
        load_pairs(f)
    assert len(load_pairs(f, check_files=False)) == 1


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PreferenceDataError, match=r"nothere\.jsonl: no such file"):
        load_pairs(tmp_path / "nothere.jsonl")


def test_write_and_append_round_trip_with_relative_paths(folder: Path, tmp_path: Path) -> None:
    out = folder / "out.jsonl"
    outside = tmp_path.parent / f"{tmp_path.name}-outside.png"
    pairs = [
        PreferencePair(chosen=folder / "a.png", rejected=folder / "b.png", lq=folder / "lq/x.png", source="human", annotator="z"),
        PreferencePair(chosen=folder / "c.png", rejected=outside, tie=True),
    ]
    write_pairs(out, pairs)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert lines[0] == {"chosen": "a.png", "rejected": "b.png", "lq": "lq/x.png", "source": "human", "annotator": "z"}
    assert lines[1] == {"chosen": "c.png", "rejected": str(outside), "tie": True}
    append_pair(out, {"chosen": "d.png", "rejected": "a.png", "source": "auto-svm"})
    append_pair(out, {"ranking": ["b.png", "c.png"]})
    loaded = load_pairs(out, check_files=False)
    assert [p for p in loaded[:2]] == pairs
    assert (loaded[2].chosen, loaded[2].source) == (folder / "d.png", "auto-svm")
    assert (loaded[3].chosen, loaded[3].rejected) == (folder / "b.png", folder / "c.png")
    assert not [p for p in folder.iterdir() if p.name.startswith(".out.jsonl")], "write_pairs left a temp file"


def test_append_validates_the_record(tmp_path: Path) -> None:
    f = tmp_path / "p.jsonl"
    with pytest.raises(PreferenceDataError, match=r"p\.jsonl: cannot append: unknown key\(s\) 'bogus'"):
        append_pair(f, {"chosen": "a.png", "rejected": "b.png", "bogus": 1})
    with pytest.raises(PreferenceDataError, match="self-pair"):
        append_pair(f, {"chosen": "a.png", "rejected": "a.png"})
    assert not f.exists()


_WRITER = r"""
import sys
from facereward.data.preferences import append_pair
path = sys.argv[1]
i = 0
while True:
    append_pair(path, {"chosen": f"img{i:06d}_a.png", "rejected": f"img{i:06d}_b.png", "caption": "x" * 300})
    print(i, flush=True)
    i += 1
"""


def test_append_pair_survives_a_crash(tmp_path: Path) -> None:
    """SIGKILL a writer mid-stream: every acknowledged pair is on disk and every line is whole."""
    f = tmp_path / "labels.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(f)], stdout=subprocess.PIPE, text=True)
    acknowledged = -1
    deadline = time.monotonic() + 30
    try:
        while acknowledged < 40 and time.monotonic() < deadline:
            acknowledged = int(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()
    assert acknowledged >= 40
    raw = f.read_bytes()
    assert raw.endswith(b"\n")
    lines = raw.decode().splitlines()
    assert len(lines) >= acknowledged + 1  # nothing acknowledged was lost
    pairs = load_pairs(f, check_files=False)  # every line parses
    assert [p.chosen.name for p in pairs] == [f"img{i:06d}_a.png" for i in range(len(pairs))]

    # a torn last line (power loss mid-write): the next append still starts on its own line
    f.write_bytes(raw + b'{"chosen": "torn')
    append_pair(f, {"chosen": "new_a.png", "rejected": "new_b.png"})
    lines = f.read_text().splitlines()
    assert lines[-2] == '{"chosen": "torn' and json.loads(lines[-1]) == {"chosen": "new_a.png", "rejected": "new_b.png"}
    with pytest.raises(PreferenceDataError, match=rf"{f.name}:{len(lines) - 1}: invalid JSON"):
        load_pairs(f, check_files=False)


def _pairs_for_split(n_lq: int = 10, per_lq: int = 3) -> list[PreferencePair]:
    pairs = []
    for i in range(n_lq):
        for j in range(per_lq):
            pairs.append(PreferencePair(chosen=Path(f"/c/{i}/{j}a.png"), rejected=Path(f"/c/{i}/{j}b.png"), lq=Path(f"/lq/{i}.png")))
    for j in range(6):  # no lq: grouped by chosen path
        pairs.append(PreferencePair(chosen=Path(f"/gt/{j % 2}.png"), rejected=Path(f"/r/{j}.png")))
    return pairs


def test_split_pairs_keeps_each_lq_on_one_side() -> None:
    pairs = _pairs_for_split()
    train, held = split_pairs(pairs, 0.3, seed=1)
    assert len(train) + len(held) == len(pairs) and held and train
    assert 0.2 * len(pairs) <= len(held) <= 0.45 * len(pairs)

    def keys(side):
        return {str(p.lq) if p.lq else f"chosen:{p.chosen}" for p in side}

    assert not keys(train) & keys(held)
    assert [p for p in pairs if p in train] == train  # input order kept
    assert split_pairs(pairs, 0.3, seed=1) == (train, held)  # deterministic
    assert [split_pairs(pairs, 0.3, seed=s)[1] for s in range(5)] != [held] * 5  # the seed matters
    assert split_pairs(pairs, 0.0, seed=0) == (pairs, [])
    # by="none" may cut an lq group in two; by="lq" never does (across many seeds)
    for s in range(20):
        tr, he = split_pairs(pairs, 0.5, seed=s)
        assert not keys(tr) & keys(he)
    with pytest.raises(ValueError, match="held_out_fraction"):
        split_pairs(pairs, 1.0)


def test_split_pairs_leaves_train_non_empty() -> None:
    pairs = _pairs_for_split(n_lq=2, per_lq=2)[:4]
    train, held = split_pairs(pairs, 0.9, seed=0)
    assert train and held
