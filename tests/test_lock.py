"""The install lock (requirements/): exact pins, no CUDA build, honest pyproject ranges, and its checker."""

from __future__ import annotations

import importlib.util
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCKS = sorted((ROOT / "requirements").glob("lock-py*.txt"))
LOWEST = sorted((ROOT / "requirements").glob("lowest-py*.txt"))
FORBIDDEN = ("nvidia-", "cuda-", "triton", "torchvision", "torchaudio")


def _check_lock():
    spec = importlib.util.spec_from_file_location("check_lock", ROOT / "scripts" / "check_lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_lock = _check_lock()


def _pins(path: Path) -> dict[str, str]:
    return check_lock.read_pins(path.read_text().splitlines(), str(path))


def _direct_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"]) + list(project["optional-dependencies"]["test"])
    return [Requirement(r) for r in reqs]


def test_a_lock_exists_for_the_python_ci_runs():
    assert ROOT / "requirements" / "lock-py3.11.txt" in LOCKS
    assert ROOT / "requirements" / "lowest-py3.11.txt" in LOWEST


@pytest.mark.parametrize("lock", LOCKS + LOWEST, ids=lambda p: p.name)
def test_lock_pins_every_package_and_takes_the_cpu_torch(lock):
    pins = _pins(lock)
    assert not [n for n in pins if n.startswith(FORBIDDEN)]
    assert pins["torch"] == "2.13.0+cpu"
    assert {"pip", "setuptools", "numpy", "diffusers", "pytest"} <= set(pins)


@pytest.mark.parametrize("lock", LOCKS + LOWEST, ids=lambda p: p.name)
def test_pyproject_ranges_admit_the_locked_versions(lock):
    pins = _pins(lock)
    for req in _direct_requirements():
        name = check_lock.canonical(req.name)
        assert name in pins, f"{req} is not in {lock.name}"
        assert req.specifier.contains(pins[name], prereleases=True), f"{lock.name}: {name}=={pins[name]} outside {req}"


@pytest.mark.parametrize("lock", LOWEST, ids=lambda p: p.name)
def test_lower_bounds_are_the_versions_the_lowest_lock_tests(lock):
    pins = _pins(lock)
    for req in _direct_requirements():
        floors = [Version(s.version) for s in req.specifier if s.operator in (">=", "==")]
        assert floors, f"pyproject.toml: {req} has no lower bound"
        tested = Version(Version(pins[check_lock.canonical(req.name)]).public)  # 2.13.0+cpu -> 2.13.0; "10" == "10.0.0"
        assert tested == max(floors), f"{req}: the lowest lock tests {tested}, not the stated floor"


def test_compare_names_every_difference():
    assert check_lock.compare({"a": "1", "b": "2"}, {"a": "1", "b": "2"}) == []
    diffs = check_lock.compare({"a": "1", "b": "2", "d": "4"}, {"a": "1", "b": "3", "c": "1"})
    assert diffs == ["b: locked 2, installed 3", "not in the lock: c==1", "missing: d==4"]


def test_read_pins_normalises_names_skips_comments_and_evaluates_markers():
    lines = ["# header", "Typing_Extensions==4.16.0", "    # via torch", "",
             "numpy==2.4.6 ; python_version >= '3'", "numpy==1.0 ; python_version < '3'"]
    assert check_lock.read_pins(lines, "x") == {"typing-extensions": "4.16.0", "numpy": "2.4.6"}
    with pytest.raises(ValueError, match=r"x:1: not an exact pin: 'torch>=2'"):
        check_lock.read_pins(["torch>=2"], "x")


def test_this_environment_equals_its_lock():
    """The suite runs on the tested set: scripts/setup.sh's venvs hold exactly their lock."""
    venvs = {ROOT / ".venv": "lock", ROOT / ".venv-lowest": "lowest"}
    kind = venvs.get(Path(sys.prefix).resolve())
    if kind is None:
        pytest.skip(f"not one of scripts/setup.sh's venvs ({sys.prefix})")
    lock = ROOT / "requirements" / f"{kind}-py{sys.version_info[0]}.{sys.version_info[1]}.txt"
    freeze = check_lock.installed_pins()
    assert check_lock.compare(_pins(lock), freeze) == []
