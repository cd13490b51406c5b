"""Fixed, seeded synthetic test sets (CelebA-Test style) written to disk.

Layout: OUT/hq/NAME.png, OUT/lq/NAME.png, caption sidecars NAME.txt beside both, and
OUT/manifest.json = {"preset", "seed", "images": [{"name", "index", "source", "params"}], "skipped"}.
When the HQ folder carries the toy marker (`facereward.data.toyfaces.TOY_MARKER`), OUT/ gets it too.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from facereward.atomic import atomic_write_json

from .datasets import _image_files
from .degradation import DegradationFn, DegradationPreset, degrade
from .imageio import ImageError, read_image, write_image
from .toyfaces import (
    TOY_MARKER,
    TOY_WORLD_IDENTITIES,
    TOY_WORLD_SEED,
    ToyFaceWorld,
    read_toy_marker,
    write_toy_marker,
)

__all__ = ["write_degraded_testset", "write_toy_testset"]


def _preset_name(preset: str | DegradationPreset | DegradationFn) -> str:
    if isinstance(preset, str):
        return preset
    return getattr(preset, "name", getattr(preset, "__name__", type(preset).__name__))




def write_degraded_testset(
    hq_dir: str | Path,
    out_dir: str | Path,
    preset: str | DegradationPreset | DegradationFn = "diffbir",
    seed: int = 0,
    size: int | tuple[int, int] | None = None,
    progress: bool = True,
    convert: bool = False,
) -> list[dict[str, Any]]:
    """Degrade every image of `hq_dir` once (index = position in name order) and write the set.

    Returns the manifest entries of the images written. Bad files are skipped with a warning naming
    them (and listed under "skipped" in the manifest); raises if no image could be written.
    Same inputs, same bytes: rerunning gives identical LQ files. The toy marker of `hq_dir`, if any, is
    copied to `out_dir` with "preset" and "degradation_seed" added (so the set gets the toy judges); a
    marker left in `out_dir` by an earlier run from toy faces is removed when `hq_dir` has none.
    """
    hq_dir, out_dir = Path(hq_dir), Path(out_dir)
    files = _image_files(hq_dir)
    (out_dir / "hq").mkdir(parents=True, exist_ok=True)
    (out_dir / "lq").mkdir(parents=True, exist_ok=True)

    entries: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    for index, path in enumerate(tqdm(files, desc=f"degrading ({_preset_name(preset)})", disable=not progress)):
        name = path.stem
        try:
            hq = read_image(path, size=size, convert=convert)
        except ImageError as err:
            warnings.warn(str(err), stacklevel=2)
            skipped.append({"name": path.name, "error": str(err)})
            continue
        lq, params = degrade(hq, preset, seed=seed, index=index)
        write_image(out_dir / "hq" / f"{name}.png", hq)
        write_image(out_dir / "lq" / f"{name}.png", lq)
        caption = path.with_suffix(".txt")
        if caption.is_file():
            for sub in ("hq", "lq"):
                shutil.copyfile(caption, out_dir / sub / f"{name}.txt")
        entries.append({"name": name, "index": index, "source": path.name, "params": params})

    if not entries:
        first = skipped[0]["error"] if skipped else "no images"
        raise ImageError(f"{hq_dir}: none of {len(files)} images could be read (first: {first})")
    manifest = {"preset": _preset_name(preset), "seed": seed, "images": entries, "skipped": skipped}
    atomic_write_json(out_dir / "manifest.json", manifest)
    _carry_toy_marker(hq_dir, out_dir, _preset_name(preset), seed)
    return entries


def _carry_toy_marker(hq_dir: Path, out_dir: Path, preset: str, seed: int) -> None:
    """Copy the toy marker from `hq_dir` to `out_dir` (adding how it was degraded), or clear a stale one."""
    info = read_toy_marker(hq_dir)
    if info is not None:
        write_toy_marker(out_dir, {**info, "preset": preset, "degradation_seed": seed})
    else:
        (out_dir / TOY_MARKER).unlink(missing_ok=True)


def write_toy_testset(out_dir: str | Path, n: int, size: int = 64, split: str = "test", seed: int = 0,
                      preset: str = "diffbir") -> Path:
    """n toy faces of `split` identities of the shipped toy world and seeded degraded copies: OUT/lq, OUT/hq,
    manifest.json and toyworld.json (so evaluate uses the toy judges). split="test" for evaluation, "train" for
    FRM training data."""
    out_dir = Path(out_dir)
    faces = ToyFaceWorld(seed=TOY_WORLD_SEED, n_identities=TOY_WORLD_IDENTITIES).sample(n, size=size, split=split, seed=seed)
    source = out_dir / "source-hq"
    for i, face in enumerate(faces):
        write_image(source / f"{i:04d}.png", face.image)
        (source / f"{i:04d}.txt").write_text(face.caption + "\n")
    write_degraded_testset(source, out_dir, preset=preset, seed=seed, size=size, progress=False)
    info = {"world_seed": TOY_WORLD_SEED, "n_identities": TOY_WORLD_IDENTITIES, "split": split, "sample_seed": seed,
            "identities": [f.identity for f in faces], "landmarks": [f.landmarks.tolist() for f in faces]}
    write_toy_marker(out_dir, info)
    return out_dir
