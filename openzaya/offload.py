"""Dynamic expert offloading: run a ZAYA model whose experts do not fit on the compute device, with identical outputs.

The ZAYA1-8B article (deployment section) points out that only ~0.76B of the 8.8B parameters are used per token
(top-1 of 16 experts per layer, or none: the skip class), so the experts, ~95% of the weights, need not be resident.
What we do:

- Non-expert weights (embeddings, CCA attention, routers, norms, residual scalings) are loaded as usual and stay on
  the compute device. Expert weights (`model.layers.{i}.mlp.experts.gate_up_proj` [E, 2I, D] and `down_proj`
  [E, D, I]) stay in a slower tier: the safetensors files on disk when computing on the CPU (`tier="disk"`), or
  CPU RAM (pinned) when computing on a GPU (`tier="host"`). Checkpoints in the native Hugging Face layout are read
  as they are, sharded or not.
- Each layer owns an expert cache on the compute device: a preallocated slab of `slots` experts (the byte budget is
  split evenly over the layers, at least one expert per layer), LRU eviction by default (`policy="lfu"` keeps the
  most used instead). A layer loads only the experts its router selected for the current step, all of them issued
  at once (a batch per layer) while the experts already resident compute; when a step needs more experts than the
  layer has slots, it runs in rounds (load, compute, reuse the slot).
- Prefetch (`prefetch=True`): before layer l computes its experts, layer l+1's router is run on layer l's MoE input
  and layer l's router latent (the EDA state that layer l+1 really receives), and the experts it predicts are
  loaded into layer l+1's cache in the background. The prediction is approximate (layer l+1's real router input
  has passed through one more attention block); statistics count how many prefetched experts were then used.
- `OffloadedExperts` has `Experts`' forward signature and runs `Experts`' per-expert loop (same ops on the same
  values), so logits equal the resident model's per-expert loop bit for bit and its grouped-GEMM path to float
  rounding. `OffloadedMoE` is `MoE` plus the prefetch and token counting.

Disk reads use `os.preadv` straight into the cache slot at the offsets of the safetensors header (the format is an
8-byte header length, a JSON header, then raw little-endian data) rather than `safe_open(...).get_slice(name)[e]`:
both read one expert without touching the rest of the tensor, but safetensors memory-maps the file and every page
read through a mapping counts in the process's resident set (RssFile) until the mapping closes, which would make
the resident set grow to the whole checkpoint over a long run. The page cache still holds what was read; the kernel
reclaims it under pressure, and it is not this process's memory.

Statistics (`model.offload.stats.summary()`, `.line()`), per phase (prefill: forward passes of several tokens per
row; decode: one token per row; never mixed in a per-token figure): demand hits (resident from an earlier use),
prefetch hits (first use of a prefetched expert) and misses, as separate rates; experts loaded and bytes moved per
token; stall time per token (time the compute thread waited for loads); prefetch accuracy; resident bytes and the
effective budget next to the one asked for (the cache holds whole experts, the same number per layer: a warning
says so at load when they differ). Dtypes: the compute dtype (non-expert weights, activations) and the experts'
storage dtype (cache and slower tier; the budget is in its bytes) are separate, experts are cast when used.

Simplified: one CUDA copy stream, no pinned staging ring for disk reads on a GPU (a pinned buffer per read),
and the per-layer split of the budget is even (a learned per-layer split could do better).

Shape legend: N tokens, D hidden, I expert intermediate, E experts, S cache slots, M routed tokens.
"""

from __future__ import annotations

import json
import math
import os
import struct
import time
import warnings
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import load_checked_state_dict, load_config, refuse_non_finite, resolve_model_dir, weight_files
from .model import MoE, Router, ZayaConfig, ZayaForCausalLM, count_params

EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")
_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
GIB = 1024**3


def expert_key(layer: int, which: str) -> str:
    return f"model.layers.{layer}.mlp.experts.{which}"


def expert_nbytes(cfg: ZayaConfig, dtype: torch.dtype | None = None) -> int:
    """Bytes of one expert (gate_up + down) in `dtype` (default: the config's)."""
    itemsize = torch.empty((), dtype=dtype or cfg.torch_dtype).element_size()
    return 3 * cfg.moe_intermediate_size * cfg.hidden_size * itemsize


