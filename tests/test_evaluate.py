"""Evaluation harness (openzaya/evaluate.py): metrics against hand-computed values, loaders, suites, and an end-to-end
run with a tiny local model and with a scripted backend whose answers are known.

Run: .venv/bin/python -m pytest tests/test_evaluate.py
"""

import json
import sys
from math import comb

import pytest
import torch

from openzaya.backends import Backend, Completion, LocalBackend
from openzaya.evaluate import Item, aggregation_diagnostics, avg_at_k, evaluate, load_benchmark, maj_at_k, pass_at_k
from openzaya.tokenizer import split_reasoning
from openzaya.ttc import TTCConfig
from test_local_backend import make_checkpoint


def test_pass_at_k_matches_the_combinatorial_formula():
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)     # 1 - C(3,2)/C(5,2)
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(3, 0, 2) == 0.0 and pass_at_k(3, 2, 2) == 1.0   # n - c < k
    for n in range(1, 12):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1.0 if n - c < k else 1 - comb(n - c, k) / comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_avg_and_maj_at_k_hand_values():
    assert avg_at_k([1, 0, 1, 0]) == 0.5
    # "2" wins 2 votes to 1 (None does not vote) and is wrong
    assert maj_at_k(["1", "2", " 2 ", None], [1, 0, 0, 0]) == 0.0
    assert maj_at_k(["7", "3", "7"], [1, 0, 1]) == 1.0
    assert maj_at_k(["3", "7"], [0, 1]) == 0.0                     # tie: the earliest answer
    assert maj_at_k([None, None], [0, 0]) == 0.0
    # k=1 of n: the expectation over single samples = the mean correctness
    assert maj_at_k(["1", "2", "2", "1"], [1, 0, 0, 1], k=1, trials=4000) == pytest.approx(0.5, abs=0.05)


def test_load_jsonl_fields_and_suites(tmp_path, monkeypatch):
    f = tmp_path / "b.jsonl"
    f.write_text(json.dumps({"id": "a/1", "problem": "1+1?", "answer": 2}) + "\n"
                 + json.dumps({"id": "b", "problem": "2+2?", "answer": "4"}) + "\n")
    items = load_benchmark(str(f))
    assert [(i.id, i.question, i.answer) for i in items] == [("a_1", "1+1?", "2"), ("b", "2+2?", "4")]
    g = tmp_path / "c.jsonl"
    g.write_text(json.dumps({"idx": 3, "q": "x?", "gold": "5"}) + "\n")
    assert load_benchmark(str(g), question_field="q", answer_field="gold", id_field="idx")[0].id == "3"
    with pytest.raises(ValueError, match="no question field"):
        load_benchmark(str(g))
    monkeypatch.setitem(sys.modules, "datasets", None)     # without the optional `datasets` package installed
    with pytest.raises(ValueError, match="neither a suite"):
        load_benchmark(str(tmp_path / "missing.jsonl"))
    monkeypatch.undo()
    suite = load_benchmark("envs:tiny")
    assert len(suite) == 4 and all(it.score(f"\\boxed{{{it.answer}}}") == 1.0 for it in suite)
    assert load_benchmark("envs:tiny")[0].question == suite[0].question            # fixed seeds
    with pytest.raises(ValueError, match="unknown suite"):
        load_benchmark("envs:nope")


def test_load_parquet(tmp_path):
    import pyarrow as pa            # a dev dependency: missing it fails the test instead of skipping it
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["x"], "question": ["1+2?"], "answer": ["3"]}), tmp_path / "b.parquet")
    assert load_benchmark(str(tmp_path / "b.parquet"))[0].answer == "3"


class Scripted(Backend):
    """Round-0 answers cycle 4, 5, 5, ... (1 in 3 right); aggregation prompts always answer 4 (right), so Markovian
    RSA's final population is all correct."""

    def __init__(self):
        self.i = 0

    def generate(self, requests):
        out = []
        for r in requests:
            content = r.messages[0]["content"]
            agg = "Candidate" in content
            ans = "4" if agg or self.i % 3 == 0 else "5"
            self.i += 1
            text = f"<think>\nsome thoughts\n</think>\n\n\\boxed{{{ans}}}"
            reasoning, answer = split_reasoning(text)
            out.append([Completion(text, reasoning, answer, "stop", 10, 20, 0.0)])
        return out


