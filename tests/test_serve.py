"""The OpenAI-compatible server (openzaya/serve.py) on loopback, driven by the official `openai` client, our
OpenAIBackend / `openzaya eval`, a 32-client streaming load test and a schemathesis fuzz run; plus the engine's
incremental interface against `generate`.

Run: .venv/bin/python -m pytest tests/test_serve.py
"""

import asyncio
import json
import re
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
        s.name, s.srv = app.state.srv.model_name, app.state.srv
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


def test_a_request_the_engine_cannot_start_fails_alone():
    """Isolation below the schema: sequences whose sampling values would break their batch (a top_k beyond int64, a
    seed torch refuses, a non-finite temperature, a token id outside the vocabulary) or whose start raises anything
    else are refused one by one at submit (400 / 500), while the sequences decoding next to them finish with the
    tokens they have alone."""
    from openzaya.scheduler import Job, Metrics, Scheduler, SchedulerError, collect

    eng = Engine(random_model(tiny_config()), max_slots=4, max_len=64)
    prompts = [[1, 5, 6, 7], [1, 9], [1, 4, 4, 4]]
    params = [GenParams(temperature=t, max_new_tokens=12, eos_ids=[], seed=i) for i, t in enumerate([0, 1.0, 0.7])]
    want = [r.tokens for r in eng.generate(prompts, params)]
    poisons = [GenParams(temperature=1.0, top_k=2**70, eos_ids=[]), GenParams(seed=2**64, eos_ids=[]),
               GenParams(temperature=float("nan"), eos_ids=[]), GenParams(temperature=float("inf"), eos_ids=[]),
               GenParams(top_k=-2**70, eos_ids=[])]
    real_submit = eng.submit

    def submit(prompt, p):   # an unexpected failure while one request's state is prepared
        if prompt == [1, 3, 3]:
            raise RuntimeError("broken request state")
        return real_submit(prompt, p)

    eng.submit = submit
    sched = Scheduler(eng, max_queue=16, metrics=Metrics())
    sched.start()

    async def run():
        deadline = time.monotonic() + 60
        good = [[Job(i, p, q, False, deadline)] for i, (p, q) in enumerate(zip(prompts, params))]
        bad = [[Job(0, [1, 2], q, False, deadline)] for q in poisons]
        bad += [[Job(0, [1, 200], GenParams(eos_ids=[]), False, deadline)],   # vocab is 128
                [Job(0, [1, 3, 3], GenParams(eos_ids=[]), False, deadline)]]
        first = [collect(sched, jobs, sched.submit(jobs), None, deadline) for jobs in good[:1]]
        await asyncio.sleep(0.05)   # one sequence already decoding, then the rest and the poisons together
        rest = [collect(sched, jobs, sched.submit(jobs), None, deadline) for jobs in good[1:] + bad]
        return await asyncio.gather(*first, *rest, return_exceptions=True)

    try:
        out = asyncio.run(run())
    finally:
        sched.shutdown(1.0)
    assert [r[0].tokens for r in out[:3]] == want
    errors = out[3:]
    assert all(isinstance(e, SchedulerError) for e in errors), errors
    assert [e.status for e in errors] == [400] * 6 + [500]
    assert sched.in_system == 0 and eng.num_running == 0


