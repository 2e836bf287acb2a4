"""Math answer checking with math-verify, out of process and with wall-clock limits (spec: environments.md §8).

math-verify's own timeouts use SIGALRM, so they only work on a main thread, and a big-integer computation inside
sympy (`9^9^9^9`) holds the GIL where no signal handler can run. We therefore run every check in a small pool of
worker processes (plain `python -c` children talking JSON lines over pipes; each sends "ready" once math_verify is
imported) and give each call a wall-clock deadline; a worker that misses it is SIGKILLed and replaced. A timeout, a crash or a parser
error counts as wrong, with a reason. Nothing here raises on model output, and nothing hangs.

Before a check reaches the pool, a fast path settles the easy cases in the parent: equal normalised strings
(bold `**73**`, `$...$`, `\\text{}`, spaces) and plain integers (`1,000` == `1000`).

`verify(gold, pred)` is not symmetric (spec §8.2): the gold answer always goes first.
"""

from __future__ import annotations

import atexit
import json
import os
import re
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
WORKER_MEMORY_BYTES = 4 << 30   # RLIMIT_AS of a worker: a huge power fails with MemoryError instead of swapping
MAX_NESTING = 24               # bracket depth; deeper answers are refused (sympy recursion, slow parses)
MAX_POWERS = 12                # '^' count; power towers are refused
STARTUP_TIMEOUT_S = 60.0        # a worker importing math_verify on a loaded machine; then it is restarted


# ---------------------------------------------------------------------------------------------------------------
# fast path


_INT_RE = re.compile(r"[+-]?(\d+|\d{1,3}(,\d{3})+)")


def _clean(ans: str) -> str:
    """Strip what never changes the value: surrounding $ and bold, \\text{}/\\mathrm{} wrappers, spaces, a final period."""
    a = ans.strip()
    for _ in range(3):
        a = a.strip().strip("$").strip()
        a = re.sub(r"^\*\*(.*)\*\*$", r"\1", a, flags=re.DOTALL)
        a = re.sub(r"^\\(?:boxed|text|mathrm|textbf)\{(.*)\}$", r"\1", a, flags=re.DOTALL)
    a = a.rstrip(".").strip()
    return re.sub(r"\s+", "", a)


def fast_check(gold: str, pred: str) -> Verdict | None:
    """A verdict for the obvious cases (equal strings, plain integers), None when math-verify must decide."""
    g, p = _clean(gold), _clean(pred)
    if g == p and g:
        return Verdict(True, "fast: equal strings")
    if _INT_RE.fullmatch(g) and _INT_RE.fullmatch(p):
        ok = int(g.replace(",", "")) == int(p.replace(",", ""))
        return Verdict(ok, "fast: integers" + ("" if ok else f" {g} != {p}"))
    return None


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


def _worker_main() -> None:
    """Serve JSON lines [gold, pred, timeout_s] -> [ok, reason] on stdin/stdout until EOF."""
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


class _Worker:
    """One `python -c ...` child. Not multiprocessing: spawn/forkserver re-import the caller's __main__, which breaks
    flat scripts without an `if __name__ == '__main__'` guard."""

    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from openzaya.verify import _worker_main; _worker_main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1,
            start_new_session=True)
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
        for i, (gold, pred) in enumerate(pairs):
            if not isinstance(gold, str) or not isinstance(pred, str):
                out[i] = Verdict(False, "non-string answer")
            elif (v := fast_check(gold, pred)) is not None:
                out[i] = v
            elif (why := _refuse(pred) or _refuse(gold)):
                out[i] = Verdict(False, why)
            else:
                todo.append(i)
        if not todo:
            return out
        with self.lock:
            self._fill()
            queue = list(reversed(todo))
            busy: dict[_Worker, tuple[int, float]] = {}   # worker -> (pair index, deadline)
            idle = [w for w in self.workers if w.ready]
            starting = [w for w in self.workers if not w.ready]
            failed_starts = 0
            while queue or busy:
                while queue and idle:
                    w, i = idle.pop(), queue.pop()
                    try:
                        w.send(*pairs[i], timeout_s)
                        busy[w] = (i, time.monotonic() + timeout_s)
                    except (BrokenPipeError, OSError):
                        self._replace(w)
                        queue.append(i)
                        starting += self._fill()
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
    pred = extract_answer(response)
    if pred is None or not pred.strip():
        return Score(0.0, 0.0, False, "no answer found")
    v = check_math(problem.answer, pred)
    return Score(float(v.correct), float(v.correct), True, v.reason)
