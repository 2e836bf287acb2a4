"""openzaya/runlog.py: durations and ETAs, the speedrun's stage clock, the optional metric sinks, the plots.
Run: .venv/bin/python -m pytest tests/test_runlog.py"""

import json

import pytest

from openzaya.runlog import StageClock, eta_s, external_logger, fmt_eta, fmt_s, plot_losses, plot_rl_rewards


def test_durations_and_eta():
    assert [fmt_s(x) for x in (0, 42.4, 60, 185, 3600 + 125)] == ["0s", "42s", "1m00s", "3m05s", "1h02m"]
    assert eta_s(30.0, 3, 7) == 70.0 and eta_s(5.0, 0, 7) is None
    assert fmt_eta(30.0, 3, 7) == "1m10s" and fmt_eta(1.0, 0, 3) == "?"


def test_stage_clock_prints_stage_k_of_n_with_elapsed_and_eta(capsys):
    now, cpu, load = [0.0], [100.0], [2.5]
    clock = StageClock({"corpus": 1.0, "train": 3.0, "eval": 1.0, "rl": 5.0}, clock=lambda: now[0],
                       cpu=lambda: cpu[0], load=lambda: load[0])
    now[0], cpu[0] = 10.0, 107.0
    clock("corpus")
    now[0], cpu[0], load[0] = 40.0, 157.0, 4.0
    clock.skip("eval")          # e.g. an RL stage without learning signal: no evaluation after it
    clock("train")
    out = capsys.readouterr().out.splitlines()
    assert out == ["[speedrun] stage 1/4: corpus | elapsed 0s | eta ?",
                   "[speedrun] corpus: 10s, 7 CPU s, load 2.5 (total 10s)",
                   "[speedrun] stage 2/4: train | elapsed 10s | eta 1m30s",      # 10 s per unit x (3 + 1 + 5)
                   "[speedrun] train: 30s, 50 CPU s, load 4.0 (total 40s)",
                   "[speedrun] stage 3/3: rl | elapsed 40s | eta 50s"]            # 40 s / 4 units x 5
    assert clock.timings == {"corpus": 10.0, "train": 30.0}
    assert clock.cpu_s == {"corpus": 7.0, "train": 50.0} and clock.load == {"corpus": 2.5, "train": 4.0}


def test_cpu_seconds_counts_waited_children():
    import subprocess
    import sys

    from openzaya.runlog import cpu_seconds
    before = cpu_seconds()
    subprocess.run([sys.executable, "-c", "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass"],
                   check=True)
    assert cpu_seconds() - before >= 0.3


def test_external_logger_logs_numbers_only(tmp_path):
    log = external_logger("tensorboard", tmp_path, "warmup", {})
    log({"step": 1, "reward": 0.5, "stage": "warmup", "versions": [0, 1], "difficulty": {"gcd": 2}, "ok": True})
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    external_logger("", tmp_path, "x", {})({"step": 1})                    # off: a no-op
    with pytest.raises(ValueError, match="--log-to must be"):
        external_logger("csv", tmp_path, "x", {})


def test_plots_from_metrics(tmp_path):
    m = tmp_path / "metrics.jsonl"
    m.write_text("".join(json.dumps({"step": s, "loss": 3.0 / s, "reward": s / 10, "acc": s / 20}) + "\n"
                         for s in range(1, 6)) + '{"step": 6, "lo')       # a torn last line (killed run)
    plot_losses({"sft": m}, tmp_path / "loss.png")
    plot_rl_rewards({"warmup": [json.loads(x) for x in m.read_text().splitlines()[:5]]}, tmp_path / "reward.png")
    assert (tmp_path / "loss.png").stat().st_size > 0 and (tmp_path / "reward.png").stat().st_size > 0
