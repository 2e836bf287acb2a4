"""Every command in README.md's ```bash blocks runs here, so the README cannot drift from the code.

Commands are read from the README itself (new blocks are picked up automatically): lines joined at a trailing `\\`,
a heredoc (`<<'EOF'` ... `EOF`) kept as one command. Each command is handled by the first RULES entry whose pattern
matches it:
  run         run as pasted: `openzaya` commands in this process through `cli.main`, others through bash
  run+ FLAGS  run with FLAGS appended (argparse keeps a flag's last value): smaller settings for long runs
  parse       parsed by `openzaya`'s own parser only (every flag and value must exist), with the reason it does not run
  skip        not run, with the reason (package installs, other programs, GPUs)
A command that ends in `&` starts a server in the background (a subprocess) and the test waits for its /health;
`kill %1` stops the block's servers. An `openzaya` command that no rule matches runs as pasted; any other command
that no rule matches fails the test until a rule says what to do with it.

Commands run in a sandbox folder laid out like the tree `make run` leaves behind (SPEEDRUN_OUTPUTS, with tiny
stand-ins: a random tiny model, a small corpus and tokenizer; test_speedrun.py's slow smoke run checks that the
speedrun writes these paths), with `.venv/bin/` mapped to this interpreter's folder and port 8000 to a free port.

Run: .venv/bin/python -m pytest tests/test_readme.py
"""

from __future__ import annotations

import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BIN = Path(sys.executable).parent

# what `make run` (speedrun --preset nano) writes and the README's commands read; the sandbox fakes these
SPEEDRUN_OUTPUTS = ["runs/nano/corpus", "runs/nano/sft_corpus", "runs/nano/tokenizer", "runs/nano/sft/model",
                    "runs/nano/rl/behavioral/ckpt/model"]

TRAIN_SMALL = ["--steps", "2", "--seq-len", "96", "--tokens-per-step", "192", "--device-batch-size", "2",
               "--warmup-steps", "1", "--save-every", "-1", "--threads", "1"]
# (pattern, mode, flags appended for run+, reason); first match wins
RULES = [
    (r"^make (run|test)$", "skip", None, "the newcomer commands: `make test` is what CI runs, `make run` is the "
                                         "20-minute speedrun (test_speedrun.py runs its smoke preset)"),
    (r"^(python3 -m venv|\.venv/bin/pip install)", "skip", None,
     "installs packages; test_setup_block_matches_the_makefile checks these lines against the Makefile's setup"),
    (r"^(vllm serve|python -m sglang)", "skip", None, "needs a GPU and vLLM or SGLang; the eval line after it is "
                                                      "parsed"),
    (r"^\s*(for i in [\d ]+; do|done|(\w+=\S+ )+vllm serve .*&)$", "skip", None,
     "the loop starting one vLLM server per GPU (RL at scale); the trainer line after it is parsed"),
    (r"^\.venv/bin/lm_eval ", "skip", None, "lm-eval's tasks download their datasets; test_lm_eval.py runs lm-eval "
                                            "against openzaya serve on local tasks"),
    (r"Zyphra/ZAYA1-8B", "parse", None, "downloads the 16 GB checkpoint (or needs a server holding it)"),
    (r"speedrun --preset nano", "parse", None, "20 minutes; the sandbox stands in for what it writes"),
    (r"speedrun --preset small", "parse", None, "a GPU preset"),
    (r"torchrun ", "parse", None, "two processes; test_train.py's gloo test runs torchrun"),
    (r"--enable-weight-updates", "parse", None, "only serves the RL line below, which is parsed"),
    (r" rl ", "parse", None, "RL from a random stand-in model finds no learning signal; test_rl_loop.py runs RL "
                             "(cascade, server rollouts)"),
    (r" (pretrain|sft) ", "run+", TRAIN_SMALL, "the nano presets train for 300 steps"),
    (r" eval --benchmark envs:", "run+", ["--limit", "2", "--samples", "1"], "4 runs x 16 problems x 3 methods"),
    (r" eval --benchmark runs/aime_example.jsonl --backend local", "run+", ["--samples", "1"], "4 runs x 2 methods"),
    (r" eval --benchmark code:mini", "run+", ["--limit", "3", "--samples", "1"], "33 problems x 4 samples"),
    (r"^cat > \S+ <<'EOF'", "run", None, "writes a file"),
    (r"^kill %1$", "run", None, "stops the block's background servers"),
]


# ---------------------------------------------------------------------------------------------------------------------
# reading the README


def readme_blocks(text: str, lang: str = "bash") -> list[list[str]]:
    """The commands of each ```lang block: continuation lines joined, a heredoc kept whole, blank lines and
    comment-only lines dropped."""
    blocks = []
    for body in re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M):
        cmds, lines = [], body.splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            i += 1
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            while line.endswith("\\") and i < len(lines):
                line = line[:-1].rstrip() + " " + lines[i].strip()
                i += 1
            m = re.search(r"<<'(\w+)'", line)
            if m:
                while i < len(lines) and lines[i] != m.group(1):
                    line += "\n" + lines[i]
                    i += 1
                line += "\n" + m.group(1)
                i += 1
            cmds.append(line)
        blocks.append(cmds)
    return blocks


