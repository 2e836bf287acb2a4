"""An OpenAI-compatible HTTP server for ZAYA checkpoints, with test-time compute (Markovian RSA & co.) built in.

    openzaya serve --model DIR [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--max-slots 16]

Layout (top to bottom): limits (`ServeConfig`), Prometheus metrics, the scheduler (one thread owning the engine),
the engine as a `Backend` (for TTC), streaming text helpers, request schemas, the FastAPI app, the CLI entry.

How requests flow:
- ONE `Engine` serves every client. A dedicated scheduler thread owns it and drives its incremental interface
  (`submit` / `step` / `cancel`, engine.py): between two steps it admits newly submitted sequences into free slots
  and drops cancelled ones, so requests from different clients decode in the same batch (continuous batching).
- A request with `n` choices (or a list of prompts) becomes n sequences ("jobs"). Each job's events (a token when
  streaming, then its `GenResult`) are handed to the request's asyncio loop with one `call_soon_threadsafe` per
  loop per engine step.
- Streaming is real: every SSE chunk is sent as soon as the engine produced its token. Text that may still change
  is held back: an incomplete UTF-8 character, a tail that could be the start of a stop string, and (chat) a tail
  that could be the start of `</think>`. Chat splits the `<think>` block into `reasoning_content`.
- Test-time compute: a body field `"ttc": {"method": "markovian_rsa", "n": 16, "c": 4, "t": 2, "tau": 4096,
  "beta": 16384}` runs `openzaya.ttc.arun` on `SchedulerBackend`, the shared engine seen as a `Backend`, so TTC
  calls batch with all other traffic. The response is the winning candidate (its answer matches the majority vote)
  plus a `ttc` object with the vote and the per-round accounting; `usage` sums every call. With `stream: true`,
  chunks with empty `choices` and a `ttc` progress object are sent after every round, then the answer.

RL trainers: `return_token_ids: true` (vLLM's field) adds each choice's sampled token ids (non-streaming), and with
`--enable-weight-updates` the server takes SGLang's `POST /update_weights_from_disk {"model_path": DIR}`: the
checkpoint is checked against the running model, then copied in by the scheduler thread between two engine steps
(sequences in flight continue on the new weights). Off by default (404); behind the API key when one is set.

Limits and safety: bearer API key (401), body size cap (413), prompt + max tokens within the context (400,
code context_length_exceeded), caps on n and on the TTC population / rounds (400), a bounded system (slots + queue,
429 beyond), a per-request timeout (408; the scheduler also cancels overdue jobs itself), client disconnects cancel
their jobs (slots freed at the next step), and shutdown lets in-flight requests finish for `shutdown_grace_s`,
then cancels the rest. Every error has the OpenAI shape {"error": {"message", "type", "param", "code"}}.

Simplified: logprobs are those of the sampled tokens only (raw model log-softmax at temperature 1, as
`GenResult.logprobs`); `top_logprobs` lists just the sampled token. No tools / function calling, no `echo`,
no `best_of`, no `logit_bias` (ignored like any unknown field). TTC takes a single user message (or a prompt).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import secrets
import threading
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .backends import Backend, BackendError, Completion, Request, load_local, text_engine
from .checkpoint import load_weights_into
from .engine import Engine, GenParams, GenResult
from .tokenizer import THINK_CLOSE, THINK_OPEN, Tokenizer, split_reasoning


@dataclass
class ServeConfig:
    max_slots: int = 16                 # engine rows decoded together
    max_len: int | None = None          # positions per row (prompt + completion); None = min(model context, 4096)
    max_queue: int = 256                # sequences waiting for a slot beyond the running ones (429 beyond)
    max_n: int = 16                     # sequences per request (n x prompts)
    max_body_bytes: int = 1 << 20       # request body cap (413)
    request_timeout_s: float = 600.0    # per request, TTC runs included (408)
    max_ttc_population: int = 64        # TTC N cap
    max_ttc_rounds: int = 8             # TTC T cap
    shutdown_grace_s: float = 10.0      # in-flight work gets this long on shutdown, then is cancelled
    api_key: str | None = None          # bearer token for /v1/* (None = open)
    model_name: str | None = None       # id served by /v1/models (None = the checkpoint directory's name)
    weight_updates: bool = False        # serve POST /update_weights_from_disk (RL rollouts; off = 404)


class APIError(Exception):
    """An error answered in the OpenAI shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _error_response(status: int, message: str, type: str = "invalid_request_error", param=None, code=None,
                    headers=None) -> JSONResponse:
    return JSONResponse(APIError(status, message, type, param, code).body(), status_code=status, headers=headers)


# ---------------------------------------------------------------------------------------------------------------------
# metrics (Prometheus text format, no client library)

LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.prompt_tokens = self.completion_tokens = self.engine_steps = self.cancelled = 0
        self.hist: dict[tuple[str, str], list] = {}    # (name, endpoint) -> [bucket counts..., sum, count]

    def observe(self, name: str, endpoint: str, value: float):
        with self.lock:
            h = self.hist.setdefault((name, endpoint), [0] * len(LATENCY_BUCKETS_S) + [0.0, 0])
            for i, b in enumerate(LATENCY_BUCKETS_S):
                if value <= b:
                    h[i] += 1
            h[-2] += value
            h[-1] += 1

    def count_request(self, endpoint: str, code: int):
        with self.lock:
            self.requests[(endpoint, code)] = self.requests.get((endpoint, code), 0) + 1

    def render(self, sched: "Scheduler") -> str:
        out = ["# TYPE openzaya_requests_total counter"]
        with self.lock:
            out += [f'openzaya_requests_total{{endpoint="{e}",code="{c}"}} {n}' for (e, c), n in
                    sorted(self.requests.items())]
            out += ["# TYPE openzaya_prompt_tokens_total counter", f"openzaya_prompt_tokens_total {self.prompt_tokens}",
                    "# TYPE openzaya_completion_tokens_total counter",
                    f"openzaya_completion_tokens_total {self.completion_tokens}",
                    "# TYPE openzaya_engine_steps_total counter", f"openzaya_engine_steps_total {self.engine_steps}",
                    "# TYPE openzaya_cancelled_sequences_total counter",
                    f"openzaya_cancelled_sequences_total {self.cancelled}",
                    "# TYPE openzaya_queue_depth gauge", f"openzaya_queue_depth {sched.queue_depth()}",
                    "# TYPE openzaya_running_sequences gauge", f"openzaya_running_sequences {sched.engine.num_running}",
                    "# TYPE openzaya_slots gauge", f"openzaya_slots {sched.engine.max_slots}"]
            for name in sorted({n for n, _ in self.hist}):
                out.append(f"# TYPE {name} histogram")
                for (n, e), h in sorted(self.hist.items()):
                    if n != name:
                        continue
                    for b, c in zip(LATENCY_BUCKETS_S, h):
                        out.append(f'{n}_bucket{{endpoint="{e}",le="{b}"}} {c}')
                    out += [f'{n}_bucket{{endpoint="{e}",le="+Inf"}} {h[-1]}', f'{n}_sum{{endpoint="{e}"}} {h[-2]}',
                            f'{n}_count{{endpoint="{e}"}} {h[-1]}']
        return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------------------------------
