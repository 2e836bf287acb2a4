"""Tokenizer: a thin wrapper over Hugging Face `tokenizers`, byte-level BPE training, and the chat format with <think>.

- `Tokenizer.load(path)` reads a tokenizer.json, a tokenizer directory (tokenizer.json + tokenizer_config.json, with
  an optional chat_template.jinja), or a GGUF file (converted by transformers to a fast tokenizer, then cached).
- `train_bpe(texts, vocab_size)` trains a byte-level BPE for nano models with our special tokens.
- `save(dir)` writes the Hugging Face layout, so `transformers.AutoTokenizer.from_pretrained(dir)` loads it too.
- `apply_chat_template(messages, ...)` renders the directory's jinja template in a sandboxed jinja2 environment, or
  our nano template (below) when the vocabulary has our special tokens and no template ships.
- `split_reasoning(text)` splits a completion into (reasoning, answer) at </think>.
- `tail_text(tokenizer, text, n)` / `head_text` cut the last / first n tokens of a text (Markovian RSA tails, the RL
  and SFT aggregation prompts, Delethink's head); `count_text` counts tokens. Without a tokenizer (an OpenAI server
  given no `tokenizer=`) all three use CHARS_PER_TOKEN characters per token.

Nano chat format (NANO_CHAT_TEMPLATE), one turn per line, `<|bos|>` once:

    <|bos|><|system|>You are terse.<|end|>
    <|user|>What is 2+2?<|end|>
    <|assistant|><think>
    2+2 is 4.
    </think>
    4<|end|>

The generation prompt is `<|assistant|><think>\n` (thinking on: the prompt opens the think block, so completions
start inside it) or `<|assistant|><think>\n\n</think>\n` (enable_thinking=False: an empty, closed think block).
Assistant reasoning (message key "reasoning_content" or "reasoning") is rendered only for assistant turns after the
last user turn; earlier turns keep their answers only (the Qwen3 convention: past thoughts are not context).
`<think>`/`</think>` are added tokens that are never split but are not "special", so decode(skip_special_tokens=True)
keeps them and split_reasoning can see them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from pathlib import Path

from tokenizers import AddedToken, Tokenizer as _HFTokenizer, decoders, models, pre_tokenizers, processors, trainers

# ids 0..5 in trained nano tokenizers, in this order
NANO_SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

NANO_CHAT_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{{- bos_token -}}"
    "{%- for m in messages -%}"
    "{%- if m['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('unknown role: ' ~ m['role']) -}}{%- endif -%}"
    "{{- '<|' ~ m['role'] ~ '|>' -}}"
    "{%- set reasoning = m.get('reasoning_content') or m.get('reasoning') -%}"
    "{%- if m['role'] == 'assistant' and reasoning and loop.index0 > ns.last_user -%}"
    "{{- '<think>\n' ~ reasoning.strip() ~ '\n</think>\n' -}}{%- endif -%}"
    "{{- m['content'] ~ '<|end|>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{%- if enable_thinking is defined and not enable_thinking -%}{{- '<|assistant|><think>\n\n</think>\n' -}}"
    "{%- else -%}{{- '<|assistant|><think>\n' -}}{%- endif -%}"
    "{%- endif -%}"
)


def split_reasoning(text: str, thinking: bool = True) -> tuple[str, str]:
    """(reasoning, answer) of a completion. Works whether the completion starts with `<think>` or starts inside
    the think block (the template opened it in the prompt). No `</think>` means the trace was truncated (or never
    closed): everything is reasoning and the answer is ''. With thinking=False (the prompt held a closed, empty think
    block) a text without `</think>` is all answer."""
    close = text.find(THINK_CLOSE)
    if close < 0:
        if not thinking and THINK_OPEN not in text:
            return "", text.strip()
        return text.replace(THINK_OPEN, "", 1).strip() if text.lstrip().startswith(THINK_OPEN) else text.strip(), ""
    reasoning, answer = text[:close], text[close + len(THINK_CLOSE):]
    open_ = reasoning.find(THINK_OPEN)
    if open_ >= 0:  # drop the opening tag (and any preamble before it, e.g. whitespace)
        reasoning = reasoning[open_ + len(THINK_OPEN):]
    return reasoning.strip(), answer.strip()


CHARS_PER_TOKEN = 4  # the token-count approximation where there is no tokenizer (count, tails, heads)


def count_text(tokenizer: "Tokenizer | None", text: str) -> int:
    """Tokens of `text` (no special tokens added); without a tokenizer ceil(len(text) / CHARS_PER_TOKEN)."""
    if tokenizer is None:
        return math.ceil(len(text) / CHARS_PER_TOKEN)
    return len(tokenizer.encode(text, add_special_tokens=False))


def tail_text(tokenizer: "Tokenizer | None", text: str, n_tokens: int) -> str:
    """The last `n_tokens` tokens of `text`, as text: always a suffix of `text` that re-encodes to at most n_tokens
    tokens. NOTE: a cut inside a multi-byte character decodes to U+FFFD, which is not a suffix of the text (and
    re-encodes to more tokens): such leading characters are dropped; then, should the re-encoded tail still exceed
    n_tokens (BPE merges the cut text differently), characters are dropped from its front until it fits. Without a
    tokenizer: the last CHARS_PER_TOKEN * n_tokens characters."""
    if n_tokens <= 0:
        return ""
    if tokenizer is None:
        return text[-CHARS_PER_TOKEN * n_tokens:]
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) <= n_tokens:
        return text
    tail = tokenizer.decode(ids[-n_tokens:])
    while tail and not text.endswith(tail):
        tail = tail[1:]
    while tail and count_text(tokenizer, tail) > n_tokens:
        tail = tail[1:]
    return tail


def head_text(tokenizer: "Tokenizer | None", text: str, n_tokens: int) -> str:
    """The first `n_tokens` tokens of `text`, as a prefix of it (tail_text's rules, mirrored: characters are dropped
    from the end of a cut inside a multi-byte character or of a head that re-encodes longer)."""
    if n_tokens <= 0:
        return ""
    if tokenizer is None:
        return text[:CHARS_PER_TOKEN * n_tokens]
    head = tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)[:n_tokens])
    while head and (not text.startswith(head) or count_text(tokenizer, head) > n_tokens):
        head = head[:-1]
    return head


@functools.lru_cache(maxsize=16)
def _compile_template(template: str):
    """Compile a chat template once (jinja compilation costs ~10 ms, far more than rendering)."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def _render_template(template: str, messages: list[dict], **context) -> str:
    """Render a chat template the way Hugging Face does: sandboxed, trim_blocks + lstrip_blocks, `raise_exception`."""
    return _compile_template(template).render(messages=messages, **context)


