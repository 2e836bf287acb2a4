"""The server's engine owner: one scheduler thread drives one `Engine` for every client, plus its metrics.

- ONE `Engine` serves every request. The `Scheduler` thread owns it and drives its incremental interface (`submit` /
  `step` / `cancel`, engine.py): between two steps it admits newly submitted sequences into free slots and drops
  cancelled ones, so requests from different clients decode in the same batch (continuous batching).
- A request becomes a list of `Job`s (one sequence each). Each job's events (a token when streaming, then its
  `GenResult`, or an error) are handed to the caller's asyncio loop with one `call_soon_threadsafe` per loop per
  engine step; `wait_jobs` yields them and cancels what is left when its caller stops waiting.
- The system is bounded: slots + `max_queue` sequences, beyond which `submit` refuses (429). Overdue jobs are
  cancelled by the thread itself (408). A sequence the engine refuses at submit (it checks every request's
  sampling values on its own there) fails alone (400, or 500 for an unexpected error); an engine failure inside a
  step fails everything in flight (500).
- `SchedulerBackend` is the scheduler seen as a `Backend`, so test-time compute (ttc.py) batches with all traffic.
- `Metrics`: the Prometheus metrics through prometheus_client (one registry per server, so that several servers in
  one process count apart), with the process collectors (CPU, memory, open files, Python GC).

Errors are `SchedulerError(status, message, code)` with an HTTP status; this module knows nothing of HTTP, the
server (serve.py) maps them to its OpenAI-shaped error responses.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections import deque
from typing import Awaitable, Callable

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, GCCollector, Histogram,
                               PlatformCollector, ProcessCollector, generate_latest)

from .backends import Backend, BackendError, Completion, Request, completion_from_result, engine_params
from .engine import Engine, GenParams, GenResult
from .tokenizer import Tokenizer


class SchedulerError(Exception):
    """Why sequences could not run or finish: an HTTP status (400, 408, 429, 500, 503), a message and a short code."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def _timed_out() -> SchedulerError:
    return SchedulerError(408, "request timed out", "timeout")


# ---------------------------------------------------------------------------------------------------------------------
# metrics (prometheus_client)

LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
METRICS_CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """The server's metrics; names as before prometheus_client (counters expose `<name>_total`)."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=r)
        self.requests = Counter("openzaya_requests", "HTTP requests by endpoint and the status sent",
                                ["endpoint", "code"], registry=r)
        self.prompt_tokens = Counter("openzaya_prompt_tokens", "prompt tokens of answered requests", registry=r)
        self.completion_tokens = Counter("openzaya_completion_tokens", "completion tokens of answered requests",
                                         registry=r)
        self.engine_steps = Counter("openzaya_engine_steps", "engine steps (a prefill or a decode step)", registry=r)
        self.cancelled = Counter("openzaya_cancelled_sequences", "sequences cancelled (client gone, timeout, "
                                 "shutdown, engine error)", registry=r)
        self.queue_depth = Gauge("openzaya_queue_depth", "sequences waiting for a slot", registry=r)
        self.running = Gauge("openzaya_running_sequences", "sequences in the engine's slots", registry=r)
        self.slots = Gauge("openzaya_slots", "engine slots (sequences decoded together)", registry=r)
        self.latency = Histogram("openzaya_request_latency_seconds", "request latency (completions and chat)",
                                 ["endpoint"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.ttft = Histogram("openzaya_time_to_first_token_seconds", "from a sequence's submission to its first "
                              "token", ["endpoint"], buckets=LATENCY_BUCKETS_S, registry=r)

    def observe_latency(self, endpoint: str, seconds: float):
        self.latency.labels(endpoint).observe(seconds)

    def count_request(self, endpoint: str, code: int):
        self.requests.labels(endpoint, str(code)).inc()

    def count_usage(self, prompt_tokens: int, completion_tokens: int):
        self.prompt_tokens.inc(prompt_tokens)
        self.completion_tokens.inc(completion_tokens)

    def first_token(self, job: Job):
        """Observe a finished job's time to first token (when it produced one)."""
        if job.t_first is not None:
            self.ttft.labels("all").observe(job.t_first - job.t_submit)

    def render(self, sched: Scheduler) -> str:
        """The Prometheus text exposition, with the scheduler's gauges read now."""
        self.queue_depth.set(sched.queue_depth())
        self.running.set(sched.engine.num_running)
        self.slots.set(sched.engine.max_slots)
        return generate_latest(self.registry).decode()