# the scheduler: one thread owns the engine


class Job:
    """One sequence: its prompt and params, where its events go (an asyncio queue on the caller's loop, shared by
    all jobs of one HTTP request), and its deadline."""

    def __init__(self, index: int, prompt: list[int], params: GenParams, stream: bool, deadline: float):
        self.index, self.prompt, self.params, self.stream, self.deadline = index, prompt, params, stream, deadline
        self.loop: asyncio.AbstractEventLoop | None = None
        self.events: asyncio.Queue | None = None
        self.handle: int | None = None
        self.finished = False           # set on the scheduler thread once its last event was sent
        self.t_submit = time.perf_counter()
        self.t_first: float | None = None


class QueueFull(Exception):
    pass


class Scheduler:
    """Runs `engine.step()` in a loop on its own thread while any sequence is in flight; sleeps otherwise.
    Other threads talk to it only through `submit` / `cancel` (a locked inbox)."""

    def __init__(self, engine: Engine, max_queue: int, metrics: Metrics):
        self.engine, self.max_queue, self.metrics = engine, max_queue, metrics
        self.cond = threading.Condition()
        self.inbox: deque = deque()
        self.in_system = 0              # sequences submitted and not yet finished/cancelled (guarded by cond)
        self.inbox_jobs = 0
        self.jobs: dict[int, Job] = {}  # handle -> job (scheduler thread only)
        self.accepting, self.stopping = True, False
        self.thread = threading.Thread(target=self._loop, name="openzaya-scheduler", daemon=True)

    def start(self):
        self.thread.start()

    def queue_depth(self) -> int:
        return self.inbox_jobs + self.engine.num_waiting

    def submit(self, jobs: list[Job], force: bool = False):
        """Queue jobs (all or none). Raises QueueFull when slots + queue cannot take them (unless force)."""
        loop = asyncio.get_running_loop()
        events = asyncio.Queue()
        for j in jobs:
            j.loop, j.events = loop, events
        with self.cond:
            if not self.accepting:
                raise APIError(503, "the server is shutting down", "server_error", code="shutting_down")
            if not force and self.in_system + len(jobs) > self.engine.max_slots + self.max_queue:
                raise QueueFull()
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
                while not self.inbox and not self.jobs and not self.stopping:
                    self.cond.wait()
                cmds = list(self.inbox)
                self.inbox.clear()
                self.inbox_jobs = 0
                stopping = self.stopping
            out: dict = {}
            for kind, jobs in cmds:
                for j in jobs:
                    if kind == "call":
                        fn, fut = j
                        try:
                            fut.set_result(fn())
                        except Exception as e:   # reported to the caller, the scheduler goes on
                            fut.set_exception(e)
                    elif kind == "submit":
                        self._submit_one(j, out)
                    elif j.handle is not None and not j.finished:
                        self._drop(j, None, out)
            if stopping:
                for j in list(self.jobs.values()):
                    self._drop(j, ("error", 503, "the server shut down before this request finished"), out)
                self._deliver(out)
                return
            now = time.perf_counter()
            if now - last_deadline_check > 0.25:
                last_deadline_check = now
                for j in [j for j in self.jobs.values() if time.monotonic() > j.deadline]:
                    self._drop(j, ("error", 408, "request timed out"), out)
            if self.jobs:
                try:
                    steps = self.engine.step()
                except Exception as e:  # an engine failure fails everything in flight, then the engine is reset
                    for j in list(self.jobs.values()):
                        self._drop(j, ("error", 500, f"engine error: {type(e).__name__}: {e}"), out)
                    steps = []
                self.metrics.engine_steps += 1
                t = time.perf_counter()
                for s in steps:
                    j = self.jobs.get(s.handle)
                    if j is None:
                        continue
                    if j.t_first is None:
                        j.t_first = t
                    if j.stream:
                        out.setdefault(j.loop, []).append((j, ("token", s.token, s.logprob)))
                    if s.result is not None:
                        self._finish(j, ("done", s.result), out)
            self._deliver(out)

    def _submit_one(self, j: Job, out):
        try:
            j.handle = self.engine.submit(j.prompt, j.params)
            self.jobs[j.handle] = j
        except ValueError as e:
            self._finish(j, ("error", 400, str(e)), out)

    def _drop(self, j: Job, event, out):
        self.engine.cancel(j.handle) if j.handle is not None else None
        with self.metrics.lock:
            self.metrics.cancelled += 1
        if event is None:   # cancelled by its caller: nobody waits for an event
            self._finish(j, None, out)
        else:
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


