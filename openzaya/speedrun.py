"""`openzaya speedrun --preset nano`: corpus -> tokenizer -> pretrain -> SFT -> the four RL stages -> held-out
evaluation of `single` vs Markovian RSA after SFT and after every RL stage -> runs/<name>/report.md.

The whole ZAYA1 pipeline at nano scale on a CPU (issue 26, two runs on this shared 2-core machine: 581 s wall at
load ~2.5, 1036 s at load ~8, 459-468 CPU s; main before it: 1121 s on a quiet box, 1842 s under load; dev/LOG.md). The
environments are the easiest of our own (difficulty 0-1 of a handful of arithmetic and string tasks, NANO_ENVS) so
that a ~1M-parameter model trained for a few hundred steps gets measurably above zero; held-out problems use seeds
>= HELD_OUT_SEED_START.

Nano-scale simplifications, stage by stage:
- SFT mix: the solver-trace chats plus `agg_samples_per_env_level` aggregation chats built with a short nano
  aggregation template (NANO_AGG_TEMPLATE; the default one is ~100 tokens, most of the 128-token window): C tails
  of tau tokens of reasoning, each the problem's own solver reasoning or, half the time, the reasoning of another
  problem of the same env and difficulty; target = the problem's solver trace. These teach the prompt format only.
  Markovian RSA in the evaluation uses the same template file, so the model has seen its aggregation prompts.
- Aggregation SFT (TR §VI-B: C sampled rollouts -> tau-tails -> the teacher's aggregated rollout is the target), a
  second SFT phase of `agg_sft_steps` from the SFT checkpoint: the SFT model samples `agg_sft_rollouts` rollouts of
  fresh training problems at the evaluation's temperature and beta, `agg_sft_chats_per_problem` aggregation prompts
  are built from C of their tails (the cut Markovian RSA uses), and the teacher is the env's reference solver (its
  trace is the target) instead of a stronger model; the phase trains on these chats mixed 1:1 with the SFT mix. The
  held-out row "sft" is the model after both phases. Off in the nano preset (`agg_sft_steps=0`): measured
  (dev/LOG.md, session 4), the nano aggregator still scores about what copying a random shown candidate would, with
  or without this phase, RSA - single moved by +0.038 / -0.011 / +0.012 / -0.030 over four runs, and its extra steps
  raise single-sample accuracy like as many plain SFT steps would; its ~140 s went to RL (session 5).
- RL (rl_loop.run, one stage after the other from the previous stage's checkpoint; one rollout worker process
  generates while the trainer steps, staleness <= 2; 16 prompts x 8 samples per step), every stage restricted to
  environments the SFT model gets signal on (RL_STAGE_ENVS) at difficulties 0-1 (max_difficulty=1), with the
  presets' algorithms and the learning rate the speedrun preset states per stage (`rl_stage_lr`; nano: 2.5e-4,
  2.5e-4, 1.25e-4, 5e-5, the RL presets' 1 : 1 : 0.5 : 0.2 at 25x their values): warmup = arithmetic/logic envs with
  the 75% solve-rate filter; rlve = all signal envs under ZAYA1's two-sided adaptive curriculum (ceiling 1) with
  least-sampled env sampling; math-code-ttc = the arithmetic envs (no code envs: the nano model cannot write code)
  with 25% self-aggregation prompts built from the policy's own reasoning tails with the nano template (C and tau of
  the evaluation); behavioral = GRPO with std normalisation, the lowest LR, no length reward, reward "gated_quality"
  on the string envs: the gate is the env's own answer checker (the nano SFT data has no instruction-following
  samples, so the ifeval checkers would give no signal) times rl_loop.quality_score of the extracted answer (~0.55
  for a one-word answer, so in effect a scaled accuracy reward).
- Evaluation: `single` (one sample per run, `eval_single_samples` runs per problem, avg@k) and `markovian_rsa`
  (N, C, T, tau, beta of the config: ttc.TTCConfig's defaults unless the preset states them, as nano does; one
  run: the majority of its final population, and next to it the TR's number, the mean correctness over the final
  population) through LocalBackend at the same temperature and per-call budget,
  on `eval_problems` held-out problems per env and difficulty over EVAL_ENVS
  (the envs where the SFT model is neither at 0 nor at 100%); accuracy with the standard error over problems, and
  the paired standard error of each difference. The full evaluation (single avg@`eval_single_samples`, RSA on the
  first `eval_rsa_problems` per cell) runs after SFT and after the last RL stage; between RL stages `single` runs
  once on the first `eval_mid_problems` per cell (about 1/8 of the generations).
Presets: `nano` (make run), `mini` (the ~20-minute CPU preset: 2.1x nano's model, same pipeline and report, RSA on
twice the problems), `smoke` (plumbing), `small` (a GPU).
Devices: pretraining, SFT and the evaluations run on `device` (auto = CUDA when torch sees one; the trainer then
uses bf16 autocast, the engine CUDA graphs); the RL stages too (on CUDA with inline rollouts: the GPU engine
generates between two steps, instead of a CPU worker process). The
`small` preset (24x nano's parameters, 7x its tokens) is meant for a GPU.
`run` reads like the pipeline: one function per stage (build_corpus, build_tokenizer_and_sft_mix, pretrain_config
+ train, start/finish_precision_twin, supervised_finetune, aggregation_sft, evaluate_single_vs_rsa, rl_cascade,
trim_ablation, plot_curves, write_report).
The precision twin (issue 26): where the device has native bf16 matmuls, the pretraining run is repeated in the other
precision in a child process on the core the one-thread trainer leaves idle during pretraining, and the report
plots both loss curves and states their difference against speedrun_report.PRECISION_TWIN_TOL;
`--no-precision-twin` skips it. Threads: the stages that share the CPU with another process (pretraining beside its
twin, the RL trainer beside its rollout worker) run on `threads` (1); SFT and the full evaluations, alone on the
machine, on every CPU (`threads_alone`).
`--ablation-trim` adds two extra SFT runs at a tight context budget (answer-preserving trimming vs plain truncation)
and reports both, whatever they show. `--no-rl` stops after SFT (and its evaluation).
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from .evaluate import mean_se, paired_se
from .runlog import StageClock, plot_losses, plot_rl_rewards
from .speedrun_report import write_report
from .train import resolve_device   # the trainer's rule for "auto"; pretraining, SFT and evaluation share it
from .ttc import TTCConfig

NANO_ENVS = ["long_addition", "digit_sum", "reverse_string", "sort_letters", "palindrome_check",
             "boolean_expression", "count_vowels", "integer_power"]
EVAL_ENVS = ["long_addition", "digit_sum", "reverse_string", "sort_letters", "boolean_expression", "count_vowels"]
RL_STAGES = ["warmup", "rlve", "math-code-ttc", "behavioral"]
# stage -> (environments, starting difficulty, extra RLConfig overrides); the learning rates are the preset's
# `rl_stage_lr`
# Every stage stays within difficulties 0-1 (max_difficulty=1), the levels the nano SFT data covers: above them the
# model is at 0 (no signal) or, for boolean_expression, at a coin flip that the ZAYA curriculum keeps climbing on.
RL_STAGE_ENVS = {
    "warmup": (["digit_sum", "long_addition", "boolean_expression"], 0, {"max_difficulty": 1}),
    "rlve": (["reverse_string", "sort_letters", "digit_sum", "boolean_expression", "count_vowels", "long_addition"],
             0, {"max_difficulty": 1}),
    "math-code-ttc": (["digit_sum", "long_addition"], 0, {"max_difficulty": 1, "ttc_fraction": 0.25}),
    "behavioral": (["reverse_string", "sort_letters", "count_vowels"], 0, {"max_difficulty": 1}),
}
NANO_AGG_TEMPLATE = "{question}\n\n{candidates}Check the candidates and solve it."
# engine slots for the evaluation and the aggregation-SFT rollouts: a nano decode step costs about the same for 64 or
# 256 sequences, so 256 slots ran the same 144-problem evaluation in 26-30 s instead of 39-40 s, with identical
# results (every request carries its own seed)
NANO_EVAL_SLOTS = 256


@dataclass
class SpeedrunConfig:
    name: str = "nano"
    envs: list[str] = field(default_factory=lambda: list(NANO_ENVS))
    difficulties: list[int] = field(default_factory=lambda: [0, 1])
    samples_per_env_level: int = 800
    agg_samples_per_env_level: int = 100   # aggregation-format chats in the SFT mix (synthetic tails), 0 = none
    # aggregation SFT on the SFT model's own rollouts (TR §VI-B), 0 steps = skip the phase
    agg_sft_steps: int = 0                 # nano: 0 (no reliable effect, see the docstring; its ~140 s go to RL)
    agg_sft_problems_per_env_level: int = 100
    agg_sft_rollouts: int = 4              # rollouts sampled per problem; C of their tails per aggregation prompt
    agg_sft_chats_per_problem: int = 2
    agg_sft_lr: float = 1e-3
    vocab_size: int = 512
    model_preset: str = "nano"             # model.PRESETS: nano (1.13M parameters), micro (27.0M, the `small` preset)
    device: str = "auto"                   # pretraining, SFT and evaluation: auto (CUDA when there is one) | cpu | cuda
    seq_len: int = 128
    device_batch_size: int = 32
    pretrain_steps: int = 120
    sft_steps: int = 240
    lr: float = 3e-3
    # RL
    rl: bool = True
    rl_stages: list[str] = field(default_factory=lambda: list(RL_STAGES))
    rl_stage_envs: dict = field(default_factory=lambda: dict(RL_STAGE_ENVS))
    rl_steps: int = 30                     # optimizer steps per stage
    rl_prompts_per_step: int = 16          # 16 x 8 instead of 8 x 8: single-env RL gained only with the larger step
    rl_samples_per_prompt: int = 8
    rl_rollout_workers: int = 1            # one worker process generates while the trainer steps (2 cores)
    rl_max_new_tokens: int = 48
    rl_stage_lr: dict = field(default_factory=dict)   # stage -> learning rate; a stage not listed keeps its preset's
    rl_max_groups_per_step: int = 256      # a stage with no signal in this many groups stops (reported)
    # evaluation: single vs Markovian RSA (N, C, T, tau, beta) at the same temperature and per-call budget
    eval_envs: list[str] = field(default_factory=lambda: list(EVAL_ENVS))
    # After SFT and after the last RL stage: `single` on eval_problems held-out problems per env and difficulty,
    # eval_single_samples runs each (avg@k), Markovian RSA (one run) on the first eval_rsa_problems of them; after
    # the other RL stages, `single` once on the first eval_mid_problems (0 = no evaluation there). The paired SE
    # of a difference between two stages is mostly the per-problem change, not the sampling noise of avg@k
    # (dev/LOG.md, session 11 and issue 26: variance split of the avg@8 runs), so more problems with fewer runs
    # each buy more power for the same number of generations: 96 x 2 instead of 24 x 8.
    eval_problems: int = 96
    eval_single_samples: int = 2
    eval_rsa_problems: int = 24
    eval_mid_problems: int = 48
    eval_max_tokens: int = TTCConfig.budget_tokens     # beta (also single's budget)
    eval_temperature: float = 0.7
    ttc_population: int = TTCConfig.population         # N
    ttc_candidates: int = TTCConfig.candidates         # C
    ttc_rounds: int = TTCConfig.rounds                 # T
    ttc_tail_tokens: int = TTCConfig.tail_tokens       # tau
    ablation_trim: bool = False
    ablation_seq_len: int = 64         # tight budget: most samples (77-101 tokens) must be trimmed
    ablation_steps: int = 120
    # torch threads of a stage that shares the CPU with another process: pretraining (its precision twin beside it)
    # and the RL trainer (its rollout worker beside it); the stages alone on the machine (SFT, the full evaluations)
    # take `threads_alone` (0 = every CPU: nano's train step 1.5x, its evaluation 1.44x faster on 2 cores than 1)
    threads: int = 1
    threads_alone: int = 0
    mixed_precision: str = "auto"      # pretrain, SFT, RL update: auto (bf16 where native) | bf16 | fp32
    precision_twin: bool = True        # pretraining again in the other precision, beside it (start_precision_twin)
    seed: int = 0
    log_to: str = ""                   # "" | tensorboard | wandb: every training and RL stage logs there too


def nano(**kw) -> SpeedrunConfig:
    """The CPU speedrun. Markovian RSA at nano scale: N=4, C=2, T=1, tau=12, beta=64 (rollouts of at most 64 tokens).
    RL learning rates per stage: the RL presets' 1e-5 / 1e-5 / 5e-6 / 2e-6 are far too low for a 1M-parameter
    model; 25x them was measured at 8 x 8 rollouts per step (dev/LOG.md, session 4), whole cascade, held-out
    single / RSA vs SFT: 2.5e-4 +0.006 / +0.028, 1e-4 -0.005 / -0.014; one rlve stage alone: 2.5e-4 -0.023,
    1e-4 +0.007, 1e-3 -0.116. At 16 x 8 (session 5) only 2.5e-4 was run. 16 RL steps per stage, not 30 (issue 26:
    the main job in half the time; with 360 SFT steps the RL stages take ~65 s each at 20 steps, and make run came
    to 607 s). fp32, not bf16 autocast: at hidden size 128 bf16 measured no faster (training
    step 0.95-1.08x, RL update 0.82x, issue 26 in dev/LOG.md); the larger preset uses it. 360 SFT steps, not 240
    (issue 26, --no-rl runs, held-out single after SFT: 0.394 -> 0.471 for ~60 s; 200 pretraining steps instead of
    120 gave 0.434 for ~45 s)."""
    return SpeedrunConfig(**{**dict(eval_max_tokens=64, ttc_population=4, ttc_candidates=2, ttc_rounds=1,
                                    ttc_tail_tokens=12, rl_steps=16, sft_steps=360, mixed_precision="fp32",
                                    rl_stage_lr={"warmup": 2.5e-4, "rlve": 2.5e-4, "math-code-ttc": 1.25e-4,
                                                 "behavioral": 5e-5}),
                             **kw})


def smoke(**kw) -> SpeedrunConfig:
    """nano's settings, scaled down to check the plumbing in about two minutes (tests): tiny corpus and step
    counts, every RL stage on reverse_string and long_addition. The 3-step smoke model gets no RL signal, so each
    stage stops after rl_max_groups_per_step=8 scanned groups and the report says so (the stop-and-report path)."""
    envs = ["long_addition", "reverse_string"]
    return nano(**{**dict(name="smoke", envs=envs, difficulties=[0], samples_per_env_level=60,
                          agg_samples_per_env_level=10, vocab_size=300, pretrain_steps=3, sft_steps=3,
                          agg_sft_steps=2, agg_sft_problems_per_env_level=4, device_batch_size=8, eval_envs=envs,
                          eval_problems=2, eval_rsa_problems=2, eval_mid_problems=2, eval_max_tokens=16, ablation_steps=2, rl_steps=1, rl_prompts_per_step=2,
                          rl_samples_per_prompt=4, rl_max_new_tokens=16, ttc_tail_tokens=4, rl_max_groups_per_step=8,
                          rl_rollout_workers=0,
                          rl_stage_envs={s: (envs, 0, o) for s, (_, _, o) in RL_STAGE_ENVS.items()}),
                   **kw})


def small(**kw) -> SpeedrunConfig:
    """nano's settings scaled up for a GPU: the `micro` model (27.0M parameters at this vocabulary: 8 layers, 16
    experts; nano's is 1.13M), 5.4x nano's pretraining + SFT tokens (10.6M vs 2.0M; 7x when nano had 240 SFT
    steps) from a corpus 5x as large; RL off
    (measured before the RL stages could run on a GPU). Measured on an H200 (`bench/device_speedrun.sh`): 323 s (pretrain 121, SFT 183,
    evaluation 14). For the question whether Markovian RSA pays off once the model is larger (dev/LOG.md, session
    10)."""
    return nano(**{**dict(name="small", model_preset="micro", samples_per_env_level=4000,
                          agg_samples_per_env_level=500, device_batch_size=64, pretrain_steps=500, sft_steps=800,
                          rl=False), **kw})


def mini(**kw) -> SpeedrunConfig:
    """The ~20-minute CPU preset (issue 26: the old `make run` budget spent on the largest model that fits): nano's
    pipeline, steps (but 240 SFT and 20 RL steps per stage, as measured below; nano has 360 and 16 since) and
    report on the `mini` model (2.37M parameters at this vocabulary, 2.1x nano's; 1.9x its FLOPs per token),
    Markovian RSA on 48 problems per cell (576, twice nano's) so that RSA - single and the aggregator against
    copying a random shown candidate are measured with more power. Question it answers: does aggregation (beating
    the random copy) appear at this size? Measured (issue 26, one run on the shared box at load ~8, when SFT and the
    evaluations still ran on one thread: 1792 s wall, 764 CPU s): single 0.456 -> 0.498 over the cascade, but the
    aggregator stays below the random copy (-0.045 ± 0.013 per problem): no aggregation at 2.37M parameters
    either."""
    return nano(**{**dict(name="mini", model_preset="mini", eval_rsa_problems=48, sft_steps=240,
                          rl_steps=20), **kw})


PRESETS = {"nano": nano, "mini": mini, "smoke": smoke, "small": small}


def self_aggregation_samples(model_dir: str | Path, problems, cfg: SpeedrunConfig, seed: int = 0) -> tuple[list[dict], dict]:
    """Aggregation chats on a model's own rollouts (TR §VI-B, nano teacher = the env's reference solver): for each
    problem, `cfg.agg_sft_rollouts` samples through LocalBackend at the evaluation's temperature and beta, then
    `cfg.agg_sft_chats_per_problem` prompts of C tails (tau tokens of reasoning, backend.tail_tokens like Markovian
    RSA) drawn without replacement; target = the problem's solver trace. Returns the chats and the rollouts' stats."""
    from tqdm import tqdm

    from .backends import LocalBackend, Request, SamplingParams
    from .data import aggregation_chat
    from .envs.registry import get_env
    if cfg.ttc_candidates > cfg.agg_sft_rollouts:
        raise ValueError(f"agg_sft_rollouts={cfg.agg_sft_rollouts} < C={cfg.ttc_candidates}: too few tails per prompt")
    backend = LocalBackend(model_dir, max_slots=NANO_EVAL_SLOTS, max_len=512, device=resolve_device(cfg.device))
    reqs = [Request(messages=[{"role": "user", "content": p.prompt}],
                    params=SamplingParams(temperature=cfg.eval_temperature, max_tokens=cfg.eval_max_tokens,
                                          n=cfg.agg_sft_rollouts, seed=seed * 1_000_003 + i))
            for i, p in enumerate(problems)]
    outs = []
    for i in tqdm(range(0, len(reqs), 64), desc="aggregation SFT rollouts", file=sys.stderr):
        outs += backend.generate(reqs[i:i + 64])
    rng = random.Random(seed)
    chats, correct, agreeing = [], [], 0
    for p, rollouts in zip(problems, outs):
        env = get_env(p.env)
        correct += [env.score(p, c.text).accuracy for c in rollouts]
        tails = [backend.tail_tokens(c.reasoning, cfg.ttc_tail_tokens) for c in rollouts]
        for _ in range(cfg.agg_sft_chats_per_problem):
            shown = [tails[j] for j in rng.sample(range(len(rollouts)), cfg.ttc_candidates)]
            agreeing += len(set(shown)) == 1
            chats.append(aggregation_chat(p, shown, NANO_AGG_TEMPLATE, "self_aggregation"))
    stats = {"problems": len(problems), "rollouts": len(correct), "rollout_accuracy": sum(correct) / len(correct),
             "chats": len(chats), "identical_tails_shown": agreeing / max(len(chats), 1)}
    return chats, stats


def held_out_items(envs: list[str], difficulties: list[int], n: int):
    """Evaluation items (evaluate.Item) on held-out seeds, scored by each env's own checker."""
    from .data import HELD_OUT_SEED_START
    from .envs.registry import get_env
    from .evaluate import Item
    items = []
    for e in envs:
        env = get_env(e)
        for d in difficulties:
            for i in range(n):
                p = env.generate(d, HELD_OUT_SEED_START + i)
                items.append(Item(id=f"{e}-d{d}-{i}", question=p.prompt, answer=p.answer,
                                  score=lambda text, env=env, p=p: env.score(p, text).accuracy))
    return items


def first_per_cell(items, n: int) -> list:
    """The first n items of every env/difficulty cell (item ids are `<env>-d<difficulty>-<index>`)."""
    return [it for it in items if int(it.id.rsplit("-", 1)[1]) < n]


def evaluate_single_vs_rsa(model_dir: str | Path, items, cfg: SpeedrunConfig, template_file: str, out_dir: Path,
                           single_samples: int, rsa_items=None) -> dict:
    """`single` (`single_samples` runs per item, avg@k) on `items` and, given `rsa_items`, `markovian_rsa` (one run)
    on those, through LocalBackend (our engine), same temperature and beta. Returns per method: accuracy, its
    standard error, per-cell accuracy, per-problem correctness by item id (differences are paired on the ids both
    rows share)."""
    from .backends import LocalBackend
    from .evaluate import evaluate
    from .ttc import TTCConfig
    backend = LocalBackend(model_dir, max_slots=NANO_EVAL_SLOTS, max_len=512, device=resolve_device(cfg.device))
    base = TTCConfig(population=cfg.ttc_population, candidates=cfg.ttc_candidates, rounds=cfg.ttc_rounds,
                     tail_tokens=cfg.ttc_tail_tokens, budget_tokens=cfg.eval_max_tokens,
                     temperature=cfg.eval_temperature, seed=cfg.seed, max_concurrency=256, template_file=template_file)
    out = {"wall_s": 0.0}
    runs = [("single", items, single_samples)] + ([("markovian_rsa", rsa_items, 1)] if rsa_items else [])
    for m, its, k in runs:
        res = evaluate(its, backend, base, [m], samples=k, out_dir=out_dir / m)
        correct = {row["id"]: row["methods"][m]["avg@k"] for row in res["problems"]}
        pop = {row["id"]: row["methods"][m]["pop_mean"] for row in res["problems"]}   # = correct for `single`
        cells: dict[str, list[float]] = {}
        for i, c in correct.items():
            cells.setdefault(i.rsplit("-", 1)[0], []).append(c)
        vals = list(correct.values())
        out[m] = {"accuracy": sum(vals) / len(vals), "se": mean_se(vals), "n": len(vals), "runs": k,
                  "correct": correct, "cells": {c: sum(v) / len(v) for c, v in cells.items()},
                  "completion_tokens_per_problem": res["methods"][m]["completion_tokens_per_problem"],
                  "aggregation": res["methods"][m].get("aggregation"),
                  "pop_mean": sum(pop.values()) / len(pop), "pop_correct": pop}
        out["wall_s"] += res["wall_s"]
    return out


def evaluate_held_out(model_dir: str | Path, envs: list[str], difficulties: list[int], n: int, max_tokens: int,
                      device: str = "cpu") -> dict:
    """Greedy single-sample accuracy per env/difficulty on held-out seeds, through LocalBackend (our engine)."""
    from tqdm import tqdm

    from .backends import LocalBackend, Request, SamplingParams
    from .data import HELD_OUT_SEED_START
    from .envs.registry import get_env
    backend = LocalBackend(model_dir, max_slots=32, max_len=512, device=device)
    problems = [get_env(e).generate(d, HELD_OUT_SEED_START + i)
                for e in envs for d in difficulties for i in range(n)]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    outs = []
    for i in tqdm(range(0, len(problems), 64), desc="eval", file=sys.stderr):
        chunk = problems[i:i + 64]
        outs += backend.generate([Request(messages=[{"role": "user", "content": p.prompt}], params=params)
                                  for p in chunk])
    acc: dict[str, list[float]] = {}
    examples = {}
    for p, cs in zip(problems, outs):
        s = get_env(p.env).score(p, cs[0].text)
        acc.setdefault(f"{p.env}/d{p.difficulty}", []).append(s.accuracy)
        examples.setdefault(p.env, (p.prompt, cs[0].text, p.answer))
    return {"accuracy": {k: sum(v) / len(v) for k, v in acc.items()}, "n": n, "examples": examples}


# -----------------------------------------------------------------------------
# The pipeline, one function per stage


# expected cost of each stage in seconds of the nano preset on the 2-core CPU (dev/LOG.md: ~0.9 s per pretrain or
# SFT step, ~5.5 s per RL step, ~45 s per evaluation): only their ratios matter, the ETA scales them to this run
SECONDS_PER_TRAIN_STEP, SECONDS_PER_RL_STEP, SECONDS_PER_EVAL = 0.9, 5.5, 45.0
MID_EVAL_SHARE = 0.15          # an evaluation between RL stages: ~1/7 of the generations of a full one


def stage_plan(cfg: SpeedrunConfig) -> dict[str, float]:
    """The stages `run` will go through, in order, with their expected relative cost (for stage k/n and the ETA)."""
    plan = {"corpus": 10.0, "tokenizer": 5.0, "pretrain": SECONDS_PER_TRAIN_STEP * cfg.pretrain_steps}
    if cfg.precision_twin:   # joined after pretraining: its CPU seconds get their own row (skipped without bf16)
        plan["precision twin"] = 1.0
    plan["sft"] = SECONDS_PER_TRAIN_STEP * cfg.sft_steps
    if cfg.agg_sft_steps > 0:
        plan["aggregation sft"] = SECONDS_PER_TRAIN_STEP * cfg.agg_sft_steps + SECONDS_PER_EVAL
    plan["eval sft"] = SECONDS_PER_EVAL
    for stage in (cfg.rl_stages if cfg.rl else []):
        plan[f"rl {stage}"] = SECONDS_PER_RL_STEP * cfg.rl_steps
        if stage == cfg.rl_stages[-1]:
            plan[f"eval {stage}"] = SECONDS_PER_EVAL
        elif cfg.eval_mid_problems > 0:   # single once on fewer problems, no Markovian RSA
            plan[f"eval {stage}"] = SECONDS_PER_EVAL * MID_EVAL_SHARE
    if cfg.ablation_trim:
        plan["ablation"] = 2 * (SECONDS_PER_TRAIN_STEP * cfg.ablation_steps + SECONDS_PER_EVAL)
    return plan


def alone_threads(cfg: SpeedrunConfig) -> int:
    """Torch threads for the stages that have the machine to themselves (SFT, the full evaluations):
    `threads_alone`, or 0 = OMP_NUM_THREADS if set, else the CPUs this process may run on."""
    import os
    if cfg.threads_alone > 0:
        return cfg.threads_alone
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return int(os.environ.get("OMP_NUM_THREADS") or cpus or 1)


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op threads = n inside the block, restored after it."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def start_run(cfg: SpeedrunConfig, root: str | Path) -> tuple[Path, str]:
    """(run directory, device): the device is checked before anything is written; a rerun starts fresh (TTC traces
    would be resumed, RL metrics appended)."""
    import torch
    device = resolve_device(cfg.device)
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {cfg.device!r}: torch sees no CUDA device here (use --device cpu or auto)")
    torch.set_num_threads(cfg.threads)
    out = Path(root) / cfg.name
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("eval", "rl"):
        shutil.rmtree(out / stale, ignore_errors=True)
    return out, device


def training_problems(cfg: SpeedrunConfig, seed: int, n: int) -> list:
    """n problems per env and difficulty of the config, on training seeds drawn with `seed` (never held out)."""
    from .data import HELD_OUT_SEED_START, training_seeds
    from .envs.registry import get_env
    problems = [get_env(e).generate(d, s) for e in cfg.envs for d in cfg.difficulties
                for s in training_seeds(seed, e, d, n)]
    assert all(p.seed < HELD_OUT_SEED_START for p in problems)
    return problems


def build_corpus(cfg: SpeedrunConfig, out: Path) -> tuple[dict, list[dict], list]:
    """1. The solver-trace corpus (held-out seeds excluded), and the problems of the SFT mix's aggregation chats.
    Returns (manifest, samples, aggregation problems); writes the nano aggregation template next to them."""
    from .data import CorpusConfig, generate_corpus, load_corpus
    manifest = generate_corpus(CorpusConfig(envs=cfg.envs, difficulties=cfg.difficulties,
                                            samples_per_env_level=cfg.samples_per_env_level, seed=cfg.seed),
                               out / "corpus")
    samples = load_corpus(out / "corpus")
    agg_problems = training_problems(cfg, cfg.seed + 1, cfg.agg_samples_per_env_level)
    (out / "agg_template.txt").write_text(NANO_AGG_TEMPLATE)
    return manifest, samples, agg_problems


def build_tokenizer_and_sft_mix(cfg: SpeedrunConfig, out: Path, samples: list[dict], agg_problems: list):
    """2. The BPE, trained on the plain chats and rough aggregation chats (tails cut by characters: there is no
    tokenizer yet), then the SFT mix: the chats plus aggregation chats with tails cut by the new tokenizer.
    Returns (tokenizer directory, SFT mix, number of aggregation chats)."""
    from .data import aggregation_sft_samples, chat_segments, write_shards
    from .tokenizer import train_bpe
    C, tau = cfg.ttc_candidates, cfg.ttc_tail_tokens
    rough = aggregation_sft_samples(agg_problems, None, C, tau, NANO_AGG_TEMPLATE, cfg.seed)
    tok = train_bpe(["".join(s.text for s in chat_segments(x["messages"])) for x in samples + rough], cfg.vocab_size)
    tok_dir = tok.save(out / "tokenizer")
    agg = aggregation_sft_samples(agg_problems, tok, C, tau, NANO_AGG_TEMPLATE, cfg.seed)
    sft_mix = samples + agg
    random.Random(cfg.seed).shuffle(sft_mix)
    write_shards(sft_mix, out / "sft_corpus", 5000, extra={"aggregation_samples": len(agg)})
    return tok_dir, sft_mix, len(agg)


def pretrain_config(cfg: SpeedrunConfig, out: Path, tok_dir: Path, device: str):
    """3. Pretraining on the solver traces as plain text (WSD schedule): its TrainConfig."""
    from .train import TrainConfig
    return TrainConfig(stage="pretrain", data=str(out / "corpus"), out=str(out / "pretrain"),
                       steps=cfg.pretrain_steps, warmup_steps=min(20, cfg.pretrain_steps), schedule="wsd",
                       **train_settings(cfg, tok_dir, device))


def start_precision_twin(pre_cfg, out: Path):
    """3b. The same pretraining run (data, seed, steps) in the other precision — bf16 autocast when the run is fp32,
    fp32 when it is bf16 — in a child process on the core the one-thread trainer leaves idle during pretraining
    (joined before SFT), its step lines in pretrain_twin/log.txt; the report plots both loss curves (issue 26: bf16
    must reach fp32's loss). Returns (process, twin config), or None where the device has no native bf16 (a bf16
    run there would only measure torch's emulation)."""
    import multiprocessing

    import torch

    from .parallel import native_bf16, resolve_precision
    if not native_bf16(torch.device(pre_cfg.device)):
        return None
    other = "fp32" if resolve_precision(pre_cfg.mixed_precision, torch.device(pre_cfg.device)) == "bf16" else "bf16"
    twin = replace(pre_cfg, out=str(out / "pretrain_twin"), mixed_precision=other)
    Path(twin.out).mkdir(parents=True, exist_ok=True)
    proc = multiprocessing.get_context("spawn").Process(target=_train_logged, args=(twin, Path(twin.out) / "log.txt"))
    proc.start()
    return proc, twin


def _train_logged(train_cfg, log_path: Path):
    import contextlib

    from .train import run as train
    with open(log_path, "w") as f, contextlib.redirect_stdout(f):
        train(train_cfg)


def finish_precision_twin(started, pre: dict) -> dict | None:
    """Wait for the twin; its final loss and the mean |loss difference| to the main run over the last 10 steps."""
    from .runlog import read_metrics
    if started is None:
        return None
    proc, twin = started
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"the precision twin of pretraining failed (exit {proc.exitcode}): see {twin.out}/log.txt")
    main_rows = read_metrics(Path(pre["out"]) / "metrics.jsonl")
    twin_rows = read_metrics(Path(twin.out) / "metrics.jsonl")
    last = [abs(a["loss"] - b["loss"]) for a, b in zip(main_rows[-10:], twin_rows[-10:])]
    return {"precision": twin.mixed_precision, "main_precision": pre["precision"],
            "final_loss": twin_rows[-1]["loss"], "main_final_loss": main_rows[-1]["loss"],
            "mean_abs_diff_last10": sum(last) / len(last), "metrics": str(Path(twin.out) / "metrics.jsonl")}


