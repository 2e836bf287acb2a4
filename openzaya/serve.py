"""An OpenAI-compatible HTTP server for ZAYA checkpoints, with test-time compute (Markovian RSA & co.) built in.

    openzaya serve --model DIR [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--max-num-seqs 16]

The HTTP layer: limits (`ServeConfig`), request -> jobs (`ServerState`), the one response path of both endpoints
(`respond`), the TTC endpoint, routes, the app and the CLI entry. Around it: protocol.py (request schemas and the
field policy: every field is honoured or refused with a 400 naming it), http_guard.py (API key, body cap and read
timeouts before FastAPI parses anything; each status counted as sent), scheduler.py (ONE engine serves every client
through its thread: continuous batching across requests; the Prometheus metrics), openai_format.py (error, choice
and chunk shapes; `Reply` is what differs between /v1/completions and /v1/chat/completions), tokenizer.py
(`TextStream` / `split_stream`), ttc.py (the test-time compute itself).

Routes, in vLLM's shapes where vLLM has them: POST /v1/completions, /v1/chat/completions; GET /v1/models,
/v1/models/{id}; POST /tokenize ({"prompt"} or {"messages"} -> {"count", "max_model_len", "tokens", "token_strs"}),
/detokenize ({"tokens"} -> {"prompt"}); GET /tokenizer_info (special tokens and chat template: lm-eval's remote
tokenizer), /version, /health, /metrics (prometheus_client: HELP / TYPE lines, process metrics). As in vLLM, the API
key guards the /v1/ routes only.

- A request with `n` choices (or a list of prompts) becomes n sequences ("jobs"). Streaming is real: every SSE chunk
  is sent as soon as the engine produced its token. Text that may still change is held back: an incomplete UTF-8
  character, a tail that could be the start of a stop string, and (chat) a tail that could be the start of
  `</think>`. Chat splits the `<think>` block into `reasoning_content`.
- Logprobs are the raw model's log-softmax at temperature 1 (`GenResult.logprobs`, whatever the sampling knobs);
  completions' `logprobs: k` and chat's `top_logprobs: k` add the k most likely tokens at each step (completions:
  the sampled token is always listed too, as OpenAI and vLLM do). `echo` (completions, non-streaming) prepends the
  prompt to the text and, with `logprobs`, its tokens' logprobs (the first token's null): log-likelihood
  evaluation (lm-eval's local-completions) works, and `max_tokens: 0` scores the prompt alone.
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

Simplified: no tools / function calling, no JSON mode, no best-of selection (protocol.py lists what is refused);
`echo` does not stream; TTC takes a single user message (or a prompt).
"""

from __future__ import annotations

import asyncio
import time
from contextlib import aclosing, asynccontextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .backends import BackendError, SamplingParams, engine_params, load_local, text_engine
from .engine import Engine, GenParams, GenResult
from .http_guard import GuardMiddleware, error_response, http_protocol
from .openai_format import SSE_DONE, APIError, ChoiceStream, Reply, sse, usage
from .protocol import ChatBody, CompletionBody, DetokenizeBody, Message, TokenizeBody, refusal
from . import package_version
from .scheduler import (METRICS_CONTENT_TYPE, Job, Metrics, Scheduler, SchedulerBackend, SchedulerError, collect,
                        wait_jobs)
