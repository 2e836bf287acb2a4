"""Engine benchmark, all measured in one run on the same weights (fp32, greedy):

(a) our Engine vs transformers' `generate` on the reference `transformers.ZayaForCausalLM`
    (batch 16, 64-token prompts, 256 new tokens), tokens/s, target >= 3x;
(b) continuous vs static batching on a very uneven workload (half the requests 16 new tokens, half 512),
    same number of slots, target >= 1.5x;
(c) batch-1 decode tokens/s of a ~100M-parameter config next to the memory-bandwidth bound
    (bytes of weights touched per token / copy bandwidth of a large tensor), as a fraction.

    .venv/bin/python bench/engine.py [--quick] [--threads 1] [--compile] [--device cuda --dtype bfloat16 --cuda-graphs]

--compile adds the torch.compile'd decode step to (a) and (c), next to eager (the compile warm-up is not timed);
--cuda-graphs adds the CUDA-graph decode step (Engine(cuda_graphs=True)) the same way, and (b) then uses it for
both modes. On CUDA use bf16 (the grouped GEMM there takes bf16 only; transformers' default experts implementation
calls it too).

Prints the ratios and writes runs/bench/engine.json.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from openzaya.engine import Engine, GenParams
from openzaya.model import ZayaConfig, ZayaForCausalLM, count_params

# -----------------------------------------------------------------------------
# CLI
parser = argparse.ArgumentParser(description="ZAYA engine benchmark")
parser.add_argument("--quick", action="store_true", help="shrink every size (a smoke run)")
parser.add_argument("--threads", type=int, default=-1, help="torch threads (-1 = torch default)")
parser.add_argument("--compile", action="store_true", help="torch.compile the decode step in (a) and (c) as well")
parser.add_argument("--skip-hf", action="store_true", help="skip the transformers peer in (a)")
parser.add_argument("--device", default="cpu")
parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
parser.add_argument("--cuda-graphs", action="store_true",
                    help="add Engine(cuda_graphs=True) to (a) and (c); (b) then uses it for both modes")
parser.add_argument("--profile", action="store_true", help="print the top ops of 8 eager decode steps in (a)")
parser.add_argument("--out", default="runs/bench/engine.json")
args = parser.parse_args()
dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
if args.threads > 0:
    torch.set_num_threads(args.threads)
torch.manual_seed(0)
q = args.quick
report = {"threads": torch.get_num_threads(), "quick": q, "torch": torch.__version__, "device": str(dev),
          "dtype": args.dtype, "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"}


def issue_config(**kw) -> ZayaConfig:
    """The issue's benchmark config (54M parameters, ~6M active)."""
    base = dict(vocab_size=8192, hidden_size=256, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                head_dim=32, moe_intermediate_size=512, num_experts=16, router_hidden_size=64, eos_token_id=None)
    return ZayaConfig(**{**base, **kw})


def random_prompts(n, length, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=g).tolist()


def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn):
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0


cfg = issue_config()
model = ZayaForCausalLM(cfg).eval().to(dev, dtype).relayout_experts_for_decode()   # as LocalBackend / serve load it
print(f"model: {count_params(cfg)['total'] / 1e6:.1f}M params, threads {torch.get_num_threads()}")

# -----------------------------------------------------------------------------
# (a) Engine vs transformers generate
B, P, N = (4, 16, 32) if q else (16, 64, 256)
prompts = random_prompts(B, P, cfg.vocab_size, 1)
eng = Engine(model, max_slots=B, max_len=P + N, cuda_graphs=False)   # eager (on CUDA the default is graphs)
params = GenParams(temperature=0, max_new_tokens=N, eos_ids=[])
eng.generate(prompts[:2], GenParams(temperature=0, max_new_tokens=4, eos_ids=[]))   # warm-up
ours, t_ours = timed(lambda: eng.generate(prompts, params))
ours_tps = B * N / t_ours
res_a = {"batch": B, "prompt_len": P, "new_tokens": N, "engine_tok_s": ours_tps, "engine_stats": eng.stats}
print(f"(a) engine: {ours_tps:.1f} new tok/s ({t_ours:.1f}s)")
if args.profile:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * (dev.type == "cuda")
    with profile(activities=acts) as prof:
        eng.generate(prompts, GenParams(temperature=0, max_new_tokens=9, eos_ids=[]))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=40))
    if dev.type == "cuda":   # where an eager step makes the host wait for the GPU
        import collections
        import warnings

        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            eng.generate(prompts, GenParams(temperature=0, max_new_tokens=3, eos_ids=[]))
        torch.cuda.set_sync_debug_mode(0)
        sites = collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught)
        print(f"host syncs in prefill + 2 decode steps: {sum(sites.values())}", dict(sites.most_common(12)))