def train_settings(cfg: SpeedrunConfig, tok_dir: Path, device: str) -> dict:
    """The TrainConfig fields pretraining and every SFT run share."""
    return dict(tokenizer=str(tok_dir), seq_len=cfg.seq_len, tokens_per_step=cfg.device_batch_size * cfg.seq_len,
                device_batch_size=cfg.device_batch_size, save_every=-1, threads=cfg.threads, seed=cfg.seed,
                lr=cfg.lr, model_preset=cfg.model_preset, device=device, log_to=cfg.log_to,
                mixed_precision=cfg.mixed_precision)


def supervised_finetune(cfg: SpeedrunConfig, out: Path, tok_dir: Path, device: str, pretrained: dict):
    """4. SFT on the chats + aggregation chats (AP trimming, cosine schedule). Returns (result, its TrainConfig)."""
    from .train import TrainConfig
    from .train import run as train
    sft_cfg = TrainConfig(stage="sft", data=str(out / "sft_corpus"), out=str(out / "sft"), steps=cfg.sft_steps,
                          init_from=pretrained["model_dir"], warmup_steps=min(10, cfg.sft_steps), schedule="cosine",
                          trim="ap", **{**train_settings(cfg, tok_dir, device), "threads": alone_threads(cfg)})
    return train(sft_cfg), sft_cfg


