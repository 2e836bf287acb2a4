"""Evaluation harness (openzaya/evaluate.py): metrics against hand-computed values, loaders, suites, and an end-to-end
run with a tiny local model and with a scripted backend whose answers are known.

Run: .venv/bin/python -m pytest tests/test_evaluate.py
"""

import json
import sys
from dataclasses import asdict, replace
from math import comb, sqrt

import pytest
import torch

from openzaya.backends import Backend, Completion, LocalBackend
from openzaya.evaluate import (Item, aggregation_diagnostics, avg_at_k, evaluate, fit_to_context, load_benchmark,
                               maj_at_k, math_vote_keys, mean_se, pass_at_k)
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
    # accuracy - random copy per problem (no problem field: each call its own): gains 0.5, 0, 0
    assert a["problems"] == 3 and abs(a["minus_copy"] - 1 / 6) < 1e-9
    assert abs(a["minus_copy_se"] - sqrt(((1 / 3) ** 2 + 2 * (1 / 6) ** 2) / 2 / 3)) < 1e-9
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
    assert "| avg@k | pass@1 | pass@3 | maj@k | pop_mean |" in report   # each value ± its standard error over problems
    assert ("| single | 1 | - | - | - | 16 | 0.500 ± 0.167 | 0.500 ± 0.167 | 1.000 ± 0.000 | 0.500 ± 0.500 | "
            "0.500 ± 0.167 | 30 | 20 | 1 |") in report
    assert ("| majority | 3 | - | - | - | 16 | 0.333 ± 0.333 | 0.333 ± 0.333 | 0.500 ± 0.500 | 0.500 ± 0.500 | "
            "0.333 ± 0.111 | 90 | 60 | 3 |") in report
    assert ("| markovian_rsa | 3 | 2 | 1 | 8 | 16 | 0.667 ± 0.000 | 0.667 ± 0.000 | 1.000 ± 0.000 | 1.000 ± 0.000 | "
            "0.500 ± 0.167 | 180 | 120 | 6 |") in report


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


# ---------------------------------------------------------------------------------------------------------------------
# benchmark files: clear errors, formats, Hugging Face datasets


