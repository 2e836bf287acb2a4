"""Evaluation: benchmarks, avg@k / unbiased pass@k / maj@k, TTC accuracy, cost, and a report with a plot.

Protocol (spec: shared/spec/evaluation.md §1, §4): each method runs `samples` = k independent times per problem (each
run of a TTC method is a whole population, so k runs of markovian_rsa make k x N x (T+1) calls). Per problem we
record, for every run, the final answer (majority over its final population; for `single` the one sample), whether
it is correct, and the final-population mean correctness (the number the ZAYA1 TR reports for Markovian RSA). Then:
- avg@k   mean correctness of the k run answers (for `single`: the usual avg@k = unbiased pass@1),
- pass@k  Chen et al. unbiased estimator 1 - C(n-c, k)/C(n, k) over the n = k runs (reported for k=1 and k=n),
- maj@k   the most frequent answer among the k runs (ties: earliest; unparsable answers do not vote); on math-scored
          benchmarks answers vote together when the verifier finds them equal (`1/2` and `0.5`, `openzaya.verify`),
          on the env suites when their normalised strings are equal (the envs score exact strings),
- pop_mean (TTC) mean over runs of the final-population mean correctness,
- tokens (prompt + completion, and completion alone) and wall time per problem, averaged over runs.
Every accuracy comes with its standard error over problems (`mean_se`). TTC numbers are labelled apart from
single-sample avg@k in the report; decode tokens sit next to every accuracy. Besides results.json / report.md,
`write_lm_eval` writes lm-evaluation-harness's layout (results_<date>.json with "metric,filter" / "metric_stderr,filter"
keys and per-task configs, samples_<task>_<date>.jsonl with doc / target / resps / filtered_resps per problem), so
tools that read lm-eval output read ours.

Benchmarks:
- a local file: JSONL (one object per line), JSON (a list of objects) or Parquet (needs pyarrow) with a question
  field (`problem` or `question` by default), `answer` and `id` (field names configurable);
- a Hugging Face dataset id or a local dataset folder, through `datasets` (`pip install 'openzaya[datasets]'`; an id
  needs the network or the datasets cache; same fields);
- built-in suites from our own environments at fixed held-out seeds (10_000+), scored by the env's own `score`:
  `envs:tiny` (4 problems), `envs:easy` (16). Math files are scored by `openzaya.verify` (last \\boxed{} /
  <answer> after </think>, checked against the gold answer with math-verify).
- code (LiveCodeBench's rows, our code JSONL, the `code:mini` suite): openzaya/codebench.py, whose judge runs each
  sample's program on the tests in the sandbox (`evaluate(..., judge=...)`; `codebench.evaluate_code`).
"""

from __future__ import annotations

import hashlib
import json
import math
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
             seed: int = 0, vote_keys: list[str | None] | None = None) -> float:
    """Correctness of the most voted answer among k samples (ties: earliest; None does not vote; no valid answer =
    wrong). Answers vote together when their `vote_keys` are equal (default: the normalised answer; see
    `math_vote_keys`). k = len(answers) is exact; k < n is the expectation over random k-subsets (Monte Carlo)."""
    n = len(answers)
    k = n if k is None else k
    if not 1 <= k <= n:
        raise ValueError(f"maj@k needs 1 <= k <= n, got k={k} n={n}")
    if vote_keys is None:
        vote_keys = [normalize(a) if a is not None and a.strip() else None for a in answers]

    def vote(idx):
        keys = [(vote_keys[i], i) for i in idx if vote_keys[i] is not None]
        if not keys:
            return 0.0
        counts = Counter(key for key, _ in keys)
        best = max(counts.values())
        return float(correct[next(i for key, i in keys if counts[key] == best)])

    if k == n:
        return vote(range(n))
    rng = random.Random(seed)
    return sum(vote(sorted(rng.sample(range(n), k))) for _ in range(trials)) / trials