def aggregation_sft(cfg: SpeedrunConfig, out: Path, sft_cfg, sft: dict, sft_mix: list[dict]) -> tuple[dict, dict]:
    """4b. Aggregation SFT on the SFT model's own rollouts (TR §VI-B), mixed 1:1 with the SFT mix. Returns the
    trained run and the rollouts' statistics."""
    from .data import write_shards
    from .train import run as train
    problems = training_problems(cfg, cfg.seed + 2, cfg.agg_sft_problems_per_env_level)
    self_agg, stats = self_aggregation_samples(sft["model_dir"], problems, cfg, cfg.seed)
    mix = self_agg + random.Random(cfg.seed).sample(sft_mix, min(len(self_agg), len(sft_mix)))
    random.Random(cfg.seed).shuffle(mix)
    write_shards(mix, out / "agg_sft_corpus", 5000, extra={"self_aggregation_samples": len(self_agg)})
    agg_sft = train(replace(sft_cfg, data=str(out / "agg_sft_corpus"), out=str(out / "agg_sft"),
                            init_from=sft["model_dir"], steps=cfg.agg_sft_steps, lr=cfg.agg_sft_lr,
                            warmup_steps=min(5, cfg.agg_sft_steps)))
    stats["final_loss"] = agg_sft["final_loss"]
    return agg_sft, stats


