"""Test-time compute over any `Backend`: single, majority, RSA, Markovian RSA, Delethink and the PaCoRe hybrid.

Follows the ZAYA1-8B technical report §VI-A (Markovian RSA), Venkatraman et al. 2025 (RSA), Aghajohari et al. 2025
(Delethink) and the TR's "PaCoRe hybrid" (spec: shared/spec/markovian-rsa.md).

Letters (as in the report):
    N  population: candidates per round                      (--population)
    C  aggregation-set size, C <= N: tails per prompt         (--candidates)
    T  aggregation rounds; rounds are t = 0..T, so T=2 means 3 generation stages (TR convention, NOT the RSA code's
       `--loops`, which counts the first generation)          (--rounds)
    tau  tail length in tokens, tau <= beta                   (--tail-tokens)
    beta per-rollout decode budget in tokens, every round     (--budget-tokens)
Shapes: a population is a list of N `Completion`s; a subset is a list of C distinct indices into the previous
population; a round makes N calls, so a run makes N x (T + 1) calls per problem (single: 1, majority: N).

Methods are small async functions `method(ctx, problem) -> list[Completion]` (the final population) over `Run`, which
does everything else: bounded-concurrency dispatch, deterministic call keys and seeds, the JSONL trace (written as
calls finish, read back to resume), the bounded-context check and the per-round accounting.

- markovian_rsa: round 0 = N rollouts of the question; round t >= 1 = N aggregation prompts, each from C tails drawn
  uniformly without replacement (independently per prompt, like the RSA code) from round t-1; a tail is the last tau
  tokens of the rollout's *reasoning* (text before `</think>`, or all of it when the think block never closed), or
  of its whole text when it has no reasoning (`reasoning_or_text`: thinking off, or a model / server that never
  emits a think block).
- rsa: the same loop with whole generated texts as candidates (prompts grow ~ C x beta).
- pacore_hybrid: the candidate's answer section (after `</think>`) when it reached one, else its reasoning tail
  (else the tail of its whole text).
- delethink: C = 1 bounded continuation: chunk 0 from the question (budget beta); chunk k >= 1 continues from
  question + the first `head_tokens` generated tokens + the last tau tokens of the previous chunk, as a raw text prompt
  in the same assistant turn; stops at EOS. T + 1 chunks at most; the trace is the concatenation of chunks.
- majority / single: N (or 1) independent samples.

Final answer of every method: the majority over the final population's extracted answers (last \\boxed{} /
<answer> after `</think>`, normalised; ties go to the earliest; unparsable answers do not vote). With a scorer the
final-population mean accuracy (what the TR reports) is recorded as well.

Simplified / our choices (the TR leaves them open): the aggregation prompt text (AGGREGATION_TEMPLATE_V1, our own
wording, question first so prompts share a prefix), the round-0 prompt (the question as one user message), the final
round uses the same beta, and the deployment answer is the majority vote.

Never aggregate nothing: an aggregation prompt whose candidate blocks are all empty while those rollouts' texts
were not is a bug in how candidates are cut, and raises (`RuntimeError`) instead of being sent.

Bounded context: each aggregation prompt's text is checked against |question| + C x tau + |template| tokens before
its call (|template| = the summed token counts of the template's text pieces around the slots, `template_pieces`);
the numbers and the verdict go into the trace. Tails are cut with `tokenizer.tail_text` (through
`backend.tail_tokens`): a true suffix of the rollout that re-encodes to at most tau tokens, also when the cut falls
inside a multi-byte character. Backends without a tokenizer (an OpenAI server without `tokenizer=`) count
`tokenizer.CHARS_PER_TOKEN` characters per token, named in the trace.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from .backends import Backend, Completion, Request, SamplingParams
from .envs.base import extract_answer, normalize
from .tokenizer import count_text, head_text, split_reasoning

# ---------------------------------------------------------------------------------------------------------------------
# the aggregation prompt (shared with the SFT data builder: one template for both)

TEMPLATE_VERSION = "openzaya-agg-v1"
AGGREGATION_TEMPLATE_V1 = (
    "{question}\n\n"
    "Below are {n} candidate solutions to this problem. Each shows only the last part of its reasoning: it may start "
    "mid-sentence, stop before the end, and contain mistakes.\n\n"
    "{candidates}"
    "Consider the candidates: keep the steps that are right, check the points where they disagree, and try another "
    "approach if they all look wrong. Then write one improved, complete solution and put the final answer in "
    "\\boxed{}."
)
CANDIDATE_BLOCK = "---- Candidate {i} ----\n{tail}\n\n"


def load_template(path: str | os.PathLike | None) -> str:
    """The default template, or a template file holding the placeholders {question} and {candidates} (and
    optionally {n}); substituted literally, so other braces (\\boxed{}) need no escaping."""
    if path is None:
        return AGGREGATION_TEMPLATE_V1
    text = Path(path).read_text()
    for key in ("{question}", "{candidates}"):
        if key not in text:
            raise ValueError(f"aggregation template {path} lacks the placeholder {key}")
    return text


def build_aggregation_prompt(question: str, tails: list[str], template: str = AGGREGATION_TEMPLATE_V1) -> str:
    """The aggregation prompt: the question first (shared prefix), then C candidate tails in numbered blocks."""
    blocks = "".join(CANDIDATE_BLOCK.replace("{i}", str(i + 1)).replace("{tail}", t) for i, t in enumerate(tails))
    # question last in the substitution order, so braces inside a tail are never re-substituted
    out = template.replace("{n}", str(len(tails))).replace("{candidates}", blocks)
    return out.replace("{question}", question, 1)


def template_pieces(n_candidates: int, template: str = AGGREGATION_TEMPLATE_V1) -> list[str]:
    """The template's own text around the question and the C tails, as separate pieces. |template| in the bound is
    the sum of their token counts: counting the template rendered with empty slots instead would undercount where
    neighbouring pieces merge (e.g. Gemma's single token for a run of newlines)."""
    sentinel = "\x00SLOT\x00"
    text = build_aggregation_prompt(sentinel, [sentinel] * n_candidates, template)
    return [piece for piece in text.split(sentinel) if piece]


# ---------------------------------------------------------------------------------------------------------------------
# configuration


METHODS = ("single", "majority", "rsa", "markovian_rsa", "delethink", "pacore_hybrid")


@dataclass
class TTCConfig:
    method: str = "markovian_rsa"
    population: int = 16          # N
    candidates: int = 4           # C
    rounds: int = 2               # T (aggregation rounds after round 0)
    tail_tokens: int = 4096       # tau
    budget_tokens: int = 16384    # beta: decode tokens per call
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0                 # subset selection and per-call sampling seeds
    max_concurrency: int = 64     # calls in flight over all problems
    head_tokens: int = 100        # delethink: generated tokens kept after the query in every chunk
    template_file: str | None = None
    enable_thinking: bool = True
    strict_bound: bool = True     # raise if an aggregation prompt would exceed its bound

    def validate(self) -> None:
        """Reject bad settings before any call, with a message that names the flag."""
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        for name, flag in [("population", "--population"), ("budget_tokens", "--budget-tokens"),
                           ("tail_tokens", "--tail-tokens"), ("candidates", "--candidates"),
                           ("max_concurrency", "--max-concurrency")]:
            if getattr(self, name) <= 0:
                raise ValueError(f"{flag} must be positive, got {getattr(self, name)}")
        if self.rounds < 0:
            raise ValueError(f"--rounds must be >= 0, got {self.rounds}")
        if self.head_tokens < 0:
            raise ValueError(f"--head-tokens must be >= 0, got {self.head_tokens}")
        if self.candidates > self.population:
            raise ValueError(f"--candidates C={self.candidates} exceeds --population N={self.population}: each "
                             f"aggregation prompt draws C distinct candidates from the N of the previous round")
        if self.tail_tokens > self.budget_tokens:
            raise ValueError(f"--tail-tokens tau={self.tail_tokens} exceeds --budget-tokens beta={self.budget_tokens}"
                             f": a tail is cut from a rollout of at most beta tokens")
        if not 0 <= self.temperature:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")

    def calls_per_problem(self) -> int:
        """Upper bound (exact except delethink, which stops early at EOS)."""
        if self.method == "single":
            return 1
        if self.method == "majority":
            return self.population
        return self.population * (self.rounds + 1)


@dataclass
class TTCProblem:
    id: str
    question: str
    answer: str | None = None                          # reference, for the trace's reward (optional)
    score: Callable[[str], float] | None = None        # response text -> correctness in [0, 1] (optional)


@dataclass
class RoundStats:
    calls: int = 0
    resumed_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    wall_s: float = 0.0
    max_prompt_tokens: int = 0        # largest prompt sent this round (backend's count, chat template included)
    max_bound_tokens: int = 0         # the largest bound checked this round (aggregation rounds)
    max_content_tokens: int = 0       # the largest aggregation prompt text checked against it (no chat template)


@dataclass
class ProblemResult:
    id: str
    answer: str | None                                  # majority answer of the final population
    votes: dict[str, int]
    final_answers: list[str | None]                     # extracted answer per final candidate
    final_texts: list[str]
    rewards: list[float] | None                         # per final candidate, when a scorer was given
    majority_correct: float | None
    population_mean: float | None
    rounds: list[RoundStats] = field(default_factory=list)

    @property
    def prompt_tokens(self) -> int:
        return sum(r.prompt_tokens for r in self.rounds)

    @property
    def completion_tokens(self) -> int:
        return sum(r.completion_tokens for r in self.rounds)

    @property
    def calls(self) -> int:
        return sum(r.calls for r in self.rounds)

    @property
    def wall_s(self) -> float:
        return sum(r.wall_s for r in self.rounds)

    @property
    def winner_index(self) -> int | None:
        """The final candidate that stands for the majority answer (`winner_index`)."""
        return winner_index(self.final_answers, self.answer)


def winner_index(answers: list[str | None], majority: str | None) -> int | None:
    """Index of the first candidate whose normalised answer is the majority answer; None when there is none."""
    return next((i for i, a in enumerate(answers) if a is not None and normalize(a) == majority), None)


def majority_answer(answers: list[str | None]) -> tuple[str | None, dict[str, int]]:
    """Most frequent normalised answer; ties to the earliest; None (unparsable) does not vote."""
    keys = [normalize(a) for a in answers if a is not None and a.strip()]
    if not keys:
        return None, {}
    counts = Counter(keys)
    best = max(counts.values())
    return next(k for k in keys if counts[k] == best), dict(counts)


# ---------------------------------------------------------------------------------------------------------------------
# the run: dispatch, trace, resume, accounting


def _completion_from_record(rec: dict) -> Completion:
    return Completion(text=rec["text"], reasoning=rec["reasoning"], answer=rec["answer_section"],
                      finish_reason=rec["finish_reason"], prompt_tokens=rec["prompt_tokens"],
                      completion_tokens=rec["completion_tokens"], latency_s=rec["latency_s"],
                      token_ids=rec.get("token_ids"))


class Run:
    """One TTC run over many problems. Calls are keyed `problem/round/index`; a key found in the trace is answered
    from it (resume), every new call is appended to the trace as soon as it returns."""

    def __init__(self, backend: Backend, cfg: TTCConfig, trace_path: str | os.PathLike | None = None,
                 progress: Callable[[int], None] | None = None, batch_calls: bool | None = None):
        cfg.validate()
        self.backend, self.cfg, self.progress = backend, cfg, progress
        self.template = load_template(cfg.template_file)
        self.approximation = backend.tail_approximation
        # engines with a blocking generate batch best (and may not be thread-safe): one batched call at a time;
        # async clients (OpenAI servers) get each call on its own, up to max_concurrency in flight
        native_async = type(backend).agenerate is not Backend.agenerate
        self.batch_calls = (not native_async) if batch_calls is None else batch_calls
        self.done: dict[str, dict] = {}
        self.trace_path = Path(trace_path) if trace_path else None
        self._trace = None
        if self.trace_path is not None:
            self.trace_path.parent.mkdir(parents=True, exist_ok=True)
            if self.trace_path.exists():
                self._load_trace()
            self._trace = open(self.trace_path, "a")
            if not self.done:
                self._write({"type": "run", "config": asdict(cfg), "template_version": TEMPLATE_VERSION,
                             "template": self.template, "tail_approximation": self.approximation})
        self.backend_s = 0.0           # time spent inside backend.agenerate (summed over concurrent calls)
        self._queue: list = []
        self._wake: asyncio.Event | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self._batcher_task: asyncio.Task | None = None

    def _load_trace(self) -> None:
        with open(self.trace_path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:   # a line torn by the interruption: that call is redone
                    continue
                if rec.get("type") == "run":
                    old = rec["config"]
                    for k in ("method", "population", "candidates", "rounds", "tail_tokens", "budget_tokens", "seed"):
                        if old.get(k) != getattr(self.cfg, k):
                            raise ValueError(f"trace {self.trace_path} was written with {k}={old.get(k)!r}, this "
                                             f"run has {getattr(self.cfg, k)!r}: use another trace or the same flags")
                elif rec.get("type") == "call":
                    self.done[rec["key"]] = rec

    def _write(self, rec: dict) -> None:
        if self._trace is not None:
            self._trace.write(json.dumps(rec, ensure_ascii=False) + "\n")
            self._trace.flush()

    def close(self) -> None:
        if self._batcher_task is not None:
            self._batcher_task.cancel()
            self._batcher_task, self._wake = None, None
        if self._trace is not None:
            self._trace.close()
            self._trace = None

    # ----------------------------------------------------------------- helpers for methods

    def seed_for(self, key: str) -> int:
        return (self.cfg.seed * 1_000_003 + zlib.crc32(key.encode())) % (2 ** 31)

    def subsets(self, problem_id: str, round_: int, n_prev: int) -> list[list[int]]:
        """N subsets of C distinct indices, uniform, independent across subsets; a pure function of (seed, problem,
        round), so a resumed run draws the same ones."""
        rng = random.Random(f"{self.cfg.seed}/{problem_id}/{round_}")
        return [rng.sample(range(n_prev), self.cfg.candidates) for _ in range(self.cfg.population)]

    def count(self, text: str) -> int:
        """Tokens of text (the backend's tokenizer, else the CHARS_PER_TOKEN approximation)."""
        return count_text(self.backend.tokenizer, text)

    def tail(self, text: str, n: int) -> str:
        """Last n tokens of text, as a suffix of it with at most n tokens (`tokenizer.tail_text`)."""
        return self.backend.tail_tokens(text, n)

    def request(self, content: str) -> Request:
        """A user message; a raw text prompt when the backend's tokenizer has no chat template (base models)."""
        tok = self.backend.tokenizer
        if tok is not None and getattr(tok, "chat_template", None) is None:
            return Request(prompt=content, enable_thinking=self.cfg.enable_thinking)
        return Request(messages=[{"role": "user", "content": content}], enable_thinking=self.cfg.enable_thinking)

    def params(self, key: str, max_tokens: int | None = None) -> SamplingParams:
        return SamplingParams(temperature=self.cfg.temperature, top_p=self.cfg.top_p,
                              max_tokens=max_tokens or self.cfg.budget_tokens, seed=self.seed_for(key))

    # ----------------------------------------------------------------- calls

    async def call(self, problem: TTCProblem, round_: int, index: int, request: Request, stats: RoundStats,
                   meta: dict | None = None, max_tokens: int | None = None) -> Completion:
        key = f"{problem.id}/r{round_}/i{index}"
        meta = dict(meta or {})
        if key in self.done:
            rec = self.done[key]
            comp = _completion_from_record(rec)
            stats.resumed_calls += 1
        else:
            request.params = self.params(key, max_tokens)
            request.id = key
            comp = await self._dispatch(request)
            reward = None
            if problem.score is not None:
                reward = float(problem.score(comp.text))
            rec = {"type": "call", "key": key, "problem": problem.id, "round": round_, "index": index,
                   "prompt_id": key, "prompt": request.prompt if request.prompt is not None else request.messages,
                   **meta, "text": comp.text, "reasoning": comp.reasoning, "answer_section": comp.answer,
                   "finish_reason": comp.finish_reason, "prompt_tokens": comp.prompt_tokens,
                   "completion_tokens": comp.completion_tokens, "latency_s": comp.latency_s,
                   "token_ids": comp.token_ids, "extracted": extract_answer(comp.text), "reward": reward,
                   "time": time.time()}
            self._write(rec)
            self.done[key] = rec
        stats.calls += 1
        stats.prompt_tokens += comp.prompt_tokens
        stats.completion_tokens += comp.completion_tokens
        stats.max_prompt_tokens = max(stats.max_prompt_tokens, comp.prompt_tokens)
        if "bound_tokens" in meta:
            stats.max_bound_tokens = max(stats.max_bound_tokens, meta["bound_tokens"])
            stats.max_content_tokens = max(stats.max_content_tokens, meta["prompt_content_tokens"])
        if self.progress is not None:
            self.progress(1)
        return comp

    async def _dispatch(self, request: Request) -> Completion:
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.cfg.max_concurrency)
        if not self.batch_calls:
            async with self._semaphore:
                t0 = time.perf_counter()
                out = await self.backend.agenerate([request])
                self.backend_s += time.perf_counter() - t0
            return out[0][0]
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((request, fut))
        if self._wake is None:
            self._wake = asyncio.Event()
            self._batcher_task = asyncio.get_running_loop().create_task(self._batcher())
        self._wake.set()
        return await fut

    async def _batcher(self) -> None:
        """One batched backend call at a time: everything queued since the last call goes together (at most
        max_concurrency requests), so round t+1 of a fast problem rides along with round t of a slow one."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(0)   # let every coroutine that is ready enqueue its call first
            while self._queue:
                batch, self._queue = self._queue[:self.cfg.max_concurrency], self._queue[self.cfg.max_concurrency:]
                t0 = time.perf_counter()
                try:
                    out = await self.backend.agenerate([r for r, _ in batch])
                except BaseException as e:  # hand the error to every waiting caller
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(e)
                    continue
                finally:
                    self.backend_s += time.perf_counter() - t0
                for (_, fut), comps in zip(batch, out):
                    if not fut.done():
                        fut.set_result(comps[0])
                await asyncio.sleep(0)

    async def population(self, problem: TTCProblem, round_: int, contents: list[str], stats: RoundStats,
                         metas: list[dict] | None = None) -> list[Completion]:
        metas = metas or [{} for _ in contents]
        t0 = time.perf_counter()
        out = await asyncio.gather(*(self.call(problem, round_, i, self.request(c), stats, m)
                                     for i, (c, m) in enumerate(zip(contents, metas))))
        stats.wall_s += time.perf_counter() - t0
        return list(out)

    def aggregation_prompts(self, problem: TTCProblem, round_: int, prev: list[Completion],
                            candidate: Callable[[Completion], str]) -> tuple[list[str], list[dict]]:
        """N aggregation prompts for round_ from the previous population, with their bound checks."""
        C, tau = self.cfg.candidates, self.cfg.tail_tokens
        q_tokens = self.count(problem.question)
        template_tokens = self.template_tokens()
        bound = q_tokens + C * tau + template_tokens
        contents, metas = [], []
        for subset in self.subsets(problem.id, round_, len(prev)):
            tails = [candidate(prev[j]) for j in subset]
            if not any(t.strip() for t in tails) and any(prev[j].text.strip() for j in subset):
                raise RuntimeError(f"{problem.id} round {round_}: every candidate of an aggregation prompt is empty "
                                   f"although rollouts {subset} of round {round_ - 1} are not (their reasoning: "
                                   f"{[len(prev[j].reasoning) for j in subset]} chars, answers "
                                   f"{[len(prev[j].answer) for j in subset]} chars): a bug, not sent")
            text = build_aggregation_prompt(problem.question, tails, self.template)
            n = self.count(text)
            meta = {"candidate_ids": [f"{problem.id}/r{round_ - 1}/i{j}" for j in subset],
                    "prompt_content_tokens": n, "bound_tokens": bound, "bound_ok": n <= bound,
                    "tail_tokens": [self.count(t) for t in tails], "token_count": self.approximation or "exact"}
            if self.cfg.strict_bound and n > bound and self.cfg.method != "rsa":
                raise AssertionError(f"{problem.id} round {round_}: aggregation prompt has {n} tokens, over the bound "
                                     f"|q| + C*tau + template = {q_tokens} + {C}*{tau} + {template_tokens} = {bound}")
            contents.append(text)
            metas.append(meta)
        return contents, metas

    def template_tokens(self) -> int:
        """|template| in the bound: the summed token counts of the template's own pieces (`template_pieces`)."""
        return sum(self.count(piece) for piece in template_pieces(self.cfg.candidates, self.template))

    def longest_prompt_tokens(self, question: str) -> int:
        """Tokens of the longest prompt text a call of this run's method can send for `question`, chat template
        excluded (delethink's query holds it): |q| + C x tau + |template| (the bound `aggregation_prompts` checks;
        rsa sends whole candidates, so C x beta), delethink |query| + head + tau, single / majority |q|. A server
        checks it plus beta against its context before it starts a run."""
        cfg = self.cfg
        if cfg.method == "delethink":
            query = delethink_query(self.backend.tokenizer, question, cfg.enable_thinking)
            return self.count(query) + cfg.head_tokens + cfg.tail_tokens
        q = self.count(question)
        if cfg.method in ("single", "majority"):
            return q
        per_candidate = cfg.budget_tokens if cfg.method == "rsa" else cfg.tail_tokens
        return q + cfg.candidates * per_candidate + self.template_tokens()


# ---------------------------------------------------------------------------------------------------------------------
# the methods: (run, problem, per-round stats list) -> final population


async def single(run: Run, p: TTCProblem, rounds: list[RoundStats]) -> list[Completion]:
    rounds.append(RoundStats())
    return await run.population(p, 0, [p.question], rounds[-1])


async def majority(run: Run, p: TTCProblem, rounds: list[RoundStats]) -> list[Completion]:
    rounds.append(RoundStats())
    return await run.population(p, 0, [p.question] * run.cfg.population, rounds[-1])


async def _aggregate(run: Run, p: TTCProblem, rounds: list[RoundStats],
                     candidate: Callable[[Completion], str]) -> list[Completion]:
    """Round 0: N rollouts; rounds 1..T: N aggregation prompts of C candidates each from the previous round."""
    pop = await majority(run, p, rounds)
    for t in range(1, run.cfg.rounds + 1):
        contents, metas = run.aggregation_prompts(p, t, pop, candidate)
        rounds.append(RoundStats())
        pop = await run.population(p, t, contents, rounds[-1], metas)
    return pop


def reasoning_or_text(c: Completion) -> str:
    """What a Markovian RSA tail is cut from: the reasoning when the rollout has one, else its whole text (thinking
    off, or a model or server that never emits a think block: the reasoning is empty and the text is the answer)."""
    return c.reasoning if c.reasoning.strip() else c.text


async def markovian_rsa(run: Run, p: TTCProblem, rounds: list[RoundStats]) -> list[Completion]:
    return await _aggregate(run, p, rounds, lambda c: run.tail(reasoning_or_text(c), run.cfg.tail_tokens))


async def rsa(run: Run, p: TTCProblem, rounds: list[RoundStats]) -> list[Completion]:
    return await _aggregate(run, p, rounds, lambda c: c.text)  # whole texts, reasoning kept: unbounded growth


async def pacore_hybrid(run: Run, p: TTCProblem, rounds: list[RoundStats]) -> list[Completion]:
    tau = run.cfg.tail_tokens
    return await _aggregate(run, p, rounds,
                            lambda c: run.tail(c.answer if c.answer.strip() else reasoning_or_text(c), tau))


def delethink_query(tok, question: str, enable_thinking: bool) -> str:
    """Delethink's raw text prompt before the carried text: the question as a templated user turn, or the bare
    question and a blank line for a tokenizer without a chat template (or no tokenizer)."""
    if tok is not None and tok.chat_template is not None:
        return tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                       enable_thinking=enable_thinking)
    return question + "\n\n"


