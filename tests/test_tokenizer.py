"""Tokenizer, chat template and reasoning split.   .venv/bin/python -m pytest tests/test_tokenizer.py"""

import pytest

from openzaya.tokenizer import (CHARS_PER_TOKEN, NANO_CHAT_TEMPLATE, NANO_SPECIAL_TOKENS, Tokenizer, count_text,
                                head_text, split_reasoning, tail_text, train_bpe)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. 12 + 30 = 42.",
    "def add(a, b):\n    return a + b\n",
    "Zyphra trained ZAYA1 with reasoning traces inside think blocks.",
    "Ünïcödé, emoji 😀 and 中文 must survive byte-level BPE.",
] * 40


@pytest.fixture(scope="module")
def nano():
    return train_bpe(CORPUS, vocab_size=320)


# ---------------------------------------------------------------------------------------------------------------------
# nano tokenizer

def test_train_bpe_ids_and_round_trip(nano):
    assert nano.vocab_size <= 320
    assert [nano.token_to_id(t) for t in NANO_SPECIAL_TOKENS] == list(range(6))
    assert (nano.pad_id, nano.bos_id, nano.eos_id) == (0, 1, 2)
    assert nano.token_to_id("<think>") == nano.vocab_size - 2 and nano.token_to_id("</think>") == nano.vocab_size - 1
    for text in CORPUS[:4] + ["unseen wörds ∑ \t\n  spaces", ""]:
        ids = nano.encode(text)
        assert ids[0] == nano.bos_id
        assert nano.decode(ids[1:]) == text
        assert nano.decode(ids, skip_special_tokens=True) == text
    batch = nano.encode_batch(CORPUS[:4], add_special_tokens=False)
    assert batch == [nano.encode(t, add_special_tokens=False) for t in CORPUS[:4]]
    assert nano.decode_batch(batch) == CORPUS[:4]


def test_special_tokens_never_split(nano):
    for tok in NANO_SPECIAL_TOKENS + ["<think>", "</think>"]:
        ids = nano.encode(f"a{tok}b{tok}", add_special_tokens=False)
        assert ids.count(nano.token_to_id(tok)) == 2, tok
    # think tags survive skip_special_tokens (split_reasoning needs them); role tokens do not
    ids = nano.encode("<|user|>x<think>y</think>z<|end|>", add_special_tokens=False)
    assert nano.decode(ids, skip_special_tokens=True) == "x<think>y</think>z"


def test_nano_chat_template_multi_turn(nano):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "old thought"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6", "reasoning_content": "3+3 is 6."},
    ]
    assert nano.chat_template == NANO_CHAT_TEMPLATE
    assert nano.apply_chat_template(messages) == (
        "<|bos|><|system|>You are terse.<|end|>\n"
        "<|user|>What is 2+2?<|end|>\n"
        "<|assistant|>4<|end|>\n"  # reasoning of turns before the last user turn is dropped
        "<|user|>And 3+3?<|end|>\n"
        "<|assistant|><think>\n3+3 is 6.\n</think>\n6<|end|>\n")
    prompt = nano.apply_chat_template(messages[:4], add_generation_prompt=True)
    assert prompt.endswith("<|user|>And 3+3?<|end|>\n<|assistant|><think>\n")
    off = nano.apply_chat_template(messages[1:2], add_generation_prompt=True, enable_thinking=False)
    assert off == "<|bos|><|user|>What is 2+2?<|end|>\n<|assistant|><think>\n\n</think>\n"
    ids = nano.apply_chat_template(messages[1:2], add_generation_prompt=True, tokenize=True)
    assert ids[:2] == [nano.bos_id, nano.token_to_id("<|user|>")] and ids.count(nano.bos_id) == 1
    assert ids[-3:-1] == [nano.token_to_id("<|assistant|>"), nano.token_to_id("<think>")]  # then "\n"
    with pytest.raises(Exception, match="unknown role"):
        nano.apply_chat_template([{"role": "robot", "content": "x"}])


def test_save_load_and_transformers(nano, tmp_path):
    nano.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    text = "<|user|>Ünïcödé 😀<think>x</think><|end|>"
    assert again.encode(text) == nano.encode(text)
    assert (again.bos_id, again.eos_id, again.pad_id, again.vocab_size) == (1, 2, 0, nano.vocab_size)
    assert again.chat_template == NANO_CHAT_TEMPLATE
    assert Tokenizer.load(tmp_path / "tokenizer.json").encode(text) == nano.encode(text)

    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf(text).input_ids == nano.encode(text)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 0)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "reasoning": "r"}]
    assert hf.apply_chat_template(messages, tokenize=False) == nano.apply_chat_template(messages)


def test_template_file_takes_precedence(nano, tmp_path):
    nano.save(tmp_path)
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m.role }}]{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}[a]{% endif %}")
    tok = Tokenizer.load(tmp_path)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True) == "[user]hi\n[a]"


def test_template_is_sandboxed(nano):
    nano.chat_template = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(Exception):
        nano.apply_chat_template([{"role": "user", "content": "x"}])
    nano.chat_template = NANO_CHAT_TEMPLATE


# ---------------------------------------------------------------------------------------------------------------------
# split_reasoning

@pytest.mark.parametrize("text, expected", [
    ("<think>\nstep 1\n</think>\n\n42", ("step 1", "42")),          # completion opens the block
    ("step 1\nstep 2\n</think>\n42", ("step 1\nstep 2", "42")),       # prompt opened the block
    ("<think>\nstep 1, still going", ("step 1, still going", "")),  # truncated
    ("step 1, still going", ("step 1, still going", "")),            # truncated, opened in the prompt
    ("", ("", "")),
    ("\n<think></think>42", ("", "42")),                              # empty block
    ("a</think>b</think>c", ("a", "b</think>c")),                     # only the first close counts
])
def test_split_reasoning(text, expected):
    assert split_reasoning(text) == expected


