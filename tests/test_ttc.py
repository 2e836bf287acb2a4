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
        assert c["bound_ok"] and c["prompt_content_tokens"] <= c["bound_tokens"] and c["token_count"] == "exact"
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
    assert 4 <= totals["calls"] <= 12 and all(c["bound_ok"] and c["token_count"] == "exact"
                                              for c in dcalls if c["round"] > 0)
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


# -----------------------------------------------------------------------------
# hand values over a scripted backend (issue 28: what the mutation run of ttc.py found untested). Without a tokenizer
# a token is CHARS_PER_TOKEN = 4 characters (counts ceil(len / 4), tails the last 4 x tau characters, heads the first
# 4 x n), so every count, bound and tail below is written by hand.

import asyncio
import math
import re
import time
import zlib
from dataclasses import asdict

from openzaya.backends import Completion, Request
from openzaya.tokenizer import split_reasoning
from openzaya.ttc import (RoundStats, TEMPLATE_VERSION, arun, delethink, delethink_query, pacore_hybrid,
                          reasoning_or_text, validate_problems)

INTRO = ("Below are 2 candidate solutions to this problem. Each shows only the last part of its reasoning: it may start "
         "mid-sentence, stop before the end, and contain mistakes.")
OUTRO = ("Consider the candidates: keep the steps that are right, check the points where they disagree, and try another "
         "approach if they all look wrong. Then write one improved, complete solution and put the final answer in "
         "\\boxed{}.")
APPROX = "last 4 characters per token"


def chars4(text: str) -> int:
    """Tokens of text without a tokenizer: 4 characters a token, rounded up."""
    return math.ceil(len(text) / 4)


def completion(key, text, finish_reason="stop", thinking=True):
    """A completion for call key "p/rK/iI": prompt tokens 100 + 10 K + I, completion tokens 7 + K + I, latency
    0.25 (I + 1) s, token ids [K, I]."""
    rnd, idx = (int(x[1:]) for x in key.split("/")[1:])
    reasoning, answer = split_reasoning(text, thinking)
    return Completion(text, reasoning, answer, finish_reason, 100 + 10 * rnd + idx, 7 + rnd + idx, 0.25 * (idx + 1),
                      token_ids=[rnd, idx])


class Scripted(Backend):
    """A blocking backend that answers every request with reply(request) -> Completion; records the requests, the
    size of every generate call and what it returned by key. No tokenizer unless given."""

    def __init__(self, reply, tokenizer=None, delay_s=0.0):
        self.reply, self.tokenizer, self.delay_s = reply, tokenizer, delay_s
        self.requests, self.batches, self.returned = [], [], {}

    def generate(self, requests):
        time.sleep(self.delay_s)
        self.batches.append(len(requests))
        self.requests += requests
        out = [self.reply(r) for r in requests]
        self.returned.update((r.id, c) for r, c in zip(requests, out))
        return [[c] for c in out]


class Refusing(Backend):
    """A backend that must not be called (a run answered from its trace)."""

    def generate(self, requests):
        raise AssertionError(f"unexpected calls {[r.id for r in requests]}")


def boxed(answer):
    return f"\\boxed{{{answer}}}"


def test_aggregation_prompt_and_template_pieces_hand_values():
    """The default template rendered by hand for C = 2; braces inside a tail ({question}, {n}, {i}, {tail}) stay
    literal; the template's own pieces are the text around the slots."""
    tails = ["a {question} {n}", "b {i} {tail} {candidates}"]
    assert build_aggregation_prompt("Q?", tails) == (
        f"Q?\n\n{INTRO}\n\n---- Candidate 1 ----\na {{question}} {{n}}\n\n"
        f"---- Candidate 2 ----\nb {{i}} {{tail}} {{candidates}}\n\n{OUTRO}")
    assert template_pieces(2) == [f"\n\n{INTRO}\n\n---- Candidate 1 ----\n", "\n\n---- Candidate 2 ----\n",
                                  f"\n\n{OUTRO}"]
    assert template_pieces(1, "{question}|{n}|{candidates}") == ["|1|---- Candidate 1 ----\n", "\n\n"]
    assert build_aggregation_prompt("Q", ["x", "y", "z"], "{n}:{question}{candidates}") == \
        "3:Q---- Candidate 1 ----\nx\n\n---- Candidate 2 ----\ny\n\n---- Candidate 3 ----\nz\n\n"


