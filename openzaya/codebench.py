"""Execution-scored code benchmarks (LiveCodeBench-style): loading, code extraction, tests in the sandbox, verdicts,
the selection rule for populations, and the code report (spec: evaluation.md §3-§4, environments.md §9).

Benchmarks (`load_rows` detects the layout from the first row; `openzaya eval --task code` insists on one):
- LiveCodeBench's released code-generation rows (`livecodebench/code_generation_lite`, read from a local file):
  question_title / question_content, starter_code, public_test_cases and private_test_cases (JSON lists of
  {input, output, testtype}; the private ones in the released files are base64(zlib(pickle(JSON text)))), metadata
  (JSON with func_name for LeetCode's functional problems), platform, difficulty, contest_date. Functional test
  inputs are one JSON value per line (the method's arguments), outputs one JSON value; stdin tests are text.
  NOTE: unpickling downloaded data runs code. We never unpickle: `decode_tests` reads the pickle's opcodes with
  pickletools (a parser) and accepts only a pickle that holds one string and nothing else, the shape of the
  released files; anything else (a class, a call) is refused with an error.
- our own JSONL: {"id", "prompt", "entry_point" (a function name; absent = a stdin/stdout program), "tests":
  [{"input", "output"}], "public_tests" (optional, same form), "difficulty", "date" (optional)}; functional
  inputs are argument lists, outputs the expected return value; stdin inputs and outputs are text.
- `code:mini`: generated from the code environments' seed programs (openzaya/envs/code.py) and a seed: one problem
  per program (the docstring is the statement, 3 public examples, 7 hidden tests; with probability 1/3 a stdin
  program that reads one JSON argument per line and prints json.dumps of the result: 8 of 33 at seed 0), the
  reference solution as the item's answer. Expected outputs come from running our own reference sources here.

Scoring one sample: the program is the last fenced code block after the reasoning (`extract_code`: after the last
`</think>`, a ```python / ```py / bare fence, closed; none = "no code"); it must compile in the parent (`compile`,
which never runs it) else "compile error"; then each test is one sandbox run (`openzaya.sandbox`, mode auto) with
its own CPU-time limit (RLIMIT_CPU), wall limit (2 x CPU + 1 s) and memory limit (RLIMIT_AS). Like LiveCodeBench
the program runs after a prelude importing `typing`'s names and common standard modules (its starter code uses
`List` unimported); only the standard library exists in the sandbox. Functional programs run as module `solution`
(a `__main__` guard does not fire) and `Solution().<name>` is called when a class Solution has the method, else the
module's function; their return value (JSON) is compared with `sandbox.results_equal` (tuples as lists, relative
float tolerance 1e-9). Stdin programs: stdout against the expected text line by line after stripping, a line equal
when its strings are, or when both split into the same numbers (Decimal, LiveCodeBench's rule). Tests run public
first; every voting test runs, then the rest in order until the first failure (LiveCodeBench stops there too).
Verdict of a sample: its first failing test's verdict (wrong answer, runtime error, time limit), else passed.

Populations (majority and every TTC method) need one program per run. Selection rule: candidates whose code
compiles vote with their outputs on the voting tests (the public tests, or the first test when a problem has none;
inputs only, expected outputs are never used); the most common output signature wins, ties to the earliest
candidate, which is the run's program. The final-population mean pass rate (the ZAYA1 TR's TTC number) is reported
next to it as pop_mean. maj@k over k runs votes the same way across the runs' programs. Aggregation rounds use
CODE_AGGREGATION_TEMPLATE (asks for one improved program in a ```python block) unless --template-file is given.

Throughput: samples are scored in parallel sandboxes (a thread pool of `workers`, each running one sample's tests
in order); identical programs of one problem are run once. Not done: multi-answer problems (LiveCodeBench's ERRATA)
are graded against their one answer; interactive problems are not supported.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import random
import re
import textwrap
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path

from .envs.base import MAX_RESPONSE_CHARS, strip_thinking
from .evaluate import SUITES, Item, evaluate, load_benchmark, mean_se, pass_at_k, read_rows, rows_to_items
from .sandbox import Limits, call_function, results_equal, run_python

VERDICTS = ("passed", "wrong answer", "runtime error", "time limit", "compile error", "no code")
SELECTION_RULE = ("vote by identical outputs on the public tests (the first test when there are none) among "
                  "candidates whose code compiles; ties to the earliest candidate; pop_mean = the final population's "
                  "mean pass rate")
MAX_DECODED_BYTES = 1 << 30   # decompressed private tests of one problem (a zlib bomb stops here)
DETAIL_CHARS = 200            # of outputs and errors in the per-test details

# names a program may use unimported, as under LiveCodeBench's harness (its starter code says `List[int]`)
PRELUDE = """import bisect, collections, functools, heapq, itertools, math, operator, re, string, sys
from typing import *
from collections import Counter, OrderedDict, defaultdict, deque
from functools import cache, lru_cache, reduce
from heapq import heapify, heappop, heappush
from itertools import accumulate, combinations, permutations, product
from math import ceil, comb, floor, gcd, inf, isqrt, sqrt
sys.setrecursionlimit(100000)
"""

CODE_AGGREGATION_TEMPLATE = (
    "{question}\n\n"
    "Below are {n} candidate solutions to this problem. Each shows only the last part of its work: it may start "
    "mid-sentence, stop before the end, and contain mistakes.\n\n"
    "{candidates}"
    "Consider the candidates: keep what is right, check where they disagree, and fix or rewrite what looks wrong. "
    "Then give one improved, complete program in a single ```python code block at the end of your answer."
)
ANSWER_FORMAT = ("After your reasoning, give the complete program in one ```python code block; the last code block "
                 "of your answer is what is run.")


@dataclass
class CodeTest:
    input: object           # functional: the argument list; stdin: the text on standard input
    output: object          # functional: the expected return value; stdin: the expected standard output
    public: bool = False    # shown in the statement; public tests run first and carry the population vote


@dataclass
class CodeTask:
    tests: list[CodeTest]
    entry_point: str | None = None     # the function (or Solution method) to call; None = a stdin/stdout program
    difficulty: str | None = None
    date: str | None = None            # contest date, YYYY-MM-DD
    platform: str | None = None

    @property
    def voting(self) -> int:
        """How many leading tests vote (always run): the public ones, else the first."""
        return max(1, sum(t.public for t in self.tests))


@dataclass
class CodeLimits:
    time_s: int = 6                    # CPU seconds per test (LiveCodeBench's default timeout)
    memory_mb: int = 1024
    workers: int = os.cpu_count() or 1  # samples scored at once, each in its own sandbox
    mode: str = "auto"                 # sandbox mode

    def validate(self) -> None:
        for name, flag in (("time_s", "--test-time-s"), ("memory_mb", "--test-memory-mb"),
                           ("workers", "--sandbox-workers")):
            if getattr(self, name) < 1:
                raise ValueError(f"{flag} must be >= 1, got {getattr(self, name)}")

    def limits(self, expected_chars: int = 0) -> Limits:
        return Limits(wall_s=2 * self.time_s + 1, cpu_s=self.time_s, memory_bytes=self.memory_mb << 20,
                      output_bytes=max(1 << 20, 2 * expected_chars + 4096))


@dataclass
class TestResult:
    index: int
    public: bool
    verdict: str
    seconds: float
    output: str           # what the program printed or returned (truncated), or its error


@dataclass
class Verdict:
    verdict: str
    tests: list[TestResult] = field(default_factory=list)
    signature: str | None = None      # outputs on the voting tests (JSON); None = does not vote
    detail: str = ""


# ---------------------------------------------------------------------------------------------------------------------
# extraction


_FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+#.-]*)[ \t]*$")
PYTHON_TAGS = ("", "python", "py", "python3")


def extract_code(response: str) -> str | None:
    """The last closed fenced block tagged python / py / python3 or untagged, after the last `</think>` (the whole
    response when there is none); None when there is no such block."""
    lines = strip_thinking(response)[-MAX_RESPONSE_CHARS:].splitlines()
    blocks, start, tag = [], None, ""
    for i, line in enumerate(lines):
        m = _FENCE.match(line)
        if m is None:
            continue
        if start is None:
            start, tag = i + 1, m.group(1).lower()
        elif not m.group(1):
            blocks.append((tag, "\n".join(lines[start:i])))
            start = None
    code = next((c for t, c in reversed(blocks) if t in PYTHON_TAGS), None)
    return None if code is None or not code.strip() else textwrap.dedent(code).strip("\n") + "\n"


# ---------------------------------------------------------------------------------------------------------------------
# running one sample's tests


def program_source(task: CodeTask, code: str) -> str:
    """main.py for the sandbox: stdin programs run as __main__ after the prelude; functional programs are executed
    as module `solution` and called through `_oz_entry`."""
    if task.entry_point is None:
        return PRELUDE + "\n" + code
    return (f"_oz_ns = {{'__name__': 'solution'}}\n"
            f"exec(compile({PRELUDE + chr(10) + code!r}, 'solution.py', 'exec'), _oz_ns)\n"
            f"def _oz_entry(*args):\n"
            f"    cls = _oz_ns.get('Solution')\n"
            f"    if isinstance(cls, type) and hasattr(cls, {task.entry_point!r}):\n"
            f"        return getattr(cls(), {task.entry_point!r})(*args)\n"
            f"    if not callable(_oz_ns.get({task.entry_point!r})):\n"
            f"        raise NameError('no function {task.entry_point} (or Solution.{task.entry_point}) defined')\n"
            f"    return _oz_ns[{task.entry_point!r}](*args)\n")


def _decimal_line(line: str) -> list[Decimal] | None:
    try:
        return [Decimal(x) for x in line.split()]
    except InvalidOperation:
        return None


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.strip().split("\n")]


def stdout_matches(got: str, want: str) -> bool:
    """Line by line after stripping; a line matches when equal, or when both are the same numbers (Decimal)."""
    a, b = _lines(got), _lines(want)
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x != y:
            dx, dy = _decimal_line(x), _decimal_line(y)
            if dx is None or dy is None or dx != dy:
                return False
    return True


def _short(text: str) -> str:
    return text if len(text) <= DETAIL_CHARS else text[:DETAIL_CHARS // 2] + " ... " + text[-DETAIL_CHARS // 2:]


def _failure(run) -> tuple[str, str] | None:
    """(verdict, detail) of a sandbox run that did not finish normally; None when it did."""
    if run.killed_reason in ("timeout", "cpu limit"):
        return "time limit", run.killed_reason
    if run.killed_reason == "output limit":
        return "runtime error", "output limit"
    if not run.ok:
        last = [line for line in run.stderr.strip().splitlines() if line.strip()]
        return "runtime error", _short(last[-1] if last else f"exit code {run.exit_code} {run.killed_reason}".strip())
    return None


def run_test(task: CodeTask, program: str, i: int, lim: CodeLimits) -> TestResult:
    """One test in its own sandbox."""
    test = task.tests[i]
    t0 = time.perf_counter()
    if task.entry_point is None:
        run = run_python(program, stdin=test.input, limits=lim.limits(len(test.output)), mode=lim.mode)
        fail = _failure(run)
        verdict = fail[0] if fail else "passed" if stdout_matches(run.stdout, test.output) else "wrong answer"
        out = fail[1] if fail else run.stdout
    else:
        results, run = call_function(program, "_oz_entry", [test.input],
                                     limits=lim.limits(len(json.dumps(test.output))), mode=lim.mode)
        fail = _failure(run) or (None if results else ("runtime error", "no result"))
        if fail:
            verdict, out = fail
        elif results[0][0] == "error":
            verdict, out = "runtime error", results[0][1]
        else:
            verdict = "passed" if results_equal(results[0][1], test.output) else "wrong answer"
            out = json.dumps(results[0][1], sort_keys=True)
    return TestResult(i, test.public, verdict, round(time.perf_counter() - t0, 4), _short(out))


def run_tests(task: CodeTask, code: str | None, lim: CodeLimits) -> Verdict:
    """The verdict of one sample's program: every voting test, then the others in order up to the first failure."""
    if code is None:
        return Verdict("no code")
    try:
        compile(code, "solution.py", "exec")
    except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError) as e:
        return Verdict("compile error", detail=_short(f"{type(e).__name__}: {e}"))
    program = program_source(task, code)
    results: list[TestResult] = []
    for i in range(len(task.tests)):
        if i >= task.voting and any(r.verdict != "passed" for r in results):
            break
        results.append(run_test(task, program, i, lim))
    first_fail = next((r.verdict for r in results if r.verdict != "passed"), "passed")
    signature = json.dumps([r.output if r.verdict in ("passed", "wrong answer") else "!" + r.verdict
                            for r in results[:task.voting]])
    return Verdict(first_fail, results, signature)


