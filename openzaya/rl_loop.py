"""`openzaya rl`: the ZAYA1 four-stage RL cascade with PipelineRL-style asynchronous rollouts (TR §IV, Fig. 5), on one
process or a torchrun job, with rollouts from the trainer's own engine, worker processes or a pool of inference
servers.

`run()` is the algorithm; the pieces live elsewhere: rl.py (pure functions: advantages, trust regions, aggregation,
dynamic sampling, length reward, canary, router-replay plumbing), rl_trainer.py (the policy on its device and ranks,
checkpoints, one optimizer step), rollout.py (the pools), weight_sync.py / transfer.py (pushing weights to servers).
- Rank 0 owns the problem source (`envs/curriculum.ProblemSource`: environments, curriculum, sampler position), the
  rollout pool and the scoring. It keeps up to `max_inflight_groups` jobs (one prompt, G samples) in flight; each
  result carries the policy version that generated it, the sampler's logprobs and, where the sampler returns them,
  the expert chosen per token and layer (router replay, R3; vLLM's skip-as-expert-0 is normalised, rl.py). A
  `Scorer` rewards each group (env scorer, reward kind, canary), with `reward_workers` threads as soon as it arrives.
- A batch: groups are scored, the curriculum updated, dynamic sampling applied (all-equal groups dropped, and in
  warmup groups solved > 75%), and groups more than `max_staleness` versions old dropped, refilling from new jobs.
- With `prompts_per_step` groups, one optimizer step on every rank (`rl_trainer.train_step`): advantages (MaxRL /
  GRPO / Dr-GRPO) plus the length bonus, a replayed forward, the policy loss (`policy_loss`: DPPO TV mask / PPO clip /
  none, optionally decoupled with TIS), aggregation (sum within rollout, mean over rollouts / token mean). No KL.
  The step logs the trainer-vs-sampler logprob mismatch (mean |difference| and max), as prime-rl and verl do.
- Every `sync_every` steps the new weights are published to the pool: inline = the engine runs the trainer's model
  itself; workers = a state_dict on each worker's queue; servers = pushed to every admitted server (`weight_sync`
  disk or broadcast) and verified (the server reports the version, and a probe's logprobs match the trainer's), a
  server down since the last publish re-admitted if it answers again.

Servers (`server_url`, repeatable, or `server_file`): `openzaya serve --enable-weight-updates` or vLLM (0.34), on
loopback or elsewhere; rollouts are /v1/completions requests with the prompt's token ids (the trainer's own chat
formatting), `n = G`, logprobs and token ids. Several trainer ranks need servers (the inline engine and the workers
run one process's model). Orchestration is torchrun for the trainer and servers the user starts (README: RL at
scale); no cluster manager of our own.

Checkpoints (`<out>/ckpt/`, every `save_every` steps and at the end; rl_trainer.py): the policy (HF layout + tokenizer)
and the trainer state (step, policy version, curriculum + least-sampled sampler + seed counter, config, optimizer or
DCP shards). `--resume` continues from it (refused when the settings changed, unless allow_config_change); jobs in
flight at the kill are skipped (the seed counter moved on), and metrics.jsonl keeps the rows up to the checkpoint.

The four stages (`warmup`, `rlve`, `math_code_ttc`, `behavioral`) are preset functions returning `RLConfig`; the
cascade runs them in order, each starting from the previous stage's final checkpoint. Nano-scale simplifications
are listed in each preset's docstring.
"""

from __future__ import annotations

import json
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import torch

from openzaya import rl
from openzaya.envs.curriculum import ProblemSource
from openzaya.rl_trainer import AGGREGATIONS, init_policy, save_checkpoint, share, train_step
from openzaya.runlog import external_logger, fmt_eta, plot_rl_rewards, read_metrics
from openzaya.tokenizer import eos_union
from openzaya.ttc import TTCConfig

# -----------------------------------------------------------------------------
# Config and stage presets