async def wait_jobs(sched: Scheduler, jobs: list[Job], events: asyncio.Queue, request: HTTPRequest | None,
                    deadline: float):
    """Yield (job index, event) until every job is done; cancels unfinished jobs on exit (disconnect, timeout,
    error, generator closed). Polls the client connection about once a second."""
    pending = {j.index for j in jobs}
    try:
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise APIError(408, "request timed out", "timeout_error", code="timeout")
            if not events.empty():   # the common case under load: skip wait_for's task and timer
                idx, ev = events.get_nowait()
            else:
                try:
                    idx, ev = await asyncio.wait_for(events.get(), timeout=min(1.0, left))
                except asyncio.TimeoutError:
                    if request is not None and await request.is_disconnected():
                        return
                    continue
            if ev[0] == "error":
                raise APIError(ev[1], ev[2], "server_error" if ev[1] >= 500 else "invalid_request_error",
                               code="timeout" if ev[1] == 408 else None)
            if ev[0] == "done":
                pending.discard(idx)
            yield idx, ev
    finally:
        alive = [j for j in jobs if j.index in pending]
        if alive:
            sched.cancel(alive)


# ---------------------------------------------------------------------------------------------------------------------
# the shared engine as a Backend (TTC runs on it)


class SchedulerBackend(Backend):
    """`Backend` over the server's scheduler: TTC calls become jobs next to every other request. Requests bypass
    the queue cap (the TTC request was admitted as a whole) but keep the request's deadline."""

    def __init__(self, server: "ServerState", deadline: float):
        self.server, self.deadline, self.tokenizer = server, deadline, server.tokenizer
        self.completion_tokens = 0

    async def agenerate(self, requests: list[Request]) -> list[list[Completion]]:
        return list(await asyncio.gather(*(self._one(r) for r in requests)))

    async def _one(self, r: Request) -> list[Completion]:
        srv, p = self.server, r.params
        if r.messages is not None:
            ids = srv.tokenizer.apply_chat_template(r.messages, add_generation_prompt=True,
                                                    enable_thinking=r.enable_thinking, tokenize=True)
        else:
            ids = srv.tokenizer.encode(r.prompt)
        max_tokens = min(p.max_tokens, srv.limit - len(ids))
        if max_tokens < 1:
            raise BackendError(f"TTC call prompt of {len(ids)} tokens leaves no room in the context of {srv.limit}")
        jobs = [Job(j, ids, srv.gen_params(p.temperature, p.top_p, p.top_k, p.min_p, max_tokens, p.stop,
                                           None if p.seed is None else p.seed + j), False, self.deadline)
                for j in range(p.n)]
        t0 = time.perf_counter()
        events = srv.sched.submit(jobs, force=True)
        results: dict[int, GenResult] = {}
        async for idx, ev in wait_jobs(srv.sched, jobs, events, None, self.deadline):
            results[idx] = ev[1]
        latency = time.perf_counter() - t0
        out = []
        for j in range(p.n):
            res = results[j]
            reasoning, answer = split_reasoning(res.text, thinking=r.enable_thinking)
            self.completion_tokens += res.completion_tokens
            out.append(Completion(text=res.text, reasoning=reasoning, answer=answer, finish_reason=res.finish_reason,
                                  prompt_tokens=res.prompt_tokens, completion_tokens=res.completion_tokens,
                                  latency_s=latency, token_ids=list(res.tokens), logprobs=list(res.logprobs)))
        return out


# ---------------------------------------------------------------------------------------------------------------------
# streaming text: what is safe to send