def test_poisoned_http_request_among_in_flight_ones(server):
    """Over HTTP: numeric extremes are refused at the schema (400) while the requests in flight finish with the
    output they give alone."""
    import threading

    body = {"model": server.name, "max_tokens": 24, "temperature": 0}
    want = [client(server).completions.create(**body, prompt=f"{i} plus 2 is").choices[0].text for i in range(3)]
    got = {}

    def one(i):
        got[i] = httpx.post(server.url + "/v1/completions", json={**body, "prompt": f"{i} plus 2 is"},
                            headers={"Authorization": f"Bearer {KEY}"}, timeout=60)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    poisons = [{"top_k": 10**30}, {"top_k": 2**63}, {"seed": 2**64}, {"n": 10**30}, {"max_tokens": 10**30},
               {"logprobs": 2**63}, {"ttc": {"tau": 10**30}}, {"prompt": [1, 10**30]}]
    codes = [httpx.post(server.url + "/v1/completions", json={**body, "prompt": "1 plus 2 is", **p},
                        headers={"Authorization": f"Bearer {KEY}"}, timeout=60).status_code for p in poisons]
    for t in threads:
        t.join()
    assert codes == [400] * len(poisons)
    assert [got[i].status_code for i in range(3)] == [200] * 3
    assert [got[i].json()["choices"][0]["text"] for i in range(3)] == want


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
    usage_chunks = []
    for ch in c.chat.completions.create(model=server.name, messages=msgs, max_completion_tokens=16, temperature=0,
                                        stream=True, stream_options={"include_usage": True}):
        if ch.usage is not None and not ch.choices:
            usage_chunks.append(ch.usage)
        for choice in ch.choices:
            parts["r"] += (choice.delta.model_extra or {}).get("reasoning_content") or ""
            parts["c"] += choice.delta.content or ""
    assert parts["r"].strip() == reasoning and parts["c"].strip() == m.content
    assert len(usage_chunks) == 1, usage_chunks    # include_usage: exactly one usage chunk, with empty choices
    assert usage_chunks[0].completion_tokens == r.usage.completion_tokens


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


def _numeric_fields(spec: dict, schema: dict, path: tuple = ()):
    """(path, schema) of every integer / number in a request schema of the OpenAPI spec, following $ref, anyOf and
    arrays (an array's element is index 0 of the path)."""
    if "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].split("/")[-1]]
    for alt in schema.get("anyOf", []):
        yield from _numeric_fields(spec, alt, path)
    if schema.get("type") in ("integer", "number"):
        yield path, schema
    elif schema.get("type") == "array":
        yield from _numeric_fields(spec, schema["items"], path + (0,))
    for key, sub in schema.get("properties", {}).items():
        yield from _numeric_fields(spec, sub, path + (key,))


RAW = {"NaN": "NaN", "Infinity": "Infinity", "-Infinity": "-Infinity"}   # JSON literals Python's parser accepts
ALWAYS = [2**63, -10**30, "NaN", "Infinity"]                               # beyond int64, non-finite
EXTREMES = [0, -1, 2**31, 2**64, 10**30, 1e308, -1e308, 5e-324, -0.0, 0.5, "-Infinity", "7", True, None, [], {}]


def _extreme_bodies(spec: dict, route: str, base: dict, rng) -> list[tuple[str, bytes]]:
    """For every numeric field of the route's body (nested ones too): just outside its range on both sides, a value
    beyond int64 each way, NaN and Infinity, and two random others (wrong types among them), as raw JSON."""
    schema = spec["paths"][route]["post"]["requestBody"]["content"]["application/json"]["schema"]
    out = []
    for path, field in dict(_numeric_fields(spec, schema)).items():
        lo = field.get("minimum", field.get("exclusiveMinimum"))
        hi = field.get("maximum")
        edges = ([] if lo is None else [int(lo) - 1 if "minimum" in field else lo]) + ([] if hi is None else
                                                                                        [int(hi) + 1])
        for v in edges + ALWAYS + rng.sample(EXTREMES, 2):
            body = json.loads(json.dumps(base))
            if path[0] == "ttc":   # without max_tokens, which a ttc run refuses (its budget is beta)
                body["ttc"] = {"method": "markovian_rsa", "n": 2, "c": 1, "t": 1, "tau": 2, "beta": 4}
                body.pop("max_tokens")
            value = RAW.get(v, v) if isinstance(v, str) else v
            for key in reversed(path[1:]):   # the value nested along the path (index 0 = a one-element list)
                value = [value] if key == 0 else {key: value}
            target = body["ttc"] if path[0] == "ttc" else body
            if path[0] == "ttc":
                target.update(value)
            else:
                body[path[0]] = value
            text = json.dumps(body)
            for literal in RAW:   # the non-finite literals go in unquoted
                text = text.replace(f'"{literal}"', literal)
            out.append((route, text.encode()))
    return out


