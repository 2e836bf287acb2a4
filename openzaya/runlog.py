"""What a run tells about itself while it runs and after: the ETA of a loop or a pipeline, the optional TensorBoard /
W&B sink, and the loss and reward plots (from the logged metrics.jsonl, so a plot can be redrawn without rerunning).

Used by the trainer (pretrain / SFT), every RL stage and the speedrun, so a standalone run writes the same
`metrics.jsonl`, ETA field and plots as the speedrun's stages. The ETA is a linear extrapolation: the mean time of
the steps (or stage weights) done so far times what is left; the first step of a run (compilation, warm-up) makes
it pessimistic for a step or two.
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path
from typing import Callable

# ---------------------------------------------------------------------------------------------------------------------
# ETA


def fmt_s(seconds: float) -> str:
    """A duration as 42s, 3m05s or 1h02m."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def eta_s(elapsed_s: float, done: float, left: float) -> float | None:
    """Seconds left at the mean rate so far (done and left in the same unit: steps, or stage weights); None before
    anything is done."""
    return None if done <= 0 else elapsed_s / done * left


def fmt_eta(elapsed_s: float, done: float, left: float) -> str:
    eta = eta_s(elapsed_s, done, left)
    return "?" if eta is None else fmt_s(eta)


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its finished (waited-for) children, e.g. RL rollout
    workers. On a shared machine wall time moves with the other jobs' load; this is the work a stage did."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class StageClock:
    """Stage k of n of a pipeline with elapsed time and ETA. `weights` lists the planned stages in order with their
    expected relative cost; `lap(name)` ends a stage (prints its time, what is next, the ETA), `skip(name)` drops a
    planned stage that will not run. The ETA is elapsed / (weight done) x (weight left). Each lap also records the
    stage's CPU seconds (`cpu_seconds`) and the machine's 1-minute load average at its end, so a timing taken on a
    busy machine can be read against the load it ran under."""

    def __init__(self, weights: dict[str, float], prefix: str = "[speedrun]", clock: Callable[[], float] = time.time,
                 cpu: Callable[[], float] = cpu_seconds, load: Callable[[], float] = lambda: os.getloadavg()[0]):
        self.weights, self.prefix, self.clock, self.cpu, self.load_avg = dict(weights), prefix, clock, cpu, load
        self.t0 = clock()
        self.timings: dict[str, float] = {}
        self.cpu_s: dict[str, float] = {}
        self.load: dict[str, float] = {}
        self._cpu0 = cpu()
        self.skipped: set[str] = set()
        self._announce()

    def _left(self) -> list[str]:
        return [s for s in self.weights if s not in self.timings and s not in self.skipped]

    def _announce(self):
        left = self._left()
        if not left:
            return
        n = len(self.weights) - len(self.skipped)
        k = n - len(left) + 1
        elapsed = self.clock() - self.t0
        done = sum(self.weights[s] for s in self.timings if s in self.weights)
        print(f"{self.prefix} stage {k}/{n}: {left[0]} | elapsed {fmt_s(elapsed)} | eta "
              f"{fmt_eta(elapsed, done, sum(self.weights[s] for s in left))}", flush=True)

    def lap(self, name: str):
        self.timings[name] = self.clock() - self.t0 - sum(self.timings.values())
        self.cpu_s[name] = self.cpu() - self._cpu0 - sum(self.cpu_s.values())
        self.load[name] = self.load_avg()
        print(f"{self.prefix} {name}: {self.timings[name]:.0f}s, {self.cpu_s[name]:.0f} CPU s, load "
              f"{self.load[name]:.1f} (total {self.clock() - self.t0:.0f}s)", flush=True)
        self._announce()

    __call__ = lap

    def skip(self, name: str):
        self.skipped.add(name)


# ---------------------------------------------------------------------------------------------------------------------
# TensorBoard / W&B


def external_logger(log_to: str, out: Path, run_name: str, config: dict) -> Callable[[dict], None]:
    """Optional TensorBoard (out/tensorboard) or W&B sink for per-step metrics (metrics.jsonl is always written).
    Only numeric fields are logged, under `run_name/`; a row needs a "step"."""
    if not log_to:
        return lambda rec: None

    def scalars(rec):
        return {k: float(v) for k, v in rec.items()
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}

    if log_to == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError(f"--log-to tensorboard needs the tensorboard package (pip install tensorboard): {e}")
        writer = SummaryWriter(str(Path(out) / "tensorboard"))

        def log(rec):
            for k, v in scalars(rec).items():
                writer.add_scalar(f"{run_name}/{k}", v, rec["step"])
            writer.flush()
        return log
    if log_to == "wandb":
        try:
            import wandb
        except ImportError as e:
            raise ImportError(f"--log-to wandb needs the wandb package (pip install wandb): {e}")
        wandb.init(project="openzaya", name=f"{Path(out).name}-{run_name}", config=config, dir=str(out),
                   reinit=True)
        return lambda rec: wandb.log(scalars(rec), step=rec["step"])
    raise ValueError(f"--log-to must be '', 'tensorboard' or 'wandb', got {log_to!r}")


# ---------------------------------------------------------------------------------------------------------------------
# plots (matplotlib, Agg backend)


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl (a torn last line from a killed run is skipped)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_losses(runs: dict[str, Path], out_png: Path):
    """Loss per step of each training run (label -> its metrics.jsonl), log scale."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, metrics in runs.items():
        rows = read_metrics(metrics)
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def plot_rl_rewards(stages: dict[str, list[dict]], out_png: Path):
    """Mean reward per optimizer step, one panel per RL stage (the rollouts' reward, before filtering)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, max(len(stages), 1), figsize=(3.2 * max(len(stages), 1), 3), squeeze=False)
    for ax, (name, rows) in zip(axes[0], stages.items()):
        ax.plot([r["step"] for r in rows], [r["reward"] for r in rows], marker=".", label="reward")
        ax.plot([r["step"] for r in rows], [r["acc"] for r in rows], alpha=0.6, label="accuracy")
        ax.set_title(name)
        ax.set_xlabel("RL step")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
