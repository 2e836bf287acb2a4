"""`openzaya speedrun --preset nano`: corpus -> tokenizer -> pretrain -> SFT -> held-out evaluation -> report.

The whole pipeline at nano scale on a CPU, in about ten minutes on an idle 2-core machine. The environments are
the easiest of our own (difficulty 0-1 of a handful of arithmetic and string tasks, NANO_ENVS) so that a ~1M-parameter
model trained for a few hundred steps gets measurably above zero; held-out problems use seeds >= HELD_OUT_SEED_START.
`--ablation-trim` adds two extra SFT runs at a tight context budget (answer-preserving trimming vs plain truncation)
and reports both, whatever they show.
Simplified: no midtraining stage, no aggregation data in the nano SFT mix, single greedy sample per problem.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

NANO_ENVS = ["long_addition", "digit_sum", "reverse_string", "sort_letters", "palindrome_check",
             "boolean_expression", "count_vowels", "integer_power"]


@dataclass
class SpeedrunConfig:
    name: str = "nano"
    envs: list[str] = field(default_factory=lambda: list(NANO_ENVS))
    difficulties: list[int] = field(default_factory=lambda: [0, 1])
    samples_per_env_level: int = 800
    vocab_size: int = 512
    seq_len: int = 128
    device_batch_size: int = 32
    pretrain_steps: int = 120
    sft_steps: int = 240
    lr: float = 3e-3
    eval_problems: int = 25            # per environment and difficulty, held-out seeds
    eval_max_tokens: int = 64
    ablation_trim: bool = False
    ablation_seq_len: int = 64         # tight budget: most samples (77-101 tokens) must be trimmed
    ablation_steps: int = 120
    threads: int = 1
    seed: int = 0


def nano(**kw) -> SpeedrunConfig:
    return SpeedrunConfig(**kw)


def smoke(**kw) -> SpeedrunConfig:
    """Minutes-free check of the plumbing (tests): tiny corpus and step counts."""
    return SpeedrunConfig(**{**dict(name="smoke", envs=["long_addition", "reverse_string"], difficulties=[0],
                                    samples_per_env_level=60, vocab_size=300, pretrain_steps=3, sft_steps=3,
                                    device_batch_size=8, eval_problems=3, eval_max_tokens=16, ablation_steps=2),
                                 **kw})


PRESETS = {"nano": nano, "smoke": smoke}


def evaluate_held_out(model_dir: str | Path, envs: list[str], difficulties: list[int], n: int, max_tokens: int,
                      seed0: int = 0) -> dict:
    """Greedy single-sample accuracy per env/difficulty on held-out seeds, through LocalBackend (our engine)."""
    from tqdm import tqdm

    from .backends import LocalBackend, Request, SamplingParams
    from .data import HELD_OUT_SEED_START
    from .envs.registry import get_env
    backend = LocalBackend(model_dir, max_slots=32, max_len=512)
    problems = [get_env(e).generate(d, HELD_OUT_SEED_START + seed0 + i)
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


def plot_losses(runs: dict[str, Path], out_png: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, metrics in runs.items():
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def run(cfg: SpeedrunConfig, root: str | Path = "runs") -> dict:
    import torch

    from .data import CorpusConfig, chat_segments, generate_corpus, load_corpus
    from .tokenizer import train_bpe
    from .train import TrainConfig
    from .train import run as train

    t0 = time.time()
    torch.set_num_threads(cfg.threads)
    out = Path(root) / cfg.name
    out.mkdir(parents=True, exist_ok=True)
    timings = {}

    # ---- 1. corpus from our solvers (held-out seeds excluded)
    corpus_dir = out / "corpus"
    manifest = generate_corpus(CorpusConfig(envs=cfg.envs, difficulties=cfg.difficulties,
                                            samples_per_env_level=cfg.samples_per_env_level, seed=cfg.seed),
                               corpus_dir)
    timings["corpus"] = time.time() - t0
    print(f"[speedrun] corpus: {manifest['samples']} samples in {timings['corpus']:.0f}s", flush=True)

    # ---- 2. tokenizer
    samples = load_corpus(corpus_dir)
    tok = train_bpe(["".join(s.text for s in chat_segments(x["messages"])) for x in samples], cfg.vocab_size)
    tok_dir = tok.save(out / "tokenizer")
    timings["tokenizer"] = time.time() - t0

    # ---- 3. pretrain, 4. SFT
    common = dict(data=str(corpus_dir), tokenizer=str(tok_dir), seq_len=cfg.seq_len,
                  tokens_per_step=cfg.device_batch_size * cfg.seq_len, device_batch_size=cfg.device_batch_size,
                  save_every=-1, threads=cfg.threads, seed=cfg.seed, lr=cfg.lr)
    pre = train(TrainConfig(stage="pretrain", out=str(out / "pretrain"), steps=cfg.pretrain_steps,
                            warmup_steps=min(20, cfg.pretrain_steps), schedule="wsd", **common))
    timings["pretrain"] = time.time() - t0
    sft_cfg = TrainConfig(stage="sft", out=str(out / "sft"), steps=cfg.sft_steps, init_from=pre["model_dir"],
                          warmup_steps=min(10, cfg.sft_steps), schedule="cosine", trim="ap", **common)
    sft = train(sft_cfg)
    timings["sft"] = time.time() - t0

    # ---- 5. held-out evaluation
    ev = evaluate_held_out(sft["model_dir"], cfg.envs, cfg.difficulties, cfg.eval_problems, cfg.eval_max_tokens)
    ev_pre = evaluate_held_out(pre["model_dir"], cfg.envs, cfg.difficulties[:1], min(cfg.eval_problems, 10),
                               cfg.eval_max_tokens)
    timings["eval"] = time.time() - t0

    # ---- optional: AP trimming vs plain truncation at a tight budget
    ablation = {}
    if cfg.ablation_trim:
        for trim in ("ap", "truncate"):
            a = train(replace(sft_cfg, out=str(out / f"ablation_{trim}"), trim=trim, seq_len=cfg.ablation_seq_len,
                              tokens_per_step=cfg.device_batch_size * cfg.ablation_seq_len, steps=cfg.ablation_steps))
            e = evaluate_held_out(a["model_dir"], cfg.envs, cfg.difficulties, cfg.eval_problems, cfg.eval_max_tokens)
            ablation[trim] = {"final_loss": a["final_loss"], "accuracy": e["accuracy"],
                              "mean_accuracy": sum(e["accuracy"].values()) / len(e["accuracy"])}
        timings["ablation"] = time.time() - t0

    # ---- 6. report
    curves = {"pretrain": out / "pretrain" / "metrics.jsonl", "sft": out / "sft" / "metrics.jsonl"}
    curves.update({f"ablation {k}": out / f"ablation_{k}" / "metrics.jsonl" for k in ablation})
    plot_losses(curves, out / "loss.png")
    wall = time.time() - t0
    result = {"wall_s": wall, "timings_s": timings, "accuracy": ev["accuracy"],
              "mean_accuracy": sum(ev["accuracy"].values()) / len(ev["accuracy"]),
              "pretrain_only_accuracy": ev_pre["accuracy"], "pretrain_final_loss": pre["final_loss"],
              "sft_final_loss": sft["final_loss"], "corpus_samples": manifest["samples"], "ablation": ablation,
              "config": cfg.__dict__}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    write_report(out / "report.md", result, ev["examples"])
    print(f"[speedrun] done in {wall:.0f}s; mean held-out accuracy {result['mean_accuracy']:.3f}; report at "
          f"{out / 'report.md'}", flush=True)
    return result


def write_report(path: Path, r: dict, examples: dict):
    c = r["config"]
    lines = [f"# Speedrun `{c['name']}`", "",
             f"Wall time **{r['wall_s']:.0f} s** (corpus {r['timings_s']['corpus']:.0f}s, then cumulative: "
             + ", ".join(f"{k} {v:.0f}s" for k, v in r["timings_s"].items() if k != "corpus") + ").",
             f"Corpus: {r['corpus_samples']} solver-trace samples from {len(c['envs'])} environments at difficulties "
             f"{c['difficulties']}; tokenizer BPE {c['vocab_size']}; pretrain {c['pretrain_steps']} steps "
             f"(final loss {r['pretrain_final_loss']:.3f}), SFT {c['sft_steps']} steps (final loss "
             f"{r['sft_final_loss']:.3f}), {c['device_batch_size']} x {c['seq_len']} tokens per step.", "",
             "![loss curves](loss.png)", "",
             f"## Held-out accuracy (greedy, single sample, {c['eval_problems']} problems per cell, seeds >= 10000)",
             "", "| env / difficulty | SFT | pretrain only (d0, 10 problems) |", "|---|---|---|"]
    for k, v in sorted(r["accuracy"].items()):
        pre = r["pretrain_only_accuracy"].get(k)
        lines.append(f"| {k} | {v:.2f} | {'' if pre is None else f'{pre:.2f}'} |")
    lines += ["", f"Mean over cells: **{r['mean_accuracy']:.3f}**.", ""]
    if r["ablation"]:
        lines += [f"## Ablation: answer-preserving trimming vs plain truncation (SFT at {c['ablation_seq_len']} "
                  f"tokens, {c['ablation_steps']} steps)", "", "| trimming | final loss | mean accuracy |",
                  "|---|---|---|"]
        for k, v in r["ablation"].items():
            lines.append(f"| {k} | {v['final_loss']:.3f} | {v['mean_accuracy']:.3f} |")
        lines.append("")
    lines += ["## One sample per environment", ""]
    for env, (prompt, text, answer) in sorted(examples.items()):
        lines += [f"**{env}** (reference `{answer}`)", "```", prompt.strip(), "--- model:", text.strip()[:400], "```", ""]
    path.write_text("\n".join(lines))


def main(a):
    cfg = PRESETS[a.preset]()
    over = {k: getattr(a, k) for k in ("name", "pretrain_steps", "sft_steps", "threads", "seed", "eval_problems")
            if getattr(a, k, None) is not None}
    if a.ablation_trim:
        over["ablation_trim"] = True
    cfg = replace(cfg, **over)
    run(cfg, a.root)