def rule_for(cmd: str):
    bare = re.sub(r"\s+#.*$", "", cmd.splitlines()[0])      # the first line without its trailing comment
    for pattern, mode, flags, reason in RULES:
        if re.search(pattern, bare):
            return mode, flags, reason
    if re.match(r"^\.venv/bin/openzaya\b", cmd):
        return "run", None, "an openzaya command"
    return None, None, None


def openzaya_argv(cmd: str) -> list[str]:
    """The `openzaya` arguments of a command: after .venv/bin/openzaya, or after `-m openzaya.cli` (torchrun)."""
    words = shlex.split(cmd.rstrip(" &"), comments=True)
    if words[0].endswith("/openzaya"):
        return words[1:]
    k = words.index("openzaya.cli")
    return words[k + 1:]


# ---------------------------------------------------------------------------------------------------------------------
# the sandbox: what `make run` would have left in runs/nano/, tiny


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    import torch

    from openzaya.checkpoint import save_pretrained
    from openzaya.model import ZayaForCausalLM
    from test_train import tiny_corpus, tiny_tokenizer
    from zaya_ref import tiny_config

    root = tmp_path_factory.mktemp("readme")
    nano = root / "runs" / "nano"
    tok = tiny_tokenizer(tiny_corpus(nano / "corpus", samples_per_env_level=16, seed=0))
    tiny_corpus(nano / "sft_corpus", samples_per_env_level=16, seed=1)
    tok.save(nano / "tokenizer")
    torch.manual_seed(0)
    model = ZayaForCausalLM(tiny_config(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                                        pad_token_id=tok.pad_id, max_position_embeddings=2048))
    for d in ("sft/model", "rl/behavioral/ckpt/model"):
        save_pretrained(model, nano / d)
        tok.save(nano / d)
    assert all((root / p).exists() for p in SPEEDRUN_OUTPUTS)
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(argv: list[str], cwd: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "openzaya.cli", *argv], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {proc.stdout.read()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise AssertionError(f"server on port {port} not ready after 180 s")


# ---------------------------------------------------------------------------------------------------------------------
# the tests


def test_readme_starts_with_the_two_newcomer_commands():
    first = readme_blocks(README.read_text())[0]
    assert [c.split("#")[0].strip() for c in first] == ["make run", "make test"]


def test_setup_block_matches_the_makefile():
    """The README's by-hand setup installs what the Makefile's setup target installs, in the same order."""
    setup = next(b for b in readme_blocks(README.read_text()) if any("python3 -m venv" in c for c in b))
    pips = [shlex.split(c, comments=True)[2:] for c in setup if ".venv/bin/pip install" in c]
    make = re.findall(r"\$\(BIN\)/pip install -q (.+)", (ROOT / "Makefile").read_text())
    assert [p for p in pips] == [shlex.split(m) for m in make]


def test_python_blocks_compile():
    for i, body in enumerate(re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)):
        compile(body, f"README.md python block {i}", "exec")   # run: downloads the 8B checkpoint; compiled only


def test_every_readme_command(sandbox, monkeypatch, capsys):
    from openzaya.cli import build_parser, main

    monkeypatch.chdir(sandbox)
    port = free_port()
    done = []
    for block in readme_blocks(README.read_text()):
        servers = []
        try:
            for cmd in block:
                mode, flags, reason = rule_for(cmd)
                assert mode is not None, f"README command without a rule in tests/test_readme.py: {cmd!r}"
                cmd = cmd.replace("127.0.0.1:8000", f"127.0.0.1:{port}").replace("--port 8000", f"--port {port}")
                done.append([mode, cmd.splitlines()[0][:90], time.perf_counter()])
                if mode == "skip":
                    continue
                if cmd == "kill %1":
                    for proc in servers:
                        proc.terminate()
                        proc.wait(timeout=30)
                    servers = []
                    continue
                if not re.search(r"(^|/)openzaya\b|openzaya\.cli", cmd.splitlines()[0]):
                    r = subprocess.run(["bash", "-c", cmd.replace(".venv/bin/", f"{BIN}/")], cwd=sandbox,
                                       capture_output=True, text=True, timeout=120)
                    assert r.returncode == 0, f"{cmd!r}: {r.stderr[-2000:]}"
                    continue
                argv = openzaya_argv(cmd) + (flags or [])
                if mode == "parse":
                    try:
                        build_parser().parse_args(argv)
                    except SystemExit:
                        raise AssertionError(f"{cmd!r} does not parse: {capsys.readouterr().err}") from None
                    continue
                if cmd.rstrip().endswith("&"):
                    servers.append(start_server(argv, sandbox, port))
                    continue
                try:
                    rc = main(argv)
                except SystemExit as e:      # --help (and argparse errors) exit through SystemExit
                    rc = e.code
                out = capsys.readouterr()
                assert rc in (0, None), f"{cmd!r} exited with {rc}: {out.err[-3000:]}"
        finally:
            for proc in servers:
                proc.kill()
    modes = {m for m, _, _ in done}
    assert {"run", "run+", "parse", "skip"} <= modes, done
    ends = [t for _, _, t in done[1:]] + [time.perf_counter()]
    print("\n".join(f"{m:6s} {end - t:5.1f}s {c}" for (m, c, t), end in zip(done, ends)))
