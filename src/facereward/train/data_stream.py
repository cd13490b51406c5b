"""Resumable data order: a loader whose shuffle is a function of (seed, epoch) alone, and a BatchStream that knows
its (epoch, batch) position so a resumed run continues at the next batch of the interrupted epoch."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator


def data_position(state: dict[str, Any] | None) -> dict[str, int] | None:
    """Where a resumed run's data continues ({"epoch", "batch"}); checkpoints from before positions were saved
    restart at the epoch after the saved one."""
    if not state:
        return None
    return state.get("data") or {"epoch": int(state.get("epoch", -1)) + 1, "batch": 0}


def resumable_loader(dataset, batch_size: int, seed: int, shuffle: bool = True, **kwargs) -> torch.utils.data.DataLoader:
    """A DataLoader whose order is a function of (seed, epoch) and which never draws from the global RNG.

    (A plain DataLoader draws a base seed from the global RNG each time an epoch starts, so where a
    resumed run starts its epochs would change the model's random draws.)
    """
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=EpochSampler(len(dataset), seed, shuffle),
                                       generator=torch.Generator().manual_seed(seed), **kwargs)


class EpochSampler(torch.utils.data.Sampler):
    """A shuffle that is a function of (seed, epoch) alone, so a resumed run sees the same order (no global RNG)."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.n))
        return iter(np.random.default_rng([self.seed, self.epoch, 0x5EED]).permutation(self.n).tolist())


class BatchStream:
    """(epoch, batch) forever from a prepared loader, knowing where it is: `position()` -> {"epoch", "batch"}.

    Built from a saved position, it continues inside the interrupted epoch at the next batch (the skipped
    batches are not loaded: accelerate's `skip_first_batches` skips them in the sampler).
    """

    def __init__(self, loader: torch.utils.data.DataLoader, accelerator: Accelerator, position: dict[str, int] | None = None):
        self.loader, self.accelerator = loader, accelerator
        self.epoch = int(position["epoch"]) if position else 0
        self.batch = int(position["batch"]) if position else 0
        self._iter: Iterator | None = None

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    def _start_epoch(self) -> None:
        if self.batch and self.batch >= len(self.loader):  # saved at an epoch's last batch: the next one starts
            self.epoch, self.batch = self.epoch + 1, 0
        _set_epoch(self.loader, self.epoch)
        skip = self.batch
        source = self.accelerator.skip_first_batches(self.loader, skip) if skip else self.loader
        self._iter = iter(source)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[int, dict[str, Any]]:
        if self._iter is None:
            self._start_epoch()
        while True:
            try:
                item = next(self._iter)
            except StopIteration:
                self.epoch, self.batch = self.epoch + 1, 0
                self._start_epoch()
                continue
            self.batch += 1
            return self.epoch, item


def _set_epoch(loader: torch.utils.data.DataLoader, epoch: int) -> None:
    """Tell the dataset, the sampler and accelerate's wrapper which epoch starts."""
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)
    if hasattr(loader, "set_epoch"):  # accelerate's DataLoaderShard forwards it to its sampler
        loader.set_epoch(epoch)
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    batch_sampler = getattr(loader, "batch_sampler", None)
    inner = getattr(getattr(batch_sampler, "batch_sampler", batch_sampler), "sampler", None)
    if hasattr(inner, "set_epoch"):
        inner.set_epoch(epoch)
