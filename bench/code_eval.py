"""Code-evaluation throughput: tests per second through openzaya/codebench.py (one sandbox per test, samples in
parallel), and the sandbox's overhead per test against running the same programs in a plain subprocess (same
interpreter, same main.py, no namespaces, no limits). The workload is every test of `code:mini` run on its
reference solutions (all pass, so every test runs). Then every test once more in the sandbox and plainly, back to back:
the median per-test ratio and overhead, robust to the load bursts of a shared machine (the totals are not). Prints
a table and writes runs/bench/code_eval.json.

Run: .venv/bin/python bench/code_eval.py                      (2-3 minutes on 2 shared cores)
     .venv/bin/python bench/code_eval.py --workers 1,2,4 --limit 10
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from openzaya.codebench import CodeLimits, extract_code, load, program_source, run_test, run_tests, stdout_matches
from openzaya.sandbox import PYTHON, resolve_mode, results_equal

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--workers", default=f"1,{os.cpu_count()}", help="comma list of parallel sandboxes to measure")
parser.add_argument("--limit", type=int, default=None, help="first problems of code:mini only")
parser.add_argument("--out", default="runs/bench/code_eval.json")
args = parser.parse_args()

items = load("code:mini", limit=args.limit)
programs = [(it.code, extract_code(f"```python\n{it.answer}\n```")) for it in items]
n_tests = sum(len(task.tests) for task, _ in programs)
lim = CodeLimits(time_s=6, memory_mb=1024)

# -----------------------------------------------------------------------------
# through the harness: one sandbox per test, one sample per worker


def harness(workers: int) -> dict:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        verdicts = list(pool.map(lambda p: run_tests(p[0], p[1], lim), programs))
    dt = time.perf_counter() - t0
    tests = sum(len(v.tests) for v in verdicts)
    assert tests == n_tests and all(v.verdict == "passed" for v in verdicts), [v.verdict for v in verdicts]
    return {"workers": workers, "tests": tests, "seconds": round(dt, 2), "tests_per_s": round(tests / dt, 2)}


# -----------------------------------------------------------------------------
# the same programs in a plain subprocess (the functional call through stdin), no isolation


CALL = "\nimport json as _j, sys as _s\nprint(_j.dumps(_oz_entry(*_j.loads(_s.stdin.read()))))\n"


def plain_one(task, program: str, i: int) -> bool:
    test = task.tests[i]
    if task.entry_point is None:
        r = subprocess.run([PYTHON, "-S", "-s", "-c", program], input=test.input, capture_output=True, text=True,
                           timeout=2 * lim.time_s + 1, env={"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0"})
        return r.returncode == 0 and stdout_matches(r.stdout, test.output)
    r = subprocess.run([PYTHON, "-S", "-s", "-c", program + CALL], input=json.dumps(test.input),
                       capture_output=True, text=True, timeout=2 * lim.time_s + 1,
                       env={"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0"})
    return r.returncode == 0 and results_equal(json.loads(r.stdout), test.output)


def plain(workers: int) -> dict:
    jobs = [(task, program_source(task, code)) for task, code in programs]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        ok = list(pool.map(lambda j: all(plain_one(j[0], j[1], i) for i in range(len(j[0].tests))), jobs))
    dt = time.perf_counter() - t0
    assert all(ok)
    return {"workers": workers, "tests": n_tests, "seconds": round(dt, 2), "tests_per_s": round(n_tests / dt, 2)}


def paired() -> dict:
    """Each test run in the sandbox and then plainly, back to back (one at a time): the median per-test ratio and
    difference, which a load burst on the shared machine moves far less than the totals above."""
    pairs = []
    for task, code in programs:
        program = program_source(task, code)
        for i in range(len(task.tests)):
            t0 = time.perf_counter()
            assert run_test(task, program, i, lim).verdict == "passed"
            t1 = time.perf_counter()
            assert plain_one(task, program, i)
            pairs.append((t1 - t0, time.perf_counter() - t1))
    return {"tests": len(pairs), "median_sandbox_ms": round(1000 * statistics.median(a for a, _ in pairs), 1),
            "median_plain_ms": round(1000 * statistics.median(b for _, b in pairs), 1),
            "median_ratio": round(statistics.median(a / b for a, b in pairs), 2),
            "median_overhead_ms": round(1000 * statistics.median(a - b for a, b in pairs), 1)}


# -----------------------------------------------------------------------------
# measure (alternating, so load drifts hit both alike) and report

results = {"problems": len(items), "tests": n_tests, "sandbox_mode": resolve_mode("auto"), "cpu_count": os.cpu_count(),
           "load_avg_before": os.getloadavg()[0], "runs": []}
for w in [int(x) for x in args.workers.split(",")]:
    s, p = harness(w), plain(w)
    overhead_ms = 1000 * (s["seconds"] - p["seconds"]) * w / n_tests
    results["runs"].append({"workers": w, "sandbox": s, "plain": p, "ratio": round(s["seconds"] / p["seconds"], 2),
                            "overhead_ms_per_test": round(overhead_ms, 1)})
    print(f"workers {w}: sandbox {s['tests_per_s']:7.1f} tests/s | plain subprocess {p['tests_per_s']:7.1f} tests/s "
          f"| sandbox/plain time {s['seconds'] / p['seconds']:.2f}x | overhead {overhead_ms:.0f} ms per test "
          f"(per worker)", file=sys.stderr)
results["paired"] = paired()
pr = results["paired"]
print(f"paired, one test at a time: sandbox {pr['median_sandbox_ms']} ms | plain {pr['median_plain_ms']} ms per test "
      f"(medians) | ratio {pr['median_ratio']}x | overhead {pr['median_overhead_ms']} ms per test", file=sys.stderr)
results["load_avg_after"] = os.getloadavg()[0]
os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
with open(args.out, "w") as f:
    json.dump(results, f, indent=2)
print(json.dumps(results["runs"]))
print(f"wrote {args.out} ({len(items)} problems, {n_tests} tests, sandbox mode {results['sandbox_mode']}, "
      f"load {results['load_avg_before']:.1f} -> {results['load_avg_after']:.1f})")