def test_config_validation_names_the_flag_and_accepts_the_boundaries():
    ok = dict(population=3, candidates=3, rounds=0, tail_tokens=8, budget_tokens=8, head_tokens=0, temperature=0.0,
              top_p=1.0, max_concurrency=1)
    TTCConfig(**ok).validate()        # C = N, T = 0, tau = beta, head 0, greedy, top-p 1, one call in flight: fine
    for change, message in [
            (dict(method="beam"), "unknown method 'beam'; choose one of single, majority, rsa, markovian_rsa, "
                                  "delethink, pacore_hybrid"),
            (dict(population=0), "--population must be positive, got 0"),
            (dict(budget_tokens=0, tail_tokens=0), "--budget-tokens must be positive, got 0"),
            (dict(tail_tokens=0), "--tail-tokens must be positive, got 0"),
            (dict(candidates=0), "--candidates must be positive, got 0"),
            (dict(max_concurrency=0), "--max-concurrency must be positive, got 0"),
            (dict(rounds=-1), "--rounds must be >= 0, got -1"),
            (dict(head_tokens=-1), "--head-tokens must be >= 0, got -1"),
            (dict(candidates=4), "--candidates C=4 exceeds --population N=3: each aggregation prompt draws C distinct "
                                 "candidates from the N of the previous round"),
            (dict(tail_tokens=9), "--tail-tokens tau=9 exceeds --budget-tokens beta=8: a tail is cut from a rollout "
                                  "of at most beta tokens"),
            (dict(temperature=-0.5), "--temperature must be >= 0, got -0.5"),
            (dict(top_p=0.0), "--top-p must be in (0, 1], got 0.0"),
            (dict(top_p=1.5), "--top-p must be in (0, 1], got 1.5")]:
        with pytest.raises(ValueError, match=re.escape(message) + "$"):
            TTCConfig(**{**ok, **change}).validate()


def test_calls_per_problem_of_every_method():
    expect = {"single": 1, "majority": 5, "rsa": 15, "markovian_rsa": 15, "delethink": 15, "pacore_hybrid": 15}
    for method, calls in expect.items():
        assert TTCConfig(method=method, population=5, candidates=2, rounds=2).calls_per_problem() == calls, method
    assert TTCConfig(method="markovian_rsa", population=5, candidates=2, rounds=0).calls_per_problem() == 5


def test_majority_answer_ties_blanks_and_nothing():
    assert majority_answer(["5", "7", "7", "5"]) == ("5", {"5": 2, "7": 2})        # a tie goes to the earliest
    assert majority_answer(["", "  ", None, "3"]) == ("3", {"3": 1})             # blanks do not vote
    assert majority_answer([None, "", " "]) == (None, {})


def test_problem_validation_messages():
    for problems, message in [([TTCProblem("a", "  ")], "problem 'a': empty question"),
                              ([TTCProblem("a", None)], "problem 'a': empty question"),
                              ([TTCProblem("a", "q"), TTCProblem("b", "r"), TTCProblem("a", "s")],
                               "duplicate problem id 'a' (call keys and resume need unique ids)"),
                              ([TTCProblem("a/b", "q")], "problem id 'a/b' contains '/', which the call keys use as "
                                                         "separator")]:
        with pytest.raises(ValueError, match=re.escape(message) + "$"):
            validate_problems(problems)
    validate_problems([TTCProblem("a", "q"), TTCProblem("b", "q")])     # same question, other ids: fine


def agg_reply(request):
    """Round 0: two thinking rollouts and one without reasoning; round 1: answers 41, 42, 42."""
    rnd, idx = (int(x[1:]) for x in request.id.split("/")[1:])
    if rnd == 0:
        text = ["<think>\nfirst try: 6*7 = 42\n</think>\n\n" + boxed(42),
                "<think>\nsecond try, six sevens make 41\n</think>\n\nso " + boxed(41),
                "plainly 6 times 7 is 42, " + boxed(42)][idx]
        return completion(request.id, text, thinking=idx < 2)    # the third has no reasoning: its text is all answer
    text = f"<think>\ncombined {idx}\n</think>\n\n" + boxed([41, 42, 42][idx])
    return completion(request.id, text)


