"""`openzaya pretrain` / `openzaya sft`: the resumable, data-parallel trainer (TR §III).

One flat loop for both stages; the stage only changes the data: pretraining packs plain problem+solution texts (loss
on every token), SFT packs chat samples (AP-trimmed to the window, loss on assistant tokens only). Both pack with
best-fit-decreasing into `seq_len`-token windows whose documents are kept apart by `segment_ids_BT` in the model.

- Optimizer: Muon on matrices + AdamW on the rest (optim.py); warmup then cosine or WSD; gradient clipping;
  router bias balancing after every optimizer step (all-reduced over ranks inside the model).
- Batch named by unit: `tokens_per_step` (global, a multiple of seq_len) and `device_batch_size` (sequences per
  micro-batch per rank); the accumulation count is derived, and a batch that does not divide is an error.
- Under torchrun the model is parallelized by parallel.py: by default FSDP2 over all ranks; `dp_shard`, `ep`
  (expert parallelism) and `dp_replicate` (HSDP; `dp_shard=1` = plain data parallel, the flat all-reduce) choose
  another layout, plus activation checkpointing, bf16 mixed precision and CPU offload of the optimizer state. One
  process stays unwrapped. Each step's loss is (sum of token losses) / (global target tokens of the step) and
  gradients are summed over ranks, so any layout and accumulation split gives the single-process gradient.
- Checkpoints (DCP shards of model and optimizer, plus step = data position, router-balancing state, RNG; dcp.py)
  are written atomically every `save_every` steps and at the end; `resume=True` continues bit-for-bit on CPU at the
  same layout, and to float tolerance at another world size or layout.
- One dense log line per step (with an ETA) and metrics.jsonl (optionally also TensorBoard or W&B, `log_to`); the
  final model is saved in the HF layout (gathered from the shards) with its tokenizer; `openzaya pretrain/sft` also
  plot loss.png (runlog.py).
Simplified: no context or pipeline parallelism, the data of a run is tokenized up front.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist

from .parallel import ParallelConfig, resolve_precision
from .runlog import external_logger, fmt_eta, plot_losses

CHECKPOINT = "checkpoint"         # a DCP directory (dcp.py)


@dataclass
class TrainConfig:
    stage: str = "pretrain"            # pretrain | sft
    data: str = ""                     # corpus directory (manifest.json + shards)
    tokenizer: str = ""                # tokenizer directory
    out: str = "runs/train"
    init_from: str = ""                # model directory (HF layout) to start from; "" = fresh `model_preset`
    model_preset: str = "nano"
    # Batch
    seq_len: int = 256                 # tokens per window (inputs; the window holds seq_len + 1 ids)
    tokens_per_step: int = 8192        # global batch in tokens (windows x seq_len)
    device_batch_size: int = 8         # sequences per micro-batch per rank
    steps: int = 100
    # Optimization
    lr: float = 3e-3                   # Muon (RMS-matched) and AdamW share it
    weight_decay: float = 0.0
    warmup_steps: int = 10
    schedule: str = "cosine"           # cosine | wsd
    final_lr_frac: float = 0.1
    wsd_decay_frac: float = 0.3        # WSD: fraction of steps spent decaying
    grad_clip: float = 1.0             # -1 = off
    balance_lr: float = 1e-3           # router bias balancing (eq. 5)
    # Data
    trim: str = "ap"                   # SFT: ap (answer-preserving) | truncate (the ablation)
    # 0 = random batches; k > 0 = length-grouped: each epoch's permutation is cut into chunks of k global batches,
    # each chunk sorted by the windows' used length and cut into batches (their order shuffled), and every
    # micro-batch drops its trailing all-padding columns (less padding, same loss per window). Measured on the
    # nano speedrun (k = 8, issue 26): pretraining 63 -> 51 CPU s, SFT 125 -> 106, but held-out single accuracy
    # after SFT 0.394 -> 0.335 (batches of one length are batches of one kind of sample): the speedrun keeps 0
    length_group_batches: int = 0
    seed: int = 0
    # Output
    save_every: int = 50               # -1 = only at the end
    resume: bool = False
    allow_config_change: bool = False  # resume even when the checkpoint was saved with other settings
    device: str = "auto"               # auto | cpu | cuda
    max_memory_gb: float = -1          # -1 = the machine's memory
    threads: int = 0                   # torch CPU threads; 0 = leave torch's default
    compile: bool = False              # torch.compile the forward (step_logprobs: pays off on long runs of larger models)
    log_to: str = ""                   # "" | tensorboard | wandb (optional packages; a clear error if missing)
    # Parallelism (torchrun; the knobs of parallel.ParallelConfig, whose defaults these are)
    dp_replicate: int = ParallelConfig.dp_replicate
    dp_shard: int = ParallelConfig.dp_shard
    ep: int = ParallelConfig.ep
    activation_checkpointing: bool = ParallelConfig.activation_checkpointing
    offload_optimizer: bool = ParallelConfig.offload_optimizer
    mixed_precision: str = "auto"      # auto (bf16 on CUDA and on CPUs with native bf16 matmuls, else fp32) | bf16 | fp32


# Presets are plain functions returning the dataclass.
def nano_pretrain(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(stage="pretrain", seq_len=192, tokens_per_step=16 * 192, device_batch_size=16,
                                 steps=300, lr=4e-3, warmup_steps=20, schedule="wsd"), **kw})


def nano_sft(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(stage="sft", seq_len=192, tokens_per_step=16 * 192, device_batch_size=16,
                                 steps=300, lr=2e-3, warmup_steps=10, schedule="cosine"), **kw})


PRESETS = {"nano_pretrain": nano_pretrain, "nano_sft": nano_sft}


def print0(*a, **kw):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, **kw, flush=True)


# -----------------------------------------------------------------------------
# Pure helpers


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine to final_lr_frac, or WSD (flat, then linear decay over the last wsd_decay_frac)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.final_lr_frac + (1 - cfg.final_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    if cfg.schedule == "wsd":
        decay_start = int(cfg.steps * (1 - cfg.wsd_decay_frac))
        if step < decay_start:
            return 1.0
        t = (step - decay_start) / max(1, cfg.steps - decay_start)
        return 1.0 - (1 - cfg.final_lr_frac) * min(t, 1.0)
    raise ValueError(f"schedule must be cosine or wsd, got {cfg.schedule!r}")


def batch_plan(cfg: TrainConfig, world: int) -> tuple[int, int]:
    """(global sequences per step, micro-batches per rank). Errors instead of silently rounding."""
    if cfg.tokens_per_step % cfg.seq_len:
        raise ValueError(f"tokens_per_step {cfg.tokens_per_step} is not a multiple of seq_len {cfg.seq_len}")
    seqs = cfg.tokens_per_step // cfg.seq_len
    per_micro = cfg.device_batch_size * world
    if seqs % per_micro:
        raise ValueError(f"{seqs} sequences per step (tokens_per_step / seq_len) is not a multiple of "
                         f"device_batch_size {cfg.device_batch_size} x world size {world}")
    return seqs, seqs // per_micro


def step_indices(step: int, n_windows: int, seqs: int, seed: int, used_W: torch.Tensor | None = None,
                 group_batches: int = 0) -> list[int]:
    """Window indices of one step's global batch: consecutive slices of per-epoch permutations (the data position
    is the step number, so resuming needs nothing else). With `group_batches` > 0 and the windows' used lengths
    `used_W`, each epoch's permutation is length-grouped (`epoch_order`)."""
    out, pos = [], step * seqs
    while len(out) < seqs:
        epoch, off = divmod(pos, n_windows)
        perm = torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        if group_batches > 0:
            perm = length_grouped(perm, used_W, seqs, group_batches, seed * 1_000_003 + epoch)
        take = min(seqs - len(out), n_windows - off)
        out += perm[off:off + take].tolist()
        pos += take
    return out