def all_expert_nbytes(cfg: ZayaConfig, dtype: torch.dtype | None = None) -> int:
    return cfg.num_hidden_layers * cfg.num_experts * expert_nbytes(cfg, dtype)


def projected_resident_bytes(cfg: ZayaConfig, fraction: float, bytes_per_param: int = 2) -> dict:
    """Resident weight bytes with `fraction` of the expert bytes cached (from parameter counts, bf16 by default)."""
    n = count_params(cfg)
    expert_params = cfg.num_hidden_layers * cfg.num_experts * 3 * cfg.moe_intermediate_size * cfg.hidden_size
    non_expert = (n["total"] - expert_params) * bytes_per_param
    experts = expert_params * bytes_per_param
    return {"fraction": fraction, "non_expert_bytes": non_expert, "expert_bytes": experts,
            "resident_bytes": non_expert + int(fraction * experts)}


# -----------------------------------------------------------------------------
# The slower tier


def _safetensors_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def _pread_into(fd: int, buf: torch.Tensor, offset: int):
    view = memoryview(buf.view(torch.uint8).numpy()).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise IOError(f"short read at offset {offset + done} (file truncated?)")
        done += n


class DiskExperts:
    """Expert weights read from the checkpoint's safetensors files, one expert at a time (`os.preadv`). With
    check_finite, each expert is checked for NaN / inf the first time it is read (a damaged checkpoint fails there,
    naming the tensor and the expert, rather than computing garbage; one pass over each expert in the process's
    life)."""

    def __init__(self, ckpt_dir: str | Path, cfg: ZayaConfig, check_finite: bool = True):
        self.ckpt_dir, self.check_finite, self.checked = Path(ckpt_dir), check_finite, set()
        files = weight_files(Path(ckpt_dir))
        headers, self.fds, self.loc = {}, {}, {}
        for layer in range(cfg.num_hidden_layers):
            for which in EXPERT_WEIGHTS:
                name = expert_key(layer, which)
                if name not in files:
                    raise KeyError(f"{ckpt_dir}: no tensor {name} (not a native-layout ZAYA checkpoint?)")
                path = files[name]
                if path not in headers:
                    headers[path] = _safetensors_header(path)
                    self.fds[path] = os.open(path, os.O_RDONLY)
                header, base = headers[path]
                info = header[name]
                if info["dtype"] not in _ST_DTYPES:
                    raise ValueError(f"{name}: unsupported dtype {info['dtype']}")
                dtype, shape = _ST_DTYPES[info["dtype"]], info["shape"]
                if shape[0] != cfg.num_experts:
                    raise ValueError(f"{name} has shape {shape}, the config says {cfg.num_experts} experts")
                per_expert = math.prod(shape[1:]) * torch.empty((), dtype=dtype).element_size()
                self.loc[layer, which] = (self.fds[path], base + info["data_offsets"][0], per_expert, dtype,
                                          tuple(shape[1:]))
        self.dtype = self.loc[0, EXPERT_WEIGHTS[0]][3]   # the experts' stored dtype (layer 0's gate_up)

    def read_into(self, layer: int, e: int, gate_up: torch.Tensor, down: torch.Tensor):
        """Copy expert e of `layer` into the given tensors (any device/dtype; direct when CPU, same dtype)."""
        for which, out in zip(EXPERT_WEIGHTS, (gate_up, down)):
            fd, start, per_expert, dtype, shape = self.loc[layer, which]
            if tuple(out.shape) != shape:
                raise ValueError(f"layer {layer} {which}: slot shape {tuple(out.shape)} != stored {shape}")
            direct = out.device.type == "cpu" and out.dtype == dtype and out.is_contiguous()
            buf = out if direct else torch.empty(shape, dtype=dtype, pin_memory=out.device.type == "cuda")
            _pread_into(fd, buf, start + e * per_expert)
            if self.check_finite and (layer, e, which) not in self.checked:
                refuse_non_finite(f"{expert_key(layer, which)}[{e}]", buf, self.ckpt_dir)
                self.checked.add((layer, e, which))
            if not direct:
                out.copy_(buf)

    def close(self):
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}


