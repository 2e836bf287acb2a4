"""The RL trainer's side of `openzaya rl` (rl_loop.py runs it): the policy on its device, sharded under torchrun, its
checkpoints, and one policy-gradient step.

- Device: `--device` as the other commands (auto = CUDA when torch sees one, cuda:LOCAL_RANK under torchrun); bf16
  autocast of the policy's forward where bf16 is native (`mixed_precision` auto: CUDA, CPUs with AVX512-BF16 or AMX;
  parallel.resolve_precision), fp32 master weights, optimizer state and LM-head log-probs.
- Under torchrun every rank builds the policy and `parallel.setup` shards it (FSDP2 by default, `ep` for expert
  parallelism; gloo on CPU, NCCL on CUDA). Rank 0 owns the rollout side; each step's rollouts are sent to every rank
  (`share`) and each rank trains on its contiguous slice. Every rank runs the same number of micro-batches (a rank
  short of rollouts runs one with weight 0), so the FSDP / EP collectives stay in step. The loss of each micro-batch is
  its share of the global batch (rollouts or tokens over the whole step), and gradients are summed over ranks, so any
  world size gives the one-process gradient.
- Checkpoints (`<out>/ckpt/`): the policy in the HF layout with its tokenizer (`model/`, what the next stage starts
  from), and the trainer state (step, policy version, problem source, config): one process writes the optimizer into
  `trainer_state.pt` as before; several ranks write model + optimizer shards with DCP (`dcp/`, the state inside).
  Resuming with other settings than the run was saved with is refused, the differences listed
  (`checkpoint.config_changes`), unless `allow_config_change`; the settings that do not change what is trained
  (`RESUME_MAY_CHANGE`, e.g. steps, servers, device) may change.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from . import dcp, parallel, rl

RESUME_MAY_CHANGE = ("out", "steps", "save_every", "server_url", "server_file", "server_model", "server_reload",
                     "rollout_workers", "engine_slots", "reward_workers", "result_timeout_s", "device", "weight_sync",
                     "sync_dtype", "probe_tolerance", "allow_config_change", "dp_shard", "ep", "max_groups_per_step")


@dataclass
class Policy:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    tokenizer: object
    device: torch.device
    layout: parallel.Layout
    rank: int
    world: int
    bf16: bool
    step: int = 0
    version: int = 0
    resumed: dict | None = None      # the trainer state a resumed run starts from


def make_optimizer(model, cfg):
    if cfg.optimizer == "muon":
        from . import optim
        return optim.build_optimizer(model, lr=cfg.lr, momentum=0.0)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)


def print0(*a):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, flush=True)


def tokenizer_files(tokenizer) -> dict[str, str]:
    """The tokenizer's files (name -> text), to be written inside a checkpoint directory's atomic swap."""
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save(d)
        return {p.name: p.read_text() for p in Path(d).iterdir()}


def _saved_state(ckpt: Path, world: int) -> dict | None:
    if world == 1:
        path = ckpt / "trainer_state.pt"
        return torch.load(path, weights_only=False) if path.exists() else None
    found = dcp.find(ckpt / "dcp")
    return torch.load(found / dcp.TRAINER_STATE, weights_only=False) if found else None


def _check_resume(state: dict, cfg, ckpt: Path):
    from .checkpoint import config_changes
    changes = config_changes(state.get("config", {}), asdict(cfg), ignore=RESUME_MAY_CHANGE)
    if changes and not cfg.allow_config_change:
        raise ValueError(f"--resume: {ckpt} was saved with other settings (pass --allow-config-change to continue "
                         f"with the new ones):\n  " + "\n  ".join(changes))


def init_policy(cfg, model=None, tokenizer=None, init_dir: str | None = None, resume: bool = False) -> Policy:
    """The policy of a stage on its device and ranks, with its optimizer; a resumed run's weights, optimizer state,
    step and version. From `model` + `tokenizer`, or `init_dir` (HF layout with tokenizer, or a Hub id)."""
    from .checkpoint import from_pretrained, resolve_model_dir
    from .tokenizer import Tokenizer
    from .train import resolve_device
    device = torch.device(resolve_device(cfg.device))
    rank, world = parallel.init_distributed(device)
    ckpt = Path(cfg.out) / "ckpt"
    torch.manual_seed(cfg.seed)
    state = _saved_state(ckpt, world) if resume else None
    if state is not None:
        _check_resume(state, cfg, ckpt)
        init_dir, model = str(ckpt / "model"), None
        print0(f"rl: resuming {cfg.stage} from {ckpt} at step {state['step']}")
    if model is None:
        if not init_dir:
            raise ValueError("rl needs a policy: --init (a checkpoint dir with its tokenizer, e.g. runs/nano/sft/model)")
        init_dir = str(resolve_model_dir(init_dir))     # a directory, or a Hub repo id fetched into the HF cache
        model = from_pretrained(init_dir, dtype=torch.float32)
        tokenizer = tokenizer or Tokenizer.load(init_dir)
    assert tokenizer is not None, "rl: a model without a tokenizer"
    model.eval()                   # no dropout; routers do not accumulate load counts
    bf16 = parallel.resolve_precision(cfg.mixed_precision, device) == "bf16"
    pcfg = parallel.ParallelConfig(dp_shard=cfg.dp_shard, ep=cfg.ep, mixed_precision="bf16" if bf16 else "fp32")
    par = parallel.setup(model, pcfg, device, lambda m: make_optimizer(m, cfg))
    pol = Policy(par.model, par.optimizer, tokenizer, device, par.layout, rank, world, bf16, resumed=state)
    if state is not None:
        if world == 1:
            pol.optimizer.load_state_dict(state["optimizer"])
        else:
            dcp.load(ckpt / "dcp", pol.model, pol.optimizer)
        pol.step, pol.version = state["step"], state["version"]
    return pol


def save_checkpoint(pol: Policy, cfg, source_state: dict):
    """The policy (HF layout + tokenizer) and the trainer state, atomically; every rank calls this."""
    from .checkpoint import atomic_file, save_pretrained
    ckpt = Path(cfg.out) / "ckpt"
    state = {"step": pol.step, "version": pol.version, "source": source_state, "config": asdict(cfg)}
    files = tokenizer_files(pol.tokenizer)
    if pol.world == 1:
        save_pretrained(pol.model, ckpt / "model", extra_files=files)
        state["optimizer"] = pol.optimizer.state_dict()
        atomic_file(ckpt / "trainer_state.pt", lambda f: torch.save(state, f))
        return
    dcp.export_hf(pol.model, ckpt / "model", extra_files=files)
    dcp.save(ckpt / "dcp", pol.model, pol.optimizer, state)


def share(obj, pol: Policy):
    """Rank 0's object on every rank (the step's rollouts)."""
    if pol.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# -----------------------------------------------------------------------------
# One policy-gradient step


def rollout_sum_share(loss_BT, mask_BT, B: int, n_tok: int):
    """ZAYA1's aggregation (sum within a rollout, mean over rollouts), for a micro-batch of B rollouts in all."""
    return rl.rollout_sum_mean(loss_BT, mask_BT) * (mask_BT.shape[0] / B)


