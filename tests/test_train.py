"""The trainer (openzaya/train.py): loss goes down, SIGKILL + --resume equals an uninterrupted run, a 2-process gloo
job equals a 1-process job with the same global batch, bad inputs fail early.
Run: .venv/bin/python -m pytest tests/test_train.py"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from openzaya.data import CorpusConfig, chat_segments, generate_corpus, load_corpus
from openzaya.tokenizer import train_bpe
from openzaya.train import TrainConfig, batch_plan, lr_multiplier, run

VENV = Path(sys.executable).parent
BF16_LOSS_TOL = 0.01    # |bf16 - fp32| training loss over the last 10 of 60 overfitting steps (measured 1.3e-3)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    tiny_tokenizer(tiny_corpus(root / "corpus")).save(root / "tok")
    return root


def tiny_corpus(path: Path, samples_per_env_level: int = 40, seed: int = 0) -> list[dict]:
    """The tests' training data: solver traces of two environments at difficulty 0, written to `path` and read back."""
    generate_corpus(CorpusConfig(envs=["long_addition", "reverse_string"], difficulties=[0],
                                 samples_per_env_level=samples_per_env_level, seed=seed, workers=1), path, progress=False)
    return load_corpus(path)


def tiny_tokenizer(samples: list[dict]):
    """A 300-token BPE trained on the samples' chat text."""
    return train_bpe(["".join(s.text for s in chat_segments(x["messages"])) for x in samples], 300)


def flags(corpus, out, steps, extra=()):
    return ["--data", str(corpus / "corpus"), "--tokenizer", str(corpus / "tok"), "--out", str(out),
            "--steps", str(steps), "--seq-len", "96", "--tokens-per-step", str(8 * 96), "--device-batch-size", "4",
            "--warmup-steps", "2", "--threads", "1", "--lr", "3e-3", *extra]


def losses(out):
    return {r["step"]: r["loss"] for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines())}


def cli(args, **kw):
    return subprocess.run([str(VENV / "openzaya"), *args], env=ENV, capture_output=True, text=True, timeout=180, **kw)


def test_loss_goes_down_and_schedule(corpus, tmp_path, capsys):
    torch.set_num_threads(1)
    cfg = TrainConfig(stage="sft", data=str(corpus / "corpus"), tokenizer=str(corpus / "tok"), out=str(tmp_path),
                      seq_len=96, tokens_per_step=8 * 96, device_batch_size=8, steps=25, warmup_steps=3, lr=3e-3,
                      save_every=-1, log_to="tensorboard")
    r = run(cfg)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*")), "no TensorBoard event file"
    steps = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert len(steps) == 25 and all(" | eta " in line for line in steps) and steps[-1].endswith("| eta 0s")
    ls = losses(tmp_path)
    assert ls[25] < 0.7 * ls[1], ls
    assert (tmp_path / "model" / "config.json").exists() and (tmp_path / "model" / "tokenizer.json").exists()
    assert r["final_loss"] == ls[25]
    # schedules: warmup reaches 1, cosine ends at final_lr_frac, WSD is flat then decays
    c = TrainConfig(steps=100, warmup_steps=10, final_lr_frac=0.1)
    assert lr_multiplier(9, c) == 1.0 and abs(lr_multiplier(100, c) - 0.1) < 1e-9
    w = TrainConfig(steps=100, warmup_steps=10, schedule="wsd", wsd_decay_frac=0.2)
    assert lr_multiplier(50, w) == 1.0 and lr_multiplier(90, w) < 1.0


