"""Packaging: `pip install .` without extras gives a working OpenAI-compatible client.

torch stays a core dependency (the model, the engine and the trainer need it), but the client path (`openzaya
solve/eval --backend openai`) must not import torch or transformers: here it runs in a subprocess in which both
imports fail, against a real `openzaya serve` (with an API key, its context read from /v1/models); the slow test
installs the package into a fresh venv with every runtime dependency but torch and runs the client there.

Run: .venv/bin/python -m pytest tests/test_packaging.py   (slow too: -m slow)
"""

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from server_thread import ServerThread
from test_local_backend import make_checkpoint

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-packaging"

# the client, with torch and transformers unimportable (a None entry in sys.modules makes `import x` fail)
CLIENT = """
import sys
for name in ("torch", "transformers"):
    sys.modules[name] = None
from openzaya.cli import main
rc = main(sys.argv[1:])
heavy = [m for m in ("torch", "transformers", "openzaya.model", "openzaya.engine") if sys.modules.get(m) is not None]
print("heavy modules:", heavy)
sys.exit(rc or (3 if heavy else 0))
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from openzaya.serve import ServeConfig, load_app

    ckpt = make_checkpoint(tmp_path_factory.mktemp("pkg") / "m")
    app = load_app(ckpt, ServeConfig(max_slots=8, max_len=512, api_key=KEY, model_name="zaya"))
    with ServerThread(app) as s:
        s.tokenizer = str(ckpt)         # the served model's tokenizer folder: exact token counts for the client
        yield s


def run_client(args, env=None, python=sys.executable, cwd=None):
    return subprocess.run([python, "-c", CLIENT, *args], capture_output=True, text=True, timeout=300, cwd=cwd,
                          env={**os.environ, **(env or {})})


def test_openai_client_needs_neither_torch_nor_transformers(server, tmp_path):
    solve = ["solve", "What is 2 plus 3?", "--backend", "openai", "--base-url", server.url + "/v1", "--model", "zaya",
             "--method", "markovian_rsa", "--population", "2", "--candidates", "2", "--rounds", "1",
             "--tokenizer", server.tokenizer]
    r = run_client(solve, env={"OPENAI_API_KEY": KEY})          # the key from the environment, as openai's client
    assert r.returncode == 0, r.stderr[-3000:]
    assert "total: calls 4 |" in r.stdout and "heavy modules: []" in r.stdout
    # the default budget was fitted to the context the server reports (512 positions) before any call
    assert "does not fit this model's context of 512 tokens" in r.stderr
    bench = tmp_path / "b.jsonl"
    bench.write_text("".join(json.dumps({"id": f"p{i}", "problem": f"{i} plus 1?", "answer": str(i + 1)}) + "\n"
                             for i in range(2)))
    r = run_client(["eval", "--benchmark", str(bench), "--backend", "openai", "--base-url", server.url + "/v1",
                    "--model", "zaya", "--api-key", KEY, "--method", "single,majority", "--population", "2",
                    "--budget-tokens", "8", "--out", str(tmp_path / "out")])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "avg@1 " in r.stdout and "heavy modules: []" in r.stdout
    assert list((tmp_path / "out").glob("results_*.json"))
    # a missing key and a model the server does not serve: one line each, before any generation
    r = run_client(solve, env={"OPENAI_API_KEY": ""})
    assert r.returncode == 2 and r.stderr.strip().endswith("the server wants an API key (--api-key KEY or "
                                                           "OPENAI_API_KEY)"), r.stderr
    r = run_client(solve[:6] + ["--model", "m"] + solve[8:] + ["--api-key", KEY])
    assert r.returncode == 2 and "serves 'zaya', not 'm': pass one of them as --model" in r.stderr, r.stderr


def test_declared_ranges_and_extras():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = {d.split(">")[0].split("=")[0].split("<")[0]: d for d in project["dependencies"]}
    assert deps["torch"] == "torch>=2.6,<3"
    extras = project["optional-dependencies"]
    assert "transformers>=5.23,<6" in extras["hf"] and "datasets>=3" in extras["datasets"]
    assert "transformers" not in deps and "datasets" not in deps                # heavy pieces stay optional
    import torch
    import transformers

    assert (2, 6) <= tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) < (3, 0)
    assert transformers.__version__.startswith("5.")                            # inside the declared range


@pytest.mark.slow
def test_fresh_venv_without_torch_runs_the_client(server, tmp_path):
    """`pip install --no-deps .` plus every runtime dependency except torch, in a fresh venv: the client works.
    Needs PyPI (or a local index) for the dependencies; about a minute with a warm pip cache."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    deps = [d for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
            if not d.startswith("torch")]
    subprocess.run(pip + deps, check=True, timeout=900)
    subprocess.run(pip + ["--no-deps", str(ROOT)], check=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([str(venv / "bin" / "openzaya"), "solve", "What is 2 plus 3?", "--backend", "openai",
                        "--base-url", server.url + "/v1", "--model", "zaya", "--api-key", KEY, "--method", "majority",
                        "--population", "2", "--budget-tokens", "8"], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "total: calls 2 |" in r.stdout
    check = subprocess.run([str(venv / "bin" / "python"), "-c", "import importlib.util as u; "
                            "print(u.find_spec('torch') is None)"], capture_output=True, text=True, cwd=tmp_path,
                           env=env)
    assert check.stdout.strip() == "True"                                       # really without torch