class HostExperts:
    """All expert weights in CPU RAM (pinned for fast, asynchronous copies when the compute device is a GPU)."""

    def __init__(self, disk: DiskExperts, cfg: ZayaConfig, dtype: torch.dtype, pin: bool):
        E, D, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up, self.down = [], []
        for layer in range(cfg.num_hidden_layers):
            gu = torch.empty(E, 2 * I, D, dtype=dtype, pin_memory=pin)
            dn = torch.empty(E, D, I, dtype=dtype, pin_memory=pin)
            for e in range(E):
                disk.read_into(layer, e, gu[e], dn[e])
            self.gate_up.append(gu)
            self.down.append(dn)

    def read_into(self, layer: int, e: int, gate_up: torch.Tensor, down: torch.Tensor):
        gate_up.copy_(self.gate_up[layer][e], non_blocking=True)
        down.copy_(self.down[layer][e], non_blocking=True)


class _Loader:
    """Issues expert loads in the background: worker threads on the CPU (preadv releases the GIL), a copy stream
    on a GPU. `start` returns a handle, `wait` blocks until that load is done and returns the seconds waited."""

    def __init__(self, source, device: torch.device, threads: int = 2):
        self.source, self.device = source, device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        use_threads = not (self.cuda and isinstance(source, HostExperts))
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="openzaya-offload") if use_threads else None

    def start(self, layer, e, gate_up, down):
        if self.cuda:   # the copy stream waits for compute that may still read the slot
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        if self.pool is not None:
            if self.cuda:
                def job():
                    with torch.cuda.stream(self.stream):
                        self.source.read_into(layer, e, gate_up, down)
                    self.stream.synchronize()
                return self.pool.submit(job)
            return self.pool.submit(self.source.read_into, layer, e, gate_up, down)
        with torch.cuda.stream(self.stream):   # GPU from pinned host memory: an asynchronous copy
            self.source.read_into(layer, e, gate_up, down)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        return ev

    def wait(self, handle) -> float:
        t0 = time.perf_counter()
        if isinstance(handle, Future):
            handle.result()
        else:
            handle.synchronize()
            torch.cuda.current_stream(self.device).wait_event(handle)
        return time.perf_counter() - t0

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(wait=True)


# -----------------------------------------------------------------------------
# Cache


@dataclass
class PhaseStats:
    """Counts of one phase: "prefill" (forward passes of several tokens per row) or "decode" (one token per row).
    A use is one (layer, expert) an engine step computes with; each is exactly one of a demand hit, a prefetch hit
    or a miss."""
    tokens: int = 0                   # tokens run through the model (padding excluded)
    demand_hits: int = 0              # uses found resident, loaded by an earlier use (or a prefetch used before)
    prefetch_hits: int = 0            # uses served by a prefetched expert, its first use since it was loaded
    misses: int = 0                   # uses that had to be loaded then
    loads: int = 0                    # experts copied into the cache (misses + prefetches)
    prefetched: int = 0               # experts loaded ahead by prefetch
    stall_s: float = 0.0              # compute thread waiting for loads

    def summary(self, expert_bytes: int) -> dict:
        uses, tok = self.demand_hits + self.prefetch_hits + self.misses, max(self.tokens, 1)
        rate = (lambda n: n / uses) if uses else (lambda n: float("nan"))
        return {"tokens": self.tokens, "uses": uses, "demand_hits": self.demand_hits,
                "prefetch_hits": self.prefetch_hits, "misses": self.misses, "loads": self.loads,
                "prefetched": self.prefetched, "demand_hit_rate": rate(self.demand_hits),
                "prefetch_hit_rate": rate(self.prefetch_hits), "miss_rate": rate(self.misses),
                "loads_per_token": self.loads / tok, "bytes_moved_per_token": self.loads * expert_bytes / tok,
                "stall_ms_per_token": 1e3 * self.stall_s / tok,
                "prefetch_accuracy": self.prefetch_hits / self.prefetched if self.prefetched else float("nan")}


