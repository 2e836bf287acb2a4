"""Environment throughput: problems generated and scored per second per source, math verifications per second
through the math-verify pool, and sandbox runs per second. Prints a table and writes runs/bench/envs.json.

Run: .venv/bin/python bench/envs.py            (about 1-2 minutes on 2 cores)
     .venv/bin/python bench/envs.py --seconds 10   (time budget per measurement)
"""

import argparse
import json
import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from openzaya.envs.code import load_code
from openzaya.envs.ifeval import load_ifeval
from openzaya.envs.registry import own_envs
from openzaya.envs.rgym import load_rgym
from openzaya.envs.rlve import load_rlve
from openzaya.sandbox import run_python
from openzaya.verify import check_many, check_math

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--seconds", type=float, default=8.0, help="time budget per measurement")
parser.add_argument("--out", default="runs/bench/envs.json")
args = parser.parse_args()

# -----------------------------------------------------------------------------
# problems generated + scored per second (reference answer and an empty reply), round robin over envs


def env_rate(envs: dict, seconds: float, max_difficulty: int = 3) -> dict:
    names = sorted(envs)
    random.Random(0).shuffle(names)
    n = errors = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        env = envs[names[n % len(names)]]
        try:
            p = env.generate(min(env.max_difficulty, n % (max_difficulty + 1)), 1000 + n)
            env.score(p, f"\\boxed{{{p.answer}}}")
            env.score(p, "")
        except Exception:   # a generator timeout counts against the rate, not the benchmark
            errors += 1
        n += 1
    dt = time.perf_counter() - t0
    return {"envs": len(envs), "problems": n, "errors": errors, "seconds": round(dt, 2),
            "problems_per_s": round(n / dt, 2)}


results = {}
t_load = time.perf_counter()
sources = {"openzaya": {e.name: e for e in own_envs()}, "reasoning_gym": load_rgym(), "rlve": load_rlve(),
           "code": load_code(), "ifeval": load_ifeval()}
results["load_s"] = round(time.perf_counter() - t_load, 2)
for k in ("reasoning_gym", "rlve"):   # warm the worker pools (start-up is not throughput)
    e = next(iter(sources[k].values()))
    e.generate(0, 0)
for name, envs in sources.items():
    results[name] = env_rate(envs, args.seconds if name != "code" else 2 * args.seconds)
    print(f"{name:14s} {results[name]['problems_per_s']:8.1f} problems/s  ({results[name]['envs']} envs, "
          f"{results[name]['errors']} errors)", file=sys.stderr)

# -----------------------------------------------------------------------------
# math verifications per second (pairs that need math-verify, not the fast path)

check_math("1/2", "0.5")   # warm
rng = random.Random(0)
pairs = []
for _ in range(400):
    a, b = rng.randint(1, 50), rng.randint(1, 50)
    pairs.append((f"\\frac{{{a}}}{{{b}}}", rng.choice([f"{a}/{b}", f"{a / b:.6f}", f"\\dfrac{{{a}}}{{{b + 1}}}"])))
t0 = time.perf_counter()
verdicts = check_many(pairs)
dt = time.perf_counter() - t0
results["math_verify"] = {"pairs": len(pairs), "seconds": round(dt, 2), "checks_per_s": round(len(pairs) / dt, 1),
                          "correct": sum(v.correct for v in verdicts)}
t0 = time.perf_counter()
fast = check_many([(str(i), f"**{i:,}**") for i in range(20000)])
results["math_fast_path_per_s"] = round(20000 / (time.perf_counter() - t0))

# -----------------------------------------------------------------------------
# sandbox runs per second, serial and with 2 threads


def sandbox_rate(threads: int, seconds: float) -> float:
    done = 0
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        while time.perf_counter() - t0 < seconds:
            done += sum(r.ok for r in ex.map(lambda _: run_python("print(sum(range(1000)))"), range(threads)))
    return round(done / (time.perf_counter() - t0), 2)


results["sandbox"] = {"serial_runs_per_s": sandbox_rate(1, args.seconds / 2),
                      "2_threads_runs_per_s": sandbox_rate(2, args.seconds / 2)}

# -----------------------------------------------------------------------------
# report

print(f"\n{'measurement':34s} {'rate':>10s}  unit")
for name in sources:
    print(f"{name + ' envs':34s} {results[name]['problems_per_s']:10.1f}  problems generated+scored / s "
          f"({results[name]['envs']} envs)")
print(f"{'math-verify pool':34s} {results['math_verify']['checks_per_s']:10.1f}  checks / s")
print(f"{'math fast path':34s} {results['math_fast_path_per_s']:10d}  checks / s")
print(f"{'sandbox, serial':34s} {results['sandbox']['serial_runs_per_s']:10.1f}  runs / s")
print(f"{'sandbox, 2 threads':34s} {results['sandbox']['2_threads_runs_per_s']:10.1f}  runs / s")
results["cpu_count"] = os.cpu_count()
os.makedirs(os.path.dirname(args.out), exist_ok=True)
with open(args.out, "w") as f:
    json.dump(results, f, indent=2)
print(f"wrote {args.out}")
