"""Math answer checking with math-verify, out of process and with wall-clock limits (spec: environments.md §8).

math-verify's own timeouts use SIGALRM, so they only work on a main thread, and a big-integer computation inside
sympy (`9^9^9^9`) holds the GIL where no signal handler can run. We therefore run every check in a small pool of
worker processes (plain `python -c` children talking JSON lines over pipes; each sends "ready" once math_verify is
imported) and give each call a wall-clock deadline; a worker that misses it is SIGKILLed and replaced. A timeout, a
crash or a parser error counts as wrong, with a reason. Nothing here raises on any string, and nothing hangs.
Workers die with their parent: each forks a small watchdog that blocks on a pipe only the parent process can hold
open and SIGKILLs the worker at EOF (the kernel closes it when the parent dies, SIGKILL included). Not
PR_SET_PDEATHSIG: it fires when the parent *thread* that started the worker exits, and pools are started from
worker threads.

In the parent, each answer is first prepared (linear time, answers over `MAX_INPUT_CHARS` refused):
- wrappers that never change the value are stripped: surrounding `$` and bold, `\\boxed{}` / `\\text{}`, a final
  period, whitespace, except whitespace between two digits, which makes the answer unparsable ("1 2" is not 12);
- a trailing percent sign is a unit and is dropped: `50\\%` == `50%` == `50`, and `50%` != `0.5` (math-verify
  alone says 50% == 0.5 and 50% == 50);
- a chain of powers is right-associative: `2^3^2` is rewritten `2^{3^{2}}` (512; math-verify reads (2^3)^2);
- a prediction with unbalanced brackets (`7}`, `(1,2`) or with words between two numbers (`7 apples but also 8`)
  is unparsable rather than read as its first number.
Then a fast path settles equal prepared strings and plain integers (`1,000` == `1000`, compared as digit strings:
no int conversion, no digit limit); everything else goes to math-verify.

`verify(gold, pred)` is not symmetric (spec §8.2): the gold answer always goes first.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import wait

from openzaya.envs.base import Problem, Score, extract_answer


@dataclass
class Verdict:
    correct: bool
    reason: str = ""


MAX_ANSWER_CHARS = 2000       # longer answers are refused without parsing (no sympy on megabyte strings)
MAX_INPUT_CHARS = 100_000     # longer answers are refused before any work at all (the fast path included)
WORKER_MEMORY_BYTES = 4 << 30   # RLIMIT_AS of a worker: a huge power fails with MemoryError instead of swapping
MAX_NESTING = 24               # bracket depth; deeper answers are refused (sympy recursion, slow parses)
MAX_POWERS = 12                # '^' count; power towers are refused
STARTUP_TIMEOUT_S = 60.0        # a worker importing math_verify on a loaded machine; then it is restarted


# ---------------------------------------------------------------------------------------------------------------
# preparing answers, and the fast path


_INT_RE = re.compile(r"([+-]?)(\d+|\d{1,3}(?:,\d{3})+)")
_PERCENTS = ("\\%", "%", "\\text{%}", "\\text{\\%}", "\\text{ percent}", "\\text{percent}", "percent")
_DIGIT_SPACE_DIGIT = re.compile(r"\d\s+(?=\d)")
_COMMANDS = re.compile(r"\\(?:text|mathrm|textbf|operatorname)\s*\{[^{}]*\}|\\[A-Za-z]+|\b(?:sin|cos|tan|log|ln|exp|"
                       r"sqrt|pi|mod)\b")
_NUMBER_OR_WORD = re.compile(r"[\^_]\s*\d+|\d+|\s[A-Za-z]{2,}(?![A-Za-z])")   # an exponent, a number, a word


def _clean(ans: str) -> str:
    """Strip what never changes the value: surrounding $ and bold, \\boxed{}/\\text{}/\\mathrm{} wrappers, a final
    period, a trailing percent sign, whitespace (one space stays between two digits)."""
    a = ans.strip()
    for _ in range(3):
        a = a.strip().strip("$").strip()
        a = re.sub(r"^\*\*(.*)\*\*$", r"\1", a, flags=re.DOTALL)
        a = re.sub(r"^\\(?:boxed|text|mathrm|textbf)\{(.*)\}$", r"\1", a, flags=re.DOTALL)
    a = _drop_percent(a.rstrip(".").strip())
    a = _DIGIT_SPACE_DIGIT.sub(lambda m: m.group()[0] + "\x00", a)   # keep those spaces (as NUL while we strip)
    return re.sub(r"\s+", "", a).replace("\x00", " ")


def _drop_percent(a: str) -> str:
    """A trailing percent sign is a unit: dropped (50% == 50, and so 50% != 0.5)."""
    a = a.rstrip()
    for suffix in _PERCENTS:
        if a.endswith(suffix):
            return a[:-len(suffix)].rstrip()
    return a


def _int_key(a: str) -> str | None:
    """A canonical digit string for a plain integer ('-0012' -> '-12', '1,000' -> '1000'), None otherwise."""
    m = _INT_RE.fullmatch(a)
    if m is None:
        return None
    digits = m.group(2).replace(",", "").lstrip("0") or "0"
    return ("-" if m.group(1) == "-" and digits != "0" else "") + digits


def fast_check(gold: str, pred: str) -> Verdict | None:
    """A verdict for the obvious cases (equal strings, plain integers), None when math-verify must decide."""
    g, p = _clean(gold), _clean(pred)
    if g == p and g:
        return Verdict(True, "fast: equal strings")
    gk, pk = _int_key(g), _int_key(p)
    if gk is not None and pk is not None:
        ok = gk == pk
        return Verdict(ok, "fast: integers" + ("" if ok else f" {g[:40]} != {p[:40]}"))
    return None


def _balanced(a: str) -> bool:
    """Unescaped braces, escaped braces, and ( [ against ) ] (so that [1,2) is fine) each close what they opened."""
    depth = {"{": 0, "\\{": 0, "(": 0}
    for m in re.finditer(r"\\[{}]|[{}()\[\]]", a):
        t = m.group()
        key = {"}": "{", "\\}": "\\{", ")": "(", "]": "(", "[": "("}.get(t, t)
        depth[key] += 1 if t in ("{", "\\{", "(", "[") else -1
        if depth[key] < 0:
            return False
    return not any(depth.values())


def _unparsable(pred: str) -> str:
    """Why a prediction is ambiguous rather than a number (checked before math-verify reads its first number), or ''."""
    if " " in pred and _DIGIT_SPACE_DIGIT.search(pred):
        return "unparsable: a space inside a number"
    if not _balanced(pred):
        return "unparsable: unbalanced brackets"
    number = word = False
    for m in _NUMBER_OR_WORD.finditer(_COMMANDS.sub(" ", pred)):
        t = m.group()
        if t[0].isdigit():
            if word:
                return "unparsable: words between numbers"
            number = True
        elif t[0].isspace():
            word = number
    return ""


def _right_assoc(a: str) -> str:
    """Powers are right-associative: `2^3^2` -> `2^{3^{2}}` (math-verify would read (2^3)^2)."""
    out, i = [], 0
    while i < len(a):
        if a[i] != "^":
            out.append(a[i])
            i += 1
            continue
        ops, j = [], i
        while j < len(a) and a[j] == "^":   # the chain ^o1^o2...
            k = _operand_end(a, j + 1)
            ops.append(a[j + 1:k].strip())
            j = k
            while j < len(a) and a[j] == " ":
                j += 1
        if len(ops) == 1:
            out.append(a[i:j])
        else:
            inner = ops[-1]
            for o in reversed(ops[:-1]):
                inner = f"{o}^{{{inner}}}"
            out.append(f"^{{{inner}}}")
        i = j
    return "".join(out)


def _operand_end(a: str, i: int) -> int:
    """End of the power operand that starts at i: a {group}, a \\command (with its {groups}), a number, one char."""
    while i < len(a) and a[i] == " ":
        i += 1
    if i >= len(a):
        return i
    if a[i] == "{":
        depth = 0
        for k in range(i, len(a)):
            depth += (a[k] == "{") - (a[k] == "}")
            if depth == 0:
                return k + 1
        return len(a)
    if a[i] == "\\":
        k = i + 1
        while k < len(a) and a[k].isalpha():
            k += 1
        while k < len(a) and a[k] == "{":
            k = _operand_end(a, k)
        return max(k, i + 2)
    m = re.match(r"\d+(?:\.\d+)?", a[i:])
    return i + (m.end() if m else 1)


def _refuse(ans: str) -> str:
    """Why an answer is not worth a worker's time (no real answer is this long or this deeply nested), or ''."""
    if len(ans) > MAX_ANSWER_CHARS:
        return f"answer longer than {MAX_ANSWER_CHARS} chars"
    depth = deepest = 0
    for c in ans:
        depth += (c in "([{") - (c in ")]}")
        deepest = max(deepest, depth)
    if deepest > MAX_NESTING:
        return f"nesting deeper than {MAX_NESTING}"
    if ans.count("^") > MAX_POWERS:
        return f"more than {MAX_POWERS} powers"
    return ""


