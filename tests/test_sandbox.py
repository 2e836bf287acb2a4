"""Escape suite for openzaya.sandbox: every attack must be contained and leave no process behind.

As root, each attack runs in mode "root" and in mode "userns" (the path an unprivileged user gets); as a user, in
the mode "auto" picks. `test_unprivileged_user` runs the suite's core as uid 65534, in modes auto and none.

Run: .venv/bin/python -m pytest tests/test_sandbox.py
"""

import concurrent.futures
import ctypes
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from openzaya import sandbox
from openzaya.sandbox import Limits, call_function, results_equal, run_python

FAST = Limits(wall_s=5, cpu_s=2)
ROOT = os.geteuid() == 0
MODES = ["root", "userns"] if ROOT else [sandbox.resolve_mode("auto")]
ISOLATED = [m for m in MODES if m != "none"]   # the namespace modes: the guarantees below hold there
libc = ctypes.CDLL(None, use_errno=True)


def _processes() -> dict[int, tuple[str, int]]:
    """pid -> (state, parent pid) for every process."""
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[int(d)] = (fields[0], int(fields[1]))
    return out


def _descendants() -> set[int]:
    """Live (not zombie) descendants of this process."""
    children = {}
    procs = _processes()
    for pid, (_, ppid) in procs.items():
        children.setdefault(ppid, []).append(pid)
    out, frontier = set(), [os.getpid()]
    while frontier:
        for c in children.get(frontier.pop(), []):
            out.add(c)
            frontier.append(c)
    return {p for p in out if procs[p][0] != "Z"}


def _zombie_children() -> set[int]:
    return {pid for pid, (state, ppid) in _processes().items() if state == "Z" and ppid == os.getpid()}


def _reap_orphans(keep: set[int]) -> None:
    for pid in _zombie_children() - keep:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


@pytest.fixture(autouse=True)
def no_leftovers():
    """As a child subreaper, anything a run leaves behind (even after setsid) becomes our descendant."""
    libc.prctl(36, 1)   # PR_SET_CHILD_SUBREAPER
    before = _descendants()   # long-lived workers of other modules (math-verify pool, RLVE workers) may exist
    zombies_before = _zombie_children()
    yield
    deadline = time.monotonic() + 3   # a killed PID namespace is torn down asynchronously
    while _descendants() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    left = _descendants() - before
    _reap_orphans(zombies_before)
    libc.prctl(36, 0)
    assert left == set(), "sandbox left processes running"


# ---------------------------------------------------------------------------------------------------------------
# limits (every mode)


@pytest.mark.parametrize("mode", MODES)
def test_plain_run_and_stdin(mode):
    r = run_python("import sys; print(sys.stdin.read().upper())", stdin="hello", limits=FAST, mode=mode)
    assert r.ok and r.stdout.strip() == "HELLO" and r.exit_code == 0 and r.mode == mode


@pytest.mark.parametrize("mode", MODES)
def test_infinite_loop_is_killed(mode):
    r = run_python("while True: pass", limits=Limits(wall_s=3, cpu_s=1), mode=mode)
    assert not r.ok and r.killed_reason in ("cpu limit", "timeout", "signal 9") and r.wall_s < 4


@pytest.mark.parametrize("mode", MODES)
def test_sleeping_process_hits_wall_clock(mode):
    r = run_python("import time; time.sleep(60)", limits=Limits(wall_s=1), mode=mode)
    assert r.timed_out and r.killed_reason == "timeout" and r.wall_s < 3


@pytest.mark.parametrize("mode", MODES)
def test_hash_seed_is_fixed(mode):
    runs = [run_python("print(hash('openzaya'), list({'a', 'b', 'c', 'd', 'e'}))", limits=FAST, mode=mode)
            for _ in range(2)]
    assert runs[0].ok and runs[0].stdout == runs[1].stdout


@pytest.mark.parametrize("mode", ISOLATED)
def test_fork_bomb_is_contained(mode):
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    r = run_python(code, limits=Limits(wall_s=3, cpu_s=2, processes=8), mode=mode)
    assert not r.ok


