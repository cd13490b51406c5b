"""`facereward lrpo`: Likelihood-Regularized Policy Optimization, online RL for the restorer (docs/methods.md 2).

One epoch: sample `batches_per_epoch` group batches (each LQ input repeated G times, the same degraded
image on every process that holds part of its group, or with `group_inputs: own_noise` the same degradation
parameters and each copy its own noise), roll out DDIM with eta = 1 recording every step,
score the results with the composite reward, compute group advantages, then `inner_epochs` PPO-clip
passes with the GT-guided likelihood regulariser on the last K trained steps.

Optimizer stepping (docs/methods.md 2.3): by default one step per (minibatch of `train_batch_size` samples,
trained timestep), minibatches drawn from all of the epoch's samples, shuffled: the original's 588 steps
per epoch. `stepping: per_minibatch` accumulates a minibatch's timesteps into one step instead (with
`train_batch_size: 0`, one step per inner epoch). The loss of one (minibatch, step j) is
`mean pg_j + reg_weight * mean reg_j` over the minibatch's kept samples, the original's scale.

Rollouts run in micro-batches of `micro_batch` samples, in the order of the first inner epoch's shuffle,
and an update computes its forwards in the same micro-batches: a network's output on CPU and GPU can differ
in the last bits with the batch's make-up, and with a clip range of 1e-4 such noise would clip. So before
the epoch's first optimizer step (the first minibatch's first timestep, when `train_batch_size` is a
multiple of `micro_batch`) the ratio is exactly 1. Samples with zero advantage carry no loss (or, with
`zero_advantage: pad`, some are re-admitted and the rest removed before minibatching, as the original does; the
minibatches then differ from the rollout micro-batches, so the first ratio is 1 only to the last bits). Only the stage-2 network (or its LoRA
adapters) is trained; the restorer stays in eval mode (the networks have no dropout or batch statistics).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
from accelerate import Accelerator
from torch import Tensor, nn
from torch.utils.data import Dataset

from facereward.data.training_data import DataConfig, build_dataset
from facereward.measures import MeasureEnv, MeasuresConfig, WeightedSum
from facereward.models.ddim import (
    DDIMSchedule,
    ddim_step_with_logprob,
    gaussian_log_prob,
    mix_seed,
    q_sample,
    randn,
    rollout,
    row_generators,
)
from facereward.models.families import require_multi_step
from facereward.models.restorer import Restorer
from facereward.plugins import import_plugins
from facereward.train.accelerator import (
    RunConfig,
    check_engine,
    make_accelerator,
    micro_step,
    set_deepspeed_micro_batch,
)
from facereward.train.checkpoints import (
    restore_run,
    resume_run,
    write_run_config,
)
from facereward.train.groups import (
    epoch_input_indices,
    group_advantages,
    group_batch,
)
from facereward.train.epochs import EpochRecorder
from facereward.train.heldout import HeldOutConfig, HeldOutEvaluator
from facereward.train.speed import Workload, speed_up_stage2
from facereward.train.trainable import (
    LoraSettings,
    Reference,
    prepare_trainable,
    trainable_parameters,
)
from facereward.weights import default_restorer_path, frm_path_or_default


@dataclass
class LRPOConfig:
    """All LRPO settings; defaults are the original's (docs/methods.md 2) but for the run length and the corrections
    docs/methods.md section 4 lists (configs/lrpo_original.yaml has every original value)."""

    SMOKE: ClassVar[dict[str, float]] = {  # facereward.smoke
        "epochs": 1, "group_size": 2, "inputs_per_batch": 2, "batches_per_epoch": 1, "sample_steps": 3, "micro_batch": 2,
        "train_batch_size": 2, "reg_steps": 1, "trained_count": 1, "data.toy_faces": 8, "run.save_every": 1,
        "held_out.every": 1, "held_out.toy_faces": 2, "held_out.max_images": 2, "held_out.sample_steps": 2}

    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/lrpo", save_every=10, log_every=1))
    data: DataConfig = field(default_factory=DataConfig)
    init_from: str | None = None  # the restorer folder to fine-tune (default: the shipped toy restorer)
    imports: list[str] = field(default_factory=list)  # plugin modules or .py files imported first (register_measure, ...)
    lora: LoraSettings = field(default_factory=LoraSettings)
    rewards: MeasuresConfig = field(default_factory=MeasuresConfig)  # frm without options.frm.path: the shipped toy FRM
    # the decoded samples clamped to [0, 1] before the rewards; false: each reward sees the raw decoder output unless its
    # own `clamp` option is set (the original: LPIPS unclamped, the other terms clamped)
    clamp_x_hat: bool = True
    group_size: int = 9  # G candidates per LQ input
    # identical: a group's G rows are one degraded image; own_noise: they share the degradation's parameters but each
    # draws its own Gaussian noise (the original's groups)
    group_inputs: Literal["identical", "own_noise"] = "identical"
    # shuffle: each epoch's inputs a seeded permutation of the data; sequential: the data in file order, continuing
    # across epochs (the original's sampler)
    data_order: Literal["shuffle", "sequential"] = "shuffle"
    inputs_per_batch: int = 2  # LQ inputs per sampling batch, over all processes
    batches_per_epoch: int = 12
    epochs: int = 160
    sample_steps: int = 50  # DDIM sampling steps T
    spacing: str | None = None  # timestep spacing leading | linspace | trailing; None: the restorer's
    final_alpha_bar: str | None = None  # one | first (alpha-bar_0: ldm's DDIM, as both originals); None: the restorer's
    eta: float | str | None = 1.0  # a number > 0 (the policy needs noise)
    timestep_fraction: float = 0.99  # the first int(fraction * T) steps are trainable (never the last, sigma 0)
    # which trainable steps each sample trains per epoch (docs/methods.md 2.4): all; a random subset of `trained_count`
    # per sample (DDPO's timestep fraction); or a window of `trained_count` consecutive steps that moves one step
    # later every `window_every` epochs and wraps (MixGRPO's sliding window). The sampler is unchanged.
    trained_steps: Literal["all", "random", "window"] = "all"
    trained_count: int = 0  # random / window: steps per sample (0: all trainable steps)
    window_every: int = 1
    inner_epochs: int = 1
    clip_range: float = 1e-4
    adv_std: Literal["global", "group"] = "global"
    adv_weighting: Literal["noise_level", "uniform"] = "noise_level"
    adv_clip: float = 5.0
    kl_beta: float = 0.0
    kl_reference: Literal["auto", "copy", "base"] = "auto"  # auto: the LoRA-free base with LoRA, else a frozen copy
    reg_weight: float = 0.001  # 0 turns the likelihood regulariser off
    reg_steps: int = 5  # K: the last K trained steps
    reg_temperature: float = 40.0
    reg_noising: Literal["closed_form", "compounding"] = "closed_form"
    micro_batch: int = 6  # samples per network call, in rollouts and updates
    train_batch_size: int = 6  # samples per minibatch per process (0: all of the process's samples of the epoch)
    stepping: Literal["per_timestep", "per_minibatch"] = "per_timestep"  # one optimizer step per (minibatch, step) or per minibatch
    # drop: zero-advantage samples carry no loss, their rows stay in the minibatches; pad: the original's, some re-admitted
    # (the kept count padded to a multiple of batches_per_epoch), the rest removed before minibatching (fewer steps)
    zero_advantage: Literal["drop", "pad"] = "drop"
    gt_latent: Literal["mean", "sample"] = "mean"  # the GT latent for the regulariser: VAE posterior mean or a sample (original)
    lr: float = 1e-6
    weight_decay: float = 0.01  # AdamW's default, which the original keeps
    grad_clip: float = 1.0
    held_out: HeldOutConfig = field(default_factory=HeldOutConfig)


def check_config(config: LRPOConfig) -> int:
    """Validate `config` (ValueError naming the field); returns the number of trained steps."""
    if config.group_size < 2:
        raise ValueError(f"group_size must be >= 2 (a group of one has advantage 0, so nothing trains), got {config.group_size}")
    positive = ("epochs", "inputs_per_batch", "batches_per_epoch", "sample_steps", "inner_epochs", "micro_batch")
    for name in positive:
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")
    for name in ("train_batch_size", "reg_steps"):
        if getattr(config, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(config, name)}")
    for name in ("clip_range", "adv_clip", "reg_temperature", "lr"):
        if not getattr(config, name) > 0:
            raise ValueError(f"{name} must be > 0, got {getattr(config, name)}")
    for name in ("kl_beta", "reg_weight", "grad_clip", "weight_decay"):
        if getattr(config, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(config, name)}")
    if isinstance(config.eta, str) or config.eta is None or not 0 < config.eta:
        raise ValueError(f"eta must be > 0 (the policy needs noise), got {config.eta}")
    choices = {"adv_std": ("global", "group"), "adv_weighting": ("noise_level", "uniform"),
               "kl_reference": ("auto", "copy", "base"), "reg_noising": ("closed_form", "compounding"),
               "stepping": ("per_timestep", "per_minibatch"), "zero_advantage": ("drop", "pad"), "gt_latent": ("mean", "sample"),
               "group_inputs": ("identical", "own_noise"), "data_order": ("shuffle", "sequential")}
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(config, name)!r}")
    if config.run.gradient_accumulation_steps != 1:
        raise ValueError("run.gradient_accumulation_steps: lrpo accumulates by its own rule (stepping, train_batch_size); "
                         f"leave it at 1, got {config.run.gradient_accumulation_steps}")
    n_train = min(int(config.timestep_fraction * config.sample_steps), config.sample_steps - 1)
    if not 0 < config.timestep_fraction <= 1 or n_train < 1:
        raise ValueError(f"timestep_fraction {config.timestep_fraction} of {config.sample_steps} steps trains no step "
                         "(the last step has sigma 0 and is never trained)")
    if config.reg_weight > 0 and config.reg_steps > n_train:
        raise ValueError(f"reg_steps {config.reg_steps} exceeds the {n_train} trained steps")
    if config.trained_steps not in ("all", "random", "window"):
        raise ValueError(f"trained_steps must be one of all, random, window, got {config.trained_steps!r}")
    if not 0 <= config.trained_count <= n_train:
        raise ValueError(f"trained_count must be in [0, {n_train}] (the trainable steps), got {config.trained_count}")
    if config.window_every < 1:
        raise ValueError(f"window_every must be >= 1, got {config.window_every}")
    return n_train


def trained_step_table(config: LRPOConfig, n_train: int, rows: Tensor, epoch: int) -> Tensor:
    """(N, C) long: the trainable steps each sample trains this epoch, ascending (docs/methods.md 2.4).

    `rows` are the samples' global rows in the epoch, so a random subset is the same on 1 or N processes.
    """
    count = config.trained_count or n_train
    n = rows.numel()
    if config.trained_steps == "all" or count == n_train:
        return torch.arange(n_train).expand(n, n_train).clone()
    if config.trained_steps == "window":
        start = (epoch // config.window_every) % (n_train - count + 1)
        return torch.arange(start, start + count).expand(n, count).clone()
    picks = [np.sort(np.random.default_rng([config.run.seed, epoch, int(r), 13]).choice(n_train, count, replace=False))
             for r in rows.tolist()]
    return torch.as_tensor(np.stack(picks), dtype=torch.long).reshape(n, count)


# ---- advantages ---------------------------------------------------------------------------------


def noise_level_weights(sigmas: Tensor) -> Tensor:
    """w_k = sigma_k / mean_k' sigma_k' over the sampling steps, per sample: (B, T) -> (B, T) (docs/methods.md 2.3)."""
    return sigmas / sigmas.mean(dim=-1, keepdim=True).clamp_min(1e-12)


def step_advantages(advantages: Tensor, sigmas: Tensor, weighting: str = "noise_level", clip: float = 5.0) -> Tensor:
    """A_{i,k} = clip(A_i w_k, -clip, clip), w_k noise-level weights or 1 (uniform): (B,), (B, T) -> (B, T)."""
    if weighting == "noise_level":
        weights = noise_level_weights(sigmas.float())
    elif weighting == "uniform":
        weights = torch.ones_like(sigmas, dtype=torch.float32)
    else:
        raise ValueError(f"adv_weighting must be 'noise_level' or 'uniform', got {weighting!r}")
    return (advantages.float()[:, None] * weights).clamp(-clip, clip)


# ---- the loss terms -------------------------------------------------------------------------------


@dataclass
class PPOTerms:
    loss: Tensor  # (B,) per-sample clipped surrogate
    ratio: Tensor  # (B,) exp(logp - logp_old)
    clipped: Tensor  # (B,) bool: |ratio - 1| > clip_range


def ppo_clip_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float) -> PPOTerms:
    """max(-A rho, -A clip(rho, 1 - eps, 1 + eps)), rho = exp(logp - logp_old), per sample (docs/methods.md 2.3)."""
    ratio = torch.exp(log_prob.float() - old_log_prob.float())
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    return PPOTerms(torch.maximum(unclipped, clipped), ratio, (ratio - 1.0).abs() > clip_range)


def likelihood_regulariser(mean: Tensor, std: Tensor, target: Tensor, temperature: float = 40.0) -> Tensor:
    """1 - exp(mean_d log N(target; mean, std^2) / temperature), per sample (docs/methods.md 2.3)."""
    return 1.0 - torch.exp(gaussian_log_prob(target, mean, std) / temperature)


def gaussian_kl(mean: Tensor, ref_mean: Tensor, std: Tensor) -> Tensor:
    """KL(N(mean, std^2) || N(ref_mean, std^2)) averaged over elements, per sample (the optional KL term, docs/methods.md 2.3)."""
    diff = (mean.float() - ref_mean.float()) ** 2 / (2 * std.float() ** 2)
    return diff.flatten(1).mean(dim=1)


def noised_gt_targets(z_gt: Tensor, schedule: DDIMSchedule, reg_steps: list[int], noise: Tensor,
                      mode: str = "closed_form") -> Tensor:
    """The GT latent noised to each regularised step's output level t_{k+1}: (K, B, ...) (docs/methods.md 2.3).

    `noise` is (T, B, ...), one draw per level. closed_form: q(z_{t_{k+1}} | z_gt). compounding (the
    original's quirk): walk up from the lowest level applying q to the previous level's noised latent.
    """
    levels = [k + 1 for k in reg_steps]
    if mode == "closed_form":
        return torch.stack([q_sample(z_gt, noise[j], schedule.timesteps[j].expand(z_gt.shape[0]), schedule.alphas_cumprod)
                            for j in levels])
    if mode != "compounding":
        raise ValueError(f"reg_noising must be 'closed_form' or 'compounding', got {mode!r}")
    out, z = {}, z_gt
    for j in range(schedule.num_steps - 1, min(levels) - 1, -1):
        z = q_sample(z, noise[j], schedule.timesteps[j].expand(z_gt.shape[0]), schedule.alphas_cumprod)
        out[j] = z
    return torch.stack([out[j] for j in levels])


# ---- rollouts -----------------------------------------------------------------------------------


@dataclass
class EpochBuffer:
    """This process's recorded rollouts of one epoch, in rollout order (the first inner epoch's shuffle)."""

    samples: Tensor  # (n_train + 1, N, ...): x_{t_k} for the trained steps and the last one's output
    log_probs: Tensor  # (N, n_train) recorded log-probs
    sigmas: Tensor  # (N, T)
    cond: Tensor  # (N, ...)
    z_gt: Tensor  # (N, ...)
    group_ids: Tensor  # (N,) long
    rows: Tensor  # (N,) long: each sample's row in the epoch, over all processes: its random draws are seeded by it
    targets: Tensor | None = None  # (K, N, ...) noised GT for the regulariser
    advantages: Tensor | None = None  # (N, n_train)
    keep: Tensor | None = None  # (N,) bool: the sample carries loss
    steps: Tensor | None = None  # (N, C) long: the trained steps of each sample (trained_step_table); None: all

    def __len__(self) -> int:
        return self.log_probs.shape[0]


def rollout_order(n: int, seed: int, epoch: int, rank: int) -> Tensor:
    """The shuffle of this process's `n` rows that rollouts and the first inner epoch's minibatches follow."""
    return torch.from_numpy(np.random.default_rng([seed, epoch, rank, 0]).permutation(n))


@torch.no_grad()
def sample_epoch(restorer: Restorer, dataset: Dataset, schedule: DDIMSchedule, config: LRPOConfig, n_train: int,
                 reward: WeightedSum, accelerator: Accelerator, epoch: int,
                 net: nn.Module | None = None) -> tuple[EpochBuffer, dict[str, Tensor]]:
    """All of `epoch`'s group batches on this process, rolled out and scored: (buffer, {"reward", "reward/NAME"}).

    `net`: the trained network as prepared (FSDP needs its forward; every process makes the same number of calls).
    """
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    indices = epoch_input_indices(len(dataset), config.batches_per_epoch * config.inputs_per_batch, config.run.seed, epoch,
                                  config.data_order)
    parts: dict[str, list] = {"cond": [], "z_gt": [], "hq": [], "x_T": [], "groups": [], "rows": [], "captions": []}
    per_batch = config.inputs_per_batch * config.group_size
    for b in range(config.batches_per_epoch):
        inputs = indices[b * config.inputs_per_batch: (b + 1) * config.inputs_per_batch].tolist()
        batch = group_batch(dataset, inputs, config.group_size, b * config.inputs_per_batch, rank, world,
                            own_noise=config.group_inputs == "own_noise")
        rows = b * per_batch + batch.rows  # seeds per sample, not per process (docs/methods.md 4)
        generators = row_generators(device, *(mix_seed(config.run.seed, epoch, r, 1) for r in rows.tolist()))
        lq, hq = batch.lq.to(device), batch.hq.to(device)
        with accelerator.autocast():
            parts["cond"].append(restorer.condition(restorer.clean(lq)))
            parts["z_gt"].append(restorer.encode(hq, sample=config.gt_latent == "sample", generator=generators))
        parts["x_T"].append(randn(restorer.latent_shape(lq.shape[0], lq.shape[2], lq.shape[3]), generators, device))
        parts["hq"].append(hq)
        parts["groups"].append(batch.group_ids.to(device))
        parts["rows"].append(rows.to(device))
        parts["captions"] += batch.captions
    order = rollout_order(len(parts["captions"]), config.run.seed, epoch, rank)
    cond, z_gt, hq, x_T, groups, rows = (torch.cat(parts[k])[order.to(device)]
                                         for k in ("cond", "z_gt", "hq", "x_T", "groups", "rows"))
    captions = [parts["captions"][i] for i in order.tolist()]
    samples, log_probs, sigmas, scores = [], [], [], {}
    for start in range(0, len(captions), config.micro_batch):
        sl = slice(start, start + config.micro_batch)
        generators = row_generators(device, *(mix_seed(config.run.seed, epoch, r, 5) for r in rows[sl].tolist()))
        with accelerator.autocast():
            # x_T stays fp32 under bf16 autocast: only the network runs in bf16, the chain and its log-probs do not
            traj = rollout(restorer.eps_fn(cond[sl], net), x_T[sl], schedule, eta=config.eta, generator=generators)
            images = restorer.decode(traj.final)
            images = images.clamp(0, 1) if config.clamp_x_hat else images
        out = reward(images.float(), hq[sl], captions[sl])
        for name, value in {"reward": out.total, **{f"reward/{k}": v for k, v in out.components.items()}}.items():
            scores.setdefault(name, []).append(value.float())
        samples.append(traj.samples[: n_train + 1])
        log_probs.append(traj.log_probs[:, :n_train])
        sigmas.append(traj.sigmas)
    buffer = EpochBuffer(samples=torch.cat(samples, dim=1), log_probs=torch.cat(log_probs), sigmas=torch.cat(sigmas),
                         cond=cond, z_gt=z_gt, group_ids=groups, rows=rows)
    return buffer, {k: torch.cat(v) for k, v in scores.items()}


# ---- advantages and targets of an epoch ------------------------------------------------------------


def pad_zero_advantage(keep: Tensor, multiple: int, generator: np.random.Generator) -> Tensor:
    """The original's re-padding (T:399-409): re-admit random zero-advantage samples until the kept count is a multiple of
    `multiple`; when there are too few to reach it, none."""
    keep = keep.clone()
    missing = (-int(keep.sum())) % multiple
    dropped = torch.nonzero(~keep).flatten().cpu().numpy()
    if missing and len(dropped) >= missing:
        keep[torch.from_numpy(generator.permutation(dropped)[:missing]).to(keep.device)] = True
    return keep


def assign_advantages(buffer: EpochBuffer, rewards: Tensor, config: LRPOConfig, n_train: int, accelerator: Accelerator,
                      epoch: int = 0) -> tuple[Tensor, Tensor]:
    """Group advantages over all processes' samples, spread over steps, set on the buffer; returns (all rewards, all advantages)."""
    all_rewards, all_groups = accelerator.gather(rewards), accelerator.gather(buffer.group_ids)
    advantages = group_advantages(all_rewards, all_groups, config.adv_std)
    n = rewards.shape[0]
    local = advantages[accelerator.process_index * n: (accelerator.process_index + 1) * n]
    buffer.keep = local != 0  # docs/methods.md 2.3: samples with exactly zero advantage are dropped
    if config.zero_advantage == "pad":  # the original pads each process's kept count to a multiple of its sampling batches
        rng = np.random.default_rng([config.run.seed, epoch, accelerator.process_index, 11])
        buffer.keep = pad_zero_advantage(buffer.keep, config.batches_per_epoch, rng)
    buffer.advantages = step_advantages(local, buffer.sigmas, config.adv_weighting, config.adv_clip)[:, :n_train]
    return all_rewards, advantages


