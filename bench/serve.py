"""Serving benchmark: the OpenAI-compatible server (openzaya/serve.py) on loopback, streaming clients over HTTP.

For 1, 8 and 32 concurrent clients (each sends `--requests-per-client` streaming chat requests one after the other):
throughput (completion tokens/s over the wall time), and p50/p99 of request latency and time to first token.
Then the server's throughput at 32 clients against the engine's offline throughput (`Engine.generate`) on the same
workload: the same prompts, greedy, eos disabled so every request decodes exactly `--new-tokens` tokens, same slots.
Target: >= 80%.

    .venv/bin/python bench/serve.py [--quick] [--threads 1]

Prints the figures and writes runs/bench/serve.json.
"""

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import torch

from openzaya.checkpoint import save_pretrained
from openzaya.engine import GenParams
from openzaya.model import ZayaConfig, ZayaForCausalLM, count_params
from openzaya.serve import ServeConfig, ServerThread, load_app
from openzaya.tokenizer import train_bpe

# -----------------------------------------------------------------------------
# CLI
parser = argparse.ArgumentParser(description="openzaya serve benchmark")
parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
parser.add_argument("--threads", type=int, default=-1, help="torch threads (-1 = torch default)")
parser.add_argument("--new-tokens", type=int, default=64)
parser.add_argument("--requests-per-client", type=int, default=2)
parser.add_argument("--slots", type=int, default=32)
parser.add_argument("--out", default="runs/bench/serve.json")
args = parser.parse_args()
if args.threads > 0:
    torch.set_num_threads(args.threads)
N = 16 if args.quick else args.new_tokens
RPC = 1 if args.quick else args.requests_per_client

# -----------------------------------------------------------------------------
# model + tokenizer checkpoint (random weights: the benchmark measures serving, not quality)
texts = [f"{a} plus {b} is {a + b}." for a in range(40) for b in range(40)]
tok = train_bpe(texts, vocab_size=300)   # small enough that every id is a real token
cfg = ZayaConfig(vocab_size=tok.vocab_size, hidden_size=256, num_hidden_layers=8, num_attention_heads=8,
                 num_key_value_heads=2, head_dim=32, moe_intermediate_size=512, num_experts=16, router_hidden_size=64,
                 bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
torch.manual_seed(0)
tmp = Path(tempfile.mkdtemp(prefix="openzaya-bench-serve-"))
save_pretrained(ZayaForCausalLM(cfg), tmp / "m")
tok.save(tmp / "m")
app = load_app(tmp / "m", ServeConfig(max_slots=args.slots, max_len=256, max_queue=1024))
srv = app.state.srv
srv.eos_ids = []                     # every request decodes exactly N tokens
print(f"model: {count_params(cfg)['total'] / 1e6:.1f}M params, threads {torch.get_num_threads()}, slots {args.slots}, "
      f"{N} new tokens per request")


def messages(i):
    return [{"role": "user", "content": f"What is {i % 40} plus {(7 * i) % 40}? Think step by step."}]


# -----------------------------------------------------------------------------
# offline: Engine.generate on the 32-client workload (32 x RPC requests)
n_req = 32 * RPC
prompts = [tok.apply_chat_template(messages(i), add_generation_prompt=True, tokenize=True) for i in range(n_req)]
params = GenParams(temperature=0, max_new_tokens=N, eos_ids=[])
srv.engine.generate(prompts[:2], GenParams(temperature=0, max_new_tokens=4, eos_ids=[]))   # warm-up
t0 = time.perf_counter()
srv.engine.generate(prompts, params)
offline_s = time.perf_counter() - t0
offline_tps = n_req * N / offline_s
print(f"offline engine: {offline_tps:.1f} tok/s ({n_req} requests in {offline_s:.1f}s)")


# -----------------------------------------------------------------------------
# server: concurrent streaming clients
async def one_request(client, i):
    body = {"model": srv.model_name, "messages": messages(i), "max_tokens": N, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    ttft, usage = None, None
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, r.status_code
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ch = json.loads(line[6:])
            if "error" in ch:
                raise RuntimeError(ch["error"])
            if ttft is None and ch["choices"] and (ch["choices"][0]["delta"].get("content")
                                                   or ch["choices"][0]["delta"].get("reasoning_content")):
                ttft = time.perf_counter() - t0
            usage = ch.get("usage") or usage
    return time.perf_counter() - t0, ttft, usage["completion_tokens"]


async def run_level(c):
    limits = httpx.Limits(max_connections=c, max_keepalive_connections=c)
    async with httpx.AsyncClient(base_url=server.url, timeout=600, limits=limits) as client:
        async def worker(w):
            return [await one_request(client, w * RPC + k) for k in range(RPC)]
        t0 = time.perf_counter()
        per = await asyncio.gather(*(worker(w) for w in range(c)))
        wall = time.perf_counter() - t0
    rows = [x for p in per for x in p]
    lat = sorted(r[0] for r in rows)
    ttft = sorted(r[1] for r in rows if r[1] is not None)
    q = lambda xs, p: xs[min(len(xs) - 1, int(p * len(xs)))]   # noqa: E731
    tokens = sum(r[2] for r in rows)
    return {"clients": c, "requests": len(rows), "completion_tokens": tokens, "wall_s": wall,
            "tok_s": tokens / wall, "latency_p50_s": statistics.median(lat), "latency_p99_s": q(lat, 0.99),
            "ttft_p50_s": statistics.median(ttft), "ttft_p99_s": q(ttft, 0.99)}


report = {"threads": torch.get_num_threads(), "quick": args.quick, "new_tokens": N, "slots": args.slots,
          "requests_per_client": RPC, "offline_engine_tok_s": offline_tps, "levels": []}
with ServerThread(app) as server:
    asyncio.run(run_level(1))   # warm-up (connection, first compile-free pass)
    for c in (1, 8, 32):
        res = asyncio.run(run_level(c))
        report["levels"].append(res)
        print(f"{c:2d} clients: {res['tok_s']:7.1f} tok/s | latency p50 {res['latency_p50_s']:.2f}s p99 "
              f"{res['latency_p99_s']:.2f}s | ttft p50 {res['ttft_p50_s']:.3f}s p99 {res['ttft_p99_s']:.3f}s")
ratio = report["levels"][-1]["tok_s"] / offline_tps
report["server_vs_offline_at_32"] = ratio
print(f"server / offline engine throughput at 32 clients: {ratio:.2f} (target >= 0.80)")
Path(args.out).parent.mkdir(parents=True, exist_ok=True)
Path(args.out).write_text(json.dumps(report, indent=2))
print(f"wrote {args.out}")
