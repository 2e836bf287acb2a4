"""The OpenAI shapes the server writes: errors, whole choices (completions: text; chat: a message whose `<think>`
block becomes reasoning_content), streamed chunk choices, logprobs, usage, and SSE framing.

Logprobs, as OpenAI and vLLM shape them. Completions: {"tokens", "token_logprobs", "top_logprobs", "text_offset"},
top_logprobs one {token text: logprob} per token holding the k most likely tokens and the token itself (so up to
k + 1 entries; with `logprobs: 0` just the token); an echoed prompt's first token has null for both (nothing
predicts it). Chat: {"content": [{"token", "logprob", "bytes", "top_logprobs": [k x {"token", "logprob",
"bytes"}]}]}. Every logprob is the raw model's at temperature 1 (engine.py).

`Reply` is everything that differs between /v1/completions and /v1/chat/completions once the prompts are built;
`ChoiceStream` turns one sequence's tokens into chunk choices that only ever add text (`tokenizer.TextStream` and
`split_stream` hold back what may still change). No HTTP here: plain dicts and bytes, which serve.py sends.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from .engine import GenResult
from .scheduler import SchedulerError
from .tokenizer import TextStream, Tokenizer, split_reasoning, split_stream


class APIError(Exception):
    """An error answered in the OpenAI shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    @classmethod
    def of(cls, e: SchedulerError) -> APIError:
        """A scheduler error (status, message, code) in the OpenAI shape: its type follows from the status."""
        kind = {408: "timeout_error", 429: "rate_limit_error"}.get(e.status)
        return cls(e.status, e.message, kind or ("server_error" if e.status >= 500 else "invalid_request_error"),
                   code=e.code)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(obj) -> bytes:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


SSE_DONE = b"data: [DONE]\n\n"


@dataclass
class Reply:
    """How choices look: /v1/completions (text) or /v1/chat/completions (a message, `<think>` split into
    reasoning_content). The one place the two endpoints differ once their prompts are built."""
    tokenizer: Tokenizer
    chat: bool
    thinking: bool = True          # chat: the prompt opened a think block (split_reasoning's `thinking`)
    logprobs: bool = False         # choices carry the tokens' logprobs
    top_logprobs: int = 0          # and the k most likely alternatives at each

    def envelope(self, model_name: str, stream: bool) -> dict:
        obj = "chat.completion" if self.chat else "text_completion"
        return {"id": f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}",
                "object": obj + ".chunk" if stream and self.chat else obj, "created": int(time.time()),
                "model": model_name}

    def logprobs_of(self, tokens: list[int], logprobs: list, tops: list) -> dict:
        """The logprobs object of tokens with their logprobs (None: an echoed prompt's first token) and their
        alternatives (per token a list of (token id, logprob), or None)."""
        strs = [self.tokenizer.decode([t]) for t in tokens]
        alts = [[(self.tokenizer.decode([t]), lp) for t, lp in top or []] for top in tops]
        if self.chat:
            def entry(s, lp):
                return {"token": s, "logprob": lp, "bytes": list(s.encode())}
            return {"content": [{**entry(s, lp), "top_logprobs": [entry(*a) for a in alt]}
                                for s, lp, alt in zip(strs, logprobs, alts)]}
        offsets, o = [], 0
        for s in strs:
            offsets.append(o)
            o += len(s)
        top_logprobs = [None if lp is None else {**dict(alt), s: lp} for s, lp, alt in zip(strs, logprobs, alts)]
        return {"tokens": strs, "token_logprobs": list(logprobs), "top_logprobs": top_logprobs, "text_offset": offsets}

    def choice(self, index: int, text: str, finish: str, tokens=(), logprobs=(), tops=()) -> dict:
        """A whole choice (non-streaming)."""
        lp = self.logprobs_of(tokens, logprobs, tops) if self.logprobs else None
        if self.chat:
            reasoning, answer = split_reasoning(text, thinking=self.thinking)
            return {"index": index, "finish_reason": finish,
                    "message": {"role": "assistant", "content": answer, "reasoning_content": reasoning}, "logprobs": lp}
        return {"index": index, "text": text, "finish_reason": finish, "logprobs": lp}

    def delta(self, index: int, text: str | None = None, reasoning: str = "", finish: str | None = None,
              pairs: list | None = None, role: bool = False) -> dict:
        """A streamed choice: new answer text (chat: `content`, sent when not None), new reasoning, the finish
        reason on the last one, the (token, logprob, alternatives) it covers."""
        if self.chat:
            delta = {"role": "assistant"} if role else {}
            if reasoning:
                delta["reasoning_content"] = reasoning
            if text is not None:
                delta["content"] = text
            ch = {"index": index, "delta": delta, "finish_reason": finish}
        else:
            ch = {"index": index, "text": text or "", "finish_reason": finish}
        if self.logprobs:
            ch["logprobs"] = self.logprobs_of(*zip(*pairs)) if pairs else None
        return ch


class ChoiceStream:
    """One streamed choice: the text it has sent (chat: reasoning and answer) and the tokens whose logprobs wait for
    the next chunk."""

    def __init__(self, reply: Reply, index: int, stops: list[str], eos: set[int]):
        self.reply, self.index = reply, index
        self.text = TextStream(reply.tokenizer, stops, eos)
        self.sent = ("", "")           # (reasoning, answer) sent so far
        self.pending: list = []        # (token, logprob, alternatives) not sent yet
        self.n_sent = 0                # tokens whose logprobs were sent

    def _deltas(self, text: str, final: bool) -> tuple[str, str]:
        r, a = split_stream(text, self.reply.thinking, final) if self.reply.chat else ("", text)
        r0, a0 = self.sent
        dr = r[len(r0):] if r.startswith(r0) else ""
        da = a[len(a0):] if a.startswith(a0) else ""
        self.sent = (r0 + dr, a0 + da)
        return dr, da

    def token(self, token: int, logprob: float, top=None) -> dict | None:
        """The chunk choice for a new token, or None while it adds no text that can no longer change."""
        self.pending.append((token, logprob, top))
        dr, da = self._deltas(self.text.push(token), final=False)
        if not (dr or da):
            return None
        pairs, self.pending = self.pending, []
        self.n_sent += len(pairs)
        return self.reply.delta(self.index, da or None, dr, pairs=pairs)

    def done(self, res: GenResult) -> dict:
        """The last chunk choice: the rest of the final text, the finish reason, the remaining logprobs."""
        dr, da = self._deltas(res.text, final=True)
        tops = res.top_logprobs or [None] * len(res.tokens)
        pairs = list(zip(res.tokens, res.logprobs, tops))[self.n_sent:res.completion_tokens]
        return self.reply.delta(self.index, da or None, dr, finish=res.finish_reason, pairs=pairs)
