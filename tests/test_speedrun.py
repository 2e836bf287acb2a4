"""The speedrun's own pieces (aggregation SFT chats, standard errors, held-out items) and, slow, the smoke run with
the RL stages."""

import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from openzaya import speedrun
from openzaya.data import aggregation_sft_samples
from openzaya.envs.registry import get_env
from openzaya.parallel import native_bf16


def test_aggregation_sft_samples_use_template_and_keep_target():
    env = get_env("digit_sum")
    problems = [env.generate(1, s) for s in range(6)]
    out = aggregation_sft_samples(problems, None, C=2, tau=3, template=speedrun.NANO_AGG_TEMPLATE, seed=0)
    assert len(out) == 6
    for p, x in zip(problems, out):
        user, asst = x["messages"]
        assert user["content"].startswith(p.prompt) and "Candidate 2" in user["content"]
        assert user["content"].endswith("Check the candidates and solve it.")
        assert f"\\boxed{{{p.answer}}}" in asst["content"] and x["seed"] < 10_000


def test_self_aggregation_samples_show_the_models_own_tails(tmp_path):
    """Aggregation SFT chats (TR §VI-B): the C tails shown are tails of the model's own rollouts of that problem (the
    same seeded samples regenerated here), the target is the solver trace."""
    from test_local_backend import make_checkpoint

    from openzaya.backends import LocalBackend, Request, SamplingParams
    model_dir = make_checkpoint(tmp_path / "m")
    env = get_env("digit_sum")
    problems = [env.generate(0, s) for s in range(3)]
    cfg = speedrun.smoke(agg_sft_rollouts=3, agg_sft_chats_per_problem=2, ttc_candidates=2, ttc_tail_tokens=4,
                         eval_max_tokens=10)
    chats, stats = speedrun.self_aggregation_samples(model_dir, problems, cfg, seed=5)
    assert len(chats) == 6 and stats["rollouts"] == 9 and stats["chats"] == 6
    backend = LocalBackend(model_dir, max_slots=8, max_len=128)
    for i, p in enumerate(problems):
        again = backend.generate([Request(messages=[{"role": "user", "content": p.prompt}],
                                          params=SamplingParams(temperature=cfg.eval_temperature, max_tokens=10, n=3,
                                                                seed=5 * 1_000_003 + i))])[0]
        tails = [backend.tail_tokens(c.reasoning, 4) for c in again]
        for x in chats[2 * i: 2 * i + 2]:
            user, asst = x["messages"]
            shown = [blk.split("\n", 1)[1].rsplit("\n\n", 1)[0]
                     for blk in user["content"].split("---- Candidate ")[1:]]
            assert len(shown) == 2 and all(t in tails for t in shown), (shown, tails)
            assert user["content"].startswith(p.prompt)
            assert f"\\boxed{{{p.answer}}}" in asst["content"] and x["kind"] == "self_aggregation"
    cfg.agg_sft_rollouts = 1
    with pytest.raises(ValueError, match="too few tails"):
        speedrun.self_aggregation_samples(model_dir, problems, cfg)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_device_without_cuda_fails_before_any_work(tmp_path):
    """--device cuda where torch sees no GPU: a clear error before the run directory (and a previous run's
    evaluation in it) is touched."""
    (tmp_path / "smoke" / "eval").mkdir(parents=True)
    (tmp_path / "smoke" / "eval" / "kept.json").write_text("{}")
    with pytest.raises(ValueError, match="no CUDA device"):
        speedrun.run(speedrun.smoke(device="cuda"), tmp_path)
    assert (tmp_path / "smoke" / "eval" / "kept.json").exists()
    assert sorted(p.name for p in (tmp_path / "smoke").iterdir()) == ["eval"]
    assert speedrun.resolve_device("auto") == "cpu" and speedrun.resolve_device("cuda:1") == "cuda:1"


