"""LM-head log-prob benchmark: our chunked fp32 `lm_head_logprobs` vs the plain full-logits path
(`log_softmax(h W^T)` then gather, what `F.cross_entropy` on model logits costs), forward + backward, at the released
ZAYA1 vocabulary (262,272). Each implementation runs in its own process, so its peak RSS is its own.

    .venv/bin/python bench/lm_head.py [--tokens 4096] [--hidden 256] [--vocab 262272] [--quick]

Prints time and peak RSS of both, the ratios, and writes runs/bench/lm_head.json.
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("--tokens", type=int, default=4096)
parser.add_argument("--hidden", type=int, default=256)
parser.add_argument("--vocab", type=int, default=262272)
parser.add_argument("--quick", action="store_true", help="32K vocabulary (a smoke run)")
parser.add_argument("--impl", choices=["full", "chunked"], help="(internal) run one implementation and print JSON")
parser.add_argument("--out", default="runs/bench/lm_head.json")
args = parser.parse_args()
if args.quick:
    args.vocab = 32768

if args.impl:   # child process: one forward + backward, then report time, peak RSS and a checksum
    import torch

    from openzaya.model import lm_head_logprobs
    torch.manual_seed(0)
    N, D, V = args.tokens, args.hidden, args.vocab
    h = torch.randn(N, D, requires_grad=True)
    w = (torch.randn(V, D) * 0.02).requires_grad_()
    target = torch.randint(0, V, (N,))
    t0 = time.perf_counter()
    if args.impl == "full":
        logp = torch.log_softmax(h @ w.T, dim=-1).gather(1, target[:, None])[:, 0]
    else:
        logp = lm_head_logprobs(h, w, target)
    (-logp.mean()).backward()
    dt = time.perf_counter() - t0
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20      # KB on Linux
    print(json.dumps({"seconds": dt, "peak_rss_gb": rss_gb, "mean_logp": float(logp.detach().mean()),
                      "grad_w_norm": float(w.grad.norm())}))
    sys.exit(0)

res = {}
for impl in ("full", "chunked"):
    cmd = [sys.executable, __file__, "--impl", impl, "--tokens", str(args.tokens), "--hidden", str(args.hidden),
           "--vocab", str(args.vocab)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    res[impl] = json.loads(out.strip().splitlines()[-1])
    r = res[impl]
    print(f"{impl:8s} {r['seconds']:6.1f} s  peak RSS {r['peak_rss_gb']:5.2f} GB  mean logp {r['mean_logp']:.6f}")
f, c = res["full"], res["chunked"]
assert abs(f["mean_logp"] - c["mean_logp"]) < 1e-4 and abs(f["grad_w_norm"] - c["grad_w_norm"]) < 1e-3 * f["grad_w_norm"]
res.update(config={"tokens": args.tokens, "hidden": args.hidden, "vocab": args.vocab},
           memory_ratio=f["peak_rss_gb"] / c["peak_rss_gb"], time_ratio=f["seconds"] / c["seconds"])
print(f"chunked vs full logits: {res['memory_ratio']:.1f}x less peak memory, {res['time_ratio']:.2f}x the speed "
      f"({args.tokens} tokens x vocab {args.vocab}, hidden {args.hidden}, forward + backward)")
Path(args.out).parent.mkdir(parents=True, exist_ok=True)
Path(args.out).write_text(json.dumps(res, indent=2))
print(f"wrote {args.out}")
