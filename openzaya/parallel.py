"""Training at scale: FSDP2, expert parallelism (EP), HSDP and activation checkpointing for ZAYA models, applied
from outside the model (gpt-fast's tp.py, torchtitan's parallelize.py): model.py runs unchanged, this module swaps
each layer's `Experts` for `EPExperts` (as offload.py swaps in its own experts) and wraps modules with FSDP2.

Layout. The W ranks of a torchrun job form a device mesh (dp_replicate, dp_shard_mod_ep, ep) with
W = dp_replicate x dp_shard and dp_shard = dp_shard_mod_ep x ep: EP borrows its ranks from the FSDP shard dimension
(torchtitan's layout; EP groups are consecutive ranks, i.e. inside a node). Every rank reads its own slice of the
batch.
- dp_shard > 1, FSDP2 (`fully_shard`) per decoder layer, each layer's experts (~95% of the parameters) as their own
  unit, and the root (embedding = tied LM head, input scale/bias, final norm). dp_replicate > 1 adds HSDP: shards
  over dp_shard, replicas over dp_replicate.
- ep > 1: rank r of an EP group owns experts [r E/ep, (r+1) E/ep) of every MoE layer (a DTensor, Shard(0) on the ep
  mesh), FSDP-sharded further over dp_shard_mod_ep. Routed tokens go to the rank that owns their expert and come
  back by all-to-all (autograd: the backward is the reverse exchange). Tokens routed to the skip class, and padding
  (route -1), are never sent. Routing stays on the token's own rank, so router replay and the bias-balancing counts
  are unchanged; `update_balancing_biases` all-reduces the counts over all ranks (every rank sees tokens).
- dp_shard = 1 (and W > 1): plain data parallel, every rank holds the whole model and one all-reduce of the flat
  gradient runs after the accumulation (DDP's arithmetic; the trainer's original path). W = 1: nothing is wrapped.
- Gradients are SUMMED over ranks (the trainer divides the loss by the global target-token count), also for the
  experts whose data-parallel group is smaller (W / ep ranks): mean reduction would weight the two differently.
- Mixed precision (`mixed_precision="bf16"`): FSDP2 keeps fp32 master weights and reduces in fp32, and all-gathers
  bf16 copies for compute. Forward inputs are NOT cast (`cast_forward_inputs=False`): the residual stream between
  blocks stays fp32 as the model requires; the model's own `.float()` islands (norms, softmax, residual merges, the
  fp32 LM head of `token_logprobs`) are unchanged.
- Activation checkpointing per decoder layer (torch.utils.checkpoint, non-reentrant). The recomputation would count
  each token twice in the router's balancing statistics; the counts of the recomputation are dropped.
- `offload_optimizer=True`: FSDP2's CPUOffloadPolicy (sharded parameters, gradients and thus the optimizer state on
  the CPU; the optimizer step runs there).
Simplified: no tensor, context or pipeline parallelism; no all-to-all/compute overlap (the token counts are read on
the host once per layer to size the exchange); EP does not balance load by itself (the router biases do that).

Shape legend: N tokens on this rank, M routed tokens sent by this rank, Q tokens received, D hidden, E experts,
El experts per EP rank, P EP ranks.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .model import Experts, _experts_forward


@dataclass
class ParallelConfig:
    """Parallel degrees (flags `--dp-replicate`, `--dp-shard`, `--ep`) and memory options."""

    dp_replicate: int = 1              # HSDP replicas (full copies of the sharded state)
    dp_shard: int = -1                 # FSDP2 shard degree; -1 = world size / dp_replicate
    ep: int = 1                        # expert-parallel degree, divides dp_shard and the expert count
    activation_checkpointing: bool = False
    offload_optimizer: bool = False    # FSDP2 CPU offload: sharded params, grads, optimizer state on the CPU
    mixed_precision: str = "fp32"      # fp32 | bf16 (bf16 compute, fp32 master weights and reduction)


def native_bf16(device: torch.device) -> bool:
    """True where bf16 matmuls run natively: CUDA, or a CPU with AVX512-BF16 or AMX (oneDNN's bf16 GEMM; on this
    project's 2-core AMD EPYC with AVX512-BF16, square matmuls of 512-2048 ran ~2.4x faster in bf16 than fp32).
    Elsewhere torch emulates bf16 on the CPU, slower than fp32."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_precision(name: str, device: torch.device) -> str:
    """'auto' -> 'bf16' where `native_bf16(device)`, else 'fp32'; 'bf16' / 'fp32' as given. bf16 = autocast of the
    forward (fp32 master weights, gradients and optimizer state; the model keeps its fp32 residual stream, norms,
    router softmax and LM-head log-probs, as the TR's fp32 op set)."""
    if name not in ("auto", "bf16", "fp32"):
        raise ValueError(f"mixed_precision must be auto, bf16 or fp32, got {name!r}")
    if name == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return name


@dataclass(frozen=True)
class Layout:
    """The resolved degrees for a world size: world = dp_replicate x dp_shard, dp_shard = dp_shard_mod_ep x ep."""

    world: int
    dp_replicate: int
    dp_shard: int
    ep: int

    @property
    def fsdp(self) -> bool:
        return self.dp_shard > 1

    @property
    def replicate_only(self) -> bool:    # DDP: whole model per rank, flat all-reduce
        return self.world > 1 and self.dp_shard == 1

    def __str__(self):
        kind = "fsdp2" if self.fsdp else ("ddp" if self.replicate_only else "single")
        return f"{kind} world {self.world} = dp_replicate {self.dp_replicate} x dp_shard {self.dp_shard} (ep {self.ep})"


def resolve_layout(pcfg: ParallelConfig, world: int, num_experts: int | None = None) -> Layout:
    """Check the degrees against the world size (and the expert count), naming the flag to fix."""
    if pcfg.mixed_precision not in ("fp32", "bf16"):
        raise ValueError(f"--mixed-precision must be fp32 or bf16, got {pcfg.mixed_precision!r}")
    R = pcfg.dp_replicate
    if R < 1 or world % R:
        raise ValueError(f"--dp-replicate {R} does not divide the world size {world}")
    S = world // R if pcfg.dp_shard == -1 else pcfg.dp_shard
    if R * S != world:
        raise ValueError(f"--dp-replicate {R} x --dp-shard {S} = {R * S} ranks, but the world size is {world}")
    if pcfg.ep < 1 or S % pcfg.ep:
        raise ValueError(f"--ep {pcfg.ep} must divide --dp-shard {S} (expert parallelism borrows the shard ranks)")
    if num_experts is not None and num_experts % pcfg.ep:
        raise ValueError(f"--ep {pcfg.ep} must divide the number of experts {num_experts}")
    if pcfg.offload_optimizer and S == 1:
        raise ValueError("--offload-optimizer needs FSDP2 (--dp-shard > 1 under torchrun)")
    return Layout(world=world, dp_replicate=R, dp_shard=S, ep=pcfg.ep)


@dataclass
class Meshes:
    """The device meshes of a layout, cut from one (dp_replicate, dp_shard_mod_ep, ep) mesh."""

    dense: object      # FSDP2 mesh of the dense parameters: dp_shard, or (dp_replicate, dp_shard) for HSDP
    experts: object    # FSDP2 mesh of the experts: `dense`, or (dp_replicate,) dp_shard_mod_ep with EP
    ep: object         # the EP groups (consecutive ranks)
    device_type: str


def build_meshes(layout: Layout, device_type: str) -> Meshes | None:
    """None for one rank."""
    if layout.world == 1:
        return None
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    root = init_device_mesh(device_type, (layout.dp_replicate, layout.dp_shard // layout.ep, layout.ep),
                            mesh_dim_names=("dp_replicate", "dp_shard_mod_ep", "ep"))
    shard = root["dp_shard_mod_ep", "ep"]._flatten("dp_shard")
    hsdp = layout.dp_replicate > 1

    def with_replicas(m):
        return DeviceMesh._concatenate([root["dp_replicate"], m]) if hsdp else m
    dense = with_replicas(shard)
    experts = with_replicas(root["dp_shard_mod_ep"]) if layout.ep > 1 else dense
    return Meshes(dense=dense, experts=experts, ep=root["ep"], device_type=device_type)


# -----------------------------------------------------------------------------
# Expert parallelism


def exchange(x_MD, out_splits: list[int], in_splits: list[int], group):
    """All-to-all of rows: in_splits[p] rows go to rank p of `group`, out_splits[p] rows arrive from it (autograd:
    the backward sends the gradients back the same way). One function, so tests can count the payload."""
    from torch.distributed._functional_collectives import all_to_all_single_autograd
    return all_to_all_single_autograd(x_MD.contiguous(), out_splits, in_splits, group)


class EPExperts(nn.Module):
    """Drop-in for `model.Experts` (same forward signature, same parameter names and global shapes) holding this
    EP rank's El = E / P experts as DTensors (Shard(0) on the ep mesh).

    forward: routed tokens sorted by expert -> counts per (destination, expert) exchanged -> token rows exchanged ->
    the local experts run on what arrived (model._experts_forward, grouped GEMM) -> rows exchanged back -> times the
    combine weight, scattered into [N, D]. Skip and padding rows (route -1) stay home with output 0."""

    def __init__(self, experts: Experts, ep_mesh):
        super().__init__()
        from torch.distributed.tensor import DTensor, Shard
        E, P = experts.gate_up_proj.shape[0], ep_mesh.size()
        r, El = ep_mesh.get_local_rank(), E // P
        self.ep_mesh, self.num_experts, self.use_grouped_mm = ep_mesh, E, experts.use_grouped_mm
        for name in ("gate_up_proj", "down_proj"):
            full = getattr(experts, name).detach()
            mine = full[r * El:(r + 1) * El].clone()
            if not mine.is_meta:
                mine = mine.to(ep_mesh.device_type)
            setattr(self, name, nn.Parameter(DTensor.from_local(mine, ep_mesh, [Shard(0)], run_check=False,
                                                                shape=full.shape, stride=full.stride())))
        self.sent_rows = 0   # token rows this rank sent to experts since construction (statistics)

    def forward(self, x_ND, route_N, weight_N):
        group, P, E = self.ep_mesh.get_group(), self.ep_mesh.size(), self.num_experts
        El = E // P
        order_N = torch.argsort(route_N, stable=True)
        counts_E1 = torch.bincount(route_N + 1, minlength=E + 1)            # [skip/pad, e0, e1, ...]
        token_M = order_N[int(counts_E1[0]):]                                 # routed tokens, in expert order
        send_E = counts_E1[1:].contiguous()
        recv_PEl = torch.empty_like(send_E)                                   # per source rank, per local expert
        dist.all_to_all_single(recv_PEl, send_E, group=group)
        send_P, recv_P = send_E.view(P, El).sum(1).tolist(), recv_PEl.view(P, El).sum(1).tolist()
        self.sent_rows += len(token_M)
        xs_QD = exchange(x_ND[token_M], recv_P, send_P, group)
        local_Q = torch.repeat_interleave(torch.arange(El, device=x_ND.device).repeat(P), recv_PEl)
        ones_Q = torch.ones(local_Q.shape[0], dtype=weight_N.dtype, device=x_ND.device)
        w_gate_up, w_down = self.gate_up_proj.to_local(), self.down_proj.to_local()
        if local_Q.numel():
            out_QD = _experts_forward(xs_QD, local_Q, ones_Q, w_gate_up, w_down, self.use_grouped_mm)
        else:
            # NOTE: nothing arrived, but the exchanges and weights must stay in the graph: every rank has to run
            # every backward all-to-all (else the ranks deadlock), and idle experts get a zero gradient, as in one
            # process (not None: the optimizer would skip them).
            out_QD = xs_QD + 0 * (w_gate_up.sum() + w_down.sum())
        out_MD = exchange(out_QD, send_P, recv_P, group) * weight_N[token_M, None].to(x_ND.dtype)
        return torch.zeros_like(x_ND).index_copy(0, token_M, out_MD)


def apply_expert_parallel(model, ep_mesh):
    for layer in model.model.layers:
        layer.mlp.experts = EPExperts(layer.mlp.experts, ep_mesh)


# -----------------------------------------------------------------------------
# Activation checkpointing, FSDP2


def _checkpointed_forward(layer, forward, *args):
    from torch.utils.checkpoint import checkpoint
    router, calls = layer.mlp.gate, []

    def run(*a):
        counts = router.load_counts
        out = forward(*a)
        if calls:                      # the recomputation in backward: count each token once
            router.load_counts = counts
        calls.append(1)
        return out
    return checkpoint(run, *args, use_reentrant=False)


def apply_activation_checkpointing(model):
    """Recompute each decoder layer's activations in backward; only the layer inputs stay saved."""
    for layer in model.model.layers:
        layer.forward = functools.partial(_checkpointed_forward, layer, layer.forward)


def _expert_placement(n_shards: int):
    """Experts shard on dim 0 (whole experts per rank, the per-expert Muon update stays local) when the experts
    divide evenly, else on the rows of each expert (dim 1)."""
    from torch.distributed.tensor import Shard

    def place(p):
        local = p.to_local() if hasattr(p, "to_local") else p
        if local.shape[0] % n_shards == 0 or local.shape[1] % n_shards:
            return Shard(0)
        return Shard(1)
    return place


def apply_fsdp(model, meshes: Meshes, layout: Layout, pcfg: ParallelConfig):
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
    bf16 = pcfg.mixed_precision == "bf16"
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32,
                              cast_forward_inputs=False)
    offload = (CPUOffloadPolicy(pin_memory=meshes.device_type == "cuda") if pcfg.offload_optimizer
               else OffloadPolicy())
    kw = dict(mp_policy=mp, offload_policy=offload)
    for layer in model.model.layers:
        fully_shard(layer.mlp.experts, mesh=meshes.experts,
                    shard_placement_fn=_expert_placement(layout.dp_shard // layout.ep), **kw)
        fully_shard(layer, mesh=meshes.dense, **kw)
    fully_shard(model, mesh=meshes.dense, **kw)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)           # SUM over ranks (see the module docstring)
            m.set_force_sum_reduction_for_comms(True)   # plain SUM collectives (gloo has no pre-multiplied sum)
            m.set_reduce_scatter_unused_params(True)    # a rank whose experts got no token sends zeros
    return model


def reshard(model):
    """Free the all-gathered parameters FSDP2 keeps after a forward without backward (the root keeps its own after
    every forward: the LM head of `token_logprobs` runs outside forward). State-dict code needs the sharded ones."""
    from torch.distributed.fsdp import FSDPModule
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def parallelize(model, meshes: Meshes | None, layout: Layout, pcfg: ParallelConfig):
    """Apply EP, activation checkpointing and FSDP2 to `model` in place (in that order); returns it."""
    if layout.ep > 1:
        apply_expert_parallel(model, meshes.ep)
    if pcfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if layout.fsdp:
        apply_fsdp(model, meshes, layout, pcfg)
    return model


# -----------------------------------------------------------------------------
# The trainer's side: gradient reduction (DDP layout), clipping over DTensors


def reduce_gradients(params, layout: Layout):
    """After the accumulation: the DDP layout all-reduces the flat gradient (SUM); FSDP2 has reduced already.
    A parameter that no token reached this step (e.g. a layer whose tokens all took the skip class) gets a zero
    gradient on every layout, as FSDP2's reduce-scatter gives it, so weight decay and momentum treat it the same at
    any world size (torch's optimizers would skip a None gradient)."""
    if layout.fsdp:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if layout.replicate_only:
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat)
        off = 0
        for p in params:
            p.grad = flat[off:off + p.numel()].view_as(p).clone()
            off += p.numel()


@torch.no_grad()
def clip_grad_norm_(params, max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_ for gradients that may be DTensors on different meshes (experts on the EP mesh, the
    rest on the shard mesh): the norm of each mesh group is reduced over its mesh, then combined. max_norm <= 0:
    the norm only."""
    from torch.distributed.tensor import DTensor
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    groups: dict = {}
    for g in grads:
        key = (g.device_mesh, g.placements) if isinstance(g, DTensor) else None
        groups.setdefault(key, []).append(g)
    norms = []
    for gs in groups.values():
        n = torch.nn.utils.get_total_norm(gs)
        norms.append(n.full_tensor() if isinstance(n, DTensor) else n)
    total = torch.linalg.vector_norm(torch.stack(norms)) if len(norms) > 1 else norms[0]
    if max_norm > 0:   # torch's formula, applied to each rank's shard
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            (g.to_local() if isinstance(g, DTensor) else g).mul_(coef)
    return total


# -----------------------------------------------------------------------------
# One call for a trainer (train.py; the RL loop can use the same)


@dataclass
class Setup:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    meshes: Meshes | None
    layout: Layout
    rank: int


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Start the process group when torchrun started several ranks (NCCL for CUDA tensors, gloo for CPU ones);
    returns (rank, world)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo")
    return (dist.get_rank() if dist.is_initialized() else 0), world


def setup(model, pcfg: ParallelConfig, device: torch.device, make_optimizer) -> Setup:
    """Parallelize `model` (built identically on every rank, on any device) for this torchrun job and build its
    optimizer with `make_optimizer(model)` on the sharded parameters (e.g. optim.build_optimizer)."""
    rank, world = init_distributed(device)
    layout = resolve_layout(pcfg, world, model.config.num_experts)
    meshes = build_meshes(layout, device.type)
    if not layout.fsdp:
        model = model.to(device)
    model = parallelize(model, meshes, layout, pcfg)
    return Setup(model=model, optimizer=make_optimizer(model), meshes=meshes, layout=layout, rank=rank)
