"""The `openzaya` command: argparse subcommands, each a thin call into a library module.

Every subcommand registers itself in one `add_<name>(sub)` function below; flags are kebab-case and named by unit.
Imports of heavy modules happen inside the handlers, so `openzaya --help` stays fast.

Errors are one line: a bad flag (argparse) or an expected error while running (bad input, missing files, offline
Hub, unknown names: `expected_error`) prints `openzaya <cmd>: error: <message>` and exits with status 2; `--debug`
(or OPENZAYA_DEBUG=1) shows the traceback instead. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

# the TTC knobs whose flags default to None and fall back to ttc.TTCConfig (the one place their defaults live)
TTC_KNOBS = ("population", "candidates", "rounds", "tail_tokens", "budget_tokens", "head_tokens")


class HelpFormatter(argparse.HelpFormatter):
    """Shows every flag's default; a TTC knob's comes from ttc.TTCConfig (imported only when help is printed)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.dest in TTC_KNOBS and action.default is None:
            from openzaya.ttc import TTCConfig

            clamp = "; clamped to fit the model's context" if action.dest in ("tail_tokens", "budget_tokens") else ""
            return f"{text} (default: {getattr(TTCConfig, action.dest)}, ttc.TTCConfig{clamp})"
        if action.option_strings and not any(action.default is x for x in (None, False, argparse.SUPPRESS)) \
                and action.default != "" and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """argparse with the house's help format, a one-line error (no usage dump) and no abbreviated flags (a prefix
    such as --budget would silently change meaning when a flag that shares it is added)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists the flags)\n")

    def parse_args(self, args=None, namespace=None):
        """As argparse, but unknown flags are reported by the subcommand they were given to."""
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            leaf = self
            while True:
                subs = [a for a in leaf._actions if isinstance(a, argparse._SubParsersAction)]
                if not subs or getattr(ns, subs[0].dest, None) is None:
                    break
                leaf = subs[0].choices[getattr(ns, subs[0].dest)]
            leaf.error(f"unrecognized arguments: {' '.join(extras)}")
        return ns


# -----------------------------------------------------------------------------
# envs: list, sample and self-check the verifiable environments (logic in openzaya/envs/registry.py)


def _check_source(source: str | None):
    from openzaya.envs.registry import all_envs, load_errors

    sources = sorted({e.source for e in all_envs().values()} | set(load_errors()))
    if source is not None and source not in sources:
        raise ValueError(f"unknown source {source!r}; sources: {', '.join(sources)}")


def _envs_list(a):
    from openzaya.envs.registry import describe_envs

    _check_source(a.source)
    print(describe_envs(a.source))


def _envs_sample(a):
    from openzaya.envs.registry import describe_sample

    print(describe_sample(a.name, a.difficulty, a.seed))


def _envs_check(a):
    from openzaya.envs.registry import run_check

    _check_source(a.source)
    return run_check(a.source)


def add_envs(sub):
    p = sub.add_parser("envs", help="list, sample and check the verifiable environments")
    envs_sub = p.add_subparsers(dest="envs_command", required=True)
    q = envs_sub.add_parser("list", help="every environment with its tags and difficulty range")
    q.add_argument("--source", default=None, help="only this source (openzaya, reasoning_gym, rlve, ...)")
    q.set_defaults(func=_envs_list)
    q = envs_sub.add_parser("sample", help="print one problem: prompt, reference answer and solution")
    q.add_argument("name")
    q.add_argument("--difficulty", type=int, default=0)
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=_envs_sample)
    q = envs_sub.add_parser("check", help="self-check every environment at min/mid/max difficulty, 2 seeds")
    q.add_argument("--source", default=None, help="only this source")
    q.set_defaults(func=_envs_check)


# -----------------------------------------------------------------------------
# solve / eval: test-time compute (openzaya/ttc.py) and the evaluation harness (openzaya/evaluate.py)


def _add_backend_and_ttc_flags(p):
    # Backend
    p.add_argument("--backend", choices=["local", "hf", "openai"], default="local")
    p.add_argument("--model", required=True, help="checkpoint dir or Hub repo id (local/hf), or served model name (openai)")
    p.add_argument("--base-url", default=None, help="openai: server URL, e.g. http://localhost:8000/v1")
    p.add_argument("--api-key", default=None, help="openai: bearer key for the server (default: $OPENAI_API_KEY)")
    p.add_argument("--gguf-file", default=None, help="hf: a GGUF file inside --model")
    p.add_argument("--tokenizer", default=None, help="openai: tokenizer dir for exact token counts and tails")
    p.add_argument("--max-concurrency", type=int, default=64, help="calls in flight over all problems")
    p.add_argument("--max-len", type=int, default=None, help="local: engine positions per slot")
    p.add_argument("--expert-cache-gb", type=float, default=-1,
                   help="local: offload the experts, keep a cache of this many GiB (-1 = all resident; offload.py)")
    p.add_argument("--compile", action="store_true",
                   help="local: torch.compile the decode step (minutes of warm-up; steps attend over all --max-len)")
    # Test-time compute (rounds follow the ZAYA1 TR: T aggregation rounds after round 0, T+1 generations);
    # a knob left out keeps ttc.TTCConfig's default
    p.add_argument("--method", default="markovian_rsa",
                   help="single | majority | rsa | markovian_rsa | delethink | pacore_hybrid (eval: comma list)")
    p.add_argument("--population", type=int, default=None, help="N: candidates per round (majority: samples)")
    p.add_argument("--candidates", type=int, default=None, help="C: tails per aggregation prompt, C <= N")
    p.add_argument("--rounds", type=int, default=None, help="T: aggregation rounds after round 0")
    p.add_argument("--tail-tokens", type=int, default=None, help="tau: tail length in tokens")
    p.add_argument("--budget-tokens", type=int, default=None, help="beta: decode tokens per call")
    p.add_argument("--head-tokens", type=int, default=None, help="delethink: generated tokens kept after the query")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=0, help="seeds the subset draws and every call's sampling")
    p.add_argument("--template-file", default=None, help="aggregation template with {question} and {candidates}")
    p.add_argument("--no-thinking", action="store_true", help="chat template without a think block")


def _ttc_config(a, method):
    """The TTCConfig of the flags; the knobs not given keep TTCConfig's defaults (the one place they live), and the
    knobs `method` does not read cannot make it invalid (`evaluate.for_method`)."""
    from openzaya.evaluate import for_method
    from openzaya.ttc import TTCConfig

    knobs = {k: getattr(a, k) for k in TTC_KNOBS if getattr(a, k) is not None}
    if "budget_tokens" in knobs and "tail_tokens" not in knobs:   # a default tau keeps its ratio to a given beta
        knobs["tail_tokens"] = max(1, min(TTCConfig.tail_tokens,
                                          knobs["budget_tokens"] * TTCConfig.tail_tokens // TTCConfig.budget_tokens))
    return for_method(TTCConfig(method=method, temperature=a.temperature, top_p=a.top_p, seed=a.seed,
                                max_concurrency=a.max_concurrency, template_file=a.template_file,
                                enable_thinking=not a.no_thinking, **knobs))


def _backend(a):
    from openzaya.backends import make_backend

    return make_backend(a.backend, a.model, base_url=a.base_url, gguf_file=a.gguf_file, tokenizer=a.tokenizer,
                        max_concurrency=a.max_concurrency, max_len=a.max_len, api_key=a.api_key,
                        expert_cache_gb=a.expert_cache_gb if a.expert_cache_gb > 0 else None, compile=a.compile)


def _fit(a, cfg, methods, backend, questions):
    """cfg fitted to the backend's context (`evaluate.fit_to_context`), its notes printed to stderr."""
    from openzaya.evaluate import fit_to_context

    cfg, notes = fit_to_context(cfg, methods, backend, questions, {k for k in TTC_KNOBS if getattr(a, k) is not None})
    for note in notes:
        print(f"openzaya {a.command}: note: {note}", file=sys.stderr)
    return cfg


