"""Test-time compute (openzaya/ttc.py) with real models: a tiny local checkpoint through LocalBackend, Gemma 3 270M
through HFBackend, and the OpenAI backend against the stub server on loopback.

Run: .venv/bin/python -m pytest tests/test_ttc.py
"""

import json

import pytest
import torch

from openzaya.backends import Backend, LocalBackend, OpenAIBackend
from openzaya.ttc import (AGGREGATION_TEMPLATE_V1, ProblemResult, Run, TTCConfig, TTCProblem,
                          build_aggregation_prompt, load_template, majority_answer, solve, template_pieces,
                          winner_index)
from openai_stub_server import StubServer
from test_local_backend import make_checkpoint

SMALL = dict(population=4, candidates=2, rounds=2, tail_tokens=8, budget_tokens=16)


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    return LocalBackend(make_checkpoint(tmp_path_factory.mktemp("ttc") / "m"), max_slots=16, max_len=1024)


PROBLEMS = [TTCProblem("p0", "1 plus 2 is"), TTCProblem("p1", "3 plus 4 is")]


def read_calls(path):
    return [r for r in map(json.loads, open(path)) if r["type"] == "call"]


def expected_tail(tok, reasoning, tau):
    ids = tok.encode(reasoning, add_special_tokens=False)
    tail = reasoning if len(ids) <= tau else tok.decode(ids[-tau:])
    while not reasoning.endswith(tail):   # a cut inside a multi-byte character: its U+FFFD is dropped
        tail = tail[1:]
    while len(tok.encode(tail, add_special_tokens=False)) > tau:   # ... and so is a re-encoding that grew
        tail = tail[1:]
    return tail


def source_of_tail(call) -> str:
    """A rollout's reasoning, or its whole text when it has none (thinking off, a model that never thinks)."""
    return call["reasoning"] if call["reasoning"].strip() else call["text"]


def check_aggregation(calls, cfg, tok, question_of):
    """Every aggregation prompt = the template over exactly C tails from the previous round, each exactly the last
    tau tokens of that rollout's reasoning (or whole text, without reasoning; re-tokenized here), none empty where
    the rollout's text is not, within the bound."""
    by_key = {c["key"]: c for c in calls}
    n_agg = 0
    for c in calls:
        if c["round"] == 0:
            assert "candidate_ids" not in c
            continue
        n_agg += 1
        ids = c["candidate_ids"]
        assert len(ids) == cfg.candidates == len(set(ids))
        assert all(by_key[i]["round"] == c["round"] - 1 and by_key[i]["problem"] == c["problem"] for i in ids)
        tails = [expected_tail(tok, source_of_tail(by_key[i]), cfg.tail_tokens) for i in ids]
        assert all(t.strip() for t, i in zip(tails, ids) if by_key[i]["text"].strip())
        content = c["prompt"] if isinstance(c["prompt"], str) else c["prompt"][0]["content"]
        assert content == build_aggregation_prompt(question_of[c["problem"]], tails)
        assert content.count("---- Candidate ") == cfg.candidates
        assert c["bound_ok"] and c["prompt_content_tokens"] <= c["bound_tokens"]
        assert len(tok.encode(content, add_special_tokens=False)) == c["prompt_content_tokens"]
        q = len(tok.encode(question_of[c["problem"]], add_special_tokens=False))
        template = sum(len(tok.encode(x, add_special_tokens=False)) for x in template_pieces(cfg.candidates))
        assert c["bound_tokens"] == q + cfg.candidates * cfg.tail_tokens + template
    return n_agg


