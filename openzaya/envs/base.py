"""The environment contract shared by every environment family (spec: environments.md, RLVE contract).

An environment generates a problem for a (difficulty, seed) pair, deterministically and without touching any
global RNG, and scores a model response against it. Answers are taken from the response after any `</think>`:
the last `\\boxed{...}` (nested braces handled), else the last `<answer>...</answer>`. A response without an
answer scores `format_ok=False`; scoring never raises on model output.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Problem:
    env: str                  # environment name
    prompt: str               # the user-facing question (asks for a \boxed{} or <answer> final answer)
    answer: str               # reference answer (string form)
    difficulty: int
    seed: int
    metadata: dict = field(default_factory=dict)
    solution: str | None = None   # step-by-step reasoning trace ending in the answer (our own envs)


@dataclass
class Score:
    reward: float             # in [0, 1] (graded environments may give partial credit)
    accuracy: float           # binary: 1.0 if correct else 0.0
    format_ok: bool           # an answer could be extracted
    reason: str = ""


@dataclass
class Env:
    """An environment: `generate(difficulty, seed) -> Problem` and `score(problem, response) -> Score`."""
    name: str
    tags: tuple[str, ...]
    min_difficulty: int
    max_difficulty: int
    generate_fn: Callable[[int, int], Problem]
    score_fn: Callable[[Problem, str], Score] | None = None   # default: exact match of the extracted answer
    source: str = "openzaya"   # openzaya | reasoning_gym | rlve | code | ifeval

    def generate(self, difficulty: int, seed: int) -> Problem:
        if not self.min_difficulty <= difficulty <= self.max_difficulty:
            raise ValueError(f"{self.name}: difficulty {difficulty} outside "
                             f"[{self.min_difficulty}, {self.max_difficulty}]")
        return self.generate_fn(difficulty, seed)

    def score(self, problem: Problem, response: str) -> Score:
        if self.score_fn is not None:
            return self.score_fn(problem, response)
        return exact_match_score(problem, response)


def strip_thinking(response: str) -> str:
    """The part of a response after the last `</think>` (the whole response if there is none)."""
    i = response.rfind("</think>")
    return response if i < 0 else response[i + len("</think>"):]


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} or \\fbox{...}, with nested braces; None if there is none."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    for start in reversed(starts):
        depth, i = 1, start
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[start:i - 1].strip()
    return None


def extract_answer(response: str) -> str | None:
    """Last \\boxed{} after any </think>, else the last <answer>...</answer>; None when neither exists."""
    tail = strip_thinking(response)
    boxed = last_boxed(tail)
    if boxed is not None:
        return boxed
    answers = re.findall(r"<answer>(.*?)</answer>", tail, flags=re.DOTALL)
    return answers[-1].strip() if answers else None


def normalize(ans: str) -> str:
    """Light normalisation for exact-match answers: strip spaces, surrounding $ and bold, trailing period."""
    a = ans.strip().strip("$").strip()
    a = re.sub(r"^\*\*(.*)\*\*$", r"\1", a)
    a = re.sub(r"\\text\{(.*?)\}", r"\1", a)
    a = a.rstrip(".").strip()
    return re.sub(r"\s+", " ", a).lower()


def exact_match_score(problem: Problem, response: str) -> Score:
    pred = extract_answer(response)
    if pred is None:
        return Score(0.0, 0.0, False, "no answer found")
    ok = normalize(pred) == normalize(problem.answer)
    return Score(float(ok), float(ok), True, "" if ok else f"expected {problem.answer!r}, got {pred!r}")
