"""openzaya.verify: math-verify equivalences, negatives, a 10,000-string fuzz in bounded time, and hard timeouts.

Run: .venv/bin/python -m pytest tests/test_verify.py
"""

import random
import time

from openzaya.envs.base import Problem
from openzaya.verify import check_many, check_math, fast_check, get_pool, math_score

POSITIVES = [
    ("0.5", "\\frac{1}{2}"),
    ("\\frac{1}{2}", "0.5"),
    ("\\frac12", "\\dfrac{1}{2}"),
    ("\\dfrac{3}{4}", "3/4"),
    ("5", "5 \\text{ cm}"),
    ("5 \\text{ cm}", "5"),
    ("(1,2)", "(1, 2)"),
    ("[1,2)", "[1, 2)"),
    ("\\{1,2\\}", "\\{2,1\\}"),
    ("2, 3", "3, 2"),
    ("1000", "1,000"),
    ("1,000,000", "1000000"),
    ("73", "**73**"),
    ("73", "$73$"),
    ("-3", "-3.0"),
    ("x^2+2x+1", "(x+1)^2"),
    ("\\sqrt{2}/2", "\\frac{\\sqrt2}{2}"),
    ("90^\\circ", "90"),
    ("x=2", "2"),
]

NEGATIVES = [
    ("3", "4"),
    ("(1,2)", "[1,2]"),
    ("(1,2)", "(1,2]"),
    ("2,3", "2"),
    ("2", "2, 3"),
    ("\\pi", "3.14159"),
    ("1/3", "0.333"),
    ("1000", "100"),
    ("73", "**74**"),
    ("x^2", "2x"),
    ("\\frac{1}{2}", "\\frac{1}{3}"),
    ("5", ""),
    ("5", "}}}{{{"),
]


def test_positives():
    verdicts = check_many(POSITIVES)
    bad = [(p, v) for p, v in zip(POSITIVES, verdicts) if not v.correct]
    assert not bad, bad


def test_negatives():
    verdicts = check_many(NEGATIVES)
    bad = [(p, v) for p, v in zip(NEGATIVES, verdicts) if v.correct]
    assert not bad, bad
    assert all(v.reason for v in verdicts)


def test_fast_path():
    assert fast_check("1,000", "1000").correct
    assert fast_check("73", "**73**").correct
    assert not fast_check("12", "13").correct
    assert fast_check("1/2", "0.5") is None   # left to math-verify


def test_math_score_as_env_score_fn():
    p = Problem(env="t", prompt="?", answer="\\frac{1}{2}", difficulty=0, seed=0)
    s = math_score(p, "<think>maybe 1/3</think> so \\boxed{0.5}")
    assert s.accuracy == 1.0 and s.reward == 1.0 and s.format_ok
    s = math_score(p, "I don't know")
    assert s.accuracy == 0.0 and not s.format_ok
    assert math_score(p, "").format_ok is False
    assert math_score(p, "<answer>0.6</answer>").accuracy == 0.0


def test_hanging_check_times_out():
    pool = get_pool()
    check_math("1/2", "0.5")   # warm the pool so start-up is not charged to the deadline
    before = pool.restarts
    t = time.monotonic()
    v = check_math("(10^{100000})!", "1", timeout_s=2.0)
    assert not v.correct and "timeout" in v.reason
    assert time.monotonic() - t < 5
    assert pool.restarts == before + 1
    assert check_math("\\frac{2}{4}", "0.5").correct   # the replacement worker serves the next call


def _random_string(rng: random.Random) -> str:
    alphabet = "0123456789+-*/^()[]{}\\,.=<>xyz abcfrac sqrt pi e$%!"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))


def _adversarial(rng: random.Random) -> str:
    kind = rng.randrange(7)
    n = rng.randint(50, 400)
    if kind == 0:
        return "(" * n + "1" + ")" * n                          # deep nesting
    if kind == 1:
        return "^".join(["9"] * rng.randint(3, 8))              # 9^9^9^9...
    if kind == 2:
        return "x" * rng.randint(2001, 50_000)                   # very long (refused before parsing)
    if kind == 3:
        return "\\frac{" * n + "1"                               # unbalanced braces
    if kind == 4:
        return "}" * n + "{" * n
    if kind == 5:
        return "\\sqrt{" * n + "2" + "}" * n
    return "1" + "0" * rng.randint(100, 1500)                    # huge integer


def test_fuzz_10000_strings_in_bounded_time():
    rng = random.Random(0)
    golds = ["1", "\\frac{1}{2}", "x^2+1", "(1,2)", "\\{1,2\\}", "42"]
    preds = [_random_string(rng) for _ in range(9_800)] + [_adversarial(rng) for _ in range(200)]
    pairs = [(rng.choice(golds), p) for p in preds]
    t = time.monotonic()
    verdicts = check_many(pairs, timeout_s=2.0)
    elapsed = time.monotonic() - t
    assert len(verdicts) == len(pairs)
    assert all(isinstance(v.correct, bool) for v in verdicts)
    assert elapsed < 150, f"fuzz took {elapsed:.1f}s"