def test_markovian_rsa_calls_stats_trace_and_result_hand_values(tmp_path):
    """One problem, N = 3, C = 2, T = 1, tau = 2 (8 characters), no tokenizer: every request, trace record, round
    statistic, the problem's result and the run totals against values written out by hand."""
    cfg = TTCConfig(population=3, candidates=2, rounds=1, tail_tokens=2, budget_tokens=16, temperature=0.7,
                    top_p=0.9, seed=5)
    q = "What is 6 x 7?"
    p = TTCProblem("p", q, answer="42", score=lambda text: float(text.endswith(boxed(42))))
    backend = Scripted(agg_reply)
    seen = []

    def progress(n):   # every call is in the trace (flushed) when progress hears of it
        seen.append(n)
        assert len(read_calls(tmp_path / "t.jsonl")) == len(seen)

    t0 = time.time()
    (res,), totals = solve([p], backend, cfg, trace_path=tmp_path / "t.jsonl", progress=progress)
    t1 = time.time()
    assert seen == [1] * 6
    keys = [f"p/r{r}/i{i}" for r in (0, 1) for i in range(3)]
    assert sorted(r.id for r in backend.requests) == keys and backend.batches == [3, 3]
    tails = ["6*7 = 42", " make 41", "oxed{42}"]   # the last 8 characters of the reasoning (or whole text)
    run = Run(backend, cfg)
    subsets = run.subsets("p", 1, 3)
    pieces = [f"\n\n{INTRO}\n\n---- Candidate 1 ----\n", "\n\n---- Candidate 2 ----\n", f"\n\n{OUTRO}"]
    bound = chars4(q) + 2 * 2 + sum(chars4(x) for x in pieces)
    by_key = {r.id: r for r in backend.requests}
    records = {c["key"]: c for c in read_calls(tmp_path / "t.jsonl")}
    for key in keys:
        rnd, idx = int(key[3]), int(key[6])
        req, comp = by_key[key], backend.returned[key]
        content = q
        if rnd == 1:
            shown = [tails[j] for j in subsets[idx]]
            content = f"{q}\n\n{INTRO}\n\n---- Candidate 1 ----\n{shown[0]}\n\n---- Candidate 2 ----\n{shown[1]}\n\n{OUTRO}"
        assert req.messages == [{"role": "user", "content": content}] and req.prompt is None
        assert req.enable_thinking is True
        seed = (5 * 1_000_003 + zlib.crc32(key.encode())) % 2 ** 31
        assert (req.params.temperature, req.params.top_p, req.params.max_tokens, req.params.seed) == (0.7, 0.9, 16, seed)
        rec = records[key]
        assert t0 <= rec.pop("time") <= t1
        meta = {}
        if rnd == 1:
            meta = {"candidate_ids": [f"p/r0/i{j}" for j in subsets[idx]], "prompt_content_tokens": chars4(content),
                    "bound_tokens": bound, "bound_ok": chars4(content) <= bound,
                    "tail_tokens": [chars4(tails[j]) for j in subsets[idx]], "token_count": APPROX}
            assert meta["bound_ok"]
        assert rec == {"type": "call", "key": key, "problem": "p", "round": rnd, "index": idx, "prompt_id": key,
                       "prompt": [{"role": "user", "content": content}], **meta, "text": comp.text,
                       "reasoning": comp.reasoning, "answer_section": comp.answer, "finish_reason": "stop",
                       "prompt_tokens": 100 + 10 * rnd + idx, "completion_tokens": 7 + rnd + idx,
                       "latency_s": 0.25 * (idx + 1), "token_ids": [rnd, idx],
                       "extracted": ["42", "41", "42"][idx] if rnd == 0 else ["41", "42", "42"][idx],
                       "reward": float(comp.text.endswith(boxed(42)))}
    contents = [records[f"p/r1/i{i}"]["prompt_content_tokens"] for i in range(3)]
    assert [asdict(r) | {"wall_s": 0} for r in res.rounds] == [
        dict(calls=3, resumed_calls=0, prompt_tokens=303, completion_tokens=24, wall_s=0, max_prompt_tokens=102,
             max_bound_tokens=0, max_content_tokens=0),
        dict(calls=3, resumed_calls=0, prompt_tokens=333, completion_tokens=27, wall_s=0, max_prompt_tokens=112,
             max_bound_tokens=bound, max_content_tokens=max(contents))]
    assert all(0 < r.wall_s <= t1 - t0 for r in res.rounds)
    assert (res.id, res.answer, res.votes, res.final_answers) == ("p", "42", {"41": 1, "42": 2}, ["41", "42", "42"])
    assert res.final_texts == [backend.returned[f"p/r1/i{i}"].text for i in range(3)]
    assert (res.rewards, res.majority_correct, res.population_mean) == ([0.0, 1.0, 1.0], 1.0, 2 / 3)
    assert (res.calls, res.prompt_tokens, res.completion_tokens, res.winner_index) == (6, 636, 51, 1)
    recs = [json.loads(line) for line in open(tmp_path / "t.jsonl")]
    assert recs[0] == {"type": "run", "config": asdict(cfg), "template_version": TEMPLATE_VERSION,
                       "template": AGGREGATION_TEMPLATE_V1, "tail_approximation": APPROX}
    assert recs[-2] == {"type": "problem", "problem": "p", "answer": "42", "votes": {"41": 1, "42": 2},
                        "majority_correct": 1.0, "population_mean": 2 / 3, "rounds": [asdict(r) for r in res.rounds]}
    wall, backend_s = totals.pop("wall_s"), totals.pop("backend_s")
    assert totals == {"problems": 1, "calls": 6, "resumed_calls": 0, "prompt_tokens": 636, "completion_tokens": 51,
                      "tail_approximation": APPROX, "template_version": TEMPLATE_VERSION}
    assert 0 < backend_s <= wall <= t1 - t0
    assert recs[-1] == {"type": "totals", **totals, "wall_s": wall, "backend_s": backend_s}


