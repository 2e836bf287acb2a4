"""Run untrusted Python in a child process (spec: environments.md §9).

One process per run. The parent creates a fresh working directory, starts a root *bootstrap* interpreter in a new
session, and the bootstrap, before any untrusted byte runs, does (when we are root, as on our machines):

1. `unshare(CLONE_NEWNS | CLONE_NEWNET)`: a private mount table and an empty network namespace (no interfaces up,
   not even the parent's loopback), so `connect()` fails for every address.
2. In the private mount table: a tmpfs over any ancestor of the interpreter's prefix that others cannot traverse
   (here `/root`, mode 0700) with the prefix bind-mounted back, so an unprivileged uid can run Python but sees nothing
   else of that directory; then the whole tree is made read-only (`mount_setattr(AT_RECURSIVE)`), and only the
   working directory is bind-mounted back read-write.
3. rlimits: CPU time, address space, file size, open files, process count, no core files.
4. `setresgid/setresuid` to a per-run unprivileged uid (so RLIMIT_NPROC is enforced, the parent and other processes
   cannot be signalled or ptraced, `/proc/<ppid>/environ` is unreadable) and `PR_SET_NO_NEW_PRIVS`.
5. `exec` of the same interpreter with `-I -S` (no PYTHON* variables, no cwd on sys.path, no site: only the
   standard library; skipping site's .pth files also halves start-up).

The environment is scrubbed (only PATH, HOME, TMPDIR, LANG, PYTHONHASHSEED). stdout/stderr are read by the parent
up to a cap (the run is killed when it exceeds it), and a wall-clock deadline kills the run. Afterwards every
process of the run's uid is killed with `kill(-1, SIGKILL)` from a helper that takes that uid (this also catches
children that called setsid), then the process group; nothing is left running.

Without root (CI), steps 1, 2 and 4 are skipped: the network is blocked by an audit hook in the child that refuses
socket creation (best effort, not a security boundary), RLIMIT_NPROC is not set (it would count all of the user's
processes), and cleanup kills the session's process group. `isolation()` reports what is active.

Results are judged in the parent only: `call_function` returns the JSON the child printed after a per-run marker,
and callers compare it with values they computed themselves; files and exit codes the child writes are never trusted.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass


@dataclass
class Limits:
    wall_s: float = 10.0
    cpu_s: int = 5
    memory_bytes: int = 512 << 20      # RLIMIT_AS
    file_bytes: int = 16 << 20         # RLIMIT_FSIZE, per file
    open_files: int = 64               # RLIMIT_NOFILE
    processes: int = 16                # RLIMIT_NPROC for the run's own uid (root mode only)
    output_bytes: int = 1 << 20        # stdout and stderr each; the run is killed beyond it


@dataclass
class RunResult:
    ok: bool                 # exited with code 0, not killed, not timed out
    stdout: str
    stderr: str
    exit_code: int | None    # negative: killed by that signal
    timed_out: bool
    killed_reason: str       # "" | "timeout" | "output limit" | "cpu limit" | "signal N"
    wall_s: float


IS_ROOT = os.geteuid() == 0
PYTHON = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
UID_BASE = 1_500_000         # per-run uids live above any real account
_uid_counter = itertools.count()
_uid_lock = threading.Lock()


def _next_uid() -> int:
    with _uid_lock:
        n = next(_uid_counter)
    return UID_BASE + (os.getpid() % 20_000) * 50 + n % 50


# ---------------------------------------------------------------------------------------------------------------
# the bootstrap: runs as root in the child, then execs the runner as an unprivileged uid

_BOOT = r"""
import ctypes, json, os, resource, sys
cfg = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
report = {"netns": False, "mountns": False, "readonly": False, "uid": False}
if cfg["root"]:
    CLONE_NEWNS, CLONE_NEWNET = 0x00020000, 0x40000000
    if libc.unshare(CLONE_NEWNET) == 0:
        report["netns"] = True
    if libc.unshare(CLONE_NEWNS) == 0:
        report["mountns"] = True
        MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
        mount = libc.mount
        mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_void_p]
        ok = mount(None, b"/", None, MS_REC | MS_PRIVATE, None) == 0
        for hidden, keep in cfg["unhide"]:   # tmpfs over an untraversable dir, with the interpreter bound back
            fd = os.open(keep, os.O_PATH)
            ok &= mount(b"tmpfs", hidden.encode(), b"tmpfs", 0, b"mode=0755,size=1m") == 0
            os.makedirs(keep, exist_ok=True)
            ok &= mount(f"/proc/self/fd/{fd}".encode(), keep.encode(), None, MS_BIND | MS_REC, None) == 0
            os.close(fd)
        class MountAttr(ctypes.Structure):
            _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                        ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]
        AT_FDCWD, AT_RECURSIVE, SYS_mount_setattr = -100, 0x8000, 442
        cwd = cfg["cwd"].encode()
        ok &= mount(cwd, cwd, None, MS_BIND, None) == 0   # its own mount, so it can be made writable again
        rdonly, writable = MountAttr(1, 0, 0, 0), MountAttr(0, 1, 0, 0)   # MOUNT_ATTR_RDONLY set / cleared
        if ok and libc.syscall(SYS_mount_setattr, AT_FDCWD, b"/", AT_RECURSIVE, ctypes.byref(rdonly),
                               ctypes.sizeof(rdonly)) == 0:
            report["readonly"] = libc.syscall(SYS_mount_setattr, AT_FDCWD, cwd, 0, ctypes.byref(writable),
                                              ctypes.sizeof(writable)) == 0
        os.chdir(cfg["cwd"])   # re-enter through the writable bind mount