def prepare(gold: str, pred: str) -> tuple[Verdict | None, tuple[str, str]]:
    """(a verdict settled in the parent, or None) and the pair math-verify should see. Never raises."""
    try:
        if not isinstance(gold, str) or not isinstance(pred, str):
            return Verdict(False, "non-string answer"), ("", "")
        if len(gold) > MAX_INPUT_CHARS or len(pred) > MAX_INPUT_CHARS:
            return Verdict(False, f"answer longer than {MAX_INPUT_CHARS} chars"), ("", "")
        if (v := fast_check(gold, pred)) is not None:
            return v, ("", "")
        if (why := _refuse(pred) or _refuse(gold) or _unparsable(pred)):
            return Verdict(False, why), ("", "")
        return None, (_right_assoc(_drop_percent(gold.strip().rstrip("."))),
                      _right_assoc(_drop_percent(pred.strip().rstrip("."))))
    except Exception as e:   # noqa: BLE001  a bug of ours on some string must still give a verdict, not raise
        return Verdict(False, f"unparsable: {type(e).__name__}"), ("", "")


# ---------------------------------------------------------------------------------------------------------------
# worker side (runs in a child process, on its main thread)


def _verify_in_worker(gold: str, pred: str, timeout_s: float) -> tuple[bool, str]:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
    cfg = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    t = max(1, int(timeout_s))   # math-verify's SIGALRM timeouts take whole seconds; the parent's kill is the backstop
    gold_parsed = parse("\\boxed{" + gold + "}", extraction_config=cfg, parsing_timeout=t)
    if not gold_parsed:
        return False, "gold answer did not parse"
    pred_parsed = parse("\\boxed{" + pred + "}", extraction_config=cfg, parsing_timeout=t)
    if not pred_parsed:
        return False, "prediction did not parse"
    ok = verify(gold_parsed, pred_parsed, timeout_seconds=t)
    return bool(ok), "math-verify" + ("" if ok else f": {gold_parsed[0]} != {pred_parsed[0]}")


