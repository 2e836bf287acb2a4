"""`openzaya rl`: the ZAYA1 four-stage RL cascade with PipelineRL-style asynchronous rollouts (TR §IV, Fig. 5).

How a run goes (a flat narrative in `run()`; the pure pieces live in `rl.py`):
- The trainer process owns the policy, the optimizer, the problem source (`envs/curriculum.ProblemSource`:
  environments, curriculum, sampler position) and the scoring. It keeps up to `max_inflight_groups` jobs (one
  prompt, G samples) in the job queue.
- Rollout workers (`rollout_workers` processes, torch.multiprocessing "spawn") take several jobs at a time and run
  them through one continuous-batching `Engine.generate` call, recording per token the raw behaviour logprob and
  the expert chosen per layer (router replay, R3). Each result carries the policy version that generated it.
- The trainer scores the group, updates the curriculum, applies dynamic sampling (drops all-equal groups, and in
  warmup groups solved > 75%), and drops groups more than `max_staleness` versions old, refilling from new jobs.
- With `prompts_per_step` groups, one optimizer step: advantages (MaxRL / GRPO / Dr-GRPO) plus the length bonus,
  a replayed forward (`model(ids, replay_routes=...)`), the trust region (DPPO TV mask / PPO clip, optional TIS),
  aggregation (sum within rollout, mean over rollouts / token-mean). No KL term.
- Every `sync_every` steps the new weights are pushed to every worker's weight queue (a state_dict, moved to shared
  memory by torch.multiprocessing); a worker swaps them in between engine calls.
- `rollout_workers = 0` runs the very same `generate_jobs` inline (synchronous, staleness 0): tests and debugging.

OpenAI-compatible server (`--server-url`): the workers then send the jobs' chat messages to the server instead of
running the engine (asking for `return_token_ids` and logprobs), and the weights sync through a directory: at the
start and every `sync_every` steps the trainer writes the policy (HF layout + tokenizer) to `<out>/policy_sync/`
(+ `VERSION`) and POSTs `{"model_path": ...}` to `<server>/update_weights_from_disk` (SGLang's endpoint; `openzaya
serve --enable-weight-updates` serves it too), which returns once the server swapped the weights in between two
decode steps. Only then do the workers learn the new version, so a result's version tag is never newer than the
weights that produced it (sequences in flight at the swap finish on the new weights, tagged old, as in PipelineRL).
For a server without that endpoint (vLLM) set `server_reload=False` and reload it yourself from the sync
directory; the tags then assume the reload is immediate. Without token ids in the response the trainer
re-tokenises the text and uses its own logprobs as the behaviour; router replay is always off for server samples.
Tested against `openzaya serve` on loopback (tests/test_rl_loop.py).

Checkpoints (`<out>/ckpt/`, every `save_every` steps and at the end): the policy (HF layout + tokenizer) and
`trainer_state.pt` (optimizer, step, policy version, curriculum + least-sampled sampler + seed counter, RNG, best
solve rates). `--resume` continues from it; jobs in flight at the kill are skipped (the seed counter moved on).

The four stages (`warmup`, `rlve`, `math_code_ttc`, `behavioral`) are preset functions returning `RLConfig`; the
cascade runs them in order, each starting from the previous stage's final checkpoint. Nano-scale simplifications
are listed in each preset's docstring.
"""

from __future__ import annotations

import json
import queue as queue_mod
import time
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from openzaya import rl
from openzaya.envs.curriculum import ProblemSource
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
    rollout_workers: int = 0          # processes; 0 = inline
    server_url: str | None = None     # OpenAI-compatible server instead of the engine
    server_model: str | None = None   # the server's model id (None = the first of its /v1/models)
    server_reload: bool = True        # POST <server>/update_weights_from_disk after each publish (SGLang, openzaya)
    engine_slots: int = 64
    max_staleness: int = 2
    sync_every: int = 1               # push weights every k trainer steps
    max_inflight_groups: int = 0      # 0 = 2 * prompts_per_step
    max_groups_per_step: int = 256    # give up (clear error) when this many groups gave no usable batch
    result_timeout_s: float = 600.0   # give up (clear error) when live workers return nothing for this long
    # Run
    seed: int = 0
    out: str = "runs/rl"
    save_every: int = 10
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