def test_markovian_rsa_local_calls_tails_bound(local, tmp_path):
    cfg = TTCConfig(**SMALL)
    results, totals = solve(PROBLEMS, local, cfg, trace_path=tmp_path / "t.jsonl")
    calls = read_calls(tmp_path / "t.jsonl")
    assert len(calls) == totals["calls"] == len(PROBLEMS) * cfg.population * (cfg.rounds + 1)
    assert len({c["key"] for c in calls}) == len(calls)
    n_agg = check_aggregation(calls, cfg, local.tokenizer, {p.id: p.question for p in PROBLEMS})
    assert n_agg == len(PROBLEMS) * cfg.population * cfg.rounds
    for r in results:
        assert [x.calls for x in r.rounds] == [cfg.population] * (cfg.rounds + 1)
        assert len(r.final_texts) == cfg.population
        assert r.prompt_tokens == sum(c["prompt_tokens"] for c in calls if c["problem"] == r.id)
        assert r.completion_tokens == sum(c["completion_tokens"] for c in calls if c["problem"] == r.id)
        assert all(x.max_prompt_tokens > 0 and x.wall_s > 0 for x in r.rounds)
    assert totals["tail_approximation"] is None
    recs = [json.loads(line) for line in open(tmp_path / "t.jsonl")]
    assert recs[0]["type"] == "run" and recs[-1]["type"] == "totals"


def test_seeds_reproduce_subsets(local, tmp_path):
    cfg = TTCConfig(**SMALL)
    a, b = Run(local, cfg), Run(local, TTCConfig(**SMALL, seed=1))
    assert a.subsets("p0", 1, 4) == Run(local, cfg).subsets("p0", 1, 4)
    assert a.subsets("p0", 1, 4) != b.subsets("p0", 1, 4) or a.subsets("p0", 2, 4) != b.subsets("p0", 2, 4)
    solve(PROBLEMS, local, cfg, trace_path=tmp_path / "a.jsonl")
    solve(PROBLEMS, local, cfg, trace_path=tmp_path / "b.jsonl")
    ca, cb = read_calls(tmp_path / "a.jsonl"), read_calls(tmp_path / "b.jsonl")
    assert [(c["key"], c.get("candidate_ids"), c["text"]) for c in ca] == \
           [(c["key"], c.get("candidate_ids"), c["text"]) for c in cb]


class Flaky(Backend):
    """Wraps a backend; raises once more than `fail_after` requests were asked for; counts every request key."""

    def __init__(self, inner, fail_after=None):
        self.inner, self.tokenizer, self.fail_after, self.keys = inner, inner.tokenizer, fail_after, []

    def generate(self, requests):
        if self.fail_after is not None and len(self.keys) + len(requests) > self.fail_after:
            raise RuntimeError("forced interruption")
        self.keys += [r.id for r in requests]
        return self.inner.generate(requests)


def test_resume_after_interruption_repeats_no_call(local, tmp_path):
    cfg = TTCConfig(**SMALL)
    total = len(PROBLEMS) * cfg.population * (cfg.rounds + 1)
    ref, _ = solve(PROBLEMS, local, cfg, trace_path=tmp_path / "ref.jsonl")
    flaky = Flaky(local, fail_after=12)   # round 0 of both problems (8 calls) passes, round 1 (8 calls) fails
    with pytest.raises(RuntimeError, match="forced interruption"):
        solve(PROBLEMS, flaky, cfg, trace_path=tmp_path / "t.jsonl")
    first = {c["key"] for c in read_calls(tmp_path / "t.jsonl")}
    assert first == set(flaky.keys) and len(first) == 8
    again = Flaky(local)
    results, totals = solve(PROBLEMS, again, cfg, trace_path=tmp_path / "t.jsonl")
    assert not first & set(again.keys)                     # no finished call repeated
    assert len(again.keys) == total - len(first) and totals["resumed_calls"] == len(first)
    calls = read_calls(tmp_path / "t.jsonl")
    assert len(calls) == total == len({c["key"] for c in calls})
    assert [r.final_texts for r in results] == [r.final_texts for r in ref]   # nothing lost, same outcome


