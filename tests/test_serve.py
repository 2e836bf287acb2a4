"""The OpenAI-compatible server (openzaya/serve.py) on loopback, driven by the official `openai` client, our
OpenAIBackend / `openzaya eval`, a 32-client streaming load test and a schemathesis fuzz run; plus the engine's
incremental interface against `generate`.

Run: .venv/bin/python -m pytest tests/test_serve.py
"""

import asyncio
import json
import time

import httpx
import openai
import pytest

from openzaya.backends import OpenAIBackend, Request, SamplingParams
from openzaya.engine import Engine, GenParams
from openzaya.serve import ServeConfig, load_app
from server_thread import ServerThread
from test_local_backend import make_checkpoint
from zaya_ref import random_model, tiny_config

KEY = "sk-test"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serve") / "m")


@pytest.fixture(scope="module")
def server(ckpt):
    app = load_app(ckpt, ServeConfig(max_slots=8, max_len=1024, max_queue=64, api_key=KEY, request_timeout_s=60))
    with ServerThread(app) as s:
        s.name = app.state.srv.model_name
        yield s


@pytest.fixture(scope="module")
def tight(ckpt):
    """One slot, one queued sequence, no eos (every request runs to max_tokens): for 429 / disconnect tests."""
    app = load_app(ckpt, ServeConfig(max_slots=1, max_len=4096, max_queue=1, request_timeout_s=30))
    app.state.srv.eos_ids = []
    with ServerThread(app) as s:
        s.name, s.srv = app.state.srv.model_name, app.state.srv
        yield s


def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


# -----------------------------------------------------------------------------
# engine: the incremental interface


def test_engine_step_interface_matches_generate():
    eng = Engine(random_model(tiny_config()), max_slots=3, max_len=64)
    prompts = [[1, 5, 6, 7], [1, 9], [1, 4, 4, 4, 4, 4], [1, 2, 3], [1, 8, 8]]
    params = [GenParams(temperature=t, max_new_tokens=n, eos_ids=[], seed=i)
              for i, (t, n) in enumerate([(0, 5), (1, 9), (0, 3), (1, 7), (0.7, 4)])]
    ref = eng.generate(prompts, params)
    handles = [eng.submit(p, q) for p, q in zip(prompts, params)]
    got, streamed = {}, {h: [] for h in handles}
    while eng.num_running or eng.num_waiting:
        for o in eng.step():
            streamed[o.handle].append(o.token)
            if o.result is not None:
                got[o.handle] = o.result
    assert [got[h].tokens for h in handles] == [r.tokens for r in ref]
    assert [streamed[h] for h in handles] == [r.tokens for r in ref]   # one token per step, in order
    # cancel: a waiting one and a running one; the rest still finish, no slot stays taken
    handles = [eng.submit(p, q) for p, q in zip(prompts, params)]
    assert eng.cancel(handles[4])
    eng.step()
    assert eng.cancel(handles[0]) and eng.num_running == 2
    done = set()
    while eng.num_running or eng.num_waiting:
        done |= {o.handle for o in eng.step() if o.result is not None}
    assert done == set(handles[1:4]) and not eng.cancel(handles[0])
    with pytest.raises(ValueError):
        eng.submit([], params[0])


# -----------------------------------------------------------------------------
# the official openai client