if args.compile:   # warm-up at the measured batch size: the compile is paid once, outside the timing
    eng_c = Engine(model, max_slots=B, max_len=P + N, compile=True)
    _, t_warm = timed(lambda: eng_c.generate(prompts, GenParams(temperature=0, max_new_tokens=4, eos_ids=[])))
    ours_c, t_c = timed(lambda: eng_c.generate(prompts, params))
    same_c = sum(a.tokens == b.tokens for a, b in zip(ours_c, ours))
    res_a.update(engine_compiled_tok_s=B * N / t_c, compile_warmup_s=t_warm, same_greedy_rows_compiled=f"{same_c}/{B}")
    print(f"(a) engine, compiled decode: {B * N / t_c:.1f} new tok/s ({t_c:.1f}s; compile warm-up {t_warm:.0f}s); "
          f"greedy rows identical to eager {same_c}/{B}")
if args.cuda_graphs:
    eng_g = Engine(model, max_slots=B, max_len=P + N, cuda_graphs=True)
    _, t_warm = timed(lambda: eng_g.generate(prompts, GenParams(temperature=0, max_new_tokens=4, eos_ids=[])))
    ours_g, t_g = timed(lambda: eng_g.generate(prompts, params))
    same_g = sum(a.tokens == b.tokens for a, b in zip(ours_g, ours))
    res_a.update(engine_cuda_graphs_tok_s=B * N / t_g, same_greedy_rows_cuda_graphs=f"{same_g}/{B}")
    print(f"(a) engine, CUDA-graph decode: {B * N / t_g:.1f} new tok/s ({t_g:.2f}s; capture warm-up {t_warm:.2f}s); "
          f"greedy rows identical to eager {same_g}/{B}")

if not args.skip_hf:
    import transformers

    hf_kw = {k: v for k, v in cfg.to_dict().items() if k not in ("dtype", "architectures", "model_type")}
    hf = transformers.ZayaForCausalLM(transformers.ZayaConfig(**hf_kw)).eval().to(dev, dtype)
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    hf.tie_weights()
    ids = torch.tensor(prompts, device=dev)
    with torch.no_grad():
        a, b = model(ids).float(), hf(ids).logits.float()
    diff, rel = (a - b).abs().max().item(), ((a - b).norm() / b.norm()).item()
    # bf16: two implementations round differently (measured on an H200: 3.9% relative on this random model)
    assert (diff < 1e-3) if dtype == torch.float32 else (rel < 0.1), f"reference logits differ by {diff} ({rel})"
    # transformers 5.24 defaults to experts_implementation="grouped_mm"; the spec's reference speed (§10.2) was
    # measured with the eager per-expert loop. Both are reported; "ratio" is against the default.
    for impl in ("grouped_mm", "eager"):
        hf.set_experts_implementation(impl)
        with torch.no_grad():
            hf.generate(ids[:2], attention_mask=torch.ones_like(ids[:2]), max_new_tokens=4, do_sample=False,
                        pad_token_id=0, eos_token_id=None)
            out, t_hf = timed(lambda: hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N,
                                                  min_new_tokens=N, do_sample=False, pad_token_id=0,
                                                  eos_token_id=None))
        hf_tps = B * N / t_hf
        same = sum(o[P:].tolist() == r.tokens for o, r in zip(out, ours))
        tag = "" if impl == "grouped_mm" else "_eager_experts"
        res_a.update({f"hf{tag}_tok_s": hf_tps, f"ratio{tag}": ours_tps / hf_tps, f"same_greedy_rows{tag}": f"{same}/{B}"})
        print(f"(a) transformers generate [experts={impl}]: {hf_tps:.1f} new tok/s ({t_hf:.1f}s) -> ratio "
              f"{ours_tps / hf_tps:.2f}x (target >= 3x); identical greedy rows {same}/{B}")
        if args.compile:
            res_a[f"ratio_compiled{tag}"] = res_a["engine_compiled_tok_s"] / hf_tps
            print(f"    compiled engine vs the same: {res_a['engine_compiled_tok_s'] / hf_tps:.2f}x")
        if args.cuda_graphs:
            res_a[f"ratio_cuda_graphs{tag}"] = res_a["engine_cuda_graphs_tok_s"] / hf_tps
            print(f"    CUDA-graph engine vs the same: {res_a['engine_cuda_graphs_tok_s'] / hf_tps:.2f}x")
report["a_engine_vs_transformers"] = res_a

