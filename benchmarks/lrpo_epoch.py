"""LRPO epoch time over its bare compute, pixel and latent, interleaved repeats in one process (DESIGN.md "fast").

    python benchmarks/lrpo_epoch.py [--modes pixel latent] [--repeats 5] [--threads 2]

One epoch of `facereward.train.lrpo` (sample_epoch, assign_advantages, set_regulariser_targets, update_epoch through
a one-process Accelerator) against its bare compute: the same network calls in the same micro-batches with none of
the trainer's glue (cleaner and encodes per sampling batch, T no-grad noise predictions and the DDIM steps per
micro-batch, decode, the reward forwards, then one forward + backward per (micro-batch, trained step), the clip and
an AdamW step per (minibatch, trained step)). Repeats alternate epoch, bare, epoch, bare, ... so drift lands on
both; prints min/median/max of the per-pair ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from facereward.models.ddim import DDIMSchedule, ddim_step_with_logprob
from facereward.models.restorer import PixelUNetConfig, Restorer, RestorerConfig
from facereward.rewards import CompositeReward, RewardsConfig
from facereward.train.base import DataConfig, build_dataset
from facereward.train.lrpo import (
    LRPOConfig,
    assign_advantages,
    check_config,
    sample_epoch,
    set_regulariser_targets,
    update_epoch,
)
from facereward.train.plumbing import RunConfig, make_accelerator
from facereward.train.trainable import LoraSettings, prepare_trainable, trainable_parameters


def _restorer(mode: str) -> Restorer:
    torch.manual_seed(0)
    cleaner = {"channels": 8, "num_blocks": 1, "downscale": 2}
    if mode == "pixel":
        return Restorer.build(RestorerConfig(mode="pixel", size=32, cleaner_kwargs=cleaner, pixel=PixelUNetConfig(
            block_out_channels=[32, 64], attention_levels=[False, True], norm_num_groups=8)))
    return Restorer.build(RestorerConfig(mode="latent", size=32, cleaner_kwargs=cleaner))


def bench(mode: str, repeats: int) -> list[float]:
    config = LRPOConfig(run=RunConfig(output_dir=tempfile.mkdtemp(), progress=False), data=DataConfig(toy_faces=16, size=32),
                        group_size=4, inputs_per_batch=2, batches_per_epoch=2, steps=10, micro_batch=4, train_batch_size=4,
                        reg_steps=2, lr=1e-6)
    config.rewards = RewardsConfig(weights={"wavelet": 0.5, "ssim": 0.5})
    n_train = check_config(config)
    accelerator = make_accelerator(config.run, "bench")
    restorer = _restorer(mode)
    module = prepare_trainable(restorer, LoraSettings())
    optimizer = torch.optim.AdamW(trainable_parameters(module), lr=config.lr)
    net, optimizer = accelerator.prepare(module, optimizer)
    reward = CompositeReward.from_config(config.rewards, accelerator.device)
    dataset = build_dataset(config.data)
    schedule = DDIMSchedule.from_scheduler(restorer.scheduler, config.steps)
    params = trainable_parameters(module)
    n = config.batches_per_epoch * config.inputs_per_batch * config.group_size
    lq = torch.rand(n, 3, 32, 32)
    epoch = [0]

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
                conds.append(restorer.condition(restorer.clean(x)))
                restorer.encode(x)
            cond = torch.cat(conds)
            samples = []
            for s in range(0, n, config.micro_batch):
                c = cond[s: s + config.micro_batch]
                x = torch.randn(restorer.latent_shape(len(c), 32, 32))
                trajectory = [x]
                for t in schedule.timesteps:
                    t_b = t.expand(len(c))
                    x = ddim_step_with_logprob(restorer.predict_eps(x, t_b, c), t_b, x, schedule, 1.0).prev_sample
                    trajectory.append(x)
                images = restorer.decode(x).clamp(0, 1)
                reward(images, lq[s: s + config.micro_batch])
                samples.append(torch.stack(trajectory))
            samples = torch.cat(samples, dim=1)
        for s in range(0, n, config.train_batch_size):
            for k in range(n_train):
                for p in range(s, min(n, s + config.train_batch_size), config.micro_batch):
                    piece = slice(p, p + config.micro_batch)
                    t_b = schedule.timesteps[k].expand(samples[k][piece].shape[0])
                    eps = restorer.predict_eps(samples[k][piece], t_b, cond[piece], net=net)
                    out = ddim_step_with_logprob(eps, t_b, samples[k][piece], schedule, 1.0, prev_sample=samples[k + 1][piece])
                    out.log_prob.mean().backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

    lrpo_epoch(), bare()  # warm up
    ratios = []
    for _ in range(repeats):
        start = time.perf_counter()
        lrpo_epoch()
        mid = time.perf_counter()
        bare()
        end = time.perf_counter()
        ratios.append((mid - start) / (end - mid))
        print(f"  {mode}: epoch {mid - start:.3f} s, bare {end - mid:.3f} s, ratio {ratios[-1]:.3f}", flush=True)
    accelerator.end_training()
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=["pixel", "latent"], choices=["pixel", "latent"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {mode: bench(mode, args.repeats) for mode in args.modes}
    print(f"\nLRPO epoch / bare compute (G=4, 2x2 inputs, T=10, micro-batch 4, {args.repeats} interleaved pairs):")
    for mode, ratios in results.items():
        print(f"  {mode:6s} min {min(ratios):.3f}  median {statistics.median(ratios):.3f}  max {max(ratios):.3f}")


if __name__ == "__main__":
    main()