from .serve_rl import PATHS as RL_PATHS, WeightState, routed_experts, router as rl_router
from .tokenizer import Tokenizer, eos_union, split_reasoning
from .ttc import ProblemResult, Run, TTCConfig, TTCProblem, arun


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

    def check_model(self, name: str | None):
        if name is not None and name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def max_tokens(self, body, prompt_len: int, default: int | None) -> int:
        """Requested max tokens, checked against the context (prompt + max tokens <= limit); 0 only with echo."""
        asked = body.max_tokens
        if isinstance(body, ChatBody) and body.max_completion_tokens is not None:
            asked = body.max_completion_tokens
        if asked == 0 and not getattr(body, "echo", False):
            raise APIError(400, "max_tokens 0 is for scoring a prompt: it needs echo (completions)", param="max_tokens")
        room = self.limit - prompt_len
        if room < (0 if asked == 0 else 1):
            raise APIError(400, f"the prompt has {prompt_len} tokens; this model's context is {self.limit} tokens",
                           param="messages" if isinstance(body, ChatBody) else "prompt",
                           code="context_length_exceeded")
        if asked is None:
            return min(room, default) if default else room
        if prompt_len + asked > self.limit:
            raise APIError(400, f"prompt ({prompt_len} tokens) + max_tokens ({asked}) exceeds this model's context "
                                f"of {self.limit} tokens", param="max_tokens", code="context_length_exceeded")
        return asked

    def gen_params(self, body, reply: Reply, max_tokens: int, sample: int) -> GenParams:
        """The engine's parameters of one sequence; the body's unset sampling fields take OpenAI's defaults."""
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        params = SamplingParams(temperature=1.0 if body.temperature is None else body.temperature,
                                top_p=1.0 if body.top_p is None else body.top_p, top_k=max(0, body.top_k or 0),
                                min_p=body.min_p or 0.0, stop=[s for s in stop if s], seed=body.seed)
        eos = [] if body.ignore_eos else self.eos_ids + list(body.stop_token_ids or [])
        echo_logprobs = getattr(body, "echo", False) and reply.logprobs
        return replace(engine_params(params, eos, sample, max_tokens),
                       presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
                       repetition_penalty=body.repetition_penalty or 1.0, logit_bias=self.logit_bias(body),
                       top_logprobs=reply.top_logprobs if reply.logprobs else 0,
                       prompt_logprobs=reply.top_logprobs if echo_logprobs else None)

    def logit_bias(self, body) -> dict[int, float] | None:
        if not body.logit_bias:
            return None
        V = self.engine.config.vocab_size
        bad = [k for k in body.logit_bias if not (k.strip().isdigit() and int(k) < V)]
        if bad:
            raise APIError(400, f"logit_bias keys must be token ids in [0, {V}); got {bad[0][:40]!r}",
                           param="logit_bias")
        return {int(k): v for k, v in body.logit_bias.items()}

    def jobs_for(self, body, reply: Reply, prompts: list[list[int]], max_tokens: list[int],
                 deadline: float) -> list[Job]:
        """n jobs per prompt, job p * n + j with seed + j."""
        n = body.n
        if n * len(prompts) > self.cfg.max_n:
            raise APIError(400, f"n x prompts = {n * len(prompts)} sequences; this server allows at most "
                                f"{self.cfg.max_n} per request", param="n")
        return [Job(p * n + j, ids, self.gen_params(body, reply, max_tokens[p], j), body.stream, deadline)
                for p, ids in enumerate(prompts) for j in range(n)]

    def chat_ids(self, messages: list[Message], thinking: bool, add_generation_prompt: bool = True,
                 add_special_tokens: bool = False) -> list[int]:
        """The chat template applied to messages (developer is system), tokenized (the template writes BOS itself:
        add_special_tokens=True adds the tokenizer's special tokens on top, as vLLM's /tokenize does)."""
        msgs = []
        for m in messages:
            msg = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            if m.reasoning_content:
                msg["reasoning_content"] = m.reasoning_content
            msgs.append(msg)
        try:
            text = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt,
                                                      enable_thinking=thinking)
        except Exception as e:  # template errors (unknown role, ...) are the caller's input
            raise APIError(400, f"cannot apply the chat template: {e}", param="messages") from None
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def chat_prompt(self, body: ChatBody) -> tuple[list[int], bool]:
        thinking = body.chat_template_kwargs.enable_thinking if body.chat_template_kwargs else True
        if not any(m.role == "user" for m in body.messages):
            raise APIError(400, "messages must contain at least one user message", param="messages")
        return self.chat_ids(body.messages, thinking), thinking

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
                  request: HTTPRequest, deadline: float, echo: list[str] | None = None):
    """Both endpoints: prompts -> jobs -> a collected response, or an SSE stream. `echo`: the prompts' texts, put
    before each choice's text (with the prompt tokens' logprobs when logprobs are asked)."""
    if body.stream and (body.return_token_ids or body.return_routed_experts):
        raise APIError(400, "return_token_ids / return_routed_experts are for non-streaming requests", param="stream")
    if body.return_routed_experts and not srv.cfg.return_routed_experts:
        raise APIError(400, "start the server with --enable-return-routed-experts", param="return_routed_experts")
    if body.stream and echo is not None:
        raise APIError(400, "echo is supported for non-streaming requests only", param="stream")
    max_tokens = [srv.max_tokens(body, len(p), default_max_tokens) for p in prompts]
    jobs = srv.jobs_for(body, reply, prompts, max_tokens, deadline)
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
        n = len(res.tokens)
        text, tokens, lps, tops = res.text, res.tokens, res.logprobs, res.top_logprobs or [None] * n
        if echo is not None:
            ids = prompts[j.index // body.n]
            text, tokens = echo[j.index // body.n] + text, ids + tokens
            lps = (res.prompt_logprobs or [None] * len(ids)) + lps
            tops = (res.prompt_top_logprobs or [None] * len(ids)) + tops
        choices.append(reply.choice(j.index, text, res.finish_reason, tokens, lps, tops))
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
            ch = streams[idx].token(ev[1], ev[2], ev[3])
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
    return PlainTextResponse(srv.metrics.render(srv.sched), media_type=METRICS_CONTENT_TYPE)


@router.get("/version")
async def version():
    return {"version": package_version()}


def _model_card(srv: ServerState) -> dict:
    return {"id": srv.model_name, "object": "model", "created": srv.created, "owned_by": "openzaya",
            "max_model_len": srv.limit}


@router.get("/v1/models")
async def models(request: HTTPRequest):
    return {"object": "list", "data": [_model_card(request.app.state.srv)]}


@router.get("/v1/models/{model_id:path}")   # :path - a Hub repo id served as is holds a slash
async def model(model_id: str, request: HTTPRequest):
    srv: ServerState = request.app.state.srv
    srv.check_model(model_id)
    return _model_card(srv)


@router.get("/tokenizer_info")
async def tokenizer_info(request: HTTPRequest):
    """vLLM's endpoint (lm-eval's remote tokenizer reads it): the special tokens and the chat template."""
    srv: ServerState = request.app.state.srv
    tok = srv.tokenizer
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tok.bos_token, "eos_token": tok.eos_token,
            "pad_token": tok.pad_token, "chat_template": tok.chat_template, "model_max_length": srv.limit}


@router.post("/tokenize")
async def tokenize(body: TokenizeBody, request: HTTPRequest):
    """vLLM's /tokenize: a prompt, or messages through the chat template."""
    srv: ServerState = request.app.state.srv
    srv.check_model(body.model)
    _refuse(body)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give exactly one of prompt or messages", param="prompt")
    if body.prompt is not None:
        ids = srv.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens is not False)
    else:
        thinking = body.chat_template_kwargs.enable_thinking if body.chat_template_kwargs else True
        ids = srv.chat_ids(body.messages, thinking, body.add_generation_prompt, bool(body.add_special_tokens))
    strs = [srv.tokenizer.id_to_token(t) for t in ids] if body.return_token_strs else None
    return {"count": len(ids), "max_model_len": srv.limit, "tokens": ids, "token_strs": strs}