def set_regulariser_targets(buffer: EpochBuffer, schedule: DDIMSchedule, config: LRPOConfig, n_train: int, epoch: int) -> None:
    """Noise the GT latents to the regularised steps' levels, once per epoch, a micro-batch at a time (seeded per sample)."""
    if config.reg_weight <= 0:
        return
    reg_steps = list(range(n_train - config.reg_steps, n_train))
    targets = []
    for start in range(0, len(buffer), config.micro_batch):
        z_gt = buffer.z_gt[start: start + config.micro_batch]
        rows = buffer.rows[start: start + config.micro_batch].tolist()
        generators = row_generators(z_gt.device, *(mix_seed(config.run.seed, epoch, r, 3) for r in rows))
        noise = randn((len(rows), schedule.num_steps, *z_gt.shape[1:]), generators, z_gt.device, z_gt.dtype).transpose(0, 1)
        targets.append(noised_gt_targets(z_gt, schedule, reg_steps, noise, config.reg_noising))
    buffer.targets = torch.cat(targets, dim=1)


# ---- the update ---------------------------------------------------------------------------------


def _zero_stats(device: torch.device) -> dict[str, Tensor]:
    keys = ("pg", "reg", "kl", "clipped", "approx_kl", "count", "reg_count", "grad_norm", "opt_steps")
    stats = {k: torch.zeros((), device=device) for k in keys}
    stats["ratio_dev_max"] = torch.zeros((), device=device)
    stats["ratio_dev_first"] = torch.zeros((), device=device)  # before the epoch's first optimizer step
    return stats