@dataclass
class OffloadStats:
    """What the expert cache did, per phase (`prefill`, `decode`: per-token figures never mix the two), and what it
    is: its effective budget (whole experts per layer) next to the one asked for, and the dtypes. NOTE: a demand
    hit rate is what the cache itself achieves; the prefetch hit rate is what prediction adds; loads per token is
    what a step really moves (with one slot per layer, prefetch hits can be high while most uses still load)."""
    expert_bytes: int = 0             # bytes of one expert (storage dtype)
    budget_bytes: int = 0             # effective: slots of all layers x expert_bytes
    requested_budget_bytes: int = 0   # what was asked (bytes, or fraction x all expert bytes)
    all_expert_bytes: int = 0         # every expert of the checkpoint (storage dtype)
    slots: int = 0                    # experts resident per layer
    num_experts: int = 0
    expert_dtype: str = ""            # experts' storage dtype in the cache (and the budget's bytes)
    compute_dtype: str = ""           # non-expert weights and activations; experts are cast to it when used
    phase: str = "decode"             # the phase being counted (set by layer 0 from the input's shape)
    prefill: PhaseStats = field(default_factory=PhaseStats)
    decode: PhaseStats = field(default_factory=PhaseStats)
    resident: list = field(default_factory=list)   # per layer: experts currently resident

    @property
    def now(self) -> PhaseStats:
        return self.prefill if self.phase == "prefill" else self.decode

    def reset(self):
        self.prefill, self.decode = PhaseStats(), PhaseStats()

    def budget_note(self) -> str | None:
        """Why the effective budget differs from the one asked for, or None when it does not."""
        if self.budget_bytes == self.requested_budget_bytes:
            return None
        return (f"expert cache: {self.slots} of {self.num_experts} experts per layer = "
                f"{self.budget_bytes / GIB:.3f} GiB ({100 * self.budget_bytes / max(self.all_expert_bytes, 1):.2f}% "
                f"of the {self.expert_dtype} expert bytes), asked {self.requested_budget_bytes / GIB:.3f} GiB "
                f"({100 * self.requested_budget_bytes / max(self.all_expert_bytes, 1):.2f}%): the cache holds whole "
                f"experts, the same number in every layer")

    def summary(self) -> dict:
        total = PhaseStats(**{k: getattr(self.prefill, k) + getattr(self.decode, k)
                              for k in PhaseStats.__dataclass_fields__})
        return {**total.summary(self.expert_bytes),
                "prefill": self.prefill.summary(self.expert_bytes), "decode": self.decode.summary(self.expert_bytes),
                "resident_bytes": sum(self.resident) * self.expert_bytes, "budget_bytes": self.budget_bytes,
                "requested_budget_bytes": self.requested_budget_bytes,
                "budget_fraction": self.budget_bytes / max(self.all_expert_bytes, 1), "slots": self.slots,
                "expert_dtype": self.expert_dtype, "compute_dtype": self.compute_dtype}

    def line(self) -> str:
        """One line, decode figures (per generated token)."""
        s = self.summary()
        d = s["decode"]
        asked = "" if self.budget_note() is None else \
            f", asked {100 * self.requested_budget_bytes / max(self.all_expert_bytes, 1):.1f}%"
        return (f"offload | budget {s['budget_bytes'] / GIB:.2f} GiB ({100 * s['budget_fraction']:.1f}% of "
                f"{self.expert_dtype} experts{asked}) | decode: demand hits {d['demand_hit_rate']:.3f} prefetch hits "
                f"{d['prefetch_hit_rate']:.3f} misses {d['miss_rate']:.3f} | loads {d['loads_per_token']:.1f}/token "
                f"({d['bytes_moved_per_token'] / 2**20:.1f} MiB) | stall {d['stall_ms_per_token']:.2f} ms/token | "
                f"resident {s['resident_bytes'] / GIB:.2f} GiB")


