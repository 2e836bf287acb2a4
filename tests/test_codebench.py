"""Execution-scored code benchmarks (openzaya/codebench.py): extraction, stdout comparison, LiveCodeBench rows with
compressed (and refused malicious) private tests, our own JSONL, the code:mini suite (references score 1, broken
programs 0), every verdict, the population selection rule, and `openzaya eval --task code` over the local, openai
and hf backends.

Run: .venv/bin/python -m pytest tests/test_codebench.py
"""

import base64
import json
import pickle
import zlib
from pathlib import Path

import pytest

from openzaya import codebench
from openzaya.backends import Backend, Completion
from openzaya.codebench import (CodeTask, CodeTest, CodeLimits, Verdict, decode_tests, evaluate_code, extract_code,
                                run_tests, select, stdout_matches)
from openzaya.tokenizer import split_reasoning
from openzaya.ttc import TTCConfig

FAST = CodeLimits(time_s=2, memory_mb=512, workers=2)


def fence(code: str, tag: str = "python") -> str:
    return f"```{tag}\n{code}\n```"


# ---------------------------------------------------------------------------------------------------------------------
# extraction and comparison


def test_extract_code_takes_the_last_python_block_after_the_reasoning():
    assert extract_code("text\n" + fence("x = 1") + "\nmore\n" + fence("y = 2") + "\nbye") == "y = 2\n"
    # blocks in the reasoning do not count once the think block closed
    assert extract_code("<think>\n" + fence("x = 1") + "\n</think>\nno code here") is None
    assert extract_code("<think>\nplan\n</think>\n" + fence("z = 3")) == "z = 3\n"
    assert extract_code(fence("print(1)") + "\n" + fence("3\n", "text")) == "print(1)\n"   # output example skipped
    assert extract_code(fence("a = 1", "")) == "a = 1\n" and extract_code(fence("b = 2", "py")) == "b = 2\n"
    assert extract_code("```python\nunclosed = 1\n") is None            # ran out of budget mid-block
    assert extract_code("no fences at all") is None and extract_code(fence("   ")) is None
    assert extract_code(fence("int main() {}", "cpp")) is None
    assert extract_code("1. step\n   ```python\n   def f():\n       return 1\n   ```") == "def f():\n    return 1\n"


def test_stdout_comparison_follows_livecodebench():
    assert stdout_matches("3\n", "3") and stdout_matches("  1 2 \n3\n\n", "1 2\n3")
    assert stdout_matches("1.0 2\n", "1 2.00")                            # the same numbers (Decimal)
    assert not stdout_matches("1 2\n", "1 3") and not stdout_matches("1\n2\n", "1")
    assert not stdout_matches("[1,2]", "[1, 2]") and not stdout_matches("yes", "Yes")


# ---------------------------------------------------------------------------------------------------------------------
# LiveCodeBench rows


# two hand-made rows in LiveCodeBench's released layout (a LeetCode functional problem, an AtCoder stdin one), their
# private tests packed as the released files pack them: base64(zlib(pickle(JSON text))), pickle protocol 4
LCB_SAMPLE = Path(__file__).parent / "assets" / "lcb_code_generation_sample.jsonl"


def test_lcb_sample_asset_is_packed_as_released():
    rows = [json.loads(line) for line in LCB_SAMPLE.read_text().splitlines()]
    assert len(rows) == 2 and LCB_SAMPLE.stat().st_size < 1 << 20
    for row in rows:
        packed = row["private_test_cases"]
        assert not packed.lstrip().startswith("[")                        # not plain JSON: the decoder has to work
        assert zlib.decompress(base64.b64decode(packed))[:1] == b"\x80"   # a pickle inside
    assert [len(decode_tests(r["private_test_cases"])) for r in rows] == [2, 1]


def test_lcb_private_tests_decode_and_pickle_is_never_unpickled(tmp_path, monkeypatch):
    tests = [{"input": "1", "output": "2", "testtype": "stdin"}]
    assert decode_tests(json.dumps(tests)) == tests and decode_tests(tests) == tests
    assert decode_tests(base64.b64encode(zlib.compress(json.dumps(tests).encode())).decode()) == tests
    for protocol in (2, 4, 5):
        packed = zlib.compress(pickle.dumps(json.dumps(tests), protocol=protocol))
        assert decode_tests(base64.b64encode(packed).decode()) == tests
    marker = tmp_path / "pwned"

    class Evil:   # unpickling it would create `marker`
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for payload in (Evil(), [json.dumps(tests), Evil()], {"x": json.dumps(tests)}):
        with pytest.raises(ValueError, match="refusing a pickle"):
            decode_tests(base64.b64encode(zlib.compress(pickle.dumps(payload))).decode())
    assert not marker.exists()
    with pytest.raises(ValueError, match="neither JSON nor"):
        decode_tests("definitely not tests")
    big = base64.b64encode(zlib.compress(json.dumps(tests * 1000).encode())).decode()
    monkeypatch.setattr(codebench, "MAX_DECODED_BYTES", 1000)
    with pytest.raises(ValueError, match="over 1000 bytes"):
        decode_tests(big)


