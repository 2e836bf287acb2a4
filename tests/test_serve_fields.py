"""`openzaya serve` as vLLM / SGLang users expect it: vLLM's flag names, /version, /v1/models/{id}, /tokenize and
/detokenize in vLLM's shapes, top-k logprobs, echo with prompt logprobs, the sampler's penalties and logit_bias over
HTTP, a 400 naming every refused field, and /metrics through prometheus_client.

Run: .venv/bin/python -m pytest tests/test_serve_fields.py
"""

import asyncio

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from openzaya.serve import ServeConfig, load_app, resolve_serving
from server_thread import ServerThread
from test_local_backend import make_checkpoint

KEY = "sk-test"
H = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    app = load_app(make_checkpoint(tmp_path_factory.mktemp("fields") / "m"),
                   ServeConfig(max_slots=4, max_len=256, api_key=KEY, request_timeout_s=60))
    with ServerThread(app) as s:
        s.name, s.srv = app.state.srv.model_name, app.state.srv
        yield s


def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@torch.no_grad()
def raw_logprobs(server, ids):
    """log_softmax of the served model's logits over ids, by a plain forward pass (no engine, no cache)."""
    return torch.log_softmax(server.srv.engine.model(torch.tensor([ids]))[0].float(), -1)


def test_cli_names_version_and_model_routes(server, tmp_path, capsys):
    from openzaya import package_version
    from openzaya.cli import build_parser, main

    a = build_parser().parse_args(["serve", "--model", "m", "--max-num-seqs", "4", "--max-model-len", "128",
                                   "--dtype", "bfloat16", "--served-model-name", "zaya", "--chat-template", "t.jinja"])
    assert (a.max_slots, a.max_len, a.dtype, a.served_model_name, a.chat_template, a.device) == \
        (4, 128, "bfloat16", "zaya", "t.jinja", "auto")
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert resolve_serving("auto", "float32", str(template)) == ("cpu", torch.float32, template.read_text())
    assert resolve_serving("cpu", "auto", "{{ x }}") == ("cpu", None, "{{ x }}")
    for bad in [("cuda", "auto", None), ("cpu", "auto", str(tmp_path / "missing.jinja")), ("cpu", "fp8", None)]:
        with pytest.raises(ValueError, match="--device|--chat-template|--dtype"):
            resolve_serving(*bad)
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"openzaya {package_version()}"
    assert httpx.get(server.url + "/version").json() == {"version": package_version()}
    card = client(server).models.retrieve(server.name)
    assert (card.id, card.object, card.model_extra["max_model_len"]) == (server.name, "model", 256)
    r = httpx.get(server.url + "/v1/models/nope", headers=H)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert httpx.get(server.url + "/v1/models/" + server.name).status_code == 401   # /v1 is behind the key


def test_tokenize_detokenize_in_vllms_shapes(server):
    tok = server.srv.tokenizer
    r = httpx.post(server.url + "/tokenize", json={"model": server.name, "prompt": "1 plus 2 is"}).json()
    ids = tok.encode("1 plus 2 is")
    assert r == {"count": len(ids), "max_model_len": 256, "tokens": ids, "token_strs": None}
    r = httpx.post(server.url + "/tokenize", json={"prompt": "1 plus 2 is", "add_special_tokens": False,
                                                   "return_token_strs": True}).json()
    assert r["tokens"] == tok.encode("1 plus 2 is", add_special_tokens=False)
    assert r["token_strs"] == [tok.id_to_token(t) for t in r["tokens"]]
    msgs = [{"role": "user", "content": "3 plus 4?"}]
    r = httpx.post(server.url + "/tokenize", json={"messages": msgs}).json()
    assert r["tokens"] == tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    r2 = httpx.post(server.url + "/tokenize", json={"messages": msgs, "add_generation_prompt": False}).json()
    assert r2["tokens"] == tok.apply_chat_template(msgs, add_generation_prompt=False, tokenize=True) != r["tokens"]
    assert httpx.post(server.url + "/detokenize", json={"tokens": ids}).json() == {"prompt": tok.decode(ids)}
    info = httpx.get(server.url + "/tokenizer_info").json()
    assert (info["eos_token"], info["chat_template"]) == (tok.eos_token, tok.chat_template)
    for path, body, param in [("/tokenize", {}, "prompt"), ("/tokenize", {"prompt": "x", "messages": msgs}, "prompt"),
                              ("/tokenize", {"messages": msgs, "tools": [{"type": "function"}]}, "tools"),
                              ("/tokenize", {"prompt": "x", "model": "nope"}, "model"),
                              ("/detokenize", {"tokens": [10 ** 6]}, "tokens")]:
        r = httpx.post(server.url + path, json=body)
        assert r.status_code in (400, 404) and r.json()["error"]["param"] == param, (body, r.text)


