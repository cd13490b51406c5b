"""Restore aligned face images with a saved restorer: files in, PNGs out, bad files skipped by name."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm.auto import tqdm

from facereward.atomic import atomic_write_json
from facereward.data.imageio import ImageError, list_images, read_image, write_image
from facereward.models.ddim import Eta
from facereward.models.restorer import Restorer, SamplerOptions
from facereward.models.seeded import restore_batch


@dataclass
class RestoreReport:
    written: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (file, one-line reason)


def collect_inputs(path: str | Path) -> list[Path]:
    """One image file, or every image in a folder (sorted); a clear error when there is nothing."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = list_images(path)
        if not files:
            raise FileNotFoundError(f"{path}: no images (png, jpg, jpeg, webp, bmp)")
        return files
    raise FileNotFoundError(f"{path}: no such file or folder")


def _load(path: Path, size: int, convert: bool, resize: bool) -> np.ndarray:
    if not resize:
        return read_image(path, size=size, convert=convert)
    image = read_image(path, convert=convert)
    if image.shape[:2] != (size, size):
        interp = cv2.INTER_AREA if image.shape[0] > size else cv2.INTER_CUBIC
        image = np.clip(cv2.resize(image, (size, size), interpolation=interp), 0, 1)
    return image


def restore_files(
    restorer: Restorer,
    inputs: list[Path],
    out_dir: Path,
    steps: int = 50,
    eta: Eta | None = None,
    seed: int = 0,
    batch_size: int = 8,
    convert: bool = False,
    resize: bool = False,
    save_stage1: bool = False,
    progress: bool = True,
    sampler: SamplerOptions | None = None,
) -> RestoreReport:
    """Restore each input to OUT/NAME.png (and OUT/stage1/NAME.png); unreadable inputs are skipped and reported.

    OUT/restore.json records the sampling settings used (steps, eta, seed, spacing, final alpha-bar, colour fix)."""
    report = RestoreReport()
    size = restorer.config.size
    device = restorer.device
    out_dir = Path(out_dir)
    good: list[tuple[int, Path, np.ndarray]] = []
    for i, path in enumerate(inputs):
        try:
            good.append((i, path, _load(path, size, convert, resize)))
        except ImageError as err:
            report.skipped.append((path, str(err)))
    bar = tqdm(total=len(good), desc="restore", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(good), batch_size):
        chunk = good[start : start + batch_size]
        lq = torch.from_numpy(np.stack([img for _, _, img in chunk]).transpose(0, 3, 1, 2).copy()).to(device)
        out = restore_batch(restorer, lq, [i for i, _, _ in chunk], steps=steps, eta=eta, seed=seed, sampler=sampler)
        restored = out["restored"].permute(0, 2, 3, 1).cpu().numpy()
        clean = out["clean"].permute(0, 2, 3, 1).cpu().numpy()
        for j, (_, path, _) in enumerate(chunk):
            target = out_dir / f"{path.stem}.png"
            write_image(target, restored[j])
            if save_stage1:
                write_image(out_dir / "stage1" / f"{path.stem}.png", clean[j])
            report.written.append(target)
        bar.update(len(chunk))
    bar.close()
    if report.written:
        settings = {"steps": steps, "eta": restorer.config.eta if eta is None else eta, "seed": seed,
                    **(sampler or SamplerOptions()).resolved(restorer), "written": len(report.written)}
        atomic_write_json(out_dir / "restore.json", settings)
    return report
