"""Mutation testing of the modules where a silent bug costs most, with mutmut (not in CI: minutes per module).

    python bench/mutation.py                       # every target, the working tree's code and tests
    python bench/mutation.py rl evaluate           # some targets
    python bench/mutation.py rl --tests-rev cf8d388 --label before    # the same code against older tests
    make mutation                                  # every target

Per target: a scratch copy of `openzaya/` and `tests/` under runs/mutation/work/<label>/<target>/ (the checkout is
never touched, so other work can go on), a generated `[tool.mutmut]` config that mutates only the target's file and
selects only its relevant tests, then `mutmut run --max-children 1` restricted to the target's functions. mutmut
forks one pre-imported test process per mutant and runs only the selected tests that cover the mutated function.
Results accumulate in runs/mutation/report.json (keyed by label and target, so targets can be run one at a time)
and runs/mutation/report.md: per target killed / survived / no tests / timeout and the score, then every
surviving mutant with its diff.

Why mutmut 3 (over cosmic-ray): cosmic-ray writes each mutant into the file on disk and runs a fresh test command
per mutant (here a new Python importing torch, ~3-5 s each before any test runs, and the checkout would hold mutated
code meanwhile); mutmut mutates a copy, switches mutants at run time inside one forked, already-imported process
and runs only the tests that reach the mutated function: rl.py's 331 mutants took 2 minutes on the shared 2-core
box. Its names (`openzaya.model.xǁRouterǁforward__mutmut_3`) let a target be a set of functions, which the
model.py and engine.py targets need (router, balancing and experts; the sampler). pytest-gremlins is not on PyPI.

Simplifications: mutmut leaves decorated functions alone (a decorator runs at definition time); the two balancing
methods of model.py carry `@torch.no_grad()`, so the scratch copy applies that decorator after the class instead
(`UNDECORATE`, same behaviour). Score = killed (timeouts included: the test run did not pass) / mutants tried;
"no tests" mutants (no selected test reaches the function) count against the score.
A mutant that hangs (an event loop waiting on a future nobody resolves) is stopped after (its tests' clean time
+ 1 s) x --timeout-multiplier (3 here; mutmut's default 15 made one hanging ttc.py mutant cost 13 minutes).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "runs" / "mutation"


@dataclass
class Target:
    path: str                         # the file to mutate
    tests: list[str]                  # its relevant tests (pytest selection)
    functions: list[str] = field(default_factory=lambda: ["*"])   # mutmut function names (x_func, xǁClassǁmethod)
    undecorate: dict[str, str] = field(default_factory=dict)      # "Class.method" -> decorator applied after the class


TARGETS = {
    "rl": Target("openzaya/rl.py", ["tests/test_rl.py"]),
    "ttc": Target("openzaya/ttc.py", ["tests/test_ttc.py"]),
    # the metrics, the method configs and the aggregation diagnostics; the rest of the file is "evaluate_run"
    "evaluate": Target("openzaya/evaluate.py", ["tests/test_evaluate.py"],
                       functions=["x_pass_at_k*", "x_avg_at_k*", "x_maj_at_k*", "x_method_config*",
                                  "x_aggregation_diagnostics*"]),
    # the run path: evaluate() and its per-method configs, the context fit, the judge, the report and lm-eval
    # files, the loaders, math vote keys and the standard errors (1416 mutants, ~12-21 min on the shared box).
    # Left out: _read_hf_dataset (a dataset id needs the Hugging Face Hub: its mutants would wait on the network).
    # Beyond test_evaluate.py, the fast tests that reach these functions directly: paired_se / mean_se
    # (test_speedrun), math_scorer on huge integers (test_verify). Not selected: test_codebench.py's evaluate_code
    # tests, which reach evaluate() too but run sandboxed programs (seconds per mutant)
    "evaluate_run": Target("openzaya/evaluate.py",
                           ["tests/test_evaluate.py", "tests/test_speedrun.py::test_standard_errors",
                            "tests/test_verify.py::test_huge_integers_give_verdicts_not_exceptions"],
                           functions=["x_evaluate*", "x__aevaluate*", "x_judge_answers*", "x__winner_text*",
                                      "x_write_report*", "x_write_lm_eval*", "x__sha*",
                                      "x_for_method*", "x_fit_to_context*", "x__clamp*", "x_context_need*",
                                      "x__template_overhead*",
                                      "x_load_benchmark*", "x_read_rows*", "x__read_file*", "x_read_jsonl*",
                                      "x_rows_to_items*", "x_benchmark_name*", "x_env_suite*", "x_math_scorer*",
                                      "x_math_vote_keys*", "x_mean_se*", "x_paired_se*"]),
    # the checks that run in the calling process (cleaning, the fast path, refusals, the pool's bookkeeping and
    # verdicts); left out: _verify_in_worker, _watch_parent and _worker_main, which run inside the pool's worker
    # processes, where mutmut cannot switch mutants or see which test reached them (all "no tests")
    "verify": Target("openzaya/verify.py", ["tests/test_verify.py"],
                     functions=["xǁVerdictǁ*", "x__clean*", "x__drop_percent*", "x__int_key*", "x_fast_check*",
                                "x__balanced*", "x__unparsable*", "x__right_assoc*", "x__operand_end*", "x__refuse*",
                                "x_prepare*", "x__lifeline*", "xǁ_Workerǁ*", "xǁMathPoolǁ*", "x_check_many*",
                                "x_check_math*", "x_math_score*"]),
    "model": Target("openzaya/model.py", ["tests/test_model.py"],
                    functions=["xǁRouterǁ*", "xǁRouterMLPǁ*", "xǁMoEǁ*", "xǁExpertsǁ*", "x__experts_forward*",
                               "x__grouped_swiglu*", "xǁZayaForCausalLMǁupdate_balancing_biases*",
                               "xǁZayaForCausalLMǁexpert_load_stats*", "x_expert_load*",
                               "xǁZayaForCausalLMǁrouters*"],
                    undecorate={"ZayaForCausalLM.update_balancing_biases": "torch.no_grad()",
                                "ZayaForCausalLM.expert_load_stats": "torch.no_grad()"}),
    # the sampler moved from engine.py to sampling.py (penalties, logit bias, top-k/p, min-p, temperature)
    "engine_sampler": Target("openzaya/sampling.py", ["tests/test_sampling.py", "tests/test_engine.py"],
                             functions=["x_sample*", "x_adjust_logits*", "x_sampling_batch*", "xǁPenaltyStateǁ*"]),
}

STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 36: "timeout",
          -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout", -11: "segfault", -9: "segfault",
          None: "not checked"}


# appended to the scratch copy's tests/conftest.py. mutmut runs the tests once in its own process, then forks one
# child per mutant from it: math-verify workers that process started would be its children, and one killed by a
# forked child (a timeout test replaces a worker) is reaped by mutmut's wait for its mutant children, which then
# fails (KeyError in wait_for_result). Closing the pool when every session ends leaves no such worker behind.
# tqdm's write lock holds a multiprocessing RLock (a semaphore shared by every forked child): a mutant that raises
# inside tqdm while holding it (evaluate()'s `unit=None`) never releases it, and every later child then blocks on its
# first progress bar until mutmut's timeout (30 evaluate() mutants in a row "timed out" that way, each counted as
# killed). Each session (each child) therefore starts with a lock of its own.
CONFTEST_HOOKS = """