def test_other_methods_local(local, tmp_path):
    for method, calls in [("single", 1), ("majority", 4), ("rsa", 12), ("pacore_hybrid", 12)]:
        cfg = TTCConfig(**SMALL, method=method)
        (res,), totals = solve([PROBLEMS[0]], local, cfg, trace_path=tmp_path / f"{method}.jsonl")
        assert totals["calls"] == calls, method
    rsa_calls = read_calls(tmp_path / "rsa.jsonl")
    by_key = {c["key"]: c for c in rsa_calls}
    for c in rsa_calls:
        if c["round"] > 0:   # full-chain RSA carries whole texts
            assert all(by_key[i]["text"] in c["prompt"][0]["content"] for i in c["candidate_ids"])
    cfg = TTCConfig(**SMALL, method="delethink", head_tokens=4)
    (res,), totals = solve([PROBLEMS[0]], local, cfg, trace_path=tmp_path / "d.jsonl")
    dcalls = read_calls(tmp_path / "d.jsonl")
    assert 4 <= totals["calls"] <= 12 and all(c["bound_ok"] for c in dcalls if c["round"] > 0)
    for c in dcalls:
        if c["round"] > 0:
            prev = {x["key"]: x for x in dcalls}[c["candidate_ids"][0]]
            assert c["prompt"].endswith(expected_tail(local.tokenizer, prev["text"], cfg.tail_tokens))


def test_longest_prompt_is_the_bound_of_every_checked_call(local, tmp_path):
    """Run.longest_prompt_tokens (what `openzaya serve` checks against its context before a run) is the bound the
    trace records for every aggregation / continuation call, and every such call's prompt text is within it."""
    q = PROBLEMS[0].question
    for method, extra in [("markovian_rsa", {}), ("pacore_hybrid", {}), ("delethink", {"head_tokens": 4})]:
        cfg = TTCConfig(**SMALL, method=method, **extra)
        solve([PROBLEMS[0]], local, cfg, trace_path=tmp_path / f"{method}.jsonl")
        longest = Run(local, cfg).longest_prompt_tokens(q)
        later = [c for c in read_calls(tmp_path / f"{method}.jsonl") if c["round"] > 0]
        assert later and all(c["bound_tokens"] == longest >= c["prompt_content_tokens"] for c in later), method
    count = local.count_tokens
    template = sum(count(x) for x in template_pieces(SMALL["candidates"]))
    assert Run(local, TTCConfig(**SMALL, method="single")).longest_prompt_tokens(q) == count(q)
    assert Run(local, TTCConfig(**SMALL, method="majority")).longest_prompt_tokens(q) == count(q)
    assert Run(local, TTCConfig(**SMALL, method="rsa")).longest_prompt_tokens(q) == \
        count(q) + SMALL["candidates"] * SMALL["budget_tokens"] + template   # whole candidates, up to beta each


def test_winner_is_the_first_candidate_with_the_majority_answer():
    answers = [None, "7", " 8 ", "8.", "7", "8"]
    majority, votes = majority_answer(answers)
    assert majority == "8" and votes == {"7": 2, "8": 3}
    assert winner_index(answers, majority) == 2
    res = ProblemResult(id="p", answer=majority, votes=votes, final_answers=answers,
                        final_texts=[f"t{i}" for i in range(6)], rewards=None, majority_correct=None,
                        population_mean=None)
    assert res.winner_index == 2
    assert winner_index([None, None], None) is None and winner_index(["3"], "4") is None


def test_bad_inputs_rejected_before_any_call(local):
    never = Flaky(local, fail_after=0)
    for kwargs, msg in [(dict(candidates=5), "exceeds --population"), (dict(tail_tokens=32), "exceeds --budget"),
                        (dict(budget_tokens=0), "must be positive"), (dict(population=-1), "must be positive"),
                        (dict(tail_tokens=0), "must be positive"), (dict(method="nope"), "unknown method")]:
        with pytest.raises(ValueError, match=msg):
            solve(PROBLEMS, never, TTCConfig(**{**SMALL, **kwargs}))
    with pytest.raises(ValueError, match="empty question"):
        solve([TTCProblem("x", "  ")], never, TTCConfig(**SMALL))
    assert never.keys == []


def test_template_file(tmp_path):
    (tmp_path / "t.txt").write_text("Q: {question}\n{candidates}Answer in \\boxed{}.")
    t = load_template(tmp_path / "t.txt")
    out = build_aggregation_prompt("what {is} 2?", ["a {candidates}", "b"], template=t)
    assert out.startswith("Q: what {is} 2?\n---- Candidate 1 ----\na {candidates}\n\n") and out.endswith("\\boxed{}.")
    assert build_aggregation_prompt("q", ["x"]).startswith("q\n\n") and AGGREGATION_TEMPLATE_V1.startswith("{question}")
    (tmp_path / "bad.txt").write_text("no slots")
    with pytest.raises(ValueError, match="placeholder"):
        load_template(tmp_path / "bad.txt")


