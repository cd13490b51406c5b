"""Peak memory (RSS) of one LRPO epoch against G and T, and of ReFL steps against T; a fresh process per setting.

    python benchmarks/memory.py [--size 64] [--groups 4 8 16] [--steps 10 50]

Each setting runs in its own Python process (so one setting's peak cannot hide another's): a 64 px pixel toy
restorer (UNet widths 32/64), LRPO with 2 inputs x G samples per sampling batch, 2 batches (4G samples an epoch),
micro-batches of 4, T DDIM steps; ReFL with batch 4, T sampling steps, 3 steps. Prints the peak RSS and its
growth over the process after setup (model built, nothing run), in MiB.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

CHILD = r'''
import json, resource, sys, tempfile
import torch
torch.set_num_threads(2)
from facereward.models.frm import FaceRewardModel, FRMConfig
from facereward.models.restorer import PixelUNetConfig, Restorer, RestorerConfig
kind, g, t, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
tmp = tempfile.mkdtemp()
torch.manual_seed(0)
Restorer.build(RestorerConfig(mode="pixel", size=size, cleaner_kwargs={"channels": 8, "num_blocks": 1, "downscale": 2},
               pixel=PixelUNetConfig(block_out_channels=[32, 64], attention_levels=[False, False], norm_num_groups=8))
               ).save_pretrained(tmp + "/restorer")
FaceRewardModel(FRMConfig(backbone="cnn", input_size=size, cnn_widths=[8, 16], cnn_depth=1)).save_pretrained(tmp + "/frm")
kib = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
from facereward.train.base import DataConfig
from facereward.train.heldout import HeldOutConfig
from facereward.train.plumbing import RunConfig
run = RunConfig(output_dir=tmp + "/run", save_every=1000, progress=False)
data = DataConfig(toy_faces=16, size=size)
if kind == "lrpo":
    from facereward.train.lrpo import LRPOConfig, train_lrpo
    config = LRPOConfig(run=run, data=data, init_from=tmp + "/restorer", group_size=g, inputs_per_batch=2, batches_per_epoch=2,
                        epochs=1, steps=t, micro_batch=4, train_batch_size=4, reg_steps=2, held_out=HeldOutConfig(every=0))
    config.rewards.weights = {"wavelet": 0.5, "ssim": 0.5}
    setup = kib()
    train_lrpo(config)
else:
    from facereward.train.refl import ReFLConfig, train_refl
    config = ReFLConfig(run=run, data=data, init_from=tmp + "/restorer", frm=tmp + "/frm", steps=3, batch_size=4,
                        sampling_steps=t, lpips_weight=0.0, held_out=HeldOutConfig(every=0))
    setup = kib()
    train_refl(config)
print(json.dumps({"setup": setup / 1024, "peak": kib() / 1024}))
'''


def measure(kind: str, g: int, t: int, size: int) -> dict[str, float]:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(CHILD)
    proc = subprocess.run([sys.executable, f.name, kind, str(g), str(t), str(size)], capture_output=True, text=True,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2"})
    if proc.returncode:
        sys.exit(f"memory: {kind} G={g} T={t} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--groups", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--trainers", nargs="+", default=["lrpo", "refl"], choices=["lrpo", "refl"])
    args = parser.parse_args()
    print("| trainer | G | T | peak RSS (MiB) | over setup (MiB) |\n|---|---|---|---|---|", flush=True)
    for t in args.steps if "lrpo" in args.trainers else []:
        for g in args.groups:
            m = measure("lrpo", g, t, args.size)
            print(f"| lrpo ({4 * g} samples an epoch) | {g} | {t} | {m['peak']:.0f} | {m['peak'] - m['setup']:.0f} |", flush=True)
    for t in args.steps if "refl" in args.trainers else []:
        m = measure("refl", 0, t, args.size)
        print(f"| refl (batch 4) | - | {t} | {m['peak']:.0f} | {m['peak'] - m['setup']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