def pytest_sessionfinish(session, exitstatus):   # added by bench/mutation.py (see CONFTEST_HOOKS there)
    import sys
    verify = sys.modules.get("openzaya.verify")
    if verify is not None and verify._POOL is not None:
        verify._POOL.close()


def pytest_sessionstart(session):   # added by bench/mutation.py (see CONFTEST_HOOKS there)
    from tqdm.std import TqdmDefaultWriteLock, tqdm
    if hasattr(TqdmDefaultWriteLock, "mp_lock"):
        del TqdmDefaultWriteLock.mp_lock
    tqdm.set_lock(TqdmDefaultWriteLock())
"""


def _copy_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def prepare(name: str, t: Target, work: Path, tests_rev: str | None, deselect: list[str],
            timeout_multiplier: float) -> None:
    """Scratch copy of the package and the tests (from the working tree or a git revision) plus a mutmut config."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    _copy_tree(ROOT / "openzaya", work / "openzaya")
    if tests_rev is None:
        _copy_tree(ROOT / "tests", work / "tests")
    else:
        tar = subprocess.run(["git", "-C", str(ROOT), "archive", tests_rev, "tests"], check=True,
                             capture_output=True).stdout
        tarfile.open(fileobj=BytesIO(tar)).extractall(work)
    with open(work / "tests" / "conftest.py", "a") as f:
        f.write(CONFTEST_HOOKS)
    src = work / t.path
    text = src.read_text()
    for qual, deco in t.undecorate.items():
        cls, meth = qual.split(".")
        old = f"    @{deco}\n    def {meth}("
        assert text.count(old) == 1, f"{t.path}: expected one '@{deco}' on {qual}"
        text = text.replace(old, f"    def {meth}(") + f"\n{cls}.{meth} = {deco}({cls}.{meth})\n"
    src.write_text(text)
    selection = ", ".join(json.dumps(x) for x in t.tests)
    extra = "".join(f', "--deselect", {json.dumps(d)}' for d in deselect)
    (work / "pyproject.toml").write_text(f"""# generated by bench/mutation.py for target {name}
[tool.mutmut]
source_paths = ["openzaya"]
only_mutate = ["{t.path}"]
pytest_add_cli_args_test_selection = [{selection}]
pytest_add_cli_args = ["-q", "-p", "no:cacheprovider", "-m", "not slow and not gpu"{extra}]
use_git_change_detection = false
timeout_multiplier = {timeout_multiplier}

[tool.pytest.ini_options]
testpaths = ["tests"]
addopts = "--strict-markers -q"
markers = ["slow: heavy runs kept out of CI", "gpu: needs a CUDA/ROCm device"]
""")


