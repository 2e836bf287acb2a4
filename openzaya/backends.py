"""One generation interface over our engine, any transformers model, and any OpenAI-compatible server.

Everything downstream (test-time compute, evaluation, RL rollouts, serving) talks to a `Backend`:
`generate(requests) -> list[list[Completion]]` (one list of `n` completions per request) and `agenerate`, its
async form. A request carries a prompt or chat messages plus sampling parameters; a completion carries the text,
its (reasoning, answer) split, token ids when known, the finish reason, usage and latency.
"""

from __future__ import annotations

import asyncio
import copy
import os
import random
import threading
import time
import weakref
from dataclasses import dataclass, field

from .tokenizer import CHARS_PER_TOKEN, Tokenizer, count_text, eos_union, split_reasoning, tail_text


@dataclass
class SamplingParams:
    temperature: float = 1.0      # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                # 0 = off
    min_p: float = 0.0            # 0 = off
    max_tokens: int = 256         # new tokens per completion
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    n: int = 1                    # completions per request


@dataclass
class Request:
    prompt: str | None = None                 # raw text prompt (used as is)
    messages: list[dict] | None = None        # chat messages [{"role": ..., "content": ...}], templated by the backend
    params: SamplingParams = field(default_factory=SamplingParams)
    id: str = ""
    # chat: passed to the chat template (OpenAI servers: chat_template_kwargs); all requests: with False, a
    # completion without </think> is all answer instead of all (truncated) reasoning (see split_reasoning)
    enable_thinking: bool = True

    def __post_init__(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("Request needs exactly one of prompt or messages")


@dataclass
class Completion:
    text: str                                  # the generated text (reasoning included)
    reasoning: str                             # the part inside <think> ... </think> (possibly truncated)
    answer: str                                # the part after </think> ('' when the think block never closed)
    finish_reason: str                         # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    token_ids: list[int] | None = None
    logprobs: list[float] | None = None        # log-probability of each sampled token, when known
    routes: object | None = None               # routed expert ids [L, T] for router replay (local backend only)


class BackendError(RuntimeError):
    """A server or model that could not answer: the message names the URL (or model) and the last error."""


def run_sync(coro):
    """asyncio.run, also from inside a running event loop (e.g. a notebook): then in a helper thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box = {}

    def target():
        try:
            box["result"] = asyncio.run(coro)
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


class Backend:
    """The interface. Subclasses override `generate` (blocking engines) or `agenerate` (async clients); each base
    method calls the other, the sync one through asyncio.run, the async one through a worker thread.

    `tokenizer` (an openzaya Tokenizer or None) makes count_tokens / tail_tokens exact. Without one, count_tokens is
    None and tail_tokens keeps the last CHARS_PER_TOKEN * n characters; `tail_approximation` names the method used
    (None when exact)."""

    tokenizer: Tokenizer | None = None

    def generate(self, requests: list[Request]) -> list[list[Completion]]:
        return run_sync(self.agenerate(list(requests)))

    async def agenerate(self, requests: list[Request]) -> list[list[Completion]]:
        return await asyncio.to_thread(self.generate, list(requests))

    @property
    def tail_approximation(self) -> str | None:
        return None if self.tokenizer is not None else f"last {CHARS_PER_TOKEN} characters per token"

    def prompt_ids(self, request: Request) -> list[int]:
        """Prompt text: encoded with the tokenizer's special tokens (BOS); messages: the chat template (holds BOS)."""
        if request.messages is not None:
            return self.tokenizer.apply_chat_template(request.messages, add_generation_prompt=True,
                                                      enable_thinking=request.enable_thinking, tokenize=True)
        return self.tokenizer.encode(request.prompt)

    def count_tokens(self, text: str) -> int | None:
        return None if self.tokenizer is None else count_text(self.tokenizer, text)

    def tail_tokens(self, text: str, n: int) -> str:
        """The last n tokens of text, as a suffix of it (Markovian RSA tails): `tokenizer.tail_text`."""
        return tail_text(self.tokenizer, text, n)

    def context_tokens(self) -> int | None:
        """Positions one call may use (prompt + completion), None when unknown."""
        return None


# ---------------------------------------------------------------------------------------------------------------------
# LocalBackend: our own engine on an openzaya checkpoint directory


def load_local(model_dir, dtype=None, device: str = "cpu", expert_cache_gb: float | None = None):
    """(model, tokenizer) of a checkpoint directory or Hub repo id, for LocalBackend and `openzaya serve`: resolved
    once (`checkpoint.resolve_model_dir`), so both come from the same snapshot. The model is one that is run and
    never trained: its experts offloaded behind a cache of `expert_cache_gb` GiB (offload.py), or the whole
    checkpoint loaded with its experts in the decode layout (`ZayaForCausalLM.relayout_experts_for_decode`)."""
    from .checkpoint import from_pretrained, resolve_model_dir

    local_dir = resolve_model_dir(model_dir)
    if expert_cache_gb is not None:
        from .offload import load_offloaded
        model = load_offloaded(local_dir, int(expert_cache_gb * 1024**3), dtype=dtype, device=device)
    else:
        model = from_pretrained(local_dir, dtype=dtype, device=device).relayout_experts_for_decode()
    return model, Tokenizer.load(local_dir)


def text_engine(model, tokenizer: Tokenizer, max_slots: int, max_len: int | None = None, compile: bool = False):
    """The engine behind LocalBackend and `openzaya serve`: max_len None = min(model context, 4096); completions are
    decoded with special tokens kept, so stop strings can name them."""
    from .engine import Engine

    max_len = max_len or min(model.config.max_position_embeddings, 4096)
    return Engine(model, max_slots=max_slots, max_len=max_len,
                  decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=False), compile=compile)