# ---------------------------------------------------------------------------------------------------------------------
# jobs and the scheduler thread


class Job:
    """One sequence: its prompt and params, where its events go (an asyncio queue on the caller's loop, shared by
    all jobs of one request), and its deadline (time.monotonic)."""

    def __init__(self, index: int, prompt: list[int], params: GenParams, stream: bool, deadline: float):
        self.index, self.prompt, self.params, self.stream, self.deadline = index, prompt, params, stream, deadline
        self.loop: asyncio.AbstractEventLoop | None = None
        self.events: asyncio.Queue | None = None
        self.handle: int | None = None
        self.finished = False           # set on the scheduler thread once its last event was sent
        self.t_submit = time.perf_counter()
        self.t_first: float | None = None


class Scheduler:
    """Runs `engine.step()` in a loop on its own thread while any sequence is in flight; sleeps otherwise.
    Other threads talk to it only through `submit` / `cancel` / `call` (a locked inbox)."""

    def __init__(self, engine: Engine, max_queue: int, metrics: Metrics):
        self.engine, self.max_queue, self.metrics = engine, max_queue, metrics
        self.cond = threading.Condition()
        self.inbox: deque = deque()
        self.in_system = 0              # sequences submitted and not yet finished/cancelled (guarded by cond)
        self.inbox_jobs = 0
        self.jobs: dict[int, Job] = {}  # handle -> job (scheduler thread only)
        self.accepting, self.stopping = True, False
        self.paused = False             # no engine step until resumed; commands (weight copies) still run (serve_rl)
        self.thread = threading.Thread(target=self._loop, name="openzaya-scheduler", daemon=True)

    def start(self):
        self.thread.start()

    def queue_depth(self) -> int:
        return self.inbox_jobs + self.engine.num_waiting

    def check_room(self, n: int, force: bool = False):
        """Raise SchedulerError unless n more sequences may enter now: 503 when shutting down, 429 (queue_full)
        when slots + queue cannot take them (not checked with force)."""
        with self.cond:
            if not self.accepting:
                raise SchedulerError(503, "the server is shutting down", "shutting_down")
            if not force and self.in_system + n > self.engine.max_slots + self.max_queue:
                raise SchedulerError(429, f"the server is at capacity ({self.engine.max_slots} running + "
                                          f"{self.max_queue} queued sequences); retry later", "queue_full")

    def submit(self, jobs: list[Job], force: bool = False) -> asyncio.Queue:
        """Queue jobs (all or none); returns the queue their events arrive on. `force` skips the capacity check
        (the jobs of a request admitted as a whole, e.g. a TTC run), not the shutdown check."""
        loop = asyncio.get_running_loop()
        events = asyncio.Queue()
        for j in jobs:
            j.loop, j.events = loop, events
        with self.cond:
            self.check_room(len(jobs), force)
            self.in_system += len(jobs)
            self.inbox_jobs += len(jobs)
            self.inbox.append(("submit", jobs))
            self.cond.notify()
        return events

    def cancel(self, jobs: list[Job]):
        with self.cond:
            self.inbox.append(("cancel", jobs))
            self.cond.notify()

    async def call(self, fn):
        """Run fn() on the scheduler thread between two engine steps (e.g. a weight update); returns its result."""
        fut = concurrent.futures.Future()
        with self.cond:
            self.inbox.append(("call", [(fn, fut)]))
            self.cond.notify()
        return await asyncio.wrap_future(fut)

    def set_paused(self, paused: bool):
        """Hold decoding (sequences keep their slots; vLLM's pause mode "keep") or restart it."""
        with self.cond:
            self.paused = paused
            self.cond.notify()

    def abort_all(self, message: str):
        """Fail every sequence in flight (503), e.g. before a weight update (vLLM's pause mode "abort")."""
        with self.cond:
            self.inbox.append(("abort", [message]))
            self.cond.notify()

    def shutdown(self, grace_s: float):
        """Refuse new work, let in-flight sequences finish for grace_s, cancel the rest, stop the thread."""
        with self.cond:
            self.accepting = False
        t_end = time.monotonic() + grace_s
        while self.in_system and time.monotonic() < t_end:
            time.sleep(0.05)
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout=30)

    # ---- scheduler thread
    def _loop(self):
        last_deadline_check = 0.0
        while True:
            with self.cond:
                while not self.inbox and not self.stopping and not (self.jobs and not self.paused):
                    if not self.cond.wait(0.25 if self.jobs else None):
                        break                # paused with sequences: still watch their deadlines
                cmds = list(self.inbox)
                self.inbox.clear()
                self.inbox_jobs = 0
                stopping = self.stopping
            out: dict = {}
            self._run_commands(cmds, out)
            if stopping:
                for j in list(self.jobs.values()):
                    self._drop(j, ("error", SchedulerError(503, "the server shut down before this request finished")),
                               out)
                self._deliver(out)
                return
            now = time.perf_counter()
            if now - last_deadline_check > 0.25:
                last_deadline_check = now
                for j in [j for j in self.jobs.values() if time.monotonic() > j.deadline]:
                    self._drop(j, ("error", _timed_out()), out)
            if self.jobs and not self.paused:
                self._step(out)
            self._deliver(out)

    def _run_commands(self, cmds, out):
        for kind, items in cmds:
            for item in items:
                if kind == "call":
                    fn, fut = item
                    try:
                        fut.set_result(fn())
                    except Exception as e:   # reported to the caller, the scheduler goes on
                        fut.set_exception(e)
                elif kind == "submit":
                    self._submit_one(item, out)
                elif kind == "abort":
                    for j in list(self.jobs.values()):
                        self._drop(j, ("error", SchedulerError(503, item, "aborted")), out)
                elif item.handle is not None and not item.finished:   # cancelled by its caller: no event
                    self._drop(item, None, out)

    def _step(self, out):
        try:
            steps = self.engine.step()
        except Exception as e:  # an engine failure fails everything in flight, then the engine is reset
            for j in list(self.jobs.values()):
                self._drop(j, ("error", SchedulerError(500, f"engine error: {type(e).__name__}: {e}")), out)
            steps = []
        self.metrics.engine_steps.inc()
        t = time.perf_counter()
        for s in steps:
            j = self.jobs.get(s.handle)
            if j is None:
                continue
            if j.t_first is None:
                j.t_first = t
            if j.stream and s.token is not None:
                out.setdefault(j.loop, []).append((j, ("token", s.token, s.logprob, s.top)))
            if s.result is not None:
                self._finish(j, ("done", s.result), out)

    def _submit_one(self, j: Job, out):
        """Hand one job to the engine, which checks it on its own (`Engine.submit`): whatever it raises fails this
        job only (400 for a ValueError, 500 otherwise), never the jobs submitted with it or already decoding."""
        try:
            j.handle = self.engine.submit(j.prompt, j.params)
            self.jobs[j.handle] = j
        except ValueError as e:
            self._finish(j, ("error", SchedulerError(400, str(e))), out)
        except Exception as e:
            self._finish(j, ("error", SchedulerError(500, f"cannot start this sequence: {type(e).__name__}: {e}")),
                         out)

    def _drop(self, j: Job, event, out):
        if j.handle is not None:
            self.engine.cancel(j.handle)
        self.metrics.cancelled.inc()
        self._finish(j, event, out)

    def _finish(self, j: Job, event, out):
        j.finished = True
        self.jobs.pop(j.handle, None)
        with self.cond:
            self.in_system -= 1
        if event is not None:
            out.setdefault(j.loop, []).append((j, event))

    @staticmethod
    def _deliver(out: dict):
        for loop, batch in out.items():
            try:
                loop.call_soon_threadsafe(_put_events, batch)
            except RuntimeError:   # the caller's loop is closed: it no longer waits
                pass