@router.post("/detokenize")
async def detokenize(body: DetokenizeBody, request: HTTPRequest):
    srv: ServerState = request.app.state.srv
    srv.check_model(body.model)
    V = srv.engine.config.vocab_size
    if any(t >= V for t in body.tokens):
        raise APIError(400, f"token ids must be in [0, {V})", param="tokens")
    return {"prompt": srv.tokenizer.decode(body.tokens)}


def _refuse(body):
    """A 400 naming the first field this server refuses (protocol.py's policy)."""
    if (refused := refusal(body)) is not None:
        raise APIError(400, refused[1], param=refused[0], code="unsupported_parameter")


def _accept(request: HTTPRequest, body) -> tuple[ServerState, float]:
    """The server state and the request's deadline, once the body names the served model and sets no field this
    server refuses."""
    srv: ServerState = request.app.state.srv
    srv.check_model(body.model)
    _refuse(body)
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
    echo = None
    if body.echo:   # the prompts as given; token-id prompts decoded
        p = body.prompt
        echo = [p] if isinstance(p, str) else p if all(isinstance(x, str) for x in p) else \
            [srv.tokenizer.decode(ids) for ids in prompts]
    return await respond(srv, body, reply, prompts, 16, request, deadline, echo)


@router.post("/v1/chat/completions")
async def chat(body: ChatBody, request: HTTPRequest):
    srv, deadline = _accept(request, body)
    ids, thinking = srv.chat_prompt(body)
    if body.ttc is not None:
        if len(body.messages) != 1 or body.messages[0].role != "user":
            raise APIError(400, "ttc takes exactly one user message (the question)", param="messages")
        reply = Reply(srv.tokenizer, chat=True, thinking=thinking)
        return await respond_ttc(srv, body, body.messages[0].text(), reply, request, deadline)
    if body.top_logprobs and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
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
             expert_cache_gb: float | None = None, compile: bool = False, chat_template: str | None = None) -> FastAPI:
    """The app of a checkpoint directory (or Hub repo id); `chat_template` (Jinja text) replaces the tokenizer's."""
    cfg = cfg or ServeConfig()
    model, tokenizer = load_local(model_dir, dtype, device, expert_cache_gb)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    engine = text_engine(model, tokenizer, cfg.max_slots, cfg.max_len, compile)
    # served model id: the directory's name, or the repo id as given (as vLLM does)
    name = Path(model_dir).resolve().name if Path(model_dir).exists() else str(model_dir)
    return create_app(engine, tokenizer, cfg, model_name=name)


