"""Difficulty curricula and environment sampling for adaptive-environment RL (spec environments.md §3).

- `ZayaCurriculum`: ZAYA1 stage 2 (TR §IV): per environment, d += 1 when a group at the current d has mean reward
  > 0.7, d -= 1 when the group's mean reward is 0.
- `RLVECurriculum`: RLVE's manager: sample a level uniformly from the top `window` levels up to h; count only samples
  at h; after `min_prompts * group_size` of them, h += 1 if mean accuracy >= 0.9; counters reset either way; never
  lowers.
- `ReasoningGymCurriculum`: two-sided: every `update_steps` updates, raise when the mean over the last K scores is
  > 0.7, lower when < 0.3.
- `LeastSampledSampler`: picks an environment among those sampled least so far (ZAYA1: "favours the least-sampled").
- `ThompsonCalibrator`: ZAYA1's starting-difficulty calibration: IRT logistic p(solve | d) = sigmoid(-(d - mu)/s),
  a grid posterior over the ability mu under a Gaussian prior, Thompson draws, target solve rate 0.5 with
  epsilon-greedy targets 0.25 / 0.75, Binomial likelihood updates.

Simplified: the TR keeps a pool of (mu, s) parameters with a shared prior; we fix the slope s and put a grid over mu
only (one calibrator per environment, the prior passed in by the caller). The reasoning-gym window K is our choice
(64), and we clear the window after a level change so the next decision measures the new level only (the spec does
not say). All states are plain JSON-able dicts via `state_dict()` / `load_state_dict()`; randomness comes from a
`random.Random` the caller passes in.
"""

from __future__ import annotations

import math
import random
from collections import deque
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
# RLVE: sliding window of the top levels, monotone


@dataclass
class RLVECurriculum:
    group_size: int = 16               # samples per prompt (n_samples_per_prompt)
    window: int = 4                    # levels h - window + 1 .. h
    min_prompts: int = 8               # check after min_prompts * group_size counted samples
    up_threshold: float = 0.9          # mean accuracy >= this raises h
    initial: int = 0
    max_difficulty: int = 9
    top: dict[str, int] = field(default_factory=dict)
    correct: dict[str, float] = field(default_factory=dict)
    count: dict[str, int] = field(default_factory=dict)

    def upper(self, env: str) -> int:
        return self.top.get(env, self.initial)

    def sample(self, env: str, rng: random.Random) -> int:
        h = self.upper(env)
        return rng.randint(max(0, h - self.window + 1), h)

    def update(self, env: str, level: int, accuracies: list[float]) -> int:
        """Record one group's binary accuracies at `level`; returns the (possibly raised) upper level h."""
        h = self.upper(env)
        if level != h:
            return h
        self.correct[env] = self.correct.get(env, 0.0) + sum(accuracies)
        self.count[env] = self.count.get(env, 0) + len(accuracies)
        if self.count[env] >= self.min_prompts * self.group_size:
            if self.correct[env] / self.count[env] >= self.up_threshold:
                h = min(h + 1, self.max_difficulty)
            self.top[env], self.correct[env], self.count[env] = h, 0.0, 0
        return h

    def state_dict(self) -> dict:
        return {"top": dict(self.top), "correct": dict(self.correct), "count": dict(self.count)}

    def load_state_dict(self, state: dict) -> None:
        self.top = {k: int(v) for k, v in state["top"].items()}
        self.correct = {k: float(v) for k, v in state["correct"].items()}
        self.count = {k: int(v) for k, v in state["count"].items()}


# -----------------------------------------------------------------------------
# reasoning-gym: two-sided over the last K scores, checked every update_steps


@dataclass
class ReasoningGymCurriculum:
    window: int = 64                   # K, the last K scores (our choice)
    update_steps: int = 30
    up_threshold: float = 0.7          # raise when mean > this
    down_threshold: float = 0.3        # lower when mean < this
    initial: int = 0
    min_difficulty: int = 0
    max_difficulty: int = 9
    level: dict[str, int] = field(default_factory=dict)
    scores: dict[str, deque] = field(default_factory=dict)
    steps: dict[str, int] = field(default_factory=dict)

    def difficulty(self, env: str) -> int:
        return self.level.get(env, self.initial)

    def update(self, env: str, scores: list[float]) -> int:
        """One training step's scores for `env`; every `update_steps` calls the level may move by one."""
        buf = self.scores.setdefault(env, deque(maxlen=self.window))
        buf.extend(scores)
        self.steps[env] = self.steps.get(env, 0) + 1
        d = self.difficulty(env)
        if self.steps[env] % self.update_steps == 0 and buf:
            mean = sum(buf) / len(buf)
            new = min(d + 1, self.max_difficulty) if mean > self.up_threshold else \
                max(d - 1, self.min_difficulty) if mean < self.down_threshold else d
            if new != d:
                buf.clear()
            d = new
        self.level[env] = d
        return d

    def state_dict(self) -> dict:
        return {"level": dict(self.level), "scores": {k: list(v) for k, v in self.scores.items()},
                "steps": dict(self.steps)}

    def load_state_dict(self, state: dict) -> None:
        self.level = {k: int(v) for k, v in state["level"].items()}
        self.scores = {k: deque(v, maxlen=self.window) for k, v in state["scores"].items()}
        self.steps = {k: int(v) for k, v in state["steps"].items()}