# -----------------------------------------------------------------------------
# Rollouts: the same function inline and in worker processes


def generate_jobs(engine, jobs: list[dict], version: int, return_routes: bool) -> list[dict]:
    """Run jobs (prompt ids, G, sampling params) through one continuous-batching engine call."""
    from openzaya.engine import GenParams

    prompts, params = [], []
    for j in jobs:
        for s in rl.group_sample_seeds(j["seed"], j["G"]):
            prompts.append(j["prompt_ids"])
            params.append(GenParams(temperature=j["temperature"], max_new_tokens=j["max_new_tokens"],
                                    eos_ids=j["eos_ids"], seed=s))
    t0 = time.perf_counter()
    res = engine.generate(prompts, params, return_routes=return_routes)
    dt = time.perf_counter() - t0
    out = []
    for j, group in zip(jobs, rl.split_groups(res, jobs[0]["G"]) if jobs else []):
        out.append({"job_id": j["job_id"], "version": version, "gen_s": dt, "samples": [
            {"tokens": list(r.tokens), "logprobs": list(r.logprobs), "finish_reason": r.finish_reason,
             "routes": r.routes} for r in group]})
    return out


def generate_jobs_server(backend, jobs: list[dict], version: int) -> list[dict]:
    """The same jobs against an OpenAI-compatible server (chat messages; token ids/logprobs when it returns them)."""
    from openzaya.backends import Request, SamplingParams

    reqs = [Request(messages=j["messages"], params=SamplingParams(
        temperature=j["temperature"], max_tokens=j["max_new_tokens"], n=j["G"], seed=j["seed"])) for j in jobs]
    t0 = time.perf_counter()
    comps = backend.generate(reqs)
    dt = time.perf_counter() - t0
    return [{"job_id": j["job_id"], "version": version, "gen_s": dt, "samples": [
        {"tokens": c.token_ids, "logprobs": c.logprobs, "finish_reason": c.finish_reason, "routes": None,
         "text": c.text} for c in cs]} for j, cs in zip(jobs, comps)]


def _server_root(url: str) -> str:
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


def server_model_name(url: str) -> str:
    """The first model id a server lists at /v1/models."""
    import httpx
    r = httpx.get(_server_root(url) + "/v1/models", timeout=30)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


def server_load_weights(url: str, model_dir: Path):
    """Ask the server to load `model_dir` (SGLang's and openzaya's POST /update_weights_from_disk); clear error if it
    cannot (training on against a server that kept old weights would silently be off-policy)."""
    import httpx
    r = httpx.post(_server_root(url) + "/update_weights_from_disk", json={"model_path": str(Path(model_dir).resolve())},
                   timeout=600)
    if r.status_code != 200 or not r.json().get("success", False):
        raise RuntimeError(f"{url}: the server did not load the new policy from {model_dir} (HTTP {r.status_code}: "
                           f"{r.text[:300]}); start `openzaya serve` with --enable-weight-updates, or set "
                           f"server_reload=False and reload the server yourself")