def engine_params(p: SamplingParams, eos_ids: list[int], sample: int = 0, max_tokens: int | None = None):
    """The engine's `GenParams` for sample `sample` of a request: its seed is seed + sample (kept under 2^63);
    max_tokens overrides p.max_tokens (a server fits it to the context)."""
    from .engine import GenParams

    return GenParams(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, min_p=p.min_p,
                     max_new_tokens=p.max_tokens if max_tokens is None else max_tokens, eos_ids=eos_ids,
                     stop=list(p.stop), seed=None if p.seed is None else (p.seed + sample) % (2 ** 63))


def completion_from_result(res, thinking: bool, latency_s: float) -> Completion:
    """An engine `GenResult` (text without EOS, cut before any stop string) as a `Completion`."""
    reasoning, answer = split_reasoning(res.text, thinking=thinking)
    return Completion(text=res.text, reasoning=reasoning, answer=answer, finish_reason=res.finish_reason,
                      prompt_tokens=res.prompt_tokens, completion_tokens=res.completion_tokens, latency_s=latency_s,
                      token_ids=list(res.tokens), logprobs=list(res.logprobs), routes=res.routes)


class LocalBackend(Backend):
    """Our continuous-batching engine (engine.py) on a native-layout ZAYA checkpoint directory with its tokenizer.

    All requests of one `generate` call (times their `n`) go through the engine together. Sample i of a request with
    seed s uses seed s + i. Completions carry token ids, raw model logprobs (temperature 1) and, with
    `return_routes=True`, the routed experts per token and layer (router replay in RL).
    `model` may be given instead of a directory (with a tokenizer), e.g. the live policy during RL.
    `expert_cache_gb` loads the checkpoint with its experts offloaded (openzaya/offload.py): a cache of that many GiB.
    `compile=True` runs the engine's decode step under torch.compile (Engine(compile=True): minutes of warm-up, and
    every step attends over all `max_len` positions, so size max_len to the workload).
    """

    def __init__(self, model_dir: str | os.PathLike | None = None, max_slots: int = 16, max_len: int | None = None,
                 device: str = "cpu", dtype=None, model=None, tokenizer: Tokenizer | None = None,
                 return_routes: bool = False, expert_cache_gb: float | None = None, compile: bool = False):
        if model is None:
            if model_dir is None:
                raise ValueError("LocalBackend needs model_dir or model")
            model, own_tokenizer = load_local(model_dir, dtype, device, expert_cache_gb)
            tokenizer = tokenizer or own_tokenizer
        if tokenizer is None:
            raise ValueError("LocalBackend(model=...) needs a tokenizer")
        self.model, self.tokenizer, self.return_routes = model, tokenizer, return_routes
        self.engine = text_engine(model, tokenizer, max_slots, max_len, compile)
        self.eos_ids = eos_union(model.config.eos_ids, tokenizer)

    def context_tokens(self) -> int:
        return min(self.engine.max_len, self.model.config.max_position_embeddings)

    def generate(self, requests: list[Request]) -> list[list[Completion]]:
        requests = list(requests)
        prompts, params, owner = [], [], []
        for i, r in enumerate(requests):
            ids = self.prompt_ids(r)
            for j in range(r.params.n):
                prompts.append(ids)
                params.append(engine_params(r.params, self.eos_ids, j))
                owner.append(i)
        t0 = time.perf_counter()
        results = self.engine.generate(prompts, params, return_routes=self.return_routes) if prompts else []
        latency = time.perf_counter() - t0
        out: list[list[Completion]] = [[] for _ in requests]
        for i, res in zip(owner, results):
            out[i].append(completion_from_result(res, requests[i].enable_thinking, latency))
        return out