def kept_rows_first(order: Tensor, keep: Tensor, accelerator: Accelerator) -> Tensor:
    """`zero_advantage: pad`: `order` with the rows that carry no loss removed, as the original removes them before
    minibatching; processes with fewer kept rows than the most add their own dropped rows at the end (zero weight), so
    that every process makes the same number of calls."""
    kept = keep[order.to(keep.device)].cpu()
    most = int(accelerator.reduce(torch.tensor(int(kept.sum()), device=accelerator.device), "max"))
    return torch.cat([order[kept], order[~kept]])[:most]


def minibatches(n: int, train_batch_size: int, order: Tensor) -> list[Tensor]:
    """`order` (a permutation of n rows) cut into minibatches of `train_batch_size` (0: one minibatch of all)."""
    size = train_batch_size or n
    return [order[s: s + size] for s in range(0, n, size)]


def step_loss(restorer: Restorer, net: nn.Module, buffer: EpochBuffer, rows: Tensor, k: int | Tensor, schedule: DDIMSchedule,
              config: LRPOConfig, n_train: int, count: float, reference: Reference | None, accelerator: Accelerator,
              stats: dict[str, Tensor], first: bool) -> Tensor:
    """The loss of trained step k on `rows`: their share of `mean pg_k + reg_weight * mean reg_k` (+ KL) (docs/methods.md 2.3).

    `k` is one step for all rows or one per row (trained_steps: random). Sums over the rows' kept samples divided by
    `count`, the minibatch's kept samples on all processes; `net` is the trained network as `accelerator.prepare` returned it.
    """
    rows = rows.to(buffer.log_probs.device)
    keep = buffer.keep[rows].float()
    ks = torch.as_tensor(k, device=rows.device).expand(rows.shape[0])
    x_t, x_prev, cond = buffer.samples[ks, rows], buffer.samples[ks + 1, rows], buffer.cond[rows]
    t = schedule.timesteps[ks.to(schedule.timesteps.device)].to(x_t.device)
    with accelerator.autocast():
        eps = restorer.predict_eps(x_t, t, cond, net=net)
    step = ddim_step_with_logprob(eps, t, x_t, schedule, config.eta, prev_sample=x_prev)
    old = buffer.log_probs[rows, ks]
    terms = ppo_clip_loss(step.log_prob, old, buffer.advantages[rows, ks], config.clip_range)
    loss = (keep * terms.loss).sum() / count  # mean pg_k over the minibatch
    reg_from = n_train - config.reg_steps if config.reg_weight > 0 else n_train
    in_reg = ks >= reg_from  # the rows whose step is one of the last K trained steps
    if bool(in_reg.any()):
        targets = buffer.targets[(ks - reg_from).clamp(min=0), rows]
        reg = likelihood_regulariser(step.mean, step.std, targets, config.reg_temperature)
        weight = keep * in_reg.float()
        loss = loss + config.reg_weight * (weight * reg).sum() / count  # + 0.001 mean reg_k
        stats["reg"] += (weight * reg).sum().detach()
        stats["reg_count"] += weight.sum()
    if reference is not None:
        with accelerator.autocast():
            ref_eps = reference.eps(x_t, t, cond)
        ref_mean = ddim_step_with_logprob(ref_eps, t, x_t, schedule, config.eta, prev_sample=x_prev).mean
        kl = gaussian_kl(step.mean, ref_mean, step.std)
        loss = loss + config.kl_beta * (keep * kl).sum() / count
        stats["kl"] += (keep * kl).sum().detach()
    diff = (step.log_prob.detach() - old).float()
    stats["pg"] += (keep * terms.loss).sum().detach()
    stats["clipped"] += (keep * terms.clipped.float()).sum()
    stats["approx_kl"] += (keep * 0.5 * diff**2).sum()
    stats["count"] += keep.sum()
    dev = (keep * (terms.ratio.detach() - 1).abs()).max()
    stats["ratio_dev_max"] = torch.maximum(stats["ratio_dev_max"], dev)
    if first:
        stats["ratio_dev_first"] = torch.maximum(stats["ratio_dev_first"], dev)
    return loss


