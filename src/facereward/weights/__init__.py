"""Small models shipped inside the package (trained by the scripts in scripts/)."""

from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent


def default_restorer_path() -> Path:
    """The shipped 64 px pixel-mode toy restorer (trained by scripts/train_toy_restorer.sh)."""
    path = WEIGHTS_DIR / "toy-restorer"
    if not (path / "facereward.json").is_file():
        raise FileNotFoundError(f"{path}: the shipped toy restorer is missing; retrain it with scripts/train_toy_restorer.sh")
    return path


def default_frm_path() -> Path:
    """The shipped toy Face Reward Model (trained by scripts/toy_frm_experiment.py)."""
    path = WEIGHTS_DIR / "toy-frm"
    if not (path / "frm.json").is_file():
        raise FileNotFoundError(f"{path}: the shipped toy FRM is missing; retrain it with scripts/toy_frm_experiment.py")
    return path
