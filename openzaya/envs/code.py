"""Code environments from a seed set of small Python programs (spec: environments.md §7, ZAYA1 stage 3 code RL).

Four task types, all binary-verified, all running programs only in `openzaya.sandbox`:

- `output`: CodeI/O output prediction: given a program and a call, predict the returned value.
- `input`: inverse input prediction: given a program and a value, give arguments for which it returns that value;
  any such arguments pass (checked by running the program on them). Arguments must match the reference's types.
- `reconstruct`: CodeARC-style: given input/output examples, write the function; it must pass hidden tests.
- `falsify`: given a reference and a buggy implementation (an AST mutation of it, e.g. `<` -> `<=`, `+` -> `-`,
  a constant off by one), give arguments on which they disagree; valid arguments only (the reference must not
  raise), and any disagreement passes (a different value or an exception in the buggy version).

Environments: `code/<task>` over all programs (difficulty = program complexity and input size) and
`code/<task>/<program>` per program (difficulty = input size): 4 + 4 x len(PROGRAMS).

Answers: values and argument lists are Python literals (JSON accepted) in \\boxed{} or <answer>; code answers are a
function definition in \\boxed{} or <answer> (a ```python fence inside is stripped). Problem.answer is always a
reference that passes its own check, so `openzaya envs check` can box it: the reference value, the reference
arguments, or the reference program's source (our programs keep braces balanced so they survive \\boxed{}).
Generation runs the reference in the sandbox to get outputs; generated problems are cached per process.
"""

from __future__ import annotations

import ast
import functools
import json
import random
import re

from openzaya.envs.base import Env, Problem, Score, extract_answer
from openzaya.sandbox import Limits, call_function, results_equal

RUN_LIMITS = Limits(wall_s=10, cpu_s=4)
MAX_LEVEL = 5
TASKS = ("output", "input", "reconstruct", "falsify")


# ---------------------------------------------------------------------------------------------------------------
# the seed programs: (name, complexity 1..3, source, input generator(rng, n) -> argument list)

def _ints(rng, n, lo=-20, hi=20):
    return [rng.randint(lo, hi) for _ in range(n)]


def _word(rng, n, alphabet="abcde"):
    return "".join(rng.choice(alphabet) for _ in range(n))


