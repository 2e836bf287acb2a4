"""Training throughput and memory per rank of the parallel layouts (openzaya/parallel.py): DDP vs FSDP2 vs FSDP2 + EP,
each in a fresh `torchrun` job of `--nproc` ranks, all in one run, with the ratios against DDP.

- Every layout trains the same model on the same synthetic batch (`--micro-batch` sequences of `--seq-len` tokens
  per rank, one micro-batch per step; packed documents as in the trainer) with Muon + AdamW: forward, backward,
  gradient reduction, clipping, optimizer step, bias balancing: the trainer's step. `--warmup` steps, then
  `--steps` timed ones; tokens/s counts every rank's tokens.
- Time: seconds per step and, of those, in the optimizer step (Muon's Newton-Schulz dominates on a CPU).
- Memory per rank: the state this rank holds (parameters, gradients, optimizer state: openzaya.plan.state_bytes,
  the same count the planner predicts) and the peak resident set over the timed steps (VmHWM after resetting it
  once the model is sharded, minus the resident set at that moment: activations, gathered parameters, buffers).
- `--device cuda` (bench/device_parallel.sh): NCCL, bf16 mixed precision, and model FLOPs utilisation
  = 6 x (active parameters per token) x tokens/s + attention (12 L H Dh T per token) over the GPUs' peak
  (`--peak-tflops`, default 989 = H100/H200 bf16 dense).
NOTE: on the 2-core CPU machine both ranks share two cores and gloo runs over loopback: expect sharding to cost
throughput here (more collectives, no overlap); its point is memory per rank. Timings are noisy (shared machine).

    .venv/bin/python bench/parallel.py [--layouts ddp,fsdp2,fsdp2_ep] [--preset micro] [--steps 5]

Prints a table and writes runs/bench/parallel.json.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from openzaya.model import ZayaConfig, count_params, micro, nano   # noqa: E402

# -----------------------------------------------------------------------------
# CLI
parser = argparse.ArgumentParser(description="DDP vs FSDP2 vs FSDP2 + EP training step")
parser.add_argument("--layouts", default="ddp,fsdp2,fsdp2_ep")
parser.add_argument("--nproc", type=int, default=2, help="ranks per job (GPUs with --device cuda)")
parser.add_argument("--preset", default="micro", choices=["nano", "micro", "zaya_1b"])
parser.add_argument("--micro-batch", type=int, default=4, help="sequences per rank per step")
parser.add_argument("--seq-len", type=int, default=256)
parser.add_argument("--warmup", type=int, default=2)
parser.add_argument("--steps", type=int, default=5, help="timed steps")
parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
parser.add_argument("--peak-tflops", type=float, default=989.0, help="per GPU, for MFU (bf16 dense)")
parser.add_argument("--activation-checkpointing", action="store_true")
parser.add_argument("--out", default="runs/bench/parallel.json")
parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)   # internal: this layout, under torchrun
args = parser.parse_args()

LAYOUTS = {"ddp": dict(dp_shard=1, dp_replicate=-1), "fsdp2": dict(), "fsdp2_ep": dict(ep=-1)}


def zaya_1b() -> ZayaConfig:
    """ZAYA1-8B's shape at ~1B parameters (hidden 1024, 18 layers, 16 experts + skip, CCA with 8 query and 2 kv
    heads of 128): the GPU check's model."""
    return ZayaConfig(vocab_size=32768, hidden_size=1024, num_hidden_layers=18, num_attention_heads=8,
                      num_key_value_heads=2, head_dim=128, moe_intermediate_size=1024, num_experts=16,
                      router_hidden_size=128, max_position_embeddings=8192)


PRESETS = {"nano": nano, "micro": micro, "zaya_1b": zaya_1b}