@pytest.mark.parametrize("mode", ISOLATED)
def test_fork_bomb_is_stopped_by_the_process_limit(mode):
    """Not only "the run failed" (a wall-clock kill does that too): every process of the bomb forks without end, the
    first fork that fails does so with EAGAIN (RLIMIT_NPROC) after fewer than `processes` forks, and the run ends on
    its own well before the wall clock (init then kills the rest of the bomb with the PID namespace)."""
    code = ("import errno, os, time\nn = 0\nwhile True:\n    try:\n        if os.fork() == 0:\n"
            "            while True:\n                try:\n                    os.fork()\n"
            "                except OSError:\n                    time.sleep(0.01)\n        n += 1\n"
            "    except OSError as e:\n        print('FAILED', errno.errorcode[e.errno], n, flush=True)\n"
            "        break\n")
    r = run_python(code, limits=Limits(wall_s=8, cpu_s=5, processes=8), mode=mode)
    words = r.stdout.split()
    assert words[:2] == ["FAILED", "EAGAIN"] and 1 <= int(words[2]) < 8, r.stdout + r.stderr
    assert r.ok and not r.timed_out and r.wall_s < 4, (r.killed_reason, r.wall_s)


@pytest.mark.parametrize("mode", ISOLATED)
def test_process_limit_counts_only_this_run(mode):
    code = ("import os, time\nn = 0\nfor _ in range(30):\n    try:\n        if os.fork() == 0:\n"
            "            time.sleep(5); os._exit(0)\n        n += 1\n    except OSError:\n        break\nprint('FORKED', n)\n")
    r = run_python(code, limits=Limits(wall_s=5, processes=8), mode=mode)
    assert r.ok and 5 <= int(r.stdout.split()[-1]) < 8, r.stdout + r.stderr


@pytest.mark.parametrize("mode", MODES)
def test_detached_grandchild_is_killed(mode):
    code = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nprint('parent done')\n")
    r = run_python(code, limits=FAST, mode=mode)
    assert "parent done" in r.stdout   # the fixture asserts the detached sleeper is gone


@pytest.mark.parametrize("mode", MODES)
def test_memory_bomb(mode):
    r = run_python("x = bytearray(4 << 30)\nprint('allocated')", limits=Limits(wall_s=5, memory_bytes=256 << 20),
                   mode=mode)
    assert not r.ok and "allocated" not in r.stdout and "MemoryError" in r.stderr


@pytest.mark.parametrize("mode", MODES)
def test_huge_output_is_capped(mode):
    r = run_python("while True: print('x' * 10000)", limits=Limits(wall_s=5, output_bytes=100_000), mode=mode)
    assert not r.ok and r.killed_reason == "output limit" and len(r.stdout) <= 100_000


@pytest.mark.parametrize("mode", ISOLATED)
def test_disk_quota(mode):
    code = ("n = 0\ntry:\n    for i in range(64):\n        with open(f'f{i}', 'wb') as f:\n"
            "            for _ in range(8):\n                f.write(b'x' * (1 << 20)); n += 1 << 20\n"
            "except OSError as e:\n    print('STOPPED', e.errno)\nprint('WROTE', n)\n")
    r = run_python(code, limits=Limits(wall_s=20, cpu_s=10, disk_bytes=24 << 20), mode=mode)
    wrote = int(r.stdout.split("WROTE")[1])
    assert "STOPPED 28" in r.stdout and wrote <= 24 << 20, r.stdout + r.stderr   # ENOSPC at the quota


# ---------------------------------------------------------------------------------------------------------------
# identity and cleanup


