"""Did an RL run have anything to learn from? Checked from the rewards it actually computed.

GRPO learns from differences between the answers to one prompt: a group whose rewards are all
equal has zero advantage and moves nothing (the KL term alone keeps the model where it is). A run
whose reward was never called, or whose groups were flat from the start (e.g. every answer
illegitimate: all −1), leaves the model as it was while looking like it trained. This module
says so, from the rewards the run logged.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

FIRST_STEPS = 3  # "flat from the start" means flat for this many reward rounds


@dataclass
class RewardHealth:
    """Reward spread per round (one call of the reward = one round of generations)."""

    rounds: int
    groups: int
    flat_groups: int
    flat_rounds: list[bool] = field(default_factory=list)  # every group flat, per round
    legitimate: list[float] = field(default_factory=list)  # share of answers above −1, per round
    flat_values: set[float] = field(default_factory=set)  # the rewards of flat groups, e.g. −1
    mean_reward: list[float] = field(default_factory=list)  # per round

    def trend(self) -> tuple[float, float] | None:
        """Mean reward over the first and the last fifth of the rounds (at least one round
        each): did training raise it? None with fewer than two rounds."""
        if self.rounds < 2:
            return None
        k = max(1, self.rounds // 5)
        first, last = self.mean_reward[:k], self.mean_reward[-k:]
        return sum(first) / len(first), sum(last) / len(last)

    @property
    def never_called(self) -> bool:
        return self.rounds == 0

    @property
    def flat_from_start(self) -> bool:
        first = self.flat_rounds[:FIRST_STEPS]
        return bool(first) and all(first)

    @property
    def all_flat(self) -> bool:
        return bool(self.flat_rounds) and all(self.flat_rounds)

    def warning(self) -> str | None:
        """What a user must hear about this run (None when the rewards had spread)."""
        if self.never_called:
            return ("The reward function was never called, so nothing was optimised. Check that "
                    "the run had training steps and prompts (trainer.total_training_steps, "
                    "data.train_files).")
        values = ", ".join(f"{v:g}" for v in sorted(self.flat_values)) or "equal"
        if self.all_flat:
            return (f"Every group's rewards were identical in all {self.rounds} round(s) "
                    f"(reward {values}), so GRPO's advantages were zero and the model is "
                    "unchanged. Start RL from a model that sometimes answers legitimately (run "
                    "`cellpuzzle sft` first), or sample more varied answers (raise "
                    "actor_rollout_ref.rollout.n or rollout.temperature).")
        if self.flat_from_start:
            k = min(FIRST_STEPS, self.rounds)
            return (f"The first {k} round(s) had no reward spread within any group (reward "
                    f"{values}); GRPO only learns from rounds where answers to a prompt differ "
                    f"({self.groups - self.flat_groups} of {self.groups} groups did).")
        return None

    def summary(self) -> dict[str, Any]:
        trend = self.trend()
        return {"rounds": self.rounds, "groups": self.groups, "flat_groups": self.flat_groups,
                "flat_from_start": self.flat_from_start, "all_flat": self.all_flat,
                "legitimate_share": self.legitimate, "mean_reward": self.mean_reward,
                "reward_first_fifth": trend[0] if trend else None,
                "reward_last_fifth": trend[1] if trend else None}


def reward_health(records: Sequence[dict[str, Any]], group_size: int) -> RewardHealth:
    """From logged rewards (`call`, `reward` per answer, answers to one prompt adjacent, as GRPO
    samplers lay them out): how many groups and rounds had no spread."""
    by_call: dict[int, list[float]] = defaultdict(list)
    for rec in records:
        by_call[int(rec["call"])].append(float(rec["reward"]))
    health = RewardHealth(rounds=len(by_call), groups=0, flat_groups=0)
    for call in sorted(by_call):
        rewards = by_call[call]
        groups = [rewards[i:i + group_size] for i in range(0, len(rewards), group_size)]
        flat = [g for g in groups if max(g) == min(g)]
        health.groups += len(groups)
        health.flat_groups += len(flat)
        health.flat_rounds.append(len(flat) == len(groups))
        health.flat_values.update(g[0] for g in flat)
        health.legitimate.append(sum(r > -1 for r in rewards) / len(rewards))
        health.mean_reward.append(sum(rewards) / len(rewards))
    return health