def test_resume_answers_every_field_from_the_trace(tmp_path):
    """A finished trace answers a second run completely: no call, the same results and statistics (resumed), and
    every completion field the trace keeps back as it was (pacore's answer sections and delethink's finish reasons
    are read from resumed completions). A blank and a torn line inside the trace are skipped; the header is not
    written twice; settings outside the resume check (temperature) may change."""
    cfg = TTCConfig(population=3, candidates=2, rounds=1, tail_tokens=2, budget_tokens=16, seed=5)
    p = TTCProblem("p", "What is 6 x 7?", score=lambda text: float(text.endswith(boxed(42))))
    backend = Scripted(agg_reply)
    (ref,), _ = solve([p], backend, cfg, trace_path=tmp_path / "t.jsonl")
    lines = open(tmp_path / "t.jsonl").read().splitlines(keepends=True)
    lines[2:2] = ["\n", '{"type": "call", "key": "p/r1/i0", "te\n']   # after the header and the first call
    (tmp_path / "t.jsonl").write_text("".join(lines))
    cfg2 = TTCConfig(**{**asdict(cfg), "temperature": 0.5})
    (res,), totals = solve([p], Refusing(), cfg2, trace_path=tmp_path / "t.jsonl")
    assert (res.answer, res.votes, res.final_texts, res.rewards) == (ref.answer, ref.votes, ref.final_texts, ref.rewards)
    assert [asdict(r) | {"wall_s": 0} for r in res.rounds] == \
        [asdict(r) | {"wall_s": 0, "resumed_calls": 3} for r in ref.rounds]
    assert totals["resumed_calls"] == totals["calls"] == 6
    assert sum(line.startswith('{"type": "run"') for line in open(tmp_path / "t.jsonl")) == 1
    run = Run(Refusing(), cfg, trace_path=tmp_path / "t.jsonl")
    for key, original in backend.returned.items():
        rnd, idx = int(key[3]), int(key[6])
        stats = RoundStats()
        got = asyncio.run(run.call(p, rnd, idx, Request(prompt="unused"), stats))
        assert got == original and stats.resumed_calls == 1, key
    run.close()


def test_resume_refuses_other_settings_and_names_them(tmp_path):
    cfg = TTCConfig(population=3, candidates=2, rounds=1, tail_tokens=2, budget_tokens=16, seed=5)
    solve([TTCProblem("p", "q")], Scripted(agg_reply), cfg, trace_path=tmp_path / "t.jsonl")
    path = tmp_path / "t.jsonl"
    for key, value in [("method", "pacore_hybrid"), ("population", 4), ("candidates", 3), ("rounds", 2),
                       ("tail_tokens", 3), ("budget_tokens", 17), ("seed", 6)]:
        old = getattr(cfg, key)
        message = (f"trace {path} was written with {key}={old!r}, this run has {value!r}: use another trace or the "
                   f"same flags")
        with pytest.raises(ValueError, match=re.escape(message) + "$"):
            Run(Refusing(), TTCConfig(**{**asdict(cfg), key: value}), trace_path=path)


def test_trace_directory_is_created_and_the_run_closes_its_trace(tmp_path):
    path = tmp_path / "a" / "b" / "t.jsonl"
    run = Run(Scripted(agg_reply), TTCConfig(population=3, candidates=2, rounds=1, tail_tokens=2, budget_tokens=16),
              trace_path=path)
    assert run.backend_s == 0.0 and run.done == {}
    trace = run._trace
    results, totals = asyncio.run(arun([TTCProblem("p", "q")], run.backend, run.cfg, run=run))
    assert trace.closed and run._trace is None and totals["calls"] == 6
    assert [r["type"] for r in map(json.loads, open(path))] == ["run"] + ["call"] * 6 + ["problem", "totals"]


def test_single_and_majority_keys_prompts_and_the_default_config():
    backend = Scripted(lambda r: completion(r.id, boxed(1)))
    (res,), totals = solve([TTCProblem("p", "Q1")], backend, TTCConfig(method="single", budget_tokens=8, tail_tokens=4))
    assert [(r.id, r.messages) for r in backend.requests] == [("p/r0/i0", [{"role": "user", "content": "Q1"}])]
    assert [x.calls for x in res.rounds] == [1] and totals["calls"] == 1
    backend = Scripted(lambda r: completion(r.id, boxed(1)))
    solve([TTCProblem("p", "Q1")], backend, TTCConfig(method="majority", population=3, candidates=1, budget_tokens=8,
                                                           tail_tokens=4))
    assert sorted((r.id, r.messages[0]["content"]) for r in backend.requests) == \
        [("p/r0/i0", "Q1"), ("p/r0/i1", "Q1"), ("p/r0/i2", "Q1")]
    backend = Scripted(lambda r: completion(r.id, "<think>\nhmm\n</think>\n\n" + boxed(1)))
    (res,), totals = solve("What is 0 + 1?", backend)     # a bare question, the default config
    assert res.id == "q0" and totals["calls"] == 16 * 3 and [x.calls for x in res.rounds] == [16, 16, 16]
    assert {r.params.max_tokens for r in backend.requests} == {16384}
    assert all(r.messages[0]["content"].count("---- Candidate ") == 4 for r in backend.requests if "/r0/" not in r.id)


def test_requests_follow_the_tokenizer_and_thinking(local):
    """A chat template: a user message; a tokenizer without one (a base model): the raw text; no tokenizer: a user
    message (the server templates it). Thinking on or off reaches every request."""
    import copy

    base = copy.copy(local.tokenizer)
    base.chat_template = None
    for tok, thinking, raw in [(local.tokenizer, False, False), (base, False, True), (base, True, True),
                               (None, False, False)]:
        req = Run(Scripted(None, tok), TTCConfig(**SMALL, enable_thinking=thinking)).request("Q?")
        assert (req.prompt, req.messages) == (("Q?", None) if raw else (None, [{"role": "user", "content": "Q?"}]))
        assert req.enable_thinking is thinking