@pytest.mark.skipif(not ROOT, reason="the uid pool is root's")
@pytest.mark.parametrize("mode", MODES)
def test_more_concurrent_runs_than_uids(mode, monkeypatch):
    """8 concurrent runs over a pool of 3 uids: no two live runs share a uid, every kill(-1) hits only its own run."""
    monkeypatch.setattr(sandbox, "UID_POOL", 3)
    code = ("import os, signal, time\nt0 = time.time()\nouter = open('/proc/self/uid_map').read().split()[1]\n"
            "outer = outer if outer != '0' else str(os.getuid())\n"   # mode root: no user namespace
            "open('secret.txt', 'w').write(outer)\nKILLER\ntime.sleep(0.6)\n"
            "print('RUN', outer, t0, time.time(), os.listdir('.'))\n")
    victim = code.replace("KILLER", "")
    killer = code.replace("KILLER", "try:\n    os.kill(-1, signal.SIGKILL)\nexcept OSError:\n    pass")
    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        runs = list(ex.map(lambda i: run_python(killer if i % 4 == 0 else victim, limits=Limits(wall_s=30), mode=mode),
                           range(8)))
    victims = [r for i, r in enumerate(runs) if i % 4]
    assert all(r.ok and "RUN" in r.stdout for r in victims), [r.stdout + r.stderr for r in victims]
    spans = [(int(w[1]), float(w[2]), float(w[3])) for w in (r.stdout.split() for r in victims)]
    assert {u for u, _, _ in spans} <= {sandbox.UID_BASE + k for k in range(3)}
    for i, (u, a, b) in enumerate(spans):
        for v, c, d in spans[i + 1:]:
            assert u != v or b <= c or d <= a, "two live runs shared a uid"
    assert all("secret.txt" in r.stdout and "main.py" in r.stdout and r.stdout.count(".txt") == 1 for r in victims)


@pytest.mark.skipif(not ROOT, reason="the uid pool is root's")
def test_uid_with_a_live_process_is_not_claimed(monkeypatch):
    monkeypatch.setattr(sandbox, "UID_POOL", 2)
    stray = subprocess.Popen(["sleep", "30"], user=sandbox.UID_BASE, group=sandbox.UID_BASE)
    try:
        time.sleep(0.1)
        assert sandbox._uid_alive(sandbox.UID_BASE) == [stray.pid]
        uids = {int(run_python("import os; print(os.getuid())", limits=FAST, mode="root").stdout) for _ in range(4)}
        assert uids == {sandbox.UID_BASE + 1}
    finally:
        stray.kill()
        stray.wait()