async def delethink(run: Run, p: TTCProblem, rounds: list[RoundStats]) -> list[Completion]:
    """N independent chunked rollouts; chunk k continues from query + head + last tau tokens (raw text prompt)."""
    cfg, tok = run.cfg, run.backend.tokenizer
    query = delethink_query(tok, p.question, cfg.enable_thinking)
    q_tokens = run.count(query)

    async def rollout(i: int) -> Completion:
        chunks: list[Completion] = []
        head = ""
        for k in range(cfg.rounds + 1):
            while len(rounds) <= k:
                rounds.append(RoundStats())
            if k == 0:
                req, meta = Request(prompt=query, enable_thinking=cfg.enable_thinking), {}
            else:
                carry = run.tail(chunks[-1].text, cfg.tail_tokens)
                prompt = query + head + carry
                n, bound = run.count(head + carry), cfg.head_tokens + cfg.tail_tokens
                meta = {"candidate_ids": [f"{p.id}/r{k - 1}/i{i}"], "prompt_content_tokens": q_tokens + n,
                        "bound_tokens": q_tokens + bound, "bound_ok": n <= bound,
                        "token_count": run.approximation or "exact"}
                req = Request(prompt=prompt, enable_thinking=cfg.enable_thinking)
            budget = cfg.budget_tokens if k == 0 else max(1, cfg.budget_tokens - cfg.tail_tokens)
            t0 = time.perf_counter()
            comp = await run.call(p, k, i, req, rounds[k], meta, max_tokens=budget)
            rounds[k].wall_s = max(rounds[k].wall_s, time.perf_counter() - t0)
            if k == 0:
                head = head_text(tok, comp.text, cfg.head_tokens)
            chunks.append(comp)
            if comp.finish_reason != "length":
                break
        text = "".join(c.text for c in chunks)
        reasoning, answer = split_reasoning(text, thinking=cfg.enable_thinking)
        return Completion(text=text, reasoning=reasoning, answer=answer, finish_reason=chunks[-1].finish_reason,
                          prompt_tokens=sum(c.prompt_tokens for c in chunks),
                          completion_tokens=sum(c.completion_tokens for c in chunks),
                          latency_s=sum(c.latency_s for c in chunks))

    return list(await asyncio.gather(*(rollout(i) for i in range(cfg.population))))