def test_batched_and_concurrent_dispatch():
    """A blocking backend gets one batched call at a time, at most max_concurrency requests each; an async one
    gets every request on its own, at most max_concurrency in flight; time inside the backend is summed."""
    problems = [TTCProblem("a", "Q1"), TTCProblem("b", "Q2")]
    majority4 = dict(method="majority", population=4, candidates=1, budget_tokens=8, tail_tokens=4)
    backend = Scripted(lambda r: completion(r.id, boxed(1)), delay_s=0.05)
    assert Run(backend, TTCConfig(**majority4)).batch_calls is True
    t0 = time.perf_counter()
    _, totals = solve(problems, backend, TTCConfig(**majority4, max_concurrency=3))
    elapsed = time.perf_counter() - t0
    assert backend.batches == [3, 3, 2] and 0.15 <= totals["backend_s"] <= elapsed
    assert elapsed - totals["backend_s"] < 0.95   # the batcher only yields between batches, it does not wait
    backend = Scripted(lambda r: completion(r.id, boxed(1)))
    solve(problems, backend, TTCConfig(**majority4))
    assert backend.batches == [8]
    backend = Scripted(lambda r: completion(r.id, boxed(1)))
    asyncio.run(arun(problems, backend, TTCConfig(**majority4), run=Run(backend, TTCConfig(**majority4),
                                                                          batch_calls=False)))
    assert backend.batches == [1] * 8

    class Async(Backend):
        def __init__(self):
            self.in_flight, self.most = 0, 0

        async def agenerate(self, requests):
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
            await asyncio.sleep(0.02)
            self.in_flight -= 1
            return [[completion(r.id, boxed(1))] for r in requests]

    backend = Async()
    assert Run(backend, TTCConfig(**majority4)).batch_calls is False
    t0 = time.perf_counter()
    _, totals = solve(problems, backend, TTCConfig(**majority4, max_concurrency=3))
    assert backend.most == 3 and 8 * 0.02 <= totals["backend_s"] <= 3 * (time.perf_counter() - t0)


def test_delethink_query_hand_values(local):
    import copy

    q = "What is 3 + 4? Explain."
    assert delethink_query(local.tokenizer, q, True) == f"<|bos|><|user|>{q}<|end|>\n<|assistant|><think>\n"
    assert delethink_query(local.tokenizer, q, False) == \
        f"<|bos|><|user|>{q}<|end|>\n<|assistant|><think>\n\n</think>\n"
    base = copy.copy(local.tokenizer)
    base.chat_template = None
    assert delethink_query(base, q, True) == delethink_query(None, q, False) == q + "\n\n"


DELETHINK_CHUNKS = {   # call key -> (text, finish reason); rollout 0 runs out of budget twice, rollout 1 stops at once
    "p/r0/i0": ("<think>\nabcdefghijklmnop", "length"), "p/r1/i0": ("qrstuvwxyz", "length"),
    "p/r2/i0": ("</think>\n\n" + boxed(7), "stop"), "p/r0/i1": ("short " + boxed(8), "stop")}


def test_delethink_prompts_budgets_and_completions_hand_values():
    """No tokenizer: tau = 2 (8 characters), head 1 (4 characters), beta 5, T = 2. Chunk k >= 1 continues from the
    query + the first 4 characters of chunk 0 + the last 8 of chunk k-1, with budget beta - tau; the rollout is the
    concatenation of its chunks, its statistics their sums."""
    cfg = TTCConfig(method="delethink", population=2, rounds=2, tail_tokens=2, budget_tokens=5, head_tokens=1,
                    candidates=1)
    q = "Count letters."
    backend = Scripted(lambda r: completion(r.id, *DELETHINK_CHUNKS[r.id]))
    run = Run(backend, cfg)
    rounds = []
    t0 = time.perf_counter()
    out = asyncio.run(delethink(run, TTCProblem("p", q), rounds))
    elapsed = time.perf_counter() - t0
    run.close()
    query = q + "\n\n"
    prompts = {"p/r0/i0": query, "p/r1/i0": query + "<thi" + "ijklmnop", "p/r2/i0": query + "<thi" + "stuvwxyz",
               "p/r0/i1": query}
    assert {r.id: (r.prompt, r.params.max_tokens, r.enable_thinking) for r in backend.requests} == \
        {k: (v, 5 if "/r0/" in k else 3, True) for k, v in prompts.items()}
    text0 = "<think>\nabcdefghijklmnopqrstuvwxyz</think>\n\n" + boxed(7)
    assert out == [Completion(text0, "abcdefghijklmnopqrstuvwxyz", boxed(7), "stop", 100 + 110 + 120, 7 + 8 + 9,
                              0.75),
                   Completion("short " + boxed(8), "short " + boxed(8), "", "stop", 101, 8, 0.5)]
    assert [(r.calls, r.prompt_tokens, r.completion_tokens, r.max_prompt_tokens, r.max_bound_tokens,
             r.max_content_tokens) for r in rounds] == [(2, 201, 15, 101, 0, 0), (1, 110, 8, 110, 7, 7),
                                                       (1, 120, 9, 120, 7, 7)]
    assert all(0 < r.wall_s <= elapsed for r in rounds)
    assert Run(backend, cfg).longest_prompt_tokens(q) == chars4(query) + 1 + 2 == 7
    # the trace's bound of a continuation: |query| + head + tau against |query| + the carried text
    backend = Scripted(lambda r: completion(r.id, *DELETHINK_CHUNKS[r.id]))
    solve([TTCProblem("p", q)], backend, cfg, trace_path=None)
    run = Run(backend, cfg)
    metas = []
    run.call = _recording_call(run.call, metas)
    asyncio.run(delethink(run, TTCProblem("p", q), []))
    run.close()
    assert sorted((m["candidate_ids"], m["prompt_content_tokens"], m["bound_tokens"], m["bound_ok"],
                   m["token_count"]) for m in metas if m) == \
        [(["p/r0/i0"], 4 + 3, 4 + 3, True, APPROX), (["p/r1/i0"], 4 + 3, 4 + 3, True, APPROX)]