def test_length_grouped_batches_and_padding_cut_keep_the_loss(corpus):
    """Length grouping (TrainConfig.length_group_batches): every window still comes once per epoch, a batch holds
    windows of one sorted chunk (so its lengths are a contiguous run of the chunk's sorted lengths); cutting the
    trailing all-padding columns of a micro-batch leaves every window's target log-probs unchanged."""
    from openzaya.model import ZayaForCausalLM, nano
    from openzaya.tokenizer import Tokenizer
    from openzaya.train import cut_padding, prepare_windows, step_indices
    cfg = TrainConfig(stage="sft", data=str(corpus / "corpus"), tokenizer=str(corpus / "tok"), seq_len=96)
    ids_W, seg_W, labels_W, _ = prepare_windows(cfg, Tokenizer.load(cfg.tokenizer))
    used_W = (seg_W >= 0).sum(1)
    n, seqs, k = ids_W.shape[0], 4, 3
    assert n >= 2 * k * seqs and len(set(used_W.tolist())) > seqs    # several chunks, many lengths
    epoch = [i for step in range(n // seqs) for i in step_indices(step, n, seqs, 0, used_W, k)]
    assert len(set(epoch)) == len(epoch) == n // seqs * seqs          # no window twice within the epoch
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    for c in range(0, n // (k * seqs) * k * seqs, k * seqs):        # full chunks: each batch a run of sorted lengths
        chunk_lengths = sorted(used_W[perm[c:c + k * seqs]].tolist(), reverse=True)
        for b in range(c // seqs, c // seqs + k):
            got = sorted(used_W[epoch[b * seqs:(b + 1) * seqs]].tolist(), reverse=True)
            assert any(chunk_lengths[j:j + seqs] == got for j in range(0, k * seqs, seqs)), (got, chunk_lengths)
    assert epoch != [i for step in range(n // seqs) for i in step_indices(step, n, seqs, 0)]   # grouping changed it
    # the cut: shortest batch of the epoch, same log-probs on every real target
    b = min(range(n // seqs), key=lambda j: int(used_W[epoch[j * seqs:(j + 1) * seqs]].max()))
    idx = epoch[b * seqs:(b + 1) * seqs]
    ids, seg, labels = ids_W[idx], seg_W[idx], labels_W[idx]
    cids, cseg, clabels = cut_padding(ids, seg, labels)
    assert cids.shape[1] == int(used_W[idx].max()) < ids.shape[1] and clabels.shape[1] == cids.shape[1] - 1
    assert (labels[:, clabels.shape[1]:] == -100).all()              # nothing cut had a target
    torch.manual_seed(0)
    m = ZayaForCausalLM(nano(300)).eval()
    with torch.no_grad():
        full = m.token_logprobs(ids[:, :-1], labels, segment_ids_BT=seg[:, :-1])
        cut = m.token_logprobs(cids[:, :-1], clabels, segment_ids_BT=cseg[:, :-1])
    torch.testing.assert_close(cut, full[:, :cut.shape[1]], rtol=0, atol=1e-5)
    assert full[:, cut.shape[1]:].abs().max() == 0


def test_resume_after_sigkill_matches(corpus, tmp_path):
    steps = 10
    full = cli(["sft", *flags(corpus, tmp_path / "full", steps, ["--save-every", "2"])])
    assert full.returncode == 0, full.stderr[-2000:]
    assert (tmp_path / "full" / "loss.png").stat().st_size > 0          # a standalone run plots its loss curve
    out = tmp_path / "killed"
    proc = subprocess.Popen([str(VENV / "openzaya"), "sft", *flags(corpus, out, steps, ["--save-every", "2"])],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        m = out / "metrics.jsonl"
        if m.exists() and len(m.read_text().splitlines()) >= 5 and (out / "checkpoint").exists():
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(losses(out))
    assert killed_at < steps, "the run finished before it was killed"
    res = cli(["sft", *flags(corpus, out, steps, ["--save-every", "2", "--resume"])])
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resumed from" in res.stdout
    a, b = losses(tmp_path / "full"), losses(out)
    assert sorted(b) == list(range(1, steps + 1))
    for s in range(1, steps + 1):
        assert abs(a[s] - b[s]) <= 1e-6, (s, a[s], b[s])


def test_bf16_autocast_overfits_to_the_fp32_loss(corpus, tmp_path):
    """Mixed precision (bf16 autocast, fp32 master weights): the trainer overfits the tiny corpus (many epochs) to
    the same loss as fp32, within BF16_LOSS_TOL, and `auto` resolves by the device (bf16 on CUDA and on CPUs with
    native bf16 matmuls)."""
    from openzaya.parallel import native_bf16, resolve_precision
    torch.set_num_threads(1)
    base = dict(stage="sft", data=str(corpus / "corpus"), tokenizer=str(corpus / "tok"), seq_len=96,
                tokens_per_step=8 * 96, device_batch_size=8, steps=60, warmup_steps=3, lr=3e-3, save_every=-1,
                device="cpu")
    r = {prec: run(TrainConfig(**base, out=str(tmp_path / prec), mixed_precision=prec)) for prec in ("fp32", "bf16")}
    assert r["fp32"]["precision"] == "fp32" and r["bf16"]["precision"] == "bf16"
    ls = {prec: losses(tmp_path / prec) for prec in r}
    assert ls["fp32"][60] < 0.2 * ls["fp32"][1], ls["fp32"]           # it overfits
    late = [abs(ls["bf16"][s] - ls["fp32"][s]) for s in range(51, 61)]
    assert max(late) < BF16_LOSS_TOL, late
    assert ls["bf16"][1] != ls["fp32"][1]                             # bf16 really ran (the first loss differs)
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("bf16" if native_bf16(cpu) else "fp32")
    assert resolve_precision("fp32", torch.device("cuda")) == "fp32" and native_bf16(torch.device("cuda"))
    with pytest.raises(ValueError, match="mixed_precision"):
        resolve_precision("fp16", cpu)


@pytest.mark.slow
def test_compiled_step_matches_eager(corpus, tmp_path):
    """--compile (train.step_logprobs): the same run's losses as eager, step for step, and the compiled experts run
    their per-expert loop. Slow: about a minute of compiling."""
    from openzaya.model import Experts
    from openzaya.train import step_logprobs
    torch.set_num_threads(1)
    base = dict(stage="sft", data=str(corpus / "corpus"), tokenizer=str(corpus / "tok"), seq_len=96,
                tokens_per_step=8 * 96, device_batch_size=8, steps=4, warmup_steps=2, lr=3e-3, save_every=-1,
                device="cpu", mixed_precision="fp32")
    for comp in (False, True):
        run(TrainConfig(**base, out=str(tmp_path / str(comp)), compile=comp))
    eager, comp = losses(tmp_path / "False"), losses(tmp_path / "True")
    assert list(comp) == [1, 2, 3, 4] and all(abs(comp[s] - eager[s]) < 1e-4 for s in eager), (eager, comp)
    from openzaya.model import ZayaForCausalLM, nano
    m = ZayaForCausalLM(nano(300))
    assert step_logprobs(m, False) == m.token_logprobs and all(e.use_grouped_mm for e in m.modules()
                                                                 if isinstance(e, Experts))
    step_logprobs(m, True)
    assert not any(e.use_grouped_mm for e in m.modules() if isinstance(e, Experts))


def test_resume_with_changed_settings_is_refused(corpus, tmp_path):
    """--resume with another sequence length, learning rate or seed is refused with the differences listed; the
    output-only settings may change; --allow-config-change resumes anyway."""
    from openzaya import cli
    from openzaya.train import config_from_args

    torch.set_num_threads(1)
    base = dict(stage="sft", data=str(corpus / "corpus"), tokenizer=str(corpus / "tok"), out=str(tmp_path),
                seq_len=96, tokens_per_step=8 * 96, device_batch_size=8, steps=2, warmup_steps=1, lr=3e-3,
                save_every=1)
    run(TrainConfig(**base))
    changed = {**base, "resume": True, "seq_len": 128, "tokens_per_step": 8 * 128, "lr": 1e-3, "seed": 5}
    with pytest.raises(ValueError, match="allow-config-change") as e:
        run(TrainConfig(**changed))
    assert [line.strip() for line in str(e.value).splitlines()[1:]] == [
        "lr: 0.003 -> 0.001", "seed: 0 -> 5", "seq_len: 96 -> 128", "tokens_per_step: 768 -> 1024"]
    run(TrainConfig(**{**base, "resume": True, "save_every": 5, "threads": 1}))   # output-only changes resume
    assert run(TrainConfig(**changed, allow_config_change=True))["steps"] == 2
    a = cli.build_parser().parse_args(["sft", *flags(corpus, tmp_path, 2), "--resume", "--allow-config-change"])
    assert config_from_args(a, "sft").allow_config_change
    a = cli.build_parser().parse_args(["sft", *flags(corpus, tmp_path, 2), "--resume"])
    assert not config_from_args(a, "sft").allow_config_change


def test_two_process_gloo_matches_one_process(corpus, tmp_path):
    # fp32 pinned: the equality below is of fp32 arithmetic (on a CPU with native bf16, `auto` would pick bf16
    # autocast in one process and FSDP2's bf16 parameter casts in two, which round differently)
    one = cli(["pretrain", *flags(corpus, tmp_path / "one", 4, ["--save-every", "-1", "--mixed-precision", "fp32"])])
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([str(VENV / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m", "openzaya.cli",
                          "pretrain", *flags(corpus, tmp_path / "two", 4, ["--save-every", "-1",
                                                                           "--mixed-precision", "fp32"])],
                         env=ENV, capture_output=True, text=True, timeout=240)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 ranks x 4 x 1 micro-batches" in two.stdout and "1 ranks x 4 x 2 micro-batches" in one.stdout
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    for s in range(1, 5):
        assert abs(a[s] - b[s]) < 1e-5, (s, a[s], b[s])


def test_bad_inputs_fail_early(corpus, tmp_path):
    base = dict(stage="sft", data=str(corpus / "corpus"), tokenizer=str(corpus / "tok"), out=str(tmp_path / "x"),
                seq_len=96, tokens_per_step=8 * 96, device_batch_size=4, steps=1)
    with pytest.raises(ValueError, match="not a multiple"):
        batch_plan(TrainConfig(**{**base, "device_batch_size": 3}), 1)
    with pytest.raises(ValueError, match="not a multiple of seq_len"):
        batch_plan(TrainConfig(**{**base, "tokens_per_step": 100}), 1)
    from openzaya.data import DataError
    with pytest.raises(DataError, match="manifest"):
        run(TrainConfig(**{**base, "data": str(tmp_path / "missing")}))
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        run(TrainConfig(**{**base, "tokenizer": str(tmp_path / "nope")}))
    with pytest.raises(MemoryError, match="estimated training memory"):
        run(TrainConfig(**{**base, "model_preset": "zaya1_8b"}))
    # a model whose vocabulary is smaller than the tokenizer's
    from openzaya.checkpoint import save_pretrained
    from openzaya.model import ZayaForCausalLM
    from tests.zaya_ref import tiny_config
    save_pretrained(ZayaForCausalLM(tiny_config(vocab_size=128)), tmp_path / "small")
    with pytest.raises(ValueError, match="do not belong together"):
        run(TrainConfig(**{**base, "init_from": str(tmp_path / "small")}))


@pytest.mark.slow
def test_speedrun_smoke(tmp_path):
    """The whole pipeline with the `smoke` preset (tiny corpus, 3+3 steps, ablation on): it runs and reports."""
    r = cli(["speedrun", "--preset", "smoke", "--root", str(tmp_path), "--ablation-trim"])
    assert r.returncode == 0, r.stderr[-3000:]
    report = (tmp_path / "smoke" / "report.md").read_text()
    assert "Held-out accuracy" in report and "Ablation" in report and (tmp_path / "smoke" / "loss.png").exists()