class LayerCache:
    """One layer's resident experts: a slab of `slots` experts on the compute device, expert -> slot in use order."""

    def __init__(self, layer: int, slots: int, cfg: ZayaConfig, device, dtype, loader: _Loader,
                 stats: OffloadStats, policy: str = "lru"):
        if policy not in ("lru", "lfu"):
            raise ValueError(f"unknown eviction policy {policy!r} (lru or lfu)")
        E, D, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.layer, self.slots, self.loader, self.stats, self.policy = layer, slots, loader, stats, policy
        self.gate_up_SKD = torch.empty(slots, 2 * I, D, device=device, dtype=dtype)
        self.down_SDI = torch.empty(slots, D, I, device=device, dtype=dtype)
        # per-slot views made here, outside inference mode, so worker threads may write into them
        self.gu, self.dn = list(self.gate_up_SKD.unbind(0)), list(self.down_SDI.unbind(0))
        self.slot_of: OrderedDict[int, int] = OrderedDict()   # least recently used first
        self.free = list(range(slots))[::-1]
        self.pending: dict[int, object] = {}                  # expert -> load handle
        self.ahead: set[int] = set()                          # prefetched, not used yet
        self.uses = torch.zeros(E, dtype=torch.long)          # lfu counts
        stats.resident.append(0)

    def _take_slot(self, protect) -> int | None:
        if self.free:
            return self.free.pop()
        victims = [e for e in self.slot_of if e not in protect and e not in self.pending]
        if not victims:
            return None
        e = victims[0] if self.policy == "lru" else min(victims, key=lambda v: int(self.uses[v]))
        self.ahead.discard(e)
        self.stats.resident[self.layer] -= 1
        return self.slot_of.pop(e)

    def _load(self, e: int, slot: int):
        self.slot_of[e] = slot
        self.pending[e] = self.loader.start(self.layer, e, self.gu[slot], self.dn[slot])
        self.stats.now.loads += 1
        self.stats.resident[self.layer] += 1

    def _wait(self, e: int):
        h = self.pending.pop(e, None)
        if h is not None:
            self.stats.now.stall_s += self.loader.wait(h)

    def run(self, needed: list[int], compute):
        """Make every expert in `needed` resident and call compute(e, gate_up [2I, D], down [D, I]) on each.
        Resident experts compute first while the missing ones load (as many at once as slots allow)."""
        for e in list(self.pending):            # prefetches of this layer, normally long done
            self._wait(e)
        hits = [e for e in needed if e in self.slot_of]
        todo = hits + [e for e in needed if e not in self.slot_of]
        now, ahead = self.stats.now, len(self.ahead.intersection(needed))   # ahead: prefetched (resident or loading)
        now.prefetch_hits += ahead
        now.demand_hits += len(hits) - ahead
        now.misses += len(todo) - len(hits)
        self.ahead.difference_update(needed)
        self.uses[needed] += 1
        while todo:
            protect = set(todo)
            for e in todo:                       # issue loads in order while slots are available
                if e in self.slot_of:
                    continue
                slot = self._take_slot(protect)
                if slot is None:
                    break
                self._load(e, slot)
            e = todo.pop(0)
            self._wait(e)
            self.slot_of.move_to_end(e)
            slot = self.slot_of[e]
            compute(e, self.gu[slot], self.dn[slot])

    def prefetch(self, experts: list[int]):
        """Start loading predicted experts (most likely first) without evicting other predicted ones."""
        protect = set(experts)
        for e in experts[: self.slots]:
            if e in self.slot_of:
                continue
            slot = self._take_slot(protect)
            if slot is None:
                return
            self._load(e, slot)
            self.ahead.add(e)
            self.stats.now.prefetched += 1


# -----------------------------------------------------------------------------
# Modules