def update_epoch(restorer: Restorer, net: nn.Module, optimizer: torch.optim.Optimizer, buffer: EpochBuffer,
                 schedule: DDIMSchedule, config: LRPOConfig, n_train: int, reference: Reference | None,
                 accelerator: Accelerator, epoch: int) -> list[dict[str, Tensor]]:
    """The `inner_epochs` PPO passes over this epoch's samples; per inner epoch, summed statistics (tensors, no host sync).

    `net` and `optimizer` are as `accelerator.prepare` returned them. Every process makes the same number of
    backward calls per optimizer step (the same number of rows each), those with no kept sample with a zero loss;
    gradients are synchronised on the step's last one only (`micro_step`).
    """
    n, all_stats, stepped = len(buffer), [], False
    table = buffer.steps if buffer.steps is not None else torch.arange(n_train).expand(n, n_train)
    n_steps = table.shape[1]

    def steps_of(rows: Tensor, j: int) -> int | Tensor:
        """The j-th trained step of each of `rows`: one int when they share it (all, window), else per row."""
        ks = table[rows.to(table.device), j]
        return int(ks[0]) if bool((ks == ks[0]).all()) else ks
    # DDP and DeepSpeed average gradients over processes; the loss is a share of a global mean, so their sum is wanted
    scale = float(accelerator.num_processes)
    for inner in range(config.inner_epochs):
        # the rollout order already is the first inner epoch's shuffle; later passes reshuffle
        order = torch.arange(n) if inner == 0 else torch.from_numpy(
            np.random.default_rng([config.run.seed, epoch, inner, accelerator.process_index, 7]).permutation(n))
        if config.zero_advantage == "pad":
            order = kept_rows_first(order, buffer.keep, accelerator)
        batches = minibatches(len(order), config.train_batch_size, order)
        counts = torch.stack([buffer.keep[mb.to(buffer.keep.device)].sum() for mb in batches]).float()
        counts = accelerator.reduce(counts, "sum")  # the global number of kept samples of each minibatch
        stats = _zero_stats(accelerator.device)

        def optimizer_step() -> None:
            nonlocal stepped
            if config.grad_clip > 0:
                norm = accelerator.clip_grad_norm_(net.parameters(), config.grad_clip)
                if norm is not None:
                    stats["grad_norm"] += torch.as_tensor(norm, device=accelerator.device).float()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            stats["opt_steps"] += 1
            stepped = True

        def backward(rows: Tensor, k: int, count: float, divisor: float, last: bool) -> None:
            with micro_step(accelerator, net, sync=last):
                loss = step_loss(restorer, net, buffer, rows, k, schedule, config, n_train, count, reference, accelerator,
                                 stats, not stepped)
                accelerator.backward(loss * (scale / divisor))

        for mb, count in zip(batches, counts.tolist()):
            if count == 0:
                continue  # every process agrees: nothing to learn from in this minibatch
            pieces = [mb[s: s + config.micro_batch] for s in range(0, len(mb), config.micro_batch)]
            optimizer.zero_grad(set_to_none=True)
            if config.stepping == "per_timestep":  # the original: one step per (minibatch, timestep)
                for j in range(n_steps):
                    for i, rows in enumerate(pieces):
                        backward(rows, steps_of(rows, j), count, 1.0, last=i == len(pieces) - 1)
                    optimizer_step()
            else:  # the minibatch's timesteps in one step: the per-step losses averaged over the trained steps
                for i, rows in enumerate(pieces):
                    for j in range(n_steps):
                        backward(rows, steps_of(rows, j), count, float(n_steps), last=i == len(pieces) - 1 and j == n_steps - 1)
                optimizer_step()
        all_stats.append(stats)
    return all_stats