def length_grouped(perm: torch.Tensor, used_W: torch.Tensor, seqs: int, group_batches: int, seed: int) -> torch.Tensor:
    """Length-grouped order (the Hugging Face Trainer's group_by_length idea): cut `perm` into chunks of
    `group_batches` x `seqs` windows, sort each chunk by used length (longest first), cut it into batches of `seqs`
    and shuffle the batches' order within the chunk, so windows of similar length share a batch."""
    g = torch.Generator().manual_seed(seed + 7)
    out = []
    for c in range(0, len(perm), group_batches * seqs):
        chunk = perm[c:c + group_batches * seqs]
        chunk = chunk[torch.argsort(used_W[chunk], descending=True, stable=True)]
        batches = list(chunk.split(seqs))
        out += [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    return torch.cat(out)


def rank_micro_batches(mine: list[int], accum: int, cfg: TrainConfig, windows) -> list[tuple]:
    """This rank's windows of the step as `accum` micro-batches of (ids, segment ids, labels); length-grouped runs
    drop each micro-batch's trailing padding columns."""
    ids_W, seg_W, labels_W = windows
    micro = [mine[m * cfg.device_batch_size:(m + 1) * cfg.device_batch_size] for m in range(accum)]
    batches = [(ids_W[b], seg_W[b], labels_W[b]) for b in micro]
    return [cut_padding(*mb) for mb in batches] if cfg.length_group_batches > 0 else batches


def cut_padding(ids, seg, labels):
    """A micro-batch without its trailing columns that are padding in every window (packing fills windows from the
    start; padding has segment id -1 and no target), so the loss of every window is unchanged."""
    used = int((seg >= 0).sum(1).max())
    return ids[:, :used], seg[:, :used], labels[:, :max(used - 1, 1)]


def estimate_memory_bytes(model_cfg, cfg: TrainConfig, shards: int = 1) -> int:
    """Rough training memory of one rank: fp32 weights + grads + two optimizer moments (divided over `shards` FSDP2
    ranks), plus activations of one micro-batch (per layer ~24 D-wide fp32 tensors per token, and the fp32 logits
    with their gradient). `openzaya plan` gives the exact per-rank state bytes of a layout."""
    from .model import count_params
    n = count_params(model_cfg)["total"]
    tokens = cfg.device_batch_size * cfg.seq_len
    acts = tokens * (model_cfg.num_hidden_layers * 24 * model_cfg.hidden_size + 3 * model_cfg.vocab_size) * 4
    return n * 16 // shards + acts


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# -----------------------------------------------------------------------------
# Data


def prepare_windows(cfg: TrainConfig, tokenizer):
    """Load and check the corpus, tokenize (pretrain: plain text; SFT: chat, trimmed), pack into windows."""
    from .data import build_windows, load_corpus, plain_text, tokenize_plain, tokenize_sample
    samples = load_corpus(cfg.data)
    if not samples:
        raise ValueError(f"{cfg.data}: the corpus is empty")
    budget = cfg.seq_len + 1
    docs, actions = [], {}
    for s in samples:
        if cfg.stage == "pretrain":
            docs.append(tokenize_plain(tokenizer, plain_text(s), budget))
            act = "kept"
        else:
            r = tokenize_sample(tokenizer, s, budget=budget, trim=cfg.trim)
            act = "dropped" if r is None else r[2]
            if r is not None:
                docs.append((r[0], r[1]))
        actions[act] = actions.get(act, 0) + 1
    if not docs:
        raise ValueError(f"{cfg.data}: all {len(samples)} samples were dropped by trimming to {budget} tokens "
                         f"({actions}): raise seq_len")
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    ids, seg, labels = build_windows(docs, cfg.seq_len, pad)
    return ids, seg, labels, actions


# -----------------------------------------------------------------------------
# Checkpoints


def _rng_state() -> dict:
    import numpy as np
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s: dict):
    import numpy as np
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def trainer_state(model, step: int, cfg: TrainConfig) -> dict:
    """What a checkpoint holds besides the model and optimizer shards (dcp.py)."""
    return {"step": step, "bias_optim": [r.bias_optim_state for r in model.routers()], "rng": _rng_state(),
            "config": asdict(cfg), "model_config": model.config.to_dict()}