def _solve(a):
    from tqdm import tqdm

    from openzaya.ttc import TTCProblem, solve

    cfg = _ttc_config(a, a.method)
    cfg.validate()
    if not a.question.strip():
        raise ValueError("empty question")
    backend = _backend(a)
    cfg = _fit(a, cfg, [cfg.method], backend, [a.question])
    with tqdm(total=cfg.calls_per_problem(), unit="call", desc=cfg.method, file=sys.stderr) as bar:
        (res,), totals = solve([TTCProblem(id="q0", question=a.question)], backend, cfg, a.trace, bar.update)
    print(f"answer: {res.answer}")
    print(f"votes: {res.votes}")
    for t, r in enumerate(res.rounds):
        print(f"round {t}: calls {r.calls} | prompt tokens {r.prompt_tokens} | completion tokens "
              f"{r.completion_tokens} | max prompt {r.max_prompt_tokens} | wall {r.wall_s:.2f}s")
    print(f"total: calls {totals['calls']} | prompt tokens {totals['prompt_tokens']} | completion tokens "
          f"{totals['completion_tokens']} | wall {totals['wall_s']:.2f}s"
          + (f" | token counts approximated: {totals['tail_approximation']}" if totals["tail_approximation"] else ""))


def add_solve(sub):
    p = sub.add_parser("solve", help="answer one question with a test-time-compute method (Markovian RSA, ...)")
    p.add_argument("question")
    _add_backend_and_ttc_flags(p)
    p.add_argument("--trace", default=None, help="JSONL trace of every call (an existing trace is resumed)")
    p.set_defaults(func=_solve)


