"""reasoning-gym adapter (PyPI `reasoning-gym`; spec: environments.md §6).

Every registered dataset becomes `rg/<name>`. Difficulty d = the dataset's curriculum with `set_global_level(d)`
(each attribute clamped to its own last level), so d runs over 0..(longest attribute's level count - 1); datasets
without a curriculum have the single level 0. When a level's configuration fails validation (a few curricula have
inconsistent levels), the nearest valid level is used. The problem for (d, seed) is item 0 of a size-1 dataset
built with that seed; reasoning-gym uses local RNGs, and we restore the global ones anyway (one task touches them).

Generation and scoring run in `WorkerPool` processes (shared code in openzaya.envs.rlve) with hard timeouts, since
a few generators run for tens of seconds or do not finish at high levels (jugs, zebra_puzzles, n_queens).

Score: the dataset's own `score_answer(extracted_answer, entry)` in [0, 1] is the reward; accuracy = reward >= 1.0
(reasoning-gym gives partial credit for near misses, e.g. an answer containing the oracle; we count only full
marks as correct, which matches binary rewards); format_ok = an answer could be extracted.
Excluded: `composite` (a mixer, not a task) and tasks whose items carry no reference answer (certificate-only:
any valid solution passes, so `openzaya envs check` cannot score a reference): see NO_REFERENCE.
"""

from __future__ import annotations

import random

from openzaya.envs.base import Env, Problem, Score, extract_answer
from openzaya.envs.rlve import WorkerPool, serve, shared_pool

GEN_TIMEOUT_S = 30.0
SCORE_TIMEOUT_S = 10.0
INSTRUCTION = "Put your final answer in \\boxed{} (or between <answer> and </answer>)."
# found by `openzaya envs check`: generation at higher levels exceeds the timeout; sokoban's search is slow on
# some seeds even at level 0
MAX_LEVEL_OVERRIDES = {"jugs": 2, "zebra_puzzles": 4}
GEN_TIMEOUT_OVERRIDES = {"sokoban": 120.0, "zebra_puzzles": 60.0}
NO_REFERENCE = frozenset({"composite", "boxnet", "graph_color", "propositional_logic", "rubiks_cube", "rush_hour"})
# datasets whose own score_answer is wrong, rescored here. game_of_life_halting (reasoning-gym 0.1.25) compares
# bool(answer) with bool(entry["answer"]), both non-empty strings, so every answer scored 1: its answer is "True" or
# "False", compared case-insensitively (tests/test_envs_wrong_answers.py).
RESCORE = {"game_of_life_halting": lambda answer, entry: float(answer.strip().lower() == entry["answer"].lower())}


# ---------------------------------------------------------------------------------------------------------------
# worker side

_datasets: dict = {}


def _w_levels() -> dict[str, int]:
    from reasoning_gym.factory import CURRICULA, DATASETS
    out = {}
    for name in DATASETS:
        cur = CURRICULA[name]() if name in CURRICULA else None
        out[name] = max((len(a.levels) for a in cur.attributes.values()), default=1) if cur else 1
    return out


def _config(name: str, level: int, seed: int):
    from reasoning_gym.factory import CURRICULA, DATASETS
    config_cls = DATASETS[name][1]
    if name not in CURRICULA:
        return config_cls(seed=seed, size=1)
    n = _w_levels_cache().get(name, 1)
    for lvl in sorted(range(n), key=lambda x: (abs(x - level), -x)):   # nearest valid level, prefer harder
        cur = CURRICULA[name]()
        cur.set_global_level(lvl)
        try:
            cfg = cur.generate_configuration({"seed": seed, "size": 1})
            if hasattr(cfg, "validate"):
                cfg.validate()
            return cfg
        except (AssertionError, ValueError, TypeError):
            continue
    return config_cls(seed=seed, size=1)


_levels: dict | None = None


def _w_levels_cache() -> dict:
    global _levels
    if _levels is None:
        _levels = _w_levels()
    return _levels


def _dataset(name: str, level: int, seed: int):
    key = (name, level, seed)
    if key not in _datasets:
        from reasoning_gym.factory import DATASETS
        if len(_datasets) > 256:
            _datasets.clear()
        _datasets[key] = DATASETS[name][0](config=_config(name, level, seed))
    return _datasets[key]


def _w_generate(name: str, level: int, seed: int) -> dict:
    import numpy as np
    state, np_state = random.getstate(), np.random.get_state()
    try:
        entry = _dataset(name, level, seed)[0]
    finally:
        random.setstate(state)
        np.random.set_state(np_state)
    ans = entry["answer"]
    return {"question": entry["question"], "answer": None if ans is None else str(ans), "entry": entry}


def _w_score(name: str, level: int, seed: int, entry: dict, answer: str) -> float:
    if name in RESCORE:
        return RESCORE[name](answer, entry)
    return float(_dataset(name, level, seed).score_answer(answer, entry))


def _serve() -> None:
    serve({"levels": _w_levels_cache, "generate": _w_generate, "score": _w_score})


# ---------------------------------------------------------------------------------------------------------------
# parent side

def pool() -> WorkerPool:
    return shared_pool("openzaya.envs.rgym")


def _make_env(name: str, levels: int) -> Env:
    env_name = f"rg/{name}"

    def generate(difficulty: int, seed: int) -> Problem:
        out = pool().call("generate", name, difficulty, seed,
                          timeout_s=GEN_TIMEOUT_OVERRIDES.get(name, GEN_TIMEOUT_S))
        if out["answer"] is None:
            raise RuntimeError(f"{env_name}: no reference answer")
        return Problem(env=env_name, prompt=out["question"].rstrip() + "\n\n" + INSTRUCTION, answer=out["answer"],
                       difficulty=difficulty, seed=seed, metadata={"entry": out["entry"]})

    def score(problem: Problem, response: str) -> Score:
        pred = extract_answer(response)
        if pred is None:
            return Score(0.0, 0.0, False, "no answer found")
        try:
            r = pool().call("score", name, problem.difficulty, problem.seed, problem.metadata["entry"], pred,
                            timeout_s=SCORE_TIMEOUT_S)
        except (TimeoutError, RuntimeError) as e:
            return Score(0.0, 0.0, True, f"scorer failed: {e}")
        r = min(1.0, max(0.0, r))
        return Score(r, float(r >= 1.0), True, f"reasoning-gym score {r:.3f}")

    return Env(name=env_name, tags=("reasoning_gym",), min_difficulty=0,
               max_difficulty=min(levels - 1, MAX_LEVEL_OVERRIDES.get(name, levels)),
               generate_fn=generate, score_fn=score, source="reasoning_gym")


def load_rgym() -> dict[str, Env]:
    """Every reasoning-gym task with a reference answer, as `rg/<name>`."""
    import importlib.util
    if importlib.util.find_spec("reasoning_gym") is None:
        return {}
    levels = pool().call("levels", timeout_s=60.0)
    return {f"rg/{n}": _make_env(n, k) for n, k in sorted(levels.items()) if n not in NO_REFERENCE}