def _held_suffix(text: str, needles: list[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of one of needles (it may still grow into it)."""
    for k in range(min(len(text), max((len(s) for s in needles), default=1) - 1), 0, -1):
        tail = text[-k:]
        if any(s.startswith(tail) for s in needles):
            return k
    return 0


class TextStream:
    """Incremental detokenisation of one sequence: `push(token)` returns the cumulative text that can no longer
    change (no trailing partial UTF-8 character, no tail that may become a stop string, nothing at or after a
    stop string). Each push decodes only the tokens since the last committed text plus one token of context
    (vLLM's prefix/read offsets), so a long stream costs O(length), not O(length^2)."""

    def __init__(self, tokenizer: Tokenizer, stops: list[str], eos: set[int]):
        self.tok, self.stops, self.eos = tokenizer, stops, eos
        self.tokens: list[int] = []
        self.text = ""                    # decode(tokens[:read]), complete characters only
        self.prefix = self.read = 0       # tokens[prefix:read] = context re-decoded with each new token
        self.safe = ""
        self.stopped = False
        self.max_stop = max((len(x) for x in stops), default=0)

    def push(self, token: int) -> str:
        if token in self.eos or self.stopped:
            return self.safe
        self.tokens.append(token)
        head = self.tok.decode(self.tokens[self.prefix:self.read])
        full = self.tok.decode(self.tokens[self.prefix:])
        old_len = len(self.text)
        if len(full) > len(head) and not full.endswith("\ufffd"):   # a partial character waits for its bytes
            self.text += full[len(head):]
            self.prefix, self.read = self.read, len(self.tokens)
        text, end = self.text, len(self.text)
        if self.stops:
            start = max(0, old_len - self.max_stop + 1)             # a new stop must overlap the new text
            hits = [p for p in (text.find(x, start) for x in self.stops) if p >= 0]
            if hits:
                end, self.stopped = min(hits), True
            else:
                end -= _held_suffix(text, self.stops)
        if end > len(self.safe):
            self.safe = text[:end]
        return self.safe


def split_stream(text: str, thinking: bool, final: bool) -> tuple[str, str]:
    """(reasoning, answer) of a partial chat completion, both left-stripped, so that as text grows both only grow.
    Before `</think>` appears, a tail that may become `</think>` is held back (unless final)."""
    close = text.find(THINK_CLOSE)
    if close < 0:
        if not thinking and THINK_OPEN not in text:
            return "", text.lstrip()
        body = text.lstrip()
        body = body[len(THINK_OPEN):] if body.startswith(THINK_OPEN) else body
        if not final:
            body = body[:len(body) - _held_suffix(body, [THINK_CLOSE])]
        return body.lstrip(), ""
    reasoning = text[:close]
    o = reasoning.find(THINK_OPEN)
    if o >= 0:
        reasoning = reasoning[o + len(THINK_OPEN):]
    return reasoning.lstrip(), text[close + len(THINK_CLOSE):].lstrip()


# ---------------------------------------------------------------------------------------------------------------------
# request schemas (they make the OpenAPI spec that schemathesis fuzzes)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TTCSpec(_Strict):
    method: Literal["single", "majority", "rsa", "markovian_rsa", "delethink", "pacore_hybrid"] = "markovian_rsa"
    n: int = Field(16, ge=1, description="population N")
    c: int = Field(4, ge=1, description="candidates per aggregation prompt C")
    t: int = Field(2, ge=0, description="aggregation rounds T")
    tau: int = Field(4096, ge=1, description="tail tokens")
    beta: int = Field(16384, ge=1, description="decode budget per call, tokens")
    head_tokens: int = Field(100, ge=0, description="delethink: generated tokens kept after the question")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=-(2 ** 63), le=2 ** 64 - 1)
    stop: str | list[str] | None = Field(None, max_length=16)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ttc: TTCSpec | None = None
    return_token_ids: bool = Field(False, description="vLLM extension: each choice carries its sampled token_ids "
                                                      "(non-streaming requests)")


class CompletionBody(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)


class TextPart(_Strict):
    type: Literal["text"] = "text"
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    reasoning_content: str | None = None


class UpdateWeightsBody(_Strict):
    model_path: str


class ChatTemplateKwargs(_Strict):
    enable_thinking: bool = True


class ChatBody(_Sampling):
    messages: list[Message] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    chat_template_kwargs: ChatTemplateKwargs | None = None


# ---------------------------------------------------------------------------------------------------------------------
# server state: tokenizer, engine, scheduler, request -> jobs


class ServerState:
    def __init__(self, engine: Engine, tokenizer: Tokenizer, cfg: ServeConfig, model_name: str):
        self.engine, self.tokenizer, self.cfg, self.model_name = engine, tokenizer, cfg, model_name
        self.limit = min(engine.max_len, engine.config.max_position_embeddings)
        self.eos_ids = sorted(set(engine.config.eos_ids + ([tokenizer.eos_id] if tokenizer.eos_id is not None
                                                            else [])))
        self.metrics = Metrics()
        self.sched = Scheduler(engine, cfg.max_queue, self.metrics)
        self.created = int(time.time())
        self.weights_version = 0        # weight updates applied (update_weights_from_disk)

    def gen_params(self, temperature, top_p, top_k, min_p, max_tokens, stop, seed) -> GenParams:
        return GenParams(temperature=1.0 if temperature is None else temperature,
                         top_p=1.0 if top_p is None else top_p, top_k=max(0, top_k or 0), min_p=min_p or 0.0,
                         max_new_tokens=max_tokens, eos_ids=self.eos_ids, stop=list(stop),
                         seed=None if seed is None else seed % (2 ** 63))

    def check_model(self, name: str):
        if name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def max_tokens(self, body, prompt_len: int, default: int | None) -> int:
        """Requested max tokens, checked against the context (prompt + max tokens <= limit)."""
        room = self.limit - prompt_len
        if room < 1:
            raise APIError(400, f"the prompt has {prompt_len} tokens; this model's context is {self.limit} tokens",
                           param="messages" if isinstance(body, ChatBody) else "prompt",
                           code="context_length_exceeded")
        asked = body.max_tokens
        if isinstance(body, ChatBody) and body.max_completion_tokens is not None:
            asked = body.max_completion_tokens
        if asked is None:
            return min(room, default) if default else room
        if prompt_len + asked > self.limit:
            raise APIError(400, f"prompt ({prompt_len} tokens) + max_tokens ({asked}) exceeds this model's context "
                                f"of {self.limit} tokens", param="max_tokens", code="context_length_exceeded")
        return asked

    def jobs_for(self, body, prompts: list[list[int]], max_tokens: list[int], stream: bool, deadline: float):
        n = body.n
        if n * len(prompts) > self.cfg.max_n:
            raise APIError(400, f"n x prompts = {n * len(prompts)} sequences; this server allows at most "
                                f"{self.cfg.max_n} per request", param="n")
        stop = [body.stop] if isinstance(body.stop, str) else [s for s in (body.stop or [])]
        stop = [s for s in stop if s]
        return [Job(p * n + j, ids, self.gen_params(body.temperature, body.top_p, body.top_k, body.min_p,
                                                     max_tokens[p], stop,
                                                     None if body.seed is None else body.seed + j), stream, deadline)
                for p, ids in enumerate(prompts) for j in range(n)]

    def submit(self, jobs: list[Job], extra: int = 0):
        try:
            return self.sched.submit(jobs)
        except QueueFull:
            raise APIError(429, f"the server is at capacity ({self.engine.max_slots} running + {self.cfg.max_queue} "
                                f"queued sequences); retry later", "rate_limit_error", code="queue_full") from None

    def count_usage(self, prompt_tokens: int, completion_tokens: int):
        with self.metrics.lock:
            self.metrics.prompt_tokens += prompt_tokens
            self.metrics.completion_tokens += completion_tokens

    def chat_prompt(self, body: ChatBody) -> tuple[list[int], bool]:
        thinking = body.chat_template_kwargs.enable_thinking if body.chat_template_kwargs else True
        messages = []
        for m in body.messages:
            content = m.content if isinstance(m.content, str) or m.content is None else \
                "".join(p.text for p in m.content)
            msg = {"role": "system" if m.role == "developer" else m.role, "content": content or ""}
            if m.reasoning_content:
                msg["reasoning_content"] = m.reasoning_content
            messages.append(msg)
        if not any(m["role"] == "user" for m in messages):
            raise APIError(400, "messages must contain at least one user message", param="messages")
        try:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=thinking,
                                                     tokenize=True)
        except Exception as e:  # template errors (unknown role, ...) are the caller's input
            raise APIError(400, f"cannot apply the chat template: {e}", param="messages") from None
        return ids, thinking

    def completion_prompts(self, body: CompletionBody) -> list[list[int]]:
        p = body.prompt
        if p == "" or (isinstance(p, list) and any(x == "" for x in p)):
            raise APIError(400, "empty prompt", param="prompt")
        if isinstance(p, str):
            prompts = [self.tokenizer.encode(p)]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [list(p)]
        elif p and all(isinstance(x, str) for x in p):
            prompts = [self.tokenizer.encode(x) for x in p]
        else:
            prompts = [list(x) for x in p]
        if not prompts or any(len(x) == 0 for x in prompts):
            raise APIError(400, "empty prompt", param="prompt")
        V = self.engine.config.vocab_size
        if any(not 0 <= t < V for x in prompts for t in x):
            raise APIError(400, f"prompt token ids must be in [0, {V})", param="prompt")
        return prompts


# ---------------------------------------------------------------------------------------------------------------------
# responses


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


def _token_logprobs(tok: Tokenizer, tokens: list[int], logprobs: list[float], chat: bool, top: int, offset0=0):
    strs = [tok.decode([t]) for t in tokens]
    if chat:
        return {"content": [{"token": s, "logprob": lp, "bytes": list(s.encode()),
                             "top_logprobs": [{"token": s, "logprob": lp, "bytes": list(s.encode())}] if top else []}
                            for s, lp in zip(strs, logprobs)]}
    offsets, o = [], offset0
    for s in strs:
        offsets.append(o)
        o += len(s)
    return {"tokens": strs, "token_logprobs": list(logprobs),
            "top_logprobs": [{s: lp} for s, lp in zip(strs, logprobs)] if top else None, "text_offset": offsets}


def _ttc_summary(result, totals: dict) -> dict:
    return {"method": None, "answer": result.answer, "votes": result.votes, "final_answers": result.final_answers,
            "rounds": [asdict(r) for r in result.rounds], "calls": result.calls,
            "prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "wall_s": totals.get("wall_s")}


# ---------------------------------------------------------------------------------------------------------------------
# the app


def create_app(engine: Engine, tokenizer: Tokenizer, cfg: ServeConfig | None = None,
               model_name: str = "openzaya") -> FastAPI:
    """The FastAPI app over one engine. Starts the scheduler thread on startup, drains it on shutdown."""
    cfg = cfg or ServeConfig()
    srv = ServerState(engine, tokenizer, cfg, cfg.model_name or model_name)

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        srv.sched.start()
        yield
        await asyncio.to_thread(srv.sched.shutdown, cfg.shutdown_grace_s)

    app = FastAPI(title="openzaya", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible ZAYA server with Markovian RSA test-time compute")
    app.state.srv = srv
    app.add_middleware(_GuardMiddleware, srv=srv)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        headers = {"Retry-After": "1"} if e.status == 429 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        msg = "; ".join(f"{'.'.join(str(x) for x in er.get('loc', ()) if x != 'body') or 'body'}: {er.get('msg')}"
                        for er in errs[:5])
        return _error_response(400, msg or "invalid request", param=".".join(loc) or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        return _error_response(e.status_code, str(e.detail), code=None)

    @app.exception_handler(Exception)
    async def _unexpected(request, e: Exception):
        return _error_response(500, f"internal error: {type(e).__name__}: {e}", "server_error")

    @app.get("/health")
    async def health():
        if not srv.sched.accepting:
            return _error_response(503, "shutting down", "server_error")
        return {"status": "ok", "running": engine.num_running, "queued": srv.sched.queue_depth()}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(srv.metrics.render(srv.sched), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": srv.model_name, "object": "model", "created": srv.created,
                                            "owned_by": "openzaya", "max_model_len": srv.limit}]}

    @app.post("/update_weights_from_disk")
    async def update_weights_from_disk(body: UpdateWeightsBody):
        """SGLang's endpoint: load new weights (same config) from a checkpoint directory into the running engine,
        between two engine steps; sequences in flight continue with the new weights (as PipelineRL does)."""
        if not cfg.weight_updates:
            raise APIError(404, "weight updates are off (start the server with --enable-weight-updates)",
                           code="not_found")
        path = Path(body.model_path)
        try:   # load_weights_into checks the directory and every tensor before it changes anything
            n = await srv.sched.call(lambda: load_weights_into(engine.model, path))
        except (KeyError, ValueError, OSError) as e:
            raise APIError(400, f"cannot load {path}: {e}", param="model_path")
        srv.weights_version += 1
        return {"success": True, "message": f"loaded {n} tensors from {path}", "weights_version": srv.weights_version}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: HTTPRequest):
        srv.check_model(body.model)
        deadline = time.monotonic() + cfg.request_timeout_s
        prompts = srv.completion_prompts(body)
        if body.ttc is not None:
            if len(prompts) != 1 or not isinstance(body.prompt, str):
                raise APIError(400, "ttc takes one text prompt", param="prompt")
            return await _ttc(srv, body, body.prompt, None, True, request, deadline, chat=False)
        if body.stream and body.return_token_ids:
            raise APIError(400, "return_token_ids is supported for non-streaming requests only", param="stream")
        max_tokens = [srv.max_tokens(body, len(p), 16) for p in prompts]
        jobs = srv.jobs_for(body, prompts, max_tokens, body.stream, deadline)
        events = srv.submit(jobs)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        top = body.logprobs or 0
        if body.stream:
            return StreamingResponse(_stream(srv, body, jobs, events, request, deadline, rid, created, False, top,
                                             prompts, True), media_type="text/event-stream")
        results = await _collect(srv, jobs, events, request, deadline)
        if results is None:
            return _error_response(499, "client closed the request")
        choices = []
        for j, res in zip(jobs, results):
            choices.append({"index": j.index, "text": res.text, "finish_reason": res.finish_reason,
                            "logprobs": _token_logprobs(tokenizer, res.tokens, res.logprobs, False, top)
                            if body.logprobs is not None else None})
            if body.return_token_ids:
                choices[-1]["token_ids"] = list(res.tokens)
        pt, ct = sum(len(p) for p in prompts), sum(r.completion_tokens for r in results)
        srv.count_usage(pt, ct)
        return {"id": rid, "object": "text_completion", "created": created, "model": srv.model_name,
                "choices": choices, "usage": _usage(pt, ct)}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: HTTPRequest):
        srv.check_model(body.model)
        deadline = time.monotonic() + cfg.request_timeout_s
        ids, thinking = srv.chat_prompt(body)
        if body.ttc is not None:
            users = [m for m in body.messages if m.role == "user"]
            if len(body.messages) != 1 or len(users) != 1:
                raise APIError(400, "ttc takes exactly one user message (the question)", param="messages")
            c = users[0].content
            question = c if isinstance(c, str) else "".join(p.text for p in c or [])
            return await _ttc(srv, body, question, ids, thinking, request, deadline, chat=True)
        if body.stream and body.return_token_ids:
            raise APIError(400, "return_token_ids is supported for non-streaming requests only", param="stream")
        max_tokens = srv.max_tokens(body, len(ids), None)
        jobs = srv.jobs_for(body, [ids], [max_tokens], body.stream, deadline)
        events = srv.submit(jobs)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        top = body.top_logprobs or 0
        if body.stream:
            return StreamingResponse(_stream(srv, body, jobs, events, request, deadline, rid, created, True, top,
                                             [ids], thinking), media_type="text/event-stream")
        results = await _collect(srv, jobs, events, request, deadline)
        if results is None:
            return _error_response(499, "client closed the request")
        choices = []
        for j, res in zip(jobs, results):
            reasoning, answer = split_reasoning(res.text, thinking=thinking)
            choices.append({"index": j.index, "finish_reason": res.finish_reason,
                            "message": {"role": "assistant", "content": answer, "reasoning_content": reasoning},
                            "logprobs": _token_logprobs(tokenizer, res.tokens, res.logprobs, True, top)
                            if body.logprobs else None})
            if body.return_token_ids:
                choices[-1]["token_ids"] = list(res.tokens)
        pt, ct = len(ids), sum(r.completion_tokens for r in results)
        srv.count_usage(pt, ct)
        return {"id": rid, "object": "chat.completion", "created": created, "model": srv.model_name,
                "choices": choices, "usage": _usage(pt, ct)}

    return app