def select(verdicts: list[Verdict]) -> int | None:
    """SELECTION_RULE: the earliest candidate of the most common voting signature; None when none votes."""
    keys = [(v.signature, i) for i, v in enumerate(verdicts) if v.signature is not None]
    if not keys:
        return None
    counts = Counter(k for k, _ in keys)
    best = max(counts.values())
    return next(i for k, i in keys if counts[k] == best)


# ---------------------------------------------------------------------------------------------------------------------
# the judge (evaluate.evaluate's `judge`): runs, selects, reports per run


def judge_code(method: str, items: list, runs_by_item: dict, lim: CodeLimits, stats: dict | None = None) -> list[dict]:
    """Per item: each run's selected program's correctness, verdict, vote key and the population's pass rate, plus
    per-sample details (`extra`: "code"). All final candidates of all runs are scored at once in `lim.workers`
    parallel sandboxes; identical programs of one problem run once."""
    from tqdm import tqdm

    codes = {(it.id, r_i, c_i): extract_code(text) for it in items
             for r_i, r in enumerate(runs_by_item[it.id]) for c_i, text in enumerate(r.final_texts)}
    tasks = {it.id: it.code for it in items}
    jobs = sorted({(pid, code) for (pid, _, _), code in codes.items()}, key=lambda j: (j[0], j[1] or ""))
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max(1, lim.workers)) as pool, \
            tqdm(total=len(jobs), unit="program", desc=f"tests {method}", dynamic_ncols=True) as bar:
        def score(job):
            v = run_tests(tasks[job[0]], job[1], lim)
            bar.update(1)
            return v
        verdicts = dict(zip(jobs, pool.map(score, jobs)))
    if stats is not None:
        tests = [t for v in verdicts.values() for t in v.tests]
        stats.update({"programs_run": len(jobs), "tests_run": len(tests), "wall_s": time.perf_counter() - t0,
                      "test_s": sum(t.seconds for t in tests)})
    out = []
    for it in items:
        row = {"correct": [], "answers": [], "keys": [], "pop": [], "texts": [], "extra": {"code": []}}
        for r_i, r in enumerate(runs_by_item[it.id]):
            cand_codes = [codes[(it.id, r_i, c_i)] for c_i in range(len(r.final_texts))]
            cands = [verdicts[(it.id, c)] for c in cand_codes]
            win = select(cands)
            chosen = cands[win if win is not None else 0] if cands else Verdict("no code")
            row["correct"].append(float(win is not None and chosen.verdict == "passed"))
            row["answers"].append(chosen.verdict)
            row["keys"].append(chosen.signature if win is not None else None)
            row["pop"].append(sum(v.verdict == "passed" for v in cands) / len(cands) if cands else 0.0)
            row["texts"].append(r.final_texts[win or 0] if r.final_texts else "")
            row["extra"]["code"].append({
                "selected": win, "verdict": chosen.verdict, "program": cand_codes[win] if win is not None else None,
                "candidates": [{"verdict": v.verdict, "detail": v.detail, "tests": [asdict(t) for t in v.tests]}
                               for v in cands]})
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# loading: LiveCodeBench rows, our own JSONL, code:mini


