"""Serving benchmark: the OpenAI-compatible server (openzaya/serve.py) on loopback, streaming clients over HTTP.

For 1, 8 and 32 concurrent clients (each sends `--requests-per-client` streaming chat requests one after the other):
throughput (completion tokens/s over the wall time), and p50/p99 of request latency and time to first token.
Then the server's throughput at 32 clients against the engine's offline throughput (`Engine.generate`) on the same
workload: the same prompts, greedy, eos disabled so every request decodes exactly `--new-tokens` tokens, same slots.
Target: >= 80%.

The clients run in a separate process (as vLLM's benchmark_serving does), so their HTTP parsing does not take the
server's GIL; `--clients-in-process` runs them on the server's interpreter instead (both numbers are worth knowing
on a 2-core machine).

    .venv/bin/python bench/serve.py [--quick] [--threads 1] [--clients-in-process]

Prints the figures and writes runs/bench/serve.json.
"""

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

# -----------------------------------------------------------------------------
# CLI
parser = argparse.ArgumentParser(description="openzaya serve benchmark")
parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
parser.add_argument("--threads", type=int, default=-1, help="torch threads (-1 = torch default)")
parser.add_argument("--new-tokens", type=int, default=64)
parser.add_argument("--requests-per-client", type=int, default=2)
parser.add_argument("--slots", type=int, default=32)
parser.add_argument("--clients-in-process", action="store_true",
                    help="run the HTTP clients on the server's interpreter (default: a separate process)")
parser.add_argument("--out", default="runs/bench/serve.json")
parser.add_argument("--rounds", type=int, default=2,
                    help="offline and 32-client runs, interleaved; the ratio uses the best of each")
parser.add_argument("--client-of", default=None, help=argparse.SUPPRESS)   # internal: be the client process
parser.add_argument("--levels", default="1,8,32", help=argparse.SUPPRESS)
args = parser.parse_args()
N = 16 if args.quick else args.new_tokens
RPC = 1 if args.quick else args.requests_per_client


def messages(i):
    return [{"role": "user", "content": f"What is {i % 40} plus {(7 * i) % 40}? Think step by step."}]


# -----------------------------------------------------------------------------
# clients: concurrent streaming chat requests
async def one_request(client, model_name, i):
    body = {"model": model_name, "messages": messages(i), "max_tokens": N, "temperature": 0, "stream": True}
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


async def run_level(url, model_name, c):
    limits = httpx.Limits(max_connections=c, max_keepalive_connections=c)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def worker(w):
            return [await one_request(client, model_name, w * RPC + k) for k in range(RPC)]
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


if args.client_of:   # the client process: run the levels against the given server, print them as JSON
    url, model_name = args.client_of.split(" ", 1)
    print(json.dumps([asyncio.run(run_level(url, model_name, int(c))) for c in args.levels.split(",")]))
    sys.exit(0)

import torch  # noqa: E402  (the client process does not need it)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from server_thread import ServerThread  # noqa: E402

from openzaya.checkpoint import save_pretrained  # noqa: E402
from openzaya.engine import GenParams  # noqa: E402
from openzaya.model import ZayaConfig, ZayaForCausalLM, count_params  # noqa: E402
from openzaya.serve import ServeConfig, load_app  # noqa: E402
from openzaya.tokenizer import train_bpe  # noqa: E402

if args.threads > 0:
    torch.set_num_threads(args.threads)

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


# -----------------------------------------------------------------------------
# offline: Engine.generate on the 32-client workload (32 x RPC requests)
n_req = 32 * RPC
prompts = [tok.apply_chat_template(messages(i), add_generation_prompt=True, tokenize=True) for i in range(n_req)]
params = GenParams(temperature=0, max_new_tokens=N, eos_ids=[])
srv.engine.generate(prompts[:2], GenParams(temperature=0, max_new_tokens=4, eos_ids=[]))   # warm-up


def offline_tok_s():
    t0 = time.perf_counter()
    srv.engine.generate(prompts, params)
    return n_req * N / (time.perf_counter() - t0)


def levels(server, cs):
    if args.clients_in_process:
        return [asyncio.run(run_level(server.url, srv.model_name, c)) for c in cs]
    cmd = [sys.executable, __file__, "--client-of", f"{server.url} {srv.model_name}", "--levels",
           ",".join(map(str, cs)), "--new-tokens", str(N), "--requests-per-client", str(RPC)]
    return json.loads(subprocess.run(cmd + (["--quick"] if args.quick else []), check=True, capture_output=True,
                                     text=True).stdout)


def show(res):
    print(f"{res['clients']:2d} clients: {res['tok_s']:7.1f} tok/s | latency p50 {res['latency_p50_s']:.2f}s p99 "
          f"{res['latency_p99_s']:.2f}s | ttft p50 {res['ttft_p50_s']:.3f}s p99 {res['ttft_p99_s']:.3f}s")


# -----------------------------------------------------------------------------
# server: concurrent streaming clients; then offline and 32 clients interleaved, `--rounds` times
report = {"threads": torch.get_num_threads(), "quick": args.quick, "new_tokens": N, "slots": args.slots,
          "requests_per_client": RPC, "clients_in_process": args.clients_in_process, "rounds": args.rounds}
with ServerThread(app) as server:
    levels(server, [1])   # warm-up (connections, first pass)
    report["levels"] = levels(server, [1, 8, 32])
    for res in report["levels"]:
        show(res)
    offline, at32 = [], []
    for _ in range(args.rounds):
        offline.append(offline_tok_s())
        at32.append(levels(server, [32])[0]["tok_s"])
        print(f"offline engine {offline[-1]:.1f} tok/s | server at 32 clients {at32[-1]:.1f} tok/s")
report["offline_engine_tok_s"], report["server_at_32_tok_s"] = offline, at32
ratio = max(at32) / max(offline)
report["server_vs_offline_at_32"] = ratio
print(f"server / offline engine throughput at 32 clients (best of {args.rounds} each): {ratio:.2f} (target >= 0.80)")
Path(args.out).parent.mkdir(parents=True, exist_ok=True)
Path(args.out).write_text(json.dumps(report, indent=2))
print(f"wrote {args.out}")
