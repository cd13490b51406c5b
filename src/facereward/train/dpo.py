"""`facereward dpo`: Diffusion-DPO (Wallace et al. 2023) for the conditional restorer (docs/methods.md 5.2).

A pair is two restorations of one LQ input, the preferred x_w and the rejected x_l. Both are noised with the SAME
noise to the SAME uniform timestep t; the trained network and the reference (the initial network: the LoRA-free base
with LoRA, else a frozen copy made before training) each predict the training target (eps, v or x0: the model's
prediction type), and their per-sample MSEs m_w, m_l (model) and r_w, r_l (reference) give

    inside = -beta / 2 * ((m_w - m_l) - (r_w - r_l)),    loss = -log sigmoid(inside), averaged over the pairs.

The implicit accuracy is the fraction of pairs with inside > 0 and the reward margin the mean of inside (DPO's implicit
reward of x_w minus that of x_l); at the first step, where the model is the reference, inside is exactly 0 and the
loss log 2.

Pairs come from one of two sources:

- offline (`pairs`: a preference JSONL, facereward.data.preferences): every pair needs its `lq` (the condition);
  chosen and rejected are encoded to the diffusion space (the VAE posterior mean in latent mode). Each epoch is a
  seeded permutation of the pairs; ties are skipped (`skip_ties`).
- online (`pairs` unset): each epoch the current network samples `batches_per_epoch` x `inputs_per_batch` groups
  of `group_size` restorations (`facereward.train.groups.sample_groups`, DDIM at `eta`), the reward ranks each
  group, and its i-th best sample is paired with its i-th worst for i < `pairs_per_group` (as DP2O-SR pairs a
  model's own samples ranked by a reward); pairs whose reward difference is 0 or under `min_margin` are dropped.

An epoch's pairs (in a seeded order) are cut into optimizer steps of `batch_size` pairs over all processes; each
process takes its share of a step's pairs by position and runs it `micro_batch` pairs per network call. Every random
draw of a pair (t and the noise) is seeded by (run.seed, epoch, the pair's position in the epoch), so 1 and N
processes train on the same global steps. Only the stage-2 network (or its LoRA adapters) is trained.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import Tensor, nn

from facereward.data.imageio import ImageError, image_to_tensor, read_image
from facereward.data.preferences import PreferencePair, load_pairs
from facereward.data.training_data import DataConfig, build_dataset
from facereward.measures import MeasureEnv, MeasuresConfig, WeightedSum
from facereward.models.ddim import mix_seed, q_sample, training_target
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
from facereward.train.checkpoints import restore_run, resume_run, write_run_config
from facereward.train.groups import GroupSamples, sample_groups
from facereward.train.epochs import EpochRecorder
from facereward.train.heldout import HeldOutConfig, HeldOutEvaluator
from facereward.train.lrpo import rewards_with_defaults
from facereward.train.speed import Workload, speed_up_stage2
from facereward.train.trainable import (
    LoraSettings,
    Reference,
    prepare_trainable,
    trainable_parameters,
)
from facereward.weights import default_restorer_path


@dataclass
class DPOConfig:
    """All Diffusion-DPO settings. Defaults are the authors' (SalesforceAIResearch/DiffusionDPO train.py and
    launchers/sd15.sh; diffusers' examples/research_projects/diffusion_dpo/train_diffusion_dpo.py) except the run
    length; the online-pair settings are LRPO's (docs/methods.md 2.1)."""

    SMOKE: ClassVar[dict[str, float]] = {  # facereward.smoke
        "epochs": 1, "group_size": 2, "inputs_per_batch": 2, "batches_per_epoch": 1, "sample_steps": 3, "micro_batch": 2,
        "batch_size": 2, "pairs_per_group": 1, "data.toy_faces": 8, "run.save_every": 1, "held_out.every": 1,
        "held_out.toy_faces": 2, "held_out.max_images": 2, "held_out.sample_steps": 2}

    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/dpo", save_every=10, log_every=1))
    data: DataConfig = field(default_factory=DataConfig)  # the faces of online pairs (and of toy held-out faces)
    init_from: str | None = None  # the restorer folder to fine-tune (default: the shipped toy restorer)
    imports: list[str] = field(default_factory=list)  # plugin modules or .py files imported first (register_measure, ...)
    lora: LoraSettings = field(default_factory=LoraSettings)
    # the reward that ranks online pairs (frm without options.frm.path: the shipped toy FRM); unused offline
    rewards: MeasuresConfig = field(default_factory=MeasuresConfig)
    clamp_x_hat: bool = True  # online samples clamped to [0, 1] before the reward ranks them
    pairs: str | None = None  # a preference JSONL: offline pairs; None: online pairs from the model's own ranked samples
    # the DPO scale in inside = -beta/2 ((m_w - m_l) - (r_w - r_l)): 5000, the authors' (DiffusionDPO train.py:344 with
    # scale_term = -0.5 * beta at :1142; diffusers' script writes the same as beta_dpo 2500 without the half, :301-303, :880)
    beta: float = 5000.0
    epochs: int = 10
    batch_size: int = 2048  # pairs per optimizer step over all processes ("Paper used 2048", sd15.sh:4-5)
    micro_batch: int = 4  # pairs per network call (2 rows each), and samples per call when sampling online pairs
    # AdamW at 1e-8 per pair, scaled by the batch (sd15.sh:15 --learning_rate=1e-8 --scale_lr, train.py:662-665): 2.048e-5 at
    # 2048 pairs (full network). Not rescaled here when batch_size changes. (diffusers' 5e-4, :315, is for LoRA rank 4.)
    lr: float = 2.048e-5
    # linear warmup over this many optimizer steps: diffusers' default scheduler is constant (:325-327; its 500 warmup
    # steps, :334, unused); the authors' sd15.sh:14 warms up over 500 of its 2000 steps
    warmup_steps: int = 0
    weight_decay: float = 0.01  # --adam_weight_decay 1e-2 (both scripts)
    grad_clip: float = 1.0  # --max_grad_norm 1.0 (both scripts)
    skip_ties: bool = True  # offline pairs marked tie are skipped (a tie says nothing about which to prefer)
    # online pairs: the settings of sample_groups, as LRPO's (docs/methods.md 2.1)
    group_size: int = 9
    group_inputs: Literal["identical", "own_noise"] = "identical"
    data_order: Literal["shuffle", "sequential"] = "shuffle"
    inputs_per_batch: int = 2
    batches_per_epoch: int = 12
    sample_steps: int = 50
    spacing: str | None = None  # leading | linspace | trailing; None: the restorer's
    final_alpha_bar: str | None = None  # one | first; None: the restorer's
    eta: float = 0.0  # the sampler's eta for online samples
    pairs_per_group: int = 1  # k: the group's i-th best against its i-th worst sample, i < k (2k <= group_size)
    min_margin: float = 0.0  # online pairs whose reward difference is under it are dropped (equal rewards always are)
    held_out: HeldOutConfig = field(default_factory=HeldOutConfig)