def _eval(a):
    from dataclasses import replace

    from openzaya import codebench
    from openzaya.evaluate import benchmark_name, evaluate

    methods = [m.strip() for m in a.method.split(",") if m.strip()]
    if not methods:
        raise ValueError("--method: no method given")
    for m in methods:
        _ttc_config(a, m).validate()
    base = _ttc_config(a, methods[0])
    windowed = a.start_date is not None or a.end_date is not None
    items = codebench.load(a.benchmark, task=a.task, question_field=a.question_field, answer_field=a.answer_field,
                           id_field=a.id_field, split=a.split, limit=None if windowed else a.limit)
    code = items[0].code is not None
    if not code and (windowed or a.cutoff_date is not None):
        raise ValueError("--start-date / --end-date / --cutoff-date go by contest date: code benchmarks only")
    lim = codebench.CodeLimits(time_s=a.test_time_s, memory_mb=a.test_memory_mb,
                               workers=a.sandbox_workers or os.cpu_count() or 1)
    lim.validate()
    codebench.check_date("--cutoff-date", a.cutoff_date)
    if windowed:
        items = codebench.in_window(items, a.start_date, a.end_date)[:a.limit]
    a.out = a.out or f"runs/eval/{benchmark_name(a.benchmark)}"
    if code and a.template_file is None:   # aggregation prompts that ask for a program, not a \boxed{} answer
        base = replace(base, template_file=codebench.code_template_file(a.out))
    backend = _backend(a)
    base = _fit(a, base, methods, backend, [it.question for it in items])
    run_config = {"model": a.model, "backend": a.backend, "base_url": a.base_url, "benchmark": a.benchmark,
                  "split": a.split, "limit": a.limit, "samples": a.samples}
    if code:
        res = codebench.evaluate_code(items, backend, base, methods, lim, samples=a.samples, out_dir=a.out,
                                      match_calls=not a.no_match_calls, task=benchmark_name(a.benchmark),
                                      run_config=run_config, cutoff_date=a.cutoff_date)
    else:
        res = evaluate(items, backend, base, methods, samples=a.samples, out_dir=a.out,
                       match_calls=not a.no_match_calls, task=benchmark_name(a.benchmark), run_config=run_config)
    k = res["samples"]
    for m, r in res["methods"].items():
        se = r["stderr"]
        print(f"{m:14s} avg@{k} {r['avg@k']:.3f} ± {se['avg@k']:.3f} | maj@{k} {r['maj@k']:.3f} ± {se['maj@k']:.3f}"
              f" | pass@1 {r['pass@1']:.3f} ± {se['pass@1']:.3f} | pop_mean {r['pop_mean']:.3f} ± "
              f"{se['pop_mean']:.3f} | tokens/problem {r['tokens_per_problem']:.0f} | calls/problem "
              f"{r['calls_per_problem']:.0f} | wall/problem {r['wall_s_per_problem']:.2f}s")
        if code:
            c = res["code"]["methods"][m]
            print(f"{'':14s} verdicts: {codebench.verdict_line(c)} | by difficulty: "
                  + ", ".join(f"{d} {s['avg@k']:.3f} ± {s['stderr']['avg@k']:.3f} (n={s['n']})"
                              for d, s in c["by_difficulty"].items())
                  + f" | {c['sandbox'].get('tests_run', 0)} tests at {c['sandbox'].get('tests_per_s') or 0:.1f}/s"
                  + "".join(f" | pass@{kk} {x['value']:.3f} ± {x['stderr']:.3f}" for kk, x in c["pass@k"].items()
                            if kk != "1"))
    if code:
        print(f"code: pass@1 = avg@{k} of each run's program; populations pick theirs by this rule: "
              f"{codebench.SELECTION_RULE}")
    print(f"± = standard error over {res['benchmark_size']} problems; wrote {a.out}/results.json, report.md, "
          f"accuracy_vs_tokens.png and lm-eval's results_<date>.json, samples_<task>_<date>.jsonl")