def _token_str(value) -> str | None:
    """tokenizer_config.json stores special tokens as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special-token roles and the chat template."""

    def __init__(self, tok: _HFTokenizer, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, chat_template: str | None = None):
        self.tok = tok
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        if chat_template is None and all(tok.token_to_id(t) is not None for t in NANO_SPECIAL_TOKENS[1:]):
            chat_template = NANO_CHAT_TEMPLATE
        self.chat_template = chat_template

    # ------------------------------------------------------------------ loading and saving

    @classmethod
    def load(cls, path: str | os.PathLike, gguf_file: str | None = None) -> "Tokenizer":
        """Load from a tokenizer.json, a tokenizer directory, or a GGUF (`path` = the .gguf, or its directory plus
        `gguf_file`). NOTE: converting a GGUF vocabulary takes ~1 min for Gemma's 262k tokens, so the converted
        tokenizer is cached under ~/.cache/openzaya/gguf-tokenizers/ (keyed by file name, size and mtime).
        A `path` that does not exist is taken as a Hugging Face Hub repo id: its tokenizer files (or `gguf_file`) are
        fetched into, or found in, the HF cache (`checkpoint.resolve_model_dir`)."""
        path = Path(path)
        if not path.exists():
            from .checkpoint import TOKENIZER_FILES, resolve_model_dir
            path = resolve_model_dir(path, TOKENIZER_FILES if gguf_file is None else [gguf_file])
        if path.suffix == ".gguf":
            path, gguf_file = path.parent, path.name
        if gguf_file is not None:
            return cls._load_gguf(path, gguf_file)
        if path.is_file():  # a bare tokenizer.json
            config, directory = {}, None
            tok = _HFTokenizer.from_file(str(path))
        else:
            directory = path
            config_path = path / "tokenizer_config.json"
            config = json.loads(config_path.read_text()) if config_path.exists() else {}
            if (path / "tokenizer.json").exists():
                tok = _HFTokenizer.from_file(str(path / "tokenizer.json"))
            else:  # e.g. sentencepiece-only: let transformers convert it
                from transformers import AutoTokenizer

                hf = AutoTokenizer.from_pretrained(str(path))
                return cls._from_transformers(hf)
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            template = {t["name"]: t["template"] for t in template}.get("default")
        if directory is not None and (directory / "chat_template.jinja").exists():
            template = (directory / "chat_template.jinja").read_text()
        return cls(tok, _token_str(config.get("bos_token")), _token_str(config.get("eos_token")),
                   _token_str(config.get("pad_token")), template)

    @classmethod
    def _from_transformers(cls, hf) -> "Tokenizer":
        template = hf.chat_template if isinstance(getattr(hf, "chat_template", None), str) else None
        return cls(hf.backend_tokenizer, hf.bos_token, hf.eos_token, hf.pad_token, template)

    @classmethod
    def _load_gguf(cls, directory: Path, gguf_file: str) -> "Tokenizer":
        st = (directory / gguf_file).stat()
        key = hashlib.sha256(f"{gguf_file}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
        cache = Path.home() / ".cache" / "openzaya" / "gguf-tokenizers" / f"{Path(gguf_file).stem}-{key}"
        if (cache / "tokenizer.json").exists():
            return cls.load(cache)
        from transformers import AutoTokenizer

        from .checkpoint import atomic_dir

        tok = cls._from_transformers(AutoTokenizer.from_pretrained(str(directory), gguf_file=gguf_file))
        atomic_dir(cache, tok.save, replace=False)   # if another process won the race, keep its copy
        return tok

    def save(self, directory: str | os.PathLike) -> Path:
        """Write tokenizer.json + tokenizer_config.json (special tokens, chat template) in the Hugging Face layout."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(directory / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000,
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
        return directory

    # ------------------------------------------------------------------ ids

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.tok.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        return self._id(self.pad_token)

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (added tokens included); a model's embedding may be larger."""
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_token(self, id: int) -> str | None:
        return self.tok.id_to_token(id)

    # ------------------------------------------------------------------ encode / decode

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids. add_special_tokens applies the post-processor (BOS for Gemma and nano tokenizers); special and
        added tokens written in the text (`<|user|>`, `<start_of_turn>`, `<think>`) are always kept whole."""
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: list[list[int]], skip_special_tokens: bool = False) -> list[str]:
        return self.tok.decode_batch([list(ids) for ids in batch], skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ chat

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            enable_thinking: bool = True, tokenize: bool = False, **kwargs) -> str | list[int]:
        """Render `messages` with the chat template. The rendered text already holds BOS, so tokenize=True encodes
        it with add_special_tokens=False. Extra kwargs (e.g. tools) reach the template as variables."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template: set tokenizer.chat_template (jinja) or ship one in "
                             "tokenizer_config.json / chat_template.jinja")
        text = _render_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                enable_thinking=enable_thinking, bos_token=self.bos_token or "",
                                eos_token=self.eos_token or "", pad_token=self.pad_token or "", **kwargs)
        return self.encode(text, add_special_tokens=False) if tokenize else text