def decode_tests(value) -> list:
    """A test list from LiveCodeBench's fields: a list, JSON text, or base64(zlib(JSON text or pickle of it)).
    Pickles are never unpickled: `_pickled_string` reads their opcodes and accepts one string only."""
    if isinstance(value, list):
        return value
    text = str(value).strip()
    if text.startswith("["):
        return json.loads(text)
    try:
        raw = base64.b64decode(text, validate=True)
        d = zlib.decompressobj()
        data = d.decompress(raw, MAX_DECODED_BYTES)
    except (ValueError, zlib.error) as e:
        raise ValueError(f"tests are neither JSON nor base64(zlib(...)): {e}") from None
    if d.unconsumed_tail:
        raise ValueError(f"compressed tests decompress to over {MAX_DECODED_BYTES} bytes; refused")
    return json.loads(_pickled_string(data) if data[:1] == b"\x80" else data)


_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"}
_FRAMING_OPS = {"PROTO", "FRAME", "MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT", "STOP"}


def _pickled_string(data: bytes) -> str:
    """The one string a pickle holds, read from its opcodes (pickletools.genops parses, it never unpickles); a
    pickle with anything else in it (a global, a call, a second object) is refused."""
    import pickletools

    strings = []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in _STRING_OPS:
                strings.append(arg)
            elif op.name not in _FRAMING_OPS:
                raise ValueError(f"refusing a pickle with opcode {op.name}: LiveCodeBench's files pickle one JSON "
                                 f"string, and unpickling anything else could run code")
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"private tests: {e}") from None
    if len(strings) != 1:
        raise ValueError(f"refusing a pickle with {len(strings)} strings: expected one JSON string")
    return strings[0]


