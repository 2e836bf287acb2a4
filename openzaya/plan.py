"""`openzaya plan`: per-rank training memory of a ZAYA model under a parallel layout, read off the real sharding.

How: one process plays rank 0 of a world of W ranks through torch's fake process-group backend (collectives do
nothing), builds the model on the meta device (no memory), parallelizes it with parallel.py exactly as a torchrun job
does (FSDP2 units, EP experts, HSDP), builds the optimizer (optim.py) and creates its state. The state bytes are
then the storages of those tensors on rank 0 (FSDP2 pads shards to equal size, so every rank holds the same):
- params: fp32 master weights (mixed precision casts copies for compute);
- grads: the sharded fp32 gradients (FSDP2 reduce-scatters into buffers of the padded shard sizes, in fp32);
- optimizer: Muon momentum (matrices, experts) and AdamW's two moments + step (the rest);
- transient (estimate): the all-gathered parameters of the root unit (embedding = LM head, kept through backward)
  and of two units in flight (prefetch), plus one unit's unsharded gradient; DDP layout: the flat all-reduce buffer;
- activations (estimate): one decoder layer's saved tensors, MEASURED by running one and two layers of the real
  widths at 16 and 32 tokens (experts reduced to one and two, then extrapolated to E; vocabulary 128) on the CPU and
  counting what autograd saves (per token, plus per layer what it derives from its weights), times the layers (with activation checkpointing: the layer inputs of every layer plus one layer
  recomputed); plus the LM head of `token_logprobs` (fp32 log-softmax rows, or its chunked variant), the embedding
  output and the packed-document attention masks [B, 1, T, T] (bool, one per layer type). Assumes a fused attention
  kernel (O(T) saved per head, as on GPUs; the CPU math path with masks saves [B, H, T, T]).
A layout fits when params + grads + optimizer + transient + activations <= 90% of the GPU memory (10% for the CUDA
context, allocator fragmentation and communication buffers); with `--offload-optimizer` the first three live in CPU
memory. `search` finds the fewest GPUs (powers of two up to the world size) and, among their layouts, the first
that fits without activation checkpointing or offload, else with checkpointing, else offload, else both.
NOTE: the sizes the planner reads are those of the sharding it really applies, and the test checks them against what
a 2-rank gloo run allocates; activations are an estimate (tested within 10% against a real forward's saved bytes).
"""

from __future__ import annotations

import contextlib
import functools
import json
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist

from .model import PRESETS, ZayaConfig, ZayaForCausalLM, count_params
from .optim import build_optimizer
from .parallel import Layout, ParallelConfig, build_meshes, parallelize, resolve_layout