def add_eval(sub):
    p = sub.add_parser("eval", help="evaluate methods on a benchmark file or suite; writes results, report, plot")
    p.add_argument("--benchmark", required=True,
                   help="a .jsonl/.json/.parquet file, a suite (envs:tiny, envs:easy, envs:nano, code:mini), or a "
                        "Hugging Face dataset id or folder (pip install 'openzaya[datasets]')")
    p.add_argument("--task", choices=["auto", "answer", "code"], default="auto",
                   help="answer: a gold answer per row; code: LiveCodeBench rows or our code JSONL, scored by running "
                        "tests in the sandbox; auto: code when the first row has a code layout")
    _add_backend_and_ttc_flags(p)
    # Evaluation
    p.add_argument("--samples", type=int, default=1, help="k: independent runs of each method per problem")
    p.add_argument("--out", default=None, help="results folder (traces there are resumed; default: "
                                                "runs/eval/<benchmark name>)")
    p.add_argument("--limit", type=int, default=None, help="first problems only")
    p.add_argument("--question-field", default=None, help="default: problem, else question")
    p.add_argument("--answer-field", default="answer")
    p.add_argument("--id-field", default="id")
    p.add_argument("--split", default="test", help="Hugging Face split")
    p.add_argument("--no-match-calls", action="store_true",
                   help="majority uses N samples instead of N x (T+1) (matched calls with Markovian RSA)")
    # Code benchmarks (openzaya/codebench.py)
    p.add_argument("--sandbox-workers", type=int, default=None,
                   help="code: samples whose tests run at once, each in its own sandbox (default: one per CPU core)")
    p.add_argument("--test-time-s", type=int, default=6, help="code: CPU seconds per test (wall: 2x + 1 s)")
    p.add_argument("--test-memory-mb", type=int, default=1024, help="code: address-space limit per test")
    p.add_argument("--start-date", default=None, help="code: only problems of contests on or after YYYY-MM-DD")
    p.add_argument("--end-date", default=None, help="code: only problems of contests on or before YYYY-MM-DD")
    p.add_argument("--cutoff-date", default=None,
                   help="code: also split the scores into contests before / from YYYY-MM-DD (a training cutoff)")
    p.set_defaults(func=_eval)


# -----------------------------------------------------------------------------
# serve: an OpenAI-compatible server with test-time compute (openzaya/serve.py)


