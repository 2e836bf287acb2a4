"""Batched generation for ZAYA models on token ids: prefill / decode_one_token over a preallocated `ZayaCache`,
continuous batching over a fixed number of slots, and a static-batching mode kept as the benchmark peer.

How a `generate` call runs (continuous mode):
- Each request gets a slot of one preallocated `ZayaCache(config, max_slots, max_len)`. Active requests always
  occupy slots [0, n): when one finishes, the request in the last active slot is moved into the hole (a copy of
  its cache row, a few MB at most), so the decode step runs exactly the active rows through `cache.rows(0, n)`
  and never computes garbage rows. Nothing is reallocated per token.
- Free slots are refilled from the queue at once: the admitted prompts are left-padded together and prefilled
  into their slots (`cache.reset` + `cache.rows`), while the other slots keep their state.
- One decode step: the last sampled token of every active row goes through the model with `logits_to_keep=1`,
  then all rows are sampled at once (`sample`), with one host transfer of the new tokens per step (needed anyway
  to check eos / stop strings and to refill slots).
Static mode (`continuous=False`): up to `max_slots` prompts are left-padded together and decoded until the
longest is done (finished rows keep decoding, their tokens ignored), then the next group: the classic peer.

Sampling (sampling.py): temperature 0 is greedy (argmax). Otherwise logits / T, then min-p, top-k, top-p, then
inverse-CDF sampling with one uniform per row drawn from that request's own `torch.Generator` (seeded by
`GenParams.seed`). The same seed and the same batch composition therefore give the same tokens; across batch
compositions only float rounding of the batched matmuls can differ. `logit_bias` and the repetition / frequency /
presence penalties adjust the logits first (vLLM's order and definitions, sampling.py); a batch where no row sets
them samples from the untouched logits.

Log-probabilities: `GenResult.logprobs` is the raw model's log-softmax at temperature 1 (no filtering, no bias or
penalty) of each sampled token, what RL needs for importance ratios / KL; with `GenParams.top_logprobs = k`,
`GenResult.top_logprobs` also lists the k most likely tokens of that same distribution at every step.
`GenResult.sampling_logprobs` is the log-probability under the distribution actually sampled from (after bias,
penalties, temperature and filters; 0 for greedy tokens). With `GenParams.prompt_logprobs = k` (not None) the
prefill also scores the prompt: `GenResult.prompt_logprobs` holds log p(prompt[t] | prompt[:t]) for every prompt
token (None for the first, which nothing predicts) and `prompt_top_logprobs` the k most likely tokens at each
position; such requests are prefilled in groups of their own (their prefill keeps every position's hidden state).
`max_new_tokens = 0` returns no tokens (finish reason "length"): with prompt_logprobs, a pure scoring request.

Finishing: an eos id ends a request with reason "stop"; the eos token is kept in `tokens` (with its logprob,
RL must learn to stop) but left out of `text`. A stop string ends it with reason "stop" and is cut exactly: `text`
ends right before the first occurrence of any stop string in the completion's text, and `tokens` keeps the
longest prefix whose decoded text does not reach into the stop string. NOTE: when a stop string starts in the
middle of a token, that token is dropped, so `text` can hold a few characters more than `decode(tokens)`.
Otherwise a request ends with reason "length" after `max_new_tokens` tokens (or when its cache row is full).

Router replay: with `return_routes=True`, `GenResult.routes` is a long tensor [L, T_prompt + T_gen] of the
expert chosen per layer for every prompt and completion token (-1 = skip class), aligned with
`prompt + tokens`. The last completion token was never fed to the model, so its column is -1; feeding
`model(ids, replay_routes=routes[:, None])` reproduces the logits at every position that scores a completion
token (all but the last one).

Incremental interface (serving): `submit(prompt, params) -> handle`, `step() -> list[StepOutput]` and
`cancel(handle)` drive the same slots one step at a time, so a server can admit requests while others decode.
`step()` does what one iteration of `generate`'s loop does: if requests wait and slots are free it admits them
(prefill, which yields each admitted request's first token), otherwise it runs one decode step over every active
row; either way it returns the new token of every row that produced one, with the `GenResult` attached when that
request finished (its slot is free again at once). `cancel` drops a waiting request or frees a running one's slot
immediately. The interface shares the cache with `generate`, so the two must not be mixed (generate raises while
incremental requests are in flight), and it is single-threaded: one thread calls submit/step/cancel (serve.py's
scheduler thread). With `record_routes = True` every result carries its routes as in `generate(return_routes=True)`
(openzaya serve --enable-return-routed-experts: RL trainers replay them).

Shape legend: B active rows (slots in use), S slots, T tokens, V vocab, L layers.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from openzaya.model import ZayaCache, ZayaForCausalLM
from openzaya.sampling import PenaltyState, prompt_logprobs, sample, sampling_batch, uses_penalties


@dataclass
class GenParams:
    temperature: float = 1.0          # 0 = greedy
    top_p: float = 1.0                # 1 = off
    top_k: int = 0                    # <= 0 = off
    min_p: float = 0.0                # 0 = off
    max_new_tokens: int = 256
    eos_ids: list[int] | None = None  # None = the model config's eos ids
    stop: list[str] = field(default_factory=list)   # stop strings (needs Engine(decode=...))
    seed: int | None = None           # None = drawn from torch's global RNG
    # OpenAI / vLLM request knobs (sampling.py has their definitions); the defaults are off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    top_logprobs: int = 0             # k most likely tokens (raw logprobs) at every generated step
    prompt_logprobs: int | None = None  # None = off; k >= 0: score the prompt's tokens, plus k alternatives each


@dataclass
class GenResult:
    tokens: list[int]                 # completion token ids (eos included when it ended the request)
    logprobs: list[float]             # raw model log-softmax at temperature 1 of each token
    sampling_logprobs: list[float]    # log-prob under the sampling distribution used (0 for greedy)
    finish_reason: str                # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    text: str | None = None           # decode(tokens) cut before any stop string (None without decode)
    routes: torch.Tensor | None = None  # [L, prompt_tokens + completion_tokens] expert ids, -1 = none
    top_logprobs: list[list[tuple[int, float]]] | None = None    # per token: k (token, raw logprob), most likely first
    prompt_logprobs: list[float | None] | None = None             # per prompt token (the first: None)
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None


# -----------------------------------------------------------------------------
# Model steps


def prefill(model: ZayaForCausalLM, cache: ZayaCache, ids_BT, mask_BT, return_routes: bool):
    """Run left-padded prompts into their (freshly reset) cache rows. Returns last-position logits [B, V], routes."""
    out = model(ids_BT, mask_BT, cache, logits_to_keep=1, return_routes=return_routes)
    if return_routes:
        return out[0][:, -1], out[1]
    return out[:, -1], None


def prefill_hidden(model: ZayaForCausalLM, cache: ZayaCache, ids_BT, mask_BT, return_routes: bool):
    """`prefill` that also keeps every position's final hidden state (to score the prompt): (last-position logits
    [B, V], hidden [B, T, D], routes)."""
    out = model(ids_BT, mask_BT, cache, return_routes=return_routes, return_hidden=True)
    x_BTD, routes = (out[0], out[1]) if return_routes else (out, None)
    return F.linear(x_BTD[:, -1], model.output_embeddings()).float(), x_BTD, routes


def decode_one_token(model: ZayaForCausalLM, cache: ZayaCache, tok_B, return_routes: bool):
    """Append one token per row. Returns logits [B, V] and routes [L, B, 1] (or None)."""
    out = model(tok_B[:, None], None, cache, logits_to_keep=1, return_routes=return_routes)
    if return_routes:
        return out[0][:, -1], out[1]
    return out[:, -1], None


def _compiled_decode(compiled):
    """decode_one_token compiled once for every batch size >= 2 (batch 1 is specialised: one more compile).
    The cache rows reach the compiler as tensors held by a ZayaCache; without marking their batch dimension dynamic,
    the first compile specialises on the first batch size and the next one recompiles (~1.5 min on CPU)."""
    def decode_fn(model, cache: ZayaCache, tok_B, return_routes: bool):
        for t in [*cache.k, *cache.v, *cache.conv, *cache.vdel, cache.write_B, cache.pos_B, cache.valid_BS, tok_B]:
            torch._dynamo.maybe_mark_dynamic(t, 0)
        return compiled(model, cache, tok_B, return_routes)
    return decode_fn


class _GraphedDecode:
    """decode_one_token captured as one CUDA graph per (batch size, return_routes) and replayed each step, as vLLM
    does for its decode: one graph launch instead of hundreds of small kernels, and none of the eager step's host
    syncs (the experts take their sync-free path, model._experts_forward_static, and the step attends over all
    max_len cache positions, unwritten keys masked: size max_len to the workload, as with compile). The engine
    always decodes cache rows [0, B) and reads tokens from `tok_S[:B]`, so the captured addresses stay valid; a
    graph is captured again when any parameter changes (version counters), since derived weights are cached outside
    the graph. CUDA only, no compilation: the first capture, with its eager warm-up step, took 0.12 s at batch 16
    on an H200 (bench/engine.py). Engine turns it on by default on CUDA (`cuda_graphs=None`)."""

    def __init__(self, model: ZayaForCausalLM):
        self.params = list(model.parameters())
        self.graphs: dict = {}
        self.stamp = None
        self.pool = torch.cuda.graph_pool_handle()

    def __call__(self, model, cache: ZayaCache, tok_B, return_routes: bool):
        stamp = tuple(p._version for p in self.params)
        if stamp != self.stamp:
            self.graphs.clear()
            self.stamp = stamp
        key = (tok_B.shape[0], return_routes, tok_B.data_ptr(), cache.write_B.data_ptr())
        if key not in self.graphs:
            self.graphs[key] = self._capture(model, cache, tok_B, return_routes)
        graph, out = self.graphs[key]
        graph.replay()
        return out

    def _capture(self, model, cache: ZayaCache, tok_B, return_routes):
        if not self.graphs:
            self._warm_up(model, cache, tok_B, return_routes)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = decode_one_token(model, cache, tok_B, return_routes)
        return graph, out

    @staticmethod
    def _warm_up(model, cache: ZayaCache, tok_B, return_routes):
        """One eager step on a side stream before the first capture (library handles, derived weights); then the
        per-row state it advanced is restored. Its k/v writes land where the next real step writes."""
        saved = [t.clone() for t in (*cache.conv, *cache.vdel, cache.write_B, cache.pos_B, cache.valid_BS)]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            decode_one_token(model, cache, tok_B, return_routes)
        torch.cuda.current_stream().wait_stream(side)
        for t, v in zip((*cache.conv, *cache.vdel, cache.write_B, cache.pos_B, cache.valid_BS), saved):
            t.copy_(v)


def _sampling_ok(gp: GenParams, vocab_size: int) -> bool:
    """The ranges `sample` and torch.Generator take: a finite temperature >= 0, top_p in (0, 1], min_p in [0, 1],
    top_k within int64, 0 <= max_new_tokens < 2^63, a seed in [-2^63, 2^64), finite penalties (repetition > 0),
    logit_bias over token ids of the vocabulary with finite values, top_logprobs / prompt_logprobs >= 0 (NaN fails
    every comparison)."""
    bias = gp.logit_bias or {}
    return (math.isfinite(gp.temperature) and gp.temperature >= 0 and 0 < gp.top_p <= 1 and 0 <= gp.min_p <= 1
            and -2**63 <= gp.top_k < 2**63 and 0 <= gp.max_new_tokens < 2**63
            and (gp.seed is None or -2**63 <= gp.seed < 2**64)
            and all(math.isfinite(x) for x in (gp.presence_penalty, gp.frequency_penalty, gp.repetition_penalty))
            and gp.repetition_penalty > 0 and all(0 <= t < vocab_size and math.isfinite(v) for t, v in bias.items())
            and 0 <= gp.top_logprobs < 2**63 and (gp.prompt_logprobs is None or 0 <= gp.prompt_logprobs < 2**63))


# -----------------------------------------------------------------------------
# Engine


@dataclass
class StepOutput:
    """One new token of one request from `Engine.step()`; `result` is set when the request finished with it.
    token / logprob are None for a request that finished at admission without a token (max_new_tokens = 0)."""
    handle: int
    token: int | None
    logprob: float | None             # raw model log-softmax at temperature 1
    result: GenResult | None = None
    top: list[tuple[int, float]] | None = None   # the k most likely (token, raw logprob) when asked


@dataclass
class _Live:
    """Host-side state of one running request."""
    idx: int                          # request index in the generate call
    params: GenParams
    budget: int                       # tokens it may still produce in total
    eos: frozenset
    gen: torch.Generator | None
    tokens: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    sampling_logprobs: list = field(default_factory=list)
    top_logprobs: list | None = None  # per token, when params.top_logprobs > 0
    prompt_logprobs: tuple = (None, None)   # (logprobs, top alternatives) of the prompt, when asked
    done: str | None = None           # finish reason once finished


class Engine:
    """Batched generation over `max_slots` cache rows of `max_len` positions each (prompt + completion)."""

    def __init__(self, model: ZayaForCausalLM, max_slots: int, max_len: int,
                 decode: Callable[[list[int]], str] | None = None, compile: bool = False,
                 cuda_graphs: bool | None = None):
        if max_slots < 1 or max_len < 2:
            raise ValueError(f"Engine needs max_slots >= 1 and max_len >= 2 (got max_slots={max_slots}, "
                             f"max_len={max_len})")
        offloaded = getattr(model, "offload", None) is not None
        if compile and offloaded:
            raise ValueError("compile=True does not combine with offloaded experts (openzaya/offload.py loads "
                             "experts from Python between the layers)")
        if cuda_graphs is None:   # default: on wherever it can run (bench/engine.py on an H200: 33x transformers)
            cuda_graphs = model.device.type == "cuda" and not compile and not offloaded
        if cuda_graphs and (model.device.type != "cuda" or compile or offloaded):
            raise ValueError("cuda_graphs=True needs the model on a CUDA device, without compile=True and without "
                             f"offloaded experts (model on {model.device}, compile={compile})")
        self.model = model.eval()
        self.config = model.config
        self.max_slots, self.max_len, self.decode = max_slots, max_len, decode
        self.device = model.device
        self.cache = ZayaCache(self.config, max_slots, max_len, device=self.device, dtype=model.dtype)
        L = self.config.num_hidden_layers
        self.routes_SLT = torch.full((max_slots, L, max_len), -1, dtype=torch.long, device=self.device)
        self.tok_S = torch.zeros(max_slots, dtype=torch.long, device=self.device)   # last sampled token per slot
        self.penalty: PenaltyState | None = None   # allocated at the first request with a penalty (sampling.py)
        self.decode_fn = decode_one_token
        if compile:
            # The experts run as one opaque custom op inside the compiled step (model._experts_op), and every step
            # attends over all max_len cache positions (static shapes, unwritten keys masked): size max_len to the
            # workload. Measured on CPU (bench/engine.py config, one thread): ~1.7 min of compile; batch-1 decode
            # +14%; batch 16, 64-token prompts, 256 new tokens 301 vs 267 tok/s (+13%) with the decode expert layout.
            self.decode_fn = _compiled_decode(torch.compile(decode_one_token, dynamic=True))
        if cuda_graphs:
            self.decode_fn = _GraphedDecode(model)
        self.stats = {}
        # incremental interface state (submit / step / cancel)
        self._waiting: deque[int] = deque()
        self._live: list[_Live] = []
        self._inc_prompts: dict[int, list[int]] = {}
        self._inc_params: dict[int, GenParams] = {}
        self._inc_sp = None               # sampling tensors of the live rows (None = rebuild)
        self.record_routes = False        # incremental interface: GenResult.routes too (serve: RL router replay)
        self._next_handle = 0

    # --- validation --------------------------------------------------------------------------------
    def _check(self, prompts, params):
        """Every request on its own, before it can join a batch: a value that would fail while its batch's tensors
        are built (a top_k beyond int64, a seed torch.Generator refuses, a token id outside the vocabulary) must fail
        this request at `submit` (or before `generate` starts), never the requests it would be batched with."""
        limit = min(self.max_len, self.config.max_position_embeddings)
        V = self.config.vocab_size
        for i, (p, gp) in enumerate(zip(prompts, params)):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty")
            if len(p) > limit:
                raise ValueError(f"prompt {i} has {len(p)} tokens, more than the engine's limit of {limit} "
                                 f"(max_len {self.max_len}, model context {self.config.max_position_embeddings})")
            if min(p) < 0 or max(p) >= V:
                raise ValueError(f"prompt {i}: token ids must be in [0, {V})")
            if not _sampling_ok(gp, V):
                raise ValueError(f"request {i}: bad sampling parameters {gp}")
            if gp.stop and self.decode is None:
                raise ValueError(f"request {i} has stop strings but the Engine has no decode callable")

    # --- generate ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], params: list[GenParams] | GenParams, *,
                 continuous: bool = True, return_routes: bool = False) -> list[GenResult]:
        """Generate for every prompt; results come back in prompt order."""
        if isinstance(params, GenParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} GenParams")
        self._check(prompts, params)
        if self._waiting or self._live:
            raise RuntimeError("generate() while incremental requests are in flight (they share the cache)")
        limit = min(self.max_len, self.config.max_position_embeddings)
        results: list[GenResult | None] = [None] * len(prompts)
        queue = list(range(len(prompts)))[::-1]          # pop() from the end = prompt order
        slots: list[_Live] = []                           # slots[s] = request in cache slot s, s < n active
        cache, dev = self.cache, self.device
        t_prefill = t_decode = 0.0
        n_steps = n_decoded = 0
        rebuild = True

        while queue or slots:
            # ---- admit: fill free slots from the queue (static mode: only when the whole group is done)
            free = self.max_slots - len(slots)
            if queue and free and (continuous or not slots):
                t0 = time.perf_counter()
                admit = [queue.pop() for _ in range(min(free, len(queue)))]
                for group in self._groups(admit, prompts, params, limit):
                    self._admit(group, prompts, params, slots, return_routes, limit)
                t_prefill += time.perf_counter() - t0
                rebuild = True
                self._finish_rows(slots, prompts, results, return_routes, continuous)
                continue

            # ---- one decode step over the active rows [0, B)
            t0 = time.perf_counter()
            B = len(slots)
            if rebuild:
                sp = sampling_batch([s.params for s in slots], dev, self.config.vocab_size)
                rebuild = False
            stale = [r for r, s in enumerate(slots) if s.done is not None]   # static mode only
            logits_BV, routes_LB1 = self.decode_fn(self.model, cache.rows(0, B), self.tok_S[:B], return_routes)
            if return_routes:
                self._store_decode_routes(routes_LB1)
            if stale:   # finished rows of a static group decode in place, so their cache rows never overflow
                stale_R = torch.tensor(stale, device=dev)
                cache.write_B[stale_R] -= 1
                cache.pos_B[stale_R] -= 1
            self._sample(logits_BV, slots, sp, 0)
            t_decode += time.perf_counter() - t0
            n_steps += 1
            n_decoded += B
            before = len(slots)
            self._finish_rows(slots, prompts, results, return_routes, continuous)
            rebuild = rebuild or len(slots) != before

        self.stats = dict(prefill_s=t_prefill, decode_s=t_decode, decode_steps=n_steps, decode_row_steps=n_decoded)
        return results

    # --- incremental interface (serving) ------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._live)

    def submit(self, prompt: list[int], params: GenParams) -> int:
        """Queue one request; returns its handle. Raises ValueError on an empty/too long prompt or bad params."""
        self._check([prompt], [params])
        h = self._next_handle
        self._next_handle += 1
        self._inc_prompts[h], self._inc_params[h] = list(prompt), params
        self._waiting.append(h)
        return h

    def cancel(self, handle: int) -> bool:
        """Drop a waiting request or free a running one's slot now. False when the handle is unknown (finished)."""
        if handle in self._waiting:
            self._waiting.remove(handle)
        else:
            rows = [r for r, s in enumerate(self._live) if s.idx == handle]
            if not rows:
                return False
            self._free_row(rows[0])
        self._inc_prompts.pop(handle, None)
        self._inc_params.pop(handle, None)
        return True

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """Admit waiting requests into free slots (prefill) or, if none can be admitted, decode one token for every
        running request. Returns one StepOutput per request that produced a token (empty when idle)."""
        slots = self._live
        limit = min(self.max_len, self.config.max_position_embeddings)
        free = self.max_slots - len(slots)
        if self._waiting and free:
            a = len(slots)
            admit = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
            for group in self._groups(admit, self._inc_prompts, self._inc_params, limit):
                self._admit(group, self._inc_prompts, self._inc_params, slots, self.record_routes, limit)
            new = slots[a:]
            self._inc_sp = None
        elif slots:
            B = len(slots)
            if self._inc_sp is None:
                self._inc_sp = sampling_batch([s.params for s in slots], self.device, self.config.vocab_size)
            logits_BV, routes_LB1 = self.decode_fn(self.model, self.cache.rows(0, B), self.tok_S[:B],
                                                   self.record_routes)
            if self.record_routes:
                self._store_decode_routes(routes_LB1)
            self._sample(logits_BV, slots, self._inc_sp, 0)
            new = list(slots)
        else:
            return []
        out = {s.idx: StepOutput(s.idx, *((s.tokens[-1], s.logprobs[-1]) if s.tokens else (None, None)),
                                 top=s.top_logprobs[-1] if s.top_logprobs else None) for s in new}
        for r in sorted((r for r, s in enumerate(slots) if s.done is not None), reverse=True):
            h = slots[r].idx
            out[h].result = self._result(r, slots[r], self._inc_prompts, self.record_routes)
            self._free_row(r)
            self._inc_prompts.pop(h)
            self._inc_params.pop(h)
        return list(out.values())

    def _store_decode_routes(self, routes_LB1):
        """Record the experts of one decode step's rows [0, B) at their cache positions."""
        B = routes_LB1.shape[1]
        write_B = self.cache.write_B[:B] - 1
        rows_B1 = torch.arange(B, device=self.device)[:, None]
        self.routes_SLT[rows_B1, :, write_B[:, None]] = routes_LB1[:, :, 0].T[:, None]

    def _free_row(self, r: int):
        """Remove live row r, moving the last active row into the hole (incremental interface)."""
        slots, last = self._live, len(self._live) - 1
        if r != last:
            self._move_slot(last, r)
            slots[r] = slots[last]
        slots.pop()
        self._inc_sp = None

    # --- helpers (all host-side bookkeeping) -------------------------------------------------------
    def _groups(self, admit, prompts, params, limit):
        """Split admitted requests so that left padding never eats into any row's token budget, and so that requests
        scoring their prompt (prompt_logprobs) are prefilled apart from the others."""
        def scores(i):
            return params[i].prompt_logprobs is not None

        groups, cur = [], []
        for i in sorted(admit, key=lambda i: (scores(i), len(prompts[i]))):
            cand = cur + [i]
            pad = max(len(prompts[j]) for j in cand)
            if (not cur or scores(cur[0]) == scores(i)) and all(
                    pad + self._budget(prompts[j], params[j], limit) - 1 <= self.max_len for j in cand):
                cur = cand
            else:
                groups.append(cur)
                cur = [i]
        return groups + [cur] if cur else groups

    @staticmethod
    def _budget(prompt, gp, limit):
        return min(gp.max_new_tokens, limit - len(prompt) + 1)   # token n is fed at position len + n - 1

    def _admit(self, group, prompts, params, slots, return_routes, limit):
        cache, dev = self.cache, self.device
        scoring = params[group[0]].prompt_logprobs is not None       # the whole group scores its prompts (_groups)
        group, src_R = (group, None) if scoring else _shared_prompts_first(group, prompts)
        a, b = len(slots), len(slots) + len(group)
        U = len(group) if src_R is None else len(group) - len(src_R)   # rows that run the prefill
        P = max(len(prompts[i]) for i in group)
        ids_BT = torch.zeros(U, P, dtype=torch.long)
        mask_BT = torch.zeros(U, P, dtype=torch.long)
        for r, i in enumerate(group[:U]):
            ids_BT[r, P - len(prompts[i]):] = torch.tensor(prompts[i])
            mask_BT[r, P - len(prompts[i]):] = 1
        cache.reset(slice(a, b))
        run = prefill_hidden if scoring else prefill
        out = run(self.model, cache.rows(a, a + U), ids_BT.to(dev), mask_BT.to(dev), return_routes)
        logits_BV, routes_LBT = out[0], out[-1]
        if U < len(group):   # requests with a prompt already in this group: copy that row's prefilled state
            src = torch.tensor(src_R, device=dev)
            self._copy_rows(a + src, torch.arange(a + U, b, device=dev), P)
            logits_BV = torch.cat([logits_BV, logits_BV[src]])
            if return_routes:
                routes_LBT = torch.cat([routes_LBT, routes_LBT[:, src]], dim=1)
        if return_routes:
            self.routes_SLT[a:b] = -1
            self.routes_SLT[a:b, :, :P] = routes_LBT.transpose(0, 1)
        for r, i in enumerate(group):
            gp = params[i]
            eos = gp.eos_ids if gp.eos_ids is not None else self.config.eos_ids
            gen = None
            if gp.temperature > 0:
                seed = gp.seed if gp.seed is not None else int(torch.randint(0, 2**62, ()))
                gen = torch.Generator(device=dev).manual_seed(seed)
            s = _Live(i, gp, self._budget(prompts[i], gp, limit), frozenset(eos), gen,
                      top_logprobs=[] if gp.top_logprobs else None)
            if s.budget == 0:
                s.done = "length"           # max_new_tokens = 0: no token (its sample below is not recorded)
            if scoring:
                n, W = len(prompts[i]), self.model.output_embeddings()
                target_T = torch.tensor(prompts[i][1:], dtype=torch.long, device=dev)
                lps, tops = prompt_logprobs(out[1][r, P - n:P - 1], W, target_T, gp.prompt_logprobs)
                s.prompt_logprobs = ([None] + lps, None if tops is None else [None] + tops)
            slots.append(s)
        live = slots[a:b]
        if any(uses_penalties(s.params) for s in live):
            if self.penalty is None:
                self.penalty = PenaltyState(self.max_slots, self.config.vocab_size, dev)
            for r, i in enumerate(group):
                self.penalty.reset(a + r, prompts[i])
        self._sample(logits_BV, live, sampling_batch([s.params for s in live], dev, self.config.vocab_size), a)

    def _sample(self, logits_BV, live, sb, a: int):
        """Sample the next token of live rows a, a+1, ... (cache slots) and record it."""
        history = self.penalty.rows(a, a + len(live)) if sb.penalties is not None else None
        tok_B, raw_B, slp_B, top = sample(logits_BV, sb, self._uniforms(live, sb.greedy_only), history)
        self.tok_S[a:a + len(live)] = tok_B
        if sb.penalties is not None:
            self.penalty.count(a, tok_B)
        self._record(live, tok_B, raw_B, slp_B, top)

    def _uniforms(self, live, greedy_only):
        if greedy_only:
            return None
        u = [torch.rand(1, generator=s.gen, device=self.device) if s.gen is not None
             else torch.zeros(1, device=self.device) for s in live]
        return torch.cat(u)

    def _record(self, live, tok_B, raw_B, slp_B, top=None):
        if top is not None:                 # (logprobs [B, K], tokens [B, K]) -> per row [(token, logprob)] * K
            top = [list(zip(ids, vals)) for ids, vals in zip(top[1].tolist(), top[0].tolist())]
        for r, (s, t, lp, slp) in enumerate(zip(live, tok_B.tolist(), raw_B.tolist(), slp_B.tolist())):
            if s.done is not None:          # static mode: finished rows keep decoding, output ignored
                continue
            s.tokens.append(t)
            s.logprobs.append(lp)
            s.sampling_logprobs.append(slp)
            if s.top_logprobs is not None:
                s.top_logprobs.append(top[r][:s.params.top_logprobs])
            if t in s.eos:
                s.done = "stop"
            elif s.params.stop and _stop_in_tail(s.tokens, s.params.stop, self.decode):
                s.done = "stop"
            elif len(s.tokens) >= s.budget:
                s.done = "length"

    def _finish_rows(self, slots, prompts, results, return_routes, continuous):
        """Turn finished rows into results. Continuous mode frees their slots at once (moving the last active
        row into each hole); static mode waits until every row of the group is done."""
        finished = [r for r, s in enumerate(slots) if s.done is not None]
        if not finished or (not continuous and len(finished) < len(slots)):
            return
        for r in sorted(finished, reverse=True):
            results[slots[r].idx] = self._result(r, slots[r], prompts, return_routes)
            last = len(slots) - 1
            if r != last:
                self._move_slot(last, r)
                slots[r] = slots[last]
            slots.pop()

    def _copy_rows(self, src_R, dst_R, w: int):
        """Copy the cache state of rows src_R (their first w positions) into rows dst_R: a prefilled prompt to the
        requests sharing it, or one live row into a freed slot (`_move_slot`). Indices: ints or index tensors."""
        c = self.cache
        for L in range(len(c.k)):
            c.k[L][dst_R, :, :w] = c.k[L][src_R, :, :w]
            c.v[L][dst_R, :, :w] = c.v[L][src_R, :, :w]
            c.conv[L][dst_R] = c.conv[L][src_R]
            c.vdel[L][dst_R] = c.vdel[L][src_R]
        c.write_B[dst_R], c.pos_B[dst_R] = c.write_B[src_R], c.pos_B[src_R]
        c.valid_BS[dst_R] = c.valid_BS[src_R]

    def _move_slot(self, src: int, dst: int):
        w = int(self.cache.write_B[src])
        self._copy_rows(src, dst, w)
        self.routes_SLT[dst, :, :w] = self.routes_SLT[src, :, :w]
        self.tok_S[dst] = self.tok_S[src]
        if self.penalty is not None:
            self.penalty.move(src, dst)

    def _result(self, r: int, s: _Live, prompts, return_routes) -> GenResult:
        tokens, reason = s.tokens, s.done
        text = None
        if self.decode is not None:
            cut = _find_stop(tokens, s.params.stop, self.decode) if s.params.stop else None
            if cut is not None:
                tokens, text = cut
                reason = "stop"
            else:
                body = tokens[:-1] if tokens and tokens[-1] in s.eos and reason == "stop" else tokens
                text = self.decode(body)
        n = len(tokens)
        routes = None
        if return_routes:
            c = self.cache
            w = int(c.write_B[r])
            real = self.routes_SLT[r, :, :w][:, c.valid_BS[r, :w]]         # prompt + fed completion tokens
            routes = torch.full((real.shape[0], len(prompts[s.idx]) + n), -1, dtype=torch.long)
            fed = len(prompts[s.idx]) + n - (1 if n == len(s.tokens) else 0)   # the last sampled token is never fed
            keep = min(real.shape[1], fed)
            routes[:, :keep] = real[:, :keep].cpu()
        return GenResult(tokens=list(tokens), logprobs=s.logprobs[:n], sampling_logprobs=s.sampling_logprobs[:n],
                         finish_reason=reason, prompt_tokens=len(prompts[s.idx]), completion_tokens=n,
                         text=text, routes=routes, top_logprobs=None if s.top_logprobs is None else s.top_logprobs[:n],
                         prompt_logprobs=s.prompt_logprobs[0], prompt_top_logprobs=s.prompt_logprobs[1])


