"""RL at scale: a trainer (one process, or 2 gloo ranks under torchrun) with rollouts from a pool of `openzaya serve`
servers that receive every policy version (from disk or by broadcast) and are checked to serve it; a server that dies
is routed around and re-admitted with the current weights; a trainer SIGKILLed mid-run resumes where its checkpoint
left off; a server that accepts a push and keeps its old weights stops the run.

The environment is test_rl_loop's digits task (reward = share of digits among 8 generated characters).
Fast tests run the servers in threads of the test process; the slow ones spawn `openzaya serve` processes and a
2-rank torchrun trainer (this file as its script).

Run: .venv/bin/python -m pytest tests/test_rl_scale.py -q        (the spawned ones: add -m slow)
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import httpx
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (str(ROOT), str(ROOT / "tests")):
    if p not in sys.path:        # run as a script (the torchrun ranks)
        sys.path.insert(0, p)

from openzaya import rl_loop, serve_rl                      # noqa: E402
from openzaya.checkpoint import save_pretrained             # noqa: E402
from test_rl_loop import digits_config, digits_env, mean, tiny_policy   # noqa: E402
from test_serve_rl import Served                            # noqa: E402
from tests.test_parallel import _children                   # noqa: E402  (a process's children, from /proc)

VENV = Path(sys.executable).parent


def init_dir(path: Path) -> Path:
    model, tok = tiny_policy()
    save_pretrained(model, path)
    tok.save(path)
    return path


def infos(*servers) -> list[dict]:
    return [httpx.get(s.url + "/weight_info", timeout=30).json() for s in servers]


def served_weights_equal(server, model) -> bool:
    trained = model.state_dict()
    return all(torch.equal(v, trained[k]) for k, v in server.app.state.srv.engine.model.state_dict().items())


def completions_served(server) -> int:
    text = server.app.state.srv.metrics.render(server.app.state.srv.sched)
    key = 'openzaya_requests_total{code="200",endpoint="/v1/completions"} '    # prometheus_client sorts labels
    line = [x for x in text.splitlines() if x.startswith(key)]
    return int(float(line[0].split()[-1])) if line else 0


# -----------------------------------------------------------------------------
# One trainer process, servers in threads


def test_two_servers_receive_every_version_by_broadcast(tmp_path):
    """vLLM's weight-transfer protocol (gloo) to two servers: each is pushed and verified at every version, serves
    rollouts, and ends with exactly the trainer's weights; every sample is within the staleness bound."""
    init = init_dir(tmp_path / "init")
    model, tok = tiny_policy()
    with Served(init, return_routed_experts=True) as a, Served(init, return_routed_experts=True) as b:
        cfg = digits_config(tmp_path, steps=4, prompts_per_step=2, samples_per_prompt=4, max_staleness=1,
                            server_url=[a.url + "/v1", b.url], weight_sync="broadcast", probe_tolerance=1e-3)
        res = rl_loop.run(cfg, model=model, tokenizer=tok, envs=digits_env())
        assert infos(a, b) == [{"weight_version": "4", "updates": 5}] * 2       # versions 0 (start) .. 4
        assert served_weights_equal(a, res["model"]) and served_weights_equal(b, res["model"])
        assert completions_served(a) > 0 and completions_served(b) > 0
    pushes = [p for m in res["metrics"] for p in m["pushes"]]
    for v in range(5):
        assert sorted(p["server"] for p in pushes if p["version"] == v) == sorted([a.url, b.url]), (v, pushes)
    assert all(p["probe_diff"] < 1e-3 for p in pushes)
    for m in res["metrics"]:
        assert m["stale_max"] <= cfg.max_staleness and all(m["trained_version"] - v <= 1 for v in m["versions"])
        assert m["load"] >= 1.0                                    # the servers' routes were replayed
    rows = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and "mismatch_max" in rows[0]