async def _collect(srv: ServerState, jobs, events, request, deadline) -> list[GenResult] | None:
    results: dict[int, GenResult] = {}
    async for idx, ev in wait_jobs(srv.sched, jobs, events, request, deadline):
        results[idx] = ev[1]
    if len(results) < len(jobs):
        return None   # the client went away
    for j in jobs:
        if j.t_first is not None:
            srv.metrics.observe("openzaya_time_to_first_token_seconds", "all", j.t_first - j.t_submit)
    return [results[j.index] for j in jobs]


async def _stream(srv: ServerState, body, jobs, events, request, deadline, rid, created, chat: bool, top: int,
                  prompts, thinking: bool):
    """SSE chunks: one per engine token per choice (when it adds text), then a finish chunk per choice; usage on
    the last chunk (and a separate usage chunk with empty choices when stream_options.include_usage)."""
    tok = srv.tokenizer
    obj = "chat.completion.chunk" if chat else "text_completion"
    eos = set(srv.eos_ids)
    by_index = {j.index: j for j in jobs}
    streams = {j.index: TextStream(tok, j.params.stop, eos) for j in jobs}
    sent = {j.index: ("", "") if chat else "" for j in jobs}      # what each choice has sent (chat: reasoning, answer)
    pending_lp: dict[int, list] = {j.index: [] for j in jobs}     # (token, logprob) not sent yet
    n_lp_sent = {j.index: 0 for j in jobs}
    want_lp = bool(body.logprobs) if chat else body.logprobs is not None
    completion_tokens, done = 0, 0
    pt = sum(len(p) for p in prompts)

    def chunk(index, text_delta=None, reasoning_delta=None, finish=None, lps=None, role=False):
        if chat:
            delta = {}
            if role:
                delta["role"] = "assistant"
            if reasoning_delta:
                delta["reasoning_content"] = reasoning_delta
            if text_delta:
                delta["content"] = text_delta
            ch = {"index": index, "delta": delta, "finish_reason": finish}
        else:
            ch = {"index": index, "text": text_delta or "", "finish_reason": finish}
        if want_lp:
            ch["logprobs"] = _token_logprobs(tok, [t for t, _ in lps], [lp for _, lp in lps], chat, top) if lps \
                else None
        return {"id": rid, "object": obj, "created": created, "model": srv.model_name, "choices": [ch]}

    def deltas(index, text, final):
        if chat:
            r, a = split_stream(text, thinking, final)
            r0, a0 = sent[index]
            dr = r[len(r0):] if r.startswith(r0) else ""
            da = a[len(a0):] if a.startswith(a0) else ""
            sent[index] = (r0 + dr, a0 + da)
            return dr, da
        d = text[len(sent[index]):] if text.startswith(sent[index]) else ""
        sent[index] += d
        return None, d

    try:
        if chat:
            for j in jobs:
                yield _sse(chunk(j.index, role=True))
        async for idx, ev in wait_jobs(srv.sched, jobs, events, request, deadline):
            if ev[0] == "token":
                _, token, lp = ev
                pending_lp[idx].append((token, lp))
                dr, da = deltas(idx, streams[idx].push(token), False)
                if dr or da:
                    lps, pending_lp[idx] = pending_lp[idx], []
                    n_lp_sent[idx] += len(lps)
                    yield _sse(chunk(idx, da, dr, lps=lps))
                continue
            res: GenResult = ev[1]
            done += 1
            completion_tokens += res.completion_tokens
            dr, da = deltas(idx, res.text, True)
            keep = max(0, res.completion_tokens - n_lp_sent[idx])
            lps = list(zip(res.tokens, res.logprobs))[n_lp_sent[idx]:n_lp_sent[idx] + keep]
            j = by_index[idx]
            if j.t_first is not None:
                srv.metrics.observe("openzaya_time_to_first_token_seconds", "all", j.t_first - j.t_submit)
            last = chunk(idx, da, dr, finish=res.finish_reason, lps=lps)
            if done == len(jobs):
                last["usage"] = _usage(pt, completion_tokens)
            yield _sse(last)
        srv.count_usage(pt, completion_tokens)
        if body.stream_options is not None and body.stream_options.include_usage:
            yield _sse({"id": rid, "object": obj, "created": created, "model": srv.model_name, "choices": [],
                        "usage": _usage(pt, completion_tokens)})
        yield b"data: [DONE]\n\n"
    except APIError as e:   # timeout / engine error after the headers went out: an error event, then the end
        yield _sse(e.body())
        yield b"data: [DONE]\n\n"


