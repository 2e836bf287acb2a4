"""Dynamic expert offloading benchmark: peak RSS and decode tokens/s at expert-cache budgets of 10/25/50/100% of the
expert bytes, batch 1 and batch 8, against the fully resident model, all on the same synthetic checkpoint in one run.

- The checkpoint is a random ZAYA model in the real native layout (hidden 1024, 16 experts, intermediate 1024,
  12 layers, fp32: ~2.5 GB, 97% of it experts), written layer by layer, one safetensors shard per layer, so it
  never needs to be in RAM at once. It is built once under runs/ and reused. Routers are drawn wide so that tokens
  spread over the experts (a freshly initialised router sends nearly every token to one expert).
- Every configuration runs in a fresh subprocess (peak RSS = VmHWM of that process, growth over the process after
  imports): load, a short warm-up generation (fills the cache), statistics reset, then greedy decode of
  `--new-tokens` tokens per row from 16-token prompts through the Engine (continuous batching). The resident model
  touches every weight once before decoding, as a long run that has used every expert would.
- Offloaded runs compute on the CPU with the experts read from the safetensors files (pread, page cache warm after
  the first run: this measures copy cost, not a cold disk). Prefetch (next layer's router on the current state) is
  on; `--ablations` adds prefetch off and LFU eviction at 25%.
- Cache statistics are the measured generate's decode steps only (prefill is reported apart in the JSON): demand
  hits (resident from an earlier use) and prefetch hits (first use of a prefetched expert) as separate rates,
  experts loaded per decode token, stall per decode token. The budget column is the effective one (whole experts
  per layer); the asked fraction is in the config name. `--dtype` is the compute dtype, `--expert-dtype` the
  experts' storage dtype in the cache (default: the checkpoint's).
- Also prints the projected resident weight memory of ZAYA1-8B (bf16) at each budget, from parameter counts.
NOTE: hit rates of a random model are not those of a trained one (trained routers are sticky across neighbouring
tokens, which favours the cache); tokens/s are on a shared 2-core CPU.

    .venv/bin/python bench/offload.py [--quick] [--ablations] [--threads 2]

Prints a table and writes runs/bench/offload.json.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from openzaya.model import ZayaConfig, ZayaForCausalLM, zaya1_8b
from openzaya.offload import all_expert_nbytes, projected_resident_bytes

# -----------------------------------------------------------------------------
# CLI
parser = argparse.ArgumentParser(description="ZAYA expert offloading benchmark")
parser.add_argument("--quick", action="store_true", help="a ~300 MB checkpoint and fewer tokens (smoke run)")
parser.add_argument("--ckpt", default=None, help="synthetic checkpoint dir (default runs/offload_synth[_quick])")
parser.add_argument("--layers", type=int, default=12)
parser.add_argument("--new-tokens", type=int, default=24, help="decoded tokens per row (measured)")
parser.add_argument("--fractions", default="0.1,0.25,0.5,1.0")
parser.add_argument("--batches", default="1,8")
parser.add_argument("--ablations", action="store_true", help="also prefetch off and LFU at 25%%")
parser.add_argument("--threads", type=int, default=-1, help="torch threads (-1 = torch default)")
parser.add_argument("--dtype", default=None, help="compute dtype (default: the checkpoint config's)")
parser.add_argument("--expert-dtype", default=None, help="offloaded runs: experts' storage dtype (default: as stored)")
parser.add_argument("--out", default="runs/bench/offload.json")
# internal: one measured configuration in this (fresh) process
parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
parser.add_argument("--fraction", type=float, default=0.0, help=argparse.SUPPRESS)
parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
parser.add_argument("--prefetch", type=int, default=1, help=argparse.SUPPRESS)
parser.add_argument("--policy", default="lru", help=argparse.SUPPRESS)
args = parser.parse_args()
if args.threads > 0:
    torch.set_num_threads(args.threads)


def status_bytes(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def synth_config(quick: bool, layers: int) -> ZayaConfig:
    if quick:
        return ZayaConfig(vocab_size=4096, hidden_size=512, num_hidden_layers=6, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=64, moe_intermediate_size=512, num_experts=16,
                          router_hidden_size=64)
    return ZayaConfig(vocab_size=16384, hidden_size=1024, num_hidden_layers=layers, num_attention_heads=8,
                      num_key_value_heads=2, head_dim=128, moe_intermediate_size=1024, num_experts=16,
                      router_hidden_size=128)


def write_synthetic_checkpoint(cfg: ZayaConfig, out: Path, seed: int = 0):
    """Random weights in the native layout, one shard per layer (+ one for the rest), index written last."""
    from safetensors.torch import save_file

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in ZayaForCausalLM(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(seed)

    def fill(name, shape):
        last = name.split(".")[-1]
        if name.endswith(("scale", "norm.weight", "layernorm.weight", "temp")):
            return torch.ones(shape)
        if last == "balancing_biases":
            return torch.zeros(shape)
        if last == "bias":
            return torch.zeros(shape)
        std = 3 * shape[-1] ** -0.5 if ".gate." in name and len(shape) == 2 else 0.02   # wide routers
        return torch.randn(shape, generator=g) * std

    out.mkdir(parents=True, exist_ok=True)
    groups = [[k for k in shapes if k.startswith(f"model.layers.{i}.")] for i in range(cfg.num_hidden_layers)]
    groups.append([k for k in shapes if not k.startswith("model.layers.")])
    n, weight_map, total = len(groups), {}, 0
    for i, keys in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        shard = {k: fill(k, shapes[k]) for k in keys}
        save_file(shard, out / name, metadata={"format": "pt"})
        total += sum(v.numel() * v.element_size() for v in shard.values())
        weight_map.update({k: name for k in keys})
        del shard
    cfg.save(out / "config.json")
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=2))


# -----------------------------------------------------------------------------
# Worker: one configuration, in a fresh process
if args.worker:
    from openzaya.checkpoint import from_pretrained
    from openzaya.engine import Engine, GenParams
    from openzaya.offload import load_offloaded

    with torch.device("meta"):                      # warm torch's meta machinery before the baseline
        ZayaForCausalLM(ZayaConfig())
    base = status_bytes("VmRSS:")
    t0 = time.perf_counter()
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.fraction <= 0:
        model = from_pretrained(args.ckpt, dtype=dtype)
        with torch.no_grad():
            sum(float(p.sum()) for p in model.parameters())
    else:
        expert_dtype = getattr(torch, args.expert_dtype) if args.expert_dtype else None
        model = load_offloaded(args.ckpt, fraction=args.fraction, prefetch=bool(args.prefetch), policy=args.policy,
                               dtype=dtype, expert_dtype=expert_dtype)
    load_s = time.perf_counter() - t0
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, cfg.vocab_size, (16,), generator=g).tolist() for _ in range(args.batch)]
    eng = Engine(model, max_slots=args.batch, max_len=16 + args.new_tokens + 8)
    eng.generate(prompts, GenParams(temperature=0, max_new_tokens=4, eos_ids=[]))            # warm-up
    if args.fraction > 0:
        model.offload.stats.reset()
        for c in model.offload.caches:      # prefetches from before the reset must not count as used after it
            c.ahead.clear()
    res = eng.generate(prompts, GenParams(temperature=0, max_new_tokens=args.new_tokens, eos_ids=[]))
    st = eng.stats
    out = {"fraction": args.fraction, "batch": args.batch, "prefetch": bool(args.prefetch), "policy": args.policy,
           "decode_tok_s": st["decode_row_steps"] / st["decode_s"], "load_s": load_s,
           "peak_rss_bytes": status_bytes("VmHWM:") - base, "tokens": [r.tokens[:8] for r in res[:2]]}
    if args.fraction > 0:
        out["offload"] = model.offload.stats.summary()
        model.offload.close()
    print("RESULT " + json.dumps(out))
    sys.exit(0)

# -----------------------------------------------------------------------------
# Checkpoint
t_start = time.perf_counter()
cfg = synth_config(args.quick, args.layers)
ckpt = Path(args.ckpt or ("runs/offload_synth_quick" if args.quick else "runs/offload_synth"))
if not (ckpt / "model.safetensors.index.json").exists() or ZayaConfig.load(ckpt) != cfg:
    print(f"writing synthetic checkpoint to {ckpt} ...", flush=True)
    t0 = time.perf_counter()
    write_synthetic_checkpoint(cfg, ckpt)
    print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)
ckpt_bytes = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
experts = all_expert_nbytes(cfg)
print(f"checkpoint {ckpt_bytes / 2**30:.2f} GiB, experts {experts / 2**30:.2f} GiB "
      f"({100 * experts / ckpt_bytes:.1f}%), {cfg.num_hidden_layers} layers x {cfg.num_experts} experts")

# -----------------------------------------------------------------------------
# Runs
new_tokens = 8 if args.quick else args.new_tokens
fractions = [float(f) for f in args.fractions.split(",")]
batches = [int(b) for b in args.batches.split(",")]
configs = [(0.0, b, 1, "lru") for b in batches] + [(f, b, 1, "lru") for f in fractions for b in batches]
if args.ablations:
    configs += [(0.25, b, 0, "lru") for b in batches] + [(0.25, b, 1, "lfu") for b in batches]


def run_worker(fraction, batch, prefetch, policy):
    cmd = [sys.executable, __file__, "--worker", "--ckpt", str(ckpt), "--fraction", str(fraction), "--batch",
           str(batch), "--prefetch", str(prefetch), "--policy", policy, "--new-tokens", str(new_tokens),
           "--threads", str(args.threads), "--layers", str(args.layers)] + (["--quick"] if args.quick else [])
    cmd += (["--dtype", args.dtype] if args.dtype else []) + \
        (["--expert-dtype", args.expert_dtype] if args.expert_dtype else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"worker {fraction} {batch} failed:\n{out.stderr[-3000:]}")
    return json.loads(next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))[7:])


rows = []
print(f"{'config':>22} {'batch':>5} {'tok/s':>8} {'x res':>6} {'peak RSS':>10} {'budget':>7} {'demand':>6} "
      f"{'pf hit':>6} {'miss':>6} {'loads/tok':>9} {'MiB/tok':>8} {'stall ms/tok':>12} {'pf acc':>6}")
for fraction, batch, prefetch, policy in configs:
    r = run_worker(fraction, batch, prefetch, policy)
    res = next((x for x in rows if x["fraction"] == 0 and x["batch"] == batch), None)
    if res is not None:
        r["speed_vs_resident"] = r["decode_tok_s"] / res["decode_tok_s"]
        r["tokens_match_resident"] = r["tokens"] == res["tokens"]
    rows.append(r)
    name = "resident" if fraction == 0 else f"{100 * fraction:.0f}% {policy}{'' if prefetch else ' no-pf'}"
    o, nan = r.get("offload", {}), float("nan")
    d = o.get("decode", {})
    print(f"{name:>22} {batch:>5} {r['decode_tok_s']:>8.2f} {r.get('speed_vs_resident', 1.0):>6.2f} "
          f"{r['peak_rss_bytes'] / 2**30:>8.2f}Gi {100 * o.get('budget_fraction', 1.0):>6.2f}% "
          f"{d.get('demand_hit_rate', nan):>6.3f} {d.get('prefetch_hit_rate', nan):>6.3f} "
          f"{d.get('miss_rate', nan):>6.3f} "
          f"{d.get('loads_per_token', 0):>9.2f} {d.get('bytes_moved_per_token', 0) / 2**20:>8.1f} "
          f"{d.get('stall_ms_per_token', 0):>12.2f} {d.get('prefetch_accuracy', nan):>6.2f}", flush=True)

# -----------------------------------------------------------------------------
# ZAYA1-8B projection and report
print("\nZAYA1-8B projected resident weights (bf16):")
proj = []
for f in fractions:
    p = projected_resident_bytes(zaya1_8b(), f)
    proj.append(p)
    print(f"  {100 * f:>5.0f}% of experts: {p['resident_bytes'] / 2**30:6.2f} GiB "
          f"(non-expert {p['non_expert_bytes'] / 2**30:.2f} GiB + experts {f * p['expert_bytes'] / 2**30:.2f} GiB)")
mismatch = [r for r in rows if r.get("tokens_match_resident") is False]
print(f"\ngreedy tokens identical to the resident model: {'yes' if not mismatch else 'NO'} | "
      f"total {time.perf_counter() - t_start:.0f} s")
report = {"config": cfg.to_dict(), "checkpoint_bytes": ckpt_bytes, "expert_bytes": experts, "new_tokens": new_tokens,
          "threads": torch.get_num_threads(), "torch": torch.__version__, "runs": rows, "zaya1_8b_projection": proj}
Path(args.out).parent.mkdir(parents=True, exist_ok=True)
Path(args.out).write_text(json.dumps(report, indent=2))
print(f"wrote {args.out}")