def _shared_prompts_first(group: list[int], prompts) -> tuple[list[int], list[int] | None]:
    """Requests whose prompt repeats an earlier one of the group (RL's G samples of one prompt, avg@k's k runs) need
    no prefill of their own: (the group reordered with one request per distinct prompt first, then the repeats;
    for each repeat the index of its prompt's first request in that order), or (group, None) without repeats.
    The prefill then runs on the distinct prompts only and the repeats copy the prefilled cache rows: RL's rollout
    prefill shrinks G times."""
    first: dict[tuple, int] = {}
    uniq, rest, src = [], [], []
    for i in group:
        key = tuple(prompts[i])
        if key in first:
            rest.append(i)
            src.append(first[key])
        else:
            first[key] = len(uniq)
            uniq.append(i)
    return (group, None) if not rest else (uniq + rest, src)


# -----------------------------------------------------------------------------
# Stop strings


def _stop_in_tail(tokens: list[int], stops: list[str], decode) -> bool:
    """Cheap per-step check: does a stop string occur in the text of the last few tokens?
    A miss (a stop string spread over more tokens than the window) is caught by the exact cut at the end."""
    window = max(len(st) for st in stops) + 8
    tail = decode(tokens[-window:])
    return any(st in tail for st in stops)


def _find_stop(tokens: list[int], stops: list[str], decode):
    """Exact cut: (kept tokens, text) ending before the first stop string in decode(tokens), or None.
    Kept tokens = the longest prefix whose decoded text is no longer than the cut text (binary search)."""
    text = decode(tokens)
    hits = [p for p in (text.find(st) for st in stops if st) if p >= 0]
    if not hits:
        return None
    cut = min(hits)
    lo, hi = 0, len(tokens)                      # invariant: decode(tokens[:lo]) fits, tokens[:hi+1] does not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(decode(tokens[:mid])) <= cut:
            lo = mid
        else:
            hi = mid - 1
    return tokens[:lo], text[:cut]