# -----------------------------------------------------------------------------
# environment sampler


@dataclass
class LeastSampledSampler:
    envs: list[str]
    counts: dict[str, int] = field(default_factory=dict)

    def sample(self, rng: random.Random, record: bool = True) -> str:
        """An environment with the fewest samples so far (ties broken at random)."""
        low = min(self.counts.get(e, 0) for e in self.envs)
        env = rng.choice([e for e in self.envs if self.counts.get(e, 0) == low])
        if record:
            self.record(env)
        return env

    def record(self, env: str, n: int = 1) -> None:
        self.counts[env] = self.counts.get(env, 0) + n

    def state_dict(self) -> dict:
        return {"envs": list(self.envs), "counts": dict(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        self.envs, self.counts = list(state["envs"]), {k: int(v) for k, v in state["counts"].items()}


# -----------------------------------------------------------------------------
# Thompson-sampling calibration of the starting difficulty


def solve_prob(d: float, mu: float, s: float) -> float:
    """IRT logistic: p(solve | d) = sigmoid(-(d - mu) / s); mu is the level solved half of the time."""
    return 1.0 / (1.0 + math.exp((d - mu) / s))


@dataclass
class ThompsonCalibrator:
    min_difficulty: int = 0
    max_difficulty: int = 9
    slope: float = 1.0                 # s, fixed
    prior_mean: float = 2.0            # Gaussian prior on mu (shared across environments by the caller)
    prior_std: float = 3.0
    target: float = 0.5
    epsilon: float = 0.2               # with this probability aim at target -/+ 0.25 instead
    grid_points: int = 121
    log_post: list[float] = field(default_factory=list)

    def __post_init__(self):
        if not self.log_post:
            self.log_post = [-0.5 * ((mu - self.prior_mean) / self.prior_std) ** 2 for mu in self.grid()]

    def grid(self) -> list[float]:
        lo, hi = self.min_difficulty - 3.0, self.max_difficulty + 3.0
        return [lo + (hi - lo) * i / (self.grid_points - 1) for i in range(self.grid_points)]

    def posterior(self) -> list[float]:
        m = max(self.log_post)
        w = [math.exp(x - m) for x in self.log_post]
        z = sum(w)
        return [x / z for x in w]

    def propose(self, rng: random.Random) -> int:
        """Draw mu from the posterior, then the level whose predicted solve rate is the (epsilon-greedy) target."""
        mu = rng.choices(self.grid(), weights=self.posterior())[0]
        p = self.target if rng.random() >= self.epsilon else rng.choice([self.target - 0.25, self.target + 0.25])
        d = mu - self.slope * math.log(p / (1 - p))      # solves sigmoid(-(d - mu)/s) = p
        return min(max(round(d), self.min_difficulty), self.max_difficulty)

    def update(self, difficulty: int, successes: int, trials: int) -> None:
        """Binomial likelihood update with `successes` out of `trials` at `difficulty`."""
        for i, mu in enumerate(self.grid()):
            p = min(max(solve_prob(difficulty, mu, self.slope), 1e-9), 1 - 1e-9)
            self.log_post[i] += successes * math.log(p) + (trials - successes) * math.log(1 - p)

    def mean_ability(self) -> float:
        return sum(mu * w for mu, w in zip(self.grid(), self.posterior()))

    def estimate(self) -> int:
        """The starting difficulty: the level nearest the posterior mean of mu (predicted solve rate 0.5)."""
        return min(max(round(self.mean_ability()), self.min_difficulty), self.max_difficulty)

    def state_dict(self) -> dict:
        return {"log_post": list(self.log_post)}

    def load_state_dict(self, state: dict) -> None:
        assert len(state["log_post"]) == self.grid_points, "grid size mismatch"
        self.log_post = [float(x) for x in state["log_post"]]
