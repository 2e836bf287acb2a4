"""An OpenAI-compatible HTTP server for ZAYA checkpoints, with test-time compute (Markovian RSA & co.) built in.

    openzaya serve --model DIR [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--max-slots 16]

The HTTP layer: limits (`ServeConfig`), request schemas, request -> jobs (`ServerState`), the one response path of
both endpoints (`respond`), the TTC endpoint, routes, the app and the CLI entry. Around it: http_guard.py (API key,
body cap and read timeouts before FastAPI parses anything; each status counted as sent), scheduler.py (ONE engine
serves every client through its thread: continuous batching across requests),
openai_format.py (error, choice and chunk shapes; `Reply` is what differs between /v1/completions and
/v1/chat/completions), tokenizer.py (`TextStream` / `split_stream`), ttc.py (the test-time compute itself).

- A request with `n` choices (or a list of prompts) becomes n sequences ("jobs"). Streaming is real: every SSE chunk
  is sent as soon as the engine produced its token. Text that may still change is held back: an incomplete UTF-8
  character, a tail that could be the start of a stop string, and (chat) a tail that could be the start of
  `</think>`. Chat splits the `<think>` block into `reasoning_content`.
- Test-time compute: a body field `"ttc": {"method": "markovian_rsa", "n": 16, "c": 4, "t": 2, "tau": 4096,
  "beta": 16384}` (defaults: `ttc.TTCConfig`'s) runs `ttc.arun` on `SchedulerBackend`, so TTC calls batch with all
  other traffic; its longest prompt (`ttc.Run.longest_prompt_tokens`) plus beta must fit the context. The response
  is the winning candidate (`ProblemResult.winner_index`: its answer is the majority vote) plus a `ttc` object with
  the vote and the per-round accounting; `usage` sums every call. With `stream: true`, chunks with empty `choices`
  and a `ttc` progress object are sent after every round, then the answer.
- RL trainers: `return_token_ids: true` (vLLM's field) adds each choice's sampled token ids (non-streaming);
  `return_routed_experts: true` (with `--enable-return-routed-experts`) adds each choice's `routed_experts`, vLLM's
  [positions][layers][1] shape over prompt + completion but the last token, -1 = skip class. With
  `--enable-weight-updates` the trainer's weight pushes (from disk or by broadcast), pause/resume and the served
  version are serve_rl.py's routes (vLLM's RL API); off by default (404), behind the API key when one is set.

Limits and safety: bearer API key (401), body size cap (413, with or without Content-Length), a read timeout on
a request's head, then on its body (408: slow clients cannot hold sockets), an explicit
range on every numeric field and valid Unicode in every string (400), prompt + max tokens within the context (400,
code context_length_exceeded), caps on n and on the TTC population / rounds (400), a bounded system (slots + queue,
429 beyond), a per-request timeout (408; the scheduler also cancels overdue jobs itself), client disconnects cancel
their jobs (slots freed at the next step), and shutdown lets in-flight requests finish for `shutdown_grace_s`,
then cancels the rest. A sequence the engine cannot start fails alone, never its batch-mates (scheduler.py). Every
error has the OpenAI shape {"error": {"message", "type", "param", "code"}}; /metrics counts the status sent.

Simplified: logprobs are those of the sampled tokens only (raw model log-softmax at temperature 1, as
`GenResult.logprobs`); `top_logprobs` lists just the sampled token. No tools / function calling, no `echo`,
no `best_of`, no `logit_bias` (ignored like any unknown field). TTC takes a single user message (or a prompt).
"""

from __future__ import annotations

import asyncio
import time
from contextlib import aclosing, asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from .backends import BackendError, SamplingParams, engine_params, load_local, text_engine
from .engine import Engine, GenResult
from .http_guard import GuardMiddleware, error_response, http_protocol
from .openai_format import SSE_DONE, APIError, ChoiceStream, Reply, sse, usage
from .scheduler import Job, Metrics, Scheduler, SchedulerBackend, SchedulerError, collect, wait_jobs
from .serve_rl import PATHS as RL_PATHS, WeightState, routed_experts, router as rl_router
from .tokenizer import Tokenizer, eos_union, split_reasoning
from .ttc import METHODS, ProblemResult, Run, TTCConfig, TTCProblem, arun