@pytest.mark.parametrize("mode", MODES)
def test_killed_parent_takes_its_runs_along(mode, tmp_path):
    script = (f"import sys; sys.path.insert(0, {os.getcwd()!r})\nfrom openzaya.sandbox import run_python, Limits\n"
              f"print('go', flush=True)\nrun_python('import time; time.sleep(60)', limits=Limits(wall_s=60), "
              f"mode={mode!r})\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert parent.stdout.readline().strip() == "go"
    deadline = time.monotonic() + 10
    while len(_descendants()) < 4 and time.monotonic() < deadline:   # parent, bootstrap, init, candidate
        time.sleep(0.05)
    parent.kill()
    parent.wait()   # the fixture asserts its bootstrap, init and candidate die with it


# ---------------------------------------------------------------------------------------------------------------
# what the candidate can see


@pytest.mark.parametrize("mode", ISOLATED)
def test_candidate_cannot_read_the_grader(mode, monkeypatch):
    """The attack that scored 1.0: find openzaya's code environments on disk and exec the reference solution."""
    from openzaya.envs import code as code_envs
    monkeypatch.setattr(code_envs, "RUN_LIMITS", Limits(wall_s=20, cpu_s=10))
    monkeypatch.setattr(sandbox, "resolve_mode", lambda m="auto", _r=sandbox.resolve_mode: _r(mode))
    env = code_envs.load_code()["code/reconstruct/collatz_steps"]
    problem = env.generate(2, 7)
    assert env.score(problem, f"\\boxed{{{problem.answer}}}").reward == 1.0
    attack = textwrap.dedent(r'''
        import os, re
        def _find():
            for top in ["/work", "/root", "/usr", "/opt", "/home", "/srv", "/tmp", "/"]:
                for dirpath, dirs, files in os.walk(top):
                    if dirpath.startswith("/proc") or dirpath.count("/") > 8:
                        dirs[:] = []
                    if dirpath.endswith("openzaya/envs") and "code.py" in files:
                        return os.path.join(dirpath, "code.py")
        src = open(_find()).read()
        exec(re.search(r"def collatz_steps\(n\):.*?return steps\n", src, re.S).group(0))
    ''')
    s = env.score(problem, "\\boxed{" + attack + "}")
    assert s.reward == 0.0, s
    look = ("import os, sys, json\nseen = {'openzaya': [], 'sitepkg': []}\n"
            "for dirpath, dirs, files in os.walk('/'):\n    if dirpath == '/proc':\n        dirs[:] = []\n"
            "    for n in dirs + files:\n        if 'openzaya' in n.lower():\n"
            "            seen['openzaya'].append(os.path.join(dirpath, n))\n"
            "    if dirpath.endswith('-packages'):\n        seen['sitepkg'] += files + dirs\n"
            "print(json.dumps(seen))\nprint(sorted(os.listdir('/')), os.access('/', os.W_OK))\n")
    r = run_python(look, limits=Limits(wall_s=30, cpu_s=20), mode=mode)
    assert r.ok, r.stderr
    seen = json.loads(r.stdout.splitlines()[0])
    assert seen == {"openzaya": [], "sitepkg": []}, seen
    assert "['box', 'dev', 'etc', 'lib'" in r.stdout and "work" not in r.stdout and "False" in r.stdout


@pytest.mark.parametrize("mode", MODES)
def test_cannot_write_outside_its_directory(mode, tmp_path):
    target = tmp_path / "escape.txt"
    os.chmod(tmp_path, 0o777)
    code = (f"import os\nopen('inside.txt', 'w').write('ok')\nprint(open('inside.txt').read())\n"
            f"for p in ['../escape.txt', '/tmp/oz_escape.txt', {str(target)!r}, '/work/oz_escape.txt']:\n"
            f"    try:\n        open(p, 'w').write('x'); print('WROTE', p)\n    except OSError as e:\n"
            f"        print('denied', p)\n")
    r = run_python(code, limits=FAST, mode=mode)
    if mode == "none":   # only the caller's permissions: world-writable places stay writable
        assert r.ok and "ok" in r.stdout
        return
    assert r.ok and "ok" in r.stdout and "WROTE" not in r.stdout, r.stdout + r.stderr
    assert not target.exists() and not os.path.exists("/tmp/oz_escape.txt")


@pytest.mark.parametrize("mode", ISOLATED)
def test_symlinks_lead_nowhere(mode):
    code = ("import os\nread = []\nfor i, t in enumerate(['/etc/passwd', '/etc/shadow', '/root', '/work', '/tmp', "
            "'/proc/1/root', '/proc/self/root/..', '../../..', '/etc/ld.so.cache']):\n    try:\n        os.symlink(t, f'l{i}')\n"
            "        p = f'l{i}'\n        read.append((t, sorted(os.listdir(p)) if os.path.isdir(p) else open(p, 'rb').read()[:20]))\n"
            "    except OSError as e:\n        pass\n    try:\n        os.link(t, f'h{i}'); read.append(('hardlink', t))\n"
            "    except OSError:\n        pass\nprint(read)\n")
    r = run_python(code, limits=FAST, mode=mode)
    assert r.ok, r.stderr
    assert "root:" not in r.stdout and "hardlink" not in r.stdout
    assert "'wt'" not in r.stdout and "'oz-sandbox" not in r.stdout and "'.pyenv'" in r.stdout   # '/root' is the view's
    assert os.path.exists("/etc/passwd")


@pytest.mark.parametrize("mode", MODES)
def test_cannot_read_parent_secrets(mode, monkeypatch):
    monkeypatch.setenv("OZ_TEST_SECRET", "hunter2-secret")
    code = ("import os\nprint(sorted(os.environ))\nprint(os.environ.get('OZ_TEST_SECRET'))\n"
            "try:\n    print(open(f'/proc/{os.getppid()}/environ').read())\nexcept OSError as e:\n    print('denied')\n"
            "try:\n    print(open('/proc/1/environ').read())\nexcept OSError as e:\n    print('denied')\n")
    r = run_python(code, limits=FAST, mode=mode)
    assert r.ok and "hunter2" not in r.stdout + r.stderr, r.stdout


@pytest.mark.parametrize("mode", ISOLATED)
def test_no_information_about_other_processes(mode):
    secret = "sk-" + secrets.token_hex(8)
    sibling = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "--api-key", secret],
                               env={**os.environ, "OZ_API_KEY": secret})
    try:
        code = (f"import os\nhits, pids = [], [d for d in os.listdir('/proc') if d.isdigit()]\nfor d in pids:\n"
                f"    for f in ('cmdline', 'environ', 'status'):\n        try:\n"
                f"            if {secret!r} in open(f'/proc/{{d}}/{{f}}', 'rb').read().decode('latin1'):\n"
                f"                hits.append(f)\n        except OSError:\n            pass\n"
                f"for p in ({sibling.pid}, {os.getpid()}):\n    try:\n        os.kill(p, 0); hits.append(('signal', p))\n"
                f"    except OSError:\n        pass\nprint(hits, sorted(pids), os.getpid())\n")
        r = run_python(code, limits=FAST, mode=mode)
        assert r.ok and r.stdout.startswith("[] ['2'] 2"), r.stdout + r.stderr   # only itself, as PID 2
        assert sibling.poll() is None
    finally:
        sibling.kill()
        sibling.wait()