def test_lcb_rows_load_and_score(tmp_path):
    func, stdin = codebench.load(str(LCB_SAMPLE))                     # layout detected from the fields
    assert func.code.entry_point == "hasElement" and stdin.code.entry_point is None
    assert [t.public for t in func.code.tests] == [True, False, False]
    assert func.code.tests[1].input == [[1, 2, 3], 2] and func.code.tests[1].output is True
    assert (func.code.difficulty, func.code.date, func.code.platform) == ("easy", "2024-08-03", "leetcode")
    assert "class Solution" in func.question and "```python" in func.question
    assert "standard input" in stdin.question and stdin.code.tests[1].input == "10 -4\n"
    right = ("class Solution:\n    def hasElement(self, nums: List[int], target: int) -> bool:\n"
             "        return target in nums")
    assert run_tests(func.code, right, FAST).verdict == "passed"      # List needs the prelude, as under LCB
    wrong = right.replace("target in nums", "True")
    v = run_tests(func.code, wrong, FAST)
    assert v.verdict == "wrong answer" and [t.verdict for t in v.tests] == ["passed", "passed", "wrong answer"]
    assert run_tests(stdin.code, "a, b = map(int, input().split())\nprint(a + b)", FAST).verdict == "passed"
    # a main guard runs in stdin programs; a module-level function serves a functional problem too
    assert run_tests(stdin.code, "def main():\n    print(sum(map(int, input().split())))\n"
                                 "if __name__ == '__main__':\n    main()", FAST).verdict == "passed"
    assert run_tests(func.code, "def hasElement(nums, target):\n    return target in nums\n"
                                "if __name__ == '__main__':\n    print(input())", FAST).verdict == "passed"
    (tmp_path / "x.jsonl").write_text('{"problem": "1+1?", "answer": "2"}\n')
    with pytest.raises(ValueError, match="row 0: not a code problem"):
        codebench.load(str(tmp_path / "x.jsonl"), task="code")
    assert codebench.load(str(tmp_path / "x.jsonl"))[0].code is None     # auto: an answer benchmark


def test_own_jsonl_layout_and_date_window(tmp_path):
    rows = [{"id": "add", "prompt": "Add two numbers.", "entry_point": "add", "difficulty": "easy",
             "date": "2025-01-05", "public_tests": [{"input": [1, 2], "output": 3}],
             "tests": [{"input": [5, 5], "output": 10}]},
            {"id": "echo", "prompt": "Print the input line reversed.", "date": "2025-06-01",
             "tests": [{"input": "abc\n", "output": "cba\n"}]}]
    f = tmp_path / "own.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    add, echo = codebench.load(str(f), task="code")
    assert add.code.voting == 1 and echo.code.voting == 1                # no public tests: the first test votes
    assert "`add`" in add.question and "standard input" in echo.question
    assert run_tests(echo.code, "print(input()[::-1])", FAST).verdict == "passed"
    assert [it.id for it in codebench.in_window([add, echo], "2025-03-01", None)] == ["echo"]
    with pytest.raises(ValueError, match="no problem dated"):
        codebench.in_window([add, echo], "2026-01-01", "2026-02-01")
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        codebench.in_window([add, echo], "2025-03", None)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**rows[0], "tests": [{"input": 5, "output": 10}]}) + "\n")
    with pytest.raises(ValueError, match="argument list"):
        codebench.load(str(bad))


# ---------------------------------------------------------------------------------------------------------------------
# verdicts and the selection rule