@dataclass
class ServeConfig:
    max_slots: int = 16                 # engine rows decoded together
    max_len: int | None = None          # positions per row (prompt + completion); None = min(model context, 4096)
    max_queue: int = 256                # sequences waiting for a slot beyond the running ones (429 beyond)
    max_n: int = 16                     # sequences per request (n x prompts)
    max_body_bytes: int = 1 << 20       # request body cap (413)
    read_timeout_s: float = 30.0        # a request's headers, then its body, must each arrive within this (408)
    request_timeout_s: float = 600.0    # per request, TTC runs included (408)
    max_ttc_population: int = 64        # TTC N cap
    max_ttc_rounds: int = 8             # TTC T cap
    shutdown_grace_s: float = 10.0      # in-flight work gets this long on shutdown, then is cancelled
    api_key: str | None = None          # bearer token for /v1/* (None = open)
    model_name: str | None = None       # id served by /v1/models (None = the checkpoint directory's name)
    weight_updates: bool = False        # serve the weight-update routes of serve_rl.py (RL rollouts; off = 404)
    return_routed_experts: bool = False  # record each sequence's experts (RL router replay; costs a little)


# ---------------------------------------------------------------------------------------------------------------------
# request schemas (they make the OpenAPI spec that schemathesis fuzzes)


MAX_COUNT = 2**31 - 1   # the upper bound of every count field (tokens, n, top_k, ttc sizes); servers cap lower


def _unencodable(v) -> str | None:
    """Where a string (or a list of them, nested) holds text that cannot be encoded as UTF-8 (lone surrogates)."""
    if isinstance(v, str):
        try:
            v.encode()
        except UnicodeEncodeError as e:
            return f"character {e.start}"
    elif isinstance(v, list):
        for i, x in enumerate(v):
            if (where := _unencodable(x)) is not None:
                return f"item {i}, {where}"
    return None


class _Strict(BaseModel):
    """Every request schema: unknown fields are ignored, every string must be valid Unicode (a lone surrogate, which
    JSON's \\ud800 escapes can carry, is a 400 here rather than a failure in the tokenizer or the JSON writer)."""
    model_config = ConfigDict(extra="ignore")

    @field_validator("*")
    @classmethod
    def _valid_unicode(cls, v):
        if (where := _unencodable(v)) is not None:
            raise ValueError(f"text is not valid Unicode (a lone surrogate at {where})")
        return v


def _count(default, ge: int, description: str | None = None):
    return Field(default, ge=ge, le=MAX_COUNT, description=description)


def _unit(default, *, gt=None, ge=None, le=None):
    return Field(default, gt=gt, ge=ge, le=le, allow_inf_nan=False)


TokenId = Annotated[int, Field(ge=0, le=MAX_COUNT)]


class TTCSpec(_Strict):   # the TTC knobs under the report's letters; every default is TTCConfig's
    method: Literal[METHODS] = TTCConfig.method
    n: int = _count(TTCConfig.population, 1, "population N")
    c: int = _count(TTCConfig.candidates, 1, "candidates per aggregation prompt C")
    t: int = _count(TTCConfig.rounds, 0, "aggregation rounds T")
    tau: int = _count(TTCConfig.tail_tokens, 1, "tail tokens")
    beta: int = _count(TTCConfig.budget_tokens, 1, "decode budget per call, tokens")
    head_tokens: int = _count(TTCConfig.head_tokens, 0, "delethink: generated tokens kept after the question")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str
    max_tokens: int | None = _count(None, 1)
    temperature: float | None = _unit(None, ge=0, le=2)
    top_p: float | None = _unit(None, gt=0, le=1)
    top_k: int | None = _count(None, -1)
    min_p: float | None = _unit(None, ge=0, le=1)
    seed: int | None = Field(None, ge=-(2 ** 63), le=2 ** 64 - 1)
    stop: str | list[str] | None = Field(None, max_length=16)
    n: int = _count(1, 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ttc: TTCSpec | None = None
    return_token_ids: bool = Field(False, description="vLLM extension: each choice carries its sampled token_ids "
                                                      "(non-streaming requests)")
    return_routed_experts: bool = Field(False, description="each choice carries routed_experts (non-streaming; "
                                                           "server started with --enable-return-routed-experts)")


class CompletionBody(_Sampling):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    logprobs: int | None = Field(None, ge=0, le=20)


class TextPart(_Strict):
    type: Literal["text"] = "text"
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    reasoning_content: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])