def rollout_worker(worker_id: int, init: dict, job_q, result_q, weights_q):
    """Worker process: build the engine (or server backend), then loop: newest weights -> take jobs -> generate."""
    torch.set_num_threads(1)
    from openzaya.engine import Engine
    from openzaya.model import ZayaConfig, ZayaForCausalLM

    version, backend, engine = init["version"], None, None
    if init["server_url"]:
        from openzaya.backends import OpenAIBackend
        backend = OpenAIBackend(init["server_url"], init["server_model"] or server_model_name(init["server_url"]),
                                logprobs=True, token_ids=True)
    else:
        model = ZayaForCausalLM(ZayaConfig.from_dict(init["config"])).eval()
        model.load_state_dict(init["state_dict"])
        engine = Engine(model.relayout_experts_for_decode(), max_slots=init["engine_slots"], max_len=init["max_len"])
    while True:
        try:                                   # swap in the newest weights pushed so far
            while True:
                version, sd = weights_q.get_nowait()
                if engine is not None and sd is not None:
                    engine.model.load_state_dict(sd)
                del sd
        except queue_mod.Empty:
            pass
        job = job_q.get()
        if job is None:
            return
        jobs = [job]
        while len(jobs) < init["jobs_per_call"]:
            try:
                nxt = job_q.get_nowait()
            except queue_mod.Empty:
                break
            if nxt is None:
                job_q.put(None)
                break
            jobs.append(nxt)
        if backend is not None:
            out = generate_jobs_server(backend, jobs, version)
        else:
            out = generate_jobs(engine, jobs, version, init["router_replay"])
        for r in out:
            r["worker"] = worker_id
            result_q.put(r)


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


def make_optimizer(model, cfg: RLConfig):
    if cfg.optimizer == "muon":
        from openzaya import optim
        return optim.build_optimizer(model, lr=cfg.lr, momentum=0.0)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)


# -----------------------------------------------------------------------------
# The loop


