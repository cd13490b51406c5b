"""Built-in rewards: FRM, 1 - LPIPS, exp(-c DWT_L1), CLIPIQA, identity cosine, PSNR, SSIM (docs/methods.md 2.2).

Each is an nn.Module (so a composite moves it to a device), frozen, with `differentiable` and `needs_gt`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facereward.rewards.base import Captions, register_reward


def _need_gt(name: str, gt: Tensor | None) -> Tensor:
    if gt is None:
        raise ValueError(f"reward {name!r} needs the ground truth, got gt=None")
    return gt


class FRMReward(nn.Module):
    """`scale * s(x, caption)` of a Face Reward Model folder (frozen; gradients reach the images)."""

    differentiable = True
    needs_gt = False

    def __init__(self, path: str | None = None, scale: float = 1.0):
        super().__init__()
        from facereward.models.frm import FaceRewardModel

        if not path:
            raise ValueError("the frm reward needs path=<Face Reward Model folder> (set rewards.options.frm.path)")
        self.model = FaceRewardModel.from_pretrained(path)
        self.model.freeze_for_reward()
        self.scale = float(scale)

    def forward(self, images: Tensor, gt: Tensor | None = None, captions: Captions = None) -> Tensor:
        return self.model.score(images, captions) * self.scale


class CLIPIQAReward(nn.Module):
    """CLIPIQA(x) in [0, 1] from a local CLIP folder or OpenCLIP checkpoint (docs/methods.md 3; no GT, gradients reach the images).

    Options as `facereward.metrics.clipiqa.CLIPIQA`: `prompts` ("pyiqa", LRPO's; "paper"; or pairs), `scale` (None: CLIP's
    exp(logit_scale); torchmetrics: 100), `resize` ("native" or "clip"), `tokenizer_path` (OpenCLIP checkpoints).
    """

    differentiable = True
    needs_gt = False

    def __init__(self, path: str | None = None, tokenizer_path: str | None = None, prompts: Any = "pyiqa",
                 scale: float | None = None, resize: str = "native"):
        super().__init__()
        from facereward.metrics.clipiqa import CLIPIQA

        if not path:
            raise ValueError("the clipiqa reward needs path=<local CLIP folder> (set rewards.options.clipiqa.path)")
        self.model = CLIPIQA.from_pretrained(
            path, tokenizer_path, prompts=prompts, scale=scale, resize=resize, option="rewards.options.clipiqa.path",
            tokenizer_hint="set rewards.options.clipiqa.tokenizer_path to a local folder with the CLIP tokenizer files")

    def forward(self, images: Tensor, gt: Tensor | None = None, captions: Captions = None) -> Tensor:
        return self.model(images)


class LPIPSReward(nn.Module):
    """1 - LPIPS(x, gt) from local weight files (docs/methods.md 2.2)."""

    differentiable = True
    needs_gt = True

    def __init__(self, backbone_path: str | None = None, heads_path: str | None = None, net: str = "vgg"):
        super().__init__()
        from facereward.metrics.lpips import load_lpips

        if not backbone_path or not heads_path:
            raise ValueError("the lpips reward needs backbone_path and heads_path (set rewards.options.lpips.*)")
        self.lpips = load_lpips(net, backbone_path, heads_path)

    def forward(self, images: Tensor, gt: Tensor | None = None, captions: Captions = None) -> Tensor:
        return 1.0 - self.lpips(images, _need_gt("lpips", gt).to(images.dtype)).float()


class WaveletReward(nn.Module):
    """exp(-c * DWT_L1(x, gt)), DWT_L1 the low-pass L1 of a `levels`-level wavelet transform (docs/methods.md 2.2, c = 15).

    Defaults are the original LRPO's: the 3-level dual-tree complex wavelet ("dtcwt") low-pass, unnormalised,
    as ReFL's structural term uses it. `wavelet="haar"` and `normalise=True` (block means) are options.
    """

    differentiable = True
    needs_gt = True

    def __init__(self, c: float = 15.0, levels: int = 3, normalise: bool = False, wavelet: str = "dtcwt"):
        super().__init__()
        if wavelet not in ("haar", "dtcwt"):
            raise ValueError(f"the wavelet reward needs wavelet='haar' or 'dtcwt', got {wavelet!r}")
        if c <= 0:
            raise ValueError(f"the wavelet reward needs c > 0, got {c}")
        self.c, self.levels, self.normalise, self.wavelet = float(c), int(levels), bool(normalise), wavelet

    def forward(self, images: Tensor, gt: Tensor | None = None, captions: Captions = None) -> Tensor:
        from facereward.metrics.wavelet import lowpass_l1

        dist = lowpass_l1(images, _need_gt("wavelet", gt), levels=self.levels, normalise=self.normalise, wavelet=self.wavelet)
        return torch.exp(-self.c * dist.float())  # docs/methods.md 2.2


class IdentityReward(nn.Module):
    """Cosine similarity of identity embeddings of x and gt, with a named embedder ("toy", "dlib", "arcface").

    Differentiable when the embedder is a torch module (the toy one); dlib and ONNX ArcFace are not.
    """

    needs_gt = True

    def __init__(self, embedder: str = "toy", **embedder_options: Any):
        super().__init__()
        from facereward.metrics.identity import get_identity_embedder

        judge = get_identity_embedder(embedder, **embedder_options)
        self.differentiable = isinstance(judge, nn.Module)
        if self.differentiable:
            judge.requires_grad_(False)
            judge.eval()
            self.module = judge
        self.judge = judge

    def _embed(self, images: Tensor) -> Tensor:
        if self.differentiable:
            return F.normalize(self.judge(images).float(), dim=-1)
        return self.judge.embed(images).float().to(images.device)

    def forward(self, images: Tensor, gt: Tensor | None = None, captions: Captions = None) -> Tensor:
        gt = _need_gt("identity", gt)
        emb = self._embed(torch.cat([images, gt.to(images.dtype)]))
        n = images.shape[0]
        return (emb[:n] * emb[n:]).sum(dim=-1)


class PSNRReward(nn.Module):
    """PSNR(x, gt) in dB (BasicSR convention, not quantised, so differentiable), capped at `max_db`."""

    differentiable = True
    needs_gt = True

    def __init__(self, max_db: float = 60.0, y_channel: bool = False):
        super().__init__()
        self.max_db, self.y_channel = float(max_db), bool(y_channel)

    def forward(self, images: Tensor, gt: Tensor | None = None, captions: Captions = None) -> Tensor:
        from facereward.metrics.fullref import psnr

        value = psnr(images.clamp(0, 1), _need_gt("psnr", gt), y_channel=self.y_channel, quantize=False)
        return value.clamp(max=self.max_db).float()


class SSIMReward(nn.Module):
    """SSIM(x, gt) (BasicSR convention, not quantised, so differentiable)."""

    differentiable = True
    needs_gt = True

    def __init__(self, y_channel: bool = False):
        super().__init__()
        self.y_channel = bool(y_channel)

    def forward(self, images: Tensor, gt: Tensor | None = None, captions: Captions = None) -> Tensor:
        from facereward.metrics.fullref import ssim

        return ssim(images.clamp(0, 1), _need_gt("ssim", gt), y_channel=self.y_channel, quantize=False).float()


def _register_builtins() -> None:
    for name, factory in (("frm", FRMReward), ("lpips", LPIPSReward), ("wavelet", WaveletReward), ("clipiqa", CLIPIQAReward),
                          ("identity", IdentityReward), ("psnr", PSNRReward), ("ssim", SSIMReward)):
        register_reward(name, factory, overwrite=True)


_register_builtins()

__all__ = ["CLIPIQAReward", "FRMReward", "IdentityReward", "LPIPSReward", "PSNRReward", "SSIMReward", "WaveletReward"]
