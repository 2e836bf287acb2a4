"""The speedrun's report (runs/<name>/report.md) from its results dict alone, so a report can be rebuilt from
results.json without rerunning: per-stage wall / CPU time, held-out accuracy of single vs Markovian RSA with paired
standard errors, and the aggregator against copying a random shown candidate."""

from __future__ import annotations

from pathlib import Path

from .evaluate import paired_se

# bf16 vs fp32 pretraining (the precision twin): mean |loss difference| over the last 10 steps, nats/token; the
# overfit test's bar (tests/test_train.py BF16_LOSS_TOL). Measured on nano (issue 26): 0.0016 (final losses 0.6326
# fp32 vs 0.6318 bf16; the largest per-step difference over the 120 steps 0.0094).
PRECISION_TWIN_TOL = 0.01


def paired(x: dict, y: dict) -> tuple[float, float, int]:
    """(mean of y - x, its paired standard error, n) over the problem ids both per-problem dicts share."""
    ids = [i for i in y if i in x]
    a, b = [x[i] for i in ids], [y[i] for i in ids]
    return (sum(b) - sum(a)) / len(ids), paired_se(a, b), len(ids)


def aggregation_table(aggs: dict) -> list[str]:
    """Report lines on Markovian RSA's aggregation calls per stage (`evaluate.aggregation_diagnostics`); none when
    no stage has them."""
    if not any(aggs.values()):
        return []
    lines = ["", "Markovian RSA's aggregation calls (does the aggregator verify or only copy? "
             "`evaluate.aggregation_diagnostics`): accuracy next to what copying a random shown candidate would "
             "score, their difference averaged per problem with its standard error over problems, and accuracy by "
             "the number of correct candidates shown.", "",
             "| after | calls | accuracy | random copy | accuracy - random copy (problems) | 0 correct shown | 1 | 2+ | "
             "keeps agreeing answer |", "|---|---|---|---|---|---|---|---|---|"]
    for stage, a in aggs.items():
        if not a:
            continue
        groups = [[], [], []]                          # 0, 1, 2+ correct candidates shown: (calls, accuracy)
        for k, v in a["by_correct_shown"].items():
            groups[min(int(k), 2)].append((v["calls"], v["accuracy"]))
        cells = [f"{sum(n * acc for n, acc in g) / sum(n for n, _ in g):.2f}" if g else "-" for g in groups]
        keep = "-" if a["keeps_agreeing_answer"] is None else f"{a['keeps_agreeing_answer']:.2f}"
        lines.append(f"| {stage} | {a['calls']} | {a['accuracy']:.3f} | {a['random_copy']:.3f} | "
                     f"{a['minus_copy']:+.3f} ± {a['minus_copy_se']:.3f} ({a['problems']}) | "
                     + " | ".join(cells) + f" | {keep} |")
    return lines


def phase_table(r: dict) -> list[str]:
    """Report lines: wall time, CPU seconds (this process and its finished children) and the 1-minute load average
    at the end of every stage; on a shared machine the CPU seconds are the comparable figure."""
    lines = ["| stage | wall s | CPU s | load avg |", "|---|---|---|---|"]
    for k, v in r["timings_s"].items():
        lines.append(f"| {k} | {v:.0f} | {r['cpu_s'].get(k, float('nan')):.0f} | {r['load'].get(k, float('nan')):.1f} |")
    return lines + [f"| **total** | **{r['wall_s']:.0f}** | {sum(r['cpu_s'].values()):.0f} | |"]


