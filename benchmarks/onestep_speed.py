"""Restore speed of the one-step toy base beside the 50-step toy base: images per second, same faces, same machine,
same run (docs/benchmarks.md).

    python benchmarks/onestep_speed.py --faces 32 --batch 16 --threads 2
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from facereward.data.datasets import PairedFolderDataset, collate_batch
from facereward.data.testset import write_toy_testset
from facereward.models.families import load_restorer
from facereward.models.seeded import restore_batch
from facereward.weights import WEIGHTS_DIR, default_restorer_path


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown CPU"


def images_per_second(folder: Path, batches: list[dict], steps: int, repeats: int) -> float:
    """The best of `repeats` timed passes over `batches` (after one warm-up pass), as images per second."""
    restorer = load_restorer(folder)
    n = sum(len(b["lq"]) for b in batches)
    best = float("inf")
    for r in range(repeats + 1):
        start = time.perf_counter()
        index = 0
        for batch in batches:
            restore_batch(restorer, batch["lq"], list(range(index, index + len(batch["lq"]))), steps=steps, seed=0)
            index += len(batch["lq"])
        if r:  # the first pass warms up the kernels
            best = min(best, time.perf_counter() - start)
    return n / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faces", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps of the multi-step base")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        testset = write_toy_testset(Path(tmp) / "set", args.faces, size=64, seed=0)
        dataset = PairedFolderDataset(testset)
        items = [dataset[i] for i in range(len(dataset))]
        batches = [collate_batch(items[i : i + args.batch]) for i in range(0, len(items), args.batch)]
        multi = images_per_second(default_restorer_path(), batches, args.steps, args.repeats)
        one = images_per_second(WEIGHTS_DIR / "toy-onestep", batches, 1, args.repeats)
    print(f"{cpu_name()}, {args.threads} threads, {args.faces} faces of 64 px in batches of {args.batch}:")
    print("| restorer | images/s | s per image |\n|---|---|---|")
    print(f"| toy base, {args.steps} DDIM steps | {multi:.1f} | {1 / multi:.4f} |")
    print(f"| toy one-step base | {one:.1f} | {1 / one:.4f} |")
    print(f"one-step / {args.steps}-step: {one / multi:.1f}x the images per second")


if __name__ == "__main__":
    main()