# -----------------------------------------------------------------------------
# The run


def model_config(cfg: TrainConfig, tokenizer):
    """The model's config (from init_from's config.json or a preset sized to the tokenizer), checked against the
    tokenizer before any weight is allocated."""
    from . import model as M
    if cfg.init_from:
        mc = M.ZayaConfig.load(cfg.init_from)
    else:
        if cfg.model_preset not in M.PRESETS:
            raise ValueError(f"unknown model preset {cfg.model_preset!r} (known: {sorted(M.PRESETS)})")
        preset = M.PRESETS[cfg.model_preset]
        try:
            mc = preset(-(-tokenizer.vocab_size // 64) * 64)
        except TypeError:   # presets with a fixed vocabulary (zaya1_8b)
            mc = preset()
        mc.bos_token_id, mc.eos_token_id, mc.pad_token_id = tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id
        mc.max_position_embeddings = max(mc.max_position_embeddings, cfg.seq_len + 1)
    if tokenizer.vocab_size > mc.vocab_size:
        raise ValueError(f"tokenizer {cfg.tokenizer} has {tokenizer.vocab_size} ids but the model's vocabulary is "
                         f"{mc.vocab_size}: they do not belong together")
    return mc


def build_model(cfg: TrainConfig, mc, device):
    """fp32 master weights (a bf16 checkpoint is for serving; mixed precision casts for compute)."""
    from .checkpoint import from_pretrained
    from .model import ZayaForCausalLM
    if cfg.init_from:
        return from_pretrained(cfg.init_from, dtype=torch.float32, device=str(device))
    torch.manual_seed(cfg.seed)
    return ZayaForCausalLM(mc).to(device)


def init_process(cfg: TrainConfig):
    """(world size, rank, device, parallel config, layout): joins the process group under torchrun (nccl on CUDA,
    else gloo), resolves the parallel layout, sets threads."""
    from . import parallel
    device = torch.device(resolve_device(cfg.device))
    rank, world = parallel.init_distributed(device)
    pcfg = parallel_config(cfg, device)
    layout = parallel.resolve_layout(pcfg, world)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    return world, rank, device, pcfg, layout


def step_logprobs(model, compile: bool):
    """What the training step calls for target log-probs: `model.token_logprobs`, or with `compile` its
    torch.compile'd version (inductor). Compiled, the experts take their per-expert loop: torch's CPU grouped GEMM
    has no fp32 kernel for the compiler's fake tensors, and autocast leaves it fp32. Measured (issue 26,
    dev/LOG.md, 1 thread, interleaved): bench/model.py's config (8 x 512) 1.26x eager under bf16 autocast after
    195 s of compiling, 1.12x in fp32 after 38 s; nano (32 x 128, fp32) 1.23x after ~65 s: a loss for the
    speedrun's 360 steps."""
    if not compile:
        return model.token_logprobs
    from .model import Experts
    for m in model.modules():
        if isinstance(m, Experts):
            m.use_grouped_mm = False
    return torch.compile(model.token_logprobs)


def forward_backward(logprobs_fn, micro_batches, n_targets: int, device: torch.device, bf16: bool) -> torch.Tensor:
    """Backward over this rank's micro-batches (ids, segment ids, labels) of one step, each loss = -(sum of its
    target log-probs) / (the step's global target tokens), so the gradients add up to the global mean. Returns the
    summed loss (detached). `logprobs_fn` = step_logprobs(model, compile). bf16 autocast when asked; the chunked
    LM head makes no [B, T, V] logits."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    loss_sum = torch.zeros((), device=device)
    for ids, seg, labels in micro_batches:
        ids, seg, labels = ids.to(device), seg.to(device), labels.to(device)
        with autocast:   # labels -100 score 0
            logp_BT = logprobs_fn(ids[:, :-1], labels, segment_ids_BT=seg[:, :-1])
        loss = -logp_BT.sum() / max(n_targets, 1)
        loss.backward()
        loss_sum += loss.detach()
    return loss_sum


def optimizer_step(opt, params: list, step: int, cfg: TrainConfig) -> tuple[torch.Tensor, float]:
    """Clip (grad_clip > 0; the norm over every rank's shards), set this step's learning rate, step, zero the
    gradients. Returns (grad norm, LR multiplier)."""
    from . import parallel
    gnorm = parallel.clip_grad_norm_(params, cfg.grad_clip)   # grad_clip <= 0: the norm only
    mult = lr_multiplier(step, cfg)
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * mult
    opt.step()
    opt.zero_grad(set_to_none=True)
    return gnorm, mult


def check_memory(cfg: TrainConfig, model_cfg, device: torch.device, dp_shard: int):
    """Refuse a run whose estimated training memory exceeds 90% of what the device (or max_memory_gb) offers."""
    need = estimate_memory_bytes(model_cfg, cfg, dp_shard)
    have = cfg.max_memory_gb * 2**30 if cfg.max_memory_gb > 0 else available_memory_bytes(device)
    if need > 0.9 * have:
        raise MemoryError(f"estimated training memory {need / 2**30:.1f} GiB exceeds 90% of the "
                          f"{have / 2**30:.1f} GiB available: reduce device_batch_size, seq_len or the model, or "
                          f"shard it over more ranks (torchrun; `openzaya plan` shows a layout that fits)")


# settings a resumed run may change without --allow-config-change: they do not change what is trained
RESUME_MAY_CHANGE = ("out", "resume", "allow_config_change", "device", "threads", "max_memory_gb", "log_to",
                     "save_every", "dp_replicate", "dp_shard", "ep", "activation_checkpointing", "offload_optimizer")


def restore(cfg: TrainConfig, ckpt_path: Path, metrics_path: Path, model, opt, rank: int) -> int:
    """The step to start from: the checkpoint's with --resume (model and optimizer shards, balancing state, RNG
    restored; any world size or layout), else 0 (seeded). A checkpoint saved with other settings is refused, the
    differences listed, unless --allow-config-change. Rank 0 keeps metrics.jsonl up to that step only."""
    from . import dcp
    from .checkpoint import config_changes
    start = 0
    if cfg.resume and dcp.find(ckpt_path):
        state = dcp.load(ckpt_path, model, opt)
        changes = config_changes(state.get("config", {}), asdict(cfg), ignore=RESUME_MAY_CHANGE)
        if changes and not cfg.allow_config_change:
            raise ValueError(f"--resume: {ckpt_path} was saved with other settings (pass --allow-config-change to "
                             f"continue with the new ones):\n  " + "\n  ".join(changes))
        for r, b in zip(model.routers(), state["bias_optim"]):
            r.bias_optim_state = b
        _set_rng_state(state["rng"])
        start = state["step"]
        print0(f"resumed from {dcp.find(ckpt_path)} at step {start}" + "".join(f"; {c}" for c in changes))
    elif cfg.resume:
        print0(f"--resume: no checkpoint at {ckpt_path}, starting fresh")
    else:
        torch.manual_seed(cfg.seed)
    if rank == 0:
        old = metrics_path.read_text().splitlines() if (start and metrics_path.exists()) else []
        metrics_path.write_text("".join(line + "\n" for line in old if json.loads(line)["step"] <= start))
    return start


def save_final_model(model, model_dir: Path, tokenizer_dir: str):
    """The trained model in the HF layout (gathered from the shards on every rank, written by rank 0) with the run's
    tokenizer files, swapped in as one directory."""
    from .dcp import export_hf
    tok_files = {n: (Path(tokenizer_dir) / n).read_text() for n in ("tokenizer.json", "tokenizer_config.json")
                 if (Path(tokenizer_dir) / n).exists()}
    export_hf(model, model_dir, extra_files=tok_files)


def parallel_config(cfg: TrainConfig, device: torch.device) -> ParallelConfig:
    return ParallelConfig(dp_replicate=cfg.dp_replicate, dp_shard=cfg.dp_shard, ep=cfg.ep,
                          activation_checkpointing=cfg.activation_checkpointing,
                          offload_optimizer=cfg.offload_optimizer,
                          mixed_precision=resolve_precision(cfg.mixed_precision, device))


def resolve_device(name: str) -> str:
    """'auto' -> this process's GPU when torch sees one (cuda:LOCAL_RANK under torchrun, else cuda:0), else 'cpu';
    anything else as given."""
    if name == "auto":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    return name


def run(cfg: TrainConfig) -> dict:
    """Train; returns {"final_loss", "steps", "out", "model_dir", "params"}."""
    from . import dcp, parallel
    from .optim import build_optimizer
    from .tokenizer import Tokenizer

    # ---- init: distributed, device, layout, threads
    world, rank, device, pcfg, layout = init_process(cfg)
    if cfg.stage not in ("pretrain", "sft"):
        raise ValueError(f"stage must be pretrain or sft, got {cfg.stage!r}")
    seqs, accum = batch_plan(cfg, world)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    # ---- tokenizer, model (checked before the data work)
    if not cfg.tokenizer or not Path(cfg.tokenizer).exists():
        raise FileNotFoundError(f"tokenizer directory {cfg.tokenizer!r} not found")
    tokenizer = Tokenizer.load(cfg.tokenizer)
    mc = model_config(cfg, tokenizer)
    check_memory(cfg, mc, device, layout.dp_shard)
    # FSDP2 moves each rank's shards to the device itself: the whole model stays on the CPU until then
    model = build_model(cfg, mc, torch.device("cpu") if layout.fsdp else device).train()
    model.balance_lr = cfg.balance_lr
    par = parallel.setup(model, pcfg, device, lambda m: build_optimizer(m, cfg.lr, weight_decay=cfg.weight_decay))
    model, opt = par.model, par.optimizer

    # ---- data
    ids_W, seg_W, labels_W, actions = prepare_windows(cfg, tokenizer)
    n_windows = ids_W.shape[0]
    used_W = (seg_W >= 0).sum(1)
    print0(f"{cfg.stage}: {n_windows} windows of {cfg.seq_len} tokens ({actions}), {seqs} sequences/step = "
           f"{world} ranks x {cfg.device_batch_size} x {accum} micro-batches, model "
           f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {layout}, {pcfg.mixed_precision} compute")

    # ---- resume
    ckpt_path = out / CHECKPOINT
    metrics_path = out / "metrics.jsonl"
    start = restore(cfg, ckpt_path, metrics_path, model, opt, rank)

    log_scalars = external_logger(cfg.log_to, out, cfg.stage, asdict(cfg)) if rank == 0 else (lambda rec: None)
    params = [p for p in model.parameters() if p.requires_grad]
    logprobs_fn = step_logprobs(model, cfg.compile)
    loss_val = float("nan")
    t_start = time.time()
    # ---- loop: one dense line per step
    for step in range(start, cfg.steps):
        t0 = time.time()
        idx = step_indices(step, n_windows, seqs, cfg.seed, used_W, cfg.length_group_batches)
        n_targets = int((labels_W[idx] != -100).sum())
        batches = rank_micro_batches(idx[rank * seqs // world:(rank + 1) * seqs // world], accum, cfg,
                                     (ids_W, seg_W, labels_W))
        loss_sum = forward_backward(logprobs_fn, batches, n_targets, device, pcfg.mixed_precision == "bf16")
        parallel.reduce_gradients(params, layout)
        if world > 1:
            dist.all_reduce(loss_sum)
        gnorm, mult = optimizer_step(opt, params, step, cfg)
        stats = model.expert_load_stats()
        model.update_balancing_biases()
        loss_val = float(loss_sum)
        dt = time.time() - t0
        load = max(s["max_mean"] for s in stats)
        skip = sum(s["skip"] for s in stats) / len(stats)
        rec = {"step": step + 1, "loss": loss_val, "lr": cfg.lr * mult, "grad_norm": float(gnorm),
               "tok_s": seqs * cfg.seq_len / dt, "load_max_mean": load, "skip": skip, "target_tokens": n_targets,
               "time_s": time.time() - t_start}
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            log_scalars(rec)
        print0(f"step {step + 1:05d}/{cfg.steps:05d} | loss {loss_val:.4f} | lr {rec['lr']:.2e} | gnorm "
               f"{rec['grad_norm']:.3f} | tok/s {rec['tok_s']:.0f} | load max/mean {load:.2f} | skip {skip:.2f} | "
               f"eta {fmt_eta(rec['time_s'], step + 1 - start, cfg.steps - step - 1)}")
        if (cfg.save_every > 0 and (step + 1) % cfg.save_every == 0) or step + 1 == cfg.steps:
            dcp.save(ckpt_path, model, opt, trainer_state(model, step + 1, cfg))

    # ---- final model in the HF layout (gathered from the shards), with its tokenizer
    model_dir = out / "model"
    save_final_model(model, model_dir, cfg.tokenizer)
    return {"final_loss": loss_val, "steps": cfg.steps, "out": str(out), "model_dir": str(model_dir),
            "params": sum(p.numel() for p in model.parameters()), "precision": pcfg.mixed_precision}


# -----------------------------------------------------------------------------
# CLI glue (the flags are declared in cli.py's add_pretrain/add_sft; this maps them onto the dataclass)


def config_from_args(a, stage: str) -> TrainConfig:
    base = PRESETS[a.preset]() if a.preset else TrainConfig(stage=stage)
    over = {f.name: getattr(a, f.name) for f in fields(TrainConfig)
            if getattr(a, f.name, None) is not None and not (f.name == "resume" and not a.resume)}
    return TrainConfig(**{**asdict(base), **over, "stage": stage})


def main(a, stage: str):
    result = run(config_from_args(a, stage))
    print0(f"done: final loss {result['final_loss']:.4f}, model at {result['model_dir']}")
    if not dist.is_initialized() or dist.get_rank() == 0:   # a standalone run's loss curve, as the speedrun's
        plot_losses({stage: Path(result["out"]) / "metrics.jsonl"}, Path(result["out"]) / "loss.png")
    if dist.is_initialized():
        dist.destroy_process_group()
