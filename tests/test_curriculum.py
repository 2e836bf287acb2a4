"""The ZAYA1 difficulty curriculum and the least-sampled environment sampler.

Run: .venv/bin/python -m pytest tests/test_curriculum.py
"""

import json
import random

from openzaya.envs.curriculum import LeastSampledSampler, ZayaCurriculum


def test_zaya_rule_trajectory():
    c = ZayaCurriculum(max_difficulty=3)
    rewards = [0.8, 0.71, 0.7, 0.9, 0.0, 0.0, 0.0, 0.0, 1.0, 0.5]
    traj = []
    for r in rewards:
        traj.append(c.update("a", c.difficulty("a"), r))
    # > 0.7 raises (0.7 itself does not), 0 lowers, clamped to [0, 3]
    assert traj == [1, 2, 2, 3, 2, 1, 0, 0, 1, 1]
    # a group generated at a stale (lower) difficulty does not raise the level
    assert c.update("a", 0, 1.0) == 1
    # but an all-zero group lowers it whatever its difficulty; environments are independent
    assert c.update("a", 5, 0.0) == 0 and c.difficulty("b") == 0


def test_least_sampled_sampler():
    s = LeastSampledSampler(["a", "b", "c"], counts={"a": 5, "b": 0})
    rng = random.Random(0)
    picks = [s.sample(rng) for _ in range(10)]
    assert "a" not in picks and s.counts == {"a": 5, "b": 5, "c": 5}   # b and c catch up first
    assert sorted(s.sample(rng) for _ in range(3)) == ["a", "b", "c"]
    assert sorted(picks[:2]) == ["b", "c"]


def test_state_round_trips_through_json():
    rng = random.Random(0)
    zc = ZayaCurriculum()
    zc.update("a", 0, 1.0)
    ls = LeastSampledSampler(["a", "b"])
    ls.sample(rng)
    for obj, fresh in [(zc, ZayaCurriculum()), (ls, LeastSampledSampler([]))]:
        state = json.loads(json.dumps(obj.state_dict()))
        fresh.load_state_dict(state)
        assert fresh.state_dict() == obj.state_dict(), type(obj).__name__
