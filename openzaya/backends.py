"""One generation interface over our engine, any transformers model, and any OpenAI-compatible server.

Everything downstream (test-time compute, evaluation, RL rollouts, serving) talks to a `Backend`:
`generate(requests) -> list[list[Completion]]` (one list of `n` completions per request) and `agenerate`, its
async form. A request carries a prompt or chat messages plus sampling parameters; a completion carries the text,
its (reasoning, answer) split, token ids when known, the finish reason, usage and latency.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