def _lcb_test(t: dict, functional: bool, public: bool) -> CodeTest:
    if functional:
        return CodeTest([json.loads(line) for line in str(t["input"]).split("\n") if line.strip()],
                        json.loads(t["output"]), public)
    return CodeTest(str(t["input"]), str(t["output"]), public)


def _json_field(value):
    return json.loads(value) if isinstance(value, str) and value.strip() else (value or {})


def _lcb_item(row: dict) -> Item:
    meta = _json_field(row.get("metadata"))
    func = meta.get("func_name") if isinstance(meta, dict) else None
    tests = ([_lcb_test(t, func is not None, True) for t in decode_tests(row["public_test_cases"])]
             + [_lcb_test(t, func is not None, False) for t in decode_tests(row.get("private_test_cases") or "[]")])
    starter = (row.get("starter_code") or "").strip()
    head = f"{row.get('question_title', '')}\n\n".lstrip() + str(row["question_content"]).strip()
    if func is not None:
        fmt = (f"Complete this starter code (keep the class and method names):\n```python\n{starter}\n```"
               if starter else f"Write a Python 3 function `{func}`.")
    else:
        fmt = ("Write a Python 3 program that reads the input from standard input and writes the answer to "
               "standard output (standard library only).")
    date = str(row.get("contest_date") or "")[:10] or None
    task = CodeTask(tests, func, row.get("difficulty"), date, row.get("platform"))
    pid = str(row.get("question_id") or row.get("question_title"))
    return Item(pid, f"{head}\n\n{fmt}\n\n{ANSWER_FORMAT}", "", code=task)


