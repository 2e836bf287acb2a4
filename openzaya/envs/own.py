"""Shared plumbing for our own procedural environments (arithmetic, number theory, combinatorics, probability,
logic, algorithms, strings): `make_env` and the scoring helpers. The registry imports the family modules
(`registry.own_envs`); this module imports none of them.

Each family module writes small builders `build(rng, difficulty) -> (question, answer, steps)` and wraps them
with `make_env`. Follows the RLVE contract (spec environments.md §2): a (difficulty, seed) pair fully determines
the problem. Simplified: difficulty is an integer level 0..9 mapped by each builder to sizes directly (RLVE uses
parameter controllers), rewards are binary, and the RNG is a local `random.Random` seeded from
"name:difficulty:seed", never the global one.

Every solution is a formulaic trace "Step 1: ... Step k: ..." that ends with "So the answer is \\boxed{ANSWER}.",
so a solution is itself a response that scores 1 (useful as SFT data and as a self-check).
"""

from __future__ import annotations

import random
import re
from fractions import Fraction
from typing import Callable

from openzaya.envs.base import Env, Problem, Score, extract_answer, normalize

ANSWER_INSTRUCTION = "Put your final answer in \\boxed{}."


def rng_for(name: str, difficulty: int, seed: int) -> random.Random:
    """A local RNG determined by (name, difficulty, seed); string seeds hash identically across processes."""
    return random.Random(f"{name}:{difficulty}:{seed}")


def make_env(name: str, tags: tuple[str, ...], build: Callable, fmt: str = "",
             score_fn: Callable[[Problem, str], Score] | None = None) -> Env:
    """Wrap `build(rng, difficulty) -> (question, answer, steps[, metadata])` into an `Env`.

    `fmt` describes the exact answer format (e.g. "a comma-separated list like 1,2,3"); it is appended to the prompt.
    """
    def generate(difficulty: int, seed: int) -> Problem:
        out = build(rng_for(name, difficulty, seed), difficulty)
        question, answer, steps = out[:3]
        metadata = out[3] if len(out) > 3 else {}
        answer = str(answer)
        prompt = question.strip() + "\n\n" + (f"Answer format: {fmt}. " if fmt else "") + ANSWER_INSTRUCTION
        lines = [f"Step {i + 1}: {s}" for i, s in enumerate(steps)]
        solution = "\n".join(lines + [f"So the answer is \\boxed{{{answer}}}."])
        return Problem(env=name, prompt=prompt, answer=answer, difficulty=difficulty, seed=seed,
                       metadata=dict(metadata), solution=solution)
    return Env(name=name, tags=tuple(tags), min_difficulty=0, max_difficulty=9,
               generate_fn=generate, score_fn=score_fn, source="openzaya")


# -----------------------------------------------------------------------------
# scoring helpers (local on purpose: no dependency on openzaya.verify)


def _score(ok: bool, problem: Problem, pred: str) -> Score:
    return Score(float(ok), float(ok), True, "" if ok else f"expected {problem.answer!r}, got {pred!r}")


def parse_number(text: str) -> Fraction | None:
    """An exact number from '3', '-3/6', '0.25', '\\frac{1}{2}', '\\dfrac{-1}{2}', '-\\frac12'-free forms; else None."""
    t = normalize(text).replace(" ", "").replace("{,}", "").replace(",", "")
    m = re.fullmatch(r"(-?)\\[dt]?frac\{(-?\d+)\}\{(-?\d+)\}", t)
    if m:
        t = f"{m.group(1)}{m.group(2)}/{m.group(3)}"
        t = t.replace("--", "")
    m = re.fullmatch(r"\(?(-?\d+(?:\.\d+)?)\)?/\(?(-?\d+(?:\.\d+)?)\)?", t)
    try:
        if m:
            den = Fraction(m.group(2))
            return None if den == 0 else Fraction(m.group(1)) / den
        if re.fullmatch(r"-?\d+(?:\.\d+)?", t):
            return Fraction(t)
    except (ValueError, ZeroDivisionError):
        return None
    return None


def fraction_score(problem: Problem, response: str) -> Score:
    """Exact numeric equality: '1/2', '2/4', '0.5' and '\\frac{1}{2}' all match a reference of '1/2'."""
    pred = extract_answer(response)
    if pred is None:
        return Score(0.0, 0.0, False, "no answer found")
    a, b = parse_number(pred), parse_number(problem.answer)
    return _score(a is not None and a == b, problem, pred)


def compact_score(problem: Problem, response: str) -> Score:
    """Exact match ignoring all whitespace and case (lists like '1, 2, 3' == '1,2,3')."""
    pred = extract_answer(response)
    if pred is None:
        return Score(0.0, 0.0, False, "no answer found")
    squash = lambda s: normalize(s).replace(" ", "")
    return _score(squash(pred) == squash(problem.answer), problem, pred)


def fraction_str(x: Fraction) -> str:
    """Canonical form: an integer, or 'p/q' in lowest terms."""
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"