METHOD_FNS = {"single": single, "majority": majority, "rsa": rsa, "markovian_rsa": markovian_rsa,
              "delethink": delethink, "pacore_hybrid": pacore_hybrid}


# ---------------------------------------------------------------------------------------------------------------------
# entry points


async def _solve_one(run: Run, p: TTCProblem) -> ProblemResult:
    rounds: list[RoundStats] = []
    final = await METHOD_FNS[run.cfg.method](run, p, rounds)
    answers = [extract_answer(c.text) for c in final]
    ans, votes = majority_answer(answers)
    rewards = [float(p.score(c.text)) for c in final] if p.score is not None else None
    maj = None
    if p.score is not None:
        win = winner_index(answers, ans)
        maj = float(p.score(final[win].text)) if win is not None else 0.0
    res = ProblemResult(id=p.id, answer=ans, votes=votes, final_answers=answers, final_texts=[c.text for c in final],
                        rewards=rewards, majority_correct=maj,
                        population_mean=(sum(rewards) / len(rewards)) if rewards else None, rounds=rounds)
    run._write({"type": "problem", "problem": p.id, "answer": ans, "votes": votes, "majority_correct": maj,
                "population_mean": res.population_mean, "rounds": [asdict(r) for r in rounds]})
    return res


def validate_problems(problems: list[TTCProblem]) -> None:
    ids = set()
    for p in problems:
        if not isinstance(p.question, str) or not p.question.strip():
            raise ValueError(f"problem {p.id!r}: empty question")
        if p.id in ids:
            raise ValueError(f"duplicate problem id {p.id!r} (call keys and resume need unique ids)")
        if "/" in p.id:
            raise ValueError(f"problem id {p.id!r} contains '/', which the call keys use as separator")
        ids.add(p.id)