@dataclass
class RLConfig:
    stage: str = "warmup"
    envs: list[str] = field(default_factory=list)   # environment names (registry), or keys of an `envs` override
    # Optimization
    steps: int = 20
    lr: float = 1e-5
    optimizer: str = "muon"           # muon (openzaya.optim: Muon momentum 0 on matrices + AdamW, as ZAYA1) | adamw
    grad_clip: float = 1.0
    prompts_per_step: int = 8         # groups per optimizer step (after filtering)
    samples_per_prompt: int = 16      # G
    micro_batch_rollouts: int = 32    # rollouts per forward/backward
    advantage: str = "maxrl"          # maxrl | grpo | drgrpo
    trust_region: str = "dppo"        # dppo | ppo | none
    tv_delta: float = 0.1             # DPPO binary-TV threshold
    clip_low: float = 0.2             # PPO
    clip_high: float = 0.28           # PPO clip-higher (0.2 = symmetric)
    tis_cap: float = -1.0             # > 0: truncated importance weights min(pi_train / pi_sampler, cap)
    aggregation: str = "rollout_sum"  # rollout_sum (TR) | token_mean
    router_replay: bool = True
    # Rewards
    reward: str = "accuracy"          # accuracy (binary, reasoning stages) | reward (env's graded) | gated_quality
    length_reward_c: float = 0.0      # c of eqs. 8-10; 0 = off
    canary: bool = True               # LZ77 repetition canary
    max_solve_rate: float = 1.0       # warmup: 0.75
    reward_workers: int = 0           # threads scoring each group as it arrives; 0 = on the trainer's thread
    # Curriculum
    curriculum: str = "fixed"         # fixed | zaya
    difficulty: int = 0               # starting (zaya) or lowest (fixed) difficulty
    max_difficulty: int | None = None  # zaya: the curriculum's ceiling (None = its default); fixed: None = only
                                       # `difficulty`, else each problem's difficulty is uniform in difficulty..this
    env_sampling: str = "uniform"     # uniform | least_sampled
    ttc_fraction: float = 0.0         # share of jobs that are self-aggregation prompts (math-code-ttc)
    ttc_candidates: int = TTCConfig.candidates    # C tails per aggregation prompt
    ttc_tail_tokens: int = TTCConfig.tail_tokens  # tau tokens of reasoning per tail
    ttc_template: str | None = None   # aggregation template text (None = ttc.AGGREGATION_TEMPLATE_V1)
    # Rollouts
    max_new_tokens: int = 64
    temperature: float = 1.0
    max_prompt_tokens: int = 512
    rollout_workers: int = 0          # processes; 0 = inline (no servers)
    server_url: str | list[str] | None = None  # OpenAI-compatible servers (openzaya serve, vLLM) instead of the engine
    server_file: str | None = None    # a file listing server URLs, one per line (added to server_url)
    server_model: str | None = None   # the servers' model id (None = the first of each one's /v1/models)
    server_reload: bool = True        # push each version to the servers (False: reload them yourself, unverified)
    weight_sync: str = "disk"         # disk (a checkpoint directory each server reloads) | broadcast (vLLM's protocol)
    sync_dtype: str = "auto"          # broadcast: the dtype weights travel in (auto: bf16 on CUDA, else fp32)
    probe_tolerance: float = 0.05     # a push is verified when the probe's mean |logprob difference| is within this
    engine_slots: int = 64
    max_staleness: int = 2
    sync_every: int = 1               # push weights every k trainer steps
    max_inflight_groups: int = 0      # 0 = 2 * prompts_per_step
    max_groups_per_step: int = 256    # give up (clear error) when this many groups gave no usable batch
    result_timeout_s: float = 600.0   # give up (clear error) when live workers return nothing for this long
    # Trainer
    device: str = "auto"              # auto (CUDA when present) | cpu | cuda
    mixed_precision: str = "auto"     # auto (bf16 where native: parallel.resolve_precision) | bf16 | fp32
    dp_shard: int = -1                # torchrun: FSDP2 shard degree (-1 = all ranks), parallel.py
    ep: int = 1                       # torchrun: expert-parallel degree
    # Run
    seed: int = 0
    out: str = "runs/rl"
    save_every: int = 10
    allow_config_change: bool = False  # resume even when the run was saved with other settings
    chat: bool = True                 # format prompts with the chat template
    log_to: str = ""                  # "" | tensorboard | wandb: per-step metrics there too (runlog.external_logger)


