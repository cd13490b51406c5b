"""Group sampling shared by the online trainers (LRPO, NFT, online DPO): which inputs an epoch draws, the group
batches each process holds, the group-normalised advantages, and a scored rollout of an epoch's groups.

A group is one LQ input repeated `group_size` times (docs/methods.md 2.1). Every random draw of a sample is seeded by
its row in the epoch over all processes, never by the rank, so 1 and N processes sample the same images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from accelerate import Accelerator
from torch import Tensor, nn
from torch.utils.data import Dataset

from facereward.data.datasets import collate_batch
from facereward.measures import WeightedSum
from facereward.models.ddim import DDIMSchedule, mix_seed, randn, rollout, row_generators
from facereward.models.restorer import Restorer


def epoch_input_indices(n_data: int, n_needed: int, seed: int, epoch: int, order: str = "shuffle") -> np.ndarray:
    """The dataset indices of an epoch's LQ inputs, the same on every process: shuffled without repeats until the data
    runs out, or (`order` "sequential") the next `n_needed` in file order, continuing from the previous epoch."""
    if order == "sequential":
        return (epoch * n_needed + np.arange(n_needed)) % n_data
    rng = np.random.default_rng([seed, epoch])
    rounds = -(-n_needed // n_data)
    return np.concatenate([rng.permutation(n_data) for _ in range(rounds)])[:n_needed]


@dataclass
class GroupBatch:
    lq: Tensor  # (n, 3, H, W): this process's rows, each row its input's one degraded image
    hq: Tensor
    captions: list[str]
    group_ids: Tensor  # (n,) long: the input's position in the epoch (the group)
    rows: Tensor  # (n,) long: the rows' positions in the sampling batch (the same on 1 or N processes)


def group_batch(dataset: Dataset, input_indices: list[int], group_size: int, group_offset: int,
                rank: int, world_size: int, own_noise: bool = False) -> GroupBatch:
    """This process's share of `len(input_indices) * group_size` rows (input j on rows j*G .. j*G+G-1).

    Every row of a group holds the same degraded image, on whichever process: it comes from
    `dataset[index]` (the degradation is fixed by the dataset's seed and the index, never the rank). With `own_noise`,
    copy c of a group is `dataset.item(index, noise_variant=c)`: the same parameters, its own noise.
    """
    total = len(input_indices) * group_size
    if total % world_size:
        raise ValueError(f"inputs_per_batch * group_size = {total} must divide among {world_size} processes")
    per = total // world_size
    rows = np.arange(rank * per, (rank + 1) * per)
    inputs = rows // group_size
    group_ids, row_ids = torch.from_numpy(inputs + group_offset).long(), torch.from_numpy(rows).long()
    if own_noise:
        if not hasattr(dataset, "item"):
            raise ValueError("group_inputs: own_noise needs LQ degraded on the fly (data.hq_dir or data.toy_faces)")
        items = collate_batch([dataset.item(int(input_indices[j]), noise_variant=int(r % group_size))
                               for j, r in zip(inputs, rows)])
        return GroupBatch(lq=items["lq"], hq=items["hq"], captions=list(items["caption"]), group_ids=group_ids, rows=row_ids)
    unique, inverse = np.unique(inputs, return_inverse=True)
    items = collate_batch([dataset[int(input_indices[j])] for j in unique])
    inv = torch.from_numpy(inverse)
    return GroupBatch(lq=items["lq"][inv], hq=items["hq"][inv], captions=[items["caption"][i] for i in inverse],
                      group_ids=group_ids, rows=row_ids)


def group_advantages(rewards: Tensor, group_ids: Tensor, std: str = "global", eps: float = 1e-4) -> Tensor:
    """A_i = (R_i - mean_group(i) R) / (std R + eps), std over all samples or within the group (docs/methods.md 2.3)."""
    if std not in ("global", "group"):
        raise ValueError(f"adv_std must be 'global' or 'group', got {std!r}")
    rewards = rewards.double()
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(counts), dtype=rewards.dtype, device=rewards.device).index_add_(0, inverse, rewards)
    centred = rewards - (sums / counts)[inverse]
    if std == "global":
        scale = rewards.std(unbiased=False) if rewards.numel() > 1 else torch.zeros((), dtype=rewards.dtype)
        scale = scale.expand_as(rewards)
    else:
        sq = torch.zeros(len(counts), dtype=rewards.dtype, device=rewards.device).index_add_(0, inverse, centred**2)
        scale = (sq / counts).sqrt()[inverse]
    return (centred / (scale + eps)).float()


class GroupSampling(Protocol):
    """The settings `sample_groups` reads (fields of the LRPO, NFT and DPO configs)."""

    group_size: int
    inputs_per_batch: int
    batches_per_epoch: int
    group_inputs: str
    data_order: str
    micro_batch: int
    clamp_x_hat: bool


@dataclass
class GroupSamples:
    """This process's scored samples of one epoch, in row order."""

    x0: Tensor  # (N, ...) the sampled clean latents (pixels in pixel mode), before decoding
    cond: Tensor  # (N, ...) the condition each was sampled with
    group_ids: Tensor  # (N,) long
    rows: Tensor  # (N,) long: the sample's row in the epoch over all processes (its draws are seeded by it)
    scores: dict[str, Tensor]  # "reward" (the weighted sum) and "reward/NAME", each (N,)

    def __len__(self) -> int:
        return self.x0.shape[0]


@torch.no_grad()
def sample_groups(restorer: Restorer, dataset: Dataset, schedule: DDIMSchedule, config: GroupSampling, reward: WeightedSum,
                  accelerator: Accelerator, epoch: int, seed: int, eta: float = 0.0, net: nn.Module | None = None) -> GroupSamples:
    """Sample and score all of `epoch`'s groups on this process with the restorer's own DDIM sampler at `eta`.

    `net` replaces the stage-2 network for sampling (NFT's old policy, a prepared network); x_T and the step noise of
    each sample are seeded by (seed, epoch, row) as in LRPO's rollouts, so eta > 0 draws the same noise there.
    """
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    indices = epoch_input_indices(len(dataset), config.batches_per_epoch * config.inputs_per_batch, seed, epoch,
                                  config.data_order)
    per_batch = config.inputs_per_batch * config.group_size
    parts: dict[str, list] = {"x0": [], "cond": [], "groups": [], "rows": []}
    scores: dict[str, list[Tensor]] = {}
    for b in range(config.batches_per_epoch):
        inputs = indices[b * config.inputs_per_batch: (b + 1) * config.inputs_per_batch].tolist()
        batch = group_batch(dataset, inputs, config.group_size, b * config.inputs_per_batch, rank, world,
                            own_noise=config.group_inputs == "own_noise")
        rows = b * per_batch + batch.rows
        for start in range(0, len(rows), config.micro_batch):
            sl = slice(start, start + config.micro_batch)
            lq, hq, r = batch.lq[sl].to(device), batch.hq[sl].to(device), rows[sl].tolist()
            x_T = randn(restorer.latent_shape(lq.shape[0], lq.shape[2], lq.shape[3]),
                        row_generators(device, *(mix_seed(seed, epoch, i, 1) for i in r)), device)
            step_noise = row_generators(device, *(mix_seed(seed, epoch, i, 5) for i in r))
            with accelerator.autocast():
                cond = restorer.condition(restorer.clean(lq))
                x0 = rollout(restorer.eps_fn(cond, net), x_T, schedule, eta=eta, generator=step_noise, record=False)
                images = restorer.decode(x0)
            images = images.clamp(0, 1) if config.clamp_x_hat else images
            out = reward(images.float(), hq, batch.captions[sl])
            for name, value in {"reward": out.total, **{f"reward/{k}": v for k, v in out.components.items()}}.items():
                scores.setdefault(name, []).append(value.float())
            parts["x0"].append(x0.float())
            parts["cond"].append(cond)
            parts["groups"].append(batch.group_ids[sl].to(device))
            parts["rows"].append(rows[sl].to(device))
    return GroupSamples(x0=torch.cat(parts["x0"]), cond=torch.cat(parts["cond"]), group_ids=torch.cat(parts["groups"]),
                        rows=torch.cat(parts["rows"]), scores={k: torch.cat(v) for k, v in scores.items()})