class ChatTemplateKwargs(_Strict):
    enable_thinking: bool = True


class ChatBody(_Sampling):
    messages: list[Message] = Field(..., min_length=1)
    max_completion_tokens: int | None = _count(None, 1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    chat_template_kwargs: ChatTemplateKwargs | None = None


# ---------------------------------------------------------------------------------------------------------------------
# server state: tokenizer, engine, scheduler, request -> jobs


class ServerState:
    def __init__(self, engine: Engine, tokenizer: Tokenizer, cfg: ServeConfig, model_name: str):
        self.engine, self.tokenizer, self.cfg, self.model_name = engine, tokenizer, cfg, model_name
        self.limit = min(engine.max_len, engine.config.max_position_embeddings)
        self.eos_ids = eos_union(engine.config.eos_ids, tokenizer)
        self.metrics = Metrics()
        self.sched = Scheduler(engine, cfg.max_queue, self.metrics)
        self.created = int(time.time())
        self.weights_version = 0        # weight updates applied (serve_rl.py)
        self.rl = WeightState()         # the version label a trainer gave, its transfer group

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

    def jobs_for(self, body, prompts: list[list[int]], max_tokens: list[int], deadline: float) -> list[Job]:
        """n jobs per prompt, job p * n + j with seed + j; the body's unset sampling fields take OpenAI's defaults."""
        n = body.n
        if n * len(prompts) > self.cfg.max_n:
            raise APIError(400, f"n x prompts = {n * len(prompts)} sequences; this server allows at most "
                                f"{self.cfg.max_n} per request", param="n")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        params = SamplingParams(temperature=1.0 if body.temperature is None else body.temperature,
                                top_p=1.0 if body.top_p is None else body.top_p, top_k=max(0, body.top_k or 0),
                                min_p=body.min_p or 0.0, stop=[s for s in stop if s], seed=body.seed)
        return [Job(p * n + j, ids, engine_params(params, self.eos_ids, j, max_tokens[p]), body.stream, deadline)
                for p, ids in enumerate(prompts) for j in range(n)]

    def chat_prompt(self, body: ChatBody) -> tuple[list[int], bool]:
        thinking = body.chat_template_kwargs.enable_thinking if body.chat_template_kwargs else True
        messages = []
        for m in body.messages:
            msg = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
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
# the one response path of both endpoints: jobs -> a collected response or an SSE stream


def _event_stream(chunks) -> StreamingResponse:
    """An SSE response of a generator of chunk dicts, ended by [DONE]; an error raised after the headers went out
    (timeout, engine error) becomes an error event."""
    async def events():
        try:
            async with aclosing(chunks):
                async for obj in chunks:
                    yield sse(obj)
        except (APIError, SchedulerError) as e:
            yield sse((APIError.of(e) if isinstance(e, SchedulerError) else e).body())
        yield SSE_DONE

    return StreamingResponse(events(), media_type="text/event-stream")


async def respond(srv: ServerState, body, reply: Reply, prompts: list[list[int]], default_max_tokens: int | None,
                  request: HTTPRequest, deadline: float):
    """Both endpoints: prompts -> jobs -> a collected response, or an SSE stream."""
    if body.stream and (body.return_token_ids or body.return_routed_experts):
        raise APIError(400, "return_token_ids / return_routed_experts are for non-streaming requests", param="stream")
    if body.return_routed_experts and not srv.cfg.return_routed_experts:
        raise APIError(400, "start the server with --enable-return-routed-experts", param="return_routed_experts")
    max_tokens = [srv.max_tokens(body, len(p), default_max_tokens) for p in prompts]
    jobs = srv.jobs_for(body, prompts, max_tokens, deadline)
    events = srv.sched.submit(jobs)
    head, prompt_tokens = reply.envelope(srv.model_name, body.stream), sum(len(p) for p in prompts)
    if body.stream:
        usage_chunk = body.stream_options is not None and body.stream_options.include_usage
        return _event_stream(_stream(srv, reply, jobs, events, request, deadline, head, prompt_tokens, usage_chunk))
    results = await collect(srv.sched, jobs, events, request.is_disconnected, deadline)
    if results is None:
        return error_response(499, "client closed the request")
    choices = []
    for j, res in zip(jobs, results):
        srv.metrics.first_token(j)
        choices.append(reply.choice(j.index, res.text, res.finish_reason, res.tokens, res.logprobs))
        if body.return_token_ids:
            choices[-1]["token_ids"] = list(res.tokens)
        if body.return_routed_experts:
            choices[-1]["routed_experts"] = routed_experts(res.routes)
    completion_tokens = sum(r.completion_tokens for r in results)
    srv.metrics.count_usage(prompt_tokens, completion_tokens)
    return {**head, "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


async def _stream(srv: ServerState, reply: Reply, jobs: list[Job], events, request: HTTPRequest, deadline: float,
                  head: dict, prompt_tokens: int, usage_chunk: bool):
    """Chunks: one per engine token per choice (when it adds text), then a finish chunk per choice; usage on the
    last chunk (and a separate usage chunk with empty choices when stream_options.include_usage)."""
    eos = set(srv.eos_ids)
    by_index = {j.index: j for j in jobs}
    streams = {j.index: ChoiceStream(reply, j.index, j.params.stop, eos) for j in jobs}
    completion_tokens, done = 0, 0
    if reply.chat:
        for j in jobs:
            yield {**head, "choices": [reply.delta(j.index, role=True)]}
    async for idx, ev in wait_jobs(srv.sched, jobs, events, request.is_disconnected, deadline):
        if ev[0] == "token":
            ch = streams[idx].token(ev[1], ev[2])
            if ch is not None:
                yield {**head, "choices": [ch]}
            continue
        res: GenResult = ev[1]
        done += 1
        completion_tokens += res.completion_tokens
        srv.metrics.first_token(by_index[idx])
        last = {**head, "choices": [streams[idx].done(res)]}
        if done == len(jobs):
            last["usage"] = usage(prompt_tokens, completion_tokens)
        yield last
    srv.metrics.count_usage(prompt_tokens, completion_tokens)
    if usage_chunk:
        yield {**head, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


# ---------------------------------------------------------------------------------------------------------------------
# test-time compute: one question, a ttc.py run on the shared engine, the winner as the response

CHAT_TEMPLATE_ALLOWANCE = 16   # tokens of chat template around a call's prompt text, over ttc's prompt bound


def _ttc_config(srv: ServerState, body, question: str, thinking: bool) -> TTCConfig:
    """The body's TTC settings as a validated `TTCConfig`, within this server's caps."""
    spec, cfg = body.ttc, srv.cfg
    if body.n != 1:
        raise APIError(400, "n must be 1 with ttc (the population is ttc.n)", param="n")
    if spec.n > cfg.max_ttc_population:
        raise APIError(400, f"ttc.n={spec.n} exceeds this server's cap of {cfg.max_ttc_population}", param="ttc.n")
    if spec.t > cfg.max_ttc_rounds:
        raise APIError(400, f"ttc.t={spec.t} exceeds this server's cap of {cfg.max_ttc_rounds}", param="ttc.t")
    if not question or not question.strip():
        raise APIError(400, "empty question", param="messages" if isinstance(body, ChatBody) else "prompt")
    tcfg = TTCConfig(method=spec.method, population=spec.n, candidates=spec.c, rounds=spec.t,
                     tail_tokens=spec.tau, budget_tokens=spec.beta,
                     temperature=TTCConfig.temperature if body.temperature is None else body.temperature,
                     top_p=TTCConfig.top_p if body.top_p is None else body.top_p, seed=(body.seed or 0) % (2 ** 31),
                     max_concurrency=spec.n, head_tokens=spec.head_tokens, enable_thinking=thinking)
    try:
        tcfg.validate()
    except ValueError as e:
        raise APIError(400, f"invalid ttc settings: {e}", param="ttc") from None
    return tcfg


class _TTCProgress:
    """The run's progress callback: a "round" event each time N more calls are done (and after the last call),
    queued for a stream."""

    def __init__(self, cfg: TTCConfig, backend: SchedulerBackend):
        self.n, self.total, self.backend = cfg.population, cfg.calls_per_problem(), backend
        self.rounds_total = 1 if cfg.method in ("single", "majority") else cfg.rounds + 1
        self.calls_done = 0
        self.events: asyncio.Queue = asyncio.Queue()

    def __call__(self, k: int):
        self.calls_done += k
        if self.calls_done % self.n == 0 or self.calls_done == self.total:
            self.events.put_nowait({"round": self.calls_done // self.n - 1, "rounds_total": self.rounds_total,
                                    "calls_done": self.calls_done, "calls_total": self.total,
                                    "completion_tokens": self.backend.completion_tokens})

    async def until(self, waiter: asyncio.Future):
        """Yield the events as they come until waiter is done, then those still queued."""
        while True:
            getter = asyncio.ensure_future(self.events.get())
            done, _ = await asyncio.wait({waiter, getter}, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                yield getter.result()
                continue
            getter.cancel()
            while not self.events.empty():
                yield self.events.get_nowait()
            return


async def _ttc_wait(task: asyncio.Task, request: HTTPRequest, deadline: float):
    """Wait for the run, watching the deadline and the client; returns arun's (results, totals)."""
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
    except (ValueError, AssertionError, BackendError) as e:
        raise APIError(400, f"ttc run failed: {e}", param="ttc") from None


def _ttc_answer(srv: ServerState, res: ProblemResult, totals: dict, method: str) -> tuple[str, dict]:
    """The winner's text and the `ttc` summary; counts the run's usage."""
    win = res.winner_index or 0
    srv.metrics.count_usage(res.prompt_tokens, res.completion_tokens)
    summary = {"method": method, "answer": res.answer, "votes": res.votes, "final_answers": res.final_answers,
               "rounds": [asdict(r) for r in res.rounds], "calls": res.calls, "prompt_tokens": res.prompt_tokens,
               "completion_tokens": res.completion_tokens, "wall_s": totals.get("wall_s"), "winner_index": win}
    return (res.final_texts[win] if res.final_texts else ""), summary


async def respond_ttc(srv: ServerState, body, question: str, reply: Reply, request: HTTPRequest, deadline: float):
    """Run a TTC method for one question on the shared engine; answer (or stream) the winner with accounting."""
    tcfg = _ttc_config(srv, body, question, reply.thinking)
    backend = SchedulerBackend(srv.sched, srv.tokenizer, srv.limit, srv.eos_ids, deadline)
    progress = _TTCProgress(tcfg, backend)
    run = Run(backend, tcfg, progress=progress)
    longest = run.longest_prompt_tokens(question) + CHAT_TEMPLATE_ALLOWANCE
    if longest + tcfg.budget_tokens > srv.limit:
        raise APIError(400, f"ttc {tcfg.method} needs prompts up to ~{longest} tokens plus beta={tcfg.budget_tokens} "
                            f"new tokens, over this model's context of {srv.limit}: lower tau, c or beta",
                       param="ttc", code="context_length_exceeded")
    srv.sched.check_room(tcfg.population)   # admission: the whole population must fit the system now
    task = asyncio.ensure_future(arun([TTCProblem(id="q0", question=question)], backend, tcfg, run=run))
    if body.stream:
        return _event_stream(_ttc_stream(srv, reply, task, progress, request, deadline, tcfg.method))
    try:
        results, totals = await _ttc_wait(task, request, deadline)
    except asyncio.CancelledError:
        return error_response(499, "client closed the request")
    finally:
        if not task.done():
            task.cancel()
    text, summary = _ttc_answer(srv, results[0], totals, tcfg.method)
    return {**reply.envelope(srv.model_name, False), "choices": [reply.choice(0, text, "stop")],
            "usage": usage(summary["prompt_tokens"], summary["completion_tokens"]), "ttc": summary}


async def _ttc_stream(srv: ServerState, reply: Reply, task: asyncio.Task, progress: _TTCProgress,
                      request: HTTPRequest, deadline: float, method: str):
    """A "round" chunk (empty choices) after every round, then the answer (chat: role, reasoning, content chunks)
    with usage and the `ttc` summary."""
    head = reply.envelope(srv.model_name, True)
    try:
        waiter = asyncio.ensure_future(_ttc_wait(task, request, deadline))
        async for event in progress.until(waiter):
            yield {**head, "choices": [], "ttc": {"event": "round", **event}}
        results, totals = waiter.result()
        text, summary = _ttc_answer(srv, results[0], totals, method)
        if reply.chat:
            reasoning, text = split_reasoning(text, thinking=reply.thinking)
            yield {**head, "choices": [reply.delta(0, role=True)]}
            if reasoning:
                yield {**head, "choices": [reply.delta(0, reasoning=reasoning)]}
        yield {**head, "choices": [reply.delta(0, text, finish="stop")],
               "usage": usage(summary["prompt_tokens"], summary["completion_tokens"]),
               "ttc": {"event": "final", **summary}}
    finally:
        if not task.done():
            task.cancel()


# ---------------------------------------------------------------------------------------------------------------------
# routes (state from request.app.state.srv)

router = APIRouter()


@router.get("/health")
async def health(request: HTTPRequest):
    srv: ServerState = request.app.state.srv
    if not srv.sched.accepting:
        return error_response(503, "shutting down", "server_error")
    return {"status": "ok", "running": srv.engine.num_running, "queued": srv.sched.queue_depth()}


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: HTTPRequest):
    srv: ServerState = request.app.state.srv
    return PlainTextResponse(srv.metrics.render(srv.sched), media_type="text/plain; version=0.0.4")


@router.get("/v1/models")
async def models(request: HTTPRequest):
    srv: ServerState = request.app.state.srv
    return {"object": "list", "data": [{"id": srv.model_name, "object": "model", "created": srv.created,
                                        "owned_by": "openzaya", "max_model_len": srv.limit}]}


def _accept(request: HTTPRequest, body) -> tuple[ServerState, float]:
    """The server state and the request's deadline, once the body names the served model."""
    srv: ServerState = request.app.state.srv
    srv.check_model(body.model)
    return srv, time.monotonic() + srv.cfg.request_timeout_s


@router.post("/v1/completions")
async def completions(body: CompletionBody, request: HTTPRequest):
    srv, deadline = _accept(request, body)
    prompts = srv.completion_prompts(body)
    if body.ttc is not None:
        if len(prompts) != 1 or not isinstance(body.prompt, str):
            raise APIError(400, "ttc takes one text prompt", param="prompt")
        return await respond_ttc(srv, body, body.prompt, Reply(srv.tokenizer, chat=False), request, deadline)
    reply = Reply(srv.tokenizer, chat=False, logprobs=body.logprobs is not None, top_logprobs=body.logprobs or 0)
    return await respond(srv, body, reply, prompts, 16, request, deadline)


@router.post("/v1/chat/completions")
async def chat(body: ChatBody, request: HTTPRequest):
    srv, deadline = _accept(request, body)
    ids, thinking = srv.chat_prompt(body)
    if body.ttc is not None:
        if len(body.messages) != 1 or body.messages[0].role != "user":
            raise APIError(400, "ttc takes exactly one user message (the question)", param="messages")
        reply = Reply(srv.tokenizer, chat=True, thinking=thinking)
        return await respond_ttc(srv, body, body.messages[0].text(), reply, request, deadline)
    reply = Reply(srv.tokenizer, chat=True, thinking=thinking, logprobs=body.logprobs,
                  top_logprobs=body.top_logprobs or 0)
    return await respond(srv, body, reply, [ids], None, request, deadline)


# ---------------------------------------------------------------------------------------------------------------------
# errors in the OpenAI shape


async def _api_error(request, e: APIError):
    headers = {"Retry-After": "1"} if e.status == 429 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


async def _scheduler_error(request, e: SchedulerError):
    return await _api_error(request, APIError.of(e))


async def _validation_error(request, e: RequestValidationError):
    errs = e.errors()
    first = errs[0] if errs else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    msg = "; ".join(f"{'.'.join(str(x) for x in er.get('loc', ()) if x != 'body') or 'body'}: {er.get('msg')}"
                    for er in errs[:5])
    return error_response(400, msg or "invalid request", param=".".join(loc) or None)


async def _http_error(request, e: StarletteHTTPException):
    return error_response(e.status_code, str(e.detail))


async def _unexpected(request, e: Exception):
    return error_response(500, f"internal error: {type(e).__name__}: {e}", "server_error")


# ---------------------------------------------------------------------------------------------------------------------
# the app, loading, CLI entry


@asynccontextmanager
async def _lifespan(app: FastAPI):
    """Start the scheduler thread on startup, drain it on shutdown."""
    srv: ServerState = app.state.srv
    srv.sched.start()
    yield
    await asyncio.to_thread(srv.sched.shutdown, srv.cfg.shutdown_grace_s)


def create_app(engine: Engine, tokenizer: Tokenizer, cfg: ServeConfig | None = None,
               model_name: str = "openzaya") -> FastAPI:
    """The FastAPI app over one engine."""
    cfg = cfg or ServeConfig()
    app = FastAPI(title="openzaya", version="0.1.0", lifespan=_lifespan,
                  description="OpenAI-compatible ZAYA server with Markovian RSA test-time compute")
    app.state.srv = ServerState(engine, tokenizer, cfg, cfg.model_name or model_name)
    engine.record_routes = cfg.return_routed_experts
    app.add_middleware(GuardMiddleware, cfg=cfg, metrics=app.state.srv.metrics, protected=RL_PATHS)
    for exc, handler in [(APIError, _api_error), (SchedulerError, _scheduler_error),
                         (RequestValidationError, _validation_error), (StarletteHTTPException, _http_error),
                         (Exception, _unexpected)]:
        app.add_exception_handler(exc, handler)
    app.include_router(router)
    app.include_router(rl_router)
    return app


def load_app(model_dir, cfg: ServeConfig | None = None, device: str = "cpu", dtype=None,
             expert_cache_gb: float | None = None, compile: bool = False) -> FastAPI:
    cfg = cfg or ServeConfig()
    model, tokenizer = load_local(model_dir, dtype, device, expert_cache_gb)
    engine = text_engine(model, tokenizer, cfg.max_slots, cfg.max_len, compile)
    # served model id: the directory's name, or the repo id as given (as vLLM does)
    name = Path(model_dir).resolve().name if Path(model_dir).exists() else str(model_dir)
    return create_app(engine, tokenizer, cfg, model_name=name)


def main(args) -> int:
    import uvicorn

    if args.threads > 0:
        import torch
        torch.set_num_threads(args.threads)
    cfg = ServeConfig(max_slots=args.max_slots, max_len=args.max_len if args.max_len > 0 else None,
                      max_queue=args.max_queue, max_n=args.max_n, max_body_bytes=args.max_body_bytes,
                      read_timeout_s=args.read_timeout_s,
                      request_timeout_s=args.request_timeout_s, max_ttc_population=args.max_ttc_population,
                      max_ttc_rounds=args.max_ttc_rounds, shutdown_grace_s=args.shutdown_grace_s,
                      api_key=args.api_key, model_name=args.served_model_name,
                      weight_updates=args.enable_weight_updates,
                      return_routed_experts=args.enable_return_routed_experts)
    gb = getattr(args, "expert_cache_gb", -1)
    app = load_app(args.model, cfg, device=args.device, expert_cache_gb=gb if gb > 0 else None,
                   compile=args.compile)
    print(f"serving {app.state.srv.model_name} on http://{args.host}:{args.port}/v1 "
          f"({cfg.max_slots} slots, context {app.state.srv.limit})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=cfg.shutdown_grace_s,
                http=http_protocol(cfg, app.state.srv.metrics))   # read timeouts on each request's head (http_guard)
    return 0