def test_every_verdict():
    task = CodeTask([CodeTest([2], 4, True), CodeTest([3], 6), CodeTest([5], 10)], entry_point="double")
    cases = {"def double(x):\n    return 2 * x": "passed",
             "def double(x):\n    return x + 2": "wrong answer",          # right on the public test, wrong after
             "def double(x):\n    return 1 // (x - x)": "runtime error",
             "def double(x):\n    while True:\n        pass": "time limit",
             "def double(x) return 2 * x": "compile error",
             "def other(x):\n    return 2 * x": "runtime error"}
    lim = CodeLimits(time_s=1, memory_mb=512, workers=1)
    got = {code: run_tests(task, code, lim) for code in cases}
    assert {c: v.verdict for c, v in got.items()} == cases
    assert run_tests(task, None, lim).verdict == "no code"
    assert "ZeroDivisionError" in got["def double(x):\n    return 1 // (x - x)"].tests[0].output
    assert "no function double" in got["def other(x):\n    return 2 * x"].tests[0].output
    assert len(got["def double(x):\n    return x + 2"].tests) == 2             # stops at the first failure
    mem = run_tests(task, "def double(x):\n    return len(bytearray(800 << 20))", lim)
    assert mem.verdict == "runtime error" and "MemoryError" in mem.tests[0].output


def test_selection_rule_votes_by_public_outputs():
    def v(sig, verdict="wrong answer"):
        return Verdict(verdict, signature=None if sig is None else json.dumps(sig))
    assert select([v(None, "no code"), v(["1"]), v(["2"], "passed"), v(["2"], "passed")]) == 2
    assert select([v(["1"]), v(["2"], "passed")]) == 0                     # tie: the earliest
    assert select([v(None, "no code"), v(None, "compile error")]) is None


def test_pass_curve_is_the_unbiased_estimator():
    rows = [{"code": [{"verdict": v} for v in ("passed", "wrong answer", "passed", "no code")]},
            {"code": [{"verdict": "no code"}] * 4}]
    curve = codebench._pass_curve(rows, 4)
    assert list(curve) == ["1", "2", "4"]
    assert curve["2"]["value"] == pytest.approx((1 - 1 / 6) / 2)          # 1 - C(2,2)/C(4,2) for the first problem
    assert curve["1"]["value"] == 0.25 and curve["4"]["value"] == 0.5
    assert list(codebench._pass_curve([{"code": [{"verdict": "passed"}] * 16}], 16)) == ["1", "2", "4", "5", "8",
                                                                                       "10", "16"]


# ---------------------------------------------------------------------------------------------------------------------
# the mini benchmark through evaluate_code


class CodeScripted(Backend):
    """Answers each problem with the program `programs(question, call_index)` after a think block; aggregation
    prompts (round >= 1) get `aggregate(question)`."""

    def __init__(self, items, programs, aggregate=None):
        self.items, self.programs, self.aggregate = items, programs, aggregate
        self.calls: dict[str, int] = {}
        self.prompts: list[str] = []

    def generate(self, requests):
        out = []
        for r in requests:
            content = r.messages[0]["content"] if r.messages else r.prompt     # delethink sends raw prompts
            self.prompts.append(content)
            it = next(it for it in self.items if content.startswith(it.question))
            i = self.calls[it.id] = self.calls.get(it.id, -1) + 1
            agg = "Candidate 1" in content
            code = self.aggregate(it) if agg else self.programs(it, i)
            text = f"<think>\nlet me see\n</think>\n\nHere it is.\n\n{fence(code)}\n" if code else "<think>\nhm"
            reasoning, answer = split_reasoning(text)
            out.append([Completion(text, reasoning, answer, "stop", 10, 20, 0.0)])
        return out


def broken(it) -> str:
    return "print(0)" if it.code.entry_point is None else f"def {it.code.entry_point}(*args):\n    return None"


def test_mini_is_reproducible_and_mixes_modes():
    a, b = codebench.load("code:mini"), codebench.load("code:mini")
    assert 30 <= len(a) <= 40 and [x.question for x in a] == [x.question for x in b]
    assert [x.code.tests for x in a] == [x.code.tests for x in b]
    other = codebench.mini_benchmark(seed=1)
    assert [x.code.tests for x in other] != [x.code.tests for x in a]
    modes = {x.code.entry_point is None for x in a}
    assert modes == {True, False} and {x.code.difficulty for x in a} == {"easy", "medium", "hard"}
    assert all(sum(t.public for t in x.code.tests) == 3 and len(x.code.tests) == 10 for x in a)


def mini_subset():
    items = codebench.load("code:mini")
    stdin = [it for it in items if it.code.entry_point is None][:1]
    return [it for it in items if it.code.entry_point is not None][:2] + stdin


