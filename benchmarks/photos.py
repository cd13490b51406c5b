"""Whole-photo restoration speed: photos per second and the split into detect / align / restore / background / paste.

    python benchmarks/photos.py [--photos 8] [--steps 50] [--detector cnn hog] [--threads 2] [--device cpu]

Photos: skimage's astronaut (512 px, one face) degraded by the `diffbir` preset at strength 0.1, photo i by
(seed 0, index i). The model is the shipped 64 px toy restorer. Per detector, `restore_photo` runs on every photo
(one warm-up photo first) and its own stage timings are summed; the wall time around the calls gives the glue
(everything no stage timer covers). Reading and writing the PNGs is timed apart. Printed: ms per photo per stage,
photos/s, and the non-model share of the time: (align + background + paste + glue) / total, the model being the
detector network and the restorer; and, for reference, the share with detection counted as non-model too.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import skimage.data  # noqa: E402
import torch  # noqa: E402

from facereward.data.degradation import degrade  # noqa: E402
from facereward.data.faces import FaceDetector  # noqa: E402
from facereward.data.imageio import read_photo, to_uint8, write_image  # noqa: E402
from facereward.models.restorer import Restorer  # noqa: E402
from facereward.photos import STAGES, restore_photo  # noqa: E402
from facereward.weights import default_restorer_path  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--detector", nargs="+", default=["cnn", "hog"], choices=["cnn", "hog", "haar"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--strength", type=float, default=0.1, help="diffbir strength (HOG misses the face from about 0.3)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    hq = skimage.data.astronaut().astype(np.float32) / 255.0
    photos = [to_uint8(degrade(hq, "diffbir", seed=0, index=i, strength=args.strength)[0]) for i in range(args.photos + 1)]
    restorer = Restorer.from_pretrained(default_restorer_path()).to(args.device)

    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp) / f"{i}.png" for i in range(len(photos))]
        for p, img in zip(paths, photos):
            write_image(p, img)
        tick = time.perf_counter()
        for p, img in zip(paths[1:], photos[1:]):
            read_photo(p)
            write_image(Path(tmp) / f"out-{p.name}", img)
        io_ms = (time.perf_counter() - tick) / args.photos * 1000

    print(f"{args.photos} photos of 512x512 with one face, toy restorer ({restorer.config.size} px), {args.steps} DDIM steps, "
          f"{args.threads} threads, {args.device}; load average {os.getloadavg()[0]:.2f}")
    print(f"reading + writing one photo's PNG: {io_ms:.1f} ms (not in the split below)\n")
    print("| detector | faces | photos/s | " + " | ".join(f"{s} ms" for s in STAGES) + " | glue ms | total ms | non-model | non-model incl. detect |")
    print("|---|---|---|" + "---|" * (len(STAGES) + 4))
    for kind in args.detector:
        detector = FaceDetector(kind)
        restore_photo(restorer, photos[0], detector, steps=args.steps)  # warm-up
        timings = dict.fromkeys(STAGES, 0.0)
        faces = 0
        tick = time.perf_counter()
        for i, img in enumerate(photos[1:]):
            _, records = restore_photo(restorer, img, detector, steps=args.steps, photo_index=i, timings=timings)
            faces += sum(r.restored is not None for r in records)
        wall = time.perf_counter() - tick
        n = args.photos
        glue = wall - sum(timings.values())
        non_model = timings["align"] + timings["background"] + timings["paste"] + glue
        row = [f"{timings[s] / n * 1000:.1f}" for s in STAGES]
        print(f"| {detector.name} | {faces} | {n / wall:.3f} | " + " | ".join(row) + f" | {glue / n * 1000:.1f} | "
              f"{wall / n * 1000:.0f} | **{non_model / wall:.1%}** | {(non_model + timings['detect']) / wall:.1%} |")


if __name__ == "__main__":
    main()