def warmup(**kw) -> RLConfig:
    """Stage 1, reasoning warmup: math and logic-puzzle environments, problems solved at most 75% of the time.
    The TR filters its dataset offline by pass rate; we filter online with the group itself (its G samples are
    the pass-rate estimate), dropping groups with solve rate > 0.75 along with the zero-variance ones."""
    envs = [n for n, e in _registry().items() if e.source == "openzaya"
            and set(e.tags) & {"arithmetic", "algebra", "number_theory", "combinatorics", "probability", "logic"}]
    envs += ["rg/knights_knaves", "rg/zebra_puzzles", "rg/mini_sudoku", "rg/syllogism", "rg/futoshiki"]
    return replace(RLConfig(stage="warmup", envs=envs, lr=1e-5, max_solve_rate=0.75, length_reward_c=0.25), **kw)


def rlve(**kw) -> RLConfig:
    """Stage 2: the adaptive curriculum over all RLVE-Gym and our own environments: ZAYA1's two-sided difficulty
    rule per group (curriculum.ZayaCurriculum) and least-sampled environment sampling. Simplified: no Thompson
    calibration of the starting difficulty (every environment starts at `difficulty`)."""
    envs = [n for n, e in _registry().items() if e.source in ("rlve", "openzaya")]
    return replace(RLConfig(stage="rlve", envs=envs, lr=1e-5, curriculum="zaya", env_sampling="least_sampled",
                            length_reward_c=0.5), **kw)


def math_code_ttc(**kw) -> RLConfig:
    """Stage 3: math environments, the code environments (run in the sandbox by their scorers) and self-aggregation
    prompts built from the policy's own recent rollouts with ttc.build_aggregation_prompt (25% of jobs). The
    length-reward coefficient c reaches 1.0 here. Simplified: one phase instead of the TR's two."""
    reg = _registry()
    envs = [n for n, e in reg.items() if e.source == "openzaya"
            and set(e.tags) & {"arithmetic", "algebra", "number_theory", "combinatorics", "probability"}]
    envs += [n for n, e in reg.items() if e.source == "code" and n.count("/") == 1]
    return replace(RLConfig(stage="math-code-ttc", envs=envs, lr=5e-6, ttc_fraction=0.25, length_reward_c=1.0),
                   **kw)


def behavioral(**kw) -> RLConfig:
    """Stage 4: instruction-following environments (source "ifeval"); reward = quality_score(answer) gated by the
    binary instruction checker (any failed constraint gives 0); GRPO with std normalisation; lower LR; no length
    reward. The TR's scorer is an unpublished reward model; ours is the rule-based `quality_score`."""
    envs = [n for n, e in _registry().items() if e.source == "ifeval"]
    return replace(RLConfig(stage="behavioral", envs=envs, lr=2e-6, advantage="grpo", reward="gated_quality",
                            length_reward_c=0.0), **kw)


STAGES = {"warmup": warmup, "rlve": rlve, "math-code-ttc": math_code_ttc, "behavioral": behavioral}


class NoLearningSignal(RuntimeError):
    """A stage scanned `max_groups_per_step` groups without filling a step (all-equal rewards everywhere)."""


def _registry():
    from openzaya.envs.registry import all_envs
    return all_envs()


def quality_score(text: str) -> float:
    """The nano-scale stand-in for the behavioral reward model, in [0, 1]: the mean of
    (a) lexical diversity = distinct words / words (1 for an empty-free, non-repeating answer), and
    (b) a length term = 1 for 10..200 words, falling linearly to 0 at 0 words and at 400 words."""
    words = text.lower().split()
    if not words:
        return 0.0
    diversity = len(set(words)) / len(words)
    n = len(words)
    length = min(n / 10, 1.0) if n < 10 else 1.0 if n <= 200 else max(0.0, (400 - n) / 200)
    return 0.5 * diversity + 0.5 * length