def check_config(config: DPOConfig) -> None:
    """Validate `config`; a ValueError names the field."""
    for name in ("epochs", "batch_size", "micro_batch", "group_size", "inputs_per_batch", "batches_per_epoch",
                 "sample_steps", "pairs_per_group"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    for name in ("beta", "lr"):
        if not getattr(config, name) > 0 or not math.isfinite(getattr(config, name)):
            raise ValueError(f"{name} must be > 0, got {getattr(config, name)}")
    for name in ("weight_decay", "grad_clip", "min_margin", "warmup_steps"):
        if not getattr(config, name) >= 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(config, name)}")
    if isinstance(config.eta, (str, bool)) or config.eta is None or not config.eta >= 0:
        raise ValueError(f"eta must be a number >= 0 (the online sampler's), got {config.eta!r}")
    if 2 * config.pairs_per_group > config.group_size:
        raise ValueError(f"pairs_per_group {config.pairs_per_group} needs group_size >= {2 * config.pairs_per_group} "
                         f"(the top k against the bottom k), got {config.group_size}")
    for name, allowed in {"group_inputs": ("identical", "own_noise"), "data_order": ("shuffle", "sequential")}.items():
        if getattr(config, name) not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(config, name)!r}")
    if config.pairs is not None and (not isinstance(config.pairs, str) or not config.pairs.strip()):
        raise ValueError(f"pairs must be the path of a preference JSONL (or unset for online pairs), got {config.pairs!r}")
    if config.run.gradient_accumulation_steps != 1:
        raise ValueError("run.gradient_accumulation_steps: dpo accumulates by its own rule (batch_size, micro_batch); "
                         f"leave it at 1, got {config.run.gradient_accumulation_steps}")