def _watch_parent(lifeline: int, parent: int) -> None:
    """Fork a watchdog that SIGKILLs this worker once the parent process is gone.

    The watchdog blocks reading `lifeline`, a pipe whose write end only the parent holds: the kernel closes it when
    the parent dies, however it dies, and the read returns EOF. A thread would not do: a big-integer computation in
    sympy holds the GIL. The watchdog itself dies with the worker (PR_SET_PDEATHSIG; the worker is one thread).
    """
    import ctypes
    worker = os.getpid()
    if os.fork() == 0:
        try:
            ctypes.CDLL(None).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
            if os.getppid() == worker:
                while os.read(lifeline, 1):
                    pass
                os.kill(worker, signal.SIGKILL)
        finally:
            os._exit(0)
    os.close(lifeline)
    if os.getppid() != parent:   # the parent died before we were ready to notice
        os._exit(0)


def _worker_main(lifeline: int, parent: int) -> None:
    """Serve JSON lines [gold, pred, timeout_s] -> [ok, reason] on stdin/stdout until EOF."""
    _watch_parent(lifeline, parent)
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_BYTES, WORKER_MEMORY_BYTES))
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)   # stray prints from sympy/latex2sympy must not corrupt the protocol
    import math_verify  # noqa: F401
    proto.write('"ready"\n')
    proto.flush()
    for line in sys.stdin:
        gold, pred, timeout_s = json.loads(line)
        try:
            ok, reason = _verify_in_worker(gold, pred, timeout_s)
        except BaseException as e:   # noqa: BLE001  MemoryError, RecursionError, sympy bugs: all mean "wrong"
            ok, reason = False, f"error: {type(e).__name__}: {e}"
        proto.write(json.dumps([ok, reason[:300]]) + "\n")
        proto.flush()