def test_evaluate_scripted_backend_metrics(tmp_path):
    items = [Item("p", "2+2?", "4")]
    base = TTCConfig(population=3, candidates=2, rounds=1, tail_tokens=8, budget_tokens=16)
    res = evaluate(items, Scripted(), base, ["single", "majority", "markovian_rsa"], samples=3, out_dir=tmp_path)
    m = res["methods"]
    assert m["markovian_rsa"]["avg@k"] == 1.0 and m["markovian_rsa"]["pop_mean"] == 1.0
    assert m["markovian_rsa"]["calls_per_problem"] == 6 and m["majority"]["calls_per_problem"] == 6  # matched
    assert m["single"]["calls_per_problem"] == 1
    for name in ("results.json", "report.md", "accuracy_vs_tokens.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "| p | 4 |" in (tmp_path / "report.md").read_text()
    # the scripted aggregator always answers right: a perfect verifier, above copying a random shown candidate
    a = m["markovian_rsa"]["aggregation"]
    assert a["calls"] == 9 and a["accuracy"] == 1.0 and a["random_copy"] < 1.0
    assert all(v["accuracy"] == 1.0 for v in a["by_correct_shown"].values())
    assert "markovian_rsa: aggregation calls (9)" in (tmp_path / "report.md").read_text()


def test_aggregation_diagnostics_hand_values(tmp_path):
    """Round 0: a right (4), b wrong (5), c wrong (5). Round 1: x shown (a, b) answers 4; y shown (b, c) keeps the
    agreeing 5; z shown (b, c) answers 6 (no shown answer)."""
    def call(key, rnd, answer, reward, shown=None):
        return {"type": "call", "key": key, "round": rnd, "extracted": answer, "reward": reward,
                **({"candidate_ids": shown} if shown else {})}
    recs = [{"type": "run"}, call("a", 0, "4", 1.0), call("b", 0, "5", 0.0), call("c", 0, "5", 0.0),
            call("x", 1, "4", 1.0, ["a", "b"]), call("y", 1, "5", 0.0, ["b", "c"]), call("z", 1, "6", 0.0, ["b", "c"])]
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    a = aggregation_diagnostics(path)
    assert a["calls"] == 3 and abs(a["accuracy"] - 1 / 3) < 1e-9
    assert abs(a["random_copy"] - (0.5 + 0 + 0) / 3) < 1e-9           # copying a random shown candidate
    assert abs(a["copy_rate"] - 2 / 3) < 1e-9                           # x and y repeat a shown answer
    assert a["agreeing_calls"] == 2 and a["keeps_agreeing_answer"] == 0.5
    assert a["by_correct_shown"] == {0: {"calls": 2, "accuracy": 0.0}, 1: {"calls": 1, "accuracy": 1.0}}
    path.write_text(json.dumps(call("a", 0, "4", 1.0)) + "\n")
    assert aggregation_diagnostics(path) is None                        # no aggregation calls


def test_evaluate_tiny_local_model_end_to_end(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        backend = LocalBackend(make_checkpoint(tmp_path / "m"), max_slots=16, max_len=1024)
        bench = tmp_path / "b.jsonl"
        bench.write_text("".join(json.dumps({"id": f"q{i}", "question": f"{i} plus 1 is", "answer": str(i + 1)})
                                 + "\n" for i in range(2)))
        base = TTCConfig(population=2, candidates=2, rounds=1, tail_tokens=4, budget_tokens=8)
        res = evaluate(load_benchmark(str(bench)), backend, base, ["single", "markovian_rsa"], samples=2,
                       out_dir=tmp_path / "out")
    finally:
        torch.set_num_threads(threads)
    r = res["methods"]["markovian_rsa"]
    assert r["calls_per_problem"] == 4 and r["totals"]["calls"] == 2 * 2 * 4
    assert 0.0 <= r["avg@k"] <= 1.0 and r["tokens_per_problem"] > 0
    assert json.loads((tmp_path / "out" / "results.json").read_text())["samples"] == 2
    assert (tmp_path / "out" / "trace_markovian_rsa.jsonl").exists()
    # the reported numbers are the ones the trace recorded per run (2 problems x 2 runs)
    for method in ("single", "markovian_rsa"):
        recs = [json.loads(x) for x in (tmp_path / "out" / f"trace_{method}.jsonl").read_text().splitlines()]
        runs = [x for x in recs if x["type"] == "problem"]
        assert len(runs) == 4
        m = res["methods"][method]
        assert m["avg@k"] == pytest.approx(sum(x["majority_correct"] for x in runs) / 4, abs=1e-12)
        assert m["pop_mean"] == pytest.approx(sum(x["population_mean"] for x in runs) / 4, abs=1e-12)


# The answer of every call, by problem, run, round and index (the call key is "<problem>~s<run>/r<round>/i<index>");
# None = a response with no boxed answer. Golds: a = 7, b = 3. Round 0 of majority and Markovian RSA (N = 3) shares
# its keys with `single` (index 0), so one table serves all three methods.
SCRIPT = {
    ("a", 0, 0): ["7", "2", "2"], ("a", 1, 0): ["2", "7", "7"], ("a", 2, 0): ["7", None, "5"],
    ("b", 0, 0): ["1", "1", "3"], ("b", 1, 0): ["3", "1", "1"], ("b", 2, 0): [None, None, None],
    ("a", 0, 1): ["7", "7", "2"], ("a", 1, 1): ["2", "2", "7"], ("a", 2, 1): ["7", "7", "7"],
    ("b", 0, 1): ["3", "3", "1"], ("b", 1, 1): ["3", None, None], ("b", 2, 1): ["1", "1", "1"],
}


class ScriptedByKey(Backend):
    """Answers each call from SCRIPT by its call key, so the result does not depend on scheduling."""

    def generate(self, requests):
        out = []
        for r in requests:
            problem, rnd, idx = r.id.split("/")
            item, run = problem.split("~s")
            ans = SCRIPT[(item, int(run), int(rnd[1:]))][int(idx[1:])]
            text = f"<think>\nwork on {item}\n</think>\n\n" + (f"\\boxed{{{ans}}}" if ans is not None else "no idea")
            reasoning, answer = split_reasoning(text)
            out.append([Completion(text, reasoning, answer, "stop", 10, 20, 0.0)])
        return out


def test_evaluate_metrics_equal_hand_values(tmp_path):
    """evaluate() end to end over a scripted backend whose every answer is known: avg@k, pass@1, pass@n, maj@k and
    pop_mean per problem and per method against values computed by hand (k = n = 3 runs per problem), in the
    results dict, results.json and the report's table."""
    items = [Item("a", "What is 3 + 4?", "7"), Item("b", "What is 1 + 2?", "3")]
    base = TTCConfig(population=3, candidates=2, rounds=1, tail_tokens=8, budget_tokens=16)
    res = evaluate(items, ScriptedByKey(), base, ["single", "majority", "markovian_rsa"], samples=3,
                   out_dir=tmp_path, match_calls=False)
    # Per problem (avg@k, pass@1, pass@3, maj@k, pop_mean), by hand from SCRIPT:
    # single   a: runs 7, 2, 7 -> right 1, 0, 1; maj "7".     b: 1, 3, none -> 0, 1, 0; maj: "1" and "3" tie, the
    #          earliest ("1") wins -> 0. pass@3 = 1 for both (n - c < k); pop_mean = the run's own correctness.
    # majority a: run majorities 2 (0), 7 (1), 7 (1; "7" and "5" tie, earliest); populations right 1/3, 2/3, 1/3.
    #          b: 1 (0), 1 (0), none (0); populations 1/3, 1/3, 0.
    # rsa      (final = round 1) a: 7 (1), 2 (0), 7 (1); populations 2/3, 1/3, 1.   b: 3, 3, 1 -> 1, 1, 0;
    #          populations 2/3, 1/3, 0.
    expected = {
        "single": {"a": (2 / 3, 2 / 3, 1.0, 1.0, 2 / 3), "b": (1 / 3, 1 / 3, 1.0, 0.0, 1 / 3)},
        "majority": {"a": (2 / 3, 2 / 3, 1.0, 1.0, 4 / 9), "b": (0.0, 0.0, 0.0, 0.0, 2 / 9)},
        "markovian_rsa": {"a": (2 / 3, 2 / 3, 1.0, 1.0, 2 / 3), "b": (2 / 3, 2 / 3, 1.0, 1.0, 1 / 3)},
    }
    keys = ("avg@k", "pass@1", "pass@3", "maj@k", "pop_mean")
    rows = {p["id"]: p["methods"] for p in res["problems"]}
    for method, per_item in expected.items():
        for item, values in per_item.items():
            got = tuple(rows[item][method][k] for k in keys)
            assert got == pytest.approx(values, abs=1e-12), (method, item)
        mean = tuple((per_item["a"][i] + per_item["b"][i]) / 2 for i in range(5))
        assert tuple(res["methods"][method][k] for k in keys) == pytest.approx(mean, abs=1e-12), method
    assert rows["a"]["single"]["answers"] == ["7", "2", "7"] and rows["b"]["majority"]["answers"] == ["1", "1", None]
    for method, calls in (("single", 1), ("majority", 3), ("markovian_rsa", 6)):
        m = res["methods"][method]
        assert m["calls_per_problem"] == calls and m["totals"]["calls"] == 2 * 3 * calls
        assert m["tokens_per_problem"] == 30 * calls and m["completion_tokens_per_problem"] == 20 * calls
    assert "pass@1" in res["methods"]["single"] and "pass@2" not in res["methods"]["single"]
    assert json.loads((tmp_path / "results.json").read_text())["methods"]["single"]["pass@3"] == 1.0
    report = (tmp_path / "report.md").read_text()
    assert "| avg@k | pass@1 | pass@3 | maj@k | pop_mean |" in report
    assert "| single | 1 | - | - | - | 16 | 0.500 | 0.500 | 1.000 | 0.500 | 0.500 | 30 | 20 | 1 |" in report
    assert "| majority | 3 | - | - | - | 16 | 0.333 | 0.333 | 0.500 | 0.500 | 0.333 | 90 | 60 | 3 |" in report
    assert "| markovian_rsa | 3 | 2 | 1 | 8 | 16 | 0.667 | 0.667 | 1.000 | 1.000 | 0.500 | 180 | 120 | 6 |" in report


def test_evaluate_defaults_errors_and_no_out_dir(tmp_path):
    """One run per item by default, no files without out_dir, nested out_dir created, clear errors; majority gets
    N x (T + 1) samples unless match_calls=False."""
    from openzaya.evaluate import method_config

    base = TTCConfig(population=3, candidates=2, rounds=1, tail_tokens=8, budget_tokens=16)
    assert method_config(base, "majority").population == 6 and method_config(base, "majority", False).population == 3
    assert method_config(base, "markovian_rsa").population == 3
    items = [Item("a", "What is 3 + 4?", "7")]
    res = evaluate(items, ScriptedByKey(), base, ["single"])
    assert res["samples"] == 1 and res["methods"]["single"]["pass@1"] == 1.0 and "aggregation" not in res["methods"]["single"]
    res = evaluate(items, ScriptedByKey(), base, ["single"], out_dir=tmp_path / "nested" / "out")
    assert (tmp_path / "nested" / "out" / "results.json").exists()
    with pytest.raises(ValueError, match="--samples must be >= 1, got 0"):
        evaluate(items, ScriptedByKey(), base, ["single"], samples=0)
    with pytest.raises(ValueError, match="empty benchmark"):
        evaluate([], ScriptedByKey(), base, ["single"])


def test_metric_edges_defaults_and_errors(tmp_path):
    assert avg_at_k([]) == 0.0
    answers, correct = ["1", "2", "2", "1", "3"], [1, 0, 0, 1, 0]
    # maj@k for k < n is a seeded Monte Carlo estimate: the defaults (1000 trials, seed 0) reproduce it exactly
    assert maj_at_k(answers, correct, k=2) == maj_at_k(answers, correct, k=2, trials=1000, seed=0)
    assert maj_at_k(answers, correct, k=2) != maj_at_k(answers, correct, k=2, trials=1000, seed=1)
    with pytest.raises(ValueError, match=r"maj@k needs 1 <= k <= n, got k=6 n=5"):
        maj_at_k(answers, correct, k=6)
    with pytest.raises(ValueError, match=r"pass@k needs 0 <= c <= n and 1 <= k <= n, got n=3 c=1 k=4"):
        pass_at_k(3, 1, 4)
    # aggregation calls that each show one candidate (C = 1), all keeping an agreeing answer
    recs = [{"type": "call", "key": "a", "extracted": "4", "reward": 1.0},
            {"type": "call", "key": "b", "extracted": "5", "reward": 0.0},
            {"type": "call", "key": "x", "extracted": "4", "reward": 1.0, "candidate_ids": ["a"]},
            {"type": "call", "key": "y", "extracted": "5", "reward": 0.0, "candidate_ids": ["b"]}]
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    a = aggregation_diagnostics(path)
    assert a["random_copy"] == 0.5 and a["agreeing_calls"] == 2 and a["keeps_agreeing_answer"] == 1.0
