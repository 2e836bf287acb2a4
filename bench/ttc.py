"""Benchmark of the TTC engine on a tiny local model (CPU): orchestration overhead, prompt length per round for
full-chain RSA vs Markovian RSA, and tokens per problem.

- overhead = (wall time of the markovian_rsa run - time inside backend.agenerate) / wall time; target < 10%.
- prompt length per round: the largest prompt (backend count, chat template included) each round, for rsa (whole
  candidate texts: ~ |q| + C x beta) and markovian_rsa (tails: <= |q| + C x tau + template), next to the bound.

Run: .venv/bin/python bench/ttc.py   (writes runs/bench/ttc.json)
"""

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_local_backend import make_checkpoint  # noqa: E402

from openzaya.backends import LocalBackend  # noqa: E402
from openzaya.ttc import TTCConfig, TTCProblem, solve  # noqa: E402

torch.set_num_threads(1)
model_dir = Path("runs/ttc/tiny-model")
if not (model_dir / "config.json").exists():
    make_checkpoint(model_dir)
backend = LocalBackend(model_dir, max_slots=32, max_len=2048)
problems = [TTCProblem(f"p{i}", f"{i} plus {i + 3} is") for i in range(8)]
base = dict(population=8, candidates=4, rounds=3, tail_tokens=16, budget_tokens=96, temperature=1.0, top_p=1.0)

out = {"model": str(model_dir), "problems": len(problems), "config": base, "methods": {}}
for method in ["markovian_rsa", "rsa"]:
    cfg = TTCConfig(method=method, **base)
    t0 = time.perf_counter()
    results, totals = solve(problems, backend, cfg)
    wall = time.perf_counter() - t0
    per_round = [max(r.rounds[t].max_prompt_tokens for r in results) for t in range(cfg.rounds + 1)]
    bound = [max(r.rounds[t].max_bound_tokens for r in results) for t in range(cfg.rounds + 1)]
    content = [max(r.rounds[t].max_content_tokens for r in results) for t in range(cfg.rounds + 1)]
    rec = {"wall_s": wall, "backend_s": totals["backend_s"], "overhead": 1 - totals["backend_s"] / wall,
           "calls": totals["calls"], "max_prompt_tokens_per_round": per_round,
           "max_aggregation_text_tokens_per_round": content, "bound_per_round": bound,
           "prompt_tokens_per_problem": totals["prompt_tokens"] / len(problems),
           "completion_tokens_per_problem": totals["completion_tokens"] / len(problems)}
    out["methods"][method] = rec
    print(f"{method:14s} wall {wall:6.2f}s | in backend {totals['backend_s']:6.2f}s | overhead {rec['overhead']:6.1%}"
          f" | calls {rec['calls']} | max prompt tokens per round {per_round} (aggregation text {content[1:]}, "
          f"bound |q|+C*tau+template {bound[1:]}) | tokens/problem "
          f"prompt {rec['prompt_tokens_per_problem']:.0f} completion {rec['completion_tokens_per_problem']:.0f}")
Path("runs/bench").mkdir(parents=True, exist_ok=True)
Path("runs/bench/ttc.json").write_text(json.dumps(out, indent=1))
print("wrote runs/bench/ttc.json")
