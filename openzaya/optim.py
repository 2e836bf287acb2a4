"""Muon for matrix weights, AdamW for everything else: the ZAYA1 optimizer split (TR §III, "Muon with AdamW RMS
matching"; RL: Muon with momentum 0 for matrices, AdamW for embedding and LM head).

- Muon (Jordan et al. 2024): SGD momentum (Nesterov), then the update matrix is orthogonalised by a quintic
  Newton-Schulz iteration (coefficients 3.4445, -4.7750, 2.0315; 5 steps), so its singular values land near 1.
  RMS matching (Moonshot's recipe, our reading of the report's phrase): the orthogonal update is scaled by
  0.2 * sqrt(max(rows, cols)), which gives it roughly AdamW's update RMS, so both groups share one learning rate.
  Decoupled weight decay. 3D expert tensors [E, out, in] are orthogonalised per expert (a batched iteration).
- AdamW: the textbook algorithm (bias-corrected, decoupled weight decay), equal to torch.optim.AdamW (tested).

`split_params(model)` applies the report's split: 2D linear weights and 3D expert tensors go to Muon; embeddings
(tied LM head), norms, biases, router output vectors, residual scales, key temperatures and 1D/conv parameters go
to AdamW. The CCA convolution weights are 3D but tiny and not matrices in the Muon sense: AdamW.
The iteration runs in fp32 on CPU (bitwise-reproducible resumes) and bf16 on CUDA.

Sharded parameters (FSDP2 / expert parallelism, parallel.py: DTensors) work as they are: the elementwise math runs on
each rank's local shard, and Muon orthogonalises the full matrix: a 3D expert tensor sharded only along the expert
dimension holds whole experts on every rank, so its per-expert iteration is local; any other shard (2D matrices,
experts split by rows) is all-gathered, orthogonalised on every rank, and the rank keeps its own shard (simple,
redundant compute; those matrices are ~5% of ZAYA's parameters). State tensors are DTensors like their parameters,
so distributed checkpoints reshard them.
"""

from __future__ import annotations

import math

import torch

NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(G: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately U V^T of G = U S V^T, for G [..., m, n] (batched over leading dims)."""
    a, b, c = NS_COEFFS
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
    transpose = G.shape[-2] > G.shape[-1]
    if transpose:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if transpose:
        X = X.mT
    return X.to(G.dtype)


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (in-place ops on it update the DTensor), a plain tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


def orthogonalise(u_local: torch.Tensor, like: torch.Tensor, steps: int) -> torch.Tensor:
    """`newton_schulz` of the update whose local shard is `u_local` and whose sharding is that of `like` (a parameter
    or gradient, DTensor or not); returns this rank's shard of the result."""
    if not hasattr(like, "device_mesh"):
        return newton_schulz(u_local, steps)
    from torch.distributed.tensor import DTensor, Replicate
    mesh, placements = like.device_mesh, like.placements
    if like.ndim == 3 and all(pl.is_replicate() or getattr(pl, "dim", None) == 0 for pl in placements):
        return newton_schulz(u_local, steps)                            # whole experts on this rank
    full = DTensor.from_local(u_local, mesh, placements, shape=like.shape, stride=like.stride(),
                              run_check=False).full_tensor()
    o = DTensor.from_local(newton_schulz(full, steps), mesh, [Replicate()] * mesh.ndim, run_check=False)
    return o.redistribute(mesh, placements).to_local()               # Replicate -> Shard: a local slice


def split_params(model) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(muon, adamw) parameter lists by the report's split."""
    muon, adamw = [], []
    embed = {id(model.output_embeddings())} if hasattr(model, "output_embeddings") else set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_matrix = (p.ndim == 2 and id(p) not in embed and "embed" not in name and "lm_head" not in name)
        is_experts = p.ndim == 3 and name.endswith(("gate_up_proj", "down_proj")) and ".experts." in name
        (muon if is_matrix or is_experts else adamw).append(p)
    return muon, adamw


class MuonAdamW(torch.optim.Optimizer):
    """One optimizer, two kinds of groups: {"params", "kind": "muon", lr, momentum, nesterov, ns_steps, weight_decay}
    and {"params", "kind": "adamw", lr, betas, eps, weight_decay}. Its state_dict round-trips (resume)."""

    def __init__(self, param_groups, lr: float = 1e-3, momentum: float = 0.95, betas=(0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0, nesterov: bool = True, ns_steps: int = 5):
        defaults = dict(lr=lr, momentum=momentum, betas=betas, eps=eps, weight_decay=weight_decay, nesterov=nesterov,
                        ns_steps=ns_steps, kind="adamw")
        super().__init__(param_groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            if group["kind"] == "muon":
                self._muon(group)
            elif group["kind"] == "adamw":
                self._adamw(group)
            else:
                raise ValueError(f"unknown param group kind {group['kind']!r}")

    def _state_of(self, p, kind: str) -> dict:
        """p's state, created on first use (zeros shaped and sharded like p)."""
        state = self.state[p]
        if not state and kind == "muon":
            state["momentum_buffer"] = torch.zeros_like(p)
        elif not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        return state

    def init_state(self):
        """Create every parameter's state without a step (the memory planner reads its size)."""
        for group in self.param_groups:
            for p in group["params"]:
                self._state_of(p, group["kind"])

    def _muon(self, group):
        lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            g = _local(p.grad)
            state = self._state_of(p, "muon")
            buf = _local(state["momentum_buffer"])
            buf.mul_(mom).add_(g)
            u = g.add(buf, alpha=mom) if group["nesterov"] else buf
            o = orthogonalise(u, p, group["ns_steps"])
            scale = 0.2 * math.sqrt(max(p.shape[-2], p.shape[-1]))    # AdamW RMS matching (global shape)
            w = _local(p)
            if wd:
                w.mul_(1 - lr * wd)
            w.add_(o, alpha=-lr * scale)

    def _adamw(self, group):
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            g = _local(p.grad)
            state = self._state_of(p, "adamw")
            state["step"] += 1
            t = float(state["step"])
            m, v, w = _local(state["exp_avg"]), _local(state["exp_avg_sq"]), _local(p)
            if wd:
                w.mul_(1 - lr * wd)
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
            denom = (v.sqrt() / math.sqrt(bc2)).add_(eps)
            w.addcdiv_(m, denom, value=-lr / bc1)


def build_optimizer(model, lr: float, weight_decay: float = 0.0, momentum: float = 0.95, betas=(0.9, 0.95),
                    adamw_lr: float | None = None) -> MuonAdamW:
    """Muon on matrices, AdamW on the rest; AdamW's lr defaults to Muon's (RMS matching makes them comparable).
    Each group keeps its base lr in "base_lr" so schedules multiply it."""
    muon, adamw = split_params(model)
    adamw_lr = lr if adamw_lr is None else adamw_lr
    groups = [dict(params=muon, kind="muon", lr=lr, base_lr=lr, momentum=momentum, weight_decay=weight_decay),
              dict(params=adamw, kind="adamw", lr=adamw_lr, base_lr=adamw_lr, betas=betas, weight_decay=0.0)]
    return MuonAdamW([g for g in groups if g["params"]])