def _own_item(row: dict) -> Item:
    entry = row.get("entry_point")
    functional = entry is not None

    def tests(key, public):
        out = []
        for t in row.get(key) or []:
            if functional and not isinstance(t.get("input"), list):
                raise ValueError(f"{key}: a functional test's input is the argument list, got {t.get('input')!r}")
            out.append(CodeTest(t["input"] if functional else str(t["input"]),
                                t["output"] if functional else str(t["output"]), public))
        return out

    task = CodeTask(tests("public_tests", True) + tests("tests", False), entry, row.get("difficulty"),
                    str(row["date"])[:10] if row.get("date") else None)
    fmt = (f"Write a Python 3 function `{entry}` (standard library only)." if functional else
           "Write a Python 3 program that reads standard input and writes the answer to standard output "
           "(standard library only).")
    return Item(str(row.get("id", "")), f"{str(row['prompt']).strip()}\n\n{fmt}\n\n{ANSWER_FORMAT}",
                str(row.get("solution", "")), code=task)


def code_layout(row: dict) -> str | None:
    """'livecodebench' or 'own' when a row has that layout's fields, else None."""
    if "question_content" in row and "public_test_cases" in row:
        return "livecodebench"
    if "prompt" in row and "tests" in row:
        return "own"
    return None


def load(spec: str, task: str = "auto", question_field: str | None = None, answer_field: str = "answer",
         id_field: str = "id", split: str = "test", limit: int | None = None) -> list[Item]:
    """Items of any benchmark: `code:mini`, a code file or dataset (`task` "code", or "auto" when the first row has a
    code layout), else `evaluate.load_benchmark`'s answer-scored items (`task` "answer" or "auto")."""
    if task not in ("auto", "answer", "code"):
        raise ValueError(f"--task must be auto, answer or code, not {task!r}")
    if spec == "code:mini":
        return mini_benchmark()[:limit]
    if spec.startswith("code:"):
        raise ValueError(f"unknown code suite {spec!r}; built-in: code:mini")
    if spec in SUITES or spec.startswith("envs:") or task == "answer":
        if task == "code":
            raise ValueError(f"{spec} is an answer-scored suite, not a code benchmark")
        return load_benchmark(spec, question_field, answer_field, id_field, split, limit)
    rows = read_rows(spec, split)
    if task == "code" or rows and code_layout(rows[0]):
        return load_rows(rows, spec)[:limit]
    return rows_to_items(rows, spec, question_field, answer_field, id_field)[:limit]