def train_bpe(texts, vocab_size: int, special_tokens: list[str] | None = None) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style pre-tokenisation, 256-byte base alphabet, so any text encodes).
    `special_tokens` defaults to NANO_SPECIAL_TOKENS (ids 0..5, roles pad/bos/eos = <|pad|>/<|bos|>/<|end|>);
    `<think>`/`</think>` are always appended as the two last ids. vocab_size counts everything."""
    special_tokens = list(NANO_SPECIAL_TOKENS if special_tokens is None else special_tokens)
    assert vocab_size >= 256 + len(special_tokens) + 2, f"vocab_size {vocab_size} cannot hold the byte alphabet"
    tok = _HFTokenizer(models.BPE(byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 2, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in (THINK_OPEN, THINK_CLOSE)])
    pick = lambda t: t if t in special_tokens else None  # noqa: E731
    bos = pick("<|bos|>")
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    return Tokenizer(tok, bos, pick("<|end|>"), pick("<|pad|>"))


# ---------------------------------------------------------------------------------------------------------------------
# where a completion ends, and streaming detokenisation (what part of a growing completion is safe to show)


def eos_union(model_eos_ids: list[int], tokenizer: Tokenizer) -> list[int]:
    """The ids that end a completion: the model's EOS ids and the tokenizer's EOS token, sorted, each once."""
    return sorted(set(list(model_eos_ids) + ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])))


def held_suffix(text: str, needles: list[str]) -> int:
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
                end -= held_suffix(text, self.stops)
        if end > len(self.safe):
            self.safe = text[:end]
        return self.safe


def split_stream(text: str, thinking: bool, final: bool) -> tuple[str, str]:
    """(reasoning, answer) of a partial chat completion, both left-stripped, so that as text grows both only grow.
    Before `</think>` appears, a tail that may become `</think>` is held back (unless final). The streaming
    counterpart of `split_reasoning`."""
    close = text.find(THINK_CLOSE)
    if close < 0:
        if not thinking and THINK_OPEN not in text:
            return "", text.lstrip()
        body = text.lstrip()
        body = body[len(THINK_OPEN):] if body.startswith(THINK_OPEN) else body
        if not final:
            body = body[:len(body) - held_suffix(body, [THINK_CLOSE])]
        return body.lstrip(), ""
    reasoning = text[:close]
    o = reasoning.find(THINK_OPEN)
    if o >= 0:
        reasoning = reasoning[o + len(THINK_OPEN):]
    return reasoning.lstrip(), text[close + len(THINK_CLOSE):].lstrip()
