"""Per-image seeded restoration: each image's noise comes from its own (seed, index) generator, so results do not
depend on batching (restore, evaluate, held-out evaluation and candidates all restore this way)."""

from __future__ import annotations

import torch

from facereward.models.ddim import Eta
from facereward.models.restorer import Restorer, SamplerOptions


def initial_noise(restorer: Restorer, indices: list[int], height: int, width: int, seed: int, device: torch.device) -> torch.Tensor:
    """x_T for each image from its own (seed, index) generator, so results do not depend on batching."""
    shape = restorer.latent_shape(1, height, width)
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + i)) for i in indices]
    return torch.cat(noise).to(device)


@torch.no_grad()
def restore_batch(
    restorer: Restorer,
    lq: torch.Tensor,
    indices: list[int],
    steps: int = 50,
    eta: Eta | None = None,
    seed: int = 0,
    net: torch.nn.Module | None = None,
    sampler: SamplerOptions | None = None,
) -> dict[str, torch.Tensor]:
    """Both stages on a [0, 1] batch with per-image seeded x_T: {"clean", "restored"} in [0, 1].

    `net`: see `Restorer.predict_eps`; `eta` and `sampler` default to the model's settings."""
    x_T = initial_noise(restorer, indices, lq.shape[2], lq.shape[3], seed, lq.device)
    step_gen = torch.Generator(device=lq.device).manual_seed(seed * 1_000_003 + indices[0])
    return restorer.restore(lq, steps=steps, eta=eta, generator=step_gen, x_T=x_T, net=net, sampler=sampler)


__all__ = ["initial_noise", "restore_batch"]