def _recording_call(call, metas):
    async def recorded(problem, round_, index, request, stats, meta=None, max_tokens=None):
        metas.append(meta)
        return await call(problem, round_, index, request, stats, meta, max_tokens)
    return recorded


def test_delethink_thinking_off_and_a_budget_equal_to_the_tail():
    """Thinking off: a rollout without a think block is all answer; tau = beta leaves later chunks 1 token."""
    cfg = TTCConfig(method="delethink", population=1, rounds=1, tail_tokens=3, budget_tokens=3, head_tokens=0,
                    candidates=1, enable_thinking=False)
    chunks = {"p/r0/i0": ("no think block, ", "length"), "p/r1/i0": (boxed(5), "stop")}
    backend = Scripted(lambda r: completion(r.id, *chunks[r.id], thinking=False))
    run = Run(backend, cfg)
    (out,) = asyncio.run(delethink(run, TTCProblem("p", "Q"), []))
    run.close()
    assert (out.text, out.reasoning, out.answer) == ("no think block, " + boxed(5), "", "no think block, " + boxed(5))
    assert {r.id: (r.prompt, r.params.max_tokens, r.enable_thinking) for r in backend.requests} == \
        {"p/r0/i0": ("Q\n\n", 3, False), "p/r1/i0": ("Q\n\n" + "hink block, ", 1, False)}


def test_longest_prompt_of_delethink_counts_the_question(local):
    q = "A much longer question than the word None: what is 12 plus 13, and why?"
    cfg = TTCConfig(**SMALL, method="delethink", head_tokens=4)
    assert Run(local, cfg).longest_prompt_tokens(q) == \
        local.count_tokens(delethink_query(local.tokenizer, q, True)) + 4 + SMALL["tail_tokens"]
    assert Run(Scripted(None), cfg).longest_prompt_tokens(q) == chars4(q + "\n\n") + 4 + 8


def test_pacore_hybrid_tails_answer_sections_else_reasoning_else_text():
    cfg = TTCConfig(method="pacore_hybrid", population=3, candidates=2, rounds=1, tail_tokens=2, budget_tokens=16)
    backend = Scripted(agg_reply)
    run = Run(backend, cfg)
    asyncio.run(pacore_hybrid(run, TTCProblem("p", "Q"), []))
    run.close()
    # answer sections "\boxed{42}" and "so \boxed{41}"; the third rollout (no think block, thinking off) is all answer
    tails = ["oxed{42}", "oxed{41}", "oxed{42}"]
    subsets = run.subsets("p", 1, 3)
    agg = {r.id: r.messages[0]["content"] for r in backend.requests if "/r1/" in r.id}
    assert agg == {f"p/r1/i{i}": build_aggregation_prompt("Q", [tails[j] for j in s]) for i, s in enumerate(subsets)}
    cut = Completion("<think>\nlong reasoning here\n</think>\n\n", "long reasoning here", "  ", "stop", 1, 1, 0.0)
    assert backend.tail_tokens(cut.reasoning, 2) == "ing here"
    backend2 = Scripted(lambda r: cut if "/r0/" in r.id else completion(r.id, boxed(1)))
    run = Run(backend2, cfg)
    asyncio.run(pacore_hybrid(run, TTCProblem("p", "Q"), []))
    run.close()
    assert all(r.messages[0]["content"].count("\ning here\n") == 2 for r in backend2.requests if "/r1/" in r.id)


def test_reasoning_or_text():
    assert reasoning_or_text(Completion("T", "  \n", "T", "stop", 1, 1, 0.0)) == "T"
    assert reasoning_or_text(Completion("<think>r</think>T", "r", "T", "stop", 1, 1, 0.0)) == "r"