def _put_events(batch):
    for j, ev in batch:
        j.events.put_nowait((j.index, ev))


async def wait_jobs(sched: Scheduler, jobs: list[Job], events: asyncio.Queue,
                    disconnected: Callable[[], Awaitable[bool]] | None, deadline: float):
    """Yield (job index, event) until every job is done: ("token", id, logprob, alternatives) while streaming, then
    ("done", GenResult). Raises SchedulerError (an error event, or the deadline passed). Returns early when
    `disconnected()` (the caller's client went away; polled about once a second). Cancels unfinished jobs on exit
    (disconnect, timeout, error, generator closed)."""
    pending = {j.index for j in jobs}
    try:
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _timed_out()
            if not events.empty():   # the common case under load: skip wait_for's task and timer
                idx, ev = events.get_nowait()
            else:
                try:
                    idx, ev = await asyncio.wait_for(events.get(), timeout=min(1.0, left))
                except asyncio.TimeoutError:
                    if disconnected is not None and await disconnected():
                        return
                    continue
            if ev[0] == "error":
                raise ev[1]
            if ev[0] == "done":
                pending.discard(idx)
            yield idx, ev
    finally:
        alive = [j for j in jobs if j.index in pending]
        if alive:
            sched.cancel(alive)


async def collect(sched: Scheduler, jobs: list[Job], events: asyncio.Queue,
                  disconnected: Callable[[], Awaitable[bool]] | None, deadline: float) -> list[GenResult] | None:
    """Every job's `GenResult` in job order (`wait_jobs` without streaming), or None when the client went away."""
    results: dict[int, GenResult] = {}
    async for idx, ev in wait_jobs(sched, jobs, events, disconnected, deadline):
        results[idx] = ev[1]
    return [results[j.index] for j in jobs] if len(results) == len(jobs) else None


