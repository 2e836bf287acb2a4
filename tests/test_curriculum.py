"""Difficulty curricula, the least-sampled environment sampler and Thompson-sampling calibration.

Run: .venv/bin/python -m pytest tests/test_curriculum.py
"""

import json
import math
import random

from openzaya.envs.curriculum import (LeastSampledSampler, ReasoningGymCurriculum, RLVECurriculum, ThompsonCalibrator,
                                      ZayaCurriculum, solve_prob)


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


def test_rlve_rule_trajectory_and_window():
    c = RLVECurriculum(group_size=2, min_prompts=2, window=4, max_difficulty=9)   # check after 4 samples at h
    traj = []
    for accs in [[1, 1], [1, 1], [1, 1], [1, 0], [1, 1], [1, 1], [0, 0], [0, 0], [1, 1], [1, 1]]:
        traj.append(c.update("e", c.upper("e"), accs))
    # 4/4 -> up; 3/4 = 0.75 < 0.9 -> stay (counters reset); 4/4 -> up; 0/4 -> stay (never lowers); 4/4 -> up
    assert traj == [0, 1, 1, 1, 1, 2, 2, 2, 2, 3]
    # samples below the top level are not counted
    assert c.update("e", 1, [1, 1]) == 3 and c.count["e"] == 0
    rng = random.Random(0)
    assert {c.sample("e", rng) for _ in range(200)} == {0, 1, 2, 3}
    for _ in range(3):
        c.top["e"] += 1
    assert {c.sample("e", rng) for _ in range(200)} == {3, 4, 5, 6}


def test_reasoning_gym_rule_trajectory():
    c = ReasoningGymCurriculum(window=4, update_steps=3)
    traj = [c.update("k", [s]) for s in [1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0.5, 0.5, 0.5]]
    # checks on steps 3, 6, 9, 12, 15: mean 1 > 0.7 up, 1 up, 0 < 0.3 down, 0 down, 0.5 stay
    assert traj == [0, 0, 1, 1, 1, 2, 2, 2, 1, 1, 1, 0, 0, 0, 0]


def test_least_sampled_sampler():
    s = LeastSampledSampler(["a", "b", "c"], counts={"a": 5, "b": 0})
    rng = random.Random(0)
    picks = [s.sample(rng) for _ in range(10)]
    assert "a" not in picks and s.counts == {"a": 5, "b": 5, "c": 5}   # b and c catch up first
    assert sorted(s.sample(rng) for _ in range(3)) == ["a", "b", "c"]
    assert sorted(picks[:2]) == ["b", "c"]


def test_thompson_calibration_finds_half_solve_level():
    true_mu, slope = 6.3, 1.0
    cal = ThompsonCalibrator(slope=slope, prior_mean=2.0, prior_std=3.0)
    rng, solver = random.Random(0), random.Random(1)
    start = cal.estimate()
    for _ in range(60):
        d = cal.propose(rng)
        p = solve_prob(d, true_mu, slope)
        wins = sum(solver.random() < p for _ in range(8))
        cal.update(d, wins, 8)
    assert start <= 3
    assert abs(cal.mean_ability() - true_mu) < 0.8
    assert cal.estimate() == 6
    assert abs(solve_prob(cal.estimate(), true_mu, slope) - 0.5) < 0.2


def test_solve_prob_is_logistic():
    assert solve_prob(4, 4, 1.0) == 0.5
    assert math.isclose(solve_prob(5, 4, 2.0), 1 / (1 + math.exp(0.5)))
    assert solve_prob(9, 4, 1.0) < solve_prob(2, 4, 1.0)


def test_state_round_trips_through_json():
    rng = random.Random(0)
    zc = ZayaCurriculum()
    zc.update("a", 0, 1.0)
    rc = RLVECurriculum(group_size=2, min_prompts=2)
    rc.update("a", 0, [1, 0])
    gc = ReasoningGymCurriculum(window=3, update_steps=2)
    gc.update("a", [1, 0, 1, 1])
    ls = LeastSampledSampler(["a", "b"])
    ls.sample(rng)
    tc = ThompsonCalibrator()
    tc.update(3, 5, 8)
    for obj, fresh in [(zc, ZayaCurriculum()), (rc, RLVECurriculum(group_size=2, min_prompts=2)),
                       (gc, ReasoningGymCurriculum(window=3, update_steps=2)), (ls, LeastSampledSampler([])),
                       (tc, ThompsonCalibrator())]:
        state = json.loads(json.dumps(obj.state_dict()))
        fresh.load_state_dict(state)
        assert fresh.state_dict() == obj.state_dict(), type(obj).__name__
    # restored objects continue identically
    gc2 = ReasoningGymCurriculum(window=3, update_steps=2)
    gc2.load_state_dict(json.loads(json.dumps(gc.state_dict())))
    assert gc2.update("a", [1, 1]) == gc.update("a", [1, 1]) == 1
    tc2 = ThompsonCalibrator()
    tc2.load_state_dict(json.loads(json.dumps(tc.state_dict())))
    assert [tc2.propose(random.Random(5)) for _ in range(3)] == [tc.propose(random.Random(5)) for _ in range(3)]