def stage_reward(kind: str, score, text: str, canary: bool = True) -> float:
    """The scalar reward of one response: "accuracy" (binary; reasoning stages), "reward" (the env's graded
    score) or "gated_quality" (behavioral: quality_score of the extracted answer if every instruction
    constraint passed, else 0). The LZ77 canary zeroes any of them."""
    assert kind in ("accuracy", "reward", "gated_quality"), f"unknown reward kind {kind!r}"
    if kind == "gated_quality":
        from openzaya.envs.base import extract_answer
        r = score.accuracy * quality_score(extract_answer(text) or "")
    else:
        r = score.accuracy if kind == "accuracy" else score.reward
    if canary and rl.repetition_canary(text):
        return 0.0
    return float(r)




class Later:
    """A computation run when its result is asked for (scoring on the trainer's thread, reward_workers = 0)."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def result(self):
        return self.fn(*self.args)


class Scorer:
    """The rewards of each finished job (env scorer, `stage_reward`, canary; reasoning tails for TTC prompts), applied
    by the pool to each result as it arrives. With `reward_workers` threads a group is scored at once, off the
    trainer's path (sandboxed code and math-verify run in processes of their own, so threads overlap them with
    training; pure-Python scorers share the GIL); without, when the loop takes the group."""

    def __init__(self, cfg: RLConfig, envs: dict, tokenizer, eos_ids: list[int]):
        self.cfg, self.envs, self.tokenizer, self.eos_ids = cfg, envs, tokenizer, eos_ids
        self.pending: dict[int, dict] = {}          # job_id -> {kind, env, problem, prompt_ids}
        self.threads = ThreadPoolExecutor(cfg.reward_workers) if cfg.reward_workers > 0 else None

    def __call__(self, res: dict):
        info = self.pending.pop(res["job_id"])
        return self.threads.submit(self.score, res, info) if self.threads else Later(self.score, res, info)

    def score(self, res: dict, info: dict) -> dict:
        from openzaya.tokenizer import split_reasoning, tail_text
        cfg, env, problem = self.cfg, self.envs[info["env"]], info["problem"]
        rewards, accs, texts = [], [], []
        for s in res["samples"]:
            text = self.tokenizer.decode([t for t in s["tokens"] if t not in self.eos_ids])
            sc = env.score(problem, text)
            rewards.append(stage_reward(cfg.reward, sc, text, cfg.canary))
            accs.append(float(sc.accuracy))
            texts.append(text)
        tails = []     # the last tau tokens of each sample's reasoning, as Markovian RSA passes them on
        if cfg.ttc_fraction > 0:
            tails = [tail_text(self.tokenizer, split_reasoning(t)[0], cfg.ttc_tail_tokens) for t in texts]
        return {**info, **res, "rewards": rewards, "accs": accs, "texts": texts, "tails": tails}

    def close(self):
        if self.threads:
            self.threads.shutdown(wait=False, cancel_futures=True)


# -----------------------------------------------------------------------------
# The rollout side (rank 0): jobs, a pool, batches


@dataclass
class Feed:
    """Rank 0's rollout side: the pool, the scorer on its results, the jobs in flight, scored groups not yet used."""
    pool: object
    scorer: Scorer
    source: ProblemSource
    eos_ids: list[int]
    max_inflight: int
    inflight: int = 0
    buffer: deque = field(default_factory=deque)


def server_urls(cfg: RLConfig) -> list[str]:
    urls = [cfg.server_url] if isinstance(cfg.server_url, str) else list(cfg.server_url or [])
    if cfg.server_file:
        urls += [u.strip() for u in Path(cfg.server_file).read_text().splitlines() if u.strip()]
    return urls


def chat_ids(cfg: RLConfig, tokenizer, text: str) -> list[int]:
    msgs = [{"role": "user", "content": text}]
    ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True) if cfg.chat else \
        tokenizer.encode(text)
    return ids[-cfg.max_prompt_tokens:]