# -----------------------------------------------------------------------------
# (b) continuous vs static batching on uneven lengths
S, n_req, P, short, long = (4, 8, 16, 8, 64) if q else (8, 16, 64, 16, 512)
prompts = random_prompts(n_req, P, cfg.vocab_size, 2)
params = [GenParams(temperature=0, max_new_tokens=short if i % 2 == 0 else long, eos_ids=[]) for i in range(n_req)]
eng = Engine(model, max_slots=S, max_len=P + long, cuda_graphs=args.cuda_graphs)   # both modes alike
new_tokens = sum(p.max_new_tokens for p in params)
cont, t_cont = timed(lambda: eng.generate(prompts, params, continuous=True))
stats_cont = eng.stats
stat, t_stat = timed(lambda: eng.generate(prompts, params, continuous=False))
stats_stat = eng.stats
same_b = sum(a.tokens == b.tokens for a, b in zip(cont, stat))
# fp32: identical; bf16 GEMMs round by batch shape, so a near-tie greedy token may flip (counted, not asserted)
assert same_b == n_req or dtype != torch.float32, "continuous and static greedy outputs differ"
res_b = {"slots": S, "requests": n_req, "prompt_len": P, "short": short, "long": long, "cuda_graphs": args.cuda_graphs,
         "continuous_tok_s": new_tokens / t_cont, "static_tok_s": new_tokens / t_stat, "ratio": t_stat / t_cont,
         "continuous_stats": stats_cont, "static_stats": stats_stat, "same_greedy_rows": f"{same_b}/{n_req}"}
report["b_continuous_vs_static"] = res_b
print(f"(b) continuous {new_tokens / t_cont:.1f} tok/s vs static {new_tokens / t_stat:.1f} tok/s -> "
      f"ratio {t_stat / t_cont:.2f}x (target >= 1.5x); decode steps {stats_cont['decode_steps']} vs "
      f"{stats_stat['decode_steps']}")

# -----------------------------------------------------------------------------
# (c) batch-1 decode vs the memory-bandwidth bound, ~100M parameters
big = issue_config(hidden_size=512, num_hidden_layers=8, head_dim=64, moe_intermediate_size=512, router_hidden_size=128)
if q:
    big = issue_config()
cp = count_params(big)
model_c = ZayaForCausalLM(big).eval().to(dev, dtype).relayout_experts_for_decode()
# Weights touched per decoded token: every active parameter once, plus the whole (tied) output embedding for the
# logits (the embedding row lookup is negligible), each of dtype's size.
bytes_per_token = dtype.itemsize * (cp["active_per_token"] + big.vocab_size * big.hidden_size)
x = torch.empty(64 * 2**20 if q else (256 if dev.type == "cpu" else 4096) * 2**20, dtype=torch.uint8, device=dev)
y = torch.empty_like(x)
y.copy_(x)
reps = 5 if dev.type == "cpu" else 20
sync()
t0 = time.perf_counter()
for _ in range(reps):
    y.copy_(x)
sync()
copy_bw = 2 * x.numel() * reps / (time.perf_counter() - t0)   # read + write bytes per second
read_bw = copy_bw / 2                                           # NOTE: weights are only read; a copy moves 2x bytes
del x, y
N1 = 32 if q else 128
res_c = {"params_total": cp["total"], "params_active": cp["active_per_token"], "bytes_per_token": bytes_per_token,
         "copy_bw_GBs": copy_bw / 1e9}
variants = ["eager"] + ["compiled"] * args.compile + ["cuda_graphs"] * args.cuda_graphs
for key in variants:
    eng = Engine(model_c, max_slots=1, max_len=16 + N1 + 8, compile=key == "compiled", cuda_graphs=key == "cuda_graphs")
    p1 = random_prompts(1, 16, big.vocab_size, 3)
    eng.generate(p1, GenParams(temperature=0, max_new_tokens=8, eos_ids=[]))     # warm-up (and compile)
    _, t1 = timed(lambda: eng.generate(p1, GenParams(temperature=0, max_new_tokens=N1, eos_ids=[])))
    tps = (N1 - 1) / eng.stats["decode_s"]           # decode steps only (the first token comes from prefill)
    bound_copy, bound_read = copy_bw / bytes_per_token, read_bw / bytes_per_token
    res_c[key] = {"decode_tok_s": tps, "bound_tok_s_copy_bw": bound_copy, "fraction_of_bound": tps / bound_copy,
                  "bound_tok_s_read_bw": bound_read, "fraction_of_read_bound": tps / bound_read,
                  "ms_per_token": 1e3 / tps}
    print(f"(c) batch-1 decode [{key}] {cp['total'] / 1e6:.0f}M params ({cp['active_per_token'] / 1e6:.1f}M active, "
          f"{bytes_per_token / 1e6:.0f} MB/token): {tps:.1f} tok/s ({1e3 / tps:.1f} ms); copy bandwidth "
          f"{copy_bw / 1e9:.1f} GB/s -> bound {bound_copy:.0f} tok/s, fraction {tps / bound_copy:.3f} "
          f"(vs read-only bound {bound_read:.0f} tok/s: {tps / bound_read:.3f})")
report["c_batch1_vs_bandwidth"] = res_c

out = Path(args.out)
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(report, indent=2) + "\n")
print(f"wrote {out}")