def test_a_server_that_keeps_its_old_weights_fails_the_run(tmp_path, monkeypatch):
    """A server that answers 200 to every push (and reports the new version) but never copies the weights in: the
    probe catches it at the first version that differs from its weights."""
    monkeypatch.setattr(serve_rl, "_copy_into", lambda model, sd: len(sd))
    init = init_dir(tmp_path / "init")
    model, tok = tiny_policy()
    with Served(init) as a:
        cfg = digits_config(tmp_path, steps=3, prompts_per_step=2, samples_per_prompt=4, server_url=a.url,
                            probe_tolerance=1e-3)
        with pytest.raises(RuntimeError, match=r"accepted policy version 1 but does not serve it"):
            rl_loop.run(cfg, model=model, tokenizer=tok, envs=digits_env())
        assert infos(a)[0]["weight_version"] == "1"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_a_dead_server_is_routed_around_and_readmitted_with_current_weights(tmp_path):
    """Server B stops mid-run: its jobs go to A and the run goes on; B restarted (on its port, from the initial
    weights) is re-admitted at the next publish with the current version, verified, and serves again."""
    init = init_dir(tmp_path / "init")
    model, tok = tiny_policy()
    port = _free_port()
    cfg = digits_config(tmp_path, steps=10, prompts_per_step=2, samples_per_prompt=4, max_staleness=2,
                        server_url=None, probe_tolerance=1e-3)
    metrics, out = tmp_path / "run" / "metrics.jsonl", {}
    with Served(init) as a:
        b = Served(init, port=port).__enter__()
        cfg.server_url = [a.url, b.url]
        th = threading.Thread(target=lambda: out.setdefault("res", rl_loop.run(cfg, model=model, tokenizer=tok,
                                                                               envs=digits_env())))
        th.start()
        while len(_rows(metrics)) < 2 and th.is_alive():
            time.sleep(0.05)
        b.__exit__(None, None, None)                                   # B goes away mid-run
        down_at = len(_rows(metrics))
        while len(_rows(metrics)) < down_at + 3 and th.is_alive():
            time.sleep(0.05)
        with Served(init, port=port) as b2:                            # back, with the initial weights
            th.join(timeout=300)
            assert not th.is_alive() and out["res"]["steps"] == 10
            info = infos(b2)[0]
            assert info["weight_version"] == "10" and info["updates"] >= 1, info
            assert served_weights_equal(b2, out["res"]["model"]) and served_weights_equal(a, out["res"]["model"])
            assert completions_served(b2) > 0
    rows = _rows(metrics)
    b_url = f"http://127.0.0.1:{port}"
    gone = [r["step"] for r in rows if all(p["server"] != b_url for p in r["pushes"])]
    back = [r["step"] for r in rows if any(p["server"] == b_url for p in r["pushes"]) and r["step"] > down_at + 1]
    assert gone and back and min(back) > min(gone), (gone, back)
    assert all(r["stale_max"] <= cfg.max_staleness for r in rows)


# -----------------------------------------------------------------------------
# Spawned: `openzaya serve` processes and a 2-rank torchrun trainer


class ServeProcess:
    """`openzaya serve --enable-weight-updates --enable-return-routed-experts` on a port, as a process."""

    def __init__(self, model: Path, port: int, log: Path):
        self.model, self.port, self.log = model, port, log
        self.url = f"http://127.0.0.1:{port}"
        self.proc = None

    def start(self):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen([str(VENV / "openzaya"), "serve", "--model", str(self.model), "--port",
                                      str(self.port), "--max-slots", "8", "--max-len", "128", "--threads", "1",
                                      "--enable-weight-updates", "--enable-return-routed-experts"],
                                     env=env, stdout=open(self.log, "a"), stderr=subprocess.STDOUT)
        t_end = time.time() + 120
        while time.time() < t_end:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.2)
        raise RuntimeError(f"openzaya serve on {self.port} did not start:\n{self.log.read_text()[-2000:]}")

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)