def rl_stage_config(cfg: SpeedrunConfig, out: Path, stage: str, device: str = "cpu"):
    """The rl_loop preset of `stage` with the speedrun's environments, batch, budget, TTC knobs and learning rate, on
    `device` (on CUDA the rollouts are inline: the engine runs on the GPU)."""
    from . import rl_loop
    envs, difficulty, extra = cfg.rl_stage_envs[stage]
    lr = {"lr": cfg.rl_stage_lr[stage]} if stage in cfg.rl_stage_lr else {}
    return rl_loop.STAGES[stage](out=str(out / "rl" / stage), envs=list(envs), difficulty=difficulty,
                                 steps=cfg.rl_steps, prompts_per_step=cfg.rl_prompts_per_step,
                                 samples_per_prompt=cfg.rl_samples_per_prompt, max_new_tokens=cfg.rl_max_new_tokens,
                                 save_every=cfg.rl_steps, seed=cfg.seed,
                                 engine_slots=cfg.rl_prompts_per_step * cfg.rl_samples_per_prompt * 2,
                                 max_groups_per_step=cfg.rl_max_groups_per_step,
                                 rollout_workers=cfg.rl_rollout_workers if device == "cpu" else 0, device=device,
                                 ttc_candidates=cfg.ttc_candidates, ttc_tail_tokens=cfg.ttc_tail_tokens,
                                 ttc_template=NANO_AGG_TEMPLATE, log_to=cfg.log_to,
                                 mixed_precision=cfg.mixed_precision, **lr, **extra)