async def _ttc(srv: ServerState, body, question: str, ids, thinking: bool, request, deadline, chat: bool):
    """Run a TTC method for one question on the shared engine; answer (or stream) the winner with accounting."""
    from . import ttc as T

    spec: TTCSpec = body.ttc
    cfg = srv.cfg
    if body.n != 1:
        raise APIError(400, "n must be 1 with ttc (the population is ttc.n)", param="n")
    if spec.n > cfg.max_ttc_population:
        raise APIError(400, f"ttc.n={spec.n} exceeds this server's cap of {cfg.max_ttc_population}", param="ttc.n")
    if spec.t > cfg.max_ttc_rounds:
        raise APIError(400, f"ttc.t={spec.t} exceeds this server's cap of {cfg.max_ttc_rounds}", param="ttc.t")
    if not question or not question.strip():
        raise APIError(400, "empty question", param="messages" if chat else "prompt")
    tcfg = T.TTCConfig(method=spec.method, population=spec.n, candidates=spec.c, rounds=spec.t,
                       tail_tokens=spec.tau, budget_tokens=spec.beta,
                       temperature=1.0 if body.temperature is None else body.temperature,
                       top_p=1.0 if body.top_p is None else body.top_p, seed=(body.seed or 0) % (2 ** 31),
                       max_concurrency=spec.n, head_tokens=spec.head_tokens, enable_thinking=thinking)
    try:
        tcfg.validate()
    except ValueError as e:
        raise APIError(400, f"invalid ttc settings: {e}", param="ttc") from None
    # the longest prompt any call can send, plus beta, must fit the context
    q = len(srv.tokenizer.encode(question, add_special_tokens=False))
    template = len(srv.tokenizer.encode(T.build_aggregation_prompt("", [""] * spec.c), add_special_tokens=False))
    chat_overhead = 16
    longest = {"single": q, "majority": q, "markovian_rsa": q + spec.c * spec.tau + template,
               "pacore_hybrid": q + spec.c * spec.tau + template, "rsa": q + spec.c * spec.beta + template,
               "delethink": q + spec.head_tokens + spec.tau}[spec.method] + chat_overhead
    if longest + spec.beta > srv.limit:
        raise APIError(400, f"ttc {spec.method} needs prompts up to ~{longest} tokens plus beta={spec.beta} new "
                            f"tokens, over this model's context of {srv.limit}: lower tau, c or beta",
                       param="ttc", code="context_length_exceeded")
    # admission: the whole population must fit the system now
    with srv.sched.cond:
        full = srv.sched.in_system + spec.n > srv.engine.max_slots + cfg.max_queue
    if full:
        raise APIError(429, "the server is at capacity for this TTC population; retry later", "rate_limit_error",
                       code="queue_full")
    if not srv.sched.accepting:
        raise APIError(503, "the server is shutting down", "server_error", code="shutting_down")
    backend = SchedulerBackend(srv, deadline)
    calls_total = tcfg.calls_per_problem()
    progress_q: asyncio.Queue = asyncio.Queue()
    done_calls = [0]

    def progress(k: int):
        done_calls[0] += k
        if done_calls[0] % spec.n == 0 or done_calls[0] == calls_total:
            progress_q.put_nowait({"round": done_calls[0] // spec.n - 1, "rounds_total": spec.t + 1
                                   if spec.method not in ("single", "majority") else 1,
                                   "calls_done": done_calls[0], "calls_total": calls_total,
                                   "completion_tokens": backend.completion_tokens})

    problem = T.TTCProblem(id="q0", question=question)
    task = asyncio.ensure_future(T.arun([problem], backend, tcfg, None, progress))
    rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
    obj = "chat.completion" if chat else "text_completion"

    async def finish():
        """Wait for the run (watching the deadline and the client); returns (results, totals) or raises APIError."""
        while True:
            done, _ = await asyncio.wait({task}, timeout=1.0)
            if done:
                break
            if time.monotonic() > deadline:
                task.cancel()
                raise APIError(408, "request timed out", "timeout_error", code="timeout")
            if await request.is_disconnected():
                task.cancel()
                raise asyncio.CancelledError()
        try:
            return task.result()
        except APIError:
            raise
        except (ValueError, AssertionError, BackendError) as e:
            raise APIError(400, f"ttc run failed: {e}", param="ttc") from None

    def answer(results, totals):
        res = results[0]
        texts, answers = res.final_texts, res.final_answers
        from .envs.base import normalize
        win = next((i for i, a in enumerate(answers) if a is not None and res.answer is not None
                    and normalize(a) == res.answer), 0)
        text = texts[win] if texts else ""
        pt, ct = res.prompt_tokens, res.completion_tokens
        srv.count_usage(pt, ct)
        summary = _ttc_summary(res, totals)
        summary["method"] = spec.method
        summary["winner_index"] = win
        return text, pt, ct, summary

    if not body.stream:
        try:
            results, totals = await finish()
        except asyncio.CancelledError:
            return _error_response(499, "client closed the request")
        finally:
            if not task.done():
                task.cancel()
        text, pt, ct, summary = answer(results, totals)
        finish_reason = "stop"
        if chat:
            reasoning, ans = split_reasoning(text, thinking=thinking)
            choice = {"index": 0, "finish_reason": finish_reason,
                      "message": {"role": "assistant", "content": ans, "reasoning_content": reasoning}}
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        return {"id": rid, "object": obj, "created": created, "model": srv.model_name, "choices": [choice],
                "usage": _usage(pt, ct), "ttc": summary}

    async def gen():
        cobj = obj + ".chunk" if chat else obj
        head = {"id": rid, "object": cobj, "created": created, "model": srv.model_name}
        try:
            waiter = asyncio.ensure_future(finish())
            while True:
                getter = asyncio.ensure_future(progress_q.get())
                done, _ = await asyncio.wait({waiter, getter}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield _sse({**head, "choices": [], "ttc": {"event": "round", **getter.result()}})
                    continue
                getter.cancel()
                while not progress_q.empty():
                    yield _sse({**head, "choices": [], "ttc": {"event": "round", **progress_q.get_nowait()}})
                results, totals = waiter.result()
                break
            text, pt, ct, summary = answer(results, totals)
            if chat:
                reasoning, ans = split_reasoning(text, thinking=thinking)
                yield _sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]})
                if reasoning:
                    yield _sse({**head, "choices": [{"index": 0, "delta": {"reasoning_content": reasoning},
                                                     "finish_reason": None}]})
                last = {"index": 0, "delta": {"content": ans}, "finish_reason": "stop"}
            else:
                last = {"index": 0, "text": text, "finish_reason": "stop"}
            yield _sse({**head, "choices": [last], "usage": _usage(pt, ct), "ttc": {"event": "final", **summary}})
            yield b"data: [DONE]\n\n"
        except APIError as e:
            yield _sse(e.body())
            yield b"data: [DONE]\n\n"
        finally:
            if not task.done():
                task.cancel()

    return StreamingResponse(gen(), media_type="text/event-stream")