def trainer(out: Path, cfg: dict, init: Path, resume: bool = False) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    cmd = [str(VENV / "torchrun"), "--standalone", "--nproc-per-node", "2", __file__, str(out), json.dumps(cfg),
           str(init), "resume" if resume else "fresh"]
    return subprocess.Popen(cmd, env=env, stdout=open(out.parent / f"{out.name}.log", "a"), stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_two_gloo_ranks_two_servers_reward_goes_up(tmp_path):
    """`rl_loop.run` on 2 gloo ranks (FSDP2) with two `openzaya serve` processes: the reward goes up, every server
    gets every version (verified), and every sample is within the staleness bound."""
    init = init_dir(tmp_path / "init")
    servers = [ServeProcess(init, _free_port(), tmp_path / f"serve{i}.log").start() for i in range(2)]
    try:
        cfg = {"steps": 20, "max_staleness": 2, "server_url": [s.url for s in servers], "probe_tolerance": 1e-3}
        proc = trainer(tmp_path / "run", cfg, init)
        assert proc.wait(timeout=1500) == 0, (tmp_path / "run.log").read_text()[-4000:]
        assert [i["weight_version"] for i in infos(*servers)] == ["20", "20"]
        assert [i["updates"] for i in infos(*servers)] == [21, 21]
    finally:
        for s in servers:
            s.kill()
    rows = _rows(tmp_path / "run" / "metrics.jsonl")
    r = [x["reward"] for x in rows]
    print("rewards", [round(x, 3) for x in r])
    assert [x["step"] for x in rows] == list(range(1, 21)) and mean(r[-3:]) > mean(r[:3]) + 0.2, r
    pushes = [p for x in rows for p in x["pushes"]]
    for v in range(21):
        assert sorted(p["server"] for p in pushes if p["version"] == v) == sorted(s.url for s in servers), v
    assert all(x["stale_max"] <= 2 and x["load"] >= 1.0 for x in rows)


@pytest.mark.slow
def test_server_sigkill_readmission_and_trainer_sigkill_resume(tmp_path):
    """Two `openzaya serve` processes and a 2-rank trainer. A server is SIGKILLed mid-run: the run goes on with the
    other; restarted, it is re-admitted with the current weights. Then the trainer is SIGKILLed; `--resume` continues
    from its last checkpoint to the end: every step once in metrics.jsonl, the servers on the final version."""
    init = init_dir(tmp_path / "init")
    servers = [ServeProcess(init, _free_port(), tmp_path / f"serve{i}.log").start() for i in range(2)]
    out, steps = tmp_path / "run", 30
    cfg = {"steps": steps, "save_every": 3, "server_url": [s.url for s in servers], "probe_tolerance": 1e-3}
    metrics = out / "metrics.jsonl"

    def readmitted(after: int) -> list[int]:
        return [r["step"] for r in _rows(metrics) if r["step"] > after
                and servers[1].url in [p["server"] for p in r["pushes"]]]
    try:
        proc = trainer(out, cfg, init)
        while len(_rows(metrics)) < 2 and proc.poll() is None:
            time.sleep(0.1)
        servers[1].kill()
        killed_at = len(_rows(metrics))
        while len(_rows(metrics)) < killed_at + 2 and proc.poll() is None:
            time.sleep(0.1)
        assert not readmitted(killed_at + 1)                    # down: no version reached it
        servers[1].start()
        while not readmitted(killed_at + 1) and proc.poll() is None:
            time.sleep(0.1)
        back = readmitted(killed_at + 1)
        assert back, _rows(metrics)
        assert all(servers[1].url in [p["server"] for p in r["pushes"]] for r in _rows(metrics) if r["step"] > back[0])
        while not (out / "ckpt" / "dcp").exists() or len(_rows(metrics)) < back[0] + 4:
            assert proc.poll() is None, (tmp_path / "run.log").read_text()[-4000:]
            time.sleep(0.05)
        for pid in _children(proc.pid):
            os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=120)
        assert len(_rows(metrics)) < steps, "the run finished before it was killed"
        from openzaya import dcp
        saved = torch.load(dcp.find(out / "ckpt" / "dcp") / dcp.TRAINER_STATE, weights_only=False)["step"]
        proc = trainer(out, cfg, init, resume=True)
        assert proc.wait(timeout=1500) == 0, (tmp_path / "run.log").read_text()[-4000:]
        assert f"at step {saved}" in (tmp_path / "run.log").read_text()
        assert [i["weight_version"] for i in infos(*servers)] == [str(steps)] * 2
    finally:
        for s in servers:
            if s.proc.poll() is None:
                s.kill()
    rows = _rows(metrics)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert all(r["stale_max"] <= 2 for r in rows)


if __name__ == "__main__":          # a torchrun rank: python test_rl_scale.py OUT CFG_JSON INIT fresh|resume
    torch.set_num_threads(1)
    out, kw, init, mode = Path(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
    cfg = digits_config(out.parent, **{**kw, "out": str(out)})
    rl_loop.run(cfg, init_dir=init, envs=digits_env(), resume=mode == "resume")
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()
    print("config", json.dumps(asdict(cfg))[:200])
