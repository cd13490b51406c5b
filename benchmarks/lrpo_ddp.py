"""LRPO epoch time on 2 CPU processes (gloo): the prepared path (accelerator.prepare / backward, DDP) against the
hand all-reduce it replaced (the code at --old, default the last commit before the change).

    python benchmarks/lrpo_ddp.py [--old 5c05f1a] [--repeats 3] [--epochs 5]

Both versions run the same tiny pixel LRPO config in fresh 2-process launches, interleaved (old, new, old, new, ...)
so machine drift lands on both. An epoch's time is its sample_epoch + update_epoch calls (the first epoch, which
warms up, is dropped); prints min/median/max per version and the ratio of the medians. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

DRIVER = r'''
import json, sys, time
sys.path.insert(0, sys.argv[1])
import torch
from facereward.config import load_config
import facereward.train.lrpo as lrpo
times, start = [], [0.0]
def timed(name):
    inner = getattr(lrpo, name)
    def wrapper(*args, **kwargs):
        if name == "sample_epoch":
            start[0] = time.perf_counter()
        out = inner(*args, **kwargs)
        if name == "update_epoch":
            times.append(time.perf_counter() - start[0])
        return out
    setattr(lrpo, name, wrapper)
timed("sample_epoch"); timed("update_epoch")
lrpo.train_lrpo(load_config(lrpo.LRPOConfig, sys.argv[2]))
if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
    sys.exit(0)
json.dump({"epochs": times}, open(sys.argv[3], "w"))
'''


def _config(restorer: Path, out: Path, epochs: int) -> dict:
    return {"run": {"output_dir": str(out), "save_every": 1000, "log_every": 1, "progress": False},
            "init_from": str(restorer), "data": {"toy_faces": 16, "size": 32, "toy_identities": 10},
            "rewards": {"weights": {"wavelet": 0.5, "ssim": 0.5}}, "group_size": 4, "inputs_per_batch": 2,
            "batches_per_epoch": 2, "epochs": epochs, "sample_steps": 10, "micro_batch": 4, "train_batch_size": 4,
            "reg_steps": 2, "lr": 1e-5, "held_out": {"every": 0}}


def _launch(src: Path, config: Path, result: Path, driver: Path) -> list[float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(src)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(driver), str(src), str(config), str(result)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"lrpo_ddp: the run with {src} failed:\n{proc.stderr[-3000:]}")
    return json.loads(result.read_text())["epochs"][1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", default="5c05f1a", help="the commit with the hand all-reduce")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from facereward.models.restorer import PixelUNetConfig, Restorer, RestorerConfig

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        old_src = tmp / "old"
        old_src.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.old, "src"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(old_src)], input=archive.stdout, check=True)
        torch.manual_seed(0)
        model = RestorerConfig(mode="pixel", size=32, cleaner_kwargs={"channels": 8, "num_blocks": 1, "downscale": 2},
                               pixel=PixelUNetConfig(block_out_channels=[32, 64], attention_levels=[False, True], norm_num_groups=8))
        Restorer.build(model).save_pretrained(tmp / "restorer")
        driver = tmp / "driver.py"
        driver.write_text(DRIVER)
        times: dict[str, list[float]] = {"old (hand all-reduce)": [], "new (prepared, DDP)": []}
        for repeat in range(args.repeats):
            for (name, src) in zip(times, (old_src / "src", ROOT / "src")):
                config = tmp / f"{repeat}-{len(times[name])}.yaml"
                config.write_text(yaml.safe_dump(_config(tmp / "restorer", tmp / f"run-{name[:3]}-{repeat}", args.epochs)))
                times[name] += _launch(src, config, tmp / "result.json", driver)
                print(f"repeat {repeat + 1}/{args.repeats} {name}: {statistics.median(times[name][-args.epochs + 1:]):.3f} s/epoch",
                      flush=True)
    print(f"\nLRPO epoch on 2 CPU processes (tiny pixel model, G=4, 2x2 inputs, T=10), {args.repeats} launches x "
          f"{args.epochs - 1} epochs each:")
    for name, values in times.items():
        print(f"  {name:24s} min {min(values):.3f}  median {statistics.median(values):.3f}  max {max(values):.3f} s")
    old, new = (statistics.median(v) for v in times.values())
    print(f"  ratio new / old (medians): {new / old:.3f}")


if __name__ == "__main__":
    main()