# ---- the loss -------------------------------------------------------------------------------------


@dataclass
class DPOTerms:
    """Per pair: the loss -log sigmoid(inside), inside itself (the implicit reward margin) and inside > 0."""

    loss: Tensor  # (B,)
    inside: Tensor  # (B,)
    correct: Tensor  # (B,) float: 1 where inside > 0

    def means(self) -> tuple[Tensor, Tensor, Tensor]:
        """(loss, implicit accuracy, reward margin), each averaged over the pairs."""
        return self.loss.mean(), self.correct.mean(), self.inside.mean()


def dpo_terms(model_w: Tensor, model_l: Tensor, ref_w: Tensor, ref_l: Tensor, beta: float) -> DPOTerms:
    """Diffusion-DPO's loss from per-sample denoising MSEs at one shared x_t per pair (docs/methods.md 5.2).

    `model_w`, `model_l`: the trained network's MSE to the training target on the preferred and rejected sample;
    `ref_w`, `ref_l`: the reference's. inside = -beta/2 ((m_w - m_l) - (r_w - r_l)); loss = -log sigmoid(inside).
    Lowering the model's error on the preferred sample (or raising it on the rejected one) lowers the loss.
    """
    inside = -0.5 * beta * ((model_w.float() - model_l.float()) - (ref_w.float() - ref_l.float()))
    return DPOTerms(loss=-F.logsigmoid(inside), inside=inside, correct=(inside > 0).float())


