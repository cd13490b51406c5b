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


def default_onestep_path() -> Path:
    """The shipped 64 px pixel-mode toy one-step restorer (trained by scripts/train_toy_onestep.py)."""
    path = WEIGHTS_DIR / "toy-onestep"
    if not (path / "facereward.json").is_file():
        raise FileNotFoundError(f"{path}: the shipped toy one-step restorer is missing; retrain it with scripts/train_toy_onestep.py")
    return path


def default_frm_path() -> Path:
    """The shipped toy Face Reward Model (trained by scripts/toy_frm_experiment.py)."""
    path = WEIGHTS_DIR / "toy-frm"
    if not (path / "frm.json").is_file():
        raise FileNotFoundError(f"{path}: the shipped toy FRM is missing; retrain it with scripts/toy_frm_experiment.py")
    return path


def frm_path_or_default(path: str | None, init_from: str | None, option: str = "rewards.options.frm.path") -> str:
    """The FRM folder a trainer scores with: `path`, or the shipped toy FRM when the restorer is the shipped toy one
    (`init_from` None); with your own restorer and no path, a one-line error naming `option`."""
    if path:
        return str(path)
    if init_from:
        raise ValueError(f"{option}: no Face Reward Model for your restorer: set --frm PATH ({option}); "
                         "the shipped toy FRM only pairs with the shipped toy restorer")
    return str(default_frm_path())
