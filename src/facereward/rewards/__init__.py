"""Rewards (DESIGN.md layer 3): one small protocol, a registry by name, built-ins and a weighted composite.

A reward maps restored images in [0, 1] (B, 3, H, W), the ground truth (or None) and captions to one
score per image, (B,) float32, higher is better. Built-ins: ``frm``, ``lpips`` (1 - LPIPS),
``wavelet`` (exp(-c * DWT_L1)), ``clipiqa`` (CLIPIQA from a local CLIP folder, docs/methods.md 3),
``identity`` (embedding cosine), ``psnr``, ``ssim``.
"""

from facereward.rewards.base import (
    PAPER_WEIGHTS,
    CompositeReward,
    Reward,
    RewardOutput,
    RewardsConfig,
    build_reward,
    list_rewards,
    register_reward,
)
from facereward.rewards.builtin import (
    CLIPIQAReward,
    FRMReward,
    IdentityReward,
    LPIPSReward,
    PSNRReward,
    SSIMReward,
    WaveletReward,
)

__all__ = [
    "PAPER_WEIGHTS",
    "CLIPIQAReward",
    "CompositeReward",
    "FRMReward",
    "IdentityReward",
    "LPIPSReward",
    "PSNRReward",
    "Reward",
    "RewardOutput",
    "RewardsConfig",
    "SSIMReward",
    "WaveletReward",
    "build_reward",
    "list_rewards",
    "register_reward",
]