def test_top_logprobs_are_the_k_most_likely_raw_tokens(server):
    c, tok = client(server), server.srv.tokenizer
    msgs = [{"role": "user", "content": "5 plus 6?"}]
    r = c.chat.completions.create(model=server.name, messages=msgs, max_tokens=6, temperature=0, logprobs=True,
                                  top_logprobs=3, extra_body={"return_token_ids": True})
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    out = r.choices[0].model_extra["token_ids"]
    full = raw_logprobs(server, ids + out)
    entries = r.choices[0].logprobs.content
    assert len(entries) == len(out)
    for i, (e, t) in enumerate(zip(entries, out)):
        vals, alts = full[len(ids) - 1 + i].topk(3)
        assert [a.token for a in e.top_logprobs] == [tok.decode([x]) for x in alts.tolist()]
        assert [a.logprob for a in e.top_logprobs] == pytest.approx(vals.tolist(), abs=1e-4)
        assert e.logprob == pytest.approx(full[len(ids) - 1 + i, t].item(), abs=1e-4)
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob, abs=1e-5)     # greedy: the top-1
    # streamed: the same alternatives, chunk by chunk
    streamed = [e for ch in c.chat.completions.create(model=server.name, messages=msgs, max_tokens=6, temperature=0,
                                                      logprobs=True, top_logprobs=3, stream=True)
                for choice in ch.choices if choice.logprobs for e in choice.logprobs.content]
    assert [[a.token for a in e.top_logprobs] for e in streamed] == [[a.token for a in e.top_logprobs]
                                                                     for e in entries]
    # completions: {token: logprob} with the k alternatives and the token itself
    r = c.completions.create(model=server.name, prompt="1 plus 2 is", max_tokens=5, temperature=1.0, seed=3,
                             logprobs=2)
    lp = r.choices[0].logprobs
    for s, v, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert top[s] == v and 2 <= len(top) <= 3 and max(top.values()) >= v
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        c.chat.completions.create(model=server.name, messages=msgs, max_tokens=2, top_logprobs=2)


def test_echo_returns_the_prompt_logprobs(server):
    """echo + logprobs + max_tokens 0 scores a prompt: its text back, null for the first token, then log p of every
    token given the ones before, as a plain forward pass of the model computes it; lm-eval's request (token ids,
    max_tokens 1) gets the prompt's entries plus one generated token."""
    c, tok = client(server), server.srv.tokenizer
    text = "3 plus 4 is 7."
    ids = tok.encode(text)
    full = raw_logprobs(server, ids)
    want = [full[t - 1, ids[t]].item() for t in range(1, len(ids))]
    r = c.completions.create(model=server.name, prompt=text, max_tokens=0, echo=True, logprobs=1)
    ch = r.choices[0]
    assert ch.text == text and r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids)
    assert ch.logprobs.tokens == [tok.decode([t]) for t in ids]
    assert ch.logprobs.token_logprobs[0] is None and ch.logprobs.top_logprobs[0] is None
    assert ch.logprobs.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    for t in range(1, len(ids)):
        top = ch.logprobs.top_logprobs[t]
        assert top[tok.decode([ids[t]])] == ch.logprobs.token_logprobs[t]
        assert max(top.values()) == pytest.approx(full[t - 1].max().item(), abs=1e-4)
    r = c.completions.create(model=server.name, prompt=[ids, ids[:4]], max_tokens=1, echo=True, logprobs=1,
                             temperature=0)
    assert [len(x.logprobs.token_logprobs) for x in r.choices] == [len(ids) + 1, 5]
    assert r.choices[0].logprobs.token_logprobs[1:len(ids)] == pytest.approx(want, abs=1e-4)
    assert r.choices[1].text.startswith(tok.decode(ids[:4]))
    r = c.completions.create(model=server.name, prompt=text, max_tokens=3, echo=True, temperature=0)   # no logprobs
    assert r.choices[0].text.startswith(text) and r.choices[0].logprobs is None
    for kw in [dict(max_tokens=0), dict(echo=True, stream=True)]:   # 0 tokens needs echo; echo does not stream
        with pytest.raises(openai.BadRequestError):
            c.completions.create(model=server.name, prompt=text, **kw)