def math_vote_keys(answers: list[str | None]) -> list[str | None]:
    """Vote keys by mathematical equivalence: each answer gets the normalised form of the earliest answer the
    verifier (`verify.check_many`, earlier answer as gold) finds equal to it, so `1/2` and `0.5` vote together.
    Distinct normalised answers are compared pairwise in one batch (integers and equal strings never reach
    math-verify); None or blank answers get None."""
    from .verify import check_many

    norm = [normalize(a) if a is not None and a.strip() else None for a in answers]
    first: dict[str, str] = {}                       # normalised -> its first raw answer
    for a, key in zip(answers, norm):
        if key is not None:
            first.setdefault(key, a)
    reps = list(first)
    pairs = [(i, j) for j in range(len(reps)) for i in range(j)]
    verdicts = check_many([(first[reps[i]], first[reps[j]]) for i, j in pairs]) if pairs else []
    same = {(i, j) for (i, j), v in zip(pairs, verdicts) if v.correct}
    canon: list[str] = []
    for j, key in enumerate(reps):
        canon.append(next((canon[i] for i in range(j) if (i, j) in same), key))
    to_canon = dict(zip(reps, canon))
    return [None if key is None else to_canon[key] for key in norm]


def mean_se(xs: list[float]) -> float:
    """Standard error of the mean of per-problem scores (0/1, or avg@k fractions)."""
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / max(len(xs) - 1, 1) / len(xs))


def paired_se(a: list[float], b: list[float]) -> float:
    """Standard error of mean(b - a) over the same problems."""
    return mean_se([y - x for x, y in zip(a, b)])


# ---------------------------------------------------------------------------------------------------------------------
# benchmarks


@dataclass
class Item:
    id: str
    question: str
    answer: str
    score: Callable[[str], float] | None = None   # response -> correctness; None = math verifier
    code: object = None   # a codebench.CodeTask: scored by running its tests (codebench.evaluate_code), not `score`


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


def rows_to_items(rows: list[dict], source: str, question_field: str | None = None, answer_field: str = "answer",
                  id_field: str = "id") -> list[Item]:
    """Answer-scored items of benchmark rows (a question field, a gold answer, an id), ids unique."""
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
    if len({it.id for it in items}) != len(items):
        raise ValueError(f"{source}: duplicate ids")
    return items


FILE_FORMATS = {".jsonl": "one JSON object per line", ".json": "a JSON list of objects", ".parquet": "needs pyarrow"}