# ---------------------------------------------------------------------------------------------------------------------
# HFBackend: any transformers causal LM


class HFBackend(Backend):
    """Batched `model.generate` over a transformers causal LM directory (or a GGUF in it, via gguf_file).

    - Requests with the same sampling parameters are batched (left padding, up to `batch_size` rows); stop strings
      and seeds may differ within a batch. n>1 repeats the prompt row; greedy n>1 decodes once and copies.
    - Seeds: every sampled row draws its tokens from its own torch.Generator (`_RowSampler`; sample i of a request
      with seed s uses s + i, as LocalBackend), so seeded requests batch together and still get the tokens they
      would get alone (test-time compute seeds every call); an unseeded row's generator is seeded from the global
      torch RNG (torch.manual_seed makes those reproducible too). Greedy decoding then picks the sampled token.
    - Stop strings end a row as soon as they appear; the text is cut just before the first one (OpenAI semantics),
      token_ids/logprobs keep the tokens up to the one that completed it. EOS ends a row; its id is kept in
      token_ids (and counted in completion_tokens), not in the text.
    - logprobs: log-softmax of the scores the token was sampled from (after temperature / top-k / top-p / min-p
      processing; for T=1 without truncation these are the model's log-probs). Collected step by step, so memory is
      one [rows, vocab] buffer, not [rows, steps, vocab].
    - latency_s is the wall time of the batch the completion was generated in.
    NOTE: on a CPU shared with other processes, torch.set_num_threads(1) can be ~5-10x faster than the default
    (contended OpenMP threads spin); Gemma-vocabulary models spend most decode time in the 262k-row lm_head.
    """

    def __init__(self, model_dir: str | os.PathLike, gguf_file: str | None = None, device: str = "cpu",
                 dtype=None, chat_template: str | None = None, batch_size: int = 16):
        import torch
        from transformers import AutoModelForCausalLM

        self.device = torch.device(device)
        if dtype is None:  # fp32 on CPU (bf16 matmuls are slow there), bf16 on accelerators
            dtype = torch.float32 if self.device.type == "cpu" else torch.bfloat16
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, **kwargs).to(self.device).eval()
        self.tokenizer = Tokenizer.load(model_dir, gguf_file=gguf_file)
        if chat_template is not None:
            self.tokenizer.chat_template = chat_template
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = eos_union([] if eos is None else [eos] if isinstance(eos, int) else eos, self.tokenizer)
        assert self.eos_ids, f"{model_dir}: no eos token in the generation config or the tokenizer"
        pad = self.tokenizer.pad_id
        if pad is None:
            pad = self.model.generation_config.pad_token_id
        self.pad_id = pad if pad is not None else self.eos_ids[0]
        self.batch_size = batch_size

    def context_tokens(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    def generate(self, requests: list[Request]) -> list[list[Completion]]:
        requests = list(requests)
        prompts = [self.prompt_ids(r) for r in requests]
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            p = r.params
            greedy = p.temperature == 0
            key = (greedy, p.temperature, p.top_p, p.top_k, p.min_p, p.max_tokens, 1 if greedy else p.n)
            groups.setdefault(key, []).append(i)
        out: list[list[Completion] | None] = [None] * len(requests)
        for idxs in groups.values():
            params = requests[idxs[0]].params
            rows_per_request = 1 if params.temperature == 0 else params.n
            step = max(1, self.batch_size // rows_per_request)
            for k in range(0, len(idxs), step):
                chunk = idxs[k:k + step]
                for i, comps in zip(chunk, self._generate_batch([requests[i] for i in chunk],
                                                                [prompts[i] for i in chunk])):
                    out[i] = comps
        return out

    def _generate_batch(self, requests: list[Request], prompts: list[list[int]]) -> list[list[Completion]]:
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        p = requests[0].params
        greedy = p.temperature == 0
        n_seq = 1 if greedy else p.n
        rows = [ids for ids in prompts for _ in range(n_seq)]          # row b * n_seq + s = sample s of request b
        B, L = len(rows), max(len(ids) for ids in rows)
        input_ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((B, L), dtype=torch.long)
        for b, ids in enumerate(rows):  # left padding
            input_ids[b, L - len(ids):] = torch.tensor(ids)
            attention_mask[b, L - len(ids):] = 1
        stops = [r.params.stop for r in requests for _ in range(n_seq)]  # one entry per generated row
        recorder = _LogprobRecorder()
        processors = [recorder] if greedy else [*_warpers(p), recorder, _RowSampler(
            [self._row_generator(r.params.seed, s) for r in requests for s in range(n_seq)])]
        t0 = time.perf_counter()
        with torch.no_grad():
            seqs = self.model.generate(
                input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                do_sample=False, max_new_tokens=p.max_tokens, eos_token_id=self.eos_ids,
                pad_token_id=self.pad_id, logits_processor=LogitsProcessorList(processors),
                stopping_criteria=StoppingCriteriaList([_StopStrings(self.tokenizer, stops, L)]))
        latency = time.perf_counter() - t0
        new_ids = seqs[:, L:].cpu()
        logprobs = recorder.finish(seqs).cpu()  # (rows, T)
        results = []
        for b, r in enumerate(requests):
            comps = []
            for s in range(n_seq):
                row = b * n_seq + s
                comps.append(self._completion(r, new_ids[row].tolist(), logprobs[row].tolist(), len(prompts[b]),
                                              latency))
            results.append(comps if n_seq == r.params.n else [comps[0]] + [  # greedy n>1: copies
                copy.deepcopy(comps[0]) for _ in range(r.params.n - 1)])
        return results

    def _row_generator(self, seed: int | None, sample: int):
        """The generator of sample `sample` of a request: seed + sample, or a seed drawn from the global torch RNG."""
        import torch

        if seed is None:
            seed = int(torch.randint(0, 2 ** 62, ()).item())
        return torch.Generator(device=self.device).manual_seed((seed + sample) % (2 ** 63))

    def _completion(self, r: Request, ids: list[int], logprobs: list[float], prompt_len: int,
                    latency: float) -> Completion:
        finish, end = "length", len(ids)
        eos = set(self.eos_ids)
        for j, t in enumerate(ids):
            if t in eos:
                finish, end = "stop", j + 1
                break
        ids = ids[:end]
        text = self.tokenizer.decode(ids[:-1] if finish == "stop" else ids)
        cut = min((text.find(s) for s in r.params.stop if s and s in text), default=-1)
        if cut >= 0:
            text, finish = text[:cut], "stop"
            # the shortest token prefix whose text holds a stop string (monotone in the length: bisect)
            lo, hi = 1, len(ids)
            while lo < hi:
                mid = (lo + hi) // 2
                decoded = self.tokenizer.decode(ids[:mid])
                if any(s and s in decoded for s in r.params.stop):
                    hi = mid
                else:
                    lo = mid + 1
            ids = ids[:lo]
        reasoning, answer = split_reasoning(text, thinking=r.enable_thinking)
        return Completion(text=text, reasoning=reasoning, answer=answer, finish_reason=finish,
                          prompt_tokens=prompt_len, completion_tokens=len(ids), latency_s=latency, token_ids=ids,
                          logprobs=logprobs[:len(ids)])


class _LogprobRecorder:
    """A logits processor (runs last) that keeps the previous step's log-softmax and, on the next call, reads off the
    log-prob of the token that step sampled (now the last input id)."""

    def __init__(self):
        self.prev = None
        self.steps = []

    def __call__(self, input_ids, scores):
        import torch

        if self.prev is not None:
            self.steps.append(self.prev.gather(1, input_ids[:, -1:]).squeeze(1))
        self.prev = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, sequences):
        import torch

        if self.prev is not None:
            self.steps.append(self.prev.gather(1, sequences[:, -1:]).squeeze(1))
        return torch.stack(self.steps, dim=1) if self.steps else torch.zeros((sequences.shape[0], 0))


def _warpers(p: SamplingParams) -> list:
    """transformers' sampling warpers for p, in the order `generate(do_sample=True)` applies them."""
    from transformers import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    out = [TemperatureLogitsWarper(p.temperature)] if p.temperature != 1.0 else []
    if p.top_k > 0:
        out.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        out.append(TopPLogitsWarper(p.top_p))
    if p.min_p > 0:
        out.append(MinPLogitsWarper(p.min_p))
    return out


class _RowSampler:
    """A logits processor (runs last) that samples each row's next token from that row's own torch.Generator and
    returns scores that are -inf except at the sampled token, so greedy decoding picks it: a row's tokens depend on
    its seed and its own logits only, not on which rows share its batch."""

    def __init__(self, generators: list):
        self.generators = generators

    def __call__(self, input_ids, scores):
        import torch

        probs = torch.softmax(scores.float(), dim=-1)
        picks = torch.stack([torch.multinomial(probs[r], 1, generator=g) for r, g in enumerate(self.generators)])
        return torch.full_like(scores, float("-inf")).scatter_(1, picks, 0.0)


class _StopStrings:
    """Stopping criterion: per row, done once its decoded new tokens (a window as long as the longest stop string
    plus slack) contain one of that row's stop strings."""

    def __init__(self, tokenizer: Tokenizer, stops: list[list[str]], prompt_len: int):
        self.tokenizer, self.stops, self.prompt_len = tokenizer, stops, prompt_len
        self.window = max((len(s) for row in stops for s in row), default=0) + 8

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for row, stops in enumerate(self.stops):
            if stops:
                tail = self.tokenizer.decode(input_ids[row, self.prompt_len:][-self.window:].tolist())
                done[row] = any(s and s in tail for s in stops)
        return done


# ---------------------------------------------------------------------------------------------------------------------
# OpenAIBackend: any OpenAI-compatible server (vLLM, SGLang, llama.cpp, hosted APIs)


class OpenAIBackend(Backend):
    """Async client for /v1/completions (prompt requests) and /v1/chat/completions (message requests).

    - At most `max_concurrency` HTTP requests in flight (per event loop); each has `timeout_s`.
    - Retries (`max_retries` more attempts, exponential backoff from `backoff_s`, Retry-After honoured up to 60 s)
      on connection errors, timeouts, 408/409/429 and 5xx. Other statuses, or an exhausted budget, raise
      BackendError naming the URL and the last error.
    - max tokens: completions send `max_tokens`; chat sends `max_completion_tokens` (the current OpenAI name) and,
      when a server answers 400 mentioning that field, switches to `max_tokens` for the rest of this backend's life.
    - n>1: sent natively; if a server returns fewer choices (it ignores n), the missing ones are fanned out as n=1
      requests (seeds seed+1, seed+2, ... when seeded) and the route is fanned out directly from then on.
    - Reasoning: message.reasoning_content (or .reasoning, newer vLLM) is the reasoning and content the answer;
      `text` is rebuilt as "<think>\\n{reasoning}\\n</think>\\n\\n{content}". Otherwise split_reasoning(text).
    - Usage: prompt_tokens from the server; completion_tokens per choice from the server when n=1, else from
      logprobs if requested, else the tokenizer if given, else the server total split evenly.
    - `tokenizer` (an openzaya Tokenizer or a path for Tokenizer.load) makes count_tokens/tail_tokens exact.
    - Requests with enable_thinking=False send chat_template_kwargs={"enable_thinking": false} (vLLM/SGLang).
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, max_concurrency: int = 16,
                 timeout_s: float = 600.0, max_retries: int = 4, backoff_s: float = 0.5,
                 tokenizer: Tokenizer | str | os.PathLike | None = None, logprobs: bool = False,
                 token_ids: bool = False):
        base_url = base_url.rstrip("/")
        self.base_url = base_url if base_url.endswith("/v1") else base_url + "/v1"
        self.model, self.api_key = model, api_key
        self.max_concurrency, self.timeout_s = max_concurrency, timeout_s
        self.max_retries, self.backoff_s, self.logprobs = max_retries, backoff_s, logprobs
        self.token_ids = token_ids     # ask for the sampled token ids (vLLM's and openzaya's return_token_ids)
        self.tokenizer = Tokenizer.load(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
        self.chat_max_tokens_key = "max_completion_tokens"
        self.native_n = {"completions": True, "chat/completions": True}
        self._semaphores: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # one per event loop

    async def agenerate(self, requests: list[Request]) -> list[list[Completion]]:
        import httpx

        loop = asyncio.get_running_loop()
        semaphore = self._semaphores.setdefault(loop, asyncio.Semaphore(self.max_concurrency))
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        limits = httpx.Limits(max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency)
        async with httpx.AsyncClient(timeout=httpx.Timeout(self.timeout_s), headers=headers, limits=limits) as client:
            return list(await asyncio.gather(*(self._request(client, semaphore, r) for r in requests)))

    async def _request(self, client, semaphore, r: Request) -> list[Completion]:
        route = "chat/completions" if r.messages is not None else "completions"
        n, seed = r.params.n, r.params.seed
        comps = await self._call(client, semaphore, r, route, n if self.native_n[route] else 1, seed)
        if len(comps) < n:
            if n > 1 and self.native_n[route] and len(comps) == 1:
                self.native_n[route] = False  # the server ignores n
            more = await asyncio.gather(*(
                self._call(client, semaphore, r, route, 1, None if seed is None else seed + k)
                for k in range(len(comps), n)))
            comps += [c for cs in more for c in cs]
        return comps[:n]

    async def _call(self, client, semaphore, r: Request, route: str, n: int, seed: int | None) -> list[Completion]:
        p = r.params
        body = {"model": self.model, "temperature": p.temperature, "top_p": p.top_p, "n": n}
        if p.stop:
            body["stop"] = list(p.stop)
        if seed is not None:
            body["seed"] = seed
        if p.top_k > 0:  # non-standard sampling fields only when used (strict servers reject unknown fields)
            body["top_k"] = p.top_k
        if p.min_p > 0:
            body["min_p"] = p.min_p
        if self.token_ids:
            body["return_token_ids"] = True
        if route == "completions":
            body.update(prompt=r.prompt, max_tokens=p.max_tokens)
            if self.logprobs:
                body["logprobs"] = 1
        else:
            body.update(messages=r.messages)
            body[self.chat_max_tokens_key] = p.max_tokens
            if not r.enable_thinking:
                body["chat_template_kwargs"] = {"enable_thinking": False}
            if self.logprobs:
                body["logprobs"] = True
        data, latency = await self._post(client, semaphore, route, body)
        return self._parse(r, route, data, latency)

    async def _post(self, client, semaphore, route: str, body: dict) -> tuple[dict, float]:
        import httpx

        url = f"{self.base_url}/{route}"
        last_error, delay = "", 0.0
        for attempt in range(self.max_retries + 1):
            if delay > 0:
                await asyncio.sleep(delay)
            delay = self.backoff_s * 2 ** attempt * (1 + 0.25 * random.random())
            try:
                async with semaphore:
                    t0 = time.perf_counter()
                    resp = await client.post(url, json=body)
                    latency = time.perf_counter() - t0
            except httpx.TransportError as e:  # connect errors, timeouts, dropped connections
                last_error = f"{type(e).__name__}: {e}"
                continue
            if resp.status_code == 200:
                return resp.json(), latency
            last_error = f"HTTP {resp.status_code}: {resp.text[:500]}"
            if (resp.status_code == 400 and "max_completion_tokens" in body
                    and "max_completion_tokens" in resp.text):
                self.chat_max_tokens_key = "max_tokens"
                body = {("max_tokens" if k == "max_completion_tokens" else k): v for k, v in body.items()}
                delay = 0.0
                continue
            if resp.status_code in (408, 409, 429) or resp.status_code >= 500:
                retry_after = resp.headers.get("retry-after", "")
                if retry_after.replace(".", "", 1).isdigit():
                    delay = max(delay, min(float(retry_after), 60.0))
                continue
            raise BackendError(f"{url}: {last_error}")
        raise BackendError(f"{url}: no answer after {self.max_retries + 1} attempts; last error: {last_error}")

    def context_tokens(self) -> int | None:
        """`max_model_len` of this model in GET /v1/models (vLLM, SGLang, openzaya serve); None when the server does
        not report it. A server that lists its models but not this one is an error naming the ones it serves."""
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            resp = httpx.get(f"{self.base_url}/models", headers=headers, timeout=min(self.timeout_s, 30.0))
        except httpx.TransportError as e:
            raise BackendError(f"{self.base_url}/models: {type(e).__name__}: {e} (is the server running?)") from e
        if resp.status_code == 401:
            raise BackendError(f"{self.base_url}/models: HTTP 401: the server wants an API key (--api-key KEY or "
                               f"OPENAI_API_KEY)")
        if resp.status_code != 200:
            return None
        models = (resp.json() or {}).get("data") or []
        for m in models:
            if m.get("id") == self.model:
                return m.get("max_model_len")
        if models:
            raise BackendError(f"{self.base_url} serves {', '.join(repr(m.get('id')) for m in models[:8])}, not "
                               f"{self.model!r}: pass one of them as --model")
        return None

    def _parse(self, r: Request, route: str, data: dict, latency: float) -> list[Completion]:
        usage = data.get("usage") or {}
        choices = sorted(data.get("choices") or [], key=lambda c: c.get("index", 0))
        comps = []
        for ch in choices:
            finish = "length" if ch.get("finish_reason") == "length" else "stop"
            if route == "chat/completions":
                message = ch.get("message") or {}
                content = message.get("content") or ""
                thought = message.get("reasoning_content") or message.get("reasoning")
                lp = ch.get("logprobs") or {}
                logprobs = [t["logprob"] for t in lp.get("content") or []] or None
            else:
                content, thought = ch.get("text") or "", None
                logprobs = (ch.get("logprobs") or {}).get("token_logprobs") or None
            if thought:
                truncated = not content and finish == "length"
                text = f"<think>\n{thought}" if truncated else f"<think>\n{thought}\n</think>\n\n{content}"
                reasoning, answer = thought.strip(), content.strip()
            else:
                text = content
                reasoning, answer = split_reasoning(text, thinking=r.enable_thinking)
            if len(choices) == 1 and "completion_tokens" in usage:
                n_tokens = usage["completion_tokens"]
            elif logprobs is not None:
                n_tokens = len(logprobs)
            elif self.tokenizer is not None:
                n_tokens = self.count_tokens(text)
            else:
                n_tokens = round(usage.get("completion_tokens", 0) / max(1, len(choices)))
            comps.append(Completion(text=text, reasoning=reasoning, answer=answer, finish_reason=finish,
                                    prompt_tokens=usage.get("prompt_tokens", 0), completion_tokens=n_tokens,
                                    latency_s=latency, token_ids=ch.get("token_ids"), logprobs=logprobs))
        return comps


def make_backend(kind: str, model: str, base_url: str | None = None, gguf_file: str | None = None,
                 tokenizer: str | None = None, max_concurrency: int = 16, max_len: int | None = None,
                 max_slots: int = 16, api_key: str | None = None, expert_cache_gb: float | None = None,
                 compile: bool = False) -> Backend:
    """A backend from CLI-style arguments: kind local (openzaya checkpoint dir), hf (transformers dir, optionally a
    GGUF in it) or openai (server at base_url serving `model`; `tokenizer` dir makes token counts exact; `api_key`,
    else $OPENAI_API_KEY, as the openai client does)."""
    if expert_cache_gb is not None and kind != "local":
        raise ValueError(f"--expert-cache-gb needs --backend local (got {kind!r})")
    if compile and kind != "local":
        raise ValueError(f"--compile needs --backend local (got {kind!r})")
    if kind == "local":
        return LocalBackend(model, max_slots=max_slots, max_len=max_len, expert_cache_gb=expert_cache_gb,
                            compile=compile)
    if kind == "hf":
        return HFBackend(model, gguf_file=gguf_file, batch_size=max_slots)
    if kind == "openai":
        if not base_url:
            raise ValueError("--backend openai needs --base-url (e.g. http://localhost:8000/v1)")
        return OpenAIBackend(base_url, model, api_key=api_key or os.environ.get("OPENAI_API_KEY"),
                             max_concurrency=max_concurrency, tokenizer=tokenizer)
    raise ValueError(f"unknown backend {kind!r}: choose local, hf or openai")