# ---------------------------------------------------------------------------------------------------------------------
# the shared engine as a Backend (TTC runs on it)


class SchedulerBackend(Backend):
    """`Backend` over the scheduler: TTC calls become jobs next to every other request. Requests bypass the
    capacity check (the TTC request was admitted as a whole) but keep the request's deadline. A call's max tokens
    are cut to what the context (`limit`) leaves after its prompt."""

    def __init__(self, sched: Scheduler, tokenizer: Tokenizer, limit: int, eos_ids: list[int], deadline: float):
        self.sched, self.tokenizer, self.limit, self.eos_ids, self.deadline = sched, tokenizer, limit, eos_ids, deadline
        self.completion_tokens = 0

    async def agenerate(self, requests: list[Request]) -> list[list[Completion]]:
        return list(await asyncio.gather(*(self._one(r) for r in requests)))

    async def _one(self, r: Request) -> list[Completion]:
        ids = self.prompt_ids(r)
        max_tokens = min(r.params.max_tokens, self.limit - len(ids))
        if max_tokens < 1:
            raise BackendError(f"TTC call prompt of {len(ids)} tokens leaves no room in the context of {self.limit}")
        jobs = [Job(j, ids, engine_params(r.params, self.eos_ids, j, max_tokens), False, self.deadline)
                for j in range(r.params.n)]
        t0 = time.perf_counter()
        events = self.sched.submit(jobs, force=True)
        results = await collect(self.sched, jobs, events, None, self.deadline)
        latency = time.perf_counter() - t0
        out = [completion_from_result(res, r.enable_thinking, latency) for res in results]
        self.completion_tokens += sum(c.completion_tokens for c in out)
        return out
