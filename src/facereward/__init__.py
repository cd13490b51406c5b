"""facereward: reward-aligned blind face restoration (DiffusionReward ReFL and LRPO)."""

__version__ = "0.1.0"