@pytest.mark.parametrize("mode", MODES)
def test_no_network(mode):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    code = (f"import socket\nfor addr in [('127.0.0.1', {port}), ('1.1.1.1', 53)]:\n"
            f"    try:\n        s = socket.socket(); s.settimeout(1); s.connect(addr); print('CONNECTED', addr)\n"
            f"    except OSError as e:\n        print('blocked', e)\n")
    r = run_python(code, limits=FAST, mode=mode)
    server.close()
    assert "CONNECTED" not in r.stdout and "blocked" in r.stdout + r.stderr


@pytest.mark.parametrize("mode", MODES)
def test_cannot_kill_parent(mode):
    r = run_python("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.killpg(0, signal.SIGKILL)",
                   limits=FAST, mode=mode)
    assert not r.ok   # and we are still here to assert it


@pytest.mark.parametrize("mode", ISOLATED)
def test_cannot_undo_the_view(mode):
    """A new user namespace gives capabilities, but the view's mounts are locked and the old root is gone."""
    code = textwrap.dedent(r'''
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        out = []
        for what, fn in [("setuid0", lambda: os.setuid(0)), ("chroot", lambda: os.chroot("/box"))]:
            try:
                fn(); out.append(what)
            except OSError:
                pass
        if libc.unshare(0x10000000 | 0x20000) == 0:          # CLONE_NEWUSER | CLONE_NEWNS
            for target in ["/root", "/usr/lib", "/", "/proc"]:
                if libc.umount2(target.encode(), 2) == 0:
                    out.append("umount " + target)
            for dirpath, dirs, files in os.walk("/"):
                if dirpath.endswith("site-packages") and (dirs or files):
                    out.append("site-packages visible")
            if libc.mount(b"/", b"/box", None, 4096 | 16384, None) == 0 and os.path.exists("/box/work"):
                out.append("host root bound")
        print("ESCAPES", out, os.path.exists("/old_root"), sorted(os.listdir("/")))
    ''')
    r = run_python(code, limits=Limits(wall_s=20, cpu_s=10), mode=mode)
    assert "ESCAPES [] False" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("mode", ISOLATED)
def test_no_capabilities_left(mode):
    code = ("def caps(_):\n    st = dict(l.split(':\\t') for l in open('/proc/self/status').read().splitlines() "
            "if ':\\t' in l)\n    return [st[k].strip() for k in ('CapInh', 'CapPrm', 'CapEff', 'CapBnd', 'CapAmb', "
            "'NoNewPrivs')]\nprint(caps(0))\n")
    r = run_python(code, limits=FAST, mode=mode)
    results, _ = call_function(code, "caps", [[0]], limits=FAST, mode=mode)
    for got in (eval(r.stdout), results[0][1]):
        assert got[:3] == ["0" * 16] * 3 and got[4] == "0" * 16 and got[5] == "1", got


# ---------------------------------------------------------------------------------------------------------------
# results


@pytest.mark.parametrize("mode", MODES)
def test_forged_reward_and_exit_code_do_not_pass(mode):
    # the candidate writes a reward file, prints a fake verdict and exits 0 before the harness runs
    cheat = ("import os, sys\nopen('reward.txt', 'w').write('1.0')\nprint('ALL TESTS PASSED reward=1.0')\n"
             "os._exit(0)\ndef f(x):\n    return x\n")
    results, run = call_function(cheat, "f", [[1], [2]], limits=FAST, mode=mode)
    assert run.exit_code == 0 and results is None   # exit code 0, but no verdict: parent-side comparison fails


