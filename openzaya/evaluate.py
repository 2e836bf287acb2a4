"""Evaluation: benchmarks, avg@k / unbiased pass@k / maj@k, TTC accuracy, cost, and a report with a plot.

Protocol (spec: shared/spec/evaluation.md §1, §4): each method runs `samples` = k independent times per problem (each
run of a TTC method is a whole population, so k runs of markovian_rsa make k x N x (T+1) calls). Per problem we
record, for every run, the final answer (majority over its final population; for `single` the one sample), whether
it is correct, and the final-population mean correctness (the number the ZAYA1 TR reports for Markovian RSA). Then:
- avg@k   mean correctness of the k run answers (for `single`: the usual avg@k = unbiased pass@1),
- pass@k  Chen et al. unbiased estimator 1 - C(n-c, k)/C(n, k) over the n = k runs (reported for k=1 and k=n),
- maj@k   the most frequent normalised answer among the k runs (ties: earliest; unparsable answers do not vote),
- pop_mean (TTC) mean over runs of the final-population mean correctness,
- tokens (prompt + completion, and completion alone) and wall time per problem, averaged over runs.
TTC numbers are labelled apart from single-sample avg@k in the report; decode tokens sit next to every accuracy.

Benchmarks:
- a local JSONL file (one object per line) or Parquet file (needs pyarrow; not a dependency) with a question field
  (`problem` or `question` by default), `answer` and `id` (field names configurable);
- a Hugging Face dataset name when the `datasets` package is installed and the machine is online (same fields);
- built-in suites from our own environments at fixed held-out seeds (10_000+), scored by the env's own `score`:
  `envs:tiny` (4 problems), `envs:easy` (16). Math files are scored by `openzaya.verify` (last \\boxed{} /
  <answer> after </think>, checked against the gold answer with math-verify).
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

from .envs.base import extract_answer, normalize
from .ttc import TTCConfig, TTCProblem, arun

# ---------------------------------------------------------------------------------------------------------------------
# metrics


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with n samples of which c are correct: 1 - C(n-c, k) / C(n, k), computed in
    the stable product form 1 - prod_{i=n-c+1}^{n} (1 - k/i)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def avg_at_k(correct: list[float]) -> float:
    """Mean correctness over the samples of one problem."""
    return sum(correct) / len(correct) if correct else 0.0


def maj_at_k(answers: list[str | None], correct: list[float], k: int | None = None, trials: int = 1000,
             seed: int = 0) -> float:
    """Correctness of the most frequent normalised answer among k samples (ties: earliest; None does not vote; no
    valid answer = wrong). k = len(answers) is exact; k < n is the expectation over random k-subsets (Monte Carlo)."""
    n = len(answers)
    k = n if k is None else k
    if not 1 <= k <= n:
        raise ValueError(f"maj@k needs 1 <= k <= n, got k={k} n={n}")

    def vote(idx):
        keys = [(normalize(answers[i]), i) for i in idx if answers[i] is not None and answers[i].strip()]
        if not keys:
            return 0.0
        counts = Counter(key for key, _ in keys)
        best = max(counts.values())
        return float(correct[next(i for key, i in keys if counts[key] == best)])

    if k == n:
        return vote(range(n))
    rng = random.Random(seed)
    return sum(vote(sorted(rng.sample(range(n), k))) for _ in range(trials)) / trials


# ---------------------------------------------------------------------------------------------------------------------
# benchmarks


@dataclass
class Item:
    id: str
    question: str
    answer: str
    score: Callable[[str], float] | None = None   # response -> correctness; None = math verifier


def env_suite(pairs: list[tuple[str, int]], seeds_per_env: int = 1) -> list[tuple[str, int, int]]:
    return [(env, diff, 10_000 + s) for env, diff in pairs for s in range(seeds_per_env)]


# (env, difficulty, seed): held-out seeds 10_000+, never used by training samplers (which draw from low seeds)
SUITES = {
    "envs:tiny": env_suite([("long_addition", 0), ("gcd", 0), ("linear_equation", 0), ("digit_sum", 0)]),
    "envs:easy": env_suite([("long_addition", 0), ("multi_step_arithmetic", 0), ("gcd", 0), ("lcm", 0),
                            ("linear_equation", 0), ("digit_sum", 0), ("modular_arithmetic", 0), ("factorial", 0)],
                           seeds_per_env=2),
    # the environments of the nano speedrun (easy levels), held-out seeds
    "envs:nano": env_suite([(e, d) for e in ("long_addition", "digit_sum", "reverse_string", "sort_letters",
                                             "palindrome_check", "boolean_expression", "count_vowels",
                                             "integer_power") for d in (0, 1)], seeds_per_env=2),
}


def math_scorer(gold: str) -> Callable[[str], float]:
    from .verify import check_math

    cache: dict[str, float] = {}

    def score(response: str) -> float:
        pred = extract_answer(response)
        if pred is None or not pred.strip():
            return 0.0
        if pred not in cache:
            cache[pred] = float(check_math(gold, pred).correct)
        return cache[pred]
    return score


def _rows_to_items(rows: list[dict], source: str, question_field: str | None, answer_field: str,
                   id_field: str) -> list[Item]:
    items = []
    for i, row in enumerate(rows):
        qf = question_field or next((f for f in ("problem", "question") if f in row), None)
        if qf is None or qf not in row:
            raise ValueError(f"{source} row {i}: no question field ({question_field or 'problem/question'}); "
                             f"fields: {sorted(row)}")
        if answer_field not in row:
            raise ValueError(f"{source} row {i}: no answer field {answer_field!r}; fields: {sorted(row)}")
        pid = str(row.get(id_field, i)).replace("/", "_")
        items.append(Item(id=pid, question=str(row[qf]), answer=str(row[answer_field])))
    return items


def load_benchmark(spec: str, question_field: str | None = None, answer_field: str = "answer", id_field: str = "id",
                   split: str = "test", limit: int | None = None) -> list[Item]:
    """Items of a suite name (envs:...), a local .jsonl/.parquet file, or a Hugging Face dataset name."""
    if spec in SUITES:
        from .envs.registry import get_env

        items = []
        for env_name, diff, seed in SUITES[spec]:
            env = get_env(env_name)
            prob = env.generate(diff, seed)
            items.append(Item(id=f"{env_name}-d{diff}-s{seed}", question=prob.prompt, answer=prob.answer,
                              score=lambda r, env=env, prob=prob: float(env.score(prob, r).accuracy)))
        return items[:limit]
    if spec.startswith("envs:"):
        raise ValueError(f"unknown suite {spec!r}; built-in suites: {', '.join(SUITES)}")
    path = Path(spec)
    if path.exists():
        if path.suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError as e:
                raise ImportError(f"{spec}: reading Parquet needs pyarrow (pip install pyarrow), or convert it to "
                                  f"JSONL") from e
            rows = pq.read_table(path).to_pylist()
        else:
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        try:
            import datasets
        except ImportError as e:
            raise ValueError(f"{spec!r} is neither a suite ({', '.join(SUITES)}) nor a local file, and loading it as "
                             f"a Hugging Face dataset needs `pip install datasets` and network access") from e
        rows = list(datasets.load_dataset(spec, split=split))
    items = _rows_to_items(rows, spec, question_field, answer_field, id_field)
    if len({it.id for it in items}) != len(items):
        raise ValueError(f"{spec}: duplicate ids")
    return items[:limit]


# ---------------------------------------------------------------------------------------------------------------------
# running methods over a benchmark


def method_config(base: TTCConfig, method: str, match_calls: bool = True) -> TTCConfig:
    """The config of one method at matched settings: majority gets N x (T+1) samples (as many calls as Markovian
    RSA makes) when match_calls, every method keeps beta, temperature and top-p."""
    cfg = replace(base, method=method)
    if method == "majority" and match_calls:
        cfg = replace(cfg, population=base.population * (base.rounds + 1))
    return cfg


async def _aevaluate(items, backend, cfgs, samples, out_dir, bar):
    out = {}
    for method, cfg in cfgs.items():
        problems = [TTCProblem(id=f"{it.id}~s{s}", question=it.question, answer=it.answer,
                               score=it.score or math_scorer(it.answer))
                    for it in items for s in range(samples)]
        bar.set_description(method)
        trace = Path(out_dir) / f"trace_{method}.jsonl" if out_dir else None
        out[method] = await arun(problems, backend, cfg, trace, progress=bar.update)
    return out


def evaluate(items: list[Item], backend, base: TTCConfig, methods: list[str], samples: int = 1,
             out_dir: str | os.PathLike | None = None, match_calls: bool = True) -> dict:
    """Run every method `samples` times on every item; returns (and writes under out_dir) the results dict."""
    from tqdm import tqdm

    from .backends import run_sync

    if samples < 1:
        raise ValueError(f"--samples must be >= 1, got {samples}")
    if not items:
        raise ValueError("empty benchmark")
    cfgs = {m: method_config(base, m, match_calls) for m in methods}
    for cfg in cfgs.values():
        cfg.validate()
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    total = sum(cfg.calls_per_problem() for cfg in cfgs.values()) * len(items) * samples
    t0 = time.time()
    with tqdm(total=total, unit="call", dynamic_ncols=True) as bar:
        raw = run_sync(_aevaluate(items, backend, cfgs, samples, out_dir, bar))
    results = {"benchmark_size": len(items), "samples": samples, "methods": {}, "problems": [],
               "wall_s": time.time() - t0}
    per_problem: dict[str, dict] = {it.id: {"id": it.id, "answer": it.answer, "methods": {}} for it in items}
    for method, (res, totals) in raw.items():
        by_item: dict[str, list] = {}
        for r in res:
            by_item.setdefault(r.id.rsplit("~s", 1)[0], []).append(r)
        rows = []
        for it in items:
            runs = by_item[it.id]
            correct = [r.majority_correct or 0.0 for r in runs]
            answers = [r.answer for r in runs]
            n, c = len(runs), int(sum(1 for x in correct if x >= 1.0))
            row = {"avg@k": avg_at_k(correct), "pass@1": pass_at_k(n, c, 1), f"pass@{n}": pass_at_k(n, c, n),
                   "maj@k": maj_at_k(answers, correct), "pop_mean": avg_at_k([r.population_mean or 0.0 for r in runs]),
                   "answers": answers,
                   "tokens": sum(r.prompt_tokens + r.completion_tokens for r in runs) / n,
                   "completion_tokens": sum(r.completion_tokens for r in runs) / n,
                   "calls": sum(r.calls for r in runs) / n, "wall_s": sum(r.wall_s for r in runs) / n,
                   "rounds": [[asdict(x) for x in r.rounds] for r in runs]}
            per_problem[it.id]["methods"][method] = row
            rows.append(row)
        mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
        results["methods"][method] = {
            "config": asdict(cfgs[method]), "avg@k": mean("avg@k"), "pass@1": mean("pass@1"),
            f"pass@{samples}": mean(f"pass@{samples}"), "maj@k": mean("maj@k"), "pop_mean": mean("pop_mean"),
            "tokens_per_problem": mean("tokens"), "completion_tokens_per_problem": mean("completion_tokens"),
            "calls_per_problem": mean("calls"), "wall_s_per_problem": mean("wall_s"), "totals": totals}
        if out_dir and (Path(out_dir) / f"trace_{method}.jsonl").exists():
            results["methods"][method]["aggregation"] = aggregation_diagnostics(
                Path(out_dir) / f"trace_{method}.jsonl")
    results["problems"] = list(per_problem.values())
    if out_dir:
        write_report(results, out_dir)
    return results


def aggregation_diagnostics(trace_path: str | os.PathLike) -> dict | None:
    """Does the aggregator verify, or only copy? From a TTC trace (calls of rounds >= 1 that list the candidates they
    were shown), per number k of correct candidates shown: calls and the aggregator's accuracy. `random_copy` is
    what copying one shown candidate at random would score (mean k / C): an aggregator that cannot tell right from
    wrong candidates sits at or below it. Also: how often the output's answer is one of the shown answers, and how
    often it keeps the answer when all shown candidates agree. None when the trace has no aggregation calls."""
    calls = {}
    for line in Path(trace_path).read_text().splitlines():
        rec = json.loads(line)
        if rec.get("type") == "call":
            calls[rec["key"]] = rec          # a resumed call's record replaces the earlier one
    agg = [c for c in calls.values() if c.get("candidate_ids") and c.get("reward") is not None]
    if not agg:
        return None
    by_k: dict[int, list[float]] = {}
    copy_base, copied, agree, kept = [], 0, 0, 0
    for c in agg:
        shown = [calls[k] for k in c["candidate_ids"] if k in calls]
        k = sum(1 for s in shown if (s.get("reward") or 0) >= 1.0)
        by_k.setdefault(k, []).append(c["reward"])
        copy_base.append(k / max(len(shown), 1))
        answers = {normalize(s["extracted"]) for s in shown if s.get("extracted") is not None}
        out = normalize(c["extracted"]) if c.get("extracted") is not None else None
        copied += out in answers
        if len(answers) == 1 and all(s.get("extracted") is not None for s in shown):
            agree += 1
            kept += out in answers
    return {"calls": len(agg), "accuracy": sum(c["reward"] for c in agg) / len(agg),
            "random_copy": sum(copy_base) / len(copy_base), "copy_rate": copied / len(agg),
            "agreeing_calls": agree, "keeps_agreeing_answer": kept / agree if agree else None,
            "by_correct_shown": {k: {"calls": len(v), "accuracy": sum(v) / len(v)} for k, v in sorted(by_k.items())}}


# ---------------------------------------------------------------------------------------------------------------------
# report


def write_report(results: dict, out_dir: str | os.PathLike) -> None:
    """results.json, report.md (summary + per-problem table) and accuracy_vs_tokens.png, from the results alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    k = results["samples"]
    methods = list(results["methods"])
    lines = [f"# Evaluation ({results['benchmark_size']} problems, k={k} runs per problem and method)", "",
             "avg@k = mean correctness of each run's final answer (majority of its final population; for `single` "
             "the sample itself). pop_mean = mean correctness over the final population (the ZAYA1 TR's TTC number). "
             "TTC rows are not single-sample avg@k.", "",
             f"| method | N | C | T | tau | beta | avg@k | pass@1 | pass@{k} | maj@k | pop_mean | tokens/problem | "
             "completion tokens/problem | calls/problem | wall s/problem |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, r in results["methods"].items():
        c = r["config"]
        ttc = m not in ("single", "majority")
        lines.append(f"| {m} | {1 if m == 'single' else c['population']} | {c['candidates'] if ttc else '-'} | "
                     f"{c['rounds'] if ttc else '-'} | {c['tail_tokens'] if ttc else '-'} | {c['budget_tokens']} | "
                     f"{r['avg@k']:.3f} | {r['pass@1']:.3f} | {r[f'pass@{k}']:.3f} | {r['maj@k']:.3f} | "
                     f"{r['pop_mean']:.3f} | {r['tokens_per_problem']:.0f} | {r['completion_tokens_per_problem']:.0f} "
                     f"| {r['calls_per_problem']:.0f} | {r['wall_s_per_problem']:.2f} |")
    for m, r in results["methods"].items():
        a = r.get("aggregation")
        if not a:
            continue
        keep = "-" if a["keeps_agreeing_answer"] is None else f"{a['keeps_agreeing_answer']:.2f}"
        lines += ["", f"### {m}: aggregation calls ({a['calls']})", "",
                  f"Accuracy {a['accuracy']:.3f} vs {a['random_copy']:.3f} for copying a random shown candidate; "
                  f"answer is one of the shown answers in {a['copy_rate']:.2f} of the calls; keeps the answer of "
                  f"agreeing candidates in {keep} of {a['agreeing_calls']} calls.", "",
                  "| correct candidates shown | calls | aggregator accuracy |", "|---|---|---|"]
        lines += [f"| {k} | {v['calls']} | {v['accuracy']:.3f} |" for k, v in a["by_correct_shown"].items()]
    lines += ["", "## Per problem", "", "| problem | gold | " + " | ".join(f"{m} avg@k / pop / tokens / answers"
                                                                         for m in methods) + " |",
              "|---|---|" + "---|" * len(methods)]
    for p in results["problems"]:
        cells = []
        for m in methods:
            r = p["methods"][m]
            ans = ", ".join(str(a)[:12] for a in r["answers"])
            cells.append(f"{r['avg@k']:.2f} / {r['pop_mean']:.2f} / {r['tokens']:.0f} / {ans}".replace("|", "\\|"))
        lines.append(f"| {p['id']} | {str(p['answer'])[:20]} | " + " | ".join(cells) + " |")
    lines += ["", "![accuracy vs tokens](accuracy_vs_tokens.png)", ""]
    (out / "report.md").write_text("\n".join(lines))

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, m in enumerate(methods):
        xs = [p["methods"][m]["completion_tokens"] for p in results["problems"]]
        ys = [p["methods"][m]["avg@k"] + (i - len(methods) / 2) * 0.01 for p in results["problems"]]
        ax.scatter(xs, ys, s=14, alpha=0.5, label=f"{m} (problems)", color=f"C{i}")
        r = results["methods"][m]
        ax.scatter([r["completion_tokens_per_problem"]], [r["avg@k"]], s=120, marker="*", color=f"C{i}",
                   edgecolors="black", label=f"{m} (mean)")
    ax.set_xlabel("completion tokens per problem (mean over runs)")
    ax.set_ylabel("accuracy (avg@k)")
    ax.set_ylim(-0.1, 1.1)
    ax.set_title("accuracy vs tokens spent")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_tokens.png", dpi=100)
    plt.close(fig)
