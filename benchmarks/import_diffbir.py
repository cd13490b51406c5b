"""Time and peak memory of `facereward import-diffbir` at the real size (random weights in the real layouts).

Fabricates SD 2.1 (`v2-1_512-ema-pruned.ckpt` layout, 1.3B tensors' worth, about 5.2 GB), DiffBIR's `v1_face.pth`
(363M parameters) and the face SwinIR with tests/diffbir_reference.py, once, into --workdir; then runs the import in
a fresh process and prints its wall time and peak RSS against the size of the weights.

    python benchmarks/import_diffbir.py --workdir /tmp/diffbir-real
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fabricate(workdir: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    import torch

    import diffbir_reference as R
    from facereward.models.swinir import SwinIR

    workdir.mkdir(parents=True, exist_ok=True)
    if not (workdir / "v2-1_512-ema-pruned.ckpt").is_file():
        print("fabricating SD 2.1 (real size) ...", flush=True)
        R.fabricate_sd21(workdir / "v2-1_512-ema-pruned.ckpt", seed=0, config=R.REAL)
    if not (workdir / "v1_face.pth").is_file():
        print("fabricating v1_face.pth (real size) ...", flush=True)
        R.fabricate_v1_face(workdir / "v1_face.pth", seed=1, config=R.REAL)
    if not (workdir / "face_swinir_v1.ckpt").is_file():
        torch.save({"state_dict": SwinIR().state_dict()}, workdir / "face_swinir_v1.ckpt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/diffbir-real"))
    args = parser.parse_args()
    fabricate(args.workdir)
    files = [args.workdir / n for n in ("v2-1_512-ema-pruned.ckpt", "v1_face.pth", "face_swinir_v1.ckpt")]
    out = args.workdir / "restorer"
    cmd = [sys.executable, "-m", "facereward.cli", "import-diffbir", str(out), "--sd", str(files[0]), "--controlnet",
           str(files[1]), "--swinir", str(files[2]), "--no-progress"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    seconds = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # kB -> GiB
    weights_gb = sum(f.stat().st_size for f in files) / 2**30
    written_gb = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**30
    row = {"seconds": round(seconds, 1), "peak_rss_gib": round(peak_gb, 2), "input_files_gib": round(weights_gb, 2),
           "written_gib": round(written_gb, 2), "peak_over_inputs": round(peak_gb / weights_gb, 2),
           "note": "peak RSS counts the memory-mapped input pages the conversion touches" if before == 0 else ""}
    print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
