"""Candidate restorations for preference annotation (docs/methods.md 1.1): k restorations per LQ input.

`make_candidates` writes, for a paired test set (ROOT/lq, optional ROOT/hq):

    OUT/candidates.json   {"items": [{"name", "lq", "gt" (or null), "caption",
                                      "candidates": [{"path", "model", "seed", "eta", "steps"}, ...]}],
                           "testset", "k", "models"}
    OUT/lq/NAME.png, OUT/gt/NAME.png (when the test set has hq/), OUT/candidates/NAME/cXX.png

Paths in candidates.json are relative to OUT. Candidate j of every input uses model
``names[j % n_models]``, eta ``etas[j % len(etas)]`` and seed ``seed + j``; the initial noise of
input i is drawn from its own (seed + j, i) generator (`inference.initial_noise`), so the output
is deterministic given `seed` and `batch_size`. Optional extra candidates: the LQ input (model "lq"),
the GT (model "gt"), and GT degraded at fixed strengths (model "lq@S"); these have seed/eta/steps null.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from facereward.atomic import atomic_write_json
from facereward.data.datasets import PairedFolderDataset
from facereward.data.degradation import degrade
from facereward.data.imageio import read_image, write_image
from facereward.data.toyfaces import TOY_MARKER, is_toy_folder
from facereward.models.families import load_restorer
from facereward.models.seeded import restore_batch
from facereward.models.restorer import ModelFolderError, SamplerOptions

__all__ = ["CANDIDATES_FILE", "CandidateItem", "load_candidates", "make_candidates"]

CANDIDATES_FILE = "candidates.json"


@dataclass
class CandidateItem:
    """One LQ input of a candidates folder, with absolute paths (gt is None without a GT)."""

    name: str
    lq: Path
    gt: Path | None
    caption: str
    candidates: list[dict[str, Any]] = field(default_factory=list)  # entries as in the JSON, plus "abspath"

    @property
    def paths(self) -> list[Path]:
        return [c["abspath"] for c in self.candidates]


def load_candidates(candidates_dir: str | Path) -> list[CandidateItem]:
    """Read OUT/candidates.json into items with absolute paths; clear errors for a missing/invalid folder."""
    root = Path(candidates_dir)
    meta = root / CANDIDATES_FILE
    if not meta.is_file():
        raise FileNotFoundError(f"{root}: not a candidates folder (no {CANDIDATES_FILE}; make one with make_candidates)")
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
        items = []
        for raw in data["items"]:
            cands = [dict(c, abspath=root / c["path"]) for c in raw["candidates"]]
            items.append(CandidateItem(str(raw["name"]), root / raw["lq"], root / raw["gt"] if raw.get("gt") else None,
                                       str(raw.get("caption") or ""), cands))
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{meta}: unreadable candidates file ({err.__class__.__name__}: {err})") from None
    return items




def _check_models(models: Mapping[str, str | Path]) -> dict[str, Path]:
    if not models:
        raise ValueError("make_candidates: no models given (models={name: restorer folder})")
    out = {}
    for name, folder in models.items():
        if name in ("lq", "gt") or name.startswith("lq@"):
            raise ValueError(f"make_candidates: model name {name!r} is reserved for the extra LQ/GT candidates")
        folder = Path(folder)
        if not (folder / "facereward.json").is_file():
            raise ModelFolderError(f"{folder}: model {name!r} is not a facereward restorer folder (no facereward.json)")
        out[str(name)] = folder
    return out


def _strength_label(s: float) -> str:
    return f"lq@{s:g}"


def make_candidates(
    testset_dir: str | Path,
    out_dir: str | Path,
    models: Mapping[str, str | Path],
    k: int = 4,
    etas: Sequence[float] = (0.0, 0.5, 1.0),
    steps: int = 50,
    seed: int = 0,
    include_lq: bool = False,
    include_gt: bool = False,
    batch_size: int = 8,
    progress: bool = True,
    degraded_strengths: Sequence[float] = (),
    preset: str = "diffbir",
    device: str | torch.device | None = None,
    sampler: SamplerOptions | None = None,
) -> Path:
    """Write k restorations per LQ input of `testset_dir` (plus optional LQ/GT/degraded-GT candidates) to OUT.

    Returns OUT. `degraded_strengths` adds degrade(gt, preset, strength=s) per s (needs hq/).
    A rerun into the same OUT replaces its lq/, gt/, candidates/ and candidates.json.
    """
    testset_dir, out_dir = Path(testset_dir), Path(out_dir)
    if not testset_dir.is_dir():
        raise FileNotFoundError(f"{testset_dir}: no such test set folder (expected ROOT/lq and, optionally, ROOT/hq)")
    if k < 0 or int(k) != k:
        raise ValueError(f"make_candidates: k must be a non-negative integer, got {k!r}")
    if k > 0 and not etas:
        raise ValueError("make_candidates: etas is empty")
    if steps < 1:
        raise ValueError(f"make_candidates: steps must be >= 1, got {steps}")
    if batch_size < 1:
        raise ValueError(f"make_candidates: batch_size must be >= 1, got {batch_size}")
    for s in degraded_strengths:
        if not 0.0 <= float(s) <= 1.0:
            raise ValueError(f"make_candidates: degraded strengths must be in [0, 1], got {s}")
    model_dirs = _check_models(models) if k > 0 else {str(n): Path(p) for n, p in models.items()}
    names = list(model_dirs)
    if k > 0 and not names:
        raise ValueError("make_candidates: k > 0 needs at least one model")

    if out_dir.resolve() == testset_dir.resolve():
        raise ValueError(f"make_candidates: the output folder must differ from the test set folder ({testset_dir})")
    probe = PairedFolderDataset(testset_dir)
    if k > 0:
        h, w = read_image(probe.lq_files[0]).shape[:2]
        for name, folder in model_dirs.items():
            size = int(json.loads((folder / "facereward.json").read_text())["config"]["size"])
            if (h, w) != (size, size):
                raise ValueError(f"{probe.lq_files[0]}: size {w}x{h}, but model {name!r} ({folder}) restores {size}x{size} images")
    if (include_gt or degraded_strengths) and not probe.has_hq:
        raise FileNotFoundError(f"{testset_dir}: include_gt / degraded_strengths need ground truth, but there is no hq/ folder")
    n_extra = int(include_lq) + int(include_gt) + len(degraded_strengths)
    if k + n_extra == 0:
        raise ValueError("make_candidates: nothing to write (k=0 and no extra candidates)")

    # A rerun replaces the previous layout instead of mixing with it.
    out_dir.mkdir(parents=True, exist_ok=True)
    for sub in ("lq", "gt", "candidates"):
        if (out_dir / sub).exists():
            shutil.rmtree(out_dir / sub)
    if (out_dir / CANDIDATES_FILE).exists():
        (out_dir / CANDIDATES_FILE).unlink()

    # Inputs: copy LQ (and GT) into OUT, read the caption, remember the image size.
    items: list[dict[str, Any]] = []
    for i in range(len(probe)):
        lq_src = probe.lq_files[i]
        name = lq_src.stem
        lq = read_image(lq_src)
        write_image(out_dir / "lq" / f"{name}.png", lq)
        item: dict[str, Any] = {"name": name, "lq": f"lq/{name}.png", "gt": None, "caption": "", "candidates": []}
        if probe.has_hq:
            gt = read_image(probe.hq_files[i])
            write_image(out_dir / "gt" / f"{name}.png", gt)
            item["gt"] = f"gt/{name}.png"
        item["caption"] = probe[i]["caption"]
        items.append(item)

    plan = [{"model": names[j % len(names)], "seed": int(seed) + j, "eta": float(etas[j % len(etas)]), "steps": int(steps)}
            for j in range(k)]
    width = max(2, len(str(max(k + n_extra - 1, 0))))
    for item in items:
        item["candidates"] = [dict(p, path=f"candidates/{item['name']}/c{j:0{width}d}.png") for j, p in enumerate(plan)]

    if k > 0:
        dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        bar = tqdm(total=k * len(items), desc="candidates", disable=not progress, dynamic_ncols=True)
        for model_name in names:
            js = [j for j, p in enumerate(plan) if p["model"] == model_name]
            if not js:
                continue
            restorer = load_restorer(model_dirs[model_name]).to(dev)
            settings = (sampler or SamplerOptions()).resolved(restorer)
            for item in items:
                for j in js:
                    item["candidates"][j].update(settings)
            data = PairedFolderDataset(testset_dir, size=restorer.config.size)
            for j in js:
                for start in range(0, len(data), batch_size):
                    idx = list(range(start, min(start + batch_size, len(data))))
                    lq = torch.stack([data[i]["lq"] for i in idx]).to(dev)
                    out = restore_batch(restorer, lq, idx, steps=steps, eta=plan[j]["eta"], seed=plan[j]["seed"], sampler=sampler)
                    restored = out["restored"].permute(0, 2, 3, 1).float().cpu().numpy()
                    for b, i in enumerate(idx):
                        write_image(out_dir / items[i]["candidates"][j]["path"], restored[b])
                    bar.update(len(idx))
            del restorer
        bar.close()

    # Extra candidates: LQ input, GT, GT degraded at fixed strengths (index = input position).
    extras: list[tuple[str, float | None]] = []
    if include_lq:
        extras.append(("lq", None))
    extras += [(_strength_label(float(s)), float(s)) for s in degraded_strengths]
    if include_gt:
        extras.append(("gt", None))
    for i, item in enumerate(items):
        for e, (label, strength) in enumerate(extras):
            rel = f"candidates/{item['name']}/c{k + e:0{width}d}.png"
            (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            if label in ("lq", "gt"):
                shutil.copyfile(out_dir / item[label], out_dir / rel)
            else:
                gt = read_image(out_dir / item["gt"])
                write_image(out_dir / rel, degrade(gt, preset, seed=seed, index=i, strength=strength)[0])
            item["candidates"].append({"path": rel, "model": label, "seed": None, "eta": None, "steps": None})

    if is_toy_folder(testset_dir):
        shutil.copyfile(testset_dir / TOY_MARKER, out_dir / TOY_MARKER)
    atomic_write_json(out_dir / CANDIDATES_FILE, {
        "items": items,
        "testset": str(testset_dir.resolve()),
        "k": int(k),
        "models": {n: str(p.resolve()) for n, p in model_dirs.items()},
    })
    return out_dir