# ---------------------------------------------------------------------------------------------------------------------
# ASGI guard: API key, body size cap, request metrics (before FastAPI parses anything)


class _BodyTooLarge(Exception):
    pass


class _GuardMiddleware:
    def __init__(self, app, srv: ServerState):
        self.app, self.srv = app, srv

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, cfg = scope.get("path", ""), self.srv.cfg
        endpoint = path if path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health",
                                    "/metrics") else "other"
        t0 = time.perf_counter()
        status = [0]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}

        async def reply(resp):
            await resp(scope, receive, send_wrapped)

        async def send_wrapped(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if cfg.api_key and (path.startswith("/v1/") or path == "/update_weights_from_disk"):
                auth = headers.get("authorization", "")
                token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
                if not secrets.compare_digest(token.encode(), cfg.api_key.encode()):
                    return await reply(_error_response(401, "invalid or missing API key (Authorization: Bearer ...)",
                                                       "authentication_error", code="invalid_api_key"))
            length = headers.get("content-length", "")
            if length.isdigit() and int(length) > cfg.max_body_bytes:
                return await reply(_error_response(413, f"request body over {cfg.max_body_bytes} bytes",
                                                   code="body_too_large"))
            seen = [0]

            async def receive_capped():
                message = await receive()
                if message["type"] == "http.request":
                    seen[0] += len(message.get("body", b""))
                    if seen[0] > cfg.max_body_bytes:
                        raise _BodyTooLarge()
                return message

            try:
                await self.app(scope, receive_capped, send_wrapped)
            except _BodyTooLarge:
                if status[0] == 0:
                    await reply(_error_response(413, f"request body over {cfg.max_body_bytes} bytes",
                                                code="body_too_large"))
        finally:
            self.srv.metrics.count_request(endpoint, status[0] or 499)
            if endpoint.startswith("/v1/") and endpoint != "/v1/models":
                self.srv.metrics.observe("openzaya_request_latency_seconds", endpoint, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------------------------------
# loading, running in a thread (tests, bench), CLI entry


def load_app(model_dir, cfg: ServeConfig | None = None, device: str = "cpu", dtype=None,
             expert_cache_gb: float | None = None, compile: bool = False) -> FastAPI:
    from pathlib import Path

    cfg = cfg or ServeConfig()
    model, tokenizer = load_local(model_dir, dtype, device, expert_cache_gb)
    engine = text_engine(model, tokenizer, cfg.max_slots, cfg.max_len, compile)
    # served model id: the directory's name, or the repo id as given (as vLLM does)
    name = Path(model_dir).resolve().name if Path(model_dir).exists() else str(model_dir)
    return create_app(engine, tokenizer, cfg, model_name=name)


class ServerThread:
    """uvicorn in a background thread on an ephemeral port (tests, benchmarks). `url` is the base URL."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, grace_s: float = 5.0):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                    timeout_graceful_shutdown=grace_s, lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.host = host

    def __enter__(self):
        self.thread.start()
        t_end = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > t_end or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{self.host}:{port}"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=60)


def main(args) -> int:
    import uvicorn

    if args.threads > 0:
        import torch
        torch.set_num_threads(args.threads)
    cfg = ServeConfig(max_slots=args.max_slots, max_len=args.max_len if args.max_len > 0 else None,
                      max_queue=args.max_queue, max_n=args.max_n, max_body_bytes=args.max_body_bytes,
                      request_timeout_s=args.request_timeout_s, max_ttc_population=args.max_ttc_population,
                      max_ttc_rounds=args.max_ttc_rounds, shutdown_grace_s=args.shutdown_grace_s,
                      api_key=args.api_key, model_name=args.served_model_name,
                      weight_updates=args.enable_weight_updates)
    gb = getattr(args, "expert_cache_gb", -1)
    app = load_app(args.model, cfg, device=args.device, expert_cache_gb=gb if gb > 0 else None,
                   compile=args.compile)
    print(f"serving {app.state.srv.model_name} on http://{args.host}:{args.port}/v1 "
          f"({cfg.max_slots} slots, context {app.state.srv.limit})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info",
                timeout_graceful_shutdown=cfg.shutdown_grace_s)
    return 0