GIB = 2**30
HEADROOM = 0.9


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (a DTensor: its local shard's storage, which FSDP2 pads;
    FSDP2's sharded gradients of one unit are views of one reduce-scatter buffer, counted once). Meta tensors have
    no address: each counts its own storage."""
    storages = {}
    for t in tensors:
        if t is None or not torch.is_tensor(t):
            continue
        st = (t.to_local() if hasattr(t, "to_local") else t).untyped_storage()
        storages[len(storages) if st.device.type == "meta" else ("at", st.data_ptr())] = st.nbytes()
    return sum(storages.values())


def state_bytes(model, optimizer) -> dict:
    """This rank's parameter, gradient and optimizer-state bytes (also reads a real run)."""
    params = list(model.parameters())
    return {"params": storage_bytes(params), "grads": storage_bytes(p.grad for p in params),
            "optimizer": storage_bytes(v for st in optimizer.state.values() for v in st.values())}


@contextlib.contextmanager
def fake_world(world: int):
    """This process as rank 0 of `world` ranks (torch's fake backend); nothing for one rank."""
    if world == 1:
        yield
        return
    from torch.testing._internal.distributed.fake_pg import FakeStore
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def sharded_state(cfg: ZayaConfig, layout: Layout, pcfg: ParallelConfig) -> dict:
    """Rank 0's state bytes and the largest all-gathered units, for the real sharding of a meta model."""
    from torch.distributed.fsdp import FSDPModule
    with torch.device("meta"):
        model = ZayaForCausalLM(cfg)
    model = parallelize(model, build_meshes(layout, "cpu"), layout, pcfg)
    opt = build_optimizer(model, 1e-3)
    opt.init_state()
    out = state_bytes(model, opt)
    # FSDP2 reduce-scatters into buffers of the padded shard sizes, in the parameters' dtype: the gradients take
    # the sharded parameters' bytes (unwrapped and DDP layouts: a full gradient per parameter)
    out["grads"] = storage_bytes(p for p in model.parameters() if p.requires_grad)
    # all-gathered bytes of each FSDP2 unit (its own parameters, not its children's), in the compute dtype
    compute = 2 if pcfg.mixed_precision == "bf16" else 4

    def gathered(unit):
        group = unit._get_fsdp_state()._fsdp_param_group
        return compute * sum(fp.padded_sharded_param_size.numel() * fp.mesh_info.shard_mesh_size
                             for fp in group.fsdp_params) if group else 0
    if layout.fsdp:
        units = sorted((gathered(m) for m in model.modules() if isinstance(m, FSDPModule) and m is not model),
                       reverse=True)
        out["transient"] = gathered(model) + sum(units[:2]) + units[0] * 4 // compute   # + one unit's fp32 grads
    else:   # world 1: nothing gathered; DDP: the flat gradient buffer of the all-reduce
        out["transient"] = out["grads"] if layout.replicate_only else 0
    return out


# -----------------------------------------------------------------------------
# Activations


def _saved_bytes(cfg: ZayaConfig, tokens: int, dtype: torch.dtype) -> int:
    """Bytes autograd saves for one training forward of `cfg` over `tokens` tokens (one row, causal, no packing),
    excluding parameters."""
    torch.manual_seed(0)
    model = ZayaForCausalLM(cfg).to(dtype).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t
    ids = torch.randint(0, cfg.vocab_size, (1, tokens + 1))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.token_logprobs(ids[:, :-1], ids[:, 1:])
    return sum(seen.values())


@functools.cache
def _layer_bytes(widths: tuple, bf16: bool) -> tuple[float, float]:
    """(bytes per token, bytes per layer) that autograd saves for one decoder layer at these widths (D, H, K, Dh, I,
    R, E, cca_time0, cca_time1): two layers minus one, at 16 and 32 tokens (the per-layer part is what the layer
    derives from its weights: the fused q/k/v matrix, the composed convolution), with one and two experts,
    extrapolated linearly to E (only the router's [N, E+1] tensors grow with E); vocabulary 128."""
    D, H, K, Dh, I, R, E, t0, t1 = widths
    dtype = torch.bfloat16 if bf16 else torch.float32

    def one_layer(n_experts, T):
        def saved(layers):
            cfg = ZayaConfig(vocab_size=128, hidden_size=D, num_attention_heads=H, num_key_value_heads=K,
                             head_dim=Dh, moe_intermediate_size=I, router_hidden_size=R, num_experts=n_experts,
                             cca_time0=t0, cca_time1=t1, num_hidden_layers=layers)
            return _saved_bytes(cfg, T, dtype)
        return saved(2) - saved(1)

    def fit(n_experts):
        a, b = one_layer(n_experts, 16), one_layer(n_experts, 32)
        return (b - a) / 16, a - (b - a)                                # slope per token, intercept
    (tok1, const1), (tok2, const2) = fit(1), fit(2)
    return tok1 + (tok2 - tok1) * (E - 1), const1 + (const2 - const1) * (E - 1)


def activation_bytes(cfg: ZayaConfig, micro_batch: int, seq_len: int, bf16: bool, checkpointing: bool,
                     packed: bool = True) -> int:
    """Saved activations of one micro-batch (see the module docstring); `packed`: documents packed into the window
    (the trainer's case), with their block-diagonal attention masks."""
    N, D, V = micro_batch * seq_len, cfg.hidden_size, cfg.vocab_size
    widths = (D, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.moe_intermediate_size,
              cfg.router_hidden_size, cfg.num_experts, cfg.cca_time0, cfg.cca_time1)
    per_token, per_weights = _layer_bytes(widths, bf16)
    per_layer = per_token * N + per_weights
    boundary = 4 * (D + cfg.router_hidden_size) * N                   # fp32 residual stream + router latent
    L = cfg.num_hidden_layers
    layers = L * boundary + per_layer if checkpointing else L * per_layer
    embed = 3 * 4 * D * N                                              # fp32 embedding out, scaled stream, normed
    if N * V <= 2**26:
        lm_head = 4 * N * V                                            # fp32 log-softmax rows
    else:
        lm_head = 4 * N + 2 * 4 * 2**26                                # lse + one recomputed chunk (and its grad)
    lm_head += 4 * V * D if bf16 else 0                                # the fp32 copy of the bf16 LM-head weight
    masks = micro_batch * seq_len**2 * len(set(cfg.layer_types)) if packed else 0
    return int(layers + embed + lm_head + masks)


# -----------------------------------------------------------------------------
# Layouts


@dataclass
class Row:
    world: int
    dp_replicate: int
    dp_shard: int
    ep: int
    activation_checkpointing: bool
    offload_optimizer: bool
    params: int
    grads: int
    optimizer: int
    transient: int
    activations: int
    gpu_total: int
    fits: bool

    def layout(self) -> str:
        flags = [f"--dp-replicate {self.dp_replicate}", f"--dp-shard {self.dp_shard}", f"--ep {self.ep}"]
        flags += ["--activation-checkpointing"] * self.activation_checkpointing
        flags += ["--offload-optimizer"] * self.offload_optimizer
        return f"{self.world} GPUs: " + " ".join(flags)


def plan_rows(cfg: ZayaConfig, world: int, pcfgs: list[ParallelConfig], micro_batch: int, seq_len: int,
              gpu_bytes: int) -> list[Row]:
    """One row per layout, each with and without activation checkpointing and optimizer offload as asked."""
    rows = []
    with fake_world(world):
        for pcfg in pcfgs:
            layout = resolve_layout(pcfg, world, cfg.num_experts)
            st = sharded_state(cfg, layout, pcfg)
            act = activation_bytes(cfg, micro_batch, seq_len, pcfg.mixed_precision == "bf16",
                                   pcfg.activation_checkpointing)
            on_gpu = st["transient"] + act + (0 if pcfg.offload_optimizer else   # offload: in CPU memory
                                              st["params"] + st["grads"] + st["optimizer"])
            rows.append(Row(world, layout.dp_replicate, layout.dp_shard, layout.ep, pcfg.activation_checkpointing,
                            pcfg.offload_optimizer, st["params"], st["grads"], st["optimizer"], st["transient"], act,
                            on_gpu, on_gpu <= HEADROOM * gpu_bytes))
    return rows


def layouts(world: int, num_experts: int, base: ParallelConfig) -> list[ParallelConfig]:
    """Every (dp_replicate, dp_shard, ep) for `world` ranks, most sharded first (offload needs FSDP2)."""
    out = []
    for R in range(1, world + 1):
        S = world // R
        if world % R or (base.offload_optimizer and S == 1):
            continue
        for ep in range(1, S + 1):
            if S % ep == 0 and num_experts % ep == 0:
                out.append(replace(base, dp_replicate=R, dp_shard=S, ep=ep))
    return out


def search(cfg: ZayaConfig, max_world: int, base: ParallelConfig, micro_batch: int, seq_len: int,
           gpu_bytes: int) -> Row | None:
    """The fewest GPUs that fit; among their layouts the least intrusive (no recomputation, no offload first),
    then the smallest footprint."""
    worlds = sorted({2**k for k in range(max_world.bit_length()) if 2**k < max_world} | {max_world})
    for world in worlds:
        for ac, off in ((False, False), (True, False), (False, True), (True, True)):
            opts = replace(base, activation_checkpointing=ac, offload_optimizer=off)
            rows = [r for r in plan_rows(cfg, world, layouts(world, cfg.num_experts, opts), micro_batch, seq_len,
                                         gpu_bytes) if r.fits]
            if rows:
                return min(rows, key=lambda r: r.gpu_total)
    return None


def table(rows: list[Row], gpu_bytes: int) -> str:
    head = (f"{'layout (per rank, GiB)':56s} {'params':>7s} {'grads':>7s} {'optim':>7s} {'transient':>9s} "
            f"{'activ':>7s} {'GPU':>7s}  fits {gpu_bytes * HEADROOM / GIB:.0f} GiB")
    lines = [head]
    for r in rows:
        g = lambda b: f"{b / GIB:7.2f}"   # noqa: E731
        lines.append(f"{r.layout():56s} {g(r.params)} {g(r.grads)} {g(r.optimizer)} {r.transient / GIB:9.2f} "
                     f"{g(r.activations)} {g(r.gpu_total)}  {'yes' if r.fits else 'no'}"
                     + ("  (params, grads, optim in CPU memory)" if r.offload_optimizer else ""))
    return "\n".join(lines)


def model_config(preset: str, config: str | None) -> ZayaConfig:
    if config:
        return ZayaConfig.load(config)
    if preset not in PRESETS:
        raise SystemExit(f"unknown preset {preset!r} (known: {sorted(PRESETS)})")
    return PRESETS[preset]()


def main(a):
    cfg = model_config(a.preset, a.config)
    gpu_bytes = int(a.gpu_memory_gb * GIB)
    degrees = {k: getattr(a, k) for k in ("dp_replicate", "dp_shard", "ep") if getattr(a, k) is not None}
    base = ParallelConfig(**degrees, activation_checkpointing=a.activation_checkpointing,
                          offload_optimizer=a.offload_optimizer, mixed_precision=a.mixed_precision)
    print(f"{a.config or a.preset}: {count_params(cfg)['total'] / 1e9:.2f}B params, "
          f"micro-batch {a.micro_batch} x {a.seq_len} tokens, {a.mixed_precision} compute, {a.gpu_memory_gb:g} GB GPUs")
    asked = plan_rows(cfg, a.world_size, [base], a.micro_batch, a.seq_len, gpu_bytes)
    others = [p for p in layouts(a.world_size, cfg.num_experts, base)
              if (p.dp_replicate, p.dp_shard, p.ep) != (asked[0].dp_replicate, asked[0].dp_shard, asked[0].ep)]
    rows = asked + plan_rows(cfg, a.world_size, others, a.micro_batch, a.seq_len, gpu_bytes)
    print(table(rows, gpu_bytes))
    best = search(cfg, a.world_size, replace(base, dp_replicate=1, dp_shard=-1, ep=1), a.micro_batch, a.seq_len,
                  gpu_bytes)
    print(f"smallest layout that fits: {best.layout()} ({best.gpu_total / GIB:.1f} GiB per GPU)" if best else
          f"nothing fits on up to {a.world_size} GPUs of {a.gpu_memory_gb:g} GB: lower --micro-batch or --seq-len")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"config": cfg.to_dict(), "asked": asdict(rows[0]), "rows": [asdict(r) for r in rows],
                       "smallest": asdict(best) if best else None}, f, indent=2)

