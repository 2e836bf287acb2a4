"""Run untrusted Python in a child process (spec: environments.md §9).

One process tree per run. The parent writes the code into a fresh directory and starts a *bootstrap* interpreter
(`-S -s -P`, an environment of ours with PYTHONHASHSEED=0: standard library only, a fixed hash seed); the bootstrap
builds the sandbox and forks *init*; init forks the *candidate*, which sets its limits, drops its identity and
runs the code in that same interpreter (no exec). Three modes, `mode=` ("auto" takes the strongest available):

- "root" (we are root, as on our machines): new mount, PID, network, IPC and UTS namespaces. The candidate sees a
  minimal read-only filesystem on an empty tmpfs entered with pivot_root (the old root is detached, not hidden):
  the interpreter, its standard library (site-packages covered by an empty tmpfs), the directories of the shared
  libraries it maps, /dev/{null,zero,random,urandom}, a /proc of its own PID namespace (hidepid=invisible), and
  /box, its working directory: a tmpfs of `Limits.disk_bytes`, the cap on everything it writes. No project source
  or data and no other run's files exist there; the network namespace has no interface up. The candidate runs as
  a per-run uid from a pool (`UID_POOL` uids from `UID_BASE`), claimed with an flock that every process on the
  machine honours and only while no process has that uid (`_uid_alive`): concurrent runs never share an identity,
  and with more runs than uids a run waits for a free one.
- "userns" (not root; unprivileged user namespaces allowed): the same namespaces and view inside a new user
  namespace; the candidate is uid 1000 there (mapped to the caller's uid) with no capabilities. Runs are told
  apart by their namespaces, not by uids.
- "none" (no namespaces): the candidate runs as the caller's uid in a fresh directory of the real filesystem and
  sees what that uid may read; the network is refused by an audit hook (best effort, not a security boundary); no
  process-count limit and no total-disk cap (only RLIMIT_FSIZE per file); the same uid can signal or ptrace the
  caller. init is a child subreaper and kills what the candidate left behind. A warning is logged once.
  As root, "userns" and "none" first drop to a pool uid, so they behave as they would for an unprivileged user.

In every mode: rlimits on CPU time, address space, file size, open files and core files (and process count except
in "none"), PR_SET_NO_NEW_PRIVS, a scrubbed environment (PATH, HOME, TMPDIR, LANG, PYTHONHASHSEED), stdout and
stderr read by the parent up to a cap, a wall-clock deadline after which the parent kills the process tree.
Cleanup is by namespace: init is PID 1, and when it exits the kernel kills everything left in its namespace and
nothing outside it; no kill(-1) or kill by uid is ever sent from outside. Every process of a run dies with the
parent (PR_SET_PDEATHSIG along the chain).

Results: init (root in mode "root"; PID 1 and not dumpable in the namespace modes) alone holds the parent's result
pipe; the candidate never has it. For `call_function` the candidate writes one JSON line per call on its own pipe
to init, which forwards them only when there is exactly one well-formed ["ok", value] / ["error", message] line
per input. What the candidate writes there is its answer for each input (as if its function had returned it);
the verdict is never the candidate's: callers compare the values with ones they computed themselves, and exit
codes, stdout and files the candidate writes are not trusted.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import logging
import os
import selectors
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass
class Limits:
    wall_s: float = 10.0
    cpu_s: int = 5
    memory_bytes: int = 512 << 20      # RLIMIT_AS
    file_bytes: int = 16 << 20         # RLIMIT_FSIZE, per file
    disk_bytes: int = 64 << 20         # everything written to the work dir (its tmpfs size; not in mode "none")
    open_files: int = 64               # RLIMIT_NOFILE
    processes: int = 16                # RLIMIT_NPROC (not in mode "none", where it would count all the user's)
    output_bytes: int = 1 << 20        # stdout and stderr each, and the results; the run is killed beyond it


@dataclass
class RunResult:
    ok: bool                 # exited with code 0, not killed, not timed out
    stdout: str
    stderr: str
    exit_code: int | None    # negative: killed by that signal
    timed_out: bool
    killed_reason: str       # "" | "timeout" | "output limit" | "cpu limit" | "signal N"
    wall_s: float
    mode: str = ""           # the isolation mode the run had: root | userns | none


IS_ROOT = os.geteuid() == 0
PYTHON = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
MODES = ("root", "userns", "none")
UID_BASE = 3_000_000         # pool uids live above any real account (and apart from older openzaya's 1.5M-2.5M)
UID_POOL = 4096              # concurrent runs per machine; more wait for a free uid
INSIDE_UID = 1000            # the candidate's uid inside its user namespace (mode userns)
_UID_LOCKS = os.path.join(tempfile.gettempdir(), "openzaya-sandbox-uids")


# ---------------------------------------------------------------------------------------------------------------
# the bootstrap: builds the namespaces and the view, forks init; init forks the candidate and reports to the parent

_BOOT = (Path(__file__).parent / "sandbox_boot.py").read_text()

# ---------------------------------------------------------------------------------------------------------------
# the view: what the candidate's filesystem holds (computed once per process from a probe of the interpreter)

_PROBE = r"""
import json, os, site, sys, sysconfig
dyn = os.path.join(sysconfig.get_paths()["platstdlib"], "lib-dynload")
for f in sorted(os.listdir(dyn)) if os.path.isdir(dyn) else []:
    try:
        __import__(f.split(".")[0])
    except BaseException:
        pass