def check_device(device: str):
    """A device torch can use here, checked before any work (`--device cuda` on a machine without CUDA)."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: torch {torch.__version__} sees no CUDA device on this machine; "
                             f"use --device cpu")


def check_port(host: str, port: int):
    """Fail before loading a model when host:port cannot be listened on (another server holds it)."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as uvicorn: a port in TIME_WAIT is free
        try:
            s.bind((host, port))
        except OSError as e:
            raise ValueError(f"cannot listen on {host}:{port}: {e.strerror} (is another server running there? "
                             f"pick another --port)") from None


def _serve(a):
    check_device(a.device)
    check_port(a.host, a.port)
    from openzaya.serve import main

    return main(a)


def add_serve(sub):
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (continuous batching, Markovian RSA via `ttc`)")
    p.add_argument("--model", required=True, help="checkpoint directory (native layout, with its tokenizer) or Hub repo id")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on /v1/*")
    p.add_argument("--served-model-name", default=None, help="model id (default: the directory's name)")
    p.add_argument("--enable-weight-updates", action="store_true",
                   help="RL trainers push new policies (from disk or by broadcast; vLLM's RL API, serve_rl.py)")
    p.add_argument("--enable-return-routed-experts", action="store_true",
                   help="requests may ask for routed_experts (RL router replay)")
    p.add_argument("--device", default="auto", help="auto (CUDA when torch sees one) | cpu | cuda[:N]")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="weights and compute (auto = the checkpoint's)")
    p.add_argument("--chat-template", default=None, help="a Jinja file (or the template itself) replacing the "
                                                         "tokenizer's chat template")
    p.add_argument("--threads", type=int, default=-1, help="torch threads (-1 = torch default)")
    # Engine (vLLM's names are aliases)
    p.add_argument("--max-slots", "--max-num-seqs", type=int, default=16, help="sequences decoded together")
    p.add_argument("--max-len", "--max-model-len", type=int, default=-1,
                   help="positions per slot (-1 = min(context, 4096))")
    p.add_argument("--expert-cache-gb", type=float, default=-1,
                   help="offload the experts, keep a cache of this many GiB (-1 = all resident; offload.py)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (minutes of warm-up; steps attend over all --max-len)")
    # Limits
    p.add_argument("--max-queue", type=int, default=256, help="sequences waiting beyond the slots (429 beyond)")
    p.add_argument("--max-n", type=int, default=16, help="sequences per request (n x prompts)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--read-timeout-s", type=float, default=30.0,
                   help="a request's headers, then its body, must each arrive within this (slow clients: 408)")
    p.add_argument("--request-timeout-s", type=float, default=600.0)
    p.add_argument("--max-ttc-population", type=int, default=64)
    p.add_argument("--max-ttc-rounds", type=int, default=8)
    p.add_argument("--shutdown-grace-s", type=float, default=10.0)
    p.set_defaults(func=_serve)


# -----------------------------------------------------------------------------
# rl: the four-stage RL cascade (logic in openzaya/rl_loop.py, pure functions in openzaya/rl.py)


def check_env_names(names: list[str]):
    """Every name is a registered environment, else an error with the closest names."""
    import difflib

    from openzaya.envs.registry import all_envs

    known = all_envs()
    bad = [n for n in names if n not in known]
    if bad:
        close = sorted({c for n in bad for c in difflib.get_close_matches(n, list(known), n=3)})
        raise ValueError(f"unknown environment{'s' * (len(bad) > 1)} {', '.join(map(repr, bad))}"
                         + (f"; did you mean {', '.join(close)}?" if close else "")
                         + " (`openzaya envs list` lists all of them)")


def _rl(a):
    if a.cascade and not a.init:
        raise ValueError("--cascade needs --init (an SFT checkpoint directory, e.g. runs/nano/sft/model)")
    if a.envs:
        check_env_names([n.strip() for n in a.envs.split(",") if n.strip()])
    from openzaya.rl_loop import main

    return main(a)


def add_rl(sub):
    p = sub.add_parser("rl", help="RL stages (warmup, rlve, math-code-ttc, behavioral) or the whole cascade")
    p.add_argument("--stage", default="warmup", choices=["warmup", "rlve", "math-code-ttc", "behavioral"])
    p.add_argument("--cascade", action="store_true", help="run all four stages in order, each from the last")
    p.add_argument("--init", default=None, help="policy checkpoint directory (HF layout + tokenizer), e.g. the SFT one")
    p.add_argument("--out", default="runs/rl")
    p.add_argument("--resume", action="store_true", help="continue from <out>/ckpt (per stage with --cascade)")
    p.add_argument("--envs", default=None, help="comma-separated environment names instead of the stage's")
    # Optimization
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--prompts-per-step", type=int, default=None)
    p.add_argument("--samples-per-prompt", type=int, default=None, help="G (default 16)")
    p.add_argument("--difficulty", type=int, default=None, help="starting difficulty")
    p.add_argument("--max-difficulty", type=int, default=None,
                   help="curriculum ceiling (zaya); with a fixed curriculum, draw from difficulty..this")
    # Rollouts
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--rollout-workers", type=int, default=None, help="worker processes (0 = inline)")
    p.add_argument("--max-staleness", type=int, default=None, help="max policy versions a sample may lag")
    p.add_argument("--sync-every", type=int, default=None, help="push weights every k trainer steps")
    p.add_argument("--server-url", action="append", default=None,
                   help="inference server for rollouts (openzaya serve --enable-weight-updates, vLLM); repeatable")
    p.add_argument("--server-file", default=None, help="a file listing server URLs, one per line")
    p.add_argument("--server-model", default=None, help="the servers' model id (default: first of /v1/models)")
    p.add_argument("--weight-sync", default=None, choices=["disk", "broadcast"],
                   help="how new weights reach the servers (default disk: a checkpoint each reloads)")
    p.add_argument("--probe-tolerance", type=float, default=None,
                   help="mean |logprob difference| of the probe that verifies each push (default 0.05)")
    p.add_argument("--no-server-reload", action="store_true",
                   help="do not push weights to the servers (reload them yourself from <out>/policy_sync; unverified)")
    p.add_argument("--reward-workers", type=int, default=None, help="threads scoring groups as they arrive (0 = none)")
    # Trainer (torchrun for several ranks)
    p.add_argument("--device", default=None, help="auto (default: CUDA when present) | cpu | cuda")
    p.add_argument("--dp-shard", type=int, default=None, help="torchrun: FSDP2 shard degree (-1 = all ranks)")
    p.add_argument("--ep", type=int, default=None, help="torchrun: expert-parallel degree")
    p.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--log-to", choices=["", "tensorboard", "wandb"], default=None,
                   help="also log per-step metrics to TensorBoard or W&B (optional packages)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="--resume even when the run was saved with other settings")
    p.set_defaults(func=_rl)


# -----------------------------------------------------------------------------
# pretrain / sft: the resumable trainer (logic in openzaya/train.py); speedrun: the nano pipeline (openzaya/speedrun.py)


def _train(a, stage: str):
    from openzaya.model import PRESETS as MODEL_PRESETS
    from openzaya.train import PRESETS, main

    if a.preset is not None and a.preset not in PRESETS:
        raise ValueError(f"unknown --preset {a.preset!r}; presets: {', '.join(PRESETS)}")
    if a.model_preset is not None and a.model_preset not in MODEL_PRESETS:
        raise ValueError(f"unknown --model-preset {a.model_preset!r}; model presets: {', '.join(MODEL_PRESETS)}")
    if a.device is not None and a.device != "auto":
        check_device(a.device)
    return main(a, stage)


def _train_flags(p, stage: str):
    """Flags of `pretrain` and `sft` (None = the preset's or TrainConfig's default, see openzaya/train.py)."""
    p.add_argument("--preset", default=None, help="start from a preset: nano_pretrain, nano_sft")
    # Data / model
    p.add_argument("--data", required=True, help="corpus directory (manifest.json + JSONL shards)")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory")
    p.add_argument("--out", default=None, help="run directory (default runs/train)")
    p.add_argument("--init-from", default=None, help="model directory (HF layout) to start from")
    p.add_argument("--model-preset", default=None, help="fresh model preset (nano, micro, ...)")
    # Batch
    p.add_argument("--seq-len", type=int, default=None, help="tokens per packed window")
    p.add_argument("--tokens-per-step", type=int, default=None, help="global batch in tokens")
    p.add_argument("--device-batch-size", type=int, default=None, help="sequences per micro-batch per rank")
    p.add_argument("--steps", type=int, default=None)
    # Optimization
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--schedule", choices=["cosine", "wsd"], default=None)
    p.add_argument("--grad-clip", type=float, default=None, help="-1 = off")
    p.add_argument("--trim", choices=["ap", "truncate"], default=None, help="SFT trimming (ablation: truncate)")
    p.add_argument("--length-group-batches", type=int, default=None,
                   help="0 = random batches; k = sort each chunk of k global batches by window length and cut the "
                        "padding columns (less padding)")
    p.add_argument("--seed", type=int, default=None)
    # Output
    p.add_argument("--save-every", type=int, default=None, help="steps between checkpoints; -1 = only at the end")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--allow-config-change", action="store_true", default=None,
                   help="--resume even when the checkpoint was saved with other settings (they are listed)")
    p.add_argument("--device", default=None)
    p.add_argument("--max-memory-gb", type=float, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the forward: minutes of compiling, then faster steps (bench/model.py)")
    p.add_argument("--log-to", choices=["", "tensorboard", "wandb"], default=None,
                   help="also log per-step metrics to TensorBoard or W&B (optional packages)")
    # Parallelism (under torchrun; with no flags: FSDP2 over all ranks; see README "Training at scale")
    p.add_argument("--dp-shard", type=int, default=None,
                   help="FSDP2 shard degree (default: world size / --dp-replicate; 1 = plain data parallel)")
    p.add_argument("--dp-replicate", type=int, default=None, help="HSDP: replicas of the sharded model (default 1)")
    p.add_argument("--ep", type=int, default=None,
                   help="expert-parallel degree: each rank owns experts/EP of every layer (divides --dp-shard)")
    p.add_argument("--activation-checkpointing", action="store_true", default=None,
                   help="recompute each decoder layer in backward")
    p.add_argument("--offload-optimizer", action="store_true", default=None,
                   help="keep sharded params, grads and optimizer state on the CPU (FSDP2 CPU offload)")
    p.add_argument("--mixed-precision", choices=["auto", "bf16", "fp32"], default=None,
                   help="auto: bf16 compute (fp32 master weights and reduction) on CUDA and on CPUs with native bf16 "
                        "matmuls (AVX512-BF16 / AMX), fp32 elsewhere")
    p.set_defaults(func=lambda a: _train(a, stage))


def add_pretrain(sub):
    p = sub.add_parser("pretrain", help="pretrain on packed plain-text solver traces (torchrun-able)")
    _train_flags(p, "pretrain")


def add_sft(sub):
    p = sub.add_parser("sft", help="SFT on packed chat samples, AP-trimmed, loss on assistant tokens (torchrun-able)")
    _train_flags(p, "sft")


def _speedrun(a):
    from openzaya.speedrun import main

    return main(a)


def _plan(a):
    from openzaya.plan import main

    return main(a)


def add_plan(sub):
    p = sub.add_parser("plan", help="per-GPU training memory of a parallel layout, from the real sharding; the "
                                    "smallest layout that fits (openzaya/plan.py)")
    p.add_argument("--preset", default="zaya1_8b", help="model preset (nano, micro, zaya1_8b)")
    p.add_argument("--config", default=None, help="a config.json (model directory) instead of --preset")
    p.add_argument("--world-size", type=int, required=True, help="GPUs (torchrun ranks)")
    p.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory of one GPU")
    # Parallelism (as on `pretrain` / `sft`)
    p.add_argument("--dp-shard", type=int, default=None, help="FSDP2 shard degree (default: world size / --dp-replicate)")
    p.add_argument("--dp-replicate", type=int, default=None, help="HSDP replicas (default 1)")
    p.add_argument("--ep", type=int, default=None, help="expert-parallel degree (default 1)")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--offload-optimizer", action="store_true")
    p.add_argument("--mixed-precision", choices=["bf16", "fp32"], default="bf16")
    # Batch
    p.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch per GPU")
    p.add_argument("--json", default=None, help="also write the table to this JSON file")
    p.set_defaults(func=_plan)


def add_speedrun(sub):
    p = sub.add_parser("speedrun", help="corpus, tokenizer, pretrain, SFT, four RL stages, held-out eval and report, end to end")
    p.add_argument("--preset", default="nano", choices=["nano", "mini", "smoke", "small"],
                   help="nano: the CPU speedrun (make run); mini: the ~20-minute CPU preset, 2.1x nano's model; smoke: a "
                        "two-minute plumbing check; small: 24x nano's model, 7x its tokens, for a GPU")
    p.add_argument("--name", default=None, help="run name: output under <root>/<name>")
    p.add_argument("--root", default="runs")
    p.add_argument("--pretrain-steps", type=int, default=None)
    p.add_argument("--sft-steps", type=int, default=None)
    p.add_argument("--eval-problems", type=int, default=None, help="held-out problems per env and difficulty")
    p.add_argument("--ablation-trim", action="store_true", help="also compare AP trimming vs plain truncation")
    p.add_argument("--no-rl", action="store_true", help="skip the four RL stages (quick runs)")
    p.add_argument("--no-precision-twin", action="store_true",
                   help="skip the second pretraining run in the other precision (bf16 vs fp32 loss curves)")
    p.add_argument("--rl-steps", type=int, default=None, help="optimizer steps per RL stage")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads of the stages that share the CPU: pretraining, the RL trainer (default 1)")
    p.add_argument("--threads-alone", type=int, default=None,
                   help="torch CPU threads of SFT and the full evaluations (default 0 = every CPU)")
    p.add_argument("--mixed-precision", choices=["auto", "bf16", "fp32"], default=None,
                   help="pretraining and SFT compute: auto = the preset's choice (bf16 where the device has native bf16 "
                        "matmuls, unless the preset measured fp32 faster at its size)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="auto (default: CUDA when present) | cpu | cuda")
    p.add_argument("--log-to", choices=["", "tensorboard", "wandb"], default=None,
                   help="also log every training and RL stage's per-step metrics to TensorBoard or W&B")
    p.set_defaults(func=_speedrun)


def _add_debug(parser: argparse.ArgumentParser, default=False):
    """--debug on the parser and, without a default that would overwrite the top level's, on every subcommand."""
    parser.add_argument("--debug", action="store_true", default=default,
                        help="show the traceback of an error (also OPENZAYA_DEBUG=1)")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _add_debug(sub, argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    from openzaya import package_version

    parser = Parser(prog="openzaya", description="ZAYA1 MoE++ models, training and Markovian RSA")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in [add_envs, add_solve, add_eval, add_serve, add_rl, add_pretrain, add_sft,
                add_speedrun, add_plan]:
        add(sub)
    _add_debug(parser)
    return parser


def expected_error(e: BaseException) -> bool:
    """Errors a user can fix (bad input or flags, missing files, offline Hub, unknown names, a missing optional
    package, a server that does not answer): the library raises these on purpose with a message that says how.
    Other exceptions are bugs and keep their traceback."""
    if isinstance(e, (ValueError, KeyError, OSError, ImportError, MemoryError)):
        return True
    return type(e).__module__.split(".")[0] in ("openzaya", "huggingface_hub", "httpx")


def error_message(e: BaseException) -> str:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(str(msg).split()) or type(e).__name__


def main(argv=None):
    args = build_parser().parse_args(argv)
    cmd = " ".join(x for x in ("openzaya", args.command, getattr(args, "envs_command", None)) if x)
    debug = getattr(args, "debug", False) or os.environ.get("OPENZAYA_DEBUG", "") not in ("", "0")
    try:
        return args.func(args) or 0
    except BrokenPipeError:          # `openzaya envs list | head`: the reader left; no traceback, no error line
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{cmd}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug or not expected_error(e):
            raise
        print(f"{cmd}: error: {error_message(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
