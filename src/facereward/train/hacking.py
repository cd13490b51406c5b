"""A reward-hacking alarm: the training reward rises while a frozen held-out judge falls, evaluation after evaluation.

The trainers keep one record per held-out evaluation ({"train_reward": mean reward since the previous evaluation,
judge: held-out score, ...}); `hacking_alarms` reads those records, so the alarm needs no state of its own and a
resumed run sees the same alarms. A judge "falls" when it moves the wrong way (down for scores, up for the
lower-is-better ones) while the reward moves up, for `patience` evaluations in a row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

LOWER_IS_BETTER = frozenset({"lmd", "lpips", "niqe", "fid"})


@dataclass
class HackingAlarm:
    """One fired alarm: the judge, the evaluation steps of the streak and both curves over it."""

    judge: str
    steps: list[int]
    train_reward: list[float]
    judge_values: list[float]

    def message(self) -> str:
        fmt = lambda values: " -> ".join(f"{v:.4g}" for v in values)  # noqa: E731
        return (f"possible reward hacking: the training reward rose ({fmt(self.train_reward)}) while held-out "
                f"{self.judge} fell ({fmt(self.judge_values)}) over steps {self.steps[0]}-{self.steps[-1]}")


def hacking_alarms(records: Sequence[dict], judges: Sequence[str], patience: int, step_key: str = "step",
                   tolerance: float = 0.0) -> list[HackingAlarm]:
    """Every streak of `patience` consecutive evaluations where the reward rose and a judge fell, once per streak.

    Judges missing from the records are skipped; `tolerance` is the smallest change that counts (absolute).
    """
    if patience < 1:
        return []
    rows = [r for r in records if "train_reward" in r]
    alarms: list[HackingAlarm] = []
    for judge in judges:
        sign = 1.0 if judge.split("/")[-1] in LOWER_IS_BETTER else -1.0  # +1: a rise is a fall in quality
        streak = 0
        for i in range(1, len(rows)):
            prev, cur = rows[i - 1], rows[i]
            if judge not in prev or judge not in cur:
                streak = 0
                continue
            rose = cur["train_reward"] - prev["train_reward"] > tolerance
            fell = sign * (cur[judge] - prev[judge]) > tolerance
            streak = streak + 1 if rose and fell else 0
            if streak == patience:
                window = rows[i - patience: i + 1]
                alarms.append(HackingAlarm(judge, [int(r[step_key]) for r in window],
                                           [float(r["train_reward"]) for r in window], [float(r[judge]) for r in window]))
    return alarms


def new_alarms(records: Sequence[dict], judges: Sequence[str], patience: int, step: int,
               step_key: str = "step") -> list[HackingAlarm]:
    """The alarms whose streak ends at evaluation `step` (what a trainer reports right after that evaluation)."""
    return [a for a in hacking_alarms(records, judges, patience, step_key) if a.steps[-1] == step]