maps = sorted({l.split()[-1] for l in open("/proc/self/maps") if l.split()[-1].startswith("/")})
paths = sysconfig.get_paths()
sites = [paths["purelib"], paths["platlib"], site.getusersitepackages()] + site.getsitepackages()
print(json.dumps({"stdlib": [paths["stdlib"], paths["platstdlib"]], "maps": maps, "sites": sites}))
"""

_plan_lock = threading.Lock()
_plan: tuple[list, list] | None = None


def _elf_interp(path: str) -> str | None:
    """The program interpreter (PT_INTERP, e.g. /lib64/ld-linux-x86-64.so.2) of an ELF file, or None."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF":
            return None
        e, wide = "<" if head[5] == 1 else ">", head[4] == 2
        phoff = struct.unpack_from(e + ("Q" if wide else "I"), head, 32 if wide else 28)[0]
        entsize, count = struct.unpack_from(e + "HH", head, 54 if wide else 42)
        f.seek(phoff)
        table = f.read(entsize * count)
        for i in range(count):
            if struct.unpack_from(e + "I", table, i * entsize)[0] == 3:   # PT_INTERP
                off, size = struct.unpack_from(e + ("QQQQ" if wide else "IIII"), table, i * entsize + (8 if wide else 4))[0::3]
                f.seek(off)
                return f.read(size).rstrip(b"\0").decode()
    return None


def _inside(path: str, dirs) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in dirs)


def view_plan() -> tuple[list, list]:
    """(plan, binds): the mkdir / symlink / read-only bind / hide operations that build the candidate's root.

    Wanted: the interpreter, its standard library, the directories of every shared library it maps after importing
    all of lib-dynload, its ELF interpreter, /etc/ld.so.cache, four /dev files. Symlinks on the way (/lib ->
    usr/lib) are recreated as symlinks, directories bound once at their real path; site-packages and the directory
    holding the openzaya package are covered when they fall inside a bound directory.
    """
    global _plan
    with _plan_lock:
        if _plan is None:
            probe = json.loads(subprocess.run([PYTHON, "-I", "-S", "-c", _PROBE], capture_output=True, text=True,
                                              check=True, env={"PATH": "/usr/bin:/bin"}).stdout)
            wanted = [PYTHON, "/etc/ld.so.cache", "/dev/null", "/dev/zero", "/dev/random", "/dev/urandom"]
            wanted += probe["stdlib"] + sorted({os.path.dirname(m) for m in probe["maps"] if m != PYTHON})
            interp = _elf_interp(PYTHON)
            wanted += [interp] if interp else []
            links, reals = {}, set()
            for w in wanted:
                if os.path.lexists(w):
                    reals.add(_walk_links(w, links))
            for n in os.listdir("/"):   # /lib -> usr/lib and the like, for paths in ld.so.cache
                if n.startswith("lib") and os.path.islink("/" + n):
                    links["/" + n] = os.readlink("/" + n)
            reals = {r for r in reals if os.path.exists(r)}
            binds = sorted(r for r in reals if not _inside(r, [d for d in reals if d != r and os.path.isdir(d)]))
            dirs = set()
            for p in binds + list(links):
                parent = os.path.dirname(p)
                while parent != "/" and not _inside(parent, binds):
                    dirs.add(parent)
                    parent = os.path.dirname(parent)
            own = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the dir that holds openzaya/
            hides = sorted({os.path.realpath(h) for h in probe["sites"] + [own] if os.path.isdir(h)})
            hides = [h for h in hides if _inside(h, [b for b in binds if os.path.isdir(b)])]
            plan = ([["dir", d, ""] for d in sorted(dirs, key=lambda d: d.count("/"))]
                    + [["link", p, t] for p, t in sorted(links.items()) if not _inside(p, binds)]
                    + [["bind", b, "dir" if os.path.isdir(b) else "file"] for b in binds]
                    + [["hide", h, ""] for h in hides])
            _plan = (plan, binds)
        return _plan


