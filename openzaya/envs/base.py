"""The environment contract shared by every environment family (spec: environments.md, RLVE contract).

An environment generates a problem for a (difficulty, seed) pair, deterministically and without touching any
global RNG, and scores a model response against it. Answers are taken from the response after any `</think>`:
the last `\\boxed{...}` (nested braces handled), else the last `<answer>...</answer>`. A response without an
answer scores `format_ok=False`; scoring never raises on model output. Extraction reads at most the last
`MAX_RESPONSE_CHARS` characters after `</think>`, in one linear pass (a response of a thousand unclosed
`\\boxed{` is no slower than any other).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

MAX_RESPONSE_CHARS = 1 << 18   # of the text after </think>: a final answer sits in its last 256K characters

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


_BOX_OR_BRACE = re.compile(r"\\(?:boxed|fbox)\s*\{|[{}]")


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} or \\fbox{...}, with nested braces; None if there is none.

    One pass over the braces with a stack: a box's content ends at the brace that closes its own `{` (as counting
    depth from its start would find), and the box that opens last among those that close wins.
    """
    stack: list[int] = []   # content start of an open box, or -1 for a plain brace
    best = None
    for m in _BOX_OR_BRACE.finditer(text):
        tok = m.group()
        if tok == "}":
            if stack:
                start = stack.pop()
                if start >= 0 and (best is None or start > best[0]):
                    best = (start, m.start())
        else:
            stack.append(m.end() if tok != "{" else -1)
    return None if best is None else text[best[0]:best[1]].strip()


def extract_answer(response: str) -> str | None:
    """Last \\boxed{} after any </think>, else the last <answer>...</answer>; None when neither exists."""
    tail = strip_thinking(response)[-MAX_RESPONSE_CHARS:]
    boxed = last_boxed(tail)
    if boxed is not None:
        return boxed
    end = tail.rfind("</answer>")
    start = tail.rfind("<answer>", 0, end) if end >= 0 else -1
    return tail[start + len("<answer>"):end].strip() if start >= 0 else None


def normalize(ans: str) -> str:
    """Light normalisation for exact-match answers: strip spaces, surrounding $ and bold, trailing period."""
    a = ans.strip().strip("$").strip()
    a = re.sub(r"^\*\*(.*)\*\*$", r"\1", a)
    a = re.sub(r"\\text\{([^{}]*)\}", r"\1", a)   # [^{}]: each try stops at the next brace (linear)
    a = a.rstrip(".").strip()
    return re.sub(r"\s+", " ", a).lower()


def exact_match_score(problem: Problem, response: str) -> Score:
    pred = extract_answer(response)
    if pred is None:
        return Score(0.0, 0.0, False, "no answer found")
    ok = normalize(pred) == normalize(problem.answer)
    return Score(float(ok), float(ok), True, "" if ok else f"expected {problem.answer!r}, got {pred!r}")