def open_feed(cfg: RLConfig, pol, envs: dict, source: ProblemSource) -> Feed:
    """The pool the config names (servers, worker processes, or inline) with the scorer on its results."""
    from openzaya import rollout, weight_sync
    from openzaya.rl_trainer import tokenizer_files
    eos_ids = eos_union(pol.model.config.eos_ids, pol.tokenizer)
    scorer = Scorer(cfg, envs, pol.tokenizer, eos_ids)
    urls, max_len = server_urls(cfg), cfg.max_prompt_tokens + cfg.max_new_tokens + 8
    assert urls or pol.world == 1, "several trainer ranks need inference servers for rollouts (--server-url)"
    if urls:
        assert cfg.weight_sync in ("disk", "broadcast"), f"weight_sync: disk or broadcast, not {cfg.weight_sync!r}"
        sync = None
        if cfg.server_reload and cfg.weight_sync == "disk":
            sync = weight_sync.DiskSync(Path(cfg.out) / "policy_sync", tokenizer_files(pol.tokenizer))
        elif cfg.server_reload:
            auto = torch.bfloat16 if pol.device.type == "cuda" else torch.float32
            dtype = {"auto": auto, "bf16": torch.bfloat16, "fp32": torch.float32}[cfg.sync_dtype]
            sync = weight_sync.BroadcastSync(pol.device, dtype)
        pool = rollout.ServerPool(urls, sync, scorer, chat_ids(cfg, pol.tokenizer, "What is 2 + 3?"),
                                  cfg.probe_tolerance, cfg.result_timeout_s, model_name=cfg.server_model)
    elif cfg.rollout_workers > 0:
        pool = rollout.WorkerPool(cfg.rollout_workers, pol.model, cfg.engine_slots, max_len, cfg.router_replay,
                                  cfg.samples_per_prompt, cfg.result_timeout_s, scorer, version=pol.version)
    else:
        pool = rollout.InlinePool(pol.model, cfg.engine_slots, max_len, cfg.router_replay, scorer,
                                  version=lambda: pol.version)
    return Feed(pool, scorer, source, eos_ids, cfg.max_inflight_groups or 2 * cfg.prompts_per_step)


def submit_jobs(cfg: RLConfig, feed: Feed, tokenizer, needed: int):
    """Keep `max_inflight` jobs in flight (a synchronous pool: just the `needed` ones)."""
    target = needed if getattr(feed.pool, "synchronous", False) else feed.max_inflight
    while feed.inflight < target:
        j = feed.source.drawn              # the job id: checkpointed with the source, so a resume goes on with it
        kind, name, problem, text = feed.source.next_problem()
        ids = chat_ids(cfg, tokenizer, text)
        feed.scorer.pending[j] = {"kind": kind, "env": name, "problem": problem, "prompt_ids": ids}
        feed.pool.submit({"job_id": j, "prompt_ids": ids, "G": cfg.samples_per_prompt,
                          "seed": cfg.seed * 1_000_003 + j, "temperature": cfg.temperature,
                          "max_new_tokens": cfg.max_new_tokens, "eos_ids": feed.eos_ids})
        feed.inflight += 1


def collect_batch(cfg: RLConfig, feed: Feed, tokenizer, version: int) -> tuple[list[dict], dict]:
    """`prompts_per_step` fresh-enough, informative scored groups (the module docstring), and the drop counts."""
    batch, stats, scanned = [], {"drop_stale": 0, "drop_flat": 0, "gen_tokens": 0}, 0
    while len(batch) < cfg.prompts_per_step:
        if scanned > cfg.max_groups_per_step:
            raise NoLearningSignal(
                f"stage {cfg.stage}: {scanned} groups scanned for the next step, {len(batch)} kept "
                f"({stats['drop_flat']} with equal rewards or solve rate > {cfg.max_solve_rate}, {stats['drop_stale']} "
                "stale): the policy gets no learning signal here; lower --difficulty or pick other environments")
        scanned += 1
        if not feed.buffer:
            submit_jobs(cfg, feed, tokenizer, cfg.prompts_per_step - len(batch))
            done = feed.pool.results()
            feed.inflight -= len(done)
            for pending in done:
                g = pending.result()
                stats["gen_tokens"] += sum(len(s["tokens"]) for s in g["samples"])
                feed.buffer.append(g)
        g = feed.buffer.popleft()
        if g["version"] < version - cfg.max_staleness:      # too old: never trained on
            stats["drop_stale"] += 1
            continue
        feed.source.update(g["env"], g["problem"], g["kind"], g["accs"], g["rewards"], g["tails"])
        if not rl.keep_group(g["rewards"], g["accs"], cfg.max_solve_rate):   # dynamic sampling
            stats["drop_flat"] += 1
            continue
        batch.append(g)
    return batch, stats