def status_bytes(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def flops_per_token(cfg: ZayaConfig, T: int) -> float:
    """Training FLOPs per token: 6 x active parameters (embedding excluded, the tied LM head included once) plus
    causal attention's 12 L H Dh T / 2 (PaLM's accounting, halved for the causal mask)."""
    active = count_params(cfg)["active_per_token"] + cfg.vocab_size * cfg.hidden_size
    return 6 * active + 6 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * T


# -----------------------------------------------------------------------------
# Worker: one layout, one rank
if args.worker:
    import torch.distributed as dist

    from openzaya import parallel
    from openzaya.model import ZayaForCausalLM
    from openzaya.optim import build_optimizer
    from openzaya.plan import state_bytes

    world = int(os.environ["WORLD_SIZE"])
    kw = {k: (world if v == -1 else v) for k, v in LAYOUTS[args.worker].items()}
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if args.device == "cuda" else "cpu")
    cfg = PRESETS[args.preset]()
    torch.manual_seed(0)
    model = ZayaForCausalLM(cfg).train()
    pcfg = parallel.ParallelConfig(**kw, mixed_precision="bf16" if args.device == "cuda" else "fp32",
                                   activation_checkpointing=args.activation_checkpointing)
    s = parallel.setup(model, pcfg, device, lambda m: build_optimizer(m, 1e-3))
    model, opt, rank = s.model, s.optimizer, s.rank
    params = list(model.parameters())
    g = torch.Generator().manual_seed(rank)
    B, T = args.micro_batch, args.seq_len
    ids = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g).to(device)
    seg = (torch.arange(T + 1) * 4 // (T + 1)).expand(B, T + 1).to(device)     # four packed documents per row
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.device == "cuda")

    opt_s = [0.0]

    def step():
        with autocast:
            loss = -model.token_logprobs(ids[:, :-1], ids[:, 1:], segment_ids_BT=seg[:, :-1]).sum() / (B * T * world)
        loss.backward()
        parallel.reduce_gradients(params, s.layout)
        parallel.clip_grad_norm_(params, 1.0)
        t = time.perf_counter()
        opt.step()
        opt_s[0] += time.perf_counter() - t
        held = state_bytes(model, opt)
        opt.zero_grad(set_to_none=True)
        model.update_balancing_biases()
        return held

    for _ in range(args.warmup):
        held = step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    with open("/proc/self/clear_refs", "w") as f:    # reset VmHWM (peak RSS) to the current resident set
        f.write("5")
    rss0 = status_bytes("VmRSS:")
    dist.barrier()
    opt_s[0] = 0.0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        held = step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    dt = time.perf_counter() - t0
    tok_s = args.steps * B * T * world / dt
    res = {"layout": args.worker, "rank": rank, "world": world, "describe": str(s.layout), "tok_s": tok_s,
           "step_s": dt / args.steps, "optimizer_step_s": opt_s[0] / args.steps, "state_bytes": held, "peak_rss_over_start": status_bytes("VmHWM:") - rss0}
    if device.type == "cuda":
        res["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(device)
        res["mfu"] = flops_per_token(cfg, T) * tok_s / (world * args.peak_tflops * 1e12)
    out = [None] * world
    dist.all_gather_object(out, res)
    if rank == 0:
        print("RESULT " + json.dumps(out), flush=True)
    dist.destroy_process_group()
    sys.exit(0)


# -----------------------------------------------------------------------------
# Driver: each layout in its own torchrun job
cfg = PRESETS[args.preset]()
n = count_params(cfg)
print(f"{args.preset}: {n['total'] / 1e6:.1f}M params ({n['active_per_token'] / 1e6:.1f}M active/token), "
      f"{args.nproc} ranks x {args.micro_batch} x {args.seq_len} tokens per step, {args.device}")
env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1",
       "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc)]
results = {}
for name in args.layouts.split(","):
    cmd = [*torchrun, __file__, "--worker", name, "--preset", args.preset, "--micro-batch", str(args.micro_batch),
           "--seq-len", str(args.seq_len), "--warmup", str(args.warmup), "--steps", str(args.steps),
           "--device", args.device, "--peak-tflops", str(args.peak_tflops)]
    cmd += ["--activation-checkpointing"] * args.activation_checkpointing
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not lines:
        print(f"{name}: failed (rc {p.returncode})\n{p.stderr[-3000:]}")
        continue
    results[name] = json.loads(lines[-1][len("RESULT "):])

base = results.get("ddp")


def ratio(a, b):
    return f"{a / b:7.2f}" if b else "      -"


print(f"{'layout':10s} {'what':52s} {'tok/s':>8s} {'vs ddp':>7s} {'step s':>7s} {'opt s':>6s} "
      f"{'state MiB/rank':>15s} {'vs ddp':>7s} {'peak RSS+ MiB':>14s}"
      + ("  MFU  peak CUDA GiB" if args.device == "cuda" else ""))
for name, ranks in results.items():
    r0 = ranks[0]
    state = sum(r0["state_bytes"].values())
    base_tok, base_state = (base[0]["tok_s"], sum(base[0]["state_bytes"].values())) if base else (0, 0)
    line = (f"{name:10s} {r0['describe']:52s} {r0['tok_s']:8.0f} {ratio(r0['tok_s'], base_tok)} "
            f"{r0['step_s']:7.2f} {r0['optimizer_step_s']:6.2f} {state / 2**20:15.1f} {ratio(state, base_state)} "
            f"{max(r['peak_rss_over_start'] for r in ranks) / 2**20:14.1f}")
    if args.device == "cuda":
        line += f"  {r0['mfu']:.3f}  {max(r['peak_cuda_bytes'] for r in ranks) / 2**30:.2f}"
    print(line)
Path(args.out).parent.mkdir(parents=True, exist_ok=True)
Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
print(f"wrote {args.out}")