PROGRAMS: list[tuple[str, int, str, object]] = [
    ("sum_evens", 1, '''def sum_evens(xs):
    """Sum of the even numbers in xs."""
    return sum(x for x in xs if x % 2 == 0)
''', lambda r, n: [_ints(r, n)]),
    ("count_vowels", 1, '''def count_vowels(s):
    """Number of vowels in s."""
    return sum(1 for c in s if c in "aeiou")
''', lambda r, n: [_word(r, n + 2, "abcdeiou")]),
    ("reverse_words", 1, '''def reverse_words(s):
    """The words of s in reverse order, joined by single spaces."""
    return " ".join(reversed(s.split()))
''', lambda r, n: [" ".join(_word(r, r.randint(1, 4)) for _ in range(n))]),
    ("max_minus_min", 1, '''def max_minus_min(xs):
    """Largest element minus smallest element."""
    return max(xs) - min(xs)
''', lambda r, n: [_ints(r, n + 1)]),
    ("digit_sum", 1, '''def digit_sum(n):
    """Sum of the decimal digits of abs(n)."""
    return sum(int(d) for d in str(abs(n)))
''', lambda r, n: [r.randint(-10 ** (n + 1), 10 ** (n + 1))]),
    ("clamp_all", 1, '''def clamp_all(xs, lo, hi):
    """Each element clamped into [lo, hi]."""
    return [min(max(x, lo), hi) for x in xs]
''', lambda r, n: [_ints(r, n), r.randint(-10, 0), r.randint(1, 10)]),
    ("is_palindrome", 1, '''def is_palindrome(s):
    """Whether s reads the same backwards, ignoring case."""
    t = s.lower()
    return t == t[::-1]
''', lambda r, n: [(lambda w: w + (w[::-1] if r.random() < 0.5 else _word(r, len(w), "abAB")))(_word(r, n, "abAB"))]),
    ("count_above_mean", 1, '''def count_above_mean(xs):
    """How many elements are strictly greater than the mean."""
    m = sum(xs) / len(xs)
    return len([x for x in xs if x > m])
''', lambda r, n: [_ints(r, n + 1)]),
    ("running_max", 1, '''def running_max(xs):
    """Prefix maxima of xs."""
    out = []
    best = None
    for x in xs:
        if best is None or x > best:
            best = x
        out.append(best)
    return out
''', lambda r, n: [_ints(r, n)]),
    ("caesar", 1, '''def caesar(s, k):
    """Shift lowercase letters of s by k places, wrapping around; other characters unchanged."""
    out = ""
    for c in s:
        if "a" <= c <= "z":
            out += chr((ord(c) - 97 + k) % 26 + 97)
        else:
            out += c
    return out
''', lambda r, n: [_word(r, n + 2, "abcxyz "), r.randint(1, 25)]),
    ("pairwise_diffs", 1, '''def pairwise_diffs(xs):
    """Differences between consecutive elements."""
    return [xs[i + 1] - xs[i] for i in range(len(xs) - 1)]
''', lambda r, n: [_ints(r, n + 1)]),
    ("count_char_runs", 2, '''def count_char_runs(s):
    """Number of maximal runs of equal characters."""
    runs = 0
    for i in range(len(s)):
        if i == 0 or s[i] != s[i - 1]:
            runs += 1
    return runs
''', lambda r, n: [_word(r, n + 2, "aab")]),
    ("run_length", 2, '''def run_length(s):
    """Run-length encoding as a list of [char, count] pairs."""
    out = []
    for c in s:
        if out and out[-1][0] == c:
            out[-1][1] += 1
        else:
            out.append([c, 1])
    return out
''', lambda r, n: [_word(r, n + 2, "aab")]),
    ("second_largest", 2, '''def second_largest(xs):
    """The second largest distinct value, or None when there is none."""
    vals = sorted(set(xs))
    if len(vals) < 2:
        return None
    return vals[-2]
''', lambda r, n: [_ints(r, n + 1, -5, 5)]),
    ("collatz_steps", 2, '''def collatz_steps(n):
    """Steps of the Collatz map until n reaches 1."""
    steps = 0
    while n > 1:
        if n % 2 == 0:
            n = n // 2
        else:
            n = 3 * n + 1
        steps += 1
    return steps
''', lambda r, n: [r.randint(1, 10 * n + 10)]),
    ("gcd_list", 2, '''def gcd_list(xs):
    """Greatest common divisor of all elements (Euclid)."""
    g = 0
    for x in xs:
        a, b = abs(g), abs(x)
        while b:
            a, b = b, a % b
        g = a
    return g
''', lambda r, n: (lambda k: [[k * r.randint(1, 12) for _ in range(n + 1)]])(r.randint(1, 9))),
    ("binary_search", 2, '''def binary_search(xs, target):
    """Index of target in sorted xs, or -1."""
    lo, hi = 0, len(xs) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        if xs[mid] == target:
            return mid
        if xs[mid] < target:
            lo = mid + 1
        else:
            hi = mid - 1
    return -1
''', lambda r, n: (lambda xs: [xs, r.choice(xs + [r.randint(-60, 60)])])(sorted(r.sample(range(-50, 50), n + 1)))),
    ("word_lengths", 2, '''def word_lengths(s):
    """Map each distinct word to its length, as a sorted list of [word, length]."""
    seen = dict()
    for w in s.split():
        seen[w] = len(w)
    return sorted([k, v] for k, v in seen.items())
''', lambda r, n: [" ".join(_word(r, r.randint(1, 5)) for _ in range(n))]),
    ("merge_sorted", 2, '''def merge_sorted(a, b):
    """Merge two sorted lists."""
    i = j = 0
    out = []
    while i < len(a) and j < len(b):
        if a[i] <= b[j]:
            out.append(a[i])
            i += 1
        else:
            out.append(b[j])
            j += 1
    return out + a[i:] + b[j:]
''', lambda r, n: [sorted(_ints(r, n)), sorted(_ints(r, n // 2 + 1))]),
    ("prime_factors", 2, '''def prime_factors(n):
    """Prime factors of n > 1 with multiplicity, ascending."""
    out = []
    d = 2
    while d * d <= n:
        while n % d == 0:
            out.append(d)
            n //= d
        d += 1
    if n > 1:
        out.append(n)
    return out
''', lambda r, n: [r.randint(2, 50 * n + 50)]),
    ("rotate_left", 2, '''def rotate_left(xs, k):
    """xs rotated left by k positions."""
    if not xs:
        return xs
    k = k % len(xs)
    return xs[k:] + xs[:k]
''', lambda r, n: [_ints(r, n + 1), r.randint(0, 2 * n + 2)]),
    ("balanced_parens", 2, '''def balanced_parens(s):
    """Whether the round brackets in s are balanced."""
    depth = 0
    for c in s:
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth < 0:
                return False
    return depth == 0
''', lambda r, n: [_word(r, 2 * n + 2, "(()x")]),
    ("max_subarray", 3, '''def max_subarray(xs):
    """Largest sum of a non-empty contiguous subarray (Kadane)."""
    best = cur = xs[0]
    for x in xs[1:]:
        cur = max(x, cur + x)
        best = max(best, cur)
    return best
''', lambda r, n: [_ints(r, n + 1)]),
    ("longest_increasing_run", 3, '''def longest_increasing_run(xs):
    """Length of the longest strictly increasing contiguous run."""
    best = cur = 1
    for i in range(1, len(xs)):
        if xs[i] > xs[i - 1]:
            cur += 1
        else:
            cur = 1
        best = max(best, cur)
    return best
''', lambda r, n: [_ints(r, n + 1, 0, 9)]),
    ("lis_length", 3, '''def lis_length(xs):
    """Length of the longest strictly increasing subsequence (O(n^2) DP)."""
    dp = [1] * len(xs)
    for i in range(len(xs)):
        for j in range(i):
            if xs[j] < xs[i]:
                dp[i] = max(dp[i], dp[j] + 1)
    return max(dp) if dp else 0
''', lambda r, n: [_ints(r, n + 1, 0, 15)]),
    ("edit_distance", 3, '''def edit_distance(a, b):
    """Levenshtein distance between a and b."""
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
        prev = cur
    return prev[-1]
''', lambda r, n: [_word(r, n, "abc"), _word(r, n + 1, "abc")]),
    ("coin_change_ways", 3, '''def coin_change_ways(coins, total):
    """Number of ways to make total from unlimited coins (order ignored)."""
    ways = [1] + [0] * total
    for c in coins:
        for t in range(c, total + 1):
            ways[t] += ways[t - c]
    return ways[total]
''', lambda r, n: [sorted(r.sample(range(1, 10), 3)), r.randint(0, 5 * n + 5)]),
    ("matrix_transpose", 3, '''def matrix_transpose(m):
    """Transpose of a rectangular matrix given as a list of rows."""
    return [[row[j] for row in m] for j in range(len(m[0]))]
''', lambda r, n: (lambda c: [[_ints(r, c, 0, 9) for _ in range(r.randint(1, n + 1))]])(r.randint(1, n + 1))),
    ("spiral_order", 3, '''def spiral_order(m):
    """Elements of a matrix in clockwise spiral order."""
    out = []
    top, bottom, left, right = 0, len(m) - 1, 0, len(m[0]) - 1
    while top <= bottom and left <= right:
        for j in range(left, right + 1):
            out.append(m[top][j])
        for i in range(top + 1, bottom + 1):
            out.append(m[i][right])
        if top < bottom and left < right:
            for j in range(right - 1, left - 1, -1):
                out.append(m[bottom][j])
            for i in range(bottom - 1, top, -1):
                out.append(m[i][left])
        top, bottom, left, right = top + 1, bottom - 1, left + 1, right - 1
    return out
''', lambda r, n: (lambda c: [[_ints(r, c, 0, 9) for _ in range(r.randint(1, n // 2 + 2))]])(r.randint(1, n // 2 + 2))),
    ("top_k_frequent", 3, '''def top_k_frequent(xs, k):
    """The k most frequent values, ties broken by smaller value first."""
    counts = dict()
    for x in xs:
        counts[x] = counts.get(x, 0) + 1
    order = sorted(counts, key=lambda v: (-counts[v], v))
    return order[:k]
''', lambda r, n: [_ints(r, n + 2, 0, 5), r.randint(1, 3)]),
    ("bracket_depths", 3, '''def bracket_depths(s):
    """Maximum nesting depth of each top-level bracket group in s, or [] if s is unbalanced."""
    out, depth, best = [], 0, 0
    for c in s:
        if c == "(":
            depth += 1
            best = max(best, depth)
        elif c == ")":
            depth -= 1
            if depth < 0:
                return []
            if depth == 0:
                out.append(best)
                best = 0
    return out if depth == 0 else []
''', lambda r, n: ["".join(r.choice(["()", "(())", "(()())", "((()))"]) for _ in range(n // 2 + 1))]),
    ("knapsack_01", 3, '''def knapsack_01(weights, values, cap):
    """Best total value of items with total weight at most cap, each item used at most once."""
    best = [0] * (cap + 1)
    for w, v in zip(weights, values):
        for c in range(cap, w - 1, -1):
            best[c] = max(best[c], best[c - w] + v)
    return best[cap]
''', lambda r, n: [_ints(r, n + 1, 1, 9), _ints(r, n + 1, 1, 20), r.randint(1, 4 * n + 4)]),
    ("count_islands", 3, '''def count_islands(grid):
    """Number of 4-connected groups of 1s in a 0/1 grid."""
    rows, cols = len(grid), len(grid[0])
    seen = set()
    count = 0
    for i in range(rows):
        for j in range(cols):
            if grid[i][j] == 1 and (i, j) not in seen:
                count += 1
                stack = [(i, j)]
                seen.add((i, j))
                while stack:
                    a, b = stack.pop()
                    for da, db in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                        x, y = a + da, b + db
                        if 0 <= x < rows and 0 <= y < cols and grid[x][y] == 1 and (x, y) not in seen:
                            seen.add((x, y))
                            stack.append((x, y))
    return count
''', lambda r, n: (lambda c: [[[r.randint(0, 1) for _ in range(c)] for _ in range(n // 2 + 2)]])(n // 2 + 2)),
]
_BY_NAME = {p[0]: p for p in PROGRAMS}


# ---------------------------------------------------------------------------------------------------------------
# helpers


def _parse_literal(text: str):
    """A Python literal (or JSON) from a model answer; raises ValueError when it is neither."""
    t = text.strip().strip("`").strip()
    try:
        return ast.literal_eval(t)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    try:
        return json.loads(t)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"not a literal: {t[:60]!r}") from e


def _strip_fence(code: str) -> str:
    m = re.search(r"```(?:python)?\s*\n(.*?)```", code, flags=re.DOTALL)
    return (m.group(1) if m else code).strip() + "\n"


def _call(src: str, name: str, inputs: list[list]) -> list | None:
    """[["ok", value] | ["error", msg]] per input, from one sandbox run; None when the run failed."""
    results, run = call_function(src, name, inputs, limits=RUN_LIMITS)
    if results is None and run.killed_reason == "timeout":   # a loaded machine: one retry before giving up
        results, _ = call_function(src, name, inputs, limits=RUN_LIMITS)
    return results


def _same_shape(ref, got) -> bool:
    """Arguments of the same types as the reference's (ints, strings, lists of them), recursively."""
    if isinstance(ref, bool) or isinstance(got, bool):
        return type(ref) is type(got)
    if isinstance(ref, (list, tuple)):
        return isinstance(got, (list, tuple)) and all(_same_shape(ref[0], g) for g in got) if ref else \
            isinstance(got, (list, tuple))
    return type(ref) is type(got)


class _Mutate(ast.NodeTransformer):
    """Apply the k-th applicable mutation (comparison flip, arithmetic swap, constant off by one)."""
    FLIP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
            ast.NotEq: ast.Eq}
    ARITH = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.FloorDiv: ast.Mult, ast.Mod: ast.FloorDiv, ast.Mult: ast.Add}

    def __init__(self, k: int):
        self.k, self.i, self.done = k, 0, ""

    def _hit(self) -> bool:
        self.i += 1
        return self.i - 1 == self.k

    def visit_Compare(self, node):
        self.generic_visit(node)
        if type(node.ops[0]) in self.FLIP and self._hit():
            node.ops[0] = self.FLIP[type(node.ops[0])]()
            self.done = "comparison"
        return node

    def visit_BinOp(self, node):
        self.generic_visit(node)
        if type(node.op) in self.ARITH and self._hit():
            node.op = self.ARITH[type(node.op)]()
            self.done = "arithmetic"
        return node

    def visit_Constant(self, node):
        if type(node.value) is int and self._hit():
            self.done = "constant"
            return ast.copy_location(ast.Constant(node.value + 1), node)
        return node


def mutants(src: str, rng: random.Random) -> list[str]:
    """All single mutations of `src`, in a seed-dependent order, without the docstring (it would give them away)."""
    count = _Mutate(10 ** 9)
    count.visit(ast.parse(src))
    ks = list(range(count.i))
    rng.shuffle(ks)
    out = []
    for k in ks:
        tree = ast.parse(src)
        fn = tree.body[0]
        if isinstance(fn.body[0], ast.Expr) and isinstance(getattr(fn.body[0], "value", None), ast.Constant):
            fn.body = fn.body[1:]
        m = _Mutate(k)
        tree = m.visit(tree)
        if m.done:
            out.append(ast.unparse(tree) + "\n")
    return out


# ---------------------------------------------------------------------------------------------------------------
# generation per task type


def _inputs(gen, rng: random.Random, level: int, count: int) -> list[list]:
    n = 2 + 2 * level
    return [gen(rng, n) for _ in range(count)]


def reference_program(name: str, rng: random.Random, level: int, count: int) -> tuple[str, int, list[list]]:
    """(source, complexity 1..3, `count` argument lists at input level `level`) of the seed program `name`: the
    reference solutions and test inputs of the offline code benchmark (`code:mini`, openzaya/codebench.py)."""
    _, complexity, src, gen = _BY_NAME[name]
    return src, complexity, _inputs(gen, rng, level, count)


def _reference_value(prog, rng, level):
    """One random argument list for the program and what the reference implementation returns for it."""
    name, _, src, gen = prog
    args = _inputs(gen, rng, level, 1)[0]
    res = _call(src, name, [args])
    assert res and res[0][0] == "ok", f"reference failed on {args}: {res}"
    return args, res[0][1]


def _gen_output(prog, rng, level):
    name, _, src, _ = prog
    args, value = _reference_value(prog, rng, level)
    call = f"{name}({', '.join(repr(a) for a in args)})"
    prompt = (f"Here is a Python function:\n\n```python\n{src}```\n\nWhat does `{call}` return? "
              "Give the value as a Python literal.")
    return prompt, repr(value), {"task": "output", "program": name, "args": args, "expected": value}


def _gen_input(prog, rng, level):
    name, _, src, gen = prog
    args, value = _reference_value(prog, rng, level)
    # NOTE: the example shows the form with the reference arguments' types; it is not necessarily an answer
    example = _inputs(gen, random.Random(rng.random()), level, 1)[0]
    prompt = (f"Here is a Python function:\n\n```python\n{src}```\n\nGive arguments for which `{name}` returns "
              f"`{value!r}`. Answer with a Python list of the {len(args)} positional argument(s), e.g. "
              f"`{example!r}` has the right form.")
    return prompt, repr(args), {"task": "input", "program": name, "args": args, "expected": value}


def _gen_reconstruct(prog, rng, level):
    name, _, src, gen = prog
    inputs = _inputs(gen, rng, level, 12)
    res = _call(src, name, inputs)
    assert res and all(r[0] == "ok" for r in res), f"reference failed: {res}"
    shown, hidden = list(zip(inputs, res))[:4], list(zip(inputs, res))[4:]
    lines = "\n".join(f"{name}({', '.join(repr(a) for a in args)}) == {r[1]!r}" for args, r in shown)
    prompt = (f"Write a Python function `{name}` consistent with these examples (it will also be run on hidden "
              f"tests):\n\n{lines}\n\nGive the complete function definition (standard library only).")
    return prompt, src.strip(), {"task": "reconstruct", "program": name, "tests": [[a, r[1]] for a, r in hidden]
                                 + [[a, r[1]] for a, r in shown]}


def _gen_falsify(prog, rng, level):
    name, _, src, gen = prog
    inputs = _inputs(gen, rng, level, 24)
    for mutant in mutants(src, rng)[:12]:
        both = _both_src(src, mutant, name)
        res = _call(both, "_both", inputs)
        if not res:
            continue
        for args, r in zip(inputs, res):
            if r[0] == "ok" and _disagree(r[1]):
                prompt = (f"Reference implementation:\n\n```python\n{src}```\n\nCandidate implementation:\n\n"
                          f"```python\n{mutant}```\n\nFind arguments on which the candidate returns something "
                          f"different from the reference (or raises). Answer with a Python list of the "
                          f"{len(args)} positional argument(s), of the same types as the reference expects.")
                return prompt, repr(args), {"task": "falsify", "program": name, "mutant": mutant, "args": args}
    raise RuntimeError(f"no distinguishable mutant of {name} for this seed")


def _both_src(ref: str, mutant: str, name: str) -> str:
    return (f"import copy\n_ns_ref, _ns_mut = dict(), dict()\nexec({ref!r}, _ns_ref)\nexec({mutant!r}, _ns_mut)\n"
            f"def _both(*args):\n    out = []\n    for ns in (_ns_ref, _ns_mut):\n        try:\n"
            f"            out.append(['ok', ns[{name!r}](*copy.deepcopy(args))])\n"
            f"        except Exception as e:\n            out.append(['error', type(e).__name__])\n    return out\n")


def _disagree(pair) -> bool:
    (ref_status, ref_val), (mut_status, mut_val) = pair
    if ref_status != "ok":
        return False   # invalid input: the reference itself fails
    return mut_status != "ok" or not results_equal(ref_val, mut_val)


_GEN = {"output": _gen_output, "input": _gen_input, "reconstruct": _gen_reconstruct, "falsify": _gen_falsify}


# ---------------------------------------------------------------------------------------------------------------
# scoring


def score_code(problem: Problem, response: str) -> Score:
    pred = extract_answer(response)
    if pred is None or not pred.strip():
        return Score(0.0, 0.0, False, "no answer found")
    meta = problem.metadata
    name, _, src, _ = _BY_NAME[meta["program"]]
    task = meta["task"]
    if task == "reconstruct":
        code = _strip_fence(pred)
        tests = meta["tests"]
        res = _call(code, name, [a for a, _ in tests])
        if res is None:
            return Score(0.0, 0.0, True, "candidate did not run")
        passed = sum(r[0] == "ok" and results_equal(r[1], want) for r, (_, want) in zip(res, tests))
        ok = passed == len(tests)
        return Score(float(ok), float(ok), True, f"{passed}/{len(tests)} tests passed")
    try:
        value = _parse_literal(pred)
    except ValueError as e:
        return Score(0.0, 0.0, True, str(e))
    if task == "output":
        ok = results_equal(json.loads(json.dumps(value, default=list)) if _jsonable(value) else value,
                           meta["expected"])
        return Score(float(ok), float(ok), True, "" if ok else f"expected {problem.answer}")
    if not isinstance(value, (list, tuple)) or len(value) != len(meta["args"]) \
            or not all(_same_shape(r, g) for r, g in zip(meta["args"], value)):
        return Score(0.0, 0.0, True, "arguments of the wrong number or types")
    args = list(value)
    if task == "input":
        res = _call(src, name, [args])
        ok = bool(res) and res[0][0] == "ok" and results_equal(res[0][1], meta["expected"])
        return Score(float(ok), float(ok), True, "" if ok else f"returns {res[0] if res else 'nothing'}")
    res = _call(_both_src(src, meta["mutant"], name), "_both", [args])
    ok = bool(res) and res[0][0] == "ok" and _disagree(res[0][1])
    return Score(float(ok), float(ok), True, "" if ok else "no disagreement on these arguments")


def _jsonable(value) -> bool:
    try:
        json.dumps(value, default=list)
        return True
    except (TypeError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------------------------
# environments


def _pick(rng: random.Random, level: int) -> tuple:
    """Difficulty for the mixed environments: programs of complexity <= 1 + level // 2."""
    pool = [p for p in PROGRAMS if p[1] <= 1 + level // 2]
    return rng.choice(pool)


def _make_env(task: str, program: str | None) -> Env:
    env_name = f"code/{task}" + (f"/{program}" if program else "")

    @functools.lru_cache(maxsize=4096)
    def generate(difficulty: int, seed: int) -> Problem:
        rng = random.Random(f"{env_name}:{difficulty}:{seed}")
        level = difficulty if program else difficulty // 2 + (difficulty % 2) * 2
        for attempt in range(8):   # mixed envs: another program when this one yields no problem (falsify)
            prog = _BY_NAME[program] if program else _pick(rng, difficulty)
            try:
                prompt, answer, meta = _GEN[task](prog, rng, level)
                break
            except RuntimeError:
                if program or attempt == 7:
                    raise
        prompt += "\n\nPut your final answer in \\boxed{} (or between <answer> and </answer>)."
        return Problem(env=env_name, prompt=prompt, answer=answer, difficulty=difficulty, seed=seed, metadata=meta)

    return Env(name=env_name, tags=("code", task), min_difficulty=0, max_difficulty=MAX_LEVEL,
               generate_fn=generate, score_fn=score_code, source="code")


def load_code() -> dict[str, Env]:
    """4 mixed environments plus one per (task, program); falsification only for programs with >= 4 mutants."""
    envs = [_make_env(t, None) for t in TASKS]
    for t in TASKS:
        envs += [_make_env(t, p[0]) for p in PROGRAMS
                 if t != "falsify" or len(mutants(p[2], random.Random(0))) >= 4]
    return {e.name: e for e in envs}