@pytest.mark.parametrize("mode", ISOLATED)
def test_result_channel_cannot_be_forged(mode):
    """Only init writes to the parent's result pipe; the candidate's one pipe to init takes exactly one line per call."""
    fake = '[\\"ok\\", 1000000]'
    # today's attack: the marker was in main.py; now there is none, and stdout is not the channel
    marker = ('import re\nm = re.findall(r"@@OZ-RESULT-[0-9a-f]+@@", open("main.py").read())\n'
              f'print((m or ["@@OZ-RESULT-0@@"])[0] + "[{fake}, {fake}]", flush=True)\n')
    # write fake results to every descriptor but its own result pipe (3), and to every /proc/<pid>/fd it can open
    other_fds = ('import os\nfor fd in range(4, 1024):\n    try:\n'
                 f'        os.write(fd, b"{fake}\\n{fake}\\n")\n    except OSError:\n        pass\n'
                 'for d in [d for d in os.listdir("/proc") if d.isdigit() and int(d) != os.getpid()]:\n'
                 '    for fd in range(64):\n        try:\n'
                 '            with open(f"/proc/{d}/fd/{fd}", "w") as f:\n'
                 f'                f.write("{fake}\\n{fake}\\n")\n        except OSError:\n            pass\n'
                 'os._exit(0)\n')
    results, run = call_function(marker + "def f(x):\n    return x\n", "f", [[1], [2]], limits=FAST, mode=mode)
    assert results == [["ok", 1], ["ok", 2]] and "@@OZ-RESULT-0@@" in run.stdout
    results, run = call_function(other_fds + "def f(x):\n    return x\n", "f", [[1], [2]], limits=FAST, mode=mode)
    assert results is None and run.exit_code == 0, (results, run.stderr)
    # lines written ahead of the harness's own make the count wrong: no results rather than forged ones
    results, run = call_function(f'import os\nos.write(3, b"{fake}\\n{fake}\\n")\ndef f(x):\n    return x\n', "f",
                                 [[1], [2]], limits=FAST, mode=mode)
    assert results is None


@pytest.mark.parametrize("mode", MODES)
def test_call_function_results_compared_in_parent(mode):
    results, run = call_function("def f(a, b):\n    return [a + b, a * b]", "f", [[2, 3], [1, 0]], limits=FAST,
                                 mode=mode)
    assert run.ok and results == [["ok", [5, 6]], ["ok", [1, 0]]]
    assert results_equal([r[1] for r in results], [[5, 6], [1, 0]])
    assert not results_equal([[5, 6]], [[5, 7]])
    results, _ = call_function("def f(x):\n    return 1 // x", "f", [[1], [0]], limits=FAST, mode=mode)
    assert results[0] == ["ok", 1] and results[1][0] == "error" and "ZeroDivisionError" in results[1][1]
    results, _ = call_function("print('noise')\ndef f(x):\n    print('more noise')\n    return {1, 2}", "f", [[1]],
                               limits=FAST, mode=mode)
    assert results[0][0] == "error" and "not JSON serializable" in results[0][1]


def test_isolation_report():
    iso = sandbox.isolation()
    assert iso["network"] != "NOT BLOCKED" and iso["probe_ok"]
    if os.geteuid() == 0:
        assert iso["unprivileged_uid"] and iso["network"] == "network namespace"
        assert iso["mode"] == "root" and iso["filesystem"] == "minimal read-only view"
    assert sandbox.isolation("userns" if ROOT else iso["mode"])["mode"] in ("userns", "none")


@pytest.mark.skipif(not ROOT, reason="root's refusal")
def test_root_never_runs_a_candidate_as_root():
    """Mode none as root must drop to a pool uid; where that uid cannot reach the interpreter it refuses, loudly."""
    if sandbox._reachable_by_others(sandbox.PYTHON):
        assert run_python("import os; print(os.getuid())", limits=FAST, mode="none").stdout.strip() != "0"
    else:
        with pytest.raises(RuntimeError, match="cannot reach"):
            run_python("print(1)", limits=FAST, mode="none")
    with pytest.raises(ValueError, match="mode must be"):
        run_python("print(1)", mode="chroot")