def rl_cascade(cfg: SpeedrunConfig, out: Path, init_dir: str, items, laps: StageClock,
               device: str = "cpu") -> tuple[dict, dict, dict]:
    """6. The RL stages, each from the previous one's checkpoint and evaluated after it. A stage without learning
    signal stops (reported) and the next starts from the previous policy. Returns (evals, reward curves, notes)."""
    from . import rl_loop
    evals, curves, notes, cur = {}, {}, {}, init_dir
    for stage in (cfg.rl_stages if cfg.rl else []):
        rc = rl_stage_config(cfg, out, stage, device)
        try:
            res = rl_loop.run(rc, init_dir=cur)
        except rl_loop.NoLearningSignal as e:     # within the scan budget: report it, keep the previous policy
            notes[stage] = f"stopped: {e}"
            print(f"[speedrun] RL {stage} stopped: {e}", flush=True)
            laps.skip(f"eval {stage}")
            laps(f"rl {stage}")
            continue
        del res["model"]
        cur = res["ckpt"]
        curves[stage] = res["metrics"]
        top = "" if rc.max_difficulty is None else f"-{rc.max_difficulty}"
        notes[stage] = (f"{res['steps']} steps, envs {', '.join(rc.envs)}, difficulty {rc.difficulty}{top} "
                        f"({rc.curriculum} curriculum), lr {rc.lr:.1e}, reward {rc.reward}, advantage "
                        f"{rc.advantage}, length c {rc.length_reward_c}, max solve rate {rc.max_solve_rate}, "
                        f"ttc fraction {rc.ttc_fraction}")
        laps(f"rl {stage}")
        if stage == cfg.rl_stages[-1]:
            evals[stage] = full_evaluation(cfg, out, cur, items, stage)
        elif cfg.eval_mid_problems > 0:
            evals[stage] = evaluate_single_vs_rsa(cur, first_per_cell(items, cfg.eval_mid_problems), cfg,
                                                  str(out / "agg_template.txt"), out / "eval" / stage, 1)
        else:
            continue
        laps(f"eval {stage}")
    if evals and cfg.rl_stages[-1] not in evals:   # the last stage stopped: the final policy gets the full evaluation
        stage = list(evals)[-1]
        evals[stage] = full_evaluation(cfg, out, cur, items, stage)
        laps(f"eval {stage} (final, full)")
    return evals, curves, notes