def to_rollouts(cfg: RLConfig, batch: list[dict], adv_fn, source: ProblemSource, envs: dict) -> list[dict]:
    """Advantages (+ the length bonus in the numerator), one per rollout: {prompt, tokens, logprobs, routes, adv,
    version}; empty completions are left out."""
    out = []
    for g in batch:
        r_G = torch.tensor(g["rewards"])
        bonus = [0.0] * len(r_G)
        if cfg.length_reward_c > 0:
            src = envs[g["env"]].source
            p = rl.solve_rate(g["accs"])
            bonus = rl.length_reward([len(s["tokens"]) for s in g["samples"]], g["accs"],
                                     source.best_solve.get(src, 0.0), cfg.max_new_tokens, c=cfg.length_reward_c)
            source.best_solve[src] = max(source.best_solve.get(src, 0.0), p)
        for s, a in zip(g["samples"], rl.with_length_reward(r_G, bonus, adv_fn).tolist()):
            if s["tokens"]:
                out.append({"prompt": g["prompt_ids"], "tokens": s["tokens"], "logprobs": s["logprobs"],
                            "routes": s["routes"], "adv": a, "version": g["version"]})
    return out


def publish(feed: Feed | None, pol):
    """Every rank: the policy, as version `pol.version`, to rank 0's pool (the whole model gathered to rank 0)."""
    from openzaya import dcp
    needs = pol.world > 1 or getattr(feed.pool, "needs_weights", True)
    plain = dcp.gathered_model(pol.model) if needs else None
    if feed is not None:
        feed.pool.publish(plain, pol.version)


# -----------------------------------------------------------------------------
# The loop


ADVANTAGES = {"maxrl": rl.maxrl_advantages, "grpo": rl.grpo_advantages, "drgrpo": rl.drgrpo_advantages}


def policy_loss(cfg: RLConfig):
    """The per-token loss (logp_BT, behaviour logp_BT, adv_B) -> (loss_BT, keep_BT), chosen once: the trust region,
    and with tis_cap > 0 its decoupled form (anchored at the trainer's own logprobs, times TIS weights)."""
    region = {"dppo": partial(rl.dppo_loss, delta=cfg.tv_delta),
              "ppo": partial(rl.ppo_clip_loss, eps_low=cfg.clip_low, eps_high=cfg.clip_high),
              "none": rl.pg_loss}[cfg.trust_region]
    return partial(rl.decoupled_tis_loss, region=region, cap=cfg.tis_cap) if cfg.tis_cap > 0 else region


def routes_expert_load(routes: list[torch.Tensor], num_experts: int) -> float:
    """Max over layers of max/mean expert load (`model.expert_load`) over the routed experts of a batch's rollouts
    (-1 = skip, which the ratio ignores); at least 1, NaN without routes."""
    from openzaya.model import expert_load
    if not routes or routes[0] is None:
        return float("nan")
    r_LN = torch.cat(routes, dim=1)
    loads = [expert_load(torch.bincount(torch.where(r_N < 0, num_experts, r_N), minlength=num_experts + 1))
             for r_N in r_LN]
    return max([1.0] + [x["max_mean"] for x in loads if x["max_mean"] > 0])