# ---- one epoch ------------------------------------------------------------------------------------


def epoch_scalars(scores: dict[str, Tensor], advantages: Tensor, inner_stats: list[dict[str, Tensor]],
                  accelerator: Accelerator) -> dict[str, float]:
    """The epoch's logged numbers (one host sync): rewards, advantage stats and, per inner epoch, the PPO statistics."""
    out: dict[str, Tensor] = {}
    for name, value in scores.items():
        out[name] = accelerator.gather(value).mean()
    out["reward_std"] = accelerator.gather(scores["reward"]).std(unbiased=False)
    out["adv/mean"] = advantages.mean()
    out["adv/std"] = advantages.std(unbiased=False)
    out["adv/abs_max"] = advantages.abs().max()
    out["adv/kept_fraction"] = (advantages != 0).float().mean()
    for i, stats in enumerate(inner_stats):
        summed = {k: accelerator.reduce(v.clone(), "sum") for k, v in stats.items() if not k.startswith("ratio_dev")}
        count = summed["count"].clamp_min(1)
        prefix = "ppo/" if len(inner_stats) == 1 else f"ppo/inner{i}/"
        out[prefix + "loss_pg"] = summed["pg"] / count
        out[prefix + "clip_fraction"] = summed["clipped"] / count
        out[prefix + "approx_kl"] = summed["approx_kl"] / count
        dev_max = stats["ratio_dev_max"].clone()
        if accelerator.num_processes > 1:
            torch.distributed.all_reduce(dev_max, op=torch.distributed.ReduceOp.MAX)
        out[prefix + "ratio_dev_max"] = dev_max
        first = stats["ratio_dev_first"].clone()
        if accelerator.num_processes > 1:
            torch.distributed.all_reduce(first, op=torch.distributed.ReduceOp.MAX)
        out[prefix + "ratio_dev_first"] = first
        out[prefix + "regulariser"] = summed["reg"] / summed["reg_count"].clamp_min(1)
        out[prefix + "kl"] = summed["kl"] / count
        out[prefix + "grad_norm"] = summed["grad_norm"] / summed["opt_steps"].clamp_min(1)
        out[prefix + "optimizer_steps"] = summed["opt_steps"] / accelerator.num_processes
    values = torch.stack([v.float().reshape(()) for v in out.values()]).cpu().tolist()
    return dict(zip(out, values))