def full_evaluation(cfg: SpeedrunConfig, out: Path, model_dir: str, items, stage: str) -> dict:
    """The evaluation after SFT and after the last RL stage: `single` on every held-out item, Markovian RSA on the
    first eval_rsa_problems of each cell; nothing else runs then, so on every core (`alone_threads`)."""
    with torch_threads(alone_threads(cfg)):
        return evaluate_single_vs_rsa(model_dir, items, cfg, str(out / "agg_template.txt"), out / "eval" / stage,
                                      cfg.eval_single_samples, first_per_cell(items, cfg.eval_rsa_problems))


def trim_ablation(cfg: SpeedrunConfig, out: Path, sft_cfg, device: str) -> dict:
    """Optional: SFT at a tight budget with AP trimming vs plain truncation, greedy held-out accuracy of each."""
    from .train import run as train
    ablation = {}
    for trim in ("ap", "truncate"):
        a = train(replace(sft_cfg, out=str(out / f"ablation_{trim}"), trim=trim, seq_len=cfg.ablation_seq_len,
                          tokens_per_step=cfg.device_batch_size * cfg.ablation_seq_len, steps=cfg.ablation_steps))
        e = evaluate_held_out(a["model_dir"], cfg.envs, cfg.difficulties, cfg.eval_problems, cfg.eval_max_tokens,
                              device=device)
        ablation[trim] = {"final_loss": a["final_loss"], "accuracy": e["accuracy"],
                          "mean_accuracy": sum(e["accuracy"].values()) / len(e["accuracy"])}
    return ablation