def test_fuzz_no_5xx_and_greedy_output_unchanged(ckpt):
    """schemathesis over the OpenAPI spec, then numeric extremes in every numeric field of both bodies (beyond
    int64, non-finite, wrong types, just outside each range): no 5xx, every error in the OpenAI shape, and a greedy
    request answers the same text after the barrage as before it."""
    import random

    import schemathesis
    from hypothesis import HealthCheck, given, settings

    app = load_app(ckpt, ServeConfig(max_slots=4, max_len=48, max_queue=4, max_n=4, api_key=KEY,
                                     request_timeout_s=20))
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    with ServerThread(app) as s:
        name = app.state.srv.model_name
        greedy = [("/v1/completions", {"model": name, "prompt": "1 plus 2 is", "max_tokens": 8, "temperature": 0}),
                  ("/v1/chat/completions", {"model": name, "messages": [{"role": "user", "content": "1 plus 2?"}],
                                            "max_tokens": 8, "temperature": 0})]
        before = [httpx.post(s.url + path, json=body, headers=h, timeout=30).json()["choices"] for path, body in greedy]
        schema = schemathesis.openapi.from_url(s.url + "/openapi.json")
        failures, error_shapes_checked = [], [0]
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
                    error_shapes_checked[0] += 1

            check()
        assert not failures, failures[:3]
        assert error_shapes_checked[0] >= 10, error_shapes_checked   # the 4xx shape check above did run
        spec, rng = httpx.get(s.url + "/openapi.json").json(), random.Random(0)
        bodies = [b for path, base in greedy for b in _extreme_bodies(spec, path, {**base, "max_tokens": 2}, rng)]
        with httpx.Client(base_url=s.url, headers=h, timeout=30) as c:
            for path, content in bodies:
                resp = c.post(path, content=content)
                if resp.status_code >= 500 or (resp.status_code >= 400 and
                                               set(resp.json()["error"]) != {"message", "type", "param", "code"}):
                    failures.append((path, content[:300], resp.status_code, resp.text[:300]))
        assert len(bodies) > 200 and not failures, (len(bodies), failures[:3])
        after = [httpx.post(s.url + path, json=body, headers=h, timeout=30).json()["choices"] for path, body in greedy]
        assert after == before
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