def test_split_reasoning_thinking_off():
    assert split_reasoning("just 42", thinking=False) == ("", "just 42")
    assert split_reasoning("x</think>42", thinking=False) == ("x", "42")


# ---------------------------------------------------------------------------------------------------------------------
# the last (first) n tokens of a text: Markovian RSA tails, RL and SFT aggregation prompts, Delethink's head

MULTIBYTE = "The reasoning ends in テキスト"   # katakana the nano BPE never saw: one token per byte, 3 a char


def test_tail_and_head_cut_inside_a_multibyte_character(nano):
    ids = nano.encode(MULTIBYTE, add_special_tokens=False)
    assert "\ufffd" in nano.decode(ids[-4:])          # the plain cut: a broken character, not a suffix of the text
    assert tail_text(nano, MULTIBYTE, 4) == "ト" and tail_text(nano, MULTIBYTE, 6) == "スト"
    assert tail_text(nano, MULTIBYTE, 7) == "スト"       # 7 tokens = 2 characters + 1 byte of the third
    for n in range(1, len(ids) + 2):
        tail, head = tail_text(nano, MULTIBYTE, n), head_text(nano, MULTIBYTE, n)
        assert MULTIBYTE.endswith(tail) and "\ufffd" not in tail and count_text(nano, tail) <= n
        assert MULTIBYTE.startswith(head) and "\ufffd" not in head and count_text(nano, head) <= n
    assert tail_text(nano, MULTIBYTE, len(ids)) == MULTIBYTE == head_text(nano, MULTIBYTE, len(ids))
    assert head_text(nano, "テキスト", 4) == "テ"
    assert tail_text(nano, MULTIBYTE, 0) == "" == head_text(nano, "ab", 0)


def test_without_a_tokenizer_a_token_is_chars_per_token_characters():
    text = "abcdefghij" * 3
    assert CHARS_PER_TOKEN == 4
    assert tail_text(None, text, 3) == text[-12:] and head_text(None, text, 2) == text[:8]
    assert count_text(None, text) == 8 and count_text(None, "abcd") == 1 and count_text(None, "") == 0
    assert tail_text(None, "short", 100) == "short" and tail_text(None, text, 0) == ""


def test_every_tail_caller_cuts_what_it_cut_before_on_ascii(nano):
    """On ASCII text each caller gets what its own cut gave before they shared tail_text: the decoded last tau ids
    (RL's self-aggregation tails and the SFT aggregation chats), the backend's tail (Markovian RSA through Run.tail),
    the first n ids (Delethink's head), 4 characters per token without a tokenizer."""
    from openzaya.backends import OpenAIBackend
    from openzaya.data import aggregation_sft_samples, split_trace
    from openzaya.envs.registry import get_env
    from openzaya.ttc import Run, TTCConfig
    problems = [get_env(e).generate(1, s) for e in ("long_addition", "digit_sum", "sort_letters") for s in range(4)]
    backend = OpenAIBackend("http://127.0.0.1:1", "m", tokenizer=nano)
    run = Run(backend, TTCConfig(population=2, candidates=2, tail_tokens=8, budget_tokens=16))
    plain = {}
    for p in problems:
        reasoning = split_trace(p.solution)[0]
        ids = nano.encode(reasoning, add_special_tokens=False)
        for tau in (1, 4, 12, 64):
            plain[p.seed, p.env, tau] = nano.decode(ids[-tau:])
            assert tail_text(nano, reasoning, tau) == plain[p.seed, p.env, tau]
            assert backend.tail_tokens(reasoning, tau) == run.tail(reasoning, tau) == plain[p.seed, p.env, tau]
            assert head_text(nano, reasoning, tau) == nano.decode(ids[:tau])
            assert tail_text(None, reasoning, tau) == reasoning[-4 * tau:]
    chats = aggregation_sft_samples(problems, nano, C=2, tau=12, template="{question}\n{candidates}", seed=0)
    for p, chat in zip(problems, chats):
        shown = [blk.split("\n", 1)[1].rsplit("\n\n", 1)[0]
                 for blk in chat["messages"][0]["content"].split("---- Candidate ")[1:]]
        cell = {plain[q.seed, q.env, 12] for q in problems if q.env == p.env}
        assert len(shown) == 2 and all(t in cell for t in shown), (shown, cell)


# ---------------------------------------------------------------------------------------------------------------------
# Gemma 3 tokenizer from the GGUF fixture (the ZAYA1 vocabulary)

GOLDEN = [2, 9259, 236888, 2088, 740, 564, 6361, 611, 3124, 236881]


def test_gemma_golden_ids(gemma_dir):
    """NOTE: the fixture (Gemma 3 base) prepends BOS 2 but appends nothing; its eos is 1 (<eos>). ZAYA1's tokenizer
    appends 106 (<end_of_turn>, its eos) — zaya1-architecture.md §11 — so that check adds it explicitly."""
    directory, gguf = gemma_dir
    for tok in (Tokenizer.load(directory), Tokenizer.load(directory, gguf_file=gguf), Tokenizer.load(directory / gguf)):
        ids = tok.encode("Hello! How can I assist you today?")
        assert ids == GOLDEN
        assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 1, 0)
        assert tok.vocab_size == 262144
        assert tok.id_to_token(105) == "<start_of_turn>" and tok.id_to_token(106) == "<end_of_turn>"
        turn = tok.encode("<start_of_turn>user\nhi<end_of_turn>", add_special_tokens=False)
        assert turn[0] == 105 and turn[-1] == 106
        assert tok.decode(ids[1:]) == "Hello! How can I assist you today?"
