"""Stage 1: the regression cleaner `C(lq)` (docs/methods.md 0), a small residual CNN by default.

Any nn.Module mapping a [0, 1] image batch to a [0, 1] image batch of the same shape works;
register a builder with `register_cleaner` so it saves and loads by name.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from facereward.models.swinir import SwinIR
from facereward.registry import Registry

_CLEANERS: Registry[Callable[..., nn.Module]] = Registry("cleaner", hint="register it with register_cleaner")


def register_cleaner(name: str, builder: Callable[..., nn.Module], overwrite: bool = False) -> None:
    """Make `builder(**kwargs)` available as a cleaner architecture called `name`."""
    _CLEANERS.register(name, builder, overwrite)


def build_cleaner(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """A new cleaner of the registered architecture `name` (register yours with `register_cleaner`)."""
    return _CLEANERS.get(name)(**kwargs)


class _ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.act(self.conv1(x)))


class ResidualCleaner(nn.Module):
    """lq + f(lq): conv, `num_blocks` residual blocks at 1/`downscale` resolution, conv back up."""

    def __init__(self, channels: int = 64, num_blocks: int = 8, downscale: int = 2):
        super().__init__()
        if downscale not in (1, 2, 4):
            raise ValueError(f"cleaner downscale must be 1, 2 or 4, got {downscale}")
        self.head = nn.Conv2d(3, channels, 3, padding=1)
        self.down = nn.Conv2d(channels, channels, downscale, stride=downscale) if downscale > 1 else nn.Identity()
        self.body = nn.Sequential(*[_ResBlock(channels) for _ in range(num_blocks)])
        self.up = nn.Sequential(nn.Conv2d(channels, channels * downscale**2, 3, padding=1), nn.PixelShuffle(downscale)) if downscale > 1 else nn.Identity()
        self.tail = nn.Conv2d(channels, 3, 3, padding=1)
        nn.init.zeros_(self.tail.weight)
        nn.init.zeros_(self.tail.bias)

    def forward(self, lq: torch.Tensor) -> torch.Tensor:
        h = self.head(lq * 2 - 1)
        h = h + self.up(self.body(self.down(h)))
        return (lq + self.tail(h)).clamp(0, 1)


register_cleaner("residual_cnn", ResidualCleaner)
register_cleaner("swinir", SwinIR)
