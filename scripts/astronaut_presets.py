"""A real face through the toy base: skimage's astronaut, aligned to 64 px, degraded by each preset, restored, judged.

    python scripts/astronaut_presets.py [--out runs/astronaut-presets] [--copies 8] [--steps 50] [--model DIR]

The face is found by dlib's CNN detector and aligned to the FFHQ 5-point template at 512 px, then resized to the
model size. `--copies` copies of it are degraded by each preset (copy i gets the degradation of (seed 0, i)), and
`facereward evaluate` scores LQ, stage 1 and the base (without and with the wavelet colour fix) with dlib's
identity and landmark judges (which are unreliable at 64 px: the evaluate warning says so; the comparison within
a row is what counts). Writes OUT/PRESET/{lq,hq,eval,...} and OUT/results.md.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import cv2  # noqa: E402
import skimage.data  # noqa: E402

from facereward import smoke  # noqa: E402
from facereward.data.faces import FaceDetector, alignment_affine, warp_face  # noqa: E402
from facereward.data.imageio import write_image  # noqa: E402
from facereward.data.testset import write_degraded_testset  # noqa: E402
from facereward.evaluate import EvaluateConfig, evaluate  # noqa: E402
from facereward.models.restorer import Restorer  # noqa: E402
from facereward.weights import default_restorer_path  # noqa: E402

PRESETS = ("diffbir", "codeformer", "gfpgan", "difface")
COLUMNS = ("PSNR", "IDS", "LMD")  # column prefixes (the judges' names follow in the headers)


def aligned_astronaut(size: int):
    """The astronaut's face, FFHQ-aligned at 512 px and resized to `size` (area interpolation), uint8 RGB."""
    photo = skimage.data.astronaut()
    faces = FaceDetector("cnn").detect(photo)
    if not faces:
        raise SystemExit("astronaut_presets: no face found in skimage's astronaut")
    crop = warp_face(photo, alignment_affine(faces[0].landmarks, 512), 512)
    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)


def _column(row: dict[str, float], prefix: str) -> float:
    return next(v for k, v in row.items() if k == prefix or k.startswith(prefix + " "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/astronaut-presets"))
    parser.add_argument("--model", default=str(default_restorer_path()))
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    presets = PRESETS
    if smoke.active():
        args.copies, args.steps, presets = min(args.copies, 2), min(args.steps, 2), PRESETS[:1]
    start = time.time()
    size = Restorer.from_pretrained(args.model).config.size
    face = aligned_astronaut(size)
    hq = args.out / "source-hq"
    for i in range(args.copies):
        write_image(hq / f"{i:04d}.png", face)
    lines = ["| preset | " + " | ".join(f"{row} {label}" for row in ("LQ", "base", "base + colour fix")
                                       for label in COLUMNS) + " |", "|---|" + "---|" * (3 * len(COLUMNS))]
    for preset in presets:
        folder = args.out / preset
        write_degraded_testset(hq, folder, preset=preset, seed=0, size=size, progress=False)
        rows = {}
        for colour_fix in (False, True):
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*unreliable.*")  # dlib at 64 px: known, said above
                warnings.filterwarnings("ignore", message=".*FID.*")
                result = evaluate(EvaluateConfig(
                    testset=str(folder), out_dir=str(folder / ("eval-colour-fix" if colour_fix else "eval")),
                    models={"base": args.model}, include_lq=not colour_fix, sample_steps=args.steps, eta=0.0, seed=0,
                    identity="dlib", landmarks="dlib", fid="none", colour_fix=colour_fix, progress=False))
            rows.update({("base + colour fix" if colour_fix else k): v for k, v in result.rows.items()})
        cells = [f"{_column(rows[row], prefix):.{3 if prefix == 'IDS' else 2}f}"
                 for row in ("LQ", "base", "base + colour fix") for prefix in COLUMNS]
        lines.append(f"| {preset} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    text = (f"skimage astronaut, aligned, {size} px, {args.copies} degradations per preset (seed 0), {args.steps} DDIM "
            f"steps at eta 0, model {args.model}; dlib judges; {time.time() - start:.0f} s\n\n" + "\n".join(lines) + "\n")
    (args.out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