def step_row(cfg: RLConfig, pol, batch, rollouts, out, stats, pushes, t0, t_gen, t_start, step0, source) -> dict:
    """The step's metrics row (metrics.jsonl), printed as one dense line (with an ETA from the steps since step0)."""
    all_r = [r for g in batch for r in g["rewards"]]
    all_a = [a for g in batch for a in g["accs"]]
    stale = [pol.version - 1 - r["version"] for r in rollouts]
    routes = [r["routes"] for r in rollouts if r["routes"] is not None]
    dt = time.perf_counter() - t0
    row = {"step": pol.step, "stage": cfg.stage, "reward": sum(all_r) / len(all_r), "acc": sum(all_a) / len(all_a),
           "solve": sum(max(g["accs"]) for g in batch) / len(batch), "resp_len": out["tokens"] / max(len(rollouts), 1),
           "masked": out["masked"], "mismatch": out["mismatch"], "mismatch_max": out["mismatch_max"],
           "stale_mean": sum(stale) / max(len(stale), 1), "stale_max": max(stale, default=0),
           "versions": sorted({r["version"] for r in rollouts}), "trained_version": pol.version - 1,
           "tok_s": out["tokens"] / max(dt, 1e-9), "gen_tokens": stats["gen_tokens"], "gen_s": t_gen,
           "load": routes_expert_load(routes, pol.model.config.num_experts), "loss": out["loss"],
           "gnorm": out["gnorm"], "kept": len(batch), "drop_flat": stats["drop_flat"],
           "drop_stale": stats["drop_stale"], "pushes": pushes, "step_s": dt,
           "elapsed_s": time.perf_counter() - t_start,
           "difficulty": {n: source.difficulty(n) for n in sorted({g["env"] for g in batch})}}
    print(f"step {pol.step:05d}/{cfg.steps:05d} | reward {row['reward']:.3f} | acc {row['acc']:.3f} | "
          f"solve {row['solve']:.2f} | len {row['resp_len']:.1f} | masked {row['masked']:.3f} | "
          f"mism {row['mismatch']:.1e}/{row['mismatch_max']:.1e} | stale {row['stale_mean']:.2f}/{row['stale_max']} | "
          f"tok/s {row['tok_s']:.0f} | load {row['load']:.2f} | loss {row['loss']:+.4f} | gnorm {row['gnorm']:.2f} | "
          f"drop {stats['drop_flat']}+{stats['drop_stale']} | {dt:.1f}s | "
          f"eta {fmt_eta(row['elapsed_s'], pol.step - step0, cfg.steps - pol.step)}", flush=True)
    return row


