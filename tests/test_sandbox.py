"""Escape suite for openzaya.sandbox: every attack must be contained and leave no process behind.

Run: .venv/bin/python -m pytest tests/test_sandbox.py
"""

import os
import socket
import time

import pytest

from openzaya import sandbox
from openzaya.sandbox import Limits, call_function, results_equal, run_python

FAST = Limits(wall_s=5, cpu_s=2)


def _children() -> list[int]:
    """Live descendants of this process (and, as root, anything still running under a sandbox uid)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/status") as f:
                status = f.read()
        except OSError:
            continue
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        uid = int(fields.get("Uid", "0").split()[0])
        if fields.get("State", "").startswith("Z"):
            continue
        if int(fields.get("PPid", "0")) == os.getpid() or (
                sandbox.UID_BASE <= uid < sandbox.UID_BASE + 1_000_000
                and (uid - sandbox.UID_BASE) // 50 == os.getpid() % 20_000):
            out.append(int(d))
    return out


@pytest.fixture(autouse=True)
def no_leftovers():
    before = set(_children())   # long-lived workers of other modules (math-verify pool, RLVE workers) may exist
    yield
    time.sleep(0.05)
    assert set(_children()) - before == set(), "sandbox left processes running"


def test_plain_run_and_stdin():
    r = run_python("import sys; print(sys.stdin.read().upper())", stdin="hello", limits=FAST)
    assert r.ok and r.stdout.strip() == "HELLO" and r.exit_code == 0


def test_infinite_loop_is_killed():
    r = run_python("while True: pass", limits=Limits(wall_s=3, cpu_s=1))
    assert not r.ok and r.killed_reason in ("cpu limit", "timeout", "signal 9") and r.wall_s < 4


def test_sleeping_process_hits_wall_clock():
    r = run_python("import time; time.sleep(60)", limits=Limits(wall_s=1))
    assert r.timed_out and r.killed_reason == "timeout" and r.wall_s < 3


def test_fork_bomb_is_contained():
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    r = run_python(code, limits=Limits(wall_s=3, cpu_s=2, processes=8))
    assert not r.ok


def test_detached_grandchild_is_killed():
    code = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nprint('parent done')\n")
    r = run_python(code, limits=FAST)
    assert "parent done" in r.stdout   # the fixture asserts the detached sleeper is gone


def test_memory_bomb():
    r = run_python("x = bytearray(4 << 30)\nprint('allocated')", limits=Limits(wall_s=5, memory_bytes=256 << 20))
    assert not r.ok and "allocated" not in r.stdout and "MemoryError" in r.stderr


def test_huge_output_is_capped():
    r = run_python("while True: print('x' * 10000)", limits=Limits(wall_s=5, output_bytes=100_000))
    assert not r.ok and r.killed_reason == "output limit" and len(r.stdout) <= 100_000


def test_cannot_write_outside_its_directory(tmp_path):
    target = tmp_path / "escape.txt"
    os.chmod(tmp_path, 0o777)
    code = (f"import os\nopen('inside.txt', 'w').write('ok')\nprint(open('inside.txt').read())\n"
            f"for p in ['../escape.txt', '/tmp/oz_escape.txt', {str(target)!r}, '/work/oz_escape.txt']:\n"
            f"    try:\n        open(p, 'w').write('x'); print('WROTE', p)\n    except OSError as e:\n"
            f"        print('denied', p)\n")
    r = run_python(code, limits=FAST)
    assert r.ok and "ok" in r.stdout and "WROTE" not in r.stdout, r.stdout + r.stderr
    assert not target.exists() and not os.path.exists("/tmp/oz_escape.txt")


def test_cannot_read_parent_secrets(monkeypatch):
    monkeypatch.setenv("OZ_TEST_SECRET", "hunter2-secret")
    code = ("import os\nprint(sorted(os.environ))\nprint(os.environ.get('OZ_TEST_SECRET'))\n"
            "try:\n    print(open(f'/proc/{os.getppid()}/environ').read())\nexcept OSError as e:\n    print('denied')\n"
            "try:\n    print(open('/proc/1/environ').read())\nexcept OSError as e:\n    print('denied')\n")
    r = run_python(code, limits=FAST)
    assert r.ok and "hunter2" not in r.stdout + r.stderr, r.stdout


def test_no_network():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    code = (f"import socket\nfor addr in [('127.0.0.1', {port}), ('1.1.1.1', 53)]:\n"
            f"    try:\n        s = socket.socket(); s.settimeout(1); s.connect(addr); print('CONNECTED', addr)\n"
            f"    except OSError as e:\n        print('blocked', e)\n")
    r = run_python(code, limits=FAST)
    server.close()
    assert "CONNECTED" not in r.stdout and "blocked" in r.stdout + r.stderr


def test_cannot_kill_parent():
    r = run_python("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.killpg(0, signal.SIGKILL)",
                   limits=FAST)
    assert not r.ok   # and we are still here to assert it


def test_forged_reward_and_exit_code_do_not_pass():
    # the candidate writes a reward file, prints a fake verdict and exits 0 before the harness runs
    cheat = ("import os, sys\nopen('reward.txt', 'w').write('1.0')\nprint('ALL TESTS PASSED reward=1.0')\n"
             "os._exit(0)\ndef f(x):\n    return x\n")
    results, run = call_function(cheat, "f", [[1], [2]], limits=FAST)
    assert run.exit_code == 0 and results is None   # exit code 0, but no verdict: parent-side comparison fails


def test_call_function_results_compared_in_parent():
    results, run = call_function("def f(a, b):\n    return [a + b, a * b]", "f", [[2, 3], [1, 0]], limits=FAST)
    assert run.ok and results == [["ok", [5, 6]], ["ok", [1, 0]]]
    assert results_equal([r[1] for r in results], [[5, 6], [1, 0]])
    assert not results_equal([[5, 6]], [[5, 7]])
    results, _ = call_function("def f(x):\n    return 1 // x", "f", [[1], [0]], limits=FAST)
    assert results[0] == ["ok", 1] and results[1][0] == "error" and "ZeroDivisionError" in results[1][1]


def test_isolation_report():
    iso = sandbox.isolation()
    assert iso["network"] != "NOT BLOCKED" and iso["probe_ok"]
    if os.geteuid() == 0:
        assert iso["unprivileged_uid"] and iso["network"] == "network namespace"