def dpo_loss(model_w: Tensor, model_l: Tensor, ref_w: Tensor, ref_l: Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """(mean loss, implicit accuracy, mean reward margin) of `dpo_terms` (docs/methods.md 5.2)."""
    return dpo_terms(model_w, model_l, ref_w, ref_l, beta).means()


# ---- a micro-batch of pairs ------------------------------------------------------------------------


@dataclass
class PairBatch:
    """Pairs in the diffusion space: preferred / rejected clean samples and the condition each is restored from."""

    x0_w: Tensor
    x0_l: Tensor
    cond_w: Tensor
    cond_l: Tensor


def pair_draws(seed: int, epoch: int, positions: list[int], shape: tuple[int, ...], n_timesteps: int,
               device: torch.device) -> tuple[Tensor, Tensor]:
    """(t, noise) of the pairs at `positions` of the epoch: t uniform in [0, n_timesteps), noise standard normal of
    `shape` per pair, each pair from its own generator seeded by (seed, epoch, position): the same on any process."""
    ts, noises = [], []
    for p in positions:
        g = torch.Generator(device=device).manual_seed(mix_seed(seed, epoch, p, 23))
        ts.append(torch.randint(0, n_timesteps, (1,), generator=g, device=device))
        noises.append(torch.randn(tuple(shape), generator=g, device=device))
    return torch.cat(ts), torch.stack(noises)


def pair_terms(restorer: Restorer, net: nn.Module | None, reference: Reference, batch: PairBatch, t: Tensor, noise: Tensor,
               beta: float, accelerator: Accelerator) -> tuple[DPOTerms, Tensor, Tensor]:
    """The DPO terms of a micro-batch of pairs, both samples of a pair noised with `noise` to `t` (one network call for
    the model, one for the reference, on the same 2B rows); also the model's and the reference's mean MSE per pair."""
    x0 = torch.cat([batch.x0_w, batch.x0_l]).float()
    eps, ts = torch.cat([noise, noise]).to(x0.dtype), torch.cat([t, t])
    cond = torch.cat([batch.cond_w, batch.cond_l])
    alphas = restorer.scheduler.alphas_cumprod
    x_t = q_sample(x0, eps, ts, alphas)
    target = training_target(x0, eps, alphas.to(x0.device)[ts], restorer.prediction_type).float()
    with accelerator.autocast():
        out = restorer.predict_output(x_t, ts, cond, net=net)
        ref = reference.output(x_t, ts, cond)  # no grad
    model_mse = (out.float() - target).pow(2).flatten(1).mean(1)
    ref_mse = (ref.float() - target).pow(2).flatten(1).mean(1)
    m_w, m_l = model_mse.chunk(2)
    r_w, r_l = ref_mse.chunk(2)
    return dpo_terms(m_w, m_l, r_w, r_l, beta), 0.5 * (m_w + m_l).detach(), 0.5 * (r_w + r_l)


# ---- offline pairs -----------------------------------------------------------------------------------


def _image_problem(path: Path, size: int) -> str | None:
    """Why `path` is no readable image of `size` x `size`, or None. Only the header is read (cheap for many pairs): a
    truncated file or a grayscale one is reported, naming the same line, when a step reads it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            width, height = im.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        return f"cannot be read ({err.__class__.__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    if (width, height) != (size, size):
        return f"is {width}x{height}, the model restores {size}x{size}"
    return None


def load_offline_pairs(path: str | Path, size: int, skip_ties: bool = True) -> tuple[list[PreferencePair], int]:
    """The pairs of a preference JSONL that dpo trains on, and how many ties were skipped.

    Every problem is one line naming the file and line: a pair without `lq` (the condition), an image that cannot be
    read, or one whose size is not the model's `size`.
    """
    pairs = load_pairs(path)  # PreferenceDataError (a ValueError) 'FILE:LINE: problem' for a bad file or missing images
    kept, ties = [], 0
    for pair in pairs:
        where = pair.origin or str(path)
        if pair.lq is None:
            raise ValueError(f"{where}: the pair has no 'lq' image (dpo restores from it: every pair needs one)")
        for key in ("chosen", "rejected", "lq"):
            problem = _image_problem(getattr(pair, key), size)
            if problem:
                raise ValueError(f"{where}: {key} image {getattr(pair, key)} {problem}")
        if pair.tie and skip_ties:
            ties += 1
            continue
        kept.append(pair)
    return kept, ties


def _read(pair: PreferencePair, key: str, size: int) -> Tensor:
    try:
        return image_to_tensor(read_image(getattr(pair, key), size))
    except ImageError as err:
        raise ValueError(f"{pair.origin}: {key} image {err}") from None


class OfflinePairs:
    """An epoch of offline pairs: a seeded permutation; images read from disk per micro-batch."""

    def __init__(self, pairs: list[PreferencePair], restorer: Restorer, accelerator: Accelerator, seed: int, epoch: int):
        self.pairs, self.restorer, self.accelerator = pairs, restorer, accelerator
        self.order = np.random.default_rng([seed, epoch, 17]).permutation(len(pairs))

    def __len__(self) -> int:
        return len(self.pairs)

    @torch.no_grad()
    def batch(self, positions: list[int]) -> PairBatch:
        restorer, size, device = self.restorer, self.restorer.config.size, self.accelerator.device
        chosen = [self.pairs[int(self.order[p])] for p in positions]
        good, bad, lq = (torch.cat([_read(p, key, size) for p in chosen]).to(device) for key in ("chosen", "rejected", "lq"))
        with self.accelerator.autocast():
            cond = restorer.condition(restorer.clean(lq))
            x0 = restorer.encode(torch.cat([good, bad])).float()  # the posterior mean in latent mode
        x0_w, x0_l = x0.chunk(2)
        return PairBatch(x0_w, x0_l, cond, cond)


# ---- online pairs ------------------------------------------------------------------------------------


def rank_pairs(rewards: Tensor, group_ids: Tensor, pairs_per_group: int, min_margin: float = 0.0) -> list[tuple[int, int]]:
    """(preferred, rejected) sample indices: per group (ascending id), the samples ranked by reward (ties by index),
    the i-th best against the i-th worst for i < `pairs_per_group`; a pair is dropped when its reward difference is 0
    or below `min_margin`."""
    values, groups = rewards.double().cpu().tolist(), group_ids.cpu().tolist()
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(int(g), []).append(i)
    out = []
    for g in sorted(members):
        ranked = sorted(members[g], key=lambda i: (-values[i], i))
        for i in range(min(pairs_per_group, len(ranked) // 2)):
            best, worst = ranked[i], ranked[-1 - i]
            diff = values[best] - values[worst]
            if diff > 0 and diff >= min_margin:
                out.append((best, worst))
    return out


class OnlinePairs:
    """An epoch of online pairs from every process's samples (gathered, in row order), in a seeded order."""

    def __init__(self, samples: GroupSamples, config: DPOConfig, accelerator: Accelerator, epoch: int):
        rows = accelerator.gather(samples.rows)
        order = torch.argsort(rows)  # row order: the same on 1 or N processes

        def gather(x: Tensor) -> Tensor:
            return accelerator.gather(x.contiguous())[order]

        self.rewards, group_ids = gather(samples.scores["reward"]), gather(samples.group_ids)
        self.scores = {k: gather(v) for k, v in samples.scores.items()}
        pairs = rank_pairs(self.rewards, group_ids, config.pairs_per_group, config.min_margin)
        shuffle = np.random.default_rng([config.run.seed, epoch, 19]).permutation(len(pairs))
        self.pairs = [pairs[i] for i in shuffle]
        used = sorted({i for pair in self.pairs for i in pair})  # keep only the samples a pair uses
        self.slot = {i: j for j, i in enumerate(used)}
        index = torch.as_tensor(used, dtype=torch.long, device=order.device)
        self.x0, self.cond = gather(samples.x0)[index], gather(samples.cond)[index]

    def __len__(self) -> int:
        return len(self.pairs)

    def batch(self, positions: list[int]) -> PairBatch:
        w = torch.as_tensor([self.slot[self.pairs[p][0]] for p in positions], device=self.x0.device)
        lo = torch.as_tensor([self.slot[self.pairs[p][1]] for p in positions], device=self.x0.device)
        return PairBatch(self.x0[w], self.x0[lo], self.cond[w], self.cond[lo])

    def pair_rewards(self) -> tuple[Tensor, Tensor]:
        """The rewards of the preferred and of the rejected samples, per pair."""
        w = torch.as_tensor([p[0] for p in self.pairs], dtype=torch.long, device=self.rewards.device)
        lo = torch.as_tensor([p[1] for p in self.pairs], dtype=torch.long, device=self.rewards.device)
        return self.rewards[w], self.rewards[lo]


# ---- the update ----------------------------------------------------------------------------------------


def step_shares(n_pairs: int, batch_size: int, rank: int, world: int, micro_batch: int) -> list[tuple[int, list[list[int]]]]:
    """An epoch of `n_pairs` in optimizer steps of `batch_size` pairs: per step, (its global size, this process's
    micro-batches of pair positions). A process takes a contiguous share of each step by position; every process gets
    the same number of micro-batches, an empty one where its share is short (it runs with zero weight)."""
    steps = []
    for start in range(0, n_pairs, batch_size):
        positions = list(range(start, min(n_pairs, start + batch_size)))
        m = len(positions)
        share = positions[rank * m // world: (rank + 1) * m // world]
        calls = max(1, math.ceil(math.ceil(m / world) / micro_batch))  # the longest share's micro-batches
        steps.append((m, [share[i * micro_batch: (i + 1) * micro_batch] for i in range(calls)]))
    return steps


_STAT_KEYS = ("loss", "correct", "margin", "model_mse", "ref_mse", "count", "grad_norm", "opt_steps", "lr")


def warmup_lr(lr: float, warmup_steps: int, step: int) -> float:
    """The learning rate of optimizer step `step` (0-based, over the whole run): linear warmup, then constant."""
    return lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else lr


def update_epoch(restorer: Restorer, net: nn.Module, optimizer: torch.optim.Optimizer, reference: Reference,
                 batch_of: Callable[[list[int]], PairBatch], n_pairs: int, config: DPOConfig, accelerator: Accelerator,
                 epoch: int, done_steps: int = 0) -> dict[str, Tensor]:
    """One pass over an epoch's `n_pairs` pairs in optimizer steps of `batch_size`; summed statistics (no host sync).

    A step's loss is the mean over its pairs on all processes: each micro-batch contributes its pairs' sum divided by
    the step's global size, times the number of processes (DDP averages gradients); gradients are synchronised on the
    step's last micro-batch only (`micro_step`). `done_steps`: the optimizer steps of the run before this epoch (warmup).
    """
    device, world = accelerator.device, accelerator.num_processes
    stats = {k: torch.zeros((), device=device) for k in _STAT_KEYS}
    shape = restorer.latent_shape(1, restorer.config.size, restorer.config.size)[1:]
    n_timesteps = int(restorer.scheduler.config.num_train_timesteps)
    steps = 0
    for m, calls in step_shares(n_pairs, config.batch_size, accelerator.process_index, world, config.micro_batch):
        optimizer.zero_grad(set_to_none=True)
        for i, positions in enumerate(calls):
            weight = 1.0 if positions else 0.0
            positions = positions or [0]  # a short share: the same calls as the others, with no loss
            batch = batch_of(positions)
            t, noise = pair_draws(config.run.seed, epoch, positions, shape, n_timesteps, device)
            with micro_step(accelerator, net, sync=i == len(calls) - 1):
                terms, model_mse, ref_mse = pair_terms(restorer, net, reference, batch, t, noise, config.beta, accelerator)
                accelerator.backward(terms.loss.sum() * (weight * world / m))
            stats["loss"] += weight * terms.loss.detach().sum()
            stats["correct"] += weight * terms.correct.sum()
            stats["margin"] += weight * terms.inside.detach().sum()
            stats["model_mse"] += weight * model_mse.sum()
            stats["ref_mse"] += weight * ref_mse.sum()
            stats["count"] += weight * len(positions)
        if config.grad_clip > 0:
            norm = accelerator.clip_grad_norm_(net.parameters(), config.grad_clip)
            if norm is not None:
                stats["grad_norm"] += torch.as_tensor(norm, device=device).float()
        lr = warmup_lr(config.lr, config.warmup_steps, done_steps + steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps += 1
        stats["opt_steps"] += 1
        stats["lr"].fill_(lr)
    return stats


def epoch_scalars(stats: dict[str, Tensor], online: OnlinePairs | None, accelerator: Accelerator) -> dict[str, float]:
    """The epoch's logged numbers (one host sync)."""
    summed = {k: accelerator.reduce(v.clone(), "sum") for k, v in stats.items() if k != "lr"}
    count = summed["count"].clamp_min(1)
    out: dict[str, Tensor] = {
        "dpo/loss": summed["loss"] / count,
        "dpo/implicit_accuracy": summed["correct"] / count,
        "dpo/reward_margin": summed["margin"] / count,
        "dpo/model_mse": summed["model_mse"] / count,
        "dpo/ref_mse": summed["ref_mse"] / count,
        "dpo/grad_norm": summed["grad_norm"] / summed["opt_steps"].clamp_min(1),
        "dpo/optimizer_steps": summed["opt_steps"] / accelerator.num_processes,
        "dpo/lr": stats["lr"],
        "pairs/count": summed["count"],
    }
    if online is not None:
        for name, value in online.scores.items():
            out[name] = value.mean()
        out["reward_std"] = online.rewards.std(unbiased=False)
        chosen, rejected = online.pair_rewards()
        zero = torch.zeros((), device=online.rewards.device)
        out["pairs/chosen_reward"] = chosen.mean() if len(chosen) else zero
        out["pairs/rejected_reward"] = rejected.mean() if len(rejected) else zero
    values = torch.stack([v.float().reshape(()).to(accelerator.device) for v in out.values()]).cpu().tolist()
    return dict(zip(out, values))


# ---- the trainer ---------------------------------------------------------------------------------------


def dpo_workload(config: DPOConfig) -> Workload:
    """Per network call of 2 x micro_batch rows: one forward + backward and one reference forward; online, plus the
    sampling forwards (sample_steps per sample, G / 2k samples per pair row)."""
    sampling = 0.0 if config.pairs else config.sample_steps * config.group_size / (4.0 * config.pairs_per_group)
    return Workload(2 * config.micro_batch, 1.0 + sampling, 1.0)


def train_dpo(config: DPOConfig) -> Path:
    """Run Diffusion-DPO (resuming if asked); writes OUTPUT/model (LoRA merged) and OUTPUT/metrics.json; returns the model
    folder."""
    import_plugins(config.imports, option="imports")
    check_config(config)
    run = config.run
    accelerator = make_accelerator(run, "dpo")
    write_run_config(config, run, accelerator)
    require_multi_step(config.init_from or default_restorer_path(), "dpo")
    restorer = Restorer.from_pretrained(config.init_from or default_restorer_path())
    size = restorer.config.size
    online = config.pairs is None
    offline_pairs: list[PreferencePair] = []
    if online and config.data.size != size:
        raise ValueError(f"data.size {config.data.size} differs from the model size {size}")
    if not online:
        offline_pairs, ties = load_offline_pairs(config.pairs, size, config.skip_ties)
        if not offline_pairs:
            raise ValueError(f"{config.pairs}: no pairs to train on ({ties} ties skipped)")
        accelerator.print(f"dpo: {len(offline_pairs)} pairs from {config.pairs}"
                          + (f" ({ties} ties skipped)" if config.skip_ties else ""))
    restorer.to(accelerator.device)
    module = prepare_trainable(restorer, config.lora, gradient_checkpointing=run.gradient_checkpointing)
    check_engine(accelerator, module)
    speed_up_stage2(run, accelerator, restorer, module, dpo_workload(config), "dpo")
    optimizer = torch.optim.AdamW(trainable_parameters(module), lr=config.lr, weight_decay=config.weight_decay)
    # the initial network: its LoRA-free self with LoRA, else a frozen copy made now (a resume copies init_from again)
    reference = Reference(restorer, module, "auto")
    set_deepspeed_micro_batch(accelerator, 2 * config.micro_batch)
    net, optimizer = accelerator.prepare(module, optimizer)
    reward, dataset, schedule = None, None, None
    if online:  # the reward ranks the online pairs (and is a held-out judge); offline pairs need none
        reward = WeightedSum.from_config(rewards_with_defaults(config.rewards, config.init_from), as_reward=True,
                                         device=accelerator.device,
                                         env=MeasureEnv(accelerator.device, toy=config.data.toy_faces > 0), where="rewards")
        dataset = build_dataset(config.data)
        schedule = restorer.schedule(config.sample_steps, config.spacing, config.final_alpha_bar, device=accelerator.device)
    held_out = None
    if config.held_out.every > 0 and accelerator.is_main_process:
        held_out = HeldOutEvaluator(config.held_out, config.data, size, accelerator.device,
                                    extra=reward.scorers() if reward is not None else None)
    state = resume_run(accelerator, run)
    epochs = EpochRecorder("dpo", config.epochs, run, config.held_out, held_out, accelerator, state, net, module,
                           {"stage2": net}, {"optimizer": optimizer})
    # every draw of an epoch has its own (seed, epoch, pair) generator; this covers any other
    restore_run(accelerator, state, epochs.modules, epochs.optimizers)
    epochs.baseline(restorer)
    done_steps = int(sum(e.get("dpo/optimizer_steps", 0) for e in epochs.history))  # the warmup's position, over a resume
    for epoch in range(epochs.start, config.epochs):
        epoch_start = time.perf_counter()
        pairs: OnlinePairs | OfflinePairs
        if online:
            samples = sample_groups(restorer, dataset, schedule, config, reward, accelerator, epoch, run.seed, config.eta, net)
            pairs = OnlinePairs(samples, config, accelerator, epoch)
            del samples
        else:
            pairs = OfflinePairs(offline_pairs, restorer, accelerator, run.seed, epoch)
        stats = update_epoch(restorer, net, optimizer, reference, pairs.batch, len(pairs), config, accelerator, epoch,
                             done_steps)
        done_steps += math.ceil(len(pairs) / config.batch_size)
        scalars = epoch_scalars(stats, pairs if online else None, accelerator)
        del pairs
        # the hacking alarm's training reward: the samples' reward online, the implicit reward margin offline
        train_reward = scalars["reward" if online else "dpo/reward_margin"]
        if epochs.end_epoch(epoch + 1, scalars, time.perf_counter() - epoch_start, train_reward, restorer):
            break
    return epochs.finish(restorer)