def run(cfg: RLConfig, model=None, tokenizer=None, init_dir: str | None = None, envs: dict | None = None,
        resume: bool = False) -> dict:
    """One RL stage. Policy from `model`+`tokenizer` or `init_dir` (HF layout with tokenizer). Returns a summary
    {"steps", "metrics": [per-step dicts], "ckpt": dir}. `envs` overrides the registry (tests)."""
    from openzaya.checkpoint import atomic_file, from_pretrained, resolve_model_dir, save_pretrained
    from openzaya.runlog import external_logger, fmt_eta, plot_rl_rewards, read_metrics
    from openzaya.tokenizer import Tokenizer, eos_union, split_reasoning, tail_text

    # ---- init: policy, tokenizer, environments, optimizer, state
    out = Path(cfg.out)
    ckpt = out / "ckpt"
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    state = None
    if resume and (ckpt / "trainer_state.pt").exists():
        init_dir, model = str(ckpt / "model"), None
        state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
        print(f"rl: resuming {cfg.stage} from {ckpt} at step {state['step']}")
    if model is None:
        if not init_dir:
            raise ValueError("rl needs a policy: --init (a checkpoint dir with its tokenizer, e.g. runs/nano/sft/model)")
        init_dir = str(resolve_model_dir(init_dir))     # a directory, or a Hub repo id fetched into the HF cache
        model = from_pretrained(init_dir, dtype=torch.float32)
        tokenizer = tokenizer or Tokenizer.load(init_dir)
    assert tokenizer is not None, "rl: a model without a tokenizer"
    model.eval()                   # no dropout; routers do not accumulate load counts
    envs = envs if envs is not None else _registry()
    source = ProblemSource(cfg, envs)
    opt = make_optimizer(model, cfg)
    step, version = 0, 0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        source.load_state_dict(state["source"])
        step, version = state["step"], state["version"]
    eos_ids = eos_union(model.config.eos_ids, tokenizer)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else eos_ids[0]
    G = cfg.samples_per_prompt
    max_inflight = cfg.max_inflight_groups or 2 * cfg.prompts_per_step
    adv_fn = {"maxrl": rl.maxrl_advantages, "grpo": rl.grpo_advantages, "drgrpo": rl.drgrpo_advantages}[cfg.advantage]
    agg_fn = {"rollout_sum": rl.rollout_sum_mean, "token_mean": rl.token_mean}[cfg.aggregation]
    metrics_f = open(out / "metrics.jsonl", "a")
    sync_dir = out / "policy_sync"

    def save(d: Path):
        save_pretrained(model, d / "model")
        tokenizer.save(d / "model")
        state = {"step": step, "version": version, "optimizer": opt.state_dict(), "source": source.state_dict(),
                 "config": asdict(cfg)}
        atomic_file(d / "trainer_state.pt", lambda f: torch.save(state, f))

    def publish():
        """Push the current weights to the rollout side: the workers' queues, or the server's sync directory (and,
        with server_reload, the server's update_weights_from_disk, which returns once the server loaded them).
        Server workers learn the new version only after that, so their results never claim newer weights."""
        if cfg.server_url:
            save_pretrained(model, sync_dir)
            tokenizer.save(sync_dir)
            (sync_dir / "VERSION").write_text(str(version))
            if cfg.server_reload:
                server_load_weights(cfg.server_url, sync_dir)
            for wq in weight_qs:
                wq.put((version, None))
            return
        for wq in weight_qs:
            wq.put((version, {k: v.detach().clone() for k, v in model.state_dict().items()}))

    # ---- rollout side: inline engine or worker processes
    from openzaya.engine import Engine
    max_len = cfg.max_prompt_tokens + cfg.max_new_tokens + 8
    weight_qs, procs, inline_engine = [], [], None
    if cfg.rollout_workers > 0 or cfg.server_url:
        import torch.multiprocessing as mp
        ctx = mp.get_context("spawn")
        job_q, result_q = ctx.Queue(), ctx.Queue()
        if cfg.server_url:
            assert cfg.chat, "server rollouts send chat messages: set chat=True (the model needs a chat template)"
            publish()                  # the server starts from exactly the trainer's weights
        init = {"version": version, "config": model.config.to_dict(), "engine_slots": cfg.engine_slots,
                "max_len": max_len, "router_replay": cfg.router_replay, "server_url": cfg.server_url,
                "server_model": cfg.server_model,
                "jobs_per_call": max(1, cfg.engine_slots // G),
                "state_dict": None if cfg.server_url else {k: v.detach().clone() for k, v in model.state_dict().items()}}
        for w in range(max(cfg.rollout_workers, 1)):
            wq = ctx.Queue()
            weight_qs.append(wq)
            p = ctx.Process(target=rollout_worker, args=(w, init, job_q, result_q, wq), daemon=True)
            p.start()
            procs.append(p)
    else:
        inline_engine = Engine(model, max_slots=cfg.engine_slots, max_len=max_len)

    pending: dict[int, dict] = {}      # job_id -> {kind, env, problem, prompt_ids}
    inline_jobs: list[dict] = []
    next_job = 0

    def submit():
        nonlocal next_job
        kind, name, problem, text = source.next_problem()
        msgs = [{"role": "user", "content": text}]
        ids = (tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True) if cfg.chat
               else tokenizer.encode(text))[-cfg.max_prompt_tokens:]
        job = {"job_id": next_job, "prompt_ids": ids, "messages": msgs, "G": G, "seed": cfg.seed * 1_000_003 + next_job,
               "temperature": cfg.temperature, "max_new_tokens": cfg.max_new_tokens, "eos_ids": eos_ids}
        pending[next_job] = {"kind": kind, "env": name, "problem": problem, "prompt_ids": ids}
        next_job += 1
        (inline_jobs.append(job) if inline_engine is not None else job_q.put(job))

    def results():
        """Completed groups: inline = generate everything queued now at the current version; else block for one."""
        if inline_engine is not None:
            jobs = inline_jobs[:]
            inline_jobs.clear()
            return generate_jobs(inline_engine, jobs, version, cfg.router_replay)
        waited = 0.0
        while True:                    # poll, so that a dead worker is an error, not a hang
            try:
                got = [result_q.get(timeout=1.0)]
                break
            except queue_mod.Empty:
                waited += 1.0
            dead = [(w, p.exitcode) for w, p in enumerate(procs) if not p.is_alive()]
            if dead:
                raise RuntimeError(f"rollout worker(s) exited: {', '.join(f'{w} (exit code {c})' for w, c in dead)}; "
                                   f"their traceback is printed above. A script that runs rl_loop with "
                                   f"rollout_workers > 0 needs an `if __name__ == '__main__':` guard (spawn).")
            if waited >= cfg.result_timeout_s:
                raise RuntimeError(f"no rollout result in {cfg.result_timeout_s:.0f} s from {len(procs)} live "
                                   f"worker(s) (a stalled server?)")
        while True:
            try:
                got.append(result_q.get_nowait())
            except queue_mod.Empty:
                return got

    def score(res: dict) -> dict:
        """Rewards for one group: env scorer, reward choice, canary; plus lengths and tails for TTC prompts."""
        info = pending.pop(res["job_id"])
        env, problem = envs[info["env"]], info["problem"]
        rewards, accs, texts = [], [], []
        for s in res["samples"]:
            if s["tokens"] is None:                          # server without token ids: re-tokenise its text
                s["tokens"] = tokenizer.encode(s["text"], add_special_tokens=False)
                s["logprobs"] = None                         # (they no longer line up with the tokens)
            text = s.get("text") or tokenizer.decode([t for t in s["tokens"] if t not in eos_ids])
            sc = env.score(problem, text)
            rewards.append(stage_reward(cfg.reward, sc, text, cfg.canary))
            accs.append(float(sc.accuracy))
            texts.append(text)
        tails = []     # the last tau tokens of each sample's reasoning, as Markovian RSA passes them on
        if cfg.ttc_fraction > 0:
            tails = [tail_text(tokenizer, split_reasoning(t)[0], cfg.ttc_tail_tokens) for t in texts]
        return {**info, **res, "rewards": rewards, "accs": accs, "texts": texts, "tails": tails}

    # ---- loop: fill a batch of fresh-enough, informative groups, then one optimizer step
    if state is None:
        print(f"rl: stage {cfg.stage} | {len(cfg.envs)} envs | G {G} | {cfg.prompts_per_step} prompts/step | "
              f"adv {cfg.advantage} | trust {cfg.trust_region} | agg {cfg.aggregation} | lr {cfg.lr:g} | "
              f"workers {cfg.rollout_workers} | staleness <= {cfg.max_staleness} | sync every {cfg.sync_every}")
    history, buffer = [], deque()
    t_start, step0 = time.perf_counter(), step
    log_scalars = external_logger(cfg.log_to, out, cfg.stage, asdict(cfg))
    try:
        while step < cfg.steps:
            t0 = time.perf_counter()
            batch, drop_stale, drop_flat, gen_tokens = [], 0, 0, 0
            scanned = 0
            while len(batch) < cfg.prompts_per_step:
                if scanned > cfg.max_groups_per_step:
                    raise NoLearningSignal(
                        f"stage {cfg.stage}: {scanned} groups scanned for step {step + 1}, {len(batch)} kept "
                        f"({drop_flat} with equal rewards or solve rate > {cfg.max_solve_rate}, {drop_stale} stale): "
                        "the policy gets no learning signal here; lower --difficulty or pick other environments")
                scanned += 1
                if not buffer:
                    target = max_inflight if inline_engine is None else cfg.prompts_per_step - len(batch)
                    while len(pending) < target:
                        submit()
                    for res in results():
                        g = score(res)
                        gen_tokens += sum(len(s["tokens"]) for s in g["samples"])
                        buffer.append(g)
                g = buffer.popleft()
                if g["version"] < version - cfg.max_staleness:      # too old: never trained on
                    drop_stale += 1
                    continue
                source.update(g["env"], g["problem"], g["kind"], g["accs"], g["rewards"], g["tails"])
                if not rl.keep_group(g["rewards"], g["accs"], cfg.max_solve_rate):   # dynamic sampling
                    drop_flat += 1
                    continue
                batch.append(g)
            t_gen = time.perf_counter() - t0

            # -- advantages (+ length bonus in the numerator), one value per rollout
            prompts, comps, behav, routes, adv, versions = [], [], [], [], [], []
            for g in batch:
                r_G = torch.tensor(g["rewards"])
                bonus = [0.0] * len(r_G)
                if cfg.length_reward_c > 0:
                    src = envs[g["env"]].source
                    p = rl.solve_rate(g["accs"])
                    bonus = rl.length_reward([len(s["tokens"]) for s in g["samples"]], g["accs"],
                                             source.best_solve.get(src, 0.0), cfg.max_new_tokens, c=cfg.length_reward_c)
                    source.best_solve[src] = max(source.best_solve.get(src, 0.0), p)
                a_G = rl.with_length_reward(r_G, bonus, adv_fn)
                for s, a in zip(g["samples"], a_G.tolist()):
                    if not s["tokens"]:
                        continue
                    prompts.append(g["prompt_ids"])
                    comps.append(s["tokens"])
                    behav.append(s["logprobs"])
                    routes.append(s["routes"])
                    adv.append(a)
                    versions.append(g["version"])
            assert all(v >= version - cfg.max_staleness for v in versions), "stale sample reached the trainer"

            # -- policy-gradient step with router replay and the trust region
            opt.zero_grad(set_to_none=True)
            B = len(comps)
            n_tok = sum(len(c) for c in comps)
            loss_sum, kept_tok, mism = 0.0, 0.0, 0.0
            for i in range(0, B, cfg.micro_batch_rollouts):
                sl = slice(i, i + cfg.micro_batch_rollouts)
                ids_BT, mask_BT = rl.pad_rollouts(prompts[sl], comps[sl], pad_id)
                T = ids_BT.shape[1]
                replay = None
                if cfg.router_replay and all(r is not None for r in routes[sl]):
                    replay = rl.pad_routes(routes[sl], T)
                logp_BT = model.token_logprobs(ids_BT, ids_BT[:, 1:], replay_routes=replay)   # chunked LM head
                if any(b is None for b in behav[sl]):            # server without logprobs: on-policy assumption
                    behav_BT = logp_BT.detach()
                else:
                    behav_BT = rl.pad_behaviour_logprobs([len(p) for p in prompts[sl]], behav[sl], T)
                adv_B = torch.tensor(adv[sl])
                anchor_BT = behav_BT
                if cfg.tis_cap > 0:        # decoupled: anchor at the trainer's own logprobs, TIS fixes the sampler gap
                    anchor_BT = logp_BT.detach()
                if cfg.trust_region == "dppo":
                    loss_BT, keep_BT = rl.dppo_loss(logp_BT, anchor_BT, adv_B, cfg.tv_delta)
                elif cfg.trust_region == "ppo":
                    loss_BT, keep_BT = rl.ppo_clip_loss(logp_BT, anchor_BT, adv_B, cfg.clip_low, cfg.clip_high)
                else:
                    loss_BT, keep_BT = -adv_B[:, None] * logp_BT, torch.ones_like(logp_BT, dtype=torch.bool)
                if cfg.tis_cap > 0:
                    loss_BT = loss_BT * rl.tis_weights(logp_BT, behav_BT, cfg.tis_cap)
                if cfg.aggregation == "rollout_sum":
                    loss = agg_fn(loss_BT, mask_BT) * (ids_BT.shape[0] / B)
                else:
                    loss = agg_fn(loss_BT, mask_BT) * (float(mask_BT.sum()) / max(n_tok, 1))
                loss.backward()
                loss_sum += float(loss.detach())
                kept_tok += float((keep_BT * mask_BT).sum())
                mism += float(((logp_BT.detach() - behav_BT).abs() * mask_BT).sum())
            gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
            opt.step()
            step += 1
            version += 1
            if version % cfg.sync_every == 0:
                publish()
            if step % cfg.save_every == 0 or step == cfg.steps:
                save(ckpt)

            # -- one log line + a metrics row
            all_r = [r for g in batch for r in g["rewards"]]
            all_a = [a for g in batch for a in g["accs"]]
            stale = [version - 1 - v for v in versions]
            dt = time.perf_counter() - t0
            row = {"step": step, "stage": cfg.stage, "reward": sum(all_r) / len(all_r), "acc": sum(all_a) / len(all_a),
                   "solve": sum(max(g["accs"]) for g in batch) / len(batch),
                   "resp_len": n_tok / max(B, 1), "masked": 1 - kept_tok / max(n_tok, 1),
                   "mismatch": mism / max(n_tok, 1), "stale_mean": sum(stale) / max(len(stale), 1),
                   "stale_max": max(stale, default=0), "versions": sorted(set(versions)), "trained_version": version - 1,
                   "tok_s": n_tok / max(dt, 1e-9), "gen_tokens": gen_tokens, "gen_s": t_gen,
                   "load": routes_expert_load([r for r in routes if r is not None], model.config.num_experts),
                   "loss": loss_sum, "gnorm": gnorm, "kept": len(batch), "drop_flat": drop_flat,
                   "drop_stale": drop_stale, "step_s": dt, "elapsed_s": time.perf_counter() - t_start,
                   "difficulty": {n: source.difficulty(n) for n in sorted({g["env"] for g in batch})}}
            history.append(row)
            metrics_f.write(json.dumps(row) + "\n")
            metrics_f.flush()
            log_scalars(row)
            print(f"step {step:05d}/{cfg.steps:05d} | reward {row['reward']:.3f} | acc {row['acc']:.3f} | "
                  f"solve {row['solve']:.2f} | len {row['resp_len']:.1f} | masked {row['masked']:.3f} | "
                  f"stale {row['stale_mean']:.2f}/{row['stale_max']} | tok/s {row['tok_s']:.0f} | "
                  f"load {row['load']:.2f} | loss {row['loss']:+.4f} | gnorm {gnorm:.2f} | "
                  f"drop {drop_flat}+{drop_stale} | {dt:.1f}s | eta "
                  f"{fmt_eta(row['elapsed_s'], step - step0, cfg.steps - step)}", flush=True)
    finally:
        metrics_f.close()
        if procs:
            for _ in procs:
                job_q.put(None)
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.terminate()
    plot_rl_rewards({cfg.stage: read_metrics(out / "metrics.jsonl")}, out / "reward.png")
    return {"steps": step, "metrics": history, "ckpt": str(ckpt / "model"), "model": model, "tokenizer": tokenizer}


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


def main(args) -> int:
    overrides = {k: v for k, v in {
        "steps": args.steps, "lr": args.lr, "prompts_per_step": args.prompts_per_step,
        "samples_per_prompt": args.samples_per_prompt, "max_new_tokens": args.max_new_tokens,
        "rollout_workers": args.rollout_workers, "max_staleness": args.max_staleness, "sync_every": args.sync_every,
        "server_url": args.server_url, "server_model": args.server_model, "seed": args.seed,
        "difficulty": args.difficulty, "max_difficulty": args.max_difficulty,
        "save_every": args.save_every, "log_to": args.log_to}.items() if v is not None}
    if args.no_server_reload:
        overrides["server_reload"] = False
    if args.envs:
        overrides["envs"] = args.envs.split(",")
    if args.cascade:
        if not args.init:
            raise ValueError("--cascade needs --init (an SFT checkpoint directory, e.g. runs/nano/sft/model)")
        run_cascade(args.init, args.out, resume=args.resume, **overrides)
        return 0
    cfg = STAGES[args.stage](out=args.out, **overrides)
    run(cfg, init_dir=args.init, resume=args.resume)
    return 0
