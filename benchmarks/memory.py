"""Peak memory (RSS) of one LRPO epoch against G and T, and of ReFL steps against T; a fresh process per setting.

    python benchmarks/memory.py [--size 64] [--groups 4 8 16] [--steps 10 50]
    python benchmarks/memory.py --device cuda --model latent-real --precision fp32 --groups 4 8 --lrpo-steps 10 \
        --refl-steps 10 50 --batches 1 --micro-batch 6 --refl-batch 1    # peak allocated GPU memory, SD 2.1 shapes

Each setting runs in its own Python process (so one setting's peak cannot hide another's): a 64 px pixel toy
restorer (UNet widths 32/64), LRPO with 2 inputs x G samples per sampling batch, 2 batches (4G samples an epoch),
micro-batches of 4, T DDIM steps; ReFL with batch 4, T sampling steps, 3 steps. Prints the peak RSS and its
growth over the process after setup (model built, nothing run), in MiB.

`--device cuda`: the peak allocated (and reserved) GPU memory of each fresh process instead, the models on the GPU;
the trainers' checkpoint and final model writes are skipped there (disk only: they copy the weights to the host).
`--model`: pixel is that 64 px toy (the default); the other names are speed_options.build's (latent-real: SD 2.1
base UNet + DiffBIR's ControlNet, 512 px faces), built and saved once for all settings. `--precision` sets
run.mixed_precision with run.speed off (unset: the trainers' run.speed auto, as before). `--lrpo-steps` and
`--refl-steps` override `--steps` per trainer (the G/T grid).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

CHILD = r'''
import json, resource, sys, tempfile
import torch
torch.set_num_threads(2)
from facereward.measures import MeasuresConfig
from facereward.models.frm import FaceRewardModel, FRMConfig
from facereward.models.restorer import PixelUNetConfig, Restorer, RestorerConfig
kind, g, t, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
opts = {"restorer": None, "device": "cpu", "precision": None, "micro_batch": 4, "batches": 2, "refl_batch": 4}
opts.update(json.loads(sys.argv[5]) if len(sys.argv) > 5 else {})
cuda = opts["device"] != "cpu"
tmp = tempfile.mkdtemp()
torch.manual_seed(0)
if opts["restorer"] is None:
    Restorer.build(RestorerConfig(mode="pixel", size=size, cleaner_kwargs={"channels": 8, "num_blocks": 1, "downscale": 2},
                   pixel=PixelUNetConfig(block_out_channels=[32, 64], attention_levels=[False, False], norm_num_groups=8))
                   ).save_pretrained(tmp + "/restorer")
restorer = opts["restorer"] or tmp + "/restorer"
FaceRewardModel(FRMConfig(backbone="cnn", input_size=size, cnn_widths=[8, 16], cnn_depth=1)).save_pretrained(tmp + "/frm")
kib = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
from facereward.data.training_data import DataConfig
from facereward.train.heldout import HeldOutConfig
from facereward.train.accelerator import RunConfig
run = RunConfig(output_dir=tmp + "/run", save_every=1000, progress=False)
if opts["device"] == "cpu" and torch.cuda.is_available():
    run.cpu = True
if opts["precision"]:  # explicit: no run.speed measurement
    run.mixed_precision, run.speed, run.channels_last = {"fp32": "no", "bf16": "bf16"}[opts["precision"]], "off", False
data = DataConfig(toy_faces=16, size=size)
if cuda:  # disk only (the weights are copied to the host): skipped so a real-size setting takes seconds, not minutes
    import facereward.train.lrpo as lrpo_module, facereward.train.refl as refl_module
    for module in (lrpo_module, refl_module):
        module.checkpoint_run = module.save_restorer = lambda *args, **kwargs: None
    refl_module.FaceRewardModel.save_pretrained = lambda *args, **kwargs: None
mb = opts["micro_batch"]
if kind == "lrpo":
    from facereward.train.lrpo import LRPOConfig, train_lrpo
    config = LRPOConfig(run=run, data=data, init_from=restorer, group_size=g, inputs_per_batch=2, batches_per_epoch=opts["batches"],
                        epochs=1, sample_steps=t, micro_batch=mb, train_batch_size=mb, reg_steps=2, held_out=HeldOutConfig(every=0))
    config.rewards.weights = {"wavelet": 0.5, "ssim": 0.5}
    setup = kib()
    train_lrpo(config)
else:
    from facereward.train.refl import ReFLConfig, train_refl
    config = ReFLConfig(run=run, data=data, init_from=restorer, rewards=MeasuresConfig(weights={"frm": 1.0}, options={"frm": {"path": tmp + "/frm"}}), train_steps=3, batch_size=opts["refl_batch"],
                        sample_steps=t, losses=MeasuresConfig(weights={"wavelet": 0.01}), held_out=HeldOutConfig(every=0))
    setup = kib()
    train_refl(config)
out = {"setup": setup / 1024, "peak": kib() / 1024}
if cuda:
    out.update(allocated=torch.cuda.max_memory_allocated() / 2**20, reserved=torch.cuda.max_memory_reserved() / 2**20)
print(json.dumps(out))
'''


def measure(kind: str, g: int, t: int, size: int, opts: dict | None = None, timeout: float | None = None) -> dict[str, float]:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(CHILD)
    argv = [sys.executable, f.name, kind, str(g), str(t), str(size)] + ([json.dumps(opts)] if opts else [])
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2"}
    if opts and opts.get("device", "cpu") != "cpu":  # the GPU's libraries and settings (and PYTHONPATH) travel
        env = {**os.environ, **env, "PATH": os.environ.get("PATH", env["PATH"])}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode:
        sys.exit(f"memory: {kind} G={g} T={t} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


MODELS = ["pixel", "pixel-toy", "latent-tiny", "latent-real"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64, help="the pixel toy's size (other models have their own)")
    parser.add_argument("--groups", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--lrpo-steps", type=int, nargs="+", help="LRPO's T grid (default: --steps)")
    parser.add_argument("--refl-steps", type=int, nargs="+", help="ReFL's T grid (default: --steps)")
    parser.add_argument("--trainers", nargs="+", default=["lrpo", "refl"], choices=["lrpo", "refl"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="pixel", choices=MODELS)
    parser.add_argument("--precision", choices=["fp32", "bf16"], help="run.mixed_precision, run.speed off (unset: run.speed auto)")
    parser.add_argument("--micro-batch", type=int, default=4, help="LRPO's micro-batch and minibatch")
    parser.add_argument("--batches", type=int, default=2, help="LRPO's sampling batches an epoch (2 inputs x G each)")
    parser.add_argument("--refl-batch", type=int, default=4)
    parser.add_argument("--timeout", type=float, help="seconds per setting (a setting over it is reported and skipped)")
    args = parser.parse_args()
    opts: dict = {k: v for k, v in (("device", args.device), ("precision", args.precision), ("micro_batch", args.micro_batch),
                                    ("batches", args.batches), ("refl_batch", args.refl_batch))
                  if v != {"device": "cpu", "precision": None, "micro_batch": 4, "batches": 2, "refl_batch": 4}[k]}
    size, folder = args.size, None
    if args.model != "pixel":  # built and saved once; every setting's process loads it
        import torch
        from speed_options import build

        restorer = build(args.model, args.device if args.device != "cpu" else None)  # initialised on the GPU: faster
        size, folder = restorer.config.size, tempfile.mkdtemp()
        restorer.save_pretrained(folder)
        del restorer
        if args.device != "cpu":
            torch.cuda.empty_cache()
        opts["restorer"] = folder
        print(f"{args.model}: {size} px, saved to {folder} for the settings' processes (torch {torch.__version__})", flush=True)
    cuda = args.device != "cpu"
    lrpo_steps, refl_steps = args.lrpo_steps or args.steps, args.refl_steps or args.steps
    mb, batches, refl_batch = args.micro_batch, args.batches, args.refl_batch
    if cuda:
        print(f"{args.model} on {args.device}, {args.precision or 'run.speed auto'}: LRPO {batches} sampling batches of 2 inputs x G, "
              f"micro-batch {mb}, one epoch; ReFL batch {refl_batch}, 3 steps", flush=True)
        print("| trainer | G | T | peak allocated (MiB) | peak reserved (MiB) |\n|---|---|---|---|---|", flush=True)
    else:
        print("| trainer | G | T | peak RSS (MiB) | over setup (MiB) |\n|---|---|---|---|---|", flush=True)

    def row(label: str, g: str, t: int, m: dict[str, float] | None) -> None:
        if m is None:
            print(f"| {label} | {g} | {t} | timed out | |", flush=True)
        elif cuda:
            print(f"| {label} | {g} | {t} | {m['allocated']:.0f} | {m['reserved']:.0f} |", flush=True)
        else:
            print(f"| {label} | {g} | {t} | {m['peak']:.0f} | {m['peak'] - m['setup']:.0f} |", flush=True)

    def run(kind: str, g: int, t: int) -> dict[str, float] | None:
        try:
            return measure(kind, g, t, size, opts or None, args.timeout)
        except subprocess.TimeoutExpired:
            return None

    try:
        for t in lrpo_steps if "lrpo" in args.trainers else []:
            for g in args.groups:
                row(f"lrpo ({2 * batches * g} samples an epoch)", str(g), t, run("lrpo", g, t))
        for t in refl_steps if "refl" in args.trainers else []:
            row(f"refl (batch {refl_batch})", "-", t, run("refl", 0, t))
    finally:
        if folder:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