lim = cfg["limits"]
resource.setrlimit(resource.RLIMIT_CPU, (lim["cpu_s"], lim["cpu_s"] + 1))
resource.setrlimit(resource.RLIMIT_AS, (lim["memory_bytes"],) * 2)
resource.setrlimit(resource.RLIMIT_FSIZE, (lim["file_bytes"],) * 2)
resource.setrlimit(resource.RLIMIT_NOFILE, (lim["open_files"],) * 2)
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
if cfg["root"]:
    resource.setrlimit(resource.RLIMIT_NPROC, (lim["processes"],) * 2)
    uid = cfg["uid"]
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    report["uid"] = os.getuid() == uid
PR_SET_NO_NEW_PRIVS = 38
libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
py = sys.executable
os.execv(py, [py, "-I", "-S", "-c", cfg["runner"], "netns" if report["netns"] else "none"])
"""

# The runner: blocks sockets with an audit hook when there is no network namespace, then runs main.py as __main__.
_RUNNER = r"""
import sys
if sys.argv[1] != "netns":
    def _no_net(event, args):
        if event.startswith("socket.") or event in ("_socket.socket", "socket.__new__"):
            raise PermissionError("network disabled in sandbox")
    sys.addaudithook(_no_net)
import builtins
builtins.exit = builtins.quit = sys.exit   # -S skips site, which defines them
sys.argv = ["main.py"]
with open("main.py") as f:
    src = f.read()