def read_jsonl(path: Path) -> list[dict]:
    """The objects of a JSONL file; a malformed line is an error naming the file and the line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n}: not valid JSON ({e.msg}, column {e.colno}); each line must be "
                                 f"one JSON object such as {{\"problem\": \"...\", \"answer\": \"...\"}}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path} line {n}: a JSON {type(row).__name__}, not an object with the question and "
                                 f"answer fields")
            rows.append(row)
    return rows


def _read_file(path: Path) -> list[dict]:
    if path.suffix not in FILE_FORMATS:
        raise ValueError(f"{path}: unsupported benchmark format {path.suffix or '(no suffix)'!r}; supported: "
                         + ", ".join(f"{k} ({v})" for k, v in FILE_FORMATS.items())
                         + ", a suite (" + ", ".join(SUITES) + ") or a Hugging Face dataset")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ImportError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow), or convert it to "
                              f"JSONL") from e
        return pq.read_table(path).to_pylist()
    if path.suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ValueError(f"{path}: a .json benchmark is a list of objects; for one object per line use .jsonl")
        return rows
    return read_jsonl(path)


def _read_hf_dataset(spec: str, split: str) -> list[dict]:
    """A Hugging Face dataset id (Hub or cache) or a local dataset folder, through the optional `datasets`."""
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{spec!r} is neither a suite ({', '.join(SUITES)}) nor an existing file; loading it as a "
                         f"Hugging Face dataset needs `pip install 'openzaya[datasets]'`") from None
    try:
        return list(datasets.load_dataset(spec, split=split))
    except Exception as e:  # offline, unknown id, missing split: one line that names the cause
        cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"could not load the Hugging Face dataset {spec!r} (split {split!r}): {cause} (offline? "
                         f"a dataset id needs the network once, then HF_DATASETS_OFFLINE=1 reads the cache; a local "
                         f".jsonl file needs neither)") from e


def read_rows(spec: str, split: str = "test") -> list[dict]:
    """The rows of a local .jsonl/.json/.parquet file or of a Hugging Face dataset (id or local dataset folder)."""
    path = Path(spec)
    if path.is_file():
        return _read_file(path)
    if path.suffix in FILE_FORMATS:
        raise ValueError(f"{spec!r} is neither a suite ({', '.join(SUITES)}) nor an existing file: no such file")
    return _read_hf_dataset(spec, split)


def load_benchmark(spec: str, question_field: str | None = None, answer_field: str = "answer", id_field: str = "id",
                   split: str = "test", limit: int | None = None) -> list[Item]:
    """Items of a suite name (envs:...), a local .jsonl/.json/.parquet file, or a Hugging Face dataset (id or
    local dataset folder). Code benchmarks load through `codebench.load`."""
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
    return rows_to_items(read_rows(spec, split), spec, question_field, answer_field, id_field)[:limit]


def benchmark_name(spec: str) -> str:
    """A task name for a benchmark spec: envs:easy -> envs_easy, data/aime.jsonl -> aime, org/name -> org__name."""
    path = Path(spec)
    if path.suffix in FILE_FORMATS:
        return path.stem
    return spec.replace(":", "_").replace("/", "__")


# ---------------------------------------------------------------------------------------------------------------------
# per-method configs


# the TTC knobs each method reads; TTCConfig.validate checks them all, so `for_method` sets the unused ones to values
# that pass (never read): `--method single --budget-tokens 48` and `--method majority --population 2` are valid
METHOD_KNOBS = {"single": {"budget_tokens"}, "majority": {"population", "budget_tokens"},
                "rsa": {"population", "candidates", "rounds", "budget_tokens"},
                "markovian_rsa": {"population", "candidates", "rounds", "tail_tokens", "budget_tokens"},
                "pacore_hybrid": {"population", "candidates", "rounds", "tail_tokens", "budget_tokens"},
                "delethink": {"population", "rounds", "tail_tokens", "budget_tokens", "head_tokens"}}


def for_method(cfg: TTCConfig) -> TTCConfig:
    """cfg with the knobs its method does not read made consistent (C <= N, tau <= beta), so that validation is
    about the knobs the method uses."""
    uses = METHOD_KNOBS.get(cfg.method, set(METHOD_KNOBS["markovian_rsa"]))
    if "candidates" not in uses:
        cfg = replace(cfg, candidates=max(1, min(cfg.candidates, cfg.population)))
    if "tail_tokens" not in uses:
        cfg = replace(cfg, tail_tokens=max(1, min(cfg.tail_tokens, cfg.budget_tokens)))
    return cfg


def method_config(base: TTCConfig, method: str, match_calls: bool = True) -> TTCConfig:
    """The config of one method at matched settings: majority gets N x (T+1) samples (as many calls as Markovian
    RSA makes) when match_calls, every method keeps beta, temperature and top-p."""
    cfg = replace(base, method=method)
    if method == "majority" and match_calls:
        cfg = replace(cfg, population=base.population * (base.rounds + 1))
    return for_method(cfg)


# ---------------------------------------------------------------------------------------------------------------------
# fitting the TTC budget to the model's context (before any call)

CHAT_TEMPLATE_ALLOWANCE = 16   # tokens around a prompt's text when the backend has no tokenizer to count them


def _template_overhead(backend) -> int:
    """Tokens a call adds around its prompt text: the chat template of an empty user turn (or the tokenizer's
    special tokens for raw prompts); CHAT_TEMPLATE_ALLOWANCE without a tokenizer."""
    from .backends import Request

    tok = backend.tokenizer
    if tok is None:
        return CHAT_TEMPLATE_ALLOWANCE
    if getattr(tok, "chat_template", None) is None:
        return len(tok.encode(""))
    return len(backend.prompt_ids(Request(messages=[{"role": "user", "content": ""}])))


def context_need(cfg: TTCConfig, backend, question: str) -> int:
    """Tokens one call of cfg's method may occupy for `question`: its longest prompt (`ttc.Run.longest_prompt_tokens`,
    the bound the server checks too) plus the template around it plus beta new tokens."""
    from .ttc import Run

    cfg = for_method(cfg)
    return Run(backend, cfg).longest_prompt_tokens(question) + _template_overhead(backend) + cfg.budget_tokens


def _clamp(base: TTCConfig, methods: list[str], backend, question: str, ctx: int,
           free: set[str]) -> TTCConfig | None:
    """The largest beta (a free tau keeps its ratio to beta), else the largest tau, in `free` with which every
    method's longest call fits ctx and the configs are valid; None when none does."""
    cfgs = lambda c: [method_config(c, m) for m in methods]  # noqa: E731

    def scaled(p: int) -> TTCConfig:
        if "budget_tokens" in free:
            tau = base.tail_tokens * p // base.budget_tokens if "tail_tokens" in free else base.tail_tokens
            return replace(base, budget_tokens=p, tail_tokens=max(1, tau))
        return replace(base, tail_tokens=p)

    def ok(c: TTCConfig) -> bool:
        try:
            return all(context_need(x, backend, question) <= ctx for x in cfgs(c))   # ttc.Run validates x
        except ValueError:
            return False

    if not free:
        return None
    lo, hi, best = 1, base.budget_tokens if "budget_tokens" in free else base.tail_tokens, None
    while lo <= hi:          # need grows with p; an invalid config (tau > beta) only at small p, a misfit at large p
        mid = (lo + hi) // 2
        c = scaled(mid)
        if ok(replace(c, tail_tokens=min(c.tail_tokens, c.budget_tokens))):
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return scaled(best) if best is not None and ok(scaled(best)) else None


