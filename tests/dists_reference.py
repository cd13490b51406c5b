"""Independent functional DISTS forward for tests/test_dists.py, written from pyiqa/archs/dists_arch.py.

Works on the raw state dicts (torchvision ``vgg16`` keys ``features.N.weight`` / ``features.N.bias``, and the
``alpha`` / ``beta`` tensors of DISTS_weights-f5e65c96.pth) with ``torch.nn.functional`` only, in float64, and follows
pyiqa's code path literally: five ``stageK`` blocks, the L2pooling kernel built from the Hann-window formula, a loop
over the six taps adding ``(alpha[k] * S1).sum(1)`` and ``(beta[k] * S2).sum(1)`` after splitting the weights
normalised by ``alpha.sum() + beta.sum()``. Nothing from facereward is imported.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# pyiqa's stages: conv indices then the L2pool that opens the next stage; each conv is followed by a ReLU
STAGES = [(0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28)]


def _hann_3x3(channels: int) -> torch.Tensor:
    # np.hanning(5) = 0.5 - 0.5 cos(2 pi n / 4), n = 0..4; pyiqa keeps [1:-1] and normalises the outer product
    a = [0.5 - 0.5 * math.cos(2 * math.pi * n / 4) for n in range(5)][1:-1]
    g = torch.tensor([[ai * aj for aj in a] for ai in a], dtype=torch.float64)
    g = g / g.sum()
    return g[None, None].repeat(channels, 1, 1, 1)


def _l2pool(x: torch.Tensor) -> torch.Tensor:
    out = F.conv2d(x**2, _hann_3x3(x.shape[1]), stride=2, padding=(5 - 2) // 2, groups=x.shape[1])
    return (out + 1e-12).sqrt()


def _forward_once(x: torch.Tensor, vgg: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, -1, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, -1, 1, 1)
    h = (x - mean) / std
    feats = [x]
    for s, convs in enumerate(STAGES):
        if s > 0:
            h = _l2pool(h)
        for i in convs:
            w = vgg[f"features.{i}.weight"].double()
            b = vgg[f"features.{i}.bias"].double()
            h = F.relu(F.conv2d(h, w, b, padding=1))
        feats.append(h)
    return feats


def dists_reference(x: torch.Tensor, y: torch.Tensor, vgg: dict[str, torch.Tensor], ab: dict[str, torch.Tensor]):
    """pyiqa DISTS(x, y) in float64 -> (B,). ``vgg``: torchvision full-model keys; ``ab``: ``alpha`` and ``beta``."""
    x, y = x.double(), y.double()
    chns = [3, 64, 128, 256, 512, 512]
    alpha_p, beta_p = ab["alpha"].double(), ab["beta"].double()
    feats0, feats1 = _forward_once(x, vgg), _forward_once(y, vgg)
    c1 = c2 = 1e-6
    w_sum = alpha_p.sum() + beta_p.sum()
    alpha = torch.split(alpha_p / w_sum, chns, dim=1)
    beta = torch.split(beta_p / w_sum, chns, dim=1)
    dist1 = dist2 = 0
    for k in range(len(chns)):
        x_mean = feats0[k].mean([2, 3], keepdim=True)
        y_mean = feats1[k].mean([2, 3], keepdim=True)
        s1 = (2 * x_mean * y_mean + c1) / (x_mean**2 + y_mean**2 + c1)
        dist1 = dist1 + (alpha[k] * s1).sum(1, keepdim=True)
        x_var = ((feats0[k] - x_mean) ** 2).mean([2, 3], keepdim=True)
        y_var = ((feats1[k] - y_mean) ** 2).mean([2, 3], keepdim=True)
        xy_cov = (feats0[k] * feats1[k]).mean([2, 3], keepdim=True) - x_mean * y_mean
        s2 = (2 * xy_cov + c2) / (x_var + y_var + c2)
        dist2 = dist2 + (beta[k] * s2).sum(1, keepdim=True)
    return (1 - (dist1 + dist2)).reshape(-1)
