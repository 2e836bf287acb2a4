"""The request bodies `openzaya serve` takes (pydantic; they make the OpenAPI spec that schemathesis fuzzes) and its
policy on the fields OpenAI and vLLM define.

Field policy: a field is honoured, refused, or (harmless) ignored; never silently dropped when it would change the
output.
- Honoured (completions and chat): model, prompt / messages, max_tokens (chat: also max_completion_tokens),
  temperature, top_p, top_k, min_p, seed, stop, stop_token_ids, ignore_eos, n, stream, stream_options, logprobs
  (completions: the number of alternatives; chat: a flag with top_logprobs), presence_penalty, frequency_penalty,
  repetition_penalty, logit_bias (sampling.py has their exact definitions), return_token_ids (vLLM), ttc (ours);
  completions: echo (prompt text, and with logprobs the prompt's token logprobs, the first one null; max_tokens 0
  with echo scores the prompt alone), best_of equal to n; chat: chat_template_kwargs.enable_thinking.
- Refused with a 400 that names the field, when set to anything but a neutral value (`UNSUPPORTED`, `refusal`): tools,
  tool_choice, functions, function_call, response_format other than {"type": "text"} (no JSON mode), suffix,
  best_of other than n, prompt_logprobs (use echo), min_tokens, beam search, guided decoding / structured outputs,
  bad_words, allowed_token_ids, truncate_prompt_tokens, include_stop_str_in_output, skip_special_tokens (the text
  keeps special tokens, so stop strings can name them), reasoning_effort, a per-request chat_template,
  continue_final_message, add_generation_prompt false, chat echo, audio / prediction / web search; with `ttc`, every
  sampling field a TTC run does not use (`TTC_UNUSED`: all but temperature, top_p and seed).
- Ignored: any other field (user, metadata, store, service_tier, parallel_tool_calls, ...): none changes an output.
Ranges: every numeric field has an explicit range (counts within `MAX_COUNT`, floats finite), every string must be
valid Unicode; penalties within OpenAI's [-2, 2] (repetition: [0.01, 100], our bound, which keeps the logits finite),
logit_bias values within [-100, 100] over at most 1024 token ids.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .ttc import METHODS, TTCConfig

MAX_COUNT = 2**31 - 1   # the upper bound of every count field (tokens, n, top_k, ttc sizes); servers cap lower

# field -> its neutral values (what a client may send without asking for anything); any other value: 400
UNSUPPORTED: dict[str, tuple] = {
    "tools": (None, []), "tool_choice": (None, "none", "auto"), "functions": (None, []),
    "function_call": (None, "none", "auto"), "response_format": (None, {"type": "text"}), "suffix": (None, ""),
    "prompt_logprobs": (None,), "min_tokens": (None, 0), "use_beam_search": (None, False),
    "length_penalty": (None, 1), "guided_json": (None,), "guided_regex": (None,), "guided_choice": (None,),
    "guided_grammar": (None,), "structured_outputs": (None,), "bad_words": (None, []),
    "allowed_token_ids": (None,), "truncate_prompt_tokens": (None,), "include_stop_str_in_output": (None, False),
    "skip_special_tokens": (None, False), "reasoning_effort": (None,), "chat_template": (None,),
    "continue_final_message": (None, False), "add_generation_prompt": (None, True), "echo": (None, False),
    "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,), "web_search_options": (None,),
    "logits_processors": (None,), "return_tokens_as_token_ids": (None, False),
}
# sampling fields a TTC run (ttc.py) does not use: set with `ttc`, a 400
TTC_UNUSED = ("max_tokens", "max_completion_tokens", "top_k", "min_p", "stop", "stop_token_ids", "ignore_eos",
              "logprobs", "top_logprobs", "echo", "best_of", "presence_penalty", "frequency_penalty",
              "repetition_penalty", "logit_bias", "return_token_ids", "return_routed_experts")


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
Bias = Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]


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
    model_config = ConfigDict(extra="allow")   # kept, so that refused_field can see them

    model: str
    max_tokens: int | None = _count(None, 0, "0 only with echo (completions): score the prompt")
    temperature: float | None = _unit(None, ge=0, le=2)
    top_p: float | None = _unit(None, gt=0, le=1)
    top_k: int | None = _count(None, -1)
    min_p: float | None = _unit(None, ge=0, le=1)
    seed: int | None = Field(None, ge=-(2 ** 63), le=2 ** 64 - 1)
    stop: str | list[str] | None = Field(None, max_length=16)
    stop_token_ids: list[TokenId] | None = Field(None, max_length=64, description="vLLM: also end on these ids")
    ignore_eos: bool = Field(False, description="vLLM: do not end on the end-of-sequence tokens")
    n: int = _count(1, 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = _unit(None, ge=-2, le=2)
    frequency_penalty: float | None = _unit(None, ge=-2, le=2)
    repetition_penalty: float | None = _unit(None, ge=0.01, le=100)
    logit_bias: dict[str, Bias] | None = Field(None, max_length=1024, description="token id -> bias added to its "
                                                                                 "logit")
    ttc: TTCSpec | None = None
    return_token_ids: bool = Field(False, description="vLLM extension: each choice carries its sampled token_ids "
                                                      "(non-streaming requests)")
    return_routed_experts: bool = Field(False, description="each choice carries routed_experts (non-streaming; "
                                                           "server started with --enable-return-routed-experts)")


class CompletionBody(_Sampling):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = _count(None, 1, "equal to n only (no server-side best-of selection)")


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


class TokenizeBody(_Strict):
    """vLLM's two /tokenize requests in one: `prompt` (add_special_tokens defaults to true) or `messages` (the chat
    template is applied; add_special_tokens defaults to false, add_generation_prompt to true)."""
    model_config = ConfigDict(extra="allow")   # refused_field: tools, continue_final_message, chat_template

    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    return_token_strs: bool = False
    chat_template_kwargs: ChatTemplateKwargs | None = None


class DetokenizeBody(_Strict):
    model: str | None = None
    tokens: list[TokenId]


def refusal(body: BaseModel) -> tuple[str, str] | None:
    """(field, why) of the first field of the body this server refuses (see the module docstring), or None."""
    for name, value in (body.model_extra or {}).items():
        if name in UNSUPPORTED and value not in UNSUPPORTED[name]:
            return name, f"{name} is not supported by this server (neither implemented nor ignored): leave it out"
    if getattr(body, "best_of", None) not in (None, getattr(body, "n", 1)):
        return "best_of", "best_of must equal n: this server does no best-of selection"
    if getattr(body, "ttc", None) is not None:
        fields = type(body).model_fields
        for f in TTC_UNUSED:
            if f in fields and getattr(body, f) != fields[f].default:
                return f, f"a ttc run does not use {f} (only temperature, top_p and seed): leave it out"
    return None