def fit_to_context(base: TTCConfig, methods: list[str], backend, questions: list[str],
                   given: set[str] = frozenset()) -> tuple[TTCConfig, list[str]]:
    """Check every method's longest call on the longest question against the backend's context before any work.
    Knobs not in `given` (beta = budget_tokens, tau = tail_tokens: then TTCConfig's defaults) are clamped, keeping
    their ratio, to the largest values that fit, with a note; given knobs that do not fit are an error that names
    values that would. Returns (config, notes); a backend that does not know its context (`context_tokens()`
    None) is not checked (a note says so)."""
    ctx = backend.context_tokens()
    if ctx is None:
        return base, ["the backend did not report its context length (vLLM, SGLang and openzaya serve report "
                      "max_model_len in /v1/models): prompt + budget not checked"]
    question = max(questions, key=lambda q: backend.count_tokens(q) or len(q))
    need = max(context_need(method_config(base, m), backend, question) for m in methods)
    if need <= ctx:
        return base, []
    knobs = {"budget_tokens", "tail_tokens"} & set().union(*(METHOD_KNOBS.get(m, set()) for m in methods))
    fitted = _clamp(base, methods, backend, question, ctx, knobs - set(given))
    if fitted is not None:
        changed = [f"{flag} {getattr(base, k)} -> {getattr(fitted, k)}" for k, flag in
                   (("budget_tokens", "--budget-tokens"), ("tail_tokens", "--tail-tokens"))
                   if k in knobs - set(given) and getattr(base, k) != getattr(fitted, k)]
        approx = ("; token counts approximated at 4 characters per token, --tokenizer makes them exact"
                  if backend.tail_approximation else "")
        return fitted, [f"the default TTC budget does not fit this model's context of {ctx} tokens: using "
                        + ", ".join(changed) + f" (give the flags to choose other values{approx})"]
    hint = ""
    anyfit = _clamp(base, methods, backend, question, ctx, knobs) if knobs & set(given) else None
    if anyfit is not None:
        hint = " (e.g. " + " ".join(f"{flag} {getattr(anyfit, k)}" for k, flag in
                                    (("budget_tokens", "--budget-tokens"), ("tail_tokens", "--tail-tokens"))
                                    if k in knobs) + " fit)"
    raise ValueError(f"{', '.join(methods)}: the longest call needs ~{need} tokens (prompt + --budget-tokens "
                     f"{base.budget_tokens}), over this model's context of {ctx}: lower --budget-tokens"
                     + (", --tail-tokens or --candidates" if "tail_tokens" in knobs else "") + hint)