def test_mini_references_score_one_and_broken_programs_zero(tmp_path):
    items = mini_subset()
    base = TTCConfig(budget_tokens=64, tail_tokens=16)
    ref = evaluate_code(items, CodeScripted(items, lambda it, i: it.answer), base, ["single"], FAST, samples=1,
                        out_dir=tmp_path / "ref")
    assert ref["methods"]["single"]["avg@k"] == 1.0 and ref["code"]["methods"]["single"]["verdicts"]["passed"] == 3
    bad = evaluate_code(items, CodeScripted(items, lambda it, i: broken(it)), base, ["single"], FAST, samples=2,
                        out_dir=tmp_path / "bad")
    r = bad["methods"]["single"]
    assert r["avg@k"] == 0.0 and r["pass@2"] == 0.0
    assert bad["code"]["methods"]["single"]["verdicts"]["wrong answer"] == 6
    # the per-sample JSONL carries each sample's verdict and its per-test details
    rec = json.loads(next((tmp_path / "ref").glob("samples_code_single_*.jsonl")).read_text().splitlines()[0])
    run = rec["code"][0]
    assert run["verdict"] == "passed" and len(run["candidates"][0]["tests"]) == 10
    assert {"index", "public", "verdict", "seconds", "output"} <= set(run["candidates"][0]["tests"][0])
    report = (tmp_path / "ref" / "report.md").read_text()
    assert "## Code" in report and "by difficulty" in report and "Selection rule" in report


@pytest.mark.slow
def test_every_mini_reference_scores_one(tmp_path):
    items = codebench.load("code:mini")
    res = evaluate_code(items, CodeScripted(items, lambda it, i: it.answer), TTCConfig(budget_tokens=64,
                        tail_tokens=16), ["single"], FAST, out_dir=tmp_path)
    assert res["methods"]["single"]["avg@k"] == 1.0


def test_populations_select_by_public_outputs_and_report_the_mean(tmp_path):
    """Majority of 3: calls 0, 1, 2 give broken, right, right -> the right cluster wins (2 votes), pop_mean 2/3.
    Markovian RSA: round 0 the same, the aggregator always writes the right program -> 1.0 and 1.0."""
    items = mini_subset()[:2]
    right_after_first = lambda it, i: broken(it) if i % 3 == 0 else it.answer   # noqa: E731
    base = TTCConfig(population=3, candidates=2, rounds=1, tail_tokens=16, budget_tokens=64)
    backend = CodeScripted(items, right_after_first, aggregate=lambda it: it.answer)
    res = evaluate_code(items, backend, base, ["majority", "markovian_rsa"], FAST, samples=1, out_dir=tmp_path,
                        match_calls=False)
    maj, rsa = res["methods"]["majority"], res["methods"]["markovian_rsa"]
    assert maj["avg@k"] == 1.0 and maj["pop_mean"] == pytest.approx(2 / 3)
    assert rsa["avg@k"] == 1.0 and rsa["pop_mean"] == 1.0
    assert res["code"]["methods"]["majority"]["population_verdicts"] == {
        "passed": 4, "wrong answer": 2, "runtime error": 0, "time limit": 0, "compile error": 0, "no code": 0}
    agg = [p for p in backend.prompts if "Candidate 1" in p]
    assert agg and all("```python code block" in p and "\\boxed" not in p for p in agg)   # the code template
    assert res["code"]["selection_rule"] == codebench.SELECTION_RULE


def test_every_ttc_method_scores_code_by_execution(tmp_path):
    """Every method of ttc.METHODS on two mini problems: right programs everywhere -> 1.0 with every final candidate
    passed; broken ones everywhere -> 0.0 with every final candidate a wrong answer."""
    from openzaya.ttc import METHODS

    items = mini_subset()[:2]
    base = TTCConfig(population=3, candidates=2, rounds=1, tail_tokens=16, budget_tokens=64, head_tokens=8)
    for name, program in (("right", lambda it: it.answer), ("broken", broken)):
        backend = CodeScripted(items, lambda it, i: program(it), aggregate=program)
        res = evaluate_code(items, backend, base, list(METHODS), FAST, samples=1, out_dir=tmp_path / name,
                            match_calls=False)
        for m in METHODS:
            r, code = res["methods"][m], res["code"]["methods"][m]
            want = 1.0 if name == "right" else 0.0
            assert (r["avg@k"], r["pop_mean"]) == (want, want), m
            verdict = "passed" if name == "right" else "wrong answer"
            assert code["verdicts"] == {v: 2 * (v == verdict) for v in codebench.VERDICTS}, m
            finals = 2 * (1 if m == "single" else base.population)
            assert code["population_verdicts"][verdict] == finals == sum(code["population_verdicts"].values()), m