async def arun(problems: list[TTCProblem], backend: Backend, cfg: TTCConfig,
               trace_path: str | os.PathLike | None = None, progress: Callable[[int], None] | None = None,
               run: Run | None = None) -> tuple[list[ProblemResult], dict]:
    """Run cfg.method on every problem, all in flight at once (asyncio task per problem). Returns the per-problem
    results and run totals. Everything is validated before the first call."""
    cfg.validate()
    validate_problems(problems)
    run = run or Run(backend, cfg, trace_path, progress)
    t0 = time.perf_counter()
    try:
        results = list(await asyncio.gather(*(_solve_one(run, p) for p in problems)))
    except BaseException:
        run.close()
        raise
    wall = time.perf_counter() - t0
    totals = {"problems": len(results), "calls": sum(r.calls for r in results),
              "resumed_calls": sum(x.resumed_calls for r in results for x in r.rounds),
              "prompt_tokens": sum(r.prompt_tokens for r in results),
              "completion_tokens": sum(r.completion_tokens for r in results), "wall_s": wall,
              "backend_s": run.backend_s, "tail_approximation": run.approximation,
              "template_version": TEMPLATE_VERSION if cfg.template_file is None else f"file:{cfg.template_file}"}
    run._write({"type": "totals", **totals})
    run.close()
    return results, totals


def solve(problems: list[TTCProblem] | str, backend: Backend, cfg: TTCConfig | None = None,
          trace_path: str | os.PathLike | None = None, progress: Callable[[int], None] | None = None):
    """Sync wrapper of `arun`; a bare question string is one problem with id 'q0'."""
    from .backends import run_sync

    cfg = cfg or TTCConfig()
    if isinstance(problems, str):
        problems = [TTCProblem(id="q0", question=problems)]
    cfg.validate()
    validate_problems(problems)
    return run_sync(arun(problems, backend, cfg, trace_path, progress))