def load_rows(rows: list[dict], source: str) -> list[Item]:
    """Items of code rows (LiveCodeBench's layout or ours; either, row by row)."""
    items = []
    for i, row in enumerate(rows):
        layout = code_layout(row)
        if layout is None:
            raise ValueError(f"{source} row {i}: not a code problem: LiveCodeBench rows have question_content and "
                             f"public_test_cases, ours prompt and tests (fields: {sorted(row)})")
        try:
            it = (_lcb_item if layout == "livecodebench" else _own_item)(row)
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"{source} row {i}: {type(e).__name__}: {e}") from None
        if not it.code.tests:
            raise ValueError(f"{source} row {i}: no tests")
        it.id = it.id.replace("/", "_") or str(i)
        items.append(it)
    if len({it.id for it in items}) != len(items):
        raise ValueError(f"{source}: duplicate ids")
    return items


def in_window(items: list, start: str | None = None, end: str | None = None) -> list:
    """Items whose contest date lies in [start, end] (YYYY-MM-DD, either open), LiveCodeBench's release windows;
    items without a date are dropped once a bound is given."""
    if start is None and end is None:
        return items
    check_date("--start-date", start), check_date("--end-date", end)
    kept = [it for it in items if it.code is not None and it.code.date
            and (start is None or it.code.date >= start) and (end is None or it.code.date <= end)]
    if not kept:
        raise ValueError(f"no problem dated within --start-date {start} / --end-date {end}")
    return kept


def check_date(flag: str, value: str | None) -> None:
    if value is not None and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        raise ValueError(f"{flag} takes a date as YYYY-MM-DD, got {value!r}")


MINI_PUBLIC, MINI_HIDDEN = 3, 7
DIFFICULTY = {1: "easy", 2: "medium", 3: "hard"}