def test_splits_by_difficulty_contest_month_and_window(tmp_path):
    """Hand values: a (easy, Jan) always right, b (easy, Feb) always wrong, c (hard, Feb) right on its first sample
    only; 2 samples each."""
    rows = [{"id": pid, "prompt": f"Return {pid}.", "entry_point": "f", "difficulty": diff, "date": date,
             "tests": [{"input": [], "output": 1}]}
            for pid, diff, date in (("a", "easy", "2025-01-10"), ("b", "easy", "2025-02-10"),
                                    ("c", "hard", "2025-02-20"))]
    f = tmp_path / "own.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = codebench.load(str(f), task="code")
    good, bad = "def f():\n    return 1", "def f():\n    return 2"
    program = lambda it, i: good if it.id == "a" or (it.id == "c" and i == 0) else bad   # noqa: E731
    res = evaluate_code(items, CodeScripted(items, program), TTCConfig(budget_tokens=64, tail_tokens=16),
                        ["single"], FAST, samples=2, out_dir=tmp_path / "out", cutoff_date="2025-02-01")
    code = res["code"]["methods"]["single"]

    def cell(split, key):
        return {g: (s["n"], s[key]) for g, s in code[split].items()}
    assert cell("by_difficulty", "avg@k") == {"easy": (2, 0.5), "hard": (1, 0.5)}
    assert cell("by_difficulty", "pass@2") == {"easy": (2, 0.5), "hard": (1, 1.0)}
    assert cell("by_contest_month", "avg@k") == {"2025-01": (1, 1.0), "2025-02": (2, 0.25)}
    assert cell("by_window", "avg@k") == {"before 2025-02-01": (1, 1.0), "from 2025-02-01": (2, 0.25)}
    assert code["by_difficulty"]["easy"]["stderr"]["avg@k"] == pytest.approx(0.5)    # sd of (1, 0) / sqrt(2)
    assert code["pass@k"]["1"]["value"] == pytest.approx(0.5) and code["pass@k"]["2"]["value"] == pytest.approx(2 / 3)


# ---------------------------------------------------------------------------------------------------------------------
# the CLI over the local, openai and hf backends


def test_eval_cli_local_backend_code_file(tmp_path, capsys):
    from openzaya.cli import main
    from test_local_backend import make_checkpoint

    rc = main(["eval", "--benchmark", str(LCB_SAMPLE), "--task", "code", "--backend", "local", "--model",
               str(make_checkpoint(tmp_path / "m")), "--method", "single,markovian_rsa", "--samples", "2",
               "--population", "2", "--candidates", "2", "--rounds", "1", "--budget-tokens", "8", "--tail-tokens", "4",
               "--out", str(tmp_path / "out"), "--cutoff-date", "2025-01-01", "--sandbox-workers", "2"])
    out = capsys.readouterr().out
    assert rc in (0, None) and "verdicts:" in out and codebench.SELECTION_RULE in out
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    code = res["code"]["methods"]["single"]
    assert sum(code["verdicts"].values()) == 4                         # 2 problems x 2 samples, one verdict each
    assert set(code["by_window"]) == {"before 2025-01-01", "from 2025-01-01"}
    assert set(code["by_contest_month"]) == {"2024-08", "2025-03"}
    assert set(code["by_difficulty"]) == {"easy", "medium"} and set(code["pass@k"]) == {"1", "2"}
    assert (tmp_path / "out" / "code_aggregation_template.txt").exists()


def test_eval_cli_openai_backend_runs_the_served_programs(tmp_path, capsys):
    from openai_stub_server import StubServer

    from openzaya.cli import main

    items = codebench.load("code:mini")

    class CodeServer(StubServer):
        def answer(self, prompt, index):
            it = next(it for it in items if prompt.startswith(it.question))
            return "thinking", "Solution:\n" + fence(it.answer if index == 0 else broken(it))

    with CodeServer(n_words=10_000) as server:
        rc = main(["eval", "--benchmark", "code:mini", "--backend", "openai", "--base-url", server.url + "/v1",
                   "--model", "stub", "--method", "single", "--budget-tokens", "4096", "--limit", "3",
                   "--out", str(tmp_path / "out"), "--test-time-s", "2"])
    assert rc in (0, None)
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["methods"]["single"]["avg@k"] == 1.0
    assert res["code"]["methods"]["single"]["verdicts"]["passed"] == 3
    capsys.readouterr()


@pytest.mark.slow
def test_eval_cli_hf_backend_gemma(gemma_dir, tmp_path, capsys):
    from openzaya.cli import main

    rc = main(["eval", "--benchmark", "code:mini", "--backend", "hf", "--model", str(gemma_dir[0]), "--method",
               "single", "--limit", "2", "--budget-tokens", "32", "--out", str(tmp_path / "out")])
    assert rc in (0, None)
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert sum(res["code"]["methods"]["single"]["verdicts"].values()) == 2
    assert 0.0 <= res["methods"]["single"]["avg@k"] <= 1.0
    capsys.readouterr()
