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

_BOOT = r"""
import ctypes, fcntl, json, os, resource, select, signal, sys
cfg = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
PDEATHSIG, DUMPABLE, SUBREAPER, NO_NEW_PRIVS = 1, 4, 36, 38
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE, MNT_DETACH = 32, 4096, 16384, 1 << 18, 2
MODE, ROOT, UID, LIM = cfg["mode"], cfg["root"], cfg["uid"], cfg["limits"]


def check(ok, what):
    if not ok:
        e = ctypes.get_errno()
        raise OSError(e, what + ": " + os.strerror(e))


def mount(src, dst, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()
    check(libc.mount(enc(src), enc(dst), enc(fstype), flags, enc(data)) == 0, "mount " + dst)


def send(record):
    data = (json.dumps(record) + "\n").encode()
    while data:
        data = data[os.write(cfg["result_fd"], data):]


def write(path, text):
    with open(path, "w") as f:
        f.write(text)


def drop_to(uid, groups=True):
    if groups:   # (setgroups is denied in our user namespaces)
        os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    libc.prctl(PDEATHSIG, signal.SIGKILL)   # a credential change clears it
    libc.prctl(DUMPABLE, 1)   # and makes /proc/self root's: the uid map could not be written


def enter_namespaces():
    NEWNS, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET = 0x20000, 0x4000000, 0x8000000, 0x10000000, 0x20000000, 0x40000000
    others = NEWUTS | NEWIPC | NEWPID | NEWNET
    if MODE == "root" or cfg["drop"]:   # root builds the view; as a stand-in for a user, then becomes one
        check(libc.unshare(NEWNS | (others if MODE == "root" else 0)) == 0, "unshare")
        mount(None, "/", None, MS_REC | MS_PRIVATE)
        build_tree()
        if MODE == "root":
            make_box()
            return
        drop_to(UID)
    uid, gid = os.getuid(), os.getgid()
    check(libc.unshare(NEWUSER) == 0, "unshare(CLONE_NEWUSER)")
    write("/proc/self/setgroups", "deny")
    write("/proc/self/uid_map", f"{cfg['inside_uid']} {uid} 1")
    write("/proc/self/gid_map", f"{cfg['inside_uid']} {gid} 1")
    check(libc.unshare(NEWNS | others) == 0, "unshare(mount, pid, net, ipc, uts) in the user namespace")
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    if cfg["drop"]:   # root's tree is locked in this namespace: bind it afresh so pivot_root accepts it
        mount(ROOT, ROOT, None, MS_BIND | MS_REC)
        read_only(ROOT, [ROOT])
    else:
        build_tree()
    make_box()


def read_only(top, mounts):
    class MountAttr(ctypes.Structure):
        _fields_ = [("set", ctypes.c_uint64), ("clr", ctypes.c_uint64), ("prop", ctypes.c_uint64), ("ns", ctypes.c_uint64)]
    ro = MountAttr(1 | 2, 0, 0, 0)   # MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID
    if libc.syscall(442, -100, top.encode(), 0x8000, ctypes.byref(ro), ctypes.sizeof(ro)) != 0:   # mount_setattr
        for m in reversed(mounts):   # kernels before 5.12: one remount per mount
            mount(None, m, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID)


def build_tree():
    # an empty tmpfs with only what the plan names, all read-only
    fds = {p: os.open(p, os.O_PATH) for p in cfg["binds"]}   # in this mount namespace (binds cannot cross them)
    mount("tmpfs", ROOT, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m,nr_inodes=4096")
    mounts = [ROOT]
    for kind, path, arg in cfg["plan"]:
        dst = ROOT + path
        if kind == "dir":
            os.makedirs(dst, 0o755, exist_ok=True)
        elif kind == "link":
            os.symlink(arg, dst)
        elif kind == "bind":
            if arg == "dir":
                os.makedirs(dst, 0o755, exist_ok=True)
            else:
                os.close(os.open(dst, os.O_CREAT | os.O_WRONLY, 0o644))
            mount(f"/proc/self/fd/{fds[path]}", dst, None, MS_BIND | MS_REC)
            mounts.append(dst)
        elif kind == "hide":   # an empty read-only tmpfs over a directory of the bound tree (site-packages)
            mount("tmpfs", dst, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=4k,nr_inodes=2")
            mounts.append(dst)
    for d in ("box", "proc"):
        os.mkdir(ROOT + "/" + d, 0o755)
    for fd in fds.values():
        os.close(fd)
    read_only(ROOT, mounts)


def make_box():
    # /box: the candidate's working directory, a tmpfs whose size caps everything it writes
    box = ROOT + "/box"
    owner = f",uid={UID},gid={UID}" if MODE == "root" else ""
    mount("tmpfs", box, "tmpfs", MS_NOSUID | MS_NODEV, f"mode=0700,size={LIM['disk_bytes']},nr_inodes=16384" + owner)
    for name in os.listdir(cfg["work"]):
        with open(os.path.join(cfg["work"], name), "rb") as src, open(os.path.join(box, name), "wb") as dst:
            dst.write(src.read())
        if MODE == "root":
            os.chown(os.path.join(box, name), UID, UID)


def enter_view():
    for opts in ("hidepid=invisible,subset=pid", "hidepid=2", None):   # a /proc of this PID namespace only
        if libc.mount(b"proc", (ROOT + "/proc").encode(), b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                      None if opts is None else opts.encode()) == 0:
            break
    os.chdir(ROOT)
    pivot_root = {"x86_64": 155, "aarch64": 41}.get(os.uname().machine)
    if pivot_root is not None:
        check(libc.syscall(pivot_root, b".", b".") == 0, "pivot_root")
        check(libc.umount2(b".", MNT_DETACH) == 0, "detach the old root")
    else:
        os.chroot(".")
    os.chdir("/box")


def candidate(wfd, errfd):
    # a fork of init: descriptors, limits and identity first (nothing of the candidate has run yet), then its code
    wfd, errfd = fcntl.fcntl(wfd, fcntl.F_DUPFD, 1000), fcntl.fcntl(errfd, fcntl.F_DUPFD, 1000)
    try:
        os.dup2(wfd, 3)   # the candidate's end of its result pipe to init
        errfd = os.dup2(errfd, 4, inheritable=False)
        os.closerange(5, 1 << 16)
        if CALL is None:
            os.close(3)
        for res, val in ((resource.RLIMIT_CPU, (LIM["cpu_s"], LIM["cpu_s"] + 1)), (resource.RLIMIT_CORE, (0, 0)),
                         (resource.RLIMIT_AS, (LIM["memory_bytes"],) * 2),
                         (resource.RLIMIT_FSIZE, (LIM["file_bytes"],) * 2),
                         (resource.RLIMIT_NOFILE, (LIM["open_files"],) * 2)):
            resource.setrlimit(res, val)
        if MODE != "none":
            resource.setrlimit(resource.RLIMIT_NPROC, (LIM["processes"],) * 2)
        if MODE == "root":
            drop_to(UID)
        elif MODE == "userns":
            drop_to(cfg["inside_uid"], groups=False)
            header = (ctypes.c_uint32 * 2)(0x20080522, 0)   # _LINUX_CAPABILITY_VERSION_3, this thread
            check(libc.capset(header, (ctypes.c_uint32 * 6)()) == 0, "capset")   # none left in our user namespace
        libc.prctl(NO_NEW_PRIVS, 1, 0, 0, 0)
        run_code(errfd)
    except BaseException as e:
        os.write(errfd, f"sandbox child: {type(e).__name__}: {e}".encode())
    os._exit(126)


def run_code(errfd):
    # no exec (the same interpreter, hash seed 0, standard library only): main.py runs as __main__; for
    # call_function the function is then called on each input, one JSON line per call on fd 3
    os.close(errfd)
    import builtins, types
    if MODE == "none":
        sys.addaudithook(no_net)
    builtins.exit = builtins.quit = sys.exit   # -S skips site, which defines them
    sys.argv = ["main.py"]
    os.environ.clear()
    os.environ.update(cfg["env"])
    main = types.ModuleType("__main__")
    sys.modules["__main__"] = main
    code = 0
    try:
        exec(compile(SOURCE, "main.py", "exec"), main.__dict__)
        if CALL is not None:
            func, inputs = CALL
            with os.fdopen(3, "w") as out:
                for args in inputs:
                    try:
                        line = json.dumps(["ok", getattr(main, func)(*args)])
                    except BaseException as e:
                        line = json.dumps(["error", describe(e)])
                    out.write(line + "\n")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except BaseException:
            pass
    os._exit(code & 0xFF)


def no_net(event, args):
    if event.startswith("socket.") or event in ("_socket.socket", "socket.__new__"):
        raise PermissionError("network disabled in sandbox")


def describe(e):
    try:
        return type(e).__name__ + ": " + str(e)[:200]
    except BaseException:
        return type(e).__name__


def spawn():
    rfd, wfd = os.pipe()
    err_r, err_w = os.pipe()   # EOF once the candidate's setup succeeded and it closed its end
    cpid = os.fork()
    if cpid == 0:
        candidate(wfd, err_w)
    os.close(wfd)
    os.close(err_w)
    err = os.read(err_r, 4096)
    os.close(err_r)
    if err:
        raise OSError(err.decode())
    raw, status, why = collect(rfd, cpid)
    os.close(rfd)
    return raw, status, why


def collect(rfd, cpid):
    # what the child writes to its result pipe until it exits (a grandchild holding the pipe does not keep us)
    os.set_blocking(rfd, False)
    try:
        pidfd = os.pidfd_open(cpid)
    except (AttributeError, OSError):
        pidfd = None
    buf, status, live, why = bytearray(), None, True, ""
    while status is None:
        ready = select.select(([rfd] if live else []) + ([pidfd] if pidfd is not None else []), [], [],
                              None if pidfd is not None else 0.05)[0]
        if rfd in ready:
            live, why = drain(rfd, buf, cpid, live, why)
        if pidfd is None or pidfd in ready:
            pid, st = os.waitpid(cpid, os.WNOHANG)
            status = st if pid else None
    why = drain(rfd, buf, cpid, live, why)[1]
    if pidfd is not None:
        os.close(pidfd)
    return bytes(buf), status, why


def drain(rfd, buf, cpid, live, why):
    while live:
        try:
            chunk = os.read(rfd, 65536)
        except BlockingIOError:
            return True, why
        if not chunk:
            return False, why
        buf += chunk
        if len(buf) > LIM["output_bytes"]:
            os.kill(cpid, signal.SIGKILL)
            return False, "result limit"
    return False, why


def parse(raw, why):
    # exactly one ["ok", value] or ["error", message] line per input, else no results at all
    if why or CALL is None:
        return None, why
    lines = raw.decode("utf-8", "replace").splitlines()
    if len(lines) != len(CALL[1]):
        return None, f"{len(lines)} result lines for {len(CALL[1])} calls"
    try:
        results = [json.loads(s) for s in lines]
    except ValueError:
        return None, "malformed result line"
    if not all(isinstance(r, list) and len(r) == 2 and (r[0] == "ok" or r[0] == "error" and isinstance(r[1], str))
               for r in results):
        return None, "malformed result"
    return results, ""


def kill_descendants():
    # mode none: init is a child subreaper, so whatever the candidate left behind is (or becomes) our child
    while True:
        kids = []
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/stat") as f:
                        if int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid():
                            kids.append(int(d))
                except (OSError, ValueError, IndexError):
                    pass
        if not kids:
            return
        for k in kids:
            os.kill(k, signal.SIGKILL)
        for k in kids:   # once reaped, their own children are ours: the next round gets them
            os.waitpid(k, 0)


def init():
    libc.prctl(PDEATHSIG, signal.SIGKILL)
    if MODE == "none":
        libc.prctl(SUBREAPER, 1)
        os.chdir(cfg["work"])
    else:
        enter_view()
        os.setsid()   # the candidate's process group is ours, not the bootstrap's
    libc.prctl(DUMPABLE, 0)   # no ptrace, no /proc/<init>/fd or mem, even for the same uid
    raw, status, why = spawn()
    if MODE == "none":
        kill_descendants()
    results, why = parse(raw, why)
    send({"status": status, "results": results, "why": why})
    os._exit(0)


libc.prctl(PDEATHSIG, signal.SIGKILL)
if os.getppid() != cfg["parent"]:
    os._exit(125)
os.umask(0o022)
CALL = None
if cfg["call"]:   # [function name, inputs]: read before anything of the candidate exists
    with open(os.path.join(cfg["work"], ".oz-call.json")) as f:
        CALL = json.load(f)
    os.unlink(os.path.join(cfg["work"], ".oz-call.json"))
with open(os.path.join(cfg["work"], "main.py")) as f:
    SOURCE = f.read()
try:
    if MODE == "none" and cfg["drop"]:
        drop_to(UID)
    if MODE != "none":
        enter_namespaces()
    pid = os.fork()
    if pid == 0:
        try:
            init()
        except BaseException as e:
            send({"setup_error": f"init: {type(e).__name__}: {e}"})
        os._exit(125)
except OSError as e:
    send({"setup_error": f"{type(e).__name__}: {e}"})
    os._exit(125)
os.close(cfg["result_fd"])   # only init writes the record
libc.prctl(DUMPABLE, 0)
os._exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) & 0xFF)
"""

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
