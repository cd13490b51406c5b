"""Files written atomically get the permissions any file of the process gets (the umask), not mkstemp's 0600."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from facereward.atomic import atomic_path, atomic_write_json, atomic_write_text
from facereward.data.imageio import write_image


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_writes_follow_the_umask(tmp_path, umask):
    atomic_write_text(tmp_path / "report.html", "<html></html>")
    atomic_write_json(tmp_path / "results.json", {"a": 1})
    write_image(tmp_path / "grid.png", np.zeros((4, 4, 3), dtype=np.float32))
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    for name in ("report.html", "results.json", "grid.png"):
        assert _mode(tmp_path / name) == _mode(plain) == 0o644, name
    os.umask(0o077)
    atomic_write_text(tmp_path / "private.txt", "x")
    assert _mode(tmp_path / "private.txt") == 0o600


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "a.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert (tmp_path / "a.txt").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]