def test_small_preset_is_what_its_docstring_says():
    """The GPU preset: the micro model (27.0M parameters vs nano's 1.13M at the 512-token vocabulary), 5.4x nano's
    pretraining + SFT tokens, RL off; the CLI accepts it."""
    from openzaya import model as M
    from openzaya.cli import build_parser
    n, s = speedrun.nano(), speedrun.small()
    tokens = lambda c: (c.pretrain_steps + c.sft_steps) * c.device_batch_size * c.seq_len
    params = lambda c: M.count_params(M.PRESETS[c.model_preset](c.vocab_size))["total"] / 1e6
    assert s.model_preset == "micro" and n.model_preset == "nano" and not s.rl
    assert round(tokens(s) / 1e6, 1) == 10.6 and round(tokens(n) / 1e6, 1) == 2.0
    assert round(params(s), 1) == 27.0 and round(params(n), 2) == 1.13
    a = build_parser().parse_args(["speedrun", "--preset", "small", "--device", "cpu"])
    assert a.preset == "small" and a.device == "cpu"


def test_mini_preset_is_what_its_docstring_says():
    """The ~20-minute CPU preset: nano's pipeline and steps (but the 240 SFT steps it was measured with) on the mini
    model (2.37M parameters, 2.1x nano's), Markovian RSA on 48 problems per cell; the CLI accepts it."""
    from openzaya import model as M
    from openzaya.cli import build_parser
    n, m = speedrun.nano(), speedrun.mini()
    params = lambda c: M.count_params(M.PRESETS[c.model_preset](c.vocab_size))["total"] / 1e6
    assert m.model_preset == "mini" and round(params(m), 2) == 2.37 and round(params(m) / params(n), 1) == 2.1
    assert m.eval_rsa_problems == 48 and n.eval_rsa_problems == 24
    assert (m.sft_steps, n.sft_steps, m.rl_steps, n.rl_steps) == (240, 360, 20, 16)       # mini: as measured
    assert replace(m, name="nano", model_preset="nano", eval_rsa_problems=24, sft_steps=360, rl_steps=16) == n
    assert build_parser().parse_args(["speedrun", "--preset", "mini"]).preset == "mini"


def test_aggregation_table_shows_the_aggregator_against_random_copy():
    from openzaya.speedrun_report import aggregation_table
    a = {"calls": 8, "accuracy": 0.5, "random_copy": 0.25, "minus_copy": 0.25, "minus_copy_se": 0.1, "problems": 2,
         "keeps_agreeing_answer": None, "by_correct_shown": {0: {"calls": 4, "accuracy": 0.25},
                                                            2: {"calls": 4, "accuracy": 0.75}}}
    lines = aggregation_table({"sft": a, "warmup": None})
    assert lines[-1] == "| sft | 8 | 0.500 | 0.250 | +0.250 ± 0.100 (2) | 0.25 | - | 0.75 | - |"
    assert aggregation_table({"sft": None}) == []


def test_stage_plan_names_the_stages_run_goes_through():
    plan = speedrun.stage_plan(speedrun.smoke())
    assert list(plan) == ["corpus", "tokenizer", "pretrain", "precision twin", "sft", "aggregation sft", "eval sft",
                          "rl warmup", "eval warmup", "rl rlve", "eval rlve", "rl math-code-ttc", "eval math-code-ttc",
                          "rl behavioral", "eval behavioral"]
    assert list(speedrun.stage_plan(speedrun.smoke(rl=False, ablation_trim=True)))[-2:] == ["eval sft", "ablation"]
    assert "precision twin" not in speedrun.stage_plan(speedrun.smoke(precision_twin=False))
    assert all(w > 0 for w in plan.values())


def test_threads_alone_and_restored(monkeypatch):
    """SFT and the full evaluations take `threads_alone` (0 = OMP_NUM_THREADS, else the CPUs this process may use);
    torch_threads restores the caller's count, also after an error."""
    import os
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert speedrun.alone_threads(speedrun.nano()) == cpus
    assert speedrun.alone_threads(speedrun.nano(threads_alone=3)) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert speedrun.alone_threads(speedrun.nano()) == 5
    before = torch.get_num_threads()
    with speedrun.torch_threads(before + 1):
        assert torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), speedrun.torch_threads(before + 2):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before


