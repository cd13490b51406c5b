#!/usr/bin/env python
"""Train the toy world's one-step base restorer, src/facereward/weights/toy-onestep (a `OneStepRestorer`, pixel mode).

Initialisation. OSEDiff (Wu et al. 2024) does not train its one-step restorer from scratch: it starts from a
pretrained Stable Diffusion UNet, takes the LQ (encoded) as x_t at t* = 999 and fine-tunes so that one call of the
pretrained denoiser gives x0. The toy world's pretrained denoiser is the shipped multi-step toy base,
src/facereward/weights/toy-restorer, so this script starts from *its* stage-2 UNet:

- the same UNet2DModel block configuration (32/64/96 channels, attention at the lowest level, 16 groups);
- every weight copied, except conv_in: the base UNet reads cat(x_t, 2 C(lq) - 1) (6 channels), the one-step UNet
  reads x_t = 2 lq - 1 alone (3 channels). Its conv_in is W[:, :3] + W[:, 3:], exactly the base's conv_in fed
  cat(x, x) (the base's noisy-sample half and its condition half both see the LQ), so the initial network is the base
  UNet with the LQ standing in for both x_t and the cleaned condition;
- the base's noise schedule and parameterisation (DDPM's linear betas 1e-4 .. 0.02, v-prediction) and t* = 999, the
  base's most-noisy training timestep, where it relies on the condition, not on x_t (abar_999 ~ 4e-5, so
  x0 = sqrt(abar) x_t - sqrt(1 - abar) v ~ -v: the UNet's output is, up to sign, the restored image).

Training. A regression of the one-step output (the [0, 1] image `forward_with_residuals` gives, not clamped) on the
HQ: MSE on [0, 1] images plus `--wavelet-weight` x DWT_L1 (facereward.measures.wavelet.lowpass_l1, the 3-level DT-CWT
low-pass L1 that the `wavelet` measure is: it ties the low frequencies, colour and layout, to the HQ). No LPIPS here
(the toy world has no LPIPS weights). AdamW, linear warmup then cosine decay to 10 % of --lr, gradient clipping at 1.
The data is the base's: `--faces` train-split toy faces of the demo world (ToyFaceWorld(seed=0, n_identities=200)) at
64 px, degraded on the fly with the seeded `diffbir` preset (a new degradation of every face each epoch) and flipped
at random, in an order that is a function of (--seed, epoch) alone. Nothing else is random, so a run resumed with
`--resume` from its last checkpoint (RUN_DIR/checkpoint.pt, written atomically every --save-every steps) is the run
that was not interrupted.

The folder written to --out is `OneStepRestorer.save_pretrained`'s (facereward.json records these arguments under
"source"), plus TRAINING_TIME.txt.

    OMP_NUM_THREADS=2 python scripts/train_toy_onestep.py [--out DIR] [--steps N] [--batch-size B] [--lr LR]
        [--seed S] [--resume] [--threads T]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from facereward.atomic import atomic_path, atomic_write_text
from facereward.data.datasets import collate_batch
from facereward.data.toyfaces import TOY_WORLD_IDENTITIES
from facereward.data.training_data import DataConfig, build_dataset
from facereward.measures.wavelet import lowpass_l1
from facereward.models.onestep import OneStepConfig, OneStepRestorer
from facereward.models.restorer import Restorer

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "src/facereward/weights/toy-restorer"
OUT = ROOT / "src/facereward/weights/toy-onestep"
RUN_DIR = ROOT / "runs/toy-onestep"
TIMESTEP = 999


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=OUT, help="the OneStepRestorer folder to write")
    p.add_argument("--base", type=Path, default=BASE, help="the multi-step pixel restorer whose stage-2 UNet to start from")
    p.add_argument("--run-dir", type=Path, default=RUN_DIR, help="where checkpoint.pt and train_log.json go")
    p.add_argument("--steps", type=int, default=450, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (AdamW)")
    p.add_argument("--warmup", type=int, default=25, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--wavelet-weight", type=float, default=0.01, help="weight of the DWT_L1 term (0: MSE alone)")
    p.add_argument("--faces", type=int, default=4000, help="train-split toy faces rendered once, degraded anew each epoch")
    p.add_argument("--seed", type=int, default=0, help="data order, degradations and flips")
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint.pt if there is one")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "faces", "save_every", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.lr <= 0 or args.warmup < 0 or args.wavelet_weight < 0:
        p.error("--lr must be > 0, --warmup and --wavelet-weight >= 0")
    return args


def initial_restorer(base_folder: Path) -> OneStepRestorer:
    """The one-step restorer of the base's UNet shape and schedule, its UNet copied from the base's (conv_in summed
    over the base's two 3-channel input halves)."""
    base = Restorer.from_pretrained(base_folder)
    c = base.config
    if c.mode != "pixel":
        raise SystemExit(f"{base_folder}: a pixel-mode restorer is needed, got mode {c.mode!r}")
    config = OneStepConfig(mode="pixel", size=c.size, timestep=TIMESTEP, beta_schedule=c.beta_schedule,
                           beta_start=c.beta_start, beta_end=c.beta_end, prediction_type=c.prediction_type,
                           pixel=c.pixel, colour_fix=False)
    restorer = OneStepRestorer.build(config)
    state = {k: v.clone() for k, v in base.unet.state_dict().items()}
    w = state["conv_in.weight"]
    if w.shape[1] != 6:
        raise SystemExit(f"{base_folder}: expected a 6-channel conv_in, got {tuple(w.shape)}")
    state["conv_in.weight"] = w[:, :3] + w[:, 3:]
    restorer.net.unet.load_state_dict(state, strict=True)
    return restorer


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup, then cosine from 1 to 0.1 (step counts optimizer steps already taken)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


class Batches:
    """Batches of the dataset in an order that is a function of (seed, epoch) alone, resumable at (epoch, batch)."""

    def __init__(self, dataset, batch_size: int, seed: int, epoch: int = 0, batch: int = 0):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.epoch, self.batch = epoch, batch
        self.per_epoch = len(dataset) // batch_size  # drop_last

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    def __next__(self) -> dict:
        if self.batch >= self.per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        # the shuffle of facereward.train.data_stream.EpochSampler
        order = np.random.default_rng([self.seed, self.epoch, 0x5EED]).permutation(len(self.dataset))
        self.dataset.set_epoch(self.epoch)
        idx = order[self.batch * self.batch_size:(self.batch + 1) * self.batch_size]
        self.batch += 1
        return collate_batch([self.dataset[int(i)] for i in idx])


def loss_fn(restorer: OneStepRestorer, batch: dict, wavelet_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    out, _ = restorer.forward_with_residuals(batch["lq"])
    mse = F.mse_loss(out, batch["hq"])
    dwt = lowpass_l1(out, batch["hq"]).mean() if wavelet_weight > 0 else torch.zeros(())
    return mse + wavelet_weight * dwt, {"mse": mse.item(), "dwt": dwt.item()}


def save_checkpoint(path: Path, restorer: OneStepRestorer, opt: torch.optim.Optimizer, step: int, batches: Batches,
                    log: list[dict], elapsed: float, args: argparse.Namespace) -> None:
    state = {"step": step, "unet": restorer.net.unet.state_dict(), "optimizer": opt.state_dict(),
             "data": batches.position(), "log": log, "elapsed_s": elapsed, "args": _jsonable(args)}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _jsonable(args: argparse.Namespace) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # nothing in training draws from it; set for any library code that might
    t0 = time.time()

    restorer = initial_restorer(args.base)
    data = DataConfig(toy_faces=args.faces, toy_seed=0, toy_identities=TOY_WORLD_IDENTITIES, size=restorer.config.size,
                      preset="diffbir", seed=args.seed, random_flip=True)
    dataset = build_dataset(data)
    net = restorer.net
    net.train().requires_grad_(True)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)

    ckpt_path = args.run_dir / "checkpoint.pt"
    step, log, elapsed_before, position = 0, [], 0.0, {"epoch": 0, "batch": 0}
    if args.resume and ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        net.unet.load_state_dict(state["unet"])
        opt.load_state_dict(state["optimizer"])
        step, log, elapsed_before, position = state["step"], state["log"], state["elapsed_s"], state["data"]
        changed = {k: (v, _jsonable(args)[k]) for k, v in state["args"].items()
                   if k not in ("resume", "threads", "steps", "save_every", "out", "run_dir") and _jsonable(args).get(k) != v}
        if changed:
            print(f"warning: resuming with changed arguments {changed}")
        print(f"resumed at step {step} from {ckpt_path}")
    elif args.resume:
        print(f"--resume: no {ckpt_path}, starting afresh")
    batches = Batches(dataset, args.batch_size, args.seed, **position)
    print(f"setup {time.time() - t0:.1f} s; {len(dataset)} faces, {sum(p.numel() for p in net.parameters())} parameters")

    t_train = time.time()
    bar = tqdm(total=args.steps, initial=step, desc="toy-onestep", dynamic_ncols=True)
    ema = None
    while step < args.steps:
        batch = next(batches)
        lr = args.lr * lr_factor(step, args.steps, args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        loss, parts = loss_fn(restorer, batch, args.wavelet_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        step += 1
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        log.append({"step": step, "loss": loss.item(), **parts, "lr": lr})
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.4f}", mse=f"{parts['mse']:.4f}", lr=f"{lr:.1e}")
        if step % args.save_every == 0 or step == args.steps:
            save_checkpoint(ckpt_path, restorer, opt, step, batches, log,
                            elapsed_before + time.time() - t_train, args)
    bar.close()
    elapsed = elapsed_before + time.time() - t_train

    net.eval()
    tail = log[-50:]
    final = {k: float(np.mean([r[k] for r in tail])) for k in ("loss", "mse", "dwt")} if tail else {}
    source = {"script": "scripts/train_toy_onestep.py", "init_from": "toy-restorer (stage-2 UNet, conv_in summed)",
              "steps": step, "train_seconds": round(elapsed, 1), "final_loss_mean_last_50": final,
              "args": {k: v for k, v in _jsonable(args).items() if k not in ("out", "run_dir", "base", "resume")}}
    restorer.save_pretrained(args.out, source=source)
    atomic_write_text(args.out / "TRAINING_TIME.txt",
                      f"{step} steps at batch {args.batch_size}: {elapsed:.0f} s of training ({elapsed / max(step, 1):.2f} s "
                      f"per step) on {cpu_name()}, {args.threads} torch threads\n")
    atomic_write_text(args.run_dir / "train_log.json", json.dumps({"log": log, "config": asdict(restorer.config)}, indent=1))
    print(f"done: {step} steps, {elapsed:.0f} s training; last-50 mean {final}; wrote {args.out}")


if __name__ == "__main__":
    main()
