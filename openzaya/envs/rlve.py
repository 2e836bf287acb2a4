"""RLVE-Gym adapter (PyPI `rlve-gym`, top-level package `Gym`; spec: environments.md §2, §5).

The package reseeds the global `random`/`numpy`/`torch` RNGs on every generation, runs generation in a thread it
cannot stop, declares no dependencies (it needs numpy, networkx, sympy; torch only for seeding), so every call goes
to a small pool of worker processes (`WorkerPool`) with a hard wall-clock timeout: a worker that misses it is
killed and replaced. Inside a worker we stub `torch` (seeding only) and call `_generate()` on the main thread
with exactly the seeding RLVE's `generator()` does, minus the thread.

Mapping onto our contract:
- difficulty d = the environment's ParameterController after d `update()` calls (RLVE's own definition); when a
  level offers several parameter dicts, the seed picks one. Levels 0..MAX_LEVEL (RLVE has no top level; a few
  environments stop lower, where generation outgrows the timeout).
- Problem.answer = the environment's `reference_answer`; Problem.metadata["config"] = RLVE's get_config() (seed,
  parameter, passing threshold) so scoring can rebuild the environment in any worker.
- Score: our extracted answer (last \\boxed{} or <answer>) is wrapped in RLVE's <answer> markers and passed to its
  verifier. reward = max(0, RLVE reward) (RLVE's graded reward in [-1, 1]: -1 wrong format, -0.5 invalid, [0, 1]
  graded quality; we keep the graded part and floor the penalties at 0), accuracy = RLVE's binary accuracy (reward
  >= the environment's passing threshold), format_ok = an answer was extracted and RLVE's format_score is 1.
- Included: environments whose reference answer verifies (`openzaya envs check`). Excluded, see EXCLUDED: 66
  environments that keep no reference answer string (the model must produce a certificate, e.g. a knapsack
  selection, and the package only stores the optimal value) and PolyaModel (its reference does not verify).
"""

from __future__ import annotations

import os
import pickle
import random
import struct
import subprocess
import sys
import threading
import time
from multiprocessing.connection import wait

from openzaya.envs.base import Env, Problem, Score, extract_answer

MAX_LEVEL = 10
# generation at level 10 exceeds GEN_TIMEOUT_S for these (found by `openzaya envs check`); level 5 passes
MAX_LEVEL_OVERRIDES = {"CardColoringCounting": 5, "GridLocalMinimumCounting": 5, "MaximumAchromaticNumber": 5}
GEN_TIMEOUT_S = 20.0
SCORE_TIMEOUT_S = 10.0
INSTRUCTION = "Put your final answer in \\boxed{} (or between <answer> and </answer>)."


# ---------------------------------------------------------------------------------------------------------------
# a persistent pool of killable worker processes (also used by openzaya.envs.rgym)


class WorkerPool:
    """Workers run `python -c "import <module>; <module>._serve()"` and answer pickled (fn, args) requests.

    `call(fn, *args, timeout_s=...)` returns the result, or raises TimeoutError (the worker was killed and is
    replaced) or RuntimeError (the call raised in the worker, or the worker died). Thread-safe.
    """

    def __init__(self, module: str, workers: int = 2):
        self.module = module
        self.n = workers
        self.idle: list[subprocess.Popen] = []
        self.count = 0
        self.cond = threading.Condition()
        self.kills = 0

    def _start(self) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", f"import {self.module} as m; m._serve()"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                start_new_session=True)

    def _acquire(self) -> subprocess.Popen:
        with self.cond:
            while not self.idle and self.count >= self.n:
                self.cond.wait()
            if self.idle:
                return self.idle.pop()
            self.count += 1
        return self._start()

    def _release(self, proc: subprocess.Popen | None) -> None:
        with self.cond:
            if proc is None:
                self.count -= 1
            else:
                self.idle.append(proc)
            self.cond.notify()

    def call(self, fn: str, *args, timeout_s: float = 10.0, startup_s: float = 60.0):
        proc = self._acquire()
        try:
            payload = pickle.dumps((fn, args))
            proc.stdin.write(struct.pack("<Q", len(payload)) + payload)
            proc.stdin.flush()
            # a fresh worker first imports the library: allow it start-up time on top of the call's own limit
            deadline = time.monotonic() + timeout_s + (startup_s if not getattr(proc, "warm", False) else 0)
            if not wait([proc.stdout], timeout=max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"{fn} exceeded {timeout_s:g}s")
            head = proc.stdout.read(8)
            if len(head) < 8:
                raise RuntimeError("worker died")
            ok, value = pickle.loads(proc.stdout.read(struct.unpack("<Q", head)[0]))
            proc.warm = True
        except BaseException:
            self.kills += 1
            proc.kill()
            proc.wait()
            self._release(None)
            raise
        self._release(proc)
        if not ok:
            raise RuntimeError(value)
        return value

    def close(self) -> None:
        with self.cond:
            for p in self.idle:
                p.kill()
                p.wait()
            self.count -= len(self.idle)
            self.idle.clear()


