"""RL with rollouts from inference servers (openzaya/rollout.py, weight_sync.py), measured in one run: rollout tokens/s
with 1 vs 2 `openzaya serve` servers, the weight-push latency per version (disk vs broadcast), and the trainer-vs-
server logprob mismatch.

- Policy: a `--preset` model (nano by default) with random weights and a byte-level tokenizer; the task is
  tests/test_rl_loop.py's digits task (reward = share of digits among the generated characters), so the reward moves
  within a few steps whatever the model.
- Servers: `openzaya serve --enable-weight-updates --enable-return-routed-experts` processes (`--server-threads`
  torch threads each, `--server-device`); the trainer runs in this process on `--device`.
- Rollout throughput of the pool alone (no training): `--pool-jobs` jobs of G samples submitted at once to 1, then
  2 servers; tokens/s = sampled tokens / wall time until the last result (what the servers give; inside an RL run
  the trainer's consumption of groups caps it).
- RL runs, each from the same initial weights for `--steps` steps: `--runs` (default: 1 server disk, 2 servers disk,
  2 servers broadcast). Rollout tokens/s there = tokens generated / wall time from the first job to the last step. Push latency: per version and server, the push alone (writing
  the checkpoint or gathering + sending the tensors, and the server's load); the probe that verifies it is apart.
  Mismatch: mean |trainer - sampler logprob| and max over the steps whose samples were all on-policy (stale 0), and
  the probe's mean difference (same weights on both sides: the numeric part alone).
NOTE: on the shared 2-core CPU machine the servers and the trainer share two cores: compare ratios within one run.
The broadcast path needs the trainer and the servers on the same kind of device (gloo on CPU, NCCL on GPUs; NCCL
needs a GPU per rank).

    .venv/bin/python bench/rl_pool.py [--steps 8] [--runs 1:disk,2:disk,2:broadcast] [--preset nano]

Prints a table and writes runs/bench/rl_pool.json.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from openzaya import model as model_presets, rl_loop              # noqa: E402
from openzaya.checkpoint import save_pretrained                   # noqa: E402
from openzaya.model import ZayaForCausalLM                        # noqa: E402
from openzaya.tokenizer import train_bpe                          # noqa: E402
from test_rl_loop import digits_env                               # noqa: E402

parser = argparse.ArgumentParser(description="RL rollouts from inference servers: throughput, push latency, mismatch")
parser.add_argument("--steps", type=int, default=8)
parser.add_argument("--runs", default="1:disk,2:disk,2:broadcast", help="servers:sync, comma-separated")
parser.add_argument("--preset", default="nano")
parser.add_argument("--device", default="cpu", help="the trainer's device")
parser.add_argument("--server-device", default="cpu")
parser.add_argument("--server-threads", type=int, default=1)
parser.add_argument("--spread-gpus", action="store_true", help="server i on GPU i + 1 (the trainer keeps GPU 0)")
parser.add_argument("--prompts-per-step", type=int, default=4)
parser.add_argument("--samples-per-prompt", type=int, default=8)
parser.add_argument("--max-new-tokens", type=int, default=32)
parser.add_argument("--lr", type=float, default=3e-3)
parser.add_argument("--pool-jobs", type=int, default=16, help="jobs of the pool-alone throughput test (0 = skip)")
parser.add_argument("--out", default="runs/bench/rl_pool.json")
args = parser.parse_args()
work = Path(args.out).with_suffix("")
work.mkdir(parents=True, exist_ok=True)

# ---- the initial policy
tok = train_bpe(["hello world 123"], vocab_size=264)
cfg = getattr(model_presets, args.preset)(vocab_size=tok.vocab_size)
cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_id, tok.eos_id, tok.pad_id
torch.manual_seed(0)
init = work / "init"
save_pretrained(ZayaForCausalLM(cfg), init)
tok.save(init)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(i: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.server_threads),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if args.spread_gpus:
        env["CUDA_VISIBLE_DEVICES"] = str(i + 1)
    proc = subprocess.Popen([sys.executable, "-m", "openzaya.cli", "serve", "--model", str(init), "--port", str(port),
                             "--device", args.server_device, "--threads", str(args.server_threads),
                             "--max-slots", str(args.prompts_per_step * args.samples_per_prompt * 2),
                             "--max-len", "256",
                             "--enable-weight-updates", "--enable-return-routed-experts"],
                            env=env, stdout=open(work / f"serve{i}.log", "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    raise RuntimeError(f"server {i} did not start: {(work / f'serve{i}.log').read_text()[-2000:]}")


def one_run(n_servers: int, sync: str) -> dict:
    servers = [start_server(i) for i in range(n_servers)]
    try:
        rc = rl_loop.RLConfig(stage="bench", envs=["digits"], steps=args.steps, lr=args.lr, reward="reward",
                              canary=False, chat=False, prompts_per_step=args.prompts_per_step,
                              samples_per_prompt=args.samples_per_prompt, max_new_tokens=args.max_new_tokens,
                              server_url=[u for _, u in servers], weight_sync=sync, device=args.device,
                              out=str(work / f"run_{n_servers}_{sync}"), save_every=10_000)
        t0 = time.perf_counter()
        res = rl_loop.run(rc, init_dir=str(init), envs=digits_env())
        wall = time.perf_counter() - t0
    finally:
        for p, _ in servers:
            p.kill()
            p.wait()
    m = res["metrics"]
    pushes = [p for r in m for p in r["pushes"]]
    fresh = [r for r in m if r["stale_max"] == 0]
    return {"servers": n_servers, "sync": sync, "wall_s": wall, "gen_tokens": sum(r["gen_tokens"] for r in m),
            "rollout_tok_s": sum(r["gen_tokens"] for r in m) / max(m[-1]["elapsed_s"], 1e-9),
            "push_s_mean": sum(p["push_s"] for p in pushes) / len(pushes),
            "push_s_max": max(p["push_s"] for p in pushes), "pushes": len(pushes),
            "probe_diff_max": max(p["probe_diff"] for p in pushes),
            "mismatch_fresh_mean": sum(r["mismatch"] for r in fresh) / len(fresh) if fresh else None,
            "mismatch_fresh_max": max((r["mismatch_max"] for r in fresh), default=None),
            "mismatch_all_mean": sum(r["mismatch"] for r in m) / len(m),
            "stale_mean": sum(r["stale_mean"] for r in m) / len(m),
            "reward_first": m[0]["reward"], "reward_last": m[-1]["reward"]}


def pool_only(n_servers: int) -> dict:
    """Rollout tokens/s of a ServerPool alone: --pool-jobs jobs submitted at once, every result awaited."""
    from openzaya.rollout import ServerPool
    servers = [start_server(i) for i in range(n_servers)]
    try:
        pool = ServerPool([u for _, u in servers], None, lambda r: r, [], 1.0, 600.0)
        pool.publish(None, 0)                    # no sync: the servers serve the initial weights, version 0
        prompt = tok.encode("Write digits.")
        t0, got = time.perf_counter(), []
        for j in range(args.pool_jobs):
            pool.submit({"job_id": j, "prompt_ids": prompt, "G": args.samples_per_prompt, "seed": j,
                         "temperature": 1.0, "max_new_tokens": args.max_new_tokens, "eos_ids": [tok.eos_id]})
        while len(got) < args.pool_jobs:
            got += pool.results()
        wall = time.perf_counter() - t0
        pool.close()
    finally:
        for p, _ in servers:
            p.kill()
            p.wait()
    tokens = sum(len(s["tokens"]) for r in got for s in r["samples"])
    per_server = {u: sum(1 for r in got if r["server"] == u) for _, u in servers}
    return {"servers": n_servers, "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall, "jobs_per_server": per_server}


pool_results = []
if args.pool_jobs:
    for n in (1, 2):
        pool_results.append(pool_only(n))
        r = pool_results[-1]
        print(f"pool alone, {n} server(s): {r['tok_s']:.1f} tok/s ({r['tokens']} tokens in {r['wall_s']:.1f} s; "
              f"jobs per server {list(r['jobs_per_server'].values())})", flush=True)
    print(f"pool alone, 2 servers / 1 server: {pool_results[1]['tok_s'] / pool_results[0]['tok_s']:.2f}")
results = []
for spec in [x for x in args.runs.split(",") if x]:
    n, sync = spec.split(":")
    results.append(one_run(int(n), sync))
    r = results[-1]
    print(f"{r['servers']} server(s) {r['sync']:9s} | rollout tok/s {r['rollout_tok_s']:7.1f} | "
          f"push {r['push_s_mean']:.3f} s "
          f"(max {r['push_s_max']:.3f}, {r['pushes']} pushes) | probe diff max {r['probe_diff_max']:.1e} | mismatch "
          f"fresh {r['mismatch_fresh_mean'] if r['mismatch_fresh_mean'] is not None else float('nan'):.1e} / max "
          f"{r['mismatch_fresh_max'] if r['mismatch_fresh_max'] is not None else float('nan'):.1e}, all steps "
          f"{r['mismatch_all_mean']:.1e} | stale {r['stale_mean']:.2f} | reward {r['reward_first']:.3f} -> "
          f"{r['reward_last']:.3f}", flush=True)
one = [r for r in results if r["servers"] == 1]
two = [r for r in results if r["servers"] == 2 and r["sync"] == "disk"]
if one and two:
    print(f"rollout tok/s, 2 servers / 1 server (disk): {two[0]['rollout_tok_s'] / one[0]['rollout_tok_s']:.2f}")
Path(args.out).write_text(json.dumps({"args": vars(args), "pool_alone": pool_results, "results": results},
                                      indent=1))
print("wrote", args.out)
