"""Difficulty curriculum and environment sampling for adaptive-environment RL (spec environments.md §3).

- `ZayaCurriculum`: ZAYA1 stage 2 (TR §IV): per environment, d += 1 when a group at the current d has mean reward
  > 0.7, d -= 1 when the group's mean reward is 0.
- `LeastSampledSampler`: picks an environment among those sampled least so far (ZAYA1: "favours the least-sampled").

Simplified: no Thompson-sampling calibration of the starting difficulty (every environment starts at the stage's
`difficulty`). States are plain JSON-able dicts via `state_dict()` / `load_state_dict()`; randomness comes from a
`random.Random` the caller passes in.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


# -----------------------------------------------------------------------------
# ZAYA1 stage 2: two-sided, per group


@dataclass
class ZayaCurriculum:
    initial: int = 0
    min_difficulty: int = 0
    max_difficulty: int = 9
    up_threshold: float = 0.7          # raise when group mean reward > this
    level: dict[str, int] = field(default_factory=dict)

    def difficulty(self, env: str) -> int:
        return self.level.get(env, self.initial)

    def update(self, env: str, group_difficulty: int, mean_reward: float) -> int:
        """Apply one group's result; returns the environment's new difficulty."""
        d = self.difficulty(env)
        if mean_reward > self.up_threshold and group_difficulty == d:
            d = min(d + 1, self.max_difficulty)
        elif mean_reward == 0:
            d = max(d - 1, self.min_difficulty)
        self.level[env] = d
        return d

    def state_dict(self) -> dict:
        return {"level": dict(self.level)}

    def load_state_dict(self, state: dict) -> None:
        self.level = {k: int(v) for k, v in state["level"].items()}


# -----------------------------------------------------------------------------
# environment sampler


@dataclass
class LeastSampledSampler:
    envs: list[str]
    counts: dict[str, int] = field(default_factory=dict)

    def sample(self, rng: random.Random) -> str:
        """An environment with the fewest samples so far (ties broken at random), counted as sampled."""
        low = min(self.counts.get(e, 0) for e in self.envs)
        env = rng.choice([e for e in self.envs if self.counts.get(e, 0) == low])
        self.counts[env] = self.counts.get(env, 0) + 1
        return env

    def state_dict(self) -> dict:
        return {"envs": list(self.envs), "counts": dict(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        self.envs, self.counts = list(state["envs"]), {k: int(v) for k, v in state["counts"].items()}