# ---- the trainer -----------------------------------------------------------------------------------


def rewards_with_defaults(rewards: MeasuresConfig, init_from: str | None = None) -> MeasuresConfig:
    """A copy of `rewards` where an frm reward without a path scores with the shipped toy FRM (as `refl` does); with
    your own restorer (`init_from`), a missing path is an error."""
    options = {k: dict(v or {}) for k, v in rewards.options.items()}
    if "frm" in rewards.weights:
        options.setdefault("frm", {})["path"] = frm_path_or_default(options.get("frm", {}).get("path"), init_from)
    return MeasuresConfig(weights=dict(rewards.weights), options=options)


def _held_out(config: LRPOConfig, reward: WeightedSum, size: int, device: torch.device) -> HeldOutEvaluator | None:
    if config.held_out.every <= 0:
        return None
    return HeldOutEvaluator(config.held_out, config.data, size, device, extra=reward.scorers())


def lrpo_workload(config: LRPOConfig, n_train: int) -> Workload:
    """Per sample: T rollout forwards (+ a reference forward per trained step with KL) and a forward + backward per
    trained step and inner epoch, in micro-batches."""
    trained = (config.trained_count or n_train) if config.trained_steps != "all" else n_train
    updates = trained * config.inner_epochs
    return Workload(config.micro_batch, config.sample_steps + (updates if config.kl_beta > 0 else 0), updates)


