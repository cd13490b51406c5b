"""LRPO epoch time over its bare compute, pixel and latent, interleaved repeats in one process (docs/architecture.md).

    python benchmarks/lrpo_epoch.py [--modes pixel latent] [--repeats 5] [--threads 2]
    python benchmarks/lrpo_epoch.py --model latent-real --device cuda --precision bf16 [--compile] \
        --steps 10 --group-size 3 --batches 1 --micro-batch 6 --repeats 2    # SD 2.1 + DiffBIR shapes, random weights

One epoch of `facereward.train.lrpo` (sample_epoch, assign_advantages, set_regulariser_targets, update_epoch through
a one-process Accelerator) against its bare compute: the same network calls in the same micro-batches with none of
the trainer's glue (cleaner and encodes per sampling batch, T no-grad noise predictions and the DDIM steps per
micro-batch, decode, the reward forwards, then one forward + backward per (micro-batch, trained step), the clip and
an AdamW step per (minibatch, trained step)). Repeats alternate epoch, bare, epoch, bare, ... so drift lands on
both; prints min/median/max of the per-pair ratio.

`--model` (alias of `--modes`): pixel / latent are the 32 px tiny models (the default), the other names are
speed_options.build's (latent-real: SD 2.1 base UNet + DiffBIR's ControlNet, 512 px faces, 64x64x4 latents).
`--precision bf16`: the trainer's side runs through an Accelerator with mixed_precision "bf16" (as
`run.mixed_precision: bf16`), the bare side wraps the same network calls in `torch.autocast(device, bfloat16)`.
`--compile`: `nn.Module.compile()` on the trained network and, in latent mode, the frozen UNet (as `run.compile`),
shared by both sides; the warm-up pair (printed) includes the compile. On CUDA clocks are read after a synchronize
and each side's peak `torch.cuda.max_memory_allocated()` is printed.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from refl_step import sync
from speed_options import build

from facereward.data.training_data import DataConfig, build_dataset
from facereward.models.ddim import DDIMSchedule, ddim_step_with_logprob
from facereward.models.restorer import PixelUNetConfig, Restorer, RestorerConfig
from facereward.measures import MeasuresConfig, WeightedSum
from facereward.train.accelerator import RunConfig, make_accelerator
from facereward.train.lrpo import (
    LRPOConfig,
    assign_advantages,
    check_config,
    sample_epoch,
    set_regulariser_targets,
    update_epoch,
)
from facereward.train.trainable import LoraSettings, prepare_trainable, trainable_parameters


MODELS = ["pixel", "latent", "pixel-toy", "latent-tiny", "latent-real"]


def _restorer(mode: str, device: torch.device | None = None) -> Restorer:
    if mode not in ("pixel", "latent"):
        return build(mode, device)
    torch.manual_seed(0)
    cleaner = {"channels": 8, "num_blocks": 1, "downscale": 2}
    if mode == "pixel":
        return Restorer.build(RestorerConfig(mode="pixel", size=32, cleaner_kwargs=cleaner, pixel=PixelUNetConfig(
            block_out_channels=[32, 64], attention_levels=[False, True], norm_num_groups=8)))
    return Restorer.build(RestorerConfig(mode="latent", size=32, cleaner_kwargs=cleaner))


def bench(mode: str, args: argparse.Namespace) -> list[float]:
    device, bf16 = torch.device(args.device), args.precision == "bf16"
    run = RunConfig(output_dir=tempfile.mkdtemp(), progress=False, cpu=device.type == "cpu",
                    mixed_precision="bf16" if bf16 else "no")
    accelerator = make_accelerator(run, "bench")
    restorer = _restorer(mode, accelerator.device).to(accelerator.device)
    size = restorer.config.size
    config = LRPOConfig(run=run, data=DataConfig(toy_faces=16, size=size), group_size=args.group_size,
                        inputs_per_batch=args.inputs_per_batch, batches_per_epoch=args.batches, sample_steps=args.steps,
                        micro_batch=args.micro_batch, train_batch_size=args.train_batch_size or args.micro_batch,
                        reg_steps=2, lr=1e-6)
    config.rewards = MeasuresConfig(weights={"wavelet": 0.5, "ssim": 0.5})
    n_train = check_config(config)
    module = prepare_trainable(restorer, LoraSettings())
    if args.compile:  # as run.compile (train/speed.py compile_networks): before prepare, shared by both sides
        module.compile()
        if restorer.mode == "latent":
            restorer.unet.compile()
    optimizer = torch.optim.AdamW(trainable_parameters(module), lr=config.lr)
    net, optimizer = accelerator.prepare(module, optimizer)
    reward = WeightedSum.from_config(config.rewards, device=accelerator.device)
    dataset = build_dataset(config.data)
    schedule = DDIMSchedule.from_scheduler(restorer.scheduler, config.sample_steps, device=accelerator.device)
    params = trainable_parameters(module)
    n = config.batches_per_epoch * config.inputs_per_batch * config.group_size
    lq = torch.rand(n, 3, size, size).to(accelerator.device)
    epoch = [0]
    cuda = accelerator.device.type == "cuda"
    print(f"{mode}: {accelerator.device}, {args.precision}{' + compile' if args.compile else ''}, {size} px, "
          f"{sum(p.numel() for p in params) / 1e6:.1f}M trained parameters; {n} samples an epoch (G={config.group_size}, "
          f"{config.batches_per_epoch}x{config.inputs_per_batch} inputs), T={config.sample_steps} ({n_train} trained), "
          f"micro-batch {config.micro_batch}, minibatch {config.train_batch_size}", flush=True)

    def autocast():  # the bare side's precision (the trainer's comes from the accelerator)
        return torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=bf16)

    def lrpo_epoch() -> None:
        buffer, scores = sample_epoch(restorer, dataset, schedule, config, n_train, reward, accelerator, epoch[0], net)
        assign_advantages(buffer, scores["reward"], config, n_train, accelerator, epoch[0])
        set_regulariser_targets(buffer, schedule, config, n_train, epoch[0])
        update_epoch(restorer, net, optimizer, buffer, schedule, config, n_train, None, accelerator, epoch[0])
        epoch[0] += 1

    def bare() -> None:
        per_batch = config.inputs_per_batch * config.group_size
        with torch.no_grad():
            conds = []
            for b in range(config.batches_per_epoch):
                x = lq[b * per_batch: (b + 1) * per_batch]
                with autocast():
                    conds.append(restorer.condition(restorer.clean(x)))
                    restorer.encode(x)
            cond = torch.cat(conds)
            samples = []
            for s in range(0, n, config.micro_batch):
                c = cond[s: s + config.micro_batch]
                x = torch.randn(restorer.latent_shape(len(c), size, size), device=c.device).to(c.dtype)  # as sample_epoch
                trajectory = [x]
                with autocast():
                    for t in schedule.timesteps:
                        t_b = t.expand(len(c))
                        x = ddim_step_with_logprob(restorer.predict_eps(x, t_b, c), t_b, x, schedule, 1.0).prev_sample
                        trajectory.append(x)
                    images = restorer.decode(x).clamp(0, 1)
                reward(images.float(), lq[s: s + config.micro_batch])
                samples.append(torch.stack(trajectory))
            samples = torch.cat(samples, dim=1)
        for s in range(0, n, config.train_batch_size):
            for k in range(n_train):
                for p in range(s, min(n, s + config.train_batch_size), config.micro_batch):
                    piece = slice(p, p + config.micro_batch)
                    t_b = schedule.timesteps[k].expand(samples[k][piece].shape[0])
                    with autocast():
                        eps = restorer.predict_eps(samples[k][piece], t_b, cond[piece], net=net)
                    out = ddim_step_with_logprob(eps, t_b, samples[k][piece], schedule, 1.0, prev_sample=samples[k + 1][piece])
                    out.log_prob.mean().backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

    peaks = {"epoch": 0, "bare": 0}

    def timed(fn, side: str) -> float:
        """Seconds of one call, synchronized on CUDA; records the side's peak allocated memory."""
        sync(accelerator.device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(accelerator.device)
        start = time.perf_counter()
        fn()
        sync(accelerator.device)
        elapsed = time.perf_counter() - start
        if cuda:
            peaks[side] = max(peaks[side], torch.cuda.max_memory_allocated(accelerator.device))
        return elapsed

    def peak_note() -> str:
        return f", peak allocated epoch {peaks['epoch'] / 2**30:.2f} GiB, bare {peaks['bare'] / 2**30:.2f} GiB" if cuda else ""

    warm = timed(lrpo_epoch, "epoch"), timed(bare, "bare")  # warm up (with --compile: the compile)
    if cuda or args.compile:
        print(f"  {mode}: warm-up epoch {warm[0]:.3f} s, bare {warm[1]:.3f} s{peak_note()}", flush=True)
    ratios = []
    for _ in range(args.repeats):
        t_epoch = timed(lrpo_epoch, "epoch")
        t_bare = timed(bare, "bare")
        ratios.append(t_epoch / t_bare)
        print(f"  {mode}: epoch {t_epoch:.3f} s, bare {t_bare:.3f} s, ratio {ratios[-1]:.3f}{peak_note()}", flush=True)
    accelerator.end_training()
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", "--model", dest="modes", nargs="+", default=["pixel", "latent"], choices=MODELS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--compile", action="store_true", help="nn.Module.compile() the trained network (+ the UNet in latent mode)")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps T (T - 1 trained)")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--inputs-per-batch", type=int, default=2)
    parser.add_argument("--batches", type=int, default=2, help="sampling batches an epoch")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--train-batch-size", type=int, default=0, help="minibatch (0: the micro-batch)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {mode: bench(mode, args) for mode in args.modes}
    extra = "" if (args.device, args.precision, args.compile) == ("cpu", "fp32", False) else \
        f", {args.device} {args.precision}{' + compile' if args.compile else ''}"
    print(f"\nLRPO epoch / bare compute (G={args.group_size}, {args.batches}x{args.inputs_per_batch} inputs, T={args.steps}, "
          f"micro-batch {args.micro_batch}, {args.repeats} interleaved pairs{extra}):")
    for mode, ratios in results.items():
        print(f"  {mode:6s} min {min(ratios):.3f}  median {statistics.median(ratios):.3f}  max {max(ratios):.3f}")


if __name__ == "__main__":
    main()