exec(compile(src, "main.py", "exec"), {"__name__": "__main__", "__builtins__": builtins})
"""


def _unhide_pairs() -> list[tuple[str, str]]:
    """(untraversable ancestor, child path to bind back) so an unprivileged uid can reach the interpreter."""
    pairs = []
    for prefix in {os.path.realpath(sys.base_prefix), os.path.dirname(PYTHON)}:
        parts = prefix.strip("/").split("/")
        for i in range(1, len(parts)):
            anc = "/" + "/".join(parts[:i])
            if not os.stat(anc).st_mode & stat.S_IXOTH:
                pairs.append((anc, "/" + "/".join(parts[:i + 1])))
                break
    return sorted(set(pairs))


def _kill_uid(uid: int) -> None:
    """SIGKILL every process owned by `uid` (kill(-1) from a helper that becomes that uid), a few rounds."""
    for _ in range(3):
        pid = os.fork()
        if pid == 0:   # child: only async-signal-safe-ish calls, then _exit
            try:
                os.setresgid(uid, uid, uid)
                os.setresuid(uid, uid, uid)
                os.kill(-1, signal.SIGKILL)
            except BaseException:   # noqa: BLE001
                pass
            os._exit(0)
        os.waitpid(pid, 0)


def _uid_alive(uid: int) -> list[int]:
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                st = os.stat(f"/proc/{d}")
            except OSError:
                continue
            if st.st_uid == uid:
                pids.append(int(d))
    return pids


def isolation() -> dict:
    """What the sandbox enforces on this machine (runs one tiny probe)."""
    probe = run_python("import json, os, sys; print(json.dumps({'uid': os.getuid()}))", limits=Limits(wall_s=20))
    net = run_python("import socket\ns = socket.socket(); s.settimeout(1)\n"
                     "try:\n    s.connect(('1.1.1.1', 53)); print('CONNECTED')\nexcept OSError as e:\n    print('blocked', e)",
                     limits=Limits(wall_s=20))
    return {"root": IS_ROOT, "unprivileged_uid": IS_ROOT and '"uid": 0' not in probe.stdout,
            "network": "network namespace" if "Errno" in net.stdout else "audit hook" if "blocked" in net.stdout
            else "NOT BLOCKED",
            "process_limit": "RLIMIT_NPROC on a per-run uid" if IS_ROOT else "none (non-root)",
            "probe_ok": probe.ok}


# ---------------------------------------------------------------------------------------------------------------


def run_python(code: str, stdin: str = "", limits: Limits | None = None, files: dict[str, str] | None = None
               ) -> RunResult:
    """Run `code` as main.py in a fresh directory under the limits; never raises on anything the code does."""
    lim = limits or Limits()
    base = tempfile.mkdtemp(prefix="oz-sandbox-")   # root-owned 0700 parent: nothing above work/ is writable
    os.chmod(base, 0o711)
    work = os.path.join(base, "work")
    os.mkdir(work, 0o700)
    uid = _next_uid()
    try:
        with open(os.path.join(work, "main.py"), "w") as f:
            f.write(code)
        for name, text in (files or {}).items():
            with open(os.path.join(work, os.path.basename(name)), "w") as f:
                f.write(text)
        stdin_path = os.path.join(base, "stdin")
        with open(stdin_path, "w") as f:
            f.write(stdin)
        if IS_ROOT:
            for p in [work] + [os.path.join(work, n) for n in os.listdir(work)]:
                os.chown(p, uid, uid)
        cfg = {"root": IS_ROOT, "uid": uid, "cwd": work, "unhide": _unhide_pairs() if IS_ROOT else [],
               "runner": _RUNNER, "limits": lim.__dict__}
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
        t0 = time.monotonic()
        with open(stdin_path, "rb") as stdin_f:
            proc = subprocess.Popen([PYTHON, "-I", "-S", "-c", _BOOT, json.dumps(cfg)], cwd=work, env=env,
                                    stdin=stdin_f, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    start_new_session=True, close_fds=True)
        out, err, reason = _collect(proc, t0 + lim.wall_s, lim.output_bytes)
        if reason:
            _kill_all(proc, uid)
        code_ = proc.wait()
        wall = time.monotonic() - t0
        _kill_all(proc, uid)
        if not reason and code_ in (-signal.SIGXCPU, -signal.SIGKILL) and wall < lim.wall_s:
            reason = "cpu limit" if code_ == -signal.SIGXCPU else "signal 9"
        elif not reason and code_ < 0:
            reason = f"signal {-code_}"
        return RunResult(ok=code_ == 0 and not reason, stdout=out.decode("utf-8", "replace"),
                         stderr=err.decode("utf-8", "replace"), exit_code=code_, timed_out=reason == "timeout",
                         killed_reason=reason, wall_s=wall)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _collect(proc: subprocess.Popen, deadline: float, cap: int) -> tuple[bytes, bytes, str]:
    """Read stdout/stderr until EOF, the deadline, or either stream passing `cap` bytes."""
    bufs = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    sel = selectors.DefaultSelector()
    for f in bufs:
        os.set_blocking(f.fileno(), False)
        sel.register(f, selectors.EVENT_READ)
    reason = ""
    while sel.get_map():
        left = deadline - time.monotonic()
        if left <= 0:
            reason = "timeout"
            break
        for key, _ in sel.select(timeout=min(left, 0.5)):
            chunk = os.read(key.fileobj.fileno(), 65536)
            if not chunk:
                sel.unregister(key.fileobj)
                continue
            buf = bufs[key.fileobj]
            buf += chunk[:cap + 1 - len(buf)]
            if len(buf) > cap:
                reason = "output limit"
        if reason:
            break
    sel.close()
    out, err = bytes(bufs[proc.stdout][:cap]), bytes(bufs[proc.stderr][:cap])
    if not reason:   # streams closed; the process may still be running (closed its fds): bound the wait too
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            reason = "timeout"
    return out, err, reason


def _kill_all(proc: subprocess.Popen, uid: int) -> None:
    if IS_ROOT:
        _kill_uid(uid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
    for f in (proc.stdout, proc.stderr):
        f.close()


# ---------------------------------------------------------------------------------------------------------------
# calling functions on inputs


_HARNESS = """
import json as _json, sys as _sys
_inputs = _json.loads({inputs!r})
{code}

_out = []
for _args in _inputs:
    try:
        _v = {func}(*_args)
        _json.dumps(_v)
        _out.append(["ok", _v])
    except BaseException as _e:
        _out.append(["error", type(_e).__name__ + ": " + str(_e)[:200]])
_sys.stdout.flush()
print({marker!r} + _json.dumps(_out))
"""


def call_function(code: str, func: str, inputs: list[list], limits: Limits | None = None
                  ) -> tuple[list | None, RunResult]:
    """Define `code`, call `func(*args)` for each args list in `inputs`; ([["ok", value] | ["error", msg]], run).

    The list is None when the run failed or printed nothing parseable. Values are whatever the child printed after
    a random marker: callers must compare them with values they computed themselves, never trust a verdict.
    """
    marker = "@@OZ-RESULT-" + secrets.token_hex(8) + "@@"
    src = _HARNESS.format(inputs=json.dumps(inputs), code=code, func=func, marker=marker)
    run = run_python(src, limits=limits)
    i = run.stdout.rfind(marker)
    if i < 0:
        return None, run
    try:
        results = json.loads(run.stdout[i + len(marker):].strip().splitlines()[0])
    except (ValueError, IndexError):
        return None, run
    if not isinstance(results, list) or len(results) != len(inputs):
        return None, run
    return results, run


def results_equal(a, b) -> bool:
    """JSON value equality with tuples as lists and a float tolerance of 1e-9 (relative)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(results_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(results_equal(a[k], b[k]) for k in a)
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, float) or isinstance(b, float):
        if not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
            return False
        return abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b))
    return a == b