def _walk_links(path: str, links: dict, depth: int = 0) -> str:
    """Record every symlink on `path` (component by component) and return the real path it leads to."""
    assert depth < 40, f"symlink loop at {path}"
    cur = ""
    parts = [p for p in path.split("/") if p]
    for i, part in enumerate(parts):
        cur += "/" + part
        if os.path.islink(cur):
            target = os.readlink(cur)
            links[cur] = target
            nxt = os.path.normpath(os.path.join(os.path.dirname(cur), target))
            return _walk_links("/".join([nxt] + parts[i + 1:]), links, depth + 1)
    return cur or "/"


# ---------------------------------------------------------------------------------------------------------------
# identities: a machine-wide pool of uids (root only)

_uid_cond = threading.Condition()
_uid_held: dict[int, int] = {}   # uid -> fd of its flocked lock file
_uid_next = itertools.count()


def _uid_alive(uid: int) -> list[int]:
    """Pids of processes whose real uid is `uid`."""
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


def _lock_dir() -> str:
    os.makedirs(_UID_LOCKS, mode=0o700, exist_ok=True)
    st = os.lstat(_UID_LOCKS)
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and not st.st_mode & 0o077, \
        f"{_UID_LOCKS} must be a root-owned directory of mode 0700"
    return _UID_LOCKS