# ---------------------------------------------------------------------------------------------------------------
# parent side: a pool of killable workers


_LIFELINE: tuple[int, int, int] | None = None   # (read end, write end, pid of the process that holds the write end)


def _lifeline() -> int:
    """The read end of this process's lifeline pipe (see _watch_parent); a forked child makes its own."""
    global _LIFELINE
    if _LIFELINE is None or _LIFELINE[2] != os.getpid():
        _LIFELINE = (*os.pipe(), os.getpid())
    return _LIFELINE[0]


class _Worker:
    """One `python -c ...` child. Not multiprocessing: spawn/forkserver re-import the caller's __main__, which breaks
    flat scripts without an `if __name__ == '__main__'` guard."""

    def __init__(self):
        life = _lifeline()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", f"from openzaya.verify import _worker_main; _worker_main({life}, {os.getpid()})"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1,
            start_new_session=True, pass_fds=(life,))
        self.ready = False
        self.started = time.monotonic()

    def fileno(self) -> int:
        return self.proc.stdout.fileno()

    def send(self, gold: str, pred: str, timeout_s: float) -> None:
        self.proc.stdin.write(json.dumps([gold, pred, timeout_s]) + "\n")
        self.proc.stdin.flush()

    def recv(self):
        line = self.proc.stdout.readline()
        if not line:
            raise EOFError("worker exited")
        return json.loads(line)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


