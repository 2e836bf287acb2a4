"""Adapters: reasoning-gym, RLVE-Gym, code and instruction-following environments (counts, a sampled check,
RLVE isolation). The full check of every environment is `openzaya envs check`.

Run: .venv/bin/python -m pytest tests/test_envs_external.py
"""

import random
import time

import pytest

from openzaya.envs.registry import check_env

from openzaya.envs import rgym, rlve
from openzaya.envs.code import load_code
from openzaya.envs.ifeval import CHECKERS, check_all, load_ifeval


@pytest.fixture(scope="module")
def envs():
    return {"rg": rgym.load_rgym(), "rlve": rlve.load_rlve(), "code": load_code(), "ifeval": load_ifeval()}


def test_counts(envs):
    from reasoning_gym.factory import DATASETS
    assert len(envs["rg"]) == len(DATASETS) - len(rgym.NO_REFERENCE & set(DATASETS)) >= 95
    assert len(rlve.all_names()) == 400
    assert len(envs["rlve"]) == 400 - len(rlve.NO_REFERENCE) - len(rlve.EXCLUDED) == 333
    assert len(envs["code"]) >= 100 and len(envs["ifeval"]) == len(CHECKERS) + 1
    assert sum(len(v) for v in envs.values()) >= 500


def _sample_check(envs: dict, k: int, seed: int = 0) -> list[str]:
    names = random.Random(seed).sample(sorted(envs), k)
    failures = []
    for n in names:
        env = envs[n]
        failures += check_env(env, difficulties=sorted({env.min_difficulty, min(env.max_difficulty, 2)}), seeds=(0,))
    return failures


def test_sample_reasoning_gym(envs):
    slow = {"rg/jugs", "rg/zebra_puzzles", "rg/n_queens", "rg/sokoban", "rg/bf"}
    assert _sample_check({n: e for n, e in envs["rg"].items() if n not in slow}, 12) == []


def test_sample_rlve(envs):
    assert _sample_check(envs["rlve"], 25) == []


def test_sample_code(envs):
    names = ["code/output", "code/input", "code/reconstruct", "code/falsify"]
    assert _sample_check({n: envs["code"][n] for n in names}, 4) == []


def test_sample_ifeval(envs):
    assert _sample_check(envs["ifeval"], 10) == []


def test_scores_wrong_answers(envs):
    p = envs["rlve"]["rlve/Sorting"].generate(2, 5)
    s = envs["rlve"]["rlve/Sorting"].score(p, "\\boxed{1 2}")
    assert s.accuracy == 0.0 and s.reward == 0.0 and s.format_ok is not None
    p = envs["code"]["code/reconstruct/sum_evens"].generate(1, 0)
    s = envs["code"]["code/reconstruct/sum_evens"].score(p, "<answer>def sum_evens(xs):\n    return 0\n</answer>")
    assert s.accuracy == 0.0
    p = envs["ifeval"]["ifeval/lowercase"].generate(0, 0)
    s = envs["ifeval"]["ifeval/lowercase"].score(p, "<answer>Not Lowercase</answer>")
    assert s.accuracy == 0.0 and s.format_ok


def test_ifeval_checkers():
    cons = {"bullets": {"n": 2}, "no_commas": {"n": 0}, "title": {"n": 0}}
    assert all(check_all("<<T>>\n* one\n* two", cons).values())
    assert not check_all("* one, two", cons)["no_commas"]
    assert check_all('```json\n{"a": 1}\n```', {"json": {"n": 0}})["json"]


def test_rlve_isolation_keeps_parent_rng(envs):
    random.seed(1234)
    state = random.getstate()
    import numpy as np
    np.random.seed(99)
    np_state = np.random.get_state()[1].copy()
    env = envs["rlve"]["rlve/Sorting"]
    env.score(env.generate(1, 77), "\\boxed{1}")
    assert random.getstate() == state
    assert (np.random.get_state()[1] == np_state).all()
    import sys
    assert "Gym" not in sys.modules   # the package is only imported in workers


def test_runaway_generator_is_killed():
    pool = rlve.WorkerPool("openzaya.envs.rlve", workers=1)
    try:
        pool.call("names", timeout_s=60)   # warm: the start-up allowance is not part of this test
        t = time.monotonic()
        with pytest.raises(TimeoutError):
            pool.call("generate", "Sorting", 200, 0, timeout_s=1.0)   # level 200: a huge sort, runs far past 1 s
        assert time.monotonic() - t < 5 and pool.kills == 1
        assert pool.call("generate", "Sorting", 0, 0, timeout_s=30)["answer"]   # a fresh worker takes over
    finally:
        pool.close()