def test_penalties_and_logit_bias_over_http(server):
    """The knobs reach the engine: a greedy request equals Engine.generate with the same GenParams; a large
    logit_bias forces its token; a large presence penalty never repeats one."""
    from openzaya.engine import GenParams

    c, srv = client(server), server.srv
    prompt = "1 plus 2 is"
    body = dict(model=server.name, prompt=prompt, max_tokens=12, temperature=0,
                extra_body={"return_token_ids": True, "repetition_penalty": 1.5, "ignore_eos": True})
    r = c.completions.create(**body, frequency_penalty=0.7, presence_penalty=0.4, logit_bias={"17": 3.0})
    gp = GenParams(temperature=0, max_new_tokens=12, eos_ids=[], repetition_penalty=1.5, frequency_penalty=0.7,
                   presence_penalty=0.4, logit_bias={17: 3.0})
    got = r.choices[0].model_extra["token_ids"]
    # on the scheduler thread, between two engine steps (generate needs the engine alone)
    want = asyncio.run(srv.sched.call(lambda: srv.engine.generate([srv.tokenizer.encode(prompt)], gp)))[0].tokens
    plain = c.completions.create(**{**body, "extra_body": {"return_token_ids": True, "ignore_eos": True}})
    assert got == want and got != plain.choices[0].model_extra["token_ids"]
    r = c.completions.create(**{**body, "extra_body": {"return_token_ids": True, "ignore_eos": True}},
                             logit_bias={"42": 100})
    assert r.choices[0].model_extra["token_ids"] == [42] * 12
    r = c.completions.create(**{**body, "extra_body": {"return_token_ids": True, "ignore_eos": True}},
                             presence_penalty=2.0, logit_bias={str(t): -100 for t in range(40, 300)})
    ids = r.choices[0].model_extra["token_ids"]
    assert len(set(ids)) == len(ids) == 12     # 2.0 below every other logit of this model: no repeats
    r = c.completions.create(**{**body, "extra_body": {"return_token_ids": True, "stop_token_ids": [42]}},
                             logit_bias={"42": 100})
    assert r.choices[0].model_extra["token_ids"] == [42] and r.choices[0].finish_reason == "stop"


REFUSED = [
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice"),
    ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", {"echo": True}, "echo"),
    ("/v1/chat/completions", {"ttc": {"n": 2, "c": 1, "t": 1, "tau": 4, "beta": 8}, "logit_bias": {"1": 1},
                              "max_tokens": None}, "logit_bias"),
    ("/v1/chat/completions", {"ttc": {"n": 2, "c": 1, "t": 1, "tau": 4, "beta": 8}, "max_tokens": 4}, "max_tokens"),
    ("/v1/completions", {"suffix": "end"}, "suffix"),
    ("/v1/completions", {"best_of": 3}, "best_of"),
    ("/v1/completions", {"min_tokens": 2}, "min_tokens"),
    ("/v1/completions", {"guided_json": {"type": "object"}}, "guided_json"),
    ("/v1/completions", {"prompt_logprobs": 1}, "prompt_logprobs"),
    ("/v1/completions", {"logit_bias": {"x": 1}}, "logit_bias"),
    ("/v1/completions", {"logit_bias": {"1": 101}}, "logit_bias.1"),
    ("/v1/completions", {"presence_penalty": 2.5}, "presence_penalty"),
]


def test_unimplemented_fields_are_a_400_naming_them(server):
    base = {"/v1/chat/completions": {"model": server.name, "messages": [{"role": "user", "content": "hi"}],
                                     "max_tokens": 2},
            "/v1/completions": {"model": server.name, "prompt": "hi", "max_tokens": 2}}
    for path, extra, param in REFUSED:
        r = httpx.post(server.url + path, json={**base[path], **extra}, headers=H, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (extra, r.text)
    # neutral values and harmless fields pass
    for path, extra in [("/v1/chat/completions", {"tools": [], "tool_choice": "none", "user": "u", "metadata": {},
                                                  "response_format": {"type": "text"}, "parallel_tool_calls": True}),
                        ("/v1/completions", {"best_of": 1, "suffix": None, "store": False, "echo": False})]:
        r = httpx.post(server.url + path, json={**base[path], **extra}, headers=H, timeout=30)
        assert r.status_code == 200, (extra, r.text)


def test_metrics_through_prometheus_client(server):
    client(server).completions.create(model=server.name, prompt="1 plus 2 is", max_tokens=3)
    text = httpx.get(server.url + "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, kind in [("openzaya_requests", "counter"), ("openzaya_prompt_tokens", "counter"),
                       ("openzaya_completion_tokens", "counter"), ("openzaya_engine_steps", "counter"),
                       ("openzaya_cancelled_sequences", "counter"), ("openzaya_queue_depth", "gauge"),
                       ("openzaya_running_sequences", "gauge"), ("openzaya_slots", "gauge"),
                       ("openzaya_request_latency_seconds", "histogram"),
                       ("openzaya_time_to_first_token_seconds", "histogram"), ("process_cpu_seconds", "counter"),
                       ("process_resident_memory_bytes", "gauge")]:
        assert families[name].type == kind and families[name].documentation, name
    assert "# HELP openzaya_requests_total " in text and "# TYPE openzaya_requests_total counter" in text
    ok = [s for s in families["openzaya_requests"].samples if s.name == "openzaya_requests_total"
          and s.labels == {"endpoint": "/v1/completions", "code": "200"}]
    assert ok and ok[0].value >= 1
    assert [s.value for s in families["openzaya_slots"].samples] == [4]