class MathPool:
    """N worker processes; `check_many` runs pairs in parallel with a per-pair wall-clock deadline.

    A worker that misses its deadline (or dies) is killed and replaced; the pair gets Verdict(False, 'timeout...').
    Deadlines start when a request is sent to a worker that has finished importing math_verify (a fresh worker
    takes a few seconds to start; that time is not charged to the answer). Calls from several threads are serialised.
    """

    def __init__(self, workers: int | None = None):
        self.n = workers or max(1, min(4, os.cpu_count() or 1))
        self.workers: list[_Worker] = []
        self.lock = threading.Lock()
        self.restarts = 0

    def _fill(self) -> list[_Worker]:
        fresh = [_Worker() for _ in range(self.n - len(self.workers))]
        self.workers += fresh
        return fresh

    def _replace(self, w: _Worker) -> None:
        w.kill()
        self.workers.remove(w)
        self.restarts += 1

    def check_many(self, pairs: list[tuple[str, str]], timeout_s: float = 5.0) -> list[Verdict]:
        out: list[Verdict | None] = [None] * len(pairs)
        todo = []
        pairs = list(pairs)
        for i, (gold, pred) in enumerate(pairs):
            out[i], pairs[i] = prepare(gold, pred)
            if out[i] is None:
                todo.append(i)
        if not todo:
            return out
        with self.lock:
            self._fill()
            queue = list(reversed(todo))
            busy: dict[_Worker, tuple[int, float]] = {}   # worker -> (pair index, deadline)
            idle = [w for w in self.workers if w.ready]
            starting = [w for w in self.workers if not w.ready]
            failed_starts = failed_sends = 0
            while queue or busy:
                while queue and idle:
                    w, i = idle.pop(), queue.pop()
                    try:
                        w.send(*pairs[i], timeout_s)
                        busy[w] = (i, time.monotonic() + timeout_s)
                        failed_sends = 0
                    except (BrokenPipeError, OSError):
                        self._replace(w)
                        queue.append(i)
                        failed_sends += 1
                        if failed_sends > 2 * self.n:   # workers start but cannot take a request: fail, don't loop
                            for j in queue:
                                out[j] = Verdict(False, "math-verify workers cannot take requests")
                            queue.clear()
                        else:
                            starting += self._fill()
                if not (busy or starting):      # the queue was failed just above
                    break
                now = time.monotonic()
                deadlines = [d for _, d in busy.values()] + [w.started + STARTUP_TIMEOUT_S for w in starting]
                ready = wait(list(busy) + starting, timeout=max(0.0, min(deadlines) - now))
                for w in list(starting):
                    if w in ready or time.monotonic() > w.started + STARTUP_TIMEOUT_S:
                        starting.remove(w)
                        try:
                            assert w in ready, "start-up timeout"
                            w.recv()
                            w.ready = True
                            idle.append(w)
                            failed_starts = 0
                        except (AssertionError, EOFError, OSError, ValueError):
                            self._replace(w)
                            failed_starts += 1
                            if failed_starts > 2 * self.n:   # cannot start workers at all: fail, don't hang
                                for j in queue:
                                    out[j] = Verdict(False, "math-verify workers failed to start")
                                queue.clear()
                            else:
                                starting += self._fill()
                for w in list(busy):
                    i, deadline = busy[w]
                    if w in ready:
                        try:
                            ok, reason = w.recv()
                            out[i] = Verdict(bool(ok), reason)
                            idle.append(w)
                        except (EOFError, OSError, ValueError):
                            out[i] = Verdict(False, "worker crashed")
                            self._replace(w)
                            starting += self._fill()
                        del busy[w]
                    elif time.monotonic() >= deadline:
                        out[i] = Verdict(False, f"timeout after {timeout_s:g}s")
                        self._replace(w)
                        starting += self._fill()
                        del busy[w]
        return out

    def close(self) -> None:
        with self.lock:
            for w in self.workers:
                w.kill()
            self.workers.clear()


_POOL: MathPool | None = None


def get_pool() -> MathPool:
    global _POOL
    if _POOL is None:
        _POOL = MathPool()
        atexit.register(_POOL.close)
    return _POOL


# ---------------------------------------------------------------------------------------------------------------
# public API


def check_many(pairs: list[tuple[str, str]], timeout_s: float = 5.0) -> list[Verdict]:
    """Verdicts for (gold, pred) pairs, checked in parallel; exactly one verdict per pair, in order."""
    out = get_pool().check_many(list(pairs), timeout_s)
    assert len(out) == len(pairs)
    return out


def check_math(gold: str, pred: str, timeout_s: float = 5.0) -> Verdict:
    """Is `pred` mathematically equal to `gold`? Never raises, returns within about timeout_s."""
    return check_many([(gold, pred)], timeout_s)[0]


def math_score(problem: Problem, response: str) -> Score:
    """An Env score_fn: the extracted answer (last \\boxed{} / <answer>) checked against problem.answer."""
    pred = extract_answer(response) if isinstance(response, str) else None
    if pred is None or not pred.strip():
        return Score(0.0, 0.0, False, "no answer found")
    v = check_math(problem.answer, pred)
    return Score(float(v.correct), float(v.correct), True, v.reason)