def accuracy_table(r: dict) -> list[str]:
    """Report lines: single and Markovian RSA after every stage with standard errors; differences paired on the
    problems both rows share (n next to each)."""
    ev = r["evals"]
    base = ev["sft"]
    lines = ["| after | single (problems x runs) | markovian_rsa (problems) | RSA - single | RSA pop mean - single | "
             "vs SFT (single) | vs SFT (RSA) | decode tokens single / RSA |", "|---|---|---|---|---|---|---|---|"]
    fmt = lambda d: f"{d[0]:+.3f} ± {d[1]:.3f} (n {d[2]})"   # noqa: E731
    for stage, e in ev.items():
        s, m = e["single"], e.get("markovian_rsa")
        cells = [f"{s['accuracy']:.3f} ± {s['se']:.3f} ({s['n']} x {s['runs']})"]
        if m:
            cells += [f"{m['accuracy']:.3f} ± {m['se']:.3f} ({m['n']})", fmt(paired(s["correct"], m["correct"])),
                      fmt(paired(s["correct"], m["pop_correct"]))]
        else:
            cells += ["-", "-", "-"]
        cells.append("" if stage == "sft" else fmt(paired(base["single"]["correct"], s["correct"])))
        cells.append(fmt(paired(base["markovian_rsa"]["correct"], m["correct"])) if m and stage != "sft" else "")
        cells.append(f"{s['completion_tokens_per_problem']:.0f} / "
                     + (f"{m['completion_tokens_per_problem']:.0f}" if m else "-"))
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    lines += ["", "Per env and difficulty (single / markovian_rsa):", "",
              "| cell | " + " | ".join(ev) + " |", "|---|" + "---|" * len(ev)]
    for cell in base["single"]["cells"]:
        lines.append(f"| {cell} | " + " | ".join(
            f"{e['single']['cells'][cell]:.2f} / " + (f"{e['markovian_rsa']['cells'][cell]:.2f}"
                                                      if "markovian_rsa" in e else "-") for e in ev.values()) + " |")
    return lines