# ---------------------------------------------------------------------------------------------------------------------
# running methods over a benchmark


async def _aevaluate(items, backend, cfgs, samples, out_dir, bar):
    out = {}
    for method, cfg in cfgs.items():
        problems = [TTCProblem(id=f"{it.id}~s{s}", question=it.question, answer=it.answer,
                               score=None if it.code is not None else it.score or math_scorer(it.answer))
                    for it in items for s in range(samples)]
        bar.set_description(method)
        trace = Path(out_dir) / f"trace_{method}.jsonl" if out_dir else None
        out[method] = await arun(problems, backend, cfg, trace, progress=bar.update)
    return out


def _winner_text(r) -> str:
    i = r.winner_index
    return r.final_texts[i] if i is not None else (r.final_texts[0] if r.final_texts else "")


def judge_answers(method: str, items: list[Item], runs_by_item: dict) -> list[dict]:
    """Per item, from the runs' own scoring: each run's majority answer, its correctness and vote key (mathematical
    equivalence on math-scored items, None = normalised strings), the final-population mean, the winner's text."""
    out = []
    for it in items:
        runs = runs_by_item[it.id]
        answers = [r.answer for r in runs]
        out.append({"correct": [r.majority_correct or 0.0 for r in runs], "answers": answers,
                    "keys": math_vote_keys(answers) if it.score is None else None,
                    "pop": [r.population_mean or 0.0 for r in runs], "texts": [_winner_text(r) for r in runs]})
    return out


def evaluate(items: list[Item], backend, base: TTCConfig, methods: list[str], samples: int = 1,
             out_dir: str | os.PathLike | None = None, match_calls: bool = True, task: str = "benchmark",
             run_config: dict | None = None, judge: Callable = judge_answers) -> dict:
    """Run every method `samples` times on every item; returns (and writes under out_dir) the results dict. `task`
    names the benchmark in the lm-eval files (task = <task>_<method>), `run_config` (model, backend, ...) goes into
    their "config". `judge(method, items, runs_by_item)` scores the runs (`judge_answers`; code: codebench)."""
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
    responses: dict[str, list[list[str]]] = {}
    for method, (res, totals) in raw.items():
        by_item: dict[str, list] = {}
        for r in res:
            by_item.setdefault(r.id.rsplit("~s", 1)[0], []).append(r)
        rows = []
        responses[method] = []
        for it, j in zip(items, judge(method, items, by_item)):
            runs, correct, answers = by_item[it.id], j["correct"], j["answers"]
            n, c = len(runs), int(sum(1 for x in correct if x >= 1.0))
            row = {"avg@k": avg_at_k(correct), "pass@1": pass_at_k(n, c, 1), f"pass@{n}": pass_at_k(n, c, n),
                   "maj@k": maj_at_k(answers, correct, vote_keys=j["keys"]), "pop_mean": avg_at_k(j["pop"]),
                   "answers": answers, **j.get("extra", {}),
                   "tokens": sum(r.prompt_tokens + r.completion_tokens for r in runs) / n,
                   "completion_tokens": sum(r.completion_tokens for r in runs) / n,
                   "calls": sum(r.calls for r in runs) / n, "wall_s": sum(r.wall_s for r in runs) / n,
                   "rounds": [[asdict(x) for x in r.rounds] for r in runs]}
            per_problem[it.id]["methods"][method] = row
            rows.append(row)
            responses[method].append(j["texts"])
        mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
        accuracies = ("avg@k", "pass@1", f"pass@{samples}", "maj@k", "pop_mean")
        results["methods"][method] = {
            "config": asdict(cfgs[method]), **{key: mean(key) for key in accuracies},
            "stderr": {key: mean_se([r[key] for r in rows]) for key in accuracies},
            "tokens_per_problem": mean("tokens"), "completion_tokens_per_problem": mean("completion_tokens"),
            "calls_per_problem": mean("calls"), "wall_s_per_problem": mean("wall_s"), "totals": totals}
        if out_dir and (Path(out_dir) / f"trace_{method}.jsonl").exists():
            results["methods"][method]["aggregation"] = aggregation_diagnostics(
                Path(out_dir) / f"trace_{method}.jsonl")
    results["problems"] = list(per_problem.values())
    if out_dir:
        write_report(results, out_dir)
        write_lm_eval(results, items, responses, out_dir, task, run_config or {})
    return results