def mini_benchmark(seed: int = 0) -> list[Item]:
    """`code:mini`: one problem per seed program of openzaya/envs/code.py, reproducible from `seed`."""
    from .envs.code import PROGRAMS, reference_program

    items = []
    for name, *_ in PROGRAMS:
        rng = random.Random(f"code:mini:{seed}:{name}")
        src, complexity, public = reference_program(name, rng, 0, MINI_PUBLIC)
        hidden = reference_program(name, rng, 2, MINI_HIDDEN)[2]
        ns: dict = {}
        exec(src, ns)    # our own reference source, not model output
        values = [json.loads(json.dumps(ns[name](*copy.deepcopy(a)))) for a in public + hidden]
        sig = src.split("\n", 1)[0].removeprefix("def ").rstrip(":")
        doc = ns[name].__doc__
        stdin = rng.random() < 1 / 3
        if stdin:
            tests = [CodeTest("".join(json.dumps(x) + "\n" for x in a), json.dumps(v) + "\n", i < MINI_PUBLIC)
                     for i, (a, v) in enumerate(zip(public + hidden, values))]
            shown = "\n\n".join(f"Input:\n{t.input.rstrip()}\nOutput:\n{t.output.rstrip()}"
                                for t in tests[:MINI_PUBLIC])
            prompt = (f"Write a Python 3 program that reads the arguments of `{sig}` from standard input, one JSON "
                      f"value per line, and prints `json.dumps` of the result, where `{name}` is: {doc}\n\n"
                      f"Examples:\n\n{shown}")
            solution = (src + "\n\nimport json, sys\nargs = [json.loads(line) for line in sys.stdin.read()"
                        f".splitlines() if line.strip()]\nprint(json.dumps({name}(*args)))\n")
        else:
            tests = [CodeTest(a, v, i < MINI_PUBLIC) for i, (a, v) in enumerate(zip(public + hidden, values))]
            shown = "\n".join(f"{name}({', '.join(repr(x) for x in a)}) == {v!r}"
                              for a, v in zip(public, values[:MINI_PUBLIC]))
            prompt = f"Write a Python 3 function `{sig}`: {doc}\n\nExamples:\n{shown}"
            solution = src
        task = CodeTask(tests, None if stdin else name, DIFFICULTY[complexity])
        items.append(Item(f"{name}-{'stdin' if stdin else 'call'}", f"{prompt}\n\n{ANSWER_FORMAT}", solution,
                          code=task))
    return items


def code_template_file(out_dir: str | os.PathLike) -> str:
    """CODE_AGGREGATION_TEMPLATE written into out_dir (TTCConfig.template_file is a path)."""
    path = Path(out_dir) / "code_aggregation_template.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(CODE_AGGREGATION_TEMPLATE)
    return str(path)


# ---------------------------------------------------------------------------------------------------------------------
# evaluating and reporting


def evaluate_code(items: list, backend, base, methods: list[str], lim: CodeLimits, samples: int = 1,
                  out_dir: str | os.PathLike | None = None, match_calls: bool = True, task: str = "code",
                  run_config: dict | None = None, cutoff_date: str | None = None) -> dict:
    """`evaluate.evaluate` with the sandbox judge; adds results["code"] (verdict histograms, splits by difficulty,
    contest month and the cutoff window, sandbox throughput) to results.json and a section to report.md."""
    from dataclasses import replace

    lim.validate()
    check_date("--cutoff-date", cutoff_date)
    if base.template_file is None and out_dir:
        base = replace(base, template_file=code_template_file(out_dir))
    stats: dict[str, dict] = {}

    def judge(method, its, runs_by_item):
        stats[method] = {}
        return judge_code(method, its, runs_by_item, lim, stats[method])

    res = evaluate(items, backend, base, methods, samples=samples, out_dir=out_dir, match_calls=match_calls,
                   task=task, run_config={**(run_config or {}), "test_limits": asdict(lim)}, judge=judge)
    res["code"] = code_summary(res, items, stats, lim, cutoff_date)
    if out_dir:
        (Path(out_dir) / "results.json").write_text(json.dumps(res, indent=1))
        report = Path(out_dir) / "report.md"
        report.write_text(report.read_text() + "\n" + "\n".join(code_report(res)) + "\n")
    return res


def _split(rows: list[dict], groups: list[str], k: int) -> dict:
    out = {}
    for g in sorted(set(groups)):
        sel = [r for r, x in zip(rows, groups) if x == g]
        out[g] = {"n": len(sel), **{key: sum(r[key] for r in sel) / len(sel) for key in ("avg@k", f"pass@{k}",
                                                                                         "pop_mean")},
                  "stderr": {key: mean_se([r[key] for r in sel]) for key in ("avg@k", f"pass@{k}", "pop_mean")}}
    return out