class OffloadedExperts(nn.Module):
    """Drop-in for `model.Experts` whose weights live in a `LayerCache`: same forward, same per-expert loop."""

    def __init__(self, cache: LayerCache, num_experts: int):
        super().__init__()
        self.cache, self.num_experts = cache, num_experts

    def forward(self, x_ND, route_N, weight_N):
        E = self.num_experts
        order_N = torch.argsort(route_N, stable=True)
        counts_E1 = torch.bincount(route_N + 1, minlength=E + 1)          # [skip/pad, e0, e1, ...]
        n_skip = int(counts_E1[0])
        token_idx = order_N[n_skip:]
        y_ND = torch.zeros_like(x_ND)
        if token_idx.numel() == 0:
            return y_ND
        counts = counts_E1[1:].tolist()
        xs = x_ND[token_idx].split(counts)                                 # per expert, in expert order
        needed = [e for e in range(E) if counts[e]]
        outs = {}

        def compute(e, gate_up, down):   # stored in the expert dtype: cast to the activations' (no-op when equal)
            gate, up = F.linear(xs[e], gate_up.to(x_ND.dtype)).chunk(2, dim=-1)
            outs[e] = F.linear(F.silu(gate) * up, down.to(x_ND.dtype))

        self.cache.run(needed, compute)
        out_MD = torch.cat([outs[e] for e in needed])
        out_MD = out_MD * weight_N[token_idx, None].to(x_ND.dtype)
        return y_ND.index_copy(0, token_idx, out_MD)


class OffloadedMoE(MoE):
    """`MoE` with offloaded experts; optionally prefetches the next layer's experts predicted by its router."""

    def __init__(self, gate: Router, experts: OffloadedExperts, stats: OffloadStats, count_tokens: bool):
        nn.Module.__init__(self)
        self.gate, self.experts = gate, experts
        self.stats, self.count_tokens = stats, count_tokens
        self.next_gate: Router | None = None     # set by load_offloaded; kept out of the module tree
        self.next_cache: LayerCache | None = None

    def __setattr__(self, name, value):
        if name == "next_gate":                   # a reference, not a submodule (no duplicate state_dict keys)
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def forward(self, x_BTD, r_prev_NR, keep_BT, replay_BT=None):
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)
        keep_N = None if keep_BT is None else keep_BT.reshape(-1)
        replay_N = None if replay_BT is None else replay_BT.reshape(-1)
        route_N, weight_N, r_NR = self.gate(x_ND, r_prev_NR, keep_N, replay_N)
        if self.count_tokens:   # layer 0: this forward's phase, for every count until the next forward
            self.stats.phase = "decode" if T == 1 else "prefill"
            self.stats.now.tokens += B * T if keep_N is None else int(keep_N.sum())
        if self.next_gate is not None and replay_N is None:
            with torch.no_grad():
                pred_N = self.next_gate(x_ND, r_NR, keep_N)[0]
            counts = torch.bincount(pred_N + 1, minlength=self.next_gate.E + 1)[1:]
            order = torch.argsort(counts, descending=True, stable=True)
            self.next_cache.prefetch([e for e in order.tolist() if counts[e] > 0])
        y_ND = self.experts(x_ND, route_N, weight_N)
        return y_ND.view(B, T, D), r_NR, route_N.view(B, T)


class Offload:
    """What `load_offloaded` attaches to the model as `model.offload`: caches, loader, statistics."""

    def __init__(self, caches, loader, source, stats):
        self.caches, self.loader, self.source, self.stats = caches, loader, source, stats

    def close(self):
        self.loader.close()
        if isinstance(self.source, DiskExperts):
            self.source.close()


# -----------------------------------------------------------------------------
# Loading


def requested_budget_bytes(cfg: ZayaConfig, budget_bytes: int | None = None, fraction: float | None = None,
                           dtype: torch.dtype | None = None) -> int:
    """The budget asked for, in bytes: budget_bytes, or fraction of all expert bytes (in `dtype`)."""
    if (budget_bytes is None) == (fraction is None):
        raise ValueError("give exactly one of budget_bytes or fraction")
    if budget_bytes is None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        budget_bytes = int(round(fraction * all_expert_nbytes(cfg, dtype)))
    return budget_bytes