def write_lm_eval(results: dict, items: list[Item], responses: dict[str, list[list[str]]],
                  out_dir: str | os.PathLike, task: str, run_config: dict) -> tuple[Path, list[Path]]:
    """lm-evaluation-harness's output layout: results_<date>.json ({"results": {task: {"metric,none": value,
    "metric_stderr,none": stderr}}, "configs", "versions", "n-shot", "higher_is_better", "n-samples", "config",
    "date") and one samples_<task>_<date>.jsonl per method (doc_id, doc, target, arguments, resps,
    filtered_resps, the per-problem metrics). The task of a method is <task>_<method>; k is written into the metric
    names (avg@4, maj@4) so numbers at different k never share a column."""
    from datetime import datetime

    out, k = Path(out_dir), results["samples"]
    date = datetime.now().isoformat().replace(":", "-")
    names = {"avg@k": f"avg@{k}", "pass@1": "pass@1", f"pass@{k}": f"pass@{k}", "maj@k": f"maj@{k}",
             "pop_mean": "pop_mean"}
    doc = {"results": {}, "configs": {}, "versions": {}, "n-shot": {}, "higher_is_better": {}, "n-samples": {},
           "config": {**run_config, "repeats": k}, "date": date,
           "total_evaluation_time_seconds": str(results["wall_s"])}
    sample_files = []
    for method, r in results["methods"].items():
        name = f"{task}_{method}"
        doc["results"][name] = {"alias": name}
        for key, metric in names.items():
            doc["results"][name][f"{metric},none"] = r[key]
            doc["results"][name][f"{metric}_stderr,none"] = r["stderr"][key]
        c = r["config"]
        doc["configs"][name] = {"task": name, "dataset_path": run_config.get("benchmark", task),
                                "output_type": "generate_until", "repeats": k, "num_fewshot": 0,
                                "generation_kwargs": {"temperature": c["temperature"], "top_p": c["top_p"],
                                                      "max_gen_toks": c["budget_tokens"]},
                                "metric_list": [{"metric": m, "higher_is_better": True} for m in names.values()],
                                "metadata": {"ttc": c}}
        doc["versions"][name], doc["n-shot"][name] = 1.0, 0
        doc["higher_is_better"][name] = {m: True for m in names.values()}
        doc["n-samples"][name] = {"original": len(items), "effective": len(items)}
        path = out / f"samples_{name}_{date}.jsonl"
        with open(path, "w") as f:
            for i, (it, prob, resps) in enumerate(zip(items, results["problems"], responses[method])):
                row = prob["methods"][method]
                rec = {"doc_id": i, "doc": {"id": it.id, "question": it.question, "answer": it.answer},
                       "target": it.answer,
                       "arguments": {"gen_args_0": {"arg_0": it.question,
                                                    "arg_1": doc["configs"][name]["generation_kwargs"]}},
                       "resps": [[t] for t in resps], "filtered_resps": row["answers"], "filter": "none",
                       "metrics": list(names.values()), **{m: row[key] for key, m in names.items()},
                       **({"code": row["code"]} if "code" in row else {}),   # per-sample verdicts and tests
                       "doc_hash": _sha(it.question + "\n" + it.answer), "prompt_hash": _sha(it.question),
                       "target_hash": _sha(it.answer)}
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        sample_files.append(path)
    res_path = out / f"results_{date}.json"
    res_path.write_text(json.dumps(doc, indent=1))
    return res_path, sample_files


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def aggregation_diagnostics(trace_path: str | os.PathLike) -> dict | None:
    """Does the aggregator verify, or only copy? From a TTC trace (calls of rounds >= 1 that list the candidates they
    were shown), per number k of correct candidates shown: calls and the aggregator's accuracy. `random_copy` is
    what copying one shown candidate at random would score (mean k / C): an aggregator that cannot tell right from
    wrong candidates sits at or below it. Also: how often the output's answer is one of the shown answers, and how
    often it keeps the answer when all shown candidates agree, and `minus_copy` = accuracy - random_copy averaged per
    problem with its standard error over problems (`minus_copy_se`; the calls of one problem are not independent).
    None when the trace has no aggregation calls."""
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
    gain: dict[str, list[float]] = {}                # problem -> aggregator reward - random-copy baseline per call
    for c in agg:
        shown = [calls[k] for k in c["candidate_ids"] if k in calls]
        k = sum(1 for s in shown if (s.get("reward") or 0) >= 1.0)
        by_k.setdefault(k, []).append(c["reward"])
        copy_base.append(k / max(len(shown), 1))
        gain.setdefault(c.get("problem", c["key"]), []).append(c["reward"] - copy_base[-1])
        answers = {normalize(s["extracted"]) for s in shown if s.get("extracted") is not None}
        out = normalize(c["extracted"]) if c.get("extracted") is not None else None
        copied += out in answers
        if len(answers) == 1 and all(s.get("extracted") is not None for s in shown):
            agree += 1
            kept += out in answers
    per_problem = [sum(v) / len(v) for v in gain.values()]
    return {"calls": len(agg), "accuracy": sum(c["reward"] for c in agg) / len(agg),
            "random_copy": sum(copy_base) / len(copy_base), "copy_rate": copied / len(agg),
            "minus_copy": sum(per_problem) / len(per_problem), "minus_copy_se": mean_se(per_problem),
            "problems": len(per_problem),
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
             "TTC rows are not single-sample avg@k. ± is the standard error over problems.", "",
             f"| method | N | C | T | tau | beta | avg@k | pass@1 | pass@{k} | maj@k | pop_mean | tokens/problem | "
             "completion tokens/problem | calls/problem | wall s/problem |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, r in results["methods"].items():
        c = r["config"]
        ttc = m not in ("single", "majority")
        lines.append(f"| {m} | {1 if m == 'single' else c['population']} | {c['candidates'] if ttc else '-'} | "
                     f"{c['rounds'] if ttc else '-'} | {c['tail_tokens'] if ttc else '-'} | {c['budget_tokens']} | "
                     + " | ".join(f"{r[key]:.3f} ± {r['stderr'][key]:.3f}"
                                  for key in ("avg@k", "pass@1", f"pass@{k}", "maj@k", "pop_mean"))
                     + f" | {r['tokens_per_problem']:.0f} | {r['completion_tokens_per_problem']:.0f} "
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