def test_openai_client_completions_chat_streaming(server):
    c = client(server)
    assert [m.id for m in c.models.list().data] == [server.name]
    r = c.completions.create(model=server.name, prompt="1 plus 2 is", max_tokens=12, temperature=0, logprobs=1)
    text = r.choices[0].text
    assert r.usage.completion_tokens == len(r.choices[0].logprobs.token_logprobs) >= 1
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # streaming gives the same greedy text, token by token
    chunks = list(c.completions.create(model=server.name, prompt="1 plus 2 is", max_tokens=12, temperature=0,
                                       stream=True))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == text
    assert len([ch for ch in chunks if ch.choices and ch.choices[0].text]) >= min(3, len(text))
    # stop strings: cut exactly before the first occurrence
    if len(text) >= 4:
        stop = text[len(text) // 2: len(text) // 2 + 2]
        r2 = c.completions.create(model=server.name, prompt="1 plus 2 is", max_tokens=12, temperature=0, stop=[stop])
        assert r2.choices[0].text == text[:text.find(stop)] and r2.choices[0].finish_reason == "stop"
    # n > 1 with a seed: n distinct samples, reproduced by the same seed, streamed identically
    kw = dict(model=server.name, prompt="3 plus 4 is", max_tokens=8, temperature=1.0, n=3, seed=11)
    a, b = c.completions.create(**kw), c.completions.create(**kw)
    assert [ch.index for ch in a.choices] == [0, 1, 2]
    assert [ch.text for ch in a.choices] == [ch.text for ch in b.choices]
    streamed = {}
    for ch in c.completions.create(**kw, stream=True):
        for choice in ch.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert [streamed[i] for i in range(3)] == [ch.text for ch in a.choices]
    # chat: reasoning split, usage, streaming deltas add up to the same message
    msgs = [{"role": "user", "content": "5 plus 6?"}]
    r = c.chat.completions.create(model=server.name, messages=msgs, max_completion_tokens=16, temperature=0)
    m = r.choices[0].message
    reasoning = m.model_extra.get("reasoning_content")
    assert isinstance(reasoning, str) and isinstance(m.content, str) and r.usage.completion_tokens >= 1
    parts = {"r": "", "c": ""}
    for ch in c.chat.completions.create(model=server.name, messages=msgs, max_completion_tokens=16, temperature=0,
                                        stream=True, stream_options={"include_usage": True}):
        if ch.usage is not None and not ch.choices:
            assert ch.usage.completion_tokens == r.usage.completion_tokens
        for choice in ch.choices:
            parts["r"] += (choice.delta.model_extra or {}).get("reasoning_content") or ""
            parts["c"] += choice.delta.content or ""
    assert parts["r"].strip() == reasoning and parts["c"].strip() == m.content


def test_ttc_request_end_to_end(server):
    c = client(server)
    ttc = {"method": "markovian_rsa", "n": 4, "c": 2, "t": 1, "tau": 8, "beta": 12}
    r = c.chat.completions.create(model=server.name, messages=[{"role": "user", "content": "2 plus 2?"}],
                                  temperature=1.0, seed=3, extra_body={"ttc": ttc})
    acct = r.model_extra["ttc"]
    assert acct["method"] == "markovian_rsa" and acct["calls"] == 8 and len(acct["rounds"]) == 2
    assert r.usage.completion_tokens == acct["completion_tokens"] > 0
    assert isinstance(r.choices[0].message.content, str)
    events = []
    for ch in c.chat.completions.create(model=server.name, messages=[{"role": "user", "content": "2 plus 2?"}],
                                        temperature=1.0, seed=3, stream=True, extra_body={"ttc": ttc}):
        if ch.model_extra.get("ttc"):
            events.append(ch.model_extra["ttc"])
    assert [e["event"] for e in events] == ["round", "round", "final"]
    assert [e["round"] for e in events[:2]] == [0, 1] and events[-1]["calls"] == 8
    # invalid TTC settings are a 400, not a crash
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model=server.name, messages=[{"role": "user", "content": "q"}],
                                  extra_body={"ttc": {"method": "markovian_rsa", "n": 2, "c": 4}})


def test_openai_backend_and_eval_against_server(server, tmp_path, monkeypatch):
    from openzaya.cli import main

    be = OpenAIBackend(server.url, server.name, api_key=KEY, logprobs=True)
    out = be.generate([Request(prompt="1 plus 1 is", params=SamplingParams(temperature=0, max_tokens=6)),
                       Request(messages=[{"role": "user", "content": "hi"}],
                               params=SamplingParams(max_tokens=6, n=2, seed=1))])
    assert [len(x) for x in out] == [1, 2]
    assert all(c.completion_tokens >= 1 and c.finish_reason in ("stop", "length") for x in out for c in x)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    assert main(["eval", "--benchmark", "envs:tiny", "--limit", "2", "--backend", "openai", "--model", server.name,
                 "--base-url", server.url + "/v1", "--method", "single", "--budget-tokens", "8", "--tail-tokens", "4",
                 "--out", str(tmp_path / "eval")]) == 0
    assert (tmp_path / "eval" / "results.json").exists()


# -----------------------------------------------------------------------------
# load, fuzz, limits


def test_load_32_concurrent_streaming_clients(server):
    async def one(ac, i):
        text, finish, usage = "", None, None
        stream = await ac.chat.completions.create(
            model=server.name, messages=[{"role": "user", "content": f"{i} plus {i}?"}], max_completion_tokens=24,
            temperature=1.0, seed=i, stream=True, stream_options={"include_usage": True})
        async for ch in stream:
            for choice in ch.choices:
                text += ((choice.delta.model_extra or {}).get("reasoning_content") or "") + (choice.delta.content or "")
                finish = choice.finish_reason or finish
            usage = ch.usage or usage
        return text, finish, usage

    async def run():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60) as ac:
            return await asyncio.wait_for(asyncio.gather(*(one(ac, i) for i in range(32)), return_exceptions=True),
                                          timeout=60)

    t0 = time.perf_counter()
    results = asyncio.run(run())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    assert all(f in ("stop", "length") and u is not None and 1 <= u.completion_tokens <= 24 for _, f, u in results)
    assert time.perf_counter() - t0 < 60
    metrics = httpx.get(server.url + "/metrics").text
    assert "openzaya_request_latency_seconds_bucket" in metrics and "openzaya_queue_depth 0" in metrics


