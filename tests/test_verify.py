"""openzaya.verify: math-verify equivalences, negatives, a 10,000-string fuzz in bounded time, hard timeouts, and the
hardening of issue 22 (no exception on any string, linear extraction, workers die with their parent, no false
"equal" from spaces, power chains, trailing words or unbalanced brackets; the percent rule).

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


# ---------------------------------------------------------------------------------------------------------------
# hardening (issue 22): never raise, linear extraction, workers die with their parent, no false "equal"

BIG = "1" + "0" * 5000   # beyond Python's int-to-str digit limit (4300)


def test_huge_integers_give_verdicts_not_exceptions():
    from openzaya.evaluate import math_scorer
    assert check_math(BIG, BIG).correct
    assert not check_math("5", BIG).correct and not check_math(BIG, "5").correct
    assert not check_math(BIG, BIG[:-1] + "1").correct
    assert check_math(BIG, "100" + ",000" * 1666).correct   # the same 5000 zeros, grouped by commas
    p = Problem(env="t", prompt="?", answer="5", difficulty=0, seed=0)
    assert math_score(p, "\\boxed{" + BIG + "}").accuracy == 0.0
    assert math_score(Problem(env="t", prompt="?", answer=BIG, difficulty=0, seed=0), f"\\boxed{{{BIG}}}").accuracy == 1
    assert math_scorer("5")("\\boxed{" + BIG + "}") == 0.0 and math_scorer(BIG)("\\boxed{" + BIG + "}") == 1.0
    assert math_score(p, None).format_ok is False


def test_extraction_is_linear():
    from openzaya.envs.base import extract_answer, normalize
    for text in ["\\boxed{" * 8000,                       # 56 KB: 30 s of CPU before
                 "\\boxed{" * 150_000,                     # 1 MB
                 "<answer>" * 130_000,
                 "{" * 500_000 + "\\boxed{7}",
                 "\\text{" * 100_000 + "</think>" * 1000]:
        t = time.process_time()
        extract_answer(text)
        normalize(text)
        assert time.process_time() - t < 0.5, len(text)
    assert extract_answer("x" * 2_000_000 + "\\boxed{42}") == "42"       # only the tail is read, the end included
    assert extract_answer("<answer>1</answer> <answer>2</answer>") == "2"
    assert extract_answer("\\boxed{a} \\boxed{b \\boxed{c} d} \\boxed{e") == "c"   # the last box that closes


def test_no_false_equal_from_the_fast_path():
    assert fast_check("12", "1 2") is None and fast_check("1000", "1 000") is None   # not plain integers any more
    cases = [("12", "1 2", False), ("1000", "1 000", False), ("512", "2^3^2", True), ("64", "2^3^2", False),
             ("7", "7 apples but also 8", False), ("5", "5 or 7", False), ("7", "7}", False), ("7", "{7", False),
             ("(1,2)", "(1,2", False), ("12", "12", True), ("1 2", "1 2", True), ("[1,2)", "[1, 2)", True),
             ("2^{3^2}", "512", True), ("-0", "0", True), ("007", "7", True)]
    verdicts = check_many([(g, p) for g, p, _ in cases])
    bad = [(c, v) for c, v in zip(cases, verdicts) if v.correct != c[2]]
    assert not bad, bad
    assert "unparsable" in verdicts[0].reason and "unparsable" in verdicts[4].reason


def test_percent_is_a_unit():
    """The rule: a trailing percent sign is dropped like a unit. 50% == 50 == 50\\%, and therefore 50% != 0.5."""
    equal = [("50", "50%"), ("50", "50\\%"), ("50\\%", "50"), ("25", "25 percent"), ("12.5\\%", "12.5%"),
             ("\\frac{25}{2}", "12.5\\%")]
    unequal = [("0.5", "50%"), ("50%", "0.5"), ("\\frac{1}{2}", "50\\%"), ("50", "5%")]
    assert all(v.correct for v in check_many(equal)), check_many(equal)
    assert not any(v.correct for v in check_many(unequal)), check_many(unequal)


def test_workers_die_with_their_parent():
    """A parent SIGKILLed while its worker grinds on a huge power takes the worker (and its watchdog) along."""
    import os
    import signal
    import subprocess
    import sys
    code = ("from openzaya.verify import MathPool\npool = MathPool(workers=1)\npool.check_many([('1', '1/1')])\n"
            "print(pool.workers[0].proc.pid, flush=True)\npool.check_many([('1', '9^{9^{9^{9}}}')], timeout_s=600)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    worker = int(parent.stdout.readline())
    time.sleep(0.5)   # busy on the power
    assert os.path.exists(f"/proc/{worker}")
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(worker):
        time.sleep(0.05)
    assert not _alive(worker), "the worker outlived its parent"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _hostile(rng: random.Random) -> str:
    pieces = ["\\boxed{", "}", "{", "<answer>", "</answer>", "</think>", "\\frac{", "^", "9", "1" * 5000, " ",
              "\ud800", "\x00", "%", "\\%", "١٢٣", "(", "]", "\\text{", "apples", ",000", "-", "e", "\\sqrt{",
              "$", "**", "\\left(", "\\infty", "x", ".", "\n"]
    return "".join(rng.choice(pieces) for _ in range(rng.randint(0, 400)))


def test_fuzz_hostile_strings_never_raise_in_bounded_time():
    from openzaya.envs.base import extract_answer, normalize
    from openzaya.evaluate import math_scorer
    rng = random.Random(22)
    texts = [_hostile(rng) for _ in range(300)] + ["\\boxed{" * 20_000, "9^" * 5000 + "9", "(" * 100_000, BIG * 30]
    golds = ["7", "\\frac{1}{2}", BIG, "50\\%", "2^3^2"]
    t = time.monotonic()
    for text in texts:
        t1 = time.process_time()
        extract_answer(text)
        normalize(text)
        assert time.process_time() - t1 < 0.5
    pairs = [(rng.choice(golds), text) for text in texts] + [(text, "7") for text in texts[:50]]
    verdicts = check_many(pairs, timeout_s=2.0)
    assert len(verdicts) == len(pairs) and all(isinstance(v.correct, bool) and v.reason for v in verdicts)
    scores = [math_score(Problem(env="t", prompt="?", answer=g, difficulty=0, seed=0), "\\boxed{" + x + "}")
              for g, x in pairs[:60]]
    assert all(s.accuracy in (0.0, 1.0) for s in scores)
    assert all(math_scorer(g)(x) in (0.0, 1.0) for g, x in pairs[:60])
    assert time.monotonic() - t < 120


# ---------------------------------------------------------------------------------------------------------------
# hand values of the parent-side preparation, and a pool of its own (issue 28: what the mutation run found untested;
# the shared pool of the other tests is started once, so its construction and start-up paths need pools of their own)

import os

import pytest

from openzaya import verify
from openzaya.verify import (MAX_INPUT_CHARS, MathPool, Verdict, _balanced, _clean, _drop_percent, _int_key,
                             _lifeline, _operand_end, _refuse, _right_assoc, _unparsable, prepare)


def test_clean_hand_values():
    cases = {"  $7$ ": "7", "$$7$$": "7", "**\n7\n**": "7", "\\boxed{7}": "7", "\\text{7}": "7", "\\mathrm{7}": "7",
             "\\textbf{7}": "7", "\\boxed{a\nb}": "ab", "\\boxed{**\\text{**7**}**}": "7",      # three layers
             "\\boxed{**\\text{**\\mathrm{**7**}**}**}": "**7**",                                  # a fourth stays
             "7.": "7", "7 .": "7", "50\\%": "50", "1  2": "1 2", "1\t 2 3": "1 2 3", "x + 1": "x+1",
             "\\boxed{\n1 2\n}": "1 2", "a\x00b": "a b", "(1, 2)": "(1,2)", "$X$": "X", "X.": "X", "0.5.": "0.5"}
    assert {a: _clean(a) for a in cases} == cases


def test_drop_percent_hand_values():
    for suffix in ("\\%", "%", "\\text{%}", "\\text{\\%}", "\\text{ percent}", "\\text{percent}", "percent"):
        assert _drop_percent("50 " + suffix + " ") == "50", suffix
    assert _drop_percent("50 ") == "50" and _drop_percent("5%%") == "5%" and _drop_percent("x") == "x"


def test_int_key_hand_values():
    cases = {"-0012": "-12", "+5": "5", "1,000": "1000", "-1,234,567": "-1234567", "-0": "0", "+0": "0", "000": "0",
             "0,000": "0", "12": "12", "1,00": None, "1234,567": None, "12a": None, "1.0": None, "": None, "--1": None}
    assert {a: _int_key(a) for a in cases} == cases


def test_fast_check_verdicts_and_reasons():
    assert fast_check(" 7 ", "$7$") == Verdict(True, "fast: equal strings")
    assert fast_check("1,000", "1000") == Verdict(True, "fast: integers")
    assert fast_check("12", "13") == Verdict(False, "fast: integers 12 != 13")
    assert fast_check("1" * 50, "2" * 50) == Verdict(False, "fast: integers " + "1" * 40 + " != " + "2" * 40)
    assert fast_check("", "") is None and fast_check("x", "y") is None and fast_check("7", "x") is None


def test_balanced_hand_values():
    cases = {"": True, "{}": True, "{": False, "}": False, ")(": False, "\\{1\\}": True, "\\{1}": False,
             "{1\\}": False, "[1,2)": True, "(1,2]": True, "(1,2": False, "1,2)": False, "{(a)}[b]": True,
             "{{a}": False, "((a))": True, "())(": False}
    assert {a: _balanced(a) for a in cases} == cases


def test_unparsable_reasons():
    cases = {"1 2": "unparsable: a space inside a number", "12": "", "7}": "unparsable: unbalanced brackets",
             "7 apples but also 8": "unparsable: words between numbers", "7 ab 8": "unparsable: words between numbers",
             "7 a 8": "", "7ab 8": "", "the answer is 7": "", "7 apples": "", "5 \\text{ cm} 6": "",
             "x^2 and 3": "", "2^10 is 1024": "unparsable: words between numbers", "sin 2 cos 3": "",
             "\\frac{1}{2} of 3": "unparsable: words between numbers", "1\t2": ""}
    assert {a: _unparsable(a) for a in cases} == cases


def test_right_assoc_and_operand_end_hand_values():
    cases = {"2^3^2": "2^{3^{2}}", "2 ^ 3 ^ 2": "2 ^{3^{2}}", "2^{3}^2": "2^{{3}^{2}}", "a^b^c^d": "a^{b^{c^{d}}}",
             "2^\\pi^2": "2^{\\pi^{2}}", "10^1.5^2": "10^{1.5^{2}}", "x^": "x^", "2^3": "2^3", "x^2+y^2": "x^2+y^2",
             "e^\\frac{1}{2}^3": "e^{\\frac{1}{2}^{3}}", "2^{1^{2}}": "2^{1^{2}}"}
    assert {a: _right_assoc(a) for a in cases} == cases
    ends = {("{ab}c", 0): 4, ("{a{b}}c", 0): 6, ("{ab", 0): 3, ("\\frac{1}{2}x", 0): 11, ("\\pi2", 0): 3,
            ("\\{x", 0): 3, ("\\;x", 0): 2, ("\\sin5", 0): 4, ("\\a1", 0): 2, ("\\", 0): 2, ("12.5x", 0): 4, ("12.x", 0): 2, ("ab", 0): 1, ("  7x", 0): 3,
            ("   ", 0): 3, ("", 0): 0, ("x^ {1}y", 2): 6}
    assert {k: _operand_end(*k) for k in ends} == ends


def test_refuse_limits():
    assert _refuse("x" * 2000) == "" and _refuse("x" * 2001) == "answer longer than 2000 chars"
    assert _refuse("(" * 24 + ")" * 24) == "" and _refuse("([{" * 8 + "(") == "nesting deeper than 24"
    assert _refuse(")" * 5 + "(" * 24) == ""                      # depth counts from where it is, not from zero
    assert _refuse("X" * 30) == "" and _refuse("(X" * 25) == "nesting deeper than 24"   # only brackets nest
    assert _refuse("^" * 12) == "" and _refuse("^" * 13) == "more than 12 powers"


def test_prepare_verdicts_and_the_pair_for_math_verify():
    none = ("", "")

    class Hostile(str):
        def strip(self, *args):
            raise TypeError("no")

    assert prepare(7, "7") == prepare("7", None) == (Verdict(False, "non-string answer"), none)
    long = "1" * (MAX_INPUT_CHARS + 1)
    assert prepare("1", long) == prepare(long, "1") == (Verdict(False, "answer longer than 100000 chars"), none)
    assert prepare("1" * MAX_INPUT_CHARS, "1" * MAX_INPUT_CHARS) == (Verdict(True, "fast: equal strings"), none)
    assert prepare("1/2", "x" * 2001) == prepare("x" * 2001, "1/2") == \
        (Verdict(False, "answer longer than 2000 chars"), none)
    assert prepare("1/2", "1 2x") == (Verdict(False, "unparsable: a space inside a number"), none)
    assert prepare("7 apples but also 8", "1/2") == (None, ("7 apples but also 8", "1/2"))   # gold is trusted
    assert prepare("2^3^2.", " 50% ") == (None, ("2^{3^{2}}", "50"))
    assert prepare("X.", "Y") == (None, ("X", "Y")) and prepare("Y", "X.") == (None, ("Y", "X"))   # one final dot
    assert prepare("1/2", ".5") == (None, ("1/2", ".5"))
    assert prepare(Hostile("1/2"), "0.5") == (Verdict(False, "unparsable: TypeError"), none)


def test_math_score_fields():
    from openzaya.envs.base import Score
    p = Problem(env="t", prompt="?", answer="7", difficulty=0, seed=0)
    assert math_score(p, "no box") == math_score(p, "\\boxed{ }") == Score(0.0, 0.0, False, "no answer found")
    assert math_score(p, "\\boxed{7}") == Score(1.0, 1.0, True, "fast: equal strings")
    assert math_score(p, "\\boxed{8}") == Score(0.0, 0.0, True, "fast: integers 7 != 8")


class _Recorder:
    def __init__(self):
        self.calls = []

    def check_many(self, pairs, timeout_s):
        self.calls.append((pairs, timeout_s))
        return [Verdict(True, "recorded")] * len(pairs)


def test_public_api_defaults_and_the_shared_pool(monkeypatch):
    rec = _Recorder()
    monkeypatch.setattr(verify, "_POOL", rec)
    assert check_math("1", "2") == Verdict(True, "recorded") and check_many([("3", "4")]) == [Verdict(True, "recorded")]
    assert rec.calls == [([("1", "2")], 5.0), ([("3", "4")], 5.0)]
    monkeypatch.setattr(verify, "_POOL", None)
    pool = verify.get_pool()
    assert isinstance(pool, MathPool) and verify.get_pool() is pool and pool.workers == []


def test_pool_size_and_fresh_state(monkeypatch):
    for cpus, n in [(8, 4), (3, 3), (1, 1), (None, 1), (0, 1)]:
        monkeypatch.setattr(os, "cpu_count", lambda cpus=cpus: cpus)
        pool = MathPool()
        assert (pool.n, pool.workers, pool.restarts) == (n, [], 0), cpus
    assert MathPool(workers=6).n == 6


def test_lifeline_is_one_read_end_per_process(monkeypatch):
    import fcntl
    fd = _lifeline()
    assert _lifeline() == fd and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
    monkeypatch.setattr(verify, "_LIFELINE", (fd, -1, os.getpid() + 1))   # as inherited by a forked child
    new = _lifeline()
    assert new != fd and verify._LIFELINE[2] == os.getpid()
    os.close(verify._LIFELINE[1])
    os.close(new)


def test_own_pool_verdicts_and_close():
    """A pool of one: fast verdicts start no worker; math-verify right and wrong in one call; close kills the worker
    at once (a timer kills it after 20 s otherwise, and the test fails on the time)."""
    import threading
    pool = MathPool(workers=1)
    assert pool.check_many([("7", "7"), ("1", "2")]) == [Verdict(True, "fast: equal strings"),
                                                        Verdict(False, "fast: integers 1 != 2")]
    assert pool.workers == []
    out = pool.check_many([("1/2", "0.5"), ("1/3", "1/4"), ("9", "9")])
    assert out[0] == Verdict(True, "math-verify") and out[2] == Verdict(True, "fast: equal strings")
    assert not out[1].correct and out[1].reason.startswith("math-verify: 1/3 != 1/4")
    assert pool.restarts == 0 and len(pool.workers) == 1 and pool.workers[0].ready
    procs = [w.proc for w in pool.workers]
    timers = [threading.Timer(20, p.kill) for p in procs]
    for timer in timers:
        timer.start()
    t = time.monotonic()
    pool.close()
    for timer in timers:
        timer.cancel()
    assert time.monotonic() - t < 10 and pool.workers == [] and all(p.poll() is not None for p in procs)


def _fake_worker(tmp_path, name, body):
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return str(path)


def test_workers_that_never_start_or_crash_give_verdicts(tmp_path, monkeypatch):
    """Workers that exit at once, or never say ready, are replaced 2n + 1 times, then every pending pair is wrong
    with the reason; a worker that dies on its request gives 'worker crashed'."""
    for body, timeout in [("exit 1", 60.0), ("exec sleep 30", 0.3)]:
        monkeypatch.setattr(verify.sys, "executable", _fake_worker(tmp_path, "w.sh", body))
        monkeypatch.setattr(verify, "STARTUP_TIMEOUT_S", timeout)
        pool = MathPool(workers=1)
        t = time.monotonic()
        out = pool.check_many([("1/2", "0.5"), ("1", "1"), ("1/3", "0.3")])
        assert time.monotonic() - t < 10, body
        assert out == [Verdict(False, "math-verify workers failed to start"), Verdict(True, "fast: equal strings"),
                       Verdict(False, "math-verify workers failed to start")], body
        assert pool.restarts == 3, body
        pool.close()
    monkeypatch.setattr(verify.sys, "executable", _fake_worker(tmp_path, "w.sh", "exit 1"))
    pool = MathPool(workers=2)                           # 2n + 1 = 5 failures (a 6th may land in the same round)
    assert pool.check_many([("1/2", "0.5")]) == [Verdict(False, "math-verify workers failed to start")]
    assert 5 <= pool.restarts <= 6
    pool.close()
    monkeypatch.setattr(verify.sys, "executable", _fake_worker(tmp_path, "c.sh", "echo '\"ready\"'\nread line\nexit 0"))
    pool = MathPool(workers=1)
    assert pool.check_many([("1/2", "0.5")]) == [Verdict(False, "worker crashed")]
    assert pool.restarts == 1
    pool.close()
    # a worker that never answers: killed at its deadline (not after its 30 s) and replaced
    monkeypatch.setattr(verify.sys, "executable",
                        _fake_worker(tmp_path, "h.sh", "echo '\"ready\"'\nread line\nexec sleep 30"))
    pool = MathPool(workers=2)
    pool.check_many([("1", "1/1")], timeout_s=0.2)   # both workers started and ready
    restarts = pool.restarts
    t = time.monotonic()
    assert pool.check_many([("1/2", "0.5"), ("1/3", "0.3")], timeout_s=0.5) == [Verdict(False, "timeout after 0.5s")] * 2
    assert 0.5 <= time.monotonic() - t < 10
    assert pool.restarts == restarts + 2 and len(pool.workers) == 2
    pool.close()


def test_workers_are_quiet_and_in_their_own_session(tmp_path, monkeypatch, capfd):
    """A worker's stderr goes nowhere (sympy's stray prints, redirected there, stay off the user's console) and it
    leads its own session (a terminal's Ctrl-C reaches the parent, which decides); its answer line is the verdict."""
    body = "echo noise-from-worker >&2\necho '\"ready\"'\nread line\necho '[true, \"scripted\"]'\nexec sleep 30"
    monkeypatch.setattr(verify.sys, "executable", _fake_worker(tmp_path, "q.sh", body))
    pool = MathPool(workers=1)
    assert pool.check_many([("1/2", "0.5")]) == [Verdict(True, "scripted")]
    pid = pool.workers[0].proc.pid
    assert os.getsid(pid) == pid != os.getsid(0)
    pool.close()
    assert "noise-from-worker" not in capfd.readouterr().err


def test_a_worker_that_cannot_take_its_request_is_replaced(tmp_path, monkeypatch):
    """The first worker says ready with its stdin already closed (the send fails): it is replaced and the pair goes
    to the next one. The pool's own default deadline is the public API's (5 s)."""
    import inspect
    marker = tmp_path / "first-done"
    body = (f"if [ -e {marker} ]; then echo '\"ready\"'; read line; echo '[true, \"second\"]'; exec sleep 30; fi\n"
            f"touch {marker}\nexec 0<&-\necho '\"ready\"'\nexec sleep 30")
    monkeypatch.setattr(verify.sys, "executable", _fake_worker(tmp_path, "b.sh", body))
    pool = MathPool(workers=1)
    assert pool.check_many([("1/2", "0.5")]) == [Verdict(True, "second")]
    assert pool.restarts == 1 and len(pool.workers) == 1
    pool.close()
    assert inspect.signature(MathPool.check_many).parameters["timeout_s"].default == 5.0


def test_workers_that_never_take_a_request_fail_the_pairs(tmp_path, monkeypatch):
    """Every worker says ready with its stdin closed: after 2n + 1 failed sends in a row the pending pairs are wrong
    with the reason (it used to replace workers for ever)."""
    monkeypatch.setattr(verify.sys, "executable",
                        _fake_worker(tmp_path, "n.sh", "exec 0<&-\necho '\"ready\"'\nexec sleep 30"))
    pool = MathPool(workers=1)
    t = time.monotonic()
    out = pool.check_many([("1/2", "0.5"), ("1", "1"), ("1/3", "0.3")])
    assert time.monotonic() - t < 20
    assert out == [Verdict(False, "math-verify workers cannot take requests"), Verdict(True, "fast: equal strings"),
                   Verdict(False, "math-verify workers cannot take requests")]
    assert pool.restarts == 3
    pool.close()


def test_failed_starts_count_from_the_last_good_start_and_deadlines_are_kept(tmp_path, monkeypatch):
    """One worker starts, takes the first pair and dies; every later one fails to start: the second pair gets 'failed
    to start' after 2n + 1 = 3 failures in a row (counted from the good start). A hung worker's verdict comes at its
    deadline, not after a longer wait."""
    count = tmp_path / "count"
    body = (f"n=$(cat {count} 2>/dev/null || echo 0)\necho $((n + 1)) > {count}\n"
            f"if [ $n -eq 0 ]; then echo '\"ready\"'; read line; exit 0; fi\nexit 1")
    monkeypatch.setattr(verify.sys, "executable", _fake_worker(tmp_path, "f.sh", body))
    pool = MathPool(workers=1)
    assert pool.check_many([("1/2", "0.5"), ("1/3", "0.3")]) == [Verdict(False, "worker crashed"),
                                                                 Verdict(False, "math-verify workers failed to start")]
    assert pool.restarts == 1 + 3
    pool.close()
    monkeypatch.setattr(verify.sys, "executable",
                        _fake_worker(tmp_path, "h1.sh", "echo '\"ready\"'\nread line\nexec sleep 30"))
    pool = MathPool(workers=1)
    pool.check_many([("1", "1/1")], timeout_s=0.2)       # started, timed out, its replacement is starting
    pool.check_many([("1", "1/1")], timeout_s=0.2)       # the replacement is ready; a new one is starting
    t = time.monotonic()
    assert pool.check_many([("1/2", "0.5")], timeout_s=0.3) == [Verdict(False, "timeout after 0.3s")]
    assert time.monotonic() - t < 0.95              # a longer wait would take 1 s or more
    pool.close()