def claim_uid() -> int:
    """A pool uid that no other run on this machine holds and that no process has; waits while all are taken."""
    locks = _lock_dir()
    with _uid_cond:
        while True:
            start = next(_uid_next)
            for k in range(UID_POOL):
                uid = UID_BASE + (start + k) % UID_POOL
                if uid in _uid_held:
                    continue
                fd = os.open(os.path.join(locks, str(uid)), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                if _uid_alive(uid):   # a leftover of a crashed parent, or a process outside the pool's control
                    os.close(fd)
                    continue
                _uid_held[uid] = fd
                return uid
            _uid_cond.wait(0.05)


def release_uid(uid: int) -> None:
    with _uid_cond:
        os.close(_uid_held.pop(uid))
        _uid_cond.notify()


# ---------------------------------------------------------------------------------------------------------------
# modes

_mode_lock = threading.Lock()
_userns_ok: bool | None = None
_warned: set[str] = set()
WEAKER = {"userns": "not root: runs share the caller's uid outside their user namespaces",
          "none": "no namespaces: the candidate sees the whole filesystem as the caller's uid, the network is refused "
                  "only by an audit hook, no process-count limit, no total-disk cap, cleanup by process tree"}


def resolve_mode(mode: str = "auto") -> str:
    """The mode a run gets: "auto" is root when we are root, else userns when it works here, else none."""
    global _userns_ok
    if mode == "auto":
        if IS_ROOT:
            return "root"
        with _mode_lock:
            if _userns_ok is None:
                try:
                    _userns_ok = _run("pass", "", Limits(wall_s=30), None, "userns", None)[0].ok
                except RuntimeError as e:
                    log.warning("sandbox: user namespaces unavailable (%s)", e)
                    _userns_ok = False
        mode = "userns" if _userns_ok else "none"
    if mode not in MODES:
        raise ValueError(f"sandbox mode must be auto or one of {MODES}, not {mode!r}")
    if mode == "root" and not IS_ROOT:
        raise ValueError("sandbox mode 'root' needs root; use 'auto', 'userns' or 'none'")
    if mode in WEAKER and mode not in _warned:
        _warned.add(mode)
        log.warning("sandbox mode %s: %s", mode, WEAKER[mode])
    return mode


def _reachable_by_others(path: str) -> bool:
    parts = path.split("/")
    return all(os.stat("/".join(parts[:i]) or "/").st_mode & stat.S_IXOTH for i in range(1, len(parts)))


def isolation(mode: str = "auto") -> dict:
    """What the sandbox enforces on this machine in `mode` (runs two tiny probes)."""
    mode = resolve_mode(mode)
    probe = run_python("import json, os\nprint(json.dumps({'uid': os.getuid(), 'pids': len([d for d in "
                       "os.listdir('/proc') if d.isdigit()]) if os.path.isdir('/proc') else 0, "
                       "'sees_tmp': os.path.isdir('/tmp')}))", limits=Limits(wall_s=20), mode=mode)
    net = run_python("import socket\ntry:\n    s = socket.socket(); s.settimeout(1); s.connect(('1.1.1.1', 53))\n"
                     "    print('CONNECTED')\nexcept OSError as e:\n    print('blocked', e)",
                     limits=Limits(wall_s=20), mode=mode)
    seen = json.loads(probe.stdout) if probe.ok else {}
    ns = mode != "none"
    return {"mode": mode, "root": IS_ROOT,
            "unprivileged_uid": seen.get("uid", 0) != 0,
            "network": "network namespace" if "Errno" in net.stdout else "audit hook" if "blocked" in net.stdout
            else "NOT BLOCKED",
            "filesystem": "minimal read-only view" if ns and not seen.get("sees_tmp", True) else "whole filesystem",
            "processes": "own PID namespace" if seen.get("pids", 99) <= 2 else "others visible",
            "identity": {"root": "per-run uid from a pool", "userns": "per-run user namespace",
                         "none": "the caller's uid"}[mode],
            "process_limit": "RLIMIT_NPROC" if ns else "none", "disk_quota": "tmpfs" if ns else "per file only",
            "probe_ok": probe.ok}


# ---------------------------------------------------------------------------------------------------------------
# running


def run_python(code: str, stdin: str = "", limits: Limits | None = None, files: dict[str, str] | None = None,
               mode: str = "auto") -> RunResult:
    """Run `code` as main.py in a fresh sandbox under the limits; never raises on anything the code does."""
    return _run(code, stdin, limits or Limits(), files, resolve_mode(mode), None)[0]


def _run(code: str, stdin: str, lim: Limits, files: dict[str, str] | None, mode: str,
         call: tuple[str, list] | None) -> tuple[RunResult, list | None]:
    """One sandboxed run: (its result, the call results or None). Raises only when the sandbox cannot be built."""
    if mode == "none" and IS_ROOT and not _reachable_by_others(PYTHON):
        raise RuntimeError(f"sandbox mode 'none' as root runs the candidate as a pool uid, which cannot reach "
                           f"{PYTHON}; use mode 'root' or an interpreter outside untraversable directories")
    uid = claim_uid() if IS_ROOT else os.getuid()
    drop = IS_ROOT and mode != "root"   # root standing in for an unprivileged user
    base = tempfile.mkdtemp(prefix="oz-sandbox-")
    try:
        work = _write_files(base, {"main.py": code, **(files or {}), **(
            {".oz-call.json": json.dumps(list(call))} if call else {})}, uid if drop else None)
        with open(os.path.join(base, "stdin"), "w") as f:
            f.write(stdin)
        plan, binds = view_plan() if mode != "none" else ([], [])
        home = "/box" if mode != "none" else work
        rfd, wfd = os.pipe()
        cfg = {"mode": mode, "uid": uid, "drop": drop, "inside_uid": INSIDE_UID, "root": os.path.join(base, "root"),
               "work": work, "plan": plan, "binds": binds, "parent": os.getpid(), "result_fd": wfd,
               "call": call is not None, "limits": lim.__dict__,
               "env": {"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}}
        # -S -s -P and an environment of our own, not -I, which would ignore PYTHONHASHSEED (set iteration order)
        flags = ["-S", "-s"] + (["-P"] if sys.version_info >= (3, 11) else [])   # -P: no cwd on sys.path
        t0 = time.monotonic()
        with open(os.path.join(base, "stdin"), "rb") as stdin_f, os.fdopen(rfd, "rb", buffering=0) as rec_f:
            try:
                proc = subprocess.Popen([PYTHON, *flags, "-c", _BOOT, json.dumps(cfg)], cwd=base, stdin=stdin_f,
                                        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"},
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(wfd,),
                                        start_new_session=True, close_fds=True)
            finally:
                os.close(wfd)
            out, err, rec, reason = _collect(proc, rec_f, t0 + lim.wall_s, lim.output_bytes)
        if reason:
            _kill_tree(proc.pid)
        proc.wait()
        return _result(proc, out, err, rec, reason, time.monotonic() - t0, lim, mode)
    finally:
        shutil.rmtree(base, ignore_errors=True)
        if IS_ROOT:
            release_uid(uid)


def _write_files(base: str, files: dict[str, str], owner: int | None) -> str:
    """base/work with the files (base/root: where the view is mounted); owned by `owner` when one is given."""
    work = os.path.join(base, "work")
    os.mkdir(work, 0o700)
    os.mkdir(os.path.join(base, "root"), 0o700)
    for name, text in files.items():
        with open(os.path.join(work, os.path.basename(name)), "w") as f:
            f.write(text)
    if owner is not None:
        for p in [base, work] + [os.path.join(work, n) for n in os.listdir(work)]:
            os.chown(p, owner, owner)
    return work


def _result(proc: subprocess.Popen, out: bytes, err: bytes, rec: bytes, reason: str, wall: float, lim: Limits,
            mode: str) -> tuple[RunResult, list | None]:
    """The RunResult from init's record (the candidate's exit status, the call results) and what the parent saw."""
    try:
        record = json.loads(rec) if rec.strip() else {}
    except ValueError:
        record = {}
    if "setup_error" in record:
        raise RuntimeError(f"sandbox setup failed (mode {mode}): {record['setup_error']}")
    code = os.waitstatus_to_exitcode(record["status"]) if record.get("status") is not None else proc.returncode
    if not reason and code in (-signal.SIGXCPU, -signal.SIGKILL) and wall < lim.wall_s:
        reason = "cpu limit" if code == -signal.SIGXCPU else "signal 9"
    elif not reason and code < 0:
        reason = f"signal {-code}"
    elif not reason and record.get("why") == "result limit":
        reason = "output limit"
    run = RunResult(ok=code == 0 and not reason, stdout=out.decode("utf-8", "replace"),
                    stderr=err.decode("utf-8", "replace"), exit_code=code, timed_out=reason == "timeout",
                    killed_reason=reason, wall_s=wall, mode=mode)
    return run, record.get("results")


def _collect(proc: subprocess.Popen, rec_f, deadline: float, cap: int) -> tuple[bytes, bytes, bytes, str]:
    """Read stdout, stderr and init's record until EOF, the deadline, or a stream passing its cap."""
    bufs = {proc.stdout: bytearray(), proc.stderr: bytearray(), rec_f: bytearray()}
    caps = {proc.stdout: cap, proc.stderr: cap, rec_f: 2 * cap + 4096}
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
            buf += chunk[:caps[key.fileobj] + 1 - len(buf)]
            if len(buf) > caps[key.fileobj]:
                reason = "output limit"
        if reason:
            break
    sel.close()
    out, err, rec = bytes(bufs[proc.stdout][:cap]), bytes(bufs[proc.stderr][:cap]), bytes(bufs[rec_f])
    if not reason:   # streams closed; the process may still be running (closed its fds): bound the wait too
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            reason = "timeout"
    for f in (proc.stdout, proc.stderr):
        f.close()
    return out, err, rec, reason


def _kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every descendant (a few rounds, for processes forked meanwhile); killing init also ends
    its PID namespace."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
    for _ in range(5):
        children: dict[int, list[int]] = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/stat") as f:
                        children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(d))
                except (OSError, ValueError, IndexError):
                    pass
        tree, frontier = [], [pid]
        while frontier:
            p = frontier.pop()
            tree.append(p)
            frontier += children.get(p, [])
        alive = 0
        for p in tree:
            try:
                os.kill(p, signal.SIGKILL)
                alive += 1
            except OSError:
                pass
        if not alive:
            return


# ---------------------------------------------------------------------------------------------------------------
# calling functions on inputs


def call_function(code: str, func: str, inputs: list[list], limits: Limits | None = None, mode: str = "auto"
                  ) -> tuple[list | None, RunResult]:
    """Define `code`, call `func(*args)` for each args list in `inputs`; ([["ok", value] | ["error", msg]], run).

    The list is None when the run failed or did not give exactly one well-formed result per input. The values are
    whatever the candidate's function returned: callers compare them with values they computed themselves.
    """
    run, results = _run(code, "", limits or Limits(), None, resolve_mode(mode), (func, inputs))
    if results is not None and len(results) != len(inputs):
        results = None
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
