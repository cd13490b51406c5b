"""Deprecated (one release): rewards are the reward forms of `facereward.measures`; these names point there."""

from facereward.measures import PAPER_WEIGHTS, MeasuresConfig, WeightedOutput, WeightedSum, create_measure, list_measures, register_reward

CompositeReward = WeightedSum
RewardsConfig = MeasuresConfig
RewardOutput = WeightedOutput


def build_reward(name: str, **options):
    """Deprecated: `create_measure(name, as_reward=True, **options)`."""
    return create_measure(name, as_reward=True, **options)


def list_rewards() -> list[str]:
    """Deprecated: the measures with a reward form."""
    return [s.name for s in list_measures() if s.reward is not None]


__all__ = ["PAPER_WEIGHTS", "CompositeReward", "RewardOutput", "RewardsConfig", "build_reward", "list_rewards", "register_reward"]
