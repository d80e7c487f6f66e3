"""Run one untrusted Python program in a sandbox built from Linux namespaces (stdlib only).

The evaluator calls `run_python`; it starts this file as a helper (`python -I -S sandbox.py
CONFIG`), which builds the sandbox and runs the program in it. Process tree, outside in:

    evaluator ─ A (helper: child subreaper, writes the id maps, kills the tree at the end)
                └ B (unshares the namespaces: user, mount, pid, net, ipc, uts)
                  └ C (PID 1 of the new PID namespace: builds the private root, reaps)
                    └ D (drops to an unprivileged uid, no capabilities, no_new_privs,
                         rlimits; exec python)

Layers, and what each one stops:

* user namespace (or, as root without one, a setresuid to nobody): the program runs as
  uid 65534 with no capabilities and `no_new_privs` set; RLIMIT_NPROC then counts only the
  program's own processes (in its own user namespace);
* PID namespace + a fresh /proc: the program sees only its own processes (not the
  evaluator's `/proc/<pid>/environ` or command line), and when C (PID 1) exits or is killed
  the kernel kills every process in the namespace, `setsid` and double-fork included;
* network namespace: only a loopback device that is down, so no connection anywhere
  (localhost and abstract unix sockets of the host included);
* mount namespace + pivot_root into a tmpfs: the program sees the system directories
  (/usr, /bin, /lib*, the Python installation and venv) read-only, a few /dev nodes, its own
  /proc, and a private size-capped tmpfs /tmp holding its working directory, the only
  writable place. Nothing else of the host file system is visible;
* IPC and UTS namespaces: no System V IPC with the host, a hostname of its own;
* rlimits (address space, CPU, open files, file size, core dumps, processes);
* a minimal environment (PATH, HOME, TMPDIR, LANG);
* stdout and stderr read by the evaluator with a byte cap, streaming (the tree is killed on
  overflow), and a wall-clock timeout that kills the whole tree.

Where the kernel refuses a layer, the run goes on without it (`isolation="auto"`, the
default), the evaluator warns once, and the description (`SandboxResult.layers`,
`describe`) says what was in force and why not; `isolation="strict"` refuses to run the
program instead, and `"off"` keeps only the limits, the environment, the output cap and the
process-tree kill (by the subreaper). It is not a virtual machine: no seccomp filter, the
whole kernel interface is reachable, and a kernel exploit escapes it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

# ---------------------------------------------------------------- Linux constants (stable ABI)

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
NAMESPACES = (
    ("mount_ns", CLONE_NEWNS),
    ("pid_ns", CLONE_NEWPID),
    ("net_ns", CLONE_NEWNET),
    ("ipc_ns", CLONE_NEWIPC),
    ("uts_ns", CLONE_NEWUTS),
)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MS_KEEP = 1 | 2 | 4 | 8 | 16 | 64 | 1024 | 2048 | 4096  # statvfs f_flag bits that are MS_* flags
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP = 1, 4, 24
PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 36, 38
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}

NOBODY = 65534
REQUIRED = ("pid_ns", "net_ns", "mount_ns", "private_root", "proc", "unprivileged", "nproc")
"""Layers that `isolation="strict"` requires and whose absence `"auto"` warns about."""

ISOLATION_MODES = ("auto", "strict", "off")
SIGNALS_RESET = tuple(
    getattr(signal, n)
    for n in ("SIGINT", "SIGTERM", "SIGALRM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")
    if hasattr(signal, n)
)
RETRY_WITHOUT_USERNS = 75


# ---------------------------------------------------------------- helper side (A, B, C, D)


class _Libc:
    def __init__(self) -> None:
        import ctypes

        self.ctypes = ctypes
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
        self.libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        self.libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
        self.libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]

    def _check(self, ret: int, what: str) -> None:
        if ret != 0:
            e = self.ctypes.get_errno()
            raise OSError(e, f"{what}: {os.strerror(e)}")

    def unshare(self, flags: int) -> None:
        self._check(self.libc.unshare(flags), f"unshare({flags:#x})")

    def mount(
        self, src: str | None, dst: str, fstype: str | None, flags: int, data: str | None = None
    ) -> None:
        enc = lambda s: None if s is None else s.encode()  # noqa: E731
        self._check(self.libc.mount(enc(src), enc(dst), enc(fstype), flags, enc(data)), f"mount {dst}")

    def umount2(self, path: str, flags: int) -> None:
        self._check(self.libc.umount2(path.encode(), flags), f"umount {path}")

    def prctl(self, option: int, arg: int = 0) -> None:
        self._check(self.libc.prctl(option, arg, 0, 0, 0), f"prctl({option})")

    def pivot_root(self, new: str, old: str) -> None:
        import platform

        nr = SYS_PIVOT_ROOT.get(platform.machine())
        if nr is None:
            raise OSError(0, f"pivot_root: syscall number unknown on {platform.machine()}")
        self._check(self.libc.syscall(self.ctypes.c_long(nr), new.encode(), old.encode()), "pivot_root")

    def sethostname(self, name: str) -> None:
        self._check(self.libc.sethostname(name.encode(), len(name)), "sethostname")


def _status(cfg: dict, **kv) -> None:
    """One JSON line to the evaluator (the status pipe; closed in D at exec, so the program
    cannot write to it)."""
    try:
        os.write(cfg["status_fd"], (json.dumps(kv) + "\n").encode())
    except OSError:
        pass


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(x) for x in fh.read().split()]
    except OSError:
        pass
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as fh:
                    stat = fh.read()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(name))
            except (OSError, ValueError, IndexError):
                pass
    return out


def _kill_tree() -> None:
    """A is the child subreaper of everything below it: any orphan (setsid, double fork)
    becomes its child. SIGKILL every child, reap, repeat until none is left."""
    me = os.getpid()
    while True:
        kids = _children(me) if sys.platform == "linux" else []
        for k in kids:
            try:
                os.kill(k, signal.SIGKILL)
            except ProcessLookupError:
                pass
        reaped = False
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                break
            reaped = True
        if not reaped:
            if not kids and sys.platform != "linux":  # no /proc: the process group is all we have
                try:
                    os.killpg(os.getpgrp(), signal.SIGKILL)
                except OSError:
                    return
            time.sleep(0.002)


def _decode_status(st: int) -> int:
    """A wait status as Popen.returncode: exit code, or -signal."""
    return -os.WTERMSIG(st) if os.WIFSIGNALED(st) else os.WEXITSTATUS(st)


def _helper_main(cfg: dict) -> None:  # A
    libc = None
    if sys.platform == "linux":
        try:
            libc = _Libc()
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)  # the evaluator died: clean up
            libc.prctl(PR_SET_CHILD_SUBREAPER, 1)
        except OSError:
            libc = None
    if os.getppid() != cfg["parent"]:
        os._exit(1)
    os.set_inheritable(cfg["status_fd"], False)  # pass_fds made it inheritable: D's exec must close it
    try:  # read here, on the host's /proc (D may have none)
        with open("/proc/sys/kernel/cap_last_cap") as fh:
            cfg["cap_last"] = int(fh.read())
    except (OSError, ValueError):
        cfg["cap_last"] = 63  # dropping a capability the kernel does not know fails harmlessly

    def die(signum, frame):
        _kill_tree()
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, die)
    signal.signal(signal.SIGALRM, die)  # backstop if the evaluator cannot kill us
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)  # the program may share our uid (no user namespace)
    signal.setitimer(signal.ITIMER_REAL, cfg["timeout"] + 10.0)
    lifeline_r, lifeline_w = os.pipe()  # C exits at once if A is gone (EOF here)

    use_userns = cfg["isolation"] != "off" and "user_ns" not in cfg["force_off"] and libc is not None
    reason = {}
    if cfg["isolation"] == "off":
        reason["user_ns"] = "disabled"
    elif "user_ns" in cfg["force_off"]:
        reason["user_ns"] = "disabled by the caller"
    elif libc is None:
        reason["user_ns"] = "not Linux" if sys.platform != "linux" else "libc or prctl unavailable"
    while True:
        sync_r, sync_w = os.pipe()  # B -> A
        go_r, go_w = os.pipe()  # A -> B
        b = os.fork()
        if b == 0:
            os.close(lifeline_w)
            os.close(sync_r)
            os.close(go_w)
            signal.setitimer(signal.ITIMER_REAL, 0)
            # default dispositions: no Python handler in B or C for the program to trigger;
            # as PID 1 of the namespace, C then ignores every signal sent from inside it,
            # and D (exec'd from C) starts with the defaults
            for sig in SIGNALS_RESET:
                signal.signal(sig, signal.SIG_DFL)
            try:
                _stage_b(cfg, libc, use_userns, dict(reason), sync_w, go_r, lifeline_r)
            except BaseException as e:  # never run the program after an unexpected error
                _status(cfg, error=f"sandbox helper: {type(e).__name__}: {e}")
                os._exit(70)
            os._exit(70)
        os.close(sync_w)
        os.close(go_r)
        if use_userns:
            msg = os.read(sync_r, 4096).decode()
            if msg == "U":
                try:
                    _write_id_maps(b)
                    os.write(go_w, b"K")
                except OSError as e:
                    reason["user_ns"] = f"writing the id maps: {e}"
                    os.write(go_w, b"F")
            elif msg.startswith("N:"):
                reason["user_ns"] = msg[2:]
        os.close(sync_r)
        os.close(go_w)
        while True:
            try:
                _, st = os.waitpid(b, 0)
                break
            except ChildProcessError:
                st = 0
                break
        if use_userns and "user_ns" in reason and _decode_status(st) == RETRY_WITHOUT_USERNS:
            use_userns = False
            continue
        break
    _kill_tree()
    rc = _decode_status(st)
    os._exit(rc if rc >= 0 else 128 - rc)


def _write_id_maps(pid: int) -> None:
    uid, gid = os.geteuid(), os.getegid()
    if uid == 0:  # inner root = host root (the helpers only); inner nobody = host nobody (the program)
        maps = (f"0 0 1\n{NOBODY} {NOBODY} 1\n", f"0 0 1\n{NOBODY} {NOBODY} 1\n")
    else:  # an unprivileged user may map only itself: inner nobody = the evaluator's uid
        with open(f"/proc/{pid}/setgroups", "w") as fh:
            fh.write("deny")
        maps = (f"{NOBODY} {uid} 1\n", f"{NOBODY} {gid} 1\n")
    for name, text in zip(("uid_map", "gid_map"), maps, strict=True):
        with open(f"/proc/{pid}/{name}", "w") as fh:
            fh.write(text)


def _stage_b(cfg, libc, use_userns, reason, sync_w, go_r, lifeline_r) -> None:
    layers = {"user_ns": False} | {name: False for name, _ in NAMESPACES}
    if libc is not None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:
        os._exit(1)
    if use_userns:
        try:
            libc.unshare(CLONE_NEWUSER)
            os.write(sync_w, b"U")
            if os.read(go_r, 1) != b"K":
                os._exit(RETRY_WITHOUT_USERNS)
            layers["user_ns"] = True
        except OSError as e:
            os.write(sync_w, f"N:{e}".encode())
    os.close(sync_w)
    os.close(go_r)
    for name, flag in NAMESPACES:
        if cfg["isolation"] == "off":
            reason[name] = "disabled"
        elif name in cfg["force_off"]:
            reason[name] = "disabled by the caller"
        elif libc is None:
            reason[name] = "not Linux" if sys.platform != "linux" else "libc unavailable"
        else:
            try:
                libc.unshare(flag)
                layers[name] = True
            except OSError as e:
                reason[name] = str(e)
    c = os.fork()
    if c == 0:
        try:
            _stage_c(cfg, libc, layers, reason, lifeline_r)
        except BaseException as e:
            if not cfg.get("started"):  # errors are reported only before the program runs
                _status(cfg, error=f"sandbox init: {type(e).__name__}: {e}")
            os._exit(70)
        os._exit(70)
    while True:
        try:
            _, st = os.waitpid(c, 0)
            break
        except ChildProcessError:
            os._exit(70)
    os._exit(os.WEXITSTATUS(st) if os.WIFEXITED(st) else 128 + os.WTERMSIG(st))


def _stage_c(cfg, libc, layers, reason, lifeline_r) -> None:
    import select

    if libc is not None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        libc.prctl(PR_SET_DUMPABLE, 0)  # the program cannot ptrace or read /proc of its init
    if select.select([lifeline_r], [], [], 0)[0]:  # A died before PDEATHSIG was armed
        os._exit(1)
    os.close(lifeline_r)
    # the program gets a uid of its own (not with isolation="off": limits only)
    drop = layers["user_ns"] or (os.geteuid() == 0 and cfg["isolation"] != "off")
    workdir = cfg["workdir"]
    layers["private_root"] = False
    layers["proc"] = False
    if layers["mount_ns"]:
        try:
            workdir = _private_root(cfg, libc, layers["pid_ns"], reason)
            layers["private_root"] = True
            layers["proc"] = "proc" not in reason
        except OSError as e:
            reason["private_root"] = str(e)
    else:
        reason["private_root"] = "needs the mount namespace"
    if not layers["private_root"]:
        workdir = cfg["workdir"]
        if drop:
            try:
                os.chown(workdir, NOBODY, NOBODY)
            except OSError:
                pass
    if not layers["proc"] and "proc" not in reason:
        reason["proc"] = "needs the PID and mount namespaces"
    if layers["uts_ns"]:
        try:
            libc.sethostname("sandbox")
        except OSError:
            pass
    if drop and not _nobody_can_run(cfg, workdir):
        drop = False
        reason["unprivileged"] = (
            f"uid {NOBODY} cannot run {cfg['python']} here: the program runs as the evaluator's uid"
        )
    layers["unprivileged"] = bool(drop)
    if not drop:
        reason.setdefault(
            "unprivileged", "not root and no user namespace: the program runs as the evaluator's uid"
        )
    # RLIMIT_NPROC counts per (user namespace, uid): only meaningful when the uid is the
    # program's own (a fresh user namespace, or nobody when we are real root)
    nproc = cfg["max_processes"] if drop else None
    if nproc is not None and not layers["user_ns"]:
        reason["nproc"] = "no user namespace: the limit counts every process of uid 65534 on the host"
    if nproc is not None and layers["user_ns"] and os.geteuid() != 0:
        nproc += 2  # B and C run as the same uid in the namespace and are counted
    layers["nproc"] = nproc is not None
    if nproc is None:
        reason.setdefault("nproc", "needs a uid of the program's own")
    missing = [k for k in REQUIRED if not layers.get(k)]
    desc = dict(layers, nproc_limit=nproc, reason="; ".join(f"{k}: {v}" for k, v in reason.items()))
    if cfg["isolation"] == "strict" and missing:
        _status(
            cfg,
            layers=desc,
            error=f"isolation='strict': not in force: {', '.join(missing)} ({desc['reason']})",
        )
        os._exit(70)
    _status(cfg, layers=desc)

    d = os.fork()
    cfg["started"] = True
    if d == 0:
        try:
            _stage_d(cfg, libc, workdir, drop, nproc)
        except BaseException as e:
            _status(cfg, error=f"sandbox exec: {type(e).__name__}: {e}")
        os._exit(127)
    rc = None
    while True:  # PID 1 reaps every orphan until the program itself exits
        try:
            pid, st = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        if pid == d:
            rc = _decode_status(st)
            break
    _status(cfg, rc=rc)
    os._exit(0)  # as PID 1 of the namespace: the kernel now kills whatever is left


def _nobody_can_run(cfg: dict, workdir: str) -> bool:
    """Can uid 65534 execute the interpreter and read the program? (Not always, without the
    private root: e.g. a Python installed under root's 0700 home.) Checked in a forked child."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            ok = os.access(cfg["python"], os.X_OK) and os.access(
                os.path.join(workdir, cfg["program_name"]), os.R_OK
            )
            os._exit(0 if ok else 1)
        except BaseException:
            os._exit(1)
    while True:
        try:
            _, st = os.waitpid(pid, 0)
            return os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0
        except ChildProcessError:
            return False