DTYPES = ("auto", "bfloat16", "float16", "float32")   # --dtype; auto = as the checkpoint's config says


def resolve_serving(device: str, dtype: str, chat_template: str | None):
    """`openzaya serve`'s --device (auto: CUDA when torch sees one), --dtype and --chat-template (a file, or the
    Jinja text itself as vLLM takes it) as (device, torch dtype or None, template text or None)."""
    import torch

    from .train import resolve_device

    device = resolve_device(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: torch sees no CUDA device here (use --device auto or cpu)")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    if chat_template is not None and not ("{{" in chat_template or "{%" in chat_template):
        if not Path(chat_template).is_file():
            raise ValueError(f"--chat-template {chat_template}: no such file (give a Jinja file or the template)")
        chat_template = Path(chat_template).read_text()
    return device, None if dtype == "auto" else getattr(torch, dtype), chat_template


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
    device, dtype, template = resolve_serving(args.device, args.dtype, args.chat_template)
    gb = getattr(args, "expert_cache_gb", -1)
    app = load_app(args.model, cfg, device=device, dtype=dtype, expert_cache_gb=gb if gb > 0 else None,
                   compile=args.compile, chat_template=template)
    print(f"serving {app.state.srv.model_name} on http://{args.host}:{args.port}/v1 "
          f"({cfg.max_slots} slots, context {app.state.srv.limit}, {device}, {app.state.srv.engine.model.dtype})",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=cfg.shutdown_grace_s,
                http=http_protocol(cfg, app.state.srv.metrics))   # read timeouts on each request's head (http_guard)
    return 0
