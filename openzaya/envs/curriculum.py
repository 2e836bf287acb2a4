"""Difficulty curriculum and environment sampling for adaptive-environment RL (spec environments.md §3).

- `ZayaCurriculum`: ZAYA1 stage 2 (TR §IV): per environment, d += 1 when a group at the current d has mean reward
  > 0.7, d -= 1 when the group's mean reward is 0.
- `LeastSampledSampler`: picks an environment among those sampled least so far (ZAYA1: "favours the least-sampled").
- `ProblemSource`: the RL loop's source of problems: environment (uniform or least-sampled), difficulty (fixed, a
  uniform range or the curriculum), seed, and a `ttc_fraction` of self-aggregation prompts built from the tails of
  the policy's own recent groups (`ttc.build_aggregation_prompt`).

Simplified: no Thompson-sampling calibration of the starting difficulty (every environment starts at the stage's
`difficulty`). States are plain JSON-able dicts via `state_dict()` / `load_state_dict()`; randomness comes from a
`random.Random` the caller passes in.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

from openzaya.ttc import AGGREGATION_TEMPLATE_V1, build_aggregation_prompt


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


# -----------------------------------------------------------------------------
# The RL problem source: environment + difficulty + seed for each job, with a checkpointable state


@dataclass
class ProblemSource:
    """Environment + difficulty + seed for each RL job (or, a `ttc_fraction` of the time, a self-aggregation prompt
    over the tails of a recent group), with a checkpointable state. `cfg` is the stage's rl_loop.RLConfig."""
    cfg: object
    envs: dict
    seed_counter: int = 0
    drawn: int = 0            # jobs handed out so far: the next job's id (its sampling seeds derive from it)
    rng: random.Random = None
    curriculum: object = None
    sampler: object = None
    recent: deque = field(default_factory=lambda: deque(maxlen=32))   # own rollouts for self-aggregation
    best_solve: dict = field(default_factory=dict)                   # p* per data source (length reward)

    def __post_init__(self):
        missing = [n for n in self.cfg.envs if n not in self.envs]
        assert not missing, f"unknown environments {missing[:5]} ({len(missing)} missing)"
        assert self.cfg.envs, f"stage {self.cfg.stage}: no environments"
        self.rng = self.rng or random.Random(self.cfg.seed)
        top = self.cfg.max_difficulty
        assert top is None or self.cfg.difficulty <= top, f"difficulty {self.cfg.difficulty} > max_difficulty {top}"
        if self.cfg.curriculum == "zaya":
            self.curriculum = ZayaCurriculum(initial=self.cfg.difficulty,
                                             max_difficulty=ZayaCurriculum.max_difficulty if top is None else top)
        if self.cfg.env_sampling == "least_sampled":
            self.sampler = LeastSampledSampler(list(self.cfg.envs))

    def difficulty(self, name: str) -> int:
        env = self.envs[name]
        if self.curriculum is not None:
            d = self.curriculum.difficulty(name)
        elif self.cfg.max_difficulty is not None:
            d = self.rng.randint(self.cfg.difficulty, self.cfg.max_difficulty)
        else:
            d = self.cfg.difficulty
        return min(max(d, env.min_difficulty), env.max_difficulty)

    def next_problem(self):
        """(kind, env name, Problem, prompt text); kind "aggregate" for a self-aggregation prompt."""
        cfg = self.cfg
        self.drawn += 1
        if cfg.ttc_fraction > 0 and len(self.recent) and self.rng.random() < cfg.ttc_fraction:
            problem, tails = self.recent[self.rng.randrange(len(self.recent))]
            picked = self.rng.sample(tails, min(cfg.ttc_candidates, len(tails)))
            prompt = build_aggregation_prompt(problem.prompt, picked, cfg.ttc_template or AGGREGATION_TEMPLATE_V1)
            return "aggregate", problem.env, problem, prompt
        for _ in range(20):
            name = self.sampler.sample(self.rng) if self.sampler is not None else self.rng.choice(cfg.envs)
            self.seed_counter += 1
            try:
                problem = self.envs[name].generate(self.difficulty(name), self.seed_counter)
            except Exception as e:        # a failing generator is skipped, as RLVE does
                print(f"rl: {name} failed to generate (seed {self.seed_counter}): {type(e).__name__}: {e}")
                continue
            return "plain", name, problem, problem.prompt
        raise RuntimeError("20 consecutive problem generations failed")

    def update(self, name: str, problem, kind: str, accuracies: list[float], rewards: list[float], tails: list[str]):
        if self.curriculum is not None and kind == "plain":
            self.curriculum.update(name, problem.difficulty, sum(rewards) / len(rewards))
        if self.cfg.ttc_fraction > 0 and kind == "plain":
            self.recent.append((problem, tails))

    def state_dict(self) -> dict:
        return {"seed_counter": self.seed_counter, "drawn": self.drawn, "rng": self.rng.getstate(),
                "best_solve": dict(self.best_solve), "recent": list(self.recent),
                "curriculum": self.curriculum.state_dict() if self.curriculum is not None else None,
                "sampler": self.sampler.state_dict() if self.sampler is not None else None}

    def load_state_dict(self, s: dict):
        self.seed_counter, self.drawn, self.best_solve = s["seed_counter"], s["drawn"], dict(s["best_solve"])
        self.recent.clear()
        self.recent.extend(s["recent"])
        self.rng.setstate(s["rng"])
        if self.curriculum is not None and s["curriculum"] is not None:
            self.curriculum.load_state_dict(s["curriculum"])
        if self.sampler is not None and s["sampler"] is not None:
            self.sampler.load_state_dict(s["sampler"])