def test_unencodable_text_is_400_on_every_route(server):
    """A lone surrogate (JSON can carry one as an escape) in any text field of any route is a 400, never a 500 from
    the tokenizer or the JSON writer."""
    sur = "a\ud800b"
    base = {"model": server.name, "prompt": "1 plus 2 is", "max_tokens": 4}
    chat = {"model": server.name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    ttc = {"n": 2, "c": 1, "t": 1, "tau": 4, "beta": 8}
    cases = [("/v1/completions", {**base, "prompt": sur}), ("/v1/completions", {**base, "prompt": ["x", sur]}),
             ("/v1/completions", {**base, "stop": [sur]}), ("/v1/completions", {**base, "model": sur}),
             ("/v1/completions", {**base, "prompt": sur, "ttc": ttc}),
             ("/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": sur}]}),
             ("/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": [{"type": "text",
                                                                                           "text": sur}]}]}),
             ("/v1/chat/completions", {**chat, "messages": [{"role": "assistant", "content": "x",
                                                             "reasoning_content": sur}, chat["messages"][0]]}),
             ("/v1/chat/completions", {**chat, "stop": sur}), ("/v1/chat/completions", {**chat, "model": sur}),
             ("/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": sur}], "ttc": ttc}),
             ("/update_weights_from_disk", {"model_path": sur})]
    for path, body in cases:
        r = httpx.post(server.url + path, content=json.dumps(body).encode(), timeout=30,
                       headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        assert r.status_code == 400 and "valid Unicode" in r.json()["error"]["message"], (path, body, r.text[:300])
    assert httpx.get(server.url + "/health").json()["running"] == 0


def _metric(url, endpoint, code) -> int:
    line = f'openzaya_requests_total{{code="{code}",endpoint="{endpoint}"}} '   # prometheus_client sorts labels
    text = httpx.get(url + "/metrics").text
    return next((int(float(x[len(line):])) for x in text.splitlines() if x.startswith(line)), 0)


def test_chunked_oversized_body_413_and_metrics_count_the_status_sent(server):
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}

    def chunks():   # no Content-Length: the cap is enforced on the bytes as they come
        yield b'{"model": "m", "prompt": "'
        for _ in range(40):
            yield b"a" * 65536
        yield b'"}'

    before = _metric(server.url, "/v1/completions", 413)
    r = httpx.post(server.url + "/v1/completions", content=chunks(), headers=h, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    assert _metric(server.url, "/v1/completions", 413) == before + 1
    # an unexpected error: a 500 in the OpenAI shape, counted as 500 (it was counted as 499, "client closed")
    srv = server.srv
    counts = [_metric(server.url, "/v1/completions", c) for c in (500, 499)]

    def boom(body):
        raise RuntimeError("boom")

    srv.completion_prompts, real = boom, srv.completion_prompts
    try:
        r = httpx.post(server.url + "/v1/completions", json={"model": server.name, "prompt": "x"}, headers=h)
    finally:
        srv.completion_prompts = real
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert [_metric(server.url, "/v1/completions", c) for c in (500, 499)] == [counts[0] + 1, counts[1]]


def test_slow_clients_are_cut_after_the_read_timeout(server):
    """Connections that send nothing, trickle a request head, trickle a body, or trickle the next request after a
    normal one (keep-alive) are all closed once the read timeout has passed, with a 408 where a request was begun;
    meanwhile normal requests are served. (uvicorn alone held every one of them open for as long as bytes came.)"""
    import socket

    cfg = server.srv.cfg
    cfg.read_timeout_s, timeout = 0.5, cfg.read_timeout_s
    host, port = server.url[7:].split(":")
    auth = f"Authorization: Bearer {KEY}\r\n".encode()
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: 100\r\n\r\n"
    body = json.dumps({"model": server.name, "prompt": "1 plus 1 is", "max_tokens": 2}).encode()
    whole = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + auth
             + b"Content-Length: %d\r\n\r\n" % len(body) + body)
    kinds = ["idle", "head", "body", "keepalive"] * 4
    socks = [socket.create_connection((host, int(port))) for _ in kinds]
    got, closed = [b""] * len(kinds), set()
    t0 = time.monotonic()
    try:
        for kind, sk in zip(kinds, socks):
            sk.settimeout(0.001)
            sk.sendall({"body": head, "keepalive": whole}.get(kind, b""))
        step = 0
        while time.monotonic() < t0 + 5 and len(closed) < len(kinds):
            for k, (kind, sk) in enumerate(zip(kinds, socks)):
                if k in closed:
                    continue
                try:
                    sk.sendall(head[step:step + 1] if kind in ("head", "keepalive") else b"{" if kind == "body"
                               else b"")
                    data = sk.recv(65536)
                    got[k] += data
                    if not data:
                        closed.add(k)
                except socket.timeout:
                    pass
                except OSError:
                    closed.add(k)
            step += 1
            time.sleep(0.05)
        r = httpx.post(server.url + "/v1/completions", content=body, timeout=30,
                       headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    finally:
        cfg.read_timeout_s = timeout
        for sk in socks:
            sk.close()
    assert r.status_code == 200
    assert len(closed) == len(kinds), f"{len(kinds) - len(closed)} of {len(kinds)} slow connections still open"
    assert time.monotonic() - t0 < 5
    for kind, data in zip(kinds, got):
        statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", data)
        assert statuses == {"idle": [], "head": [b"408"], "body": [b"408"], "keepalive": [b"200", b"408"]}[kind], \
            (kind, data[:300])


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
