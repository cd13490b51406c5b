"""`facereward nft`: DiffusionNFT (Zheng et al., ICLR 2026) for the restorer, docs/methods.md 5.1.

One epoch: the old policy samples `batches_per_epoch` group batches with the restorer's own DDIM sampler (eta 0 by
default: no trajectory is kept, any sampler would do), the composite reward scores the clean samples, group
advantages become optimality weights r in [0, 1]; then each clean sample is noised afresh at every trained sampling
timestep and the trained network learns from the implicit positive policy `beta * theta + (1 - beta) * old` (pulled
to the sample with weight r) and the implicit negative one `(1 + beta) * old - beta * theta` (weight 1 - r), each an
x0-prediction error normalised by its own mean absolute error. After the epoch the old policy moves towards the
trained one by an exponential average whose decay grows with the optimizer steps.

Every trained timestep of every sample of a minibatch accumulates into one optimizer step (`steps_per_epoch` steps an
epoch), as the authors' gradient accumulation does. The old policy is a frozen copy of the trained network (of its
LoRA adapters' module with LoRA), so full training holds a second copy, and a third with the KL term's copy.
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

from facereward.data.training_data import DataConfig, build_dataset
from facereward.measures import MeasureEnv, MeasuresConfig, WeightedSum
from facereward.models.ddim import DDIMSchedule, mix_seed, output_to_x0, q_sample, randn, row_generators
from facereward.models.families import require_multi_step
from facereward.models.restorer import Restorer
from facereward.plugins import import_plugins
from facereward.train.accelerator import (
    RunConfig,
    sharded_weights,
    check_engine,
    make_accelerator,
    micro_step,
    set_deepspeed_micro_batch,
)
from facereward.train.checkpoints import restore_run, resume_run, write_run_config
from facereward.train.groups import GroupSamples, group_advantages, sample_groups
from facereward.train.epochs import EpochRecorder
from facereward.train.heldout import HeldOutConfig, HeldOutEvaluator
from facereward.train.lrpo import rewards_with_defaults
from facereward.train.speed import Workload, speed_up_stage2
from facereward.train.trainable import (
    LoraSettings,
    Reference,
    frozen_copy,
    prepare_trainable,
    trainable_parameters,
)
from facereward.weights import default_restorer_path


@dataclass
class NFTConfig:
    """All NFT settings; defaults are the authors' SD3 recipe (config/nft.py, config/base.py) but for the run length and
    the sampler (the restorer's own DDIM, eta 0, where they use a 10-step DPM2 solver)."""

    SMOKE: ClassVar[dict[str, float]] = {  # facereward.smoke
        "epochs": 1, "group_size": 2, "inputs_per_batch": 2, "batches_per_epoch": 1, "sample_steps": 3, "micro_batch": 2,
        "data.toy_faces": 8, "run.save_every": 1, "held_out.every": 1, "held_out.toy_faces": 2, "held_out.max_images": 2,
        "held_out.sample_steps": 2}

    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/nft", save_every=10, log_every=1))
    data: DataConfig = field(default_factory=DataConfig)
    init_from: str | None = None  # the restorer folder to fine-tune (default: the shipped toy restorer)
    imports: list[str] = field(default_factory=list)  # plugin modules or .py files imported first (register_measure, ...)
    lora: LoraSettings = field(default_factory=LoraSettings)  # the authors: rank 32, alpha 64 (a scale of 2)
    rewards: MeasuresConfig = field(default_factory=MeasuresConfig)  # frm without options.frm.path: the shipped toy FRM
    clamp_x_hat: bool = True  # the decoded samples clamped to [0, 1] before the rewards
    group_size: int = 24  # samples per LQ input (the authors' images per prompt)
    group_inputs: Literal["identical", "own_noise"] = "identical"  # as LRPO's
    data_order: Literal["shuffle", "sequential"] = "shuffle"  # as LRPO's
    inputs_per_batch: int = 4  # LQ inputs per sampling batch, over all processes
    batches_per_epoch: int = 12  # 48 groups an epoch, as the authors'
    epochs: int = 100
    sample_steps: int = 10  # the sampler's steps; the trained timesteps are its first int(fraction * steps)
    spacing: str | None = None  # timestep spacing leading | linspace | trailing; None: the restorer's
    final_alpha_bar: str | None = None  # one | first; None: the restorer's
    eta: float = 0.0  # the sampler's DDIM eta (0: deterministic, as the authors' solver)
    timestep_fraction: float = 0.99
    beta: float = 1.0  # the implicit policies' mixing strength (the authors: 1, 0.1 for OCR and the multi-reward run)
    adv_std: Literal["global", "group"] = "global"  # group means, one std over all samples (the authors' global_std)
    adv_clip: float = 5.0  # advantages clipped to +-adv_clip, mapped to r = A / (2 adv_clip) + 1/2; the loss is scaled by it
    kl_beta: float = 1e-4  # weight of the mean squared output difference to the reference (0: off)
    kl_reference: Literal["auto", "copy", "base"] = "auto"  # auto: the LoRA-free base with LoRA, else a frozen copy
    # the old policy after each epoch: old <- decay * old + (1 - decay) * theta, decay = 0 for the first
    # `old_decay_flat` optimizer steps, then min((steps - flat) * rate, max); the authors' types 0, 1, 2 are
    # (0, 0, 0), (0, 0.001, 0.5) (their default) and (75, 0.0075, 0.999)
    old_decay_flat: int = 0
    old_decay_rate: float = 0.001
    old_decay_max: float = 0.5
    steps_per_epoch: int = 1  # optimizer steps an epoch, each over its share of the samples and all trained timesteps
    inner_epochs: int = 1
    micro_batch: int = 6  # samples per network call, in sampling and updates
    lr: float = 3e-4  # the authors' (with LoRA); full training wants far less
    weight_decay: float = 1e-4
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    held_out: HeldOutConfig = field(default_factory=HeldOutConfig)


def check_config(config: NFTConfig) -> int:
    """Validate `config` (ValueError naming the field); returns the number of trained timesteps."""
    if config.group_size < 2:
        raise ValueError(f"group_size must be >= 2 (a group of one has advantage 0), got {config.group_size}")
    for name in ("epochs", "inputs_per_batch", "batches_per_epoch", "sample_steps", "inner_epochs", "micro_batch",
                 "steps_per_epoch"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")
    for name in ("beta", "adv_clip", "lr"):
        if not getattr(config, name) > 0:
            raise ValueError(f"{name} must be > 0, got {getattr(config, name)}")
    for name in ("kl_beta", "grad_clip", "weight_decay", "eta", "old_decay_flat", "old_decay_rate"):
        if getattr(config, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(config, name)}")
    if not 0 <= config.old_decay_max < 1:
        raise ValueError(f"old_decay_max must be in [0, 1), got {config.old_decay_max}")
    choices = {"adv_std": ("global", "group"), "kl_reference": ("auto", "copy", "base"),
               "group_inputs": ("identical", "own_noise"), "data_order": ("shuffle", "sequential")}
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(config, name)!r}")
    if config.run.gradient_accumulation_steps != 1:
        raise ValueError("run.gradient_accumulation_steps: nft accumulates by its own rule (steps_per_epoch); leave it at 1, "
                         f"got {config.run.gradient_accumulation_steps}")
    n_train = int(config.timestep_fraction * config.sample_steps)
    if not 0 < config.timestep_fraction <= 1 or n_train < 1:
        raise ValueError(f"timestep_fraction {config.timestep_fraction} of {config.sample_steps} steps trains no timestep")
    total = config.inputs_per_batch * config.group_size * config.batches_per_epoch
    if config.steps_per_epoch > total:
        raise ValueError(f"steps_per_epoch {config.steps_per_epoch} exceeds the {total} samples of an epoch")
    return n_train


# ---- the loss (docs/methods.md 5.1) ----------------------------------------------------------------


def optimality(advantages: Tensor, clip: float) -> Tensor:
    """r = clamp(clip(A, -c, c) / (2c) + 1/2, 0, 1): the probability-like weight of the positive policy."""
    return (advantages.float().clamp(-clip, clip) / clip / 2 + 0.5).clamp(0, 1)


def old_decay(opt_steps: int, flat: int, rate: float, cap: float) -> float:
    """The old policy's averaging decay after `opt_steps` optimizer steps: 0 before `flat`, then (steps - flat) * rate
    up to `cap`."""
    return 0.0 if opt_steps < flat else min((opt_steps - flat) * rate, cap)


@dataclass
class NFTTerms:
    loss: Tensor  # (B,) r * L+ / beta + (1 - r) * L- / beta
    positive: Tensor  # (B,) L+
    negative: Tensor  # (B,) L-


def _normalised_error(x0_hat: Tensor, x0: Tensor) -> Tensor:
    """mean (x0_hat - x0)^2 / sg(mean |x0_hat - x0|), per sample (the adaptive weighting, floor 1e-5)."""
    dims = tuple(range(1, x0.ndim))
    with torch.no_grad():
        scale = (x0_hat.double() - x0.double()).abs().mean(dim=dims).clamp_min(1e-5)
    return (x0_hat - x0).pow(2).mean(dim=dims) / scale.to(x0_hat.dtype)


def nft_loss(x0_theta: Tensor, x0_old: Tensor, x0: Tensor, r: Tensor, beta: float) -> NFTTerms:
    """The NFT loss per sample from x0 predictions of the trained and the old network at the same x_t.

    positive = beta x0_theta + (1 - beta) x0_old, negative = (1 + beta) x0_old - beta x0_theta (the implicit policies:
    x0 is affine in the network output, so mixing outputs mixes x0 predictions the same way, docs/methods.md 5.1).
    """
    x0_old = x0_old.detach()
    positive = _normalised_error(beta * x0_theta + (1 - beta) * x0_old, x0)
    negative = _normalised_error((1 + beta) * x0_old - beta * x0_theta, x0)
    r = r.to(positive.dtype)
    return NFTTerms((r * positive + (1 - r) * negative) / beta, positive, negative)


# ---- the update ------------------------------------------------------------------------------------


def timestep_order(rows: Tensor, n_train: int, seed: int, epoch: int, inner: int) -> Tensor:
    """(N, n_train) long: each sample's trained timestep indices in its own seeded order (the authors shuffle them per
    sample, so a network call mixes noise levels)."""
    perms = [np.random.default_rng([seed, epoch, inner, int(r), 17]).permutation(n_train) for r in rows.tolist()]
    return torch.as_tensor(np.stack(perms), dtype=torch.long).reshape(len(perms), n_train)


def update_epoch(restorer: Restorer, net: nn.Module, old: nn.Module, optimizer: torch.optim.Optimizer, samples: GroupSamples,
                 r: Tensor, schedule: DDIMSchedule, config: NFTConfig, n_train: int, reference: Reference | None,
                 accelerator: Accelerator, epoch: int) -> dict[str, Tensor]:
    """The `inner_epochs` passes over the epoch's samples, `steps_per_epoch` optimizer steps each; summed statistics.

    Each step's loss is a share of the mean over the step's samples (over all processes) and trained timesteps; every
    process holds the same number of samples, so all make the same backward calls, synchronised on the last.
    """
    device, n, kind = accelerator.device, len(samples), restorer.prediction_type
    scale = float(accelerator.num_processes)  # DDP averages gradients; each process's loss is a share of the global mean
    alphas = restorer.scheduler.alphas_cumprod.to(device)
    keys = ("loss", "positive", "negative", "kl", "old_gap", "count", "grad_norm", "opt_steps")
    stats = {k: torch.zeros((), device=device) for k in keys}
    for inner in range(config.inner_epochs):
        order = torch.from_numpy(np.random.default_rng([config.run.seed, epoch, inner, accelerator.process_index, 7]).permutation(n))
        size = -(-n // config.steps_per_epoch)
        for start in range(0, n, size):
            rows = order[start: start + size].to(device)
            count = float(len(rows)) * accelerator.num_processes
            pieces = [rows[s: s + config.micro_batch] for s in range(0, len(rows), config.micro_batch)]
            noises = [randn((len(p), n_train, *samples.x0.shape[1:]),
                            row_generators(device, *(mix_seed(config.run.seed, epoch, int(samples.rows[i]), 20 + inner)
                                                     for i in p.tolist())), device) for p in pieces]
            orders = [timestep_order(samples.rows[p], n_train, config.run.seed, epoch, inner).to(device) for p in pieces]
            optimizer.zero_grad(set_to_none=True)
            for j in range(n_train):
                for i, piece in enumerate(pieces):
                    x0, cond = samples.x0[piece], samples.cond[piece]
                    t = schedule.timesteps.to(device)[orders[i][:, j]]
                    x_t = q_sample(x0, noises[i][:, j], t, alphas)
                    abar = alphas[t]
                    with micro_step(accelerator, net, sync=j == n_train - 1 and i == len(pieces) - 1):
                        with accelerator.autocast():
                            out = restorer.predict_output(x_t, t, cond, net=net)
                            with torch.no_grad():
                                out_old = restorer.predict_output(x_t, t, cond, net=old)
                        x0_theta = output_to_x0(out.float(), x_t, abar, kind)
                        x0_old = output_to_x0(out_old.float(), x_t, abar, kind)
                        terms = nft_loss(x0_theta, x0_old, x0, r[piece], config.beta)
                        per_sample = config.adv_clip * terms.loss
                        if reference is not None:
                            with accelerator.autocast():
                                ref = reference.output(x_t, t, cond)
                            kl = (out.float() - ref.float()).pow(2).flatten(1).mean(1)
                            per_sample = per_sample + config.kl_beta * kl
                            stats["kl"] += kl.detach().sum()
                        accelerator.backward(per_sample.sum() * (scale / (count * n_train)))
                    stats["loss"] += per_sample.detach().sum()
                    stats["positive"] += terms.positive.detach().sum()
                    stats["negative"] += terms.negative.detach().sum()
                    stats["old_gap"] += (x0_theta - x0_old).detach().pow(2).flatten(1).mean(1).sum()
                    stats["count"] += len(piece)
            if config.grad_clip > 0:
                norm = accelerator.clip_grad_norm_(net.parameters(), config.grad_clip)
                if norm is not None:
                    stats["grad_norm"] += torch.as_tensor(norm, device=device).float()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            stats["opt_steps"] += 1
    return stats


@torch.no_grad()
def update_old(old: nn.Module, current: nn.Module, names: list[str], decay: float) -> None:
    """old <- decay * old + (1 - decay) * current, over the trained parameters `names` (the authors' per-epoch update)."""
    now = dict(current.named_parameters())
    for name, p in old.named_parameters():
        if name in names:
            p.mul_(decay).add_(now[name].detach().to(p.dtype), alpha=1.0 - decay)


def epoch_scalars(scores: dict[str, Tensor], advantages: Tensor, r: Tensor, stats: dict[str, Tensor],
                  accelerator: Accelerator) -> dict[str, float]:
    """The epoch's logged numbers (one host sync)."""
    out: dict[str, Tensor] = {name: accelerator.gather(value).mean() for name, value in scores.items()}
    out["reward_std"] = accelerator.gather(scores["reward"]).std(unbiased=False)
    out["adv/abs_mean"] = advantages.abs().mean()
    out["nft/r_mean"] = accelerator.gather(r).mean()
    summed = {k: accelerator.reduce(v.clone(), "sum") for k, v in stats.items()}
    count = summed["count"].clamp_min(1)
    for name in ("loss", "positive", "negative", "kl", "old_gap"):
        out[f"nft/{name}"] = summed[name] / count
    out["nft/grad_norm"] = summed["grad_norm"] / summed["opt_steps"].clamp_min(1)
    out["nft/optimizer_steps"] = summed["opt_steps"] / accelerator.num_processes
    values = torch.stack([v.float().reshape(()) for v in out.values()]).cpu().tolist()
    return dict(zip(out, values))


def nft_workload(config: NFTConfig, n_train: int) -> Workload:
    """Per sample: T sampling forwards, and per trained timestep and inner epoch an old (+ reference) forward and a
    trained forward + backward."""
    updates = n_train * config.inner_epochs
    return Workload(config.micro_batch, config.sample_steps + updates * (2 if config.kl_beta > 0 else 1), updates)


def train_nft(config: NFTConfig) -> Path:
    """Run NFT (resuming if asked); writes OUTPUT/model (LoRA merged) and OUTPUT/metrics.json; returns the model folder."""
    import_plugins(config.imports, option="imports")
    n_train = check_config(config)
    run = config.run
    accelerator = make_accelerator(run, "nft")
    if sharded_weights(accelerator):
        raise ValueError("nft keeps a whole old policy on every process, which FSDP and ZeRO-3 shard away: use DDP or "
                         "DeepSpeed ZeRO-1/2 (configs/accelerate/ddp.yaml, deepspeed_zero2_offload.yaml)")
    write_run_config(config, run, accelerator)
    require_multi_step(config.init_from or default_restorer_path(), "nft")
    restorer = Restorer.from_pretrained(config.init_from or default_restorer_path())
    if config.data.size != restorer.config.size:
        raise ValueError(f"data.size {config.data.size} differs from the model size {restorer.config.size}")
    restorer.to(accelerator.device)
    module = prepare_trainable(restorer, config.lora, gradient_checkpointing=run.gradient_checkpointing)
    check_engine(accelerator, module)
    trained_names = [name for name, p in module.named_parameters() if p.requires_grad]
    old = frozen_copy(module)  # the sampling policy, refreshed by averaging after each epoch
    speed_up_stage2(run, accelerator, restorer, module, nft_workload(config, n_train), "nft")
    optimizer = torch.optim.AdamW(trainable_parameters(module), lr=config.lr, weight_decay=config.weight_decay,
                                  eps=config.adam_eps)
    reference = Reference(restorer, module, config.kl_reference) if config.kl_beta > 0 else None
    set_deepspeed_micro_batch(accelerator, config.micro_batch)
    net, optimizer = accelerator.prepare(module, optimizer)
    reward = WeightedSum.from_config(rewards_with_defaults(config.rewards, config.init_from), as_reward=True,
                                     device=accelerator.device, env=MeasureEnv(accelerator.device, toy=config.data.toy_faces > 0),
                                     where="rewards")
    dataset = build_dataset(config.data)
    schedule = restorer.schedule(config.sample_steps, config.spacing, config.final_alpha_bar, device=accelerator.device)
    held_out = (HeldOutEvaluator(config.held_out, config.data, restorer.config.size, accelerator.device, extra=reward.scorers())
                if config.held_out.every > 0 and accelerator.is_main_process else None)
    state = resume_run(accelerator, run)
    epochs = EpochRecorder("nft", config.epochs, run, config.held_out, held_out, accelerator, state, net, module,
                           {"stage2": net, "old": old}, {"optimizer": optimizer},
                           lambda: {"optimizer_steps": opt_steps})
    opt_steps = int(state.get("optimizer_steps", 0)) if state else 0
    restore_run(accelerator, state, epochs.modules, epochs.optimizers)
    epochs.baseline(restorer)
    for epoch in range(epochs.start, config.epochs):
        epoch_start = time.perf_counter()
        samples = sample_groups(restorer, dataset, schedule, config, reward, accelerator, epoch, run.seed, config.eta, net=old)
        all_rewards, all_groups = accelerator.gather(samples.scores["reward"]), accelerator.gather(samples.group_ids)
        advantages = group_advantages(all_rewards, all_groups, config.adv_std)
        n = len(samples)
        local = advantages[accelerator.process_index * n: (accelerator.process_index + 1) * n]
        r = optimality(local, config.adv_clip)
        stats = update_epoch(restorer, net, old, optimizer, samples, r, schedule, config, n_train, reference, accelerator, epoch)
        opt_steps += config.steps_per_epoch * config.inner_epochs
        decay = old_decay(opt_steps, config.old_decay_flat, config.old_decay_rate, config.old_decay_max)
        update_old(old, accelerator.unwrap_model(net), trained_names, decay)
        scalars = epoch_scalars(samples.scores, local, r, stats, accelerator)
        scalars["nft/old_decay"] = decay
        del samples
        if epochs.end_epoch(epoch + 1, scalars, time.perf_counter() - epoch_start, scalars["reward"], restorer):
            break
    return epochs.finish(restorer)