def _bind_ro(libc, src: str, dst: str, *, dev: bool = False) -> None:
    st = os.lstat(src)
    import stat as S

    if S.S_ISLNK(st.st_mode):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.symlink(os.readlink(src), dst)
        return
    if S.S_ISDIR(st.st_mode):
        os.makedirs(dst, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        open(dst, "a").close()
    libc.mount(src, dst, None, MS_BIND | MS_REC)
    targets = [dst]
    if S.S_ISDIR(st.st_mode):  # submounts too (they came along with MS_REC)
        with open("/proc/self/mountinfo") as fh:
            for line in fh:
                mp = line.split()[4].encode().decode("unicode_escape")
                if mp.startswith(dst.rstrip("/") + "/"):
                    targets.append(mp)
    for t in targets:
        flags = os.statvfs(t).f_flag & MS_KEEP  # keep locked flags (nodev, noexec, atime) as they are
        flags |= MS_REMOUNT | MS_BIND | MS_NOSUID | (0 if dev else MS_RDONLY | MS_NODEV)
        try:
            libc.mount(None, t, None, flags)
        except OSError:
            if t == dst:
                raise


def _private_root(cfg: dict, libc: _Libc, pid_ns: bool, reason: dict) -> str:
    """Build the new root on a tmpfs at cfg['root'] and pivot into it; return the work dir."""
    with open(os.path.join(cfg["workdir"], cfg["program_name"]), "rb") as fh:
        program = fh.read()
    libc.mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount reaches the host
    new = cfg["root"]
    libc.mount("tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    try:
        size = f"size={cfg['tmpfs_mb']}m"
        # the private /tmp first: the interpreter or its venv may live under /tmp (a CI clone in
        # `mktemp -d`), and its read-only binds must land inside this tmpfs, not under it
        os.makedirs(new + "/tmp")
        libc.mount("tmpfs", new + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"{size},mode=1777")
        for p in cfg["ro_paths"]:
            if os.path.lexists(p) and not os.path.lexists(new + p):
                _bind_ro(libc, p, new + p)
        os.makedirs(new + "/dev", exist_ok=True)
        for n in ("null", "zero", "full", "random", "urandom"):
            if os.path.exists("/dev/" + n):
                _bind_ro(libc, "/dev/" + n, f"{new}/dev/{n}", dev=True)
        for n, t in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1")):
            os.symlink(t, f"{new}/dev/{n}")
        os.symlink("/proc/self/fd/2", f"{new}/dev/stderr")
        os.makedirs(new + "/dev/shm")
        libc.mount("tmpfs", new + "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, f"{size},mode=1777")
        work = "/tmp/" + os.path.basename(cfg["workdir"].rstrip("/"))
        os.makedirs(new + work)
        with open(f"{new}{work}/{cfg['program_name']}", "wb") as fh:
            fh.write(program)
        os.chown(new + work, NOBODY, NOBODY)
        os.makedirs(new + "/proc")
        if pid_ns:
            try:
                libc.mount("proc", new + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
            except OSError as e:
                reason["proc"] = f"mounting a fresh /proc: {e}"
        else:
            reason["proc"] = "no PID namespace: /proc is left out (it would show the host's processes)"
        libc.mount(None, new, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
        os.chdir(new)
        try:
            libc.pivot_root(".", ".")
            libc.umount2(".", MNT_DETACH)  # the old root is gone from this namespace
        except OSError:
            libc.mount(new, "/", None, 8192)  # MS_MOVE, then chroot (the program has no CAP_SYS_CHROOT)
            os.chroot(".")
        os.chdir("/")
    except BaseException:
        try:
            os.chdir("/")
            libc.umount2(new, MNT_DETACH)
        except OSError:
            pass
        raise
    return work


def _stage_d(cfg, libc, workdir: str, drop: bool, nproc: int | None) -> None:
    import resource

    os.chdir(workdir)
    mem = cfg["memory_mb"] << 20
    fsize = cfg["tmpfs_mb"] << 20
    for lim, val in (
        (resource.RLIMIT_AS, mem),
        (resource.RLIMIT_CPU, cfg["cpu_s"]),
        (resource.RLIMIT_NOFILE, 64),
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_FSIZE, fsize),
    ):
        resource.setrlimit(lim, (val, val))
    if nproc is not None:
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    if drop:
        try:
            os.setgroups([])
        except OSError:  # an unprivileged user namespace has setgroups denied
            pass
        os.setresgid(NOBODY, NOBODY, NOBODY)
        if libc is not None:
            for cap in range(cfg["cap_last"] + 1):
                try:
                    libc.prctl(PR_CAPBSET_DROP, cap)
                except OSError:
                    pass
        os.setresuid(NOBODY, NOBODY, NOBODY)
    if libc is not None:
        libc.prctl(PR_SET_NO_NEW_PRIVS, 1)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
    _status(cfg, identity={"uid": os.getuid(), "gid": os.getgid(), "no_new_privs": libc is not None})
    python = cfg["python"]
    os.execve(python, [python, "-I", *cfg["args"], os.path.join(workdir, cfg["program_name"])], env)


# ---------------------------------------------------------------- evaluator side


class SandboxError(RuntimeError):
    """The sandbox could not run the program (e.g. a required layer is missing under
    `isolation="strict"`)."""


_WARNED: set = set()


def _python_paths() -> list[str]:
    """System directories and the Python installation, bound read-only into the sandbox."""
    paths = ["/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32"]
    paths += ["/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime"]
    cands = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    exe = os.path.realpath(sys.executable)
    cands.add(os.path.dirname(os.path.dirname(exe)))
    for p in sorted(cands, key=len):
        p = os.path.realpath(p)
        if p != "/" and not any(p == q or p.startswith(q.rstrip("/") + "/") for q in paths):
            paths.append(p)
    return paths


def run_python(
    program: str,
    *,
    args: tuple[str, ...] = (),
    stdin: bytes = b"",
    timeout: float = 5.0,
    memory_mb: int = 1024,
    max_output_bytes: int = 1 << 20,
    max_processes: int = 32,
    tmpfs_mb: int = 64,
    isolation: str = "auto",
    force_off: tuple[str, ...] = (),
) -> dict:
    """Run `python -I *args program.py` in the sandbox; return a dict with `returncode`
    (None on timeout or overflow), `stdout`, `stderr` (bytes, at most `max_output_bytes`
    each), `timed_out`, `output_overflow`, and `layers` (what was in force)."""
    import selectors
    import subprocess
    import tempfile

    if isolation not in ISOLATION_MODES:
        raise ValueError(f"isolation: must be one of {ISOLATION_MODES}, got {isolation!r}")
    if max_processes < 1:
        raise ValueError(f"max_processes: must be >= 1, got {max_processes}")
    if max_output_bytes < 1:
        raise ValueError(f"max_output_bytes: must be >= 1, got {max_output_bytes}")
    with tempfile.TemporaryDirectory(prefix="grip-humaneval-") as tmp:
        os.mkdir(os.path.join(tmp, "root"))
        with open(os.path.join(tmp, "program.py"), "w", encoding="utf-8") as fh:
            fh.write(program)
        status_r, status_w = os.pipe()
        cfg = {
            "parent": os.getpid(),
            "workdir": tmp,
            "root": os.path.join(tmp, "root"),
            "program_name": "program.py",
            "python": sys.executable,
            "args": list(args),
            "ro_paths": _python_paths(),
            "timeout": float(timeout),
            "memory_mb": int(memory_mb),
            "cpu_s": int(timeout) + 1,
            "max_processes": int(max_processes),
            "tmpfs_mb": int(tmpfs_mb),
            "isolation": isolation,
            "force_off": list(force_off),
            "status_fd": status_w,
        }
        t0 = time.monotonic()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", os.path.abspath(__file__), json.dumps(cfg)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                pass_fds=(status_w,),
                start_new_session=True,  # its own process group: the last-resort kill
            )
        finally:
            os.close(status_w)
        try:
            proc.stdin.write(stdin)
            proc.stdin.close()
        except OSError:
            pass
        out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
        bufs = {out_fd: bytearray(), err_fd: bytearray(), status_r: bytearray()}
        caps = {out_fd: max_output_bytes, err_fd: max_output_bytes, status_r: 1 << 20}
        sel = selectors.DefaultSelector()
        for fd in bufs:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        deadline = t0 + timeout
        timed_out = overflow = False
        exited_at = None
        try:
            while sel.get_map():
                left = deadline - time.monotonic()
                if left <= 0:
                    timed_out = True
                    break
                if exited_at is None and proc.poll() is not None:
                    exited_at = time.monotonic()
                if exited_at is not None and time.monotonic() - exited_at > 1.0:
                    break  # A killed the whole tree before it exited; nothing should hold the pipes
                for key, _ in sel.select(min(left, 0.5)):
                    fd = key.fd
                    try:
                        chunk = os.read(fd, 65536)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        sel.unregister(fd)
                        continue
                    room = caps[fd] - len(bufs[fd])
                    bufs[fd] += chunk[:room]
                    if len(chunk) > room:
                        overflow = fd != status_r or overflow
                        if fd == status_r:
                            sel.unregister(fd)
                if overflow:
                    break
        finally:
            sel.close()
            if timed_out or overflow or proc.poll() is None:
                _stop(proc)
            else:
                proc.wait()
            os.close(status_r)
            proc.stdout.close()
            proc.stderr.close()
    info: dict = {}
    for line in bytes(bufs[status_r]).splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        for k, v in msg.items():
            info[k] = v
    if "error" in info:  # the program never ran (the helpers write errors only before its exec)
        raise SandboxError(info["error"])
    layers = _describe(info, isolation, max_output_bytes, memory_mb)
    _warn_once(layers)
    return {
        "returncode": None if (timed_out or overflow) else info.get("rc", proc.returncode),
        "stdout": bytes(bufs[out_fd]),
        "stderr": bytes(bufs[err_fd]),
        "timed_out": timed_out,
        "output_overflow": overflow,
        "layers": layers,
        "seconds": time.monotonic() - t0,
    }


def _stop(proc) -> None:
    """Ask A to kill the tree (it is the subreaper of every orphan), then kill its group."""
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=2.0)
    except (OSError, Exception):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _describe(info: dict, isolation: str, max_output_bytes: int, memory_mb: int) -> dict:
    layers = dict(info.get("layers") or {})
    ident = info.get("identity") or {}
    if ident:
        layers["uid"] = ident.get("uid")
        layers["no_new_privs"] = ident.get("no_new_privs")
    layers.update(
        isolation=isolation, env="minimal", output_limit_bytes=max_output_bytes, memory_mb=memory_mb
    )
    return layers


def _warn_once(layers: dict) -> None:
    missing = tuple(k for k in REQUIRED if k in layers and not layers[k])
    if not missing or layers.get("isolation") == "off" or missing in _WARNED:
        return
    _WARNED.add(missing)
    import logging
    import warnings

    msg = (
        f"pass@1 sandbox: NOT in force: {', '.join(missing)}; generated code runs with less isolation "
        f"({layers.get('reason', '')}). Recorded as `sandbox` in eval.json."
    )
    logging.getLogger(__name__).warning(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


_DESCRIBED: dict = {}


def describe(isolation: str = "auto") -> dict:
    """What the sandbox puts in force on this machine (runs one empty program, once per
    process and mode)."""
    if isolation not in _DESCRIBED:
        _DESCRIBED[isolation] = run_python("", isolation=isolation, timeout=10.0)["layers"]
    return dict(_DESCRIBED[isolation])


if __name__ == "__main__":
    _helper_main(json.loads(sys.argv[1]))