# ---------------------------------------------------------------------------------------------------------------
# an unprivileged user: auto mode (user namespaces here) and the no-namespace fallback

_AS_USER = r"""
import json, os, sys
from openzaya.sandbox import Limits, call_function, isolation, resolve_mode, run_python
out = {"uid": os.getuid(), "picked": resolve_mode("auto")}
for mode in ("auto", "none"):
    m = {"iso": isolation(mode)}
    r = run_python("import sys; print(sys.stdin.read()[::-1])", stdin="abc", mode=mode)
    m["stdin"] = r.stdout.strip()
    m["loop"] = run_python("while True: pass", limits=Limits(wall_s=3, cpu_s=1), mode=mode).killed_reason
    m["grandchild"] = run_python("import os, time\nif os.fork() == 0:\n    os.setsid(); time.sleep(60)\nprint('done')",
                                 mode=mode).stdout.strip()
    m["call"] = call_function("def f(x):\n    return x * 3", "f", [[1], [2]], mode=mode)[0]
    forge = ("import os\nfor d in os.listdir('/proc'):\n    for fd in range(64):\n        try:\n"
             "            open(f'/proc/{d}/fd/{fd}', 'w').write('[\"ok\", 7]\\n[\"ok\", 7]\\n')\n"
             "        except OSError:\n            pass\nos._exit(0)\n")
    m["forge"] = call_function(forge + "def f(x):\n    return x", "f", [[1], [2]], mode=mode)[0] if mode != "none" else None
    m["home"] = run_python("import os; print(os.listdir('/'))", mode=mode).stdout.strip()
    out[mode] = m
print("RESULT " + json.dumps(out))
"""

_BECOME_USER = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
assert libc.unshare(0x20000) == 0                                 # a mount namespace of our own
assert libc.mount(None, b"/", None, 16384 | (1 << 18), None) == 0  # private
prefix = os.path.realpath(sys.base_prefix).encode()
fd = os.open(prefix, os.O_PATH)
assert libc.mount(b"tmpfs", b"/root", b"tmpfs", 0, b"mode=0755") == 0   # /root (0700) hides the interpreter
os.makedirs(prefix, exist_ok=True)
assert libc.mount(f"/proc/self/fd/{fd}".encode(), prefix, None, 4096 | 16384, None) == 0
os.setgroups([]); os.setresgid(65534, 65534, 65534); os.setresuid(65534, 65534, 65534)
os.chdir("/tmp")
os.execv(sys.executable, [sys.executable, "-c", sys.argv[1]])
"""


def test_unprivileged_user():
    """The sandbox as uid 65534 would run it: auto picks user namespaces where they work, and the fallback without
    namespaces still runs code, limits it and cleans up; it sees the filesystem (and, same uid, the caller: a
    candidate there could ptrace its caller, so forging is not tested as impossible in mode none)."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HOME": "/tmp"}
    argv = ([sys.executable, "-c", _BECOME_USER, _AS_USER] if ROOT else [sys.executable, "-c", _AS_USER])
    p = subprocess.run(argv, capture_output=True, text=True, timeout=240, env=env)
    assert "RESULT " in p.stdout, p.stdout[-2000:] + p.stderr[-3000:]
    res = json.loads(p.stdout.split("RESULT ", 1)[1])
    assert res["uid"] != 0 and res["picked"] in ("userns", "none") and res["auto"]["iso"]["mode"] == res["picked"]
    for mode in ("auto", "none"):
        m = res[mode]
        assert m["iso"]["probe_ok"] and m["iso"]["network"] != "NOT BLOCKED" and m["iso"]["unprivileged_uid"], m
        assert m["stdin"] == "cba" and m["loop"] in ("cpu limit", "timeout") and m["grandchild"] == "done"
        assert m["call"] == [["ok", 3], ["ok", 6]] and m["forge"] is None, m
    assert res["none"]["iso"]["mode"] == "none" and res["none"]["iso"]["filesystem"] == "whole filesystem"
    assert "'tmp'" in res["none"]["home"]
    if res["picked"] == "userns":
        iso = res["auto"]["iso"]
        assert iso["network"] == "network namespace" and iso["filesystem"] == "minimal read-only view"
        assert "'box'" in res["auto"]["home"] and "'tmp'" not in res["auto"]["home"]