def test_openai_backend_markovian_rsa_end_to_end(tmp_path):
    cfg = TTCConfig(population=4, candidates=2, rounds=1, tail_tokens=8, budget_tokens=16)
    with StubServer(n_words=30) as server:
        backend = OpenAIBackend(server.url, "stub", max_concurrency=4)
        (res,), totals = solve([TTCProblem("q", "what is 2+2?")], backend, cfg, trace_path=tmp_path / "t.jsonl")
        assert len(server.requests) == totals["calls"] == 8
        agg = [r for r in server.requests if "Candidate" in r["messages"][0]["content"]]
        assert len(agg) == 4 and all(r["messages"][0]["content"].count("---- Candidate ") == 2 for r in agg)
        assert all(r["max_completion_tokens"] == 16 for r in server.requests)
    calls = read_calls(tmp_path / "t.jsonl")
    assert totals["tail_approximation"] and all(c["token_count"] == totals["tail_approximation"]
                                                for c in calls if c["round"] == 1)
    by_key = {c["key"]: c for c in calls}
    for c in calls:
        if c["round"] == 1:
            assert c["bound_ok"]
            for i in c["candidate_ids"]:   # the approximation: last 4 x tau characters of the reasoning
                assert by_key[i]["reasoning"][-4 * cfg.tail_tokens:] in c["prompt"][0]["content"]
    assert res.rounds[0].completion_tokens > 0


def test_gemma_hf_backend_markovian_rsa(gemma_dir, tmp_path):
    from openzaya.backends import HFBackend

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        backend = HFBackend(gemma_dir[0])
        cfg = TTCConfig(population=4, candidates=2, rounds=1, tail_tokens=8, budget_tokens=16)
        problems = [TTCProblem("g", "What is 7 times 8? Think step by step.")]
        results, totals = solve(problems, backend, cfg, trace_path=tmp_path / "g.jsonl")
    finally:
        torch.set_num_threads(threads)
    calls = read_calls(tmp_path / "g.jsonl")
    assert len(calls) == totals["calls"] == 4 * 2
    assert check_aggregation(calls, cfg, backend.tokenizer, {"g": problems[0].question}) == 4


# -----------------------------------------------------------------------------
# never aggregate nothing: thinking on and off, over every backend


def check_thinking(calls, thinking: bool, cfg, tok, question_of):
    """The rollouts have reasoning exactly when thinking is on and the model thinks; either way every aggregation
    prompt carries non-empty tails of the right source (`check_aggregation`)."""
    first = [c for c in calls if c["round"] == 0]
    assert first and all(c["text"].strip() for c in first)
    assert check_aggregation(calls, cfg, tok, question_of) == cfg.population * cfg.rounds
    return {bool(c["reasoning"]) for c in first}


def test_tails_never_empty_local_thinking_on_and_off(local, tmp_path):
    cfg_kw = dict(population=4, candidates=2, rounds=1, tail_tokens=8, budget_tokens=16)
    for thinking in (True, False):
        cfg = TTCConfig(**cfg_kw, enable_thinking=thinking)
        solve([PROBLEMS[0]], local, cfg, trace_path=tmp_path / f"{thinking}.jsonl")
        has_reasoning = check_thinking(read_calls(tmp_path / f"{thinking}.jsonl"), thinking, cfg, local.tokenizer,
                                       {"p0": PROBLEMS[0].question})
        assert has_reasoning == {thinking}   # off: no reasoning at all, the tails come from the whole texts