def test_aggregation_bound_is_enforced_except_for_rsa_or_when_relaxed():
    """A candidate longer than tau (a custom cut) breaks the bound: strict runs raise with the numbers, rsa (whole
    candidates by design) and --strict-bound off record bound_ok False; partly empty candidates are sent."""
    prev = [completion(f"p/r0/i{i}", "x" * 40) for i in range(3)]
    cfg = dict(population=3, candidates=2, rounds=1, tail_tokens=2, budget_tokens=16)
    q = "Q"
    pieces = [f"\n\n{INTRO}\n\n---- Candidate 1 ----\n", "\n\n---- Candidate 2 ----\n", f"\n\n{OUTRO}"]
    template = sum(chars4(x) for x in pieces)
    bound = 1 + 2 * 2 + template
    n = chars4(build_aggregation_prompt(q, ["x" * 40] * 2))
    message = (f"p round 1: aggregation prompt has {n} tokens, over the bound |q| + C*tau + template = 1 + 2*2 + "
               f"{template} = {bound}")
    with pytest.raises(AssertionError, match=re.escape(message) + "$"):
        Run(Scripted(None), TTCConfig(**cfg)).aggregation_prompts(TTCProblem("p", q), 1, prev, lambda c: c.text)
    for run in (Run(Scripted(None), TTCConfig(**cfg, method="rsa")),
                Run(Scripted(None), TTCConfig(**cfg, strict_bound=False))):
        contents, metas = run.aggregation_prompts(TTCProblem("p", q), 1, prev, lambda c: c.text)
        assert len(contents) == 3 and all(m["bound_ok"] is False and m["prompt_content_tokens"] == n
                                          and m["bound_tokens"] == bound and m["tail_tokens"] == [10, 10]
                                          for m in metas)
    # N = C = 2: every prompt shows both rollouts. One empty reasoning beside a non-empty one: sent. Both cut to
    # nothing while one rollout has text: a bug. Both rollouts really empty: sent as they are.
    run = Run(Scripted(None), TTCConfig(**{**cfg, "population": 2}))
    half = [completion("p/r0/i0", "<think>\nr\n</think>\n\nA"), completion("p/r0/i1", "<think>\n\n</think>\n\nB")]
    contents, _ = run.aggregation_prompts(TTCProblem("p", q), 1, half, lambda c: c.reasoning)
    assert len(contents) == 2 and all("---- Candidate 2 ----\n\n\n" in x or "---- Candidate 1 ----\n\n\n" in x
                                      for x in contents)
    one_blank = [completion("p/r0/i0", ""), completion("p/r0/i1", "<think>\n\n</think>\n\nB")]
    with pytest.raises(RuntimeError, match=re.escape("p round 1: every candidate of an aggregation prompt is empty "
                                                     "although rollouts [") + r"[01], [01]" + re.escape(
                                                     "] of round 0 are not (their reasoning: [0, 0] chars, answers [")):
        run.aggregation_prompts(TTCProblem("p", q), 1, one_blank, lambda c: c.reasoning)
    both_blank = [completion("p/r0/i0", ""), completion("p/r0/i1", " ")]
    assert len(run.aggregation_prompts(TTCProblem("p", q), 1, both_blank, lambda c: c.reasoning)[0]) == 2


def test_template_file_reaches_prompts_trace_and_totals(tmp_path):
    (tmp_path / "t.txt").write_text("{n} tails for {question}:\n{candidates}end")
    cfg = TTCConfig(population=3, candidates=2, rounds=1, tail_tokens=2, budget_tokens=16,
                    template_file=str(tmp_path / "t.txt"))
    backend = Scripted(agg_reply)
    (res,), totals = solve([TTCProblem("p", "Q")], backend, cfg, trace_path=tmp_path / "trace.jsonl")
    assert totals["template_version"] == f"file:{tmp_path / 't.txt'}"
    assert json.loads(open(tmp_path / "trace.jsonl").readline())["template"] == "{n} tails for {question}:\n{candidates}end"
    agg = [r.messages[0]["content"] for r in backend.requests if "/r1/" in r.id]
    assert len(agg) == 3 and all(x.startswith("2 tails for Q:\n---- Candidate 1 ----\n") and x.endswith("\n\nend")
                                 for x in agg)
    pieces = ["2 tails for ", ":\n---- Candidate 1 ----\n", "\n\n---- Candidate 2 ----\n", "\n\nend"]
    bound = chars4("Q") + 2 * 2 + sum(chars4(x) for x in pieces)
    assert {c["bound_tokens"] for c in read_calls(tmp_path / "trace.jsonl") if c["round"] == 1} == {bound}


