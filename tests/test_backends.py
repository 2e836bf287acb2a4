"""Backends: HFBackend on the Gemma 3 270M fixture, OpenAIBackend against a real local HTTP stub server.
    .venv/bin/python -m pytest tests/test_backends.py"""

import asyncio
import math
import socket
import time

import pytest

from openzaya.backends import Backend, BackendError, HFBackend, OpenAIBackend, Request, SamplingParams
from openzaya.tokenizer import train_bpe

from openai_stub_server import StubServer

GREEDY = SamplingParams(temperature=0.0, max_tokens=8)
PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea, there lived",
           "1, 2, 3, 4,"]


# ---------------------------------------------------------------------------------------------------------------------
# HFBackend on the Gemma fixture (its transformers-native copy: loading from the GGUF itself costs ~100 s)

@pytest.fixture(scope="module")
def hf(gemma_dir):
    """NOTE: one torch thread while these run: on the shared 2-core box, 2 OpenMP threads that contend with other
    processes made each matmul ~10x slower. Restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield HFBackend(gemma_dir[0])
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def greedy_batch(hf):
    return hf.generate([Request(prompt=p, params=GREEDY) for p in PROMPTS])


def test_hf_greedy_usage_and_logprobs(hf, greedy_batch):
    for [c], prompt in zip(greedy_batch, PROMPTS):
        assert c.text.strip() and c.finish_reason in ("stop", "length")
        assert c.prompt_tokens == len(hf.tokenizer.encode(prompt))
        assert c.completion_tokens == len(c.token_ids) <= 8
        assert hf.tokenizer.decode(c.token_ids).startswith(c.text)
        assert len(c.logprobs) == len(c.token_ids) and all(math.isfinite(x) and x <= 0 for x in c.logprobs)
        assert c.latency_s > 0
        assert c.reasoning == c.text.strip() and c.answer == ""  # no </think>: all (truncated) reasoning
    # greedy tokens are the argmax, and their log-probs match a full forward pass
    import torch

    [[a]] = greedy_batch[:1]
    ids = hf.tokenizer.encode(PROMPTS[0]) + a.token_ids
    with torch.no_grad():
        logp = torch.log_softmax(hf.model(torch.tensor([ids])).logits[0].float(), -1)
    n = len(a.token_ids)
    ref = logp[-n - 1:-1].gather(1, torch.tensor(a.token_ids)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(a.logprobs), ref, atol=1e-3)
    assert logp[-n - 1:-1].argmax(-1).tolist() == a.token_ids


def test_hf_batch_equals_one_by_one(hf, greedy_batch):
    for p, [c] in zip(PROMPTS[1:], greedy_batch[1:]):  # the longest and the shortest prompt
        [[single]] = hf.generate([Request(prompt=p, params=GREEDY)])
        assert c.token_ids == single.token_ids and c.text == single.text


def test_hf_stop_strings(hf, greedy_batch):
    [[full]] = greedy_batch[1:2]
    words = full.text.split()
    assert len(words) >= 4, full.text
    stop = words[2]
    params = SamplingParams(temperature=0.0, max_tokens=8, stop=["@@never@@", stop])
    [[cut]] = hf.generate([Request(prompt=PROMPTS[1], params=params)])
    assert cut.text == full.text[:full.text.index(stop)] and cut.finish_reason == "stop"
    assert cut.token_ids == full.token_ids[:len(cut.token_ids)] and len(cut.token_ids) < len(full.token_ids)
    assert stop in hf.tokenizer.decode(cut.token_ids) and stop not in hf.tokenizer.decode(cut.token_ids[:-1])


def test_hf_backend_takes_a_hub_repo_id(gemma_dir, greedy_batch, tmp_path, monkeypatch):
    """`--backend hf --model owner/name`: transformers resolves the weights and our Tokenizer.load the tokenizer files
    through the same Hugging Face cache (here offline, laid out as huggingface_hub writes it, files linked)."""
    import huggingface_hub.constants as hub

    sha = "89abcdef0123456789abcdef0123456789abcdef"
    snap = tmp_path / "hub" / "models--openzaya-test--gemma" / "snapshots" / sha
    snap.mkdir(parents=True)
    for f in gemma_dir[0].iterdir():
        if f.is_file() and not f.name.startswith("."):
            (snap / f.name).symlink_to(f)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text(sha)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    got = HFBackend("openzaya-test/gemma").generate([Request(prompt=PROMPTS[0], params=GREEDY)])
    assert got[0][0].token_ids == greedy_batch[0][0].token_ids


def test_hf_n_seeds_and_chat(hf):
    sampled = SamplingParams(temperature=1.0, max_tokens=4, n=2, seed=1234)
    [first, again] = hf.generate([Request(prompt=PROMPTS[0], params=sampled)] * 2)
    assert len(first) == 2 and [c.token_ids for c in first] == [c.token_ids for c in again]  # seeded
    assert all(len(c.logprobs) == len(c.token_ids) and all(map(math.isfinite, c.logprobs)) for c in first)
    # greedy n>1 decodes once and copies; chat messages go through the chat template (the base GGUF ships none:
    # pass Gemma's turn format)
    hf.tokenizer.chat_template = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m.role }}\n{{ m.content }}"
                                  "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n"
                                  "{% endif %}")
    messages = [{"role": "user", "content": "Say hi."}]
    [greedy] = hf.generate([Request(messages=messages, params=SamplingParams(temperature=0.0, max_tokens=4, n=2),
                                    enable_thinking=False)])
    assert len(greedy) == 2 and greedy[0].token_ids == greedy[1].token_ids and greedy[0] is not greedy[1]
    c = greedy[0]
    prompt_ids = hf.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert prompt_ids[:2] == [2, 105] and c.prompt_tokens == len(prompt_ids)
    assert c.answer == c.text.strip() and c.reasoning == ""


def test_hf_seeded_sampling_is_batched_and_batch_invariant(hf, monkeypatch):
    """Seeded sampled requests share one batch (TTC seeds every call) and get the tokens they get alone; sample i of
    a request with seed s is the request with seed s + i."""
    batches = []
    real = hf._generate_batch
    monkeypatch.setattr(hf, "_generate_batch", lambda reqs, prompts: batches.append(len(reqs)) or real(reqs, prompts))
    params = [SamplingParams(temperature=1.0, top_p=0.9, max_tokens=6, seed=100 + i) for i in range(3)]
    reqs = [Request(prompt=p, params=sp) for p, sp in zip(PROMPTS, params)]
    together = hf.generate(reqs)
    assert batches == [3]                                   # one batch, not three batches of one
    alone = [hf.generate([r])[0] for r in reqs]
    assert [c.token_ids for [c] in together] == [c.token_ids for [c] in alone]
    for [c], [a] in zip(together, alone):
        assert c.logprobs == pytest.approx(a.logprobs, abs=1e-4)
    assert len({tuple(c.token_ids) for [c] in together}) == 3
    two = hf.generate([Request(prompt=PROMPTS[0], params=SamplingParams(temperature=1.0, top_p=0.9, max_tokens=6,
                                                                         seed=100, n=2))])[0]
    again = hf.generate([Request(prompt=PROMPTS[0], params=SamplingParams(temperature=1.0, top_p=0.9, max_tokens=6,
                                                                           seed=101))])[0]
    assert two[0].token_ids == together[0][0].token_ids and two[1].token_ids == again[0].token_ids


# ---------------------------------------------------------------------------------------------------------------------
# OpenAIBackend against the stub server

def fast_backend(server, **kw):
    return OpenAIBackend(server.url, "stub", **{"backoff_s": 0.01, "max_retries": 3, "timeout_s": 5.0, **kw})


def test_openai_completions_and_chat():
    with StubServer() as server:
        backend = fast_backend(server)
        prompt = "Solve: what is 6 times 7?"
        [[c], [t]] = backend.generate([Request(prompt=prompt, params=SamplingParams(max_tokens=100)),
                                       Request(prompt=prompt, params=SamplingParams(max_tokens=3))])
        assert c.text == f"thinking about: {prompt[:24]}\n</think>\n\nanswer 0" + " w" * 10
        assert (c.reasoning, c.answer) == (f"thinking about: {prompt[:24]}", "answer 0" + " w" * 10)
        assert c.finish_reason == "stop" and c.completion_tokens == len(c.text.split())
        assert c.prompt_tokens == len(prompt.split()) and c.token_ids is None
        assert t.finish_reason == "length" and t.answer == "" and t.reasoning == "thinking about: Solve:"
        # the two requests are in flight together: the server may see them in either order
        assert sorted((r["max_tokens"], r["prompt"]) for r in server.requests) == [(3, prompt), (100, prompt)]

        messages = [{"role": "user", "content": "hello there"}]
        [[m]] = backend.generate([Request(messages=messages, params=SamplingParams(max_tokens=50, stop=["w w"]))])
        assert (m.reasoning, m.answer) == ("thinking about: hello there", "answer 0")
        body = server.requests[-1]
        assert body["max_completion_tokens"] == 50 and body["stop"] == ["w w"] and "chat_template_kwargs" not in body
        backend.generate([Request(messages=messages, enable_thinking=False)])
        assert server.requests[-1]["chat_template_kwargs"] == {"enable_thinking": False}


def test_openai_max_tokens_fallback():
    with StubServer(reject_max_completion_tokens=True) as server:
        backend = fast_backend(server)
        [[c]] = backend.generate([Request(messages=[{"role": "user", "content": "hi"}])])
        assert c.answer.startswith("answer 0") and backend.chat_max_tokens_key == "max_tokens"
        backend.generate([Request(messages=[{"role": "user", "content": "hi"}])])
        assert len(server.requests) == 3 and "max_completion_tokens" not in server.requests[-1]


def test_openai_n_native_and_fan_out():
    with StubServer() as server:
        [cs] = fast_backend(server).generate([Request(prompt="p", params=SamplingParams(n=3))])
        assert [c.answer.split(" w")[0] for c in cs] == ["answer 0", "answer 1", "answer 2"]
        assert len(server.requests) == 1
    with StubServer(ignore_n=True) as server:
        backend = fast_backend(server)
        [cs] = backend.generate([Request(prompt="p", params=SamplingParams(n=3, seed=7))])
        assert len(cs) == 3 and backend.native_n["completions"] is False
        assert [r["n"] for r in server.requests] == [3, 1, 1]
        # the two fanned-out requests are in flight together: either may reach the server first
        assert server.requests[0]["seed"] == 7 and sorted(r["seed"] for r in server.requests[1:]) == [8, 9]
        [cs] = backend.generate([Request(prompt="p", params=SamplingParams(n=2))])
        assert len(cs) == 2 and [r["n"] for r in server.requests[3:]] == [1, 1]


def test_openai_retries_then_success():
    with StubServer(fail_statuses=[429, 500, 503]) as server:
        [[c]] = fast_backend(server).generate([Request(prompt="p")])
        assert c.answer.startswith("answer 0") and len(server.requests) == 4
    with StubServer(fail_statuses=[404]) as server:  # not retryable
        with pytest.raises(BackendError, match="HTTP 404"):
            fast_backend(server).generate([Request(prompt="p")])
        assert len(server.requests) == 1
    with StubServer(fail_statuses=[500] * 10) as server:  # retry budget exhausted
        with pytest.raises(BackendError, match="4 attempts.*HTTP 500"):
            fast_backend(server).generate([Request(prompt="p")])


def test_openai_unreachable_server_fails_fast():
    with socket.socket() as s:  # a port that nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = OpenAIBackend(f"http://127.0.0.1:{port}", "m", max_retries=2, backoff_s=0.05, timeout_s=2.0)
    t0 = time.perf_counter()
    with pytest.raises(BackendError, match=rf"127\.0\.0\.1:{port}/v1/completions.*3 attempts.*Connect"):
        backend.generate([Request(prompt="p")])
    assert time.perf_counter() - t0 < 5


def test_openai_timeout_on_slow_server():
    with StubServer(delay_s=1.5) as server:
        backend = fast_backend(server, timeout_s=0.2, max_retries=1)
        t0 = time.perf_counter()
        with pytest.raises(BackendError, match="Timeout"):
            backend.generate([Request(prompt="p")])
        assert time.perf_counter() - t0 < 1.4


def test_openai_reasoning_content():
    with StubServer(reasoning_content=True) as server:
        backend = fast_backend(server)
        [[c], [t]] = backend.generate([Request(messages=[{"role": "user", "content": "why"}]),
                                       Request(messages=[{"role": "user", "content": "why"}],
                                               params=SamplingParams(max_tokens=0))])
        assert (c.reasoning, c.answer) == ("thinking about: why", "answer 0" + " w" * 10)
        assert c.text == "<think>\nthinking about: why\n</think>\n\nanswer 0" + " w" * 10
        assert t.finish_reason == "length" and t.answer == "" and "</think>" not in t.text


def test_openai_concurrency_bound_and_async():
    with StubServer(delay_s=0.1) as server:
        backend = fast_backend(server, max_concurrency=2)
        out = backend.generate([Request(prompt=f"p{i}") for i in range(8)])
        assert len(out) == 8 and server.max_in_flight == 2

        async def inside_a_loop():  # agenerate directly, and the sync wrapper from a running loop
            a = await backend.agenerate([Request(prompt="q")])
            return a, backend.generate([Request(prompt="r")])

        a, b = asyncio.run(inside_a_loop())
        assert a[0][0].reasoning == "thinking about: q" and b[0][0].reasoning == "thinking about: r"


def test_tail_tokens_exact_and_approximate():
    text = "The quick brown fox jumps over the lazy dog. " * 4
    approx = OpenAIBackend("http://127.0.0.1:1", "m")
    assert approx.tail_approximation and approx.count_tokens(text) is None
    assert approx.tail_tokens(text, 3) == text[-12:] and approx.tail_tokens(text, 0) == ""
    tok = train_bpe([text] * 20, vocab_size=300)
    exact = OpenAIBackend("http://127.0.0.1:1", "m", tokenizer=tok)
    assert exact.tail_approximation is None and exact.count_tokens(text) == len(tok.encode(text)) - 1
    tail = exact.tail_tokens(text, 5)
    assert text.endswith(tail) and len(tok.encode(tail, add_special_tokens=False)) == 5
    assert exact.tail_tokens("short", 100) == "short"
    assert isinstance(approx, Backend)