def train_lrpo(config: LRPOConfig) -> Path:
    """Run LRPO (resuming if asked); writes OUTPUT/model (LoRA merged) and OUTPUT/metrics.json; returns the model folder."""
    import_plugins(config.imports, option="imports")
    n_train = check_config(config)
    run = config.run
    accelerator = make_accelerator(run, "lrpo")
    write_run_config(config, run, accelerator)
    require_multi_step(config.init_from or default_restorer_path(), "lrpo")
    restorer = Restorer.from_pretrained(config.init_from or default_restorer_path())
    if config.data.size != restorer.config.size:
        raise ValueError(f"data.size {config.data.size} differs from the model size {restorer.config.size}")
    restorer.to(accelerator.device)
    module = prepare_trainable(restorer, config.lora, gradient_checkpointing=run.gradient_checkpointing)
    check_engine(accelerator, module)
    speed_up_stage2(run, accelerator, restorer, module, lrpo_workload(config, n_train), "lrpo")
    optimizer = torch.optim.AdamW(trainable_parameters(module), lr=config.lr, weight_decay=config.weight_decay)
    reference = Reference(restorer, module, config.kl_reference) if config.kl_beta > 0 else None
    # Only the trained network goes through prepare (DeepSpeed's one-model rule); rewards and the reference stay plain.
    set_deepspeed_micro_batch(accelerator, config.micro_batch)
    net, optimizer = accelerator.prepare(module, optimizer)
    reward = WeightedSum.from_config(rewards_with_defaults(config.rewards, config.init_from), as_reward=True, device=accelerator.device,
                                     env=MeasureEnv(accelerator.device, toy=config.data.toy_faces > 0), where="rewards")
    dataset = build_dataset(config.data)
    schedule = restorer.schedule(config.sample_steps, config.spacing, config.final_alpha_bar, device=accelerator.device)
    held_out = _held_out(config, reward, restorer.config.size, accelerator.device) if accelerator.is_main_process else None
    state = resume_run(accelerator, run)
    epochs = EpochRecorder("lrpo", config.epochs, run, config.held_out, held_out, accelerator, state, net, module,
                           {"stage2": net}, {"optimizer": optimizer})
    # every draw of an epoch has its own (seed, epoch, sample) generator; this covers any other
    restore_run(accelerator, state, epochs.modules, epochs.optimizers)
    epochs.baseline(restorer)
    for epoch in range(epochs.start, config.epochs):
        epoch_start = time.perf_counter()
        buffer, scores = sample_epoch(restorer, dataset, schedule, config, n_train, reward, accelerator, epoch, net)
        buffer.steps = trained_step_table(config, n_train, buffer.rows, epoch)
        _, advantages = assign_advantages(buffer, scores["reward"], config, n_train, accelerator, epoch)
        set_regulariser_targets(buffer, schedule, config, n_train, epoch)
        inner = update_epoch(restorer, net, optimizer, buffer, schedule, config, n_train, reference, accelerator, epoch)
        del buffer
        scalars = epoch_scalars(scores, advantages, inner, accelerator)
        if epochs.end_epoch(epoch + 1, scalars, time.perf_counter() - epoch_start, scalars["reward"], restorer):
            break
    return epochs.finish(restorer)