def serve(functions: dict) -> None:
    """Worker loop: read (fn, args), reply (True, result) or (False, 'Error: message'). Never returns normally."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)   # library prints must not corrupt the protocol
    inp = sys.stdin.buffer
    while True:
        head = inp.read(8)
        if len(head) < 8:
            return
        fn, args = pickle.loads(inp.read(struct.unpack("<Q", head)[0]))
        try:
            reply = (True, functions[fn](*args))
        except Exception as e:   # noqa: BLE001  library errors are data for the caller
            reply = (False, f"{type(e).__name__}: {str(e)[:300]}")
        data = pickle.dumps(reply)
        out.write(struct.pack("<Q", len(data)) + data)
        out.flush()


# ---------------------------------------------------------------------------------------------------------------
# worker side


EXCLUDED = {"PolyaModel"}   # plus every environment without a string reference answer (found at load time)


def _import_gym():
    import types
    if "torch" not in sys.modules:   # Gym imports torch only to seed it: a stub saves seconds and memory per worker
        stub = types.ModuleType("torch")
        stub.manual_seed = lambda seed: None
        stub.cuda = types.SimpleNamespace(manual_seed_all=lambda seed: None)
        stub.backends = types.SimpleNamespace(cudnn=types.SimpleNamespace())
        sys.modules["torch"] = stub
    import Gym.environments
    import Gym.parameter_controllers
    return Gym.environments.identifier2environment, Gym.parameter_controllers.identifier2controller


def _w_names() -> list[str]:
    envs, ctrls = _import_gym()
    return sorted(n for n in envs if n in ctrls)


def _w_generate(name: str, difficulty: int, seed: int) -> dict:
    import copy
    import numpy as np
    envs, ctrls = _import_gym()
    ctrl = ctrls[name]()
    for _ in range(difficulty):
        ctrl.update()
    params = ctrl.get_parameter_list()
    param = params[random.Random(f"{name}:{difficulty}:{seed}").randrange(len(params))]
    env = envs[name]()
    env.seed, env.parameter = seed, copy.deepcopy(param)
    random.seed(seed)      # what RLVE's generator() seeds (torch is stubbed)
    np.random.seed(seed)
    env._generate()
    assert env.parameter is not None, "generation failed"
    ref = env.parameter.get("reference_answer")
    return {"prompt": env.prompt_generator(), "answer": None if ref is None else str(ref),
            "config": env.get_config()}


def _w_score(name: str, config: dict, answer: str) -> dict:
    envs, _ = _import_gym()
    env = envs[name]()
    env.set_config(config)
    return env.verifier(f"<answer>{answer}</answer>")


def _serve() -> None:
    serve({"names": _w_names, "generate": _w_generate, "score": _w_score})


# ---------------------------------------------------------------------------------------------------------------
# parent side


_POOLS: dict[str, WorkerPool] = {}


def shared_pool(module: str) -> WorkerPool:
    """The process-wide pool of workers serving `module` (made on first use, up to 4 workers); rgym uses it too."""
    if module not in _POOLS:
        _POOLS[module] = WorkerPool(module, workers=max(1, min(4, os.cpu_count() or 1)))
    return _POOLS[module]


def pool() -> WorkerPool:
    return shared_pool("openzaya.envs.rlve")


def _make_env(name: str) -> Env:
    env_name = f"rlve/{name}"

    def generate(difficulty: int, seed: int) -> Problem:
        out = pool().call("generate", name, difficulty, seed, timeout_s=GEN_TIMEOUT_S)
        if out["answer"] is None:
            raise RuntimeError(f"{env_name}: no reference answer")
        return Problem(env=env_name, prompt=out["prompt"].rstrip() + "\n\n" + INSTRUCTION, answer=out["answer"],
                       difficulty=difficulty, seed=seed, metadata={"config": out["config"]})

    def score(problem: Problem, response: str) -> Score:
        pred = extract_answer(response)
        if pred is None:
            return Score(0.0, 0.0, False, "no answer found")
        try:
            v = pool().call("score", name, problem.metadata["config"], pred, timeout_s=SCORE_TIMEOUT_S)
        except (TimeoutError, RuntimeError) as e:
            return Score(0.0, 0.0, True, f"scorer failed: {e}")
        return Score(max(0.0, float(v["reward"])), float(v["accuracy"]), bool(v["format_score"]),
                     f"rlve reward {v['reward']:.3f}")

    return Env(name=env_name, tags=("rlve",), min_difficulty=0, max_difficulty=MAX_LEVEL_OVERRIDES.get(name, MAX_LEVEL),
               generate_fn=generate,
               score_fn=score, source="rlve")


# Environments whose problems carry no reference answer string (found by generating each at levels 0-2).
NO_REFERENCE = frozenset("""
Axis_KCenter BEZMinimalistSecurity CirculatingGrid CleaningUp ConstructHackInterval Cornfield CountdownClose
CountdownEqual Disinfection DynDynamite GasFireExtinguishers Knapsack LandAcquisition LargestConvexPolygon
LargestRectangle_AmongPoints LIS_LDS_Concatenation LongestMaxDiffBoundedInterval LongestPath
Longest_DoublePalindrome Longest_MatchingSubsequence Longest_RepeatedPalindrome MafMafia MakingGrade
MaximumIndependentSetGrid MaximumPointSegmentMatching MaxMinimum_AfterIntervalAddition MaxMultSplit
MaxNoConflictingBombs MaxSegmentCoverageConstraint MaxSumLDS MaxWeightPalindromicSubstring MaxXorSet
Max_NonAdjacent_KElementSum Max_TreeConstrainedPermutation_Weight MinConversionToCycleCost MinCostTreeCoverage
MinCubeAssignment MinDivisionSumXor MinimumIntervalCoverage MinimumRatioPath MinimumSteinerTree
MinimumSumDifferenceSubmatrix MinimumTreeWeightedDominatingAncestor MinimumUnconflictedGridKMax
MinimumWeightedSpanningTree Minimum_CrossingEdges_GraphPartition Minimum_DominatingSet_Grid
MinPairSumMultiplicationPermutation MinPathCover_DAG MinSumPreXor MinSwapTwoPermutations NewNimGame
PalembangBridges PanSolarPanels ProtectingFlowers QuadraticFunctionSegmentation ShortestPathCountConstruction
ShortestUnicolorSubstring SLOElephants StuntFlying TreeAddOneEdgeDiameter TreeMaximumVisitedVertex
ValueDiminishingSelection WarehouseConstruction WeightedLIS WIL
""".split())


def all_names() -> list[str]:
    """Every environment RLVE-Gym registers (asked of a worker, so the parent never imports Gym)."""
    return pool().call("names", timeout_s=30.0)


def load_rlve() -> dict[str, Env]:
    """The RLVE-Gym environments with a verifiable reference answer, as `rlve/<Identifier>`."""
    try:
        import importlib.util
        if importlib.util.find_spec("Gym") is None:
            return {}
    except ValueError:
        return {}
    names = [n for n in all_names() if n not in EXCLUDED and n not in NO_REFERENCE]
    return {f"rlve/{n}": _make_env(n) for n in names}