def test_tails_never_empty_hf_thinking_on_and_off(gemma_dir, tmp_path):
    """HFBackend on a tiny random model with Gemma's tokenizer (a base model: no chat template, never thinks)."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    from openzaya.backends import HFBackend

    config = AutoConfig.from_pretrained(gemma_dir[0])
    for k, v in dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=1,
                     num_key_value_heads=1, head_dim=16, layer_types=["full_attention"]).items():
        setattr(config, k, v)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "tiny")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(gemma_dir[0] / name, tmp_path / "tiny" / name)
    backend = HFBackend(tmp_path / "tiny")
    cfg_kw = dict(population=2, candidates=2, rounds=1, tail_tokens=8, budget_tokens=16)
    question = "What is 7 times 8?"
    for thinking in (True, False):
        cfg = TTCConfig(**cfg_kw, enable_thinking=thinking)
        solve([TTCProblem("g", question)], backend, cfg, trace_path=tmp_path / f"{thinking}.jsonl")
        has_reasoning = check_thinking(read_calls(tmp_path / f"{thinking}.jsonl"), thinking, cfg, backend.tokenizer,
                                       {"g": question})
        assert has_reasoning == {thinking}   # on: no </think>, all reasoning; off: all answer


@pytest.mark.parametrize("reasoning_content,never_thinks", [(True, False), (False, False), (False, True)])
def test_tails_never_empty_openai_thinking_on_and_off(reasoning_content, never_thinks, tmp_path):
    """A server that returns `reasoning_content`, one that returns the think block in `content`, and one whose model
    never thinks; thinking on and off (chat_template_kwargs). The stub's reasoning is "thinking about: ...", its
    answer "answer i w w ...": a tail shows which one it came from."""
    cfg_kw = dict(population=4, candidates=2, rounds=1, tail_tokens=4, budget_tokens=16)
    with StubServer(reasoning_content=reasoning_content, never_thinks=never_thinks, n_words=30) as server:
        backend = OpenAIBackend(server.url, "stub", max_concurrency=4)
        for thinking in (True, False):
            cfg = TTCConfig(**cfg_kw, enable_thinking=thinking)
            solve([TTCProblem("q", "what is 2+2?")], backend, cfg, trace_path=tmp_path / f"{thinking}.jsonl")
            calls = read_calls(tmp_path / f"{thinking}.jsonl")
            by_key = {c["key"]: c for c in calls}
            agg = [c for c in calls if c["round"] == 1]
            assert len(agg) == cfg.population
            thinks = thinking and not never_thinks
            for c in agg:
                content = c["prompt"][0]["content"]
                blocks = content.split("---- Candidate ")[1:]
                assert len(blocks) == cfg.candidates
                for i, block in zip(c["candidate_ids"], blocks):
                    tail = source_of_tail(by_key[i])[-4 * cfg.tail_tokens:]   # no tokenizer: 4 characters a token
                    assert tail.strip() and tail in block
                    # a model that thinks: its reasoning ("thinking about ..."); otherwise the answer's words
                    assert ("thinking about" in by_key[i]["reasoning"]) == thinks
                    assert ("answer" in tail or "w w" in tail) != thinks


def test_an_aggregation_of_empty_candidates_is_a_bug_not_a_call(local):
    """Candidates cut to nothing from rollouts with text raise before any call; rollouts that really were empty
    are passed on as they are."""
    from openzaya.backends import Completion

    run = Run(local, TTCConfig(**SMALL))
    prev = [Completion(text=f"text {i}", reasoning="", answer=f"text {i}", finish_reason="stop", prompt_tokens=1,
                       completion_tokens=2, latency_s=0.0) for i in range(4)]
    with pytest.raises(RuntimeError, match="every candidate of an aggregation prompt is empty"):
        run.aggregation_prompts(PROBLEMS[0], 1, prev, lambda c: c.reasoning)
    contents, _ = run.aggregation_prompts(PROBLEMS[0], 1, prev, lambda c: c.text)
    assert all("text " in x for x in contents)
    empty = [Completion(text="", reasoning="", answer="", finish_reason="stop", prompt_tokens=1, completion_tokens=0,
                        latency_s=0.0) for _ in range(4)]
    assert len(run.aggregation_prompts(PROBLEMS[0], 1, empty, lambda c: c.reasoning)[0]) == SMALL["population"]
