"""Read a state dict from a local checkpoint file without unpickling code: one reader for every converter.

`.safetensors` through safetensors; anything else through `torch.load(weights_only=True)`, memory-mapped when the
file is a zip checkpoint so that converting a multi-GB file does not hold a second copy in RAM. Every failure is
one `CheckpointError` line naming the file.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

_WRAPPERS = ("state_dict", "model", "params_ema", "params")


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable, unsafe to unpickle or not a state dict; one line naming it."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else err.__class__.__name__


def load_file_safely(path: str | Path, what: str = "checkpoint") -> Any:
    """What a local weight file holds: safetensors, or torch.load(weights_only=True) (memory-mapped when it can be);
    a missing, empty, truncated or pickle-unsafe file is a one-line CheckpointError naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such {what} file (weights load from a local path only)")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file, not a {what}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(path)
        else:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:
                if "mmap" not in str(err) and "zip" not in str(err).lower():
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)  # a legacy (non-zip) file cannot be mapped
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err):
            raise CheckpointError(f"{path}: unreadable {what}, truncated or not a checkpoint (not a torch file)") from None
        found = re.search(r"GLOBAL (\S+)", str(err))
        name = found.group(1) if found else "a Python object"
        raise CheckpointError(f"{path}: refused by torch.load(weights_only=True), it holds {name} besides tensors; "
                              "convert it to safetensors where you trust it") from None
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file fails in many ways; each is one line
        raise CheckpointError(f"{path}: unreadable {what}, truncated or not a checkpoint ({_first_line(err)})") from None
    return obj


def read_state_dict(path: str | Path, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The tensors of `path` (unwrapped from "state_dict"/"model"/"params_ema"/"params", "module." stripped)."""
    path = Path(path)
    obj = load_file_safely(path, what)
    if isinstance(obj, dict):
        for wrapper in _WRAPPERS:
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict (expected a mapping of tensor names to tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}