def test_log_to_reaches_every_training_and_rl_stage():
    from dataclasses import replace

    from openzaya.cli import build_parser

    a = build_parser().parse_args(["speedrun", "--preset", "smoke", "--log-to", "tensorboard"])
    assert a.log_to == "tensorboard"
    cfg = replace(speedrun.smoke(), log_to=a.log_to)
    assert speedrun.train_settings(cfg, Path("tok"), "cpu")["log_to"] == "tensorboard"
    assert all(speedrun.rl_stage_config(cfg, Path("runs/x"), s).log_to == "tensorboard" for s in cfg.rl_stages)
    assert build_parser().parse_args(["rl", "--log-to", "wandb"]).log_to == "wandb"


def test_standard_errors():
    assert speedrun.mean_se([0.0, 1.0] * 50) == pytest.approx(0.5 / 99 ** 0.5)   # sample sd 0.5025, / sqrt(100)
    assert speedrun.mean_se([1.0] * 10) == 0.0
    assert speedrun.mean_se([0.25, 0.75]) == pytest.approx(0.25)
    a, b = [0, 1, 0, 1], [1, 1, 0, 1]
    assert speedrun.paired_se(a, b) == pytest.approx(0.25)   # diffs 1,0,0,0: sd 0.5, / sqrt(4)


def test_held_out_items_score_with_env_checker():
    items = speedrun.held_out_items(["reverse_string"], [0], 2)
    assert [it.id for it in items] == ["reverse_string-d0-0", "reverse_string-d0-1"]
    assert items[0].score(f"</think> \\boxed{{{items[0].answer}}}") == 1.0
    assert items[0].score("</think> \\boxed{zzzzzz}") == 0.0


@pytest.mark.slow
def test_speedrun_smoke_with_rl(tmp_path):
    """The smoke preset end to end with the four RL stages (each stops for lack of signal and is reported), then
    `--no-rl` skips them."""
    cmd = [sys.executable, "-m", "openzaya.cli", "speedrun", "--preset", "smoke", "--root", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    # stage k/n with elapsed and ETA; a stage that stops for lack of signal drops its evaluation from the plan
    stages = re.findall(r"^\[speedrun\] stage (\d+)/(\d+): (.+?) \| elapsed \S+ \| eta \S+$", r.stdout, flags=re.M)
    assert stages[0] == ("1", "15", "corpus") and [int(k) for k, _, _ in stages] == list(range(1, len(stages) + 1))
    assert stages[-1][2] == "rl behavioral" and [int(n) for _, n, _ in stages] == sorted(
        (int(n) for _, n, _ in stages), reverse=True), stages        # n shrinks as stages stop; k counts up
    # the README's commands read these paths after `make run` (tests/test_readme.py fakes them; the smoke model's
    # RL stages stop without signal, so their checkpoints are checked from the stage config instead)
    from test_readme import SPEEDRUN_OUTPUTS
    for p in SPEEDRUN_OUTPUTS:
        if "/rl/" in p:
            stage = p.split("/rl/")[1].split("/")[0]
            assert f"{speedrun.rl_stage_config(speedrun.nano(), Path('runs/nano'), stage).out}/ckpt/model" == p
        else:
            assert (tmp_path / "smoke" / p.removeprefix("runs/nano/")).exists(), p
    report = (tmp_path / "smoke" / "report.md").read_text()
    assert "## RL stages" in report and "markovian_rsa" in report and "behavioral" in report
    assert "| after | calls | accuracy | random copy |" in report and "\n| sft | 16 | " in report   # 4 problems x N 4
    # the precision twin: the same pretraining in the other precision, beside it, where bf16 is native
    twin = json.loads((tmp_path / "smoke" / "results.json").read_text())["precision_twin"]
    if native_bf16(torch.device("cpu")):
        twin_rows = (tmp_path / "smoke" / "pretrain_twin" / "metrics.jsonl").read_text().splitlines()
        assert (twin["precision"], twin["main_precision"], len(twin_rows)) == ("bf16", "fp32", 3)
        assert "Precision twin: the same pretraining run in bf16" in report
    else:
        assert twin is None and "Precision twin: not run" in report
    r = subprocess.run(cmd + ["--no-rl", "--name", "smoke_norl", "--no-precision-twin"], capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    report = (tmp_path / "smoke_norl" / "report.md").read_text()
    assert "## RL stages" not in report and "| sft |" in report
    assert "Precision twin: not run" in report and not (tmp_path / "smoke_norl" / "pretrain_twin").exists()