def test_malformed_and_unsupported_benchmark_files(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1?", "answer": "2"}\n\n{"problem": "x", "answer": "3"\n')
    with pytest.raises(ValueError, match=rf"{bad} line 3: not valid JSON \(Expecting ',' delimiter"):
        load_benchmark(str(bad))
    bad.write_text('{"problem": "1+1?", "answer": "2"}\n["a list"]\n')
    with pytest.raises(ValueError, match=rf"{bad} line 2: a JSON list, not an object"):
        load_benchmark(str(bad))
    csv = tmp_path / "b.csv"
    csv.write_text("problem,answer\n1+1?,2\n")
    with pytest.raises(ValueError, match=r"unsupported benchmark format '.csv'; supported: .jsonl \(one JSON object "
                                         r"per line\), .json \(a JSON list of objects\), .parquet"):
        load_benchmark(str(csv))
    js = tmp_path / "b.json"
    js.write_text(json.dumps([{"id": "x", "question": "1+2?", "answer": "3"}]))
    assert [(i.id, i.answer) for i in load_benchmark(str(js))] == [("x", "3")]
    js.write_text(json.dumps({"question": "1+2?", "answer": "3"}))
    with pytest.raises(ValueError, match="a .json benchmark is a list of objects"):
        load_benchmark(str(js))


def test_hugging_face_datasets_folder_offline_id_and_missing_extra(tmp_path, monkeypatch):
    """`datasets` (the extra) loads a local dataset folder; a dataset id offline is one clear error; without the
    package the error names the extra."""
    import sys

    folder = tmp_path / "aime_like"
    folder.mkdir()
    (folder / "test.jsonl").write_text("".join(json.dumps({"id": f"p{i}", "problem": f"{i}+1?", "answer": str(i + 1)})
                                               + "\n" for i in range(3)))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    items = load_benchmark(str(folder))
    assert [(i.id, i.question, i.answer) for i in items] == [("p0", "0+1?", "1"), ("p1", "1+1?", "2"),
                                                             ("p2", "2+1?", "3")]
    import datasets
    import huggingface_hub.constants as hub

    for module, name in [(hub, "HF_HUB_OFFLINE"), (datasets.config, "HF_HUB_OFFLINE"),
                         (datasets.config, "HF_DATASETS_OFFLINE")]:    # read at import time: patch the constants
        monkeypatch.setattr(module, name, True)
    with pytest.raises(ValueError) as e:
        load_benchmark("openzaya-test/no-such-dataset")
    msg = str(e.value)
    assert msg.startswith("could not load the Hugging Face dataset 'openzaya-test/no-such-dataset' (split 'test'): ")
    assert "\n" not in msg and "offline?" in msg and "HF_DATASETS_OFFLINE=1" in msg
    monkeypatch.setitem(sys.modules, "datasets", None)       # as if the extra were not installed
    with pytest.raises(ValueError, match=r"needs `pip install 'openzaya\[datasets\]'`"):
        load_benchmark("openzaya-test/no-such-dataset")


# ---------------------------------------------------------------------------------------------------------------------
# maj@k by mathematical equivalence, standard errors, lm-eval's layout


def test_maj_at_k_votes_by_mathematical_equivalence():
    answers = ["0.25", "0.25", "1/2", "0.5", "\\frac{1}{2}", None]
    correct = [0, 0, 1, 1, 1, 0]
    keys = math_vote_keys(answers)
    assert keys[2] == keys[3] == keys[4] == "1/2" and keys[0] == keys[1] == "0.25" and keys[5] is None
    assert maj_at_k(answers, correct) == 0.0                    # by string: 0.25 has the most votes (2)
    assert maj_at_k(answers, correct, vote_keys=keys) == 1.0     # by value: 1/2 = 0.5 = \frac{1}{2} (3 votes)
    assert math_vote_keys(["7", "7.0", "8", " 8 "]) == ["7", "7", "8", "8"]


class Fixed(Backend):
    """Problem "a" is answered right in runs 0 and 2 only, "b" always wrong: per-problem avg@4 = 0.5 and 0."""

    def __init__(self):
        self.calls = {}

    def generate(self, requests):
        out = []
        for r in requests:
            q = r.messages[0]["content"]
            i = self.calls[q] = self.calls.get(q, -1) + 1
            ans = "1/2" if q.startswith("a") and i % 2 == 0 else "0.25"
            text = f"<think>\nok\n</think>\n\n\\boxed{{{ans}}}"
            reasoning, answer = split_reasoning(text)
            out.append([Completion(text, reasoning, answer, "stop", 5, 7, 0.0)])
        return out


def test_eval_standard_errors_and_lm_eval_layout(tmp_path):
    items = [Item("a", "a: half of one?", "0.5"), Item("b", "b: half of one?", "0.5")]
    res = evaluate(items, Fixed(), TTCConfig(budget_tokens=16), ["single"], samples=4, out_dir=tmp_path,
                   task="halves", run_config={"model": "fixed", "benchmark": "halves.jsonl"})
    r = res["methods"]["single"]
    assert r["avg@k"] == 0.25 and r["stderr"]["avg@k"] == pytest.approx(mean_se([0.5, 0.0])) == 0.25
    assert r["maj@k"] == 0.5          # a: "1/2" and "0.25" twice each, the tie goes to the earliest (right); b: 0
    [results] = tmp_path.glob("results_*.json")
    doc = json.loads(results.read_text())
    assert doc["results"]["halves_single"]["avg@4,none"] == 0.25
    assert doc["results"]["halves_single"]["avg@4_stderr,none"] == pytest.approx(0.25)
    assert doc["results"]["halves_single"]["pass@4,none"] == 0.5
    assert doc["configs"]["halves_single"]["generation_kwargs"]["max_gen_toks"] == 16
    assert doc["configs"]["halves_single"]["dataset_path"] == "halves.jsonl" and doc["config"]["model"] == "fixed"
    assert doc["n-samples"]["halves_single"] == {"original": 2, "effective": 2} and doc["config"]["repeats"] == 4
    [samples] = tmp_path.glob("samples_halves_single_*.jsonl")
    rows = [json.loads(x) for x in samples.read_text().splitlines()]
    assert [r["doc_id"] for r in rows] == [0, 1] and rows[0]["doc"]["question"] == "a: half of one?"
    assert rows[0]["target"] == "0.5" and rows[0]["filtered_resps"] == ["1/2", "0.25", "1/2", "0.25"]
    assert rows[0]["resps"][0][0].endswith("\\boxed{1/2}") and rows[0]["avg@4"] == 0.5 and rows[1]["avg@4"] == 0.0
    assert "0.250 ± 0.250" in (tmp_path / "report.md").read_text()


# ---------------------------------------------------------------------------------------------------------------------
# TTC defaults fitted to the model's context; validation of the knobs a method uses


@pytest.fixture(scope="module")
def short_context(tmp_path_factory):
    """A tiny checkpoint whose context is 1024 positions (the TTC defaults, tau 4096 / beta 16384, do not fit)."""
    from openzaya.checkpoint import save_pretrained
    from openzaya.model import ZayaForCausalLM
    from openzaya.tokenizer import train_bpe
    from zaya_ref import tiny_config

    path = tmp_path_factory.mktemp("ctx") / "m"
    tok = train_bpe([f"{a} plus {b} is {a + b}." for a in range(30) for b in range(30)], vocab_size=300)
    torch.manual_seed(0)
    save_pretrained(ZayaForCausalLM(tiny_config(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                                                eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                                                max_position_embeddings=1024)), path)
    tok.save(path)
    return path


class Counting(Backend):
    """A backend that counts generate calls and otherwise defers to `inner`."""

    def __init__(self, inner):
        self.inner, self.tokenizer, self.calls = inner, inner.tokenizer, 0

    def generate(self, requests):
        self.calls += 1
        return self.inner.generate(requests)

    def context_tokens(self):
        return self.inner.context_tokens()


def test_default_budget_is_clamped_to_the_context(short_context, capsys):
    from openzaya.cli import main
    from openzaya.evaluate import context_need

    backend = LocalBackend(short_context, max_slots=4)
    assert backend.context_tokens() == 1024
    q = "What is 2 plus 3?"
    base = TTCConfig(population=2, candidates=2, rounds=1)
    cfg, notes = fit_to_context(base, ["markovian_rsa"], backend, [q])
    assert context_need(cfg, backend, q) <= 1024 < context_need(
        TTCConfig(population=2, candidates=2, rounds=1, budget_tokens=cfg.budget_tokens + 1,
                  tail_tokens=(cfg.budget_tokens + 1) * 4096 // 16384), backend, q)   # the largest beta that fits
    assert cfg.tail_tokens == cfg.budget_tokens * 4096 // 16384                    # tau keeps its ratio to beta
    assert notes == [f"the default TTC budget does not fit this model's context of 1024 tokens: using "
                     f"--budget-tokens 16384 -> {cfg.budget_tokens}, --tail-tokens 4096 -> {cfg.tail_tokens} (give "
                     "the flags to choose other values)"]
    # the CLI with the defaults: the note, then the whole run (it used to fail in round 1, after round 0's work)
    threads = torch.get_num_threads()
    try:
        assert main(["solve", q, "--model", str(short_context), "--population", "2", "--candidates", "2",
                     "--rounds", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr()
    assert f"openzaya solve: note: {notes[0]}" in out.err and "total: calls 4 |" in out.out


def test_given_budget_that_does_not_fit_fails_before_any_call(short_context, capsys):
    from openzaya.cli import main

    backend = Counting(LocalBackend(short_context, max_slots=4))
    cfg = TTCConfig(population=2, candidates=2, rounds=1, budget_tokens=800, tail_tokens=200)
    with pytest.raises(ValueError, match=r"markovian_rsa: the longest call needs ~\d+ tokens \(prompt \+ "
                                         r"--budget-tokens 800\), over this model's context of 1024: lower "
                                         r"--budget-tokens, --tail-tokens or --candidates \(e.g. --budget-tokens \d+ "
                                         r"--tail-tokens \d+ fit\)"):
        fit_to_context(cfg, ["markovian_rsa"], backend, ["What is 2 plus 3?"], {"budget_tokens", "tail_tokens"})
    assert backend.calls == 0
    rc = main(["solve", "What is 2 plus 3?", "--model", str(short_context), "--population", "2", "--candidates", "2",
               "--rounds", "1", "--budget-tokens", "800", "--tail-tokens", "200"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("openzaya solve: error: markovian_rsa: the longest call")
    # a server that does not report its context is not checked, and says so
    from openzaya.backends import OpenAIBackend
    from openai_stub_server import StubServer

    with StubServer() as server:
        same, notes = fit_to_context(cfg, ["markovian_rsa"], OpenAIBackend(server.url, "stub"), ["q"])
    assert same is cfg and "did not report its context length" in notes[0]


def test_methods_are_validated_on_the_knobs_they_use(short_context, capsys):
    """`--method single --budget-tokens 48` (tau 4096 > beta is RSA's concern) and `--method majority --population
    2` (C 4 > N is RSA's concern) are valid requests."""
    from openzaya.cli import main

    threads = torch.get_num_threads()
    try:
        assert main(["solve", "What is 2 plus 3?", "--model", str(short_context), "--method", "single",
                     "--budget-tokens", "48"]) == 0
        assert "total: calls 1 |" in capsys.readouterr().out
        assert main(["solve", "What is 2 plus 3?", "--model", str(short_context), "--method", "majority",
                     "--population", "2", "--budget-tokens", "16"]) == 0
        assert "total: calls 2 |" in capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)
    rc = main(["solve", "q", "--model", str(short_context), "--method", "markovian_rsa", "--population", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and "--candidates C=4 exceeds --population N=2" in err    # RSA does use C


# ---------------------------------------------------------------------------------------------------------------------
# the run path against hand values (issue 28: the evaluate_run mutation target, bench/mutation.py)


class NoTokenizer(Backend):
    """No tokenizer, a fixed context: counts are ceil(len / 4), the chat template allowance is 16 tokens."""

    def __init__(self, ctx):
        self.ctx = ctx

    def context_tokens(self):
        return self.ctx

    def generate(self, requests):
        raise AssertionError("fitting to the context makes no calls")


# Question lengths 2, 40 and 8 characters: the longest (10 tokens) is not the lexicographic maximum ("zz").
QUESTIONS = ["zz", "x" * 40, "a" * 8]
APPROX = "; token counts approximated at 4 characters per token, --tokenizer makes them exact"


def _fit(ctx, methods, base, given=frozenset()):
    try:
        cfg, notes = fit_to_context(base, methods, NoTokenizer(ctx), QUESTIONS, given)
    except ValueError as e:
        return str(e)
    return cfg.budget_tokens, cfg.tail_tokens, notes


def test_fit_to_context_hand_values():
    """Markovian RSA's longest call for the 10-token question with C = 2: 10 + 2 tau + |template| (111 tokens for
    C = 2 at 4 characters per token) + 16 (template allowance) + beta; single's: 10 + 16 + beta."""
    from openzaya.ttc import Run

    rsa = dict(population=2, candidates=2, rounds=1)
    assert Run(NoTokenizer(1), TTCConfig(**rsa)).template_tokens() == 111
    single = TTCConfig(method="single", budget_tokens=100)
    assert _fit(126, ["single"], single) == (100, 4096, [])                 # needs exactly the context: fits
    assert _fit(125, ["single"], single, {"budget_tokens"}) == (
        "single: the longest call needs ~126 tokens (prompt + --budget-tokens 100), over this model's context of "
        "125: lower --budget-tokens (e.g. --budget-tokens 99 fit)")
    note = "the default TTC budget does not fit this model's context of {} tokens: using {} (give the flags to " \
           "choose other values" + APPROX + ")"
    # both free, tau = beta // 4: 137 + beta + 2 (beta // 4) <= 200 -> beta 43 (= 200 exactly), tau 10
    assert _fit(200, ["markovian_rsa"], TTCConfig(**rsa, tail_tokens=40, budget_tokens=160)) == (
        43, 10, [note.format(200, "--budget-tokens 160 -> 43, --tail-tokens 40 -> 10")])
    # tau 1 stays 1 (40 x beta // 160 = 0 -> 1) and is not reported: 139 + beta <= 150 -> beta 11
    assert _fit(150, ["markovian_rsa"], TTCConfig(**rsa, tail_tokens=1, budget_tokens=160)) == (
        11, 1, [note.format(150, "--budget-tokens 160 -> 11")])
    # beta given: only tau moves, 237 + 2 tau <= 239 -> tau 1; at 238 nothing fits with beta 100, but beta 57 and
    # tau 22 (40 / 100 of it) would: 137 + 57 + 44 = 238
    base = TTCConfig(**rsa, tail_tokens=40, budget_tokens=100)
    assert _fit(239, ["markovian_rsa"], base, {"budget_tokens"}) == (100, 1, [note.format(239, "--tail-tokens 40 -> 1")])
    assert _fit(238, ["markovian_rsa"], base, {"budget_tokens"}) == (
        "markovian_rsa: the longest call needs ~317 tokens (prompt + --budget-tokens 100), over this model's context "
        "of 238: lower --budget-tokens, --tail-tokens or --candidates (e.g. --budget-tokens 57 --tail-tokens 22 fit)")
    # tau 300 given: beta alone moves, 737 + beta <= 1237 -> 500 (the search passes through beta < tau on the way)
    given_tau = TTCConfig(**rsa, tail_tokens=300)
    assert _fit(1237, ["markovian_rsa"], given_tau, {"tail_tokens"}) == (
        500, 300, [note.format(1237, "--budget-tokens 16384 -> 500")])
    # at 937 the largest fitting beta (266) is below the given tau: no valid config with tau 300; both free would fit
    # beta 772 and tau 14 (300 / 16384 of it): 137 + 772 + 28 = 937. Two methods: both named.
    assert _fit(937, ["single", "markovian_rsa"], given_tau, {"tail_tokens"}) == (
        "single, markovian_rsa: the longest call needs ~17121 tokens (prompt + --budget-tokens 16384), over this "
        "model's context of 937: lower --budget-tokens, --tail-tokens or --candidates (e.g. --budget-tokens 772 "
        "--tail-tokens 14 fit)")
    # nothing fits at all (the question and the template alone exceed 20), nothing given: no example values
    assert _fit(20, ["markovian_rsa"], TTCConfig(**rsa)) == (
        "markovian_rsa: the longest call needs ~24713 tokens (prompt + --budget-tokens 16384), over this model's "
        "context of 20: lower --budget-tokens, --tail-tokens or --candidates")
    assert _fit(None, ["markovian_rsa"], base) == (100, 40, [
        "the backend did not report its context length (vLLM, SGLang and openzaya serve report max_model_len in "
        "/v1/models): prompt + budget not checked"])


class FakeTokenizer:
    """encode gives 2 ids for any text; the chat template (when set) 5 ids."""

    def __init__(self, chat_template):
        if chat_template is not ...:
            self.chat_template = chat_template

    def encode(self, text, add_special_tokens=True):
        return [1, 2]

    def apply_chat_template(self, messages, **kw):
        return [1, 2, 3, 4, 5]


def test_template_overhead_context_need_and_for_method():
    from openzaya.evaluate import _template_overhead, context_need, for_method

    backend = NoTokenizer(None)
    assert _template_overhead(backend) == 16
    for template, overhead in ((None, 2), (..., 2), ("{{ messages }}", 5)):     # none, no attribute, a template
        backend.tokenizer = FakeTokenizer(template)
        assert _template_overhead(backend) == overhead, template
    backend = NoTokenizer(None)
    q = "x" * 40                                                       # 10 tokens
    assert context_need(TTCConfig(method="single", budget_tokens=100), backend, q) == 10 + 16 + 100
    assert context_need(TTCConfig(population=2, candidates=2, rounds=1, tail_tokens=40, budget_tokens=160),
                        backend, q) == 10 + 2 * 40 + 111 + 16 + 160
    # knobs a method does not read are made consistent (C <= N, tau <= beta, at least 1); those it reads are kept
    assert for_method(TTCConfig(method="single", population=1, candidates=4, tail_tokens=4096, budget_tokens=1)) == \
        TTCConfig(method="single", population=1, candidates=1, tail_tokens=1, budget_tokens=1)
    rsa = TTCConfig(population=2, candidates=4, tail_tokens=64, budget_tokens=32)
    assert for_method(rsa) == rsa
    assert for_method(replace(rsa, method="other")) == replace(rsa, method="other")   # unknown: RSA's knobs


def test_benchmark_names_suites_and_rows(tmp_path):
    from openzaya.envs.registry import get_env
    from openzaya.evaluate import benchmark_name, env_suite, read_rows, rows_to_items

    assert [benchmark_name(s) for s in ("envs:easy", "data/aime.jsonl", "x/b.parquet", "org/name", "a:b/c:d")] == \
        ["envs_easy", "aime", "b", "org__name", "a_b__c_d"]
    assert env_suite([("gcd", 0), ("lcm", 1)]) == [("gcd", 0, 10_000), ("lcm", 1, 10_000)]
    assert env_suite([("gcd", 2)], seeds_per_env=2) == [("gcd", 2, 10_000), ("gcd", 2, 10_001)]
    items = load_benchmark("envs:tiny", limit=2)
    assert [it.id for it in items] == ["long_addition-d0-s10000", "gcd-d0-s10000"]
    assert [it.question for it in items] == [get_env("long_addition").generate(0, 10_000).prompt,
                                             get_env("gcd").generate(0, 10_000).prompt]
    with pytest.raises(ValueError, match=r"^unknown suite 'envs:nope'; built-in suites: envs:tiny, envs:easy, "
                                         r"envs:nano$"):
        load_benchmark("envs:nope")
    with pytest.raises(ValueError, match=r"^'missing.jsonl' is neither a suite \(envs:tiny, envs:easy, envs:nano\) "
                                         r"nor an existing file: no such file$"):
        read_rows("missing.jsonl")
    # default field names; a missing id is the row's index
    got = rows_to_items([{"problem": "p?", "answer": 1}, {"question": "q?", "answer": "2", "id": "a/b"}], "src")
    assert [(i.id, i.question, i.answer) for i in got] == [("0", "p?", "1"), ("a_b", "q?", "2")]
    for rows, kw, msg in [
            ([{"problem": "p?", "answer": 1}], {"question_field": "q"}, "src row 0: no question field (q); fields: "
                                                                        "['answer', 'problem']"),
            ([{"text": "p?", "answer": 1}], {}, "src row 0: no question field (problem/question); fields: "
                                                "['answer', 'text']"),
            ([{"problem": "p?", "gold": 1}], {}, "src row 0: no answer field 'answer'; fields: ['gold', 'problem']"),
            ([{"problem": "p?", "answer": 1, "id": "x"}] * 2, {}, "src: duplicate ids")]:
        with pytest.raises(ValueError) as e:
            rows_to_items(rows, "src", **kw)
        assert str(e.value) == msg
    f = tmp_path / "b.jsonl"
    f.write_text(json.dumps({"problem": "p?"}) + "\n")
    with pytest.raises(ValueError) as e:
        load_benchmark(str(f))
    assert str(e.value) == f"{f} row 0: no answer field 'answer'; fields: ['problem']"      # names the file


def test_benchmark_file_errors_name_the_file_and_the_formats(tmp_path, monkeypatch):
    formats = (".jsonl (one JSON object per line), .json (a JSON list of objects), .parquet (needs pyarrow), a suite "
               "(envs:tiny, envs:easy, envs:nano) or a Hugging Face dataset")
    for name, suffix in (("b.csv", "'.csv'"), ("bench", "'(no suffix)'")):
        (tmp_path / name).write_text("problem,answer\n")
        with pytest.raises(ValueError) as e:
            load_benchmark(str(tmp_path / name))
        assert str(e.value) == f"{tmp_path / name}: unsupported benchmark format {suffix}; supported: {formats}"
    js = tmp_path / "b.json"
    js.write_text('[{"problem": "1+2?", "answer": "3"},\n oops]')
    with pytest.raises(ValueError) as e:
        load_benchmark(str(js))
    assert str(e.value) == f"{js} line 2: not valid JSON (Expecting value, column 2)"
    js.write_text('[{"problem": "1+2?", "answer": "3"}, 4]')
    with pytest.raises(ValueError, match=r"a .json benchmark is a list of objects; for one object per line use "
                                         r"\.jsonl$"):
        load_benchmark(str(js))
    pq = tmp_path / "b.parquet"
    pq.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)       # as if pyarrow were not installed
    with pytest.raises(ImportError) as e:
        load_benchmark(str(pq))
    assert str(e.value) == f"{pq}: reading Parquet needs pyarrow (pip install pyarrow), or convert it to JSONL"


def test_read_rows_default_split_and_load_benchmark_split(tmp_path, monkeypatch):
    """A local dataset folder with two splits: read_rows reads "test" by default, load_benchmark the split it is
    given (through `datasets`)."""
    from openzaya.evaluate import read_rows

    folder = tmp_path / "two_splits"
    folder.mkdir()
    for split in ("train", "test"):
        (folder / f"{split}.jsonl").write_text(json.dumps({"id": split, "problem": f"{split}?", "answer": "1"}) + "\n")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    assert [r["id"] for r in read_rows(str(folder))] == ["test"]
    assert [i.id for i in load_benchmark(str(folder), split="train")] == ["train"]


class ByRun(Backend):
    """Answers by problem and run only (the call key is "<problem>~s<run>/r<round>/i<index>"): ANSWERS[run], or
    "7" for problems whose id starts with "seven"."""

    ANSWERS = ["0.5", "1/2", "0.25", "0.25"]

    def generate(self, requests):
        out = []
        for r in requests:
            problem, run = r.id.split("/")[0].rsplit("~s", 1)
            ans = "7" if problem.startswith("seven") else self.ANSWERS[int(run)]
            text = f"<think>\nrun {run}\n</think>\n\n\\boxed{{{ans}}}"
            reasoning, answer = split_reasoning(text)
            out.append([Completion(text, reasoning, answer, "stop", 3, 4, 0.0)])
        return out


def test_evaluate_votes_math_items_by_value_and_env_items_by_string():
    """Runs answer 0.5, 1/2, 0.25, 0.25. Math-scored (gold 0.5): 0.5 and 1/2 vote together, 2 against 2, the earliest
    group wins: right. Scored by an exact-string check: 0.25 wins 2 to 1 to 1: wrong."""
    from openzaya.envs.base import extract_answer

    items = [Item("math", "half?", "0.5"), Item("env", "half?", "0.5", score=lambda r: float(extract_answer(r) == "0.5"))]
    res = evaluate(items, ByRun(), TTCConfig(budget_tokens=16), ["single"], samples=4)
    rows = {p["id"]: p["methods"]["single"] for p in res["problems"]}
    assert (rows["math"]["avg@k"], rows["math"]["maj@k"]) == (0.5, 1.0)
    assert (rows["env"]["avg@k"], rows["env"]["maj@k"]) == (0.25, 0.0)


def test_evaluate_rows_judge_progress_and_code_items(tmp_path, capsys, monkeypatch):
    """The judge gets the method and the runs (an item id may hold "~s"), its "extra" lands in the rows; per-problem
    tokens / calls / wall time / rounds are the runs' means; a code item is not scored by the runs (its judge does);
    the progress bar counts calls and follows the terminal's width; the lm-eval files are named after the default
    task "benchmark"."""
    import tqdm

    from openzaya.evaluate import judge_answers

    bars = []

    class Bar(tqdm.tqdm):
        def __init__(self, *args, **kwargs):
            bars.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(tqdm, "tqdm", Bar)
    seen = []

    def judge(method, items, runs_by_item):
        seen.append((method, runs_by_item))
        return [j | {"extra": {"note": it.id}} for it, j in zip(items, judge_answers(method, items, runs_by_item))]

    items = [Item("seven~s1", "What is 3 + 4?", "7", score=lambda r: float("{7}" in r)),
             Item("seven code", "Print 7.", "7", code=object())]
    res = evaluate(items, ByRun(), TTCConfig(budget_tokens=16), ["single"], samples=2, out_dir=tmp_path, judge=judge)
    err = capsys.readouterr().err
    assert "single: 100%" in err and "| 4/4 [" in err and "call/s]" in err
    assert [bar.get("dynamic_ncols") for bar in bars] == [True]
    assert set(res) == {"benchmark_size", "samples", "methods", "problems", "wall_s"} and 0 <= res["wall_s"] < 300
    [(method, runs_by_item)] = seen
    assert method == "single" and sorted(runs_by_item) == ["seven code", "seven~s1"]
    runs = runs_by_item["seven~s1"]
    assert [r.id for r in runs] == ["seven~s1~s0", "seven~s1~s1"] and [r.majority_correct for r in runs] == [1.0, 1.0]
    assert [(r.majority_correct, r.population_mean, r.rewards) for r in runs_by_item["seven code"]] == [(None, None, None)] * 2
    row = res["problems"][0]["methods"]["single"]
    assert sorted(row) == sorted(["avg@k", "pass@1", "pass@2", "maj@k", "pop_mean", "answers", "note", "tokens",
                                  "completion_tokens", "calls", "wall_s", "rounds"])
    assert row["note"] == "seven~s1" and row["avg@k"] == 1.0 and row["answers"] == ["7", "7"]
    assert (row["tokens"], row["completion_tokens"], row["calls"]) == (7.0, 4.0, 1.0)
    assert row["wall_s"] == sum(r.wall_s for r in runs) / 2 and row["wall_s"] > 0
    assert row["rounds"] == [[asdict(x) for x in r.rounds] for r in runs]
    assert len(list(tmp_path.glob("samples_benchmark_single_*.jsonl"))) == 1
    with pytest.raises(ValueError, match="^empty benchmark$"):
        evaluate([], ByRun(), TTCConfig(budget_tokens=16), ["single"])


def test_judge_answers_and_winner_texts():
    """Each run's majority answer, its correctness (None -> 0), vote keys by value for math-scored items only, the
    final-population mean and the winner's text (the first final text when no candidate holds the majority answer,
    "" when there are none)."""
    from types import SimpleNamespace as Run

    from openzaya.evaluate import judge_answers

    runs = [Run(answer="1/2", majority_correct=1.0, population_mean=0.5, winner_index=1, final_texts=["a", "b"]),
            Run(answer="0.5", majority_correct=None, population_mean=None, winner_index=None, final_texts=["c", "d"]),
            Run(answer=None, majority_correct=0.0, population_mean=0.25, winner_index=None, final_texts=[])]
    items = [Item("m", "q", "0.5"), Item("e", "q", "0.5", score=lambda r: 0.0)]
    got = judge_answers("single", items, {"m": runs, "e": runs})
    same = {"correct": [1.0, 0.0, 0.0], "answers": ["1/2", "0.5", None], "pop": [0.5, 0.0, 0.25],
            "texts": ["b", "c", ""]}
    assert got == [same | {"keys": ["1/2", "1/2", None]}, same | {"keys": None}]


def _hand_results():
    """A results dict as evaluate() returns it: k = 2 runs, two problems, single / rsa / markovian_rsa."""
    def method(cfg, values, ses, tokens, completion, calls, wall, aggregation=None):
        keys = ("avg@k", "pass@1", "pass@2", "maj@k", "pop_mean")
        return {"config": asdict(cfg), **dict(zip(keys, values)), "stderr": dict(zip(keys, ses)),
                "tokens_per_problem": tokens, "completion_tokens_per_problem": completion, "calls_per_problem": calls,
                "wall_s_per_problem": wall, "totals": {"calls": 2 * 2 * calls},
                **({"aggregation": aggregation} if aggregation else {})}

    def row(avg, pop, tokens, completion, answers, **extra):
        return {"avg@k": avg, "pass@1": avg, "pass@2": 1.0, "maj@k": 1.0, "pop_mean": pop, "answers": answers,
                "tokens": tokens, "completion_tokens": completion, "calls": 1.0, "wall_s": 0.5, "rounds": [],
                **extra}

    return {"benchmark_size": 2, "samples": 2, "wall_s": 12.5, "methods": {
        "single": method(TTCConfig(method="single", population=1, candidates=1, rounds=0, tail_tokens=8,
                                   budget_tokens=16, temperature=0.6, top_p=0.95),
                         (0.5, 0.25, 0.75, 0.5, 0.125), (0.5, 0.25, 0.25, 0.5, 0.125), 30.4, 20.6, 1.0, 0.123),
        "rsa": method(TTCConfig(method="rsa", population=4, candidates=2, rounds=1, tail_tokens=8, budget_tokens=16),
                      (1.0, 0.75, 1.0, 1.0, 0.625), (0.0, 0.25, 0.0, 0.0, 0.125), 240.0, 160.0, 8.0, 2.5,
                      {"calls": 3, "accuracy": 1 / 3, "random_copy": 1 / 6, "copy_rate": 2 / 3,
                       "keeps_agreeing_answer": None, "agreeing_calls": 0,
                       "by_correct_shown": {0: {"calls": 2, "accuracy": 0.0}, 1: {"calls": 1, "accuracy": 1.0}}}),
        "markovian_rsa": method(TTCConfig(population=3, candidates=2, rounds=2, tail_tokens=4, budget_tokens=32),
                                (0.0, 0.0, 0.0, 0.0, 0.0), (0.0, 0.0, 0.0, 0.0, 0.0), 99.5, 88.5, 9.0, 10.0,
                                {"calls": 4, "accuracy": 0.75, "random_copy": 0.5, "copy_rate": 1.0,
                                 "keeps_agreeing_answer": 0.5, "agreeing_calls": 2,
                                 "by_correct_shown": {2: {"calls": 4, "accuracy": 0.75}}})},
        "problems": [
            {"id": "p1", "answer": "a gold answer longer than twenty chars", "methods": {
                "single": row(0.5, 0.25, 30, 20, ["x|y", "abcdefghijklmnopq"]),
                "rsa": row(1.0, 0.75, 240, 160, ["7", "7"]),
                "markovian_rsa": row(0.0, 0.0, 99, 88, [None, "8"], code={"verdicts": ["WA", "RE"]})}},
            {"id": "p2", "answer": 7, "methods": {
                "single": row(0.5, 0.0, 30.8, 21.2, ["7", None]),
                "rsa": row(1.0, 0.5, 240, 160, ["7", "7"]),
                "markovian_rsa": row(0.0, 0.0, 100, 89, ["6", "6"])}}]}


def test_write_report_exact_text_json_and_plot(tmp_path, monkeypatch):
    """report.md line by line, results.json as written, and the plot's content: per method the problems (avg@k,
    jittered by 0.01 per method) and the mean as a star, labels, limits, size (600 x 400 at dpi 100, whatever the
    default dpi)."""
    import matplotlib
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import to_rgba
    from matplotlib.figure import Figure
    from matplotlib.markers import MarkerStyle

    from openzaya.evaluate import write_report

    saved = []
    savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **kw: (saved.append(fig), savefig(fig, *a, **kw))[1])
    results = _hand_results()
    with matplotlib.rc_context({"figure.dpi": 50}):
        write_report(results, tmp_path)
    assert (tmp_path / "results.json").read_text() == json.dumps(results, indent=1)
    acc = "0.000 ± 0.000 | " * 5
    assert (tmp_path / "report.md").read_text().split("\n") == [
        "# Evaluation (2 problems, k=2 runs per problem and method)", "",
        "avg@k = mean correctness of each run's final answer (majority of its final population; for `single` the "
        "sample itself). pop_mean = mean correctness over the final population (the ZAYA1 TR's TTC number). TTC rows "
        "are not single-sample avg@k. ± is the standard error over problems.", "",
        "| method | N | C | T | tau | beta | avg@k | pass@1 | pass@2 | maj@k | pop_mean | tokens/problem | completion "
        "tokens/problem | calls/problem | wall s/problem |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        "| single | 1 | - | - | - | 16 | 0.500 ± 0.500 | 0.250 ± 0.250 | 0.750 ± 0.250 | 0.500 ± 0.500 | 0.125 ± 0.125 "
        "| 30 | 21 | 1 | 0.12 |",
        "| rsa | 4 | 2 | 1 | 8 | 16 | 1.000 ± 0.000 | 0.750 ± 0.250 | 1.000 ± 0.000 | 1.000 ± 0.000 | 0.625 ± 0.125 "
        "| 240 | 160 | 8 | 2.50 |",
        f"| markovian_rsa | 3 | 2 | 2 | 4 | 32 | {acc}100 | 88 | 9 | 10.00 |", "",
        "### rsa: aggregation calls (3)", "",
        "Accuracy 0.333 vs 0.167 for copying a random shown candidate; answer is one of the shown answers in 0.67 of "
        "the calls; keeps the answer of agreeing candidates in - of 0 calls.", "",
        "| correct candidates shown | calls | aggregator accuracy |", "|---|---|---|",
        "| 0 | 2 | 0.000 |", "| 1 | 1 | 1.000 |", "",
        "### markovian_rsa: aggregation calls (4)", "",
        "Accuracy 0.750 vs 0.500 for copying a random shown candidate; answer is one of the shown answers in 1.00 of "
        "the calls; keeps the answer of agreeing candidates in 0.50 of 2 calls.", "",
        "| correct candidates shown | calls | aggregator accuracy |", "|---|---|---|",
        "| 2 | 4 | 0.750 |", "",
        "## Per problem", "",
        "| problem | gold | single avg@k / pop / tokens / answers | rsa avg@k / pop / tokens / answers | markovian_rsa "
        "avg@k / pop / tokens / answers |",
        "|---|---|---|---|---|",
        "| p1 | a gold answer longer | 0.50 / 0.25 / 30 / x\\|y, abcdefghijkl | 1.00 / 0.75 / 240 / 7, 7 | "
        "0.00 / 0.00 / 99 / None, 8 |",
        "| p2 | 7 | 0.50 / 0.00 / 31 / 7, None | 1.00 / 0.50 / 240 / 7, 7 | 0.00 / 0.00 / 100 / 6, 6 |", "",
        "![accuracy vs tokens](accuracy_vs_tokens.png)", ""]
    [fig] = saved
    assert not plt.fignum_exists(fig.number)                                      # closed
    assert (tmp_path / "accuracy_vs_tokens.png").read_bytes()[16:24] == (600).to_bytes(4, "big") + (400).to_bytes(4, "big")
    [ax] = fig.axes
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == (
        "completion tokens per problem (mean over runs)", "accuracy (avg@k)", "accuracy vs tokens spent")
    assert ax.get_ylim() == (-0.1, 1.1)
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == [f"{m} ({w})" for m in ("single", "rsa", "markovian_rsa")
                                                          for w in ("problems", "mean")]
    assert all(t.get_fontsize() == 7 for t in legend.get_texts())
    star = MarkerStyle("*")
    star = star.get_path().transformed(star.get_transform()).vertices
    problems = {"single": ([20, 21.2], [0.5, 0.5]), "rsa": ([160, 160], [1.0, 1.0]), "markovian_rsa": ([88, 89], [0, 0])}
    for i, (m, coll, mean) in enumerate(zip(problems, ax.collections[::2], ax.collections[1::2])):
        xs, ys = problems[m]
        assert np.array_equal(coll.get_offsets(), np.array([xs, [y + (i - 1.5) * 0.01 for y in ys]]).T), m
        assert list(coll.get_sizes()) == [14] and coll.get_alpha() == 0.5
        assert np.array_equal(coll.get_facecolor()[0], to_rgba(f"C{i}", 0.5))
        r = results["methods"][m]
        assert np.array_equal(mean.get_offsets(), [[r["completion_tokens_per_problem"], r["avg@k"]]]), m
        assert list(mean.get_sizes()) == [120] and mean.get_alpha() is None
        assert np.array_equal(mean.get_facecolor()[0], to_rgba(f"C{i}"))
        assert np.array_equal(mean.get_edgecolor()[0], to_rgba("black"))
        assert np.allclose(mean.get_paths()[0].vertices, star)


def test_write_lm_eval_exact_files(tmp_path, monkeypatch):
    """lm-evaluation-harness's results_<date>.json and samples_<task>_<method>_<date>.jsonl, field by field, for the
    hand results above (the date fixed; no "benchmark" in the run config: dataset_path is the task)."""
    import datetime as dt
    import hashlib

    from openzaya.evaluate import write_lm_eval

    class Fixed(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 12, 6, 10, 20, 30)

    monkeypatch.setattr(dt, "datetime", Fixed)
    results = _hand_results()
    items = [Item("p1", "½ of 1?", "0.5"), Item("p2", "3 + 4?", "7")]
    responses = {m: [[f"{m} a", f"{m} b"], [f"{m} c", f"{m} d"]] for m in results["methods"]}
    res_path, sample_paths = write_lm_eval(results, items, responses, tmp_path, "t", {"model": "m", "backend": "x"})
    date = "2026-12-06T10-20-30"
    names = {m: f"t_{m}" for m in results["methods"]}
    assert res_path == tmp_path / f"results_{date}.json"
    assert sample_paths == [tmp_path / f"samples_{n}_{date}.jsonl" for n in names.values()]
    metrics = {"avg@k": "avg@2", "pass@1": "pass@1", "pass@2": "pass@2", "maj@k": "maj@2", "pop_mean": "pop_mean"}
    doc = {"results": {}, "configs": {}, "versions": {}, "n-shot": {}, "higher_is_better": {}, "n-samples": {},
           "config": {"model": "m", "backend": "x", "repeats": 2}, "date": date,
           "total_evaluation_time_seconds": "12.5"}
    for m, name in names.items():
        r = results["methods"][m]
        doc["results"][name] = {"alias": name, **{k: v for key, metric in metrics.items() for k, v in
                                                  ((f"{metric},none", r[key]), (f"{metric}_stderr,none",
                                                                                r["stderr"][key]))}}
        gen = {"temperature": r["config"]["temperature"], "top_p": r["config"]["top_p"],
               "max_gen_toks": r["config"]["budget_tokens"]}
        doc["configs"][name] = {"task": name, "dataset_path": "t", "output_type": "generate_until", "repeats": 2,
                                "num_fewshot": 0, "generation_kwargs": gen,
                                "metric_list": [{"metric": x, "higher_is_better": True} for x in metrics.values()],
                                "metadata": {"ttc": r["config"]}}
        doc["versions"][name], doc["n-shot"][name] = 1.0, 0
        doc["higher_is_better"][name] = {x: True for x in metrics.values()}
        doc["n-samples"][name] = {"original": 2, "effective": 2}
        lines = []
        for i, (it, prob) in enumerate(zip(items, results["problems"])):
            row = prob["methods"][m]
            lines.append(json.dumps({
                "doc_id": i, "doc": {"id": it.id, "question": it.question, "answer": it.answer}, "target": it.answer,
                "arguments": {"gen_args_0": {"arg_0": it.question, "arg_1": gen}},
                "resps": [[t] for t in responses[m][i]], "filtered_resps": row["answers"], "filter": "none",
                "metrics": list(metrics.values()), **{x: row[key] for key, x in metrics.items()},
                **({"code": row["code"]} if m == "markovian_rsa" and i == 0 else {}),
                "doc_hash": hashlib.sha256(f"{it.question}\n{it.answer}".encode()).hexdigest(),
                "prompt_hash": hashlib.sha256(it.question.encode()).hexdigest(),
                "target_hash": hashlib.sha256(it.answer.encode()).hexdigest()}, ensure_ascii=False))
        assert (tmp_path / f"samples_{name}_{date}.jsonl").read_text() == "\n".join(lines) + "\n", m
    assert "½ of 1?" in (tmp_path / f"samples_t_single_{date}.jsonl").read_text()
    assert res_path.read_text() == json.dumps(doc, indent=1)
    assert json.loads(res_path.read_text())["configs"]["t_single"]["generation_kwargs"] == {
        "temperature": 0.6, "top_p": 0.95, "max_gen_toks": 16}


def test_benchmark_files_are_read_as_utf8_whatever_the_locale(tmp_path):
    """.jsonl and .json files are UTF-8 even where the locale's encoding is ASCII (LC_CTYPE=C)."""
    import locale

    for name, text in (("b.jsonl", json.dumps({"problem": "½ of 1?", "answer": "0.5"}, ensure_ascii=False) + "\n"),
                       ("b.json", json.dumps([{"problem": "½ of 1?", "answer": "0.5"}], ensure_ascii=False))):
        (tmp_path / name).write_text(text, encoding="utf-8")
    old = locale.setlocale(locale.LC_CTYPE)
    locale.setlocale(locale.LC_CTYPE, "C")
    try:
        assert locale.getencoding() == "ANSI_X3.4-1968"          # the default encoding of open() is now ASCII
        questions = [load_benchmark(str(tmp_path / name))[0].question for name in ("b.jsonl", "b.json")]
    finally:
        locale.setlocale(locale.LC_CTYPE, old)
    assert questions == ["½ of 1?", "½ of 1?"]