def _pass_curve(rows: list[dict], n: int) -> dict:
    """Unbiased pass@k (Chen et al.) with its standard error over problems, k = 1, 2, 4, ... and LiveCodeBench's 5
    and 10, up to the n runs of each problem."""
    ks = sorted({k for k in [2 ** i for i in range(n.bit_length())] + [5, 10, n] if 1 <= k <= n})
    passed = [sum(r["verdict"] == "passed" for r in row["code"]) for row in rows]
    return {str(k): {"value": sum(pass_at_k(n, c, k) for c in passed) / len(passed),
                     "stderr": mean_se([pass_at_k(n, c, k) for c in passed])} for k in ks}


def code_summary(res: dict, items: list, stats: dict, lim: CodeLimits, cutoff_date: str | None = None) -> dict:
    """Per method: the verdict of every run's program and of every final candidate, the splits, the throughput."""
    k = res["samples"]
    groups = {"difficulty": [it.code.difficulty or "unknown" for it in items],
              "contest_month": [(it.code.date or "unknown")[:7] for it in items]}
    if cutoff_date:
        groups["window"] = ["undated" if not it.code.date else f"before {cutoff_date}" if it.code.date < cutoff_date
                            else f"from {cutoff_date}" for it in items]
    out = {"selection_rule": SELECTION_RULE, "test_limits": asdict(lim), "methods": {}}
    for m in res["methods"]:
        rows = [p["methods"][m] for p in res["problems"]]
        runs = [r for row in rows for r in row["code"]]
        s = stats.get(m, {})
        out["methods"][m] = {
            "verdicts": {v: sum(r["verdict"] == v for r in runs) for v in VERDICTS},
            "population_verdicts": {v: sum(c["verdict"] == v for r in runs for c in r["candidates"])
                                    for v in VERDICTS},
            "pass@k": _pass_curve(rows, k),
            **{f"by_{g}": _split(rows, vals, k) for g, vals in groups.items()},
            "sandbox": {**s, "tests_per_s": s["tests_run"] / s["wall_s"] if s.get("wall_s") else None}}
    return out


def code_report(res: dict) -> list[str]:
    """The code section of report.md."""
    k, code = res["samples"], res["code"]
    lim = code["test_limits"]
    lines = ["## Code", "", f"Per test: {lim['time_s']} s CPU, {lim['memory_mb']} MiB, one sandbox each; "
             f"{lim['workers']} in parallel. Selection rule for populations: {code['selection_rule']}.", "",
             "| method | " + " | ".join(VERDICTS) + " | tests run | tests/s |", "|---|" + "---|" * (len(VERDICTS) + 2)]
    curves = ["", "| method | unbiased pass@k over the runs' programs |", "|---|---|"]
    for m, r in code["methods"].items():
        sb = r["sandbox"]
        tps = "-" if sb.get("tests_per_s") is None else f"{sb['tests_per_s']:.1f}"
        lines.append(f"| {m} | " + " | ".join(str(r["verdicts"][v]) for v in VERDICTS)
                     + f" | {sb.get('tests_run', 0)} | {tps} |")
        curves.append(f"| {m} | " + ", ".join(f"pass@{kk} {x['value']:.3f} ± {x['stderr']:.3f}"
                                               for kk, x in r["pass@k"].items()) + " |")
        if sum(r["population_verdicts"].values()) != sum(r["verdicts"].values()):
            lines.append(f"| {m} (all final candidates) | "
                         + " | ".join(str(r["population_verdicts"][v]) for v in VERDICTS) + " | | |")
    lines += curves
    for m, r in code["methods"].items():
        for g in [key for key in r if key.startswith("by_")]:
            lines += ["", f"### {m} by {g[3:].replace('_', ' ')}", "",
                      f"| {g[3:]} | problems | pass@1 (avg@{k}) | pass@{k} | pop_mean |", "|---|---|---|---|---|"]
            lines += [f"| {v} | {s['n']} | " + " | ".join(f"{s[key]:.3f} ± {s['stderr'][key]:.3f}"
                                                      for key in ("avg@k", f"pass@{k}", "pop_mean")) + " |"
                      for v, s in r[g].items()]
    return lines


def verdict_line(r: dict) -> str:
    """One printed line: the verdict histogram of a method's run programs."""
    return ", ".join(f"{v} {n}" for v, n in r["verdicts"].items() if n)

