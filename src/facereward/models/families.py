"""The two restorer families behind one interface (docs/methods.md 0.1), and the loader that picks a folder's.

What restore, evaluate, candidates, photos and the trainers need from a restorer:

- `config.size`, `family` ("multi-step" or "one-step"), `device`, `to(...)`, `save_pretrained` / `from_pretrained`;
- `restore(lq, steps, eta, generator, x_T, net, sampler) -> {"clean", "restored"}` on [0, 1] batches;
- `latent_shape(b, h, w)` and `stage2_trainable()`: the network a trainer updates;
- ReFL's differentiable forward: the multi-step family's `predict_eps` inside a DDIM rollout, the one-step
  family's `forward_with_residuals(lq, net)`;
- LRPO's, NFT's and DPO's stochastic multi-step policy (`predict_eps`, `schedule`, `condition`): multi-step only.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from facereward.models.onestep import FAMILY as ONE_STEP
from facereward.models.onestep import OneStepRestorer
from facereward.models.restorer import ModelFolderError, Restorer

MULTI_STEP = "multi-step"
AnyRestorer = Restorer | OneStepRestorer


def family_of(folder: str | Path) -> str:
    """The family a restorer folder's facereward.json names ("multi-step" when it names none)."""
    meta = Path(folder) / "facereward.json"
    if not meta.is_file():
        raise ModelFolderError(f"{folder}: not a facereward restorer folder (no facereward.json)"
                               if Path(folder).is_dir() else f"{folder}: no such model folder (restorers load from a local path only)")
    try:
        return json.loads(meta.read_text()).get("family", MULTI_STEP)
    except (json.JSONDecodeError, AttributeError) as err:
        raise ModelFolderError(f"{meta}: unreadable restorer config ({err})") from None


def load_restorer(folder: str | Path, torch_dtype: torch.dtype | None = None) -> AnyRestorer:
    """A restorer of either family from its folder (local paths only)."""
    family = family_of(folder)
    if family == ONE_STEP:
        return OneStepRestorer.from_pretrained(folder, torch_dtype)
    if family == MULTI_STEP:
        return Restorer.from_pretrained(folder, torch_dtype)
    raise ModelFolderError(f"{folder}: unknown restorer family {family!r} (known: {MULTI_STEP}, {ONE_STEP})")


def require_multi_step(folder: str | Path, command: str, hint: str = "") -> None:
    """A one-line error when `command` (LRPO, NFT, DPO: a stochastic multi-step policy) is given a one-step restorer."""
    if family_of(folder) == ONE_STEP:
        raise ValueError(hint or (f"{folder}: a one-step restorer has no multi-step trajectory for {command} to sample, "
                                  "score and reweight (it makes one deterministic call); post-train it with "
                                  f"`facereward refl --init-from {folder}`, which backpropagates the reward through its single step"))


__all__ = ["MULTI_STEP", "ONE_STEP", "AnyRestorer", "family_of", "load_restorer", "require_multi_step"]