def test_run_checks_its_config_and_closes_cleanly_inside_a_running_loop(tmp_path):
    """Run validates its settings; after arun no task is left behind in the caller's event loop (the batcher is
    cancelled) and closing twice is harmless; every call is kept for the run (`done`); a non-ASCII question is
    written to the trace as it is."""
    with pytest.raises(ValueError, match="--population must be positive"):
        Run(Scripted(agg_reply), TTCConfig(population=0))
    cfg = TTCConfig(population=3, candidates=2, rounds=1, tail_tokens=2, budget_tokens=16)
    backend = Scripted(agg_reply)

    async def main():
        run = Run(backend, cfg, trace_path=tmp_path / "t.jsonl")
        await arun([TTCProblem("p", "Combien font 6 · 7 ?")], backend, cfg, run=run)
        await asyncio.sleep(0)
        left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
        run.close()
        return run, left

    run, left = asyncio.run(main())
    assert left == [] and sorted(run.done) == [f"p/r{r}/i{i}" for r in (0, 1) for i in range(3)]
    assert all(rec["key"] == key and rec["text"] == backend.returned[key].text for key, rec in run.done.items())
    assert {c["reward"] for c in read_calls(tmp_path / "t.jsonl")} == {None}     # no scorer: no reward
    assert "Combien font 6 · 7 ?" in open(tmp_path / "t.jsonl", encoding="utf-8").read()


def test_arun_validates_problems_and_closes_the_trace_on_failure(local, tmp_path):
    cfg = TTCConfig(**SMALL)
    with pytest.raises(ValueError, match="duplicate problem id 'p0'"):
        asyncio.run(arun([PROBLEMS[0], PROBLEMS[0]], Refusing(), cfg))
    run = Run(Flaky(local, fail_after=0), cfg, trace_path=tmp_path / "t.jsonl")
    trace = run._trace
    with pytest.raises(RuntimeError, match="forced interruption"):
        asyncio.run(arun(PROBLEMS, run.backend, cfg, run=run))
    assert trace.closed and run._trace is None


def test_a_tokenizer_without_the_chat_template_attribute_gets_raw_prompts():
    class Bare:   # a tokenizer object that has no chat_template attribute at all
        def encode(self, text, add_special_tokens=False):
            return list(text.encode())

    req = Run(Scripted(None, Bare()), TTCConfig(**SMALL)).request("Q?")
    assert (req.prompt, req.messages) == ("Q?", None)


def test_result_without_any_parsable_answer_or_without_a_scorer():
    cfg = TTCConfig(method="majority", population=2, candidates=1, budget_tokens=8, tail_tokens=4)
    backend = Scripted(lambda r: completion(r.id, "no answer here"))
    (res,), _ = solve([TTCProblem("p", "Q", score=lambda text: 1.0)], backend, cfg)
    assert (res.answer, res.votes, res.final_answers, res.rewards, res.majority_correct, res.population_mean) == \
        (None, {}, [None, None], [1.0, 1.0], 0.0, 1.0)
    (res,), _ = solve([TTCProblem("p", "Q")], Scripted(lambda r: completion(r.id, boxed(3))), cfg)
    assert (res.answer, res.rewards, res.majority_correct, res.population_mean) == ("3", None, None, None)


def test_a_prompt_exactly_at_the_bound_is_sent():
    """n == bound is within it (bound_ok, no error under --strict-bound); one token more is not."""
    cfg = TTCConfig(population=2, candidates=2, rounds=1, tail_tokens=2, budget_tokens=16)
    pieces = [f"\n\n{INTRO}\n\n---- Candidate 1 ----\n", "\n\n---- Candidate 2 ----\n", f"\n\n{OUTRO}"]
    bound = chars4("Q") + 2 * 2 + sum(chars4(x) for x in pieces)
    at = [L for L in range(40) if chars4(build_aggregation_prompt("Q", ["x" * L] * 2)) == bound]
    assert at    # some candidate length meets the bound exactly
    prev = [completion(f"p/r0/i{i}", "x" * max(at)) for i in range(2)]
    _, metas = Run(Scripted(None), cfg).aggregation_prompts(TTCProblem("p", "Q"), 1, prev, lambda c: c.text)
    assert [(m["prompt_content_tokens"], m["bound_ok"]) for m in metas] == [(bound, True)] * 2
    prev = [completion(f"p/r0/i{i}", "x" * (max(at) + 1)) for i in range(2)]
    with pytest.raises(AssertionError, match=f"aggregation prompt has {bound + 1} tokens"):
        Run(Scripted(None), cfg).aggregation_prompts(TTCProblem("p", "Q"), 1, prev, lambda c: c.text)


def test_a_failed_batch_fails_its_callers_only():
    """The batcher hands a backend error to the callers of that batch and goes on serving the next one."""
    class FailsOnce(Scripted):
        def generate(self, requests):
            if not self.batches:
                self.batches.append(len(requests))
                raise RuntimeError("backend down")
            return super().generate(requests)

    backend = FailsOnce(lambda r: completion(r.id, boxed(1)))
    run = Run(backend, TTCConfig(method="majority", population=2, candidates=1, budget_tokens=8, tail_tokens=4,
                                 max_concurrency=1))

    async def both():
        calls = [run.call(TTCProblem("p", "Q"), 0, i, Request(prompt="Q"), RoundStats()) for i in range(2)]
        return await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), timeout=20)

    first, second = asyncio.run(both())
    run.close()
    assert isinstance(first, RuntimeError) and str(first) == "backend down"
    assert second == backend.returned["p/r0/i1"] and backend.batches == [1, 1]