def run_mutmut(t: Target, work: Path, log: Path) -> float:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}   # the scratch copy must win over any checkout
    module = t.path[:-3].replace("/", ".")
    globs = [f"{module}.{f}" for f in t.functions]
    mutmut = Path(sys.executable).with_name("mutmut")
    t0 = time.time()
    with open(log, "w") as f:
        r = subprocess.run([str(mutmut), "run", "--max-children", "1", *globs], cwd=work, env=env, stdout=f,
                           stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise RuntimeError(f"mutmut failed (exit {r.returncode}); see {log}")
    return time.time() - t0


def collect(t: Target, work: Path) -> dict:
    """Statuses of the target's mutants from mutmut's per-file metadata, and the diff of every survivor."""
    meta = json.loads((work / "mutants" / (t.path + ".meta")).read_text())
    module = t.path[:-3].replace("/", ".")
    codes = {k: v for k, v in meta["exit_code_by_key"].items()
             if any(fnmatch.fnmatch(k, f"{module}.{f}") for f in t.functions)}
    status = {k: STATUS.get(v, "suspicious") for k, v in codes.items()}
    counts: dict[str, int] = {}
    for s in status.values():
        counts[s] = counts.get(s, 0) + 1
    survivors = sorted(k for k, s in status.items() if s in ("survived", "no tests", "suspicious"))
    diffs = {}
    if survivors:
        helper = ("import json, sys\nfrom mutmut.mutation.diff_apply import get_diff_for_mutant\n"
                  "print(json.dumps({n: get_diff_for_mutant(n) for n in json.loads(sys.argv[1])}))")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        out = subprocess.run([sys.executable, "-c", helper, json.dumps(survivors)], cwd=work, env=env,
                             capture_output=True, text=True, check=True).stdout
        diffs = json.loads(out)
    tried = sum(v for k, v in counts.items() if k not in ("skipped", "not checked"))
    killed = counts.get("killed", 0) + counts.get("timeout", 0)
    return {"file": t.path, "tests": t.tests, "functions": t.functions, "counts": counts, "tried": tried,
            "killed": killed, "score": killed / tried if tried else None,
            "survivors": [{"name": k, "status": status[k], "diff": diffs.get(k, "")} for k in survivors]}


def write_report(report: dict) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    lines = ["# Mutation testing (mutmut, bench/mutation.py)", "",
             "| label | target | file | tests | tried | killed | survived | no tests | timeout | score | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, targets in report.items():
        for name, r in targets.items():
            c = r["counts"]
            tests = " ".join(r["tests"]) + "".join(f" (without {d.split('::')[-1]})" for d in r.get("deselected", []))
            lines.append(f"| {label} | {name} | {r['file']} | {tests} | {r['tried']} | {r['killed']} | "
                         f"{c.get('survived', 0)} | {c.get('no tests', 0)} | {c.get('timeout', 0)} | "
                         f"{r['score']:.3f} | {r['wall_s']:.0f} |")
    for label, targets in report.items():
        for name, r in targets.items():
            if not r["survivors"]:
                continue
            lines += ["", f"## {label} / {name}: {len(r['survivors'])} not killed", ""]
            for s in r["survivors"]:
                lines += [f"### {s['name']} ({s['status']})", "", "```diff", s["diff"].strip(), "```", ""]
    (OUT / "report.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("targets", nargs="*", help=f"any of {', '.join(TARGETS)} (default: all, one after another)")
    ap.add_argument("--tests-rev", default=None, help="take tests/ from this git revision (a 'before' figure)")
    ap.add_argument("--label", default=None, help="report label (default: 'current', or the --tests-rev)")
    ap.add_argument("--deselect", action="append", default=[], metavar="NODEID",
                    help="leave out a test that fails on this machine before any mutant, or one too slow to run per "
                         "mutant (repeatable; noted in the report)")
    ap.add_argument("--timeout-multiplier", type=float, default=3.0,
                    help="a mutant times out (and counts as killed) after (its tests' clean time + 1 s) x this many "
                         "seconds; mutmut's default 15 makes each hanging mutant of a target whose tests take a "
                         "minute cost 13 minutes")
    args = ap.parse_args(argv)
    names = args.targets or list(TARGETS)
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        ap.error(f"unknown target(s) {unknown}; choose from {list(TARGETS)}")
    label = args.label or (f"tests@{args.tests_rev}" if args.tests_rev else "current")
    for name in names:
        t = TARGETS[name]
        work = OUT / "work" / label / name
        print(f"mutation: {name} ({t.path}, functions {', '.join(t.functions)}) against {', '.join(t.tests)}",
              flush=True)
        prepare(name, t, work, args.tests_rev, args.deselect, args.timeout_multiplier)
        wall = run_mutmut(t, work, OUT / f"{label}_{name}.log")
        r = collect(t, work) | {"wall_s": wall, "tests_rev": args.tests_rev, "deselected": args.deselect,
                                "timeout_multiplier": args.timeout_multiplier}
        # read just before writing: a run of another target may have finished meanwhile
        report = json.loads((OUT / "report.json").read_text()) if (OUT / "report.json").exists() else {}
        report.setdefault(label, {})[name] = r
        write_report(report)
        print(f"mutation: {name}: {r['killed']}/{r['tried']} killed = {r['score']:.3f} ({r['counts']}) in {wall:.0f} s",
              flush=True)
    print(f"mutation: report in {OUT / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
