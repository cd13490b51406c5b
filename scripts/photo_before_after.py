"""The README's before/after of a whole photo: skimage's astronaut, degraded, then restored by `restore_photo`.

    python scripts/photo_before_after.py [--out docs/photo_before_after.png] [--steps 50] [--strength 0.3] [--threads 2]

The degradation is the `diffbir` preset at a fixed strength (facereward.data.degradation), the restorer the
shipped 64 px toy model, the detector dlib's CNN. Columns: LQ | the toy model's stage 1 (cleaner) pasted back |
its full output (stage 2) pasted back | the original (each shown at --panel px); the bottom row zooms on the face.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import skimage.data  # noqa: E402
import torch  # noqa: E402

from facereward import smoke  # noqa: E402
from facereward.data.degradation import degrade  # noqa: E402
from facereward.data.faces import FaceDetector, paste_face  # noqa: E402
from facereward.data.imageio import image_grid, write_image  # noqa: E402
from facereward.models.restorer import Restorer  # noqa: E402
from facereward.photos import restore_photo  # noqa: E402
from facereward.weights import default_restorer_path  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/photo_before_after.png")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--strength", type=float, default=0.3, help="diffbir degradation strength in [0, 1]")
    parser.add_argument("--detector", default="cnn", choices=["cnn", "hog", "haar"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--panel", type=int, default=384, help="side of each panel in px")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 DDIM steps (also under FACEREWARD_SMOKE=1)")
    args = parser.parse_args()
    if args.quick or smoke.active():
        args.steps = min(args.steps, 2)
    torch.set_num_threads(args.threads)

    hq = skimage.data.astronaut().astype(np.float32) / 255.0
    lq, params = degrade(hq, "diffbir", seed=args.seed, index=0, strength=args.strength)
    restorer = Restorer.from_pretrained(default_restorer_path())
    timings: dict[str, float] = {}
    start = time.perf_counter()
    restored, faces = restore_photo(restorer, lq, FaceDetector(args.detector), steps=args.steps, seed=args.seed, timings=timings)
    seconds = time.perf_counter() - start
    done = [f for f in faces if f.status == "restored"]
    if not done:
        raise SystemExit(f"no face restored ({[f.status for f in faces]})")
    x0, y0, x1, y1 = done[0].box
    cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, 0.8 * max(x1 - x0, y1 - y0)
    box = [int(round(v)) for v in (cx - half, cy - half, cx + half, cy + half)]
    box = [max(0, box[0]), max(0, box[1]), min(512, box[2]), min(512, box[3])]

    def zoom(image: np.ndarray) -> np.ndarray:
        return cv2.resize(image[box[1] : box[3], box[0] : box[2]], (args.panel, args.panel), interpolation=cv2.INTER_NEAREST)

    def fit(image: np.ndarray) -> np.ndarray:
        return cv2.resize(image, (args.panel, args.panel), interpolation=cv2.INTER_AREA)

    stage1 = lq.copy()  # the same faces, with the stage-1 crops pasted instead
    for face in sorted(done, key=lambda f: f.size):
        paste_face(stage1, face.clean, face.affine)
    columns = [lq, stage1, restored, hq]
    grid = image_grid([[fit(c) for c in columns], [zoom(c) for c in columns]],
                      column_titles=[f"LQ (diffbir, strength {args.strength:.1f})", "toy restorer, stage 1 only",
                                     f"toy restorer ({args.steps} DDIM steps)", "original"])
    write_image(args.out, grid)
    split = ", ".join(f"{k} {v:.2f} s" for k, v in timings.items())
    print(f"wrote {args.out}: {len(done)} face restored in {seconds:.1f} s ({split}); degradation {params}")


if __name__ == "__main__":
    main()