def run(cfg: RLConfig, model=None, tokenizer=None, init_dir: str | None = None, envs: dict | None = None,
        resume: bool = False) -> dict:
    """One RL stage. Policy from `model`+`tokenizer` or `init_dir` (HF layout with tokenizer); under torchrun every
    rank calls this. Returns {"steps", "metrics": [per-step dicts, rank 0], "ckpt": dir, "model", "tokenizer"}.
    `envs` overrides the registry (tests)."""
    # ---- init: the policy on its device and ranks (resumed from <out>/ckpt), environments, algorithm pieces
    pol = init_policy(cfg, model, tokenizer, init_dir, resume)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    envs = envs if envs is not None else _registry()
    source = ProblemSource(cfg, envs)
    if pol.resumed is not None:
        source.load_state_dict(pol.resumed["source"])
    adv_fn, loss_fn, agg_fn = ADVANTAGES[cfg.advantage], policy_loss(cfg), AGGREGATIONS[cfg.aggregation]
    pad_id = pol.tokenizer.pad_id if pol.tokenizer.pad_id is not None else \
        eos_union(pol.model.config.eos_ids, pol.tokenizer)[0]
    metrics_path = out / "metrics.jsonl"
    if pol.rank == 0 and pol.resumed and metrics_path.exists():    # rows of steps after the checkpoint go
        kept = [x for x in metrics_path.read_text().splitlines() if json.loads(x)["step"] <= pol.step]
        metrics_path.write_text("".join(x + "\n" for x in kept))
    if pol.rank == 0:
        print(f"rl: stage {cfg.stage} | {len(cfg.envs)} envs | G {cfg.samples_per_prompt} | {cfg.prompts_per_step} "
              f"prompts/step | adv {cfg.advantage} | trust {cfg.trust_region} | agg {cfg.aggregation} | lr {cfg.lr:g} "
              f"| {pol.world} rank(s) on {pol.device} | rollouts {server_urls(cfg) or cfg.rollout_workers or 'inline'} "
              f"| staleness <= {cfg.max_staleness} | sync every {cfg.sync_every}", flush=True)

    # ---- the rollout side (rank 0), starting from exactly the trainer's weights
    feed = open_feed(cfg, pol, envs, source) if pol.rank == 0 else None
    history, n_pushes, t_start, step0 = [], 0, time.perf_counter(), pol.step
    log_scalars = external_logger(cfg.log_to, out, cfg.stage, asdict(cfg)) if pol.rank == 0 else (lambda row: None)
    try:
        publish(feed, pol)
        while pol.step < cfg.steps:
            # -- a batch of fresh-enough, informative groups (rank 0), its rollouts with advantages on every rank
            t0 = time.perf_counter()
            batch, stats = collect_batch(cfg, feed, pol.tokenizer, pol.version) if feed else (None, None)
            t_gen = time.perf_counter() - t0
            rollouts = share(to_rollouts(cfg, batch, adv_fn, source, envs) if feed else None, pol)
            assert all(r["version"] >= pol.version - cfg.max_staleness for r in rollouts), "a stale sample got here"

            # -- one policy-gradient step with router replay and the trust region; publish; checkpoint
            step_out = train_step(pol, rollouts, loss_fn, agg_fn, cfg, pad_id)
            pol.step += 1
            pol.version += 1
            if pol.version % cfg.sync_every == 0:
                publish(feed, pol)
            if pol.step % cfg.save_every == 0 or pol.step == cfg.steps:
                save_checkpoint(pol, cfg, source.state_dict())

            # -- one log line + a metrics row (rank 0)
            if feed is not None:
                log = getattr(feed.pool, "log", [])
                row = step_row(cfg, pol, batch, rollouts, step_out, stats, log[n_pushes:], t0, t_gen, t_start, step0,
                               source)
                n_pushes = len(log)
                history.append(row)
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                log_scalars(row)
    finally:
        if feed is not None:
            feed.pool.close()
            feed.scorer.close()
    if pol.rank == 0:
        plot_rl_rewards({cfg.stage: read_metrics(metrics_path)}, out / "reward.png")
    return {"steps": pol.step, "metrics": history, "ckpt": str(out / "ckpt" / "model"), "model": pol.model,
            "tokenizer": pol.tokenizer}


def run_cascade(init_dir: str, out: str, stages: list[str] | None = None, resume: bool = False,
                env_objects: dict | None = None, **overrides) -> list[dict]:
    """The four stages in order, each starting from the previous stage's final checkpoint (`<out>/<stage>/ckpt`).
    `overrides` go to every stage preset; `env_objects` replaces the registry (tests)."""
    results, cur = [], init_dir
    for name in stages or list(STAGES):
        cfg = STAGES[name](out=str(Path(out) / name), **overrides)
        res = run(cfg, init_dir=cur, resume=resume, envs=env_objects)
        results.append(res)
        cur = res["ckpt"]
    return results


# -----------------------------------------------------------------------------
# CLI


CLI_FIELDS = ("steps", "lr", "prompts_per_step", "samples_per_prompt", "max_new_tokens", "rollout_workers",
              "max_staleness", "sync_every", "server_url", "server_file", "server_model", "weight_sync",
              "probe_tolerance", "reward_workers", "device", "dp_shard", "ep", "seed", "difficulty", "max_difficulty",
              "save_every", "log_to")


def main(args) -> int:
    import torch.distributed as dist
    overrides = {k: getattr(args, k) for k in CLI_FIELDS if getattr(args, k, None) is not None}
    if args.no_server_reload:
        overrides["server_reload"] = False
    if args.allow_config_change:
        overrides["allow_config_change"] = True
    if args.envs:
        overrides["envs"] = args.envs.split(",")
    if args.cascade:
        if not args.init:
            raise ValueError("--cascade needs --init (an SFT checkpoint directory, e.g. runs/nano/sft/model)")
        run_cascade(args.init, args.out, resume=args.resume, **overrides)
    else:
        run(STAGES[args.stage](out=args.out, **overrides), init_dir=args.init, resume=args.resume)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0