def write_report(path: Path, r: dict):
    """report.md from a speedrun's results dict (results.json; `rebuild` reads it back)."""
    c = r["config"]
    ev = r["evals"]
    n = ev["sft"]["single"]["n"]
    lines = [f"# Speedrun `{c['name']}`", "",
             f"Wall time **{r['wall_s']:.0f} s**; per stage (CPU seconds and the load average tell how busy the "
             f"machine was):", "", *phase_table(r), "",
             f"Corpus: {r['corpus_samples']} solver-trace samples from {len(c['envs'])} environments at difficulties "
             f"{c['difficulties']}, plus {r['aggregation_samples']} aggregation chats in the SFT mix; tokenizer BPE "
             f"{c['vocab_size']}; pretrain {c['pretrain_steps']} steps (final loss {r['pretrain_final_loss']:.3f}), "
             f"SFT {c['sft_steps']} steps (final loss {r['sft_final_loss']:.3f}), {c['device_batch_size']} x "
             f"{c['seq_len']} tokens per step; model `{c['model_preset']}` ({r['model_params'] / 1e6:.2f}M parameters), "
             f"pretraining, SFT and evaluation on {r['device']} "
             + ("(RL on the CPU)." if r["device"] == "cpu" else "(RL too).")
             + f" Precision: pretraining, SFT and the RL policy update **{r['precision']}** "
             f"(`mixed_precision={c['mixed_precision']}`), rollouts and evaluation fp32 (engine).", ""]
    a = r.get("agg_sft")
    if a:
        lines += [f"Aggregation SFT (TR §VI-B; the held-out row `sft` is after it): the SFT model sampled "
                  f"{c['agg_sft_rollouts']} rollouts of each of {a['problems']} fresh training problems (accuracy "
                  f"{a['rollout_accuracy']:.3f}); {a['chats']} aggregation prompts of C={c['ttc_candidates']} of their "
                  f"tau={c['ttc_tail_tokens']}-token tails ({a['identical_tails_shown']:.0%} show identical tails) with "
                  f"the env solver's trace as target, mixed 1:1 with the SFT mix, {c['agg_sft_steps']} steps at lr "
                  f"{c['agg_sft_lr']:g} (final loss {a['final_loss']:.3f}).", ""]
    lines += ["![loss curves](loss.png)", ""]
    tw = r.get("precision_twin")
    if tw:
        verdict = "within" if tw["mean_abs_diff_last10"] <= PRECISION_TWIN_TOL else "NOT within"
        lines += [f"Precision twin: the same pretraining run in {tw['precision']} (a child process beside the "
                  f"{tw['main_precision']} run, same data, seed and steps; both curves above): final loss "
                  f"{tw['final_loss']:.4f} vs {tw['main_final_loss']:.4f}, mean |difference| over the last 10 steps "
                  f"{tw['mean_abs_diff_last10']:.4f} nats/token, {verdict} the tolerance {PRECISION_TWIN_TOL} "
                  f"(bf16 autocast with fp32 master weights should reach the fp32 loss).", ""]
    elif "precision_twin" in r:
        lines += ["Precision twin: not run (off, or this device has no native bf16 matmuls).", ""]
    if r["rl_notes"]:
        lines += ["## RL stages", "", f"{c['rl_prompts_per_step']} prompts x {c['rl_samples_per_prompt']} samples "
                  f"per step, {c['rl_max_new_tokens']} new tokens, up to {c['rl_steps']} steps per stage.", ""]
        lines += [f"- **{k}**: {v}" for k, v in r["rl_notes"].items()]
        lines += ["", "![RL reward per stage](rl_reward.png)" if (path.parent / "rl_reward.png").exists() else "", ""]
    lines += [f"## Held-out accuracy ({n} problems: {c['eval_problems']} per env and difficulty over "
              f"{', '.join(c['eval_envs'])} at difficulties {c['difficulties']}, seeds >= 10000)", "",
              f"`single` = one sample, averaged over {c['eval_single_samples']} runs per problem (avg@k) after SFT and "
              f"after the last RL stage, once on the first {c['eval_mid_problems']} problems per cell between RL "
              f"stages; `markovian_rsa` (first {c['eval_rsa_problems']} problems per cell) = N={c['ttc_population']}, "
              f"C={c['ttc_candidates']}, T={c['ttc_rounds']}, tau={c['ttc_tail_tokens']}, beta={c['eval_max_tokens']} "
              f"(answer = majority of the final population; `RSA pop mean` = mean correctness over the final "
              f"population, the number the ZAYA1 TR reports); both at temperature {c['eval_temperature']} and beta "
              "tokens per call. ± = standard error over problems; differences are paired over the problems both "
              "sides share (n) and carry the paired standard error.", "", *accuracy_table(r)]
    lines += aggregation_table({stage: e["markovian_rsa"].get("aggregation") for stage, e in ev.items()
                                if "markovian_rsa" in e})
    lines += ["", "Traces and per-method reports: `eval/<stage>/`.", ""]
    if r["ablation"]:
        lines += [f"## Ablation: answer-preserving trimming vs plain truncation (SFT at {c['ablation_seq_len']} "
                  f"tokens, {c['ablation_steps']} steps; greedy single sample)", "",
                  "| trimming | final loss | mean accuracy |", "|---|---|---|"]
        for k, v in r["ablation"].items():
            lines.append(f"| {k} | {v['final_loss']:.3f} | {v['mean_accuracy']:.3f} |")
        lines.append("")
    path.write_text("\n".join(lines))


def rebuild(run_dir: str | Path) -> Path:
    """Rewrite <run_dir>/report.md from its results.json (the plots are already there), the aggregation diagnostics
    recomputed from the Markovian RSA traces under eval/<stage>/ (so an older run gets today's columns)."""
    import json

    from .evaluate import aggregation_diagnostics
    run_dir = Path(run_dir)
    r = json.loads((run_dir / "results.json").read_text())
    for stage, e in r["evals"].items():
        trace = run_dir / "eval" / stage / "markovian_rsa" / "trace_markovian_rsa.jsonl"
        if "markovian_rsa" in e and trace.exists():
            e["markovian_rsa"]["aggregation"] = aggregation_diagnostics(trace)
    write_report(run_dir / "report.md", r)
    return run_dir / "report.md"
