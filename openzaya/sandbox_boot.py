"""The sandbox's bootstrap program (openzaya/sandbox.py runs it as `python -I -c <this file's text> CONFIG_JSON`):
builds the namespaces and the filesystem view, forks init; init forks the candidate and reports to the parent over
a pipe only init holds. A file of its own so that it reads (and lints) as Python; it is never imported."""
if __name__ != "__main__":
    raise ImportError("openzaya.sandbox_boot is the sandbox's bootstrap program, run by openzaya.sandbox; not a module")
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