def plot_curves(out: Path, agg_sft: bool, ablation: dict, rl_curves: dict, precision_twin: dict | None = None):
    """7a. The loss curves of every training run and the RL reward per stage, from their logged metrics."""
    curves = {"pretrain": out / "pretrain" / "metrics.jsonl", "sft": out / "sft" / "metrics.jsonl"}
    if precision_twin:
        curves = {f"pretrain ({precision_twin['main_precision']})": curves["pretrain"],
                  f"pretrain ({precision_twin['precision']}, twin)": Path(precision_twin["metrics"]),
                  "sft": curves["sft"]}
    if agg_sft:
        curves["aggregation sft"] = out / "agg_sft" / "metrics.jsonl"
    curves.update({f"ablation {k}": out / f"ablation_{k}" / "metrics.jsonl" for k in ablation})
    plot_losses(curves, out / "loss.png")
    if rl_curves:
        plot_rl_rewards(rl_curves, out / "rl_reward.png")


def run(cfg: SpeedrunConfig, root: str | Path = "runs") -> dict:
    """The whole pipeline: corpus -> tokenizer -> pretrain -> SFT (-> aggregation SFT) -> evaluation -> RL stages,
    each evaluated -> (trim ablation) -> report."""
    out, device = start_run(cfg, root)
    laps = StageClock(stage_plan(cfg))
    manifest, samples, agg_problems = build_corpus(cfg, out)
    laps("corpus")
    tok_dir, sft_mix, n_agg = build_tokenizer_and_sft_mix(cfg, out, samples, agg_problems)
    laps("tokenizer")
    from .train import run as train
    pre_cfg = pretrain_config(cfg, out, tok_dir, device)
    twin = start_precision_twin(pre_cfg, out) if cfg.precision_twin else None
    pre = train(pre_cfg)
    laps("pretrain")
    precision_twin = finish_precision_twin(twin, pre)   # joined before SFT, which takes every core
    if twin:
        laps("precision twin")
    elif cfg.precision_twin:                          # this device has no native bf16: not run
        laps.skip("precision twin")
    with torch_threads(alone_threads(cfg)):           # SFT and its evaluation have the machine to themselves
        sft, sft_cfg = supervised_finetune(cfg, out, tok_dir, device, pre)
        sft_final_loss = sft["final_loss"]
        laps("sft")
        agg_sft_stats = None
        if cfg.agg_sft_steps > 0:
            sft, agg_sft_stats = aggregation_sft(cfg, out, sft_cfg, sft, sft_mix)
            laps("aggregation sft")
        items = held_out_items(cfg.eval_envs, cfg.difficulties, cfg.eval_problems)
        evals = {"sft": full_evaluation(cfg, out, sft["model_dir"], items, "sft")}
        laps("eval sft")
    rl_evals, rl_curves, rl_notes = rl_cascade(cfg, out, sft["model_dir"], items, laps, device)
    evals.update(rl_evals)
    ablation = {}
    if cfg.ablation_trim:
        ablation = trim_ablation(cfg, out, sft_cfg, device)
        laps("ablation")
    plot_curves(out, bool(agg_sft_stats), ablation, rl_curves, precision_twin)
    wall = time.time() - laps.t0
    result = {"wall_s": wall, "timings_s": laps.timings, "cpu_s": laps.cpu_s, "load": laps.load, "evals": evals,
              "rl_notes": rl_notes, "device": device, "precision": pre["precision"], "model_params": pre["params"], "pretrain_final_loss": pre["final_loss"],
              "sft_final_loss": sft_final_loss, "agg_sft": agg_sft_stats, "corpus_samples": manifest["samples"],
              "aggregation_samples": n_agg, "ablation": ablation,
              "precision_twin": precision_twin, "config": cfg.__dict__}
    (out / "results.json").write_text(json.dumps(result, indent=1))   # 7b. results and the report
    write_report(out / "report.md", result)
    print(f"[speedrun] done in {wall:.0f}s; held-out accuracy single / markovian_rsa: "
          + "; ".join(f"{k} {v['single']['accuracy']:.3f} / "
                      + (f"{v['markovian_rsa']['accuracy']:.3f}" if "markovian_rsa" in v else "-")
                      for k, v in evals.items()) + f"; report at {out / 'report.md'}", flush=True)
    return result


def main(a):
    cfg = PRESETS[a.preset]()
    over = {k: getattr(a, k) for k in ("name", "pretrain_steps", "sft_steps", "threads", "threads_alone", "seed",
                                       "eval_problems", "rl_steps", "device", "log_to", "mixed_precision")
            if getattr(a, k, None) is not None}
    if a.ablation_trim:
        over["ablation_trim"] = True
    if getattr(a, "no_rl", False):
        over["rl"] = False
    if getattr(a, "no_precision_twin", False):
        over["precision_twin"] = False
    cfg = replace(cfg, **over)
    run(cfg, a.root)