def token_mean_share(loss_BT, mask_BT, B: int, n_tok: int):
    """DAPO's token mean, for a micro-batch of a step with n_tok completion tokens in all."""
    return rl.token_mean(loss_BT, mask_BT) * (float(mask_BT.sum()) / max(n_tok, 1))


AGGREGATIONS = {"rollout_sum": rollout_sum_share, "token_mean": token_mean_share}


def micro_step(pol: Policy, part: list[dict], weight: float, loss_fn, agg_fn, B: int, n_tok: int, pad_id: int,
               router_replay: bool) -> tuple[float, float, float, float]:
    """Forward (router replay when every rollout of `part` has routes) + backward of one micro-batch. Returns (loss,
    tokens inside the trust region, sum and max of |trainer - sampler logprob|)."""
    dev = pol.device
    ids_BT, mask_BT = rl.pad_rollouts([r["prompt"] for r in part], [r["tokens"] for r in part], pad_id)
    T = ids_BT.shape[1]
    replay = None
    if router_replay and all(r["routes"] is not None for r in part):
        replay = rl.pad_routes([r["routes"] for r in part], T).to(dev)
    ids_BT, mask_BT = ids_BT.to(dev), mask_BT.to(dev)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=pol.bf16):
        logp_BT = pol.model.token_logprobs(ids_BT, ids_BT[:, 1:], replay_routes=replay)   # chunked LM head
    if any(r["logprobs"] is None for r in part):     # a sampler without logprobs: on-policy assumption
        behav_BT = logp_BT.detach()
    else:
        behav_BT = rl.pad_behaviour_logprobs([len(r["prompt"]) for r in part], [r["logprobs"] for r in part], T)
        behav_BT = behav_BT.to(dev)
    adv_B = torch.tensor([r["adv"] for r in part], device=dev)
    loss_BT, keep_BT = loss_fn(logp_BT, behav_BT, adv_B)
    loss = agg_fn(loss_BT, mask_BT, B, n_tok)
    if weight != 1.0:
        loss = loss * weight
    loss.backward()
    m_sum, m_max = rl.logprob_mismatch(logp_BT, behav_BT, mask_BT)
    return float(loss.detach()), float((keep_BT * mask_BT).sum()) * weight, m_sum * weight, m_max * weight


def train_step(pol: Policy, rollouts: list[dict], loss_fn, agg_fn, cfg, pad_id: int) -> dict:
    """One optimizer step on the step's rollouts ({prompt, tokens, logprobs, routes, adv}), this rank's slice, in
    micro-batches of `micro_batch_rollouts`. Returns the loss, grad norm and trust-region / mismatch statistics of the
    whole step (summed, or max, over ranks)."""
    pol.optimizer.zero_grad(set_to_none=True)
    B, W, mb = len(rollouts), pol.world, cfg.micro_batch_rollouts
    n_tok = sum(len(r["tokens"]) for r in rollouts)
    mine = rollouts[pol.rank * B // W:(pol.rank + 1) * B // W]
    stats = [0.0, 0.0, 0.0, 0.0]                     # loss, kept tokens, mismatch sum, mismatch max
    for m in range(math.ceil(math.ceil(B / W) / mb)):
        part, weight = mine[m * mb:(m + 1) * mb], 1.0
        if not part:                                 # in step with the other ranks' collectives, adds nothing
            part, weight = rollouts[:1], 0.0
        loss, kept, m_sum, m_max = micro_step(pol, part, weight, loss_fn, agg_fn, B, n_tok, pad_id, cfg.router_replay)
        stats = [stats[0] + loss, stats[1] + kept, stats[2] + m_sum, max(stats[3], m_max)]
    params = list(pol.model.parameters())
    if W > 1:
        parallel.reduce_gradients(params, pol.layout)
        summed = torch.tensor(stats[:3], dtype=torch.float64, device=pol.device)
        top = torch.tensor([stats[3]], dtype=torch.float64, device=pol.device)
        dist.all_reduce(summed)
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
        stats = summed.tolist() + top.tolist()
    gnorm = float(parallel.clip_grad_norm_(params, cfg.grad_clip))
    pol.optimizer.step()
    return {"loss": stats[0], "gnorm": gnorm, "masked": 1 - stats[1] / max(n_tok, 1),
            "mismatch": stats[2] / max(n_tok, 1), "mismatch_max": stats[3], "tokens": n_tok}