def test_schemathesis_fuzz_no_5xx(ckpt):
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    app = load_app(ckpt, ServeConfig(max_slots=4, max_len=48, max_queue=4, max_n=4, api_key=KEY,
                                     request_timeout_s=20))
    with ServerThread(app) as s:
        schema = schemathesis.openapi.from_url(s.url + "/openapi.json")
        failures = []
        for op in schema.get_all_operations():
            op = op.ok()

            @given(case=op.as_strategy())
            @settings(max_examples=25, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            def check(case):
                resp = case.call(base_url=s.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
                if resp.status_code >= 500:
                    failures.append((case.method, case.path, case.body, resp.status_code, resp.text[:300]))
                if resp.status_code >= 400 and case.path.startswith("/v1/"):
                    assert set(resp.json()["error"]) == {"message", "type", "param", "code"}

            check()
        assert not failures, failures[:3]
        assert httpx.get(s.url + "/health").json()["running"] == 0


def test_auth_and_bad_input(server):
    url = server.url
    h = {"Authorization": f"Bearer {KEY}"}
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.get(url + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(url + "/health").status_code == 200
    good = {"model": server.name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    bad = [
        ("/v1/chat/completions", b"{not json", 400),
        ("/v1/chat/completions", {**good, "max_tokens": -3}, 400),
        ("/v1/chat/completions", {**good, "temperature": "hot"}, 400),
        ("/v1/chat/completions", {**good, "n": 10 ** 9}, 400),
        ("/v1/chat/completions", {**good, "messages": []}, 400),
        ("/v1/chat/completions", {**good, "messages": [{"role": "wizard", "content": "x"}]}, 400),
        ("/v1/chat/completions", {**good, "model": "nope"}, 404),
        ("/v1/chat/completions", {**good, "max_tokens": 10 ** 6}, 400),
        ("/v1/chat/completions", {**good, "ttc": {"n": -1}}, 400),
        ("/v1/chat/completions", {**good, "ttc": {"n": 10 ** 6}}, 400),
        ("/v1/completions", {"model": server.name, "prompt": "", "max_tokens": 4}, 400),
        ("/v1/completions", {"model": server.name, "prompt": [10 ** 9], "max_tokens": 4}, 400),
        ("/v1/completions", {"model": server.name, "prompt": "x" * (2 << 20)}, 413),
    ]
    for path, body, code in bad:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = httpx.post(url + path, content=content, headers={**h, "Content-Type": "application/json"}, timeout=30)
        assert r.status_code == code, (body if isinstance(body, bytes) else str(body)[:200], r.text[:300])
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(url + "/v1/chat/completions", json=good, headers=h, timeout=30)   # no slot got stuck
    assert r.status_code == 200 and httpx.get(url + "/health").json()["running"] == 0


def _wait_idle(s, timeout=10.0):
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        st = httpx.get(s.url + "/health").json()
        if st["running"] == 0 and st["queued"] == 0:
            return True
        time.sleep(0.05)
    return False


def test_queue_full_429_and_disconnect_frees_slot(tight):
    body = {"model": tight.name, "prompt": "1 plus 1 is", "max_tokens": 3000, "temperature": 0, "stream": True}
    with httpx.Client(base_url=tight.url, timeout=30) as c1, httpx.Client(base_url=tight.url, timeout=30) as c2:
        with c1.stream("POST", "/v1/completions", json=body) as r1:
            assert r1.status_code == 200
            lines = r1.iter_lines()   # NOTE: keep the iterator; a collected one closes the response
            next(lines)                                                    # running: holds the only slot
            with c2.stream("POST", "/v1/completions", json=body) as r2:   # queued: the one queue place
                assert r2.status_code == 200
                r3 = httpx.post(tight.url + "/v1/completions", json={**body, "stream": False}, timeout=30)
                assert r3.status_code == 429 and r3.json()["error"]["code"] == "queue_full"
                assert r3.headers.get("retry-after")
        # both clients hung up mid-generation: their sequences are cancelled and the slot is free
    assert _wait_idle(tight)
    # a non-streaming client that gives up is noticed too (polled about once a second)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(tight.url + "/v1/completions", json={**body, "stream": False}, timeout=0.5)
    assert _wait_idle(tight)
    assert "openzaya_cancelled_sequences_total" in httpx.get(tight.url + "/metrics").text
    r = httpx.post(tight.url + "/v1/completions", json={**body, "stream": False, "max_tokens": 5}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5


def test_graceful_shutdown_finishes_in_flight_work(ckpt):
    import threading

    app = load_app(ckpt, ServeConfig(max_slots=2, max_len=512, shutdown_grace_s=10))
    app.state.srv.eos_ids = []
    box = {}
    s = ServerThread(app, grace_s=10).__enter__()
    body = {"model": app.state.srv.model_name, "prompt": "1 plus 1 is", "max_tokens": 200, "temperature": 0}

    def call():
        box["r"] = httpx.post(s.url + "/v1/completions", json=body, timeout=60)

    t = threading.Thread(target=call)
    t.start()
    time.sleep(0.3)
    s.__exit__(None, None, None)   # uvicorn stops accepting, lets the request finish, then the scheduler drains
    t.join(timeout=60)
    assert box["r"].status_code == 200 and box["r"].json()["usage"]["completion_tokens"] == 200
    assert not s.thread.is_alive() and not app.state.srv.sched.thread.is_alive()


def _naive_stream_text(tok, tokens, stops):
    """What a stream may have shown after `tokens`: the full re-decode, cut at a trailing partial character, at
    the first stop string, and before a tail that may still become one (the definition TextStream implements)."""
    from openzaya.tokenizer import held_suffix
    text = tok.decode(tokens)
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    hits = [p for p in (text.find(s) for s in stops) if p >= 0]
    if hits:
        return text[:min(hits)]
    return text[:min(end, len(text) - held_suffix(text, stops))] if stops else text[:end]


@pytest.mark.parametrize("which", ["nano", "gemma"])
def test_text_stream_matches_full_redecode(which, gemma_dir):
    import random

    from openzaya.tokenizer import TextStream, Tokenizer, train_bpe
    text = "Ünïcödé 漢字 and emoji 🙂🚀 mixed with plain words, STOP here; then more text après."
    if which == "gemma":
        tok = Tokenizer.load(gemma_dir[0])
    else:
        tok = train_bpe([text, "hello world"], vocab_size=300)
    ids = tok.encode(text, add_special_tokens=False)
    rng = random.Random(0)
    sequences = [ids] + [[rng.choice(ids) for _ in range(40)] for _ in range(5)]   # shuffles split characters
    for stops in ([], ["STOP"], ["ji 🙂", "zz"]):
        for seq in sequences:
            ts = TextStream(tok, stops, eos=set())
            shown = ""
            for n, t in enumerate(seq, 1):
                now = ts.push(t)
                assert now.startswith(shown)                    # a stream only grows
                shown = now
                ref = _naive_stream_text(tok, seq[:n], stops)
                assert ref.startswith(now)                      # never shows what a full re-decode would not
            assert shown == _naive_stream_text(tok, seq, stops)


def test_ttc_context_check_is_ttc_bound(gemma_dir):
    """The server refuses a TTC request exactly when ttc's longest prompt (`Run.longest_prompt_tokens`, whose
    |template| sums the template's pieces) plus the chat-template allowance plus beta exceeds the context. With
    Gemma's tokenizer the template rendered with empty slots counts fewer tokens (runs of newlines merge), which the
    server's own copy of the bound used: it let through prompts ttc would reject."""
    from fastapi.testclient import TestClient

    from openzaya.backends import Backend, text_engine
    from openzaya.model import ZayaForCausalLM
    from openzaya.serve import CHAT_TEMPLATE_ALLOWANCE, create_app
    from openzaya.tokenizer import Tokenizer
    from openzaya.ttc import Run, TTCConfig, build_aggregation_prompt

    tok = Tokenizer.load(gemma_dir[0])
    engine = text_engine(ZayaForCausalLM(tiny_config(vocab_size=tok.vocab_size)), tok, max_slots=1, max_len=512)
    app = create_app(engine, tok, ServeConfig(max_slots=1, max_len=512, max_queue=1))
    limit, question, c, tau = app.state.srv.limit, "What is 17 + 25?", 2, 8
    counted = Backend()
    counted.tokenizer = tok
    cfg = TTCConfig(method="markovian_rsa", population=4, candidates=c, rounds=1, tail_tokens=tau)
    longest = Run(counted, cfg).longest_prompt_tokens(question)
    count = counted.count_tokens
    empty_slots = count(question) + c * tau + count(build_aggregation_prompt("", [""] * c))
    assert empty_slots < longest                       # the undercount the server's copy had
    beta = limit - CHAT_TEMPLATE_ALLOWANCE - longest   # the largest beta that fits
    body = {"model": app.state.srv.model_name, "prompt": question,   # a base model: no chat template
            "ttc": {"method": "markovian_rsa", "n": 4, "c": c, "t": 1, "tau": tau, "beta": beta}}
    with TestClient(app) as client:
        r = client.post("/v1/completions", json=body)   # fits: on to admission, where 4 > 1 slot + 1 queued
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full", r.text
        r = client.post("/v1/completions", json={**body, "ttc": {**body["ttc"], "beta": beta + 1}})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