def budget_to_slots(cfg: ZayaConfig, budget_bytes: int | None = None, fraction: float | None = None,
                    dtype: torch.dtype | None = None) -> int:
    """Cache slots per layer for a byte budget (or a fraction of all expert bytes), rounded down to whole experts,
    the same number in every layer; at least one per layer."""
    budget_bytes = requested_budget_bytes(cfg, budget_bytes, fraction, dtype)
    one = expert_nbytes(cfg, dtype)
    slots = min(cfg.num_experts, budget_bytes // (one * cfg.num_hidden_layers))
    if slots < 1:
        raise ValueError(f"an expert cache of {budget_bytes / GIB:.3f} GiB is below one expert per layer "
                         f"({cfg.num_hidden_layers} x {one / 2**20:.1f} MiB = {cfg.num_hidden_layers * one / GIB:.3f} GiB)")
    return slots


def load_offloaded(ckpt_dir: str | Path, budget_bytes: int | None = None, *, fraction: float | None = None,
                   device="cpu", dtype: torch.dtype | None = None, expert_dtype: torch.dtype | None = None,
                   tier: str = "auto", prefetch: bool = True, policy: str = "lru", threads: int = 2,
                   check_finite: bool = True) -> ZayaForCausalLM:
    """A `ZayaForCausalLM` with its non-expert weights on `device` and its experts offloaded.

    budget_bytes (or fraction of all expert bytes) sizes the expert cache, in bytes of `expert_dtype`, rounded
    down to whole experts per layer (a warning states the effective budget when it differs; `stats.budget_note()`).
    `dtype` is the compute dtype (non-expert weights, activations; default the config's); `expert_dtype` the
    experts' storage dtype in the cache and the slower tier (default: as the checkpoint stores them), cast to `dtype`
    when used, so dtype=float32 on a bf16 checkpoint keeps the cache in bf16 (same outputs: the cast is exact).
    tier "auto" = "disk" on the CPU, "host" (all experts in pinned CPU RAM) on a GPU. Statistics are at
    `model.offload.stats`. check_finite: NaN / inf weights are refused, the non-expert ones at load, each expert
    when it is first read (all at load with the host tier).
    """
    ckpt_dir, device = resolve_model_dir(ckpt_dir), torch.device(device)
    cfg = load_config(ckpt_dir)
    dtype = dtype or cfg.torch_dtype
    if tier == "auto":
        tier = "host" if device.type == "cuda" else "disk"
    if tier not in ("disk", "host"):
        raise ValueError(f"unknown tier {tier!r} (auto, disk or host)")
    source = DiskExperts(ckpt_dir, cfg, check_finite)
    expert_dtype = expert_dtype or source.dtype
    slots = budget_to_slots(cfg, budget_bytes, fraction, expert_dtype)
    one = expert_nbytes(cfg, expert_dtype)
    stats = OffloadStats(expert_bytes=one, all_expert_bytes=all_expert_nbytes(cfg, expert_dtype),
                         budget_bytes=slots * cfg.num_hidden_layers * one, slots=slots, num_experts=cfg.num_experts,
                         requested_budget_bytes=requested_budget_bytes(cfg, budget_bytes, fraction, expert_dtype),
                         expert_dtype=str(expert_dtype).replace("torch.", ""),
                         compute_dtype=str(dtype).replace("torch.", ""))
    if stats.budget_note() is not None:
        warnings.warn(stats.budget_note(), stacklevel=2)

    # ---- the model on meta, experts swapped for cached ones, then the non-expert weights read and assigned
    if tier == "host":
        source = HostExperts(source, cfg, expert_dtype, pin=device.type == "cuda")
    loader = _Loader(source, device, threads)
    with torch.device("meta"):
        model = ZayaForCausalLM(cfg)
    caches = []
    for i, layer in enumerate(model.model.layers):
        cache = LayerCache(i, slots, cfg, device, expert_dtype, loader, stats, policy)
        layer.mlp = OffloadedMoE(layer.mlp.gate, OffloadedExperts(cache, cfg.num_experts), stats, count_tokens=i == 0)
        caches.append(cache)
    skip = {expert_key(i, w) for i in range(cfg.num_hidden_layers) for w in EXPERT_WEIGHTS}
    sd = load_checked_state_dict(ckpt_dir, cfg, model.state_dict(), dtype, device, skip=skip, check_finite=check_finite)
    model.load_state_dict(sd, assign=True, strict=True)
    model.to(device)
    if prefetch:
        layers = model.model.layers
        for i in range(len(layers) - 1):
            layers[i].mlp.next_gate = layers[i + 1].mlp.gate
            layers[i].mlp.next_cache = caches[i + 1]
    cfg.dtype = str(dtype).replace("torch.", "")
    model.offload = Offload(caches, loader, source, stats)
    return model.eval()
